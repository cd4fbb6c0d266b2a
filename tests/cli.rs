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
    assert_eq!(String::from_utf8_lossy(&out.stdout), golden("hello-real"));
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
    if !duet::backend::kvm_or_skip("auto_backend_uses_kvm_with_hardware_virtualization") {
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

fn temp_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("duet-cli-{}-{tag}", std::process::id()))
}

fn golden(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/golden/{name}.serial.txt",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// `--serial file=PATH`: the console in the file, nothing on stdout;
/// `--serial null`: the console discarded.
#[test]
fn serial_to_a_file_or_nowhere() {
    let log = temp_path("console.log");
    let out = duet()
        .args(["run", "--backend", "interp", "--guest", "hello-real"])
        .arg("--serial")
        .arg(format!("file={}", log.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), golden("hello-real"));
    std::fs::remove_file(log).ok();

    let out = duet()
        .args(["run", "--backend", "interp", "--guest", "hello-real"])
        .args(["--serial", "null"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
}

/// `--serial socket=PATH`: a client that connects after the guest printed
/// its prompt gets the backlog, types, and sees the echo.
#[test]
fn serial_on_a_unix_socket() {
    use std::io::{Read, Write};
    let sock = temp_path("console.sock");
    let mut child = duet()
        .args(["run", "--backend", "interp", "--guest", "serial-echo"])
        .arg("--serial")
        .arg(format!("socket={}", sock.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let mut stream = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
            break s;
        }
        assert!(
            start.elapsed().as_secs() < 30,
            "no socket at {}",
            sock.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // Give the guest time to print its prompt before typing (the prompt
    // must come from the backlog or live, either way once).
    let prompt = duet::guests::serial_echo::PROMPT;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains(prompt) {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "socket closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    stream.write_all(b"via-sock").unwrap();
    let status = child.wait().unwrap();
    stream.read_to_end(&mut got).ok();
    let text = String::from_utf8_lossy(&got);
    assert_eq!(status.code(), Some(0));
    assert!(text.contains("received \"via-sock\""), "{text}");
    assert_eq!(text.matches(prompt).count(), 1, "{text}");
    assert!(!sock.exists(), "the socket file is removed at exit");
}

/// `--serial pty`: the pseudo-terminal is named on stderr; input typed
/// there reaches the guest, its output comes back.
#[test]
fn serial_on_a_pseudo_terminal() {
    use std::io::{BufRead, Read, Write};
    let mut child = duet()
        .args(["run", "--backend", "interp", "--guest", "serial-echo"])
        .args(["--serial", "pty"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let name = loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "no pty notice");
        if let Some(n) = line.trim().strip_prefix("duet: serial console on ") {
            break n.to_string();
        }
    };
    let mut pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&name)
        .unwrap();
    // Read on a thread so that a missing answer fails the test (with what
    // did arrive) instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut reader = pty.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    let wait_for = |needle: &str, got: &mut Vec<u8>| -> Result<(), String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !String::from_utf8_lossy(got).contains(needle) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let b = rx.recv_timeout(left).map_err(|e| {
                format!(
                    "waiting for {needle:?}: {e}; got {:?}",
                    String::from_utf8_lossy(got)
                )
            })?;
            got.extend_from_slice(&b);
        }
        Ok(())
    };
    let answered = wait_for(duet::guests::serial_echo::PROMPT, &mut got).and_then(|()| {
        pty.write_all(b"via-pty!").unwrap();
        wait_for("\"\r\n", &mut got)
    });
    if let Err(e) = answered {
        child.kill().ok();
        panic!("{e}");
    }
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("received \"via-pty!\""), "{text}");
}

/// `--stats-json FILE`: the counters as JSON.
#[test]
fn stats_as_json() {
    let path = temp_path("stats.json");
    let out = duet()
        .args(["run", "--backend", "interp", "--guest", "checksum"])
        .arg("--stats-json")
        .arg(&path)
        .output()
        .unwrap();
    let json = std::fs::read_to_string(&path).unwrap();
    let status = out.status.code().unwrap();
    assert!(json.starts_with("{\n") && json.ends_with("}\n"), "{json}");
    assert!(json.contains("\"backend\": \"interp\","), "{json}");
    assert!(
        json.contains(&format!("\"exit_status\": {status},")),
        "{json}"
    );
    assert!(
        json.contains("\"outcome\": \"guest exited through the debug-exit port"),
        "{json}"
    );
    assert!(
        json.contains(
            "{\"bus\": \"pio\", \"device\": \"debug-exit\", \"reads\": 0, \"writes\": 1}"
        ),
        "{json}"
    );
    let instructions = json
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"guest_instructions\": "))
        .and_then(|v| v.trim_end_matches(',').parse::<u64>().ok())
        .expect("an instruction count");
    assert!(instructions > 1000, "{json}");
    std::fs::remove_file(path).ok();
}
