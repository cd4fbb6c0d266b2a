//! An I/O APIC compatible with the Intel 82093AA, version 0x20 (the version
//! with the EOI register, as on ICH-class chipsets), 24 input pins.
//!
//! # Mapping
//!
//! [`Ioapic`] is a [`BusDevice`] for an MMIO window of [`MMIO_SIZE`]
//! (0x1000) bytes, which the machine maps at [`DEFAULT_BASE`] (0xfec00000).
//! Offsets: IOREGSEL 0x00, IOWIN 0x10, EOI 0x40. Only aligned 32-bit
//! accesses to these three registers do anything (Linux and every other OS
//! only use those; the datasheet requires them). Any other access — another
//! size at these offsets, or any other offset — reads all ones and is
//! dropped on write (rate-limited debug log). The EOI register is
//! write-only: reading it gives all ones.
//!
//! # Registers (through IOREGSEL / IOWIN)
//!
//! * 0x00 ID: bits 27:24 read/write, the rest reads 0.
//! * 0x01 version: 0x0017_0020 (version 0x20, maximum redirection entry 23).
//! * 0x02 arbitration: bits 27:24 = the ID (the 82093AA loads its
//!   arbitration ID from the ID register); read-only.
//! * 0x10-0x3f redirection table, entry n at 0x10 + 2n (low dword) and
//!   0x11 + 2n (high dword): vector (7:0), delivery mode (10:8), destination
//!   mode (11), delivery status (12, read-only), polarity (13, 1 = active
//!   low), remote IRR (14, read-only), trigger mode (15, 1 = level), mask
//!   (16), destination (63:56). Reserved bits read 0 and ignore writes.
//!   Every entry starts masked.
//! * Any other index reads all ones (as KVM's IOAPIC does) and ignores
//!   writes. IOREGSEL keeps bits 7:0.
//!
//! # Model
//!
//! * **Inputs.** [`Ioapic::set_irq`] drives a pin's *electrical* level. A pin
//!   is asserted when its level differs from its polarity bit's idle level:
//!   an active-high pin when the level is true, an active-low pin when it is
//!   false. Every pin starts low, so a machine that wires an active-low
//!   line (a PCI INTx) must drive it high (idle) before the guest unmasks
//!   the entry. Pins beyond 23 are ignored (logged).
//! * **Edge-triggered entries** deliver one message on each asserting edge
//!   while unmasked. An edge arriving while the entry is masked is lost (as
//!   the datasheet says). Reprogramming an entry (polarity included) never
//!   creates an edge.
//! * **Level-triggered entries** deliver while the pin is asserted, the
//!   entry unmasked and remote IRR clear; delivering sets remote IRR. An EOI
//!   for the entry's vector ([`Ioapic::end_of_interrupt`], called by the
//!   machine for the local APIC's EOI broadcast, or a write of the EOI
//!   register) clears remote IRR on every level-triggered entry with that
//!   vector, and each one whose pin is still asserted and which is unmasked
//!   delivers again. Any write to a level-triggered entry that leaves it
//!   unmasked, asserted and with remote IRR clear delivers (so unmasking an
//!   asserted line delivers). Programming an entry edge-triggered (or with a
//!   delivery mode that is always edge, below) clears its remote IRR (as
//!   KVM does for edge; older Linux clears a stuck remote IRR on
//!   IOAPICs without an EOI register by toggling the trigger mode).
//! * **Delivery modes.** Fixed and lowest priority are delivered as
//!   programmed. SMI, NMI, INIT and ExtINT are always handled as
//!   edge-triggered (the datasheet requires the trigger mode to be edge for
//!   them; a level setting would leave remote IRR set forever since the
//!   local APIC sends no EOI for them). For ExtINT the message's vector is
//!   the entry's, though the CPU takes the vector from the 8259A's INTA
//!   cycle. The reserved modes 3 and 6 deliver nothing (logged).
//! * **Delivery status** always reads 0: messages are handed over at once.
//! * **Output.** Each delivery queues an [`IoapicMessage`] in an outbox that
//!   the machine drains with [`Ioapic::take_messages`] (check cheaply with
//!   [`Ioapic::has_messages`]) after each access or input change, and
//!   passes to the local APIC(s). The outbox holds at most
//!   [`OUTBOX_LIMIT`] messages; beyond that a delivery is dropped (logged)
//!   and a level-triggered entry's remote IRR is left clear, so the
//!   interrupt is delivered again at the next EOI or assertion.
//!   Undelivered messages are part of the snapshot state.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::bus::BusDevice;
use crate::irq::IrqLine;
use crate::ratelimit::RateLimiter;

/// Number of input pins (redirection entries).
pub const NUM_PINS: usize = 24;
/// Where the machine maps the I/O APIC.
pub const DEFAULT_BASE: u64 = 0xfec0_0000;
/// Size of the MMIO window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Version register value: maximum redirection entry 23, version 0x20.
pub const VERSION: u32 = ((NUM_PINS as u32 - 1) << 16) | 0x20;
/// How many undelivered messages the outbox holds.
pub const OUTBOX_LIMIT: usize = 256;

/// MMIO offsets.
pub const IOREGSEL: u64 = 0x00;
pub const IOWIN: u64 = 0x10;
pub const EOI: u64 = 0x40;

// Register indices.
const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARB: u8 = 0x02;
const REG_REDTBL: u8 = 0x10;

// Redirection entry bits.
const RTE_VECTOR: u64 = 0xff;
const RTE_DELMODE_SHIFT: u32 = 8;
const RTE_DESTMODE: u64 = 1 << 11;
const RTE_POLARITY: u64 = 1 << 13;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASK: u64 = 1 << 16;
const RTE_DEST_SHIFT: u32 = 56;
/// Bits software can write: vector, delivery mode, destination mode,
/// polarity, trigger mode, mask, destination.
const RTE_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// How the local APIC is to take the interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    ExtInt,
}

impl DeliveryMode {
    /// Decode the 3-bit field; the reserved encodings 3 and 6 give `None`.
    pub fn from_bits(v: u8) -> Option<Self> {
        match v & 7 {
            0 => Some(DeliveryMode::Fixed),
            1 => Some(DeliveryMode::LowestPriority),
            2 => Some(DeliveryMode::Smi),
            4 => Some(DeliveryMode::Nmi),
            5 => Some(DeliveryMode::Init),
            7 => Some(DeliveryMode::ExtInt),
            _ => None,
        }
    }

    /// The 3-bit encoding.
    pub fn bits(self) -> u8 {
        match self {
            DeliveryMode::Fixed => 0,
            DeliveryMode::LowestPriority => 1,
            DeliveryMode::Smi => 2,
            DeliveryMode::Nmi => 4,
            DeliveryMode::Init => 5,
            DeliveryMode::ExtInt => 7,
        }
    }

    /// Modes that may be level-triggered (get a remote IRR and an EOI).
    fn can_be_level(self) -> bool {
        matches!(self, DeliveryMode::Fixed | DeliveryMode::LowestPriority)
    }
}

/// Whether entry `e` is handled as level-triggered: the trigger mode bit set
/// and a delivery mode that allows it.
fn is_level(e: u64) -> bool {
    e & RTE_LEVEL != 0
        && DeliveryMode::from_bits((e >> RTE_DELMODE_SHIFT) as u8)
            .is_some_and(DeliveryMode::can_be_level)
}

/// An interrupt message for the local APIC(s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoapicMessage {
    pub vector: u8,
    pub delivery_mode: DeliveryMode,
    /// Logical destination mode (else physical).
    pub dest_mode_logical: bool,
    /// Bits 63:56 of the entry: an APIC ID (physical) or a logical mask.
    pub destination: u8,
    /// Level-triggered: the local APIC must broadcast an EOI for it.
    pub level_triggered: bool,
}

/// The I/O APIC's state, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoapicState {
    /// The ID (bits 27:24 of register 0), 0-15.
    pub id: u8,
    /// IOREGSEL.
    pub regsel: u8,
    /// The redirection table (delivery status always 0).
    pub redirection: [u64; NUM_PINS],
    /// Electrical levels of the input pins (bit n = pin n).
    pub pins: u32,
    /// Messages not yet taken by the machine, oldest first.
    pub outbox: Vec<IoapicMessage>,
}

impl Default for IoapicState {
    /// The reset state: ID 0, every entry masked, every pin low.
    fn default() -> Self {
        IoapicState {
            id: 0,
            regsel: 0,
            redirection: [RTE_MASK; NUM_PINS],
            pins: 0,
            outbox: Vec::new(),
        }
    }
}

/// An 82093AA-compatible I/O APIC. See the module documentation.
pub struct Ioapic {
    s: IoapicState,
    log_limit: RateLimiter,
}

impl Default for Ioapic {
    fn default() -> Self {
        Self::new()
    }
}

impl Ioapic {
    /// An I/O APIC in its reset state.
    pub fn new() -> Self {
        Ioapic {
            s: IoapicState::default(),
            log_limit: RateLimiter::new(10),
        }
    }

    /// Back to the reset state; the pin levels (driven by devices) are kept,
    /// undelivered messages are dropped.
    pub fn reset(&mut self) {
        let pins = self.s.pins;
        self.s = IoapicState::default();
        self.s.pins = pins;
    }

    pub fn state(&self) -> IoapicState {
        self.s.clone()
    }

    /// Load a state (from [`Ioapic::state`]). Reserved and read-only bits
    /// are repaired (remote IRR cleared on edge-triggered entries), unused
    /// pins and an over-long outbox trimmed, so any value is safe. No
    /// message is generated.
    pub fn restore(&mut self, s: &IoapicState) {
        let mut s = s.clone();
        s.id &= 0xf;
        for e in s.redirection.iter_mut() {
            let mut v = *e & (RTE_WRITABLE | RTE_REMOTE_IRR);
            if !is_level(v) {
                v &= !RTE_REMOTE_IRR;
            }
            *e = v;
        }
        s.pins &= (1 << NUM_PINS) - 1;
        s.outbox.truncate(OUTBOX_LIMIT);
        self.s = s;
    }

    /// Drive input `pin`'s electrical level.
    pub fn set_irq(&mut self, pin: usize, level: bool) {
        if pin >= NUM_PINS {
            if self.log_limit.allow() {
                log::warn!("ioapic: set_irq({pin}) ignored: no such pin");
            }
            return;
        }
        let was = self.asserted(pin);
        let bit = 1u32 << pin;
        if level {
            self.s.pins |= bit;
        } else {
            self.s.pins &= !bit;
        }
        let now = self.asserted(pin);
        let e = self.s.redirection[pin];
        if !now || e & RTE_MASK != 0 {
            return;
        }
        if self.level_triggered(e) {
            self.service_level(pin);
        } else if !was {
            self.deliver(pin);
        }
    }

    /// The pin's asserted state (level and polarity).
    pub fn asserted(&self, pin: usize) -> bool {
        let Some(&e) = self.s.redirection.get(pin) else {
            return false;
        };
        let high = self.s.pins & (1 << pin) != 0;
        high != (e & RTE_POLARITY != 0)
    }

    /// An EOI for `vector`: clear remote IRR of the level-triggered entries
    /// with that vector and deliver again those still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..NUM_PINS {
            let e = self.s.redirection[pin];
            if e & RTE_VECTOR == u64::from(vector) && is_level(e) {
                self.s.redirection[pin] &= !RTE_REMOTE_IRR;
                self.service_level(pin);
            }
        }
    }

    /// Whether messages wait in the outbox.
    pub fn has_messages(&self) -> bool {
        !self.s.outbox.is_empty()
    }

    /// Take every message waiting in the outbox, oldest first.
    pub fn take_messages(&mut self) -> Vec<IoapicMessage> {
        std::mem::take(&mut self.s.outbox)
    }

    /// The redirection entry of `pin` (as the guest reads it).
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.s.redirection.get(pin).copied()
    }

    fn level_triggered(&self, e: u64) -> bool {
        is_level(e)
    }

    /// Deliver a level-triggered entry if it is asserted, unmasked and not
    /// waiting for its EOI.
    fn service_level(&mut self, pin: usize) {
        let e = self.s.redirection[pin];
        if self.level_triggered(e)
            && e & (RTE_MASK | RTE_REMOTE_IRR) == 0
            && self.asserted(pin)
            && self.deliver(pin)
        {
            self.s.redirection[pin] |= RTE_REMOTE_IRR;
        }
    }

    /// Queue the message of `pin`'s entry. False if nothing was queued.
    fn deliver(&mut self, pin: usize) -> bool {
        let e = self.s.redirection[pin];
        let Some(mode) = DeliveryMode::from_bits((e >> RTE_DELMODE_SHIFT) as u8) else {
            if self.log_limit.allow() {
                log::debug!("ioapic: pin {pin} uses a reserved delivery mode; dropped");
            }
            return false;
        };
        if self.s.outbox.len() >= OUTBOX_LIMIT {
            if self.log_limit.allow() {
                log::warn!("ioapic: outbox full, interrupt of pin {pin} dropped");
            }
            return false;
        }
        self.s.outbox.push(IoapicMessage {
            vector: (e & RTE_VECTOR) as u8,
            delivery_mode: mode,
            dest_mode_logical: e & RTE_DESTMODE != 0,
            destination: (e >> RTE_DEST_SHIFT) as u8,
            level_triggered: self.level_triggered(e),
        });
        true
    }

    /// Read the register IOREGSEL selects.
    pub fn read_window(&self) -> u32 {
        match self.s.regsel {
            REG_ID | REG_ARB => u32::from(self.s.id) << 24,
            REG_VERSION => VERSION,
            r @ REG_REDTBL..=0x3f => {
                let i = usize::from(r - REG_REDTBL);
                let e = self.s.redirection[i / 2];
                if i % 2 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => u32::MAX,
        }
    }

    /// Write the register IOREGSEL selects.
    pub fn write_window(&mut self, v: u32) {
        match self.s.regsel {
            REG_ID => self.s.id = ((v >> 24) & 0xf) as u8,
            r @ REG_REDTBL..=0x3f => {
                let i = usize::from(r - REG_REDTBL);
                let pin = i / 2;
                let old = self.s.redirection[pin];
                let new = if i % 2 == 0 {
                    (old & !0xffff_ffff) | u64::from(v)
                } else {
                    (old & 0xffff_ffff) | (u64::from(v) << 32)
                };
                let mut new = (new & RTE_WRITABLE) | (old & RTE_REMOTE_IRR);
                if !is_level(new) {
                    new &= !RTE_REMOTE_IRR;
                }
                self.s.redirection[pin] = new;
                self.service_level(pin);
            }
            r => {
                if self.log_limit.allow() {
                    log::debug!("ioapic: write {v:#x} to read-only or unknown register {r:#x}");
                }
            }
        }
    }

    fn bad_access(&self, what: &str, offset: u64, len: usize) {
        if self.log_limit.allow() {
            log::debug!("ioapic: {what} of {len} byte(s) at offset {offset:#x} ignored");
        }
    }
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match (offset, data.len()) {
            (IOREGSEL, 4) => u32::from(self.s.regsel),
            (IOWIN, 4) => self.read_window(),
            _ => {
                if offset != EOI || data.len() != 4 {
                    self.bad_access("read", offset, data.len());
                }
                data.fill(0xff);
                return;
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad_access("write", offset, data.len());
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.s.regsel = v as u8,
            IOWIN => self.write_window(v),
            EOI => self.end_of_interrupt(v as u8),
            _ => self.bad_access("write", offset, data.len()),
        }
    }
}

fn lock(a: &Mutex<Ioapic>) -> MutexGuard<'_, Ioapic> {
    a.lock().unwrap_or_else(|e| e.into_inner())
}

/// An [`IrqLine`] driving one pin of a shared [`Ioapic`].
pub struct IoapicIrqLine {
    ioapic: Arc<Mutex<Ioapic>>,
    pin: usize,
}

/// The [`IrqLine`] that drives `pin` of `ioapic` (level true = electrically
/// high).
pub fn irq_line(ioapic: Arc<Mutex<Ioapic>>, pin: usize) -> IoapicIrqLine {
    IoapicIrqLine { ioapic, pin }
}

impl IrqLine for IoapicIrqLine {
    fn set_level(&self, level: bool) {
        lock(&self.ioapic).set_irq(self.pin, level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, BusKind};
    use proptest::prelude::*;

    fn rd(a: &mut Ioapic, reg: u8) -> u32 {
        a.write(IOREGSEL, &u32::from(reg).to_le_bytes());
        let mut b = [0u8; 4];
        a.read(IOWIN, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(a: &mut Ioapic, reg: u8, v: u32) {
        a.write(IOREGSEL, &u32::from(reg).to_le_bytes());
        a.write(IOWIN, &v.to_le_bytes());
    }

    fn set_entry(a: &mut Ioapic, pin: u8, e: u64) {
        // Linux writes the high half first, then the low half.
        wr(a, 0x11 + 2 * pin, (e >> 32) as u32);
        wr(a, 0x10 + 2 * pin, e as u32);
    }

    fn get_entry(a: &mut Ioapic, pin: u8) -> u64 {
        u64::from(rd(a, 0x10 + 2 * pin)) | (u64::from(rd(a, 0x11 + 2 * pin)) << 32)
    }

    fn msg(vector: u8, dest: u8, level: bool) -> IoapicMessage {
        IoapicMessage {
            vector,
            delivery_mode: DeliveryMode::Fixed,
            dest_mode_logical: false,
            destination: dest,
            level_triggered: level,
        }
    }

    #[test]
    fn register_select_and_window() {
        let mut a = Ioapic::new();
        a.write(IOREGSEL, &0x1234_5612u32.to_le_bytes());
        let mut b = [0u8; 4];
        a.read(IOREGSEL, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x12);
        // ID: bits 27:24 only.
        wr(&mut a, 0, 0xffff_ffff);
        assert_eq!(rd(&mut a, 0), 0x0f00_0000);
        // Arbitration mirrors the ID, read-only.
        assert_eq!(rd(&mut a, 2), 0x0f00_0000);
        wr(&mut a, 2, 0);
        assert_eq!(rd(&mut a, 2), 0x0f00_0000);
        // Unknown registers.
        for r in [0x03u8, 0x0f, 0x40, 0xff] {
            assert_eq!(rd(&mut a, r), u32::MAX);
            wr(&mut a, r, 0);
        }
    }

    #[test]
    fn version_register() {
        let mut a = Ioapic::new();
        assert_eq!(rd(&mut a, 1), 0x0017_0020);
        wr(&mut a, 1, 0);
        assert_eq!(rd(&mut a, 1), 0x0017_0020);
    }

    #[test]
    fn redirection_entries_round_trip() {
        let mut a = Ioapic::new();
        for pin in 0..NUM_PINS as u8 {
            assert_eq!(get_entry(&mut a, pin), RTE_MASK, "reset value");
        }
        set_entry(&mut a, 5, u64::MAX);
        // Delivery status and remote IRR are read-only; reserved bits read 0.
        let v = get_entry(&mut a, 5);
        assert_eq!(v, RTE_WRITABLE);
        set_entry(&mut a, 5, 0x0300_0000_0001_a931);
        assert_eq!(get_entry(&mut a, 5), 0x0300_0000_0001_a931);
        assert_eq!(a.entry(5), Some(0x0300_0000_0001_a931));
        assert_eq!(a.entry(24), None);
        // Halves are independent.
        wr(&mut a, 0x11 + 10, 0x0800_0000);
        assert_eq!(get_entry(&mut a, 5), 0x0800_0000_0001_a931);
        // The last entry is at 0x3e / 0x3f.
        set_entry(&mut a, 23, 0x0100_0000_0000_0042);
        assert_eq!(rd(&mut a, 0x3e), 0x42);
        assert_eq!(rd(&mut a, 0x3f), 0x0100_0000);
    }

    #[test]
    fn edge_delivery() {
        let mut a = Ioapic::new();
        set_entry(&mut a, 2, 0x0100_0000_0000_0030);
        assert!(!a.has_messages());
        a.set_irq(2, true);
        assert!(a.has_messages());
        assert_eq!(a.take_messages(), vec![msg(0x30, 1, false)]);
        assert!(!a.has_messages());
        // Staying high: nothing more; a new edge: one more.
        a.set_irq(2, true);
        assert!(!a.has_messages());
        a.set_irq(2, false);
        assert!(!a.has_messages());
        a.set_irq(2, true);
        assert_eq!(a.take_messages(), vec![msg(0x30, 1, false)]);
        // No remote IRR for edge entries; EOI does nothing.
        assert_eq!(get_entry(&mut a, 2) & RTE_REMOTE_IRR, 0);
        a.end_of_interrupt(0x30);
        assert!(!a.has_messages());
    }

    #[test]
    fn message_fields() {
        let mut a = Ioapic::new();
        // Lowest priority, logical, destination 0x0f, vector 0x41.
        set_entry(&mut a, 7, 0x0f00_0000_0000_0941);
        a.set_irq(7, true);
        assert_eq!(
            a.take_messages(),
            vec![IoapicMessage {
                vector: 0x41,
                delivery_mode: DeliveryMode::LowestPriority,
                dest_mode_logical: true,
                destination: 0x0f,
                level_triggered: false,
            }]
        );
        for (bits, mode) in [
            (2u8, DeliveryMode::Smi),
            (4, DeliveryMode::Nmi),
            (5, DeliveryMode::Init),
            (7, DeliveryMode::ExtInt),
        ] {
            assert_eq!(DeliveryMode::from_bits(bits), Some(mode));
            assert_eq!(mode.bits(), bits);
            // Even programmed level-triggered, these are edge.
            set_entry(&mut a, 8, RTE_LEVEL | (u64::from(bits) << 8) | 0x50);
            a.set_irq(8, true);
            let m = a.take_messages();
            assert_eq!(m.len(), 1);
            assert_eq!(m[0].delivery_mode, mode);
            assert!(!m[0].level_triggered);
            assert_eq!(get_entry(&mut a, 8) & RTE_REMOTE_IRR, 0);
            a.set_irq(8, false);
        }
        // Reserved modes deliver nothing.
        for bits in [3u64, 6] {
            set_entry(&mut a, 9, (bits << 8) | 0x60);
            a.set_irq(9, true);
            a.set_irq(9, false);
            assert!(!a.has_messages());
        }
    }

    #[test]
    fn level_delivery_remote_irr_and_eoi() {
        let mut a = Ioapic::new();
        set_entry(&mut a, 10, RTE_LEVEL | 0x61);
        a.set_irq(10, true);
        assert_eq!(a.take_messages(), vec![msg(0x61, 0, true)]);
        assert_ne!(get_entry(&mut a, 10) & RTE_REMOTE_IRR, 0);
        // While remote IRR is set, nothing more (even with a new edge).
        a.set_irq(10, false);
        a.set_irq(10, true);
        assert!(!a.has_messages());
        // EOI with the line still asserted: delivered again.
        a.end_of_interrupt(0x61);
        assert_eq!(a.take_messages(), vec![msg(0x61, 0, true)]);
        assert_ne!(get_entry(&mut a, 10) & RTE_REMOTE_IRR, 0);
        // An EOI for another vector does nothing.
        a.end_of_interrupt(0x62);
        assert!(!a.has_messages());
        // Line dropped, then EOI: remote IRR cleared, nothing delivered.
        a.set_irq(10, false);
        a.end_of_interrupt(0x61);
        assert!(!a.has_messages());
        assert_eq!(get_entry(&mut a, 10) & RTE_REMOTE_IRR, 0);
        a.set_irq(10, true);
        assert_eq!(a.take_messages(), vec![msg(0x61, 0, true)]);
    }

    #[test]
    fn eoi_clears_every_entry_with_the_vector() {
        let mut a = Ioapic::new();
        set_entry(&mut a, 16, RTE_LEVEL | 0x70);
        set_entry(&mut a, 17, RTE_LEVEL | 0x70);
        a.set_irq(16, true);
        a.set_irq(17, true);
        assert_eq!(a.take_messages().len(), 2);
        a.set_irq(17, false);
        a.end_of_interrupt(0x70);
        assert_eq!(a.take_messages(), vec![msg(0x70, 0, true)]);
        assert_ne!(get_entry(&mut a, 16) & RTE_REMOTE_IRR, 0);
        assert_eq!(get_entry(&mut a, 17) & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn eoi_register() {
        let mut a = Ioapic::new();
        set_entry(&mut a, 11, RTE_LEVEL | 0x62);
        a.set_irq(11, true);
        a.take_messages();
        a.write(EOI, &0x62u32.to_le_bytes());
        assert_eq!(a.take_messages(), vec![msg(0x62, 0, true)]);
        // Write-only: reads all ones. Narrow writes are ignored.
        let mut b = [0u8; 4];
        a.read(EOI, &mut b);
        assert_eq!(b, [0xff; 4]);
        a.write(EOI, &[0x62]);
        assert!(!a.has_messages());
    }

    #[test]
    fn masked_pins() {
        let mut a = Ioapic::new();
        // Edge while masked: lost.
        set_entry(&mut a, 3, RTE_MASK | 0x33);
        a.set_irq(3, true);
        set_entry(&mut a, 3, 0x33);
        assert!(!a.has_messages());
        // Level while masked: delivered on unmask.
        set_entry(&mut a, 4, RTE_MASK | RTE_LEVEL | 0x34);
        a.set_irq(4, true);
        assert!(!a.has_messages());
        assert_eq!(get_entry(&mut a, 4) & RTE_REMOTE_IRR, 0);
        set_entry(&mut a, 4, RTE_LEVEL | 0x34);
        assert_eq!(a.take_messages(), vec![msg(0x34, 0, true)]);
        // Masked during service: EOI clears remote IRR, nothing delivered,
        // unmasking delivers.
        set_entry(&mut a, 4, RTE_MASK | RTE_LEVEL | 0x34);
        assert_ne!(get_entry(&mut a, 4) & RTE_REMOTE_IRR, 0, "preserved");
        a.end_of_interrupt(0x34);
        assert!(!a.has_messages());
        set_entry(&mut a, 4, RTE_LEVEL | 0x34);
        assert_eq!(a.take_messages().len(), 1);
        // Switching to edge clears remote IRR.
        set_entry(&mut a, 4, 0x34);
        assert_eq!(get_entry(&mut a, 4) & RTE_REMOTE_IRR, 0);
        assert!(!a.has_messages());
    }

    #[test]
    fn polarity() {
        let mut a = Ioapic::new();
        // Active low, level: the idle line is high.
        a.set_irq(19, true);
        set_entry(&mut a, 19, RTE_LEVEL | RTE_POLARITY | 0x80);
        assert!(!a.asserted(19));
        assert!(!a.has_messages());
        a.set_irq(19, false);
        assert!(a.asserted(19));
        assert_eq!(a.take_messages(), vec![msg(0x80, 0, true)]);
        a.set_irq(19, true);
        a.end_of_interrupt(0x80);
        assert!(!a.has_messages());
        // Active low, edge: delivered on the falling electrical edge.
        set_entry(&mut a, 20, RTE_POLARITY | 0x81);
        a.set_irq(20, true);
        assert!(!a.has_messages());
        a.set_irq(20, false);
        assert_eq!(a.take_messages(), vec![msg(0x81, 0, false)]);
        a.set_irq(20, true);
        assert!(!a.has_messages());
        // A low, unconnected pin programmed active-low level is asserted.
        set_entry(&mut a, 21, RTE_LEVEL | RTE_POLARITY | 0x82);
        assert_eq!(a.take_messages(), vec![msg(0x82, 0, true)]);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let mut a = Ioapic::new();
        let mut b = [0u8; 2];
        a.read(IOREGSEL, &mut b);
        assert_eq!(b, [0xff; 2]);
        a.write(IOREGSEL, &[0x01]);
        let mut b4 = [0u8; 4];
        a.read(IOREGSEL, &mut b4);
        assert_eq!(b4, [0; 4]);
        let mut b8 = [0u8; 8];
        a.read(IOWIN, &mut b8);
        assert_eq!(b8, [0xff; 8]);
        for off in [0x04u64, 0x14, 0x20, 0x44, 0xffc, u64::MAX] {
            a.read(off, &mut b4);
            assert_eq!(b4, [0xff; 4]);
            a.write(off, &[1, 2, 3, 4]);
        }
        a.write(IOWIN, &[0xff; 8]);
        assert_eq!(a.state(), IoapicState::default());
        // Out-of-range pins.
        a.set_irq(24, true);
        a.set_irq(usize::MAX, true);
        assert!(!a.asserted(99));
    }

    #[test]
    fn outbox_is_bounded() {
        let mut a = Ioapic::new();
        set_entry(&mut a, 1, 0x21);
        for _ in 0..OUTBOX_LIMIT + 10 {
            a.set_irq(1, true);
            a.set_irq(1, false);
        }
        assert_eq!(a.take_messages().len(), OUTBOX_LIMIT);
        // A level delivery dropped on a full outbox leaves remote IRR clear.
        set_entry(&mut a, 2, 0x22);
        for _ in 0..OUTBOX_LIMIT {
            a.set_irq(2, true);
            a.set_irq(2, false);
        }
        set_entry(&mut a, 3, RTE_LEVEL | 0x23);
        a.set_irq(3, true);
        assert_eq!(get_entry(&mut a, 3) & RTE_REMOTE_IRR, 0);
        a.take_messages();
        a.end_of_interrupt(0x23);
        assert_eq!(a.take_messages(), vec![msg(0x23, 0, true)]);
    }

    #[test]
    fn state_restore_round_trip() {
        let mut a = Ioapic::new();
        wr(&mut a, 0, 0x0200_0000);
        set_entry(&mut a, 6, RTE_LEVEL | 0x46);
        a.set_irq(6, true);
        a.set_irq(9, true);
        let st = a.state();
        let mut b = Ioapic::new();
        b.restore(&st);
        assert_eq!(b.state(), st);
        assert_eq!(b.take_messages(), a.take_messages());
        a.end_of_interrupt(0x46);
        b.end_of_interrupt(0x46);
        assert_eq!(b.state(), a.state());
        // Garbage is repaired.
        let mut bad = st.clone();
        bad.id = 0xff;
        bad.redirection[0] = !RTE_LEVEL;
        bad.pins = u32::MAX;
        bad.outbox = vec![msg(1, 2, false); 1000];
        b.restore(&bad);
        let s = b.state();
        assert_eq!(s.id, 0xf);
        assert_eq!(s.redirection[0], RTE_WRITABLE & !RTE_LEVEL);
        assert_eq!(s.pins, (1 << 24) - 1);
        assert_eq!(s.outbox.len(), OUTBOX_LIMIT);
        b.reset();
        assert_eq!(b.state().redirection, [RTE_MASK; NUM_PINS]);
        assert_eq!(b.state().pins, (1 << 24) - 1);
    }

    #[test]
    fn bus_mapping_and_irq_line() {
        let io = Arc::new(Mutex::new(Ioapic::new()));
        let mut bus = Bus::new(BusKind::Mmio);
        bus.insert(
            crate::bus::DeviceId(0),
            "ioapic",
            DEFAULT_BASE,
            MMIO_SIZE,
            io.clone(),
        )
        .unwrap();
        assert!(bus.write(0, DEFAULT_BASE, &0x10u32.to_le_bytes()).is_some());
        assert!(bus
            .write(0, DEFAULT_BASE + IOWIN, &0x25u32.to_le_bytes())
            .is_some());
        let line = irq_line(io.clone(), 0);
        line.set_level(true);
        assert_eq!(lock(&io).take_messages(), vec![msg(0x25, 0, false)]);
        let mut b = [0u8; 4];
        assert!(bus.read(0, DEFAULT_BASE + IOWIN, &mut b).is_some());
        assert_eq!(u32::from_le_bytes(b), 0x25);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Read(u64, usize),
        Write(u64, Vec<u8>),
        Reg(u8, u32),
        Irq(usize, bool),
        Eoi(u8),
        Take,
    }

    fn op() -> impl Strategy<Value = Op> {
        let off = prop_oneof![
            Just(IOREGSEL),
            Just(IOWIN),
            Just(EOI),
            0u64..0x1000,
            any::<u64>()
        ];
        prop_oneof![
            1 => (off.clone(), 0usize..9).prop_map(|(o, n)| Op::Read(o, n)),
            1 => (off, proptest::collection::vec(any::<u8>(), 0..9))
                .prop_map(|(o, d)| Op::Write(o, d)),
            4 => (prop_oneof![0u8..0x40, any::<u8>()], any::<u32>())
                .prop_map(|(r, v)| Op::Reg(r, v)),
            4 => (prop_oneof![0usize..24, any::<usize>()], any::<bool>())
                .prop_map(|(p, l)| Op::Irq(p, l)),
            2 => any::<u8>().prop_map(Op::Eoi),
            1 => Just(Op::Take),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_accesses_never_panic(ops in proptest::collection::vec(op(), 0..300)) {
            let mut a = Ioapic::new();
            for op in ops {
                match op {
                    Op::Read(o, n) => {
                        let mut b = vec![0u8; n];
                        a.read(o, &mut b);
                    }
                    Op::Write(o, d) => a.write(o, &d),
                    Op::Reg(r, v) => wr(&mut a, r, v),
                    Op::Irq(p, l) => a.set_irq(p, l),
                    Op::Eoi(v) => a.end_of_interrupt(v),
                    Op::Take => {
                        let has = a.has_messages();
                        prop_assert_eq!(has, !a.take_messages().is_empty());
                    }
                }
                let s = a.state();
                prop_assert!(s.outbox.len() <= OUTBOX_LIMIT);
                prop_assert!(s.id < 16);
                for (pin, &e) in s.redirection.iter().enumerate() {
                    prop_assert_eq!(e & !(RTE_WRITABLE | RTE_REMOTE_IRR), 0);
                    if e & RTE_REMOTE_IRR != 0 {
                        prop_assert!(a.level_triggered(e), "pin {}", pin);
                    }
                }
            }
            let mut b = Ioapic::new();
            b.restore(&a.state());
            prop_assert_eq!(b.state(), a.state());
        }
    }
}
