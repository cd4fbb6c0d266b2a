//! Executable memory for translated code, never writable and executable
//! at the same address.
//!
//! One `memfd` is mapped twice: a read+execute view the CPU runs and a
//! read+write view the translator writes (new code, patched chain jumps).
//! No page of either mapping is ever both writable and executable, and no
//! `mprotect` is needed per translation or per patched jump (on this
//! project's hosts an `mprotect` round trip costs about 7 µs; a boot links
//! tens of thousands of jumps). x86 keeps instruction fetch coherent with
//! stores by physical address, so code written through the other view is
//! seen by the next fetch (every write happens while no translated code
//! runs; entering it takes an indirect jump).

use std::io;

/// Errors setting up executable memory (host failures).
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("cannot create the JIT's code memory (memfd_create): {0}")]
    Memfd(io::Error),
    #[error("cannot size the JIT's code memory to {size} bytes: {source}")]
    Size { size: usize, source: io::Error },
    #[error("cannot map the JIT's code memory: {0}")]
    Map(io::Error),
}

/// A fixed-size region of code memory with a bump allocator.
pub struct CodeBuffer {
    /// Read+execute view (what runs).
    exec: *mut u8,
    /// Read+write view of the same pages (what the translator writes).
    write: *mut u8,
    size: usize,
    /// Bytes handed out so far.
    used: usize,
    /// Bytes of the permanent prefix (trampolines) kept across flushes.
    keep: usize,
}

// SAFETY: the buffer is owned by one CPU and only touched from the thread
// running it; the raw pointers are to a private mapping.
unsafe impl Send for CodeBuffer {}

impl CodeBuffer {
    /// Map `size` bytes (rounded up to pages) of code memory.
    pub fn new(size: usize) -> Result<Self, BufferError> {
        let size = size.div_ceil(4096) * 4096;
        // SAFETY: memfd_create with a valid NUL-terminated name and flags;
        // the result is checked.
        let fd = unsafe { libc::memfd_create(c"duet-jit".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(BufferError::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: fd is the memfd just created; ftruncate sizes it.
        if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
            let source = io::Error::last_os_error();
            // SAFETY: closing our own fd.
            unsafe { libc::close(fd) };
            return Err(BufferError::Size { size, source });
        }
        let map = |prot: libc::c_int| -> Result<*mut u8, BufferError> {
            // SAFETY: a fresh shared mapping of the whole memfd; the kernel
            // picks the address; the result is checked.
            let p =
                unsafe { libc::mmap(std::ptr::null_mut(), size, prot, libc::MAP_SHARED, fd, 0) };
            if p == libc::MAP_FAILED {
                Err(BufferError::Map(io::Error::last_os_error()))
            } else {
                Ok(p.cast())
            }
        };
        let exec = map(libc::PROT_READ | libc::PROT_EXEC);
        let write = map(libc::PROT_READ | libc::PROT_WRITE);
        // SAFETY: the mappings keep the memory alive; the fd is no longer needed.
        unsafe { libc::close(fd) };
        let (exec, write) = match (exec, write) {
            (Ok(e), Ok(w)) => (e, w),
            (e, w) => {
                for p in [e.as_ref().ok(), w.as_ref().ok()].into_iter().flatten() {
                    // SAFETY: unmapping a mapping made above.
                    unsafe { libc::munmap((*p).cast(), size) };
                }
                return Err(e
                    .err()
                    .or(w.err())
                    .unwrap_or(BufferError::Map(io::Error::other("mapping failed"))));
            }
        };
        Ok(CodeBuffer {
            exec,
            write,
            size,
            used: 0,
            keep: 0,
        })
    }

    /// The execute-view address of the next byte to be handed out.
    pub fn next_addr(&self) -> u64 {
        self.exec as u64 + self.used as u64
    }

    /// Free bytes.
    pub fn free(&self) -> usize {
        self.size - self.used
    }

    pub fn used(&self) -> usize {
        self.used
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Copy `code` (assembled for address [`CodeBuffer::next_addr`]) in
    /// and hand out its execute-view address, 16-byte aligned after it.
    /// None when it does not fit.
    pub fn push(&mut self, code: &[u8]) -> Option<u64> {
        let len = code.len().div_ceil(16) * 16;
        if len > self.free() {
            return None;
        }
        let at = self.used;
        // SAFETY: [at, at + code.len()) lies inside the write view (checked
        // against free() above); no translated code runs while we write.
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.write.add(at), code.len());
            // Pad with INT3 so a stray jump into padding traps.
            std::ptr::write_bytes(self.write.add(at + code.len()), 0xcc, len - code.len());
        }
        self.used += len;
        Some(self.exec as u64 + at as u64)
    }

    /// Keep everything handed out so far across [`CodeBuffer::reset`]
    /// (the permanent trampolines).
    pub fn keep_prefix(&mut self) {
        self.keep = self.used;
    }

    /// Forget every translation (the permanent prefix stays).
    pub fn reset(&mut self) {
        self.used = self.keep;
    }

    /// Is `addr` inside the execute view's used part?
    pub fn contains(&self, addr: u64, len: usize) -> bool {
        let start = self.exec as u64;
        addr >= start && addr + len as u64 <= start + self.used as u64
    }

    /// Write the 4 bytes at execute-view address `addr` (a rel32 field of
    /// a jump being linked or unlinked).
    pub fn patch_u32(&mut self, addr: u64, v: u32) {
        assert!(self.contains(addr, 4), "patch outside the code buffer");
        let off = (addr - self.exec as u64) as usize;
        // SAFETY: checked above to lie in the used part of the write view;
        // no translated code runs while the translator patches. The field
        // may be unaligned.
        unsafe { std::ptr::write_unaligned(self.write.add(off).cast::<u32>(), v) };
    }

    /// Read back 4 bytes (tests, unlinking).
    pub fn read_u32(&self, addr: u64) -> u32 {
        assert!(self.contains(addr, 4));
        let off = (addr - self.exec as u64) as usize;
        // SAFETY: as in patch_u32, a read.
        unsafe { std::ptr::read_unaligned(self.write.add(off).cast::<u32>()) }
    }
}

impl Drop for CodeBuffer {
    fn drop(&mut self) {
        // SAFETY: unmapping the two mappings made in `new`; nothing refers
        // to them any more (the CPU owning the buffer is being dropped).
        unsafe {
            libc::munmap(self.exec.cast(), self.size);
            libc::munmap(self.write.cast(), self.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prot_of(addr: u64) -> String {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for l in maps.lines() {
            let mut it = l.split_whitespace();
            let range = it.next().unwrap();
            let perms = it.next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let (a, b) = (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            );
            if addr >= a && addr < b {
                return perms.to_string();
            }
        }
        panic!("{addr:#x} not mapped");
    }

    #[test]
    fn views_are_never_writable_and_executable() {
        let mut b = CodeBuffer::new(1 << 16).unwrap();
        // mov eax, 42; ret
        let f = b.push(&[0xb8, 42, 0, 0, 0, 0xc3]).unwrap();
        let x = prot_of(f);
        let w = prot_of(b.write as u64);
        assert!(x.starts_with("r-x"), "exec view {x}");
        assert!(w.starts_with("rw-"), "write view {w}");
        // SAFETY: f points at the function just written.
        let func: extern "C" fn() -> u32 = unsafe { std::mem::transmute(f) };
        assert_eq!(func(), 42);
        // Patch the immediate through the write view; the exec view sees it.
        b.patch_u32(f + 1, 7);
        assert_eq!(func(), 7);
        assert_eq!(b.read_u32(f + 1), 7);
        assert_eq!(b.push(&vec![0x90; 1 << 16]), None);
    }
}
