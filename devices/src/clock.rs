//! The VM clock, injected into every device that keeps time.
//!
//! Models never read host time themselves. They are given a [`Clock`] and
//! read `now_ns()`; timers are *scheduled*, not polled: a model with a timer
//! reports its next deadline through [`Timed::next_deadline`] and the VMM
//! calls [`Timed::advance`] when the clock passes it. The VMM decides how
//! time flows: host monotonic time, or virtual time derived from the
//! interpreter's retired instructions (bit-for-bit repeatable runs), and —
//! later — time replayed from a recording.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Nanoseconds of VM time since the VM was created. Monotonic.
pub trait Clock: Send + Sync {
    fn now_ns(&self) -> u64;
}

/// A device with timers.
pub trait Timed {
    /// The VM time (ns) at which the device next needs `advance`, if any.
    fn next_deadline(&self) -> Option<u64>;
    /// Bring the device's timers up to `now` (fire whatever fell due,
    /// raising interrupt lines as needed).
    fn advance(&mut self, now: u64);
}

/// Set by a device when the value a guest read depends on elapsed time
/// (a PIT count, the LAPIC current count, RTC seconds, ...). The VMM's trace
/// checks and clears it after every access and marks such reads, so traces
/// from two runs can be compared with those values masked. Cloning shares
/// the flag.
#[derive(Clone, Default)]
pub struct TimeTaint {
    flag: Arc<std::sync::atomic::AtomicBool>,
}

impl TimeTaint {
    pub fn new() -> Self {
        Self::default()
    }

    /// Called by a device from `read` when the returned value depends on time.
    pub fn mark(&self) {
        self.flag.store(true, Ordering::Relaxed);
    }

    /// Called by the VMM after each access: was the value time-dependent?
    pub fn take(&self) -> bool {
        self.flag.swap(false, Ordering::Relaxed)
    }
}

/// A clock tests (and the virtual-time VMM) set by hand.
#[derive(Clone, Default)]
pub struct ManualClock {
    ns: Arc<AtomicU64>,
}

impl ManualClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set the time; it never goes backwards.
    pub fn set(&self, ns: u64) {
        self.ns.fetch_max(ns, Ordering::AcqRel);
    }

    pub fn advance_by(&self, ns: u64) {
        self.ns.fetch_add(ns, Ordering::AcqRel);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.ns.load(Ordering::Acquire)
    }
}

/// Convert a tick count of a `hz` counter to nanoseconds (rounded down).
pub fn ticks_to_ns(ticks: u64, hz: u64) -> u64 {
    ((u128::from(ticks) * 1_000_000_000) / u128::from(hz.max(1))) as u64
}

/// Convert nanoseconds to whole ticks of a `hz` counter (rounded down).
pub fn ns_to_ticks(ns: u64, hz: u64) -> u64 {
    ((u128::from(ns) * u128::from(hz)) / 1_000_000_000) as u64
}

/// The first nanosecond at which `ticks` of a `hz` counter have elapsed
/// (ceil(ticks * 1e9 / hz)), or `None` past the end of time.
pub fn ticks_to_ns_ceil(ticks: u128, hz: u64) -> Option<u64> {
    let hz = u128::from(hz.max(1));
    let ns = ticks.checked_mul(1_000_000_000)?.div_ceil(hz);
    u64::try_from(ns).ok()
}

/// The guest's time-stamp counter, as the devices that compare against it
/// (the local APIC's TSC-deadline timer) see it. Injected like the
/// [`Clock`]: the interpreter derives its TSC from the VM clock
/// ([`ClockTsc`]); on KVM the guest's TSC is the hardware's plus KVM's
/// offset, and the VMM gives the devices a source that reads exactly that,
/// so a deadline fires when the guest's own RDTSC passes it.
pub trait TscSource: Send + Sync {
    /// Ticks per second.
    fn hz(&self) -> u64;
    /// The guest TSC at VM time `now_ns`. Callers only ask about the
    /// present: a source that reads a hardware counter returns its value
    /// now.
    fn tsc_at(&self, now_ns: u64) -> u64;
    /// The first VM time (ns) at which the guest TSC reads `tsc` or more,
    /// `now_ns` being the present (`None` past the end of time). A source
    /// whose counter is not derived from the VM clock estimates it; the
    /// device checks [`TscSource::tsc_at`] again when that time comes. For
    /// a value already reached the answer is never later than `now_ns` (a
    /// caller that read the clock a moment earlier must find it due).
    fn ns_when(&self, tsc: u64, now_ns: u64) -> Option<u64>;
}

/// A TSC derived from the VM clock: `ns_to_ticks(now_ns, hz)`, counting
/// from 0 at VM creation (the interpreter's RDTSC, bit-for-bit repeatable
/// with a virtual clock).
pub struct ClockTsc {
    hz: u64,
}

impl ClockTsc {
    pub fn new(hz: u64) -> Self {
        ClockTsc { hz: hz.max(1) }
    }
}

impl TscSource for ClockTsc {
    fn hz(&self) -> u64 {
        self.hz
    }
    fn tsc_at(&self, now_ns: u64) -> u64 {
        ns_to_ticks(now_ns, self.hz)
    }
    fn ns_when(&self, tsc: u64, _now_ns: u64) -> Option<u64> {
        ticks_to_ns_ceil(u128::from(tsc), self.hz)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_is_monotonic() {
        let c = ManualClock::new();
        c.set(100);
        c.set(50);
        assert_eq!(c.now_ns(), 100);
        c.advance_by(5);
        assert_eq!(c.clone().now_ns(), 105);
    }

    #[test]
    fn taint_is_shared_and_cleared_on_take() {
        let t = TimeTaint::new();
        assert!(!t.take());
        t.clone().mark();
        assert!(t.take());
        assert!(!t.take());
    }

    #[test]
    fn tick_conversions_round_down_and_do_not_overflow() {
        assert_eq!(ns_to_ticks(1_000_000_000, 1_193_182), 1_193_182);
        assert_eq!(ticks_to_ns(1_193_182, 1_193_182), 1_000_000_000);
        assert_eq!(ns_to_ticks(838, 1_193_182), 0);
        assert_eq!(ns_to_ticks(839, 1_193_182), 1);
        assert!(ticks_to_ns(u64::MAX, 1) > 0);
    }
}
