//! The machine's interrupt controllers behind one trait, [`IrqChip`]:
//! duet's own models ([`userspace::UserspaceIrqChip`], both backends) or
//! KVM's in-kernel ones ([`kernel::KernelIrqChip`], KVM only). This module
//! is the only place that knows which one a machine uses; the machine
//! builder, the run loop and the devices see the trait.
//!
//! ```text
//! device IrqLine ──► SharedLine (wired-OR per GSI) ──► chip input (PIC/IOAPIC pin, or KVM GSI)
//! device MSI ──────► MsiSink ──► InterruptMessage ──► local APIC(s)      (or KVM_SIGNAL_MSI)
//! IOAPIC entry, LAPIC ICR ──► InterruptMessage ──► local APIC(s)
//! LAPIC ──pending──► IrqChip::service ──inject_interrupt / window──► Vcpu
//! ```
//!
//! Interrupt lines are numbered as ACPI GSIs on a PC: 0–15 are the ISA
//! IRQs (each reaches the 8259 pair and the IOAPIC, with IRQ0 on IOAPIC
//! pin 2), 16–23 are IOAPIC pins for PCI INTx (level-triggered,
//! active-low). Every device gets its own source on a line; the line is
//! the OR of its sources, so devices can share one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use devices::interrupt::{InterruptMessage, MsiSink};
use devices::{BusKind, Clock, IrqLine, SharedDevice, TimeTaint, Timed};

use crate::backend::{self, IrqchipKind, MsrResult, Vcpu};

pub mod kernel;
pub mod userspace;

/// An interrupt signal a chip's inputs saw: a line's new level (the OR of
/// its sources), or an MSI write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineEvent {
    Line { gsi: u32, level: bool },
    Msi { address: u64, data: u32 },
}

/// The interrupt signals a chip's inputs saw, in order, while watched
/// (device traces write them; their replay compares them one by one).
#[derive(Default)]
pub struct LineWatch {
    on: AtomicBool,
    seen: Mutex<Vec<LineEvent>>,
}

impl LineWatch {
    /// Start noting signals.
    pub fn enable(&self) {
        self.on.store(true, Ordering::Relaxed);
    }

    pub fn note(&self, e: LineEvent) {
        if self.on.load(Ordering::Relaxed) {
            lock(&self.seen).push(e);
        }
    }

    /// The signals noted since the last call.
    pub fn take(&self) -> Vec<LineEvent> {
        if !self.on.load(Ordering::Relaxed) {
            return Vec::new();
        }
        std::mem::take(&mut *lock(&self.seen))
    }
}

/// IOAPIC pin for ISA IRQ `irq` (the usual IRQ0 → GSI 2 override).
pub fn isa_to_gsi(irq: u8) -> usize {
    if irq == 0 {
        2
    } else {
        usize::from(irq)
    }
}

/// First GSI of the PCI INTx lines (IOAPIC pins 16–19).
pub const PCI_GSI_BASE: u32 = 16;
/// Number of PCI INTx lines (INTA#–INTD# after the swizzle).
pub const PCI_GSI_COUNT: u32 = 4;

/// The GSI of INTx pin `pin` (1 = INTA#) of the device in `slot` on bus 0:
/// the usual swizzle over four lines, as in the `_PRT` of the DSDT.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_GSI_BASE + (u32::from(slot) + u32::from(pin.max(1)) - 1) % PCI_GSI_COUNT
}

pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wakes the VMM when an interrupt may have become deliverable.
#[derive(Default)]
pub struct Waker {
    attention: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Waker {
    pub fn notify(&self) {
        self.attention.store(true, Ordering::Release);
        let _g = lock(&self.lock);
        self.cv.notify_all();
    }

    /// Cheap check the `Platform` makes after each access.
    pub fn pending(&self) -> bool {
        self.attention.load(Ordering::Acquire)
    }

    pub fn clear(&self) {
        self.attention.store(false, Ordering::Release);
    }

    /// Sleep until notified or `timeout` passes (None: until notified).
    pub fn wait(&self, timeout: Option<Duration>) {
        let g = lock(&self.lock);
        if self.attention.load(Ordering::Acquire) {
            return;
        }
        match timeout {
            Some(t) => drop(
                self.cv
                    .wait_timeout(g, t)
                    .unwrap_or_else(|e| e.into_inner()),
            ),
            None => drop(self.cv.wait(g).unwrap_or_else(|e| e.into_inner())),
        }
    }
}

/// A register block the chip puts on a bus.
pub struct ChipDevice {
    pub name: &'static str,
    pub bus: BusKind,
    pub base: u64,
    pub len: u64,
    pub device: SharedDevice,
}

/// What a halted vCPU does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HaltWait {
    /// The VMM waits (until a timer deadline or an interrupt) and injects.
    InVmm,
    /// The backend waits in the kernel: run the vCPU again.
    InBackend,
}

/// What the chip needs to build its models.
pub struct ChipConfig {
    pub vcpus: usize,
    pub clock: Arc<dyn Clock>,
    pub taint: TimeTaint,
    /// The local APIC timer's input clock.
    pub lapic_timer_hz: u64,
    /// The guest's TSC frequency.
    pub tsc_hz: u64,
    /// The guest's TSC as the backend runs it, when it is not the VM clock
    /// at `tsc_hz` (KVM: the hardware TSC plus KVM's offset); the local
    /// APICs' TSC-deadline timers compare against it.
    pub guest_tsc: Option<Arc<dyn devices::TscSource>>,
    /// The guest's MAXPHYADDR (the backend's [`backend::Backend::phys_addr_bits`]).
    pub phys_addr_bits: u32,
}

/// The machine's interrupt controllers.
pub trait IrqChip: Send + Sync {
    /// "userspace" or "kernel", for messages and `--stats`.
    fn name(&self) -> &'static str;

    /// A new source on interrupt line `gsi` (see the module doc for the
    /// numbering); the line is the wired-OR of its sources.
    fn irq_line(&self, gsi: u32) -> Box<dyn IrqLine>;

    /// Where devices send their MSI/MSI-X writes.
    fn msi_sink(&self) -> Arc<dyn MsiSink>;

    /// The chip's record of line changes and MSIs (device traces); none
    /// when the chip cannot see them (KVM's in-kernel chip takes them as
    /// irqfd/ioctl calls it does not report back).
    fn line_watch(&self) -> Option<Arc<LineWatch>> {
        None
    }

    /// The gate in front of the PIT's IRQ0 that the HPET's legacy
    /// replacement closes (the machine puts the RTC's IRQ8 behind it too);
    /// None when the chip cannot give IRQ0 to another device (KVM's
    /// in-kernel PIT owns it), so the HPET offers no legacy replacement.
    fn legacy_timer_gate(&self) -> Option<Arc<devices::irq::IrqGate>> {
        None
    }

    /// Deliver an interrupt message to the local APIC(s) it names.
    fn deliver(&self, msg: InterruptMessage);

    /// The register blocks to map (controllers and the PIT that belong to
    /// this chip); none when the kernel serves them.
    fn bus_devices(&self) -> Vec<ChipDevice>;

    /// The chip's timers (PIT, local APIC timers), for the machine's timer
    /// list.
    fn timed(&self) -> Vec<Arc<Mutex<dyn Timed + Send>>>;

    /// The chip's device models, with their types, for the machine's
    /// device list (none when the kernel serves them).
    fn devices(&self) -> Vec<crate::state::MachineDevice> {
        Vec::new()
    }

    /// Carry queued messages (EOI broadcasts, IPIs) to their targets.
    /// Called after guest accesses and timer advances; cheap when idle.
    fn pump(&self);

    /// Something may have become deliverable since the last
    /// [`IrqChip::service`] (checked after every access).
    fn attention(&self) -> bool;

    /// Hand vCPU `vcpu_id` its highest pending interrupt, or ask for an
    /// interrupt window. Returns true when something was injected.
    fn service(&self, vcpu_id: usize, vcpu: &mut dyn Vcpu) -> backend::Result<bool>;

    /// Is an NMI waiting for `vcpu_id` (it wakes a CPU with IF clear)?
    fn nmi_pending(&self, vcpu_id: usize) -> bool;

    /// Who waits while a vCPU is halted.
    fn halt_wait(&self) -> HaltWait;

    /// Sleep until an interrupt may be deliverable or `timeout` passes.
    fn wait(&self, timeout: Duration);

    /// How often a backend that waits in the kernel is kicked so the VMM
    /// notices a guest that stopped (None: at timer deadlines only).
    fn kick_period(&self) -> Option<Duration>;

    /// Wake a VMM sleeping in [`IrqChip::wait`] (host input arrived for a
    /// device; the VMM polls it, then looks at interrupts again).
    fn wake(&self) {}

    /// RDMSR of a machine MSR (the local APIC's) for `vcpu_id`.
    fn msr_read(&self, _vcpu_id: usize, _msr: u32) -> MsrResult {
        MsrResult::Unhandled
    }

    /// WRMSR counterpart of [`IrqChip::msr_read`].
    fn msr_write(&self, _vcpu_id: usize, _msr: u32, _value: u64) -> MsrResult {
        MsrResult::Unhandled
    }

    /// The VM clock's TSC as `vcpu_id`'s local APIC sees it, when the
    /// chip's models own time.
    fn tsc(&self, _vcpu_id: usize) -> Option<u64> {
        None
    }

    /// `vcpu_id`'s task priority (CR8 is TPR bits 7:4), when the chip's
    /// LAPIC models own it.
    fn tpr(&self, _vcpu_id: usize) -> Option<u8> {
        None
    }

    /// Write `vcpu_id`'s task priority (a MOV to CR8); false when the
    /// chip does not own it.
    fn set_tpr(&self, _vcpu_id: usize, _tpr: u8) -> bool {
        false
    }

    /// Where `vcpu_id`'s xAPIC page must be mapped, when the chip's
    /// device list maps it (its [`ChipDevice`] named `lapic`): `Some(None)`
    /// while that APIC is globally disabled or in x2APIC mode. `None` when
    /// the chip places the page itself (KVM's).
    fn xapic_page(&self, _vcpu_id: usize) -> Option<Option<u64>> {
        None
    }
}

/// The name of the chip device that is the xAPIC page (see
/// [`IrqChip::xapic_page`]).
pub const XAPIC_DEVICE: &str = "lapic";

/// Errors building a chip.
#[derive(Debug, thiserror::Error)]
pub enum IrqChipError {
    #[error("--irqchip kernel: the backend offers no in-kernel interrupt controllers")]
    NoKernelChip,
}

/// Build the chip `kind` for a VM on `backend`.
pub fn create(
    kind: IrqchipKind,
    backend: &dyn backend::Backend,
    cfg: ChipConfig,
) -> Result<Arc<dyn IrqChip>, IrqChipError> {
    Ok(match kind {
        IrqchipKind::Userspace => userspace::UserspaceIrqChip::create(cfg),
        IrqchipKind::Kernel => {
            let lines = backend.irq_sink().ok_or(IrqChipError::NoKernelChip)?;
            kernel::KernelIrqChip::create(lines)
        }
    })
}
