//! Kernel loaders: a Linux bzImage through the x86 boot protocol, an ELF
//! vmlinux through its PVH entry note, and a multiboot (v1) kernel the way
//! QEMU's `-kernel` loads one. Each writes the kernel, its command line,
//! initrd and boot information into guest memory and returns the vCPU state
//! to start from (32-bit protected mode, paging off, flat segments).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self as ll, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use cpu_interp::state::{CpuState, DescriptorTable, Segment};

use crate::backend::GuestMemory;
use crate::layout::{self, boot};

/// What to boot.
#[derive(Clone, Debug, Default)]
pub struct KernelSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// Loader failures: each names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a kernel duet can boot: {reason}")]
    BadImage { path: String, reason: String },
    #[error("{path}: {reason}")]
    Load { path: String, reason: String },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge { path: String, size: u64, limit: u64 },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("writing boot information into guest memory failed: {0}")]
    Memory(String),
}

/// Which format a kernel file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    ElfPvh,
    Multiboot,
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoaderError + '_ {
    move |source| LoaderError::Read {
        path: path.display().to_string(),
        source,
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> LoaderError {
    LoaderError::BadImage {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn mem_err(e: impl std::fmt::Display) -> LoaderError {
    LoaderError::Memory(e.to_string())
}

/// Find the multiboot v1 header: magic, flags, checksum at a 4-byte
/// aligned offset within the first 8 KiB.
fn find_multiboot(head: &[u8]) -> Option<usize> {
    let word = |o: usize| u32::from_le_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
    (0..head.len().min(8192).saturating_sub(11))
        .step_by(4)
        .find(|&o| {
            word(o) == 0x1bad_b002
                && word(o).wrapping_add(word(o + 4)).wrapping_add(word(o + 8)) == 0
        })
}

/// Identify a kernel file from its first bytes.
pub fn detect(path: &Path) -> Result<KernelFormat, LoaderError> {
    let mut head = vec![0u8; 8192];
    let mut f = File::open(path).map_err(read_err(path))?;
    let n = read_up_to(&mut f, &mut head).map_err(read_err(path))?;
    head.truncate(n);
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::ElfPvh);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    if find_multiboot(&head).is_some() {
        return Ok(KernelFormat::Multiboot);
    }
    Err(bad(
        path,
        "not an ELF file, a Linux bzImage (no 'HdrS' signature at 0x202) or a multiboot kernel (no multiboot header in the first 8 KiB)",
    ))
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Load `spec` into `mem` and return the boot vCPU state.
pub fn load(mem: &GuestMemory, spec: &KernelSpec) -> Result<CpuState, LoaderError> {
    match detect(&spec.kernel)? {
        KernelFormat::BzImage => load_bzimage(mem, spec),
        KernelFormat::ElfPvh => load_pvh(mem, spec),
        KernelFormat::Multiboot => load_multiboot(mem, spec),
    }
}

/// The size of RAM below the 32-bit MMIO gap.
fn ram_below_gap(mem: &GuestMemory) -> u64 {
    mem.iter()
        .map(|r| {
            use vm_memory::GuestMemoryRegion;
            (r.start_addr().0, r.len())
        })
        .filter(|(s, _)| *s < layout::MMIO_GAP_START)
        .map(|(s, l)| (s + l).min(layout::MMIO_GAP_START))
        .max()
        .unwrap_or(0)
}

fn total_ram(mem: &GuestMemory) -> u64 {
    use vm_memory::GuestMemoryRegion;
    mem.iter().map(|r| r.len()).sum()
}

/// The e820 map handed to the guest.
pub fn e820_map(mem: &GuestMemory) -> Vec<(u64, u64, u32)> {
    const RAM: u32 = 1;
    const RESERVED: u32 = 2;
    let mut v: Vec<(u64, u64, u32)> = layout::usable_ram(total_ram(mem))
        .into_iter()
        .map(|(s, l)| (s, l, RAM))
        .collect();
    // Firmware area where the ACPI tables and the MP table live.
    v.push((
        boot::EBDA_START,
        layout::LOW_RAM_END - boot::EBDA_START,
        RESERVED,
    ));
    v.push((
        boot::BIOS_START,
        layout::HIGH_RAM_START - boot::BIOS_START,
        RESERVED,
    ));
    // PCI ECAM, so that the OS trusts the MCFG table.
    v.push((layout::pci::ECAM_BASE, layout::pci::ECAM_SIZE, RESERVED));
    // The usable low range stops at the EBDA.
    if let Some(first) = v.first_mut() {
        first.1 = first.1.min(boot::EBDA_START);
    }
    v.sort_by_key(|e| e.0);
    v
}

/// Place the initrd at the top of RAM below `limit`, page aligned.
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    limit: u64,
    kernel_end: u64,
) -> Result<(u64, u64), LoaderError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(read_err(path))?;
    let size = data.len() as u64;
    let top = ram_below_gap(mem).min(limit.saturating_add(1));
    let addr = top.saturating_sub(size) & !0xfff;
    if addr < kernel_end.max(layout::HIGH_RAM_START) {
        return Err(LoaderError::InitrdTooLarge {
            path: path.display().to_string(),
            size,
            limit: top,
        });
    }
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(mem_err)?;
    Ok((addr, size))
}

fn write_cmdline(mem: &GuestMemory, cmdline: &str, max: usize) -> Result<(), LoaderError> {
    let mut c = Cmdline::new(max).map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    if !cmdline.is_empty() {
        c.insert_str(cmdline).map_err(|e| {
            LoaderError::Cmdline(format!("{e} ({} bytes, at most {max})", cmdline.len()))
        })?;
    }
    ll::load_cmdline(mem, GuestAddress(boot::CMDLINE), &c)
        .map_err(|e| LoaderError::Cmdline(e.to_string()))
}

/// The GDT boot protocols expect: 0x10 flat 32-bit code, 0x18 flat data.
fn write_boot_gdt(mem: &GuestMemory) -> Result<(), LoaderError> {
    let gdt: [u64; 4] = [0, 0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (k, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(boot::GDT + 8 * k as u64))
            .map_err(mem_err)?;
    }
    Ok(())
}

/// 32-bit flat protected mode, paging off, as the boot protocols require.
fn protected_mode_entry(entry: u64) -> CpuState {
    let mut s = CpuState::reset();
    let code = Segment {
        selector: 0x10,
        base: 0,
        limit: 0xffff_ffff,
        type_: 0xb,
        s: true,
        dpl: 0,
        present: true,
        db: true,
        g: true,
        ..Default::default()
    };
    let data = Segment {
        selector: 0x18,
        type_: 0x3,
        ..code
    };
    s.sregs.cs = code;
    (s.sregs.ds, s.sregs.es, s.sregs.ss, s.sregs.fs, s.sregs.gs) = (data, data, data, data, data);
    s.sregs.gdt = DescriptorTable {
        base: boot::GDT,
        limit: 4 * 8 - 1,
    };
    s.sregs.idt = DescriptorTable { base: 0, limit: 0 };
    s.sregs.cr0 = 0x11; // PE | ET
    s.regs.rip = entry;
    s.regs.rflags = 0x2;
    s
}

fn load_bzimage(mem: &GuestMemory, spec: &KernelSpec) -> Result<CpuState, LoaderError> {
    let path = &spec.kernel;
    let mut f = File::open(path).map_err(read_err(path))?;
    let res = ll::bzimage::BzImage::load(
        mem,
        None,
        &mut f,
        Some(GuestAddress(layout::HIGH_RAM_START)),
    )
    .map_err(|e| bad(path, format!("bzImage: {e}")))?;
    let mut hdr = res
        .setup_header
        .ok_or_else(|| bad(path, "bzImage without a setup header"))?;
    if hdr.version < 0x0206 {
        return Err(bad(
            path,
            format!(
                "boot protocol {}.{} is too old (2.06 or later needed)",
                hdr.version >> 8,
                hdr.version & 0xff
            ),
        ));
    }
    let max_cmdline = (hdr.cmdline_size as usize).clamp(256, boot::CMDLINE_MAX);
    write_cmdline(mem, &spec.cmdline, max_cmdline)?;
    hdr.type_of_loader = 0xff;
    hdr.cmd_line_ptr = boot::CMDLINE as u32;
    hdr.loadflags |= 0x80; // CAN_USE_HEAP
    hdr.heap_end_ptr = (boot::ZERO_PAGE - 0x200) as u16;
    let kernel_end = res.kernel_load.0 + res.kernel_end;
    if let Some(initrd) = &spec.initrd {
        let (addr, size) = load_initrd(mem, initrd, u64::from(hdr.initrd_addr_max), kernel_end)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: boot::RSDP,
        ..Default::default()
    };
    let map = e820_map(mem);
    for (k, (addr, size, type_)) in map.iter().enumerate().take(params.e820_table.len()) {
        params.e820_table[k] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(boot::ZERO_PAGE))
        .map_err(mem_err)?;
    write_boot_gdt(mem)?;
    let entry = u64::from(params.hdr.code32_start).max(res.kernel_load.0);
    let mut s = protected_mode_entry(entry);
    s.regs.gpr[cpu_interp::state::gpr::RSI] = boot::ZERO_PAGE;
    Ok(s)
}

fn load_pvh(mem: &GuestMemory, spec: &KernelSpec) -> Result<CpuState, LoaderError> {
    let path = &spec.kernel;
    let mut f = File::open(path).map_err(read_err(path))?;
    let res = ll::elf::Elf::load(
        mem,
        None,
        &mut f,
        Some(GuestAddress(layout::HIGH_RAM_START)),
    )
    .map_err(|e| bad(path, format!("ELF: {e}")))?;
    let entry = match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => a.0,
        _ => {
            return Err(bad(
                path,
                "ELF kernel without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); boot its bzImage instead",
            ))
        }
    };
    write_cmdline(mem, &spec.cmdline, boot::CMDLINE_MAX)?;
    let kernel_end = res.kernel_load.0 + res.kernel_end;
    let mut info = hvm_start_info {
        magic: 0x336e_c578,
        version: 1,
        cmdline_paddr: boot::CMDLINE,
        rsdp_paddr: boot::RSDP,
        ..Default::default()
    };
    if let Some(initrd) = &spec.initrd {
        let (addr, size) = load_initrd(mem, initrd, 0xffff_ffff, kernel_end)?;
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(boot::PVH_MODLIST))
            .map_err(mem_err)?;
        info.nr_modules = 1;
        info.modlist_paddr = boot::PVH_MODLIST;
    }
    let map = e820_map(mem);
    for (k, (addr, size, type_)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        };
        mem.write_obj(e, GuestAddress(boot::PVH_MEMMAP + 24 * k as u64))
            .map_err(mem_err)?;
    }
    info.memmap_paddr = boot::PVH_MEMMAP;
    info.memmap_entries = map.len() as u32;
    mem.write_obj(info, GuestAddress(boot::PVH_START_INFO))
        .map_err(mem_err)?;
    write_boot_gdt(mem)?;
    let mut s = protected_mode_entry(entry);
    s.regs.gpr[cpu_interp::state::gpr::RBX] = boot::PVH_START_INFO;
    Ok(s)
}

// ---- multiboot v1 ---------------------------------------------------------

const MB_INFO_MEMORY: u32 = 1 << 0;
const MB_INFO_CMDLINE: u32 = 1 << 2;
const MB_INFO_MODS: u32 = 1 << 3;
const MB_INFO_MMAP: u32 = 1 << 6;

fn load_multiboot(mem: &GuestMemory, spec: &KernelSpec) -> Result<CpuState, LoaderError> {
    let path = &spec.kernel;
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(read_err(path))?;
    let off = find_multiboot(&data).ok_or_else(|| bad(path, "no multiboot header"))?;
    let word = |o: usize| -> Option<u32> {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let flags = word(off + 4).unwrap_or(0);
    if flags & 0xffff & !0x7 != 0 {
        return Err(bad(
            path,
            format!("multiboot header requests unsupported features (flags {flags:#x})"),
        ));
    }
    let (entry, kernel_end) = if flags & (1 << 16) != 0 {
        // a.out kludge: addresses from the header.
        let f = |k: usize| {
            word(off + 12 + 4 * k).ok_or_else(|| bad(path, "truncated multiboot header"))
        };
        let (header_addr, load_addr, load_end, bss_end, entry) =
            (f(0)?, f(1)?, f(2)?, f(3)?, f(4)?);
        if header_addr < load_addr || (header_addr - load_addr) as usize > off {
            return Err(bad(
                path,
                "multiboot header_addr is below load_addr or outside the file",
            ));
        }
        let file_start = off - (header_addr - load_addr) as usize;
        let len = if load_end == 0 {
            data.len() - file_start
        } else {
            load_end
                .checked_sub(load_addr)
                .ok_or_else(|| bad(path, "load_end_addr below load_addr"))? as usize
        };
        let bytes = data
            .get(file_start..file_start + len)
            .ok_or_else(|| bad(path, "multiboot load range runs past the end of the file"))?;
        mem.write_slice(bytes, GuestAddress(u64::from(load_addr)))
            .map_err(|e| LoaderError::Load {
                path: path.display().to_string(),
                reason: format!("kernel does not fit in guest memory at {load_addr:#x}: {e}"),
            })?;
        let end = u64::from(load_addr) + len as u64;
        let bss_end = u64::from(bss_end);
        if bss_end > end {
            let zeros = vec![0u8; (bss_end - end) as usize];
            mem.write_slice(&zeros, GuestAddress(end))
                .map_err(mem_err)?;
        }
        (u64::from(entry), end.max(bss_end))
    } else {
        load_elf32(mem, path, &data)?
    };
    // Multiboot information structure.
    let cmd = format!("{} {}", path.display(), spec.cmdline);
    let mut cmd_bytes = cmd.into_bytes();
    cmd_bytes.push(0);
    if cmd_bytes.len() > boot::CMDLINE_MAX {
        return Err(LoaderError::Cmdline(format!(
            "longer than {} bytes",
            boot::CMDLINE_MAX
        )));
    }
    mem.write_slice(&cmd_bytes, GuestAddress(boot::CMDLINE))
        .map_err(mem_err)?;
    let mut info = [0u32; 22];
    info[0] = MB_INFO_MEMORY | MB_INFO_CMDLINE | MB_INFO_MMAP;
    let below = ram_below_gap(mem);
    info[1] = (boot::EBDA_START / 1024) as u32; // mem_lower
    info[2] = ((below - layout::HIGH_RAM_START) / 1024) as u32; // mem_upper
    info[4] = boot::CMDLINE as u32;
    if let Some(initrd) = &spec.initrd {
        let (addr, size) = load_initrd(mem, initrd, 0xffff_ffff, kernel_end)?;
        let name = format!("{}\0", initrd.display());
        let name_addr = boot::CMDLINE + cmd_bytes.len() as u64;
        mem.write_slice(name.as_bytes(), GuestAddress(name_addr))
            .map_err(mem_err)?;
        let module = [addr as u32, (addr + size) as u32, name_addr as u32, 0];
        for (k, w) in module.iter().enumerate() {
            mem.write_obj(*w, GuestAddress(boot::MULTIBOOT_MODS + 4 * k as u64))
                .map_err(mem_err)?;
        }
        info[0] |= MB_INFO_MODS;
        info[5] = 1;
        info[6] = boot::MULTIBOOT_MODS as u32;
    }
    let map = e820_map(mem);
    for (k, (addr, len, type_)) in map.iter().enumerate() {
        let a = boot::MULTIBOOT_MMAP + 24 * k as u64;
        mem.write_obj(20u32, GuestAddress(a)).map_err(mem_err)?;
        mem.write_obj(*addr, GuestAddress(a + 4)).map_err(mem_err)?;
        mem.write_obj(*len, GuestAddress(a + 12)).map_err(mem_err)?;
        mem.write_obj(*type_, GuestAddress(a + 20))
            .map_err(mem_err)?;
    }
    info[11] = 24 * map.len() as u32;
    info[12] = boot::MULTIBOOT_MMAP as u32;
    for (k, w) in info.iter().enumerate() {
        mem.write_obj(*w, GuestAddress(boot::MULTIBOOT_INFO + 4 * k as u64))
            .map_err(mem_err)?;
    }
    write_boot_gdt(mem)?;
    let mut s = protected_mode_entry(entry);
    s.regs.gpr[cpu_interp::state::gpr::RAX] = 0x2bad_b002;
    s.regs.gpr[cpu_interp::state::gpr::RBX] = boot::MULTIBOOT_INFO;
    Ok(s)
}

/// Load the PT_LOAD segments of a 32-bit ELF multiboot kernel.
fn load_elf32(mem: &GuestMemory, path: &Path, data: &[u8]) -> Result<(u64, u64), LoaderError> {
    let err = |r: &str| bad(path, format!("multiboot ELF: {r}"));
    if data.len() < 52 || data[..4] != *b"\x7fELF" || data[4] != 1 || data[5] != 1 {
        return Err(err(
            "not a little-endian 32-bit ELF file (use the a.out kludge or ELF32)",
        ));
    }
    let h16 = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]);
    let h32 = |o: usize| -> Option<u32> {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let entry = u64::from(h32(24).ok_or_else(|| err("truncated header"))?);
    let phoff = h32(28).ok_or_else(|| err("truncated header"))? as usize;
    let phentsize = h16(42) as usize;
    let phnum = h16(44) as usize;
    let mut end = 0u64;
    for k in 0..phnum {
        let ph = phoff + k * phentsize;
        let field = |i: usize| {
            h32(ph + 4 * i).ok_or_else(|| err("program header past the end of the file"))
        };
        if field(0)? != 1 {
            continue; // not PT_LOAD
        }
        let (offset, paddr, filesz, memsz) = (
            field(1)? as usize,
            u64::from(field(3)?),
            field(4)? as usize,
            u64::from(field(5)?),
        );
        let bytes = data
            .get(offset..offset + filesz)
            .ok_or_else(|| err("segment past the end of the file"))?;
        mem.write_slice(bytes, GuestAddress(paddr))
            .map_err(|e| LoaderError::Load {
                path: path.display().to_string(),
                reason: format!("segment at {paddr:#x} does not fit in guest memory: {e}"),
            })?;
        if memsz > filesz as u64 {
            let zeros = vec![0u8; (memsz - filesz as u64) as usize];
            mem.write_slice(&zeros, GuestAddress(paddr + filesz as u64))
                .map_err(mem_err)?;
        }
        end = end.max(paddr + memsz);
    }
    if end == 0 {
        return Err(err("no loadable segment"));
    }
    Ok((entry, end))
}

/// Read at most `n` bytes at `off` of a file (for tests and diagnostics).
pub fn peek(path: &Path, off: u64, n: usize) -> Result<Vec<u8>, LoaderError> {
    let mut f = File::open(path).map_err(read_err(path))?;
    f.seek(SeekFrom::Start(off)).map_err(read_err(path))?;
    let mut buf = vec![0u8; n];
    let k = read_up_to(&mut f, &mut buf).map_err(read_err(path))?;
    buf.truncate(k);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("duet-loader-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let p = temp("garbage", b"hello, this is not a kernel");
        let e = detect(&p).unwrap_err().to_string();
        assert!(e.contains("is not a kernel duet can boot"), "{e}");
        assert!(e.contains(&p.display().to_string()), "{e}");
        let e = detect(Path::new("/nonexistent/kernel"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read /nonexistent/kernel"), "{e}");
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn truncated_bzimage_is_rejected() {
        let mut b = vec![0u8; 0x300];
        b[0x202..0x206].copy_from_slice(b"HdrS");
        let p = temp("bz", &b);
        assert_eq!(detect(&p).unwrap(), KernelFormat::BzImage);
        let mem = crate::machine::create_memory(64 << 20).unwrap();
        let spec = KernelSpec {
            kernel: p.clone(),
            ..Default::default()
        };
        let e = load(&mem, &spec).unwrap_err().to_string();
        assert!(e.contains("bzImage"), "{e}");
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn multiboot_aout_kludge_loads_and_sets_registers() {
        let img = crate::bench::image(crate::bench::Workload::Alu, 10).unwrap();
        let p = temp("mb", &img);
        assert_eq!(detect(&p).unwrap(), KernelFormat::Multiboot);
        let mem = crate::machine::create_memory(64 << 20).unwrap();
        let initrd = temp("mb-initrd", b"module contents");
        let spec = KernelSpec {
            kernel: p.clone(),
            initrd: Some(initrd.clone()),
            cmdline: "hello=world".into(),
        };
        let s = load(&mem, &spec).unwrap();
        assert_eq!(s.regs.gpr[0], 0x2bad_b002);
        assert_eq!(s.regs.gpr[3], boot::MULTIBOOT_INFO);
        assert_eq!(s.regs.rip, crate::bench::LOAD_ADDR + 40);
        let mut back = vec![0u8; img.len()];
        mem.read_slice(&mut back, GuestAddress(crate::bench::LOAD_ADDR))
            .unwrap();
        assert_eq!(back, img);
        let flags: u32 = mem.read_obj(GuestAddress(boot::MULTIBOOT_INFO)).unwrap();
        assert_eq!(
            flags & (MB_INFO_MODS | MB_INFO_MMAP | MB_INFO_CMDLINE),
            MB_INFO_MODS | MB_INFO_MMAP | MB_INFO_CMDLINE
        );
        let mod_start: u32 = mem.read_obj(GuestAddress(boot::MULTIBOOT_MODS)).unwrap();
        let mut m = [0u8; 15];
        mem.read_slice(&mut m, GuestAddress(u64::from(mod_start)))
            .unwrap();
        assert_eq!(&m, b"module contents");
        std::fs::remove_file(p).ok();
        std::fs::remove_file(initrd).ok();
    }

    #[test]
    fn e820_excludes_holes() {
        let mem = crate::machine::create_memory(64 << 20).unwrap();
        let map = e820_map(&mem);
        let ram: Vec<_> = map.iter().filter(|e| e.2 == 1).collect();
        assert_eq!(ram[0].0, 0);
        assert!(ram[0].0 + ram[0].1 <= boot::EBDA_START);
        assert_eq!(ram[1].0, layout::HIGH_RAM_START);
        assert_eq!(ram[1].0 + ram[1].1, 64 << 20);
    }
}
