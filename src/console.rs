//! The serial console: host stdin feeds the UART's receiver (raw terminal
//! mode when stdin is a terminal, restored on every exit path), and
//! Ctrl-A x quits, as in QEMU. Non-terminal stdin (a pipe) works for
//! scripted sessions; its end of file just stops the input.
//!
//! All serial input enters the VM through [`SerialInput::feed`] into the
//! machine's [`SerialInbox`], which the machine empties into the UART at
//! its poll points: the one place a recorder logs it and a replay feeds it
//! back.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use devices::uart16550::Uart16550;
use devices::{VmAction, VmControl};

use crate::backend::Kick;

/// Ctrl-A, the escape key.
const ESCAPE: u8 = 0x01;

/// Errors setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot set the terminal to raw mode: {0}")]
    Termios(std::io::Error),
}

static SAVED_TERMIOS: OnceLock<Mutex<Option<libc::termios>>> = OnceLock::new();
static RESTORED: AtomicBool = AtomicBool::new(false);

fn saved() -> &'static Mutex<Option<libc::termios>> {
    SAVED_TERMIOS.get_or_init(|| Mutex::new(None))
}

/// Restore the terminal if raw mode was set (idempotent; async-signal
/// tolerant enough for our handlers: one tcsetattr call).
pub fn restore_terminal() {
    if RESTORED.swap(true, Ordering::AcqRel) {
        return;
    }
    let t = match saved().try_lock() {
        Ok(g) => *g,
        Err(_) => None,
    };
    if let Some(t) = t {
        // SAFETY: tcsetattr on fd 0 with a termios value previously read by
        // tcgetattr for the same fd.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &t);
        }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    restore_terminal();
    // SAFETY: resetting the disposition to the default and re-raising the
    // signal are async-signal-safe; the process then ends as it would have.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Puts stdin in raw mode while alive; restores it on drop, on panic and on
/// SIGTERM/SIGHUP/SIGQUIT.
pub struct RawMode;

impl RawMode {
    /// Enter raw mode if stdin is a terminal; `None` otherwise.
    pub fn enter() -> Result<Option<RawMode>, ConsoleError> {
        // SAFETY: isatty only inspects the file descriptor.
        if unsafe { libc::isatty(0) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a termios struct.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return Err(ConsoleError::Termios(std::io::Error::last_os_error()));
        }
        *saved().lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        RESTORED.store(false, Ordering::Release);
        let mut raw = t;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side messages stay readable.
        raw.c_oflag |= libc::OPOST;
        // SAFETY: valid termios for fd 0.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
            return Err(ConsoleError::Termios(std::io::Error::last_os_error()));
        }
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            prev(info);
        }));
        for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGINT] {
            // SAFETY: installing a handler that only calls async-signal-safe
            // functions (tcsetattr, signal, raise).
            unsafe {
                libc::signal(sig, on_signal as *const () as libc::sighandler_t);
            }
        }
        Ok(Some(RawMode))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Serial input waiting for the machine: host threads queue bytes here;
/// the machine moves them into the UART at its poll points, as the
/// receiver has room (see [`crate::replay`]: the one door input enters
/// by, so a recorder can log it).
pub struct SerialInbox {
    pending: Mutex<Vec<u8>>,
    kick: Arc<dyn Kick>,
    chip: Arc<dyn crate::irqchip::IrqChip>,
}

impl SerialInbox {
    pub fn new(kick: Arc<dyn Kick>, chip: Arc<dyn crate::irqchip::IrqChip>) -> Self {
        SerialInbox {
            pending: Mutex::new(Vec::new()),
            kick,
            chip,
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Move what `uart` accepts now into it (the machine, at a poll
    /// point); the bytes moved. Nothing moves before the guest's driver
    /// has set its receiver up (before that, the driver's own FIFO resets
    /// would discard them; see [`Uart16550::ready_for_input`]).
    pub fn deliver(&self, uart: &Mutex<Uart16550>) -> Vec<u8> {
        let mut pending = self.pending();
        if pending.is_empty() {
            return Vec::new();
        }
        let mut uart = uart.lock().unwrap_or_else(|e| e.into_inner());
        if !uart.ready_for_input() {
            return Vec::new();
        }
        let n = uart.enqueue_input(&pending);
        pending.drain(..n).collect()
    }
}

/// Where a host thread puts serial input: the machine's [`SerialInbox`].
pub struct SerialInput {
    inbox: Arc<SerialInbox>,
}

impl SerialInput {
    pub fn new(inbox: Arc<SerialInbox>) -> Self {
        SerialInput { inbox }
    }

    /// Queue bytes for the guest and get the machine's attention.
    /// Returns how many bytes are waiting.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        let n = {
            let mut p = self.inbox.pending();
            p.extend_from_slice(bytes);
            p.len()
        };
        if !bytes.is_empty() {
            self.inbox.kick.kick();
            self.inbox.chip.wake();
        }
        n
    }

    /// How many bytes still wait for the UART (the machine moves them as
    /// the guest reads).
    pub fn flush(&mut self) -> usize {
        self.inbox.pending().len()
    }
}

/// Retry waiting input until the UART has taken all of it (or `stop`).
fn drain(input: &mut SerialInput, stop: &dyn Fn() -> bool) {
    let mut pause = Duration::from_millis(1);
    while input.flush() > 0 && !stop() {
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// Read `source` on a thread, handle Ctrl-A escapes when `escape` (a
/// terminal), feed the UART; at end of input, deliver what is left.
pub fn spawn_reader(
    name: &str,
    mut source: Box<dyn Read + Send>,
    mut input: SerialInput,
    control: VmControl,
    kick: Arc<dyn Kick>,
    escape: bool,
) {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            let mut saw_escape = false;
            let stop = || control.is_pending();
            loop {
                let n = match source.read(&mut buf) {
                    Ok(0) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                    Ok(n) => n,
                };
                let mut out = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if escape && saw_escape {
                        saw_escape = false;
                        match b {
                            b'x' | b'X' => {
                                control.request(VmAction::HostQuit);
                                kick.kick();
                                return;
                            }
                            ESCAPE => out.push(ESCAPE),
                            _ => {}
                        }
                    } else if escape && b == ESCAPE {
                        saw_escape = true;
                    } else {
                        out.push(b);
                    }
                }
                input.feed(&out);
                drain(&mut input, &stop);
            }
            drain(&mut input, &stop);
        })
        .ok();
}

/// Read host stdin on a thread, handle Ctrl-A escapes, feed the UART.
pub fn spawn_stdin(input: SerialInput, control: VmControl, kick: Arc<dyn Kick>, escape: bool) {
    spawn_reader(
        "duet-stdin",
        Box::new(std::io::stdin()),
        input,
        control,
        kick,
        escape,
    );
}
