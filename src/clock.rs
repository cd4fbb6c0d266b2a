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

/// Host monotonic time since the VM was created, optionally hiding the
/// host's stalls from the guest.
///
/// **Stall compensation** (the interpreter's default). A guest's periodic
/// tick counts time: when the host does not run duet for longer than a
/// tick period (an overloaded machine, a `SIGSTOP`), every clock the guest
/// has jumps at once on resume, its timer interrupt comes a whole period or
/// more late, and the ticks in between are lost (Linux's periodic tick
/// then lags its TSC, and early in boot its clocksource watchdog marks the
/// TSC unstable). While the vCPU runs, duet reads this clock every few
/// microseconds, so a gap longer than [`STALL_THRESHOLD_NS`] between two
/// reads can only be the host's doing: the excess is hidden (VM time
/// advances by the threshold only). The hidden lag is then repaid by
/// slewing, as QEMU's `lost_tick_policy=slew` does for its RTC: VM time
/// runs [`SLEW_DENOMINATOR`]⁻¹ faster than host time until it has caught up,
/// so over a run it keeps the host's pace. At most [`MAX_HIDDEN_NS`] is
/// hidden; a longer stall shows as a jump beyond that. While the vCPU is
/// halted ([`HostClock::set_idle`]) gaps are real waiting and are never
/// hidden. Every guest clock (TSC, PIT, LAPIC timer, RTC, ACPI PM timer)
/// reads this one clock, so they stay consistent with each other.
///
/// The clock stands at zero until [`HostClock::start`] (the first time the
/// vCPU runs): the devices are built, and read their start times, at VM
/// time 0 however long the host took to set the machine up, so a replay
/// that builds them at 0 sees the same timers.
pub struct HostClock {
    origin: std::sync::OnceLock<Instant>,
    compensate: bool,
    state: std::sync::Mutex<Compensation>,
    /// VM time at `start` (non-zero after a restore).
    offset_ns: AtomicU64,
}

#[derive(Default)]
struct Compensation {
    last_raw: u64,
    hidden: u64,
    last_vm: u64,
    idle: bool,
}

/// A gap between two clock reads of a running vCPU longer than this is
/// the host's stall.
pub const STALL_THRESHOLD_NS: u64 = 1_000_000;
/// Hidden lag is repaid at 1/16 of the elapsed time (VM time runs 6.25%
/// fast while it catches up).
pub const SLEW_DENOMINATOR: u64 = 16;
/// The most lag hidden from the guest.
pub const MAX_HIDDEN_NS: u64 = 10_000_000_000;

impl HostClock {
    /// Plain host time.
    pub fn new() -> Self {
        HostClock {
            origin: std::sync::OnceLock::new(),
            compensate: false,
            state: Default::default(),
            offset_ns: AtomicU64::new(0),
        }
    }

    /// Let time run from now on (idempotent: only the first call counts).
    pub fn start(&self) {
        self.origin.get_or_init(Instant::now);
    }

    /// A clock that continues from a saved VM time.
    pub fn resume(state: &ClockState) -> Self {
        HostClock {
            offset_ns: AtomicU64::new(state.now_ns),
            ..Self::new()
        }
    }

    /// Continue from a saved VM time, in place (the devices keep their
    /// handle). Time never goes back: an earlier saved time is ignored.
    pub fn restore(&self, state: &ClockState) {
        let base = self.now_ns() - self.offset_ns.load(Ordering::Acquire);
        let want = state.now_ns.saturating_sub(base);
        self.offset_ns.fetch_max(want, Ordering::AcqRel);
    }

    /// Host time with the host's stalls hidden (see the type's docs).
    pub fn compensating() -> Self {
        HostClock {
            compensate: true,
            ..Self::new()
        }
    }

    /// The vCPU halts (`true`: gaps are real waiting) or runs again.
    pub fn set_idle(&self, idle: bool) {
        if !self.compensate {
            return;
        }
        let raw = self.raw();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Self::step(&mut s, raw);
        s.idle = idle;
    }

    /// Lag currently hidden from the guest (ns).
    pub fn hidden_ns(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).hidden
    }

    fn raw(&self) -> u64 {
        self.origin
            .get()
            .map_or(0, |o| o.elapsed().as_nanos() as u64)
    }

    /// Advance the compensation to host time `raw`; returns VM time.
    fn step(s: &mut Compensation, raw: u64) -> u64 {
        let delta = raw.saturating_sub(s.last_raw);
        s.last_raw = s.last_raw.max(raw);
        if !s.idle && delta > STALL_THRESHOLD_NS {
            s.hidden = (s.hidden + (delta - STALL_THRESHOLD_NS)).min(MAX_HIDDEN_NS);
        } else {
            s.hidden -= (delta / SLEW_DENOMINATOR).min(s.hidden);
        }
        let vm = raw.saturating_sub(s.hidden).max(s.last_vm);
        s.last_vm = vm;
        vm
    }

    #[cfg(test)]
    fn at(&self, raw: u64) -> u64 {
        let mut s = self.state.lock().unwrap();
        Self::step(&mut s, raw)
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for HostClock {
    fn now_ns(&self) -> u64 {
        let raw = self.raw();
        if !self.compensate {
            return self.offset_ns.load(Ordering::Relaxed) + raw;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.offset_ns.load(Ordering::Relaxed) + Self::step(&mut s, raw)
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
    fn host_clock_stands_until_started_then_moves_forward() {
        let c = HostClock::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(c.now_ns(), 0, "VM time waits for the first run");
        c.start();
        let a = c.now_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(c.now_ns() >= a + 2_000_000);
    }

    /// A stall of the host is hidden, then repaid by slewing; idle gaps
    /// are real; the clock never goes backwards.
    #[test]
    fn stalls_are_hidden_and_slewed_back() {
        const MS: u64 = 1_000_000;
        let c = HostClock::compensating();
        let mut raw = 0;
        // Running, read every 10 µs: VM time is host time.
        for _ in 0..100 {
            raw += 10_000;
            assert_eq!(c.at(raw), raw);
        }
        // A one-second stall: only the threshold shows.
        raw += 1000 * MS;
        let vm = c.at(raw);
        assert_eq!(vm, raw - (1000 * MS - STALL_THRESHOLD_NS));
        assert_eq!(c.hidden_ns(), 1000 * MS - STALL_THRESHOLD_NS);
        // Slewing: VM time runs 1/16 fast until the lag is repaid.
        let mut last = vm;
        while c.hidden_ns() > 0 {
            raw += 100_000;
            let v = c.at(raw);
            assert!(v > last && v - last <= 100_000 + 100_000 / SLEW_DENOMINATOR);
            last = v;
        }
        assert_eq!(last, raw);
        // Idle: a long gap is real time.
        let c = HostClock::compensating();
        c.start();
        c.set_idle(true);
        let before = c.now_ns();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let after = c.now_ns();
        assert!(after - before >= 5 * MS, "{}", after - before);
        c.set_idle(false);
        assert_eq!(c.hidden_ns(), 0);
        // A plain clock hides nothing.
        let p = HostClock::new();
        assert_eq!(p.hidden_ns(), 0);
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
