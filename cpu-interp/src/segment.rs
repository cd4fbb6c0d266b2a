//! Segmentation: effective → linear address checks, descriptor fetches and
//! segment-register loads with the checks and faults of SDM vol. 3 ch. 5.

use crate::cpu::{sreg, Cpu};
use crate::exception::{Exception, XResult};
use crate::platform::Platform;
use crate::state::Segment;

/// Parse an 8-byte descriptor into a segment cache (selector filled by the caller).
pub fn parse_descriptor(raw: u64) -> Segment {
    let limit_raw = (raw & 0xffff) as u32 | (((raw >> 48) & 0xf) as u32) << 16;
    let g = raw & (1 << 55) != 0;
    let limit = if g {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    Segment {
        selector: 0,
        base: ((raw >> 16) & 0xff_ffff) | (((raw >> 56) & 0xff) << 24),
        limit,
        type_: ((raw >> 40) & 0xf) as u8,
        s: raw & (1 << 44) != 0,
        dpl: ((raw >> 45) & 3) as u8,
        present: raw & (1 << 47) != 0,
        avl: raw & (1 << 52) != 0,
        l: raw & (1 << 53) != 0,
        db: raw & (1 << 54) != 0,
        g,
        unusable: false,
    }
}

/// Is this a code segment descriptor?
#[inline]
pub fn is_code(s: &Segment) -> bool {
    s.s && s.type_ & 8 != 0
}

impl Cpu {
    /// Effective address `off` in segment `seg` → linear address, with the
    /// segment checks of the current mode. `size` is the access width.
    #[inline(always)]
    pub(crate) fn linear(&self, seg: usize, off: u64, size: u64, write: bool) -> XResult<u64> {
        let s = &self.seg[seg];
        if self.bits == 64 {
            let lin = if seg >= sreg::FS {
                s.base.wrapping_add(off)
            } else {
                off
            };
            if !canonical(lin) || !canonical(lin.wrapping_add(size - 1)) {
                return Err(if seg == sreg::SS {
                    Exception::ss(0)
                } else {
                    Exception::gp0()
                });
            }
            return Ok(lin);
        }
        self.linear_legacy(seg, off, size, write)
    }

    /// [`Self::linear`] for an access about to be made: an access that
    /// starts canonical and runs into the non-canonical hole (only from the
    /// page below 2^47) translates its first page before the #GP/#SS, so a
    /// #PF there comes first, as on hardware.
    #[inline(always)]
    pub(crate) fn linear_access(
        &mut self,
        p: &mut dyn Platform,
        seg: usize,
        off: u64,
        size: u64,
        write: bool,
    ) -> XResult<u64> {
        match self.linear(seg, off, size, write) {
            Ok(lin) => Ok(lin),
            Err(e) => Err(self.canonical_straddle(p, seg, off, write, e)),
        }
    }

    #[cold]
    fn canonical_straddle(
        &mut self,
        p: &mut dyn Platform,
        seg: usize,
        off: u64,
        write: bool,
        e: Exception,
    ) -> Exception {
        if self.bits != 64 {
            return e;
        }
        let lin = if seg >= sreg::FS {
            self.seg[seg].base.wrapping_add(off)
        } else {
            off
        };
        if !canonical(lin) {
            return e;
        }
        let access = if write {
            crate::mmu::Access::Write
        } else {
            crate::mmu::Access::Read
        };
        let user = self.user();
        match self.translate(p, lin, access, user) {
            Err(pf) => pf,
            Ok(_) => e,
        }
    }

    #[inline(always)]
    fn linear_legacy(&self, seg: usize, off: u64, size: u64, write: bool) -> XResult<u64> {
        let s = &self.seg[seg];
        let fault = || {
            if seg == sreg::SS {
                Exception::ss(0)
            } else {
                Exception::gp0()
            }
        };
        if self.protected() && !self.vm86() {
            if s.unusable {
                return Err(fault());
            }
            // Type checks: writes need a writable data segment; reads of an
            // execute-only code segment fault.
            if write && (s.type_ & 8 != 0 || s.type_ & 2 == 0) {
                return Err(fault());
            }
            if !write && s.type_ & 0xa == 0x8 {
                return Err(fault());
            }
        }
        let last = off.wrapping_add(size - 1);
        if s.type_ & 0xc == 0x4 && s.s {
            // Expand-down data segment: valid offsets are (limit, upper].
            let upper: u64 = if s.db { 0xffff_ffff } else { 0xffff };
            if off <= u64::from(s.limit) || last > upper || last < off {
                return Err(fault());
            }
        } else if last > u64::from(s.limit) || last < off {
            return Err(fault());
        }
        Ok(s.base.wrapping_add(off) & 0xffff_ffff)
    }

    /// Read `size` bytes at `seg:off`.
    #[inline(always)]
    pub(crate) fn read_mem(
        &mut self,
        p: &mut dyn Platform,
        seg: usize,
        off: u64,
        size: usize,
    ) -> XResult<u64> {
        let lin = self.linear_access(p, seg, off, size as u64, false)?;
        let user = self.user();
        self.read_lin(p, lin, size, user)
    }

    /// Write `size` bytes of `v` at `seg:off`.
    #[inline(always)]
    pub(crate) fn write_mem(
        &mut self,
        p: &mut dyn Platform,
        seg: usize,
        off: u64,
        size: usize,
        v: u64,
    ) -> XResult<()> {
        let lin = self.linear_access(p, seg, off, size as u64, true)?;
        let user = self.user();
        self.write_lin(p, lin, size, v, user)
    }

    /// Read `size` bytes at `seg:off` for an instruction that writes them
    /// back (read-modify-write): the access is checked as a write first,
    /// so a fault on it is reported as a write (#PF error code W/R = 1),
    /// as the processor does for the load of a read-modify-write.
    pub(crate) fn read_mem_rmw(
        &mut self,
        p: &mut dyn Platform,
        seg: usize,
        off: u64,
        size: usize,
    ) -> XResult<u64> {
        self.probe_write(p, seg, off, size)?;
        self.read_mem(p, seg, off, size)
    }

    /// Check that `seg:off` can be written without writing it (for
    /// instructions that must fault before changing any state).
    pub(crate) fn probe_write(
        &mut self,
        p: &mut dyn Platform,
        seg: usize,
        off: u64,
        size: usize,
    ) -> XResult<()> {
        let lin = self.linear_access(p, seg, off, size as u64, true)?;
        let user = self.user();
        self.probe_lin_write(p, lin, size, user)
    }

    pub(crate) fn probe_lin_write(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        size: usize,
        user: bool,
    ) -> XResult<()> {
        self.translate(p, lin, crate::mmu::Access::Write, user)?;
        let last = lin.wrapping_add(size as u64 - 1) & self.lin_mask();
        if last & !0xfff != lin & !0xfff {
            // A fault on the second page reports its first byte in CR2.
            self.translate(p, last & !0xfff, crate::mmu::Access::Write, user)?;
        }
        Ok(())
    }

    // ---- descriptor tables ------------------------------------------------

    /// Read the 8-byte descriptor for `sel` from the GDT or LDT, as a
    /// supervisor access. `Err` carries #GP(sel) for a selector beyond the
    /// table limit. `code` is the error code to use for limit failures.
    pub(crate) fn read_descriptor(&mut self, p: &mut dyn Platform, sel: u16) -> XResult<u64> {
        let (base, limit) = self.descriptor_table(sel)?;
        let idx = u64::from(sel & !7);
        if idx + 7 > u64::from(limit) {
            return Err(Exception::gp(u32::from(sel & !3)));
        }
        self.read_lin(p, base.wrapping_add(idx) & self.lin_mask(), 8, false)
    }

    fn descriptor_table(&self, sel: u16) -> XResult<(u64, u32)> {
        if sel & 4 != 0 {
            if self.ldtr.unusable || !self.ldtr.present {
                return Err(Exception::gp(u32::from(sel & !3)));
            }
            Ok((self.ldtr.base, self.ldtr.limit))
        } else {
            Ok((self.gdtr.base, u32::from(self.gdtr.limit)))
        }
    }

    /// Set the accessed bit of the descriptor for `sel` if it is clear.
    pub(crate) fn set_accessed(&mut self, p: &mut dyn Platform, sel: u16, raw: u64) -> XResult<()> {
        if raw & (1 << 40) == 0 {
            let (base, _) = self.descriptor_table(sel)?;
            let a = base.wrapping_add(u64::from(sel & !7)).wrapping_add(5) & self.lin_mask();
            let b = ((raw >> 40) & 0xff) | 1;
            self.write_lin(p, a, 1, b, false)?;
        }
        Ok(())
    }

    /// Read a 16-byte system descriptor (long mode) and return (low, high).
    pub(crate) fn read_system_descriptor(
        &mut self,
        p: &mut dyn Platform,
        sel: u16,
    ) -> XResult<(u64, u64)> {
        let lo = self.read_descriptor(p, sel)?;
        if !self.long_mode() {
            return Ok((lo, 0));
        }
        let (base, limit) = self.descriptor_table(sel)?;
        let idx = u64::from(sel & !7) + 8;
        if idx + 7 > u64::from(limit) {
            return Err(Exception::gp(u32::from(sel & !3)));
        }
        let hi = self.read_lin(p, base.wrapping_add(idx) & self.lin_mask(), 8, false)?;
        Ok((lo, hi))
    }

    // ---- segment register loads -------------------------------------------

    /// `MOV sreg`, `POP sreg`, `LDS`...: load a data or stack segment register
    /// with the protected-mode checks.
    pub(crate) fn load_sreg(&mut self, p: &mut dyn Platform, seg: usize, sel: u16) -> XResult<()> {
        if self.real_like() {
            let vm86 = self.vm86();
            let s = &mut self.seg[seg];
            s.selector = sel;
            s.base = u64::from(sel) << 4;
            if vm86 {
                s.limit = 0xffff;
                s.type_ = if seg == sreg::CS { 0xb } else { 0x3 };
                s.s = true;
                s.dpl = 3;
                s.present = true;
                s.db = false;
                s.unusable = false;
            }
            return Ok(());
        }
        let rpl = sel & 3;
        let cpl = u16::from(self.cpl);
        if sel & !3 == 0 {
            // Null selector.
            if seg == sreg::SS {
                if !(self.bits == 64 && cpl != 3 && rpl == cpl) {
                    return Err(Exception::gp0());
                }
                let s = &mut self.seg[seg];
                s.selector = sel;
                s.unusable = true;
                s.dpl = self.cpl;
                return Ok(());
            }
            let s = &mut self.seg[seg];
            s.selector = sel;
            s.unusable = true;
            s.present = false;
            // Intel zeroes the base even for FS/GS in 64-bit mode (AMD
            // keeps it; Linux calls that X86_BUG_NULL_SEG).
            if self.quirks.null_selector_clears_base {
                s.base = 0;
            }
            return Ok(());
        }
        let err = u32::from(sel & !3);
        let raw = self.read_descriptor(p, sel)?;
        let mut d = parse_descriptor(raw);
        if seg == sreg::SS {
            if rpl != cpl || !d.s || d.type_ & 0xa != 0x2 || u16::from(d.dpl) != cpl {
                return Err(Exception::gp(err));
            }
            if !d.present {
                return Err(Exception::ss(err));
            }
        } else {
            // Data, or readable code.
            let readable_code = is_code(&d) && d.type_ & 2 != 0;
            let data = d.s && d.type_ & 8 == 0;
            if !(data || readable_code) {
                return Err(Exception::gp(err));
            }
            let conforming = is_code(&d) && d.type_ & 4 != 0;
            if !conforming && u16::from(d.dpl) < cpl.max(rpl) {
                return Err(Exception::gp(err));
            }
            if !d.present {
                return Err(Exception::np(err));
            }
        }
        self.set_accessed(p, sel, raw)?;
        d.type_ |= 1;
        d.selector = sel;
        if self.bits == 64 && seg >= sreg::FS {
            // Only the low 32 bits come from the descriptor.
            d.base &= 0xffff_ffff;
        }
        self.seg[seg] = d;
        Ok(())
    }

    /// Load CS for a far JMP/CALL/RET to a code segment (no gates), at
    /// privilege `new_cpl`. Checks follow SDM "JMP"/"CALL" pseudo-code for
    /// the direct code-segment case. Returns the parsed descriptor with its
    /// raw value for the caller to commit with [`Cpu::commit_cs`].
    pub(crate) fn check_code_descriptor(
        &mut self,
        p: &mut dyn Platform,
        sel: u16,
        for_return: bool,
    ) -> XResult<(Segment, u64)> {
        let err = u32::from(sel & !3);
        if sel & !3 == 0 {
            return Err(Exception::gp0());
        }
        let raw = self.read_descriptor(p, sel)?;
        let d = parse_descriptor(raw);
        if !is_code(&d) {
            return Err(Exception::gp(err));
        }
        let rpl = (sel & 3) as u8;
        let conforming = d.type_ & 4 != 0;
        if for_return {
            if rpl < self.cpl || (conforming && d.dpl > rpl) || (!conforming && d.dpl != rpl) {
                return Err(Exception::gp(err));
            }
        } else if conforming {
            if d.dpl > self.cpl {
                return Err(Exception::gp(err));
            }
        } else if rpl > self.cpl || d.dpl != self.cpl {
            return Err(Exception::gp(err));
        }
        if !d.present {
            return Err(Exception::np(err));
        }
        if self.long_mode() && d.l && d.db {
            return Err(Exception::gp(err));
        }
        Ok((d, raw))
    }

    /// Commit a checked code segment as CS with privilege `cpl`.
    pub(crate) fn commit_cs(
        &mut self,
        p: &mut dyn Platform,
        sel: u16,
        mut d: Segment,
        raw: u64,
        cpl: u8,
    ) -> XResult<()> {
        self.set_accessed(p, sel, raw)?;
        d.type_ |= 1;
        d.selector = (sel & !3) | u16::from(cpl);
        self.seg[sreg::CS] = d;
        self.cpl = cpl;
        self.update_mode();
        self.end_block = true;
        Ok(())
    }

    /// Load CS in real or virtual-8086 mode.
    pub(crate) fn load_cs_real(&mut self, sel: u16) {
        let vm86 = self.vm86();
        let s = &mut self.seg[sreg::CS];
        s.selector = sel;
        s.base = u64::from(sel) << 4;
        if vm86 {
            s.limit = 0xffff;
            s.dpl = 3;
            s.db = false;
            s.l = false;
            s.type_ = 0xb;
        }
        self.update_mode();
        self.end_block = true;
    }

    /// SS for a privilege change (interrupt delivery, far RET to outer
    /// level): fetch and check the stack segment for privilege `cpl`.
    pub(crate) fn check_stack_descriptor(
        &mut self,
        p: &mut dyn Platform,
        sel: u16,
        cpl: u8,
        ts: bool,
    ) -> XResult<Segment> {
        let err = u32::from(sel & !3);
        let fault = |c| {
            if ts {
                Exception::ts(c)
            } else {
                Exception::gp(c)
            }
        };
        if sel & !3 == 0 {
            if self.long_mode() && cpl != 3 {
                // 64-bit mode allows a null SS at privilege 0..2.
                let mut s = Segment {
                    selector: sel,
                    unusable: true,
                    dpl: cpl,
                    ..Default::default()
                };
                s.db = true;
                return Ok(s);
            }
            return Err(fault(err));
        }
        let raw = self
            .read_descriptor(p, sel)
            .map_err(|e| if ts { Exception::ts(err) } else { e })?;
        let mut d = parse_descriptor(raw);
        if (sel & 3) as u8 != cpl || d.dpl != cpl || !d.s || d.type_ & 0xa != 0x2 {
            return Err(fault(err));
        }
        if !d.present {
            return Err(Exception::ss(err));
        }
        self.set_accessed(p, sel, raw)?;
        d.type_ |= 1;
        d.selector = sel;
        Ok(d)
    }
}

/// Is `a` a canonical 48-bit address?
#[inline(always)]
pub fn canonical(a: u64) -> bool {
    ((a as i64) << 16 >> 16) as u64 == a
}

#[cfg(test)]
mod tests {
    use crate::cpu::sreg;
    use crate::insn::testutil::*;

    fn fault_of(code: &[u8], init: impl FnOnce(&mut crate::Cpu)) -> (crate::Exception, u64) {
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        write_phys(&c, CODE, code);
        init(&mut c);
        let mut p = TestPlatform::default();
        let insn = c.decode_one(&mut p).expect("decodable");
        let e = (insn.h)(&mut c, &mut p, &insn).expect_err("faults");
        (e, c.cr2)
    }

    #[test]
    fn an_access_into_the_non_canonical_hole_translates_its_first_page_first() {
        use crate::state::gpr::RSI;
        // mov rax, [rsi+4] (48 8b 46 04), RSI = 0x7fff_ffff_fff8: the 8
        // bytes run past 2^47. The first page is not mapped: #PF there
        // (CR2 = the address), not #GP.
        let (e, cr2) = fault_of(&[0x48, 0x8b, 0x46, 0x04], |c| {
            c.set_gpr(RSI, 0x7fff_ffff_fff8)
        });
        assert_eq!(e.vector, crate::exception::PF);
        assert_eq!(cr2, 0x7fff_ffff_fffc);
        // A mapped first page (1 GiB identity map: 0x3fff_fffc) is not the
        // case here; a wholly non-canonical address is still #GP(0).
        let (e, _) = fault_of(&[0x48, 0x8b, 0x46, 0x04], |c| {
            c.set_gpr(RSI, 0x8000_0000_0000)
        });
        assert_eq!(e, crate::Exception::gp0());
    }

    #[test]
    fn es_cs_ds_overrides_leave_stack_accesses_stack_accesses_in_64_bit_mode() {
        use crate::state::gpr::RBP;
        // ds: mov rax, [rbp] (3e 48 8b 45 00) with a non-canonical RBP:
        // the override is ignored, the access is a stack access: #SS(0).
        let (e, _) = fault_of(&[0x3e, 0x48, 0x8b, 0x45, 0x00], |c| {
            c.set_gpr(RBP, 0x8000_0000_0000)
        });
        assert_eq!(e, crate::Exception::ss(0));
        // fs: counts: #GP(0).
        let (e, _) = fault_of(&[0x64, 0x48, 0x8b, 0x45, 0x00], |c| {
            c.set_gpr(RBP, 0x8000_0000_0000)
        });
        assert_eq!(e, crate::Exception::gp0());
        // ss: mov rax, [rax] (36 48 8b 00), non-canonical RAX: the SS
        // override counts (#SS).
        use crate::state::gpr::RAX;
        let (e, _) = fault_of(&[0x36, 0x48, 0x8b, 0x00], |c| {
            c.set_gpr(RAX, 0x8000_0000_0000)
        });
        assert_eq!(e, crate::Exception::ss(0));
    }

    #[test]
    fn null_selector_load_zeroes_fs_base_in_64_bit_mode() {
        // xor eax, eax (31 c0) ; mov fs, eax (8e e0): an Intel processor
        // zeroes FS.base when a null selector is loaded in 64-bit mode.
        let c = run(Mode::Long64, &[0x31, 0xc0, 0x8e, 0xe0], |c| {
            c.seg[sreg::FS].base = 0x1234_0000;
        });
        assert_eq!(c.seg[sreg::FS].selector, 0);
        assert_eq!(c.seg[sreg::FS].base, 0);
        // AMD keeps it (Quirks::null_selector_clears_base).
        let c = run(Mode::Long64, &[0x31, 0xc0, 0x8e, 0xe0], |c| {
            c.set_quirks(crate::quirks::Quirks::AMD);
            c.seg[sreg::FS].base = 0x1234_0000;
        });
        assert_eq!(c.seg[sreg::FS].selector, 0);
        assert_eq!(c.seg[sreg::FS].base, 0x1234_0000);
    }
}
