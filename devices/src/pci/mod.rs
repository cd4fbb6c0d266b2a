//! PCI: configuration space with type-0 headers, BARs, capabilities, MSI
//! and MSI-X ([`config`], [`msi`], [`msix`]); the root complex of bus 0 and
//! its two configuration mechanisms ([`root`]); a host bridge
//! ([`host_bridge`]) and a test device ([`test_device`]).
//!
//! A function is a [`PciDevice`]: it owns its [`ConfigSpace`] and answers
//! accesses to its BARs. The root routes configuration cycles, notices when
//! a write moves, enables or disables a BAR, and queues a [`BarChange`] for
//! the machine to apply to its buses (models return messages; they never
//! reach into the bus that is calling them).

pub mod config;
pub mod host_bridge;
pub mod msi;
pub mod msix;
pub mod root;
pub mod test_device;

use std::fmt;

pub use config::{Bar, BarKind, BarMapping, ConfigSpace, PciId};
pub use root::{BarChange, PciBarWindow, PciConfigIo, PciConfigMmio, PciRoot};

/// Bus/device/function of a function on segment 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    pub bus: u8,
    /// 0–31.
    pub device: u8,
    /// 0–7.
    pub function: u8,
}

impl PciAddress {
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        PciAddress {
            bus,
            device: device & 0x1f,
            function: function & 7,
        }
    }

    /// The device/function byte (device << 3 | function).
    pub fn devfn(&self) -> u8 {
        self.device << 3 | self.function
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// INTx pins as the interrupt pin register numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IntxPin {
    IntA = 1,
    IntB = 2,
    IntC = 3,
    IntD = 4,
}

/// A PCI function.
pub trait PciDevice: Send {
    /// Short name for traces, `--stats` and messages.
    fn name(&self) -> &str;

    fn config(&self) -> &ConfigSpace;
    fn config_mut(&mut self) -> &mut ConfigSpace;

    /// A configuration read (1, 2 or 4 bytes inside one dword).
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }

    /// A configuration write (1, 2 or 4 bytes inside one dword). Devices
    /// with capabilities that react (MSI unmask, INTx disable) override it
    /// and call [`ConfigSpace::write`] first.
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
    }

    /// A read of BAR `bar` at `offset` inside it.
    fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    /// A write of BAR `bar` at `offset` inside it.
    fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}
