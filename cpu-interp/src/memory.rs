//! Direct access to guest RAM.
//!
//! The interpreter reads and writes the same `GuestMemoryMmap` the KVM
//! backend maps into its memory slots. [`Ram`] keeps the host address of each
//! region so that a TLB entry can point straight at host memory.
//!
//! Others write that memory too (device DMA, loaders, a snapshot restore).
//! The interpreter caches code decoded from it (and the translation tier
//! code compiled from that), so whoever owns the memory tells the CPU what
//! was written through [`ForeignWrites`]; the CPU asks after every port or
//! MMIO access and whenever [`crate::Cpu::run`] starts.

use std::any::Any;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest-physical ranges written by something other than the CPU.
pub trait ForeignWrites: Send {
    /// Call `written(start, len)` for every guest-physical range written
    /// since the last call (whole pages are fine), and forget them. Called
    /// often: return quickly when nothing was written.
    fn take(&mut self, written: &mut dyn FnMut(u64, u64));
}

#[derive(Clone, Copy, Debug)]
struct Region {
    start: u64,
    end: u64, // exclusive
    host: *mut u8,
}

/// Guest RAM as a list of (guest-physical range, host pointer).
pub struct Ram {
    regions: Vec<Region>,
    /// Keeps the mappings alive as long as the pointers above are used (a
    /// `GuestMemoryMmap<B>` of whichever write-tracking bitmap `B`).
    _mem: Box<dyn Any + Send>,
    /// Who reports writes by others, if anyone does.
    pub(crate) foreign: Option<Box<dyn ForeignWrites>>,
}

// SAFETY: `Ram` only holds pointers into the mmap regions owned by `_mem`,
// which is itself `Send`. Concurrent access from several vCPU threads is the
// guest's business, exactly as with KVM's view of the same memory.
unsafe impl Send for Ram {}

impl Ram {
    /// RAM over `mem`. The CPU's own writes bypass `mem`'s bitmap (they go
    /// to the host mapping directly).
    pub fn new<B>(mem: GuestMemoryMmap<B>) -> Self
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let mut regions: Vec<Region> = mem
            .iter()
            .filter(|r| r.len() > 0)
            .filter_map(|r| {
                let start = r.start_addr().0;
                let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?;
                Some(Region {
                    start,
                    end: start + r.len(),
                    host,
                })
            })
            .collect();
        regions.sort_by_key(|r| r.start);
        Ram {
            regions,
            _mem: Box::new(mem),
            foreign: None,
        }
    }

    /// Have `log` report the writes others make to this RAM (device DMA):
    /// the CPU drops decoded and translated code on those pages.
    pub fn with_foreign_writes(mut self, log: Box<dyn ForeignWrites>) -> Self {
        self.foreign = Some(log);
        self
    }

    /// An empty RAM (every physical address is MMIO). For tests.
    pub fn empty() -> Self {
        Ram {
            regions: Vec::new(),
            _mem: Box::new(GuestMemoryMmap::<()>::default()),
            foreign: None,
        }
    }

    /// Host address of the 4 KiB page containing `paddr`, if it is RAM.
    #[inline]
    pub fn host_page(&self, paddr: u64) -> Option<*mut u8> {
        let page = paddr & !0xfff;
        for r in &self.regions {
            if page >= r.start && page + 0x1000 <= r.end {
                // The offset is within the region's mapping.
                return Some(r.host.wrapping_add((page - r.start) as usize));
            }
        }
        None
    }

    /// Is `paddr` in RAM?
    pub fn contains(&self, paddr: u64) -> bool {
        self.host_page(paddr).is_some()
    }

    /// Copy `buf.len()` bytes from guest-physical `paddr`. Returns false if
    /// any byte is outside RAM (those bytes are left untouched).
    pub fn read(&self, paddr: u64, buf: &mut [u8]) -> bool {
        let mut done = 0;
        while done < buf.len() {
            let a = paddr.wrapping_add(done as u64);
            let Some(p) = self.host_page(a) else {
                return false;
            };
            let off = (a & 0xfff) as usize;
            let n = (0x1000 - off).min(buf.len() - done);
            // SAFETY: `p` is the host address of a RAM page of 4096 bytes
            // (host_page checked the whole page is in the region) and
            // off + n <= 4096; the destination is a distinct Rust slice.
            unsafe {
                std::ptr::copy_nonoverlapping(p.add(off), buf[done..].as_mut_ptr(), n);
            }
            done += n;
        }
        true
    }

    /// Copy `buf` to guest-physical `paddr`. Returns false if any byte is
    /// outside RAM (bytes that are inside are written).
    pub fn write(&self, paddr: u64, buf: &[u8]) -> bool {
        let mut done = 0;
        while done < buf.len() {
            let a = paddr.wrapping_add(done as u64);
            let Some(p) = self.host_page(a) else {
                return false;
            };
            let off = (a & 0xfff) as usize;
            let n = (0x1000 - off).min(buf.len() - done);
            // SAFETY: as in `read`, the page is mapped RAM and the copy stays
            // inside it; the source is a distinct Rust slice.
            unsafe {
                std::ptr::copy_nonoverlapping(buf[done..].as_ptr(), p.add(off), n);
            }
            done += n;
        }
        true
    }
}

/// Read a little-endian value of `size` bytes (1, 2, 4 or 8) at `p`.
///
/// # Safety
/// `p..p+size` must be valid host memory.
#[inline(always)]
pub unsafe fn load(p: *const u8, size: usize) -> u64 {
    // SAFETY: the caller guarantees `size` readable bytes at `p`; unaligned
    // reads are allowed by read_unaligned.
    unsafe {
        match size {
            1 => *p as u64,
            2 => (p as *const u16).read_unaligned() as u64,
            4 => (p as *const u32).read_unaligned() as u64,
            _ => (p as *const u64).read_unaligned(),
        }
    }
}

/// Write the low `size` bytes of `v` little-endian at `p`.
///
/// # Safety
/// `p..p+size` must be valid, writable host memory.
#[inline(always)]
pub unsafe fn store(p: *mut u8, size: usize, v: u64) {
    // SAFETY: the caller guarantees `size` writable bytes at `p`.
    unsafe {
        match size {
            1 => *p = v as u8,
            2 => (p as *mut u16).write_unaligned(v as u16),
            4 => (p as *mut u32).write_unaligned(v as u32),
            _ => (p as *mut u64).write_unaligned(v),
        }
    }
}
