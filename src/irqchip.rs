//! The one interrupt-delivery path both backends use (userspace irqchip):
//!
//! ```text
//! device IrqLine ──► IsaIrq ──┬──► 8259 PIC pair (ISA IRQ 0-15) ──INTR──► LAPIC LINT0 (ExtINT)
//!                             └──► IOAPIC pin (IRQ0 → pin 2) ──message──► LAPIC (fixed/NMI/ExtINT)
//! LAPIC ──pending_interrupt──► VMM ──inject_interrupt / request_interrupt_window──► Vcpu
//! LAPIC EOI of a level vector ──message──► IOAPIC end_of_interrupt
//! ```
//!
//! Models never call each other: the PIC drives an `IrqLine` (its INTR pin)
//! that this module wires to the LAPIC; the IOAPIC and the LAPIC queue
//! messages that [`IrqRouter::pump`] carries across. Lock order: a device →
//! PIC → LAPIC, and IOAPIC → (released) → LAPIC; the LAPIC never locks
//! anything, so no cycle exists.
//!
//! Whenever something may have made an interrupt deliverable, the router
//! raises `attention`, which the VMM's `IoHandler::exit_requested` reports
//! so the vCPU comes back to have it injected, and wakes a halted vCPU.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use devices::ioapic::{DeliveryMode as IoDelivery, Ioapic, IoapicMessage};
use devices::lapic::{
    DeliveryMode as ApicDelivery, InterruptRequest, Lapic, LapicMessage, Shorthand,
};
use devices::pic8259::Pic8259Pair;
use devices::IrqLine;

/// IOAPIC pin for ISA IRQ `irq` (the usual IRQ0 → GSI 2 override).
pub fn isa_to_gsi(irq: u8) -> usize {
    if irq == 0 {
        2
    } else {
        usize::from(irq)
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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

    /// Cheap check the `IoHandler` makes after each access.
    pub fn pending(&self) -> bool {
        self.attention.load(Ordering::Acquire)
    }

    pub fn clear(&self) {
        self.attention.store(false, Ordering::Release);
    }

    /// Sleep until notified or `timeout` passes (None: until notified).
    pub fn wait(&self, timeout: Option<std::time::Duration>) {
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

/// The userspace interrupt controllers of a single-vCPU machine.
pub struct IrqRouter {
    pub pic: Arc<Mutex<Pic8259Pair>>,
    pub ioapic: Arc<Mutex<Ioapic>>,
    pub lapic: Arc<Mutex<Lapic>>,
    pub waker: Arc<Waker>,
    /// The VMM has seen the LAPIC's pending interrupt (it injected it or
    /// asked for an interrupt window), so a running vCPU need not come back
    /// for it. See [`IrqRouter::pump`].
    vmm_saw_pending: AtomicBool,
}

/// The PIC's INTR output, wired to LINT0 of the local APIC.
struct PicIntrToLint0 {
    lapic: Arc<Mutex<Lapic>>,
    waker: Arc<Waker>,
}

impl IrqLine for PicIntrToLint0 {
    fn set_level(&self, level: bool) {
        lock(&self.lapic).set_lint0(level);
        if level {
            self.waker.notify();
        }
    }
}

impl IrqRouter {
    pub fn new(pic: Pic8259Pair, ioapic: Ioapic, lapic: Lapic) -> Arc<Self> {
        let r = Arc::new(IrqRouter {
            pic: Arc::new(Mutex::new(pic)),
            ioapic: Arc::new(Mutex::new(ioapic)),
            lapic: Arc::new(Mutex::new(lapic)),
            waker: Arc::new(Waker::default()),
            vmm_saw_pending: AtomicBool::new(false),
        });
        lock(&r.pic).set_intr_line(Box::new(PicIntrToLint0 {
            lapic: r.lapic.clone(),
            waker: r.waker.clone(),
        }));
        r
    }

    /// Drive ISA IRQ `irq` (0–15) on both the PIC and the IOAPIC.
    pub fn set_isa_irq(&self, irq: u8, level: bool) {
        lock(&self.pic).set_irq(irq, level);
        self.set_ioapic_pin(isa_to_gsi(irq), level);
    }

    /// Drive IOAPIC pin `gsi` only (PCI interrupts, later).
    pub fn set_ioapic_pin(&self, gsi: usize, level: bool) {
        let msgs = {
            let mut io = lock(&self.ioapic);
            io.set_irq(gsi, level);
            io.take_messages()
        };
        if !msgs.is_empty() {
            self.deliver_ioapic(msgs);
        }
    }

    fn deliver_ioapic(&self, msgs: Vec<IoapicMessage>) {
        let mut any = false;
        {
            let mut l = lock(&self.lapic);
            for m in msgs {
                let dest = if m.dest_mode_logical {
                    devices::lapic::DestMode::Logical
                } else {
                    devices::lapic::DestMode::Physical
                };
                if !l.matches_destination(u32::from(m.destination), dest, false) {
                    continue;
                }
                any |= match m.delivery_mode {
                    IoDelivery::Fixed | IoDelivery::LowestPriority => {
                        l.accept(m.vector, m.level_triggered)
                    }
                    IoDelivery::Nmi => l.accept_nmi(),
                    IoDelivery::ExtInt => l.accept_extint(),
                    IoDelivery::Smi | IoDelivery::Init => false,
                };
            }
        }
        if any {
            self.waker.notify();
        }
    }

    /// Carry LAPIC and IOAPIC messages (EOI broadcasts, IPIs, deliveries
    /// caused by an unmask) to their targets. Call after guest accesses to
    /// the interrupt controllers and after timers advance.
    ///
    /// Then, if the LAPIC has an interrupt to deliver that the VMM has not
    /// seen (an EOI or a TPR write uncovered one, or an IPI arrived), wake
    /// the VMM: a running vCPU comes back at the next instruction boundary
    /// to have it injected.
    pub fn pump(&self) {
        self.carry_messages();
        let pending = lock(&self.lapic).pending_interrupt().is_some();
        if pending && !self.vmm_saw_pending.load(Ordering::Acquire) {
            self.waker.notify();
        }
    }

    /// Record whether the VMM has dealt with what the LAPIC holds (see
    /// [`IrqRouter::pump`]): true after it injected an interrupt and asked
    /// for a window for the next one, or asked for a window.
    pub fn set_vmm_saw_pending(&self, saw: bool) {
        self.vmm_saw_pending.store(saw, Ordering::Release);
    }

    fn carry_messages(&self) {
        let io_msgs = {
            let mut io = lock(&self.ioapic);
            if io.has_messages() {
                io.take_messages()
            } else {
                Vec::new()
            }
        };
        if !io_msgs.is_empty() {
            self.deliver_ioapic(io_msgs);
        }
        loop {
            let msgs = lock(&self.lapic).take_messages();
            if msgs.is_empty() {
                return;
            }
            for m in msgs {
                match m {
                    LapicMessage::Eoi { vector } => {
                        let out = {
                            let mut io = lock(&self.ioapic);
                            io.end_of_interrupt(vector);
                            io.take_messages()
                        };
                        if !out.is_empty() {
                            self.deliver_ioapic(out);
                        }
                    }
                    LapicMessage::Ipi {
                        vector,
                        delivery_mode,
                        dest_mode,
                        shorthand,
                        destination,
                        level,
                        trigger,
                        x2apic,
                    } => {
                        let mut l = lock(&self.lapic);
                        let to_self = match shorthand {
                            Shorthand::SelfOnly | Shorthand::AllIncludingSelf => true,
                            Shorthand::AllExcludingSelf => false,
                            Shorthand::None => {
                                l.matches_destination(destination, dest_mode, x2apic)
                            }
                        };
                        if !to_self || !level && delivery_mode == ApicDelivery::Init {
                            continue;
                        }
                        let accepted = match delivery_mode {
                            ApicDelivery::Fixed | ApicDelivery::LowestPriority => {
                                l.accept(vector, trigger == devices::lapic::TriggerMode::Level)
                            }
                            ApicDelivery::Nmi => l.accept_nmi(),
                            // One vCPU: INIT/SIPI to self have nothing to start.
                            _ => false,
                        };
                        drop(l);
                        if accepted {
                            self.waker.notify();
                        }
                    }
                }
            }
        }
    }

    /// The interrupt to inject next, acknowledged (IRR → ISR, or the PIC's
    /// INTA cycle for ExtINT), or `None`. Call only when the vCPU can take it.
    pub fn acknowledge(&self) -> Option<Delivery> {
        let req = lock(&self.lapic).pending_interrupt()?;
        let got = lock(&self.lapic).acknowledge(req);
        Some(match got {
            InterruptRequest::Fixed(v) => Delivery::Vector(v),
            InterruptRequest::Nmi => Delivery::Nmi,
            InterruptRequest::ExtInt => Delivery::Vector(lock(&self.pic).acknowledge()),
        })
    }

    /// Is an interrupt (or NMI) waiting in the LAPIC?
    pub fn pending(&self) -> Option<InterruptRequest> {
        lock(&self.lapic).pending_interrupt()
    }
}

/// What [`IrqRouter::acknowledge`] hands to the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    Vector(u8),
    Nmi,
}

/// A device's ISA interrupt output, wired to the PIC and the IOAPIC.
pub struct IsaIrq {
    pub router: Arc<IrqRouter>,
    pub irq: u8,
}

impl IrqLine for IsaIrq {
    fn set_level(&self, level: bool) {
        self.router.set_isa_irq(self.irq, level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::{ManualClock, TimeTaint};

    fn router() -> Arc<IrqRouter> {
        let clock = Arc::new(ManualClock::new());
        let lapic = Lapic::new(
            0,
            true,
            clock,
            TimeTaint::new(),
            1_000_000_000,
            1_000_000_000,
        );
        IrqRouter::new(Pic8259Pair::new(), Ioapic::new(), lapic)
    }

    fn init_pic(r: &IrqRouter) {
        let mut p = lock(&r.pic);
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 4),
            (0x21, 1),
            (0xa0, 0x11),
            (0xa1, 0x28),
            (0xa1, 2),
            (0xa1, 1),
            (0x21, 0xfe),
            (0xa1, 0xff),
        ] {
            p.write_port(port, v);
        }
    }

    #[test]
    fn pic_interrupt_reaches_the_cpu_through_lint0_extint() {
        let r = router();
        init_pic(&r);
        assert_eq!(r.acknowledge(), None);
        r.set_isa_irq(0, true);
        assert!(r.waker.pending());
        assert_eq!(r.acknowledge(), Some(Delivery::Vector(0x20)));
        r.set_isa_irq(0, false);
        // In service until EOI: nothing more.
        assert_eq!(r.acknowledge(), None);
    }

    fn enable_lapic(r: &IrqRouter) {
        use devices::BusDevice;
        lock(&r.lapic).write(0xf0, &0x1ffu32.to_le_bytes());
    }

    #[test]
    fn unmasking_an_asserted_ioapic_pin_through_its_registers_wakes_the_vmm() {
        use devices::BusDevice;
        let r = router();
        enable_lapic(&r);
        {
            let mut io = lock(&r.ioapic);
            let mut w = |reg: u32, v: u32| {
                io.write(0, &reg.to_le_bytes());
                io.write(0x10, &v.to_le_bytes());
            };
            // Pin 5, level-triggered, vector 0x45, masked.
            w(0x10 + 2 * 5, 0x45 | (1 << 15) | (1 << 16));
            w(0x11 + 2 * 5, 0);
        }
        r.set_ioapic_pin(5, true);
        r.pump();
        r.waker.clear();
        assert_eq!(r.pending(), None);
        // The guest unmasks it with an MMIO write: the bus reaches the
        // IOAPIC directly, then the VMM pumps.
        {
            let mut io = lock(&r.ioapic);
            io.write(0, &(0x10u32 + 2 * 5).to_le_bytes());
            io.write(0x10, &(0x45u32 | (1 << 15)).to_le_bytes());
        }
        r.pump();
        assert!(r.waker.pending(), "the VMM must come back for it");
        assert_eq!(r.acknowledge(), Some(Delivery::Vector(0x45)));
    }

    #[test]
    fn eoi_or_tpr_uncovering_a_pending_vector_wakes_the_vmm_once() {
        use devices::BusDevice;
        let r = router();
        enable_lapic(&r);
        // TPR 0x40 holds vector 0x31 back.
        lock(&r.lapic).write(0x80, &0x40u32.to_le_bytes());
        assert!(lock(&r.lapic).accept(0x31, false));
        r.waker.clear();
        r.pump();
        assert!(!r.waker.pending());
        r.set_vmm_saw_pending(false);
        // Lowering the TPR makes it deliverable: the VMM is woken.
        lock(&r.lapic).write(0x80, &0u32.to_le_bytes());
        r.pump();
        assert!(r.waker.pending());
        // Once the VMM has seen it (asked for a window), no more wake-ups.
        r.waker.clear();
        r.set_vmm_saw_pending(true);
        r.pump();
        assert!(!r.waker.pending());
        // An EOI uncovering a lower vector: 0x51 in service, 0x41 waits.
        r.set_vmm_saw_pending(false);
        assert_eq!(r.acknowledge(), Some(Delivery::Vector(0x31)));
        lock(&r.lapic).write(0xb0, &0u32.to_le_bytes());
        assert!(lock(&r.lapic).accept(0x51, false));
        assert_eq!(r.acknowledge(), Some(Delivery::Vector(0x51)));
        assert!(lock(&r.lapic).accept(0x41, false));
        r.waker.clear();
        r.pump();
        assert!(!r.waker.pending(), "0x41 is below the vector in service");
        lock(&r.lapic).write(0xb0, &0u32.to_le_bytes());
        r.pump();
        assert!(r.waker.pending(), "the EOI uncovered 0x41");
        assert_eq!(r.acknowledge(), Some(Delivery::Vector(0x41)));
    }

    #[test]
    fn ioapic_level_interrupt_is_redelivered_after_eoi_while_asserted() {
        let r = router();
        // Mask the PIC entirely, route pin 4 level-triggered to vector 0x41.
        {
            let mut p = lock(&r.pic);
            p.write_port(0x21, 0xff);
            p.write_port(0xa1, 0xff);
        }
        {
            use devices::BusDevice;
            let mut io = lock(&r.ioapic);
            let mut w = |reg: u32, v: u32| {
                io.write(0, &reg.to_le_bytes());
                io.write(0x10, &v.to_le_bytes());
            };
            w(0x10 + 2 * 4, 0x41 | (1 << 15));
            w(0x11 + 2 * 4, 0);
        }
        {
            use devices::BusDevice;
            // Software-enable the LAPIC.
            lock(&r.lapic).write(0xf0, &0x1ffu32.to_le_bytes());
        }
        r.set_isa_irq(4, true);
        assert_eq!(r.acknowledge(), Some(Delivery::Vector(0x41)));
        assert_eq!(r.acknowledge(), None);
        // EOI from the guest: the LAPIC broadcasts it, the IOAPIC redelivers.
        {
            use devices::BusDevice;
            lock(&r.lapic).write(0xb0, &0u32.to_le_bytes());
        }
        r.pump();
        assert_eq!(r.acknowledge(), Some(Delivery::Vector(0x41)));
        // Line drops, EOI: nothing more.
        r.set_isa_irq(4, false);
        {
            use devices::BusDevice;
            lock(&r.lapic).write(0xb0, &0u32.to_le_bytes());
        }
        r.pump();
        assert_eq!(r.acknowledge(), None);
    }
}
