//! MMX and the packed-integer instructions shared by MMX and SSE2/SSSE3:
//! MOVD/MOVQ (every form), EMMS, PADD*/PSUB* (wrapping and saturating),
//! PMUL*/PMADD*, PCMPEQ*/PCMPGT*, logic, shifts, PACK*/PUNPCK*, PAVG*,
//! PMIN*/PMAX*, PSADBW, PMOVMSKB, PSHUFW, PEXTRW/PINSRW, MASKMOVQ/MASKMOVDQU,
//! MOVNTQ, and SSSE3's PSHUFB, PALIGNR, PABS*, PHADD*/PHSUB*, PMADDUBSW,
//! PMULHRSW, PSIGN*.
//!
//! One handler serves both encodings of a mnemonic: with an MMX destination
//! (or source) it is an MMX instruction (#UD on CR0.EM, #NM on CR0.TS, #MF
//! on a pending x87 exception; afterwards TOP = 0, all tags valid, and a
//! written MMn gets bits 79:64 set), with XMM operands an SSE instruction
//! (#UD without CR4.OSFXSR, 16-byte memory operands aligned).
//!
//! Lane operations work on a `u128` holding `n` = 8 (MMX) or 16 (XMM) bytes.

use iced_x86::{Code, Mnemonic, OpKind};

use super::simd::{op_bytes, uses_mm};
use crate::block::Insn;
use crate::cpu::Cpu;
use crate::dispatch::Table;
use crate::exception::{Exception, XResult};
use crate::platform::Platform;

pub fn register(t: &mut Table) {
    t.set_mnemonic(Mnemonic::Emms, emms);
    t.set_mnemonic(Mnemonic::Movd, movd_movq);
    t.set_mnemonic(Mnemonic::Movq, movd_movq);
    t.set_mnemonic(Mnemonic::Movntq, movntq);
    t.set_mnemonic(Mnemonic::Pmovmskb, pmovmskb);
    t.set_all(
        &[
            Code::Pextrw_r32_mm_imm8,
            Code::Pextrw_r64_mm_imm8,
            Code::Pextrw_r32_xmm_imm8,
            Code::Pextrw_r64_xmm_imm8,
            Code::Pextrw_r32m16_xmm_imm8,
            Code::Pextrw_r64m16_xmm_imm8,
        ],
        pextrw,
    );
    t.set_mnemonic(Mnemonic::Pinsrw, pinsrw);
    t.set_mnemonic(Mnemonic::Maskmovq, maskmov);
    t.set_mnemonic(Mnemonic::Maskmovdqu, maskmov);

    t.set_mnemonic(Mnemonic::Paddb, paddb);
    t.set_mnemonic(Mnemonic::Paddw, paddw);
    t.set_mnemonic(Mnemonic::Paddd, paddd);
    t.set_mnemonic(Mnemonic::Paddq, paddq);
    t.set_mnemonic(Mnemonic::Psubb, psubb);
    t.set_mnemonic(Mnemonic::Psubw, psubw);
    t.set_mnemonic(Mnemonic::Psubd, psubd);
    t.set_mnemonic(Mnemonic::Psubq, psubq);
    t.set_mnemonic(Mnemonic::Paddsb, paddsb);
    t.set_mnemonic(Mnemonic::Paddsw, paddsw);
    t.set_mnemonic(Mnemonic::Paddusb, paddusb);
    t.set_mnemonic(Mnemonic::Paddusw, paddusw);
    t.set_mnemonic(Mnemonic::Psubsb, psubsb);
    t.set_mnemonic(Mnemonic::Psubsw, psubsw);
    t.set_mnemonic(Mnemonic::Psubusb, psubusb);
    t.set_mnemonic(Mnemonic::Psubusw, psubusw);
    t.set_mnemonic(Mnemonic::Pmullw, pmullw);
    t.set_mnemonic(Mnemonic::Pmulhw, pmulhw);
    t.set_mnemonic(Mnemonic::Pmulhuw, pmulhuw);
    t.set_mnemonic(Mnemonic::Pmaddwd, pmaddwd);
    t.set_mnemonic(Mnemonic::Pmuludq, pmuludq);
    t.set_mnemonic(Mnemonic::Pcmpeqb, pcmpeqb);
    t.set_mnemonic(Mnemonic::Pcmpeqw, pcmpeqw);
    t.set_mnemonic(Mnemonic::Pcmpeqd, pcmpeqd);
    t.set_mnemonic(Mnemonic::Pcmpgtb, pcmpgtb);
    t.set_mnemonic(Mnemonic::Pcmpgtw, pcmpgtw);
    t.set_mnemonic(Mnemonic::Pcmpgtd, pcmpgtd);
    t.set_mnemonic(Mnemonic::Pand, pand);
    t.set_mnemonic(Mnemonic::Pandn, pandn);
    t.set_mnemonic(Mnemonic::Por, por);
    t.set_mnemonic(Mnemonic::Pxor, pxor);
    t.set_mnemonic(Mnemonic::Psllw, psllw);
    t.set_mnemonic(Mnemonic::Pslld, pslld);
    t.set_mnemonic(Mnemonic::Psllq, psllq);
    t.set_mnemonic(Mnemonic::Psrlw, psrlw);
    t.set_mnemonic(Mnemonic::Psrld, psrld);
    t.set_mnemonic(Mnemonic::Psrlq, psrlq);
    t.set_mnemonic(Mnemonic::Psraw, psraw);
    t.set_mnemonic(Mnemonic::Psrad, psrad);
    t.set_mnemonic(Mnemonic::Packsswb, packsswb);
    t.set_mnemonic(Mnemonic::Packssdw, packssdw);
    t.set_mnemonic(Mnemonic::Packuswb, packuswb);
    t.set_mnemonic(Mnemonic::Punpcklbw, punpcklbw);
    t.set_mnemonic(Mnemonic::Punpcklwd, punpcklwd);
    t.set_mnemonic(Mnemonic::Punpckldq, punpckldq);
    t.set_mnemonic(Mnemonic::Punpckhbw, punpckhbw);
    t.set_mnemonic(Mnemonic::Punpckhwd, punpckhwd);
    t.set_mnemonic(Mnemonic::Punpckhdq, punpckhdq);
    t.set_mnemonic(Mnemonic::Pavgb, pavgb);
    t.set_mnemonic(Mnemonic::Pavgw, pavgw);
    t.set_mnemonic(Mnemonic::Pmaxub, pmaxub);
    t.set_mnemonic(Mnemonic::Pminub, pminub);
    t.set_mnemonic(Mnemonic::Pmaxsw, pmaxsw);
    t.set_mnemonic(Mnemonic::Pminsw, pminsw);
    t.set_mnemonic(Mnemonic::Psadbw, psadbw);
    t.set_mnemonic(Mnemonic::Pshufw, pshufw);

    // SSSE3 (both encodings).
    t.set_mnemonic(Mnemonic::Pshufb, pshufb);
    t.set_mnemonic(Mnemonic::Palignr, palignr);
    t.set_mnemonic(Mnemonic::Pabsb, pabsb);
    t.set_mnemonic(Mnemonic::Pabsw, pabsw);
    t.set_mnemonic(Mnemonic::Pabsd, pabsd);
    t.set_mnemonic(Mnemonic::Phaddw, phaddw);
    t.set_mnemonic(Mnemonic::Phaddd, phaddd);
    t.set_mnemonic(Mnemonic::Phaddsw, phaddsw);
    t.set_mnemonic(Mnemonic::Phsubw, phsubw);
    t.set_mnemonic(Mnemonic::Phsubd, phsubd);
    t.set_mnemonic(Mnemonic::Phsubsw, phsubsw);
    t.set_mnemonic(Mnemonic::Pmaddubsw, pmaddubsw);
    t.set_mnemonic(Mnemonic::Pmulhrsw, pmulhrsw);
    t.set_mnemonic(Mnemonic::Psignb, psignb);
    t.set_mnemonic(Mnemonic::Psignw, psignw);
    t.set_mnemonic(Mnemonic::Psignd, psignd);
}

// ---- lane helpers -------------------------------------------------------------

/// Apply `f` lane by lane (`W`-byte lanes) over the low `n` bytes of `a`
/// and `b`; lanes are passed zero-extended and the result is truncated.
/// Works on 64-bit halves to keep the shifts cheap.
#[inline(always)]
fn map2<const W: usize>(a: u128, b: u128, n: usize, f: impl Fn(u64, u64) -> u64) -> u128 {
    let m: u64 = if W >= 8 {
        u64::MAX
    } else {
        (1u64 << (W * 8)) - 1
    };
    let half = |x: u64, y: u64| {
        let mut r = 0u64;
        for i in 0..8 / W {
            let sh = i * W * 8;
            r |= (f((x >> sh) & m, (y >> sh) & m) & m) << sh;
        }
        r
    };
    let lo = half(a as u64, b as u64);
    let hi = if n > 8 {
        half((a >> 64) as u64, (b >> 64) as u64)
    } else {
        0
    };
    u128::from(lo) | (u128::from(hi) << 64)
}

/// Sign-extend a `W`-byte lane.
#[inline(always)]
fn sx<const W: usize>(x: u64) -> i64 {
    let sh = 64 - 8 * W as u32;
    ((x << sh) as i64) >> sh
}

#[inline(always)]
fn sat_s<const W: usize>(v: i64) -> u64 {
    let bits = 8 * W as u32;
    let hi = (1i64 << (bits - 1)) - 1;
    let lo = -(1i64 << (bits - 1));
    v.clamp(lo, hi) as u64
}

#[inline(always)]
fn sat_u<const W: usize>(v: i64) -> u64 {
    let hi = (1i64 << (8 * W as u32)) - 1;
    v.clamp(0, hi) as u64
}

fn bytes(v: u128) -> [u8; 16] {
    v.to_le_bytes()
}

fn from_bytes(b: [u8; 16]) -> u128 {
    u128::from_le_bytes(b)
}

/// Keep the low `n` bytes.
#[inline(always)]
fn low(v: u128, n: usize) -> u128 {
    if n >= 16 {
        v
    } else {
        v & ((1u128 << (n * 8)) - 1)
    }
}

// ---- the generic handler ------------------------------------------------------------

/// A packed-integer operation: (destination, source, byte width, imm8).
type IntOp = fn(u128, u128, usize, u8) -> u128;

/// `dst = f(dst, src)` for an MMX or XMM destination.
#[inline(always)]
fn int_op(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn, f: IntOp) -> XResult<()> {
    let dst = d.i.op0_register();
    let imm = if d.i.op_count() == 3 {
        d.i.immediate8()
    } else {
        0
    };
    if dst.is_mm() {
        cpu.mmx_prepare()?;
        let b = cpu.vec_read(p, d, 1, false)?;
        let a = u128::from(cpu.mm_reg(dst));
        let r = f(a, b, 8, imm);
        cpu.mmx_switch();
        cpu.set_mm_reg(dst, r as u64);
    } else {
        cpu.check_sse()?;
        let b = cpu.vec_read(p, d, 1, true)?;
        let a = cpu.xmm_reg(dst);
        let r = f(a, b, 16, imm);
        cpu.set_xmm_reg(dst, r);
    }
    Ok(())
}

/// Define, per operation, the lane function `$k` and its handler `$name`.
macro_rules! int_ops {
    ($($name:ident, $k:ident = $f:expr;)*) => {
        $(
            const $k: IntOp = $f;
            fn $name(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
                int_op(cpu, p, d, $k)
            }
        )*
    };
}

int_ops! {
    paddb, PADDB = |a, b, n, _| map2::<1>(a, b, n, u64::wrapping_add);
    paddw, PADDW = |a, b, n, _| map2::<2>(a, b, n, u64::wrapping_add);
    paddd, PADDD = |a, b, n, _| map2::<4>(a, b, n, u64::wrapping_add);
    paddq, PADDQ = |a, b, n, _| map2::<8>(a, b, n, u64::wrapping_add);
    psubb, PSUBB = |a, b, n, _| map2::<1>(a, b, n, u64::wrapping_sub);
    psubw, PSUBW = |a, b, n, _| map2::<2>(a, b, n, u64::wrapping_sub);
    psubd, PSUBD = |a, b, n, _| map2::<4>(a, b, n, u64::wrapping_sub);
    psubq, PSUBQ = |a, b, n, _| map2::<8>(a, b, n, u64::wrapping_sub);
    paddsb, PADDSB = |a, b, n, _| map2::<1>(a, b, n, |x, y| sat_s::<1>(sx::<1>(x) + sx::<1>(y)));
    paddsw, PADDSW = |a, b, n, _| map2::<2>(a, b, n, |x, y| sat_s::<2>(sx::<2>(x) + sx::<2>(y)));
    paddusb, PADDUSB = |a, b, n, _| map2::<1>(a, b, n, |x, y| sat_u::<1>((x + y) as i64));
    paddusw, PADDUSW = |a, b, n, _| map2::<2>(a, b, n, |x, y| sat_u::<2>((x + y) as i64));
    psubsb, PSUBSB = |a, b, n, _| map2::<1>(a, b, n, |x, y| sat_s::<1>(sx::<1>(x) - sx::<1>(y)));
    psubsw, PSUBSW = |a, b, n, _| map2::<2>(a, b, n, |x, y| sat_s::<2>(sx::<2>(x) - sx::<2>(y)));
    psubusb, PSUBUSB = |a, b, n, _| map2::<1>(a, b, n, |x, y| x.saturating_sub(y));
    psubusw, PSUBUSW = |a, b, n, _| map2::<2>(a, b, n, |x, y| x.saturating_sub(y));
    pmullw, PMULLW = |a, b, n, _| map2::<2>(a, b, n, |x, y| x.wrapping_mul(y));
    pmulhw, PMULHW = |a, b, n, _| map2::<2>(a, b, n, |x, y| ((sx::<2>(x) * sx::<2>(y)) >> 16) as u64);
    pmulhuw, PMULHUW = |a, b, n, _| map2::<2>(a, b, n, |x, y| (x * y) >> 16);
    pmaddwd, PMADDWD = |a, b, n, _| map2::<4>(a, b, n, |x, y| {
        let lo = sx::<2>(x & 0xffff) * sx::<2>(y & 0xffff);
        let hi = sx::<2>(x >> 16) * sx::<2>(y >> 16);
        (lo as i32).wrapping_add(hi as i32) as u32 as u64
    });
    pmuludq, PMULUDQ = |a, b, n, _| map2::<8>(a, b, n, |x, y| (x & 0xffff_ffff) * (y & 0xffff_ffff));
    pcmpeqb, PCMPEQB = |a, b, n, _| map2::<1>(a, b, n, |x, y| if x == y { u64::MAX } else { 0 });
    pcmpeqw, PCMPEQW = |a, b, n, _| map2::<2>(a, b, n, |x, y| if x == y { u64::MAX } else { 0 });
    pcmpeqd, PCMPEQD = |a, b, n, _| map2::<4>(a, b, n, |x, y| if x == y { u64::MAX } else { 0 });
    pcmpgtb, PCMPGTB = |a, b, n, _| map2::<1>(a, b, n, |x, y| if sx::<1>(x) > sx::<1>(y) { u64::MAX } else { 0 });
    pcmpgtw, PCMPGTW = |a, b, n, _| map2::<2>(a, b, n, |x, y| if sx::<2>(x) > sx::<2>(y) { u64::MAX } else { 0 });
    pcmpgtd, PCMPGTD = |a, b, n, _| map2::<4>(a, b, n, |x, y| if sx::<4>(x) > sx::<4>(y) { u64::MAX } else { 0 });
    pand, PAND = |a, b, n, _| low(a & b, n);
    pandn, PANDN = |a, b, n, _| low(!a & b, n);
    por, POR = |a, b, n, _| low(a | b, n);
    pxor, PXOR = |a, b, n, _| low(a ^ b, n);
    psllw, PSLLW = |a, b, n, _| shift::<2, 0>(a, b, n);
    pslld, PSLLD = |a, b, n, _| shift::<4, 0>(a, b, n);
    psllq, PSLLQ = |a, b, n, _| shift::<8, 0>(a, b, n);
    psrlw, PSRLW = |a, b, n, _| shift::<2, 1>(a, b, n);
    psrld, PSRLD = |a, b, n, _| shift::<4, 1>(a, b, n);
    psrlq, PSRLQ = |a, b, n, _| shift::<8, 1>(a, b, n);
    psraw, PSRAW = |a, b, n, _| shift::<2, 2>(a, b, n);
    psrad, PSRAD = |a, b, n, _| shift::<4, 2>(a, b, n);
    packsswb, PACKSSWB = |a, b, n, _| pack::<2>(a, b, n, |x| sat_s::<1>(sx::<2>(x)));
    packssdw, PACKSSDW = |a, b, n, _| pack::<4>(a, b, n, |x| sat_s::<2>(sx::<4>(x)));
    packuswb, PACKUSWB = |a, b, n, _| pack::<2>(a, b, n, |x| sat_u::<1>(sx::<2>(x)));
    punpcklbw, PUNPCKLBW = |a, b, n, _| unpack::<1>(a, b, n, false);
    punpcklwd, PUNPCKLWD = |a, b, n, _| unpack::<2>(a, b, n, false);
    punpckldq, PUNPCKLDQ = |a, b, n, _| unpack::<4>(a, b, n, false);
    punpckhbw, PUNPCKHBW = |a, b, n, _| unpack::<1>(a, b, n, true);
    punpckhwd, PUNPCKHWD = |a, b, n, _| unpack::<2>(a, b, n, true);
    punpckhdq, PUNPCKHDQ = |a, b, n, _| unpack::<4>(a, b, n, true);
    pavgb, PAVGB = |a, b, n, _| map2::<1>(a, b, n, |x, y| (x + y + 1) >> 1);
    pavgw, PAVGW = |a, b, n, _| map2::<2>(a, b, n, |x, y| (x + y + 1) >> 1);
    pmaxub, PMAXUB = |a, b, n, _| map2::<1>(a, b, n, u64::max);
    pminub, PMINUB = |a, b, n, _| map2::<1>(a, b, n, u64::min);
    pmaxsw, PMAXSW = |a, b, n, _| map2::<2>(a, b, n, |x, y| if sx::<2>(x) > sx::<2>(y) { x } else { y });
    pminsw, PMINSW = |a, b, n, _| map2::<2>(a, b, n, |x, y| if sx::<2>(x) < sx::<2>(y) { x } else { y });
    psadbw, PSADBW = |a, b, n, _| map2::<8>(a, b, n, |x, y| {
        (0..8).map(|k| ((x >> (8 * k)) as u8).abs_diff((y >> (8 * k)) as u8) as u64).sum()
    });
    pshufw, PSHUFW = |_, b, _, imm| {
        let mut r = 0u128;
        for i in 0..4 {
            let s = usize::from((imm >> (2 * i)) & 3);
            r |= u128::from((b >> (16 * s)) as u16) << (16 * i);
        }
        r
    };
    pshufb, PSHUFB = |a, b, n, _| {
        let (x, y) = (bytes(a), bytes(b));
        let mut r = [0u8; 16];
        for i in 0..n {
            if y[i] & 0x80 == 0 {
                r[i] = x[usize::from(y[i]) & (n - 1)];
            }
        }
        from_bytes(r)
    };
    palignr, PALIGNR = |a, b, n, imm| {
        // (a:b) >> imm bytes, 2n-byte concatenation.
        let mut cat = [0u8; 32];
        cat[..n].copy_from_slice(&bytes(b)[..n]);
        cat[n..2 * n].copy_from_slice(&bytes(a)[..n]);
        let mut r = [0u8; 16];
        for (i, v) in r.iter_mut().enumerate().take(n) {
            let k = usize::from(imm) + i;
            if k < 2 * n {
                *v = cat[k];
            }
        }
        from_bytes(r)
    };
    pabsb, PABSB = |_, b, n, _| map2::<1>(b, 0, n, |x, _| sx::<1>(x).unsigned_abs());
    pabsw, PABSW = |_, b, n, _| map2::<2>(b, 0, n, |x, _| sx::<2>(x).unsigned_abs());
    pabsd, PABSD = |_, b, n, _| map2::<4>(b, 0, n, |x, _| sx::<4>(x).unsigned_abs());
    phaddw, PHADDW = |a, b, n, _| horiz::<2>(a, b, n, |x, y| x.wrapping_add(y));
    phaddd, PHADDD = |a, b, n, _| horiz::<4>(a, b, n, |x, y| x.wrapping_add(y));
    phaddsw, PHADDSW = |a, b, n, _| horiz::<2>(a, b, n, |x, y| sat_s::<2>(sx::<2>(x) + sx::<2>(y)));
    phsubw, PHSUBW = |a, b, n, _| horiz::<2>(a, b, n, |x, y| x.wrapping_sub(y));
    phsubd, PHSUBD = |a, b, n, _| horiz::<4>(a, b, n, |x, y| x.wrapping_sub(y));
    phsubsw, PHSUBSW = |a, b, n, _| horiz::<2>(a, b, n, |x, y| sat_s::<2>(sx::<2>(x) - sx::<2>(y)));
    pmaddubsw, PMADDUBSW = |a, b, n, _| map2::<2>(a, b, n, |x, y| {
        let lo = (x & 0xff) as i64 * sx::<1>(y & 0xff);
        let hi = ((x >> 8) & 0xff) as i64 * sx::<1>((y >> 8) & 0xff);
        sat_s::<2>(lo + hi)
    });
    pmulhrsw, PMULHRSW = |a, b, n, _| map2::<2>(a, b, n, |x, y| {
        ((((sx::<2>(x) * sx::<2>(y)) >> 14) + 1) >> 1) as u64
    });
    psignb, PSIGNB = |a, b, n, _| map2::<1>(a, b, n, sign::<1>);
    psignw, PSIGNW = |a, b, n, _| map2::<2>(a, b, n, sign::<2>);
    psignd, PSIGND = |a, b, n, _| map2::<4>(a, b, n, sign::<4>);
}

/// PSLL/PSRL/PSRA (KIND 0/1/2) of `W`-byte lanes by the count in the low
/// 64 bits of `b` (an immediate for the imm8 forms).
#[inline(always)]
fn shift<const W: usize, const KIND: u8>(a: u128, b: u128, n: usize) -> u128 {
    let count = b as u64;
    let bits = 8 * W as u64;
    map2::<W>(a, 0, n, |x, _| match KIND {
        0 => {
            if count >= bits {
                0
            } else {
                x << count
            }
        }
        1 => {
            if count >= bits {
                0
            } else {
                x >> count
            }
        }
        _ => (sx::<W>(x) >> count.min(bits - 1)) as u64,
    })
}

/// PACKSS/PACKUS: `W`-byte lanes of `a` then `b`, each narrowed by `f` to
/// W/2 bytes.
#[inline(always)]
fn pack<const W: usize>(a: u128, b: u128, n: usize, f: impl Fn(u64) -> u64) -> u128 {
    let half = W / 2;
    let per = n / W;
    let m: u64 = (1u64 << (8 * half)) - 1;
    let mut r = 0u128;
    for (k, src) in [a, b].into_iter().enumerate() {
        for i in 0..per {
            let x = (src >> (i * W * 8)) as u64 & ((1u64 << (8 * W)) - 1);
            let pos = (k * per + i) * half * 8;
            r |= u128::from(f(x) & m) << pos;
        }
    }
    r
}

/// PUNPCKL*/PUNPCKH*: interleave the low (or high) halves of `a` and `b`.
#[inline(always)]
fn unpack<const W: usize>(a: u128, b: u128, n: usize, high: bool) -> u128 {
    let per = n / W / 2;
    let base = if high { per } else { 0 };
    let m: u128 = if W >= 8 {
        u128::from(u64::MAX)
    } else {
        (1u128 << (8 * W)) - 1
    };
    let mut r = 0u128;
    for i in 0..per {
        let x = (a >> ((base + i) * W * 8)) & m;
        let y = (b >> ((base + i) * W * 8)) & m;
        r |= x << (2 * i * W * 8);
        r |= y << ((2 * i + 1) * W * 8);
    }
    r
}

/// PHADD*/PHSUB*: adjacent pairs of `a`, then of `b`.
#[inline(always)]
fn horiz<const W: usize>(a: u128, b: u128, n: usize, f: impl Fn(u64, u64) -> u64) -> u128 {
    let m: u64 = (1u64 << (8 * W)) - 1;
    let per = n / W / 2;
    let mut r = 0u128;
    for (k, src) in [a, b].into_iter().enumerate() {
        for i in 0..per {
            let x = (src >> (2 * i * W * 8)) as u64 & m;
            let y = (src >> ((2 * i + 1) * W * 8)) as u64 & m;
            r |= u128::from(f(x, y) & m) << ((k * per + i) * W * 8);
        }
    }
    r
}

/// PSIGN: negate, zero or keep `x` by the sign of `y`.
#[inline(always)]
fn sign<const W: usize>(x: u64, y: u64) -> u64 {
    let s = sx::<W>(y);
    if s < 0 {
        x.wrapping_neg()
    } else if s == 0 {
        0
    } else {
        x
    }
}

// ---- data movement and the rest ----------------------------------------------------

fn emms(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    cpu.mmx_prepare()?;
    // EMMS empties every tag and, as the processors do, sets TOP to 0.
    cpu.fpu.set_top(0);
    cpu.fpu.ftw = 0xffff;
    Ok(())
}

/// MOVD/MOVQ in every form: to and from MMX, XMM, GPRs and memory. Writes
/// to a vector register zero-extend; GPR writes use `set_reg` (32-bit
/// destinations zero-extend to 64).
fn movd_movq(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let mmx = uses_mm(d);
    if mmx && d.i.op0_kind() == OpKind::Memory {
        cpu.mmx_prepare_store()?;
    } else if mmx {
        cpu.mmx_prepare()?;
    } else {
        cpu.check_sse()?;
    }
    let size = op_bytes(d, 0).min(op_bytes(d, 1)).min(8);
    let src = cpu.vec_read(p, d, 1, false)?;
    let v = if size >= 8 {
        src as u64
    } else {
        src as u64 & ((1u64 << (8 * size)) - 1)
    };
    match d.i.op0_kind() {
        OpKind::Memory => cpu.vec_store(p, d, size, u128::from(v), false)?,
        OpKind::Register => {
            let r = d.i.op0_register();
            if r.is_mm() {
                cpu.set_mm_reg(r, v);
            } else if r.is_xmm() {
                cpu.set_xmm_reg(r, u128::from(v));
            } else {
                cpu.set_reg(r, v);
            }
        }
        _ => return Err(Exception::ud()),
    }
    if mmx {
        cpu.mmx_switch();
    }
    Ok(())
}

/// MOVNTQ m64, mm.
fn movntq(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.mmx_prepare_store()?;
    let v = cpu.mm_reg(d.i.op1_register());
    cpu.vec_store(p, d, 8, u128::from(v), false)?;
    cpu.mmx_switch();
    Ok(())
}

/// PMOVMSKB r32/r64, mm/xmm: the byte sign bits, zero-extended.
fn pmovmskb(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let src = d.i.op1_register();
    let (v, n) = if src.is_mm() {
        cpu.mmx_prepare()?;
        cpu.mmx_switch();
        (u128::from(cpu.mm_reg(src)), 8)
    } else {
        cpu.check_sse()?;
        (cpu.xmm_reg(src), 16)
    };
    let b = bytes(v);
    let mask = (0..n).fold(0u64, |m, i| m | (u64::from(b[i] >> 7) << i));
    cpu.set_reg(d.i.op0_register(), mask);
    Ok(())
}

/// PEXTRW r32/r64(/m16), mm/xmm, imm8.
fn pextrw(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let src = d.i.op1_register();
    let imm = usize::from(d.i.immediate8());
    let mmx = src.is_mm();
    let v = if mmx {
        cpu.mmx_prepare()?;
        (cpu.mm_reg(src) >> (16 * (imm & 3))) & 0xffff
    } else {
        cpu.check_sse()?;
        (cpu.xmm_reg(src) >> (16 * (imm & 7))) as u64 & 0xffff
    };
    match d.i.op0_kind() {
        OpKind::Memory => cpu.vec_store(p, d, 2, u128::from(v), false)?,
        _ => cpu.set_reg(d.i.op0_register(), v),
    }
    if mmx {
        cpu.mmx_switch();
    }
    Ok(())
}

/// PINSRW mm/xmm, r32/m16, imm8.
fn pinsrw(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let dst = d.i.op0_register();
    let imm = usize::from(d.i.immediate8());
    if dst.is_mm() {
        cpu.mmx_prepare()?;
    } else {
        cpu.check_sse()?;
    }
    let w = (cpu.vec_read(p, d, 1, false)? as u64) & 0xffff;
    if dst.is_mm() {
        let sh = 16 * (imm & 3);
        let v = (cpu.mm_reg(dst) & !(0xffff << sh)) | (w << sh);
        cpu.mmx_switch();
        cpu.set_mm_reg(dst, v);
    } else {
        let sh = 16 * (imm & 7);
        let v = (cpu.xmm_reg(dst) & !(0xffffu128 << sh)) | (u128::from(w) << sh);
        cpu.set_xmm_reg(dst, v);
    }
    Ok(())
}

/// MASKMOVQ mm1, mm2 / MASKMOVDQU xmm1, xmm2: store the bytes of operand 1
/// whose mask byte (operand 2) has its top bit set, at seg:rDI. Nothing is
/// accessed for an all-zero mask; otherwise the span of selected bytes is
/// checked before any byte is written.
fn maskmov(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let data_reg = d.i.op1_register();
    let mask_reg = d.i.op2_register();
    let mmx = data_reg.is_mm();
    let (data, mask, n) = if mmx {
        cpu.mmx_prepare()?;
        (
            u128::from(cpu.mm_reg(data_reg)),
            u128::from(cpu.mm_reg(mask_reg)),
            8,
        )
    } else {
        cpu.check_sse()?;
        (cpu.xmm_reg(data_reg), cpu.xmm_reg(mask_reg), 16)
    };
    let (db, mb) = (bytes(data), bytes(mask));
    let sel: Vec<usize> = (0..n).filter(|&i| mb[i] & 0x80 != 0).collect();
    if let (Some(&first), Some(&last)) = (sel.first(), sel.last()) {
        let di = cpu.gpr[crate::state::gpr::RDI] & d.amask;
        let seg = d.seg as usize;
        let start = di.wrapping_add(first as u64) & d.amask;
        let len = last - first + 1;
        let lin = cpu.linear(seg, start, len as u64, true)?;
        let user = cpu.user();
        cpu.probe_lin_write(p, lin, len, user)?;
        for &i in &sel {
            let off = di.wrapping_add(i as u64) & d.amask;
            cpu.write_mem(p, seg, off, 1, u64::from(db[i]))?;
        }
    }
    if mmx {
        cpu.mmx_switch();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::insn::sse::tests::{exec1, sse_on};
    use crate::insn::testutil::*;
    use crate::state::gpr::*;

    fn mm(c: &Cpu, i: usize) -> u64 {
        c.fpu.regs[i] as u64
    }

    fn set_mm(c: &mut Cpu, i: usize, v: u64) {
        c.fpu.regs[i] = u128::from(v);
    }

    #[test]
    fn lane_ops() {
        assert_eq!(
            PADDUSB(0xff10_u128, 0x0120, 8, 0),
            0xff30,
            "paddusb saturates"
        );
        // packuswb: words -1, 0x100, 0x7f, 0x80 | 0, 1, 2, 3
        let a = 0x0080_007f_0100_ffffu128;
        let b = 0x0003_0002_0001_0000u128;
        assert_eq!(PACKUSWB(a, b, 8, 0), 0x0302_0100_807f_ff00);
        // packsswb saturation both ways.
        let a = 0x8000_7fff_ff80_0080u128;
        assert_eq!(PACKSSWB(a, 0, 8, 0), 0x0000_0000_807f_807f);
        // psadbw
        let a = 0x0102_0304_0506_0708u128 | (0xffu128 << 64);
        let b = 0x0807_0605_0403_0201u128;
        assert_eq!(PSADBW(a, b, 16, 0), 32 | (0xffu128 << 64));
        // pmaddwd with the 0x8000 * 0x8000 * 2 wrap.
        assert_eq!(PMADDWD(0x8000_8000, 0x8000_8000, 8, 0), 0x8000_0000);
        // shifts: counts >= width clear (logical) or fill (arithmetic).
        assert_eq!(PSRLW(0x8000_0001, 16, 8, 0), 0);
        assert_eq!(PSRAW(0x8000_0001, 99, 8, 0), 0xffff_0000);
        assert_eq!(PSLLQ(1, 63, 8, 0), 1 << 63);
        // unpack
        assert_eq!(
            PUNPCKLBW(0x0403_0201, 0x0d0c_0b0a, 8, 0),
            0x0d04_0c03_0b02_0a01
        );
        assert_eq!(
            PUNPCKHDQ(0x2222_2222_1111_1111, 0x4444_4444_3333_3333, 8, 0),
            0x4444_4444_2222_2222
        );
        // palignr mm: (a:b) >> 3 bytes.
        assert_eq!(
            PALIGNR(0x1716_1514_1312_1110, 0x0706_0504_0302_0100, 8, 3),
            0x1211_1007_0605_0403
        );
        assert_eq!(PALIGNR(1, 2, 8, 16), 0);
        // pmulhrsw: 0x4000 * 0x4000 = 0.5 * 0.5 = 0.25 = 0x2000
        assert_eq!(PMULHRSW(0x4000, 0x4000, 8, 0), 0x2000);
        // pmaddubsw saturation: 255*127 + 255*127 > 32767
        assert_eq!(PMADDUBSW(0xffff, 0x7f7f, 8, 0), 0x7fff);
        // phaddsw saturation
        assert_eq!(PHADDSW(0x0001_7fff, 0, 8, 0), 0x7fff);
        // psignw
        assert_eq!(
            PSIGNW(0x0005_0005_0005, 0x8000_0000_0001, 8, 0),
            0xfffb_0000_0005
        );
        assert_eq!(PABSB(0, 0x0080_ff01, 8, 0), 0x0080_0101);
    }

    #[test]
    fn mmx_arith_and_state_transition() {
        // movq mm0, [0x2000] (0f 6f 04 25 00 20 00 00)
        // paddusb mm0, mm1 (0f dc c1) ; packuswb mm2, mm0 (0f 67 d0)
        // movd eax, mm0 (0f 7e c0) ; movq [0x2010], mm2 (0f 7f 14 25 10 20 00 00)
        let code = [
            0x0f, 0x6f, 0x04, 0x25, 0x00, 0x20, 0x00, 0x00, 0x0f, 0xdc, 0xc1, 0x0f, 0x67, 0xd0,
            0x0f, 0x7e, 0xc0, 0x0f, 0x7f, 0x14, 0x25, 0x10, 0x20, 0x00, 0x00,
        ];
        let c = run(Mode::Long64, &code, |c| {
            write_phys(c, 0x2000, &0x00f0_0001_7f80_ff10u64.to_le_bytes());
            set_mm(c, 1, 0x0020_0001_0101_0120);
            set_mm(c, 2, 0x00ff_0100_ff00_0001);
            c.fpu.set_top(5);
            c.set_gpr(RAX, u64::MAX);
        });
        assert_eq!(mm(&c, 0), 0x00ff_0002_8081_ff30);
        // Bits 79:64 of a written MMX register are all ones.
        assert_eq!(c.fpu.regs[0] >> 64, 0xffff);
        // mm2 words: 0x0001, 0xff00 (neg → 0), 0x0100 (→ 0xff), 0x00ff | mm0 words:
        // 0xff30 (neg), 0x8081 (neg), 0x0002, 0x00ff
        assert_eq!(mm(&c, 2), 0xff02_0000_ffff_0001);
        assert_eq!(read_phys(&c, 0x2010, 8), 0xff02_0000_ffff_0001);
        assert_eq!(c.gpr(RAX), 0x8081_ff30);
        assert_eq!(c.fpu.top(), 0);
        assert_eq!(c.fpu.ftw, 0);
    }

    #[test]
    fn emms_empties_tags() {
        // pxor mm3, mm3 (0f ef db) ; emms (0f 77)
        let c = run(Mode::Prot32, &[0x0f, 0xef, 0xdb, 0x0f, 0x77], |c| {
            c.fpu.set_top(3);
        });
        assert_eq!(c.fpu.ftw, 0xffff);
        assert_eq!(c.fpu.top(), 0);
        assert_eq!(c.fpu.regs[3], 0xffff << 64);
    }

    #[test]
    fn mmx_faults() {
        // paddb mm0, mm1 (0f fc c1) with CR0.TS → #NM, with CR0.EM → #UD.
        let (c, r) = exec1(Mode::Long64, &[0x0f, 0xfc, 0xc1], |c| {
            let mut s = c.state();
            s.sregs.cr0 |= crate::cpu::CR0_TS;
            c.set_state(&s);
            c.fpu.set_top(4);
        });
        assert_eq!(r, Err(Exception::nm()));
        assert_eq!(c.fpu.top(), 4);
        assert_eq!(c.fpu.ftw, 0xffff);
        let (_, r) = exec1(Mode::Long64, &[0x0f, 0xfc, 0xc1], |c| {
            let mut s = c.state();
            s.sregs.cr0 |= crate::cpu::CR0_EM;
            c.set_state(&s);
        });
        assert_eq!(r, Err(Exception::ud()));
        // Pending x87 exception with CR0.NE → #MF.
        let (_, r) = exec1(Mode::Long64, &[0x0f, 0xfc, 0xc1], |c| {
            let mut s = c.state();
            s.sregs.cr0 |= crate::cpu::CR0_NE;
            c.set_state(&s);
            c.fpu.fsw |= 0x81;
        });
        assert_eq!(r, Err(Exception::new(crate::exception::MF)));
        // SSE2 form without CR4.OSFXSR → #UD: paddb xmm0, xmm1 (66 0f fc c1)
        let (_, r) = exec1(Mode::Long64, &[0x66, 0x0f, 0xfc, 0xc1], |_| {});
        assert_eq!(r, Err(Exception::ud()));
    }

    #[test]
    fn a_faulting_mmx_load_leaves_x87_state_per_vendor() {
        // paddb mm0, [0x20_0000] (0f fc 04 25 00 00 20 00) with that 2 MiB
        // page not present and TOP = 4: #PF. Intel has already made the
        // x87 → MMX transition (TOP 0, tags valid), AMD has not.
        for (quirks, top, ftw) in [
            (crate::quirks::Quirks::INTEL, 0, 0),
            (crate::quirks::Quirks::AMD, 4, 0xffff),
        ] {
            let (c, r) = exec1(
                Mode::Long64,
                &[0x0f, 0xfc, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00],
                |c| {
                    c.set_quirks(quirks);
                    write_phys(c, PML4 + 0x2000 + 8, &0u64.to_le_bytes());
                    c.fpu.set_top(4);
                },
            );
            assert_eq!(r.map_err(|e| e.vector), Err(crate::exception::PF));
            assert_eq!((c.fpu.top(), c.fpu.ftw), (top, ftw), "{quirks:?}");
        }
    }

    #[test]
    fn a_faulting_mmx_store_leaves_x87_state_per_cpu() {
        // movq [0x20_0000], mm0 (0f 7f 04 25 00 00 20 00) and movntq (0f e7
        // ...) with that 2 MiB page not present and TOP = 4: #PF. Sapphire
        // Rapids has made the whole transition, Emerald Rapids has set TOP
        // to 0 but not the tags, AMD neither.
        let emr = crate::quirks::Quirks {
            mmx_switch_before_fault: false,
            mmx_store_tags_before_fault: false,
            ..crate::quirks::Quirks::INTEL
        };
        for op in [0x7f, 0xe7] {
            for (quirks, top, ftw) in [
                (crate::quirks::Quirks::INTEL, 0, 0),
                (emr, 0, 0xffff),
                (crate::quirks::Quirks::AMD, 4, 0xffff),
            ] {
                let (c, r) = exec1(
                    Mode::Long64,
                    &[0x0f, op, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00],
                    |c| {
                        c.set_quirks(quirks);
                        write_phys(c, PML4 + 0x2000 + 8, &0u64.to_le_bytes());
                        c.fpu.set_top(4);
                    },
                );
                assert_eq!(r.map_err(|e| e.vector), Err(crate::exception::PF));
                assert_eq!((c.fpu.top(), c.fpu.ftw), (top, ftw), "{op:#x} {quirks:?}");
            }
        }
    }

    #[test]
    fn sse2_integer_ops() {
        // pcmpeqb xmm0, [0x2000] (66 0f 74 04 25 00 20 00 00)
        // pmovmskb eax, xmm0 (66 0f d7 c0)
        // pminub xmm1, xmm2 (66 0f da ca) ; psubq xmm3, xmm4 (66 0f fb dc)
        let code = [
            0x66, 0x0f, 0x74, 0x04, 0x25, 0x00, 0x20, 0x00, 0x00, 0x66, 0x0f, 0xd7, 0xc0, 0x66,
            0x0f, 0xda, 0xca, 0x66, 0x0f, 0xfb, 0xdc,
        ];
        let c = run(Mode::Long64, &code, |c| {
            sse_on(c);
            c.fpu.xmm[0] = 0x6f6c_6c65_6800_7473_6574_2061_2073_6920u128;
            write_phys(
                c,
                0x2000,
                &0x0000_0000_0000_0000_0000_0000_0000_0020u128.to_le_bytes(),
            );
            c.fpu.xmm[1] = 0x10ff_0080;
            c.fpu.xmm[2] = 0x2001_00ff;
            c.fpu.xmm[3] = 5 | (1u128 << 64);
            c.fpu.xmm[4] = 7 | (1u128 << 64);
            c.set_gpr(RAX, u64::MAX);
        });
        // Equal bytes: 0 (0x20) and 10 (0x00).
        assert_eq!(c.gpr(RAX), 0b0000_0100_0000_0001);
        assert_eq!(c.fpu.xmm[1], 0x1001_0080);
        assert_eq!(c.fpu.xmm[3], 0xffff_ffff_ffff_fffe);
        // MMX state untouched by SSE2 integer ops.
        assert_eq!(c.fpu.ftw, 0xffff);
    }

    #[test]
    fn pshufb_xmm_and_mm() {
        // pshufb xmm0, xmm1 (66 0f 38 00 c1) ; pshufb mm0, mm1 (0f 38 00 c1)
        let code = [0x66, 0x0f, 0x38, 0x00, 0xc1, 0x0f, 0x38, 0x00, 0xc1];
        let c = run(Mode::Long64, &code, |c| {
            sse_on(c);
            c.fpu.xmm[0] = 0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100;
            c.fpu.xmm[1] = 0x0001_0203_0405_0607_0809_0a0b_0c0d_8e1f;
            set_mm(c, 0, 0x0706_0504_0302_0100);
            set_mm(c, 1, 0x0f80_0102_0304_0506);
        });
        assert_eq!(c.fpu.xmm[0], 0x0001_0203_0405_0607_0809_0a0b_0c0d_000f);
        assert_eq!(mm(&c, 0), 0x0700_0102_0304_0506);
    }

    #[test]
    fn movd_movq_forms() {
        // movd xmm1, eax (66 0f 6e c8) ; movq rbx, xmm1 (66 48 0f 7e cb)
        // movq xmm2, xmm3 (f3 0f 7e d3) ; movd ecx, mm4 (0f 7e e1)
        // movq2dq xmm5, mm4 (f3 0f d6 ec) [sse.rs] ; movq [0x2000], xmm3 (66 0f d6 1c 25 00 20 00 00)
        let code = [
            0x66, 0x0f, 0x6e, 0xc8, 0x66, 0x48, 0x0f, 0x7e, 0xcb, 0xf3, 0x0f, 0x7e, 0xd3, 0x0f,
            0x7e, 0xe1, 0xf3, 0x0f, 0xd6, 0xec, 0x66, 0x0f, 0xd6, 0x1c, 0x25, 0x00, 0x20, 0x00,
            0x00,
        ];
        let c = run(Mode::Long64, &code, |c| {
            sse_on(c);
            c.set_gpr(RAX, 0xdead_beef_8765_4321);
            c.fpu.xmm[1] = u128::MAX;
            c.fpu.xmm[2] = u128::MAX;
            c.fpu.xmm[3] = 0x1111_2222_3333_4444_5555_6666_7777_8888;
            c.set_gpr(RCX, u64::MAX);
            set_mm(c, 4, 0xaaaa_bbbb_cccc_dddd);
        });
        assert_eq!(c.fpu.xmm[1], 0x8765_4321);
        assert_eq!(c.gpr(RBX), 0x8765_4321);
        assert_eq!(c.fpu.xmm[2], 0x5555_6666_7777_8888);
        assert_eq!(c.gpr(RCX), 0xcccc_dddd);
        assert_eq!(c.fpu.xmm[5], 0xaaaa_bbbb_cccc_dddd);
        assert_eq!(read_phys(&c, 0x2000, 8), 0x5555_6666_7777_8888);
        assert_eq!(c.fpu.ftw, 0);
    }

    #[test]
    fn pextrw_pinsrw_pshufw_maskmovq() {
        // pinsrw xmm0, eax, 5 (66 0f c4 c0 05) ; pextrw ebx, xmm0, 5 (66 0f c5 d8 05)
        // pshufw mm1, mm0, 0x1b (0f 70 c8 1b) ; maskmovq mm1, mm2 (0f f7 ca) at rdi
        let code = [
            0x66, 0x0f, 0xc4, 0xc0, 0x05, 0x66, 0x0f, 0xc5, 0xd8, 0x05, 0x0f, 0x70, 0xc8, 0x1b,
            0x0f, 0xf7, 0xca,
        ];
        let c = run(Mode::Long64, &code, |c| {
            sse_on(c);
            c.set_gpr(RAX, 0x1234_beef);
            set_mm(c, 0, 0x4444_3333_2222_1111);
            set_mm(c, 2, 0x8000_0000_0000_80ff);
            c.set_gpr(RDI, 0x2000);
            write_phys(c, 0x2000, &[0x55; 8]);
        });
        assert_eq!(c.fpu.xmm[0], 0xbeefu128 << 80);
        assert_eq!(c.gpr(RBX), 0xbeef);
        assert_eq!(mm(&c, 1), 0x1111_2222_3333_4444);
        assert_eq!(read_phys(&c, 0x2000, 8), 0x1155_5555_5555_4444);
    }

    #[test]
    fn mmx_shifts_and_multiplies() {
        // psllw mm0, 4 (0f 71 f0 04) ; psrad mm1, mm2 (0f e2 ca)
        // psrlq mm3, [0x2000] (0f d3 1c 25 00 20 00 00) ; pmulhw mm4, mm5 (0f e5 e5)
        // pmuludq mm6, mm7 (0f f4 f7) ; pavgb mm5, mm5 (0f e0 ed)
        let code = [
            0x0f, 0x71, 0xf0, 0x04, 0x0f, 0xe2, 0xca, 0x0f, 0xd3, 0x1c, 0x25, 0x00, 0x20, 0x00,
            0x00, 0x0f, 0xe5, 0xe5, 0x0f, 0xf4, 0xf7, 0x0f, 0xe0, 0xed,
        ];
        let c = run(Mode::Long64, &code, |c| {
            set_mm(c, 0, 0x1234_8001_0fff_0001);
            set_mm(c, 1, 0x8000_0000_7fff_ffff);
            set_mm(c, 2, 31);
            set_mm(c, 3, 0x8000_0000_0000_0000);
            write_phys(c, 0x2000, &63u64.to_le_bytes());
            set_mm(c, 4, 0x8000_7fff_0002_ffff);
            set_mm(c, 5, 0x8000_7fff_8000_0003);
            set_mm(c, 6, 0xffff_ffff_ffff_ffff);
            set_mm(c, 7, 0x0000_0000_ffff_ffff);
        });
        assert_eq!(mm(&c, 0), 0x2340_0010_fff0_0010);
        assert_eq!(mm(&c, 1), 0xffff_ffff_0000_0000);
        assert_eq!(mm(&c, 3), 1);
        // 0x8000*0x8000 = 2^30 -> 0x4000; 0x7fff^2 -> 0x3fff; 2*-32768 -> -1; -1*3 -> -1
        assert_eq!(mm(&c, 4), 0x4000_3fff_ffff_ffff);
        assert_eq!(mm(&c, 6), 0xffff_fffe_0000_0001);
        assert_eq!(mm(&c, 5), 0x8000_7fff_8000_0003);
    }

    #[test]
    fn ssse3_xmm_forms() {
        // palignr xmm0, xmm1, 5 (66 0f 3a 0f c1 05) ; phaddw xmm2, xmm3 (66 0f 38 01 d3)
        // pabsd xmm4, xmm5 (66 0f 38 1e e5) ; psignb xmm6, xmm7 (66 0f 38 08 f7)
        let code = [
            0x66, 0x0f, 0x3a, 0x0f, 0xc1, 0x05, 0x66, 0x0f, 0x38, 0x01, 0xd3, 0x66, 0x0f, 0x38,
            0x1e, 0xe5, 0x66, 0x0f, 0x38, 0x08, 0xf7,
        ];
        let c = run(Mode::Long64, &code, |c| {
            sse_on(c);
            c.fpu.xmm[0] = 0x1f1e_1d1c_1b1a_1918_1716_1514_1312_1110;
            c.fpu.xmm[1] = 0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100;
            c.fpu.xmm[2] = 0x0008_0007_0006_0005_0004_0003_0002_0001;
            c.fpu.xmm[3] = 0xffff_0001_7fff_0001_0000_0000_0010_0020;
            c.fpu.xmm[5] = 0x8000_0000_ffff_ffff_0000_0005_ffff_fffb;
            c.fpu.xmm[6] = 0x0101_0101_0101_0101_0101_0101_0101_0101;
            c.fpu.xmm[7] = 0x0000_0000_0000_0000_0000_0000_0000_ff01;
        });
        assert_eq!(c.fpu.xmm[0], 0x1413_1211_100f_0e0d_0c0b_0a09_0807_0605);
        assert_eq!(c.fpu.xmm[2], 0x0000_8000_0000_0030_000f_000b_0007_0003);
        assert_eq!(c.fpu.xmm[4], 0x8000_0000_0000_0001_0000_0005_0000_0005);
        assert_eq!(c.fpu.xmm[6], 0xff01);
    }

    #[test]
    fn psadbw_packuswb_32bit_mode() {
        // psadbw xmm0, [0x2000] (66 0f f6 05 00 20 00 00)
        // packuswb xmm1, xmm2 (66 0f 67 ca)
        // psadbw mm0, [0x2010] (0f f6 05 10 20 00 00) -- misaligned m64 is fine
        // pmaddwd xmm3, [0x2001] (66 0f f5 1d 01 20 00 00) -- misaligned m128: #GP
        let code = [
            0x66, 0x0f, 0xf6, 0x05, 0x00, 0x20, 0x00, 0x00, 0x66, 0x0f, 0x67, 0xca, 0x0f, 0xf6,
            0x05, 0x10, 0x20, 0x00, 0x00,
        ];
        let c = run(Mode::Prot32, &code, |c| {
            sse_on(c);
            c.fpu.xmm[0] = 0xff00_ff00_ff00_ff00_0102_0304_0506_0708;
            write_phys(
                c,
                0x2000,
                &0x00ff_00ff_00ff_00ff_0807_0605_0403_0201u128.to_le_bytes(),
            );
            c.fpu.xmm[1] = 0x7fff_8000_0100_00ff_0080_007f_0001_0000;
            c.fpu.xmm[2] = 0xffff_ff7f_0000_0001_0002_0003_0004_0005;
            set_mm(c, 0, 0x0000_0000_0000_00ff);
            write_phys(c, 0x2010, &0x0000_0000_0000_0100u64.to_le_bytes());
        });
        assert_eq!(c.fpu.xmm[0], (0x7f8u128 << 64) | 32);
        assert_eq!(c.fpu.xmm[1], 0x0000_0001_0203_0405_ff00_ffff_807f_0100);
        assert_eq!(mm(&c, 0), 0xff + 1);
        let (_, r) = exec1(
            Mode::Prot32,
            &[0x66, 0x0f, 0xf5, 0x1d, 0x01, 0x20, 0x00, 0x00],
            sse_on,
        );
        assert_eq!(r, Err(Exception::gp0()));
    }
}
