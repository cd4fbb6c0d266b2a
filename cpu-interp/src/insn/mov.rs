//! Data movement: MOV (GPR, segment register, moffs), MOVZX/MOVSX/MOVSXD,
//! LEA, XCHG, XADD, CMPXCHG, CMPXCHG8B/16B, BSWAP, CMOVcc, SETcc, CBW..CQO,
//! LAHF/SAHF, XLAT, NOPs and hints.

use iced_x86::{Code, Mnemonic, OpKind, Register};

use super::{mask, sext};
use crate::block::Insn;
use crate::cpu::{sreg, Cpu};
use crate::dispatch::Table;
use crate::exception::{Exception, XResult};
use crate::flags::{self, FlagOp};
use crate::platform::Platform;
use crate::state::gpr;

pub fn register(t: &mut Table) {
    t.set_mnemonic(Mnemonic::Mov, mov);
    for c in [
        Code::Mov_Sreg_rm16,
        Code::Mov_Sreg_r32m16,
        Code::Mov_Sreg_r64m16,
    ] {
        t.set(c, mov_to_sreg);
    }
    t.set_mnemonic(Mnemonic::Movzx, movzx);
    t.set_mnemonic(Mnemonic::Movsx, movsx);
    t.set_mnemonic(Mnemonic::Movsxd, movsx);
    t.set_mnemonic(Mnemonic::Lea, lea);
    t.set_mnemonic(Mnemonic::Xchg, xchg);
    t.set_mnemonic(Mnemonic::Xadd, xadd);
    t.set_mnemonic(Mnemonic::Cmpxchg, cmpxchg);
    t.set_mnemonic(Mnemonic::Cmpxchg8b, cmpxchg8b);
    t.set_mnemonic(Mnemonic::Cmpxchg16b, cmpxchg16b);
    t.set_mnemonic(Mnemonic::Bswap, bswap);
    t.set_mnemonic(Mnemonic::Movbe, movbe);
    for m in [
        Mnemonic::Cmovo,
        Mnemonic::Cmovno,
        Mnemonic::Cmovb,
        Mnemonic::Cmovae,
        Mnemonic::Cmove,
        Mnemonic::Cmovne,
        Mnemonic::Cmovbe,
        Mnemonic::Cmova,
        Mnemonic::Cmovs,
        Mnemonic::Cmovns,
        Mnemonic::Cmovp,
        Mnemonic::Cmovnp,
        Mnemonic::Cmovl,
        Mnemonic::Cmovge,
        Mnemonic::Cmovle,
        Mnemonic::Cmovg,
    ] {
        t.set_mnemonic(m, cmov);
    }
    for m in [
        Mnemonic::Seto,
        Mnemonic::Setno,
        Mnemonic::Setb,
        Mnemonic::Setae,
        Mnemonic::Sete,
        Mnemonic::Setne,
        Mnemonic::Setbe,
        Mnemonic::Seta,
        Mnemonic::Sets,
        Mnemonic::Setns,
        Mnemonic::Setp,
        Mnemonic::Setnp,
        Mnemonic::Setl,
        Mnemonic::Setge,
        Mnemonic::Setle,
        Mnemonic::Setg,
    ] {
        t.set_mnemonic(m, setcc);
    }
    t.set_mnemonic(Mnemonic::Cbw, cbw);
    t.set_mnemonic(Mnemonic::Cwde, cbw);
    t.set_mnemonic(Mnemonic::Cdqe, cbw);
    t.set_mnemonic(Mnemonic::Cwd, cwd);
    t.set_mnemonic(Mnemonic::Cdq, cwd);
    t.set_mnemonic(Mnemonic::Cqo, cwd);
    t.set_mnemonic(Mnemonic::Lahf, lahf);
    t.set_mnemonic(Mnemonic::Sahf, sahf);
    t.set_mnemonic(Mnemonic::Xlatb, xlat);
    for m in [
        Mnemonic::Nop,
        Mnemonic::Pause,
        Mnemonic::Prefetchnta,
        Mnemonic::Prefetcht0,
        Mnemonic::Prefetcht1,
        Mnemonic::Prefetcht2,
        Mnemonic::Prefetchw,
        Mnemonic::Lfence,
        Mnemonic::Sfence,
        Mnemonic::Mfence,
        // CET is not advertised: these live in the hint-NOP space and are
        // NOPs on processors without it (SDM vol. 1, 17.2).
        Mnemonic::Endbr64,
        Mnemonic::Endbr32,
        Mnemonic::Rdsspd,
        Mnemonic::Rdsspq,
    ] {
        t.set_mnemonic(m, nop);
    }
    // 0F 18..0F 1F reserved-NOP space decodes as Reservednop_*.
    for c in iced_x86::Code::values() {
        if format!("{c:?}").starts_with("Reservednop_") {
            t.set(c, nop);
        }
    }
}

/// Fast forms of MOV and LEA with 4- or 8-byte register destinations.
pub(crate) fn specialize(d: &Insn) -> Option<crate::dispatch::Handler> {
    if !matches!(d.size, 4 | 8) {
        return None;
    }
    match d.i.mnemonic() {
        Mnemonic::Mov if d.r0 != 0xff && d.r1 != 0xff => Some(if d.size == 4 {
            mov_rr::<4>
        } else {
            mov_rr::<8>
        }),
        Mnemonic::Mov if d.r0 != 0xff && d.i.op1_kind() == OpKind::Memory => Some(if d.size == 4 {
            mov_rm::<4>
        } else {
            mov_rm::<8>
        }),
        Mnemonic::Mov if d.r1 != 0xff && d.i.op0_kind() == OpKind::Memory => Some(if d.size == 4 {
            mov_mr::<4>
        } else {
            mov_mr::<8>
        }),
        Mnemonic::Mov
            if d.r0 != 0xff && d.i.op_count() == 2 && d.i.op1_kind() != OpKind::Register =>
        {
            Some(mov_ri)
        }
        Mnemonic::Lea if d.r0 != 0xff => Some(lea),
        _ => None,
    }
}

fn mov_rr<const SIZE: usize>(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.gpr[d.r0 as usize] = cpu.gpr[d.r1 as usize] & mask(SIZE);
    Ok(())
}

fn mov_ri(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.gpr[d.r0 as usize] = d.imm;
    Ok(())
}

fn mov_rm<const SIZE: usize>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let off = cpu.ea(d);
    let v = cpu.read_mem(p, d.seg as usize, off, SIZE)?;
    cpu.gpr[d.r0 as usize] = v;
    Ok(())
}

fn mov_mr<const SIZE: usize>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let off = cpu.ea(d);
    let v = cpu.gpr[d.r1 as usize];
    cpu.write_mem(p, d.seg as usize, off, SIZE, v)
}

/// Size in bytes of operand `n` (register or memory); 0 for immediates.
#[inline]
pub(crate) fn op_size(d: &Insn, n: u32) -> usize {
    match d.i.op_kind(n) {
        OpKind::Register => d.i.op_register(n).size(),
        OpKind::Memory => d.i.memory_size().size(),
        _ => 0,
    }
}

pub(crate) fn nop(_cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    Ok(())
}

fn mov(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let v = cpu.op_read(p, d, 1, size)?;
    if d.i.op0_kind() == OpKind::Register {
        let r = d.i.op0_register();
        if r.is_segment_register() {
            return mov_to_sreg(cpu, p, d);
        }
        // `mov r32, sreg` zero-extends the selector.
        cpu.set_reg(r, v);
        return Ok(());
    }
    // `mov m16, sreg` stores 16 bits whatever the operand size.
    let size = if d.i.op1_kind() == OpKind::Register && d.i.op1_register().is_segment_register() {
        2
    } else {
        size
    };
    let off = cpu.ea(d);
    cpu.write_mem(p, d.seg as usize, off, size, v)
}

fn mov_to_sreg(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let r = d.i.op0_register();
    let seg = r as usize - Register::ES as usize;
    if seg == sreg::CS {
        return Err(Exception::ud());
    }
    let sel = cpu.op_read(p, d, 1, 2)? as u16;
    cpu.load_sreg(p, seg, sel)?;
    if seg == sreg::SS {
        cpu.events.mov_ss_shadow = true;
        cpu.end_block = true;
    }
    Ok(())
}

fn movzx(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let ss = op_size(d, 1);
    let v = cpu.op_read(p, d, 1, ss)? & mask(ss);
    cpu.set_reg(d.i.op0_register(), v);
    Ok(())
}

fn movsx(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let ss = op_size(d, 1);
    let v = if ss == 2
        && d.i.code() == Code::Movsxd_r16_rm16
        && d.i.op1_kind() == OpKind::Memory
        && cpu.quirks.movsxd16_reads_dword
    {
        // AMD reads the whole doubleword (see `Quirks`).
        let off = cpu.ea(d);
        cpu.read_mem(p, d.seg as usize, off, 4)? & 0xffff
    } else {
        cpu.op_read(p, d, 1, ss)?
    };
    let v = sext(v, ss);
    cpu.set_reg(d.i.op0_register(), v & mask(d.size as usize));
    Ok(())
}

fn lea(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let a = cpu.ea(d);
    cpu.set_reg(d.i.op0_register(), a & mask(d.size as usize));
    Ok(())
}

fn xchg(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let a = cpu.op0_read_rmw(p, d, size)?;
    let b = cpu.op_read(p, d, 1, size)?;
    // Memory (if any) is operand 0 or 1; write it first so a fault changes nothing.
    if d.i.op1_kind() == OpKind::Memory {
        let off = cpu.ea(d);
        cpu.write_mem(p, d.seg as usize, off, size, a)?;
        cpu.set_reg(d.i.op0_register(), b);
    } else {
        cpu.op0_write(p, d, size, b)?;
        cpu.set_reg(d.i.op1_register(), a);
    }
    Ok(())
}

fn xadd(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let a = cpu.op0_read_rmw(p, d, size)?;
    let b = cpu.op_read(p, d, 1, size)?;
    let r = a.wrapping_add(b) & mask(size);
    cpu.op0_write(p, d, size, r)?;
    cpu.set_reg(d.i.op1_register(), a);
    // If both operands are the same register, the sum wins.
    if d.i.op0_kind() == OpKind::Register && d.i.op0_register() == d.i.op1_register() {
        cpu.set_reg(d.i.op0_register(), r);
    }
    cpu.flags.set_lazy(FlagOp::Add, size as u32 * 8, a, b, r);
    Ok(())
}

fn cmpxchg(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let dst = cpu.op0_read_rmw(p, d, size)?;
    let src = cpu.op_read(p, d, 1, size)?;
    let acc = cpu.gpr[gpr::RAX] & mask(size);
    let equal = acc == dst;
    if equal {
        cpu.op0_write(p, d, size, src)?;
    } else {
        if d.i.op0_kind() == OpKind::Memory {
            // The destination is written back even when unchanged.
            cpu.op0_write(p, d, size, dst)?;
        }
        cpu.set_gpr_sized(gpr::RAX, size as u32, dst);
    }
    cpu.flags.set_lazy(
        FlagOp::Sub,
        size as u32 * 8,
        acc,
        dst,
        acc.wrapping_sub(dst),
    );
    Ok(())
}

fn cmpxchg8b(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let off = cpu.ea(d);
    let seg = d.seg as usize;
    let cur = cpu.read_mem_rmw(p, seg, off, 8)?;
    let expect = (cpu.gpr[gpr::RDX] & 0xffff_ffff) << 32 | (cpu.gpr[gpr::RAX] & 0xffff_ffff);
    if cur == expect {
        let new = (cpu.gpr[gpr::RCX] & 0xffff_ffff) << 32 | (cpu.gpr[gpr::RBX] & 0xffff_ffff);
        cpu.write_mem(p, seg, off, 8, new)?;
        cpu.flags.update_arith(flags::ZF, flags::ZF);
    } else {
        cpu.write_mem(p, seg, off, 8, cur)?;
        cpu.gpr[gpr::RAX] = cur & 0xffff_ffff;
        cpu.gpr[gpr::RDX] = cur >> 32;
        cpu.flags.update_arith(flags::ZF, 0);
    }
    Ok(())
}

fn cmpxchg16b(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let off = cpu.ea(d);
    let seg = d.seg as usize;
    // Which comes first, the canonical check of the first byte (#SS for a
    // stack access, else #GP) or the alignment check (#GP), depends on the
    // segment the instruction names (hardware oracle, Emerald Rapids): a
    // stack access named as such — rBP/rSP-based without an override, or
    // an SS override — is checked for canonicality first; with any other
    // segment (the default DS, or an ES/CS/DS override, which 64-bit mode
    // otherwise ignores: an aligned rBP-based operand is still #SS) the
    // alignment is checked first. A misaligned operand that starts
    // canonical and runs into the hole is #GP for its alignment.
    let named_stack = seg == sreg::SS
        && !matches!(
            d.i.segment_prefix(),
            Register::ES | Register::CS | Register::DS
        );
    if !named_stack && off & 15 != 0 {
        return Err(Exception::gp0());
    }
    cpu.linear(seg, off, 1, true)?;
    if off & 15 != 0 {
        return Err(Exception::gp0());
    }
    cpu.probe_write(p, seg, off, 16)?;
    let lo = cpu.read_mem(p, seg, off, 8)?;
    let hi = cpu.read_mem(p, seg, off.wrapping_add(8) & d.amask, 8)?;
    if lo == cpu.gpr[gpr::RAX] && hi == cpu.gpr[gpr::RDX] {
        let (nl, nh) = (cpu.gpr[gpr::RBX], cpu.gpr[gpr::RCX]);
        cpu.write_mem(p, seg, off, 8, nl)?;
        cpu.write_mem(p, seg, off.wrapping_add(8) & d.amask, 8, nh)?;
        cpu.flags.update_arith(flags::ZF, flags::ZF);
    } else {
        cpu.write_mem(p, seg, off, 8, lo)?;
        cpu.write_mem(p, seg, off.wrapping_add(8) & d.amask, 8, hi)?;
        cpu.gpr[gpr::RAX] = lo;
        cpu.gpr[gpr::RDX] = hi;
        cpu.flags.update_arith(flags::ZF, 0);
    }
    Ok(())
}

fn bswap(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let r = d.i.op0_register();
    let v = cpu.reg(r);
    let nv = match r.size() {
        8 => v.swap_bytes(),
        4 => u64::from((v as u32).swap_bytes()),
        // BSWAP of a 16-bit register is undefined; hardware clears it.
        _ => 0,
    };
    cpu.set_reg(r, nv);
    Ok(())
}

/// MOVBE: a load or store with the bytes reversed (x86-64-v3; CPU models
/// without it #UD at decode).
fn movbe(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let v = cpu.op_read(p, d, 1, size)?;
    let swapped = match size {
        2 => u64::from((v as u16).swap_bytes()),
        4 => u64::from((v as u32).swap_bytes()),
        _ => v.swap_bytes(),
    };
    cpu.op0_write(p, d, size, swapped)
}

/// The x86 condition nibble of a Jcc/SETcc/CMOVcc.
#[inline(always)]
pub(crate) fn cc(d: &Insn) -> u8 {
    (d.i.condition_code() as u8).wrapping_sub(1)
}

fn cmov(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let v = cpu.op_read(p, d, 1, size)?;
    let r = d.i.op0_register();
    if cpu.flags.cond(cc(d)) {
        cpu.set_reg(r, v);
    } else if size == 4 {
        // A 32-bit destination is zero-extended even when not moved.
        let cur = cpu.reg(r);
        cpu.set_reg(r, cur);
    }
    Ok(())
}

fn setcc(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let v = cpu.flags.cond(cc(d)) as u64;
    cpu.op0_write(p, d, 1, v)
}

fn cbw(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let a = cpu.gpr[gpr::RAX];
    match d.i.mnemonic() {
        Mnemonic::Cbw => cpu.set_gpr_sized(gpr::RAX, 2, sext(a, 1)),
        Mnemonic::Cwde => cpu.set_gpr_sized(gpr::RAX, 4, sext(a, 2)),
        _ => cpu.gpr[gpr::RAX] = sext(a, 4),
    }
    Ok(())
}

fn cwd(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let a = cpu.gpr[gpr::RAX];
    let size = match d.i.mnemonic() {
        Mnemonic::Cwd => 2,
        Mnemonic::Cdq => 4,
        _ => 8,
    };
    let neg = sext(a, size) >> 63 != 0;
    cpu.set_gpr_sized(gpr::RDX, size as u32, if neg { u64::MAX } else { 0 });
    Ok(())
}

fn lahf(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    let f = cpu.flags.get() & 0xff;
    cpu.set_reg(Register::AH, f);
    Ok(())
}

fn sahf(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    let ah = cpu.reg(Register::AH);
    let which = flags::CF | flags::PF | flags::AF | flags::ZF | flags::SF;
    cpu.flags.update_arith(which, ah);
    Ok(())
}

fn xlat(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let base = cpu.gpr[gpr::RBX].wrapping_add(cpu.gpr[gpr::RAX] & 0xff) & d.amask;
    let v = cpu.read_mem(p, d.seg as usize, base, 1)?;
    cpu.set_reg(Register::AL, v);
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::flags::*;
    use crate::insn::testutil::*;
    use crate::state::gpr::*;

    #[test]
    fn cmpxchg16b_checks_the_address_before_alignment() {
        // ss: cmpxchg16b [rcx+0x1e] (36 48 0f c7 49 1e) with a non-canonical,
        // misaligned address: #SS(0) (canonical check first), as on hardware.
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        write_phys(&c, CODE, &[0x36, 0x48, 0x0f, 0xc7, 0x49, 0x1e]);
        c.set_gpr(RCX, 0x7fff_ffff_ffff_ffff);
        let mut p = TestPlatform::default();
        let insn = c.decode_one(&mut p).expect("decodable");
        let e = (insn.h)(&mut c, &mut p, &insn).expect_err("#SS");
        assert_eq!(e.vector, crate::exception::SS);
    }

    /// Hardware oracle (Emerald Rapids; `--seed 3019963277 --max-len 12
    /// --mode 64 --ring 3 --case 35996`): a misaligned, non-canonical
    /// `es cmpxchg16b [rbp+d]` is #GP (alignment first), the same without
    /// the override or with SS #SS (canonical first); aligned, all three
    /// are #SS (the ES override does not make the stack access a data one).
    #[test]
    fn cmpxchg16b_with_an_es_override_checks_alignment_first() {
        for (code, misaligned, vector) in [
            (
                &[0x26, 0x48, 0x0f, 0xc7, 0x4d, 0x10][..],
                true,
                crate::exception::GP,
            ),
            (
                &[0x48, 0x0f, 0xc7, 0x4d, 0x10][..],
                true,
                crate::exception::SS,
            ),
            (
                &[0x36, 0x48, 0x0f, 0xc7, 0x4d, 0x10][..],
                true,
                crate::exception::SS,
            ),
            (
                &[0x26, 0x48, 0x0f, 0xc7, 0x4d, 0x10][..],
                false,
                crate::exception::SS,
            ),
            (
                &[0x26, 0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x10][..],
                true,
                crate::exception::GP,
            ),
        ] {
            let mut c = new_cpu();
            setup(&mut c, Mode::Long64);
            write_phys(&c, CODE, code);
            c.set_gpr(RBP, 0x8000_0000_0000_1000 + u64::from(misaligned));
            let mut p = TestPlatform::default();
            let insn = c.decode_one(&mut p).expect("decodable");
            let e = (insn.h)(&mut c, &mut p, &insn).expect_err("faults");
            assert_eq!(e.vector, vector, "{code:02x?} misaligned {misaligned}");
        }
    }

    #[test]
    fn movsxd_r16_from_memory_reads_a_word_on_intel_a_dword_on_amd() {
        // movsxd cx, [0x1ffffe] (66 63 0c 25 fe ff 1f 00) with the 2 MiB
        // page at 0x200000 not present: Intel reads 2 bytes and loads CX,
        // AMD reads 4 and page-faults at 0x200000.
        let code = [0x66, 0x63, 0x0c, 0x25, 0xfe, 0xff, 0x1f, 0x00];
        for amd in [false, true] {
            let mut c = new_cpu();
            setup(&mut c, Mode::Long64);
            if amd {
                c.set_quirks(crate::quirks::Quirks::AMD);
            }
            write_phys(&c, CODE, &code);
            write_phys(&c, PML4 + 0x2000 + 8, &0u64.to_le_bytes());
            write_phys(&c, 0x1f_fffe, &[0x34, 0x92]);
            c.set_gpr(RCX, 0x1111_2222_3333_4444);
            let mut p = TestPlatform::default();
            let insn = c.decode_one(&mut p).expect("decodable");
            let r = (insn.h)(&mut c, &mut p, &insn);
            if amd {
                let e = r.expect_err("#PF");
                assert_eq!(e.vector, crate::exception::PF);
                assert_eq!(c.cr2, 0x20_0000);
                assert_eq!(c.gpr(RCX), 0x1111_2222_3333_4444);
            } else {
                r.expect("loads");
                assert_eq!(c.gpr(RCX), 0x1111_2222_3333_9234);
            }
        }
    }

    #[test]
    fn mov_forms_64() {
        // mov eax, 0xffffffff (b8 ff ff ff ff): zero-extends
        // movsx rbx, byte [0x2000] (48 0f be 1c 25 00 20 00 00)
        // movzx ecx, word [0x2000] (0f b7 0c 25 00 20 00 00)
        // lea rdx, [rbx+rcx*2+8] (48 8d 54 4b 08)
        // movsxd rsi, eax (48 63 f0)
        let code = [
            0xb8, 0xff, 0xff, 0xff, 0xff, 0x48, 0x0f, 0xbe, 0x1c, 0x25, 0x00, 0x20, 0x00, 0x00,
            0x0f, 0xb7, 0x0c, 0x25, 0x00, 0x20, 0x00, 0x00, 0x48, 0x8d, 0x54, 0x4b, 0x08, 0x48,
            0x63, 0xf0,
        ];
        let c = run(Mode::Long64, &code, |c| {
            c.set_gpr(RAX, u64::MAX);
            write_phys(c, 0x2000, &[0x80, 0x12]);
        });
        assert_eq!(c.gpr(RAX), 0xffff_ffff);
        assert_eq!(c.gpr(RBX), (-128i64) as u64);
        assert_eq!(c.gpr(RCX), 0x1280);
        assert_eq!(c.gpr(RDX), ((-128i64) as u64).wrapping_add(0x2500 + 8));
        assert_eq!(c.gpr(RSI), u64::MAX);
    }

    #[test]
    fn rip_relative_and_moffs() {
        // mov rax, [rip+0x10] (48 8b 05 10 00 00 00) -> reads 0x1000+7+0x10
        // mov [0x2100], eax via moffs (a3 00 21 00 00 00 00 00 00)
        let code = [
            0x48, 0x8b, 0x05, 0x10, 0, 0, 0, 0xa3, 0x00, 0x21, 0, 0, 0, 0, 0, 0,
        ];
        let c = run(Mode::Long64, &code, |c| {
            write_phys(c, 0x1017, &0x1122_3344_5566_7788u64.to_le_bytes());
        });
        assert_eq!(c.gpr(RAX), 0x1122_3344_5566_7788);
        assert_eq!(read_phys(&c, 0x2100, 4), 0x5566_7788);
    }

    #[test]
    fn xchg_xadd_cmpxchg_32() {
        // xchg [0x2000], ecx (87 0d 00 20 00 00) ; xadd eax, ebx (0f c1 d8)
        // cmpxchg [0x2004], edx (0f b1 15 04 20 00 00) with eax != mem
        let code = [
            0x87, 0x0d, 0x00, 0x20, 0, 0, 0x0f, 0xc1, 0xd8, 0x0f, 0xb1, 0x15, 0x04, 0x20, 0, 0,
        ];
        let c = run(Mode::Prot32, &code, |c| {
            c.set_gpr(RCX, 7);
            c.set_gpr(RAX, 10);
            c.set_gpr(RBX, 5);
            c.set_gpr(RDX, 99);
            write_phys(c, 0x2000, &[3, 0, 0, 0, 42, 0, 0, 0]);
        });
        assert_eq!(read_phys(&c, 0x2000, 4), 7);
        assert_eq!(c.gpr(RCX), 3);
        assert_eq!(c.gpr(RBX), 10);
        // eax = 15 != 42: eax gets 42, ZF clear, memory unchanged.
        assert_eq!(c.gpr(RAX), 42);
        assert_eq!(read_phys(&c, 0x2004, 4), 42);
        assert_eq!(c.rflags() & ZF, 0);
    }

    #[test]
    fn cmov_setcc_cbw_cwd_16() {
        // cmp ax, bx (39 d8) ; setl cl (0f 9c c1) ; cmovl dx, bx (0f 4c d3) ; cwd (99) ; cbw (98)
        let code = [0x39, 0xd8, 0x0f, 0x9c, 0xc1, 0x0f, 0x4c, 0xd3, 0x99, 0x98];
        let c = run(Mode::Real16, &code, |c| {
            c.set_gpr(RAX, 0x0080); // 128
            c.set_gpr(RBX, 0x0100); // 256
            c.set_gpr(RDX, 0x1234_0000);
        });
        assert_eq!(c.gpr(RCX) & 0xff, 1);
        // cwd of ax=0x0080 gives dx=0 (overwriting the cmov result), then cbw sign-extends 0x80.
        assert_eq!(c.gpr(RDX), 0x1234_0000);
        assert_eq!(c.gpr(RAX), 0xff80);
    }

    #[test]
    fn cet_hint_nops_are_nops() {
        // endbr64 (f3 0f 1e fa) ; endbr32 (f3 0f 1e fb) ; rdsspq rax (f3 48 0f 1e c8) ; inc eax (ff c0)
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa, 0xf3, 0x0f, 0x1e, 0xfb, 0xf3, 0x48, 0x0f, 0x1e, 0xc8, 0xff,
            0xc0,
        ];
        let c = run(Mode::Long64, &code, |c| c.set_gpr(RAX, 41));
        // RDSSP leaves its destination unchanged when CET is off.
        assert_eq!(c.gpr(RAX), 42);
    }

    #[test]
    fn cmpxchg8b_and_bswap() {
        // cmpxchg8b [0x2000] (0f c7 0d 00 20 00 00) ; bswap esi (0f ce)
        let code = [0x0f, 0xc7, 0x0d, 0x00, 0x20, 0, 0, 0x0f, 0xce];
        let c = run(Mode::Prot32, &code, |c| {
            write_phys(c, 0x2000, &0x0000_0002_0000_0001u64.to_le_bytes());
            c.set_gpr(RAX, 1);
            c.set_gpr(RDX, 2);
            c.set_gpr(RBX, 0xaaaa);
            c.set_gpr(RCX, 0xbbbb);
            c.set_gpr(RSI, 0x1122_3344);
        });
        assert_eq!(read_phys(&c, 0x2000, 8), 0x0000_bbbb_0000_aaaa);
        assert_eq!(c.rflags() & ZF, ZF);
        assert_eq!(c.gpr(RSI), 0x4433_2211);
    }
}
