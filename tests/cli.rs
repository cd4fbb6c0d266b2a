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

/// A fake host for `--backend auto`: a cpuinfo file and a /sys/module
/// directory of our own.
fn fake_host(tag: &str, flags: &str, modules: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("duet-cli-host-{}-{tag}", std::process::id()));
    let module_dir = dir.join("module");
    std::fs::create_dir_all(&module_dir).unwrap();
    for m in modules {
        std::fs::create_dir_all(module_dir.join(m)).unwrap();
    }
    let cpuinfo = dir.join("cpuinfo");
    std::fs::write(
        &cpuinfo,
        format!("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n"),
    )
    .unwrap();
    (cpuinfo, module_dir)
}

/// `--backend auto` on a host without hardware virtualization picks the
/// interpreter and says so in one line, even where /dev/kvm opens; with
/// `kvm_pvm` loaded too. `--backend kvm` still forces KVM.
#[test]
fn auto_backend_avoids_kvm_without_hardware_virtualization() {
    for (tag, flags, modules, why) in [
        (
            "novirt",
            "fpu tsc msr sse2",
            &["kvm"][..],
            "duet: backend interp: the CPU has no hardware virtualization (no vmx or svm flag in /proc/cpuinfo); --backend kvm forces KVM\n",
        ),
        (
            "pvm",
            "fpu tsc msr sse2 vmx",
            &["kvm", "kvm_pvm"][..],
            "duet: backend interp: KVM here is KVM-PVM (module kvm_pvm), which emulates guest ring 0 in software; --backend kvm forces it\n",
        ),
    ] {
        let (cpuinfo, modules) = fake_host(tag, flags, modules);
        let out = duet()
            .env("DUET_HOST_CPUINFO", &cpuinfo)
            .env("DUET_HOST_SYS_MODULE", &modules)
            .args(["run", "--guest", "hello-real", "--stats"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(err.starts_with(why), "{tag}: {err}");
        assert!(err.contains("backend: interp"), "{tag}: {err}");
    }
}

/// With hardware virtualization faked in and KVM present, `auto` uses KVM;
/// `--backend kvm` forces KVM on a host without it (where /dev/kvm works).
#[test]
fn auto_backend_uses_kvm_with_hardware_virtualization() {
    if duet::backend::kvm_available().is_err() {
        eprintln!("skipping: KVM is not available on this host");
        return;
    }
    let (cpuinfo, modules) = fake_host("vmx", "fpu tsc vmx sse2", &["kvm", "kvm_intel"]);
    let out = duet()
        .env("DUET_HOST_CPUINFO", &cpuinfo)
        .env("DUET_HOST_SYS_MODULE", &modules)
        .args(["run", "--guest", "hello-real", "--stats"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.starts_with(
            "duet: backend kvm: /dev/kvm works and the CPU virtualizes in hardware (vmx)\n"
        ),
        "{err}"
    );
    assert!(err.contains("backend: kvm"), "{err}");

    let (cpuinfo, modules) = fake_host("forced", "fpu tsc sse2", &["kvm", "kvm_pvm"]);
    let out = duet()
        .env("DUET_HOST_CPUINFO", &cpuinfo)
        .env("DUET_HOST_SYS_MODULE", &modules)
        .args([
            "run",
            "--backend",
            "kvm",
            "--guest",
            "hello-real",
            "--stats",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("duet: backend"), "{err}");
    assert!(err.contains("backend: kvm"), "{err}");
}
