//! Serial input, end to end, on both backends: a host thread feeds bytes
//! through `SerialInput::feed` (the one place serial input enters the VM)
//! while the `serial-echo` guest waits for them with `sti; hlt`, taking
//! COM1's receive interrupt through IOAPIC pin 4. The guest echoes what it
//! got; the serial output must equal the golden file.
//!
//! The device trace counts the guest's interrupts: each handler writes the
//! local APIC's EOI register once, and reads RBR once per byte.
//!
//! Not tested: bytes fed before the guest enables its receive interrupt.
//! There is no deterministic way to place input there: before the machine
//! runs the UART's FIFOs are off (room for one byte), and the guest's FIFO
//! enable empties them; after that, the guest only tells the host where it
//! is through its serial output, which it writes after enabling the
//! interrupt.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use duet::backend::BackendKind;
use duet::console::SerialInput;
use duet::guests::serial_echo;
use duet::machine::{Machine, MachineConfig, Outcome};

const GUEST: &str = "serial-echo";
const INPUT: &[u8] = b"duet-rx!";
/// A run that takes longer than this is stuck (the guest waits forever
/// for input it did not get): the test process exits with a message
/// rather than hang.
const WATCHDOG: Duration = Duration::from_secs(60);

/// How the host thread delivers [`INPUT`] once the prompt is out.
#[derive(Clone, Copy, Debug)]
enum Feed {
    /// One `feed` call with all the bytes.
    AllAtOnce,
    /// One byte per `feed` call, with this pause after each.
    OneByOne(Duration),
}

struct FedRun {
    serial: String,
    outcome: Outcome,
    /// EOI writes to the local APIC: one per interrupt taken.
    eois: usize,
    /// Reads of COM1's RBR.
    rbr_reads: usize,
}

fn temp_trace(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "duet-test-{}-serial-input-{tag}.trace",
        std::process::id()
    ))
}

fn captured(out: &SharedBuf) -> String {
    String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned()
}

/// Push everything `input` holds into the UART, retrying as its FIFO
/// drains.
fn flush_all(input: &mut SerialInput) {
    while input.flush() > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Boot `serial-echo` on `kind` and feed it [`INPUT`] from a host thread
/// once its prompt appears; run the machine on this thread.
fn run_fed(kind: BackendKind, feed: Feed) -> FedRun {
    let out = SharedBuf::default();
    let trace = temp_trace(&format!("{kind:?}-{feed:?}").replace([' ', '(', ')', '.'], "_"));
    let cfg = MachineConfig {
        memory: 64 << 20,
        trace: Some(trace.clone()),
        ..MachineConfig::new(kind, Box::new(out.clone()))
    };
    let mut machine = Machine::new(cfg).expect("machine");
    machine.load(&serial_echo::build()).expect("load");
    let mut input = machine.serial_input();

    let done = Arc::new(AtomicBool::new(false));
    let feeder = {
        let out = out.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let stuck = |what: &str| -> ! {
                eprintln!(
                    "{kind:?}, {feed:?}: {what} after {WATCHDOG:?}; serial output so far: {:?}",
                    captured(&out)
                );
                std::process::exit(1);
            };
            while !captured(&out).contains(serial_echo::PROMPT) {
                if start.elapsed() > WATCHDOG {
                    stuck("no prompt");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            match feed {
                Feed::AllAtOnce => {
                    input.feed(INPUT);
                    flush_all(&mut input);
                }
                Feed::OneByOne(gap) => {
                    for &b in INPUT {
                        input.feed(&[b]);
                        flush_all(&mut input);
                        std::thread::sleep(gap);
                    }
                }
            }
            // The guest waits for interrupts forever if it missed one: a
            // stopped run must not hang the suite.
            while !done.load(Ordering::Acquire) {
                if start.elapsed() > WATCHDOG {
                    stuck("the guest did not stop");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let outcome = machine.run().expect("run");
    done.store(true, Ordering::Release);
    feeder.join().expect("feeder thread");
    drop(machine);

    let trace_text = std::fs::read_to_string(&trace).expect("trace file");
    std::fs::remove_file(&trace).ok();
    let eois = trace_text
        .lines()
        .filter(|l| l.starts_with("mmio w 0xfee000b0 ") && l.ends_with(" lapic"))
        .count();
    let rbr_reads = trace_text
        .lines()
        .filter(|l| l.starts_with("pio  r 0x03f8 ") && l.ends_with(" com1"))
        .count();
    FedRun {
        serial: captured(&out),
        outcome,
        eois,
        rbr_reads,
    }
}

/// Run and check the output; returns the number of interrupts taken.
fn check(kind: BackendKind, feed: Feed) -> usize {
    let r = run_fed(kind, feed);
    check_golden(GUEST, &r.serial, &format!("{GUEST}, {kind:?}, {feed:?}"));
    assert_eq!(r.outcome, Outcome::Stopped, "{kind:?}, {feed:?}");
    assert_eq!(
        r.rbr_reads,
        INPUT.len(),
        "{kind:?}, {feed:?}: one RBR read per byte"
    );
    eprintln!("{kind:?}, {feed:?}: {} receive interrupt(s)", r.eois);
    r.eois
}

fn backends(test: &str) -> Vec<BackendKind> {
    let mut kinds = vec![BackendKind::Interp];
    if kvm_or_skip(test) {
        kinds.push(BackendKind::Kvm);
    }
    kinds
}

#[test]
fn golden_is_the_prompt_and_the_echo() {
    assert_eq!(golden(GUEST), serial_echo::expected_serial(INPUT));
    assert!(
        duet::guests::find(GUEST).is_some_and(|g| g.needs_input),
        "{GUEST} is listed as needing input"
    );
}

/// All eight bytes in one `feed`: they land in the FIFO together, the
/// line rises once, and one handler drains them all.
#[test]
fn receives_bytes_fed_at_once() {
    for kind in backends("receives_bytes_fed_at_once") {
        let interrupts = check(kind, Feed::AllAtOnce);
        assert_eq!(interrupts, 1, "{kind:?}: one interrupt for one burst");
    }
}

/// One byte every 20 ms: the guest drains each before the next arrives,
/// so it takes several interrupts (one per byte unless the host thread
/// is delayed).
#[test]
fn receives_bytes_fed_one_at_a_time() {
    for kind in backends("receives_bytes_fed_one_at_a_time") {
        let interrupts = check(kind, Feed::OneByOne(Duration::from_millis(20)));
        assert!(
            (2..=INPUT.len()).contains(&interrupts),
            "{kind:?}: {interrupts} interrupts for {} bytes fed one at a time",
            INPUT.len()
        );
    }
}

/// A quit posted from a host thread (Ctrl-A x) ends a VM whose vCPU is
/// halted with interrupts enabled and no timer armed.
#[test]
fn host_quit_ends_a_halted_guest() {
    for kind in backends("host_quit_ends_a_halted_guest") {
        let out = SharedBuf::default();
        let cfg = MachineConfig {
            memory: 64 << 20,
            ..MachineConfig::new(kind, Box::new(out.clone()))
        };
        let mut m = Machine::new(cfg).expect("machine");
        m.load(&serial_echo::build()).expect("load");
        let control = m.control();
        let kick = m.kicker();
        let watch = out.clone();
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            while !captured(&watch).contains("ready") {
                assert!(start.elapsed() < Duration::from_secs(60), "no prompt");
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(50));
            control.request(devices::VmAction::HostQuit);
            kick.kick();
        });
        assert_eq!(m.run().expect("run"), Outcome::HostQuit, "{kind:?}");
        t.join().unwrap();
    }
}
