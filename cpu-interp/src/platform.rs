//! What the interpreter needs from the machine around it.
//!
//! RAM is reached directly through the guest memory mapping (see
//! [`crate::memory`]); everything else — port I/O, physical addresses that are
//! not RAM, the clock — goes through this trait. The interpreter knows nothing
//! of devices, buses or backends. The VMM's device I/O implements it once for
//! both of its backends: KVM's exits are serviced through the same trait.

/// The machine's answer to an MSR access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrResult {
    /// Not a machine MSR: the CPU handles it (or raises #GP).
    Unhandled,
    /// Handled; for reads, the value.
    Done(u64),
    /// The machine rejects the access: #GP(0).
    Fault,
}

/// How often (in retired instructions) the CPU asks
/// [`Platform::stop_requested`] when the platform names no earlier point.
pub const DEFAULT_CHECK_INTERVAL: u64 = 4096;

/// Services the interpreter calls synchronously, in the middle of an
/// instruction when needed (an MMIO read inside `add [mem], eax`).
pub trait Platform {
    /// `IN`: fill `data` (1, 2 or 4 bytes) from `port`.
    fn io_read(&mut self, port: u16, data: &mut [u8]);
    /// `OUT`: write `data` (1, 2 or 4 bytes) to `port`.
    fn io_write(&mut self, port: u16, data: &[u8]);
    /// A read of guest-physical memory that is not RAM.
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]);
    /// A write of guest-physical memory that is not RAM.
    fn mmio_write(&mut self, addr: u64, data: &[u8]);
    /// True when the machine wants the CPU to stop at the next instruction
    /// boundary (a device asked for a VM-level action such as reset). KVM's
    /// backend asks after every exit it services and returns the vCPU.
    fn stop_requested(&self) -> bool {
        false
    }
    /// Told the number of instructions retired so far, right before every
    /// port or MMIO access and every stop check, so a machine whose clock
    /// is derived from the instruction count (virtual time) is exact at the
    /// access. (KVM's backend never calls it.)
    fn retired_hint(&mut self, _retired: u64) {}
    /// RDMSR of an MSR the machine may own (local APIC: IA32_APIC_BASE,
    /// x2APIC 0x800–0x8ff, TSC_DEADLINE). Asked before the CPU's own MSRs.
    fn read_msr(&mut self, _msr: u32) -> MsrResult {
        MsrResult::Unhandled
    }
    /// WRMSR counterpart of [`Platform::read_msr`].
    fn write_msr(&mut self, _msr: u32, _value: u64) -> MsrResult {
        MsrResult::Unhandled
    }
    /// The retired-instruction count at which the CPU must next stop at an
    /// instruction boundary and ask [`Platform::stop_requested`]: the next
    /// timer deadline when time derives from the instruction count, a poll
    /// interval otherwise. Asked after every event check; `retired` is the
    /// current count. The CPU stops exactly there (inside a block if need
    /// be), so deadlines are taken with no latency in virtual time. (KVM's
    /// backend never calls it.)
    fn next_check(&mut self, retired: u64) -> u64 {
        retired.saturating_add(DEFAULT_CHECK_INTERVAL)
    }
    /// MOV from CR8: the task-priority class (TPR bits 7:4) of a machine
    /// whose local APIC owns the TPR; `None` lets the CPU keep CR8 itself.
    fn read_cr8(&mut self) -> Option<u64> {
        None
    }
    /// MOV to CR8 (already checked for reserved bits). True when the
    /// machine took it (its local APIC's TPR is now `cr8 << 4`).
    fn write_cr8(&mut self, _cr8: u64) -> bool {
        false
    }
    /// The time-stamp counter: what `RDTSC` returns before the TSC offset.
    /// `None` lets the interpreter use its retired-instruction count.
    fn tsc(&mut self) -> Option<u64> {
        None
    }
}

/// A platform with nothing attached: reads return all ones, writes are dropped.
/// Useful for tests and for the differential harness.
#[derive(Debug, Default)]
pub struct NullPlatform;

impl Platform for NullPlatform {
    fn io_read(&mut self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn io_write(&mut self, _port: u16, _data: &[u8]) {}
    fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&mut self, _addr: u64, _data: &[u8]) {}
}
