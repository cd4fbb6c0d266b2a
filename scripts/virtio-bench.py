#!/usr/bin/env python3
"""virtio I/O throughput, duet's interpreter beside QEMU-TCG in the same run.

Same kernel (the guest kit's vmlinux-cloud, PVH), same initramfs, same
device types (virtio-blk-pci, virtio-net-pci), one vCPU, 256 MiB:

- disk: `dd` in the guest, 64 MiB with 1 MiB blocks, `iflag=direct` from
  /dev/vda (read) and `oflag=direct` to it (write): one untimed `dd` to
  warm up (both VMMs translate the guest's block layer on first use), then
  --disk-reps (default 16) of them back to back timed with the guest's
  clock (/proc/uptime, 10 ms ticks: 1 GiB takes 80-250 ticks, so the
  clock's granularity is under 1.5 %);
- network, guest -> host: the guest pipes 32 MiB of zeros into busybox `nc`
  towards a sink on the host; MB/s measured on the host from the first byte
  to the end of the stream. Over `user` (libslirp in both) and over `tap`
  (a TAP device inside a network namespace this script makes with
  `unshare -n`; needs root, skipped otherwise).

Median of --runs (default 3) runs each. Usage (from the repository root,
after `cargo build --release` and scripts/linux-guest.sh):

    heavy scripts/virtio-bench.py [--runs 3] [--only disk,user,tap]

Prints one Markdown table row per measurement.
"""
import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIT = os.environ.get("DUET_GUEST_DIR", os.path.join(ROOT, ".cache", "linux-guest"))
KERNEL = os.path.join(KIT, "vmlinux-cloud")
INITRD = os.path.join(KIT, "initramfs.cpio.gz")
CMDLINE = "console=ttyS0 panic=-1 quiet"
DISK_MB = 64
NET_MB = 32
STEP = 600


class Guest:
    """A VMM process with the guest's serial console on stdin/stdout."""

    def __init__(self, argv, stderr=None):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=stderr or subprocess.DEVNULL)
        self.buf = b""
        self.seen = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for(b"DUET-INIT-READY")

    def _read(self):
        while True:
            b = self.p.stdout.read1(65536)
            if not b:
                return
            with self.lock:
                self.buf += b

    def wait_for(self, needle, timeout=STEP):
        start = time.monotonic()
        while True:
            with self.lock:
                pos = self.buf.find(needle, self.seen)
                if pos >= 0:
                    out = self.buf[self.seen:pos]
                    self.seen = pos + len(needle)
                    return out.decode(errors="replace")
            if self.p.poll() is not None:
                raise RuntimeError(f"VMM exited waiting for {needle!r}: {self.buf[-2000:]!r}")
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"timeout waiting for {needle!r}: {self.buf[-2000:]!r}")
            time.sleep(0.02)

    def run(self, cmd, timeout=STEP):
        self.p.stdin.write(f"echo '<<'BEGIN; {cmd}; echo '<<'END\n".encode())
        self.p.stdin.flush()
        self.wait_for(b"<<BEGIN", timeout)
        return self.wait_for(b"<<END", timeout)

    def close(self):
        try:
            self.p.stdin.write(b"poweroff -f\n")
            self.p.stdin.flush()
            self.p.wait(timeout=60)
        except Exception:
            self.p.kill()
            self.p.wait()


def duet_argv(duet, disk, net, extra=()):
    return [duet, "run", "--backend", "interp", "--memory", "256M", "--kernel", KERNEL,
            "--initrd", INITRD, "--cmdline", CMDLINE, "--serial", "stdio",
            "--disk", f"path={disk}", "--net", net, *extra]


def qemu_argv(qemu, disk, net):
    netdev = "user,id=n0" if net == "user" else f"tap,id=n0,ifname={net[4:]},script=no,downscript=no"
    return [qemu, "-M", "q35", "-accel", "tcg,thread=single", "-m", "256M", "-smp", "1",
            "-display", "none", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", KERNEL, "-initrd", INITRD, "-append", CMDLINE,
            "-drive", f"file={disk},if=none,id=d0,format=raw",
            "-device", "virtio-blk-pci,drive=d0",
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"]


def timed_dd(g, args, reps=1):
    """MB/s (10^6 bytes) of `reps` back-to-back `dd`s in the guest (after
    one untimed to warm up), timed with the guest's /proc/uptime (10 ms
    resolution; Debian's busybox dd prints no time)."""
    out = g.run(f"dd {args} 2>&1")
    if not re.search(r"(\d+)\+0 records out", out):
        raise RuntimeError(f"dd failed: {out!r}")
    out = g.run(f"read a b < /proc/uptime; i=0; while [ $i -lt {reps} ]; do "
                f"dd {args} 2>&1; i=$((i+1)); done; read c d < /proc/uptime; echo T $a $c")
    records = [int(n) for n in re.findall(r"(\d+)\+0 records out", out)]
    t = re.search(r"T ([\d.]+) ([\d.]+)", out)
    if len(records) != reps or not t:
        raise RuntimeError(f"dd failed: {out!r}")
    seconds = float(t.group(2)) - float(t.group(1))
    return sum(records) * (1 << 20) / max(seconds, 0.01) / 1e6


class Sink:
    """A TCP server that swallows one stream and times it."""

    def __init__(self, addr):
        self.s = socket.socket()
        self.s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.s.bind((addr, 0))
        self.s.listen(1)
        self.port = self.s.getsockname()[1]
        self.result = None
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        c, _ = self.s.accept()
        n, first = 0, None
        while True:
            b = c.recv(1 << 20)
            if not b:
                break
            if first is None:
                first = time.monotonic()
            n += len(b)
        self.result = (n, time.monotonic() - (first or time.monotonic()))
        c.close()

    def rate(self, timeout=STEP):
        start = time.monotonic()
        while self.result is None:
            if time.monotonic() - start > timeout:
                raise RuntimeError("sink: no end of stream")
            time.sleep(0.05)
        n, t = self.result
        if n != NET_MB << 20:
            raise RuntimeError(f"sink got {n} bytes")
        return n / t / 1e6


def net_send(g, host_ip, port):
    g.run(f"dd if=/dev/zero bs=64k count={NET_MB * 16} 2>/dev/null | nc {host_ip} {port}")


def disk_and_user(argv_of, disk, only, reps, stderr=None):
    g = Guest(argv_of(disk, "user"), stderr)
    try:
        r = {}
        if "disk" in only:
            r["disk read"] = timed_dd(
                g, f"if=/dev/vda of=/dev/null bs=1M count={DISK_MB} iflag=direct", reps)
            r["disk write"] = timed_dd(
                g, f"if=/dev/zero of=/dev/vda bs=1M count={DISK_MB} oflag=direct", reps)
        if "user" not in only:
            return r
        g.run("ip link set eth0 up; udhcpc -i eth0 -n -q -t 10 >/dev/null 2>&1")
        sink = Sink("127.0.0.1")
        net_send(g, "10.0.2.2", sink.port)
        r["net user"] = sink.rate()
        return r
    finally:
        g.close()


def tap(argv_of, disk):
    subprocess.run("ip link set lo up && ip tuntap add dev duetbench0 mode tap && "
                   "ip addr add 10.9.0.1/24 dev duetbench0 && ip link set duetbench0 up",
                   shell=True, check=True)
    try:
        g = Guest(argv_of(disk, "tap=duetbench0"))
        try:
            g.run("ip link set eth0 up && ip addr add 10.9.0.2/24 dev eth0")
            sink = Sink("10.9.0.1")
            net_send(g, "10.9.0.1", sink.port)
            return {"net tap": sink.rate()}
        finally:
            g.close()
    finally:
        subprocess.run("ip link del duetbench0", shell=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duet", default=os.path.join(ROOT, "target", "release", "duet"))
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--only", default="disk,user,tap")
    ap.add_argument("--baseline", metavar="DUET",
                    help="another duet binary (e.g. main's) measured in the same runs")
    ap.add_argument("--duet-args", default="",
                    help="more `duet run` options, e.g. '--profile' (with --stderr)")
    ap.add_argument("--stderr", metavar="FILE",
                    help="append the VMMs' standard error (duet's --profile report) to FILE")
    ap.add_argument("--disk-reps", type=int, default=16,
                    help="timed 64 MiB dd runs per measurement (after one to warm up)")
    ap.add_argument("--tap-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.write(os.urandom((DISK_MB + 16) << 20))
        vmms = {
            "duet": lambda disk, net: duet_argv(a.duet, disk, net, a.duet_args.split()),
            "QEMU-TCG": lambda disk, net: qemu_argv(a.qemu, disk, net),
        }
        if a.baseline:
            vmms["duet baseline"] = lambda disk, net: duet_argv(a.baseline, disk, net,
                                                                a.duet_args.split())
        if a.tap_child:
            # Inside the network namespace: one line of JSON-ish results.
            out = {}
            for name, argv_of in vmms.items():
                out[name] = tap(argv_of, disk)["net tap"]
            print("TAP", repr(out))
            return
        results = {}
        err = open(a.stderr, "ab") if a.stderr else None
        for run in range(a.runs):
            for name, argv_of in vmms.items():
                if "disk" in a.only or "user" in a.only:
                    for k, v in disk_and_user(argv_of, disk, a.only, a.disk_reps, err).items():
                        results.setdefault((k, name), []).append(v)
            if "tap" in a.only:
                p = subprocess.run(["unshare", "-n", sys.executable, os.path.abspath(__file__),
                                    "--tap-child", "--duet", a.duet, "--qemu", a.qemu],
                                   capture_output=True, text=True)
                m = re.search(r"^TAP (.*)$", p.stdout, re.M)
                if not m:
                    print(f"tap skipped: {p.stderr.strip()[-300:]}", file=sys.stderr)
                else:
                    for name, v in eval(m.group(1)).items():
                        results.setdefault(("net tap", name), []).append(v)
            print(f"run {run + 1}/{a.runs} done", file=sys.stderr)
    print("| measurement | VMM | MB/s (median) | runs |")
    print("|---|---|---|---|")
    for (k, name), vs in sorted(results.items()):
        print(f"| {k} | {name} | {statistics.median(vs):.1f} | {', '.join(f'{v:.1f}' for v in vs)} |")


if __name__ == "__main__":
    main()
