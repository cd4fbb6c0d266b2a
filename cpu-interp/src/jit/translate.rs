//! Guest block → host x86-64 code.
//!
//! A translation covers one decoded block (64-bit code only). Guest
//! instructions are emitted in three ways:
//!
//! * **natively**: the guest instruction itself, re-encoded with host
//!   registers (ALU, MOV, LEA, shifts, IMUL, CMOVcc, SETcc, XCHG, ...).
//!   Host EFLAGS then hold the guest's arithmetic flags; nothing is
//!   computed lazily. A memory operand becomes `[T0]` after an inline
//!   software-TLB lookup (hit: compare + add; miss, MMIO, code page: the
//!   slow path).
//! * **by template**: PUSH/POP/CALL/RET/JMP/Jcc, whose implicit stack and
//!   control flow the translator spells out.
//! * **through the interpreter**: anything else calls [`super::helpers`]
//!   to run the interpreter's handler for that one instruction, with the
//!   guest state written back first; a slow path (TLB miss) does the same
//!   for the instruction whose lookup missed. The interpreter then raises
//!   any fault exactly as it would have, so exceptions are precise.
//!
//! Guest registers are cached in host registers within the block (RAX, RCX,
//! RDX, RBX hold guest RAX, RCX, RDX, RBX so implicit operands and high-byte
//! registers work; six more host registers are allocated to the other
//! guest registers) and written back at exits and before helpers. RBP
//! points at the `Cpu`, R15 counts the instruction budget down (each block
//! subtracts its length at entry), R10/R11/R14 are temporaries.

use iced_x86::{
    Code, ConditionCode, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register,
};

use super::asm::{self, cc, mem, mem_idx, reg, Asm, Label, Reg};
use super::layout as L;
use crate::block::Insn;

/// Temporaries.
pub const T0: Reg = asm::R10;
pub const T1: Reg = asm::R11;
pub const T2: Reg = asm::R14;
/// The `Cpu`.
pub const CPU: Reg = asm::RBP;
/// Remaining instruction budget.
pub const BUDGET: Reg = asm::R15;

/// Host registers handed out to guest registers 4..15.
const POOL: [Reg; 6] = [asm::RSI, asm::RDI, asm::R8, asm::R9, asm::R12, asm::R13];

/// iced's RFLAGS bits for the six arithmetic flags.
pub const OF: u32 = 0x01;
pub const SF: u32 = 0x02;
pub const ZF: u32 = 0x04;
pub const AF: u32 = 0x08;
pub const CF: u32 = 0x10;
pub const PF: u32 = 0x20;
pub const ALL6: u32 = 0x3f;

/// EFLAGS bits of the six arithmetic flags.
const ARITH_EFLAGS: u32 = 0x8d5;

/// The EFLAGS bits of a set of iced arithmetic-flag bits.
fn eflags_of(flags: u32) -> u32 {
    [
        (OF, 0x800),
        (SF, 0x80),
        (ZF, 0x40),
        (AF, 0x10),
        (CF, 0x01),
        (PF, 0x04),
    ]
    .iter()
    .filter(|&&(f, _)| flags & f != 0)
    .fold(0, |m, &(_, e)| m | e)
}

/// Exit kinds returned by translated code (low byte of RAX).
pub const KIND_CHAIN: u64 = 1;
pub const KIND_LOOKUP: u64 = 2;
pub const KIND_BUDGET: u64 = 3;
pub const KIND_HELPER: u64 = 4;

/// Addresses of shared routines the translation jumps or calls to.
#[derive(Clone, Copy)]
pub struct Routines {
    pub common_exit: u64,
    /// Indirect-branch lookup (target RIP in T0), for this privilege.
    pub lookup: u64,
    /// `extern "C" fn(*mut Cpu, *const Insn) -> u32`.
    pub exec_insn: u64,
    /// The host has LAHF/SAHF in 64-bit mode: flags are restored with
    /// SAHF (cheap) rather than POPFQ (microcoded, ~20 cycles).
    pub sahf: bool,
}

/// A direct exit of the translation (chainable).
pub struct DirectExit {
    pub target: u64,
    /// Execute address of the rel32 of its `jmp`.
    pub patch: u64,
    /// Execute address of the stub the `jmp` goes to while unlinked.
    pub stub: u64,
    pub id: u32,
}

/// What translating a block produced.
pub struct Output {
    pub code: Vec<u8>,
    pub exits: Vec<DirectExit>,
    /// Guest instructions run natively / by template / through helpers.
    pub native: u32,
    pub helpers: u32,
}

#[derive(Clone, Copy, Default)]
struct RegCache {
    /// Guest register → host register caching it.
    host: [Option<Reg>; 16],
    dirty: u16,
    /// Host register → guest register it caches.
    owner: [Option<u8>; 16],
    age: [u32; 16],
    clock: u32,
}

#[derive(Clone, Copy)]
struct FlagState {
    /// Host EFLAGS hold the guest's arithmetic flags (exactly those in
    /// `exact`); otherwise the `Cpu`'s eager flags are the truth.
    host: bool,
    /// Memory is stale (host flags were produced since the last store).
    dirty: bool,
    exact: u32,
}

#[derive(Clone, Copy)]
struct State {
    regs: RegCache,
    flags: FlagState,
}

/// How a slow path continues after the interpreter ran its instruction.
#[derive(Clone, Copy)]
enum Resume {
    /// Reload the cached registers (and flags) of `post` and continue here.
    At(Label),
    /// The instruction transferred control: leave through the lookup.
    Indirect,
}

struct Slow {
    label: Label,
    k: usize,
    pre: State,
    post: State,
    /// A `pushfq` window was open when the lookup missed.
    window: bool,
    resume: Resume,
}

/// Per-instruction facts computed before emission.
#[derive(Clone, Copy, Default)]
struct Facts {
    /// Flags needed (by a reader, a possible fault or the exit) after it.
    live_after: u32,
}

pub struct Translator<'a> {
    a: Asm,
    insns: &'a [Insn],
    /// Address of `insns[0]` in the translation's own copy.
    insn_base: u64,
    start: u64,
    user: bool,
    rt: Routines,
    st: State,
    slow: Vec<Slow>,
    exits: Vec<(u64, usize, Label, u32)>,
    next_exit_id: u32,
    facts: Vec<Facts>,
    info: InstructionInfoFactory,
    native: u32,
    helpers: u32,
    helper_exit: Label,
    budget_exit: Label,
}

/// Flags an instruction reads and modifies (iced bits), with the special
/// cases of shifts/rotates: a count of zero changes nothing, and a count
/// in CL may be zero.
fn flag_effect(i: &Instruction) -> (u32, u32, bool) {
    let read = i.rflags_read() & ALL6;
    let modified = i.rflags_modified() & ALL6;
    if matches!(
        i.mnemonic(),
        Mnemonic::Shl
            | Mnemonic::Sal
            | Mnemonic::Shr
            | Mnemonic::Sar
            | Mnemonic::Rol
            | Mnemonic::Ror
            | Mnemonic::Shld
            | Mnemonic::Shrd
    ) {
        let last = i.op_count() - 1;
        match i.op_kind(last) {
            OpKind::Register => return (ALL6, modified, true),
            OpKind::Immediate8 => {
                let mask = if i.op0_register().size() == 8 || i.memory_size().size() == 8 {
                    0x3f
                } else {
                    0x1f
                };
                if i.immediate8() & mask == 0 {
                    return (0, 0, false);
                }
            }
            _ => {}
        }
    }
    (read, modified, false)
}

/// Is `i` one the generic re-encoding path can run natively?
fn generic_native(i: &Instruction) -> bool {
    use Mnemonic::*;
    let ok = matches!(
        i.mnemonic(),
        Mov | Movzx
            | Movsx
            | Movsxd
            | Lea
            | Add
            | Or
            | Adc
            | Sbb
            | And
            | Sub
            | Xor
            | Cmp
            | Test
            | Inc
            | Dec
            | Neg
            | Not
            | Shl
            | Sal
            | Shr
            | Sar
            | Rol
            | Ror
            | Shld
            | Shrd
            | Imul
            | Mul
            | Xchg
            | Bswap
            | Cbw
            | Cwde
            | Cdqe
            | Cwd
            | Cdq
            | Cqo
            | Xadd
            | Cmpxchg
            | Cmovo
            | Cmovno
            | Cmovb
            | Cmovae
            | Cmove
            | Cmovne
            | Cmovbe
            | Cmova
            | Cmovs
            | Cmovns
            | Cmovp
            | Cmovnp
            | Cmovl
            | Cmovge
            | Cmovle
            | Cmovg
            | Seto
            | Setno
            | Setb
            | Setae
            | Sete
            | Setne
            | Setbe
            | Seta
            | Sets
            | Setns
            | Setp
            | Setnp
            | Setl
            | Setge
            | Setle
            | Setg
            | Bt
            | Bts
            | Btr
            | Btc
    );
    if !ok {
        return false;
    }
    // Only GPR, memory and immediate operands.
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                if !r.is_gpr() {
                    return false;
                }
            }
            OpKind::Memory => {
                if i.memory_base() == Register::RIP || i.memory_base() == Register::EIP {
                    continue;
                }
                for r in [i.memory_base(), i.memory_index()] {
                    if r != Register::None && !r.is_gpr() {
                        return false;
                    }
                }
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => {}
            _ => return false,
        }
    }
    // BT* with a memory operand and a register bit offset address outside
    // the operand: leave those to the interpreter.
    if matches!(i.mnemonic(), Bt | Bts | Btr | Btc)
        && i.op0_kind() == OpKind::Memory
        && i.op1_kind() == OpKind::Register
    {
        return false;
    }
    // 16-bit SHLD/SHRD by more than 16 leave an undefined result that
    // differs between CPU models: the interpreter's answer keeps both
    // tiers (and replays across them) identical.
    if matches!(i.mnemonic(), Shld | Shrd) && i.op1_register().size() == 2 {
        let small = i.op_kind(2) == OpKind::Immediate8 && u32::from(i.immediate8() & 31) <= 16;
        if !small {
            return false;
        }
    }
    // MOVSXD with a 16/32-bit destination behaves per vendor (quirks).
    if i.mnemonic() == Movsxd && i.code() != Code::Movsxd_r64_rm32 {
        return false;
    }
    // Absolute-address forms (moffs) have no ModRM to re-encode.
    if matches!(
        i.code(),
        Code::Mov_AL_moffs8
            | Code::Mov_AX_moffs16
            | Code::Mov_EAX_moffs32
            | Code::Mov_RAX_moffs64
            | Code::Mov_moffs8_AL
            | Code::Mov_moffs16_AX
            | Code::Mov_moffs32_EAX
            | Code::Mov_moffs64_RAX
    ) {
        return false;
    }
    true
}

/// Does the guest instruction access memory (not LEA / NOP hints)?
fn accesses_memory(i: &Instruction) -> bool {
    (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory)
        && !matches!(i.mnemonic(), Mnemonic::Lea | Mnemonic::Nop)
}

/// The guest GPR index of a general-purpose register (any size), and
/// whether it is a high-byte register.
fn gpr_index(r: Register) -> Option<(u8, bool)> {
    if !r.is_gpr() {
        return None;
    }
    let high = matches!(r, Register::AH | Register::CH | Register::DH | Register::BH);
    let full = r.full_register();
    Some(((full as usize - Register::RAX as usize) as u8, high))
}

/// The host register standing for guest register `r` once guest index
/// `g` is cached in host register `h` (same size; high bytes stay).
fn host_form(r: Register, h: Reg) -> Register {
    match r {
        Register::AH | Register::CH | Register::DH | Register::BH => r,
        _ => reg(h, r.size() as u32),
    }
}

impl<'a> Translator<'a> {
    pub fn new(
        base: u64,
        insns: &'a [Insn],
        insn_base: u64,
        user: bool,
        rt: Routines,
        first_exit_id: u32,
    ) -> Self {
        let mut a = Asm::new(base);
        let helper_exit = a.label();
        let budget_exit = a.label();
        Translator {
            a,
            insns,
            insn_base,
            start: insns[0].i.ip(),
            user,
            rt,
            st: State {
                regs: RegCache::default(),
                flags: FlagState {
                    host: false,
                    dirty: false,
                    exact: 0,
                },
            },
            slow: Vec::new(),
            exits: Vec::new(),
            next_exit_id: first_exit_id,
            facts: vec![Facts::default(); insns.len()],
            info: InstructionInfoFactory::new(),
            native: 0,
            helpers: 0,
            helper_exit,
            budget_exit,
        }
    }

    fn n(&self) -> usize {
        self.insns.len()
    }

    // ---- analysis ----------------------------------------------------------

    /// Will instruction `k` possibly run through the interpreter (a helper
    /// or a slow path)? Such points need exact flags in memory.
    fn may_fault(&self, k: usize) -> bool {
        let i = &self.insns[k].i;
        if accesses_memory(i) {
            return true;
        }
        !(self.is_template(i) || generic_native(i))
            || [i.op0_register(), i.op1_register()]
                .iter()
                .any(|r| matches!(r, Register::AH | Register::CH | Register::DH | Register::BH))
    }

    fn is_template(&self, i: &Instruction) -> bool {
        matches!(
            i.code(),
            Code::Push_r64
                | Code::Pop_r64
                | Code::Pushq_imm32
                | Code::Pushq_imm8
                | Code::Call_rel32_64
                | Code::Call_rm64
                | Code::Retnq
                | Code::Retnq_imm16
                | Code::Jmp_rel32_64
                | Code::Jmp_rel8_64
                | Code::Jmp_rm64
                | Code::Nopd
                | Code::Nopq
                | Code::Nopw
                | Code::Nop_rm16
                | Code::Nop_rm32
                | Code::Nop_rm64
                | Code::Pause
                | Code::Endbr64
        ) || (i.flow_control() == FlowControl::ConditionalBranch && i.is_jcc_short_or_near())
    }

    fn analyse(&mut self) {
        let mut live = ALL6;
        for k in (0..self.n()).rev() {
            self.facts[k].live_after = live;
            let (read, modified, conditional) = flag_effect(&self.insns[k].i);
            let written = if conditional { 0 } else { modified };
            live = read | (live & !written);
            if self.may_fault(k) {
                live = ALL6;
            }
        }
    }

    // ---- registers ---------------------------------------------------------

    fn gpr_mem(g: u8) -> iced_x86::MemoryOperand {
        mem(CPU, L::gpr(g))
    }

    /// The host register caching guest register `g`, loading it from the
    /// `Cpu` when `load`. `locked`: guest registers the current
    /// instruction needs (never evicted).
    fn get(&mut self, g: u8, load: bool, locked: u16) -> Reg {
        let rc = &mut self.st.regs;
        rc.clock += 1;
        if let Some(h) = rc.host[g as usize] {
            rc.age[h as usize] = rc.clock;
            return h;
        }
        let h = if g < 4 {
            g
        } else if let Some(&h) = POOL.iter().find(|&&h| rc.owner[h as usize].is_none()) {
            h
        } else {
            // Evict the least recently used pool register not in use now.
            let h = *POOL
                .iter()
                .filter(|&&h| rc.owner[h as usize].is_some_and(|o| locked & (1 << o) == 0))
                .min_by_key(|&&h| rc.age[h as usize])
                .expect("more guest registers in one instruction than pool registers");
            let old = rc.owner[h as usize].unwrap_or(0);
            self.evict(old);
            h
        };
        let rc = &mut self.st.regs;
        rc.host[g as usize] = Some(h);
        rc.owner[h as usize] = Some(g);
        rc.age[h as usize] = rc.clock;
        if load {
            self.a.mov_rm(h, Self::gpr_mem(g));
        }
        h
    }

    fn evict(&mut self, g: u8) {
        let rc = &mut self.st.regs;
        if let Some(h) = rc.host[g as usize] {
            if rc.dirty & (1 << g) != 0 {
                self.a.mov_mr(Self::gpr_mem(g), h);
            }
            let rc = &mut self.st.regs;
            rc.dirty &= !(1 << g);
            rc.host[g as usize] = None;
            rc.owner[h as usize] = None;
        }
    }

    fn mark_dirty(&mut self, g: u8) {
        self.st.regs.dirty |= 1 << g;
    }

    /// Store every dirty cached register (the cache stays valid).
    fn spill_with(a: &mut Asm, rc: &RegCache) {
        for g in 0..16u8 {
            if rc.dirty & (1 << g) != 0 {
                if let Some(h) = rc.host[g as usize] {
                    a.mov_mr(Self::gpr_mem(g), h);
                }
            }
        }
    }

    /// Reload every register cached in `rc` from the `Cpu`.
    fn reload_with(a: &mut Asm, rc: &RegCache) {
        for g in 0..16u8 {
            if let Some(h) = rc.host[g as usize] {
                a.mov_rm(h, Self::gpr_mem(g));
            }
        }
    }

    fn spill_all(&mut self) {
        Self::spill_with(&mut self.a, &self.st.regs);
        self.st.regs.dirty = 0;
    }

    fn forget_all(&mut self) {
        self.st.regs = RegCache {
            clock: self.st.regs.clock,
            ..RegCache::default()
        };
    }

    // ---- flags -------------------------------------------------------------

    /// Store the host's arithmetic flags among `exact` (iced bits) into
    /// the `Cpu` (clobbers host flags).
    fn emit_store_flags(a: &mut Asm, exact: u32) {
        a.pushfq();
        a.pop_r(T0);
        Self::emit_merge_flags(a, T0, exact);
    }

    /// Merge the flags among `exact` (iced bits) of the EFLAGS image in
    /// `r` into the `Cpu`'s flags. The others keep the `Cpu`'s value: a
    /// flag the host does not hold exactly was neither loaded nor written
    /// by translated code since the flags last left the `Cpu`, so the
    /// `Cpu`'s copy is the guest's (or, when a window closed with it dead,
    /// as good as the host's).
    fn emit_merge_flags(a: &mut Asm, r: Reg, exact: u32) {
        let mask = eflags_of(exact);
        a.and_r32i(r, mask);
        a.mov_rm(T2, mem(CPU, L::flags_bits()));
        a.and_ri(T2, !(mask as i32));
        a.or_rr(T2, r);
        a.mov_mr(mem(CPU, L::flags_bits()), T2);
    }

    /// Load the `Cpu`'s arithmetic flags into host EFLAGS (uses T1 and
    /// T2 only: T0 may hold the host address of the current memory
    /// operand).
    fn emit_load_flags(a: &mut Asm, sahf: bool) {
        a.mov_rm(T1, mem(CPU, L::flags_bits()));
        Self::emit_flags_from(a, T1, sahf);
    }

    /// Set the host's six arithmetic flags from the EFLAGS image in `src`
    /// (T1; T2 is clobbered, everything else kept). With SAHF: OF comes
    /// from `adc al, 0x7f` with AL = 0 and CF = the image's OF (0x7f + 1
    /// overflows, 0x7f + 0 does not), then SAHF loads SF, ZF, AF, PF and
    /// CF from AH = the image's low byte; RAX (guest RAX) is parked in T2.
    /// Without it, POPFQ of the image (IF set, as in guest mode).
    fn emit_flags_from(a: &mut Asm, src: Reg, sahf: bool) {
        debug_assert!(src != asm::RAX && src != T2);
        if sahf {
            a.mov_rr(T2, asm::RAX);
            a.mov_r32r32(asm::RAX, src);
            a.shl_r32i(asm::RAX, 8);
            a.bt_r32i(src, 11);
            a.adc_al_i(0x7f);
            a.sahf();
            a.mov_rr(asm::RAX, T2);
        } else {
            a.and_r32i(src, ARITH_EFLAGS);
            a.or_r32i(src, 0x202);
            a.push_r(src);
            a.popfq();
        }
    }

    /// Make the `Cpu`'s flags current (before a helper or an exit).
    fn flush_flags(&mut self) {
        // Only the exact flags go to memory: when an instruction the
        // analysis took for native falls back to a helper (a form the
        // generic path cannot re-encode), flags the analysis found dead
        // after it may not be in the host; the `Cpu` holds those.
        if self.st.flags.host && self.st.flags.dirty && self.st.flags.exact != 0 {
            Self::emit_store_flags(&mut self.a, self.st.flags.exact);
        }
        self.st.flags = FlagState {
            host: false,
            dirty: false,
            exact: 0,
        };
    }

    /// Before instruction `k` runs natively: put the flags it needs into
    /// host EFLAGS.
    fn prepare_flags(&mut self, k: usize) {
        let (read, modified, conditional) = flag_effect(&self.insns[k].i);
        if self.st.flags.host {
            // Every flag live here is exact in the host (see `analyse`).
            return;
        }
        // What the instruction reads, and what it leaves alone that is
        // still needed after it (a partial writer such as ROL or INC only
        // needs the others loaded when they are live).
        let written = if conditional { 0 } else { modified };
        let need = if modified == 0 && !conditional {
            // Flags stay in the Cpu: load only what it reads.
            read
        } else {
            read | (self.facts[k].live_after & !written)
        };
        if need == 0 {
            return;
        }
        if need & !CF == 0 {
            // CF alone: one BT from the Cpu's bits (bit 0 is CF).
            self.a.bt_mi(mem(CPU, L::flags_bits()), 0);
            if modified != 0 || conditional {
                // The host's CF stays exact through the instruction, which
                // writes the rest of what is live after it.
                self.st.flags = FlagState {
                    host: true,
                    dirty: false,
                    exact: CF,
                };
            }
            // Otherwise the Cpu still holds the flags (later readers load
            // what they need from it).
        } else {
            Self::emit_load_flags(&mut self.a, self.rt.sahf);
            self.st.flags = FlagState {
                host: true,
                dirty: false,
                exact: ALL6,
            };
        }
    }

    /// After instruction `k` ran natively.
    fn after_flags(&mut self, k: usize) {
        let (_, modified, conditional) = flag_effect(&self.insns[k].i);
        if modified != 0 || conditional {
            // Host flags not loaded (`prepare_flags` found the others
            // dead): only what the instruction wrote is exact.
            let exact = if self.st.flags.host {
                self.st.flags.exact | modified
            } else {
                modified
            };
            self.st.flags = FlagState {
                host: true,
                dirty: true,
                exact,
            };
        }
    }

    // ---- memory ------------------------------------------------------------

    /// Emit the inline TLB lookup for an access of `size` bytes at the
    /// linear address in T0; on a hit T0 becomes the host address. Opens a
    /// flags window if host flags are live. Returns the slow-path label
    /// and whether a window is open.
    fn tlb_lookup(&mut self, k: usize, size: u32, write: bool) -> (Label, bool) {
        let slow = self.a.label();
        if self.st.flags.host && !self.st.flags.dirty && self.live_across(k) == 0 {
            // The Cpu holds the flags (the slow path's) and the fast path
            // needs none of them: let the probe clobber them.
            self.st.flags = FlagState {
                host: false,
                dirty: false,
                exact: 0,
            };
        }
        let window = self.st.flags.host;
        if window {
            self.a.pushfq();
        }
        self.a.mov_rr(T1, T0);
        self.a.shr_ri(T1, 6);
        self.a
            .and_r32i(T1, ((crate::mmu::TLB_SIZE - 1) << 6) as u32);
        if size > 1 {
            self.a.lea(T2, mem(T0, i64::from(size - 1)));
            self.a.and_ri(T2, -4096);
        } else {
            self.a.mov_rr(T2, T0);
            self.a.and_ri(T2, -4096);
        }
        let tag = if write {
            L::tlb_write(self.user)
        } else {
            L::tlb_read(self.user)
        };
        self.a.cmp_rm(T2, mem_idx(CPU, T1, 1, tag));
        self.a.jcc(cc::NE, slow);
        self.a
            .add_rm(T0, mem_idx(CPU, T1, 1, L::tlb_addend(self.user)));
        (slow, window)
    }

    /// Flags instruction `k` or later code needs from before `k`'s memory
    /// access, on its fast path.
    fn live_across(&self, k: usize) -> u32 {
        let (read, modified, conditional) = flag_effect(&self.insns[k].i);
        let written = if conditional { 0 } else { modified };
        read | (self.facts[k].live_after & !written)
    }

    /// Close a flags window on the fast path before instruction `k` runs:
    /// keep what `k` and later code need.
    fn close_window(&mut self, k: usize) {
        let live = self.live_across(k);
        if live == 0 {
            self.a.lea(asm::RSP, mem(asm::RSP, 8));
            self.st.flags.exact = 0;
        } else if live & !CF == 0 {
            self.a.bt_mi(mem(asm::RSP, 0), 0);
            self.a.lea(asm::RSP, mem(asm::RSP, 8));
            self.st.flags.exact &= CF;
        } else if self.rt.sahf {
            self.a.pop_r(T1);
            Self::emit_flags_from(&mut self.a, T1, true);
        } else {
            self.a.popfq();
        }
    }

    /// Compute the linear address of instruction `k`'s memory operand into
    /// T0 (registers already cached per `locked`).
    fn effective_address(&mut self, i: &Instruction, locked: u16) {
        let base = i.memory_base();
        if base == Register::RIP || base == Register::EIP {
            let mut ea = i.memory_displacement64();
            if base == Register::EIP {
                ea &= 0xffff_ffff;
            }
            self.a.mov_ri(T0, ea);
        } else {
            let index = i.memory_index();
            let addr32 = [base, index]
                .iter()
                .any(|r| *r != Register::None && r.size() == 4);
            let disp = i.memory_displacement64() as i64;
            let hb = gpr_index(base).map(|(g, _)| self.get(g, true, locked));
            let hi = gpr_index(index).map(|(g, _)| self.get(g, true, locked));
            let scale = i.memory_index_scale();
            let disp32 = if addr32 { disp as i32 as i64 } else { disp };
            let fits = disp32 >= i32::MIN as i64 && disp32 <= i32::MAX as i64;
            let m = match (hb, hi) {
                (Some(b), Some(x)) if fits => mem_idx(b, x, scale, disp32),
                (Some(b), None) if fits => mem(b, disp32),
                (None, Some(x)) if fits => {
                    iced_x86::MemoryOperand::with_base_index_scale_displ_size(
                        Register::None,
                        asm::r64(x),
                        scale,
                        disp32,
                        4,
                    )
                }
                _ => {
                    // Absolute or far displacement: materialise it.
                    self.a.mov_ri(T0, disp as u64);
                    if let Some(b) = hb {
                        self.a.lea(T0, mem_idx(T0, b, 1, 0));
                    }
                    if let Some(x) = hi {
                        self.a.lea(T0, mem_idx(T0, x, scale, 0));
                    }
                    if addr32 {
                        self.a.lea32(T0, mem(T0, 0));
                    }
                    self.add_segment_base(i);
                    return;
                }
            };
            if addr32 {
                self.a.lea32(T0, m);
            } else {
                self.a.lea(T0, m);
            }
        }
        self.add_segment_base(i);
    }

    fn add_segment_base(&mut self, i: &Instruction) {
        let seg = match i.segment_prefix() {
            Register::FS => 4,
            Register::GS => 5,
            _ => return,
        };
        self.a.mov_rm(T1, mem(CPU, L::seg_base(seg)));
        self.a.lea(T0, mem_idx(T0, T1, 1, 0));
    }

    // ---- helpers and exits -------------------------------------------------

    fn emit_set_rip(&mut self, rip: u64) {
        self.a.mov_ri(T0, rip);
        self.a.mov_mr(mem(CPU, L::rip()), T0);
    }

    /// `retired` as it is before instruction `k`.
    fn emit_set_retired(a: &mut Asm, n: usize, k: usize) {
        a.mov_rm(T0, mem(CPU, L::stop_at()));
        a.sub_rr(T0, BUDGET);
        a.sub_ri(T0, (n - k) as i32);
        a.mov_mr(mem(CPU, L::retired()), T0);
    }

    /// Call the interpreter for instruction `k` (state already written
    /// back). Leaves through the helper exit if it asks to.
    fn emit_exec_call(a: &mut Asm, rt: &Routines, insn: u64, helper_exit: Label) {
        a.mov_rr(asm::RDI, CPU);
        a.mov_ri(asm::RSI, insn);
        a.mov_ri(asm::RAX, rt.exec_insn);
        a.call_r(asm::RAX);
        a.test_r32(asm::RAX, asm::RAX);
        a.jcc(cc::NE, helper_exit);
    }

    fn insn_addr(&self, k: usize) -> u64 {
        self.insn_base + (k * std::mem::size_of::<Insn>()) as u64
    }

    /// Run instruction `k` through the interpreter.
    fn helper(&mut self, k: usize) {
        self.spill_all();
        self.flush_flags();
        self.forget_all();
        let rip = self.insns[k].i.ip();
        self.emit_set_rip(rip);
        let n = self.n();
        Self::emit_set_retired(&mut self.a, n, k);
        let insn = self.insn_addr(k);
        let rt = self.rt;
        let he = self.helper_exit;
        Self::emit_exec_call(&mut self.a, &rt, insn, he);
        self.helpers += 1;
    }

    /// Leave towards `target`: chained when it lies on this block's page.
    fn exit_direct(&mut self, target: u64) {
        self.spill_all();
        self.flush_flags();
        if target & !0xfff == self.start & !0xfff {
            let stub = self.a.label();
            self.a.jmp(stub);
            let pos = self.a.len() - 4;
            let id = self.next_exit_id;
            self.next_exit_id += 1;
            self.exits.push((target, pos, stub, id));
        } else {
            self.a.mov_ri(T0, target);
            self.a.jmp_abs(self.rt.lookup);
        }
    }

    /// Leave towards the RIP stored in the `Cpu` through the lookup.
    fn exit_indirect(&mut self) {
        self.spill_all();
        self.flush_flags();
        self.a.mov_rm(T0, mem(CPU, L::rip()));
        self.a.jmp_abs(self.rt.lookup);
    }

    // ---- instructions ------------------------------------------------------

    /// Gather the guest registers an instruction uses: (index, read, write).
    fn used_gprs(&mut self, i: &Instruction) -> Option<Vec<(u8, bool, bool)>> {
        let info = self.info.info(i);
        let mut v: Vec<(u8, bool, bool)> = Vec::new();
        for u in info.used_registers() {
            let Some((g, _)) = gpr_index(u.register()) else {
                continue;
            };
            let size = u.register().size();
            let (r, w) = match u.access() {
                OpAccess::Read | OpAccess::CondRead => (true, false),
                OpAccess::Write => (size < 4, true),
                OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite => (true, true),
                _ => (true, true),
            };
            // High-byte registers and partial writes merge with the rest.
            let r = r
                || matches!(
                    u.register(),
                    Register::AH | Register::CH | Register::DH | Register::BH
                );
            match v.iter_mut().find(|e| e.0 == g) {
                Some(e) => {
                    e.1 |= r;
                    e.2 |= w;
                }
                None => v.push((g, r, w)),
            }
        }
        // Implicit registers must be the pinned ones (host RAX..RBX).
        let explicit = |g: u8| -> bool {
            (0..i.op_count()).any(|n| {
                i.op_kind(n) == OpKind::Register
                    && gpr_index(i.op_register(n)).is_some_and(|(x, _)| x == g)
            }) || [i.memory_base(), i.memory_index()]
                .iter()
                .any(|r| gpr_index(*r).is_some_and(|(x, _)| x == g))
        };
        if v.iter().any(|&(g, _, _)| g >= 4 && !explicit(g)) {
            return None;
        }
        Some(v)
    }

    /// The generic path: re-encode `i` with host registers (and `[T0]`).
    fn generic(&mut self, k: usize) -> bool {
        let i = self.insns[k].i;
        let Some(used) = self.used_gprs(&i) else {
            return false;
        };
        let locked: u16 = used.iter().fold(0, |m, &(g, _, _)| m | (1 << g));
        let memop = accesses_memory(&i);
        // Cache every register (loads for the ones read).
        for &(g, r, _) in &used {
            self.get(g, r, locked);
        }
        // Build the host instruction.
        let mut h = i;
        for n in 0..i.op_count() {
            if i.op_kind(n) == OpKind::Register {
                let r = i.op_register(n);
                let (g, _) = gpr_index(r).expect("checked GPR");
                let hr = self.st.regs.host[g as usize].expect("cached");
                h.set_op_register(n, host_form(r, hr));
            }
        }
        let has_mem = (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory);
        if has_mem && !memop {
            // LEA (and NOP hints): map the address registers, same sizes.
            let base = i.memory_base();
            if base == Register::RIP || base == Register::EIP {
                // LEA r, [rip+disp]: a constant.
                if i.mnemonic() != Mnemonic::Lea {
                    return false;
                }
                let mut ea = i.memory_displacement64();
                let size = i.op0_register().size();
                ea &= crate::insn::mask(size);
                let (g, _) = gpr_index(i.op0_register()).expect("GPR");
                let hr = self.st.regs.host[g as usize].expect("cached");
                if size == 2 {
                    // MOV r16, imm16 keeps bits 63:16, as LEA r16 does.
                    let Ok(m) = Instruction::with2(Code::Mov_r16_imm16, reg(hr, 2), ea as u32)
                    else {
                        return false;
                    };
                    if self.a.emit(&m).is_err() {
                        return false;
                    }
                } else {
                    self.a.mov_ri(hr, ea);
                }
                for &(g, _, w) in &used {
                    if w {
                        self.mark_dirty(g);
                    }
                }
                return true;
            }
            for (r, set) in [(base, true), (i.memory_index(), false)] {
                if let Some((g, _)) = gpr_index(r) {
                    let hr = self.st.regs.host[g as usize].expect("cached");
                    let hr = reg(hr, r.size() as u32);
                    if set {
                        h.set_memory_base(hr);
                    } else {
                        h.set_memory_index(hr);
                    }
                }
            }
            h.set_segment_prefix(Register::None);
            self.prepare_flags(k);
            if self.a.emit(&h).is_err() {
                return false;
            }
            self.after_flags(k);
            for &(g, _, w) in &used {
                if w {
                    self.mark_dirty(g);
                }
            }
            return true;
        }
        if memop {
            h.set_memory_base(asm::r64(T0));
            h.set_memory_index(Register::None);
            h.set_memory_index_scale(1);
            h.set_memory_displacement64(0);
            h.set_memory_displ_size(0);
            h.set_segment_prefix(Register::None);
        }
        if !memop {
            self.prepare_flags(k);
            if self.a.emit(&h).is_err() {
                return false;
            }
            self.after_flags(k);
            for &(g, _, w) in &used {
                if w {
                    self.mark_dirty(g);
                }
            }
            return true;
        }
        // Memory operand: address, TLB lookup, the instruction on [T0].
        let size = i.memory_size().size() as u32;
        if size == 0 || size > 8 {
            return false;
        }
        let write = {
            let info = self.info.info(&i);
            info.used_memory().iter().any(|m| {
                matches!(
                    m.access(),
                    OpAccess::Write
                        | OpAccess::ReadWrite
                        | OpAccess::CondWrite
                        | OpAccess::ReadCondWrite
                )
            })
        };
        self.effective_address(&i, locked);
        let pre = self.st;
        let (slow, window) = self.tlb_lookup(k, size, write);
        if window {
            self.close_window(k);
        }
        self.prepare_flags(k);
        if self.a.emit(&h).is_err() {
            return false;
        }
        self.after_flags(k);
        for &(g, _, w) in &used {
            if w {
                self.mark_dirty(g);
            }
        }
        let resume = self.a.label();
        self.a.bind(resume);
        self.slow.push(Slow {
            label: slow,
            k,
            pre,
            post: self.st,
            window,
            resume: Resume::At(resume),
        });
        true
    }

    /// PUSH/POP/CALL/RET/JMP/NOP templates. Returns false to fall back.
    fn template(&mut self, k: usize) -> bool {
        let i = self.insns[k].i;
        const RSP_G: u8 = 4;
        match i.code() {
            Code::Nopd
            | Code::Nopq
            | Code::Nopw
            | Code::Nop_rm16
            | Code::Nop_rm32
            | Code::Nop_rm64
            | Code::Pause
            | Code::Endbr64 => true,
            Code::Push_r64 | Code::Pushq_imm32 | Code::Pushq_imm8 => {
                let src = if i.code() == Code::Push_r64 {
                    match gpr_index(i.op0_register()) {
                        Some((g, _)) => Some(g),
                        None => return false,
                    }
                } else {
                    None
                };
                let locked = (1 << RSP_G) | src.map_or(0, |g| 1 << g);
                let hs = self.get(RSP_G, true, locked);
                let hv = src.map(|g| self.get(g, true, locked));
                self.a.lea(T0, mem(hs, -8));
                let pre = self.st;
                let (slow, window) = self.tlb_lookup(k, 8, true);
                if window {
                    self.close_window(k);
                }
                match hv {
                    Some(h) => self.a.mov_mr(mem(T0, 0), h),
                    None => self.a.mov_mi(mem(T0, 0), i.immediate(0) as i64 as i32),
                }
                self.a.lea(hs, mem(hs, -8));
                self.mark_dirty(RSP_G);
                self.push_slow(slow, k, pre, window);
                true
            }
            Code::Pop_r64 => {
                let Some((g, _)) = gpr_index(i.op0_register()) else {
                    return false;
                };
                if g == RSP_G {
                    return false;
                }
                let locked = (1 << RSP_G) | (1 << g);
                let hs = self.get(RSP_G, true, locked);
                let hd = self.get(g, false, locked);
                self.a.mov_rr(T0, hs);
                let pre = self.st;
                let (slow, window) = self.tlb_lookup(k, 8, false);
                if window {
                    self.close_window(k);
                }
                self.a.mov_rm(hd, mem(T0, 0));
                self.a.lea(hs, mem(hs, 8));
                self.mark_dirty(RSP_G);
                self.mark_dirty(g);
                self.push_slow(slow, k, pre, window);
                true
            }
            Code::Call_rel32_64 | Code::Call_rm64 => {
                // Target first (a register, possibly RSP itself).
                let target_reg = if i.code() == Code::Call_rm64 {
                    if i.op0_kind() != OpKind::Register {
                        return false;
                    }
                    match gpr_index(i.op0_register()) {
                        Some((g, _)) => Some(g),
                        None => return false,
                    }
                } else {
                    None
                };
                let locked = (1 << RSP_G) | target_reg.map_or(0, |g| 1 << g);
                let hs = self.get(RSP_G, true, locked);
                let ht = target_reg.map(|g| self.get(g, true, locked));
                self.a.lea(T0, mem(hs, -8));
                let pre = self.st;
                let (slow, window) = self.tlb_lookup(k, 8, true);
                if window {
                    self.close_window(k);
                }
                self.a.mov_ri(T1, i.next_ip());
                self.a.mov_mr(mem(T0, 0), T1);
                if let Some(h) = ht {
                    self.a.mov_mr(mem(CPU, L::rip()), h);
                }
                self.a.lea(hs, mem(hs, -8));
                self.mark_dirty(RSP_G);
                self.slow.push(Slow {
                    label: slow,
                    k,
                    pre,
                    post: self.st,
                    window,
                    resume: Resume::Indirect,
                });
                match ht {
                    None => self.exit_direct(i.near_branch_target()),
                    Some(_) => {
                        self.spill_all();
                        self.flush_flags();
                        self.a.mov_rm(T0, mem(CPU, L::rip()));
                        self.a.jmp_abs(self.rt.lookup);
                    }
                }
                true
            }
            Code::Retnq | Code::Retnq_imm16 => {
                let locked = 1 << RSP_G;
                let hs = self.get(RSP_G, true, locked);
                self.a.mov_rr(T0, hs);
                let pre = self.st;
                let (slow, window) = self.tlb_lookup(k, 8, false);
                if window {
                    self.close_window(k);
                }
                self.a.mov_rm(T1, mem(T0, 0));
                self.a.mov_mr(mem(CPU, L::rip()), T1);
                let pop = 8 + if i.code() == Code::Retnq_imm16 {
                    i64::from(i.immediate16())
                } else {
                    0
                };
                self.a.lea(hs, mem(hs, pop));
                self.mark_dirty(RSP_G);
                self.slow.push(Slow {
                    label: slow,
                    k,
                    pre,
                    post: self.st,
                    window,
                    resume: Resume::Indirect,
                });
                self.exit_indirect();
                true
            }
            Code::Jmp_rel32_64 | Code::Jmp_rel8_64 => {
                self.exit_direct(i.near_branch_target());
                true
            }
            Code::Jmp_rm64 => {
                if i.op0_kind() == OpKind::Register {
                    let Some((g, _)) = gpr_index(i.op0_register()) else {
                        return false;
                    };
                    let h = self.get(g, true, 1 << g);
                    self.a.mov_mr(mem(CPU, L::rip()), h);
                    self.exit_indirect();
                    return true;
                }
                let Some(used) = self.used_gprs(&i) else {
                    return false;
                };
                let locked: u16 = used.iter().fold(0, |m, &(g, _, _)| m | (1 << g));
                self.effective_address(&i, locked);
                let pre = self.st;
                let (slow, window) = self.tlb_lookup(k, 8, false);
                if window {
                    self.close_window(k);
                }
                self.a.mov_rm(T1, mem(T0, 0));
                self.a.mov_mr(mem(CPU, L::rip()), T1);
                self.slow.push(Slow {
                    label: slow,
                    k,
                    pre,
                    post: self.st,
                    window,
                    resume: Resume::Indirect,
                });
                self.exit_indirect();
                true
            }
            _ if i.flow_control() == FlowControl::ConditionalBranch && i.is_jcc_short_or_near() => {
                let cond = i.condition_code();
                self.prepare_flags(k);
                let taken = self.a.label();
                self.a.jcc(jcc_code(cond), taken);
                let saved = self.st;
                self.exit_direct(i.next_ip());
                self.st = saved;
                self.a.bind(taken);
                self.exit_direct(i.near_branch_target());
                true
            }
            _ => false,
        }
    }

    fn push_slow(&mut self, label: Label, k: usize, pre: State, window: bool) {
        let resume = self.a.label();
        self.a.bind(resume);
        self.slow.push(Slow {
            label,
            k,
            pre,
            post: self.st,
            window,
            resume: Resume::At(resume),
        });
    }

    /// Translate the block. None if nothing could be emitted sensibly.
    pub fn translate(mut self, counter: Option<u64>) -> Output {
        self.analyse();
        let n = self.n();
        // Entry: count the whole block against the budget.
        self.a.sub_ri(BUDGET, n as i32);
        let be = self.budget_exit;
        self.a.jcc(cc::B, be);
        if let Some(c) = counter {
            // Profiling: count entries (flags are in the Cpu here).
            self.a.mov_ri(T0, c);
            self.a.inc_m(mem(T0, 0));
        }
        let mut ended = false;
        for k in 0..n {
            let i = self.insns[k].i;
            let mark = self.a.mark();
            let saved = self.st;
            let (slow_len, exits_len, next_id) =
                (self.slow.len(), self.exits.len(), self.next_exit_id);
            let ok = if self.is_template(&i) {
                self.template(k)
            } else if generic_native(&i) {
                self.generic(k)
            } else {
                false
            };
            if ok {
                self.native += 1;
                if matches!(
                    i.flow_control(),
                    FlowControl::UnconditionalBranch
                        | FlowControl::ConditionalBranch
                        | FlowControl::Call
                        | FlowControl::IndirectBranch
                        | FlowControl::IndirectCall
                        | FlowControl::Return
                ) {
                    ended = true;
                    break;
                }
                continue;
            }
            // Roll back a partial attempt, then run it in the interpreter.
            self.a.rollback(mark);
            self.st = saved;
            self.slow.truncate(slow_len);
            self.exits.truncate(exits_len);
            self.next_exit_id = next_id;
            self.helper(k);
            if i.flow_control() != FlowControl::Next || k == n - 1 {
                // Control transfer (or the block's end) through the
                // interpreter: the Cpu's RIP says where to go.
                self.exit_indirect();
                ended = true;
                break;
            }
        }
        if !ended {
            let last = &self.insns[n - 1];
            self.exit_direct(last.next);
        }
        // Out-of-line code: exit stubs, slow paths, budget and helper exits.
        let exits = std::mem::take(&mut self.exits);
        let mut stubs = Vec::new();
        for (target, pos, stub, id) in exits {
            self.a.bind(stub);
            let stub_at = self.a.ip();
            self.a.mov_ri(T0, target);
            self.a.mov_mr(mem(CPU, L::rip()), T0);
            self.a.mov_ri(asm::RAX, (u64::from(id) << 8) | KIND_CHAIN);
            self.a.jmp_abs(self.rt.common_exit);
            stubs.push((target, pos, stub_at, id));
        }
        let slows = std::mem::take(&mut self.slow);
        for s in slows {
            self.a.bind(s.label);
            if s.window {
                self.a.pop_r(T0);
                if s.pre.flags.dirty && s.pre.flags.exact != 0 {
                    Self::emit_merge_flags(&mut self.a, T0, s.pre.flags.exact);
                }
            } else if s.pre.flags.host && s.pre.flags.dirty && s.pre.flags.exact != 0 {
                Self::emit_store_flags(&mut self.a, s.pre.flags.exact);
            }
            Self::spill_with(&mut self.a, &s.pre.regs);
            let rip = self.insns[s.k].i.ip();
            self.emit_set_rip(rip);
            Self::emit_set_retired(&mut self.a, n, s.k);
            let insn = self.insn_addr(s.k);
            let rt = self.rt;
            let he = self.helper_exit;
            Self::emit_exec_call(&mut self.a, &rt, insn, he);
            match s.resume {
                Resume::At(label) => {
                    Self::reload_with(&mut self.a, &s.post.regs);
                    if s.post.flags.host {
                        Self::emit_load_flags(&mut self.a, self.rt.sahf);
                    }
                    self.a.jmp(label);
                }
                Resume::Indirect => {
                    self.a.mov_rm(T0, mem(CPU, L::rip()));
                    self.a.jmp_abs(self.rt.lookup);
                }
            }
        }
        let be = self.budget_exit;
        self.a.bind(be);
        self.a.add_ri(BUDGET, n as i32);
        let start = self.start;
        self.emit_set_rip(start);
        self.a.mov_ri(asm::RAX, KIND_BUDGET);
        self.a.jmp_abs(self.rt.common_exit);
        let he = self.helper_exit;
        self.a.bind(he);
        self.a.mov_ri(asm::RAX, KIND_HELPER);
        self.a.jmp_abs(self.rt.common_exit);

        let base = self.a.addr_of(0);
        let code = self.a.finish();
        Output {
            exits: stubs
                .into_iter()
                .map(|(target, pos, stub, id)| DirectExit {
                    target,
                    patch: base + pos as u64,
                    stub,
                    id,
                })
                .collect(),
            code,
            native: self.native,
            helpers: self.helpers,
        }
    }
}

/// The Jcc condition nibble of an iced condition code.
fn jcc_code(c: ConditionCode) -> u8 {
    match c {
        ConditionCode::o => 0,
        ConditionCode::no => 1,
        ConditionCode::b => 2,
        ConditionCode::ae => 3,
        ConditionCode::e => 4,
        ConditionCode::ne => 5,
        ConditionCode::be => 6,
        ConditionCode::a => 7,
        ConditionCode::s => 8,
        ConditionCode::ns => 9,
        ConditionCode::p => 10,
        ConditionCode::np => 11,
        ConditionCode::l => 12,
        ConditionCode::ge => 13,
        ConditionCode::le => 14,
        ConditionCode::g => 15,
        ConditionCode::None => unreachable!("Jcc without a condition"),
    }
}
