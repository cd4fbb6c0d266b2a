use super::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

fn temp(name: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("duet-loader-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn memory(size: u64) -> GuestMemory {
    crate::machine::create_memory(size).unwrap()
}

fn module<'a>(name: &'a str, data: &'a [u8]) -> Module<'a> {
    Module {
        name,
        data,
        cmdline: name,
    }
}

fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn read32(mem: &GuestMemory, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn all_zero(mem: &GuestMemory, size: u64) -> bool {
    let mut buf = vec![0u8; 1 << 20];
    let mut a = 0;
    while a < size {
        let n = (size - a).min(buf.len() as u64) as usize;
        mem.read_slice(&mut buf[..n], GuestAddress(a)).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            return false;
        }
        a += n as u64;
    }
    true
}

#[test]
fn initrd_lists_split_like_qemu() {
    assert_eq!(split_initrd_list("a"), vec!["a"]);
    assert_eq!(
        split_initrd_list("mod1 x=1,mod2,,b y,mod3"),
        vec!["mod1 x=1", "mod2,b y", "mod3"]
    );
    assert_eq!(split_initrd_list(",a,,,"), vec!["a,"]);
    assert!(split_initrd_list("").is_empty());
}

#[test]
fn garbage_and_missing_files_are_clear_errors() {
    let p = temp("garbage", b"hello, this is not a kernel");
    let e = detect(&p).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "--kernel {}: not a kernel duet can boot: not an ELF file, a Linux bzImage (no 'HdrS' \
             signature at 0x202) or a multiboot kernel (no multiboot header in the first 8 KiB)",
            p.display()
        )
    );
    let e = detect(Path::new("/nonexistent/kernel"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "--kernel /nonexistent/kernel: no such file (check the path)"
    );
    let mem = memory(16 * MIB);
    let spec = KernelSpec {
        kernel: p.clone(),
        initrd: vec!["/nonexistent/initrd".into()],
        cmdline: String::new(),
    };
    // The kernel is checked first.
    assert!(load(&mem, &spec)
        .unwrap_err()
        .to_string()
        .starts_with("--kernel"));
    let bz = temp("bz-ok", &bzimage::testing::bzimage(0x020f, 0x1000, 0));
    let spec = KernelSpec {
        kernel: bz.clone(),
        ..spec
    };
    assert_eq!(
        load(&mem, &spec).unwrap_err().to_string(),
        "--initrd /nonexistent/initrd: no such file (check the path)"
    );
    assert!(all_zero(&mem, 16 * MIB), "a failed load wrote guest memory");
    std::fs::remove_file(p).ok();
    std::fs::remove_file(bz).ok();
}

#[test]
fn truncated_bzimage_is_refused_before_any_write() {
    let mut b = bzimage::testing::bzimage(0x020f, 100_000, 0);
    b.truncate(50_000);
    let p = temp("bz-trunc", &b);
    let mem = memory(64 * MIB);
    let spec = KernelSpec {
        kernel: p.clone(),
        ..Default::default()
    };
    let e = load(&mem, &spec).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "--kernel {}: truncated bzImage: its setup header says 102560 bytes (2560 of setup, \
             100000 of payload), the file has 50000; use the complete file",
            p.display()
        )
    );
    assert!(all_zero(&mem, 64 * MIB));
    std::fs::remove_file(p).ok();
}

#[test]
fn bzimage_loads_with_header_fields_set() {
    let b = bzimage::testing::bzimage(0x020f, 0x5000, 0x20_0000);
    let mem = memory(32 * MIB);
    let k = module("bz", &b);
    let rd = vec![7u8; 5000];
    let s = load_bytes(&mem, &k, &[module("rd", &rd)], "console=ttyS0").unwrap();
    assert_eq!(s.regs.rip, layout::HIGH_RAM_START);
    assert_eq!(s.regs.gpr[cpu_interp::state::gpr::RSI], boot::ZERO_PAGE);
    assert_eq!(read(&mem, layout::HIGH_RAM_START, 0x5000), b[5 * 512..]);
    let params: boot_params = mem.read_obj(GuestAddress(boot::ZERO_PAGE)).unwrap();
    let (image, size) = (params.hdr.ramdisk_image, params.hdr.ramdisk_size);
    assert_eq!(size, 5000);
    assert_eq!(u64::from(image) % 4096, 0);
    assert_eq!(u64::from(image), (32 * MIB - 5000) & !0xfff);
    assert_eq!(read(&mem, u64::from(image), 5000), rd);
    let cmd_line_ptr = params.hdr.cmd_line_ptr;
    assert_eq!(cmd_line_ptr, boot::CMDLINE as u32);
    assert_eq!(read(&mem, boot::CMDLINE, 14), b"console=ttyS0\0");
    let e820 = params.e820_entries;
    assert!(e820 >= 3);
}

/// The initrd may sit right above the kernel's memory (payload and
/// decompression space); the old check added the load address twice.
#[test]
fn initrd_may_sit_right_above_the_kernel() {
    // 4 MiB of RAM: kernel 1..2 MiB, initrd of 2 MiB - 4 KiB just fits.
    let b = bzimage::testing::bzimage(0x020f, 0x1000, MIB as u32);
    let mem = memory(4 * MIB);
    let rd = vec![1u8; (2 * MIB - 4096) as usize];
    load_bytes(&mem, &module("bz", &b), &[module("rd", &rd)], "").unwrap();
    let params: boot_params = mem.read_obj(GuestAddress(boot::ZERO_PAGE)).unwrap();
    let image = params.hdr.ramdisk_image;
    assert_eq!(u64::from(image), 2 * MIB + 4096);
    // One page more does not fit: a clear error, nothing written.
    let mem = memory(4 * MIB);
    let rd = vec![1u8; (2 * MIB + 1) as usize];
    let e = load_bytes(&mem, &module("bz", &b), &[module("rd", &rd)], "")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "--initrd rd: 2097153 bytes do not fit in guest RAM between 1 MiB and 0x400000 next to the kernel; \
         give a larger --memory"
    );
    assert!(all_zero(&mem, 4 * MIB));
}

/// An initrd one byte too large for the space above the kernel's
/// `init_size` is refused, not slipped into the memory below 640 KiB that
/// the boot protocol leaves to the firmware and real-mode code (the
/// proptest's regression: payload 512, init_size 15323137, initrd 401409
/// bytes in 16 MiB).
#[test]
fn initrd_never_goes_below_one_mib() {
    let b = bzimage::testing::bzimage(0x020f, 512, 15_323_137);
    let rd = vec![0x5au8; 401_409];
    let mem = memory(16 * MIB);
    let e = load_bytes(&mem, &module("bz", &b), &[module("rd", &rd)], "")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--initrd rd: 401409 bytes do not fit"), "{e}");
    assert!(all_zero(&mem, 16 * MIB));
    // One page less fits, right above the kernel's decompression space.
    let rd = vec![0x5au8; 401_409 - 4096];
    load_bytes(&mem, &module("bz", &b), &[module("rd", &rd)], "").unwrap();
    let params: boot_params = mem.read_obj(GuestAddress(boot::ZERO_PAGE)).unwrap();
    let image = u64::from(params.hdr.ramdisk_image);
    assert!(image >= MIB + 15_323_137, "{image:#x}");
}

#[test]
fn several_initrds_are_concatenated_for_linux() {
    let b = bzimage::testing::bzimage(0x020f, 0x1000, 0);
    let mem = memory(16 * MIB);
    let (a, c) = (vec![0xaau8; 5], vec![0xccu8; 3]);
    load_bytes(
        &mem,
        &module("bz", &b),
        &[module("a", &a), module("c", &c)],
        "",
    )
    .unwrap();
    let params: boot_params = mem.read_obj(GuestAddress(boot::ZERO_PAGE)).unwrap();
    let (image, size) = (params.hdr.ramdisk_image, params.hdr.ramdisk_size);
    assert_eq!(size, 11);
    assert_eq!(
        read(&mem, u64::from(image), 11),
        [0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0, 0, 0, 0xcc, 0xcc, 0xcc]
    );
}

#[test]
fn bzimage_command_line_length_is_checked() {
    let b = bzimage::testing::bzimage(0x020f, 0x1000, 0);
    let mem = memory(16 * MIB);
    let long = "x".repeat(2049);
    let e = load_bytes(&mem, &module("bz", &b), &[], &long)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "--cmdline: 2049 bytes, longer than the 2048 this kernel accepts; shorten it"
    );
}

#[test]
fn kernel_larger_than_memory_is_refused() {
    let b = bzimage::testing::bzimage(0x020f, 0x1000, 64 << 20);
    let mem = memory(16 * MIB);
    let e = load_bytes(&mem, &module("bz", &b), &[], "")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "--kernel bz: the kernel (4096 bytes of payload, 67108864 with its decompression space) \
         at 0x100000..0x4100000 is not in guest RAM (usable RAM: 0x0..0x9fc00 and \
         0x100000..0x1000000; a larger --memory may help if it lies above)"
    );
    assert!(all_zero(&mem, 16 * MIB));
}

/// A minimal ELF64 vmlinux with a PVH note: one PT_LOAD at `paddr`.
fn pvh_elf(paddr: u64, code: &[u8], entry: u64) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[24..32].copy_from_slice(&(0xffff_ffff_8000_0000u64 + paddr).to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&2u16.to_le_bytes());
    let note_off = 0x200u64;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&8u32.to_le_bytes());
    note.extend_from_slice(&18u32.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&entry.to_le_bytes());
    f[note_off as usize..note_off as usize + note.len()].copy_from_slice(&note);
    let phs: [[u64; 7]; 2] = [
        // type|flags, offset, vaddr, paddr, filesz, memsz, align
        [
            1 | (7 << 32),
            0x1000,
            0xffff_ffff_8000_0000 + paddr,
            paddr,
            code.len() as u64,
            code.len() as u64 + 0x100,
            0x1000,
        ],
        [4, note_off, 0, 0, note.len() as u64, note.len() as u64, 4],
    ];
    for (k, ph) in phs.iter().enumerate() {
        let o = 64 + 56 * k;
        f[o..o + 4].copy_from_slice(&(ph[0] as u32).to_le_bytes());
        f[o + 4..o + 8].copy_from_slice(&((ph[0] >> 32) as u32).to_le_bytes());
        for (j, v) in ph[1..].iter().enumerate() {
            f[o + 8 + 8 * j..o + 16 + 8 * j].copy_from_slice(&v.to_le_bytes());
        }
    }
    f.extend_from_slice(code);
    f
}

#[test]
fn pvh_elf_loads_with_start_info() {
    let code = [0xf4u8; 64];
    let f = pvh_elf(0x20_0000, &code, 0x20_0010);
    assert_eq!(detect_bytes(&f), Ok(KernelFormat::ElfPvh));
    let mem = memory(16 * MIB);
    let rd = [9u8; 100];
    let s = load_bytes(&mem, &module("vmlinux", &f), &[module("rd", &rd)], "quiet").unwrap();
    assert_eq!(s.regs.rip, 0x20_0010);
    assert_eq!(
        s.regs.gpr[cpu_interp::state::gpr::RBX],
        boot::PVH_START_INFO
    );
    assert_eq!(read(&mem, 0x20_0000, 64), code);
    let info: hvm_start_info = mem.read_obj(GuestAddress(boot::PVH_START_INFO)).unwrap();
    assert_eq!(info.magic, 0x336e_c578);
    assert_eq!(info.nr_modules, 1);
    let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
    assert_eq!(read(&mem, m.paddr, 100), rd);
    // The entry point must be loaded.
    let f = pvh_elf(0x20_0000, &code, 0x30_0000);
    let e = load_bytes(&memory(16 * MIB), &module("v", &f), &[], "")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "--kernel v: the PVH entry point 0x300000 is outside every loadable segment"
    );
    // Segments must not overlap the boot structures.
    let f = pvh_elf(0x6000, &code, 0x6000);
    let e = load_bytes(&memory(16 * MIB), &module("v", &f), &[], "")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "--kernel v: kernel segment 0 at 0x6000..0x6140 overlaps the PVH start info at \
         0x6000..0x7000"
    );
}

#[test]
fn elf_without_pvh_or_multiboot_is_explained() {
    let f = multiboot::elf_header();
    let mut elf = elf::testing::elf32(&[0x90; 8], 0x10_0000, 0, 0x10_0000, &[]);
    assert_eq!(
        detect_bytes(&elf).unwrap_err(),
        "an ELF kernel without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) or a multiboot \
         header; boot its bzImage, or build it with CONFIG_PVH=y"
    );
    elf[0x100..0x10c].copy_from_slice(&f);
    assert_eq!(detect_bytes(&elf), Ok(KernelFormat::Multiboot));
}

/// A multiboot ELF kernel: `cli; hlt` code at `paddr`.
fn mb_elf(paddr: u32, bss: u32) -> Vec<u8> {
    elf::testing::elf32(
        &[0xfa, 0xf4, 0, 0],
        paddr,
        bss,
        paddr,
        &multiboot::elf_header(),
    )
}

#[test]
fn multiboot_elf_at_0x8000_keeps_its_entry_point() {
    let f = mb_elf(0x8000, 0x1000);
    let mem = memory(16 * MIB);
    let (m1, m2) = (b"first module".to_vec(), b"second".to_vec());
    let mods = [
        Module {
            name: "m1",
            data: &m1,
            cmdline: "m1 arg=1",
        },
        Module {
            name: "m2",
            data: &m2,
            cmdline: "m2",
        },
    ];
    let s = load_bytes(&mem, &module("k", &f), &mods, "hello=world").unwrap();
    assert_eq!(s.regs.rip, 0x8000);
    assert_eq!(s.regs.gpr[0], 0x2bad_b002);
    // The code is intact: nothing was placed on top of it.
    assert_eq!(read(&mem, 0x8000, 4), [0xfa, 0xf4, 0, 0]);
    let info = s.regs.gpr[3];
    assert!(info >= 0x9004, "info at {info:#x} overlaps the kernel");
    assert_eq!(info % 4096, 0);
    let flags = read32(&mem, info);
    assert_eq!(flags & 0x24d, 0x24d, "flags {flags:#x}");
    let cstr = |a: u32| {
        let b = read(&mem, u64::from(a), 64);
        String::from_utf8(b[..b.iter().position(|&c| c == 0).unwrap()].to_vec()).unwrap()
    };
    assert_eq!(cstr(read32(&mem, info + 16)), "k hello=world");
    assert_eq!(cstr(read32(&mem, info + 64)), "duet");
    assert_eq!(read32(&mem, info + 20), 2);
    let mods_addr = u64::from(read32(&mem, info + 24));
    let mut prev_end = 0x9000;
    for (k, (data, cmd)) in [(&m1, "m1 arg=1"), (&m2, "m2")].iter().enumerate() {
        let e = mods_addr + 16 * k as u64;
        let (start, end) = (read32(&mem, e), read32(&mem, e + 4));
        assert_eq!(start % 4096, 0);
        assert!(start >= prev_end, "module {k} at {start:#x} overlaps");
        assert_eq!(read(&mem, u64::from(start), (end - start) as usize), **data);
        assert_eq!(cstr(read32(&mem, e + 8)), *cmd);
        prev_end = end;
    }
    assert!(info >= u64::from(prev_end));
    // The memory map describes RAM.
    let mmap_len = read32(&mem, info + 44);
    let mmap = u64::from(read32(&mem, info + 48));
    assert_eq!(mmap_len % 24, 0);
    assert_eq!(read32(&mem, mmap), 20);
}

#[test]
fn multiboot_kernel_filling_memory_leaves_no_room_for_the_info() {
    // 4 MiB of RAM; the kernel covers everything from 1 MiB, and low
    // memory except a few pages below 0x1000... all of it: 0x1000..EBDA.
    let mut f = mb_elf(0x10_0000, (3 * MIB - 4) as u32);
    let mem = memory(4 * MIB);
    load_bytes(&mem, &module("k", &f), &[], "").expect("info fits in low memory");
    // A second segment over low memory (page 1 up to the EBDA) leaves
    // nothing.
    let low = elf::testing::elf32(&[0; 4], 0x1000, 0x9ec00 - 4, 0x1000, &[]);
    f = two_segment_elf(&f, &low);
    let e = load_bytes(&memory(4 * MIB), &module("k", &f), &[], "")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("--kernel k: the kernel leaves no room for the multiboot information ("),
        "{e}"
    );
    assert!(
        e.contains(
            "in use: the boot GDT 0x500..0x520, kernel segment 0 0x100000..0x400000, kernel \
             segment 1 0x1000..0x9fc00); give a larger --memory"
        ),
        "{e}"
    );
}

/// Merge the first PT_LOAD of `b` into `a` as a second program header
/// (both are `elf::testing::elf32` files).
fn two_segment_elf(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut f = a.to_vec();
    f[44..46].copy_from_slice(&2u16.to_le_bytes());
    let mut ph = b[52..84].to_vec();
    let off = f.len() as u32;
    ph[4..8].copy_from_slice(&off.to_le_bytes());
    f[84..116].copy_from_slice(&ph);
    f.extend_from_slice(&b[0x1000..]);
    f
}

#[test]
fn multiboot_segments_must_not_overlap_the_firmware_tables() {
    let f = mb_elf(0xf_0000, 0);
    let e = load_bytes(&memory(16 * MIB), &module("k", &f), &[], "")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "--kernel k: the kernel image at 0xf0000..0xf0004 is not in guest RAM (usable RAM: \
         0x0..0x9fc00 and 0x100000..0x1000000; a larger --memory may help if it lies above)"
    );
}

#[test]
fn multiboot_aout_kludge_loads_and_sets_registers() {
    let img = crate::bench::image(crate::bench::Workload::Alu, 10).unwrap();
    let p = temp("mb", &img);
    assert_eq!(detect(&p).unwrap(), KernelFormat::Multiboot);
    let mem = memory(64 * MIB);
    let initrd = temp("mb-initrd", b"module contents");
    let spec = KernelSpec {
        kernel: p.clone(),
        initrd: vec![format!("{} some args", initrd.display())],
        cmdline: "hello=world".into(),
    };
    let s = load(&mem, &spec).unwrap();
    assert_eq!(s.regs.gpr[0], 0x2bad_b002);
    assert_eq!(s.regs.rip, crate::bench::LOAD_ADDR + 40);
    assert_eq!(read(&mem, crate::bench::LOAD_ADDR, img.len()), img);
    let info = s.regs.gpr[3];
    assert!(info >= crate::bench::LOAD_ADDR + img.len() as u64);
    let mods = u64::from(read32(&mem, info + 24));
    let start = read32(&mem, mods);
    assert_eq!(read(&mem, u64::from(start), 15), b"module contents");
    std::fs::remove_file(p).ok();
    std::fs::remove_file(initrd).ok();
}

#[test]
fn multiboot_header_fields_are_checked() {
    let mk = |load: u32, end: u32, bss: u32, entry: u32, header: u32| {
        let mut f = vec![0u8; 0x2000];
        f[0x40..0x60].copy_from_slice(&multiboot::aout_header(load, end, bss, entry, header));
        f
    };
    let err = |f: &[u8]| {
        load_bytes(&memory(16 * MIB), &module("k", f), &[], "")
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err(&mk(0x20_0000, 0x20_1000, 0, 0x20_0000, 0x1f_0000)),
        "--kernel k: multiboot header_addr is below load_addr"
    );
    assert_eq!(
        err(&mk(0x20_0000, 0x20_4000, 0, 0x20_0000, 0x20_0040)),
        "--kernel k: the multiboot header asks for 16384 bytes from file offset 0x0, the file \
         has 8192; the file is truncated"
    );
    assert_eq!(
        err(&mk(0x20_0000, 0x20_1000, 0x20_0800, 0x20_0000, 0x20_0040)),
        "--kernel k: multiboot bss_end_addr is below load_end_addr"
    );
    assert_eq!(
        err(&mk(0x20_0000, 0x20_1000, 0, 0x30_0000, 0x20_0040)),
        "--kernel k: the multiboot entry point 0x300000 is outside the image \
         (0x200000..0x201000)"
    );
    // A huge bss is refused by the plan, before anything is allocated.
    assert!(
        err(&mk(0x20_0000, 0x20_1000, 0xffff_f000, 0x20_0000, 0x20_0040))
            .contains("is not in guest RAM")
    );
    // Unknown required flags.
    let mut f = mk(0x20_0000, 0x20_1000, 0, 0x20_0000, 0x20_0040);
    let flags = 0x0001_0008u32;
    f[0x44..0x48].copy_from_slice(&flags.to_le_bytes());
    f[0x48..0x4c].copy_from_slice(
        &0u32
            .wrapping_sub(0x1bad_b002)
            .wrapping_sub(flags)
            .to_le_bytes(),
    );
    assert_eq!(
        err(&f),
        "--kernel k: the multiboot header requires features duet does not provide (flags 0x8 \
         of 0x10008)"
    );
}

#[test]
fn e820_excludes_holes() {
    let mem = memory(64 * MIB);
    let map = e820_map(&mem);
    let ram: Vec<_> = map.iter().filter(|e| e.2 == 1).collect();
    assert_eq!(ram[0].0, 0);
    assert!(ram[0].0 + ram[0].1 <= boot::EBDA_START);
    assert_eq!(ram[1].0, layout::HIGH_RAM_START);
    assert_eq!(ram[1].0 + ram[1].1, 64 << 20);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// bzImage + initrd: loads exactly when the kernel's memory and the
    /// initrd fit without overlapping; then they do not overlap.
    #[test]
    fn bzimage_and_initrd_never_overlap(
        payload in 0x200usize..0x40_0000,
        init_size in 0u32..0x100_0000,
        initrd_len in 0usize..0x80_0000,
    ) {
        let mem_size = 16 * MIB;
        let b = bzimage::testing::bzimage(0x020f, payload, init_size);
        let mem = memory(mem_size);
        let rd = vec![0x5au8; initrd_len];
        let mods = if initrd_len > 0 { vec![module("rd", &rd)] } else { vec![] };
        let r = load_bytes(&mem, &module("bz", &b), &mods, "");
        let payload = payload.next_multiple_of(16);
        let kernel_end = MIB + (payload as u64).max(u64::from(init_size));
        let rd_pages = (initrd_len as u64).div_ceil(4096) * 4096;
        // Room above the kernel: it must load. (Without it, the initrd may
        // still fit in conventional memory below the EBDA.)
        let fits_above = kernel_end <= mem_size
            && (initrd_len == 0 || kernel_end + rd_pages <= mem_size);
        if kernel_end > mem_size {
            prop_assert!(r.is_err());
        }
        if fits_above {
            prop_assert!(r.is_ok(), "{:?}", r.as_ref().err().map(|e| e.to_string()));
        }
        if r.is_ok() && initrd_len > 0 {
            let params: boot_params = mem.read_obj(GuestAddress(boot::ZERO_PAGE)).unwrap();
            let image = u64::from(params.hdr.ramdisk_image);
            let end = image + initrd_len as u64;
            prop_assert!(
                image >= kernel_end || end <= boot::EBDA_START,
                "initrd {image:#x}..{end:#x} overlaps the kernel {MIB:#x}..{kernel_end:#x}"
            );
            prop_assert!(end <= mem_size);
        }
        if r.is_err() {
            prop_assert!(all_zero(&mem, mem_size));
        }
    }

    /// Arbitrary bytes as a kernel (with each format's signature planted)
    /// are refused or loaded, never a panic or an unbounded allocation.
    #[test]
    fn arbitrary_kernels_never_panic(
        mut data in proptest::collection::vec(any::<u8>(), 0..0x3000),
        kind in 0u8..4,
        modlen in 0usize..64,
    ) {
        match kind {
            0 if data.len() >= 4 => data[..4].copy_from_slice(b"\x7fELF"),
            1 if data.len() >= 0x206 => data[0x202..0x206].copy_from_slice(b"HdrS"),
            2 if data.len() >= 0x60 => {
                let flags = u32::from_le_bytes([data[0x44], data[0x45], data[0x46], data[0x47]]);
                data[0x40..0x44].copy_from_slice(&0x1bad_b002u32.to_le_bytes());
                let sum = 0u32.wrapping_sub(0x1bad_b002).wrapping_sub(flags);
                data[0x48..0x4c].copy_from_slice(&sum.to_le_bytes());
            }
            _ => {}
        }
        let m = vec![1u8; modlen];
        let _ = load_bytes(&memory(4 * MIB), &module("k", &data), &[module("m", &m)], "x");
    }
}
