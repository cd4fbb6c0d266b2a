#!/usr/bin/env bash
# Guest kit: Debian bookworm's own kernels and busybox, and an initramfs.
#
# Fetches (with `apt-get download`, nothing is committed):
#   linux-image-<ver>-cloud-amd64-unsigned   cloud kernel (LZ4 bzImage)
#   linux-image-<ver>-amd64-unsigned         generic kernel (XZ bzImage)
#   busybox-static
# and produces, in $DUET_GUEST_DIR (default: <repo>/.cache/linux-guest):
#   vmlinuz-cloud     bzImage of the cloud kernel
#   vmlinuz-generic   bzImage of the generic kernel
#   vmlinux-cloud     the cloud kernel's ELF vmlinux (PVH entry), extracted
#                     from the bzImage payload
#   initramfs.cpio.gz busybox initramfs; /init mounts proc, sys, devtmpfs,
#                     loads the virtio modules of the running kernel (virtio,
#                     virtio_ring, virtio_pci*, virtio_mmio, failover,
#                     net_failover, virtio_net, virtio_blk, virtio_console,
#                     virtio-rng: both kernels' copies are in /lib/modules, in
#                     dependency order; and e1000, which only the generic
#                     kernel has), brings up lo, prints
#                     "DUET-INIT-READY" and runs a shell on the console (or,
#                     with `duet.poweroff` on the kernel command line, prints
#                     the marker and powers off at once). udhcpc's script
#                     configures the address, route and DNS it is given.
#   VERSION           the kernel version string
#
# Re-running reuses what is already there. Needs: apt-get, dpkg-deb, python3,
# lz4 and xz, and for the virtio tests tcpdump, ip and libslirp0 (the
# script installs them with apt-get when missing and it runs as root).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${DUET_GUEST_DIR:-$repo/.cache/linux-guest}"
mkdir -p "$out/debs" "$out/extract"
# One builder at a time (tests run in parallel processes).
exec 9>"$out/.lock"
flock 9

need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ]; then
        apt-get install -y "$2" >/dev/null
    else
        echo "linux-guest.sh: '$1' is missing (install the Debian package $2)" >&2
        exit 1
    fi
}
need dpkg-deb dpkg
need lz4 lz4
need xz xz-utils
need python3 python3
# Host side of the virtio tests: libslirp (--net user), tcpdump (reading
# captures), ip (the TAP test's network namespace).
need tcpdump tcpdump
need ip iproute2
if ! ls /usr/lib/*/libslirp.so.0 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get install -y libslirp0 >/dev/null
    else
        echo "linux-guest.sh: libslirp.so.0 is missing (install the Debian package libslirp0)" >&2
        exit 1
    fi
fi

newest() {
    # Newest package whose name matches the regex $1.
    apt-cache pkgnames linux-image-6 | grep -E "$1" | sort -V | tail -n 1
}

fetch() {
    local pkg="$1"
    if ! ls "$out/debs/${pkg}_"*.deb >/dev/null 2>&1; then
        # As root, apt's download sandbox user cannot write here: download
        # as root. A stale package index names versions the mirror no longer
        # has: refresh it once and retry.
        (cd "$out/debs" && apt-get -o APT::Sandbox::User=root download "$pkg" >/dev/null) ||
            { apt-get update >/dev/null 2>&1 || true
              (cd "$out/debs" && apt-get -o APT::Sandbox::User=root download "$pkg" >/dev/null); } || {
            echo "linux-guest.sh: apt-get download $pkg failed (is deb.debian.org reachable? see /etc/apt/sources.list)" >&2
            exit 1
        }
    fi
    ls "$out/debs/${pkg}_"*.deb | head -n 1
}

if [ ! -s "$out/VERSION" ] || [ ! -s "$out/vmlinuz-cloud" ] || [ ! -s "$out/vmlinuz-generic" ]; then
    cloud_pkg="$(newest '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$')"
    if [ -z "$cloud_pkg" ]; then
        apt-get update >/dev/null 2>&1 || true
        cloud_pkg="$(newest '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$')"
    fi
    [ -n "$cloud_pkg" ] || { echo "linux-guest.sh: no linux-image-*-cloud-amd64-unsigned package found" >&2; exit 1; }
    abi="${cloud_pkg#linux-image-}"
    abi="${abi%-cloud-amd64-unsigned}"
    generic_pkg="linux-image-${abi}-amd64-unsigned"
    for pkg in "$cloud_pkg" "$generic_pkg"; do
        deb="$(fetch "$pkg")"
        rm -rf "$out/extract/$pkg"
        dpkg-deb -x "$deb" "$out/extract/$pkg"
    done
    cp "$out/extract/$cloud_pkg"/boot/vmlinuz-* "$out/vmlinuz-cloud"
    cp "$out/extract/$generic_pkg"/boot/vmlinuz-* "$out/vmlinuz-generic"
    basename "$out/extract/$cloud_pkg"/boot/vmlinuz-* | sed 's/^vmlinuz-//' > "$out/VERSION"
fi

if [ ! -s "$out/vmlinux-cloud" ]; then
    # The bzImage payload is the compressed ELF vmlinux; the cloud kernel
    # uses LZ4 (legacy frame, magic 02 21 4c 18).
    python3 - "$out/vmlinuz-cloud" "$out/vmlinux-cloud.lz4" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
setup_sects = data[0x1f1] or 4
payload_offset = int.from_bytes(data[0x248:0x24c], "little")
payload_length = int.from_bytes(data[0x24c:0x250], "little")
start = (setup_sects + 1) * 512 + payload_offset
open(sys.argv[2], "wb").write(data[start:start + payload_length])
PY
    lz4 -dc "$out/vmlinux-cloud.lz4" > "$out/vmlinux-cloud.tmp" 2>/dev/null || true
    rm -f "$out/vmlinux-cloud.lz4"
    if [ "$(head -c 4 "$out/vmlinux-cloud.tmp" | od -An -tx1 | tr -d ' ')" != "7f454c46" ]; then
        echo "linux-guest.sh: extracting vmlinux from the cloud bzImage failed" >&2
        exit 1
    fi
    mv "$out/vmlinux-cloud.tmp" "$out/vmlinux-cloud"
fi

if [ ! -s "$out/busybox" ]; then
    deb="$(fetch busybox-static)"
    rm -rf "$out/extract/busybox"
    dpkg-deb -x "$deb" "$out/extract/busybox"
    cp "$out/extract/busybox/bin/busybox" "$out/busybox"
fi

# The virtio modules of both kernels (the packages ship them uncompressed
# and without modules.dep; /init loads them in dependency order).
modules="virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio failover net_failover virtio_net virtio_blk virtio_console virtio-rng"
# Modules only some kernels have (Debian's cloud kernel has no e1000).
optional_modules="e1000"
if [ ! -s "$out/modules/.done" ] || [ "$(cat "$out/modules/.done")" != "$modules $optional_modules" ]; then
    rm -rf "$out/modules"
    for dir in "$out"/extract/linux-image-*/lib/modules/*; do
        [ -d "$dir/kernel" ] || continue
        ver="$(basename "$dir")"
        mkdir -p "$out/modules/$ver"
        for m in $modules; do
            f="$(find "$dir/kernel" -name "$m.ko" | head -n 1)"
            [ -n "$f" ] || { echo "linux-guest.sh: $m.ko missing from $ver" >&2; exit 1; }
            cp "$f" "$out/modules/$ver/"
        done
        for m in $optional_modules; do
            f="$(find "$dir/kernel" -name "$m.ko" | head -n 1)"
            [ -z "$f" ] || cp "$f" "$out/modules/$ver/"
        done
    done
    echo "$modules $optional_modules" > "$out/modules/.done"
    rm -f "$out/initramfs.cpio.gz"
fi

if [ ! -s "$out/initramfs.cpio.gz" ] || [ "$0" -nt "$out/initramfs.cpio.gz" ]; then
    python3 - "$out/busybox" "$out/initramfs.cpio.gz" "$out/modules" "$modules $optional_modules" <<'PY'
# A deterministic newc cpio (fixed mtimes and owners), gzip-compressed.
import gzip, os, sys

busybox = open(sys.argv[1], "rb").read()
moddir, modnames = sys.argv[3], sys.argv[4]
init = b"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
m=/lib/modules/$(uname -r)
if [ -d "$m" ]; then
    for mod in @MODULES@; do
        insmod "$m/$mod.ko" 2>/dev/null
    done
fi
ip link set lo up
echo "DUET-INIT-READY"
if grep -q duet.poweroff /proc/cmdline; then
    poweroff -f
fi
exec setsid cttyhack sh
""".replace(b"@MODULES@", modnames.encode())
dhcp_script = b"""#!/bin/sh
# udhcpc's hook: apply what the DHCP server gave.
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        if [ -n "$router" ]; then
            ip route add default via "${router%% *}" dev "$interface"
        fi
        : > /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
        ;;
esac
exit 0
"""
entries = [
    ("bin", 0o040755, b""),
    ("etc", 0o040755, b""),
    ("etc/udhcpc", 0o040755, b""),
    ("etc/udhcpc/default.script", 0o100755, dhcp_script),
    ("lib", 0o040755, b""),
    ("lib/modules", 0o040755, b""),
    ("sbin", 0o040755, b""),
    ("dev", 0o040755, b""),
    ("proc", 0o040755, b""),
    ("sys", 0o040755, b""),
    ("tmp", 0o041777, b""),
    ("root", 0o040700, b""),
    ("bin/busybox", 0o100755, busybox),
    ("init", 0o100755, init),
]
for ver in sorted(os.listdir(moddir)):
    d = os.path.join(moddir, ver)
    if not os.path.isdir(d):
        continue
    entries.append(("lib/modules/" + ver, 0o040755, b""))
    for name in modnames.split():
        path = os.path.join(d, name + ".ko")
        if os.path.exists(path):
            entries.append(("lib/modules/%s/%s.ko" % (ver, name), 0o100644, open(path, "rb").read()))
out = bytearray()
ino = 1
def pad4(b):
    while len(b) % 4:
        b.append(0)
for name, mode, data in entries + [("TRAILER!!!", 0, b"")]:
    nm = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data), 0, 0, 0, 0, len(nm), 0]
    out += b"070701" + b"".join(b"%08X" % f for f in fields) + nm
    pad4(out)
    out += data
    pad4(out)
    ino += 1
with open(sys.argv[2], "wb") as f:
    f.write(gzip.compress(bytes(out), mtime=0))
PY
fi

echo "$out"
