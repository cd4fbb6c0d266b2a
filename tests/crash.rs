//! Panic containment: a device model that panics while the guest uses it,
//! and a duet host thread that panics while the guest idles, stop the VM
//! with `Outcome::Crashed` (what panicked where, the guest's RIP and mode)
//! and duet's own exit status — no hang, no dead process. On both backends
//! (the KVM half prints SKIPPED without /dev/kvm).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use devices::BusDevice;
use duet::backend::BackendKind;
use duet::guests::asm;
use duet::guests::GuestImage;
use duet::machine::{Machine, MachineConfig, Outcome};

/// A free port for the test device.
const PANIC_PORT: u16 = 0x7a0;

/// A device whose write handler has a bug.
struct PanickingDevice;

impl BusDevice for PanickingDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        panic!("the test device panics on purpose (wrote {data:02x?})");
    }
}

/// Real mode at 0:0x7c00, in three blocks: `jmp 0x7c10` / `mov dx,
/// PANIC_PORT; jmp 0x7c20` / `mov al, 0x42; out dx, al; cli; hlt`.
fn writes_the_port() -> GuestImage {
    let [lo, hi] = PANIC_PORT.to_le_bytes();
    let mut code = vec![0x90u8; 0x24];
    code[0..2].copy_from_slice(&[0xeb, 0x0e]);
    code[0x10..0x15].copy_from_slice(&[0xba, lo, hi, 0xeb, 0x0b]);
    code[0x20..0x24].copy_from_slice(&[0xb0, 0x42, 0xee, 0xfa]);
    code.push(0xf4);
    GuestImage {
        blobs: vec![(0x7c00, code)],
        entry: asm::real_mode_entry(),
        pci_devices: Vec::new(),
        virtio_devices: Vec::new(),
    }
}

/// Real mode: `sti; hlt; jmp back` forever (nothing ever interrupts it).
fn idles_forever() -> GuestImage {
    GuestImage {
        blobs: vec![(0x7c00, vec![0xfb, 0xf4, 0xeb, 0xfc])],
        entry: asm::real_mode_entry(),
        pci_devices: Vec::new(),
        virtio_devices: Vec::new(),
    }
}

fn machine(kind: BackendKind) -> Machine {
    let cfg = MachineConfig {
        memory: 16 << 20,
        ..MachineConfig::new(kind, Box::new(SharedBuf::default()))
    };
    Machine::new(cfg).expect("machine")
}

fn device_panic_is_contained(kind: BackendKind) {
    let mut m = machine(kind);
    m.add_port_device(
        "panicking-test-device",
        PANIC_PORT,
        1,
        Arc::new(Mutex::new(PanickingDevice)),
    )
    .expect("map the test device");
    m.load(&writes_the_port()).expect("load");
    let outcome = m.run().expect("run returns");
    let Outcome::Crashed(report) = &outcome else {
        panic!("{kind:?}: expected a contained crash, got {outcome:?}");
    };
    println!("{kind:?}: {report}");
    assert!(
        report.contains("the test device panics on purpose (wrote [42])"),
        "{kind:?}: {report}"
    );
    assert!(
        report.contains("tests/crash.rs"),
        "{kind:?}: where: {report}"
    );
    assert!(report.contains("real mode"), "{kind:?}: {report}");
    // RIP at the OUT or just after it, depending on the backend.
    assert!(report.contains("guest RIP 0x7c2"), "{kind:?}: {report}");
    // The last instructions: the interpreter lists the blocks it entered
    // on the way; KVM keeps no history and says so.
    if kind == BackendKind::Interp {
        for line in [
            "0x7c00: jmp",
            "0x7c10: mov dx,7A0h; jmp",
            "0x7c20: mov al,42h; out dx,al",
        ] {
            assert!(report.contains(line), "{kind:?}: no \"{line}\" in {report}");
        }
    } else {
        assert!(
            report.contains("no record of the instructions before it"),
            "{report}"
        );
    }
    assert_eq!(outcome.exit_status(), duet::crash::CRASH_EXIT_STATUS);
    assert_ne!(outcome.exit_status(), 0);
}

#[test]
fn a_device_panic_stops_the_vm_cleanly_on_the_interpreter() {
    device_panic_is_contained(BackendKind::Interp);
}

#[test]
fn a_device_panic_stops_the_vm_cleanly_on_kvm() {
    if !kvm_or_skip("a_device_panic_stops_the_vm_cleanly_on_kvm") {
        return;
    }
    device_panic_is_contained(BackendKind::Kvm);
}

#[test]
fn a_host_thread_panic_stops_the_vm() {
    duet::crash::install_hook();
    let mut m = machine(BackendKind::Interp);
    m.load(&idles_forever()).expect("load");
    let t = std::thread::Builder::new()
        .name("duet-test-backend".into())
        .spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            panic!("a host I/O thread fails on purpose");
        })
        .unwrap();
    let outcome = m.run().expect("run returns");
    assert!(t.join().is_err());
    let Outcome::Crashed(report) = &outcome else {
        panic!("expected a contained crash, got {outcome:?}");
    };
    assert!(
        report.contains("panic in thread 'duet-test-backend'"),
        "{report}"
    );
    assert!(
        report.contains("a host I/O thread fails on purpose"),
        "{report}"
    );
    assert_eq!(outcome.exit_status(), duet::crash::CRASH_EXIT_STATUS);
}
