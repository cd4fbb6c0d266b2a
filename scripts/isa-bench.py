#!/usr/bin/env python3
"""x86-64-v2/v3 program run time: duet's interpreter vs QEMU-TCG (-cpu max).

Builds tests/guest-programs/isa_mix.c with gcc -O3 -static for
-march=x86-64-v2 and -march=x86-64-v3, packs them into a newc cpio appended
to the guest kit's initramfs (the kernel unpacks both), boots the Debian
cloud kernel on each runner, and times `/isa/vN` RUNS times inside the
guest with busybox `time` (the guest's own clock). Prints the median per
program and runner as a Markdown table, and the exact commands.

Usage: scripts/isa-bench.py [--runs 3] [--runners duet,qemu] [--reps 10]
(each timed run executes the program REPS times in a shell loop).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMDLINE = "console=ttyS0 panic=-1 quiet"


def kit():
    out = subprocess.run([os.path.join(REPO, "scripts", "linux-guest.sh")],
                         check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def cpio(files):
    """newc archive of (path, bytes, mode), directories included."""
    out = bytearray()
    ino = [0x5000]

    def entry(name, data, mode):
        ino[0] += 1
        fields = [ino[0], mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        out.extend(b"070701" + b"".join(b"%08x" % f for f in fields))
        out.extend(name.encode() + b"\0")
        while len(out) % 4:
            out.append(0)
        out.extend(data)
        while len(out) % 4:
            out.append(0)

    dirs = []
    for path, _, _ in files:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.append(d)
    for d in dirs:
        entry(d, b"", 0o040755)
    for path, data, mode in files:
        entry(path.strip("/"), data, 0o100000 | mode)
    entry("TRAILER!!!", b"", 0)
    return bytes(out)


def build(tmp):
    src = os.path.join(REPO, "tests", "guest-programs", "isa_mix.c")
    files = []
    for level in ("v2", "v3"):
        exe = os.path.join(tmp, f"isa-{level}")
        subprocess.run(["gcc", "-O3", f"-march=x86-64-{level}", "-static", "-o", exe, src, "-lm"],
                       check=True)
        files.append((f"/isa/{level}", open(exe, "rb").read(), 0o755))
    initrd = os.path.join(tmp, "initrd-isa.img")
    with open(initrd, "wb") as f:
        f.write(open(os.path.join(kit(), "initramfs.cpio.gz"), "rb").read())
        f.write(cpio(files))
    return initrd


def commands(initrd):
    kernel = os.path.join(kit(), "vmlinuz-cloud")
    duet = [os.path.join(REPO, "target", "release", "duet"), "run", "--backend", "interp",
            "--memory", "256M", "--kernel", kernel, "--initrd", initrd, "--cmdline", CMDLINE]
    qemu = ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg,thread=single", "-cpu", "max",
            "-m", "256M", "-smp", "1", "-display", "none", "-no-reboot", "-nodefaults",
            "-serial", "stdio", "-kernel", kernel, "-initrd", initrd, "-append", CMDLINE]
    return {"duet": duet, "qemu": qemu}


class Guest:
    def __init__(self, cmd):
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL)
        self.buf = b""
        os.set_blocking(self.p.stdout.fileno(), False)

    def wait_for(self, pattern, timeout=900):
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            m = re.search(pattern, self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m
            try:
                chunk = self.p.stdout.read(65536)
            except BlockingIOError:
                chunk = None
            if chunk:
                self.buf += chunk
            elif self.p.poll() is not None:
                raise RuntimeError(f"guest exited ({self.p.returncode})")
            else:
                time.sleep(0.05)
        raise RuntimeError(f"timeout waiting for {pattern!r}")

    def send(self, line):
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def close(self):
        try:
            self.send("poweroff -f")
            self.p.wait(timeout=120)
        except Exception:
            self.p.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--runners", default="duet,qemu")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="duet-isa-bench-")
    initrd = build(tmp)
    cmds = commands(initrd)
    rows = []
    for r in a.runners.split(","):
        g = Guest(cmds[r])
        g.wait_for(rb"DUET-INIT-READY")
        for level in ("v2", "v3"):
            times = []
            for k in range(a.runs):
                g.send(f"time sh -c 'for i in $(seq {a.reps}); do /isa/{level} >/dev/null; done'"
                       f"; echo BENCH-DONE-{k}")
                m = g.wait_for(rb"real\s+(\d+)m\s*([\d.]+)s")
                times.append(int(m.group(1)) * 60 + float(m.group(2)))
                g.wait_for(f"BENCH-DONE-{k}\r?\n".encode())
            rows.append((level, r, statistics.median(times), times))
            print(f"{level} {r}: {times}", file=sys.stderr)
        g.close()
    print(f"| program ({a.reps} runs of isa_mix) | runner | median of {a.runs} | all |")
    print("|---|---|---|---|")
    for level, r, med, times in rows:
        print(f"| x86-64-{level} | {r} | {med:.2f} s | {', '.join(f'{t:.2f}' for t in times)} |")
    print()
    for r, c in cmds.items():
        print(f"- {r}: `{' '.join(c)}`")


if __name__ == "__main__":
    main()
