//! MSI-X (PCI Local Bus 3.0, 6.8.2): the capability in configuration
//! space, and the vector table and pending-bit array (PBA) that live in a
//! memory BAR.
//!
//! Table entries are 16 bytes: address low (bits 1:0 reserved), address
//! high, data, vector control (bit 0: masked; set at reset). A vector that
//! fires while masked (by its entry or by the function mask) sets its PBA
//! bit and is sent when unmasked. Accesses to the table and the PBA must
//! be naturally aligned dwords or qwords; anything else reads as all ones
//! and is dropped on write (logged once).

use serde::{Deserialize, Serialize};

use super::config::{cap_id, ConfigError, ConfigSpace};
use crate::interrupt::MsiMessage;
use crate::ratelimit::LogOnce;

const CONTROL: usize = 2;
const TABLE: usize = 4;
const PBA: usize = 8;
const LEN: usize = 12;

const FUNCTION_MASK: u16 = 1 << 14;
const ENABLE: u16 = 1 << 15;
const ENTRY_LEN: u64 = 16;
const VECTOR_MASKED: u32 = 1;

/// Most vectors a function may have.
pub const MAX_VECTORS: usize = 2048;

/// The table and PBA contents, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// Per entry: address low, address high, data, vector control.
    pub entries: Vec<[u32; 4]>,
    pub pba: Vec<u64>,
}

/// A function's MSI-X capability with its table.
#[derive(Debug)]
pub struct Msix {
    offset: usize,
    table_bar: u8,
    table_offset: u64,
    pba_bar: u8,
    pba_offset: u64,
    entries: Vec<[u32; 4]>,
    pba: Vec<u64>,
    malformed: LogOnce,
}

impl Msix {
    /// Append an MSI-X capability for `vectors` vectors whose table is at
    /// `table_offset` in BAR `table_bar` and PBA at `pba_offset` in BAR
    /// `pba_bar` (offsets 8-byte aligned; the BARs are the caller's).
    pub fn add(
        cfg: &mut ConfigSpace,
        vectors: usize,
        table_bar: u8,
        table_offset: u64,
        pba_bar: u8,
        pba_offset: u64,
    ) -> Result<Self, ConfigError> {
        let vectors = vectors.clamp(1, MAX_VECTORS);
        let offset = cfg.add_capability(cap_id::MSIX, LEN)?;
        cfg.set_u16(offset + CONTROL, (vectors - 1) as u16);
        cfg.set_mask(offset + CONTROL, 2, u32::from(FUNCTION_MASK | ENABLE));
        cfg.set_u32(
            offset + TABLE,
            table_offset as u32 & !7 | u32::from(table_bar),
        );
        cfg.set_u32(offset + PBA, pba_offset as u32 & !7 | u32::from(pba_bar));
        Ok(Msix {
            offset,
            table_bar,
            table_offset: table_offset & !7,
            pba_bar,
            pba_offset: pba_offset & !7,
            entries: vec![[0, 0, 0, VECTOR_MASKED]; vectors],
            pba: vec![0; vectors.div_ceil(64)],
            malformed: LogOnce::new(),
        })
    }

    pub fn vectors(&self) -> usize {
        self.entries.len()
    }

    /// Bytes the table occupies.
    pub fn table_len(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_LEN
    }

    /// Bytes the PBA occupies.
    pub fn pba_len(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    pub fn enabled(&self, cfg: &ConfigSpace) -> bool {
        cfg.get_u16(self.offset + CONTROL) & ENABLE != 0
    }

    fn function_masked(&self, cfg: &ConfigSpace) -> bool {
        cfg.get_u16(self.offset + CONTROL) & FUNCTION_MASK != 0
    }

    fn message(&self, vector: usize) -> MsiMessage {
        let e = &self.entries[vector];
        MsiMessage {
            address: u64::from(e[0]) | u64::from(e[1]) << 32,
            data: e[2],
        }
    }

    fn pending(&self, vector: usize) -> bool {
        self.pba[vector / 64] & 1 << (vector % 64) != 0
    }

    fn set_pending(&mut self, vector: usize, on: bool) {
        let bit = 1u64 << (vector % 64);
        if on {
            self.pba[vector / 64] |= bit;
        } else {
            self.pba[vector / 64] &= !bit;
        }
    }

    /// The function signals `vector`: the message to send, or none (MSI-X
    /// disabled, vector out of range, or masked: then its PBA bit is set).
    pub fn trigger(&mut self, cfg: &ConfigSpace, vector: usize) -> Option<MsiMessage> {
        if !self.enabled(cfg) || vector >= self.entries.len() {
            return None;
        }
        if self.function_masked(cfg) || self.entries[vector][3] & VECTOR_MASKED != 0 {
            self.set_pending(vector, true);
            return None;
        }
        Some(self.message(vector))
    }

    /// Send what became deliverable: pending vectors that are enabled and
    /// unmasked (after a write to the capability or to the table).
    fn drain_pending(&mut self, cfg: &ConfigSpace) -> Vec<MsiMessage> {
        if !self.enabled(cfg) || self.function_masked(cfg) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for v in 0..self.entries.len() {
            if self.pending(v) && self.entries[v][3] & VECTOR_MASKED == 0 {
                self.set_pending(v, false);
                out.push(self.message(v));
            }
        }
        out
    }

    /// After a configuration write (enable or function mask may have changed).
    pub fn after_config_write(&mut self, cfg: &ConfigSpace) -> Vec<MsiMessage> {
        self.drain_pending(cfg)
    }

    /// Is `offset` of BAR `bar` in the table or the PBA?
    pub fn claims(&self, bar: u8, offset: u64) -> bool {
        (bar == self.table_bar
            && (self.table_offset..self.table_offset + self.table_len()).contains(&offset))
            || (bar == self.pba_bar
                && (self.pba_offset..self.pba_offset + self.pba_len()).contains(&offset))
    }

    fn aligned(&self, offset: u64, len: usize) -> bool {
        let ok = (len == 4 || len == 8) && offset % len as u64 == 0;
        if !ok && self.malformed.first() {
            log::warn!("msix: {len}-byte access at table/PBA offset {offset:#x} is not an aligned dword or qword: ignored (logged once)");
        }
        ok
    }

    /// A read of BAR `bar` at `offset` (which [`Msix::claims`]).
    pub fn read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        if !self.aligned(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        let mut value = [0u8; 8];
        if bar == self.table_bar
            && offset >= self.table_offset
            && offset < self.table_offset + self.table_len()
        {
            let rel = offset - self.table_offset;
            let e = &self.entries[(rel / ENTRY_LEN) as usize];
            let word = ((rel % ENTRY_LEN) / 4) as usize;
            value[..4].copy_from_slice(&e[word].to_le_bytes());
            if data.len() == 8 {
                value[4..].copy_from_slice(&e[word + 1].to_le_bytes());
            }
        } else if bar == self.pba_bar && offset >= self.pba_offset {
            let rel = offset - self.pba_offset;
            let q = self.pba.get((rel / 8) as usize).copied().unwrap_or(0);
            let v = if data.len() == 8 {
                q
            } else {
                q >> ((rel % 8) * 8)
            };
            value = v.to_le_bytes();
        }
        data.copy_from_slice(&value[..data.len()]);
    }

    /// A write of BAR `bar` at `offset`: table entries change (the PBA is
    /// read-only); returns messages that became deliverable.
    pub fn write(
        &mut self,
        cfg: &ConfigSpace,
        bar: u8,
        offset: u64,
        data: &[u8],
    ) -> Vec<MsiMessage> {
        if !self.aligned(offset, data.len()) {
            return Vec::new();
        }
        if bar != self.table_bar
            || offset < self.table_offset
            || offset >= self.table_offset + self.table_len()
        {
            return Vec::new();
        }
        let rel = offset - self.table_offset;
        let index = (rel / ENTRY_LEN) as usize;
        let word = ((rel % ENTRY_LEN) / 4) as usize;
        let mut v = [0u8; 8];
        v[..data.len()].copy_from_slice(data);
        let words = [
            u32::from_le_bytes([v[0], v[1], v[2], v[3]]),
            u32::from_le_bytes([v[4], v[5], v[6], v[7]]),
        ];
        for (i, w) in words.iter().take(data.len() / 4).enumerate() {
            let slot = word + i;
            self.entries[index][slot] = match slot {
                0 => w & !3,
                3 => w & VECTOR_MASKED,
                _ => *w,
            };
        }
        self.drain_pending(cfg)
    }

    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            pba: self.pba.clone(),
        }
    }

    /// Restore a table of the same size (other sizes are ignored beyond
    /// what fits: the vector count is the model's).
    pub fn restore(&mut self, s: &MsixState) {
        for (e, v) in self.entries.iter_mut().zip(&s.entries) {
            *e = *v;
        }
        for (p, v) in self.pba.iter_mut().zip(&s.pba) {
            *p = *v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::PciId;

    fn setup() -> (ConfigSpace, Msix) {
        let mut c = ConfigSpace::new(PciId {
            vendor: 1,
            device: 2,
            revision: 0,
            class: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let m = Msix::add(&mut c, 4, 1, 0, 1, 0x800).unwrap();
        (c, m)
    }

    fn enable(c: &mut ConfigSpace, m: &Msix, mask: bool) {
        let v = ENABLE | if mask { FUNCTION_MASK } else { 0 };
        c.write(m.offset + CONTROL, &v.to_le_bytes());
    }

    #[test]
    fn capability_describes_table_and_pba() {
        let (c, m) = setup();
        assert_eq!(c.get_u16(m.offset + CONTROL), 3);
        assert_eq!(c.get_u32(m.offset + TABLE), 1);
        assert_eq!(c.get_u32(m.offset + PBA), 0x801);
        assert!(m.claims(1, 0x30) && m.claims(1, 0x800) && !m.claims(1, 0x40) && !m.claims(0, 0));
    }

    #[test]
    fn vectors_start_masked_and_fire_when_unmasked() {
        let (mut c, mut m) = setup();
        enable(&mut c, &m, false);
        // Entry 2: address, data, then unmask.
        m.write(&c, 1, 0x20, &0xfee0_0000u32.to_le_bytes());
        m.write(&c, 1, 0x24, &0u32.to_le_bytes());
        m.write(&c, 1, 0x28, &0x45u32.to_le_bytes());
        assert_eq!(m.trigger(&c, 2), None, "masked at reset");
        let mut pba = [0u8; 8];
        m.read(1, 0x800, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b100);
        let sent = m.write(&c, 1, 0x2c, &0u32.to_le_bytes());
        assert_eq!(
            sent,
            vec![MsiMessage {
                address: 0xfee0_0000,
                data: 0x45
            }]
        );
        m.read(1, 0x800, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0);
        assert_eq!(
            m.trigger(&c, 2),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x45
            })
        );
        assert_eq!(m.trigger(&c, 9), None, "out of range");
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let (mut c, mut m) = setup();
        m.write(&c, 1, 0x8, &0x46u32.to_le_bytes());
        m.write(&c, 1, 0xc, &0u32.to_le_bytes());
        enable(&mut c, &m, true);
        assert_eq!(m.trigger(&c, 0), None);
        enable(&mut c, &m, false);
        assert_eq!(m.after_config_write(&c).len(), 1);
    }

    #[test]
    fn malformed_accesses_read_ones_and_drop() {
        let (c, mut m) = setup();
        let mut b = [0u8; 2];
        m.read(1, 0x0, &mut b);
        assert_eq!(b, [0xff; 2]);
        m.write(&c, 1, 0x2, &[1, 2]);
        m.write(&c, 1, 0x4, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut q = [0u8; 8];
        m.read(1, 0x0, &mut q);
        assert_eq!(q, [0; 8]);
        // PBA writes are ignored.
        m.write(&c, 1, 0x800, &u64::MAX.to_le_bytes());
        m.read(1, 0x800, &mut q);
        assert_eq!(q, [0; 8]);
    }
}
