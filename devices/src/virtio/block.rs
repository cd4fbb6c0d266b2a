//! virtio-blk (virtio 1.2, 5.2) on a raw image: read, write, flush
//! (`fdatasync`), get-id, discard and write-zeroes, optionally read-only.
//!
//! Requests run synchronously when the driver notifies the queue; data
//! moves between the image and guest memory with one `preadv`/`pwritev`
//! per request over its scatter list, straight into the guest's pages (no
//! bounce buffer, no syscall per page). A write has reached the
//! host kernel when the request completes, so stopping duet (power-off,
//! Ctrl-A x, SIGTERM) loses nothing the guest wrote; a flush, and the
//! end of the run, make it durable with `fdatasync`.
//!
//! A malformed request (a header shorter than 16 bytes, no status byte,
//! data not a multiple of 512 bytes, a range past the end) completes with
//! `VIRTIO_BLK_S_IOERR`; an unknown type with `VIRTIO_BLK_S_UNSUPP`.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use virtio_bindings::virtio_blk::*;
use vm_memory::bitmap::Bitmap;
use vm_memory::GuestAddress;

use crate::guest_memory::GuestSlice;

use super::queue::ChainCursor;
use super::{
    device_type, feature, read_config_bytes, Chain, DeviceFault, GuestMemory, Signals,
    VirtioDevice, Virtqueue,
};

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments in one request (queue size minus header and status).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Limits of one discard / write-zeroes request.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
pub const MAX_DISCARD_SEG: u32 = 64;
const HEADER_LEN: u64 = 16;
/// Bytes of the device ID string.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Errors opening an image (host side).
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open it: {0}")]
    Open(io::Error),
    #[error("it is in use by another process (locked)")]
    Locked,
    #[error("cannot read its size: {0}")]
    Size(io::Error),
    #[error("it is empty (an image needs at least one 512-byte sector)")]
    Empty,
}

/// Where a disk's sectors live.
pub trait Disk: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fill `dst` from byte `offset`.
    fn read_to(&mut self, offset: u64, dst: &GuestSlice) -> io::Result<()>;
    /// Write `src` at byte `offset`.
    fn write_from(&mut self, offset: u64, src: &GuestSlice) -> io::Result<()>;
    /// Fill the buffers `dst`, one after the other, from byte `offset`
    /// (a request's scatter list: a disk on a file does it in one
    /// `preadv`).
    fn read_vectored(&mut self, mut offset: u64, dst: &[GuestSlice]) -> io::Result<()> {
        for d in dst {
            self.read_to(offset, d)?;
            offset += d.len() as u64;
        }
        Ok(())
    }
    /// Write the buffers `src`, one after the other, from byte `offset`
    /// (one `pwritev` on a file).
    fn write_vectored(&mut self, mut offset: u64, src: &[GuestSlice]) -> io::Result<()> {
        for s in src {
            self.write_from(offset, s)?;
            offset += s.len() as u64;
        }
        Ok(())
    }
    /// Make every write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// The guest no longer needs `[offset, offset + len)`.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Zero `[offset, offset + len)` (deallocating it if `unmap`).
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}

/// A raw image file.
pub struct DiskFile {
    file: File,
    size: u64,
    dirty: bool,
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an owned, open descriptor; no memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl DiskFile {
    /// Open `path` (read-only or read-write) and lock it (shared for
    /// read-only, exclusive otherwise) so two VMs cannot corrupt it.
    pub fn open(path: &Path, readonly: bool) -> Result<Self, DiskError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(DiskError::Open)?;
        let op = if readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        } | libc::LOCK_NB;
        // SAFETY: flock on an owned, open descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
            return Err(DiskError::Locked);
        }
        let size = file.metadata().map_err(DiskError::Size)?.len();
        if size < SECTOR_SIZE {
            return Err(DiskError::Empty);
        }
        Ok(DiskFile {
            file,
            size,
            dirty: false,
        })
    }
}

impl Disk for DiskFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_to(&mut self, offset: u64, dst: &GuestSlice) -> io::Result<()> {
        self.read_vectored(offset, std::slice::from_ref(dst))
    }

    fn write_from(&mut self, offset: u64, src: &GuestSlice) -> io::Result<()> {
        self.write_vectored(offset, std::slice::from_ref(src))
    }

    fn read_vectored(&mut self, offset: u64, dst: &[GuestSlice]) -> io::Result<()> {
        // preadv writes behind vm-memory's back: log the pages (for CPUs
        // that cache code decoded from guest memory).
        for d in dst {
            d.bitmap().mark_dirty(0, d.len());
        }
        let guards: Vec<_> = dst.iter().map(|d| d.ptr_guard_mut()).collect();
        let bufs: Vec<(*mut u8, usize)> = guards
            .iter()
            .zip(dst)
            .map(|(g, d)| (g.as_ptr(), d.len()))
            .collect();
        let done = vectored(&bufs, offset, |iov, n, at| {
            // SAFETY: every iovec points into guest RAM that `guards`
            // keeps mapped, with its slice's length; preadv writes at
            // most that many bytes into each.
            unsafe { libc::preadv(self.file.as_raw_fd(), iov, n, at) }
        })?;
        // Past the end of a file that shrank: zeros.
        let mut skip = done;
        for d in dst {
            let n = d.len() as u64;
            if skip < n {
                let rest = d
                    .offset(skip as usize)
                    .map_err(|_| io::Error::other("slice"))?;
                rest.copy_from(&vec![0u8; rest.len()]);
            }
            skip = skip.saturating_sub(n);
        }
        Ok(())
    }

    fn write_vectored(&mut self, offset: u64, src: &[GuestSlice]) -> io::Result<()> {
        self.dirty = true;
        let guards: Vec<_> = src.iter().map(|s| s.ptr_guard()).collect();
        let bufs: Vec<(*mut u8, usize)> = guards
            .iter()
            .zip(src)
            .map(|(g, s)| (g.as_ptr().cast_mut(), s.len()))
            .collect();
        let total: u64 = src.iter().map(|s| s.len() as u64).sum();
        let done = vectored(&bufs, offset, |iov, n, at| {
            // SAFETY: every iovec points into guest RAM that `guards`
            // keeps mapped, with its slice's length; pwritev only reads.
            unsafe { libc::pwritev(self.file.as_raw_fd(), iov, n, at) }
        })?;
        if done < total {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        self.file.sync_data()?;
        self.dirty = false;
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.dirty = true;
        match fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            // Discard is advisory: a file system without holes keeps the data.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.dirty = true;
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        if fallocate(&self.file, mode, offset, len).is_ok() {
            return Ok(());
        }
        // No fallocate support: write zeros.
        use std::os::unix::fs::FileExt;
        let zeros = vec![0u8; 64 * 1024];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Most buffers one `preadv`/`pwritev` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Run `op(iovecs, count, file_offset)` (`preadv` or `pwritev`) over
/// `bufs` from byte `offset` until every byte moved or the file ended
/// (`op` returned 0), resuming after short transfers and `EINTR`; returns
/// the bytes moved.
fn vectored(
    bufs: &[(*mut u8, usize)],
    offset: u64,
    mut op: impl FnMut(*const libc::iovec, libc::c_int, libc::off_t) -> isize,
) -> io::Result<u64> {
    let total: u64 = bufs.iter().map(|b| b.1 as u64).sum();
    let mut done = 0u64;
    // Where `done` is: buffer index and bytes into it.
    let (mut index, mut into) = (0usize, 0usize);
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(bufs.len().min(IOV_MAX));
    while done < total {
        while index < bufs.len() && into == bufs[index].1 {
            index += 1;
            into = 0;
        }
        iov.clear();
        for (k, &(ptr, len)) in bufs[index..].iter().take(IOV_MAX).enumerate() {
            let skip = if k == 0 { into } else { 0 };
            iov.push(libc::iovec {
                // SAFETY: `skip` < len: the pointer stays inside the buffer.
                iov_base: unsafe { ptr.add(skip) }.cast(),
                iov_len: len - skip,
            });
        }
        let n = op(
            iov.as_ptr(),
            iov.len() as libc::c_int,
            (offset + done) as i64,
        );
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        let mut moved = n as usize;
        done += moved as u64;
        while moved > 0 {
            let step = (bufs[index].1 - into).min(moved);
            into += step;
            moved -= step;
            if into == bufs[index].1 {
                index += 1;
                into = 0;
            }
        }
    }
    Ok(done)
}

impl Drop for DiskFile {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            log::error!("virtio-blk: flushing the image at exit failed: {e}");
        }
    }
}

/// A disk in memory (tests, fuzzing).
pub struct MemDisk {
    pub data: Vec<u8>,
    pub flushes: u64,
}

impl MemDisk {
    pub fn new(size: usize) -> Self {
        MemDisk {
            data: vec![0; size],
            flushes: 0,
        }
    }
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_to(&mut self, offset: u64, dst: &GuestSlice) -> io::Result<()> {
        let o = offset as usize;
        dst.copy_from(&self.data[o..o + dst.len()]);
        Ok(())
    }
    fn write_from(&mut self, offset: u64, src: &GuestSlice) -> io::Result<()> {
        let o = offset as usize;
        let n = src.len();
        src.copy_to(&mut self.data[o..o + n]);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        Ok(())
    }
    fn discard(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// Request counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

pub struct VirtioBlock {
    disk: Box<dyn Disk>,
    readonly: bool,
    id: [u8; ID_BYTES],
    queue: Option<Virtqueue>,
    mem: Option<GuestMemory>,
    stats: BlockStats,
}

/// How a request ended.
enum Outcome {
    Ok,
    IoErr,
    Unsupported,
}

impl VirtioBlock {
    /// A disk; `id` is what GET_ID returns (truncated to 20 bytes).
    pub fn new(disk: Box<dyn Disk>, readonly: bool, id: &str) -> Self {
        let mut idb = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        VirtioBlock {
            disk,
            readonly,
            id: idb,
            queue: None,
            mem: None,
            stats: BlockStats::default(),
        }
    }

    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// Make every write durable (at the end of a run).
    pub fn flush(&mut self) -> io::Result<()> {
        self.disk.flush()
    }

    fn capacity_sectors(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    fn config_bytes(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        c[0..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[56] = 1;
        c
    }

    /// Move data between the disk and the chain's data buffers (`write`:
    /// guest to disk). `data` are the segments, `offset` the disk byte.
    fn transfer(
        &mut self,
        mem: &GuestMemory,
        data: &[super::Segment],
        skip: u64,
        len: u64,
        offset: u64,
        write: bool,
    ) -> io::Result<()> {
        let mut cur = ChainCursor::new(data);
        cur.skip(skip);
        let mut left = len;
        let mut slices = Vec::with_capacity(data.len());
        while left > 0 {
            let Some(p) = cur.next_piece(left.min(usize::MAX as u64) as usize) else {
                return Err(io::Error::other("chain shorter than the request"));
            };
            let slice = mem
                .get_slice(GuestAddress(p.addr.0), p.len as usize, !write)
                .map_err(|_| io::Error::other("buffer outside RAM"))?;
            slices.push(slice);
            left -= u64::from(p.len);
        }
        // The whole scatter list in one call (one preadv/pwritev on a
        // file, as QEMU and Cloud Hypervisor do), not a syscall per page.
        if write {
            self.disk.write_vectored(offset, &slices)
        } else {
            self.disk.read_vectored(offset, &slices)
        }
    }

    /// The sector range of a request, checked against the capacity.
    fn range(&self, sector: u64, bytes: u64) -> Option<u64> {
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(bytes)?;
        (end <= self.capacity_sectors() * SECTOR_SIZE).then_some(start)
    }

    /// Run one request; returns the bytes written into the guest's buffers
    /// (data and status).
    fn request(&mut self, mem: &GuestMemory, chain: &Chain) -> u32 {
        let status_len = 1u64;
        let writable = chain.writable_len();
        if chain.readable_len() < HEADER_LEN || writable < status_len {
            // No status byte to report through, or no header: nothing
            // sensible to do; return the chain empty.
            self.stats.errors += 1;
            if writable >= status_len {
                chain.write_bytes(mem, writable - 1, &[VIRTIO_BLK_S_IOERR as u8]);
                return 1;
            }
            return 0;
        }
        let header = chain.read_bytes(mem, 0, HEADER_LEN as usize);
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        let in_data = writable - status_len;
        let out_data = chain.readable_len() - HEADER_LEN;
        let mut written = 0u64;
        let outcome = match kind {
            VIRTIO_BLK_T_IN => {
                if in_data % SECTOR_SIZE != 0 {
                    Outcome::IoErr
                } else if let Some(offset) = self.range(sector, in_data) {
                    match self.transfer(mem, &chain.writable, 0, in_data, offset, false) {
                        Ok(()) => {
                            written = in_data;
                            self.stats.reads += 1;
                            self.stats.bytes_read += in_data;
                            Outcome::Ok
                        }
                        Err(_) => Outcome::IoErr,
                    }
                } else {
                    Outcome::IoErr
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.readonly || out_data % SECTOR_SIZE != 0 {
                    Outcome::IoErr
                } else if let Some(offset) = self.range(sector, out_data) {
                    match self.transfer(mem, &chain.readable, HEADER_LEN, out_data, offset, true) {
                        Ok(()) => {
                            self.stats.writes += 1;
                            self.stats.bytes_written += out_data;
                            Outcome::Ok
                        }
                        Err(_) => Outcome::IoErr,
                    }
                } else {
                    Outcome::IoErr
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                self.stats.flushes += 1;
                match self.disk.flush() {
                    Ok(()) => Outcome::Ok,
                    Err(_) => Outcome::IoErr,
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = in_data.min(ID_BYTES as u64) as usize;
                written = chain.write_bytes(mem, 0, &self.id[..n]) as u64;
                Outcome::Ok
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.readonly {
                    Outcome::IoErr
                } else {
                    self.discard_or_zero(mem, chain, kind == VIRTIO_BLK_T_DISCARD, out_data)
                }
            }
            _ => Outcome::Unsupported,
        };
        let status = match outcome {
            Outcome::Ok => VIRTIO_BLK_S_OK,
            Outcome::IoErr => {
                self.stats.errors += 1;
                VIRTIO_BLK_S_IOERR
            }
            Outcome::Unsupported => VIRTIO_BLK_S_UNSUPP,
        } as u8;
        chain.write_bytes(mem, writable - 1, &[status]);
        (written + status_len) as u32
    }

    fn discard_or_zero(
        &mut self,
        mem: &GuestMemory,
        chain: &Chain,
        discard: bool,
        len: u64,
    ) -> Outcome {
        const SEGMENT: u64 = 16;
        if len == 0 || len % SEGMENT != 0 || len / SEGMENT > u64::from(MAX_DISCARD_SEG) {
            return Outcome::IoErr;
        }
        let bytes = chain.read_bytes(mem, HEADER_LEN, len as usize);
        for seg in bytes.chunks_exact(SEGMENT as usize) {
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
            let count = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if count > MAX_DISCARD_SECTORS
                || flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
                || (discard && unmap)
            {
                return Outcome::Unsupported;
            }
            let n = u64::from(count) * SECTOR_SIZE;
            let Some(offset) = self.range(sector, n) else {
                return Outcome::IoErr;
            };
            let r = if discard {
                self.disk.discard(offset, n)
            } else {
                self.disk.write_zeroes(offset, n, unmap)
            };
            if r.is_err() {
                return Outcome::IoErr;
            }
        }
        Outcome::Ok
    }

    fn process(&mut self) -> Result<Signals, DeviceFault> {
        let (Some(mut q), Some(mem)) = (self.queue.take(), self.mem.clone()) else {
            return Ok(Signals::default());
        };
        let r = q.serve_all(0, |chain| self.request(&mem, chain));
        self.queue = Some(q);
        r
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = feature::COMMON
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn config_len(&self) -> usize {
        60
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        _features: u64,
        mut queues: Vec<Option<Virtqueue>>,
    ) -> Result<Signals, DeviceFault> {
        self.queue = queues.pop().flatten();
        self.mem = Some(mem);
        self.process()
    }

    fn reset(&mut self) {
        self.queue = None;
        self.mem = None;
    }

    fn notify(&mut self, _queue: usize) -> Result<Signals, DeviceFault> {
        self.process()
    }

    fn describe(&self) -> String {
        let s = self.stats;
        format!(
            "{} reads ({} bytes), {} writes ({} bytes), {} flushes, {} errors",
            s.reads, s.bytes_read, s.writes, s.bytes_written, s.flushes, s.errors
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::testing::{memory, DriverQueue};
    use vm_memory::Bytes;

    fn header(kind: u32, sector: u64) -> Vec<u8> {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    fn device(readonly: bool) -> (VirtioBlock, GuestMemory, DriverQueue) {
        let mem = memory();
        let mut disk = MemDisk::new(8 * 512);
        for (i, b) in disk.data.iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        let mut d = VirtioBlock::new(Box::new(disk), readonly, "duet-test-disk");
        let q = DriverQueue::new(0x1000, 16);
        let v = Virtqueue::new(&q.config(), false, mem.clone()).unwrap();
        d.activate(mem.clone(), 0, vec![Some(v)]).unwrap();
        (d, mem, q)
    }

    fn status_at(mem: &GuestMemory, q: &DriverQueue, head: u16, last: u16) -> u8 {
        let desc = q.desc + 16 * u64::from(head + last);
        let addr: u64 = mem.read_obj(GuestAddress(desc)).unwrap();
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn reads_writes_and_ids() {
        let (mut d, mem, mut q) = device(false);
        // Read sectors 2..4 into two buffers.
        let h = q.add_chain(
            &mem,
            &[
                (&header(VIRTIO_BLK_T_IN, 2), 16, false),
                (&[], 512, true),
                (&[], 512, true),
                (&[0xff], 1, true),
            ],
        );
        d.notify(0).unwrap();
        assert_eq!(q.take_used(&mem), vec![(h, 1025)]);
        assert_eq!(status_at(&mem, &q, h, 3), 0);
        let desc2: u64 = mem.read_obj(GuestAddress(q.desc + 16 * 2)).unwrap();
        let b: u8 = mem.read_obj(GuestAddress(desc2)).unwrap();
        assert_eq!(b, 3, "second buffer holds sector 3");
        // Write sector 7.
        let h = q.add_chain(
            &mem,
            &[
                (&header(VIRTIO_BLK_T_OUT, 7), 16, false),
                (&[0xab; 512], 512, false),
                (&[0xff], 1, true),
            ],
        );
        d.notify(0).unwrap();
        assert_eq!(q.take_used(&mem), vec![(h, 1)]);
        assert_eq!(status_at(&mem, &q, h, 2), 0);
        assert_eq!(d.stats().bytes_written, 512);
        // Past the end: IOERR.
        let h = q.add_chain(
            &mem,
            &[
                (&header(VIRTIO_BLK_T_IN, 8), 16, false),
                (&[], 512, true),
                (&[0xff], 1, true),
            ],
        );
        d.notify(0).unwrap();
        q.take_used(&mem);
        assert_eq!(status_at(&mem, &q, h, 2), VIRTIO_BLK_S_IOERR as u8);
        // GET_ID.
        let h = q.add_chain(
            &mem,
            &[
                (&header(VIRTIO_BLK_T_GET_ID, 0), 16, false),
                (&[], 20, true),
                (&[0xff], 1, true),
            ],
        );
        d.notify(0).unwrap();
        assert_eq!(q.take_used(&mem), vec![(h, 21)]);
        let a: u64 = mem
            .read_obj(GuestAddress(q.desc + 16 * u64::from(h + 1)))
            .unwrap();
        let mut id = [0u8; 14];
        mem.read_slice(&mut id, GuestAddress(a)).unwrap();
        assert_eq!(&id, b"duet-test-disk");
        // Unknown type.
        let h = q.add_chain(&mem, &[(&header(99, 0), 16, false), (&[0xff], 1, true)]);
        d.notify(0).unwrap();
        q.take_used(&mem);
        assert_eq!(status_at(&mem, &q, h, 1), VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn a_readonly_disk_refuses_writes() {
        let (mut d, mem, mut q) = device(true);
        assert_ne!(d.features() & 1 << VIRTIO_BLK_F_RO, 0);
        let h = q.add_chain(
            &mem,
            &[
                (&header(VIRTIO_BLK_T_OUT, 0), 16, false),
                (&[1; 512], 512, false),
                (&[0xff], 1, true),
            ],
        );
        d.notify(0).unwrap();
        q.take_used(&mem);
        assert_eq!(status_at(&mem, &q, h, 2), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(d.stats().writes, 0);
    }

    #[test]
    fn write_zeroes_and_capacity() {
        let (mut d, mem, mut q) = device(false);
        let mut c = [0u8; 8];
        d.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 8);
        let mut seg = 1u64.to_le_bytes().to_vec();
        seg.extend_from_slice(&2u32.to_le_bytes());
        seg.extend_from_slice(&0u32.to_le_bytes());
        let h = q.add_chain(
            &mem,
            &[
                (&header(VIRTIO_BLK_T_WRITE_ZEROES, 0), 16, false),
                (&seg, 16, false),
                (&[0xff], 1, true),
            ],
        );
        d.notify(0).unwrap();
        q.take_used(&mem);
        assert_eq!(status_at(&mem, &q, h, 2), 0);
        // Read sector 2 back: zero now.
        let h = q.add_chain(
            &mem,
            &[
                (&header(VIRTIO_BLK_T_IN, 2), 16, false),
                (&[9; 512], 512, true),
                (&[0xff], 1, true),
            ],
        );
        d.notify(0).unwrap();
        q.take_used(&mem);
        let a: u64 = mem
            .read_obj(GuestAddress(q.desc + 16 * u64::from(h + 1)))
            .unwrap();
        let mut s = [1u8; 512];
        mem.read_slice(&mut s, GuestAddress(a)).unwrap();
        assert_eq!(s, [0; 512]);
    }

    #[test]
    fn vectored_transfers_resume_after_short_ones_and_stop_at_the_end() {
        // A "file" of 20 bytes read into buffers of 3, 0, 5 and 7 bytes
        // from offset 4, at most 4 bytes per call (as a signal or a page
        // cache miss may cut a preadv short).
        let file: Vec<u8> = (0..20).collect();
        let mut bufs = [vec![0xeeu8; 3], vec![], vec![0xee; 5], vec![0xee; 7]];
        let list: Vec<(*mut u8, usize)> =
            bufs.iter_mut().map(|b| (b.as_mut_ptr(), b.len())).collect();
        let mut calls = 0;
        let done = vectored(&list, 4, |iov, n, at| {
            calls += 1;
            // SAFETY: the test's own iovecs over `bufs`.
            let iov = unsafe { std::slice::from_raw_parts(iov, n as usize) };
            let mut at = at as usize;
            let mut moved = 0;
            for v in iov {
                let take = v.iov_len.min(4 - moved).min(file.len() - at);
                // SAFETY: `take` fits the iovec and the file.
                unsafe {
                    std::ptr::copy_nonoverlapping(file[at..].as_ptr(), v.iov_base.cast(), take)
                };
                moved += take;
                at += take;
            }
            moved as isize
        })
        .unwrap();
        assert_eq!(done, 15);
        assert_eq!(bufs[0], [4, 5, 6]);
        assert_eq!(bufs[2], [7, 8, 9, 10, 11]);
        assert_eq!(bufs[3], [12, 13, 14, 15, 16, 17, 18]);
        assert_eq!(calls, 4);
        // The file ends first: the transfer stops there.
        let mut short = [vec![0u8; 8], vec![0u8; 8]];
        let list: Vec<(*mut u8, usize)> = short
            .iter_mut()
            .map(|b| (b.as_mut_ptr(), b.len()))
            .collect();
        let mut left = 10isize;
        let done = vectored(&list, 0, |_, _, _| {
            let n = left.min(6);
            left -= n;
            n
        })
        .unwrap();
        assert_eq!(done, 10);
    }

    #[test]
    fn a_file_image_moves_scatter_lists_in_one_go() {
        let path = std::env::temp_dir().join(format!("duet-blk-sg-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let mem = memory();
        {
            let mut f = DiskFile::open(&path, false).unwrap();
            // Three guest buffers, out of address order, 4 + 512 + 1020 bytes.
            mem.write_slice(&[1; 4], GuestAddress(0x9000)).unwrap();
            mem.write_slice(&[2; 512], GuestAddress(0x8000)).unwrap();
            mem.write_slice(&[3; 1020], GuestAddress(0xa000)).unwrap();
            let src = [
                mem.get_slice(GuestAddress(0x9000), 4, false).unwrap(),
                mem.get_slice(GuestAddress(0x8000), 512, false).unwrap(),
                mem.get_slice(GuestAddress(0xa000), 1020, false).unwrap(),
            ];
            f.write_vectored(512, &src).unwrap();
            // Read 1536 bytes back from 512 into two buffers; then from the
            // last sector on into a buffer reaching past the end of a file
            // that shrank behind duet's back: zeros there.
            let dst = [
                mem.get_slice(GuestAddress(0xc000), 1000, true).unwrap(),
                mem.get_slice(GuestAddress(0xd000), 536, true).unwrap(),
            ];
            f.read_vectored(512, &dst).unwrap();
            let mut a = vec![0u8; 1000];
            mem.read_slice(&mut a, GuestAddress(0xc000)).unwrap();
            let mut b = vec![0u8; 536];
            mem.read_slice(&mut b, GuestAddress(0xd000)).unwrap();
            let mut want = vec![1u8; 4];
            want.extend([2; 512]);
            want.extend([3; 1020]);
            assert_eq!([a, b].concat(), want);
            f.file.set_len(4096 + 100).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f.file, &[7; 100], 4096).unwrap();
            mem.write_slice(&[9; 512], GuestAddress(0xe000)).unwrap();
            let tail = [mem.get_slice(GuestAddress(0xe000), 512, true).unwrap()];
            f.read_vectored(4096, &tail).unwrap();
            let mut t = vec![0u8; 512];
            mem.read_slice(&mut t, GuestAddress(0xe000)).unwrap();
            assert_eq!(&t[..100], &[7; 100][..]);
            assert_eq!(&t[100..], &[0; 412][..], "zeros past the end");
        }
        let back = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(&back[508..516], &[0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(&back[1024..1032], &[2, 2, 2, 2, 3, 3, 3, 3]);
        assert_eq!(back[2048..2052], [0; 4]);
    }

    #[test]
    fn a_file_image_keeps_what_was_written() {
        let path = std::env::temp_dir().join(format!("duet-blk-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        {
            let mut f = DiskFile::open(&path, false).unwrap();
            assert!(matches!(
                DiskFile::open(&path, false),
                Err(DiskError::Locked)
            ));
            let mem = memory();
            mem.write_slice(&[0x5a; 512], GuestAddress(0x8000)).unwrap();
            let s = mem.get_slice(GuestAddress(0x8000), 512, false).unwrap();
            f.write_from(1024, &s).unwrap();
        }
        let back = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(&back[1024..1536], &[0x5a; 512]);
        assert_eq!(back[1023], 0);
    }
}
