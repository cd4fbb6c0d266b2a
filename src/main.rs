//! The `duet` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use duet::backend::{self, BackendKind, IrqchipKind};
use duet::clock::ClockKind;
use duet::guests;
use duet::layout;
use duet::machine::{Machine, MachineConfig};

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
    Run(RunArgs),
    /// List the built-in guests.
    Guests,
    /// Measure guest MIPS on three loops (ALU, memory with paging, syscall).
    Bench(BenchArgs),
    /// Differential testing: the interpreter against KVM, instruction by instruction.
    Difftest(DifftestArgs),
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
    };
    let summary = run_campaign(&cfg, &mut std::io::stdout()).context("difftest")?;
    print!("{}", summary.render());
    if let Some(path) = &args.coverage {
        std::fs::write(path, summary.coverage_list())
            .with_context(|| format!("writing {}", path.display()))?;
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
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum BenchTarget {
    Interp,
    Kvm,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum BackendArg {
    /// KVM when /dev/kvm opens, else the interpreter.
    Auto,
    Kvm,
    Interp,
}

#[derive(clap::Args, Default)]
struct RunArgs {
    /// Execution backend.
    #[arg(long, value_enum, default_value = "auto")]
    backend: Option<BackendArg>,
    /// Built-in guest to boot (see `duet guests`).
    #[arg(long, conflicts_with = "kernel")]
    guest: Option<String>,
    /// Boot this kernel: a Linux bzImage, an ELF vmlinux with a PVH note, or
    /// a multiboot kernel.
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for --kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long, value_name = "STR", requires = "kernel")]
    cmdline: Option<String>,
    /// Guest memory size, e.g. 256M, 1G, 512MiB or a byte count.
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Write one line per device access to FILE.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Print device-access, exit and instruction counters at exit.
    #[arg(long)]
    stats: bool,
    /// VM clock: host monotonic time, or virtual time derived from the
    /// interpreter's instruction count (bit-for-bit repeatable runs).
    #[arg(long, value_enum, default_value = "host")]
    clock: ClockArg,
    /// Interrupt controllers: duet's own (userspace) or KVM's in-kernel ones.
    #[arg(long, value_enum, default_value = "userspace")]
    irqchip: IrqchipArg,
    /// CPU model the guest's CPUID describes: x86-64-v1, x86-64-v2,
    /// x86-64-v3 or max (everything the interpreter implements; the
    /// default). On KVM never more than the host offers.
    #[arg(long, value_parser = parse_cpu_model, default_value = "max")]
    cpu: cpu_interp::cpuid::CpuModel,
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

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
enum ClockArg {
    #[default]
    Host,
    Virtual,
}

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
enum IrqchipArg {
    #[default]
    Userspace,
    Kernel,
}

/// Parse "256M", "1G", "512MiB", "4096", "2 GiB" ...
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("'{s}' is not a size (expected e.g. 256M or 1G)"));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}': number too large"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => layout::KIB,
        "m" | "mb" | "mib" => layout::MIB,
        "g" | "gb" | "gib" => layout::GIB,
        "t" | "tb" | "tib" => 1024 * layout::GIB,
        u => return Err(format!("'{s}': unknown unit '{u}' (use K, M, G or T)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

fn choose_backend(arg: BackendArg) -> Result<BackendKind> {
    match arg {
        BackendArg::Interp => Ok(BackendKind::Interp),
        BackendArg::Kvm => match backend::kvm_available() {
            Ok(()) => Ok(BackendKind::Kvm),
            Err(why) => bail!("--backend kvm: {why}"),
        },
        BackendArg::Auto => Ok(match backend::kvm_available() {
            Ok(()) => BackendKind::Kvm,
            Err(why) => {
                log::info!("KVM unavailable ({why}); using the interpreter");
                BackendKind::Interp
            }
        }),
    }
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let guest = match &args.kernel {
        Some(_) => None,
        None => {
            let name = args.guest.as_deref().unwrap_or(guests::DEFAULT_GUEST);
            Some(guests::find(name).with_context(|| {
                let names: Vec<&str> = guests::all().iter().map(|g| g.name).collect();
                format!(
                    "no built-in guest named '{name}' (available: {})",
                    names.join(", ")
                )
            })?)
        }
    };
    let kind = choose_backend(args.backend.unwrap_or(BackendArg::Auto))?;
    let cfg = MachineConfig {
        memory: args.memory.unwrap_or(layout::DEFAULT_MEMORY),
        trace: args.trace.clone(),
        clock: match args.clock {
            ClockArg::Host => ClockKind::Host,
            ClockArg::Virtual => ClockKind::Virtual,
        },
        irqchip: match args.irqchip {
            IrqchipArg::Userspace => IrqchipKind::Userspace,
            IrqchipArg::Kernel => IrqchipKind::Kernel,
        },
        cpu: args.cpu,
        ..MachineConfig::new(kind, Box::new(std::io::stdout()))
    };
    let mut m = Machine::new(cfg).context("cannot build the machine")?;
    match (guest, &args.kernel) {
        (Some(g), _) => m.load(&(g.build)()).context("cannot load the guest")?,
        (None, Some(k)) => m
            .load_kernel(&duet::loader::KernelSpec {
                kernel: k.clone(),
                initrd: args.initrd.clone(),
                cmdline: args
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| "console=ttyS0".to_string()),
            })
            .context("cannot load the kernel")?,
        (None, None) => unreachable!("a guest or a kernel is always chosen"),
    }
    // The serial console: stdin feeds the UART (raw mode on a terminal,
    // Ctrl-A x quits).
    let raw = duet::console::RawMode::enter().context("serial console")?;
    let input = duet::console::SerialInput::new(m.uart.clone(), m.kicker());
    duet::console::spawn_stdin(input, m.control(), m.kicker(), raw.is_some());
    let outcome = m.run();
    drop(raw);
    let outcome = outcome.context("the VM failed")?;
    let status = outcome.exit_status();
    if status != 0 {
        eprintln!("duet: {}", outcome.describe());
    } else {
        log::info!("{}", outcome.describe());
    }
    if args.stats {
        eprint!("{}", m.stats_report());
    }
    Ok(ExitCode::from(status as u8))
}

fn bench(args: BenchArgs) -> Result<ExitCode> {
    use duet::bench::{run_duet, run_qemu, Workload};
    let kind = match args.target {
        BenchTarget::Interp => BackendKind::Interp,
        BenchTarget::Kvm => choose_backend(BackendArg::Kvm)?,
    };
    let workloads: Vec<Workload> = if args.only.is_empty() {
        Workload::ALL.to_vec()
    } else {
        let mut v = Vec::new();
        for n in &args.only {
            match Workload::ALL.iter().find(|w| w.name() == n) {
                Some(w) => v.push(*w),
                None => bail!("unknown workload '{n}' (alu, mem, syscall)"),
            }
        }
        v
    };
    let qemu: Option<Vec<String>> = args
        .qemu
        .as_ref()
        .map(|q| q.split_whitespace().map(String::from).collect());
    if qemu.as_ref().is_some_and(|q| q.is_empty()) {
        bail!("--qemu needs a command");
    }
    println!("workload   instructions    seconds       MIPS  runner");
    for w in workloads {
        let m =
            run_duet(kind, w, args.iterations).with_context(|| format!("{} on duet", w.name()))?;
        println!(
            "{:<8} {:>14} {:>10.3} {:>10.1}  duet {}",
            w.name(),
            m.loop_instructions,
            m.elapsed.as_secs_f64(),
            m.mips(),
            kind.name()
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let r = match cli.command.unwrap_or(Command::Run(RunArgs::default())) {
        Command::Run(a) => run(a),
        Command::Bench(a) => bench(a),
        Command::Difftest(a) => difftest(a),
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
            eprintln!("duet: error: {e:#}");
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
