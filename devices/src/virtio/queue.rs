//! Split virtqueues on rust-vmm's `virtio-queue`, with every descriptor
//! chain checked before a device sees it.
//!
//! `virtio-queue` keeps the rings (available index, used ring, event
//! index). Its chain iterator stops quietly on a bad descriptor; a device
//! model needs to know, so [`Virtqueue::pop`] walks the chain itself and
//! returns a [`Chain`] of guest-memory segments only when the whole chain
//! is well formed:
//!
//! - every index is inside its table, and the chain has no more
//!   descriptors than its table has entries (so a loop is found, never
//!   followed forever);
//! - an indirect descriptor appears only in the main table, without
//!   `NEXT`, with a length that is a non-zero multiple of 16 and a table
//!   inside guest memory (virtio 1.2, 2.7.5.3);
//! - writable (device-written) descriptors come after all readable ones;
//! - every buffer lies inside one guest memory region (RAM); the total
//!   length fits in 32 bits.
//!
//! Anything else is a [`QueueError`]: the device goes to NEEDS_RESET.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{DeviceFault, GuestMemory, Signals};

const DESCRIPTOR_SIZE: u64 = 16;
const F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
const AVAIL_F_NO_INTERRUPT: u16 = virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;

/// What is wrong with a queue or one of its chains (guest input).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("queue size {0} is not a power of two between 1 and the maximum")]
    Size(u16),
    #[error("{what} at {addr:#x} is misaligned or outside guest memory")]
    Ring { what: &'static str, addr: u64 },
    #[error("available index moved {0} entries ahead, more than the queue holds")]
    AvailIndex(u16),
    #[error("ring memory at {0:#x} cannot be accessed")]
    RingMemory(u64),
    #[error("descriptor index {index} is outside a table of {size}")]
    Index { index: u16, size: u16 },
    #[error("descriptor chain is longer than its table (a loop)")]
    Loop,
    #[error("indirect descriptor: {0}")]
    Indirect(&'static str),
    #[error("a readable descriptor follows a writable one")]
    Direction,
    #[error("buffer {addr:#x}+{len:#x} is not inside guest RAM")]
    Buffer { addr: u64, len: u32 },
    #[error("chain length exceeds 4 GiB")]
    TooLong,
}

/// A guest buffer: one descriptor's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A checked descriptor chain: the buffers the device reads, then those
/// it writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
}

impl Chain {
    /// Bytes the device may read.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Copy the readable bytes from `skip` on, at most `max` of them.
    pub fn read_bytes(&self, mem: &GuestMemory, skip: u64, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut reader = ChainCursor::new(&self.readable);
        reader.skip(skip);
        let want = (self.readable_len().saturating_sub(skip)).min(max as u64) as usize;
        out.resize(want, 0);
        let n = reader.read(mem, &mut out);
        out.truncate(n);
        out
    }

    /// Write `data` into the writable buffers from byte `skip` on; returns
    /// how many bytes fit.
    pub fn write_bytes(&self, mem: &GuestMemory, skip: u64, data: &[u8]) -> usize {
        let mut w = ChainCursor::new(&self.writable);
        w.skip(skip);
        w.write(mem, data)
    }
}

/// A position inside a list of segments, for sequential copies.
#[derive(Clone, Debug)]
pub struct ChainCursor<'a> {
    segments: &'a [Segment],
    index: usize,
    offset: u32,
}

impl<'a> ChainCursor<'a> {
    pub fn new(segments: &'a [Segment]) -> Self {
        ChainCursor {
            segments,
            index: 0,
            offset: 0,
        }
    }

    /// Move forward `n` bytes (stops at the end).
    pub fn skip(&mut self, mut n: u64) {
        while n > 0 && self.index < self.segments.len() {
            let left = u64::from(self.segments[self.index].len - self.offset);
            if n < left {
                self.offset += n as u32;
                return;
            }
            n -= left;
            self.index += 1;
            self.offset = 0;
        }
    }

    /// The contiguous piece at the cursor, at most `max` bytes.
    pub fn next_piece(&mut self, max: usize) -> Option<Segment> {
        while self.index < self.segments.len() {
            let s = self.segments[self.index];
            let left = s.len - self.offset;
            if left == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let n = left.min(u32::try_from(max).unwrap_or(u32::MAX));
            if n == 0 {
                return None;
            }
            let piece = Segment {
                addr: GuestAddress(s.addr.0 + u64::from(self.offset)),
                len: n,
            };
            self.offset += n;
            return Some(piece);
        }
        None
    }

    /// Copy guest bytes into `buf`; returns how many were copied.
    pub fn read(&mut self, mem: &GuestMemory, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let Some(p) = self.next_piece(buf.len() - done) else {
                break;
            };
            let end = done + p.len as usize;
            if mem.read_slice(&mut buf[done..end], p.addr).is_err() {
                break;
            }
            done = end;
        }
        done
    }

    /// Copy `data` into guest memory; returns how many bytes fit.
    pub fn write(&mut self, mem: &GuestMemory, data: &[u8]) -> usize {
        let mut done = 0;
        while done < data.len() {
            let Some(p) = self.next_piece(data.len() - done) else {
                break;
            };
            let end = done + p.len as usize;
            if mem.write_slice(&data[done..end], p.addr).is_err() {
                break;
            }
            done = end;
        }
        done
    }
}

/// The driver-side registers of one queue, as the transports keep them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueConfig {
    pub fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// Is `[addr, addr + len)` inside one RAM region?
fn in_ram(mem: &GuestMemory, addr: GuestAddress, len: u64) -> bool {
    mem.in_one_region(addr, len)
}

/// One active queue.
pub struct Virtqueue {
    queue: Queue,
    mem: GuestMemory,
    size: u16,
}

impl Virtqueue {
    /// A queue from the driver's registers, checked: size a power of two
    /// no larger than the maximum, rings aligned and inside RAM.
    pub fn new(cfg: &QueueConfig, event_idx: bool, mem: GuestMemory) -> Result<Self, QueueError> {
        let size = cfg.size;
        if size == 0 || !size.is_power_of_two() || size > cfg.max_size {
            return Err(QueueError::Size(size));
        }
        let n = u64::from(size);
        let rings = [
            ("descriptor table", cfg.desc, 16, DESCRIPTOR_SIZE * n),
            ("available ring", cfg.driver, 2, 6 + 2 * n),
            ("used ring", cfg.device, 4, 6 + 8 * n),
        ];
        for (what, addr, align, len) in rings {
            if addr % align != 0 || !in_ram(&mem, GuestAddress(addr), len) {
                return Err(QueueError::Ring { what, addr });
            }
        }
        let mut queue = Queue::new(cfg.max_size).map_err(|_| QueueError::Size(cfg.max_size))?;
        queue
            .try_set_size(size)
            .map_err(|_| QueueError::Size(size))?;
        let ring_err = |what, addr| QueueError::Ring { what, addr };
        queue
            .try_set_desc_table_address(GuestAddress(cfg.desc))
            .map_err(|_| ring_err("descriptor table", cfg.desc))?;
        queue
            .try_set_avail_ring_address(GuestAddress(cfg.driver))
            .map_err(|_| ring_err("available ring", cfg.driver))?;
        queue
            .try_set_used_ring_address(GuestAddress(cfg.device))
            .map_err(|_| ring_err("used ring", cfg.device))?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        Ok(Virtqueue { queue, mem, size })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The next available chain, checked; `None` when the driver has not
    /// made another one available.
    pub fn pop(&mut self) -> Result<Option<Chain>, QueueError> {
        let mem = &self.mem;
        let avail = self
            .queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|_| QueueError::RingMemory(self.queue.avail_ring()))?;
        let next = Wrapping(self.queue.next_avail());
        let ahead = (avail - next).0;
        if ahead == 0 {
            return Ok(None);
        }
        if ahead > self.size {
            return Err(QueueError::AvailIndex(ahead));
        }
        let avail_ring = self.queue.avail_ring();
        let head = {
            let mut it = self
                .queue
                .iter(mem)
                .map_err(|_| QueueError::RingMemory(avail_ring))?;
            match it.next() {
                Some(c) => c.head_index(),
                None => return Err(QueueError::RingMemory(avail_ring)),
            }
        };
        let chain = walk_chain(mem, GuestAddress(self.queue.desc_table()), self.size, head)?;
        Ok(Some(chain))
    }

    /// Serve every chain the driver made available, as queue `index`:
    /// `serve` handles one and returns the bytes it wrote into it, and the
    /// chain goes back to the used ring. Notifications are re-enabled when
    /// the ring runs dry, and chains that arrived meanwhile served too.
    /// The signal for the queue when the driver wants one; a queue fault
    /// (a bad chain or ring) stops it.
    pub fn serve_all(
        &mut self,
        index: usize,
        mut serve: impl FnMut(&Chain) -> u32,
    ) -> Result<Signals, DeviceFault> {
        let fault = |error| DeviceFault::Queue {
            queue: index,
            error,
        };
        let mut used = false;
        loop {
            let chain = match self.pop().map_err(fault)? {
                Some(c) => c,
                None if self.enable_notification() => continue,
                None => break,
            };
            let n = serve(&chain);
            self.add_used(chain.head, n).map_err(fault)?;
            used = true;
        }
        Ok(if used && self.needs_interrupt() {
            Signals::queue(index)
        } else {
            Signals::default()
        })
    }

    /// Put the last popped chain back (the device could not use it yet).
    pub fn undo_pop(&mut self) {
        self.queue.go_to_previous_position();
    }

    /// Return `head` to the driver with `len` bytes written.
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        self.queue
            .add_used(&self.mem, head, len)
            .map_err(|_| QueueError::RingMemory(self.queue.used_ring()))
    }

    /// After adding used buffers: does the driver want an interrupt
    /// (event index or the NO_INTERRUPT flag)?
    pub fn needs_interrupt(&mut self) -> bool {
        // Without VIRTIO_F_EVENT_IDX the driver turns interrupts off with
        // VIRTQ_AVAIL_F_NO_INTERRUPT in the available ring's flags (virtio
        // 1.2, 2.7.10); `virtio-queue` does not look at it.
        if !self.queue.event_idx_enabled() {
            let flags: u16 = self
                .mem
                .read_obj(GuestAddress(self.queue.avail_ring()))
                .unwrap_or(0);
            if u16::from_le(flags) & AVAIL_F_NO_INTERRUPT != 0 {
                return false;
            }
        }
        self.queue.needs_notification(&self.mem).unwrap_or(true)
    }

    /// Ask for notifications again; true when buffers arrived meanwhile
    /// (process them before waiting).
    pub fn enable_notification(&mut self) -> bool {
        self.queue.enable_notification(&self.mem).unwrap_or(false)
    }

    /// Tell the driver it need not notify (the device is busy with the queue).
    pub fn disable_notification(&mut self) {
        let _ = self.queue.disable_notification(&self.mem);
    }

    /// Position in the available ring (for state).
    pub fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    pub fn next_used(&self) -> u16 {
        self.queue.next_used()
    }
}

/// Walk the chain that starts at `head` in the table at `table` of `size`
/// entries; see the module doc for what is checked.
pub fn walk_chain(
    mem: &GuestMemory,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Result<Chain, QueueError> {
    let mut chain = Chain {
        head,
        ..Chain::default()
    };
    let mut table = table;
    let mut table_size = size;
    let mut index = head;
    let mut in_indirect = false;
    // Descriptors visited in the current table: more than its size is a loop.
    let mut visited: u32 = 0;
    let mut total: u64 = 0;
    loop {
        if index >= table_size {
            return Err(QueueError::Index {
                index,
                size: table_size,
            });
        }
        visited += 1;
        if visited > u32::from(table_size) {
            return Err(QueueError::Loop);
        }
        let at = GuestAddress(table.0 + u64::from(index) * DESCRIPTOR_SIZE);
        let desc: Descriptor = mem.read_obj(at).map_err(|_| QueueError::RingMemory(at.0))?;
        let flags = desc.flags();
        if flags & F_INDIRECT != 0 {
            if in_indirect {
                return Err(QueueError::Indirect("nested indirect table"));
            }
            if flags & F_NEXT != 0 {
                return Err(QueueError::Indirect("indirect descriptor with NEXT"));
            }
            let len = desc.len();
            if len == 0 || u64::from(len) % DESCRIPTOR_SIZE != 0 {
                return Err(QueueError::Indirect("table length not a multiple of 16"));
            }
            let entries = u64::from(len) / DESCRIPTOR_SIZE;
            if entries > u64::from(u16::MAX) {
                return Err(QueueError::Indirect("table longer than 65535 entries"));
            }
            if !in_ram(mem, desc.addr(), u64::from(len)) {
                return Err(QueueError::Indirect("table outside guest memory"));
            }
            table = desc.addr();
            table_size = entries as u16;
            index = 0;
            in_indirect = true;
            visited = 0;
            continue;
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if !in_ram(mem, seg.addr, u64::from(seg.len)) {
            return Err(QueueError::Buffer {
                addr: seg.addr.0,
                len: seg.len,
            });
        }
        total += u64::from(seg.len);
        if total > u64::from(u32::MAX) {
            return Err(QueueError::TooLong);
        }
        if flags & F_WRITE != 0 {
            chain.writable.push(seg);
        } else {
            if !chain.writable.is_empty() {
                return Err(QueueError::Direction);
            }
            chain.readable.push(seg);
        }
        if flags & F_NEXT == 0 {
            return Ok(chain);
        }
        index = desc.next();
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A driver's side of a split queue, for device tests and fuzzing.

    use super::*;

    /// Lays out one queue in guest memory at `base`: descriptor table,
    /// available ring, used ring; data buffers from `base + 0x10000`.
    pub struct DriverQueue {
        pub size: u16,
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
        next_desc: u16,
        avail_idx: u16,
        used_seen: u16,
        next_buf: u64,
    }

    impl DriverQueue {
        pub fn new(base: u64, size: u16) -> Self {
            let desc = base;
            let avail = desc + 16 * u64::from(size);
            let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
            DriverQueue {
                size,
                desc,
                avail,
                used,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
                next_buf: base + 0x10000,
            }
        }

        pub fn config(&self) -> QueueConfig {
            QueueConfig {
                max_size: self.size,
                size: self.size,
                ready: true,
                desc: self.desc,
                driver: self.avail,
                device: self.used,
            }
        }

        /// Allocate a buffer of `len` bytes holding `data`.
        pub fn buffer(&mut self, mem: &GuestMemory, data: &[u8], len: u32) -> u64 {
            let at = self.next_buf;
            self.next_buf = (at + u64::from(len) + 15) & !15;
            mem.write_slice(data, GuestAddress(at)).unwrap();
            at
        }

        pub fn write_desc(
            &self,
            mem: &GuestMemory,
            index: u16,
            addr: u64,
            len: u32,
            flags: u16,
            next: u16,
        ) {
            let at = self.desc + 16 * u64::from(index);
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&b, GuestAddress(at)).unwrap();
        }

        /// Add a chain of (data, len, writable) buffers; returns its head.
        pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(&[u8], u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, (data, len, w)) in bufs.iter().enumerate() {
                let addr = self.buffer(mem, data, *len);
                let index = (head + i as u16) % self.size;
                let last = i + 1 == bufs.len();
                let flags = if *w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                self.write_desc(mem, index, addr, *len, flags, (index + 1) % self.size);
            }
            self.next_desc = (head + bufs.len() as u16) % self.size;
            self.publish(mem, head);
            head
        }

        /// Put `head` in the available ring and bump the index.
        pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
            let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        /// Set the available index directly (hostile drivers).
        pub fn set_avail_idx(&mut self, mem: &GuestMemory, idx: u16) {
            self.avail_idx = idx;
            mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
        }

        /// Used entries returned since the last call: (head, len).
        pub fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u16, u32)> {
            let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            let mut out = Vec::new();
            while self.used_seen != idx {
                let slot = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
                let id: u32 = mem.read_obj(GuestAddress(slot)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(slot + 4)).unwrap();
                out.push((id as u16, len));
                self.used_seen = self.used_seen.wrapping_add(1);
            }
            out
        }
    }

    pub fn memory() -> GuestMemory {
        GuestMemory::from(
            crate::guest_memory::GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn queue(mem: &GuestMemory, q: &DriverQueue) -> Virtqueue {
        Virtqueue::new(&q.config(), false, mem.clone()).unwrap()
    }

    #[test]
    fn chains_split_into_readable_and_writable() {
        let mem = memory();
        let mut d = DriverQueue::new(0x1000, 8);
        let mut v = queue(&mem, &d);
        assert_eq!(v.pop().unwrap(), None);
        d.add_chain(&mem, &[(b"hello", 5, false), (b"", 16, true)]);
        let c = v.pop().unwrap().unwrap();
        assert_eq!(c.readable_len(), 5);
        assert_eq!(c.writable_len(), 16);
        assert_eq!(c.read_bytes(&mem, 1, 100), b"ello");
        assert_eq!(c.write_bytes(&mem, 0, &[7; 20]), 16);
        v.add_used(c.head, 16).unwrap();
        assert_eq!(d.take_used(&mem), vec![(0, 16)]);
        assert_eq!(v.pop().unwrap(), None);
    }

    /// Without the event index, VIRTQ_AVAIL_F_NO_INTERRUPT in the
    /// available ring's flags silences the queue; clearing it restores
    /// interrupts.
    #[test]
    fn no_interrupt_flag_is_honoured_without_event_index() {
        let mem = memory();
        let mut d = DriverQueue::new(0x1000, 8);
        let mut v = queue(&mem, &d);
        d.add_chain(&mem, &[(b"", 16, true)]);
        let c = v.pop().unwrap().unwrap();
        v.add_used(c.head, 0).unwrap();
        assert!(v.needs_interrupt());
        mem.write_obj(AVAIL_F_NO_INTERRUPT, GuestAddress(d.config().driver))
            .unwrap();
        d.add_chain(&mem, &[(b"", 16, true)]);
        let c = v.pop().unwrap().unwrap();
        v.add_used(c.head, 0).unwrap();
        assert!(!v.needs_interrupt());
        mem.write_obj(0u16, GuestAddress(d.config().driver))
            .unwrap();
        assert!(v.needs_interrupt());
    }

    #[test]
    fn a_loop_is_found() {
        let mem = memory();
        let mut d = DriverQueue::new(0x1000, 4);
        let mut v = queue(&mem, &d);
        d.write_desc(&mem, 0, 0x20000, 4, F_NEXT, 1);
        d.write_desc(&mem, 1, 0x20000, 4, F_NEXT, 0);
        d.publish(&mem, 0);
        assert_eq!(v.pop(), Err(QueueError::Loop));
    }

    #[test]
    fn bad_indices_addresses_and_directions_are_errors() {
        let mem = memory();
        let mut d = DriverQueue::new(0x1000, 4);
        let mut v = queue(&mem, &d);
        d.write_desc(&mem, 0, 0x20000, 4, F_NEXT, 9);
        d.publish(&mem, 0);
        assert!(matches!(v.pop(), Err(QueueError::Index { index: 9, .. })));
        d.write_desc(&mem, 1, 0xff000, 0x2000, 0, 0);
        d.publish(&mem, 1);
        assert!(matches!(v.pop(), Err(QueueError::Buffer { .. })));
        d.write_desc(&mem, 2, 0x20000, 4, F_WRITE | F_NEXT, 3);
        d.write_desc(&mem, 3, 0x20000, 4, 0, 0);
        d.publish(&mem, 2);
        assert_eq!(v.pop(), Err(QueueError::Direction));
        // A head outside the table.
        d.publish(&mem, 77);
        assert!(matches!(v.pop(), Err(QueueError::Index { index: 77, .. })));
    }

    #[test]
    fn indirect_tables_are_followed_and_checked() {
        let mem = memory();
        let mut d = DriverQueue::new(0x1000, 4);
        let mut v = queue(&mem, &d);
        // An indirect table of two descriptors at 0x30000.
        let t = 0x30000u64;
        let put = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&b, GuestAddress(t + 16 * i)).unwrap();
        };
        put(0, 0x40000, 8, F_NEXT, 1);
        put(1, 0x41000, 32, F_WRITE, 0);
        d.write_desc(&mem, 0, t, 32, F_INDIRECT, 0);
        d.publish(&mem, 0);
        let c = v.pop().unwrap().unwrap();
        assert_eq!((c.readable_len(), c.writable_len()), (8, 32));
        // Nested indirect.
        put(1, t, 16, F_INDIRECT, 0);
        d.publish(&mem, 0);
        assert!(matches!(v.pop(), Err(QueueError::Indirect(_))));
        // Bad length.
        d.write_desc(&mem, 1, t, 17, F_INDIRECT, 0);
        d.publish(&mem, 1);
        assert!(matches!(v.pop(), Err(QueueError::Indirect(_))));
        // A loop inside an indirect table.
        put(0, 0x40000, 8, F_NEXT, 1);
        put(1, 0x40000, 8, F_NEXT, 0);
        d.write_desc(&mem, 2, t, 32, F_INDIRECT, 0);
        d.publish(&mem, 2);
        assert_eq!(v.pop(), Err(QueueError::Loop));
    }

    #[test]
    fn an_available_index_too_far_ahead_is_an_error() {
        let mem = memory();
        let mut d = DriverQueue::new(0x1000, 4);
        let mut v = queue(&mem, &d);
        d.set_avail_idx(&mem, 5);
        assert_eq!(v.pop(), Err(QueueError::AvailIndex(5)));
    }

    #[test]
    fn queue_registers_are_checked() {
        let mem = memory();
        let d = DriverQueue::new(0x1000, 8);
        let mut c = d.config();
        c.size = 6;
        assert!(matches!(
            Virtqueue::new(&c, false, mem.clone()),
            Err(QueueError::Size(6))
        ));
        let mut c = d.config();
        c.desc = 0xff_fff0;
        assert!(matches!(
            Virtqueue::new(&c, false, mem.clone()),
            Err(QueueError::Ring { .. })
        ));
        let mut c = d.config();
        c.device = 0x1002;
        assert!(Virtqueue::new(&c, false, mem).is_err());
    }
}
