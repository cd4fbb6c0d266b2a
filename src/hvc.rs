//! The host side of the virtio console (`hvc0`): a file (output only), a
//! Unix socket duet listens on (one client at a time: its bytes are the
//! guest's input, the guest's output goes to it), stdio, a new
//! pseudo-terminal (its path on stderr, as `--serial pty`) or nothing.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::virtio::inbox::Inbox;

use crate::device_args::ConsoleHost;

/// Input chunks waiting for the guest, at most (a client typing faster
/// than the guest reads waits).
pub const INBOX_CHUNKS: usize = 64;

/// The opened host side; removes its socket file when dropped.
pub struct HvcHost {
    cleanup: Option<PathBuf>,
    /// duet's own descriptor of the pseudo-terminal's slave (pty), so the
    /// master sees no hang-up while nobody is attached.
    _pty_slave: Option<std::fs::File>,
    /// The pseudo-terminal's slave path (pty).
    pub pty_name: Option<String>,
}

impl HvcHost {
    fn plain() -> Self {
        HvcHost {
            cleanup: None,
            _pty_slave: None,
            pty_name: None,
        }
    }
}

impl Drop for HvcHost {
    fn drop(&mut self) {
        if let Some(p) = &self.cleanup {
            std::fs::remove_file(p).ok();
        }
    }
}

/// Output to the current socket client, if any.
#[derive(Clone, Default)]
struct ClientOut(Arc<Mutex<Option<UnixStream>>>);

impl Write for ClientOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = c.as_mut() {
            if s.write_all(buf).is_err() {
                *c = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Feed `reader` into `input`, waiting while the inbox is full.
fn pump(mut reader: impl Read, input: &Inbox<Vec<u8>>) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while !input.has_room() {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        input.push(buf[..n].to_vec());
    }
}

/// Open `host`; returns the writer for the guest's output and the handle
/// that keeps it alive. Input goes to `input`.
pub fn open(
    host: &ConsoleHost,
    input: Arc<Inbox<Vec<u8>>>,
) -> Result<(Box<dyn Write + Send>, HvcHost), String> {
    match host {
        ConsoleHost::File(p) => {
            let f = std::fs::File::create(p)
                .map_err(|e| format!("file={}: cannot create it: {e}", p.display()))?;
            Ok((Box::new(f), HvcHost::plain()))
        }
        ConsoleHost::Stdio => {
            std::thread::Builder::new()
                .name("duet-hvc-stdin".into())
                .spawn(move || pump(std::io::stdin(), &input))
                .map_err(|e| format!("stdio: {e}"))?;
            Ok((Box::new(std::io::stdout()), HvcHost::plain()))
        }
        ConsoleHost::Null => Ok((Box::new(std::io::sink()), HvcHost::plain())),
        ConsoleHost::Pty => {
            let (master, slave, name) =
                crate::serial_port::open_pty().map_err(|e| format!("pty: cannot open one: {e}"))?;
            let master = Arc::new(master);
            let reader = crate::serial_port::PtyReader(master.clone());
            std::thread::Builder::new()
                .name("duet-hvc-pty".into())
                .spawn(move || pump(reader, &input))
                .map_err(|e| format!("pty: {e}"))?;
            eprintln!("duet: virtio console (hvc0) on {name}");
            Ok((
                Box::new(crate::serial_port::PtyWriter(master)),
                HvcHost {
                    cleanup: None,
                    _pty_slave: Some(slave),
                    pty_name: Some(name),
                },
            ))
        }
        ConsoleHost::Socket(p) => {
            if p.exists() {
                return Err(format!(
                    "socket={}: the path already exists (remove it, or choose another path)",
                    p.display()
                ));
            }
            let listener = UnixListener::bind(p)
                .map_err(|e| format!("socket={}: cannot listen on it: {e}", p.display()))?;
            let out = ClientOut::default();
            let slot = out.0.clone();
            std::thread::Builder::new()
                .name("duet-hvc-socket".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        let Ok(stream) = conn else { continue };
                        let Ok(reader) = stream.try_clone() else {
                            continue;
                        };
                        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
                        let input = input.clone();
                        std::thread::Builder::new()
                            .name("duet-hvc-client".into())
                            .spawn(move || pump(reader, &input))
                            .ok();
                    }
                })
                .map_err(|e| format!("socket: {e}"))?;
            Ok((
                Box::new(out),
                HvcHost {
                    cleanup: Some(p.clone()),
                    _pty_slave: None,
                    pty_name: None,
                },
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::inbox::NoNotify;
    use std::time::{Duration, Instant};

    #[test]
    fn pty_carries_both_ways_and_null_swallows() {
        let input = Inbox::new(INBOX_CHUNKS, Arc::new(NoNotify));
        let (mut out, host) = open(&ConsoleHost::Pty, input.clone()).expect("a pseudo-terminal");
        let name = host.pty_name.clone().expect("the slave's path");
        assert!(name.starts_with("/dev/pts/"), "{name}");
        let mut slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&name)
            .unwrap();
        out.write_all(b"from-hvc0").unwrap();
        let mut buf = [0u8; 9];
        slave.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"from-hvc0");
        slave.write_all(b"typed").unwrap();
        let start = Instant::now();
        let mut got = Vec::new();
        while got.len() < 5 && start.elapsed() < Duration::from_secs(10) {
            match input.pop() {
                Some(c) => got.extend(c),
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        assert_eq!(got, b"typed");
        let null_in = Inbox::new(INBOX_CHUNKS, Arc::new(NoNotify));
        let (mut out, host) = open(&ConsoleHost::Null, null_in.clone()).unwrap();
        out.write_all(b"dropped").unwrap();
        assert!(host.pty_name.is_none());
        assert!(null_in.pop().is_none());
    }
}
