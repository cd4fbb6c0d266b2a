//! Shared helpers for the integration tests: run a built-in guest on a
//! backend, capture its serial output and device trace.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub mod console;
pub mod net;

use duet::backend::{self, BackendKind, IrqchipKind, VcpuStats};
use duet::clock::ClockKind;
use duet::guests;
use duet::machine::{Machine, MachineConfig, Outcome};

/// A `Write` sink tests can read back.
#[derive(Clone, Default)]
pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct RunResult {
    pub serial: String,
    pub trace: String,
    pub outcome: Outcome,
    pub stats: VcpuStats,
    /// Writes that went through the coalesced MMIO queue.
    pub coalesced_writes: u64,
    /// The coalesced ranges in force at the end.
    pub coalesced_ranges: Vec<(u64, u64)>,
}

/// Is KVM usable? Prints why not (the test then skips).
pub fn kvm_or_skip(test: &str) -> bool {
    backend::kvm_or_skip(test)
}

fn temp_path(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("duet-test-{}-{tag}-{n}.trace", std::process::id()))
}

/// Boot built-in guest `name` on `kind` with tracing on.
pub fn run_guest(name: &str, kind: BackendKind) -> RunResult {
    run_guest_with(name, kind, ClockKind::Host)
}

/// Boot built-in guest `name` on `kind` with the given clock.
pub fn run_guest_with(name: &str, kind: BackendKind, clock: ClockKind) -> RunResult {
    run_guest_full(name, kind, clock, IrqchipKind::Userspace)
}

/// Boot built-in guest `name` with the given interrupt controllers.
pub fn run_guest_irqchip(name: &str, kind: BackendKind, irqchip: IrqchipKind) -> RunResult {
    run_guest_full(name, kind, ClockKind::Host, irqchip)
}

fn run_guest_full(
    name: &str,
    kind: BackendKind,
    clock: ClockKind,
    irqchip: IrqchipKind,
) -> RunResult {
    run_guest_budget(name, kind, clock, irqchip, None)
}

/// Boot built-in guest `name`, returning to the VMM every `budget`
/// instructions (interpreter) when given.
pub fn run_guest_budget(
    name: &str,
    kind: BackendKind,
    clock: ClockKind,
    irqchip: IrqchipKind,
    budget: Option<u64>,
) -> RunResult {
    run_guest_tier(
        name,
        kind,
        clock,
        irqchip,
        budget,
        duet::machine::default_tier(),
    )
}

/// [`run_guest_budget`] on the given execution tier of the interpreter
/// backend.
pub fn run_guest_tier(
    name: &str,
    kind: BackendKind,
    clock: ClockKind,
    irqchip: IrqchipKind,
    budget: Option<u64>,
    tier: cpu_interp::Tier,
) -> RunResult {
    let guest = guests::find(name).unwrap_or_else(|| panic!("no built-in guest {name}"));
    let out = SharedBuf::default();
    let trace = temp_path(name);
    let cfg = MachineConfig {
        memory: 64 << 20,
        trace: Some(trace.clone()),
        clock,
        irqchip,
        tier,
        ..MachineConfig::new(kind, Box::new(out.clone()))
    };
    let mut m = Machine::new(cfg).expect("machine");
    if let Some(b) = budget {
        m.set_run_budget(b);
    }
    m.load(&(guest.build)()).expect("load");
    let outcome = m.run().expect("run");
    let stats = m.vcpu_stats();
    let coalesced_writes = m.coalesced_writes();
    let coalesced_ranges = m.coalesced_ranges();
    drop(m);
    let trace_text = std::fs::read_to_string(&trace).expect("trace file");
    std::fs::remove_file(&trace).ok();
    let serial = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    RunResult {
        serial,
        trace: trace_text,
        outcome,
        stats,
        coalesced_writes,
        coalesced_ranges,
    }
}

/// The file holding a guest's golden serial output.
pub fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(format!("{name}.serial.txt"))
}

/// Boot built-in guest `name` with coalesced MMIO on or off.
pub fn run_guest_coalesced(name: &str, kind: BackendKind, coalesced: bool) -> RunResult {
    let guest = guests::find(name).unwrap_or_else(|| panic!("no built-in guest {name}"));
    let out = SharedBuf::default();
    let trace = temp_path(&format!("{name}-coalesced-{coalesced}"));
    let cfg = MachineConfig {
        memory: 64 << 20,
        trace: Some(trace.clone()),
        coalesced_mmio: coalesced,
        ..MachineConfig::new(kind, Box::new(out.clone()))
    };
    let mut m = Machine::new(cfg).expect("machine");
    m.load(&(guest.build)()).expect("load");
    let outcome = m.run().expect("run");
    let stats = m.vcpu_stats();
    let coalesced_writes = m.coalesced_writes();
    let coalesced_ranges = m.coalesced_ranges();
    drop(m);
    let trace_text = std::fs::read_to_string(&trace).expect("trace file");
    std::fs::remove_file(&trace).ok();
    let serial = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    RunResult {
        serial,
        trace: trace_text,
        outcome,
        stats,
        coalesced_writes,
        coalesced_ranges,
    }
}

/// The golden serial output of a guest.
pub fn golden(name: &str) -> String {
    let p = golden_path(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Is `UPDATE_GOLDEN` set (to anything but empty or 0)? Then the golden
/// files are written from the runs instead of compared with them; the
/// change shows in `git diff` for a reviewer to accept or reject.
pub fn update_golden() -> bool {
    std::env::var("UPDATE_GOLDEN").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The golden files are produced by running the guests: compare `actual`
/// (the serial output of a run, described by `what`) with the golden file
/// `name`, or with `UPDATE_GOLDEN=1` write it there.
pub fn check_golden(name: &str, actual: &str, what: &str) {
    let p = golden_path(name);
    if update_golden() {
        if std::fs::read_to_string(&p).ok().as_deref() != Some(actual) {
            std::fs::write(&p, actual).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            println!("{what}: UPDATE_GOLDEN: wrote {}", p.display());
        }
        return;
    }
    let want = golden(name);
    if actual == want {
        return;
    }
    let line = actual
        .lines()
        .zip(want.lines())
        .position(|(a, b)| a != b)
        .unwrap_or_else(|| actual.lines().count().min(want.lines().count()));
    panic!(
        "{what}: serial output differs from {} at line {}:\n  got:  {:?}\n  want: {:?}\n\
         (UPDATE_GOLDEN=1 rewrites the golden files from the runs)\nfull output:\n{actual}",
        p.display(),
        line + 1,
        actual.lines().nth(line),
        want.lines().nth(line),
    );
}

/// Compare two traces (time-dependent values masked); describe the first
/// difference, or None when they match.
pub fn trace_difference(a: &str, b: &str) -> Option<String> {
    duet::trace::compare_traces(a, b).map(|(n, x, y)| format!("line {n}: `{x}` vs `{y}`"))
}
