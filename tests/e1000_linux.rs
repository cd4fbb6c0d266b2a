//! Debian's generic kernel (the cloud kernel has no e1000 driver) on the
//! interpreter with an emulated e1000 over `--net user`, in one boot:
//!
//! - the driver probes the 82540EM (EEPROM checksum, MAC, PHY) and brings
//!   the link up;
//! - DHCP (busybox udhcpc) gives 10.0.2.15;
//! - a download from an HTTP server the test runs on 127.0.0.1 (reached as
//!   10.0.2.2) has the right hash;
//! - a ping to the gateway answers;
//! - a 2 MiB upload (guest httpd through a `hostfwd` port, so the guest
//!   transmits with TSO and checksum offload) has the right hash, and
//!   `--stats` shows TSO frames;
//! - the capture opens in `tcpdump -r` and shows DHCP, the download and
//!   ICMP.
//!
//! Guest kit: `scripts/linux-guest.sh` (its initramfs carries e1000.ko for
//! the generic kernel). Network traffic goes only to 127.0.0.1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

fn kit() -> &'static PathBuf {
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

const STEP: Duration = Duration::from_secs(300);

/// A duet process booting the generic kernel, its console and its
/// `--stats` on pipes.
struct Console {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    seen: usize,
}

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
    fn boot(extra: &[String]) -> Console {
        let dir = kit();
        let mut child = Command::new(env!("CARGO_BIN_EXE_duet"))
            .args(["run", "--backend", "interp", "--memory", "256M", "--kernel"])
            .arg(dir.join("vmlinuz-generic"))
            .arg("--initrd")
            .arg(dir.join("initramfs.cpio.gz"))
            .args(["--cmdline", "console=ttyS0 panic=-1", "--stats"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn duet");
        let out = collect(child.stdout.take().expect("stdout"));
        let err = collect(child.stderr.take().expect("stderr"));
        let mut c = Console {
            child,
            out,
            err,
            seen: 0,
        };
        c.wait_for("DUET-INIT-READY", Duration::from_secs(600));
        c
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
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

    fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(line.as_bytes()).expect("console");
        stdin.write_all(b"\n").expect("console");
        stdin.flush().ok();
    }

    /// Run a shell command; its output between markers.
    fn run(&mut self, cmd: &str) -> String {
        self.send(&format!("echo '<<'BEGIN; {cmd}; echo '<<'END"));
        self.wait_for("<<BEGIN", STEP);
        let out = self.wait_for("<<END", STEP);
        out.trim_end_matches("<<END").to_string()
    }

    /// `poweroff -f`, wait for duet to exit with status 0; its stderr.
    fn power_off(mut self) -> String {
        self.send("poweroff -f");
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                assert_eq!(st.code(), Some(0), "console:\n{}", self.text());
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(300));
                return String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned();
            }
            assert!(
                start.elapsed() < STEP,
                "no exit after poweroff:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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

fn sha256_hex(data: &[u8], dir: &Path, name: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    let out = Command::new("sha256sum")
        .arg(&p)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Deterministic bytes (a xorshift stream).
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Serve `body` to every GET on `listener`.
fn serve(listener: TcpListener, body: Arc<Vec<u8>>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let body = body.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).is_ok() {
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                    line.clear();
                }
                let head = format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&body);
            });
        }
    });
}

/// GET `path` from `addr`; the body.
fn http_get(addr: &str, path: &str) -> Vec<u8> {
    let start = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect(addr) {
            s.set_read_timeout(Some(STEP)).ok();
            let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n");
            let mut resp = Vec::new();
            let _ = s.read_to_end(&mut resp);
            if let Some(i) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
                return resp[i + 4..].to_vec();
            }
        }
        assert!(start.elapsed() < STEP, "GET {addr}{path} never answered");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn e1000_user_networking_on_the_interpreter() {
    let dir = std::env::temp_dir().join(format!("duet-e1000-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pcap = dir.join("net.pcap");
    let payload = Arc::new(bytes(7, 400_000));
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_port = server.local_addr().unwrap().port();
    serve(server, payload.clone());
    let fwd_port = free_port();

    let mut c = Console::boot(&[
        "--net".into(),
        format!(
            "user,model=e1000,hostfwd=tcp:127.0.0.1:{fwd_port}-:8080,pcap={}",
            pcap.display()
        ),
    ]);

    let probe = c.run("dmesg | grep e1000; cat /sys/class/net/eth0/device/vendor /sys/class/net/eth0/device/device");
    assert!(
        probe.contains("eth0: (PCI:33MHz:32-bit) 52:54:00:12:34:56"),
        "probe: {probe}"
    );
    assert!(
        probe.contains("0x8086") && probe.contains("0x100e"),
        "probe: {probe}"
    );

    let d = c.run("udhcpc -i eth0 -n -q -t 10 2>&1; ip -4 addr show eth0");
    assert!(d.contains("inet 10.0.2.15/24"), "DHCP: {d}");
    assert!(
        c.text().contains("NIC Link is Up 1000 Mbps Full Duplex"),
        "no link-up message"
    );

    let want = sha256_hex(&payload, &dir, "payload");
    let g = c.run(&format!(
        "wget -q -O /tmp/payload http://10.0.2.2:{server_port}/payload && sha256sum /tmp/payload"
    ));
    assert!(g.contains(&want), "download: {g}");

    let p = c.run("ping -c 2 -W 5 10.0.2.2");
    assert!(p.contains("2 packets received"), "ping: {p}");

    // Upload: the guest sends 2 MiB through TCP (TSO and checksum offload).
    c.run(
        "mkdir -p /www && yes duet-e1000-upload | head -c 2097152 > /www/up && \
         httpd -p 8080 -h /www",
    );
    let up = http_get(&format!("127.0.0.1:{fwd_port}"), "/up");
    let expected: Vec<u8> = b"duet-e1000-upload\n"
        .iter()
        .copied()
        .cycle()
        .take(2 << 20)
        .collect();
    assert!(
        up == expected,
        "upload: {} bytes, content differs",
        up.len()
    );

    let irqs = c.run("grep eth0 /proc/interrupts");
    assert!(
        irqs.contains("IO-APIC") && irqs.contains("fasteoi"),
        "INTx: {irqs}"
    );

    let stats = c.power_off();
    let line = stats
        .lines()
        .find(|l| l.contains("e1000-0") && l.contains("TSO"))
        .unwrap_or_else(|| panic!("no e1000 line in --stats:\n{stats}"));
    let tso: u64 = line
        .split("frames")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(tso > 0, "the guest should have sent TSO frames: {line}");

    match Command::new("tcpdump").arg("-nr").arg(&pcap).output() {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success(),
                "tcpdump -r failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(text.contains("BOOTP/DHCP"), "no DHCP in the capture");
            assert!(
                text.contains(&format!(".{server_port}:")),
                "no HTTP download in the capture"
            );
            assert!(text.contains("ICMP echo reply"), "no ping in the capture");
        }
        Err(e) => panic!("tcpdump is needed to check the capture (apt-get install tcpdump): {e}"),
    }
    std::fs::remove_dir_all(&dir).ok();
}
