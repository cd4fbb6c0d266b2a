//! The Linux/x86 boot protocol's setup header (Documentation/arch/x86/boot.rst),
//! read and checked before a bzImage is loaded.

use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;

/// Where the setup header starts in the file.
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// "HdrS" at 0x202.
pub const HDRS_OFFSET: usize = 0x202;
/// loadflags: the protected-mode code is loaded at 1 MiB (a bzImage).
pub const LOADED_HIGH: u8 = 1 << 0;
/// loadflags: heap_end_ptr is valid.
pub const CAN_USE_HEAP: u8 = 1 << 7;
/// xloadflags: the kernel has the 64-bit entry at load address + 0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// The oldest protocol duet boots (cmdline_size, relocatable kernels).
pub const MIN_VERSION: u16 = 0x0206;
/// The protocol that introduced xloadflags.
pub const XLOADFLAGS_VERSION: u16 = 0x020c;
/// The protocol that introduced init_size.
pub const INIT_SIZE_VERSION: u16 = 0x020a;

/// Is there a bzImage signature?
pub fn has_signature(data: &[u8]) -> bool {
    data.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(b"HdrS")
}

/// A checked setup header and where the protected-mode payload lies.
#[derive(Clone, Copy, Debug)]
pub struct BzImage {
    pub hdr: setup_header,
    /// File offset of the protected-mode payload (after the setup sectors).
    pub payload_offset: usize,
    /// Bytes of payload in the file.
    pub payload_len: u64,
    /// Memory the kernel needs from its load address: the payload, or
    /// init_size when larger (decompression space).
    pub mem_needed: u64,
    /// The kernel says it has a 64-bit entry point (XLF_KERNEL_64).
    pub kernel_64: bool,
}

/// Read and check the setup header of a bzImage.
pub fn parse(data: &[u8]) -> Result<BzImage, String> {
    if !has_signature(data) {
        return Err("bzImage: no 'HdrS' signature at 0x202".into());
    }
    let mut hdr = setup_header::default();
    let n = data
        .len()
        .saturating_sub(SETUP_HEADER_OFFSET)
        .min(std::mem::size_of::<setup_header>());
    hdr.as_mut_slice()[..n].copy_from_slice(&data[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + n]);
    let version = hdr.version;
    if version < MIN_VERSION {
        return Err(format!(
            "bzImage: boot protocol {}.{:02} is too old (duet needs 2.06 or later, Linux 2.6.22+)",
            version >> 8,
            version & 0xff
        ));
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err("a zImage (kernel loaded below 1 MiB) is not supported; boot a bzImage".into());
    }
    if hdr.boot_flag != 0xaa55 {
        let flag = hdr.boot_flag;
        return Err(format!(
            "bzImage: boot flag {flag:#06x} at 0x1fe is not 0xaa55; the file is damaged"
        ));
    }
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    let payload_declared = u64::from(hdr.syssize) * 16;
    let needed = setup_size + payload_declared;
    let len = data.len() as u64;
    if len < needed || len <= setup_size {
        return Err(format!(
            "truncated bzImage: its setup header says {needed} bytes ({setup_size} of setup, \
             {payload_declared} of payload), the file has {len}; use the complete file"
        ));
    }
    let payload_len = len - setup_size;
    let kernel_64 = version >= XLOADFLAGS_VERSION && hdr.xloadflags & XLF_KERNEL_64 != 0;
    let init_size = if version >= INIT_SIZE_VERSION {
        u64::from(hdr.init_size)
    } else {
        0
    };
    Ok(BzImage {
        hdr,
        payload_offset: setup_size as usize,
        payload_len,
        mem_needed: payload_len.max(init_size),
        kernel_64,
    })
}

#[cfg(test)]
pub(crate) mod testing {
    /// A synthetic bzImage: 4 setup sectors, protocol `version`, a
    /// payload of `payload` bytes rounded up to 16 (syssize to match, as
    /// Linux's build tool pads it) and init_size `init_size`.
    pub fn bzimage(version: u16, payload: usize, init_size: u32) -> Vec<u8> {
        let payload = payload.next_multiple_of(16);
        let setup_sects = 4u8;
        let setup = (usize::from(setup_sects) + 1) * 512;
        let mut f = vec![0u8; setup + payload];
        f[0x1f1] = setup_sects;
        f[0x1f4..0x1f8].copy_from_slice(&(payload.div_ceil(16) as u32).to_le_bytes());
        f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        f[0x211] = 1; // LOADED_HIGH
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        f[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
        f[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
        f[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes());
        f[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        for (k, b) in f[setup..].iter_mut().enumerate() {
            *b = (k % 251) as u8;
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::testing::bzimage;
    use super::*;

    #[test]
    fn a_good_header_parses() {
        let b = parse(&bzimage(0x020f, 0x3000, 0x10000)).unwrap();
        assert_eq!(b.payload_offset, 5 * 512);
        assert_eq!(b.payload_len, 0x3000);
        assert_eq!(b.mem_needed, 0x10000);
        assert!(b.kernel_64);
    }

    #[test]
    fn truncation_is_refused_with_both_sizes() {
        let mut f = bzimage(0x020f, 0x3000, 0);
        f.truncate(0x1800);
        assert_eq!(
            parse(&f).unwrap_err(),
            "truncated bzImage: its setup header says 14848 bytes (2560 of setup, 12288 of \
             payload), the file has 6144; use the complete file"
        );
    }

    #[test]
    fn old_protocols_and_zimages_are_refused() {
        let e = parse(&bzimage(0x0204, 0x100, 0)).unwrap_err();
        assert!(e.contains("boot protocol 2.04 is too old"), "{e}");
        let mut f = bzimage(0x020f, 0x100, 0);
        f[0x211] = 0;
        assert!(parse(&f).unwrap_err().contains("zImage"));
        let mut f = bzimage(0x020f, 0x100, 0);
        f[0x1fe] = 0;
        assert!(parse(&f).unwrap_err().contains("boot flag"));
        // Before 2.12 there are no xloadflags; before 2.10 no init_size.
        let b = parse(&bzimage(0x0209, 0x100, 0x9999)).unwrap();
        assert!(!b.kernel_64);
        assert_eq!(b.mem_needed, 0x100);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_headers_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0x80),
            len in 0usize..0x2000,
        ) {
            let mut f = bzimage(0x020f, 0x1000, 0);
            f[0x1f1..0x1f1 + 0x7b].copy_from_slice(&bytes[..0x7b]);
            f[0x202..0x206].copy_from_slice(b"HdrS");
            f.truncate(len.max(0x206));
            if let Ok(b) = parse(&f) {
                proptest::prop_assert!(b.payload_offset as u64 + b.payload_len == f.len() as u64);
            }
        }
    }
}
