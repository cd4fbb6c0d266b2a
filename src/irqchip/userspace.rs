//! duet's own interrupt controllers: the 8259 pair, the IOAPIC, one local
//! APIC per vCPU (in a `Vec`) and the PIT, on both backends.
//!
//! Models never call each other: the PIC drives an `IrqLine` (its INTR
//! pin) wired to LINT0 of the bootstrap processor's LAPIC; the IOAPIC and
//! the LAPICs queue messages that [`UserspaceIrqChip::pump`] turns into
//! [`InterruptMessage`]s and delivers. Lock order: a device → PIC → LAPIC,
//! and IOAPIC → (released) → LAPIC; a LAPIC never locks anything, so no
//! cycle exists.
//!
//! Whenever something may have made an interrupt deliverable, the chip
//! raises `attention` (the `Platform` reports it so the vCPU comes back
//! to have it injected) and wakes a halted vCPU.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::interrupt::{Delivery, InterruptMessage, MsiMessage, MsiSink, Shorthand, TriggerMode};
use devices::ioapic::Ioapic;
use devices::irq::SharedLine;
use devices::lapic::{InterruptRequest, Lapic, LapicMessage};
use devices::pic8259::{self, Pic8259Pair};
use devices::pit8254::{self, Pit8254};
use devices::ratelimit::LogOnce;
use devices::{BusAccess, BusDevice, BusKind, IrqLine, Timed};

use super::{
    isa_to_gsi, lock, ChipConfig, ChipDevice, HaltWait, IrqChip, LineEvent, LineWatch, Waker,
    PCI_GSI_BASE,
};
use crate::backend::{self, MsrResult, Vcpu};
use crate::layout::{self, ports};

/// Number of interrupt lines: the IOAPIC's pins.
const LINES: usize = devices::ioapic::NUM_PINS;

/// The controllers and their wiring.
pub struct Controllers {
    pub pic: Arc<Mutex<Pic8259Pair>>,
    pub ioapic: Arc<Mutex<Ioapic>>,
    pub lapics: Vec<Arc<Mutex<Lapic>>>,
    pub waker: Arc<Waker>,
    /// Per vCPU: the VMM has seen its LAPIC's pending interrupt (injected
    /// it or asked for an interrupt window), so a running vCPU need not
    /// come back for it. See [`Controllers::pump`].
    vmm_saw_pending: Vec<std::sync::atomic::AtomicBool>,
    unsupported: LogOnce,
    /// Line changes and MSIs, for device traces.
    watch: Arc<LineWatch>,
}

/// duet's interrupt controllers and PIT.
pub struct UserspaceIrqChip {
    c: Arc<Controllers>,
    lines: Vec<Arc<SharedLine>>,
    pit: Arc<Mutex<Pit8254>>,
    legacy_gate: Arc<devices::irq::IrqGate>,
}

/// The PIC's INTR output, wired to LINT0 of the bootstrap processor.
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

impl Controllers {
    /// Drive input `gsi`: ISA IRQs reach the PIC and the IOAPIC, PCI lines
    /// (active-low on the wire) the IOAPIC only.
    fn set_line(&self, gsi: usize, asserted: bool) {
        if gsi < 16 {
            lock(&self.pic).set_irq(gsi as u8, asserted);
            self.set_ioapic_pin(isa_to_gsi(gsi as u8), asserted);
        } else {
            self.set_ioapic_pin(gsi, !asserted);
        }
    }

    fn set_ioapic_pin(&self, pin: usize, electrical_level: bool) {
        let msgs = {
            let mut io = lock(&self.ioapic);
            io.set_irq(pin, electrical_level);
            io.take_messages()
        };
        for m in msgs {
            self.deliver(m.into());
        }
    }

    /// Does `msg` reach the LAPIC of vCPU `i`?
    fn reaches(&self, msg: &InterruptMessage, i: usize, lapic: &Lapic) -> bool {
        match msg.shorthand {
            Shorthand::SelfOnly => msg.source_vcpu == Some(i),
            Shorthand::AllIncludingSelf => true,
            Shorthand::AllExcludingSelf => msg.source_vcpu != Some(i),
            Shorthand::None => {
                lapic.matches_destination(msg.destination, msg.dest_mode, msg.x2apic_format)
            }
        }
    }

    fn deliver(&self, msg: InterruptMessage) {
        let mut any = false;
        for (i, l) in self.lapics.iter().enumerate() {
            let mut l = lock(l);
            if !self.reaches(&msg, i, &l) {
                continue;
            }
            any |= match msg.delivery {
                Delivery::Fixed | Delivery::LowestPriority => {
                    l.accept(msg.vector, msg.trigger == TriggerMode::Level)
                }
                Delivery::Nmi => l.accept_nmi(),
                Delivery::ExtInt => l.accept_extint(),
                Delivery::Init | Delivery::StartUp | Delivery::Smi => {
                    // One vCPU so far: INIT/SIPI to self start nothing, SMM
                    // is not modelled.
                    if msg.assert && self.unsupported.first() {
                        log::info!(
                            "irqchip: {:?} message ignored (not modelled; logged once)",
                            msg.delivery
                        );
                    }
                    false
                }
            };
            // Lowest priority goes to one LAPIC: the first that matches.
            if msg.delivery == Delivery::LowestPriority && msg.shorthand == Shorthand::None {
                break;
            }
        }
        if any {
            self.waker.notify();
        }
    }

    /// Carry IOAPIC and LAPIC messages (deliveries caused by an unmask,
    /// EOI broadcasts, IPIs) to their targets; then, if a LAPIC has an
    /// interrupt to deliver that the VMM has not seen (an EOI or a TPR
    /// write uncovered one, or an IPI arrived), wake the VMM: a running
    /// vCPU comes back at the next instruction boundary to have it
    /// injected.
    fn pump(&self) {
        self.carry_messages();
        for (i, lapic) in self.lapics.iter().enumerate() {
            let pending = lock(lapic).pending_interrupt().is_some();
            if pending && !self.vmm_saw_pending[i].load(std::sync::atomic::Ordering::Acquire) {
                self.waker.notify();
            }
        }
    }

    fn set_vmm_saw_pending(&self, vcpu: usize, saw: bool) {
        if let Some(f) = self.vmm_saw_pending.get(vcpu) {
            f.store(saw, std::sync::atomic::Ordering::Release);
        }
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
        for m in io_msgs {
            self.deliver(m.into());
        }
        for (i, lapic) in self.lapics.iter().enumerate() {
            loop {
                let msgs = lock(lapic).take_messages();
                if msgs.is_empty() {
                    break;
                }
                for m in msgs {
                    match m {
                        LapicMessage::Eoi { vector } => {
                            let out = {
                                let mut io = lock(&self.ioapic);
                                io.end_of_interrupt(vector);
                                io.take_messages()
                            };
                            for m in out {
                                self.deliver(m.into());
                            }
                        }
                        ipi => {
                            if let Some(msg) = InterruptMessage::from_ipi(&ipi, i) {
                                self.deliver(msg);
                            }
                        }
                    }
                }
            }
        }
    }
}

impl MsiSink for Controllers {
    fn signal_msi(&self, msi: MsiMessage) {
        self.watch.note(LineEvent::Msi {
            address: msi.address,
            data: msi.data,
        });
        match InterruptMessage::from_msi(msi) {
            Some(m) => self.deliver(m),
            None => {
                if self.unsupported.first() {
                    log::warn!(
                        "irqchip: MSI write of {:#x} to {:#x} is not an interrupt: dropped (logged once)",
                        msi.data,
                        msi.address
                    );
                }
            }
        }
    }
}

/// The local APIC page at 0xfee00000: each vCPU reaches its own LAPIC.
struct LapicPage {
    lapics: Vec<Arc<Mutex<Lapic>>>,
}

impl BusDevice for LapicPage {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.lapics[0]).read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.lapics[0]).write(offset, data);
    }
    fn read_access(&mut self, a: &BusAccess, data: &mut [u8]) {
        match self.lapics.get(a.vcpu) {
            Some(l) => lock(l).read(a.offset, data),
            None => data.fill(0xff),
        }
    }
    fn write_access(&mut self, a: &BusAccess, data: &[u8]) {
        if let Some(l) = self.lapics.get(a.vcpu) {
            lock(l).write(a.offset, data);
        }
    }
}

impl UserspaceIrqChip {
    pub fn create(cfg: ChipConfig) -> Arc<dyn IrqChip> {
        Self::build(cfg)
    }

    /// The chip with its concrete type (tests, the state code).
    pub fn build(cfg: ChipConfig) -> Arc<UserspaceIrqChip> {
        let lapics: Vec<Arc<Mutex<Lapic>>> = (0..cfg.vcpus.max(1))
            .map(|id| {
                let mut l = Lapic::new(
                    id as u32,
                    id == 0,
                    cfg.clock.clone(),
                    cfg.taint.clone(),
                    cfg.lapic_timer_hz,
                    cfg.tsc_hz,
                );
                l.set_phys_addr_bits(cfg.phys_addr_bits);
                if let Some(tsc) = &cfg.guest_tsc {
                    l.set_tsc_source(tsc.clone());
                }
                Arc::new(Mutex::new(l))
            })
            .collect();
        let c = Arc::new(Controllers {
            pic: Arc::new(Mutex::new(Pic8259Pair::new())),
            ioapic: Arc::new(Mutex::new(Ioapic::new())),
            vmm_saw_pending: lapics.iter().map(|_| Default::default()).collect(),
            lapics,
            waker: Arc::new(Waker::default()),
            unsupported: LogOnce::new(),
            watch: Arc::new(LineWatch::default()),
        });
        lock(&c.pic).set_intr_line(Box::new(PicIntrToLint0 {
            lapic: c.lapics[0].clone(),
            waker: c.waker.clone(),
        }));
        // PCI lines idle high (active-low, nobody pulling).
        for gsi in PCI_GSI_BASE as usize..LINES {
            lock(&c.ioapic).set_irq(gsi, true);
        }
        let lines: Vec<Arc<SharedLine>> = (0..LINES)
            .map(|gsi| {
                let c = c.clone();
                SharedLine::new(Box::new(move |level| {
                    c.watch.note(LineEvent::Line {
                        gsi: gsi as u32,
                        level,
                    });
                    c.set_line(gsi, level)
                }))
            })
            .collect();
        // The PIT's IRQ0 passes a gate the HPET's legacy replacement closes.
        let legacy_gate = devices::irq::IrqGate::new();
        let pit = Arc::new(Mutex::new(Pit8254::new(
            cfg.clock.clone(),
            Box::new(legacy_gate.line(Box::new(lines[0].source()))),
            cfg.taint.clone(),
        )));
        Arc::new(UserspaceIrqChip {
            c,
            lines,
            pit,
            legacy_gate,
        })
    }

    pub fn controllers(&self) -> &Arc<Controllers> {
        &self.c
    }

    pub fn pit(&self) -> &Arc<Mutex<Pit8254>> {
        &self.pit
    }

    /// The interrupt to inject next into `vcpu_id`, acknowledged (IRR →
    /// ISR, or the PIC's INTA cycle for ExtINT).
    fn acknowledge(&self, vcpu_id: usize) -> Option<Acknowledged> {
        let lapic = self.c.lapics.get(vcpu_id)?;
        let mut l = lock(lapic);
        let req = l.pending_interrupt()?;
        let got = l.acknowledge(req);
        drop(l);
        Some(match got {
            InterruptRequest::Fixed(v) => Acknowledged::Vector(v),
            InterruptRequest::Nmi => Acknowledged::Nmi,
            InterruptRequest::ExtInt => Acknowledged::Vector(lock(&self.c.pic).acknowledge()),
        })
    }

    fn pending(&self, vcpu_id: usize) -> Option<InterruptRequest> {
        self.c
            .lapics
            .get(vcpu_id)
            .and_then(|l| lock(l).pending_interrupt())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Acknowledged {
    Vector(u8),
    Nmi,
}

impl IrqChip for UserspaceIrqChip {
    fn name(&self) -> &'static str {
        "userspace"
    }

    fn irq_line(&self, gsi: u32) -> Box<dyn IrqLine> {
        match self.lines.get(gsi as usize) {
            Some(l) => Box::new(l.source()),
            None => {
                log::warn!("irqchip: no interrupt line {gsi}; the device's interrupts go nowhere");
                Box::new(devices::NullIrq)
            }
        }
    }

    fn msi_sink(&self) -> Arc<dyn MsiSink> {
        self.c.clone()
    }

    fn line_watch(&self) -> Option<Arc<LineWatch>> {
        Some(self.c.watch.clone())
    }

    fn legacy_timer_gate(&self) -> Option<Arc<devices::irq::IrqGate>> {
        Some(self.legacy_gate.clone())
    }

    fn deliver(&self, msg: InterruptMessage) {
        self.c.deliver(msg);
    }

    fn bus_devices(&self) -> Vec<ChipDevice> {
        let pic = &self.c.pic;
        vec![
            ChipDevice {
                name: "pic-master",
                bus: BusKind::Pio,
                base: u64::from(ports::PIC_MASTER),
                len: 2,
                device: Arc::new(Mutex::new(pic8259::pic_master_port(pic.clone()))),
            },
            ChipDevice {
                name: "pic-slave",
                bus: BusKind::Pio,
                base: u64::from(ports::PIC_SLAVE),
                len: 2,
                device: Arc::new(Mutex::new(pic8259::pic_slave_port(pic.clone()))),
            },
            ChipDevice {
                name: "elcr",
                bus: BusKind::Pio,
                base: u64::from(ports::ELCR),
                len: 2,
                device: Arc::new(Mutex::new(pic8259::elcr_port(pic.clone()))),
            },
            ChipDevice {
                name: "pit",
                bus: BusKind::Pio,
                base: u64::from(ports::PIT),
                len: 4,
                device: Arc::new(Mutex::new(pit8254::pit_ports(self.pit.clone()))),
            },
            ChipDevice {
                name: "port61",
                bus: BusKind::Pio,
                base: u64::from(ports::SYSTEM_CONTROL_B),
                len: 1,
                device: Arc::new(Mutex::new(pit8254::port61(self.pit.clone()))),
            },
            ChipDevice {
                name: "ioapic",
                bus: BusKind::Mmio,
                base: layout::IOAPIC_BASE,
                len: devices::ioapic::MMIO_SIZE,
                device: self.c.ioapic.clone(),
            },
            ChipDevice {
                name: crate::irqchip::XAPIC_DEVICE,
                bus: BusKind::Mmio,
                base: layout::LAPIC_BASE,
                len: 0x1000,
                device: Arc::new(Mutex::new(LapicPage {
                    lapics: self.c.lapics.clone(),
                })),
            },
        ]
    }

    fn timed(&self) -> Vec<Arc<Mutex<dyn Timed + Send>>> {
        let mut v: Vec<Arc<Mutex<dyn Timed + Send>>> = vec![self.pit.clone()];
        for l in &self.c.lapics {
            v.push(l.clone());
        }
        v
    }

    fn devices(&self) -> Vec<crate::state::MachineDevice> {
        use crate::state::{DeviceHandle, MachineDevice};
        let mut v = vec![
            MachineDevice::new("pic", DeviceHandle::Pic(self.c.pic.clone())),
            MachineDevice::new("ioapic", DeviceHandle::Ioapic(self.c.ioapic.clone())),
        ];
        for (i, l) in self.c.lapics.iter().enumerate() {
            v.push(MachineDevice::new(
                format!("lapic{i}"),
                DeviceHandle::Lapic(l.clone()),
            ));
        }
        v.push(MachineDevice::new(
            "pit",
            DeviceHandle::Pit(self.pit.clone()),
        ));
        v
    }

    fn pump(&self) {
        self.c.pump();
    }

    fn attention(&self) -> bool {
        self.c.waker.pending()
    }

    fn service(&self, vcpu_id: usize, vcpu: &mut dyn Vcpu) -> backend::Result<bool> {
        self.c.waker.clear();
        self.c.pump();
        self.c.waker.clear();
        let Some(req) = self.pending(vcpu_id) else {
            vcpu.request_interrupt_window(false);
            self.c.set_vmm_saw_pending(vcpu_id, false);
            return Ok(false);
        };
        let nmi = req == InterruptRequest::Nmi;
        if !nmi && !vcpu.ready_for_interrupt() {
            vcpu.request_interrupt_window(true);
            self.c.set_vmm_saw_pending(vcpu_id, true);
            return Ok(false);
        }
        let injected = match self.acknowledge(vcpu_id) {
            Some(Acknowledged::Vector(v)) => {
                vcpu.inject_interrupt(v)?;
                true
            }
            Some(Acknowledged::Nmi) => {
                vcpu.inject_nmi()?;
                true
            }
            None => false,
        };
        let more = self.pending(vcpu_id).is_some();
        vcpu.request_interrupt_window(more);
        self.c.set_vmm_saw_pending(vcpu_id, more);
        Ok(injected)
    }

    fn nmi_pending(&self, vcpu_id: usize) -> bool {
        self.pending(vcpu_id) == Some(InterruptRequest::Nmi)
    }

    fn halt_wait(&self) -> HaltWait {
        HaltWait::InVmm
    }

    fn wake(&self) {
        self.c.waker.notify();
    }

    fn wait(&self, timeout: Duration) {
        self.c.waker.wait(Some(timeout));
    }

    fn kick_period(&self) -> Option<Duration> {
        None
    }

    fn msr_read(&self, vcpu_id: usize, msr: u32) -> MsrResult {
        match self.c.lapics.get(vcpu_id) {
            Some(l) if Lapic::handles_msr(msr) => match lock(l).read_msr(msr) {
                Some(v) => MsrResult::Done(v),
                None => MsrResult::Fault,
            },
            _ => MsrResult::Unhandled,
        }
    }

    fn msr_write(&self, vcpu_id: usize, msr: u32, value: u64) -> MsrResult {
        let r = match self.c.lapics.get(vcpu_id) {
            Some(l) if Lapic::handles_msr(msr) => {
                if lock(l).write_msr(msr, value) {
                    MsrResult::Done(0)
                } else {
                    MsrResult::Fault
                }
            }
            _ => MsrResult::Unhandled,
        };
        if r == MsrResult::Done(0) {
            self.c.pump();
        }
        r
    }

    fn tsc(&self, vcpu_id: usize) -> Option<u64> {
        self.c.lapics.get(vcpu_id).map(|l| lock(l).tsc())
    }

    fn tpr(&self, vcpu_id: usize) -> Option<u8> {
        self.c.lapics.get(vcpu_id).map(|l| lock(l).tpr())
    }

    fn xapic_page(&self, vcpu_id: usize) -> Option<Option<u64>> {
        self.c.lapics.get(vcpu_id).map(|l| lock(l).mmio_base())
    }

    fn set_tpr(&self, vcpu_id: usize, tpr: u8) -> bool {
        let Some(l) = self.c.lapics.get(vcpu_id) else {
            return false;
        };
        lock(l).set_tpr(tpr);
        self.c.pump();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::{ManualClock, TimeTaint};

    fn chip(vcpus: usize) -> Arc<UserspaceIrqChip> {
        UserspaceIrqChip::build(ChipConfig {
            vcpus,
            clock: Arc::new(ManualClock::new()),
            taint: TimeTaint::new(),
            lapic_timer_hz: 1_000_000_000,
            tsc_hz: 1_000_000_000,
            guest_tsc: None,
            phys_addr_bits: cpu_interp::mmu::PHYS_ADDR_BITS,
        })
    }

    fn init_pic(c: &UserspaceIrqChip) {
        let mut p = lock(&c.c.pic);
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 4),
            (0x21, 1),
            (0xa0, 0x11),
            (0xa1, 0x28),
            (0xa1, 2),
            (0xa1, 1),
            (0x21, 0xf7),
            (0xa1, 0xff),
        ] {
            p.write_port(port, v);
        }
    }

    fn mask_pic(c: &UserspaceIrqChip) {
        let mut p = lock(&c.c.pic);
        p.write_port(0x21, 0xff);
        p.write_port(0xa1, 0xff);
    }

    fn route(c: &UserspaceIrqChip, pin: u32, vector: u8, level: bool, active_low: bool) {
        let mut io = lock(&c.c.ioapic);
        let mut w = |reg: u32, v: u32| {
            io.write(0, &reg.to_le_bytes());
            io.write(0x10, &v.to_le_bytes());
        };
        let low = u32::from(vector) | u32::from(level) << 15 | u32::from(active_low) << 13;
        w(0x10 + 2 * pin, low);
        w(0x11 + 2 * pin, 0);
    }

    fn enable_lapic(c: &UserspaceIrqChip, i: usize) {
        lock(&c.c.lapics[i]).write(0xf0, &0x1ffu32.to_le_bytes());
    }

    fn eoi(c: &UserspaceIrqChip, i: usize) {
        lock(&c.c.lapics[i]).write(0xb0, &0u32.to_le_bytes());
        c.pump();
    }

    #[test]
    fn pic_interrupt_reaches_the_cpu_through_lint0_extint() {
        let c = chip(1);
        init_pic(&c);
        assert_eq!(c.acknowledge(0), None);
        // IRQ3 (IRQ0 belongs to the chip's own PIT).
        let line = c.irq_line(3);
        line.set_level(true);
        assert!(c.attention());
        assert_eq!(c.acknowledge(0), Some(Acknowledged::Vector(0x23)));
        line.set_level(false);
        assert_eq!(c.acknowledge(0), None);
    }

    #[test]
    fn ioapic_level_interrupt_is_redelivered_after_eoi_while_asserted() {
        let c = chip(1);
        mask_pic(&c);
        route(&c, 4, 0x41, true, false);
        enable_lapic(&c, 0);
        let line = c.irq_line(4);
        line.set_level(true);
        assert_eq!(c.acknowledge(0), Some(Acknowledged::Vector(0x41)));
        assert_eq!(c.acknowledge(0), None);
        eoi(&c, 0);
        assert_eq!(c.acknowledge(0), Some(Acknowledged::Vector(0x41)));
        line.set_level(false);
        eoi(&c, 0);
        assert_eq!(c.acknowledge(0), None);
    }

    /// Two devices on one PCI line (level, active-low): raise both, lower
    /// one, and the line stays asserted until the second is lowered.
    #[test]
    fn shared_level_line_is_the_or_of_its_devices() {
        let c = chip(1);
        mask_pic(&c);
        route(&c, 17, 0x51, true, true);
        enable_lapic(&c, 0);
        let a = c.irq_line(17);
        let b = c.irq_line(17);
        assert_eq!(
            c.acknowledge(0),
            None,
            "idle line (high) is not asserted when active-low"
        );
        a.set_level(true);
        b.set_level(true);
        assert_eq!(c.acknowledge(0), Some(Acknowledged::Vector(0x51)));
        a.set_level(false);
        eoi(&c, 0);
        assert_eq!(
            c.acknowledge(0),
            Some(Acknowledged::Vector(0x51)),
            "b still asserts it"
        );
        b.set_level(false);
        eoi(&c, 0);
        assert_eq!(c.acknowledge(0), None);
        assert!(!lock(&c.c.ioapic).asserted(17));
    }

    #[test]
    fn unmasking_an_asserted_ioapic_pin_through_its_registers_wakes_the_vmm() {
        let c = chip(1);
        enable_lapic(&c, 0);
        // Pin 5, level-triggered, vector 0x45, masked.
        {
            let mut io = lock(&c.c.ioapic);
            let mut w = |reg: u32, v: u32| {
                io.write(0, &reg.to_le_bytes());
                io.write(0x10, &v.to_le_bytes());
            };
            w(0x10 + 2 * 5, 0x45 | (1 << 15) | (1 << 16));
            w(0x11 + 2 * 5, 0);
        }
        c.irq_line(5).set_level(true);
        c.pump();
        c.c.waker.clear();
        assert_eq!(c.pending(0), None);
        // The guest unmasks it with an MMIO write: the bus reaches the
        // IOAPIC directly, then the VMM pumps.
        {
            let mut io = lock(&c.c.ioapic);
            io.write(0, &(0x10u32 + 2 * 5).to_le_bytes());
            io.write(0x10, &(0x45u32 | (1 << 15)).to_le_bytes());
        }
        c.pump();
        assert!(c.attention(), "the VMM must come back for it");
        assert_eq!(c.acknowledge(0), Some(Acknowledged::Vector(0x45)));
    }

    #[test]
    fn eoi_or_tpr_uncovering_a_pending_vector_wakes_the_vmm_once() {
        let c = chip(1);
        enable_lapic(&c, 0);
        let lapic = &c.c.lapics[0];
        // TPR 0x40 holds vector 0x31 back.
        lock(lapic).write(0x80, &0x40u32.to_le_bytes());
        assert!(lock(lapic).accept(0x31, false));
        c.c.waker.clear();
        c.pump();
        assert!(!c.attention());
        c.c.set_vmm_saw_pending(0, false);
        // Lowering the TPR makes it deliverable: the VMM is woken.
        assert!(c.set_tpr(0, 0));
        assert!(c.attention());
        // Once the VMM has seen it (asked for a window), no more wake-ups.
        c.c.waker.clear();
        c.c.set_vmm_saw_pending(0, true);
        c.pump();
        assert!(!c.attention());
        // An EOI uncovering a lower vector: 0x51 in service, 0x41 waits.
        c.c.set_vmm_saw_pending(0, false);
        assert_eq!(c.acknowledge(0), Some(Acknowledged::Vector(0x31)));
        lock(lapic).write(0xb0, &0u32.to_le_bytes());
        assert!(lock(lapic).accept(0x51, false));
        assert_eq!(c.acknowledge(0), Some(Acknowledged::Vector(0x51)));
        assert!(lock(lapic).accept(0x41, false));
        c.c.waker.clear();
        c.pump();
        assert!(!c.attention(), "0x41 is below the vector in service");
        lock(lapic).write(0xb0, &0u32.to_le_bytes());
        c.pump();
        assert!(c.attention(), "the EOI uncovered 0x41");
        assert_eq!(c.acknowledge(0), Some(Acknowledged::Vector(0x41)));
    }

    #[test]
    fn msi_reaches_the_lapic_it_names() {
        let c = chip(2);
        enable_lapic(&c, 0);
        enable_lapic(&c, 1);
        let sink = c.msi_sink();
        sink.signal_msi(MsiMessage {
            address: 0xfee0_1000,
            data: 0x61,
        });
        assert_eq!(c.acknowledge(0), None);
        assert_eq!(c.acknowledge(1), Some(Acknowledged::Vector(0x61)));
        // Not in the window: dropped.
        sink.signal_msi(MsiMessage {
            address: 0x1000,
            data: 0x62,
        });
        assert_eq!(c.acknowledge(0), None);
    }

    #[test]
    fn self_ipi_through_the_icr_comes_back_to_its_sender() {
        let c = chip(2);
        enable_lapic(&c, 0);
        enable_lapic(&c, 1);
        // ICR: self shorthand, fixed, vector 0x70, from vCPU 1.
        lock(&c.c.lapics[1]).write(0x300, &(0x70u32 | 1 << 18 | 1 << 14).to_le_bytes());
        c.pump();
        assert_eq!(c.acknowledge(0), None);
        assert_eq!(c.acknowledge(1), Some(Acknowledged::Vector(0x70)));
    }

    #[test]
    fn lapic_page_routes_by_vcpu() {
        let c = chip(2);
        let dev = c
            .bus_devices()
            .into_iter()
            .find(|d| d.name == "lapic")
            .unwrap()
            .device;
        let mut id = [0u8; 4];
        dev.lock().unwrap().read_access(
            &BusAccess {
                vcpu: 1,
                address: 0xfee0_0020,
                offset: 0x20,
            },
            &mut id,
        );
        assert_eq!(u32::from_le_bytes(id) >> 24, 1);
        dev.lock().unwrap().read_access(
            &BusAccess {
                vcpu: 0,
                address: 0xfee0_0020,
                offset: 0x20,
            },
            &mut id,
        );
        assert_eq!(u32::from_le_bytes(id) >> 24, 0);
    }
}
