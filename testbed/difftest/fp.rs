//! x87, MMX and SSE cases: the instruction pool, special values, and the
//! random FPU/SSE state.
//!
//! Only 64-bit ring 3 has an oracle for these on KVM-PVM: the host's
//! emulator refuses x87 and SSE arithmetic in ring 0 and real mode, and
//! compatibility mode is emulated as well (docs/DIFFTEST.md).
//!
//! Not generated: FXSAVE/FNSAVE/FNSTENV and their restores (their images
//! hold FIP/FDP/FOP, which the Sapphire Rapids processor does not maintain
//! like the interpreter and which the comparison does not cover), RCP*/
//! RSQRT* (their approximations are implementation-specific), FBLD (an
//! invalid BCD digit gives an undefined result), MASKMOVQ/MASKMOVDQU
//! (implicit [rDI] stores), MONITOR/MWAIT (not for ring 3).
//!
//! Transcendentals (FSIN, FCOS, FSINCOS, FPTAN, FPATAN, F2XM1, FYL2X,
//! FYL2XP1) are only generated as the last instruction of a case, and the
//! comparison then masks the low 16 significand bits of the x87 registers
//! and C1 (Intel's results are correctly rounded only within an ulp or
//! so; the interpreter need not match their last bits).

use iced_x86::{Code, CpuidFeature as F, EncodingKind, Mnemonic};

use cpu_interp::state::CpuState;

use super::env;
use super::rng::Rng;
use super::Mode;

/// x87 instructions whose results are approximations.
pub const TRANSCENDENTAL: &[Mnemonic] = &[
    Mnemonic::Fsin,
    Mnemonic::Fcos,
    Mnemonic::Fsincos,
    Mnemonic::Fptan,
    Mnemonic::Fpatan,
    Mnemonic::F2xm1,
    Mnemonic::Fyl2x,
    Mnemonic::Fyl2xp1,
];

pub fn is_transcendental(m: Mnemonic) -> bool {
    TRANSCENDENTAL.contains(&m)
}

fn excluded(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Fxsave
            | Mnemonic::Fxsave64
            | Mnemonic::Fxrstor
            | Mnemonic::Fxrstor64
            | Mnemonic::Fnsave
            | Mnemonic::Fsave
            | Mnemonic::Frstor
            | Mnemonic::Fnstenv
            | Mnemonic::Fstenv
            | Mnemonic::Fldenv
            | Mnemonic::Rcpps
            | Mnemonic::Rcpss
            | Mnemonic::Rsqrtps
            | Mnemonic::Rsqrtss
            | Mnemonic::Fbld
            | Mnemonic::Maskmovq
            | Mnemonic::Maskmovdqu
            | Mnemonic::Monitor
            | Mnemonic::Mwait
    )
}

/// Is `c` an x87, MMX or SSE..SSSE3 instruction?
pub fn is_fp(c: Code) -> bool {
    c.cpuid_features().iter().any(|f| {
        matches!(
            f,
            F::FPU
                | F::FPU287
                | F::FPU387
                | F::MMX
                | F::SSE
                | F::SSE2
                | F::SSE3
                | F::SSSE3
                | F::SSE4_1
        )
    })
}

/// Does `c` use the x87 stack or MMX registers (and so the x87 state)?
pub fn x87_or_mmx(c: Code) -> bool {
    use iced_x86::OpCodeOperandKind as K;
    c.cpuid_features()
        .iter()
        .any(|f| matches!(f, F::FPU | F::FPU287 | F::FPU387 | F::MMX))
        || c.op_code().op_kinds().iter().any(|k| {
            matches!(
                k,
                K::mm_reg | K::mm_rm | K::mm_or_mem | K::st0 | K::sti_opcode
            )
        })
}

/// The x87/MMX/SSE codes the interpreter implements, valid in `mode`,
/// grouped by mnemonic.
pub fn fp_groups(mode: Mode, supported: impl Fn(Code) -> bool) -> Vec<Vec<Code>> {
    let mut by: std::collections::BTreeMap<u32, Vec<Code>> = Default::default();
    for c in Code::values() {
        if c.encoding() != EncodingKind::Legacy
            || !is_fp(c)
            || excluded(c.mnemonic())
            || !cpu_interp::dispatch::implemented(c)
            || !super::gen::valid_in(c, mode)
            || !supported(c)
        {
            continue;
        }
        by.entry(c.mnemonic() as u32).or_default().push(c);
    }
    by.into_values().collect()
}

/// A single-precision value, often special.
pub fn f32_bits(rng: &mut Rng) -> u32 {
    let sign = if rng.bool() { 0x8000_0000 } else { 0 };
    sign | match rng.below(14) {
        0 => 0,
        1 => 0x7f80_0000,                                  // infinity
        2 => 0x7fc0_0000 | rng.below(0x40_0000) as u32,    // quiet NaN
        3 => 0x7f80_0000 | rng.range(1, 0x3f_ffff) as u32, // signalling NaN
        4 => rng.range(1, 0x7f_ffff) as u32,               // denormal
        5 => 0x0080_0000,                                  // smallest normal
        6 => 0x7f7f_ffff,                                  // largest finite
        7 => 0x3f80_0000,                                  // 1.0
        8 => 0x3f00_0000 | rng.below(0x80_0000) as u32,    // [0.5, 1)
        9 => 0x4b00_0000 | rng.below(0x80_0000) as u32,    // integers near 2^23
        10 => 0x4f00_0000 | rng.below(0x80_0000) as u32,   // near 2^31 (conversions)
        _ => rng.next_u32() & 0x7fff_ffff,
    }
}

/// A double-precision value, often special.
pub fn f64_bits(rng: &mut Rng) -> u64 {
    let sign = if rng.bool() { 1u64 << 63 } else { 0 };
    sign | match rng.below(14) {
        0 => 0,
        1 => 0x7ff0_0000_0000_0000,
        2 => 0x7ff8_0000_0000_0000 | rng.below(1 << 51),
        3 => 0x7ff0_0000_0000_0000 | rng.range(1, (1 << 51) - 1),
        4 => rng.range(1, (1 << 52) - 1),
        5 => 0x0010_0000_0000_0000,
        6 => 0x7fef_ffff_ffff_ffff,
        7 => 0x3ff0_0000_0000_0000,
        8 => 0x3fe0_0000_0000_0000 | rng.below(1 << 52),
        9 => 0x4330_0000_0000_0000 | rng.below(1 << 52),
        10 => 0x41e0_0000_0000_0000 | rng.below(1 << 52),
        11 => 0x43e0_0000_0000_0000 | rng.below(1 << 52),
        _ => rng.next_u64() & 0x7fff_ffff_ffff_ffff,
    }
}

/// An extended-precision value (10 bytes), often special, including the
/// encodings the 8087 knew and later processors reject (unnormals,
/// pseudo-denormals, pseudo-NaNs).
pub fn f80_bytes(rng: &mut Rng) -> [u8; 10] {
    let sign: u16 = if rng.bool() { 0x8000 } else { 0 };
    let int = 1u64 << 63;
    let (exp, mant): (u16, u64) = match rng.below(16) {
        0 => (0, 0),
        1 => (0x7fff, int),                                  // infinity
        2 => (0x7fff, int | (1 << 62) | rng.below(1 << 62)), // quiet NaN
        3 => (0x7fff, int | rng.range(1, (1 << 62) - 1)),    // signalling NaN
        4 => (0, rng.range(1, int - 1)),                     // denormal
        5 => (0, int | rng.below(int)),                      // pseudo-denormal
        6 => (rng.range(1, 0x7ffe) as u16, rng.below(int)),  // unnormal
        7 => (0x7fff, rng.below(int)),                       // pseudo-NaN / -infinity
        8 => (0x3fff, int),                                  // 1.0
        9 => (0x3fff + rng.below(64) as u16, int | rng.below(int)),
        10 => (0x3fff - rng.below(64) as u16, int | rng.below(int)),
        11 => (0x7ffe, u64::MAX), // largest finite
        12 => (1, int),           // smallest normal
        _ => (rng.range(1, 0x7ffe) as u16, int | rng.below(int)),
    };
    let mut b = [0u8; 10];
    b[..8].copy_from_slice(&mant.to_le_bytes());
    b[8..].copy_from_slice(&(sign | exp).to_le_bytes());
    b
}

/// The x87 tag of a register's contents as FXRSTOR derives it: 0 valid,
/// 1 zero, 2 special.
pub fn x87_tag(v: &[u8; 10]) -> u16 {
    let mut m = [0u8; 8];
    m.copy_from_slice(&v[..8]);
    let mant = u64::from_le_bytes(m);
    let exp = u16::from_le_bytes([v[8], v[9]]) & 0x7fff;
    match exp {
        0x7fff => 2,
        0 if mant == 0 => 1,
        0 => 2,
        _ if mant >> 63 == 0 => 2,
        _ => 0,
    }
}

/// Random x87 stack (0..=8 values), control words, XMM lanes full of
/// special values and MXCSR (rounding, FTZ/DAZ, sometimes unmasked
/// exceptions).
pub fn randomize(rng: &mut Rng, s: &mut CpuState) {
    let f = &mut s.fpu;
    let depth = rng.below(9) as usize;
    let top = (8 - depth) % 8;
    let mut ftw = 0u16;
    for r in 0..8 {
        f.st[r] = f80_bytes(rng);
    }
    for r in 0..8 {
        // Physical register r holds ST((r - top) mod 8).
        let st_index = (r + 8 - top) % 8;
        let tag = if st_index < depth {
            x87_tag(&f.st[r])
        } else {
            3
        };
        ftw |= tag << (2 * r);
    }
    f.ftw = ftw;
    f.fsw = (top as u16) << 11;
    if rng.chance(1, 3) {
        f.fsw |= (rng.next_u32() as u16) & 0x4700; // C0..C3
    }
    f.fcw = 0x037f;
    f.fcw = (f.fcw & !0x0c00) | ((rng.below(4) as u16) << 10); // rounding
    if rng.chance(1, 3) {
        f.fcw = (f.fcw & !0x0300) | [0x0000, 0x0200, 0x0300][rng.below(3) as usize];
    }
    if rng.chance(1, 10) {
        f.fcw &= !(rng.next_u32() as u16 & 0x3f); // unmask some exceptions
    }
    for x in f.xmm.iter_mut() {
        *x = if rng.bool() {
            (0..4).fold(0u128, |a, k| a | (u128::from(f32_bits(rng)) << (32 * k)))
        } else {
            u128::from(f64_bits(rng)) | (u128::from(f64_bits(rng)) << 64)
        };
    }
    let mut mxcsr = 0x1f80 | ((rng.below(4) as u32) << 13);
    if rng.chance(1, 5) {
        mxcsr |= (rng.next_u32() & 1) << 15; // FTZ
        mxcsr |= (rng.next_u32() & 1) << 6; // DAZ
    }
    if rng.chance(1, 10) {
        mxcsr &= !((rng.next_u32() & 0x3f) << 7); // unmask some exceptions
    }
    if rng.chance(1, 4) {
        mxcsr |= rng.next_u32() & 0x3f; // sticky flags already set
    }
    f.mxcsr = mxcsr;
}

/// Scatter special values over the window pages of a case area.
pub fn sprinkle(rng: &mut Rng, area: &mut [u8]) {
    let lo = (env::W_RO - env::CASE_AREA) as usize;
    let hi = (env::UNMAPPED - env::CASE_AREA) as usize;
    for _ in 0..600 {
        let at = rng.range(lo as u64, (hi - 16) as u64) as usize;
        match rng.below(3) {
            0 => area[at..at + 4].copy_from_slice(&f32_bits(rng).to_le_bytes()),
            1 => area[at..at + 8].copy_from_slice(&f64_bits(rng).to_le_bytes()),
            _ => area[at..at + 10].copy_from_slice(&f80_bytes(rng)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_random_state_are_consistent() {
        assert_eq!(x87_tag(&[0; 10]), 1);
        let mut one = [0u8; 10];
        one[7] = 0x80;
        one[8] = 0xff;
        one[9] = 0x3f;
        assert_eq!(x87_tag(&one), 0);
        let mut rng = Rng::new(3);
        for _ in 0..100 {
            let mut s = CpuState::default();
            randomize(&mut rng, &mut s);
            let top = usize::from((s.fpu.fsw >> 11) & 7);
            for r in 0..8 {
                let t = (s.fpu.ftw >> (2 * r)) & 3;
                if t != 3 {
                    assert_eq!(t, x87_tag(&s.fpu.st[r]));
                }
            }
            let _ = top;
        }
        assert!(fp_groups(Mode::Long64Ring3, |_| true).len() > 100);
    }
}
