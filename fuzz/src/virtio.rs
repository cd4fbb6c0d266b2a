//! [`virtio_devices`]: one virtio device (blk, read-only blk, net, console,
//! rng) on one transport (virtio-pci or virtio-mmio), driven by a sequence
//! of operations decoded from the bytes: register and configuration-space
//! reads and writes, a bring-up that negotiates fuzzed features and places
//! the queues, descriptors and available-ring entries written into guest
//! memory, notifications, raw memory writes, host input (received frames,
//! console input) and resets.
//!
//! The decoder is a plain byte reader (one operation byte, then its
//! fields, zeros once the input runs out) so that `seeds.py` can write
//! seeds that reach deep into the devices. Whatever the bytes, the device
//! must not panic, read or write outside guest memory, or loop without
//! end: every operation is bounded, and so must be the device's reaction.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use devices::interrupt::NullMsi;
use devices::pci::PciDevice;
use devices::virtio::block::{MemDisk, VirtioBlock};
use devices::virtio::console::VirtioConsole;
use devices::virtio::inbox::{Inbox, NoNotify};
use devices::virtio::mmio::{self, VirtioMmio};
use devices::virtio::net::{NetBackend, NetHeader, RxFrame, VirtioNet};
use devices::virtio::pci::{self as vpci, VirtioPci};
use devices::virtio::rng::{EntropySource, VirtioRng};
use devices::virtio::{GuestMemory, VirtioDevice};
use devices::{BusDevice, NullIrq};
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM of the rig.
pub const MEM_SIZE: u64 = 256 * 1024;
/// Queue `q`'s rings: descriptors, then available, then used, 16 KiB apart.
pub const RINGS: u64 = 0x1_0000;
pub const RING_STRIDE: u64 = 0x4000;
/// Most operations per input.
const MAX_OPS: usize = 4096;

/// Reads fields off the input; zeros past its end.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
}

/// A NIC backend the fuzzer feeds received frames into.
#[derive(Clone, Default)]
struct FuzzNet(Arc<Mutex<VecDeque<RxFrame>>>);

impl NetBackend for FuzzNet {
    fn send(&mut self, _header: &NetHeader, _frame: &[u8]) {}
    fn recv(&mut self) -> Option<RxFrame> {
        self.0.lock().unwrap().pop_front()
    }
    fn unrecv(&mut self, frame: RxFrame) {
        self.0.lock().unwrap().push_front(frame);
    }
    fn offloads(&self) -> bool {
        true
    }
}

enum Transport {
    Pci(VirtioPci),
    Mmio(VirtioMmio),
}

impl Transport {
    /// A register access in the transport's own space (BAR 0 or the
    /// MMIO block).
    fn write(&mut self, offset: u64, data: &[u8]) {
        match self {
            Transport::Pci(d) => d.write_bar(vpci::BAR_INDEX, offset % vpci::BAR_SIZE, data),
            Transport::Mmio(d) => d.write(offset % mmio::MMIO_LEN, data),
        }
    }
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self {
            Transport::Pci(d) => d.read_bar(vpci::BAR_INDEX, offset % vpci::BAR_SIZE, data),
            Transport::Mmio(d) => d.read(offset % mmio::MMIO_LEN, data),
        }
    }
    fn write32(&mut self, offset: u64, v: u32) {
        self.write(offset, &v.to_le_bytes());
    }
    fn write16(&mut self, offset: u64, v: u16) {
        self.write(offset, &v.to_le_bytes());
    }
    fn poll(&mut self) {
        match self {
            Transport::Pci(d) => d.poll(),
            Transport::Mmio(d) => d.poll(),
        }
    }

    /// A driver's bring-up with fuzzed features, queue size and queue mask
    /// (through the registers, as a guest would do it).
    fn bring_up(&mut self, features: u64, size: u16, mask: u8, msix: bool) {
        use devices::virtio::status::*;
        match self {
            Transport::Pci(d) => {
                if msix {
                    // MSI-X enable in the capability's message control.
                    let mut cap = [0u8; 1];
                    d.read_config(0x34, &mut cap);
                    let mut p = usize::from(cap[0]);
                    for _ in 0..16 {
                        if p == 0 {
                            break;
                        }
                        let mut h = [0u8; 2];
                        d.read_config(p, &mut h);
                        if h[0] == devices::pci::config::cap_id::MSIX {
                            d.write_config(p + 2, &0x8000u16.to_le_bytes());
                            break;
                        }
                        p = usize::from(h[1]);
                    }
                }
            }
            Transport::Mmio(_) => {}
        }
        let (status, fsel, feat, qsel, qsize, qready) = match self {
            Transport::Pci(_) => (
                vpci::common::DEVICE_STATUS,
                vpci::common::DRIVER_FEATURE_SELECT,
                vpci::common::DRIVER_FEATURE,
                vpci::common::QUEUE_SELECT,
                vpci::common::QUEUE_SIZE,
                vpci::common::QUEUE_ENABLE,
            ),
            Transport::Mmio(_) => (
                mmio::reg::STATUS,
                mmio::reg::DRIVER_FEATURES_SEL,
                mmio::reg::DRIVER_FEATURES,
                mmio::reg::QUEUE_SEL,
                mmio::reg::QUEUE_NUM,
                mmio::reg::QUEUE_READY,
            ),
        };
        let pci = matches!(self, Transport::Pci(_));
        let status_write = |t: &mut Transport, v: u8| {
            if pci {
                t.write(status, &[v]);
            } else {
                t.write32(status, u32::from(v));
            }
        };
        status_write(self, 0);
        status_write(self, ACKNOWLEDGE | DRIVER);
        self.write32(fsel, 0);
        self.write32(feat, features as u32);
        self.write32(fsel, 1);
        self.write32(feat, (features >> 32) as u32);
        status_write(self, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        for q in 0..4u16 {
            if mask & (1 << q) == 0 {
                continue;
            }
            let desc = RINGS + u64::from(q) * RING_STRIDE;
            let rings = [desc, desc + 0x1000, desc + 0x2000];
            if pci {
                self.write16(qsel, q);
                self.write16(qsize, size);
                self.write16(vpci::common::QUEUE_MSIX_VECTOR, q);
                for (i, addr) in rings.iter().enumerate() {
                    let off = vpci::common::QUEUE_DESC + 8 * i as u64;
                    self.write32(off, *addr as u32);
                    self.write32(off + 4, (*addr >> 32) as u32);
                }
                self.write16(qready, 1);
            } else {
                self.write32(qsel, u32::from(q));
                self.write32(qsize, u32::from(size));
                let lows = [
                    mmio::reg::QUEUE_DESC_LOW,
                    mmio::reg::QUEUE_DRIVER_LOW,
                    mmio::reg::QUEUE_DEVICE_LOW,
                ];
                for (low, addr) in lows.iter().zip(rings) {
                    self.write32(*low, addr as u32);
                    self.write32(low + 4, (addr >> 32) as u32);
                }
                self.write32(qready, 1);
            }
        }
        status_write(self, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    fn notify(&mut self, q: u16) {
        match self {
            Transport::Pci(_) => self.write16(
                vpci::NOTIFY_OFFSET + u64::from(q) * u64::from(vpci::NOTIFY_MULTIPLIER),
                q,
            ),
            Transport::Mmio(_) => self.write32(mmio::reg::QUEUE_NOTIFY, u32::from(q)),
        }
    }
}

/// Run a virtio session decoded from the bytes.
pub fn virtio_devices(data: &[u8]) {
    let mut r = Reader { data, pos: 0 };
    let mem = GuestMemory::from(
        devices::guest_memory::GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("RAM"),
    );
    let net = FuzzNet::default();
    let console_in = Inbox::new(64, Arc::new(NoNotify));
    let kind = r.u8() % 5;
    let device: Box<dyn VirtioDevice> = match kind {
        0 | 1 => {
            let sectors = usize::from(r.u8()) + 1;
            Box::new(VirtioBlock::new(
                Box::new(MemDisk::new(sectors * 512)),
                kind == 1,
                "fuzz",
            ))
        }
        2 => Box::new(VirtioNet::new([2, 0, 0, 0, 0, 1], Box::new(net.clone()))),
        3 => Box::new(VirtioConsole::new(
            Box::new(std::io::sink()),
            Box::new(console_in.clone()),
        )),
        _ => Box::new(VirtioRng::new(EntropySource::Seeded(1))),
    };
    let mut t = if r.u8() & 1 == 0 {
        Transport::Pci(VirtioPci::new(
            "fuzz",
            device,
            mem.clone(),
            Box::new(NullIrq),
            Arc::new(NullMsi),
        ))
    } else {
        Transport::Mmio(VirtioMmio::new(
            "fuzz",
            device,
            mem.clone(),
            Box::new(NullIrq),
        ))
    };
    for _ in 0..MAX_OPS {
        if r.done() {
            break;
        }
        match r.u8() % 11 {
            0 => {
                let off = u64::from(r.u16());
                let len = [1, 2, 4, 8][usize::from(r.u8() % 4)];
                let v = r.u64().to_le_bytes();
                t.write(off, &v[..len]);
            }
            1 => {
                let off = u64::from(r.u16());
                let len = [1, 2, 4, 8][usize::from(r.u8() % 4)];
                let mut b = [0u8; 8];
                t.read(off, &mut b[..len]);
            }
            2 => {
                let off = usize::from(r.u16() % 4096);
                let len = [1, 2, 4][usize::from(r.u8() % 3)];
                let v = r.u32().to_le_bytes();
                match &mut t {
                    Transport::Pci(d) => d.write_config(off, &v[..len]),
                    Transport::Mmio(d) => d.write(mmio::reg::CONFIG + off as u64, &v[..len]),
                }
            }
            3 => {
                let off = usize::from(r.u16() % 4096);
                let len = [1, 2, 4][usize::from(r.u8() % 3)];
                let mut b = [0u8; 4];
                match &mut t {
                    Transport::Pci(d) => d.read_config(off, &mut b[..len]),
                    Transport::Mmio(d) => d.read(mmio::reg::CONFIG + off as u64, &mut b[..len]),
                }
            }
            4 => {
                let features = r.u64();
                let size = r.u16();
                let mask = r.u8();
                let msix = r.u8() & 1 != 0;
                t.bring_up(features, size, mask, msix);
            }
            5 => {
                // A descriptor: queue, index, address (near RAM mostly),
                // length, flags, next.
                let q = u64::from(r.u8() % 4);
                let index = u64::from(r.u8());
                let raw = r.u8() & 0x80 != 0;
                let addr = if raw {
                    r.u64()
                } else {
                    u64::from(r.u32()) % (MEM_SIZE + 0x1000)
                };
                let len = r.u32();
                let flags = r.u16();
                let next = r.u16();
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&len.to_le_bytes());
                d[12..14].copy_from_slice(&flags.to_le_bytes());
                d[14..16].copy_from_slice(&next.to_le_bytes());
                let at = RINGS + q * RING_STRIDE + (index * 16) % 0x1000;
                let _ = mem.write_slice(&d, GuestAddress(at));
            }
            6 => {
                // Available ring: entry `slot` = head, then the index.
                let q = u64::from(r.u8() % 4);
                let slot = u64::from(r.u8());
                let head = r.u16();
                let idx = r.u16();
                let avail = RINGS + q * RING_STRIDE + 0x1000;
                let _ = mem.write_obj(head, GuestAddress(avail + 4 + 2 * slot));
                let _ = mem.write_obj(idx, GuestAddress(avail + 2));
            }
            7 => t.notify(u16::from(r.u8() % 5)),
            8 => {
                let n = usize::from(r.u16() % 2048);
                let bytes = r.bytes(n);
                match kind {
                    2 => {
                        let mut q = net.0.lock().unwrap();
                        if q.len() < 64 {
                            let mut header = [0u8; 12];
                            header.copy_from_slice(&bytes.get(..12).unwrap_or(&[0; 12])[..12]);
                            q.push_back(RxFrame {
                                header,
                                data: bytes,
                            });
                        }
                    }
                    3 => {
                        console_in.push(bytes);
                    }
                    _ => {}
                }
                t.poll();
            }
            9 => {
                let addr = u64::from(r.u32()) % MEM_SIZE;
                let n = usize::from(r.u8());
                let bytes = r.bytes(n);
                let _ = mem.write_slice(&bytes, GuestAddress(addr));
            }
            _ => match &mut t {
                Transport::Pci(_) => t.write(vpci::common::DEVICE_STATUS, &[0]),
                Transport::Mmio(_) => t.write32(mmio::reg::STATUS, 0),
            },
        }
    }
}
