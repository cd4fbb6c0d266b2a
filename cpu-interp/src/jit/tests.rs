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

// ---- code written by someone else (device DMA) ------------------------

mod foreign {
    use std::sync::{Arc, Mutex};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::memory::{ForeignWrites, Ram};
    use crate::state::gpr;

    /// The function the program calls: `mov eax, k; ret`, on its own page.
    const FUNC: u64 = 0x4000;
    /// Physical address with nothing behind it (RAM is 4 MiB).
    const MMIO: u64 = 0x80_0000;
    const CALLS: u32 = 50;

    fn func(k: u32) -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(eax, k).unwrap();
        a.ret().unwrap();
        a.assemble(FUNC).unwrap()
    }

    type Log = Arc<Mutex<Vec<(u64, u64)>>>;

    struct SharedLog(Log);
    impl ForeignWrites for SharedLog {
        fn take(&mut self, written: &mut dyn FnMut(u64, u64)) {
            for (s, l) in self.0.lock().unwrap().drain(..) {
                written(s, l);
            }
        }
    }

    /// A "device" that DMA-writes a new `func` when the guest writes port
    /// 0x80 or the MMIO register, and asks for the VMM on port 0x81.
    struct Dma {
        mem: GuestMemoryMmap<()>,
        log: Log,
        stop: bool,
    }
    impl Dma {
        fn write(&mut self, k: u32) {
            let code = func(k);
            self.mem.write_slice(&code, GuestAddress(FUNC)).unwrap();
            self.log.lock().unwrap().push((FUNC, code.len() as u64));
        }
    }
    impl crate::Platform for Dma {
        fn io_read(&mut self, _port: u16, data: &mut [u8]) {
            data.fill(0);
        }
        fn io_write(&mut self, port: u16, _data: &[u8]) {
            match port {
                0x80 => self.write(100),
                0x81 => self.stop = true,
                _ => {}
            }
        }
        fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn mmio_write(&mut self, addr: u64, _data: &[u8]) {
            if addr == MMIO {
                self.write(10_000);
            }
        }
        fn stop_requested(&self) -> bool {
            self.stop
        }
    }

    /// Four rounds of `CALLS` calls to FUNC, summed in RBX; between them
    /// the device rewrites FUNC: on a port write, on an MMIO write, and
    /// while the VMM has the CPU (between two runs).
    fn program() -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        a.xor(ebx, ebx).unwrap();
        for round in 0..4 {
            let mut l = a.create_label();
            a.mov(ecx, CALLS).unwrap();
            a.set_label(&mut l).unwrap();
            a.mov(rdx, FUNC).unwrap();
            a.call(rdx).unwrap();
            a.add(rbx, rax).unwrap();
            a.dec(ecx).unwrap();
            a.jnz(l).unwrap();
            match round {
                0 => a.out(0x80, al).unwrap(),
                1 => {
                    a.mov(rdx, MMIO).unwrap();
                    a.mov(dword_ptr(rdx), eax).unwrap();
                }
                2 => a.out(0x81, al).unwrap(),
                _ => {}
            }
        }
        a.hlt().unwrap();
        a.assemble(CODE).unwrap()
    }

    /// RBX after the program on `tier`, with or without the write log.
    fn run(tier: Tier, logged: bool) -> (u64, Cpu) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap();
        let log: Log = Arc::default();
        let mut ram = Ram::new(mem.clone());
        if logged {
            ram = ram.with_foreign_writes(Box::new(SharedLog(log.clone())));
        }
        let mut c = Cpu::new(ram);
        setup(&mut c, Mode::Long64);
        c.set_tier(tier).unwrap();
        if let Some(j) = c.jit.as_mut() {
            j.hot = 1;
        }
        write_phys(&c, CODE, &program());
        write_phys(&c, FUNC, &func(1));
        let mut dma = Dma {
            mem,
            log,
            stop: false,
        };
        assert_eq!(c.run(&mut dma, 1_000_000), CpuExit::StopRequested);
        dma.stop = false;
        dma.write(1_000_000);
        assert_eq!(c.run(&mut dma, 1_000_000), CpuExit::Halted);
        (c.gpr(gpr::RBX), c)
    }

    #[test]
    fn code_written_by_a_device_over_executed_code_runs() {
        let expect = u64::from(CALLS) * (1 + 100 + 10_000 + 1_000_000);
        for tier in [Tier::Interp, Tier::Jit] {
            let (sum, c) = run(tier, true);
            assert_eq!(sum, expect, "{tier:?}");
            if tier == Tier::Jit {
                let st = c.jit_stats().unwrap();
                assert!(st.translations > 0, "{st:?}");
            }
        }
        // Without the log both tiers keep running the first FUNC they
        // decoded: the test can tell.
        for tier in [Tier::Interp, Tier::Jit] {
            let (sum, _) = run(tier, false);
            assert_eq!(sum, u64::from(CALLS) * 4, "{tier:?}");
        }
    }
}

/// A 16-bit LEA of a RIP-relative address after an instruction that
/// writes some flags only (BT leaves ZF alone), with every flag dead
/// after it: the tier keeps bits 63:16 of the destination and stores only
/// the flags it holds (difftest seed 41, 64-bit ring 0 case 2365, tripped
/// the debug build's "storing inexact flags" when this LEA went to the
/// interpreter).
#[test]
fn rip_relative_lea16_after_a_partial_flag_writer() {
    let code = asm(|a| {
        a.bt(r11d, esp)?;
        a.db(&[0x66, 0x44, 0x8d, 0x05, 0x28, 0x43, 0x00, 0x00])?; // lea r8w, [rip+4328h]
        a.cmp(ebx, r11d)?;
        a.bt(r11d, esp)?;
        a.db(&[0x66, 0x44, 0x8d, 0x0d, 0x34, 0x12, 0x00, 0x00])?; // lea r9w, [rip+1234h]
        a.mov(rax, DATA)?;
        a.mov(qword_ptr(rax), r9)?;
        a.db(&[0x44, 0x8d, 0x15, 0xdc, 0xfe, 0x00, 0x00]) // lea r10d, [rip+0FEDCh]
    });
    let j = agree(&code, |c| {
        c.set_gpr(crate::state::gpr::R8, 0x2b89_73ce_7a96_c4ca);
        c.set_gpr(crate::state::gpr::R9, 0x1111_2222_3333_4444);
        c.set_gpr(crate::state::gpr::R11, 0x4_0000_0000_0000);
    });
    // Bits 63:16 kept by the 16-bit forms, the 32-bit form zero-extends;
    // the low bits are the interpreter's (compared by `agree`).
    assert_eq!(j.gpr(crate::state::gpr::R8) >> 16, 0x2b89_73ce_7a96);
    assert_eq!(j.gpr(crate::state::gpr::R9) >> 16, 0x1111_2222_3333);
    assert_eq!(j.gpr(crate::state::gpr::R10) >> 32, 0);
    let st = j.jit_stats().unwrap();
    // The LEAs run natively: at most one helper (the HLT ending it) per
    // translation.
    assert!(st.helper_insns <= st.translations, "{st:?}");
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

// ---- random blocks through both tiers ---------------------------------

mod random {
    use iced_x86::{
        Code, Encoder, Instruction, MemoryOperand, Mnemonic, OpCodeOperandKind as K, Register,
    };

    use super::*;

    /// xorshift64*: deterministic cases from a seed.
    pub struct Rng(u64);
    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        }
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
            &v[self.below(v.len() as u64) as usize]
        }
    }

    /// Memory operands are `[rbx + disp]` or `[rbx + rsi*scale + disp]`;
    /// RBX sits on a page boundary inside the data area so unaligned
    /// accesses cross pages; R12 counts the loop. None of them (nor RSP)
    /// is ever an operand.
    pub const AREA: u64 = 0x20_1000;
    pub const AREA_LEN: u64 = 0x2000;
    pub const BASE: u64 = AREA + 0x1000;

    const MNEMONICS: &[Mnemonic] = &[
        Mnemonic::Add,
        Mnemonic::Or,
        Mnemonic::Adc,
        Mnemonic::Sbb,
        Mnemonic::And,
        Mnemonic::Sub,
        Mnemonic::Xor,
        Mnemonic::Cmp,
        Mnemonic::Test,
        Mnemonic::Inc,
        Mnemonic::Dec,
        Mnemonic::Neg,
        Mnemonic::Not,
        Mnemonic::Shl,
        Mnemonic::Shr,
        Mnemonic::Sar,
        Mnemonic::Rol,
        Mnemonic::Ror,
        Mnemonic::Rcl,
        Mnemonic::Rcr,
        Mnemonic::Shld,
        Mnemonic::Shrd,
        Mnemonic::Imul,
        Mnemonic::Mul,
        Mnemonic::Div,
        Mnemonic::Mov,
        Mnemonic::Movzx,
        Mnemonic::Movsx,
        Mnemonic::Movsxd,
        Mnemonic::Lea,
        Mnemonic::Xchg,
        Mnemonic::Bswap,
        Mnemonic::Bt,
        Mnemonic::Bts,
        Mnemonic::Btr,
        Mnemonic::Btc,
        Mnemonic::Bsf,
        Mnemonic::Bsr,
        Mnemonic::Cbw,
        Mnemonic::Cwde,
        Mnemonic::Cdqe,
        Mnemonic::Cwd,
        Mnemonic::Cdq,
        Mnemonic::Cqo,
        Mnemonic::Xadd,
        Mnemonic::Cmpxchg,
        Mnemonic::Cmove,
        Mnemonic::Cmovne,
        Mnemonic::Cmovb,
        Mnemonic::Cmova,
        Mnemonic::Cmovl,
        Mnemonic::Cmovg,
        Mnemonic::Cmovs,
        Mnemonic::Cmovo,
        Mnemonic::Sete,
        Mnemonic::Setb,
        Mnemonic::Setl,
        Mnemonic::Setbe,
        Mnemonic::Setp,
        Mnemonic::Seto,
        Mnemonic::Push,
        Mnemonic::Pop,
        Mnemonic::Nop,
        Mnemonic::Cld,
        Mnemonic::Stc,
        Mnemonic::Cmc,
        Mnemonic::Lahf,
    ];

    /// Legacy 64-bit-mode codes of the mnemonics above whose operands the
    /// generator can fill.
    fn codes() -> Vec<Code> {
        Code::values()
            .filter(|c| {
                let o = c.op_code();
                o.encoding() == iced_x86::EncodingKind::Legacy
                    && o.mode64()
                    && MNEMONICS.contains(&o.mnemonic())
                    && (0..o.op_count()).all(|n| {
                        matches!(
                            o.op_kind(n),
                            K::r8_or_mem
                                | K::r16_or_mem
                                | K::r32_or_mem
                                | K::r64_or_mem
                                | K::r8_reg
                                | K::r8_opcode
                                | K::r16_reg
                                | K::r16_opcode
                                | K::r32_reg
                                | K::r32_opcode
                                | K::r64_reg
                                | K::r64_opcode
                                | K::mem
                                | K::imm8
                                | K::imm8sex16
                                | K::imm8sex32
                                | K::imm8sex64
                                | K::imm16
                                | K::imm32
                                | K::imm32sex64
                                | K::imm64
                                | K::imm8_const_1
                                | K::cl
                                | K::al
                                | K::ax
                                | K::eax
                                | K::rax
                        )
                    })
                    // PUSH/POP only the 64-bit register forms (stack kept in balance by pairs).
                    && !(matches!(o.mnemonic(), Mnemonic::Push | Mnemonic::Pop)
                        && c.op_code().op_kind(0) != K::r64_opcode)
            })
            .collect()
    }

    /// Registers an operand may name (none of RBX, RSI, RSP, R12).
    fn reg(rng: &mut Rng, size: u32, allow_high: bool) -> Register {
        const FREE: [u8; 12] = [0, 1, 2, 5, 7, 8, 9, 10, 11, 13, 14, 15];
        if size == 1 && allow_high && rng.below(5) == 0 {
            return *rng.pick(&[Register::AH, Register::CH, Register::DH]);
        }
        crate::jit::asm::reg(*rng.pick(&FREE), size)
    }

    fn memop(rng: &mut Rng) -> MemoryOperand {
        let disp = rng.below(0x1ff0) as i64 - 0x1000;
        if rng.below(3) == 0 {
            let scale = *rng.pick(&[1u32, 2, 4, 8]);
            MemoryOperand::with_base_index_scale_displ_size(
                Register::RBX,
                Register::RSI,
                scale,
                disp,
                4,
            )
        } else {
            MemoryOperand::with_base_displ_size(Register::RBX, disp, 4)
        }
    }

    #[derive(Clone, Copy)]
    enum Op {
        R(Register),
        M(MemoryOperand),
        I32(i32),
        U32(u32),
        U64(u64),
    }

    fn build(code: Code, ops: &[Op]) -> Option<Instruction> {
        use Op::*;
        let r = match *ops {
            [] => Ok(Instruction::with(code)),
            [R(a)] => Instruction::with1(code, a),
            [M(a)] => Instruction::with1(code, a),
            [R(a), R(b)] => Instruction::with2(code, a, b),
            [R(a), M(b)] => Instruction::with2(code, a, b),
            [M(a), R(b)] => Instruction::with2(code, a, b),
            [R(a), I32(b)] => Instruction::with2(code, a, b),
            [R(a), U32(b)] => Instruction::with2(code, a, b),
            [R(a), U64(b)] => Instruction::with2(code, a, b),
            [M(a), I32(b)] => Instruction::with2(code, a, b),
            [M(a), U32(b)] => Instruction::with2(code, a, b),
            [R(a), R(b), R(c)] => Instruction::with3(code, a, b, c),
            [M(a), R(b), R(c)] => Instruction::with3(code, a, b, c),
            [R(a), R(b), I32(c)] => Instruction::with3(code, a, b, c),
            [R(a), R(b), U32(c)] => Instruction::with3(code, a, b, c),
            [R(a), M(b), I32(c)] => Instruction::with3(code, a, b, c),
            [R(a), M(b), U32(c)] => Instruction::with3(code, a, b, c),
            [M(a), R(b), U32(c)] => Instruction::with3(code, a, b, c),
            _ => return None,
        };
        r.ok()
    }

    /// One random instruction of `code`.
    fn instr(rng: &mut Rng, code: Code) -> Option<Instruction> {
        let o = code.op_code();
        // High-byte registers only without a REX prefix: never with a
        // 64-bit operand or with R8-R15 (the encoder refuses the rest).
        let high = rng.below(2) == 0;
        let mut ops = Vec::new();
        for n in 0..o.op_count() {
            let mem = rng.below(3) == 0;
            let op = match o.op_kind(n) {
                K::r8_or_mem if mem => Op::M(memop(rng)),
                K::r16_or_mem if mem => Op::M(memop(rng)),
                K::r32_or_mem if mem => Op::M(memop(rng)),
                K::r64_or_mem if mem => Op::M(memop(rng)),
                // LEA of a RIP-relative address (a constant, every size).
                K::mem if o.mnemonic() == Mnemonic::Lea && rng.below(4) == 0 => {
                    let target = CODE
                        .wrapping_add(rng.below(0x2_0000))
                        .wrapping_sub(0x1_0000);
                    Op::M(MemoryOperand::with_base_displ(Register::RIP, target as i64))
                }
                K::mem => Op::M(memop(rng)),
                K::r8_or_mem | K::r8_reg | K::r8_opcode => Op::R(reg(rng, 1, high)),
                K::r16_or_mem | K::r16_reg | K::r16_opcode => Op::R(reg(rng, 2, false)),
                K::r32_or_mem | K::r32_reg | K::r32_opcode => Op::R(reg(rng, 4, false)),
                K::r64_or_mem | K::r64_reg | K::r64_opcode => Op::R(reg(rng, 8, false)),
                K::imm8 => Op::U32(rng.below(256) as u32),
                K::imm8sex16 | K::imm8sex32 | K::imm8sex64 => Op::I32(rng.below(256) as i32 - 128),
                K::imm16 => Op::U32(rng.below(0x10000) as u32),
                K::imm32 => Op::U32(rng.next() as u32),
                K::imm32sex64 => Op::I32(rng.next() as i32),
                K::imm64 => Op::U64(rng.next()),
                K::imm8_const_1 => Op::U32(1),
                K::cl => Op::R(Register::CL),
                K::al => Op::R(Register::AL),
                K::ax => Op::R(Register::AX),
                K::eax => Op::R(Register::EAX),
                K::rax => Op::R(Register::RAX),
                _ => return None,
            };
            ops.push(op);
        }
        build(code, &ops)
    }

    /// Flags (iced bits) defined after a sequence, to keep flag readers
    /// and the final comparison to defined values.
    fn step_defined(defined: u32, i: &Instruction) -> u32 {
        let shift_cl = matches!(
            i.mnemonic(),
            Mnemonic::Shl
                | Mnemonic::Shr
                | Mnemonic::Sar
                | Mnemonic::Rol
                | Mnemonic::Ror
                | Mnemonic::Rcl
                | Mnemonic::Rcr
                | Mnemonic::Shld
                | Mnemonic::Shrd
        ) && (0..i.op_count()).any(|n| i.op_register(n) == Register::CL);
        if shift_cl {
            // A zero count keeps the flags: treat what it may change as unknown.
            return defined & !i.rflags_modified();
        }
        let set = i.rflags_written() | i.rflags_cleared() | i.rflags_set();
        (defined & !i.rflags_undefined()) | set
    }

    /// A block of up to `len` random instructions (forward Jcc skips
    /// included) followed by `dec r12; jnz start; hlt`; the final mask of
    /// defined flags.
    pub fn program(rng: &mut Rng, codes: &[Code], len: usize) -> (Vec<u8>, u32) {
        let mut enc = Encoder::new(64);
        let mut items: Vec<Instruction> = Vec::new();
        let mut defined = 0x3fu32;
        let mut pushes = 0usize;
        while items.len() < len {
            let code = *rng.pick(codes);
            let Some(i) = instr(rng, code) else {
                continue;
            };
            if i.rflags_read() & 0x3f & !defined != 0 {
                continue;
            }
            match i.mnemonic() {
                Mnemonic::Push if pushes >= 4 => continue,
                Mnemonic::Push => pushes += 1,
                Mnemonic::Pop if pushes == 0 => continue,
                Mnemonic::Pop => pushes -= 1,
                _ => {}
            }
            if enc.encode(&i, CODE).is_err() {
                let _ = enc.take_buffer();
                continue;
            }
            let _ = enc.take_buffer();
            defined = step_defined(defined, &i);
            items.push(i);
        }
        while pushes > 0 {
            items.push(Instruction::with1(Code::Pop_r64, Register::RDI).unwrap());
            pushes -= 1;
        }
        // Encode, with a few forward conditional skips.
        let mut code = Vec::new();
        let mut k = 0;
        let mut ip = CODE;
        // Flags defined at each point, recomputed as we go.
        let mut def = 0x3fu32;
        while k < items.len() {
            let skip = 1 + rng.below(3) as usize;
            if rng.below(6) == 0 && k + skip <= items.len() && def == 0x3f {
                let mut body = Vec::new();
                let mut bip = ip + 6;
                for i in &items[k..k + skip] {
                    enc.encode(i, bip).unwrap();
                    let b = enc.take_buffer();
                    bip += b.len() as u64;
                    body.extend(b);
                }
                let cc = *rng.pick(&[
                    Code::Je_rel32_64,
                    Code::Jne_rel32_64,
                    Code::Jb_rel32_64,
                    Code::Jl_rel32_64,
                    Code::Jg_rel32_64,
                    Code::Js_rel32_64,
                    Code::Jp_rel32_64,
                    Code::Jo_rel32_64,
                ]);
                let j = Instruction::with_branch(cc, bip).unwrap();
                enc.encode(&j, ip).unwrap();
                code.extend(enc.take_buffer());
                code.extend(body);
                // Skipped or not, flags after the skipped part are unknown
                // where the two paths differ.
                let mut d_taken = def;
                let mut d_run = def;
                for i in &items[k..k + skip] {
                    d_run = step_defined(d_run, i);
                }
                d_taken &= d_run;
                def = d_taken;
                ip = bip;
                k += skip;
                continue;
            }
            enc.encode(&items[k], ip).unwrap();
            let b = enc.take_buffer();
            ip += b.len() as u64;
            code.extend(b);
            def = step_defined(def, &items[k]);
            k += 1;
        }
        // Loop three times: dec r12; jnz CODE; hlt
        let dec = Instruction::with1(Code::Dec_rm64, Register::R12).unwrap();
        enc.encode(&dec, ip).unwrap();
        let b = enc.take_buffer();
        ip += b.len() as u64;
        code.extend(b);
        let jnz = Instruction::with_branch(Code::Jne_rel32_64, CODE).unwrap();
        enc.encode(&jnz, ip).unwrap();
        code.extend(enc.take_buffer());
        code.push(0xf4);
        // Over three iterations the first one's flags may feed the next:
        // keep only flags the whole body defines (or the loop's DEC does).
        let _ = defined;
        (code, def | 0x3d)
    }

    pub fn codes_cached() -> &'static [Code] {
        static C: std::sync::OnceLock<Vec<Code>> = std::sync::OnceLock::new();
        C.get_or_init(codes)
    }
}

/// Run one random case on both tiers; None if they agree, else a report.
fn random_case(seed: u64) -> Option<String> {
    use random::*;
    let mut rng = Rng::new(seed);
    let len = 1 + rng.below(12) as usize;
    let (code, _defined) = program(&mut rng, codes_cached(), len);
    let mut regs = [0u64; 16];
    for r in regs.iter_mut() {
        *r = match rng.below(4) {
            0 => rng.below(16),
            1 => rng.next() >> rng.below(64),
            _ => rng.next(),
        };
    }
    regs[3] = BASE; // RBX
    regs[6] = rng.below(8); // RSI
    regs[4] = STACK_TOP; // RSP
    regs[12] = 3; // R12: loop count
    let flags = 0x202 | (rng.next() & 0x8d5);
    let fill: Vec<u8> = (0..AREA_LEN).map(|_| rng.next() as u8).collect();
    let run = |tier: Tier| {
        let mut c = cpu_on(tier, &code);
        // Every exception vector: a HLT stub at 0x5000.
        write_phys(&c, 0x5000, &[0xf4]);
        for v in 0..32u64 {
            let lo: u64 = 0x5000 | (0x18 << 16) | (0x8e00u64 << 32);
            write_phys(&c, IDT + v * 16, &lo.to_le_bytes());
            write_phys(&c, IDT + v * 16 + 8, &0u64.to_le_bytes());
        }
        write_phys(&c, AREA, &fill);
        let mut s = c.state();
        s.regs.gpr = regs;
        s.regs.rflags = flags;
        c.set_state(&s);
        let exit = c.run(&mut crate::NullPlatform, 100_000);
        let mem: Vec<u8> = (0..AREA_LEN)
            .map(|o| read_phys(&c, AREA + o, 1) as u8)
            .collect();
        let stack: Vec<u64> = (0..16)
            .map(|k| read_phys(&c, STACK_TOP - 128 + 8 * k, 8))
            .collect();
        (c, exit, mem, stack)
    };
    let (i, ei, mi, stack_i) = run(Tier::Interp);
    let (j, ej, mj, stack_j) = run(Tier::Jit);
    let (a, b) = (i.state(), j.state());
    // Flags the SDM leaves undefined at the end are not compared; the
    // generator only lets instructions read flags that are defined.
    let undefined_mask = {
        let mut d = 0x3fu32;
        let mut dec = iced_x86::Decoder::with_ip(64, &code, CODE, iced_x86::DecoderOptions::NONE);
        // Straight-line approximation over the executed code: mask flags
        // any instruction could leave undefined.
        for ins in &mut dec {
            d &= !ins.rflags_undefined();
        }
        d
    };
    let eflags_of = |iced: u32| -> u64 {
        let mut m = 0u64;
        for (ib, eb) in [
            (0x01, 0x800),
            (0x02, 0x80),
            (0x04, 0x40),
            (0x08, 0x10),
            (0x10, 0x1),
            (0x20, 0x4),
        ] {
            if iced & ib != 0 {
                m |= eb;
            }
        }
        m
    };
    let keep = !0x8d5u64 | eflags_of(undefined_mask);
    let mut diffs = Vec::new();
    if ei != ej {
        diffs.push(format!("exit {ei:?} vs {ej:?}"));
    }
    if a.regs.rip != b.regs.rip {
        diffs.push(format!("rip {:#x} vs {:#x}", a.regs.rip, b.regs.rip));
    }
    if (a.regs.rflags & keep) != (b.regs.rflags & keep) {
        diffs.push(format!(
            "rflags {:#x} vs {:#x} (compared {keep:#x})",
            a.regs.rflags, b.regs.rflags
        ));
    }
    for g in 0..16 {
        if a.regs.gpr[g] != b.regs.gpr[g] {
            diffs.push(format!(
                "gpr{g} {:#x} vs {:#x}",
                a.regs.gpr[g], b.regs.gpr[g]
            ));
        }
    }
    if i.retired() != j.retired() {
        diffs.push(format!("retired {} vs {}", i.retired(), j.retired()));
    }
    if mi != mj {
        let at = mi.iter().zip(&mj).position(|(x, y)| x != y).unwrap_or(0);
        diffs.push(format!("memory at {:#x}", AREA + at as u64));
    }
    // An exception frame holds RFLAGS (at RSP + 16): its undefined
    // flags are not compared either.
    let frame_flags = b.regs.gpr[4].wrapping_add(16).wrapping_sub(STACK_TOP - 128) / 8;
    let masked = |s: &[u64]| -> Vec<u64> {
        s.iter()
            .enumerate()
            .map(|(k, &w)| if k as u64 == frame_flags { w & keep } else { w })
            .collect()
    };
    if masked(&stack_i) != masked(&stack_j) {
        diffs.push(format!("stack {stack_i:x?} vs {stack_j:x?}"));
    }
    if diffs.is_empty() {
        return None;
    }
    let mut listing = String::new();
    let dec = iced_x86::Decoder::with_ip(64, &code, CODE, iced_x86::DecoderOptions::NONE);
    for ins in dec {
        listing.push_str(&format!("  {:#x}: {}\n", ins.ip(), crate::disasm(&ins)));
    }
    Some(format!("seed {seed}: {}\n{listing}", diffs.join("; ")))
}

/// The block-level differential test: random instruction sequences (the
/// translatable forms and some the translation hands to the interpreter,
/// all operand sizes, high-byte registers, memory operands crossing
/// pages, flag readers, forward branches, PUSH/POP) run on both tiers give
/// the same registers, defined flags, memory and retired counts.
/// `DUET_JIT_CASES` sets the count (default 3000), `DUET_JIT_SEED` the
/// first seed.
#[test]
fn random_blocks_agree_across_tiers() {
    let n: u64 = std::env::var("DUET_JIT_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let first: u64 = std::env::var("DUET_JIT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut failures = Vec::new();
    for seed in first..first + n {
        if let Some(r) = random_case(seed) {
            failures.push(r);
            if failures.len() >= 5 {
                break;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} divergences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
