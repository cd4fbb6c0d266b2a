//! A per-thread watchdog that interrupts a KVM_RUN which takes too long (a
//! guest that loops), by signalling the vCPU thread until the run returns.
//!
//! KVM_RUN returns EINTR when a signal is pending for its thread; the KVM
//! backend turns that into `VcpuExit::Interrupted`. A signal that arrives
//! while the thread is outside KVM_RUN is simply consumed by the no-op
//! handler, which is why the watchdog keeps signalling every few
//! milliseconds while its deadline has passed and it is still armed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::DifftestError;

/// The signal used to kick the vCPU thread.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn on_kick(_sig: libc::c_int) {}

fn install_handler() -> Result<(), DifftestError> {
    static ONCE: Once = Once::new();
    static FAILED: AtomicBool = AtomicBool::new(false);
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler
        // is an `extern "C"` function that does nothing (async-signal
        // safe), and no SA_RESTART so that blocking calls return EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
                FAILED.store(true, Ordering::Release);
            }
        }
    });
    if FAILED.load(Ordering::Acquire) {
        return Err(DifftestError::Watchdog(format!(
            "cannot install the handler for signal {}: {}",
            kick_signal(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

struct Shared {
    start: Instant,
    /// Nanoseconds since `start` when the current run was armed; 0 = idle.
    armed_at: AtomicU64,
    fired: AtomicBool,
    stop: AtomicBool,
    timeout_ns: u64,
    target: libc::pthread_t,
}

/// Interrupts the thread that created it when a run exceeds the timeout.
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// A watchdog for the calling thread.
    pub fn new(timeout: Duration) -> Result<Self, DifftestError> {
        install_handler()?;
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let shared = Arc::new(Shared {
            start: Instant::now(),
            armed_at: AtomicU64::new(0),
            fired: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            timeout_ns: timeout.as_nanos().min(u128::from(u64::MAX)) as u64,
            target,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("difftest-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(5));
                if s.stop.load(Ordering::Acquire) {
                    return;
                }
                let at = s.armed_at.load(Ordering::Acquire);
                if at == 0 {
                    continue;
                }
                let now = s.start.elapsed().as_nanos() as u64;
                if now.saturating_sub(at) > s.timeout_ns {
                    s.fired.store(true, Ordering::Release);
                    // SAFETY: `target` is the thread that owns this
                    // watchdog; it outlives the watchdog thread, which is
                    // joined in `Drop` before the owner can exit.
                    unsafe {
                        libc::pthread_kill(s.target, kick_signal());
                    }
                }
            })
            .map_err(|e| DifftestError::Watchdog(format!("cannot start the thread: {e}")))?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    /// Start timing a run.
    pub fn arm(&self) {
        self.shared.fired.store(false, Ordering::Release);
        let now = (self.shared.start.elapsed().as_nanos() as u64).max(1);
        self.shared.armed_at.store(now, Ordering::Release);
    }

    /// Did the current run exceed the timeout?
    pub fn fired(&self) -> bool {
        self.shared.fired.load(Ordering::Acquire)
    }

    /// Stop timing; returns whether the deadline passed.
    pub fn disarm(&self) -> bool {
        self.shared.armed_at.store(0, Ordering::Release);
        self.fired()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.armed_at.store(0, Ordering::Release);
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
