//! Behaviour the two x86 vendors implement differently.
//!
//! duet's interpreter is one CPU: an Intel-flavoured x86-64 (its CPUID
//! says `GenuineIntel`, see [`crate::cpuid`]) and by default it behaves as
//! Intel's processors do. Where Intel's and AMD's processors differ on
//! something a program can observe — mostly corners the manuals leave open
//! — the choice is a field here, so that the differential harness can
//! check the interpreter against whichever CPU it runs on, and the KVM
//! backend's fallback can execute an instruction the way the host CPU
//! the guest otherwise runs on would.

/// The vendor-specific choices, each named for what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quirks {
    /// A REP CMPS/SCAS that faults after completing some iterations leaves
    /// RFLAGS as before the instruction (Intel, seen on Sapphire Rapids);
    /// otherwise RFLAGS shows the last completed iteration's compare (AMD,
    /// seen on EPYC). RCX/RSI/RDI show the progress either way.
    pub rep_fault_restores_flags: bool,
    /// MOVSXD with a 16-bit operand size and a memory source reads 4 bytes
    /// (AMD: a fault can come from the two bytes after the operand); Intel
    /// reads 2.
    pub movsxd16_reads_dword: bool,
    /// Loading a null selector into DS/ES/FS/GS zeroes the segment base
    /// (Intel, and AMD's Zen 3 and later, which say so in CPUID
    /// 0x8000_0021:EAX[6]); older AMD processors keep it (Linux's
    /// X86_BUG_NULL_SEG).
    pub null_selector_clears_base: bool,
    /// An MMX instruction makes its x87 → MMX transition (TOP = 0, all
    /// tags valid) before its memory access, so that a #PF leaves the CPU
    /// in MMX state (Intel); AMD makes it after the access (both before a
    /// SIMD exception of CVTPS2PI and friends).
    pub mmx_switch_before_fault: bool,
    /// An 80-bit store (FSTP m80, FBSTP) is an 8-byte store and then a
    /// 2-byte one, so that a #PF on its last two bytes comes after the
    /// first eight are written (Intel); AMD checks all ten bytes first.
    pub m80_store_split: bool,
}

/// A CPU vendor, as far as [`Quirks`] tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
}

impl Vendor {
    /// The vendor of the CPU this process runs on (Intel for anything that
    /// is neither `GenuineIntel` nor `AuthenticAMD`/`HygonGenuine`).
    pub fn host() -> Vendor {
        #[cfg(target_arch = "x86_64")]
        {
            // CPUID is available on every x86-64 CPU; leaf 0 always exists.
            let r = std::arch::x86_64::__cpuid(0);
            let mut v = [0u8; 12];
            v[..4].copy_from_slice(&r.ebx.to_le_bytes());
            v[4..8].copy_from_slice(&r.edx.to_le_bytes());
            v[8..].copy_from_slice(&r.ecx.to_le_bytes());
            if &v == b"AuthenticAMD" || &v == b"HygonGenuine" {
                return Vendor::Amd;
            }
        }
        Vendor::Intel
    }

    pub fn name(self) -> &'static str {
        match self {
            Vendor::Intel => "Intel",
            Vendor::Amd => "AMD",
        }
    }
}

impl Quirks {
    pub const INTEL: Quirks = Quirks {
        rep_fault_restores_flags: true,
        movsxd16_reads_dword: false,
        null_selector_clears_base: true,
        mmx_switch_before_fault: true,
        m80_store_split: true,
    };
    /// An AMD processor before Zen 3.
    pub const AMD: Quirks = Quirks {
        rep_fault_restores_flags: false,
        movsxd16_reads_dword: true,
        null_selector_clears_base: false,
        mmx_switch_before_fault: false,
        m80_store_split: false,
    };

    pub fn of(vendor: Vendor) -> Quirks {
        match vendor {
            Vendor::Intel => Quirks::INTEL,
            Vendor::Amd => Quirks::AMD,
        }
    }

    /// The quirks of the CPU this process runs on.
    pub fn host() -> Quirks {
        let mut q = Quirks::of(Vendor::host());
        #[cfg(target_arch = "x86_64")]
        if Vendor::host() == Vendor::Amd {
            use std::arch::x86_64::__cpuid;
            let family = {
                let eax = __cpuid(1).eax;
                ((eax >> 8) & 0xf)
                    + if (eax >> 8) & 0xf == 0xf {
                        (eax >> 20) & 0xff
                    } else {
                        0
                    }
            };
            let leaf21 =
                __cpuid(0x8000_0000).eax >= 0x8000_0021 && __cpuid(0x8000_0021).eax & (1 << 6) != 0;
            // Zen 3 (family 0x19) and later clear it even where a
            // hypervisor hides leaf 0x8000_0021.
            q.null_selector_clears_base = leaf21 || family >= 0x19;
        }
        q
    }
}

impl Default for Quirks {
    fn default() -> Self {
        Quirks::INTEL
    }
}
