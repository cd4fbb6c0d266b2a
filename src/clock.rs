//! The VM clock implementations: host monotonic time, or virtual time
//! derived from the interpreter's retired-instruction count.
//!
//! Every timekeeping device (PIT, LAPIC timer, RTC, TSC) reads one
//! `Arc<dyn devices::Clock>`; in virtual mode a run is bit-for-bit
//! repeatable because time advances only with instructions and, while the
//! vCPU is halted, jumps straight to the next timer deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use devices::Clock;

/// Which clock a machine uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ClockKind {
    /// Host monotonic time (the default).
    #[default]
    Host,
    /// Time derived from retired instructions (interpreter only).
    Virtual,
}

/// Host monotonic time since the VM was created.
pub struct HostClock {
    start: Instant,
}

impl HostClock {
    pub fn new() -> Self {
        HostClock {
            start: Instant::now(),
        }
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for HostClock {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// Nanoseconds of virtual time per retired instruction: a virtual CPU of
/// 1000 MIPS.
pub const VIRTUAL_NS_PER_INSTRUCTION: u64 = 1;

/// Virtual time: `instructions × VIRTUAL_NS_PER_INSTRUCTION + skipped`,
/// where `skipped` accumulates the idle time jumped over while halted.
#[derive(Clone, Default)]
pub struct VirtualClock {
    instructions: Arc<AtomicU64>,
    skipped: Arc<AtomicU64>,
}

impl VirtualClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// The interpreter's retired-instruction count (monotonic).
    pub fn set_instructions(&self, n: u64) {
        self.instructions.fetch_max(n, Ordering::Relaxed);
    }

    /// The smallest retired-instruction count at which `now_ns() >= ns`
    /// (with no idle time skipped meanwhile).
    pub fn instructions_at(&self, ns: u64) -> u64 {
        let skipped = self.skipped.load(Ordering::Relaxed);
        ns.saturating_sub(skipped)
            .div_ceil(VIRTUAL_NS_PER_INSTRUCTION)
    }

    /// While idle: jump forward so that `now_ns() >= ns`.
    pub fn skip_to(&self, ns: u64) {
        let now = self.now_ns();
        if ns > now {
            self.skipped.fetch_add(ns - now, Ordering::Relaxed);
        }
    }
}

impl Clock for VirtualClock {
    fn now_ns(&self) -> u64 {
        self.instructions.load(Ordering::Relaxed) * VIRTUAL_NS_PER_INSTRUCTION
            + self.skipped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_clock_moves_forward() {
        let c = HostClock::new();
        let a = c.now_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(c.now_ns() >= a + 2_000_000);
    }

    #[test]
    fn virtual_clock_follows_instructions_and_skips() {
        let c = VirtualClock::new();
        c.set_instructions(1000);
        assert_eq!(c.now_ns(), 1000 * VIRTUAL_NS_PER_INSTRUCTION);
        c.set_instructions(10); // never backwards
        assert_eq!(c.now_ns(), 1000 * VIRTUAL_NS_PER_INSTRUCTION);
        c.skip_to(5000);
        assert_eq!(c.now_ns(), 5000);
        c.skip_to(10);
        assert_eq!(c.now_ns(), 5000);
        c.set_instructions(2000);
        assert_eq!(c.now_ns(), 5000 + 1000 * VIRTUAL_NS_PER_INSTRUCTION);
    }

    #[test]
    fn instruction_count_of_a_deadline() {
        let c = VirtualClock::new();
        c.skip_to(500);
        for deadline in [0, 499, 500, 501, 10_000] {
            let n = c.instructions_at(deadline);
            c.set_instructions(n);
            assert!(c.now_ns() >= deadline, "{deadline}: {n}");
            if n > 0 {
                let d = VirtualClock::new();
                d.skip_to(500);
                d.set_instructions(n - 1);
                assert!(d.now_ns() < deadline, "{deadline}: {n} is not the first");
            }
        }
    }
}
