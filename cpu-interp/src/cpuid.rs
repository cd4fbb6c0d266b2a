//! duet's CPUID table for the interpreter.
//!
//! It advertises exactly what the interpreter implements and nothing more;
//! adding a feature bit here is a promise, backed by unit tests of the
//! instructions it covers. The table is documented in docs/CPUID.md.

/// Instruction-set extensions a CPU model has: bits of [`Features`].
pub mod feat {
    pub const SSE3: u32 = 1 << 0;
    pub const SSSE3: u32 = 1 << 1;
    pub const CX16: u32 = 1 << 2;
    pub const POPCNT: u32 = 1 << 3;
    /// LAHF/SAHF in 64-bit mode.
    pub const LAHF_LM: u32 = 1 << 4;
    pub const SSE4_1: u32 = 1 << 5;
    pub const SSE4_2: u32 = 1 << 6;
    pub const XSAVE: u32 = 1 << 7;
    pub const AVX: u32 = 1 << 8;
    pub const AVX2: u32 = 1 << 9;
    pub const FMA: u32 = 1 << 10;
    pub const F16C: u32 = 1 << 11;
    pub const BMI1: u32 = 1 << 12;
    pub const BMI2: u32 = 1 << 13;
    pub const LZCNT: u32 = 1 << 14;
    pub const MOVBE: u32 = 1 << 15;
    pub const AES: u32 = 1 << 16;
    pub const PCLMULQDQ: u32 = 1 << 17;
    pub const XSAVEOPT: u32 = 1 << 18;
    pub const XSAVEC: u32 = 1 << 19;
    /// XGETBV with ECX = 1 (XINUSE).
    pub const XGETBV1: u32 = 1 << 20;
    pub const XSAVES: u32 = 1 << 21;
    /// Every extension bit.
    pub const ALL: u32 = (1 << 22) - 1;
    /// Instructions of extensions the interpreter does not model: never
    /// enabled.
    pub const UNSUPPORTED: u32 = 1 << 31;
    /// The extensions the interpreter implements completely (what `max`
    /// offers; an extension joins when all its instructions are in and
    /// tested against the hardware oracle).
    /// All of them now: x86-64-v2 and v3, AES-NI, PCLMULQDQ and the
    /// XSAVE family, each checked against the hardware oracle by the
    /// difftest (docs/DIFFTEST.md).
    pub const IMPLEMENTED: u32 = ALL;
}

/// A set of [`feat`] bits.
pub type Features = u32;

/// The CPU models of `--cpu`: the x86-64 micro-architecture levels of the
/// psABI (as QEMU's `-cpu x86-64-v2` etc.) and everything implemented.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuModel {
    /// The x86-64 baseline: SSE2, no SSE3.
    V1,
    /// + SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, CMPXCHG16B, LAHF/SAHF.
    V2,
    /// + AVX, AVX2, BMI1, BMI2, FMA, F16C, LZCNT, MOVBE, XSAVE.
    V3,
    /// Everything the interpreter implements: v3 + AES-NI, PCLMULQDQ,
    /// XSAVEOPT, XSAVEC (with XGETBV ECX=1) and XSAVES.
    #[default]
    Max,
}

impl CpuModel {
    pub const ALL: [CpuModel; 4] = [CpuModel::V1, CpuModel::V2, CpuModel::V3, CpuModel::Max];

    /// The extensions of the model.
    pub fn features(self) -> Features {
        use feat::*;
        let v2 = SSE3 | SSSE3 | CX16 | POPCNT | LAHF_LM | SSE4_1 | SSE4_2;
        let v3 = v2 | XSAVE | AVX | AVX2 | FMA | F16C | BMI1 | BMI2 | LZCNT | MOVBE;
        match self {
            CpuModel::V1 => 0,
            CpuModel::V2 => v2,
            CpuModel::V3 => v3,
            CpuModel::Max => IMPLEMENTED,
        }
    }

    /// Does the interpreter implement every extension of this model?
    pub fn implemented(self) -> bool {
        self.features() & !feat::IMPLEMENTED == 0
    }

    /// The `--cpu` name.
    pub fn name(self) -> &'static str {
        match self {
            CpuModel::V1 => "x86-64-v1",
            CpuModel::V2 => "x86-64-v2",
            CpuModel::V3 => "x86-64-v3",
            CpuModel::Max => "max",
        }
    }

    /// Parse a `--cpu` name (`x86-64-v2`, `v2`, `max`, ...).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_prefix("x86-64-").unwrap_or(&s);
        Some(match s {
            "v1" | "x86-64" => CpuModel::V1,
            "v2" => CpuModel::V2,
            "v3" => CpuModel::V3,
            "max" | "host" => CpuModel::Max,
            _ => return None,
        })
    }
}

impl std::fmt::Display for CpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// XSAVE state components the interpreter implements: x87, SSE, AVX.
pub const XCR0_X87: u64 = 1;
pub const XCR0_SSE: u64 = 2;
pub const XCR0_AVX: u64 = 4;

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
    /// Which instruction-set extensions to advertise (and execute).
    pub model: CpuModel,
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
    pub const PCLMULQDQ: u32 = 1 << 1;
    pub const SSSE3: u32 = 1 << 9;
    pub const FMA: u32 = 1 << 12;
    pub const CX16: u32 = 1 << 13;
    pub const SSE4_1: u32 = 1 << 19;
    pub const SSE4_2: u32 = 1 << 20;
    pub const X2APIC: u32 = 1 << 21;
    pub const MOVBE: u32 = 1 << 22;
    pub const POPCNT: u32 = 1 << 23;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const AES: u32 = 1 << 25;
    pub const XSAVE: u32 = 1 << 26;
    pub const OSXSAVE: u32 = 1 << 27;
    pub const AVX: u32 = 1 << 28;
    pub const F16C: u32 = 1 << 29;
    pub const HYPERVISOR: u32 = 1 << 31;
}

pub mod leaf7_ebx {
    pub const BMI1: u32 = 1 << 3;
    pub const AVX2: u32 = 1 << 5;
    pub const BMI2: u32 = 1 << 8;
}

pub mod leaf7_edx {
    /// IA32_ARCH_CAPABILITIES (MSR 0x10a) is there.
    pub const ARCH_CAPABILITIES: u32 = 1 << 29;
}

/// Bits of IA32_ARCH_CAPABILITIES (MSR 0x10a).
pub mod arch_cap {
    /// Not susceptible to Rogue Data Cache Load (Meltdown).
    pub const RDCL_NO: u64 = 1 << 0;
    /// Not susceptible to Speculative Store Bypass.
    pub const SSB_NO: u64 = 1 << 4;
    /// Not susceptible to Microarchitectural Data Sampling.
    pub const MDS_NO: u64 = 1 << 5;
    /// No machine check on a page-size change without a TLB invalidation
    /// (iTLB multihit).
    pub const PSCHANGE_MC_NO: u64 = 1 << 6;
    /// Not susceptible to TSX Asynchronous Abort.
    pub const TAA_NO: u64 = 1 << 8;
    /// Not susceptible to the MMIO stale-data vulnerabilities (shared
    /// buffers data read, fill-buffer and primary stale-data propagation).
    pub const SBDR_SSDP_NO: u64 = 1 << 13;
    pub const FBSDP_NO: u64 = 1 << 14;
    pub const PSDP_NO: u64 = 1 << 15;
    /// Not susceptible to Branch History Injection.
    pub const BHI_NO: u64 = 1 << 20;
    /// Not susceptible to Post-Barrier Return Stack Buffer Predictions.
    pub const PBRSB_NO: u64 = 1 << 24;
    /// Not susceptible to Gather Data Sampling.
    pub const GDS_NO: u64 = 1 << 26;
    /// Not susceptible to Register File Data Sampling.
    pub const RFDS_NO: u64 = 1 << 27;
    /// Not susceptible to Indirect Target Selection.
    pub const ITS_NO: u64 = 1 << 62;
}

/// What the interpreter's IA32_ARCH_CAPABILITIES reads, in every CPU
/// model: the "not susceptible" bits that are true of an interpreter.
/// It executes no instruction speculatively and has no caches, fill or
/// store buffers, branch predictors or return stack buffer that could
/// leak or be trained, so every transient-execution attack these bits
/// name is impossible on it. Left clear: the bits that announce a
/// vulnerability or a mitigation control (RSBA, RRSBA, IBRS_ALL,
/// FB_CLEAR, TSX_CTRL, GDS_CTRL, RFDS_CLEAR, ...), since the MSRs and
/// behaviour they promise are not modelled, and SKIP_L1DFL_VMENTRY
/// (about nested VMX, which the interpreter has no part of). Linux reads
/// it to skip page-table isolation (RDCL_NO), VERW buffer clearing on
/// every return to user space (MDS_NO) and the BHB-clearing loop on
/// every system call (BHI_NO); see docs/CPUID.md.
pub const ARCH_CAPABILITIES: u64 = {
    use arch_cap::*;
    RDCL_NO
        | SSB_NO
        | MDS_NO
        | PSCHANGE_MC_NO
        | TAA_NO
        | SBDR_SSDP_NO
        | FBSDP_NO
        | PSDP_NO
        | BHI_NO
        | PBRSB_NO
        | GDS_NO
        | RFDS_NO
        | ITS_NO
};

/// CPUID.(0xD, 1):EAX.
pub mod leafd1_eax {
    pub const XSAVEOPT: u32 = 1 << 0;
    pub const XSAVEC: u32 = 1 << 1;
    pub const XGETBV1: u32 = 1 << 2;
    pub const XSAVES: u32 = 1 << 3;
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
    /// LZCNT.
    pub const ABM: u32 = 1 << 5;
}

/// CPUID feature bits of each extension: (leaf 1 ECX, leaf 7 EBX,
/// 0x8000_0001 ECX, leaf 0xD.1 EAX).
const FEATURE_BITS: [(u32, u32, u32, u32, u32); 22] = {
    use feat::*;
    [
        (SSE3, leaf1_ecx::SSE3, 0, 0, 0),
        (SSSE3, leaf1_ecx::SSSE3, 0, 0, 0),
        (CX16, leaf1_ecx::CX16, 0, 0, 0),
        (POPCNT, leaf1_ecx::POPCNT, 0, 0, 0),
        (LAHF_LM, 0, 0, ext1_ecx::LAHF_LM, 0),
        (SSE4_1, leaf1_ecx::SSE4_1, 0, 0, 0),
        (SSE4_2, leaf1_ecx::SSE4_2, 0, 0, 0),
        (XSAVE, leaf1_ecx::XSAVE, 0, 0, 0),
        (AVX, leaf1_ecx::AVX, 0, 0, 0),
        (AVX2, 0, leaf7_ebx::AVX2, 0, 0),
        (FMA, leaf1_ecx::FMA, 0, 0, 0),
        (F16C, leaf1_ecx::F16C, 0, 0, 0),
        (BMI1, 0, leaf7_ebx::BMI1, 0, 0),
        (BMI2, 0, leaf7_ebx::BMI2, 0, 0),
        (LZCNT, 0, 0, ext1_ecx::ABM, 0),
        (MOVBE, leaf1_ecx::MOVBE, 0, 0, 0),
        (AES, leaf1_ecx::AES, 0, 0, 0),
        (PCLMULQDQ, leaf1_ecx::PCLMULQDQ, 0, 0, 0),
        (XSAVEOPT, 0, 0, 0, leafd1_eax::XSAVEOPT),
        (XSAVEC, 0, 0, 0, leafd1_eax::XSAVEC),
        (XGETBV1, 0, 0, 0, leafd1_eax::XGETBV1),
        (XSAVES, 0, 0, 0, leafd1_eax::XSAVES),
    ]
};

/// The CPUID bits of `f`: (leaf 1 ECX, leaf 7 EBX, 0x8000_0001 ECX,
/// leaf 0xD.1 EAX).
pub fn feature_bits(f: Features) -> (u32, u32, u32, u32) {
    FEATURE_BITS
        .iter()
        .filter(|e| f & e.0 != 0)
        .fold((0, 0, 0, 0), |a, e| {
            (a.0 | e.1, a.1 | e.2, a.2 | e.3, a.3 | e.4)
        })
}

/// The XCR0 bits (state components) a model supports.
pub fn xcr0_supported(f: Features) -> u64 {
    if f & feat::XSAVE == 0 {
        0
    } else if f & feat::AVX != 0 {
        XCR0_X87 | XCR0_SSE | XCR0_AVX
    } else {
        XCR0_X87 | XCR0_SSE
    }
}

/// Size of a standard-format XSAVE area for the components in `xcr0`
/// (legacy region, header, and AVX at offset 576).
pub fn xsave_size(xcr0: u64) -> u32 {
    if xcr0 & XCR0_AVX != 0 {
        576 + 256
    } else {
        576
    }
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
/// Leaf 1 ECX bits every model has (the rest come from [`feature_bits`]).
pub const LEAF1_ECX: u32 = leaf1_ecx::HYPERVISOR;
pub const EXT1_EDX: u32 = {
    use ext1_edx::*;
    SYSCALL | NX | PDPE1GB | RDTSCP | LM
};
/// 0x8000_0001 ECX bits every model has.
pub const EXT1_ECX: u32 = 0;

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

/// Architectural state CPUID reports from: CR4.OSXSAVE, XCR0, IA32_XSS.
#[derive(Clone, Copy, Debug, Default)]
pub struct Dynamic {
    pub osxsave: bool,
    pub xcr0: u64,
    pub xss: u64,
}

/// CPUID(`leaf`, `subleaf`) → [EAX, EBX, ECX, EDX], for a CPU in its
/// initial configuration (XSAVE disabled, XCR0 = 1).
pub fn query(cfg: &CpuidConfig, leaf: u32, subleaf: u32) -> [u32; 4] {
    query_with(
        cfg,
        &Dynamic {
            osxsave: false,
            xcr0: 1,
            xss: 0,
        },
        leaf,
        subleaf,
    )
}

/// CPUID(`leaf`, `subleaf`) with the bits that follow CR4.OSXSAVE, XCR0
/// and IA32_XSS.
pub fn query_with(cfg: &CpuidConfig, dy: &Dynamic, leaf: u32, subleaf: u32) -> [u32; 4] {
    let f = cfg.model.features();
    let (l1c, l7b, e1c, d1a) = feature_bits(f);
    match leaf {
        0 => {
            let v = str_regs(b"GenuineIntel");
            // EBX, EDX, ECX order: "Genu" "ineI" "ntel".
            [MAX_BASIC, v[0], v[2], v[1]]
        }
        1 => {
            let ebx = (cfg.apic_id << 24) | (1 << 16) | (8 << 8);
            let mut edx = LEAF1_EDX;
            let mut ecx = LEAF1_ECX | l1c;
            if dy.osxsave && f & feat::XSAVE != 0 {
                ecx |= leaf1_ecx::OSXSAVE;
            }
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
        7 => match subleaf {
            // ARCH_CAPABILITIES in every model: it describes the
            // interpreter, not an instruction-set level.
            0 => [0, l7b, 0, leaf7_edx::ARCH_CAPABILITIES],
            _ => [0, 0, 0, 0],
        },
        0xd if f & feat::XSAVE != 0 => {
            let sup = xcr0_supported(f);
            match subleaf {
                0 => [
                    sup as u32,
                    xsave_size(dy.xcr0),
                    xsave_size(sup),
                    (sup >> 32) as u32,
                ],
                // No supervisor state components (IA32_XSS stays 0): the
                // compacted size for XCR0 | IA32_XSS is the standard one.
                1 => [
                    d1a,
                    if f & feat::XSAVES != 0 {
                        xsave_size(dy.xcr0 | dy.xss)
                    } else {
                        0
                    },
                    0,
                    0,
                ],
                2 if sup & XCR0_AVX != 0 => [256, 576, 0, 0],
                _ => [0, 0, 0, 0],
            }
        }
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
        0x8000_0001 => [0, 0, EXT1_ECX | e1c, EXT1_EDX],
        0x8000_0002..=0x8000_0004 => {
            let k = (leaf - 0x8000_0002) as usize * 16;
            let b = &BRAND[k..k + 16];
            let w = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
        0x8000_0005..=0x8000_0007 => [0, 0, 0, 0],
        0x8000_0008 => [crate::mmu::PHYS_ADDR_BITS | (48 << 8), 0, 0, 0],
        // Intel returns the highest basic leaf's data for out-of-range leaves.
        l if l > MAX_BASIC && l < 0x8000_0000 => query_with(cfg, dy, MAX_BASIC, subleaf),
        _ => query_with(cfg, dy, MAX_BASIC, subleaf),
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

    /// Every `--cpu` model advertises IA32_ARCH_CAPABILITIES; RDMSR reads
    /// the "not susceptible" bits Linux checks before it turns on page-table
    /// isolation, VERW clearing and the BHB loop; WRMSR #GPs. A KVM guest's
    /// fallback interpreter claims nothing of its own.
    #[test]
    fn every_model_reports_arch_capabilities() {
        use crate::platform::NullPlatform;
        use crate::state::msr;
        for model in CpuModel::ALL {
            let c = CpuidConfig {
                model,
                ..Default::default()
            };
            assert_ne!(
                query(&c, 7, 0)[3] & leaf7_edx::ARCH_CAPABILITIES,
                0,
                "{model}"
            );
            let mut cpu = crate::insn::testutil::new_cpu();
            cpu.set_cpuid_config(c);
            let v = cpu
                .read_msr(&mut NullPlatform, msr::ARCH_CAPABILITIES)
                .expect("RDMSR 0x10a");
            for bit in [arch_cap::RDCL_NO, arch_cap::MDS_NO, arch_cap::BHI_NO] {
                assert_ne!(v & bit, 0, "{model}: {v:#x} lacks {bit:#x}");
            }
            assert!(cpu
                .write_msr(&mut NullPlatform, msr::ARCH_CAPABILITIES, v)
                .is_err());
            cpu.set_host_features(true);
            assert_eq!(
                cpu.read_msr(&mut NullPlatform, msr::ARCH_CAPABILITIES),
                None
            );
        }
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
