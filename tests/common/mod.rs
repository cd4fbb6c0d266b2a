//! Shared helpers for the integration tests: run a built-in guest on a
//! backend, capture its serial output and device trace.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

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
}

/// Is KVM usable? Prints why not (the test then skips).
pub fn kvm_or_skip(test: &str) -> bool {
    match backend::kvm_available() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("{test}: skipping the KVM case: {why}");
            false
        }
    }
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
    let guest = guests::find(name).unwrap_or_else(|| panic!("no built-in guest {name}"));
    let out = SharedBuf::default();
    let trace = temp_path(name);
    let cfg = MachineConfig {
        memory: 64 << 20,
        trace: Some(trace.clone()),
        clock,
        irqchip,
        ..MachineConfig::new(kind, Box::new(out.clone()))
    };
    let mut m = Machine::new(cfg).expect("machine");
    if let Some(b) = budget {
        m.set_run_budget(b);
    }
    m.load(&(guest.build)()).expect("load");
    let outcome = m.run().expect("run");
    let stats = m.vcpu_stats();
    drop(m);
    let trace_text = std::fs::read_to_string(&trace).expect("trace file");
    std::fs::remove_file(&trace).ok();
    let serial = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    RunResult {
        serial,
        trace: trace_text,
        outcome,
        stats,
    }
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
    drop(m);
    let trace_text = std::fs::read_to_string(&trace).expect("trace file");
    std::fs::remove_file(&trace).ok();
    let serial = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    RunResult {
        serial,
        trace: trace_text,
        outcome,
        stats,
    }
}

/// The golden serial output of a guest.
pub fn golden(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(format!("{name}.serial.txt"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Compare two traces (time-dependent values masked); describe the first
/// difference, or None when they match.
pub fn trace_difference(a: &str, b: &str) -> Option<String> {
    duet::trace::compare_traces(a, b).map(|(n, x, y)| format!("line {n}: `{x}` vs `{y}`"))
}
