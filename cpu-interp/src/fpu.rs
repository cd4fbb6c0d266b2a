//! x87 / MMX / SSE register state and the availability checks shared by
//! the x87 (`insn/x87.rs`), MMX (`insn/mmx.rs`) and SSE (`insn/sse.rs`)
//! instruction groups.
//!
//! Physical x87 registers R0..R7 hold raw 80-bit values (low 80 bits of a
//! `u128`); ST(i) is R[(TOP + i) % 8] with TOP = FSW bits 13:11. MMX register
//! MMn aliases the low 64 bits of Rn. The tag word is kept in full form
//! (2 bits per physical register: 00 valid, 01 zero, 10 special, 11 empty).

use crate::cpu::{Cpu, CR0_EM, CR0_NE, CR0_TS, CR4_OSFXSR};
use crate::exception::{Exception, XResult};
use crate::state::FpuState;

/// x87 control word after FNINIT: all exceptions masked, 64-bit precision,
/// round to nearest.
pub const FCW_INIT: u16 = 0x037f;
/// MXCSR after reset: all exceptions masked, round to nearest.
pub const MXCSR_INIT: u32 = 0x1f80;
/// MXCSR bits software may set (DAZ included: the interpreter implements it).
pub const MXCSR_MASK: u32 = 0xffff;

/// The interpreter's floating-point and vector state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fpu {
    /// Physical registers R0..R7, 80 bits each.
    pub regs: [u128; 8],
    pub fcw: u16,
    /// Status word, TOP included (bits 13:11).
    pub fsw: u16,
    /// Full tag word, 2 bits per physical register.
    pub ftw: u16,
    /// Last x87 opcode (11 bits).
    pub fop: u16,
    pub fip: u64,
    pub fcs: u16,
    pub fdp: u64,
    pub fds: u16,
    pub xmm: [u128; 16],
    pub mxcsr: u32,
    /// Bits 255:128 of YMM0..YMM15.
    pub ymm_hi: [u128; 16],
}

impl Default for Fpu {
    fn default() -> Self {
        Fpu {
            regs: [0; 8],
            fcw: FCW_INIT,
            fsw: 0,
            ftw: 0xffff,
            fop: 0,
            fip: 0,
            fcs: 0,
            fdp: 0,
            fds: 0,
            xmm: [0; 16],
            mxcsr: MXCSR_INIT,
            ymm_hi: [0; 16],
        }
    }
}

impl Fpu {
    pub fn from_state(s: &FpuState) -> Self {
        let mut regs = [0u128; 8];
        for (r, b) in regs.iter_mut().zip(s.st.iter()) {
            let mut w = [0u8; 16];
            w[..10].copy_from_slice(b);
            *r = u128::from_le_bytes(w);
        }
        Fpu {
            regs,
            fcw: s.fcw,
            fsw: s.fsw,
            ftw: s.ftw,
            fop: s.fop & 0x7ff,
            fip: s.fip,
            fcs: 0,
            fdp: s.fdp,
            fds: 0,
            xmm: s.xmm,
            mxcsr: s.mxcsr,
            ymm_hi: s.ymm_hi,
        }
    }

    pub fn to_state(&self) -> FpuState {
        let mut st = [[0u8; 10]; 8];
        for (b, r) in st.iter_mut().zip(self.regs.iter()) {
            b.copy_from_slice(&r.to_le_bytes()[..10]);
        }
        FpuState {
            st,
            fcw: self.fcw,
            fsw: self.fsw,
            ftw: self.ftw,
            fop: self.fop,
            fip: self.fip,
            fdp: self.fdp,
            xmm: self.xmm,
            mxcsr: self.mxcsr,
            ymm_hi: self.ymm_hi,
        }
    }

    /// TOP of the register stack.
    #[inline]
    pub fn top(&self) -> usize {
        usize::from((self.fsw >> 11) & 7)
    }

    #[inline]
    pub fn set_top(&mut self, top: usize) {
        self.fsw = (self.fsw & !0x3800) | (((top & 7) as u16) << 11);
    }

    /// Physical register index of ST(i).
    #[inline]
    pub fn phys(&self, i: usize) -> usize {
        (self.top() + i) & 7
    }

    /// Tag (0 valid, 1 zero, 2 special, 3 empty) of physical register `r`.
    #[inline]
    pub fn tag(&self, r: usize) -> u16 {
        (self.ftw >> (2 * r)) & 3
    }

    #[inline]
    pub fn set_tag(&mut self, r: usize, tag: u16) {
        self.ftw = (self.ftw & !(3 << (2 * r))) | ((tag & 3) << (2 * r));
    }

    /// The tag an 80-bit value deserves (as FXRSTOR and FLD compute it).
    pub fn tag_for(v: u128) -> u16 {
        let exp = (v >> 64) as u16 & 0x7fff;
        let mant = v as u64;
        if exp == 0x7fff || (exp != 0 && mant >> 63 == 0) || (exp == 0 && mant >> 63 != 0) {
            2
        } else if exp == 0 {
            if mant == 0 {
                1
            } else {
                2
            }
        } else {
            0
        }
    }

    /// Abridged (FXSAVE) tag byte: bit r set when Rr is not empty.
    pub fn abridged_tags(&self) -> u8 {
        (0..8).fold(0u8, |acc, r| {
            if self.tag(r) != 3 {
                acc | (1 << r)
            } else {
                acc
            }
        })
    }

    /// Rebuild the full tag word from an abridged tag byte (FXRSTOR).
    pub fn set_abridged_tags(&mut self, tags: u8) {
        for r in 0..8 {
            let t = if tags & (1 << r) == 0 {
                3
            } else {
                Self::tag_for(self.regs[r])
            };
            self.set_tag(r, t);
        }
    }
}

// ---- x87 status/control word bits and stack helpers -----------------------

/// FSW exception flags (the same bit positions as the FCW masks).
pub const FSW_IE: u16 = 1 << 0;
pub const FSW_DE: u16 = 1 << 1;
pub const FSW_ZE: u16 = 1 << 2;
pub const FSW_OE: u16 = 1 << 3;
pub const FSW_UE: u16 = 1 << 4;
pub const FSW_PE: u16 = 1 << 5;
/// Stack fault (with IE; C1 tells overflow from underflow).
pub const FSW_SF: u16 = 1 << 6;
/// Exception summary: an unmasked exception is pending.
pub const FSW_ES: u16 = 1 << 7;
pub const FSW_C0: u16 = 1 << 8;
pub const FSW_C1: u16 = 1 << 9;
pub const FSW_C2: u16 = 1 << 10;
pub const FSW_C3: u16 = 1 << 14;
/// Busy: mirrors ES on the 387 and later.
pub const FSW_B: u16 = 1 << 15;
/// The six exception flags / masks.
pub const FP_EXCEPTIONS: u16 = 0x3f;
/// FCW bits that do not hold what software writes: bits 7 and 13..15 read
/// as 0, bit 6 as 1 (the infinity-control bit 12 is kept, as on Intel).
pub const FCW_RESERVED: u16 = 0xe0c0;

pub const TAG_VALID: u16 = 0;
pub const TAG_ZERO: u16 = 1;
pub const TAG_SPECIAL: u16 = 2;
pub const TAG_EMPTY: u16 = 3;

impl Fpu {
    /// The value of ST(i).
    #[inline]
    pub fn st(&self, i: usize) -> u128 {
        self.regs[self.phys(i)]
    }

    /// Is ST(i) tagged empty?
    #[inline]
    pub fn st_empty(&self, i: usize) -> bool {
        self.tag(self.phys(i)) == TAG_EMPTY
    }

    /// Write ST(i) and tag it from its value.
    #[inline]
    pub fn set_st(&mut self, i: usize, v: u128) {
        let r = self.phys(i);
        let v = v & ((1u128 << 80) - 1);
        self.regs[r] = v;
        self.set_tag(r, Self::tag_for(v));
    }

    /// Decrement TOP and write the new ST(0).
    #[inline]
    pub fn push(&mut self, v: u128) {
        self.set_top(self.top().wrapping_sub(1));
        self.set_st(0, v);
    }

    /// Tag ST(0) empty and increment TOP.
    #[inline]
    pub fn pop(&mut self) {
        let r = self.phys(0);
        self.set_tag(r, TAG_EMPTY);
        self.set_top(self.top() + 1);
    }

    /// Replace the condition-code bits in `mask` (FSW_C0..FSW_C3) by `bits`.
    #[inline]
    pub fn set_cc(&mut self, mask: u16, bits: u16) {
        self.fsw = (self.fsw & !mask) | (bits & mask);
    }

    #[inline]
    pub fn set_c1(&mut self, on: bool) {
        self.set_cc(FSW_C1, if on { FSW_C1 } else { 0 });
    }

    /// Exceptions whose masks are clear.
    #[inline]
    pub fn unmasked(&self) -> u16 {
        !self.fcw & FP_EXCEPTIONS
    }

    /// Record exception flags (and SF). When one of them is unmasked, ES
    /// and B are set: the next waiting instruction raises #MF.
    #[inline]
    pub fn raise(&mut self, flags: u16) {
        self.fsw |= flags & (FP_EXCEPTIONS | FSW_SF);
        if flags & self.unmasked() != 0 {
            self.fsw |= FSW_ES | FSW_B;
        }
    }

    /// Recompute ES and B from the flags and masks (after FLDCW, FLDENV,
    /// FRSTOR, FXRSTOR load a new control or status word).
    pub fn update_es(&mut self) {
        if self.fsw & self.unmasked() != 0 {
            self.fsw |= FSW_ES | FSW_B;
        } else {
            self.fsw &= !(FSW_ES | FSW_B);
        }
    }

    /// Load the control word as FLDCW does (reserved bits forced).
    pub fn load_fcw(&mut self, v: u16) {
        self.fcw = (v & !FCW_RESERVED) | 0x40;
        self.update_es();
    }

    /// FNINIT: default control word, clear status, all registers empty,
    /// instruction and data pointers and opcode zeroed. The register
    /// contents and MXCSR/XMM are kept.
    pub fn init(&mut self) {
        self.fcw = FCW_INIT;
        self.fsw = 0;
        self.ftw = 0xffff;
        self.fop = 0;
        self.fip = 0;
        self.fcs = 0;
        self.fdp = 0;
        self.fds = 0;
    }

    /// The full tag word as FSTENV/FSAVE store it: empty registers from the
    /// tags, the others classified from their contents (modern processors
    /// keep only the abridged tags and compute the rest).
    pub fn computed_tag_word(&self) -> u16 {
        (0..8).fold(0u16, |acc, r| {
            let t = if self.tag(r) == TAG_EMPTY {
                TAG_EMPTY
            } else {
                Self::tag_for(self.regs[r])
            };
            acc | (t << (2 * r))
        })
    }

    /// Load a full tag word (FLDENV/FRSTOR): only empty versus non-empty is
    /// taken from it; the other tags follow the register contents.
    pub fn load_tag_word(&mut self, ftw: u16) {
        for r in 0..8 {
            let t = if (ftw >> (2 * r)) & 3 == TAG_EMPTY {
                TAG_EMPTY
            } else {
                Self::tag_for(self.regs[r])
            };
            self.set_tag(r, t);
        }
    }
}

impl Cpu {
    /// Waiting x87 (and MMX) instructions: #MF when an unmasked x87
    /// exception is pending (FSW.ES) and CR0.NE = 1. With CR0.NE = 0 the
    /// processor would signal FERR# to the PC-style external interrupt
    /// logic (IRQ 13) instead; duet models no FERR#, so the instruction
    /// simply proceeds and the exception stays pending in FSW.
    #[inline]
    pub(crate) fn check_pending_x87(&self) -> XResult<()> {
        if self.fpu.fsw & FSW_ES != 0 && self.cr0 & CR0_NE != 0 {
            return Err(Exception::new(crate::exception::MF));
        }
        Ok(())
    }
}

impl Cpu {
    /// x87 instructions: #NM when CR0.EM or CR0.TS is set.
    #[inline]
    pub(crate) fn check_x87(&self) -> XResult<()> {
        if self.cr0 & (CR0_EM | CR0_TS) != 0 {
            return Err(Exception::nm());
        }
        Ok(())
    }

    /// SSE/SSE2 instructions: #UD when CR0.EM is set or CR4.OSFXSR is
    /// clear, #NM when CR0.TS is set.
    #[inline]
    pub(crate) fn check_sse(&self) -> XResult<()> {
        if self.cr0 & CR0_EM != 0 || self.cr4 & CR4_OSFXSR == 0 {
            return Err(Exception::ud());
        }
        if self.cr0 & CR0_TS != 0 {
            return Err(Exception::nm());
        }
        Ok(())
    }

    /// MMX instructions: #UD when CR0.EM is set, #NM when CR0.TS is set.
    /// (A pending unmasked x87 exception raising #MF is checked by the x87
    /// group's `check_pending_x87`.)
    #[inline]
    pub(crate) fn check_mmx(&self) -> XResult<()> {
        if self.cr0 & CR0_EM != 0 {
            return Err(Exception::ud());
        }
        if self.cr0 & CR0_TS != 0 {
            return Err(Exception::nm());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip() {
        let mut f = Fpu::default();
        f.regs[3] = 0x3fff_8000_0000_0000_0000; // 1.0
        f.set_tag(3, 0);
        f.set_top(5);
        f.xmm[7] = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
        f.ymm_hi[7] = 0x7766_5544_3322_1100;
        f.mxcsr = 0x1f80 | 0x6000;
        let back = Fpu::from_state(&f.to_state());
        assert_eq!(back, f);
    }

    #[test]
    fn tags() {
        assert_eq!(Fpu::tag_for(0), 1);
        assert_eq!(Fpu::tag_for(0x3fff_8000_0000_0000_0000), 0);
        assert_eq!(Fpu::tag_for(0x7fff_8000_0000_0000_0000), 2); // infinity
        assert_eq!(Fpu::tag_for(0x0000_0000_0000_0000_0001), 2); // denormal
        assert_eq!(Fpu::tag_for(0x3fff_0000_0000_0000_0000), 2); // unnormal
        let mut f = Fpu::default();
        f.regs[0] = 0x3fff_8000_0000_0000_0000;
        f.set_abridged_tags(0b0000_0011);
        assert_eq!(f.tag(0), 0);
        assert_eq!(f.tag(1), 1);
        assert_eq!(f.tag(2), 3);
        assert_eq!(f.abridged_tags(), 0b11);
    }
}
