//! Behaviour that differs between x86 processors.
//!
//! duet's interpreter is one CPU: an Intel-flavoured x86-64 (its CPUID
//! says `GenuineIntel`, see [`crate::cpuid`]) and by default it behaves as
//! Intel's processors do. Where processors differ on something a program
//! can observe — mostly corners the manuals leave open — the choice is a
//! field of [`Quirks`], so that the differential harness can check the
//! interpreter against whichever CPU it runs on, and the KVM backend's
//! fallback can execute an instruction the way the host CPU the guest
//! otherwise runs on would.
//!
//! The choices are not per vendor but per processor: a Sapphire Rapids and
//! an Emerald Rapids Xeon disagree on when an MMX instruction switches the
//! x87 unit to MMX state, a Zen 3 and a Zen 4 EPYC on the order of a
//! faulting CMPS's accesses. [`Quirks::for_cpu`] starts from the vendor's
//! base set and applies every row of [`QUIRK_TABLE`] that matches the
//! processor's family and model, in order; each row names the processor
//! it was seen on. The differential harness goes one step further and
//! probes the behaviours it can on the CPU itself (`duet difftest` prints
//! which came from a probe and which from the table).

use std::fmt;

/// The processor-specific choices, each named for what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// in MMX state (seen on Sapphire Rapids); otherwise after the access
    /// (AMD, and Emerald Rapids). Both switch before a SIMD exception of
    /// CVTPS2PI and friends.
    pub mmx_switch_before_fault: bool,
    /// An MMX *store* (MOVD/MOVQ/MOVNTQ to memory) sets TOP to 0 before
    /// its memory access, so a #PF on the store leaves TOP = 0 (Sapphire
    /// Rapids, Emerald Rapids); AMD afterwards.
    pub mmx_store_top_before_fault: bool,
    /// An MMX store marks all tags valid before its memory access
    /// (Sapphire Rapids); afterwards on Emerald Rapids (which resets TOP
    /// first, see [`Self::mmx_store_top_before_fault`]) and AMD.
    pub mmx_store_tags_before_fault: bool,
    /// An 80-bit store (FSTP m80, FBSTP) is an 8-byte store and then a
    /// 2-byte one, so that a #PF on its last two bytes comes after the
    /// first eight are written (Intel); AMD checks all ten bytes first.
    pub m80_store_split: bool,
    /// CMPS reads DS:[rSI] before ES:[rDI], so that when both fault the
    /// source's fault is reported (seen on Zen 4); otherwise ES:[rDI]
    /// first (Sapphire Rapids, Emerald Rapids, Zen 3).
    pub cmps_source_first: bool,
    /// When both operands of an x87 arithmetic instruction (FADD … FDIVR)
    /// are QNaNs and one of them is the real indefinite, the result is the
    /// indefinite (seen on Zen 4, after a masked stack overflow had left
    /// the indefinite in ST(0)); otherwise the SDM's rule, the QNaN with
    /// the larger significand.
    pub x87_indefinite_wins: bool,
    /// An x87 store (FST/FIST/FISTTP/FBSTP) whose result an unmasked
    /// exception suppresses still checks its destination, so that a #PF
    /// there comes first (Sapphire Rapids, Zen 3); Emerald Rapids skips
    /// the check and reports the x87 exception alone.
    pub suppressed_store_checks_destination: bool,
}

/// One field of [`Quirks`], for the data-driven [`QUIRK_TABLE`] and for
/// reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Quirk {
    RepFaultRestoresFlags,
    Movsxd16ReadsDword,
    NullSelectorClearsBase,
    MmxSwitchBeforeFault,
    MmxStoreTopBeforeFault,
    MmxStoreTagsBeforeFault,
    M80StoreSplit,
    CmpsSourceFirst,
    X87IndefiniteWins,
    SuppressedStoreChecksDestination,
}

impl Quirk {
    pub const ALL: [Quirk; 10] = [
        Quirk::RepFaultRestoresFlags,
        Quirk::Movsxd16ReadsDword,
        Quirk::NullSelectorClearsBase,
        Quirk::MmxSwitchBeforeFault,
        Quirk::MmxStoreTopBeforeFault,
        Quirk::MmxStoreTagsBeforeFault,
        Quirk::M80StoreSplit,
        Quirk::CmpsSourceFirst,
        Quirk::X87IndefiniteWins,
        Quirk::SuppressedStoreChecksDestination,
    ];

    /// The field name in [`Quirks`].
    pub fn name(self) -> &'static str {
        match self {
            Quirk::RepFaultRestoresFlags => "rep_fault_restores_flags",
            Quirk::Movsxd16ReadsDword => "movsxd16_reads_dword",
            Quirk::NullSelectorClearsBase => "null_selector_clears_base",
            Quirk::MmxSwitchBeforeFault => "mmx_switch_before_fault",
            Quirk::MmxStoreTopBeforeFault => "mmx_store_top_before_fault",
            Quirk::MmxStoreTagsBeforeFault => "mmx_store_tags_before_fault",
            Quirk::M80StoreSplit => "m80_store_split",
            Quirk::CmpsSourceFirst => "cmps_source_first",
            Quirk::X87IndefiniteWins => "x87_indefinite_wins",
            Quirk::SuppressedStoreChecksDestination => "suppressed_store_checks_destination",
        }
    }
}

impl fmt::Display for Quirk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A CPU vendor, as far as [`Quirks`] tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Vendor {
    Intel,
    Amd,
}

impl Vendor {
    /// The vendor of the CPU this process runs on (Intel for anything that
    /// is neither `GenuineIntel` nor `AuthenticAMD`/`HygonGenuine`).
    pub fn host() -> Vendor {
        CpuModel::host().vendor
    }

    pub fn name(self) -> &'static str {
        match self {
            Vendor::Intel => "Intel",
            Vendor::Amd => "AMD",
        }
    }
}

/// A processor as CPUID identifies it: vendor, display family and model
/// (the extended fields folded in, as the SDM and the APM compute them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CpuModel {
    pub vendor: Vendor,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    /// CPUID 0x8000_0021:EAX[6] ("null selector clears base"), where the
    /// leaf exists.
    pub null_sel_clears_base_bit: bool,
}

impl CpuModel {
    /// Decode a vendor string and CPUID.1:EAX.
    pub fn from_signature(vendor: &[u8; 12], eax1: u32) -> CpuModel {
        let vendor = if vendor == b"AuthenticAMD" || vendor == b"HygonGenuine" {
            Vendor::Amd
        } else {
            Vendor::Intel
        };
        let base_family = (eax1 >> 8) & 0xf;
        let base_model = (eax1 >> 4) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((eax1 >> 20) & 0xff)
        } else {
            base_family
        };
        let model = if base_family == 0xf || base_family == 0x6 {
            base_model | (((eax1 >> 16) & 0xf) << 4)
        } else {
            base_model
        };
        CpuModel {
            vendor,
            family,
            model,
            stepping: eax1 & 0xf,
            null_sel_clears_base_bit: false,
        }
    }

    /// The CPU this process runs on.
    pub fn host() -> CpuModel {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::__cpuid;
            // CPUID is available on every x86-64 CPU; leaf 0 always exists.
            let r = __cpuid(0);
            let mut v = [0u8; 12];
            v[..4].copy_from_slice(&r.ebx.to_le_bytes());
            v[4..8].copy_from_slice(&r.edx.to_le_bytes());
            v[8..].copy_from_slice(&r.ecx.to_le_bytes());
            let mut m = CpuModel::from_signature(&v, __cpuid(1).eax);
            m.null_sel_clears_base_bit =
                __cpuid(0x8000_0000).eax >= 0x8000_0021 && __cpuid(0x8000_0021).eax & (1 << 6) != 0;
            m
        }
        #[cfg(not(target_arch = "x86_64"))]
        CpuModel {
            vendor: Vendor::Intel,
            family: 6,
            model: 0,
            stepping: 0,
            null_sel_clears_base_bit: false,
        }
    }

    /// A short name for reports ("Intel family 6 model 0xcf").
    pub fn describe(&self) -> String {
        format!(
            "{} family {:#x} model {:#x} stepping {}",
            self.vendor.name(),
            self.family,
            self.model,
            self.stepping
        )
    }
}

/// Which processors a [`QuirkRow`] applies to.
#[derive(Clone, Copy, Debug)]
pub struct CpuMatch {
    pub vendor: Vendor,
    /// Inclusive family range.
    pub families: (u32, u32),
    /// Inclusive model ranges (any model when empty).
    pub models: &'static [(u32, u32)],
}

impl CpuMatch {
    pub fn matches(&self, cpu: &CpuModel) -> bool {
        cpu.vendor == self.vendor
            && (self.families.0..=self.families.1).contains(&cpu.family)
            && (self.models.is_empty()
                || self
                    .models
                    .iter()
                    .any(|(lo, hi)| (*lo..=*hi).contains(&cpu.model)))
    }
}

/// One row of the quirk table: on processors matching `cpu`, set these
/// quirks. `seen_on` says which processor (and when) showed it, or why the
/// row extends a finding to its neighbours.
#[derive(Clone, Copy, Debug)]
pub struct QuirkRow {
    pub cpu: CpuMatch,
    pub set: &'static [(Quirk, bool)],
    pub seen_on: &'static str,
}

/// Zen 4 models of family 0x19 (Genoa, Raphael, Phoenix, Bergamo, Siena).
const ZEN4_MODELS: &[(u32, u32)] = &[(0x10, 0x1f), (0x60, 0x7f), (0xa0, 0xaf)];

/// The table, applied in order over the vendor's base set (later rows
/// win). docs/DIFFTEST.md ("Processor differences") has the same rows with
/// the difftest runs that found them.
pub const QUIRK_TABLE: &[QuirkRow] = &[
    QuirkRow {
        cpu: CpuMatch {
            vendor: Vendor::Intel,
            families: (6, 6),
            models: &[(0xcf, 0xcf)],
        },
        set: &[
            (Quirk::MmxSwitchBeforeFault, false),
            (Quirk::MmxStoreTagsBeforeFault, false),
            (Quirk::SuppressedStoreChecksDestination, false),
        ],
        seen_on: "Emerald Rapids Xeon (family 6 model 0xcf), 2026-12-06: a faulting \
                  MMX load leaves TOP and the tags alone, a faulting MMX store sets TOP \
                  to 0 but leaves the tags; an x87 store suppressed by an unmasked \
                  exception does not check its destination",
    },
    QuirkRow {
        cpu: CpuMatch {
            vendor: Vendor::Amd,
            families: (0x19, 0xff),
            models: &[],
        },
        set: &[(Quirk::NullSelectorClearsBase, true)],
        seen_on: "EPYC Zen 3 (family 0x19), 2026-12-02; also CPUID 0x8000_0021:EAX[6] \
                  where the leaf is visible",
    },
    QuirkRow {
        cpu: CpuMatch {
            vendor: Vendor::Amd,
            families: (0x19, 0x19),
            models: ZEN4_MODELS,
        },
        set: &[
            (Quirk::CmpsSourceFirst, true),
            (Quirk::X87IndefiniteWins, true),
        ],
        seen_on: "EPYC Zen 4 (family 0x19 model 0x11), 2026-12-06: REPE CMPSB with both \
                  operands faulting reports the source; FDIVR of the indefinite and a QNaN \
                  gives the indefinite",
    },
    QuirkRow {
        cpu: CpuMatch {
            vendor: Vendor::Amd,
            families: (0x1a, 0xff),
            models: &[],
        },
        set: &[
            (Quirk::CmpsSourceFirst, true),
            (Quirk::X87IndefiniteWins, true),
        ],
        seen_on: "not seen: Zen 5 and later assumed to behave as Zen 4 (the difftest's \
                  probes settle it on the machine)",
    },
];

impl Quirks {
    /// Intel's choices (the ones duet's `GenuineIntel` CPUID promises).
    pub const INTEL: Quirks = Quirks {
        rep_fault_restores_flags: true,
        movsxd16_reads_dword: false,
        null_selector_clears_base: true,
        mmx_switch_before_fault: true,
        mmx_store_top_before_fault: true,
        mmx_store_tags_before_fault: true,
        m80_store_split: true,
        cmps_source_first: false,
        x87_indefinite_wins: false,
        suppressed_store_checks_destination: true,
    };
    /// An AMD processor before Zen 3.
    pub const AMD: Quirks = Quirks {
        rep_fault_restores_flags: false,
        movsxd16_reads_dword: true,
        null_selector_clears_base: false,
        mmx_switch_before_fault: false,
        mmx_store_top_before_fault: false,
        mmx_store_tags_before_fault: false,
        m80_store_split: false,
        cmps_source_first: false,
        x87_indefinite_wins: false,
        suppressed_store_checks_destination: true,
    };

    /// The vendor's base set.
    pub fn of(vendor: Vendor) -> Quirks {
        match vendor {
            Vendor::Intel => Quirks::INTEL,
            Vendor::Amd => Quirks::AMD,
        }
    }

    /// The choices of `cpu`: the vendor's base set, then every matching
    /// row of [`QUIRK_TABLE`] in order.
    pub fn for_cpu(cpu: &CpuModel) -> Quirks {
        Quirks::from_table(cpu, QUIRK_TABLE)
    }

    /// [`Self::for_cpu`] over another table (for tests).
    pub fn from_table(cpu: &CpuModel, table: &[QuirkRow]) -> Quirks {
        let mut q = Quirks::of(cpu.vendor);
        for row in table.iter().filter(|r| r.cpu.matches(cpu)) {
            for &(quirk, v) in row.set {
                q.set(quirk, v);
            }
        }
        if cpu.vendor == Vendor::Amd && cpu.null_sel_clears_base_bit {
            q.null_selector_clears_base = true;
        }
        q
    }

    /// The rows of [`QUIRK_TABLE`] that apply to `cpu`.
    pub fn rows_for(cpu: &CpuModel) -> Vec<&'static QuirkRow> {
        QUIRK_TABLE.iter().filter(|r| r.cpu.matches(cpu)).collect()
    }

    /// The quirks of the CPU this process runs on.
    pub fn host() -> Quirks {
        Quirks::for_cpu(&CpuModel::host())
    }

    pub fn get(&self, q: Quirk) -> bool {
        match q {
            Quirk::RepFaultRestoresFlags => self.rep_fault_restores_flags,
            Quirk::Movsxd16ReadsDword => self.movsxd16_reads_dword,
            Quirk::NullSelectorClearsBase => self.null_selector_clears_base,
            Quirk::MmxSwitchBeforeFault => self.mmx_switch_before_fault,
            Quirk::MmxStoreTopBeforeFault => self.mmx_store_top_before_fault,
            Quirk::MmxStoreTagsBeforeFault => self.mmx_store_tags_before_fault,
            Quirk::M80StoreSplit => self.m80_store_split,
            Quirk::CmpsSourceFirst => self.cmps_source_first,
            Quirk::X87IndefiniteWins => self.x87_indefinite_wins,
            Quirk::SuppressedStoreChecksDestination => self.suppressed_store_checks_destination,
        }
    }

    pub fn set(&mut self, q: Quirk, v: bool) {
        let f = match q {
            Quirk::RepFaultRestoresFlags => &mut self.rep_fault_restores_flags,
            Quirk::Movsxd16ReadsDword => &mut self.movsxd16_reads_dword,
            Quirk::NullSelectorClearsBase => &mut self.null_selector_clears_base,
            Quirk::MmxSwitchBeforeFault => &mut self.mmx_switch_before_fault,
            Quirk::MmxStoreTopBeforeFault => &mut self.mmx_store_top_before_fault,
            Quirk::MmxStoreTagsBeforeFault => &mut self.mmx_store_tags_before_fault,
            Quirk::M80StoreSplit => &mut self.m80_store_split,
            Quirk::CmpsSourceFirst => &mut self.cmps_source_first,
            Quirk::X87IndefiniteWins => &mut self.x87_indefinite_wins,
            Quirk::SuppressedStoreChecksDestination => {
                &mut self.suppressed_store_checks_destination
            }
        };
        *f = v;
    }
}

impl Default for Quirks {
    fn default() -> Self {
        Quirks::INTEL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(vendor: &[u8; 12], family: u32, model: u32) -> CpuModel {
        // Build CPUID.1:EAX the way the processors report it.
        let (bf, ef) = if family >= 0xf {
            (0xf, family - 0xf)
        } else {
            (family, 0)
        };
        let eax = (ef << 20) | ((model >> 4) << 16) | (bf << 8) | ((model & 0xf) << 4) | 1;
        CpuModel::from_signature(vendor, eax)
    }

    #[test]
    fn signatures_decode_family_and_model() {
        // Emerald Rapids: 0x000c06f1 → family 6, model 0xcf.
        let m = CpuModel::from_signature(b"GenuineIntel", 0x000c_06f1);
        assert_eq!(
            (m.vendor, m.family, m.model, m.stepping),
            (Vendor::Intel, 6, 0xcf, 1)
        );
        // Zen 4 Genoa: 0x00a10f11 → family 0x19, model 0x11.
        let m = CpuModel::from_signature(b"AuthenticAMD", 0x00a1_0f11);
        assert_eq!((m.vendor, m.family, m.model), (Vendor::Amd, 0x19, 0x11));
        // Zen 3 Milan: 0x00a00f11 → family 0x19, model 0x01.
        let m = CpuModel::from_signature(b"AuthenticAMD", 0x00a0_0f11);
        assert_eq!((m.family, m.model), (0x19, 0x01));
        // Extended model is ignored for base families other than 6 and 15.
        let m = CpuModel::from_signature(b"GenuineIntel", 0x0001_0541);
        assert_eq!((m.family, m.model), (5, 4));
    }

    #[test]
    fn each_cpu_gets_the_rows_seen_on_it() {
        let spr = Quirks::for_cpu(&cpu(b"GenuineIntel", 6, 0x8f));
        let emr = Quirks::for_cpu(&cpu(b"GenuineIntel", 6, 0xcf));
        let zen2 = Quirks::for_cpu(&cpu(b"AuthenticAMD", 0x17, 0x31));
        let zen3 = Quirks::for_cpu(&cpu(b"AuthenticAMD", 0x19, 0x01));
        let zen4 = Quirks::for_cpu(&cpu(b"AuthenticAMD", 0x19, 0x11));
        let zen5 = Quirks::for_cpu(&cpu(b"AuthenticAMD", 0x1a, 0x02));
        assert_eq!(spr, Quirks::INTEL);
        assert!(spr.mmx_switch_before_fault && !emr.mmx_switch_before_fault);
        assert!(emr.mmx_store_top_before_fault && !emr.mmx_store_tags_before_fault);
        assert_eq!(
            Quirks {
                mmx_switch_before_fault: true,
                mmx_store_tags_before_fault: true,
                suppressed_store_checks_destination: true,
                ..emr
            },
            Quirks::INTEL
        );
        assert_eq!(zen2, Quirks::AMD);
        assert!(!zen2.null_selector_clears_base && zen3.null_selector_clears_base);
        assert!(!zen3.cmps_source_first && !zen3.x87_indefinite_wins);
        assert!(zen4.cmps_source_first && zen4.x87_indefinite_wins);
        assert!(zen4.null_selector_clears_base && !zen4.rep_fault_restores_flags);
        assert_eq!(zen5, zen4);
        // A Hygon part is AMD for the quirks.
        assert_eq!(
            Quirks::for_cpu(&cpu(b"HygonGenuine", 0x18, 0x01)),
            Quirks::AMD
        );
    }

    #[test]
    fn the_cpuid_bit_sets_the_null_selector_quirk_on_older_amd() {
        let mut m = cpu(b"AuthenticAMD", 0x17, 0x31);
        m.null_sel_clears_base_bit = true;
        assert!(Quirks::for_cpu(&m).null_selector_clears_base);
    }

    #[test]
    fn rows_apply_in_order_and_set_get_round_trip() {
        const T: &[QuirkRow] = &[
            QuirkRow {
                cpu: CpuMatch {
                    vendor: Vendor::Intel,
                    families: (6, 6),
                    models: &[],
                },
                set: &[(Quirk::CmpsSourceFirst, true)],
                seen_on: "test",
            },
            QuirkRow {
                cpu: CpuMatch {
                    vendor: Vendor::Intel,
                    families: (6, 6),
                    models: &[(0x10, 0x20)],
                },
                set: &[(Quirk::CmpsSourceFirst, false)],
                seen_on: "test",
            },
        ];
        let a = Quirks::from_table(&cpu(b"GenuineIntel", 6, 0x0f), T);
        let b = Quirks::from_table(&cpu(b"GenuineIntel", 6, 0x15), T);
        assert!(a.cmps_source_first && !b.cmps_source_first);
        let mut q = Quirks::INTEL;
        for k in Quirk::ALL {
            let v = q.get(k);
            q.set(k, !v);
            assert_eq!(q.get(k), !v, "{k}");
        }
        assert_eq!(
            Quirk::ALL
                .iter()
                .filter(|k| q.get(**k) != Quirks::INTEL.get(**k))
                .count(),
            Quirk::ALL.len()
        );
    }
}
