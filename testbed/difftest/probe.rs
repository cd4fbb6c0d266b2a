//! Start-up probes: which processor-specific behaviours (`cpu_interp::quirks`)
//! the CPU under the hardware oracle shows.
//!
//! The quirk table keys each behaviour on the processor's vendor, family
//! and model, but a table only knows the processors someone has run on.
//! Where a behaviour can be observed from 64-bit ring 3 — the mode in
//! which guest code runs natively on KVM-PVM — the harness runs a small
//! program on KVM before the first case and lets the CPU decide; the
//! interpreter then plays what the CPU did on the hardware oracle. Each
//! probe is a program whose two possible outcomes are the two settings of
//! one quirk; an outcome that is neither (an unexpected exception, a
//! refusal) leaves the table's choice in place and says so.
//!
//! `null_selector_clears_base` is not probed: under KVM-PVM the guest's
//! FS/GS selectors never reach the hardware in ring 3, so a probe would
//! observe the host kernel, not the CPU. It comes from the table and
//! CPUID 0x8000_0021:EAX[6].

use std::fmt::Write as _;

use iced_x86::code_asm::*;

use cpu_interp::quirks::{CpuModel, Quirk, Quirks};
use cpu_interp::state::{gpr, CpuState};

use super::case::{Case, Item};
use super::compare::frame;
use super::env;
use super::harness::{End, Harness, Snapshot};
use super::{DifftestError, Mode};

/// Where a quirk's setting came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The quirk table (vendor, family, model).
    Table,
    /// A probe on the hardware oracle; `agrees` says whether the table
    /// predicted the same.
    Probed { agrees: bool },
    /// The probe ran but its outcome fit neither setting.
    Inconclusive(String),
}

/// The quirks the hardware oracle shows, with their sources.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    pub cpu: CpuModel,
    /// The table's choice for this CPU.
    pub table: Quirks,
    /// What the interpreter plays on the hardware oracle.
    pub quirks: Quirks,
    pub sources: Vec<(Quirk, Source)>,
    /// Observations beside the quirks (e.g. two probes of one quirk that
    /// disagree).
    pub notes: Vec<String>,
}

impl ProbeReport {
    /// The table's choices only (no KVM, or probing skipped).
    pub fn table_only(cpu: CpuModel) -> ProbeReport {
        let table = Quirks::for_cpu(&cpu);
        ProbeReport {
            cpu,
            table,
            quirks: table,
            sources: Quirk::ALL.iter().map(|q| (*q, Source::Table)).collect(),
            notes: Vec::new(),
        }
    }

    /// Text for the summary: one line per quirk.
    pub fn render(&self) -> String {
        let mut t = String::new();
        for (q, src) in &self.sources {
            let v = self.quirks.get(*q);
            let from = match src {
                Source::Table => "table".to_string(),
                Source::Probed { agrees: true } => "probed, as the table says".to_string(),
                Source::Probed { agrees: false } => format!(
                    "probed; the table says {} for this CPU: add a row to QUIRK_TABLE",
                    self.table.get(*q)
                ),
                Source::Inconclusive(why) => format!("table (probe inconclusive: {why})"),
            };
            let _ = writeln!(t, "  {:<36} {:<5} ({from})", q.name(), v);
        }
        for n in &self.notes {
            let _ = writeln!(t, "  note: {n}");
        }
        t
    }
}

/// One probe program.
struct Probe {
    quirk: Quirk,
    name: &'static str,
    build: fn(&mut CodeAssembler) -> Result<(), IcedError>,
    /// Memory to preset: (linear address, bytes).
    mem: &'static [(u64, &'static [u8])],
    /// The quirk's value from KVM's outcome, or why it fits neither.
    judge: fn(&Case, &Snapshot) -> Result<bool, String>,
}

const M32_QNAN: u32 = 0x7ff2_a786;
/// Where probes keep data (the read-write window).
const DATA: u64 = env::W_RW0;
/// A stored x87 result.
const OUT: u64 = env::W_RW0 + 0x100;

fn qnan_bytes() -> &'static [u8] {
    // A static for the memory preset.
    static B: [u8; 4] = M32_QNAN.to_le_bytes();
    &B
}

/// The vector whose stub KVM stopped in, if any.
fn stopped_vector(s: &Snapshot) -> Option<u8> {
    if s.end != End::Stop {
        return None;
    }
    env::stub_vector(s.state.sregs.cs.base, s.state.regs.rip)
}

fn expect_pf(s: &Snapshot) -> Result<(), String> {
    match stopped_vector(s) {
        Some(14) => Ok(()),
        Some(v) => Err(format!("vector {v} instead of #PF")),
        None => Err(format!("ended {:?}", s.end)),
    }
}

fn mem_at(s: &Snapshot, at: u64, n: usize) -> Result<&[u8], String> {
    s.mem
        .get(at as usize..at as usize + n)
        .ok_or_else(|| "memory snapshot too short".to_string())
}

fn probes() -> Vec<Probe> {
    vec![
        Probe {
            quirk: Quirk::MmxSwitchBeforeFault,
            name: "fld1; movq mm0, [not present]",
            build: |a| {
                a.fld1()?;
                a.movq(mm0, qword_ptr(env::UNMAPPED))
            },
            mem: &[],
            judge: |_, s| judge_top(s),
        },
        Probe {
            quirk: Quirk::MmxSwitchBeforeFault,
            name: "fld1; paddb mm0, [not present] (tags)",
            build: |a| {
                a.fld1()?;
                a.paddb(mm0, qword_ptr(env::UNMAPPED))
            },
            mem: &[],
            judge: |_, s| judge_tags(s),
        },
        Probe {
            quirk: Quirk::MmxStoreTopBeforeFault,
            name: "fld1; movq [not present], mm0",
            build: |a| {
                a.fld1()?;
                a.movq(qword_ptr(env::UNMAPPED), mm0)
            },
            mem: &[],
            judge: |_, s| judge_top(s),
        },
        Probe {
            quirk: Quirk::MmxStoreTopBeforeFault,
            name: "fld1; movntq [not present], mm0",
            build: |a| {
                a.fld1()?;
                a.movntq(qword_ptr(env::UNMAPPED), mm0)
            },
            mem: &[],
            judge: |_, s| judge_top(s),
        },
        Probe {
            quirk: Quirk::MmxStoreTopBeforeFault,
            name: "fld1; movd [not present], mm0",
            build: |a| {
                a.fld1()?;
                a.movd(dword_ptr(env::UNMAPPED), mm0)
            },
            mem: &[],
            judge: |_, s| judge_top(s),
        },
        Probe {
            quirk: Quirk::MmxStoreTagsBeforeFault,
            name: "fld1; movq [not present], mm0 (tags)",
            build: |a| {
                a.fld1()?;
                a.movq(qword_ptr(env::UNMAPPED), mm0)
            },
            mem: &[],
            judge: |_, s| judge_tags(s),
        },
        Probe {
            quirk: Quirk::MmxStoreTagsBeforeFault,
            name: "fld1; movntq [not present], mm0 (tags)",
            build: |a| {
                a.fld1()?;
                a.movntq(qword_ptr(env::UNMAPPED), mm0)
            },
            mem: &[],
            judge: |_, s| judge_tags(s),
        },
        Probe {
            quirk: Quirk::MmxStoreTagsBeforeFault,
            name: "fld1; movd [not present], mm0 (tags)",
            build: |a| {
                a.fld1()?;
                a.movd(dword_ptr(env::UNMAPPED), mm0)
            },
            mem: &[],
            judge: |_, s| judge_tags(s),
        },
        Probe {
            quirk: Quirk::SuppressedStoreChecksDestination,
            name: "fldcw (IM unmasked); fist dword [not present] of an empty ST(0)",
            build: |a| {
                a.mov(word_ptr(DATA), 0x37e)?;
                a.fldcw(word_ptr(DATA))?;
                a.fist(dword_ptr(env::UNMAPPED))
            },
            mem: &[],
            judge: |_, s| match stopped_vector(s) {
                Some(14) => Ok(true),
                Some(6) if s.state.fpu.fsw & 0x41 == 0x41 => Ok(false),
                v => Err(format!(
                    "ended {:?} vector {v:?} FSW {:#x}",
                    s.end, s.state.fpu.fsw
                )),
            },
        },
        Probe {
            quirk: Quirk::SuppressedStoreChecksDestination,
            name: "fldcw (IM unmasked); fstp qword [read-only] of an empty ST(0)",
            build: |a| {
                a.mov(word_ptr(DATA), 0x37e)?;
                a.fldcw(word_ptr(DATA))?;
                a.fstp(qword_ptr(env::W_RO))
            },
            mem: &[],
            judge: |_, s| match stopped_vector(s) {
                Some(14) => Ok(true),
                Some(6) if s.state.fpu.fsw & 0x41 == 0x41 => Ok(false),
                v => Err(format!(
                    "ended {:?} vector {v:?} FSW {:#x}",
                    s.end, s.state.fpu.fsw
                )),
            },
        },
        Probe {
            quirk: Quirk::RepFaultRestoresFlags,
            name: "cmp (CF SF); repe cmpsb running into a not-present page",
            build: |a| {
                a.mov(rsi, DATA)?;
                a.mov(rdi, env::UNMAPPED - 2)?;
                a.mov(ecx, 5)?;
                a.mov(al, 0)?;
                a.cmp(al, 1)?;
                a.repe().cmpsb()
            },
            mem: &[(DATA, &[7, 9]), (env::UNMAPPED - 2, &[7, 9])],
            judge: |case, s| {
                expect_pf(s)?;
                let f = frame(case.mode, &s.state, &s.mem, 14, case.init.sregs.cs.selector)
                    .ok_or("no exception frame")?;
                if s.state.regs.gpr[gpr::RCX] != 3 {
                    return Err(format!(
                        "RCX {} after two iterations",
                        s.state.regs.gpr[gpr::RCX]
                    ));
                }
                let (cf, zf) = (f.rflags & 1 != 0, f.rflags & 0x40 != 0);
                match (cf, zf) {
                    (true, false) => Ok(true),
                    (false, true) => Ok(false),
                    _ => Err(format!("RFLAGS {:#x}", f.rflags)),
                }
            },
        },
        Probe {
            quirk: Quirk::Movsxd16ReadsDword,
            name: "movsxd ax, word [last 2 bytes before a not-present page]",
            build: |a| {
                let mut i = iced_x86::Instruction::with2(
                    iced_x86::Code::Movsxd_r16_rm16,
                    iced_x86::Register::AX,
                    iced_x86::MemoryOperand::with_base_displ(
                        iced_x86::Register::None,
                        (env::UNMAPPED - 2) as i64,
                    ),
                )?;
                i.set_memory_displ_size(4);
                a.add_instruction(i)
            },
            mem: &[],
            judge: |_, s| match stopped_vector(s) {
                Some(14) => Ok(true),
                Some(6) => Ok(false), // the terminator's #UD
                v => Err(format!("ended {:?} vector {v:?}", s.end)),
            },
        },
        Probe {
            quirk: Quirk::M80StoreSplit,
            name: "fld1; fstp tword [8 bytes before a not-present page]",
            build: |a| {
                a.fld1()?;
                a.fstp(tword_ptr(env::UNMAPPED - 8))
            },
            mem: &[],
            judge: |_, s| {
                expect_pf(s)?;
                let low = mem_at(s, env::UNMAPPED - 8, 8)?;
                if low == 0x8000_0000_0000_0000u64.to_le_bytes() {
                    Ok(true)
                } else if low == [0u8; 8] {
                    Ok(false)
                } else {
                    Err(format!("{low:02x?} written"))
                }
            },
        },
        Probe {
            quirk: Quirk::CmpsSourceFirst,
            name: "repe cmpsb with both operands not present",
            build: |a| {
                a.mov(rsi, env::UNMAPPED + 0x100)?;
                a.mov(rdi, env::UNMAPPED + 0x200)?;
                a.mov(ecx, 3)?;
                a.repe().cmpsb()
            },
            mem: &[],
            judge: cmps_judge,
        },
        Probe {
            quirk: Quirk::CmpsSourceFirst,
            name: "cmpsb with both operands not present",
            build: |a| {
                a.mov(rsi, env::UNMAPPED + 0x100)?;
                a.mov(rdi, env::UNMAPPED + 0x200)?;
                a.cmpsb()
            },
            mem: &[],
            judge: cmps_judge,
        },
        Probe {
            quirk: Quirk::X87IndefiniteWins,
            name: "movd mm0, eax; fld1 (masked stack overflow); fdivr dword [QNaN]",
            build: |a| {
                a.movd(mm0, eax)?;
                a.fld1()?;
                a.fdivr(dword_ptr(DATA))?;
                a.fstp(tword_ptr(OUT))
            },
            mem: &[(DATA, &[])], // filled with the QNaN below
            judge: indefinite_judge,
        },
        Probe {
            quirk: Quirk::X87IndefiniteWins,
            name: "fldz; fldz; fdivp (masked 0/0); fdivr dword [QNaN]",
            build: |a| {
                a.fldz()?;
                a.fldz()?;
                a.fdivp(st1, st0)?;
                a.fdivr(dword_ptr(DATA))?;
                a.fstp(tword_ptr(OUT))
            },
            mem: &[(DATA, &[])],
            judge: indefinite_judge,
        },
    ]
}

/// After `fld1` and a faulting MMX instruction: TOP 0 (switched) or 7.
fn judge_top(s: &Snapshot) -> Result<bool, String> {
    expect_pf(s)?;
    match (s.state.fpu.fsw >> 11) & 7 {
        0 => Ok(true),
        7 => Ok(false),
        t => Err(format!("TOP {t} after the fault")),
    }
}

/// After `fld1` and a faulting MMX instruction: all tags valid (switched)
/// or only physical register 7's.
fn judge_tags(s: &Snapshot) -> Result<bool, String> {
    expect_pf(s)?;
    let valid = (0..8)
        .filter(|r| (s.state.fpu.ftw >> (2 * r)) & 3 != 3)
        .count();
    match valid {
        8 => Ok(true),
        1 => Ok(false),
        n => Err(format!(
            "{n} tags valid after the fault (FTW {:#x})",
            s.state.fpu.ftw
        )),
    }
}

fn cmps_judge(_: &Case, s: &Snapshot) -> Result<bool, String> {
    expect_pf(s)?;
    match s.state.sregs.cr2 {
        a if a == env::UNMAPPED + 0x100 => Ok(true),
        a if a == env::UNMAPPED + 0x200 => Ok(false),
        a => Err(format!("CR2 {a:#x}")),
    }
}

fn indefinite_judge(_: &Case, s: &Snapshot) -> Result<bool, String> {
    match stopped_vector(s) {
        Some(6) => {}
        v => return Err(format!("ended {:?} vector {v:?}", s.end)),
    }
    let b = mem_at(s, OUT, 10)?;
    let mut w = [0u8; 16];
    w[..10].copy_from_slice(b);
    let v = u128::from_le_bytes(w);
    let memory_nan = 0x7fff_f2a7_8600_0000_0000u128;
    match v {
        cpu_interp::softfloat80::INDEFINITE => Ok(true),
        x if x == memory_nan => Ok(false),
        x => Err(format!("result {x:#x}")),
    }
}

/// The probe program as a case in 64-bit ring 3.
fn probe_case(p: &Probe) -> Result<Case, DifftestError> {
    let mut a = CodeAssembler::new(64).map_err(|e| DifftestError::Assemble(e.to_string()))?;
    (p.build)(&mut a).map_err(|e| DifftestError::Assemble(e.to_string()))?;
    let items: Vec<Item> = a
        .instructions()
        .iter()
        .enumerate()
        .map(|(k, i)| Item::new(k, *i))
        .collect();
    let mut area = vec![0u8; (env::SPACE - env::CASE_AREA) as usize];
    for &(at, bytes) in p.mem {
        let bytes = if bytes.is_empty() {
            qnan_bytes()
        } else {
            bytes
        };
        let off = (at - env::CASE_AREA) as usize;
        area[off..off + bytes.len()].copy_from_slice(bytes);
    }
    let init: CpuState = env::base_state(Mode::Long64Ring3);
    Ok(Case {
        mode: Mode::Long64Ring3,
        init,
        area,
        items,
        origin: format!("probe {}", p.name),
    })
}

/// Run every probe on KVM and settle the hardware oracle's quirks.
pub fn probe(h: &mut Harness, cpu: CpuModel) -> Result<ProbeReport, DifftestError> {
    let mut report = ProbeReport::table_only(cpu);
    let mut results: Vec<(Quirk, &'static str, Result<bool, String>)> = Vec::new();
    for p in probes() {
        let case = probe_case(&p)?;
        let snap = h.run_kvm(&case)?;
        results.push((p.quirk, p.name, (p.judge)(&case, &snap)));
    }
    for (q, src) in report.sources.iter_mut() {
        let mine: Vec<&(Quirk, &str, Result<bool, String>)> =
            results.iter().filter(|(k, _, _)| k == q).collect();
        if mine.is_empty() {
            continue;
        }
        // The first probe of a quirk decides; later ones are checks.
        match &mine[0].2 {
            Ok(v) => {
                report.quirks.set(*q, *v);
                *src = Source::Probed {
                    agrees: report.table.get(*q) == *v,
                };
                for (_, name, r) in &mine[1..] {
                    match r {
                        Ok(w) if w == v => {}
                        Ok(w) => report.notes.push(format!(
                            "{q}: \"{}\" says {v}, \"{name}\" says {w}: the CPU's rule is \
                             narrower than the quirk models",
                            mine[0].1
                        )),
                        Err(e) => report
                            .notes
                            .push(format!("{q}: \"{name}\" inconclusive: {e}")),
                    }
                }
            }
            Err(e) => *src = Source::Inconclusive(format!("{}: {e}", mine[0].1)),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_programs_assemble_and_analyze() {
        for p in probes() {
            let c = probe_case(&p).unwrap();
            super::super::case::assemble(c.mode, &c.items).unwrap();
            assert!(!c.items.is_empty(), "{}", p.name);
        }
    }

    /// The interpreter, playing a quirk set, gives the outcome each probe
    /// expects of it: the judges read the interpreter's side exactly as
    /// they read KVM's, so a probe cannot silently measure the wrong thing.
    #[test]
    fn probes_read_the_interpreter_playing_either_setting() {
        let mut side = super::super::harness::InterpSide::new().unwrap();
        for p in probes() {
            let case = probe_case(&p).unwrap();
            for v in [false, true] {
                let mut q = Quirks::INTEL;
                q.set(p.quirk, v);
                let snap = side.run_case(&case, q).unwrap();
                assert_eq!((p.judge)(&case, &snap), Ok(v), "{} playing {v}", p.name);
            }
        }
    }

    #[test]
    fn the_report_names_each_quirk_and_its_source() {
        let cpu = CpuModel::from_signature(b"GenuineIntel", 0x000c_06f1);
        let mut r = ProbeReport::table_only(cpu);
        r.sources[3].1 = Source::Probed { agrees: false };
        let t = r.render();
        assert_eq!(t.lines().count(), Quirk::ALL.len());
        assert!(t.contains("mmx_switch_before_fault"), "{t}");
        assert!(t.contains("add a row"), "{t}");
    }
}
