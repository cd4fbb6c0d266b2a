//! The KVM backend: duet's machine model on `/dev/kvm`, with the interpreter
//! as a per-instruction fallback.
//!
//! # Design
//!
//! - Interrupt controllers ([`IrqchipKind`]):
//!   - `Userspace` (the default): no in-kernel irqchip and no in-kernel PIT.
//!     Every port and MMIO access exits to userspace and goes through the
//!     VMM's [`Platform`], exactly as with the interpreter. External
//!     interrupts are queued with `KVM_INTERRUPT` (userspace irqchip
//!     semantics: KVM injects at the next entry whatever is queued, so it
//!     is only queued when the guest can take it; otherwise it is held here
//!     and injected from an interrupt-window exit).
//!   - `Kernel` (for comparison): KVM's PIC, IOAPIC, local APICs and PIT
//!     (`KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`). Their ports (0x20/0x21,
//!     0xa0/0xa1, 0x4d0/0x4d1, 0x40–0x43 and, with the PIT's speaker dummy,
//!     0x61) and MMIO (IOAPIC 0xfec00000, LAPIC 0xfee00000) never reach the
//!     [`Platform`]; the VMM raises interrupt lines with
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
//!   [`Platform::read_msr`]/[`Platform::write_msr`] through
//!   `KVM_CAP_X86_USER_SPACE_MSR` exits, as they do on the interpreter (see
//!   [`USER_SPACE_MSR_REASONS`] and [`MACHINE_MSR_RANGES`]). Only then are
//!   x2APIC and TSC-deadline advertised in CPUID
//!   ([`KvmBackend::machine_msrs_supported`]).
//! - `probe`: [`probe_kernel_lapic`] finds out whether the in-kernel LAPIC
//!   keeps a delivered vector in service until the guest's EOI (KVM-PVM
//!   ends it at delivery; docs/IO.md).
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
    Backend, BackendError, CpuState, DebugRegs, DescriptorTable, FpuState, GuestMemory,
    IrqchipKind, Kick, MsrResult, Msrs, PendingEvents, Platform, Regs, Result, Segment,
    ShutdownReason, Sregs, Vcpu, VcpuExit, VcpuStats, VmOptions, XState,
};

mod convert;
mod kick;
mod messages;
mod probe;
#[cfg(test)]
mod tests;
mod tsc;
mod vcpu;
mod vm;

pub use self::convert::*;
pub use self::kick::*;
use self::messages::*;
pub use self::probe::{probe_kernel_lapic, KernelLapicFacts};
use self::tsc::host_tsc;
pub use self::tsc::KvmGuestTsc;
pub use self::vcpu::*;
pub use self::vm::*;

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

use devices::lapic::{MSR_TSC_DEADLINE, MSR_X2APIC_FIRST};
/// The guest's MAXPHYADDR in `cpuid` (leaf 0x80000008 EAX[7:0]; 36 when
/// the leaf is absent, as the SDM says).
fn cpuid_phys_addr_bits(cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> u32 {
    cpuid
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map_or(devices::lapic::DEFAULT_PHYS_ADDR_BITS, |e| e.eax & 0xff)
}

/// The machine's MSRs, as `(first, count)`: KVM's MSR filter denies guest
/// accesses to them, which `KVM_MSR_EXIT_REASON_FILTER` turns into exits to
/// the [`Platform`]. (Without an in-kernel LAPIC KVM would store
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
