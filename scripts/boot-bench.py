#!/usr/bin/env python3
"""Boot-time benchmark: duet (both execution tiers) vs QEMU-TCG on the same kernels.

For each kernel (cloud PVH vmlinux, cloud bzImage, generic XZ bzImage) and
each runner, boot with the guest kit's initramfs and `duet.poweroff` on the
command line (its /init prints DUET-INIT-READY and powers off), N times,
the runners interleaved, and report the median wall time from process start
to the marker and to exit.

Runners: duet (the translation tier, `--tier jit`), duet-interp (`--tier
interp`), qemu (TCG, single-threaded).

--workload sha256 instead boots to the shell and times, with the guest's
busybox `time`, `dd if=/dev/zero bs=1M count=32 | sha256sum` (guest userland
and the kernel's pipe and page-cache paths), then powers off; the table then
holds the guest's "real" time.

Usage: scripts/boot-bench.py [--runs N] [--only cloud-pvh,cloud-bz,generic-bz]
                             [--runners duet,duet-interp,qemu] [--workload boot|sha256]
Prints a Markdown table (the one in BENCHMARKS.md) and the exact commands.
"""

import argparse
import os
import re
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


USERLAND = b"time sh -c 'dd if=/dev/zero bs=1M count=32 2>/dev/null | sha256sum'; poweroff -f\n"


def commands(k, cmdline=CMDLINE):
    d = kit()
    initrd = os.path.join(d, "initramfs.cpio.gz")
    kernel = os.path.join(d, {"cloud-pvh": "vmlinux-cloud", "cloud-bz": "vmlinuz-cloud",
                              "generic-bz": "vmlinuz-generic"}[k])
    duet = [os.path.join(REPO, "target", "release", "duet"), "run", "--backend", "interp",
            "--memory", "256M", "--kernel", kernel, "--initrd", initrd, "--cmdline", cmdline]
    qemu = ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg,thread=single", "-m", "256M",
            "-smp", "1", "-display", "none", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline]
    return {"duet": duet + ["--tier", "jit"], "duet-interp": duet + ["--tier", "interp"],
            "qemu": qemu}


def run_once(cmd, timeout=900, feed=None):
    """(marker time, exit time, exit status, guest `time` real seconds)."""
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE if feed else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    buf = b""
    marker_at = None
    while True:
        chunk = p.stdout.read1(65536)
        if not chunk:
            break
        buf += chunk
        if marker_at is None and MARKER in buf:
            marker_at = time.monotonic() - start
            if feed:
                # The shell starts right after the marker.
                time.sleep(0.5)
                p.stdin.write(feed)
                p.stdin.flush()
        if time.monotonic() - start > timeout:
            p.kill()
            break
    p.wait()
    real = None
    m = re.search(rb"real\s+(\d+)m\s*([\d.]+)s", buf)
    if m:
        real = int(m.group(1)) * 60 + float(m.group(2))
    return marker_at, time.monotonic() - start, p.returncode, real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="cloud-pvh,cloud-bz,generic-bz")
    ap.add_argument("--runners", default="duet,duet-interp,qemu")
    ap.add_argument("--workload", choices=["boot", "sha256"], default="boot")
    a = ap.parse_args()
    sha = a.workload == "sha256"
    cmdline = "console=ttyS0 panic=-1 quiet" if sha else CMDLINE
    feed = USERLAND if sha else None
    rows = []
    runners = a.runners.split(",")
    for k in a.only.split(","):
        cmds = commands(k, cmdline)
        res = {r: ([], [], []) for r in runners}
        # Interleaved: one run of each runner per round.
        for _ in range(a.runs):
            for r in runners:
                m, e, rc, real = run_once(cmds[r], feed=feed)
                if m is None or (sha and real is None):
                    print(f"{k} {r}: no init marker or no time (exit {rc})", file=sys.stderr)
                    continue
                res[r][0].append(m)
                res[r][1].append(e)
                if real is not None:
                    res[r][2].append(real)
                print(f"  {k} {r}: init {m:.2f} s, exit {e:.2f} s"
                      + (f", guest real {real:.2f} s" if real is not None else ""), file=sys.stderr)
        for r in runners:
            marks, ends, reals = res[r]
            if marks:
                med = statistics.median
                rows.append((k, r, med(marks), med(ends), med(reals) if reals else None, len(marks)))
    if sha:
        print("| kernel | runner | `dd bs=1M count=32 \\| sha256sum` (guest `time`, real) | runs |")
        print("|---|---|---|---|")
        for k, r, m, e, real, n in rows:
            print(f"| {k} | {r} | {real:.2f} s | {n} |")
    else:
        print("| kernel | runner | to /init marker | to exit | runs |")
        print("|---|---|---|---|---|")
        for k, r, m, e, real, n in rows:
            print(f"| {k} | {r} | {m:.2f} s | {e:.2f} s | {n} |")
    print()
    for k in a.only.split(","):
        for r, c in commands(k, cmdline).items():
            if r in runners:
                print(f"- {k} {r}: `{' '.join(c)}`")
    if sha:
        print(f"- typed at the shell: `{USERLAND.decode().strip()}`")


if __name__ == "__main__":
    main()
