//! The virtio-pci transport, modern (virtio 1.2, 4.1): a non-transitional
//! function (vendor 0x1af4, device 0x1040 + type, revision 1) with one
//! 64-bit memory BAR holding every structure, described by vendor
//! capabilities, and MSI-X with one vector per queue plus one for
//! configuration changes; INTx (with the ISR register) when the driver
//! does not enable MSI-X.
//!
//! BAR 0 (16 KiB):
//!
//! | offset | structure | capability |
//! |---|---|---|
//! | 0x0000 | common configuration (0x38 bytes) | `VIRTIO_PCI_CAP_COMMON_CFG` |
//! | 0x0800 | ISR status (read clears) | `VIRTIO_PCI_CAP_ISR_CFG` |
//! | 0x1000 | device configuration | `VIRTIO_PCI_CAP_DEVICE_CFG` |
//! | 0x2000 | notifications, 4 bytes per queue | `VIRTIO_PCI_CAP_NOTIFY_CFG` |
//! | 0x3000 | MSI-X table | MSI-X |
//! | 0x3800 | MSI-X pending bits | |
//!
//! A `VIRTIO_PCI_CAP_PCI_CFG` capability gives the alternative access
//! window through configuration space that the specification requires.

use std::sync::Arc;

use super::core::{VirtioCore, VirtioCoreState};
use super::{device_type, GuestMemory, Signals, VirtioDevice};
use crate::interrupt::{MsiMessage, MsiSink};
use crate::irq::IrqLine;
use crate::pci::config::{
    cap_id, command, reg, status as pci_status, Bar, BarKind, ConfigSpace, ConfigSpaceState, PciId,
};
use crate::pci::msix::{Msix, MsixState};
use crate::pci::{IntxPin, PciDevice};

pub const VENDOR_ID: u16 = 0x1af4;
/// Modern devices: 0x1040 + the virtio device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;

pub const BAR_INDEX: u8 = 0;
pub const BAR_SIZE: u64 = 0x4000;
pub const COMMON_OFFSET: u64 = 0x0000;
pub const COMMON_LEN: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x0800;
pub const ISR_LEN: u64 = 4;
pub const DEVICE_CFG_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x2000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x3000;
pub const MSIX_PBA_OFFSET: u64 = 0x3800;

/// "No vector" for the MSI-X vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// Vendor capability types.
pub mod cap_type {
    pub const COMMON_CFG: u8 = 1;
    pub const NOTIFY_CFG: u8 = 2;
    pub const ISR_CFG: u8 = 3;
    pub const DEVICE_CFG: u8 = 4;
    pub const PCI_CFG: u8 = 5;
}

/// Common configuration fields: (offset, width).
pub mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Every field with its width, in order.
    pub const FIELDS: [(u64, u64); 19] = [
        (DEVICE_FEATURE_SELECT, 4),
        (DEVICE_FEATURE, 4),
        (DRIVER_FEATURE_SELECT, 4),
        (DRIVER_FEATURE, 4),
        (CONFIG_MSIX_VECTOR, 2),
        (NUM_QUEUES, 2),
        (DEVICE_STATUS, 1),
        (CONFIG_GENERATION, 1),
        (QUEUE_SELECT, 2),
        (QUEUE_SIZE, 2),
        (QUEUE_MSIX_VECTOR, 2),
        (QUEUE_ENABLE, 2),
        (QUEUE_NOTIFY_OFF, 2),
        (QUEUE_DESC, 4),
        (QUEUE_DESC + 4, 4),
        (QUEUE_DRIVER, 4),
        (QUEUE_DRIVER + 4, 4),
        (QUEUE_DEVICE, 4),
        (QUEUE_DEVICE + 4, 4),
    ];
}

/// ISR bits.
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

/// The PCI class code for each device type.
pub fn class_of(device_type: u32) -> u32 {
    match device_type {
        device_type::NET => 0x02_0000,
        device_type::BLOCK => 0x01_8000,
        device_type::CONSOLE => 0x07_8000,
        _ => 0xff_0000,
    }
}

/// The transport's state, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioPciState {
    pub config: ConfigSpaceState,
    pub msix: MsixState,
    pub core: VirtioCoreState,
    pub isr: u8,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
}

/// A virtio device on the PCI transport.
pub struct VirtioPci {
    name: String,
    core: VirtioCore,
    config: ConfigSpace,
    msix: Msix,
    /// Offset of the PCI_CFG capability in configuration space.
    pci_cfg_cap: usize,
    isr: u8,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    intx_line: Box<dyn IrqLine>,
    intx_level: bool,
    msi_sink: Arc<dyn MsiSink>,
    /// Interrupts raised (MSI-X messages sent, INTx assertions): a
    /// statistic, not state.
    interrupts: u64,
}

impl VirtioPci {
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        intx_line: Box<dyn IrqLine>,
        msi_sink: Arc<dyn MsiSink>,
    ) -> Self {
        let dtype = device.device_type();
        let core = VirtioCore::new(name, device, mem);
        let queues = core.num_queues();
        let mut config = ConfigSpace::new(PciId {
            vendor: VENDOR_ID,
            device: DEVICE_ID_BASE + dtype as u16,
            revision: 1,
            class: class_of(dtype),
            subsystem_vendor: VENDOR_ID,
            subsystem: 0x1100,
        });
        config
            .add_bar(
                usize::from(BAR_INDEX),
                Bar {
                    kind: BarKind::Memory64 {
                        prefetchable: false,
                    },
                    size: BAR_SIZE,
                },
            )
            .expect("virtio BAR layout is valid");
        config.set_interrupt_pin(IntxPin::IntA as u8);
        // The vendor capabilities, then MSI-X. These fit in 192 bytes.
        let structures = [
            (cap_type::COMMON_CFG, COMMON_OFFSET, COMMON_LEN),
            (
                cap_type::NOTIFY_CFG,
                NOTIFY_OFFSET,
                4 * queues.max(1) as u64,
            ),
            (cap_type::ISR_CFG, ISR_OFFSET, ISR_LEN),
            (cap_type::DEVICE_CFG, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN),
        ];
        for (kind, offset, length) in structures {
            let len = if kind == cap_type::NOTIFY_CFG { 20 } else { 16 };
            let at = config
                .add_capability(cap_id::VENDOR, len)
                .expect("room for virtio capabilities");
            config.set_u8(at + 2, len as u8);
            config.set_u8(at + 3, kind);
            config.set_u8(at + 4, BAR_INDEX);
            config.set_u32(at + 8, offset as u32);
            config.set_u32(at + 12, length as u32);
            if kind == cap_type::NOTIFY_CFG {
                config.set_u32(at + 16, NOTIFY_MULTIPLIER);
            }
        }
        let pci_cfg_cap = config
            .add_capability(cap_id::VENDOR, 20)
            .expect("room for the PCI_CFG capability");
        config.set_u8(pci_cfg_cap + 2, 20);
        config.set_u8(pci_cfg_cap + 3, cap_type::PCI_CFG);
        config.set_mask(pci_cfg_cap + 4, 1, 0xff);
        config.set_mask(pci_cfg_cap + 8, 4, 0xffff_ffff);
        config.set_mask(pci_cfg_cap + 12, 4, 0xffff_ffff);
        config.set_mask(pci_cfg_cap + 16, 4, 0xffff_ffff);
        let msix = Msix::add(
            &mut config,
            queues + 1,
            BAR_INDEX,
            MSIX_TABLE_OFFSET,
            BAR_INDEX,
            MSIX_PBA_OFFSET,
        )
        .expect("room for MSI-X");
        VirtioPci {
            name: name.to_string(),
            core,
            config,
            msix,
            pci_cfg_cap,
            isr: 0,
            config_vector: NO_VECTOR,
            queue_vectors: vec![NO_VECTOR; queues],
            intx_line,
            intx_level: false,
            interrupts: 0,
            msi_sink,
        }
    }

    pub fn core(&self) -> &VirtioCore {
        &self.core
    }

    /// Host input may be pending for the device.
    pub fn poll(&mut self) {
        let s = self.core.poll();
        self.signal(s);
    }

    /// Interrupts raised so far (MSI-X messages sent, INTx assertions).
    pub fn interrupts(&self) -> u64 {
        self.interrupts
    }

    fn send(&mut self, m: Option<MsiMessage>) {
        if let Some(m) = m {
            self.interrupts += 1;
            self.msi_sink.signal_msi(m);
        }
    }

    /// Raise what the device asked for: MSI-X vectors when enabled, INTx
    /// and the ISR otherwise.
    fn signal(&mut self, s: Signals) {
        if s.is_empty() {
            return;
        }
        if self.msix.enabled(&self.config) {
            let mut sent: Vec<u16> = Vec::new();
            let mut vectors: Vec<u16> = (0..self.queue_vectors.len())
                .filter(|q| s.queues & (1u64 << (q % 64)) != 0)
                .map(|q| self.queue_vectors[q])
                .collect();
            if s.config {
                vectors.push(self.config_vector);
            }
            for v in vectors {
                if v == NO_VECTOR || sent.contains(&v) {
                    continue;
                }
                sent.push(v);
                let m = self.msix.trigger(&self.config, usize::from(v));
                self.send(m);
            }
            return;
        }
        if s.queues != 0 {
            self.isr |= ISR_QUEUE;
        }
        if s.config {
            self.isr |= ISR_CONFIG;
        }
        self.update_intx();
    }

    fn update_intx(&mut self) {
        self.config
            .set_status_bits(pci_status::INTERRUPT, self.isr != 0);
        let level = self.isr != 0 && self.config.command() & command::INTX_DISABLE == 0;
        if level != self.intx_level {
            self.intx_level = level;
            self.interrupts += u64::from(level);
            self.intx_line.set_level(level);
        }
    }

    fn selected_vector(&self) -> u16 {
        self.queue_vectors
            .get(usize::from(self.core.queue_select))
            .copied()
            .unwrap_or(NO_VECTOR)
    }

    /// A vector the driver may use: inside the table, else NO_VECTOR.
    fn valid_vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.msix.vectors() {
            v
        } else {
            NO_VECTOR
        }
    }

    /// The common configuration structure as it reads now.
    fn common_image(&self) -> [u8; COMMON_LEN as usize] {
        let c = &self.core;
        let q = c.selected();
        let mut b = [0u8; COMMON_LEN as usize];
        let mut put = |off: u64, bytes: &[u8]| {
            b[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
        };
        put(
            common::DEVICE_FEATURE_SELECT,
            &c.device_feature_select.to_le_bytes(),
        );
        put(
            common::DEVICE_FEATURE,
            &c.device_features_word().to_le_bytes(),
        );
        put(
            common::DRIVER_FEATURE_SELECT,
            &c.driver_feature_select.to_le_bytes(),
        );
        put(
            common::DRIVER_FEATURE,
            &c.driver_features_word().to_le_bytes(),
        );
        put(
            common::CONFIG_MSIX_VECTOR,
            &self.config_vector.to_le_bytes(),
        );
        put(common::NUM_QUEUES, &(c.num_queues() as u16).to_le_bytes());
        put(common::DEVICE_STATUS, &[c.status()]);
        put(common::CONFIG_GENERATION, &[c.config_generation()]);
        put(common::QUEUE_SELECT, &c.queue_select.to_le_bytes());
        if let Some(q) = q {
            put(common::QUEUE_SIZE, &q.size.to_le_bytes());
            put(
                common::QUEUE_MSIX_VECTOR,
                &self.selected_vector().to_le_bytes(),
            );
            put(common::QUEUE_ENABLE, &u16::from(q.ready).to_le_bytes());
            put(common::QUEUE_NOTIFY_OFF, &c.queue_select.to_le_bytes());
            put(common::QUEUE_DESC, &q.desc.to_le_bytes());
            put(common::QUEUE_DRIVER, &q.driver.to_le_bytes());
            put(common::QUEUE_DEVICE, &q.device.to_le_bytes());
        } else {
            put(common::QUEUE_MSIX_VECTOR, &NO_VECTOR.to_le_bytes());
        }
        b
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        if end > COMMON_LEN {
            return;
        }
        let mut image = self.common_image();
        image[offset as usize..end as usize].copy_from_slice(data);
        let field = |off: u64, width: u64| -> u64 {
            let mut v = [0u8; 8];
            v[..width as usize].copy_from_slice(&image[off as usize..(off + width) as usize]);
            u64::from_le_bytes(v)
        };
        for (off, width) in common::FIELDS {
            if off >= end || off + width <= offset {
                continue;
            }
            let v = field(off, width);
            let c = &mut self.core;
            match off {
                common::DEVICE_FEATURE_SELECT => c.device_feature_select = v as u32,
                common::DRIVER_FEATURE_SELECT => c.driver_feature_select = v as u32,
                common::DRIVER_FEATURE => c.write_driver_features(v as u32),
                common::CONFIG_MSIX_VECTOR => self.config_vector = self.valid_vector(v as u16),
                common::DEVICE_STATUS => {
                    let s = c.write_status(v as u8);
                    if c.status() == 0 {
                        self.reset_transport();
                    }
                    self.signal(s);
                }
                common::QUEUE_SELECT => c.queue_select = v as u16,
                common::QUEUE_SIZE => {
                    if let Some(q) = c.selected_mut() {
                        q.size = v as u16;
                    }
                }
                common::QUEUE_MSIX_VECTOR => {
                    let valid = self.valid_vector(v as u16);
                    let index = usize::from(self.core.queue_select);
                    if !self.core.is_active() {
                        if let Some(slot) = self.queue_vectors.get_mut(index) {
                            *slot = valid;
                        }
                    }
                }
                common::QUEUE_ENABLE => {
                    if let Some(q) = c.selected_mut() {
                        q.ready = v & 1 != 0;
                    }
                }
                o if (common::QUEUE_DESC..common::QUEUE_DEVICE + 8).contains(&o) => {
                    if let Some(q) = c.selected_mut() {
                        let reg = match o & !7 {
                            common::QUEUE_DESC => &mut q.desc,
                            common::QUEUE_DRIVER => &mut q.driver,
                            _ => &mut q.device,
                        };
                        if o % 8 == 0 {
                            *reg = *reg & !0xffff_ffff | v;
                        } else {
                            *reg = *reg & 0xffff_ffff | v << 32;
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Transport registers back to reset values (after a device reset).
    fn reset_transport(&mut self) {
        self.isr = 0;
        self.config_vector = NO_VECTOR;
        self.queue_vectors.fill(NO_VECTOR);
        self.update_intx();
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        let inside = |base: u64, size: u64| offset >= base && offset + len <= base + size;
        if inside(COMMON_OFFSET, COMMON_LEN) {
            let img = self.common_image();
            let o = (offset - COMMON_OFFSET) as usize;
            data.copy_from_slice(&img[o..o + data.len()]);
        } else if inside(ISR_OFFSET, ISR_LEN) {
            data.fill(0);
            if offset == ISR_OFFSET {
                data[0] = self.isr;
                self.isr = 0;
                self.update_intx();
            }
        } else if inside(DEVICE_CFG_OFFSET, DEVICE_CFG_LEN) {
            self.core
                .read_config((offset - DEVICE_CFG_OFFSET) as usize, data);
        } else if self.msix.claims(BAR_INDEX, offset) {
            self.msix.read(BAR_INDEX, offset, data);
        } else {
            data.fill(0);
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        let notify_len = u64::from(NOTIFY_MULTIPLIER) * self.core.num_queues() as u64;
        if offset + len <= COMMON_OFFSET + COMMON_LEN {
            self.write_common(offset - COMMON_OFFSET, data);
        } else if offset >= DEVICE_CFG_OFFSET && offset + len <= DEVICE_CFG_OFFSET + DEVICE_CFG_LEN
        {
            self.core
                .write_config((offset - DEVICE_CFG_OFFSET) as usize, data);
        } else if offset >= NOTIFY_OFFSET && offset < NOTIFY_OFFSET + notify_len {
            let q = ((offset - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
            let s = self.core.notify(q);
            self.signal(s);
        } else if self.msix.claims(BAR_INDEX, offset) {
            let out = self.msix.write(&self.config, BAR_INDEX, offset, data);
            for m in out {
                self.msi_sink.signal_msi(m);
            }
        }
    }

    /// The PCI_CFG window: an access to `pci_cfg_data` reaches the BAR at
    /// the capability's offset, with its length (1, 2 or 4).
    fn pci_cfg_access(&mut self, write: Option<&[u8]>) -> [u8; 4] {
        let cap = self.pci_cfg_cap;
        let bar = self.config.get_u8(cap + 4);
        let offset = u64::from(self.config.get_u32(cap + 8));
        let len = self.config.get_u32(cap + 12) as usize;
        let mut out = [0u8; 4];
        if bar != BAR_INDEX || !matches!(len, 1 | 2 | 4) || offset + len as u64 > BAR_SIZE {
            return out;
        }
        match write {
            Some(d) => self.bar_write(offset, &d[..len.min(d.len())]),
            None => self.bar_read(offset, &mut out[..len]),
        }
        out
    }

    pub fn state(&self) -> VirtioPciState {
        VirtioPciState {
            config: self.config.state(),
            msix: self.msix.state(),
            core: self.core.state(),
            isr: self.isr,
            config_vector: self.config_vector,
            queue_vectors: self.queue_vectors.clone(),
        }
    }
}

impl PciDevice for VirtioPci {
    fn name(&self) -> &str {
        &self.name
    }

    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let data_reg = self.pci_cfg_cap + 16;
        if offset >= data_reg && offset < data_reg + 4 {
            let v = self.pci_cfg_access(None);
            let o = offset - data_reg;
            for (i, b) in data.iter_mut().enumerate() {
                *b = v.get(o + i).copied().unwrap_or(0);
            }
            return;
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        let data_reg = self.pci_cfg_cap + 16;
        if offset == data_reg {
            self.pci_cfg_access(Some(data));
            return;
        }
        self.config.write(offset, data);
        if offset / 4 == reg::COMMAND / 4 {
            self.update_intx();
        }
        for m in self.msix.after_config_write(&self.config) {
            self.msi_sink.signal_msi(m);
        }
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar != BAR_INDEX {
            data.fill(0xff);
            return;
        }
        self.bar_read(offset, data);
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == BAR_INDEX {
            self.bar_write(offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::MsiMessage;
    use crate::virtio::queue::testing::{memory, DriverQueue};
    use crate::virtio::rng::{EntropySource, VirtioRng};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Sink(Mutex<Vec<MsiMessage>>);
    impl MsiSink for Sink {
        fn signal_msi(&self, m: MsiMessage) {
            self.0.lock().unwrap().push(m);
        }
    }

    fn w(d: &mut VirtioPci, off: u64, v: u64, len: usize) {
        d.write_bar(0, off, &v.to_le_bytes()[..len]);
    }
    fn r(d: &mut VirtioPci, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.read_bar(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Capabilities as Linux's virtio_pci_modern probe looks for them.
    #[test]
    fn capabilities_describe_the_structures() {
        let sink = Arc::new(Sink::default());
        let d = VirtioPci::new(
            "rng",
            Box::new(VirtioRng::new(EntropySource::Seeded(1))),
            memory(),
            Box::new(crate::NullIrq),
            sink,
        );
        let c = d.config();
        assert_eq!(c.get_u16(0), VENDOR_ID);
        assert_eq!(c.get_u16(2), 0x1044);
        assert_eq!(c.get_u8(8), 1, "revision 1: modern");
        let caps = c.capabilities();
        let vendor: Vec<u8> = caps
            .iter()
            .filter(|(_, id)| *id == cap_id::VENDOR)
            .map(|(o, _)| c.get_u8(o + 3))
            .collect();
        assert_eq!(vendor, vec![1, 2, 3, 4, 5]);
        assert!(caps.iter().any(|(_, id)| *id == cap_id::MSIX));
        let notify = caps
            .iter()
            .find(|(o, id)| *id == cap_id::VENDOR && c.get_u8(o + 3) == 2)
            .unwrap()
            .0;
        assert_eq!(c.get_u32(notify + 16), NOTIFY_MULTIPLIER);
    }

    fn bring_up(d: &mut VirtioPci, q: &DriverQueue, vector: u16) {
        w(d, common::DEVICE_STATUS, 3, 1);
        w(d, common::DRIVER_FEATURE_SELECT, 1, 4);
        w(d, common::DRIVER_FEATURE, 1, 4);
        w(d, common::DEVICE_STATUS, 11, 1);
        assert_eq!(r(d, common::DEVICE_STATUS, 1), 11);
        w(d, common::QUEUE_SELECT, 0, 2);
        w(d, common::QUEUE_SIZE, u64::from(q.size), 2);
        w(d, common::QUEUE_DESC, q.desc, 8);
        w(d, common::QUEUE_DRIVER, q.avail, 4);
        w(d, common::QUEUE_DRIVER + 4, 0, 4);
        w(d, common::QUEUE_DEVICE, q.used, 8);
        w(d, common::QUEUE_MSIX_VECTOR, u64::from(vector), 2);
        w(d, common::QUEUE_ENABLE, 1, 2);
        w(d, common::DEVICE_STATUS, 15, 1);
    }

    #[test]
    fn msix_per_queue_and_intx_fallback() {
        let mem = memory();
        let sink = Arc::new(Sink::default());
        let mut d = VirtioPci::new(
            "rng",
            Box::new(VirtioRng::new(EntropySource::Seeded(1))),
            mem.clone(),
            Box::new(crate::NullIrq),
            sink.clone(),
        );
        // MSI-X on, vector 1 → 0xfee00000 / 0x41.
        let msix = d
            .config()
            .capabilities()
            .into_iter()
            .find(|(_, id)| *id == cap_id::MSIX)
            .unwrap()
            .0;
        d.write_config(msix + 2, &0x8000u16.to_le_bytes());
        w(&mut d, MSIX_TABLE_OFFSET + 16, 0xfee0_0000, 4);
        w(&mut d, MSIX_TABLE_OFFSET + 24, 0x41, 4);
        w(&mut d, MSIX_TABLE_OFFSET + 28, 0, 4);
        let mut q = DriverQueue::new(0x1000, 8);
        bring_up(&mut d, &q, 1);
        assert_eq!(r(&mut d, common::QUEUE_MSIX_VECTOR, 2), 1);
        q.add_chain(&mem, &[(&[], 16, true)]);
        w(&mut d, NOTIFY_OFFSET, 0, 2);
        assert_eq!(q.take_used(&mem), vec![(0, 16)]);
        assert_eq!(
            sink.0.lock().unwrap().pop(),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        );
        // A vector beyond the table reads back as NO_VECTOR.
        w(&mut d, common::DEVICE_STATUS, 0, 1);
        w(&mut d, common::QUEUE_MSIX_VECTOR, 40, 2);
        assert_eq!(
            r(&mut d, common::QUEUE_MSIX_VECTOR, 2),
            u64::from(NO_VECTOR)
        );
        // INTx: MSI-X off, ISR set, read clears.
        d.write_config(msix + 2, &0u16.to_le_bytes());
        let mut q = DriverQueue::new(0x8000, 8);
        bring_up(&mut d, &q, NO_VECTOR);
        q.add_chain(&mem, &[(&[], 16, true)]);
        w(&mut d, NOTIFY_OFFSET, 0, 2);
        assert_ne!(d.config().get_u16(reg::STATUS) & pci_status::INTERRUPT, 0);
        assert_eq!(r(&mut d, ISR_OFFSET, 1), 1);
        assert_eq!(r(&mut d, ISR_OFFSET, 1), 0);
        assert_eq!(d.config().get_u16(reg::STATUS) & pci_status::INTERRUPT, 0);
    }

    #[test]
    fn the_pci_cfg_window_reaches_the_bar() {
        let mut d = VirtioPci::new(
            "rng",
            Box::new(VirtioRng::new(EntropySource::Seeded(1))),
            memory(),
            Box::new(crate::NullIrq),
            Arc::new(Sink::default()),
        );
        let cap = d.pci_cfg_cap;
        d.write_config(cap + 4, &[0]);
        d.write_config(cap + 8, &(common::NUM_QUEUES as u32).to_le_bytes());
        d.write_config(cap + 12, &2u32.to_le_bytes());
        let mut b = [0u8; 4];
        d.read_config(cap + 16, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1, "one queue");
    }
}
