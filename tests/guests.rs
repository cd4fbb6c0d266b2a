//! Every built-in guest, on both backends: the serial output equals the
//! golden file on each, and the device traces of the two backends are
//! byte-identical (same devices, same behaviour).

mod common;

use common::*;
use duet::backend::BackendKind;
use duet::machine::Outcome;

fn check_interp(name: &str) -> RunResult {
    let r = run_guest(name, BackendKind::Interp);
    assert_eq!(
        r.serial,
        golden(name),
        "{name}: interpreter serial output differs from golden"
    );
    assert!(!r.trace.is_empty(), "{name}: empty trace");
    r
}

fn check_both(name: &str) {
    let i = check_interp(name);
    if !kvm_or_skip(name) {
        return;
    }
    let k = run_guest(name, BackendKind::Kvm);
    assert_eq!(
        k.serial,
        golden(name),
        "{name}: KVM serial output differs from golden"
    );
    assert_eq!(i.outcome, k.outcome, "{name}: outcomes differ");
    if let Some(d) = trace_difference(&i.trace, &k.trace) {
        panic!("{name}: device traces differ between backends: {d}");
    }
}

#[test]
fn hello_real() {
    check_both("hello-real");
}

#[test]
fn long_mode() {
    check_both("long-mode");
}

#[test]
fn checksum() {
    check_both("checksum");
    let r = run_guest("checksum", BackendKind::Interp);
    let expected = duet::guests::checksum::expected_checksum();
    assert!(
        r.serial.contains(&format!("{expected:#010x}")),
        "serial: {}",
        r.serial
    );
    assert_eq!(r.outcome, Outcome::DebugExit(((expected & 0xff) << 1) | 1));
}

#[test]
fn fault() {
    check_both("fault");
}

#[test]
fn swint() {
    check_both("swint");
}

/// KVM-PVM refuses `int3`/`int n` in ring 0; the KVM backend hands those
/// instructions to the interpreter and resumes. The guest must finish with
/// the same output as on the interpreter, and the fallback must be counted.
#[test]
fn kvm_falls_back_to_the_interpreter() {
    if !kvm_or_skip("kvm_falls_back_to_the_interpreter") {
        return;
    }
    let k = run_guest("swint", BackendKind::Kvm);
    assert_eq!(k.serial, golden("swint"));
    assert!(
        k.stats.interp_fallbacks > 0,
        "expected the KVM backend to fall back to the interpreter at least once (stats: {:?})",
        k.stats
    );
}

#[test]
fn interpreter_counts_instructions() {
    let r = run_guest("hello-real", BackendKind::Interp);
    let n = r
        .stats
        .instructions
        .expect("the interpreter knows its instruction count");
    // The guest prints ~23 characters with a polling loop each.
    assert!(n > 100, "only {n} instructions retired");
}
