//! VM-level requests raised by devices (debug exit, reset, power off).
//!
//! A device does not stop the VM itself: it posts a [`VmAction`] to the
//! shared [`VmControl`], and the run loop, which polls it after each access,
//! returns from the vCPU and acts on it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What a device asks of the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmAction {
    /// isa-debug-exit: end the VM with this process exit status.
    DebugExit(u32),
    /// Reset the machine (i8042 pulse, ACPI reset register, ...).
    Reset,
    /// Power off (ACPI S5).
    PowerOff,
    /// The host user asked to quit (Ctrl-A x on the console).
    HostQuit,
    /// duet received this stop signal (SIGTERM, SIGINT, SIGHUP).
    HostSignal(i32),
}

#[derive(Default)]
struct Inner {
    pending: AtomicBool,
    action: Mutex<Option<VmAction>>,
}

/// A cloneable handle through which devices post actions. The first action
/// posted wins until it is taken.
#[derive(Clone, Default)]
pub struct VmControl {
    inner: Arc<Inner>,
}

impl VmControl {
    pub fn new() -> Self {
        Self::default()
    }

    /// Post an action; ignored if one is already pending.
    pub fn request(&self, action: VmAction) {
        let mut slot = self.inner.action.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(action);
            self.inner.pending.store(true, Ordering::Release);
        }
    }

    /// Cheap check the run loop makes after every access.
    pub fn is_pending(&self) -> bool {
        self.inner.pending.load(Ordering::Acquire)
    }

    /// Take the pending action, if any.
    pub fn take(&self) -> Option<VmAction> {
        let mut slot = self.inner.action.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.pending.store(false, Ordering::Release);
        slot.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins_until_taken() {
        let c = VmControl::new();
        assert!(!c.is_pending());
        c.request(VmAction::DebugExit(3));
        c.clone().request(VmAction::Reset);
        assert!(c.is_pending());
        assert_eq!(c.take(), Some(VmAction::DebugExit(3)));
        assert!(!c.is_pending());
        assert_eq!(c.take(), None);
        c.request(VmAction::Reset);
        assert_eq!(c.take(), Some(VmAction::Reset));
    }
}
