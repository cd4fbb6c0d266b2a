//! Plumbing shared by the MMX (`mmx.rs`) and SSE (`sse.rs`) groups: vector
//! register access, 8- and 16-byte memory operands (alignment checked on
//! the linear address before any other fault, both halves of a 16-byte
//! store checked before either is written), the x87→MMX transition, and
//! the MXCSR exception commit rule.

use iced_x86::{OpKind, Register};

use crate::block::Insn;
use crate::cpu::{sreg, Cpu, CR0_NE, CR4_OSXMMEXCPT};
use crate::exception::{Exception, XResult, MF, XM};
use crate::platform::Platform;

/// Index of an XMM register (XMM0..XMM15).
#[inline(always)]
pub(crate) fn xmm_index(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::XMM0 as usize) & 15
}

/// Index of an MMX register (MM0..MM7).
#[inline(always)]
pub(crate) fn mm_index(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::MM0 as usize) & 7
}

/// Lane `i` of width `w` bytes.
#[inline(always)]
pub(crate) fn lane(v: u128, i: usize, w: usize) -> u64 {
    let x = (v >> (i * w * 8)) as u64;
    if w >= 8 {
        x
    } else {
        x & ((1u64 << (w * 8)) - 1)
    }
}

/// `v` with lane `i` of width `w` bytes replaced by `x`.
#[inline(always)]
pub(crate) fn set_lane(v: u128, i: usize, w: usize, x: u64) -> u128 {
    let m: u128 = if w >= 8 {
        u128::from(u64::MAX)
    } else {
        (1u128 << (w * 8)) - 1
    };
    let sh = i * w * 8;
    (v & !(m << sh)) | ((u128::from(x) & m) << sh)
}

impl Cpu {
    #[inline(always)]
    pub(crate) fn xmm_reg(&self, r: Register) -> u128 {
        self.fpu.xmm[xmm_index(r)]
    }

    #[inline(always)]
    pub(crate) fn set_xmm_reg(&mut self, r: Register, v: u128) {
        self.fpu.xmm[xmm_index(r)] = v;
        // The SSE state component is in use (XSAVE's XINUSE[1]).
        self.xstate.xinuse |= crate::insn::xsave::SSE;
    }

    /// MMn: the low 64 bits of physical x87 register Rn.
    #[inline(always)]
    pub(crate) fn mm_reg(&self, r: Register) -> u64 {
        self.fpu.regs[mm_index(r)] as u64
    }

    /// Write MMn; bits 79:64 of Rn become all ones.
    #[inline(always)]
    pub(crate) fn set_mm_reg(&mut self, r: Register, v: u64) {
        self.fpu.regs[mm_index(r)] = (0xffffu128 << 64) | u128::from(v);
    }

    /// A pending unmasked x87 exception (FSW.ES) raises #MF before an MMX
    /// instruction executes (native error reporting, CR0.NE = 1; with
    /// CR0.NE = 0 the external FERR# path is not modelled).
    #[inline]
    pub(crate) fn x87_pending_check(&self) -> XResult<()> {
        if self.fpu.fsw & 0x80 != 0 && self.cr0 & CR0_NE != 0 {
            return Err(Exception::new(MF));
        }
        Ok(())
    }

    /// Checks before an MMX instruction: #UD (CR0.EM), #NM (CR0.TS), #MF.
    #[inline]
    /// The checks of an MMX instruction (#UD, #NM, a pending x87 #MF),
    /// then, on Intel, its x87 → MMX transition (see [`Self::mmx_early_switch`]).
    pub(crate) fn mmx_prepare(&mut self) -> XResult<()> {
        self.check_mmx()?;
        self.x87_pending_check()?;
        self.mmx_early_switch();
        Ok(())
    }

    /// Intel makes the x87 → MMX transition before the instruction's
    /// memory access or SIMD exception, so that a fault leaves the CPU in
    /// MMX state; AMD only when the instruction completes
    /// (`Quirks::mmx_switch_before_fault`). Handlers call
    /// [`Self::mmx_switch`] again as they complete.
    #[inline(always)]
    pub(crate) fn mmx_early_switch(&mut self) {
        if self.quirks.mmx_switch_before_fault {
            self.mmx_switch();
        }
    }

    /// The checks of an MMX store to memory, then the parts of its x87 →
    /// MMX transition the processor makes before the store's access
    /// (`Quirks::mmx_store_top_before_fault`, `mmx_store_tags_before_fault`).
    pub(crate) fn mmx_prepare_store(&mut self) -> XResult<()> {
        self.check_mmx()?;
        self.x87_pending_check()?;
        if self.quirks.mmx_store_top_before_fault {
            self.fpu.set_top(0);
        }
        if self.quirks.mmx_store_tags_before_fault {
            self.fpu.ftw = 0;
        }
        Ok(())
    }

    /// The x87 → MMX transition every MMX instruction makes (except EMMS):
    /// TOP = 0, all tags valid.
    #[inline(always)]
    pub(crate) fn mmx_switch(&mut self) {
        self.fpu.ftw = 0;
        self.fpu.set_top(0);
    }

    /// Record the SIMD floating-point exception flags an instruction
    /// raised (over all its lanes) and fault if any is unmasked: an
    /// unmasked pre-computation exception (IE, DE, ZE) records only the
    /// pre-computation flags. The fault is #XM with CR4.OSXMMEXCPT, else
    /// #UD; the caller must not write the destination after an `Err`.
    #[inline]
    pub(crate) fn sse_commit_flags(&mut self, flags: u32) -> XResult<()> {
        let flags = flags & 0x3f;
        if flags == 0 {
            return Ok(());
        }
        let masks = (self.fpu.mxcsr >> 7) & 0x3f;
        let unmasked = flags & !masks;
        let set = if unmasked & 7 != 0 { flags & 7 } else { flags };
        self.fpu.mxcsr |= set;
        if unmasked != 0 {
            return Err(if self.cr4 & CR4_OSXMMEXCPT != 0 {
                Exception::new(XM)
            } else {
                Exception::ud()
            });
        }
        Ok(())
    }

    /// LDMXCSR / VLDMXCSR of `v`: a reserved bit set is #GP(0); otherwise
    /// MXCSR ← `v`, and the SSE state component is in use (XINUSE[1]) for
    /// every save instruction, even after loading 1F80H, until VZEROALL or
    /// an XRSTOR of the component (the hardware oracle; fix 46).
    pub(crate) fn load_mxcsr(&mut self, v: u32) -> XResult<()> {
        if v & !crate::fpu::MXCSR_MASK != 0 {
            return Err(Exception::gp0());
        }
        self.fpu.mxcsr = v;
        self.xstate.xinuse |= crate::insn::xsave::SSE;
        Ok(())
    }

    /// Value of a register operand: XMM (128 bits), MMX (64) or GPR.
    #[inline(always)]
    pub(crate) fn vec_reg_value(&self, r: Register) -> u128 {
        if r.is_xmm() {
            self.xmm_reg(r)
        } else if r.is_mm() {
            u128::from(self.mm_reg(r))
        } else {
            u128::from(self.reg(r))
        }
    }

    /// Linear address of the memory operand for a `size`-byte access;
    /// 16-byte accesses with `align` must be 16-byte aligned (#GP(0),
    /// checked first).
    #[inline]
    pub(crate) fn vec_linear(
        &mut self,
        p: &mut dyn Platform,
        d: &Insn,
        size: usize,
        write: bool,
        align: bool,
    ) -> XResult<u64> {
        let off = self.ea(d);
        let seg = d.seg as usize;
        if align && size == 16 {
            let base = if self.bits == 64 && seg < sreg::FS {
                0
            } else {
                self.seg[seg].base
            };
            if base.wrapping_add(off) & 15 != 0 {
                return Err(Exception::gp0());
            }
        }
        self.linear_access(p, seg, off, size as u64, write)
    }

    /// Load the memory operand (`size` of 1, 2, 4, 8 or 16 bytes).
    pub(crate) fn vec_load(
        &mut self,
        p: &mut dyn Platform,
        d: &Insn,
        size: usize,
        align: bool,
    ) -> XResult<u128> {
        match size {
            1 | 2 | 4 | 8 => {
                let off = self.ea(d);
                Ok(u128::from(self.read_mem(p, d.seg as usize, off, size)?))
            }
            16 => {
                let lin = self.vec_linear(p, d, 16, false, align)?;
                let user = self.user();
                let lo = self.read_lin(p, lin, 8, user)?;
                let hi_lin = lin.wrapping_add(8) & self.lin_mask();
                let hi = self.read_lin(p, hi_lin, 8, user)?;
                Ok(u128::from(lo) | (u128::from(hi) << 64))
            }
            _ => Err(Exception::ud()),
        }
    }

    /// Store `size` bytes of `v` to the memory operand; nothing is written
    /// unless the whole access can be.
    pub(crate) fn vec_store(
        &mut self,
        p: &mut dyn Platform,
        d: &Insn,
        size: usize,
        v: u128,
        align: bool,
    ) -> XResult<()> {
        match size {
            1 | 2 | 4 | 8 => {
                let off = self.ea(d);
                self.write_mem(p, d.seg as usize, off, size, v as u64)
            }
            16 => {
                let lin = self.vec_linear(p, d, 16, true, align)?;
                let user = self.user();
                self.probe_lin_write(p, lin, 16, user)?;
                self.write_lin(p, lin, 8, v as u64, user)?;
                let hi_lin = lin.wrapping_add(8) & self.lin_mask();
                self.write_lin(p, hi_lin, 8, (v >> 64) as u64, user)
            }
            _ => Err(Exception::ud()),
        }
    }

    /// Read operand `n`: a register (XMM, MMX, GPR), memory of the size
    /// iced gives it (16-byte memory aligned when `align`), or an immediate.
    #[inline]
    pub(crate) fn vec_read(
        &mut self,
        p: &mut dyn Platform,
        d: &Insn,
        n: u32,
        align: bool,
    ) -> XResult<u128> {
        match d.i.op_kind(n) {
            OpKind::Register => Ok(self.vec_reg_value(d.i.op_register(n))),
            OpKind::Memory => {
                let size = d.i.memory_size().size();
                self.vec_load(p, d, size, align)
            }
            _ => Ok(u128::from(d.i.immediate(n))),
        }
    }
}

/// Size in bytes of operand `n` (register or memory).
#[inline]
pub(crate) fn op_bytes(d: &Insn, n: u32) -> usize {
    match d.i.op_kind(n) {
        OpKind::Register => d.i.op_register(n).size(),
        OpKind::Memory => d.i.memory_size().size(),
        _ => 0,
    }
}

/// Does any register operand name an MMX register?
#[inline]
pub(crate) fn uses_mm(d: &Insn) -> bool {
    (0..d.i.op_count()).any(|n| d.i.op_kind(n) == OpKind::Register && d.i.op_register(n).is_mm())
}

// ---- byte ranges at linear addresses (XSAVE areas, 32-byte operands) ----

impl Cpu {
    /// Translate every page of `lin .. lin + len` for `write` (reads:
    /// for reading), first page first; nothing is accessed.
    pub(crate) fn probe_lin_range(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        len: usize,
        write: bool,
    ) -> XResult<()> {
        if len == 0 {
            return Ok(());
        }
        let user = self.user();
        let access = if write {
            crate::mmu::Access::Write
        } else {
            crate::mmu::Access::Read
        };
        let mask = self.lin_mask();
        let last = lin.wrapping_add(len as u64 - 1) & mask;
        let mut page = lin & !0xfff;
        loop {
            let a = if page == lin & !0xfff { lin } else { page };
            self.translate(p, a, access, user)?;
            if page == last & !0xfff {
                return Ok(());
            }
            page = page.wrapping_add(0x1000) & mask;
        }
    }

    /// Read `buf.len()` bytes at linear `lin` (8 bytes at a time, never
    /// across a page within one access).
    pub(crate) fn read_lin_bytes(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        buf: &mut [u8],
    ) -> XResult<()> {
        let user = self.user();
        let mask = self.lin_mask();
        let mut k = 0;
        while k < buf.len() {
            let a = lin.wrapping_add(k as u64) & mask;
            let room = 0x1000 - (a & 0xfff) as usize;
            let n = [8, 4, 2, 1]
                .into_iter()
                .find(|&n| n <= buf.len() - k && n <= room)
                .unwrap_or(1);
            let v = self.read_lin(p, a, n, user)?;
            buf[k..k + n].copy_from_slice(&v.to_le_bytes()[..n]);
            k += n;
        }
        Ok(())
    }

    /// Write `data` at linear `lin`; callers probe the range first when
    /// the write must be all or nothing.
    pub(crate) fn write_lin_bytes(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        data: &[u8],
    ) -> XResult<()> {
        let user = self.user();
        let mask = self.lin_mask();
        let mut k = 0;
        while k < data.len() {
            let a = lin.wrapping_add(k as u64) & mask;
            let room = 0x1000 - (a & 0xfff) as usize;
            let n = [8, 4, 2, 1]
                .into_iter()
                .find(|&n| n <= data.len() - k && n <= room)
                .unwrap_or(1);
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(&data[k..k + n]);
            self.write_lin(p, a, n, u64::from_le_bytes(b), user)?;
            k += n;
        }
        Ok(())
    }
}
