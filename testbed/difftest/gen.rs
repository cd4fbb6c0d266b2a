//! Random instruction sequences.
//!
//! Instructions are built from iced-x86's opcode tables: for every `Code`
//! the interpreter implements (and that is valid in the mode), operands are
//! chosen from the opcode's operand kinds — registers of every size
//! (including REX-only byte registers), memory operands in every
//! addressing form and address size, immediates biased to edge values —
//! plus LOCK on lockable memory forms and segment overrides. Templates add
//! what needs a specific context: string instructions with REP prefixes
//! and pointers near the unmapped page, forward branches, calls and
//! returns, ENTER/LEAVE, PUSHF/POPF, port I/O, and deliberate faults.
//!
//! Invariants the generator keeps (and [`super::case::Flow`] checks):
//! RBX and RBP hold window addresses and RSP the stack pointer, so they
//! are never written except by stack instructions; no instruction reads a
//! flag or register the SDM leaves undefined at that point (a `cmp` that
//! defines all flags is inserted where needed); every control transfer
//! goes forward.

use std::collections::{BTreeMap, BTreeSet};

use iced_x86::{
    Code, Encoder, EncodingKind, Instruction, InstructionInfoFactory, MemorySize, Mnemonic,
    OpAccess, OpCodeOperandKind as K, OpKind, Register,
};

use cpu_interp::state::{gpr, CpuState};

use super::case::{Case, Flow, Invalid, Item, ARITH};

pub mod isa;
use super::env;
use super::rng::Rng;
use super::Mode;

pub(crate) mod sys;
pub use sys::gdt_copy;

/// Integer mnemonics the random generator draws from (with every legacy
/// encoding of each).
const INTEGER: &[Mnemonic] = &[
    Mnemonic::Add,
    Mnemonic::Adc,
    Mnemonic::Sub,
    Mnemonic::Sbb,
    Mnemonic::And,
    Mnemonic::Or,
    Mnemonic::Xor,
    Mnemonic::Cmp,
    Mnemonic::Test,
    Mnemonic::Inc,
    Mnemonic::Dec,
    Mnemonic::Neg,
    Mnemonic::Not,
    Mnemonic::Shl,
    Mnemonic::Sal,
    Mnemonic::Shr,
    Mnemonic::Sar,
    Mnemonic::Rol,
    Mnemonic::Ror,
    Mnemonic::Rcl,
    Mnemonic::Rcr,
    Mnemonic::Shld,
    Mnemonic::Shrd,
    Mnemonic::Mul,
    Mnemonic::Imul,
    Mnemonic::Div,
    Mnemonic::Idiv,
    Mnemonic::Bt,
    Mnemonic::Bts,
    Mnemonic::Btr,
    Mnemonic::Btc,
    Mnemonic::Bsf,
    Mnemonic::Bsr,
    Mnemonic::Popcnt,
    Mnemonic::Mov,
    Mnemonic::Movzx,
    Mnemonic::Movsx,
    Mnemonic::Movsxd,
    Mnemonic::Lea,
    Mnemonic::Xchg,
    Mnemonic::Xadd,
    Mnemonic::Cmpxchg,
    Mnemonic::Cmpxchg8b,
    Mnemonic::Cmpxchg16b,
    Mnemonic::Bswap,
    Mnemonic::Cmovo,
    Mnemonic::Cmovno,
    Mnemonic::Cmovb,
    Mnemonic::Cmovae,
    Mnemonic::Cmove,
    Mnemonic::Cmovne,
    Mnemonic::Cmovbe,
    Mnemonic::Cmova,
    Mnemonic::Cmovs,
    Mnemonic::Cmovns,
    Mnemonic::Cmovp,
    Mnemonic::Cmovnp,
    Mnemonic::Cmovl,
    Mnemonic::Cmovge,
    Mnemonic::Cmovle,
    Mnemonic::Cmovg,
    Mnemonic::Seto,
    Mnemonic::Setno,
    Mnemonic::Setb,
    Mnemonic::Setae,
    Mnemonic::Sete,
    Mnemonic::Setne,
    Mnemonic::Setbe,
    Mnemonic::Seta,
    Mnemonic::Sets,
    Mnemonic::Setns,
    Mnemonic::Setp,
    Mnemonic::Setnp,
    Mnemonic::Setl,
    Mnemonic::Setge,
    Mnemonic::Setle,
    Mnemonic::Setg,
    Mnemonic::Cbw,
    Mnemonic::Cwde,
    Mnemonic::Cdqe,
    Mnemonic::Cwd,
    Mnemonic::Cdq,
    Mnemonic::Cqo,
    Mnemonic::Lahf,
    Mnemonic::Sahf,
    Mnemonic::Clc,
    Mnemonic::Stc,
    Mnemonic::Cmc,
    Mnemonic::Cld,
    Mnemonic::Std,
    Mnemonic::Cli,
    Mnemonic::Sti,
    Mnemonic::Salc,
    Mnemonic::Push,
    Mnemonic::Pop,
    Mnemonic::Pushf,
    Mnemonic::Pushfd,
    Mnemonic::Pushfq,
    Mnemonic::Daa,
    Mnemonic::Das,
    Mnemonic::Aaa,
    Mnemonic::Aas,
    Mnemonic::Aam,
    Mnemonic::Aad,
    Mnemonic::Nop,
    Mnemonic::Xlatb,
    Mnemonic::Bound,
];

/// Codes never generated: undefined results the analysis cannot mask
/// (BSWAP of a 16-bit register), segment-register loads (POP DS ...,
/// which the stack template pairs with a push).
fn excluded(code: Code) -> bool {
    matches!(code, Code::Bswap_r16)
}

/// Is every operand kind of `code` one the builder can fill?
fn supported_kinds(code: Code) -> bool {
    code.op_code().op_kinds().iter().all(|k| {
        matches!(
            k,
            K::r8_or_mem
                | K::r16_or_mem
                | K::r32_or_mem
                | K::r64_or_mem
                | K::r8_reg
                | K::r8_opcode
                | K::r16_reg
                | K::r16_rm
                | K::r16_opcode
                | K::r32_reg
                | K::r32_rm
                | K::r32_opcode
                | K::r64_reg
                | K::r64_rm
                | K::r64_opcode
                | K::mem
                | K::mem_offs
                | K::al
                | K::cl
                | K::ax
                | K::dx
                | K::eax
                | K::rax
                | K::imm8
                | K::imm8_const_1
                | K::imm8sex16
                | K::imm8sex32
                | K::imm8sex64
                | K::imm16
                | K::imm32
                | K::imm32sex64
                | K::imm64
                | K::es
                | K::cs
                | K::ss
                | K::ds
                | K::fs
                | K::gs
                | K::seg_rBX_al
                | K::xmm_reg
                | K::xmm_rm
                | K::xmm_or_mem
                | K::mm_reg
                | K::mm_rm
                | K::mm_or_mem
                | K::st0
                | K::sti_opcode
        )
    })
}

pub(super) fn valid_in(code: Code, mode: Mode) -> bool {
    let oc = code.op_code();
    // As Intel decodes it (iced also lists AMD-only forms, e.g. 16-bit
    // near branches in 64-bit mode, which Intel decodes as 32-bit ones).
    let bits_ok = match mode.bits() {
        64 => oc.mode64() && oc.intel_decoder64(),
        32 => oc.mode32() && oc.intel_decoder32(),
        _ => oc.mode16() && oc.intel_decoder16(),
    };
    let ring_ok = mode.ring() == 0 || oc.cpl3();
    bits_ok
        && ring_ok
        && oc.encoding() == EncodingKind::Legacy
        && oc.is_instruction()
        && oc.decoder_option() == 0
        && (!mode.real() || oc.real_mode())
}

/// The generic integer codes for `mode`, grouped by mnemonic.
pub fn integer_groups(mode: Mode) -> Vec<Vec<Code>> {
    let mut by: BTreeMap<u32, Vec<Code>> = BTreeMap::new();
    for c in Code::values() {
        if !INTEGER.contains(&c.mnemonic())
            || !valid_in(c, mode)
            || !cpu_interp::dispatch::implemented(c)
            || excluded(c)
            || !supported_kinds(c)
        {
            continue;
        }
        // Segment-register pops load segments: only the stack template
        // generates them (paired with a push).
        if c.mnemonic() == Mnemonic::Pop
            && c.op_code()
                .op_kinds()
                .iter()
                .any(|k| matches!(k, K::es | K::cs | K::ss | K::ds | K::fs | K::gs))
        {
            continue;
        }
        by.entry(c.mnemonic() as u32).or_default().push(c);
    }
    by.into_values().collect()
}

fn gpr_full(r: Register) -> Register {
    if r.is_gpr() {
        r.full_register()
    } else {
        r
    }
}

/// RBX, RBP, RSP (any size): never written by a generated instruction
/// except through the stack pointer of a stack instruction.
pub(super) fn reserved(r: Register) -> bool {
    matches!(gpr_full(r), Register::RBX | Register::RBP | Register::RSP)
}

pub(super) fn regs_of_size(bits: u32, size: usize) -> Vec<Register> {
    use Register::*;
    let mut v: Vec<Register> = match size {
        1 => vec![AL, CL, DL, BL, AH, CH, DH, BH],
        2 => vec![AX, CX, DX, BX, SP, BP, SI, DI],
        4 => vec![EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI],
        _ => vec![RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI],
    };
    if bits == 64 {
        v.extend(match size {
            1 => vec![
                SPL, BPL, SIL, DIL, R8L, R9L, R10L, R11L, R12L, R13L, R14L, R15L,
            ],
            2 => vec![R8W, R9W, R10W, R11W, R12W, R13W, R14W, R15W],
            4 => vec![R8D, R9D, R10D, R11D, R12D, R13D, R14D, R15D],
            _ => vec![R8, R9, R10, R11, R12, R13, R14, R15],
        });
    }
    v
}

/// A register of `size` bytes for general-register index `n` (byte
/// registers 4..7 are SPL..DIL).
pub(super) fn reg_sized(n: usize, size: usize) -> Register {
    use Register::*;
    const T8: [Register; 16] = [
        AL, CL, DL, BL, SPL, BPL, SIL, DIL, R8L, R9L, R10L, R11L, R12L, R13L, R14L, R15L,
    ];
    const T16: [Register; 16] = [
        AX, CX, DX, BX, SP, BP, SI, DI, R8W, R9W, R10W, R11W, R12W, R13W, R14W, R15W,
    ];
    const T32: [Register; 16] = [
        EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI, R8D, R9D, R10D, R11D, R12D, R13D, R14D, R15D,
    ];
    const T64: [Register; 16] = [
        RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8, R9, R10, R11, R12, R13, R14, R15,
    ];
    let n = n & 15;
    match size {
        1 => T8[n],
        2 => T16[n],
        4 => T32[n],
        _ => T64[n],
    }
}

/// A memory operand.
#[derive(Clone, Copy, Debug)]
pub(super) struct Mem {
    pub base: Register,
    pub index: Register,
    pub scale: u32,
    pub disp: u64,
    pub displ_size: u32,
    pub seg: Register,
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Opnd {
    Reg(Register),
    Mem(Mem),
    Imm(u64),
}

fn imm_kind(code: Code, n: u32) -> Option<OpKind> {
    let oc = code.op_code();
    Some(match oc.op_kind(n) {
        K::imm8 => {
            if n > 0 && matches!(oc.op_kind(n - 1), K::imm8 | K::imm16) {
                OpKind::Immediate8_2nd
            } else {
                OpKind::Immediate8
            }
        }
        K::imm8_const_1 => OpKind::Immediate8,
        K::imm8sex16 => OpKind::Immediate8to16,
        K::imm8sex32 => OpKind::Immediate8to32,
        K::imm8sex64 => OpKind::Immediate8to64,
        K::imm16 => OpKind::Immediate16,
        K::imm32 => OpKind::Immediate32,
        K::imm32sex64 => OpKind::Immediate32to64,
        K::imm64 => OpKind::Immediate64,
        _ => return None,
    })
}

pub(super) fn build(code: Code, ops: &[Opnd]) -> Option<Instruction> {
    let mut i = super::case::bare(code);
    for (n, op) in ops.iter().enumerate() {
        let n = n as u32;
        match *op {
            Opnd::Reg(r) => {
                i.set_op_kind(n, OpKind::Register);
                i.set_op_register(n, r);
            }
            Opnd::Mem(m) => {
                i.set_op_kind(n, OpKind::Memory);
                i.set_memory_base(m.base);
                i.set_memory_index(m.index);
                i.set_memory_index_scale(m.scale);
                i.set_memory_displacement64(m.disp);
                i.set_memory_displ_size(m.displ_size);
                i.set_segment_prefix(m.seg);
            }
            Opnd::Imm(v) => {
                let k = imm_kind(code, n)?;
                i.set_op_kind(n, k);
                match k {
                    OpKind::Immediate8 => i.set_immediate8(v as u8),
                    OpKind::Immediate8_2nd => i.set_immediate8_2nd(v as u8),
                    OpKind::Immediate16 => i.set_immediate16(v as u16),
                    OpKind::Immediate32 => i.set_immediate32(v as u32),
                    OpKind::Immediate64 => i.set_immediate64(v),
                    OpKind::Immediate8to16 => i.set_immediate8to16(v as i8 as i16),
                    OpKind::Immediate8to32 => i.set_immediate8to32(v as i8 as i32),
                    OpKind::Immediate8to64 => i.set_immediate8to64(v as i8 as i64),
                    OpKind::Immediate32to64 => i.set_immediate32to64(v as i32 as i64),
                    _ => return None,
                }
            }
        }
    }
    Some(i)
}

/// `mov reg, imm` (full-width immediate forms; 64-bit via imm32 sign
/// extension unless `v` needs 64 bits).
pub(super) fn mov_reg_imm(r: Register, v: u64) -> Option<Instruction> {
    match r.size() {
        1 => build(Code::Mov_r8_imm8, &[Opnd::Reg(r), Opnd::Imm(v)]),
        2 => build(Code::Mov_r16_imm16, &[Opnd::Reg(r), Opnd::Imm(v)]),
        4 => build(Code::Mov_r32_imm32, &[Opnd::Reg(r), Opnd::Imm(v)]),
        _ => {
            if v as i64 == v as i32 as i64 {
                build(Code::Mov_rm64_imm32, &[Opnd::Reg(r), Opnd::Imm(v)])
            } else {
                build(Code::Mov_r64_imm64, &[Opnd::Reg(r), Opnd::Imm(v)])
            }
        }
    }
}

pub(super) fn mov_mem_imm(m: Mem, size: usize, v: u64) -> Option<Instruction> {
    let code = match size {
        1 => Code::Mov_rm8_imm8,
        2 => Code::Mov_rm16_imm16,
        4 => Code::Mov_rm32_imm32,
        _ => Code::Mov_rm64_imm32,
    };
    build(code, &[Opnd::Mem(m), Opnd::Imm(v)])
}

/// What the generator believes about the reserved registers.
#[derive(Clone, Debug)]
struct Model {
    rsp: u64,
    rbp: u64,
    rbx: u64,
    /// RBP values saved by ENTERs not yet undone by LEAVE.
    frames: Vec<u64>,
}

/// A case under construction.
struct Builder {
    /// The instruction being built is x87/MMX/SSE (see `gen_code`).
    fp_operand: bool,
    /// Alignment forced on the next memory operand (0: the default rule;
    /// 1: none, for the unaligned vector forms).
    align: u64,
    /// The case is complete (a transcendental was generated: it must be
    /// the last instruction).
    done: bool,
    /// Group (template) the next items belong to; `None` until its first
    /// item is pushed.
    group: Option<usize>,
    mode: Mode,
    bits: u32,
    items: Vec<Item>,
    flow: Flow,
    next_id: usize,
    tests: usize,
    model: Model,
    info: InstructionInfoFactory,
    /// Linear address the last memory operand was aimed at.
    last_target: u64,
    /// Bytes a template needs in the case's initial memory (address,
    /// bytes), e.g. a GDT copy.
    patches: Vec<(u64, Vec<u8>)>,
    /// System state the system-instruction templates track.
    sys: sys::SysModel,
}

impl Builder {
    fn stack_mask(&self) -> u64 {
        match self.mode {
            Mode::Real16 | Mode::Compat16Ring3 => 0xffff,
            Mode::Prot32Ring0 | Mode::Compat32Ring3 => 0xffff_ffff,
            _ => u64::MAX,
        }
    }

    /// Append an item if it is valid at this point.
    fn push_item(&mut self, mut item: Item) -> Result<usize, Invalid> {
        item.id = self.next_id;
        item.group = self.group.unwrap_or(item.id);
        if self.group.is_none() {
            self.group = Some(item.id);
        }
        self.flow.check(&item)?;
        self.flow.step(&item)?;
        let inc = item.instr.stack_pointer_increment();
        if inc != 0 && !matches!(item.instr.mnemonic(), Mnemonic::Enter | Mnemonic::Leave) {
            self.model.rsp = self.model.rsp.wrapping_add(inc as i64 as u64) & self.stack_mask();
        }
        self.next_id += 1;
        self.items.push(item);
        Ok(self.next_id - 1)
    }

    fn setup(&mut self, i: Option<Instruction>) -> bool {
        let Some(i) = i else { return false };
        let mut it = Item::new(0, i);
        it.setup = true;
        self.push_item(it).is_ok()
    }

    /// A `cmp` of two registers, defining all six arithmetic flags.
    fn definer(&mut self, rng: &mut Rng) -> bool {
        let poison = self.flow.peek(self.next_id).poison;
        let n = if self.bits == 64 { 16 } else { 8 };
        let ok: Vec<usize> = (0..n).filter(|k| poison & (1 << k) == 0).collect();
        let (Some(&a), Some(&b)) = (rng.pick(&ok), rng.pick(&ok)) else {
            return false;
        };
        let size = if self.bits == 16 { 2 } else { 4 };
        let i = build(
            Code::Cmp_rm32_r32,
            &[Opnd::Reg(reg_sized(a, 4)), Opnd::Reg(reg_sized(b, 4))],
        );
        let i = if size == 2 {
            build(
                Code::Cmp_rm16_r16,
                &[Opnd::Reg(reg_sized(a, 2)), Opnd::Reg(reg_sized(b, 2))],
            )
        } else {
            i
        };
        self.setup(i)
    }

    /// Append a test instruction, inserting a flag definer if it reads an
    /// undefined flag.
    fn push_test(&mut self, item: Item, rng: &mut Rng) -> bool {
        let mut probe = item.clone();
        probe.id = self.next_id;
        match self.flow.check(&probe) {
            Ok(()) => {}
            // Arithmetic flags: define them all with a CMP first. (x87
            // condition codes have no cheap definer: give up.)
            Err(Invalid::Flags(m)) if m & !ARITH == 0 => {
                if !self.definer(rng) {
                    return false;
                }
                probe.id = self.next_id;
                if self.flow.check(&probe).is_err() {
                    return false;
                }
            }
            Err(_) => return false,
        }
        if self.push_item(item).is_ok() {
            self.tests += 1;
            true
        } else {
            false
        }
    }

    /// Does `i` write a reserved register (other than RSP through a stack
    /// instruction)?
    fn writes_reserved(&mut self, i: &Instruction) -> bool {
        // ENTER/LEAVE/POPA change RBP/RBX in ways the stack template tracks.
        if matches!(
            i.mnemonic(),
            Mnemonic::Enter | Mnemonic::Leave | Mnemonic::Popa | Mnemonic::Popad
        ) {
            return false;
        }
        let explicit_rsp = (0..i.op_count()).any(|n| {
            i.op_kind(n) == OpKind::Register && gpr_full(i.op_register(n)) == Register::RSP
        });
        let stack = i.code().is_stack_instruction() || i.stack_pointer_increment() != 0;
        self.info.info(i).used_registers().iter().any(|u| {
            let w = matches!(
                u.access(),
                OpAccess::Write
                    | OpAccess::ReadWrite
                    | OpAccess::CondWrite
                    | OpAccess::ReadCondWrite
            );
            if !w {
                return false;
            }
            match gpr_full(u.register()) {
                Register::RBX | Register::RBP => true,
                Register::RSP => explicit_rsp || !stack,
                _ => false,
            }
        })
    }
}

/// Instructions without an oracle in `mode` on KVM-PVM, not generated
/// there: what the host kernel's emulator refuses in ring 0 and real mode,
/// and the software interrupts PVM turns into #UD in compatibility-mode
/// ring 3. From the census in docs/DIFFTEST.md.
pub fn kvm_refusals(mode: Mode) -> Vec<Code> {
    let mut v = Vec::new();
    match mode {
        Mode::Long64Ring3 => return v,
        // Compatibility mode is emulated too; what the emulator lacks
        // comes back as #UD there.
        Mode::Compat32Ring3 | Mode::Compat16Ring3 => {
            return vec![
                Code::Int_imm8,
                Code::Int3,
                Code::Int1,
                Code::Into,
                Code::Aaa,
                Code::Aas,
                Code::Daa,
                Code::Popcnt_r16_rm16,
                Code::Popcnt_r32_rm32,
            ];
        }
        _ => {}
    }
    v.extend([
        Code::Popcnt_r16_rm16,
        Code::Popcnt_r32_rm32,
        Code::Popcnt_r64_rm64,
        Code::Int1,
    ]);
    match mode {
        Mode::Long64Ring0 => v.extend([Code::Cmpxchg16b_m128, Code::Int3, Code::Int_imm8]),
        Mode::Prot32Ring0 => v.extend([
            Code::Aaa,
            Code::Aas,
            Code::Daa,
            Code::Int3,
            Code::Int_imm8,
            Code::Into,
        ]),
        _ => v.extend([Code::Aaa, Code::Aas, Code::Daa]),
    }
    v
}

/// The random generator for one mode.
pub struct Generator {
    mode: Mode,
    groups: Vec<Vec<Code>>,
    jcc: Vec<Code>,
    loops: Vec<Code>,
    jmp_call: Vec<Code>,
    /// Codes KVM refused in this mode (learned; no longer generated).
    banned: BTreeSet<Code>,
    /// Longest sequence of test instructions per case.
    pub max_len: usize,
    /// Also generate x87/MMX/SSE cases (a third of all cases).
    pub fp: bool,
    /// Also generate system instructions (`gen/sys.rs`).
    pub sys: bool,
    fp_groups: Vec<Vec<Code>>,
    /// Also generate x86-64-v2/v3 cases (`isa.rs`; 64-bit ring 3 only).
    pub isa: bool,
    /// Every random case an x86-64-v2/v3 case (when `isa`).
    pub isa_only: bool,
    isa_groups: Vec<Vec<Code>>,
}

/// Address-size choices for a memory operand.
fn addr_sizes(bits: u32) -> (u32, u32) {
    match bits {
        64 => (64, 32),
        32 => (32, 16),
        _ => (16, 32),
    }
}

impl Generator {
    pub fn new(mode: Mode) -> Self {
        let codes = |pred: &dyn Fn(Code) -> bool| -> Vec<Code> {
            Code::values()
                .filter(|c| pred(*c) && valid_in(*c, mode) && cpu_interp::dispatch::implemented(*c))
                .collect()
        };
        Generator {
            mode,
            groups: integer_groups(mode),
            jcc: codes(&|c| c.is_jcc_short_or_near()),
            loops: codes(&|c| c.is_loop() || c.is_loopcc() || c.is_jcx_short()),
            jmp_call: codes(&|c| c.is_jmp_short_or_near() || c.is_call_near()),
            banned: kvm_refusals(mode).into_iter().collect(),
            max_len: 8,
            // Only 64-bit ring 3 has an oracle for x87/SSE (see `fp`).
            fp: mode == Mode::Long64Ring3,
            sys: true,
            fp_groups: super::fp::fp_groups(mode, supported_kinds),
            isa: mode == Mode::Long64Ring3 && env::oracle_xcr0() & 6 == 6,
            isa_only: false,
            isa_groups: isa::isa_groups(mode),
        }
    }

    /// Stop generating `code` (KVM refused it in this mode).
    pub fn ban(&mut self, code: Code) {
        self.banned.insert(code);
    }

    pub fn banned(&self) -> &BTreeSet<Code> {
        &self.banned
    }

    /// Every code the generic generator may produce.
    pub fn pool(&self) -> Vec<Code> {
        self.groups.iter().flatten().copied().collect()
    }

    /// Initial state: random GPRs (edge-biased), random arithmetic flags
    /// and DF, the reserved registers pointing into the window and stack,
    /// random XMM registers, default MXCSR.
    pub fn init_state(&self, rng: &mut Rng) -> CpuState {
        let mut s = env::base_state(self.mode);
        let wide = self.mode.bits() == 64;
        for n in 0..16 {
            s.regs.gpr[n] = if wide {
                rng.edgy(64)
            } else if n < 8 {
                rng.edgy(32)
            } else {
                0
            };
        }
        s.regs.gpr[gpr::RBX] = rng.range(env::W_RW0, env::W_RW1 + 0xfff) & !rng.below(8);
        s.regs.gpr[gpr::RBP] = rng.range(env::W_RO, env::W_RW1 + 0xfff) & !rng.below(8);
        let jitter = rng.below(0x100) & if rng.chance(3, 4) { !7 } else { !0 };
        s.regs.gpr[gpr::RSP] = env::STACK_INIT + jitter;
        s.regs.rflags |= rng.next_u64() & (super::case::ARITH | (1 << 10));
        for x in s.fpu.xmm.iter_mut() {
            *x = u128::from(rng.edgy(64)) | (u128::from(rng.edgy(64)) << 64);
        }
        s
    }

    /// The random contents of the case area.
    pub fn init_area(&self, rng: &mut Rng) -> Vec<u8> {
        let mut a = vec![0u8; (env::SPACE - env::CASE_AREA) as usize];
        rng.fill(&mut a);
        // Some zero and all-ones runs in the window (edge values in memory).
        for _ in 0..rng.below(6) {
            let at = rng.below(a.len() as u64 - 64) as usize;
            let len = rng.range(1, 64) as usize;
            let v = if rng.bool() { 0 } else { 0xff };
            a[at..at + len].fill(v);
        }
        a
    }

    /// A random case with `origin` as its label.
    pub fn case(&mut self, rng: &mut Rng, origin: String) -> Case {
        for _ in 0..64 {
            let isa_case =
                self.isa && !self.isa_groups.is_empty() && (self.isa_only || rng.chance(1, 3));
            let fp_case = !isa_case && self.fp && !self.fp_groups.is_empty() && rng.chance(1, 2);
            let mut init = self.init_state(rng);
            let mut area = self.init_area(rng);
            if fp_case {
                super::fp::randomize(rng, &mut init);
                super::fp::sprinkle(rng, &mut area);
            }
            if isa_case {
                isa::randomize(rng, &mut init);
                super::fp::sprinkle(rng, &mut area);
            }
            let (items, patches) = self.sequence(rng, &init, fp_case, isa_case);
            if !items.iter().any(|it| !it.setup) {
                continue;
            }
            for (at, bytes) in patches {
                let off = (at - env::CASE_AREA) as usize;
                area[off..off + bytes.len()].copy_from_slice(&bytes);
            }
            let case = Case {
                mode: self.mode,
                init,
                area,
                items,
                origin: origin.clone(),
            };
            if super::case::analyze(self.mode, &case.items).is_ok()
                && super::case::assemble(self.mode, &case.items).is_ok()
            {
                return case;
            }
        }
        // Never an empty case: after 64 failed attempts (not seen in
        // practice) one comparison of two registers is still a test.
        let mut items = Vec::new();
        if let Some(i) = build(
            Code::Cmp_rm16_r16,
            &[Opnd::Reg(Register::AX), Opnd::Reg(Register::CX)],
        ) {
            items.push(Item::new(0, i));
        }
        Case {
            mode: self.mode,
            init: env::base_state(self.mode),
            area: self.init_area(rng),
            items,
            origin,
        }
    }

    fn sequence(
        &mut self,
        rng: &mut Rng,
        init: &CpuState,
        fp_case: bool,
        isa_case: bool,
    ) -> (Vec<Item>, Vec<(u64, Vec<u8>)>) {
        let mut b = Builder {
            fp_operand: false,
            align: 0,
            done: false,
            group: None,
            mode: self.mode,
            bits: self.mode.bits(),
            items: Vec::new(),
            flow: Flow::new(self.mode),
            next_id: 0,
            tests: 0,
            model: Model {
                rsp: init.regs.gpr[gpr::RSP],
                rbp: init.regs.gpr[gpr::RBP],
                rbx: init.regs.gpr[gpr::RBX],
                frames: Vec::new(),
            },
            info: InstructionInfoFactory::new(),
            last_target: 0,
            patches: Vec::new(),
            sys: sys::SysModel::default(),
        };
        let want = rng.range(1, self.max_len as u64) as usize;
        let mut attempts = 0;
        while b.tests < want && attempts < want * 20 && !b.done {
            attempts += 1;
            b.group = None;
            if fp_case && rng.chance(3, 4) {
                self.gen_fp(&mut b, rng);
                continue;
            }
            if isa_case && rng.chance(3, 4) {
                b.group = None;
                self.gen_isa(&mut b, rng);
                b.fp_operand = false;
                continue;
            }
            let r = rng.below(100);
            let _ = match r {
                0..=64 => self.gen_generic(&mut b, rng),
                65..=72 => self.gen_string(&mut b, rng),
                73..=79 => self.gen_branch(&mut b, rng),
                80..=88 => self.gen_stack(&mut b, rng),
                89..=91 => self.gen_io(&mut b, rng),
                92..=93 => self.gen_fault(&mut b, rng),
                94..=97 if self.sys => self.gen_system(&mut b, rng),
                _ => self.gen_generic(&mut b, rng),
            };
        }
        retarget_to_groups(&mut b.items);
        (b.items, b.patches)
    }

    // ---- operands -----------------------------------------------------

    /// A linear address of `size` bytes for a memory operand.
    fn pick_target(&self, rng: &mut Rng, size: u64, fp: bool) -> u64 {
        let size = size.max(1);
        let straddle_ok = true;
        let _ = fp;
        let span = |rng: &mut Rng, lo: u64, hi: u64| rng.range(lo, hi.saturating_sub(size).max(lo));
        let t = match rng.below(100) {
            0..=64 => span(rng, env::W_RW0, env::W_RW1 + 0x1000),
            65..=69 => span(rng, env::W_RO, env::W_RO + 0x1000),
            70..=74 => span(rng, env::W_SUP, env::W_SUP + 0x1000),
            75..=79 => span(rng, env::STACK, env::STACK + 0x1000),
            // Straddling into the not-present page; KVM's emulator writes
            // the present part first (the CPU does not), so with an
            // emulator oracle the access stays on one side.
            80..=86 if self.mode.oracle() == super::Oracle::Emulator || !straddle_ok => {
                if rng.bool() {
                    env::UNMAPPED - size
                } else {
                    env::UNMAPPED + rng.below(8)
                }
            }
            80..=86 => env::UNMAPPED - size + rng.range(0, size + 8),
            87..=89 => env::W_RW1 - rng.range(0, size) + rng.below(2),
            90..=92 => env::UNMAPPED + rng.below(0x1000),
            93..=95 => rng.below(0x10) * 0x1000 + rng.below(0x1000),
            _ => 0x10000 - rng.range(1, size + 2),
        };
        if self.mode.oracle() == super::Oracle::Emulator && !emulator_straddle_ok(t, size) {
            // Keep it on the first page (see `emulator_straddle_ok`).
            (t & !0xfff) + 0x1000 - size
        } else {
            t
        }
    }

    /// Pick an address size, a form and a segment for a memory operand of
    /// `size` bytes aimed at a random target; registers it needs are set
    /// up with `mov` items first.
    fn mem_operand(&self, b: &mut Builder, rng: &mut Rng, size: u64) -> Mem {
        let (def, alt) = addr_sizes(b.bits);
        let asize = if rng.chance(1, 6) { alt } else { def };
        let amask: u64 = match asize {
            16 => 0xffff,
            32 => 0xffff_ffff,
            _ => u64::MAX,
        };
        let mut target = self.pick_target(rng, size, b.fp_operand);
        b.last_target = target;
        // Under KVM-PVM a #GP raised by an x87/SSE instruction in ring 3
        // reaches the guest as #UD (PVM's emulator does not know them):
        // keep their operands aligned and canonical.
        if b.align > 0 {
            target &= !(b.align - 1);
        } else if size >= 16 && (b.fp_operand || rng.chance(3, 4)) {
            target &= !15;
        }
        // Segment override.
        let segs = [
            Register::ES,
            Register::CS,
            Register::SS,
            Register::DS,
            Register::FS,
            Register::GS,
        ];
        let mut seg = if rng.chance(1, 6) {
            *rng.pick(&segs).unwrap_or(&Register::None)
        } else {
            Register::None
        };
        // KVM's emulator ignores a CS override's write protection in
        // compatibility mode (the SDM: #GP): no oracle there.
        if seg == Register::CS && matches!(self.mode, Mode::Compat32Ring3 | Mode::Compat16Ring3) {
            seg = Register::DS;
        }
        let mut m = Mem {
            base: Register::None,
            index: Register::None,
            scale: 1,
            disp: 0,
            displ_size: 0,
            seg,
        };
        // Base/index form and their values.
        let mut base_val = 0u64;
        let mut index_val = 0u64;
        let mut ss_default = false;
        let rip_relative = asize == 64 && rng.chance(1, 10);
        if asize == 16 {
            let (base, bval) = match rng.below(4) {
                0 => (Register::None, 0),
                1 => (Register::BP, b.model.rbp & 0xffff),
                _ => (Register::BX, b.model.rbx & 0xffff),
            };
            m.base = base;
            base_val = bval;
            ss_default = base == Register::BP;
            if rng.chance(1, 3) {
                let idx = if rng.bool() {
                    Register::SI
                } else {
                    Register::DI
                };
                let v = rng.below(0x80);
                if b.setup(mov_reg_imm(idx, v)) {
                    m.index = idx;
                    index_val = v;
                }
            }
            if m.base == Register::None && m.index != Register::None {
                // [si+disp] / [di+disp]: the index is the base.
                m.base = m.index;
                base_val = index_val;
                m.index = Register::None;
                index_val = 0;
            }
        } else if rip_relative {
            m.base = Register::RIP;
        } else {
            let regsz = if asize == 64 { 8 } else { 4 };
            if b.bits == 64 && !b.fp_operand && rng.chance(1, 30) {
                // Non-canonical address through a scratch base register.
                let n = *rng
                    .pick(&[0usize, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])
                    .unwrap_or(&0);
                let r = reg_sized(n, 8);
                // Sometimes just below 2^47, so that the access runs from
                // the last canonical page (not present) into the hole.
                let (v, disp) = if rng.chance(1, 4) {
                    (0x7fff_ffff_f000 + 0x1000 - rng.range(1, 9), rng.below(8))
                } else {
                    (
                        (0x8000_0000_0000u64 << rng.below(16)) | rng.below(0x1000),
                        rng.below(0x40),
                    )
                };
                if asize == 64 && b.setup(mov_reg_imm(r, v)) {
                    m.base = r;
                    m.displ_size = 1;
                    m.disp = disp;
                    return m;
                }
            }
            // An FP operand must stay aligned (above), and the model's RSP
            // and RBP are only right on the fall-through path: a forward
            // branch may skip a CALL, PUSH or ENTER. Only RBX (never
            // written) bases FP operands.
            let pick = if b.fp_operand && rng.below(8) != 0 {
                4
            } else if b.fp_operand {
                0
            } else {
                rng.below(8)
            };
            match pick {
                0 => {}
                1 | 2 => {
                    m.base = reg_sized(gpr::RBP, regsz);
                    base_val = b.model.rbp & amask;
                    ss_default = true;
                }
                3 => {
                    m.base = reg_sized(gpr::RSP, regsz);
                    base_val = b.model.rsp & amask;
                    ss_default = true;
                }
                _ => {
                    m.base = reg_sized(gpr::RBX, regsz);
                    base_val = b.model.rbx & amask;
                }
            }
            if rng.chance(1, 3) {
                let cands = [0usize, 1, 2, 6, 7]
                    .iter()
                    .copied()
                    .chain(if b.bits == 64 { 8..16 } else { 0..0 })
                    .collect::<Vec<_>>();
                let n = *rng.pick(&cands).unwrap_or(&0);
                let r = reg_sized(n, regsz);
                let v = rng.below(0x100);
                if b.setup(mov_reg_imm(reg_sized(n, 4), v)) {
                    m.index = r;
                    m.scale = 1 << rng.below(4);
                    index_val = v;
                }
            }
        }
        let seg = m.seg;
        let eff_seg = if seg != Register::None {
            seg
        } else if ss_default {
            Register::SS
        } else {
            Register::DS
        };
        let sbase = env::seg_base(self.mode, eff_seg as usize - Register::ES as usize);
        let offset = target.wrapping_sub(sbase) & amask;
        if m.base == Register::RIP {
            // iced takes the absolute target and encodes it RIP-relative.
            m.disp = target;
            m.displ_size = 8;
            m.seg = seg;
            return m;
        }
        let disp = offset
            .wrapping_sub(base_val)
            .wrapping_sub(index_val.wrapping_mul(u64::from(m.scale)))
            & amask;
        match asize {
            16 => {
                m.disp = disp & 0xffff;
                m.displ_size = if m.disp == 0 && m.base != Register::None && m.base != Register::BP
                {
                    0
                } else {
                    2
                };
            }
            32 => {
                m.disp = disp & 0xffff_ffff;
                let small = (m.disp as u32 as i32) >= -128 && (m.disp as u32 as i32) < 128;
                m.displ_size = if m.base == Register::None {
                    4
                } else if small && rng.chance(3, 4) {
                    1
                } else {
                    4
                };
            }
            _ => {
                m.disp = disp as i32 as i64 as u64;
                m.displ_size = if m.base == Register::None {
                    8
                } else if (m.disp as i64) >= -128 && (m.disp as i64) < 128 && rng.chance(3, 4) {
                    1
                } else {
                    8
                };
            }
        }
        m
    }

    /// A register of `size` bytes; destinations avoid the reserved ones.
    fn pick_reg(&self, rng: &mut Rng, bits: u32, size: usize, dest: bool) -> Register {
        let regs = regs_of_size(bits, size);
        for _ in 0..16 {
            let r = *rng.pick(&regs).unwrap_or(&Register::AL);
            if dest && reserved(r) {
                continue;
            }
            return r;
        }
        regs[0]
    }

    fn imm(&self, rng: &mut Rng, kind: K) -> u64 {
        match kind {
            K::imm8_const_1 => 1,
            K::imm8sex16 | K::imm8sex32 | K::imm8sex64 => rng.edgy(8) as u8 as i8 as i64 as u64,
            K::imm8 => rng.edgy(8),
            K::imm16 => rng.edgy(16),
            K::imm32 | K::imm32sex64 => rng.edgy(32),
            _ => rng.edgy(64),
        }
    }

    // ---- templates --------------------------------------------------------

    /// One instruction of a random code from the pool.
    fn gen_generic(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let Some(group) = rng.pick(&self.groups) else {
            return false;
        };
        let Some(&code) = rng.pick(group) else {
            return false;
        };
        if self.banned.contains(&code) {
            return false;
        }
        self.gen_code(b, rng, code)
    }

    /// One x87/MMX/SSE instruction.
    fn gen_fp(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let Some(group) = rng.pick(&self.fp_groups) else {
            return false;
        };
        let Some(&code) = rng.pick(group) else {
            return false;
        };
        // F2XM1 and FYL2XP1 are defined only on part of the line (SDM:
        // "undefined" outside -1..1, resp. ±(1 - √2/2)): load an operand
        // from there first.
        let lim = match code.mnemonic() {
            Mnemonic::F2xm1 => Some(1.0f32),
            Mnemonic::Fyl2xp1 => Some(0.2928f32),
            _ => None,
        };
        if let Some(lim) = lim {
            let v = match rng.below(8) {
                0 => lim,
                1 => -lim,
                2 => 0.0,
                _ => (rng.below(2001) as f32 / 1000.0 - 1.0) * lim,
            };
            let t = (env::W_RW0 + rng.below(0xff0)) & !3;
            let m = self.abs_mem(b, t);
            if !b.setup(mov_mem_imm(m, 4, u64::from(v.to_bits())))
                || !b.setup(build(Code::Fld_m32fp, &[Opnd::Mem(m)]))
            {
                return false;
            }
        }
        let ok = self.gen_code(b, rng, code);
        if ok && super::fp::is_transcendental(code.mnemonic()) {
            b.done = true;
        }
        ok
    }

    fn gen_code(&mut self, b: &mut Builder, rng: &mut Rng, code: Code) -> bool {
        b.fp_operand = super::fp::is_fp(code);
        let oc = code.op_code();
        let m = code.mnemonic();
        let msize = oc.memory_size().size() as u64;
        let mut ops: Vec<Opnd> = Vec::new();
        let mut mem_idx = None;
        for n in 0..oc.op_count() {
            let k = oc.op_kind(n);
            let dest = n == 0
                && !matches!(
                    m,
                    Mnemonic::Cmp | Mnemonic::Test | Mnemonic::Bt | Mnemonic::Push
                );
            let reg_or_mem = |size: usize,
                              this: &Self,
                              rng: &mut Rng,
                              b: &mut Builder,
                              mi: &mut Option<usize>| {
                if rng.chance(2, 5) && mi.is_none() {
                    *mi = Some(n as usize);
                    Opnd::Mem(this.mem_operand(b, rng, msize.max(size as u64)))
                } else {
                    Opnd::Reg(this.pick_reg(rng, b.bits, size, dest))
                }
            };
            let op = match k {
                K::r8_or_mem => reg_or_mem(1, self, rng, b, &mut mem_idx),
                K::r16_or_mem => reg_or_mem(2, self, rng, b, &mut mem_idx),
                K::r32_or_mem => reg_or_mem(4, self, rng, b, &mut mem_idx),
                K::r64_or_mem => reg_or_mem(8, self, rng, b, &mut mem_idx),
                K::r8_reg | K::r8_opcode => Opnd::Reg(self.pick_reg(rng, b.bits, 1, dest)),
                K::r16_reg | K::r16_rm | K::r16_opcode => {
                    Opnd::Reg(self.pick_reg(rng, b.bits, 2, dest))
                }
                K::r32_reg | K::r32_rm | K::r32_opcode => {
                    Opnd::Reg(self.pick_reg(rng, b.bits, 4, dest))
                }
                K::r64_reg | K::r64_rm | K::r64_opcode => {
                    Opnd::Reg(self.pick_reg(rng, b.bits, 8, dest))
                }
                K::mem => {
                    mem_idx = Some(n as usize);
                    Opnd::Mem(self.mem_operand(b, rng, msize))
                }
                K::mem_offs => {
                    let asize = b.bits;
                    let t = self.pick_target(rng, msize, b.fp_operand);
                    mem_idx = Some(n as usize);
                    Opnd::Mem(Mem {
                        base: Register::None,
                        index: Register::None,
                        scale: 1,
                        disp: t,
                        displ_size: asize / 8,
                        seg: Register::None,
                    })
                }
                K::xmm_reg | K::xmm_rm => Opnd::Reg(xmm(rng, b.bits)),
                K::mm_reg | K::mm_rm => Opnd::Reg(mm(rng)),
                K::xmm_or_mem | K::mm_or_mem => {
                    if rng.chance(2, 5) && mem_idx.is_none() {
                        mem_idx = Some(n as usize);
                        Opnd::Mem(self.mem_operand(b, rng, msize))
                    } else if k == K::xmm_or_mem {
                        Opnd::Reg(xmm(rng, b.bits))
                    } else {
                        Opnd::Reg(mm(rng))
                    }
                }
                K::st0 => Opnd::Reg(Register::ST0),
                K::sti_opcode => Opnd::Reg(st(rng)),
                K::al => Opnd::Reg(Register::AL),
                K::cl => Opnd::Reg(Register::CL),
                K::ax => Opnd::Reg(Register::AX),
                K::dx => Opnd::Reg(Register::DX),
                K::eax => Opnd::Reg(Register::EAX),
                K::rax => Opnd::Reg(Register::RAX),
                K::es => Opnd::Reg(Register::ES),
                K::cs => Opnd::Reg(Register::CS),
                K::ss => Opnd::Reg(Register::SS),
                K::ds => Opnd::Reg(Register::DS),
                K::fs => Opnd::Reg(Register::FS),
                K::gs => Opnd::Reg(Register::GS),
                K::seg_rBX_al => {
                    // XLAT: [rBX + AL]; the operand is implicit.
                    let mut i = super::case::bare(code);
                    let (kind, base) = match b.bits {
                        64 => (OpKind::Memory, Register::RBX),
                        32 => (OpKind::Memory, Register::EBX),
                        _ => (OpKind::Memory, Register::BX),
                    };
                    i.set_op0_kind(kind);
                    i.set_memory_base(base);
                    i.set_memory_index(Register::AL);
                    return self.finish(b, rng, i, None);
                }
                _ => {
                    let kind = k;
                    if let Some(v) = match kind {
                        K::imm8
                            if matches!(m, Mnemonic::Shld | Mnemonic::Shrd)
                                && rng.chance(9, 10) =>
                        {
                            Some(if oc.operand_size() == 16 {
                                rng.below(17)
                            } else {
                                rng.edgy(8)
                            })
                        }
                        K::imm8 if is_shift(m) => Some(shift_count(rng)),
                        _ => None,
                    } {
                        Opnd::Imm(v)
                    } else {
                        Opnd::Imm(self.imm(rng, kind))
                    }
                }
            };
            ops.push(op);
        }
        // Operand setups that must come right before the instruction.
        self.pre_setup(b, rng, code, &mut ops);
        let Some(mut i) = build(code, &ops) else {
            return false;
        };
        if oc.can_use_lock_prefix() && mem_idx == Some(0) && rng.chance(1, 2) {
            i.set_has_lock_prefix(true);
        }
        self.finish(b, rng, i, None)
    }

    /// Is `i` something KVM's emulator gets wrong in a way settled in
    /// docs/DIFFTEST.md (no oracle in emulator modes)?
    fn emulator_erratum(&self, i: &Instruction) -> bool {
        if self.mode.oracle() != super::Oracle::Emulator {
            return false;
        }
        // CMPXCHG r32 that fails writes the register destination back
        // zero-extended in KVM's emulator; the CPU leaves it alone.
        let cmpxchg = i.mnemonic() == Mnemonic::Cmpxchg
            && i.op0_kind() == OpKind::Register
            && i.op0_register().size() == 4;
        // MOVSXD r16, m16 reads 4 bytes in KVM's emulator (a fault on the
        // bytes after the operand); the CPU reads 2.
        let movsxd16 = i.code() == Code::Movsxd_r16_rm16 && i.op1_kind() == OpKind::Memory;
        cmpxchg || movsxd16
    }

    /// Validate `i` and append it as a test item.
    fn finish(
        &mut self,
        b: &mut Builder,
        rng: &mut Rng,
        i: Instruction,
        target: Option<usize>,
    ) -> bool {
        let mut enc = Encoder::new(b.bits);
        if enc.encode(&i, env::CODE).is_err() || self.emulator_erratum(&i) {
            return false;
        }
        if b.writes_reserved(&i) {
            return false;
        }
        let mut it = Item::new(0, i);
        it.target = target;
        b.push_test(it, rng)
    }

    /// Setups tied to particular mnemonics: shift counts in CL, non-zero
    /// BSF/BSR sources, divisors and dividends, BT bit offsets.
    fn pre_setup(&self, b: &mut Builder, rng: &mut Rng, code: Code, ops: &mut [Opnd]) {
        let m = code.mnemonic();
        let oc = code.op_code();
        let uses_cl = oc.op_kinds().contains(&K::cl);
        if uses_cl && is_shift(m) && rng.chance(9, 10) {
            let c = if matches!(m, Mnemonic::Shld | Mnemonic::Shrd) && oc.operand_size() == 16 {
                rng.below(17)
            } else {
                shift_count(rng)
            };
            b.setup(mov_reg_imm(Register::CL, c));
        }
        match m {
            Mnemonic::Bsf | Mnemonic::Bsr | Mnemonic::Popcnt => {
                let v = if rng.chance(4, 5) {
                    loop {
                        let v = rng.edgy(64);
                        if v & 0xffff != 0 {
                            break v;
                        }
                    }
                } else {
                    0
                };
                match ops.get(1) {
                    Some(Opnd::Reg(r)) if !reserved(*r) => {
                        b.setup(mov_reg_imm(*r, v));
                    }
                    Some(Opnd::Mem(mm)) => {
                        b.setup(mov_mem_imm(*mm, oc.memory_size().size(), v));
                    }
                    _ => {}
                }
            }
            Mnemonic::Div | Mnemonic::Idiv if rng.chance(3, 5) => {
                let size = match ops.first() {
                    Some(Opnd::Reg(r)) => r.size(),
                    _ => oc.memory_size().size(),
                };
                let v = loop {
                    let v = rng.edgy(64);
                    if v & 0xff != 0 {
                        break v;
                    }
                };
                match ops.first() {
                    Some(Opnd::Reg(r)) if !reserved(*r) => {
                        b.setup(mov_reg_imm(*r, v));
                    }
                    Some(Opnd::Mem(mm)) => {
                        b.setup(mov_mem_imm(*mm, size, v));
                    }
                    _ => {}
                }
                let hi = match (m, size) {
                    (Mnemonic::Div, 1) => mov_reg_imm(Register::AH, 0),
                    (Mnemonic::Div, 2) => mov_reg_imm(Register::DX, 0),
                    (Mnemonic::Div, 4) => mov_reg_imm(Register::EDX, 0),
                    (Mnemonic::Div, _) => mov_reg_imm(Register::RDX, 0),
                    (_, 1) => Some(super::case::bare(Code::Cbw)),
                    (_, 2) => Some(super::case::bare(Code::Cwd)),
                    (_, 4) => Some(super::case::bare(Code::Cdq)),
                    _ => Some(super::case::bare(Code::Cqo)),
                };
                b.setup(hi);
            }
            // LDMXCSR of a value with reserved bits raises #GP, which
            // KVM-PVM delivers as #UD in ring 3: load a valid MXCSR.
            Mnemonic::Ldmxcsr => {
                if let Some(Opnd::Mem(mm)) = ops.first() {
                    let v = 0x1f80
                        | (rng.below(4) << 13)
                        | (rng.below(0x40) & if rng.bool() { 0x3f } else { 0 });
                    b.setup(mov_mem_imm(*mm, 4, v));
                }
            }
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc => {
                if let (Some(Opnd::Mem(_)), Some(Opnd::Reg(r))) = (ops.first(), ops.get(1)) {
                    let mut r = *r;
                    if reserved(r) {
                        r = reg_sized(gpr::RSI, r.size());
                        ops[1] = Opnd::Reg(r);
                    }
                    let size = r.size() as u64;
                    let mut v = (rng.below(512) as i64 - 256) as u64;
                    // With an emulator oracle the bit offset must not move
                    // the access across a page boundary (see
                    // `emulator_straddle_ok`).
                    if self.mode.oracle() == super::Oracle::Emulator {
                        let delta = ((v as i64) >> (3 + size.trailing_zeros())) * size as i64;
                        let addr = b.last_target.wrapping_add(delta as u64);
                        if !emulator_straddle_ok(addr, size) {
                            v = 0;
                        }
                    }
                    b.setup(mov_reg_imm(r, v));
                }
            }
            _ => {}
        }
    }

    /// A string instruction with REP prefixes and set-up pointers.
    fn gen_string(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let (def, alt) = addr_sizes(b.bits);
        let asize = if rng.chance(1, 5) { alt } else { def };
        let sizes: &[usize] = if b.bits == 64 {
            &[1, 2, 4, 8]
        } else {
            &[1, 2, 4]
        };
        let size = *rng.pick(sizes).unwrap_or(&1);
        let kind = rng.below(5);
        // (No source override for CMPS with an emulator oracle: with the
        // default DS the source stays where it cannot fault, see below.)
        let emulated_cmps = kind == 3 && self.mode.oracle() == super::Oracle::Emulator;
        let seg = if rng.chance(1, 6) && !emulated_cmps {
            *rng.pick(&[
                Register::ES,
                Register::CS,
                Register::SS,
                Register::DS,
                Register::FS,
                Register::GS,
            ])
            .unwrap_or(&Register::None)
        } else {
            Register::None
        };
        let rep = match kind {
            // movs, stos, lods: REP; cmps, scas: REPE/REPNE.
            0..=2 => rng.chance(2, 3) as u8,
            _ => rng.below(3) as u8,
        };
        let i = match (kind, size) {
            (0, 1) => Instruction::with_movsb(asize, seg, rep_kind(rep)),
            (0, 2) => Instruction::with_movsw(asize, seg, rep_kind(rep)),
            (0, 4) => Instruction::with_movsd(asize, seg, rep_kind(rep)),
            (0, _) => Instruction::with_movsq(asize, seg, rep_kind(rep)),
            (1, 1) => Instruction::with_stosb(asize, rep_kind(rep)),
            (1, 2) => Instruction::with_stosw(asize, rep_kind(rep)),
            (1, 4) => Instruction::with_stosd(asize, rep_kind(rep)),
            (1, _) => Instruction::with_stosq(asize, rep_kind(rep)),
            (2, 1) => Instruction::with_lodsb(asize, seg, rep_kind(rep)),
            (2, 2) => Instruction::with_lodsw(asize, seg, rep_kind(rep)),
            (2, 4) => Instruction::with_lodsd(asize, seg, rep_kind(rep)),
            (2, _) => Instruction::with_lodsq(asize, seg, rep_kind(rep)),
            (3, 1) => Instruction::with_cmpsb(asize, seg, rep_kind(rep)),
            (3, 2) => Instruction::with_cmpsw(asize, seg, rep_kind(rep)),
            (3, 4) => Instruction::with_cmpsd(asize, seg, rep_kind(rep)),
            (3, _) => Instruction::with_cmpsq(asize, seg, rep_kind(rep)),
            (_, 1) => Instruction::with_scasb(asize, rep_kind(rep)),
            (_, 2) => Instruction::with_scasw(asize, rep_kind(rep)),
            (_, 4) => Instruction::with_scasd(asize, rep_kind(rep)),
            (_, _) => Instruction::with_scasq(asize, rep_kind(rep)),
        };
        let Ok(i) = i else { return false };
        if self.banned.contains(&i.code()) || !cpu_interp::dispatch::implemented(i.code()) {
            return false;
        }
        // Direction.
        if rng.chance(1, 2) {
            let d = super::case::bare(if rng.bool() { Code::Cld } else { Code::Std });
            b.setup(Some(d));
        }
        // Pointers and count (32-bit moves zero-extend; 16-bit merge).
        let regsz = if asize == 16 { 2 } else { 4 };
        let count = match rng.below(8) {
            0 => 0,
            1 => 1,
            2 => rng.range(2, 8),
            3 => 16,
            4 => rng.range(17, 300),
            _ => rng.range(1, 40),
        };
        let near_edge = |rng: &mut Rng| -> u64 {
            match rng.below(6) {
                0 => env::UNMAPPED - rng.range(1, 64),
                1 => env::W_SUP + rng.below(0x1000),
                2 => env::W_RO + rng.below(0x1000),
                3 => env::W_RW1 + rng.range(0, 16) - 8,
                _ => rng.range(env::W_RW0, env::W_RW1 + 0xfc0),
            }
        };
        // KVM's emulator makes CMPS access DS:[rSI] before ES:[rDI], the
        // CPU the other way round: with an emulator oracle, keep rSI where
        // it cannot fault so the order does not show.
        let cmps_emulated = kind == 3 && self.mode.oracle() == super::Oracle::Emulator;
        let rsi = if cmps_emulated {
            rng.range(0xd900, 0xe600)
        } else {
            near_edge(rng)
        };
        let mut rdi = near_edge(rng);
        let mut rsi = rsi;
        if self.mode.oracle() == super::Oracle::Emulator {
            // Elements never straddle a page there (see `pick_target`).
            rdi &= !(size as u64 - 1);
            rsi &= !(size as u64 - 1);
        }
        b.setup(mov_reg_imm(reg_sized(gpr::RSI, regsz), rsi));
        b.setup(mov_reg_imm(reg_sized(gpr::RDI, regsz), rdi));
        if rep != 0 || rng.chance(1, 4) {
            b.setup(mov_reg_imm(reg_sized(gpr::RCX, regsz), count));
        }
        self.finish(b, rng, i, None)
    }

    /// Forward Jcc / JMP / LOOP / JCXZ / CALL / RET / indirect JMP and CALL.
    fn gen_branch(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let bits = b.bits;
        let skip = rng.range(0, 3) as usize;
        let target = b.next_id + 1 + skip;
        match rng.below(8) {
            0..=2 => {
                let Some(&code) = rng.pick(&self.jcc) else {
                    return false;
                };
                let mut i = super::case::bare(code);
                i.set_op0_kind(near_kind(code));
                self.finish(b, rng, i, Some(target))
            }
            3 => {
                let Some(&code) = rng.pick(&self.loops) else {
                    return false;
                };
                if rng.chance(1, 2) {
                    b.setup(mov_reg_imm(Register::ECX, rng.below(3)));
                }
                let mut i = super::case::bare(code);
                i.set_op0_kind(near_kind(code));
                // Short branches: keep the skipped part tiny.
                let t = b.next_id + 1 + skip.min(1);
                self.finish(b, rng, i, Some(t))
            }
            4 => {
                let Some(&code) = rng.pick(&self.jmp_call) else {
                    return false;
                };
                let mut i = super::case::bare(code);
                i.set_op0_kind(near_kind(code));
                self.finish(b, rng, i, Some(target))
            }
            5 => {
                // push label; ret [imm16]
                let (push, ret, ret_imm) = match bits {
                    64 => (Code::Pushq_imm32, Code::Retnq, Code::Retnq_imm16),
                    32 => (Code::Pushd_imm32, Code::Retnd, Code::Retnd_imm16),
                    _ => (Code::Push_imm16, Code::Retnw, Code::Retnw_imm16),
                };
                let target = b.next_id + 2 + skip;
                let Some(p) = build(push, &[Opnd::Imm(0)]) else {
                    return false;
                };
                let mut it = Item::new(0, p);
                it.setup = true;
                it.imm_target = Some(target);
                if b.push_item(it).is_err() {
                    return false;
                }
                let r = if rng.chance(1, 3) {
                    build(ret_imm, &[Opnd::Imm(rng.below(4) * 2)])
                } else {
                    Some(super::case::bare(ret))
                };
                let Some(r) = r else { return false };
                self.finish(b, rng, r, Some(target))
            }
            _ => {
                // mov reg/mem, label; jmp/call reg/mem
                let call = rng.bool();
                let (code_r, code_m, size) = match (bits, call) {
                    (64, false) => (Code::Jmp_rm64, Code::Jmp_rm64, 8),
                    (64, true) => (Code::Call_rm64, Code::Call_rm64, 8),
                    (32, false) => (Code::Jmp_rm32, Code::Jmp_rm32, 4),
                    (32, true) => (Code::Call_rm32, Code::Call_rm32, 4),
                    (_, false) => (Code::Jmp_rm16, Code::Jmp_rm16, 2),
                    (_, true) => (Code::Call_rm16, Code::Call_rm16, 2),
                };
                let target = b.next_id + 2 + skip;
                if rng.bool() {
                    let n = *rng.pick(&[0usize, 1, 2, 6, 7]).unwrap_or(&0);
                    let r = reg_sized(n, size);
                    let setup = if size == 8 {
                        mov_reg_imm(reg_sized(n, 4), 0)
                    } else {
                        mov_reg_imm(r, 0)
                    };
                    let Some(s) = setup else { return false };
                    let mut it = Item::new(0, s);
                    it.setup = true;
                    it.imm_target = Some(target);
                    if b.push_item(it).is_err() {
                        return false;
                    }
                    let Some(j) = build(code_r, &[Opnd::Reg(r)]) else {
                        return false;
                    };
                    self.finish(b, rng, j, Some(target))
                } else {
                    // Memory operand in a writable window page.
                    let t = rng.range(env::W_RW0, env::W_RW1 + 0xff0);
                    let m = self.abs_mem(b, t);
                    let Some(s) = mov_mem_imm(m, size, 0) else {
                        return false;
                    };
                    let mut it = Item::new(0, s);
                    it.setup = true;
                    it.imm_target = Some(target);
                    if b.push_item(it).is_err() {
                        return false;
                    }
                    let Some(j) = build(code_m, &[Opnd::Mem(m)]) else {
                        return false;
                    };
                    self.finish(b, rng, j, Some(target))
                }
            }
        }
    }

    /// `[rbx + disp]` addressing linear address `t` (DS, default size).
    fn abs_mem(&self, b: &Builder, t: u64) -> Mem {
        let (base, mask) = match b.bits {
            64 => (Register::RBX, u64::MAX),
            32 => (Register::EBX, 0xffff_ffff),
            _ => (Register::BX, 0xffff),
        };
        let off = t.wrapping_sub(env::seg_base(self.mode, 3));
        let disp = off.wrapping_sub(b.model.rbx) & mask;
        Mem {
            base,
            index: Register::None,
            scale: 1,
            disp: if b.bits == 64 {
                disp as i32 as i64 as u64
            } else {
                disp
            },
            displ_size: match b.bits {
                64 => 8,
                32 => 4,
                _ => 2,
            },
            seg: Register::None,
        }
    }

    /// PUSHF/POPF, PUSH imm + POPF, ENTER/LEAVE, PUSHA/POPA, segment
    /// register push/pop pairs.
    fn gen_stack(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let bits = b.bits;
        match rng.below(6) {
            0 => {
                let (pushf, popf) = match (bits, rng.chance(1, 4)) {
                    (64, _) => (Code::Pushfq, Code::Popfq),
                    (32, false) | (16, true) => (Code::Pushfd, Code::Popfd),
                    _ => (Code::Pushfw, Code::Popfw),
                };
                if !self.finish(b, rng, super::case::bare(pushf), None) {
                    return false;
                }
                self.finish(b, rng, super::case::bare(popf), None)
            }
            1 => {
                // push imm; popf with chosen flags (TF rarely). AC only in
                // ring 0: KVM-PVM keeps guest ring 3's AC clear.
                let ac = if self.mode.ring() == 3 { 0 } else { 1 << 18 };
                let mut v = rng.next_u64() & (super::case::ARITH | (1 << 10) | ac | (1 << 21));
                v |= 2;
                if self.mode.ring() == 3 {
                    v |= env::RFLAGS_IF;
                }
                // TF: single-step traps after the following instructions
                // (on the hardware oracle: KVM's emulator single-steps
                // INT n into its handler, docs/DIFFTEST.md).
                if self.mode.oracle() == super::Oracle::Hardware && rng.chance(1, 30) {
                    v |= 1 << 8;
                }
                if rng.chance(1, 20) {
                    v |= 1 << 14;
                }
                let (push, popf) = match bits {
                    64 => (Code::Pushq_imm32, Code::Popfq),
                    32 => (Code::Pushd_imm32, Code::Popfd),
                    _ => (Code::Push_imm16, Code::Popfw),
                };
                if !b.setup(build(push, &[Opnd::Imm(v)])) {
                    return false;
                }
                self.finish(b, rng, super::case::bare(popf), None)
            }
            2 => {
                // enter / leave, tracking RBP.
                // KVM's emulator pushes RBP with the stack size instead of
                // the operand size: with an emulator oracle keep them equal.
                let other = rng.chance(1, 5) && self.mode.oracle() == super::Oracle::Hardware;
                let code = match (bits, other) {
                    (64, false) => Code::Enterq_imm16_imm8,
                    (64, true) => Code::Enterw_imm16_imm8,
                    (32, _) => Code::Enterd_imm16_imm8,
                    _ => Code::Enterw_imm16_imm8,
                };
                let size: u64 = match code {
                    Code::Enterq_imm16_imm8 => 8,
                    Code::Enterd_imm16_imm8 => 4,
                    _ => 2,
                };
                // KVM's emulator does not check the final RSP for writing
                // (the CPU does): keep it in the stack page there.
                let emulated = self.mode.oracle() == super::Oracle::Emulator;
                let alloc = if emulated || rng.chance(9, 10) {
                    rng.below(0x40) & !1
                } else {
                    rng.edgy(16)
                };
                // KVM's emulator refuses ENTER with a nesting level: only
                // level 0 has an oracle in ring 0 and real mode.
                let level = if self.mode.oracle() == super::Oracle::Emulator {
                    0
                } else if rng.chance(3, 4) {
                    rng.below(3)
                } else {
                    rng.below(32)
                };
                let Some(i) = build(code, &[Opnd::Imm(alloc), Opnd::Imm(level)]) else {
                    return false;
                };
                let old_rbp = b.model.rbp;
                let rsp0 = b.model.rsp;
                if !self.finish(b, rng, i, None) {
                    return false;
                }
                let frame = rsp0.wrapping_sub(size) & b.stack_mask();
                b.model.frames.push(old_rbp);
                b.model.rbp = frame;
                b.model.rsp = frame
                    .wrapping_sub((level & 0x1f) * size)
                    .wrapping_sub(alloc)
                    & b.stack_mask();
                true
            }
            3 if !b.model.frames.is_empty() => {
                let code = match (bits, rng.chance(1, 5)) {
                    (64, _) => Code::Leaveq,
                    (32, false) | (16, true) => Code::Leaved,
                    _ => Code::Leavew,
                };
                if !self.finish(b, rng, super::case::bare(code), None) {
                    return false;
                }
                let size: u64 = match code {
                    Code::Leaveq => 8,
                    Code::Leaved => 4,
                    _ => 2,
                };
                b.model.rsp = b.model.rbp.wrapping_add(size) & b.stack_mask();
                b.model.rbp = b.model.frames.pop().unwrap_or(b.model.rbp);
                true
            }
            4 if bits != 64 => {
                let (pusha, popa) = if rng.chance(3, 4) == (bits == 32) {
                    (Code::Pushad, Code::Popad)
                } else {
                    (Code::Pushaw, Code::Popaw)
                };
                if !self.finish(b, rng, super::case::bare(pusha), None) {
                    return false;
                }
                // POPA reloads RBX and RBP from the stack it just wrote.
                let mut it = Item::new(0, super::case::bare(popa));
                it.setup = false;
                b.push_test(it, rng)
            }
            _ => {
                let (push, pop) = match bits {
                    64 => *rng
                        .pick(&[
                            (Code::Pushq_FS, Code::Popq_FS),
                            (Code::Pushq_GS, Code::Popq_GS),
                        ])
                        .unwrap_or(&(Code::Pushq_FS, Code::Popq_FS)),
                    32 => *rng
                        .pick(&[
                            (Code::Pushd_DS, Code::Popd_DS),
                            (Code::Pushd_ES, Code::Popd_ES),
                            (Code::Pushd_SS, Code::Popd_SS),
                            (Code::Pushd_FS, Code::Popd_FS),
                            (Code::Pushd_GS, Code::Popd_GS),
                        ])
                        .unwrap_or(&(Code::Pushd_DS, Code::Popd_DS)),
                    _ => *rng
                        .pick(&[
                            (Code::Pushw_DS, Code::Popw_DS),
                            (Code::Pushw_ES, Code::Popw_ES),
                            (Code::Pushw_SS, Code::Popw_SS),
                            (Code::Pushw_FS, Code::Popw_FS),
                            (Code::Pushw_GS, Code::Popw_GS),
                        ])
                        .unwrap_or(&(Code::Pushw_DS, Code::Popw_DS)),
                };
                let seg_of = |c: Code| -> Register {
                    let oc = c.op_code();
                    match oc.op_kind(0) {
                        K::es => Register::ES,
                        K::cs => Register::CS,
                        K::ss => Register::SS,
                        K::ds => Register::DS,
                        K::fs => Register::FS,
                        _ => Register::GS,
                    }
                };
                let Some(p) = build(push, &[Opnd::Reg(seg_of(push))]) else {
                    return false;
                };
                if !self.finish(b, rng, p, None) {
                    return false;
                }
                let Some(q) = build(pop, &[Opnd::Reg(seg_of(pop))]) else {
                    return false;
                };
                self.finish(b, rng, q, None)
            }
        }
    }

    /// IN/OUT (and INS/OUTS) on the compared ports 0x100..0x10f.
    fn gen_io(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let port = 0x100 + rng.below(16);
        b.setup(mov_reg_imm(Register::DX, port));
        let codes = [
            Code::In_AL_DX,
            Code::In_AX_DX,
            Code::In_EAX_DX,
            Code::Out_DX_AL,
            Code::Out_DX_AX,
            Code::Out_DX_EAX,
        ];
        let Some(&code) = rng.pick(&codes) else {
            return false;
        };
        let oc = code.op_code();
        let ops: Vec<Opnd> = oc
            .op_kinds()
            .iter()
            .map(|k| match k {
                K::al => Opnd::Reg(Register::AL),
                K::ax => Opnd::Reg(Register::AX),
                K::eax => Opnd::Reg(Register::EAX),
                _ => Opnd::Reg(Register::DX),
            })
            .collect();
        let Some(i) = build(code, &ops) else {
            return false;
        };
        self.finish(b, rng, i, None)
    }

    /// Deliberate faults and traps: UD2, INT n, INT3, INTO, INT1, HLT,
    /// invalid LOCK, a register load from the unmapped page.
    fn gen_fault(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let i = match rng.below(8) {
            0 => Some(super::case::bare(Code::Ud2)),
            1 => {
                // KVM-PVM turns ring-3 INT n (n other than 3 and 4) into
                // #UD: no oracle there.
                let v = if self.mode.ring() == 3 {
                    3 + rng.below(2)
                } else if self.mode.real() {
                    // KVM's real-mode INT n spins forever for n >= 0x80.
                    rng.below(0x80)
                } else {
                    match rng.below(3) {
                        0 => u64::from(*rng.pick(&env::USER_VECTORS).unwrap_or(&0x80)),
                        1 => u64::from(env::KERNEL_VECTOR),
                        _ => rng.below(256),
                    }
                };
                build(Code::Int_imm8, &[Opnd::Imm(v)])
            }
            2 => Some(super::case::bare(Code::Int3)),
            3 if b.bits != 64 => Some(super::case::bare(Code::Into)),
            4 => Some(super::case::bare(Code::Int1)),
            5 => Some(super::case::bare(Code::Hlt)),
            _ => {
                // LOCK on a register form: #UD.
                let r = self.pick_reg(rng, b.bits, 4, true);
                let mut i = build(
                    Code::Add_rm32_r32,
                    &[Opnd::Reg(r), Opnd::Reg(Register::ECX)],
                );
                if let Some(i) = i.as_mut() {
                    i.set_has_lock_prefix(true);
                }
                i
            }
        };
        let Some(i) = i else { return false };
        if self.banned.contains(&i.code()) {
            return false;
        }
        self.finish(b, rng, i, None)
    }
}

fn xmm(rng: &mut Rng, bits: u32) -> Register {
    const X: [Register; 16] = [
        Register::XMM0,
        Register::XMM1,
        Register::XMM2,
        Register::XMM3,
        Register::XMM4,
        Register::XMM5,
        Register::XMM6,
        Register::XMM7,
        Register::XMM8,
        Register::XMM9,
        Register::XMM10,
        Register::XMM11,
        Register::XMM12,
        Register::XMM13,
        Register::XMM14,
        Register::XMM15,
    ];
    X[rng.below(if bits == 64 { 16 } else { 8 }) as usize]
}

/// XMMn.
pub(super) fn xmm_index_reg(n: usize) -> Register {
    const X: [Register; 16] = [
        Register::XMM0,
        Register::XMM1,
        Register::XMM2,
        Register::XMM3,
        Register::XMM4,
        Register::XMM5,
        Register::XMM6,
        Register::XMM7,
        Register::XMM8,
        Register::XMM9,
        Register::XMM10,
        Register::XMM11,
        Register::XMM12,
        Register::XMM13,
        Register::XMM14,
        Register::XMM15,
    ];
    X[n & 15]
}

fn mm(rng: &mut Rng) -> Register {
    const M: [Register; 8] = [
        Register::MM0,
        Register::MM1,
        Register::MM2,
        Register::MM3,
        Register::MM4,
        Register::MM5,
        Register::MM6,
        Register::MM7,
    ];
    M[rng.below(8) as usize]
}

fn st(rng: &mut Rng) -> Register {
    const S: [Register; 8] = [
        Register::ST0,
        Register::ST1,
        Register::ST2,
        Register::ST3,
        Register::ST4,
        Register::ST5,
        Register::ST6,
        Register::ST7,
    ];
    S[rng.below(8) as usize]
}

/// Move every branch target that lands inside a template to the start of
/// that template, so that no setup is jumped over (targets only move
/// backwards, and never before the branch itself).
fn retarget_to_groups(items: &mut [Item]) {
    let groups: Vec<(usize, usize)> = items.iter().map(|it| (it.id, it.group)).collect();
    let resolve = |id: usize, after: usize| -> usize {
        match groups.iter().find(|(i, _)| *i >= id) {
            Some(&(i, g)) if g > after && g < i => g,
            Some(&(i, _)) => i,
            None => id,
        }
    };
    for it in items.iter_mut() {
        if let Some(t) = it.target {
            it.target = Some(resolve(t, it.id));
        }
        if let Some(t) = it.imm_target {
            it.imm_target = Some(resolve(t, it.id));
        }
    }
}

pub(super) fn rep_kind(r: u8) -> iced_x86::RepPrefixKind {
    match r {
        0 => iced_x86::RepPrefixKind::None,
        1 => iced_x86::RepPrefixKind::Repe,
        _ => iced_x86::RepPrefixKind::Repne,
    }
}

pub(super) fn near_kind(code: Code) -> OpKind {
    match code.op_code().op_kind(0) {
        K::br16_1 | K::br16_2 => OpKind::NearBranch16,
        K::br32_1 | K::br32_4 => OpKind::NearBranch32,
        _ => OpKind::NearBranch64,
    }
}

pub(super) fn is_shift(m: Mnemonic) -> bool {
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

/// Shift counts at the edges: 0, 1, size-1, size, 31, 32, 63, ...
fn shift_count(rng: &mut Rng) -> u64 {
    *rng.pick(&[0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 0xff])
        .unwrap_or(&1)
        ^ if rng.chance(1, 4) { rng.below(256) } else { 0 }
}

/// Memory size in bytes of `code`'s memory operand (0 if none).
pub fn mem_size(code: Code) -> usize {
    let s = code.op_code().memory_size();
    if s == MemorySize::Unknown {
        0
    } else {
        s.size()
    }
}

/// Can an access of `size` bytes at `addr` be checked against KVM's
/// emulator? An access that crosses a page boundary is only safe between
/// the two read-write window pages: when the second page faults KVM's
/// emulator stores the first page's part before the #PF, and when both
/// fault it reports the second page; the CPU checks both pages first and
/// reports the first (docs/DIFFTEST.md, "KVM's emulator wrong").
fn emulator_straddle_ok(addr: u64, size: u64) -> bool {
    let last = addr.wrapping_add(size.max(1) - 1);
    addr >> 12 == last >> 12 || (addr >> 12 == env::W_RW0 >> 12 && last >> 12 == env::W_RW1 >> 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_cover_the_integer_isa() {
        for mode in Mode::ALL {
            let g = Generator::new(mode);
            let pool = g.pool();
            assert!(pool.len() > 200, "{mode}: {} codes", pool.len());
            assert!(pool.contains(&Code::Add_rm32_r32));
        }
        assert!(Generator::new(Mode::Long64Ring3)
            .pool()
            .contains(&Code::Movsxd_r64_rm32));
        assert!(!Generator::new(Mode::Long64Ring3)
            .pool()
            .contains(&Code::Daa));
        assert!(Generator::new(Mode::Real16).pool().contains(&Code::Daa));
    }

    #[test]
    fn generated_cases_are_valid_and_assemble() {
        for mode in Mode::ALL {
            let mut g = Generator::new(mode);
            let mut rng = Rng::new(7);
            for k in 0..300 {
                let c = g.case(&mut rng, format!("t{k}"));
                super::super::case::analyze(mode, &c.items)
                    .unwrap_or_else(|e| panic!("{mode} case {k}: {e}"));
                super::super::case::assemble(mode, &c.items).unwrap();
                assert!(
                    c.items.iter().any(|it| !it.setup),
                    "{mode} case {k} is empty"
                );
                let mut info = InstructionInfoFactory::new();
                for (n, it) in c.items.iter().enumerate() {
                    let i = &it.instr;
                    if matches!(
                        i.mnemonic(),
                        Mnemonic::Enter | Mnemonic::Leave | Mnemonic::Popa | Mnemonic::Popad
                    ) {
                        continue;
                    }
                    // CPUID writes RBX; the setup right after it restores it.
                    if i.mnemonic() == Mnemonic::Cpuid {
                        let next = c.items.get(n + 1).map(|it| it.instr.op0_register());
                        assert!(
                            matches!(next, Some(Register::RBX | Register::EBX | Register::BX)),
                            "{mode}: CPUID without the RBX restore"
                        );
                        continue;
                    }
                    if n > 0 && c.items[n - 1].instr.mnemonic() == Mnemonic::Cpuid {
                        continue;
                    }
                    let bad = info.info(i).used_registers().iter().any(|u| {
                        matches!(gpr_full(u.register()), Register::RBX | Register::RBP)
                            && matches!(u.access(), OpAccess::Write | OpAccess::ReadWrite)
                    });
                    assert!(!bad, "{mode}: {} writes RBX/RBP", cpu_interp::disasm(i));
                }
            }
        }
    }
}
