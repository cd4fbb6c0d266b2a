//! The one interrupt message that travels between interrupt sources and
//! local APICs: IOAPIC redirections, PCI MSI/MSI-X writes and
//! interprocessor interrupts all become an [`InterruptMessage`], and the
//! irqchip delivers every one of them the same way.
//!
//! An MSI is a memory write of `data` to `address` in the 0xfee0_0000
//! window (SDM vol. 3, 11.11 "Message Signalled Interrupts"); the
//! conversions between [`MsiMessage`] and [`InterruptMessage`] follow that
//! encoding, so an in-kernel irqchip that takes MSIs (KVM_SIGNAL_MSI) can
//! be handed any message.

use serde::{Deserialize, Serialize};

use crate::ioapic::{self, IoapicMessage};
use crate::lapic::LapicMessage;
pub use crate::lapic::{DeliveryMode, DestMode, Shorthand, TriggerMode};

/// Start of the MSI address window (the local APICs' page).
pub const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
/// Mask of the window's fixed address bits (31:20).
pub const MSI_ADDRESS_MASK: u64 = 0xfff0_0000;

const MSI_DEST_SHIFT: u32 = 12;
const MSI_REDIRECTION_HINT: u64 = 1 << 3;
const MSI_DEST_MODE_LOGICAL: u64 = 1 << 2;
const MSI_DATA_LEVEL_ASSERT: u32 = 1 << 14;
const MSI_DATA_TRIGGER_LEVEL: u32 = 1 << 15;
const MSI_DATA_DELIVERY_SHIFT: u32 = 8;

/// A message-signalled interrupt as the device writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

impl MsiMessage {
    /// Whether the address lies in the interrupt window (writes elsewhere
    /// are plain memory writes, not interrupts).
    pub fn is_interrupt(&self) -> bool {
        self.address & MSI_ADDRESS_MASK == MSI_ADDRESS_BASE
    }
}

/// Where a device's message-signalled interrupts go (the irqchip).
pub trait MsiSink: Send + Sync {
    /// Deliver the interrupt a device wrote. Writes outside the interrupt
    /// window are dropped (and logged once) by the sink.
    fn signal_msi(&self, msi: MsiMessage);
}

/// A sink that drops every message (devices not wired to an irqchip).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullMsi;

impl MsiSink for NullMsi {
    fn signal_msi(&self, _msi: MsiMessage) {}
}

/// An interrupt on its way to one or more local APICs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InterruptMessage {
    pub vector: u8,
    pub delivery: Delivery,
    pub dest_mode: DestMode,
    /// An APIC ID (physical) or a logical mask; in the xAPIC format (8 bits,
    /// 0xff = broadcast) unless `x2apic_format`.
    pub destination: u32,
    pub x2apic_format: bool,
    pub shorthand: Shorthand,
    pub trigger: TriggerMode,
    /// False only for the legacy INIT level de-assert IPI.
    pub assert: bool,
    /// The vCPU that sent it (IPIs; shorthands are relative to it).
    pub source_vcpu: Option<usize>,
}

/// How the local APIC is to take the interrupt: the union of the modes an
/// IOAPIC entry, an MSI and an ICR can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Delivery {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    ExtInt,
}

impl Delivery {
    /// The 3-bit encoding shared by IOAPIC entries, MSI data and the ICR.
    pub fn bits(self) -> u32 {
        match self {
            Delivery::Fixed => 0,
            Delivery::LowestPriority => 1,
            Delivery::Smi => 2,
            Delivery::Nmi => 4,
            Delivery::Init => 5,
            Delivery::StartUp => 6,
            Delivery::ExtInt => 7,
        }
    }

    /// Decode; 3 is reserved.
    pub fn from_bits(bits: u32) -> Option<Self> {
        Some(match bits & 7 {
            0 => Delivery::Fixed,
            1 => Delivery::LowestPriority,
            2 => Delivery::Smi,
            4 => Delivery::Nmi,
            5 => Delivery::Init,
            6 => Delivery::StartUp,
            7 => Delivery::ExtInt,
            _ => return None,
        })
    }
}

impl InterruptMessage {
    /// A fixed, edge-triggered interrupt to one APIC ID (tests, devices).
    pub fn fixed(vector: u8, apic_id: u8) -> Self {
        InterruptMessage {
            vector,
            delivery: Delivery::Fixed,
            dest_mode: DestMode::Physical,
            destination: u32::from(apic_id),
            x2apic_format: false,
            shorthand: Shorthand::None,
            trigger: TriggerMode::Edge,
            assert: true,
            source_vcpu: None,
        }
    }

    /// Decode an MSI write; `None` when the address is outside the
    /// interrupt window or the delivery mode is reserved.
    pub fn from_msi(msi: MsiMessage) -> Option<Self> {
        if !msi.is_interrupt() {
            return None;
        }
        let delivery = Delivery::from_bits(msi.data >> MSI_DATA_DELIVERY_SHIFT)?;
        let trigger = if msi.data & MSI_DATA_TRIGGER_LEVEL != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        };
        Some(InterruptMessage {
            vector: msi.data as u8,
            delivery,
            dest_mode: if msi.address & MSI_DEST_MODE_LOGICAL != 0 {
                DestMode::Logical
            } else {
                DestMode::Physical
            },
            destination: ((msi.address >> MSI_DEST_SHIFT) & 0xff) as u32,
            x2apic_format: false,
            shorthand: Shorthand::None,
            trigger,
            // Edge messages always assert; level ones say so in bit 14.
            assert: trigger == TriggerMode::Edge || msi.data & MSI_DATA_LEVEL_ASSERT != 0,
            source_vcpu: None,
        })
    }

    /// Encode as an MSI write (what an in-kernel irqchip that takes MSIs is
    /// given). Shorthands have no MSI form: callers resolve them first.
    pub fn to_msi(&self) -> MsiMessage {
        let mut address = MSI_ADDRESS_BASE | (u64::from(self.destination & 0xff) << MSI_DEST_SHIFT);
        if self.dest_mode == DestMode::Logical {
            address |= MSI_DEST_MODE_LOGICAL;
        }
        if self.delivery == Delivery::LowestPriority {
            address |= MSI_REDIRECTION_HINT;
        }
        let mut data = u32::from(self.vector) | (self.delivery.bits() << MSI_DATA_DELIVERY_SHIFT);
        if self.trigger == TriggerMode::Level {
            data |= MSI_DATA_TRIGGER_LEVEL;
        }
        if self.assert {
            data |= MSI_DATA_LEVEL_ASSERT;
        }
        MsiMessage { address, data }
    }
}

impl From<IoapicMessage> for InterruptMessage {
    fn from(m: IoapicMessage) -> Self {
        InterruptMessage {
            vector: m.vector,
            delivery: match m.delivery_mode {
                ioapic::DeliveryMode::Fixed => Delivery::Fixed,
                ioapic::DeliveryMode::LowestPriority => Delivery::LowestPriority,
                ioapic::DeliveryMode::Smi => Delivery::Smi,
                ioapic::DeliveryMode::Nmi => Delivery::Nmi,
                ioapic::DeliveryMode::Init => Delivery::Init,
                ioapic::DeliveryMode::ExtInt => Delivery::ExtInt,
            },
            dest_mode: if m.dest_mode_logical {
                DestMode::Logical
            } else {
                DestMode::Physical
            },
            destination: u32::from(m.destination),
            x2apic_format: false,
            shorthand: Shorthand::None,
            trigger: if m.level_triggered {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            assert: true,
            source_vcpu: None,
        }
    }
}

impl InterruptMessage {
    /// An IPI the local APIC of `vcpu` sent; `None` for the other messages
    /// a LAPIC posts (EOI broadcasts).
    pub fn from_ipi(m: &LapicMessage, vcpu: usize) -> Option<Self> {
        match *m {
            LapicMessage::Ipi {
                vector,
                delivery_mode,
                dest_mode,
                shorthand,
                destination,
                level,
                trigger,
                x2apic,
            } => Some(InterruptMessage {
                vector,
                delivery: match delivery_mode {
                    DeliveryMode::Fixed => Delivery::Fixed,
                    DeliveryMode::LowestPriority => Delivery::LowestPriority,
                    DeliveryMode::Smi => Delivery::Smi,
                    DeliveryMode::Nmi => Delivery::Nmi,
                    DeliveryMode::Init => Delivery::Init,
                    DeliveryMode::StartUp => Delivery::StartUp,
                },
                dest_mode,
                destination,
                x2apic_format: x2apic,
                shorthand,
                trigger,
                assert: level,
                source_vcpu: Some(vcpu),
            }),
            LapicMessage::Eoi { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn msi_decodes_per_the_sdm() {
        // Destination 3, physical, vector 0x41, fixed, edge.
        let m = InterruptMessage::from_msi(MsiMessage {
            address: 0xfee0_3000,
            data: 0x41,
        })
        .unwrap();
        assert_eq!(m, InterruptMessage::fixed(0x41, 3));
        // Logical, NMI.
        let m = InterruptMessage::from_msi(MsiMessage {
            address: 0xfee0_1004,
            data: 0x400,
        })
        .unwrap();
        assert_eq!(m.dest_mode, DestMode::Logical);
        assert_eq!(m.delivery, Delivery::Nmi);
        // Outside the window: not an interrupt.
        assert_eq!(
            InterruptMessage::from_msi(MsiMessage {
                address: 0x1000,
                data: 0x41
            }),
            None
        );
        // Reserved delivery mode 3.
        assert_eq!(
            InterruptMessage::from_msi(MsiMessage {
                address: MSI_ADDRESS_BASE,
                data: 0x341
            }),
            None
        );
    }

    proptest! {
        /// Every MSI the window accepts survives decode → encode, except the
        /// bits that carry nothing (redirection hint of non-lowest-priority
        /// messages, reserved address and data bits).
        #[test]
        fn msi_round_trips(dest in 0u64..256, logical: bool, vector: u8,
                           mode in prop::sample::select(vec![0u32, 1, 2, 4, 5, 6, 7]),
                           level: bool, assert: bool) {
            let address = MSI_ADDRESS_BASE | dest << 12 | if logical { 4 } else { 0 }
                | if mode == 1 { 8 } else { 0 };
            let data = u32::from(vector) | mode << 8 | u32::from(level) << 15
                | u32::from(assert || !level) << 14;
            let msi = MsiMessage { address, data };
            let m = InterruptMessage::from_msi(msi).unwrap();
            prop_assert_eq!(m.to_msi(), msi);
        }
    }
}
