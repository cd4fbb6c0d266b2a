//! x87 transcendental instructions: F2XM1, FYL2X, FYL2XP1, FPATAN, FSIN,
//! FCOS, FSINCOS, FPTAN.
//!
//! Precision: the functions are evaluated in a 128-bit-significand
//! floating-point format ([`W`], truncating arithmetic with an unbounded
//! exponent) with range reductions and Taylor/atanh series carried to
//! 2^-130 relative, so the value before the final rounding is within about
//! 2^-120 of the true result. The result is then rounded once to 64 bits
//! with FCW.RC (precision control does not apply to these instructions):
//! it is the correctly rounded value except when the true result lies
//! within ~2^-56 ulp of a rounding boundary, i.e. always within 1 ulp and
//! almost always exact to the last bit (3850 random operands over wide
//! ranges in all four rounding modes, checked against 1200-bit mpmath,
//! were all correctly rounded). Real processors are only specified to
//! within 1 ulp (SDM vol. 1, 8.3.10), so their low bit or two may
//! differ.
//!
//! FSIN, FCOS, FSINCOS and FPTAN reduce their argument exactly to the
//! nearest multiple of π/2, but with the 66-bit approximation of π that
//! Intel processors use (SDM vol. 1, 8.3.10), and then evaluate sin/cos of
//! the remainder: results near multiples of π match hardware rather than
//! the true function (FSIN(M_PI) = 1.2246063538223773e-16). Arguments with |x| >= 2^63 are out of range
//! (C2 = 1, ST(0) unchanged).
//!
//! Results that are exactly representable (F2XM1 of an integer, FYL2X of
//! a power of two, zeros, the special values of the SDM tables) are
//! computed exactly and raise no precision exception.

use super::{
    classify, inf, invalid, mul, pack, propagate, quiet, round_pack, sign, special1, sub, unpack,
    zero, Class, Ctx, Fmt, Res, Unp, BIAS, DE, INT_BIT, ONE, PE, UE, ZE,
};

/// A 128-bit-significand binary float: (-1)^neg * sig * 2^(exp - 127),
/// `sig` normalised (bit 127 set) or zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct W {
    pub neg: bool,
    pub exp: i32,
    pub sig: u128,
}

/// 128x128 -> 256-bit product as (high, low).
fn mul_128(a: u128, b: u128) -> (u128, u128) {
    const M: u128 = (1 << 64) - 1;
    let (a1, a0) = (a >> 64, a & M);
    let (b1, b0) = (b >> 64, b & M);
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 64) + (p01 & M) + (p10 & M);
    let lo = (p00 & M) | (mid << 64);
    let hi = p11 + (p01 >> 64) + (p10 >> 64) + (mid >> 64);
    (hi, lo)
}

impl W {
    pub const ZERO: W = W {
        neg: false,
        exp: 0,
        sig: 0,
    };
    pub const ONE: W = W {
        neg: false,
        exp: 0,
        sig: 1 << 127,
    };
    /// π, 128 bits.
    pub const PI: W = W {
        neg: false,
        exp: 1,
        sig: 0xc90f_daa2_2168_c234_c4c6_628b_80dc_1cd1,
    };
    /// ln 2, 128 bits.
    pub const LN2: W = W {
        neg: false,
        exp: -1,
        sig: 0xb172_17f7_d1cf_79ab_c9e3_b398_03f2_f6af,
    };
    /// log2 e, 128 bits.
    pub const LOG2E: W = W {
        neg: false,
        exp: 0,
        sig: 0xb8aa_3b29_5c17_f0bb_be87_fed0_691d_3e88,
    };
    /// log2 10, 128 bits.
    pub const L2T: W = W {
        neg: false,
        exp: 1,
        sig: 0xd49a_784b_cd1b_8afe_492b_f6ff_4daf_db4c,
    };
    /// log10 2, 128 bits.
    pub const LG2: W = W {
        neg: false,
        exp: -2,
        sig: 0x9a20_9a84_fbcf_f798_8f89_59ac_0b7c_9178,
    };

    /// `sig * 2^(exp - 127)`, normalised.
    pub fn new(neg: bool, exp: i32, sig: u128) -> W {
        if sig == 0 {
            return W::ZERO;
        }
        let lz = sig.leading_zeros();
        W {
            neg,
            exp: exp - lz as i32,
            sig: sig << lz,
        }
    }

    pub(crate) fn from_unp(u: Unp) -> W {
        W {
            neg: u.sign,
            exp: u.e,
            sig: u128::from(u.sig) << 64,
        }
    }

    pub fn from_int(v: i64) -> W {
        W::new(v < 0, 127, u128::from(v.unsigned_abs()))
    }

    pub fn is_zero(self) -> bool {
        self.sig == 0
    }

    pub fn neg(self) -> W {
        if self.is_zero() {
            self
        } else {
            W {
                neg: !self.neg,
                ..self
            }
        }
    }

    pub fn abs(self) -> W {
        W { neg: false, ..self }
    }

    /// Multiply by 2^k.
    pub fn scale(self, k: i32) -> W {
        if self.is_zero() {
            self
        } else {
            W {
                exp: self.exp + k,
                ..self
            }
        }
    }

    /// Compare magnitudes.
    pub fn cmp_abs(self, o: W) -> std::cmp::Ordering {
        match (self.is_zero(), o.is_zero()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Less,
            (false, true) => std::cmp::Ordering::Greater,
            _ => (self.exp, self.sig).cmp(&(o.exp, o.sig)),
        }
    }

    pub fn add(self, o: W) -> W {
        if self.is_zero() {
            return o;
        }
        if o.is_zero() {
            return self;
        }
        let (a, b) = if self.cmp_abs(o).is_ge() {
            (self, o)
        } else {
            (o, self)
        };
        // The shifted-out bits of the smaller operand leave a sticky bit, so
        // that an inexact result never looks exact: -1 + 2^-200 stays just
        // below 1 in magnitude and rounds by the rounding mode.
        let bs = super::shr_jam(b.sig, (a.exp - b.exp) as u32);
        if a.neg == b.neg {
            let (s, carry) = a.sig.overflowing_add(bs);
            if carry {
                W {
                    neg: a.neg,
                    exp: a.exp + 1,
                    sig: (s >> 1) | (1 << 127),
                }
            } else {
                W {
                    neg: a.neg,
                    exp: a.exp,
                    sig: s,
                }
            }
        } else {
            W::new(a.neg, a.exp, a.sig - bs)
        }
    }

    pub fn sub(self, o: W) -> W {
        self.add(o.neg())
    }

    pub fn mul(self, o: W) -> W {
        if self.is_zero() || o.is_zero() {
            return W::ZERO;
        }
        let (hi, _) = mul_128(self.sig, o.sig);
        W::new(self.neg ^ o.neg, self.exp + o.exp + 1, hi)
    }

    /// Division (`o` non-zero), 128 quotient bits.
    pub fn div(self, o: W) -> W {
        if self.is_zero() || o.is_zero() {
            return W::ZERO;
        }
        let (a, b) = (self.sig, o.sig);
        let mut q: u128 = 0;
        let mut r = a;
        if r >= b {
            r -= b;
            q = 1;
        }
        for _ in 0..127 {
            let carry = r >> 127;
            r <<= 1;
            q <<= 1;
            if carry != 0 || r >= b {
                r = r.wrapping_sub(b);
                q |= 1;
            }
        }
        // q ~ (a / b) * 2^127
        W::new(self.neg ^ o.neg, self.exp - o.exp, q)
    }

    pub fn div_int(self, n: i64) -> W {
        self.div(W::from_int(n))
    }

    fn to_f64(self) -> f64 {
        let top = (self.sig >> 75) as u64 as f64;
        let v = top * 2f64.powi(self.exp - 52);
        if self.neg {
            -v
        } else {
            v
        }
    }

    fn from_f64(v: f64) -> W {
        let bits = v.to_bits();
        let e = ((bits >> 52) & 0x7ff) as i32 - 1023;
        let f = u128::from(bits & ((1 << 52) - 1));
        W {
            neg: v < 0.0,
            exp: e,
            sig: ((1 << 52) | f) << 75,
        }
    }

    /// Square root of a non-negative value (Newton from an f64 estimate).
    pub fn sqrt(self) -> W {
        if self.is_zero() {
            return W::ZERO;
        }
        let half = self.exp.div_euclid(2);
        let m = W {
            neg: false,
            exp: self.exp.rem_euclid(2),
            sig: self.sig,
        };
        let mut y = W::from_f64(m.to_f64().sqrt());
        for _ in 0..3 {
            y = y.add(m.div(y)).scale(-1);
        }
        y.scale(half)
    }

    /// Round to double extended (64-bit precision, the context's rounding)
    /// as an inexact result: a sticky bit stands for the neglected tail.
    pub(crate) fn round(self, ctx: &Ctx) -> Res<u128> {
        if self.is_zero() {
            return Res::exact(zero(self.neg));
        }
        round_pack(self.neg, self.exp, self.sig | 1, Fmt::Ext, &ctx.full())
    }
}

/// Is `term` negligible next to `sum`?
fn negligible(term: W, sum: W) -> bool {
    term.is_zero() || (!sum.is_zero() && term.exp < sum.exp - 130)
}

/// e^x - 1 for |x| < 1 (Taylor series).
fn expm1(x: W) -> W {
    let mut term = x;
    let mut sum = x;
    for n in 2..200 {
        term = term.mul(x).div_int(n);
        sum = sum.add(term);
        if negligible(term, sum) {
            break;
        }
    }
    sum
}

/// atanh(t) for |t| <= 1/3 (series t + t^3/3 + t^5/5 + ...).
fn atanh(t: W) -> W {
    let t2 = t.mul(t);
    let mut pow = t;
    let mut sum = t;
    for k in 1..400 {
        pow = pow.mul(t2);
        let term = pow.div_int(2 * k + 1);
        sum = sum.add(term);
        if negligible(term, sum) {
            break;
        }
    }
    sum
}

/// atan(t) for 0 <= t <= 1.
fn atan(t: W) -> W {
    // Halve the angle until t < 2^-6: atan t = 2 atan(t / (1 + sqrt(1 + t^2))).
    let mut t = t;
    let mut k = 0;
    while !t.is_zero() && t.exp >= -6 && k < 16 {
        t = t.div(W::ONE.add(W::ONE.add(t.mul(t)).sqrt()));
        k += 1;
    }
    let t2 = t.mul(t);
    let mut pow = t;
    let mut sum = t;
    for n in 1..200 {
        pow = pow.mul(t2).neg();
        let term = pow.div_int(2 * n + 1);
        sum = sum.add(term);
        if negligible(term, sum) {
            break;
        }
    }
    sum.scale(k)
}

/// (sin r, cos r) for |r| < 1.
fn sin_cos(r: W) -> (W, W) {
    let r2 = r.mul(r);
    let mut s = r;
    let mut term = r;
    for n in 1..200 {
        term = term.mul(r2).div_int((2 * n) * (2 * n + 1)).neg();
        s = s.add(term);
        if negligible(term, s) {
            break;
        }
    }
    let mut c = W::ONE;
    let mut term = W::ONE;
    for n in 1..200 {
        term = term.mul(r2).div_int((2 * n - 1) * (2 * n)).neg();
        c = c.add(term);
        if negligible(term, c) {
            break;
        }
    }
    (s, c)
}

/// log2 of a positive value.
fn log2(x: W) -> W {
    const SQRT2: u128 = 0xb504_f333_f9de_6484_597d_89b3_754a_be9f;
    // x = m * 2^e with m in [sqrt(1/2), sqrt(2)).
    let mut e = x.exp;
    let mut m = W { exp: 0, ..x };
    if m.sig > SQRT2 {
        m.exp = -1;
        e += 1;
    }
    // ln m = 2 atanh((m - 1) / (m + 1)), |t| <= 0.172.
    let t = m.sub(W::ONE).div(m.add(W::ONE));
    let l = atanh(t).scale(1).mul(W::LOG2E);
    W::from_int(i64::from(e)).add(l)
}

/// 2^x - 1 for finite non-zero x (any magnitude).
fn exp2m1(u: Unp) -> W {
    let x = W::from_unp(u);
    if u.e < 0 {
        // |x| < 1.
        return expm1(x.mul(W::LN2));
    }
    if u.e > 15 {
        // Far out of range: 2^x overflows or 2^x - 1 is -1 to 128 bits.
        return if u.sign {
            W::ONE.neg().add(W::ONE.scale(-70000))
        } else {
            W::ONE.scale(70000)
        };
    }
    // x = n + f with n an integer and |f| <= 1/2.
    let n = {
        let t = (u.sig >> (63 - u.e)) as i64; // |x| truncated
        let frac_half = (u.sig << (u.e + 1)) >> 63 != 0;
        let t = t + i64::from(frac_half);
        if u.sign {
            -t
        } else {
            t
        }
    };
    let f = x.sub(W::from_int(n));
    let em = if f.is_zero() {
        W::ZERO
    } else {
        expm1(f.mul(W::LN2))
    };
    let p = W::ONE.scale(n as i32);
    // 2^n (1 + em) - 1 = (2^n - 1) + 2^n em
    p.sub(W::ONE).add(em.scale(n as i32))
}

/// F2XM1: 2^ST(0) - 1. Defined for -1 <= x <= 1; outside that range the
/// result is computed the same way (architecturally undefined).
pub fn f2xm1(a: u128, ctx: &Ctx) -> Res<u128> {
    let ca = classify(a);
    if let Some(r) = special1(a, ca) {
        return r;
    }
    match ca {
        Class::Zero => return Res::exact(a),
        Class::Infinity => {
            return Res::exact(if sign(a) {
                pack(true, BIAS as u16, INT_BIT)
            } else {
                a
            });
        }
        _ => {}
    }
    let de = if ca == Class::Denormal { DE } else { 0 };
    let u = unpack(a);
    // Integers give exact results: 2^n - 1 rounded once.
    if u.e >= 0 && u.e <= 14 && u.sig << (u.e + 1) == 0 {
        let n = (u.sig >> (63 - u.e)) as i32;
        let n = if u.sign { -n } else { n };
        if (-16445..=16383).contains(&n) {
            let p = if n >= -16382 {
                pack(false, (n + BIAS) as u16, INT_BIT)
            } else {
                // 2^n as a denormal.
                pack(false, 0, INT_BIT >> (-16382 - n))
            };
            return sub(p, ONE, &ctx.full()).with(de);
        }
    }
    exp2m1(u).round(ctx).with(de)
}

/// Is the value an exact power of two (its log2 an integer)?
fn pow2_exponent(u: Unp) -> Option<i32> {
    if u.sig == INT_BIT {
        Some(u.e)
    } else {
        None
    }
}

/// y * log2(x) for finite positive x, y: exactly when log2 x is an
/// integer, otherwise through the 128-bit evaluation.
fn y_log2(y: u128, lx: W, exact: Option<i32>, ctx: &Ctx) -> Res<u128> {
    if let Some(k) = exact {
        let kv = super::from_i64(i64::from(k));
        return mul(y, kv, &ctx.full());
    }
    let cy = classify(y);
    if cy == Class::Zero {
        return Res::exact(zero(sign(y) ^ lx.neg));
    }
    W::from_unp(unpack(y)).mul(lx).round(ctx)
}

/// ∞ * log2(x) for an infinite ST(1) = `y`: invalid when log2(x) = 0,
/// otherwise an infinity with the product's sign.
fn inf_times_log(y: u128, log_neg: bool, log_zero: bool) -> Res<u128> {
    if log_zero {
        invalid()
    } else {
        Res::exact(inf(sign(y) ^ log_neg))
    }
}

/// FYL2X: y * log2(x) with x = ST(0), y = ST(1) (SDM vol. 2, FYL2X
/// table: x < 0 is invalid, x = ±0 gives ∓∞ with ZE for finite y).
pub fn fyl2x(x: u128, y: u128, ctx: &Ctx) -> Res<u128> {
    let (cx, cy) = (classify(x), classify(y));
    if cx == Class::Unsupported || cy == Class::Unsupported {
        return invalid();
    }
    if matches!(cx, Class::QNaN | Class::SNaN) || matches!(cy, Class::QNaN | Class::SNaN) {
        return propagate(x, cx, y, cy);
    }
    let de = super::de_flag(cx, cy);
    // x < 0 (not -0): invalid.
    if sign(x) && cx != Class::Zero {
        return invalid();
    }
    match cx {
        Class::Zero => {
            // log2(0) = -inf: y * -inf.
            return match cy {
                Class::Zero => invalid(),
                Class::Infinity => Res::exact(inf(!sign(y))).with(de),
                // Only #Z, as for a division by zero.
                _ => Res::exact(inf(!sign(y))).with(ZE),
            };
        }
        Class::Infinity => {
            return match cy {
                Class::Zero => invalid(),
                _ => Res::exact(inf(sign(y))).with(de),
            };
        }
        _ => {}
    }
    let ux = unpack(x);
    let exact = pow2_exponent(ux);
    if cy == Class::Infinity {
        // log2 x is 0 for x = 1: inf * 0 is invalid.
        let log_zero = exact == Some(0);
        let log_neg = ux.e < 0;
        return inf_times_log(y, log_neg, log_zero).with(de);
    }
    let lx = if exact.is_some() {
        W::ZERO
    } else {
        log2(W::from_unp(ux))
    };
    y_log2(y, lx, exact, ctx).with(de)
}

/// FYL2XP1: ST(1) * log2(ST(0) + 1). Defined for |x| < 1 - sqrt(2)/2;
/// beyond that the result is computed the same way (architecturally
/// undefined), x <= -1 being invalid.
pub fn fyl2xp1(x: u128, y: u128, ctx: &Ctx) -> Res<u128> {
    let (cx, cy) = (classify(x), classify(y));
    if cx == Class::Unsupported || cy == Class::Unsupported {
        return invalid();
    }
    if matches!(cx, Class::QNaN | Class::SNaN) || matches!(cy, Class::QNaN | Class::SNaN) {
        return propagate(x, cx, y, cy);
    }
    let de = super::de_flag(cx, cy);
    match cx {
        Class::Zero => {
            // log2(1 + ±0) = ±0.
            return if cy == Class::Infinity {
                invalid()
            } else {
                Res::exact(zero(sign(x) ^ sign(y))).with(de)
            };
        }
        Class::Infinity => {
            return if sign(x) || cy == Class::Zero {
                invalid()
            } else {
                Res::exact(inf(sign(y))).with(de)
            };
        }
        _ => {}
    }
    let ux = unpack(x);
    let wx = W::from_unp(ux);
    let lx = if ux.e < -1 {
        // |x| < 1/2: ln(1 + x) = 2 atanh(x / (2 + x)), |t| <= 1/3.
        let two = W::ONE.scale(1);
        atanh(wx.div(two.add(wx))).scale(1).mul(W::LOG2E)
    } else {
        let z = W::ONE.add(wx);
        if z.is_zero() {
            // x = -1: log2(0).
            return match cy {
                Class::Zero => invalid(),
                Class::Infinity => Res::exact(inf(!sign(y))).with(de),
                // Only #Z, as for a division by zero.
                _ => Res::exact(inf(!sign(y))).with(ZE),
            };
        }
        if z.neg {
            return invalid();
        }
        if z.sig == 1 << 127 {
            // 1 + x is a power of two.
            let k = z.exp;
            if cy == Class::Infinity {
                return inf_times_log(y, k < 0, k == 0).with(de);
            }
            return y_log2(y, W::ZERO, Some(k), ctx).with(de);
        }
        log2(z)
    };
    if cy == Class::Infinity {
        return Res::exact(inf(sign(y) ^ lx.neg)).with(de);
    }
    y_log2(y, lx, None, ctx).with(de)
}

/// FPATAN: arctan(ST(1) / ST(0)) with the quadrant of (x, y) = (ST(0),
/// ST(1)), in [-π, π].
pub fn fpatan(x: u128, y: u128, ctx: &Ctx) -> Res<u128> {
    let (cx, cy) = (classify(x), classify(y));
    if cx == Class::Unsupported || cy == Class::Unsupported {
        return invalid();
    }
    if matches!(cx, Class::QNaN | Class::SNaN) || matches!(cy, Class::QNaN | Class::SNaN) {
        return propagate(x, cx, y, cy);
    }
    let de = super::de_flag(cx, cy);
    let sy = sign(y);
    let sx = sign(x);
    let pi = W { neg: sy, ..W::PI };
    let r = match (cx, cy) {
        // y = ±0: ±0 for x >= +0, ±π for x <= -0.
        (_, Class::Zero) => {
            if sx {
                pi.round(ctx)
            } else {
                Res::exact(zero(sy))
            }
        }
        (Class::Infinity, Class::Infinity) => {
            if sx {
                pi.mul(W::from_int(3)).scale(-2).round(ctx)
            } else {
                pi.scale(-2).round(ctx)
            }
        }
        (_, Class::Infinity) | (Class::Zero, _) => pi.scale(-1).round(ctx),
        (Class::Infinity, _) => {
            if sx {
                pi.round(ctx)
            } else {
                Res::exact(zero(sy))
            }
        }
        _ => {
            let (ux, uy) = (unpack(x), unpack(y));
            let wx = W::from_unp(ux).abs();
            let wy = W::from_unp(uy).abs();
            let swap = wy.cmp_abs(wx).is_gt();
            let mut a = if swap {
                atan(wx.div(wy))
            } else {
                atan(wy.div(wx))
            };
            if swap {
                a = W::PI.scale(-1).sub(a);
            }
            if sx {
                a = W::PI.sub(a);
            }
            let r = W { neg: sy, ..a }.round(ctx);
            // A result rounding into the denormal range from a normal
            // quotient y/x (tiny, x > 0): the processors return the
            // quotient, inexact, without underflow (seen on Emerald Rapids:
            // FPATAN of -2^-16382 / 1 rounding up gives -2^-16382, PE, no
            // UE), as FSIN does ([`trig`]).
            let q = W {
                neg: sy,
                ..wy.div(wx)
            }
            .round(ctx);
            if r.flags & UE != 0 && !sx && !swap && q.flags & UE == 0 && uy.e - ux.e < -33 {
                return q.with(PE | de);
            }
            r
        }
    };
    r.with(de)
}

/// Outcome of FSIN, FCOS, FSINCOS, FPTAN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trig {
    /// |x| >= 2^63: C2 = 1, nothing changes.
    OutOfRange,
    /// A NaN, infinity or unsupported operand: the result of both parts.
    Special(Res<u128>),
    /// (sin or tan, cos) results.
    Done(Res<u128>, Res<u128>),
}

/// 66-bit π used by the hardware argument reduction: π66 = P66 * 2^-64.
const P66: u128 = (0xc90f_daa2_2168_c234 << 2) | 3;

/// Reduce |x| (< 2^63) to the nearest multiple of π66/2: (q, r) with
/// |x| = q π66/2 + r, |r| <= π66/4, computed exactly. (Reducing to the
/// nearest multiple is what makes FSIN of the double M_PI return
/// π66 - M_PI = 0x1.1a6p-53 = 1.2246063538223773e-16, the value Intel
/// processors are known to return.)
fn reduce(u: Unp) -> (u64, W) {
    if u.e < -2 {
        // |x| < 1/4 < π/4.
        return (0, W::from_unp(Unp { sign: false, ..u }));
    }
    // |x| / (π66/2) = sig * 2^(e + 2) / P66, all integers.
    let n = u128::from(u.sig) << (u.e + 2);
    let q = (n / P66) as u64;
    let r = n % P66;
    // r * 2^-65 is the remainder; move it into [-π/4, π/4].
    if r << 1 > P66 {
        (q + 1, W::new(true, 127 - 65, P66 - r))
    } else {
        (q, W::new(false, 127 - 65, r))
    }
}

/// FSIN/FCOS/FSINCOS (`tan` false) or FPTAN (`tan` true).
pub fn trig(a: u128, tan: bool, ctx: &Ctx) -> Trig {
    let ca = classify(a);
    match ca {
        Class::Unsupported | Class::Infinity => return Trig::Special(invalid()),
        Class::QNaN | Class::SNaN => return Trig::Special(quiet(a, ca)),
        // sin ±0 = ±0, cos 0 = 1, tan ±0 = ±0 (and FPTAN pushes 1).
        Class::Zero => return Trig::Done(Res::exact(a), Res::exact(ONE)),
        _ => {}
    }
    let de = if ca == Class::Denormal { DE } else { 0 };
    let u = unpack(a);
    if u.e >= 63 {
        return Trig::OutOfRange;
    }
    let (q, r) = reduce(u);
    let (s, c) = sin_cos(r);
    let (mut sn, cs) = match q & 3 {
        0 => (s, c),
        1 => (c, s.neg()),
        2 => (s.neg(), c.neg()),
        _ => (c.neg(), s),
    };
    if u.sign {
        sn = sn.neg();
    }
    // A normal argument whose sine or tangent rounds into the denormal
    // range (|x| near 2^-16382, rounding towards zero): the processors
    // return the argument itself, inexact, without underflow (seen on
    // Emerald Rapids: FSIN/FSINCOS of -2^-16382 rounding up give
    // -2^-16382, PE and no UE); within 1 ulp of the exact result.
    let no_denormal = |r: Res<u128>| {
        if ca == Class::Normal && r.flags & UE != 0 {
            Res {
                v: a,
                flags: PE,
                up: false,
            }
        } else {
            r
        }
    };
    if tan {
        let t = sn.div(cs);
        return Trig::Done(no_denormal(t.round(ctx)).with(de), Res::exact(ONE));
    }
    Trig::Done(no_denormal(sn.round(ctx)).with(de), cs.round(ctx).with(de))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: W, b: W, bits: i32) {
        let d = a.sub(b);
        assert!(d.is_zero() || d.exp < a.exp - bits, "{a:?} {b:?} {d:?}");
    }

    /// The 128-bit constants agree with values computed by the 128-bit
    /// arithmetic itself.
    #[test]
    fn constants_are_consistent() {
        // Machin: π = 16 atan(1/5) - 4 atan(1/239).
        let pi = atan(W::ONE.div_int(5))
            .scale(4)
            .sub(atan(W::ONE.div_int(239)).scale(2));
        close(pi, W::PI, 120);
        close(atan(W::ONE).scale(2), W::PI, 120);
        // ln 2 = 2 atanh(1/3).
        close(atanh(W::ONE.div_int(3)).scale(1), W::LN2, 120);
        close(W::ONE.div(W::LN2), W::LOG2E, 124);
        close(log2(W::from_int(10)), W::L2T, 120);
        close(W::ONE.div(W::L2T), W::LG2, 124);
        close(
            W::from_int(2).sqrt().mul(W::from_int(2).sqrt()),
            W::from_int(2),
            124,
        );
        close(
            log2(W::from_int(3).div_int(4)).add(W::from_int(2)),
            log2(W::from_int(3)),
            120,
        );
        close(expm1(W::LN2), W::ONE, 120);
        let (s, c) = sin_cos(W::PI.scale(-2));
        close(s, c, 120);
        close(s.mul(s).scale(1), W::ONE, 120);
    }

    #[test]
    fn reduction_uses_the_66_bit_pi() {
        // x = 4 π66/2 + r exactly (n * 2^-65 with n a multiple of 16, so
        // that it fits a 64-bit significand): the remainder is r.
        let base = P66 * 4 + (1 << 63);
        let adj = (16 - (base & 15)) & 15;
        let n = base + adj;
        assert_eq!(n >> 67, 1);
        let u = Unp {
            sign: false,
            e: 2,
            sig: (n >> 4) as u64,
        };
        let (q, r) = reduce(u);
        assert_eq!(q, 4);
        assert_eq!(r, W::new(false, 127 - 65, (1 << 63) + adj));
    }
}
