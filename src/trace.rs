//! The observation point: every guest access to a device passes through
//! [`DeviceIo`], which routes it to the port or MMIO bus, counts it for
//! `--stats`, and writes it to the `--trace` file.
//!
//! A trace line is backend-neutral, so traces from KVM and from the
//! interpreter can be compared byte for byte:
//!
//! ```text
//! pio  w 0x03f8 1 0x48 com1
//! pio  r 0x03fd 1 0x60 com1
//! mmio r 0xfee00030 4 0x00050014 lapic
//! ```
//!
//! (kind, r/w, address, size in bytes, value as little-endian integer, the
//! device's name or `-` for unmapped addresses). A read whose value depends
//! on elapsed time (a PIT count, the LAPIC current count, RTC time, the TSC
//! through port 0x61 polling...) ends in ` time`; [`compare_traces`] masks
//! the value of such lines.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use std::sync::{Arc, Mutex};

use devices::{Bus, BusKind, Clock, TimeTaint, Timed, VmControl};

use crate::backend::{IoHandler, MsrResult};
use crate::clock::VirtualClock;
use crate::irqchip::IrqRouter;

/// Errors of the trace writer.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot create trace file {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write trace file: {0}")]
    Write(#[from] std::io::Error),
}

/// Access counters for one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessCount {
    pub reads: u64,
    pub writes: u64,
}

/// Writes trace lines; a no-op when no file was given.
pub struct Tracer {
    out: Option<BufWriter<File>>,
    error: Option<std::io::Error>,
}

impl Tracer {
    pub fn disabled() -> Self {
        Tracer {
            out: None,
            error: None,
        }
    }

    pub fn to_file(path: &Path) -> Result<Self, TraceError> {
        let f = File::create(path).map_err(|source| TraceError::Create {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Tracer {
            out: Some(BufWriter::new(f)),
            error: None,
        })
    }

    #[inline]
    pub fn enabled(&self) -> bool {
        self.out.is_some()
    }

    fn record(
        &mut self,
        kind: BusKind,
        write: bool,
        addr: u64,
        data: &[u8],
        device: &str,
        timed: bool,
    ) {
        let Some(out) = self.out.as_mut() else {
            return;
        };
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(v);
        let mark = if timed { " time" } else { "" };
        let r = match kind {
            BusKind::Pio => writeln!(
                out,
                "pio  {} {:#06x} {} {:#0w$x} {}{mark}",
                if write { 'w' } else { 'r' },
                addr,
                data.len(),
                value,
                device,
                w = 2 + 2 * n
            ),
            BusKind::Mmio => writeln!(
                out,
                "mmio {} {:#010x} {} {:#0w$x} {}{mark}",
                if write { 'w' } else { 'r' },
                addr,
                data.len(),
                value,
                device,
                w = 2 + 2 * n
            ),
        };
        if let Err(e) = r {
            // Stop tracing on the first error, remember it for finish().
            self.error = Some(e);
            self.out = None;
        }
    }

    /// Flush the file; reports any error met while tracing.
    pub fn finish(&mut self) -> Result<(), TraceError> {
        if let Some(e) = self.error.take() {
            return Err(TraceError::Write(e));
        }
        if let Some(out) = self.out.as_mut() {
            out.flush()?;
        }
        Ok(())
    }
}

/// Compare two traces, masking the value of time-dependent reads. Returns
/// the first difference (1-based line number and both lines).
pub fn compare_traces(a: &str, b: &str) -> Option<(usize, String, String)> {
    fn mask(l: &str) -> String {
        if let Some(stripped) = l.strip_suffix(" time") {
            let mut f: Vec<&str> = stripped.split_whitespace().collect();
            if f.len() >= 5 {
                f[4] = "<time>";
            }
            f.join(" ")
        } else {
            l.to_string()
        }
    }
    let (mut la, mut lb) = (a.lines(), b.lines());
    let mut n = 0;
    loop {
        n += 1;
        match (la.next(), lb.next()) {
            (None, None) => return None,
            (x, y) => {
                let (x, y) = (x.unwrap_or("<end>"), y.unwrap_or("<end>"));
                if mask(x) != mask(y) {
                    return Some((n, x.to_string(), y.to_string()));
                }
            }
        }
    }
}

/// The machine's timed devices and its clock.
pub struct Timers {
    clock: Arc<dyn Clock>,
    timed: Vec<Arc<Mutex<dyn Timed + Send>>>,
    vclock: Option<VirtualClock>,
    /// Cached earliest deadline (ns), `u64::MAX` when none.
    deadline: u64,
}

impl Timers {
    pub fn new(
        clock: Arc<dyn Clock>,
        timed: Vec<Arc<Mutex<dyn Timed + Send>>>,
        vclock: Option<VirtualClock>,
    ) -> Self {
        let mut t = Timers {
            clock,
            timed,
            vclock,
            deadline: u64::MAX,
        };
        t.deadline = t.compute_deadline();
        t
    }

    pub fn now(&self) -> u64 {
        self.clock.now_ns()
    }

    fn compute_deadline(&self) -> u64 {
        self.timed
            .iter()
            .filter_map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).next_deadline())
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The earliest timer deadline.
    pub fn next_deadline(&self) -> Option<u64> {
        (self.deadline != u64::MAX).then_some(self.deadline)
    }

    /// Fire every timer that fell due; recompute the deadline.
    pub fn advance_due(&mut self) {
        let now = self.now();
        if now >= self.deadline {
            for t in &self.timed {
                let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                if t.next_deadline().is_some_and(|d| d <= now) {
                    t.advance(now);
                }
            }
        }
        self.deadline = self.compute_deadline();
    }
}

/// The VMM side of device I/O: buses, tracer, counters, VM control, the
/// interrupt controllers and timers.
pub struct DeviceIo {
    pub pio: Bus,
    pub mmio: Bus,
    pub tracer: Tracer,
    pub control: VmControl,
    pub taint: TimeTaint,
    pub timers: Timers,
    router: Option<Arc<IrqRouter>>,
    counts: BTreeMap<(BusKind, String), AccessCount>,
    unmapped: AccessCount,
}

impl DeviceIo {
    pub fn new(
        pio: Bus,
        mmio: Bus,
        tracer: Tracer,
        control: VmControl,
        taint: TimeTaint,
        timers: Timers,
        router: Option<Arc<IrqRouter>>,
    ) -> Self {
        DeviceIo {
            pio,
            mmio,
            tracer,
            control,
            taint,
            timers,
            router,
            counts: BTreeMap::new(),
            unmapped: AccessCount::default(),
        }
    }

    /// The userspace interrupt controllers (None with KVM's in-kernel ones).
    pub fn router(&self) -> Option<&Arc<IrqRouter>> {
        self.router.as_ref()
    }

    /// Re-read the timers' earliest deadline (after guest accesses).
    pub fn refresh_deadline(&mut self) {
        self.timers.deadline = self.timers.compute_deadline();
    }

    fn access(&mut self, kind: BusKind, addr: u64, data: &mut [u8], write: bool) {
        let bus = match kind {
            BusKind::Pio => &self.pio,
            BusKind::Mmio => &self.mmio,
        };
        let name = bus.resolve(addr, data.len()).map(|r| r.name.to_string());
        if write {
            bus.write(addr, data);
        } else {
            bus.read(addr, data);
        }
        let c = match &name {
            Some(n) => {
                // Avoid allocating a key on the hot path when it exists.
                match self.counts.get_mut(&(kind, n.clone())) {
                    Some(c) => c,
                    None => self.counts.entry((kind, n.clone())).or_default(),
                }
            }
            None => &mut self.unmapped,
        };
        if write {
            c.writes += 1;
        } else {
            c.reads += 1;
        }
        let timed = self.taint.take() && !write;
        if self.tracer.enabled() {
            self.tracer.record(
                kind,
                write,
                addr,
                data,
                name.as_deref().unwrap_or("-"),
                timed,
            );
        }
        if let Some(r) = &self.router {
            r.pump();
        }
        // The access may have armed or moved a timer.
        self.refresh_deadline();
    }

    /// Per-device access counts (bus, device name) → counts, plus the
    /// unmapped total.
    pub fn counts(&self) -> (&BTreeMap<(BusKind, String), AccessCount>, AccessCount) {
        (&self.counts, self.unmapped)
    }
}

impl IoHandler for DeviceIo {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.access(BusKind::Pio, u64::from(port), data, false);
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        let mut buf = [0u8; 8];
        let n = data.len().min(8);
        buf[..n].copy_from_slice(&data[..n]);
        self.access(BusKind::Pio, u64::from(port), &mut buf[..n], true);
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.access(BusKind::Mmio, addr, data, false);
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        let mut buf = [0u8; 8];
        let n = data.len().min(8);
        buf[..n].copy_from_slice(&data[..n]);
        self.access(BusKind::Mmio, addr, &mut buf[..n], true);
    }
    fn exit_requested(&self) -> bool {
        self.control.is_pending()
            || self.router.as_ref().is_some_and(|r| r.waker.pending())
            || self.timers.deadline <= self.timers.now()
    }

    fn instructions_retired(&mut self, n: u64) {
        if let Some(v) = &self.timers.vclock {
            v.set_instructions(n);
        }
    }

    fn msr_read(&mut self, msr: u32) -> MsrResult {
        match &self.router {
            Some(r) if devices::lapic::Lapic::handles_msr(msr) => {
                match r
                    .lapic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read_msr(msr)
                {
                    Some(v) => MsrResult::Done(v),
                    None => MsrResult::Fault,
                }
            }
            _ => MsrResult::Unhandled,
        }
    }

    fn msr_write(&mut self, msr: u32, value: u64) -> MsrResult {
        let r = match &self.router {
            Some(r) if devices::lapic::Lapic::handles_msr(msr) => {
                if r.lapic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write_msr(msr, value)
                {
                    MsrResult::Done(0)
                } else {
                    MsrResult::Fault
                }
            }
            _ => MsrResult::Unhandled,
        };
        if r == MsrResult::Done(0) {
            if let Some(rt) = &self.router {
                rt.pump();
            }
            self.refresh_deadline();
        }
        r
    }

    fn tsc(&mut self) -> Option<u64> {
        self.router
            .as_ref()
            .map(|r| r.lapic.lock().unwrap_or_else(|e| e.into_inner()).tsc())
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

    fn cr8_read(&mut self) -> Option<u64> {
        self.router
            .as_ref()
            .map(|r| u64::from(r.lapic.lock().unwrap_or_else(|e| e.into_inner()).tpr() >> 4))
    }

    fn cr8_write(&mut self, cr8: u64) -> bool {
        let Some(r) = &self.router else {
            return false;
        };
        r.lapic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_tpr(((cr8 & 0xf) << 4) as u8);
        r.pump();
        true
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
    use devices::BusDevice;

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
        let mut pio = Bus::new(BusKind::Pio);
        pio.insert("echo", 0x3f8, 8, Arc::new(Mutex::new(Echo(0))))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("duet-trace-test-{}", std::process::id()));
        let tracer = Tracer::to_file(&dir).unwrap();
        let clock: Arc<dyn Clock> = Arc::new(devices::ManualClock::new());
        let timers = Timers::new(clock, Vec::new(), None);
        let mut io = DeviceIo::new(
            pio,
            Bus::new(BusKind::Mmio),
            tracer,
            VmControl::new(),
            TimeTaint::new(),
            timers,
            None,
        );
        io.pio_write(0x3f8, &[0x48]);
        let mut b = [0u8; 1];
        io.pio_read(0x3fd, &mut b);
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
            counts[&(BusKind::Pio, "echo".to_string())],
            AccessCount {
                reads: 1,
                writes: 1
            }
        );
        assert_eq!(unmapped.reads, 1);
    }

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

    fn io_with(clock: Arc<dyn Clock>, vclock: Option<VirtualClock>, deadline: u64) -> DeviceIo {
        let timer: Arc<Mutex<dyn Timed + Send>> = Arc::new(Mutex::new(OneShot(Some(deadline))));
        let timers = Timers::new(clock, vec![timer], vclock);
        DeviceIo::new(
            Bus::new(BusKind::Pio),
            Bus::new(BusKind::Mmio),
            Tracer::disabled(),
            VmControl::new(),
            TimeTaint::new(),
            timers,
            None,
        )
    }

    #[test]
    fn virtual_time_names_the_exact_instruction_of_a_deadline() {
        let v = VirtualClock::new();
        let mut io = io_with(Arc::new(v.clone()), Some(v.clone()), 12_345);
        let n = io.next_check(100);
        assert_eq!(n, 12_345 / crate::clock::VIRTUAL_NS_PER_INSTRUCTION);
        io.instructions_retired(n - 1);
        assert!(!io.exit_requested(), "one instruction early");
        io.instructions_retired(n);
        assert!(io.exit_requested(), "due at exactly that count");
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

    #[test]
    fn comparison_masks_time_dependent_values_only() {
        let a = "pio  r 0x0040 1 0x12 pit time\npio  w 0x03f8 1 0x41 com1\n";
        let b = "pio  r 0x0040 1 0x99 pit time\npio  w 0x03f8 1 0x41 com1\n";
        assert_eq!(compare_traces(a, b), None);
        let c = "pio  r 0x0040 1 0x12 pit time\npio  w 0x03f8 1 0x42 com1\n";
        assert_eq!(compare_traces(a, c).unwrap().0, 2);
        // A missing marker or a different address is a difference.
        let d = "pio  r 0x0041 1 0x12 pit time\npio  w 0x03f8 1 0x41 com1\n";
        assert_eq!(compare_traces(a, d).unwrap().0, 1);
        assert_eq!(compare_traces(a, "").unwrap().0, 1);
    }
}
