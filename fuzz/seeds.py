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

# e1000: arbitrary's encoding of an op list; byte strings of a few shapes
# (the leading bytes pick op kinds, the rest fill their fields).
for s in range(8):
    put("e1000", f"ops{s}", bytes(((s * 53 + k * (2 * s + 3)) ^ (k >> 3)) & 0xFF for k in range(64 + 96 * s)))
