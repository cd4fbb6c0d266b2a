//! Stack instructions: PUSH, POP (GPR, memory, immediate, segment
//! registers), PUSHA/POPA, PUSHF/POPF, ENTER, LEAVE.

use iced_x86::{Code, Mnemonic, OpKind, Register};

use super::mask;
use crate::block::Insn;
use crate::cpu::{sreg, Cpu};
use crate::dispatch::Table;
use crate::exception::{Exception, XResult};
use crate::flags;
use crate::platform::Platform;
use crate::state::gpr;

pub fn register(t: &mut Table) {
    t.set_mnemonic(Mnemonic::Push, push);
    t.set_mnemonic(Mnemonic::Pop, pop);
    t.set_mnemonic(Mnemonic::Pusha, pusha);
    t.set_mnemonic(Mnemonic::Pushad, pusha);
    t.set_mnemonic(Mnemonic::Popa, popa);
    t.set_mnemonic(Mnemonic::Popad, popa);
    t.set_mnemonic(Mnemonic::Pushf, pushf);
    t.set_mnemonic(Mnemonic::Pushfd, pushf);
    t.set_mnemonic(Mnemonic::Pushfq, pushf);
    t.set_mnemonic(Mnemonic::Popf, popf);
    t.set_mnemonic(Mnemonic::Popfd, popf);
    t.set_mnemonic(Mnemonic::Popfq, popf);
    t.set_mnemonic(Mnemonic::Enter, enter);
    t.set_mnemonic(Mnemonic::Leave, leave);
}

fn push(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = cpu.stack_op_size(d);
    if d.i.op0_kind() == OpKind::Register && d.i.op0_register().is_segment_register() {
        // SDM (PUSH): with a 64-bit operand size the selector is pushed
        // zero-extended; with a 32-bit one recent Intel processors write
        // only 16 bits, leaving the rest of the slot unmodified.
        let v = cpu.reg(d.i.op0_register());
        let w = cpu.stack_width();
        let sp = cpu.gpr[gpr::RSP].wrapping_sub(size as u64) & w;
        if cpu.bits == 64 {
            let user = cpu.user();
            if !crate::segment::canonical(sp) {
                return Err(Exception::ss(0));
            }
            cpu.probe_lin_write(p, sp, size, user)?;
            cpu.write_lin(p, sp, if size == 8 { 8 } else { 2 }, v, user)?;
        } else {
            cpu.probe_write(p, sreg::SS, sp, size)?;
            cpu.write_mem(p, sreg::SS, sp, 2, v)?;
        }
        cpu.set_sp(sp);
        return Ok(());
    }
    let v = cpu.op_read(p, d, 0, size)?;
    cpu.push(p, size, v)
}

fn pop(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = cpu.stack_op_size(d);
    let v = cpu.peek(p, size, 0)?;
    let old_sp = cpu.gpr[gpr::RSP];
    match d.i.op0_kind() {
        OpKind::Register => {
            let r = d.i.op0_register();
            if r.is_segment_register() {
                let seg = r as usize - Register::ES as usize;
                cpu.load_sreg(p, seg, v as u16)?;
                cpu.set_sp(old_sp.wrapping_add(size as u64));
                if seg == sreg::SS {
                    cpu.events.mov_ss_shadow = true;
                    cpu.end_block = true;
                }
                return Ok(());
            }
            cpu.set_sp(old_sp.wrapping_add(size as u64));
            cpu.set_reg(r, v);
        }
        _ => {
            // The destination address is computed with the incremented SP.
            cpu.set_sp(old_sp.wrapping_add(size as u64));
            let off = cpu.ea(d);
            if let Err(e) = cpu.write_mem(p, d.seg as usize, off, size, v) {
                cpu.gpr[gpr::RSP] = old_sp;
                return Err(e);
            }
        }
    }
    Ok(())
}

fn pusha(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = if d.i.mnemonic() == Mnemonic::Pushad {
        4
    } else {
        2
    };
    let m = mask(size);
    let vals: Vec<u64> = [
        gpr::RAX,
        gpr::RCX,
        gpr::RDX,
        gpr::RBX,
        gpr::RSP,
        gpr::RBP,
        gpr::RSI,
        gpr::RDI,
    ]
    .iter()
    .map(|&r| cpu.gpr[r] & m)
    .collect();
    let sp = cpu.push_values(p, &vals, size)?;
    cpu.set_sp(sp);
    Ok(())
}

fn popa(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = if d.i.mnemonic() == Mnemonic::Popad {
        4
    } else {
        2
    };
    let mut vals = [0u64; 8];
    for (k, v) in vals.iter_mut().enumerate() {
        *v = cpu.peek(p, size, (k * size) as u64)?;
    }
    // Stack order: DI SI BP (SP skipped) BX DX CX AX.
    let regs = [
        gpr::RDI,
        gpr::RSI,
        gpr::RBP,
        gpr::RSP,
        gpr::RBX,
        gpr::RDX,
        gpr::RCX,
        gpr::RAX,
    ];
    for (k, &r) in regs.iter().enumerate() {
        if r != gpr::RSP {
            cpu.set_gpr_sized(r, size as u32, vals[k]);
        }
    }
    let sp = cpu.gpr[gpr::RSP].wrapping_add(8 * size as u64);
    cpu.set_sp(sp);
    Ok(())
}

fn pushf(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    if cpu.vm86() && cpu.flags.iopl() < 3 {
        return Err(Exception::gp0());
    }
    let size = cpu.stack_op_size(d);
    let f = cpu.flags.get() & !(flags::VM | flags::RF);
    cpu.push(p, size, f & mask(size))
}

fn popf(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    if cpu.vm86() && cpu.flags.iopl() < 3 {
        return Err(Exception::gp0());
    }
    let size = cpu.stack_op_size(d);
    let v = cpu.peek(p, size, 0)?;
    let mut changeable = flags::ARITH
        | flags::TF
        | flags::DF
        | flags::NT
        | flags::AC
        | flags::ID
        | flags::IF
        | flags::IOPL;
    if cpu.protected() {
        if cpu.vm86() || cpu.cpl > 0 {
            changeable &= !flags::IOPL;
        }
        if !cpu.vm86() && cpu.cpl > cpu.flags.iopl() {
            changeable &= !flags::IF;
        }
    }
    if size == 2 {
        changeable &= 0xffff;
    }
    let cur = cpu.flags.get();
    let nf = ((cur & !changeable) | (v & changeable)) & !flags::RF;
    let sp = cpu.gpr[gpr::RSP].wrapping_add(size as u64);
    cpu.set_sp(sp);
    cpu.flags.set(nf);
    cpu.end_block = true;
    Ok(())
}

/// Operand size of ENTER/LEAVE from their iced code.
fn frame_size(d: &Insn) -> usize {
    match d.i.code() {
        Code::Enterw_imm16_imm8 | Code::Leavew => 2,
        Code::Enterd_imm16_imm8 | Code::Leaved => 4,
        _ => 8,
    }
}

fn enter(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = frame_size(d);
    let alloc = d.i.immediate(0) & 0xffff;
    let level = d.i.immediate(1) & 0x1f;
    let w = cpu.stack_width();
    let rbp = cpu.gpr[gpr::RBP];
    let ss = cpu.seg[sreg::SS];
    let long = cpu.bits == 64;
    let user = cpu.user();
    // Each value is stored as soon as it is known, as on hardware: a fault
    // (on a frame-pointer read or a later push) leaves the earlier pushes
    // in memory but changes no register.
    let push = |cpu: &mut Cpu, p: &mut dyn Platform, sp: &mut u64, v: u64| -> XResult<()> {
        *sp = sp.wrapping_sub(size as u64) & w;
        let lin = cpu.stack_linear(&ss, *sp, size, long)?;
        cpu.probe_lin_write(p, lin, size, user)?;
        cpu.write_lin(p, lin, size, v, user)
    };
    let mut sp = cpu.gpr[gpr::RSP];
    push(cpu, p, &mut sp, rbp & mask(size))?;
    let frame_temp = sp;
    if level > 0 {
        let mut bp = rbp;
        for _ in 1..level {
            bp = bp.wrapping_sub(size as u64) & w;
            let v = if long {
                if !crate::segment::canonical(bp) {
                    return Err(Exception::ss(0));
                }
                cpu.read_lin(p, bp, size, user)?
            } else {
                cpu.read_mem(p, sreg::SS, bp, size)?
            };
            push(cpu, p, &mut sp, v)?;
        }
        push(cpu, p, &mut sp, frame_temp)?;
    }
    sp = sp.wrapping_sub(alloc) & w;
    // The final stack pointer must be writable too (in every mode).
    if alloc != 0 {
        if long {
            let lin = cpu.stack_linear(&ss, sp, 1, true)?;
            cpu.probe_lin_write(p, lin, 1, user)?;
        } else {
            cpu.probe_write(p, sreg::SS, sp, 1)?;
        }
    }
    cpu.set_gpr_sized(
        gpr::RBP,
        if size == 8 { 8 } else { size as u32 },
        frame_temp,
    );
    cpu.set_sp(sp);
    Ok(())
}

fn leave(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = frame_size(d);
    let w = cpu.stack_width();
    let old = cpu.gpr[gpr::RSP];
    cpu.set_sp(cpu.gpr[gpr::RBP] & w);
    match cpu.peek(p, size, 0) {
        Ok(v) => {
            let sp = cpu.gpr[gpr::RSP].wrapping_add(size as u64);
            cpu.set_sp(sp);
            cpu.set_gpr_sized(gpr::RBP, size as u32, v);
            Ok(())
        }
        Err(e) => {
            cpu.gpr[gpr::RSP] = old;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::insn::testutil::*;
    use crate::state::gpr::*;

    #[test]
    fn push_pop_64() {
        // push rax (50) ; push 0x12 (6a 12) ; pop rbx (5b) ; pop qword [rsp-8+8]?:
        // pop rcx (59) ; push word 0x1234 (66 68 34 12) ; pop dx (66 5a)
        let code = [
            0x50, 0x6a, 0x12, 0x5b, 0x59, 0x66, 0x68, 0x34, 0x12, 0x66, 0x5a,
        ];
        let c = run(Mode::Long64, &code, |c| {
            c.set_gpr(RAX, 0xdead_beef_0000_0001)
        });
        assert_eq!(c.gpr(RBX), 0x12);
        assert_eq!(c.gpr(RCX), 0xdead_beef_0000_0001);
        assert_eq!(c.gpr(RDX) & 0xffff, 0x1234);
        assert_eq!(c.gpr(RSP), STACK_TOP);
    }

    #[test]
    fn pop_mem_uses_incremented_esp() {
        // push 0x55 (6a 55) ; pop dword [esp] (8f 04 24)
        let code = [0x6a, 0x55, 0x8f, 0x04, 0x24];
        let c = run(Mode::Prot32, &code, |_| {});
        // After the pop ESP = STACK_TOP; the value lands at [STACK_TOP].
        assert_eq!(c.gpr(RSP), STACK_TOP);
        assert_eq!(read_phys(&c, STACK_TOP, 4), 0x55);
    }

    #[test]
    fn push_segment_register_64_zero_extends() {
        // push fs (0f a0): 64-bit operand size, the selector (0x10 in the
        // test GDT) is written zero-extended to 8 bytes.
        // push fs with 16-bit operand size (66 0f a0): 2 bytes.
        let code = [0x0f, 0xa0, 0x66, 0x0f, 0xa0];
        let c = run(Mode::Long64, &code, |c| {
            write_phys(c, STACK_TOP - 10, &[0xff; 10]);
        });
        assert_eq!(c.gpr(RSP), STACK_TOP - 10);
        assert_eq!(read_phys(&c, STACK_TOP - 8, 8), 0x10);
        assert_eq!(read_phys(&c, STACK_TOP - 10, 2), 0x10);
    }

    #[test]
    fn enter_faults_after_its_earlier_pushes() {
        // enter 8, 2 (c8 08 00 02) with RBP = 0x40000008: the push of RBP
        // is stored, then reading the frame pointer at [0x40000000] (an
        // unmapped GiB) faults; no register changes (as on hardware).
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        write_phys(&c, CODE, &[0xc8, 0x08, 0x00, 0x02]);
        c.set_gpr(RBP, 0x4000_0008);
        let mut p = TestPlatform::default();
        let insn = c.decode_one(&mut p).expect("decodable");
        let e = (insn.h)(&mut c, &mut p, &insn).expect_err("#PF");
        assert_eq!(e.vector, crate::exception::PF);
        assert_eq!(read_phys(&c, STACK_TOP - 8, 8), 0x4000_0008);
        assert_eq!((c.gpr(RSP), c.gpr(RBP)), (STACK_TOP, 0x4000_0008));
        // enter 0xffff, 0 (c8 ff ff 00): the final RSP (below 0, unmapped)
        // is checked for writing in 64-bit mode too.
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        write_phys(&c, CODE, &[0xc8, 0xff, 0xff, 0x00]);
        let insn = c.decode_one(&mut p).expect("decodable");
        let e = (insn.h)(&mut c, &mut p, &insn).expect_err("#PF");
        assert_eq!(e.error_code, Some(2));
        assert_eq!(c.cr2, (STACK_TOP - 8).wrapping_sub(0xffff));
        assert_eq!(c.gpr(RSP), STACK_TOP);
        // enter 0, 2 with a non-canonical RBP: reading the frame pointer is
        // a stack access, #SS(0) (not a page walk of that address).
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        write_phys(&c, CODE, &[0xc8, 0x00, 0x00, 0x02]);
        c.set_gpr(RBP, 0xc2cd_37c9_c113_cabb);
        let insn = c.decode_one(&mut p).expect("decodable");
        let e = (insn.h)(&mut c, &mut p, &insn).expect_err("#SS");
        assert_eq!(e.vector, crate::exception::SS);
    }

    #[test]
    fn enter_with_deep_nesting_level() {
        // enter 8, 20 (c8 08 00 14): pushes EBP, 19 frame pointers copied
        // from [ebp-4] .. [ebp-76], and the new frame pointer (21 values;
        // more than the 8 a PUSHA needs).
        let code = [0xc8, 0x08, 0x00, 0x14];
        let c = run(Mode::Prot32, &code, |c| {
            c.set_gpr(RBP, 0x6000);
            for k in 1..20u64 {
                write_phys(c, 0x6000 - 4 * k, &(0x1000 + k as u32).to_le_bytes());
            }
        });
        let frame = STACK_TOP - 4;
        assert_eq!(c.gpr(RBP), frame);
        assert_eq!(c.gpr(RSP), STACK_TOP - 4 * 21 - 8);
        assert_eq!(read_phys(&c, frame, 4), 0x6000);
        assert_eq!(read_phys(&c, frame - 4, 4), 0x1001);
        assert_eq!(read_phys(&c, frame - 4 * 19, 4), 0x1000 + 19);
        assert_eq!(read_phys(&c, frame - 4 * 20, 4), frame);
    }

    #[test]
    fn pushf_popf_pusha_popa_enter_leave_16() {
        // pusha (60) ; mov ax,0 (b8 00 00) ; popa (61) ; pushf (9c) ; popf (9d)
        // enter 8, 0 (c8 08 00 00) ; leave (c9)
        let code = [
            0x60, 0xb8, 0, 0, 0x61, 0x9c, 0x9d, 0xc8, 0x08, 0x00, 0x00, 0xc9,
        ];
        let c = run(Mode::Real16, &code, |c| {
            c.set_gpr(RAX, 0x4321);
            c.set_gpr(RBP, 0x7777);
        });
        assert_eq!(c.gpr(RAX), 0x4321);
        assert_eq!(c.gpr(RBP), 0x7777);
        assert_eq!(c.gpr(RSP), STACK_TOP);
    }
}
