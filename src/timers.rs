//! The machine's timers: every timed device model and the VM clock, with
//! the earliest deadline kept at hand for the run loop and the backends.

use std::sync::{Arc, Mutex};

use devices::{Clock, Timed};

use crate::clock::VirtualClock;

/// The machine's timed devices and its clock.
pub struct Timers {
    clock: Arc<dyn Clock>,
    timed: Vec<Arc<Mutex<dyn Timed + Send>>>,
    pub(crate) vclock: Option<VirtualClock>,
    /// Cached earliest deadline (ns), `u64::MAX` when none.
    pub(crate) deadline: u64,
}

impl Timers {
    pub fn new(
        clock: Arc<dyn Clock>,
        timed: Vec<Arc<Mutex<dyn Timed + Send>>>,
        vclock: Option<VirtualClock>,
    ) -> Self {
        let mut t = Timers {
            clock,
            timed,
            vclock,
            deadline: u64::MAX,
        };
        t.deadline = t.compute_deadline();
        t
    }

    /// Add a timed device (plugged in after the machine was built).
    pub fn add(&mut self, t: Arc<Mutex<dyn Timed + Send>>) {
        self.timed.push(t);
        self.deadline = self.compute_deadline();
    }

    pub fn now(&self) -> u64 {
        self.clock.now_ns()
    }

    pub(crate) fn compute_deadline(&self) -> u64 {
        self.timed
            .iter()
            .filter_map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).next_deadline())
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The earliest timer deadline.
    pub fn next_deadline(&self) -> Option<u64> {
        (self.deadline != u64::MAX).then_some(self.deadline)
    }

    /// Fire every timer that fell due; recompute the deadline. Whether
    /// any fired.
    pub fn advance_due(&mut self) -> bool {
        let now = self.now();
        let mut fired = false;
        if now >= self.deadline {
            for t in &self.timed {
                let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                if t.next_deadline().is_some_and(|d| d <= now) {
                    t.advance(now);
                    fired = true;
                }
            }
        }
        self.deadline = self.compute_deadline();
        fired
    }
}
