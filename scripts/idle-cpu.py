#!/usr/bin/env python3
"""How much host CPU does an idle guest cost?

Boots Debian's cloud kernel to its busybox shell on the chosen backend,
waits for the shell to settle, then samples the duet process's user+system
CPU time (from /proc/<pid>/stat) over a window and prints it as a percentage
of one host core. The guest is idle: the shell waits on the console, the
kernel sits in HLT between timer ticks.

Usage: scripts/idle-cpu.py [--backend interp|kvm] [--window SECONDS]
"""

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="interp")
    ap.add_argument("--window", type=float, default=20.0)
    ap.add_argument("--settle", type=float, default=5.0)
    a = ap.parse_args()
    kit = subprocess.run([os.path.join(REPO, "scripts", "linux-guest.sh")], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    cmd = [os.path.join(REPO, "target", "release", "duet"), "run", "--backend", a.backend,
           "--kernel", os.path.join(kit, "vmlinux-cloud"),
           "--initrd", os.path.join(kit, "initramfs.cpio.gz"),
           "--cmdline", "console=ttyS0 quiet"]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    buf = b""
    while b"DUET-INIT-READY" not in buf:
        chunk = p.stdout.read1(4096)
        if not chunk:
            sys.exit("duet exited before the shell came up")
        buf += chunk
    time.sleep(a.settle)
    c0, t0 = cpu_seconds(p.pid), time.monotonic()
    time.sleep(a.window)
    c1, t1 = cpu_seconds(p.pid), time.monotonic()
    p.stdin.write(b"poweroff -f\n")
    p.stdin.flush()
    p.wait(timeout=60)
    pct = 100.0 * (c1 - c0) / (t1 - t0)
    print(f"idle guest on {a.backend}: {c1 - c0:.3f} s of CPU in {t1 - t0:.1f} s = {pct:.2f}% of one core")
    print(f"command: {' '.join(cmd)}")


if __name__ == "__main__":
    main()
