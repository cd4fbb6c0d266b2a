//! The serial-console driver of the Linux tests: a duet process with COM1
//! on pipes, read by a thread into a buffer the test searches, and the
//! guest kit (`scripts/linux-guest.sh`) those tests boot.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The Linux guest kit's directory: `scripts/linux-guest.sh` builds it (or
/// finds it cached) and prints its path last.
pub fn linux_kit() -> &'static PathBuf {
    static KIT: OnceLock<PathBuf> = OnceLock::new();
    KIT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/linux-guest.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .expect("run scripts/linux-guest.sh");
        assert!(
            out.status.success(),
            "scripts/linux-guest.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .lines()
                .last()
                .unwrap_or("")
                .to_string(),
        )
    })
}

/// A duet process with its serial console on pipes (stderr inherited, or
/// collected with [`Console::spawn_capturing_stderr`]).
pub struct Console {
    pub child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    err: Option<Arc<Mutex<Vec<u8>>>>,
    /// Bytes of the output already consumed by [`Console::wait_for`].
    seen: usize,
}

/// Read `r` to its end on a thread, into the buffer returned.
fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let sink = Arc::new(Mutex::new(Vec::new()));
    let s = sink.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            s.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    sink
}

impl Console {
    /// Spawn `cmd` (a duet command line) with stdin and stdout on pipes.
    pub fn spawn(cmd: &mut Command) -> Console {
        Self::spawn_with(cmd, false)
    }

    /// [`Console::spawn`] with stderr collected too (`--stats`, warnings):
    /// [`Console::stderr_text`].
    pub fn spawn_capturing_stderr(cmd: &mut Command) -> Console {
        Self::spawn_with(cmd, true)
    }

    fn spawn_with(cmd: &mut Command, capture_stderr: bool) -> Console {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if capture_stderr {
                Stdio::piped()
            } else {
                Stdio::inherit()
            });
        let mut child = cmd.spawn().expect("spawn duet");
        let out = collect(child.stdout.take().expect("stdout"));
        let err = child.stderr.take().map(collect);
        Console {
            child,
            out,
            err,
            seen: 0,
        }
    }

    /// What duet wrote to stderr so far (empty unless collected).
    pub fn stderr_text(&self) -> String {
        self.err.as_ref().map_or_else(String::new, |e| {
            String::from_utf8_lossy(&e.lock().unwrap()).into_owned()
        })
    }

    /// `poweroff -f`; wait (at most `timeout`) for duet to exit with
    /// status 0. Returns its stderr when collected.
    pub fn power_off(mut self, timeout: Duration) -> String {
        self.send("poweroff -f");
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                assert_eq!(st.code(), Some(0), "console:\n{}", self.text());
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(300));
                return self.stderr_text();
            }
            assert!(
                start.elapsed() < timeout,
                "no exit after poweroff:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the guest wrote so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Wait until `needle` appears after what was already consumed; return
    /// the text up to and including it. Panics with the console so far on
    /// a timeout or when duet exits first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let t = self.text();
            if let Some(pos) = t[self.seen.min(t.len())..].find(needle) {
                let end = self.seen + pos + needle.len();
                let got = t[self.seen..end].to_string();
                self.seen = end;
                return got;
            }
            if start.elapsed() > timeout {
                panic!("timed out waiting for {needle:?}; console so far:\n{t}");
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("duet exited ({st}) while waiting for {needle:?}; console:\n{t}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Type `line` and a newline.
    pub fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin
            .write_all(line.as_bytes())
            .expect("write to the console");
        stdin.write_all(b"\n").expect("write to the console");
        stdin.flush().ok();
    }

    /// Run a shell command and return its output (between markers).
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> String {
        self.send(&format!("echo '<<'BEGIN; {cmd}; echo '<<'END"));
        self.wait_for("<<BEGIN", timeout);
        let out = self.wait_for("<<END", timeout);
        out.trim_end_matches("<<END").to_string()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.child.kill().ok();
        }
        self.child.wait().ok();
    }
}
