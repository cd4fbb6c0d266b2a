//! The virtio device options' bad values: the message names the flag, the
//! value at fault and what is accepted; exit status 1, nothing on stdout.

use std::process::Command;

fn run(args: &[&str]) -> (String, Option<i32>) {
    let out = Command::new(env!("CARGO_BIN_EXE_duet"))
        .arg("run")
        .args([
            "--backend",
            "interp",
            "--guest",
            "hello-real",
            "--serial",
            "null",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

#[track_caller]
fn fails(args: &[&str], needles: &[&str]) {
    let (err, code) = run(args);
    assert_eq!(code, Some(1), "duet run {}: {err}", args.join(" "));
    for n in needles {
        assert!(
            err.contains(n),
            "duet run {}: {err:?} lacks {n:?}",
            args.join(" ")
        );
    }
}

#[test]
fn bad_disks() {
    fails(
        &["--disk", "path=/nonexistent/duet.img"],
        &["--disk path=/nonexistent/duet.img", "cannot open it"],
    );
    fails(
        &["--disk", "readonly=on"],
        &["'--disk <SPEC>'", "path=FILE is missing"],
    );
    fails(
        &["--disk", "path=x.img,transport=usb"],
        &["--disk", "transport=usb: expected pci or mmio"],
    );
    let empty = std::env::temp_dir().join(format!("duet-empty-{}.img", std::process::id()));
    std::fs::write(&empty, b"").unwrap();
    let arg = format!("path={}", empty.display());
    fails(&["--disk", &arg], &["--disk path=", "empty"]);
    // The same image twice: the second open finds it locked.
    std::fs::write(&empty, vec![0u8; 4096]).unwrap();
    fails(&["--disk", &arg, "--disk", &arg], &["locked"]);
    std::fs::remove_file(&empty).ok();
}

#[test]
fn bad_nets() {
    fails(
        &["--net", "mac=52:54:00:00:00:01"],
        &["'--net <SPEC>'", "user, tap=IFNAME or loopback"],
    );
    fails(
        &["--net", "user,hostfwd=tcp:80"],
        &["hostfwd=tcp:80: expected"],
    );
    fails(
        &["--net", "user,mac=zz:00:00:00:00:00"],
        &["mac=zz:00:00:00:00:00"],
    );
    fails(&["--net", "wifi"], &["unknown key 'wifi'"]);
}

#[test]
fn bad_consoles_and_rngs() {
    fails(
        &["--console-device", "virtio"],
        &["file=PATH, socket=PATH, stdio, pty or null"],
    );
    fails(
        &["--console-device", "serial,file=x"],
        &["only console device is virtio"],
    );
    fails(&["--rng", "seed=many"], &["seed=many: expected a number"]);
    // hvc0 on stdio needs stdin free of the serial console.
    let out = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["run", "--backend", "interp", "--guest", "hello-real"])
        .args(["--console-device", "virtio,stdio"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--console-device virtio,stdio: stdin already feeds"),
        "{err}"
    );
}

/// A built-in guest runs with virtio devices plugged in (nobody drives
/// them) and the stats list them.
#[test]
fn devices_appear_in_the_stats() {
    let img = std::env::temp_dir().join(format!("duet-stats-{}.img", std::process::id()));
    std::fs::write(&img, vec![0u8; 65536]).unwrap();
    let (err, code) = run(&[
        "--disk",
        &format!("path={},transport=mmio", img.display()),
        "--rng",
        "--stats",
    ]);
    std::fs::remove_file(&img).ok();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("virtio-blk0"), "{err}");
    assert!(err.contains("virtio-rng"), "{err}");
}
