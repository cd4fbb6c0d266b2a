//! Every `duet run` option's bad value: the exact message (each thing said
//! once, the flag and file at fault named, the fix where there is one) and
//! exit status 1, with nothing on stdout.

use std::path::PathBuf;
use std::process::Command;

fn duet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_duet"))
}

fn temp(name: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("duet-cli-err-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Run `duet run ARGS` and check stderr is exactly `want`, status 1.
#[track_caller]
fn fails_with(args: &[&str], want: &str) {
    fails_with_env(args, &[], want);
}

#[track_caller]
fn fails_with_env(args: &[&str], env: &[(&str, &str)], want: &str) {
    let mut c = duet();
    c.arg("run").args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err, want, "duet run {}", args.join(" "));
    assert_eq!(out.status.code(), Some(1), "duet run {}", args.join(" "));
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
}

/// clap's rendering of a bad value for `flag`.
fn invalid(value: &str, flag: &str, why: &str) -> String {
    format!(
        "error: invalid value '{value}' for '{flag}': {why}\n\nFor more information, try '--help'.\n"
    )
}

fn invalid_choice(value: &str, flag: &str, choices: &str) -> String {
    format!(
        "error: invalid value '{value}' for '{flag}'\n  [possible values: {choices}]\n\nFor more \
         information, try '--help'.\n"
    )
}

/// A synthetic bzImage: 4 setup sectors and `payload` bytes (syssize to
/// match), protocol 2.15, cmdline_size 2048.
fn bzimage(payload: usize) -> Vec<u8> {
    let setup = 5 * 512;
    let mut f = vec![0u8; setup + payload];
    f[0x1f1] = 4;
    f[0x1f4..0x1f8].copy_from_slice(&((payload / 16) as u32).to_le_bytes());
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    f[0x211] = 1;
    f[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
    f[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes());
    f
}

#[test]
fn kernel_file_errors() {
    fails_with(
        &["--kernel", "/nonexistent"],
        "duet: error: --kernel /nonexistent: no such file (check the path)\n",
    );
    let dir = std::env::temp_dir();
    fails_with(
        &["--kernel", dir.to_str().unwrap()],
        &format!(
            "duet: error: --kernel {}: is a directory, not a file\n",
            dir.display()
        ),
    );
    let junk = temp("junk", b"#!/bin/sh\necho not a kernel\n");
    fails_with(
        &["--kernel", junk.to_str().unwrap()],
        &format!(
            "duet: error: --kernel {}: not a kernel duet can boot: not an ELF file, a Linux \
             bzImage (no 'HdrS' signature at 0x202) or a multiboot kernel (no multiboot header \
             in the first 8 KiB)\n",
            junk.display()
        ),
    );
    // The first 100 KB of a bzImage whose header promises 1 MiB.
    let mut bz = bzimage(1 << 20);
    bz.truncate(100_000);
    let trunc = temp("trunc-bz", &bz);
    fails_with(
        &["--kernel", trunc.to_str().unwrap()],
        &format!(
            "duet: error: --kernel {}: truncated bzImage: its setup header says 1051136 bytes \
             (2560 of setup, 1048576 of payload), the file has 100000; use the complete file\n",
            trunc.display()
        ),
    );
    for p in [junk, trunc] {
        std::fs::remove_file(p).ok();
    }
}

#[test]
fn initrd_and_cmdline_errors() {
    let k = temp(
        "mb-kernel",
        &duet::bench::image(duet::bench::Workload::Alu, 10).unwrap(),
    );
    let k = k.to_str().unwrap();
    fails_with(
        &["--kernel", k, "--initrd", "/nonexistent/initrd.gz"],
        "duet: error: --initrd /nonexistent/initrd.gz: no such file (check the path)\n",
    );
    // The second of two.
    fails_with(
        &["--kernel", k, "--initrd", &format!("{k},/nonexistent/two")],
        "duet: error: --initrd /nonexistent/two: no such file (check the path)\n",
    );
    let bz = temp("bz-ok", &bzimage(0x1000));
    let long = "x".repeat(3000);
    fails_with(
        &["--kernel", bz.to_str().unwrap(), "--cmdline", &long],
        "duet: error: --cmdline: 3000 bytes, longer than the 2048 this kernel accepts; shorten \
         it\n",
    );
    fails_with(
        &["--initrd", "x"],
        "error: the following required arguments were not provided:\n  --kernel <FILE>\n\nUsage: \
         duet run --kernel <FILE> --initrd <FILE[,FILE...]>\n\nFor more information, try \
         '--help'.\n",
    );
    fails_with(
        &["--cmdline", "x"],
        "error: the following required arguments were not provided:\n  --kernel <FILE>\n\nUsage: \
         duet run --kernel <FILE> --cmdline <STR>\n\nFor more information, try '--help'.\n",
    );
    std::fs::remove_file(k).ok();
    std::fs::remove_file(bz).ok();
}

#[test]
fn memory_errors() {
    let (limit, why) = duet::machine::host_memory_limit();
    fails_with(
        &["--memory", "64T"],
        &format!(
            "duet: error: --memory 64T: 64 TiB of guest memory cannot be reserved on this host: \
             at most {} can be ({why}); give a smaller size\n",
            duet::machine::human_size(limit)
        ),
    );
    fails_with(
        &["--memory", "12Q"],
        &invalid(
            "12Q",
            "--memory <SIZE>",
            "unknown unit 'Q' (use K, M, G or T, e.g. 256M)",
        ),
    );
    fails_with(
        &["--memory", "1M"],
        &invalid("1M", "--memory <SIZE>", "at least 2 MiB is needed"),
    );
    fails_with(
        &["--memory", "2097153"],
        &invalid(
            "2097153",
            "--memory <SIZE>",
            "must be a whole number of 4 KiB pages (e.g. 256M)",
        ),
    );
    fails_with(
        &["--memory", "lots"],
        &invalid(
            "lots",
            "--memory <SIZE>",
            "not a size (expected a number with K, M, G or T, e.g. 256M)",
        ),
    );
    fails_with(
        &["--memory", "99999999999999999999"],
        &invalid(
            "99999999999999999999",
            "--memory <SIZE>",
            "too large a number",
        ),
    );
    fails_with(
        &["--memory", "20000000000T"],
        &invalid(
            "20000000000T",
            "--memory <SIZE>",
            "too large (more than 16 EiB)",
        ),
    );
}

#[test]
fn backend_guest_clock_and_irqchip_errors() {
    fails_with(
        &["--backend", "foo"],
        &invalid_choice("foo", "--backend <BACKEND>", "auto, kvm, interp"),
    );
    fails_with_env(
        &["--backend", "kvm"],
        &[("DUET_KVM_DEVICE", "/nonexistent/kvm")],
        "duet: error: --backend kvm: /nonexistent/kvm does not exist: the kvm module is not \
         loaded or the CPU has no hardware virtualization (use --backend interp)\n",
    );
    let names: Vec<&str> = duet::guests::all().iter().map(|g| g.name).collect();
    fails_with(
        &["--guest", "nope"],
        &format!(
            "duet: error: --guest nope: no such built-in guest (available: {})\n",
            names.join(", ")
        ),
    );
    fails_with(
        &["--guest", "x", "--kernel", "y"],
        "error: the argument '--guest <NAME>' cannot be used with '--kernel <FILE>'\n\nUsage: \
         duet run --guest <NAME>\n\nFor more information, try '--help'.\n",
    );
    fails_with(
        &["--clock", "bogus"],
        &invalid_choice("bogus", "--clock <CLOCK>", "host, virtual"),
    );
    fails_with(
        &["--clock", "virtual", "--backend", "kvm"],
        "duet: error: --clock virtual needs --backend interp (virtual time is the \
         interpreter's instruction count)\n",
    );
    fails_with(
        &["--irqchip", "bogus"],
        &invalid_choice("bogus", "--irqchip <IRQCHIP>", "userspace, kernel"),
    );
    fails_with(
        &["--irqchip", "kernel", "--backend", "interp"],
        "duet: error: --irqchip kernel needs --backend kvm (the interpreter has only duet's own \
         interrupt controllers)\n",
    );
    fails_with(
        &["--clock", "virtual", "--irqchip", "kernel"],
        "duet: error: --clock virtual needs the interpreter and --irqchip kernel needs KVM; \
         drop one\n",
    );
}

#[test]
fn output_file_errors() {
    fails_with(
        &["--guest", "hello-real", "--trace", "/nonexistent/dir/t"],
        "duet: error: --trace /nonexistent/dir/t: cannot create it: no such directory (check \
         the path)\n",
    );
    fails_with(
        &["--stats-json", "/nonexistent/dir/s.json"],
        "duet: error: --stats-json /nonexistent/dir/s.json: cannot create it: no such directory \
         (check the path)\n",
    );
    fails_with(
        &["--stats=yes"],
        "error: unexpected value 'yes' for '--stats' found; no more were expected\n\nUsage: duet \
         run --stats\n\nFor more information, try '--help'.\n",
    );
    fails_with(
        &["--frobnicate"],
        "error: unexpected argument '--frobnicate' found\n\nUsage: duet run [OPTIONS]\n\nFor \
         more information, try '--help'.\n",
    );
}

#[test]
fn serial_errors() {
    fails_with(
        &["--serial", "bogus"],
        &invalid(
            "bogus",
            "--serial <MODE>",
            "expected stdio, file=PATH, socket=PATH, pty or null",
        ),
    );
    fails_with(
        &["--serial", "file="],
        &invalid(
            "file=",
            "--serial <MODE>",
            "file= needs a path, e.g. file=/tmp/duet-console",
        ),
    );
    fails_with(
        &["--serial", "file=/nonexistent/dir/console.log"],
        "duet: error: --serial file=/nonexistent/dir/console.log: cannot create the file: no \
         such directory (check the path)\n",
    );
    fails_with(
        &["--serial", "socket=/nonexistent/dir/s"],
        "duet: error: --serial socket=/nonexistent/dir/s: cannot listen on it: no such \
         directory (check the path)\n",
    );
    let existing = temp("sock-exists", b"");
    fails_with(
        &["--serial", &format!("socket={}", existing.display())],
        &format!(
            "duet: error: --serial socket={}: the path already exists (remove it, or choose \
             another path)\n",
            existing.display()
        ),
    );
    std::fs::remove_file(existing).ok();
}

/// `duet run --help` documents every option, each with an example.
#[test]
fn run_help_documents_every_option_with_an_example() {
    let out = duet().args(["run", "--help"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    // Each option's paragraph (up to the next option) has an example; the
    // list comes from the help itself, so a new option needs one too.
    let options = help.split("\nExamples:").next().unwrap_or_default();
    let paragraphs: Vec<&str> = options.split("\n      --").skip(1).collect();
    assert!(paragraphs.len() > 20, "{help}");
    for p in paragraphs {
        let name: String = p
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if name == "help" {
            continue;
        }
        assert!(
            p.contains(&format!("Example: --{name}")),
            "--{name} has no example:\n{p}"
        );
    }
    assert!(help.contains("Exit status:"), "{help}");
}

/// `duet bench` and `duet difftest` options, and unknown subcommands.
#[test]
fn bench_and_difftest_errors() {
    let check = |args: &[&str], want: &str| {
        let out = duet().args(args).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stderr), want, "{args:?}");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    };
    check(
        &["bench", "--only", "nope"],
        "duet: error: --only nope: no such workload (use alu, mem or syscall)\n",
    );
    check(
        &["bench", "--qemu", ""],
        "duet: error: --qemu: empty; give a QEMU command line, e.g. --qemu \
         'qemu-system-x86_64 -accel tcg'\n",
    );
    check(
        &["bench", "--iterations", "x"],
        &invalid(
            "x",
            "--iterations <ITERATIONS>",
            "invalid digit found in string",
        ),
    );
    check(
        &["difftest", "--coverage", "/nonexistent/dir/c.txt"],
        "duet: error: --coverage /nonexistent/dir/c.txt: cannot create it: no such directory \
         (check the path)\n",
    );
    check(
        &["difftest", "--mode", "8"],
        &invalid_choice("8", "--mode <MODE>", "64, 32, 16"),
    );
    check(
        &["difftest", "--ring", "5"],
        &invalid_choice("5", "--ring <RING>", "0, 3, both"),
    );
    check(
        &["frob"],
        "error: unrecognized subcommand 'frob'\n\nUsage: duet [COMMAND]\n\nFor more information, \
         try '--help'.\n",
    );
}

/// The newer options: each bad value gives one line naming the option, the
/// value and what is accepted.
#[test]
fn newer_option_errors() {
    fails_with(
        &["--guest", "long-mode", "--tier", "bogus"],
        &invalid_choice("bogus", "--tier <TIER>", "interp, jit"),
    );
    fails_with(
        &["--guest", "long-mode", "--cpu", "bogus"],
        &invalid(
            "bogus",
            "--cpu <MODEL>",
            "unknown CPU model 'bogus' (x86-64-v1, x86-64-v2, x86-64-v3 or max)",
        ),
    );
    fails_with(
        &["--guest", "long-mode", "--seccomp", "maybe"],
        &invalid_choice("maybe", "--seccomp <on|off>", "on, off"),
    );
    fails_with(
        &[
            "--guest",
            "long-mode",
            "--trace",
            "/tmp/t",
            "--trace-limit",
            "12Q",
        ],
        &invalid(
            "12Q",
            "--trace-limit <SIZE>",
            "unknown unit 'Q' (use K, M, G or T, e.g. 256M)",
        ),
    );
    fails_with(
        &[
            "--guest",
            "long-mode",
            "--record",
            "/tmp/r.log",
            "--checkpoint-every",
            "often",
        ],
        &invalid(
            "often",
            "--checkpoint-every <N>",
            "expected a whole number of instructions (e.g. 50000000; 0: only at the end)",
        ),
    );
    fails_with(
        &[
            "--backend",
            "interp",
            "--guest",
            "long-mode",
            "--record",
            "/nonexistent/dir/run.log",
        ],
        "duet: error: --record /nonexistent/dir/run.log: cannot create it: no such directory \
         (check the path)\n",
    );
    fails_with(
        &[
            "--backend",
            "interp",
            "--guest",
            "long-mode",
            "--device-trace",
            "/nonexistent/dir/run.devtrace",
        ],
        "duet: error: --device-trace /nonexistent/dir/run.devtrace: cannot create it: no such \
         directory (check the path)\n",
    );
    fails_with(
        &[
            "--guest",
            "long-mode",
            "--console-device",
            "virtio,pty,bogus",
        ],
        &invalid(
            "virtio,pty,bogus",
            "--console-device <SPEC>",
            "unknown key 'bogus' (accepted: virtio, file=PATH, socket=PATH, stdio, pty, null, \
             transport=pci|mmio)",
        ),
    );
}

/// `duet replay` and `duet replay-devices`: a missing file, a file that is
/// not a log, an unwritable trace.
#[test]
fn replay_errors() {
    let run = |args: &[&str], want: &str| {
        let out = duet().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err, want, "duet {}", args.join(" "));
        assert_eq!(out.status.code(), Some(1), "duet {}", args.join(" "));
        assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
    };
    run(
        &["replay", "/nonexistent/run.log"],
        "duet: error: /nonexistent/run.log: no such file (check the path)\n",
    );
    run(
        &["replay-devices", "/nonexistent/run.devtrace"],
        "duet: error: /nonexistent/run.devtrace: no such file (check the path)\n",
    );
    let junk = temp("not-a-log", b"hello\n");
    run(
        &["replay", junk.to_str().unwrap()],
        &format!(
            "duet: error: {}: not a duet replay log: byte 0 should start with \"DUETLOG\\x1a\"\n",
            junk.display()
        ),
    );
    // A real recording, replayed with a trace that cannot be created.
    let log = std::env::temp_dir().join(format!("duet-cli-err-{}-rec.log", std::process::id()));
    let rec = duet()
        .args([
            "run",
            "--backend",
            "interp",
            "--clock",
            "virtual",
            "--guest",
            "hello-real",
        ])
        .arg("--record")
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(
        rec.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rec.stderr)
    );
    run(
        &[
            "replay",
            log.to_str().unwrap(),
            "--trace",
            "/nonexistent/dir/replay.trace",
        ],
        "duet: error: --trace /nonexistent/dir/replay.trace: cannot create it: no such directory \
         (check the path)\n",
    );
    for p in [junk, log] {
        std::fs::remove_file(p).ok();
    }
}
