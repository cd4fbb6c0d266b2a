//! Lazy arithmetic flags.
//!
//! Arithmetic instructions record their operands, result and operation
//! instead of computing CF/PF/AF/ZF/SF/OF; a flag is computed only when an
//! instruction reads it (Jcc, SETcc, ADC, PUSHF, ...). `RFLAGS` bits other
//! than the six arithmetic ones always live in [`Flags::bits`].

pub const CF: u64 = 1 << 0;
pub const PF: u64 = 1 << 2;
pub const AF: u64 = 1 << 4;
pub const ZF: u64 = 1 << 6;
pub const SF: u64 = 1 << 7;
pub const TF: u64 = 1 << 8;
pub const IF: u64 = 1 << 9;
pub const DF: u64 = 1 << 10;
pub const OF: u64 = 1 << 11;
pub const IOPL: u64 = 3 << 12;
pub const NT: u64 = 1 << 14;
pub const RF: u64 = 1 << 16;
pub const VM: u64 = 1 << 17;
pub const AC: u64 = 1 << 18;
pub const VIF: u64 = 1 << 19;
pub const VIP: u64 = 1 << 20;
pub const ID: u64 = 1 << 21;
/// The six arithmetic status flags.
pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
/// Bit 1 always reads as one.
pub const FIXED1: u64 = 1 << 1;
/// Every flag software can ever see set.
pub const ALL_DEFINED: u64 = ARITH | TF | IF | DF | IOPL | NT | RF | VM | AC | VIF | VIP | ID;

/// Which operation produced the pending flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagOp {
    /// The arithmetic flags are materialised in `bits`.
    Eager,
    Add,
    Adc,
    Sub,
    Sbb,
    /// AND/OR/XOR/TEST: CF = OF = AF = 0.
    Logic,
    /// INC: CF preserved in `carry_in`.
    Inc,
    /// DEC: CF preserved in `carry_in`.
    Dec,
}

/// The flags register, partly lazy.
#[derive(Clone, Copy, Debug)]
pub struct Flags {
    /// Non-arithmetic flags always; arithmetic flags when `op == Eager`.
    pub bits: u64,
    op: FlagOp,
    /// Operand width in bits (8, 16, 32, 64).
    width: u32,
    a: u64,
    b: u64,
    r: u64,
    carry_in: bool,
}

impl Default for Flags {
    fn default() -> Self {
        Flags::new(FIXED1)
    }
}

#[inline(always)]
fn mask(width: u32) -> u64 {
    u64::MAX >> (64 - width)
}

#[inline(always)]
fn parity(v: u64) -> bool {
    (v as u8).count_ones() % 2 == 0
}

impl Flags {
    pub fn new(bits: u64) -> Self {
        Flags {
            bits: (bits & ALL_DEFINED) | FIXED1,
            op: FlagOp::Eager,
            width: 64,
            a: 0,
            b: 0,
            r: 0,
            carry_in: false,
        }
    }

    /// Record a lazy result. `a`, `b`, `r` may carry garbage above `width`.
    #[inline(always)]
    pub fn set_lazy(&mut self, op: FlagOp, width: u32, a: u64, b: u64, r: u64) {
        self.op = op;
        self.width = width;
        self.a = a;
        self.b = b;
        self.r = r;
    }

    /// ADC/SBB: `carry` is the incoming carry.
    #[inline(always)]
    pub fn set_lazy_carry(&mut self, op: FlagOp, width: u32, a: u64, b: u64, r: u64, carry: bool) {
        self.set_lazy(op, width, a, b, r);
        self.carry_in = carry;
    }

    /// INC/DEC keep CF: capture it before recording.
    #[inline(always)]
    pub fn set_incdec(&mut self, inc: bool, width: u32, a: u64, r: u64) {
        let cf = self.cf();
        self.set_lazy(if inc { FlagOp::Inc } else { FlagOp::Dec }, width, a, 1, r);
        self.carry_in = cf;
    }

    /// Set the six arithmetic flags explicitly (shifts, multiplies, BCD, ...).
    #[inline(always)]
    pub fn set_arith(&mut self, arith: u64) {
        self.bits = (self.bits & !ARITH) | (arith & ARITH);
        self.op = FlagOp::Eager;
    }

    /// Replace a subset of the arithmetic flags, keeping the others.
    pub fn update_arith(&mut self, which: u64, values: u64) {
        let cur = self.arith();
        self.set_arith((cur & !which) | (values & which));
    }

    #[inline(always)]
    fn sign(&self, v: u64) -> bool {
        (v >> (self.width - 1)) & 1 != 0
    }

    #[inline]
    pub fn cf(&self) -> bool {
        let m = mask(self.width);
        match self.op {
            FlagOp::Eager => self.bits & CF != 0,
            FlagOp::Add => (self.r & m) < (self.a & m),
            FlagOp::Adc => {
                let (a, r) = (self.a & m, self.r & m);
                r < a || (self.carry_in && r == a)
            }
            FlagOp::Sub => (self.a & m) < (self.b & m),
            FlagOp::Sbb => {
                let (a, b) = (self.a & m, self.b & m);
                a < b || (self.carry_in && a == b)
            }
            FlagOp::Logic => false,
            FlagOp::Inc | FlagOp::Dec => self.carry_in,
        }
    }

    #[inline]
    pub fn zf(&self) -> bool {
        match self.op {
            FlagOp::Eager => self.bits & ZF != 0,
            _ => self.r & mask(self.width) == 0,
        }
    }

    #[inline]
    pub fn sf(&self) -> bool {
        match self.op {
            FlagOp::Eager => self.bits & SF != 0,
            _ => self.sign(self.r),
        }
    }

    #[inline]
    pub fn pf(&self) -> bool {
        match self.op {
            FlagOp::Eager => self.bits & PF != 0,
            _ => parity(self.r),
        }
    }

    #[inline]
    pub fn af(&self) -> bool {
        match self.op {
            FlagOp::Eager => self.bits & AF != 0,
            FlagOp::Logic => false,
            _ => (self.a ^ self.b ^ self.r) & 0x10 != 0,
        }
    }

    #[inline]
    pub fn of(&self) -> bool {
        match self.op {
            FlagOp::Eager => self.bits & OF != 0,
            FlagOp::Add | FlagOp::Adc => self.sign((self.a ^ self.r) & (self.b ^ self.r)),
            FlagOp::Sub | FlagOp::Sbb => self.sign((self.a ^ self.b) & (self.a ^ self.r)),
            FlagOp::Logic => false,
            FlagOp::Inc => self.r & mask(self.width) == 1 << (self.width - 1),
            FlagOp::Dec => self.r & mask(self.width) == mask(self.width) >> 1,
        }
    }

    /// The six arithmetic flags as RFLAGS bits.
    pub fn arith(&self) -> u64 {
        if self.op == FlagOp::Eager {
            return self.bits & ARITH;
        }
        let mut f = 0;
        if self.cf() {
            f |= CF;
        }
        if self.pf() {
            f |= PF;
        }
        if self.af() {
            f |= AF;
        }
        if self.zf() {
            f |= ZF;
        }
        if self.sf() {
            f |= SF;
        }
        if self.of() {
            f |= OF;
        }
        f
    }

    /// The whole RFLAGS value.
    #[inline]
    pub fn get(&self) -> u64 {
        (self.bits & !ARITH) | self.arith() | FIXED1
    }

    /// Load all of RFLAGS (the caller has applied any privilege masks).
    #[inline]
    pub fn set(&mut self, v: u64) {
        self.bits = (v & ALL_DEFINED) | FIXED1;
        self.op = FlagOp::Eager;
    }

    /// Evaluate an x86 condition code (the low nibble of Jcc/SETcc/CMOVcc).
    #[inline]
    pub fn cond(&self, cc: u8) -> bool {
        let r = match cc >> 1 {
            0 => self.of(),
            1 => self.cf(),
            2 => self.zf(),
            3 => self.cf() || self.zf(),
            4 => self.sf(),
            5 => self.pf(),
            6 => self.sf() != self.of(),
            _ => self.zf() || (self.sf() != self.of()),
        };
        r ^ (cc & 1 != 0)
    }

    #[inline]
    pub fn test(&self, bit: u64) -> bool {
        self.bits & bit != 0
    }

    #[inline]
    pub fn set_bit(&mut self, bit: u64, on: bool) {
        debug_assert!(bit & ARITH == 0, "use set_arith for arithmetic flags");
        if on {
            self.bits |= bit;
        } else {
            self.bits &= !bit;
        }
    }

    pub fn iopl(&self) -> u8 {
        ((self.bits >> 12) & 3) as u8
    }
}

/// SF, ZF and PF of a result, for eager computations.
pub fn szp(width: u32, r: u64) -> u64 {
    let m = mask(width);
    let mut f = 0;
    if r & m == 0 {
        f |= ZF;
    }
    if (r >> (width - 1)) & 1 != 0 {
        f |= SF;
    }
    if parity(r) {
        f |= PF;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_flags() {
        let mut f = Flags::default();
        // 0xff + 0x01 = 0x00 in 8 bits: CF, ZF, AF, PF set; OF, SF clear.
        f.set_lazy(FlagOp::Add, 8, 0xff, 1, 0x100);
        assert_eq!(f.arith(), CF | ZF | AF | PF);
        // 0x7f + 1 = 0x80: OF, SF, AF.
        f.set_lazy(FlagOp::Add, 8, 0x7f, 1, 0x80);
        assert_eq!(f.arith(), OF | SF | AF);
    }

    #[test]
    fn sub_flags_and_conditions() {
        let mut f = Flags::default();
        // cmp 1, 2 (32-bit): borrow, negative.
        f.set_lazy(FlagOp::Sub, 32, 1, 2, 1u64.wrapping_sub(2));
        assert!(f.cf() && f.sf() && !f.zf() && !f.of());
        assert!(f.cond(0x2)); // jb
        assert!(f.cond(0xc)); // jl
        assert!(!f.cond(0x7)); // ja
                               // 0x80000000 - 1 overflows.
        f.set_lazy(FlagOp::Sub, 32, 0x8000_0000, 1, 0x7fff_ffff);
        assert!(f.of() && !f.cf());
    }

    #[test]
    fn inc_dec_preserve_carry() {
        let mut f = Flags::default();
        f.set_arith(CF);
        f.set_incdec(true, 16, 0x7fff, 0x8000);
        assert!(f.cf() && f.of() && f.sf() && f.af());
        f.set_incdec(false, 16, 0x8000, 0x7fff);
        assert!(f.cf() && f.of() && !f.sf());
    }

    #[test]
    fn adc_sbb_carry_edge() {
        let mut f = Flags::default();
        // 0xff + 0xff + 1 = 0x1ff: carry out although r (0xff) == a.
        f.set_lazy_carry(FlagOp::Adc, 8, 0xff, 0xff, 0x1ff, true);
        assert!(f.cf());
        // 0 - 0xffffffffffffffff - 1: borrow.
        f.set_lazy_carry(FlagOp::Sbb, 64, 0, u64::MAX, 0, true);
        assert!(f.cf());
    }

    #[test]
    fn get_set_roundtrip() {
        let mut f = Flags::default();
        f.set(IF | DF | CF | OF | 0xffff_0000_0000_0000);
        assert_eq!(f.get(), IF | DF | CF | OF | FIXED1);
    }
}
