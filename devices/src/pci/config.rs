//! A function's configuration space: the type-0 header, its BARs and the
//! capability list, as registers with write masks.
//!
//! Every register is stored as it reads; a write changes only the bits the
//! register's write mask allows (and clears the write-1-to-clear bits it
//! names), so BAR sizing falls out of the masks: writing all ones to a BAR
//! of size S leaves `!(S - 1)` in its address bits, and the read returns
//! that with the BAR's type bits (PCI Local Bus 3.0, 6.2.5.1).
//!
//! Space past the 256-byte header and capability area (PCIe extended
//! configuration, reached only through ECAM) reads as zero: no extended
//! capabilities. Writes there are dropped.

use serde::{Deserialize, Serialize};

/// Bytes of conventional configuration space.
pub const CONFIG_SPACE_LEN: usize = 256;
/// Bytes per function through ECAM (PCIe extended space).
pub const EXTENDED_CONFIG_SPACE_LEN: usize = 4096;
const DWORDS: usize = CONFIG_SPACE_LEN / 4;

/// Header register offsets (type 0).
pub mod reg {
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const STATUS: usize = 0x06;
    pub const REVISION: usize = 0x08;
    pub const CLASS: usize = 0x09;
    pub const CACHE_LINE: usize = 0x0c;
    pub const LATENCY: usize = 0x0d;
    pub const HEADER_TYPE: usize = 0x0e;
    pub const BAR0: usize = 0x10;
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    pub const SUBSYSTEM_ID: usize = 0x2e;
    pub const EXPANSION_ROM: usize = 0x30;
    pub const CAPABILITIES: usize = 0x34;
    pub const INTERRUPT_LINE: usize = 0x3c;
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// Command register bits.
pub mod command {
    pub const IO_SPACE: u16 = 1 << 0;
    pub const MEMORY_SPACE: u16 = 1 << 1;
    pub const BUS_MASTER: u16 = 1 << 2;
    pub const PARITY_ERROR_RESPONSE: u16 = 1 << 6;
    pub const SERR: u16 = 1 << 8;
    pub const INTX_DISABLE: u16 = 1 << 10;
    /// The bits a device without special needs implements.
    pub const WRITABLE: u16 =
        IO_SPACE | MEMORY_SPACE | BUS_MASTER | PARITY_ERROR_RESPONSE | SERR | INTX_DISABLE;
}

/// Status register bits.
pub mod status {
    pub const INTERRUPT: u16 = 1 << 3;
    pub const CAPABILITIES_LIST: u16 = 1 << 4;
    /// Error bits software clears by writing 1 (parity, aborts, SERR).
    pub const WRITE_ONE_TO_CLEAR: u16 = 0xf900;
}

/// Capability IDs.
pub mod cap_id {
    pub const MSI: u8 = 0x05;
    pub const VENDOR: u8 = 0x09;
    pub const PCI_EXPRESS: u8 = 0x10;
    pub const MSIX: u8 = 0x11;
}

/// Number of BARs in a type-0 header.
pub const BAR_COUNT: usize = 6;
/// First capability offset (the header ends at 0x40).
pub const FIRST_CAPABILITY: usize = 0x40;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BarKind {
    /// Port I/O (16-bit decode: the upper half reads as zero).
    Io,
    /// 32-bit memory.
    Memory32 { prefetchable: bool },
    /// 64-bit memory: this BAR and the next one hold the address.
    Memory64 { prefetchable: bool },
}

impl BarKind {
    pub fn is_io(self) -> bool {
        self == BarKind::Io
    }

    /// The read-only type bits of the BAR's low dword.
    fn type_bits(self) -> u32 {
        match self {
            BarKind::Io => 0x1,
            BarKind::Memory32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Memory64 { prefetchable } => 0x4 | u32::from(prefetchable) << 3,
        }
    }
}

/// A BAR a device declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    pub kind: BarKind,
    /// Size in bytes, a power of two (I/O ≥ 4, memory ≥ 16).
    pub size: u64,
}

/// Why a BAR cannot be declared (a device-model bug, found at build time).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {index}: size {size:#x} is not a power of two of at least {min} bytes")]
    BarSize { index: usize, size: u64, min: u64 },
    #[error("BAR {index} does not exist or is taken (a 64-bit BAR uses two)")]
    BarIndex { index: usize },
    #[error("BAR {index}: an I/O BAR of {size:#x} bytes exceeds the 64 KiB port space")]
    IoTooLarge { index: usize, size: u64 },
    #[error("capability of {len} bytes does not fit in configuration space")]
    CapabilityFull { len: usize },
}

/// A placed, enabled BAR: what the bus should map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BarMapping {
    pub index: u8,
    pub io: bool,
    pub base: u64,
    pub size: u64,
}

/// Identity of a function, written into its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciId {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code (base class, sub-class, programming interface), 24 bits.
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// The state of a configuration space, for snapshots: the registers (the
/// layout and masks are the device model's, rebuilt from its code).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSpaceState {
    pub regs: Vec<u32>,
}

/// A configuration access the hardware can express: 1, 2 or 4 bytes
/// inside one dword (byte enables). Anything else reads all ones and is
/// dropped (the callers, mechanism #1 and ECAM, never produce it).
fn fits_one_dword(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset % 4 + len <= 4
}

/// Configuration space of one function.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    regs: [u32; DWORDS],
    writable: [u32; DWORDS],
    write_one_to_clear: [u32; DWORDS],
    bars: [Option<Bar>; BAR_COUNT],
    /// Offset of the last capability's next pointer (0x34 while none).
    last_capability_pointer: usize,
    /// Next free offset for a capability.
    next_capability: usize,
}

impl ConfigSpace {
    /// A type-0 header with the given identity: command register
    /// writable, everything else read-only until BARs, an interrupt pin or
    /// capabilities are added.
    pub fn new(id: PciId) -> Self {
        let mut c = ConfigSpace {
            regs: [0; DWORDS],
            writable: [0; DWORDS],
            write_one_to_clear: [0; DWORDS],
            bars: [None; BAR_COUNT],
            last_capability_pointer: reg::CAPABILITIES,
            next_capability: FIRST_CAPABILITY,
        };
        c.set_u16(reg::VENDOR_ID, id.vendor);
        c.set_u16(reg::DEVICE_ID, id.device);
        c.set_u8(reg::REVISION, id.revision);
        c.set_u8(reg::CLASS, id.class as u8);
        c.set_u8(reg::CLASS + 1, (id.class >> 8) as u8);
        c.set_u8(reg::CLASS + 2, (id.class >> 16) as u8);
        c.set_u16(reg::SUBSYSTEM_VENDOR_ID, id.subsystem_vendor);
        c.set_u16(reg::SUBSYSTEM_ID, id.subsystem);
        c.set_mask(reg::COMMAND, 2, u32::from(command::WRITABLE));
        c.set_w1c(reg::STATUS, 2, u32::from(status::WRITE_ONE_TO_CLEAR));
        // Cache line size and latency timer are plain read/write bytes.
        c.set_mask(reg::CACHE_LINE, 2, 0xffff);
        c
    }

    // ---- raw register helpers (device models use them to build and to
    // update read-only fields) ----

    fn merge(
        &mut self,
        offset: usize,
        len: usize,
        value: u32,
        field: fn(&mut Self) -> &mut [u32; DWORDS],
    ) {
        for i in 0..len {
            let at = offset + i;
            let (dword, shift) = (at / 4, (at % 4) * 8);
            let regs = field(self);
            regs[dword] = regs[dword] & !(0xff << shift) | ((value >> (8 * i)) & 0xff) << shift;
        }
    }

    /// Set `len` bytes at `offset` to `value` (ignores the write mask).
    pub fn set(&mut self, offset: usize, len: usize, value: u32) {
        self.merge(offset, len, value, |c| &mut c.regs);
    }
    pub fn set_u8(&mut self, offset: usize, v: u8) {
        self.set(offset, 1, u32::from(v));
    }
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.set(offset, 2, u32::from(v));
    }
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.set(offset, 4, v);
    }
    /// Which bits of `len` bytes at `offset` software may write.
    pub fn set_mask(&mut self, offset: usize, len: usize, mask: u32) {
        self.merge(offset, len, mask, |c| &mut c.writable);
    }
    /// Which bits of `len` bytes at `offset` a 1 clears.
    pub fn set_w1c(&mut self, offset: usize, len: usize, mask: u32) {
        self.merge(offset, len, mask, |c| &mut c.write_one_to_clear);
    }

    /// `len` (1, 2 or 4) bytes at `offset`, which must not cross a dword.
    pub fn get(&self, offset: usize, len: usize) -> u32 {
        let dword = self.regs[offset / 4];
        let v = dword >> ((offset % 4) * 8);
        match len {
            1 => v & 0xff,
            2 => v & 0xffff,
            _ => v,
        }
    }
    pub fn get_u8(&self, offset: usize) -> u8 {
        self.get(offset, 1) as u8
    }
    pub fn get_u16(&self, offset: usize) -> u16 {
        self.get(offset, 2) as u16
    }
    pub fn get_u32(&self, offset: usize) -> u32 {
        self.get(offset, 4)
    }

    pub fn command(&self) -> u16 {
        self.get_u16(reg::COMMAND)
    }

    /// Set or clear status bits (the interrupt status, for instance).
    pub fn set_status_bits(&mut self, bits: u16, on: bool) {
        let s = self.get_u16(reg::STATUS);
        self.set_u16(reg::STATUS, if on { s | bits } else { s & !bits });
    }

    // ---- guest accesses ----

    /// A configuration read of `data.len()` bytes (1, 2 or 4, naturally
    /// aligned; callers check) at `offset` of the 4 KiB function space.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        if !fits_one_dword(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        if offset >= CONFIG_SPACE_LEN {
            data.fill(0);
            return;
        }
        let v = self.get(offset, data.len());
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
    }

    /// A configuration write (1, 2 or 4 bytes, naturally aligned). Only
    /// writable bits change; write-1-to-clear bits clear where 1 is
    /// written.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        if offset >= CONFIG_SPACE_LEN || !fits_one_dword(offset, data.len()) {
            return;
        }
        let dword = offset / 4;
        let shift = (offset % 4) * 8;
        let mut value = [0u8; 4];
        value[..data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(value) << shift;
        let lane = match data.len() {
            1 => 0xffu32,
            2 => 0xffff,
            _ => 0xffff_ffff,
        } << shift;
        let mask = self.writable[dword] & lane;
        let clear = self.write_one_to_clear[dword] & lane & value;
        let r = &mut self.regs[dword];
        *r = (*r & !mask | value & mask) & !clear;
    }

    // ---- BARs ----

    /// Declare BAR `index`. A 64-bit memory BAR also takes `index + 1`.
    pub fn add_bar(&mut self, index: usize, bar: Bar) -> Result<(), ConfigError> {
        let wide = matches!(bar.kind, BarKind::Memory64 { .. });
        let min = if bar.kind.is_io() { 4 } else { 16 };
        if index >= BAR_COUNT || (wide && index + 1 >= BAR_COUNT) {
            return Err(ConfigError::BarIndex { index });
        }
        if self.bars[index].is_some() || (index > 0 && self.is_upper_half(index)) {
            return Err(ConfigError::BarIndex { index });
        }
        if wide && self.bars[index + 1].is_some() {
            return Err(ConfigError::BarIndex { index });
        }
        if !bar.size.is_power_of_two() || bar.size < min {
            return Err(ConfigError::BarSize {
                index,
                size: bar.size,
                min,
            });
        }
        if bar.kind.is_io() && bar.size > 0x1_0000 {
            return Err(ConfigError::IoTooLarge {
                index,
                size: bar.size,
            });
        }
        let mask = !(bar.size - 1);
        let off = reg::BAR0 + 4 * index;
        self.set_u32(off, bar.kind.type_bits());
        let low_mask = match bar.kind {
            BarKind::Io => mask as u32 & 0xfffc,
            _ => mask as u32 & 0xffff_fff0,
        };
        self.set_mask(off, 4, low_mask);
        if wide {
            self.set_u32(off + 4, 0);
            self.set_mask(off + 4, 4, (mask >> 32) as u32);
        }
        self.bars[index] = Some(bar);
        Ok(())
    }

    fn is_upper_half(&self, index: usize) -> bool {
        matches!(
            self.bars[index - 1],
            Some(Bar {
                kind: BarKind::Memory64 { .. },
                ..
            })
        )
    }

    /// The BAR declared at `index`, if any.
    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// The address BAR `index` holds now (whether or not decoding is on).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let off = reg::BAR0 + 4 * index;
        let low = self.get_u32(off);
        Some(match bar.kind {
            BarKind::Io => u64::from(low & !0x3),
            BarKind::Memory32 { .. } => u64::from(low & !0xf),
            BarKind::Memory64 { .. } => {
                u64::from(low & !0xf) | u64::from(self.get_u32(off + 4)) << 32
            }
        })
    }

    /// Place BAR `index` at `address` (the machine builder's initial
    /// assignment, as firmware would).
    pub fn set_bar_address(&mut self, index: usize, address: u64) {
        let Some(bar) = self.bar(index) else {
            return;
        };
        let off = reg::BAR0 + 4 * index;
        let addr = address & !(bar.size - 1);
        let type_bits = bar.kind.type_bits();
        match bar.kind {
            BarKind::Io => self.set_u32(off, addr as u32 & 0xfffc | type_bits),
            BarKind::Memory32 { .. } => self.set_u32(off, addr as u32 & !0xf | type_bits),
            BarKind::Memory64 { .. } => {
                self.set_u32(off, addr as u32 & !0xf | type_bits);
                self.set_u32(off + 4, (addr >> 32) as u32);
            }
        }
    }

    /// Every BAR that decodes now: declared, its space enabled in the
    /// command register, and placed somewhere other than 0 (firmware and
    /// Linux leave unassigned BARs at 0) and not at the sizing pattern.
    pub fn mapped_bars(&self) -> Vec<BarMapping> {
        let cmd = self.command();
        (0..BAR_COUNT)
            .filter_map(|i| {
                let bar = self.bar(i)?;
                let enabled = if bar.kind.is_io() {
                    cmd & command::IO_SPACE != 0
                } else {
                    cmd & command::MEMORY_SPACE != 0
                };
                let base = self.bar_address(i)?;
                let limit = if bar.kind.is_io() {
                    0x1_0000
                } else if matches!(bar.kind, BarKind::Memory64 { .. }) {
                    1 << 52
                } else {
                    1 << 32
                };
                let fits = base.checked_add(bar.size).is_some_and(|end| end <= limit);
                (enabled && base != 0 && fits).then_some(BarMapping {
                    index: i as u8,
                    io: bar.kind.is_io(),
                    base,
                    size: bar.size,
                })
            })
            .collect()
    }

    // ---- interrupt pin ----

    /// Declare INTx pin `pin` (1 = INTA# … 4 = INTD#); the interrupt line
    /// register becomes writable (firmware and the OS note the routing there).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.set_u8(reg::INTERRUPT_PIN, pin);
        self.set_mask(reg::INTERRUPT_LINE, 1, 0xff);
    }

    /// Write the interrupt line register (what firmware routed the pin to).
    pub fn set_interrupt_line(&mut self, line: u8) {
        self.set_u8(reg::INTERRUPT_LINE, line);
    }

    // ---- capabilities ----

    /// Append a capability of `len` bytes (header included) with ID `id`;
    /// returns its offset. The caller fills the body with `set_*` and
    /// sets its write masks.
    pub fn add_capability(&mut self, id: u8, len: usize) -> Result<usize, ConfigError> {
        let at = self.next_capability;
        if len < 2 || at + len > CONFIG_SPACE_LEN {
            return Err(ConfigError::CapabilityFull { len });
        }
        self.set_u8(at, id);
        self.set_u8(at + 1, 0);
        self.set_u8(self.last_capability_pointer, at as u8);
        self.last_capability_pointer = at + 1;
        self.next_capability = (at + len + 3) & !3;
        self.set_status_bits(status::CAPABILITIES_LIST, true);
        Ok(at)
    }

    /// Walk the capability list: (offset, id) pairs, stopping at a loop.
    pub fn capabilities(&self) -> Vec<(usize, u8)> {
        let mut out = Vec::new();
        let mut at = usize::from(self.get_u8(reg::CAPABILITIES));
        while (FIRST_CAPABILITY..CONFIG_SPACE_LEN).contains(&at) && out.len() < 48 {
            out.push((at, self.get_u8(at)));
            at = usize::from(self.get_u8(at + 1));
        }
        out
    }

    // ---- state ----

    pub fn state(&self) -> ConfigSpaceState {
        ConfigSpaceState {
            regs: self.regs.to_vec(),
        }
    }

    /// Restore the registers (the masks stay the model's). A state of the
    /// wrong length is ignored beyond what fits.
    pub fn restore(&mut self, s: &ConfigSpaceState) {
        for (r, v) in self.regs.iter_mut().zip(&s.regs) {
            *r = *v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id() -> PciId {
        PciId {
            vendor: 0x1234,
            device: 0x5678,
            revision: 2,
            class: 0xff0000,
            subsystem_vendor: 0x1af4,
            subsystem: 1,
        }
    }

    fn rd(c: &ConfigSpace, off: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(c: &mut ConfigSpace, off: usize, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    #[test]
    fn header_identity_is_read_only() {
        let mut c = ConfigSpace::new(id());
        assert_eq!(rd(&c, 0), 0x5678_1234);
        assert_eq!(rd(&c, 8), 0xff00_0002);
        wr(&mut c, 0, 0);
        wr(&mut c, 8, 0);
        assert_eq!(rd(&c, 0), 0x5678_1234);
        assert_eq!(rd(&c, 8), 0xff00_0002);
        assert_eq!(rd(&c, 0x2c), 0x0001_1af4);
    }

    #[test]
    fn bars_size_like_hardware() {
        let mut c = ConfigSpace::new(id());
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
                size: 0x20,
            },
        )
        .unwrap();
        c.add_bar(
            2,
            Bar {
                kind: BarKind::Memory64 { prefetchable: true },
                size: 0x2_0000_0000,
            },
        )
        .unwrap();
        for off in [0x10, 0x14, 0x18, 0x1c, 0x20, 0x24] {
            wr(&mut c, off, 0xffff_ffff);
        }
        assert_eq!(rd(&c, 0x10), 0xffff_f000);
        assert_eq!(rd(&c, 0x14), 0x0000_ffe1);
        assert_eq!(rd(&c, 0x18), 0x0000_000c);
        assert_eq!(rd(&c, 0x1c), 0xffff_fffe);
        // Unused BAR: reads 0 whatever is written.
        assert_eq!(rd(&c, 0x20), 0);
        assert_eq!(rd(&c, 0x24), 0);
        // Place and decode.
        wr(&mut c, 0x10, 0xc000_1234);
        assert_eq!(c.bar_address(0), Some(0xc000_1000));
        wr(&mut c, 0x18, 0);
        wr(&mut c, 0x1c, 0x4);
        assert_eq!(c.bar_address(2), Some(0x4_0000_0000));
        assert!(c.mapped_bars().is_empty(), "decoding is off");
        wr(&mut c, 4, u32::from(command::MEMORY_SPACE));
        let m = c.mapped_bars();
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0],
            BarMapping {
                index: 0,
                io: false,
                base: 0xc000_1000,
                size: 0x1000
            }
        );
        assert_eq!(m[1].base, 0x4_0000_0000);
    }

    #[test]
    fn bad_bar_declarations_are_refused() {
        let mut c = ConfigSpace::new(id());
        let io = |size| Bar {
            kind: BarKind::Io,
            size,
        };
        assert!(matches!(
            c.add_bar(0, io(3)),
            Err(ConfigError::BarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(0, io(0)),
            Err(ConfigError::BarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(6, io(4)),
            Err(ConfigError::BarIndex { .. })
        ));
        let wide = Bar {
            kind: BarKind::Memory64 {
                prefetchable: false,
            },
            size: 0x1000,
        };
        assert!(matches!(
            c.add_bar(5, wide),
            Err(ConfigError::BarIndex { .. })
        ));
        c.add_bar(0, wide).unwrap();
        assert!(matches!(
            c.add_bar(1, io(4)),
            Err(ConfigError::BarIndex { .. })
        ));
    }

    #[test]
    fn impossible_access_shapes_read_ones_and_change_nothing() {
        let mut c = ConfigSpace::new(id());
        let before = c.state();
        c.write(reg::COMMAND, &[]);
        c.write(reg::COMMAND + 3, &[0xff, 0xff]);
        c.write(reg::COMMAND, &[0xff; 3]);
        assert_eq!(c.state(), before);
        let mut b = [0u8; 2];
        c.read(3, &mut b);
        assert_eq!(b, [0xff; 2]);
    }

    #[test]
    fn status_errors_clear_on_write_one() {
        let mut c = ConfigSpace::new(id());
        c.set_u16(reg::STATUS, 0x8000 | status::INTERRUPT);
        c.write(reg::STATUS, &0x8000u16.to_le_bytes());
        assert_eq!(c.get_u16(reg::STATUS), status::INTERRUPT);
    }

    #[test]
    fn capability_list_chains() {
        let mut c = ConfigSpace::new(id());
        let a = c.add_capability(cap_id::MSI, 24).unwrap();
        let b = c.add_capability(cap_id::MSIX, 12).unwrap();
        assert_eq!((a, b), (0x40, 0x58));
        assert_eq!(
            c.capabilities(),
            vec![(0x40, cap_id::MSI), (0x58, cap_id::MSIX)]
        );
        assert_ne!(c.get_u16(reg::STATUS) & status::CAPABILITIES_LIST, 0);
        assert!(c.add_capability(cap_id::VENDOR, 200).is_err());
    }

    proptest! {
        /// Random writes never change read-only bits and never panic; state
        /// round-trips.
        #[test]
        fn random_writes_respect_masks(writes in prop::collection::vec((0usize..4096, 0u32..3, any::<u32>()), 0..64)) {
            let mut c = ConfigSpace::new(id());
            c.add_bar(0, Bar { kind: BarKind::Memory32 { prefetchable: false }, size: 0x1000 }).unwrap();
            c.add_bar(1, Bar { kind: BarKind::Io, size: 0x10 }).unwrap();
            for (off, size, v) in writes {
                let len = 1usize << size;
                let off = off & !(len - 1);
                c.write(off, &v.to_le_bytes()[..len]);
            }
            prop_assert_eq!(c.get_u32(0), 0x5678_1234);
            prop_assert_eq!(c.get_u32(0x10) & 0xfff, 0);
            prop_assert_eq!(c.get_u32(0x14) & 0xffff_000f, 1);
            let mut d = ConfigSpace::new(id());
            d.restore(&c.state());
            prop_assert_eq!(d.state(), c.state());
        }
    }
}
