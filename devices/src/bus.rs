//! Port-I/O and MMIO buses.
//!
//! A [`Bus`] maps non-overlapping address ranges to devices. Each device sees
//! offsets relative to the start of its range. Unmapped reads return all ones,
//! unmapped writes are dropped (with a rate-limited debug log line), as on a PC.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::ratelimit::RateLimiter;

/// A device that answers reads and writes in the range it was inserted at.
pub trait BusDevice: Send {
    /// Fill `data` from the register(s) at `offset` within the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Write `data` to the register(s) at `offset` within the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between a bus and whoever else holds it (the VMM, tests).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors of bus construction.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error(
        "{bus} range {base:#x}+{len:#x} overlaps {other_name} at {other_base:#x}+{other_len:#x}"
    )]
    Overlap {
        bus: &'static str,
        base: u64,
        len: u64,
        other_name: String,
        other_base: u64,
        other_len: u64,
    },
    #[error("{bus} range at {base:#x} has zero length or wraps around")]
    BadRange { bus: &'static str, base: u64 },
}

struct Entry {
    len: u64,
    name: String,
    device: SharedDevice,
}

/// Which address space a bus serves; used in messages and traces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BusKind {
    Pio,
    Mmio,
}

impl BusKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BusKind::Pio => "pio",
            BusKind::Mmio => "mmio",
        }
    }
}

/// Where an access landed: the device's name and the offset inside its range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved<'a> {
    pub name: &'a str,
    pub base: u64,
    pub offset: u64,
}

/// An address space of devices, ranges kept in a `BTreeMap` keyed by base.
pub struct Bus {
    kind: BusKind,
    ranges: BTreeMap<u64, Entry>,
    unmapped_log: RateLimiter,
}

impl Bus {
    pub fn new(kind: BusKind) -> Self {
        Bus {
            kind,
            ranges: BTreeMap::new(),
            unmapped_log: RateLimiter::new(10),
        }
    }

    pub fn kind(&self) -> BusKind {
        self.kind
    }

    /// Map `device` at `[base, base + len)`. Overlapping an existing range is
    /// an error; nothing is inserted then.
    pub fn insert(
        &mut self,
        name: &str,
        base: u64,
        len: u64,
        device: SharedDevice,
    ) -> Result<(), BusError> {
        let bus = self.kind.as_str();
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::BadRange { bus, base });
        }
        let last = base + (len - 1);
        // The closest range starting at or below `last` is the only candidate
        // that can overlap from below; ranges never overlap each other.
        if let Some((&ob, e)) = self.ranges.range(..=last).next_back() {
            if ob + (e.len - 1) >= base {
                return Err(BusError::Overlap {
                    bus,
                    base,
                    len,
                    other_name: e.name.clone(),
                    other_base: ob,
                    other_len: e.len,
                });
            }
        }
        self.ranges.insert(
            base,
            Entry {
                len,
                name: name.to_string(),
                device,
            },
        );
        Ok(())
    }

    fn lookup(&self, addr: u64, size: usize) -> Option<(u64, &Entry)> {
        let (&base, e) = self.ranges.range(..=addr).next_back()?;
        let off = addr - base;
        // The whole access must fit in the device's range.
        if off.checked_add(size as u64)? <= e.len {
            Some((base, e))
        } else {
            None
        }
    }

    /// Name and offset of the device an access at `addr` reaches, if any.
    pub fn resolve(&self, addr: u64, size: usize) -> Option<Resolved<'_>> {
        self.lookup(addr, size.max(1)).map(|(base, e)| Resolved {
            name: &e.name,
            base,
            offset: addr - base,
        })
    }

    /// Read `data.len()` bytes at `addr`. Returns false (and fills all ones)
    /// when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr, data.len()) {
            Some((base, e)) => {
                lock(&e.device).read(addr - base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Write `data` at `addr`. Returns false (and drops the write) when
    /// nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr, data.len()) {
            Some((base, e)) => {
                lock(&e.device).write(addr - base, data);
                true
            }
            None => {
                if self.unmapped_log.allow() {
                    log::debug!(
                        "{}: write of {} byte(s) to unmapped {:#x} dropped",
                        self.kind.as_str(),
                        data.len(),
                        addr
                    );
                }
                false
            }
        }
    }
}

/// Lock a device, recovering from a poisoned mutex: a device model that
/// panicked once must not take the whole VM down with a second panic.
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Scratch {
        regs: [u8; 16],
        writes: usize,
    }

    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.regs[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.regs[o..o + data.len()].copy_from_slice(data);
            self.writes += 1;
        }
    }

    fn dev() -> Arc<Mutex<Scratch>> {
        Arc::new(Mutex::new(Scratch::default()))
    }

    #[test]
    fn overlapping_insertions_are_rejected() {
        let mut bus = Bus::new(BusKind::Pio);
        bus.insert("a", 0x10, 0x10, dev()).unwrap();
        // Same start, inside, straddling either edge, enclosing.
        for (base, len) in [(0x10, 1), (0x18, 2), (0x8, 0x9), (0x1f, 4), (0x0, 0x100)] {
            let err = bus.insert("b", base, len, dev()).unwrap_err();
            assert!(matches!(err, BusError::Overlap { ref other_name, .. } if other_name == "a"));
        }
        // Adjacent on both sides is fine.
        bus.insert("below", 0x0, 0x10, dev()).unwrap();
        bus.insert("above", 0x20, 0x10, dev()).unwrap();
        assert_eq!(bus.resolve(0x1f, 1).unwrap().name, "a");
        assert_eq!(bus.resolve(0x20, 1).unwrap().name, "above");
    }

    #[test]
    fn bad_ranges_are_rejected() {
        let mut bus = Bus::new(BusKind::Mmio);
        assert!(matches!(
            bus.insert("z", 0x1000, 0, dev()),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert("w", u64::MAX - 1, 4, dev()),
            Err(BusError::BadRange { .. })
        ));
        bus.insert("top", u64::MAX - 3, 4, dev()).unwrap();
    }

    #[test]
    fn unmapped_reads_are_all_ones_and_writes_dropped() {
        let mut bus = Bus::new(BusKind::Mmio);
        let d = dev();
        bus.insert("d", 0x1000, 0x10, d.clone()).unwrap();
        let mut buf = [0u8; 4];
        assert!(!bus.read(0x2000, &mut buf));
        assert_eq!(buf, [0xff; 4]);
        assert!(!bus.write(0x2000, &[1, 2, 3, 4]));
        // An access straddling the end of a device is unmapped too.
        assert!(!bus.write(0x100e, &[1, 2, 3, 4]));
        assert_eq!(d.lock().unwrap().writes, 0);
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset() {
        let mut bus = Bus::new(BusKind::Pio);
        let d = dev();
        bus.insert("d", 0x3f8, 8, d.clone()).unwrap();
        assert!(bus.write(0x3fa, &[0xab, 0xcd]));
        let mut buf = [0u8; 2];
        assert!(bus.read(0x3fa, &mut buf));
        assert_eq!(buf, [0xab, 0xcd]);
        assert_eq!(d.lock().unwrap().regs[2], 0xab);
        assert_eq!(bus.resolve(0x3fa, 2).unwrap().offset, 2);
    }
}
