//! AES-NI (AESENC, AESENCLAST, AESDEC, AESDECLAST, AESIMC,
//! AESKEYGENASSIST) and PCLMULQDQ, legacy and VEX.128 encodings (the
//! 256-bit VAES/VPCLMULQDQ forms are a different extension, not offered).
//!
//! The 128-bit state is the AES state in column order: byte `r + 4c` of
//! the register is row r of column c.

use iced_x86::Mnemonic;

use super::avx::imm8;
use crate::block::Insn;
use crate::cpu::Cpu;
use crate::dispatch::Table;
use crate::exception::XResult;
use crate::platform::Platform;

pub fn register(t: &mut Table) {
    for m in [
        Mnemonic::Aesenc,
        Mnemonic::Aesenclast,
        Mnemonic::Aesdec,
        Mnemonic::Aesdeclast,
        Mnemonic::Aesimc,
        Mnemonic::Aeskeygenassist,
        Mnemonic::Pclmulqdq,
    ] {
        t.set_mnemonic(m, legacy);
    }
    for m in [
        Mnemonic::Vaesenc,
        Mnemonic::Vaesenclast,
        Mnemonic::Vaesdec,
        Mnemonic::Vaesdeclast,
        Mnemonic::Vaesimc,
        Mnemonic::Vaeskeygenassist,
        Mnemonic::Vpclmulqdq,
    ] {
        t.set_vex(m, vex);
    }
}

/// The AES S-box, computed (multiplicative inverse in GF(2^8), then the
/// affine transform).
fn sbox() -> &'static ([u8; 256], [u8; 256]) {
    static T: std::sync::OnceLock<([u8; 256], [u8; 256])> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut s = [0u8; 256];
        let mut inv = [0u8; 256];
        for x in 0..256u16 {
            let y = if x == 0 { 0 } else { ginv(x as u8) };
            let mut b = y;
            let mut r = y;
            for _ in 0..4 {
                b = b.rotate_left(1);
                r ^= b;
            }
            r ^= 0x63;
            s[x as usize] = r;
            inv[r as usize] = x as u8;
        }
        (s, inv)
    })
}

/// Multiplication in GF(2^8) modulo x^8 + x^4 + x^3 + x + 1.
fn gmul(mut a: u8, mut b: u8) -> u8 {
    let mut r = 0;
    while b != 0 {
        if b & 1 != 0 {
            r ^= a;
        }
        let hi = a & 0x80;
        a <<= 1;
        if hi != 0 {
            a ^= 0x1b;
        }
        b >>= 1;
    }
    r
}

fn ginv(a: u8) -> u8 {
    // a^254 = a^-1.
    let mut r = 1u8;
    let mut base = a;
    let mut e = 254u32;
    while e != 0 {
        if e & 1 != 0 {
            r = gmul(r, base);
        }
        base = gmul(base, base);
        e >>= 1;
    }
    r
}

fn shift_rows(s: [u8; 16], inverse: bool) -> [u8; 16] {
    let mut o = [0u8; 16];
    for c in 0..4 {
        for r in 0..4 {
            let from = if inverse {
                (c + 4 - r) % 4
            } else {
                (c + r) % 4
            };
            o[r + 4 * c] = s[r + 4 * from];
        }
    }
    o
}

fn sub_bytes(s: [u8; 16], inverse: bool) -> [u8; 16] {
    let (f, i) = sbox();
    s.map(|b| {
        if inverse {
            i[b as usize]
        } else {
            f[b as usize]
        }
    })
}

fn mix_columns(s: [u8; 16], inverse: bool) -> [u8; 16] {
    let m: [u8; 4] = if inverse {
        [14, 11, 13, 9]
    } else {
        [2, 3, 1, 1]
    };
    let mut o = [0u8; 16];
    for c in 0..4 {
        for r in 0..4 {
            o[r + 4 * c] = (0..4).fold(0, |acc, k| acc ^ gmul(m[(k + 4 - r) % 4], s[k + 4 * c]));
        }
    }
    o
}

fn sub_word(w: u32) -> u32 {
    u32::from_le_bytes(sub_bytes_word(w.to_le_bytes()))
}

fn sub_bytes_word(b: [u8; 4]) -> [u8; 4] {
    let (f, _) = sbox();
    b.map(|x| f[x as usize])
}

/// The AES operation of `m` on state `a` with round key (or source) `b`.
pub fn aes(m: Mnemonic, a: u128, b: u128, imm: u8) -> u128 {
    let s = a.to_le_bytes();
    match m {
        Mnemonic::Aesenc | Mnemonic::Vaesenc => {
            u128::from_le_bytes(mix_columns(sub_bytes(shift_rows(s, false), false), false)) ^ b
        }
        Mnemonic::Aesenclast | Mnemonic::Vaesenclast => {
            u128::from_le_bytes(sub_bytes(shift_rows(s, false), false)) ^ b
        }
        Mnemonic::Aesdec | Mnemonic::Vaesdec => {
            u128::from_le_bytes(mix_columns(sub_bytes(shift_rows(s, true), true), true)) ^ b
        }
        Mnemonic::Aesdeclast | Mnemonic::Vaesdeclast => {
            u128::from_le_bytes(sub_bytes(shift_rows(s, true), true)) ^ b
        }
        Mnemonic::Aesimc | Mnemonic::Vaesimc => {
            u128::from_le_bytes(mix_columns(b.to_le_bytes(), true))
        }
        Mnemonic::Aeskeygenassist | Mnemonic::Vaeskeygenassist => {
            let w = |k: u32| (b >> (32 * k)) as u32;
            let rcon = u32::from(imm);
            let (x1, x3) = (sub_word(w(1)), sub_word(w(3)));
            u128::from(x1)
                | (u128::from(x1.rotate_right(8) ^ rcon) << 32)
                | (u128::from(x3) << 64)
                | (u128::from(x3.rotate_right(8) ^ rcon) << 96)
        }
        _ => clmul(
            (a >> (64 * u32::from(imm & 1))) as u64,
            (b >> (64 * u32::from((imm >> 4) & 1))) as u64,
        ),
    }
}

/// Carry-less multiplication of two 64-bit polynomials.
pub fn clmul(a: u64, b: u64) -> u128 {
    (0..64).fold(0u128, |r, i| {
        if (b >> i) & 1 != 0 {
            r ^ (u128::from(a) << i)
        } else {
            r
        }
    })
}

fn legacy(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let b = cpu.vec_read(p, d, 1, true)?;
    let dst = d.i.op0_register();
    let r = aes(d.i.mnemonic(), cpu.xmm_reg(dst), b, imm8(d));
    cpu.set_xmm_reg(dst, r);
    Ok(())
}

/// VEX forms: `dst, src1, src2[, imm]`, or `dst, src[, imm]` for
/// VAESIMC/VAESKEYGENASSIST.
fn vex(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let m = d.i.mnemonic();
    let unary = matches!(m, Mnemonic::Vaesimc | Mnemonic::Vaeskeygenassist);
    let (a, b) = if unary {
        (0, cpu.vsrc(p, d, 1)?[0])
    } else {
        let a = cpu.vreg(d.i.op1_register())[0];
        (a, cpu.vsrc(p, d, 2)?[0])
    };
    let r = aes(m, a, b, imm8(d));
    cpu.set_vreg(d.i.op0_register(), [r, 0]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sbox_and_fips197_round() {
        let (s, i) = sbox();
        assert_eq!(s[0], 0x63);
        assert_eq!(s[0x53], 0xed);
        assert_eq!(i[0xed], 0x53);
        // The state and round key of Intel's AES-NI white paper; the
        // expected values are what this host's processor computes.
        let st = 0x7b5b5465_73745665_63746f72_5d53475du128;
        let key = 0x48692853_68617929_5b477565_726f6e5du128;
        assert_eq!(
            aes(Mnemonic::Aesenc, st, key, 0),
            0xa8311c2f_9fdba3c5_8b104b58_ded7e595
        );
        assert_eq!(
            aes(Mnemonic::Aesenclast, st, key, 0),
            0xc7fb881e_938c5964_177ec425_53fdc611
        );
        assert_eq!(
            aes(Mnemonic::Aesdec, st, key, 0),
            0x138ac342_faea2787_b58eb95e_b730392a
        );
        assert_eq!(
            aes(Mnemonic::Aesdeclast, st, key, 0),
            0xc5a391ef_6b317f95_d410637b_72a593d0
        );
        assert_eq!(
            aes(Mnemonic::Aesimc, 0, key, 0),
            0x597f8df1_09efaa15_f39bc5a1_19d859b6
        );
        assert_eq!(
            aes(Mnemonic::Aeskeygenassist, 0, key, 0x1b),
            0xed52f92f_52f934ed_4d39a086_39a09d4d
        );
        assert_eq!(clmul(3, 3), 5);
        assert_eq!(clmul(u64::MAX, 2), u128::from(u64::MAX) << 1);
    }
}
