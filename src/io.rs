//! I/O routing: every guest access to a device passes through
//! [`DeviceIo`], which routes it to the port or MMIO bus with the vCPU that
//! made it, counts it for `--stats` by device id, writes it to the trace,
//! lets the interrupt controllers carry what the access caused, applies
//! PCI BAR moves, and keeps the timers' earliest deadline current.
//!
//! Every device the machine maps has a [`DeviceId`] from the machine's
//! device list ([`DeviceIo::register`]); the trace, the counters and bus
//! errors name it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::pci::root::PciRoot;
use devices::pci::{BarMapping, PciAddress, PciBarWindow};
use devices::ratelimit::LogOnce;
use devices::{Bus, BusKind, DeviceId, SharedDevice, TimeTaint, VmControl};

use crate::backend::{BackendError, CoalescedZones, MsrResult, Platform};
use crate::irqchip::{lock, IrqChip};
use crate::timers::Timers;
use crate::trace::Tracer;

/// Access counters for one device on one bus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessCount {
    pub reads: u64,
    pub writes: u64,
}

/// The PCI root, as the I/O path needs it: to apply BAR changes.
struct PciHook {
    root: Arc<Mutex<PciRoot>>,
    changed: Arc<AtomicBool>,
    /// The device id of each function (its BAR windows carry it).
    ids: BTreeMap<PciAddress, DeviceId>,
    overlap: LogOnce,
}

/// An access to the device may queue interrupt-controller messages (EOIs,
/// IPIs, unmasked deliveries, a TPR change): pump them afterwards.
pub const AFFECTS_INTERRUPTS: u8 = 1 << 0;
/// An access to the device may arm, move or cancel a timer: re-read the
/// earliest deadline afterwards.
pub const AFFECTS_TIMERS: u8 = 1 << 1;

/// The VMM side of device I/O: buses, tracer, counters, VM control, the
/// interrupt controllers and timers.
pub struct DeviceIo {
    pub pio: Bus,
    pub mmio: Bus,
    pub tracer: Tracer,
    pub control: VmControl,
    pub taint: TimeTaint,
    pub timers: Timers,
    chip: Arc<dyn IrqChip>,
    /// The vCPU whose accesses are being serviced.
    vcpu: usize,
    names: Vec<String>,
    /// Per device id: what an access to it may change ([`AFFECTS_INTERRUPTS`],
    /// [`AFFECTS_TIMERS`]), so that other accesses skip that work.
    affects: Vec<u8>,
    /// Per device id: port and MMIO counters.
    counts: Vec<[AccessCount; 2]>,
    unmapped: AccessCount,
    pci: Option<PciHook>,
    /// The xAPIC page while IA32_APIC_BASE has it unmapped.
    parked_xapic: Option<(devices::DeviceId, u64, devices::SharedDevice)>,
    xapic_overlap_logged: devices::ratelimit::RateLimiter,
    /// Coalesced MMIO: guest-physical ranges whose writes are queued (in
    /// order) instead of dispatched, until the next other device access,
    /// MSR access or the end of the vCPU run. The fixed ranges and those
    /// of the BARs in `coalesced_bars` where they are mapped now.
    coalesced: Vec<(u64, u64)>,
    /// Ranges that were given at fixed addresses.
    coalesced_fixed: Vec<(u64, u64)>,
    /// Ranges that live inside a PCI BAR and move with it.
    coalesced_bars: Vec<CoalescedBar>,
    /// The backend's own zones (KVM), kept where `coalesced` says.
    coalesced_zones: Option<Arc<dyn CoalescedZones>>,
    zone_error: LogOnce,
    queued: Vec<(u64, [u8; 8], usize)>,
    /// Writes that went through the queue.
    pub coalesced_writes: u64,
}

/// Most writes queued before they are dispatched anyway (KVM's ring holds
/// about as many).
pub const COALESCED_QUEUE: usize = 170;

/// Coalesced ranges of one PCI BAR, as offsets into it.
struct CoalescedBar {
    address: PciAddress,
    bar: u8,
    ranges: Vec<(u64, u64)>,
    /// The BAR's base where the ranges are in force now (None while the
    /// BAR is not mapped).
    base: Option<u64>,
}

impl DeviceIo {
    pub fn new(
        tracer: Tracer,
        control: VmControl,
        taint: TimeTaint,
        timers: Timers,
        chip: Arc<dyn IrqChip>,
    ) -> Self {
        DeviceIo {
            pio: Bus::new(BusKind::Pio),
            mmio: Bus::new(BusKind::Mmio),
            tracer,
            control,
            taint,
            timers,
            chip,
            vcpu: 0,
            names: Vec::new(),
            affects: Vec::new(),
            counts: Vec::new(),
            unmapped: AccessCount::default(),
            pci: None,
            parked_xapic: None,
            xapic_overlap_logged: devices::ratelimit::RateLimiter::new(4),
            coalesced: Vec::new(),
            coalesced_fixed: Vec::new(),
            coalesced_bars: Vec::new(),
            coalesced_zones: None,
            zone_error: LogOnce::new(),
            queued: Vec::new(),
            coalesced_writes: 0,
        }
    }

    /// Keep the backend's coalesced zones (KVM) in step with this queue's
    /// ranges from now on.
    pub fn set_coalesced_zones(&mut self, zones: Option<Arc<dyn CoalescedZones>>) {
        self.coalesced_zones = zones;
    }

    /// Queue writes to `base..base + len` (write-only, side-effect-free
    /// registers: their effect may wait until the next other access); the
    /// backend's zone too.
    pub fn add_coalesced_range(&mut self, base: u64, len: u64) -> Result<(), BackendError> {
        if let Some(z) = &self.coalesced_zones {
            z.register(base, len)?;
        }
        self.coalesced_fixed.push((base, len));
        self.rebuild_coalesced();
        Ok(())
    }

    /// Queue writes to `ranges` (offset, length) of BAR `bar` of the PCI
    /// function at `address`, wherever the guest maps the BAR: the ranges
    /// (and the backend's zones) move with it in
    /// [`DeviceIo::apply_pci_changes`]. `base` is where it is mapped now.
    pub fn add_coalesced_bar(
        &mut self,
        address: PciAddress,
        bar: u8,
        ranges: Vec<(u64, u64)>,
        base: Option<u64>,
    ) -> Result<(), BackendError> {
        if let (Some(z), Some(base)) = (&self.coalesced_zones, base) {
            for &(off, len) in &ranges {
                z.register(base + off, len)?;
            }
        }
        self.coalesced_bars.push(CoalescedBar {
            address,
            bar,
            ranges,
            base,
        });
        self.rebuild_coalesced();
        Ok(())
    }

    /// The coalesced ranges in force now (guest-physical base, length).
    pub fn coalesced_ranges(&self) -> &[(u64, u64)] {
        &self.coalesced
    }

    fn rebuild_coalesced(&mut self) {
        self.coalesced.clear();
        self.coalesced.extend_from_slice(&self.coalesced_fixed);
        for b in &self.coalesced_bars {
            if let Some(base) = b.base {
                self.coalesced
                    .extend(b.ranges.iter().map(|&(off, len)| (base + off, len)));
            }
        }
    }

    /// Put the coalesced ranges of BAR `bar` of `address` at `to` (None:
    /// the BAR is no longer mapped), moving the backend's zones. Writes
    /// still queued for the old place are dispatched first.
    fn place_coalesced_bar(&mut self, address: PciAddress, bar: u8, to: Option<u64>) {
        let Some(i) = self
            .coalesced_bars
            .iter()
            .position(|b| b.address == address && b.bar == bar)
        else {
            return;
        };
        if self.coalesced_bars[i].base == to {
            return;
        }
        self.flush_coalesced();
        let b = &mut self.coalesced_bars[i];
        let from = std::mem::replace(&mut b.base, to);
        if let Some(z) = &self.coalesced_zones {
            let mut failed = None;
            for &(off, len) in &b.ranges {
                if let Some(from) = from {
                    if let Err(e) = z.unregister(from + off, len) {
                        failed.get_or_insert(e);
                    }
                }
                if let Some(to) = to {
                    if let Err(e) = z.register(to + off, len) {
                        failed.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = failed {
                if self.zone_error.first() {
                    log::warn!(
                        "pci {address}: BAR {bar}'s coalesced MMIO zones not moved: {e}; \
                         its writes exit one by one (logged once)"
                    );
                }
            }
        }
        self.rebuild_coalesced();
    }

    /// Dispatch the queued coalesced writes, in order.
    pub fn flush_coalesced(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let queued = std::mem::take(&mut self.queued);
        for (addr, mut data, len) in queued.iter().copied() {
            self.access(BusKind::Mmio, addr, &mut data[..len], true);
        }
        // Keep the allocation.
        let mut queued = queued;
        queued.clear();
        if self.queued.is_empty() {
            self.queued = queued;
        }
    }

    fn is_coalesced(&self, addr: u64) -> bool {
        self.coalesced
            .iter()
            .any(|&(base, len)| addr >= base && addr - base < len)
    }

    /// Add a device to the machine's list; its id. Accesses to it are
    /// routed and counted only (see [`DeviceIo::register_with`]).
    pub fn register(&mut self, name: &str) -> DeviceId {
        self.register_with(name, 0)
    }

    /// Add a device whose accesses may affect the interrupt controllers or
    /// the timers (`affects`: [`AFFECTS_INTERRUPTS`] | [`AFFECTS_TIMERS`]).
    pub fn register_with(&mut self, name: &str, affects: u8) -> DeviceId {
        let id = DeviceId(self.names.len() as u32);
        self.names.push(name.to_string());
        self.affects.push(affects);
        self.counts.push(Default::default());
        id
    }

    /// The name of device `id`.
    pub fn device_name(&self, id: DeviceId) -> &str {
        self.names.get(id.index()).map_or("?", String::as_str)
    }

    /// Map a range of device `id` on `kind`'s bus.
    pub fn map(
        &mut self,
        kind: BusKind,
        id: DeviceId,
        base: u64,
        len: u64,
        device: SharedDevice,
    ) -> Result<(), devices::BusError> {
        let name = self.names.get(id.index()).cloned().unwrap_or_default();
        self.bus_mut(kind).insert(id, &name, base, len, device)
    }

    fn bus_mut(&mut self, kind: BusKind) -> &mut Bus {
        match kind {
            BusKind::Pio => &mut self.pio,
            BusKind::Mmio => &mut self.mmio,
        }
    }

    /// The interrupt controllers.
    pub fn chip(&self) -> &Arc<dyn IrqChip> {
        &self.chip
    }

    /// Service the accesses of vCPU `id` from now on.
    pub fn set_vcpu(&mut self, id: usize) {
        self.vcpu = id;
    }

    /// Attach the PCI root whose BAR changes this I/O path applies.
    pub fn attach_pci(&mut self, root: Arc<Mutex<PciRoot>>) {
        let changed = lock(&root).changed_flag();
        self.pci = Some(PciHook {
            root,
            changed,
            ids: BTreeMap::new(),
            overlap: LogOnce::new(),
        });
    }

    /// Note the device id of the function at `address` (its BARs are
    /// mapped under it).
    pub fn note_pci_function(&mut self, address: PciAddress, id: DeviceId) {
        if let Some(p) = self.pci.as_mut() {
            p.ids.insert(address, id);
        }
    }

    /// Map what the PCI root says changed (BARs moved, enabled, disabled).
    /// A BAR placed over another range stays unmapped (logged once): on
    /// real hardware such decoding conflicts are undefined.
    pub fn apply_pci_changes(&mut self) {
        let Some(p) = self.pci.as_ref() else {
            return;
        };
        let changes = lock(&p.root).take_bar_changes();
        for c in changes {
            let Some(p) = self.pci.as_ref() else {
                return;
            };
            let id = p.ids.get(&c.address).copied();
            let device = lock(&p.root).function(c.address).cloned();
            let (Some(id), Some(device)) = (id, device) else {
                continue;
            };
            for b in &c.removed {
                let kind = bar_bus(b);
                // A BAR that never got mapped (overlap) is not there to remove.
                let _ = self.bus_mut(kind).remove(b.base);
                if !b.io {
                    self.place_coalesced_bar(c.address, b.index, None);
                }
            }
            for b in &c.added {
                let window: SharedDevice =
                    Arc::new(Mutex::new(PciBarWindow::new(device.clone(), b.index)));
                let mapped = self.map(bar_bus(b), id, b.base, b.size, window);
                if mapped.is_ok() && !b.io {
                    self.place_coalesced_bar(c.address, b.index, Some(b.base));
                }
                if let Err(e) = mapped {
                    if self.pci.as_ref().is_some_and(|p| p.overlap.first()) {
                        log::warn!(
                            "pci {}: BAR {} left unmapped: {e} (logged once)",
                            c.address,
                            b.index
                        );
                    }
                }
            }
        }
    }

    /// Map every PCI function's BARs as its configuration space says
    /// (after a state restore): the windows mapped before are removed.
    pub fn resync_pci_bars(&mut self) {
        let Some(p) = self.pci.as_ref() else {
            return;
        };
        let _ = lock(&p.root).take_bar_changes();
        let functions: Vec<(PciAddress, DeviceId)> = p.ids.iter().map(|(a, i)| (*a, *i)).collect();
        for (address, id) in functions {
            for kind in [BusKind::Pio, BusKind::Mmio] {
                let bases: Vec<u64> = self
                    .bus_mut(kind)
                    .mappings()
                    .into_iter()
                    .filter(|m| m.id == id)
                    .map(|m| m.base)
                    .collect();
                for b in bases {
                    let _ = self.bus_mut(kind).remove(b);
                }
            }
            let Some(device) = self
                .pci
                .as_ref()
                .and_then(|p| lock(&p.root).function(address).cloned())
            else {
                continue;
            };
            let bars = lock(&device).config().mapped_bars();
            let coalesced: Vec<u8> = self
                .coalesced_bars
                .iter()
                .filter(|c| c.address == address)
                .map(|c| c.bar)
                .collect();
            for bar in coalesced {
                let to = bars
                    .iter()
                    .find(|b| b.index == bar && !b.io)
                    .map(|b| b.base);
                self.place_coalesced_bar(address, bar, to);
            }
            for b in bars {
                let window: SharedDevice =
                    Arc::new(Mutex::new(PciBarWindow::new(device.clone(), b.index)));
                if let Err(e) = self.map(bar_bus(&b), id, b.base, b.size, window) {
                    log::warn!(
                        "pci {address}: BAR {} left unmapped after a restore: {e}",
                        b.index
                    );
                }
            }
        }
    }

    /// Map the xAPIC page where IA32_APIC_BASE now puts it: moved with
    /// the base, unmapped while the APIC is disabled or in x2APIC mode
    /// (accesses then reach whatever else is there, or read all ones),
    /// mapped again when it returns. One page serves every vCPU's APIC (it
    /// routes by vCPU), so with several vCPUs it follows the last write.
    fn place_xapic_page(&mut self) {
        let Some(want) = self.chip.xapic_page(self.vcpu) else {
            return;
        };
        let current = self
            .mmio
            .mappings()
            .into_iter()
            .find(|m| &*m.name == crate::irqchip::XAPIC_DEVICE);
        let moved = match (current, want) {
            (Some(m), Some(to)) if m.base != to => self.mmio.move_range(m.base, to),
            (Some(m), None) => self.mmio.remove(m.base).map(|dev| {
                self.parked_xapic = Some((m.id, m.len, dev));
            }),
            (None, Some(to)) => match self.parked_xapic.take() {
                Some((id, len, dev)) => {
                    let r =
                        self.mmio
                            .insert(id, crate::irqchip::XAPIC_DEVICE, to, len, dev.clone());
                    if r.is_err() {
                        self.parked_xapic = Some((id, len, dev));
                    }
                    r
                }
                None => Ok(()),
            },
            _ => Ok(()),
        };
        if let Err(e) = moved {
            // The guest put the page on top of another device: it stays
            // where it was (as if the write had not moved it).
            if self.xapic_overlap_logged.allow() {
                log::warn!("xAPIC page not moved: {e}");
            }
        }
    }

    /// Re-read the timers' earliest deadline (after guest accesses).
    pub fn refresh_deadline(&mut self) {
        self.timers.deadline = self.timers.compute_deadline();
    }

    #[inline]
    fn access(&mut self, kind: BusKind, addr: u64, data: &mut [u8], write: bool) {
        let mark = self.tracer.mark();
        let bus = match kind {
            BusKind::Pio => &self.pio,
            BusKind::Mmio => &self.mmio,
        };
        let hit = if write {
            bus.write(self.vcpu, addr, data)
        } else {
            bus.read(self.vcpu, addr, data)
        };
        let (c, affects) = match hit {
            Some((id, _)) => (
                &mut self.counts[id.index()][kind as usize],
                self.affects[id.index()],
            ),
            None => (&mut self.unmapped, 0),
        };
        if write {
            c.writes += 1;
        } else {
            c.reads += 1;
        }
        let timed = self.taint.take() && !write;
        if self.tracer.enabled() {
            let name = hit.map_or("-", |(_, n)| n);
            self.tracer.record(kind, write, addr, data, name, timed);
        }
        if let Some(d) = self.tracer.devices() {
            let name = hit.map_or("-", |(_, n)| n);
            d.access(mark, kind, write, addr, data, name);
        }
        if affects & AFFECTS_INTERRUPTS != 0 {
            self.chip.pump();
        }
        if self
            .pci
            .as_ref()
            .is_some_and(|p| p.changed.load(Ordering::Relaxed))
        {
            self.apply_pci_changes();
        }
        if affects & AFFECTS_TIMERS != 0 {
            // The access may have armed or moved a timer.
            self.refresh_deadline();
        }
    }

    /// Per-device access counts: (bus, device name, counts) for every
    /// device and bus that saw an access, plus the unmapped total.
    pub fn counts(&self) -> (Vec<(BusKind, &str, AccessCount)>, AccessCount) {
        let mut v = Vec::new();
        for (i, c) in self.counts.iter().enumerate() {
            for kind in [BusKind::Pio, BusKind::Mmio] {
                let n = c[kind as usize];
                if n.reads + n.writes > 0 {
                    v.push((kind, self.names[i].as_str(), n));
                }
            }
        }
        v.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        (v, self.unmapped)
    }
}

fn bar_bus(b: &BarMapping) -> BusKind {
    if b.io {
        BusKind::Pio
    } else {
        BusKind::Mmio
    }
}

impl Platform for DeviceIo {
    fn io_read(&mut self, port: u16, data: &mut [u8]) {
        self.flush_coalesced();
        self.access(BusKind::Pio, u64::from(port), data, false);
    }
    fn io_write(&mut self, port: u16, data: &[u8]) {
        self.flush_coalesced();
        let mut buf = [0u8; 8];
        let n = data.len().min(8);
        buf[..n].copy_from_slice(&data[..n]);
        self.access(BusKind::Pio, u64::from(port), &mut buf[..n], true);
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.flush_coalesced();
        self.access(BusKind::Mmio, addr, data, false);
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        let mut buf = [0u8; 8];
        let n = data.len().min(8);
        buf[..n].copy_from_slice(&data[..n]);
        if !self.coalesced.is_empty() && self.is_coalesced(addr) {
            if self.queued.len() >= COALESCED_QUEUE {
                self.flush_coalesced();
            }
            self.coalesced_writes += 1;
            self.queued.push((addr, buf, n));
            return;
        }
        self.flush_coalesced();
        self.access(BusKind::Mmio, addr, &mut buf[..n], true);
    }
    fn stop_requested(&self) -> bool {
        self.control.is_pending()
            || self.chip.attention()
            || self.timers.deadline <= self.timers.now()
    }

    fn retired_hint(&mut self, n: u64) {
        if let Some(v) = &self.timers.vclock {
            v.set_instructions(n);
        }
    }

    fn read_msr(&mut self, msr: u32) -> MsrResult {
        self.flush_coalesced();
        let mark = self.tracer.mark();
        let r = self.chip.msr_read(self.vcpu, msr);
        if let Some(d) = self.tracer.devices() {
            d.msr(mark, false, msr, 0, r);
        }
        r
    }

    fn write_msr(&mut self, msr: u32, value: u64) -> MsrResult {
        self.flush_coalesced();
        let mark = self.tracer.mark();
        let r = self.chip.msr_write(self.vcpu, msr, value);
        if let Some(d) = self.tracer.devices() {
            d.msr(mark, true, msr, value, r);
        }
        if r == MsrResult::Done(0) {
            if msr == devices::lapic::MSR_APIC_BASE {
                self.place_xapic_page();
            }
            self.refresh_deadline();
        }
        r
    }

    fn tsc(&mut self) -> Option<u64> {
        self.chip.tsc(self.vcpu)
    }

    fn next_check(&mut self, retired: u64) -> u64 {
        match &self.timers.vclock {
            // Virtual time: stop exactly where the next deadline falls; poll
            // now and then for host requests (kicks, serial input).
            Some(v) => {
                let poll = retired.saturating_add(VIRTUAL_POLL_INTERVAL);
                if self.timers.deadline == u64::MAX {
                    poll
                } else {
                    v.instructions_at(self.timers.deadline).min(poll)
                }
            }
            None => retired.saturating_add(HOST_POLL_INTERVAL),
        }
    }

    fn read_cr8(&mut self) -> Option<u64> {
        self.chip.tpr(self.vcpu).map(|t| u64::from(t >> 4))
    }

    fn write_cr8(&mut self, cr8: u64) -> bool {
        let mark = self.tracer.mark();
        let r = self.chip.set_tpr(self.vcpu, ((cr8 & 0xf) << 4) as u8);
        if let Some(d) = self.tracer.devices() {
            d.cr8(mark, cr8);
        }
        r
    }
}

/// With host time, how many instructions the interpreter runs between two
/// looks at the clock (timer deadlines) and at host requests: a few
/// microseconds of guest time.
pub const HOST_POLL_INTERVAL: u64 = 4096;

/// With virtual time, deadlines are exact; this is how often the
/// interpreter looks for host requests (Ctrl-A x, serial input).
pub const VIRTUAL_POLL_INTERVAL: u64 = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::VirtualClock;
    use devices::{BusDevice, Clock, Timed};

    struct OneShot(Option<u64>);
    impl Timed for OneShot {
        fn next_deadline(&self) -> Option<u64> {
            self.0
        }
        fn advance(&mut self, now: u64) {
            if self.0.is_some_and(|d| d <= now) {
                self.0 = None;
            }
        }
    }

    fn chip(clock: Arc<dyn Clock>) -> Arc<dyn IrqChip> {
        crate::irqchip::userspace::UserspaceIrqChip::create(crate::irqchip::ChipConfig {
            vcpus: 1,
            clock,
            taint: TimeTaint::new(),
            lapic_timer_hz: 1_000_000_000,
            tsc_hz: 1_000_000_000,
            guest_tsc: None,
            phys_addr_bits: cpu_interp::mmu::PHYS_ADDR_BITS,
        })
    }

    fn io_with(clock: Arc<dyn Clock>, vclock: Option<VirtualClock>, deadline: u64) -> DeviceIo {
        let timer: Arc<Mutex<dyn Timed + Send>> = Arc::new(Mutex::new(OneShot(Some(deadline))));
        let timers = Timers::new(clock.clone(), vec![timer], vclock);
        DeviceIo::new(
            Tracer::disabled(),
            VmControl::new(),
            TimeTaint::new(),
            timers,
            chip(clock),
        )
    }

    #[test]
    fn virtual_time_names_the_exact_instruction_of_a_deadline() {
        let v = VirtualClock::new();
        let mut io = io_with(Arc::new(v.clone()), Some(v.clone()), 12_345);
        let n = io.next_check(100);
        assert_eq!(n, 12_345 / crate::clock::VIRTUAL_NS_PER_INSTRUCTION);
        io.retired_hint(n - 1);
        assert!(!io.stop_requested(), "one instruction early");
        io.retired_hint(n);
        assert!(io.stop_requested(), "due at exactly that count");
        // Far deadlines: still a poll for host requests.
        let mut io = io_with(Arc::new(v.clone()), Some(v), u64::MAX - 1);
        assert_eq!(io.next_check(0), VIRTUAL_POLL_INTERVAL);
    }

    #[test]
    fn host_time_polls_at_a_bounded_interval() {
        let clock: Arc<dyn Clock> = Arc::new(devices::ManualClock::new());
        let mut io = io_with(clock, None, 1_000_000);
        assert_eq!(io.next_check(7), 7 + HOST_POLL_INTERVAL);
    }

    /// IA32_APIC_BASE moves the xAPIC page, unmaps it while the APIC is
    /// disabled (the old page reads all ones), and maps it again; a base on
    /// top of another device leaves the page where it was.
    #[test]
    fn apic_base_moves_the_xapic_page() {
        let clock: Arc<dyn Clock> = Arc::new(devices::ManualClock::new());
        let mut io = io_with(clock, None, u64::MAX);
        for d in io.chip.clone().bus_devices() {
            let id = io.register_with(d.name, AFFECTS_INTERRUPTS | AFFECTS_TIMERS);
            io.map(d.bus, id, d.base, d.len, d.device).unwrap();
        }
        let version = |io: &mut DeviceIo, page: u64| {
            let mut b = [0u8; 4];
            io.mmio_read(page + 0x30, &mut b);
            u32::from_le_bytes(b)
        };
        let base = |io: &mut DeviceIo, v: u64| io.write_msr(devices::lapic::MSR_APIC_BASE, v);
        let old = crate::layout::LAPIC_BASE;
        let new = 0xfed0_0000;
        assert_ne!(version(&mut io, old), u32::MAX);
        assert_eq!(base(&mut io, new | 0x900), MsrResult::Done(0));
        assert_eq!(version(&mut io, old), u32::MAX);
        assert_ne!(version(&mut io, new), u32::MAX);
        // Globally disabled: no page anywhere.
        assert_eq!(base(&mut io, new | 0x100), MsrResult::Done(0));
        assert_eq!(version(&mut io, new), u32::MAX);
        // Enabled again, back at the usual address.
        assert_eq!(base(&mut io, old | 0x900), MsrResult::Done(0));
        assert_ne!(version(&mut io, old), u32::MAX);
        // Onto the IOAPIC: the page stays.
        assert_eq!(
            base(&mut io, crate::layout::IOAPIC_BASE | 0x900),
            MsrResult::Done(0)
        );
        assert_ne!(version(&mut io, old), u32::MAX);
    }

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, _o: u64, d: &mut [u8]) {
            d.fill(self.0);
        }
        fn write(&mut self, _o: u64, d: &[u8]) {
            self.0 = d[0];
        }
    }

    #[test]
    fn trace_lines_and_counts() {
        let dir = std::env::temp_dir().join(format!("duet-trace-test-{}", std::process::id()));
        let tracer = Tracer::to_file(&dir, crate::trace::DEFAULT_TRACE_LIMIT).unwrap();
        let clock: Arc<dyn Clock> = Arc::new(devices::ManualClock::new());
        let timers = Timers::new(clock.clone(), Vec::new(), None);
        let chip =
            crate::irqchip::userspace::UserspaceIrqChip::create(crate::irqchip::ChipConfig {
                vcpus: 1,
                clock,
                taint: TimeTaint::new(),
                lapic_timer_hz: 1_000_000_000,
                tsc_hz: 1_000_000_000,
                guest_tsc: None,
                phys_addr_bits: cpu_interp::mmu::PHYS_ADDR_BITS,
            });
        let mut io = DeviceIo::new(tracer, VmControl::new(), TimeTaint::new(), timers, chip);
        let id = io.register("echo");
        io.map(BusKind::Pio, id, 0x3f8, 8, Arc::new(Mutex::new(Echo(0))))
            .unwrap();
        io.io_write(0x3f8, &[0x48]);
        let mut b = [0u8; 1];
        io.io_read(0x3fd, &mut b);
        let mut w = [0u8; 4];
        io.mmio_read(0xfec0_0000, &mut w);
        io.tracer.finish().unwrap();
        let text = std::fs::read_to_string(&dir).unwrap();
        std::fs::remove_file(&dir).ok();
        assert_eq!(
            text,
            "pio  w 0x03f8 1 0x48 echo\npio  r 0x03fd 1 0x48 echo\nmmio r 0xfec00000 4 0xffffffff -\n"
        );
        let (counts, unmapped) = io.counts();
        assert_eq!(
            counts,
            vec![(
                BusKind::Pio,
                "echo",
                AccessCount {
                    reads: 1,
                    writes: 1
                }
            )]
        );
        assert_eq!(unmapped.reads, 1);
    }
}
