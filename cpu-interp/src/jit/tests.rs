//! The translation tier against the interpreter: same programs, same
//! final state and memory, same retired counts.

use iced_x86::code_asm::*;

use crate::insn::testutil::*;
use crate::state::CpuState;
use crate::{Cpu, CpuExit, Tier};

const DATA: u64 = 0x20_0000;

fn cpu_on(tier: Tier, code: &[u8]) -> Cpu {
    let mut c = new_cpu_interp();
    setup(&mut c, Mode::Long64);
    c.set_tier(tier).unwrap();
    if let Some(j) = c.jit.as_mut() {
        j.hot = 1;
    }
    write_phys(&c, CODE, code);
    c
}

fn data(c: &Cpu, len: u64) -> Vec<u64> {
    (0..len)
        .step_by(8)
        .map(|o| read_phys(c, DATA + o, 8))
        .collect()
}

/// Run `code` on both tiers with `init`; compare states, memory and the
/// retired count. Returns the JIT CPU.
fn agree(code: &[u8], init: impl Fn(&mut Cpu)) -> Cpu {
    let run = |tier| {
        let mut c = cpu_on(tier, code);
        init(&mut c);
        let exit = c.run(&mut crate::NullPlatform, 10_000_000);
        (c, exit)
    };
    let (i, ei) = run(Tier::Interp);
    let (j, ej) = run(Tier::Jit);
    assert_eq!(ei, ej, "exits differ");
    let (st_i, st_j): (CpuState, CpuState) = (i.state(), j.state());
    assert_eq!(st_i.regs, st_j.regs, "registers differ");
    assert_eq!(st_i, st_j, "states differ");
    assert_eq!(i.retired(), j.retired(), "retired counts differ");
    assert_eq!(data(&i, 0x400), data(&j, 0x400), "memory differs");
    let st = j.jit_stats().unwrap();
    assert!(st.translations > 0, "nothing was translated: {st:?}");
    j
}

fn asm(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.hlt().unwrap();
    a.assemble(CODE).unwrap()
}

#[test]
fn alu_loop() {
    let code = asm(|a| {
        let mut l = a.create_label();
        a.mov(rcx, 1000u64)?;
        a.mov(rbx, 0x1234_5678u64)?;
        a.xor(eax, eax)?;
        a.set_label(&mut l)?;
        a.add(rax, rbx)?;
        a.xor(rdx, rax)?;
        a.sub(rbx, 3)?;
        a.dec(rcx)?;
        a.jnz(l)
    });
    let j = agree(&code, |_| {});
    let st = j.jit_stats().unwrap();
    // Only the final HLT runs through the interpreter.
    assert_eq!(st.helper_insns, 1, "{st:?}");
}

#[test]
fn memory_loop() {
    let code = asm(|a| {
        let mut l = a.create_label();
        a.mov(rcx, 500u64)?;
        a.mov(rsi, DATA)?;
        a.lea(rdi, qword_ptr(rsi + 0x100))?;
        a.xor(edx, edx)?;
        a.set_label(&mut l)?;
        a.mov(eax, dword_ptr(rsi + rdx * 4))?;
        a.add(dword_ptr(rdi + rdx * 4), eax)?;
        a.add(edx, 7)?;
        a.and(edx, 0x3f)?;
        a.inc(dword_ptr(rsi + rdx * 4))?;
        a.dec(rcx)?;
        a.jnz(l)
    });
    agree(&code, |c| {
        for k in 0..64u64 {
            write_phys(c, DATA + k * 4, &((k * 0x01010101) as u32).to_le_bytes());
        }
    });
}

#[test]
fn calls_pushes_and_flags_across_memory() {
    let code = asm(|a| {
        let mut l = a.create_label();
        let mut f = a.create_label();
        let mut done = a.create_label();
        a.mov(rbx, DATA)?;
        a.mov(ecx, 40)?;
        a.set_label(&mut l)?;
        a.push(rcx)?;
        a.call(f)?;
        a.pop(rcx)?;
        // CF from the add survives the store and the dec.
        a.add(rax, rcx)?;
        a.mov(qword_ptr(rbx + 8), rax)?;
        a.dec(ecx)?;
        a.adc(rdx, 0)?;
        a.cmp(rcx, 0)?;
        a.mov(rsi, qword_ptr(rbx + 8))?;
        a.jne(l)?;
        a.jmp(done)?;
        a.set_label(&mut f)?;
        a.imul_3(eax, ecx, -7)?;
        a.shl(rax, 40)?;
        a.setc(byte_ptr(rbx + 0x10))?;
        a.cmovs(rdi, rax)?;
        a.ret()?;
        a.set_label(&mut done)?;
        a.nop()
    });
    agree(&code, |_| {});
}

#[test]
fn helpers_run_untranslated_instructions() {
    // CPUID, DIV and a REP STOSB inside translated blocks.
    let code = asm(|a| {
        let mut l = a.create_label();
        a.mov(r12d, 30)?;
        a.set_label(&mut l)?;
        a.mov(eax, 1)?;
        a.cpuid()?;
        a.mov(eax, r12d)?;
        a.xor(edx, edx)?;
        a.mov(ecx, 7)?;
        a.div(ecx)?;
        a.mov(r13, rdx)?;
        a.mov(rdi, DATA)?;
        a.mov(ecx, 16)?;
        a.mov(al, r12b)?;
        a.rep().stosb()?;
        a.dec(r12d)?;
        a.jnz(l)
    });
    let j = agree(&code, |_| {});
    assert!(j.jit_stats().unwrap().helper_insns > 0);
}

#[test]
fn page_fault_inside_a_translated_block_is_precise() {
    // A loop whose store walks off the mapped 1 GiB into a #PF; the
    // handler (IDT vector 14) records CR2 and the faulting RIP and halts.
    let code = asm(|a| {
        let mut l = a.create_label();
        a.mov(rbx, 0x3fff_f000u64)?;
        a.xor(eax, eax)?;
        a.set_label(&mut l)?;
        a.add(rax, 3)?;
        a.mov(qword_ptr(rbx), rax)?;
        a.add(rbx, 0x800)?;
        a.jmp(l)
    });
    let handler = {
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(rax, cr2).unwrap();
        a.mov(qword_ptr(DATA), rax).unwrap();
        a.mov(rax, qword_ptr(rsp + 8)).unwrap();
        a.mov(qword_ptr(DATA + 8), rax).unwrap();
        a.hlt().unwrap();
        a.assemble(0x5000).unwrap()
    };
    let j = agree(&code, |c| {
        write_phys(c, 0x5000, &handler);
        // IDT gate 14: 64-bit interrupt gate to 0x18:0x5000.
        let lo: u64 = 0x5000 | (0x18 << 16) | (0x8e00u64 << 32);
        write_phys(c, IDT + 14 * 16, &lo.to_le_bytes());
        write_phys(c, IDT + 14 * 16 + 8, &0u64.to_le_bytes());
    });
    assert_eq!(read_phys(&j, DATA, 8), 0x4000_0000);
}

#[test]
fn self_modifying_code_in_a_hot_loop() {
    // The loop rewrites the immediate of an instruction in its own block.
    let mut a = CodeAssembler::new(64).unwrap();
    let mut l = a.create_label();
    a.mov(ecx, 20).unwrap();
    a.xor(ebx, ebx).unwrap();
    a.set_label(&mut l).unwrap();
    a.mov(eax, 0x1111_1111u32).unwrap();
    a.add(rbx, rax).unwrap();
    a.lea(rdx, ptr(l)).unwrap();
    a.mov(dword_ptr(rdx + 1), ecx).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(l).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let j = agree(&code, |_| {});
    // 0x11111111 then 20, 19, ..., 2.
    let expect = 0x1111_1111u64 + (2..=20).sum::<u64>();
    assert_eq!(j.gpr(crate::state::gpr::RBX), expect);
}

#[test]
fn budget_stops_are_exact_in_translated_code() {
    let code = asm(|a| {
        let mut l = a.create_label();
        a.mov(rcx, 300u64)?;
        a.mov(rbx, DATA)?;
        a.set_label(&mut l)?;
        a.add(rax, rcx)?;
        a.mov(qword_ptr(rbx + rcx * 8 - 8), rax)?;
        a.ror(rax, 3)?;
        a.dec(rcx)?;
        a.jnz(l)
    });
    let mut reference = cpu_on(Tier::Interp, &code);
    assert_eq!(
        reference.run(&mut crate::NullPlatform, u64::MAX),
        CpuExit::Halted
    );
    for n in [1u64, 3, 5, 8, 13, 97] {
        let mut c = cpu_on(Tier::Jit, &code);
        loop {
            let before = c.retired();
            match c.run(&mut crate::NullPlatform, n) {
                CpuExit::BudgetExhausted => assert_eq!(c.retired(), before + n),
                CpuExit::Halted => break,
                e => panic!("{e:?}"),
            }
        }
        assert_eq!(c.state(), reference.state(), "budget {n}");
        assert_eq!(data(&c, 300 * 8), data(&reference, 300 * 8));
    }
}
