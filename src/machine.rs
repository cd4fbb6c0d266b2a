//! The machine: guest memory, buses, devices, one vCPU on a backend, and
//! the run loop that turns vCPU exits into a VM outcome.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::debug_exit::DebugExit;
use devices::i8042::I8042;
use devices::post_code::PostCode;
use devices::uart16550::Uart16550;
use devices::{Bus, BusKind, NullIrq, VmAction, VmControl};
use vm_memory::{Bytes, GuestAddress};

use crate::backend::{self, BackendKind, GuestMemory, ShutdownReason, Vcpu, VcpuExit, VcpuStats};
use crate::guests::GuestImage;
use crate::layout::{self, ports};
use crate::trace::{DeviceIo, Tracer};

/// Errors building or running a machine (host-side failures only).
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("guest memory size {0:#x} is invalid: {1}")]
    MemorySize(u64, String),
    #[error("cannot allocate {size} bytes of guest memory: {reason}")]
    MemoryAlloc { size: u64, reason: String },
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
}

/// What to build.
pub struct MachineConfig {
    pub backend: BackendKind,
    pub memory: u64,
    pub trace: Option<PathBuf>,
    /// Where the UART's output goes.
    pub serial_out: Box<dyn Write + Send>,
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
    /// The guest shut down abnormally.
    Shutdown(ShutdownReason),
}

impl Outcome {
    /// The process exit status duet reports for this outcome. Debug-exit
    /// statuses are always odd; duet's own are even.
    pub fn exit_status(&self) -> i32 {
        match self {
            Outcome::Stopped | Outcome::PowerOff => 0,
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
            Outcome::Shutdown(r) => format!("guest shut down: {r}"),
        }
    }
}

/// A built machine, ready to load a guest and run.
pub struct Machine {
    mem: GuestMemory,
    io: DeviceIo,
    vcpu: Box<dyn Vcpu>,
    backend_name: &'static str,
    // Keep the backend (the VM) alive as long as its vCPU.
    _backend: Box<dyn backend::Backend>,
}

/// Create guest memory of `size` bytes laid out as in [`layout`].
pub fn create_memory(size: u64) -> Result<GuestMemory, MachineError> {
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

impl Machine {
    pub fn new(cfg: MachineConfig) -> Result<Self, MachineError> {
        let mem = create_memory(cfg.memory)?;
        let control = VmControl::new();
        let mut pio = Bus::new(BusKind::Pio);
        let mmio = Bus::new(BusKind::Mmio);

        let uart = Arc::new(Mutex::new(Uart16550::new(
            Box::new(NullIrq),
            cfg.serial_out,
        )));
        pio.insert(
            "com1",
            u64::from(ports::COM1),
            u64::from(ports::COM1_LEN),
            uart,
        )?;
        let debug_exit = Arc::new(Mutex::new(DebugExit::new(control.clone())));
        pio.insert("debug-exit", u64::from(ports::DEBUG_EXIT), 1, debug_exit)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(
            control.clone(),
            Box::new(NullIrq),
            Box::new(NullIrq),
        )));
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

        let tracer = match &cfg.trace {
            Some(p) => Tracer::to_file(p)?,
            None => Tracer::disabled(),
        };
        let io = DeviceIo::new(pio, mmio, tracer, control);
        let mut be = backend::create(cfg.backend, &mem, backend::VmOptions::default())?;
        let vcpu = be.create_vcpu(0)?;
        Ok(Machine {
            mem,
            io,
            vcpu,
            backend_name: be.name(),
            _backend: be,
        })
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
        let state = crate::loader::load(&self.mem, spec)?;
        self.vcpu.set_state(&state)?;
        Ok(())
    }

    /// Run until the guest stops, exits, resets or shuts down.
    pub fn run(&mut self) -> Result<Outcome, MachineError> {
        let outcome = loop {
            match self.vcpu.run(&mut self.io)? {
                VcpuExit::Halted => {
                    let s = self.vcpu.state()?;
                    let if_set = s.regs.rflags & cpu_interp::flags::IF != 0;
                    if !if_set && !s.events.nmi_pending {
                        break Outcome::Stopped;
                    }
                    // Nothing can interrupt the CPU yet (no interrupt
                    // controller is wired): a halt with IF set would wait
                    // forever. Report it instead of hanging.
                    break Outcome::Shutdown(ShutdownReason::Unrecoverable(
                        "guest halted with interrupts enabled but no interrupt source exists"
                            .into(),
                    ));
                }
                VcpuExit::InterruptWindow => {
                    self.vcpu.request_interrupt_window(false);
                }
                VcpuExit::Shutdown(r) => break Outcome::Shutdown(r),
                VcpuExit::IoRequest => match self.io.control.take() {
                    Some(VmAction::DebugExit(s)) => break Outcome::DebugExit(s),
                    Some(VmAction::Reset) => break Outcome::Reset,
                    Some(VmAction::PowerOff) => break Outcome::PowerOff,
                    None => {}
                },
                VcpuExit::Interrupted => {}
            }
        };
        self.io.tracer.finish()?;
        Ok(outcome)
    }

    /// The vCPU's counters.
    pub fn vcpu_stats(&self) -> VcpuStats {
        self.vcpu.stats()
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
