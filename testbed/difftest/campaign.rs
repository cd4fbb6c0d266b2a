//! The `duet difftest` driver: generate cases per mode, run them on both
//! sides, minimize and report divergences, and summarize.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write;
use std::time::{Duration, Instant};

use iced_x86::Code;

use cpu_interp::state::CpuState;

use super::case::{analyze, assemble, Case};
use super::compare::{compare, describe_end, Diff, Verdict};
use super::corpus;
use super::gen::Generator;
use super::harness::{Harness, Outcome};
use super::minimize::{fields, minimize};
use super::rng::Rng;
use super::{DifftestError, Mode, Oracle};

/// Which cases to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corpus {
    /// Random sequences.
    Random,
    /// The deterministic targeted corpora (per instruction class).
    Targeted,
    /// Targeted first, then random.
    All,
}

/// A campaign.
#[derive(Clone, Debug)]
pub struct CampaignConfig {
    pub seed: u64,
    /// Random cases per mode.
    pub cases: u64,
    pub modes: Vec<Mode>,
    pub corpus: Corpus,
    /// Minimize and print divergences (at most this many in full).
    pub max_reports: usize,
    /// Print a progress line every this many cases (0: never).
    pub progress_every: u64,
    /// Longest random sequence (test instructions).
    pub max_len: usize,
    /// Run only this random case index (and print it in full).
    pub only: Option<u64>,
    /// Random cases are all x86-64-v2/v3 cases (in 64-bit ring 3; the soak
    /// of the new instructions).
    pub isa_only: bool,
    /// The interpreter side's execution tier (with `Jit`, every 64-bit
    /// block is translated the first time it runs).
    pub tier: cpu_interp::Tier,
}

impl Default for CampaignConfig {
    fn default() -> Self {
        CampaignConfig {
            seed: 1,
            cases: 1000,
            modes: Mode::ALL.to_vec(),
            corpus: Corpus::All,
            max_reports: 20,
            progress_every: 0,
            max_len: 8,
            only: None,
            isa_only: false,
            tier: cpu_interp::Tier::Interp,
        }
    }
}

/// Counters for one mode.
#[derive(Clone, Debug, Default)]
pub struct ModeStats {
    pub cases: u64,
    pub matched: u64,
    pub diverged: u64,
    pub refused: u64,
    pub both_timed_out: u64,
    /// Cases where the emulator oracle is known wrong at an item and the
    /// interpreter did what the SDM says there.
    pub settled: u64,
    pub broken: u64,
    /// Cases the analysis rejected (a generator bug; not run).
    pub invalid: u64,
    pub time: Duration,
    /// The slowest case and its time.
    pub slowest: Option<(String, Duration)>,
}

impl ModeStats {
    pub fn per_second(&self) -> f64 {
        let s = self.time.as_secs_f64();
        if s > 0.0 {
            self.cases as f64 / s
        } else {
            0.0
        }
    }
}

/// A reported divergence.
#[derive(Clone, Debug)]
pub struct Divergence {
    pub mode: Mode,
    pub signature: String,
    /// Cases that diverged with this signature.
    pub count: u64,
    /// The full report of the first (minimized) one.
    pub report: String,
}

/// What a campaign found.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub modes: BTreeMap<Mode, ModeStats>,
    pub divergences: Vec<Divergence>,
    /// Settled emulator errors met, by mode and name (the interpreter
    /// checked against the SDM there).
    pub settled: BTreeMap<(Mode, &'static str), u64>,
    /// KVM refusals by mode and instruction: count and the first case.
    pub refusals: BTreeMap<(Mode, String), (u64, String)>,
    /// Generated (and compared) test instructions by iced `Code`.
    pub coverage: BTreeMap<Code, u64>,
    /// Compared test instructions by instruction group and oracle.
    pub by_group: BTreeMap<(&'static str, Oracle), u64>,
    /// Broken-case messages (first few).
    pub broken: Vec<String>,
    pub elapsed: Duration,
    /// The hardware oracle's quirks (from the start-up probes).
    pub probe: Option<super::probe::ProbeReport>,
    /// The SDM-reference check of the BCD instructions (no KVM oracle).
    pub sdm: Option<super::sdm::BcdReport>,
    /// The interpreter side's execution tier.
    pub tier: cpu_interp::Tier,
}

impl Summary {
    pub fn total_cases(&self) -> u64 {
        self.modes.values().map(|m| m.cases).sum()
    }

    pub fn divergent_cases(&self, oracle: Oracle) -> u64 {
        self.modes
            .iter()
            .filter(|(m, _)| m.oracle() == oracle)
            .map(|(_, s)| s.diverged)
            .sum()
    }

    /// No divergence and nothing broken.
    pub fn clean(&self) -> bool {
        self.modes
            .values()
            .all(|s| s.diverged == 0 && s.broken == 0 && s.invalid == 0)
            && self.sdm.as_ref().is_none_or(|r| r.mismatches.is_empty())
    }

    /// The summary as text.
    pub fn render(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "== difftest summary");
        let _ = writeln!(t, "interpreter tier: {}", self.tier.name());
        let _ = writeln!(
            t,
            "host CPU: {} ({}); on the hardware oracle the interpreter plays these quirks \
             (cpu_interp::quirks), on the emulator oracle Intel's:",
            host_cpu_name(),
            self.probe
                .as_ref()
                .map(|p| p.cpu.describe())
                .unwrap_or_else(|| cpu_interp::quirks::CpuModel::host().describe())
        );
        if let Some(p) = &self.probe {
            t.push_str(&p.render());
        }
        let _ = writeln!(
            t,
            "{:<34} {:>9} {:>9} {:>8} {:>9} {:>8} {:>7} {:>9}  oracle",
            "mode", "cases", "match", "settled", "diverged", "refused", "other", "cases/s"
        );
        for (m, s) in &self.modes {
            let _ = writeln!(
                t,
                "{:<34} {:>9} {:>9} {:>8} {:>9} {:>8} {:>7} {:>9.0}  {}",
                m.name(),
                s.cases,
                s.matched,
                s.settled,
                s.diverged,
                s.refused,
                s.both_timed_out + s.broken + s.invalid,
                s.per_second(),
                m.oracle()
            );
        }
        for (m, s) in &self.modes {
            if let Some((o, d)) = &s.slowest {
                let _ = writeln!(
                    t,
                    "slowest {}: {o} ({:.1} ms)",
                    m.name(),
                    d.as_secs_f64() * 1e3
                );
            }
        }
        let _ = writeln!(
            t,
            "total {} cases in {:.1} s ({:.0} cases/s)",
            self.total_cases(),
            self.elapsed.as_secs_f64(),
            self.total_cases() as f64 / self.elapsed.as_secs_f64().max(1e-9)
        );
        for oracle in [Oracle::Hardware, Oracle::Emulator] {
            let sigs: Vec<&Divergence> = self
                .divergences
                .iter()
                .filter(|d| d.mode.oracle() == oracle)
                .collect();
            let _ = writeln!(
                t,
                "divergences ({oracle}): {} cases, {} distinct",
                self.divergent_cases(oracle),
                sigs.len()
            );
            for d in sigs {
                let _ = writeln!(t, "  {:>7}x  {}: {}", d.count, d.mode.name(), d.signature);
            }
        }
        if let Some(r) = &self.sdm {
            let _ = writeln!(
                t,
                "SDM reference (AAA/AAS/DAA/DAS/AAM/AAD, no KVM oracle): {} inputs, {} mismatches",
                r.cases,
                r.mismatches.len()
            );
            for m in &r.mismatches {
                let _ = writeln!(t, "  {m}");
            }
        }
        if !self.settled.is_empty() {
            let _ = writeln!(
                t,
                "settled emulator errors (the interpreter raised the SDM's exception where KVM's emulator does not):"
            );
            for ((m, what), n) in &self.settled {
                let _ = writeln!(t, "  {n:>7}x  {}: {what}", m.name());
            }
        }
        if !self.refusals.is_empty() {
            let _ = writeln!(t, "KVM refused (no oracle for these cases):");
            for ((m, what), (n, first)) in &self.refusals {
                let _ = writeln!(t, "  {n:>7}x  {}: {what} (first: {first})", m.name());
            }
        }
        if !self.broken.is_empty() {
            let _ = writeln!(t, "harness problems:");
            for b in &self.broken {
                let _ = writeln!(t, "  {b}");
            }
        }
        if !self.by_group.is_empty() {
            let _ = writeln!(
                t,
                "oracle share by instruction group (compared test instructions):"
            );
            let _ = writeln!(
                t,
                "  {:<8} {:>10} {:>10} {:>9}",
                "group", "hardware", "emulator", "hw share"
            );
            for g in GROUPS {
                let hw = self
                    .by_group
                    .get(&(g, Oracle::Hardware))
                    .copied()
                    .unwrap_or(0);
                let em = self
                    .by_group
                    .get(&(g, Oracle::Emulator))
                    .copied()
                    .unwrap_or(0);
                if hw + em == 0 {
                    continue;
                }
                let _ = writeln!(
                    t,
                    "  {g:<8} {hw:>10} {em:>10} {:>8.1}%",
                    100.0 * hw as f64 / (hw + em) as f64
                );
            }
        }
        let _ = writeln!(
            t,
            "coverage: {} distinct instruction forms (iced Code) exercised",
            self.coverage.len()
        );
        for (class, (hit, all)) in self.coverage_by_class() {
            let _ = writeln!(t, "  {class:<8} {hit:>4} of {all:>4} implemented forms");
        }
        let ext = self.coverage_by_extension();
        if ext.iter().any(|e| e.1 .0 > 0) {
            let _ = writeln!(t, "  x86-64-v2/v3 extensions (legacy and VEX forms):");
            let missing = self.isa_forms_not_exercised();
            for (name, (hit, all)) in ext {
                let _ = writeln!(t, "    {name:<10} {hit:>4} of {all:>4} forms");
                let mine: Vec<String> = missing
                    .iter()
                    .filter(|c| super::gen::isa::extension_of(**c) == Some(name))
                    .map(|c| format!("{c:?}"))
                    .collect();
                // Name the gaps of an extension the run did exercise.
                if hit > 0 && !mine.is_empty() {
                    let _ = writeln!(t, "      not exercised: {}", mine.join(", "));
                }
            }
        }
        let lacks = super::gen::isa::host_lacks();
        if !lacks.is_empty() {
            let _ = writeln!(
                t,
                "  skipped (the host CPU lacks them, no oracle): {}",
                lacks.join(", ")
            );
        }
        if super::env::oracle_xcr0() & 6 != 6 {
            let _ = writeln!(
                t,
                "  skipped: every x86-64-v2/v3 case (the host's XCR0 does not enable AVX)"
            );
        }
        t
    }

    /// The generatable x86-64-v2/v3 forms this run did not exercise.
    pub fn isa_forms_not_exercised(&self) -> Vec<Code> {
        super::gen::isa::generatable_forms()
            .into_iter()
            .filter(|c| !self.coverage.contains_key(c))
            .collect()
    }

    /// Exercised vs generatable forms per x86-64-v2/v3 extension.
    pub fn coverage_by_extension(&self) -> Vec<(&'static str, (usize, usize))> {
        let pool = super::gen::isa::generatable_forms();
        super::gen::isa::EXTENSIONS
            .iter()
            .map(|(name, _)| {
                let mine: Vec<&Code> = pool
                    .iter()
                    .filter(|c| super::gen::isa::extension_of(**c) == Some(*name))
                    .collect();
                let hit = mine
                    .iter()
                    .filter(|c| self.coverage.contains_key(**c))
                    .count();
                (*name, (hit, mine.len()))
            })
            .collect()
    }

    /// Exercised vs implemented forms per class (integer/x87/MMX/SSE).
    pub fn coverage_by_class(&self) -> Vec<(&'static str, (usize, usize))> {
        let mut v: Vec<(&'static str, (usize, usize))> = ["integer", "x87", "mmx", "sse"]
            .iter()
            .map(|c| (*c, (0, 0)))
            .collect();
        for c in Code::values() {
            if c.encoding() != iced_x86::EncodingKind::Legacy
                || !cpu_interp::dispatch::implemented(c)
                || c == Code::INVALID
            {
                continue;
            }
            let k = class_of(c);
            v[k].1 .1 += 1;
            if self.coverage.contains_key(&c) {
                v[k].1 .0 += 1;
            }
        }
        v
    }

    /// Every exercised form with its count, one per line (`Code count`).
    pub fn coverage_list(&self) -> String {
        let mut t = String::new();
        for (c, n) in &self.coverage {
            let _ = writeln!(t, "{c:?} {n}");
        }
        t
    }

    /// Coverage by mnemonic, for the docs.
    pub fn coverage_by_mnemonic(&self) -> BTreeMap<String, (usize, u64)> {
        let mut m: BTreeMap<String, (usize, u64)> = BTreeMap::new();
        for (c, n) in &self.coverage {
            let e = m
                .entry(format!("{:?}", c.mnemonic()).to_lowercase())
                .or_default();
            e.0 += 1;
            e.1 += n;
        }
        m
    }
}

/// The instruction groups the summary reports the oracle share for.
pub const GROUPS: [&str; 8] = [
    "integer", "string", "control", "system", "x87", "mmx", "sse", "v2/v3",
];

/// The group of a test instruction.
pub fn group_of(i: &iced_x86::Instruction) -> &'static str {
    use iced_x86::{FlowControl, Mnemonic as M};
    let c = i.code();
    // SSE4.1/4.2, AVX/AVX2, FMA, F16C, BMI, LZCNT, MOVBE, AES, PCLMULQDQ,
    // XSAVE (legacy and VEX forms).
    if super::gen::isa::extension_of(c).is_some() {
        return "v2/v3";
    }
    match class_of(c) {
        1 => return "x87",
        2 => return "mmx",
        3 => return "sse",
        _ => {}
    }
    if c.is_string_instruction() {
        return "string";
    }
    let m = c.mnemonic();
    let system = matches!(
        m,
        M::Lgdt
            | M::Lidt
            | M::Sgdt
            | M::Sidt
            | M::Lldt
            | M::Ltr
            | M::Sldt
            | M::Str
            | M::Clts
            | M::Lmsw
            | M::Smsw
            | M::Invlpg
            | M::Wbinvd
            | M::Rdmsr
            | M::Wrmsr
            | M::Cpuid
            | M::Swapgs
            | M::Syscall
            | M::Sysret
            | M::Sysretq
            | M::Sysenter
            | M::Sysexit
            | M::Sysexitq
            | M::Iret
            | M::Iretd
            | M::Iretq
            | M::Hlt
    ) || (m == M::Mov
        && c.op_code().op_kinds().iter().any(|k| {
            use iced_x86::OpCodeOperandKind as K;
            matches!(k, K::cr_reg | K::dr_reg | K::seg_reg)
        }));
    if system {
        return "system";
    }
    if !matches!(i.flow_control(), FlowControl::Next) {
        return "control";
    }
    "integer"
}

/// 0 integer, 1 x87, 2 MMX, 3 SSE (by CPUID feature and operands).
fn class_of(c: Code) -> usize {
    use iced_x86::CpuidFeature as F;
    let f = c.cpuid_features();
    if f.iter()
        .any(|x| matches!(x, F::FPU | F::FPU287 | F::FPU387))
    {
        1
    } else if super::fp::x87_or_mmx(c) {
        2
    } else if super::fp::is_fp(c) {
        3
    } else {
        0
    }
}

/// Code at `addr` in the case, if it is one of its items.
fn code_at(case: &Case, rip: u64) -> Option<Code> {
    let asm = assemble(case.mode, &case.items).ok()?;
    asm.index_of(rip)
        .and_then(|k| case.items.get(k))
        .map(|it| it.instr.code())
}

/// The text of a case: bytes and disassembly per item.
pub fn listing(case: &Case) -> String {
    let mut t = String::new();
    let Ok(asm) = assemble(case.mode, &case.items) else {
        return "(does not assemble)\n".into();
    };
    let bits = case.mode.bits();
    let mut addrs: Vec<u64> = asm.addrs.clone();
    addrs.push(asm.term_addr);
    for (k, a) in addrs.iter().enumerate() {
        let end = addrs.get(k + 1).copied().unwrap_or(asm.end_addr);
        let off = (a - asm.addrs.first().copied().unwrap_or(asm.term_addr)) as usize;
        let len = (end - a) as usize;
        let bytes = &asm.code[off..off + len];
        let hex: String = bytes.iter().map(|b| format!("{b:02x} ")).collect();
        let dis = cpu_interp::disasm_bytes(bits, *a, bytes);
        let note = match case.items.get(k) {
            Some(it) if it.setup => "   ; setup",
            Some(_) => "",
            None => "   ; terminator",
        };
        let _ = writeln!(t, "  {a:#07x}: {hex:<36} {dis}{note}");
    }
    t
}

fn describe_state(s: &CpuState, bits: u32) -> String {
    const N: [&str; 16] = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ];
    let n = if bits == 64 { 16 } else { 8 };
    let mut t = String::new();
    for (k, name) in N.iter().enumerate().take(n) {
        let _ = write!(t, "{name}={:#x} ", s.regs.gpr[k]);
        if k % 4 == 3 {
            t.push_str("\n    ");
        }
    }
    let _ = write!(
        t,
        "rflags={:#x} rip={:#x} cs={:#x}",
        s.regs.rflags, s.regs.rip, s.sregs.cs.selector
    );
    let f = &s.fpu;
    let d = cpu_interp::state::FpuState::default();
    if (f.fcw, f.fsw, f.ftw, f.st) != (d.fcw, d.fsw, d.ftw, d.st) {
        let _ = write!(
            t,
            "\n    fcw={:#06x} fsw={:#06x} (top {}) ftw={:#06x} mxcsr={:#x}",
            f.fcw,
            f.fsw,
            (f.fsw >> 11) & 7,
            f.ftw,
            f.mxcsr
        );
        for (k, r) in f.st.iter().enumerate() {
            if k % 4 == 0 {
                t.push_str("\n    ");
            }
            let hex: String = r.iter().rev().map(|b| format!("{b:02x}")).collect();
            let _ = write!(t, "r{k}={hex} ");
        }
    }
    if f.xmm != d.xmm || f.ymm_hi != d.ymm_hi {
        for k in 0..16 {
            if k % 2 == 0 {
                t.push_str("\n    ");
            }
            let _ = write!(t, "ymm{k}={:032x}_{:032x} ", f.ymm_hi[k], f.xmm[k]);
        }
    }
    t
}

/// The host CPU's brand string (CPUID 0x8000_0002..4), for the summary.
fn host_cpu_name() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        if __cpuid(0x8000_0000).eax >= 0x8000_0004 {
            let mut b = Vec::with_capacity(48);
            for leaf in 0x8000_0002u32..=0x8000_0004 {
                let r = __cpuid(leaf);
                for v in [r.eax, r.ebx, r.ecx, r.edx] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
            }
            return String::from_utf8_lossy(&b)
                .trim_matches(char::from(0))
                .trim()
                .to_string();
        }
    }
    "unknown".to_string()
}

fn render_divergence(case: &Case, out: &Outcome, diffs: &[Diff], original_len: usize) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "--- divergence in {} ({}), case {}",
        case.mode.name(),
        case.mode.oracle(),
        case.origin
    );
    let _ = writeln!(
        t,
        "code ({} items, minimized from {original_len}):",
        case.items.len()
    );
    t.push_str(&listing(case));
    let _ = writeln!(
        t,
        "initial state:\n    {}",
        describe_state(&case.init, case.mode.bits())
    );
    let _ = writeln!(t, "kvm:    {}", describe_end(case, &out.asm, &out.kvm));
    let _ = writeln!(t, "interp: {}", describe_end(case, &out.asm, &out.interp));
    let _ = writeln!(t, "differences (kvm | interp):");
    for d in diffs {
        let _ = writeln!(t, "  * {:<28} {} | {}", d.field, d.kvm, d.interp);
    }
    t
}

/// The mnemonic of the last reachable test item before where KVM stopped
/// (or the last test item), for grouping divergences.
fn culprit(case: &Case) -> String {
    case.items
        .iter()
        .rev()
        .find(|it| !it.setup)
        .map(|it| format!("{:?}", it.instr.code()))
        .unwrap_or_else(|| "(empty)".into())
}

/// Runs cases and collects the summary.
pub struct Campaign<'a> {
    pub h: Harness,
    pub summary: Summary,
    cfg: CampaignConfig,
    out: &'a mut dyn Write,
    seen: BTreeMap<(Mode, String), usize>,
    minimized: usize,
    printed: usize,
}

impl<'a> Campaign<'a> {
    pub fn new(cfg: CampaignConfig, out: &'a mut dyn Write) -> Result<Self, DifftestError> {
        let mut h = Harness::new()?;
        h.interp.set_tier(cfg.tier)?;
        Ok(Campaign {
            summary: Summary {
                tier: cfg.tier,
                probe: Some(h.probe.clone()),
                ..Default::default()
            },
            h,
            cfg,
            out,
            seen: BTreeMap::new(),
            minimized: 0,
            printed: 0,
        })
    }

    /// Run one case; returns its verdict (and records it).
    pub fn run_case(
        &mut self,
        case: &Case,
        gen: Option<&mut Generator>,
    ) -> Result<Verdict, DifftestError> {
        let t0 = Instant::now();
        let stats = self.summary.modes.entry(case.mode).or_default();
        stats.cases += 1;
        let an = match analyze(case.mode, &case.items) {
            Ok(a) => a,
            Err(e) => {
                stats.invalid += 1;
                if self.summary.broken.len() < 20 {
                    self.summary.broken.push(format!(
                        "{}: invalid case {}: {e}",
                        case.mode.name(),
                        case.origin
                    ));
                }
                return Ok(Verdict::Broken(e));
            }
        };
        let out = match self.h.run(case) {
            Ok(o) => o,
            Err(DifftestError::Assemble(e)) => {
                stats.invalid += 1;
                return Ok(Verdict::Broken(e));
            }
            Err(e) => return Err(e),
        };
        let v = compare(case, &an, &out);
        let stats = self.summary.modes.entry(case.mode).or_default();
        let dt = t0.elapsed();
        stats.time += dt;
        if stats.slowest.as_ref().is_none_or(|(_, t)| dt > *t) {
            stats.slowest = Some((case.origin.clone(), dt));
        }
        match &v {
            Verdict::Match => {
                stats.matched += 1;
                self.cover(case);
            }
            Verdict::BothTimedOut => stats.both_timed_out += 1,
            Verdict::Settled(name) => {
                stats.settled += 1;
                self.cover(case);
                *self.summary.settled.entry((case.mode, *name)).or_default() += 1;
            }
            Verdict::Broken(m) => {
                stats.broken += 1;
                if self.summary.broken.len() < 20 {
                    self.summary.broken.push(format!(
                        "{}: case {}: {m}",
                        case.mode.name(),
                        case.origin
                    ));
                }
            }
            Verdict::Refused { rip, message } => {
                stats.refused += 1;
                let _ = gen;
                let what = match code_at(case, *rip) {
                    Some(c) => format!("{c:?}"),
                    None => format!("(at {rip:#x}) {}", message.lines().next().unwrap_or("")),
                };
                let e = self
                    .summary
                    .refusals
                    .entry((case.mode, what))
                    .or_insert_with(|| (0, case.origin.clone()));
                e.0 += 1;
            }
            Verdict::Diverged(diffs) => {
                stats.diverged += 1;
                self.cover(case);
                self.divergence(case, &out, diffs)?;
            }
        }
        Ok(v)
    }

    fn cover(&mut self, case: &Case) {
        for it in &case.items {
            if !it.setup {
                *self.summary.coverage.entry(it.instr.code()).or_default() += 1;
                *self
                    .summary
                    .by_group
                    .entry((group_of(&it.instr), case.mode.oracle()))
                    .or_default() += 1;
            }
        }
    }

    fn divergence(
        &mut self,
        case: &Case,
        out: &Outcome,
        diffs: &[Diff],
    ) -> Result<(), DifftestError> {
        let pre = format!("{} [{}]", culprit(case), fields(diffs).join(","));
        let key = (case.mode, pre.clone());
        if let Some(&k) = self.seen.get(&key) {
            if let Some(d) = self.summary.divergences.get_mut(k) {
                d.count += 1;
            }
            return Ok(());
        }
        let mut report = String::new();
        let mut signature = pre.clone();
        if self.minimized < self.cfg.max_reports.saturating_mul(4).max(50) {
            self.minimized += 1;
            let (small, _runs) = minimize(&mut self.h, case, diffs)?;
            // Re-run the minimized case for its own report.
            let an = analyze(small.mode, &small.items).ok();
            let rerun = self.h.run(&small).ok();
            if let (Some(an), Some(o)) = (an, rerun) {
                if let Verdict::Diverged(d2) = compare(&small, &an, &o) {
                    signature = format!("{} [{}]", culprit(&small), fields(&d2).join(","));
                    report = render_divergence(&small, &o, &d2, case.items.len());
                }
            }
        }
        // The same minimized divergence was seen before: count it there.
        if let Some(k) = self
            .summary
            .divergences
            .iter()
            .position(|d| d.mode == case.mode && d.signature == signature)
        {
            self.summary.divergences[k].count += 1;
            self.seen.insert(key, k);
            return Ok(());
        }
        if report.is_empty() {
            report = render_divergence(case, out, diffs, case.items.len());
        }
        if self.printed < self.cfg.max_reports {
            self.printed += 1;
            let _ = writeln!(self.out, "{report}");
        }
        self.seen.insert(key, self.summary.divergences.len());
        self.summary.divergences.push(Divergence {
            mode: case.mode,
            signature,
            count: 1,
            report,
        });
        Ok(())
    }

    /// The targeted corpora for `mode`.
    pub fn run_targeted(&mut self, mode: Mode) -> Result<(), DifftestError> {
        let cases = corpus::cases(mode, self.cfg.seed);
        let n = cases.len() as u64;
        for (k, c) in cases.iter().enumerate() {
            self.run_case(c, None)?;
            self.progress(mode, k as u64 + 1, n);
        }
        Ok(())
    }

    /// `n` random cases in `mode`.
    pub fn run_random(&mut self, mode: Mode, n: u64) -> Result<(), DifftestError> {
        let mut g = Generator::new(mode);
        g.max_len = self.cfg.max_len;
        g.isa_only = self.cfg.isa_only;
        let range = match self.cfg.only {
            Some(k) => k..k + 1,
            None => 0..n,
        };
        for k in range {
            let mut rng = Rng::derive(self.cfg.seed, (mode as u64) << 48 | k);
            let case = g.case(&mut rng, format!("seed {} random #{k}", self.cfg.seed));
            let v = self.run_case(&case, Some(&mut g))?;
            if self.cfg.only.is_some() {
                self.show(&case, &v)?;
            }
            self.progress(mode, k + 1, n);
        }
        Ok(())
    }

    /// Print a case, both outcomes and the verdict.
    fn show(&mut self, case: &Case, v: &Verdict) -> Result<(), DifftestError> {
        let out = self.h.run(case)?;
        let mut t = String::new();
        let _ = writeln!(t, "--- {} ({})", case.origin, case.mode.name());
        t.push_str(&listing(case));
        let _ = writeln!(
            t,
            "initial state:\n    {}",
            describe_state(&case.init, case.mode.bits())
        );
        let _ = writeln!(t, "kvm:    {}", describe_end(case, &out.asm, &out.kvm));
        let _ = writeln!(
            t,
            "        {}",
            describe_state(&out.kvm.state, case.mode.bits())
        );
        let _ = writeln!(t, "interp: {}", describe_end(case, &out.asm, &out.interp));
        let _ = writeln!(
            t,
            "        {}",
            describe_state(&out.interp.state, case.mode.bits())
        );
        let _ = writeln!(t, "verdict: {v:?}");
        let _ = writeln!(self.out, "{t}");
        Ok(())
    }

    fn progress(&mut self, mode: Mode, done: u64, of: u64) {
        let every = self.cfg.progress_every;
        if every > 0 && (done % every == 0 || done == of) {
            let s = self.summary.modes.get(&mode).cloned().unwrap_or_default();
            let _ = writeln!(
                self.out,
                "[{}] {done}/{of}: {} match, {} diverged, {} refused ({:.0} cases/s)",
                mode.name(),
                s.matched,
                s.diverged,
                s.refused,
                s.per_second()
            );
        }
    }

    pub fn finish(mut self, start: Instant) -> Summary {
        self.summary.elapsed = start.elapsed();
        self.summary
    }
}

/// Run a whole campaign, writing divergence reports and progress to `out`.
pub fn run_campaign(cfg: &CampaignConfig, out: &mut dyn Write) -> Result<Summary, DifftestError> {
    let start = Instant::now();
    let mut c = Campaign::new(cfg.clone(), out)?;
    let modes: BTreeSet<Mode> = cfg.modes.iter().copied().collect();
    if cfg.only.is_none() && modes.iter().any(|m| m.bits() != 64) {
        c.summary.sdm = Some(super::sdm::check_bcd(&mut c.h.interp)?);
    }
    for mode in modes {
        if matches!(cfg.corpus, Corpus::Targeted | Corpus::All) {
            c.run_targeted(mode)?;
        }
        if matches!(cfg.corpus, Corpus::Random | Corpus::All) {
            c.run_random(mode, cfg.cases)?;
        }
    }
    Ok(c.finish(start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn group(bytes: &[u8]) -> &'static str {
        group_of(&Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE).decode())
    }

    #[test]
    fn each_instruction_has_its_group() {
        assert_eq!(group(&[0x48, 0x01, 0xd8]), "integer"); // add rax, rbx
        assert_eq!(group(&[0xf3, 0xa4]), "string"); // rep movsb
        assert_eq!(group(&[0x0f, 0xa2]), "system"); // cpuid
        assert_eq!(group(&[0xd9, 0xe8]), "x87"); // fld1
        assert_eq!(group(&[0x0f, 0x58, 0xc1]), "sse"); // addps xmm0, xmm1
        assert_eq!(group(&[0xc5, 0xf3, 0x5a, 0xc2]), "v2/v3"); // vcvtsd2ss
        assert_eq!(group(&[0x66, 0x0f, 0x38, 0x17, 0xc1]), "v2/v3"); // ptest
        assert!(GROUPS.contains(&"v2/v3"));
    }
}
