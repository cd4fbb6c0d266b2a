//! The interpreter's CPU: architectural state plus the caches that make it
//! fast (TLB, decoded blocks). Instruction semantics live in `insn/`, memory
//! translation in `mmu`, segmentation in `segment`, event delivery in
//! `interrupt`, the execution loop in `exec`.

use iced_x86::Register;

use crate::block::BlockCache;
use crate::flags::{self, Flags};
use crate::fpu::Fpu;
use crate::memory::Ram;
use crate::mmu::Tlb;
use crate::state::{
    CpuState, DebugRegs, DescriptorTable, Msrs, PendingEvents, Regs, Segment, Sregs,
};

/// Segment register numbers (hardware encoding, also iced's order).
pub mod sreg {
    pub const ES: usize = 0;
    pub const CS: usize = 1;
    pub const SS: usize = 2;
    pub const DS: usize = 3;
    pub const FS: usize = 4;
    pub const GS: usize = 5;
}

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_EM: u64 = 1 << 2;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_AM: u64 = 1 << 18;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_PG: u64 = 1 << 31;

pub const CR4_VME: u64 = 1 << 0;
pub const CR4_PVI: u64 = 1 << 1;
pub const CR4_TSD: u64 = 1 << 2;
pub const CR4_DE: u64 = 1 << 3;
/// IA32_APIC_BASE.EN: the local APIC is globally enabled.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_MCE: u64 = 1 << 6;
pub const CR4_PGE: u64 = 1 << 7;
pub const CR4_PCE: u64 = 1 << 8;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const CR4_UMIP: u64 = 1 << 11;
pub const CR4_FSGSBASE: u64 = 1 << 16;
pub const CR4_PCIDE: u64 = 1 << 17;
pub const CR4_OSXSAVE: u64 = 1 << 18;
pub const CR4_SMEP: u64 = 1 << 20;
pub const CR4_SMAP: u64 = 1 << 21;

pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;

pub(crate) const CHAIN_SIZE: usize = 4096;

/// A cached link from one block to the block that followed it.
#[derive(Clone, Copy)]
pub(crate) struct ChainEntry {
    pub from: crate::block::BlockId,
    pub rip: u64,
    pub epoch: u64,
    pub to: crate::block::BlockId,
}

impl ChainEntry {
    pub const EMPTY: ChainEntry = ChainEntry {
        from: u32::MAX,
        rip: 0,
        epoch: u64::MAX,
        to: 0,
    };
}

/// Why [`Cpu::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuExit {
    /// HLT executed; `events.halted` is set until an interrupt arrives.
    Halted,
    /// Interrupts can be injected now (a window was requested).
    InterruptWindow,
    /// A fault during double-fault delivery: the CPU shut down.
    TripleFault,
    /// The instruction budget ran out.
    BudgetExhausted,
    /// The platform asked the CPU to stop.
    StopRequested,
}

/// The interpreter's vCPU.
pub struct Cpu {
    pub(crate) gpr: [u64; 16],
    pub(crate) rip: u64,
    pub(crate) flags: Flags,
    pub(crate) seg: [Segment; 6],
    pub(crate) ldtr: Segment,
    pub(crate) tr: Segment,
    pub(crate) gdtr: DescriptorTable,
    pub(crate) idtr: DescriptorTable,
    pub(crate) cr0: u64,
    pub(crate) cr2: u64,
    pub(crate) cr3: u64,
    pub(crate) cr4: u64,
    pub(crate) cr8: u64,
    pub(crate) efer: u64,
    pub(crate) apic_base: u64,
    pub(crate) xcr0: u64,
    /// XSAVE state beyond x87/SSE/AVX, carried for KVM guests.
    pub(crate) xstate: crate::state::XState,
    pub(crate) msrs: Msrs,
    pub(crate) dr: DebugRegs,
    /// Derived from DR7 (see `debug`): an instruction breakpoint, a data
    /// watchpoint, an I/O breakpoint is enabled.
    pub(crate) dr_exec: bool,
    pub(crate) dr_watch: bool,
    pub(crate) dr_io: bool,
    /// Breakpoints (DR6.B bits) the current instruction's accesses hit.
    pub(crate) dr_hits: u64,
    /// Data breakpoints of a MOV SS/POP SS, reported after the next
    /// instruction.
    pub(crate) dr_deferred: u64,
    pub(crate) fpu: Fpu,
    pub(crate) events: PendingEvents,
    /// TSC = base clock + tsc_offset.
    pub(crate) tsc_offset: u64,

    // Derived from the above; recomputed by `update_mode`.
    pub(crate) cpl: u8,
    /// Default code size: 16, 32 or 64.
    pub(crate) bits: u32,

    // Machinery.
    pub(crate) ram: Ram,
    /// Inline (not boxed): translated code reaches it at a fixed offset
    /// from the `Cpu`.
    pub(crate) tlb: Tlb,
    pub(crate) blocks: BlockCache,
    pub(crate) retired: u64,
    /// The retired count at which the run loop next checks events (the
    /// budget's end, a platform deadline, a poll): blocks stop there.
    pub(crate) stop_at: u64,
    pub(crate) irq_window: bool,
    /// Set when a write hit a page with decoded code; the current block ends.
    pub(crate) code_written: bool,
    /// Set by handlers that change how following code must be decoded or
    /// translated (mode switches); the current block ends after them.
    pub(crate) end_block: bool,
    /// Exception currently being delivered (for #DF / triple-fault rules).
    pub(crate) delivering: Option<u8>,
    /// Events delivered so far (an instruction that delivered one, INT n
    /// or a fault, takes no single-step trap).
    pub(crate) deliveries: u64,
    pub(crate) triple_fault: bool,
    /// Exit requested by a handler (HLT).
    pub(crate) pending_exit: Option<CpuExit>,
    /// Don't use or fill the block cache (single-step fallback for KVM).
    pub(crate) uncached: bool,
    /// Execute instructions of features the interpreter's own CPUID does
    /// not advertise but the host's does (CLAC/STAC, CLFLUSHOPT, CLWB,
    /// INVPCID, MOVBE, RDPID): on when the KVM backend hands over an
    /// instruction its guest chose from the host's CPUID.
    pub(crate) host_features: bool,
    pub(crate) unimplemented_seen: Vec<u64>,
    /// A port or MMIO access happened since the last event check.
    pub(crate) io_happened: bool,
    /// Block-to-block links: (from block, next RIP) → next block.
    pub(crate) chain: Box<[ChainEntry]>,
    /// What CPUID reports.
    pub(crate) cpuid_cfg: crate::cpuid::CpuidConfig,
    /// The instruction-set extensions this CPU executes (its model's, or
    /// all of them with `host_features`); instructions of the others #UD.
    pub(crate) feat: crate::cpuid::Features,
    /// XCR0 bits XSETBV/XRSTOR accept (the model's, or the KVM guest's
    /// components with `host_features`).
    pub(crate) xcr0_mask: u64,
    /// Vendor-specific behaviour (Intel's unless told otherwise).
    pub(crate) quirks: crate::quirks::Quirks,
    /// MTRR MSRs written by the guest.
    pub(crate) mtrr: std::collections::BTreeMap<u32, u64>,
    /// Machine-check banks (CPUID MCE/MCA).
    pub(crate) mca: crate::mca::MachineCheck,
    unknown_msrs_logged: std::collections::BTreeSet<(u32, bool)>,
    /// The translation tier (None: interpreter only).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    pub(crate) jit: Option<Box<crate::jit::Jit>>,
    /// The budget register as translated code left it.
    pub(crate) jit_budget: u64,
    /// The code buffer filled up: flush all code caches between blocks.
    pub(crate) jit_flush_pending: bool,
    /// `--profile`: count block executions and time the tiers.
    pub(crate) profiling: bool,
    pub(crate) profile: crate::profile::Totals,
    /// The last blocks entered (crash reports).
    pub(crate) recent: crate::recent::RecentCode,
}

impl Cpu {
    /// A CPU in its RESET state over `ram`.
    pub fn new(ram: Ram) -> Self {
        let mut cpu = Cpu {
            gpr: [0; 16],
            rip: 0,
            flags: Flags::default(),
            seg: [Segment::default(); 6],
            ldtr: Segment::default(),
            tr: Segment::default(),
            gdtr: DescriptorTable::default(),
            idtr: DescriptorTable::default(),
            cr0: 0,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            apic_base: 0,
            xcr0: 1,
            xstate: crate::state::XState::default(),
            msrs: Msrs::default(),
            dr: DebugRegs::default(),
            dr_exec: false,
            dr_watch: false,
            dr_io: false,
            dr_hits: 0,
            dr_deferred: 0,
            fpu: Fpu::default(),
            events: PendingEvents::default(),
            tsc_offset: 0,
            cpl: 0,
            bits: 16,
            ram,
            tlb: Tlb::new(),
            blocks: BlockCache::new(),
            retired: 0,
            stop_at: 0,
            irq_window: false,
            code_written: false,
            end_block: false,
            delivering: None,
            deliveries: 0,
            triple_fault: false,
            pending_exit: None,
            uncached: false,
            host_features: false,
            unimplemented_seen: vec![0; iced_x86::Code::values().len().div_ceil(64)],
            io_happened: false,
            chain: vec![ChainEntry::EMPTY; CHAIN_SIZE].into_boxed_slice(),
            cpuid_cfg: crate::cpuid::CpuidConfig::default(),
            feat: crate::cpuid::feat::ALL,
            xcr0_mask: crate::cpuid::xcr0_supported(crate::cpuid::feat::ALL),
            quirks: crate::quirks::Quirks::INTEL,
            mtrr: std::collections::BTreeMap::new(),
            mca: crate::mca::MachineCheck::default(),
            unknown_msrs_logged: std::collections::BTreeSet::new(),
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            jit: None,
            jit_budget: 0,
            jit_flush_pending: false,
            profiling: false,
            profile: Default::default(),
            recent: Default::default(),
        };
        cpu.set_state(&CpuState::reset());
        cpu
    }

    /// Guest instructions retired so far.
    pub fn retired(&self) -> u64 {
        self.retired
    }

    /// The RAM this CPU executes from.
    pub fn ram(&self) -> &Ram {
        &self.ram
    }

    /// Execute without the decoded-block cache (every instruction decoded
    /// afresh). Used when another agent (KVM) also changes memory.
    pub fn set_uncached(&mut self, on: bool) {
        self.uncached = on;
        self.clear_blocks();
    }

    /// The last blocks (and single-stepped instructions) the run loop
    /// entered, oldest first (see [`crate::recent`]).
    pub fn recent_code(&self) -> Vec<crate::recent::RecentEntry> {
        self.recent.entries()
    }

    /// Drop all decoded blocks, translations and links (only between
    /// blocks).
    pub(crate) fn clear_blocks(&mut self) {
        self.blocks.clear();
        self.clear_links();
        self.jit_flush();
    }

    /// Drop every translation (with the blocks they came from).
    pub(crate) fn jit_flush(&mut self) {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some(j) = self.jit.as_mut() {
            j.flush();
        }
        self.jit_flush_pending = false;
    }

    /// Drop the decoded blocks (and translations) with bytes on physical
    /// page `page`. True if there were any.
    pub(crate) fn invalidate_code_page(&mut self, page: u64) -> bool {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some(j) = self.jit.as_mut() {
            return self.blocks.invalidate_page_with(page, |b| {
                for slot in &b.jit {
                    let t = slot.get();
                    if t != 0 {
                        j.kill(t - 1);
                        slot.set(0);
                    }
                }
            });
        }
        self.blocks.invalidate_page(page)
    }

    /// Translate a 64-bit block once it has run `n` times (default 64, or
    /// `DUET_JIT_HOT`); 1 translates every block the first time (what a
    /// differential test of the translation tier wants). No effect on the
    /// interpreter tier.
    pub fn set_jit_threshold(&mut self, n: u32) {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some(j) = self.jit.as_mut() {
            j.hot = n.max(1);
        }
        let _ = n;
    }

    /// Choose the execution tier (default: the interpreter). `Jit` falls
    /// back to the interpreter, with an error, where the host cannot run
    /// translated code.
    pub fn set_tier(&mut self, tier: crate::Tier) -> Result<(), crate::TierError> {
        match tier {
            crate::Tier::Interp => {
                #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
                {
                    self.jit = None;
                }
                self.clear_blocks();
                Ok(())
            }
            crate::Tier::Jit => {
                #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
                {
                    if self.jit.is_none() {
                        let j = crate::jit::Jit::new(crate::jit::DEFAULT_CODE_SIZE)
                            .map_err(|e| crate::TierError::Unavailable(e.to_string()))?;
                        self.jit = Some(Box::new(j));
                    }
                    self.clear_blocks();
                    Ok(())
                }
                #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
                Err(crate::TierError::Unavailable(
                    "the translation tier needs an x86-64 Linux host".into(),
                ))
            }
        }
    }

    /// The tier in use.
    pub fn tier(&self) -> crate::Tier {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if self.jit.is_some() {
            return crate::Tier::Jit;
        }
        crate::Tier::Interp
    }

    /// The translation tier's counters (None on the interpreter).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    pub fn jit_stats(&self) -> Option<crate::jit::JitStats> {
        self.jit.as_ref().map(|j| j.stats)
    }

    /// Forget block-to-block links (their block ids are stale).
    pub(crate) fn clear_links(&mut self) {
        self.chain.fill(ChainEntry::EMPTY);
        self.tlb.bump();
        // Pages no longer hold decoded code: writes may take the fast path.
        self.tlb.clear_all_code();
    }

    /// Bound the host memory of the decoded-block cache (default
    /// [`crate::block::DEFAULT_CACHE_LIMIT`]).
    /// The translation tier's code buffer gets the same bound.
    pub fn set_cache_limit(&mut self, bytes: usize) {
        self.blocks.set_limit(bytes);
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some(j) = self.jit.as_mut() {
            j.set_limit(bytes);
        }
    }

    /// The decoded-block cache's counters.
    pub fn cache_stats(&self) -> crate::block::CacheStats {
        self.blocks.stats()
    }

    /// Allow instructions of host CPU features the interpreter's CPUID does
    /// not advertise (see `host_features`).
    pub fn set_host_features(&mut self, on: bool) {
        self.host_features = on;
        self.update_features();
    }

    /// Recompute the enabled extensions after the model or
    /// `host_features` changed; decoded blocks carry the choice.
    fn update_features(&mut self) {
        let f = if self.host_features {
            crate::cpuid::feat::ALL
        } else {
            self.cpuid_cfg.model.features()
        };
        if f != self.feat {
            self.feat = f;
            self.clear_blocks();
        }
        if !self.host_features {
            self.xcr0_mask = crate::cpuid::xcr0_supported(f);
        }
    }

    /// Let XSETBV/XRSTOR use the XSAVE state components in `mask` (a KVM
    /// guest's CPUID leaf 0xD, for the fallback): beyond x87/SSE/AVX only
    /// those [`crate::state::XState`] carries (opmask, ZMM, PKRU).
    pub fn set_xsave_components(&mut self, mask: u64) {
        self.xcr0_mask = (mask | 1) & crate::insn::xsave::CARRIED;
    }

    /// Does this CPU execute instructions of extension `f`?
    #[inline(always)]
    pub(crate) fn has(&self, f: crate::cpuid::Features) -> bool {
        self.feat & f == f
    }

    /// Behave as `quirks` say where the vendors differ (default: Intel's).
    pub fn set_quirks(&mut self, quirks: crate::quirks::Quirks) {
        if quirks != self.quirks {
            // Decoded blocks carry quirk-dependent choices.
            self.quirks = quirks;
            self.clear_blocks();
        }
    }

    pub fn quirks(&self) -> crate::quirks::Quirks {
        self.quirks
    }

    /// Forget decoded code and translations (memory changed behind our back).
    pub fn flush_caches(&mut self) {
        self.clear_blocks();
        self.tlb.flush_all();
    }

    /// Forget decoded code in a guest-physical range that was written by
    /// someone other than this CPU (device DMA, a loader). True when some
    /// was dropped. (Writes through a [`crate::memory::ForeignWrites`] log
    /// given to the CPU's [`Ram`] are picked up without this call.)
    pub fn invalidate_phys_range(&mut self, start: u64, len: u64) -> bool {
        let mut page = start & !0xfff;
        let end = start.saturating_add(len);
        let mut dropped = false;
        while page < end {
            if self.blocks.is_code_page(page) && self.invalidate_code_page(page) {
                self.tlb.clear_code_page(page);
                self.tlb.bump();
                dropped = true;
            }
            page += 0x1000;
        }
        dropped
    }

    /// Drop the code others wrote over since the last look (the RAM's
    /// [`crate::memory::ForeignWrites`] log). Called after every port and
    /// MMIO access (a device may have run DMA) and when a run starts (the
    /// VMM may have run devices in between). If decoded code was dropped,
    /// the running block ends after the current instruction, exactly as
    /// after a store of the CPU's own into code.
    #[inline]
    pub(crate) fn take_foreign_writes(&mut self) {
        let Some(mut log) = self.ram.foreign.take() else {
            return;
        };
        let mut dropped = false;
        log.take(&mut |start, len| dropped |= self.invalidate_phys_range(start, len));
        self.ram.foreign = Some(log);
        self.code_written |= dropped;
    }

    // ---- state transfer -------------------------------------------------

    /// The complete architectural state.
    /// The MTRRs as the guest sees them (defaults where it wrote none).
    fn mtrr_state(&self) -> crate::state::Mtrrs {
        use crate::state::{msr, Mtrrs, MTRR_FIXED_MSRS, MTRR_VARIABLE_FIRST};
        let d = Mtrrs::default();
        let get = |i: u32, default: u64| *self.mtrr.get(&i).unwrap_or(&default);
        Mtrrs {
            def_type: get(msr::MTRR_DEF_TYPE, d.def_type),
            variable: std::array::from_fn(|k| get(MTRR_VARIABLE_FIRST + k as u32, 0)),
            fixed: std::array::from_fn(|k| get(MTRR_FIXED_MSRS[k], d.fixed[k])),
        }
    }

    fn set_mtrr_state(&mut self, m: &crate::state::Mtrrs) {
        use crate::state::{msr, MTRR_FIXED_MSRS, MTRR_VARIABLE_FIRST};
        self.mtrr.clear();
        self.mtrr.insert(msr::MTRR_DEF_TYPE, m.def_type);
        for (k, v) in m.variable.iter().enumerate() {
            self.mtrr.insert(MTRR_VARIABLE_FIRST + k as u32, *v);
        }
        for (i, v) in MTRR_FIXED_MSRS.iter().zip(m.fixed) {
            self.mtrr.insert(*i, v);
        }
    }

    pub fn state(&self) -> CpuState {
        CpuState {
            regs: Regs {
                gpr: self.gpr,
                rip: self.rip,
                rflags: self.flags.get(),
            },
            sregs: Sregs {
                es: self.seg[sreg::ES],
                cs: self.seg[sreg::CS],
                ss: self.seg[sreg::SS],
                ds: self.seg[sreg::DS],
                fs: self.seg[sreg::FS],
                gs: self.seg[sreg::GS],
                tr: self.tr,
                ldt: self.ldtr,
                gdt: self.gdtr,
                idt: self.idtr,
                cr0: self.cr0,
                cr2: self.cr2,
                cr3: self.cr3,
                cr4: self.cr4,
                cr8: self.cr8,
                efer: self.efer,
                apic_base: self.apic_base,
            },
            msrs: crate::state::Msrs {
                mtrr: self.mtrr_state(),
                ..self.msrs
            },
            fpu: self.fpu.to_state(),
            debug: self.dr,
            xcr0: self.xcr0,
            xstate: self.xstate,
            events: self.events,
            tsc: self.tsc_offset.wrapping_add(self.retired),
        }
    }

    /// Replace the complete architectural state; all caches are flushed.
    pub fn set_state(&mut self, s: &CpuState) {
        self.gpr = s.regs.gpr;
        self.rip = s.regs.rip;
        self.flags = Flags::new(s.regs.rflags);
        self.seg = [
            s.sregs.es, s.sregs.cs, s.sregs.ss, s.sregs.ds, s.sregs.fs, s.sregs.gs,
        ];
        self.tr = s.sregs.tr;
        self.ldtr = s.sregs.ldt;
        self.gdtr = s.sregs.gdt;
        self.idtr = s.sregs.idt;
        self.cr0 = s.sregs.cr0 | CR0_ET;
        self.cr2 = s.sregs.cr2;
        self.cr3 = s.sregs.cr3;
        self.cr4 = s.sregs.cr4;
        self.cr8 = s.sregs.cr8 & 0xf;
        self.efer = s.sregs.efer;
        self.apic_base = s.sregs.apic_base;
        self.xcr0 = s.xcr0 | 1;
        self.xstate = s.xstate;
        self.msrs = s.msrs;
        self.set_mtrr_state(&s.msrs.mtrr);
        self.fpu = Fpu::from_state(&s.fpu);
        self.dr = s.debug;
        self.dr_hits = 0;
        self.dr_deferred = 0;
        self.events = s.events;
        self.tsc_offset = s.tsc.wrapping_sub(self.retired);
        self.cpl = if self.cr0 & CR0_PE == 0 {
            0
        } else if self.flags.test(flags::VM) {
            3
        } else {
            self.seg[sreg::SS].dpl
        };
        self.delivering = None;
        self.triple_fault = false;
        self.pending_exit = None;
        self.update_mode();
        self.debug_regs_changed();
        self.flush_caches();
    }

    /// Recompute the derived mode fields after CR0, EFER, CS or RFLAGS.VM
    /// changed.
    pub(crate) fn update_mode(&mut self) {
        let cs = &self.seg[sreg::CS];
        self.bits = if self.efer & EFER_LMA != 0 && cs.l && self.cr0 & CR0_PE != 0 {
            64
        } else if self.flags.test(flags::VM) {
            16
        } else if cs.db {
            32
        } else {
            16
        };
        self.tlb.select(self.cpl == 3);
        self.tlb.bump();
    }

    // ---- modes ------------------------------------------------------------

    #[inline]
    pub(crate) fn protected(&self) -> bool {
        self.cr0 & CR0_PE != 0
    }
    #[inline]
    pub(crate) fn vm86(&self) -> bool {
        self.flags.test(flags::VM)
    }
    #[inline]
    pub(crate) fn long_mode(&self) -> bool {
        self.efer & EFER_LMA != 0
    }
    /// Real-address mode or virtual-8086 mode: segments are selector << 4.
    #[inline]
    pub(crate) fn real_like(&self) -> bool {
        !self.protected() || self.vm86()
    }

    // ---- registers ------------------------------------------------------------

    /// Read an iced general-purpose or segment register, zero-extended.
    #[inline(always)]
    pub(crate) fn reg(&self, r: Register) -> u64 {
        let n = r as usize;
        match n {
            1..=4 => self.gpr[n - 1] & 0xff,
            5..=8 => (self.gpr[n - 5] >> 8) & 0xff,
            9..=20 => self.gpr[n - 5] & 0xff,
            21..=36 => self.gpr[n - 21] & 0xffff,
            37..=52 => self.gpr[n - 37] & 0xffff_ffff,
            53..=68 => self.gpr[n - 53],
            69 => self.rip & 0xffff_ffff,
            70 => self.rip,
            71..=76 => u64::from(self.seg[n - 71].selector),
            _ => 0,
        }
    }

    /// Write an iced general-purpose register with x86 semantics: 8- and
    /// 16-bit writes merge, 32-bit writes zero-extend.
    #[inline(always)]
    pub(crate) fn set_reg(&mut self, r: Register, v: u64) {
        let n = r as usize;
        match n {
            1..=4 => self.gpr[n - 1] = (self.gpr[n - 1] & !0xff) | (v & 0xff),
            5..=8 => self.gpr[n - 5] = (self.gpr[n - 5] & !0xff00) | ((v & 0xff) << 8),
            9..=20 => self.gpr[n - 5] = (self.gpr[n - 5] & !0xff) | (v & 0xff),
            21..=36 => self.gpr[n - 21] = (self.gpr[n - 21] & !0xffff) | (v & 0xffff),
            37..=52 => self.gpr[n - 37] = v & 0xffff_ffff,
            53..=68 => self.gpr[n - 53] = v,
            // Only general-purpose registers reach here (an internal bug
            // otherwise: a panic, contained as a clean VM stop, never a
            // silently dropped write).
            _ => unreachable!("set_reg({r:?}): not a general-purpose register"),
        }
    }

    /// Write the low `size` bytes of GPR `idx` (1/2 merge, 4 zero-extends).
    #[inline(always)]
    pub(crate) fn set_gpr_sized(&mut self, idx: usize, size: u32, v: u64) {
        let old = self.gpr[idx];
        self.gpr[idx] = match size {
            1 => (old & !0xff) | (v & 0xff),
            2 => (old & !0xffff) | (v & 0xffff),
            4 => v & 0xffff_ffff,
            _ => v,
        };
    }

    /// RFLAGS as software sees it.
    pub fn rflags(&self) -> u64 {
        self.flags.get()
    }

    pub fn rip(&self) -> u64 {
        self.rip
    }

    pub fn gpr(&self, idx: usize) -> u64 {
        self.gpr[idx]
    }

    pub fn set_gpr(&mut self, idx: usize, v: u64) {
        self.gpr[idx] = v;
    }

    /// Time-stamp counter as RDTSC sees it.
    pub(crate) fn read_tsc(&mut self, p: &mut dyn crate::Platform) -> u64 {
        p.retired_hint(self.retired);
        let base = p.tsc().unwrap_or(self.retired);
        base.wrapping_add(self.tsc_offset)
    }

    /// Log an unimplemented instruction once per opcode form.
    pub(crate) fn note_unimplemented(&mut self, i: &iced_x86::Instruction) {
        let c = i.code() as usize;
        let (w, b) = (c / 64, c % 64);
        if self.unimplemented_seen[w] & (1 << b) == 0 {
            self.unimplemented_seen[w] |= 1 << b;
            log::warn!(
                "interpreter: {:?} ({}) at {:#x} is not implemented; raising #UD (logged once)",
                i.code(),
                crate::disasm(i),
                self.rip
            );
        }
    }

    /// Log an access to an MSR duet does not model, once per MSR and direction.
    pub(crate) fn note_unknown_msr(&mut self, index: u32, write: bool) {
        if self.unknown_msrs_logged.len() < 256 && self.unknown_msrs_logged.insert((index, write)) {
            log::debug!(
                "interpreter: {} of unknown MSR {index:#x} raises #GP (logged once)",
                if write { "WRMSR" } else { "RDMSR" }
            );
        }
    }

    /// Set what CPUID reports (APIC presence and ID, TSC frequency).
    pub fn set_cpuid_config(&mut self, cfg: crate::cpuid::CpuidConfig) {
        self.cpuid_cfg = cfg;
        self.update_features();
    }

    /// Pending-event state (interrupt shadow, halted, ...).
    pub fn events(&self) -> &PendingEvents {
        &self.events
    }
    pub fn events_mut(&mut self) -> &mut PendingEvents {
        &mut self.events
    }

    /// Ask `run` to return [`CpuExit::InterruptWindow`] when an external
    /// interrupt could be taken.
    pub fn request_interrupt_window(&mut self, on: bool) {
        self.irq_window = on;
    }

    /// Could an external interrupt be delivered at this boundary?
    pub fn interrupts_enabled(&self) -> bool {
        self.flags.test(flags::IF) && !self.events.sti_shadow && !self.events.mov_ss_shadow
    }
}
