//! Debian's cloud kernel on the interpreter with virtio devices, each check
//! on both transports (virtio-pci and virtio-mmio). One boot per transport
//! carries every check, to keep the suite short:
//!
//! (a) `sha256sum /dev/vda` equals the host's hash of the image; a pattern
//!     written to a second disk, synced, is in the file after power-off; a
//!     `readonly=on` disk refuses writes and its file is unchanged;
//! (b) `--net user`: DHCP (busybox udhcpc) gives 10.0.2.15; a download from
//!     an HTTP server the test runs on 127.0.0.1 (reached as 10.0.2.2) has
//!     the right hash; a `hostfwd` port reaches busybox httpd in the guest;
//! (d) the capture opens in `tcpdump -r` and shows the DHCP and HTTP frames;
//! (e) `hvc0` carries a line each way; `/dev/hwrng` yields bytes.
//!
//! (c) `--net tap` runs in a network namespace the test creates for itself
//! (no host interface is touched): a transfer each way.
//!
//! Guest kit: `scripts/linux-guest.sh` (its initramfs loads the virtio
//! modules). Network traffic goes only to 127.0.0.1 or into the namespace.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::console::{linux_kit as kit, Console};

const STEP: Duration = Duration::from_secs(240);

impl Console {
    /// Boot the cloud kernel on the interpreter with `extra` options, through
    /// `pre` (a command to run duet under) when given; wait for the init.
    fn boot(extra: &[String], pre: Option<&mut Command>) -> Console {
        let dir = kit();
        let mut owned;
        let cmd = match pre {
            Some(c) => c,
            None => {
                owned = Command::new(env!("CARGO_BIN_EXE_duet"));
                &mut owned
            }
        };
        cmd.args(["run", "--backend", "interp", "--memory", "256M", "--kernel"])
            .arg(dir.join("vmlinux-cloud"))
            .arg("--initrd")
            .arg(dir.join("initramfs.cpio.gz"))
            .args(["--cmdline", "console=ttyS0 panic=-1"])
            .args(extra);
        let mut c = Console::spawn(cmd);
        c.wait_for("DUET-INIT-READY", STEP);
        c
    }

    /// Run a shell command; its output between markers.
    fn step(&mut self, cmd: &str) -> String {
        self.run(cmd, STEP)
    }

    /// `poweroff -f` and wait for duet to exit with status 0.
    fn power_off(mut self) {
        self.send("poweroff -f");
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                assert_eq!(st.code(), Some(0), "console:\n{}", self.text());
                return;
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

fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Deterministic bytes (a xorshift stream) for images and payloads.
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

/// Serve `body` to every GET on `listener` (the guest's downloads).
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

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("duet-virtio-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

const PATTERN: &[u8] = b"duet virtio pattern\n";
const PATTERN_BYTES: usize = 1 << 20;

/// Every check of (a), (b), (d) and (e) in one boot on `transport`.
fn devices_on(transport: &str) {
    let dir = scratch(transport);
    let data = dir.join("data.img");
    let scratch_disk = dir.join("scratch.img");
    let ro = dir.join("ro.img");
    std::fs::write(&data, bytes(1, 4 << 20)).unwrap();
    std::fs::write(&scratch_disk, vec![0u8; 2 << 20]).unwrap();
    std::fs::write(&ro, bytes(2, 1 << 20)).unwrap();
    let ro_hash = sha256_hex(&ro);
    let pcap = dir.join("net.pcap");
    let hvc = dir.join("hvc.sock");

    let payload = Arc::new(bytes(3, 300_000));
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_port = server.local_addr().unwrap().port();
    serve(server, payload.clone());
    let fwd_port = free_port();

    let t = format!(",transport={transport}");
    let args: Vec<String> = vec![
        "--disk".into(),
        format!("path={}{t}", data.display()),
        "--disk".into(),
        format!("path={}{t}", scratch_disk.display()),
        "--disk".into(),
        format!("path={},readonly=on{t}", ro.display()),
        "--net".into(),
        format!(
            "user,hostfwd=tcp:127.0.0.1:{fwd_port}-:8080,pcap={}{t}",
            pcap.display()
        ),
        "--rng".into(),
        format!("transport={transport}"),
        "--console-device".into(),
        format!("virtio,socket={}{t}", hvc.display()),
    ];
    let mut c = Console::boot(&args, None);

    // Every device is on the transport asked for.
    let bus = c
        .step("for d in /sys/bus/virtio/devices/*; do basename $(dirname $(readlink -f $d)); done");
    let expect = if transport == "pci" {
        "0000:00:"
    } else {
        "LNRO0005"
    };
    assert_eq!(
        bus.lines().filter(|l| l.contains(expect)).count(),
        6,
        "virtio devices' parents: {bus}"
    );

    // (a) Disks.
    let sum = c.step("sha256sum /dev/vda");
    assert!(sum.contains(&sha256_hex(&data)), "guest hash: {sum}");
    let w = c.step(&format!(
        "yes '{}' | head -c {PATTERN_BYTES} > /dev/vdb; sync; echo wrote $?",
        std::str::from_utf8(&PATTERN[..PATTERN.len() - 1]).unwrap()
    ));
    assert!(w.contains("wrote 0"), "{w}");
    let r = c.step("dd if=/dev/zero of=/dev/vdc bs=512 count=1; echo status $?");
    assert!(r.contains("status 1"), "a readonly disk took a write: {r}");
    assert!(
        r.contains("Operation not permitted") || r.contains("Read-only") || r.contains("I/O error"),
        "{r}"
    );

    // (b) User networking.
    let d = c.step("udhcpc -i eth0 -n -q -t 10 2>&1; ip -4 addr show eth0");
    assert!(d.contains("inet 10.0.2.15/24"), "DHCP: {d}");
    let g = c.step(&format!(
        "wget -q -O /tmp/payload http://10.0.2.2:{server_port}/payload && sha256sum /tmp/payload"
    ));
    let want = {
        let p = dir.join("payload");
        std::fs::write(&p, &*payload).unwrap();
        sha256_hex(&p)
    };
    assert!(g.contains(&want), "download: {g}");
    c.step("mkdir -p /www && echo hello-from-the-guest > /www/index.html && httpd -p 8080 -h /www");
    let body = http_get(&format!("127.0.0.1:{fwd_port}"), "/index.html");
    assert_eq!(body, b"hello-from-the-guest\n");

    // (e) hvc0 both ways, hwrng.
    let mut sock = UnixStream::connect(&hvc).expect("hvc0 socket");
    sock.set_read_timeout(Some(STEP)).unwrap();
    c.step("stty -F /dev/hvc0 raw -echo; echo line-from-guest > /dev/hvc0");
    let mut got = Vec::new();
    let mut b = [0u8; 64];
    while !got.ends_with(b"line-from-guest\n") && !got.ends_with(b"line-from-guest\r\n") {
        let n = sock.read(&mut b).expect("hvc0 output");
        assert!(n > 0, "hvc0 closed");
        got.extend_from_slice(&b[..n]);
    }
    c.send("read -t 120 line < /dev/hvc0; echo hvc-got:$line");
    std::thread::sleep(Duration::from_millis(500));
    sock.write_all(b"line-from-host\n").unwrap();
    c.wait_for("hvc-got:line-from-host", STEP);
    let rng = c.step(
        "head -c 64 /dev/hwrng | od -An -tx1 | wc -w; cat /sys/class/misc/hw_random/rng_current",
    );
    assert!(rng.contains("64"), "hwrng: {rng}");
    assert!(rng.contains("virtio_rng"), "hwrng: {rng}");

    c.power_off();

    // (a) after power-off: the pattern is in the file, the readonly image intact.
    let back = std::fs::read(&scratch_disk).unwrap();
    let expected: Vec<u8> = PATTERN
        .iter()
        .copied()
        .cycle()
        .take(PATTERN_BYTES)
        .collect();
    assert!(
        back[..PATTERN_BYTES] == expected[..],
        "pattern not on the disk"
    );
    assert!(back[PATTERN_BYTES..].iter().all(|&b| b == 0));
    assert_eq!(sha256_hex(&ro), ro_hash, "the readonly image changed");

    // (d) The capture: tcpdump reads it and sees DHCP and HTTP.
    match Command::new("tcpdump").arg("-nr").arg(&pcap).output() {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success(),
                "tcpdump -r failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                text.contains("BOOTP/DHCP"),
                "no DHCP in the capture:\n{text}"
            );
            assert!(
                text.contains(&format!(".{server_port}:")),
                "no HTTP download in the capture"
            );
            assert!(
                text.contains(".8080:") || text.contains(".8080 "),
                "no hostfwd HTTP in the capture"
            );
        }
        Err(e) => panic!("tcpdump is needed to check the capture (apt-get install tcpdump): {e}"),
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn virtio_devices_on_pci() {
    devices_on("pci");
}

#[test]
fn virtio_devices_on_mmio() {
    devices_on("mmio");
}

/// Run `f` on a thread inside a new network namespace (children it spawns
/// are in it too); `None` when this host does not allow one (not root).
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "SKIPPED: cannot create a network namespace: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(f())
    })
    .join()
    .expect("namespace thread")
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().expect("sh");
    assert!(st.success(), "{cmd} failed");
}

/// (c) A TAP device inside a network namespace the test made: the guest
/// downloads from a server on the host side, the host downloads the same
/// bytes back from the guest's httpd.
fn tap_on(transport: &'static str) {
    let done = in_new_netns(move || {
        sh(
            "ip link set lo up && ip tuntap add dev duettap0 mode tap && \
            ip addr add 10.9.0.1/24 dev duettap0 && ip link set duettap0 up",
        );
        let payload = Arc::new(bytes(4, 500_000));
        let server = TcpListener::bind("10.9.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        serve(server, payload.clone());
        let args: Vec<String> = vec![
            "--net".into(),
            format!("tap=duettap0,transport={transport}"),
        ];
        let mut c = Console::boot(&args, None);
        let up = c.step("ip link set eth0 up && ip addr add 10.9.0.2/24 dev eth0 && echo up");
        assert!(up.contains("up"), "{up}");
        let g = c.step(&format!(
            "wget -q -O /tmp/p http://10.9.0.1:{port}/p && mkdir -p /www && cp /tmp/p /www/back && \
             httpd -p 8080 -h /www && echo fetched"
        ));
        assert!(g.contains("fetched"), "guest download over tap: {g}");
        let back = http_get("10.9.0.2:8080", "/back");
        assert!(
            back == *payload,
            "bytes back from the guest differ ({} bytes)",
            back.len()
        );
        c.power_off();
    });
    if done.is_none() {
        eprintln!("tap_on({transport}): SKIPPED (no network namespace)");
    }
}

#[test]
fn virtio_net_tap_on_pci() {
    tap_on("pci");
}

#[test]
fn virtio_net_tap_on_mmio() {
    tap_on("mmio");
}
