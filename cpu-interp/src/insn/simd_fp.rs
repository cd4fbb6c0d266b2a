//! Scalar IEEE-754 single/double arithmetic with SSE (MXCSR) semantics, on
//! raw bit patterns: rounding control, DAZ, FTZ, the six exception flags,
//! x86 NaN propagation and the masked default results.
//!
//! Rounding itself is done by `rustc_apfloat` (a port of LLVM's APFloat)
//! for add, subtract, multiply, divide, int→float and float→float; square
//! root, float→int, comparisons, MIN/MAX and the RCP/RSQRT approximations
//! are exact integer code here. Around those, this module applies the x86
//! rules apfloat does not know:
//!
//! * NaN operands are handled before any arithmetic: an SNaN raises IE, the
//!   result is the first NaN operand (quietened); no other flag is raised.
//! * DAZ turns denormal inputs into signed zeros (no DE); otherwise a
//!   denormal input raises DE.
//! * Invalid operations return the default QNaN (`INDEF`).
//! * Underflow uses x86 tininess detection *after rounding* with unbounded
//!   exponent (apfloat detects it on the denormalised result): when apfloat
//!   returns the smallest normal after rounding, the operation is redone in
//!   a format with the same precision and a wider exponent range to decide.
//!   Masked underflow sets UE only with PE; unmasked underflow sets UE for
//!   every tiny result; FTZ (effective only with UE masked) flushes tiny
//!   results to signed zero and sets UE and PE.
//! * Masked overflow sets OE and PE (apfloat's result is already the masked
//!   response for the rounding mode, but apfloat flags OVERFLOW only when
//!   it returns an infinity: a largest-finite inexact result is checked in
//!   the wide format too).
//! * With overflow or underflow unmasked, PE accompanies OE/UE only when
//!   the result rounded with unbounded exponent is inexact (SDM).
//!
//! Whether an unmasked exception faults is decided by the caller once all
//! lanes are computed ([`Env::flags`], see `Cpu::simd_fp_commit`).

use std::cmp::Ordering;

use rustc_apfloat::ieee::{Double, IeeeFloat, Semantics, Single};
use rustc_apfloat::{Float, FloatConvert, Round, Status, StatusAnd};

pub const IE: u32 = 1 << 0;
pub const DE: u32 = 1 << 1;
pub const ZE: u32 = 1 << 2;
pub const OE: u32 = 1 << 3;
pub const UE: u32 = 1 << 4;
pub const PE: u32 = 1 << 5;
pub const DAZ: u32 = 1 << 6;
/// Overflow mask bit.
pub const OM: u32 = 1 << 10;
/// Underflow mask bit.
pub const UM: u32 = 1 << 11;
pub const FTZ: u32 = 1 << 15;

/// Single precision with a 15-bit exponent: rounding "with unbounded
/// exponent" for tininess detection and for the PE of an unmasked
/// underflow. The exponent must also hold every double (CVTSD2SS of a
/// double denormal: with an 11-bit exponent its value fell below the wide
/// format's range and looked inexact, a PE the CPU does not report).
pub struct WideSingleS;
impl Semantics for WideSingleS {
    const BITS: usize = 24 + 15;
    const EXP_BITS: usize = 15;
}
/// Double precision with a 15-bit exponent.
pub struct WideDoubleS;
impl Semantics for WideDoubleS {
    const BITS: usize = 53 + 15;
    const EXP_BITS: usize = 15;
}
pub type WideSingle = IeeeFloat<WideSingleS>;
pub type WideDouble = IeeeFloat<WideDoubleS>;

/// The MXCSR an operation runs under, and the flags it raised.
#[derive(Clone, Copy, Debug)]
pub struct Env {
    pub mxcsr: u32,
    /// Exception flags raised so far (MXCSR bits 5:0).
    pub flags: u32,
}

impl Env {
    pub fn new(mxcsr: u32) -> Self {
        Env { mxcsr, flags: 0 }
    }

    /// MXCSR.RC as an apfloat rounding mode.
    pub fn round(&self) -> Round {
        match (self.mxcsr >> 13) & 3 {
            0 => Round::NearestTiesToEven,
            1 => Round::TowardNegative,
            2 => Round::TowardPositive,
            _ => Round::TowardZero,
        }
    }

    #[inline]
    fn daz(&self) -> bool {
        self.mxcsr & DAZ != 0
    }
}

/// A binary floating-point format (single or double).
pub trait Fmt {
    type F: Float + FloatConvert<Self::W> + FloatConvert<Single> + FloatConvert<Double>;
    type W: Float;
    /// Size in bytes.
    const BYTES: usize;
    /// Fraction bits.
    const MANT: u32;
    /// Exponent bias.
    const BIAS: i32;
    const SIGN: u64;
    const EXP: u64;
    const FRAC: u64;
    const QUIET: u64;
    /// The default QNaN ("real indefinite").
    const INDEF: u64;
    const INF: u64;
    const MIN_NORMAL: u64;
}

pub struct F32;
pub struct F64;

impl Fmt for F32 {
    type F = Single;
    type W = WideSingle;
    const BYTES: usize = 4;
    const MANT: u32 = 23;
    const BIAS: i32 = 127;
    const SIGN: u64 = 0x8000_0000;
    const EXP: u64 = 0x7f80_0000;
    const FRAC: u64 = 0x007f_ffff;
    const QUIET: u64 = 0x0040_0000;
    const INDEF: u64 = 0xffc0_0000;
    const INF: u64 = 0x7f80_0000;
    const MIN_NORMAL: u64 = 0x0080_0000;
}

impl Fmt for F64 {
    type F = Double;
    type W = WideDouble;
    const BYTES: usize = 8;
    const MANT: u32 = 52;
    const BIAS: i32 = 1023;
    const SIGN: u64 = 1 << 63;
    const EXP: u64 = 0x7ff0_0000_0000_0000;
    const FRAC: u64 = 0x000f_ffff_ffff_ffff;
    const QUIET: u64 = 0x0008_0000_0000_0000;
    const INDEF: u64 = 0xfff8_0000_0000_0000;
    const INF: u64 = 0x7ff0_0000_0000_0000;
    const MIN_NORMAL: u64 = 0x0010_0000_0000_0000;
}

// ---- classification ---------------------------------------------------------

#[inline]
pub fn is_nan<T: Fmt>(x: u64) -> bool {
    x & T::EXP == T::EXP && x & T::FRAC != 0
}
#[inline]
pub fn is_snan<T: Fmt>(x: u64) -> bool {
    is_nan::<T>(x) && x & T::QUIET == 0
}
#[inline]
pub fn is_denormal<T: Fmt>(x: u64) -> bool {
    x & T::EXP == 0 && x & T::FRAC != 0
}
#[inline]
pub fn is_zero<T: Fmt>(x: u64) -> bool {
    x & (T::EXP | T::FRAC) == 0
}
#[inline]
pub fn is_inf<T: Fmt>(x: u64) -> bool {
    x & (T::EXP | T::FRAC) == T::EXP
}

#[inline]
fn to_f<T: Fmt>(x: u64) -> T::F {
    T::F::from_bits(u128::from(x))
}
#[inline]
fn bits<F: Float>(f: F) -> u64 {
    f.to_bits() as u64
}

/// An input operand after DAZ (denormal → signed zero) or, without DAZ,
/// with DE raised for a denormal when `de`.
#[inline]
fn input<T: Fmt>(e: &mut Env, x: u64, de: bool) -> u64 {
    if is_denormal::<T>(x) {
        if e.daz() {
            return x & T::SIGN;
        }
        if de {
            e.flags |= DE;
        }
    }
    x
}

/// Like [`input`], but only noting a denormal in `de`: operations that can
/// also raise a higher-priority exception (invalid, divide by zero) report
/// DE only without it.
#[inline]
fn input_deferred<T: Fmt>(e: &Env, x: u64, de: &mut bool) -> u64 {
    if is_denormal::<T>(x) {
        if e.daz() {
            return x & T::SIGN;
        }
        *de = true;
    }
    x
}

/// NaN handling for two operands: `Some(result)` if either is a NaN.
#[inline]
fn nan2<T: Fmt>(e: &mut Env, a: u64, b: u64) -> Option<u64> {
    let (an, bn) = (is_nan::<T>(a), is_nan::<T>(b));
    if !an && !bn {
        return None;
    }
    if is_snan::<T>(a) || is_snan::<T>(b) {
        e.flags |= IE;
    }
    Some(if an { a | T::QUIET } else { b | T::QUIET })
}

/// Post-computation handling of a rounded result: overflow, underflow
/// (x86 tininess after rounding), FTZ and precision. `wide` recomputes the
/// operation rounded to the same precision with unbounded exponent; it is
/// needed for the ambiguous cases (a largest-finite result: overflow or
/// not; a smallest-normal one: tiny or not) and for PE with an unmasked
/// overflow or underflow, which the SDM sets only when that unbounded
/// rounding is inexact (the destination is not written then).
pub(crate) fn finish<T: Fmt>(
    e: &mut Env,
    r: StatusAnd<T::F>,
    wide: impl Fn() -> StatusAnd<T::W>,
) -> u64 {
    let st = r.status;
    let v = bits(r.value);
    let inexact = st.contains(Status::INEXACT);
    let mag = v & !T::SIGN;
    // apfloat reports OVERFLOW only when it returns an infinity; rounding
    // toward zero it returns the largest finite value with just INEXACT.
    if st.contains(Status::OVERFLOW)
        || (mag == T::EXP - 1 && inexact && wide().value.ilogb() > T::F::MAX_EXP)
    {
        if e.mxcsr & OM == 0 {
            e.flags |= OE;
            if wide().status.contains(Status::INEXACT) {
                e.flags |= PE;
            }
        } else {
            e.flags |= OE | PE;
        }
        return v;
    }
    let tiny = if mag == 0 {
        inexact
    } else if mag < T::MIN_NORMAL {
        true
    } else if mag == T::MIN_NORMAL && inexact {
        let w = wide().value;
        w.is_finite_non_zero() && w.ilogb() < T::F::MIN_EXP
    } else {
        false
    };
    if tiny {
        if e.mxcsr & UM == 0 {
            // Unmasked: reported for every tiny result, exact or not.
            e.flags |= UE;
            if wide().status.contains(Status::INEXACT) {
                e.flags |= PE;
            }
            return v;
        }
        if e.mxcsr & FTZ != 0 {
            e.flags |= UE | PE;
            return v & T::SIGN;
        }
        if inexact {
            e.flags |= UE | PE;
        }
        return v;
    }
    if inexact {
        e.flags |= PE;
    }
    v
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

fn apply<F: Float>(op: Op, a: F, b: F, rc: Round) -> StatusAnd<F> {
    match op {
        Op::Add => a.add_r(b, rc),
        Op::Sub => a.sub_r(b, rc),
        Op::Mul => a.mul_r(b, rc),
        Op::Div => a.div_r(b, rc),
    }
}

/// `a op b` (ADDSS, SUBSS, MULSS, DIVSS and friends).
pub fn arith<T: Fmt>(e: &mut Env, op: Op, a: u64, b: u64) -> u64 {
    if let Some(n) = nan2::<T>(e, a, b) {
        return n;
    }
    let mut de = false;
    let a = input_deferred::<T>(e, a, &mut de);
    let b = input_deferred::<T>(e, b, &mut de);
    let rc = e.round();
    let (fa, fb) = (to_f::<T>(a), to_f::<T>(b));
    let r = apply(op, fa, fb, rc);
    // Priority: invalid and divide-by-zero suppress the denormal exception.
    if r.status.contains(Status::INVALID_OP) {
        e.flags |= IE;
        return T::INDEF;
    }
    if r.status.contains(Status::DIV_BY_ZERO) {
        e.flags |= ZE;
        return bits(r.value);
    }
    if de {
        e.flags |= DE;
    }
    finish::<T>(e, r, || {
        let mut l = false;
        let wa: T::W = fa.convert(&mut l).value;
        let wb: T::W = fb.convert(&mut l).value;
        apply(op, wa, wb, rc)
    })
}

pub fn add<T: Fmt>(e: &mut Env, a: u64, b: u64) -> u64 {
    arith::<T>(e, Op::Add, a, b)
}
pub fn sub<T: Fmt>(e: &mut Env, a: u64, b: u64) -> u64 {
    arith::<T>(e, Op::Sub, a, b)
}
pub fn mul<T: Fmt>(e: &mut Env, a: u64, b: u64) -> u64 {
    arith::<T>(e, Op::Mul, a, b)
}
pub fn div<T: Fmt>(e: &mut Env, a: u64, b: u64) -> u64 {
    arith::<T>(e, Op::Div, a, b)
}

/// ROUNDSS/ROUNDSD/ROUNDPS/ROUNDPD of one lane: round to an integral
/// value with the mode of imm[1:0] (imm[2] set: MXCSR.RC). An SNaN raises
/// IE and comes back quiet; no DE (DAZ still flushes a denormal input);
/// PE unless imm[3] suppresses it.
pub fn round_int<T: Fmt>(e: &mut Env, a: u64, imm: u8) -> u64 {
    if is_nan::<T>(a) {
        if is_snan::<T>(a) {
            e.flags |= IE;
        }
        return a | T::QUIET;
    }
    let a = input::<T>(e, a, false);
    let rc = if imm & 4 != 0 {
        e.round()
    } else {
        match imm & 3 {
            0 => Round::NearestTiesToEven,
            1 => Round::TowardNegative,
            2 => Round::TowardPositive,
            _ => Round::TowardZero,
        }
    };
    let r = to_f::<T>(a).round_to_integral(rc);
    if r.status.contains(Status::INEXACT) && imm & 8 == 0 {
        e.flags |= PE;
    }
    bits(r.value)
}

/// Fused multiply-add `a * b + c` rounded once (the FMA3 instructions;
/// the negated forms pass negated operands, NaNs unnegated). NaN operands:
/// an SNaN raises IE; the result is the first NaN of `nan_order` (the
/// operands in the order of the expression a × b + c, as Intel processors
/// pick it), quietened; `0 × ∞` plus a QNaN returns the QNaN without IE.
pub fn fma<T: Fmt>(e: &mut Env, a: u64, b: u64, c: u64, nan_order: [u64; 3]) -> u64 {
    if [a, b, c].iter().any(|&x| is_nan::<T>(x)) {
        if [a, b, c].iter().any(|&x| is_snan::<T>(x)) {
            e.flags |= IE;
        }
        let first = nan_order
            .iter()
            .copied()
            .find(|&x| is_nan::<T>(x))
            .unwrap_or(T::INDEF);
        return first | T::QUIET;
    }
    let mut de = false;
    let a = input_deferred::<T>(e, a, &mut de);
    let b = input_deferred::<T>(e, b, &mut de);
    let c = input_deferred::<T>(e, c, &mut de);
    let rc = e.round();
    let (fa, fb, fc) = (to_f::<T>(a), to_f::<T>(b), to_f::<T>(c));
    let r = fa.mul_add_r(fb, fc, rc);
    if r.status.contains(Status::INVALID_OP) {
        e.flags |= IE;
        return T::INDEF;
    }
    if de {
        e.flags |= DE;
    }
    finish::<T>(e, r, || {
        let mut l = false;
        let wa: T::W = fa.convert(&mut l).value;
        let wb: T::W = fb.convert(&mut l).value;
        let wc: T::W = fc.convert(&mut l).value;
        wa.mul_add_r(wb, wc, rc)
    })
}

/// Split a finite non-zero value into (significand, exponent) with
/// value = significand × 2^exponent.
#[inline]
fn decompose<T: Fmt>(x: u64) -> (u64, i32) {
    let ef = ((x & T::EXP) >> T::MANT) as i32;
    let frac = x & T::FRAC;
    if ef == 0 {
        (frac, 1 - T::BIAS - T::MANT as i32)
    } else {
        (frac | (1 << T::MANT), ef - T::BIAS - T::MANT as i32)
    }
}

/// Integer square root (floor) of a u128.
fn isqrt(n: u128) -> u128 {
    if n == 0 {
        return 0;
    }
    // Bit-by-bit method.
    let mut x = n;
    let mut r: u128 = 0;
    let mut bit: u128 = 1 << ((127 - n.leading_zeros()) & !1);
    while bit != 0 {
        if x >= r + bit {
            x -= r + bit;
            r = (r >> 1) + bit;
        } else {
            r >>= 1;
        }
        bit >>= 2;
    }
    r
}

/// Square root (SQRTSS/SQRTSD), correctly rounded per MXCSR.RC.
pub fn sqrt<T: Fmt>(e: &mut Env, a: u64) -> u64 {
    if is_nan::<T>(a) {
        if is_snan::<T>(a) {
            e.flags |= IE;
        }
        return a | T::QUIET;
    }
    let mut de = false;
    let a = input_deferred::<T>(e, a, &mut de);
    if is_zero::<T>(a) {
        return a;
    }
    if a & T::SIGN != 0 {
        // Invalid has priority over the denormal exception.
        e.flags |= IE;
        return T::INDEF;
    }
    if de {
        e.flags |= DE;
    }
    if is_inf::<T>(a) {
        return a;
    }
    let (m, ex) = decompose::<T>(a);
    let p = T::MANT as i32 + 1;
    let len = 64 - m.leading_zeros() as i32;
    // Radicand with 2P+4 or 2P+5 bits so the root has at least P+2 bits.
    let mut s = 2 * p + 4 - len;
    if (ex - s) & 1 != 0 {
        s += 1;
    }
    let big = u128::from(m) << s;
    let r = isqrt(big);
    let sticky = u128::from(big != r * r);
    // Rounding r + f (0 < f < 1) at P bits is rounding r + 1/2 because r has
    // more than P + 1 bits: no rounding boundary lies strictly inside
    // (r, r + 1).
    let v = T::F::from_u128_r((r << 1) | sticky, e.round());
    if v.status.contains(Status::INEXACT) {
        e.flags |= PE;
    }
    // value = v × 2^((ex - s)/2 - 1); the result is always a normal number.
    let k = (ex - s) / 2 - 1;
    let vb = bits(v.value) as i64;
    (vb + (i64::from(k) << T::MANT)) as u64
}

/// Total order key for non-NaN values (both zeros map to 0).
#[inline]
fn key<T: Fmt>(x: u64) -> i64 {
    let mag = (x & !T::SIGN) as i64;
    if x & T::SIGN != 0 {
        -mag
    } else {
        mag
    }
}

/// Compare `a` with `b`: `None` if unordered. `signaling` raises IE on QNaN
/// operands too (COMISS, CMPLTPS...); SNaNs always raise IE.
pub fn compare<T: Fmt>(e: &mut Env, a: u64, b: u64, signaling: bool) -> Option<Ordering> {
    if is_nan::<T>(a) || is_nan::<T>(b) {
        if signaling || is_snan::<T>(a) || is_snan::<T>(b) {
            e.flags |= IE;
        }
        return None;
    }
    let a = input::<T>(e, a, true);
    let b = input::<T>(e, b, true);
    Some(key::<T>(a).cmp(&key::<T>(b)))
}

/// CMPPS/CMPSS predicate `imm & 7` as a lane mask.
pub fn cmp_pred<T: Fmt>(e: &mut Env, a: u64, b: u64, imm: u8) -> u64 {
    let pred = imm & 7;
    // LT, LE, NLT, NLE signal on QNaNs.
    let signaling = matches!(pred, 1 | 2 | 5 | 6);
    let o = compare::<T>(e, a, b, signaling);
    let t = match pred {
        0 => o == Some(Ordering::Equal),
        1 => o == Some(Ordering::Less),
        2 => matches!(o, Some(Ordering::Less | Ordering::Equal)),
        3 => o.is_none(),
        4 => o != Some(Ordering::Equal),
        5 => o != Some(Ordering::Less),
        6 => !matches!(o, Some(Ordering::Less | Ordering::Equal)),
        _ => o.is_some(),
    };
    if t {
        u64::MAX >> (64 - 8 * T::BYTES)
    } else {
        0
    }
}

/// VCMPPS/VCMPSS... predicate `imm & 31` (the VEX encoding's 32
/// predicates: bit 4 swaps signalling and quiet, bits 3:0 pick the
/// relation and the unordered result) as a lane mask.
pub fn cmp_pred32<T: Fmt>(e: &mut Env, a: u64, b: u64, imm: u8) -> u64 {
    let p = imm & 31;
    let base = p & 15;
    let signaling = matches!(base, 1 | 2 | 5 | 6 | 9 | 10 | 13 | 14) ^ (p & 16 != 0);
    let o = compare::<T>(e, a, b, signaling);
    let t = match o {
        None => matches!(base, 3 | 4 | 5 | 6 | 8 | 9 | 10 | 15),
        Some(ord) => match base {
            0 | 8 => ord == Ordering::Equal,
            1 | 9 => ord == Ordering::Less,
            2 | 10 => ord != Ordering::Greater,
            3 | 11 => false,
            4 | 12 => ord != Ordering::Equal,
            5 | 13 => ord != Ordering::Less,
            6 | 14 => ord == Ordering::Greater,
            _ => true,
        },
    };
    if t {
        u64::MAX >> (64 - 8 * T::BYTES)
    } else {
        0
    }
}

/// MINSS: `a < b ? a : b`; any NaN raises IE and returns `b`, as does a
/// pair of zeros.
pub fn min<T: Fmt>(e: &mut Env, a: u64, b: u64) -> u64 {
    if is_nan::<T>(a) || is_nan::<T>(b) {
        e.flags |= IE;
        // The second operand is returned as DAZ leaves it.
        return if e.daz() && is_denormal::<T>(b) {
            b & T::SIGN
        } else {
            b
        };
    }
    let a = input::<T>(e, a, true);
    let b = input::<T>(e, b, true);
    if key::<T>(a) < key::<T>(b) {
        a
    } else {
        b
    }
}

/// MAXSS: `a > b ? a : b`, NaNs and zeros as for [`min`].
pub fn max<T: Fmt>(e: &mut Env, a: u64, b: u64) -> u64 {
    if is_nan::<T>(a) || is_nan::<T>(b) {
        e.flags |= IE;
        // The second operand is returned as DAZ leaves it.
        return if e.daz() && is_denormal::<T>(b) {
            b & T::SIGN
        } else {
            b
        };
    }
    let a = input::<T>(e, a, true);
    let b = input::<T>(e, b, true);
    if key::<T>(a) > key::<T>(b) {
        a
    } else {
        b
    }
}

/// Float → signed integer of `width` bits (32 or 64), rounding per
/// MXCSR.RC or truncating. NaN, infinities and out-of-range values give
/// the integer indefinite (1 << (width - 1)) with IE; inexact results
/// raise PE. DAZ applies; DE is never raised.
pub fn to_int<T: Fmt>(e: &mut Env, a: u64, width: u32, truncate: bool) -> u64 {
    let indef = 1u64 << (width - 1);
    if is_nan::<T>(a) || is_inf::<T>(a) {
        e.flags |= IE;
        return indef;
    }
    let a = input::<T>(e, a, false);
    if is_zero::<T>(a) {
        return 0;
    }
    let neg = a & T::SIGN != 0;
    let (m, ex) = decompose::<T>(a);
    let m = u128::from(m);
    // |value| = int + frac, frac as (half, sticky) relative to the unit.
    let (int, round_bit, sticky) = if ex >= 0 {
        if ex > 64 {
            e.flags |= IE;
            return indef;
        }
        (m << ex, false, false)
    } else {
        let sh = (-ex) as u32;
        if sh > 120 {
            (0u128, false, true)
        } else {
            let int = m >> sh;
            let rem = m & ((1u128 << sh) - 1);
            let half = 1u128 << (sh - 1);
            (int, rem & half != 0, rem & (half - 1) != 0)
        }
    };
    let inexact = round_bit || sticky;
    let rc = if truncate {
        Round::TowardZero
    } else {
        e.round()
    };
    let up = inexact
        && match rc {
            Round::NearestTiesToEven => round_bit && (sticky || int & 1 != 0),
            Round::TowardPositive => !neg,
            Round::TowardNegative => neg,
            _ => false,
        };
    let mag = int + u128::from(up);
    let limit = if neg {
        1u128 << (width - 1)
    } else {
        (1u128 << (width - 1)) - 1
    };
    if mag > limit {
        e.flags |= IE;
        return indef;
    }
    if inexact {
        e.flags |= PE;
    }
    let v = if neg {
        (mag as u64).wrapping_neg()
    } else {
        mag as u64
    };
    v & (u64::MAX >> (64 - width))
}

/// Signed integer → float, rounding per MXCSR.RC (PE if inexact).
pub fn from_int<T: Fmt>(e: &mut Env, v: i64) -> u64 {
    let r = T::F::from_i128_r(i128::from(v), e.round());
    if r.status.contains(Status::INEXACT) {
        e.flags |= PE;
    }
    bits(r.value)
}

/// Single → double (CVTSS2SD): exact; SNaN raises IE and is quietened,
/// the NaN payload moves to the top of the double's fraction.
pub fn f32_to_f64(e: &mut Env, a: u64) -> u64 {
    let a = a & 0xffff_ffff;
    if is_nan::<F32>(a) {
        if is_snan::<F32>(a) {
            e.flags |= IE;
        }
        return ((a & F32::SIGN) << 32) | F64::EXP | F64::QUIET | ((a & F32::FRAC) << 29);
    }
    let a = input::<F32>(e, a, true);
    let mut l = false;
    let r: Double = to_f::<F32>(a).convert(&mut l).value;
    bits(r)
}

/// Double → single (CVTSD2SS), rounded per MXCSR.RC with overflow,
/// underflow and precision flags; NaN payloads keep their top bits.
pub fn f64_to_f32(e: &mut Env, a: u64) -> u64 {
    if is_nan::<F64>(a) {
        if is_snan::<F64>(a) {
            e.flags |= IE;
        }
        return ((a >> 32) & F32::SIGN) | F32::EXP | F32::QUIET | ((a & F64::FRAC) >> 29);
    }
    let a = input::<F64>(e, a, true);
    let rc = e.round();
    let fa = to_f::<F64>(a);
    let mut l = false;
    let r: StatusAnd<Single> = fa.convert_r(rc, &mut l);
    finish::<F32>(e, r, || {
        let mut l = false;
        fa.convert_r(rc, &mut l)
    })
}

/// Keep the top `keep` fraction bits of a single, rounding to nearest.
fn round_frac(x: u64, keep: u32) -> u64 {
    let drop = 23 - keep;
    let half = 1u64 << (drop - 1);
    // Carry into the exponent is the correct result (next binade).
    (x + half) & !((1u64 << drop) - 1)
}

/// RCPSS approximation: 1/x with the fraction rounded to 12 bits (relative
/// error below 2^-12, within the architectural 1.5 × 2^-12; Intel's exact
/// table is not reproduced). Denormal inputs count as zeros, tiny results
/// flush to zero, NaNs are quietened, MXCSR is neither used nor changed.
pub fn rcp(a: u64) -> u64 {
    let a = a & 0xffff_ffff;
    if is_nan::<F32>(a) {
        return a | F32::QUIET;
    }
    let sign = a & F32::SIGN;
    if a & F32::EXP == 0 {
        return sign | F32::INF;
    }
    if is_inf::<F32>(a) {
        return sign;
    }
    let x = f64::from(f32::from_bits(a as u32));
    let r = 1.0 / x; // exact enough: 53 bits before the 12-bit rounding
    let rf = r as f32; // nearest
    let v = round_frac(u64::from(rf.to_bits()), 12);
    if v & F32::EXP == 0 {
        return sign;
    }
    v
}

/// RSQRTSS approximation: 1/sqrt(x) with the fraction rounded to 12 bits.
/// ±0 and denormals give ±∞, negative values the default NaN, +∞ gives +0.
pub fn rsqrt(a: u64) -> u64 {
    let a = a & 0xffff_ffff;
    if is_nan::<F32>(a) {
        return a | F32::QUIET;
    }
    let sign = a & F32::SIGN;
    if a & F32::EXP == 0 {
        return sign | F32::INF;
    }
    if sign != 0 {
        return F32::INDEF;
    }
    if is_inf::<F32>(a) {
        return 0;
    }
    let x = f64::from(f32::from_bits(a as u32));
    let r = 1.0 / x.sqrt();
    let rf = r as f32;
    round_frac(u64::from(rf.to_bits()), 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RN: u32 = 0x1f80;
    const RD: u32 = 0x1f80 | 1 << 13;
    const RU: u32 = 0x1f80 | 2 << 13;
    const RZ: u32 = 0x1f80 | 3 << 13;

    fn f(x: f32) -> u64 {
        u64::from(x.to_bits())
    }
    fn d(x: f64) -> u64 {
        x.to_bits()
    }

    #[test]
    fn rounding_modes_add() {
        // 1 + 2^-24 is a tie between 1 and 1 + 2^-23.
        let a = f(1.0);
        let b = f(f32::EPSILON / 2.0);
        for (mx, want) in [(RN, 1.0f32), (RD, 1.0), (RU, 1.0 + f32::EPSILON), (RZ, 1.0)] {
            let mut e = Env::new(mx);
            assert_eq!(add::<F32>(&mut e, a, b), f(want), "mxcsr {mx:#x}");
            assert_eq!(e.flags, PE);
        }
        // -1 - 2^-24
        let a = f(-1.0);
        let b = f(-f32::EPSILON / 2.0);
        for (mx, want) in [
            (RN, -1.0f32),
            (RD, -1.0 - f32::EPSILON),
            (RU, -1.0),
            (RZ, -1.0),
        ] {
            let mut e = Env::new(mx);
            assert_eq!(add::<F32>(&mut e, a, b), f(want));
        }
    }

    #[test]
    fn exact_zero_sign_follows_rounding() {
        let mut e = Env::new(RN);
        assert_eq!(sub::<F64>(&mut e, d(1.5), d(1.5)), d(0.0));
        let mut e = Env::new(RD);
        assert_eq!(sub::<F64>(&mut e, d(1.5), d(1.5)), d(-0.0));
        assert_eq!(e.flags, 0);
    }

    #[test]
    fn nans() {
        let mut e = Env::new(RN);
        let qa = 0x7fc0_0001;
        let sb = 0x7f80_0002;
        assert_eq!(add::<F32>(&mut e, qa, sb), qa);
        assert_eq!(e.flags, IE);
        let mut e = Env::new(RN);
        assert_eq!(mul::<F32>(&mut e, f(1.0), sb), 0x7fc0_0002);
        assert_eq!(e.flags, IE);
        let mut e = Env::new(RN);
        assert_eq!(add::<F32>(&mut e, 0xffc0_0005, 0x7fc0_0001), 0xffc0_0005);
        assert_eq!(e.flags, 0);
        let mut e = Env::new(RN);
        assert_eq!(
            sub::<F64>(&mut e, d(f64::INFINITY), d(f64::INFINITY)),
            F64::INDEF
        );
        assert_eq!(e.flags, IE);
        let mut e = Env::new(RN);
        assert_eq!(div::<F32>(&mut e, f(0.0), f(0.0)), F32::INDEF);
        assert_eq!(e.flags, IE);
        // Denormal / 0: ZE only (divide-by-zero has priority over DE);
        // sqrt of a negative denormal: IE only.
        let mut e = Env::new(RN);
        assert_eq!(
            div::<F32>(&mut e, 0x8000_0001, f(0.0)),
            F32::SIGN | F32::INF
        );
        assert_eq!(e.flags, ZE);
        let mut e = Env::new(RN);
        assert_eq!(sqrt::<F64>(&mut e, F64::SIGN | 1), F64::INDEF);
        assert_eq!(e.flags, IE);
        let mut e = Env::new(RN);
        assert_eq!(mul::<F32>(&mut e, F32::INF, 1), F32::INF);
        assert_eq!(e.flags, DE);
        // QNaN / 0: no ZE.
        let mut e = Env::new(RN);
        assert_eq!(div::<F32>(&mut e, qa, f(0.0)), qa);
        assert_eq!(e.flags, 0);
    }

    #[test]
    fn min_max_return_the_second_operand_as_daz_leaves_it() {
        // MAXPD/MINPD with a NaN return the second operand: a denormal
        // comes back as the zero DAZ makes of it.
        let den = 0x0003_9b72_47a8_7bf5u64 | F64::SIGN;
        for op in [max::<F64>, min::<F64>] {
            let mut e = Env::new(RN | DAZ);
            assert_eq!(op(&mut e, 0x7ff8_0000_0000_0000, den), F64::SIGN);
            assert_eq!(e.flags, IE);
            let mut e = Env::new(RN);
            assert_eq!(op(&mut e, 0x7ff8_0000_0000_0000, den), den);
        }
    }

    #[test]
    fn denormals_daz_ftz() {
        let den = 0x0000_0001u64; // 2^-149
        let mut e = Env::new(RN);
        assert_eq!(add::<F32>(&mut e, den, den), 2);
        assert_eq!(e.flags, DE);
        let mut e = Env::new(RN | DAZ);
        assert_eq!(add::<F32>(&mut e, den, f(1.0)), f(1.0));
        assert_eq!(e.flags, 0);
        // 2^-100 * 2^-40 = 2^-140: exact denormal; masked UE needs PE.
        let mut e = Env::new(RN);
        let r = mul::<F32>(&mut e, f(2f32.powi(-100)), f(2f32.powi(-40)));
        assert_eq!(r, 1 << 9);
        assert_eq!(e.flags, 0);
        // Unmasked underflow reports exact tiny results.
        let mut e = Env::new(RN & !UM);
        mul::<F32>(&mut e, f(2f32.powi(-100)), f(2f32.powi(-40)));
        assert_eq!(e.flags, UE);
        // FTZ flushes and sets UE|PE.
        let mut e = Env::new(RN | FTZ);
        let r = mul::<F32>(&mut e, f(-(2f32.powi(-100))), f(2f32.powi(-40)));
        assert_eq!(r, F32::SIGN);
        assert_eq!(e.flags, UE | PE);
        // Inexact denormal result.
        let mut e = Env::new(RN);
        let r = mul::<F32>(&mut e, f(1.5 * 2f32.powi(-100)), f(2f32.powi(-49)));
        assert_eq!(r, 2); // 1.5 * 2^-149 rounds to even: 2 * 2^-149
        assert_eq!(e.flags, UE | PE);
    }

    #[test]
    fn tininess_after_rounding() {
        let one_m24 = f(1.0 - f32::EPSILON / 2.0); // 1 - 2^-24
        let one_m23 = f(1.0 - f32::EPSILON); // 1 - 2^-23
        let min = f(2f32.powi(-126));
        // 2^-126 (1 + 2^-23)
        let min_p = f(2f32.powi(-126) * (1.0 + f32::EPSILON));
        // (1 - 2^-24) * 2^-126 = 2^-126 - 2^-150: exactly representable with
        // 24 bits and unbounded exponent, so tiny; on the denormal grid it
        // is a tie that rounds (to even) up to the smallest normal.
        for mx in [RN, RU] {
            let mut e = Env::new(mx);
            assert_eq!(mul::<F32>(&mut e, one_m24, min), F32::MIN_NORMAL);
            assert_eq!(e.flags, UE | PE);
        }
        let mut e = Env::new(RZ);
        assert_eq!(mul::<F32>(&mut e, one_m24, min), F32::MIN_NORMAL - 1);
        assert_eq!(e.flags, UE | PE);
        // (1 - 2^-23) * 2^-126 (1 + 2^-23) = 2^-126 (1 - 2^-46): rounds to
        // 2^-126 with unbounded exponent under RN and RU (not tiny), below
        // it under RD.
        for mx in [RN, RU] {
            let mut e = Env::new(mx);
            assert_eq!(mul::<F32>(&mut e, one_m23, min_p), F32::MIN_NORMAL);
            assert_eq!(e.flags, PE, "mxcsr {mx:#x}");
        }
        let mut e = Env::new(RD);
        assert_eq!(mul::<F32>(&mut e, one_m23, min_p), F32::MIN_NORMAL - 1);
        assert_eq!(e.flags, UE | PE);
        // Unmasked underflow: UE, and PE only if inexact with unbounded
        // exponent (2^-126 - 2^-150 is exact with 24 bits).
        let mut e = Env::new(RN & !UM);
        mul::<F32>(&mut e, one_m24, min);
        assert_eq!(e.flags, UE);
        let mut e = Env::new(RN & !UM);
        mul::<F32>(&mut e, f(1.0 / 3.0), f(1.5 * 2f32.powi(-126)));
        assert_eq!(e.flags, UE | PE);
        // FTZ: tiny results flush even when they round to the smallest normal.
        let mut e = Env::new(RN | FTZ);
        assert_eq!(mul::<F32>(&mut e, one_m24, min), 0);
        assert_eq!(e.flags, UE | PE);
        let mut e = Env::new(RN | FTZ);
        assert_eq!(mul::<F32>(&mut e, one_m23, min_p), F32::MIN_NORMAL);
        assert_eq!(e.flags, PE);
    }

    #[test]
    fn overflow_and_divide_by_zero() {
        let big = f(f32::MAX);
        for (mx, want) in [
            (RN, F32::INF),
            (RZ, f(f32::MAX)),
            (RD, f(f32::MAX)),
            (RU, F32::INF),
        ] {
            let mut e = Env::new(mx);
            assert_eq!(mul::<F32>(&mut e, big, f(2.0)), want);
            assert_eq!(e.flags, OE | PE);
        }
        // Unmasked overflow: PE only if inexact with unbounded exponent.
        let mut e = Env::new(RN & !OM);
        mul::<F32>(&mut e, big, f(2.0));
        assert_eq!(e.flags, OE);
        let mut e = Env::new(RZ & !OM);
        mul::<F32>(&mut e, big, f(1.5));
        assert_eq!(e.flags, OE | PE);
        let mut e = Env::new(RN);
        assert_eq!(div::<F64>(&mut e, d(-3.0), d(0.0)), d(f64::NEG_INFINITY));
        assert_eq!(e.flags, ZE);
    }

    #[test]
    fn square_root() {
        let mut e = Env::new(RN);
        assert_eq!(sqrt::<F64>(&mut e, d(2.0)), d(2f64.sqrt()));
        assert_eq!(e.flags, PE);
        let mut e = Env::new(RN);
        assert_eq!(sqrt::<F32>(&mut e, f(16.0)), f(4.0));
        assert_eq!(e.flags, 0);
        let mut e = Env::new(RN);
        assert_eq!(sqrt::<F32>(&mut e, f(-1.0)), F32::INDEF);
        assert_eq!(e.flags, IE);
        let mut e = Env::new(RN);
        assert_eq!(sqrt::<F32>(&mut e, f(-0.0)), f(-0.0));
        assert_eq!(sqrt::<F32>(&mut e, 1), f(2f32.powf(-74.5)));
        assert_eq!(e.flags, DE | PE);
        // Directed rounding: sqrt(2) lies between two doubles.
        let lo = d(2f64.sqrt());
        let mut e = Env::new(RD);
        let down = sqrt::<F64>(&mut e, d(2.0));
        let mut e = Env::new(RU);
        let up = sqrt::<F64>(&mut e, d(2.0));
        assert_eq!(up - down, 1);
        assert!(lo == down || lo == up);
        for x in [0.5f64, 3.0, 1e300, 1e-310, 7.0e-320, 123456.789] {
            let mut e = Env::new(RN);
            assert_eq!(sqrt::<F64>(&mut e, d(x)), d(x.sqrt()), "{x}");
        }
        for x in [0.5f32, 3.0, 1e30, 1e-40, 7.0e-44, 123.456] {
            let mut e = Env::new(RN);
            assert_eq!(sqrt::<F32>(&mut e, f(x)), f(x.sqrt()), "{x}");
        }
    }

    #[test]
    fn conversions_to_int() {
        let mut e = Env::new(RN);
        assert_eq!(to_int::<F64>(&mut e, d(2.5), 32, false), 2);
        assert_eq!(to_int::<F64>(&mut e, d(3.5), 32, false), 4);
        assert_eq!(to_int::<F64>(&mut e, d(-2.5), 32, true), 0xffff_fffe);
        assert_eq!(e.flags, PE);
        let mut e = Env::new(RN);
        assert_eq!(
            to_int::<F64>(&mut e, d(2147483648.0), 32, true),
            0x8000_0000
        );
        assert_eq!(e.flags, IE);
        let mut e = Env::new(RN);
        assert_eq!(
            to_int::<F64>(&mut e, d(-2147483648.9), 32, true),
            0x8000_0000
        );
        assert_eq!(e.flags, PE);
        let mut e = Env::new(RN);
        assert_eq!(
            to_int::<F64>(&mut e, d(-2147483648.9), 32, false),
            0x8000_0000
        );
        assert_eq!(e.flags, IE);
        let mut e = Env::new(RN);
        assert_eq!(
            to_int::<F32>(&mut e, f(-9.0e18), 64, false),
            (-9.0e18f32) as i64 as u64
        );
        assert_eq!(e.flags, 0);
        assert_eq!(to_int::<F32>(&mut e, f(9.3e18), 64, false), 1 << 63);
        assert_eq!(e.flags, IE);
        let mut e = Env::new(RD);
        assert_eq!(to_int::<F32>(&mut e, f(-0.0), 32, false), 0);
        assert_eq!(to_int::<F32>(&mut e, f(0.25), 32, false), 0);
        assert_eq!(to_int::<F32>(&mut e, f(-0.25), 32, false), 0xffff_ffff);
        assert_eq!(to_int::<F32>(&mut e, 1, 32, false), 0);
        assert_eq!(e.flags, PE);
    }

    #[test]
    fn float_conversions() {
        let mut e = Env::new(RN);
        assert_eq!(f32_to_f64(&mut e, f(1.5)), d(1.5));
        assert_eq!(f32_to_f64(&mut e, 0x7f80_0001), 0x7ff8_0000_2000_0000);
        assert_eq!(e.flags, IE);
        let mut e = Env::new(RN);
        assert_eq!(f64_to_f32(&mut e, d(1e300)), F32::INF);
        assert_eq!(e.flags, OE | PE);
        let mut e = Env::new(RZ);
        assert_eq!(f64_to_f32(&mut e, d(1e300)), f(f32::MAX));
        let mut e = Env::new(RN);
        assert_eq!(f64_to_f32(&mut e, d(0.1)), f(0.1));
        assert_eq!(e.flags, PE);
        let mut e = Env::new(RN);
        assert_eq!(f64_to_f32(&mut e, d(1e-40)), f(1e-40));
        assert_eq!(e.flags, UE | PE);
        assert_eq!(f64_to_f32(&mut e, 0xfff0_0000_0000_0001), 0xffc0_0000);
        let mut e = Env::new(RN);
        assert_eq!(from_int::<F32>(&mut e, 16_777_217), f(16_777_216.0));
        assert_eq!(e.flags, PE);
        let mut e = Env::new(RU);
        assert_eq!(from_int::<F32>(&mut e, 16_777_217), f(16_777_218.0));
        assert_eq!(from_int::<F64>(&mut e, -5), d(-5.0));
    }

    /// Hardware oracle (Emerald Rapids, `--seed 20261207 --isa-only` cases
    /// 58251 and 70171): CVTSD2SS/CVTPD2PS of a double denormal with UE
    /// unmasked raise DE and UE but not PE — rounded with unbounded
    /// exponent, a denormal double with few significant bits is exact in
    /// single precision. A result that needs more than 24 bits is inexact.
    #[test]
    fn narrowing_a_double_denormal_with_underflow_unmasked() {
        let unmasked_ue = RZ & !UM;
        let mut e = Env::new(unmasked_ue);
        assert_eq!(f64_to_f32(&mut e, 0x1d1), 0);
        assert_eq!(e.flags, DE | UE);
        let mut e = Env::new(unmasked_ue);
        f64_to_f32(&mut e, 0x000f_ffff_ffff_ffff);
        assert_eq!(e.flags, DE | UE | PE);
        // Masked: the tiny inexact result is UE | PE as before.
        let mut e = Env::new(RZ);
        assert_eq!(f64_to_f32(&mut e, 0x1d1), 0);
        assert_eq!(e.flags, DE | UE | PE);
    }

    #[test]
    fn compares_and_min_max() {
        let mut e = Env::new(RN);
        assert_eq!(
            compare::<F32>(&mut e, f(0.0), f(-0.0), false),
            Some(Ordering::Equal)
        );
        assert_eq!(
            compare::<F32>(&mut e, f(-1.0), f(0.0), true),
            Some(Ordering::Less)
        );
        assert_eq!(e.flags, 0);
        assert_eq!(compare::<F32>(&mut e, 0x7fc0_0000, f(0.0), false), None);
        assert_eq!(e.flags, 0);
        assert_eq!(compare::<F32>(&mut e, 0x7fc0_0000, f(0.0), true), None);
        assert_eq!(e.flags, IE);
        let mut e = Env::new(RN);
        assert_eq!(min::<F32>(&mut e, f(0.0), f(-0.0)), f(-0.0));
        assert_eq!(min::<F32>(&mut e, f(-0.0), f(0.0)), f(0.0));
        assert_eq!(max::<F64>(&mut e, d(1.0), d(2.0)), d(2.0));
        assert_eq!(min::<F64>(&mut e, d(1.0), d(2.0)), d(1.0));
        assert_eq!(e.flags, 0);
        assert_eq!(max::<F32>(&mut e, 0x7fc0_0000, f(3.0)), f(3.0));
        assert_eq!(max::<F32>(&mut e, f(3.0), 0x7fc0_0000), 0x7fc0_0000);
        assert_eq!(e.flags, IE);
        let mut e = Env::new(RN);
        assert_eq!(cmp_pred::<F64>(&mut e, d(1.0), d(2.0), 1), u64::MAX);
        assert_eq!(cmp_pred::<F32>(&mut e, f(1.0), 0x7fc0_0000, 4), 0xffff_ffff);
        assert_eq!(cmp_pred::<F32>(&mut e, f(1.0), 0x7fc0_0000, 0), 0);
        assert_eq!(e.flags, 0);
        assert_eq!(cmp_pred::<F32>(&mut e, f(1.0), 0x7fc0_0000, 6), 0xffff_ffff);
        assert_eq!(e.flags, IE);
    }

    #[test]
    fn approximations() {
        for x in [1.0f32, 3.0, 0.1, 1e20, -7.5, 1e-30] {
            let r = f32::from_bits(rcp(f(x)) as u32);
            assert!(((r * x) - 1.0).abs() < 1.5 / 4096.0, "rcp {x}: {r}");
            if x > 0.0 {
                let r = f32::from_bits(rsqrt(f(x)) as u32);
                assert!(((r * r * x) - 1.0).abs() < 3.0 / 4096.0, "rsqrt {x}: {r}");
            }
        }
        assert_eq!(rcp(f(0.0)), F32::INF);
        assert_eq!(rcp(f(-0.0)), F32::SIGN | F32::INF);
        assert_eq!(rcp(0x8000_0001), F32::SIGN | F32::INF);
        assert_eq!(rcp(f(f32::MAX)), 0);
        assert_eq!(rcp(f(f32::NEG_INFINITY)), F32::SIGN);
        assert_eq!(rsqrt(f(-1.0)), F32::INDEF);
        assert_eq!(rsqrt(f(f32::INFINITY)), 0);
        assert_eq!(rsqrt(0x7f80_0001), 0x7fc0_0001);
    }

    // ---- cross-checks against the host's IEEE arithmetic -------------------

    use proptest::prelude::*;

    fn next_up32(x: f32) -> f32 {
        // x finite and non-zero
        let b = x.to_bits();
        f32::from_bits(if x > 0.0 { b + 1 } else { b - 1 })
    }
    fn next_down32(x: f32) -> f32 {
        -next_up32(-x)
    }

    /// Expected result of an f32 operation in every rounding mode, from the
    /// host's round-to-nearest result `rn` and how it compares with the
    /// exact result (`cmp` = sign of rn - exact). `None` when the oracle
    /// does not apply (NaN, infinite or zero results).
    fn directed(rn: f32, cmp: Ordering) -> Option<[f32; 4]> {
        if !rn.is_finite() || rn == 0.0 {
            return None;
        }
        let (rd, ru) = match cmp {
            Ordering::Equal => (rn, rn),
            Ordering::Greater => (next_down32(rn), rn),
            Ordering::Less => (rn, next_up32(rn)),
        };
        if !rd.is_finite() || !ru.is_finite() || rd == 0.0 || ru == 0.0 {
            return None;
        }
        let rz = if rn > 0.0 { rd } else { ru };
        Some([rn, rd, ru, rz])
    }

    fn check32(
        op: fn(&mut Env, u64, u64) -> u64,
        a: f32,
        b: f32,
        rn: f32,
        cmp: Option<Ordering>,
    ) -> Result<(), TestCaseError> {
        if a.is_nan() || b.is_nan() {
            return Ok(());
        }
        let mut e = Env::new(RN);
        let got = op(&mut e, f(a), f(b));
        if rn.is_nan() {
            prop_assert_eq!(got, F32::INDEF);
            prop_assert_eq!(e.flags & IE, IE);
            return Ok(());
        }
        prop_assert_eq!(got, f(rn), "RN {} {}", a, b);
        if let Some(want) = cmp.and_then(|c| directed(rn, c)) {
            for (k, mx) in [RN, RD, RU, RZ].into_iter().enumerate() {
                let mut e = Env::new(mx);
                let got = op(&mut e, f(a), f(b));
                prop_assert_eq!(got, f(want[k]), "mode {} {} {}", k, a, b);
                let inexact = cmp != Some(Ordering::Equal);
                prop_assert_eq!(e.flags & PE != 0, inexact);
            }
        }
        Ok(())
    }

    fn sign_of(x: f64) -> Ordering {
        x.partial_cmp(&0.0).unwrap_or(Ordering::Equal)
    }

    fn any_f32() -> impl Strategy<Value = f32> {
        prop_oneof![
            any::<u32>().prop_map(f32::from_bits),
            (-1000i32..1000, 0u32..(1 << 23)).prop_map(|(e, m)| {
                f32::from_bits((((e.rem_euclid(254) + 1) as u32) << 23) | m)
            }),
            (0u32..(1 << 23)).prop_map(f32::from_bits),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn f32_mul_matches_host(a in any_f32(), b in any_f32()) {
            let rn = a * b;
            let exact = f64::from(a) * f64::from(b); // exact
            let cmp = Some(f64::from(rn).partial_cmp(&exact).unwrap_or(Ordering::Equal));
            check32(mul::<F32>, a, b, rn, cmp)?;
        }

        #[test]
        fn f32_add_matches_host(a in any_f32(), b in any_f32()) {
            let rn = a + b;
            let (x, y) = (f64::from(a), f64::from(b));
            let s = x + y;
            // TwoSum: s + err == x + y exactly, so rn - exact = (rn - s) - err;
            // when rn != s, |rn - s| dwarfs |err|.
            let bb = s - x;
            let err = (x - (s - bb)) + (y - bb);
            let cmp = if !s.is_finite() || !err.is_finite() {
                None
            } else if f64::from(rn) == s {
                Some(sign_of(-err))
            } else {
                Some(f64::from(rn).partial_cmp(&s).unwrap_or(Ordering::Equal))
            };
            check32(add::<F32>, a, b, rn, cmp)?;
        }

        #[test]
        fn f32_div_matches_host(a in any_f32(), b in any_f32()) {
            let rn = a / b;
            // rn - a/b has the sign of (rn*b - a) * sign(b); rn*b is exact in f64.
            let diff = f64::from(rn) * f64::from(b) - f64::from(a);
            let cmp = if f64::from(b) > 0.0 { sign_of(diff) } else { sign_of(diff).reverse() };
            check32(div::<F32>, a, b, rn, Some(cmp))?;
        }

        #[test]
        fn f32_sqrt_matches_host(a in any_f32()) {
            let rn = a.sqrt();
            let diff = f64::from(rn) * f64::from(rn) - f64::from(a);
            check32(|e, x, _| sqrt::<F32>(e, x), a, 0.0, rn, Some(sign_of(diff)))?;
        }

        #[test]
        fn f64_ops_match_host_nearest(a in any::<u64>(), b in any::<u64>()) {
            let (x, y) = (f64::from_bits(a), f64::from_bits(b));
            if !x.is_nan() && !y.is_nan() {
                for (op, want) in [
                    (add::<F64> as fn(&mut Env, u64, u64) -> u64, x + y),
                    (sub::<F64>, x - y),
                    (mul::<F64>, x * y),
                    (div::<F64>, x / y),
                ] {
                    let mut e = Env::new(RN);
                    let got = op(&mut e, a, b);
                    if want.is_nan() {
                        prop_assert_eq!(got, F64::INDEF);
                    } else {
                        prop_assert_eq!(got, want.to_bits(), "{} {}", x, y);
                    }
                }
                let mut e = Env::new(RN);
                let got = sqrt::<F64>(&mut e, a);
                let want = x.sqrt();
                if want.is_nan() {
                    prop_assert_eq!(got, F64::INDEF);
                } else {
                    prop_assert_eq!(got, want.to_bits());
                }
            }
        }

        #[test]
        fn conversions_match_host(x in any_f32(), y in any::<u64>(), i in any::<i64>()) {
            if !x.is_nan() {
                let mut e = Env::new(RN);
                prop_assert_eq!(f32_to_f64(&mut e, f(x)), f64::from(x).to_bits());
                for (mx, r) in [
                    (RN, x.round_ties_even()),
                    (RD, x.floor()),
                    (RU, x.ceil()),
                    (RZ, x.trunc()),
                ] {
                    let mut e = Env::new(mx);
                    let got = to_int::<F32>(&mut e, f(x), 32, false);
                    if (-2147483648.0..2147483648.0).contains(&r) {
                        prop_assert_eq!(got, u64::from(r as i32 as u32));
                        prop_assert_eq!(e.flags, if r == x { 0 } else { PE });
                    } else {
                        prop_assert_eq!(got, 0x8000_0000);
                        prop_assert_eq!(e.flags, IE);
                    }
                    let mut e = Env::new(mx);
                    let got = to_int::<F32>(&mut e, f(x), 64, true);
                    let t = x.trunc();
                    if (-9.223372e18..9.223372e18).contains(&t) {
                        prop_assert_eq!(got, t as i64 as u64);
                    } else {
                        prop_assert_eq!(got, 1 << 63);
                    }
                }
            }
            let z = f64::from_bits(y);
            if !z.is_nan() {
                let mut e = Env::new(RN);
                prop_assert_eq!(f64_to_f32(&mut e, y), f(z as f32));
            }
            let mut e = Env::new(RN);
            prop_assert_eq!(from_int::<F32>(&mut e, i), f(i as f32));
            prop_assert_eq!(from_int::<F64>(&mut e, i), (i as f64).to_bits());
        }
    }
}
