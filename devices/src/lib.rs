//! Device models and the buses that carry guest accesses to them.
//!
//! This crate knows nothing of KVM or of the interpreter. Devices see guest
//! accesses through [`bus::BusDevice`], raise interrupts through an abstract
//! [`irq::IrqLine`], and ask for VM-level actions (reset, power off, debug
//! exit) through a [`vm_control::VmControl`] handle.

pub mod acpi_pm;
pub mod bus;
pub mod clock;
pub mod debug_exit;
pub mod dma;
pub mod e1000;
pub mod guest_memory;
pub mod hpet;
pub mod i8042;
pub mod inet;
pub mod interrupt;
pub mod ioapic;
pub mod irq;
pub mod lapic;
pub mod pci;
pub mod pic8259;
pub mod pit8254;
pub mod post_code;
pub mod ratelimit;
pub mod reset_control;
pub mod rtc_cmos;
pub mod state;
pub mod uart16550;
pub mod virtio;
pub mod vm_control;

pub use bus::{Bus, BusAccess, BusDevice, BusError, BusKind, DeviceId, SharedDevice};
pub use clock::{Clock, ClockTsc, ManualClock, TimeTaint, Timed, TscSource};
pub use irq::{IrqLine, NullIrq};
pub use vm_control::{VmAction, VmControl};
