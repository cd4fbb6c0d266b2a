//! The root complex of bus 0: function slots, configuration cycles from
//! mechanism #1 (ports 0xcf8/0xcfc) and from ECAM (MMCONFIG), and BAR
//! changes for the machine to apply.
//!
//! Port 0xcf9 sits inside mechanism #1's address register, as on Intel
//! chipsets: a dword access to 0xcf8 is CONFIG_ADDRESS, a byte access to
//! 0xcf9 is the reset control register (the FADT's RESET_REG); other byte
//! and word accesses to 0xcf8–0xcfb are ignored (Linux's probe writes
//! 0xcfb; reads return all ones).
//!
//! Guest mistakes get the architectural answer: a cycle to an absent
//! function reads all ones and is dropped; with CONFIG_ADDRESS's enable bit
//! clear the data port reads all ones; an ECAM access that is not 1, 2 or
//! 4 bytes naturally aligned reads all ones and is dropped. Each kind of
//! mistake is logged once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::config::BarMapping;
use super::{PciAddress, PciDevice};
use crate::bus::BusDevice;
use crate::ratelimit::LogOnce;
use crate::reset_control::ResetControl;

/// A function shared between the root and its BAR windows on the buses.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

fn lock(d: &SharedPciDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// Errors of building the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("PCI slot {0} is taken")]
    SlotTaken(u8),
    #[error("PCI slot {0} does not exist (0-31)")]
    NoSuchSlot(u8),
    #[error("bus 0 is full (32 slots)")]
    Full,
}

/// BARs of one function that stopped or started decoding (a move is both).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarChange {
    pub address: PciAddress,
    pub removed: Vec<BarMapping>,
    pub added: Vec<BarMapping>,
}

/// CONFIG_ADDRESS and the reset register, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigIoState {
    pub config_address: u32,
}

/// The functions of bus 0.
pub struct PciRoot {
    functions: BTreeMap<u8, SharedPciDevice>,
    changes: Vec<BarChange>,
    changed: Arc<AtomicBool>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    pub fn new() -> Self {
        PciRoot {
            functions: BTreeMap::new(),
            changes: Vec::new(),
            changed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// `slot` if it is free, or the first free slot.
    pub fn free_slot(&self, slot: Option<u8>) -> Result<u8, PciError> {
        match slot {
            Some(s) if s > 31 => Err(PciError::NoSuchSlot(s)),
            Some(s) if self.functions.contains_key(&(s << 3)) => Err(PciError::SlotTaken(s)),
            Some(s) => Ok(s),
            None => (0..32u8)
                .find(|s| !self.functions.contains_key(&(s << 3)))
                .ok_or(PciError::Full),
        }
    }

    /// Plug `device` in as function 0 of `slot`, or of the first free slot.
    pub fn add(
        &mut self,
        slot: Option<u8>,
        device: SharedPciDevice,
    ) -> Result<PciAddress, PciError> {
        let slot = self.free_slot(slot)?;
        self.functions.insert(slot << 3, device);
        Ok(PciAddress::new(0, slot, 0))
    }

    /// The function at `address`.
    pub fn function(&self, address: PciAddress) -> Option<&SharedPciDevice> {
        if address.bus != 0 {
            return None;
        }
        self.functions.get(&address.devfn())
    }

    /// Every function, in slot order.
    pub fn functions(&self) -> impl Iterator<Item = (PciAddress, &SharedPciDevice)> {
        self.functions
            .iter()
            .map(|(&devfn, d)| (PciAddress::new(0, devfn >> 3, devfn & 7), d))
    }

    /// Raised when BAR changes are queued; the machine checks it after
    /// accesses (a relaxed load) and then takes them.
    pub fn changed_flag(&self) -> Arc<AtomicBool> {
        self.changed.clone()
    }

    /// Take the queued BAR changes, oldest first.
    pub fn take_bar_changes(&mut self) -> Vec<BarChange> {
        self.changed.store(false, Ordering::Relaxed);
        std::mem::take(&mut self.changes)
    }

    /// A configuration read; absent functions read all ones.
    pub fn config_read(&mut self, address: PciAddress, offset: usize, data: &mut [u8]) {
        match self.function(address) {
            Some(d) => lock(d).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write; dropped for absent functions. Queues a
    /// [`BarChange`] when the set of decoding BARs changed.
    pub fn config_write(&mut self, address: PciAddress, offset: usize, data: &[u8]) {
        let Some(d) = self.function(address) else {
            return;
        };
        let mut dev = lock(d);
        let before = dev.config().mapped_bars();
        dev.write_config(offset, data);
        let after = dev.config().mapped_bars();
        drop(dev);
        if before != after {
            let removed = before
                .iter()
                .filter(|b| !after.contains(b))
                .copied()
                .collect();
            let added = after
                .iter()
                .filter(|b| !before.contains(b))
                .copied()
                .collect();
            self.changes.push(BarChange {
                address,
                removed,
                added,
            });
            self.changed.store(true, Ordering::Relaxed);
        }
    }
}

fn lock_root(r: &Mutex<PciRoot>) -> MutexGuard<'_, PciRoot> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bits of CONFIG_ADDRESS that hold something (enable, bus, device,
/// function, register); the others read as zero.
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;
const CONFIG_ENABLE: u32 = 1 << 31;
/// Ports covered, from 0xcf8: address (4), data (4).
pub const CONFIG_IO_LEN: u64 = 8;
/// Offset of the reset control register (port 0xcf9) in the range.
const RESET_OFFSET: u64 = 1;
const DATA_OFFSET: u64 = 4;

/// Configuration mechanism #1 and the reset control register, at 0xcf8–0xcff.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    config_address: u32,
    reset: ResetControl,
}

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>, reset: ResetControl) -> Self {
        PciConfigIo {
            root,
            config_address: 0,
            reset,
        }
    }

    /// The target of a data-port access at byte `lane` (0–3), or `None`
    /// while the enable bit is clear.
    fn target(&self, lane: u64) -> Option<(PciAddress, usize)> {
        let a = self.config_address;
        if a & CONFIG_ENABLE == 0 {
            return None;
        }
        let address = PciAddress::new((a >> 16) as u8, (a >> 11) as u8, (a >> 8) as u8);
        Some((address, (a & 0xfc) as usize + lane as usize))
    }

    pub fn state(&self) -> PciConfigIoState {
        PciConfigIoState {
            config_address: self.config_address,
        }
    }

    pub fn restore(&mut self, s: &PciConfigIoState) {
        self.config_address = s.config_address & CONFIG_ADDRESS_MASK;
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.config_address.to_le_bytes()),
            (RESET_OFFSET, 1) => self.reset.read(0, data),
            (DATA_OFFSET.., _) => match self.target(offset - DATA_OFFSET) {
                Some((address, reg)) => lock_root(&self.root).config_read(address, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.config_address = v & CONFIG_ADDRESS_MASK;
            }
            (RESET_OFFSET, 1) => self.reset.write(0, data),
            (DATA_OFFSET.., _) => {
                if let Some((address, reg)) = self.target(offset - DATA_OFFSET) {
                    lock_root(&self.root).config_write(address, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// Bytes of ECAM per bus (32 devices × 8 functions × 4 KiB).
pub const ECAM_BUS_LEN: u64 = 1 << 20;

/// The enhanced configuration access mechanism (MMCONFIG): one 4 KiB page
/// per function, bus/device/function/register in the address.
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
    malformed: LogOnce,
}

impl PciConfigMmio {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigMmio {
            root,
            malformed: LogOnce::new(),
        }
    }

    fn decode(&self, offset: u64, len: usize) -> Option<(PciAddress, usize)> {
        let reg = (offset & 0xfff) as usize;
        if !matches!(len, 1 | 2 | 4) || reg % len != 0 {
            if self.malformed.first() {
                log::warn!(
                    "pci: ECAM access of {len} byte(s) at offset {offset:#x} is not a naturally aligned \
                     byte, word or dword: reads all ones, writes dropped (logged once)"
                );
            }
            return None;
        }
        let address = PciAddress::new(
            (offset >> 20) as u8,
            (offset >> 15) as u8,
            (offset >> 12) as u8,
        );
        Some((address, reg))
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.decode(offset, data.len()) {
            Some((address, reg)) => lock_root(&self.root).config_read(address, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((address, reg)) = self.decode(offset, data.len()) {
            lock_root(&self.root).config_write(address, reg, data);
        }
    }
}

/// One BAR of a function as the bus sees it.
pub struct PciBarWindow {
    device: SharedPciDevice,
    bar: u8,
}

impl PciBarWindow {
    pub fn new(device: SharedPciDevice, bar: u8) -> Self {
        PciBarWindow { device, bar }
    }
}

impl BusDevice for PciBarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_bar(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).write_bar(self.bar, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{command, Bar, BarKind, ConfigSpace, PciId};
    use crate::pci::host_bridge::HostBridge;
    use crate::vm_control::{VmAction, VmControl};
    use proptest::prelude::*;

    struct Dev(ConfigSpace);
    impl PciDevice for Dev {
        fn name(&self) -> &str {
            "dev"
        }
        fn config(&self) -> &ConfigSpace {
            &self.0
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.0
        }
    }

    fn dev() -> SharedPciDevice {
        let mut c = ConfigSpace::new(PciId {
            vendor: 0x1234,
            device: 0x11,
            revision: 0,
            class: 0xff_0000,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        c.add_bar(
            0,
            Bar {
                kind: BarKind::Memory32 {
                    prefetchable: false,
                },
                size: 0x1000,
            },
        )
        .unwrap();
        c.add_bar(
            1,
            Bar {
                kind: BarKind::Io,
                size: 0x10,
            },
        )
        .unwrap();
        Arc::new(Mutex::new(Dev(c)))
    }

    fn machine() -> (Arc<Mutex<PciRoot>>, PciConfigIo, PciConfigMmio, VmControl) {
        let mut root = PciRoot::new();
        root.add(Some(0), Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        root.add(Some(3), dev()).unwrap();
        let root = Arc::new(Mutex::new(root));
        let ctl = VmControl::new();
        let io = PciConfigIo::new(root.clone(), ResetControl::new(ctl.clone()));
        let mmio = PciConfigMmio::new(root.clone());
        (root, io, mmio, ctl)
    }

    fn io_cfg_read(io: &mut PciConfigIo, dev: u8, reg: u32) -> u32 {
        io.write(0, &(0x8000_0000 | u32::from(dev) << 11 | reg).to_le_bytes());
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn mechanism_one_reads_the_host_bridge_and_latches_the_address() {
        let (_, mut io, _, _) = machine();
        // Linux's pci_check_type1: byte to 0xcfb, then the latch reads back.
        io.write(3, &[1]);
        io.write(0, &0x8000_0000u32.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
        assert_eq!(io_cfg_read(&mut io, 0, 8) >> 8, 0x06_0000);
        assert_eq!(io_cfg_read(&mut io, 3, 0), 0x0011_1234);
        assert_eq!(io_cfg_read(&mut io, 4, 0), 0xffff_ffff, "empty slot");
        // Byte read of the class's base-class byte through lane 3.
        io.write(0, &0x8000_0008u32.to_le_bytes());
        let mut one = [0u8; 1];
        io.read(7, &mut one);
        assert_eq!(one[0], 0x06);
        // Enable bit clear: all ones.
        io.write(0, &0x0000_0000u32.to_le_bytes());
        io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn cf9_byte_is_reset_control_not_the_address() {
        let (_, mut io, _, ctl) = machine();
        io.write(0, &0x8000_1800u32.to_le_bytes());
        io.write(1, &[crate::reset_control::RESET_VALUE]);
        assert_eq!(ctl.take(), Some(VmAction::Reset));
        let mut b = [0u8; 4];
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_1800, "latch untouched");
    }

    #[test]
    fn ecam_and_mechanism_one_see_the_same_space() {
        let (_, mut io, mut mmio, _) = machine();
        let mut b = [0u8; 4];
        mmio.read(3 << 15, &mut b);
        assert_eq!(u32::from_le_bytes(b), io_cfg_read(&mut io, 3, 0));
        // Extended space reads zero for a present function, ones for absent.
        mmio.read(3 << 15 | 0x100, &mut b);
        assert_eq!(b, [0; 4]);
        mmio.read(5 << 15 | 0x100, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Misaligned: all ones.
        mmio.read(3 << 15 | 2, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn programming_a_bar_queues_a_change() {
        let (root, mut io, mut mmio, _) = machine();
        let base = 3u64 << 15;
        mmio.write(base + 0x10, &0xc000_0000u32.to_le_bytes());
        assert!(!root.lock().unwrap().changed_flag().load(Ordering::Relaxed));
        mmio.write(base + 4, &u32::from(command::MEMORY_SPACE).to_le_bytes());
        let changes = root.lock().unwrap().take_bar_changes();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].added[0].base, 0xc000_0000);
        assert!(changes[0].removed.is_empty());
        // Move it through mechanism #1: removed + added.
        io.write(0, &(0x8000_0000u32 | 3 << 11 | 0x10).to_le_bytes());
        io.write(4, &0xc010_0000u32.to_le_bytes());
        let changes = root.lock().unwrap().take_bar_changes();
        assert_eq!(changes[0].removed[0].base, 0xc000_0000);
        assert_eq!(changes[0].added[0].base, 0xc010_0000);
    }

    #[test]
    fn slots_are_allocated_and_checked() {
        let mut root = PciRoot::new();
        assert_eq!(root.add(None, dev()).unwrap(), PciAddress::new(0, 0, 0));
        assert_eq!(root.add(Some(0), dev()), Err(PciError::SlotTaken(0)));
        assert_eq!(root.add(Some(32), dev()), Err(PciError::NoSuchSlot(32)));
        assert_eq!(root.add(None, dev()).unwrap(), PciAddress::new(0, 1, 0));
    }

    proptest! {
        /// Random configuration cycles through both mechanisms, any size at
        /// any offset: no panic, identity registers intact, and every
        /// queued change consistent with the function's decoding BARs.
        #[test]
        fn random_config_cycles(cycles in prop::collection::vec(
            (0u8..3, any::<bool>(), prop::sample::select(vec![0u8, 3, 4]), 0usize..0x140,
             1usize..9, any::<u64>()), 0..300)) {
            let (root, mut io, mut mmio, _) = machine();
            for (how, write, slot, reg, len, value) in cycles {
                let bytes = value.to_le_bytes();
                let mut sink = [0u8; 8];
                match how {
                    // ECAM, any size at any offset of the function's page.
                    0 => {
                        let off = u64::from(slot) << 15 | reg as u64;
                        if write { mmio.write(off, &bytes[..len]) } else { mmio.read(off, &mut sink[..len]) }
                    }
                    // Mechanism #1: address, then a data cycle inside the window.
                    1 => {
                        let lane = (reg % 4) as u64;
                        io.write(0, &(0x8000_0000u32 | u32::from(slot) << 11 | reg as u32).to_le_bytes());
                        let len = len.min(4 - lane as usize);
                        if write { io.write(4 + lane, &bytes[..len]) } else { io.read(4 + lane, &mut sink[..len]) }
                    }
                    // Raw port cycles of any size in the range (the reset
                    // register excluded: it would only post a reset).
                    _ => {
                        let port = (reg as u64) % CONFIG_IO_LEN;
                        let len = len.min((CONFIG_IO_LEN - port) as usize);
                        if port == RESET_OFFSET { continue; }
                        if write { io.write(port, &bytes[..len]) } else { io.read(port, &mut sink[..len]) }
                    }
                }
            }
            let mut b = [0u8; 4];
            mmio.read(0, &mut b);
            prop_assert_eq!(u32::from_le_bytes(b), u32::from(super::super::host_bridge::DEVICE_ID) << 16
                | u32::from(super::super::host_bridge::VENDOR_ID));
            let mut r = root.lock().unwrap();
            let d = r.function(PciAddress::new(0, 3, 0)).unwrap().clone();
            let mapped = d.lock().unwrap().config().mapped_bars();
            let mut live: Vec<BarMapping> = Vec::new();
            for c in r.take_bar_changes() {
                live.retain(|b| !c.removed.contains(b));
                live.extend(c.added);
            }
            live.sort();
            prop_assert_eq!(live, mapped);
        }
    }
}
