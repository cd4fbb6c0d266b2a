//! Kernel loaders: a Linux bzImage through the x86 boot protocol, an ELF
//! vmlinux through its PVH entry note, and a multiboot (v1) kernel — ELF or
//! with the header's address fields — the way QEMU's `-kernel` loads one.
//! Each returns the vCPU state to start from (32-bit protected mode, paging
//! off, flat segments).
//!
//! Every load happens in two steps. First the files are read (each bounded
//! by the guest's RAM before anything is allocated for it) and checked —
//! headers, sizes and every address, with checked arithmetic — and a plan
//! is built: each piece is claimed in a [`place::MemoryPlan`], which refuses
//! anything outside RAM or overlapping something already placed. Only a
//! complete plan is written into guest memory, so a bad file never leaves
//! half a kernel behind.
//!
//! The byte-level entry points [`detect_bytes`] and [`load_bytes`] take the
//! files' contents, not paths: fuzz targets call them with arbitrary bytes.

pub mod bzimage;
pub mod elf;
pub mod multiboot;
pub mod place;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use cpu_interp::state::{CpuState, DescriptorTable, Segment};

use crate::backend::GuestMemory;
use crate::layout::{self, boot};
use place::MemoryPlan;

/// What to boot.
#[derive(Clone, Debug, Default)]
pub struct KernelSpec {
    pub kernel: PathBuf,
    /// The `--initrd` items (see [`split_initrd_list`]): initramfs files
    /// for Linux (concatenated), modules with their command lines
    /// (`"path args"`) for multiboot kernels.
    pub initrd: Vec<String>,
    pub cmdline: String,
}

/// Split an `--initrd` value in QEMU's form: items separated by commas, a
/// doubled comma standing for a comma inside an item. Empty items are
/// dropped.
pub fn split_initrd_list(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items.retain(|i| !i.trim().is_empty());
    items
}

/// Which input a file error is about, named as its command-line flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileRole {
    Kernel,
    Initrd,
}

impl fmt::Display for FileRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileRole::Kernel => "--kernel",
            FileRole::Initrd => "--initrd",
        })
    }
}

/// Loader failures: each names the input at fault (as its flag), the file,
/// and what is wrong or what would fix it.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("{role} {path}: {reason}")]
    File {
        role: FileRole,
        path: String,
        reason: String,
    },
    #[error("--cmdline: {0}")]
    Cmdline(String),
    #[error("writing the kernel into guest memory failed: {0}")]
    Memory(String),
}

impl LoaderError {
    fn file(role: FileRole, path: &str, reason: impl Into<String>) -> Self {
        LoaderError::File {
            role,
            path: path.to_string(),
            reason: reason.into(),
        }
    }
}

/// Which format a kernel file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    ElfPvh,
    Multiboot,
}

/// Identify a kernel from its contents.
pub fn detect_bytes(data: &[u8]) -> Result<KernelFormat, String> {
    if elf::is_elf(data) {
        let img = elf::parse(data);
        if img.as_ref().is_ok_and(|i| i.pvh_entry.is_some()) {
            return Ok(KernelFormat::ElfPvh);
        }
        if multiboot::find_header(data).is_some() {
            return Ok(KernelFormat::Multiboot);
        }
        img?;
        return Err(
            "an ELF kernel without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) or a multiboot \
             header; boot its bzImage, or build it with CONFIG_PVH=y"
                .into(),
        );
    }
    if bzimage::has_signature(data) {
        return Ok(KernelFormat::BzImage);
    }
    if multiboot::find_header(data).is_some() {
        return Ok(KernelFormat::Multiboot);
    }
    Err(
        "not a kernel duet can boot: not an ELF file, a Linux bzImage (no 'HdrS' signature at \
         0x202) or a multiboot kernel (no multiboot header in the first 8 KiB)"
            .into(),
    )
}

/// Identify a kernel file.
pub fn detect(path: &Path) -> Result<KernelFormat, LoaderError> {
    let data = read_file(FileRole::Kernel, path, u64::MAX)?;
    detect_bytes(&data).map_err(|r| LoaderError::file(FileRole::Kernel, &path_str(path), r))
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// What an I/O error means to the user, with the fix when there is one.
fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound => "no such file (check the path)".into(),
        ErrorKind::PermissionDenied => {
            "permission denied (make the file readable for this user)".into()
        }
        ErrorKind::IsADirectory => "is a directory, not a file".into(),
        _ => e.to_string(),
    }
}

/// Read a whole file, refusing files larger than `limit` bytes before
/// reading them.
fn read_file(role: FileRole, path: &Path, limit: u64) -> Result<Vec<u8>, LoaderError> {
    let name = path_str(path);
    let err = |r: String| LoaderError::file(role, &name, r);
    let f = std::fs::File::open(path).map_err(|e| err(io_reason(&e)))?;
    let meta = f.metadata().map_err(|e| err(io_reason(&e)))?;
    if meta.is_dir() {
        return Err(err("is a directory, not a file".into()));
    }
    if meta.len() > limit {
        return Err(err(format!(
            "the file is {} bytes, more than the {limit} bytes it could occupy in guest RAM below \
             4 GiB; give a larger --memory",
            meta.len()
        )));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    f.take(limit.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|e| err(io_reason(&e)))?;
    if data.len() as u64 > limit {
        return Err(err(format!(
            "the file grew past the guest's {limit} bytes of RAM below 4 GiB while being read"
        )));
    }
    Ok(data)
}

/// A kernel or a module, by contents.
#[derive(Clone, Copy, Debug)]
pub struct Module<'a> {
    /// Its name for messages (the path as given).
    pub name: &'a str,
    pub data: &'a [u8],
    /// The command line a multiboot kernel sees for it (QEMU: the whole
    /// `--initrd` item, path included).
    pub cmdline: &'a str,
}

/// The largest kernel file read when guest RAM is smaller (ELF files may
/// carry symbols and debug information they do not load).
pub const KERNEL_FILE_MAX: u64 = layout::GIB;

/// Load `spec` into `mem` and return the boot vCPU state.
pub fn load(mem: &GuestMemory, spec: &KernelSpec) -> Result<CpuState, LoaderError> {
    let limit = ram_below_gap(mem);
    let kernel_name = path_str(&spec.kernel);
    // A kernel file may carry symbols beyond what it loads.
    let kernel = read_file(FileRole::Kernel, &spec.kernel, limit.max(KERNEL_FILE_MAX))?;
    let format =
        detect_bytes(&kernel).map_err(|r| LoaderError::file(FileRole::Kernel, &kernel_name, r))?;
    // A multiboot module item is "path args"; for Linux the item is a path.
    let paths: Vec<(&str, &str)> = spec
        .initrd
        .iter()
        .map(|item| match format {
            KernelFormat::Multiboot => {
                let path = item.trim_start().split(' ').next().unwrap_or("");
                (path, item.as_str())
            }
            _ => (item.as_str(), item.as_str()),
        })
        .collect();
    let mut contents = Vec::with_capacity(paths.len());
    let mut total = 0u64;
    for (path, _) in &paths {
        let data = read_file(FileRole::Initrd, Path::new(path), limit - total.min(limit))?;
        total += data.len() as u64;
        contents.push(data);
    }
    let modules: Vec<Module> = paths
        .iter()
        .zip(&contents)
        .map(|((path, cmdline), data)| Module {
            name: path,
            data,
            cmdline,
        })
        .collect();
    let k = Module {
        name: &kernel_name,
        data: &kernel,
        cmdline: "",
    };
    load_bytes(mem, &k, &modules, &spec.cmdline)
}

/// One write of the plan.
enum Write<'a> {
    Bytes(u64, &'a [u8]),
    Owned(u64, Vec<u8>),
    Zeros(u64, u64),
}

type Writes<'a> = Vec<Write<'a>>;

fn apply(mem: &GuestMemory, writes: Writes) -> Result<(), LoaderError> {
    static ZEROS: [u8; 4096] = [0; 4096];
    let merr = |e: vm_memory::GuestMemoryError| LoaderError::Memory(e.to_string());
    for w in writes {
        match w {
            Write::Bytes(a, b) => mem.write_slice(b, GuestAddress(a)).map_err(merr)?,
            Write::Owned(a, b) => mem.write_slice(&b, GuestAddress(a)).map_err(merr)?,
            Write::Zeros(a, n) => {
                let mut done = 0u64;
                while done < n {
                    let k = (n - done).min(ZEROS.len() as u64);
                    mem.write_slice(&ZEROS[..k as usize], GuestAddress(a + done))
                        .map_err(merr)?;
                    done += k;
                }
            }
        }
    }
    Ok(())
}

/// Load a kernel and its modules given by contents: check everything,
/// plan where each piece goes, then write. Nothing is written when any
/// check fails.
pub fn load_bytes(
    mem: &GuestMemory,
    kernel: &Module,
    modules: &[Module],
    cmdline: &str,
) -> Result<CpuState, LoaderError> {
    let format = detect_bytes(kernel.data)
        .map_err(|r| LoaderError::file(FileRole::Kernel, kernel.name, r))?;
    if cmdline.contains('\0') {
        return Err(LoaderError::Cmdline(
            "contains a NUL byte, which would end it early".into(),
        ));
    }
    let below = ram_below_gap(mem);
    let e820 = e820_map(mem);
    let mut plan = MemoryPlan::new(below);
    let mut writes: Writes = vec![Write::Owned(boot::GDT, boot_gdt_bytes())];
    let state = match format {
        KernelFormat::BzImage => plan_bzimage(
            &mut plan,
            &mut writes,
            kernel,
            modules,
            cmdline,
            &e820,
            below,
        )?,
        KernelFormat::ElfPvh => plan_pvh(
            &mut plan,
            &mut writes,
            kernel,
            modules,
            cmdline,
            &e820,
            below,
        )?,
        KernelFormat::Multiboot => {
            let (entry, info) = multiboot::plan(
                &mut plan,
                &mut writes,
                kernel,
                modules,
                cmdline,
                &e820,
                below,
            )?;
            let mut s = protected_mode_entry(entry);
            s.regs.gpr[cpu_interp::state::gpr::RAX] = u64::from(multiboot::BOOTLOADER_MAGIC);
            s.regs.gpr[cpu_interp::state::gpr::RBX] = info;
            s
        }
    };
    apply(mem, writes)?;
    Ok(state)
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

/// Plan Linux initramfs files: concatenated (each padded to 4 bytes, as
/// cpio archives may be), page-aligned, as high as possible below `limit`
/// and never below 1 MiB. The boot protocol leaves low memory to the
/// firmware and the real-mode code ("leave as much as possible unused");
/// QEMU and GRUB too put the initrd high or refuse it. An initrd that does
/// not fit between the kernel (with its `init_size` decompression space)
/// and `limit` is refused rather than slipped under 640 KiB.
fn plan_initrd<'a>(
    plan: &mut MemoryPlan,
    writes: &mut Writes<'a>,
    modules: &[Module<'a>],
    limit: u64,
) -> Result<Option<(u64, u64)>, LoaderError> {
    if modules.is_empty() {
        return Ok(None);
    }
    let names: Vec<&str> = modules.iter().map(|m| m.name).collect();
    let name = names.join(",");
    let mut total = 0u64;
    for (k, m) in modules.iter().enumerate() {
        if k > 0 {
            total = place::align_up(total, 4).unwrap_or(u64::MAX);
        }
        total = total.saturating_add(m.data.len() as u64);
    }
    let addr = plan
        .find_high(total, 4096, layout::HIGH_RAM_START, limit)
        .ok_or_else(|| {
            LoaderError::file(
                FileRole::Initrd,
                &name,
                format!(
                    "{total} bytes do not fit in guest RAM between 1 MiB and {limit:#x} next to \
                     the kernel; give a larger --memory"
                ),
            )
        })?;
    plan.claim(addr, total, "the initrd")
        .map_err(|r| LoaderError::file(FileRole::Initrd, &name, r))?;
    let mut at = addr;
    for (k, m) in modules.iter().enumerate() {
        if k > 0 {
            let aligned = place::align_up(at, 4).unwrap_or(at);
            writes.push(Write::Zeros(at, aligned - at));
            at = aligned;
        }
        writes.push(Write::Bytes(at, m.data));
        at += m.data.len() as u64;
    }
    Ok(Some((addr, total)))
}

/// Plan the command line at [`boot::CMDLINE`] (NUL-terminated, at most
/// `max` bytes before the NUL).
fn plan_cmdline(
    plan: &mut MemoryPlan,
    writes: &mut Writes,
    cmdline: &str,
    max: usize,
) -> Result<(), LoaderError> {
    if cmdline.len() > max {
        return Err(LoaderError::Cmdline(format!(
            "{} bytes, longer than the {max} this kernel accepts; shorten it",
            cmdline.len()
        )));
    }
    let mut b = cmdline.as_bytes().to_vec();
    b.push(0);
    plan.claim(boot::CMDLINE, b.len() as u64, "the kernel command line")
        .map_err(LoaderError::Cmdline)?;
    writes.push(Write::Owned(boot::CMDLINE, b));
    Ok(())
}

fn plan_bzimage<'a>(
    plan: &mut MemoryPlan,
    writes: &mut Writes<'a>,
    kernel: &Module<'a>,
    modules: &[Module<'a>],
    cmdline: &str,
    e820: &[(u64, u64, u32)],
    below: u64,
) -> Result<CpuState, LoaderError> {
    let kerr = |r: String| LoaderError::file(FileRole::Kernel, kernel.name, r);
    let bz = bzimage::parse(kernel.data).map_err(kerr)?;
    let mut hdr = bz.hdr;
    let load = layout::HIGH_RAM_START;
    plan.claim(boot::ZERO_PAGE, 4096, "the zero page (boot_params)")
        .map_err(kerr)?;
    let max_cmdline = (hdr.cmdline_size as usize).clamp(255, boot::CMDLINE_MAX - 1);
    plan_cmdline(plan, writes, cmdline, max_cmdline)?;
    plan.claim(
        load,
        bz.mem_needed,
        format!(
            "the kernel ({} bytes of payload, {} with its decompression space)",
            bz.payload_len, bz.mem_needed
        ),
    )
    .map_err(kerr)?;
    writes.push(Write::Bytes(load, &kernel.data[bz.payload_offset..]));
    let initrd_limit = below.min(u64::from(hdr.initrd_addr_max).saturating_add(1));
    if let Some((addr, size)) = plan_initrd(plan, writes, modules, initrd_limit)? {
        // Both below 4 GiB: the limit is a u32 + 1.
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    hdr.type_of_loader = 0xff;
    hdr.cmd_line_ptr = boot::CMDLINE as u32;
    hdr.loadflags |= bzimage::CAN_USE_HEAP;
    hdr.heap_end_ptr = (boot::ZERO_PAGE - 0x200) as u16;
    hdr.code32_start = load as u32;
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: boot::RSDP,
        ..Default::default()
    };
    for (k, (addr, size, type_)) in e820.iter().enumerate().take(params.e820_table.len()) {
        params.e820_table[k] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    writes.push(Write::Owned(boot::ZERO_PAGE, params.as_slice().to_vec()));
    let mut s = protected_mode_entry(load);
    s.regs.gpr[cpu_interp::state::gpr::RSI] = boot::ZERO_PAGE;
    Ok(s)
}

fn plan_pvh<'a>(
    plan: &mut MemoryPlan,
    writes: &mut Writes<'a>,
    kernel: &Module<'a>,
    modules: &[Module<'a>],
    cmdline: &str,
    e820: &[(u64, u64, u32)],
    below: u64,
) -> Result<CpuState, LoaderError> {
    let kerr = |r: String| LoaderError::file(FileRole::Kernel, kernel.name, r);
    let img = elf::parse(kernel.data).map_err(kerr)?;
    let entry = img
        .pvh_entry
        .ok_or_else(|| kerr("ELF kernel without a PVH entry note".into()))?;
    plan.claim(
        boot::PVH_START_INFO,
        boot::ZERO_PAGE - boot::PVH_START_INFO,
        "the PVH start info",
    )
    .map_err(kerr)?;
    plan_cmdline(plan, writes, cmdline, boot::CMDLINE_MAX - 1)?;
    for (k, seg) in img.segments.iter().enumerate() {
        plan.claim(seg.paddr, seg.memsz, format!("kernel segment {k}"))
            .map_err(kerr)?;
        writes.push(Write::Bytes(
            seg.paddr,
            &kernel.data[seg.offset..seg.offset + seg.filesz],
        ));
        writes.push(Write::Zeros(
            seg.paddr + seg.filesz as u64,
            seg.memsz - seg.filesz as u64,
        ));
    }
    if !img
        .segments
        .iter()
        .any(|s| entry >= s.paddr && entry - s.paddr < s.memsz)
    {
        return Err(kerr(format!(
            "the PVH entry point {entry:#x} is outside every loadable segment"
        )));
    }
    let mut info = hvm_start_info {
        magic: 0x336e_c578,
        version: 1,
        cmdline_paddr: boot::CMDLINE,
        rsdp_paddr: boot::RSDP,
        ..Default::default()
    };
    if let Some((addr, size)) = plan_initrd(plan, writes, modules, below.min(1 << 32))? {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        writes.push(Write::Owned(boot::PVH_MODLIST, module.as_slice().to_vec()));
        info.nr_modules = 1;
        info.modlist_paddr = boot::PVH_MODLIST;
    }
    let max_entries = ((boot::ZERO_PAGE - boot::PVH_MEMMAP) / 24) as usize;
    for (k, (addr, size, type_)) in e820.iter().enumerate().take(max_entries) {
        let e = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        };
        writes.push(Write::Owned(
            boot::PVH_MEMMAP + 24 * k as u64,
            e.as_slice().to_vec(),
        ));
    }
    info.memmap_paddr = boot::PVH_MEMMAP;
    info.memmap_entries = e820.len().min(max_entries) as u32;
    writes.push(Write::Owned(boot::PVH_START_INFO, info.as_slice().to_vec()));
    let mut s = protected_mode_entry(entry);
    s.regs.gpr[cpu_interp::state::gpr::RBX] = boot::PVH_START_INFO;
    Ok(s)
}

/// The GDT boot protocols expect: 0x10 flat 32-bit code, 0x18 flat data.
fn boot_gdt_bytes() -> Vec<u8> {
    let gdt: [u64; 4] = [0, 0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    gdt.iter().flat_map(|d| d.to_le_bytes()).collect()
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
        limit: place::BOOT_GDT_LEN as u16 - 1,
    };
    s.sregs.idt = DescriptorTable { base: 0, limit: 0 };
    s.sregs.cr0 = 0x11; // PE | ET
    s.regs.rip = entry;
    s.regs.rflags = 0x2;
    s
}

#[cfg(test)]
mod tests;
