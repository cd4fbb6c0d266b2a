//! MUL, IMUL (one, two and three operands), DIV, IDIV (#DE on a zero
//! divisor or a quotient that does not fit).

use iced_x86::Mnemonic;

use super::{mask, sext};
use crate::block::Insn;
use crate::cpu::Cpu;
use crate::dispatch::Table;
use crate::exception::{Exception, XResult};
use crate::flags::{self, szp};
use crate::platform::Platform;
use crate::state::gpr;

pub fn register(t: &mut Table) {
    t.set_mnemonic(Mnemonic::Mul, mul);
    t.set_mnemonic(Mnemonic::Imul, imul);
    t.set_mnemonic(Mnemonic::Div, div);
    t.set_mnemonic(Mnemonic::Idiv, idiv);
}

/// CF = OF = `overflow`; SF/ZF/PF from the low half as Intel computes them
/// (they are architecturally undefined); AF clear.
fn mul_flags(cpu: &mut Cpu, size: usize, low: u64, overflow: bool) {
    let mut f = szp(size as u32 * 8, low);
    if overflow {
        f |= flags::CF | flags::OF;
    }
    cpu.flags.set_arith(f);
}

fn mul(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let src = cpu.op_read(p, d, 0, size)? & mask(size);
    let a = cpu.gpr[gpr::RAX] & mask(size);
    let prod = u128::from(a) * u128::from(src);
    let bits = size * 8;
    let lo = (prod as u64) & mask(size);
    let hi = ((prod >> bits) as u64) & mask(size);
    if size == 1 {
        cpu.set_gpr_sized(gpr::RAX, 2, prod as u64);
    } else {
        cpu.set_gpr_sized(gpr::RAX, size as u32, lo);
        cpu.set_gpr_sized(gpr::RDX, size as u32, hi);
    }
    mul_flags(cpu, size, lo, hi != 0);
    Ok(())
}

fn imul(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let bits = size * 8;
    match d.i.op_count() {
        1 => {
            let src = sext(cpu.op_read(p, d, 0, size)?, size) as i64;
            let a = sext(cpu.gpr[gpr::RAX], size) as i64;
            let prod = i128::from(a) * i128::from(src);
            let lo = (prod as u64) & mask(size);
            let hi = ((prod >> bits) as u64) & mask(size);
            let fits = prod == i128::from(sext(lo, size) as i64);
            if size == 1 {
                cpu.set_gpr_sized(gpr::RAX, 2, prod as u64);
            } else {
                cpu.set_gpr_sized(gpr::RAX, size as u32, lo);
                cpu.set_gpr_sized(gpr::RDX, size as u32, hi);
            }
            mul_flags(cpu, size, lo, !fits);
        }
        n => {
            // imul r, r/m  or  imul r, r/m, imm
            let (a, b) = if n == 2 {
                (cpu.op_read(p, d, 0, size)?, cpu.op_read(p, d, 1, size)?)
            } else {
                (cpu.op_read(p, d, 1, size)?, cpu.op_read(p, d, 2, size)?)
            };
            let prod = i128::from(sext(a, size) as i64) * i128::from(sext(b, size) as i64);
            let lo = (prod as u64) & mask(size);
            let fits = prod == i128::from(sext(lo, size) as i64);
            cpu.set_reg(d.i.op0_register(), lo);
            mul_flags(cpu, size, lo, !fits);
        }
    }
    Ok(())
}

fn div(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let src = u128::from(cpu.op_read(p, d, 0, size)? & mask(size));
    if src == 0 {
        return Err(Exception::de());
    }
    let bits = size * 8;
    let dividend: u128 = if size == 1 {
        u128::from(cpu.gpr[gpr::RAX] & 0xffff)
    } else {
        (u128::from(cpu.gpr[gpr::RDX] & mask(size)) << bits)
            | u128::from(cpu.gpr[gpr::RAX] & mask(size))
    };
    let q = dividend / src;
    let r = dividend % src;
    if q > u128::from(mask(size)) {
        return Err(Exception::de());
    }
    if size == 1 {
        cpu.set_gpr_sized(gpr::RAX, 2, (q as u64) | ((r as u64) << 8));
    } else {
        cpu.set_gpr_sized(gpr::RAX, size as u32, q as u64);
        cpu.set_gpr_sized(gpr::RDX, size as u32, r as u64);
    }
    Ok(())
}

fn idiv(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let src = i128::from(sext(cpu.op_read(p, d, 0, size)?, size) as i64);
    if src == 0 {
        return Err(Exception::de());
    }
    let bits = size * 8;
    let dividend: i128 = if size == 1 {
        i128::from(sext(cpu.gpr[gpr::RAX], 2) as i64)
    } else {
        let raw = (u128::from(cpu.gpr[gpr::RDX] & mask(size)) << bits)
            | u128::from(cpu.gpr[gpr::RAX] & mask(size));
        // Sign-extend the 2*bits-wide value.
        let sh = 128 - 2 * bits as u32;
        ((raw << sh) as i128) >> sh
    };
    // -2^127 / -1 overflows i128 itself (RDX:RAX = 0x8000..:0, src = -1):
    // that quotient does not fit either, so it is #DE like any other.
    let (Some(q), Some(r)) = (dividend.checked_div(src), dividend.checked_rem(src)) else {
        return Err(Exception::de());
    };
    let max = i128::from(mask(size) >> 1);
    if q > max || q < -max - 1 {
        return Err(Exception::de());
    }
    let (q, r) = (q as u64 & mask(size), r as u64 & mask(size));
    if size == 1 {
        cpu.set_gpr_sized(gpr::RAX, 2, q | (r << 8));
    } else {
        cpu.set_gpr_sized(gpr::RAX, size as u32, q);
        cpu.set_gpr_sized(gpr::RDX, size as u32, r);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::exception::DE;
    use crate::flags::*;
    use crate::insn::testutil::*;
    use crate::state::gpr::*;

    #[test]
    fn mul_imul_forms_64() {
        // mul rbx (48 f7 e3) ; imul ecx, edx, -3 (6b ca fd) ; imul si, di (66 0f af f7)
        let code = [0x48, 0xf7, 0xe3, 0x6b, 0xca, 0xfd, 0x66, 0x0f, 0xaf, 0xf7];
        let c = run(Mode::Long64, &code, |c| {
            c.set_gpr(RAX, u64::MAX);
            c.set_gpr(RBX, 2);
            c.set_gpr(RDX, 5);
            c.set_gpr(RSI, 0x100);
            c.set_gpr(RDI, 0x100);
        });
        // rdx was overwritten by mul (high half = 1) before imul used it.
        assert_eq!(c.gpr(RAX), u64::MAX - 1);
        assert_eq!(c.gpr(RDX), 1);
        assert_eq!(c.gpr(RCX), (-3i32) as u32 as u64);
        // 0x100 * 0x100 overflows 16 bits: CF = OF = 1, result 0.
        assert_eq!(c.gpr(RSI) & 0xffff, 0);
        assert_eq!(c.rflags() & (CF | OF), CF | OF);
    }

    #[test]
    fn div_idiv_32() {
        // div ebx (f7 f3) ; idiv cl (f6 f9)
        let code = [0xf7, 0xf3, 0xf6, 0xf9];
        let c = run(Mode::Prot32, &code, |c| {
            c.set_gpr(RDX, 1);
            c.set_gpr(RAX, 5);
            c.set_gpr(RBX, 0x10);
            c.set_gpr(RCX, 0xfd); // -3
        });
        // (1<<32 | 5) / 16 = 0x10000000, rem 5 ; then ax = 0x0000 / -3
        // eax = 0x10000000 -> ax = 0 -> idiv cl: q=0, r=0
        assert_eq!(c.gpr(RDX), 5);
        assert_eq!(c.gpr(RAX), 0x1000_0000);
    }

    #[test]
    fn idiv_of_the_most_negative_128_bit_dividend_is_a_divide_error() {
        // idiv r11 (49 f7 fb) with RDX:RAX = 0x8000000000000000:0 and
        // R11 = -1: the quotient 2^127 fits nowhere, #DE (no panic).
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        write_phys(&c, CODE, &[0x49, 0xf7, 0xfb]);
        c.set_gpr(RDX, 0x8000_0000_0000_0000);
        c.set_gpr(RAX, 0);
        c.set_gpr(R11, u64::MAX);
        let mut p = TestPlatform::default();
        let insn = c.decode_one(&mut p).expect("decodable");
        let e = (insn.h)(&mut c, &mut p, &insn).expect_err("#DE");
        assert_eq!(e.vector, DE);
        assert_eq!(c.gpr(RAX), 0);
    }

    #[test]
    fn divide_error_is_a_fault() {
        // div bl with bl = 0 -> #DE through the real-mode IVT; handler: mov cx, 0xde ; hlt
        let code = [0xf6, 0xf3];
        let c = run(Mode::Real16, &code, |c| {
            write_phys(c, u64::from(DE) * 4, &[0x00, 0x30, 0x00, 0x00]);
            write_phys(c, 0x3000, &[0xb9, 0xde, 0x00, 0xf4]);
            c.set_gpr(RAX, 0x1234);
        });
        assert_eq!(c.gpr(RCX), 0xde);
        // The fault pushed the address of the DIV itself.
        assert_eq!(read_phys(&c, STACK_TOP - 6, 2), CODE);
        assert_eq!(c.gpr(RAX), 0x1234);
    }
}
