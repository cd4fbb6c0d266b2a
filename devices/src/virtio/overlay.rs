//! A copy-on-write overlay over a disk (`--disk ...,snapshot=on`, and
//! every writable disk of a recording or a replay): the guest reads and
//! writes as usual, but its writes, discards and zeroing land in an
//! overlay file of the host's temporary directory, never in the image.
//! The image is opened read-only, so a replay finds it exactly as the
//! recording did (its hash is in the log's header), and the recording's
//! writes are seen by the guest the same way in both runs.
//!
//! The overlay is a sparse file the size of the disk, unlinked as soon as
//! it is created (nothing is left behind, whatever ends duet), with a
//! bitmap of the 4 KiB blocks written so far. A block is copied up from
//! the image when a write first covers part of it. Its size on the host is
//! at most the blocks the guest wrote.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::guest_memory::{host_slice, GuestSlice, WriteLog};

use super::block::Disk;

/// Overlay granularity (bytes).
pub const BLOCK: u64 = 4096;

/// A disk whose writes go to an overlay (see the module docs).
pub struct OverlayDisk {
    base: Box<dyn Disk>,
    overlay: File,
    /// One bit per block: written (the overlay holds it).
    written: Vec<u64>,
    size: u64,
    blocks_written: u64,
}

impl OverlayDisk {
    /// An overlay over `base`, in a new unlinked file of `dir`.
    pub fn new(base: Box<dyn Disk>, dir: &std::path::Path) -> io::Result<Self> {
        let size = base.size();
        let overlay = unlinked_file(dir)?;
        overlay.set_len(size)?;
        let blocks = size.div_ceil(BLOCK);
        Ok(OverlayDisk {
            base,
            overlay,
            written: vec![0; blocks.div_ceil(64) as usize],
            size,
            blocks_written: 0,
        })
    }

    /// Blocks the guest wrote so far.
    pub fn blocks_written(&self) -> u64 {
        self.blocks_written
    }

    fn is_written(&self, block: u64) -> bool {
        self.written[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn block_len(&self, block: u64) -> u64 {
        BLOCK.min(self.size - block * BLOCK)
    }

    /// Make `block` the overlay's: copy it up from the image unless
    /// `whole` (the caller overwrites all of it).
    fn own(&mut self, block: u64, whole: bool) -> io::Result<()> {
        if self.is_written(block) {
            return Ok(());
        }
        if !whole {
            let mut buf = vec![0u8; self.block_len(block) as usize];
            let log = WriteLog::default();
            self.base
                .read_to(block * BLOCK, &host_slice(&mut buf[..], &log))?;
            self.overlay.write_all_at(&buf, block * BLOCK)?;
        }
        self.written[(block / 64) as usize] |= 1 << (block % 64);
        self.blocks_written += 1;
        Ok(())
    }

    /// The pieces of `[offset, offset + len)`, one per block: (block,
    /// offset, length, position in the request).
    fn pieces(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, u64, u64)>> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "past the end of the disk",
            ));
        }
        let mut v = Vec::new();
        let mut at = offset;
        while at < offset + len {
            let block = at / BLOCK;
            let n = ((block + 1) * BLOCK).min(offset + len) - at;
            v.push((block, at, n, at - offset));
            at += n;
        }
        Ok(v)
    }

    fn fill(&mut self, offset: u64, len: u64, with: Option<&GuestSlice>) -> io::Result<()> {
        for (block, at, n, pos) in self.pieces(offset, len)? {
            let whole = n == self.block_len(block);
            self.own(block, whole)?;
            let mut buf = vec![0u8; n as usize];
            if let Some(src) = with {
                let s = src
                    .subslice(pos as usize, n as usize)
                    .map_err(io::Error::other)?;
                s.copy_to(&mut buf[..]);
            }
            self.overlay.write_all_at(&buf, at)?;
        }
        Ok(())
    }
}

impl Disk for OverlayDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_to(&mut self, offset: u64, dst: &GuestSlice) -> io::Result<()> {
        for (block, at, n, pos) in self.pieces(offset, dst.len() as u64)? {
            let d = dst
                .subslice(pos as usize, n as usize)
                .map_err(io::Error::other)?;
            if self.is_written(block) {
                let mut buf = vec![0u8; n as usize];
                self.overlay.read_exact_at(&mut buf, at)?;
                d.copy_from(&buf[..]);
            } else {
                self.base.read_to(at, &d)?;
            }
        }
        Ok(())
    }

    fn write_from(&mut self, offset: u64, src: &GuestSlice) -> io::Result<()> {
        self.fill(offset, src.len() as u64, Some(src))
    }

    /// Nothing to make durable: the overlay ends with the run.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Discarded blocks read as zeros (as a punched hole in an image).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.fill(offset, len, None)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.fill(offset, len, None)
    }
}

/// A new file in `dir`, already unlinked.
fn unlinked_file(dir: &std::path::Path) -> io::Result<File> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    for _ in 0..100 {
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = dir.join(format!(".duet-overlay-{}-{n}", std::process::id()));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => {
                std::fs::remove_file(&p)?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("no free overlay file name"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::MemDisk;

    fn read(d: &mut OverlayDisk, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        d.read_to(offset, &host_slice(&mut b[..], &WriteLog::default()))
            .unwrap();
        b
    }

    fn write(d: &mut OverlayDisk, offset: u64, data: &[u8]) {
        let mut b = data.to_vec();
        d.write_from(offset, &host_slice(&mut b[..], &WriteLog::default()))
            .unwrap();
    }

    /// Writes are read back across block edges, the rest reads from the
    /// image, and the image never changes.
    #[test]
    fn writes_stay_in_the_overlay() {
        let mut base = MemDisk::new(3 * BLOCK as usize + 1024);
        for (i, b) in base.data.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let image = base.data.clone();
        let mut d = OverlayDisk::new(Box::new(base), &std::env::temp_dir()).unwrap();
        let mut want = image.clone();
        let pattern: Vec<u8> = (0..1536).map(|i| (i * 7) as u8).collect();
        // Across the edge of blocks 0 and 1, partial on both sides.
        write(&mut d, 3584, &pattern);
        want[3584..3584 + 1536].copy_from_slice(&pattern);
        // The short last block, then zeroes in block 2.
        write(&mut d, 3 * BLOCK + 512, &[0xee; 512]);
        want[3 * BLOCK as usize + 512..3 * BLOCK as usize + 1024].fill(0xee);
        d.write_zeroes(2 * BLOCK + 512, 1024, false).unwrap();
        want[2 * BLOCK as usize + 512..2 * BLOCK as usize + 1536].fill(0);
        assert_eq!(read(&mut d, 0, want.len()), want);
        assert_eq!(read(&mut d, 4000, 300), want[4000..4300]);
        assert_eq!(d.blocks_written(), 4);
        assert!(d
            .read_to(
                3 * BLOCK + 1024,
                &host_slice(&mut [0u8; 1][..], &WriteLog::default())
            )
            .is_err());
        // The image under it is unchanged.
        let mut base = std::mem::replace(&mut d.base, Box::new(MemDisk::new(1)));
        let mut b = vec![0u8; image.len()];
        base.read_to(0, &host_slice(&mut b[..], &WriteLog::default()))
            .unwrap();
        assert_eq!(b, image);
    }
}
