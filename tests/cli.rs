//! The `duet` command line, end to end.

use std::process::Command;

fn duet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_duet"))
}

#[test]
fn guests_lists_every_builtin_guest() {
    let out = duet().arg("guests").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for g in ["hello-real", "long-mode", "checksum", "fault", "swint"] {
        assert!(
            text.lines().any(|l| l.starts_with(g)),
            "{g} missing from:\n{text}"
        );
    }
}

#[test]
fn run_prints_serial_output_and_exits_zero() {
    let out = duet()
        .args(["run", "--backend", "interp", "--guest", "hello-real"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let golden = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/golden/hello-real.serial.txt"
    ))
    .unwrap();
    assert_eq!(out.stdout, golden);
}

#[test]
fn debug_exit_status_becomes_the_process_status() {
    let out = duet()
        .args(["run", "--backend", "interp", "--guest", "checksum"])
        .output()
        .unwrap();
    let expected = duet::guests::checksum::expected_checksum();
    assert_eq!(
        out.status.code(),
        Some(((((expected & 0xff) << 1) | 1) & 0xff) as i32)
    );
}

#[test]
fn stats_report_counts() {
    let out = duet()
        .args([
            "run",
            "--backend",
            "interp",
            "--guest",
            "hello-real",
            "--stats",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("com1"), "{err}");
    assert!(err.contains("guest instructions retired:"), "{err}");
    assert!(err.contains("interpreter fallbacks: 0"), "{err}");
}

#[test]
fn bad_arguments_are_clear_errors() {
    let out = duet().args(["run", "--guest", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no built-in guest named 'nope'"), "{err}");
    assert!(err.contains("hello-real"), "{err}");

    let out = duet().args(["run", "--memory", "12Q"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit"));

    let out = duet()
        .args(["run", "--backend", "interp", "--memory", "1M"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 2 MiB"));

    let out = duet()
        .args([
            "run",
            "--backend",
            "interp",
            "--guest",
            "hello-real",
            "--trace",
            "/nonexistent/dir/t",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot create trace file"));
}

#[test]
fn kvm_backend_without_kvm_is_a_clear_error() {
    // Point the KVM backend at a device that does not exist.
    let out = duet()
        .env("DUET_KVM_DEVICE", "/nonexistent/kvm")
        .args(["run", "--backend", "kvm", "--guest", "hello-real"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--backend kvm"), "{err}");
    // And `auto` falls back to the interpreter.
    let out = duet()
        .env("DUET_KVM_DEVICE", "/nonexistent/kvm")
        .args(["run", "--guest", "hello-real"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
