//! Shifts and rotates: SHL/SAL SHR SAR ROL ROR RCL RCR SHLD SHRD.
//!
//! Flags follow the SDM; where it calls a flag undefined (OF for counts
//! above one, AF, CF for over-wide 8/16-bit shifts) the values are what
//! recent Intel processors produce as far as known, and the differential
//! harness masks them.

use iced_x86::{Mnemonic, OpKind};

use super::mask;
use crate::block::Insn;
use crate::cpu::Cpu;
use crate::dispatch::Table;
use crate::exception::XResult;
use crate::flags::{self, szp};
use crate::platform::Platform;

pub fn register(t: &mut Table) {
    t.set_mnemonic(Mnemonic::Shl, shift::<SHL>);
    t.set_mnemonic(Mnemonic::Sal, shift::<SHL>);
    t.set_mnemonic(Mnemonic::Shr, shift::<SHR>);
    t.set_mnemonic(Mnemonic::Sar, shift::<SAR>);
    t.set_mnemonic(Mnemonic::Rol, shift::<ROL>);
    t.set_mnemonic(Mnemonic::Ror, shift::<ROR>);
    t.set_mnemonic(Mnemonic::Rcl, shift::<RCL>);
    t.set_mnemonic(Mnemonic::Rcr, shift::<RCR>);
    t.set_mnemonic(Mnemonic::Shld, double_shift::<true>);
    t.set_mnemonic(Mnemonic::Shrd, double_shift::<false>);
}

const SHL: u8 = 0;
const SHR: u8 = 1;
const SAR: u8 = 2;
const ROL: u8 = 3;
const ROR: u8 = 4;
const RCL: u8 = 5;
const RCR: u8 = 6;

/// The shift count operand (1, CL or an immediate), masked as hardware does.
fn count(cpu: &Cpu, d: &Insn, n: u32, size: usize) -> u32 {
    let raw = match d.i.op_kind(n) {
        OpKind::Register => cpu.reg(d.i.op_register(n)),
        _ => d.i.immediate(n),
    } as u32;
    raw & if size == 8 { 0x3f } else { 0x1f }
}

fn shift<const OP: u8>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let bits = size as u32 * 8;
    let m = mask(size);
    let a = cpu.op0_read_rmw(p, d, size)? & m;
    let c = if d.i.op_count() > 1 {
        count(cpu, d, 1, size)
    } else {
        1
    };
    if c == 0 {
        // No flags change; a 32-bit register destination is still written
        // (zero-extended), as on hardware.
        return cpu.op0_write(p, d, size, a);
    }
    let msb = |v: u64| (v >> (bits - 1)) & 1 != 0;
    let cf_in = cpu.flags.cf();
    let (r, arith): (u64, u64) = match OP {
        SHL => {
            let r = if c >= 64 { 0 } else { (a << c) & m };
            let cf = c <= bits && (a >> (bits - c)) & 1 != 0;
            let of = msb(r) ^ cf;
            (r, szp(bits, r) | flag(cf, flags::CF) | flag(of, flags::OF))
        }
        SHR => {
            let r = if c >= 64 { 0 } else { a >> c };
            let cf = c <= bits && (a >> (c - 1)) & 1 != 0;
            let of = msb(a);
            (
                r,
                szp(bits, r) | flag(cf, flags::CF) | flag(of && c == 1, flags::OF),
            )
        }
        SAR => {
            let sa = super::sext(a, size) as i64;
            let r = (sa >> c.min(63)) as u64 & m;
            let cf = (sa >> (c - 1).min(63)) & 1 != 0;
            (r, szp(bits, r) | flag(cf, flags::CF))
        }
        ROL | ROR => {
            let k = c % bits;
            let r = if k == 0 {
                a
            } else if OP == ROL {
                ((a << k) | (a >> (bits - k))) & m
            } else {
                ((a >> k) | (a << (bits - k))) & m
            };
            let (cf, of) = if OP == ROL {
                let cf = r & 1 != 0;
                (cf, msb(r) ^ cf)
            } else {
                (msb(r), msb(r) ^ ((r >> (bits - 2)) & 1 != 0))
            };
            let keep = cpu.flags.arith() & !(flags::CF | flags::OF);
            (r, keep | flag(cf, flags::CF) | flag(of, flags::OF))
        }
        _ => {
            // RCL / RCR: rotate through CF over bits + 1 positions.
            let k = c % (bits + 1);
            let wide = (u128::from(cf_in) << bits) | u128::from(a);
            let n = bits + 1;
            let rot = if k == 0 {
                wide
            } else if OP == RCL {
                ((wide << k) | (wide >> (n - k))) & ((1u128 << n) - 1)
            } else {
                ((wide >> k) | (wide << (n - k))) & ((1u128 << n) - 1)
            };
            let r = (rot as u64) & m;
            let cf = (rot >> bits) & 1 != 0;
            let of = if OP == RCL {
                msb(r) ^ cf
            } else {
                msb(r) ^ ((r >> (bits - 2)) & 1 != 0)
            };
            let keep = cpu.flags.arith() & !(flags::CF | flags::OF);
            (r, keep | flag(cf, flags::CF) | flag(of, flags::OF))
        }
    };
    cpu.op0_write(p, d, size, r)?;
    cpu.flags.set_arith(arith);
    Ok(())
}

#[inline(always)]
fn flag(on: bool, bit: u64) -> u64 {
    if on {
        bit
    } else {
        0
    }
}

fn double_shift<const LEFT: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let bits = size as u32 * 8;
    let m = mask(size);
    let a = cpu.op0_read_rmw(p, d, size)? & m;
    let b = cpu.op_read(p, d, 1, size)? & m;
    let c = count(cpu, d, 2, size);
    if c == 0 {
        return cpu.op0_write(p, d, size, a);
    }
    // Work in 128 bits: (a:b) for SHLD, (b:a) for SHRD; for 16-bit operands
    // with counts above 16 hardware shifts the pattern b:a:b (undefined
    // result per the SDM; this matches Intel).
    let (r, cf) = if LEFT {
        let wide = (u128::from(a) << bits) | u128::from(b);
        let wide = if c > bits {
            (wide << bits) | u128::from(a)
        } else {
            wide
        };
        let cc = if c > bits { c - bits } else { c };
        let top = if c > bits { 3 * bits } else { 2 * bits };
        let r = ((wide << cc) >> (top - bits)) as u64 & m;
        let cf = (wide >> (top - cc)) & 1 != 0;
        (r, cf)
    } else {
        let wide = (u128::from(b) << bits) | u128::from(a);
        let wide = if c > bits {
            (u128::from(a) << (2 * bits)) | wide
        } else {
            wide
        };
        let r = (wide >> c) as u64 & m;
        let cf = (wide >> (c - 1)) & 1 != 0;
        (r, cf)
    };
    let msb = |v: u64| (v >> (bits - 1)) & 1 != 0;
    let of = msb(r) ^ msb(a);
    cpu.op0_write(p, d, size, r)?;
    cpu.flags
        .set_arith(szp(bits, r) | flag(cf, flags::CF) | flag(of, flags::OF));
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::flags::*;
    use crate::insn::testutil::*;
    use crate::state::gpr::*;

    #[test]
    fn shl_shr_sar_64() {
        // shl rax, 4 (48 c1 e0 04) ; shr rbx, 1 (48 d1 eb) ; sar ecx, cl (d3 f9)
        let code = [0x48, 0xc1, 0xe0, 0x04, 0x48, 0xd1, 0xeb, 0xd3, 0xf9];
        let c = run(Mode::Long64, &code, |c| {
            c.set_gpr(RAX, 0xf000_0000_0000_0001);
            c.set_gpr(RBX, 3);
            c.set_gpr(RCX, 0xffff_ffff_8000_0004);
        });
        assert_eq!(c.gpr(RAX), 0x10);
        assert_eq!(c.gpr(RBX), 1);
        // sar of 0x80000004 by 4 = 0xf8000000, zero-extended.
        assert_eq!(c.gpr(RCX), 0xf800_0000);
        // CF = bit 3 of 0x80000004 = 0; SF set.
        assert_eq!(c.rflags() & (CF | SF), SF);
    }

    #[test]
    fn rotates_16() {
        // rol ax, 1 (d1 c0) ; rcr bx, 1 (d1 db) ; ror dx, 4 (c1 ca 04)
        let code = [0xd1, 0xc0, 0xd1, 0xdb, 0xc1, 0xca, 0x04];
        let c = run(Mode::Real16, &code, |c| {
            c.set_gpr(RAX, 0x8001);
            c.set_gpr(RBX, 0x0002);
            c.set_gpr(RDX, 0x1234);
        });
        assert_eq!(c.gpr(RAX), 0x0003); // CF = 1 after rol
        assert_eq!(c.gpr(RBX), 0x8001); // CF(1) rotated into bit 15
        assert_eq!(c.gpr(RDX), 0x4123);
    }

    #[test]
    fn shld_shrd_32() {
        // shld eax, ebx, 8 (0f a4 d8 08) ; shrd edx, ecx, cl (0f ad ca)
        let code = [0x0f, 0xa4, 0xd8, 0x08, 0x0f, 0xad, 0xca];
        let c = run(Mode::Prot32, &code, |c| {
            c.set_gpr(RAX, 0x1122_3344);
            c.set_gpr(RBX, 0xaabb_ccdd);
            c.set_gpr(RCX, 0x0000_0004);
            c.set_gpr(RDX, 0x1234_5678);
        });
        assert_eq!(c.gpr(RAX), 0x2233_44aa);
        assert_eq!(c.gpr(RDX), 0x4123_4567);
    }
}
