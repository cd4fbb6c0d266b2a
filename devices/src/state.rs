//! Device state for snapshots (and, later, replay): every device writes
//! its state to a plain serde struct and reads it back, Firecracker-style.
//! Each state type has a version number; a saved state names its device
//! kind and version, so a later duet can refuse (or convert) what it does
//! not understand instead of misreading it.
//!
//! The encoding is the caller's choice (the machine uses JSON for now);
//! nothing here depends on it.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Why a saved state cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error(
        "{kind}: saved state version {found}, this duet reads versions {oldest} to {expected}"
    )]
    Version {
        kind: &'static str,
        found: u32,
        oldest: u32,
        expected: u32,
    },
    #[error("saved state is for a {found}, not a {expected}")]
    Kind {
        found: String,
        expected: &'static str,
    },
    #[error("{kind}: saved state does not fit this device: {reason}")]
    Mismatch { kind: &'static str, reason: String },
}

/// A device whose state can be saved and restored.
pub trait Stateful {
    /// The plain struct holding everything the device keeps.
    type State: Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug;
    /// Names the device kind in saved states.
    const KIND: &'static str;
    /// Bumped whenever `State` changes meaning or shape.
    const VERSION: u32;
    /// The oldest version `load` still reads: fields added since carry
    /// `#[serde(default)]`, whose value is what an older duet's device
    /// meant (no lost ticks owed, say).
    const OLDEST_VERSION: u32 = Self::VERSION;

    fn save(&self) -> Self::State;
    /// Replace the device's state; errors leave the device as it was.
    fn load(&mut self, state: &Self::State) -> Result<(), StateError>;

    /// The state with its kind and version.
    fn save_versioned(&self) -> Versioned<Self::State> {
        Versioned {
            kind: Self::KIND.to_string(),
            version: Self::VERSION,
            state: self.save(),
        }
    }

    /// Restore a state saved by [`Stateful::save_versioned`], checking its
    /// kind and version.
    fn load_versioned(&mut self, v: &Versioned<Self::State>) -> Result<(), StateError> {
        if v.kind != Self::KIND {
            return Err(StateError::Kind {
                found: v.kind.clone(),
                expected: Self::KIND,
            });
        }
        if !(Self::OLDEST_VERSION..=Self::VERSION).contains(&v.version) {
            return Err(StateError::Version {
                kind: Self::KIND,
                found: v.version,
                oldest: Self::OLDEST_VERSION,
                expected: Self::VERSION,
            });
        }
        self.load(&v.state)
    }
}

/// A device state with its kind and version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned<S> {
    pub kind: String,
    pub version: u32,
    pub state: S,
}

/// Serde for byte arrays longer than serde's built-in 32 (CMOS RAM):
/// as a byte sequence of exactly the array's length.
pub mod byte_array {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(a: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(a)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let v: Vec<u8> = Vec::deserialize(d)?;
        let len = v.len();
        v.try_into()
            .map_err(|_| serde::de::Error::invalid_length(len, &"the array's length"))
    }
}

// ---- the models' states ------------------------------------------------

use crate::acpi_pm::{AcpiPm, AcpiPmState};
use crate::hpet::{Hpet, HpetState};
use crate::i8042::{I8042State, I8042};
use crate::ioapic::{Ioapic, IoapicState};
use crate::lapic::{Lapic, LapicState};
use crate::pci::config::ConfigSpaceState;
use crate::pci::host_bridge::HostBridge;
use crate::pci::root::{PciConfigIo, PciConfigIoState};
use crate::pci::test_device::{PciTestDevice, PciTestDeviceState};
use crate::pci::PciDevice;
use crate::pic8259::{Pic8259Pair, Pic8259State};
use crate::pit8254::{Pit8254, Pit8254State};
use crate::post_code::{PostCode, PostCodeState};
use crate::rtc_cmos::{RtcCmos, RtcCmosState};
use crate::uart16550::{Uart16550, Uart16550State};

/// `Stateful` for a model whose `state()`/`restore()` already exist.
macro_rules! stateful {
    ($ty:ty, $state:ty, $kind:literal, $version:literal) => {
        stateful!($ty, $state, $kind, $version, $version);
    };
    ($ty:ty, $state:ty, $kind:literal, $version:literal, $oldest:literal) => {
        impl Stateful for $ty {
            type State = $state;
            const KIND: &'static str = $kind;
            const VERSION: u32 = $version;
            const OLDEST_VERSION: u32 = $oldest;
            fn save(&self) -> $state {
                self.state()
            }
            fn load(&mut self, s: &$state) -> Result<(), StateError> {
                self.restore(s);
                Ok(())
            }
        }
    };
}

stateful!(Uart16550, Uart16550State, "uart16550", 1);
// Version 2: the lost-tick fields (version 1 states read as owing none).
stateful!(RtcCmos, RtcCmosState, "rtc-cmos", 2, 1);
stateful!(I8042, I8042State, "i8042", 1);
stateful!(AcpiPm, AcpiPmState, "acpi-pm", 1);
stateful!(PostCode, PostCodeState, "post-code", 1);
stateful!(Pit8254, Pit8254State, "pit8254", 2, 1);
stateful!(Pic8259Pair, Pic8259State, "pic8259-pair", 1);
stateful!(Ioapic, IoapicState, "ioapic", 1);
stateful!(Lapic, LapicState, "lapic", 2, 1);
stateful!(PciConfigIo, PciConfigIoState, "pci-config-io", 1);
stateful!(PciTestDevice, PciTestDeviceState, "pci-test", 1);
stateful!(Hpet, HpetState, "hpet", 1);

impl Stateful for crate::e1000::E1000 {
    type State = crate::e1000::E1000State;
    const KIND: &'static str = "e1000";
    const VERSION: u32 = 1;
    fn save(&self) -> Self::State {
        self.state()
    }
    fn load(&mut self, s: &Self::State) -> Result<(), StateError> {
        self.restore(s)
    }
}

impl Stateful for HostBridge {
    type State = ConfigSpaceState;
    const KIND: &'static str = "pci-host-bridge";
    const VERSION: u32 = 1;
    fn save(&self) -> ConfigSpaceState {
        self.config().state()
    }
    fn load(&mut self, s: &ConfigSpaceState) -> Result<(), StateError> {
        self.config_mut().restore(s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Every model: drive it with random register accesses, save, restore
    //! into a fresh instance, save again: the same bytes; then the same
    //! further accesses give the same answers and the same final state.

    use super::*;
    use crate::bus::BusDevice;
    use crate::clock::{Clock, ManualClock, TimeTaint};
    use crate::interrupt::NullMsi;
    use crate::irq::NullIrq;
    use crate::reset_control::ResetControl;
    use crate::vm_control::VmControl;
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};

    /// One register access: write?, register selector, value.
    type Op = (bool, u64, u64);

    trait Driven: Stateful {
        /// Perform `op`; what a read returned (0 for writes).
        fn drive(&mut self, op: Op) -> u64;
    }

    fn bus_op<D: BusDevice>(d: &mut D, (write, reg, value): Op, len: u64, width: usize) -> u64 {
        let offset = reg % len;
        let width = width.min((len - offset) as usize).max(1);
        let mut b = value.to_le_bytes();
        if write {
            d.write(offset, &b[..width]);
            0
        } else {
            d.read(offset, &mut b[..width]);
            let mut v = [0u8; 8];
            v[..width].copy_from_slice(&b[..width]);
            u64::from_le_bytes(v)
        }
    }

    fn clock() -> Arc<dyn Clock> {
        Arc::new(ManualClock::new())
    }

    impl Driven for Uart16550 {
        fn drive(&mut self, op: Op) -> u64 {
            bus_op(self, op, 8, 1)
        }
    }
    impl Driven for RtcCmos {
        fn drive(&mut self, op: Op) -> u64 {
            bus_op(self, op, 2, 1)
        }
    }
    impl Driven for AcpiPm {
        fn drive(&mut self, (w, reg, v): Op) -> u64 {
            // Keep S5 out: a power-off request is not state.
            bus_op(self, (w, reg, v & !0x2000), 12, 2)
        }
    }
    impl Driven for PostCode {
        fn drive(&mut self, op: Op) -> u64 {
            bus_op(self, op, 1, 1)
        }
    }
    impl Driven for Ioapic {
        fn drive(&mut self, (w, reg, v): Op) -> u64 {
            // IOREGSEL, IOWIN or EOI, dword accesses.
            let offset = [0u64, 0x10, 0x40][(reg % 3) as usize];
            bus_op(self, (w, offset, v), 0x44, 4)
        }
    }
    impl Driven for Lapic {
        fn drive(&mut self, (w, reg, v): Op) -> u64 {
            bus_op(self, (w, (reg % 0x40) << 4, v), 0x400, 4)
        }
    }
    impl Driven for Hpet {
        fn drive(&mut self, (w, reg, v): Op) -> u64 {
            // The named registers, 4 or 8 bytes wide.
            let regs = [
                0x00u64, 0x10, 0x20, 0xf0, 0x100, 0x108, 0x120, 0x128, 0x140, 0x148,
            ];
            let offset = regs[(reg % regs.len() as u64) as usize] + (reg >> 63) * 4;
            bus_op(
                self,
                (w, offset, v),
                crate::hpet::MMIO_SIZE,
                4 << ((reg >> 62) & 1),
            )
        }
    }
    impl Driven for Pit8254 {
        fn drive(&mut self, (w, reg, v): Op) -> u64 {
            let port = 0x40 + (reg % 4) as u16;
            if w {
                self.write_port(port, v as u8);
                0
            } else {
                u64::from(self.read_port(port))
            }
        }
    }
    impl Driven for Pic8259Pair {
        fn drive(&mut self, (w, reg, v): Op) -> u64 {
            let port = [0x20u16, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1][(reg % 6) as usize];
            if w {
                self.write_port(port, v as u8);
                0
            } else {
                u64::from(self.read_port(port))
            }
        }
    }
    impl Driven for I8042 {
        fn drive(&mut self, (w, reg, v): Op) -> u64 {
            // Commands that reset or pulse the CPU post VM actions; the
            // state is what matters here.
            match (w, reg % 2) {
                (true, 0) => {
                    self.write_data(v as u8);
                    0
                }
                (true, _) => {
                    let cmd = v as u8;
                    if cmd & 0xf0 != 0xf0 && cmd != 0xd1 {
                        self.write_command(cmd);
                    }
                    0
                }
                (false, 0) => u64::from(self.read_data()),
                (false, _) => u64::from(self.read_status()),
            }
        }
    }
    impl Driven for PciConfigIo {
        fn drive(&mut self, (w, reg, v): Op) -> u64 {
            // Everything but the reset register.
            let offset = [0u64, 4, 5, 6, 7][(reg % 5) as usize];
            let width = if offset == 0 { 4 } else { 1 << (reg % 3) };
            bus_op(
                self,
                (w, offset, v | if offset == 0 { 0x8000_0000 } else { 0 }),
                8,
                width,
            )
        }
    }
    impl Driven for PciTestDevice {
        fn drive(&mut self, (w, reg, v): Op) -> u64 {
            let sel = reg % 3;
            let offset = (reg >> 2) % 0x100;
            let mut b = v.to_le_bytes();
            match (sel, w) {
                (0, true) => self.write_config(offset as usize & !3, &b[..4]),
                (0, false) => {
                    self.read_config(offset as usize & !3, &mut b[..4]);
                    return u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                }
                (1, true) => self.write_bar(0, offset & 0x1c, &b[..4]),
                (1, false) => {
                    self.read_bar(0, offset & 0x1c, &mut b[..4]);
                    return u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                }
                (_, true) => self.write_bar(2, (offset * 8) % 0x80, &b[..4]),
                (_, false) => {
                    self.read_bar(2, (offset * 8) % 0x80, &mut b[..4]);
                    return u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                }
            }
            0
        }
    }
    impl Driven for HostBridge {
        fn drive(&mut self, (w, reg, v): Op) -> u64 {
            let offset = ((reg % 64) * 4) as usize;
            let mut b = (v as u32).to_le_bytes();
            if w {
                self.write_config(offset, &b);
                0
            } else {
                self.read_config(offset, &mut b);
                u64::from(u32::from_le_bytes(b))
            }
        }
    }

    fn round_trip<D: Driven>(
        make: impl Fn() -> D,
        before: &[Op],
        after: &[Op],
    ) -> Result<(), TestCaseError> {
        let mut a = make();
        for &op in before {
            a.drive(op);
        }
        let bytes = serde_json::to_vec(&a.save_versioned()).unwrap();
        let decoded: Versioned<D::State> = serde_json::from_slice(&bytes).unwrap();
        let mut b = make();
        b.load_versioned(&decoded).unwrap();
        prop_assert_eq!(
            serde_json::to_vec(&b.save_versioned()).unwrap(),
            bytes.clone(),
            "{}",
            D::KIND
        );
        for &op in after {
            prop_assert_eq!(
                a.drive(op),
                b.drive(op),
                "{} after restore: {:?}",
                D::KIND,
                op
            );
        }
        prop_assert_eq!(a.save(), b.save(), "{}", D::KIND);
        Ok(())
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec((any::<bool>(), any::<u64>(), any::<u64>()), 0..64)
    }

    proptest! {
        #[test]
        fn every_model_round_trips(before in ops(), after in ops()) {
            round_trip(|| Uart16550::new(Box::new(NullIrq), Box::new(std::io::sink())), &before, &after)?;
            round_trip(|| RtcCmos::new(clock(), TimeTaint::new(), Box::new(NullIrq), 1_767_225_600), &before, &after)?;
            round_trip(|| AcpiPm::new(clock(), TimeTaint::new(), VmControl::new()), &before, &after)?;
            round_trip(PostCode::new, &before, &after)?;
            round_trip(Ioapic::new, &before, &after)?;
            round_trip(|| Lapic::new(0, true, clock(), TimeTaint::new(), 1_000_000_000, 1_000_000_000), &before, &after)?;
            round_trip(|| Pit8254::new(clock(), Box::new(NullIrq), TimeTaint::new()), &before, &after)?;
            round_trip(Pic8259Pair::new, &before, &after)?;
            round_trip(|| Hpet::new(clock(), TimeTaint::new(), crate::hpet::HpetLines::none()), &before, &after)?;
            round_trip(|| I8042::new(VmControl::new(), Box::new(NullIrq), Box::new(NullIrq)), &before, &after)?;
            round_trip(|| {
                let root = Arc::new(Mutex::new(crate::pci::root::PciRoot::new()));
                PciConfigIo::new(root, ResetControl::new(VmControl::new()))
            }, &before, &after)?;
            round_trip(|| PciTestDevice::new("t", Box::new(NullIrq), Arc::new(NullMsi)), &before, &after)?;
            round_trip(HostBridge::new, &before, &after)?;
        }
    }

    #[test]
    fn kind_and_version_are_checked() {
        let p = PostCode::new();
        let mut v = p.save_versioned();
        v.version = 99;
        let mut q = PostCode::new();
        assert!(matches!(
            q.load_versioned(&v),
            Err(StateError::Version { found: 99, .. })
        ));
        v.version = 1;
        v.kind = "uart16550".into();
        assert!(matches!(q.load_versioned(&v), Err(StateError::Kind { .. })));
    }

    #[test]
    fn version_1_lost_tick_states_load_as_owing_nothing() {
        // Version 1 of the PIT, RTC and LAPIC states had no lost-tick
        // fields: such a state (a field removed from today's JSON) loads,
        // owing no ticks; a version from the future is refused by name.
        fn old<D: Stateful>(d: &D, fields: &[&str]) -> Versioned<D::State> {
            let mut j = serde_json::to_value(d.save()).unwrap();
            for f in fields {
                assert!(j.as_object_mut().unwrap().remove(*f).is_some(), "{f}");
            }
            Versioned {
                kind: D::KIND.into(),
                version: 1,
                state: serde_json::from_value(j).unwrap(),
            }
        }
        let mut pit = Pit8254::new(clock(), Box::new(NullIrq), TimeTaint::new());
        let v = old(&pit, &["lost_ticks", "catch_up_ns"]);
        pit.load_versioned(&v).unwrap();
        assert_eq!(pit.save().lost_ticks, 0);
        let mut rtc = RtcCmos::new(clock(), TimeTaint::new(), Box::new(NullIrq), 0);
        let v = old(&rtc, &["lost_ticks", "reinject_ns"]);
        rtc.load_versioned(&v).unwrap();
        assert_eq!(rtc.save().reinject_ns, None);
        let mut lapic = Lapic::new(
            0,
            true,
            clock(),
            TimeTaint::new(),
            1_000_000_000,
            1_000_000_000,
        );
        let mut v = old(&lapic, &["timer_lost"]);
        lapic.load_versioned(&v).unwrap();
        v.version = 3;
        let e = lapic.load_versioned(&v).unwrap_err();
        assert_eq!(
            e.to_string(),
            "lapic: saved state version 3, this duet reads versions 1 to 2"
        );
    }
}
