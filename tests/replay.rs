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

/// A run recorded with `--record`: its log, serial output and `--trace`.
struct Recording {
    log: PathBuf,
    serial: String,
    trace: String,
    stderr: String,
    files: Vec<PathBuf>,
}

impl Drop for Recording {
    fn drop(&mut self) {
        for f in &self.files {
            std::fs::remove_file(f).ok();
        }
    }
}

/// `duet run ARGS --serial file=... --trace ... --record LOG` with `stdin`;
/// it must succeed.
fn record(tag: &str, args: &[&str], stdin: &[u8]) -> Recording {
    let log = tmp(&format!("{tag}.log"));
    let out = tmp(&format!("{tag}.serial"));
    let trace = tmp(&format!("{tag}.trace"));
    let serial_arg = format!("file={}", p(&out));
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    all.extend_from_slice(&[
        "--serial",
        &serial_arg,
        "--trace",
        p(&trace),
        "--record",
        p(&log),
    ]);
    let o = duet(&all, stdin);
    let serial = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(o.status.success(), "record {tag}: {} {serial}", stderr(&o));
    let trace_text = std::fs::read_to_string(&trace).unwrap_or_default();
    Recording {
        log: log.clone(),
        serial,
        trace: trace_text,
        stderr: stderr(&o),
        files: vec![log, out, trace],
    }
}

/// `duet replay` of `rec` (with `extra` options): it must succeed with the
/// recorded serial output and device trace. Returns its stderr.
fn replay_same(rec: &Recording, tag: &str, extra: &[&str]) -> String {
    let out = tmp(&format!("{tag}-replay.serial"));
    let trace = tmp(&format!("{tag}-replay.trace"));
    let serial_arg = format!("file={}", p(&out));
    let mut all = vec![
        "replay",
        p(&rec.log),
        "--serial",
        &serial_arg,
        "--trace",
        p(&trace),
    ];
    all.extend_from_slice(extra);
    let o = duet(&all, b"");
    assert!(o.status.success(), "replay {tag}: {}", stderr(&o));
    let serial = std::fs::read_to_string(&out).unwrap_or_default();
    let replayed_trace = std::fs::read_to_string(&trace).unwrap_or_default();
    std::fs::remove_file(&out).ok();
    std::fs::remove_file(&trace).ok();
    assert_eq!(serial, rec.serial, "{tag}: serial output");
    assert!(
        replayed_trace == rec.trace,
        "{tag}: the device traces differ"
    );
    stderr(&o)
}

/// Record `args` on KVM and replay the log at the device level.
fn kvm_device_replay(log: &Path) {
    let o = duet(&["replay", p(log)], b"");
    assert!(o.status.success(), "device-level replay: {}", stderr(&o));
    assert!(stderr(&o).contains("device-level replay"), "{}", stderr(&o));
}

/// Record `serial-echo` on the interpreter with host time and serial
/// input.
fn record_echo(tag: &str) -> Recording {
    record(
        tag,
        &[
            "--backend",
            "interp",
            "--guest",
            "serial-echo",
            "--checkpoint-every",
            "2000",
        ],
        b"duet-rx!",
    )
}

#[test]
fn an_interpreter_recording_replays_bit_exact() {
    let rec = record_echo("echo");
    assert!(
        rec.serial.contains("received \"duet-rx!\""),
        "the guest got its input: {:?}",
        rec.serial
    );
    let (_, events) = read_all(&std::fs::read(&rec.log).unwrap()).expect("readable log");
    assert!(
        events.iter().any(|e| matches!(e, Event::SerialIn { .. })),
        "serial input is in the log"
    );
    let checkpoints = events
        .iter()
        .filter(|e| matches!(e, Event::Checkpoint { .. }))
        .count();
    assert!(checkpoints >= 2, "{checkpoints} checkpoints");
    let e = replay_same(&rec, "echo", &[]);
    assert!(e.contains("replay matched"), "{e}");
}

/// `--kernel` and `--initrd` name moved files of a recorded boot; given to
/// the replay of a built-in guest's recording (or of a device-level one)
/// they are refused with a message, not ignored.
#[test]
fn replay_refuses_kernel_options_that_cannot_apply() {
    let rec = record_echo("kernel-flag");
    let bogus = tmp("no-such-vmlinux");
    for flag in ["--kernel", "--initrd"] {
        let o = duet(&["replay", p(&rec.log), flag, p(&bogus)], b"");
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{flag}: {e}");
        assert!(
            e.contains(flag) && e.contains("built-in guest `serial-echo`"),
            "{flag}: {e}"
        );
    }
}

#[test]
fn damaged_logs_fail_cleanly_with_status_1() {
    let rec = record_echo("damaged");
    let bytes = std::fs::read(&rec.log).unwrap();
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
    let rec = record_echo("diverge");
    let (header, mut events) = read_all(&std::fs::read(&rec.log).unwrap()).unwrap();
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
    let rec = record(
        "kvm",
        &["--backend", "kvm", "--guest", "irq-pit-ioapic"],
        b"",
    );
    kvm_device_replay(&rec.log);
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
    kvm_device_replay(&log);
    std::fs::remove_dir_all(&dir).ok();
}

/// A writable disk under --record runs on a copy-on-write overlay: the
/// `virtio` guest writes a sector of its --disk and reads it back, the
/// replay (with the same overlay) repeats it bit for bit, the image file
/// is unchanged after both, and a changed image is refused.
#[test]
fn a_writable_disk_records_and_replays_on_an_overlay() {
    let dir = tmp("cow");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    let image: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&img, &image).unwrap();
    let disk = format!("path={}", p(&img));
    let rec = record(
        "cow",
        &[
            "--backend",
            "interp",
            "--guest",
            "virtio",
            "--disk",
            &disk,
            "--checkpoint-every",
            "20000",
        ],
        b"",
    );
    assert!(
        rec.stderr.contains("copy-on-write overlay"),
        "{}",
        rec.stderr
    );
    // The guest drives --disk first: its write reads back.
    let first = rec
        .serial
        .lines()
        .find(|l| l.contains("requests done"))
        .unwrap_or("");
    assert!(
        first.contains("written and read back: same") && first.contains("id 'disk.img'"),
        "{}",
        rec.serial
    );
    assert!(
        std::fs::read(&img).unwrap() == image,
        "the recording changed the image"
    );
    let (h, _) = read_all(&std::fs::read(&rec.log).unwrap()).unwrap();
    assert!(
        h.machine.disks[0].0.contains("snapshot=on"),
        "{:?}",
        h.machine.disks
    );
    replay_same(&rec, "cow", &[]);
    assert!(
        std::fs::read(&img).unwrap() == image,
        "the replay changed the image"
    );
    let mut changed = image.clone();
    changed[600] ^= 1;
    std::fs::write(&img, &changed).unwrap();
    let o = duet(&["replay", p(&rec.log), "--serial", "null"], b"");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not the file recorded"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Under `--clock virtual` a network exchange is a function of the guest
/// alone: the `virtio` guest sends a frame on a `--net loopback,pcap=...`
/// NIC (each transport) and gets it back; two runs write byte-identical
/// captures, timestamps included, with the frames both ways in them.
#[test]
fn pcap_captures_under_the_virtual_clock_are_byte_identical() {
    let dir = tmp("pcap");
    std::fs::create_dir_all(&dir).unwrap();
    let run = |tag: &str| -> Vec<Vec<u8>> {
        let caps: Vec<PathBuf> = ["pci", "mmio"]
            .iter()
            .map(|t| dir.join(format!("{tag}-{t}.pcap")))
            .collect();
        let o = duet(
            &[
                "run",
                "--backend",
                "interp",
                "--clock",
                "virtual",
                "--guest",
                "virtio",
                "--net",
                &format!("loopback,transport=pci,pcap={}", p(&caps[0])),
                "--net",
                &format!("loopback,transport=mmio,pcap={}", p(&caps[1])),
                "--serial",
                "null",
            ],
            b"",
        );
        assert!(o.status.success(), "{tag}: {}", stderr(&o));
        caps.iter().map(|c| std::fs::read(c).unwrap()).collect()
    };
    let (a, b) = (run("a"), run("b"));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        // Header (24 bytes), then two records: the frame sent and the
        // frame received, each a 16-byte record header and the frame.
        assert!(
            x.len() >= 24 + 2 * (16 + 60),
            "capture {i}: {} bytes",
            x.len()
        );
        assert!(x == y, "capture {i} differs between two runs");
    }
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

/// Interrupt line changes and MSIs are compared one by one, in order: a
/// trace with one dropped, one changed or two swapped fails at that line.
#[test]
fn interrupt_signals_are_compared_exactly_in_order() {
    for name in ["irq-level-eoi", "pci"] {
        let t =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("golden/devices/{name}.devtrace"));
        let text = std::fs::read_to_string(&t).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let r = replay_devices(&text, None).unwrap();
        assert!(r.signals > 0, "{name}: no signals in the trace");
        let is_signal = |l: &str| l.starts_with("line ") || l.starts_with("msi ");
        let first = lines.iter().position(|l| is_signal(l)).unwrap();
        let fails_at = |v: &[String]| match replay_devices(&(v.join("\n") + "\n"), None) {
            Err(DeviceReplayError::Differs { line, .. }) => line,
            other => panic!("{name}: expected a difference, got {other:?}"),
        };
        let owned: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        // Dropped: the models raise it before the trace's next operation.
        let mut v = owned.clone();
        v.remove(first);
        assert_eq!(fails_at(&v), first + 1, "{name}: a dropped signal");
        // Changed level or line.
        let mut v = owned.clone();
        v[first] = match lines[first].split_whitespace().collect::<Vec<_>>()[..] {
            ["line", g, l] => format!("line {g} {}", 1 - l.parse::<u8>().unwrap()),
            ["msi", a, d] => format!(
                "msi  {a} {:#06x}",
                u32::from_str_radix(&d[2..], 16).unwrap() ^ 1
            ),
            _ => unreachable!(),
        };
        assert_eq!(fails_at(&v), first + 1, "{name}: a changed signal");
        // Two different signals in a row, swapped.
        if let Some(k) = (0..lines.len() - 1)
            .find(|&k| is_signal(lines[k]) && is_signal(lines[k + 1]) && lines[k] != lines[k + 1])
        {
            let mut v = owned.clone();
            v.swap(k, k + 1);
            assert_eq!(fails_at(&v), k + 1, "{name}: swapped signals");
        }
    }
}

/// A Linux boot on the interpreter with host time, driven by commands
/// typed on the serial console (one of them reads the uptime: real time
/// enters), recorded and replayed: the same serial output, the same device
/// trace, the same final state.
#[test]
fn a_linux_boot_with_typed_commands_replays_bit_exact() {
    let kit = common::console::linux_kit().clone();
    let rec = record(
        "linux",
        &[
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
        ],
        b"echo duet-$((6*7))\ncat /proc/uptime\nuname -r\npoweroff -f\n",
    );
    assert!(
        rec.serial.contains("duet-42"),
        "the commands ran: {}",
        rec.serial
    );
    replay_same(&rec, "linux", &[]);
}

/// A recording killed with SIGKILL in the middle of a Linux boot: the log
/// holds every frame written before the kill (a frame is flushed at each
/// checkpoint), `duet replay` refuses it with status 1, the byte offset and
/// how much of it is intact, never a panic; the intact part reads back.
#[test]
fn a_killed_recording_is_refused_cleanly_and_its_complete_part_reads() {
    let kit = common::console::linux_kit().clone();
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

/// virtio-console input through the door: a Linux boot reads a line the
/// host sends on hvc0's socket (at a moment only the host decides) and
/// answers on hvc0; the replay, with no socket at all, gives the same
/// serial output, the same hvc0 output and the same final state.
#[test]
fn virtio_console_input_is_recorded_and_replayed() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let kit = common::console::linux_kit().clone();
    let dir = tmp("hvc");
    std::fs::create_dir_all(&dir).unwrap();
    let (log, sock) = (dir.join("hvc.log"), dir.join("hvc.sock"));
    let (out1, out2, hvc2) = (
        dir.join("rec.serial"),
        dir.join("rep.serial"),
        dir.join("rep.hvc"),
    );
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
            "--console-device",
            &format!("virtio,socket={}", p(&sock)),
            "--serial",
            &format!("file={}", p(&out1)),
            "--record",
            p(&log),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn duet");
    let mut stdin = c.stdin.take().unwrap();
    stdin
        .write_all(
            // hvc0 is held open (fd 3) before the host sends: input to a
            // closed port is discarded by the guest's driver.
            b"exec 3<>/dev/hvc0; stty -F /dev/hvc0 raw -echo; echo hvc-ready\n\
              read -t 120 line <&3; echo hvc-got:$line\n\
              echo answer-$line > /dev/hvc0\n\
              poweroff -f\n",
        )
        .unwrap();
    let wait_for = |what: &dyn Fn() -> bool| {
        for _ in 0..3000 {
            if what() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    };
    assert!(wait_for(&|| sock.exists()), "hvc0 socket");
    let mut s = UnixStream::connect(&sock).expect("hvc0 socket");
    assert!(
        wait_for(&|| std::fs::read_to_string(&out1).is_ok_and(|t| t.contains("hvc-ready"))),
        "the guest set hvc0 up: {}",
        std::fs::read_to_string(&out1).unwrap_or_default()
    );
    s.write_all(b"from-host\n").unwrap();
    let o = c.wait_with_output().unwrap();
    drop(stdin);
    let serial = std::fs::read_to_string(&out1).unwrap_or_default();
    assert!(o.status.success(), "record: {} {serial}", stderr(&o));
    assert!(serial.contains("hvc-got:from-host"), "{serial}");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut hvc = Vec::new();
    let _ = s.read_to_end(&mut hvc);
    assert!(
        String::from_utf8_lossy(&hvc).contains("answer-from-host"),
        "hvc0 output: {:?}",
        String::from_utf8_lossy(&hvc)
    );
    let (h, events) = read_all(&std::fs::read(&log).unwrap()).unwrap();
    assert!(h.machine.console.is_some(), "the header names the console");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::ConsoleIn { bytes, .. } if bytes == b"from-host\n")),
        "the console input is in the log"
    );
    let o = duet(
        &[
            "replay",
            p(&log),
            "--serial",
            &format!("file={}", p(&out2)),
            "--console-output",
            p(&hvc2),
        ],
        b"",
    );
    assert!(o.status.success(), "replay: {}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&out2).unwrap(), serial);
    assert_eq!(std::fs::read(&hvc2).unwrap(), hvc, "hvc0 output");
    assert!(!sock.exists(), "the replay opened no socket");
    std::fs::remove_dir_all(&dir).ok();
}

/// A network exchange over `--net user` (DHCP, then an HTTP download
/// from a server on 127.0.0.1) recorded on the interpreter, replayed with
/// no network at all: the same serial output, the same final state.
#[test]
fn a_network_exchange_replays_without_the_network() {
    use std::io::{Read, Write};
    let kit = common::console::linux_kit().clone();
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
    let typed = format!(
        "udhcpc -i eth0 -n -q -t 10 >/dev/null 2>&1; ip -4 addr show eth0 | grep -o 'inet [0-9./]*'\n\
         wget -q -O - http://10.0.2.2:{port}/x\n\
         head -c 8 /dev/hwrng | od -An -tx1\n\
         poweroff -f\n"
    );
    let rec = record(
        "net",
        &[
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
        ],
        typed.as_bytes(),
    );
    assert!(
        rec.serial.contains("inet 10.0.2.15/24") && rec.serial.contains("payload-from-the-host-42"),
        "the exchange happened: {}",
        rec.serial
    );
    let (_, events) = read_all(&std::fs::read(&rec.log).unwrap()).unwrap();
    assert!(
        events.iter().any(|e| matches!(e, Event::NetRx { .. })),
        "received frames are in the log"
    );
    replay_same(&rec, "net", &[]);
}

/// A register block whose reads at `offset` come back with `xor` applied.
struct ChangedRegister {
    inner: devices::SharedDevice,
    offset: u64,
    xor: u8,
}

impl devices::BusDevice for ChangedRegister {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        devices::bus::lock(&self.inner).read(offset, data);
        if offset == self.offset {
            data[0] ^= self.xor;
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        devices::bus::lock(&self.inner).write(offset, data);
    }
}

fn virtio_golden() -> String {
    let t = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/devices/virtio.devtrace");
    std::fs::read_to_string(t).unwrap()
}

fn differs_at(text: &str, patch: Option<&dyn Fn(&mut duet::machine::Machine)>) -> (usize, String) {
    match replay_devices(text, patch) {
        Err(DeviceReplayError::Differs { line, got, .. }) => (line, got),
        other => panic!("expected a difference, got {other:?}"),
    }
}

/// The virtio golden trace carries the devices' reads of guest memory:
/// it replays with no guest, every read fed and every write compared.
#[test]
fn virtio_devices_replay_from_their_memory_accesses() {
    let text = virtio_golden();
    let r = replay_devices(&text, None).unwrap();
    let dma = |rw: &str| {
        text.lines()
            .filter(|l| l.starts_with(&format!("dma  {rw} ")))
            .count()
    };
    assert!(dma("r") > 20 && dma("w") > 20, "{} {}", dma("r"), dma("w"));
    assert_eq!(r.dma, dma("r") + dma("w"));
    for dev in [
        "builtin-blk-pci",
        "builtin-net-pci",
        "builtin-blk-mmio",
        "builtin-net-mmio",
    ] {
        assert!(
            text.contains(&format!("# virtio {dev}\n")),
            "{dev} not in the trace"
        );
    }
    assert!(r.signals > 0 && r.interrupts > 0);
}

/// A virtio-mmio register changed in the device model fails at the
/// first read of it.
#[test]
fn a_changed_virtio_register_fails_at_its_first_read() {
    let text = virtio_golden();
    // The first virtio-mmio block (the built-in disk); DeviceID at 0x008.
    let (base, _) = duet::layout::virtio_mmio::slot(0).unwrap();
    let device_id = format!("mmio r {:#010x} 4 ", base + 8);
    let first = text
        .lines()
        .position(|l| l.starts_with(&device_id))
        .unwrap()
        + 1;
    let patch = |m: &mut duet::machine::Machine| {
        m.wrap_mmio_device(base, |inner| {
            std::sync::Arc::new(std::sync::Mutex::new(ChangedRegister {
                inner,
                offset: 8,
                xor: 0x40,
            }))
        })
        .unwrap();
    };
    let (line, got) = differs_at(&text, Some(&patch));
    assert_eq!(line, first, "{got}");
}

/// What a device wrote to guest memory, where it read, and what it read
/// are all checked at their own line.
#[test]
fn virtio_memory_accesses_are_compared_at_their_line() {
    let text = virtio_golden();
    let lines: Vec<String> = text.lines().map(String::from).collect();
    let join = |v: &[String]| v.join("\n") + "\n";
    // A device write whose bytes differ (the last byte flipped).
    let w = lines
        .iter()
        .position(|l| l.starts_with("dma  w ") && !l.ends_with(" -"))
        .unwrap();
    let mut v = lines.clone();
    let (head, last) = lines[w].split_at(lines[w].len() - 2);
    v[w] = format!("{head}{:02x}", u8::from_str_radix(last, 16).unwrap() ^ 0xff);
    let (line, got) = differs_at(&join(&v), None);
    assert_eq!(line, w + 1, "{got}");
    assert!(got.starts_with("dma  w "), "{got}");
    // A device read at another address than the trace has.
    let r = lines.iter().position(|l| l.starts_with("dma  r ")).unwrap();
    let mut v = lines.clone();
    let f: Vec<&str> = lines[r].split_whitespace().collect();
    let addr = u64::from_str_radix(&f[2][2..], 16).unwrap();
    v[r] = format!("dma  r {:#x} {} {}", addr + 0x100, f[3], f[4]);
    assert_eq!(differs_at(&join(&v), None).0, r + 1);
    // A read of a descriptor changed: the device then does something else,
    // which shows at or after that line, never before.
    let r2 = lines
        .iter()
        .position(|l| l.starts_with("dma  r ") && l.split_whitespace().nth(3) == Some("16"))
        .expect("a descriptor read");
    let mut v = lines.clone();
    let f: Vec<&str> = lines[r2].split_whitespace().collect();
    // The descriptor's length field (bytes 8..12) set to 1.
    let mut hex = f[4].to_string();
    hex.replace_range(16..24, "01000000");
    v[r2] = format!("dma  r {} 16 {hex}", f[2]);
    assert!(differs_at(&join(&v), None).0 > r2 + 1);
    // Dropped: the device makes an access the trace does not list there.
    let mut v = lines.clone();
    let last_dma = lines.iter().rposition(|l| l.starts_with("dma ")).unwrap();
    v.remove(last_dma);
    assert!(replay_devices(&join(&v), None).is_err());
}
