//! The translation tier: hot 64-bit guest blocks become host x86-64 code.
//!
//! See `docs/JIT.md` for the design. In short: a decoded block that has run
//! [`DEFAULT_HOT`] times is translated ([`translate`]) into a [`CodeBuffer`]
//! (never writable and executable at the same address); translations chain
//! to each other through patched `jmp rel32`s (direct exits within one
//! guest page) and a per-privilege lookup table for indirect jumps, returns
//! and cross-page jumps. The interpreter stays the reference and the slow
//! path: translated code calls it for every instruction it does not
//! translate and for every memory access whose TLB lookup misses.
//!
//! Exactness: each block subtracts its length from the budget register
//! (R15) at entry and leaves when that would pass `Cpu::stop_at`, so the
//! dispatcher can run the remainder in the interpreter and stop at the
//! exact instruction; helpers receive the exact retired count.

pub mod asm;
pub mod buffer;
mod helpers;
mod layout;
pub mod translate;

use std::io::Write;
use std::time::Instant;

use crate::block::{BlockId, Insn};
use crate::cpu::Cpu;
use crate::platform::Platform;
use asm::{mem, mem_idx, Asm};
use buffer::CodeBuffer;
use translate::{
    Routines, Translator, CPU, KIND_BUDGET, KIND_CHAIN, KIND_HELPER, KIND_LOOKUP, T0, T1, T2,
};

pub use buffer::BufferError;

/// Executions of a block before it is translated.
pub const DEFAULT_HOT: u32 = 64;

/// Default size of the code buffer; when it is full every translation is
/// dropped (with the decoded blocks) and hot code is translated afresh.
pub const DEFAULT_CODE_SIZE: usize = 32 << 20;

/// Entries of each indirect-branch lookup table (power of two).
const LOOKUP_SIZE: usize = 32768;

/// One lookup-table entry (32 bytes): guest RIP, the physical page its
/// block was decoded from, host entry. A hit also requires the TLB's
/// current execute translation of the RIP's page to lead to that physical
/// page, so remapped or flushed code pages miss.
#[repr(C)]
#[derive(Clone, Copy)]
struct LookupEntry {
    rip: u64,
    page: u64,
    entry: u64,
    _pad: u64,
}

const EMPTY_LOOKUP: LookupEntry = LookupEntry {
    rip: 1,
    page: u64::MAX,
    entry: 0,
    _pad: 0,
};

/// A translation of one decoded block.
pub struct Translation {
    pub entry: u64,
    pub rip: u64,
    pub user: bool,
    /// The block lies within one guest page (chained jumps may enter it).
    pub single_page: bool,
    /// Physical page of the block's first byte.
    pub page: u64,
    pub block: BlockId,
    /// The instructions helpers run (translated code points into this).
    _insns: Box<[Insn]>,
    /// Direct exits: ids into `Jit::exits`.
    exits: Vec<u32>,
    /// Exits of other translations linked to this one.
    incoming: Vec<u32>,
    pub alive: bool,
    pub host_bytes: u32,
    /// Entries counted by the translated code (profiling only).
    counter: Option<Box<u64>>,
}

struct ExitSite {
    from: u32,
    target: u64,
    patch: u64,
    stub: u64,
    linked: Option<u32>,
}

/// Counters for `--stats` / `--profile`.
#[derive(Clone, Copy, Debug, Default)]
pub struct JitStats {
    pub translations: u64,
    pub translated_insns: u64,
    pub native_insns: u64,
    pub helper_insns: u64,
    pub host_bytes: u64,
    pub translate_ns: u64,
    pub links: u64,
    pub flushes: u64,
    pub invalidated: u64,
    pub exits_chain: u64,
    pub exits_lookup: u64,
    pub exits_budget: u64,
    pub exits_helper: u64,
    pub entries: u64,
    pub code_limit: u64,
    /// Lookup misses whose target had a translation (table refilled).
    pub lookup_refills: u64,
    /// Exits to a target without a translation (interpreted).
    pub exits_untranslated: u64,
    /// Lookup misses where the table held this RIP (mapping check failed).
    pub lookup_stale: u64,
}

/// Time split for `--profile` (host TSC cycles).
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub in_jit: u64,
    pub in_helpers: u64,
    pub helper_calls: u64,
    pub translating: u64,
    /// Helper calls by instruction form (what to translate next).
    pub helper_codes: std::collections::HashMap<iced_x86::Code, u64>,
}

/// The translation engine of one CPU.
pub struct Jit {
    buf: CodeBuffer,
    enter: u64,
    common_exit: u64,
    lookup: [u64; 2],
    tables: [Box<[LookupEntry]>; 2],
    trans: Vec<Translation>,
    exits: Vec<ExitSite>,
    /// The platform of the current `run` (helpers use it).
    platform: Option<*mut (dyn Platform + 'static)>,
    pub stats: JitStats,
    pub hot: u32,
    pub profile: Option<Profile>,
    /// Bytes of translated code and metadata kept before a flush.
    limit: usize,
    /// Host bytes of translation metadata (instruction copies, exits).
    meta_bytes: usize,
    /// `DUET_JIT_DUMP=file`: every translation's host code, for matching
    /// `perf` samples in the code buffer to guest blocks.
    dump: Option<std::io::LineWriter<std::fs::File>>,
    /// The host has LAHF/SAHF in 64-bit mode (probed once).
    sahf: bool,
}

// SAFETY: the raw platform pointer is only set and used during `run` on
// the thread that owns the CPU; everything else is owned data.
unsafe impl Send for Jit {}

/// What a run of translated code ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JitExit {
    /// A direct exit not linked yet (its id); `cpu.rip` is the target.
    Chain(u32),
    /// An indirect branch (or cross-page jump) the lookup table missed.
    Lookup,
    /// The budget would run out inside the next block (at `cpu.rip`).
    Budget,
    /// The interpreter (helper) asked to leave: an event, I/O, a fault...
    Helper,
}

#[inline(always)]
fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86-64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Profiling hooks (no-ops unless `--profile`).
#[inline(always)]
pub(crate) fn profile_start(cpu: &Cpu) -> u64 {
    match &cpu.jit {
        Some(j) if j.profile.is_some() => rdtsc(),
        _ => 0,
    }
}

#[inline(always)]
pub(crate) fn profile_helper(cpu: &mut Cpu, t0: u64, insn: &Insn) {
    if t0 != 0 {
        let t = rdtsc().wrapping_sub(t0);
        if let Some(p) = cpu.jit.as_mut().and_then(|j| j.profile.as_mut()) {
            p.in_helpers += t;
            p.helper_calls += 1;
            *p.helper_codes.entry(insn.i.code()).or_default() += 1;
        }
    }
}

impl Jit {
    /// A JIT with a `code_size`-byte code buffer.
    pub fn new(code_size: usize) -> Result<Self, BufferError> {
        let mut buf = CodeBuffer::new(code_size)?;
        let tables: [Box<[LookupEntry]>; 2] = [
            vec![EMPTY_LOOKUP; LOOKUP_SIZE].into_boxed_slice(),
            vec![EMPTY_LOOKUP; LOOKUP_SIZE].into_boxed_slice(),
        ];
        // Trampolines: enter, common exit, one lookup per privilege.
        let base = buf.next_addr();
        let mut a = Asm::new(base);
        // enter(cpu: rdi, entry: rsi, budget: rdx) -> rax
        for r in [asm::RBX, asm::RBP, asm::R12, asm::R13, asm::R14, asm::R15] {
            a.push_r(r);
        }
        a.sub_ri(asm::RSP, 8);
        a.mov_rr(CPU, asm::RDI);
        a.mov_rr(asm::R15, asm::RDX);
        a.jmp_r(asm::RSI);
        let exit_at = a.len();
        a.mov_mr(mem(CPU, layout::jit_budget()), asm::R15);
        a.add_ri(asm::RSP, 8);
        for r in [asm::R15, asm::R14, asm::R13, asm::R12, asm::RBP, asm::RBX] {
            a.pop_r(r);
        }
        a.ret();
        let common_exit = base + exit_at as u64;
        let mut lookup = [0u64; 2];
        for (user, table) in tables.iter().enumerate() {
            // T0 = target RIP.
            lookup[user] = a.ip();
            let miss = a.label();
            // T1 = (((rip >> 15) ^ rip) >> 1 & (SIZE - 1)) * 32.
            a.mov_rr(T1, T0);
            a.shr_ri(T1, 15);
            a.xor_rr(T1, T0);
            a.shl_ri(T1, 4);
            a.and_r32i(T1, (LOOKUP_SIZE as u32 - 1) << 5);
            a.mov_ri(T2, table.as_ptr() as u64);
            a.lea(T2, mem_idx(T2, T1, 1, 0));
            a.cmp_rm(T0, mem(T2, 0));
            a.jcc(asm::cc::NE, miss);
            // Guest registers are all written back here: RAX is free.
            let u = user == 1;
            a.mov_rr(T1, T0);
            a.shr_ri(T1, 6);
            a.and_r32i(T1, ((crate::mmu::TLB_SIZE - 1) << 6) as u32);
            a.mov_rr(asm::RAX, T0);
            a.and_ri(asm::RAX, -4096);
            a.cmp_rm(asm::RAX, mem_idx(CPU, T1, 1, layout::tlb_exec(u)));
            a.jcc(asm::cc::NE, miss);
            a.mov_rm(asm::RAX, mem_idx(CPU, T1, 1, layout::tlb_paddr(u)));
            a.cmp_rm(asm::RAX, mem(T2, 8));
            a.jcc(asm::cc::NE, miss);
            a.jmp_m(mem(T2, 16));
            a.bind(miss);
            a.mov_mr(mem(CPU, layout::rip()), T0);
            a.mov_ri(asm::RAX, KIND_LOOKUP);
            a.jmp_abs(common_exit);
        }
        let code = a.finish();
        let at = buf.push(&code).expect("trampolines fit");
        debug_assert_eq!(at, base);
        buf.keep_prefix();
        Ok(Jit {
            enter: base,
            common_exit,
            lookup,
            tables,
            buf,
            trans: Vec::new(),
            exits: Vec::new(),
            platform: None,
            stats: JitStats {
                code_limit: code_size as u64,
                ..JitStats::default()
            },
            hot: std::env::var("DUET_JIT_HOT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(DEFAULT_HOT),
            profile: None,
            limit: code_size,
            meta_bytes: 0,
            sahf: asm::host_has_sahf(),
            dump: std::env::var_os("DUET_JIT_DUMP")
                .and_then(|f| std::fs::File::create(f).ok())
                .map(|f| {
                    let mut w = std::io::LineWriter::new(f);
                    let _ = writeln!(w, "B {base:x}");
                    w
                }),
        })
    }

    fn lookup_index(rip: u64) -> usize {
        ((((rip >> 15) ^ rip) >> 1) as usize) & (LOOKUP_SIZE - 1)
    }

    /// The translation `id`, if alive.
    pub fn get(&self, id: u32) -> Option<&Translation> {
        self.trans.get(id as usize).filter(|t| t.alive)
    }

    /// Translate a decoded block for the given privilege. None if the
    /// buffer is full (the caller flushes and retries later).
    pub fn translate(
        &mut self,
        block: BlockId,
        insns: &[Insn],
        user: bool,
        single_page: bool,
        page: u64,
    ) -> Option<u32> {
        let t0 = Instant::now();
        let c0 = if self.profile.is_some() { rdtsc() } else { 0 };
        let copy: Box<[Insn]> = insns.to_vec().into_boxed_slice();
        let rt = Routines {
            common_exit: self.common_exit,
            lookup: self.lookup[usize::from(user)],
            exec_insn: helpers::exec_insn as *const () as usize as u64,
            sahf: self.sahf,
        };
        let base = self.buf.next_addr();
        let first_exit = self.exits.len() as u32;
        let counter = self.profile.as_ref().map(|_| Box::new(0u64));
        let counter_addr = counter.as_ref().map(|c| &**c as *const u64 as u64);
        let tr = Translator::new(base, &copy, copy.as_ptr() as u64, user, rt, first_exit);
        let out = tr.translate(counter_addr);
        let entry = self.buf.push(&out.code)?;
        debug_assert_eq!(entry, base);
        let id = self.trans.len() as u32;
        if let Some(w) = self.dump.as_mut() {
            // Offset in the buffer, guest RIP, privilege, code bytes.
            let hex: String = out.code.iter().map(|b| format!("{b:02x}")).collect();
            let _ = writeln!(
                w,
                "T {:x} {:x} {} {hex}",
                entry - self.enter,
                insns[0].i.ip(),
                u8::from(user)
            );
        }
        let mut exit_ids = Vec::with_capacity(out.exits.len());
        for e in &out.exits {
            debug_assert_eq!(e.id as usize, self.exits.len());
            exit_ids.push(e.id);
            self.exits.push(ExitSite {
                from: id,
                target: e.target,
                patch: e.patch,
                stub: e.stub,
                linked: None,
            });
        }
        let n = insns.len() as u64;
        self.stats.translations += 1;
        self.stats.translated_insns += n;
        self.stats.native_insns += u64::from(out.native);
        self.stats.helper_insns += u64::from(out.helpers);
        self.stats.host_bytes += out.code.len() as u64;
        let spent = t0.elapsed().as_nanos() as u64;
        self.stats.translate_ns += spent;
        if let Some(p) = self.profile.as_mut() {
            p.translating += rdtsc().wrapping_sub(c0);
        }
        self.meta_bytes += std::mem::size_of::<Translation>()
            + std::mem::size_of_val(insns)
            + out.exits.len() * (std::mem::size_of::<ExitSite>() + 8);
        self.trans.push(Translation {
            entry,
            rip: insns[0].i.ip(),
            user,
            single_page,
            page: page & !0xfff,
            block,
            _insns: copy,
            exits: exit_ids,
            incoming: Vec::new(),
            alive: true,
            host_bytes: out.code.len() as u32,
            counter,
        });
        Some(id)
    }

    /// Link direct exit `exit` to translation `to` when allowed (same
    /// guest page, same privilege, target within one page).
    pub fn link(&mut self, exit: u32, to: u32) -> bool {
        let Some(e) = self.exits.get(exit as usize) else {
            return false;
        };
        if e.linked.is_some() {
            return false;
        }
        let (Some(from), Some(target)) = (self.get(e.from), self.get(to)) else {
            return false;
        };
        if from.user != target.user
            || !target.single_page
            || target.rip != e.target
            || (target.rip & !0xfff) != (from.rip & !0xfff)
        {
            return false;
        }
        let rel = target.entry.wrapping_sub(e.patch + 4) as i64;
        let patch = e.patch;
        self.buf.patch_u32(patch, rel as i32 as u32);
        self.exits[exit as usize].linked = Some(to);
        self.trans[to as usize].incoming.push(exit);
        self.stats.links += 1;
        true
    }

    /// Debug: does the table hold `rip` (for the privilege)?
    pub fn holds(&self, rip: u64, user: bool) -> bool {
        self.tables[usize::from(user)][Self::lookup_index(rip)].rip == rip
    }

    /// Remember `rip` → translation `id` for indirect branches (blocks
    /// within one page only: the lookup checks that page's mapping).
    pub fn remember(&mut self, rip: u64, id: u32) {
        let Some(t) = self.get(id) else {
            return;
        };
        if !t.single_page {
            return;
        }
        let (user, entry, page) = (usize::from(t.user), t.entry, t.page);
        self.tables[user][Self::lookup_index(rip)] = LookupEntry {
            rip,
            page,
            entry,
            _pad: 0,
        };
    }

    /// Drop translation `id` (its block's bytes changed): unlink every
    /// jump into it and forget it in the lookup tables.
    pub fn kill(&mut self, id: u32) {
        let Some(t) = self.trans.get_mut(id as usize) else {
            return;
        };
        if !t.alive {
            return;
        }
        t.alive = false;
        let incoming = std::mem::take(&mut t.incoming);
        let (rip, user) = (t.rip, usize::from(t.user));
        for e in incoming {
            let site = &mut self.exits[e as usize];
            if site.linked == Some(id) {
                site.linked = None;
                let rel = site.stub.wrapping_sub(site.patch + 4) as i64;
                let patch = site.patch;
                self.buf.patch_u32(patch, rel as i32 as u32);
            }
        }
        // Its own outgoing links: forget them (the code is dead anyway).
        let outs = std::mem::take(&mut self.trans[id as usize].exits);
        for e in outs {
            if let Some(to) = self.exits[e as usize].linked.take() {
                if let Some(t) = self.trans.get_mut(to as usize) {
                    t.incoming.retain(|x| *x != e);
                }
            }
        }
        let slot = &mut self.tables[user][Self::lookup_index(rip)];
        if slot.rip == rip {
            *slot = EMPTY_LOOKUP;
        }
        self.stats.invalidated += 1;
    }

    /// Count entries into new translations (`--profile`).
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(Profile::default);
    }

    /// Entries of translation `id` so far, when it counts them.
    pub fn executions(&self, id: u32) -> Option<u64> {
        self.trans
            .get(id as usize)
            .and_then(|t| t.counter.as_ref().map(|c| **c))
    }

    /// Drop every translation (the trampolines stay).
    pub fn flush(&mut self) {
        self.buf.reset();
        self.trans.clear();
        self.exits.clear();
        self.trans.shrink_to(4096);
        self.exits.shrink_to(4096);
        self.meta_bytes = 0;
        for t in &mut self.tables {
            t.fill(EMPTY_LOOKUP);
        }
        self.stats.flushes += 1;
        if let Some(w) = self.dump.as_mut() {
            let _ = writeln!(w, "F");
        }
    }

    /// Is the code buffer nearly full (flush before translating more)?
    pub fn nearly_full(&self) -> bool {
        self.buf.used() + self.meta_bytes + (256 << 10) > self.limit || self.buf.free() < 256 << 10
    }

    /// Bound the translated code kept (at most the buffer's size).
    pub fn set_limit(&mut self, bytes: usize) {
        self.limit = bytes.max(1 << 20);
        self.stats.code_limit = self.limit as u64;
    }

    pub fn code_used(&self) -> usize {
        self.buf.used()
    }

    /// Host bytes the tier holds now (code and metadata).
    pub fn bytes(&self) -> usize {
        self.buf.used() + self.meta_bytes
    }

    /// Run translation `id` (and whatever it chains to) until it leaves.
    /// The caller has made the flags eager and set `cpu.stop_at`.
    pub fn run(cpu: &mut Cpu, p: &mut dyn Platform, id: u32) -> JitExit {
        let (entry, enter) = {
            let j = cpu.jit.as_mut().expect("JIT present");
            let entry = j.trans[id as usize].entry;
            // SAFETY: erasing the lifetime of the platform borrow; it is
            // only dereferenced by helpers called while translated code
            // runs, which ends before this function returns, and cleared
            // below.
            let raw: *mut (dyn Platform + 'static) = unsafe { std::mem::transmute(p) };
            j.platform = Some(raw);
            j.stats.entries += 1;
            (entry, j.enter)
        };
        let budget = cpu.stop_at.saturating_sub(cpu.retired);
        let t0 = profile_start(cpu);
        // SAFETY: `enter` is the trampoline generated in `new`, with the
        // SysV signature (cpu, entry, budget) -> exit code; `entry` is the
        // start of a live translation. Translated code only touches the
        // `Cpu` through RBP (exclusively borrowed here), guest RAM through
        // TLB entries the interpreter filled (host mappings kept alive by
        // `cpu.ram`), and calls helpers that re-borrow the `Cpu` the same
        // way the interpreter's own loop does.
        let code = unsafe {
            let f: extern "C" fn(*mut Cpu, u64, u64) -> u64 = std::mem::transmute(enter as usize);
            f(cpu as *mut Cpu, entry, budget)
        };
        let j = cpu.jit.as_mut().expect("JIT present");
        j.platform = None;
        if t0 != 0 {
            let t = rdtsc().wrapping_sub(t0);
            if let Some(p) = j.profile.as_mut() {
                p.in_jit += t;
            }
        }
        let kind = code & 0xff;
        let exit = match kind {
            KIND_CHAIN => {
                j.stats.exits_chain += 1;
                JitExit::Chain((code >> 8) as u32)
            }
            KIND_LOOKUP => {
                j.stats.exits_lookup += 1;
                JitExit::Lookup
            }
            KIND_BUDGET => {
                j.stats.exits_budget += 1;
                JitExit::Budget
            }
            _ => {
                debug_assert_eq!(kind, KIND_HELPER);
                j.stats.exits_helper += 1;
                JitExit::Helper
            }
        };
        if exit != JitExit::Helper {
            cpu.retired = cpu.stop_at - cpu.jit_budget;
        }
        exit
    }
}

impl Cpu {
    /// The platform of the running JIT call (helpers only).
    pub(crate) fn jit_platform(&mut self) -> *mut (dyn Platform + 'static) {
        self.jit
            .as_ref()
            .and_then(|j| j.platform)
            .expect("helper called outside Jit::run")
    }
}

#[cfg(test)]
mod tests;
