//! The machine: guest memory, buses, devices, the userspace interrupt
//! controllers and timers, one vCPU on a backend, and the run loop that
//! turns vCPU exits into a VM outcome.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::debug_exit::DebugExit;
use devices::i8042::I8042;
use devices::pci::host_bridge::HostBridge;
use devices::pci::root::{PciConfigIo, PciConfigMmio, PciRoot, CONFIG_IO_LEN};
use devices::pci::test_device::PciTestDevice;
use devices::pci::{config::command, BarKind, PciAddress, PciBarWindow, PciDevice};
use devices::post_code::PostCode;
use devices::rtc_cmos::RtcCmos;
use devices::uart16550::Uart16550;
use devices::{BusKind, Clock, SharedDevice, TimeTaint, Timed, VmAction, VmControl};
use vm_memory::{Bytes, GuestAddress};

use crate::backend::{
    self, BackendKind, GuestMemory, IrqchipKind, ShutdownReason, Vcpu, VcpuExit, VcpuStats,
};
use crate::clock::{ClockKind, HostClock, VirtualClock};
use crate::guests::GuestImage;
use crate::io::{DeviceIo, AFFECTS_INTERRUPTS, AFFECTS_TIMERS};
use crate::irqchip::{self, lock, pci_intx_gsi, ChipConfig, HaltWait, IrqChip};
use crate::layout::{self, ports};
use crate::state::{DeviceHandle, MachineDevice, MachineState, MachineStateError};
use crate::timers::Timers;
use crate::trace::Tracer;

/// Errors building or running a machine (host-side failures only).
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("guest memory size {0:#x} is invalid: {1}")]
    MemorySize(u64, String),
    #[error("cannot reserve {} of guest memory: {reason}", human_size(*size))]
    MemoryAlloc { size: u64, reason: String },
    #[error(
        "{} of guest memory cannot be reserved on this host: at most {} can be ({why}); give a \
         smaller size",
        human_size(*size),
        human_size(*limit)
    )]
    MemoryTooLarge { size: u64, limit: u64, why: String },
    #[error("backend: {0}")]
    Backend(#[from] backend::BackendError),
    #[error("device bus: {0}")]
    Bus(#[from] devices::BusError),
    #[error("PCI: {0}")]
    Pci(#[from] devices::pci::root::PciError),
    #[error(transparent)]
    IrqChip(#[from] irqchip::IrqChipError),
    #[error("trace: {0}")]
    Trace(#[from] crate::trace::TraceError),
    #[error(transparent)]
    Loader(#[from] crate::loader::LoaderError),
    #[error("guest image does not fit in guest memory at {addr:#x} (+{len:#x} bytes)")]
    ImageDoesNotFit { addr: u64, len: usize },
    #[error("{0}")]
    Config(String),
    #[error("machine state: {0}")]
    State(#[from] MachineStateError),
    #[error(transparent)]
    Replay(#[from] crate::replay::ReplayError),
}

/// What to build.
pub struct MachineConfig {
    pub backend: BackendKind,
    pub memory: u64,
    pub trace: Option<PathBuf>,
    /// The most bytes the trace file may grow to (then tracing stops, with
    /// a last line saying so).
    pub trace_limit: u64,
    /// Where the UART's output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Host time (default) or virtual time (interpreter only).
    pub clock: ClockKind,
    /// duet's interrupt controllers (default) or KVM's in-kernel ones.
    pub irqchip: IrqchipKind,
    /// The interpreter backend's execution tier (default: the fastest the
    /// host supports, or `DUET_TIER=interp|jit`).
    pub tier: cpu_interp::Tier,
    /// The CPU model (`--cpu`): what CPUID offers the guest.
    pub cpu: cpu_interp::cpuid::CpuModel,
    /// The RTC's start (Unix seconds): by default the host's time, or a
    /// fixed date with virtual time. A replay gives the recorded one.
    pub epoch: Option<u64>,
    /// Write a replayable device-level trace here (see
    /// [`crate::replay::devtrace`]).
    pub device_trace: Option<PathBuf>,
    /// Drive every device's clock by hand (device-trace replay).
    pub manual_clock: Option<Arc<devices::ManualClock>>,
    /// Coalesce writes to the NICs' side-effect-free registers (KVM's
    /// coalesced MMIO ring on KVM, the same queue on the interpreter).
    pub coalesced_mmio: bool,
}

/// The default tier: `DUET_TIER` (`interp` or `jit`) when set, else the
/// fastest this host supports.
pub fn default_tier() -> cpu_interp::Tier {
    backend::default_tier()
}

impl MachineConfig {
    /// A configuration with defaults for everything but the backend.
    pub fn new(backend: BackendKind, serial_out: Box<dyn Write + Send>) -> Self {
        MachineConfig {
            backend,
            memory: layout::DEFAULT_MEMORY,
            trace: None,
            trace_limit: crate::trace::DEFAULT_TRACE_LIMIT,
            serial_out,
            clock: ClockKind::Host,
            irqchip: IrqchipKind::Userspace,
            tier: default_tier(),
            cpu: cpu_interp::cpuid::CpuModel::default(),
            epoch: None,
            device_trace: None,
            manual_clock: None,
            coalesced_mmio: false,
        }
    }
}

/// How a VM run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// HLT with interrupts disabled and nothing to wake the CPU: the guest
    /// stopped itself cleanly.
    Stopped,
    /// The guest wrote to the isa-debug-exit port; the process exit status.
    DebugExit(u32),
    /// The guest asked for a reset.
    Reset,
    /// The guest powered off.
    PowerOff,
    /// The user quit from the console (Ctrl-A x).
    HostQuit,
    /// duet was asked to stop by this signal (SIGTERM, SIGINT, SIGHUP).
    HostSignal(i32),
    /// The guest shut down abnormally.
    Shutdown(ShutdownReason),
    /// A bug in duet (a panic in a device model, the interpreter, a
    /// backend or a host thread) stopped the VM: what panicked where, and
    /// where the guest was (see [`crate::crash`]).
    Crashed(String),
}

impl Outcome {
    /// The process exit status duet reports for this outcome. Debug-exit
    /// statuses are always odd; duet's own are even.
    pub fn exit_status(&self) -> i32 {
        match self {
            Outcome::Stopped | Outcome::PowerOff | Outcome::HostQuit | Outcome::HostSignal(_) => 0,
            Outcome::DebugExit(s) => (*s & 0xff) as i32,
            Outcome::Reset => 2,
            Outcome::Shutdown(ShutdownReason::TripleFault) => 4,
            Outcome::Shutdown(_) => 6,
            Outcome::Crashed(_) => crate::crash::CRASH_EXIT_STATUS,
        }
    }

    /// A one-line description for the user.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Stopped => "guest stopped (HLT with interrupts disabled)".into(),
            Outcome::DebugExit(s) => {
                format!("guest exited through the debug-exit port with status {s}")
            }
            Outcome::Reset => "guest requested a reset".into(),
            Outcome::PowerOff => "guest powered off".into(),
            Outcome::HostQuit => "quit from the console".into(),
            Outcome::HostSignal(s) => format!("stopped by {}", crate::signals::name(*s)),
            Outcome::Shutdown(r) => format!("guest shut down: {r}"),
            Outcome::Crashed(m) => format!("VM stopped by an internal error in duet: {m}"),
        }
    }
}

/// The TSC frequency of the interpreter's virtual CPU (and the LAPIC's TSC
/// view on the interpreter).
pub const INTERP_TSC_HZ: u64 = crate::backend::interp::INTERP_TSC_KHZ as u64 * 1000;

/// A fixed wall-clock start (2026-01-01T00:00:00Z) for virtual-time runs,
/// so that they are repeatable.
pub const VIRTUAL_EPOCH: u64 = 1_767_225_600;

/// One device's access counts (for `--stats-json`).
#[derive(Clone, Debug)]
pub struct DeviceCount {
    pub bus: &'static str,
    pub device: String,
    pub count: crate::io::AccessCount,
}

/// A built machine, ready to load a guest and run.
pub struct Machine {
    mem: GuestMemory,
    io: DeviceIo,
    vcpu: Box<dyn Vcpu>,
    backend_name: &'static str,
    clock_kind: ClockKind,
    coalesced_mmio: bool,
    vclock: Option<VirtualClock>,
    /// The host clock, told when the vCPU idles (None with virtual time).
    host_clock: Option<Arc<HostClock>>,
    /// Serial input reaches the UART through this.
    pub uart: Arc<Mutex<Uart16550>>,
    /// Kicks a KVM vCPU at timer deadlines (None on the interpreter).
    ticker: Option<crate::ticker::Ticker>,
    chip: Arc<dyn IrqChip>,
    pci: Arc<Mutex<PciRoot>>,
    /// Where the next BARs go (as firmware would assign them).
    bar_allocator: BarAllocator,
    /// The virtio devices and the host-input notifier they share.
    virtio: crate::virtio::VirtioDevices,
    /// The VM clock, and the Unix time of its zero (captures stamp with it).
    clock: Arc<dyn Clock>,
    /// Every device model, with its type.
    devices: Vec<MachineDevice>,
    /// Instructions per vCPU run (interpreter).
    run_budget: u64,
    /// Where nondeterministic input enters (recorded or replayed).
    door: crate::replay::Door,
    door_summary: Option<crate::replay::Summary>,
    /// Serial input waiting for the UART.
    serial_inbox: Arc<crate::console::SerialInbox>,
    /// With the recorded clock: when the current idle wait began (host
    /// time and VM time).
    idle_since: Option<(std::time::Instant, u64)>,
    epoch: u64,
    /// Told of the devices' accesses to guest memory (device traces).
    dma_watch: Option<Arc<dyn devices::dma::DmaWatch>>,
    // Keep the backend (the VM) alive as long as its vCPU.
    _backend: Box<dyn backend::Backend>,
}

/// The PCI devices duet can plug in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciDeviceKind {
    /// The test device of the built-in guests (INTx/MSI/MSI-X on command).
    Test,
    /// An e1000 whose backend loops every frame back (built-in guests).
    E1000Loopback,
}

/// The transport a virtio device sits on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VirtioTransport {
    /// virtio-pci (modern), in the first free slot.
    #[default]
    Pci,
    /// virtio-mmio (version 2), described in the DSDT.
    Mmio,
}

/// A PCI device to plug in: what, and where (a fixed slot, or the first
/// free one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciDeviceSpec {
    pub kind: PciDeviceKind,
    pub slot: Option<u8>,
}

/// Places BARs in the host bridge's windows, aligned to their size.
#[derive(Clone, Debug)]
struct BarAllocator {
    next_mem: u64,
    next_io: u64,
}

impl BarAllocator {
    fn new() -> Self {
        BarAllocator {
            next_mem: layout::pci::MEM32_BASE,
            next_io: u64::from(layout::pci::IO_BASE),
        }
    }

    fn allocate(&mut self, io: bool, size: u64) -> Option<u64> {
        let (next, end) = if io {
            (
                &mut self.next_io,
                u64::from(layout::pci::IO_BASE) + u64::from(layout::pci::IO_SIZE),
            )
        } else {
            (
                &mut self.next_mem,
                layout::pci::MEM32_BASE + layout::pci::MEM32_SIZE,
            )
        };
        let base = next.checked_add(size - 1)? & !(size - 1);
        let limit = base.checked_add(size)?;
        if limit > end {
            return None;
        }
        *next = limit;
        Some(base)
    }
}

/// A byte count for people: "64 TiB", "23.4 GiB", "4097 bytes".
pub fn human_size(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (u, name) in UNITS {
        if n >= u {
            return if n % u == 0 {
                format!("{} {name}", n / u)
            } else {
                format!("{:.1} {name}", n as f64 / u as f64)
            };
        }
    }
    format!("{n} bytes")
}

/// The most guest memory this host can back, and why: its RAM plus swap
/// (what the kernel's overcommit heuristic allows one mapping), capped by
/// the guest's 40-bit physical address space (RAM above 3 GiB sits above
/// the 4 GiB line). `None` when /proc/meminfo cannot be read.
pub fn host_memory_limit() -> (u64, String) {
    let space =
        (1u64 << cpu_interp::mmu::PHYS_ADDR_BITS) - (layout::MMIO_GAP_END - layout::MMIO_GAP_START);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    match (field("MemTotal:"), field("SwapTotal:")) {
        (Some(ram), swap) => {
            let host = ram + swap.unwrap_or(0);
            if host < space {
                (host, "its RAM plus swap".into())
            } else {
                (space, "the guest's 40-bit physical address space".into())
            }
        }
        _ => (space, "the guest's 40-bit physical address space".into()),
    }
}

/// Create guest memory of `size` bytes laid out as in [`layout`].
pub fn create_memory(size: u64) -> Result<GuestMemory, MachineError> {
    let (limit, why) = host_memory_limit();
    if size > limit {
        return Err(MachineError::MemoryTooLarge { size, limit, why });
    }
    if size < layout::MIN_MEMORY {
        return Err(MachineError::MemorySize(
            size,
            format!(
                "at least {} MiB are needed",
                layout::MIN_MEMORY / layout::MIB
            ),
        ));
    }
    if size % 4096 != 0 {
        return Err(MachineError::MemorySize(
            size,
            "must be a multiple of 4 KiB".into(),
        ));
    }
    GuestMemory::from_ranges(&layout::ram_ranges(size)).map_err(|e| MachineError::MemoryAlloc {
        size,
        reason: e.to_string(),
    })
}

fn host_unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Machine {
    pub fn new(cfg: MachineConfig) -> Result<Self, MachineError> {
        if cfg.clock != ClockKind::Host && cfg.backend != BackendKind::Interp {
            return Err(MachineError::Config(
                "--clock virtual needs the interpreter backend (time derives from its instruction count)".into(),
            ));
        }
        let mem = create_memory(cfg.memory)?;
        let control = VmControl::new();
        let taint = TimeTaint::new();
        // Exactly one of the two clocks exists: instruction-count time
        // (virtual, recorded) or the host's. On the interpreter duet reads
        // the host clock every few microseconds while the guest runs, so it
        // can hide the host's stalls (see `HostClock`); KVM runs the guest
        // out of sight.
        let (vclock, host_clock, machine_clock): (_, _, Arc<dyn Clock>) = match cfg.clock {
            ClockKind::Virtual | ClockKind::Recorded => {
                let v = VirtualClock::new();
                (Some(v.clone()), None, Arc::new(v))
            }
            ClockKind::Host => {
                let h = Arc::new(if cfg.backend == BackendKind::Interp {
                    HostClock::compensating()
                } else {
                    HostClock::new()
                });
                (None, Some(h.clone()), h)
            }
        };
        // A test's manual clock replaces it as the devices' time source.
        let clock: Arc<dyn Clock> = match &cfg.manual_clock {
            Some(m) => m.clone(),
            None => machine_clock,
        };
        // Device-level traces note the time each access saw.
        let observed = cfg
            .device_trace
            .as_ref()
            .map(|_| Arc::new(crate::replay::devtrace::ObservedClock::new(clock.clone())));
        let clock: Arc<dyn Clock> = match &observed {
            Some(o) => o.clone(),
            None => clock,
        };
        let mut be = backend::create(
            cfg.backend,
            &mem,
            backend::VmOptions {
                irqchip: cfg.irqchip,
                tier: cfg.tier,
                cpu: cfg.cpu,
            },
        )?;
        let tsc_hz = match cfg.backend {
            BackendKind::Interp => INTERP_TSC_HZ,
            BackendKind::Kvm => be.tsc_khz().map_or(INTERP_TSC_HZ, |k| u64::from(k) * 1000),
        };
        let chip = irqchip::create(
            cfg.irqchip,
            be.as_ref(),
            ChipConfig {
                vcpus: 1,
                clock: clock.clone(),
                taint: taint.clone(),
                lapic_timer_hz: u64::from(backend::interp::LAPIC_TIMER_HZ),
                tsc_hz,
                guest_tsc: be.guest_tsc(),
                phys_addr_bits: be.phys_addr_bits(),
            },
        )?;

        let rtc_start = match (cfg.epoch, cfg.clock) {
            (Some(e), _) => e,
            (None, ClockKind::Virtual) => VIRTUAL_EPOCH,
            (None, _) => host_unix_time(),
        };
        // The HPET's legacy replacement takes IRQ8 from the RTC (and IRQ0
        // from the chip's PIT) through this gate.
        let legacy_gate = chip.legacy_timer_gate();
        let rtc_irq: Box<dyn devices::IrqLine> = match &legacy_gate {
            Some(g) => Box::new(g.line(chip.irq_line(8))),
            None => chip.irq_line(8),
        };
        let mut rtc = RtcCmos::new(clock.clone(), taint.clone(), rtc_irq, rtc_start);
        let below = cfg.memory.min(layout::MMIO_GAP_START);
        rtc.set_memory_size(below, cfg.memory - below);
        let rtc = Arc::new(Mutex::new(rtc));
        let uart = Arc::new(Mutex::new(Uart16550::new(chip.irq_line(4), cfg.serial_out)));

        let mut tracer = match &cfg.trace {
            Some(p) => Tracer::to_file(p, cfg.trace_limit)?,
            None => Tracer::disabled(),
        };
        if let (Some(p), Some(o)) = (&cfg.device_trace, &observed) {
            let mut w = crate::replay::devtrace::DeviceTraceWriter::create(p, o.clone())?;
            if let Some(watch) = chip.line_watch() {
                w.watch_lines(watch);
            }
            tracer.set_device_trace(w);
        }
        let hpet = Arc::new(Mutex::new(devices::hpet::Hpet::new(
            clock.clone(),
            taint.clone(),
            devices::hpet::HpetLines::new(legacy_gate, |irq| chip.irq_line(irq)),
        )));
        let mut timed: Vec<Arc<Mutex<dyn Timed + Send>>> = vec![rtc.clone(), hpet.clone()];
        timed.extend(chip.timed());
        let timers = Timers::new(clock.clone(), timed, vclock.clone());
        let mut io = DeviceIo::new(tracer, control.clone(), taint.clone(), timers, chip.clone());
        if cfg.coalesced_mmio {
            io.set_coalesced_zones(be.coalesced_zones());
        }
        // The machine's typed device list (save, restore, enumeration).
        let mut device_list: Vec<MachineDevice> = chip.devices();
        device_list.push(MachineDevice::new("rtc", DeviceHandle::Rtc(rtc.clone())));
        device_list.push(MachineDevice::new("hpet", DeviceHandle::Hpet(hpet.clone())));
        let id = io.register_with("hpet", AFFECTS_INTERRUPTS | AFFECTS_TIMERS);
        io.map(
            BusKind::Mmio,
            id,
            layout::HPET_BASE,
            devices::hpet::MMIO_SIZE,
            hpet,
        )?;

        // The interrupt controllers' registers (none with the in-kernel chip).
        for d in chip.bus_devices() {
            let id = io.register_with(d.name, AFFECTS_INTERRUPTS | AFFECTS_TIMERS);
            io.map(d.bus, id, d.base, d.len, d.device)?;
        }

        // The fixed ISA devices.
        let map_one = |io: &mut DeviceIo, name: &str, base: u16, len: u64, dev: SharedDevice| {
            let id = io.register(name);
            io.map(BusKind::Pio, id, u64::from(base), len, dev)
        };
        map_one(
            &mut io,
            "rtc",
            ports::RTC,
            devices::rtc_cmos::PORT_COUNT,
            rtc,
        )?;
        device_list.push(MachineDevice::new("com1", DeviceHandle::Uart(uart.clone())));
        map_one(
            &mut io,
            "com1",
            ports::COM1,
            u64::from(ports::COM1_LEN),
            uart.clone(),
        )?;
        let debug_exit = Arc::new(Mutex::new(DebugExit::new(control.clone())));
        device_list.push(MachineDevice::new(
            "debug-exit",
            DeviceHandle::DebugExit(debug_exit.clone()),
        ));
        map_one(
            &mut io,
            "debug-exit",
            ports::DEBUG_EXIT,
            u64::from(ports::DEBUG_EXIT_LEN),
            debug_exit,
        )?;
        let i8042 = Arc::new(Mutex::new(I8042::new(
            control.clone(),
            chip.irq_line(1),
            chip.irq_line(12),
        )));
        device_list.push(MachineDevice::new(
            "i8042",
            DeviceHandle::I8042(i8042.clone()),
        ));
        let id = io.register("i8042");
        io.map(
            BusKind::Pio,
            id,
            u64::from(ports::I8042_DATA),
            1,
            Arc::new(Mutex::new(devices::i8042::data_port(i8042.clone()))),
        )?;
        io.map(
            BusKind::Pio,
            id,
            u64::from(ports::I8042_COMMAND),
            1,
            Arc::new(Mutex::new(devices::i8042::command_port(i8042))),
        )?;
        let post = Arc::new(Mutex::new(PostCode::default()));
        device_list.push(MachineDevice::new(
            "post",
            DeviceHandle::PostCode(post.clone()),
        ));
        map_one(&mut io, "post", ports::POST_CODE, 1, post)?;
        let pm = devices::acpi_pm::AcpiPm::new(clock.clone(), taint.clone(), control.clone());
        let pm = Arc::new(Mutex::new(pm));
        device_list.push(MachineDevice::new(
            "acpi-pm",
            DeviceHandle::AcpiPm(pm.clone()),
        ));
        map_one(
            &mut io,
            "acpi-pm",
            layout::boot::ACPI_PM_BASE,
            devices::acpi_pm::BLOCK_LEN,
            pm,
        )?;

        // PCI: the root with the host bridge, mechanism #1 (with the reset
        // register at 0xcf9) and ECAM.
        let mut root = PciRoot::new();
        let bridge = Arc::new(Mutex::new(HostBridge::new()));
        device_list.push(MachineDevice::new(
            "host-bridge",
            DeviceHandle::HostBridge(bridge.clone()),
        ));
        root.add(Some(0), bridge)?;
        let pci = Arc::new(Mutex::new(root));
        io.attach_pci(pci.clone());
        let bridge_id = io.register("host-bridge");
        io.note_pci_function(PciAddress::new(0, 0, 0), bridge_id);
        let reset = devices::reset_control::ResetControl::new(control.clone());
        let config_io = Arc::new(Mutex::new(PciConfigIo::new(pci.clone(), reset)));
        device_list.push(MachineDevice::new(
            "pci-config",
            DeviceHandle::PciConfigIo(config_io.clone()),
        ));
        map_one(
            &mut io,
            "pci-config",
            ports::PCI_CONFIG,
            CONFIG_IO_LEN,
            config_io,
        )?;
        let id = io.register("pci-ecam");
        io.map(
            BusKind::Mmio,
            id,
            layout::pci::ECAM_BASE,
            layout::pci::ECAM_SIZE,
            Arc::new(Mutex::new(PciConfigMmio::new(pci.clone()))),
        )?;

        let vcpu = be.create_vcpu(0)?;
        let ticker =
            (cfg.backend == BackendKind::Kvm).then(|| crate::ticker::Ticker::spawn(vcpu.kicker()));
        let virtio = crate::virtio::VirtioDevices::new(vcpu.kicker(), chip.clone());
        let serial_inbox = Arc::new(crate::console::SerialInbox::new(
            vcpu.kicker(),
            chip.clone(),
        ));
        let mut dma_watch: Option<Arc<dyn devices::dma::DmaWatch>> = None;
        if let Some(d) = io.tracer.devices() {
            let log = Arc::new(crate::replay::devtrace::DmaLog::new(mem.clone()));
            d.watch_dma(log.clone());
            dma_watch = Some(log);
            d.header("memory", &cfg.memory.to_string());
            d.header("epoch", &rtc_start.to_string());
            d.header("irqchip", chip.name());
        }
        Ok(Machine {
            run_budget: backend::interp::DEFAULT_BUDGET,
            door: crate::replay::Door::off(),
            door_summary: None,
            serial_inbox,
            idle_since: None,
            devices: device_list,
            virtio,
            clock,
            epoch: rtc_start,
            dma_watch,
            ticker,
            chip,
            pci,
            bar_allocator: BarAllocator::new(),
            mem,
            io,
            vcpu,
            backend_name: be.name(),
            clock_kind: cfg.clock,
            coalesced_mmio: cfg.coalesced_mmio,
            vclock,
            host_clock,
            uart,
            _backend: be,
        })
    }

    /// Plug in a PCI device (before the guest starts, as firmware would
    /// find it): a slot, its INTA# on the swizzled line, its BARs placed
    /// in the host bridge's windows and decoding enabled.
    pub fn add_pci_device(&mut self, spec: PciDeviceSpec) -> Result<PciAddress, MachineError> {
        let slot = irqchip::lock(&self.pci).free_slot(spec.slot)?;
        let gsi = pci_intx_gsi(slot, devices::pci::IntxPin::IntA as u8);
        match spec.kind {
            PciDeviceKind::Test => {
                let name = format!("pci-test-{slot:02x}");
                let dev = Arc::new(Mutex::new(PciTestDevice::new(
                    &name,
                    self.chip.irq_line(gsi),
                    self.chip.msi_sink(),
                )));
                self.devices.push(MachineDevice::new(
                    &name,
                    DeviceHandle::PciTest(dev.clone()),
                ));
                if let Some(d) = self.io.tracer.devices() {
                    d.header("pci", &format!("test {slot:02}"));
                }
                self.plug_pci(slot, &name, dev, 0)
            }
            PciDeviceKind::E1000Loopback => {
                if let Some(d) = self.io.tracer.devices() {
                    d.header("pci", &format!("e1000-loopback {slot:02}"));
                }
                self.add_e1000_in(
                    Some(slot),
                    "e1000-0",
                    crate::net::default_mac(0),
                    Box::new(crate::net::loopback::LoopbackBackend::new()),
                )
            }
        }
    }

    /// Plug in an emulated e1000 (82540EM) NIC in the first free PCI slot,
    /// its frames going to `backend`. It has a timer (interrupt
    /// throttling) and takes host input like the virtio devices.
    pub fn add_e1000(
        &mut self,
        name: &str,
        mac: [u8; 6],
        backend: Box<dyn devices::virtio::net::NetBackend>,
    ) -> Result<(), MachineError> {
        self.add_e1000_in(None, name, mac, backend).map(|_| ())
    }

    fn add_e1000_in(
        &mut self,
        slot: Option<u8>,
        name: &str,
        mac: [u8; 6],
        backend: Box<dyn devices::virtio::net::NetBackend>,
    ) -> Result<PciAddress, MachineError> {
        let slot = irqchip::lock(&self.pci).free_slot(slot)?;
        let gsi = pci_intx_gsi(slot, devices::pci::IntxPin::IntA as u8);
        let dev = Arc::new(Mutex::new(devices::e1000::E1000::new(
            name,
            mac,
            backend,
            self.dma_memory(),
            self.chip.irq_line(gsi),
            self.clock.clone(),
        )));
        let address = self.plug_pci(slot, name, dev.clone(), AFFECTS_TIMERS)?;
        self.devices
            .push(MachineDevice::new(name, DeviceHandle::E1000(dev.clone())));
        if self.coalesced_mmio {
            // The ranges follow BAR 0 wherever the guest moves it.
            let bar0 = irqchip::lock(&dev)
                .config()
                .bar_address(usize::from(devices::e1000::MMIO_BAR));
            self.io.add_coalesced_bar(
                address,
                devices::e1000::MMIO_BAR,
                devices::e1000::coalesced_ranges(),
                bar0,
            )?;
        }
        self.io.timers.add(dev.clone());
        self.virtio.add_e1000(name, dev);
        Ok(address)
    }

    /// Map a device of the caller's on the I/O-port bus at `base..base +
    /// len` (tests and embedders; the built-in devices are mapped by
    /// [`Machine::new`]).
    pub fn add_port_device(
        &mut self,
        name: &str,
        base: u16,
        len: u16,
        dev: SharedDevice,
    ) -> Result<(), MachineError> {
        let id = self.io.register(name);
        self.io
            .map(BusKind::Pio, id, u64::from(base), u64::from(len), dev)?;
        Ok(())
    }

    /// Put a built PCI function in `slot`: interrupt line register, BARs
    /// placed and decoding on, mapped on the buses under a new device id.
    fn plug_pci(
        &mut self,
        slot: u8,
        name: &str,
        dev: Arc<Mutex<dyn PciDevice>>,
        affects: u8,
    ) -> Result<PciAddress, MachineError> {
        let gsi = pci_intx_gsi(slot, devices::pci::IntxPin::IntA as u8);
        let mapped = {
            let mut guard = irqchip::lock(&dev);
            let cfg = guard.config_mut();
            cfg.set_interrupt_line(gsi as u8);
            for index in 0..devices::pci::config::BAR_COUNT {
                let Some(bar) = cfg.bar(index) else {
                    continue;
                };
                let base = self
                    .bar_allocator
                    .allocate(bar.kind == BarKind::Io, bar.size)
                    .ok_or_else(|| {
                        MachineError::Config(format!("no room for BAR {index} of {name}"))
                    })?;
                cfg.set_bar_address(index, base);
            }
            cfg.set_u16(
                devices::pci::config::reg::COMMAND,
                command::IO_SPACE | command::MEMORY_SPACE | command::BUS_MASTER,
            );
            cfg.mapped_bars()
        };
        let address = irqchip::lock(&self.pci).add(Some(slot), dev.clone())?;
        let id = self.io.register_with(name, affects);
        self.io.note_pci_function(address, id);
        for b in mapped {
            let kind = if b.io { BusKind::Pio } else { BusKind::Mmio };
            let window: SharedDevice =
                Arc::new(Mutex::new(PciBarWindow::new(dev.clone(), b.index)));
            self.io.map(kind, id, b.base, b.size, window)?;
        }
        Ok(address)
    }

    /// Plug in a virtio device on `transport` (before the guest starts):
    /// on PCI in the first free slot, on MMIO in the next register block
    /// of [`layout::virtio_mmio`] (described in the DSDT when a kernel is
    /// loaded). `name` names it in the trace and `--stats`.
    pub fn add_virtio(
        &mut self,
        name: &str,
        transport: VirtioTransport,
        device: Box<dyn devices::virtio::VirtioDevice>,
    ) -> Result<(), MachineError> {
        if let Some(d) = self.io.tracer.devices() {
            d.header("virtio", name);
        }
        match transport {
            VirtioTransport::Pci => {
                let slot = irqchip::lock(&self.pci).free_slot(None)?;
                let gsi = pci_intx_gsi(slot, devices::pci::IntxPin::IntA as u8);
                let dev = Arc::new(Mutex::new(devices::virtio::pci::VirtioPci::new(
                    name,
                    device,
                    self.dma_memory(),
                    self.chip.irq_line(gsi),
                    self.chip.msi_sink(),
                )));
                self.plug_pci(slot, name, dev.clone(), 0)?;
                self.devices.push(MachineDevice::new(
                    name,
                    DeviceHandle::VirtioPci(dev.clone()),
                ));
                self.virtio.add_pci(name, dev);
            }
            VirtioTransport::Mmio => {
                let (base, gsi) = self.virtio.next_mmio_slot().ok_or_else(|| {
                    MachineError::Config(format!(
                        "{name}: no room for another virtio-mmio device (at most {})",
                        layout::virtio_mmio::SLOTS
                    ))
                })?;
                let dev = Arc::new(Mutex::new(devices::virtio::mmio::VirtioMmio::new(
                    name,
                    device,
                    self.dma_memory(),
                    self.chip.irq_line(gsi),
                )));
                let id = self.io.register(name);
                self.io.map(
                    BusKind::Mmio,
                    id,
                    base,
                    devices::virtio::mmio::MMIO_LEN,
                    dev.clone(),
                )?;
                self.devices.push(MachineDevice::new(
                    name,
                    DeviceHandle::VirtioMmio(dev.clone()),
                ));
                self.virtio.add_mmio(name, dev, base, gsi);
            }
        }
        Ok(())
    }

    /// Plug in the `index`th virtio device a built-in guest brings along.
    pub(crate) fn add_builtin_virtio(
        &mut self,
        index: usize,
        v: crate::guests::BuiltinVirtio,
    ) -> Result<(), MachineError> {
        if let Some(d) = self.io.tracer.devices() {
            d.header(
                "builtin-virtio",
                &crate::replay::devtrace::builtin_virtio_header(index, v),
            );
        }
        use crate::guests::{virtio as guest, BuiltinVirtioKind};
        use devices::virtio::{block, console, net, rng};
        let transport = match v.transport {
            VirtioTransport::Pci => "pci",
            VirtioTransport::Mmio => "mmio",
        };
        let (name, device): (String, Box<dyn devices::virtio::VirtioDevice>) = match v.kind {
            BuiltinVirtioKind::Block => {
                let mut disk = block::MemDisk::new(guest::DISK_BYTES);
                disk.data[..guest::DISK_MAGIC.len()].copy_from_slice(guest::DISK_MAGIC);
                (
                    format!("builtin-blk-{transport}"),
                    Box::new(block::VirtioBlock::new(
                        Box::new(disk),
                        false,
                        guest::disk_id(v.transport),
                    )),
                )
            }
            BuiltinVirtioKind::NetLoopback => (
                format!("builtin-net-{transport}"),
                Box::new(net::VirtioNet::new(
                    [0x52, 0x54, 0x00, 0xd0, 0xe7, index as u8],
                    Box::<net::LoopbackBackend>::default(),
                )),
            ),
            BuiltinVirtioKind::ConsoleLoopback => {
                let host = console::LoopbackConsole::new(guest::CONSOLE_GREETING);
                (
                    format!("builtin-console-{transport}"),
                    Box::new(console::VirtioConsole::new(
                        Box::new(host.clone()),
                        Box::new(host),
                    )),
                )
            }
            BuiltinVirtioKind::Rng => (
                format!("builtin-rng-{transport}"),
                Box::new(rng::VirtioRng::new(rng::EntropySource::Seeded(
                    crate::virtio::DEFAULT_RNG_SEED,
                ))),
            ),
        };
        self.add_virtio(&name, v.transport, device)
    }

    /// Writes that went through the coalesced MMIO queue so far (on KVM:
    /// those KVM queued without an exit, and any that exited anyway).
    pub fn coalesced_writes(&self) -> u64 {
        self.io.coalesced_writes
    }

    /// The coalesced MMIO ranges in force now (guest-physical base, length).
    pub fn coalesced_ranges(&self) -> Vec<(u64, u64)> {
        self.io.coalesced_ranges().to_vec()
    }

    /// The machine's device models, with their types.
    pub fn devices(&self) -> &[MachineDevice] {
        &self.devices
    }

    /// Save the whole machine: the vCPU, the VM clock and every device.
    pub fn save_state(&mut self) -> Result<MachineState, MachineError> {
        let cpu = self.vcpu.state()?;
        let mut devices = Vec::with_capacity(self.devices.len());
        for d in &self.devices {
            if let Some(s) = d.save()? {
                devices.push(s);
            }
        }
        Ok(MachineState {
            format: crate::state::MACHINE_STATE_FORMAT,
            cpu,
            clock: crate::clock::ClockState::of(self.clock.as_ref()),
            devices,
        })
    }

    /// Restore a state saved by [`Machine::save_state`] from a machine of
    /// the same configuration (the same devices by name). Everything is
    /// checked before anything changes, as far as the models allow: a
    /// device list that does not match is refused up front.
    pub fn restore_state(&mut self, s: &MachineState) -> Result<(), MachineError> {
        if s.format != crate::state::MACHINE_STATE_FORMAT {
            return Err(MachineStateError::Format {
                found: s.format,
                expected: crate::state::MACHINE_STATE_FORMAT,
            }
            .into());
        }
        let mut pairs = Vec::new();
        for d in &self.devices {
            let Some(mine) = d.save()? else {
                continue;
            };
            let saved = s
                .devices
                .iter()
                .find(|x| x.name == mine.name)
                .ok_or_else(|| MachineStateError::MissingDevice(mine.name.clone()))?;
            pairs.push((d.clone(), saved));
        }
        if let Some(extra) = s
            .devices
            .iter()
            .find(|x| !pairs.iter().any(|(d, _)| d.name == x.name))
        {
            return Err(MachineStateError::ExtraDevice(extra.name.clone()).into());
        }
        for (d, saved) in pairs {
            d.load(saved)?;
        }
        match (&self.vclock, &self.host_clock) {
            (Some(v), _) => v.restore(&s.clock),
            (None, Some(h)) => h.restore(&s.clock),
            (None, None) => {}
        }
        self.vcpu.set_state(&s.cpu)?;
        // Derived state: BAR windows on the buses, queued interrupt
        // messages, the earliest timer deadline.
        self.io.resync_pci_bars();
        self.chip.pump();
        self.io.refresh_deadline();
        Ok(())
    }

    /// The VM clock.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// The Unix time (seconds) of VM time zero.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether time is virtual (runs repeat bit for bit).
    pub fn virtual_time(&self) -> bool {
        self.clock_kind == ClockKind::Virtual
    }

    /// What wakes the machine when host input waits for a virtio device
    /// (given to the inboxes and network backends).
    pub fn input_notifier(&self) -> Arc<dyn devices::virtio::inbox::InputNotifier> {
        self.virtio.notifier()
    }

    /// A handle that makes a running vCPU return soon (for host threads).
    pub fn kicker(&self) -> Arc<dyn backend::Kick> {
        self.vcpu.kicker()
    }

    /// The VM-level request channel devices and host threads post to.
    pub fn control(&self) -> VmControl {
        self.io.control.clone()
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend_name
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Copy a guest image into RAM and set the vCPU's initial state.
    pub fn load(&mut self, image: &GuestImage) -> Result<(), MachineError> {
        for spec in &image.pci_devices {
            self.add_pci_device(*spec)?;
        }
        for (i, v) in image.virtio_devices.iter().enumerate() {
            self.add_builtin_virtio(i, *v)?;
        }
        for (addr, bytes) in &image.blobs {
            self.mem
                .write_slice(bytes, GuestAddress(*addr))
                .map_err(|_| MachineError::ImageDoesNotFit {
                    addr: *addr,
                    len: bytes.len(),
                })?;
        }
        self.vcpu.set_state(&image.entry)?;
        Ok(())
    }

    /// Load a kernel (bzImage, PVH ELF or multiboot) with its initrd and
    /// command line, and set the vCPU's boot state.
    pub fn load_kernel(&mut self, spec: &crate::loader::KernelSpec) -> Result<(), MachineError> {
        let hpet_block_id = self.devices.iter().find_map(|d| match &d.handle {
            DeviceHandle::Hpet(h) => Some(irqchip::lock(h).capabilities() as u32),
            _ => None,
        });
        let acpi = crate::acpi::AcpiConfig {
            cpus: 1,
            virtio_mmio: self.virtio.acpi_entries(),
            hpet_block_id,
        };
        crate::acpi::write(&self.mem, &acpi).map_err(|e| MachineError::Config(e.to_string()))?;
        crate::mptable::write(&self.mem, 1).map_err(|e| MachineError::Config(e.to_string()))?;
        let state = crate::loader::load(&self.mem, spec)?;
        self.vcpu.set_state(&state)?;
        Ok(())
    }

    /// Inject what the interrupt controllers have for the vCPU, or ask for
    /// an interrupt window. Returns true when something was injected.
    fn service_interrupts(&mut self) -> Result<bool, MachineError> {
        if self.io.tracer.devices().is_none() {
            return Ok(self.chip.service(0, self.vcpu.as_mut())?);
        }
        let mark = self.io.tracer.mark();
        let mut tap = crate::replay::devtrace::InjectTap {
            inner: self.vcpu.as_mut(),
            injected: None,
        };
        let r = self.chip.service(0, &mut tap)?;
        if let (Some(what), Some(d)) = (tap.injected, self.io.tracer.devices()) {
            d.injected(mark, what);
        }
        Ok(r)
    }

    /// Fire the timers that fell due.
    fn advance_timers(&mut self) {
        let mark = self.io.tracer.mark();
        if self.io.timers.advance_due() {
            if let Some(d) = self.io.tracer.devices() {
                d.advance(mark);
            }
        }
    }

    /// The device side, for a device-trace replay: the I/O path (buses,
    /// timers) and the interrupt controllers.
    pub(crate) fn device_side(
        &mut self,
    ) -> (
        &mut DeviceIo,
        Arc<dyn IrqChip>,
        &crate::virtio::VirtioDevices,
    ) {
        (&mut self.io, self.chip.clone(), &self.virtio)
    }

    /// Report the devices' accesses to guest memory to `watch` (a
    /// device-trace replay; before the devices are plugged in).
    pub(crate) fn set_dma_watch(&mut self, watch: Arc<dyn devices::dma::DmaWatch>) {
        self.dma_watch = Some(watch);
    }

    /// Guest memory as a device sees it.
    fn dma_memory(&self) -> devices::dma::DmaMemory {
        devices::dma::DmaMemory::watched(self.mem.clone(), self.dma_watch.clone())
    }

    /// Put `wrap(old)` in place of the MMIO device mapped at `base` (tests:
    /// a deliberately changed device model).
    pub fn wrap_mmio_device(
        &mut self,
        base: u64,
        wrap: impl FnOnce(SharedDevice) -> SharedDevice,
    ) -> Result<(), MachineError> {
        let Some(m) = self.io.mmio.mappings().into_iter().find(|m| m.base == base) else {
            return Err(MachineError::Config(format!("no device at {base:#x}")));
        };
        let old = self.io.mmio.remove(base)?;
        self.io.mmio.insert(m.id, &m.name, base, m.len, wrap(old))?;
        Ok(())
    }

    /// Put `wrap(old)` in place of the port-I/O device mapped at `base`
    /// (tests: a deliberately changed device model).
    pub fn wrap_pio_device(
        &mut self,
        base: u64,
        wrap: impl FnOnce(SharedDevice) -> SharedDevice,
    ) -> Result<(), MachineError> {
        let Some(m) = self.io.pio.mappings().into_iter().find(|m| m.base == base) else {
            return Err(MachineError::Config(format!("no device at port {base:#x}")));
        };
        let old = self.io.pio.remove(base)?;
        self.io.pio.insert(m.id, &m.name, base, m.len, wrap(old))?;
        Ok(())
    }

    /// Move waiting serial input into the UART; the bytes moved.
    fn deliver_serial(&mut self) -> Vec<u8> {
        let b = self.serial_inbox.deliver(&self.uart);
        if !b.is_empty() {
            if let Some(d) = self.io.tracer.devices() {
                d.input("com1", &b);
            }
        }
        b
    }

    /// Run until the guest stops, exits, resets or shuts down. A panic
    /// in a device model, the interpreter or a backend on this thread, or
    /// in one of duet's host threads, ends the run with
    /// [`Outcome::Crashed`] instead of taking the process down.
    pub fn run(&mut self) -> Result<Outcome, MachineError> {
        crate::crash::install_hook();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
            || -> Result<Outcome, MachineError> {
                loop {
                    if let Some(o) = self.run_loop(None)? {
                        return Ok(o);
                    }
                }
            },
        ));
        match r {
            Ok(r) => r,
            Err(payload) => {
                let rec = crate::crash::take_last_on_this_thread().unwrap_or_else(|| {
                    crate::crash::PanicRecord {
                        thread: std::thread::current().name().unwrap_or("unnamed").into(),
                        message: crate::crash::payload_text(&*payload),
                        location: None,
                    }
                });
                let report = self.crash_report(&rec);
                // The trace up to the panic is worth keeping.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.io.tracer.finish()
                }));
                Ok(Outcome::Crashed(report))
            }
        }
    }

    /// A contained panic, with where the guest was.
    fn crash_report(&mut self, rec: &crate::crash::PanicRecord) -> String {
        let guest =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match self.vcpu.state() {
                Ok(s) => crate::crash::describe_guest(&s, &self.mem),
                Err(e) => format!("guest state unavailable: {e}"),
            }))
            .unwrap_or_else(|_| "guest state unavailable (reading it panicked too)".into());
        let retired = self
            .vcpu
            .stats()
            .instructions
            .map(|n| format!("; {n} guest instructions retired"))
            .unwrap_or_default();
        let recent = self.vcpu.recent_code();
        let history =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match self.vcpu.state() {
                Ok(s) if !recent.is_empty() => {
                    format!(
                        "\n  {}",
                        crate::crash::describe_recent(&s, &self.mem, &recent)
                    )
                }
                Ok(_) => "\n  (no record of the instructions before it on this backend)".into(),
                Err(_) => String::new(),
            }))
            .unwrap_or_default();
        format!("{rec}\n  {guest}{retired}{history}")
    }

    /// Run at most `instructions` more guest instructions (interpreter
    /// only: KVM counts none), then pause at exactly that count; `None`
    /// when paused there, the outcome when the VM ended first. The run
    /// continues with another `run_for` or [`Machine::run`].
    pub fn run_for(&mut self, instructions: u64) -> Result<Option<Outcome>, MachineError> {
        let Some(now) = self.vcpu.stats().instructions else {
            return Err(MachineError::Config(
                "running for a number of instructions needs the interpreter (KVM counts none)"
                    .into(),
            ));
        };
        self.run_loop(Some(now.saturating_add(instructions)))
    }

    /// Guest instructions retired so far (interpreter; None on KVM).
    pub fn instructions(&self) -> Option<u64> {
        self.vcpu.stats().instructions
    }

    /// Record this machine's nondeterministic input, or replay it (see
    /// [`crate::replay`]). Set before the first run.
    pub fn set_door(&mut self, door: crate::replay::Door) {
        self.door = door;
    }

    /// The door (to hand the network wrappers their logs).
    pub fn door_mut(&mut self) -> &mut crate::replay::Door {
        &mut self.door
    }

    /// How the recording or replay went, once the run has ended.
    pub fn door_summary(&self) -> Option<&crate::replay::Summary> {
        self.door_summary.as_ref()
    }

    /// Where host threads put serial console input.
    pub fn serial_input(&self) -> crate::console::SerialInput {
        crate::console::SerialInput::new(self.serial_inbox.clone())
    }

    fn run_loop(&mut self, limit: Option<u64>) -> Result<Option<Outcome>, MachineError> {
        // Host time starts with the guest (see `HostClock`).
        if let Some(h) = &self.host_clock {
            h.start();
        }
        let outcome = loop {
            if let Some(rec) = crate::crash::take_host_thread_panic() {
                break Outcome::Crashed(self.crash_report(&rec));
            }
            self.advance_timers();
            self.io.refresh_deadline();
            self.service_interrupts()?;
            self.arm_ticker();
            let now = self.vcpu.stats().instructions;
            if let Some(n) = now {
                if limit.is_some_and(|l| n >= l) {
                    return Ok(None);
                }
                if self.door.checkpoint_due(n) {
                    let s = self.save_state()?;
                    self.door.checkpoint(n, &s)?;
                }
            }
            // The run's end: the configured budget, cut at `limit`, at the
            // next checkpoint and, in a replay, where the recorded run was
            // cut short (exact positions).
            let target = now.map(|n| {
                let mut end = n.saturating_add(self.run_budget);
                for cap in [limit, self.door.next_stop()].into_iter().flatten() {
                    end = end.min(cap.max(n));
                }
                self.vcpu.set_run_budget(end - n);
                end
            });
            let exit = self.vcpu.run(&mut self.io);
            if let Some(t) = &self.ticker {
                t.disarm();
            }
            let exit = exit?;
            // Writes queued in coalesced MMIO ranges take effect before
            // the VMM does anything else.
            self.io.flush_coalesced();
            if let (Some(target), Some(after)) = (target, self.vcpu.stats().instructions) {
                let early =
                    matches!(exit, VcpuExit::Interrupted | VcpuExit::IoRequest) && after < target;
                self.door.after_run(after, early)?;
            }
            self.advance_timers();
            match exit {
                VcpuExit::Halted => {
                    if let Some(o) = self.idle()? {
                        break o;
                    }
                }
                VcpuExit::InterruptWindow | VcpuExit::Interrupted | VcpuExit::IoRequest => {}
                VcpuExit::Shutdown(r) => break Outcome::Shutdown(r),
            }
            // Host input, VM-level actions: the poll point.
            if let Some(o) = self.poll_point()? {
                break o;
            }
        };
        self.vcpu.set_run_budget(self.run_budget);
        if !self.door.is_off() {
            let icount = self.instructions().unwrap_or(0);
            let state = self.save_state()?;
            let r = self
                .door
                .end(icount, outcome.exit_status(), &outcome.describe(), &state);
            let summary = self.door.finish();
            r?;
            self.door_summary = Some(summary?);
        }
        self.io.tracer.finish()?;
        Ok(Some(outcome))
    }

    /// The poll point after each vCPU exit and in each idle wait: host
    /// input enters (or, in a replay, the recorded input), VM-level actions
    /// posted by devices and host threads become the outcome.
    fn poll_point(&mut self) -> Result<Option<Outcome>, MachineError> {
        if self.door.is_off() {
            self.deliver_serial();
            self.poll_host_input();
            return Ok(self.take_action());
        }
        self.door.begin_poll();
        let icount = self.instructions().unwrap_or(0);
        if self.door.is_replaying() {
            use crate::replay::Replayed;
            for r in self.door.replay_poll(icount)? {
                match r {
                    Replayed::Warp(ns) => {
                        if let Some(v) = &self.vclock {
                            v.skip_to(ns);
                        }
                    }
                    Replayed::Serial(bytes) => {
                        let n = lock(&self.uart).enqueue_input(&bytes);
                        if let Some(d) = self.io.tracer.devices() {
                            d.input("com1", &bytes[..n]);
                        }
                        if n != bytes.len() {
                            return Err(crate::replay::ReplayError::Diverged {
                                icount,
                                seq: 0,
                                what: format!(
                                    "the UART took {} recorded input bytes, the replay's only {n}",
                                    bytes.len()
                                ),
                            }
                            .into());
                        }
                    }
                    Replayed::VirtioPoll => {
                        self.virtio.poll_all();
                        self.chip.pump();
                        if let Some(d) = self.io.tracer.devices() {
                            d.poll();
                        }
                    }
                    Replayed::HostQuit => return Ok(Some(Outcome::HostQuit)),
                }
            }
            // Device requests only: a quit comes from the log.
            return Ok(self.take_action().filter(|o| *o != Outcome::HostQuit));
        }
        // Recording.
        let warp_to = match (&self.vclock, self.idle_since) {
            (Some(v), Some((since, vm))) if self.clock_kind == ClockKind::Recorded => {
                let to = vm.saturating_add(since.elapsed().as_nanos() as u64);
                (to > v.now_ns()).then(|| {
                    v.skip_to(to);
                    to
                })
            }
            _ => None,
        };
        let serial = self.deliver_serial();
        let virtio = self.poll_host_input();
        let action = self.take_action();
        self.door.log_poll(
            icount,
            crate::replay::PollInput {
                serial,
                warp_to,
                virtio,
                quit: action == Some(Outcome::HostQuit),
            },
        )?;
        Ok(action)
    }

    /// Let virtio devices take host input that arrived (the one point where
    /// it enters the guest); whether there was any.
    fn poll_host_input(&mut self) -> bool {
        if self.virtio.poll_if_pending() {
            self.chip.pump();
            if let Some(d) = self.io.tracer.devices() {
                d.poll();
            }
            true
        } else {
            false
        }
    }

    /// Arm the ticker for the next timer deadline (KVM only). With the
    /// in-kernel irqchip, a slow periodic kick lets the VMM notice a guest
    /// that stopped (HLT with interrupts off).
    fn arm_ticker(&self) {
        let Some(t) = &self.ticker else {
            return;
        };
        if let Some(period) = self.chip.kick_period() {
            t.arm(period);
            return;
        }
        match self.io.timers.next_deadline() {
            Some(d) => t.arm(Duration::from_nanos(d.saturating_sub(self.io.timers.now()))),
            None => t.disarm(),
        }
    }

    /// A VM-level action posted by a device or a host thread, as an outcome.
    fn take_action(&self) -> Option<Outcome> {
        if !self.io.control.is_pending() {
            return None;
        }
        match self.io.control.take()? {
            VmAction::DebugExit(s) => Some(Outcome::DebugExit(s)),
            VmAction::Reset => Some(Outcome::Reset),
            VmAction::PowerOff => Some(Outcome::PowerOff),
            VmAction::HostQuit => Some(Outcome::HostQuit),
            VmAction::HostSignal(s) => Some(Outcome::HostSignal(s)),
        }
    }

    /// The vCPU halted: wait (without spinning) until an interrupt can wake
    /// it, or decide that nothing ever will.
    fn idle(&mut self) -> Result<Option<Outcome>, MachineError> {
        self.idle_since = None;
        let r = self.idle_loop();
        self.idle_since = None;
        r
    }

    fn idle_loop(&mut self) -> Result<Option<Outcome>, MachineError> {
        loop {
            if let Some(o) = self.poll_point()? {
                return Ok(Some(o));
            }
            if let Some(rec) = crate::crash::take_host_thread_panic() {
                return Ok(Some(Outcome::Crashed(self.crash_report(&rec))));
            }
            self.advance_timers();
            if self.service_interrupts()? {
                return Ok(None);
            }
            let s = self.vcpu.state()?;
            let if_set = s.regs.rflags & cpu_interp::flags::IF != 0;
            // With IF clear only an NMI can wake the CPU.
            let nmi = self.chip.nmi_pending(0);
            if !if_set && !nmi && !s.events.nmi_pending {
                return Ok(Some(Outcome::Stopped));
            }
            if self.chip.halt_wait() == HaltWait::InBackend {
                // The backend waits in the kernel: come back to it.
                return Ok(None);
            }
            let deadline = self.io.timers.next_deadline();
            match self.clock_kind {
                ClockKind::Virtual => match (deadline, &self.vclock) {
                    (Some(d), Some(v)) => v.skip_to(d),
                    _ if self.door.is_replaying() => {}
                    _ => {
                        return Ok(Some(Outcome::Shutdown(ShutdownReason::Unrecoverable(
                            "guest halted waiting for an interrupt, and no timer is armed".into(),
                        ))))
                    }
                },
                // A replay makes the recorded clock jumps at the next
                // poll points; it never waits.
                ClockKind::Recorded if self.door.is_replaying() => {}
                ClockKind::Recorded => {
                    let Some(v) = &self.vclock else {
                        return Ok(None);
                    };
                    let now = v.now_ns();
                    if self.idle_since.is_none() {
                        self.idle_since = Some((std::time::Instant::now(), now));
                    }
                    let wait = deadline.map(|d| Duration::from_nanos(d.saturating_sub(now)));
                    self.chip.wait(
                        wait.unwrap_or(Duration::from_millis(100))
                            .min(Duration::from_millis(100)),
                    );
                }
                ClockKind::Host => {
                    let now = self.io.timers.now();
                    let wait = deadline.map(|d| Duration::from_nanos(d.saturating_sub(now)));
                    // Bounded (100 ms) so that host-side requests such as
                    // Ctrl-A x are noticed without a waker of their own.
                    if let Some(h) = &self.host_clock {
                        h.set_idle(true);
                    }
                    self.chip.wait(
                        wait.unwrap_or(Duration::from_millis(100))
                            .min(Duration::from_millis(100)),
                    );
                    if let Some(h) = &self.host_clock {
                        h.set_idle(false);
                    }
                }
            }
        }
    }

    /// `--profile`: count guest block executions and time the tiers.
    pub fn set_profiling(&mut self, on: bool) {
        self.vcpu.set_profiling(on);
    }

    /// The `--profile` report, when the backend keeps one.
    pub fn profile_report(&self) -> Option<String> {
        self.vcpu.profile_report()
    }

    /// The machine's side of device I/O, as a vCPU sees it (benchmarks
    /// and tests drive accesses through it without a guest).
    pub fn io_handler(&mut self) -> &mut dyn backend::Platform {
        &mut self.io
    }

    /// Return to the VMM after at most this many instructions per vCPU run
    /// (interpreter; see [`Vcpu::set_run_budget`]).
    pub fn set_run_budget(&mut self, instructions: u64) {
        self.run_budget = instructions.max(1);
        self.vcpu.set_run_budget(instructions);
    }

    /// The vCPU's counters.
    pub fn vcpu_stats(&self) -> VcpuStats {
        self.vcpu.stats()
    }

    /// Interrupts the emulated NICs raised.
    pub fn nic_interrupts(&self) -> u64 {
        self.virtio.nic_interrupts()
    }

    /// Device access counts by (bus, device), and the unmapped accesses.
    pub fn device_access_counts(&self) -> (Vec<DeviceCount>, crate::io::AccessCount) {
        let (counts, unmapped) = self.io.counts();
        let v = counts
            .iter()
            .map(|(kind, name, c)| DeviceCount {
                bus: kind.as_str(),
                device: name.to_string(),
                count: *c,
            })
            .collect();
        (v, unmapped)
    }

    /// A `--stats` report.
    pub fn stats_report(&self) -> String {
        let mut s = String::new();
        let (counts, unmapped) = self.io.counts();
        s.push_str(&format!("backend: {}\n", self.backend_name));
        s.push_str(&format!("irqchip: {}\n", self.chip.name()));
        s.push_str("device accesses (reads/writes):\n");
        for (kind, name, c) in counts {
            s.push_str(&format!(
                "  {:<4} {:<12} {:>10} {:>10}\n",
                kind.as_str(),
                name,
                c.reads,
                c.writes
            ));
        }
        if unmapped.reads + unmapped.writes > 0 {
            s.push_str(&format!(
                "  {:<4} {:<12} {:>10} {:>10}\n",
                "", "(unmapped)", unmapped.reads, unmapped.writes
            ));
        }
        let v = self.vcpu.stats();
        s.push_str("vcpu exits:\n");
        for (name, n) in &v.exits {
            s.push_str(&format!("  {name:<20} {n:>10}\n"));
        }
        s.push_str(&format!("interpreter fallbacks: {}\n", v.interp_fallbacks));
        if let Some(c) = v.code_cache {
            s.push_str(&format!(
                "decoded-block cache: {} live blocks, {} KiB (peak {} KiB, limit {} MiB), {} decoded, {} flushes when full, {} pages invalidated\n",
                c.live_blocks,
                c.bytes >> 10,
                c.peak_bytes >> 10,
                c.limit >> 20,
                c.decoded_blocks,
                c.flushes,
                c.invalidated_pages
            ));
        }
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some(j) = v.jit {
            s.push_str(&format!(
                "translation tier: {} blocks translated ({} instructions: {} native, {} through the interpreter), \
                 {} KiB of host code (limit {} MiB), {:.1} ms translating, {} links, {} invalidated, {} flushes\n",
                j.translations,
                j.translated_insns,
                j.native_insns,
                j.helper_insns,
                j.host_bytes >> 10,
                j.code_limit >> 20,
                j.translate_ns as f64 / 1e6,
                j.links,
                j.invalidated,
                j.flushes,
            ));
            s.push_str(&format!(
                "translation tier exits: {} entries, {} unlinked chain, {} lookup misses ({} refilled, {} stale), {} budget, {} to the interpreter, {} to untranslated code\n",
                j.entries, j.exits_chain, j.exits_lookup, j.lookup_refills, j.lookup_stale, j.exits_budget, j.exits_helper, j.exits_untranslated
            ));
        }
        s.push_str(&self.virtio.report());
        match v.instructions {
            Some(n) => s.push_str(&format!("guest instructions retired: {n}\n")),
            None => s.push_str("guest instructions retired: (not known on this backend)\n"),
        }
        s
    }
}
