//! Guest RAM as the VMM, the devices and the backends share it, with a log
//! of the pages written through it.
//!
//! Every write that goes through `vm-memory` (a device's DMA: virtio rings
//! and buffers, a disk read landing in guest memory, a received frame; a
//! loader placing a kernel; a snapshot restore) marks the pages it touched
//! in the region's [`WriteLog`]. A CPU that caches what it decoded from
//! guest memory (duet's interpreter and its translation tier) drains the log
//! and drops what it cached from those pages, so a guest that lets a device
//! write code over code it already ran executes the new code. The CPU's own
//! stores go straight to host memory and are not logged (it tracks those
//! itself); KVM reads memory directly and never drains the log.
//!
//! Writes that bypass `vm-memory`'s accessors (a raw pointer from
//! `ptr_guard_mut`, e.g. `pread` into a guest buffer) must mark the range
//! themselves: `slice.bitmap().mark_dirty(0, len)`.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory with a write log on every region.
pub type GuestMemory = vm_memory::GuestMemoryMmap<WriteLog>;

/// A volatile slice of [`GuestMemory`] (writes through it are logged).
pub type GuestSlice<'a> = vm_memory::VolatileSlice<'a, WriteLogSlice<'a>>;

/// Granule of the log: the x86 page.
pub const LOG_PAGE: usize = 4096;

struct Pages {
    /// One bit per page of the region.
    bits: Box<[AtomicU64]>,
    /// Pages in the region.
    pages: usize,
    /// Set by every mark: something is waiting in `bits`.
    pending: AtomicBool,
}

/// Pages of one guest memory region written through `vm-memory` since the
/// log was last drained. Clones share the log.
#[derive(Clone)]
pub struct WriteLog(Arc<Pages>);

impl WriteLog {
    fn with_pages(pages: usize) -> Self {
        WriteLog(Arc::new(Pages {
            bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
            pending: AtomicBool::new(false),
        }))
    }

    /// Has anything been written since the last [`WriteLog::drain`]?
    #[inline]
    pub fn pending(&self) -> bool {
        self.0.pending.load(Ordering::Acquire)
    }

    /// Call `f(first_page_offset, bytes)` for each run of written pages
    /// (offsets in bytes from the region's start) and forget them.
    pub fn drain(&self, mut f: impl FnMut(u64, u64)) {
        if !self.0.pending.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut run: Option<(u64, u64)> = None;
        for (w, word) in self.0.bits.iter().enumerate() {
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let at = (w as u64 * 64 + b) * LOG_PAGE as u64;
                run = match run {
                    Some((start, len)) if start + len == at => Some((start, len + LOG_PAGE as u64)),
                    Some((start, len)) => {
                        f(start, len);
                        Some((at, LOG_PAGE as u64))
                    }
                    None => Some((at, LOG_PAGE as u64)),
                };
            }
        }
        if let Some((start, len)) = run {
            f(start, len);
        }
    }
}

impl Default for WriteLog {
    fn default() -> Self {
        WriteLog::with_pages(0)
    }
}

impl fmt::Debug for WriteLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteLog")
            .field("pages", &self.0.pages)
            .field("pending", &self.pending())
            .finish()
    }
}

impl<'a> WithBitmapSlice<'a> for WriteLog {
    type S = WriteLogSlice<'a>;
}

impl Bitmap for WriteLog {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        let first = offset / LOG_PAGE;
        // Marks beyond the region (a slice's wrapping offset) are dropped.
        if len == 0 || first >= self.0.pages {
            return;
        }
        let last = (offset.saturating_add(len - 1) / LOG_PAGE).min(self.0.pages - 1);
        for page in first..=last {
            let word = &self.0.bits[page / 64];
            let bit = 1u64 << (page % 64);
            if word.load(Ordering::Relaxed) & bit == 0 {
                word.fetch_or(bit, Ordering::Release);
            }
        }
        if !self.0.pending.load(Ordering::Relaxed) {
            self.0.pending.store(true, Ordering::Release);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = offset / LOG_PAGE;
        self.0
            .bits
            .get(page / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    fn slice_at(&self, offset: usize) -> WriteLogSlice<'_> {
        WriteLogSlice { log: self, offset }
    }
}

impl NewBitmap for WriteLog {
    fn with_len(len: usize) -> Self {
        WriteLog::with_pages(len.div_ceil(LOG_PAGE))
    }
}

/// A [`WriteLog`] seen from an offset into its region (what `vm-memory`
/// hands to volatile slices).
#[derive(Clone, Copy)]
pub struct WriteLogSlice<'a> {
    log: &'a WriteLog,
    offset: usize,
}

impl fmt::Debug for WriteLogSlice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WriteLogSlice(+{:#x})", self.offset)
    }
}

impl<'a> WithBitmapSlice<'a> for WriteLogSlice<'_> {
    type S = Self;
}

impl BitmapSlice for WriteLogSlice<'_> {}

impl Bitmap for WriteLogSlice<'_> {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.log.mark_dirty(self.offset.wrapping_add(offset), len)
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log.dirty_at(self.offset.wrapping_add(offset))
    }

    fn slice_at(&self, offset: usize) -> Self {
        WriteLogSlice {
            log: self.log,
            offset: self.offset.wrapping_add(offset),
        }
    }
}

/// A [`GuestSlice`] over a host buffer (a bounce buffer a disk reads into
/// or writes from). Its writes are marked in `log`: pass a
/// `WriteLog::default()`, which has no pages and records nothing.
pub fn host_slice<'a>(buf: &'a mut [u8], log: &'a WriteLog) -> GuestSlice<'a> {
    // SAFETY: `buf` is `buf.len()` bytes of host memory, borrowed mutably
    // for the slice's whole lifetime.
    unsafe {
        vm_memory::VolatileSlice::with_bitmap(buf.as_mut_ptr(), buf.len(), log.slice_at(0), None)
    }
}

/// The write logs of every region of `mem`, each with the guest-physical
/// address of its region's start.
pub fn write_logs(mem: &GuestMemory) -> Vec<(u64, WriteLog)> {
    mem.iter()
        .map(|r| (r.start_addr().0, r.bitmap().log.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn drained(log: &WriteLog) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        log.drain(|s, l| v.push((s, l)));
        v
    }

    #[test]
    fn writes_through_vm_memory_are_logged_by_page_and_drained_once() {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap();
        let logs = write_logs(&mem);
        assert_eq!(logs.len(), 2);
        assert_eq!(logs[1].0, 0x20_0000);
        assert!(!logs[0].1.pending() && !logs[1].1.pending());

        // A write straddling two pages, an object write, a volatile slice copy.
        mem.write_slice(&[1u8; 8], GuestAddress(0x1ffc)).unwrap();
        mem.write_obj(7u32, GuestAddress(0x5000)).unwrap();
        mem.get_slice(GuestAddress(0x20_3000), 0x1800)
            .unwrap()
            .copy_from(&[9u8; 0x1800]);
        // Reads leave no mark.
        let mut buf = [0u8; 16];
        mem.read_slice(&mut buf, GuestAddress(0x9000)).unwrap();

        assert!(logs[0].1.pending() && logs[1].1.pending());
        assert_eq!(
            drained(&logs[0].1),
            vec![(0x1000, 0x2000), (0x5000, 0x1000)]
        );
        assert_eq!(drained(&logs[1].1), vec![(0x3000, 0x2000)]);
        assert!(!logs[0].1.pending());
        assert_eq!(drained(&logs[0].1), vec![]);
    }

    #[test]
    fn marks_past_the_region_end_are_dropped() {
        let log = WriteLog::with_len(0x3000);
        log.mark_dirty(0x2800, 0x10_0000);
        assert_eq!(drained(&log), vec![(0x2000, 0x1000)]);
        log.slice_at(usize::MAX).mark_dirty(2, 4);
        assert_eq!(drained(&log), vec![(0, 0x1000)]);
    }
}
