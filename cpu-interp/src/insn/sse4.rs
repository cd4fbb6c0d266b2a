//! SSE4.1 and SSE4.2 (the x86-64-v2 additions beyond SSSE3): blends,
//! dot products, ROUND*, inserts/extracts, MPSADBW, PHMINPOSUW, the new
//! packed min/max/multiply/compare forms, PMOVSX/PMOVZX, PTEST,
//! MOVNTDQA, CRC32, PCMPGTQ and the string comparisons
//! PCMPESTRI/PCMPESTRM/PCMPISTRI/PCMPISTRM.
//!
//! The lane arithmetic is kept in plain functions over 128-bit values
//! (`a` the first source — the destination in the legacy encoding —,
//! `b` the second, `imm` the immediate) so that the VEX forms (`avx.rs`)
//! apply the same functions per 128-bit lane.

use iced_x86::{Code, Mnemonic, OpKind};

use super::simd::{lane, set_lane};
use super::simd_fp::{self as sf, Env, Fmt, F32, F64};
use crate::block::Insn;
use crate::cpu::Cpu;
use crate::dispatch::Table;
use crate::exception::XResult;
use crate::flags;
use crate::platform::Platform;

/// A lane operation: `(a, b, imm) -> result`.
pub type LaneOp = fn(u128, u128, u8) -> u128;
/// A lane operation with MXCSR semantics.
pub type FpLaneOp = fn(&mut Env, u128, u128, u8) -> u128;

pub fn register(t: &mut Table) {
    // Integer lane operations, legacy two-operand form.
    for (m, _) in INT_OPS {
        t.set_mnemonic(*m, legacy_int);
    }
    t.set_mnemonic(Mnemonic::Blendvps, legacy_blendv);
    t.set_mnemonic(Mnemonic::Blendvpd, legacy_blendv);
    t.set_mnemonic(Mnemonic::Pblendvb, legacy_blendv);
    t.set_mnemonic(Mnemonic::Dpps, legacy_fp);
    t.set_mnemonic(Mnemonic::Dppd, legacy_fp);
    t.set_mnemonic(Mnemonic::Roundps, legacy_fp);
    t.set_mnemonic(Mnemonic::Roundpd, legacy_fp);
    t.set_mnemonic(Mnemonic::Roundss, legacy_fp);
    t.set_mnemonic(Mnemonic::Roundsd, legacy_fp);
    for m in [
        Mnemonic::Pmovsxbw,
        Mnemonic::Pmovsxbd,
        Mnemonic::Pmovsxbq,
        Mnemonic::Pmovsxwd,
        Mnemonic::Pmovsxwq,
        Mnemonic::Pmovsxdq,
        Mnemonic::Pmovzxbw,
        Mnemonic::Pmovzxbd,
        Mnemonic::Pmovzxbq,
        Mnemonic::Pmovzxwd,
        Mnemonic::Pmovzxwq,
        Mnemonic::Pmovzxdq,
    ] {
        t.set_mnemonic(m, legacy_pmovx);
    }
    t.set_mnemonic(Mnemonic::Ptest, legacy_ptest);
    t.set_mnemonic(Mnemonic::Movntdqa, legacy_movntdqa);
    t.set_mnemonic(Mnemonic::Extractps, legacy_extract);
    t.set_mnemonic(Mnemonic::Pextrb, legacy_extract);
    t.set_mnemonic(Mnemonic::Pextrd, legacy_extract);
    t.set_mnemonic(Mnemonic::Pextrq, legacy_extract);
    t.set(Code::Pextrw_r32m16_xmm_imm8, legacy_extract);
    t.set(Code::Pextrw_r64m16_xmm_imm8, legacy_extract);
    t.set_mnemonic(Mnemonic::Insertps, legacy_insert);
    t.set_mnemonic(Mnemonic::Pinsrb, legacy_insert);
    t.set_mnemonic(Mnemonic::Pinsrd, legacy_insert);
    t.set_mnemonic(Mnemonic::Pinsrq, legacy_insert);
    t.set_mnemonic(Mnemonic::Crc32, crc32);
    t.set_mnemonic(Mnemonic::Pcmpestri, legacy_pcmpstr);
    t.set_mnemonic(Mnemonic::Pcmpestri64, legacy_pcmpstr);
    t.set_mnemonic(Mnemonic::Pcmpestrm, legacy_pcmpstr);
    t.set_mnemonic(Mnemonic::Pcmpestrm64, legacy_pcmpstr);
    t.set_mnemonic(Mnemonic::Pcmpistri, legacy_pcmpstr);
    t.set_mnemonic(Mnemonic::Pcmpistrm, legacy_pcmpstr);
}

// ---- integer lane operations --------------------------------------------------

/// Apply `f` to each `W`-byte lane pair (lanes zero-extended).
#[inline(always)]
pub(crate) fn map<const W: usize>(a: u128, b: u128, f: impl Fn(u64, u64) -> u64) -> u128 {
    (0..16 / W).fold(0u128, |r, i| {
        set_lane(r, i, W, f(lane(a, i, W), lane(b, i, W)))
    })
}

/// Sign-extend a `W`-byte value.
#[inline(always)]
pub(crate) fn sx<const W: usize>(x: u64) -> i64 {
    let sh = 64 - 8 * W as u32;
    ((x << sh) as i64) >> sh
}

fn ones(c: bool) -> u64 {
    if c {
        u64::MAX
    } else {
        0
    }
}

pub fn blendps(a: u128, b: u128, imm: u8) -> u128 {
    (0..4).fold(a, |r, i| {
        if imm & (1 << i) != 0 {
            set_lane(r, i, 4, lane(b, i, 4))
        } else {
            r
        }
    })
}

pub fn blendpd(a: u128, b: u128, imm: u8) -> u128 {
    (0..2).fold(a, |r, i| {
        if imm & (1 << i) != 0 {
            set_lane(r, i, 8, lane(b, i, 8))
        } else {
            r
        }
    })
}

pub fn pblendw(a: u128, b: u128, imm: u8) -> u128 {
    (0..8).fold(a, |r, i| {
        if imm & (1 << i) != 0 {
            set_lane(r, i, 2, lane(b, i, 2))
        } else {
            r
        }
    })
}

/// BLENDVPS/BLENDVPD/PBLENDVB: `W`-byte lanes of `b` where the mask
/// lane's sign bit is set.
pub fn blendv<const W: usize>(a: u128, b: u128, mask: u128) -> u128 {
    (0..16 / W).fold(a, |r, i| {
        if lane(mask, i, W) >> (8 * W - 1) & 1 != 0 {
            set_lane(r, i, W, lane(b, i, W))
        } else {
            r
        }
    })
}

pub fn mpsadbw(a: u128, b: u128, imm: u8) -> u128 {
    let (x, y) = (a.to_le_bytes(), b.to_le_bytes());
    let src = 4 * usize::from(imm & 3);
    let dst = 4 * usize::from((imm >> 2) & 1);
    (0..8).fold(0u128, |r, i| {
        let s: u64 = (0..4)
            .map(|k| u64::from(x[dst + i + k].abs_diff(y[src + k])))
            .sum();
        set_lane(r, i, 2, s)
    })
}

pub fn packusdw(a: u128, b: u128, _: u8) -> u128 {
    let sat = |x: u64| (sx::<4>(x)).clamp(0, 0xffff) as u64;
    let mut r = 0u128;
    for i in 0..4 {
        r = set_lane(r, i, 2, sat(lane(a, i, 4)));
        r = set_lane(r, 4 + i, 2, sat(lane(b, i, 4)));
    }
    r
}

pub fn phminposuw(_: u128, b: u128, _: u8) -> u128 {
    let (idx, min) = (0..8)
        .map(|i| (i, lane(b, i, 2)))
        .fold(
            (0, u64::MAX),
            |acc, (i, v)| if v < acc.1 { (i, v) } else { acc },
        );
    u128::from(min) | ((idx as u128) << 16)
}

pub fn pmuldq(a: u128, b: u128, _: u8) -> u128 {
    let m = |i| (sx::<4>(lane(a, i, 4)) * sx::<4>(lane(b, i, 4))) as u64;
    u128::from(m(0)) | (u128::from(m(2)) << 64)
}

pub fn pmulld(a: u128, b: u128, _: u8) -> u128 {
    map::<4>(a, b, |x, y| x.wrapping_mul(y))
}

pub fn pcmpeqq(a: u128, b: u128, _: u8) -> u128 {
    map::<8>(a, b, |x, y| ones(x == y))
}

pub fn pcmpgtq(a: u128, b: u128, _: u8) -> u128 {
    map::<8>(a, b, |x, y| ones((x as i64) > (y as i64)))
}

macro_rules! minmax {
    ($($name:ident: $w:literal, $signed:expr, $max:expr;)*) => {
        $(
            pub fn $name(a: u128, b: u128, _: u8) -> u128 {
                map::<$w>(a, b, |x, y| {
                    let gt = if $signed { sx::<$w>(x) > sx::<$w>(y) } else { x > y };
                    if gt == $max { x } else { y }
                })
            }
        )*
    };
}

minmax! {
    pmaxsb: 1, true, true;
    pmaxsd: 4, true, true;
    pmaxuw: 2, false, true;
    pmaxud: 4, false, true;
    pminsb: 1, true, false;
    pminsd: 4, true, false;
    pminuw: 2, false, false;
    pminud: 4, false, false;
}

/// PMOVSX/PMOVZX: widen the low lanes of `b` from `FROM` to `TO` bytes.
pub fn pmovx<const FROM: usize, const TO: usize, const SIGNED: bool>(b: u128) -> u128 {
    (0..16 / TO).fold(0u128, |r, i| {
        let x = lane(b, i, FROM);
        let v = if SIGNED { (sx::<FROM>(x)) as u64 } else { x };
        set_lane(r, i, TO, v)
    })
}

/// The integer lane operations of SSE4.1/4.2 with a two-operand legacy
/// form `dst = f(dst, src, imm)`.
pub const INT_OPS: &[(Mnemonic, LaneOp)] = &[
    (Mnemonic::Blendps, blendps),
    (Mnemonic::Blendpd, blendpd),
    (Mnemonic::Pblendw, pblendw),
    (Mnemonic::Mpsadbw, mpsadbw),
    (Mnemonic::Packusdw, packusdw),
    (Mnemonic::Phminposuw, phminposuw),
    (Mnemonic::Pmuldq, pmuldq),
    (Mnemonic::Pmulld, pmulld),
    (Mnemonic::Pcmpeqq, pcmpeqq),
    (Mnemonic::Pcmpgtq, pcmpgtq),
    (Mnemonic::Pmaxsb, pmaxsb),
    (Mnemonic::Pmaxsd, pmaxsd),
    (Mnemonic::Pmaxuw, pmaxuw),
    (Mnemonic::Pmaxud, pmaxud),
    (Mnemonic::Pminsb, pminsb),
    (Mnemonic::Pminsd, pminsd),
    (Mnemonic::Pminuw, pminuw),
    (Mnemonic::Pminud, pminud),
];

/// The lane operation of an SSE4 integer mnemonic.
pub fn int_op(m: Mnemonic) -> Option<LaneOp> {
    INT_OPS.iter().find(|e| e.0 == m).map(|e| e.1)
}

fn legacy_int(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let Some(f) = int_op(d.i.mnemonic()) else {
        return Err(crate::exception::Exception::ud());
    };
    cpu.check_sse()?;
    let imm = if d.i.op_count() == 3 {
        d.i.immediate8()
    } else {
        0
    };
    let b = cpu.vec_read(p, d, 1, true)?;
    let dst = d.i.op0_register();
    let r = f(cpu.xmm_reg(dst), b, imm);
    cpu.set_xmm_reg(dst, r);
    Ok(())
}

/// BLENDVPS/BLENDVPD/PBLENDVB xmm1, xmm2/m128, <XMM0>.
fn legacy_blendv(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let b = cpu.vec_read(p, d, 1, true)?;
    let dst = d.i.op0_register();
    let a = cpu.xmm_reg(dst);
    let mask = cpu.fpu.xmm[0];
    let r = match d.i.mnemonic() {
        Mnemonic::Blendvps => blendv::<4>(a, b, mask),
        Mnemonic::Blendvpd => blendv::<8>(a, b, mask),
        _ => blendv::<1>(a, b, mask),
    };
    cpu.set_xmm_reg(dst, r);
    Ok(())
}

/// (source, destination) element widths of a PMOVSX/PMOVZX mnemonic.
pub fn pmovx_widths(m: Mnemonic) -> (usize, usize) {
    use Mnemonic::*;
    match m {
        Pmovsxbw | Pmovzxbw | Vpmovsxbw | Vpmovzxbw => (1, 2),
        Pmovsxbd | Pmovzxbd | Vpmovsxbd | Vpmovzxbd => (1, 4),
        Pmovsxbq | Pmovzxbq | Vpmovsxbq | Vpmovzxbq => (1, 8),
        Pmovsxwd | Pmovzxwd | Vpmovsxwd | Vpmovzxwd => (2, 4),
        Pmovsxwq | Pmovzxwq | Vpmovsxwq | Vpmovzxwq => (2, 8),
        _ => (4, 8),
    }
}

/// PMOVSX*/PMOVZX* xmm, xmm/m(16|32|64).
pub fn pmovx_op(m: Mnemonic) -> fn(u128) -> u128 {
    match m {
        Mnemonic::Pmovsxbw | Mnemonic::Vpmovsxbw => pmovx::<1, 2, true>,
        Mnemonic::Pmovsxbd | Mnemonic::Vpmovsxbd => pmovx::<1, 4, true>,
        Mnemonic::Pmovsxbq | Mnemonic::Vpmovsxbq => pmovx::<1, 8, true>,
        Mnemonic::Pmovsxwd | Mnemonic::Vpmovsxwd => pmovx::<2, 4, true>,
        Mnemonic::Pmovsxwq | Mnemonic::Vpmovsxwq => pmovx::<2, 8, true>,
        Mnemonic::Pmovsxdq | Mnemonic::Vpmovsxdq => pmovx::<4, 8, true>,
        Mnemonic::Pmovzxbw | Mnemonic::Vpmovzxbw => pmovx::<1, 2, false>,
        Mnemonic::Pmovzxbd | Mnemonic::Vpmovzxbd => pmovx::<1, 4, false>,
        Mnemonic::Pmovzxbq | Mnemonic::Vpmovzxbq => pmovx::<1, 8, false>,
        Mnemonic::Pmovzxwd | Mnemonic::Vpmovzxwd => pmovx::<2, 4, false>,
        Mnemonic::Pmovzxwq | Mnemonic::Vpmovzxwq => pmovx::<2, 8, false>,
        _ => pmovx::<4, 8, false>,
    }
}

fn legacy_pmovx(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let b = cpu.vec_read(p, d, 1, true)?;
    let r = pmovx_op(d.i.mnemonic())(b);
    cpu.set_xmm_reg(d.i.op0_register(), r);
    Ok(())
}

/// PTEST/VPTEST flags: ZF = (a AND b) == 0, CF = (NOT a AND b) == 0, the
/// other arithmetic flags cleared.
pub fn ptest_flags(and_zero: bool, andn_zero: bool) -> u64 {
    (if and_zero { flags::ZF } else { 0 }) | (if andn_zero { flags::CF } else { 0 })
}

fn legacy_ptest(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let b = cpu.vec_read(p, d, 1, true)?;
    let a = cpu.xmm_reg(d.i.op0_register());
    cpu.flags.set_arith(ptest_flags(a & b == 0, !a & b == 0));
    Ok(())
}

fn legacy_movntdqa(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let v = cpu.vec_read(p, d, 1, true)?;
    cpu.set_xmm_reg(d.i.op0_register(), v);
    Ok(())
}

/// EXTRACTPS / PEXTRB / PEXTRW / PEXTRD / PEXTRQ r/m, xmm, imm8: the lane
/// (its index taken modulo the lane count) to a register (zero-extended)
/// or to memory.
pub fn extract_lane(m: Mnemonic, v: u128, imm: u8) -> (u64, usize) {
    let w = match m {
        Mnemonic::Pextrb | Mnemonic::Vpextrb => 1,
        Mnemonic::Pextrw | Mnemonic::Vpextrw => 2,
        Mnemonic::Pextrq | Mnemonic::Vpextrq => 8,
        _ => 4,
    };
    (lane(v, usize::from(imm) % (16 / w), w), w)
}

fn legacy_extract(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let v = cpu.xmm_reg(d.i.op1_register());
    let (x, w) = extract_lane(d.i.mnemonic(), v, d.i.immediate8());
    match d.i.op0_kind() {
        OpKind::Memory => cpu.vec_store(p, d, w, u128::from(x), false),
        _ => {
            cpu.set_reg(d.i.op0_register(), x);
            Ok(())
        }
    }
}

/// INSERTPS: the dword `src` (already selected) into lane imm[5:4], then
/// zero the lanes of imm[3:0]; PINSRB/PINSRD/PINSRQ: `src` into lane imm.
pub fn insert_lane(m: Mnemonic, a: u128, src: u64, imm: u8) -> u128 {
    match m {
        Mnemonic::Insertps | Mnemonic::Vinsertps => {
            let r = set_lane(a, usize::from((imm >> 4) & 3), 4, src);
            (0..4).fold(r, |r, i| {
                if imm & (1 << i) != 0 {
                    set_lane(r, i, 4, 0)
                } else {
                    r
                }
            })
        }
        Mnemonic::Pinsrb | Mnemonic::Vpinsrb => set_lane(a, usize::from(imm & 15), 1, src),
        Mnemonic::Pinsrq | Mnemonic::Vpinsrq => set_lane(a, usize::from(imm & 1), 8, src),
        _ => set_lane(a, usize::from(imm & 3), 4, src),
    }
}

/// The value INSERTPS/PINSR* insert, from operand `n` (a register: its
/// low bits, or for INSERTPS the dword imm[7:6] of an XMM register;
/// memory: the operand).
pub fn insert_source(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn, n: u32) -> XResult<u64> {
    let m = d.i.mnemonic();
    let imm = d.i.immediate8();
    Ok(match d.i.op_kind(n) {
        OpKind::Register => {
            let r = d.i.op_register(n);
            if r.is_xmm() {
                lane(cpu.xmm_reg(r), usize::from(imm >> 6), 4)
            } else {
                cpu.reg(r)
            }
        }
        _ => {
            let size = d.i.memory_size().size();
            let _ = m;
            cpu.vec_load(p, d, size, false)? as u64
        }
    })
}

fn legacy_insert(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let src = insert_source(cpu, p, d, 1)?;
    let dst = d.i.op0_register();
    let r = insert_lane(d.i.mnemonic(), cpu.xmm_reg(dst), src, d.i.immediate8());
    cpu.set_xmm_reg(dst, r);
    Ok(())
}

// ---- floating point: DPPS/DPPD, ROUND* ------------------------------------------

/// DPPS (`T` = F32) / DPPD: the products selected by imm[7:4] (an
/// unselected product is +0.0 and raises nothing), summed pairwise —
/// (p0 + p1) + (p2 + p3) —, written to the lanes of imm[3:0] (others
/// +0.0). The processor sums in a different operand order for each
/// output lane, which shows only in which NaN propagates: lane j adds
/// the pair holding element j first, and within a pair element j (or its
/// neighbour) first — DPPD lane j: p_j + p_(1-j); DPPS lane j: the pairs
/// (p1 + p0 | p0 + p1 for even | odd j, likewise p3/p2), then the pair
/// of j's half first. The flags are those of one summation.
pub fn dp<T: Fmt>(e: &mut Env, a: u128, b: u128, imm: u8) -> u128 {
    dp_lanes::<T>(e, &[a], &[b], imm)[0]
}

/// DPPS/DPPD on every 128-bit lane of `a` and `b` (two for VDPPS ymm).
/// The processor works in steps, each over all lanes at once — the
/// products, then (DPPS) the pair sums, then the final sums — like
/// packed instructions of their own (hardware oracle, fixes 43 and 47):
/// an unmasked exception in a step ends the instruction with that step's
/// flags (only its IE/DE/ZE when one of those is unmasked); the masked
/// flags of the steps before stay in MXCSR, recorded in `e.mxcsr`, which
/// the callers OR into MXCSR. A 0 × ∞ product in the upper lane of a YMM
/// operand thus leaves the lower lane's inexact products unreported, and
/// an ∞ − ∞ summation in one lane keeps the inexact products of both.
pub fn dp_lanes<T: Fmt>(e: &mut Env, a: &[u128], b: &[u128], imm: u8) -> [u128; 2] {
    let w = T::BYTES;
    let n = 16 / w;
    let lanes = a.len().min(b.len()).min(2);
    let masks = (e.mxcsr >> 7) & 0x3f;
    // Runs one step; false when it faults. The flags of a faulting step,
    // and of the last one, go to `e.flags`; those of a step completed
    // before another are recorded as sticky.
    let step = |e: &mut Env, f: &mut dyn FnMut(&mut Env), last: bool| -> bool {
        let mut s = Env::new(e.mxcsr);
        f(&mut s);
        if last || s.flags & !masks & 0x3f != 0 {
            e.flags |= s.flags;
            s.flags & !masks & 0x3f == 0
        } else {
            e.mxcsr |= s.flags & 0x3f;
            true
        }
    };
    let mut p = [[0u64; 4]; 2];
    let mut products = |s: &mut Env| {
        for (l, pl) in p.iter_mut().enumerate().take(lanes) {
            for (i, pi) in pl.iter_mut().enumerate().take(n) {
                if imm & (0x10 << i) != 0 {
                    *pi = sf::mul::<T>(s, lane(a[l], i, w), lane(b[l], i, w));
                }
            }
        }
    };
    if !step(e, &mut products, false) {
        return [0, 0];
    }
    // The summation's flags (a denormal product is an input like any
    // other there: DE, or zero under DAZ).
    if n == 2 {
        let ok = step(
            e,
            &mut |s: &mut Env| {
                for pl in &p[..lanes] {
                    sf::add::<T>(s, pl[0], pl[1]);
                }
            },
            true,
        );
        if !ok {
            return [0, 0];
        }
    } else {
        let mut pairs = [[0u64; 2]; 2];
        let ok = step(
            e,
            &mut |s: &mut Env| {
                for (pl, pr) in p[..lanes].iter().zip(pairs.iter_mut()) {
                    *pr = [sf::add::<T>(s, pl[0], pl[1]), sf::add::<T>(s, pl[2], pl[3])];
                }
            },
            false,
        );
        let ok = ok
            && step(
                e,
                &mut |s: &mut Env| {
                    for pr in &pairs[..lanes] {
                        sf::add::<T>(s, pr[0], pr[1]);
                    }
                },
                true,
            );
        if !ok {
            return [0, 0];
        }
    }
    // The results, lane by lane in each output element's own order (their
    // flags are those recorded above).
    let mut x = Env::new(e.mxcsr);
    let sum = |x: &mut Env, p: &[u64; 4], j: usize| -> u64 {
        if n == 2 {
            sf::add::<T>(x, p[j], p[1 - j])
        } else {
            let even = j % 2 == 0;
            let lo = if even {
                sf::add::<T>(x, p[1], p[0])
            } else {
                sf::add::<T>(x, p[0], p[1])
            };
            let hi = if even {
                sf::add::<T>(x, p[3], p[2])
            } else {
                sf::add::<T>(x, p[2], p[3])
            };
            if j < 2 {
                sf::add::<T>(x, lo, hi)
            } else {
                sf::add::<T>(x, hi, lo)
            }
        }
    };
    let mut r = [0u128; 2];
    for (l, rl) in r.iter_mut().enumerate().take(lanes) {
        *rl = (0..n).fold(0u128, |acc, j| {
            if imm & (1 << j) != 0 {
                set_lane(acc, j, w, sum(&mut x, &p[l], j))
            } else {
                acc
            }
        });
    }
    r
}

/// ROUNDPS/ROUNDPD (`PACKED`) and ROUNDSS/ROUNDSD (lane 0 of `b` into `a`).
pub fn round<T: Fmt, const PACKED: bool>(e: &mut Env, a: u128, b: u128, imm: u8) -> u128 {
    let w = T::BYTES;
    let n = if PACKED { 16 / w } else { 1 };
    (0..n).fold(a, |r, i| {
        set_lane(r, i, w, sf::round_int::<T>(e, lane(b, i, w), imm))
    })
}

/// The MXCSR lane operation of an SSE4.1 floating-point mnemonic.
pub fn fp_op(m: Mnemonic) -> FpLaneOp {
    match m {
        Mnemonic::Dpps | Mnemonic::Vdpps => dp::<F32>,
        Mnemonic::Dppd | Mnemonic::Vdppd => dp::<F64>,
        Mnemonic::Roundps | Mnemonic::Vroundps => round::<F32, true>,
        Mnemonic::Roundpd | Mnemonic::Vroundpd => round::<F64, true>,
        Mnemonic::Roundss | Mnemonic::Vroundss => round::<F32, false>,
        _ => round::<F64, false>,
    }
}

fn legacy_fp(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let b = cpu.vec_read(p, d, 1, true)?;
    let dst = d.i.op0_register();
    let mut e = Env::new(cpu.fpu.mxcsr);
    let r = fp_op(d.i.mnemonic())(&mut e, cpu.xmm_reg(dst), b, d.i.immediate8());
    // Flags a first step recorded as its own (DPPS/DPPD's products).
    cpu.fpu.mxcsr |= e.mxcsr & 0x3f;
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_xmm_reg(dst, r);
    Ok(())
}

// ---- CRC32 ----------------------------------------------------------------------------

/// CRC-32C (Castagnoli, reflected polynomial 0x82f63b78) of the low
/// `bytes` bytes of `v`, continuing from `crc`.
pub fn crc32c(mut crc: u32, v: u64, bytes: usize) -> u32 {
    for k in 0..bytes {
        crc ^= u32::from((v >> (8 * k)) as u8);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    crc
}

/// CRC32 r32/r64, r/m8/16/32/64: the 32-bit result zero-extended.
fn crc32(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = match d.i.op1_kind() {
        OpKind::Register => d.i.op1_register().size(),
        _ => d.i.memory_size().size(),
    };
    let v = cpu.op_read(p, d, 1, size)?;
    let dst = d.i.op0_register();
    let crc = crc32c(cpu.reg(dst) as u32, v, size);
    cpu.set_gpr_sized(
        dst.full_register() as usize - iced_x86::Register::RAX as usize,
        8,
        u64::from(crc),
    );
    Ok(())
}

// ---- PCMPESTRI/PCMPESTRM/PCMPISTRI/PCMPISTRM -------------------------------------------

/// What a string comparison produces: IntRes2 and the arithmetic flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StrResult {
    pub intres2: u16,
    /// Elements per register: 16 (bytes) or 8 (words).
    pub n: usize,
    pub flags: u64,
}

/// Length of an implicit-length string: the index of its first zero
/// element (`n` when there is none).
pub fn implicit_len(v: u128, words: bool) -> usize {
    let (w, n) = if words { (2, 8) } else { (1, 16) };
    (0..n).find(|&i| lane(v, i, w) == 0).unwrap_or(n)
}

/// Length of an explicit-length string from EAX/EDX (RAX/RDX with
/// REX.W): the absolute value, saturated to the element count.
pub fn explicit_len(v: u64, wide: bool, words: bool) -> usize {
    let n = if words { 8 } else { 16 };
    let abs = if wide {
        (v as i64).unsigned_abs()
    } else {
        u64::from((v as i32).unsigned_abs())
    };
    abs.min(n as u64) as usize
}

/// The comparison of `a` (first operand, length `la`) and `b` (second,
/// length `lb`) under control byte `imm` (SDM vol. 2, 4.1).
pub fn pcmpstr(a: u128, b: u128, la: usize, lb: usize, imm: u8) -> StrResult {
    let words = imm & 1 != 0;
    let signed = imm & 2 != 0;
    let (w, n) = if words { (2, 8) } else { (1, 16) };
    let el = |v: u128, i: usize| -> i64 {
        let x = lane(v, i, w);
        if signed {
            if words {
                sx::<2>(x)
            } else {
                sx::<1>(x)
            }
        } else {
            x as i64
        }
    };
    let agg = (imm >> 2) & 3;
    // BoolRes with the overrides for invalid (beyond-length) elements.
    let boolres = |j: usize, i: usize| -> bool {
        let (av, bv) = (i < la, j < lb);
        match agg {
            // Equal any, ranges: any invalid element compares false.
            0 | 1 => {
                if !av || !bv {
                    return false;
                }
                if agg == 0 {
                    el(b, j) == el(a, i)
                } else if i & 1 == 0 {
                    el(b, j) >= el(a, i)
                } else {
                    el(b, j) <= el(a, i)
                }
            }
            // Equal each: both invalid → true, one invalid → false.
            2 => match (av, bv) {
                (false, false) => true,
                (true, true) => el(b, j) == el(a, i),
                _ => false,
            },
            // Equal ordered: invalid a → true, valid a and invalid b → false.
            _ => {
                if !av {
                    true
                } else if !bv {
                    false
                } else {
                    el(b, j) == el(a, i)
                }
            }
        }
    };
    let mut intres1 = 0u16;
    for j in 0..n {
        let hit = match agg {
            0 => (0..n).any(|i| boolres(j, i)),
            1 => (0..n / 2).any(|k| boolres(j, 2 * k) && boolres(j, 2 * k + 1)),
            2 => boolres(j, j),
            _ => (0..n - j).all(|i| boolres(j + i, i)),
        };
        if hit {
            intres1 |= 1 << j;
        }
    }
    let all: u16 = if n == 16 { 0xffff } else { 0xff };
    let intres2 = match (imm >> 4) & 3 {
        0 | 2 => intres1,
        1 => !intres1 & all,
        _ => {
            let valid: u16 = if lb >= 16 { 0xffff } else { (1u16 << lb) - 1 };
            (intres1 ^ valid) & all
        }
    };
    let mut f = 0;
    if intres2 != 0 {
        f |= flags::CF;
    }
    if lb < n {
        f |= flags::ZF;
    }
    if la < n {
        f |= flags::SF;
    }
    if intres2 & 1 != 0 {
        f |= flags::OF;
    }
    StrResult {
        intres2,
        n,
        flags: f,
    }
}

/// ECX of PCMPxSTRI: the least (imm[6] = 0) or most significant set bit
/// of IntRes2, or the element count when there is none.
pub fn str_index(r: &StrResult, imm: u8) -> u64 {
    if r.intres2 == 0 {
        r.n as u64
    } else if imm & 0x40 != 0 {
        15 - u64::from(r.intres2.leading_zeros())
    } else {
        u64::from(r.intres2.trailing_zeros())
    }
}

/// XMM0 of PCMPxSTRM: IntRes2 as a bit mask (imm[6] = 0) or expanded to
/// byte/word masks.
pub fn str_mask(r: &StrResult, imm: u8) -> u128 {
    if imm & 0x40 == 0 {
        u128::from(r.intres2)
    } else {
        let w = 16 / r.n;
        (0..r.n).fold(0u128, |acc, i| {
            if r.intres2 & (1 << i) != 0 {
                set_lane(acc, i, w, u64::MAX)
            } else {
                acc
            }
        })
    }
}

/// Run a PCMPxSTRx given its operands: `a` (register), `b` (register or
/// memory); sets ECX or XMM0 and the flags.
pub fn pcmpstr_exec(cpu: &mut Cpu, m: Mnemonic, a: u128, b: u128, imm: u8, vex: bool) {
    let words = imm & 1 != 0;
    let explicit = matches!(
        m,
        Mnemonic::Pcmpestri
            | Mnemonic::Pcmpestri64
            | Mnemonic::Pcmpestrm
            | Mnemonic::Pcmpestrm64
            | Mnemonic::Vpcmpestri
            | Mnemonic::Vpcmpestri64
            | Mnemonic::Vpcmpestrm
            | Mnemonic::Vpcmpestrm64
    );
    let wide = matches!(
        m,
        Mnemonic::Pcmpestri64
            | Mnemonic::Pcmpestrm64
            | Mnemonic::Vpcmpestri64
            | Mnemonic::Vpcmpestrm64
    );
    let (la, lb) = if explicit {
        (
            explicit_len(cpu.gpr[crate::state::gpr::RAX], wide, words),
            explicit_len(cpu.gpr[crate::state::gpr::RDX], wide, words),
        )
    } else {
        (implicit_len(a, words), implicit_len(b, words))
    };
    let r = pcmpstr(a, b, la, lb, imm);
    let index = matches!(
        m,
        Mnemonic::Pcmpestri
            | Mnemonic::Pcmpestri64
            | Mnemonic::Pcmpistri
            | Mnemonic::Vpcmpestri
            | Mnemonic::Vpcmpestri64
            | Mnemonic::Vpcmpistri
    );
    if index {
        cpu.gpr[crate::state::gpr::RCX] = str_index(&r, imm);
    } else if vex {
        cpu.set_vreg_index(0, [str_mask(&r, imm), 0], false);
    } else {
        cpu.fpu.xmm[0] = str_mask(&r, imm);
        cpu.xstate.xinuse |= super::xsave::SSE;
    }
    cpu.flags.set_arith(r.flags);
}

/// The legacy forms. The memory operand need not be aligned.
fn legacy_pcmpstr(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let b = cpu.vec_read(p, d, 1, false)?;
    let a = cpu.xmm_reg(d.i.op0_register());
    pcmpstr_exec(cpu, d.i.mnemonic(), a, b, d.i.immediate8(), false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(bytes: &[u8]) -> u128 {
        let mut b = [0u8; 16];
        b[..bytes.len()].copy_from_slice(bytes);
        u128::from_le_bytes(b)
    }

    #[test]
    fn crc32c_known_values() {
        // CRC-32C("123456789") = 0xe3069283 (init !0, final xor !0).
        let crc = b"123456789"
            .iter()
            .fold(!0u32, |c, &b| crc32c(c, u64::from(b), 1));
        assert_eq!(!crc, 0xe306_9283);
        // Eight bytes at once equal eight single bytes.
        let v = u64::from_le_bytes(*b"12345678");
        let one = b"12345678"
            .iter()
            .fold(7, |c, &b| crc32c(c, u64::from(b), 1));
        assert_eq!(crc32c(7, v, 8), one);
    }

    #[test]
    fn string_compare_modes() {
        // Equal any, unsigned bytes, least significant index: find 'l' or 'o'.
        let a = s(b"lo");
        let b = s(b"hello world");
        let r = pcmpstr(a, b, implicit_len(a, false), implicit_len(b, false), 0x00);
        assert_eq!(str_index(&r, 0x00), 2);
        assert_eq!(str_index(&r, 0x40), 9);
        assert_eq!(r.flags, flags::CF | flags::ZF | flags::SF);
        // Ranges: 'a'..'z'.
        let a = s(b"az");
        let r = pcmpstr(a, s(b"AbC"), 2, 3, 0x04);
        assert_eq!(r.intres2, 0b010);
        // Equal each with negative polarity: first difference.
        let r = pcmpstr(s(b"abcd"), s(b"abXd"), 4, 4, 0x18);
        assert_eq!(str_index(&r, 0x18), 2);
        // Masked negative: only valid elements of b are inverted.
        let r = pcmpstr(s(b"abcd"), s(b"abXd"), 4, 4, 0x38);
        assert_eq!(r.intres2, 0xfff4, "beyond both lengths equal-each is true");
        // Equal ordered: substring search.
        let r = pcmpstr(s(b"wor"), s(b"hello world"), 3, 11, 0x0c);
        assert_eq!(str_index(&r, 0x0c), 6);
        // Not found: ECX = 16, CF = 0.
        let r = pcmpstr(s(b"xyz"), s(b"hello"), 3, 5, 0x0c);
        assert_eq!(r.intres2 & 0x1f, 0);
        // Words, expanded mask.
        let r = pcmpstr(1 | (2 << 16), 2 | (9 << 16), 2, 2, 0x01);
        assert_eq!(str_mask(&r, 0x41), 0xffff);
        assert_eq!(explicit_len(u64::from((-5i32) as u32), false, false), 5);
        assert_eq!(explicit_len(99, true, true), 8);
    }

    #[test]
    fn sse41_lane_ops() {
        assert_eq!(
            blendps(0, u128::MAX, 0b0101),
            0x0000_0000_ffff_ffff_0000_0000_ffff_ffff
        );
        assert_eq!(
            blendv::<8>(1 | (5 << 64), 2 | (7 << 64), 1 << 127),
            1 | (7 << 64)
        );
        assert_eq!(
            packusdw(0xffff_ffff_0001_0000_0000_ffff_7fff_ffff, 0, 0),
            0x0000_ffff_ffff_ffff
        );
        assert_eq!(
            phminposuw(0, 0x0005_0003_0004_0003_0009_0008_0007_0006, 0),
            0x3 | (4 << 16)
        );
        assert_eq!(pmuldq(0, 0, 0), 0);
        assert_eq!(
            pmuldq(u128::from(u32::MAX), 2, 0),
            u128::from((-2i64) as u64)
        );
        assert_eq!(
            pmovx::<1, 8, true>(0x80ff),
            (u128::from(u64::MAX - 0x7f) << 64) | u128::from(u64::MAX)
        );
        // MPSADBW with both offsets 0: |a[i+k] - b[k]| summed.
        assert_eq!(
            mpsadbw(s(&[1, 2, 3, 4, 5]), s(&[1, 1, 1, 1]), 0) & 0xffff,
            6
        );
        assert_eq!(
            insert_lane(Mnemonic::Insertps, u128::MAX, 7, 0x21),
            0xffff_ffff_0000_0007_ffff_ffff_0000_0000
        );
    }

    /// Hardware oracle (`--seed 19071 --isa-only --case 54878`): the
    /// products' masked OE/UE/PE stay in MXCSR when a denormal product
    /// then faults the summation with DE unmasked.
    #[test]
    fn dpps_keeps_the_flags_of_its_products_when_the_sum_faults() {
        use crate::insn::simd_fp::{DE, OE, PE, UE};
        // DE and ZE unmasked, RC toward zero.
        let mxcsr = 0x7c80;
        let a = u128::from(0x7f00_0000u32) // 2^127 × 2^127: overflow
            | (u128::from(0x0080_0000u32) << 32) // 2^-126 × 2^-2: a denormal product
            | (u128::from(0x3f80_0000u32) << 64);
        let b = u128::from(0x7f00_0000u32)
            | (u128::from(0x3e80_0000u32) << 32)
            | (u128::from(0x3f80_0000u32) << 64);
        let mut e = Env::new(mxcsr);
        dp::<F32>(&mut e, a, b, 0x7f);
        assert_eq!(
            e.mxcsr & (OE | UE | PE),
            OE | PE,
            "the products' flags are sticky"
        );
        assert_ne!(e.flags & DE, 0, "the denormal product is a summation input");
    }

    /// Hardware oracle (`--seed 19075 --isa-only --case 210320`, then a
    /// probe on the host CPU): VDPPS ymm takes each step — products, pair
    /// sums, final sums — on both lanes at once (fix 47).
    #[test]
    fn vdpps_ymm_takes_each_step_on_both_lanes() {
        use crate::insn::simd_fp::{IE, OE, PE};
        const ONE: u32 = 0x3f80_0000;
        const THIRD: u32 = 0x3eaa_aaab;
        const INF: u32 = 0x7f80_0000;
        const BIG: u32 = 0x7f00_0000; // 2^127
        const ULP: u32 = 0x3380_0000; // 2^-24: 1 + ULP is inexact
        fn v(x: [u32; 4]) -> u128 {
            x.iter()
                .enumerate()
                .fold(0, |r, (i, &e)| r | (u128::from(e) << (32 * i)))
        }
        // Flags MXCSR ends with (IE unmasked, the rest masked), by lane.
        fn flags(a: [[u32; 4]; 2], b: [[u32; 4]; 2]) -> u32 {
            let mut e = Env::new(0x1f00);
            dp_lanes::<F32>(&mut e, &[v(a[0]), v(a[1])], &[v(b[0]), v(b[1])], 0xff);
            let masks = (e.mxcsr >> 7) & 0x3f;
            let unmasked = e.flags & !masks & 0x3f;
            let step = if unmasked & 7 != 0 {
                e.flags & 7
            } else {
                e.flags
            };
            (e.mxcsr | step) & 0x3f
        }
        let z = [0u32; 4];
        for (a, b, want, what) in [
            // An inexact product in one lane, 0 × ∞ in the other: the
            // products fault together, PE is not reported.
            (
                [[THIRD, 0, 0, 0], [0; 4]],
                [[THIRD, 0, 0, 0], [INF, 0, 0, 0]],
                IE,
                "0 × ∞",
            ),
            (
                [[0; 4], [THIRD, 0, 0, 0]],
                [[INF, 0, 0, 0], [THIRD, 0, 0, 0]],
                IE,
                "0 × ∞ low",
            ),
            // ∞ − ∞ in the pair sums of one lane: the products' PE stays.
            (
                [[INF, 0xff80_0000, 0, 0], [THIRD, 0, 0, 0]],
                [[ONE, ONE, 0, 0], [THIRD, 0, 0, 0]],
                IE | PE,
                "∞ − ∞ after an inexact product",
            ),
            // An inexact pair sum in one lane, ∞ − ∞ in the other's: one
            // step, PE not reported.
            (
                [[ONE, ULP, 0, 0], [INF, 0xff80_0000, 0, 0]],
                [[ONE, ONE, 0, 0], [ONE, ONE, 0, 0]],
                IE,
                "pair sums",
            ),
            // Pair sums overflowing (masked) to +∞ and −∞, then ∞ − ∞ in
            // the final sum: the pair sums' OE|PE stay.
            (
                [z, [BIG; 4]],
                [z, [0x3fc0_0000, 0x3fc0_0000, 0xbfc0_0000, 0xbfc0_0000]],
                IE | OE | PE,
                "final sum",
            ),
        ] {
            assert_eq!(flags(a, b), want, "{what}");
        }
    }
}
