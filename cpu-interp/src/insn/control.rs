//! Control transfer: JMP, Jcc, CALL, RET, LOOP/JCXZ, far JMP/CALL/RET,
//! INT n / INT3 / INTO / INT1, IRET.

use iced_x86::{Code, Mnemonic, OpKind};

use super::mask;
use super::mov::cc;
use crate::block::Insn;
use crate::cpu::{sreg, Cpu};
use crate::dispatch::Table;
use crate::exception::{self, Exception, XResult};
use crate::flags;
use crate::interrupt::EventKind;
use crate::platform::Platform;
use crate::state::gpr;

pub fn register(t: &mut Table) {
    for &c in t.codes(Mnemonic::Jmp).to_vec().iter() {
        let h: crate::dispatch::Handler = match c {
            Code::Jmp_rel8_16
            | Code::Jmp_rel8_32
            | Code::Jmp_rel8_64
            | Code::Jmp_rel16
            | Code::Jmp_rel32_32
            | Code::Jmp_rel32_64 => jmp_rel,
            Code::Jmp_rm16 | Code::Jmp_rm32 | Code::Jmp_rm64 => jmp_near_indirect,
            Code::Jmp_ptr1616 | Code::Jmp_ptr1632 => jmp_far_ptr,
            _ => jmp_far_mem,
        };
        t.set(c, h);
    }
    for &c in t.codes(Mnemonic::Call).to_vec().iter() {
        let h: crate::dispatch::Handler = match c {
            Code::Call_rel16 | Code::Call_rel32_32 | Code::Call_rel32_64 => call_rel,
            Code::Call_rm16 | Code::Call_rm32 | Code::Call_rm64 => call_near_indirect,
            Code::Call_ptr1616 | Code::Call_ptr1632 => call_far_ptr,
            _ => call_far_mem,
        };
        t.set(c, h);
    }
    for m in [
        Mnemonic::Jo,
        Mnemonic::Jno,
        Mnemonic::Jb,
        Mnemonic::Jae,
        Mnemonic::Je,
        Mnemonic::Jne,
        Mnemonic::Jbe,
        Mnemonic::Ja,
        Mnemonic::Js,
        Mnemonic::Jns,
        Mnemonic::Jp,
        Mnemonic::Jnp,
        Mnemonic::Jl,
        Mnemonic::Jge,
        Mnemonic::Jle,
        Mnemonic::Jg,
    ] {
        t.set_mnemonic(m, jcc);
    }
    t.set_mnemonic(Mnemonic::Ret, ret);
    t.set_mnemonic(Mnemonic::Retf, retf);
    t.set_mnemonic(Mnemonic::Loop, loop_);
    t.set_mnemonic(Mnemonic::Loope, loop_);
    t.set_mnemonic(Mnemonic::Loopne, loop_);
    t.set_mnemonic(Mnemonic::Jcxz, jcxz);
    t.set_mnemonic(Mnemonic::Jecxz, jcxz);
    t.set_mnemonic(Mnemonic::Jrcxz, jcxz);
    t.set_mnemonic(Mnemonic::Int, int_n);
    t.set_mnemonic(Mnemonic::Int3, int3);
    t.set_mnemonic(Mnemonic::Into, into);
    t.set_mnemonic(Mnemonic::Int1, int1);
    t.set_mnemonic(Mnemonic::Iret, iret);
    t.set_mnemonic(Mnemonic::Iretd, iret);
    t.set_mnemonic(Mnemonic::Iretq, iret);
}

/// Check a near branch target against the CS limit (legacy modes) or
/// canonical form (64-bit mode).
#[inline(always)]
pub(crate) fn check_near_target(cpu: &Cpu, target: u64) -> XResult<()> {
    if cpu.bits == 64 {
        if !crate::segment::canonical(target) {
            return Err(Exception::gp0());
        }
    } else if target > u64::from(cpu.seg[sreg::CS].limit) {
        return Err(Exception::gp0());
    }
    Ok(())
}

/// Operand size of a near branch (2, 4 or 8 bytes).
#[inline(always)]
fn branch_size(d: &Insn) -> usize {
    match d.i.op0_kind() {
        OpKind::NearBranch16 => 2,
        OpKind::NearBranch32 => 4,
        OpKind::NearBranch64 => 8,
        _ => d.size as usize,
    }
}

fn jmp_rel(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let t = d.i.near_branch_target();
    check_near_target(cpu, t)?;
    cpu.rip = t;
    Ok(())
}

fn jcc(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    if cpu.flags.cond(cc(d)) {
        let t = d.i.near_branch_target();
        check_near_target(cpu, t)?;
        cpu.rip = t;
    }
    Ok(())
}

fn jmp_near_indirect(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let t = cpu.op_read(p, d, 0, size)? & mask(size);
    check_near_target(cpu, t)?;
    cpu.rip = t;
    Ok(())
}

fn call_rel(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let t = d.i.near_branch_target();
    check_near_target(cpu, t)?;
    let size = branch_size(d);
    let ret = cpu.rip & mask(size);
    cpu.push(p, size, ret)?;
    cpu.rip = t;
    Ok(())
}

fn call_near_indirect(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let t = cpu.op_read(p, d, 0, size)? & mask(size);
    check_near_target(cpu, t)?;
    let ret = cpu.rip & mask(size);
    cpu.push(p, size, ret)?;
    cpu.rip = t;
    Ok(())
}

fn ret(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = cpu.stack_op_size(d).max(2);
    let size = match d.i.code() {
        Code::Retnw | Code::Retnw_imm16 => 2,
        Code::Retnd | Code::Retnd_imm16 => 4,
        Code::Retnq | Code::Retnq_imm16 => 8,
        _ => size,
    };
    let t = cpu.peek(p, size, 0)?;
    check_near_target(cpu, t)?;
    let extra = if d.i.op_count() > 0 {
        d.i.immediate(0) & 0xffff
    } else {
        0
    };
    let sp = cpu.gpr[gpr::RSP]
        .wrapping_add(size as u64)
        .wrapping_add(extra);
    cpu.set_sp(sp);
    cpu.rip = t;
    Ok(())
}

fn loop_(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    // The address size (from the code: _CX, _ECX, _RCX) selects the counter.
    let am = match d.i.code() {
        Code::Loopne_rel8_16_CX | Code::Loope_rel8_16_CX | Code::Loop_rel8_16_CX => 0xffff,
        Code::Loopne_rel8_32_CX | Code::Loope_rel8_32_CX | Code::Loop_rel8_32_CX => 0xffff,
        Code::Loopne_rel8_16_ECX | Code::Loope_rel8_16_ECX | Code::Loop_rel8_16_ECX => 0xffff_ffff,
        Code::Loopne_rel8_32_ECX | Code::Loope_rel8_32_ECX | Code::Loop_rel8_32_ECX => 0xffff_ffff,
        Code::Loopne_rel8_64_ECX | Code::Loope_rel8_64_ECX | Code::Loop_rel8_64_ECX => 0xffff_ffff,
        Code::Loopne_rel8_16_RCX | Code::Loope_rel8_16_RCX | Code::Loop_rel8_16_RCX => u64::MAX,
        _ => u64::MAX,
    };
    let count = cpu.gpr[gpr::RCX].wrapping_sub(1) & am;
    let take = count != 0
        && match d.i.mnemonic() {
            Mnemonic::Loope => cpu.flags.zf(),
            Mnemonic::Loopne => !cpu.flags.zf(),
            _ => true,
        };
    let t = d.i.near_branch_target();
    if take {
        check_near_target(cpu, t)?;
    }
    let c = &mut cpu.gpr[gpr::RCX];
    *c = if am == 0xffff {
        (*c & !0xffff) | count
    } else {
        count
    };
    if take {
        cpu.rip = t;
    }
    Ok(())
}

fn jcxz(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let am = match d.i.mnemonic() {
        Mnemonic::Jcxz => 0xffff,
        Mnemonic::Jecxz => 0xffff_ffff,
        _ => u64::MAX,
    };
    if cpu.gpr[gpr::RCX] & am == 0 {
        let t = d.i.near_branch_target();
        check_near_target(cpu, t)?;
        cpu.rip = t;
    }
    Ok(())
}

// ---- far transfers ----------------------------------------------------------

/// Far JMP to `sel:off`.
fn far_jump(cpu: &mut Cpu, p: &mut dyn Platform, sel: u16, off: u64) -> XResult<()> {
    if cpu.real_like() {
        if off > u64::from(cpu.seg[sreg::CS].limit) && !cpu.vm86() {
            return Err(Exception::gp0());
        }
        cpu.load_cs_real(sel);
        cpu.rip = off;
        return Ok(());
    }
    let (d, raw) = cpu.check_far_target(p, sel)?;
    check_far_offset(cpu, &d, off)?;
    let cpl = cpu.cpl;
    cpu.commit_cs(p, sel, d, raw, cpl)?;
    cpu.rip = off;
    Ok(())
}

fn check_far_offset(cpu: &Cpu, d: &crate::state::Segment, off: u64) -> XResult<()> {
    if cpu.long_mode() && d.l {
        if !crate::segment::canonical(off) {
            return Err(Exception::gp0());
        }
    } else if off > u64::from(d.limit) {
        return Err(Exception::gp0());
    }
    Ok(())
}

impl Cpu {
    /// The code-segment checks of a far JMP/CALL (gates are not supported).
    fn check_far_target(
        &mut self,
        p: &mut dyn Platform,
        sel: u16,
    ) -> XResult<(crate::state::Segment, u64)> {
        if sel & !3 != 0 {
            let raw = self.read_descriptor(p, sel)?;
            if raw & (1 << 44) == 0 {
                log::warn!("interpreter: far transfer through a gate or TSS (selector {sel:#x}) is not supported");
                return Err(Exception::gp(u32::from(sel & !3)));
            }
        }
        self.check_code_descriptor(p, sel, false)
    }
}

fn jmp_far_ptr(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    far_jump(
        cpu,
        p,
        d.i.far_branch_selector(),
        u64::from(d.i.far_branch32()),
    )
}

/// Read a far pointer m16:16/32/64 (offset first, then selector).
fn read_far_pointer(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<(u16, u64)> {
    let osize = d.i.memory_size().size() - 2;
    let off = cpu.ea(d);
    let v = cpu.read_mem(p, d.seg as usize, off, osize)?;
    let sel = cpu.read_mem(
        p,
        d.seg as usize,
        off.wrapping_add(osize as u64) & d.amask,
        2,
    )? as u16;
    Ok((sel, v))
}

fn jmp_far_mem(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let (sel, off) = read_far_pointer(cpu, p, d)?;
    far_jump(cpu, p, sel, off)
}

fn far_call(cpu: &mut Cpu, p: &mut dyn Platform, sel: u16, off: u64, size: usize) -> XResult<()> {
    let ret_cs = u64::from(cpu.seg[sreg::CS].selector);
    let ret_ip = cpu.rip & mask(size);
    if cpu.real_like() {
        if off > u64::from(cpu.seg[sreg::CS].limit) && !cpu.vm86() {
            return Err(Exception::gp0());
        }
        let sp = cpu.push_values(p, &[ret_cs, ret_ip], size)?;
        cpu.set_sp(sp);
        cpu.load_cs_real(sel);
        cpu.rip = off;
        return Ok(());
    }
    let (d, raw) = cpu.check_far_target(p, sel)?;
    check_far_offset(cpu, &d, off)?;
    let sp = cpu.push_values(p, &[ret_cs, ret_ip], size)?;
    let cpl = cpu.cpl;
    cpu.commit_cs(p, sel, d, raw, cpl)?;
    cpu.set_sp(sp);
    cpu.rip = off;
    Ok(())
}

fn call_far_ptr(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = if d.i.code() == Code::Call_ptr1616 {
        2
    } else {
        4
    };
    far_call(
        cpu,
        p,
        d.i.far_branch_selector(),
        u64::from(d.i.far_branch32()),
        size,
    )
}

fn call_far_mem(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let (sel, off) = read_far_pointer(cpu, p, d)?;
    let size = d.i.memory_size().size() - 2;
    far_call(cpu, p, sel, off, size)
}

fn retf(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = match d.i.code() {
        Code::Retfw | Code::Retfw_imm16 => 2,
        Code::Retfd | Code::Retfd_imm16 => 4,
        _ => 8,
    };
    let extra = if d.i.op_count() > 0 {
        d.i.immediate(0) & 0xffff
    } else {
        0
    };
    let ip = cpu.peek(p, size, 0)? & mask(size);
    let sel = cpu.peek(p, size, size as u64)? as u16;
    if cpu.real_like() {
        if ip > u64::from(cpu.seg[sreg::CS].limit) && !cpu.vm86() {
            return Err(Exception::gp0());
        }
        let sp = cpu.gpr[gpr::RSP].wrapping_add(2 * size as u64 + extra);
        cpu.set_sp(sp);
        cpu.load_cs_real(sel);
        cpu.rip = ip;
        return Ok(());
    }
    let (dsc, raw) = cpu.check_code_descriptor(p, sel, true)?;
    let rpl = (sel & 3) as u8;
    check_far_offset(cpu, &dsc, ip)?;
    if rpl > cpu.cpl {
        // Return to an outer privilege level: SS:SP follow.
        let off = 2 * size as u64 + extra;
        let nsp = cpu.peek(p, size, off)?;
        let nss = cpu.peek(p, size, off + size as u64)? as u16;
        let ss = cpu.check_stack_descriptor(p, nss, rpl, false)?;
        cpu.commit_cs(p, sel, dsc, raw, rpl)?;
        cpu.seg[sreg::SS] = ss;
        let nsp = nsp.wrapping_add(extra);
        if cpu.bits == 64 {
            cpu.gpr[gpr::RSP] = nsp;
        } else {
            cpu.set_sp(nsp);
        }
        for s in [sreg::ES, sreg::DS, sreg::FS, sreg::GS] {
            let seg = cpu.seg[s];
            let conforming_code = crate::segment::is_code(&seg) && seg.type_ & 4 != 0;
            if !seg.unusable && seg.dpl < rpl && !conforming_code {
                cpu.seg[s].selector = 0;
                cpu.seg[s].unusable = true;
            }
        }
    } else {
        let sp = cpu.gpr[gpr::RSP].wrapping_add(2 * size as u64 + extra);
        let cpl = cpu.cpl;
        cpu.commit_cs(p, sel, dsc, raw, cpl)?;
        cpu.set_sp(sp);
    }
    cpu.rip = ip;
    Ok(())
}

// ---- software interrupts ------------------------------------------------------

fn int_n(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    if cpu.vm86() && cpu.flags.iopl() < 3 {
        return Err(Exception::gp0());
    }
    let v = d.i.immediate(0) as u8;
    cpu.deliver(p, v, None, EventKind::Software)
}

fn int3(cpu: &mut Cpu, p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    cpu.deliver(p, exception::BP, None, EventKind::SoftException)
}

fn into(cpu: &mut Cpu, p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    if cpu.flags.of() {
        cpu.deliver(p, exception::OF, None, EventKind::SoftException)?;
    }
    Ok(())
}

fn int1(cpu: &mut Cpu, p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    cpu.deliver(p, exception::DB, None, EventKind::Icebp)
}

fn iret(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = match d.i.mnemonic() {
        Mnemonic::Iret => 2,
        Mnemonic::Iretd => 4,
        _ => 8,
    };
    cpu.iret(p, size)?;
    cpu.end_block = true;
    let _ = flags::IF;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::insn::testutil::*;
    use crate::state::gpr::*;

    #[test]
    fn call_ret_loop_64() {
        // mov ecx, 5 (b9 05 00 00 00)
        // l: add eax, 2 (83 c0 02) ; loop l (e2 fb)
        // call f (e8 01 00 00 00) ; hlt (f4) ; f: inc ebx (ff c3) ; ret (c3)
        let code = [
            0xb9, 0x05, 0, 0, 0, 0x83, 0xc0, 0x02, 0xe2, 0xfb, 0xe8, 0x01, 0, 0, 0, 0xf4, 0xff,
            0xc3, 0xc3,
        ];
        let c = run(Mode::Long64, &code, |_| {});
        assert_eq!(c.gpr(RAX), 10);
        assert_eq!(c.gpr(RCX), 0);
        assert_eq!(c.gpr(RBX), 1);
        assert_eq!(c.gpr(RSP), STACK_TOP);
    }

    #[test]
    fn jcc_and_indirect_jumps_32() {
        // cmp eax, 3 (83 f8 03) ; jne skip (75 05) ; mov ebx, 1 (bb 01 00 00 00)
        // skip: jmp [0x2000] (ff 25 00 20 00 00)   -> target at 0x2000
        let code = [
            0x83, 0xf8, 0x03, 0x75, 0x05, 0xbb, 0x01, 0, 0, 0, 0xff, 0x25, 0x00, 0x20, 0, 0,
        ];
        let c = run(Mode::Prot32, &code, |c| {
            c.set_gpr(RAX, 3);
            // Target: mov ecx, 7 ; hlt at 0x3000.
            write_phys(c, 0x2000, &0x3000u32.to_le_bytes());
            write_phys(c, 0x3000, &[0xb9, 0x07, 0, 0, 0, 0xf4]);
        });
        assert_eq!(c.gpr(RBX), 1);
        assert_eq!(c.gpr(RCX), 7);
    }

    #[test]
    fn real_mode_int_and_iret() {
        // int 0x21 (cd 21) ; hlt. Handler at 0000:2000: mov bx, 0x99 ; iret
        let code = [0xcd, 0x21];
        let c = run(Mode::Real16, &code, |c| {
            write_phys(c, 0x21 * 4, &[0x00, 0x20, 0x00, 0x00]);
            write_phys(c, 0x2000, &[0xbb, 0x99, 0x00, 0xcf]);
        });
        assert_eq!(c.gpr(RBX), 0x99);
        assert_eq!(c.rip(), CODE + 3); // past the HLT
        assert_eq!(c.gpr(RSP), STACK_TOP);
    }

    #[test]
    fn far_jump_protected() {
        // jmp far 0x08:0x1010 (ea 10 10 00 00 08 00); at 0x1010: mov eax, 1; hlt
        let mut code = vec![0xea, 0x10, 0x10, 0x00, 0x00, 0x08, 0x00];
        code.resize(0x10, 0x90);
        code.extend_from_slice(&[0xb8, 0x01, 0, 0, 0]);
        let c = run(Mode::Prot32, &code, |_| {});
        assert_eq!(c.gpr(RAX), 1);
    }
}
