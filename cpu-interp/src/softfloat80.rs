//! x87 double-extended (80-bit) arithmetic with the x87's own rules.
//!
//! Values travel as raw 80-bit patterns in the low bits of a `u128`: sign
//! (bit 79), biased exponent (78:64) and a 64-bit significand with an
//! explicit integer bit (63). Every operation returns the result together
//! with the exception flags it raised ([`IE`]..[`PE`], FSW bit positions)
//! and whether the result was rounded up in magnitude (FSW.C1).
//!
//! Design: the basic operations (add, subtract, multiply, divide, square
//! root, partial remainder, round to integer, scale, conversions) compute
//! the exact result (or the exact leading bits plus a sticky bit) with
//! integer arithmetic on the significands and round it once in
//! [`round_pack`]. That one routine implements what the x87 does and
//! general-purpose IEEE libraries don't:
//! - precision control: 24-, 53- or 64-bit significands with the full
//!   15-bit exponent range (SDM vol. 1, 8.1.5.2), so a PC=24 denormal has a
//!   quantum of 2^(-16382-23);
//! - tininess detected after rounding (SDM vol. 1, 4.9.1.5): masked
//!   underflow sets UE only when the denormalised result is also inexact;
//! - the unmasked overflow/underflow response for register destinations:
//!   the exponent is bias-adjusted by ∓24576 (SDM vol. 1, 8.5.4, 8.5.5);
//! - the masked overflow response (∞ or the largest finite value of the
//!   precision, by rounding mode and sign).
//!
//! NaN handling follows SDM vol. 1 table 4-7 (an SNaN is quietened; with
//! two NaNs the QNaN wins over an SNaN, otherwise the larger significand);
//! invalid operations produce the real indefinite; pseudo-NaNs,
//! pseudo-infinities and unnormals are unsupported operands (IE), while
//! pseudo-denormals are accepted as denormals (DE), as on every x87 since
//! the 387.
//!
//! `rustc_apfloat` serves only as an independent oracle in the tests: it
//! has no precision control, and does not know the x87 NaN, unsupported
//! encoding and denormal-operand rules.
//!
//! The transcendental functions live in [`trans`].

pub mod trans;

/// Invalid operation.
pub const IE: u16 = 0x01;
/// Denormal operand.
pub const DE: u16 = 0x02;
/// Zero divide.
pub const ZE: u16 = 0x04;
/// Overflow.
pub const OE: u16 = 0x08;
/// Underflow.
pub const UE: u16 = 0x10;
/// Precision (inexact result).
pub const PE: u16 = 0x20;

/// The real indefinite: the default QNaN of masked invalid operations.
pub const INDEFINITE: u128 = 0xffff_c000_0000_0000_0000;
/// Double-precision indefinite.
pub const F64_INDEFINITE: u64 = 0xfff8_0000_0000_0000;
/// Single-precision indefinite.
pub const F32_INDEFINITE: u32 = 0xffc0_0000;
/// +1.0
pub const ONE: u128 = 0x3fff_8000_0000_0000_0000;
/// Packed-BCD indefinite (FBSTP of an invalid operand).
pub const BCD_INDEFINITE: u128 = 0xffff_c000_0000_0000_0000;

const INT_BIT: u64 = 1 << 63;
const QUIET: u64 = 1 << 62;
const BIAS: i32 = 16383;
/// Exponent adjustment of the unmasked overflow/underflow response.
const BIAS_ADJUST: i32 = 24576;
/// Exponent range of the double-extended format (unbiased).
const EXT_EMIN: i32 = -16382;
const EXT_EMAX: i32 = 16383;

/// Rounding control (FCW.RC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rc {
    Nearest,
    Down,
    Up,
    Zero,
}

impl Rc {
    /// RC field of a control word.
    pub fn from_fcw(fcw: u16) -> Rc {
        match (fcw >> 10) & 3 {
            0 => Rc::Nearest,
            1 => Rc::Down,
            2 => Rc::Up,
            _ => Rc::Zero,
        }
    }
}

/// Rounding context: rounding mode, significand precision of
/// double-extended results and the exceptions whose masks are clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ctx {
    pub rc: Rc,
    /// 24, 53 or 64.
    pub prec: u32,
    /// Exception bits (IE..PE) that are unmasked.
    pub unmasked: u16,
}

impl Ctx {
    /// The context a control word describes. PC = 01 is reserved; like
    /// other implementations we treat it as 64 bits.
    pub fn from_fcw(fcw: u16) -> Ctx {
        Ctx {
            rc: Rc::from_fcw(fcw),
            prec: match (fcw >> 8) & 3 {
                0 => 24,
                2 => 53,
                _ => 64,
            },
            unmasked: !fcw & 0x3f,
        }
    }

    /// The same context with 64-bit precision: precision control applies
    /// only to FADD..FDIVR and FSQRT (SDM vol. 1, 8.1.5.2).
    pub fn full(self) -> Ctx {
        Ctx { prec: 64, ..self }
    }
}

/// A result with the exceptions it raised and the C1 "rounded up" bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Res<T> {
    pub v: T,
    pub flags: u16,
    pub up: bool,
}

impl<T> Res<T> {
    fn exact(v: T) -> Self {
        Res {
            v,
            flags: 0,
            up: false,
        }
    }
    fn with(mut self, flags: u16) -> Self {
        self.flags |= flags;
        self
    }
}

fn invalid() -> Res<u128> {
    Res {
        v: INDEFINITE,
        flags: IE,
        up: false,
    }
}

/// Operand classes as the x87 sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Zero,
    /// Denormal or pseudo-denormal (exponent 0, non-zero significand).
    Denormal,
    Normal,
    Infinity,
    QNaN,
    SNaN,
    /// Pseudo-NaN, pseudo-infinity or unnormal.
    Unsupported,
}

#[inline]
pub fn sign(x: u128) -> bool {
    (x >> 79) & 1 != 0
}

#[inline]
pub fn exp_field(x: u128) -> u16 {
    (x >> 64) as u16 & 0x7fff
}

#[inline]
pub fn sig_field(x: u128) -> u64 {
    x as u64
}

/// Assemble an 80-bit value.
#[inline]
pub fn pack(sign: bool, exp: u16, sig: u64) -> u128 {
    (u128::from(sign) << 79) | (u128::from(exp & 0x7fff) << 64) | u128::from(sig)
}

pub fn classify(x: u128) -> Class {
    let e = exp_field(x);
    let s = sig_field(x);
    match e {
        0 if s == 0 => Class::Zero,
        0 => Class::Denormal,
        0x7fff if s & INT_BIT == 0 => Class::Unsupported,
        0x7fff if s << 1 == 0 => Class::Infinity,
        0x7fff if s & QUIET != 0 => Class::QNaN,
        0x7fff => Class::SNaN,
        _ if s & INT_BIT == 0 => Class::Unsupported,
        _ => Class::Normal,
    }
}

/// A pseudo-denormal (exponent 0, integer bit set) in its normal form:
/// exponent 1, the same value. The processors return them so when an
/// operation passes an operand through.
#[inline]
fn canonical(x: u128) -> u128 {
    if exp_field(x) == 0 && sig_field(x) & INT_BIT != 0 {
        x | (1 << 64)
    } else {
        x
    }
}

#[inline]
fn is_nan(c: Class) -> bool {
    matches!(c, Class::QNaN | Class::SNaN)
}

#[inline]
fn zero(sign: bool) -> u128 {
    pack(sign, 0, 0)
}

#[inline]
fn inf(sign: bool) -> u128 {
    pack(sign, 0x7fff, INT_BIT)
}

/// A finite non-zero value: sig * 2^(e - 63), `sig` normalised (bit 63 set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Unp {
    pub sign: bool,
    pub e: i32,
    pub sig: u64,
}

/// Unpack a normal or (pseudo-)denormal value.
pub(crate) fn unpack(x: u128) -> Unp {
    let s = sig_field(x);
    let e = i32::from(exp_field(x));
    if e == 0 {
        // Denormals have the exponent of 2^-16382; normalise them.
        let lz = s.leading_zeros();
        Unp {
            sign: sign(x),
            e: EXT_EMIN - lz as i32,
            sig: s << lz,
        }
    } else {
        Unp {
            sign: sign(x),
            e: e - BIAS,
            sig: s,
        }
    }
}

/// Quieten one NaN operand (IE when it was signalling).
fn quiet(x: u128, c: Class) -> Res<u128> {
    Res {
        v: x | u128::from(QUIET),
        flags: if c == Class::SNaN { IE } else { 0 },
        up: false,
    }
}

/// The NaN result of a two-operand instruction (SDM vol. 1, table 4-7):
/// an SNaN is quietened; a QNaN wins over an SNaN; of two NaNs of the same
/// kind the one with the larger significand wins (the positive one on a
/// tie).
fn propagate(a: u128, ca: Class, b: u128, cb: Class) -> Res<u128> {
    let flags = if ca == Class::SNaN || cb == Class::SNaN {
        IE
    } else {
        0
    };
    let qa = a | u128::from(QUIET);
    let qb = b | u128::from(QUIET);
    let v = match (is_nan(ca), is_nan(cb)) {
        (true, false) => qa,
        (false, true) => qb,
        _ => {
            if ca == Class::SNaN && cb == Class::QNaN {
                qb
            } else if ca == Class::QNaN && cb == Class::SNaN {
                qa
            } else {
                let (sa, sb) = (sig_field(qa), sig_field(qb));
                if sa > sb || (sa == sb && !sign(a)) {
                    qa
                } else {
                    qb
                }
            }
        }
    };
    Res {
        v,
        flags,
        up: false,
    }
}

/// Unsupported operands and NaNs of a two-operand operation.
fn special2(a: u128, ca: Class, b: u128, cb: Class) -> Option<Res<u128>> {
    if ca == Class::Unsupported || cb == Class::Unsupported {
        return Some(invalid());
    }
    if is_nan(ca) || is_nan(cb) {
        return Some(propagate(a, ca, b, cb));
    }
    None
}

/// Unsupported operand or NaN of a one-operand operation.
fn special1(a: u128, ca: Class) -> Option<Res<u128>> {
    match ca {
        Class::Unsupported => Some(invalid()),
        Class::QNaN | Class::SNaN => Some(quiet(a, ca)),
        _ => None,
    }
}

fn de_flag(ca: Class, cb: Class) -> u16 {
    if ca == Class::Denormal || cb == Class::Denormal {
        DE
    } else {
        0
    }
}

// ---- rounding -----------------------------------------------------------

/// Destination formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fmt {
    /// Double extended, significand precision from the context.
    Ext,
    F64,
    F32,
}

/// Keep `sig >> shift`, rounding by `rc`. Returns (rounded, inexact,
/// incremented).
fn round_sig(sig: u128, shift: u32, sign: bool, rc: Rc) -> (u128, bool, bool) {
    if shift == 0 {
        return (sig, false, false);
    }
    let (m, round_bit, sticky) = if shift > 128 {
        (0, false, sig != 0)
    } else if shift == 128 {
        (0, sig >> 127 != 0, sig << 1 != 0)
    } else {
        let m = sig >> shift;
        let rb = (sig >> (shift - 1)) & 1 != 0;
        let st = sig & ((1u128 << (shift - 1)) - 1) != 0;
        (m, rb, st)
    };
    let inexact = round_bit || sticky;
    let inc = match rc {
        Rc::Nearest => round_bit && (sticky || m & 1 != 0),
        Rc::Zero => false,
        Rc::Up => !sign && inexact,
        Rc::Down => sign && inexact,
    };
    (m + u128::from(inc), inexact, inc)
}

/// Encode: `be` biased exponent, `sig` a 64-bit significand with the
/// integer bit at 63 (clear for denormals).
fn encode(fmt: Fmt, sign: bool, be: i32, sig: u64) -> u128 {
    match fmt {
        Fmt::Ext => pack(sign, be as u16, sig),
        Fmt::F64 => {
            (u128::from(sign) << 63)
                | ((be as u128 & 0x7ff) << 52)
                | u128::from((sig >> 11) & ((1 << 52) - 1))
        }
        Fmt::F32 => {
            (u128::from(sign) << 31)
                | ((be as u128 & 0xff) << 23)
                | u128::from((sig >> 40) & ((1 << 23) - 1))
        }
    }
}

fn fmt_params(fmt: Fmt, ctx: &Ctx) -> (u32, i32, i32, i32) {
    // (precision, emin, emax, bias)
    match fmt {
        Fmt::Ext => (ctx.prec, EXT_EMIN, EXT_EMAX, BIAS),
        Fmt::F64 => (53, -1022, 1023, 1023),
        Fmt::F32 => (24, -126, 127, 127),
    }
}

fn fmt_inf(fmt: Fmt, sign: bool) -> u128 {
    match fmt {
        Fmt::Ext => inf(sign),
        Fmt::F64 => (u128::from(sign) << 63) | (0x7ff << 52),
        Fmt::F32 => (u128::from(sign) << 31) | (0xff << 23),
    }
}

/// Round `sign * sig * 2^(e - 127)` (sig non-zero) to `fmt` with the
/// x87's overflow and underflow rules.
pub(crate) fn round_pack(sign: bool, e: i32, sig: u128, fmt: Fmt, ctx: &Ctx) -> Res<u128> {
    if sig == 0 {
        return Res::exact(encode(fmt, sign, 0, 0));
    }
    let lz = sig.leading_zeros();
    let sig = sig << lz;
    let e = e - lz as i32;
    let (p, emin, emax, bias) = fmt_params(fmt, ctx);
    let (mut m, inexact, up) = round_sig(sig, 128 - p, sign, ctx.rc);
    let mut er = e;
    if m >> p != 0 {
        m >>= 1;
        er += 1;
    }
    let pe = if inexact { PE } else { 0 };
    let ext = fmt == Fmt::Ext;
    if er > emax {
        // Overflow. Unmasked, a register destination receives the result
        // with its exponent reduced by 24576 (SDM vol. 1, 8.5.4).
        if ext && ctx.unmasked & OE != 0 && er - BIAS_ADJUST <= emax {
            return Res {
                v: encode(fmt, sign, er - BIAS_ADJUST + bias, (m << (64 - p)) as u64),
                flags: OE | pe,
                up,
            };
        }
        if ext && ctx.unmasked & OE != 0 {
            // Too large even with the adjustment (an FSCALE by a huge
            // factor): an infinity of the result's sign whatever RC says,
            // C1 set (seen on Emerald Rapids).
            return Res {
                v: fmt_inf(fmt, sign),
                flags: OE | PE,
                up: true,
            };
        }
        let to_inf = match ctx.rc {
            Rc::Nearest => true,
            Rc::Zero => false,
            Rc::Up => !sign,
            Rc::Down => sign,
        };
        let v = if to_inf {
            fmt_inf(fmt, sign)
        } else {
            let max = ((1u128 << p) - 1) << (64 - p);
            encode(fmt, sign, emax + bias, max as u64)
        };
        return Res {
            v,
            flags: OE | PE,
            up: to_inf,
        };
    }
    if er >= emin {
        return Res {
            v: encode(fmt, sign, er + bias, (m << (64 - p)) as u64),
            flags: pe,
            up,
        };
    }
    // Tiny after rounding. Unmasked, a register destination receives the
    // result with its exponent raised by 24576 (SDM vol. 1, 8.5.5).
    let mut flags = 0;
    if ctx.unmasked & UE != 0 {
        if ext && er + BIAS_ADJUST >= emin {
            return Res {
                v: encode(fmt, sign, er + BIAS_ADJUST + bias, (m << (64 - p)) as u64),
                flags: UE | pe,
                up,
            };
        }
        if ext {
            // Too small even with the adjustment (an FSCALE by a huge
            // negative factor): a zero of the result's sign, not rounded
            // up whatever RC says (seen on Emerald Rapids).
            return Res {
                v: zero(sign),
                flags: UE | PE,
                up: false,
            };
        }
        flags |= UE;
    }
    // Denormalise the exact value: the quantum is 2^(emin - (p - 1)).
    let d = (emin - e) as u32; // >= 1 since e <= er < emin
    let shift = (128 - p).saturating_add(d);
    let (m, inexact, up) = round_sig(sig, shift, sign, ctx.rc);
    if inexact {
        flags |= UE | PE;
    }
    let be = if m >> (p - 1) != 0 { 1 } else { 0 };
    Res {
        v: encode(fmt, sign, be, (m << (64 - p)) as u64),
        flags,
        up,
    }
}

/// Round an unpacked value to double extended.
fn round_unp(u: Unp, ctx: &Ctx) -> Res<u128> {
    round_pack(u.sign, u.e, u128::from(u.sig) << 64, Fmt::Ext, ctx)
}

/// An exact zero result: +0, or -0 when rounding down (IEEE 754 6.3).
fn exact_zero(ctx: &Ctx) -> u128 {
    zero(ctx.rc == Rc::Down)
}

// ---- arithmetic ---------------------------------------------------------

/// Shift right, ORing the lost bits into bit 0.
fn shr_jam(x: u128, n: u32) -> u128 {
    if n == 0 {
        x
    } else if n >= 128 {
        u128::from(x != 0)
    } else {
        (x >> n) | u128::from(x << (128 - n) != 0)
    }
}

/// a + b
pub fn add(a: u128, b: u128, ctx: &Ctx) -> Res<u128> {
    add_sub(a, b, false, ctx)
}

/// a - b
pub fn sub(a: u128, b: u128, ctx: &Ctx) -> Res<u128> {
    add_sub(a, b, true, ctx)
}

fn add_sub(a: u128, b: u128, negate: bool, ctx: &Ctx) -> Res<u128> {
    let (ca, cb) = (classify(a), classify(b));
    if let Some(r) = special2(a, ca, b, cb) {
        return r;
    }
    let de = de_flag(ca, cb);
    let sa = sign(a);
    let sb = sign(b) ^ negate;
    match (ca, cb) {
        (Class::Infinity, Class::Infinity) => {
            if sa != sb {
                invalid()
            } else {
                Res::exact(inf(sa))
            }
        }
        (Class::Infinity, _) => Res::exact(inf(sa)).with(de),
        (_, Class::Infinity) => Res::exact(inf(sb)).with(de),
        (Class::Zero, Class::Zero) => Res::exact(if sa == sb { zero(sa) } else { exact_zero(ctx) }),
        (Class::Zero, _) => {
            let u = unpack(b);
            round_unp(Unp { sign: sb, ..u }, ctx).with(de)
        }
        (_, Class::Zero) => round_unp(unpack(a), ctx).with(de),
        _ => {
            let ua = unpack(a);
            let ub = Unp {
                sign: sb,
                ..unpack(b)
            };
            let (big, small) = if (ua.e, ua.sig) >= (ub.e, ub.sig) {
                (ua, ub)
            } else {
                (ub, ua)
            };
            let d = (big.e - small.e) as u32;
            let x = u128::from(big.sig) << 62;
            let y = shr_jam(u128::from(small.sig) << 62, d);
            let r = if big.sign == small.sign { x + y } else { x - y };
            if r == 0 {
                return Res::exact(exact_zero(ctx)).with(de);
            }
            round_pack(big.sign, big.e + 2, r, Fmt::Ext, ctx).with(de)
        }
    }
}

/// a * b
pub fn mul(a: u128, b: u128, ctx: &Ctx) -> Res<u128> {
    let (ca, cb) = (classify(a), classify(b));
    if let Some(r) = special2(a, ca, b, cb) {
        return r;
    }
    let de = de_flag(ca, cb);
    let s = sign(a) ^ sign(b);
    match (ca, cb) {
        (Class::Infinity, Class::Zero) | (Class::Zero, Class::Infinity) => invalid(),
        (Class::Infinity, _) | (_, Class::Infinity) => Res::exact(inf(s)).with(de),
        (Class::Zero, _) | (_, Class::Zero) => Res::exact(zero(s)).with(de),
        _ => {
            let (ua, ub) = (unpack(a), unpack(b));
            let p = u128::from(ua.sig) * u128::from(ub.sig);
            round_pack(s, ua.e + ub.e + 1, p, Fmt::Ext, ctx).with(de)
        }
    }
}

/// a / b
pub fn div(a: u128, b: u128, ctx: &Ctx) -> Res<u128> {
    let (ca, cb) = (classify(a), classify(b));
    if let Some(r) = special2(a, ca, b, cb) {
        return r;
    }
    let de = de_flag(ca, cb);
    let s = sign(a) ^ sign(b);
    match (ca, cb) {
        (Class::Zero, Class::Zero) | (Class::Infinity, Class::Infinity) => invalid(),
        (Class::Infinity, _) => Res::exact(inf(s)).with(de),
        (_, Class::Infinity) => Res::exact(zero(s)).with(de),
        // A zero divisor reports only #Z, even for a denormal dividend
        // (hardware does not report D then).
        (_, Class::Zero) => Res::exact(inf(s)).with(ZE),
        (Class::Zero, _) => Res::exact(zero(s)).with(de),
        _ => {
            let (ua, ub) = (unpack(a), unpack(b));
            let (x, y) = (u128::from(ua.sig) << 63, u128::from(ub.sig));
            // q = floor(A * 2^127 / B), computed as two 64-bit digits.
            let (q1, r1) = (x / y, x % y);
            let (q2, r2) = ((r1 << 64) / y, (r1 << 64) % y);
            let q = (q1 << 64) | q2 | u128::from(r2 != 0);
            round_pack(s, ua.e - ub.e, q, Fmt::Ext, ctx).with(de)
        }
    }
}

/// Square root, exactly rounded.
pub fn sqrt(a: u128, ctx: &Ctx) -> Res<u128> {
    let ca = classify(a);
    if let Some(r) = special1(a, ca) {
        return r;
    }
    match ca {
        Class::Zero => return Res::exact(a),
        Class::Infinity if !sign(a) => return Res::exact(a),
        _ if sign(a) => return invalid(),
        _ => {}
    }
    let de = if ca == Class::Denormal { DE } else { 0 };
    let u = unpack(a);
    // a = n * 2^k with k even; n has 64 or 65 bits.
    let mut k = u.e - 63;
    let mut n = u128::from(u.sig);
    if k & 1 != 0 {
        n <<= 1;
        k -= 1;
    }
    // Digit-by-digit square root of n * 4^33: a 66-bit root (> 64 bits,
    // round bit and more) plus the remainder as sticky.
    let mut q: u128 = 0;
    let mut r: u128 = 0;
    for i in (0..66).rev() {
        let pair = if i >= 33 {
            (n >> (2 * (i - 33))) & 3
        } else {
            0
        };
        r = (r << 2) | pair;
        let t = (q << 2) | 1;
        if r >= t {
            r -= t;
            q = (q << 1) | 1;
        } else {
            q <<= 1;
        }
    }
    // sqrt(a) = q * 2^(k/2 - 33); one more bit carries the sticky.
    let sig = (q << 1) | u128::from(r != 0);
    round_pack(false, k / 2 - 34 + 127, sig, Fmt::Ext, ctx).with(de)
}

/// Round to an integral value (FRNDINT).
pub fn round_int(a: u128, ctx: &Ctx) -> Res<u128> {
    let ca = classify(a);
    if let Some(r) = special1(a, ca) {
        return r;
    }
    match ca {
        Class::Zero | Class::Infinity => return Res::exact(a),
        _ => {}
    }
    let de = if ca == Class::Denormal { DE } else { 0 };
    let u = unpack(a);
    if u.e >= 63 {
        return Res::exact(a);
    }
    let shift = (63 - u.e).min(200) as u32;
    let (m, inexact, up) = round_sig(u128::from(u.sig), shift, u.sign, ctx.rc);
    let v = if m == 0 {
        zero(u.sign)
    } else {
        round_pack(u.sign, 127, m, Fmt::Ext, &ctx.full()).v
    };
    Res {
        v,
        flags: de | if inexact { PE } else { 0 },
        up,
    }
}

/// An integer as double extended (exact).
pub fn from_i64(v: i64) -> u128 {
    if v == 0 {
        return 0;
    }
    let m = v.unsigned_abs();
    let lz = m.leading_zeros();
    pack(v < 0, (BIAS + 63 - lz as i32) as u16, m << lz)
}

/// Convert to a signed integer of `bits` bits, rounding by `rc` (or
/// truncating when `rc` is `None`, FISTTP). Invalid operands and values
/// out of range give IE and the integer indefinite (the most negative
/// value).
pub fn to_int(a: u128, bits: u32, rc: Option<Rc>) -> Res<i64> {
    let indefinite = Res {
        v: i64::MIN >> (64 - bits),
        flags: IE,
        up: false,
    };
    match classify(a) {
        Class::Zero => return Res::exact(0),
        Class::Denormal | Class::Normal => {}
        _ => return indefinite,
    }
    let u = unpack(a);
    if u.e >= 64 {
        return indefinite;
    }
    let (m, inexact, up) = if u.e >= 63 {
        (u128::from(u.sig), false, false)
    } else {
        let shift = (63 - u.e).min(200) as u32;
        round_sig(u128::from(u.sig), shift, u.sign, rc.unwrap_or(Rc::Zero))
    };
    let limit = if u.sign {
        1u128 << (bits - 1)
    } else {
        (1u128 << (bits - 1)) - 1
    };
    if m > limit {
        return indefinite;
    }
    let v = if u.sign {
        (m as i128).wrapping_neg()
    } else {
        m as i128
    };
    Res {
        v: v as i64,
        flags: if inexact { PE } else { 0 },
        up,
    }
}

/// Packed BCD (18 digits, sign in bit 79) to double extended. Invalid
/// digits are undefined architecturally; they are weighted as given.
pub fn from_bcd(x: u128) -> u128 {
    let mut v: u64 = 0;
    for i in (0..18).rev() {
        let digit = ((x >> (4 * i)) & 0xf) as u64;
        v = v * 10 + digit;
    }
    let neg = (x >> 79) & 1 != 0;
    if v == 0 {
        return zero(neg);
    }
    let lz = v.leading_zeros();
    pack(neg, (BIAS + 63 - lz as i32) as u16, v << lz)
}

/// Double extended to packed BCD, rounding by `rc` (FBSTP).
pub fn to_bcd(a: u128, rc: Rc) -> Res<u128> {
    let indefinite = Res {
        v: BCD_INDEFINITE,
        flags: IE,
        up: false,
    };
    let (m, inexact, up) = match classify(a) {
        Class::Zero => (0, false, false),
        Class::Denormal | Class::Normal => {
            let u = unpack(a);
            if u.e >= 64 {
                return indefinite;
            }
            if u.e >= 63 {
                (u128::from(u.sig), false, false)
            } else {
                round_sig(u128::from(u.sig), (63 - u.e).min(200) as u32, u.sign, rc)
            }
        }
        _ => return indefinite,
    };
    if m > 999_999_999_999_999_999 {
        return indefinite;
    }
    let mut out: u128 = u128::from(sign(a)) << 79;
    let mut m = m as u64;
    for i in 0..18 {
        out |= u128::from(m % 10) << (4 * i);
        m /= 10;
    }
    Res {
        v: out,
        flags: if inexact { PE } else { 0 },
        up,
    }
}

/// Single precision to double extended (exact; IE for an SNaN, which is
/// quietened; DE for a denormal).
pub fn from_f32(bits: u32) -> Res<u128> {
    let s = bits >> 31 != 0;
    let e = ((bits >> 23) & 0xff) as i32;
    let f = u64::from(bits & 0x7f_ffff);
    match e {
        0xff if f == 0 => Res::exact(inf(s)),
        0xff => {
            let snan = f & (1 << 22) == 0;
            Res {
                v: pack(s, 0x7fff, INT_BIT | QUIET | (f << 40)),
                flags: if snan { IE } else { 0 },
                up: false,
            }
        }
        0 if f == 0 => Res::exact(zero(s)),
        0 => {
            let lz = f.leading_zeros();
            Res {
                v: pack(s, (BIAS - 86 - lz as i32) as u16, f << lz),
                flags: DE,
                up: false,
            }
        }
        _ => Res::exact(pack(s, (e - 127 + BIAS) as u16, INT_BIT | (f << 40))),
    }
}

/// Double precision to double extended.
pub fn from_f64(bits: u64) -> Res<u128> {
    let s = bits >> 63 != 0;
    let e = ((bits >> 52) & 0x7ff) as i32;
    let f = bits & ((1 << 52) - 1);
    match e {
        0x7ff if f == 0 => Res::exact(inf(s)),
        0x7ff => {
            let snan = f & (1 << 51) == 0;
            Res {
                v: pack(s, 0x7fff, INT_BIT | QUIET | (f << 11)),
                flags: if snan { IE } else { 0 },
                up: false,
            }
        }
        0 if f == 0 => Res::exact(zero(s)),
        0 => {
            let lz = f.leading_zeros();
            Res {
                v: pack(s, (BIAS - 1011 - lz as i32) as u16, f << lz),
                flags: DE,
                up: false,
            }
        }
        _ => Res::exact(pack(s, (e - 1023 + BIAS) as u16, INT_BIT | (f << 11))),
    }
}

fn to_narrow(a: u128, fmt: Fmt, ctx: &Ctx) -> Res<u128> {
    let ca = classify(a);
    let s = sign(a);
    let (indef, shift, exp_all) = match fmt {
        Fmt::F64 => (u128::from(F64_INDEFINITE), 11, 0x7ffu128 << 52),
        _ => (u128::from(F32_INDEFINITE), 40, 0xffu128 << 23),
    };
    let sbit = match fmt {
        Fmt::F64 => u128::from(s) << 63,
        _ => u128::from(s) << 31,
    };
    match ca {
        Class::Unsupported => Res {
            v: indef,
            flags: IE,
            up: false,
        },
        Class::QNaN | Class::SNaN => {
            // Keep the sign and the high significand bits (quietened).
            let frac = u128::from(((sig_field(a) | QUIET) & !INT_BIT) >> shift);
            Res {
                v: sbit | exp_all | frac,
                flags: if ca == Class::SNaN { IE } else { 0 },
                up: false,
            }
        }
        Class::Infinity => Res::exact(sbit | exp_all),
        Class::Zero => Res::exact(sbit),
        // A denormal source raises no #D here (the SDM lists none for
        // FST m32/m64, and the processors report none).
        _ => {
            let u = unpack(a);
            round_pack(u.sign, u.e, u128::from(u.sig) << 64, fmt, ctx)
        }
    }
}

/// Double extended to single precision (FST m32fp).
pub fn to_f32(a: u128, ctx: &Ctx) -> Res<u32> {
    let r = to_narrow(a, Fmt::F32, ctx);
    Res {
        v: r.v as u32,
        flags: r.flags,
        up: r.up,
    }
}

/// Double extended to double precision (FST m64fp).
pub fn to_f64(a: u128, ctx: &Ctx) -> Res<u64> {
    let r = to_narrow(a, Fmt::F64, ctx);
    Res {
        v: r.v as u64,
        flags: r.flags,
        up: r.up,
    }
}

/// Comparison outcomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Less,
    Equal,
    Greater,
    Unordered,
}

/// Compare `a` with `b`. `quiet` (FUCOM*) raises IE only for SNaNs and
/// unsupported operands; otherwise (FCOM*, FTST, FICOM) any NaN raises IE.
pub fn compare(a: u128, b: u128, quiet: bool) -> (Cmp, u16) {
    let (ca, cb) = (classify(a), classify(b));
    if ca == Class::Unsupported || cb == Class::Unsupported {
        return (Cmp::Unordered, IE);
    }
    if is_nan(ca) || is_nan(cb) {
        let ie = !quiet || ca == Class::SNaN || cb == Class::SNaN;
        return (Cmp::Unordered, if ie { IE } else { 0 });
    }
    let de = de_flag(ca, cb);
    let key = |x: u128, c: Class| -> (u8, i32, u64) {
        match c {
            Class::Zero => (0, 0, 0),
            Class::Infinity => (2, 0, 0),
            _ => {
                let u = unpack(x);
                (1, u.e, u.sig)
            }
        }
    };
    let (ka, kb) = (key(a, ca), key(b, cb));
    if ka.0 == 0 && kb.0 == 0 {
        return (Cmp::Equal, de);
    }
    let (sa, sb) = (sign(a) && ka.0 != 0, sign(b) && kb.0 != 0);
    let ord = if sa != sb {
        if sa {
            std::cmp::Ordering::Less
        } else {
            std::cmp::Ordering::Greater
        }
    } else if sa {
        kb.cmp(&ka)
    } else {
        ka.cmp(&kb)
    };
    let c = match ord {
        std::cmp::Ordering::Less => Cmp::Less,
        std::cmp::Ordering::Equal => Cmp::Equal,
        std::cmp::Ordering::Greater => Cmp::Greater,
    };
    (c, de)
}

/// FSCALE: a * 2^trunc(b) (not subject to precision control).
pub fn scale(a: u128, b: u128, ctx: &Ctx) -> Res<u128> {
    let (ca, cb) = (classify(a), classify(b));
    if let Some(r) = special2(a, ca, b, cb) {
        return r;
    }
    let de = de_flag(ca, cb);
    let sa = sign(a);
    if cb == Class::Infinity {
        return if sign(b) {
            if ca == Class::Infinity {
                invalid()
            } else {
                Res::exact(zero(sa)).with(de)
            }
        } else if ca == Class::Zero {
            invalid()
        } else {
            Res::exact(inf(sa)).with(de)
        };
    }
    if ca == Class::Infinity || ca == Class::Zero {
        return Res::exact(a).with(de);
    }
    // The scale factor, truncated toward zero; huge factors are clamped
    // (they overflow or underflow anyway).
    let n: i32 = if cb == Class::Zero {
        0
    } else {
        let u = unpack(b);
        let mag = if u.e < 0 {
            0
        } else if u.e >= 17 {
            0x10000
        } else {
            (u.sig >> (63 - u.e)) as i32
        };
        if u.sign {
            -mag
        } else {
            mag
        }
    };
    // Scaling by 2^0 returns the operand (a pseudo-denormal normalised);
    // but a denormal result with underflow unmasked takes the unmasked
    // underflow response (exponent biased, UE), exact or not, as
    // IEEE 754 traps tiny results (seen on Emerald Rapids).
    let tiny = unpack(a).e < EXT_EMIN;
    if n == 0 && !(tiny && ctx.unmasked & UE != 0) {
        return Res::exact(canonical(a)).with(de);
    }
    let u = unpack(a);
    round_pack(sa, u.e + n, u128::from(u.sig) << 64, Fmt::Ext, &ctx.full()).with(de)
}

/// FXTRACT: (exponent, significand). ZE for a zero operand (exponent -∞).
pub fn xtract(a: u128) -> (u128, u128, u16) {
    let ca = classify(a);
    match ca {
        Class::Unsupported => (INDEFINITE, INDEFINITE, IE),
        Class::QNaN | Class::SNaN => {
            let r = quiet(a, ca);
            (r.v, r.v, r.flags)
        }
        Class::Zero => (inf(true), a, ZE),
        Class::Infinity => (inf(false), a, 0),
        _ => {
            let u = unpack(a);
            let de = if ca == Class::Denormal { DE } else { 0 };
            (
                from_i64(i64::from(u.e)),
                pack(u.sign, BIAS as u16, u.sig),
                de,
            )
        }
    }
}

/// Result of FPREM / FPREM1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rem {
    pub r: Res<u128>,
    /// Low three bits of the quotient (complete reduction only).
    pub q: u8,
    /// The reduction is incomplete (C2).
    pub partial: bool,
    /// The operation was invalid (condition codes are not set).
    pub invalid: bool,
}

/// FPREM (`ieee` false: quotient truncated) and FPREM1 (`ieee` true:
/// quotient rounded to nearest even). When the exponents differ by 64 or
/// more, only a partial reduction by N = 32..63 quotient bits is done, with
/// N = 32 + (D mod 32) (SDM vol. 2 FPREM: "implementation-dependent"; this
/// is the value Intel processors use).
pub fn rem(a: u128, b: u128, ieee: bool, ctx: &Ctx) -> Rem {
    let (ca, cb) = (classify(a), classify(b));
    let done = |r: Res<u128>, q: u64, partial: bool| Rem {
        r,
        q: (q & 7) as u8,
        partial,
        invalid: false,
    };
    if let Some(r) = special2(a, ca, b, cb) {
        // A NaN result (quiet or invalid) leaves C0 and C3 alone, as on
        // the processors.
        return Rem {
            invalid: true,
            ..done(r, 0, false)
        };
    }
    if ca == Class::Infinity || cb == Class::Zero {
        return Rem {
            invalid: true,
            ..done(invalid(), 0, false)
        };
    }
    let de = de_flag(ca, cb);
    if cb == Class::Infinity || ca == Class::Zero {
        return done(Res::exact(canonical(a)).with(de), 0, false);
    }
    let ctx = ctx.full();
    let (ua, ub) = (unpack(a), unpack(b));
    let d = ua.e - ub.e;
    let (aa, bb) = (u128::from(ua.sig), u128::from(ub.sig));
    if d < 0 {
        // |a| < |b|: the quotient is 0, except that FPREM1 rounds a
        // quotient above one half to 1.
        if ieee && d == -1 && aa > bb {
            let r = (bb << 1) - aa; // (2B - A) at a's exponent: |b| - |a|
            let res = round_pack(!ua.sign, ua.e + 64, r, Fmt::Ext, &ctx);
            return done(res.with(de), 1, false);
        }
        return done(round_unp(ua, &ctx).with(de), 0, false);
    }
    if d >= 64 {
        let n = (d & 31) | 32;
        let r = (aa << n) % bb;
        let res = if r == 0 {
            Res::exact(zero(ua.sign))
        } else {
            round_pack(ua.sign, ub.e + 64 + (d - n), r, Fmt::Ext, &ctx)
        };
        return done(res.with(de), 0, true);
    }
    let x = aa << d;
    let mut q = x / bb;
    let mut r = x % bb;
    let mut s = ua.sign;
    if ieee && (r << 1 > bb || (r << 1 == bb && q & 1 != 0)) {
        r = bb - r;
        q += 1;
        s = !s;
    }
    let res = if r == 0 {
        Res::exact(zero(ua.sign))
    } else {
        round_pack(s, ub.e + 64, r, Fmt::Ext, &ctx)
    };
    done(res.with(de), q as u64, false)
}

/// Round a 128-bit-significand constant (value = sig * 2^(e - 127)) to
/// double extended by `rc`, without flags (FLDPI and friends).
pub fn round_const(e: i32, sig: u128, rc: Rc) -> u128 {
    let ctx = Ctx {
        rc,
        prec: 64,
        unmasked: 0,
    };
    round_pack(false, e, sig, Fmt::Ext, &ctx).v
}

#[cfg(test)]
mod tests;
