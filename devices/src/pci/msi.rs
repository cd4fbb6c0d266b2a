//! The MSI capability (PCI Local Bus 3.0, 6.8.1): 64-bit address, one
//! vector, per-vector masking. Its registers live in the function's
//! configuration space; this type knows where and what they mean.

use super::config::{cap_id, ConfigError, ConfigSpace};
use crate::interrupt::MsiMessage;

const CONTROL: usize = 2;
const ADDRESS_LOW: usize = 4;
const ADDRESS_HIGH: usize = 8;
const DATA: usize = 12;
const MASK: usize = 16;
const PENDING: usize = 20;
const LEN: usize = 24;

/// Message control bits.
const ENABLE: u16 = 1 << 0;
const ADDRESS_64: u16 = 1 << 7;
const PER_VECTOR_MASK: u16 = 1 << 8;

/// Where a function's MSI capability is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiCapability {
    offset: usize,
}

impl MsiCapability {
    /// Append the capability to `cfg`.
    pub fn add(cfg: &mut ConfigSpace) -> Result<Self, ConfigError> {
        let offset = cfg.add_capability(cap_id::MSI, LEN)?;
        cfg.set_u16(offset + CONTROL, ADDRESS_64 | PER_VECTOR_MASK);
        cfg.set_mask(offset + CONTROL, 2, u32::from(ENABLE));
        cfg.set_mask(offset + ADDRESS_LOW, 4, 0xffff_fffc);
        cfg.set_mask(offset + ADDRESS_HIGH, 4, 0xffff_ffff);
        cfg.set_mask(offset + DATA, 2, 0xffff);
        cfg.set_mask(offset + MASK, 4, 1);
        Ok(MsiCapability { offset })
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn enabled(&self, cfg: &ConfigSpace) -> bool {
        cfg.get_u16(self.offset + CONTROL) & ENABLE != 0
    }

    fn masked(&self, cfg: &ConfigSpace) -> bool {
        cfg.get_u32(self.offset + MASK) & 1 != 0
    }

    fn pending(&self, cfg: &ConfigSpace) -> bool {
        cfg.get_u32(self.offset + PENDING) & 1 != 0
    }

    fn set_pending(&self, cfg: &mut ConfigSpace, on: bool) {
        cfg.set_u32(self.offset + PENDING, u32::from(on));
    }

    /// The message the function writes.
    pub fn message(&self, cfg: &ConfigSpace) -> MsiMessage {
        MsiMessage {
            address: u64::from(cfg.get_u32(self.offset + ADDRESS_LOW))
                | u64::from(cfg.get_u32(self.offset + ADDRESS_HIGH)) << 32,
            data: u32::from(cfg.get_u16(self.offset + DATA)),
        }
    }

    /// The function signals its vector: the message to send, or none (MSI
    /// disabled, or masked: then the pending bit remembers it).
    pub fn trigger(&self, cfg: &mut ConfigSpace) -> Option<MsiMessage> {
        if !self.enabled(cfg) {
            return None;
        }
        if self.masked(cfg) {
            self.set_pending(cfg, true);
            return None;
        }
        Some(self.message(cfg))
    }

    /// After a configuration write: a pending vector that is now enabled
    /// and unmasked is sent.
    pub fn after_config_write(&self, cfg: &mut ConfigSpace) -> Option<MsiMessage> {
        if self.enabled(cfg) && !self.masked(cfg) && self.pending(cfg) {
            self.set_pending(cfg, false);
            return Some(self.message(cfg));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::PciId;

    fn cfg() -> (ConfigSpace, MsiCapability) {
        let mut c = ConfigSpace::new(PciId {
            vendor: 1,
            device: 2,
            revision: 0,
            class: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let m = MsiCapability::add(&mut c).unwrap();
        (c, m)
    }

    #[test]
    fn disabled_msi_sends_nothing() {
        let (mut c, m) = cfg();
        assert_eq!(m.trigger(&mut c), None);
        assert_eq!(
            c.get_u16(m.offset() + CONTROL),
            ADDRESS_64 | PER_VECTOR_MASK
        );
    }

    #[test]
    fn masked_vector_is_held_pending_until_unmasked() {
        let (mut c, m) = cfg();
        let o = m.offset();
        c.write(o + ADDRESS_LOW, &0xfee0_1003u32.to_le_bytes());
        c.write(o + DATA, &0x4041u16.to_le_bytes());
        c.write(o + MASK, &1u32.to_le_bytes());
        c.write(o + CONTROL, &1u16.to_le_bytes());
        assert_eq!(m.trigger(&mut c), None);
        assert_eq!(c.get_u32(o + PENDING), 1);
        // The pending register is read-only to software.
        c.write(o + PENDING, &0u32.to_le_bytes());
        assert_eq!(c.get_u32(o + PENDING), 1);
        c.write(o + MASK, &0u32.to_le_bytes());
        let msg = m.after_config_write(&mut c).unwrap();
        // Address bits 1:0 are reserved (read as 0).
        assert_eq!(
            msg,
            MsiMessage {
                address: 0xfee0_1000,
                data: 0x4041
            }
        );
        assert_eq!(c.get_u32(o + PENDING), 0);
        assert_eq!(m.trigger(&mut c), Some(msg));
    }
}
