//! ELF headers (32- and 64-bit, little-endian x86): the loadable segments,
//! the entry point and the PVH entry note, every field checked against the
//! file before use.

/// One PT_LOAD segment, checked: its file bytes lie inside the file and
/// its memory range does not wrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSegment {
    pub offset: usize,
    pub filesz: usize,
    pub paddr: u64,
    pub vaddr: u64,
    pub memsz: u64,
}

/// What duet needs from an ELF kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfImage {
    pub class64: bool,
    pub entry: u64,
    pub segments: Vec<LoadSegment>,
    /// XEN_ELFNOTE_PHYS32_ENTRY, the PVH entry point (physical).
    pub pvh_entry: Option<u64>,
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
/// XEN_ELFNOTE_PHYS32_ENTRY.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Is this an ELF file (by its magic)?
pub fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

fn u16_at(d: &[u8], o: usize) -> Option<u16> {
    d.get(o..o.checked_add(2)?)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(d: &[u8], o: usize) -> Option<u32> {
    d.get(o..o.checked_add(4)?)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(d: &[u8], o: usize) -> Option<u64> {
    let b = d.get(o..o.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

/// Parse and check an ELF kernel's headers.
pub fn parse(data: &[u8]) -> Result<ElfImage, String> {
    if !is_elf(data) {
        return Err("not an ELF file".into());
    }
    let class64 = match data.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err("ELF: unknown class (neither 32- nor 64-bit)".into()),
    };
    if data.get(5) != Some(&1) {
        return Err("ELF: not little-endian (not an x86 kernel)".into());
    }
    let ehsize = if class64 { 64 } else { 52 };
    if data.len() < ehsize {
        return Err(format!(
            "ELF: the file ({} bytes) is shorter than an ELF header ({ehsize} bytes)",
            data.len()
        ));
    }
    let machine = u16_at(data, 18).unwrap_or(0);
    if machine != EM_386 && machine != EM_X86_64 {
        return Err(format!(
            "ELF: machine {machine} is not x86 (3) or x86-64 (62)"
        ));
    }
    let (entry, phoff, phentsize, phnum) = if class64 {
        (
            u64_at(data, 24).unwrap_or(0),
            u64_at(data, 32).unwrap_or(0),
            u16_at(data, 54).unwrap_or(0),
            u16_at(data, 56).unwrap_or(0),
        )
    } else {
        (
            u64::from(u32_at(data, 24).unwrap_or(0)),
            u64::from(u32_at(data, 28).unwrap_or(0)),
            u16_at(data, 42).unwrap_or(0),
            u16_at(data, 44).unwrap_or(0),
        )
    };
    let min_ph = if class64 { 56 } else { 32 };
    if phnum == 0 {
        return Err("ELF: no program headers".into());
    }
    if usize::from(phentsize) < min_ph {
        return Err(format!(
            "ELF: program header size {phentsize} is smaller than {min_ph}"
        ));
    }
    let table_len = u64::from(phentsize) * u64::from(phnum);
    let table_end = phoff.checked_add(table_len);
    if table_end.is_none_or(|e| e > data.len() as u64) {
        return Err(format!(
            "ELF: the program headers ({phnum} × {phentsize} bytes at {phoff:#x}) run past the \
             end of the file ({} bytes); the file is truncated",
            data.len()
        ));
    }
    let mut segments = Vec::new();
    let mut pvh_entry = None;
    for k in 0..usize::from(phnum) {
        // In bounds: checked against the file length above.
        let ph = phoff as usize + k * usize::from(phentsize);
        let f32_ = |o: usize| u32_at(data, ph + o).unwrap_or(0);
        let f64_ = |o: usize| u64_at(data, ph + o).unwrap_or(0);
        let p_type = f32_(0);
        let (offset, vaddr, paddr, filesz, memsz) = if class64 {
            (f64_(8), f64_(16), f64_(24), f64_(32), f64_(40))
        } else {
            (
                u64::from(f32_(4)),
                u64::from(f32_(8)),
                u64::from(f32_(12)),
                u64::from(f32_(16)),
                u64::from(f32_(20)),
            )
        };
        if p_type != PT_LOAD && p_type != PT_NOTE {
            continue;
        }
        let file_end = offset.checked_add(filesz);
        if file_end.is_none_or(|e| e > data.len() as u64) {
            return Err(format!(
                "ELF: segment {k} ({filesz:#x} bytes at file offset {offset:#x}) runs past the \
                 end of the file ({} bytes); the file is truncated",
                data.len()
            ));
        }
        if p_type == PT_NOTE {
            if pvh_entry.is_none() {
                pvh_entry = find_pvh_note(&data[offset as usize..(offset + filesz) as usize]);
            }
            continue;
        }
        if filesz > memsz {
            return Err(format!(
                "ELF: segment {k} has more file bytes ({filesz:#x}) than memory ({memsz:#x})"
            ));
        }
        if paddr.checked_add(memsz).is_none() {
            return Err(format!(
                "ELF: segment {k} at {paddr:#x} (+{memsz:#x}) wraps around the address space"
            ));
        }
        segments.push(LoadSegment {
            offset: offset as usize,
            filesz: filesz as usize,
            paddr,
            vaddr,
            memsz,
        });
    }
    if !segments.iter().any(|s| s.memsz > 0) {
        return Err("ELF: no loadable segment".into());
    }
    Ok(ElfImage {
        class64,
        entry,
        segments,
        pvh_entry,
    })
}

/// The PVH entry in a PT_NOTE segment's notes.
fn find_pvh_note(notes: &[u8]) -> Option<u64> {
    let mut o = 0usize;
    while o + 12 <= notes.len() {
        let namesz = u32_at(notes, o)? as usize;
        let descsz = u32_at(notes, o + 4)? as usize;
        let ntype = u32_at(notes, o + 8)?;
        let name_at = o + 12;
        let desc_at = name_at.checked_add(namesz.checked_add(3)? & !3)?;
        let next = desc_at.checked_add(descsz.checked_add(3)? & !3)?;
        let name = notes.get(name_at..name_at.checked_add(namesz)?)?;
        if ntype == XEN_ELFNOTE_PHYS32_ENTRY && name.starts_with(b"Xen") {
            let desc = notes.get(desc_at..desc_at.checked_add(descsz)?)?;
            return match desc.len() {
                4..=7 => u32_at(desc, 0).map(u64::from),
                n if n >= 8 => u64_at(desc, 0).map(|v| v & 0xffff_ffff),
                _ => None,
            };
        }
        o = next;
    }
    None
}

/// The entry point as a physical address: a virtual entry inside a
/// segment whose virtual and physical addresses differ is translated, as
/// GRUB does for multiboot ELF kernels.
pub fn physical_entry(img: &ElfImage) -> u64 {
    for s in &img.segments {
        if s.vaddr != s.paddr && img.entry >= s.vaddr && img.entry - s.vaddr < s.memsz {
            return s.paddr + (img.entry - s.vaddr);
        }
    }
    img.entry
}

#[cfg(test)]
pub(crate) mod testing {
    /// A minimal ELF32 executable: one PT_LOAD of `code` at `paddr`
    /// (file offset 0x1000, `bss` extra bytes of memory), entry `entry`,
    /// optionally with extra bytes (e.g. a multiboot header) at offset 0x100.
    pub fn elf32(code: &[u8], paddr: u32, bss: u32, entry: u32, extra: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 1;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&3u16.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..28].copy_from_slice(&entry.to_le_bytes());
        f[28..32].copy_from_slice(&52u32.to_le_bytes());
        f[40..42].copy_from_slice(&52u16.to_le_bytes());
        f[42..44].copy_from_slice(&32u16.to_le_bytes());
        f[44..46].copy_from_slice(&1u16.to_le_bytes());
        let ph = [
            1,
            0x1000,
            paddr,
            paddr,
            code.len() as u32,
            code.len() as u32 + bss,
            7,
            0x1000,
        ];
        for (k, w) in ph.iter().enumerate() {
            f[52 + 4 * k..56 + 4 * k].copy_from_slice(&w.to_le_bytes());
        }
        f[0x100..0x100 + extra.len()].copy_from_slice(extra);
        f.extend_from_slice(code);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::testing::elf32;
    use super::*;

    #[test]
    fn parses_a_minimal_elf32() {
        let f = elf32(&[0x90; 16], 0x8000, 0x100, 0x8004, &[]);
        let img = parse(&f).unwrap();
        assert!(!img.class64);
        assert_eq!(img.entry, 0x8004);
        assert_eq!(
            img.segments,
            vec![LoadSegment {
                offset: 0x1000,
                filesz: 16,
                paddr: 0x8000,
                vaddr: 0x8000,
                memsz: 0x110
            }]
        );
        assert_eq!(img.pvh_entry, None);
    }

    #[test]
    fn rejects_bad_headers_with_reasons() {
        let good = elf32(&[0x90; 16], 0x8000, 0, 0x8000, &[]);
        let mut f = good.clone();
        f.truncate(0x1008);
        assert!(parse(&f).unwrap_err().contains("truncated"));
        let mut f = good.clone();
        f[4] = 9;
        assert!(parse(&f).unwrap_err().contains("class"));
        let mut f = good.clone();
        f[18] = 40;
        assert!(parse(&f).unwrap_err().contains("machine 40"));
        let mut f = good.clone();
        f[28..32].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert!(parse(&f).unwrap_err().contains("program headers"));
        let mut f = good.clone();
        // filesz > memsz
        f[52 + 20..52 + 24].copy_from_slice(&1u32.to_le_bytes());
        assert!(parse(&f).unwrap_err().contains("more file bytes"));
        let mut f = good;
        f[42..44].copy_from_slice(&8u16.to_le_bytes());
        assert!(parse(&f).unwrap_err().contains("program header size"));
        assert!(parse(b"\x7fELF\x01\x01\x01")
            .unwrap_err()
            .contains("shorter"));
    }

    #[test]
    fn virtual_entry_is_translated() {
        let mut img = parse(&elf32(&[0x90; 16], 0x10_0000, 0, 0xc010_0004, &[])).unwrap();
        img.segments[0].vaddr = 0xc010_0000;
        assert_eq!(physical_entry(&img), 0x10_0004);
    }

    #[test]
    fn pvh_note_is_found() {
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&8u32.to_le_bytes());
        note.extend_from_slice(&18u32.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&0x0100_0abcu64.to_le_bytes());
        assert_eq!(find_pvh_note(&note), Some(0x0100_0abc));
        assert_eq!(find_pvh_note(&note[..20]), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut d = data;
            if d.len() >= 4 {
                d[..4].copy_from_slice(b"\x7fELF");
            }
            let _ = parse(&d);
        }
    }
}
