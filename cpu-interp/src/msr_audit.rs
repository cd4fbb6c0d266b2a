//! The MSR audit: every MSR a CPUID feature bit implies must read (and be
//! written back) without #GP when duet's CPUID sets that bit, and must #GP
//! when it does not; MSRs of no feature #GP, as on hardware. The table is
//! keyed on CPUID bits, so advertising a new feature without its MSRs (or
//! implementing MSRs of a feature left out of CPUID) fails here.
//!
//! MSRs the machine answers (the local APIC's x2APIC range and
//! TSC_DEADLINE) are checked where the machine is, not here.

use crate::cpuid::{self, CpuidConfig};
use crate::platform::NullPlatform;

/// A CPUID bit: leaf, subleaf, register (0 EAX .. 3 EDX), bit.
type Bit = (u32, u32, usize, u32);

const EAX: usize = 0;
const EBX: usize = 1;
const ECX: usize = 2;
const EDX: usize = 3;

/// How an implied MSR may be accessed when its feature is present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// RDMSR, and WRMSR of the value read.
    ReadWrite,
    /// RDMSR only (writes #GP on hardware too).
    ReadOnly,
}

use Access::*;

/// A row: feature name, any of these bits implies the MSRs, the MSRs.
type Row = (&'static str, Vec<Bit>, Vec<(u32, Access)>);

fn table() -> Vec<Row> {
    let mca_banks: Vec<(u32, Access)> = (0..crate::mca::BANKS * 4)
        .map(|k| (crate::mca::MC0_CTL + k, ReadWrite))
        .collect();
    let mut mca = vec![(0x179, ReadOnly), (0x17a, ReadWrite), (0x17b, ReadWrite)];
    mca.extend(mca_banks);
    let mut mtrr = vec![(0xfe, ReadOnly), (0x2ff, ReadWrite)];
    mtrr.extend((0x200..=0x20f).map(|m| (m, ReadWrite)));
    mtrr.extend(
        [
            0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
        ]
        .map(|m| (m, ReadWrite)),
    );
    vec![
        ("TSC", vec![(1, 0, EDX, 4)], vec![(0x10, ReadWrite)]),
        ("APIC", vec![(1, 0, EDX, 9)], vec![(0x1b, ReadWrite)]),
        (
            "SEP",
            vec![(1, 0, EDX, 11)],
            vec![(0x174, ReadWrite), (0x175, ReadWrite), (0x176, ReadWrite)],
        ),
        ("MTRR", vec![(1, 0, EDX, 12)], mtrr),
        ("MCE+MCA", vec![(1, 0, EDX, 14)], mca),
        ("PAT", vec![(1, 0, EDX, 16)], vec![(0x277, ReadWrite)]),
        (
            "SYSCALL",
            vec![(0x8000_0001, 0, EDX, 11)],
            vec![(0xc000_0081, ReadWrite), (0xc000_0084, ReadWrite)],
        ),
        (
            "EFER (LM, NX or SYSCALL)",
            vec![
                (0x8000_0001, 0, EDX, 29),
                (0x8000_0001, 0, EDX, 20),
                (0x8000_0001, 0, EDX, 11),
            ],
            vec![(0xc000_0080, ReadWrite)],
        ),
        (
            "LM",
            vec![(0x8000_0001, 0, EDX, 29)],
            vec![
                (0xc000_0082, ReadWrite),
                (0xc000_0100, ReadWrite),
                (0xc000_0101, ReadWrite),
                (0xc000_0102, ReadWrite),
            ],
        ),
        (
            "RDTSCP or RDPID",
            vec![(0x8000_0001, 0, EDX, 27), (7, 0, ECX, 22)],
            vec![(0xc000_0103, ReadWrite)],
        ),
        // Features duet does not advertise today: their MSRs must #GP.
        (
            "VMX or SMX (IA32_FEATURE_CONTROL)",
            vec![(1, 0, ECX, 5), (1, 0, ECX, 6)],
            vec![(0x3a, ReadWrite)],
        ),
        ("TSC_ADJUST", vec![(7, 0, EBX, 1)], vec![(0x3b, ReadWrite)]),
        (
            "IBRS/IBPB (SPEC_CTRL, PRED_CMD)",
            vec![(7, 0, EDX, 26)],
            vec![(0x48, ReadWrite)],
        ),
        (
            "ARCH_CAPABILITIES",
            vec![(7, 0, EDX, 29)],
            vec![(0x10a, ReadOnly)],
        ),
        (
            "MPERF/APERF",
            vec![(6, 0, ECX, 0)],
            vec![(0xe7, ReadWrite), (0xe8, ReadWrite)],
        ),
        (
            "EIST (PERF_STATUS, PERF_CTL)",
            vec![(1, 0, ECX, 7)],
            vec![(0x198, ReadOnly), (0x199, ReadWrite)],
        ),
        (
            "ACPI thermal (CLOCK_MODULATION, THERM_*)",
            vec![(1, 0, EDX, 22)],
            vec![(0x19a, ReadWrite), (0x19b, ReadWrite), (0x19c, ReadWrite)],
        ),
        (
            "DS (DS_AREA)",
            vec![(1, 0, EDX, 21)],
            vec![(0x600, ReadWrite)],
        ),
        (
            "PDCM (PERF_CAPABILITIES)",
            vec![(1, 0, ECX, 15)],
            vec![(0x345, ReadOnly)],
        ),
        (
            "XSAVES (IA32_XSS)",
            vec![(0xd, 1, EAX, 3)],
            vec![(0xda0, ReadWrite)],
        ),
        (
            "MPX (BNDCFGS)",
            vec![(7, 0, EBX, 14)],
            vec![(0xd90, ReadWrite)],
        ),
        (
            "CET (U_CET)",
            vec![(7, 0, ECX, 7)],
            vec![(0x6a0, ReadWrite)],
        ),
    ]
}

/// Performance counters exist when CPUID leaf 0xa says so.
fn perfmon_msrs() -> Vec<(u32, Access)> {
    vec![(0xc1, ReadWrite), (0x186, ReadWrite)]
}

/// MSRs of no feature at all (vendor-specific ones of the other vendor,
/// the KVM paravirtual range, invented numbers).
const UNKNOWN: [u32; 8] = [
    0x1234_5678,
    0x4b56_4d00,
    0x4b56_4d01,
    0xc001_0000,
    0xc001_1029,
    0xc001_0015,
    0x0000_0fff,
    0xffff_ffff,
];

fn config() -> CpuidConfig {
    // As the interpreter backend configures its vCPUs.
    CpuidConfig {
        apic_id: 0,
        apic: true,
        tsc_khz: Some(2_000_000),
        crystal_hz: 1_000_000_000,
        x2apic: true,
        tsc_deadline: true,
    }
}

fn has(cfg: &CpuidConfig, (leaf, sub, reg, bit): Bit) -> bool {
    let max = if leaf >= 0x8000_0000 {
        cpuid::query(cfg, 0x8000_0000, 0)[0]
    } else {
        cpuid::query(cfg, 0, 0)[0]
    };
    leaf <= max && cpuid::query(cfg, leaf, sub)[reg] & (1 << bit) != 0
}

#[test]
fn advertised_msrs_work_and_others_fault() {
    let cfg = config();
    let mut cpu = crate::insn::testutil::new_cpu();
    cpu.set_cpuid_config(cfg);
    let mut p = NullPlatform;
    let mut problems = Vec::new();
    let mut checked = 0;
    let perfmon = cpuid::query(&cfg, 0xa, 0)[0] & 0xff00 != 0;
    let mut rows = table();
    rows.push(("perfmon (leaf 0xa)", vec![], perfmon_msrs()));
    for (name, bits, msrs) in rows {
        let present = if bits.is_empty() {
            perfmon
        } else {
            bits.iter().any(|&b| has(&cfg, b))
        };
        for (msr, access) in msrs {
            checked += 1;
            let read = cpu.read_msr(&mut p, msr);
            match (present, read) {
                (true, None) => problems.push(format!("{name}: RDMSR {msr:#x} faults")),
                (false, Some(v)) => problems.push(format!(
                    "{name} is not advertised but RDMSR {msr:#x} reads {v:#x}"
                )),
                _ => {}
            }
            let write = cpu.write_msr(&mut p, msr, read.unwrap_or(0)).is_ok();
            match (present, access, write) {
                (true, ReadWrite, false) => {
                    problems.push(format!("{name}: WRMSR {msr:#x} of the value read faults"))
                }
                (true, ReadOnly, true) => {
                    problems.push(format!("{name}: read-only MSR {msr:#x} accepts a write"))
                }
                (false, _, true) => problems.push(format!(
                    "{name} is not advertised but WRMSR {msr:#x} succeeds"
                )),
                _ => {}
            }
        }
    }
    for msr in UNKNOWN {
        if let Some(v) = cpu.read_msr(&mut p, msr) {
            problems.push(format!("unknown MSR {msr:#x} reads {v:#x}"));
        }
        if cpu.write_msr(&mut p, msr, 0).is_ok() {
            problems.push(format!("unknown MSR {msr:#x} accepts a write"));
        }
    }
    assert!(checked > 60, "only {checked} MSRs checked");
    assert!(problems.is_empty(), "MSR audit:\n{}", problems.join("\n"));
}

/// MCE and MCA are advertised together, with the banks MCG_CAP counts.
#[test]
fn machine_check_is_advertised_consistently() {
    let cfg = config();
    assert!(has(&cfg, (1, 0, EDX, 7)), "MCE");
    assert!(has(&cfg, (1, 0, EDX, 14)), "MCA");
    let mut cpu = crate::insn::testutil::new_cpu();
    let mut p = NullPlatform;
    let cap = cpu.read_msr(&mut p, 0x179).unwrap();
    let banks = (cap & 0xff) as u32;
    assert!(banks > 0);
    assert!(cpu.read_msr(&mut p, 0x400 + 4 * banks - 1).is_some());
    assert!(cpu.read_msr(&mut p, 0x400 + 4 * banks).is_none());
}
