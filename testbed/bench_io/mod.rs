//! `duet bench io`: the emulated-vs-paravirtual-vs-accelerated I/O report.
//!
//! One workload, a matrix of paths: NIC model {e1000, virtio-net over
//! PCI, virtio-net over MMIO} × backend {interpreter, KVM} × interrupt
//! controllers {duet's userspace ones, KVM's in-kernel ones} × coalesced
//! MMIO {off, on}. The workload is a built-in guest with a small driver
//! that sends a fixed number of frames through a loopback backend and
//! waits for each to come back (`e1000` for the e1000, `virtio-net-pci`
//! and `virtio-net-mmio` for virtio-net: the same frames, the same
//! checks, the same guest on every cell of a path). Per cell: throughput, device accesses (VM exits
//! on KVM, I/O callbacks on the interpreter) per MB, interrupts per MB,
//! guest instructions per packet (interpreter), the round-trip time of a
//! small frame, and host CPU seconds per MB.
//!
//! Cells a host or this build cannot run are kept, with the reason (no
//! KVM, no in-kernel interrupt controller on the interpreter). Results go to `io-results.csv` and a self-contained
//! `io-report.html` with one SVG bar chart per metric (one series per NIC
//! path, one group per backend configuration); every bar carries its CSV
//! value in `data-value`, so a test can check the plot against the table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::{BackendKind, IrqchipKind};
use crate::guests::{e1000_loop, virtio as virtio_guest, GuestImage};
use crate::machine::{Machine, MachineConfig, Outcome, VirtioTransport};

/// Frames of the throughput run (full-size) and of the latency run (64 B).
pub const DEFAULT_FRAMES: u32 = 2048;
pub const LATENCY_FRAMES: u32 = 256;
pub const SMALL_FRAME: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum BenchIoError {
    #[error("{path}: {err}")]
    Write { path: String, err: std::io::Error },
}

/// A NIC path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicPath {
    E1000,
    VirtioPci,
    VirtioMmio,
}

impl NicPath {
    pub const ALL: [NicPath; 3] = [NicPath::E1000, NicPath::VirtioPci, NicPath::VirtioMmio];

    pub fn name(self) -> &'static str {
        match self {
            NicPath::E1000 => "e1000",
            NicPath::VirtioPci => "virtio-net-pci",
            NicPath::VirtioMmio => "virtio-net-mmio",
        }
    }

    /// The loopback guest of this path: `frames` frames of `frame_len`
    /// bytes.
    pub fn guest(self, frames: u32, frame_len: u32) -> GuestImage {
        match self {
            NicPath::E1000 => e1000_loop::build_with(frames, frame_len),
            NicPath::VirtioPci => {
                virtio_guest::build_net_loop(VirtioTransport::Pci, frames, frame_len)
            }
            NicPath::VirtioMmio => {
                virtio_guest::build_net_loop(VirtioTransport::Mmio, frames, frame_len)
            }
        }
    }
}

/// One configuration of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cell {
    pub nic: NicPath,
    pub backend: BackendKind,
    pub irqchip: IrqchipKind,
    pub coalesced: bool,
}

impl Cell {
    /// The group label of the plots (everything but the NIC).
    pub fn config(&self) -> String {
        format!(
            "{}/{}/coalesced-{}",
            self.backend.name(),
            match self.irqchip {
                IrqchipKind::Userspace => "userspace",
                IrqchipKind::Kernel => "kernel",
            },
            if self.coalesced { "on" } else { "off" }
        )
    }
}

/// The whole matrix, in report order.
pub fn matrix() -> Vec<Cell> {
    let mut v = Vec::new();
    for backend in [BackendKind::Interp, BackendKind::Kvm] {
        for irqchip in [IrqchipKind::Userspace, IrqchipKind::Kernel] {
            for coalesced in [false, true] {
                for nic in NicPath::ALL {
                    v.push(Cell {
                        nic,
                        backend,
                        irqchip,
                        coalesced,
                    });
                }
            }
        }
    }
    v
}

/// What one cell measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    pub throughput_mb_s: f64,
    pub accesses_per_mb: f64,
    pub interrupts_per_mb: f64,
    /// Interpreter only.
    pub instructions_per_packet: Option<f64>,
    pub rtt_us: f64,
    pub cpu_s_per_mb: f64,
}

/// A cell's outcome: numbers, or why there are none.
#[derive(Clone, Debug, PartialEq)]
pub enum CellResult {
    Measured(Metrics),
    Skipped(String),
}

/// The metrics, as the CSV columns and the plots name them.
pub const METRICS: [(&str, &str); 6] = [
    ("throughput_mb_s", "throughput (MB/s)"),
    (
        "accesses_per_mb",
        "VM exits / MB (KVM), I/O callbacks / MB (interpreter)",
    ),
    ("interrupts_per_mb", "interrupts / MB"),
    (
        "instructions_per_packet",
        "guest instructions / packet (interpreter)",
    ),
    ("rtt_us", "round trip of a 64-byte frame (µs)"),
    ("cpu_s_per_mb", "host CPU seconds / MB"),
];

impl Metrics {
    fn get(&self, key: &str) -> Option<f64> {
        match key {
            "throughput_mb_s" => Some(self.throughput_mb_s),
            "accesses_per_mb" => Some(self.accesses_per_mb),
            "interrupts_per_mb" => Some(self.interrupts_per_mb),
            "instructions_per_packet" => self.instructions_per_packet,
            "rtt_us" => Some(self.rtt_us),
            "cpu_s_per_mb" => Some(self.cpu_s_per_mb),
            _ => None,
        }
    }
}

/// Why a cell cannot run here (None: it can).
pub fn unavailable(cell: &Cell, kvm: &Result<(), String>) -> Option<String> {
    match cell.backend {
        BackendKind::Interp if cell.irqchip == IrqchipKind::Kernel => {
            Some("the interpreter has no in-kernel interrupt controller".into())
        }
        BackendKind::Kvm => kvm.as_ref().err().map(|why| format!("no KVM: {why}")),
        _ => None,
    }
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we own; RUSAGE_SELF covers every
    // thread of the process (the vCPU runs on this one).
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// One run of the loopback guest: (wall s, cpu s, device accesses,
/// interrupts, instructions).
struct Run {
    wall: f64,
    cpu: f64,
    accesses: u64,
    interrupts: u64,
    instructions: Option<u64>,
}

/// The text of the guests' summary line, printed once the last frame is
/// back.
const SUMMARY: &[u8] = b"frames looped back";

/// The guest's serial output, with the time its summary line began: the
/// end of the workload. (The run itself ends later: the guest then halts
/// with interrupts off, which the in-kernel irqchip keeps inside KVM
/// until duet's periodic check, up to `IrqChip::kick_period` later.)
#[derive(Clone, Default)]
struct SummaryClock(std::sync::Arc<std::sync::Mutex<SummaryState>>);

#[derive(Default)]
struct SummaryState {
    line: Vec<u8>,
    line_start: Option<Instant>,
    summary_at: Option<Instant>,
}

impl std::io::Write for SummaryClock {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let now = Instant::now();
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for &c in b {
            if s.line.is_empty() {
                s.line_start = Some(now);
            }
            if c == b'\n' {
                s.line.clear();
            } else if s.line.len() < 256 {
                s.line.push(c);
            }
            if s.summary_at.is_none() && s.line.ends_with(SUMMARY) {
                s.summary_at = s.line_start;
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn run_once(cell: &Cell, frames: u32, frame_len: u32) -> Result<Run, String> {
    let img = cell.nic.guest(frames, frame_len);
    let serial = SummaryClock::default();
    let cfg = MachineConfig {
        memory: 64 << 20,
        irqchip: cell.irqchip,
        coalesced_mmio: cell.coalesced,
        ..MachineConfig::new(cell.backend, Box::new(serial.clone()))
    };
    let mut m = Machine::new(cfg).map_err(|e| e.to_string())?;
    m.load(&img).map_err(|e| e.to_string())?;
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    let outcome = m.run().map_err(|e| e.to_string())?;
    let end = serial
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .summary_at
        .ok_or("the guest printed no summary line")?;
    let wall = end.duration_since(t).as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    if outcome != Outcome::Stopped {
        return Err(format!("the guest ended with {}", outcome.describe()));
    }
    // KVM: VM exits (coalesced writes take none). The interpreter has no
    // exits: every device access is an I/O callback.
    let stats = m.vcpu_stats();
    let accesses = if cell.backend == BackendKind::Kvm {
        stats.exits.iter().map(|(_, n)| n).sum::<u64>()
    } else {
        let (counts, unmapped) = m.device_access_counts();
        counts
            .iter()
            .map(|c| c.count.reads + c.count.writes)
            .sum::<u64>()
            + unmapped.reads
            + unmapped.writes
    };
    let interrupts = m.nic_interrupts();
    Ok(Run {
        wall,
        cpu,
        accesses,
        interrupts,
        instructions: stats.instructions,
    })
}

/// Measure one cell `runs` times: each metric is the median of the runs.
pub fn measure(cell: &Cell, frames: u32, runs: u32) -> Result<Metrics, String> {
    let all = (0..runs.max(1))
        .map(|_| measure_once(cell, frames))
        .collect::<Result<Vec<_>, _>>()?;
    let median = |f: &dyn Fn(&Metrics) -> f64| -> f64 {
        let mut v: Vec<f64> = all.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(Metrics {
        throughput_mb_s: median(&|m| m.throughput_mb_s),
        accesses_per_mb: median(&|m| m.accesses_per_mb),
        interrupts_per_mb: median(&|m| m.interrupts_per_mb),
        instructions_per_packet: all[0]
            .instructions_per_packet
            .map(|_| median(&|m| m.instructions_per_packet.unwrap_or(0.0))),
        rtt_us: median(&|m| m.rtt_us),
        cpu_s_per_mb: median(&|m| m.cpu_s_per_mb),
    })
}

fn measure_once(cell: &Cell, frames: u32) -> Result<Metrics, String> {
    let big = run_once(cell, frames, e1000_loop::FRAME_LEN)?;
    let small = run_once(cell, LATENCY_FRAMES, SMALL_FRAME)?;
    let mb = f64::from(frames) * f64::from(e1000_loop::FRAME_LEN) / 1e6;
    Ok(Metrics {
        throughput_mb_s: mb / big.wall.max(1e-9),
        accesses_per_mb: big.accesses as f64 / mb,
        interrupts_per_mb: big.interrupts as f64 / mb,
        instructions_per_packet: big.instructions.map(|n| n as f64 / f64::from(frames)),
        rtt_us: small.wall * 1e6 / f64::from(LATENCY_FRAMES),
        cpu_s_per_mb: big.cpu / mb,
    })
}

/// Format a value the way the CSV and the plots both show it.
pub fn fmt_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.6}")
    }
}

/// The CSV: a header and one line per cell.
pub fn csv(results: &[(Cell, CellResult)]) -> String {
    let mut s = String::from("nic,backend,irqchip,coalesced_mmio,status");
    for (k, _) in METRICS {
        s.push(',');
        s.push_str(k);
    }
    s.push('\n');
    for (c, r) in results {
        let _ = write!(
            s,
            "{},{},{},{}",
            c.nic.name(),
            c.backend.name(),
            match c.irqchip {
                IrqchipKind::Userspace => "userspace",
                IrqchipKind::Kernel => "kernel",
            },
            if c.coalesced { "on" } else { "off" }
        );
        match r {
            CellResult::Measured(m) => {
                s.push_str(",measured");
                for (k, _) in METRICS {
                    s.push(',');
                    if let Some(v) = m.get(k) {
                        s.push_str(&fmt_value(v));
                    }
                }
            }
            CellResult::Skipped(why) => {
                let _ = write!(s, ",\"skipped: {}\"", why.replace('"', "'"));
                for _ in METRICS {
                    s.push(',');
                }
            }
        }
        s.push('\n');
    }
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const COLORS: [&str; 3] = ["#d95f02", "#1b9e77", "#7570b3"];

/// One bar chart: groups = configurations that measured anything, one
/// series (colour) per NIC path.
fn plot(key: &str, title: &str, results: &[(Cell, CellResult)]) -> String {
    let mut groups: Vec<String> = Vec::new();
    for (c, r) in results {
        if matches!(r, CellResult::Measured(m) if m.get(key).is_some())
            && !groups.contains(&c.config())
        {
            groups.push(c.config());
        }
    }
    let value = |nic: NicPath, g: &str| -> Option<f64> {
        results.iter().find_map(|(c, r)| match r {
            CellResult::Measured(m) if c.nic == nic && c.config() == g => m.get(key),
            _ => None,
        })
    };
    let max = groups
        .iter()
        .flat_map(|g| NicPath::ALL.iter().filter_map(|&n| value(n, g)))
        .fold(0.0f64, f64::max)
        .max(1e-12);
    let (w, h, left, bottom, top) = (640.0, 260.0, 70.0, 50.0, 30.0);
    let plot_h = h - bottom - top;
    let group_w = (w - left - 10.0) / (groups.len().max(1) as f64);
    let bar_w = group_w / 4.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="plot" data-metric="{key}" width="{w}" height="{h}" viewBox="0 0 {w} {h}">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="18" font-size="13" text-anchor="middle">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    // Axes.
    let _ = writeln!(
        s,
        r#"<g class="axis" data-axis="y"><line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/><text x="{}" y="{}" font-size="10" text-anchor="end">{}</text><text x="{}" y="{}" font-size="10" text-anchor="end">0</text></g>"#,
        h - bottom,
        left - 4.0,
        top + 4.0,
        fmt_value(max),
        left - 4.0,
        h - bottom
    );
    let _ = writeln!(
        s,
        r#"<g class="axis" data-axis="x"><line x1="{left}" y1="{0}" x2="{1}" y2="{0}" stroke="black"/>"#,
        h - bottom,
        w - 10.0
    );
    for (i, g) in groups.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-size="9" text-anchor="middle">{}</text>"#,
            left + group_w * (i as f64 + 0.5),
            h - bottom + 14.0,
            escape(g)
        );
    }
    s.push_str("</g>\n");
    for (si, nic) in NicPath::ALL.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<g class="series" data-path="{}" fill="{}">"#,
            nic.name(),
            COLORS[si]
        );
        for (gi, g) in groups.iter().enumerate() {
            if let Some(v) = value(*nic, g) {
                let bh = v / max * plot_h;
                let _ = writeln!(
                    s,
                    r#"<rect data-config="{}" data-value="{}" x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}"/>"#,
                    escape(g),
                    fmt_value(v),
                    left + group_w * gi as f64 + bar_w * (si as f64 + 0.5),
                    h - bottom - bh,
                    bar_w,
                    bh
                );
            }
        }
        s.push_str("</g>\n");
    }
    // Legend.
    for (si, nic) in NicPath::ALL.iter().enumerate() {
        let x = left + 150.0 * si as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}" font-size="10">{}</text>"#,
            h - 18.0,
            COLORS[si],
            x + 14.0,
            h - 9.0,
            nic.name()
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The self-contained HTML report.
pub fn html(results: &[(Cell, CellResult)], command: &str, host: &str) -> String {
    let mut s = String::from(
        "<!DOCTYPE html>\n<html>\n<head><meta charset=\"utf-8\"/><title>duet bench io</title>\n\
         <style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}</style></head>\n<body>\n",
    );
    let _ = writeln!(s, "<h1>duet bench io</h1>");
    let _ = writeln!(
        s,
        "<p>Command: <code>{}</code><br/>Host: {}</p>",
        escape(command),
        escape(host)
    );
    s.push_str(
        "<p>Workload: a built-in guest with a small NIC driver sends each frame through a \
         loopback backend and waits for its receive interrupt. Throughput uses full-size \
         frames; the round trip is timed with 64-byte frames. Device accesses are VM exits on \
         KVM and I/O callbacks on the interpreter. Each value is the median of the cell's runs \
         (<code>--runs</code>, 3 by default).</p>\n",
    );
    for (k, title) in METRICS {
        s.push_str(&plot(k, title, results));
    }
    s.push_str("<h2>All cells</h2>\n<table>\n<tr><th>nic</th><th>backend</th><th>irqchip</th><th>coalesced MMIO</th>");
    for (_, title) in METRICS {
        let _ = write!(s, "<th>{}</th>", escape(title));
    }
    s.push_str("</tr>\n");
    for (c, r) in results {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            c.nic.name(),
            c.backend.name(),
            match c.irqchip {
                IrqchipKind::Userspace => "userspace",
                IrqchipKind::Kernel => "kernel",
            },
            if c.coalesced { "on" } else { "off" }
        );
        match r {
            CellResult::Measured(m) => {
                for (k, _) in METRICS {
                    let _ = write!(
                        s,
                        "<td>{}</td>",
                        m.get(k).map(fmt_value).unwrap_or_default()
                    );
                }
            }
            CellResult::Skipped(why) => {
                let _ = write!(
                    s,
                    "<td colspan=\"{}\">skipped: {}</td>",
                    METRICS.len(),
                    escape(why)
                );
            }
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table>\n</body>\n</html>\n");
    s
}

/// A Markdown table of the measured cells (for BENCHMARKS.md).
pub fn markdown(results: &[(Cell, CellResult)]) -> String {
    let mut s = String::from("| nic | backend | irqchip | coalesced | MB/s | accesses/MB | interrupts/MB | insns/packet | 64 B RTT µs | CPU s/MB |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (c, r) in results {
        let head = format!(
            "| {} | {} | {} | {} |",
            c.nic.name(),
            c.backend.name(),
            match c.irqchip {
                IrqchipKind::Userspace => "userspace",
                IrqchipKind::Kernel => "kernel",
            },
            if c.coalesced { "on" } else { "off" }
        );
        match r {
            CellResult::Measured(m) => {
                s.push_str(&head);
                for (k, _) in METRICS {
                    let _ = write!(s, " {} |", m.get(k).map(fmt_value).unwrap_or("–".into()));
                }
                s.push('\n');
            }
            CellResult::Skipped(why) => {
                let _ = writeln!(s, "{head} skipped: {why} | | | | | |");
            }
        }
    }
    s
}

/// Run the matrix (`cells`), each cell `runs` times (the medians are
/// reported), one progress line per cell on `progress`, and write the CSV
/// and HTML into `out`. Returns the results.
pub fn run(
    cells: &[Cell],
    frames: u32,
    runs: u32,
    out: &Path,
    command: &str,
    progress: &mut dyn std::io::Write,
) -> Result<Vec<(Cell, CellResult)>, BenchIoError> {
    let kvm = crate::backend::kvm_available();
    let mut results = Vec::new();
    for (i, c) in cells.iter().enumerate() {
        let _ = write!(
            progress,
            "[{}/{}] {:<16} {:<40} ",
            i + 1,
            cells.len(),
            c.nic.name(),
            c.config()
        );
        let _ = progress.flush();
        let r = match unavailable(c, &kvm) {
            Some(why) => CellResult::Skipped(why),
            None => match measure(c, frames, runs) {
                Ok(m) => CellResult::Measured(m),
                Err(e) => CellResult::Skipped(format!("failed: {e}")),
            },
        };
        let _ = match &r {
            CellResult::Measured(m) => writeln!(
                progress,
                "{} MB/s, {} accesses/MB, {} µs RTT",
                fmt_value(m.throughput_mb_s),
                fmt_value(m.accesses_per_mb),
                fmt_value(m.rtt_us)
            ),
            CellResult::Skipped(why) => writeln!(progress, "skipped: {why}"),
        };
        results.push((*c, r));
    }
    let host = host_description();
    write_file(&out.join("io-results.csv"), &csv(&results))?;
    write_file(&out.join("io-report.html"), &html(&results, command, &host))?;
    Ok(results)
}

fn write_file(path: &PathBuf, text: &str) -> Result<(), BenchIoError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|err| BenchIoError::Write {
            path: dir.display().to_string(),
            err,
        })?;
    }
    std::fs::write(path, text).map_err(|err| BenchIoError::Write {
        path: path.display().to_string(),
        err,
    })
}

/// The host CPU model (from /proc/cpuinfo) for the report.
pub fn host_description() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

#[cfg(test)]
mod tests;
