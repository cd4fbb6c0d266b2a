//! Kicks a running vCPU when the next timer deadline falls due.
//!
//! A KVM vCPU blocked in `KVM_RUN` cannot see the VM clock; this thread
//! sleeps until the armed deadline and then kicks it (signal +
//! `immediate_exit`, see `backend::kvm`), so timer interrupts are not held
//! back until the guest's next exit. The interpreter checks deadlines itself
//! at block boundaries and needs no ticker.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::backend::Kick;

#[derive(Default)]
struct Shared {
    deadline: Option<Instant>,
    stop: bool,
}

/// The ticker thread's handle; dropping it stops the thread.
pub struct Ticker {
    shared: Arc<(Mutex<Shared>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    pub fn spawn(kick: Arc<dyn Kick>) -> Self {
        let shared: Arc<(Mutex<Shared>, Condvar)> = Arc::default();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("duet-ticker".into())
            .spawn(move || {
                let (m, cv) = &*s;
                let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if g.stop {
                        return;
                    }
                    match g.deadline {
                        None => g = cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                        Some(d) => {
                            let now = Instant::now();
                            if now >= d {
                                g.deadline = None;
                                kick.kick();
                            } else {
                                g = cv
                                    .wait_timeout(g, d - now)
                                    .unwrap_or_else(|e| e.into_inner())
                                    .0;
                            }
                        }
                    }
                }
            })
            .ok();
        Ticker { shared, thread }
    }

    /// Kick at `after` from now (replacing any earlier arming).
    pub fn arm(&self, after: Duration) {
        let (m, cv) = &*self.shared;
        m.lock().unwrap_or_else(|e| e.into_inner()).deadline = Some(Instant::now() + after);
        cv.notify_all();
    }

    pub fn disarm(&self) {
        let (m, _) = &*self.shared;
        m.lock().unwrap_or_else(|e| e.into_inner()).deadline = None;
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let (m, cv) = &*self.shared;
        m.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize);
    impl Kick for Count {
        fn kick(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn kicks_once_per_arming_and_not_when_disarmed() {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        let t = Ticker::spawn(c.clone());
        t.arm(Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        t.arm(Duration::from_millis(200));
        t.disarm();
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        drop(t);
    }
}
