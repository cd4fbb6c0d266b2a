//! A PCI test device for the built-in guests: it raises INTx, MSI or an
//! MSI-X vector when told to through its registers, and counts what it
//! sent. Vendor 0x1234 (the ID QEMU's emulated devices use), device 0xd0e7.
//!
//! BARs: 0 — 4 KiB 32-bit memory, the registers; 1 — 32 bytes of I/O, the
//! same registers; 2/3 — 16 KiB 64-bit memory, the MSI-X table (8 vectors)
//! at 0 and its PBA at 0x2000. Capabilities: MSI, then MSI-X. Pin INTA#.
//!
//! Registers (dwords):
//!
//! | offset | name | |
//! |---|---|---|
//! | 0x00 | ID | reads 0x54455544 ("DUET") |
//! | 0x04 | SCRATCH | read/write |
//! | 0x08 | INTX | write 1: assert INTA#, 0: de-assert; reads the level |
//! | 0x0c | MSI | any write: signal the MSI vector |
//! | 0x10 | MSIX | write n: signal MSI-X vector n |
//! | 0x14 | SENT | interrupts sent so far (INTx assertions, MSIs, MSI-X) |
//!
//! INTA# follows the INTX register unless the command register's
//! interrupt-disable bit is set; the status register's interrupt bit
//! follows INTX regardless, as the PCI specification requires.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::config::{command, reg, status, Bar, BarKind, ConfigSpace, ConfigSpaceState, PciId};
use super::msi::MsiCapability;
use super::msix::{Msix, MsixState};
use super::{IntxPin, PciDevice};
use crate::interrupt::{MsiMessage, MsiSink};
use crate::irq::IrqLine;

pub const VENDOR_ID: u16 = 0x1234;
pub const DEVICE_ID: u16 = 0xd0e7;
/// "Other" class (0xff).
pub const CLASS: u32 = 0xff_0000;
pub const ID_VALUE: u32 = u32::from_le_bytes(*b"DUET");
pub const MSIX_VECTORS: usize = 8;
/// Where the MSI-X PBA lives in BAR 2.
pub const PBA_OFFSET: u64 = 0x2000;

/// Register offsets.
pub mod regs {
    pub const ID: u64 = 0x00;
    pub const SCRATCH: u64 = 0x04;
    pub const INTX: u64 = 0x08;
    pub const MSI: u64 = 0x0c;
    pub const MSIX: u64 = 0x10;
    pub const SENT: u64 = 0x14;
}

/// BAR indices and sizes.
pub const REGS_BAR: u8 = 0;
pub const REGS_BAR_LEN: u64 = 0x1000;
pub const IO_BAR: u8 = 1;
pub const IO_BAR_LEN: u64 = 0x20;
pub const MSIX_BAR: u8 = 2;
pub const MSIX_BAR_LEN: u64 = 0x4000;

/// The device's state, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciTestDeviceState {
    pub config: ConfigSpaceState,
    pub msix: MsixState,
    pub scratch: u32,
    pub intx: bool,
    pub sent: u32,
}

pub struct PciTestDevice {
    name: String,
    config: ConfigSpace,
    msi: MsiCapability,
    msix: Msix,
    intx_line: Box<dyn IrqLine>,
    msi_sink: Arc<dyn MsiSink>,
    scratch: u32,
    intx: bool,
    /// The level INTA# is driven to now.
    line_level: bool,
    sent: u32,
}

impl PciTestDevice {
    /// A test device called `name`, its INTA# driving `intx_line`, its
    /// messages going to `msi_sink`.
    pub fn new(name: &str, intx_line: Box<dyn IrqLine>, msi_sink: Arc<dyn MsiSink>) -> Self {
        let mut config = ConfigSpace::new(PciId {
            vendor: VENDOR_ID,
            device: DEVICE_ID,
            revision: 1,
            class: CLASS,
            subsystem_vendor: VENDOR_ID,
            subsystem: 1,
        });
        // Fixed layout: these cannot fail.
        let bars = [
            (
                REGS_BAR,
                BarKind::Memory32 {
                    prefetchable: false,
                },
                REGS_BAR_LEN,
            ),
            (IO_BAR, BarKind::Io, IO_BAR_LEN),
            (
                MSIX_BAR,
                BarKind::Memory64 {
                    prefetchable: false,
                },
                MSIX_BAR_LEN,
            ),
        ];
        for (index, kind, size) in bars {
            config
                .add_bar(usize::from(index), Bar { kind, size })
                .expect("test device BAR layout is valid");
        }
        config.set_interrupt_pin(IntxPin::IntA as u8);
        let msi = MsiCapability::add(&mut config).expect("room for MSI");
        let msix = Msix::add(&mut config, MSIX_VECTORS, MSIX_BAR, 0, MSIX_BAR, PBA_OFFSET)
            .expect("room for MSI-X");
        PciTestDevice {
            name: name.to_string(),
            config,
            msi,
            msix,
            intx_line,
            msi_sink,
            scratch: 0,
            intx: false,
            line_level: false,
            sent: 0,
        }
    }

    fn send(&mut self, msgs: impl IntoIterator<Item = MsiMessage>) {
        for m in msgs {
            self.sent = self.sent.wrapping_add(1);
            self.msi_sink.signal_msi(m);
        }
    }

    /// Drive INTA# from the INTX register and the interrupt-disable bit.
    fn update_intx(&mut self) {
        self.config.set_status_bits(status::INTERRUPT, self.intx);
        let level = self.intx && self.config.command() & command::INTX_DISABLE == 0;
        if level != self.line_level {
            self.line_level = level;
            self.intx_line.set_level(level);
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset & !3 {
            regs::ID => ID_VALUE,
            regs::SCRATCH => self.scratch,
            regs::INTX => u32::from(self.intx),
            regs::SENT => self.sent,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset & !3 {
            regs::SCRATCH => self.scratch = value,
            regs::INTX => {
                let on = value & 1 != 0;
                if on && !self.intx {
                    self.sent = self.sent.wrapping_add(1);
                }
                self.intx = on;
                self.update_intx();
            }
            regs::MSI => {
                let m = self.msi.trigger(&mut self.config);
                self.send(m);
            }
            regs::MSIX => {
                let m = self.msix.trigger(&self.config, value as usize);
                self.send(m);
            }
            _ => {}
        }
    }

    pub fn state(&self) -> PciTestDeviceState {
        PciTestDeviceState {
            config: self.config.state(),
            msix: self.msix.state(),
            scratch: self.scratch,
            intx: self.intx,
            sent: self.sent,
        }
    }

    /// Restore; the INTx line is driven to the restored level.
    pub fn restore(&mut self, s: &PciTestDeviceState) {
        self.config.restore(&s.config);
        self.msix.restore(&s.msix);
        self.scratch = s.scratch;
        self.intx = s.intx;
        self.sent = s.sent;
        self.update_intx();
    }
}

impl PciDevice for PciTestDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        if offset / 4 == reg::COMMAND / 4 {
            self.update_intx();
        }
        let mut out: Vec<MsiMessage> = self
            .msi
            .after_config_write(&mut self.config)
            .into_iter()
            .collect();
        out.extend(self.msix.after_config_write(&self.config));
        self.send(out);
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar == MSIX_BAR {
            if self.msix.claims(bar, offset) {
                self.msix.read(bar, offset, data);
            } else {
                data.fill(0);
            }
            return;
        }
        // Registers: any size, little-endian lanes of the dword.
        let v = self.read_register(offset);
        let lane = (offset % 4) as usize;
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(lane + i).copied().unwrap_or(0);
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == MSIX_BAR {
            if self.msix.claims(bar, offset) {
                let out = self.msix.write(&self.config, bar, offset, data);
                self.send(out);
            }
            return;
        }
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        self.write_register(offset, u32::from_le_bytes(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Sink(Mutex<Vec<MsiMessage>>);
    impl MsiSink for Sink {
        fn signal_msi(&self, m: MsiMessage) {
            self.0.lock().unwrap().push(m);
        }
    }
    struct Line(Arc<AtomicBool>);
    impl IrqLine for Line {
        fn set_level(&self, l: bool) {
            self.0.store(l, Ordering::SeqCst);
        }
    }

    fn device() -> (PciTestDevice, Arc<Sink>, Arc<AtomicBool>) {
        let sink = Arc::new(Sink::default());
        let level = Arc::new(AtomicBool::new(false));
        let d = PciTestDevice::new("pci-test", Box::new(Line(level.clone())), sink.clone());
        (d, sink, level)
    }

    fn w32(d: &mut PciTestDevice, off: u64, v: u32) {
        d.write_bar(REGS_BAR, off, &v.to_le_bytes());
    }

    #[test]
    fn intx_follows_register_and_interrupt_disable() {
        let (mut d, _, level) = device();
        w32(&mut d, regs::INTX, 1);
        assert!(level.load(Ordering::SeqCst));
        assert_ne!(d.config().get_u16(reg::STATUS) & status::INTERRUPT, 0);
        d.write_config(reg::COMMAND, &command::INTX_DISABLE.to_le_bytes());
        assert!(!level.load(Ordering::SeqCst));
        assert_ne!(d.config().get_u16(reg::STATUS) & status::INTERRUPT, 0);
        d.write_config(reg::COMMAND, &0u16.to_le_bytes());
        assert!(level.load(Ordering::SeqCst));
        w32(&mut d, regs::INTX, 0);
        assert!(!level.load(Ordering::SeqCst));
    }

    #[test]
    fn msi_and_msix_on_command() {
        let (mut d, sink, _) = device();
        let caps = d.config().capabilities();
        assert_eq!(caps.len(), 2);
        let msi = caps[0].0;
        d.write_config(msi + 4, &0xfee0_0000u32.to_le_bytes());
        d.write_config(msi + 12, &0x0051u16.to_le_bytes());
        w32(&mut d, regs::MSI, 0);
        assert!(sink.0.lock().unwrap().is_empty(), "MSI disabled");
        d.write_config(msi + 2, &1u16.to_le_bytes());
        w32(&mut d, regs::MSI, 0);
        assert_eq!(
            sink.0.lock().unwrap().pop(),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x51
            })
        );
        // MSI-X vector 5.
        let msix = caps[1].0;
        d.write_config(msix + 2, &0x8000u16.to_le_bytes());
        d.write_bar(MSIX_BAR, 5 * 16, &0xfee0_0000u32.to_le_bytes());
        d.write_bar(MSIX_BAR, 5 * 16 + 8, &0x0052u32.to_le_bytes());
        d.write_bar(MSIX_BAR, 5 * 16 + 12, &0u32.to_le_bytes());
        w32(&mut d, regs::MSIX, 5);
        assert_eq!(
            sink.0.lock().unwrap().pop(),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x52
            })
        );
        let mut b = [0u8; 4];
        d.read_bar(IO_BAR, regs::SENT, &mut b);
        assert_eq!(u32::from_le_bytes(b), 2);
    }
}
