//! Where the guest's serial console (COM1) goes on the host: `--serial
//! stdio|file=PATH|socket=PATH|pty|null`, in the style of Cloud
//! Hypervisor's `--serial` and QEMU's `-serial`.
//!
//! | mode | guest output | guest input |
//! |---|---|---|
//! | `stdio` (default) | stdout | stdin (raw mode and Ctrl-A x on a terminal) |
//! | `file=PATH` | PATH (created or truncated) | stdin, as for `stdio` |
//! | `socket=PATH` | the client connected to the Unix socket PATH (the last 64 KiB are replayed to a client that connects late) | that client |
//! | `pty` | a new pseudo-terminal, named on stderr | that pseudo-terminal |
//! | `null` | discarded | none |
//!
//! duet's own messages always go to stderr, so with `file=` a CI job gets
//! the guest console alone in a file.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::VmControl;

use crate::backend::Kick;
use crate::console::{spawn_reader, SerialInput};

/// How much guest output a late socket client is shown.
pub const SOCKET_BACKLOG: usize = 64 * 1024;

/// A `--serial` value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SerialMode {
    #[default]
    Stdio,
    File(PathBuf),
    Socket(PathBuf),
    Pty,
    Null,
}

/// What `--serial` accepts, for messages.
pub const SERIAL_MODES: &str = "stdio, file=PATH, socket=PATH, pty or null";

impl FromStr for SerialMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let path = |p: &str, what: &str| {
            if p.is_empty() {
                Err(format!(
                    "{what}= needs a path, e.g. {what}=/tmp/duet-console"
                ))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        match s {
            "stdio" => Ok(SerialMode::Stdio),
            "pty" => Ok(SerialMode::Pty),
            "null" => Ok(SerialMode::Null),
            _ => {
                if let Some(p) = s.strip_prefix("file=") {
                    path(p, "file").map(SerialMode::File)
                } else if let Some(p) = s.strip_prefix("socket=") {
                    path(p, "socket").map(SerialMode::Socket)
                } else {
                    Err(format!("expected {SERIAL_MODES}"))
                }
            }
        }
    }
}

/// Errors opening the host side of the console. Each names what failed
/// and how to fix it; the caller adds the flag.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot create the file: {0}")]
    Create(String),
    #[error("the path already exists (remove it, or choose another path)")]
    Exists,
    #[error("cannot listen on it: {0}")]
    Listen(String),
    #[error("cannot open a pseudo-terminal: {0}")]
    Pty(String),
}

fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound => "no such directory (check the path)".into(),
        ErrorKind::PermissionDenied => "permission denied (choose a writable place)".into(),
        ErrorKind::IsADirectory => "is a directory".into(),
        _ => e.to_string(),
    }
}

/// Where guest input comes from.
enum InputSource {
    Stdin,
    Socket(UnixListener, Arc<Mutex<SocketOut>>),
    Pty(Arc<OwnedFd>),
    None,
}

/// The opened host side of the console.
pub struct SerialPort {
    output: Option<Box<dyn Write + Send>>,
    input: InputSource,
    /// A line for stderr telling the user where the console is (pty).
    pub notice: Option<String>,
    /// Removed when the port is dropped (the socket file).
    cleanup: Option<PathBuf>,
    /// duet's own descriptor of the pseudo-terminal's slave side (pty).
    pty_slave: Option<File>,
}

/// How long, at exit, duet waits for a pseudo-terminal's reader to take
/// the last output (closing the master hangs the terminal up and discards
/// what is still queued).
const PTY_DRAIN_TIMEOUT: Duration = Duration::from_millis(500);

impl SerialMode {
    /// Open the host side: create the file, bind the socket, allocate the
    /// pseudo-terminal.
    pub fn open(&self) -> Result<SerialPort, SerialError> {
        let port = |output: Box<dyn Write + Send>, input| SerialPort {
            output: Some(output),
            input,
            notice: None,
            cleanup: None,
            pty_slave: None,
        };
        match self {
            SerialMode::Stdio => Ok(port(Box::new(std::io::stdout()), InputSource::Stdin)),
            SerialMode::Null => Ok(port(Box::new(std::io::sink()), InputSource::None)),
            SerialMode::File(p) => {
                let f = File::create(p).map_err(|e| SerialError::Create(io_reason(&e)))?;
                Ok(port(Box::new(f), InputSource::Stdin))
            }
            SerialMode::Socket(p) => {
                if p.exists() || p.is_symlink() {
                    return Err(SerialError::Exists);
                }
                let l = UnixListener::bind(p).map_err(|e| SerialError::Listen(io_reason(&e)))?;
                let out = Arc::new(Mutex::new(SocketOut::default()));
                let mut sp = port(
                    Box::new(SocketWriter(out.clone())),
                    InputSource::Socket(l, out),
                );
                sp.notice = Some(format!("duet: serial console on socket {}", p.display()));
                sp.cleanup = Some(p.clone());
                Ok(sp)
            }
            SerialMode::Pty => {
                let (master, slave, name) = open_pty().map_err(SerialError::Pty)?;
                let master = Arc::new(master);
                let mut sp = port(
                    Box::new(PtyWriter(master.clone())),
                    InputSource::Pty(master),
                );
                sp.notice = Some(format!("duet: serial console on {name}"));
                sp.pty_slave = Some(slave);
                Ok(sp)
            }
        }
    }
}

impl SerialPort {
    /// The sink for the UART's output (once).
    pub fn take_output(&mut self) -> Box<dyn Write + Send> {
        self.output
            .take()
            .unwrap_or_else(|| Box::new(std::io::sink()))
    }

    /// Does guest input come from stdin (so a terminal goes to raw mode)?
    pub fn reads_stdin(&self) -> bool {
        matches!(self.input, InputSource::Stdin)
    }

    /// Start the thread that feeds guest input. `escape`: Ctrl-A x quits
    /// (stdin on a terminal).
    pub fn start_input(
        &mut self,
        input: SerialInput,
        control: VmControl,
        kick: Arc<dyn Kick>,
        escape: bool,
    ) {
        match std::mem::replace(&mut self.input, InputSource::None) {
            InputSource::Stdin => crate::console::spawn_stdin(input, control, kick, escape),
            InputSource::None => {}
            InputSource::Pty(fd) => spawn_reader(
                "duet-pty",
                Box::new(PtyReader(fd)),
                input,
                control,
                kick,
                false,
            ),
            InputSource::Socket(listener, out) => {
                spawn_socket_acceptor(listener, out, input, control);
            }
        }
    }
}

impl Drop for SerialPort {
    fn drop(&mut self) {
        if let Some(p) = &self.cleanup {
            std::fs::remove_file(p).ok();
        }
        if let Some(slave) = &self.pty_slave {
            drain_pty(slave);
        }
    }
}

/// Wait (at most [`PTY_DRAIN_TIMEOUT`]) until the terminal's input queue
/// has been read: the kernel moves written bytes to the slave side
/// asynchronously, and the hang-up that closing the master causes
/// discards whatever is still queued. Two empty readings in a row, 10 ms
/// apart, mean the reader is done (or there is nothing to read).
fn drain_pty(slave: &File) {
    let queued = || {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD on a valid descriptor writes one int.
        let r = unsafe { libc::ioctl(slave.as_raw_fd(), libc::FIONREAD, &mut n) };
        if r == 0 {
            n
        } else {
            0
        }
    };
    let start = std::time::Instant::now();
    let mut empty = 0;
    while empty < 2 && start.elapsed() < PTY_DRAIN_TIMEOUT {
        std::thread::sleep(Duration::from_millis(10));
        empty = if queued() == 0 { empty + 1 } else { 0 };
    }
}

/// The socket's output side: the connected client and the backlog.
#[derive(Default)]
struct SocketOut {
    client: Option<UnixStream>,
    backlog: VecDeque<u8>,
}

struct SocketWriter(Arc<Mutex<SocketOut>>);

impl Write for SocketWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.backlog.extend(buf);
        let excess = s.backlog.len().saturating_sub(SOCKET_BACKLOG);
        s.backlog.drain(..excess);
        if let Some(c) = &mut s.client {
            if c.write_all(buf).is_err() {
                s.client = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Accept clients one at a time: the newest replaces the previous one; it
/// gets the backlog, then live output, and its bytes are guest input.
fn spawn_socket_acceptor(
    listener: UnixListener,
    out: Arc<Mutex<SocketOut>>,
    input: SerialInput,
    control: VmControl,
) {
    let input = Arc::new(Mutex::new(input));
    std::thread::Builder::new()
        .name("duet-serial-socket".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut stream) = conn else { continue };
                let Ok(reader) = stream.try_clone() else {
                    continue;
                };
                {
                    let mut s = out.lock().unwrap_or_else(|e| e.into_inner());
                    let (a, b) = s.backlog.as_slices();
                    if stream
                        .write_all(a)
                        .and_then(|()| stream.write_all(b))
                        .is_err()
                    {
                        continue;
                    }
                    s.client = Some(stream);
                }
                let input = input.clone();
                let control = control.clone();
                std::thread::Builder::new()
                    .name("duet-serial-client".into())
                    .spawn(move || feed_from(reader, &input, &control))
                    .ok();
            }
        })
        .ok();
}

fn feed_from(mut reader: UnixStream, input: &Mutex<SerialInput>, control: &VmControl) {
    let mut buf = [0u8; 256];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut inp = input.lock().unwrap_or_else(|e| e.into_inner());
        inp.feed(&buf[..n]);
        while inp.flush() > 0 && !control.is_pending() {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Open a pseudo-terminal in raw mode; returns the master (non-blocking)
/// and the slave (with its name). The slave stays open in duet until the
/// port is dropped, so the master never
/// sees a hang-up while no one is attached; output nobody reads is dropped
/// once the terminal's buffer is full.
pub(crate) fn open_pty() -> Result<(OwnedFd, File, String), String> {
    let last = || std::io::Error::last_os_error().to_string();
    // SAFETY: posix_openpt returns a new descriptor or -1.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(last());
    }
    // SAFETY: `fd` was just returned by posix_openpt and is owned here.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: grantpt/unlockpt on a valid master descriptor.
    if unsafe { libc::grantpt(fd) } != 0 || unsafe { libc::unlockpt(fd) } != 0 {
        return Err(last());
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: the buffer is valid for its length.
    if unsafe { libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) } != 0 {
        return Err(last());
    }
    // SAFETY: ptsname_r wrote a NUL-terminated string into `name`.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&name)
        .map_err(|e| format!("{name}: {e}"))?;
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and pointer.
    if unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut t) } == 0 {
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: valid descriptor and termios.
        unsafe { libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t) };
    }
    Ok((master, slave, name))
}

pub(crate) struct PtyWriter(pub(crate) Arc<OwnedFd>);

impl Write for PtyWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: writing from a valid buffer to a valid descriptor.
        let n = unsafe { libc::write(self.0.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        // Non-blocking: a full buffer (nobody attached) drops the output.
        let _ = n;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub(crate) struct PtyReader(pub(crate) Arc<OwnedFd>);

impl Read for PtyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut p = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 1000) };
            // SAFETY: reading into a valid buffer from a valid descriptor.
            let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // Nothing yet, or no one attached (EIO): wait.
                Some(libc::EAGAIN) | Some(libc::EIO) | Some(libc::EINTR) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ if n == 0 => std::thread::sleep(Duration::from_millis(10)),
                _ => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!("stdio".parse(), Ok(SerialMode::Stdio));
        assert_eq!("null".parse(), Ok(SerialMode::Null));
        assert_eq!("pty".parse(), Ok(SerialMode::Pty));
        assert_eq!("file=/tmp/x".parse(), Ok(SerialMode::File("/tmp/x".into())));
        assert_eq!(
            "socket=/tmp/s".parse(),
            Ok(SerialMode::Socket("/tmp/s".into()))
        );
        assert_eq!(
            "tcp:1234".parse::<SerialMode>(),
            Err("expected stdio, file=PATH, socket=PATH, pty or null".into())
        );
        assert_eq!(
            "file=".parse::<SerialMode>(),
            Err("file= needs a path, e.g. file=/tmp/duet-console".into())
        );
    }

    #[test]
    fn socket_output_keeps_a_bounded_backlog() {
        let out = Arc::new(Mutex::new(SocketOut::default()));
        let mut w = SocketWriter(out.clone());
        for _ in 0..3 {
            w.write_all(&vec![b'a'; SOCKET_BACKLOG / 2 + 1]).unwrap();
        }
        w.write_all(b"end").unwrap();
        let s = out.lock().unwrap();
        assert_eq!(s.backlog.len(), SOCKET_BACKLOG);
        assert!(s.backlog.iter().rev().take(3).eq(b"dne".iter()));
    }

    #[test]
    fn pty_opens_and_carries_bytes() {
        let mut port = SerialMode::Pty.open().expect("a pseudo-terminal");
        let notice = port.notice.clone().unwrap();
        let name = notice.strip_prefix("duet: serial console on ").unwrap();
        let mut slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name)
            .unwrap();
        let mut out = port.take_output();
        out.write_all(b"to-the-user").unwrap();
        let mut buf = [0u8; 11];
        slave.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"to-the-user");
    }
}
