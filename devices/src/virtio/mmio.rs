//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2): a 4 KiB
//! register block per device and one interrupt line, level-triggered,
//! asserted while the interrupt status register is non-zero.
//!
//! Registers below 0x100 are 32-bit and must be accessed as aligned
//! dwords; other accesses read zero and are dropped (logged once). The
//! device configuration from 0x100 on takes any size.

use super::core::{VirtioCore, VirtioCoreState};
use super::{status, GuestMemory, Signals, VirtioDevice};
use crate::bus::BusDevice;
use crate::irq::IrqLine;
use crate::ratelimit::LogOnce;

/// Bytes of register space per device.
pub const MMIO_LEN: u64 = 0x1000;
/// "virt", little-endian.
pub const MAGIC: u32 = 0x7472_6976;
pub const VERSION: u32 = 2;
/// The vendor ID duet's transports report ("DUET").
pub const VENDOR: u32 = u32::from_le_bytes(*b"DUET");

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Interrupt status bits.
pub const INT_USED_BUFFER: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// The transport's state, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioMmioState {
    pub core: VirtioCoreState,
    pub interrupt_status: u32,
}

/// A virtio device on the MMIO transport.
pub struct VirtioMmio {
    core: VirtioCore,
    interrupt_status: u32,
    line: Box<dyn IrqLine>,
    level: bool,
    malformed: LogOnce,
    /// Line assertions (a statistic, not state).
    interrupts: u64,
}

fn set_low(v: &mut u64, low: u32) {
    *v = *v & !0xffff_ffff | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = *v & 0xffff_ffff | u64::from(high) << 32;
}

impl VirtioMmio {
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        line: Box<dyn IrqLine>,
    ) -> Self {
        VirtioMmio {
            core: VirtioCore::new(name, device, mem),
            interrupt_status: 0,
            line,
            level: false,
            malformed: LogOnce::new(),
            interrupts: 0,
        }
    }

    /// Interrupts raised so far (line assertions).
    pub fn interrupts(&self) -> u64 {
        self.interrupts
    }

    pub fn core(&self) -> &VirtioCore {
        &self.core
    }

    /// Raise what the device asked for.
    fn signal(&mut self, s: Signals) {
        if s.queues != 0 {
            self.interrupt_status |= INT_USED_BUFFER;
        }
        if s.config {
            self.interrupt_status |= INT_CONFIG;
        }
        self.update_line();
    }

    fn update_line(&mut self) {
        let level = self.interrupt_status != 0;
        if level != self.level {
            self.level = level;
            self.interrupts += u64::from(level);
            self.line.set_level(level);
        }
    }

    /// Host input may be pending for the device.
    pub fn poll(&mut self) {
        let s = self.core.poll();
        self.signal(s);
    }

    fn read_register(&self, offset: u64) -> u32 {
        let c = &self.core;
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => c.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => c.device_features_word(),
            reg::QUEUE_NUM_MAX => c.selected().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => c.selected().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => u32::from(c.status()),
            reg::CONFIG_GENERATION => u32::from(c.config_generation()),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        let c = &mut self.core;
        match offset {
            reg::DEVICE_FEATURES_SEL => c.device_feature_select = v,
            reg::DRIVER_FEATURES => c.write_driver_features(v),
            reg::DRIVER_FEATURES_SEL => c.driver_feature_select = v,
            reg::QUEUE_SEL => c.queue_select = v as u16,
            reg::QUEUE_NUM => {
                if let Some(q) = c.selected_mut() {
                    q.size = v as u16;
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = c.selected_mut() {
                    q.ready = v & 1 != 0;
                }
            }
            reg::QUEUE_NOTIFY => {
                let s = c.notify(usize::from(v as u16));
                self.signal(s);
            }
            reg::INTERRUPT_ACK => {
                self.interrupt_status &= !v;
                self.update_line();
            }
            reg::STATUS => {
                let s = c.write_status(v as u8);
                if c.status() == 0 {
                    self.interrupt_status = 0;
                }
                self.signal(s);
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if let Some(q) = c.selected_mut() {
                    match offset {
                        reg::QUEUE_DESC_LOW => set_low(&mut q.desc, v),
                        reg::QUEUE_DESC_HIGH => set_high(&mut q.desc, v),
                        reg::QUEUE_DRIVER_LOW => set_low(&mut q.driver, v),
                        reg::QUEUE_DRIVER_HIGH => set_high(&mut q.driver, v),
                        reg::QUEUE_DEVICE_LOW => set_low(&mut q.device, v),
                        _ => set_high(&mut q.device, v),
                    }
                }
            }
            _ => {}
        }
    }

    fn aligned_dword(&self, offset: u64, len: usize) -> bool {
        let ok = len == 4 && offset % 4 == 0;
        if !ok && self.malformed.first() {
            log::warn!(
                "{}: {len}-byte access at register {offset:#x} (registers are aligned dwords): ignored (logged once)",
                self.core.name()
            );
        }
        ok
    }

    pub fn state(&self) -> VirtioMmioState {
        VirtioMmioState {
            core: self.core.state(),
            interrupt_status: self.interrupt_status,
        }
    }

    /// The status register's NEEDS_RESET bit (tests).
    pub fn needs_reset(&self) -> bool {
        self.core.status() & status::NEEDS_RESET != 0
    }
}

impl BusDevice for VirtioMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.core.read_config((offset - reg::CONFIG) as usize, data);
            return;
        }
        if !self.aligned_dword(offset, data.len()) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.core
                .write_config((offset - reg::CONFIG) as usize, data);
            return;
        }
        if !self.aligned_dword(offset, data.len()) {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::feature;
    use crate::virtio::queue::testing::{memory, DriverQueue};
    use crate::virtio::rng::{EntropySource, VirtioRng};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct Line(Arc<AtomicBool>);
    impl IrqLine for Line {
        fn set_level(&self, l: bool) {
            self.0.store(l, Ordering::SeqCst);
        }
    }

    fn w(d: &mut VirtioMmio, off: u64, v: u32) {
        d.write(off, &v.to_le_bytes());
    }
    fn r(d: &mut VirtioMmio, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn a_driver_brings_up_an_rng_and_gets_bytes() {
        let mem = memory();
        let level = Arc::new(AtomicBool::new(false));
        let rng = VirtioRng::new(EntropySource::Seeded(7));
        let mut d = VirtioMmio::new(
            "rng",
            Box::new(rng),
            mem.clone(),
            Box::new(Line(level.clone())),
        );
        assert_eq!(r(&mut d, reg::MAGIC), MAGIC);
        assert_eq!(r(&mut d, reg::VERSION), 2);
        assert_eq!(r(&mut d, reg::DEVICE_ID), 4);
        w(&mut d, reg::STATUS, 3);
        w(&mut d, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut d, reg::DEVICE_FEATURES), 1);
        w(&mut d, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut d, reg::DRIVER_FEATURES, 1);
        w(&mut d, reg::STATUS, 3 | 8);
        assert_eq!(r(&mut d, reg::STATUS), 11);
        let mut q = DriverQueue::new(0x1000, 8);
        w(&mut d, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut d, reg::QUEUE_NUM_MAX), 256);
        w(&mut d, reg::QUEUE_NUM, 8);
        w(&mut d, reg::QUEUE_DESC_LOW, q.desc as u32);
        w(&mut d, reg::QUEUE_DRIVER_LOW, q.avail as u32);
        w(&mut d, reg::QUEUE_DEVICE_LOW, q.used as u32);
        w(&mut d, reg::QUEUE_READY, 1);
        w(&mut d, reg::STATUS, 15);
        q.add_chain(&mem, &[(&[], 64, true)]);
        w(&mut d, reg::QUEUE_NOTIFY, 0);
        assert_eq!(q.take_used(&mem), vec![(0, 64)]);
        assert!(level.load(Ordering::SeqCst));
        assert_eq!(r(&mut d, reg::INTERRUPT_STATUS), INT_USED_BUFFER);
        w(&mut d, reg::INTERRUPT_ACK, INT_USED_BUFFER);
        assert!(!level.load(Ordering::SeqCst));
        // A hostile chain: NEEDS_RESET and a configuration interrupt.
        q.write_desc(&mem, 1, 0x20000, 4, 1, 1);
        q.publish(&mem, 1);
        w(&mut d, reg::QUEUE_NOTIFY, 0);
        assert!(d.needs_reset());
        assert_eq!(r(&mut d, reg::INTERRUPT_STATUS), INT_CONFIG);
        // Reset clears everything and lowers the line.
        w(&mut d, reg::STATUS, 0);
        assert_eq!(r(&mut d, reg::STATUS), 0);
        assert!(!level.load(Ordering::SeqCst));
        let _ = feature::COMMON;
    }

    #[test]
    fn misaligned_register_accesses_are_dropped() {
        let mem = memory();
        let rng = VirtioRng::new(EntropySource::Seeded(1));
        let mut d = VirtioMmio::new("rng", Box::new(rng), mem, Box::new(crate::NullIrq));
        let mut b = [0u8; 2];
        d.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        d.write(reg::STATUS, &[1, 0]);
        assert_eq!(r(&mut d, reg::STATUS), 0);
        // Configuration space takes bytes (rng has none: zero).
        let mut c = [0xffu8; 1];
        d.read(reg::CONFIG, &mut c);
        assert_eq!(c, [0]);
    }
}
