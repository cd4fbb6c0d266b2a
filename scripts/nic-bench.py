#!/usr/bin/env python3
"""Linux network throughput per NIC model, duet beside QEMU-TCG in the same run.

Same kernel (the guest kit's vmlinuz-generic, which has the e1000 driver as
a module in the initramfs), same initramfs, one vCPU, 256 MiB, `--net
user` (libslirp in both), the NIC either an emulated e1000 (82540EM; QEMU's
`-device e1000`) or virtio-net over PCI (`-device virtio-net-pci`):

- guest -> host: the guest pipes --mb MiB of zeros into busybox `nc`
  towards a sink on the host (10.0.2.2); MB/s measured on the host from the
  first byte to the end of the stream (the sink of virtio-bench.py);
- host -> guest: busybox `wget -O /dev/null` of --rx-mb MiB from an
  HTTP server on the host, timed with the guest's /proc/uptime, after an
  untimed 4 MiB download (both VMMs then run warm code: translated blocks,
  TCP past slow start) — the steady-state rate, not the first second.

duet runs its default execution tier (the translation tier); QEMU is
`-accel tcg,thread=single` on q35. Median of --runs (default 3) boots per
VMM and NIC, interleaved. Usage (from the repository root, after `cargo
build --release` and scripts/linux-guest.sh):

    heavy scripts/nic-bench.py [--runs 3] [--mb 16] [--rx-mb 64] [--nics e1000,virtio]

Prints one Markdown table row per measurement, and the commands.
"""
import argparse
import http.server
import importlib.util
import os
import re
import statistics
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "virtio_bench", os.path.join(ROOT, "scripts", "virtio-bench.py"))
vb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vb)

KERNEL = os.path.join(vb.KIT, "vmlinuz-generic")
INITRD = vb.INITRD
CMDLINE = "console=ttyS0 panic=-1 quiet"


def duet_argv(duet, nic):
    model = ",model=e1000" if nic == "e1000" else ""
    return [duet, "run", "--backend", "interp", "--memory", "256M", "--kernel", KERNEL,
            "--initrd", INITRD, "--cmdline", CMDLINE, "--serial", "stdio",
            "--net", "user" + model]


def qemu_argv(qemu, nic):
    device = "e1000" if nic == "e1000" else "virtio-net-pci"
    return [qemu, "-M", "q35", "-accel", "tcg,thread=single", "-m", "256M", "-smp", "1",
            "-display", "none", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", KERNEL, "-initrd", INITRD, "-append", CMDLINE,
            "-netdev", "user,id=n0", "-device", f"{device},netdev=n0"]


class Source:
    """An HTTP server on 127.0.0.1 that answers every GET with `size` zero bytes."""

    def __init__(self, size):
        chunk = bytes(1 << 20)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                left = size
                while left:
                    n = min(left, len(chunk))
                    self.wfile.write(chunk[:n])
                    left -= n

            def log_message(self, *args):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()


def one_boot(argv, mb, rx_mb):
    """Boot, DHCP, then both directions; {direction: MB/s}."""
    g = vb.Guest(argv)
    try:
        out = g.run("ip link set eth0 up; udhcpc -i eth0 -n -q -t 20 >/dev/null 2>&1; "
                    "ip -4 addr show eth0 | grep -c 10.0.2.15")
        if not out.strip().endswith("1"):
            raise RuntimeError(f"no DHCP lease: {out!r}")
        r = {}
        vb.NET_MB = mb
        sink = vb.Sink("127.0.0.1")
        g.run(f"dd if=/dev/zero bs=64k count={mb * 16} 2>/dev/null | nc 10.0.2.2 {sink.port}")
        r["guest -> host"] = sink.rate()
        warm = Source(4 << 20)
        try:
            g.run(f"wget -q -O /dev/null http://10.0.2.2:{warm.port}/z")
        finally:
            warm.close()
        src = Source(rx_mb << 20)
        try:
            out = g.run(f"read a b < /proc/uptime; wget -q -O /dev/null http://10.0.2.2:{src.port}/z "
                        f"&& echo OK; read c d < /proc/uptime; echo T $a $c")
        finally:
            src.close()
        t = re.search(r"T ([\d.]+) ([\d.]+)", out)
        if "OK" not in out or not t:
            raise RuntimeError(f"download failed: {out!r}")
        r["host -> guest"] = (rx_mb << 20) / max(float(t.group(2)) - float(t.group(1)), 0.01) / 1e6
        return r
    finally:
        g.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=16, help="MiB sent guest -> host")
    ap.add_argument("--rx-mb", type=int, default=64, help="MiB received host -> guest")
    ap.add_argument("--nics", default="e1000,virtio")
    ap.add_argument("--duet", default=os.path.join(ROOT, "target", "release", "duet"))
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    a = ap.parse_args()
    nics = a.nics.split(",")
    vmms = {
        "duet": lambda nic: duet_argv(a.duet, nic),
        "QEMU-TCG": lambda nic: qemu_argv(a.qemu, nic),
    }
    results = {}
    for run in range(a.runs):
        for nic in nics:
            for name, argv_of in vmms.items():
                for k, v in one_boot(argv_of(nic), a.mb, a.rx_mb).items():
                    results.setdefault((nic, k, name), []).append(v)
                print(f"run {run + 1}/{a.runs} {nic} {name}: "
                      + ", ".join(f"{k} {v[-1]:.2f}" for (n, k, m), v in results.items()
                                  if n == nic and m == name), file=sys.stderr, flush=True)
    print("| NIC | direction | VMM | MB/s (median) | runs |")
    print("|---|---|---|---|---|")
    for (nic, k, name), vs in sorted(results.items()):
        print(f"| {nic} | {k} | {name} | {statistics.median(vs):.2f} | "
              f"{', '.join(f'{v:.2f}' for v in vs)} |")
    print()
    for nic in nics:
        for name, argv_of in vmms.items():
            print(f"- {name}, {nic}: `{' '.join(argv_of(nic))}`")


if __name__ == "__main__":
    main()
