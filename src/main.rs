//! The `duet` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use duet::backend::{BackendKind, IrqchipKind};
use duet::clock::ClockKind;
use duet::guests;
use duet::layout;
use duet::machine::{Machine, MachineConfig};
use duet::serial_port::SerialMode;

#[derive(Parser)]
#[command(
    name = "duet",
    version,
    about = "A userspace x86-64 hypervisor: one machine model on KVM or on duet's own interpreter"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest (by default the demo guest on the best backend).
    Run(Box<RunArgs>),
    /// List the built-in guests.
    Guests,
    /// Measure guest MIPS on three loops (ALU, memory with paging, syscall).
    Bench(BenchArgs),
    /// Differential testing: the interpreter against KVM, instruction by instruction.
    Difftest(DifftestArgs),
    /// Replay a run recorded with `duet run --record` (on the interpreter).
    Replay(ReplayArgs),
    /// Replay a device trace (`duet run --device-trace`) against the device
    /// models, with no CPU, checking every read and interrupt.
    ReplayDevices(ReplayDevicesArgs),
}

const REPLAY_EXAMPLES: &str = "\
Examples:
  duet run --backend interp --kernel bzImage --initrd initrd.gz --record boot.log
  duet replay boot.log --serial file=replayed.txt --trace replayed.trace

Exit status: 0 when the replay followed the recording to its end (same
checkpoints, same final state); 3 when it diverged (the first differing
checkpoint or event is named); 1 for errors (an unreadable, truncated, corrupt
or foreign log, a changed kernel or disk image).";

#[derive(clap::Args)]
#[command(after_help = REPLAY_EXAMPLES)]
struct ReplayArgs {
    /// The log `duet run --record` wrote.
    log: PathBuf,
    /// Where the replayed serial output goes: stdio (the default), file=PATH
    /// or null. Input is never read: it comes from the log.
    #[arg(long, value_name = "MODE", value_parser = parse_serial)]
    serial: Option<SerialMode>,
    /// Write one line per device access to FILE (as `duet run --trace`).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Where the replayed guest's virtio console (hvc0) output goes, when
    /// the recording had --console-device (default: discarded).
    #[arg(long, value_name = "FILE")]
    console_output: Option<PathBuf>,
    /// The kernel, when it moved since the recording (its hash must match).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// The initrd(s), when they moved (their hashes must match).
    #[arg(long, value_name = "FILE[,FILE...]")]
    initrd: Option<String>,
    /// Print counters on stderr at exit (as `duet run --stats`).
    #[arg(long)]
    stats: bool,
}

#[derive(clap::Args)]
struct ReplayDevicesArgs {
    /// Device traces written by `duet run --device-trace` (golden/devices/).
    #[arg(required = true)]
    traces: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct DifftestArgs {
    /// Seed of the random cases (the same seed replays the same cases).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Random cases per mode.
    #[arg(long, default_value_t = 10_000)]
    cases: u64,
    /// Code size: 64, 32 or 16 (default: all three).
    #[arg(long, value_parser = ["64", "32", "16"])]
    mode: Vec<String>,
    /// Privilege: 0, 3 or both (ring 0 of 16-bit is real mode).
    #[arg(long, default_value = "both", value_parser = ["0", "3", "both"])]
    ring: String,
    /// Which cases: random sequences, the targeted corpora, or both.
    #[arg(long, default_value = "all", value_parser = ["random", "targeted", "all"])]
    corpus: String,
    /// Divergences to minimize and print in full.
    #[arg(long, default_value_t = 20)]
    max_reports: usize,
    /// Longest random sequence (instructions under test).
    #[arg(long, default_value_t = 8)]
    max_len: usize,
    /// Print a progress line every N cases.
    #[arg(long, default_value_t = 0)]
    progress: u64,
    /// Replay only random case N (printed in full, whatever the verdict).
    #[arg(long)]
    case: Option<u64>,
    /// Write every exercised instruction form (iced Code) and its count.
    #[arg(long, value_name = "FILE")]
    coverage: Option<PathBuf>,
    /// Only x86-64-v2/v3 random cases (SSE4, AVX/AVX2, FMA, BMI, XSAVE
    /// ...; 64-bit ring 3, where the CPU is the oracle).
    #[arg(long)]
    isa_only: bool,
    /// The interpreter side's execution tier: the interpreter alone (the
    /// default), or the translation tier with every 64-bit block
    /// translated the first time it runs.
    #[arg(long, value_enum)]
    tier: Option<TierArg>,
}

/// `duet difftest`: exit status 0 without divergences, 3 with.
fn difftest(args: DifftestArgs) -> Result<ExitCode> {
    use duet::difftest::{run_campaign, CampaignConfig, Corpus, Mode};
    let bits: Vec<u32> = if args.mode.is_empty() {
        vec![64, 32, 16]
    } else {
        args.mode.iter().filter_map(|m| m.parse().ok()).collect()
    };
    let rings: Vec<u8> = match args.ring.as_str() {
        "0" => vec![0],
        "3" => vec![3],
        _ => vec![0, 3],
    };
    let modes: Vec<Mode> = bits
        .iter()
        .flat_map(|&b| {
            rings
                .iter()
                .filter_map(move |&r| Mode::from_bits_ring(b, r))
        })
        .collect();
    let corpus = match args.corpus.as_str() {
        _ if args.case.is_some() => Corpus::Random,
        "random" => Corpus::Random,
        "targeted" => Corpus::Targeted,
        _ => Corpus::All,
    };
    let cfg = CampaignConfig {
        seed: args.seed,
        cases: args.cases,
        modes,
        corpus,
        max_reports: args.max_reports,
        progress_every: args.progress,
        max_len: args.max_len.max(1),
        only: args.case,
        isa_only: args.isa_only,
        tier: match args.tier {
            Some(TierArg::Jit) => cpu_interp::Tier::Jit,
            _ => cpu_interp::Tier::Interp,
        },
    };
    // Create the coverage file first: a bad path fails now, not after the
    // campaign.
    let coverage = match &args.coverage {
        Some(p) => Some((
            std::fs::File::create(p).map_err(|e| {
                anyhow!(
                    "--coverage {}: cannot create it: {}",
                    p.display(),
                    io_reason(&e)
                )
            })?,
            p,
        )),
        None => None,
    };
    let summary = run_campaign(&cfg, &mut std::io::stdout()).context("difftest")?;
    print!("{}", summary.render());
    if let Some((mut f, path)) = coverage {
        use std::io::Write;
        f.write_all(summary.coverage_list().as_bytes())
            .map_err(|e| anyhow!("--coverage {}: cannot write it: {e}", path.display()))?;
    }
    Ok(if summary.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

#[derive(clap::Args)]
struct BenchArgs {
    /// What to measure: the interpreter or KVM.
    #[arg(value_enum, default_value = "interp")]
    target: BenchTarget,
    /// Loop iterations per workload.
    #[arg(long, default_value_t = 20_000_000)]
    iterations: u64,
    /// Also run the workloads under this QEMU command line (e.g.
    /// "qemu-system-x86_64 -accel tcg"), as multiboot kernels.
    #[arg(long, value_name = "CMD")]
    qemu: Option<String>,
    /// Only these workloads (alu, mem, syscall); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Interpreter backend's execution tier (default: the fastest).
    #[arg(long, value_enum)]
    tier: Option<TierArg>,
    /// `bench io`: where io-results.csv and io-report.html go.
    #[arg(long, value_name = "DIR", default_value = "bench-io")]
    out: std::path::PathBuf,
    /// `bench io`: full-size frames per throughput run.
    #[arg(long, default_value_t = duet::bench_io::DEFAULT_FRAMES)]
    frames: u32,
    /// `bench io`: runs per cell (each metric is the median).
    #[arg(long, default_value_t = 3)]
    runs: u32,
}

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
enum OnOff {
    On,
    #[default]
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum BenchTarget {
    Interp,
    Kvm,
    /// The I/O report: NIC paths × backends × interrupt controllers ×
    /// coalesced MMIO (CSV and HTML with plots in --out).
    Io,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum BackendArg {
    /// KVM when the CPU virtualizes in hardware (vmx/svm) and /dev/kvm
    /// works, else the interpreter.
    Auto,
    /// KVM, whatever the host.
    Kvm,
    /// duet's own x86 interpreter.
    Interp,
}

/// A `--memory` value: the bytes, and the text as given (for messages).
#[derive(Clone, Debug)]
struct MemoryArg {
    bytes: u64,
    text: String,
}

const RUN_EXAMPLES: &str = "\
Examples:
  duet run                                     the demo guest on the best backend
  duet run --guest hello-real --backend interp
  duet run --kernel bzImage --initrd initramfs.cpio.gz --cmdline 'console=ttyS0 panic=-1'
  duet run --kernel mb.elf --initrd 'mod1.bin arg=1,mod2.bin'     (multiboot modules)
  printf 'uname -r\\npoweroff -f\\n' | duet run --kernel bzImage --initrd initrd.gz \\
      --serial file=console.log --stats-json stats.json; echo \"status $?\"

Exit status: 0 when the guest stopped, powered off or was quit (Ctrl-A x, or
SIGTERM, SIGINT or SIGHUP: the VM stops cleanly, disk images flushed); the
isa-debug-exit status ((value << 1) | 1) when it wrote to port 0xf4; 2 after a
reset request; 4 after a triple fault; 6 when the guest could not continue; 1 for
errors in the options or on the host.";

#[derive(clap::Args, Default)]
#[command(after_help = RUN_EXAMPLES)]
struct RunArgs {
    /// Execution backend: auto picks KVM only when the CPU has hardware
    /// virtualization (vmx/svm) and KVM is not KVM-PVM, and says which on
    /// stderr.
    ///
    /// Example: --backend interp
    #[arg(long, value_enum, value_name = "BACKEND")]
    backend: Option<BackendArg>,
    /// Boot a built-in guest (`duet guests` lists them; the default is
    /// long-mode).
    ///
    /// Example: --guest hello-real
    #[arg(long, value_name = "NAME", conflicts_with = "kernel")]
    guest: Option<String>,
    /// Boot this kernel: a Linux bzImage, an ELF vmlinux with a PVH note, or
    /// a multiboot kernel (ELF or with the header's address fields).
    ///
    /// Example: --kernel /boot/vmlinuz
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk(s) for --kernel, separated by commas (a comma inside
    /// a name doubled, as in QEMU's -initrd). Linux gets them concatenated;
    /// a multiboot kernel gets each as a module, "FILE ARGS" with its
    /// command line.
    ///
    /// Example: --initrd initramfs.cpio.gz
    #[arg(long, value_name = "FILE[,FILE...]", requires = "kernel")]
    initrd: Option<String>,
    /// Kernel command line for --kernel (default: console=ttyS0).
    ///
    /// Example: --cmdline 'console=ttyS0 panic=-1 quiet'
    #[arg(long, value_name = "STR", requires = "kernel")]
    cmdline: Option<String>,
    /// Guest memory (default 256M): a byte count or K, M, G, T with an
    /// optional iB or B.
    ///
    /// Example: --memory 1G
    #[arg(long, value_name = "SIZE", value_parser = parse_memory)]
    memory: Option<MemoryArg>,
    /// Where the guest's serial console (COM1) goes: stdio (the default),
    /// file=PATH (output to PATH, input still from stdin), socket=PATH (a
    /// Unix socket to attach to), pty (a pseudo-terminal, named on stderr)
    /// or null.
    ///
    /// Example: --serial file=console.log
    #[arg(long, value_name = "MODE", value_parser = parse_serial)]
    serial: Option<SerialMode>,
    /// Write one line per device access to FILE.
    ///
    /// Example: --trace run.trace
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// The most the --trace file may grow to (default 4G); then tracing
    /// stops with a last line saying so.
    ///
    /// Example: --trace-limit 512M
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "trace")]
    trace_limit: Option<u64>,
    /// Print device-access, exit and instruction counters on stderr at
    /// exit.
    ///
    /// Example: --stats
    #[arg(long)]
    stats: bool,
    /// Write the same counters, the outcome and the wall time to FILE as
    /// JSON.
    ///
    /// Example: --stats-json stats.json
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// Seccomp filter on all of duet's threads once the VM is set up (on by
    /// default): other system calls (opening files, starting programs,
    /// ptrace, mount, ...) are refused with EPERM. `off` for debugging.
    ///
    /// Example: --seccomp off
    #[arg(long, value_enum, value_name = "on|off", default_value = "on")]
    seccomp: SeccompArg,
    /// VM clock: host monotonic time, or virtual time derived from the
    /// interpreter's instruction count (bit-for-bit repeatable runs; picks
    /// the interpreter).
    ///
    /// Example: --clock virtual
    #[arg(long, value_enum, value_name = "CLOCK", default_value = "host")]
    clock: ClockArg,
    /// Interrupt controllers: duet's own (userspace) or KVM's in-kernel ones
    /// (KVM only).
    ///
    /// Example: --irqchip kernel
    #[arg(long, value_enum, value_name = "IRQCHIP", default_value = "userspace")]
    irqchip: IrqchipArg,
    /// Interpreter backend's execution tier: the interpreter alone, or hot
    /// code translated to host code (default: the fastest this host
    /// supports).
    ///
    /// Example: --tier interp
    #[arg(long, value_enum)]
    tier: Option<TierArg>,
    /// Print the hottest guest blocks and where host time went (translated
    /// code, interpreter helpers, interpreter, translating) at exit.
    ///
    /// Example: --profile --stats
    #[arg(long)]
    profile: bool,
    /// Coalesce writes to the emulated NICs' side-effect-free registers:
    /// KVM's coalesced MMIO ring on KVM, the same queue on the interpreter
    /// (the device trace is the same either way).
    ///
    /// Example: --coalesced-mmio on --net user,model=e1000
    #[arg(
        long = "coalesced-mmio",
        value_enum,
        value_name = "ON|OFF",
        default_value = "off"
    )]
    coalesced_mmio: OnOff,
    /// A virtio-blk disk on a raw image (repeatable; the first is /dev/vda):
    /// path=FILE[,readonly=on][,snapshot=on][,transport=pci|mmio][,serial=ID].
    /// snapshot=on: the guest's writes go to a copy-on-write overlay, the
    /// image is not changed (always so for a writable disk under --record).
    ///
    /// Example: --disk path=disk.img,readonly=on
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<duet::device_args::DiskSpec>,
    /// A NIC (repeatable): user[,hostfwd=tcp:127.0.0.1:H-:G]
    /// (user-mode networking, guest 10.0.2.15, host 10.0.2.2, DNS 10.0.2.3)
    /// or tap=IFNAME or loopback (frames come straight back); with [,mac=..][,pcap=FILE][,transport=pci|mmio]
    /// [,model=virtio|e1000] (virtio-net, or an emulated Intel 82540EM on PCI).
    ///
    /// Example: --net user,hostfwd=tcp:127.0.0.1:8080-:80,pcap=net.pcap,model=e1000
    #[arg(long = "net", value_name = "SPEC")]
    nets: Vec<duet::device_args::NetSpec>,
    /// A virtio-rng entropy device: host getrandom, or a seeded
    /// generator (seed=N, and always under --clock virtual);
    /// [transport=pci|mmio][,seed=N].
    ///
    /// Example: --rng transport=mmio
    #[arg(long, value_name = "SPEC", num_args = 0..=1, default_missing_value = "")]
    rng: Option<duet::device_args::RngSpec>,
    /// A virtio console (hvc0 in Linux): virtio,file=PATH, virtio,socket=PATH,
    /// virtio,stdio, virtio,pty (a new pseudo-terminal, its path on stderr)
    /// or virtio,null, with [,transport=pci|mmio].
    ///
    /// Example: --console-device virtio,socket=/tmp/hvc0
    #[arg(long = "console-device", value_name = "SPEC")]
    console_device: Option<duet::device_args::ConsoleSpec>,
    /// CPU model the guest's CPUID describes: x86-64-v1, x86-64-v2,
    /// x86-64-v3 or max (everything the interpreter implements; the
    /// default). On KVM never more than the host offers.
    ///
    /// Example: --cpu x86-64-v2
    #[arg(long, value_name = "MODEL", value_parser = parse_cpu_model, default_value = "max")]
    cpu: cpu_interp::cpuid::CpuModel,
    /// Record the run for `duet replay`: every nondeterministic input (serial
    /// input, received frames, the clock's jumps while the guest waits,
    /// host stops), with checkpoints. On the interpreter it replays bit for
    /// bit; a KVM recording is device-level (see docs/REPLAY.md).
    ///
    /// Example: --record boot.log
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// With --record: hash the machine's state every N instructions, so a
    /// replay names where it diverged (0: only at the end).
    ///
    /// Example: --checkpoint-every 10000000 --record boot.log
    #[arg(
        long,
        value_name = "N",
        default_value_t = 50_000_000,
        value_parser = parse_checkpoint_every,
        requires = "record"
    )]
    checkpoint_every: u64,
    /// Write a replayable device-level trace to FILE (for `duet
    /// replay-devices`).
    ///
    /// Example: --device-trace guest.devtrace
    #[arg(long, value_name = "FILE")]
    device_trace: Option<PathBuf>,
}

fn parse_checkpoint_every(s: &str) -> std::result::Result<u64, String> {
    s.replace('_', "").parse().map_err(|_| {
        "expected a whole number of instructions (e.g. 50000000; 0: only at the end)".to_string()
    })
}

fn parse_cpu_model(s: &str) -> std::result::Result<cpu_interp::cpuid::CpuModel, String> {
    use cpu_interp::cpuid::CpuModel;
    let m = CpuModel::parse(s).ok_or_else(|| {
        format!("unknown CPU model '{s}' (x86-64-v1, x86-64-v2, x86-64-v3 or max)")
    })?;
    if !m.implemented() {
        return Err(format!(
            "CPU model {m} is not complete in duet's interpreter yet (available: {})",
            CpuModel::ALL
                .iter()
                .filter(|m| m.implemented())
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(m)
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum TierArg {
    Interp,
    Jit,
}

impl TierArg {
    fn tier(arg: Option<TierArg>) -> cpu_interp::Tier {
        match arg {
            Some(TierArg::Interp) => cpu_interp::Tier::Interp,
            Some(TierArg::Jit) => cpu_interp::Tier::Jit,
            None => duet::machine::default_tier(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
enum SeccompArg {
    /// Limit duet's threads to the system calls a running VM needs.
    #[default]
    On,
    /// No filter (debugging).
    Off,
}

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
enum ClockArg {
    /// Host monotonic time.
    #[default]
    Host,
    /// Time from the interpreter's instruction count.
    Virtual,
}

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
enum IrqchipArg {
    /// duet's PIC, IOAPIC, LAPIC and PIT models.
    #[default]
    Userspace,
    /// KVM's in-kernel ones.
    Kernel,
}

/// Parse "256M", "1G", "512MiB", "4096", "2 GiB" ...
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err("not a size (expected a number with K, M, G or T, e.g. 256M)".into());
    }
    let n: u64 = num.parse().map_err(|_| "too large a number".to_string())?;
    let unit = unit.trim();
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => layout::KIB,
        "m" | "mb" | "mib" => layout::MIB,
        "g" | "gb" | "gib" => layout::GIB,
        "t" | "tb" | "tib" => 1024 * layout::GIB,
        _ => {
            return Err(format!(
                "unknown unit '{unit}' (use K, M, G or T, e.g. 256M)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| "too large (more than 16 EiB)".to_string())
}

/// `--memory`: a size of at least the minimum, in whole 4 KiB pages.
fn parse_memory(s: &str) -> std::result::Result<MemoryArg, String> {
    let bytes = parse_size(s)?;
    if bytes < layout::MIN_MEMORY {
        return Err(format!(
            "at least {} is needed",
            duet::machine::human_size(layout::MIN_MEMORY)
        ));
    }
    if bytes % 4096 != 0 {
        return Err("must be a whole number of 4 KiB pages (e.g. 256M)".into());
    }
    Ok(MemoryArg {
        bytes,
        text: s.to_string(),
    })
}

fn parse_serial(s: &str) -> std::result::Result<SerialMode, String> {
    s.parse()
}

/// The backend for `arg`; for `auto`, `needs` (from other options) may
/// decide. Returns the kind and, for `auto`, the line to print.
fn choose_backend(
    arg: BackendArg,
    needs: Option<(BackendKind, &str)>,
) -> Result<(BackendKind, Option<String>)> {
    use duet::backend::select::{choose, BackendPolicy, HostFacts};
    if let (BackendArg::Auto, Some((kind, why))) = (arg, needs) {
        return Ok((kind, Some(format!("duet: backend {}: {why}", kind.name()))));
    }
    let policy = match arg {
        BackendArg::Auto => BackendPolicy::Auto,
        BackendArg::Kvm => BackendPolicy::Kvm,
        BackendArg::Interp => BackendPolicy::Interp,
    };
    let facts = match policy {
        BackendPolicy::Interp => HostFacts {
            hw_virt_flag: None,
            kvm_pvm: false,
            kvm: Err("not probed".into()),
        },
        _ => HostFacts::probe(),
    };
    let choice = choose(policy, &facts).map_err(anyhow::Error::msg)?;
    let line = (policy == BackendPolicy::Auto)
        .then(|| format!("duet: backend {}: {}", choice.kind.name(), choice.reason));
    Ok((choice.kind, line))
}

/// What an I/O error means to the user.
/// Why a file named on the command line cannot be read, with the fix.
fn read_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound => "no such file (check the path)".into(),
        ErrorKind::PermissionDenied => {
            "permission denied (make the file readable for this user)".into()
        }
        ErrorKind::IsADirectory => "is a directory, not a file".into(),
        _ => e.to_string(),
    }
}

fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound => "no such directory (check the path)".into(),
        ErrorKind::PermissionDenied => "permission denied (choose a writable place)".into(),
        ErrorKind::IsADirectory => "is a directory".into(),
        _ => e.to_string(),
    }
}

fn run(args: RunArgs) -> Result<ExitCode> {
    use duet::machine::MachineError;
    let start = std::time::Instant::now();
    // SIGTERM, SIGINT, SIGHUP: blocked in every thread from here on and
    // taken by one thread, which stops the VM cleanly.
    let stop_signals = duet::signals::StopSignals::block()?;
    // Everything that can be checked before the VM exists, in the order of
    // the options' importance: outputs first (so a long run does not fail
    // at its end), then the guest, the backend, memory, the kernel.
    let mut stats_json = match &args.stats_json {
        Some(p) => Some((
            std::fs::File::create(p).map_err(|e| {
                anyhow!(
                    "--stats-json {}: cannot create it: {}",
                    p.display(),
                    io_reason(&e)
                )
            })?,
            p.clone(),
        )),
        None => None,
    };
    let serial_mode = args.serial.clone().unwrap_or_default();
    let mut port = serial_mode.open().map_err(|e| {
        let given = match &serial_mode {
            SerialMode::File(p) => format!("file={}", p.display()),
            SerialMode::Socket(p) => format!("socket={}", p.display()),
            SerialMode::Pty => "pty".into(),
            SerialMode::Stdio => "stdio".into(),
            SerialMode::Null => "null".into(),
        };
        anyhow!("--serial {given}: {e}")
    })?;
    let guest = match &args.kernel {
        Some(_) => None,
        None => {
            let name = args.guest.as_deref().unwrap_or(guests::DEFAULT_GUEST);
            Some(guests::find(name).ok_or_else(|| {
                let names: Vec<&str> = guests::all().iter().map(|g| g.name).collect();
                anyhow!(
                    "--guest {name}: no such built-in guest (available: {})",
                    names.join(", ")
                )
            })?)
        }
    };
    let backend_arg = args.backend.unwrap_or(BackendArg::Auto);
    let needs = match (args.clock, args.irqchip) {
        (ClockArg::Virtual, IrqchipArg::Kernel) => {
            bail!("--clock virtual needs the interpreter and --irqchip kernel needs KVM; drop one")
        }
        (ClockArg::Virtual, _) => {
            if backend_arg == BackendArg::Kvm {
                bail!(
                    "--clock virtual needs --backend interp (virtual time is the interpreter's \
                     instruction count)"
                );
            }
            Some((BackendKind::Interp, "--clock virtual needs the interpreter"))
        }
        (_, IrqchipArg::Kernel) => {
            if backend_arg == BackendArg::Interp {
                bail!(
                    "--irqchip kernel needs --backend kvm (the interpreter has only duet's own \
                     interrupt controllers)"
                );
            }
            Some((BackendKind::Kvm, "--irqchip kernel needs KVM"))
        }
        _ => None,
    };
    let (kind, backend_line) = choose_backend(backend_arg, needs)?;
    let memory = args.memory.clone();
    let mut args = args;
    let record = match args.record.clone() {
        Some(p) => Some(prepare_record(&mut args, &p, kind)?),
        None => None,
    };
    let clock = match (args.clock, &record) {
        (ClockArg::Virtual, _) => ClockKind::Virtual,
        (ClockArg::Host, Some(r)) if r.full => ClockKind::Recorded,
        (ClockArg::Host, _) => ClockKind::Host,
    };
    let cfg = MachineConfig {
        memory: memory.as_ref().map_or(layout::DEFAULT_MEMORY, |m| m.bytes),
        trace: args.trace.clone(),
        trace_limit: args.trace_limit.unwrap_or(duet::trace::DEFAULT_TRACE_LIMIT),
        clock,
        epoch: record.as_ref().map(|r| r.header.machine.epoch),
        device_trace: args
            .device_trace
            .clone()
            .or_else(|| record.as_ref().and_then(|r| r.device_trace.clone())),
        irqchip: match args.irqchip {
            IrqchipArg::Userspace => IrqchipKind::Userspace,
            IrqchipArg::Kernel => IrqchipKind::Kernel,
        },
        tier: TierArg::tier(args.tier),
        cpu: args.cpu,
        coalesced_mmio: args.coalesced_mmio == OnOff::On,
        ..MachineConfig::new(kind, port.take_output())
    };
    let memory_text = memory.map_or_else(|| "256M (the default)".to_string(), |m| m.text);
    let mut m = Machine::new(cfg).map_err(|e| match e {
        MachineError::MemorySize(..)
        | MachineError::MemoryAlloc { .. }
        | MachineError::MemoryTooLarge { .. } => anyhow!("--memory {memory_text}: {e}"),
        MachineError::Trace(duet::trace::TraceError::Create { path, source }) => {
            // The same error type serves --trace and --device-trace.
            let flag = if args
                .trace
                .as_ref()
                .is_some_and(|t| t.display().to_string() == path)
            {
                "--trace"
            } else {
                "--device-trace"
            };
            anyhow!("{flag} {path}: cannot create it: {}", io_reason(&source))
        }
        e => anyhow!(e),
    })?;
    if args
        .console_device
        .as_ref()
        .is_some_and(|c| c.host == duet::device_args::ConsoleHost::Stdio)
        && port.reads_stdin()
    {
        bail!(
            "--console-device virtio,stdio: stdin already feeds the serial console; give \
             --serial file=PATH, socket=PATH or null, or put hvc0 on a socket"
        );
    }
    let _devices = duet::virtio::plug(
        &mut m,
        &duet::virtio::DeviceArgs {
            disks: args.disks.clone(),
            nets: args.nets.clone(),
            rng: args.rng.clone(),
            console: args.console_device.clone(),
            door: match &record {
                Some(r) if r.full => duet::virtio::InputDoor::Record(r.net_log.clone()),
                _ => duet::virtio::InputDoor::Live,
            },
        },
    )?;
    if args.profile {
        m.set_profiling(true);
    }
    match (guest, &args.kernel) {
        (Some(g), _) => m.load(&(g.build)())?,
        (None, Some(k)) => m.load_kernel(&duet::loader::KernelSpec {
            kernel: k.clone(),
            initrd: args
                .initrd
                .as_deref()
                .map(duet::loader::split_initrd_list)
                .unwrap_or_default(),
            cmdline: args
                .cmdline
                .clone()
                .unwrap_or_else(|| "console=ttyS0".to_string()),
        })?,
        (None, None) => unreachable!("a guest or a kernel is always chosen"),
    }
    if let Some(line) = backend_line {
        eprintln!("{line}");
    }
    if let Some(n) = &port.notice {
        eprintln!("{n}");
    }
    // The serial console's input: stdin (raw mode on a terminal, Ctrl-A x
    // quits), a socket or a pseudo-terminal.
    let raw = if port.reads_stdin() {
        duet::console::RawMode::enter()?
    } else {
        None
    };
    let input = m.serial_input();
    port.start_input(input, m.control(), m.kicker(), raw.is_some());
    stop_signals.spawn_waiter(m.control(), m.kicker())?;
    // Every file a recording writes or reads is open before the run, so
    // the seccomp filter (no open) holds for recordings too.
    let mut kvm_log = None;
    if let Some(r) = &record {
        let w = duet::replay::log::LogWriter::create(&r.path, &r.header).map_err(|e| match e {
            duet::replay::log::LogError::Open { source, .. } => anyhow!(
                "--record {}: cannot create it: {}",
                r.path.display(),
                io_reason(&source)
            ),
            e => anyhow!("--record {}: {e}", r.path.display()),
        })?;
        if r.full {
            let door = duet::replay::Door::record(w, args.checkpoint_every)
                .with_net_log(r.net_log.clone());
            m.set_door(door);
        } else {
            kvm_log = Some(open_kvm_log(r, w)?);
        }
    }
    if args.seccomp == SeccompArg::On {
        duet::sandbox::apply_to_all_threads()?;
    }
    let outcome = m.run();
    drop(raw);
    let outcome = outcome?;
    if let Some(r) = &record {
        finish_record(r, &m, &outcome, kvm_log)?;
    }
    let status = outcome.exit_status();
    if status != 0 || matches!(outcome, duet::machine::Outcome::HostSignal(_)) {
        eprintln!("duet: {}", outcome.describe());
    } else {
        log::info!("{}", outcome.describe());
    }
    if args.stats {
        eprint!("{}", m.stats_report());
    }
    if args.profile {
        match m.profile_report() {
            Some(r) => eprint!("{r}"),
            None => eprintln!("duet: --profile: this backend keeps no profile"),
        }
    }
    if let Some((f, path)) = &mut stats_json {
        use std::io::Write;
        f.write_all(duet::stats::to_json(&m, &outcome, start.elapsed()).as_bytes())
            .map_err(|e| anyhow!("--stats-json {}: cannot write it: {e}", path.display()))?;
    }
    drop(port);
    Ok(ExitCode::from(status as u8))
}

/// A recording being set up.
struct Recording {
    path: PathBuf,
    header: duet::replay::log::LogHeader,
    /// Full (interpreter) or device-level (KVM).
    full: bool,
    /// Where the KVM recorder's device trace goes first.
    device_trace: Option<PathBuf>,
    net_log: std::sync::Arc<std::sync::Mutex<Vec<duet::replay::log::Event>>>,
}

/// A file as a log header names it: path, size and hash.
fn file_ref(p: &std::path::Path, flag: &str) -> Result<duet::replay::log::FileRef> {
    let b = std::fs::read(p).map_err(|e| anyhow!("{flag} {}: {}", p.display(), io_reason(&e)))?;
    Ok(duet::replay::log::FileRef {
        path: p.display().to_string(),
        size: b.len() as u64,
        xxh3: format!("{:016x}", duet::state::hash(&b)),
    })
}

fn transport_name(t: duet::machine::VirtioTransport) -> &'static str {
    match t {
        duet::machine::VirtioTransport::Pci => "pci",
        duet::machine::VirtioTransport::Mmio => "mmio",
    }
}

fn disk_string(d: &duet::device_args::DiskSpec) -> String {
    let mut s = format!(
        "path={},transport={}",
        d.path.display(),
        transport_name(d.transport)
    );
    if d.readonly {
        s.push_str(",readonly=on");
    } else if d.snapshot {
        s.push_str(",snapshot=on");
    }
    if let Some(id) = &d.serial {
        s.push_str(&format!(",serial={id}"));
    }
    s
}

fn net_string(i: usize, n: &duet::device_args::NetSpec) -> String {
    use duet::device_args::NetBackendSpec;
    let mac = n.mac.unwrap_or_else(|| duet::net::default_mac(i));
    let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    let backend = match &n.backend {
        NetBackendSpec::User { .. } => "user".to_string(),
        NetBackendSpec::Tap { ifname } => format!("tap={ifname}"),
        NetBackendSpec::Loopback => "loopback".to_string(),
    };
    let model = match n.model {
        duet::device_args::NicModel::E1000 => ",model=e1000",
        _ => "",
    };
    let transport = match n.model {
        duet::device_args::NicModel::E1000 => String::new(),
        _ => format!(",transport={}", transport_name(n.transport)),
    };
    format!("{backend},mac={}{transport}{model}", mac.join(":"))
}

/// Check the options a recording allows and describe the machine in the
/// log's header. Fixes what would differ in a replay: the RNG's seed, the
/// RTC's start.
fn prepare_record(
    args: &mut RunArgs,
    path: &std::path::Path,
    kind: BackendKind,
) -> Result<Recording> {
    use duet::replay::log::{LogHeader, LogKind, RecordedMachine};
    let full = kind == BackendKind::Interp;
    if !full
        && (!args.disks.is_empty()
            || !args.nets.is_empty()
            || args.rng.is_some()
            || args.console_device.is_some())
    {
        bail!("--record on KVM records the device trace, which cannot hold virtio devices (they read guest memory): record on --backend interp");
    }
    let mut disks = Vec::new();
    for d in &mut args.disks {
        if !d.readonly && !d.snapshot {
            // A replay needs the image as the recording found it: the
            // guest's writes go to a copy-on-write overlay.
            d.snapshot = true;
            eprintln!(
                "duet: --record: the guest's writes to --disk path={} go to a copy-on-write overlay (snapshot=on); the image is not changed",
                d.path.display()
            );
        }
        disks.push((disk_string(d), file_ref(&d.path, "--disk")?));
    }
    let virtual_time = args.clock == ClockArg::Virtual;
    let rng_seed = args.rng.as_mut().map(|r| {
        let seed = r.seed.unwrap_or_else(|| {
            if virtual_time {
                duet::virtio::DEFAULT_RNG_SEED
            } else {
                // Host entropy picks the seed; the log keeps it.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                duet::state::hash(
                    &[t.to_le_bytes(), u64::from(std::process::id()).to_le_bytes()].concat(),
                )
            }
        });
        r.seed = Some(seed);
        seed
    });
    let epoch = if virtual_time {
        duet::machine::VIRTUAL_EPOCH
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    let mut initrd = Vec::new();
    if let Some(list) = &args.initrd {
        for item in duet::loader::split_initrd_list(list) {
            // A multiboot module is "FILE ARGS": the file is hashed.
            let file = item.split_whitespace().next().unwrap_or("").to_string();
            let mut f = file_ref(std::path::Path::new(&file), "--initrd")?;
            f.path = item;
            initrd.push(f);
        }
    }
    let machine = RecordedMachine {
        backend: kind.name().to_string(),
        memory: args
            .memory
            .as_ref()
            .map_or(layout::DEFAULT_MEMORY, |m| m.bytes),
        clock: if virtual_time { "virtual" } else { "host" }.into(),
        irqchip: match args.irqchip {
            IrqchipArg::Userspace => "userspace",
            IrqchipArg::Kernel => "kernel",
        }
        .into(),
        epoch,
        guest: match &args.kernel {
            Some(_) => None,
            None => Some(
                args.guest
                    .clone()
                    .unwrap_or_else(|| guests::DEFAULT_GUEST.to_string()),
            ),
        },
        kernel: match &args.kernel {
            Some(k) => Some(file_ref(k, "--kernel")?),
            None => None,
        },
        initrd,
        cmdline: args.kernel.as_ref().map(|_| {
            args.cmdline
                .clone()
                .unwrap_or_else(|| "console=ttyS0".to_string())
        }),
        disks,
        nets: args
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| net_string(i, n))
            .collect(),
        rng: args
            .rng
            .as_ref()
            .map(|r| format!("transport={}", transport_name(r.transport))),
        console: args
            .console_device
            .as_ref()
            .map(|c| format!("virtio,transport={}", transport_name(c.transport))),
        rng_seed,
        checkpoint_interval: if full { args.checkpoint_every } else { 0 },
    };
    let device_trace = (!full).then(|| {
        args.device_trace
            .clone()
            .unwrap_or_else(|| path.with_extension("devtrace.tmp"))
    });
    Ok(Recording {
        path: path.to_path_buf(),
        header: LogHeader {
            duet_version: env!("CARGO_PKG_VERSION").to_string(),
            kind: if full {
                LogKind::Full
            } else {
                LogKind::Devices
            },
            machine,
        },
        full,
        device_trace,
        net_log: Default::default(),
    })
}

/// A KVM recording's log, opened before the run: the writer (its header
/// written) and the device trace the run writes, opened for reading.
struct KvmLog {
    writer: duet::replay::log::LogWriter,
    trace: std::fs::File,
}

/// Open what a KVM recording needs after its run. The device trace's
/// temporary file is unlinked at once (the open descriptor keeps it), so
/// no file is left behind whatever happens to the run.
fn open_kvm_log(r: &Recording, writer: duet::replay::log::LogWriter) -> Result<KvmLog> {
    let path = r
        .device_trace
        .as_ref()
        .ok_or_else(|| anyhow!("--record: no device trace for a KVM recording"))?;
    let trace = std::fs::File::open(path).map_err(|e| {
        anyhow!(
            "--record: opening the device trace {}: {}",
            path.display(),
            io_reason(&e)
        )
    })?;
    if *path == r.path.with_extension("devtrace.tmp") {
        std::fs::remove_file(path).ok();
    }
    Ok(KvmLog { writer, trace })
}

/// After a recorded run: report the log; a KVM recording's device trace
/// goes into its log.
fn finish_record(
    r: &Recording,
    m: &Machine,
    outcome: &duet::machine::Outcome,
    kvm: Option<KvmLog>,
) -> Result<()> {
    use duet::replay::log::{EndRecord, Event};
    use std::io::Read;
    if r.full {
        if let Some(s) = m.door_summary() {
            eprintln!(
                "duet: recorded {} events, {} checkpoints, {} bytes in {}",
                s.events,
                s.checkpoints,
                s.bytes,
                r.path.display()
            );
        }
        return Ok(());
    }
    let Some(KvmLog {
        writer: mut w,
        mut trace,
    }) = kvm
    else {
        return Ok(());
    };
    let mut text = Vec::new();
    trace
        .read_to_end(&mut text)
        .map_err(|e| anyhow!("--record: reading the device trace back: {e}"))?;
    for chunk in text.chunks(32 << 10) {
        w.push(&Event::DeviceTrace {
            bytes: chunk.to_vec(),
        })?;
    }
    w.push(&Event::End {
        icount: 0,
        end: EndRecord {
            seq: 0,
            status: outcome.exit_status(),
            outcome: outcome.describe(),
            state_hash: 0,
        },
    })?;
    let bytes = w.finish()?;
    eprintln!(
        "duet: recorded the device trace ({} lines, device-level: KVM counts no instructions) in {} bytes in {}",
        text.iter().filter(|&&b| b == b'\n').count(),
        bytes,
        r.path.display()
    );
    Ok(())
}

/// `duet replay`: exit status 0 when the replay followed the recording to
/// its end, 3 when it diverged.
fn replay(args: ReplayArgs) -> Result<ExitCode> {
    use duet::machine::MachineError;
    use duet::replay::log::{Event, LogKind, LogReader};
    let reader = LogReader::open(&args.log).map_err(|e| match e {
        duet::replay::log::LogError::Open { source, .. } => {
            anyhow!("{}: {}", args.log.display(), read_reason(&source))
        }
        e => anyhow!("{}: {e}", args.log.display()),
    })?;
    let header = reader.header().clone();
    let hm = &header.machine;
    // --kernel and --initrd only point at moved files of a recorded boot:
    // refused where they could not apply rather than silently ignored.
    let moved_files = [
        (
            "--kernel",
            args.kernel.as_ref().map(|k| k.display().to_string()),
        ),
        ("--initrd", args.initrd.clone()),
    ];
    for (flag, given) in moved_files {
        let Some(given) = given else { continue };
        if header.kind == LogKind::Devices {
            bail!(
                "{flag} {given}: {} is a device-level recording, replayed against the device models with no CPU and no guest: {flag} does not apply",
                args.log.display()
            );
        }
        if hm.kernel.is_none() {
            bail!(
                "{flag} {given}: {} is a recording of the built-in guest `{}`, which is rebuilt from its name; {flag} only names the recorded kernel or initrd when it moved",
                args.log.display(),
                hm.guest.as_deref().unwrap_or("?")
            );
        }
    }
    if header.kind == LogKind::Devices {
        let mut text = Vec::new();
        let mut r = reader;
        let mut end = None;
        while let Some(e) = r
            .next_event()
            .map_err(|e| anyhow!("{}: {e}", args.log.display()))?
        {
            match e {
                Event::DeviceTrace { bytes } => text.extend_from_slice(&bytes),
                Event::End { end: x, .. } => end = Some(x),
                _ => {}
            }
        }
        let text = String::from_utf8_lossy(&text);
        return Ok(match duet::replay::devtrace::replay_devices(&text, None) {
            Ok(rep) => {
                eprintln!(
                    "duet: device-level replay of a {} recording matched: {} lines, {} reads, {} writes, {} interrupts{}",
                    hm.backend,
                    rep.lines,
                    rep.reads,
                    rep.writes,
                    rep.interrupts,
                    end.map(|e| format!(" (the recorded run ended: {})", e.outcome))
                        .unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Err(e @ duet::replay::devtrace::DeviceReplayError::Differs { .. }) => {
                eprintln!("duet: device-level replay diverged: {e}");
                ExitCode::from(3)
            }
            Err(e) => bail!("{}: {e}", args.log.display()),
        });
    }
    if hm.irqchip != "userspace" {
        bail!(
            "{}: recorded with --irqchip {}; only duet's own interrupt controllers replay",
            args.log.display(),
            hm.irqchip
        );
    }
    let check = |want: &duet::replay::log::FileRef,
                 p: &std::path::Path,
                 flag: &str|
     -> Result<()> {
        let got = file_ref(p, flag)?;
        if got.xxh3 != want.xxh3 || got.size != want.size {
            bail!(
                "{flag} {}: not the file recorded ({} bytes, XXH3 {}; the recording read {} bytes, XXH3 {}): give the recorded one with {flag}",
                p.display(),
                got.size,
                got.xxh3,
                want.size,
                want.xxh3
            );
        }
        Ok(())
    };
    let kernel = match (&hm.kernel, &args.kernel) {
        (Some(want), given) => {
            let p = given.clone().unwrap_or_else(|| PathBuf::from(&want.path));
            check(want, &p, "--kernel")?;
            Some(p)
        }
        (None, _) => None,
    };
    let initrd: Vec<String> = match &args.initrd {
        Some(list) => duet::loader::split_initrd_list(list),
        None => hm.initrd.iter().map(|f| f.path.clone()).collect(),
    };
    if initrd.len() != hm.initrd.len() {
        bail!(
            "--initrd: the recording read {} initrd files, {} given",
            hm.initrd.len(),
            initrd.len()
        );
    }
    for (want, item) in hm.initrd.iter().zip(&initrd) {
        let file = item.split_whitespace().next().unwrap_or("");
        check(want, std::path::Path::new(file), "--initrd")?;
    }
    let mut disks = Vec::new();
    for (spec, want) in &hm.disks {
        let d: duet::device_args::DiskSpec = spec
            .parse()
            .map_err(|e| anyhow!("{}: disk {spec}: {e}", args.log.display()))?;
        check(want, &d.path, "--disk")?;
        disks.push(d);
    }
    let mut nets = Vec::new();
    for spec in &hm.nets {
        nets.push(
            spec.parse::<duet::device_args::NetSpec>()
                .map_err(|e| anyhow!("{}: net {spec}: {e}", args.log.display()))?,
        );
    }
    let rng = match &hm.rng {
        Some(spec) => {
            let mut r: duet::device_args::RngSpec = spec
                .parse()
                .map_err(|e| anyhow!("{}: rng {spec}: {e}", args.log.display()))?;
            r.seed = hm.rng_seed;
            Some(r)
        }
        None => None,
    };
    let serial_mode = args.serial.clone().unwrap_or_default();
    let mut port = serial_mode.open().map_err(|e| anyhow!("--serial: {e}"))?;
    let cfg = MachineConfig {
        memory: hm.memory,
        trace: args.trace.clone(),
        clock: if hm.clock == "virtual" {
            ClockKind::Virtual
        } else {
            ClockKind::Recorded
        },
        epoch: Some(hm.epoch),
        ..MachineConfig::new(BackendKind::Interp, port.take_output())
    };
    let mut m = Machine::new(cfg).map_err(|e| match e {
        MachineError::Trace(duet::trace::TraceError::Create { path, source }) => {
            anyhow!("--trace {path}: cannot create it: {}", io_reason(&source))
        }
        e => anyhow!(e),
    })?;
    let mut door = duet::replay::Door::replay(reader).map_err(|e| {
        // A recording that was killed: say how much of it is intact.
        let intact = std::fs::read(&args.log)
            .ok()
            .and_then(|b| duet::replay::log::read_complete(&b).ok())
            .map_or_else(String::new, |s| format!(" ({})", s.describe()));
        anyhow!("{}: {e}{intact}", args.log.display())
    })?;
    // The console's host side is not opened in a replay: the input is the
    // log's, the output goes to --console-output.
    let console = hm
        .console
        .as_ref()
        .map(|spec| duet::device_args::ConsoleSpec {
            host: duet::device_args::ConsoleHost::Stdio,
            transport: if spec.contains("transport=mmio") {
                duet::machine::VirtioTransport::Mmio
            } else {
                duet::machine::VirtioTransport::Pci
            },
        });
    let input = duet::virtio::ReplayInput {
        nets: (0..nets.len()).map(|i| door.net_script(i)).collect(),
        console: door.console_script(),
        console_output: args.console_output.clone(),
    };
    let _devices = duet::virtio::plug(
        &mut m,
        &duet::virtio::DeviceArgs {
            disks,
            nets,
            rng,
            console,
            door: duet::virtio::InputDoor::Replay(input),
        },
    )?;
    match (&hm.guest, &kernel) {
        (Some(g), _) => {
            let g = guests::find(g).ok_or_else(|| {
                anyhow!(
                    "{}: recorded with the built-in guest '{g}', which this duet does not have",
                    args.log.display()
                )
            })?;
            m.load(&(g.build)())?;
        }
        (None, Some(k)) => m.load_kernel(&duet::loader::KernelSpec {
            kernel: k.clone(),
            initrd,
            cmdline: hm.cmdline.clone().unwrap_or_default(),
        })?,
        (None, None) => bail!(
            "{}: the header names neither a guest nor a kernel",
            args.log.display()
        ),
    }
    m.set_door(door);
    let start = std::time::Instant::now();
    let r = m.run();
    if args.stats {
        eprint!("{}", m.stats_report());
    }
    match r {
        Ok(outcome) => {
            let s = m.door_summary().cloned();
            eprintln!(
                "duet: replay matched the recording: {} events, {} checkpoints, the same final state ({}; {} instructions in {:.2} s)",
                s.as_ref().map_or(0, |s| s.events),
                s.as_ref().map_or(0, |s| s.checkpoints),
                outcome.describe(),
                m.instructions().unwrap_or(0),
                start.elapsed().as_secs_f64()
            );
            drop(port);
            Ok(ExitCode::SUCCESS)
        }
        Err(duet::machine::MachineError::Replay(
            e @ duet::replay::ReplayError::Diverged { .. },
        )) => {
            eprintln!("duet: {e}");
            Ok(ExitCode::from(3))
        }
        Err(e) => Err(anyhow!(e)),
    }
}

/// `duet replay-devices`: 0 when every trace matched, 3 at the first
/// difference.
fn replay_devices(args: ReplayDevicesArgs) -> Result<ExitCode> {
    use duet::replay::devtrace::{replay_device_file, DeviceReplayError};
    for p in &args.traces {
        if let Err(e) = std::fs::File::open(p) {
            bail!("{}: {}", p.display(), read_reason(&e));
        }
        match replay_device_file(p) {
            Ok(r) => println!(
                "{}: {} lines, {} reads, {} writes, {} interrupts, {} line changes and MSIs, {} guest-memory accesses: all matched",
                p.display(),
                r.lines,
                r.reads,
                r.writes,
                r.interrupts,
                r.signals,
                r.dma
            ),
            Err(e @ DeviceReplayError::Differs { .. }) => {
                println!("{}:{}", p.display(), e);
                return Ok(ExitCode::from(3));
            }
            // The reason names the file.
            Err(e @ DeviceReplayError::Read { .. }) => bail!("{e}"),
            Err(e) => bail!("{}: {e}", p.display()),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn bench(args: BenchArgs) -> Result<ExitCode> {
    use duet::bench::{run_duet, run_qemu, Workload};
    let kind = match args.target {
        BenchTarget::Interp => BackendKind::Interp,
        BenchTarget::Kvm => choose_backend(BackendArg::Kvm, None)?.0,
        BenchTarget::Io => return bench_io(&args),
    };
    let workloads: Vec<Workload> = if args.only.is_empty() {
        Workload::ALL.to_vec()
    } else {
        let mut v = Vec::new();
        for n in &args.only {
            match Workload::ALL.iter().find(|w| w.name() == n) {
                Some(w) => v.push(*w),
                None => bail!("--only {n}: no such workload (use alu, mem or syscall)"),
            }
        }
        v
    };
    let qemu: Option<Vec<String>> = args
        .qemu
        .as_ref()
        .map(|q| q.split_whitespace().map(String::from).collect());
    if qemu.as_ref().is_some_and(|q| q.is_empty()) {
        bail!(
            "--qemu: empty; give a QEMU command line, e.g. --qemu 'qemu-system-x86_64 -accel tcg'"
        );
    }
    println!("workload   instructions    seconds       MIPS  runner");
    for w in workloads {
        let tier = TierArg::tier(args.tier);
        let m = run_duet(kind, tier, w, args.iterations)
            .with_context(|| format!("{} on duet", w.name()))?;
        println!(
            "{:<8} {:>14} {:>10.3} {:>10.1}  duet {}{}",
            w.name(),
            m.loop_instructions,
            m.elapsed.as_secs_f64(),
            m.mips(),
            kind.name(),
            if kind == BackendKind::Interp {
                format!(" ({})", tier.name())
            } else {
                String::new()
            }
        );
        if let Some(q) = &qemu {
            let m = run_qemu(q, w, args.iterations / 10, &std::env::temp_dir())
                .with_context(|| format!("{} under {}", w.name(), q.join(" ")))?;
            println!(
                "{:<8} {:>14} {:>10.3} {:>10.1}  {}",
                w.name(),
                m.loop_instructions,
                m.elapsed.as_secs_f64(),
                m.mips(),
                q.join(" ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_io(args: &BenchArgs) -> Result<ExitCode> {
    let command: Vec<String> = std::env::args().collect();
    let cells = duet::bench_io::matrix();
    let results = duet::bench_io::run(
        &cells,
        args.frames.max(1),
        args.runs.max(1),
        &args.out,
        &command.join(" "),
        &mut std::io::stdout(),
    )?;
    print!("{}", duet::bench_io::markdown(&results));
    println!(
        "wrote {} and {}",
        args.out.join("io-results.csv").display(),
        args.out.join("io-report.html").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// An error chain with each message once: a cause whose text its parent
/// already shows is left out.
fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if s.is_empty() || out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            let status = match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => 0,
                _ => 1,
            };
            e.print().ok();
            return ExitCode::from(status);
        }
    };
    let r = match cli.command.unwrap_or_else(|| Command::Run(Box::default())) {
        Command::Run(a) => run(*a),
        Command::Bench(a) => bench(a),
        Command::Difftest(a) => difftest(a),
        Command::Replay(a) => replay(a),
        Command::ReplayDevices(a) => replay_devices(a),
        Command::Guests => {
            for g in guests::all() {
                println!("{:<12} {}", g.name, g.description);
            }
            Ok(ExitCode::SUCCESS)
        }
    };
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("duet: error: {}", render_error(&e));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("20000000000T").is_err());
    }
}
