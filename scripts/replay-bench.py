#!/usr/bin/env python3
"""Record/replay benchmark: duet's `--record` / `duet replay` against QEMU's
`-icount shift=auto,rr=record|replay` on the same Linux boot.

Boots the guest kit's cloud PVH vmlinux with its initramfs and
`duet.poweroff` (the /init powers off at once) N times per runner and
reports the median wall time from process start to exit, and the log sizes.

Usage: scripts/replay-bench.py [--runs N]
Prints a Markdown table (the one in BENCHMARKS.md) and the exact commands.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMDLINE = "console=ttyS0 panic=-1 quiet duet.poweroff"


def kit():
    out = subprocess.run([os.path.join(REPO, "scripts", "linux-guest.sh")],
                         check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def commands(tmp):
    d = kit()
    kernel = os.path.join(d, "vmlinux-cloud")
    initrd = os.path.join(d, "initramfs.cpio.gz")
    duet = os.path.join(REPO, "target", "release", "duet")
    dlog = os.path.join(tmp, "duet.log")
    qlog = os.path.join(tmp, "qemu.rr")
    drun = [duet, "run", "--backend", "interp", "--memory", "256M", "--kernel", kernel,
            "--initrd", initrd, "--cmdline", CMDLINE, "--serial", "file=/dev/null"]
    q = ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg,thread=single", "-m", "256M",
         "-smp", "1", "-display", "none", "-no-reboot", "-nodefaults", "-serial", "null",
         "-kernel", kernel, "-initrd", initrd, "-append", CMDLINE]
    return [
        ("duet", "plain run", drun, None),
        ("duet", "record", drun + ["--record", dlog], dlog),
        ("duet", "replay", [duet, "replay", dlog, "--serial", "null"], None),
        ("qemu", "plain run (TCG)", q, None),
        ("qemu", "icount, no rr", q + ["-icount", "shift=auto"], None),
        ("qemu", "record", q + ["-icount", "shift=auto,rr=record,rrfile=" + qlog], qlog),
        ("qemu", "replay", q + ["-icount", "shift=auto,rr=replay,rrfile=" + qlog], None),
    ]


def run_once(cmd, timeout=900):
    start = time.monotonic()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=timeout)
    t = time.monotonic() - start
    if p.returncode != 0:
        sys.stderr.write(f"{' '.join(cmd)}: status {p.returncode}: {p.stderr.decode()[-400:]}\n")
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(tmp)
        times = {}
        sizes = {}
        # Record and replay alternate so that each replay reads the log of
        # the record just before it.
        for _ in range(a.runs):
            for runner, what, cmd, log in cmds:
                times.setdefault((runner, what), []).append(run_once(cmd))
                if log and os.path.exists(log):
                    sizes[runner] = os.path.getsize(log)
        print("| runner | run | median wall time (s) | runs |")
        print("|---|---|---|---|")
        for runner, what, _, _ in cmds:
            ts = times[(runner, what)]
            print(f"| {runner} | {what} | {statistics.median(ts):.2f} | "
                  f"{' / '.join(f'{t:.2f}' for t in ts)} |")
        for runner, what, _, _ in cmds:
            pass
        for r in ("duet", "qemu"):
            m = lambda w: statistics.median(times[(r, w)])
            base = m("plain run" if r == "duet" else "plain run (TCG)")
            print(f"\n{r}: record/plain {m('record') / base:.3f}, "
                  f"replay/record {m('replay') / m('record'):.3f}, "
                  f"log {sizes.get(r, 0)} bytes")
        print("\nCommands:")
        for runner, what, cmd, _ in cmds:
            print(f"- {runner} {what}: `{' '.join(cmd)}`")


if __name__ == "__main__":
    main()
