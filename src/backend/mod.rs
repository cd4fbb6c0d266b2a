//! The execution backends behind one pair of traits.
//!
//! A [`Backend`] is one VM over duet's guest memory; it creates [`Vcpu`]s.
//! A vCPU runs guest code until something the VMM must act on happens, and
//! services port I/O and MMIO synchronously through a [`Platform`] while it
//! runs, so that the interpreter can complete an MMIO access in the middle of
//! an instruction and KVM can complete its I/O exits, both through the same
//! device bus. No KVM type crosses these traits: registers are the neutral
//! structs of [`cpu_interp::state`].

use std::fmt;

pub use cpu_interp::state::{
    CpuState, DebugRegs, DescriptorTable, FpuState, Msrs, PendingEvents, Regs, Segment, Sregs,
    XState,
};

pub mod interp;
#[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;
pub mod select;

/// Guest memory as shared by both backends and the devices (writes through
/// it are logged for the interpreter's code caches).
pub type GuestMemory = devices::guest_memory::GuestMemory;

/// What a running vCPU needs from the machine around it — port I/O, MMIO,
/// the machine's MSRs and CR8, time, "give the vCPU back" — on either
/// backend: the interpreter's own trait, which the VMM's device I/O
/// ([`crate::io::DeviceIo`]) implements and KVM's exits are serviced through.
pub use cpu_interp::{MsrResult, Platform};

/// Makes a running [`Vcpu::run`] return [`VcpuExit::Interrupted`] soon; safe
/// to call from any thread (timer threads, input threads).
pub trait Kick: Send + Sync {
    fn kick(&self);
}

/// The in-kernel irqchip's inputs: interrupt lines by GSI (0-15 ISA IRQs,
/// 16-23 IOAPIC pins) and message-signalled interrupts.
pub trait GsiSink: Send + Sync {
    /// Drive GSI `gsi` to the (logical, asserted = true) `level`.
    fn set_gsi(&self, gsi: u32, level: bool);
    /// Deliver an MSI (KVM_SIGNAL_MSI).
    fn signal_msi(&self, msi: devices::interrupt::MsiMessage);
}

/// Which interrupt controllers a VM uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IrqchipKind {
    /// duet's own PIC/IOAPIC/LAPIC/PIT models (both backends; the default).
    #[default]
    Userspace,
    /// KVM's in-kernel PIC/IOAPIC/LAPIC and PIT (KVM only, for comparison).
    Kernel,
}

/// The interpreter's default execution tier: `DUET_TIER` (`interp` or
/// `jit`) when set, else the fastest this host supports.
pub fn default_tier() -> cpu_interp::Tier {
    match std::env::var("DUET_TIER").as_deref() {
        Ok("interp") => cpu_interp::Tier::Interp,
        Ok("jit") => cpu_interp::Tier::Jit,
        _ => cpu_interp::Tier::best(),
    }
}

/// Options for creating a VM.
#[derive(Clone, Copy, Debug)]
pub struct VmOptions {
    pub irqchip: IrqchipKind,
    /// The interpreter backend's execution tier (KVM ignores it).
    pub tier: cpu_interp::Tier,
    /// The CPU model its vCPUs' CPUID describes (`--cpu`).
    pub cpu: cpu_interp::cpuid::CpuModel,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            irqchip: IrqchipKind::default(),
            tier: default_tier(),
            cpu: cpu_interp::cpuid::CpuModel::default(),
        }
    }
}

/// Why the guest shut down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShutdownReason {
    /// A fault while delivering a double fault.
    TripleFault,
    /// HLT with interrupts disabled and nothing that could wake the CPU.
    HaltedWithInterruptsOff,
    /// The backend gave up on the guest (e.g. an instruction neither KVM nor
    /// the interpreter can execute). The message says what and where.
    Unrecoverable(String),
}

impl fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShutdownReason::TripleFault => write!(f, "triple fault"),
            ShutdownReason::HaltedWithInterruptsOff => {
                write!(f, "guest stopped: HLT with interrupts disabled")
            }
            ShutdownReason::Unrecoverable(m) => write!(f, "{m}"),
        }
    }
}

/// What a vCPU returns to the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuExit {
    /// HLT with interrupts enabled: the vCPU waits for an interrupt.
    Halted,
    /// The interrupt window requested with [`Vcpu::request_interrupt_window`]
    /// is open: an interrupt can be injected now.
    InterruptWindow,
    /// The guest shut down.
    Shutdown(ShutdownReason),
    /// The [`Platform`] asked for the vCPU back (see
    /// [`Platform::stop_requested`]); the VMM knows why.
    IoRequest,
    /// The run was interrupted from outside (a kick or an instruction budget
    /// running out); nothing happened that needs action.
    Interrupted,
}

/// Host-side failures of a backend. Guest-caused conditions are never
/// errors: they come back as [`VcpuExit`]s.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("KVM is not available: {0}")]
    KvmUnavailable(String),
    #[error("KVM ioctl {op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("backend '{0}' is not compiled into this build")]
    NotCompiled(&'static str),
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// Counters a backend keeps for `--stats`.
#[derive(Clone, Debug, Default)]
pub struct VcpuStats {
    /// Guest instructions retired, where the backend knows them.
    pub instructions: Option<u64>,
    /// Exits taken, by reason (backend-specific names).
    pub exits: Vec<(String, u64)>,
    /// Instructions the KVM backend handed to the interpreter.
    pub interp_fallbacks: u64,
    /// The interpreter's decoded-block cache (None on KVM).
    pub code_cache: Option<cpu_interp::block::CacheStats>,
    /// The translation tier's counters, when it runs.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    pub jit: Option<cpu_interp::jit::JitStats>,
}

/// One virtual CPU.
pub trait Vcpu: Send {
    /// Run until something the VMM must act on. I/O is serviced through `io`.
    fn run(&mut self, io: &mut dyn Platform) -> Result<VcpuExit>;

    /// The complete architectural state.
    fn state(&mut self) -> Result<CpuState>;
    /// Replace the complete architectural state.
    fn set_state(&mut self, state: &CpuState) -> Result<()>;

    /// General registers, RIP and RFLAGS.
    fn regs(&mut self) -> Result<Regs> {
        Ok(self.state()?.regs)
    }
    /// Segment, control and descriptor-table registers.
    fn sregs(&mut self) -> Result<Sregs> {
        Ok(self.state()?.sregs)
    }

    /// True when an external interrupt injected now would be taken at once
    /// (IF set, no interrupt shadow, nothing else pending).
    fn ready_for_interrupt(&mut self) -> bool;
    /// Queue external interrupt `vector` for delivery at the next boundary.
    fn inject_interrupt(&mut self, vector: u8) -> Result<()>;
    /// Queue a non-maskable interrupt.
    fn inject_nmi(&mut self) -> Result<()>;
    /// Ask to return [`VcpuExit::InterruptWindow`] as soon as the guest can
    /// take an interrupt.
    fn request_interrupt_window(&mut self, on: bool);

    /// Counters for `--stats`.
    fn stats(&self) -> VcpuStats;

    /// The last blocks of guest code entered, oldest first, for crash
    /// reports (the interpreter keeps a small ring; KVM has none).
    fn recent_code(&self) -> Vec<cpu_interp::recent::RecentEntry> {
        Vec::new()
    }

    /// `--profile`: count block executions and time the execution tiers
    /// (interpreter backend only).
    fn set_profiling(&mut self, _on: bool) {}

    /// The `--profile` report (hottest guest blocks, time split), when the
    /// backend keeps one.
    fn profile_report(&self) -> Option<String> {
        None
    }

    /// How many instructions [`Vcpu::run`] executes at most before it
    /// returns [`VcpuExit::Interrupted`] (exact on the interpreter; KVM
    /// has no instruction count and ignores it).
    fn set_run_budget(&mut self, _instructions: u64) {}

    /// A handle other threads use to make `run` return soon.
    fn kicker(&self) -> std::sync::Arc<dyn Kick>;
}

/// One VM on one backend.
pub trait Backend {
    /// Short name: "kvm" or "interp".
    fn name(&self) -> &'static str;
    /// Create vCPU `id` in its reset state.
    fn create_vcpu(&mut self, id: u32) -> Result<Box<dyn Vcpu>>;

    /// Drive an interrupt line of the in-kernel irqchip (only when the VM
    /// was created with [`IrqchipKind::Kernel`]).
    fn set_irq_line(&self, _gsi: u32, _level: bool) -> Result<()> {
        Err(BackendError::NotCompiled("in-kernel irqchip"))
    }

    /// The TSC frequency guests see, in kHz, when the backend knows it.
    fn tsc_khz(&self) -> Option<u32> {
        None
    }

    /// The guest's TSC, when it is not the VM clock at [`Backend::tsc_khz`]
    /// (KVM with duet's own LAPIC: the hardware TSC plus KVM's offset). The
    /// machine hands it to the LAPIC model's TSC-deadline timer.
    fn guest_tsc(&self) -> Option<std::sync::Arc<dyn devices::TscSource>> {
        None
    }

    /// The guest's MAXPHYADDR, as its CPUID.80000008H:EAX[7:0] reports it:
    /// the interpreter's own width, or on KVM the host's as KVM passes it
    /// through. The machine's models use it for reserved-bit checks (the
    /// IA32_APIC_BASE base).
    fn phys_addr_bits(&self) -> u32 {
        cpu_interp::mmu::PHYS_ADDR_BITS
    }

    /// Where device interrupt lines go when the backend's in-kernel
    /// irqchip is used (None with duet's userspace irqchip).
    fn irq_sink(&self) -> Option<std::sync::Arc<dyn GsiSink>> {
        None
    }

    /// The backend's coalesced MMIO zones (KVM's
    /// `KVM_REGISTER_COALESCED_MMIO`), when it has them: writes inside a
    /// zone are queued without an exit and handed to the VMM, in order, at
    /// the vCPU's next exit. Backends without exits (the interpreter) have
    /// none: the VMM's own queue ([`crate::io::DeviceIo`]) is the same
    /// batching.
    fn coalesced_zones(&self) -> Option<std::sync::Arc<dyn CoalescedZones>> {
        None
    }
}

/// Coalesced MMIO zones of a VM, registered and removed while it runs (a
/// zone follows the PCI BAR it lies in when the guest moves the BAR).
pub trait CoalescedZones: Send + Sync {
    /// Queue writes to `base..base + len` without an exit.
    fn register(&self, base: u64, len: u64) -> Result<()>;
    /// Remove the zone registered as `base..base + len`.
    fn unregister(&self, base: u64, len: u64) -> Result<()>;
}

/// Which backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Kvm,
    Interp,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Kvm => "kvm",
            BackendKind::Interp => "interp",
        }
    }
}

/// Does KVM offer coalesced MMIO here (false without KVM)?
pub fn kvm_coalesced_mmio() -> bool {
    #[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
    {
        kvm::coalesced_mmio_supported()
    }
    #[cfg(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")))]
    {
        false
    }
}

/// Does this host's in-kernel local APIC (`--irqchip kernel`) end an
/// interrupt as it delivers it — the vector not in service inside its
/// handler, a level-triggered line re-sampled at delivery instead of at the
/// guest's EOI? True on KVM-PVM hosts; see `kvm::probe_kernel_lapic`.
/// `Ok(None)` without KVM or its in-kernel irqchip. Probed once per process
/// (a tiny guest, a few milliseconds).
pub fn kernel_lapic_eoi_at_delivery() -> std::result::Result<Option<bool>, String> {
    #[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
    {
        static PROBED: std::sync::OnceLock<std::result::Result<Option<bool>, String>> =
            std::sync::OnceLock::new();
        PROBED
            .get_or_init(|| {
                kvm::probe_kernel_lapic()
                    .map(|f| f.map(|f| f.eoi_at_delivery()))
                    .map_err(|e| e.to_string())
            })
            .clone()
    }
    #[cfg(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")))]
    {
        Ok(None)
    }
}

/// Is KVM usable here? `Err` carries a reason a user can act on.
pub fn kvm_available() -> std::result::Result<(), String> {
    #[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
    {
        kvm::probe()
    }
    #[cfg(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")))]
    {
        Err("this build of duet has no KVM backend (feature `kvm`, Linux x86_64 only)".into())
    }
}

/// For tests: is KVM usable? When it is not, say why (the test then skips
/// its KVM part) — unless `DUET_REQUIRE_KVM` is set (CI sets it where
/// `/dev/kvm` exists), which turns a skip into a failure, so that a KVM
/// test that silently did not run cannot pass CI.
pub fn kvm_or_skip(test: &str) -> bool {
    match kvm_available() {
        Ok(()) => true,
        Err(why) => {
            let required =
                std::env::var("DUET_REQUIRE_KVM").is_ok_and(|v| !v.is_empty() && v != "0");
            assert!(
                !required,
                "{test}: KVM is required here (DUET_REQUIRE_KVM is set) but not usable: {why}"
            );
            println!("{test}: SKIPPED (KVM not usable: {why})");
            false
        }
    }
}

/// Create a VM on the chosen backend over `mem`.
pub fn create(kind: BackendKind, mem: &GuestMemory, opts: VmOptions) -> Result<Box<dyn Backend>> {
    match kind {
        BackendKind::Interp => {
            if opts.irqchip == IrqchipKind::Kernel {
                return Err(BackendError::Unsupported(
                    "--irqchip kernel needs the KVM backend; the interpreter has only the userspace irqchip".into(),
                ));
            }
            Ok(Box::new(interp::InterpBackend::with_options(
                mem.clone(),
                opts.tier,
                opts.cpu,
            )))
        }
        #[cfg(all(feature = "kvm", target_os = "linux", target_arch = "x86_64"))]
        BackendKind::Kvm => Ok(Box::new(kvm::KvmBackend::with_options(mem, opts)?)),
        #[cfg(not(all(feature = "kvm", target_os = "linux", target_arch = "x86_64")))]
        BackendKind::Kvm => Err(BackendError::NotCompiled("kvm")),
    }
}
