//! The whole machine's state: save, restore into a fresh machine of the
//! same configuration, save again — the same bytes; and both machines
//! behave the same afterwards (with the RAM copied across, which the
//! machine state does not hold).

mod common;

use common::SharedBuf;
use duet::backend::BackendKind;
use duet::clock::ClockKind;
use duet::guests;
use duet::machine::{Machine, MachineConfig};
use duet::state::MachineState;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

fn machine(guest: &str, out: SharedBuf) -> Machine {
    let cfg = MachineConfig {
        memory: 64 << 20,
        clock: ClockKind::Virtual,
        ..MachineConfig::new(BackendKind::Interp, Box::new(out))
    };
    let mut m = Machine::new(cfg).expect("machine");
    m.load(&(guests::find(guest).expect("guest").build)())
        .expect("load");
    m
}

fn copy_ram(from: &Machine, to: &Machine) {
    for r in from.memory().iter() {
        let mut buf = vec![0u8; r.len() as usize];
        from.memory()
            .read_slice(&mut buf, r.start_addr())
            .expect("read RAM");
        to.memory()
            .write_slice(&buf, GuestAddress(r.start_addr().0))
            .expect("write RAM");
    }
}

fn text(b: &SharedBuf) -> String {
    String::from_utf8_lossy(&b.0.lock().unwrap()).into_owned()
}

/// Pause `guest` after `at` instructions, save, restore into a fresh
/// machine; same bytes, then the same serial output and state after
/// another `more` instructions on both.
fn round_trip(guest: &str, at: u64, more: u64) {
    let out_a = SharedBuf::default();
    let mut a = machine(guest, out_a.clone());
    assert_eq!(
        a.run_for(at).expect("run"),
        None,
        "{guest} ended before {at}"
    );
    let saved = a.save_state().expect("save");
    let bytes = saved.to_bytes();
    let decoded = MachineState::from_bytes(&bytes).expect("decode");
    assert_eq!(decoded, saved);

    let out_b = SharedBuf::default();
    let mut b = machine(guest, out_b.clone());
    b.restore_state(&decoded).expect("restore");
    let again = b.save_state().expect("save again");
    assert!(
        again.to_bytes() == bytes,
        "{guest}: state differs after a restore: {:?}",
        saved.differences(&again)
    );

    copy_ram(&a, &b);
    let before = text(&out_a).len();
    let ra = a.run_for(more).expect("run a");
    let rb = b.run_for(more).expect("run b");
    assert_eq!(ra, rb, "{guest}: outcomes");
    assert_eq!(
        text(&out_a)[before..],
        text(&out_b),
        "{guest}: serial output after the restore"
    );
    let sa = a.save_state().expect("save a");
    let sb = b.save_state().expect("save b");
    assert!(
        sa == sb,
        "{guest}: states after {more} more instructions: {:?}",
        sa.differences(&sb)
    );
}

#[test]
fn machine_state_round_trips_and_behaves_the_same() {
    // Interrupt controllers with timers armed, the RTC, PCI devices with
    // BARs moved and MSI-X programmed, a serial console mid-line.
    for (guest, at) in [
        // (Each guest retires 12,000-23,000 instructions in all.)
        ("lapic-timer", 6_000),
        ("irq-level-eoi", 8_000),
        ("rtc", 6_000),
        ("pci", 12_000),
        ("irq-pit-ioapic", 7_000),
        // An e1000 mid-transfer: rings, ITR, a frame on its way.
        ("e1000", 15_000),
    ] {
        round_trip(guest, at, 2_000_000);
    }
}

#[test]
fn a_state_from_another_machine_is_refused() {
    let mut a = machine("pci", SharedBuf::default());
    let _ = a.run_for(10_000).expect("run");
    let saved = a.save_state().expect("save");
    // long-mode has no PCI test devices.
    let mut b = machine("long-mode", SharedBuf::default());
    let err = b.restore_state(&saved).expect_err("refused");
    assert!(err.to_string().contains("pci-test"), "{err}");
    let mut wrong = saved.clone();
    wrong.format += 1;
    assert!(a.restore_state(&wrong).is_err());
}
