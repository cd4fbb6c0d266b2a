//! The guest's TSC on KVM, for duet's own LAPIC model (`--irqchip
//! userspace`): the TSC-deadline timer must fire when the guest's RDTSC
//! passes IA32_TSC_DEADLINE, and on KVM that counter is the host's TSC
//! plus KVM's per-vCPU offset (duet never asks KVM to scale the TSC, so
//! the rates are the same), not the VM clock.
//!
//! [`KvmGuestTsc`] reads the host TSC and adds the offset. The vCPU learns
//! the offset from KVM (`KVM_VCPU_TSC_OFFSET`, exact; where a KVM lacks it,
//! KVM_GET_MSRS(IA32_TSC) between two host reads, taken so that the
//! estimate never runs ahead of the guest: a deadline may then fire up to
//! one ioctl late, never early) at every IA32_TSC_DEADLINE access the
//! machine serves, so a guest or VMM write of IA32_TSC in between is
//! followed.

use std::sync::atomic::{AtomicU64, Ordering};

use devices::clock::ticks_to_ns_ceil;
use devices::TscSource;

/// The host's TSC.
pub(super) fn host_tsc() -> u64 {
    // SAFETY: RDTSC reads a counter and touches no memory; every x86-64
    // CPU has it (and duet's KVM backend only builds for x86-64).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The guest TSC: host TSC + offset.
pub struct KvmGuestTsc {
    /// Ticks per second; 0 until KVM has told (from the VM, else from the
    /// first vCPU).
    hz: AtomicU64,
    offset: AtomicU64,
}

impl KvmGuestTsc {
    pub(super) fn new(hz: u64) -> Self {
        KvmGuestTsc {
            hz: AtomicU64::new(hz),
            offset: AtomicU64::new(0),
        }
    }

    /// KVM's TSC frequency, once known.
    pub(super) fn set_hz(&self, hz: u64) {
        self.hz.store(hz, Ordering::Release);
    }

    /// Whether the frequency is known (TSC-deadline is offered only then).
    pub(super) fn known(&self) -> bool {
        self.hz.load(Ordering::Acquire) != 0
    }

    /// Guest TSC = host TSC + `offset` (two's complement).
    pub(super) fn set_offset(&self, offset: u64) {
        self.offset.store(offset, Ordering::Release);
    }
}

impl TscSource for KvmGuestTsc {
    fn hz(&self) -> u64 {
        self.hz.load(Ordering::Acquire).max(1)
    }

    fn tsc_at(&self, _now_ns: u64) -> u64 {
        host_tsc().wrapping_add(self.offset.load(Ordering::Acquire))
    }

    fn ns_when(&self, tsc: u64, now_ns: u64) -> Option<u64> {
        let current = self.tsc_at(now_ns);
        if tsc <= current {
            // When it passed (rounded down): never later than the present,
            // so a caller that read the clock a moment before this one
            // still finds the deadline due.
            let ago = u128::from(current - tsc) * 1_000_000_000 / u128::from(self.hz());
            return Some(now_ns.saturating_sub(u64::try_from(ago).unwrap_or(u64::MAX)));
        }
        now_ns.checked_add(ticks_to_ns_ceil(u128::from(tsc - current), self.hz())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_host_tsc_plus_the_offset() {
        let t = KvmGuestTsc::new(1_000_000_000);
        // An offset that puts the guest 1e12 ticks behind the host.
        t.set_offset(0u64.wrapping_sub(1_000_000_000_000));
        let before = host_tsc();
        let g = t.tsc_at(0);
        let after = host_tsc();
        let behind = |h: u64| h.wrapping_sub(1_000_000_000_000);
        assert!(
            g.wrapping_sub(behind(before)) <= after - before,
            "{g} {before} {after}"
        );
        // A deadline already passed was due before now (by as long ago as it
        // passed: 1e6 ticks are 1 ms at 1 GHz); one 1e6 ticks ahead is due
        // at most 1 ms from now.
        let due = t.ns_when(g, 5_000).unwrap();
        assert!(due <= 5_000, "{due}");
        let due = t.ns_when(g.wrapping_sub(1_000_000), 2_000_000).unwrap();
        assert!(due <= 1_000_000, "{due}");
        let when = t
            .ns_when(t.tsc_at(0).wrapping_add(1_000_000), 5_000)
            .unwrap();
        assert!(when > 5_000 && when <= 5_000 + 1_000_000, "{when}");
    }
}
