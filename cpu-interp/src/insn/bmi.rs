//! BMI1 (ANDN, BEXTR, BLSI, BLSMSK, BLSR, TZCNT), BMI2 (BZHI, MULX, PDEP,
//! PEXT, RORX, SARX, SHLX, SHRX) and LZCNT. The VEX-encoded ones #UD in
//! real and virtual-8086 mode (no XSAVE state is involved). Without their
//! extension, LZCNT and TZCNT execute as BSR and BSF (the F3 prefix is
//! ignored), as on processors that lack them.

use iced_x86::Mnemonic;

use super::{bits, mask};
use crate::block::Insn;
use crate::cpu::Cpu;
use crate::cpuid::feat;
use crate::dispatch::Table;
use crate::exception::{Exception, XResult};
use crate::flags::{CF, SF, ZF};
use crate::platform::Platform;
use crate::state::gpr;

pub fn register(t: &mut Table) {
    t.set_mnemonic(Mnemonic::Lzcnt, lzcnt);
    t.set_mnemonic(Mnemonic::Tzcnt, tzcnt);
    t.set_vex(Mnemonic::Andn, andn);
    t.set_vex(Mnemonic::Bextr, bextr);
    t.set_vex(Mnemonic::Blsi, blsx);
    t.set_vex(Mnemonic::Blsmsk, blsx);
    t.set_vex(Mnemonic::Blsr, blsx);
    t.set_vex(Mnemonic::Bzhi, bzhi);
    t.set_vex(Mnemonic::Mulx, mulx);
    t.set_vex(Mnemonic::Pdep, pdep_pext);
    t.set_vex(Mnemonic::Pext, pdep_pext);
    t.set_vex(Mnemonic::Rorx, rorx);
    t.set_vex(Mnemonic::Sarx, shiftx);
    t.set_vex(Mnemonic::Shlx, shiftx);
    t.set_vex(Mnemonic::Shrx, shiftx);
}

/// The flags of a result `r` of `size` bytes: SF and ZF from it.
fn sz(r: u64, size: usize) -> u64 {
    let mut f = 0;
    if r & mask(size) == 0 {
        f |= ZF;
    }
    if (r >> (8 * size - 1)) & 1 != 0 {
        f |= SF;
    }
    f
}

#[inline]
fn check_vex_gpr(cpu: &Cpu) -> XResult<()> {
    if cpu.real_like() {
        return Err(Exception::ud());
    }
    Ok(())
}

fn lzcnt(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    if !cpu.has(feat::LZCNT) {
        return bits::bsr(cpu, p, d);
    }
    let size = d.size as usize;
    let v = cpu.op_read(p, d, 1, size)? & mask(size);
    let n = if v == 0 {
        8 * size as u64
    } else {
        u64::from(v.leading_zeros()) - (64 - 8 * size as u64)
    };
    cpu.set_reg(d.i.op0_register(), n);
    cpu.flags
        .set_arith(if v == 0 { CF } else { 0 } | if n == 0 { ZF } else { 0 });
    Ok(())
}

fn tzcnt(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    if !cpu.has(feat::BMI1) {
        return bits::bsf(cpu, p, d);
    }
    let size = d.size as usize;
    let v = cpu.op_read(p, d, 1, size)? & mask(size);
    let n = if v == 0 {
        8 * size as u64
    } else {
        u64::from(v.trailing_zeros())
    };
    cpu.set_reg(d.i.op0_register(), n);
    cpu.flags
        .set_arith(if v == 0 { CF } else { 0 } | if n == 0 { ZF } else { 0 });
    Ok(())
}

/// ANDN r, r(vvvv), r/m: NOT src1 AND src2.
fn andn(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    check_vex_gpr(cpu)?;
    let size = d.size as usize;
    let a = cpu.reg(d.i.op1_register());
    let b = cpu.op_read(p, d, 2, size)?;
    let r = !a & b & mask(size);
    cpu.set_reg(d.i.op0_register(), r);
    cpu.flags.set_arith(sz(r, size));
    Ok(())
}

/// BEXTR r, r/m, r(vvvv): the field of src1 starting at src2[7:0], of
/// length src2[15:8].
fn bextr(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    check_vex_gpr(cpu)?;
    let size = d.size as usize;
    let src = cpu.op_read(p, d, 1, size)? & mask(size);
    let ctl = cpu.reg(d.i.op2_register());
    let start = (ctl & 0xff) as u32;
    let len = ((ctl >> 8) & 0xff) as u32;
    let bits = 8 * size as u32;
    let shifted = if start >= bits { 0 } else { src >> start };
    let r = if len >= 64 {
        shifted
    } else {
        shifted & ((1u64 << len) - 1)
    };
    cpu.set_reg(d.i.op0_register(), r);
    cpu.flags.set_arith(if r == 0 { ZF } else { 0 });
    Ok(())
}

/// BLSI / BLSMSK / BLSR r(vvvv), r/m.
fn blsx(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    check_vex_gpr(cpu)?;
    let size = d.size as usize;
    let m = mask(size);
    let s = cpu.op_read(p, d, 1, size)? & m;
    let (r, cf) = match d.i.mnemonic() {
        Mnemonic::Blsi => (s.wrapping_neg() & s & m, s != 0),
        Mnemonic::Blsmsk => ((s.wrapping_sub(1) ^ s) & m, s == 0),
        _ => (s.wrapping_sub(1) & s & m, s == 0),
    };
    cpu.set_reg(d.i.op0_register(), r);
    let mut f = sz(r, size) | if cf { CF } else { 0 };
    if d.i.mnemonic() == Mnemonic::Blsmsk {
        f &= !ZF;
    }
    cpu.flags.set_arith(f);
    Ok(())
}

/// BZHI r, r/m, r(vvvv): src1 with the bits from src2[7:0] up cleared;
/// CF when the index is beyond the operand.
fn bzhi(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    check_vex_gpr(cpu)?;
    let size = d.size as usize;
    let src = cpu.op_read(p, d, 1, size)? & mask(size);
    let n = (cpu.reg(d.i.op2_register()) & 0xff) as u32;
    let bits = 8 * size as u32;
    let (r, cf) = if n < bits {
        (src & ((1u64 << n) - 1), false)
    } else {
        (src, true)
    };
    cpu.set_reg(d.i.op0_register(), r);
    cpu.flags.set_arith(sz(r, size) | if cf { CF } else { 0 });
    Ok(())
}

/// MULX r1, r2(vvvv), r/m: EDX/RDX × src unsigned, high half to r1, low
/// to r2 (r1 wins when they are the same register); no flags.
fn mulx(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    check_vex_gpr(cpu)?;
    let size = d.size as usize;
    let b = cpu.op_read(p, d, 2, size)? & mask(size);
    let a = cpu.gpr[gpr::RDX] & mask(size);
    let (hi, lo) = if size == 8 {
        let r = u128::from(a) * u128::from(b);
        ((r >> 64) as u64, r as u64)
    } else {
        let r = a * b;
        (r >> 32, r & 0xffff_ffff)
    };
    cpu.set_reg(d.i.op1_register(), lo);
    cpu.set_reg(d.i.op0_register(), hi);
    Ok(())
}

/// PDEP / PEXT r, r(vvvv), r/m (the mask).
fn pdep_pext(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    check_vex_gpr(cpu)?;
    let size = d.size as usize;
    let src = cpu.reg(d.i.op1_register()) & mask(size);
    let msk = cpu.op_read(p, d, 2, size)? & mask(size);
    let r = if d.i.mnemonic() == Mnemonic::Pdep {
        pdep(src, msk)
    } else {
        pext(src, msk)
    };
    cpu.set_reg(d.i.op0_register(), r);
    Ok(())
}

pub fn pdep(src: u64, mut m: u64) -> u64 {
    let mut r = 0;
    let mut k = 0;
    while m != 0 {
        let bit = m & m.wrapping_neg();
        if (src >> k) & 1 != 0 {
            r |= bit;
        }
        k += 1;
        m &= m - 1;
    }
    r
}

pub fn pext(src: u64, mut m: u64) -> u64 {
    let mut r = 0;
    let mut k = 0;
    while m != 0 {
        let bit = m & m.wrapping_neg();
        if src & bit != 0 {
            r |= 1 << k;
        }
        k += 1;
        m &= m - 1;
    }
    r
}

/// RORX r, r/m, imm8: rotate right, no flags.
fn rorx(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    check_vex_gpr(cpu)?;
    let size = d.size as usize;
    let v = cpu.op_read(p, d, 1, size)? & mask(size);
    let r = if size == 8 {
        v.rotate_right(u32::from(d.i.immediate8()) & 63)
    } else {
        u64::from((v as u32).rotate_right(u32::from(d.i.immediate8()) & 31))
    };
    cpu.set_reg(d.i.op0_register(), r);
    Ok(())
}

/// SARX / SHLX / SHRX r, r/m, r(vvvv): the count masked to the width, no
/// flags.
fn shiftx(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    check_vex_gpr(cpu)?;
    let size = d.size as usize;
    let v = cpu.op_read(p, d, 1, size)? & mask(size);
    let n = cpu.reg(d.i.op2_register()) as u32 & (8 * size as u32 - 1);
    let r = match d.i.mnemonic() {
        Mnemonic::Shlx => v << n,
        Mnemonic::Shrx => v >> n,
        _ => (super::sext(v, size) as i64 >> n) as u64,
    } & mask(size);
    cpu.set_reg(d.i.op0_register(), r);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deposit_and_extract() {
        assert_eq!(pdep(0b101, 0b1111_0000), 0b0101_0000);
        assert_eq!(pext(0b1010_1100, 0b1111_0000), 0b1010);
        assert_eq!(pdep(u64::MAX, 0x8000_0000_0000_0001), 0x8000_0000_0000_0001);
        assert_eq!(pext(0x8000_0000_0000_0000, 0x8000_0000_0000_0000), 1);
    }
}
