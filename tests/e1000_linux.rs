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

use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::console::{linux_kit as kit, Console};
use common::net::{bytes, free_port, http_get, in_new_netns, make_tap, serve, sha256_hex};

const STEP: Duration = Duration::from_secs(300);

impl Console {
    /// Boot the generic kernel on the interpreter with `extra` options and
    /// `--stats` (collected from stderr); wait for the init.
    fn boot(extra: &[String]) -> Console {
        let dir = kit();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_duet"));
        cmd.args(["run", "--backend", "interp", "--memory", "256M", "--kernel"])
            .arg(dir.join("vmlinuz-generic"))
            .arg("--initrd")
            .arg(dir.join("initramfs.cpio.gz"))
            .args(["--cmdline", "console=ttyS0 panic=-1", "--stats"])
            .args(extra);
        let mut c = Console::spawn_capturing_stderr(&mut cmd);
        c.wait_for("DUET-INIT-READY", Duration::from_secs(600));
        c
    }

    /// Run a shell command; its output between markers.
    fn step(&mut self, cmd: &str) -> String {
        self.run(cmd, STEP)
    }
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

    let probe = c.step("dmesg | grep e1000; cat /sys/class/net/eth0/device/vendor /sys/class/net/eth0/device/device");
    assert!(
        probe.contains("eth0: (PCI:33MHz:32-bit) 52:54:00:12:34:56"),
        "probe: {probe}"
    );
    assert!(
        probe.contains("0x8086") && probe.contains("0x100e"),
        "probe: {probe}"
    );

    let d = c.step("udhcpc -i eth0 -n -q -t 10 2>&1; ip -4 addr show eth0");
    assert!(d.contains("inet 10.0.2.15/24"), "DHCP: {d}");
    assert!(
        c.text().contains("NIC Link is Up 1000 Mbps Full Duplex"),
        "no link-up message"
    );

    let want = sha256_hex(&payload);
    let g = c.step(&format!(
        "wget -q -O /tmp/payload http://10.0.2.2:{server_port}/payload && sha256sum /tmp/payload"
    ));
    assert!(g.contains(&want), "download: {g}");

    let p = c.step("ping -c 2 -W 5 10.0.2.2");
    assert!(p.contains("2 packets received"), "ping: {p}");

    // Upload: the guest sends 2 MiB through TCP (TSO and checksum offload).
    c.step(
        "mkdir -p /www && yes duet-e1000-upload | head -c 2097152 > /www/up && \
         httpd -p 8080 -h /www",
    );
    let up = http_get(&format!("127.0.0.1:{fwd_port}"), "/up", STEP);
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

    let irqs = c.step("grep eth0 /proc/interrupts");
    assert!(
        irqs.contains("IO-APIC") && irqs.contains("fasteoi"),
        "INTx: {irqs}"
    );

    let stats = c.power_off(STEP);
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

/// `--net tap=…,model=e1000` with the TAP device inside a network
/// namespace the test made (no host interface is touched): the guest
/// downloads from a server on the host side of the TAP, the host downloads
/// the same bytes back from the guest's httpd (the guest transmits with
/// TSO and checksum offload, the TAP hands frames over as they are).
#[test]
fn e1000_tap_both_ways() {
    // The kit may need a download: fetch it before leaving the network.
    kit();
    let done = in_new_netns(|| {
        make_tap("duettap0", "10.9.0.1/24");
        let payload = Arc::new(bytes(5, 600_000));
        let server = TcpListener::bind("10.9.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        serve(server, payload.clone());
        let mut c = Console::boot(&["--net".into(), "tap=duettap0,model=e1000".into()]);
        let up = c.step("ip link set eth0 up && ip addr add 10.9.0.2/24 dev eth0 && echo up");
        assert!(up.contains("up"), "{up}");
        // The driver's watchdog reports the link a moment after `up`.
        let carrier = c.step(
            "for i in $(seq 100); do [ \"$(cat /sys/class/net/eth0/carrier)\" = 1 ] && break; \
             sleep 0.1; done; echo carrier=$(cat /sys/class/net/eth0/carrier)",
        );
        assert!(carrier.contains("carrier=1"), "no link: {carrier}");
        let want = sha256_hex(&payload);
        let g = c.step(&format!(
            "wget -q -O /tmp/p http://10.9.0.1:{port}/p && sha256sum /tmp/p && mkdir -p /www && \
             cp /tmp/p /www/back && httpd -p 8080 -h /www && echo served"
        ));
        assert!(
            g.contains(&want) && g.contains("served"),
            "guest download over tap: {g}"
        );
        let back = http_get("10.9.0.2:8080", "/back", STEP);
        assert!(
            back == *payload,
            "bytes back from the guest differ ({} bytes)",
            back.len()
        );
        let stats = c.power_off(STEP);
        let line = stats
            .lines()
            .find(|l| l.contains("e1000-0") && l.contains("frames"))
            .unwrap_or_else(|| panic!("no e1000 line in --stats:\n{stats}"));
        assert!(
            line.contains("tap duettap0"),
            "the e1000 is not on the TAP: {line}"
        );
    });
    if done.is_none() {
        eprintln!("e1000_tap_both_ways: SKIPPED (no network namespace)");
    }
}
