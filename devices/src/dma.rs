//! Guest memory as a DMA-capable device sees it: the machine's RAM, with an
//! optional watcher told of every access a device makes.
//!
//! virtio devices and the e1000 read descriptors and buffers from guest
//! memory and write used rings and data back. Their behaviour is a function
//! of that memory, so a device-level trace that wants to replay them
//! without the guest must carry what they read (and may check what they
//! wrote). Every device access goes through `vm-memory`'s
//! [`vm_memory::GuestMemory::get_slices`] with its direction
//! ([`Permissions::Read`] or [`Permissions::Write`]): [`DmaMemory`]
//! implements that trait over the machine's [`GuestMemory`] and calls its
//! [`DmaWatch`] (if any) before handing out the slices. Everything built on
//! `vm-memory`'s `Bytes` (`read_obj`, `read_slice`, `write_slice`, atomic
//! `load`/`store`, `virtio-queue`'s ring accessors) passes through it.
//!
//! A read is reported *before* it happens (the watcher may look at the
//! bytes the device is about to read, or put them there); a write before
//! it happens too (the watcher notes the range and looks at it once the
//! device's operation is over). Devices run on the vCPU thread while the
//! vCPU is stopped, so nothing else changes the memory in between.

use std::sync::Arc;

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, Permissions};

use crate::guest_memory::{GuestMemory, GuestSlice, WriteLog};

/// Told of every device access to guest memory.
pub trait DmaWatch: Send + Sync {
    /// A device is about to read (`write` false) or write `len` bytes at
    /// guest-physical `addr` of `mem`.
    fn access(&self, mem: &GuestMemory, addr: u64, len: usize, write: bool);
}

/// The machine's guest memory, for devices.
#[derive(Clone)]
pub struct DmaMemory {
    mem: GuestMemory,
    watch: Option<Arc<dyn DmaWatch>>,
}

impl std::fmt::Debug for DmaMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaMemory")
            .field("watched", &self.watch.is_some())
            .finish()
    }
}

impl From<GuestMemory> for DmaMemory {
    fn from(mem: GuestMemory) -> Self {
        DmaMemory { mem, watch: None }
    }
}

impl DmaMemory {
    /// `mem`, its device accesses reported to `watch`.
    pub fn watched(mem: GuestMemory, watch: Option<Arc<dyn DmaWatch>>) -> Self {
        DmaMemory { mem, watch }
    }

    /// The memory underneath (accesses through it are not reported).
    pub fn physical(&self) -> &GuestMemory {
        &self.mem
    }

    #[inline]
    fn report(&self, addr: u64, len: usize, access: Permissions) {
        if let Some(w) = &self.watch {
            if len > 0 {
                if matches!(access, Permissions::Read | Permissions::ReadWrite) {
                    w.access(&self.mem, addr, len, false);
                }
                if matches!(access, Permissions::Write | Permissions::ReadWrite) {
                    w.access(&self.mem, addr, len, true);
                }
            }
        }
    }

    /// Is `[addr, addr + len)` inside one RAM region? (No access: not
    /// reported.)
    pub fn in_one_region(&self, addr: GuestAddress, len: u64) -> bool {
        let Some(r) = self.mem.find_region(addr) else {
            return len == 0;
        };
        let Some(last) = addr.0.checked_add(len.saturating_sub(1)) else {
            return false;
        };
        len == 0 || last <= r.last_addr().0
    }

    /// One contiguous slice of `len` bytes at `addr` that the device will
    /// read (`write` false) or write, reported as such.
    pub fn get_slice(
        &self,
        addr: GuestAddress,
        len: usize,
        write: bool,
    ) -> Result<GuestSlice<'_>, vm_memory::GuestMemoryError> {
        let slice = self.mem.get_slice(addr, len)?;
        let access = if write {
            Permissions::Write
        } else {
            Permissions::Read
        };
        self.report(addr.0, len, access);
        Ok(slice)
    }
}

impl vm_memory::GuestMemory for DmaMemory {
    type PhysicalMemory = GuestMemory;
    type Bitmap = WriteLog;

    fn check_range(&self, addr: GuestAddress, count: usize, _access: Permissions) -> bool {
        GuestMemoryBackend::check_range(&self.mem, addr, count)
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> vm_memory::GuestMemoryResult<impl GuestMemorySliceIterator<'a, BS<'a, WriteLog>>> {
        self.report(addr.0, count, access);
        Ok(GuestMemoryBackend::get_slices(&self.mem, addr, count))
    }

    fn physical_memory(&self) -> Option<&GuestMemory> {
        Some(&self.mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::Bytes;

    /// One reported access: address, length, write?, the bytes there then.
    type Access = (u64, usize, bool, Vec<u8>);

    #[derive(Default)]
    struct Seen(Mutex<Vec<Access>>);
    impl DmaWatch for Seen {
        fn access(&self, mem: &GuestMemory, addr: u64, len: usize, write: bool) {
            let mut b = vec![0; len];
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            self.0.lock().unwrap().push((addr, len, write, b));
        }
    }

    #[test]
    fn every_access_is_reported_with_its_direction_before_it_happens() {
        let raw = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        raw.write_slice(&[1, 2, 3, 4], GuestAddress(0x100)).unwrap();
        let seen = Arc::new(Seen::default());
        let mem = DmaMemory::watched(raw, Some(seen.clone()));
        let v: u32 = mem.read_obj(GuestAddress(0x100)).unwrap();
        assert_eq!(v, 0x0403_0201);
        mem.write_obj(0xaabbu16, GuestAddress(0x100)).unwrap();
        let h: u16 = mem
            .load(GuestAddress(0x100), std::sync::atomic::Ordering::Acquire)
            .unwrap();
        assert_eq!(h, 0xaabb);
        mem.get_slice(GuestAddress(0x200), 8, true).unwrap();
        let seen = seen.0.lock().unwrap();
        assert_eq!(
            *seen,
            vec![
                (0x100, 4, false, vec![1, 2, 3, 4]),
                (0x100, 2, true, vec![1, 2]),
                (0x100, 2, false, vec![0xbb, 0xaa]),
                (0x200, 8, true, vec![0; 8]),
            ]
        );
        // The unwatched view reports nothing (and works the same).
        let plain = DmaMemory::from(mem.physical().clone());
        assert_eq!(plain.read_obj::<u16>(GuestAddress(0x100)).unwrap(), 0xaabb);
        assert!(plain.in_one_region(GuestAddress(0xfff0), 0x10));
        assert!(!plain.in_one_region(GuestAddress(0xfff0), 0x11));
    }
}
