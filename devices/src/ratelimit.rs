//! Rate limiting for log lines a guest can trigger.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lets the first `burst` events through, then one in every power of two
/// (so a guest hammering an unmapped port cannot flood the log).
#[derive(Debug)]
pub struct RateLimiter {
    burst: u64,
    count: AtomicU64,
}

impl RateLimiter {
    pub const fn new(burst: u64) -> Self {
        RateLimiter {
            burst,
            count: AtomicU64::new(0),
        }
    }

    /// Count one event; true when it should be logged.
    pub fn allow(&self) -> bool {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        n <= self.burst || n.is_power_of_two()
    }

    /// How many events were counted so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Lets exactly one event through: for "logged once" guest mistakes.
#[derive(Debug, Default)]
pub struct LogOnce(std::sync::atomic::AtomicBool);

impl LogOnce {
    pub const fn new() -> Self {
        LogOnce(std::sync::atomic::AtomicBool::new(false))
    }

    /// True the first time only.
    pub fn first(&self) -> bool {
        !self.0.swap(true, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_powers_of_two() {
        let r = RateLimiter::new(3);
        let allowed: Vec<u64> = (1..=40u64).filter(|_| r.allow()).collect();
        // Events 1..3 (the burst), then 4, 8, 16 and 32.
        assert_eq!(allowed, vec![1, 2, 3, 4, 8, 16, 32]);
        assert_eq!(r.count(), 40);
    }
}
