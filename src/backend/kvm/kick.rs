//! Kicks: making a vCPU thread leave `KVM_RUN` (see the module docs).

use super::*;

/// The signal that interrupts a vCPU thread's `KVM_RUN`: SIGRTMIN+1, with a
/// no-op handler installed once per process (without `SA_RESTART`, so the
/// ioctl returns `EINTR`), and unblocked by `run` on the thread that calls
/// it. `None` if the handler could not be installed;
/// kicks then still work, except that a guest already running inside
/// `KVM_RUN` is only interrupted at its next exit.
pub fn kick_signal() -> Option<libc::c_int> {
    static SIGNAL: OnceLock<Option<libc::c_int>> = OnceLock::new();
    *SIGNAL.get_or_init(|| {
        extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        let sig = vmm_sys_util::signal::SIGRTMIN() + 1;
        match vmm_sys_util::signal::register_signal_handler(sig, noop) {
            Ok(()) => Some(sig),
            Err(e) => {
                log::warn!(
                    "kvm: cannot install the vCPU kick signal handler for signal {sig} ({e}); \
                     kicks wait for the guest's next exit"
                );
                None
            }
        }
    })
}

/// `kvm_run.immediate_exit` of one vCPU, written from any thread.
pub(super) struct ImmediateExit(pub(super) NonNull<u8>);

// SAFETY: the pointer is only dereferenced (atomically) while the vCPU that
// owns the mapping is alive: `KvmVcpu::drop` removes it, under the mutex
// every user holds, before the mapping goes away.
unsafe impl Send for ImmediateExit {}

impl ImmediateExit {
    pub(super) fn store(&self, v: u8) {
        // SAFETY: `self.0` points at the `immediate_exit` byte of the vCPU's
        // kvm_run mapping, which is live (see the `Send` impl) and suitably
        // aligned for a u8. The byte is shared with the kernel (which only
        // reads it at KVM_RUN entry) and written by duet only through this
        // atomic view, from the vCPU thread and from kicking threads.
        let byte = unsafe { AtomicU8::from_ptr(self.0.as_ptr()) };
        byte.store(v, Ordering::SeqCst);
    }
}

/// Who to interrupt, guarded by [`KvmKick::target`].
pub(super) struct KickTarget {
    /// The vCPU thread, while it is inside (or about to enter) `KVM_RUN`.
    pub(super) thread: Option<libc::pthread_t>,
    /// `None` once the vCPU is gone.
    pub(super) immediate_exit: Option<ImmediateExit>,
}

/// A vCPU's kick, shared with the threads that kick it.
///
/// Invariant: `pending` and `immediate_exit` are set together by [`Kick::kick`]
/// and cleared together by [`KvmKick::consume`], both under `target`, so a
/// kick is never half-consumed. The vCPU thread also sets `immediate_exit`
/// on its own (to complete an I/O exit without re-entering the guest),
/// which never conflicts with a kick.
pub(super) struct KvmKick {
    /// A kick not yet answered by a return from `run`. Also what the
    /// interpreter fallback polls (through [`IoPlatform`]).
    pub(super) pending: AtomicBool,
    pub(super) target: Mutex<KickTarget>,
    pub(super) signal: Option<libc::c_int>,
}

impl KvmKick {
    pub(super) fn new(immediate_exit: NonNull<u8>) -> Self {
        KvmKick {
            pending: AtomicBool::new(false),
            target: Mutex::new(KickTarget {
                thread: None,
                immediate_exit: Some(ImmediateExit(immediate_exit)),
            }),
            signal: kick_signal(),
        }
    }

    pub(super) fn target(&self) -> std::sync::MutexGuard<'_, KickTarget> {
        self.target.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The vCPU thread is about to enter `KVM_RUN`.
    pub(super) fn enter(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.target().thread = Some(me);
    }

    /// Make sure the calling thread (about to run the vCPU) does not block
    /// the kick signal; `checked` remembers the last thread checked.
    pub(super) fn unblock_here(&self, checked: &mut Option<libc::pthread_t>) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if *checked == Some(me) {
            return;
        }
        *checked = Some(me);
        if let Some(sig) = self.signal {
            if let Err(e) = vmm_sys_util::signal::unblock_signal(sig) {
                log::warn!("kvm: cannot unblock the vCPU kick signal {sig} on this thread: {e}");
            }
        }
    }

    /// The vCPU thread is back from `KVM_RUN`.
    pub(super) fn leave(&self) {
        self.target().thread = None;
    }

    /// Set `immediate_exit` from the vCPU thread (to complete a pending
    /// I/O exit without re-entering the guest).
    pub(super) fn set_immediate_exit(&self) {
        if let Some(ie) = &self.target().immediate_exit {
            ie.store(1);
        }
    }

    /// `run` is returning: pending kicks are answered. Clears
    /// `immediate_exit`; true if a kick was pending.
    pub(super) fn consume(&self) -> bool {
        let t = self.target();
        if let Some(ie) = &t.immediate_exit {
            ie.store(0);
        }
        self.pending.swap(false, Ordering::SeqCst)
    }

    pub(super) fn is_pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    /// The vCPU is being destroyed: its kvm_run mapping goes away.
    pub(super) fn detach(&self) {
        let mut t = self.target();
        t.immediate_exit = None;
        t.thread = None;
    }
}

impl Kick for KvmKick {
    fn kick(&self) {
        let t = self.target();
        self.pending.store(true, Ordering::SeqCst);
        if let Some(ie) = &t.immediate_exit {
            ie.store(1);
        }
        if let (Some(thread), Some(sig)) = (t.thread, self.signal) {
            // SAFETY: `thread` is registered by the vCPU thread right before
            // KVM_RUN and removed right after, both under the lock held
            // here, so it names a live thread; the signal's handler is a
            // no-op installed for the whole process.
            let r = unsafe { libc::pthread_kill(thread, sig) };
            if r != 0 {
                log::debug!("kvm: pthread_kill for a vCPU kick failed: errno {r}");
            }
        }
    }
}
