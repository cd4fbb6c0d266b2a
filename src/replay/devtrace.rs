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
    /// The devices' accesses to guest memory.
    dma: Option<Arc<DmaLog>>,
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
            dma: None,
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

    /// Write the devices' accesses to guest memory (`dma` lines), each
    /// after the operation that caused it.
    pub fn watch_dma(&mut self, log: Arc<DmaLog>) {
        self.dma = Some(log);
    }

    /// Write the memory accesses, then the signals, seen since the last
    /// operation.
    fn signals(&mut self) {
        if let Some(d) = self.dma.clone() {
            for e in d.take() {
                self.line(format_args!("{e}"));
            }
        }
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
        if let Some(d) = &self.dma {
            d.take();
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

    /// The virtio devices (and NICs) were polled for host input.
    pub fn poll(&mut self) {
        self.line(format_args!("poll"));
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

/// One device access to guest memory, as a trace line shows it:
/// `dma  r ADDR LEN HEX` (the bytes the device read) or `dma  w ADDR LEN
/// HEX` (the bytes the range held when the operation was over); `-` for
/// a range outside RAM (the access failed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmaAccess {
    pub write: bool,
    pub addr: u64,
    pub len: usize,
    pub bytes: Option<Vec<u8>>,
}

impl std::fmt::Display for DmaAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rw = if self.write { 'w' } else { 'r' };
        write!(f, "dma  {rw} {:#x} {} ", self.addr, self.len)?;
        match &self.bytes {
            Some(b) => b.iter().try_for_each(|x| write!(f, "{x:02x}")),
            None => f.write_str("-"),
        }
    }
}

fn read_guest(mem: &devices::guest_memory::GuestMemory, addr: u64, len: usize) -> Option<Vec<u8>> {
    use vm_memory::Bytes;
    let mut b = vec![0; len];
    mem.read_slice(&mut b, vm_memory::GuestAddress(addr))
        .ok()
        .map(|()| b)
}

/// The recording side: notes every device access to guest memory (the
/// bytes of a read at once, the range of a write), for the trace writer
/// to write after the operation that caused it.
pub struct DmaLog {
    mem: devices::guest_memory::GuestMemory,
    seen: std::sync::Mutex<Vec<DmaAccess>>,
}

impl DmaLog {
    pub fn new(mem: devices::guest_memory::GuestMemory) -> Self {
        DmaLog {
            mem,
            seen: Default::default(),
        }
    }

    /// The accesses since the last call; a write's bytes are read now.
    fn take(&self) -> Vec<DmaAccess> {
        let mut v = std::mem::take(&mut *self.seen.lock().unwrap_or_else(|e| e.into_inner()));
        for a in v.iter_mut().filter(|a| a.write) {
            a.bytes = read_guest(&self.mem, a.addr, a.len);
        }
        v
    }
}

impl devices::dma::DmaWatch for DmaLog {
    fn access(&self, mem: &devices::guest_memory::GuestMemory, addr: u64, len: usize, write: bool) {
        let bytes = if write {
            None
        } else {
            read_guest(mem, addr, len)
        };
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(DmaAccess {
                write,
                addr,
                len,
                bytes,
            });
    }
}

/// The replay side: before an operation, the accesses its `dma` lines
/// list; each read the device models make puts the recorded bytes in
/// memory just before they read it; every access is checked against the
/// trace in order, and each write's bytes after the operation.
#[derive(Default)]
struct DmaFeed {
    state: std::sync::Mutex<FeedState>,
}

#[derive(Default)]
struct FeedState {
    /// (line number, line text, access) still expected.
    expected: std::collections::VecDeque<(usize, String, DmaAccess)>,
    /// Writes done: checked after the operation.
    written: Vec<(usize, String, DmaAccess)>,
    /// The line after the operation's last `dma` line.
    next_line: usize,
    error: Option<DeviceReplayError>,
}

impl DmaFeed {
    fn lock(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The accesses the next operation should make.
    fn expect(&self, accesses: Vec<(usize, String, DmaAccess)>, next_line: usize) {
        let mut s = self.lock();
        s.expected = accesses.into();
        s.written.clear();
        s.next_line = next_line;
        s.error = None;
    }

    /// After the operation: every expected access made, every write's
    /// bytes as recorded.
    fn check(&self, mem: &devices::guest_memory::GuestMemory) -> Result<(), DeviceReplayError> {
        let mut s = self.lock();
        if let Some(e) = s.error.take() {
            return Err(e);
        }
        if let Some((line, text, _)) = s.expected.pop_front() {
            return Err(DeviceReplayError::Differs {
                line,
                expected: text,
                got: "no such access to guest memory".into(),
            });
        }
        for (line, text, a) in std::mem::take(&mut s.written) {
            let got = read_guest(mem, a.addr, a.len);
            if got != a.bytes {
                let got = DmaAccess { bytes: got, ..a };
                return Err(DeviceReplayError::Differs {
                    line,
                    expected: text,
                    got: got.to_string(),
                });
            }
        }
        Ok(())
    }
}

impl devices::dma::DmaWatch for DmaFeed {
    fn access(&self, mem: &devices::guest_memory::GuestMemory, addr: u64, len: usize, write: bool) {
        use vm_memory::Bytes;
        let mut s = self.lock();
        if s.error.is_some() {
            return;
        }
        let got = DmaAccess {
            write,
            addr,
            len,
            bytes: None,
        };
        match s.expected.pop_front() {
            Some((line, text, want))
                if want.write == write && want.addr == addr && want.len == len =>
            {
                if write {
                    s.written.push((line, text, want));
                } else if let Some(b) = &want.bytes {
                    // In RAM when recorded, in RAM now (same memory size).
                    let _ = mem.write_slice(b, vm_memory::GuestAddress(addr));
                }
            }
            Some((line, text, _)) => {
                s.error = Some(DeviceReplayError::Differs {
                    line,
                    expected: text,
                    got: format!("{} (bytes not compared)", got),
                })
            }
            None => {
                let line = s.next_line;
                s.error = Some(DeviceReplayError::Differs {
                    line,
                    expected: "no more accesses to guest memory before this line".into(),
                    got: format!("{} (bytes not compared)", got),
                })
            }
        }
    }
}

/// Parse a `dma` line.
fn dma_line(
    n: usize,
    f: &mut std::str::SplitWhitespace<'_>,
) -> Result<DmaAccess, DeviceReplayError> {
    let write = match f.next() {
        Some("r") => false,
        Some("w") => true,
        _ => return Err(malformed(n, "expected r or w")),
    };
    let addr = num(n, f.next(), "address")?;
    let len = num(n, f.next(), "length")? as usize;
    let hex = f.next().unwrap_or("");
    let bytes = if hex == "-" {
        None
    } else {
        let b = parse_hex(n, hex)?;
        if b.len() != len {
            return Err(malformed(
                n,
                format!("{} bytes for a length of {len}", b.len()),
            ));
        }
        Some(b)
    };
    Ok(DmaAccess {
        write,
        addr,
        len,
        bytes,
    })
}

fn parse_hex(n: usize, hex: &str) -> Result<Vec<u8>, DeviceReplayError> {
    if hex.len() % 2 != 0 {
        return Err(malformed(n, "odd number of hex digits"));
    }
    (0..hex.len())
        .step_by(2)
        .map(|k| {
            hex.get(k..k + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| malformed(n, "not hexadecimal"))
        })
        .collect()
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
    /// Device accesses to guest memory fed and compared.
    pub dma: usize,
}

/// A device the trace's header plugs in, in plug order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TracedDevice {
    /// A PCI test device in this slot.
    PciTest(u8),
    /// An e1000 whose frames loop back, in this slot.
    E1000Loopback(u8),
    /// A built-in guest's virtio device (its index in the guest's list).
    BuiltinVirtio(usize, crate::guests::BuiltinVirtio),
}

/// The machine a trace's header describes.
#[derive(Clone, Debug, Default)]
pub struct TracedMachine {
    pub memory: u64,
    pub epoch: u64,
    /// Devices beyond the fixed machine, in plug order.
    pub plugged: Vec<TracedDevice>,
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

/// The header line of a built-in guest's virtio device.
pub fn builtin_virtio_header(index: usize, v: crate::guests::BuiltinVirtio) -> String {
    use crate::guests::BuiltinVirtioKind;
    let kind = match v.kind {
        BuiltinVirtioKind::Block => "blk",
        BuiltinVirtioKind::NetLoopback => "net-loopback",
        BuiltinVirtioKind::ConsoleLoopback => "console-loopback",
        BuiltinVirtioKind::Rng => "rng",
    };
    let transport = match v.transport {
        crate::machine::VirtioTransport::Pci => "pci",
        crate::machine::VirtioTransport::Mmio => "mmio",
    };
    format!("{index} {kind} {transport}")
}

/// Read a trace's header.
pub fn traced_machine(text: &str) -> Result<TracedMachine, DeviceReplayError> {
    use crate::guests::{BuiltinVirtio, BuiltinVirtioKind};
    use crate::machine::VirtioTransport;
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
    // A `virtio` line right after `builtin-virtio` names that device.
    let mut builtin_pending = false;
    for (i, l) in lines.enumerate() {
        let n = i + 2;
        let Some(h) = l.strip_prefix("# ") else {
            continue;
        };
        let mut f = h.split_whitespace();
        let key = f.next();
        let after_builtin = std::mem::replace(&mut builtin_pending, false);
        match key {
            Some("memory") => m.memory = num(n, f.next(), "memory size")?,
            Some("epoch") => m.epoch = num(n, f.next(), "epoch")?,
            Some("pci") => match f.next() {
                Some("test") => m
                    .plugged
                    .push(TracedDevice::PciTest(num(n, f.next(), "slot")? as u8)),
                Some("e1000-loopback") => m
                    .plugged
                    .push(TracedDevice::E1000Loopback(num(n, f.next(), "slot")? as u8)),
                _ => return Err(malformed(n, "only PCI test devices and the loopback e1000 can be replayed")),
            },
            Some("builtin-virtio") => {
                let index = num(n, f.next(), "index")? as usize;
                let kind = match f.next() {
                    Some("blk") => BuiltinVirtioKind::Block,
                    Some("net-loopback") => BuiltinVirtioKind::NetLoopback,
                    Some("console-loopback") => BuiltinVirtioKind::ConsoleLoopback,
                    Some("rng") => BuiltinVirtioKind::Rng,
                    _ => return Err(malformed(n, "unknown built-in virtio device")),
                };
                let transport = match f.next() {
                    Some("pci") => VirtioTransport::Pci,
                    Some("mmio") => VirtioTransport::Mmio,
                    _ => return Err(malformed(n, "unknown virtio transport")),
                };
                m.plugged
                    .push(TracedDevice::BuiltinVirtio(index, BuiltinVirtio { kind, transport }));
                builtin_pending = true;
            }
            Some("irqchip") if f.next() != Some("userspace") => {
                return Err(malformed(
                    n,
                    "traces of KVM's in-kernel irqchip cannot be replayed (its devices are in the kernel)",
                ));
            }
            Some("virtio") if !after_builtin => {
                return Err(malformed(
                    n,
                    format!(
                        "virtio device {}: its host side (a disk image, a network, a console, host entropy) is not in the trace; only the built-in guests' virtio devices can be replayed",
                        f.next().unwrap_or("?")
                    ),
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
    let machine_err = |e: crate::machine::MachineError| DeviceReplayError::Machine(e.to_string());
    let mut m = Machine::new(cfg).map_err(machine_err)?;
    let feed = Arc::new(DmaFeed::default());
    m.set_dma_watch(feed.clone());
    for d in &tm.plugged {
        match *d {
            TracedDevice::PciTest(slot) => {
                m.add_pci_device(PciDeviceSpec {
                    kind: PciDeviceKind::Test,
                    slot: Some(slot),
                })
                .map_err(machine_err)?;
            }
            TracedDevice::E1000Loopback(slot) => {
                m.add_pci_device(PciDeviceSpec {
                    kind: PciDeviceKind::E1000Loopback,
                    slot: Some(slot),
                })
                .map_err(machine_err)?;
            }
            TracedDevice::BuiltinVirtio(index, v) => {
                m.add_builtin_virtio(index, v).map_err(machine_err)?
            }
        }
    }
    if let Some(p) = patch {
        p(&mut m);
    }
    let uart = m.uart.clone();
    let mem = m.memory().clone();
    let (io, chip, virtio) = m.device_side();
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
    let all: Vec<&str> = text.lines().collect();
    let mut raised: std::collections::VecDeque<LineEvent> = Default::default();
    let mut report = DeviceReplayReport::default();
    for (i, l) in all.iter().enumerate() {
        let n = i + 1;
        report.lines = n;
        if l.starts_with('#') || l.is_empty() || l.starts_with("dma ") {
            // `dma` lines were taken with the operation before them.
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
        // The guest memory this operation's devices access.
        let mut accesses = Vec::new();
        let mut j = i + 1;
        while let Some(d) = all.get(j).and_then(|d| d.strip_prefix("dma ")) {
            accesses.push((
                j + 1,
                all[j].to_string(),
                dma_line(j + 1, &mut d.split_whitespace())?,
            ));
            j += 1;
        }
        report.dma += accesses.len();
        feed.expect(accesses, j + 1);
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
            "poll" => {
                virtio.poll_all();
                chip.pump();
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
                let bytes = parse_hex(n, f.next().unwrap_or(""))?;
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
        feed.check(&mem)?;
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
