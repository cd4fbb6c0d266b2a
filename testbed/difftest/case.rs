//! A case: an instruction sequence (items) plus the initial CPU state and
//! memory contents; its assembly; and the static analysis that makes the
//! comparison sound.
//!
//! # Items
//!
//! Each item is one iced `Instruction`. Control transfers name their target
//! by item id (always a later item: cases never loop), so that dropping
//! items while minimizing keeps a well-formed program; a target that was
//! dropped resolves to the next item that remains (or the terminator).
//!
//! # The analysis ([`Flow`])
//!
//! Walks the items in order (every edge is forward) and tracks, at every
//! point, which arithmetic flags and x87 condition codes the SDM leaves
//! undefined, and which general registers hold an undefined value (BSF/BSR
//! of a source that may be zero, a 16-bit SHLD/SHRD by more than 16). A
//! sequence is *valid* only if no instruction reads an undefined flag or an
//! undefined register; the comparison masks what is still undefined where
//! the case stopped.

use std::collections::BTreeMap;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, FlowControl, Instruction, InstructionBlock,
    InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register, RflagsBits,
};

use cpu_interp::state::CpuState;

use super::env;
use super::{DifftestError, Mode};

/// One instruction of a case.
#[derive(Clone, Debug)]
pub struct Item {
    /// Stable identity (increasing along the case).
    pub id: usize,
    pub instr: Instruction,
    /// Generated to prepare the operands of the next item (a register or
    /// memory setup); reported as such.
    pub setup: bool,
    /// Control-transfer target (an item id).
    pub target: Option<usize>,
    /// The immediate operand is the address of this item (for
    /// `push label; ret` and `mov reg, label; jmp reg`).
    pub imm_target: Option<usize>,
    /// Id of the first item of the template this item belongs to (branch
    /// targets are moved to group starts so no setup is jumped over).
    pub group: usize,
    /// The SDM makes this item fault so, where KVM's instruction emulator
    /// is known not to (a settled emulator error, docs/DIFFTEST.md): on the
    /// emulator oracle the interpreter is checked against the SDM here.
    pub sdm_fault: Option<SdmFault>,
}

/// An exception the SDM requires of an item (see [`Item::sdm_fault`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SdmFault {
    pub vector: u8,
    pub error_code: Option<u64>,
    /// The settled emulator error, for the summary.
    pub erratum: &'static str,
}

impl Item {
    pub fn new(id: usize, instr: Instruction) -> Self {
        Item {
            id,
            instr,
            setup: false,
            target: None,
            imm_target: None,
            group: id,
            sdm_fault: None,
        }
    }
}

/// A complete test case.
#[derive(Clone, Debug)]
pub struct Case {
    pub mode: Mode,
    /// Initial CPU state (the same on both sides).
    pub init: CpuState,
    /// Initial contents of guest memory from [`env::CASE_AREA`] to
    /// [`env::SPACE`] (the code page is overwritten with the code).
    pub area: Vec<u8>,
    pub items: Vec<Item>,
    /// Where the case came from (corpus name, seed and index).
    pub origin: String,
}

/// The terminator appended to every case: `out 0xff, al` in ring 0 and
/// An instruction with `code` and no operands set yet (the caller sets
/// them). `Instruction::with` asserts, in debug builds, that the code takes
/// no operands.
pub fn bare(code: Code) -> Instruction {
    let mut i = Instruction::default();
    i.set_code(code);
    i
}

/// real mode, `ud2` in ring 3 (#UD, whose stub writes port 6).
pub fn terminator(mode: Mode) -> Instruction {
    if mode.ring() == 3 {
        return Instruction::with(Code::Ud2);
    }
    let mut i = bare(Code::Out_imm8_AL);
    i.set_op0_kind(OpKind::Immediate8);
    i.set_immediate8(env::PORT_END);
    i.set_op1_kind(OpKind::Register);
    i.set_op1_register(Register::AL);
    i
}

/// A case laid out in memory.
#[derive(Clone, Debug)]
pub struct Assembled {
    pub code: Vec<u8>,
    /// Address of each item (parallel to `Case::items`).
    pub addrs: Vec<u64>,
    /// Address of the terminator.
    pub term_addr: u64,
    /// Address just past the terminator (where RIP ends).
    pub end_addr: u64,
}

impl Assembled {
    /// Index of the item at `addr` (`items.len()` for the terminator).
    pub fn index_of(&self, addr: u64) -> Option<usize> {
        if addr == self.term_addr {
            return Some(self.addrs.len());
        }
        self.addrs.iter().position(|&a| a == addr)
    }
}

/// Virtual IPs the block encoder matches branch targets against. They fit
/// 16 bits because 16-bit near branches (in any mode) carry 16-bit targets.
const VIP_BASE: u64 = 0x1000;
const VIP_STEP: u64 = 0x10;

fn vip(base: u64, pos: usize) -> u64 {
    base + pos as u64 * VIP_STEP
}

/// The first virtual IP of a block: VIP_BASE, or the lowest of VIP_BASE +
/// 1 … VIP_BASE + 15 that no RIP-relative target of `items` equals a
/// virtual IP with. The block encoder takes a RIP-relative target equal to
/// an instruction's virtual IP for a reference to that instruction and
/// relocates it into the code: an aligned operand aimed at 0x1320 became
/// `aesdec xmm14, [91E2h]`, misaligned (seed 19074 `--isa-only` case
/// 126386).
fn vip_base(items: &[Item]) -> u64 {
    let last = items.len() as u64 * VIP_STEP;
    let hits = |base: u64| {
        items.iter().any(|it| {
            let t = it.instr.memory_displacement64();
            it.instr.is_ip_rel_memory_operand()
                && t >= base
                && t - base <= last
                && (t - base) % VIP_STEP == 0
        })
    };
    (VIP_BASE..VIP_BASE + VIP_STEP)
        .find(|&b| !hits(b))
        .unwrap_or(VIP_BASE)
}

/// Position of the first item with id >= `id` (or the terminator).
fn resolve(items: &[Item], id: usize) -> usize {
    items
        .iter()
        .position(|it| it.id >= id)
        .unwrap_or(items.len())
}

fn set_near_target(i: &mut Instruction, target: u64) {
    match i.op0_kind() {
        OpKind::NearBranch64 => i.set_near_branch64(target),
        OpKind::NearBranch32 => i.set_near_branch32(target as u32),
        _ => i.set_near_branch16(target as u16),
    }
}

/// Lay out `items` + terminator at [`env::CODE`].
pub fn assemble(mode: Mode, items: &[Item]) -> Result<Assembled, DifftestError> {
    let bits = mode.bits();
    let rip = env::CODE;
    let base = vip_base(items);
    let encode = |imm_addrs: Option<&[u64]>| -> Result<(Vec<u8>, Vec<u32>), DifftestError> {
        let mut instrs = Vec::with_capacity(items.len() + 1);
        for (pos, it) in items.iter().enumerate() {
            let mut i = it.instr;
            if let Some(t) = it.target {
                if matches!(
                    i.op0_kind(),
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
                ) {
                    set_near_target(&mut i, vip(base, resolve(items, t)));
                }
            }
            if let Some(t) = it.imm_target {
                let a = imm_addrs.map_or(rip, |a| a[resolve(items, t)]);
                set_label_immediate(&mut i, a);
            }
            i.set_ip(vip(base, pos));
            instrs.push(i);
        }
        let mut t = terminator(mode);
        t.set_ip(vip(base, items.len()));
        instrs.push(t);
        let r = BlockEncoder::encode(
            bits,
            InstructionBlock::new(&instrs, rip),
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .map_err(|e| DifftestError::Assemble(e.to_string()))?;
        Ok((r.code_buffer, r.new_instruction_offsets))
    };
    let (mut code, mut offs) = encode(None)?;
    let addrs_of = |offs: &[u32]| -> Result<Vec<u64>, DifftestError> {
        offs.iter()
            .map(|&o| {
                if o == u32::MAX {
                    Err(DifftestError::Assemble(
                        "an instruction was rewritten".into(),
                    ))
                } else {
                    Ok(rip + u64::from(o))
                }
            })
            .collect()
    };
    let mut all = addrs_of(&offs)?;
    if items.iter().any(|it| it.imm_target.is_some()) {
        let (c2, o2) = encode(Some(&all))?;
        let a2 = addrs_of(&o2)?;
        if a2 != all {
            return Err(DifftestError::Assemble(
                "label immediates changed the layout".into(),
            ));
        }
        code = c2;
        offs = o2;
        all = a2;
    }
    let _ = offs;
    if items.len() as u64 >= (0x1_0000 - VIP_BASE - VIP_STEP) / VIP_STEP {
        return Err(DifftestError::Assemble("too many items".into()));
    }
    if code.len() as u64 > 0x1000 - 16 {
        return Err(DifftestError::Assemble(format!(
            "code is {} bytes, more than a page",
            code.len()
        )));
    }
    let term_addr = all[items.len()];
    Ok(Assembled {
        end_addr: rip + code.len() as u64,
        code,
        addrs: all[..items.len()].to_vec(),
        term_addr,
    })
}

/// Set the (label) immediate of `push imm` / `mov reg, imm`.
fn set_label_immediate(i: &mut Instruction, addr: u64) {
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Immediate16 => i.set_immediate16(addr as u16),
            OpKind::Immediate32 => i.set_immediate32(addr as u32),
            OpKind::Immediate64 => i.set_immediate64(addr),
            OpKind::Immediate32to64 => i.set_immediate32to64(addr as i64),
            OpKind::Immediate8to16 | OpKind::Immediate8to32 | OpKind::Immediate8to64 => {}
            _ => continue,
        }
        return;
    }
}

// ---- flags ------------------------------------------------------------------

pub const CF: u64 = 1;
pub const PF: u64 = 1 << 2;
pub const AF: u64 = 1 << 4;
pub const ZF: u64 = 1 << 6;
pub const SF: u64 = 1 << 7;
pub const OF: u64 = 1 << 11;
pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
/// x87 condition codes, tracked in the same mask at FSW bit + 32.
pub const X87_C0: u64 = 1 << (32 + 8);
pub const X87_C1: u64 = 1 << (32 + 9);
pub const X87_C2: u64 = 1 << (32 + 10);
pub const X87_C3: u64 = 1 << (32 + 14);
pub const X87_CC: u64 = X87_C0 | X87_C1 | X87_C2 | X87_C3;

/// iced `RflagsBits` → RFLAGS bit positions (and x87 codes at FSW + 32).
pub fn from_iced(f: u32) -> u64 {
    let map = [
        (RflagsBits::OF, OF),
        (RflagsBits::SF, SF),
        (RflagsBits::ZF, ZF),
        (RflagsBits::AF, AF),
        (RflagsBits::CF, CF),
        (RflagsBits::PF, PF),
        (RflagsBits::DF, 1 << 10),
        (RflagsBits::IF, 1 << 9),
        (RflagsBits::AC, 1 << 18),
        (RflagsBits::C0, X87_C0),
        (RflagsBits::C1, X87_C1),
        (RflagsBits::C2, X87_C2),
        (RflagsBits::C3, X87_C3),
    ];
    map.iter()
        .filter(|(i, _)| f & i != 0)
        .fold(0, |acc, (_, b)| acc | b)
}

/// The flag effect of one instruction: flags it reads, flags it surely
/// defines, flags it leaves undefined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlagFx {
    pub read: u64,
    pub defined: u64,
    pub undefined: u64,
}

/// Effect of shift/rotate `m` on a `width`-bit operand by `count` (None =
/// unknown), following the SDM's flag rules (stricter than iced's tables:
/// e.g. CF is undefined for SHL/SHR by >= the operand width).
fn shift_fx(m: Mnemonic, width: u32, count: Option<u8>, fx: FlagFx) -> FlagFx {
    let cmask: u8 = if width == 64 { 0x3f } else { 0x1f };
    let reads_cf = matches!(m, Mnemonic::Rcl | Mnemonic::Rcr);
    let read = if reads_cf { CF } else { 0 };
    let Some(count) = count else {
        // Unknown count: a zero count changes nothing, so nothing is
        // surely defined; anything may become undefined.
        let undefined = match m {
            Mnemonic::Shld | Mnemonic::Shrd => ARITH,
            Mnemonic::Rol | Mnemonic::Ror | Mnemonic::Rcl | Mnemonic::Rcr => OF | CF,
            _ => OF | AF | CF,
        };
        return FlagFx {
            read: fx.read | read,
            defined: 0,
            undefined,
        };
    };
    let c = u32::from(count & cmask);
    let none = FlagFx {
        read: fx.read | read,
        ..Default::default()
    };
    match m {
        Mnemonic::Shl | Mnemonic::Sal | Mnemonic::Shr | Mnemonic::Sar => {
            if c == 0 {
                return none;
            }
            let mut undefined = AF;
            let mut defined = SF | ZF | PF | CF;
            if c != 1 {
                undefined |= OF;
            } else {
                defined |= OF;
            }
            if c >= width && m != Mnemonic::Sar {
                undefined |= CF;
                defined &= !CF;
            }
            FlagFx {
                read: fx.read,
                defined,
                undefined,
            }
        }
        Mnemonic::Rol | Mnemonic::Ror => {
            if c == 0 {
                // The SDM's pseudo-code leaves OF undefined even here.
                return FlagFx {
                    read: fx.read,
                    defined: 0,
                    undefined: OF,
                };
            }
            FlagFx {
                read: fx.read,
                defined: CF | if c == 1 { OF } else { 0 },
                undefined: if c == 1 { 0 } else { OF },
            }
        }
        Mnemonic::Rcl | Mnemonic::Rcr => {
            if c == 0 {
                return none;
            }
            FlagFx {
                read: fx.read | CF,
                defined: CF | if c == 1 { OF } else { 0 },
                undefined: if c == 1 { 0 } else { OF },
            }
        }
        Mnemonic::Shld | Mnemonic::Shrd => {
            if c == 0 {
                return none;
            }
            if c > width {
                return FlagFx {
                    read: fx.read,
                    defined: 0,
                    undefined: ARITH,
                };
            }
            FlagFx {
                read: fx.read,
                defined: CF | SF | ZF | PF | if c == 1 { OF } else { 0 },
                undefined: AF | if c == 1 { 0 } else { OF },
            }
        }
        _ => fx,
    }
}

fn is_shift(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Shl
            | Mnemonic::Sal
            | Mnemonic::Shr
            | Mnemonic::Sar
            | Mnemonic::Rol
            | Mnemonic::Ror
            | Mnemonic::Rcl
            | Mnemonic::Rcr
            | Mnemonic::Shld
            | Mnemonic::Shrd
    )
}

/// Width in bits of the first operand.
fn op0_width(i: &Instruction) -> u32 {
    match i.op0_kind() {
        OpKind::Register => i.op0_register().size() as u32 * 8,
        _ => i.memory_size().size() as u32 * 8,
    }
}

/// The shift count of a shift/rotate: immediate, 1, or CL (if known).
fn shift_count(i: &Instruction, cl: Option<u8>) -> Option<u8> {
    let last = i.op_count() - 1;
    match i.op_kind(last) {
        OpKind::Immediate8 => Some(i.immediate8()),
        OpKind::Register if i.op_register(last) == Register::CL => cl,
        _ => Some(1), // the D0/D1 "by 1" forms name no count operand
    }
}

/// Longest REP string instruction a case may run (iterations).
pub const MAX_REP: u64 = 4096;

/// Address size of a string instruction, from its implicit operands.
fn string_addr_size(i: &Instruction) -> u32 {
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::MemorySegSI | OpKind::MemoryESDI | OpKind::MemorySegDI => return 16,
            OpKind::MemorySegESI | OpKind::MemoryESEDI | OpKind::MemorySegEDI => return 32,
            OpKind::MemorySegRSI | OpKind::MemoryESRDI | OpKind::MemorySegRDI => return 64,
            _ => {}
        }
    }
    64
}

/// Index 0..16 of a general-purpose register (any size), if it is one.
pub fn gpr_index(r: Register) -> Option<usize> {
    if !r.is_gpr() {
        return None;
    }
    let f = r.full_register();
    Some(f as usize - Register::RAX as usize)
}

/// Instructions whose x87 condition-code reads iced does not list: they
/// store the status word (or all of the FPU state) somewhere visible.
fn reads_x87_status(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Fnstsw
            | Mnemonic::Fstsw
            | Mnemonic::Fnstenv
            | Mnemonic::Fstenv
            | Mnemonic::Fnsave
            | Mnemonic::Fsave
            | Mnemonic::Fxsave
            | Mnemonic::Fxsave64
    )
}

/// Control-flow successors of an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Succ {
    Next,
    Target,
    Both,
    /// The case ends here (software interrupt, UD2, ...).
    Stop,
}

/// Why an item is not valid at its point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// It reads flags (or x87 condition codes) that are undefined here.
    Flags(u64),
    /// It reads registers (bit mask) holding undefined values.
    Registers(u32),
    /// A control transfer that does not go forward.
    Backward,
    /// A control transfer without a target item.
    NoTarget,
    /// Its memory result would be undefined (16-bit SHLD/SHRD count).
    UndefinedMemory,
    /// A REP string instruction without a known small count.
    UnboundedRep,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Flags(m) => write!(f, "reads undefined flags {m:#x}"),
            Invalid::Registers(m) => write!(f, "reads undefined registers {m:#x}"),
            Invalid::Backward => write!(f, "backward control transfer"),
            Invalid::NoTarget => write!(f, "control transfer without a target"),
            Invalid::UndefinedMemory => write!(f, "memory result undefined (SHLD/SHRD count)"),
            Invalid::UnboundedRep => {
                write!(f, "REP string instruction without a known small count")
            }
        }
    }
}

/// The analysis state at one point.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Point {
    /// Undefined flags (RFLAGS bits; x87 codes at FSW bit + 32).
    pub mask: u64,
    /// Undefined general registers (bit per register index).
    pub poison: u32,
    pub reachable: bool,
    /// The case ended right after a transcendental: its result registers
    /// ([`Self::fuzzy_regs`]) are compared within the SDM's error bound
    /// (see [`super::fp`]).
    pub fuzzy_x87: bool,
    /// Physical x87 registers the transcendental wrote (bit per register).
    pub fuzzy_regs: u8,
}

impl Point {
    fn join(&mut self, o: &Point) {
        if !o.reachable {
            return;
        }
        self.mask |= o.mask;
        self.poison |= o.poison;
        self.fuzzy_x87 |= o.fuzzy_x87;
        self.fuzzy_regs |= o.fuzzy_regs;
        self.reachable = true;
    }
}

/// The forward analysis, steppable item by item (the generator uses it to
/// reject candidates; [`analyze`] runs it over a whole case).
pub struct Flow {
    info: InstructionInfoFactory,
    cur: Point,
    /// Known value of CL (reset at joins and by writes to RCX).
    cl: Option<u8>,
    /// Known bits of RCX: (value, mask of known bits).
    rcx: Option<(u64, u64)>,
    pending: BTreeMap<usize, Point>,
    prev: Option<Instruction>,
    /// The oracle is KVM's instruction emulator: flags it is known to get
    /// wrong count as undefined too.
    emulated: bool,
}

/// What stepping one item did.
#[derive(Clone, Copy, Debug)]
pub struct Stepped {
    pub before: Point,
    pub after: Point,
}

impl Flow {
    pub fn new(mode: Mode) -> Self {
        Flow {
            emulated: mode.oracle() == super::Oracle::Emulator,
            info: InstructionInfoFactory::new(),
            cur: Point {
                reachable: true,
                ..Default::default()
            },
            cl: None,
            rcx: None,
            pending: BTreeMap::new(),
            prev: None,
        }
    }

    /// The state before the next item (after merging pending edges to `id`).
    fn arrive(&mut self, id: usize) -> Point {
        let keys: Vec<usize> = self.pending.range(..=id).map(|(k, _)| *k).collect();
        let mut p = self.cur;
        let mut joined = false;
        for k in keys {
            if let Some(q) = self.pending.remove(&k) {
                if q.reachable {
                    joined = true;
                }
                p.join(&q);
            }
        }
        if joined {
            self.cl = None;
            self.rcx = None;
            self.prev = None;
        }
        p
    }

    /// Flags/poison state the terminator sees.
    pub fn at_end(&mut self) -> Point {
        self.arrive(usize::MAX)
    }

    /// The current state (before the next item), without consuming joins.
    pub fn peek(&self, id: usize) -> Point {
        let mut p = self.cur;
        for (_, q) in self.pending.range(..=id) {
            p.join(q);
        }
        p
    }

    /// Would `item` be valid next? (Does not change the state.)
    pub fn check(&mut self, item: &Item) -> Result<(), Invalid> {
        if let Some(t) = item.target {
            if t <= item.id {
                return Err(Invalid::Backward);
            }
        }
        if item.target.is_none() && needs_target(&item.instr) {
            return Err(Invalid::NoTarget);
        }
        let here = self.peek(item.id);
        if !here.reachable {
            return Ok(());
        }
        let (fx, reads, _) = self.effects(&item.instr);
        if fx.read & here.mask != 0 {
            return Err(Invalid::Flags(fx.read & here.mask));
        }
        if reads & here.poison != 0 {
            return Err(Invalid::Registers(reads & here.poison));
        }
        if self.undefined_memory_result(&item.instr) {
            return Err(Invalid::UndefinedMemory);
        }
        let i = &item.instr;
        if (i.has_rep_prefix() || i.has_repne_prefix()) && i.code().is_string_instruction() {
            let amask = match string_addr_size(i) {
                16 => 0xffff,
                32 => 0xffff_ffff,
                _ => u64::MAX,
            };
            match self.rcx {
                Some((v, known)) if known & amask == amask && v & amask <= MAX_REP => {}
                _ => return Err(Invalid::UnboundedRep),
            }
        }
        Ok(())
    }

    /// Step over `item`: `Err` if it is invalid at this point.
    pub fn step(&mut self, item: &Item) -> Result<Stepped, Invalid> {
        let before = self.arrive(item.id);
        self.cur = before;
        if !before.reachable {
            self.prev = None;
            return Ok(Stepped {
                before,
                after: before,
            });
        }
        self.check(item)?;
        let i = &item.instr;
        let (fx, _, writes) = self.effects(i);
        let writes: Vec<(Register, bool)> = writes;
        let mut after = before;
        after.mask = (after.mask & !fx.defined) | fx.undefined;
        // Register results.
        for (r, full) in writes {
            let Some(n) = gpr_index(r) else { continue };
            if full {
                after.poison &= !(1 << n);
            }
        }
        if let Some(n) = self.undefined_register_result(i) {
            after.poison |= 1 << n;
        }
        // CPUID's results depend on each side's configured CPUID, not on
        // the instruction's semantics: RAX, RCX, RDX, RBX are not compared.
        if i.mnemonic() == Mnemonic::Cpuid {
            after.poison |= 0b1111;
        }
        // Known CL.
        let writes_rcx = self
            .info
            .info(i)
            .used_registers()
            .iter()
            .any(|u| gpr_index(u.register()) == Some(1) && is_write(u.access()));
        if writes_rcx {
            let r = i.op0_register();
            self.rcx = match i.code() {
                Code::Mov_r8_imm8 | Code::Mov_rm8_imm8 if r == Register::CL => {
                    Some((i.immediate(1) & 0xff, 0xff))
                }
                Code::Mov_r16_imm16 if r == Register::CX => Some((i.immediate(1) & 0xffff, 0xffff)),
                Code::Mov_r32_imm32 if r == Register::ECX => {
                    Some((i.immediate(1) & 0xffff_ffff, u64::MAX))
                }
                Code::Mov_rm64_imm32 | Code::Mov_r64_imm64 if r == Register::RCX => {
                    Some((i.immediate(1), u64::MAX))
                }
                _ => None,
            };
            self.cl = self
                .rcx
                .and_then(|(v, k)| (k & 0xff == 0xff).then_some(v as u8));
        }
        // Successors.
        let succ = successors(i, item.target.is_some());
        let mut next = after;
        match succ {
            Succ::Next => {}
            Succ::Target | Succ::Both => {
                if let Some(t) = item.target {
                    self.pending.entry(t).or_default().join(&after);
                }
                if succ == Succ::Target {
                    next.reachable = false;
                }
            }
            Succ::Stop => next.reachable = false,
        }
        self.cur = next;
        self.prev = Some(*i);
        Ok(Stepped { before, after })
    }

    /// (flag effect, registers read (bitmask), registers written with
    /// "fully defines it" flag).
    fn effects(&mut self, i: &Instruction) -> (FlagFx, u32, Vec<(Register, bool)>) {
        let m = i.mnemonic();
        let mut fx = FlagFx {
            read: from_iced(i.rflags_read()),
            defined: from_iced(i.rflags_written() | i.rflags_cleared() | i.rflags_set()),
            undefined: from_iced(i.rflags_undefined()),
        };
        if is_shift(m) {
            fx = shift_fx(m, op0_width(i), shift_count(i, self.cl), fx);
        }
        if reads_x87_status(m) {
            fx.read |= X87_CC;
        }
        // FCMOVcc and FCOMI/FUCOMI(P) keep C1 on the processors unless the
        // stack underflows (iced's tables, after the SDM, say "set to 0"):
        // C1 stays whatever it was, undefined included.
        let name = format!("{m:?}");
        if name.starts_with("Fcmov") || name.starts_with("Fcomi") || name.starts_with("Fucomi") {
            fx.defined &= !X87_C1;
            fx.undefined &= !X87_C1;
        }
        // A REP CMPS/SCAS with a zero count changes no flag.
        if (i.has_rep_prefix() || i.has_repne_prefix()) && i.code().is_string_instruction() {
            let amask = match string_addr_size(i) {
                16 => 0xffff,
                32 => 0xffff_ffff,
                _ => u64::MAX,
            };
            if !matches!(self.rcx, Some((v, known)) if known & amask == amask && v & amask != 0) {
                fx.defined = 0;
                fx.undefined = 0;
            }
        }
        if self.emulated && matches!(m, Mnemonic::Aam | Mnemonic::Aad) {
            // KVM's emulator sets SF/ZF/PF from AX, the SDM from AL.
            fx.defined &= !(SF | ZF | PF);
            fx.undefined |= SF | ZF | PF;
        }
        let info = self.info.info(i);
        let mut reads = 0u32;
        let mut writes = Vec::new();
        for u in info.used_registers() {
            let r = u.register();
            let Some(n) = gpr_index(r) else { continue };
            match u.access() {
                OpAccess::Read
                | OpAccess::CondRead
                | OpAccess::ReadWrite
                | OpAccess::ReadCondWrite => {
                    reads |= 1 << n;
                }
                _ => {}
            }
            if matches!(u.access(), OpAccess::Write | OpAccess::ReadWrite) {
                // 32-bit writes zero-extend; 8/16-bit writes merge.
                writes.push((r, r.size() >= 4));
            }
        }
        // Zeroing idioms read nothing that matters.
        if matches!(m, Mnemonic::Xor | Mnemonic::Sub)
            && i.op_count() == 2
            && i.op0_kind() == OpKind::Register
            && i.op1_kind() == OpKind::Register
            && i.op0_register() == i.op1_register()
        {
            if let Some(n) = gpr_index(i.op0_register()) {
                reads &= !(1 << n);
            }
        }
        (fx, reads, writes)
    }

    /// Register whose value this instruction may leave undefined.
    fn undefined_register_result(&self, i: &Instruction) -> Option<usize> {
        let m = i.mnemonic();
        match m {
            Mnemonic::Bsf | Mnemonic::Bsr => {
                if self.source_known_nonzero(i) {
                    None
                } else {
                    gpr_index(i.op0_register())
                }
            }
            Mnemonic::Shld | Mnemonic::Shrd
                if i.op0_kind() == OpKind::Register && op0_width(i) == 16 =>
            {
                match shift_count(i, self.cl) {
                    Some(c) if u32::from(c & 0x1f) <= 16 => None,
                    _ => gpr_index(i.op0_register()),
                }
            }
            _ => None,
        }
    }

    fn undefined_memory_result(&self, i: &Instruction) -> bool {
        matches!(i.mnemonic(), Mnemonic::Shld | Mnemonic::Shrd)
            && i.op0_kind() == OpKind::Memory
            && op0_width(i) == 16
            && !matches!(shift_count(i, self.cl), Some(c) if u32::from(c & 0x1f) <= 16)
    }

    /// Is the source operand of BSF/BSR known to be non-zero: set just
    /// before by a `mov` of a non-zero immediate to the same operand?
    fn source_known_nonzero(&self, i: &Instruction) -> bool {
        let Some(p) = self.prev else { return false };
        if p.mnemonic() != Mnemonic::Mov || p.op_count() != 2 {
            return false;
        }
        let size = op_size(i, 1);
        let imm = match p.op1_kind() {
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate32to64 => p.immediate(1),
            _ => return false,
        };
        let mask = if size >= 8 {
            u64::MAX
        } else {
            (1u64 << (size * 8)) - 1
        };
        if imm & mask == 0 {
            return false;
        }
        match (i.op1_kind(), p.op0_kind()) {
            (OpKind::Register, OpKind::Register) => {
                let (a, b) = (i.op1_register(), p.op0_register());
                a.full_register() == b.full_register() && b.size() >= a.size()
            }
            (OpKind::Memory, OpKind::Memory) => {
                same_memory(i, &p) && p.memory_size().size() >= i.memory_size().size()
            }
            _ => false,
        }
    }
}

fn is_write(a: OpAccess) -> bool {
    matches!(
        a,
        OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
    )
}

/// Size in bytes of operand `n`.
fn op_size(i: &Instruction, n: u32) -> usize {
    match i.op_kind(n) {
        OpKind::Register => i.op_register(n).size(),
        _ => i.memory_size().size(),
    }
}

/// Do two instructions name the same memory operand?
pub fn same_memory(a: &Instruction, b: &Instruction) -> bool {
    a.memory_base() == b.memory_base()
        && a.memory_index() == b.memory_index()
        && a.memory_index_scale() == b.memory_index_scale()
        && a.memory_displacement64() == b.memory_displacement64()
        && a.memory_segment() == b.memory_segment()
}

fn needs_target(i: &Instruction) -> bool {
    matches!(
        i.flow_control(),
        FlowControl::UnconditionalBranch
            | FlowControl::ConditionalBranch
            | FlowControl::IndirectBranch
            | FlowControl::Call
            | FlowControl::IndirectCall
            | FlowControl::Return
    ) && !matches!(i.mnemonic(), Mnemonic::Into)
}

fn successors(i: &Instruction, has_target: bool) -> Succ {
    match i.flow_control() {
        FlowControl::Next => Succ::Next,
        FlowControl::ConditionalBranch => Succ::Both,
        FlowControl::UnconditionalBranch
        | FlowControl::IndirectBranch
        | FlowControl::Call
        | FlowControl::IndirectCall
        | FlowControl::Return => {
            if has_target {
                Succ::Target
            } else {
                Succ::Stop
            }
        }
        FlowControl::Interrupt => {
            if i.mnemonic() == Mnemonic::Into {
                Succ::Next
            } else {
                Succ::Stop
            }
        }
        _ => Succ::Stop,
    }
}

/// The analysis of a whole case.
#[derive(Clone, Debug)]
pub struct Analysis {
    /// Per item: the state before and after it.
    pub before: Vec<Point>,
    pub after: Vec<Point>,
    /// At the terminator.
    pub end: Point,
}

impl Analysis {
    /// Undefined flags and registers where execution stopped at `addr`
    /// (a faulting instruction, or the instruction after a trap). Unknown
    /// addresses get the union of everything (conservative).
    pub fn at_addr(&self, asm: &Assembled, addr: u64) -> Point {
        let mut p = Point::default();
        match asm.index_of(addr) {
            Some(k) => {
                if k == self.before.len() {
                    p.join(&self.end);
                } else {
                    p.join(&self.before[k]);
                }
                if k > 0 {
                    p.join(&self.after[k - 1]);
                }
            }
            None => {
                for q in self.before.iter().chain(self.after.iter()) {
                    p.join(q);
                }
                p.join(&self.end);
            }
        }
        p
    }
}

/// Analyze `items`; `Err` names the first invalid item.
pub fn analyze(mode: Mode, items: &[Item]) -> Result<Analysis, String> {
    let mut f = Flow::new(mode);
    let mut before = Vec::with_capacity(items.len());
    let mut after = Vec::with_capacity(items.len());
    for (k, it) in items.iter().enumerate() {
        let s = f
            .step(it)
            .map_err(|e| format!("item {k} ({}): {e}", cpu_interp::disasm(&it.instr)))?;
        before.push(s.before);
        after.push(s.after);
    }
    let end = f.at_end();
    Ok(Analysis { before, after, end })
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;

    fn items_of(
        bits: u32,
        f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    ) -> Vec<Item> {
        let mut a = CodeAssembler::new(bits).unwrap();
        f(&mut a).unwrap();
        a.instructions()
            .iter()
            .enumerate()
            .map(|(k, i)| Item::new(k, *i))
            .collect()
    }

    #[test]
    fn undefined_flags_are_tracked_and_reads_rejected() {
        // mul leaves SF ZF AF PF undefined; adc reads only CF (defined).
        let ok = items_of(64, |a| {
            a.mul(rcx)?;
            a.adc(rax, rdx)
        });
        let an = analyze(Mode::Long64Ring3, &ok).unwrap();
        assert_eq!(an.after[0].mask & ARITH, SF | ZF | AF | PF);
        // adc defines them all again.
        assert_eq!(an.end.mask & ARITH, 0);
        // setz after mul reads an undefined ZF.
        let bad = items_of(64, |a| {
            a.mul(rcx)?;
            a.setz(al)
        });
        assert!(analyze(Mode::Long64Ring3, &bad).is_err());
        // and/test leave AF undefined; a later pushf would read it.
        let bad = items_of(64, |a| {
            a.and(eax, 3)?;
            a.pushfq()
        });
        assert!(analyze(Mode::Long64Ring3, &bad).is_err());
    }

    #[test]
    fn shift_counts_follow_the_sdm() {
        // shl ax, 20: CF undefined (count >= 16), OF undefined (count > 1).
        let it = items_of(32, |a| a.shl(ax, 20));
        let an = analyze(Mode::Prot32Ring0, &it).unwrap();
        assert_eq!(an.end.mask & ARITH, CF | OF | AF);
        // shl eax, 0: no flag changes.
        let it = items_of(32, |a| a.shl(eax, 0));
        assert_eq!(analyze(Mode::Prot32Ring0, &it).unwrap().end.mask, 0);
        // by CL after mov cl, 1: OF defined, AF undefined.
        let it = items_of(32, |a| {
            a.mov(cl, 1)?;
            a.shl(eax, cl)
        });
        assert_eq!(
            analyze(Mode::Prot32Ring0, &it).unwrap().end.mask & ARITH,
            AF
        );
        // 16-bit shld by an unknown count poisons the destination.
        let it = items_of(32, |a| a.shld(ax, dx, cl));
        assert_eq!(analyze(Mode::Prot32Ring0, &it).unwrap().end.poison, 1);
    }

    #[test]
    fn bsf_poisons_unless_the_source_is_set_nonzero() {
        let it = items_of(64, |a| a.bsf(eax, ecx));
        let an = analyze(Mode::Long64Ring3, &it).unwrap();
        assert_eq!(an.end.poison, 1);
        let it = items_of(64, |a| {
            a.mov(ecx, 0x100)?;
            a.bsf(eax, ecx)
        });
        assert_eq!(analyze(Mode::Long64Ring3, &it).unwrap().end.poison, 0);
        // Reading the poisoned register is invalid; overwriting it heals it.
        let it = items_of(64, |a| {
            a.bsf(eax, ecx)?;
            a.add(edx, eax)
        });
        assert!(analyze(Mode::Long64Ring3, &it).is_err());
        let it = items_of(64, |a| {
            a.bsf(eax, ecx)?;
            a.mov(eax, 5)?;
            a.add(edx, eax)
        });
        assert_eq!(analyze(Mode::Long64Ring3, &it).unwrap().end.poison, 0);
    }

    #[test]
    fn branches_join_and_assemble() {
        let mut it = items_of(64, |a| {
            a.cmp(eax, ecx)?;
            a.jne(0x4000_0000)?; // target patched below
            a.mul(ecx)?;
            a.nop()
        });
        it[1].target = Some(3);
        let an = analyze(Mode::Long64Ring3, &it).unwrap();
        // At the nop: mul's undefined flags joined with the branch's none.
        assert_eq!(an.before[3].mask & ARITH, SF | ZF | AF | PF);
        let asm = assemble(Mode::Long64Ring3, &it).unwrap();
        assert_eq!(asm.addrs[0], env::CODE);
        let mut d = iced_x86::Decoder::with_ip(64, &asm.code, env::CODE, 0);
        let _cmp = d.decode();
        let jne = d.decode();
        assert_eq!(jne.near_branch_target(), asm.addrs[3]);
        // Dropping the target resolves to the next item (the terminator).
        let short: Vec<Item> = it[..3].to_vec();
        let asm = assemble(Mode::Long64Ring3, &short).unwrap();
        let mut d = iced_x86::Decoder::with_ip(64, &asm.code, env::CODE, 0);
        let _ = d.decode();
        assert_eq!(d.decode().near_branch_target(), asm.term_addr);
        // Backward targets are invalid.
        let mut back = it.clone();
        back[1].target = Some(0);
        assert!(analyze(Mode::Long64Ring3, &back).is_err());
    }
}
