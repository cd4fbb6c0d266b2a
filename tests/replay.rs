//! Record and replay through the command line: a run recorded with
//! `duet run --record` replays with `duet replay` to the same serial
//! output, the same device trace and the same final state; damaged logs
//! fail cleanly; a changed checkpoint is reported as a divergence; a KVM
//! recording replays at the device level; the golden device traces replay
//! against today's device models.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use duet::replay::devtrace::{replay_devices, DeviceReplayError};
use duet::replay::log::{read_all, Event, LogWriter};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("duet-replay-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn duet(args: &[&str], stdin: &[u8]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn duet");
    let mut i = c.stdin.take().unwrap();
    i.write_all(stdin).unwrap();
    drop(i);
    c.wait_with_output().expect("duet output")
}

fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Record `serial-echo` on the interpreter with host time and serial
/// input; replay it.
fn record_echo(tag: &str) -> (PathBuf, String, String) {
    let log = tmp(&format!("{tag}.log"));
    let out = tmp(&format!("{tag}.serial"));
    let trace = tmp(&format!("{tag}.trace"));
    let o = duet(
        &[
            "run",
            "--backend",
            "interp",
            "--guest",
            "serial-echo",
            "--record",
            p(&log),
            "--checkpoint-every",
            "2000",
            "--serial",
            &format!("file={}", p(&out)),
            "--trace",
            p(&trace),
        ],
        b"duet-rx!",
    );
    assert!(o.status.success(), "record: {}", stderr(&o));
    (
        log,
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&trace).unwrap(),
    )
}

#[test]
fn an_interpreter_recording_replays_bit_exact() {
    let (log, serial, trace) = record_echo("echo");
    assert!(
        serial.contains("received \"duet-rx!\""),
        "the guest got its input: {serial:?}"
    );
    let (_, events) = read_all(&std::fs::read(&log).unwrap()).expect("readable log");
    assert!(
        events.iter().any(|e| matches!(e, Event::SerialIn { .. })),
        "serial input is in the log"
    );
    let checkpoints = events
        .iter()
        .filter(|e| matches!(e, Event::Checkpoint { .. }))
        .count();
    assert!(checkpoints >= 2, "{checkpoints} checkpoints");
    let out = tmp("echo-replay.serial");
    let trace2 = tmp("echo-replay.trace");
    let o = duet(
        &[
            "replay",
            p(&log),
            "--serial",
            &format!("file={}", p(&out)),
            "--trace",
            p(&trace2),
        ],
        b"",
    );
    assert!(o.status.success(), "replay: {}", stderr(&o));
    assert!(stderr(&o).contains("replay matched"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        serial,
        "serial output"
    );
    assert!(
        std::fs::read_to_string(&trace2).unwrap() == trace,
        "the device traces differ"
    );
}

#[test]
fn damaged_logs_fail_cleanly_with_status_1() {
    let (log, _, _) = record_echo("damaged");
    let bytes = std::fs::read(&log).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", bytes[..bytes.len() * 2 / 3].to_vec()),
        ("flipped", {
            let mut b = bytes.clone();
            let at = b.len() - 20;
            b[at] ^= 0x40;
            b
        }),
        ("version", {
            let mut b = bytes.clone();
            b[8] = 0x7f;
            b
        }),
        ("foreign", b"#!/bin/sh\necho not a log\n".to_vec()),
    ];
    for (what, b) in cases {
        let f = tmp(&format!("damaged-{what}.log"));
        std::fs::write(&f, &b).unwrap();
        let o = duet(&["replay", p(&f), "--serial", "null"], b"");
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{what}: {e}");
        assert!(e.starts_with("duet: error: "), "{what}: {e}");
        assert!(!e.contains("panicked"), "{what}: {e}");
        match what {
            "version" => assert!(e.contains("format version 127"), "{e}"),
            "foreign" => assert!(e.contains("not a duet replay log"), "{e}"),
            _ => assert!(e.contains("byte"), "{what}: no byte offset in {e}"),
        }
    }
}

#[test]
fn a_changed_checkpoint_is_reported_where_it_diverges() {
    let (log, _, _) = record_echo("diverge");
    let (header, mut events) = read_all(&std::fs::read(&log).unwrap()).unwrap();
    // Change the general-register hash of the second checkpoint.
    let (at, index) = events
        .iter_mut()
        .filter_map(|e| match e {
            Event::Checkpoint { icount, checkpoint } => Some((icount, checkpoint)),
            _ => None,
        })
        .nth(1)
        .map(|(i, c)| {
            c.cpu[0] ^= 1;
            (*i, c.index)
        })
        .expect("two checkpoints");
    let bad = tmp("diverge-bad.log");
    let mut w = LogWriter::create(&bad, &header).unwrap();
    for e in &events {
        w.push(e).unwrap();
    }
    w.finish().unwrap();
    let o = duet(&["replay", p(&bad), "--serial", "null"], b"");
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{e}");
    assert!(
        e.contains(&format!("instruction {at}"))
            && e.contains(&format!("checkpoint {index} differs"))
            && e.contains("general registers"),
        "{e}"
    );
}

#[test]
fn a_kvm_recording_replays_at_the_device_level() {
    if !common::kvm_or_skip("a_kvm_recording_replays_at_the_device_level") {
        return;
    }
    let log = tmp("kvm.log");
    let o = duet(
        &[
            "run",
            "--backend",
            "kvm",
            "--guest",
            "irq-pit-ioapic",
            "--record",
            p(&log),
            "--serial",
            "null",
        ],
        b"",
    );
    assert!(o.status.success(), "record on KVM: {}", stderr(&o));
    let o = duet(&["replay", p(&log)], b"");
    assert!(o.status.success(), "device-level replay: {}", stderr(&o));
    assert!(stderr(&o).contains("device-level replay"), "{}", stderr(&o));
}

/// The seccomp filter of a process, from /proc (0: none, 2: a filter).
fn seccomp_mode(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A KVM recording opens its log and reads its device trace back through
/// descriptors opened before the run, so the seccomp filter is on while
/// the guest runs; the log then replays and no temporary file is left.
#[test]
fn a_kvm_recording_runs_under_the_seccomp_filter() {
    if !common::kvm_or_skip("a_kvm_recording_runs_under_the_seccomp_filter") {
        return;
    }
    let dir = tmp("kvm-seccomp");
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("echo.log");
    let out = dir.join("echo.serial");
    let mut c = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args([
            "run",
            "--backend",
            "kvm",
            "--guest",
            "serial-echo",
            "--record",
            p(&log),
            "--serial",
            &format!("file={}", p(&out)),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn duet");
    // The guest waits for its input: the filter must be on by then.
    let mut mode = None;
    for _ in 0..400 {
        mode = seccomp_mode(c.id());
        if mode == Some(2) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut i = c.stdin.take().unwrap();
    i.write_all(b"duet-rx!").unwrap();
    drop(i);
    let o = c.wait_with_output().expect("duet output");
    assert_eq!(mode, Some(2), "seccomp mode of the recording duet");
    assert!(o.status.success(), "record on KVM: {}", stderr(&o));
    let serial = std::fs::read_to_string(&out).unwrap();
    assert!(serial.contains("received \"duet-rx!\""), "{serial:?}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2, "files left: {left:?}");
    let o = duet(&["replay", p(&log)], b"");
    assert!(o.status.success(), "device-level replay: {}", stderr(&o));
    assert!(stderr(&o).contains("device-level replay"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).ok();
}

fn golden_traces() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/devices");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("golden/devices")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "devtrace"))
        .collect();
    v.sort();
    v
}

#[test]
fn golden_device_traces_replay_against_the_device_models() {
    let traces = golden_traces();
    assert!(traces.len() >= 10, "{} golden device traces", traces.len());
    for t in &traces {
        let text = std::fs::read_to_string(t).unwrap();
        let r = replay_devices(&text, None).unwrap_or_else(|e| panic!("{}: {e}", t.display()));
        assert!(r.reads + r.writes > 0, "{}: no accesses", t.display());
    }
}

/// The UART with its line status register changed: THR-empty reads as
/// clear.
struct ChangedLsr(devices::SharedDevice);

impl devices::BusDevice for ChangedLsr {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        devices::bus::lock(&self.0).read(offset, data);
        if offset == 5 {
            data[0] &= !0x20;
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        devices::bus::lock(&self.0).write(offset, data);
    }
}

#[test]
fn a_changed_device_register_fails_at_its_first_access() {
    let t = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/devices/serial-echo.devtrace");
    let text = std::fs::read_to_string(&t).unwrap();
    let first_lsr = text
        .lines()
        .position(|l| l.starts_with("pio  r 0x03fd "))
        .expect("an LSR read")
        + 1;
    let patch = |m: &mut duet::machine::Machine| {
        m.wrap_pio_device(0x3f8, |old| {
            std::sync::Arc::new(std::sync::Mutex::new(ChangedLsr(old)))
        })
        .unwrap();
    };
    match replay_devices(&text, Some(&patch)) {
        Err(DeviceReplayError::Differs { line, .. }) => assert_eq!(line, first_lsr),
        other => panic!("expected a difference at line {first_lsr}, got {other:?}"),
    }
}

fn linux_kit() -> PathBuf {
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
}

/// A Linux boot on the interpreter with host time, driven by commands
/// typed on the serial console (one of them reads the uptime: real time
/// enters), recorded and replayed: the same serial output, the same device
/// trace, the same final state.
#[test]
fn a_linux_boot_with_typed_commands_replays_bit_exact() {
    let kit = linux_kit();
    let kernel = kit.join("vmlinux-cloud");
    let initrd = kit.join("initramfs.cpio.gz");
    let log = tmp("linux.log");
    let (out1, out2) = (tmp("linux-rec.serial"), tmp("linux-rep.serial"));
    let (tr1, tr2) = (tmp("linux-rec.trace"), tmp("linux-rep.trace"));
    let o = duet(
        &[
            "run",
            "--backend",
            "interp",
            "--memory",
            "256M",
            "--kernel",
            p(&kernel),
            "--initrd",
            p(&initrd),
            "--cmdline",
            "console=ttyS0 panic=-1 quiet",
            "--serial",
            &format!("file={}", p(&out1)),
            "--trace",
            p(&tr1),
            "--record",
            p(&log),
        ],
        b"echo duet-$((6*7))\ncat /proc/uptime\nuname -r\npoweroff -f\n",
    );
    let serial = std::fs::read_to_string(&out1).unwrap_or_default();
    assert!(o.status.success(), "record: {} {serial}", stderr(&o));
    assert!(serial.contains("duet-42"), "the commands ran: {serial}");
    let o = duet(
        &[
            "replay",
            p(&log),
            "--serial",
            &format!("file={}", p(&out2)),
            "--trace",
            p(&tr2),
        ],
        b"",
    );
    assert!(o.status.success(), "replay: {}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&out2).unwrap(), serial);
    assert!(
        std::fs::read(&tr1).unwrap() == std::fs::read(&tr2).unwrap(),
        "device traces differ"
    );
    for f in [&log, &out1, &out2, &tr1, &tr2] {
        std::fs::remove_file(f).ok();
    }
}

/// A recording killed with SIGKILL in the middle of a Linux boot: the log
/// holds every frame written before the kill (a frame is flushed at each
/// checkpoint), `duet replay` refuses it with status 1, the byte offset and
/// how much of it is intact, never a panic; the intact part reads back.
#[test]
fn a_killed_recording_is_refused_cleanly_and_its_complete_part_reads() {
    let kit = linux_kit();
    let log = tmp("killed.log");
    let mut c = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args([
            "run",
            "--backend",
            "interp",
            "--kernel",
            p(&kit.join("vmlinux-cloud")),
            "--initrd",
            p(&kit.join("initramfs.cpio.gz")),
            "--cmdline",
            "console=ttyS0 panic=-1 quiet",
            "--serial",
            "null",
            "--checkpoint-every",
            "2000000",
            "--record",
            p(&log),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn duet");
    // Wait for a few frames, then kill it mid-run.
    let mut size = 0;
    for _ in 0..1200 {
        size = std::fs::metadata(&log).map_or(0, |m| m.len());
        if size > 3000 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let alive = c.try_wait().unwrap().is_none();
    c.kill().unwrap();
    let st = c.wait().unwrap();
    assert!(alive, "the boot ended before it was killed");
    assert!(size > 3000, "the recording wrote {size} bytes");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
    let bytes = std::fs::read(&log).unwrap();
    let s = duet::replay::log::read_complete(&bytes).expect("the header is whole");
    assert!(s.damage.is_some(), "a killed log has no end marker");
    let (index, icount) = s.last_checkpoint().expect("a complete checkpoint");
    assert!(index >= 1 && icount >= 2_000_000, "{index} at {icount}");
    let o = duet(&["replay", p(&log), "--serial", "null"], b"");
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(
        e.contains("truncated at byte")
            && e.contains("cut short")
            && e.contains(&format!(
                "through checkpoint {index} at instruction {icount}"
            )),
        "{e}"
    );
    std::fs::remove_file(&log).ok();
}

/// A network exchange over `--net user` (DHCP, then an HTTP download
/// from a server on 127.0.0.1) recorded on the interpreter, replayed with
/// no network at all: the same serial output, the same final state.
#[test]
fn a_network_exchange_replays_without_the_network() {
    use std::io::{Read, Write};
    let kit = linux_kit();
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in server.incoming() {
            let Ok(mut c) = c else { continue };
            let mut req = [0u8; 1024];
            let _ = c.read(&mut req);
            let body = "payload-from-the-host-42\n";
            let _ = write!(
                c,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let log = tmp("net.log");
    let (out1, out2) = (tmp("net-rec.serial"), tmp("net-rep.serial"));
    let typed = format!(
        "udhcpc -i eth0 -n -q -t 10 >/dev/null 2>&1; ip -4 addr show eth0 | grep -o 'inet [0-9./]*'\n\
         wget -q -O - http://10.0.2.2:{port}/x\n\
         head -c 8 /dev/hwrng | od -An -tx1\n\
         poweroff -f\n"
    );
    let o = duet(
        &[
            "run",
            "--backend",
            "interp",
            "--memory",
            "256M",
            "--kernel",
            p(&kit.join("vmlinux-cloud")),
            "--initrd",
            p(&kit.join("initramfs.cpio.gz")),
            "--cmdline",
            "console=ttyS0 panic=-1 quiet",
            "--net",
            "user",
            "--rng",
            "--serial",
            &format!("file={}", p(&out1)),
            "--record",
            p(&log),
        ],
        typed.as_bytes(),
    );
    let serial = std::fs::read_to_string(&out1).unwrap_or_default();
    assert!(o.status.success(), "record: {} {serial}", stderr(&o));
    assert!(
        serial.contains("inet 10.0.2.15/24") && serial.contains("payload-from-the-host-42"),
        "the exchange happened: {serial}"
    );
    let (_, events) = read_all(&std::fs::read(&log).unwrap()).unwrap();
    assert!(
        events.iter().any(|e| matches!(e, Event::NetRx { .. })),
        "received frames are in the log"
    );
    let o = duet(
        &["replay", p(&log), "--serial", &format!("file={}", p(&out2))],
        b"",
    );
    assert!(o.status.success(), "replay: {}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&out2).unwrap(), serial);
    for f in [&log, &out1, &out2] {
        std::fs::remove_file(f).ok();
    }
}
