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
    /// What `--record` uses for host time on the interpreter: time derived
    /// from retired instructions while the guest runs, and real time while
    /// it waits (halted): the clock then jumps forward by the time waited,
    /// and the log keeps each jump. A replay makes the same jumps.
    Recorded,
}

/// Host monotonic time since the VM was created.
pub struct HostClock {
    start: Instant,
    /// VM time at `start` (non-zero after a restore).
    offset_ns: AtomicU64,
}

impl HostClock {
    pub fn new() -> Self {
        HostClock {
            start: Instant::now(),
            offset_ns: AtomicU64::new(0),
        }
    }

    /// A clock that continues from a saved VM time.
    pub fn resume(state: &ClockState) -> Self {
        HostClock {
            start: Instant::now(),
            offset_ns: AtomicU64::new(state.now_ns),
        }
    }

    /// Continue from a saved VM time, in place (the devices keep their
    /// handle). Time never goes back: an earlier saved time is ignored.
    pub fn restore(&self, state: &ClockState) {
        let elapsed = self.start.elapsed().as_nanos() as u64;
        let want = state.now_ns.saturating_sub(elapsed);
        self.offset_ns.fetch_max(want, Ordering::AcqRel);
    }
}

/// The VM clock's state, for snapshots: the VM time when it was saved.
/// A restored clock continues from there (VM time never goes back).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClockState {
    pub now_ns: u64,
}

impl ClockState {
    /// Bumped when the struct changes meaning.
    pub const VERSION: u32 = 1;

    pub fn of(clock: &dyn Clock) -> Self {
        ClockState {
            now_ns: clock.now_ns(),
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
        self.offset_ns.load(Ordering::Relaxed) + self.start.elapsed().as_nanos() as u64
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

    /// A clock that continues from a saved VM time, for a CPU whose
    /// retired-instruction count starts again from 0.
    pub fn resume(state: &ClockState) -> Self {
        let c = Self::default();
        c.skipped.store(state.now_ns, Ordering::Relaxed);
        c
    }

    /// Continue from a saved VM time, in place, for a CPU whose
    /// retired-instruction count continues from what this clock has seen
    /// (a fresh machine: 0). Time never goes back.
    pub fn restore(&self, state: &ClockState) {
        let ran = self.instructions.load(Ordering::Relaxed) * VIRTUAL_NS_PER_INSTRUCTION;
        let want = state.now_ns.saturating_sub(ran);
        self.skipped.fetch_max(want, Ordering::Relaxed);
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
    fn clocks_resume_from_their_saved_time() {
        let v = VirtualClock::new();
        v.set_instructions(1_000);
        v.skip_to(5_000);
        let saved = ClockState::of(&v);
        let bytes = serde_json::to_vec(&saved).unwrap();
        let back: ClockState = serde_json::from_slice(&bytes).unwrap();
        let r = VirtualClock::resume(&back);
        assert_eq!(r.now_ns(), 5_000);
        r.set_instructions(10);
        assert_eq!(r.now_ns(), 5_010);
        assert_eq!(
            serde_json::to_vec(&ClockState::of(&VirtualClock::resume(&back))).unwrap(),
            bytes
        );
        let h = HostClock::resume(&ClockState {
            now_ns: 7_000_000_000,
        });
        assert!(h.now_ns() >= 7_000_000_000 && h.now_ns() < 8_000_000_000);
    }

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
