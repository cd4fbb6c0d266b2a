//! The execution loop: event checks at block boundaries, block lookup or
//! translation, and instruction dispatch.

use iced_x86::{
    Decoder, DecoderError, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register,
};

use crate::block::{Block, BlockId, Insn, MAX_BLOCK};
use crate::cpu::{sreg, Cpu, CpuExit};
use crate::dispatch::Handler;
use crate::exception::{Exception, XResult};
use crate::interrupt::EventKind;
use crate::mmu::Access;
use crate::platform::Platform;

use crate::debug::DR6_BS;

/// Handler for an instruction that runs past the CS limit.
fn past_limit(_cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    Err(Exception::gp0())
}

/// Precompute an `Insn` from a decoded instruction.
pub(crate) fn make_insn(i: Instruction, bits: u32, h: Handler) -> Insn {
    let ipmask = match bits {
        64 => u64::MAX,
        32 => 0xffff_ffff,
        _ => 0xffff,
    };
    let amask = address_mask(&i, bits);
    let size = match i.op_count() {
        0 => 0,
        _ => match i.op0_kind() {
            OpKind::Register => i.op0_register().size() as u8,
            OpKind::Memory => i.memory_size().size() as u8,
            _ => 0,
        },
    };
    let mut seg = match i.memory_segment() {
        Register::None => sreg::DS as u8,
        r => (r as usize - Register::ES as usize) as u8,
    };
    if bits == 64
        && matches!(
            i.segment_prefix(),
            Register::ES | Register::CS | Register::DS
        )
    {
        // These overrides do nothing in 64-bit mode: an rBP/rSP-based
        // access stays a stack access (a non-canonical one is #SS). An SS
        // override does count: #SS whatever the base.
        seg = match i.memory_base() {
            Register::RBP | Register::RSP | Register::EBP | Register::ESP => sreg::SS as u8,
            _ => sreg::DS as u8,
        };
    }
    let gpr_index = |n: u32| -> u8 {
        if n >= i.op_count() || i.op_kind(n) != OpKind::Register {
            return 0xff;
        }
        let r = i.op_register(n) as usize;
        match r {
            1..=4 => (r - 1) as u8,
            9..=20 => (r - 5) as u8,
            21..=36 => (r - 21) as u8,
            37..=52 => (r - 37) as u8,
            53..=68 => (r - 53) as u8,
            _ => 0xff,
        }
    };
    let imm = (0..i.op_count())
        .find(|&n| {
            matches!(
                i.op_kind(n),
                OpKind::Immediate8
                    | OpKind::Immediate16
                    | OpKind::Immediate32
                    | OpKind::Immediate64
                    | OpKind::Immediate8to16
                    | OpKind::Immediate8to32
                    | OpKind::Immediate8to64
                    | OpKind::Immediate32to64
            )
        })
        .map_or(0, |n| {
            i.immediate(n) & crate::insn::mask(size.max(1) as usize)
        });
    let mut insn = Insn {
        next: i.next_ip() & ipmask,
        h,
        amask,
        size,
        seg,
        r0: gpr_index(0),
        r1: gpr_index(1),
        imm,
        i,
    };
    insn.h = crate::insn::specialize(&insn, h);
    insn
}

/// The address size of an instruction as a mask.
fn address_mask(i: &Instruction, bits: u32) -> u64 {
    let from_reg = |r: Register| match r.size() {
        2 => Some(0xffffu64),
        4 => Some(0xffff_ffff),
        8 => Some(u64::MAX),
        _ => None,
    };
    if let Some(m) = [i.memory_base(), i.memory_index()]
        .into_iter()
        .filter(|r| *r != Register::None)
        .find_map(from_reg)
    {
        return m;
    }
    // String instructions name their registers in the operand kind.
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::MemorySegSI | OpKind::MemoryESDI | OpKind::MemorySegDI => return 0xffff,
            OpKind::MemorySegESI | OpKind::MemoryESEDI | OpKind::MemorySegEDI => {
                return 0xffff_ffff
            }
            OpKind::MemorySegRSI | OpKind::MemoryESRDI | OpKind::MemorySegRDI => return u64::MAX,
            _ => {}
        }
    }
    match i.memory_displ_size() {
        2 => 0xffff,
        4 => 0xffff_ffff,
        8 => u64::MAX,
        // No memory operand that names its address size: the mode's default.
        _ => match bits {
            64 => u64::MAX,
            32 => 0xffff_ffff,
            _ => 0xffff,
        },
    }
}

impl Cpu {
    /// Run until an exit condition, executing at most `budget` instructions.
    ///
    /// The budget is exact: the CPU stops after exactly `budget` retired
    /// instructions (inside a block if need be) and returns
    /// [`CpuExit::BudgetExhausted`], unless something else ends the run
    /// first. Events are checked at every instruction boundary where
    /// something may have changed them (after an I/O, MMIO or MSR write,
    /// after the instruction in an STI or MOV SS shadow, when an interrupt
    /// is pending and IF allows it) and at the retired count the platform
    /// names in [`Platform::next_check`] (timer deadlines).
    pub fn run(&mut self, p: &mut dyn Platform, budget: u64) -> CpuExit {
        if self.profiling {
            let t0 = crate::profile::now();
            let e = self.run_inner(p, budget);
            self.profile.run_cycles += crate::profile::now().wrapping_sub(t0);
            return e;
        }
        self.run_inner(p, budget)
    }

    fn run_inner(&mut self, p: &mut dyn Platform, budget: u64) -> CpuExit {
        let limit = self.retired.saturating_add(budget);
        // Devices may have written code between runs.
        self.take_foreign_writes();
        self.code_written = false;
        if self.blocks.dead() > 8192 && self.tier() == crate::Tier::Interp {
            // Nothing executes now: reclaim blocks unlinked by code writes.
            // (With translations, dead blocks wait for the cache bound: a
            // flush would also drop every translation.)
            self.clear_blocks();
        }
        let mut prev: Option<BlockId> = None;
        self.stop_at = self.next_stop(p, limit);
        loop {
            if self.io_happened || self.retired >= self.stop_at || self.may_have_events() {
                self.io_happened = false;
                if let Some(e) = self.check_events(p) {
                    return e;
                }
                if self.retired >= limit {
                    return CpuExit::BudgetExhausted;
                }
                self.stop_at = self.next_stop(p, limit);
            }
            if self.flags.get() & (crate::flags::TF | crate::flags::RF) != 0 || self.debug_active()
            {
                // Single-stepping: one instruction at a time, each followed
                // by its #DB trap; the same while a breakpoint is enabled
                // (see `debug`) or RF suppresses one. (Every instruction
                // that can set TF or RF or change DR7 ends its block.)
                prev = None;
                self.recent
                    .push(self.rip, self.seg[crate::cpu::sreg::CS].base, self.bits);
                if let Some(e) = self.step(p) {
                    return e;
                }
                self.io_happened = true;
                continue;
            }
            // The instruction in an STI or MOV SS shadow runs alone: events
            // are recognised right after it.
            let shadow = self.events.sti_shadow | self.events.mov_ss_shadow;
            self.events.sti_shadow = false;
            self.events.mov_ss_shadow = false;
            let chained = prev.and_then(|from| self.chained(from));
            if chained.is_none() && (self.blocks.over_limit() || self.jit_flush_pending) {
                // The cache reached its bound (or the translation buffer
                // is full). Nothing executes between blocks: reclaim it all.
                self.blocks.flush_for_space();
                self.clear_links();
                self.jit_flush();
                prev = None;
            }
            let id = match chained {
                Some(id) => id,
                None => match self.get_block(p) {
                    Ok(id) => {
                        if let Some(from) = prev {
                            self.link(from, id);
                        }
                        id
                    }
                    Err(exc) => {
                        self.raise(p, exc);
                        prev = None;
                        continue;
                    }
                },
            };
            let block = self.blocks.block_ptr(id);
            // SAFETY: blocks are boxed in an arena that only grows until
            // `clear_blocks`, which is never called while a block executes
            // (only above, between blocks, or outside `run`); invalidation
            // during execution merely unlinks the block.
            let block = unsafe { &*block };
            self.recent
                .push(self.rip, self.seg[crate::cpu::sreg::CS].base, self.bits);
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            if !shadow
                && block.bits == 64
                && self.jit.is_some()
                && self.stop_at - self.retired >= block.insns.len() as u64
            {
                if let Some(t) = self.jit_translation(id, block) {
                    self.jit_dispatch(p, t);
                    prev = None;
                    continue;
                }
            }
            let max = if shadow {
                self.io_happened = true;
                1
            } else {
                self.stop_at - self.retired
            };
            if self.profiling {
                block.execs.set(block.execs.get() + 1);
            }
            prev = if self.exec_block(p, block, max) {
                Some(id)
            } else {
                None
            };
        }
    }

    /// Run until exactly `target` instructions have retired in total (see
    /// [`Cpu::retired`]), or an earlier exit. At the target the CPU stops
    /// at that instruction boundary (inside a block if need be) and
    /// returns [`CpuExit::BudgetExhausted`]: the point where record/replay
    /// applies an event stamped with that count. Events already pending
    /// are delivered first; a target at or below the current count
    /// executes nothing.
    ///
    /// A REP string instruction retires once per chunk of iterations it
    /// runs between two event checks (see `insn::string`), so counts are
    /// exact and repeatable, not those of a hardware counter.
    pub fn run_until(&mut self, p: &mut dyn Platform, target: u64) -> CpuExit {
        self.run(p, target.saturating_sub(self.retired))
    }

    /// The translation of `block` for the current privilege, translating
    /// it when it has become hot.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn jit_translation(&mut self, id: BlockId, block: &Block) -> Option<u32> {
        let slot = usize::from(self.user());
        let t = block.jit[slot].get();
        let j = self.jit.as_mut()?;
        if t != 0 {
            return Some(t - 1);
        }
        let heat = block.heat.get() + 1;
        block.heat.set(heat);
        if heat < j.hot {
            return None;
        }
        if j.nearly_full() {
            self.jit_flush_pending = true;
            return None;
        }
        let single_page = block.pages[0] == block.pages[1];
        let t = j.translate(id, &block.insns, slot == 1, single_page, block.key_paddr)?;
        block.jit[slot].set(t + 1);
        Some(t)
    }

    /// The live translation for the block at CS:RIP, if there is one
    /// (no side effects beyond the TLB fill a fetch would make).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn jit_find(&mut self, p: &mut dyn Platform) -> Option<u32> {
        if self.bits != 64 || self.flags.test(crate::flags::TF) {
            return None;
        }
        let lin = self.code_linear(self.rip).ok()?;
        let user = self.user();
        let cr2 = self.cr2;
        let paddr = match self.translate(p, lin, Access::Exec, user) {
            Ok(pa) => pa,
            Err(_) => {
                // The main loop raises the fault itself.
                self.cr2 = cr2;
                return None;
            }
        };
        let bid = self.blocks.get(paddr, self.rip, 64)?;
        let t = self.blocks.block(bid).jit[usize::from(user)].get();
        (t != 0).then(|| t - 1)
    }

    /// Run translated code from translation `t`, following chained and
    /// looked-up successors, until it leaves for the interpreter.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn jit_dispatch(&mut self, p: &mut dyn Platform, mut t: u32) {
        use crate::jit::{Jit, JitExit};
        loop {
            // Translated code reads the arithmetic flags from `bits`.
            self.flags.set(self.flags.get());
            let exit = Jit::run(self, p, t);
            if exit == JitExit::Lookup {
                let user = self.user();
                let rip = self.rip;
                if let Some(j) = self.jit.as_mut() {
                    if j.holds(rip, user) {
                        j.stats.lookup_stale += 1;
                    }
                }
            }
            match exit {
                JitExit::Helper | JitExit::Budget => return,
                JitExit::Chain(_) | JitExit::Lookup => {
                    if self.retired >= self.stop_at {
                        return;
                    }
                    let Some(next) = self.jit_find(p) else {
                        if let Some(j) = self.jit.as_mut() {
                            j.stats.exits_untranslated += 1;
                        }
                        return;
                    };
                    let rip = self.rip;
                    let j = self.jit.as_mut().expect("JIT present");
                    if exit == JitExit::Lookup {
                        j.stats.lookup_refills += 1;
                    }
                    match exit {
                        JitExit::Chain(e) => {
                            j.link(e, next);
                        }
                        _ => j.remember(rip, next),
                    }
                    t = next;
                }
            }
        }
    }

    /// The retired count of the next forced event check: the budget's end,
    /// or earlier when the platform wants a look (a timer deadline, a poll
    /// for host requests). Always after the current count, so the CPU makes
    /// progress.
    fn next_stop(&mut self, p: &mut dyn Platform, limit: u64) -> u64 {
        let next = p.next_check(self.retired).max(self.retired + 1);
        next.min(limit)
    }

    /// Anything pending that `check_events` must look at now?
    #[inline(always)]
    fn may_have_events(&self) -> bool {
        self.triple_fault
            || self.events.halted
            || self.events.single_step_pending
            || self.events.nmi_pending
            || self.pending_exit.is_some()
            || ((self.events.interrupt.is_some() || self.irq_window)
                && self.flags.test(crate::flags::IF))
    }

    #[inline(always)]
    fn chain_index(from: BlockId, rip: u64) -> usize {
        ((from as usize).wrapping_mul(0x9e37) ^ (rip as usize)) & (crate::cpu::CHAIN_SIZE - 1)
    }

    /// The block that followed `from` last time at the current RIP, if the
    /// link is still valid.
    #[inline(always)]
    fn chained(&self, from: BlockId) -> Option<BlockId> {
        if self.uncached {
            return None;
        }
        let e = &self.chain[Self::chain_index(from, self.rip)];
        (e.from == from && e.rip == self.rip && e.epoch == self.tlb.epoch).then_some(e.to)
    }

    #[inline(always)]
    fn link(&mut self, from: BlockId, to: BlockId) {
        if self.uncached {
            return;
        }
        self.chain[Self::chain_index(from, self.rip)] = crate::cpu::ChainEntry {
            from,
            rip: self.rip,
            epoch: self.tlb.epoch,
            to,
        };
    }

    /// Execute exactly one instruction (decoded afresh, no caches), then
    /// deliver any exception it raised. Used by the KVM backend's fallback.
    /// Returns an exit if the instruction produced one (HLT, triple fault).
    pub fn step(&mut self, p: &mut dyn Platform) -> Option<CpuExit> {
        if self.events.single_step_pending && !self.events.halted {
            self.debug_trap(p);
            if self.triple_fault {
                return Some(CpuExit::TripleFault);
            }
        }
        let shadowed = self.events.mov_ss_shadow;
        self.events.sti_shadow = false;
        self.events.mov_ss_shadow = false;
        // TF as the instruction starts decides its single-step trap.
        let trap = self.flags.test(crate::flags::TF);
        let rf = self.flags.test(crate::flags::RF);
        // Instruction breakpoints: a fault before the instruction, unless
        // RF says the handler returned to it or a MOV SS shadow covers it.
        if self.dr_exec && !rf && !shadowed {
            if let Ok(lin) = self.code_linear(self.rip) {
                let hits = self.exec_breakpoint_hits(lin);
                if hits != 0 {
                    self.report_breakpoints(hits);
                    self.raise(p, Exception::new(crate::exception::DB));
                    return self.triple_fault.then_some(CpuExit::TripleFault);
                }
            }
        }
        self.dr_hits = 0;
        let delivered = self.deliveries;
        let insn = match self.decode_one(p) {
            Ok(i) => i,
            Err(exc) => {
                self.raise(p, exc);
                return if self.triple_fault {
                    Some(CpuExit::TripleFault)
                } else {
                    None
                };
            }
        };
        let rip = self.rip;
        self.rip = insn.next;
        match (insn.h)(self, p, &insn) {
            Ok(()) => {
                self.retired += 1;
                if rf && !matches!(insn.i.mnemonic(), Mnemonic::Iretd | Mnemonic::Iretq) {
                    // RF covered this instruction only (IRETD/IRETQ set it
                    // from their image for the next one).
                    self.flags.set_bit(crate::flags::RF, false);
                }
                // The single-step trap follows an instruction that
                // completed without delivering an event (a fault, INT n,
                // INTO, INT3), except after MOV SS/POP SS, whose shadow
                // moves it past the next instruction.
                let step_trap = trap
                    && self.deliveries == delivered
                    && !self.events.mov_ss_shadow
                    && !self.triple_fault;
                // Data and I/O breakpoints trap after the instruction; those
                // of a MOV SS/POP SS after the next one (even if that one
                // delivered an event: the #DB then comes in its handler).
                let mut hits = std::mem::take(&mut self.dr_hits);
                if self.events.mov_ss_shadow {
                    self.dr_deferred |= hits;
                    hits = 0;
                } else {
                    hits |= std::mem::take(&mut self.dr_deferred);
                }
                if (step_trap || hits != 0) && !self.triple_fault {
                    if hits != 0 {
                        self.report_breakpoints(hits);
                    }
                    if step_trap {
                        self.dr.dr6 |= DR6_BS;
                    }
                    if (self.io_happened && p.stop_requested()) || self.events.halted {
                        // The VMM takes over first (as after a VM exit on
                        // hardware), or the CPU halts; the trap follows
                        // when it resumes or wakes.
                        self.events.single_step_pending = true;
                    } else {
                        self.debug_trap(p);
                    }
                }
            }
            Err(exc) => {
                self.rip = rip;
                self.dr_hits = 0;
                self.raise(p, exc);
            }
        }
        self.end_block = false;
        self.code_written = false;
        if self.triple_fault {
            return Some(CpuExit::TripleFault);
        }
        self.pending_exit.take()
    }

    /// Deliver the #DB trap (single-step, data or I/O breakpoints) of the
    /// instruction just executed; DR6 already says why.
    fn debug_trap(&mut self, p: &mut dyn Platform) {
        self.events.single_step_pending = false;
        self.raise(p, Exception::new(crate::exception::DB));
    }

    /// Decode the instruction at CS:RIP without touching the block cache.
    pub fn decode_one(&mut self, p: &mut dyn Platform) -> XResult<Insn> {
        let mut buf = [0u8; 15];
        let lin = self.code_linear(self.rip)?;
        let user = self.user();
        let n = self.fetch_upto(p, lin, &mut buf, user)?;
        let mut dec = Decoder::with_ip(self.bits, &buf[..n], self.rip, DecoderOptions::NONE);
        let i = dec.decode();
        if dec.last_error() == DecoderError::NoMoreBytes {
            // Needed bytes beyond the CS limit or an unfetchable page.
            if n < 15 {
                // Re-fetch to raise the right fault.
                let mut full = [0u8; 15];
                self.fetch_bytes(p, lin, &mut full, user)?;
            }
            return Ok(make_insn(i, self.bits, past_limit));
        }
        let h = self.handler_for(i.code());
        Ok(make_insn(i, self.bits, h))
    }

    /// Fetch up to `buf.len()` bytes: stop early at the CS limit, fault only
    /// if the first byte cannot be fetched; stop at an unfetchable page.
    fn fetch_upto(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        buf: &mut [u8],
        user: bool,
    ) -> XResult<usize> {
        let avail = self.cs_bytes_available(self.rip).min(buf.len() as u64) as usize;
        if avail == 0 {
            return Err(Exception::gp0());
        }
        let first = (0x1000 - (lin & 0xfff) as usize).min(avail);
        self.fetch_bytes(p, lin, &mut buf[..first], user)?;
        if first < avail {
            let next = lin.wrapping_add(first as u64) & self.lin_mask();
            if self
                .fetch_bytes(p, next, &mut buf[first..avail], user)
                .is_err()
            {
                return Ok(first);
            }
        }
        Ok(avail)
    }

    /// Bytes from `rip` to the end of the CS limit (unbounded in 64-bit mode).
    fn cs_bytes_available(&self, rip: u64) -> u64 {
        if self.bits == 64 {
            return u64::MAX;
        }
        let lim = u64::from(self.seg[sreg::CS].limit);
        if rip > lim {
            0
        } else {
            lim - rip + 1
        }
    }

    fn code_linear(&self, rip: u64) -> XResult<u64> {
        if self.bits == 64 {
            if !crate::segment::canonical(rip) {
                return Err(Exception::gp0());
            }
            return Ok(rip);
        }
        if rip > u64::from(self.seg[sreg::CS].limit) {
            return Err(Exception::gp0());
        }
        Ok(self.seg[sreg::CS].base.wrapping_add(rip) & 0xffff_ffff)
    }

    /// Find or translate the block at CS:RIP.
    fn get_block(&mut self, p: &mut dyn Platform) -> XResult<BlockId> {
        let lin = self.code_linear(self.rip)?;
        let user = self.user();
        let paddr = self.translate(p, lin, Access::Exec, user)?;
        if !self.uncached {
            if let Some(b) = self.blocks.get(paddr, self.rip, self.bits) {
                return Ok(b);
            }
        }
        let block = self.translate_block(p, lin, paddr, user)?;
        let pages = block.pages;
        for pg in pages {
            if !self.blocks.is_code_page(pg) {
                self.tlb.mark_code_page(pg);
            }
        }
        Ok(self.blocks.insert(paddr, block))
    }

    fn translate_block(
        &mut self,
        p: &mut dyn Platform,
        lin: u64,
        paddr: u64,
        user: bool,
    ) -> XResult<Block> {
        let bits = self.bits;
        let page_left = 0x1000 - (lin & 0xfff) as usize;
        let avail = self.cs_bytes_available(self.rip).min(page_left as u64) as usize;
        let mut bytes = [0u8; 0x1000];
        self.fetch_bytes(p, lin, &mut bytes[..avail], user)?;
        let mut insns: Vec<Insn> = Vec::with_capacity(16);
        let mut pages = [paddr & !0xfff; 2];
        let mut dec = Decoder::with_ip(bits, &bytes[..avail], self.rip, DecoderOptions::NONE);
        while insns.len() < MAX_BLOCK {
            let pos = dec.position();
            if pos >= avail {
                // The block reached the page end (or the CS limit) exactly.
                if avail < page_left && insns.is_empty() {
                    return Err(Exception::gp0());
                }
                break;
            }
            let i = dec.decode();
            if dec.last_error() == DecoderError::NoMoreBytes {
                let ip = self.rip.wrapping_add(pos as u64);
                if !insns.is_empty() {
                    // Let the next block start at this instruction.
                    break;
                }
                // The first instruction straddles the page end or the CS limit.
                let mut buf = [0u8; 15];
                let a = lin.wrapping_add(pos as u64) & self.lin_mask();
                let save = self.rip;
                self.rip = ip;
                let n = self.fetch_upto(p, a, &mut buf, user);
                self.rip = save;
                let n = n?;
                let mut d2 = Decoder::with_ip(bits, &buf[..n], ip, DecoderOptions::NONE);
                let i2 = d2.decode();
                if d2.last_error() == DecoderError::NoMoreBytes {
                    if n < 15 && self.cs_bytes_available(ip) >= 15 {
                        // The next page could not be fetched: raise its fault.
                        let next = (a & !0xfff).wrapping_add(0x1000) & self.lin_mask();
                        self.translate(p, next, Access::Exec, user)?;
                    }
                    insns.push(make_insn(i2, bits, past_limit));
                    break;
                }
                let next = (a & !0xfff).wrapping_add(0x1000) & self.lin_mask();
                pages[1] = self.translate(p, next, Access::Exec, user)? & !0xfff;
                insns.push(make_insn(i2, bits, self.handler_for(i2.code())));
                break;
            }
            let fc = i.flow_control();
            insns.push(make_insn(i, bits, self.handler_for(i.code())));
            if fc != FlowControl::Next {
                break;
            }
        }
        Ok(Block {
            insns: insns.into_boxed_slice(),
            key_paddr: paddr,
            rip: self.rip,
            bits,
            pages,
            heat: std::cell::Cell::new(0),
            jit: Default::default(),
            execs: std::cell::Cell::new(0),
        })
    }

    /// Execute at most `max` instructions of a block. Returns true when it
    /// ran to its end (so the next block may be linked to it), false after
    /// an exception, an early exit or a stop inside it.
    fn exec_block(&mut self, p: &mut dyn Platform, block: &Block, max: u64) -> bool {
        self.end_block = false;
        let insns = &block.insns[..];
        let n = insns.len().min(usize::try_from(max).unwrap_or(usize::MAX));
        for insn in insns[..n].iter() {
            let rip = self.rip;
            self.rip = insn.next;
            if let Err(exc) = (insn.h)(self, p, insn) {
                self.rip = rip;
                self.end_block = false;
                self.code_written = false;
                self.raise(p, exc);
                return false;
            }
            self.retired += 1;
            if self.end_block | self.code_written {
                self.end_block = false;
                self.code_written = false;
                return false;
            }
        }
        n == insns.len()
    }

    /// Deliver pending events and decide whether to return.
    fn check_events(&mut self, p: &mut dyn Platform) -> Option<CpuExit> {
        if self.triple_fault {
            return Some(CpuExit::TripleFault);
        }
        if let Some(e) = self.pending_exit.take() {
            return Some(e);
        }
        if self.events.single_step_pending {
            if p.stop_requested() {
                // Still the VMM's turn (see `step`).
                return Some(CpuExit::StopRequested);
            }
            // A trap outranks NMIs and interrupts; a halted CPU takes it
            // when one of those wakes it.
            let wake = !self.events.halted
                || (self.events.nmi_pending && !self.events.nmi_masked)
                || (self.events.interrupt.is_some() && self.interrupts_enabled());
            if wake {
                self.debug_trap(p);
                if self.triple_fault {
                    return Some(CpuExit::TripleFault);
                }
            }
        }
        if self.events.nmi_pending && !self.events.nmi_masked && !self.events.mov_ss_shadow {
            self.events.nmi_pending = false;
            self.events.nmi_masked = true;
            self.deliver_with_nesting(p, Exception::new(crate::exception::NMI), EventKind::Nmi);
            if self.triple_fault {
                return Some(CpuExit::TripleFault);
            }
        }
        if self.interrupts_enabled() {
            if let Some(v) = self.events.interrupt.take() {
                self.deliver_with_nesting(p, Exception::new(v), EventKind::External);
                if self.triple_fault {
                    return Some(CpuExit::TripleFault);
                }
            } else if self.irq_window {
                return Some(CpuExit::InterruptWindow);
            }
        }
        if self.events.halted {
            return Some(CpuExit::Halted);
        }
        p.retired_hint(self.retired);
        if p.stop_requested() {
            return Some(CpuExit::StopRequested);
        }
        None
    }

    /// Queue an external interrupt (delivered when IF allows).
    pub fn inject_interrupt(&mut self, vector: u8) {
        self.events.interrupt = Some(vector);
    }

    /// Queue an NMI.
    pub fn inject_nmi(&mut self) {
        self.events.nmi_pending = true;
    }
}

#[cfg(test)]
mod tests {
    use crate::insn::testutil::*;
    use crate::state::gpr::*;
    use crate::CpuExit;

    /// Real mode, #DB handler at 0:0x2000 that counts in DX: `inc dx; iret`.
    fn with_db_counter(c: &mut crate::Cpu) {
        write_phys(c, 0x2000, &[0x42, 0xcf]);
        write_phys(c, 4, &[0x00, 0x20, 0x00, 0x00]);
    }

    #[test]
    fn single_step_traps_after_each_instruction_and_rep_iteration() {
        let code = [
            0x9c, 0x58, 0x0d, 0x00, 0x01, 0x50,
            0x9d, // pushf; pop ax; or ax,0x100; push ax; popf (sets TF: no trap)
            0xb9, 0x03, 0x00, // mov cx,3            trap 1
            0xbf, 0x00, 0x30, // mov di,0x3000       trap 2
            0xf3, 0xaa, //       rep stosb           traps 3, 4, 5 (one per iteration)
            0x9c, //             pushf               trap 6
            0x58, //             pop ax              trap 7
            0x25, 0xff, 0xfe, // and ax,0xfeff       trap 8
            0x50, //             push ax             trap 9
            0x9d, //             popf (clears TF)    trap 10: TF was set as it started
        ]; //                    hlt                 no trap
        let c = run(Mode::Real16, &code, with_db_counter);
        assert_eq!(c.gpr(RDX) & 0xffff, 10);
        assert_eq!(c.gpr(RCX) & 0xffff, 0);
        assert_eq!(c.gpr(RDI) & 0xffff, 0x3003);
        assert_eq!(c.rflags() & crate::flags::TF, 0);
        assert_ne!(c.dr.dr6 & super::DR6_BS, 0);
        assert!(!c.events().single_step_pending);
    }

    #[test]
    fn single_step_skips_event_deliveries_and_waits_out_mov_ss_and_hlt() {
        let code = [
            0x9c, 0x58, 0x0d, 0x00, 0x01, 0x50, 0x9d, // set TF
            0xcd, 0x30, //       int 0x30 (delivers: no trap after it)
            0x8e, 0xd0, //       mov ss,ax (shadow: the trap waits...)
            0x41, //             inc cx    (...until after this one: trap 1)
        ]; //                    hlt: the trap is due but waits for a wake-up
        let c = run(Mode::Real16, &code, |c| {
            with_db_counter(c);
            // int 0x30 handler: iret.
            write_phys(c, 0x2100, &[0xcf]);
            write_phys(c, 0x30 * 4, &[0x00, 0x21, 0x00, 0x00]);
        });
        assert_eq!(c.gpr(RDX) & 0xffff, 1);
        assert_eq!(c.gpr(RCX) & 0xffff, 1);
        assert!(c.events().halted);
        assert!(c.events().single_step_pending);
    }

    /// A platform for event-boundary tests: a write to port 0x99 or to
    /// MMIO address 0x100_0000 "raises an interrupt line" the next
    /// `stop_requested` reports; `next_check` names `deadline`, and
    /// `stop_requested` is also true once the CPU has reached it.
    #[derive(Default)]
    struct EventPlatform {
        raised: bool,
        deadline: Option<u64>,
        retired: u64,
        checks: Vec<u64>,
        /// The machine's TPR class (CR8), when it owns one.
        tpr_class: Option<u64>,
    }

    impl crate::Platform for EventPlatform {
        fn io_read(&mut self, _port: u16, data: &mut [u8]) {
            data.fill(0);
        }
        fn io_write(&mut self, port: u16, _data: &[u8]) {
            self.raised |= port == 0x99;
        }
        fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn mmio_write(&mut self, addr: u64, _data: &[u8]) {
            self.raised |= addr == 0x100_0000;
        }
        fn retired_hint(&mut self, retired: u64) {
            self.retired = retired;
        }
        fn stop_requested(&self) -> bool {
            self.raised || self.deadline.is_some_and(|d| self.retired >= d)
        }
        fn next_check(&mut self, retired: u64) -> u64 {
            self.checks.push(retired);
            self.deadline.unwrap_or(u64::MAX)
        }
        fn read_cr8(&mut self) -> Option<u64> {
            self.tpr_class
        }
        fn write_cr8(&mut self, cr8: u64) -> bool {
            let Some(old) = self.tpr_class else {
                return false;
            };
            // Lowering the priority uncovers a pending interrupt.
            self.raised |= cr8 < old;
            self.tpr_class = Some(cr8);
            true
        }
    }

    #[test]
    fn cr8_reaches_the_machine_and_lowering_it_stops_at_the_boundary() {
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        // mov rax, cr8; mov ebx, 2; mov cr8, rbx; inc ecx x 5; hlt
        let mut code = vec![
            0x44, 0x0f, 0x20, 0xc0, 0xbb, 0x02, 0, 0, 0, 0x44, 0x0f, 0x22, 0xc3,
        ];
        code.extend(incs(5));
        code.push(0xf4);
        write_phys(&c, CODE, &code);
        let mut p = EventPlatform {
            tpr_class: Some(9),
            ..Default::default()
        };
        assert_eq!(c.run(&mut p, 1000), CpuExit::StopRequested);
        assert_eq!(c.gpr(RAX), 9, "CR8 reads the machine's TPR class");
        assert_eq!(p.tpr_class, Some(2));
        assert_eq!((c.retired(), c.rip()), (3, CODE + 13));
        assert_eq!(c.state().sregs.cr8, 2);
    }

    /// 32-bit protected mode with a flat 4 GiB DS; `code` then HLT at CODE.
    fn prot32(code: &[u8]) -> crate::Cpu {
        let mut c = new_cpu();
        setup(&mut c, Mode::Prot32);
        let mut bytes = code.to_vec();
        bytes.push(0xf4);
        write_phys(&c, CODE, &bytes);
        c
    }

    /// `inc ecx` repeated `n` times.
    fn incs(n: usize) -> Vec<u8> {
        vec![0x41; n]
    }

    #[test]
    fn device_writes_stop_the_cpu_at_the_next_boundary() {
        // out 0x99, al; inc ecx x 20 — one block, stopped right after the OUT.
        let mut code = vec![0xe6, 0x99];
        code.extend(incs(20));
        let mut c = prot32(&code);
        let mut p = EventPlatform::default();
        assert_eq!(c.run(&mut p, 1000), CpuExit::StopRequested);
        assert_eq!((c.retired(), c.rip()), (1, CODE + 2));
        // mov [0x1000000], eax in the middle of a block: stopped right after it.
        let mut code = incs(3);
        code.extend([0xa3, 0x00, 0x00, 0x00, 0x01]);
        code.extend(incs(20));
        let mut c = prot32(&code);
        let mut p = EventPlatform::default();
        assert_eq!(c.run(&mut p, 1000), CpuExit::StopRequested);
        assert_eq!((c.retired(), c.rip()), (4, CODE + 8));
        assert_eq!(c.gpr(RCX), 3);
    }

    /// Real mode; the handler of vector 0x21 stores CX at 0x600 and
    /// returns. The CPU starts with IF clear and vector 0x21 pending.
    fn with_pending_irq(code: &[u8]) -> crate::Cpu {
        let mut c = new_cpu();
        setup(&mut c, Mode::Real16);
        let mut bytes = code.to_vec();
        bytes.push(0xf4);
        write_phys(&c, CODE, &bytes);
        // mov [0x600], cx ; iret
        write_phys(&c, 0x2000, &[0x89, 0x0e, 0x00, 0x06, 0xcf]);
        write_phys(&c, 0x21 * 4, &[0x00, 0x20, 0x00, 0x00]);
        write_phys(&c, 0x600, &[0xff, 0xff]);
        c.inject_interrupt(0x21);
        c
    }

    #[test]
    fn sti_delivers_after_exactly_one_shadowed_instruction() {
        // sti; inc cx x 10: the interrupt comes after the first INC.
        let mut code = vec![0xfb];
        code.extend(incs(10));
        let mut c = with_pending_irq(&code);
        let mut p = crate::NullPlatform;
        assert_eq!(c.run(&mut p, 1000), CpuExit::Halted);
        assert_eq!(read_phys(&c, 0x600, 2), 1);
        assert_eq!(c.gpr(RCX) & 0xffff, 10);
    }

    #[test]
    fn popf_and_iret_setting_if_deliver_at_the_next_boundary() {
        // pushf; pop ax; or ax, 0x200; push ax; popf; inc cx x 10
        let mut code = vec![0x9c, 0x58, 0x0d, 0x00, 0x02, 0x50, 0x9d];
        code.extend(incs(10));
        let mut c = with_pending_irq(&code);
        assert_eq!(c.run(&mut crate::NullPlatform, 1000), CpuExit::Halted);
        assert_eq!(read_phys(&c, 0x600, 2), 0);
        // IRET to the next instruction with IF set in the popped FLAGS:
        // pushf; pop ax; or ax,0x200; push ax; push cs; push (ip of the INC); iret
        let mut code = vec![0x9c, 0x58, 0x0d, 0x00, 0x02, 0x50, 0x0e, 0x68];
        let target = CODE as u16 + 8 + 2 + 1;
        code.extend(target.to_le_bytes());
        code.push(0xcf);
        code.extend(incs(10));
        let mut c = with_pending_irq(&code);
        assert_eq!(c.run(&mut crate::NullPlatform, 1000), CpuExit::Halted);
        assert_eq!(read_phys(&c, 0x600, 2), 0);
        assert_eq!(c.gpr(RCX) & 0xffff, 10);
    }

    #[test]
    fn platform_deadlines_stop_the_cpu_exactly_inside_a_block() {
        for deadline in [1u64, 5, 17, 40] {
            let mut c = prot32(&incs(60));
            let mut p = EventPlatform {
                deadline: Some(deadline),
                ..Default::default()
            };
            assert_eq!(c.run(&mut p, 1000), CpuExit::StopRequested);
            assert_eq!(c.retired(), deadline);
            assert_eq!(c.gpr(RCX), deadline);
            assert_eq!(c.rip(), CODE + deadline);
        }
    }

    #[test]
    fn budget_stops_exactly_and_resumes_to_the_same_state() {
        // A loop over blocks of several sizes: ecx counts down from 50,
        // eax accumulates, a memory cell too.
        let code = [
            0xb9, 0x32, 0x00, 0x00, 0x00, // mov ecx, 50
            0x31, 0xc0, //                   xor eax, eax
            0x01, 0xc8, //                   l: add eax, ecx
            0x01, 0x05, 0x00, 0x40, 0x00, 0x00, // add [0x4000], eax
            0x8d, 0x44, 0x40, 0x03, //       lea eax, [eax+eax*2+3]
            0x25, 0xff, 0xff, 0x0f, 0x00, // and eax, 0xfffff
            0x49, //                         dec ecx
            0x75, 0xeb, //                   jnz l
        ];
        let mut reference = prot32(&code);
        assert_eq!(
            reference.run(&mut crate::NullPlatform, u64::MAX),
            CpuExit::Halted
        );
        let total = reference.retired();
        for n in [1u64, 2, 3, 7, 13, 64] {
            let mut c = prot32(&code);
            let mut stops = 0;
            loop {
                let before = c.retired();
                match c.run(&mut crate::NullPlatform, n) {
                    CpuExit::BudgetExhausted => {
                        assert_eq!(c.retired(), before + n, "budget {n} not exact");
                        stops += 1;
                    }
                    CpuExit::Halted => break,
                    e => panic!("unexpected exit {e:?}"),
                }
            }
            assert_eq!(c.retired(), total);
            assert_eq!(c.state().regs, reference.state().regs, "budget {n}");
            assert_eq!(read_phys(&c, 0x4000, 4), read_phys(&reference, 0x4000, 4));
            assert!(stops >= (total - 1) / n);
        }
    }

    /// A block-heavy 64-bit program: nested loops, calls and returns,
    /// pushes, a short REP MOVSB, a jump across a page end, memory
    /// read-modify-writes. Returns the code (at CODE) and its data area.
    fn block_heavy_program() -> Vec<u8> {
        use iced_x86::code_asm::*;
        let mut a = CodeAssembler::new(64).unwrap();
        let mut outer = a.create_label();
        let mut inner = a.create_label();
        let mut func = a.create_label();
        let mut far = a.create_label();
        let mut back = a.create_label();
        a.mov(r8d, 7).unwrap();
        a.mov(rbx, 0x20_0000u64).unwrap();
        a.set_label(&mut outer).unwrap();
        a.mov(ecx, 5).unwrap();
        a.set_label(&mut inner).unwrap();
        a.add(qword_ptr(rbx + rcx * 8), rcx).unwrap();
        a.lea(rax, qword_ptr(rcx + rcx * 2 + 1)).unwrap();
        a.xor(qword_ptr(rbx + 0x100), rax).unwrap();
        a.call(func).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(inner).unwrap();
        a.lea(rsi, qword_ptr(rbx)).unwrap();
        a.lea(rdi, qword_ptr(rbx + 0x200)).unwrap();
        a.mov(ecx, 24).unwrap();
        a.rep().movsb().unwrap();
        a.jmp(far).unwrap();
        a.set_label(&mut back).unwrap();
        a.dec(r8d).unwrap();
        a.jnz(outer).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut func).unwrap();
        a.push(rcx).unwrap();
        a.imul_3(edx, ecx, 13).unwrap();
        a.adc(qword_ptr(rbx + 0x108), rdx).unwrap();
        a.pop(rcx).unwrap();
        a.ret().unwrap();
        // Pad so that `far` straddles into the next page.
        for _ in 0..(0xffa - 0x80) {
            a.nop().unwrap();
        }
        a.set_label(&mut far).unwrap();
        a.mov(rax, 0x1122_3344_5566_7788u64).unwrap();
        a.add(qword_ptr(rbx + 0x110), rax).unwrap();
        a.jmp(back).unwrap();
        a.assemble(CODE).unwrap()
    }

    fn run_block_heavy(stops: &[u64]) -> (crate::Cpu, Vec<u64>) {
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        write_phys(&c, CODE, &block_heavy_program());
        let mut seen = Vec::new();
        for &n in stops {
            assert_eq!(
                c.run_until(&mut crate::NullPlatform, n),
                CpuExit::BudgetExhausted
            );
            seen.push(c.retired());
        }
        assert_eq!(c.run(&mut crate::NullPlatform, u64::MAX), CpuExit::Halted);
        (c, seen)
    }

    fn data_area(c: &crate::Cpu) -> Vec<u64> {
        (0..0x240)
            .step_by(8)
            .map(|o| read_phys(c, 0x20_0000 + o, 8))
            .collect()
    }

    #[test]
    fn stopping_at_every_count_gives_the_state_of_running_through() {
        let (reference, _) = run_block_heavy(&[]);
        let total = reference.retired();
        assert!(total > 400, "the program retires {total}");
        for n in 1..total {
            let (c, seen) = run_block_heavy(&[n]);
            assert_eq!(seen, vec![n], "stop at {n} not exact");
            assert_eq!(c.state(), reference.state(), "stopped at {n}");
            assert_eq!(data_area(&c), data_area(&reference), "stopped at {n}");
        }
        // Many stops in one run (every 3rd and every 17th instruction).
        for step in [3u64, 17] {
            let stops: Vec<u64> = (1..total / step).map(|k| k * step).collect();
            let (c, seen) = run_block_heavy(&stops);
            assert_eq!(seen, stops);
            assert_eq!(c.state(), reference.state(), "every {step}");
        }
        // A target at or below the count executes nothing.
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        write_phys(&c, CODE, &block_heavy_program());
        assert_eq!(
            c.run_until(&mut crate::NullPlatform, 10),
            CpuExit::BudgetExhausted
        );
        let before = c.state();
        assert_eq!(
            c.run_until(&mut crate::NullPlatform, 5),
            CpuExit::BudgetExhausted
        );
        assert_eq!(c.state(), before);
    }
}
