//! Device-level traces (`duet run --device-trace FILE`) and their replay
//! against the device models with no CPU at all (`duet replay-devices`).
//!
//! A device trace is text, one call across the device boundary per line,
//! so a golden trace diffs line by line:
//!
//! ```text
//! # duet device trace 1
//! # memory 67108864
//! # epoch 1767225600
//! # pci test 03              (a PCI test device in slot 3)
//! time 120034                (the VM clock the next access read, ns)
//! pio  w 0x03f8 1 0x48 com1  (as in --trace)
//! mmio r 0xfee00030 4 0x00050014 lapic
//! msr  w 0x00000838 0x0000000000989680 ok
//! cr8  w 0x0
//! advance                    (timers fell due and fired)
//! irq  0x30                  (the VMM acknowledged vector 0x30 and injected it)
//! nmi
//! input com1 6c730a          (serial input entered the UART)
//! ```
//!
//! The replay builds the machine the header describes, sets the clock to
//! each `time`, performs every access, acknowledgement and timer advance in
//! order, and compares every read value and every acknowledged vector with
//! the trace: the first difference fails with its line number.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::{BusKind, Clock};

use crate::backend::{self, CpuState, Kick, MsrResult, Platform, Vcpu, VcpuExit, VcpuStats};
use crate::irqchip::{LineEvent, LineWatch};
use crate::trace::TraceError;

/// The first line of every device trace this duet writes (version 2:
/// interrupt line changes and MSIs are lines of their own).
pub const DEVICE_TRACE_MAGIC: &str = "# duet device trace 2";
/// Version 1 (no interrupt signals): still replayed, without them.
pub const DEVICE_TRACE_MAGIC_V1: &str = "# duet device trace 1";

/// The machine's clock, watched: the last value it returned and how many
/// reads so far, so that a trace notes the time an access saw.
pub struct ObservedClock {
    inner: Arc<dyn Clock>,
    last: AtomicU64,
    reads: AtomicU64,
}

impl ObservedClock {
    pub fn new(inner: Arc<dyn Clock>) -> Self {
        ObservedClock {
            inner,
            last: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }
}

impl Clock for ObservedClock {
    fn now_ns(&self) -> u64 {
        let v = self.inner.now_ns();
        self.last.store(v, Ordering::Relaxed);
        self.reads.fetch_add(1, Ordering::Relaxed);
        v
    }
}

/// Writes a device trace.
pub struct DeviceTraceWriter {
    out: BufWriter<File>,
    clock: Arc<ObservedClock>,
    /// The last `time` written.
    time: Option<u64>,
    error: Option<std::io::Error>,
    /// The interrupt controllers' line changes and MSIs.
    lines: Option<Arc<LineWatch>>,
}

fn value_of(data: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    let n = data.len().min(8);
    v[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(v)
}

impl DeviceTraceWriter {
    pub fn create(path: &Path, clock: Arc<ObservedClock>) -> Result<Self, TraceError> {
        let f = File::create(path).map_err(|source| TraceError::Create {
            path: path.display().to_string(),
            source,
        })?;
        let mut w = DeviceTraceWriter {
            out: BufWriter::new(f),
            clock,
            time: None,
            error: None,
            lines: None,
        };
        w.line(format_args!("{DEVICE_TRACE_MAGIC}"));
        Ok(w)
    }

    /// Write the interrupt signals `watch` sees (line changes, MSIs), each
    /// after the operation that caused it.
    pub fn watch_lines(&mut self, watch: Arc<LineWatch>) {
        watch.enable();
        self.lines = Some(watch);
    }

    /// Write the signals seen since the last operation.
    fn signals(&mut self) {
        let Some(w) = &self.lines else { return };
        for e in w.take() {
            match e {
                LineEvent::Line { gsi, level } => {
                    self.line(format_args!("line {gsi} {}", u8::from(level)))
                }
                LineEvent::Msi { address, data } => {
                    self.line(format_args!("msi  {address:#010x} {data:#06x}"))
                }
            }
        }
    }

    fn line(&mut self, args: std::fmt::Arguments<'_>) {
        if self.error.is_none() {
            if let Err(e) = self
                .out
                .write_fmt(args)
                .and_then(|()| self.out.write_all(b"\n"))
            {
                self.error = Some(e);
            }
        }
    }

    /// A header line (`# key value`). Signals so far belong to building
    /// the machine, which a replay does again: dropped.
    pub fn header(&mut self, key: &str, value: &str) {
        if let Some(w) = &self.lines {
            w.take();
        }
        self.line(format_args!("# {key} {value}"));
    }

    /// The clock-read count now: pass it to the line written after the
    /// operation, which then notes the time if the operation read it.
    #[inline]
    pub fn mark(&self) -> u64 {
        self.clock.reads.load(Ordering::Relaxed)
    }

    fn time_since(&mut self, mark: u64) {
        if self.clock.reads.load(Ordering::Relaxed) != mark {
            let t = self.clock.last.load(Ordering::Relaxed);
            if self.time != Some(t) {
                self.time = Some(t);
                self.line(format_args!("time {t}"));
            }
        }
    }

    pub fn access(
        &mut self,
        mark: u64,
        kind: BusKind,
        write: bool,
        addr: u64,
        data: &[u8],
        device: &str,
    ) {
        self.time_since(mark);
        let rw = if write { 'w' } else { 'r' };
        let n = data.len().min(8);
        let v = value_of(data);
        let len = data.len();
        match kind {
            BusKind::Pio => self.line(format_args!(
                "pio  {rw} {addr:#06x} {len} {v:#0w$x} {device}",
                w = 2 + 2 * n
            )),
            BusKind::Mmio => self.line(format_args!(
                "mmio {rw} {addr:#010x} {len} {v:#0w$x} {device}",
                w = 2 + 2 * n
            )),
        }
        self.signals();
    }

    pub fn msr(&mut self, mark: u64, write: bool, msr: u32, value: u64, r: MsrResult) {
        if r == MsrResult::Unhandled {
            // Not a machine MSR: no device saw it.
            return;
        }
        self.time_since(mark);
        let rw = if write { 'w' } else { 'r' };
        let (value, res) = match r {
            MsrResult::Done(v) if !write => (v, "ok".to_string()),
            MsrResult::Done(_) => (value, "ok".to_string()),
            other => (value, msr_result_name(other)),
        };
        self.line(format_args!("msr  {rw} {msr:#010x} {value:#018x} {res}"));
        self.signals();
    }

    pub fn cr8(&mut self, mark: u64, value: u64) {
        self.time_since(mark);
        self.line(format_args!("cr8  w {value:#x}"));
        self.signals();
    }

    pub fn advance(&mut self, mark: u64) {
        self.time_since(mark);
        self.line(format_args!("advance"));
        self.signals();
    }

    pub fn injected(&mut self, mark: u64, what: Injected) {
        self.time_since(mark);
        match what {
            Injected::Vector(v) => self.line(format_args!("irq  {v:#04x}")),
            Injected::Nmi => self.line(format_args!("nmi")),
        }
        self.signals();
    }

    pub fn input(&mut self, device: &str, bytes: &[u8]) {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.line(format_args!("input {device} {hex}"));
        self.signals();
    }

    pub fn finish(&mut self) -> Result<(), TraceError> {
        if let Some(e) = self.error.take() {
            return Err(TraceError::Write(e));
        }
        self.out.flush()?;
        Ok(())
    }
}

fn msr_result_name(r: MsrResult) -> String {
    match r {
        MsrResult::Done(_) => "ok".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// What the VMM injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injected {
    Vector(u8),
    Nmi,
}

/// A vCPU seen through the interrupt controllers' `service`: forwards to
/// the real one and notes what was injected (device traces).
pub struct InjectTap<'a> {
    pub inner: &'a mut dyn Vcpu,
    pub injected: Option<Injected>,
}

impl Vcpu for InjectTap<'_> {
    fn run(&mut self, io: &mut dyn Platform) -> backend::Result<VcpuExit> {
        self.inner.run(io)
    }
    fn state(&mut self) -> backend::Result<CpuState> {
        self.inner.state()
    }
    fn set_state(&mut self, state: &CpuState) -> backend::Result<()> {
        self.inner.set_state(state)
    }
    fn ready_for_interrupt(&mut self) -> bool {
        self.inner.ready_for_interrupt()
    }
    fn inject_interrupt(&mut self, vector: u8) -> backend::Result<()> {
        self.injected = Some(Injected::Vector(vector));
        self.inner.inject_interrupt(vector)
    }
    fn inject_nmi(&mut self) -> backend::Result<()> {
        self.injected = Some(Injected::Nmi);
        self.inner.inject_nmi()
    }
    fn request_interrupt_window(&mut self, on: bool) {
        self.inner.request_interrupt_window(on)
    }
    fn stats(&self) -> VcpuStats {
        self.inner.stats()
    }
    fn set_run_budget(&mut self, instructions: u64) {
        self.inner.set_run_budget(instructions)
    }
    fn kicker(&self) -> Arc<dyn Kick> {
        self.inner.kicker()
    }
}

struct NoKick;
impl Kick for NoKick {
    fn kick(&self) {}
}

/// The replay's stand-in for a CPU: always ready for an interrupt; notes
/// what the controllers acknowledge.
struct TraceVcpu {
    injected: Option<Injected>,
}

impl Vcpu for TraceVcpu {
    fn run(&mut self, _io: &mut dyn Platform) -> backend::Result<VcpuExit> {
        Ok(VcpuExit::Halted)
    }
    fn state(&mut self) -> backend::Result<CpuState> {
        Ok(CpuState::reset())
    }
    fn set_state(&mut self, _state: &CpuState) -> backend::Result<()> {
        Ok(())
    }
    fn ready_for_interrupt(&mut self) -> bool {
        true
    }
    fn inject_interrupt(&mut self, vector: u8) -> backend::Result<()> {
        self.injected = Some(Injected::Vector(vector));
        Ok(())
    }
    fn inject_nmi(&mut self) -> backend::Result<()> {
        self.injected = Some(Injected::Nmi);
        Ok(())
    }
    fn request_interrupt_window(&mut self, _on: bool) {}
    fn stats(&self) -> VcpuStats {
        VcpuStats::default()
    }
    fn kicker(&self) -> Arc<dyn Kick> {
        Arc::new(NoKick)
    }
}

/// Errors of a device-trace replay.
#[derive(Debug, thiserror::Error)]
pub enum DeviceReplayError {
    #[error("{path}: {reason}")]
    Read { path: String, reason: String },
    #[error("line {line}: {what}")]
    Malformed { line: usize, what: String },
    #[error("cannot build the traced machine: {0}")]
    Machine(String),
    /// A device model behaved differently.
    #[error("line {line}: the trace has `{expected}`, the device models gave `{got}`")]
    Differs {
        line: usize,
        expected: String,
        got: String,
    },
}

/// What a device-trace replay checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceReplayReport {
    pub lines: usize,
    pub reads: usize,
    pub writes: usize,
    pub interrupts: usize,
    /// Interrupt line changes and MSIs compared.
    pub signals: usize,
}

/// The machine a trace's header describes.
#[derive(Clone, Debug, Default)]
pub struct TracedMachine {
    pub memory: u64,
    pub epoch: u64,
    /// Slots of PCI test devices, in plug order.
    pub pci_test: Vec<u8>,
    /// The trace holds the interrupt signals (version 2).
    pub signals: bool,
}

fn malformed(line: usize, what: impl Into<String>) -> DeviceReplayError {
    DeviceReplayError::Malformed {
        line,
        what: what.into(),
    }
}

fn num(line: usize, s: Option<&str>, what: &str) -> Result<u64, DeviceReplayError> {
    let s = s.ok_or_else(|| malformed(line, format!("no {what}")))?;
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| malformed(line, format!("{what} `{s}` is not a number")))
}

/// Read a trace's header.
pub fn traced_machine(text: &str) -> Result<TracedMachine, DeviceReplayError> {
    let mut lines = text.lines();
    let signals = match lines.next() {
        Some(DEVICE_TRACE_MAGIC) => true,
        Some(DEVICE_TRACE_MAGIC_V1) => false,
        _ => {
            return Err(malformed(
                1,
                format!(
                    "not a duet device trace (the first line should be `{DEVICE_TRACE_MAGIC}`)"
                ),
            ))
        }
    };
    let mut m = TracedMachine {
        memory: crate::layout::DEFAULT_MEMORY,
        signals,
        ..Default::default()
    };
    for (i, l) in lines.enumerate() {
        let n = i + 2;
        let Some(h) = l.strip_prefix("# ") else {
            continue;
        };
        let mut f = h.split_whitespace();
        match f.next() {
            Some("memory") => m.memory = num(n, f.next(), "memory size")?,
            Some("epoch") => m.epoch = num(n, f.next(), "epoch")?,
            Some("pci") => {
                if f.next() != Some("test") {
                    return Err(malformed(n, "only PCI test devices can be replayed"));
                }
                m.pci_test.push(num(n, f.next(), "slot")? as u8);
            }
            Some("irqchip") if f.next() != Some("userspace") => {
                return Err(malformed(
                    n,
                    "traces of KVM's in-kernel irqchip cannot be replayed (its devices are in the kernel)",
                ));
            }
            Some("virtio") => {
                return Err(malformed(
                    n,
                    "virtio devices read guest memory, which a device trace does not hold: not replayable",
                ))
            }
            _ => {}
        }
    }
    Ok(m)
}

/// Replay `text` against fresh device models. `patch` may change the
/// machine before the replay starts (tests: a deliberately changed
/// device).
pub fn replay_devices(
    text: &str,
    patch: Option<&dyn Fn(&mut crate::machine::Machine)>,
) -> Result<DeviceReplayReport, DeviceReplayError> {
    use crate::machine::{Machine, MachineConfig, PciDeviceKind, PciDeviceSpec};
    let tm = traced_machine(text)?;
    let clock = Arc::new(devices::ManualClock::new());
    let cfg = MachineConfig {
        memory: tm.memory,
        epoch: Some(tm.epoch),
        manual_clock: Some(clock.clone()),
        ..MachineConfig::new(backend::BackendKind::Interp, Box::new(std::io::sink()))
    };
    let mut m = Machine::new(cfg).map_err(|e| DeviceReplayError::Machine(e.to_string()))?;
    for slot in &tm.pci_test {
        m.add_pci_device(PciDeviceSpec {
            kind: PciDeviceKind::Test,
            slot: Some(*slot),
        })
        .map_err(|e| DeviceReplayError::Machine(e.to_string()))?;
    }
    if let Some(p) = patch {
        p(&mut m);
    }
    let uart = m.uart.clone();
    let (io, chip) = m.device_side();
    // The signals the device models raise, compared one by one with the
    // trace's `line` and `msi` lines after each operation.
    let watch = if tm.signals {
        let w = chip.line_watch().ok_or_else(|| {
            DeviceReplayError::Machine("the interrupt controllers report no signals".into())
        })?;
        w.enable();
        Some(w)
    } else {
        None
    };
    let mut raised: std::collections::VecDeque<LineEvent> = Default::default();
    let mut report = DeviceReplayReport::default();
    for (i, l) in text.lines().enumerate() {
        let n = i + 1;
        report.lines = n;
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        let mut f = l.split_whitespace();
        let op = f.next().unwrap_or("");
        if let Some(w) = &watch {
            raised.extend(w.take());
            if op == "line" || op == "msi" {
                let want = if op == "line" {
                    LineEvent::Line {
                        gsi: num(n, f.next(), "line")? as u32,
                        level: num(n, f.next(), "level")? != 0,
                    }
                } else {
                    LineEvent::Msi {
                        address: num(n, f.next(), "MSI address")?,
                        data: num(n, f.next(), "MSI data")? as u32,
                    }
                };
                report.signals += 1;
                let got = raised.pop_front();
                if got != Some(want) {
                    return Err(DeviceReplayError::Differs {
                        line: n,
                        expected: l.to_string(),
                        got: got.map_or_else(|| "no interrupt signal".into(), signal_text),
                    });
                }
                continue;
            }
            if let Some(extra) = raised.pop_front() {
                return Err(DeviceReplayError::Differs {
                    line: n,
                    expected: l.to_string(),
                    got: format!("{} first (not in the trace)", signal_text(extra)),
                });
            }
        }
        match op {
            "time" => clock.set(num(n, f.next(), "time")?),
            "pio" | "mmio" => {
                let rw = f.next();
                let addr = num(n, f.next(), "address")?;
                let size = num(n, f.next(), "size")? as usize;
                if !(1..=8).contains(&size) {
                    return Err(malformed(n, format!("access size {size}")));
                }
                let value = num(n, f.next(), "value")?;
                let mut buf = value.to_le_bytes();
                let data = &mut buf[..size];
                match (op, rw) {
                    ("pio", Some("w")) => io.io_write(addr as u16, data),
                    ("mmio", Some("w")) => io.mmio_write(addr, data),
                    ("pio", Some("r")) => io.io_read(addr as u16, data),
                    ("mmio", Some("r")) => io.mmio_read(addr, data),
                    _ => return Err(malformed(n, "expected r or w")),
                }
                if rw == Some("r") {
                    report.reads += 1;
                    let got = value_of(data);
                    if got != value {
                        return Err(DeviceReplayError::Differs {
                            line: n,
                            expected: l.to_string(),
                            got: format!("read {got:#x}"),
                        });
                    }
                } else {
                    report.writes += 1;
                }
            }
            "msr" => {
                let rw = f.next();
                let msr = num(n, f.next(), "MSR")? as u32;
                let value = num(n, f.next(), "value")?;
                let want = f.next().unwrap_or("");
                let (got_v, r) = match rw {
                    Some("w") => (value, io.write_msr(msr, value)),
                    Some("r") => {
                        let r = io.read_msr(msr);
                        let v = if let MsrResult::Done(v) = r { v } else { value };
                        (v, r)
                    }
                    _ => return Err(malformed(n, "expected r or w")),
                };
                let res = msr_result_name(r);
                if got_v != value || res != want {
                    return Err(DeviceReplayError::Differs {
                        line: n,
                        expected: l.to_string(),
                        got: format!("{got_v:#018x} {res}"),
                    });
                }
            }
            "cr8" => {
                let _ = f.next();
                let v = num(n, f.next(), "CR8 value")?;
                io.write_cr8(v);
            }
            "advance" => {
                // The run loop keeps the earliest deadline current.
                io.refresh_deadline();
                io.timers.advance_due();
            }
            "irq" | "nmi" => {
                let want = if op == "nmi" {
                    Injected::Nmi
                } else {
                    Injected::Vector(num(n, f.next(), "vector")? as u8)
                };
                let mut v = TraceVcpu { injected: None };
                chip.service(0, &mut v)
                    .map_err(|e| DeviceReplayError::Machine(e.to_string()))?;
                report.interrupts += 1;
                if v.injected != Some(want) {
                    return Err(DeviceReplayError::Differs {
                        line: n,
                        expected: l.to_string(),
                        got: match v.injected {
                            Some(Injected::Vector(x)) => format!("irq  {x:#04x}"),
                            Some(Injected::Nmi) => "nmi".into(),
                            None => "no interrupt pending".into(),
                        },
                    });
                }
            }
            "input" => {
                let _dev = f.next();
                let hex = f.next().unwrap_or("");
                if hex.len() % 2 != 0 {
                    return Err(malformed(n, "odd number of hex digits"));
                }
                let mut bytes = Vec::with_capacity(hex.len() / 2);
                for k in (0..hex.len()).step_by(2) {
                    bytes.push(
                        u8::from_str_radix(&hex[k..k + 2], 16)
                            .map_err(|_| malformed(n, "input is not hexadecimal"))?,
                    );
                }
                let took = uart
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .enqueue_input(&bytes);
                if took != bytes.len() {
                    return Err(DeviceReplayError::Differs {
                        line: n,
                        expected: l.to_string(),
                        got: format!("the UART took {took} of {} bytes", bytes.len()),
                    });
                }
            }
            other => return Err(malformed(n, format!("unknown operation `{other}`"))),
        }
    }
    if let Some(w) = &watch {
        raised.extend(w.take());
        if let Some(extra) = raised.pop_front() {
            return Err(DeviceReplayError::Differs {
                line: report.lines + 1,
                expected: "the end of the trace".into(),
                got: signal_text(extra),
            });
        }
    }
    Ok(report)
}

/// A signal as a trace line shows it.
fn signal_text(e: LineEvent) -> String {
    match e {
        LineEvent::Line { gsi, level } => format!("line {gsi} {}", u8::from(level)),
        LineEvent::Msi { address, data } => format!("msi  {address:#010x} {data:#06x}"),
    }
}

/// Replay the device trace in `path`.
pub fn replay_device_file(path: &Path) -> Result<DeviceReplayReport, DeviceReplayError> {
    let text = std::fs::read_to_string(path).map_err(|e| DeviceReplayError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    replay_devices(&text, None)
}
