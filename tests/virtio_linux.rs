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

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::console::{linux_kit as kit, Console};
use common::net::{
    bytes, free_port, http_get, in_new_netns, make_tap, serve, sha256_file, sha256_hex,
};

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
    let ro_hash = sha256_file(&ro);
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
    assert!(sum.contains(&sha256_file(&data)), "guest hash: {sum}");
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
    let want = sha256_hex(&payload);
    assert!(g.contains(&want), "download: {g}");
    c.step("mkdir -p /www && echo hello-from-the-guest > /www/index.html && httpd -p 8080 -h /www");
    let body = http_get(&format!("127.0.0.1:{fwd_port}"), "/index.html", STEP);
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

    c.power_off(STEP);

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
    assert_eq!(sha256_file(&ro), ro_hash, "the readonly image changed");

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

/// (c) A TAP device inside a network namespace the test made: the guest
/// downloads from a server on the host side, the host downloads the same
/// bytes back from the guest's httpd.
fn tap_on(transport: &'static str) {
    // The kit may need a download: fetch it before leaving the network.
    kit();
    let done = in_new_netns(move || {
        make_tap("duettap0", "10.9.0.1/24");
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
        let back = http_get("10.9.0.2:8080", "/back", STEP);
        assert!(
            back == *payload,
            "bytes back from the guest differ ({} bytes)",
            back.len()
        );
        c.power_off(STEP);
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
