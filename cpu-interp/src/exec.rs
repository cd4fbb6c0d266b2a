//! The execution loop: event checks at block boundaries, block lookup or
//! translation, and instruction dispatch.

use iced_x86::{Decoder, DecoderError, DecoderOptions, FlowControl, Instruction, OpKind, Register};

use crate::block::{Block, BlockId, Insn, MAX_BLOCK};
use crate::cpu::{sreg, Cpu, CpuExit};
use crate::dispatch::Handler;
use crate::exception::{Exception, XResult};
use crate::interrupt::EventKind;
use crate::mmu::Access;
use crate::platform::Platform;

/// DR6.BS: the debug exception was a single-step trap.
const DR6_BS: u64 = 1 << 14;

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
    /// Run until an exit condition, executing at most about `budget`
    /// instructions (checked at block boundaries).
    pub fn run(&mut self, p: &mut dyn Platform, budget: u64) -> CpuExit {
        let limit = self.retired.saturating_add(budget);
        if self.blocks.dead() > 8192 {
            // Nothing executes now: reclaim blocks unlinked by code writes.
            self.clear_blocks();
        }
        let mut prev: Option<BlockId> = None;
        let mut quiet_blocks = 0u32;
        loop {
            // Events are checked at every boundary where something may have
            // changed (I/O, pending interrupts, HLT, ...) and at least every
            // 64 blocks for requests from outside (kicks, timers).
            quiet_blocks += 1;
            if quiet_blocks >= 64 || self.io_happened || self.may_have_events() {
                quiet_blocks = 0;
                self.io_happened = false;
                if let Some(e) = self.check_events(p) {
                    return e;
                }
            }
            if self.retired >= limit {
                return CpuExit::BudgetExhausted;
            }
            if self.flags.test(crate::flags::TF) {
                // Single-stepping: one instruction at a time, each followed
                // by its #DB trap. (Every instruction that can set TF ends
                // its block.)
                prev = None;
                if let Some(e) = self.step(p) {
                    return e;
                }
                continue;
            }
            self.events.sti_shadow = false;
            self.events.mov_ss_shadow = false;
            let id = match prev.and_then(|from| self.chained(from)) {
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
            prev = if self.exec_block(p, block) {
                Some(id)
            } else {
                None
            };
        }
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
            self.single_step_trap(p);
            if self.triple_fault {
                return Some(CpuExit::TripleFault);
            }
        }
        self.events.sti_shadow = false;
        self.events.mov_ss_shadow = false;
        // TF as the instruction starts decides its single-step trap.
        let trap = self.flags.test(crate::flags::TF);
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
                // The trap follows an instruction that completed without
                // delivering an event (a fault, INT n, INTO, INT3), except
                // after MOV SS/POP SS, whose shadow moves it past the next
                // instruction.
                if trap
                    && self.deliveries == delivered
                    && !self.events.mov_ss_shadow
                    && !self.triple_fault
                {
                    if (self.io_happened && p.stop_requested()) || self.events.halted {
                        // The VMM takes over first (as after a VM exit on
                        // hardware), or the CPU halts; the trap follows
                        // when it resumes or wakes.
                        self.events.single_step_pending = true;
                    } else {
                        self.single_step_trap(p);
                    }
                }
            }
            Err(exc) => {
                self.rip = rip;
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

    /// Deliver the single-step #DB trap of the instruction just executed.
    fn single_step_trap(&mut self, p: &mut dyn Platform) {
        self.events.single_step_pending = false;
        self.dr.dr6 |= DR6_BS;
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
        })
    }

    /// Execute a block. Returns true when it ran to its end (so the next
    /// block may be linked to it), false after an exception or an early exit.
    fn exec_block(&mut self, p: &mut dyn Platform, block: &Block) -> bool {
        for insn in block.insns.iter() {
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
        true
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
                self.single_step_trap(p);
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
}
