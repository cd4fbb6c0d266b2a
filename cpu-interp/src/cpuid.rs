//! duet's CPUID table for the interpreter.
//!
//! It advertises exactly what the interpreter implements and nothing more;
//! adding a feature bit here is a promise, backed by unit tests of the
//! instructions it covers. The table is documented in docs/CPUID.md.

/// Knobs the machine sets (per vCPU).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuidConfig {
    /// Initial APIC ID reported in leaf 1 EBX[31:24] (and leaf 0xb).
    pub apic_id: u32,
    /// Advertise a local APIC (CPUID.1:EDX.APIC).
    pub apic: bool,
    /// TSC frequency in kHz, for leaves 0x15/0x16 (None hides them).
    pub tsc_khz: Option<u32>,
    /// The core crystal clock (Hz) of leaf 0x15: the local APIC timer's
    /// input, which Linux takes from here instead of calibrating.
    pub crystal_hz: u32,
    /// Advertise x2APIC (the machine's local APIC model answers the MSRs).
    pub x2apic: bool,
    /// Advertise the TSC-deadline timer mode.
    pub tsc_deadline: bool,
}

pub mod leaf1_edx {
    pub const FPU: u32 = 1 << 0;
    pub const VME: u32 = 1 << 1;
    pub const DE: u32 = 1 << 2;
    pub const PSE: u32 = 1 << 3;
    pub const TSC: u32 = 1 << 4;
    pub const MSR: u32 = 1 << 5;
    pub const PAE: u32 = 1 << 6;
    pub const MCE: u32 = 1 << 7;
    pub const CX8: u32 = 1 << 8;
    pub const APIC: u32 = 1 << 9;
    pub const SEP: u32 = 1 << 11;
    pub const MTRR: u32 = 1 << 12;
    pub const PGE: u32 = 1 << 13;
    pub const MCA: u32 = 1 << 14;
    pub const CMOV: u32 = 1 << 15;
    pub const PAT: u32 = 1 << 16;
    pub const PSE36: u32 = 1 << 17;
    pub const CLFSH: u32 = 1 << 19;
    pub const MMX: u32 = 1 << 23;
    pub const FXSR: u32 = 1 << 24;
    pub const SSE: u32 = 1 << 25;
    pub const SSE2: u32 = 1 << 26;
}

pub mod leaf1_ecx {
    pub const SSE3: u32 = 1 << 0;
    pub const SSSE3: u32 = 1 << 9;
    pub const CX16: u32 = 1 << 13;
    pub const X2APIC: u32 = 1 << 21;
    pub const POPCNT: u32 = 1 << 23;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const HYPERVISOR: u32 = 1 << 31;
}

pub mod ext1_edx {
    pub const SYSCALL: u32 = 1 << 11;
    pub const NX: u32 = 1 << 20;
    pub const PDPE1GB: u32 = 1 << 26;
    pub const RDTSCP: u32 = 1 << 27;
    pub const LM: u32 = 1 << 29;
}

pub mod ext1_ecx {
    pub const LAHF_LM: u32 = 1 << 0;
}

/// Feature bits the interpreter implements today.
pub const LEAF1_EDX: u32 = {
    use leaf1_edx::*;
    FPU | PSE
        | TSC
        | MSR
        | PAE
        | MCE
        | CX8
        | SEP
        | MTRR
        | PGE
        | MCA
        | CMOV
        | PAT
        | PSE36
        | CLFSH
        | MMX
        | FXSR
        | SSE
        | SSE2
};
pub const LEAF1_ECX: u32 = {
    use leaf1_ecx::*;
    SSE3 | SSSE3 | CX16 | POPCNT | HYPERVISOR
};
pub const EXT1_EDX: u32 = {
    use ext1_edx::*;
    SYSCALL | NX | PDPE1GB | RDTSCP | LM
};
pub const EXT1_ECX: u32 = ext1_ecx::LAHF_LM;

const MAX_BASIC: u32 = 0x16;
const MAX_EXT: u32 = 0x8000_0008;
/// "duet virtual CPU" padded to 48 bytes.
const BRAND: &[u8; 48] =
    b"duet virtual CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

/// Family 6, model 0x0f, stepping 1 (a Core 2-era signature: new enough for
/// Linux to trust PAT, old enough to carry no model-specific quirks).
const SIGNATURE: u32 = (6 << 8) | (0xf << 4) | 1;

fn str_regs(s: &[u8]) -> [u32; 3] {
    let w = |k: usize| u32::from_le_bytes([s[k], s[k + 1], s[k + 2], s[k + 3]]);
    [w(0), w(4), w(8)]
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

/// CPUID(`leaf`, `subleaf`) → [EAX, EBX, ECX, EDX].
pub fn query(cfg: &CpuidConfig, leaf: u32, subleaf: u32) -> [u32; 4] {
    match leaf {
        0 => {
            let v = str_regs(b"GenuineIntel");
            // EBX, EDX, ECX order: "Genu" "ineI" "ntel".
            [MAX_BASIC, v[0], v[2], v[1]]
        }
        1 => {
            let ebx = (cfg.apic_id << 24) | (1 << 16) | (8 << 8);
            let mut edx = LEAF1_EDX;
            let mut ecx = LEAF1_ECX;
            if cfg.apic {
                edx |= leaf1_edx::APIC;
                if cfg.x2apic {
                    ecx |= leaf1_ecx::X2APIC;
                }
                if cfg.tsc_deadline {
                    ecx |= leaf1_ecx::TSC_DEADLINE;
                }
            }
            [SIGNATURE, ebx, ecx, edx]
        }
        // Deterministic cache parameters: report no caches.
        4 => [0, 0, 0, 0],
        7 => [0, 0, 0, 0],
        0xb => {
            // x2APIC topology: one thread, one core.
            match subleaf {
                0 => [0, 1, 0x100, cfg.apic_id],
                1 => [0, 1, 0x201 | (subleaf & 0xff), cfg.apic_id],
                _ => [0, 0, subleaf & 0xff, cfg.apic_id],
            }
        }
        0x15 => match cfg.tsc_khz {
            // TSC = crystal × EBX / EAX, with the crystal in ECX (Hz). The
            // ratio is kept reduced: Linux multiplies crystal kHz by EBX in
            // 32 bits.
            Some(khz) if cfg.crystal_hz >= 1000 && khz > 0 => {
                let crystal_khz = cfg.crystal_hz / 1000;
                let g = gcd(khz, crystal_khz);
                [crystal_khz / g, khz / g, cfg.crystal_hz, 0]
            }
            _ => [0, 0, 0, 0],
        },
        0x16 => match cfg.tsc_khz {
            // Base and maximum frequency, bus (reference) frequency, in MHz.
            Some(khz) => [khz / 1000, khz / 1000, cfg.crystal_hz / 1_000_000, 0],
            None => [0, 0, 0, 0],
        },
        2 | 3 | 5 | 6 | 8..=0xa | 0xc..=0x14 => [0, 0, 0, 0],
        0x8000_0000 => [MAX_EXT, 0, 0, 0],
        0x8000_0001 => [0, 0, EXT1_ECX, EXT1_EDX],
        0x8000_0002..=0x8000_0004 => {
            let k = (leaf - 0x8000_0002) as usize * 16;
            let b = &BRAND[k..k + 16];
            let w = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
        0x8000_0005..=0x8000_0007 => [0, 0, 0, 0],
        0x8000_0008 => [crate::mmu::PHYS_ADDR_BITS | (48 << 8), 0, 0, 0],
        // Intel returns the highest basic leaf's data for out-of-range leaves.
        l if l > MAX_BASIC && l < 0x8000_0000 => query(cfg, MAX_BASIC, subleaf),
        _ => query(cfg, MAX_BASIC, subleaf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_and_signature() {
        let c = CpuidConfig::default();
        let r = query(&c, 0, 0);
        let mut s = Vec::new();
        for w in [r[1], r[3], r[2]] {
            s.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&s, b"GenuineIntel");
        assert_eq!(query(&c, 1, 0)[0] >> 8 & 0xf, 6);
    }

    #[test]
    fn long_mode_and_brand() {
        let c = CpuidConfig::default();
        assert_ne!(query(&c, 0x8000_0001, 0)[3] & ext1_edx::LM, 0);
        let mut brand = Vec::new();
        for l in 0x8000_0002..=0x8000_0004 {
            for w in query(&c, l, 0) {
                brand.extend_from_slice(&w.to_le_bytes());
            }
        }
        assert!(brand.starts_with(b"duet virtual CPU"));
    }

    #[test]
    fn tsc_leaves_give_linux_the_frequencies() {
        let c = CpuidConfig {
            tsc_khz: Some(2_000_000),
            crystal_hz: 1_000_000_000,
            ..Default::default()
        };
        let [eax, ebx, ecx, _] = query(&c, 0x15, 0);
        // Linux: tsc_khz = crystal_khz * ebx / eax, computed in 32 bits.
        let khz = (ecx / 1000).checked_mul(ebx).expect("no 32-bit overflow") / eax;
        assert_eq!(khz, 2_000_000);
        assert_eq!(query(&c, 0x16, 0)[0], 2000);
        assert_eq!(query(&CpuidConfig::default(), 0x15, 0), [0; 4]);
    }

    #[test]
    fn apic_bit_follows_config() {
        let mut c = CpuidConfig::default();
        assert_eq!(query(&c, 1, 0)[3] & leaf1_edx::APIC, 0);
        c.apic = true;
        c.apic_id = 3;
        assert_ne!(query(&c, 1, 0)[3] & leaf1_edx::APIC, 0);
        assert_eq!(query(&c, 1, 0)[1] >> 24, 3);
    }
}
