//! The host bridge at 00:00.0: class 0x060000, no BARs. Linux's
//! `pci_sanity_check` (run when there is no DMI year to trust) looks for a
//! host bridge or an Intel/Compaq vendor on bus 0 before it trusts
//! configuration mechanism #1.

use super::config::{ConfigSpace, PciId};
use super::PciDevice;

/// Class code of a host bridge (base 0x06, sub-class 0x00, interface 0).
pub const CLASS_HOST_BRIDGE: u32 = 0x06_0000;
/// Red Hat's (QEMU's) vendor ID and the ID of its generic PCIe host bridge.
pub const VENDOR_ID: u16 = 0x1b36;
pub const DEVICE_ID: u16 = 0x0008;

pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    pub fn new() -> Self {
        HostBridge {
            config: ConfigSpace::new(PciId {
                vendor: VENDOR_ID,
                device: DEVICE_ID,
                revision: 0,
                class: CLASS_HOST_BRIDGE,
                subsystem_vendor: VENDOR_ID,
                subsystem: 0x1100,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn name(&self) -> &str {
        "host-bridge"
    }
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
}
