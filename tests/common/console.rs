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

/// A duet process with its serial console on pipes (stderr inherited).
pub struct Console {
    pub child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    /// Bytes of the output already consumed by [`Console::wait_for`].
    seen: usize,
}

impl Console {
    /// Spawn `cmd` (a duet command line) with stdin and stdout on pipes.
    pub fn spawn(cmd: &mut Command) -> Console {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn duet");
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().expect("stdout");
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Console {
            child,
            out,
            seen: 0,
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
