//! The KVM backend: duet's machine model on `/dev/kvm`, with the interpreter
//! as a per-instruction fallback.
//!
//! # Design
//!
//! - Interrupt controllers ([`IrqchipKind`]):
//!   - `Userspace` (the default): no in-kernel irqchip and no in-kernel PIT.
//!     Every port and MMIO access exits to userspace and goes through the
//!     VMM's [`IoHandler`], exactly as with the interpreter. External
//!     interrupts are queued with `KVM_INTERRUPT` (userspace irqchip
//!     semantics: KVM injects at the next entry whatever is queued, so it
//!     is only queued when the guest can take it; otherwise it is held here
//!     and injected from an interrupt-window exit).
//!   - `Kernel` (for comparison): KVM's PIC, IOAPIC, local APICs and PIT
//!     (`KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`). Their ports (0x20/0x21,
//!     0xa0/0xa1, 0x4d0/0x4d1, 0x40–0x43 and, with the PIT's speaker dummy,
//!     0x61) and MMIO (IOAPIC 0xfec00000, LAPIC 0xfee00000) never reach the
//!     [`IoHandler`]; the VMM raises interrupt lines with
//!     [`Backend::set_irq_line`]; HLT waits in the kernel, also `cli; hlt`
//!     (a kick ends the wait, and `run` then returns `Halted` if KVM holds
//!     the vCPU halted, else `Interrupted`; so the VMM must kick to notice
//!     a guest that stopped); [`Vcpu::inject_interrupt`] is an error and
//!     [`Vcpu::request_interrupt_window`] is ignored (KVM rejects
//!     `KVM_INTERRUPT` with an in-kernel irqchip and injects by itself);
//!     the machine's MSRs are KVM's, and CPUID advertises x2APIC and (with
//!     `KVM_CAP_TSC_DEADLINE_TIMER`) TSC-deadline for KVM's LAPIC.
//! - The machine's MSRs (userspace irqchip): IA32_APIC_BASE (0x1b),
//!   IA32_TSC_DEADLINE (0x6e0) and the x2APIC range (0x800–0x8ff) reach
//!   [`IoHandler::msr_read`]/[`IoHandler::msr_write`] through
//!   `KVM_CAP_X86_USER_SPACE_MSR` exits, as they do on the interpreter (see
//!   [`USER_SPACE_MSR_REASONS`] and [`MACHINE_MSR_RANGES`]). Only then are
//!   x2APIC and TSC-deadline advertised in CPUID
//!   ([`KvmBackend::machine_msrs_supported`]).
//! - Kicks ([`Vcpu::kicker`]): a kick sets `kvm_run.immediate_exit` and a
//!   pending flag, and sends [`kick_signal`] (a real-time signal with a
//!   no-op handler, installed once per process without `SA_RESTART`) to
//!   the vCPU thread while it is inside `KVM_RUN`, so an in-progress
//!   `KVM_RUN` returns `EINTR` at once and one about to start returns
//!   before entering the guest. Every return from `run` consumes pending
//!   kicks (they asked for exactly that return), so a stale kick causes at
//!   most one early return.
//! - String port I/O (`rep outsb`) is handed to the handler one element at
//!   a time, so both backends produce the same trace.
//! - When KVM cannot emulate an instruction (`KVM_EXIT_INTERNAL_ERROR` with
//!   suberror `KVM_INTERNAL_ERROR_EMULATION`, which KVM-PVM hosts produce
//!   for several ring-0 instructions), the vCPU state is copied into a
//!   [`cpu_interp::Cpu`] over the same guest memory, that one instruction is
//!   executed (and any exception it raises delivered) by the interpreter,
//!   the state is copied back and KVM resumes.
//! - All conversions between kvm-bindings structures and the neutral
//!   [`CpuState`] live in this file; no KVM type leaves it.
//!
//! # Cost of the fallback
//!
//! On KVM-PVM every vCPU ioctl costs ~7 µs, so the fallback avoids them:
//! regs, sregs and events come from kvm_run's sync-regs area
//! (`KVM_CAP_SYNC_REGS`, filled by KVM on every exit at no measurable
//! cost), the FPU/MSR/debug/XCR0 state is read only for instructions that
//! may use it (`needs_full_state`), and only what the instruction changed
//! is written back, through the sync-regs area where possible. A fallback
//! costs ~15 µs there (~95 µs with a full state transfer); a port I/O exit
//! costs ~9 µs.
//!
//! # KVM_GET/SET_FPU
//!
//! These ignore MXCSR, and writing the legacy area alone can be undone by
//! the next XRSTOR if XSTATE_BV says "init state". The x87/SSE state is
//! therefore moved with KVM_GET/SET_XSAVE(2) when available, patching the
//! legacy area and XSTATE_BV and keeping the other components.
//!
//! # HLT
//!
//! Without an in-kernel local APIC, KVM returns `KVM_EXIT_HLT` with RIP past
//! the HLT and the vCPU still runnable (KVM refuses `KVM_MP_STATE_HALTED`
//! without an in-kernel LAPIC). The halted state is therefore kept here:
//! after a HLT exit [`CpuState::events`]`.halted` reads true and `run`
//! returns [`VcpuExit::Halted`] again until an interrupt or NMI is queued —
//! the same contract as the interpreter backend. (With the in-kernel
//! irqchip KVM keeps the halted state itself, in the vCPU's MP state.)

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cpu_interp::state::msr;
use cpu_interp::{Cpu, CpuExit, Ram};
use iced_x86::{Code, Mnemonic};
use kvm_bindings::{
    kvm_coalesced_mmio, kvm_debugregs, kvm_dtable, kvm_enable_cap, kvm_fpu, kvm_interrupt,
    kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_run, kvm_segment, kvm_sregs,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs as KvmMsrs,
    Xsave, KVM_CAP_X86_USER_SPACE_MSR, KVM_INTERNAL_ERROR_DELIVERY_EV,
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED,
    KVM_MP_STATE_RUNNABLE, KVM_MSR_EXIT_REASON_FILTER, KVM_MSR_EXIT_REASON_INVAL,
    KVM_MSR_EXIT_REASON_UNKNOWN, KVM_PIT_SPEAKER_DUMMY, KVM_SYNC_X86_EVENTS, KVM_SYNC_X86_REGS,
    KVM_SYNC_X86_SREGS, KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SHADOW,
    KVM_X86_SHADOW_INT_MOV_SS, KVM_X86_SHADOW_INT_STI,
};
use kvm_ioctls::{
    Cap, IoEventAddress, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, SyncReg,
    VcpuExit as KvmExit, VcpuFd, VmFd,
};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::interp::IoPlatform;
use super::{
    Backend, BackendError, CpuState, DebugRegs, DescriptorTable, FpuState, GuestMemory, IoHandler,
    IrqchipKind, Kick, MsrResult, Msrs, PendingEvents, Regs, Result, Segment, ShutdownReason,
    Sregs, Vcpu, VcpuExit, VcpuStats, VmOptions, XState,
};

/// The only KVM API version there has ever been.
const KVM_API_VERSION: i32 = 12;

/// Guest-physical address of the 3-page TSS KVM needs for real mode on VMX
/// hosts without "unrestricted guest". Top of the 32-bit MMIO gap, where no
/// device of duet's lives.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// Guest-physical address of the one-page identity map for the same purpose.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// CPUID.1:ECX bits of local-APIC features: advertised when the machine's
/// LAPIC model (userspace irqchip, MSR exits available) or KVM's (kernel
/// irqchip) implements them, cleared otherwise.
const CPUID1_ECX_X2APIC: u32 = 1 << 21;
const CPUID1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// IA32_TSC_DEADLINE.
const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// First x2APIC MSR (0x800–0x8ff).
const MSR_X2APIC_FIRST: u32 = 0x800;
/// IA32_APIC_BASE bits a WRMSR may set (BSP, x2APIC enable, enable, base
/// below 64 GiB): the interpreter's check, applied when duet stores the
/// value for a machine that does not own the MSR.
const APIC_BASE_WRITABLE: u64 = 0xf_ffff_fd00;

/// The machine's MSRs, as `(first, count)`: KVM's MSR filter denies guest
/// accesses to them, which `KVM_MSR_EXIT_REASON_FILTER` turns into exits to
/// the [`IoHandler`]. (Without an in-kernel LAPIC KVM would store
/// IA32_APIC_BASE and ignore relocation, disable and x2APIC enable, and
/// would fail the others.)
pub const MACHINE_MSR_RANGES: [(u32, u32); 3] = [
    (msr::APIC_BASE, 1),
    (MSR_TSC_DEADLINE, 1),
    (MSR_X2APIC_FIRST, 0x100),
];

/// Which failed guest MSR accesses KVM hands to userspace
/// (`KVM_CAP_X86_USER_SPACE_MSR`):
/// - `FILTER`: the [`MACHINE_MSR_RANGES`].
/// - `INVAL`: KVM ignores MSR filters over the x2APIC range and, without an
///   in-kernel LAPIC, fails those accesses as invalid; this is how they
///   reach the machine. Other invalid accesses (reserved bits, ...) go to
///   the machine too, which leaves them `Unhandled`; KVM then injects #GP,
///   as it would have.
/// - `UNKNOWN`: MSRs KVM does not implement reach the machine like on the
///   interpreter (which asks the machine about every MSR first);
///   `Unhandled` ones get #GP, as KVM would have given.
///
/// MSRs KVM implements (EFER, STAR, PAT, ...) never reach the machine.
pub const USER_SPACE_MSR_REASONS: u32 =
    KVM_MSR_EXIT_REASON_FILTER | KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_UNKNOWN;

/// The in-kernel PIT's configuration with `--irqchip kernel`: the speaker
/// dummy is on, so port 0x61 (PIT channel 2 gate and output, read by
/// guests calibrating their clocks against the PIT) is served by the kernel
/// coherently with its PIT instead of by a userspace model that cannot see
/// channel 2.
const KERNEL_PIT_FLAGS: u32 = KVM_PIT_SPEAKER_DUMMY;

/// The MSRs transferred with the state, TSC last.
const STATE_MSRS: [u32; 12] = [
    msr::STAR,
    msr::LSTAR,
    msr::CSTAR,
    msr::SFMASK,
    msr::KERNEL_GS_BASE,
    msr::SYSENTER_CS,
    msr::SYSENTER_ESP,
    msr::SYSENTER_EIP,
    msr::PAT,
    msr::TSC_AUX,
    msr::MISC_ENABLE,
    msr::TSC,
];

/// `KVM_INTERRUPT`, which kvm-ioctls does not wrap, and `KVM_GET_TSC_KHZ`,
/// which it wraps for vCPUs only (it also works on a VM fd since Linux 6.0).
mod ioctls {
    use kvm_bindings::{kvm_interrupt, KVMIO};
    vmm_sys_util::ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
    vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    vmm_sys_util::ioctl_iow_nr!(KVM_X86_SETUP_MCE, KVMIO, 0x9c, u64);
}

/// Give the vCPU the interpreter's machine-check banks (KVM_X86_SETUP_MCE),
/// so MCG_CAP reads the same on both backends (KVM's default is 32 banks
/// without MCG_CTL).
fn setup_machine_check(fd: &VcpuFd) {
    let cap = cpu_interp::mca::MCG_CTL_P | u64::from(cpu_interp::mca::BANKS);
    // SAFETY: KVM_X86_SETUP_MCE reads one u64 from the pointer, which is
    // valid for the call.
    let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, ioctls::KVM_X86_SETUP_MCE(), &cap) };
    if r != 0 {
        log::debug!(
            "kvm: KVM_X86_SETUP_MCE failed ({}); MCG_CAP keeps KVM's default",
            std::io::Error::last_os_error()
        );
    }
}

// ---- kicks -----------------------------------------------------------------

/// The signal that interrupts a vCPU thread's `KVM_RUN`: SIGRTMIN+1, with a
/// no-op handler installed once per process (without `SA_RESTART`, so the
/// ioctl returns `EINTR`), and unblocked by `run` on the thread that calls
/// it. `None` if the handler could not be installed;
/// kicks then still work, except that a guest already running inside
/// `KVM_RUN` is only interrupted at its next exit.
pub fn kick_signal() -> Option<libc::c_int> {
    static SIGNAL: OnceLock<Option<libc::c_int>> = OnceLock::new();
    *SIGNAL.get_or_init(|| {
        extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        let sig = vmm_sys_util::signal::SIGRTMIN() + 1;
        match vmm_sys_util::signal::register_signal_handler(sig, noop) {
            Ok(()) => Some(sig),
            Err(e) => {
                log::warn!(
                    "kvm: cannot install the vCPU kick signal handler for signal {sig} ({e}); \
                     kicks wait for the guest's next exit"
                );
                None
            }
        }
    })
}

/// `kvm_run.immediate_exit` of one vCPU, written from any thread.
struct ImmediateExit(NonNull<u8>);

// SAFETY: the pointer is only dereferenced (atomically) while the vCPU that
// owns the mapping is alive: `KvmVcpu::drop` removes it, under the mutex
// every user holds, before the mapping goes away.
unsafe impl Send for ImmediateExit {}

impl ImmediateExit {
    fn store(&self, v: u8) {
        // SAFETY: `self.0` points at the `immediate_exit` byte of the vCPU's
        // kvm_run mapping, which is live (see the `Send` impl) and suitably
        // aligned for a u8. The byte is shared with the kernel (which only
        // reads it at KVM_RUN entry) and written by duet only through this
        // atomic view, from the vCPU thread and from kicking threads.
        let byte = unsafe { AtomicU8::from_ptr(self.0.as_ptr()) };
        byte.store(v, Ordering::SeqCst);
    }
}

/// Who to interrupt, guarded by [`KvmKick::target`].
struct KickTarget {
    /// The vCPU thread, while it is inside (or about to enter) `KVM_RUN`.
    thread: Option<libc::pthread_t>,
    /// `None` once the vCPU is gone.
    immediate_exit: Option<ImmediateExit>,
}

/// A vCPU's kick, shared with the threads that kick it.
///
/// Invariant: `pending` and `immediate_exit` are set together by [`Kick::kick`]
/// and cleared together by [`KvmKick::consume`], both under `target`, so a
/// kick is never half-consumed. The vCPU thread also sets `immediate_exit`
/// on its own (to complete an I/O exit without re-entering the guest),
/// which never conflicts with a kick.
struct KvmKick {
    /// A kick not yet answered by a return from `run`. Also what the
    /// interpreter fallback polls (through [`IoPlatform`]).
    pending: AtomicBool,
    target: Mutex<KickTarget>,
    signal: Option<libc::c_int>,
}

impl KvmKick {
    fn new(immediate_exit: NonNull<u8>) -> Self {
        KvmKick {
            pending: AtomicBool::new(false),
            target: Mutex::new(KickTarget {
                thread: None,
                immediate_exit: Some(ImmediateExit(immediate_exit)),
            }),
            signal: kick_signal(),
        }
    }

    fn target(&self) -> std::sync::MutexGuard<'_, KickTarget> {
        self.target.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The vCPU thread is about to enter `KVM_RUN`.
    fn enter(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.target().thread = Some(me);
    }

    /// Make sure the calling thread (about to run the vCPU) does not block
    /// the kick signal; `checked` remembers the last thread checked.
    fn unblock_here(&self, checked: &mut Option<libc::pthread_t>) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if *checked == Some(me) {
            return;
        }
        *checked = Some(me);
        if let Some(sig) = self.signal {
            if let Err(e) = vmm_sys_util::signal::unblock_signal(sig) {
                log::warn!("kvm: cannot unblock the vCPU kick signal {sig} on this thread: {e}");
            }
        }
    }

    /// The vCPU thread is back from `KVM_RUN`.
    fn leave(&self) {
        self.target().thread = None;
    }

    /// Set `immediate_exit` from the vCPU thread (to complete a pending
    /// I/O exit without re-entering the guest).
    fn set_immediate_exit(&self) {
        if let Some(ie) = &self.target().immediate_exit {
            ie.store(1);
        }
    }

    /// `run` is returning: pending kicks are answered. Clears
    /// `immediate_exit`; true if a kick was pending.
    fn consume(&self) -> bool {
        let t = self.target();
        if let Some(ie) = &t.immediate_exit {
            ie.store(0);
        }
        self.pending.swap(false, Ordering::SeqCst)
    }

    fn is_pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    /// The vCPU is being destroyed: its kvm_run mapping goes away.
    fn detach(&self) {
        let mut t = self.target();
        t.immediate_exit = None;
        t.thread = None;
    }
}

impl Kick for KvmKick {
    fn kick(&self) {
        let t = self.target();
        self.pending.store(true, Ordering::SeqCst);
        if let Some(ie) = &t.immediate_exit {
            ie.store(1);
        }
        if let (Some(thread), Some(sig)) = (t.thread, self.signal) {
            // SAFETY: `thread` is registered by the vCPU thread right before
            // KVM_RUN and removed right after, both under the lock held
            // here, so it names a live thread; the signal's handler is a
            // no-op installed for the whole process.
            let r = unsafe { libc::pthread_kill(thread, sig) };
            if r != 0 {
                log::debug!("kvm: pthread_kill for a vCPU kick failed: errno {r}");
            }
        }
    }
}

/// A `BackendError::Kvm` for ioctl `op`.
fn kvm_err(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> BackendError {
    move |e| BackendError::Kvm {
        op,
        source: io::Error::from_raw_os_error(e.errno()),
    }
}

/// The KVM device: `/dev/kvm`, or `$DUET_KVM_DEVICE` when set (tests use it
/// to simulate a host without KVM).
fn kvm_device() -> String {
    std::env::var("DUET_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".to_string())
}

/// Open the KVM device, explaining failures in terms a user can act on.
fn open_kvm() -> std::result::Result<Kvm, String> {
    let path = kvm_device();
    let cpath = std::ffi::CString::new(path.clone())
        .map_err(|_| format!("bad KVM device path {path:?}"))?;
    Kvm::new_with_path(&cpath).map_err(|e| match e.errno() {
        libc::ENOENT => format!(
            "{path} does not exist: the kvm module is not loaded or the CPU has no hardware \
             virtualization (use --backend interp)"
        ),
        libc::EACCES | libc::EPERM => format!(
            "permission denied opening {path}: add your user to the group owning it (usually \
             `kvm`) or run with access to it (or use --backend interp)"
        ),
        libc::ENXIO | libc::ENODEV => {
            format!("{path} exists but no KVM driver answers behind it (module not loaded?)")
        }
        n => format!("cannot open {path}: {}", io::Error::from_raw_os_error(n)),
    })
}

/// Does this KVM offer coalesced MMIO (`KVM_CAP_COALESCED_MMIO`)?
pub fn coalesced_mmio_supported() -> bool {
    open_kvm().is_ok_and(|k| k.check_extension(Cap::CoalescedMmio))
}

/// Is KVM usable? Opens `/dev/kvm` and checks the API version.
pub fn probe() -> std::result::Result<(), String> {
    let kvm = open_kvm()?;
    check_api_version(&kvm)
}

fn check_api_version(kvm: &Kvm) -> std::result::Result<(), String> {
    match kvm.get_api_version() {
        KVM_API_VERSION => Ok(()),
        v => Err(format!(
            "/dev/kvm speaks KVM API version {v}; duet needs version {KVM_API_VERSION}"
        )),
    }
}

/// How the x87/SSE state is transferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FpuApi {
    /// KVM_GET/SET_XSAVE with a buffer of this many bytes (KVM_CAP_XSAVE2).
    Xsave2(usize),
    /// KVM_GET/SET_XSAVE with the classic 4 KiB `kvm_xsave` (pre-5.17).
    Xsave,
    /// KVM_GET/SET_FPU, which does not transfer MXCSR.
    Fpu,
}

/// Optional KVM capabilities the vCPUs use.
#[derive(Clone, Copy, Debug)]
struct Caps {
    /// KVM_GET/SET_XCRS.
    xcrs: bool,
    fpu: FpuApi,
    /// Where the XSAVE components beyond x87/SSE sit in KVM's XSAVE image.
    xsave_layout: XsaveLayout,
    /// KVM_CAP_SYNC_REGS covers regs, sregs and events: KVM stores them in
    /// kvm_run on every exit, so reading them costs no ioctl.
    sync_regs: bool,
    /// KVM's PIC/IOAPIC/LAPIC/PIT serve the guest (`IrqchipKind::Kernel`).
    kernel_irqchip: bool,
    /// The machine's MSRs exit to userspace (see [`MACHINE_MSR_RANGES`]).
    machine_msrs: bool,
}

/// One VM on KVM.
pub struct KvmBackend {
    // Field order is drop order: the VM fd goes before the memory it maps.
    vm: Arc<VmFd>,
    caps: Caps,
    supported_cpuid: CpuId,
    run_size: usize,
    irqchip: IrqchipKind,
    /// The CPU model the guest's CPUID is cut down to (`--cpu`).
    model: cpu_interp::cpuid::CpuModel,
    /// CPUID.1:ECX.TSC_DEADLINE may be advertised with the kernel irqchip.
    kernel_tsc_deadline: bool,
    /// KVM's TSC frequency in kHz; 0 until known (from the VM, else from the
    /// first vCPU).
    tsc_khz: AtomicU32,
    /// The guest memory the slots point into (kept alive as long as the VM).
    mem: GuestMemory,
}

/// Log `msg` at info level once per process for `key`.
fn info_once(key: &'static str, msg: impl FnOnce() -> String) {
    static SEEN: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    if SEEN
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key)
    {
        log::info!("{}", msg());
    }
}

/// Turn on MSR exits for the machine's MSRs (`KVM_CAP_X86_USER_SPACE_MSR`
/// plus an MSR filter over [`MACHINE_MSR_RANGES`]). `Err` says why not;
/// nothing is left enabled then.
fn enable_machine_msrs(vm: &VmFd) -> std::result::Result<(), String> {
    if !vm.check_extension(Cap::X86UserSpaceMsr) {
        return Err("this KVM lacks KVM_CAP_X86_USER_SPACE_MSR".into());
    }
    if !vm.check_extension(Cap::X86MsrFilter) {
        return Err("this KVM lacks KVM_CAP_X86_MSR_FILTER".into());
    }
    let user_space_msr = |reasons: u32| kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(reasons), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&user_space_msr(USER_SPACE_MSR_REASONS))
        .map_err(|e| format!("enabling KVM_CAP_X86_USER_SPACE_MSR failed: {e}"))?;
    // A clear bit denies the access, i.e. sends it to userspace.
    let deny = [0u8; 0x100 / 8];
    let ranges = MACHINE_MSR_RANGES.map(|(base, count)| MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base,
        msr_count: count,
        bitmap: &deny[..count.div_ceil(8) as usize],
    });
    if let Err(e) = vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges) {
        let _ = vm.enable_cap(&user_space_msr(0));
        return Err(format!("KVM_X86_SET_MSR_FILTER failed: {e}"));
    }
    Ok(())
}

impl KvmBackend {
    /// Open KVM, create a VM with the default options (userspace irqchip)
    /// and register every region of `mem` as a memory slot.
    pub fn new(mem: &GuestMemory) -> Result<Self> {
        Self::with_options(mem, VmOptions::default())
    }

    /// Whether the machine's MSRs (IA32_APIC_BASE, IA32_TSC_DEADLINE,
    /// x2APIC 0x800–0x8ff) reach the [`IoHandler`] on this VM. True with the
    /// userspace irqchip on a KVM with `KVM_CAP_X86_USER_SPACE_MSR` and
    /// `KVM_CAP_X86_MSR_FILTER`; only then do the vCPUs' CPUID advertise
    /// x2APIC and TSC-deadline (implemented by the machine's LAPIC model).
    /// False with the kernel irqchip (KVM's LAPIC owns them).
    pub fn machine_msrs_supported(&self) -> bool {
        self.caps.machine_msrs
    }

    /// The interrupt controllers this VM uses.
    pub fn irqchip(&self) -> IrqchipKind {
        self.irqchip
    }

    /// Open KVM, create a VM as `opts` says and register every region of
    /// `mem` as a memory slot. With [`IrqchipKind::Kernel`], KVM's irqchip
    /// and PIT are created here (before any vCPU, as KVM requires);
    /// `BackendError::Unsupported` explains a KVM that refuses them.
    pub fn with_options(mem: &GuestMemory, opts: VmOptions) -> Result<Self> {
        let kvm = open_kvm().map_err(BackendError::KvmUnavailable)?;
        check_api_version(&kvm).map_err(BackendError::KvmUnavailable)?;
        for (cap, name) in [
            (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
            (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(BackendError::KvmUnavailable(format!(
                    "this KVM lacks {name}, which duet needs (host kernel too old?)"
                )));
            }
        }
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // KVM_GET/SET_FPU ignore MXCSR, and writing the legacy area without
        // touching XSTATE_BV may be undone by the next XRSTOR: prefer XSAVE.
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        let fpu = if xsave2 > 0 {
            FpuApi::Xsave2(xsave2 as usize)
        } else if kvm.check_extension(Cap::Xsave) {
            FpuApi::Xsave
        } else {
            FpuApi::Fpu
        };
        let kernel_irqchip = opts.irqchip == IrqchipKind::Kernel;
        if kernel_irqchip {
            create_kernel_irqchip(&kvm, &vm)?;
        }
        let machine_msrs = !kernel_irqchip
            && match enable_machine_msrs(&vm) {
                Ok(()) => true,
                Err(why) => {
                    info_once("machine-msrs", || {
                        format!(
                            "kvm: {why}: the machine's MSRs (APIC base, TSC deadline, x2APIC) \
                             stay with KVM; x2APIC and TSC-deadline are not advertised to guests"
                        )
                    });
                    false
                }
            };
        let sync_all = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let caps = Caps {
            xcrs: kvm.check_extension(Cap::Xcrs),
            fpu,
            xsave_layout: XsaveLayout::from_cpuid(supported_cpuid.as_slice()),
            sync_regs: vm.check_extension_int(Cap::SyncRegs) as u32 & sync_all == sync_all,
            kernel_irqchip,
            machine_msrs,
        };

        // Real mode on VMX without unrestricted guest needs these; other
        // hosts (KVM-PVM, SVM) do not, and may refuse them.
        if let Err(e) = vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR) {
            log::debug!("kvm: KVM_SET_IDENTITY_MAP_ADDR failed ({e}); not needed on this host");
        }
        if let Err(e) = vm.set_tss_address(KVM_TSS_ADDR as usize) {
            log::debug!("kvm: KVM_SET_TSS_ADDR failed ({e}); not needed on this host");
        }

        let max_slots = kvm.get_nr_memslots();
        if mem.num_regions() > max_slots {
            return Err(BackendError::Memory(format!(
                "guest memory has {} regions but KVM offers only {max_slots} memory slots",
                mem.num_regions()
            )));
        }
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| BackendError::Memory(format!("region has no host mapping: {e}")))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` .. `host + len` is the live mmap of this region
            // of `mem`. A clone of `mem` (which keeps the mappings alive) is
            // held by this backend and by every vCPU created from it, so the
            // mapping outlives every file descriptor through which KVM can
            // reach it.
            unsafe { vm.set_user_memory_region(r) }.map_err(|e| BackendError::Kvm {
                op: "KVM_SET_USER_MEMORY_REGION",
                source: io::Error::from_raw_os_error(e.errno()),
            })?;
        }
        let run_size = kvm
            .get_vcpu_mmap_size()
            .map_err(kvm_err("KVM_GET_VCPU_MMAP_SIZE"))?;
        // The VM's TSC frequency (a VM ioctl since Linux 6.0); older
        // kernels answer it per vCPU, so the first vCPU fills it in.
        // SAFETY: KVM_GET_TSC_KHZ takes no argument and returns the
        // frequency or -1; `vm` is a VM fd.
        let khz = unsafe { vmm_sys_util::ioctl::ioctl(&vm, ioctls::KVM_GET_TSC_KHZ()) };
        Ok(KvmBackend {
            vm: Arc::new(vm),
            caps,
            supported_cpuid,
            run_size,
            irqchip: opts.irqchip,
            model: opts.cpu,
            kernel_tsc_deadline: kernel_irqchip && kvm.check_extension(Cap::TscDeadlineTimer),
            tsc_khz: AtomicU32::new(u32::try_from(khz).unwrap_or(0)),
            mem: mem.clone(),
        })
    }

    /// Like [`Backend::create_vcpu`], returning the concrete type.
    pub fn create_kvm_vcpu(&mut self, id: u32) -> Result<KvmVcpu> {
        let mut fd = self
            .vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut cpuid = self.supported_cpuid.clone();
        // TSC-deadline with the userspace LAPIC would need the model's TSC
        // to be the guest's hardware TSC (offset from host boot): not yet,
        // so it is advertised only with the in-kernel LAPIC.
        let (x2apic, tsc_deadline) = if self.caps.kernel_irqchip {
            (true, self.kernel_tsc_deadline)
        } else {
            (self.caps.machine_msrs, false)
        };
        fixup_cpuid(cpuid.as_mut_slice(), id, x2apic, tsc_deadline);
        if !self.caps.kernel_irqchip {
            let khz = self.tsc_khz.load(Ordering::Relaxed);
            fixup_tsc_leaves(cpuid.as_mut_slice(), khz, super::interp::LAPIC_TIMER_HZ);
        }

        apply_cpu_model(cpuid.as_mut_slice(), self.model);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        // What the guest will really see: KVM-PVM puts the host's
        // features back whatever duet asks for.
        let effective = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap_or(cpuid);
        let guest_xcr0 = effective
            .as_slice()
            .iter()
            .find(|e| e.function == 0xd && e.index == 0)
            .map_or(1, |e| u64::from(e.eax) | (u64::from(e.edx) << 32));
        if let Some(extra) = model_overridden(effective.as_slice(), self.model) {
            info_once("cpu-model-overridden", || {
                format!(
                    "kvm: this KVM overrides the guest's CPUID (KVM-PVM does): the guest sees \
                     {extra} beyond --cpu {}; use the interpreter backend for an exact model",
                    self.model
                )
            });
        }
        setup_machine_check(&fd);
        if self.caps.sync_regs {
            fd.set_sync_valid_reg(SyncReg::Register);
            fd.set_sync_valid_reg(SyncReg::SystemRegister);
            fd.set_sync_valid_reg(SyncReg::VcpuEvents);
        }
        if self.tsc_khz.load(Ordering::Relaxed) == 0 {
            match fd.get_tsc_khz() {
                Ok(khz) => self.tsc_khz.store(khz, Ordering::Relaxed),
                Err(e) => log::debug!("kvm: KVM_GET_TSC_KHZ failed: {e}"),
            }
        }
        let coalesced = (self.vm.check_extension(Cap::CoalescedMmio)
            && self.run_size >= (COALESCED_RING_PAGE + 1) * PAGE_SIZE)
            .then(|| {
                let base = NonNull::from(&mut *fd.get_kvm_run()).cast::<u8>();
                // SAFETY: the vCPU mapping is `run_size` bytes long (checked
                // above), so the ring page lies inside it.
                CoalescedRing(unsafe { base.add(COALESCED_RING_PAGE * PAGE_SIZE) })
            });
        let run = fd.get_kvm_run();
        let immediate_exit = NonNull::from(&mut run.immediate_exit);
        let mut vcpu = KvmVcpu {
            coalesced,
            kick: Arc::new(KvmKick::new(immediate_exit)),
            kick_unblocked_on: None,
            fd,
            id,
            caps: self.caps,
            run_size: self.run_size,
            window_requested: false,
            deferred_irq: None,
            irq_queued: false,
            run_valid: false,
            sync_fresh: false,
            halted: false,
            fallback_enabled: true,
            interp: None,
            guest_xcr0,
            exits: BTreeMap::new(),
            fallbacks: 0,
            fallback_mnemonics: HashMap::new(),
            logged_codes: HashSet::new(),
            bad_msrs: BTreeSet::new(),
            unowned_msrs: BTreeSet::new(),
            logged: BTreeSet::new(),
            mem: self.mem.clone(),
        };
        let mut reset = CpuState::reset();
        if id != 0 {
            reset.sregs.apic_base &= !(1 << 8); // BSP flag
        }
        vcpu.put_state(&reset, None)?;
        Ok(vcpu)
    }
}

/// Create KVM's PIC, IOAPIC and PIT for `IrqchipKind::Kernel`.
fn create_kernel_irqchip(kvm: &Kvm, vm: &VmFd) -> Result<()> {
    let unsupported = |what: &str| {
        BackendError::Unsupported(format!(
            "--irqchip kernel: {what}; this host's KVM cannot provide the in-kernel \
             PIC/IOAPIC/LAPIC/PIT (use --irqchip userspace, duet's own models)"
        ))
    };
    if !kvm.check_extension(Cap::Irqchip) {
        return Err(unsupported("KVM lacks KVM_CAP_IRQCHIP"));
    }
    if !kvm.check_extension(Cap::Pit2) {
        return Err(unsupported("KVM lacks KVM_CAP_PIT2"));
    }
    vm.create_irq_chip()
        .map_err(|e| unsupported(&format!("KVM_CREATE_IRQCHIP failed ({e})")))?;
    let pit = kvm_pit_config {
        flags: KERNEL_PIT_FLAGS,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| unsupported(&format!("KVM_CREATE_PIT2 failed ({e})")))?;
    set_pc_gsi_routing(vm)
        .map_err(|e| unsupported(&format!("KVM_SET_GSI_ROUTING failed ({e})")))?;
    Ok(())
}

/// The PC routing (as on duet's userspace irqchip and in QEMU): GSI n < 16
/// drives PIC input n and IOAPIC pin n, except that GSI 0 (the PIT) drives
/// IOAPIC pin 2 — the MADT's IRQ0 override; GSIs 16–23 drive IOAPIC pins.
fn set_pc_gsi_routing(vm: &VmFd) -> std::result::Result<(), vmm_sys_util::errno::Error> {
    use kvm_bindings::{
        kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
        KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQ_ROUTING_IRQCHIP,
    };
    let entry = |gsi: u32, chip: u32, pin: u32| kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    };
    let mut entries = Vec::new();
    for gsi in 0..24u32 {
        if gsi < 8 {
            entries.push(entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            entries.push(entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        if gsi == 0 {
            entries.push(entry(0, KVM_IRQCHIP_IOAPIC, 2));
        } else if gsi != 2 {
            entries.push(entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
    }
    let routing = KvmIrqRouting::from_entries(&entries)
        .map_err(|_| vmm_sys_util::errno::Error::new(libc::EINVAL))?;
    vm.set_gsi_routing(&routing)
}

/// Adjust KVM's supported CPUID for vCPU `id`: the APIC ID, and x2APIC /
/// TSC-deadline as whichever LAPIC the guest gets implements them.
fn fixup_cpuid(
    entries: &mut [kvm_bindings::kvm_cpuid_entry2],
    id: u32,
    x2apic: bool,
    tsc_deadline: bool,
) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | ((id & 0xff) << 24);
                for (bit, on) in [
                    (CPUID1_ECX_X2APIC, x2apic),
                    (CPUID1_ECX_TSC_DEADLINE, tsc_deadline),
                ] {
                    if on {
                        e.ecx |= bit;
                    } else {
                        e.ecx &= !bit;
                    }
                }
            }
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
}

/// Leaf 1 ECX bits that are instruction-set extensions (a CPU model
/// decides them): SSE3, PCLMULQDQ, SSSE3, FMA, CX16, SSE4.1, SSE4.2, MOVBE,
/// POPCNT, AES, XSAVE, OSXSAVE, AVX, F16C, RDRAND.
const LEAF1_ECX_ISA: u32 = 0x7ed8_3203;
/// 0x8000_0001 ECX bits that are instruction-set extensions: LAHF_LM, ABM
/// (LZCNT), SSE4A, MisalignSSE, 3DNowPrefetch, XOP, FMA4, TBM.
const EXT1_ECX_ISA: u32 = 0x0021_09e1;

/// Cut KVM's CPUID down to CPU model `model` (QEMU's `-cpu x86-64-vN`
/// on KVM does the same): its extensions where the host has them, no
/// leaf-7 or AVX-512 feature beyond it, and only its XSAVE components.
/// `Max` keeps everything KVM offers.
fn apply_cpu_model(
    entries: &mut [kvm_bindings::kvm_cpuid_entry2],
    model: cpu_interp::cpuid::CpuModel,
) {
    use cpu_interp::cpuid;
    if model == cpuid::CpuModel::Max {
        return;
    }
    let f = model.features();
    let (l1c, l7b, e1c, d1a) = cpuid::feature_bits(f);
    let xcr0 = cpuid::xcr0_supported(f);
    for e in entries.iter_mut() {
        match (e.function, e.index) {
            (1, _) => e.ecx &= !LEAF1_ECX_ISA | l1c | cpuid::leaf1_ecx::OSXSAVE,
            (7, 0) => {
                e.ebx &= l7b;
                e.ecx = 0;
                e.edx = 0;
            }
            (7, _) => {
                *e = kvm_bindings::kvm_cpuid_entry2 {
                    function: e.function,
                    index: e.index,
                    flags: e.flags,
                    ..Default::default()
                }
            }
            (0x8000_0001, _) => e.ecx &= !EXT1_ECX_ISA | e1c,
            (0xd, 0) => {
                e.eax &= xcr0 as u32;
                e.edx = 0;
                e.ebx = cpuid::xsave_size(xcr0 & 1);
                e.ecx = cpuid::xsave_size(xcr0);
            }
            (0xd, 1) => {
                e.eax &= d1a;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            (0xd, i) if i >= 2 && (i >= 64 || xcr0 & (1 << i) == 0) => {
                *e = kvm_bindings::kvm_cpuid_entry2 {
                    function: e.function,
                    index: e.index,
                    flags: e.flags,
                    ..Default::default()
                };
            }
            _ => {}
        }
    }
}

/// The extensions the guest's CPUID (as KVM reports it after
/// KVM_SET_CPUID2) has beyond `model`, named; `None` when it has none.
fn model_overridden(
    entries: &[kvm_bindings::kvm_cpuid_entry2],
    model: cpu_interp::cpuid::CpuModel,
) -> Option<String> {
    use cpu_interp::cpuid::{self, feat};
    if model == cpuid::CpuModel::Max {
        return None;
    }
    let get = |f: u32, i: u32| entries.iter().find(|e| e.function == f && e.index == i);
    let want = model.features();
    let names = [
        (feat::SSE3, "sse3"),
        (feat::SSSE3, "ssse3"),
        (feat::CX16, "cx16"),
        (feat::POPCNT, "popcnt"),
        (feat::SSE4_1, "sse4.1"),
        (feat::SSE4_2, "sse4.2"),
        (feat::XSAVE, "xsave"),
        (feat::AVX, "avx"),
        (feat::AVX2, "avx2"),
        (feat::FMA, "fma"),
        (feat::F16C, "f16c"),
        (feat::BMI1, "bmi1"),
        (feat::BMI2, "bmi2"),
        (feat::LZCNT, "lzcnt"),
        (feat::MOVBE, "movbe"),
        (feat::AES, "aes"),
        (feat::PCLMULQDQ, "pclmulqdq"),
    ];
    let l1 = get(1, 0).map_or(0, |e| e.ecx);
    let l7 = get(7, 0).map_or(0, |e| e.ebx);
    let e1 = get(0x8000_0001, 0).map_or(0, |e| e.ecx);
    let extra: Vec<&str> = names
        .iter()
        .filter(|(b, _)| want & b == 0)
        .filter(|(b, _)| {
            let (c, bx, x, _) = cpuid::feature_bits(*b);
            l1 & c != 0 || l7 & bx != 0 || e1 & x != 0
        })
        .map(|(_, n)| *n)
        .chain((l7 & (1 << 16) != 0).then_some("avx512f"))
        .collect();
    (!extra.is_empty()).then(|| extra.join(" "))
}

/// Leaves 0x15/0x16 describe the userspace LAPIC's timer clock as the
/// "core crystal" (Linux takes the APIC timer rate from it) and the host
/// TSC as crystal × EBX / EAX.
pub fn fixup_tsc_leaves(
    entries: &mut [kvm_bindings::kvm_cpuid_entry2],
    tsc_khz: u32,
    crystal_hz: u32,
) {
    if tsc_khz == 0 || crystal_hz < 1000 {
        return;
    }
    let gcd = |mut a: u32, mut b: u32| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a.max(1)
    };
    let crystal_khz = crystal_hz / 1000;
    let g = gcd(tsc_khz, crystal_khz);
    for e in entries.iter_mut() {
        match e.function {
            0x15 => {
                e.eax = crystal_khz / g;
                e.ebx = tsc_khz / g;
                e.ecx = crystal_hz;
                e.edx = 0;
            }
            0x16 => {
                e.eax = tsc_khz / 1000;
                e.ebx = tsc_khz / 1000;
                e.ecx = crystal_hz / 1_000_000;
                e.edx = 0;
            }
            0 => e.eax = e.eax.max(0x16),
            _ => {}
        }
    }
}

impl Backend for KvmBackend {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create_vcpu(&mut self, id: u32) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(self.create_kvm_vcpu(id)?))
    }

    /// `KVM_IRQ_LINE` on the in-kernel irqchip: GSIs 0–15 reach the PIC and
    /// the IOAPIC, 16–23 the IOAPIC (KVM's default routing).
    fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()> {
        if self.irqchip != IrqchipKind::Kernel {
            return Err(BackendError::Unsupported(
                "set_irq_line drives KVM's in-kernel irqchip, but this VM uses duet's userspace \
                 irqchip (create it with IrqchipKind::Kernel)"
                    .into(),
            ));
        }
        self.vm
            .set_irq_line(gsi, level)
            .map_err(kvm_err("KVM_IRQ_LINE"))
    }

    fn irq_sink(&self) -> Option<Arc<dyn super::GsiSink>> {
        (self.irqchip == IrqchipKind::Kernel)
            .then(|| Arc::new(KvmGsiSink(self.vm.clone())) as Arc<dyn super::GsiSink>)
    }

    fn register_coalesced_mmio(&self, base: u64, len: u64) -> Result<()> {
        if !self.vm.check_extension(Cap::CoalescedMmio) {
            // The VMM's own queue still batches; every write exits.
            return Ok(());
        }
        let len = u32::try_from(len).map_err(|_| {
            BackendError::Unsupported(format!("coalesced MMIO range of {len:#x} bytes"))
        })?;
        self.vm
            .register_coalesced_mmio(IoEventAddress::Mmio(base), len)
            .map_err(kvm_err("KVM_REGISTER_COALESCED_MMIO"))
    }

    fn tsc_khz(&self) -> Option<u32> {
        match self.tsc_khz.load(Ordering::Relaxed) {
            0 => None,
            khz => Some(khz),
        }
    }
}

/// Drives the in-kernel irqchip's GSIs (`KVM_IRQ_LINE`) from device lines.
struct KvmGsiSink(Arc<VmFd>);

impl super::GsiSink for KvmGsiSink {
    fn set_gsi(&self, gsi: u32, level: bool) {
        if let Err(e) = self.0.set_irq_line(gsi, level) {
            log::warn!("kvm: KVM_IRQ_LINE {gsi} failed: {e}");
        }
    }

    fn signal_msi(&self, msi: devices::interrupt::MsiMessage) {
        let m = kvm_bindings::kvm_msi {
            address_lo: msi.address as u32,
            address_hi: (msi.address >> 32) as u32,
            data: msi.data,
            ..Default::default()
        };
        // 0: the kernel's LAPICs refused it (e.g. software-disabled).
        if let Err(e) = self.0.signal_msi(m) {
            log::warn!(
                "kvm: KVM_SIGNAL_MSI {:#x}/{:#x} failed: {e}",
                msi.address,
                msi.data
            );
        }
    }
}

/// A vCPU on KVM.
pub struct KvmVcpu {
    /// KVM's coalesced MMIO ring, a page of `fd`'s mapping (declared
    /// before `fd`: it points into it).
    coalesced: Option<CoalescedRing>,
    fd: VcpuFd,
    id: u32,
    caps: Caps,
    /// Shared with the kickers (see [`KvmKick`]).
    kick: Arc<KvmKick>,
    /// The thread on which the kick signal was last made sure to be
    /// unblocked (vCPUs may move between threads).
    kick_unblocked_on: Option<libc::pthread_t>,
    /// Size of the kvm_run mapping (bounds the PIO data area).
    run_size: usize,
    /// The VMM asked for [`VcpuExit::InterruptWindow`].
    window_requested: bool,
    /// An interrupt accepted while the guest could not take it; queued in
    /// KVM at the first exit that finds the guest able to take it (an
    /// interrupt window is requested meanwhile).
    deferred_irq: Option<u8>,
    /// KVM_INTERRUPT was issued since the last exit (kvm_run's readiness
    /// flag is stale).
    irq_queued: bool,
    /// kvm_run's `ready_for_interrupt_injection` / `if_flag` describe the
    /// current state (false after `set_state`).
    run_valid: bool,
    /// kvm_run's sync-regs area holds the current regs, sregs and events
    /// (set by KVM_RUN, cleared by any write through ioctls).
    sync_fresh: bool,
    /// The guest executed HLT and no interrupt has been queued since.
    halted: bool,
    fallback_enabled: bool,
    /// The interpreter used for instructions KVM refuses (created on first use).
    interp: Option<Box<Cpu>>,
    /// The XSAVE state components the guest's CPUID (leaf 0xD) offers, as
    /// KVM finally set it up.
    guest_xcr0: u64,
    exits: BTreeMap<&'static str, u64>,
    fallbacks: u64,
    fallback_mnemonics: HashMap<Mnemonic, u64>,
    logged_codes: HashSet<Code>,
    /// MSRs this KVM refused to read or write.
    bad_msrs: BTreeSet<u32>,
    /// MSRs that exited to userspace and that the machine did not own (#GP).
    unowned_msrs: BTreeSet<u32>,
    /// Once-only log keys.
    logged: BTreeSet<&'static str>,
    // Last: the memory KVM's slots point into outlives the vCPU fd.
    mem: GuestMemory,
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // Kickers may outlive the vCPU: keep them off the kvm_run mapping,
        // which goes away with `fd` right after this.
        self.kick.detach();
    }
}

/// The page of the vCPU mapping that holds the coalesced MMIO ring on x86
/// (`KVM_COALESCED_MMIO_PAGE_OFFSET`).
const COALESCED_RING_PAGE: usize = kvm_bindings::KVM_COALESCED_MMIO_PAGE_OFFSET as usize;
const PAGE_SIZE: usize = 4096;

/// KVM's coalesced MMIO ring: `u32 first, last` then entries; KVM appends
/// at `last`, the VMM consumes from `first`.
struct CoalescedRing(NonNull<u8>);

// SAFETY: the ring is a page of the vCPU's own mapping, used only by the
// thread running the vCPU (the KvmVcpu is moved between threads whole).
unsafe impl Send for CoalescedRing {}

impl CoalescedRing {
    const ENTRIES: u32 = ((PAGE_SIZE - 8) / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;

    /// Hand every queued write to `io`, oldest first.
    fn drain(&self, io: &mut dyn IoHandler) {
        let base = self.0.as_ptr();
        // SAFETY: `base` points at the ring page (see its construction),
        // whose first two dwords are the indices KVM updates; they are
        // accessed atomically, as the kernel does with its barriers.
        let (first, last) = unsafe {
            (
                &*(base as *const std::sync::atomic::AtomicU32),
                &*(base.add(4) as *const std::sync::atomic::AtomicU32),
            )
        };
        loop {
            let end = last.load(Ordering::Acquire);
            let at = first.load(Ordering::Relaxed);
            if at == end || at >= Self::ENTRIES {
                return;
            }
            // SAFETY: `at` < ENTRIES, so the entry lies inside the page.
            let e: kvm_coalesced_mmio = unsafe {
                std::ptr::read_volatile(
                    base.add(8 + at as usize * std::mem::size_of::<kvm_coalesced_mmio>())
                        as *const kvm_coalesced_mmio,
                )
            };
            let len = (e.len as usize).min(e.data.len());
            io.mmio_write(e.phys_addr, &e.data[..len]);
            first.store((at + 1) % Self::ENTRIES, Ordering::Release);
        }
    }
}

/// A KVM exit, once the borrow of kvm_run it came with has ended.
enum Raw {
    /// KVM_EXIT_IO: the details are in kvm_run.
    Pio,
    /// KVM_EXIT_MMIO, already serviced.
    Mmio,
    /// KVM_EXIT_X86_RDMSR of this MSR.
    Rdmsr(u32),
    /// KVM_EXIT_X86_WRMSR of this MSR and value.
    Wrmsr(u32, u64),
    Hlt,
    IrqWindow,
    Shutdown,
    Intr,
    /// KVM_EXIT_SET_TPR: the guest lowered CR8 (synced at every exit).
    SetTpr,
    /// KVM_EXIT_INTERNAL_ERROR: the details are in kvm_run.
    Internal,
    /// Anything else, as kvm-ioctls describes it.
    Other(String),
}

/// What the run loop does after an exit.
enum Next {
    /// Keep running the guest.
    Continue,
    /// I/O was serviced; check whether the VMM wants the vCPU back.
    Serviced,
    /// Return this to the VMM.
    Return(VcpuExit),
}

impl KvmVcpu {
    /// The vCPU index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Enable or disable the interpreter fallback. Disabled, an instruction
    /// KVM cannot emulate ends the run with
    /// `Shutdown(Unrecoverable)` describing KVM's refusal.
    pub fn set_interp_fallback(&mut self, on: bool) {
        self.fallback_enabled = on;
    }

    /// Instructions executed by the interpreter fallback, by mnemonic.
    pub fn fallback_counts(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .fallback_mnemonics
            .iter()
            .map(|(m, n)| (mnemonic_name(*m), *n))
            .collect();
        v.sort();
        v
    }

    fn count(&mut self, what: &'static str) {
        *self.exits.entry(what).or_default() += 1;
    }

    fn log_once(&mut self, key: &'static str) -> bool {
        self.logged.insert(key)
    }

    // ---- the run loop ---------------------------------------------------

    fn run_loop(&mut self, io: &mut dyn IoHandler) -> Result<VcpuExit> {
        if self.halted && !self.caps.kernel_irqchip {
            if !self.wake_pending()? {
                return Ok(VcpuExit::Halted);
            }
            self.halted = false;
        }
        if self.kick.is_pending() {
            // Kicked while not in KVM_RUN: answer without entering.
            self.count("intr");
            return self.interrupted();
        }
        // Set when the VMM is to get the vCPU back after an I/O exit: KVM
        // completes the pending instruction and, because of immediate_exit,
        // returns EINTR instead of re-entering the guest.
        let mut exiting: Option<VcpuExit> = None;
        loop {
            if exiting.is_none() && self.deferred_irq.is_some() && self.ready_for_interrupt_kvm() {
                if let Some(v) = self.deferred_irq.take() {
                    self.kvm_interrupt(v)?;
                }
            }
            let want_window = self.window_requested || self.deferred_irq.is_some();
            self.fd.get_kvm_run().request_interrupt_window = u8::from(want_window);
            if exiting.is_some() {
                self.kick.set_immediate_exit();
            }
            // With duet's LAPIC, CR8 is its TPR's priority class: KVM loads
            // kvm_run.cr8 at entry and stores the guest's CR8 there at exit.
            let cr8_in = if self.caps.kernel_irqchip {
                None
            } else {
                io.cr8_read()
            };
            if let Some(c) = cr8_in {
                self.fd.get_kvm_run().cr8 = c;
            }
            // A kick from here on sets immediate_exit (KVM_RUN then returns
            // before entering the guest) or signals this thread (an
            // in-progress KVM_RUN returns EINTR).
            self.kick.enter();
            let result = self.fd.run();
            self.kick.leave();
            // Writes KVM queued without exiting come first, in order.
            if let Some(ring) = &self.coalesced {
                ring.drain(io);
            }
            let raw = match result {
                Ok(KvmExit::SetTpr) => Raw::SetTpr,
                Ok(KvmExit::IoIn(..) | KvmExit::IoOut(..)) => Raw::Pio,
                Ok(KvmExit::MmioRead(addr, data)) => {
                    io.mmio_read(addr, data);
                    Raw::Mmio
                }
                Ok(KvmExit::MmioWrite(addr, data)) => {
                    io.mmio_write(addr, data);
                    Raw::Mmio
                }
                Ok(KvmExit::X86Rdmsr(m)) => Raw::Rdmsr(m.index),
                Ok(KvmExit::X86Wrmsr(m)) => Raw::Wrmsr(m.index, m.data),
                Ok(KvmExit::Hlt) => Raw::Hlt,
                Ok(KvmExit::IrqWindowOpen) => Raw::IrqWindow,
                Ok(KvmExit::Shutdown) => Raw::Shutdown,
                Ok(KvmExit::Intr) => Raw::Intr,
                Ok(KvmExit::InternalError) => Raw::Internal,
                Ok(other) => Raw::Other(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // A kick (signal and/or immediate_exit), or our own
                    // immediate_exit after completing the I/O. `run`
                    // clears immediate_exit and the kick on return.
                    self.sync_cr8(io, cr8_in);
                    self.run_valid = true;
                    self.sync_fresh = self.caps.sync_regs;
                    self.irq_queued = false;
                    self.count(match exiting {
                        Some(VcpuExit::IoRequest) => "io-request",
                        Some(_) => "irq-window",
                        None => "intr",
                    });
                    return match exiting {
                        Some(e) => Ok(e),
                        None => self.interrupted(),
                    };
                }
                Err(e) => return Err(kvm_err("KVM_RUN")(e)),
            };
            // (An MMIO exit was serviced above already: a TPR write through
            // the MMIO page right after a MOV to CR8 with no exit between
            // lands before it. Guests do not mix the two.)
            let cr8_changed = self.sync_cr8(io, cr8_in);
            self.run_valid = true;
            self.sync_fresh = self.caps.sync_regs;
            self.irq_queued = false;
            let next = match raw {
                Raw::SetTpr => {
                    self.count("set-tpr");
                    Next::Serviced
                }
                Raw::Pio => {
                    self.count("io");
                    self.service_pio(io)?;
                    Next::Serviced
                }
                Raw::Mmio => {
                    self.count("mmio");
                    Next::Serviced
                }
                Raw::Rdmsr(index) => {
                    self.count("rdmsr");
                    self.service_msr(io, index, None)?;
                    Next::Serviced
                }
                Raw::Wrmsr(index, value) => {
                    self.count("wrmsr");
                    self.service_msr(io, index, Some(value))?;
                    Next::Serviced
                }
                Raw::Hlt => {
                    self.count("hlt");
                    self.halted = true;
                    Next::Return(VcpuExit::Halted)
                }
                Raw::IrqWindow => {
                    self.count("irq-window");
                    if let Some(v) = self.deferred_irq.take() {
                        self.kvm_interrupt(v)?;
                        Next::Continue
                    } else if self.window_requested {
                        Next::Return(VcpuExit::InterruptWindow)
                    } else {
                        Next::Continue
                    }
                }
                Raw::Shutdown => {
                    self.count("shutdown");
                    Next::Return(VcpuExit::Shutdown(ShutdownReason::TripleFault))
                }
                Raw::Intr => {
                    self.count("intr");
                    Next::Return(VcpuExit::Interrupted)
                }
                Raw::Internal => self.internal_error(io)?,
                Raw::Other(what) => {
                    let exit_reason = self.fd.get_kvm_run().exit_reason;
                    Next::Return(self.unexpected_exit(exit_reason, &what))
                }
            };
            let next = match next {
                Next::Continue if cr8_changed => Next::Serviced,
                n => n,
            };
            match next {
                Next::Continue => {}
                Next::Serviced => {
                    if io.exit_requested() {
                        exiting = Some(VcpuExit::IoRequest);
                    } else if exiting.is_none() && self.window_requested && self.window_open() {
                        // Hosts that emulate ring 0 (KVM-PVM) raise the
                        // interrupt-window exit late or miss a short window
                        // entirely: report it at any exit that sees it open.
                        exiting = Some(VcpuExit::InterruptWindow);
                    }
                }
                Next::Return(e) => {
                    if let Some(pending) = exiting {
                        // What the vCPU was leaving for stands, unless the
                        // guest itself ended.
                        if !matches!(e, VcpuExit::Shutdown(_)) {
                            return Ok(pending);
                        }
                    }
                    return Ok(e);
                }
            }
        }
    }

    /// What a kicked `run` returns: `Interrupted`, except that with the
    /// kernel irqchip a vCPU KVM holds halted (waiting in the kernel for an
    /// interrupt) reports `Halted`, so that the VMM can tell a guest that
    /// stopped (`cli; hlt`) from one that is running: kick, then look at
    /// IF in [`Vcpu::state`].
    fn interrupted(&mut self) -> Result<VcpuExit> {
        if self.caps.kernel_irqchip {
            let mp = self
                .fd
                .get_mp_state()
                .map_err(kvm_err("KVM_GET_MP_STATE"))?;
            if mp.mp_state == KVM_MP_STATE_HALTED {
                self.count("hlt-in-kernel");
                return Ok(VcpuExit::Halted);
            }
        }
        Ok(VcpuExit::Interrupted)
    }

    /// After an exit: hand a CR8 the guest changed (`kvm_run.cr8` differs
    /// from `entered`, what the VMM loaded at entry) to the LAPIC's TPR.
    /// True when it changed.
    fn sync_cr8(&mut self, io: &mut dyn IoHandler, entered: Option<u64>) -> bool {
        let Some(before) = entered else {
            return false;
        };
        let now = self.fd.get_kvm_run().cr8;
        if now == before {
            return false;
        }
        io.cr8_write(now);
        true
    }

    /// Complete the current `KVM_EXIT_X86_RDMSR` (`write` None) or
    /// `KVM_EXIT_X86_WRMSR` with the machine's answer. `Unhandled` means
    /// what KVM would have done: IA32_APIC_BASE is stored in (and read
    /// from) KVM, anything else gets #GP.
    fn service_msr(
        &mut self,
        io: &mut dyn IoHandler,
        index: u32,
        write: Option<u64>,
    ) -> Result<()> {
        let (data, fault) = match write {
            None => match io.msr_read(index) {
                MsrResult::Done(v) => (Some(v), false),
                MsrResult::Fault => (None, true),
                MsrResult::Unhandled if index == msr::APIC_BASE => {
                    (Some(self.kvm_apic_base()?), false)
                }
                MsrResult::Unhandled => {
                    self.note_unowned_msr(index, "read");
                    (None, true)
                }
            },
            Some(v) => match io.msr_write(index, v) {
                MsrResult::Done(_) => {
                    // As on the interpreter, the CPU's copy follows the
                    // machine's (so `state()` agrees).
                    if index == msr::APIC_BASE
                        && !self.store_apic_base(v)?
                        && self.log_once("apic-base-store")
                    {
                        log::debug!(
                            "kvm: KVM refused to store IA32_APIC_BASE {v:#x} accepted by the \
                             machine (logged once)"
                        );
                    }
                    (None, false)
                }
                MsrResult::Fault => (None, true),
                MsrResult::Unhandled if index == msr::APIC_BASE => {
                    (None, !self.store_apic_base(v)?)
                }
                MsrResult::Unhandled => {
                    self.note_unowned_msr(index, "write");
                    (None, true)
                }
            },
        };
        let run = self.fd.get_kvm_run();
        // SAFETY: the last KVM_RUN returned KVM_EXIT_X86_RDMSR or
        // KVM_EXIT_X86_WRMSR, so `msr` is the active member of the exit
        // union; KVM reads `error` (and `data` for reads) at the next
        // KVM_RUN, which completes the instruction.
        let m = unsafe { &mut run.__bindgen_anon_1.msr };
        if let Some(v) = data {
            m.data = v;
        }
        m.error = u8::from(fault);
        Ok(())
    }

    /// IA32_APIC_BASE as KVM holds it.
    fn kvm_apic_base(&mut self) -> Result<u64> {
        if self.sync_fresh {
            return Ok(self.fd.sync_regs().sregs.apic_base);
        }
        Ok(self
            .fd
            .get_sregs()
            .map_err(kvm_err("KVM_GET_SREGS"))?
            .apic_base)
    }

    /// Store IA32_APIC_BASE in KVM as a guest WRMSR would (the interpreter's
    /// reserved-bit check). False if the value is refused (#GP).
    fn store_apic_base(&mut self, v: u64) -> Result<bool> {
        if v & !APIC_BASE_WRITABLE != 0 {
            return Ok(false);
        }
        let entry = kvm_msr_entry {
            index: msr::APIC_BASE,
            data: v,
            ..Default::default()
        };
        let msrs = KvmMsrs::from_entries(&[entry]).map_err(fam_err("KVM_SET_MSRS"))?;
        if self.fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))? != 1 {
            return Ok(false);
        }
        if self.sync_fresh {
            // Keep the copy in kvm_run's sync area (read instead of
            // ioctls until the next exit) current. Not marked dirty: KVM
            // already has the value.
            self.fd.sync_regs_mut().sregs.apic_base = v;
        }
        Ok(true)
    }

    fn note_unowned_msr(&mut self, index: u32, what: &str) {
        if self.unowned_msrs.len() < 1024 && self.unowned_msrs.insert(index) {
            log::debug!(
                "kvm: guest {what} of MSR {index:#x}, which neither KVM nor the machine \
                 implements: #GP (logged once per MSR)"
            );
        }
    }

    /// Hand the port I/O of the current `KVM_EXIT_IO` to `io`, one element
    /// (of `size` bytes) at a time.
    fn service_pio(&mut self, io: &mut dyn IoHandler) -> Result<()> {
        let run_size = self.run_size;
        let run: &mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: the last KVM_RUN returned KVM_EXIT_IO, so `io` is the
        // active member of the exit union.
        let pio = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(pio.size);
        let count = pio.count as usize;
        let off = pio.data_offset as usize;
        let len = size.saturating_mul(count);
        if !matches!(size, 1 | 2 | 4) || off.checked_add(len).is_none_or(|end| end > run_size) {
            return Err(BackendError::Kvm {
                op: "KVM_RUN",
                source: io::Error::other(format!(
                    "malformed KVM_EXIT_IO: size {size}, count {count}, data offset {off:#x}"
                )),
            });
        }
        let base = (run as *mut kvm_run).cast::<u8>();
        // SAFETY: KVM places the `count * size` data bytes at `data_offset`
        // inside the vCPU's kvm_run mapping, whose full `run_size` bytes
        // kvm-ioctls keeps mapped for the life of `self.fd`; the bounds were
        // checked above. Nothing else references those bytes while the slice
        // lives (`run` is not used again).
        let data = unsafe { std::slice::from_raw_parts_mut(base.add(off), len) };
        let is_in = u32::from(pio.direction) == kvm_bindings::KVM_EXIT_IO_IN;
        for elem in data.chunks_exact_mut(size) {
            if is_in {
                io.pio_read(pio.port, elem);
            } else {
                io.pio_write(pio.port, elem);
            }
        }
        Ok(())
    }

    /// `KVM_EXIT_INTERNAL_ERROR`: the interpreter fallback for emulation
    /// failures, a shutdown for everything else.
    fn internal_error(&mut self, io: &mut dyn IoHandler) -> Result<Next> {
        self.count("internal-error");
        let run = self.fd.get_kvm_run();
        // SAFETY: the last KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so
        // `internal` is the active member of the exit union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data = &internal.data[..ndata];
        if internal.suberror == KVM_INTERNAL_ERROR_EMULATION && self.fallback_enabled {
            return self.fallback(io, data);
        }
        let what = match internal.suberror {
            KVM_INTERNAL_ERROR_EMULATION => "KVM could not emulate an instruction",
            KVM_INTERNAL_ERROR_SIMUL_EX => "KVM hit an exception while delivering another",
            KVM_INTERNAL_ERROR_DELIVERY_EV => "KVM could not deliver an event to the guest",
            KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "KVM got an unexpected exit reason",
            _ => "KVM internal error",
        };
        let msg = format!(
            "{what} (KVM_EXIT_INTERNAL_ERROR, suberror {}, data {})",
            internal.suberror,
            hex_words(data)
        );
        Ok(Next::Return(VcpuExit::Shutdown(
            ShutdownReason::Unrecoverable(self.with_registers(msg)),
        )))
    }

    /// Execute the instruction at RIP with the interpreter.
    fn fallback(&mut self, io: &mut dyn IoHandler, kvm_data: &[u64]) -> Result<Next> {
        let mut cpu = match self.interp.take() {
            Some(cpu) => cpu,
            None => {
                let mut c = Cpu::new(Ram::new(self.mem.clone()));
                c.set_uncached(true);
                c.set_host_features(true);
                // The guest runs on the host CPU the rest of the time.
                c.set_quirks(cpu_interp::quirks::Quirks::host());
                c.set_cpuid_config(cpu_interp::cpuid::CpuidConfig {
                    apic_id: self.id,
                    ..Default::default()
                });
                // XSETBV/XRSTOR may use every component the guest was told
                // about (KVM-PVM forces the host's AVX-512 ones in).
                c.set_xsave_components(self.guest_xcr0);
                Box::new(c)
            }
        };
        let r = self.fallback_on(&mut cpu, io, kvm_data);
        self.interp = Some(cpu);
        r
    }

    fn fallback_on(
        &mut self,
        cpu: &mut Cpu,
        io: &mut dyn IoHandler,
        kvm_data: &[u64],
    ) -> Result<Next> {
        let kvm_data = kvm_data.to_vec();
        // Every vCPU ioctl costs several microseconds on some hosts, so
        // only regs, sregs and events (free with sync regs) are read first;
        // the rest is read when the instruction may use it. Parts not read
        // keep the interpreter's previous values, which the write-back
        // below never sends to KVM unless the instruction changed them.
        let mut state = cpu.state();
        self.read_core(&mut state)?;
        cpu.set_state(&state);
        let kick = self.kick.clone();
        let mut plat = IoPlatform {
            io,
            kick: &kick.pending,
        };
        let decoded = cpu.decode_one(&mut plat);
        let full = match &decoded {
            Ok(insn) => needs_full_state(&insn.i, &state),
            Err(_) => true,
        };
        if full {
            self.read_extra(&mut state)?;
            cpu.set_state(&state);
        }
        let rip = state.regs.rip;
        let (code, mnemonic, text) = match decoded {
            Ok(insn) => {
                let (code, mnemonic) = (insn.i.code(), insn.i.mnemonic());
                let text = cpu_interp::disasm(&insn.i);
                if !cpu_interp::dispatch::implemented(code) {
                    let bytes = code_bytes(cpu, &state, insn.i.len());
                    let msg = format!(
                        "KVM cannot execute `{text}` ({code:?}) and duet's interpreter does \
                         not implement it either\n  instruction bytes: {bytes}\n  KVM \
                         emulation-failure data: {}\n{}",
                        hex_words(&kvm_data),
                        describe_state(&state)
                    );
                    return Ok(Next::Return(VcpuExit::Shutdown(
                        ShutdownReason::Unrecoverable(msg),
                    )));
                }
                (Some(code), Some(mnemonic), text)
            }
            // The interpreter cannot even fetch the instruction; `step`
            // delivers that fault to the guest as the CPU would.
            Err(exc) => (None, None, format!("(fetch fault {exc:?})")),
        };
        let exit = cpu.step(&mut plat);
        let io_requested = plat.io.exit_requested();
        let new_state = cpu.state();
        self.put_state(&new_state, Some(&state))?;
        self.fallbacks += 1;
        if let Some(m) = mnemonic {
            *self.fallback_mnemonics.entry(m).or_default() += 1;
        }
        match code {
            Some(c) if self.logged_codes.len() < 4096 && self.logged_codes.insert(c) => {
                log::info!(
                    "kvm: KVM cannot emulate `{text}` at {rip:#x}; the interpreter executes it \
                     (logged once per opcode)"
                );
            }
            None if self.log_once("fallback-fetch-fault") => {
                log::warn!(
                    "kvm: KVM failed to emulate at {rip:#x} and the interpreter could not fetch \
                     the instruction: {text}; delivered to the guest (logged once)"
                );
            }
            _ => {}
        }
        // A single step reports HLT in the state (`events.halted`).
        let halted = new_state.events.halted || matches!(exit, Some(CpuExit::Halted));
        Ok(match exit {
            Some(CpuExit::TripleFault) => {
                Next::Return(VcpuExit::Shutdown(ShutdownReason::TripleFault))
            }
            _ if halted && self.caps.kernel_irqchip => {
                // KVM's LAPIC does the waiting.
                self.flush_sync()?;
                self.sync_fresh = false;
                self.fd
                    .set_mp_state(kvm_bindings::kvm_mp_state {
                        mp_state: KVM_MP_STATE_HALTED,
                    })
                    .map_err(kvm_err("KVM_SET_MP_STATE"))?;
                Next::Continue
            }
            _ if halted => {
                self.halted = true;
                Next::Return(VcpuExit::Halted)
            }
            // Any I/O the instruction did went through `io` and is
            // complete: nothing is pending in KVM, so a VMM request can be
            // answered at once.
            _ if io_requested => Next::Return(VcpuExit::IoRequest),
            _ => Next::Continue,
        })
    }

    /// A message for an exit duet does not handle.
    fn unexpected_exit(&mut self, exit_reason: u32, what: &str) -> VcpuExit {
        let run = self.fd.get_kvm_run();
        let detail = match exit_reason {
            kvm_bindings::KVM_EXIT_FAIL_ENTRY => {
                // SAFETY: exit_reason says `fail_entry` is the active member.
                let f = unsafe { run.__bindgen_anon_1.fail_entry };
                self.count("fail-entry");
                format!(
                    "KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY): \
                     hardware_entry_failure_reason {:#x} on host CPU {}; the vCPU state is \
                     probably invalid for this host",
                    f.hardware_entry_failure_reason, f.cpu
                )
            }
            kvm_bindings::KVM_EXIT_UNKNOWN => {
                // SAFETY: exit_reason says `hw` is the active member.
                let h = unsafe { run.__bindgen_anon_1.hw };
                self.count("unknown");
                format!(
                    "KVM exit with unknown reason (KVM_EXIT_UNKNOWN): hardware_exit_reason {:#x}",
                    h.hardware_exit_reason
                )
            }
            kvm_bindings::KVM_EXIT_EXCEPTION => {
                // SAFETY: exit_reason says `ex` is the active member.
                let x = unsafe { run.__bindgen_anon_1.ex };
                self.count("exception");
                format!(
                    "KVM exit KVM_EXIT_EXCEPTION: exception {} error code {:#x}",
                    x.exception, x.error_code
                )
            }
            r => {
                self.count("other");
                format!("unexpected KVM exit reason {r}: {what}")
            }
        };
        VcpuExit::Shutdown(ShutdownReason::Unrecoverable(self.with_registers(detail)))
    }

    /// Append the register dump to `msg` (or say why there is none).
    fn with_registers(&mut self, msg: String) -> String {
        match self.get_state() {
            Ok(s) => {
                let bits = code_bits(&s);
                let bytes = self.read_code_bytes(&s, 15);
                let dis = bytes
                    .as_deref()
                    .map(|b| cpu_interp::disasm_bytes(bits, s.regs.rip, b))
                    .unwrap_or_else(|| "(unreadable)".into());
                format!("{msg}\n  instruction at RIP: {dis}\n{}", describe_state(&s))
            }
            Err(e) => format!("{msg}\n  (registers unavailable: {e})"),
        }
    }

    /// Up to `len` bytes at CS:RIP, through the interpreter's page walker
    /// (RAM only).
    fn read_code_bytes(&mut self, s: &CpuState, len: usize) -> Option<Vec<u8>> {
        let mut cpu = Cpu::new(Ram::new(self.mem.clone()));
        cpu.set_state(s);
        let mut plat = cpu_interp::NullPlatform;
        let lin0 = code_linear(s);
        let mut out = Vec::with_capacity(len);
        for k in 0..len as u64 {
            let Some(pa) = cpu.translate_debug(&mut plat, lin0.wrapping_add(k)) else {
                break;
            };
            let mut b = [0u8];
            if !cpu.ram().read(pa, &mut b) {
                break;
            }
            out.push(b[0]);
        }
        (!out.is_empty()).then_some(out)
    }

    // ---- interrupts -----------------------------------------------------

    /// Issue KVM_INTERRUPT.
    fn kvm_interrupt(&mut self, vector: u8) -> Result<()> {
        self.flush_sync()?;
        let irq = kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads one `struct kvm_interrupt`, which
        // `irq` is, from a vCPU fd, which `self.fd` is; it writes nothing.
        let ret =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, ioctls::KVM_INTERRUPT(), &irq) };
        if ret < 0 {
            return Err(BackendError::Kvm {
                op: "KVM_INTERRUPT",
                source: io::Error::last_os_error(),
            });
        }
        self.irq_queued = true;
        self.sync_fresh = false;
        Ok(())
    }

    /// At an exit: do kvm_run's flags say an interrupt could be injected
    /// (and none is held back here)?
    fn window_open(&mut self) -> bool {
        let run = self.fd.get_kvm_run();
        self.deferred_irq.is_none()
            && !self.irq_queued
            && run.ready_for_interrupt_injection != 0
            && run.if_flag != 0
    }

    /// Could KVM take an external interrupt now (ignoring `deferred_irq`)?
    fn ready_for_interrupt_kvm(&mut self) -> bool {
        if self.irq_queued {
            return false;
        }
        if self.run_valid {
            let run = self.fd.get_kvm_run();
            return run.ready_for_interrupt_injection != 0 && run.if_flag != 0;
        }
        // kvm_run's flags are stale (the state was replaced): ask KVM.
        let Ok((regs, _, ev)) = self.read_core_kvm() else {
            return false;
        };
        regs.rflags & cpu_interp::flags::IF != 0
            && ev.interrupt.shadow == 0
            && ev.interrupt.injected == 0
            && ev.exception.injected == 0
            && ev.exception.pending == 0
            && ev.nmi.injected == 0
    }

    /// After HLT: has something been queued that wakes the CPU?
    fn wake_pending(&mut self) -> Result<bool> {
        let (_, _, ev) = self.read_core_kvm()?;
        let nmi = (ev.nmi.pending != 0 || ev.nmi.injected != 0) && ev.nmi.masked == 0;
        Ok(nmi || ev.interrupt.injected != 0)
    }

    // ---- state transfer -------------------------------------------------

    /// Regs, sregs and KVM's vCPU events: from kvm_run's sync area when
    /// it is current, else through ioctls.
    fn read_core_kvm(&mut self) -> Result<(kvm_regs, kvm_sregs, kvm_vcpu_events)> {
        if self.sync_fresh {
            let sync = self.fd.sync_regs();
            return Ok((sync.regs, sync.sregs, sync.events));
        }
        Ok((
            self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            self.fd
                .get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
        ))
    }

    /// Fill `s.regs`, `s.sregs` and `s.events` (halted from our flag).
    fn read_core(&mut self, s: &mut CpuState) -> Result<()> {
        let (regs, sregs, ev) = self.read_core_kvm()?;
        if (ev.exception.injected != 0 || ev.exception.pending != 0)
            && self.log_once("exception-dropped")
        {
            log::debug!(
                "kvm: vCPU state read while KVM holds exception {} for delivery; the neutral \
                 state cannot carry it (logged once)",
                ev.exception.nr
            );
        }
        s.regs = regs_from_kvm(&regs);
        s.sregs = sregs_from_kvm(&sregs);
        s.events = events_from_kvm(&ev);
        if s.events.interrupt.is_none() {
            s.events.interrupt = self.deferred_irq;
        }
        s.events.halted = self.halted;
        Ok(())
    }

    /// Fill the rest: FPU, debug registers, XCR0, MSRs and the TSC.
    fn read_extra(&mut self, s: &mut CpuState) -> Result<()> {
        (s.fpu, s.xstate) = self.read_fpu()?;
        s.debug = debugregs_from_kvm(
            &self
                .fd
                .get_debug_regs()
                .map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
        );
        s.xcr0 = if self.caps.xcrs {
            xcr0_from_kvm(&self.fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?)
        } else {
            1
        };
        let entries = self.get_msrs(&STATE_MSRS)?;
        let (msrs, tsc) = msrs_from_entries(&entries, Msrs::default());
        s.msrs = msrs;
        s.tsc = tsc.unwrap_or(0);
        Ok(())
    }

    fn get_state(&mut self) -> Result<CpuState> {
        let mut s = CpuState::default();
        self.read_core(&mut s)?;
        self.read_extra(&mut s)?;
        let mp = self
            .fd
            .get_mp_state()
            .map_err(kvm_err("KVM_GET_MP_STATE"))?;
        s.events.halted |= mp.mp_state == KVM_MP_STATE_HALTED;
        Ok(s)
    }

    /// Write `s` to KVM. With `current` (what KVM holds now, just read),
    /// only the parts that differ are written and the TSC is left running:
    /// the fallback's write-back after one interpreted instruction. That
    /// write-back goes through kvm_run's sync-regs area where possible
    /// (KVM applies it at the next KVM_RUN; see [`Self::flush_sync`]).
    fn put_state(&mut self, s: &CpuState, current: Option<&CpuState>) -> Result<()> {
        // Through sync regs only right after an exit (the area is current).
        let via_sync = current.is_some() && self.sync_fresh;
        if current.is_none() {
            // Everything is rewritten below: pending sync writes are moot.
            self.fd.get_kvm_run().kvm_dirty_regs = 0;
        }

        // An interrupt the guest cannot take yet stays here: KVM would
        // inject whatever is queued at the next entry regardless of IF.
        let mut events = s.events;
        self.deferred_irq = None;
        let can_take = s.regs.rflags & cpu_interp::flags::IF != 0
            && !s.events.sti_shadow
            && !s.events.mov_ss_shadow;
        if let Some(v) = events.interrupt {
            if !can_take && !self.caps.kernel_irqchip {
                self.deferred_irq = Some(v);
                events.interrupt = None;
            }
        }
        let sregs_changed = current.is_none_or(|c| c.sregs != s.sregs);
        let regs_changed = current.is_none_or(|c| c.regs != s.regs);
        let events_changed = current.is_none_or(|c| {
            c.events != s.events || (c.regs.rflags ^ s.regs.rflags) & cpu_interp::flags::IF != 0
        });

        if via_sync {
            let sync = self.fd.sync_regs_mut();
            if sregs_changed {
                sync.sregs = sregs_to_kvm(&s.sregs);
            }
            if regs_changed {
                sync.regs = regs_to_kvm(&s.regs);
            }
            if events_changed {
                sync.events = events_to_kvm(&events);
            }
            for (changed, reg) in [
                (sregs_changed, SyncReg::SystemRegister),
                (regs_changed, SyncReg::Register),
                (events_changed, SyncReg::VcpuEvents),
            ] {
                if changed {
                    self.fd.set_sync_dirty_reg(reg);
                }
            }
        } else {
            if sregs_changed {
                self.fd
                    .set_sregs(&sregs_to_kvm(&s.sregs))
                    .map_err(kvm_err("KVM_SET_SREGS"))?;
            }
            if regs_changed {
                self.fd
                    .set_regs(&regs_to_kvm(&s.regs))
                    .map_err(kvm_err("KVM_SET_REGS"))?;
            }
        }
        // Without an in-kernel LAPIC KVM_RUN loads CR8 from kvm_run.cr8
        // (the TPR userspace owns): a stale value there would overwrite the
        // CR8 just set with the sregs.
        if !self.caps.kernel_irqchip {
            self.fd.get_kvm_run().cr8 = s.sregs.cr8;
        }
        if current.is_none_or(|c| c.fpu != s.fpu || c.xstate != s.xstate) {
            self.write_fpu(&s.fpu, &s.xstate)?;
        }
        if self.caps.xcrs && current.is_none_or(|c| c.xcr0 != s.xcr0) {
            self.fd
                .set_xcrs(&xcr0_to_kvm(s.xcr0))
                .map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        let mut entries = msrs_to_entries(&s.msrs, current.is_none().then_some(s.tsc));
        if let Some(c) = current {
            let old = msrs_to_entries(&c.msrs, None);
            entries.retain(|e| !old.iter().any(|o| o.index == e.index && o.data == e.data));
        }
        self.set_msrs(&entries)?;
        if current.is_none_or(|c| c.debug != s.debug) {
            self.fd
                .set_debug_regs(&debugregs_to_kvm(&s.debug))
                .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        }
        if !via_sync && events_changed {
            self.fd
                .set_vcpu_events(&events_to_kvm(&events))
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        // Without an in-kernel LAPIC KVM only accepts RUNNABLE; halted is
        // kept in `self.halted`. With one, KVM keeps it.
        if current.is_none() {
            let kernel_halt = self.caps.kernel_irqchip && s.events.halted;
            if let Err(e) = self.fd.set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: if kernel_halt {
                    KVM_MP_STATE_HALTED
                } else {
                    KVM_MP_STATE_RUNNABLE
                },
            }) {
                if self.log_once("mp-state") {
                    log::debug!("kvm: KVM_SET_MP_STATE failed: {e} (logged once)");
                }
            }
        }
        self.halted = s.events.halted && !self.caps.kernel_irqchip;
        self.run_valid = false;
        self.sync_fresh = via_sync;
        self.irq_queued = false;
        Ok(())
    }

    /// Hand writes still waiting in kvm_run's sync-regs area to KVM through
    /// ioctls, before an ioctl that would be overtaken by them at the next
    /// KVM_RUN (KVM_INTERRUPT, KVM_NMI) or that reads state behind them.
    fn flush_sync(&mut self) -> Result<()> {
        let dirty = std::mem::take(&mut self.fd.get_kvm_run().kvm_dirty_regs);
        if dirty == 0 {
            return Ok(());
        }
        let sync = self.fd.sync_regs();
        if dirty & u64::from(KVM_SYNC_X86_SREGS) != 0 {
            self.fd
                .set_sregs(&sync.sregs)
                .map_err(kvm_err("KVM_SET_SREGS"))?;
        }
        if dirty & u64::from(KVM_SYNC_X86_REGS) != 0 {
            self.fd
                .set_regs(&sync.regs)
                .map_err(kvm_err("KVM_SET_REGS"))?;
        }
        if dirty & u64::from(KVM_SYNC_X86_EVENTS) != 0 {
            self.fd
                .set_vcpu_events(&sync.events)
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }

    /// A buffer of the size KVM_GET/SET_XSAVE2 use.
    fn xsave_buffer(size: usize) -> Result<Xsave> {
        let words = size
            .saturating_sub(std::mem::size_of::<kvm_xsave>())
            .div_ceil(4);
        Xsave::new(words).map_err(fam_err("KVM_GET_XSAVE2"))
    }

    /// The x87/SSE/AVX state and the other XSAVE components (see
    /// [`FpuApi`]; KVM_GET_FPU carries no AVX state).
    fn read_fpu(&mut self) -> Result<(FpuState, XState)> {
        let layout = self.caps.xsave_layout;
        match self.caps.fpu {
            FpuApi::Fpu => {
                let k = self.fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
                Ok((fpu_from_kvm(&k), XState::default()))
            }
            FpuApi::Xsave => {
                let x = self.fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
                Ok(xsave_image_to_state(&x.region, &layout))
            }
            FpuApi::Xsave2(size) => {
                let mut x = Self::xsave_buffer(size)?;
                // SAFETY: `x` holds the `size` bytes KVM_CAP_XSAVE2 reported
                // for this VM (duet enables no XSTATE features dynamically
                // afterwards), so the kernel writes within it.
                unsafe { self.fd.get_xsave2(&mut x) }.map_err(kvm_err("KVM_GET_XSAVE2"))?;
                Ok(xsave_image_to_state(
                    &x.as_fam_struct_ref().xsave.region,
                    &layout,
                ))
            }
        }
    }

    /// Replace the x87/SSE/AVX state and the XSAVE components duet carries
    /// (AVX-512, PKRU). Components duet does not know are read first and
    /// written back unchanged.
    fn write_fpu(&mut self, f: &FpuState, x: &XState) -> Result<()> {
        let layout = self.caps.xsave_layout;
        match self.caps.fpu {
            FpuApi::Fpu => self
                .fd
                .set_fpu(&fpu_to_kvm(f))
                .map_err(kvm_err("KVM_SET_FPU")),
            FpuApi::Xsave => {
                let mut img = self.fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
                state_to_xsave_image(f, x, &layout, &mut img.region);
                // SAFETY: without KVM_CAP_XSAVE2 (pre-5.17 kernels) KVM
                // reads exactly `sizeof(struct kvm_xsave)` bytes, which `img` is.
                unsafe { self.fd.set_xsave(&img) }.map_err(kvm_err("KVM_SET_XSAVE"))
            }
            FpuApi::Xsave2(size) => {
                let mut img = Self::xsave_buffer(size)?;
                // SAFETY: as in `read_fpu`: `img` has the size KVM reported.
                unsafe { self.fd.get_xsave2(&mut img) }.map_err(kvm_err("KVM_GET_XSAVE2"))?;
                // SAFETY: only the fixed-size head of the structure is
                // modified; its length field is left alone.
                let region = unsafe { &mut img.as_mut_fam_struct().xsave.region };
                state_to_xsave_image(f, x, &layout, region);
                // SAFETY: `img` has the size KVM_CAP_XSAVE2 reported, so KVM
                // reads within it.
                unsafe { self.fd.set_xsave2(&img) }.map_err(kvm_err("KVM_SET_XSAVE2"))
            }
        }
    }

    /// Read the MSRs in `indices` that this KVM supports.
    fn get_msrs(&mut self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
        let mut want: Vec<u32> = indices
            .iter()
            .copied()
            .filter(|i| !self.bad_msrs.contains(i))
            .collect();
        loop {
            let entries: Vec<kvm_msr_entry> = want
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = KvmMsrs::from_entries(&entries).map_err(fam_err("KVM_GET_MSRS"))?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(kvm_err("KVM_GET_MSRS"))?;
            if n >= want.len() {
                return Ok(msrs.as_slice().to_vec());
            }
            let bad = want.remove(n);
            self.note_bad_msr(bad, "read");
        }
    }

    /// Write the MSRs in `entries` that this KVM supports.
    fn set_msrs(&mut self, entries: &[kvm_msr_entry]) -> Result<()> {
        let mut todo: Vec<kvm_msr_entry> = entries
            .iter()
            .copied()
            .filter(|e| !self.bad_msrs.contains(&e.index))
            .collect();
        while !todo.is_empty() {
            let msrs = KvmMsrs::from_entries(&todo).map_err(fam_err("KVM_SET_MSRS"))?;
            let n = self.fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
            if n >= todo.len() {
                break;
            }
            let bad = todo.remove(n);
            if bad.data != 0 && !self.bad_msrs.contains(&bad.index) {
                // A value that matters is lost in the move to KVM: say so
                // (once per MSR), never drop it silently.
                log::warn!(
                    "kvm: this KVM refuses MSR {:#x} = {:#x}; the guest loses that value \
                     (logged once per MSR)",
                    bad.index,
                    bad.data
                );
            }
            self.note_bad_msr(bad.index, "write");
            todo.drain(..n);
        }
        Ok(())
    }

    fn note_bad_msr(&mut self, index: u32, what: &str) {
        if self.bad_msrs.insert(index) {
            log::debug!(
                "kvm: this KVM refuses to {what} MSR {index:#x}; it is not transferred \
                 (logged once)"
            );
        }
    }
}

fn fam_err(op: &'static str) -> impl FnOnce(vmm_sys_util::fam::Error) -> BackendError {
    move |e| BackendError::Kvm {
        op,
        source: io::Error::other(format!("{e:?}")),
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self, io: &mut dyn IoHandler) -> Result<VcpuExit> {
        self.kick.unblock_here(&mut self.kick_unblocked_on);
        let r = self.run_loop(io);
        // Whatever this returns answers the kicks made so far; clearing
        // immediate_exit here also ends our own use of it.
        self.kick.consume();
        r
    }

    fn state(&mut self) -> Result<CpuState> {
        self.get_state()
    }

    fn set_state(&mut self, state: &CpuState) -> Result<()> {
        self.put_state(state, None)
    }

    fn regs(&mut self) -> Result<Regs> {
        if self.sync_fresh {
            return Ok(regs_from_kvm(&self.fd.sync_regs().regs));
        }
        Ok(regs_from_kvm(
            &self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
        ))
    }

    fn sregs(&mut self) -> Result<Sregs> {
        if self.sync_fresh {
            return Ok(sregs_from_kvm(&self.fd.sync_regs().sregs));
        }
        Ok(sregs_from_kvm(
            &self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
        ))
    }

    /// Always false with the kernel irqchip (KVM injects by itself).
    fn ready_for_interrupt(&mut self) -> bool {
        !self.caps.kernel_irqchip && self.deferred_irq.is_none() && self.ready_for_interrupt_kvm()
    }

    /// An error with the kernel irqchip: raise a line with
    /// [`Backend::set_irq_line`] instead.
    fn inject_interrupt(&mut self, vector: u8) -> Result<()> {
        if self.caps.kernel_irqchip {
            return Err(BackendError::Unsupported(format!(
                "inject_interrupt({vector:#x}): this VM uses KVM's in-kernel irqchip, which \
                 injects interrupts itself; raise an interrupt line with set_irq_line"
            )));
        }
        if self.ready_for_interrupt() {
            self.kvm_interrupt(vector)
        } else {
            if let Some(old) = self.deferred_irq.replace(vector) {
                log::debug!("kvm: interrupt {old:#x} replaced by {vector:#x} before delivery");
            }
            Ok(())
        }
    }

    fn inject_nmi(&mut self) -> Result<()> {
        self.flush_sync()?;
        self.sync_fresh = false;
        self.fd.nmi().map_err(kvm_err("KVM_NMI"))
    }

    /// Ignored with the kernel irqchip (KVM opens its own windows; `run`
    /// never returns `InterruptWindow` then).
    fn request_interrupt_window(&mut self, on: bool) {
        self.window_requested = on && !self.caps.kernel_irqchip;
    }

    fn stats(&self) -> VcpuStats {
        let mut exits: Vec<(String, u64)> = self
            .exits
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        exits.extend(
            self.fallback_counts()
                .into_iter()
                .map(|(m, n)| (format!("fallback:{m}"), n)),
        );
        VcpuStats {
            instructions: None,
            exits,
            interp_fallbacks: self.fallbacks,
            ..Default::default()
        }
    }

    /// Sets `kvm_run.immediate_exit` and signals the vCPU thread if it is
    /// inside `KVM_RUN` (see `KvmKick` in this module); usable from any
    /// thread, also after the vCPU is gone (then it does nothing).
    fn kicker(&self) -> Arc<dyn Kick> {
        self.kick.clone()
    }
}

/// Might executing `i` (or delivering an exception it raises) read or
/// write state beyond regs, sregs and events — FPU/SSE, MSRs, the TSC,
/// debug registers, XCR0? Conservative: only plain integer and system
/// instructions that touch none of these answer false.
fn needs_full_state(i: &iced_x86::Instruction, s: &CpuState) -> bool {
    use iced_x86::CpuidFeature as F;
    if s.regs.rflags & cpu_interp::flags::TF != 0 {
        return true; // single-step #DB updates DR6
    }
    let plain = i.cpuid_features().iter().all(|f| {
        matches!(
            f,
            F::INTEL8086
                | F::INTEL8086_ONLY
                | F::INTEL186
                | F::INTEL286
                | F::INTEL286_ONLY
                | F::INTEL386
                | F::INTEL386_ONLY
                | F::INTEL486
                | F::X64
                | F::CMOV
                | F::CX8
                | F::CMPXCHG16B
                | F::POPCNT
                | F::LZCNT
                | F::BMI1
                | F::BMI2
                | F::ADX
                | F::MOVBE
                | F::SMAP
                | F::INVPCID
                | F::CLFSH
                | F::CLFLUSHOPT
                | F::CLWB
                | F::PAUSE
                | F::MULTIBYTENOP
        )
    });
    let touches_dr = (0..i.op_count())
        .any(|n| i.op_kind(n) == iced_x86::OpKind::Register && i.op_register(n).is_dr());
    !plain || touches_dr || matches!(i.mnemonic(), Mnemonic::Swapgs)
}

// ---- messages -----------------------------------------------------------

fn mnemonic_name(m: Mnemonic) -> String {
    format!("{m:?}").to_lowercase()
}

fn hex_words(data: &[u64]) -> String {
    if data.is_empty() {
        return "(none)".into();
    }
    data.iter()
        .map(|w| format!("{w:#x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Default code size for `s`, as the interpreter decides it.
fn code_bits(s: &CpuState) -> u32 {
    let pe = s.sregs.cr0 & cpu_interp::cpu::CR0_PE != 0;
    if pe && s.sregs.efer & cpu_interp::cpu::EFER_LMA != 0 && s.sregs.cs.l {
        64
    } else if s.regs.rflags & cpu_interp::flags::VM != 0 {
        16
    } else if s.sregs.cs.db {
        32
    } else {
        16
    }
}

/// Linear address of CS:RIP.
fn code_linear(s: &CpuState) -> u64 {
    if code_bits(s) == 64 {
        s.regs.rip
    } else {
        s.sregs.cs.base.wrapping_add(s.regs.rip) & 0xffff_ffff
    }
}

/// The instruction bytes at CS:RIP as hex, for messages (RAM only: page
/// tables or code outside RAM show as `??` rather than cause device reads).
fn code_bytes(cpu: &mut Cpu, s: &CpuState, len: usize) -> String {
    let lin0 = code_linear(s);
    let mut out = Vec::new();
    for k in 0..len as u64 {
        let Some(pa) = cpu.translate_debug(&mut cpu_interp::NullPlatform, lin0.wrapping_add(k))
        else {
            out.push("??".to_string());
            continue;
        };
        let mut b = [0u8];
        if cpu.ram().read(pa, &mut b) {
            out.push(format!("{:02x}", b[0]));
        } else {
            out.push("??".to_string());
        }
    }
    out.join(" ")
}

/// Registers for an error message.
fn describe_state(s: &CpuState) -> String {
    use cpu_interp::state::gpr::*;
    let g = &s.regs.gpr;
    let sr = &s.sregs;
    format!(
        "  RIP={:#018x} RSP={:#018x} RFLAGS={:#010x}\n  CR0={:#010x} CR2={:#x} CR3={:#x} \
         CR4={:#x} EFER={:#x}\n  CS={:#06x} (base {:#x} limit {:#x} type {:#x} dpl {} l {} db {}) \
         SS={:#06x} DS={:#06x} ES={:#06x} FS={:#06x} GS={:#06x}\n  RAX={:#018x} RBX={:#018x} \
         RCX={:#018x} RDX={:#018x}\n  RSI={:#018x} RDI={:#018x} RBP={:#018x} R8={:#018x}\n  \
         R9={:#018x} R10={:#018x} R11={:#018x} R12={:#018x}\n  R13={:#018x} R14={:#018x} \
         R15={:#018x}",
        s.regs.rip,
        g[RSP],
        s.regs.rflags,
        sr.cr0,
        sr.cr2,
        sr.cr3,
        sr.cr4,
        sr.efer,
        sr.cs.selector,
        sr.cs.base,
        sr.cs.limit,
        sr.cs.type_,
        sr.cs.dpl,
        u8::from(sr.cs.l),
        u8::from(sr.cs.db),
        sr.ss.selector,
        sr.ds.selector,
        sr.es.selector,
        sr.fs.selector,
        sr.gs.selector,
        g[RAX],
        g[RBX],
        g[RCX],
        g[RDX],
        g[RSI],
        g[RDI],
        g[RBP],
        g[R8],
        g[R9],
        g[R10],
        g[R11],
        g[R12],
        g[R13],
        g[R14],
        g[R15],
    )
}

// ---- conversions between kvm-bindings and the neutral state --------------

fn regs_to_kvm(r: &Regs) -> kvm_regs {
    use cpu_interp::state::gpr::*;
    let g = &r.gpr;
    kvm_regs {
        rax: g[RAX],
        rbx: g[RBX],
        rcx: g[RCX],
        rdx: g[RDX],
        rsi: g[RSI],
        rdi: g[RDI],
        rsp: g[RSP],
        rbp: g[RBP],
        r8: g[R8],
        r9: g[R9],
        r10: g[R10],
        r11: g[R11],
        r12: g[R12],
        r13: g[R13],
        r14: g[R14],
        r15: g[R15],
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn regs_from_kvm(k: &kvm_regs) -> Regs {
    Regs {
        gpr: [
            k.rax, k.rcx, k.rdx, k.rbx, k.rsp, k.rbp, k.rsi, k.rdi, k.r8, k.r9, k.r10, k.r11,
            k.r12, k.r13, k.r14, k.r15,
        ],
        rip: k.rip,
        rflags: k.rflags,
    }
}

/// kvm_segment's limit is byte-granular like [`Segment::limit`], and its
/// `unusable` flag means the same thing.
fn segment_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

fn segment_from_kvm(k: &kvm_segment) -> Segment {
    Segment {
        selector: k.selector,
        base: k.base,
        limit: k.limit,
        type_: k.type_ & 0xf,
        s: k.s != 0,
        dpl: k.dpl & 3,
        present: k.present != 0,
        avl: k.avl != 0,
        l: k.l != 0,
        db: k.db != 0,
        g: k.g != 0,
        unusable: k.unusable != 0,
    }
}

fn dtable_to_kvm(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

fn dtable_from_kvm(k: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: k.base,
        limit: k.limit,
    }
}

/// `interrupt_bitmap` stays empty: a queued interrupt travels in the vCPU
/// events instead.
fn sregs_to_kvm(s: &Sregs) -> kvm_sregs {
    kvm_sregs {
        cs: segment_to_kvm(&s.cs),
        ds: segment_to_kvm(&s.ds),
        es: segment_to_kvm(&s.es),
        fs: segment_to_kvm(&s.fs),
        gs: segment_to_kvm(&s.gs),
        ss: segment_to_kvm(&s.ss),
        tr: segment_to_kvm(&s.tr),
        ldt: segment_to_kvm(&s.ldt),
        gdt: dtable_to_kvm(&s.gdt),
        idt: dtable_to_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: [0; 4],
    }
}

fn sregs_from_kvm(k: &kvm_sregs) -> Sregs {
    Sregs {
        cs: segment_from_kvm(&k.cs),
        ds: segment_from_kvm(&k.ds),
        es: segment_from_kvm(&k.es),
        fs: segment_from_kvm(&k.fs),
        gs: segment_from_kvm(&k.gs),
        ss: segment_from_kvm(&k.ss),
        tr: segment_from_kvm(&k.tr),
        ldt: segment_from_kvm(&k.ldt),
        gdt: dtable_from_kvm(&k.gdt),
        idt: dtable_from_kvm(&k.idt),
        cr0: k.cr0,
        cr2: k.cr2,
        cr3: k.cr3,
        cr4: k.cr4,
        cr8: k.cr8,
        efer: k.efer,
        apic_base: k.apic_base,
    }
}

/// x87 tag of an 80-bit register's contents, as FXRSTOR / FSTENV compute
/// it: 0 valid, 1 zero, 2 special (NaN, infinity, denormal, unnormal).
fn x87_tag(v: &[u8; 10]) -> u16 {
    let mut m = [0u8; 8];
    m.copy_from_slice(&v[..8]);
    let mant = u64::from_le_bytes(m);
    let exp = u16::from_le_bytes([v[8], v[9]]) & 0x7fff;
    match exp {
        0x7fff => 2,
        0 if mant == 0 => 1,
        0 => 2,
        _ if mant >> 63 == 0 => 2,
        _ => 0,
    }
}

/// Full tag word → FXSAVE's abridged tag byte (bit i set: R_i not empty).
fn abridged_tag(ftw: u16) -> u8 {
    (0..8).fold(0u8, |acc, r| {
        if (ftw >> (2 * r)) & 3 != 3 {
            acc | (1 << r)
        } else {
            acc
        }
    })
}

/// Abridged tag byte → full tag word, classifying every non-empty physical
/// register by its contents (`st` in physical order).
fn full_tag(abridged: u8, st: &[[u8; 10]; 8]) -> u16 {
    (0..8).fold(0u16, |acc, r| {
        let tag = if abridged & (1 << r) == 0 {
            3
        } else {
            x87_tag(&st[r])
        };
        acc | (tag << (2 * r))
    })
}

/// `kvm_fpu` (FXSAVE layout) from the neutral state.
///
/// `kvm_fpu.fpr[i]` holds ST(i), i.e. by stack position, while
/// [`FpuState::st`] holds the physical registers R0..R7. With TOP = FSW
/// bits 13:11, ST(i) = R[(TOP + i) % 8]. The tag word is abridged (one
/// "not empty" bit per physical register); converting back recomputes the
/// full tags from the register contents the way FXRSTOR does, so a full tag
/// word that disagrees with the contents (e.g. "valid" for a zero) does not
/// survive the round trip — exactly as on hardware.
fn fpu_to_kvm(f: &FpuState) -> kvm_fpu {
    let top = usize::from((f.fsw >> 11) & 7);
    let mut fpr = [[0u8; 16]; 8];
    for (i, slot) in fpr.iter_mut().enumerate() {
        slot[..10].copy_from_slice(&f.st[(top + i) % 8]);
    }
    let mut xmm = [[0u8; 16]; 16];
    for (dst, src) in xmm.iter_mut().zip(f.xmm.iter()) {
        *dst = src.to_le_bytes();
    }
    kvm_fpu {
        fpr,
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: abridged_tag(f.ftw),
        pad1: 0,
        last_opcode: f.fop,
        last_ip: f.fip,
        last_dp: f.fdp,
        xmm,
        mxcsr: f.mxcsr,
        pad2: 0,
    }
}

/// The neutral FPU state from `kvm_fpu`; see [`fpu_to_kvm`].
fn fpu_from_kvm(k: &kvm_fpu) -> FpuState {
    let top = usize::from((k.fsw >> 11) & 7);
    let mut st = [[0u8; 10]; 8];
    for (i, slot) in k.fpr.iter().enumerate() {
        st[(top + i) % 8].copy_from_slice(&slot[..10]);
    }
    let mut xmm = [0u128; 16];
    for (dst, src) in xmm.iter_mut().zip(k.xmm.iter()) {
        *dst = u128::from_le_bytes(*src);
    }
    FpuState {
        ftw: full_tag(k.ftwx, &st),
        st,
        fcw: k.fcw,
        fsw: k.fsw,
        fop: k.last_opcode,
        fip: k.last_ip,
        fdp: k.last_dp,
        xmm,
        mxcsr: k.mxcsr,
        ymm_hi: [0; 16],
    }
}

/// Byte offsets in the FXSAVE image (the legacy region of an XSAVE area).
mod fx {
    pub const FCW: usize = 0;
    pub const FSW: usize = 2;
    pub const FTW: usize = 4;
    pub const FOP: usize = 6;
    pub const FIP: usize = 8;
    pub const FDP: usize = 16;
    pub const MXCSR: usize = 24;
    pub const ST: usize = 32;
    pub const XMM: usize = 160;
    pub const LEGACY_END: usize = 512;
    /// XSTATE_BV in the XSAVE header.
    pub const XSTATE_BV: usize = 512;
    /// XSTATE_BV bits of the legacy components: x87 and SSE.
    pub const BV_LEGACY: u64 = 0b11;
}

/// The first `n` bytes of an XSAVE region given as little-endian words.
fn region_bytes(region: &[u32], n: usize) -> Vec<u8> {
    region
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .take(n)
        .collect()
}

/// The legacy (FXSAVE-format, 64-bit FIP/FDP) part of an XSAVE region as a
/// `kvm_fpu`, MXCSR included.
fn fxsave_to_kvm_fpu(region: &[u32]) -> kvm_fpu {
    let b = region_bytes(region, fx::LEGACY_END);
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
    let mut k = kvm_fpu {
        fcw: u16_at(fx::FCW),
        fsw: u16_at(fx::FSW),
        ftwx: b[fx::FTW],
        last_opcode: u16_at(fx::FOP),
        last_ip: u64_at(fx::FIP),
        last_dp: u64_at(fx::FDP),
        mxcsr: u32_at(fx::MXCSR),
        ..Default::default()
    };
    for (i, r) in k.fpr.iter_mut().enumerate() {
        r.copy_from_slice(&b[fx::ST + 16 * i..fx::ST + 16 * i + 16]);
    }
    for (i, r) in k.xmm.iter_mut().enumerate() {
        r.copy_from_slice(&b[fx::XMM + 16 * i..fx::XMM + 16 * i + 16]);
    }
    k
}

/// Write `k` into the legacy part of an XSAVE region and mark the x87 and
/// SSE components as present in XSTATE_BV (otherwise XRSTOR would load
/// their initial state instead). MXCSR_MASK and the reserved bytes are kept.
fn kvm_fpu_to_fxsave(k: &kvm_fpu, region: &mut [u32]) {
    let mut b = region_bytes(region, fx::XSTATE_BV + 8);
    b[fx::FCW..fx::FCW + 2].copy_from_slice(&k.fcw.to_le_bytes());
    b[fx::FSW..fx::FSW + 2].copy_from_slice(&k.fsw.to_le_bytes());
    b[fx::FTW] = k.ftwx;
    b[fx::FTW + 1] = 0;
    b[fx::FOP..fx::FOP + 2].copy_from_slice(&k.last_opcode.to_le_bytes());
    b[fx::FIP..fx::FIP + 8].copy_from_slice(&k.last_ip.to_le_bytes());
    b[fx::FDP..fx::FDP + 8].copy_from_slice(&k.last_dp.to_le_bytes());
    b[fx::MXCSR..fx::MXCSR + 4].copy_from_slice(&k.mxcsr.to_le_bytes());
    for (i, r) in k.fpr.iter().enumerate() {
        b[fx::ST + 16 * i..fx::ST + 16 * i + 16].copy_from_slice(r);
    }
    for (i, r) in k.xmm.iter().enumerate() {
        b[fx::XMM + 16 * i..fx::XMM + 16 * i + 16].copy_from_slice(r);
    }
    let mut bv = [0u8; 8];
    bv.copy_from_slice(&b[fx::XSTATE_BV..fx::XSTATE_BV + 8]);
    let bv = u64::from_le_bytes(bv) | fx::BV_LEGACY;
    b[fx::XSTATE_BV..fx::XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    for (w, chunk) in region.iter_mut().zip(b.chunks_exact(4)) {
        *w = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
}

/// XSAVE state components duet moves beyond x87 and SSE.
pub mod xcomp {
    pub const AVX: usize = 2;
    pub const OPMASK: usize = 5;
    pub const ZMM_HI256: usize = 6;
    pub const HI16_ZMM: usize = 7;
    pub const PKRU: usize = 9;
    /// Every component duet carries (x87, SSE and the above).
    pub const CARRIED: u64 = 0b10_1110_0111;
}

/// Offsets and sizes of XSAVE state components in the standard-format
/// image KVM_GET/SET_XSAVE use (CPUID.(0xD, i):EBX / EAX of the host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XsaveLayout {
    /// (offset, size) per component; size 0 when absent.
    comps: [(usize, usize); 10],
}

impl XsaveLayout {
    /// The architectural offsets (the same on Intel and AMD processors).
    pub const STANDARD: XsaveLayout = XsaveLayout {
        comps: [
            (0, 160),
            (160, 256),
            (576, 256),
            (0, 0),
            (0, 0),
            (1088, 64),
            (1152, 512),
            (1664, 1024),
            (0, 0),
            (2688, 8),
        ],
    };

    /// From CPUID leaf 0xD as KVM reports it; components with an
    /// unexpected size are dropped (never carried).
    fn from_cpuid(entries: &[kvm_bindings::kvm_cpuid_entry2]) -> Self {
        let mut l = XsaveLayout {
            comps: [(0, 0); 10],
        };
        l.comps[0] = (0, 160);
        l.comps[1] = (160, 256);
        for i in [
            xcomp::AVX,
            xcomp::OPMASK,
            xcomp::ZMM_HI256,
            xcomp::HI16_ZMM,
            xcomp::PKRU,
        ] {
            let want = Self::STANDARD.comps[i].1;
            if let Some(e) = entries
                .iter()
                .find(|e| e.function == 0xd && e.index == i as u32)
            {
                if e.eax as usize == want && e.ebx as usize >= 576 {
                    l.comps[i] = (e.ebx as usize, want);
                }
            }
        }
        l
    }

    /// The byte range of component `i` in the image, if carried.
    fn range(&self, i: usize) -> Option<std::ops::Range<usize>> {
        let (off, size) = self.comps[i];
        (size > 0 && i >= 2).then_some(off..off + size)
    }
}

/// Little-endian `u128`s from bytes.
fn u128s(b: &[u8]) -> impl Iterator<Item = u128> + '_ {
    b.chunks_exact(16).map(|c| {
        let mut a = [0u8; 16];
        a.copy_from_slice(c);
        u128::from_le_bytes(a)
    })
}

/// The neutral state from a standard-format XSAVE image (KVM_GET_XSAVE):
/// the legacy area, then every carried component whose XSTATE_BV bit is
/// set (a clear bit means the component is in its initial configuration:
/// zeros for these).
fn xsave_image_to_state(region: &[u32], layout: &XsaveLayout) -> (FpuState, XState) {
    let n = region.len() * 4;
    let b = region_bytes(region, n);
    let mut f = fpu_from_kvm(&fxsave_to_kvm_fpu(region));
    let bv = u64::from_le_bytes(
        b[fx::XSTATE_BV..fx::XSTATE_BV + 8]
            .try_into()
            .unwrap_or([0; 8]),
    );
    let mut x = XState {
        xinuse: bv,
        ..Default::default()
    };
    let present = |i: usize| layout.range(i).filter(|r| bv & (1 << i) != 0 && r.end <= n);
    if let Some(r) = present(xcomp::AVX) {
        for (d, v) in f.ymm_hi.iter_mut().zip(u128s(&b[r])) {
            *d = v;
        }
    }
    if let Some(r) = present(xcomp::OPMASK) {
        for (d, c) in x.opmask.iter_mut().zip(b[r].chunks_exact(8)) {
            *d = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        }
    }
    if let Some(r) = present(xcomp::ZMM_HI256) {
        let v: Vec<u128> = u128s(&b[r]).collect();
        for (k, z) in x.zmm_hi256.iter_mut().enumerate() {
            *z = [v[2 * k], v[2 * k + 1]];
        }
    }
    if let Some(r) = present(xcomp::HI16_ZMM) {
        let v: Vec<u128> = u128s(&b[r]).collect();
        for (k, z) in x.hi16_zmm.iter_mut().enumerate() {
            *z = [v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]];
        }
    }
    if let Some(r) = present(xcomp::PKRU) {
        x.pkru = u32::from_le_bytes(b[r.start..r.start + 4].try_into().unwrap_or([0; 4]));
    }
    (f, x)
}

/// Write the neutral state into a standard-format XSAVE image read from
/// KVM: the legacy area (x87 and SSE marked present, as before), and each
/// carried component, whose XSTATE_BV bit is set when XINUSE says so or
/// its contents are not the initial ones (a clear bit makes KVM load the
/// initial configuration). Components duet does not carry are kept.
fn state_to_xsave_image(f: &FpuState, x: &XState, layout: &XsaveLayout, region: &mut [u32]) {
    kvm_fpu_to_fxsave(&fpu_to_kvm(f), region);
    let n = region.len() * 4;
    let mut b = region_bytes(region, n);
    let mut bv = u64::from_le_bytes(
        b[fx::XSTATE_BV..fx::XSTATE_BV + 8]
            .try_into()
            .unwrap_or([0; 8]),
    );
    let mut put = |i: usize, data: Vec<u8>, b: &mut Vec<u8>| {
        let Some(r) = layout.range(i).filter(|r| r.end <= n) else {
            return;
        };
        let live = x.xinuse & (1 << i) != 0 || data.iter().any(|&v| v != 0);
        if live {
            b[r].copy_from_slice(&data);
            bv |= 1 << i;
        } else {
            b[r].fill(0);
            bv &= !(1 << i);
        }
    };
    put(
        xcomp::AVX,
        f.ymm_hi.iter().flat_map(|v| v.to_le_bytes()).collect(),
        &mut b,
    );
    put(
        xcomp::OPMASK,
        x.opmask.iter().flat_map(|v| v.to_le_bytes()).collect(),
        &mut b,
    );
    put(
        xcomp::ZMM_HI256,
        x.zmm_hi256
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        &mut b,
    );
    put(
        xcomp::HI16_ZMM,
        x.hi16_zmm
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        &mut b,
    );
    let mut pk = x.pkru.to_le_bytes().to_vec();
    pk.extend_from_slice(&[0; 4]);
    put(xcomp::PKRU, pk, &mut b);
    b[fx::XSTATE_BV..fx::XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    for (w, chunk) in region.iter_mut().zip(b.chunks_exact(4)) {
        *w = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
}

fn debugregs_to_kvm(d: &DebugRegs) -> kvm_debugregs {
    kvm_debugregs {
        db: d.db,
        dr6: d.dr6,
        dr7: d.dr7,
        ..Default::default()
    }
}

fn debugregs_from_kvm(k: &kvm_debugregs) -> DebugRegs {
    DebugRegs {
        db: k.db,
        dr6: k.dr6,
        dr7: k.dr7,
    }
}

fn xcr0_to_kvm(xcr0: u64) -> kvm_xcrs {
    let mut x = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    x.xcrs[0].xcr = 0;
    x.xcrs[0].value = xcr0 | 1; // x87 state is always enabled
    x
}

fn xcr0_from_kvm(k: &kvm_xcrs) -> u64 {
    let n = (k.nr_xcrs as usize).min(k.xcrs.len());
    k.xcrs[..n]
        .iter()
        .find(|x| x.xcr == 0)
        .map_or(1, |x| x.value)
}

/// The MSR entries for `m` (plus the TSC if given), in [`STATE_MSRS`] order.
fn msrs_to_entries(m: &Msrs, tsc: Option<u64>) -> Vec<kvm_msr_entry> {
    let mut v: Vec<kvm_msr_entry> = STATE_MSRS
        .iter()
        .filter(|&&i| i != msr::TSC)
        .map(|&index| kvm_msr_entry {
            index,
            reserved: 0,
            data: match index {
                msr::STAR => m.star,
                msr::LSTAR => m.lstar,
                msr::CSTAR => m.cstar,
                msr::SFMASK => m.sfmask,
                msr::KERNEL_GS_BASE => m.kernel_gs_base,
                msr::SYSENTER_CS => m.sysenter_cs,
                msr::SYSENTER_ESP => m.sysenter_esp,
                msr::SYSENTER_EIP => m.sysenter_eip,
                msr::PAT => m.pat,
                msr::TSC_AUX => m.tsc_aux,
                msr::MISC_ENABLE => m.misc_enable,
                _ => 0,
            },
        })
        .collect();
    if let Some(t) = tsc {
        v.push(kvm_msr_entry {
            index: msr::TSC,
            reserved: 0,
            data: t,
        });
    }
    v
}

/// The neutral MSRs (starting from `base` for MSRs absent from `entries`)
/// and the TSC, if present.
fn msrs_from_entries(entries: &[kvm_msr_entry], base: Msrs) -> (Msrs, Option<u64>) {
    let mut m = base;
    let mut tsc = None;
    for e in entries {
        match e.index {
            msr::STAR => m.star = e.data,
            msr::LSTAR => m.lstar = e.data,
            msr::CSTAR => m.cstar = e.data,
            msr::SFMASK => m.sfmask = e.data,
            msr::KERNEL_GS_BASE => m.kernel_gs_base = e.data,
            msr::SYSENTER_CS => m.sysenter_cs = e.data,
            msr::SYSENTER_ESP => m.sysenter_esp = e.data,
            msr::SYSENTER_EIP => m.sysenter_eip = e.data,
            msr::PAT => m.pat = e.data,
            msr::TSC_AUX => m.tsc_aux = e.data,
            msr::MISC_ENABLE => m.misc_enable = e.data,
            msr::TSC => tsc = Some(e.data),
            _ => {}
        }
    }
    (m, tsc)
}

/// vCPU events from the neutral state. `halted` is not part of them (see
/// the module docs).
fn events_to_kvm(e: &PendingEvents) -> kvm_vcpu_events {
    let mut k = kvm_vcpu_events {
        flags: KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW,
        ..Default::default()
    };
    if let Some(v) = e.interrupt {
        k.interrupt.injected = 1;
        k.interrupt.nr = v;
    }
    let mut shadow = 0;
    if e.sti_shadow {
        shadow |= KVM_X86_SHADOW_INT_STI;
    }
    if e.mov_ss_shadow {
        shadow |= KVM_X86_SHADOW_INT_MOV_SS;
    }
    k.interrupt.shadow = shadow as u8;
    k.nmi.pending = u8::from(e.nmi_pending);
    k.nmi.masked = u8::from(e.nmi_masked);
    if e.single_step_pending {
        // A #DB trap KVM delivers as it resumes (DR6.BS travels in the
        // debug registers).
        k.exception.injected = 1;
        k.exception.nr = 1;
    }
    k
}

/// The neutral events from KVM's. An NMI KVM is in the middle of injecting
/// counts as pending (and not yet masking); a software interrupt being
/// re-injected is dropped (RIP still points at the INT, which re-executes).
fn events_from_kvm(k: &kvm_vcpu_events) -> PendingEvents {
    let shadow = u32::from(k.interrupt.shadow);
    PendingEvents {
        interrupt: (k.interrupt.injected != 0 && k.interrupt.soft == 0).then_some(k.interrupt.nr),
        nmi_pending: k.nmi.pending != 0 || k.nmi.injected != 0,
        nmi_masked: k.nmi.masked != 0 && k.nmi.injected == 0,
        sti_shadow: shadow & KVM_X86_SHADOW_INT_STI != 0,
        mov_ss_shadow: shadow & KVM_X86_SHADOW_INT_MOV_SS != 0,
        halted: false,
        single_step_pending: k.exception.injected != 0
            && k.exception.nr == 1
            && k.exception.has_error_code == 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    // ---- conversion round trips (no KVM needed) -------------------------

    fn sample_segment(n: u8) -> Segment {
        Segment {
            selector: 0x10 + u16::from(n) * 8,
            base: 0x1000 * u64::from(n) + 0x123,
            limit: 0xfffff + u32::from(n),
            type_: 0x3 | (n & 0x8),
            s: n % 2 == 0,
            dpl: n % 4,
            present: true,
            avl: n % 3 == 0,
            l: n == 1,
            db: n != 1,
            g: n % 2 == 1,
            unusable: n == 7,
        }
    }

    fn sample_sregs() -> Sregs {
        Sregs {
            cs: sample_segment(1),
            ds: sample_segment(2),
            es: sample_segment(3),
            fs: sample_segment(4),
            gs: sample_segment(5),
            ss: sample_segment(6),
            tr: sample_segment(7),
            ldt: sample_segment(8),
            gdt: DescriptorTable {
                base: 0xffff_8000_0000_1000,
                limit: 0x7f,
            },
            idt: DescriptorTable {
                base: 0xffff_8000_0000_2000,
                limit: 0xfff,
            },
            cr0: 0x8005_0033,
            cr2: 0xdead_beef_0000,
            cr3: 0x12_3000,
            cr4: 0x3606f0,
            cr8: 0xa,
            efer: 0xd01,
            apic_base: 0xfee0_0d00,
        }
    }

    /// An 80-bit value with the given sign/exponent and mantissa.
    fn f80(se: u16, mant: u64) -> [u8; 10] {
        let mut v = [0u8; 10];
        v[..8].copy_from_slice(&mant.to_le_bytes());
        v[8..].copy_from_slice(&se.to_le_bytes());
        v
    }

    /// An FPU state whose full tag word agrees with the register contents.
    fn sample_fpu() -> FpuState {
        let mut st = [[0u8; 10]; 8];
        st[0] = f80(0x3fff, 0x8000_0000_0000_0000); // 1.0: valid
        st[1] = f80(0x0000, 0); // +0: zero
        st[2] = f80(0x7fff, 0xc000_0000_0000_0000); // QNaN: special
        st[3] = f80(0x0000, 0x1234); // denormal: special
        st[4] = f80(0x4000, 0x1234); // unnormal: special
        st[5] = f80(0xc000, 0xc90f_daa2_2168_c235); // -pi: valid
        st[6] = f80(0x1234, 0x5678); // empty (contents kept anyway)
        st[7] = f80(0x3ffe, 0x8000_0000_0000_0001); // valid
                                                    // R0 valid, R1 zero, R2 special, R3 special, R4 special, R5 valid,
                                                    // R6 empty, R7 valid.
        let ftw = 0b00_11_00_10_10_10_01_00;
        let mut xmm = [0u128; 16];
        for (i, x) in xmm.iter_mut().enumerate() {
            *x = 0x0011_2233_4455_6677_8899_aabb_ccdd_eeffu128.rotate_left(8 * i as u32);
        }
        FpuState {
            st,
            fcw: 0x027f,
            fsw: 5 << 11 | 0x0041, // TOP = 5
            ftw,
            fop: 0x5d9,
            fip: 0xffff_8000_1234_5678,
            fdp: 0x7fff_0000_9abc,
            xmm,
            mxcsr: 0x1fa0,
            ymm_hi: [0; 16],
        }
    }

    #[test]
    fn regs_round_trip() {
        let mut r = Regs::default();
        for (i, g) in r.gpr.iter_mut().enumerate() {
            *g = 0x1111_1111_1111_1111u64.wrapping_mul(i as u64 + 1) ^ 0x5a;
        }
        r.rip = 0xffff_ffff_8100_0000;
        r.rflags = 0x246;
        let k = regs_to_kvm(&r);
        assert_eq!(k.rbx, r.gpr[cpu_interp::state::gpr::RBX]);
        assert_eq!(k.rsp, r.gpr[cpu_interp::state::gpr::RSP]);
        assert_eq!(regs_from_kvm(&k), r);
    }

    #[test]
    fn segment_and_sregs_round_trip() {
        for n in 0..9 {
            let s = sample_segment(n);
            assert_eq!(segment_from_kvm(&segment_to_kvm(&s)), s);
        }
        let s = sample_sregs();
        let k = sregs_to_kvm(&s);
        assert_eq!(k.interrupt_bitmap, [0; 4]);
        assert_eq!(sregs_from_kvm(&k), s);
    }

    #[test]
    fn fpu_round_trip_and_layout() {
        let f = sample_fpu();
        let k = fpu_to_kvm(&f);
        // ST(0) is R[TOP] = R5, ST(3) is R0.
        assert_eq!(&k.fpr[0][..10], &f.st[5]);
        assert_eq!(&k.fpr[3][..10], &f.st[0]);
        assert_eq!(k.ftwx, 0b1011_1111);
        assert_eq!(k.xmm[1], f.xmm[1].to_le_bytes());
        assert_eq!(fpu_from_kvm(&k), f);
        // The reset state: everything empty.
        let d = FpuState::default();
        assert_eq!(fpu_to_kvm(&d).ftwx, 0);
        assert_eq!(fpu_from_kvm(&fpu_to_kvm(&d)), d);
    }

    #[test]
    fn fxsave_image_round_trip() {
        let f = sample_fpu();
        let mut region = [0u32; 1024];
        region[7] = 0xffff; // MXCSR_MASK: kept
        region[128] = 0x4; // XSTATE_BV: AVX present, kept
        region[200] = 0xdead_beef; // an extended component: untouched
        kvm_fpu_to_fxsave(&fpu_to_kvm(&f), &mut region);
        assert_eq!(region[6], f.mxcsr);
        assert_eq!(region[7], 0xffff);
        assert_eq!(region[128], 0x7);
        assert_eq!(region[200], 0xdead_beef);
        assert_eq!(region[0], u32::from(f.fcw) | u32::from(f.fsw) << 16);
        assert_eq!(fpu_from_kvm(&fxsave_to_kvm_fpu(&region)), f);
    }

    #[test]
    fn xsave_image_round_trip_carries_avx_and_avx512() {
        let mut f = sample_fpu();
        for (i, y) in f.ymm_hi.iter_mut().enumerate() {
            *y = 0xfeed_0000_0000_0000_0000_0000_0000_0000 | i as u128;
        }
        let mut x = XState {
            opmask: [1, 2, 3, 4, 5, 6, 7, u64::MAX],
            ..Default::default()
        };
        x.zmm_hi256[3] = [0x33, 0x34];
        x.hi16_zmm[15] = [1, 2, 3, u128::MAX];
        x.pkru = 0x5555_5554;
        let mut region = [0u32; 1024];
        region[700] = 0xdead_beef; // beyond every carried component: kept
        state_to_xsave_image(&f, &x, &XsaveLayout::STANDARD, &mut region);
        let bv = u64::from(region[128]) | u64::from(region[129]) << 32;
        assert_eq!(bv, xcomp::CARRIED);
        assert_eq!(region[700], 0xdead_beef);
        assert_eq!(region[576 / 4], 0);
        assert_eq!(region[592 / 4 + 3], 0xfeed_0000);
        let (f2, x2) = xsave_image_to_state(&region, &XsaveLayout::STANDARD);
        assert_eq!(f2, f);
        assert_eq!(x2.xinuse, xcomp::CARRIED);
        assert_eq!(XState { xinuse: 0, ..x2 }, x);
        // Components in their initial configuration and not in use stay
        // marked init (so KVM keeps the upper state clean).
        let mut f = sample_fpu();
        f.ymm_hi = [0; 16];
        state_to_xsave_image(&f, &XState::default(), &XsaveLayout::STANDARD, &mut region);
        let bv = u64::from(region[128]) | u64::from(region[129]) << 32;
        assert_eq!(bv, 0b11);
        // A clear XSTATE_BV bit reads as the initial configuration.
        region[576 / 4] = 0x1234;
        let (f3, _) = xsave_image_to_state(&region, &XsaveLayout::STANDARD);
        assert_eq!(f3.ymm_hi, [0; 16]);
    }

    #[test]
    fn full_tags_are_recomputed_from_contents() {
        // A "valid" tag on a zero register comes back as "zero", as FXRSTOR
        // would compute it.
        let mut f = sample_fpu();
        f.ftw &= !(3 << 2); // R1 (which holds +0) tagged valid
        let back = fpu_from_kvm(&fpu_to_kvm(&f));
        assert_eq!((back.ftw >> 2) & 3, 1);
    }

    #[test]
    fn debugregs_round_trip() {
        let d = DebugRegs {
            db: [0x1000, 0x2000, 0xffff_8000_0000_3000, 0x4000],
            dr6: 0xffff_4ff1,
            dr7: 0x0f0f_0455,
        };
        assert_eq!(debugregs_from_kvm(&debugregs_to_kvm(&d)), d);
    }

    #[test]
    fn xcr0_round_trip() {
        for x in [1u64, 3, 7, 0xe7] {
            assert_eq!(xcr0_from_kvm(&xcr0_to_kvm(x)), x);
        }
        assert_eq!(xcr0_from_kvm(&kvm_xcrs::default()), 1);
    }

    #[test]
    fn msrs_round_trip() {
        let m = Msrs {
            star: 0x0023_0010_0000_0000,
            lstar: 0xffff_ffff_8100_0000,
            cstar: 0xffff_ffff_8100_1000,
            sfmask: 0x4_7700,
            kernel_gs_base: 0xffff_8880_0000_0000,
            sysenter_cs: 0x10,
            sysenter_esp: 0xffff_fe00_0000_0000,
            sysenter_eip: 0xffff_ffff_8100_2000,
            pat: 0x0007_0406_0007_0406,
            tsc_aux: 3,
            misc_enable: 0x851,
            mtrr: Default::default(),
        };
        let entries = msrs_to_entries(&m, Some(123_456));
        assert_eq!(entries.len(), STATE_MSRS.len());
        assert_eq!(
            msrs_from_entries(&entries, Msrs::default()),
            (m, Some(123_456))
        );
        // Without the TSC and with a missing MSR, the base value stays.
        let partial: Vec<_> = msrs_to_entries(&m, None)
            .into_iter()
            .filter(|e| e.index != msr::CSTAR)
            .collect();
        let (back, tsc) = msrs_from_entries(&partial, Msrs::default());
        assert_eq!(tsc, None);
        assert_eq!(back.cstar, Msrs::default().cstar);
        assert_eq!(back.lstar, m.lstar);
    }

    #[test]
    fn events_round_trip() {
        for bits in 0u32..32 {
            let e = PendingEvents {
                interrupt: (bits & 1 != 0).then_some(0x20 + bits as u8),
                nmi_pending: bits & 2 != 0,
                nmi_masked: bits & 4 != 0,
                sti_shadow: bits & 8 != 0,
                mov_ss_shadow: bits & 16 != 0,
                halted: false,
                single_step_pending: bits & 1 == 0 && bits & 2 != 0,
            };
            assert_eq!(events_from_kvm(&events_to_kvm(&e)), e);
        }
    }

    #[test]
    fn cpuid_fixup() {
        let mut entries = [
            kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0008_0800,
                ecx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                edx: 0,
                ..Default::default()
            },
        ];
        fixup_cpuid(&mut entries, 3, false, false);
        assert_eq!(entries[0].ebx, 0x0308_0800);
        assert_eq!(entries[0].ecx & (1 << 21), 0);
        assert_eq!(entries[0].ecx & (1 << 24), 0);
        assert_eq!(entries[0].ecx | (1 << 21) | (1 << 24), 0xffff_ffff);
        assert_eq!(entries[1].edx, 3);
        entries[0].ecx = 0;
        fixup_cpuid(&mut entries, 3, true, true);
        assert_eq!(entries[0].ecx, (1 << 21) | (1 << 24));
        fixup_cpuid(&mut entries, 3, true, false);
        assert_eq!(entries[0].ecx, 1 << 21);
    }

    // ---- guests on KVM --------------------------------------------------

    /// Returns false (after saying why) when KVM is not usable here.
    fn kvm_usable() -> bool {
        crate::backend::kvm_or_skip("kvm backend test")
    }

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Access {
        In(u16, usize),
        Out(u16, Vec<u8>),
        MmioRead(u64, usize),
        MmioWrite(u64, Vec<u8>),
        /// An MSR read that reached the machine, and its answer.
        Rdmsr(u32, MsrResult),
        /// An MSR write that reached the machine, and its answer.
        Wrmsr(u32, u64, MsrResult),
    }

    /// Records every access; requests an exit on writes to `exit_port`.
    /// MSRs: the machine owns those in `msrs` (reads return the stored
    /// value, writes store) and faults those in `msr_faults`.
    #[derive(Default)]
    struct Recorder {
        log: Vec<Access>,
        in_value: u32,
        exit_port: Option<u16>,
        requested: bool,
        msrs: BTreeMap<u32, u64>,
        msr_faults: BTreeSet<u32>,
    }

    impl Recorder {
        fn outs(&self, port: u16) -> Vec<Vec<u8>> {
            self.log
                .iter()
                .filter_map(|a| match a {
                    Access::Out(p, d) if *p == port => Some(d.clone()),
                    _ => None,
                })
                .collect()
        }
        fn out_bytes(&self, port: u16) -> Vec<u8> {
            self.outs(port).concat()
        }
    }

    impl IoHandler for Recorder {
        fn pio_read(&mut self, port: u16, data: &mut [u8]) {
            self.log.push(Access::In(port, data.len()));
            let v = self.in_value.to_le_bytes();
            data.copy_from_slice(&v[..data.len()]);
            self.in_value = self.in_value.wrapping_add(1);
        }
        fn pio_write(&mut self, port: u16, data: &[u8]) {
            self.log.push(Access::Out(port, data.to_vec()));
            if Some(port) == self.exit_port {
                self.requested = true;
            }
        }
        fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
            self.log.push(Access::MmioRead(addr, data.len()));
            data.fill(0xab);
        }
        fn mmio_write(&mut self, addr: u64, data: &[u8]) {
            self.log.push(Access::MmioWrite(addr, data.to_vec()));
        }
        fn exit_requested(&self) -> bool {
            self.requested
        }
        fn msr_read(&mut self, msr: u32) -> MsrResult {
            let r = if self.msr_faults.contains(&msr) {
                MsrResult::Fault
            } else {
                self.msrs
                    .get(&msr)
                    .map_or(MsrResult::Unhandled, |v| MsrResult::Done(*v))
            };
            self.log.push(Access::Rdmsr(msr, r));
            r
        }
        fn msr_write(&mut self, msr: u32, value: u64) -> MsrResult {
            let r = if self.msr_faults.contains(&msr) {
                MsrResult::Fault
            } else if let Some(v) = self.msrs.get_mut(&msr) {
                *v = value;
                MsrResult::Done(0)
            } else {
                MsrResult::Unhandled
            };
            self.log.push(Access::Wrmsr(msr, value, r));
            r
        }
    }

    const MEM_SIZE: usize = 4 << 20;
    const CODE: u64 = 0x9000;
    const HANDLERS: u64 = 0x8000;
    const GDT: u64 = 0x500;
    const PML4: u64 = 0x1000;
    const IDT: u64 = 0xb000;
    const TSS: u64 = 0xc000;
    const STACK_TOP: u64 = 0x7000;
    /// Port the handler stubs write their vector to.
    const PORT_EXC: u16 = 0x80;
    /// Port the returning handlers (INT3, INT 0x21) write their vector to.
    const PORT_HANDLED: u16 = 0x81;
    /// Port the main code writes 'E' to when it reaches its end.
    const PORT_END: u16 = 0x82;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Mode {
        Real,
        Prot32,
        Long64,
    }

    struct Rig {
        vcpu: KvmVcpu,
        mem: GuestMemory,
        _backend: KvmBackend,
    }

    fn rig() -> Rig {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut backend = KvmBackend::new(&mem).expect("create KVM VM");
        let vcpu = backend.create_kvm_vcpu(0).expect("create vCPU");
        Rig {
            vcpu,
            mem,
            _backend: backend,
        }
    }

    impl Rig {
        fn write(&self, addr: u64, bytes: &[u8]) {
            self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        }

        /// Run until something other than an I/O request comes back.
        fn run(&mut self, io: &mut Recorder) -> VcpuExit {
            for _ in 0..100 {
                match self.vcpu.run(io).expect("KVM_RUN") {
                    VcpuExit::IoRequest | VcpuExit::Interrupted => io.requested = false,
                    e => return e,
                }
            }
            panic!("guest did not stop");
        }

        /// GDT, page tables, IDT and handler stubs for `mode`.
        fn setup(&self, mode: Mode) {
            let gdt: [u64; 4] = [
                0,
                0x00af_9b00_0000_ffff, // 0x08: 64-bit code
                0x00cf_9300_0000_ffff, // 0x10: flat data
                0x00cf_9b00_0000_ffff, // 0x18: 32-bit code
            ];
            for (i, d) in gdt.iter().enumerate() {
                self.write(GDT + 8 * i as u64, &d.to_le_bytes());
            }
            // Identity map of the first 2 MiB with one large page.
            self.write(PML4, &(0x2000u64 | 3).to_le_bytes());
            self.write(0x2000, &(0x3000u64 | 3).to_le_bytes());
            self.write(0x3000, &0x83u64.to_le_bytes());
            for v in 0..256u64 {
                let h = HANDLERS + v * 16;
                let mut stub = vec![0xb0, v as u8]; // mov al, v
                if v == 3 || v == 0x21 {
                    stub.extend([0xe6, PORT_HANDLED as u8]); // out PORT_HANDLED, al
                    if mode == Mode::Long64 {
                        stub.push(0x48); // iretq
                    }
                    stub.push(0xcf);
                } else {
                    stub.extend([0xe6, PORT_EXC as u8, 0xf4, 0xeb, 0xfd]); // out; hlt; jmp $-1
                }
                self.write(h, &stub);
                match mode {
                    Mode::Real => {
                        // IVT at 0: offset, segment 0.
                        self.write(v * 4, &(h as u32).to_le_bytes());
                    }
                    Mode::Prot32 => {
                        let gate = (h & 0xffff)
                            | (0x18 << 16)
                            | (0x8e00 << 32)
                            | ((h >> 16) & 0xffff) << 48;
                        self.write(IDT + v * 8, &gate.to_le_bytes());
                    }
                    Mode::Long64 => {
                        let gate = (h & 0xffff)
                            | (0x08 << 16)
                            | (0x8e00 << 32)
                            | ((h >> 16) & 0xffff) << 48;
                        self.write(IDT + v * 16, &gate.to_le_bytes());
                        self.write(IDT + v * 16 + 8, &(h >> 32).to_le_bytes());
                    }
                }
            }
        }
    }

    fn flat(selector: u16, code: bool, long: bool) -> Segment {
        Segment {
            selector,
            base: 0,
            limit: 0xffff_ffff,
            type_: if code { 0xb } else { 0x3 },
            s: true,
            dpl: 0,
            present: true,
            avl: false,
            l: long,
            db: !long,
            g: true,
            unusable: false,
        }
    }

    /// Ring-0 state for `mode` starting at CODE.
    fn mode_state(mode: Mode) -> CpuState {
        let mut s = CpuState::real_mode_at(0, CODE as u16);
        s.regs.gpr[cpu_interp::state::gpr::RSP] = STACK_TOP;
        s.sregs.idt = DescriptorTable {
            base: if mode == Mode::Real { 0 } else { IDT },
            limit: match mode {
                Mode::Real => 0x3ff,
                Mode::Prot32 => 0x7ff,
                Mode::Long64 => 0xfff,
            },
        };
        if mode == Mode::Real {
            return s;
        }
        let data = flat(0x10, false, false);
        s.sregs.ds = data;
        s.sregs.es = data;
        s.sregs.fs = data;
        s.sregs.gs = data;
        s.sregs.ss = data;
        s.sregs.gdt = DescriptorTable {
            base: GDT,
            limit: 0x1f,
        };
        s.sregs.tr = Segment {
            selector: 0,
            base: TSS,
            limit: 0x67,
            type_: 0xb,
            present: true,
            ..Default::default()
        };
        s.sregs.cr0 = 0x11 | 0x20; // PE, ET, NE
        if mode == Mode::Long64 {
            s.sregs.cs = flat(0x08, true, true);
            s.sregs.cr0 |= 1 << 31; // PG
            s.sregs.cr3 = PML4;
            s.sregs.cr4 = 0x20; // PAE
            s.sregs.efer = 0x500; // LME, LMA
        } else {
            s.sregs.cs = flat(0x18, true, false);
        }
        s
    }

    /// Run `snippet` followed by `mov al,'E'; out PORT_END,al; hlt` at CODE
    /// in `mode`. Returns the exit and the recorded accesses.
    fn run_snippet(
        mode: Mode,
        snippet: &[u8],
        fallback: bool,
        cr4: u64,
    ) -> (VcpuExit, Recorder, Rig) {
        run_snippet_with(mode, snippet, cr4, |v| v.set_interp_fallback(fallback))
    }

    /// `run_snippet` with a hook to adjust the vCPU first.
    fn run_snippet_with(
        mode: Mode,
        snippet: &[u8],
        cr4: u64,
        tweak: impl FnOnce(&mut KvmVcpu),
    ) -> (VcpuExit, Recorder, Rig) {
        let mut rig = rig();
        rig.setup(mode);
        let mut code = snippet.to_vec();
        code.extend([0xb0, b'E', 0xe6, PORT_END as u8, 0xf4]);
        rig.write(CODE, &code);
        let mut s = mode_state(mode);
        s.sregs.cr4 |= cr4;
        rig.vcpu.set_state(&s).expect("set_state");
        tweak(&mut rig.vcpu);
        let mut io = Recorder::default();
        let exit = rig.run(&mut io);
        (exit, io, rig)
    }

    /// `--cpu x86-64-v2` on KVM: the guest's CPUID lacks AVX, or (KVM-PVM,
    /// which forces the host's CPUID on its guests) duet says which
    /// extensions the guest sees beyond the model. The guest executes
    /// CPUID in ring 0 here (KVM's emulator answers from its table).
    #[test]
    fn cpu_model_reaches_the_kvm_guest_or_is_reported_overridden() {
        if !kvm_usable() {
            return;
        }
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let opts = VmOptions {
            cpu: cpu_interp::cpuid::CpuModel::V2,
            ..Default::default()
        };
        let mut backend = KvmBackend::with_options(&mem, opts).expect("VM");
        let vcpu = backend.create_kvm_vcpu(0).expect("vCPU");
        let mut rig = Rig {
            vcpu,
            mem,
            _backend: backend,
        };
        rig.setup(Mode::Long64);
        // mov eax, 1 ; cpuid ; mov esi, ecx ; hlt
        rig.write(CODE, &[0xb8, 1, 0, 0, 0, 0x0f, 0xa2, 0x89, 0xce, 0xf4]);
        rig.vcpu.set_state(&mode_state(Mode::Long64)).unwrap();
        let mut io = Recorder::default();
        assert_eq!(rig.run(&mut io), VcpuExit::Halted);
        let ecx = rig.vcpu.state().unwrap().regs.gpr[cpu_interp::state::gpr::RSI] as u32;
        let effective = rig.vcpu.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let overridden = model_overridden(effective.as_slice(), cpu_interp::cpuid::CpuModel::V2);
        println!("guest CPUID.1:ECX {ecx:#x}; beyond the model: {overridden:?}");
        let avx = ecx & cpu_interp::cpuid::leaf1_ecx::AVX != 0;
        assert_eq!(
            avx,
            overridden.as_deref().is_some_and(|x| x.contains("avx"))
        );
        assert_eq!(
            model_overridden(effective.as_slice(), cpu_interp::cpuid::CpuModel::Max),
            None
        );
    }

    /// Turn off KVM_CAP_SYNC_REGS use (every transfer through ioctls).
    fn without_sync_regs(v: &mut KvmVcpu) {
        v.fd.clear_sync_valid_reg(SyncReg::Register);
        v.fd.clear_sync_valid_reg(SyncReg::SystemRegister);
        v.fd.clear_sync_valid_reg(SyncReg::VcpuEvents);
        v.caps.sync_regs = false;
        v.sync_fresh = false;
    }

    /// Real mode: single and string port I/O arrive one element at a time.
    #[test]
    fn real_mode_port_io_per_element() {
        if !kvm_usable() {
            return;
        }
        let mut rig = rig();
        let code = [
            0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xb0, b'A', // mov al, 'A'
            0xee, // out dx, al
            0xbe, 0x00, 0x95, // mov si, 0x9500
            0xb9, 0x05, 0x00, // mov cx, 5
            0xfc, // cld
            0xf3, 0x6e, // rep outsb
            0xb8, 0x34, 0x12, // mov ax, 0x1234
            0xef, // out dx, ax
            0xbe, 0x10, 0x95, // mov si, 0x9510
            0xb9, 0x02, 0x00, // mov cx, 2
            0xf3, 0x6f, // rep outsw
            0xbf, 0x00, 0x96, // mov di, 0x9600
            0xb9, 0x03, 0x00, // mov cx, 3
            0xf3, 0x6c, // rep insb
            0xec, // in al, dx
            0xf4, // hlt
        ];
        rig.write(CODE, &code);
        rig.write(0x9500, b"hello");
        rig.write(0x9510, &[1, 2, 3, 4]);
        rig.vcpu
            .set_state(&CpuState::real_mode_at(0, CODE as u16))
            .unwrap();
        let mut io = Recorder {
            in_value: 0x41,
            ..Default::default()
        };
        assert_eq!(rig.run(&mut io), VcpuExit::Halted);
        let outs = rig_outs(&io);
        let expect: Vec<Vec<u8>> = vec![
            vec![b'A'],
            vec![b'h'],
            vec![b'e'],
            vec![b'l'],
            vec![b'l'],
            vec![b'o'],
            vec![0x34, 0x12],
            vec![1, 2],
            vec![3, 4],
        ];
        assert_eq!(outs, expect);
        let ins: Vec<&Access> = io
            .log
            .iter()
            .filter(|a| matches!(a, Access::In(..)))
            .collect();
        assert_eq!(ins.len(), 4, "{:?}", io.log);
        assert!(ins.iter().all(|a| **a == Access::In(0x3f8, 1)));
        let mut buf = [0u8; 3];
        rig.mem.read_slice(&mut buf, GuestAddress(0x9600)).unwrap();
        assert_eq!(buf, [0x41, 0x42, 0x43]);
        let s = rig.vcpu.state().unwrap();
        assert_eq!(s.regs.gpr[0] & 0xff, 0x44);
        assert_eq!(s.regs.rip, CODE + code.len() as u64);
        assert!(s.events.halted);
        // Halted stays halted until something wakes it.
        assert_eq!(rig.run(&mut io), VcpuExit::Halted);
        let st = rig.vcpu.stats();
        assert!(st.exits.iter().any(|(k, n)| k == "io" && *n >= 4), "{st:?}");
        assert_eq!(st.interp_fallbacks, 0);
    }

    fn rig_outs(io: &Recorder) -> Vec<Vec<u8>> {
        io.outs(0x3f8)
    }

    /// An I/O request completes the instruction and returns IoRequest.
    #[test]
    fn io_request_completes_the_instruction() {
        if !kvm_usable() {
            return;
        }
        let mut rig = rig();
        let code = [
            0xb0, 0x07, // mov al, 7
            0xe6, 0xf4, // out 0xf4, al
            0xb0, b'Z', // mov al, 'Z'
            0xe6, 0xe9, // out 0xe9, al
            0xf4, // hlt
        ];
        rig.write(CODE, &code);
        rig.vcpu
            .set_state(&CpuState::real_mode_at(0, CODE as u16))
            .unwrap();
        let mut io = Recorder {
            exit_port: Some(0xf4),
            ..Default::default()
        };
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::IoRequest);
        assert_eq!(rig.vcpu.regs().unwrap().rip, CODE + 4);
        assert_eq!(io.out_bytes(0xf4), vec![7]);
        assert!(io.outs(0xe9).is_empty());
        io.requested = false;
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
        assert_eq!(io.out_bytes(0xe9), b"Z");
    }

    /// External interrupts: injected into a halted CPU, and held back while
    /// IF=0 until the interrupt window opens.
    #[test]
    fn interrupt_injection_and_window() {
        if !kvm_usable() {
            return;
        }
        let mut rig = rig();
        rig.setup(Mode::Real);
        // Vector 0x21's stub writes 0x21 to PORT_HANDLED and IRETs.
        let code = [
            0xfb, // sti
            0xf4, // hlt
            0xb0,
            b'B', // mov al, 'B'
            0xe6,
            PORT_END as u8, // out PORT_END, al
            0xfa,           // cli
            0xe6,
            0xf4, // out 0xf4, al (exit request, IF=0)
            0xfb, // sti
            0x90, // nop
            0xb0,
            b'C', // mov al, 'C'
            0xe6,
            PORT_END as u8, // out
            0xfa,           // cli
            0xf4,           // hlt
        ];
        rig.write(CODE, &code);
        let mut s = mode_state(Mode::Real);
        s.regs.rflags = 0x2;
        rig.vcpu.set_state(&s).unwrap();
        let mut io = Recorder {
            exit_port: Some(0xf4),
            ..Default::default()
        };
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
        assert!(rig.vcpu.state().unwrap().events.halted);
        assert!(rig.vcpu.ready_for_interrupt());
        rig.vcpu.inject_interrupt(0x21).unwrap();
        assert!(!rig.vcpu.ready_for_interrupt());
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::IoRequest);
        assert_eq!(io.out_bytes(PORT_HANDLED), vec![0x21]);
        assert_eq!(io.out_bytes(PORT_END), b"B");
        io.requested = false;
        // IF=0 now: the interrupt is held and injected when the window opens.
        assert!(!rig.vcpu.ready_for_interrupt());
        rig.vcpu.inject_interrupt(0x21).unwrap();
        assert_eq!(rig.vcpu.state().unwrap().events.interrupt, Some(0x21));
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
        assert_eq!(io.out_bytes(PORT_HANDLED), vec![0x21, 0x21]);
        assert_eq!(io.out_bytes(PORT_END), b"BC");
        assert_eq!(rig.vcpu.state().unwrap().events.interrupt, None);
        // Halted with IF=0: only an NMI wakes it (vector 2's stub halts).
        assert!(!rig.vcpu.ready_for_interrupt());
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
        assert!(io.outs(PORT_EXC).is_empty());
        rig.vcpu.inject_nmi().unwrap();
        assert!(rig.vcpu.state().unwrap().events.nmi_pending);
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
        assert_eq!(io.out_bytes(PORT_EXC), vec![2]);
        let s = rig.vcpu.state().unwrap();
        assert!(
            s.events.nmi_masked && !s.events.nmi_pending,
            "{:?}",
            s.events
        );
    }

    /// A requested interrupt window comes back once IF is set and the STI
    /// shadow has passed; an interrupt injected then is taken at once.
    #[test]
    fn requested_interrupt_window() {
        if !kvm_usable() {
            return;
        }
        let mut rig = rig();
        rig.setup(Mode::Real);
        // The window opens after the STI shadow; hosts that emulate ring 0
        // may report it late, hence the loop.
        #[rustfmt::skip]
        let code = [
            0xb0, b'1', 0xe6, PORT_END as u8, // out '1'
            0xfb, // sti
            0x66, 0xb9, 0x40, 0x0d, 0x03, 0x00, // mov ecx, 200000
            0x66, 0x49, // dec ecx
            0x75, 0xfc, // jnz dec
            0xb0, b'2', 0xe6, PORT_END as u8, // out '2'
            0xfa, // cli
            0xf4, // hlt
        ];
        rig.write(CODE, &code);
        let mut s = mode_state(Mode::Real);
        s.regs.rflags = 0x2;
        rig.vcpu.set_state(&s).unwrap();
        rig.vcpu.request_interrupt_window(true);
        let mut io = Recorder::default();
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::InterruptWindow);
        assert!(rig.vcpu.ready_for_interrupt());
        let st = rig.vcpu.state().unwrap();
        assert!(st.regs.rflags & cpu_interp::flags::IF != 0);
        assert!(!st.events.sti_shadow);
        rig.vcpu.request_interrupt_window(false);
        rig.vcpu.inject_interrupt(0x21).unwrap();
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
        let order: Vec<&Access> = io
            .log
            .iter()
            .filter(|a| matches!(a, Access::Out(p, _) if *p == PORT_END || *p == PORT_HANDLED))
            .collect();
        assert_eq!(
            order,
            [
                &Access::Out(PORT_END, vec![b'1']),
                &Access::Out(PORT_HANDLED, vec![0x21]),
                &Access::Out(PORT_END, vec![b'2']),
            ]
        );
        assert!(rig
            .vcpu
            .stats()
            .exits
            .iter()
            .any(|(k, _)| k == "irq-window"));
    }

    /// A short window (STI; NOP; OUT; CLI) is still seen: if KVM does not
    /// report it itself, the OUT's exit does, after completing the OUT.
    #[test]
    fn short_interrupt_window_seen_at_an_exit() {
        if !kvm_usable() {
            return;
        }
        let mut rig = rig();
        rig.setup(Mode::Real);
        #[rustfmt::skip]
        let code = [
            0xfb, // sti
            0x90, // nop
            0xb0, b'2', 0xe6, PORT_END as u8, // out '2'
            0xfa, // cli
            0xf4, // hlt
        ];
        rig.write(CODE, &code);
        let mut s = mode_state(Mode::Real);
        s.regs.rflags = 0x2;
        rig.vcpu.set_state(&s).unwrap();
        rig.vcpu.request_interrupt_window(true);
        let mut io = Recorder::default();
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::InterruptWindow);
        rig.vcpu.request_interrupt_window(false);
        assert!(rig.vcpu.ready_for_interrupt());
        rig.vcpu.inject_interrupt(0x21).unwrap();
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
        assert_eq!(io.out_bytes(PORT_HANDLED), vec![0x21]);
        assert_eq!(io.out_bytes(PORT_END), b"2");
    }

    /// A kick (immediate_exit) returns Interrupted and is consumed.
    #[test]
    fn immediate_exit_returns_interrupted() {
        if !kvm_usable() {
            return;
        }
        let mut rig = rig();
        rig.write(CODE, &[0xb0, b'K', 0xe6, PORT_END as u8, 0xf4]);
        rig.vcpu
            .set_state(&CpuState::real_mode_at(0, CODE as u16))
            .unwrap();
        rig.vcpu.fd.set_kvm_immediate_exit(1);
        let mut io = Recorder::default();
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Interrupted);
        assert!(io.log.is_empty());
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
        assert_eq!(io.out_bytes(PORT_END), b"K");
        assert!(rig.vcpu.stats().exits.iter().any(|(k, _)| k == "intr"));
    }

    // ---- kicks ----------------------------------------------------------

    /// A kick from another thread ends an in-progress KVM_RUN of a guest
    /// spinning on `jmp $` (in real mode and in 64-bit ring 0); the vCPU
    /// then runs on. Prints the latency.
    #[test]
    fn kick_interrupts_a_spinning_guest() {
        use std::time::{Duration, Instant};
        if !kvm_usable() {
            return;
        }
        // (mode, ring 3): KVM-PVM emulates ring-0 code in the host kernel
        // and runs ring 3 natively.
        for (mode, user) in [
            (Mode::Real, false),
            (Mode::Long64, false),
            (Mode::Long64, true),
        ] {
            let mut rig = rig();
            rig.setup(mode);
            // jmp $; mov al, 'E'; out PORT_END, al; hlt
            rig.write(CODE, &[0xeb, 0xfe, 0xb0, b'E', 0xe6, PORT_END as u8, 0xf4]);
            let mut s = mode_state(mode);
            if user {
                // User pages, ring-3 segments, IOPL 3 for the OUT; the HLT
                // at the end faults (#GP stub: out 13, hlt in ring 0).
                rig.write(PML4, &(0x2000u64 | 7).to_le_bytes());
                rig.write(0x2000, &(0x3000u64 | 7).to_le_bytes());
                rig.write(0x3000, &0x87u64.to_le_bytes());
                rig.write(GDT + 0x20, &0x00af_fb00_0000_ffffu64.to_le_bytes());
                rig.write(GDT + 0x28, &0x00cf_f300_0000_ffffu64.to_le_bytes());
                rig.write(TSS + 4, &STACK_TOP.to_le_bytes()); // RSP0
                s.sregs.gdt.limit = 0x2f;
                s.sregs.cs = Segment {
                    dpl: 3,
                    ..flat(0x23, true, true)
                };
                let data = Segment {
                    dpl: 3,
                    ..flat(0x2b, false, false)
                };
                s.sregs.ss = data;
                s.sregs.ds = data;
                s.sregs.es = data;
                s.regs.rflags = 0x3002; // IOPL 3
                s.regs.gpr[cpu_interp::state::gpr::RSP] = STACK_TOP - 0x800;
            }
            let mode = format!("{mode:?}{}", if user { " ring 3" } else { "" });
            rig.vcpu.set_state(&s).unwrap();
            let mut io = Recorder::default();
            let mut latencies = Vec::new();
            for round in 0..5 {
                let kicker = rig.vcpu.kicker();
                let (tx, rx) = std::sync::mpsc::channel();
                let done = Arc::new(AtomicBool::new(false));
                let done2 = done.clone();
                let t = std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(50));
                    let at = Instant::now();
                    kicker.kick();
                    tx.send(at).unwrap();
                    // Watchdog: a lost kick fails the test instead of
                    // hanging it.
                    for _ in 0..200 {
                        if done2.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    kicker.kick();
                });
                let start = Instant::now();
                let exit = rig.vcpu.run(&mut io).unwrap();
                let back = Instant::now();
                done.store(true, Ordering::Relaxed);
                t.join().unwrap();
                let kicked_at = rx.recv().unwrap();
                assert_eq!(exit, VcpuExit::Interrupted, "{mode} round {round}");
                assert!(
                    back - start >= Duration::from_millis(40),
                    "{mode} round {round}: run returned after {:?}, before the kick",
                    back - start
                );
                latencies.push(back.saturating_duration_since(kicked_at));
                assert_eq!(rig.vcpu.regs().unwrap().rip, CODE, "still spinning");
            }
            latencies.sort();
            println!(
                "{mode}: kick latency (kick() to run() returning), 5 rounds: min {:?} median \
                 {:?} max {:?}",
                latencies[0], latencies[2], latencies[4]
            );
            assert!(
                latencies[4] < Duration::from_secs(1),
                "{mode}: a kick was lost (the watchdog's kick ended the run): {latencies:?}"
            );
            // No kick is left over: with the loop patched away the guest
            // runs to its end.
            rig.write(CODE, &[0x90, 0x90]);
            assert_eq!(rig.run(&mut io), VcpuExit::Halted);
            assert_eq!(io.out_bytes(PORT_END), b"E", "{mode}: {:?}", io.log);
            let stub = if user { vec![13] } else { vec![] };
            assert_eq!(io.out_bytes(PORT_EXC), stub, "{mode}: {:?}", io.log);
        }
    }

    /// `run` unblocks the kick signal on a thread that blocked it (here a
    /// thread that blocks it before running the vCPU).
    #[test]
    fn kick_reaches_a_thread_that_blocked_the_signal() {
        use std::time::Duration;
        if !kvm_usable() {
            return;
        }
        let Some(sig) = kick_signal() else {
            println!("kick_reaches_a_thread_that_blocked_the_signal: SKIPPED (no kick signal)");
            return;
        };
        let mut rig = rig();
        rig.write(CODE, &[0xeb, 0xfe]); // jmp $
        rig.vcpu
            .set_state(&CpuState::real_mode_at(0, CODE as u16))
            .unwrap();
        let kicker = rig.vcpu.kicker();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            vmm_sys_util::signal::block_signal(sig).unwrap();
            tx.send(()).unwrap();
            let mut io = Recorder::default();
            rig.vcpu.run(&mut io).unwrap()
        });
        rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        kicker.kick();
        for _ in 0..200 {
            if t.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let finished = t.is_finished();
        if !finished {
            kicker.kick(); // would not help: fail instead of hanging
        }
        assert!(finished, "the kick did not interrupt KVM_RUN");
        assert_eq!(t.join().unwrap(), VcpuExit::Interrupted);
    }

    /// A kick while the vCPU is outside `run` is answered by the next `run`
    /// (once, however many kicks), and a kicker outliving its vCPU is
    /// harmless.
    #[test]
    fn kick_outside_run_is_kept_once() {
        if !kvm_usable() {
            return;
        }
        let mut rig = rig();
        rig.write(CODE, &[0xb0, b'E', 0xe6, PORT_END as u8, 0xf4]);
        rig.vcpu
            .set_state(&CpuState::real_mode_at(0, CODE as u16))
            .unwrap();
        let kicker = rig.vcpu.kicker();
        kicker.kick();
        kicker.kick();
        let mut io = Recorder::default();
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Interrupted);
        assert!(io.log.is_empty());
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
        assert_eq!(io.out_bytes(PORT_END), b"E");
        // A kick while halted is answered by the next return, Halted; it
        // leaves nothing behind.
        kicker.kick();
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
        drop(rig);
        kicker.kick();
    }

    /// A kick from inside an I/O handler (as a device thread's kick may
    /// land between exits): the instruction completes, then `run` returns.
    #[test]
    fn kick_between_exits_completes_the_instruction() {
        if !kvm_usable() {
            return;
        }
        struct KickOnOut {
            rec: Recorder,
            kick: Arc<dyn Kick>,
        }
        impl IoHandler for KickOnOut {
            fn pio_read(&mut self, port: u16, data: &mut [u8]) {
                self.rec.pio_read(port, data)
            }
            fn pio_write(&mut self, port: u16, data: &[u8]) {
                self.rec.pio_write(port, data);
                if port == 0x83 {
                    self.kick.kick();
                }
            }
            fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
                self.rec.mmio_read(addr, data)
            }
            fn mmio_write(&mut self, addr: u64, data: &[u8]) {
                self.rec.mmio_write(addr, data)
            }
            fn exit_requested(&self) -> bool {
                false
            }
        }
        let mut rig = rig();
        // out 0x83, al; mov al, 'E'; out PORT_END, al; hlt
        rig.write(CODE, &[0xe6, 0x83, 0xb0, b'E', 0xe6, PORT_END as u8, 0xf4]);
        rig.vcpu
            .set_state(&CpuState::real_mode_at(0, CODE as u16))
            .unwrap();
        let mut io = KickOnOut {
            rec: Recorder::default(),
            kick: rig.vcpu.kicker(),
        };
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Interrupted);
        assert_eq!(rig.vcpu.regs().unwrap().rip, CODE + 2);
        assert!(io.rec.outs(PORT_END).is_empty());
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
        assert_eq!(io.rec.out_bytes(PORT_END), b"E");
    }

    // ---- the machine's MSRs ---------------------------------------------

    /// A real-mode program using the machine's MSRs; results go to port
    /// 0x83 as dwords.
    fn msr_program() -> Vec<u8> {
        use iced_x86::code_asm::*;
        let mut a = CodeAssembler::new(16).unwrap();
        let body = |a: &mut CodeAssembler| -> std::result::Result<(), IcedError> {
            // TSC deadline: write, read back.
            a.mov(ecx, MSR_TSC_DEADLINE)?;
            a.mov(eax, 0x1122_3344)?;
            a.mov(edx, 0x55)?;
            a.wrmsr()?;
            a.xor(eax, eax)?;
            a.xor(edx, edx)?;
            a.rdmsr()?;
            a.out(0x83, eax)?;
            a.mov(eax, edx)?;
            a.out(0x83, eax)?;
            // x2APIC: read the APIC ID register, write the ICR.
            a.mov(ecx, 0x802)?;
            a.rdmsr()?;
            a.out(0x83, eax)?;
            a.mov(ecx, 0x830)?;
            a.mov(eax, 0x4000)?;
            a.xor(edx, edx)?;
            a.wrmsr()?;
            // APIC base: read, relocate, read back.
            a.mov(ecx, msr::APIC_BASE)?;
            a.rdmsr()?;
            a.out(0x83, eax)?;
            a.mov(eax, 0xfed0_0900u32 as i32)?;
            a.xor(edx, edx)?;
            a.wrmsr()?;
            a.xor(eax, eax)?;
            a.rdmsr()?;
            a.out(0x83, eax)?;
            // STAR: KVM's (the interpreter asks the machine first).
            a.mov(ecx, msr::STAR as i32)?;
            a.rdmsr()?;
            a.mov(al, u32::from(b'E'))?;
            a.out(PORT_END as u32, al)?;
            a.hlt()
        };
        body(&mut a).unwrap();
        a.assemble(CODE).unwrap()
    }

    /// `rdmsr` of `index` (or `wrmsr` of 0 to it), then 'E' and HLT; a #GP
    /// shows as vector 13 on PORT_EXC instead.
    fn msr_access_program(index: u32, write: bool) -> Vec<u8> {
        let mut code = vec![0x66, 0xb9];
        code.extend(index.to_le_bytes()); // mov ecx, index
        code.extend([0x66, 0x31, 0xc0, 0x66, 0x31, 0xd2]); // xor eax,eax; xor edx,edx
        code.extend(if write { [0x0f, 0x30] } else { [0x0f, 0x32] });
        code.extend([0xb0, b'E', 0xe6, PORT_END as u8, 0xf4]);
        code
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum MsrPath {
        /// KVM with MSR exits.
        KvmExits,
        /// Every instruction through the KVM backend's interpreter fallback
        /// (the machine seen through `IoPlatform`).
        Fallback,
        /// The interpreter backend.
        Interp,
    }

    /// Run `code` (real mode, IVT stubs) on `path`; the recorder and the
    /// final IA32_APIC_BASE as the vCPU state has it. On KVM, checks that
    /// the MSRs came through MSR exits.
    fn run_msr_path(path: MsrPath, code: &[u8], io: Recorder) -> (Recorder, u64) {
        let (io, apic_base, stats) = run_msr_path_stats(path, code, io);
        if path == MsrPath::KvmExits {
            // Through MSR exits, not through the fallback.
            assert_eq!(stats.interp_fallbacks, 0, "{stats:?}");
            assert!(
                stats
                    .exits
                    .iter()
                    .any(|(k, _)| k == "rdmsr" || k == "wrmsr"),
                "{stats:?}"
            );
        }
        (io, apic_base)
    }

    /// [`run_msr_path`] plus the KVM vCPU's stats.
    fn run_msr_path_stats(
        path: MsrPath,
        code: &[u8],
        mut io: Recorder,
    ) -> (Recorder, u64, VcpuStats) {
        let mut rig = rig();
        rig.setup(Mode::Real);
        rig.write(CODE, code);
        let s = mode_state(Mode::Real);
        let apic_base = match path {
            MsrPath::KvmExits => {
                rig.vcpu.set_state(&s).unwrap();
                assert_eq!(rig.run(&mut io), VcpuExit::Halted);
                rig.vcpu.state().unwrap().sregs.apic_base
            }
            MsrPath::Fallback => {
                rig.vcpu.set_state(&s).unwrap();
                let mut steps = 0;
                loop {
                    match rig.vcpu.fallback(&mut io, &[]).unwrap() {
                        Next::Continue => {}
                        Next::Return(VcpuExit::Halted) => break,
                        Next::Return(e) => panic!("fallback path: {e:?}"),
                        Next::Serviced => unreachable!(),
                    }
                    steps += 1;
                    assert!(
                        steps < 10_000,
                        "fallback path did not halt: {:?}\n{:?}",
                        &io.log[..io.log.len().min(20)],
                        rig.vcpu.state().unwrap().regs
                    );
                }
                rig.vcpu.state().unwrap().sregs.apic_base
            }
            MsrPath::Interp => {
                let mut b = super::super::interp::InterpBackend::new(rig.mem.clone());
                let mut v = b.create_vcpu(0).unwrap();
                v.set_state(&s).unwrap();
                loop {
                    match v.run(&mut io).unwrap() {
                        VcpuExit::Halted => break,
                        VcpuExit::Interrupted | VcpuExit::IoRequest => {}
                        e => panic!("interpreter: {e:?}"),
                    }
                }
                v.state().unwrap().sregs.apic_base
            }
        };
        (io, apic_base, rig.vcpu.stats())
    }

    /// What the machine saw, without the MSRs KVM implements itself (the
    /// interpreter asks the machine about every MSR first; KVM only about
    /// the machine's and those it does not know).
    fn machine_view(io: &Recorder) -> Vec<Access> {
        io.log
            .iter()
            .filter(
                |a| !matches!(a, Access::Rdmsr(i, _) | Access::Wrmsr(i, _, _) if *i == msr::STAR),
            )
            .cloned()
            .collect()
    }

    /// The machine's MSRs reach the IoHandler through MSR exits, with the
    /// same accesses, answers and results as on the KVM fallback path and
    /// on the interpreter. Prints which path this host's KVM takes.
    #[test]
    fn machine_msrs_reach_the_handler() {
        if !kvm_usable() {
            return;
        }
        let supported = rig()._backend.machine_msrs_supported();
        println!(
            "this KVM: machine MSR exits {}",
            if supported {
                "supported (KVM_CAP_X86_USER_SPACE_MSR + KVM_X86_SET_MSR_FILTER)"
            } else {
                "NOT supported: the machine's MSRs stay with KVM"
            }
        );
        // CPUID.1:ECX advertises x2APIC exactly then (TSC-deadline only
        // with the in-kernel LAPIC, see create_kvm_vcpu).
        // mov eax, 1; cpuid; mov eax, ecx; out 0x83, eax
        let cpuid = [
            0x66, 0xb8, 1, 0, 0, 0, 0x0f, 0xa2, 0x66, 0x89, 0xc8, 0x66, 0xe7, 0x83,
        ];
        let (exit, io, _rig) = run_snippet(Mode::Real, &cpuid, true, 0);
        assert_eq!(exit, VcpuExit::Halted);
        let b = io.out_bytes(0x83);
        let ecx = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        assert_eq!(
            ecx & (CPUID1_ECX_X2APIC | CPUID1_ECX_TSC_DEADLINE),
            if supported { CPUID1_ECX_X2APIC } else { 0 },
            "CPUID.1:ECX {ecx:#x}"
        );
        if !supported {
            return;
        }

        let code = msr_program();
        for own_apic_base in [false, true] {
            let recorder = || {
                let mut r = Recorder::default();
                r.msrs.insert(MSR_TSC_DEADLINE, 0);
                r.msrs.insert(0x802, 0x0300_0000);
                r.msrs.insert(0x830, 0);
                if own_apic_base {
                    r.msrs.insert(msr::APIC_BASE, 0xfee0_0900);
                }
                r
            };
            let mut results = Vec::new();
            for path in [MsrPath::KvmExits, MsrPath::Fallback, MsrPath::Interp] {
                let (io, apic_base) = run_msr_path(path, &code, recorder());
                assert_eq!(io.out_bytes(PORT_END), b"E", "{path:?}: {:?}", io.log);
                assert!(io.outs(PORT_EXC).is_empty(), "{path:?}: {:?}", io.log);
                let outs: Vec<u32> = io
                    .outs(0x83)
                    .iter()
                    .map(|d| u32::from_le_bytes([d[0], d[1], d[2], d[3]]))
                    .collect();
                assert_eq!(
                    outs,
                    [0x1122_3344, 0x55, 0x0300_0000, 0xfee0_0900, 0xfed0_0900],
                    "{path:?} (machine owns APIC base: {own_apic_base})"
                );
                assert_eq!(apic_base, 0xfed0_0900, "{path:?}");
                assert_eq!(io.msrs.get(&0x830), Some(&0x4000), "{path:?}");
                let star_asked = io
                    .log
                    .iter()
                    .any(|a| matches!(a, Access::Rdmsr(i, _) if *i == msr::STAR));
                assert_eq!(star_asked, path != MsrPath::KvmExits, "{path:?}");
                results.push((path, machine_view(&io)));
            }
            for (path, view) in &results[1..] {
                assert_eq!(
                    view, &results[0].1,
                    "{path:?} and KvmExits disagree (machine owns APIC base: {own_apic_base})"
                );
            }
            if own_apic_base {
                assert!(results[0].1.contains(&Access::Wrmsr(
                    msr::APIC_BASE,
                    0xfed0_0900,
                    MsrResult::Done(0)
                )));
            }
        }

        // Faults: the machine's Fault, and an MSR nobody implements, are
        // #GP on every path.
        for (index, write) in [(0x8ff, false), (0x8ff, true), (0x1234_5678, false)] {
            let code = msr_access_program(index, write);
            let mut views = Vec::new();
            for path in [MsrPath::KvmExits, MsrPath::Fallback, MsrPath::Interp] {
                let mut r = Recorder::default();
                r.msr_faults.insert(0x8ff);
                let (io, _) = run_msr_path(path, &code, r);
                assert_eq!(io.out_bytes(PORT_EXC), vec![13], "{path:?} {index:#x}");
                assert!(io.outs(PORT_END).is_empty(), "{path:?} {index:#x}");
                views.push(machine_view(&io));
            }
            assert_eq!(views[0].len(), 2, "{index:#x}: {:?}", views[0]);
            assert!(
                views.iter().all(|v| *v == views[0]),
                "{index:#x}: {views:?}"
            );
        }
    }

    // ---- the in-kernel irqchip ------------------------------------------

    /// `--irqchip kernel`: the VM gets KVM's PIC (its ports never reach the
    /// handler), an interrupt line raised from another thread wakes a
    /// guest halted in the kernel, and userspace injection is refused.
    #[test]
    fn kernel_irqchip_runs_a_guest() {
        use std::time::Duration;
        if !kvm_usable() {
            return;
        }
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let opts = VmOptions {
            irqchip: IrqchipKind::Kernel,
            ..VmOptions::default()
        };
        let mut backend = match KvmBackend::with_options(&mem, opts) {
            Ok(b) => b,
            Err(e) => {
                println!("this KVM has no in-kernel irqchip: {e}");
                assert!(matches!(e, BackendError::Unsupported(ref m) if m.contains("irqchip")));
                return;
            }
        };
        println!("this KVM: in-kernel irqchip and PIT created");
        assert_eq!(backend.irqchip(), IrqchipKind::Kernel);
        assert!(!backend.machine_msrs_supported());
        let vcpu = backend.create_kvm_vcpu(0).expect("create vCPU");
        let mut rig = Rig {
            vcpu,
            mem,
            _backend: backend,
        };
        rig.setup(Mode::Real);
        #[rustfmt::skip]
        let code = [
            0xb0, 0x11, 0xe6, 0x20, // ICW1
            0xb0, 0x20, 0xe6, 0x21, // ICW2: vectors 0x20..
            0xb0, 0x04, 0xe6, 0x21, // ICW3
            0xb0, 0x01, 0xe6, 0x21, // ICW4
            0xb0, 0xfd, 0xe6, 0x21, // mask all but IRQ1
            0xe4, 0x21, 0xe6, 0x83, // in al, 0x21; out 0x83, al
            0xb0, b'R', 0xe6, PORT_END as u8, // ready
            0xfb, 0xf4, // sti; hlt (in the kernel)
            0xb0, b'E', 0xe6, PORT_END as u8,
            0xe6, 0xf4, // exit request
            0xfa, 0xf4,
        ];
        rig.write(CODE, &code);
        rig.vcpu.set_state(&mode_state(Mode::Real)).unwrap();
        assert!(!rig.vcpu.ready_for_interrupt());
        assert!(matches!(
            rig.vcpu.inject_interrupt(0x21),
            Err(BackendError::Unsupported(_))
        ));
        let mut io = Recorder {
            exit_port: Some(0xf4),
            ..Default::default()
        };
        let kicker = rig.vcpu.kicker();
        let (backend, vcpu) = (&rig._backend, &mut rig.vcpu);
        let done = AtomicBool::new(false);
        let done = &done;
        let exit = std::thread::scope(|sc| {
            sc.spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                backend.set_irq_line(1, true).unwrap();
                backend.set_irq_line(1, false).unwrap();
                // Watchdog: a guest that never wakes is kicked out.
                for _ in 0..500 {
                    if done.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                kicker.kick();
            });
            let exit = vcpu.run(&mut io);
            done.store(true, Ordering::Relaxed);
            exit
        })
        .unwrap();
        assert_eq!(exit, VcpuExit::IoRequest, "{:?}", io.log);
        assert_eq!(io.out_bytes(0x83), vec![0xfd], "PIC mask read back");
        assert_eq!(io.out_bytes(PORT_HANDLED), vec![0x21]);
        assert_eq!(io.out_bytes(PORT_END), b"RE");
        assert!(
            !io.log.iter().any(|a| matches!(a,
                Access::In(p, _) | Access::Out(p, _) if matches!(p, 0x20 | 0x21))),
            "PIC ports reached userspace: {:?}",
            io.log
        );
        assert!(!rig.vcpu.stats().exits.iter().any(|(k, _)| k == "hlt"));
        assert!(rig._backend.tsc_khz().is_some());

        // `cli; hlt` waits in the kernel for good; a kick shows it halted.
        io.requested = false;
        let kicker = rig.vcpu.kicker();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            kicker.kick();
        });
        let exit = rig.vcpu.run(&mut io).unwrap();
        t.join().unwrap();
        assert_eq!(exit, VcpuExit::Halted);
        let s = rig.vcpu.state().unwrap();
        assert!(s.events.halted, "{:?}", s.events);
        assert_eq!(s.regs.rflags & cpu_interp::flags::IF, 0);
        assert_eq!(s.regs.rip, CODE + code.len() as u64);
        // Running on is the same wait.
        let kicker = rig.vcpu.kicker();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            kicker.kick();
        });
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
        t.join().unwrap();
        // An NMI wakes it (vector 2's stub reports and halts again).
        rig.vcpu.inject_nmi().unwrap();
        let kicker = rig.vcpu.kicker();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            kicker.kick();
        });
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
        t.join().unwrap();
        assert_eq!(io.out_bytes(PORT_EXC), vec![2]);
    }

    /// set_irq_line needs the kernel irqchip.
    #[test]
    fn set_irq_line_needs_the_kernel_irqchip() {
        if !kvm_usable() {
            return;
        }
        let rig = rig();
        let e = rig._backend.set_irq_line(4, true).unwrap_err();
        assert!(matches!(e, BackendError::Unsupported(_)), "{e}");
    }

    /// KVM's TSC frequency is known and plausible.
    #[test]
    fn tsc_khz_is_plausible() {
        if !kvm_usable() {
            return;
        }
        let rig = rig();
        let khz = rig._backend.tsc_khz().expect("TSC frequency");
        println!("this KVM: TSC {khz} kHz");
        assert!(khz > 100_000, "{khz} kHz");
    }

    /// MMIO from KVM and from the fallback reaches the same handler.
    #[test]
    fn mmio_from_kvm_and_from_the_fallback() {
        if !kvm_usable() {
            return;
        }
        let code = [
            0xa1, 0x00, 0x00, 0x00, 0xc0, // mov eax, [0xc0000000]
            0xa3, 0x10, 0x00, 0x00, 0xc0, // mov [0xc0000010], eax
            0xf3, 0x0f, 0xb8, 0x05, 0x00, 0x00, 0x00, 0xc0, // popcnt eax, [0xc0000000]
            0xe7, 0x83, // out 0x83, eax
        ];
        let (exit, io, rig) = run_snippet(Mode::Prot32, &code, true, 0);
        assert_eq!(exit, VcpuExit::Halted);
        let mmio: Vec<&Access> = io
            .log
            .iter()
            .filter(|a| matches!(a, Access::MmioRead(..) | Access::MmioWrite(..)))
            .collect();
        assert_eq!(
            mmio,
            [
                &Access::MmioRead(0xc000_0000, 4),
                &Access::MmioWrite(0xc000_0010, vec![0xab; 4]),
                &Access::MmioRead(0xc000_0000, 4),
            ]
        );
        assert_eq!(io.out_bytes(0x83), vec![20, 0, 0, 0]);
        assert_eq!(io.out_bytes(PORT_END), b"E");
        let st = rig.vcpu.stats();
        assert!(
            st.exits.iter().any(|(k, n)| k == "mmio" && *n >= 2),
            "{st:?}"
        );
        assert!(rig
            .vcpu
            .fallback_counts()
            .contains(&("popcnt".to_string(), 1)));
    }

    /// The fallback completes an instruction whose I/O asks for the VMM.
    #[test]
    fn fallback_io_request_returns_at_once() {
        if !kvm_usable() {
            return;
        }
        // popcnt eax, [0xc0000000] (refused, MMIO read); then 'E'.
        let code = [0xf3, 0x0f, 0xb8, 0x05, 0x00, 0x00, 0x00, 0xc0];
        let mut rig = rig();
        rig.setup(Mode::Prot32);
        let mut bytes = code.to_vec();
        bytes.extend([0xb0, b'E', 0xe6, PORT_END as u8, 0xf4]);
        rig.write(CODE, &bytes);
        rig.vcpu.set_state(&mode_state(Mode::Prot32)).unwrap();
        struct ExitOnMmio(Recorder);
        impl IoHandler for ExitOnMmio {
            fn pio_read(&mut self, port: u16, data: &mut [u8]) {
                self.0.pio_read(port, data)
            }
            fn pio_write(&mut self, port: u16, data: &[u8]) {
                self.0.pio_write(port, data)
            }
            fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
                self.0.mmio_read(addr, data);
                self.0.requested = true;
            }
            fn mmio_write(&mut self, addr: u64, data: &[u8]) {
                self.0.mmio_write(addr, data)
            }
            fn exit_requested(&self) -> bool {
                self.0.requested
            }
        }
        let mut io = ExitOnMmio(Recorder::default());
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::IoRequest);
        let s = rig.vcpu.state().unwrap();
        assert_eq!(s.regs.rip, CODE + code.len() as u64);
        assert_eq!(s.regs.gpr[0], 20);
        io.0.requested = false;
        // The write-back may still sit in kvm_run's sync area: an NMI queued
        // now must neither be lost nor undo it.
        rig.vcpu.inject_nmi().unwrap();
        assert_eq!(rig.vcpu.run(&mut io).unwrap(), VcpuExit::Halted);
        assert_eq!(io.0.out_bytes(PORT_EXC), vec![2]);
        let mut frame = [0u8; 4];
        rig.mem
            .read_slice(&mut frame, GuestAddress(STACK_TOP - 12))
            .unwrap();
        assert_eq!(u32::from_le_bytes(frame) as u64, CODE + code.len() as u64);
        assert_eq!(
            rig.vcpu.state().unwrap().regs.gpr[0],
            2,
            "AL from the NMI stub"
        );
    }

    /// A distinctive protected-mode state survives KVM unchanged.
    #[test]
    fn state_round_trip_through_kvm() {
        if !kvm_usable() {
            return;
        }
        let mut rig = rig();
        let mut s = mode_state(Mode::Prot32);
        for (i, g) in s.regs.gpr.iter_mut().enumerate() {
            *g = 0x0101_0101_0101_0101u64.wrapping_mul(i as u64 + 1);
        }
        s.regs.rip = 0x9123;
        s.regs.rflags = 0x2 | 0x1 | 0x40 | 0x800; // CF ZF OF, IF clear
        s.sregs.ldt = Segment {
            selector: 0,
            base: 0x5000,
            limit: 0xff,
            type_: 2,
            present: true,
            ..Default::default()
        };
        s.sregs.gdt = DescriptorTable {
            base: 0x500,
            limit: 0x1f,
        };
        s.sregs.idt = DescriptorTable {
            base: 0xb000,
            limit: 0x7ff,
        };
        s.sregs.cr2 = 0x1234_5678;
        s.sregs.cr3 = 0x40_3000;
        s.sregs.cr4 = 0x610; // PSE? no: OSFXSR | OSXMMEXCPT | PSE-less
        s.sregs.cr8 = 5;
        s.sregs.efer = 0x1; // SCE
        s.msrs = Msrs {
            star: 0x0023_0010_0000_0000,
            lstar: 0xffff_ffff_8100_0000,
            cstar: 0xffff_ffff_8100_1000,
            sfmask: 0x4_7700,
            kernel_gs_base: 0xffff_8880_0000_0000,
            sysenter_cs: 0x10,
            sysenter_esp: 0xffff_fe00_0000_0000,
            sysenter_eip: 0xffff_ffff_8100_2000,
            pat: 0x0007_0106_0007_0406,
            tsc_aux: 3,
            misc_enable: 1,
            mtrr: Default::default(),
        };
        s.fpu = sample_fpu();
        s.debug = DebugRegs {
            db: [0x1000, 0x2000, 0x3000, 0x4000],
            dr6: 0xffff_0ff1,
            dr7: 0x0000_0401,
        };
        s.events.nmi_masked = true;
        s.events.mov_ss_shadow = true;
        s.tsc = 1_000_000_000;
        rig.vcpu.set_state(&s).unwrap();
        let back = rig.vcpu.state().unwrap();
        assert_eq!(back.regs, s.regs);
        assert_eq!(back.sregs, s.sregs, "sregs");
        assert_eq!(back.msrs, s.msrs, "msrs");
        assert_eq!(back.fpu, s.fpu, "fpu");
        assert_eq!(back.debug, s.debug, "debug");
        assert_eq!(back.xcr0, s.xcr0);
        assert_eq!(back.events, s.events, "events");
        // KVM-PVM accepts TSC writes but ignores them (the guest reads the
        // host TSC); elsewhere the written value must come back.
        if back.tsc < s.tsc || back.tsc > s.tsc + 100_000_000_000 {
            let mut again = s;
            again.tsc = s.tsc * 7;
            rig.vcpu.set_state(&again).unwrap();
            let t2 = rig.vcpu.state().unwrap().tsc;
            assert!(
                t2 >= back.tsc && t2 < back.tsc + 100_000_000_000,
                "TSC writes neither take effect nor are ignored consistently: wrote {}, read {}; \
                 wrote {}, read {t2}",
                s.tsc,
                back.tsc,
                again.tsc
            );
            println!(
                "note: this KVM ignores TSC writes (read {} after writing {})",
                back.tsc, s.tsc
            );
        }
    }

    /// A long-mode state with XCR0, high segment bases and a queued
    /// interrupt (IF set: handed to KVM) survives KVM unchanged.
    #[test]
    fn long_mode_state_round_trip_through_kvm() {
        if !kvm_usable() {
            return;
        }
        let mut rig = rig();
        let mut s = mode_state(Mode::Long64);
        s.regs.rip = 0xffff_ffff_8000_1234;
        s.regs.rflags = 0x202;
        s.regs.gpr[cpu_interp::state::gpr::R13] = 0x1313_1313_1313_1313;
        s.sregs.fs.base = 0x7fff_1234_5000;
        s.sregs.gs.base = 0xffff_8880_0001_0000;
        s.sregs.ds = Segment {
            unusable: true,
            ..Segment::default()
        };
        s.sregs.cr4 |= (1 << 9) | (1 << 10) | (1 << 18) | (1 << 7); // OSFXSR OSXMMEXCPT OSXSAVE PGE
        s.sregs.efer |= 0x800 | 0x1; // NXE SCE
        s.sregs.cr8 = 0xf;
        s.xcr0 = 3;
        s.events.interrupt = Some(0x30);
        s.msrs.lstar = 0xffff_ffff_8100_0040;
        rig.vcpu.set_state(&s).unwrap();
        let back = rig.vcpu.state().unwrap();
        assert_eq!(back.regs, s.regs);
        assert_eq!(back.sregs, s.sregs);
        assert_eq!(back.xcr0, 3);
        assert_eq!(back.msrs, s.msrs);
        assert_eq!(back.events, s.events);
        assert!(!rig.vcpu.ready_for_interrupt(), "an interrupt is queued");
    }

    /// INT3 and INT n, which KVM-PVM refuses in ring 0 of protected and
    /// long mode, run on the interpreter; the handlers (on KVM) IRET back.
    #[test]
    fn fallback_executes_refused_instructions() {
        if !kvm_usable() {
            return;
        }
        for (mode, sync) in [Mode::Real, Mode::Prot32, Mode::Long64]
            .into_iter()
            .flat_map(|m| [(m, true), (m, false)])
        {
            // int3; int 0x21; xor ecx,ecx; xgetbv; out 0x83, al
            let snippet = [0xcc, 0xcd, 0x21, 0x31, 0xc9, 0x0f, 0x01, 0xd0, 0xe6, 0x83];
            let (exit, io, rig) = run_snippet_with(mode, &snippet, 1 << 18, |v| {
                if !sync {
                    without_sync_regs(v)
                }
            });
            let real = mode == Mode::Real;
            let mode = format!("{mode:?} sync regs {sync}");
            assert_eq!(exit, VcpuExit::Halted, "{mode:?}");
            assert_eq!(io.out_bytes(PORT_HANDLED), vec![3, 0x21], "{mode:?}");
            assert_eq!(io.out_bytes(0x83), vec![1], "{mode:?}: XCR0 low byte");
            assert_eq!(io.out_bytes(PORT_END), b"E", "{mode:?}");
            assert!(io.outs(PORT_EXC).is_empty(), "{mode:?}: {:?}", io.log);
            let st = rig.vcpu.stats();
            assert!(st.interp_fallbacks >= 1, "{mode:?}: {st:?}");
            assert!(
                st.exits.iter().any(|(k, _)| k == "fallback:xgetbv"),
                "{mode:?}: {st:?}"
            );
            if !real {
                assert!(st.interp_fallbacks >= 3, "{mode:?}: {st:?}");
                let counts = rig.vcpu.fallback_counts();
                assert!(counts.contains(&("int3".to_string(), 1)), "{counts:?}");
                assert!(counts.contains(&("int".to_string(), 1)), "{counts:?}");
            }
        }
    }

    /// KVM-PVM refuses the XSAVE family in ring 0; the fallback runs it over
    /// every state component the guest's CPUID offers (AVX-512 included
    /// where KVM forces it in), and the state survives the trips between
    /// KVM's XSAVE image and the interpreter.
    #[test]
    fn fallback_runs_xsave_and_xrstor_over_every_component() {
        if !kvm_usable() {
            return;
        }
        let mut rig = rig();
        rig.setup(Mode::Long64);
        let xcr0 = rig.vcpu.guest_xcr0 & xcomp::CARRIED;
        println!("guest XCR0 components: {xcr0:#x}");
        #[rustfmt::skip]
        let mut code = vec![
            0xbb, 0x00, 0x00, 0x01, 0x00, // mov ebx, 0x10000
            0xb8, 0xff, 0xff, 0xff, 0xff, // mov eax, -1
            0x89, 0xc2, // mov edx, eax
            0x48, 0x0f, 0xae, 0x23, // xsave64 [rbx]
            0x48, 0x0f, 0xae, 0xab, 0x00, 0x10, 0x00, 0x00, // xrstor64 [rbx+0x1000]
        ];
        // xor ecx, ecx ; xgetbv ; mov esi, eax (XCR0 after the init restore)
        code.extend([0x31, 0xc9, 0x0f, 0x01, 0xd0, 0x89, 0xc6]);
        // mov eax, -1 ; xrstor64 [rbx] ; hlt
        code.extend([0xb8, 0xff, 0xff, 0xff, 0xff, 0x48, 0x0f, 0xae, 0x2b, 0xf4]);
        rig.write(CODE, &code);
        rig.write(0x10000, &[0u8; 0x3000]);
        let mut s = mode_state(Mode::Long64);
        s.sregs.cr4 |= (1 << 9) | (1 << 18); // OSFXSR, OSXSAVE
        s.xcr0 = xcr0;
        s.fpu = sample_fpu();
        for (k, y) in s.fpu.ymm_hi.iter_mut().enumerate() {
            *y = (0xa5a5_u128 << 112) | k as u128;
        }
        if xcr0 & 0xe0 == 0xe0 {
            s.xstate.opmask = [1, 2, 3, 4, 5, 6, 7, 8];
            s.xstate.zmm_hi256[2] = [0x22, 0x23];
            s.xstate.hi16_zmm[9] = [9, 10, 11, 12];
        }
        if xcr0 & (1 << 9) != 0 {
            s.xstate.pkru = 0x55;
        }
        rig.vcpu.set_state(&s).unwrap();
        let mut io = Recorder::default();
        assert_eq!(rig.run(&mut io), VcpuExit::Halted, "{:?}", io.log);
        let back = rig.vcpu.state().unwrap();
        assert_eq!(
            back.regs.gpr[cpu_interp::state::gpr::RSI],
            xcr0 & 0xffff_ffff
        );
        assert_eq!(back.fpu.xmm, s.fpu.xmm);
        assert_eq!(back.fpu.ymm_hi, s.fpu.ymm_hi);
        assert_eq!(back.fpu.mxcsr, s.fpu.mxcsr);
        assert_eq!(back.fpu.st, s.fpu.st);
        assert_eq!(
            XState {
                xinuse: 0,
                ..back.xstate
            },
            XState {
                xinuse: 0,
                ..s.xstate
            }
        );
        // The image the guest saved has AVX (and AVX-512) where the
        // standard format puts them.
        let mut img = vec![0u8; 2696];
        rig.mem.read_slice(&mut img, GuestAddress(0x10000)).unwrap();
        let bv = u64::from_le_bytes(img[512..520].try_into().unwrap());
        assert_eq!(bv & 7, 7);
        assert_eq!(img[576 + 16 * 3 + 15], 0xa5);
        if xcr0 & 0xe0 == 0xe0 {
            assert_eq!(bv & 0xe0, 0xe0);
            assert_eq!(img[1088 + 8 * 7], 8);
            assert_eq!(img[1152 + 32 * 2 + 16], 0x23);
            assert_eq!(img[1664 + 64 * 9 + 48], 12);
        }
        let counts = rig.vcpu.fallback_counts();
        println!("{counts:?}");
        assert!(counts.iter().any(|(m, _)| m == "xsave64"), "{counts:?}");
        assert!(
            counts.iter().any(|(m, n)| m == "xrstor64" && *n == 2),
            "{counts:?}"
        );
    }

    /// An instruction neither KVM nor the interpreter executes ends the run
    /// with a message naming it.
    #[test]
    fn unimplemented_everywhere_is_unrecoverable() {
        if !kvm_usable() {
            return;
        }
        // RDPRU: KVM-PVM refuses it in ring 0 and the interpreter does not
        // implement it (an AMD instruction duet never advertises).
        assert!(!cpu_interp::dispatch::implemented(Code::Rdpru));
        for mode in [Mode::Real, Mode::Long64] {
            let (exit, io, rig) = run_snippet(mode, &[0x0f, 0x01, 0xfd], true, 0);
            let VcpuExit::Shutdown(ShutdownReason::Unrecoverable(msg)) = exit else {
                panic!("{mode:?}: expected an unrecoverable shutdown, got {exit:?}");
            };
            println!("{msg}");
            assert!(msg.contains("`rdpru"), "{msg}");
            assert!(msg.contains("0f 01 fd"), "{msg}");
            assert!(msg.contains(&format!("RIP={CODE:#018x}")), "{msg}");
            assert!(msg.contains("CR0="), "{msg}");
            assert!(msg.contains("RAX="), "{msg}");
            assert!(io.outs(PORT_END).is_empty());
            assert_eq!(rig.vcpu.stats().interp_fallbacks, 0);
        }
    }

    /// The x87/SSE state set through the backend is what the guest sees
    /// (FXSAVE), and what the guest loads (FXRSTOR) is what the backend reads.
    #[test]
    fn fpu_state_reaches_the_guest_and_back() {
        if !kvm_usable() {
            return;
        }
        let mut rig = rig();
        rig.setup(Mode::Long64);
        let code = [
            0xbb, 0x00, 0x98, 0x00, 0x00, // mov ebx, 0x9800
            0x48, 0x0f, 0xae, 0x03, // fxsave64 [rbx]
            0x48, 0x0f, 0xae, 0x8b, 0x00, 0x02, 0x00, 0x00, // fxrstor64 [rbx+0x200]
            0xf4, // hlt
        ];
        rig.write(CODE, &code);
        let mut loaded = sample_fpu();
        loaded.xmm.reverse();
        loaded.mxcsr = 0x1f80 | 0x3f;
        loaded.fsw = 2 << 11;
        loaded.fcw = 0x037f;
        let mut image = [0u32; 1024];
        kvm_fpu_to_fxsave(&fpu_to_kvm(&loaded), &mut image);
        rig.write(0x9a00, &region_bytes(&image, 512));
        let mut s = mode_state(Mode::Long64);
        s.sregs.cr4 |= 1 << 9; // OSFXSR
        s.fpu = sample_fpu();
        rig.vcpu.set_state(&s).unwrap();
        let mut io = Recorder::default();
        assert_eq!(rig.run(&mut io), VcpuExit::Halted);
        let mut saved = [0u8; 512];
        rig.mem
            .read_slice(&mut saved, GuestAddress(0x9800))
            .unwrap();
        let words: Vec<u32> = saved
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let seen = fpu_from_kvm(&fxsave_to_kvm_fpu(&words));
        assert_eq!(seen.xmm, s.fpu.xmm, "XMM as the guest saw them");
        assert_eq!(seen.mxcsr, s.fpu.mxcsr, "MXCSR as the guest saw it");
        assert_eq!(seen.st, s.fpu.st);
        assert_eq!(
            (seen.fcw, seen.fsw, seen.ftw),
            (s.fpu.fcw, s.fpu.fsw, s.fpu.ftw)
        );
        let back = rig.vcpu.state().unwrap().fpu;
        assert_eq!(back.xmm, loaded.xmm);
        assert_eq!(back.mxcsr, loaded.mxcsr);
        assert_eq!(back.st, loaded.st);
        assert_eq!(
            (back.fcw, back.fsw, back.ftw),
            (loaded.fcw, loaded.fsw, loaded.ftw)
        );
    }

    /// The three ways of transferring the x87/SSE state agree (KVM_GET/SET_FPU
    /// except for MXCSR, which that interface does not carry).
    #[test]
    fn fpu_transfer_interfaces_agree() {
        if !kvm_usable() {
            return;
        }
        let mut rig = rig();
        let native = rig.vcpu.caps.fpu;
        println!("this KVM: {native:?}");
        for (round, api) in [FpuApi::Xsave2(4096), FpuApi::Xsave, FpuApi::Fpu]
            .into_iter()
            .enumerate()
        {
            if matches!(api, FpuApi::Xsave2(_)) && !matches!(native, FpuApi::Xsave2(_)) {
                continue;
            }
            if api == FpuApi::Xsave && native == FpuApi::Fpu {
                continue;
            }
            let api = match api {
                FpuApi::Xsave2(_) => native,
                a => a,
            };
            let mut f = sample_fpu();
            f.xmm[0] = 0x1234_0000 + round as u128; // differs per round
            rig.vcpu.caps.fpu = api;
            rig.vcpu.write_fpu(&f, &XState::default()).unwrap();
            rig.vcpu.caps.fpu = native;
            let mut back = rig.vcpu.read_fpu().unwrap().0;
            if api == FpuApi::Fpu {
                back.mxcsr = f.mxcsr;
            }
            assert_eq!(back, f, "written with {api:?}");
            rig.vcpu.caps.fpu = api;
            let mut again = rig.vcpu.read_fpu().unwrap().0;
            rig.vcpu.caps.fpu = native;
            if api == FpuApi::Fpu {
                again.mxcsr = f.mxcsr;
            }
            assert_eq!(again, f, "read with {api:?}");
        }
    }

    /// Cost of one fallback, against the same loop without it.
    /// `cargo test -p duet --lib fallback_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; prints numbers"]
    fn fallback_cost() {
        if !kvm_usable() {
            return;
        }
        const N: u32 = 20_000;
        for (name, body) in [
            ("add", [0x01u8, 0xd0, 0x90, 0x90]),  // add eax, edx
            ("popcnt", [0xf3, 0x0f, 0xb8, 0xc2]), // popcnt eax, edx
        ] {
            let mut code = vec![0xb9];
            code.extend(N.to_le_bytes()); // mov ecx, N
            code.extend(body);
            code.extend([0xff, 0xc9, 0x75, 0xf8]); // dec ecx; jnz body
            for mode in [Mode::Prot32, Mode::Long64] {
                let t = std::time::Instant::now();
                let (exit, _io, rig) = run_snippet(mode, &code, true, 0);
                let dt = t.elapsed();
                assert_eq!(exit, VcpuExit::Halted);
                println!(
                    "{mode:?} {name} x{N}: {:.1} µs/iteration, fallbacks {}",
                    dt.as_secs_f64() * 1e6 / f64::from(N),
                    rig.vcpu.stats().interp_fallbacks
                );
            }
        }
    }

    /// Which instructions does this KVM refuse, per mode, and does the
    /// fallback cover them? Informational:
    /// `cargo test -p duet --lib survey_refusals -- --ignored --nocapture`.
    #[test]
    #[ignore = "survey of the host's KVM; prints a table"]
    fn survey_refusals() {
        use iced_x86::code_asm::*;
        if !kvm_usable() {
            return;
        }
        type Emit = fn(&mut CodeAssembler, u32) -> std::result::Result<(), IcedError>;
        fn m(bits: u32) -> AsmMemoryOperand {
            if bits == 64 {
                ptr(rbx)
            } else {
                ptr(ebx)
            }
        }
        const OSFXSR: u64 = 1 << 9;
        const OSXSAVE: u64 = 1 << 18;
        const ALL: u8 = 7;
        const NOT64: u8 = 3;
        const ONLY64: u8 = 4;
        let cases: Vec<(&str, u8, u64, u64, Emit)> = vec![
            ("nop", ALL, 0, 1, |a, _| a.nop()),
            ("add/sub/imul/div", ALL, 0, 1, |a, _| {
                a.mov(eax, 100)?;
                a.add(eax, 5)?;
                a.imul_3(eax, eax, 3)?;
                a.xor(edx, edx)?;
                a.mov(ecx, 7)?;
                a.div(ecx)
            }),
            ("int3", ALL, 0, 1, |a, _| a.int3()),
            ("int 0x21", ALL, 0, 1, |a, _| a.int(0x21)),
            ("int1", ALL, 0, 1, |a, _| a.int1()),
            ("into (OF=0)", NOT64, 0, 1, |a, _| a.into()),
            ("ud2", ALL, 0, 1, |a, _| a.ud2()),
            ("cpuid", ALL, 0, 1, |a, _| {
                a.xor(eax, eax)?;
                a.cpuid()
            }),
            ("rdtsc", ALL, 0, 1, |a, _| a.rdtsc()),
            ("rdtscp", ALL, 0, 1, |a, _| a.rdtscp()),
            ("rdpid", ALL, 0, 1, |a, b| {
                if b == 64 {
                    a.rdpid(rax)
                } else {
                    a.rdpid(eax)
                }
            }),
            ("rdrand", ALL, 0, 1, |a, _| a.rdrand(eax)),
            ("rdseed", ALL, 0, 1, |a, _| a.rdseed(eax)),
            ("rdpru", ALL, 0, 1, |a, _| {
                a.xor(ecx, ecx)?;
                a.rdpru()
            }),
            ("rdmsr STAR", ALL, 0, 1, |a, _| {
                a.mov(ecx, 0xc000_0081u32 as i32)?;
                a.rdmsr()
            }),
            ("wrmsr STAR", ALL, 0, 1, |a, _| {
                a.mov(ecx, 0xc000_0081u32 as i32)?;
                a.xor(eax, eax)?;
                a.xor(edx, edx)?;
                a.wrmsr()
            }),
            ("mov cr3 (rw)", NOT64, 0, 1, |a, _| {
                a.mov(eax, cr3)?;
                a.mov(cr3, eax)
            }),
            ("mov cr3 (rw) 64", ONLY64, 0, 1, |a, _| {
                a.mov(rax, cr3)?;
                a.mov(cr3, rax)
            }),
            ("mov dr7", NOT64, 0, 1, |a, _| {
                a.mov(eax, dr7)?;
                a.mov(dr7, eax)
            }),
            ("sgdt+lgdt", ALL, 0, 1, |a, b| {
                a.sgdt(m(b))?;
                a.lgdt(m(b))
            }),
            ("sidt+lidt", ALL, 0, 1, |a, b| {
                a.sidt(m(b))?;
                a.lidt(m(b))
            }),
            ("smsw/str/sldt", ALL, 0, 1, |a, _| {
                a.smsw(eax)?;
                a.str(eax)?;
                a.sldt(eax)
            }),
            ("invlpg", ALL, 0, 1, |a, b| a.invlpg(m(b))),
            ("wbinvd", ALL, 0, 1, |a, _| a.wbinvd()),
            ("pushf/popf/cli/sti", ALL, 0, 1, |a, _| {
                a.pushf()?;
                a.cli()?;
                a.popf()?;
                a.sti()?;
                a.cli()
            }),
            ("pause/fences", ALL, 0, 1, |a, _| {
                a.pause()?;
                a.lfence()?;
                a.mfence()?;
                a.sfence()
            }),
            ("clflush", ALL, 0, 1, |a, b| a.clflush(m(b))),
            ("clflushopt", ALL, 0, 1, |a, b| a.clflushopt(m(b))),
            ("clwb", ALL, 0, 1, |a, b| a.clwb(m(b))),
            ("clac", ALL, 0, 1, |a, _| a.clac()),
            ("stac", ALL, 0, 1, |a, _| a.stac()),
            ("invpcid type 2", ALL, 0, 1, |a, b| {
                a.mov(eax, 2)?;
                a.xor(ecx, ecx)?;
                a.mov(dword_ptr(m(b)), ecx)?;
                a.mov(dword_ptr(m(b) + 4), ecx)?;
                a.mov(dword_ptr(m(b) + 8), ecx)?;
                a.mov(dword_ptr(m(b) + 12), ecx)?;
                if b == 64 {
                    a.invpcid(rax, m(b))
                } else {
                    a.invpcid(eax, m(b))
                }
            }),
            ("movbe", ALL, 0, 1, |a, b| a.movbe(eax, dword_ptr(m(b)))),
            ("cmpxchg8b", ALL, 0, 1, |a, b| a.cmpxchg8b(m(b))),
            ("lock cmpxchg8b", ALL, 0, 1, |a, b| a.lock().cmpxchg8b(m(b))),
            ("cmpxchg16b", ONLY64, 0, 1, |a, b| a.cmpxchg16b(m(b))),
            ("lock cmpxchg16b", ONLY64, 0, 1, |a, b| {
                a.lock().cmpxchg16b(m(b))
            }),
            ("lock xadd/bts/cmpxchg", ALL, 0, 1, |a, b| {
                a.lock().xadd(dword_ptr(m(b)), eax)?;
                a.lock().bts(dword_ptr(m(b)), 3)?;
                a.lock().cmpxchg(dword_ptr(m(b)), ecx)?;
                a.xchg(dword_ptr(m(b)), eax)
            }),
            ("rep movsb/stosd", ALL, 0, 1, |a, b| {
                a.cld()?;
                if b == 64 {
                    a.mov(rsi, rbx)?;
                    a.lea(rdi, ptr(rbx + 0x100))?;
                } else {
                    a.mov(esi, ebx)?;
                    a.lea(edi, ptr(ebx + 0x100))?;
                }
                a.mov(ecx, 16)?;
                if b == 16 {
                    a.db(&[0x67, 0xf3, 0xa4])?; // rep movsb with 32-bit addresses
                    a.mov(ecx, 4)?;
                    a.db(&[0x67, 0x66, 0xf3, 0xab]) // rep stosd
                } else {
                    a.rep().movsb()?;
                    a.mov(ecx, 4)?;
                    a.rep().stosd()
                }
            }),
            ("bsf/bsr/bswap/cmov/setcc", ALL, 0, 1, |a, _| {
                a.mov(eax, 0x80)?;
                a.bsf(ecx, eax)?;
                a.bsr(edx, eax)?;
                a.bswap(eax)?;
                a.cmovz(eax, ecx)?;
                a.setnz(al)
            }),
            ("popcnt", ALL, 0, 1, |a, _| a.popcnt(eax, ecx)),
            ("lzcnt/tzcnt", ALL, 0, 1, |a, _| {
                a.lzcnt(eax, ecx)?;
                a.tzcnt(eax, ecx)
            }),
            ("andn/bextr/shlx/rorx", ALL, 0, 1, |a, _| {
                a.andn(eax, ecx, edx)?;
                a.bextr(eax, ecx, edx)?;
                a.shlx(eax, ecx, edx)?;
                a.rorx(eax, ecx, 3)
            }),
            ("adcx/adox", ALL, 0, 1, |a, _| {
                a.adcx(eax, ecx)?;
                a.adox(eax, ecx)
            }),
            ("crc32", ALL, 0, 1, |a, _| a.crc32(eax, ecx)),
            ("fninit/fld1/fadd/fstp", ALL, 0, 1, |a, b| {
                a.fninit()?;
                a.fld1()?;
                a.fld1()?;
                a.faddp(st1, st0)?;
                a.fstp(qword_ptr(m(b)))
            }),
            ("fnstcw/fldcw", ALL, 0, 1, |a, b| {
                a.fnstcw(word_ptr(m(b)))?;
                a.fldcw(word_ptr(m(b)))
            }),
            ("fxsave/fxrstor", ALL, OSFXSR, 1, |a, b| {
                a.fxsave(m(b))?;
                a.fxrstor(m(b))
            }),
            ("movaps/pxor/paddd", ALL, OSFXSR, 1, |a, _| {
                a.movaps(xmm1, xmm0)?;
                a.pxor(xmm0, xmm0)?;
                a.paddd(xmm0, xmm1)
            }),
            ("movdqu mem", ALL, OSFXSR, 1, |a, b| {
                a.movdqu(xmm0, xmmword_ptr(m(b)))?;
                a.movdqu(xmmword_ptr(m(b)), xmm0)
            }),
            ("pshufb/aesenc/pclmul", ALL, OSFXSR, 1, |a, _| {
                a.pshufb(xmm0, xmm1)?;
                a.aesenc(xmm0, xmm1)?;
                a.pclmulqdq(xmm0, xmm1, 0)
            }),
            ("ldmxcsr/stmxcsr", ALL, OSFXSR, 1, |a, b| {
                a.stmxcsr(dword_ptr(m(b)))?;
                a.ldmxcsr(dword_ptr(m(b)))
            }),
            ("cvtsi2sd/sqrtsd/addsd", ALL, OSFXSR, 1, |a, _| {
                a.cvtsi2sd(xmm0, eax)?;
                a.sqrtsd(xmm1, xmm0)?;
                a.addsd(xmm0, xmm1)
            }),
            ("xgetbv", ALL, OSXSAVE, 1, |a, _| {
                a.xor(ecx, ecx)?;
                a.xgetbv()
            }),
            ("xsetbv 1", ALL, OSXSAVE, 1, |a, _| {
                a.xor(ecx, ecx)?;
                a.mov(eax, 1)?;
                a.xor(edx, edx)?;
                a.xsetbv()
            }),
            ("xsave", ALL, OSXSAVE | OSFXSR, 3, |a, b| {
                a.mov(eax, 3)?;
                a.xor(edx, edx)?;
                a.xsave(m(b))
            }),
            ("xsaveopt", ALL, OSXSAVE | OSFXSR, 3, |a, b| {
                a.mov(eax, 3)?;
                a.xor(edx, edx)?;
                a.xsaveopt(m(b))
            }),
            ("xrstor (zeroed area)", ALL, OSXSAVE | OSFXSR, 3, |a, b| {
                a.mov(eax, 3)?;
                a.xor(edx, edx)?;
                a.xrstor(m(b))
            }),
            (
                "vpxor ymm / vzeroupper",
                ALL,
                OSXSAVE | OSFXSR,
                7,
                |a, _| {
                    a.vpxor(ymm0, ymm1, ymm2)?;
                    a.vzeroupper()
                },
            ),
            ("vmovdqu ymm mem", ALL, OSXSAVE | OSFXSR, 7, |a, b| {
                a.vmovdqu(ymm0, ymmword_ptr(m(b)))
            }),
            ("vpxord zmm", ONLY64, OSXSAVE | OSFXSR, 0xe7, |a, _| {
                a.vpxord(zmm0, zmm1, zmm2)
            }),
            ("swapgs", ONLY64, 0, 1, |a, _| {
                a.swapgs()?;
                a.swapgs()
            }),
            ("lar/lsl/verr", NOT64, 0, 1, |a, _| {
                a.mov(ecx, 0x10)?;
                a.lar(eax, ecx)?;
                a.lsl(eax, ecx)?;
                a.verr(cx)
            }),
            ("lahf/sahf/cbw/cwd/xlat", NOT64, 0, 1, |a, _| {
                a.lahf()?;
                a.sahf()?;
                a.cbw()?;
                a.cwd()?;
                a.xor(eax, eax)?;
                a.xlatb()
            }),
            ("enter/leave", ALL, 0, 1, |a, _| {
                a.enter(16, 0)?;
                a.leave()
            }),
            ("in al,0x61", ALL, 0, 1, |a, _| a.in_(al, 0x61)),
            ("hlt-less far ret? (call/ret)", ALL, 0, 1, |a, _| {
                let mut l = a.create_label();
                a.call(l)?;
                let mut end = a.create_label();
                a.jmp(end)?;
                a.set_label(&mut l)?;
                a.ret()?;
                a.set_label(&mut end)?;
                a.nop()
            }),
        ];
        let mut summary = Vec::new();
        for mode in [Mode::Real, Mode::Prot32, Mode::Long64] {
            let (bit, bits) = match mode {
                Mode::Real => (1u8, 16u32),
                Mode::Prot32 => (2, 32),
                Mode::Long64 => (4, 64),
            };
            for (name, modes, cr4_bits, xcr0_bits, emit) in &cases {
                if modes & bit == 0 {
                    continue;
                }
                let mut a = CodeAssembler::new(bits).unwrap();
                a.mov(ebx, 0x9800).unwrap();
                if let Err(e) = emit(&mut a, bits) {
                    println!("{mode:?} {name}: (does not assemble: {e})");
                    continue;
                }
                let bytes = a.assemble(CODE).unwrap();
                let outcome = |fallback: bool| {
                    let mut rig = rig();
                    rig.setup(mode);
                    let mut code = bytes.clone();
                    code.extend([0xb0, b'E', 0xe6, PORT_END as u8, 0xf4]);
                    rig.write(CODE, &code);
                    let mut s = mode_state(mode);
                    s.sregs.cr4 |= cr4_bits;
                    s.xcr0 = *xcr0_bits;
                    if let Err(e) = rig.vcpu.set_state(&s) {
                        return format!("set_state failed: {e}");
                    }
                    rig.vcpu.set_interp_fallback(fallback);
                    let mut io = Recorder::default();
                    let exit = rig.run(&mut io);
                    let fb = rig.vcpu.fallback_counts();
                    match exit {
                        VcpuExit::Shutdown(ShutdownReason::Unrecoverable(msg)) => {
                            let dis = msg
                                .lines()
                                .find_map(|l| l.trim().strip_prefix("instruction at RIP: "))
                                .map(str::to_string)
                                .unwrap_or_else(|| msg.lines().next().unwrap_or("").to_string());
                            if msg.starts_with("KVM could not emulate") {
                                format!("REFUSED `{dis}`")
                            } else {
                                format!("UNRECOVERABLE {}", msg.lines().next().unwrap_or(""))
                            }
                        }
                        VcpuExit::Halted if !io.outs(PORT_END).is_empty() => {
                            if fb.is_empty() {
                                "ok".into()
                            } else {
                                format!("ok via fallback {fb:?}")
                            }
                        }
                        VcpuExit::Halted if !io.outs(PORT_EXC).is_empty() => {
                            format!("exception {:?} fb {fb:?}", io.out_bytes(PORT_EXC))
                        }
                        e => format!("{e:?} {:?}", io.log),
                    }
                };
                let raw = outcome(false);
                let line = if raw.starts_with("REFUSED") {
                    format!("{raw} -> with fallback: {}", outcome(true))
                } else {
                    raw
                };
                println!("{mode:?} {name}: {line}");
                summary.push(line);
            }
        }
        assert!(!summary.is_empty());
    }
}
