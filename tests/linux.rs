//! Debian's own Linux kernels boot to a busybox shell, driven over the
//! serial console: `uname -r`, `/proc/interrupts`, `/proc/cpuinfo`, the
//! kernel log, and `poweroff -f` with exit status 0.
//!
//! The kernels, busybox and the initramfs come from `scripts/linux-guest.sh`
//! (Debian packages fetched with apt-get, cached under `.cache/linux-guest`
//! or `$DUET_GUEST_DIR`). On the interpreter these tests always run; the KVM
//! variant is opt-in (`cargo nextest run --run-ignored only -E 'test(kvm)'`):
//! on hosts whose KVM emulates ring-0 code in software (KVM-PVM) a boot
//! takes many minutes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::console::{linux_kit as kit, Console};

impl Console {
    fn boot(backend: &str, kernel: &Path, extra_cmdline: &str) -> Console {
        let initrd = kit().join("initramfs.cpio.gz");
        Console::boot_with(
            backend,
            kernel,
            extra_cmdline,
            &initrd.to_string_lossy(),
            &[],
        )
    }

    /// Boot with `initrd` (duet's comma-separated list) and more options.
    fn boot_with(
        backend: &str,
        kernel: &Path,
        extra_cmdline: &str,
        initrd: &str,
        extra_args: &[&str],
    ) -> Console {
        let cmdline = format!("console=ttyS0 panic=-1 {extra_cmdline}");
        Console::spawn(
            Command::new(env!("CARGO_BIN_EXE_duet"))
                .args(["run", "--backend", backend, "--memory", "256M", "--kernel"])
                .arg(kernel)
                .args(["--initrd", initrd])
                .args(extra_args)
                .args(["--cmdline", &cmdline]),
        )
    }
}

fn check_boot(backend: &str, kernel: &str, boot_timeout: Duration) {
    let dir = kit();
    let version = std::fs::read_to_string(dir.join("VERSION"))
        .unwrap()
        .trim()
        .to_string();
    let expected_release = if kernel.contains("generic") {
        version.replace("-cloud-amd64", "-amd64")
    } else {
        version.clone()
    };
    let step = boot_timeout;
    // On KVM, `noxsave`: KVM-PVM forces XSAVE/AVX into the guest's CPUID
    // (it ignores KVM_SET_CPUID2 for them) but refuses XRSTOR in ring 0,
    // which the interpreter cannot take over (see docs/CPUID.md).
    let extra = if backend == "kvm" { "noxsave" } else { "" };
    let mut c = Console::boot(backend, &dir.join(kernel), extra);
    c.wait_for("DUET-INIT-READY", boot_timeout);

    let uname = c.run("uname -r", step);
    assert!(uname.contains(&expected_release), "uname -r said: {uname}");

    let irqs = c.run("cat /proc/interrupts", step);
    let line = |needle: &str| {
        irqs.lines()
            .find(|l| l.contains(needle))
            .map(str::to_string)
    };
    let timer =
        line("timer").unwrap_or_else(|| panic!("no timer line in /proc/interrupts:\n{irqs}"));
    assert!(
        timer.contains("IO-APIC"),
        "timer not on the IO-APIC: {timer}"
    );
    let serial =
        line("ttyS0").unwrap_or_else(|| panic!("no ttyS0 line in /proc/interrupts:\n{irqs}"));
    assert!(
        serial.contains("IO-APIC"),
        "ttyS0 not on the IO-APIC: {serial}"
    );
    // The serial interrupt fired (we have been typing): a non-zero count.
    let count: u64 = serial
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(count > 0, "ttyS0 took no interrupts: {serial}");

    let cpuinfo = c.run("cat /proc/cpuinfo", step);
    assert!(cpuinfo.contains("duet virtual CPU"), "{cpuinfo}");
    assert!(cpuinfo.contains(" sse2"), "{cpuinfo}");
    assert!(cpuinfo.contains(" apic"), "{cpuinfo}");

    let log = c.run("dmesg | grep -i -e apic -e acpi -e clocksource", step);
    assert!(log.contains("IOAPIC[0]"), "{log}");
    assert!(log.contains("ACPI: PM-Timer IO Port"), "{log}");
    assert!(
        log.contains("clocksource: Switched to clocksource tsc"),
        "{log}"
    );
    assert!(!log.contains("unstable"), "{log}");
    // The whole kernel log (and everything the console showed) must be
    // free of warnings, bugs, oopses and stack traces.
    let full = c.run("dmesg", step);
    let problems = kernel_log_problems(&full);
    assert!(
        problems.is_empty(),
        "kernel log problems: {problems:#?}
{full}"
    );
    let console = c.text();
    let problems = kernel_log_problems(&console);
    assert!(
        problems.is_empty(),
        "console problems: {problems:#?}
{console}"
    );

    // PCI: the host bridge is listed, and ECAM (MMCONFIG) is used.
    let class = c.run("cat /sys/bus/pci/devices/0000:00:00.0/class", step);
    assert!(class.contains("0x060000"), "host bridge class: {class}");
    let pci_log = c.run("dmesg | grep -i -e mmconfig -e 'PCI:' -e pci0000", step);
    assert!(pci_log.contains("MMCONFIG for domain 0000"), "{pci_log}");
    assert!(!pci_log.contains("not reserved"), "{pci_log}");
    assert!(!pci_log.contains("not using MMCONFIG"), "{pci_log}");
    assert!(
        !pci_log.contains("Using configuration type 1 for extended"),
        "{pci_log}"
    );

    c.send("poweroff -f");
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = c.child.try_wait() {
            break st;
        }
        assert!(
            start.elapsed() < step,
            "duet did not exit after poweroff -f:\n{}",
            c.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "console:\n{}", c.text());
}

/// Lines of a kernel log that a healthy boot must not show.
fn kernel_log_problems(log: &str) -> Vec<String> {
    const BAD: [&str; 5] = ["WARNING:", "BUG:", "Oops", "Call Trace", "unstable"];
    log.lines()
        .filter(|l| BAD.iter().any(|b| l.contains(b)))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_kernel_log_check_catches_each_pattern() {
    for line in [
        "[    1.0] WARNING: CPU: 0 PID: 1 at kernel/foo.c:12 bar+0x10/0x20",
        "[    1.0] BUG: kernel NULL pointer dereference, address: 0000000000000008",
        "[    1.0] Oops: 0002 [#1] SMP NOPTI",
        "[    1.0] Call Trace:",
        "[    1.0] clocksource: Marking clocksource 'tsc' as unstable because the skew is too large:",
    ] {
        let log = format!("[    0.0] Linux version 6.1\n{line}\n[    2.0] Run /init\n");
        assert_eq!(kernel_log_problems(&log), vec![line.to_string()]);
    }
    assert!(kernel_log_problems("[    0.0] Linux version 6.1\n[    2.0] Run /init\n").is_empty());
}

#[test]
fn cloud_bzimage_on_the_interpreter() {
    check_boot("interp", "vmlinuz-cloud", Duration::from_secs(300));
}

#[test]
fn generic_xz_bzimage_on_the_interpreter() {
    check_boot("interp", "vmlinuz-generic", Duration::from_secs(600));
}

#[test]
fn cloud_pvh_vmlinux_on_the_interpreter() {
    check_boot("interp", "vmlinux-cloud", Duration::from_secs(300));
}

/// `reboot -f` resets the machine (ACPI reset register / i8042); duet ends
/// with its "reset requested" status, 2.
#[test]
fn reboot_ends_duet_with_the_reset_status() {
    let dir = kit();
    let mut c = Console::boot("interp", &dir.join("vmlinux-cloud"), "");
    c.wait_for("DUET-INIT-READY", Duration::from_secs(300));
    // Make sure the shell is up before typing.
    let echo = c.run("echo up", Duration::from_secs(120));
    assert!(echo.contains("up"));
    c.send("reboot -f");
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = c.child.try_wait() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no exit after reboot -f:\n{}",
            c.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(2), "console:\n{}", c.text());
}

/// Opt-in: on KVM-PVM the kernel's ring-0 code is emulated by the host at a
/// few MIPS, with duet's interpreter taking the instructions it refuses.
#[test]
#[ignore = "slow on KVM-PVM hosts; run with --run-ignored"]
fn cloud_pvh_vmlinux_on_kvm() {
    if !duet::backend::kvm_or_skip("cloud_pvh_vmlinux_on_kvm") {
        return;
    }
    check_boot("kvm", "vmlinux-cloud", Duration::from_secs(3600));
}

// ---- issue 10 / 17: boot options, scripted sessions, starvation ----------

/// Boot Debian's generic kernel on the interpreter with `extra` on the
/// command line; check the shell answers, the timer's interrupt controller,
/// serial interrupts, the TSC clocksource; power off with status 0.
fn check_generic_boot_option(extra: &str, timer_controller: &str) {
    let dir = kit();
    let mut c = Console::boot("interp", &dir.join("vmlinuz-generic"), extra);
    c.wait_for("DUET-INIT-READY", Duration::from_secs(600));
    let step = Duration::from_secs(300);
    let cmdline = c.run("cat /proc/cmdline", step);
    assert!(cmdline.contains(extra), "{cmdline}");
    let echo = c.run("echo answer-$((6*7))", step);
    assert!(echo.contains("answer-42"), "{echo}");
    let irqs = c.run("cat /proc/interrupts", step);
    let timer = irqs
        .lines()
        .find(|l| l.contains("timer"))
        .unwrap_or_else(|| panic!("no timer line:\n{irqs}"));
    assert!(timer.contains(timer_controller), "{extra}: {timer}");
    let serial = irqs
        .lines()
        .find(|l| l.contains("ttyS0"))
        .unwrap_or_else(|| panic!("no ttyS0 line:\n{irqs}"));
    assert!(serial.contains(timer_controller), "{extra}: {serial}");
    let log = c.run("dmesg | grep -i -e clocksource -e unstable", step);
    assert!(
        log.contains("clocksource: Switched to clocksource tsc"),
        "{log}"
    );
    assert!(!log.contains("unstable"), "{log}");
    c.send("poweroff -f");
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = c.child.try_wait() {
            break st;
        }
        assert!(start.elapsed() < step, "no exit:\n{}", c.text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "console:\n{}", c.text());
}

/// `acpi=off`: the IOAPIC comes from the MP table; without ACPI power-off
/// the kernel halts, which ends duet cleanly.
#[test]
fn generic_kernel_with_acpi_off_uses_the_mp_table() {
    check_generic_boot_option("acpi=off", "IO-APIC");
}

/// `noapic`: no IOAPIC, interrupts through the 8259 PICs.
#[test]
fn generic_kernel_with_noapic_uses_the_pic() {
    check_generic_boot_option("noapic", "XT-PIC");
}

/// `nolapic`: no local APIC at all, the PIT ticks through the PIC.
#[test]
fn generic_kernel_with_nolapic_uses_the_pic() {
    check_generic_boot_option("nolapic", "XT-PIC");
}

/// The README's scripted CI session, with no `--backend`: commands piped in
/// before the guest has even started (held until its UART is ready, so
/// every one is answered), the console in a file, stats as JSON, and the
/// exit status checked. On a host without hardware virtualization (or
/// with KVM-PVM), `auto` must pick the interpreter and say why.
#[test]
fn scripted_session_with_the_default_backend() {
    let dir = kit();
    let tmp = std::env::temp_dir().join(format!("duet-ci-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let console = tmp.join("console.log");
    let stats = tmp.join("stats.json");
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["run", "--memory", "256M", "--kernel"])
        .arg(dir.join("vmlinuz-cloud"))
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio.gz"))
        .args(["--cmdline", "console=ttyS0 panic=-1 quiet"])
        .arg("--serial")
        .arg(format!("file={}", console.display()))
        .arg("--stats-json")
        .arg(&stats)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn duet");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo PIPED-$((2*21))\necho SECOND-$((3*3))\nuname -s\npoweroff -f\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let elapsed = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(&console).unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {err}\nconsole:\n{log}");
    assert!(out.stdout.is_empty(), "the console went to the file");
    for answer in ["\nPIPED-42", "\nSECOND-9", "\nLinux"] {
        assert!(log.contains(answer), "{answer:?} missing:\n{log}");
    }
    let line = err.lines().next().unwrap_or("");
    assert!(line.starts_with("duet: backend "), "{err}");
    let facts = duet::backend::select::HostFacts::probe();
    let no_hw_virt = facts.kvm_pvm || facts.hw_virt_flag.as_deref() == Some("");
    if no_hw_virt {
        assert!(line.starts_with("duet: backend interp: "), "{line}");
    }
    let json = std::fs::read_to_string(&stats).unwrap();
    assert!(json.contains("\"exit_status\": 0,"), "{json}");
    eprintln!(
        "scripted session: {line}; reached the shell and powered off in {:.1} s",
        elapsed.as_secs_f64()
    );
    std::fs::remove_dir_all(tmp).ok();
}

/// The first 100 KB of Debian's bzImage: refused at load time with the
/// file name and both sizes (not a triple fault at run time).
#[test]
fn truncated_debian_bzimage_is_refused() {
    let dir = kit();
    let full = std::fs::read(dir.join("vmlinuz-cloud")).unwrap();
    let cut = std::env::temp_dir().join(format!("duet-trunc-{}", std::process::id()));
    std::fs::write(&cut, &full[..100 * 1024]).unwrap();
    let setup = (u64::from(full[0x1f1]) + 1) * 512;
    let syssize = u32::from_le_bytes(full[0x1f4..0x1f8].try_into().unwrap());
    let payload = u64::from(syssize) * 16;
    let out = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["run", "--backend", "interp", "--kernel"])
        .arg(&cut)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "duet: error: --kernel {}: truncated bzImage: its setup header says {} bytes ({setup} \
             of setup, {payload} of payload), the file has 102400; use the complete file\n",
            cut.display(),
            setup + payload
        )
    );
    std::fs::remove_file(cut).ok();
}

/// A starved VM keeps its clocksource: the host's cores are saturated by
/// busy threads during the boot and the duet process is stopped for a
/// second twice (SIGSTOP); the guest's TSC must stay its clocksource (no
/// "unstable" in the kernel log). Without stall compensation this boot
/// marks the TSC unstable (see BENCHMARKS.md).
#[test]
fn starved_boot_keeps_the_tsc_clocksource() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = kit();
    let stop = Arc::new(AtomicBool::new(false));
    let hogs: Vec<_> = (0..std::thread::available_parallelism().map_or(2, |n| n.get()) + 1)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    std::hint::black_box(x);
                }
            })
        })
        .collect();
    let mut c = Console::boot("interp", &dir.join("vmlinux-cloud"), "");
    let pid = c.child.id() as libc::pid_t;
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(2));
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_secs(1));
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    }
    c.wait_for("DUET-INIT-READY", Duration::from_secs(600));
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        h.join().ok();
    }
    let log = c.run(
        "dmesg | grep -i -e clocksource -e unstable -e skew",
        Duration::from_secs(120),
    );
    assert!(
        log.contains("clocksource: Switched to clocksource tsc"),
        "{log}"
    );
    assert!(!log.contains("unstable"), "{log}");
    c.send("poweroff -f");
    let start = Instant::now();
    while c.child.try_wait().ok().flatten().is_none() {
        assert!(start.elapsed() < Duration::from_secs(120), "no exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A newc cpio archive of `files` (guest path, contents, mode), with the
/// directories they need; the kernel unpacks it over the kit's initramfs
/// (duet concatenates the `--initrd` list).
fn cpio(files: &[(&str, Vec<u8>, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ino = 0x4000u32;
    let mut entry = |out: &mut Vec<u8>, name: &str, data: &[u8], mode: u32| {
        ino += 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    let mut dirs: Vec<String> = Vec::new();
    for (path, _, _) in files {
        let mut d = String::new();
        for part in path
            .split('/')
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            d = if d.is_empty() {
                part.to_string()
            } else {
                format!("{d}/{part}")
            };
            if !dirs.contains(&d) {
                dirs.push(d.clone());
            }
        }
    }
    for d in &dirs {
        entry(&mut out, d, &[], 0o040755);
    }
    for (path, data, mode) in files {
        entry(
            &mut out,
            path.trim_start_matches('/'),
            data,
            0o100000 | mode,
        );
    }
    entry(&mut out, "TRAILER!!!", &[], 0);
    out
}

/// Programs built with `gcc -O3 -march=x86-64-v2` and `-march=x86-64-v3`
/// (tests/guest-programs/isa_mix.c: vectorised loops, popcount, CRC32, an
/// FMA dot product, glibc's string functions) run inside the Debian guest
/// on the interpreter with `--cpu x86-64-v3` and print what they print on
/// the host; the guest's CPU flags and glibc's own view (`ld.so --help`:
/// "x86-64-v3 (supported, searched)", the level glibc picks its AVX2
/// string functions by) show the v3 model. Skips (saying so) without gcc
/// or a static glibc.
#[test]
fn x86_64_v2_and_v3_programs_on_the_interpreter() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest-programs/isa_mix.c");
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("isa-programs");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut programs = Vec::new();
    for level in ["x86-64-v2", "x86-64-v3"] {
        let exe = tmp.join(format!("isa-{level}"));
        let built = Command::new("gcc")
            .args(["-O3", &format!("-march={level}"), "-static", "-o"])
            .arg(&exe)
            .arg(&src)
            .arg("-lm")
            .output();
        match built {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                println!(
                    "skipping: gcc -static -march={level} failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                return;
            }
            Err(e) => {
                println!("skipping: no gcc ({e})");
                return;
            }
        }
        // The host runs it only if it has the level itself (probed by
        // running it: a CPU without it raises #UD, SIGILL).
        let host = Command::new(&exe).output().unwrap();
        if !host.status.success() {
            println!(
                "skipping: the host cannot run the {level} program ({})",
                host.status
            );
            return;
        }
        let expected = String::from_utf8_lossy(&host.stdout).trim().to_string();
        programs.push((level, exe, expected));
    }
    let loader = std::fs::canonicalize("/lib64/ld-linux-x86-64.so.2").ok();
    let mut files: Vec<(&str, Vec<u8>, u32)> = programs
        .iter()
        .map(|(level, exe, _)| {
            let name: &str = if *level == "x86-64-v2" {
                "/isa/v2"
            } else {
                "/isa/v3"
            };
            (name, std::fs::read(exe).unwrap(), 0o755)
        })
        .collect();
    if let Some(l) = &loader {
        files.push(("/isa/ld.so", std::fs::read(l).unwrap(), 0o755));
    } else {
        println!("note: no /lib64/ld-linux-x86-64.so.2 on the host: glibc's level not checked");
    }
    let extra = tmp.join("isa.cpio");
    std::fs::write(&extra, cpio(&files)).unwrap();
    let dir = kit();
    let initrd = format!(
        "{},{}",
        dir.join("initramfs.cpio.gz").display(),
        extra.display()
    );
    let step = Duration::from_secs(300);
    let mut c = Console::boot_with(
        "interp",
        &dir.join("vmlinuz-cloud"),
        "",
        &initrd,
        &["--cpu", "x86-64-v3"],
    );
    c.wait_for("DUET-INIT-READY", step);
    let flags = c.run("grep -m1 '^flags' /proc/cpuinfo", step);
    for f in [
        "sse4_1", "sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe",
        "xsave", "cx16", "lahf_lm",
    ] {
        assert!(
            flags.contains(&format!(" {f}")),
            "no {f} in the guest's flags: {flags}"
        );
    }
    assert!(!flags.contains("avx512"), "{flags}");
    if loader.is_some() {
        let help = c.run("/isa/ld.so --help", step);
        assert!(help.contains("x86-64-v3 (supported, searched)"), "{help}");
        assert!(help.contains("x86-64-v2 (supported, searched)"), "{help}");
        assert!(!help.contains("x86-64-v4 (supported"), "{help}");
    }
    for (level, _, expected) in &programs {
        let name = if *level == "x86-64-v2" {
            "/isa/v2"
        } else {
            "/isa/v3"
        };
        let got = c.run(name, step);
        assert_eq!(got.trim(), expected, "{level} program: guest vs host");
    }
    c.send("poweroff -f");
    let start = Instant::now();
    while c.child.try_wait().ok().flatten().is_none() {
        assert!(start.elapsed() < step, "no exit after poweroff -f");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- issue 16: the HPET ---------------------------------------------------

/// Linux finds the HPET through its ACPI table, lists it among the
/// clocksources, and with `clocksource=hpet` keeps time by it: the legacy
/// replacement timer drives IRQ0, `sleep` returns, the counter moves
/// between two reads of it by the guest, and the log is clean.
#[test]
fn generic_kernel_uses_the_hpet_with_clocksource_hpet() {
    let dir = kit();
    let mut c = Console::boot("interp", &dir.join("vmlinuz-generic"), "clocksource=hpet");
    c.wait_for("DUET-INIT-READY", Duration::from_secs(600));
    let step = Duration::from_secs(300);
    let cs = "/sys/devices/system/clocksource/clocksource0";
    let available = c.run(&format!("cat {cs}/available_clocksource"), step);
    assert!(available.contains("hpet"), "{available}");
    let current = c.run(&format!("cat {cs}/current_clocksource"), step);
    assert_eq!(current.trim(), "hpet", "{current}");
    let log = c.run("dmesg | grep -i -e hpet -e clocksource", step);
    assert!(
        log.contains("hpet0: 3 comparators, 64-bit 100.000000 MHz counter"),
        "{log}"
    );
    assert!(log.contains("Switched to clocksource hpet"), "{log}");
    let sleep = c.run("sleep 1 && echo slept-$((40+2))", step);
    assert!(sleep.contains("slept-42"), "{sleep}");
    let irqs = c.run("cat /proc/interrupts", step);
    let timer = irqs
        .lines()
        .find(|l| l.contains("timer"))
        .unwrap_or_else(|| panic!("no timer line:\n{irqs}"));
    let ticks: u64 = timer
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(ticks > 0, "IRQ0 from the HPET's timer 0: {timer}");
    let dmesg = c.run("dmesg", step);
    let problems = kernel_log_problems(&dmesg);
    assert!(problems.is_empty(), "{problems:#?}\n{dmesg}");
    c.send("poweroff -f");
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = c.child.try_wait() {
            break st;
        }
        assert!(start.elapsed() < step, "no exit:\n{}", c.text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "console:\n{}", c.text());
}
