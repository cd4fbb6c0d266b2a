#!/usr/bin/env python3
"""Writes the hand-made seed inputs of the fuzz corpora (fuzz/corpus/*/seed-*).

Run from fuzz/: python3 seeds.py. The fuzzers grow the corpora from these;
`cargo fuzz cmin` keeps them small before a commit.
"""
import os
import struct


def put(target, name, data):
    os.makedirs(f"corpus/{target}", exist_ok=True)
    with open(f"corpus/{target}/seed-{name}", "wb") as f:
        f.write(data)


def bzimage(setup_sects=1, version=0x020F, payload=512, init_size=0x100000, relocatable=1):
    img = bytearray((setup_sects + 1) * 512 + payload)
    struct.pack_into("<B", img, 0x1F1, setup_sects)
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, version)
    struct.pack_into("<B", img, 0x211, 0x01)  # LOADED_HIGH
    struct.pack_into("<I", img, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", img, 0x22C, 0x37FFFFFF)  # initrd_addr_max
    struct.pack_into("<I", img, 0x230, 0x200000)  # kernel_alignment
    struct.pack_into("<B", img, 0x234, relocatable)
    struct.pack_into("<I", img, 0x238, 2048)  # cmdline_size
    struct.pack_into("<I", img, 0x260, init_size)
    for k in range((setup_sects + 1) * 512, len(img)):
        img[k] = 0xF4
    return bytes(img)


# selector byte: bits 0-1 memory size, 2-3 command line, 4 initrd.
put("loader_bzimage", "minimal", bytes([0x06]) + bzimage())
put("loader_bzimage", "old-protocol", bytes([0x01]) + bzimage(version=0x0200, relocatable=0))
put("loader_bzimage", "huge-init-size", bytes([0x02]) + bzimage(init_size=0xFFFFFFF0))
put("loader_bzimage", "with-initrd", bytes([0x16]) + bzimage() + b"\x00\x40" + bytes(range(256)) * 64)


def elf(entry=0x100000, paddr=0x100000, filesz=64, memsz=4096, note=True):
    # ELF64 header, two program headers (LOAD, NOTE), the note, the code.
    ehsize, phentsize = 64, 56
    phoff = ehsize
    nph = 2 if note else 1
    note_off = phoff + nph * phentsize
    desc = struct.pack("<I", entry)
    note_data = struct.pack("<III", 4, len(desc), 18) + b"Xen\x00" + desc
    code_off = note_off + len(note_data)
    code_off = (code_off + 15) & ~15
    out = bytearray(code_off + filesz)
    out[0:4] = b"\x7fELF"
    out[4], out[5], out[6] = 2, 1, 1
    struct.pack_into("<HHIQQQIHHHHHH", out, 16, 2, 62, 1, entry, phoff, 0, 0, ehsize, phentsize, nph, 64, 0, 0)
    struct.pack_into("<IIQQQQQQ", out, phoff, 1, 5, code_off, paddr, paddr, filesz, memsz, 0x1000)
    if note:
        struct.pack_into("<IIQQQQQQ", out, phoff + phentsize, 4, 4, note_off, 0, 0, len(note_data), len(note_data), 4)
        out[note_off:note_off + len(note_data)] = note_data
    for k in range(code_off, len(out)):
        out[k] = 0xF4
    return bytes(out)


put("loader_elf_pvh", "pvh", bytes([0x06]) + elf())
put("loader_elf_pvh", "no-note", bytes([0x02]) + elf(note=False))
put("loader_elf_pvh", "bss-beyond-memory", bytes([0x00]) + elf(memsz=0x7FFFFFFF))
put("loader_elf_pvh", "with-initrd", bytes([0x12]) + elf() + b"\x01\x00" + b"I" * 256)

# multiboot: flags first (the harness builds magic and checksum), then the
# address fields header_addr, load_addr, load_end_addr, bss_end_addr,
# entry_addr (flag bit 16), then the image.
def mb(flags, fields, body=256):
    return struct.pack("<I", flags) + struct.pack("<5I", *fields) + b"\xf4" * body


put("loader_multiboot", "aout-kludge", bytes([0x06]) + mb(0x00010003, (0x100000, 0x100000, 0x100200, 0x101000, 0x10000C)))
put("loader_multiboot", "plain", bytes([0x02]) + mb(0x00000003, (0, 0, 0, 0, 0)))
put("loader_multiboot", "load-end-before-load", bytes([0x01]) + mb(0x00010000, (0x100000, 0x200000, 0x100000, 0, 0x200000)))
put("loader_multiboot", "with-initrd", bytes([0x16]) + mb(0x00010003, (0x100000, 0x100000, 0, 0, 0x10000C)) + b"\x00\x80" + b"M" * 128)

# cpu_exec: mode selector, flags, 16 registers, code.
regs = struct.pack("<16Q", *([0x1234, 5, 0xffffffff, 0xd000, 0xa800, 0xd800, 0xd100, 0xe000] + [k for k in range(8)]))
code = bytes.fromhex("b801000000" "01c8" "0fafc1" "f7f1" "a5" "0f0b")  # mov eax,1; add eax,ecx; imul; div; movsd; ud2
for mode in range(6):
    put("cpu_exec", f"mode{mode}", bytes([mode, 0x01]) + regs + code)
put("cpu_exec", "x87-mmx", bytes([0, 0x40]) + regs + bytes.fromhex("d9e8d9eed8f10f6fc00f77dbe3d9fe"))
put("cpu_exec", "tf", bytes([1, 0x20]) + regs + bytes.fromhex("9cf3a4cc"))

# device_registers: arbitrary's encoding; a few byte strings per device.
for d in range(11):
    put("device_registers", f"dev{d}", bytes([d]) + bytes((d * 37 + k * 11) & 0xFF for k in range(120)))

# virtio_devices: device kind (0 blk, 1 read-only blk, 2 net, 3 console,
# 4 rng), a byte the block devices take as sectors - 1, the transport
# (0 pci, 1 mmio), then operations (see fuzz/src/virtio.rs). Queue q's
# descriptors live at 0x10000 + q * 0x4000, its available ring 0x1000
# after them; buffers at 0x30000 and up.
NEXT, WRITE, INDIRECT = 1, 2, 4
VERSION_1 = 1 << 32


def v_bring_up(features, size=16, mask=0b11, msix=1):
    return bytes([4]) + struct.pack("<QHBB", features, size, mask, msix)


def v_desc(q, index, addr, length, flags=0, nxt=0):
    return bytes([5]) + struct.pack("<BBBIIHH", q, index, 0, addr, length, flags, nxt)


def v_avail(q, slot, head, idx):
    return bytes([6]) + struct.pack("<BBHH", q, slot, head, idx)


def v_notify(q):
    return bytes([7, q])


def v_input(data):
    return bytes([8]) + struct.pack("<H", len(data)) + data


def v_mem(addr, data):
    out = b""
    for k in range(0, len(data), 255):
        chunk = data[k:k + 255]
        out += bytes([9]) + struct.pack("<IB", addr + k, len(chunk)) + chunk
    return out


def v_reset():
    return bytes([10])


def blk_header(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


def blk_session(kind, transport):
    s = bytes([kind, 7, transport])
    s += v_bring_up(VERSION_1 | 1 << 28 | 1 << 29 | 1 << 9 | 1 << 13 | 1 << 14, mask=1)
    # Write sector 1, read it back, get the ID, flush, write zeroes.
    s += v_mem(0x30000, blk_header(1, 1)) + v_mem(0x31000, bytes(range(256)) * 2)
    s += v_desc(0, 0, 0x30000, 16, NEXT, 1) + v_desc(0, 1, 0x31000, 512, NEXT, 2) + v_desc(0, 2, 0x32000, 1, WRITE)
    s += v_avail(0, 0, 0, 1) + v_notify(0)
    s += v_mem(0x30100, blk_header(0, 1))
    s += v_desc(0, 3, 0x30100, 16, NEXT, 4) + v_desc(0, 4, 0x33000, 512, WRITE | NEXT, 5) + v_desc(0, 5, 0x32001, 1, WRITE)
    s += v_avail(0, 1, 3, 2) + v_notify(0)
    s += v_mem(0x30200, blk_header(8, 0)) + v_mem(0x30300, blk_header(4, 0))
    s += v_desc(0, 6, 0x30200, 16, NEXT, 7) + v_desc(0, 7, 0x34000, 20, WRITE | NEXT, 8) + v_desc(0, 8, 0x32002, 1, WRITE)
    s += v_desc(0, 9, 0x30300, 16, NEXT, 10) + v_desc(0, 10, 0x32003, 1, WRITE)
    s += v_avail(0, 2, 6, 3) + v_avail(0, 3, 9, 4) + v_notify(0)
    s += v_mem(0x30400, blk_header(13, 0) + struct.pack("<QII", 2, 3, 1))
    s += v_desc(0, 11, 0x30400, 32, NEXT, 12) + v_desc(0, 12, 0x32004, 1, WRITE)
    s += v_avail(0, 4, 11, 5) + v_notify(0)
    # Read through an indirect table.
    table = struct.pack("<QIHH", 0x30100, 16, NEXT, 1) + struct.pack("<QIHH", 0x35000, 512, WRITE | NEXT, 2) + struct.pack("<QIHH", 0x32005, 1, WRITE, 0)
    s += v_mem(0x36000, table) + v_desc(0, 13, 0x36000, 48, INDIRECT)
    s += v_avail(0, 5, 13, 6) + v_notify(0)
    return s


def net_session(transport):
    s = bytes([2, 0, transport])
    s += v_bring_up(VERSION_1 | 1 << 15 | 1 << 5 | 1 << 16 | 1 << 0 | 1 << 1)
    s += v_desc(0, 0, 0x30000, 1024, WRITE) + v_desc(0, 1, 0x31000, 1024, WRITE) + v_avail(0, 0, 0, 1) + v_avail(0, 1, 1, 2) + v_notify(0)
    s += v_input(bytes(12) + bytes([0xFF] * 6) + bytes(range(100)))
    s += v_input(bytes(12) + bytes(range(200)) * 8)
    s += v_mem(0x32000, bytes(12) + bytes(range(60)))
    s += v_desc(1, 0, 0x32000, 72) + v_avail(1, 0, 0, 1) + v_notify(1)
    return s


def console_session(transport):
    s = bytes([3, 0, transport])
    s += v_bring_up(VERSION_1 | 1 << 29)
    s += v_desc(0, 0, 0x30000, 64, WRITE) + v_avail(0, 0, 0, 1) + v_notify(0)
    s += v_input(b"hello from the host\n")
    s += v_mem(0x31000, b"hello from the guest\n")
    s += v_desc(1, 0, 0x31000, 21) + v_avail(1, 0, 0, 1) + v_notify(1)
    return s


def rng_session(transport):
    s = bytes([4, 0, transport])
    s += v_bring_up(VERSION_1 | 1 << 28, mask=1)
    s += v_desc(0, 0, 0x30000, 64, WRITE) + v_desc(0, 1, 0x30100, 32, WRITE | NEXT, 2) + v_desc(0, 2, 0x30200, 32, WRITE)
    s += v_avail(0, 0, 0, 1) + v_avail(0, 1, 1, 2) + v_notify(0)
    return s


def hostile(prefix, features):
    # A descriptor loop, an address past RAM, a read-only buffer after a
    # writable one, an avail index far ahead, then a reset and a re-bring-up.
    s = prefix + v_bring_up(features, mask=0b11)
    s += v_desc(0, 0, 0x30000, 16, NEXT, 0) + v_avail(0, 0, 0, 1) + v_notify(0)
    s += v_reset() + v_bring_up(features, mask=0b11)
    s += v_desc(0, 1, 0x7FFFF000, 4096, WRITE) + v_avail(0, 0, 1, 1) + v_notify(0)
    s += v_reset() + v_bring_up(features, mask=0b11)
    s += v_desc(0, 2, 0x30000, 16, WRITE | NEXT, 3) + v_desc(0, 3, 0x30100, 16, 0) + v_avail(0, 0, 2, 1) + v_notify(0)
    s += v_reset() + v_bring_up(features, mask=0b11)
    s += v_desc(0, 4, 0x36000, 17, INDIRECT) + v_avail(0, 0, 4, 1) + v_notify(0)
    s += v_reset() + v_bring_up(features, size=3, mask=0b11)
    s += v_avail(0, 0, 0, 0x8000) + v_notify(0) + v_notify(1)
    return s


for t, tname in ((0, "pci"), (1, "mmio")):
    put("virtio_devices", f"blk-{tname}", blk_session(0, t))
    put("virtio_devices", f"blk-readonly-{tname}", blk_session(1, t))
    put("virtio_devices", f"net-{tname}", net_session(t))
    put("virtio_devices", f"console-{tname}", console_session(t))
    put("virtio_devices", f"rng-{tname}", rng_session(t))
    for kind in range(5):
        put("virtio_devices", f"hostile-{kind}-{tname}", hostile(bytes([kind, 3, t]), VERSION_1 | 1 << 28 | 1 << 29))

# e1000: arbitrary's encoding of an op list; byte strings of a few shapes
# (the leading bytes pick op kinds, the rest fill their fields).
for s in range(8):
    put("e1000", f"ops{s}", bytes(((s * 53 + k * (2 * s + 3)) ^ (k >> 3)) & 0xFF for k in range(64 + 96 * s)))
