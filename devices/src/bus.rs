//! Port-I/O and MMIO buses.
//!
//! A [`Bus`] maps non-overlapping address ranges to devices. Each device sees
//! offsets relative to the start of its range. Unmapped reads return all ones,
//! unmapped writes are dropped (with a rate-limited debug log line), as on a PC.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::ratelimit::RateLimiter;

/// One guest access as a device sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusAccess {
    /// The vCPU that made it (0 on a one-vCPU machine).
    pub vcpu: usize,
    /// The guest address (port or physical address).
    pub address: u64,
    /// `address` relative to the start of the device's range.
    pub offset: u64,
}

/// A device that answers reads and writes in the range it was inserted at.
pub trait BusDevice: Send {
    /// Fill `data` from the register(s) at `offset` within the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Write `data` to the register(s) at `offset` within the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// A read with its full description; devices that care which vCPU
    /// asked (the local APIC page) override it.
    #[inline]
    fn read_access(&mut self, access: &BusAccess, data: &mut [u8]) {
        self.read(access.offset, data);
    }
    /// The write counterpart of [`BusDevice::read_access`].
    #[inline]
    fn write_access(&mut self, access: &BusAccess, data: &[u8]) {
        self.write(access.offset, data);
    }
}

/// A device shared between a bus and whoever else holds it (the VMM, tests).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A machine-wide device number: the index of the device in the machine's
/// device list, used by the trace, `--stats` and messages. One device may
/// hold several ranges (on either bus) under one id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DeviceId(pub u32);

impl DeviceId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Errors of bus construction and of range moves.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error(
        "{bus} range {base:#x}+{len:#x} of {name} overlaps {other_name} at {other_base:#x}+{other_len:#x}"
    )]
    Overlap {
        bus: &'static str,
        name: String,
        base: u64,
        len: u64,
        other_name: String,
        other_base: u64,
        other_len: u64,
    },
    #[error("{bus} range of {name} at {base:#x} has zero length or wraps around")]
    BadRange {
        bus: &'static str,
        name: String,
        base: u64,
    },
    #[error("{bus}: nothing is mapped at {base:#x}")]
    NotMapped { bus: &'static str, base: u64 },
}

struct Entry {
    len: u64,
    id: DeviceId,
    name: Arc<str>,
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

/// Where an access landed: the device's id and name and the offset inside
/// its range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved<'a> {
    pub id: DeviceId,
    pub name: &'a str,
    pub base: u64,
    pub offset: u64,
}

/// A range as mapped, for listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub id: DeviceId,
    pub name: Arc<str>,
    pub base: u64,
    pub len: u64,
}

/// An address space of devices, ranges kept in a `BTreeMap` keyed by base.
/// Ranges can be added, removed and moved while the machine runs (PCI BAR
/// programming); overlapping claims are rejected with both names.
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

    fn check_free(&self, name: &str, base: u64, len: u64) -> Result<(), BusError> {
        let bus = self.kind.as_str();
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::BadRange {
                bus,
                name: name.to_string(),
                base,
            });
        }
        let last = base + (len - 1);
        // The closest range starting at or below `last` is the only candidate
        // that can overlap from below; ranges never overlap each other.
        if let Some((&ob, e)) = self.ranges.range(..=last).next_back() {
            if ob + (e.len - 1) >= base {
                return Err(BusError::Overlap {
                    bus,
                    name: name.to_string(),
                    base,
                    len,
                    other_name: e.name.to_string(),
                    other_base: ob,
                    other_len: e.len,
                });
            }
        }
        Ok(())
    }

    /// Map `device` (machine-wide id `id`, called `name`) at
    /// `[base, base + len)`. Overlapping an existing range is an error;
    /// nothing is inserted then.
    pub fn insert(
        &mut self,
        id: DeviceId,
        name: &str,
        base: u64,
        len: u64,
        device: SharedDevice,
    ) -> Result<(), BusError> {
        self.check_free(name, base, len)?;
        self.ranges.insert(
            base,
            Entry {
                len,
                id,
                name: Arc::from(name),
                device,
            },
        );
        Ok(())
    }

    /// Unmap the range that starts at `base`; returns its device.
    pub fn remove(&mut self, base: u64) -> Result<SharedDevice, BusError> {
        self.ranges
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotMapped {
                bus: self.kind.as_str(),
                base,
            })
    }

    /// Move the range that starts at `from` to start at `to` (same length).
    /// On an overlap the range stays where it was.
    pub fn move_range(&mut self, from: u64, to: u64) -> Result<(), BusError> {
        let bus = self.kind.as_str();
        let e = self
            .ranges
            .remove(&from)
            .ok_or(BusError::NotMapped { bus, base: from })?;
        if let Err(err) = self.check_free(&e.name, to, e.len) {
            self.ranges.insert(from, e);
            return Err(err);
        }
        self.ranges.insert(to, e);
        Ok(())
    }

    /// Every range, in address order.
    pub fn mappings(&self) -> Vec<Mapping> {
        self.ranges
            .iter()
            .map(|(&base, e)| Mapping {
                id: e.id,
                name: e.name.clone(),
                base,
                len: e.len,
            })
            .collect()
    }

    #[inline]
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

    /// Id, name and offset of the device an access at `addr` reaches, if any.
    pub fn resolve(&self, addr: u64, size: usize) -> Option<Resolved<'_>> {
        self.lookup(addr, size.max(1)).map(|(base, e)| Resolved {
            id: e.id,
            name: &e.name,
            base,
            offset: addr - base,
        })
    }

    /// Read `data.len()` bytes at `addr` for `vcpu`. Returns the device
    /// reached, or `None` (and all ones in `data`) when nothing is mapped.
    #[inline]
    pub fn read(&self, vcpu: usize, addr: u64, data: &mut [u8]) -> Option<(DeviceId, &str)> {
        match self.lookup(addr, data.len()) {
            Some((base, e)) => {
                let access = BusAccess {
                    vcpu,
                    address: addr,
                    offset: addr - base,
                };
                lock(&e.device).read_access(&access, data);
                Some((e.id, &e.name))
            }
            None => {
                data.fill(0xff);
                None
            }
        }
    }

    /// Write `data` at `addr` for `vcpu`. Returns the device reached, or
    /// `None` when nothing is mapped (the write is dropped).
    #[inline]
    pub fn write(&self, vcpu: usize, addr: u64, data: &[u8]) -> Option<(DeviceId, &str)> {
        match self.lookup(addr, data.len()) {
            Some((base, e)) => {
                let access = BusAccess {
                    vcpu,
                    address: addr,
                    offset: addr - base,
                };
                lock(&e.device).write_access(&access, data);
                Some((e.id, &e.name))
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
                None
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
        bus.insert(DeviceId(1), "a", 0x10, 0x10, dev()).unwrap();
        // Same start, inside, straddling either edge, enclosing.
        for (base, len) in [(0x10, 1), (0x18, 2), (0x8, 0x9), (0x1f, 4), (0x0, 0x100)] {
            let err = bus.insert(DeviceId(2), "b", base, len, dev()).unwrap_err();
            assert!(matches!(err, BusError::Overlap { ref other_name, .. } if other_name == "a"));
        }
        // Adjacent on both sides is fine.
        bus.insert(DeviceId(3), "below", 0x0, 0x10, dev()).unwrap();
        bus.insert(DeviceId(4), "above", 0x20, 0x10, dev()).unwrap();
        assert_eq!(bus.resolve(0x1f, 1).unwrap().name, "a");
        assert_eq!(bus.resolve(0x20, 1).unwrap().name, "above");
    }

    #[test]
    fn bad_ranges_are_rejected() {
        let mut bus = Bus::new(BusKind::Mmio);
        assert!(matches!(
            bus.insert(DeviceId(0), "z", 0x1000, 0, dev()),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(DeviceId(0), "w", u64::MAX - 1, 4, dev()),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(DeviceId(0), "top", u64::MAX - 3, 4, dev())
            .unwrap();
    }

    #[test]
    fn unmapped_reads_are_all_ones_and_writes_dropped() {
        let mut bus = Bus::new(BusKind::Mmio);
        let d = dev();
        bus.insert(DeviceId(0), "d", 0x1000, 0x10, d.clone())
            .unwrap();
        let mut buf = [0u8; 4];
        assert!(bus.read(0, 0x2000, &mut buf).is_none());
        assert_eq!(buf, [0xff; 4]);
        assert!(bus.write(0, 0x2000, &[1, 2, 3, 4]).is_none());
        // An access straddling the end of a device is unmapped too.
        assert!(bus.write(0, 0x100e, &[1, 2, 3, 4]).is_none());
        assert_eq!(d.lock().unwrap().writes, 0);
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset() {
        let mut bus = Bus::new(BusKind::Pio);
        let d = dev();
        bus.insert(DeviceId(7), "d", 0x3f8, 8, d.clone()).unwrap();
        assert_eq!(bus.write(0, 0x3fa, &[0xab, 0xcd]), Some((DeviceId(7), "d")));
        let mut buf = [0u8; 2];
        assert!(bus.read(0, 0x3fa, &mut buf).is_some());
        assert_eq!(buf, [0xab, 0xcd]);
        assert_eq!(d.lock().unwrap().regs[2], 0xab);
        assert_eq!(bus.resolve(0x3fa, 2).unwrap().offset, 2);
    }

    /// Records the vCPU and offset of each access.
    #[derive(Default)]
    struct Witness(Vec<(usize, u64, u64)>);
    impl BusDevice for Witness {
        fn read(&mut self, _o: u64, _d: &mut [u8]) {}
        fn write(&mut self, _o: u64, _d: &[u8]) {}
        fn write_access(&mut self, a: &BusAccess, _d: &[u8]) {
            self.0.push((a.vcpu, a.address, a.offset));
        }
    }

    #[test]
    fn accesses_carry_the_vcpu_and_the_device_relative_offset() {
        let mut bus = Bus::new(BusKind::Mmio);
        let w = Arc::new(Mutex::new(Witness::default()));
        bus.insert(DeviceId(1), "w", 0xfee0_0000, 0x1000, w.clone())
            .unwrap();
        bus.write(3, 0xfee0_0300, &[0; 4]);
        assert_eq!(w.lock().unwrap().0, vec![(3, 0xfee0_0300, 0x300)]);
    }

    #[test]
    fn ranges_move_and_are_removed() {
        let mut bus = Bus::new(BusKind::Mmio);
        let d = dev();
        bus.insert(DeviceId(1), "bar", 0x1000, 0x10, d.clone())
            .unwrap();
        bus.insert(DeviceId(2), "other", 0x3000, 0x10, dev())
            .unwrap();
        bus.move_range(0x1000, 0x2000).unwrap();
        assert!(bus.resolve(0x1000, 1).is_none());
        assert_eq!(bus.resolve(0x2004, 1).unwrap().offset, 4);
        // A move onto another range fails with both names and changes nothing.
        let err = bus.move_range(0x2000, 0x3008).unwrap_err();
        assert!(
            matches!(err, BusError::Overlap { ref name, ref other_name, .. }
            if name == "bar" && other_name == "other")
        );
        assert_eq!(bus.resolve(0x2000, 1).unwrap().name, "bar");
        assert!(bus.remove(0x2000).is_ok());
        assert!(bus.resolve(0x2000, 1).is_none());
        assert!(matches!(
            bus.remove(0x2000),
            Err(BusError::NotMapped { .. })
        ));
        assert_eq!(bus.mappings().len(), 1);
    }
}
