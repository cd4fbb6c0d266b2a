//! SIGTERM, SIGINT and SIGHUP stop the VM cleanly, as in QEMU: the run
//! loop returns at the next vCPU exit with [`Outcome::HostSignal`], the
//! machine is dropped (disk images get their `fdatasync`, captures their
//! last bytes, the terminal its mode) and duet exits with status 0. A
//! second signal while that happens ends the process at once.
//!
//! The signals are blocked in every thread ([`StopSignals::block`], before
//! the first thread starts) and taken by one thread with `sigwait`, so
//! no handler runs in the middle of device code.
//!
//! [`Outcome::HostSignal`]: crate::machine::Outcome::HostSignal

use std::sync::Arc;

use devices::{VmAction, VmControl};

use crate::backend::Kick;

/// Host failures setting the signals up.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("cannot block the stop signals: {0}")]
    Mask(std::io::Error),
    #[error("cannot start the signal thread: {0}")]
    Thread(std::io::Error),
}

/// The signals that stop the VM.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// The stop signals, blocked in this thread and every thread it starts.
pub struct StopSignals {
    set: libc::sigset_t,
}

/// The signal's name for messages.
pub fn name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

impl StopSignals {
    /// Block the stop signals (call before any thread starts).
    pub fn block() -> Result<Self, SignalError> {
        // SAFETY: sigset_t is plain data that sigemptyset initialises.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for s in STOP_SIGNALS {
                libc::sigaddset(&mut set, s);
            }
        }
        // SAFETY: a valid set; the old mask is not wanted.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if r != 0 {
            return Err(SignalError::Mask(std::io::Error::from_raw_os_error(r)));
        }
        Ok(StopSignals { set })
    }

    /// Start the thread that turns the first stop signal into a VM stop
    /// request and a second one into an immediate exit.
    pub fn spawn_waiter(self, control: VmControl, kick: Arc<dyn Kick>) -> Result<(), SignalError> {
        let set = self.set;
        std::thread::Builder::new()
            .name("duet-signals".into())
            .spawn(move || {
                let mut first = true;
                loop {
                    let mut sig: libc::c_int = 0;
                    // SAFETY: `set` is a valid sigset_t whose signals are
                    // blocked in every thread; `sig` is a valid out-pointer.
                    if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                        return;
                    }
                    if first {
                        first = false;
                        log::info!("{}: stopping the VM", name(sig));
                        control.request(VmAction::HostSignal(sig));
                        kick.kick();
                    } else {
                        crate::console::restore_terminal();
                        eprintln!("duet: {} again: exiting at once", name(sig));
                        std::process::exit(128 + sig);
                    }
                }
            })
            .map_err(SignalError::Thread)?;
        Ok(())
    }
}
