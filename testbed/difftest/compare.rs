//! Comparing the two sides of a case, with the masking rules:
//!
//! - flags (and x87 condition codes) the SDM leaves undefined at the point
//!   where the case stopped are masked, in RFLAGS and in the RFLAGS image
//!   of an exception frame;
//! - general registers holding an undefined result are skipped;
//! - a stop-port write's data (AL) is not compared, only the port;
//! - x87 FIP/FDP/FOP are not compared (Sapphire Rapids deprecates FCS/FDS
//!   and the emulator does not maintain them);
//! - segment attributes are compared only for non-null selectors.

use std::fmt::Write as _;

use cpu_interp::state::{CpuState, Segment};

use super::case::{Analysis, Assembled, Case, Point, ARITH};
use super::env;
use super::harness::{End, IoEvent, Outcome, Snapshot};
use super::Mode;

/// One differing field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diff {
    pub field: String,
    pub kvm: String,
    pub interp: String,
}

impl Diff {
    fn new(field: impl Into<String>, kvm: impl Into<String>, interp: impl Into<String>) -> Self {
        Diff {
            field: field.into(),
            kvm: kvm.into(),
            interp: interp.into(),
        }
    }
}

/// The verdict on one case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Match,
    Diverged(Vec<Diff>),
    /// KVM refused an instruction: no oracle.
    Refused {
        rip: u64,
        message: String,
    },
    /// Both sides ran out of time (a case that loops): nothing to compare.
    BothTimedOut,
    /// The harness could not run the case on KVM.
    Broken(String),
    /// KVM's instruction emulator did not raise the exception the SDM
    /// requires at an item (a settled emulator error, named here), and the
    /// interpreter raised exactly that exception there.
    Settled(&'static str),
}

/// An exception frame found on the stack of a stub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub vector: u8,
    pub error_code: Option<u64>,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    /// Address of the RFLAGS image.
    pub rflags_at: u64,
    pub width: u64,
}

fn read_le(mem: &[u8], at: u64, width: u64) -> Option<u64> {
    let a = usize::try_from(at).ok()?;
    let w = width as usize;
    let bytes = mem.get(a..a.checked_add(w)?)?;
    let mut b = [0u8; 8];
    b[..w].copy_from_slice(bytes);
    Some(u64::from_le_bytes(b))
}

/// Where a side stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// At the terminator.
    Done,
    /// In the stub of `vector`.
    Vector(u8),
    /// Somewhere else.
    Elsewhere(u64),
}

pub fn stop_of(case: &Case, s: &CpuState, mem: &[u8], asm: &Assembled) -> Stop {
    // A 64-bit code segment's base is ignored (SDM vol. 3, 3.2.4): KVM-PVM
    // may leave a garbage base cached in CS after delivering an exception
    // through a damaged descriptor (soak 20261207, `--tier jit`, 64-bit
    // ring 0 case 9312).
    let cs_base = if s.sregs.efer & cpu_interp::cpu::EFER_LMA != 0 && s.sregs.cs.l {
        0
    } else {
        s.sregs.cs.base
    };
    if let Some(v) = env::stub_vector(cs_base, s.regs.rip) {
        // Ring-3 cases end with UD2: its frame points at it.
        if case.mode.ring() == 3 && v == env::VECTOR_END {
            if let Some(f) = frame(case.mode, s, mem, v, case.init.sregs.cs.selector) {
                if f.rip == asm.term_addr {
                    return Stop::Done;
                }
            }
        }
        return Stop::Vector(v);
    }
    if cs_base.wrapping_add(s.regs.rip) == asm.end_addr {
        return Stop::Done;
    }
    Stop::Elsewhere(s.regs.rip)
}

/// The frame the stub of `vector` sits on, in `mode`, interrupting code
/// with selector `cs`.
pub fn frame(mode: Mode, s: &CpuState, mem: &[u8], vector: u8, cs: u16) -> Option<Frame> {
    let width: u64 = if mode.long() {
        8
    } else if mode.real() {
        2
    } else {
        4
    };
    let sp = s
        .sregs
        .ss
        .base
        .wrapping_add(s.regs.gpr[4] & if mode.real() { 0xffff } else { u64::MAX });
    let cs = u64::from(cs);
    let at = |k: u64| read_le(mem, sp + k * width, width);
    // Real mode pushes no error code; otherwise CS sits one slot further
    // up when one was pushed.
    let (ec, base) = if mode.real() || at(1)? == cs {
        (None, 0)
    } else if at(2)? == cs {
        (Some(at(0)?), 1)
    } else {
        return None;
    };
    Some(Frame {
        vector,
        error_code: ec,
        rip: at(base)?,
        cs: at(base + 1)?,
        rflags: at(base + 2)?,
        rflags_at: sp + (base + 2) * width,
        width,
    })
}

fn seg_diffs(name: &str, a: &Segment, b: &Segment, out: &mut Vec<Diff>) {
    if a.selector != b.selector {
        out.push(Diff::new(
            format!("{name}.selector"),
            format!("{:#06x}", a.selector),
            format!("{:#06x}", b.selector),
        ));
        return;
    }
    if a.selector & !3 == 0 {
        return;
    }
    let show = |s: &Segment| {
        format!(
            "base {:#x} limit {:#x} type {:#x} dpl {} p {} db {} l {}",
            s.base, s.limit, s.type_, s.dpl, s.present as u8, s.db as u8, s.l as u8
        )
    };
    let key = |s: &Segment| (s.base, s.limit, s.type_, s.dpl, s.present, s.db, s.l);
    if key(a) != key(b) {
        out.push(Diff::new(name, show(a), show(b)));
    }
}

const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

/// Abridged x87 tag (bit set: register not empty).
fn abridged(ftw: u16) -> u8 {
    (0..8).fold(0, |acc, r| {
        if (ftw >> (2 * r)) & 3 != 3 {
            acc | (1 << r)
        } else {
            acc
        }
    })
}

/// Compare two final states under the undefined-ness at `p`.
pub fn state_diffs(a: &CpuState, b: &CpuState, p: &Point, out: &mut Vec<Diff>) {
    for (n, name) in GPR_NAMES.iter().enumerate() {
        if p.poison & (1 << n) != 0 {
            continue;
        }
        if a.regs.gpr[n] != b.regs.gpr[n] {
            out.push(Diff::new(
                *name,
                format!("{:#018x}", a.regs.gpr[n]),
                format!("{:#018x}", b.regs.gpr[n]),
            ));
        }
    }
    if a.regs.rip != b.regs.rip {
        out.push(Diff::new(
            "rip",
            format!("{:#x}", a.regs.rip),
            format!("{:#x}", b.regs.rip),
        ));
    }
    let fmask = !(p.mask & 0xffff_ffff);
    if (a.regs.rflags ^ b.regs.rflags) & fmask != 0 {
        out.push(Diff::new(
            format!("rflags (undefined {:#x} masked)", p.mask & ARITH),
            format!("{:#x}", a.regs.rflags),
            format!("{:#x}", b.regs.rflags),
        ));
    }
    let (sa, sb) = (&a.sregs, &b.sregs);
    for (name, x, y) in [
        ("cs", &sa.cs, &sb.cs),
        ("ss", &sa.ss, &sb.ss),
        ("ds", &sa.ds, &sb.ds),
        ("es", &sa.es, &sb.es),
        ("fs", &sa.fs, &sb.fs),
        ("gs", &sa.gs, &sb.gs),
        ("tr", &sa.tr, &sb.tr),
        ("ldtr", &sa.ldt, &sb.ldt),
    ] {
        seg_diffs(name, x, y, out);
    }
    // In 64-bit mode FS and GS bases count whatever the selector (64-bit
    // code loads them through WRMSR and SWAPGS, with null selectors).
    if sa.efer & (1 << 10) != 0 {
        for (name, x, y) in [("fs.base", &sa.fs, &sb.fs), ("gs.base", &sa.gs, &sb.gs)] {
            // (Non-null selectors: seg_diffs compared the base already.)
            if x.selector & !3 == 0 && x.base != y.base {
                out.push(Diff::new(
                    name,
                    format!("{:#x}", x.base),
                    format!("{:#x}", y.base),
                ));
            }
        }
    }
    let (ma, mb) = (&a.msrs, &b.msrs);
    for (name, x, y) in [
        ("star", ma.star, mb.star),
        ("lstar", ma.lstar, mb.lstar),
        ("cstar", ma.cstar, mb.cstar),
        ("sfmask", ma.sfmask, mb.sfmask),
        ("kernel_gs_base", ma.kernel_gs_base, mb.kernel_gs_base),
        ("sysenter_cs", ma.sysenter_cs, mb.sysenter_cs),
        ("sysenter_esp", ma.sysenter_esp, mb.sysenter_esp),
        ("sysenter_eip", ma.sysenter_eip, mb.sysenter_eip),
        ("pat", ma.pat, mb.pat),
        ("tsc_aux", ma.tsc_aux, mb.tsc_aux),
    ] {
        if x != y {
            out.push(Diff::new(name, format!("{x:#x}"), format!("{y:#x}")));
        }
    }
    let (da, db) = (&a.debug, &b.debug);
    for (k, (x, y)) in da.db.iter().zip(db.db.iter()).enumerate() {
        if x != y {
            out.push(Diff::new(
                format!("dr{k}"),
                format!("{x:#x}"),
                format!("{y:#x}"),
            ));
        }
    }
    for (name, x, y) in [("dr6", da.dr6, db.dr6), ("dr7", da.dr7, db.dr7)] {
        if x != y {
            out.push(Diff::new(name, format!("{x:#x}"), format!("{y:#x}")));
        }
    }
    if sa.cr8 != sb.cr8 && sa.efer & (1 << 10) != 0 {
        out.push(Diff::new(
            "cr8",
            format!("{:#x}", sa.cr8),
            format!("{:#x}", sb.cr8),
        ));
    }
    for (name, x, y) in [
        ("cr0", sa.cr0 | 0x10, sb.cr0 | 0x10),
        ("cr2", sa.cr2, sb.cr2),
        ("cr3", sa.cr3, sb.cr3),
        ("cr4", sa.cr4, sb.cr4),
        ("efer", sa.efer, sb.efer),
    ] {
        if x != y {
            out.push(Diff::new(name, format!("{x:#x}"), format!("{y:#x}")));
        }
    }
    if sa.gdt != sb.gdt || sa.idt != sb.idt {
        out.push(Diff::new(
            "gdtr/idtr",
            format!("{:x?} {:x?}", sa.gdt, sa.idt),
            format!("{:x?} {:x?}", sb.gdt, sb.idt),
        ));
    }
    // x87 / SSE.
    let (fa, fb) = (&a.fpu, &b.fpu);
    if fa.fcw != fb.fcw {
        out.push(Diff::new(
            "fcw",
            format!("{:#x}", fa.fcw),
            format!("{:#x}", fb.fcw),
        ));
    }
    let mut cc_mask = ((p.mask >> 32) & 0xffff) as u16;
    // A transcendental's result registers may differ within the SDM's
    // bound (vol. 1, 8.3.10: less than 1 ulp rounding to nearest, 1.5 ulps
    // in the directed modes, which allows 2 steps from the correctly
    // rounded value the interpreter computes). Only those registers; and
    // C1 (which says which way the result was rounded) only where a result
    // does differ. Every other status bit and register is exact.
    let bound: u128 = if (fa.fcw >> 10) & 3 == 0 { 1 } else { 2 };
    let mut rounded_apart = false;
    for r in 0..8 {
        let (x, y) = (fa.st[r], fb.st[r]);
        let differ = if p.fuzzy_x87 && p.fuzzy_regs & (1 << r) != 0 {
            let d = x87_ulps_apart(&x, &y);
            rounded_apart |= d != 0 && d <= bound;
            d > bound
        } else {
            x != y
        };
        if differ {
            out.push(Diff::new(
                format!("r{r} (x87 physical)"),
                hex(&fa.st[r]),
                hex(&fb.st[r]),
            ));
        }
    }
    if p.fuzzy_x87 {
        // C1 says whether the result was rounded up, judged against each
        // side's own approximation: it may differ even where the results
        // agree (FCOS of a tiny argument: 1.0 either way, C1 1 here, 0 on
        // the processor).
        cc_mask |= 1 << 9;
    }
    if rounded_apart {
        // A result one step away from the exact value on one side only:
        // that side says inexact (PE, and ES/B when PE is unmasked).
        cc_mask |= 1 << 5;
        if (fa.fsw ^ fb.fsw) & 0x1f == 0 && fa.fcw & 0x20 == 0 {
            cc_mask |= 0x8080;
        }
    }
    if (fa.fsw ^ fb.fsw) & !cc_mask != 0 {
        out.push(Diff::new(
            format!("fsw (undefined {cc_mask:#x} masked)"),
            format!("{:#x}", fa.fsw),
            format!("{:#x}", fb.fsw),
        ));
    }
    if abridged(fa.ftw) != abridged(fb.ftw) {
        out.push(Diff::new(
            "ftw (abridged)",
            format!("{:#04x}", abridged(fa.ftw)),
            format!("{:#04x}", abridged(fb.ftw)),
        ));
    }
    for r in 0..16 {
        if fa.xmm[r] != fb.xmm[r] {
            out.push(Diff::new(
                format!("xmm{r}"),
                format!("{:#034x}", fa.xmm[r]),
                format!("{:#034x}", fb.xmm[r]),
            ));
        }
    }
    for r in 0..16 {
        if fa.ymm_hi[r] != fb.ymm_hi[r] {
            out.push(Diff::new(
                format!("ymm{r}[255:128]"),
                format!("{:#034x}", fa.ymm_hi[r]),
                format!("{:#034x}", fb.ymm_hi[r]),
            ));
        }
    }
    if a.xcr0 != b.xcr0 {
        out.push(Diff::new(
            "xcr0",
            format!("{:#x}", a.xcr0),
            format!("{:#x}", b.xcr0),
        ));
    }
    if fa.mxcsr != fb.mxcsr {
        out.push(Diff::new(
            "mxcsr",
            format!("{:#x}", fa.mxcsr),
            format!("{:#x}", fb.mxcsr),
        ));
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().rev().map(|x| format!("{x:02x}")).collect()
}

/// Byte ranges where `a` and `b` differ, at most `max` of them.
/// How many units in the last place apart two x87 registers are (as
/// ordinals of the magnitude, so that 0x3ffe_ffff.. and 0x3fff_8000.. are
/// neighbours); `u128::MAX` for different signs, or where one is not a
/// normal or denormal finite value and the bits differ.
fn x87_ulps_apart(a: &[u8; 10], b: &[u8; 10]) -> u128 {
    if a == b {
        return 0;
    }
    let val = |r: &[u8; 10]| {
        let mut w = [0u8; 16];
        w[..10].copy_from_slice(r);
        u128::from_le_bytes(w)
    };
    let (x, y) = (val(a), val(b));
    let finite = |v: u128| {
        let e = (v >> 64) as u16 & 0x7fff;
        let int = v >> 63 & 1 != 0;
        e != 0x7fff && (int || e == 0)
    };
    if x >> 79 != y >> 79 || !finite(x) || !finite(y) {
        return u128::MAX;
    }
    let ord = |v: u128| ((v >> 64) & 0x7fff) << 63 | (v & ((1 << 63) - 1));
    ord(x).abs_diff(ord(y))
}

fn mem_diffs(a: &[u8], b: &[u8], masks: &[(u64, u8)], out: &mut Vec<Diff>) {
    let n = a.len().min(b.len());
    let masked = |i: usize| -> u8 {
        masks
            .iter()
            .filter(|(at, _)| *at == i as u64)
            .fold(0xff, |m, (_, k)| m & !k)
    };
    let mut i = 0;
    let mut ranges = 0;
    while i < n {
        if (a[i] ^ b[i]) & masked(i) == 0 {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && i - start < 32 && (a[i] ^ b[i]) & masked(i) != 0 {
            i += 1;
        }
        ranges += 1;
        if ranges > 8 {
            out.push(Diff::new("memory", "(more ranges)", "(more ranges)"));
            return;
        }
        out.push(Diff::new(
            format!("memory {start:#06x}..{i:#06x}"),
            a[start..i]
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>(),
            b[start..i]
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>(),
        ));
    }
    if a.len() != b.len() {
        out.push(Diff::new(
            "memory size",
            a.len().to_string(),
            b.len().to_string(),
        ));
    }
}

fn end_name(e: &End) -> String {
    match e {
        End::Stop => "stop".into(),
        End::Halted => "hlt".into(),
        End::TripleFault => "triple fault".into(),
        End::Refused { .. } => "refused".into(),
        End::Timeout => "timeout".into(),
        End::Failed(m) => format!("failed: {m}"),
    }
}

/// Compare the outcome of `case`.
pub fn compare(case: &Case, an: &Analysis, out: &Outcome) -> Verdict {
    let (k, i) = (&out.kvm, &out.interp);
    match &k.end {
        End::Refused { rip, message } => {
            return Verdict::Refused {
                rip: *rip,
                message: message.clone(),
            }
        }
        End::Failed(m) => return Verdict::Broken(m.clone()),
        End::Timeout if i.end == End::Timeout => return Verdict::BothTimedOut,
        _ => {}
    }
    if let Some(name) = settled_erratum(case, &out.asm, k, i) {
        return Verdict::Settled(name);
    }
    if let Some(name) = settled_delivery_through_a_changed_gdt(case, &out.asm, k, i) {
        return Verdict::Settled(name);
    }
    if let Some(name) = settled_undeliverable_sdm_fault(case, &out.asm, k, i) {
        return Verdict::Settled(name);
    }
    if let Some(name) = settled_descriptor_table_outside_ram(case, k, i) {
        return Verdict::Settled(name);
    }
    if let Some(name) = settled_stale_translation(case, &out.asm, k, i) {
        return Verdict::Settled(name);
    }
    let mut diffs = Vec::new();
    if k.end != i.end {
        diffs.push(Diff::new("end", end_name(&k.end), end_name(&i.end)));
        // A side that did not stop has no meaningful state.
        if !matches!(k.end, End::Stop | End::Halted) || !matches!(i.end, End::Stop | End::Halted) {
            return Verdict::Diverged(diffs);
        }
    }
    if k.end == End::TripleFault {
        return Verdict::Match;
    }
    if k.io != i.io {
        diffs.push(Diff::new(
            "i/o",
            format!("{:x?}", k.io),
            format!("{:x?}", i.io),
        ));
    }
    diff_snapshots(case, an, &out.asm, k, i, &mut diffs);
    if diffs.is_empty() {
        Verdict::Match
    } else {
        Verdict::Diverged(diffs)
    }
}

/// On the emulator oracle: did the interpreter stop at an item with an
/// [`SdmFault`](super::case::SdmFault), with exactly that exception and
/// error code, where KVM did not?
fn settled_erratum(
    case: &Case,
    asm: &Assembled,
    k: &Snapshot,
    i: &Snapshot,
) -> Option<&'static str> {
    if case.mode.oracle() != super::Oracle::Emulator || i.end != End::Stop {
        return None;
    }
    let cs = case.init.sregs.cs.selector;
    let Stop::Vector(v) = stop_of(case, &i.state, &i.mem, asm) else {
        return None;
    };
    let f = frame(case.mode, &i.state, &i.mem, v, cs)?;
    let item = case.items.get(asm.index_of(f.rip)?)?;
    // An LGDT/LIDT whose operand a random item (not the system-instruction
    // generator) wrote: the interpreter's #GP(0) for a non-canonical base,
    // where KVM loaded that base (its final GDTR/IDTR shows it).
    if item.sdm_fault.is_none()
        && case.mode.long()
        && v == 13
        && f.error_code == Some(0)
        && matches!(
            item.instr.mnemonic(),
            iced_x86::Mnemonic::Lgdt | iced_x86::Mnemonic::Lidt
        )
        && (!canonical(k.state.sregs.gdt.base) || !canonical(k.state.sregs.idt.base))
    {
        return Some(LGDT_NONCANONICAL);
    }
    let want = item.sdm_fault?;
    // (Real mode pushes no error code.)
    let ec = if case.mode.real() {
        None
    } else {
        want.error_code
    };
    if want.vector != v || ec != f.error_code {
        return None;
    }
    // KVM went past it (or faulted differently).
    let kvm_same = matches!(stop_of(case, &k.state, &k.mem, asm), Stop::Vector(kv) if kv == v)
        && frame(case.mode, &k.state, &k.mem, v, cs).is_some_and(|kf| kf.rip == f.rip);
    (!kvm_same).then_some(want.erratum)
}

/// KVM-PVM delivers exceptions in long mode without checking the gate's
/// code-segment descriptor from the GDT (it loads whatever is there into
/// CS: a read-only data segment of DPL 1 with a garbage base in soak
/// 20261207's case 9312). When a case has loaded a GDT of
/// its own (LGDT) that a test item then damaged, the CPU (and the
/// interpreter) find no 64-bit code segment at the gate's selector: #GP
/// during delivery, #DF, triple fault (SDM 6.12.1.1 and 6.14); KVM delivers
/// the first exception as if the descriptor were intact. (Settled when the
/// case ran an LGDT, the interpreter triple-faulted and KVM stopped at an
/// exception stub.)
fn settled_delivery_through_a_changed_gdt(
    case: &Case,
    asm: &Assembled,
    k: &Snapshot,
    i: &Snapshot,
) -> Option<&'static str> {
    let lgdt = case
        .items
        .iter()
        .any(|it| it.instr.mnemonic() == iced_x86::Mnemonic::Lgdt);
    (case.mode.oracle() == super::Oracle::Emulator
        && case.mode.long()
        && lgdt
        && i.end == End::TripleFault
        && k.end == End::Stop
        && matches!(stop_of(case, &k.state, &k.mem, asm), Stop::Vector(_)))
    .then_some(
        "exception delivered although the gate's code segment in the case's own GDT is no \
             longer a 64-bit code segment (KVM-PVM does not read it; SDM: #GP, #DF, triple fault)",
    )
}

/// The settled LLDT/LTR error (KVM-PVM loads a 16-byte descriptor with a
/// non-canonical base) seen through a GDT the case damaged: a test item
/// (soak 20261210, 64-bit ring 0: REP MOVSD #123538, STD; REP STOSB
/// #149405) overwrote the case's own GDT copy before the LGDT that loads
/// it, including descriptor 1, the code segment of every IDT gate, but not
/// the LDT/TSS descriptor the LLDT/LTR then selects. The SDM's #GP(selector)
/// for the non-canonical base cannot be delivered: the gate's code segment
/// is no longer a present 64-bit ring-0 code segment, so #GP during
/// delivery, #DF, which fails the same way: triple fault (SDM vol. 3,
/// 6.12.1.1, 6.14, 6.15 "Interrupt 8"). KVM-PVM raises nothing and runs on.
///
/// Settled only when the SDM's outcome follows from the interpreter's own
/// final state: it triple-faulted with RIP at an LLDT/LTR item carrying the
/// non-canonical [`SdmFault`](super::case::SdmFault), KVM did not stop at
/// that item with that #GP, the descriptor the selector names in the final
/// GDT is a present LDT (LLDT) or available 64-bit TSS (LTR) with a
/// non-canonical base (so #GP(selector) is due), and the IDT gates of #GP
/// and #DF are present 64-bit interrupt/trap gates whose code-segment
/// selector does not name a present 64-bit code segment of DPL 0 in that
/// GDT (so neither can be delivered).
fn settled_undeliverable_sdm_fault(
    case: &Case,
    asm: &Assembled,
    k: &Snapshot,
    i: &Snapshot,
) -> Option<&'static str> {
    if case.mode.oracle() != super::Oracle::Emulator
        || !case.mode.long()
        || case.mode.ring() != 0
        || i.end != End::TripleFault
        || k.end != End::Stop
    {
        return None;
    }
    let sr = &i.state.sregs;
    // 64-bit code: CS's base is ignored (SDM vol. 3, 3.2.4).
    let at = asm.index_of(i.state.regs.rip)?;
    let item = case.items.get(at)?;
    let want = item.sdm_fault?;
    if item.instr.mnemonic() == iced_x86::Mnemonic::Wrmsr {
        return settled_wrmsr_fault_without_a_stack(case, asm, k, i, at, want);
    }
    let (name, type_) = match item.instr.mnemonic() {
        iced_x86::Mnemonic::Lldt => (LLDT_UNDELIVERABLE, 2),
        iced_x86::Mnemonic::Ltr => (LTR_UNDELIVERABLE, 9),
        _ => return None,
    };
    let sel = want.error_code?;
    if want.vector != 13 || sel & 7 != 0 || sel == 0 {
        return None;
    }
    // KVM went past the item (or stopped elsewhere), not at it with #GP.
    if kvm_gp_at(case, asm, k, at) {
        return None;
    }
    let mem = &i.mem;
    let gdt_entry = |sel: u64, width: u64| -> Option<(u64, u64)> {
        if sel & 4 != 0 || (sel & !7) + width - 1 > u64::from(sr.gdt.limit) {
            return None;
        }
        let a = sr.gdt.base.checked_add(sel & !7)?;
        let lo = read_le(mem, a, 8)?;
        let hi = if width == 16 {
            read_le(mem, a + 8, 8)?
        } else {
            0
        };
        Some((lo, hi))
    };
    // The SDM's #GP(selector): a present LDT/available TSS with a
    // non-canonical base.
    let (lo, hi) = gdt_entry(sel, 16)?;
    let access = (lo >> 40) & 0xff;
    let base = ((lo >> 16) & 0xff_ffff) | (((lo >> 56) & 0xff) << 24) | ((hi & 0xffff_ffff) << 32);
    if access & 0x1f != type_ || access & 0x80 == 0 || canonical(base) {
        return None;
    }
    // Neither #GP nor #DF can be delivered through its gate.
    let deliverable = |vector: u64| -> Option<bool> {
        if u64::from(sr.idt.limit) < vector * 16 + 15 {
            return None;
        }
        let g = read_le(mem, sr.idt.base.checked_add(vector * 16)?, 8)?;
        let gate_type = (g >> 40) & 0x1f;
        if g & (1 << 47) == 0 || !matches!(gate_type, 0xe | 0xf) {
            return None;
        }
        let cs_sel = (g >> 16) & 0xffff;
        if cs_sel & !3 == 0 {
            return Some(false);
        }
        let Some((d, _)) = gdt_entry(cs_sel, 8) else {
            return Some(false);
        };
        let code = d & (1 << 44) != 0 && d & (1 << 43) != 0;
        let present = d & (1 << 47) != 0;
        let dpl0 = (d >> 45) & 3 == 0;
        let long = d & (1 << 53) != 0 && d & (1 << 54) == 0;
        Some(code && present && dpl0 && long)
    };
    (!deliverable(13)? && !deliverable(8)?).then_some(name)
}

/// Did KVM stop with #GP raised by test item `at` (the frame's RIP at it)?
fn kvm_gp_at(case: &Case, asm: &Assembled, k: &Snapshot, at: usize) -> bool {
    let cs = case.init.sregs.cs.selector;
    matches!(stop_of(case, &k.state, &k.mem, asm), Stop::Vector(13))
        && frame(case.mode, &k.state, &k.mem, 13, cs)
            .is_some_and(|kf| asm.index_of(kf.rip) == Some(at))
}

/// The settled non-canonical WRMSR error (KVM-PVM accepts a non-canonical
/// LSTAR, FS/GS base...) where the SDM's #GP(0) cannot be pushed: a test
/// item (translation-tier soak seed 20261212, 64-bit ring 0, case 150708:
/// LEAVE with RBP in the read-only window page) left RSP where the frame
/// lands on a page that is not supervisor-writable with CR0.WP set (or not
/// present). #GP, then #PF on the same stack, then #DF, the same: triple
/// fault (SDM vol. 3, 6.14.2 and 6.15 "Interrupt 8"); KVM-PVM raises
/// nothing and runs on.
///
/// Settled only when that follows from the interpreter's own final state:
/// it triple-faulted with RIP at the WRMSR item carrying the #GP(0)
/// [`SdmFault`](super::case::SdmFault), KVM did not stop at that item with
/// #GP, the #GP, #PF and #DF gates use no IST (the frames go below the
/// current RSP, without a stack switch in ring 0), and the 48 bytes below
/// RSP aligned down to 16 are not all writable through the interpreter's
/// final page tables.
fn settled_wrmsr_fault_without_a_stack(
    case: &Case,
    asm: &Assembled,
    k: &Snapshot,
    i: &Snapshot,
    at: usize,
    want: super::case::SdmFault,
) -> Option<&'static str> {
    if want.vector != 13 || want.error_code != Some(0) {
        return None;
    }
    if kvm_gp_at(case, asm, k, at) {
        return None;
    }
    let sr = &i.state.sregs;
    let mem = &i.mem;
    for vector in [13u64, 14, 8] {
        if u64::from(sr.idt.limit) < vector * 16 + 15 {
            return None;
        }
        let hi = read_le(mem, sr.idt.base.checked_add(vector * 16 + 4)?, 4)?;
        if hi & 7 != 0 {
            return None; // an IST stack: the frame would go elsewhere
        }
    }
    let top = i.state.regs.gpr[cpu_interp::state::gpr::RSP] & !15;
    let frame_lo = top.checked_sub(48)?;
    let writable = |lin: u64| -> Option<bool> {
        let wp = sr.cr0 & (1 << 16) != 0;
        let mut table = sr.cr3 & 0x000f_ffff_ffff_f000;
        let mut rw = true;
        for level in (0..4u32).rev() {
            let idx = (lin >> (12 + 9 * level)) & 0x1ff;
            let e = read_le(mem, table.checked_add(idx * 8)?, 8)?;
            if e & 1 == 0 {
                return Some(false);
            }
            rw &= e & 2 != 0;
            if (level == 1 || level == 2) && e & 0x80 != 0 {
                break;
            }
            table = e & 0x000f_ffff_ffff_f000;
        }
        Some(rw || !wp)
    };
    let all_writable = writable(frame_lo)? && writable(top - 1)?;
    (!all_writable).then_some(WRMSR_UNDELIVERABLE)
}

const WRMSR_UNDELIVERABLE: &str =
    "WRMSR of a non-canonical address accepted (KVM-PVM; SDM: #GP(0)), the #GP undeliverable \
     because its frame lands on a page the CPU cannot write (SDM: #PF, #DF, triple fault)";
const LLDT_UNDELIVERABLE: &str =
    "LLDT of a 16-byte LDT descriptor with a non-canonical base accepted (KVM-PVM; SDM: \
     #GP(selector)), the #GP undeliverable through the case's damaged GDT (SDM: triple fault)";
const LTR_UNDELIVERABLE: &str =
    "LTR of a 16-byte TSS descriptor with a non-canonical base accepted (KVM-PVM; SDM: \
     #GP(selector)), the #GP undeliverable through the case's damaged GDT (SDM: triple fault)";

/// KVM-PVM's emulator never completes an instruction that reads a segment
/// descriptor from a table outside guest RAM (a GDT that a test item moved
/// by damaging the LGDT operand): no MMIO exit reaches the VMM and the
/// watchdog ends the case. The processor reads the bus there like any
/// other memory (the harness answers all ones, as unclaimed addresses do)
/// and goes on with that descriptor (SDM vol. 3, 3.4.3 and 3.5.1: the
/// descriptor is read from GDTR.base + index × 8). (Settled when KVM timed
/// out on the emulator oracle and the interpreter read a descriptor through
/// MMIO inside its final GDTR or IDTR.)
fn settled_descriptor_table_outside_ram(
    case: &Case,
    k: &Snapshot,
    i: &Snapshot,
) -> Option<&'static str> {
    if case.mode.oracle() != super::Oracle::Emulator || k.end != End::Timeout {
        return None;
    }
    let sr = &i.state.sregs;
    let inside = |at: u64, t: &cpu_interp::state::DescriptorTable| {
        at.wrapping_sub(t.base) <= u64::from(t.limit)
    };
    i.io
        .iter()
        .any(|e| matches!(e, IoEvent::MmioRead(at, _) if inside(*at, &sr.gdt) || inside(*at, &sr.idt)))
        .then_some(
            "a descriptor read from a table outside guest RAM never completes (KVM-PVM's \
             emulator; the CPU reads the bus: all ones here)",
        )
}

/// A test item changed a paging-structure entry of a page the case had
/// already used (e.g. a store through a segment base that lands in the
/// live page table) and no invalidation followed: SDM vol. 3, 4.10.4.3
/// lets the processor use either the cached translation or the new entry.
/// KVM-PVM's shadow MMU always sees the new entry; the interpreter, like
/// the CPU's TLB, may keep the old one. (Settled when KVM page-faulted on
/// the emulator oracle, the interpreter got past that instruction, and an
/// entry on the walk of KVM's CR2 differs from the initial memory.)
fn settled_stale_translation(
    case: &Case,
    asm: &Assembled,
    k: &Snapshot,
    i: &Snapshot,
) -> Option<&'static str> {
    if case.mode.oracle() != super::Oracle::Emulator || !case.mode.paged() {
        return None;
    }
    let cs = case.init.sregs.cs.selector;
    let Stop::Vector(14) = stop_of(case, &k.state, &k.mem, asm) else {
        return None;
    };
    let kf = frame(case.mode, &k.state, &k.mem, 14, cs)?;
    let k_at = asm.index_of(kf.rip)?;
    let i_past = match stop_of(case, &i.state, &i.mem, asm) {
        Stop::Done => true,
        Stop::Vector(v) => frame(case.mode, &i.state, &i.mem, v, cs)
            .and_then(|f| asm.index_of(f.rip))
            .is_some_and(|at| at > k_at),
        Stop::Elsewhere(_) => false,
    };
    // An INVLPG or a CR3 write makes the new entry binding on both sides.
    let invalidates = case.items.iter().any(|it| {
        it.instr.mnemonic() == iced_x86::Mnemonic::Invlpg
            || (it.instr.mnemonic() == iced_x86::Mnemonic::Mov
                && it.instr.op0_register() == iced_x86::Register::CR3)
    });
    if !i_past || invalidates {
        return None;
    }
    let pristine = env::image().into_iter().find(|(a, _)| *a == 0)?.1;
    let initial = |at: u64| -> Option<u64> {
        if at < env::CASE_AREA {
            read_le(&pristine, at, 8)
        } else {
            read_le(&case.area, at - env::CASE_AREA, 8)
        }
    };
    let cr2 = k.state.sregs.cr2;
    let mut table = k.state.sregs.cr3 & 0x000f_ffff_ffff_f000;
    for level in 0..4u64 {
        let at = table + ((cr2 >> (39 - 9 * level)) & 511) * 8;
        let now = read_le(&k.mem, at, 8)?;
        if now != initial(at)? {
            return Some(
                "a paging-structure entry changed without invalidation: KVM-PVM uses the new \
                 entry, the interpreter the cached translation (SDM 4.10.4.3 allows either)",
            );
        }
        if now & 1 == 0 || (level > 0 && now & 0x80 != 0) {
            return None;
        }
        table = now & 0x000f_ffff_ffff_f000;
    }
    None
}

/// The settled emulator error for a non-canonical GDTR/IDTR base (the same
/// text as the system-instruction generator's, so that they count together).
const LGDT_NONCANONICAL: &str =
    "LGDT/LIDT of a non-canonical base accepted (KVM-PVM; APM and KVM's own emulator: #GP(0))";

/// Is `a` canonical with 48-bit linear addresses?
fn canonical(a: u64) -> bool {
    ((a as i64) << 16 >> 16) as u64 == a
}

fn diff_snapshots(
    case: &Case,
    an: &Analysis,
    asm: &Assembled,
    k: &Snapshot,
    i: &Snapshot,
    diffs: &mut Vec<Diff>,
) {
    let cs = case.init.sregs.cs.selector;
    // Where did KVM stop, and what is undefined there?
    let (point, frame) = match stop_of(case, &k.state, &k.mem, asm) {
        Stop::Done => (
            an.end,
            frame(case.mode, &k.state, &k.mem, env::VECTOR_END, cs),
        ),
        Stop::Vector(v) => match frame(case.mode, &k.state, &k.mem, v, cs) {
            Some(f) => (an.at_addr(asm, f.rip), Some(f)),
            None => (an.at_addr(asm, u64::MAX), None),
        },
        Stop::Elsewhere(_) => (an.at_addr(asm, u64::MAX), None),
    };
    // KVM-PVM clears AC when it delivers an event in protected and long
    // mode; the SDM clears it only in real mode (the interpreter is right).
    let mut point = point;
    // A transcendental is always the last test item; its result registers
    // get the SDM's error bound only when the case ran through it.
    if matches!(stop_of(case, &k.state, &k.mem, asm), Stop::Done) {
        if let Some(last) = case.items.iter().rev().find(|it| !it.setup) {
            let m = last.instr.mnemonic();
            if super::fp::is_transcendental(m) {
                let top = usize::from((k.state.fpu.fsw >> 11) & 7);
                let two = matches!(m, iced_x86::Mnemonic::Fsincos | iced_x86::Mnemonic::Fptan);
                point.fuzzy_x87 = true;
                point.fuzzy_regs = (1 << top) | if two { 1 << ((top + 1) & 7) } else { 0 };
            }
        }
    }
    if case.mode.oracle() == super::Oracle::Emulator
        && !case.mode.real()
        && matches!(stop_of(case, &k.state, &k.mem, asm), Stop::Vector(_))
    {
        point.mask |= 1 << 18;
    }
    state_diffs(&k.state, &i.state, &point, diffs);
    if case.mode.oracle() == super::Oracle::Emulator {
        settle_iret_data_segments(case, k, i, diffs);
    }
    // Mask undefined flags in the frame's RFLAGS image (when both sides
    // put the frame at the same place).
    let mut masks = Vec::new();
    if let Some(f) = frame {
        if k.state.regs.gpr[4] == i.state.regs.gpr[4] {
            let m = point.mask & ARITH;
            for b in 0..f.width.min(8) {
                let mb = (m >> (8 * b)) as u8;
                if mb != 0 {
                    masks.push((f.rflags_at + b, mb));
                }
            }
        }
    }
    // KVM's emulator stores the present part of an access that straddles
    // into a faulting page before it reports the #PF (the CPU checks both
    // pages first): when both sides page-fault at the start of a page, the
    // bytes just below it are not compared (the generator avoids most such
    // accesses; an index register changed by a later setup can still make
    // one).
    if case.mode.oracle() == super::Oracle::Emulator
        && matches!(stop_of(case, &k.state, &k.mem, asm), Stop::Vector(14))
        && matches!(stop_of(case, &i.state, &i.mem, asm), Stop::Vector(14))
        && k.state.sregs.cr2 == i.state.sregs.cr2
        && k.state.sregs.cr2 & 0xfff == 0
    {
        let cr2 = k.state.sregs.cr2;
        for a in cr2.saturating_sub(15)..cr2 {
            masks.push((a, 0xff));
        }
    }
    // KVM's emulator carries out a read-modify-write as a read, then a
    // write: the read's page walk sets the accessed flag of the page's PTE
    // before the write faults on a read-only page. The CPU checks the
    // access as a write from the start (fix 4). On a write-protection #PF
    // (P and W/R set) that both sides report at the same CR2, the A flag of
    // that PTE is not compared on the emulator oracle.
    if case.mode.oracle() == super::Oracle::Emulator
        && case.mode.long()
        && matches!(stop_of(case, &k.state, &k.mem, asm), Stop::Vector(14))
        && matches!(stop_of(case, &i.state, &i.mem, asm), Stop::Vector(14))
        && k.state.sregs.cr2 == i.state.sregs.cr2
        && frame.is_some_and(|f| f.error_code.is_some_and(|e| e & 3 == 3))
        && k.state.sregs.cr2 < 2 << 20
    {
        masks.push((env::PT + (k.state.sregs.cr2 >> 12) * 8, 0x20));
    }
    mem_diffs(&k.mem, &i.mem, &masks, diffs);
}

/// IRET to an outer privilege level loads a null selector into each of
/// DS, ES, FS and GS whose descriptor's DPL is below the new CPL (SDM IRET,
/// RETURN-TO-OUTER-PRIVILEGE-LEVEL; the interpreter does). KVM-PVM's IRETQ
/// keeps them. On the emulator oracle, in a case with an IRET, a
/// data-segment selector that is null on the interpreter and non-null with
/// an RPL below 3 on KVM is not a divergence (the case may have come back
/// to ring 0 through an exception since, which leaves them as they were).
fn settle_iret_data_segments(case: &Case, k: &Snapshot, i: &Snapshot, diffs: &mut Vec<Diff>) {
    use iced_x86::Mnemonic as M;
    let iret = case
        .items
        .iter()
        .any(|it| !it.setup && matches!(it.instr.mnemonic(), M::Iret | M::Iretd | M::Iretq));
    if !iret {
        return;
    }
    let (ks, is) = (&k.state.sregs, &i.state.sregs);
    for (name, kv, iv) in [
        ("ds", ks.ds.selector, is.ds.selector),
        ("es", ks.es.selector, is.es.selector),
        ("fs", ks.fs.selector, is.fs.selector),
        ("gs", ks.gs.selector, is.gs.selector),
    ] {
        if iv == 0 && kv != 0 && kv & 3 < 3 {
            let field = format!("{name}.selector");
            diffs.retain(|d| d.field != field);
        }
    }
}

/// A human-readable description of how a side ended.
pub fn describe_end(case: &Case, asm: &Assembled, s: &Snapshot) -> String {
    let mut t = end_name(&s.end);
    if s.end == End::Stop || s.end == End::Halted {
        match stop_of(case, &s.state, &s.mem, asm) {
            Stop::Done => t = "reached the terminator".into(),
            Stop::Vector(v) => {
                t = format!("exception vector {v}");
                if let Some(f) = frame(case.mode, &s.state, &s.mem, v, case.init.sregs.cs.selector)
                {
                    let _ = write!(t, " at rip {:#x}", f.rip);
                    if let Some(ec) = f.error_code {
                        let _ = write!(t, " error code {ec:#x}");
                    }
                    if v == 14 {
                        let _ = write!(t, " cr2 {:#x}", s.state.sregs.cr2);
                    }
                }
            }
            Stop::Elsewhere(rip) => t = format!("stopped at rip {rip:#x}"),
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Soak 20261210's LLDT/LTR cases in miniature: the interpreter
    /// triple-faults at an LLDT of the non-canonical LDT descriptor of the
    /// case's GDT copy whose descriptor 1 a test item overwrote, KVM ran on.
    /// Settled only while every condition holds: the same case with
    /// descriptor 1 intact, with the selected descriptor canonical or not
    /// an LDT, or with KVM stopping at the LLDT, is not.
    /// A case of `items` in `mode`'s base state, starting at the code page.
    fn case_at_code(mode: Mode, items: Vec<super::super::case::Item>) -> Case {
        let mut init = env::base_state(mode);
        init.regs.rip = env::CODE;
        Case {
            mode,
            init,
            area: vec![0; (env::SPACE - env::CASE_AREA) as usize],
            items,
            origin: "test".into(),
        }
    }

    #[test]
    fn a_wrmsr_fault_without_a_writable_stack_is_settled_only_then() {
        use super::super::case::{assemble, Item, SdmFault};
        use iced_x86::{Code, Instruction};
        let mode = Mode::Long64Ring0;
        let wrmsr = Instruction::with(Code::Wrmsr);
        let mut items = vec![Item::new(0, wrmsr)];
        items[0].sdm_fault = Some(SdmFault {
            vector: 13,
            error_code: Some(0),
            erratum: "WRMSR",
        });
        let case = case_at_code(mode, items);
        let asm = assemble(mode, &case.items).unwrap();
        let mut mem = Vec::new();
        for (at, bytes) in env::image() {
            let end = at as usize + bytes.len();
            if mem.len() < end {
                mem.resize(end, 0);
            }
            mem[at as usize..end].copy_from_slice(&bytes);
        }
        let snap = |end: End, rsp: u64, rip: u64| {
            let mut state = case.init;
            state.regs.rip = rip;
            state.regs.gpr[cpu_interp::state::gpr::RSP] = rsp;
            Snapshot {
                end,
                state,
                mem: mem.clone(),
                io: Vec::new(),
            }
        };
        let kvm = snap(End::Stop, env::W_RO + 0x58a, asm.end_addr);
        // RSP in the read-only window page: the frame cannot be written.
        let interp = snap(End::TripleFault, env::W_RO + 0x58a, asm.addrs[0]);
        assert_eq!(
            settled_wrmsr_fault_without_a_stack(
                &case,
                &asm,
                &kvm,
                &interp,
                0,
                case.items[0].sdm_fault.unwrap()
            ),
            Some(WRMSR_UNDELIVERABLE)
        );
        assert_eq!(
            settled_undeliverable_sdm_fault(&case, &asm, &kvm, &interp),
            Some(WRMSR_UNDELIVERABLE)
        );
        // RSP on the writable kernel stack: the #GP is deliverable.
        let ok = snap(End::TripleFault, env::KSTACK + 0x800, asm.addrs[0]);
        assert_eq!(
            settled_undeliverable_sdm_fault(&case, &asm, &kvm, &ok),
            None
        );
        // KVM stopped at the WRMSR with #GP too, or the interpreter elsewhere.
        let k2 = snap(End::TripleFault, env::W_RO + 0x58a, asm.addrs[0]);
        assert_eq!(
            settled_undeliverable_sdm_fault(&case, &asm, &k2, &interp),
            None
        );
        let i3 = snap(End::TripleFault, env::W_RO + 0x58a, asm.end_addr);
        assert_eq!(
            settled_undeliverable_sdm_fault(&case, &asm, &kvm, &i3),
            None
        );
    }

    #[test]
    fn an_undeliverable_sdm_fault_is_settled_only_when_the_sdm_says_so() {
        use super::super::case::{assemble, Item, SdmFault};
        use super::super::gen::sys::{gdt_copy, GDT_COPY, SEL_LDT, SEL_LDT_NONCANON};
        use iced_x86::{Code, Instruction, Register};
        let mode = Mode::Long64Ring0;
        let setup = Instruction::with2(Code::Mov_rm64_imm32, Register::R14, 0xa0).unwrap();
        let lldt = Instruction::with1(Code::Lldt_rm16, Register::R14W).unwrap();
        let mut items = vec![Item::new(0, setup), Item::new(1, lldt)];
        items[0].setup = true;
        items[1].sdm_fault = Some(SdmFault {
            vector: 13,
            error_code: Some(u64::from(SEL_LDT_NONCANON)),
            erratum: "LLDT",
        });
        let case = case_at_code(mode, items);
        let asm = assemble(mode, &case.items).unwrap();
        // The interpreter: RIP at the LLDT, the GDT copy loaded.
        let low = env::image().into_iter().next().unwrap().1;
        let snap = |end: End, gdt: &[u8], sel: u16, rip: u64| {
            let mut mem = low.clone();
            mem[GDT_COPY as usize..][..gdt.len()].copy_from_slice(gdt);
            let mut state = case.init;
            state.regs.rip = rip;
            state.regs.gpr[14] = u64::from(sel);
            state.sregs.gdt.base = GDT_COPY;
            state.sregs.gdt.limit = gdt.len() as u16 - 1;
            Snapshot {
                end,
                state,
                mem,
                io: Vec::new(),
            }
        };
        let intact = gdt_copy(mode);
        let mut damaged = intact.clone();
        damaged[8..16].fill(0xff); // descriptor 1: L and D set, DPL 3
        let kvm = snap(End::Stop, &damaged, SEL_LDT_NONCANON, asm.end_addr);
        let interp = snap(End::TripleFault, &damaged, SEL_LDT_NONCANON, asm.addrs[1]);
        assert_eq!(
            settled_undeliverable_sdm_fault(&case, &asm, &kvm, &interp),
            Some(LLDT_UNDELIVERABLE)
        );
        // Descriptor 1 intact: the #GP is deliverable, a triple fault is wrong.
        let i2 = snap(End::TripleFault, &intact, SEL_LDT_NONCANON, asm.addrs[1]);
        assert_eq!(
            settled_undeliverable_sdm_fault(&case, &asm, &kvm, &i2),
            None
        );
        // Descriptor 1 a 64-bit code segment of DPL 3: still undeliverable.
        let mut dpl3 = intact.clone();
        dpl3[13] |= 0x60;
        let i3 = snap(End::TripleFault, &dpl3, SEL_LDT_NONCANON, asm.addrs[1]);
        assert!(settled_undeliverable_sdm_fault(&case, &asm, &kvm, &i3).is_some());
        // The selected LDT descriptor with a canonical base: no #GP is due.
        let mut canon = damaged.clone();
        let a = usize::from(SEL_LDT_NONCANON);
        canon[a..a + 16].copy_from_slice(&intact[usize::from(SEL_LDT)..][..16]);
        let i4 = snap(End::TripleFault, &canon, SEL_LDT_NONCANON, asm.addrs[1]);
        assert_eq!(
            settled_undeliverable_sdm_fault(&case, &asm, &kvm, &i4),
            None
        );
        // Not an LDT descriptor any more (type 9): not this rule.
        let mut tss = damaged.clone();
        tss[a + 5] = 0x89;
        let i5 = snap(End::TripleFault, &tss, SEL_LDT_NONCANON, asm.addrs[1]);
        assert_eq!(
            settled_undeliverable_sdm_fault(&case, &asm, &kvm, &i5),
            None
        );
        // The interpreter stopped elsewhere, or KVM did not run on.
        let i6 = snap(End::TripleFault, &damaged, SEL_LDT_NONCANON, asm.addrs[0]);
        assert_eq!(
            settled_undeliverable_sdm_fault(&case, &asm, &kvm, &i6),
            None
        );
        let k7 = snap(End::TripleFault, &damaged, SEL_LDT_NONCANON, asm.addrs[1]);
        assert_eq!(
            settled_undeliverable_sdm_fault(&case, &asm, &k7, &interp),
            None
        );
    }

    #[test]
    fn frames_are_found_with_and_without_error_codes() {
        let mut s = env::base_state(Mode::Long64Ring3);
        s.regs.gpr[4] = 0x8fd0;
        let mut mem = vec![0u8; env::SPACE as usize];
        // #PF: error code, RIP, CS, RFLAGS, RSP, SS.
        for (k, v) in [6u64, 0x9003, 0x2b, 0x3246, 0xa800, 0x23]
            .iter()
            .enumerate()
        {
            mem[0x8fd0 + 8 * k..][..8].copy_from_slice(&v.to_le_bytes());
        }
        let f = frame(Mode::Long64Ring3, &s, &mem, 14, 0x2b).unwrap();
        assert_eq!(f.error_code, Some(6));
        assert_eq!(f.rip, 0x9003);
        assert_eq!(f.rflags, 0x3246);
        assert_eq!(f.rflags_at, 0x8fe8);
        // #UD: no error code.
        s.regs.gpr[4] = 0x8fd8;
        let f = frame(Mode::Long64Ring3, &s, &mem, 6, 0x2b).unwrap();
        assert_eq!(f.error_code, None);
        assert_eq!(f.rip, 0x9003);
    }

    #[test]
    fn undefined_flags_and_poisoned_registers_are_masked() {
        let a = env::base_state(Mode::Long64Ring3);
        let mut b = a;
        b.regs.rflags ^= super::super::case::AF;
        b.regs.gpr[0] ^= 1;
        let mut d = Vec::new();
        state_diffs(&a, &b, &Point::default(), &mut d);
        assert_eq!(d.len(), 2);
        let p = Point {
            mask: super::super::case::AF,
            poison: 1,
            reachable: true,
            fuzzy_x87: false,
            fuzzy_regs: 0,
        };
        d.clear();
        state_diffs(&a, &b, &p, &mut d);
        assert!(d.is_empty(), "{d:?}");
    }
}
