//! Paging: the page walk (32-bit, PAE, 4-level), accessed/dirty bits, #PF
//! error codes, and the software TLB that makes most guest accesses a single
//! compare plus a host load or store.
//!
//! A TLB entry holds three tags (read, write, execute): the page-aligned
//! linear address when that access is allowed at the privilege the entry set
//! serves, or a value with low bits set otherwise. Low-bit flags send an
//! access to the slow path: [`TLB_MMIO`] (the page is not RAM) and
//! [`TLB_CODE`] (in write tags: the page holds decoded code that a write must
//! invalidate), [`TLB_WATCH`] (a debug-register watchpoint covers the page). Two entry sets exist, one for supervisor and one for user
//! accesses, so a privilege change needs no flush.

use crate::cpu::{
    Cpu, CR0_PG, CR0_WP, CR4_PAE, CR4_PGE, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_LMA, EFER_NXE,
};
use crate::exception::{Exception, XResult, PF};
use crate::memory::{load, store};
use crate::platform::Platform;

pub const TLB_BITS: u32 = 10;
pub const TLB_SIZE: usize = 1 << TLB_BITS;
/// Never matches a page-aligned address.
pub const TLB_INVALID: u64 = 1;
/// The page is not RAM: accesses go to the platform.
pub const TLB_MMIO: u64 = 2;
/// The page holds decoded code (write tags only).
pub const TLB_CODE: u64 = 4;
/// A data watchpoint overlaps the page (read and write tags): accesses go
/// to the slow path, which reports them (see `debug`).
pub const TLB_WATCH: u64 = 8;
const TLB_FLAGS: u64 = 0xfff;

/// Physical address bits the interpreter implements (CPUID 0x80000008).
pub const PHYS_ADDR_BITS: u32 = 40;
const PHYS_MASK: u64 = (1 << PHYS_ADDR_BITS) - 1;

/// 64 bytes (translated code indexes entries with a shift).
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub struct TlbEntry {
    pub read: u64,
    pub write: u64,
    pub exec: u64,
    /// host address of the page minus the linear page address.
    pub addend: usize,
    /// Physical page address.
    pub paddr: u64,
    pub global: bool,
}

impl TlbEntry {
    const EMPTY: TlbEntry = TlbEntry {
        read: TLB_INVALID,
        write: TLB_INVALID,
        exec: TLB_INVALID,
        addend: 0,
        paddr: 0,
        global: false,
    };
}

/// Two direct-mapped entry sets: [0] supervisor, [1] user.
pub struct Tlb {
    pub sets: [[TlbEntry; TLB_SIZE]; 2],
    /// Index of the set serving the current privilege.
    pub cur: usize,
    /// Bumped whenever a translation, the code mode or decoded code changes:
    /// cached block-to-block links from an older epoch are stale.
    pub epoch: u64,
    /// A bit per entry of each set: filled since it was last emptied.
    /// Entries without their bit are empty, so flushes and code-page
    /// marks visit only these (a guest with page-table isolation writes
    /// CR3 on every kernel entry and exit).
    filled: [[u64; TLB_SIZE / 64]; 2],
}

impl Default for Tlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Tlb {
    pub fn new() -> Self {
        Tlb {
            sets: [[TlbEntry::EMPTY; TLB_SIZE]; 2],
            cur: 0,
            epoch: 0,
            filled: [[0; TLB_SIZE / 64]; 2],
        }
    }

    pub fn select(&mut self, user: bool) {
        self.cur = user as usize;
    }

    /// Invalidate cached block links (see `epoch`).
    #[inline]
    pub fn bump(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
    }

    pub fn flush_all(&mut self) {
        self.bump();
        for set in &mut self.sets {
            set.fill(TlbEntry::EMPTY);
        }
        self.filled = [[0; TLB_SIZE / 64]; 2];
    }

    /// Note that entry `idx` of set `user` now holds a translation.
    #[inline]
    fn note_filled(&mut self, user: bool, idx: usize) {
        self.filled[user as usize][idx / 64] |= 1 << (idx % 64);
    }

    /// Visit every filled entry; `f` returns false to empty it.
    fn retain_filled(&mut self, mut f: impl FnMut(&mut TlbEntry) -> bool) {
        for (set, bits) in self.sets.iter_mut().zip(self.filled.iter_mut()) {
            for (w, word) in bits.iter_mut().enumerate() {
                let mut m = *word;
                while m != 0 {
                    let b = m.trailing_zeros() as usize;
                    m &= m - 1;
                    let e = &mut set[w * 64 + b];
                    if !f(e) {
                        *e = TlbEntry::EMPTY;
                        *word &= !(1 << b);
                    }
                }
            }
        }
    }

    /// Flush non-global entries (a CR3 write with CR4.PGE set).
    pub fn flush_nonglobal(&mut self) {
        self.bump();
        self.retain_filled(|e| e.global);
    }

    /// INVLPG: drop the translation of one linear page.
    pub fn flush_page(&mut self, lin: u64) {
        self.bump();
        let idx = ((lin >> 12) as usize) & (TLB_SIZE - 1);
        let page = lin & !0xfff;
        for set in &mut self.sets {
            let e = &mut set[idx];
            if (e.read & !TLB_FLAGS) == page
                || (e.write & !TLB_FLAGS) == page
                || (e.exec & !TLB_FLAGS) == page
            {
                *e = TlbEntry::EMPTY;
            }
        }
    }

    /// A page now holds decoded code: force writes to it through the slow
    /// path.
    pub fn mark_code_page(&mut self, paddr: u64) {
        self.retain_filled(|e| {
            if e.paddr == paddr && e.write & TLB_INVALID == 0 {
                e.write |= TLB_CODE;
            }
            true
        });
    }

    /// No page holds decoded code any more.
    pub fn clear_all_code(&mut self) {
        self.retain_filled(|e| {
            e.write &= !TLB_CODE;
            true
        });
    }

    /// The page no longer holds decoded code.
    pub fn clear_code_page(&mut self, paddr: u64) {
        self.retain_filled(|e| {
            if e.paddr == paddr {
                e.write &= !TLB_CODE;
            }
            true
        });
    }
}

/// The kind of access being translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Exec,
}

/// Result of a page walk.
#[derive(Clone, Copy, Debug)]
pub struct Translation {
    pub paddr: u64,
    /// Permissions of the whole path for the privilege walked at.
    pub writable: bool,
    pub executable: bool,
    /// The final entry's dirty bit is set (or paging is off).
    pub dirty: bool,
    pub global: bool,
}

impl Cpu {
    #[inline(always)]
    fn tlb_entry(&self, user: bool, lin: u64) -> &TlbEntry {
        &self.tlb.sets[user as usize][((lin >> 12) as usize) & (TLB_SIZE - 1)]
    }

    /// Is this a user-mode access (CPL 3, not an implicit supervisor access)?
    #[inline(always)]
    pub(crate) fn user(&self) -> bool {
        self.cpl == 3
    }

    /// Read `size` bytes (1, 2, 4, 8) at linear `lin`.
    #[inline(always)]
    pub(crate) fn read_lin(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        size: usize,
        user: bool,
    ) -> XResult<u64> {
        let e = self.tlb_entry(user, lin);
        if e.read == lin & !0xfff && (lin & 0xfff) as usize <= 0x1000 - size {
            let host = e.addend.wrapping_add(lin as usize) as *const u8;
            // SAFETY: the entry was filled from a RAM page (no TLB_MMIO flag)
            // whose host mapping stays alive with `self.ram`; the access does
            // not cross the page end (checked above).
            return Ok(unsafe { load(host, size) });
        }
        self.read_lin_slow(p, lin, size, user)
    }

    /// Write `size` bytes of `v` at linear `lin`.
    #[inline(always)]
    pub(crate) fn write_lin(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        size: usize,
        v: u64,
        user: bool,
    ) -> XResult<()> {
        let e = self.tlb_entry(user, lin);
        if e.write == lin & !0xfff && (lin & 0xfff) as usize <= 0x1000 - size {
            let host = e.addend.wrapping_add(lin as usize) as *mut u8;
            // SAFETY: as in read_lin; write tags are only valid for writable,
            // dirty RAM pages without decoded code.
            unsafe { store(host, size, v) };
            return Ok(());
        }
        self.write_lin_slow(p, lin, size, v, user)
    }

    #[inline(never)]
    fn read_lin_slow(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        size: usize,
        user: bool,
    ) -> XResult<u64> {
        if (lin & 0xfff) as usize + size > 0x1000 {
            // Crosses a page: both pages must be readable before anything is read.
            let next = (lin & !0xfff).wrapping_add(0x1000) & self.lin_mask();
            self.translate(p, lin, Access::Read, user)?;
            self.translate(p, next, Access::Read, user)?;
            let mut v = 0u64;
            for k in 0..size {
                let a = lin.wrapping_add(k as u64) & self.lin_mask();
                v |= self.read_lin(p, a, 1, user)? << (8 * k);
            }
            return Ok(v);
        }
        let paddr = self.translate(p, lin, Access::Read, user)?;
        let e = *self.tlb_entry(user, lin);
        if e.read == lin & !0xfff {
            return self.read_lin(p, lin, size, user);
        }
        if e.read & TLB_WATCH != 0 {
            self.note_data_access(lin, size, false);
            if e.read & !TLB_WATCH == lin & !0xfff {
                let host = e.addend.wrapping_add(lin as usize) as *const u8;
                // SAFETY: as in read_lin (a RAM page, the access inside it).
                return Ok(unsafe { load(host, size) });
            }
        }
        let mut buf = [0u8; 8];
        p.retired_hint(self.retired);
        self.io_happened = true;
        p.mmio_read(paddr, &mut buf[..size]);
        self.take_foreign_writes();
        Ok(u64::from_le_bytes(buf))
    }

    #[inline(never)]
    fn write_lin_slow(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        size: usize,
        v: u64,
        user: bool,
    ) -> XResult<()> {
        if (lin & 0xfff) as usize + size > 0x1000 {
            let next = (lin & !0xfff).wrapping_add(0x1000) & self.lin_mask();
            self.translate(p, lin, Access::Write, user)?;
            self.translate(p, next, Access::Write, user)?;
            for k in 0..size {
                let a = lin.wrapping_add(k as u64) & self.lin_mask();
                self.write_lin(p, a, 1, v >> (8 * k), user)?;
            }
            return Ok(());
        }
        let paddr = self.translate(p, lin, Access::Write, user)?;
        let e = *self.tlb_entry(user, lin);
        if e.write & TLB_CODE != 0 {
            // Self-modifying code: drop the decoded blocks of this page.
            let page = e.paddr;
            if self.invalidate_code_page(page) {
                self.code_written = true;
                self.tlb.bump();
            }
            self.tlb.clear_code_page(page);
        }
        let e = *self.tlb_entry(user, lin);
        if e.write == lin & !0xfff {
            return self.write_lin(p, lin, size, v, user);
        }
        if e.write & TLB_WATCH != 0 {
            self.note_data_access(lin, size, true);
            if e.write & !TLB_WATCH == lin & !0xfff {
                let host = e.addend.wrapping_add(lin as usize) as *mut u8;
                // SAFETY: as in write_lin (a writable, dirty RAM page without
                // decoded code; the access inside it).
                unsafe { store(host, size, v) };
                return Ok(());
            }
        }
        p.retired_hint(self.retired);
        self.io_happened = true;
        p.mmio_write(paddr, &v.to_le_bytes()[..size]);
        self.take_foreign_writes();
        // The write may have made an interrupt deliverable (EOI, TPR, ICR,
        // an unmask) or moved a timer: events are checked right after this
        // instruction.
        self.end_block = true;
        Ok(())
    }

    /// Linear addresses wrap at 4 GiB outside long mode.
    #[inline(always)]
    pub(crate) fn lin_mask(&self) -> u64 {
        if self.efer & EFER_LMA != 0 {
            u64::MAX
        } else {
            0xffff_ffff
        }
    }

    /// Translate a linear address for `access`, filling the TLB. Returns
    /// the physical address.
    pub(crate) fn translate(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        access: Access,
        user: bool,
    ) -> XResult<u64> {
        let page = lin & !0xfff;
        let idx = ((lin >> 12) as usize) & (TLB_SIZE - 1);
        {
            let e = &self.tlb.sets[user as usize][idx];
            let tag = match access {
                Access::Read => e.read,
                Access::Write => e.write,
                Access::Exec => e.exec,
            };
            if tag & !(TLB_MMIO | TLB_CODE | TLB_WATCH) == page {
                return Ok(e.paddr | (lin & 0xfff));
            }
        }
        let t = self.walk(p, lin, access, user)?;
        let ppage = t.paddr & !0xfff;
        let host = self.ram.host_page(ppage);
        let mmio = if host.is_none() { TLB_MMIO } else { 0 };
        let code = if self.blocks.is_code_page(ppage) {
            TLB_CODE
        } else {
            0
        };
        let (watch_r, watch_w) = self.watched_page(page);
        let watch_r = if watch_r { TLB_WATCH } else { 0 };
        let watch_w = if watch_w { TLB_WATCH } else { 0 };
        let e = &mut self.tlb.sets[user as usize][idx];
        let same = e.paddr == ppage && e.read & TLB_INVALID == 0 && e.read & !TLB_FLAGS == page;
        if !same {
            *e = TlbEntry::EMPTY;
        }
        e.paddr = ppage;
        e.global = t.global;
        e.addend = host.map_or(0, |h| (h as usize).wrapping_sub(page as usize));
        e.read = page | mmio | watch_r;
        if t.executable {
            e.exec = page | mmio;
        }
        if t.writable && t.dirty {
            e.write = page | mmio | code | watch_w;
        }
        self.tlb.note_filled(user, idx);
        Ok(t.paddr)
    }

    /// The host address of linear `lin` for `access`, when it is plain RAM
    /// the TLB lets that access reach directly (a write to a page holding
    /// decoded code or to MMIO gives `None`). Faults as the access would.
    pub(crate) fn host_ptr(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        access: Access,
        user: bool,
    ) -> XResult<Option<*mut u8>> {
        self.translate(p, lin, access, user)?;
        let e = self.tlb_entry(user, lin);
        let tag = match access {
            Access::Read => e.read,
            Access::Write => e.write,
            Access::Exec => e.exec,
        };
        if tag != lin & !0xfff {
            return Ok(None);
        }
        Ok(Some(e.addend.wrapping_add(lin as usize) as *mut u8))
    }

    /// Read a paging-structure entry.
    fn read_pte(&mut self, p: &mut dyn Platform, paddr: u64, size: usize) -> u64 {
        match self.ram.host_page(paddr) {
            // SAFETY: host_page returned a mapped 4 KiB RAM page and PTEs are
            // naturally aligned, so the access stays inside it.
            Some(h) => unsafe { load(h.add((paddr & 0xfff) as usize), size) },
            None => {
                let mut b = [0u8; 8];
                p.mmio_read(paddr, &mut b[..size]);
                u64::from_le_bytes(b)
            }
        }
    }

    fn write_pte(&mut self, p: &mut dyn Platform, paddr: u64, size: usize, v: u64) {
        match self.ram.host_page(paddr) {
            // SAFETY: as in read_pte.
            Some(h) => unsafe { store(h.add((paddr & 0xfff) as usize), size, v) },
            None => p.mmio_write(paddr, &v.to_le_bytes()[..size]),
        }
        // Page tables may share a page with code.
        if self.blocks.is_code_page(paddr & !0xfff) && self.invalidate_code_page(paddr & !0xfff) {
            self.tlb.clear_code_page(paddr & !0xfff);
            self.tlb.bump();
            self.code_written = true;
        }
    }

    fn page_fault(
        &mut self,
        lin: u64,
        access: Access,
        user: bool,
        present: bool,
        rsvd: bool,
    ) -> Exception {
        let mut code = 0u32;
        if present {
            code |= 1;
        }
        if access == Access::Write {
            code |= 2;
        }
        if user {
            code |= 4;
        }
        if rsvd {
            code |= 8;
        }
        let nx_on =
            (self.cr4 & CR4_PAE != 0 && self.efer & EFER_NXE != 0) || self.cr4 & CR4_SMEP != 0;
        if access == Access::Exec && nx_on {
            code |= 16;
        }
        self.cr2 = lin;
        Exception::with_code(PF, code)
    }

    /// Walk the page tables for `lin`. Sets accessed and dirty bits on
    /// success; raises #PF (with CR2 written) on failure.
    pub(crate) fn walk(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        access: Access,
        user: bool,
    ) -> XResult<Translation> {
        if self.cr0 & CR0_PG == 0 {
            return Ok(Translation {
                paddr: lin & 0xffff_ffff,
                writable: true,
                executable: true,
                dirty: true,
                global: false,
            });
        }
        let nxe = self.efer & EFER_NXE != 0;
        let wp = self.cr0 & CR0_WP != 0;
        let pae = self.cr4 & CR4_PAE != 0;
        let long = self.efer & EFER_LMA != 0;

        // Collect the path: (entry physical address, entry value, size).
        let mut path: [(u64, u64); 4] = [(0, 0); 4];
        let mut n = 0;
        let mut rw = true;
        let mut us = true;
        let mut xd = false;
        let (paddr, global, leaf) = if !pae {
            // 32-bit paging.
            let pde_addr = (self.cr3 & 0xffff_f000) | ((lin >> 20) & 0xffc);
            let pde = self.read_pte(p, pde_addr, 4);
            if pde & 1 == 0 {
                return Err(self.page_fault(lin, access, user, false, false));
            }
            path[n] = (pde_addr, pde);
            n += 1;
            rw &= pde & 2 != 0;
            us &= pde & 4 != 0;
            if pde & 0x80 != 0 && self.cr4 & CR4_PSE != 0 {
                // 4 MiB page; bits 20:13 hold physical bits 39:32 (PSE-36).
                if pde & (1 << 21) != 0 {
                    return Err(self.page_fault(lin, access, user, true, true));
                }
                let hi = ((pde >> 13) & 0xff) << 32;
                let pa = (pde & 0xffc0_0000) | hi | (lin & 0x3f_ffff);
                (pa & PHYS_MASK, pde & 0x100 != 0, n - 1)
            } else {
                let pte_addr = (pde & 0xffff_f000) | ((lin >> 10) & 0xffc);
                let pte = self.read_pte(p, pte_addr, 4);
                if pte & 1 == 0 {
                    return Err(self.page_fault(lin, access, user, false, false));
                }
                path[n] = (pte_addr, pte);
                n += 1;
                rw &= pte & 2 != 0;
                us &= pte & 4 != 0;
                ((pte & 0xffff_f000) | (lin & 0xfff), pte & 0x100 != 0, n - 1)
            }
        } else {
            let rsvd_hi = !PHYS_MASK & 0x7fff_ffff_ffff_f000 | if nxe { 0 } else { 1 << 63 };
            let (mut table, mut level) = if long {
                (self.cr3 & PHYS_MASK & !0xfff, 4)
            } else {
                // PAE: the PDPTE (no R/W, U/S, XD bits in it).
                let pdpte_addr = (self.cr3 & 0xffff_ffe0) | ((lin >> 27) & 0x18);
                let pdpte = self.read_pte(p, pdpte_addr, 8);
                if pdpte & 1 == 0 {
                    return Err(self.page_fault(lin, access, user, false, false));
                }
                if pdpte & (rsvd_hi | 0x1e6) != 0 {
                    return Err(self.page_fault(lin, access, user, true, true));
                }
                (pdpte & PHYS_MASK & !0xfff, 2)
            };
            loop {
                let shift = 12 + 9 * (level - 1);
                let addr = table | (((lin >> shift) & 0x1ff) << 3);
                let e = self.read_pte(p, addr, 8);
                if e & 1 == 0 {
                    return Err(self.page_fault(lin, access, user, false, false));
                }
                let large = e & 0x80 != 0;
                let mut rsvd = e & rsvd_hi != 0;
                if large && (level == 4 || (level == 3 && !long)) {
                    rsvd = true;
                }
                if large && level == 3 {
                    // 1 GiB page: bits 29:13 reserved.
                    rsvd |= e & 0x3fff_e000 != 0;
                } else if large && level == 2 {
                    rsvd |= e & 0x1f_e000 != 0;
                }
                if long && level == 4 {
                    rsvd |= e & 0x80 != 0;
                }
                if rsvd {
                    return Err(self.page_fault(lin, access, user, true, true));
                }
                path[n] = (addr, e);
                n += 1;
                rw &= e & 2 != 0;
                us &= e & 4 != 0;
                xd |= e & (1 << 63) != 0 && nxe;
                if level == 1 || large {
                    let off_mask = (1u64 << shift) - 1;
                    let base = e & PHYS_MASK & !off_mask;
                    break (base | (lin & off_mask), e & 0x100 != 0, n - 1);
                }
                table = e & PHYS_MASK & !0xfff;
                level -= 1;
            }
        };

        // Permission checks (SDM vol. 3, 4.6). SMAP applies to supervisor
        // data accesses to user pages unless RFLAGS.AC is set; SMEP to
        // supervisor fetches from user pages. (CR4 rejects both bits while
        // CPUID does not advertise them, so they are inert today.)
        let smap_blocks =
            !user && us && self.cr4 & CR4_SMAP != 0 && !self.flags.test(crate::flags::AC);
        let readable = if user { us } else { !smap_blocks };
        let writable = if user {
            us && rw
        } else {
            (rw || !wp) && !smap_blocks
        };
        let smep_blocks = us && self.cr4 & CR4_SMEP != 0;
        let executable = !xd && if user { us } else { !smep_blocks };
        let ok = match access {
            Access::Read => readable,
            Access::Write => writable,
            Access::Exec => executable,
        };
        if !ok {
            return Err(self.page_fault(lin, access, user, true, false));
        }

        // Accessed bits on every entry used; dirty on the leaf for writes.
        let size = if pae { 8 } else { 4 };
        for (k, &(addr, e)) in path[..n].iter().enumerate() {
            let mut ne = e | 0x20;
            if k == leaf && access == Access::Write {
                ne |= 0x40;
            }
            if ne != e {
                self.write_pte(p, addr, size, ne);
            }
        }
        let leaf_e = path[leaf].1 | if access == Access::Write { 0x40 } else { 0 };
        let pge = self.cr4 & CR4_PGE != 0;
        Ok(Translation {
            paddr: paddr & PHYS_MASK,
            writable,
            executable,
            dirty: leaf_e & 0x40 != 0,
            global: global && pge,
        })
    }

    /// Translate for the benefit of a debugger or the VMM (no A/D updates
    /// are avoided: this is a real walk). Returns None on a fault.
    pub fn translate_debug(&mut self, p: &mut dyn Platform, lin: u64) -> Option<u64> {
        let cr2 = self.cr2;
        let r = self.walk(p, lin, Access::Read, false).ok().map(|t| t.paddr);
        self.cr2 = cr2;
        r
    }

    /// Read `buf.len()` bytes of code or data at linear `lin` for decoding,
    /// translated as instruction fetches.
    pub(crate) fn fetch_bytes(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        buf: &mut [u8],
        user: bool,
    ) -> XResult<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let a = lin.wrapping_add(done as u64) & self.lin_mask();
            let pa = self.translate(p, a, Access::Exec, user)?;
            let n = (0x1000 - (a & 0xfff) as usize).min(buf.len() - done);
            if !self.ram.read(pa, &mut buf[done..done + n]) {
                p.mmio_read(pa, &mut buf[done..done + n]);
            }
            done += n;
        }
        Ok(())
    }
}
