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

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

fn kit() -> &'static PathBuf {
    static KIT: OnceLock<PathBuf> = OnceLock::new();
    KIT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/linux-guest.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .expect("run scripts/linux-guest.sh");
        assert!(
            out.status.success(),
            "scripts/linux-guest.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .lines()
                .last()
                .unwrap_or("")
                .to_string(),
        )
    })
}

/// A duet process with its serial console on pipes.
struct Console {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    seen: usize,
}

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
        let mut child = Command::new(env!("CARGO_BIN_EXE_duet"))
            .args(["run", "--backend", backend, "--memory", "256M", "--kernel"])
            .arg(kernel)
            .args(["--initrd", initrd])
            .args(extra_args)
            .args(["--cmdline", &cmdline])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn duet");
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().expect("stdout");
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Console {
            child,
            out,
            seen: 0,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Wait until `needle` appears after what was already consumed; return
    /// the text up to and including it.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let t = self.text();
            if let Some(pos) = t[self.seen.min(t.len())..].find(needle) {
                let end = self.seen + pos + needle.len();
                let got = t[self.seen..end].to_string();
                self.seen = end;
                return got;
            }
            if start.elapsed() > timeout {
                panic!("timed out waiting for {needle:?}; console so far:\n{t}");
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("duet exited ({st}) while waiting for {needle:?}; console:\n{t}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin
            .write_all(line.as_bytes())
            .expect("write to the console");
        stdin.write_all(b"\n").expect("write to the console");
        stdin.flush().ok();
    }

    /// Run a shell command and return its output (between markers).
    fn run(&mut self, cmd: &str, timeout: Duration) -> String {
        self.send(&format!("echo '<<'BEGIN; {cmd}; echo '<<'END"));
        self.wait_for("<<BEGIN", timeout);
        let out = self.wait_for("<<END", timeout);
        out.trim_end_matches("<<END").to_string()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.child.kill().ok();
        }
        self.child.wait().ok();
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
    if duet::backend::kvm_available().is_err() {
        eprintln!("skipping: KVM is not available");
        return;
    }
    check_boot("kvm", "vmlinux-cloud", Duration::from_secs(3600));
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
