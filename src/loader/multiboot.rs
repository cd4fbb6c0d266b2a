//! Multiboot (v1) kernels, loaded the way QEMU's `-kernel` does — from an
//! ELF file or through the header's address fields (the "a.out kludge") —
//! but with the boot information placed where nothing was loaded: modules
//! page-aligned above the kernel, then one block holding the information
//! structure, the module list, the memory map and every string.

use super::elf::{self, ElfImage};
use super::place::MemoryPlan;
use super::{FileRole, LoaderError, Module, Write, Writes};
use crate::layout;

/// The header's magic.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// EAX at entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header lies 4-byte aligned in the first 8 KiB.
pub const SEARCH_LEN: usize = 8192;

/// Header flags.
const FLAG_PAGE_ALIGN: u32 = 1 << 0;
const FLAG_MEMORY_INFO: u32 = 1 << 1;
const FLAG_VIDEO_MODE: u32 = 1 << 2;
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Flags 0–15 a loader must understand or refuse the kernel.
const FLAGS_UNDERSTOOD: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE;

/// Information-structure flags.
const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_BOOT_LOADER_NAME: u32 = 1 << 9;
/// The information structure's size (through the VBE fields).
const INFO_LEN: usize = 88;
const MODULE_ENTRY_LEN: usize = 16;
const MMAP_ENTRY_LEN: usize = 24;
const BOOT_LOADER_NAME: &str = "duet";
/// Modules and the information never go on page 0 (a null pointer to the
/// kernel).
const LOWEST_PLACEMENT: u64 = 0x1000;

fn u32_at(d: &[u8], o: usize) -> Option<u32> {
    d.get(o..o.checked_add(4)?)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The offset of a valid multiboot header (magic, flags, checksum) in the
/// first 8 KiB, 4-byte aligned.
pub fn find_header(data: &[u8]) -> Option<usize> {
    let end = data.len().min(SEARCH_LEN);
    (0..end.saturating_sub(11)).step_by(4).find(|&o| {
        let w = |k: usize| u32_at(data, o + 4 * k).unwrap_or(0);
        w(0) == HEADER_MAGIC && w(0).wrapping_add(w(1)).wrapping_add(w(2)) == 0
    })
}

/// The header's address fields (valid with flag 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AoutAddrs {
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

/// A checked multiboot header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub offset: usize,
    pub flags: u32,
    pub addrs: Option<AoutAddrs>,
}

/// Find and check the header.
pub fn parse_header(data: &[u8]) -> Result<Header, String> {
    let offset = find_header(data)
        .ok_or("no multiboot header (magic 0x1badb002 with a valid checksum) in the first 8 KiB")?;
    let flags = u32_at(data, offset + 4).unwrap_or(0);
    let unknown = flags & 0xffff & !FLAGS_UNDERSTOOD;
    if unknown != 0 {
        return Err(format!(
            "the multiboot header requires features duet does not provide (flags {unknown:#x} of {flags:#x})"
        ));
    }
    let addrs = if flags & FLAG_AOUT_KLUDGE != 0 {
        let f = |k: usize| {
            u32_at(data, offset + 12 + 4 * k).ok_or_else(|| {
                "the multiboot header's address fields run past the end of the file".to_string()
            })
        };
        Some(AoutAddrs {
            header_addr: f(0)?,
            load_addr: f(1)?,
            load_end_addr: f(2)?,
            bss_end_addr: f(3)?,
            entry_addr: f(4)?,
        })
    } else {
        None
    };
    Ok(Header {
        offset,
        flags,
        addrs,
    })
}

/// One piece of the kernel image: file bytes at `paddr`, then zeros up to
/// `memsz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub offset: usize,
    pub filesz: usize,
    pub paddr: u64,
    pub memsz: u64,
}

/// The kernel image's pieces and entry point, from the address fields or
/// the ELF program headers.
pub fn kernel_pieces(data: &[u8], h: &Header) -> Result<(Vec<Piece>, u64), String> {
    if let Some(a) = h.addrs {
        let delta = a
            .header_addr
            .checked_sub(a.load_addr)
            .ok_or("multiboot header_addr is below load_addr")?;
        let file_start = (h.offset as u64)
            .checked_sub(u64::from(delta))
            .ok_or("multiboot header_addr - load_addr puts the image start before the file")?;
        let len = if a.load_end_addr == 0 {
            data.len() as u64 - file_start
        } else {
            u64::from(
                a.load_end_addr
                    .checked_sub(a.load_addr)
                    .ok_or("multiboot load_end_addr is below load_addr")?,
            )
        };
        if file_start + len > data.len() as u64 {
            return Err(format!(
                "the multiboot header asks for {len} bytes from file offset {file_start:#x}, the \
                 file has {}; the file is truncated",
                data.len()
            ));
        }
        let load = u64::from(a.load_addr);
        let load_end = load + len;
        let memsz = if a.bss_end_addr == 0 {
            len
        } else {
            u64::from(a.bss_end_addr)
                .checked_sub(load)
                .filter(|&m| m >= len)
                .ok_or("multiboot bss_end_addr is below load_end_addr")?
        };
        let entry = u64::from(a.entry_addr);
        if entry < load || entry >= load + memsz.max(1) {
            return Err(format!(
                "the multiboot entry point {entry:#x} is outside the image ({load:#x}..{:#x})",
                load_end.max(load + memsz)
            ));
        }
        return Ok((
            vec![Piece {
                offset: file_start as usize,
                filesz: len as usize,
                paddr: load,
                memsz,
            }],
            entry,
        ));
    }
    if !elf::is_elf(data) {
        return Err(
            "the multiboot header has no address fields (flag 16) and the file is not ELF".into(),
        );
    }
    let img: ElfImage = elf::parse(data)?;
    let pieces: Vec<Piece> = img
        .segments
        .iter()
        .filter(|s| s.memsz > 0)
        .map(|s| Piece {
            offset: s.offset,
            filesz: s.filesz,
            paddr: s.paddr,
            memsz: s.memsz,
        })
        .collect();
    let entry = elf::physical_entry(&img);
    if !pieces
        .iter()
        .any(|p| entry >= p.paddr && entry - p.paddr < p.memsz)
    {
        return Err(format!(
            "the ELF entry point {entry:#x} is outside every loadable segment"
        ));
    }
    Ok((pieces, entry))
}

/// Plan a multiboot kernel with its modules. Returns the entry point and
/// the information structure's address.
pub(super) fn plan<'a>(
    plan: &mut MemoryPlan,
    writes: &mut Writes<'a>,
    kernel: &Module<'a>,
    modules: &[Module<'a>],
    cmdline: &str,
    e820: &[(u64, u64, u32)],
    ram_below_gap: u64,
) -> Result<(u64, u64), LoaderError> {
    let kerr = |r: String| LoaderError::file(FileRole::Kernel, kernel.name, r);
    let header = parse_header(kernel.data).map_err(kerr)?;
    let (pieces, entry) = kernel_pieces(kernel.data, &header).map_err(kerr)?;
    for (k, p) in pieces.iter().enumerate() {
        let what = if pieces.len() == 1 {
            "the kernel image".to_string()
        } else {
            format!("kernel segment {k}")
        };
        if p.paddr.saturating_add(p.memsz) > 1 << 32 {
            return Err(kerr(format!(
                "{what} at {:#x} (+{:#x}) lies above 4 GiB, out of a multiboot kernel's reach",
                p.paddr, p.memsz
            )));
        }
        plan.claim(p.paddr, p.memsz, what).map_err(kerr)?;
        writes.push(Write::Bytes(
            p.paddr,
            &kernel.data[p.offset..p.offset + p.filesz],
        ));
        writes.push(Write::Zeros(
            p.paddr + p.filesz as u64,
            p.memsz - p.filesz as u64,
        ));
    }

    // Modules: page-aligned, each above the previous, starting above the
    // kernel; anywhere free below 4 GiB when that fails.
    let limit = ram_below_gap.min(1 << 32);
    let mut placed = Vec::with_capacity(modules.len());
    let mut cursor = plan.highest_end();
    for m in modules {
        let len = m.data.len() as u64;
        let addr = plan
            .find_low(len, 4096, cursor, limit)
            .or_else(|| plan.find_low(len, 4096, LOWEST_PLACEMENT, limit))
            .ok_or_else(|| {
                LoaderError::file(
                    FileRole::Initrd,
                    m.name,
                    format!(
                        "no room for this {len}-byte module in guest RAM below {limit:#x} next to \
                         the kernel ({}); give a larger --memory",
                        describe_used(plan)
                    ),
                )
            })?;
        plan.claim(addr, len, format!("module {}", m.name))
            .map_err(|r| LoaderError::file(FileRole::Initrd, m.name, r))?;
        writes.push(Write::Bytes(addr, m.data));
        cursor = addr + len;
        placed.push((addr, len));
    }

    // The information block: structure, module list, memory map, strings.
    let kernel_cmdline = if cmdline.is_empty() {
        kernel.name.to_string()
    } else {
        format!("{} {cmdline}", kernel.name)
    };
    if kernel_cmdline.len() >= layout::boot::CMDLINE_MAX {
        return Err(LoaderError::Cmdline(format!(
            "{} bytes with the kernel's name, longer than the {} duet passes",
            kernel_cmdline.len(),
            layout::boot::CMDLINE_MAX
        )));
    }
    let strings_len: usize = kernel_cmdline.len()
        + 1
        + modules.iter().map(|m| m.cmdline.len() + 1).sum::<usize>()
        + BOOT_LOADER_NAME.len()
        + 1;
    let block_len =
        INFO_LEN + MODULE_ENTRY_LEN * modules.len() + MMAP_ENTRY_LEN * e820.len() + strings_len;
    let base = plan
        .find_low(block_len as u64, 4096, cursor, limit)
        .or_else(|| plan.find_low(block_len as u64, 4096, LOWEST_PLACEMENT, limit))
        .ok_or_else(|| {
            kerr(format!(
                "the kernel leaves no room for the multiboot information ({block_len} bytes) in \
                 guest RAM below {limit:#x} (in use: {}); give a larger --memory",
                describe_used(plan)
            ))
        })?;
    plan.claim(base, block_len as u64, "the multiboot information")
        .map_err(kerr)?;

    let mut b = vec![0u8; block_len];
    let put = |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let mods_at = INFO_LEN;
    let mmap_at = mods_at + MODULE_ENTRY_LEN * modules.len();
    let mut str_at = mmap_at + MMAP_ENTRY_LEN * e820.len();
    let mut add_str = |b: &mut Vec<u8>, s: &str| -> u32 {
        b[str_at..str_at + s.len()].copy_from_slice(s.as_bytes());
        let a = base as usize + str_at;
        str_at += s.len() + 1;
        a as u32
    };
    let cmd_addr = add_str(&mut b, &kernel_cmdline);
    let mut flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_BOOT_LOADER_NAME;
    for (k, (m, (addr, len))) in modules.iter().zip(&placed).enumerate() {
        let s = add_str(&mut b, m.cmdline);
        let e = mods_at + MODULE_ENTRY_LEN * k;
        put(&mut b, e, *addr as u32);
        put(&mut b, e + 4, (*addr + *len) as u32);
        put(&mut b, e + 8, s);
    }
    if !modules.is_empty() {
        flags |= INFO_MODS;
    }
    for (k, (addr, len, type_)) in e820.iter().enumerate() {
        let e = mmap_at + MMAP_ENTRY_LEN * k;
        put(&mut b, e, (MMAP_ENTRY_LEN - 4) as u32);
        b[e + 4..e + 12].copy_from_slice(&addr.to_le_bytes());
        b[e + 12..e + 20].copy_from_slice(&len.to_le_bytes());
        put(&mut b, e + 20, *type_);
    }
    let name_addr = add_str(&mut b, BOOT_LOADER_NAME);
    put(&mut b, 0, flags);
    put(&mut b, 4, (layout::boot::EBDA_START / 1024) as u32); // mem_lower
    put(
        &mut b,
        8,
        (ram_below_gap.saturating_sub(layout::HIGH_RAM_START) / 1024) as u32,
    ); // mem_upper
    put(&mut b, 16, cmd_addr);
    put(&mut b, 20, modules.len() as u32);
    put(&mut b, 24, (base as usize + mods_at) as u32);
    put(&mut b, 44, (MMAP_ENTRY_LEN * e820.len()) as u32);
    put(&mut b, 48, (base as usize + mmap_at) as u32);
    put(&mut b, 64, name_addr);
    writes.push(Write::Owned(base, b));
    Ok((entry, base))
}

fn describe_used(plan: &MemoryPlan) -> String {
    let v: Vec<String> = plan
        .regions()
        .iter()
        .map(|r| format!("{} {:#x}..{:#x}", r.what, r.start, r.end))
        .collect();
    v.join(", ")
}

/// The information-structure fields a test reads back.
pub mod info {
    pub const FLAGS: u64 = 0;
    pub const CMDLINE: u64 = 16;
    pub const MODS_COUNT: u64 = 20;
    pub const MODS_ADDR: u64 = 24;
    pub const MMAP_LENGTH: u64 = 44;
    pub const MMAP_ADDR: u64 = 48;
    pub const BOOT_LOADER_NAME: u64 = 64;
}

/// A multiboot header with the address fields (a.out kludge), for tests
/// and built-in images: 32 bytes.
pub fn aout_header(load: u32, load_end: u32, bss_end: u32, entry: u32, header_at: u32) -> [u8; 32] {
    let flags = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_AOUT_KLUDGE;
    let words = [
        HEADER_MAGIC,
        flags,
        0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags),
        header_at,
        load,
        load_end,
        bss_end,
        entry,
    ];
    let mut h = [0u8; 32];
    for (k, w) in words.iter().enumerate() {
        h[4 * k..4 * k + 4].copy_from_slice(&w.to_le_bytes());
    }
    h
}

/// A multiboot header without address fields (ELF kernels): 12 bytes.
pub fn elf_header() -> [u8; 12] {
    let flags = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO;
    let words = [
        HEADER_MAGIC,
        flags,
        0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags),
    ];
    let mut h = [0u8; 12];
    for (k, w) in words.iter().enumerate() {
        h[4 * k..4 * k + 4].copy_from_slice(&w.to_le_bytes());
    }
    h
}
