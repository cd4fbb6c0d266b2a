#!/usr/bin/env python3
"""Boot-time benchmark: duet's interpreter vs QEMU-TCG on the same kernels.

For each kernel (cloud PVH vmlinux, cloud bzImage, generic XZ bzImage) and
each runner, boot with the guest kit's initramfs and `duet.poweroff` on the
command line (its /init prints DUET-INIT-READY and powers off), N times, and
report the median wall time from process start to the marker and to exit.

Usage: scripts/boot-bench.py [--runs N] [--only cloud-pvh,cloud-bz,generic-bz]
                             [--runners duet,qemu]
Prints a Markdown table (the one in BENCHMARKS.md) and the exact commands.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = b"DUET-INIT-READY"
CMDLINE = "console=ttyS0 panic=-1 quiet duet.poweroff"


def kit():
    out = subprocess.run([os.path.join(REPO, "scripts", "linux-guest.sh")],
                         check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def commands(k):
    d = kit()
    initrd = os.path.join(d, "initramfs.cpio.gz")
    kernel = os.path.join(d, {"cloud-pvh": "vmlinux-cloud", "cloud-bz": "vmlinuz-cloud",
                              "generic-bz": "vmlinuz-generic"}[k])
    duet = [os.path.join(REPO, "target", "release", "duet"), "run", "--backend", "interp",
            "--memory", "256M", "--kernel", kernel, "--initrd", initrd, "--cmdline", CMDLINE]
    qemu = ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg,thread=single", "-m", "256M",
            "-smp", "1", "-display", "none", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", kernel, "-initrd", initrd, "-append", CMDLINE]
    return {"duet": duet, "qemu": qemu}


def run_once(cmd, timeout=900):
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    buf = b""
    marker_at = None
    while True:
        chunk = p.stdout.read1(65536)
        if not chunk:
            break
        buf += chunk
        if marker_at is None and MARKER in buf:
            marker_at = time.monotonic() - start
        if time.monotonic() - start > timeout:
            p.kill()
            break
    p.wait()
    return marker_at, time.monotonic() - start, p.returncode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="cloud-pvh,cloud-bz,generic-bz")
    ap.add_argument("--runners", default="duet,qemu")
    a = ap.parse_args()
    rows = []
    for k in a.only.split(","):
        cmds = commands(k)
        for r in a.runners.split(","):
            marks, ends = [], []
            for _ in range(a.runs):
                m, e, rc = run_once(cmds[r])
                if m is None:
                    print(f"{k} {r}: no init marker (exit {rc})", file=sys.stderr)
                    continue
                marks.append(m)
                ends.append(e)
            if marks:
                rows.append((k, r, statistics.median(marks), statistics.median(ends), len(marks)))
                print(f"{k:<11} {r:<5} init {rows[-1][2]:.2f} s  exit {rows[-1][3]:.2f} s  (median of {len(marks)})",
                      file=sys.stderr)
    print("| kernel | runner | to /init marker | to exit | runs |")
    print("|---|---|---|---|---|")
    for k, r, m, e, n in rows:
        print(f"| {k} | {r} | {m:.2f} s | {e:.2f} s | {n} |")
    print()
    for k in a.only.split(","):
        for r, c in commands(k).items():
            print(f"- {k} {r}: `{' '.join(c)}`")


if __name__ == "__main__":
    main()
