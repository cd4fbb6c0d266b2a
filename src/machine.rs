//! The machine: guest memory, buses, devices, the userspace interrupt
//! controllers and timers, one vCPU on a backend, and the run loop that
//! turns vCPU exits into a VM outcome.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::debug_exit::DebugExit;
use devices::i8042::I8042;
use devices::ioapic::Ioapic;
use devices::lapic::Lapic;
use devices::pic8259::{self, Pic8259Pair};
use devices::pit8254::{self, Pit8254};
use devices::post_code::PostCode;
use devices::rtc_cmos::RtcCmos;
use devices::uart16550::Uart16550;
use devices::{Bus, BusKind, Clock, TimeTaint, Timed, VmAction, VmControl};
use vm_memory::{Bytes, GuestAddress};

use crate::backend::{
    self, BackendKind, GuestMemory, IrqchipKind, ShutdownReason, Vcpu, VcpuExit, VcpuStats,
};
use crate::clock::{ClockKind, HostClock, VirtualClock};
use crate::guests::GuestImage;
use crate::irqchip::{Delivery, IrqRouter, IsaIrq};
use crate::layout::{self, ports};
use crate::trace::{DeviceIo, Timers, Tracer};

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
    #[error("trace: {0}")]
    Trace(#[from] crate::trace::TraceError),
    #[error(transparent)]
    Loader(#[from] crate::loader::LoaderError),
    #[error("guest image does not fit in guest memory at {addr:#x} (+{len:#x} bytes)")]
    ImageDoesNotFit { addr: u64, len: usize },
    #[error("{0}")]
    Config(String),
}

/// What to build.
pub struct MachineConfig {
    pub backend: BackendKind,
    pub memory: u64,
    pub trace: Option<PathBuf>,
    /// Where the UART's output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Host time (default) or virtual time (interpreter only).
    pub clock: ClockKind,
    /// duet's interrupt controllers (default) or KVM's in-kernel ones.
    pub irqchip: IrqchipKind,
}

impl MachineConfig {
    /// A configuration with defaults for everything but the backend.
    pub fn new(backend: BackendKind, serial_out: Box<dyn Write + Send>) -> Self {
        MachineConfig {
            backend,
            memory: layout::DEFAULT_MEMORY,
            trace: None,
            serial_out,
            clock: ClockKind::Host,
            irqchip: IrqchipKind::Userspace,
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
    /// The guest shut down abnormally.
    Shutdown(ShutdownReason),
}

impl Outcome {
    /// The process exit status duet reports for this outcome. Debug-exit
    /// statuses are always odd; duet's own are even.
    pub fn exit_status(&self) -> i32 {
        match self {
            Outcome::Stopped | Outcome::PowerOff | Outcome::HostQuit => 0,
            Outcome::DebugExit(s) => (*s & 0xff) as i32,
            Outcome::Reset => 2,
            Outcome::Shutdown(ShutdownReason::TripleFault) => 4,
            Outcome::Shutdown(_) => 6,
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
            Outcome::Shutdown(r) => format!("guest shut down: {r}"),
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
    pub count: crate::trace::AccessCount,
}

/// A built machine, ready to load a guest and run.
pub struct Machine {
    mem: GuestMemory,
    io: DeviceIo,
    vcpu: Box<dyn Vcpu>,
    backend_name: &'static str,
    clock_kind: ClockKind,
    vclock: Option<VirtualClock>,
    /// The host clock, told when the vCPU idles (None with virtual time).
    host_clock: Option<Arc<HostClock>>,
    /// Serial input reaches the UART through this.
    pub uart: Arc<Mutex<Uart16550>>,
    /// Kicks a KVM vCPU at timer deadlines (None on the interpreter).
    ticker: Option<crate::ticker::Ticker>,
    irqchip: IrqchipKind,
    // Keep the backend (the VM) alive as long as its vCPU.
    _backend: Box<dyn backend::Backend>,
}

/// A device interrupt line into the backend's in-kernel irqchip.
struct GsiLine {
    sink: Arc<dyn backend::GsiSink>,
    gsi: u32,
}

impl devices::IrqLine for GsiLine {
    fn set_level(&self, level: bool) {
        self.sink.set_gsi(self.gsi, level);
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
        if cfg.clock == ClockKind::Virtual && cfg.backend != BackendKind::Interp {
            return Err(MachineError::Config(
                "--clock virtual needs the interpreter backend (time derives from its instruction count)".into(),
            ));
        }
        let mem = create_memory(cfg.memory)?;
        let control = VmControl::new();
        let taint = TimeTaint::new();
        let vclock = (cfg.clock == ClockKind::Virtual).then(VirtualClock::new);
        // On the interpreter duet reads the clock every few microseconds
        // while the guest runs, so it can hide the host's stalls (see
        // `HostClock`); KVM runs the guest out of sight.
        let host_clock = vclock.is_none().then(|| {
            Arc::new(if cfg.backend == BackendKind::Interp {
                HostClock::compensating()
            } else {
                HostClock::new()
            })
        });
        let clock: Arc<dyn Clock> = match (&vclock, &host_clock) {
            (Some(v), _) => Arc::new(v.clone()),
            (None, Some(h)) => h.clone(),
            (None, None) => unreachable!("one clock or the other"),
        };
        let mut pio = Bus::new(BusKind::Pio);
        let mut mmio = Bus::new(BusKind::Mmio);

        let mut be = backend::create(
            cfg.backend,
            &mem,
            backend::VmOptions {
                irqchip: cfg.irqchip,
            },
        )?;
        let tsc_hz = match cfg.backend {
            BackendKind::Interp => INTERP_TSC_HZ,
            BackendKind::Kvm => be.tsc_khz().map_or(INTERP_TSC_HZ, |k| u64::from(k) * 1000),
        };

        // Interrupt controllers.
        let lapic = Lapic::new(
            0,
            true,
            clock.clone(),
            taint.clone(),
            u64::from(backend::interp::LAPIC_TIMER_HZ),
            tsc_hz,
        );
        let router = IrqRouter::new(Pic8259Pair::new(), Ioapic::new(), lapic);
        let sink = be.irq_sink();
        let isa = |irq: u8| -> Box<dyn devices::IrqLine> {
            match &sink {
                // The in-kernel irqchip: ISA IRQ n is GSI n there.
                Some(s) => Box::new(GsiLine {
                    sink: s.clone(),
                    gsi: u32::from(irq),
                }),
                None => Box::new(IsaIrq {
                    router: router.clone(),
                    irq,
                }),
            }
        };
        let userspace = cfg.irqchip == IrqchipKind::Userspace;
        if userspace {
            let pic = router.pic.clone();
            pio.insert(
                "pic-master",
                0x20,
                2,
                Arc::new(Mutex::new(pic8259::pic_master_port(pic.clone()))),
            )?;
            pio.insert(
                "pic-slave",
                0xa0,
                2,
                Arc::new(Mutex::new(pic8259::pic_slave_port(pic.clone()))),
            )?;
            pio.insert(
                "elcr",
                0x4d0,
                2,
                Arc::new(Mutex::new(pic8259::elcr_port(pic))),
            )?;
            mmio.insert("ioapic", layout::IOAPIC_BASE, 0x1000, router.ioapic.clone())?;
            mmio.insert("lapic", layout::LAPIC_BASE, 0x1000, router.lapic.clone())?;
        }

        // Timers.
        // With KVM's in-kernel irqchip the kernel's PIT owns IRQ0; duet's model
        // then stays disconnected (its ports are not mapped either).
        let pit_irq: Box<dyn devices::IrqLine> = if userspace {
            isa(0)
        } else {
            Box::new(devices::NullIrq)
        };
        let pit = Arc::new(Mutex::new(Pit8254::new(
            clock.clone(),
            pit_irq,
            taint.clone(),
        )));
        if userspace {
            pio.insert(
                "pit",
                0x40,
                4,
                Arc::new(Mutex::new(pit8254::pit_ports(pit.clone()))),
            )?;
            pio.insert(
                "port61",
                0x61,
                1,
                Arc::new(Mutex::new(pit8254::port61(pit.clone()))),
            )?;
        }
        let rtc_start = if vclock.is_some() {
            VIRTUAL_EPOCH
        } else {
            host_unix_time()
        };
        let mut rtc = RtcCmos::new(clock.clone(), taint.clone(), isa(8), rtc_start);
        let below = cfg.memory.min(layout::MMIO_GAP_START);
        rtc.set_memory_size(below, cfg.memory - below);
        let rtc = Arc::new(Mutex::new(rtc));
        pio.insert("rtc", 0x70, devices::rtc_cmos::PORT_COUNT, rtc.clone())?;

        // Other devices.
        let uart = Arc::new(Mutex::new(Uart16550::new(isa(4), cfg.serial_out)));
        pio.insert(
            "com1",
            u64::from(ports::COM1),
            u64::from(ports::COM1_LEN),
            uart.clone(),
        )?;
        let debug_exit = Arc::new(Mutex::new(DebugExit::new(control.clone())));
        pio.insert(
            "debug-exit",
            u64::from(ports::DEBUG_EXIT),
            u64::from(ports::DEBUG_EXIT_LEN),
            debug_exit,
        )?;
        let i8042 = Arc::new(Mutex::new(I8042::new(control.clone(), isa(1), isa(12))));
        pio.insert(
            "i8042",
            u64::from(ports::I8042_DATA),
            1,
            Arc::new(Mutex::new(devices::i8042::data_port(i8042.clone()))),
        )?;
        pio.insert(
            "i8042",
            u64::from(ports::I8042_COMMAND),
            1,
            Arc::new(Mutex::new(devices::i8042::command_port(i8042))),
        )?;
        pio.insert(
            "post",
            u64::from(ports::POST_CODE),
            1,
            Arc::new(Mutex::new(PostCode::default())),
        )?;
        let pm = devices::acpi_pm::AcpiPm::new(clock.clone(), taint.clone(), control.clone());
        pio.insert(
            "acpi-pm",
            u64::from(layout::boot::ACPI_PM_BASE),
            devices::acpi_pm::BLOCK_LEN,
            Arc::new(Mutex::new(pm)),
        )?;
        let reset = devices::reset_control::ResetControl::new(control.clone());
        pio.insert(
            "reset",
            u64::from(ports::RESET_CONTROL),
            1,
            Arc::new(Mutex::new(reset)),
        )?;

        let tracer = match &cfg.trace {
            Some(p) => Tracer::to_file(p)?,
            None => Tracer::disabled(),
        };
        let mut timed: Vec<Arc<Mutex<dyn Timed + Send>>> = vec![rtc];
        if userspace {
            timed.push(pit);
            timed.push(router.lapic.clone());
        }
        let timers = Timers::new(clock, timed, vclock.clone());
        let io = DeviceIo::new(
            pio,
            mmio,
            tracer,
            control,
            taint,
            timers,
            userspace.then_some(router),
        );
        let vcpu = be.create_vcpu(0)?;
        let ticker =
            (cfg.backend == BackendKind::Kvm).then(|| crate::ticker::Ticker::spawn(vcpu.kicker()));
        Ok(Machine {
            ticker,
            irqchip: cfg.irqchip,
            mem,
            io,
            vcpu,
            backend_name: be.name(),
            clock_kind: cfg.clock,
            vclock,
            host_clock,
            uart,
            _backend: be,
        })
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
        crate::acpi::write(&self.mem, &crate::acpi::AcpiConfig { cpus: 1 })
            .map_err(|e| MachineError::Config(e.to_string()))?;
        crate::mptable::write(&self.mem, 1).map_err(|e| MachineError::Config(e.to_string()))?;
        let state = crate::loader::load(&self.mem, spec)?;
        self.vcpu.set_state(&state)?;
        Ok(())
    }

    /// Inject what the interrupt controllers have for the vCPU, or ask for
    /// an interrupt window. Returns true when something was injected.
    fn service_interrupts(&mut self) -> Result<bool, MachineError> {
        let Some(router) = self.io.router().cloned() else {
            return Ok(false);
        };
        router.waker.clear();
        router.pump();
        let Some(req) = router.pending() else {
            self.vcpu.request_interrupt_window(false);
            return Ok(false);
        };
        let nmi = req == devices::lapic::InterruptRequest::Nmi;
        if !nmi && !self.vcpu.ready_for_interrupt() {
            self.vcpu.request_interrupt_window(true);
            return Ok(false);
        }
        let injected = match router.acknowledge() {
            Some(Delivery::Vector(v)) => {
                self.vcpu.inject_interrupt(v)?;
                true
            }
            Some(Delivery::Nmi) => {
                self.vcpu.inject_nmi()?;
                true
            }
            None => false,
        };
        self.vcpu
            .request_interrupt_window(router.pending().is_some());
        Ok(injected)
    }

    /// Run until the guest stops, exits, resets or shuts down.
    pub fn run(&mut self) -> Result<Outcome, MachineError> {
        let outcome = loop {
            self.io.timers.advance_due();
            self.io.refresh_deadline();
            self.service_interrupts()?;
            self.arm_ticker();
            let exit = self.vcpu.run(&mut self.io);
            if let Some(t) = &self.ticker {
                t.disarm();
            }
            let exit = exit?;
            self.io.timers.advance_due();
            match exit {
                VcpuExit::Halted => {
                    if let Some(o) = self.idle()? {
                        break o;
                    }
                }
                VcpuExit::InterruptWindow | VcpuExit::Interrupted | VcpuExit::IoRequest => {}
                VcpuExit::Shutdown(r) => break Outcome::Shutdown(r),
            }
            // Devices and host threads (Ctrl-A x) post VM-level actions.
            if let Some(o) = self.take_action() {
                break o;
            }
        };
        self.io.tracer.finish()?;
        Ok(outcome)
    }

    /// Arm the ticker for the next timer deadline (KVM only). With the
    /// in-kernel irqchip, a slow periodic kick lets the VMM notice a guest
    /// that stopped (HLT with interrupts off).
    fn arm_ticker(&self) {
        let Some(t) = &self.ticker else {
            return;
        };
        if self.irqchip == IrqchipKind::Kernel {
            t.arm(Duration::from_millis(100));
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
        }
    }

    /// The vCPU halted: wait (without spinning) until an interrupt can wake
    /// it, or decide that nothing ever will.
    fn idle(&mut self) -> Result<Option<Outcome>, MachineError> {
        loop {
            if let Some(o) = self.take_action() {
                return Ok(Some(o));
            }
            self.io.timers.advance_due();
            if self.service_interrupts()? {
                return Ok(None);
            }
            let s = self.vcpu.state()?;
            let if_set = s.regs.rflags & cpu_interp::flags::IF != 0;
            // With IF clear only an NMI can wake the CPU.
            let nmi = self
                .io
                .router()
                .is_some_and(|r| r.pending() == Some(devices::lapic::InterruptRequest::Nmi));
            if !if_set && !nmi && !s.events.nmi_pending {
                return Ok(Some(Outcome::Stopped));
            }
            if self.io.router().is_none() {
                // In-kernel irqchip: KVM handles HLT; come back to it.
                return Ok(None);
            }
            let deadline = self.io.timers.next_deadline();
            match self.clock_kind {
                ClockKind::Virtual => match (deadline, &self.vclock) {
                    (Some(d), Some(v)) => v.skip_to(d),
                    _ => {
                        return Ok(Some(Outcome::Shutdown(ShutdownReason::Unrecoverable(
                            "guest halted waiting for an interrupt, and no timer is armed".into(),
                        ))))
                    }
                },
                ClockKind::Host => {
                    let now = self.io.timers.now();
                    let wait = deadline.map(|d| Duration::from_nanos(d.saturating_sub(now)));
                    if let Some(r) = self.io.router() {
                        // Bounded (100 ms) so that host-side requests such as
                        // Ctrl-A x are noticed without a waker of their own.
                        if let Some(h) = &self.host_clock {
                            h.set_idle(true);
                        }
                        r.waker.wait(Some(
                            wait.unwrap_or(Duration::from_millis(100))
                                .min(Duration::from_millis(100)),
                        ));
                        if let Some(h) = &self.host_clock {
                            h.set_idle(false);
                        }
                    }
                }
            }
        }
    }

    /// The vCPU's counters.
    pub fn vcpu_stats(&self) -> VcpuStats {
        self.vcpu.stats()
    }

    /// Device access counts by (bus, device), and the unmapped accesses.
    pub fn device_access_counts(&self) -> (Vec<DeviceCount>, crate::trace::AccessCount) {
        let (counts, unmapped) = self.io.counts();
        let v = counts
            .iter()
            .map(|((kind, name), c)| DeviceCount {
                bus: kind.as_str(),
                device: name.clone(),
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
        s.push_str("device accesses (reads/writes):\n");
        for ((kind, name), c) in counts {
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
        match v.instructions {
            Some(n) => s.push_str(&format!("guest instructions retired: {n}\n")),
            None => s.push_str("guest instructions retired: (not known on this backend)\n"),
        }
        s
    }
}
