//! Targeted corpora: deterministic enumerations per instruction class.
//!
//! - `values`: every integer instruction form the interpreter implements
//!   in the mode, with its operands set to edge values (0, 1, the sign bit
//!   and its neighbours, all ones, a mixed pattern) in register and memory
//!   forms, with varying initial flags; shift and rotate counts 0, 1,
//!   width-1, width, 31, 32, 63, ...; dividends and divisors that do and
//!   do not raise #DE.
//! - `addressing`: every base/index register, scale, displacement size,
//!   address size and segment override, for a load, a read-modify-write
//!   and LEA.
//! - `strings`: every string instruction, operand size, address size and
//!   REP prefix, with both directions, counts 0/1/3/many, and pointers
//!   that run into the unmapped page or a read-only page.
//! - `bcd` (16/32-bit modes): DAA/DAS/AAA/AAS over AL values and AF/CF,
//!   AAM/AAD with several bases (including 0: #DE).
//! - `branches`: every Jcc form with each flag pattern, LOOP/JCXZ forms
//!   with counts 0, 1, 2, CALL/RET/JMP forms.
//! - `frames`: ENTER/LEAVE with nesting levels 0..31.
//! - `faults`: reads, writes and read-modify-writes of every page kind
//!   (read-only, supervisor, not present, null), page-crossing accesses,
//!   non-canonical addresses, segment-limit violations, UD2, INT n, INT3,
//!   INTO, INT1, HLT, invalid LOCK.
//!
//! The corpora do not depend on the campaign seed: register values that
//! are not under test come from a fixed stream per case.

use iced_x86::{Code, Instruction, Mnemonic, OpCodeOperandKind as K, Register};

use cpu_interp::state::gpr;

use super::case::{analyze, assemble, gpr_index, Case, Item, ARITH, CF, OF, PF, SF, ZF};
use super::env;
use super::gen::{
    build, integer_groups, is_shift, kvm_refusals, mov_mem_imm, mov_reg_imm, near_kind, reg_sized,
    rep_kind, valid_in, Generator, Mem, Opnd,
};
use super::rng::Rng;
use super::Mode;

/// Address the value corpus puts memory operands at (through RBX).
const RBX_VALUE: u64 = 0xd800;
const MEM_DISP: u64 = 0x10;

/// A case under construction.
struct Cb {
    items: Vec<Item>,
}

impl Cb {
    fn new() -> Self {
        Cb { items: Vec::new() }
    }
    fn push(&mut self, i: Option<Instruction>, setup: bool) -> bool {
        let Some(i) = i else { return false };
        let mut it = Item::new(self.items.len(), i);
        it.setup = setup;
        self.items.push(it);
        true
    }
    fn push_target(&mut self, i: Instruction, target: usize) {
        let mut it = Item::new(self.items.len(), i);
        it.target = Some(target);
        self.items.push(it);
    }
    fn next(&self) -> usize {
        self.items.len()
    }
}

/// The corpus case maker: fixed per-case streams for everything not under
/// test.
struct Maker {
    mode: Mode,
    refused: Vec<Code>,
    gen: Generator,
    out: Vec<Case>,
    name: &'static str,
    n: u64,
}

impl Maker {
    fn new(mode: Mode) -> Self {
        Maker {
            mode,
            refused: kvm_refusals(mode),
            gen: Generator::new(mode),
            out: Vec::new(),
            name: "",
            n: 0,
        }
    }

    /// Finish a case with initial arithmetic flags `flags` (and DF).
    fn emit(&mut self, cb: Cb, flags: u64, df: bool) {
        self.emit_with(cb, flags, df, |_| {});
    }

    fn emit_with(&mut self, cb: Cb, flags: u64, df: bool, tweak: impl FnOnce(&mut Case)) {
        let idx = self.n;
        self.n += 1;
        let mut rng = Rng::derive(0x7a59_c0de, (self.mode as u64) << 40 | idx);
        let mut init = self.gen.init_state(&mut rng);
        init.regs.gpr[gpr::RBX] = RBX_VALUE;
        init.regs.rflags = (init.regs.rflags & !(ARITH | (1 << 10))) | flags;
        if df {
            init.regs.rflags |= 1 << 10;
        }
        let mut case = Case {
            mode: self.mode,
            init,
            area: self.gen.init_area(&mut rng),
            items: cb.items,
            origin: format!("targeted {} #{idx}", self.name),
        };
        tweak(&mut case);
        // No oracle for what KVM refuses here (see `kvm_refusals`; nested
        // ENTER in the emulator).
        let refused = case.items.iter().any(|it| {
            self.refused.contains(&it.instr.code())
                || (self.mode.oracle() == super::Oracle::Emulator
                    && it.instr.mnemonic() == Mnemonic::Enter
                    && it.instr.immediate8_2nd() & 0x1f != 0)
        });
        if !refused
            && analyze(self.mode, &case.items).is_ok()
            && assemble(self.mode, &case.items).is_ok()
        {
            self.out.push(case);
        }
    }

    fn asize(&self) -> u32 {
        self.mode.bits()
    }

    /// `[rbx + disp]` in the default address size.
    fn mem_rbx(&self, disp: u64) -> Mem {
        let base = match self.asize() {
            64 => Register::RBX,
            32 => Register::EBX,
            _ => Register::BX,
        };
        Mem {
            base,
            index: Register::None,
            scale: 1,
            disp,
            displ_size: 1,
            seg: Register::None,
        }
    }
}

/// Edge values for a `bits`-wide operand.
fn edges(bits: u32) -> [u64; 6] {
    let mask = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let sign = 1u64 << (bits - 1);
    [0, 1, sign - 1, sign, mask, 0x5a3c_96e1_0f87_2d4b & mask]
}

const FLAG_PATTERNS: [u64; 6] = [0, ARITH, CF, ZF | PF, SF | OF, CF | ZF | SF];

fn shift_counts(bits: u32) -> Vec<u64> {
    let mut v = vec![
        0,
        1,
        2,
        u64::from(bits) - 1,
        u64::from(bits),
        u64::from(bits) + 1,
        31,
        32,
        33,
        63,
        64,
        0xff,
    ];
    v.dedup();
    v
}

/// Registers for value operand `slot` (0, 1, 2) of `size` bytes, cycling
/// through REX-only and high-byte registers with `k`.
fn slot_reg(bits: u32, slot: usize, size: usize, k: usize) -> Register {
    let choices: &[usize] = match (bits, slot) {
        (64, 0) => &[0, 14, 6],
        (64, 1) => &[1, 11, 7],
        (64, _) => &[2, 9, 10],
        (_, 0) => &[0, 6],
        (_, 1) => &[1, 7],
        _ => &[2, 2],
    };
    let n = choices[k % choices.len()];
    if size == 1 && k % 4 == 1 && n < 4 {
        // AH, CH, DH (no REX).
        return [Register::AH, Register::CH, Register::DH, Register::BH][n];
    }
    reg_sized(n, size)
}

fn value_bits(k: K, code: Code) -> u32 {
    match k {
        K::r8_or_mem | K::r8_reg | K::r8_opcode | K::al | K::cl => 8,
        K::r16_or_mem | K::r16_reg | K::r16_rm | K::r16_opcode | K::ax | K::dx => 16,
        K::r32_or_mem | K::r32_reg | K::r32_rm | K::r32_opcode | K::eax => 32,
        K::r64_or_mem | K::r64_reg | K::r64_rm | K::r64_opcode | K::rax => 64,
        K::mem => (code.op_code().memory_size().size() as u32 * 8).clamp(8, 64),
        _ => 32,
    }
}

/// Every implemented integer form with edge operand values.
fn values(mk: &mut Maker) {
    mk.name = "values";
    let bits = mk.mode.bits();
    let codes: Vec<Code> = integer_groups(mk.mode).into_iter().flatten().collect();
    for code in codes {
        let oc = code.op_code();
        let m = code.mnemonic();
        if matches!(m, Mnemonic::Bound | Mnemonic::Xlatb) {
            continue;
        }
        let kinds: Vec<K> = oc.op_kinds().to_vec();
        let shift = is_shift(m);
        let counts = if shift {
            shift_counts(value_bits(kinds[0], code))
        } else {
            vec![0]
        };
        let two = kinds.len() >= 2 && !shift;
        let combos = if two { 36 } else { 12 };
        for (ci, &count) in counts.iter().enumerate() {
            for k in 0..combos {
                if shift && k >= 6 {
                    break;
                }
                let mut cb = Cb::new();
                let mut ops = Vec::new();
                let mut setups: Vec<Option<Instruction>> = Vec::new();
                let use_mem = (k + ci) % 2 == 1;
                let mut used_mem = false;
                for (n, &kind) in kinds.iter().enumerate() {
                    let vb = value_bits(kind, code);
                    let e = edges(vb);
                    let v = match n {
                        0 => e[k % 6],
                        1 => e[(k / 6) % 6],
                        _ => e[(k + 3) % 6],
                    };
                    let size = (vb / 8) as usize;
                    let op = match kind {
                        K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem | K::mem
                            if (use_mem || kind == K::mem) && !used_mem =>
                        {
                            used_mem = true;
                            let mm = mk.mem_rbx(MEM_DISP);
                            if kind != K::mem || size <= 8 {
                                setups.push(mov_mem_imm(mm, size.min(8), v));
                            }
                            Opnd::Mem(mm)
                        }
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
                        | K::r64_opcode => {
                            let r = slot_reg(bits, n, size, k / 2);
                            setups.push(mov_reg_imm(r, v));
                            Opnd::Reg(r)
                        }
                        K::al | K::ax | K::eax | K::rax | K::dx => {
                            let r = match kind {
                                K::al => Register::AL,
                                K::ax => Register::AX,
                                K::eax => Register::EAX,
                                K::rax => Register::RAX,
                                _ => Register::DX,
                            };
                            setups.push(mov_reg_imm(r, v));
                            Opnd::Reg(r)
                        }
                        K::cl => {
                            let c = if shift { count } else { v };
                            setups.push(mov_reg_imm(Register::CL, c));
                            Opnd::Reg(Register::CL)
                        }
                        K::imm8 if shift => Opnd::Imm(count),
                        K::imm8_const_1 => Opnd::Imm(1),
                        K::imm8 | K::imm8sex16 | K::imm8sex32 | K::imm8sex64 => {
                            Opnd::Imm(edges(8)[(k + n) % 6])
                        }
                        K::imm16 => Opnd::Imm(edges(16)[(k + n) % 6]),
                        K::imm32 | K::imm32sex64 => Opnd::Imm(edges(32)[(k + n) % 6]),
                        K::imm64 => Opnd::Imm(edges(64)[(k + n) % 6]),
                        K::es => Opnd::Reg(Register::ES),
                        K::cs => Opnd::Reg(Register::CS),
                        K::ss => Opnd::Reg(Register::SS),
                        K::ds => Opnd::Reg(Register::DS),
                        K::fs => Opnd::Reg(Register::FS),
                        K::gs => Opnd::Reg(Register::GS),
                        K::mem_offs => {
                            let mm = Mem {
                                base: Register::None,
                                index: Register::None,
                                scale: 1,
                                disp: RBX_VALUE + MEM_DISP,
                                displ_size: bits / 8,
                                seg: Register::None,
                            };
                            setups.push(mov_mem_imm(mk.mem_rbx(MEM_DISP), size.min(8), v));
                            Opnd::Mem(mm)
                        }
                        _ => {
                            ops.clear();
                            break;
                        }
                    };
                    ops.push(op);
                }
                if ops.len() != kinds.len() {
                    continue;
                }
                // Dividends and accumulators.
                let wide = |n: usize| reg_sized(n, if bits == 64 { 8 } else { 4 });
                match m {
                    Mnemonic::Div | Mnemonic::Idiv | Mnemonic::Mul | Mnemonic::Imul
                        if kinds.len() == 1 =>
                    {
                        let e = edges(64);
                        setups.push(mov_reg_imm(wide(0), e[(k / 6) % 6]));
                        setups.push(mov_reg_imm(wide(2), e[(k / 2 + 1) % 6] & 0xff));
                    }
                    Mnemonic::Cmpxchg | Mnemonic::Cmpxchg8b | Mnemonic::Cmpxchg16b => {
                        let v = if k % 2 == 0 { edges(64)[k % 6] } else { 0x1234 };
                        setups.push(mov_reg_imm(wide(0), v));
                        setups.push(mov_reg_imm(wide(2), 0));
                    }
                    _ => {}
                }
                for s in setups {
                    cb.push(s, true);
                }
                let Some(mut i) = build(code, &ops) else {
                    continue;
                };
                if oc.can_use_lock_prefix()
                    && used_mem
                    && matches!(ops.first(), Some(Opnd::Mem(_)))
                    && k % 4 == 3
                {
                    i.set_has_lock_prefix(true);
                }
                if iced_x86::Encoder::new(bits).encode(&i, env::CODE).is_err() {
                    continue;
                }
                cb.push(Some(i), false);
                mk.emit(cb, FLAG_PATTERNS[k % 6], k % 12 >= 6);
            }
        }
    }
}

/// Every addressing form, for a load, a read-modify-write and LEA.
fn addressing(mk: &mut Maker) {
    mk.name = "addressing";
    let bits = mk.mode.bits();
    let asizes: Vec<u32> = match bits {
        64 => vec![64, 32],
        32 => vec![32, 16],
        _ => vec![16, 32],
    };
    let target = 0xd400u64;
    let mut k = 0usize;
    for asize in asizes {
        let rsz = (asize / 8) as usize;
        // (base, index) pairs.
        let mut forms: Vec<(Register, Register)> = Vec::new();
        if asize == 16 {
            use Register::*;
            for (b, i) in [
                (BX, SI),
                (BX, DI),
                (BP, SI),
                (BP, DI),
                (SI, None),
                (DI, None),
                (BP, None),
                (BX, None),
                (None, None),
            ] {
                forms.push((b, i));
            }
        } else {
            let nregs = if asize == 64 { 16 } else { 8 };
            let mut bases: Vec<Register> = (0..nregs).map(|n| reg_sized(n, rsz)).collect();
            bases.push(Register::None);
            if asize == 64 {
                bases.push(Register::RIP);
            } else if bits == 64 {
                bases.push(Register::EIP);
            }
            for (bi, &b) in bases.iter().enumerate() {
                for j in 0..3 {
                    let n = (bi * 5 + j * 3) % nregs;
                    let idx =
                        if j == 0 || n == gpr::RSP || matches!(b, Register::RIP | Register::EIP) {
                            Register::None
                        } else {
                            reg_sized(n, rsz)
                        };
                    forms.push((b, idx));
                }
            }
        }
        for (base, index) in forms {
            for what in 0..3 {
                let scale = if index == Register::None || asize == 16 {
                    1
                } else {
                    1 << (k % 4)
                };
                let disp_kind = k % 3; // none, 8-bit, full
                k += 1;
                let mut cb = Cb::new();
                // Values: the index is small, the base makes up the rest.
                let index_val: u64 = if index == Register::None {
                    0
                } else {
                    0x20 + (k as u64 % 8) * 8
                };
                let disp: u64 = match disp_kind {
                    0 => 0,
                    1 => 0x40,
                    _ => 0x300,
                };
                let mut mem = Mem {
                    base,
                    index,
                    scale,
                    disp,
                    displ_size: if disp_kind == 2 {
                        rsz as u32
                    } else if disp_kind == 1 {
                        1
                    } else {
                        0
                    },
                    seg: Register::None,
                };
                if base == Register::None {
                    mem.disp = target;
                    mem.displ_size = rsz as u32;
                } else if matches!(base, Register::RIP | Register::EIP) {
                    mem.disp = target;
                    mem.displ_size = 8;
                } else {
                    let base_val = target
                        .wrapping_sub(index_val.wrapping_mul(u64::from(scale)))
                        .wrapping_sub(disp);
                    cb.push(
                        mov_reg_imm(
                            reg_sized(gpr_index(base).unwrap_or(0), rsz.min(4)),
                            base_val,
                        ),
                        true,
                    );
                }
                if index != Register::None && index != base {
                    cb.push(
                        mov_reg_imm(
                            reg_sized(gpr_index(index).unwrap_or(0), rsz.min(4)),
                            index_val,
                        ),
                        true,
                    );
                }
                if mem.displ_size == 0 && base == Register::BP {
                    mem.displ_size = 1;
                }
                let (code, ops) = match what {
                    0 => (
                        Code::Mov_r32_rm32,
                        vec![Opnd::Reg(Register::EAX), Opnd::Mem(mem)],
                    ),
                    1 => (
                        Code::Add_rm32_r32,
                        vec![Opnd::Mem(mem), Opnd::Reg(Register::ECX)],
                    ),
                    _ => (
                        Code::Lea_r32_m,
                        vec![Opnd::Reg(Register::EDX), Opnd::Mem(mem)],
                    ),
                };
                let Some(i) = build(code, &ops) else { continue };
                if iced_x86::Encoder::new(bits).encode(&i, env::CODE).is_err() {
                    continue;
                }
                cb.push(Some(i), false);
                mk.emit(cb, 0, false);
            }
        }
    }
    // Segment overrides on [rbx + disp], including the limited FS.
    for seg in [
        Register::ES,
        Register::CS,
        Register::SS,
        Register::DS,
        Register::FS,
        Register::GS,
    ] {
        for off in [0u64, 0x10, 0x1ffc, 0x1ffe, 0x2000, 0xfff0] {
            for write in [false, true] {
                let mut cb = Cb::new();
                // Offset within the segment: rbx + disp = off.
                let mut mm = mk.mem_rbx(0);
                mm.disp =
                    off.wrapping_sub(RBX_VALUE) & if bits == 16 { 0xffff } else { 0xffff_ffff };
                if bits == 64 {
                    mm.disp = mm.disp as u32 as i32 as i64 as u64;
                }
                mm.displ_size = if bits == 16 { 2 } else { 4 };
                mm.seg = seg;
                let i = if write {
                    build(
                        Code::Mov_rm32_r32,
                        &[Opnd::Mem(mm), Opnd::Reg(Register::ECX)],
                    )
                } else {
                    build(
                        Code::Mov_r32_rm32,
                        &[Opnd::Reg(Register::EAX), Opnd::Mem(mm)],
                    )
                };
                cb.push(i, false);
                mk.emit(cb, 0, false);
            }
        }
    }
}

/// Every string instruction with REP prefixes, directions, counts and
/// pointers near page edges.
fn strings(mk: &mut Maker) {
    mk.name = "strings";
    let emulated = mk.mode.oracle() == super::Oracle::Emulator;
    let bits = mk.mode.bits();
    let asizes: Vec<u32> = match bits {
        64 => vec![64, 32],
        32 => vec![32, 16],
        _ => vec![16, 32],
    };
    let sizes: &[usize] = if bits == 64 {
        &[1, 2, 4, 8]
    } else {
        &[1, 2, 4]
    };
    let mut k = 0u64;
    for &asize in &asizes {
        for kind in 0..5u8 {
            for &size in sizes {
                for rep in 0..3u8 {
                    if kind <= 2 && rep == 2 {
                        continue;
                    }
                    for (pi, (rsi, rdi)) in [
                        (0xd100u64, 0xe200u64),
                        (env::UNMAPPED - 5, env::W_RW1 + 0x10),
                        (env::W_RW1 + 0x20, env::UNMAPPED - 3),
                        (env::W_RW0 + 2, env::W_RO + 0xffc),
                        (env::W_SUP + 0x10, env::W_RW0 + 8),
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        for count in [0u64, 1, 3, 40] {
                            if rep == 0 && count != 1 {
                                continue;
                            }
                            k += 1;
                            let df = k % 2 == 0;
                            let seg = if pi == 0 && k % 3 == 0 {
                                Register::ES
                            } else {
                                Register::None
                            };
                            let rk = rep_kind(rep);
                            let i = match (kind, size) {
                                (0, 1) => Instruction::with_movsb(asize, seg, rk),
                                (0, 2) => Instruction::with_movsw(asize, seg, rk),
                                (0, 4) => Instruction::with_movsd(asize, seg, rk),
                                (0, _) => Instruction::with_movsq(asize, seg, rk),
                                (1, 1) => Instruction::with_stosb(asize, rk),
                                (1, 2) => Instruction::with_stosw(asize, rk),
                                (1, 4) => Instruction::with_stosd(asize, rk),
                                (1, _) => Instruction::with_stosq(asize, rk),
                                (2, 1) => Instruction::with_lodsb(asize, seg, rk),
                                (2, 2) => Instruction::with_lodsw(asize, seg, rk),
                                (2, 4) => Instruction::with_lodsd(asize, seg, rk),
                                (2, _) => Instruction::with_lodsq(asize, seg, rk),
                                (3, 1) => Instruction::with_cmpsb(asize, seg, rk),
                                (3, 2) => Instruction::with_cmpsw(asize, seg, rk),
                                (3, 4) => Instruction::with_cmpsd(asize, seg, rk),
                                (3, _) => Instruction::with_cmpsq(asize, seg, rk),
                                (_, 1) => Instruction::with_scasb(asize, rk),
                                (_, 2) => Instruction::with_scasw(asize, rk),
                                (_, 4) => Instruction::with_scasd(asize, rk),
                                (_, _) => Instruction::with_scasq(asize, rk),
                            };
                            let Ok(i) = i else { continue };
                            if !valid_in(i.code(), mk.mode)
                                || !cpu_interp::dispatch::implemented(i.code())
                            {
                                continue;
                            }
                            let rsz = if asize == 16 { 2 } else { 4 };
                            let (mut rsi, mut rdi) = (rsi, rdi);
                            if emulated {
                                // KVM's emulator writes the present part of
                                // an element straddling into a faulting page
                                // and accesses CMPS operands in the other
                                // order (docs/DIFFTEST.md): no oracle there.
                                rsi &= !(size as u64 - 1);
                                rdi &= !(size as u64 - 1);
                                if kind == 3 && seg != Register::None {
                                    continue;
                                }
                                if kind == 3 {
                                    rsi = 0xdc00;
                                }
                            }
                            let mut cb = Cb::new();
                            cb.push(mov_reg_imm(reg_sized(gpr::RSI, rsz), rsi), true);
                            cb.push(mov_reg_imm(reg_sized(gpr::RDI, rsz), rdi), true);
                            cb.push(mov_reg_imm(reg_sized(gpr::RCX, rsz), count), true);
                            // Make some compares match for REPE.
                            if kind >= 3 && k % 3 == 0 {
                                cb.push(mov_reg_imm(Register::EAX, 0), true);
                            }
                            cb.push(Some(i), false);
                            mk.emit(cb, FLAG_PATTERNS[(k % 6) as usize], df);
                        }
                    }
                }
            }
        }
    }
}

/// DAA/DAS/AAA/AAS over AL and AF/CF; AAM/AAD with several bases.
fn bcd(mk: &mut Maker) {
    if mk.mode.bits() == 64 {
        return;
    }
    mk.name = "bcd";
    let mut als: Vec<u64> = (0..256).step_by(7).collect();
    als.extend([
        0x09, 0x0a, 0x0f, 0x10, 0x19, 0x1a, 0x99, 0x9a, 0x9f, 0xa0, 0xf9, 0xfa, 0xff,
    ]);
    for code in [Code::Daa, Code::Das, Code::Aaa, Code::Aas] {
        if !cpu_interp::dispatch::implemented(code) {
            continue;
        }
        for (k, &al) in als.iter().enumerate() {
            let flags = [0, CF, super::case::AF, CF | super::case::AF][k % 4];
            let mut cb = Cb::new();
            cb.push(
                mov_reg_imm(Register::AX, al | ((k as u64 * 37) & 0xff) << 8),
                true,
            );
            cb.push(Some(super::case::bare(code)), false);
            mk.emit(cb, flags, false);
        }
    }
    for code in [Code::Aam_imm8, Code::Aad_imm8] {
        if !cpu_interp::dispatch::implemented(code) {
            continue;
        }
        for base in [10u64, 0, 1, 16, 7, 255] {
            for (k, &al) in als.iter().enumerate().step_by(3) {
                let mut cb = Cb::new();
                cb.push(
                    mov_reg_imm(Register::AX, al | ((k as u64 * 53) & 0xff) << 8),
                    true,
                );
                cb.push(build(code, &[Opnd::Imm(base)]), false);
                mk.emit(cb, 0, false);
            }
        }
    }
}

/// Jcc forms with each flag pattern; LOOP/JCXZ with counts; CALL/RET/JMP.
fn branches(mk: &mut Maker) {
    mk.name = "branches";
    let bits = mk.mode.bits();
    let codes: Vec<Code> = Code::values()
        .filter(|c| {
            (c.is_jcc_short_or_near()
                || c.is_loop()
                || c.is_loopcc()
                || c.is_jcx_short()
                || c.is_jmp_short_or_near()
                || c.is_call_near())
                && valid_in(*c, mk.mode)
                && cpu_interp::dispatch::implemented(*c)
        })
        .collect();
    for code in codes {
        let loopish = code.is_loop() || code.is_loopcc() || code.is_jcx_short();
        let n = if loopish {
            9
        } else if code.is_jcc_short_or_near() {
            6
        } else {
            1
        };
        for k in 0..n {
            let mut cb = Cb::new();
            if loopish {
                cb.push(mov_reg_imm(Register::ECX, [0u64, 1, 2][k % 3]), true);
            }
            let mut i = super::case::bare(code);
            i.set_op0_kind(near_kind(code));
            // Skip one item: a marker the comparison sees in RDX.
            let t = cb.next() + 2;
            cb.push_target(i, t);
            cb.push(mov_reg_imm(Register::EDX, 0x1234_5678), false);
            cb.push(mov_reg_imm(Register::ESI, 0x9abc), false);
            mk.emit(cb, FLAG_PATTERNS[k % 6], false);
        }
    }
    // RET forms through a pushed label, indirect JMP/CALL.
    let (push, rets): (Code, Vec<Code>) = match bits {
        64 => (Code::Pushq_imm32, vec![Code::Retnq, Code::Retnq_imm16]),
        32 => (
            Code::Pushd_imm32,
            vec![Code::Retnd, Code::Retnd_imm16, Code::Retnw],
        ),
        _ => (
            Code::Push_imm16,
            vec![Code::Retnw, Code::Retnw_imm16, Code::Retnd],
        ),
    };
    for ret in rets {
        for imm in [0u64, 2, 8] {
            if imm != 0
                && !matches!(
                    ret,
                    Code::Retnq_imm16 | Code::Retnd_imm16 | Code::Retnw_imm16
                )
            {
                continue;
            }
            let mut cb = Cb::new();
            let target = 3;
            let mut p = Item::new(
                0,
                match build(push, &[Opnd::Imm(0)]) {
                    Some(p) => p,
                    None => continue,
                },
            );
            p.setup = true;
            p.imm_target = Some(target);
            cb.items.push(p);
            let r = if imm != 0 {
                build(ret, &[Opnd::Imm(imm)])
            } else {
                Some(super::case::bare(ret))
            };
            let Some(r) = r else { continue };
            cb.push_target(r, target);
            cb.push(mov_reg_imm(Register::EDX, 0x1234_5678), false);
            mk.emit(cb, 0, false);
        }
    }
}

/// ENTER/LEAVE with every nesting level class.
fn frames(mk: &mut Maker) {
    mk.name = "frames";
    let bits = mk.mode.bits();
    // KVM's emulator pushes with the stack size, not the operand size, and
    // does not check the final stack pointer: with an emulator oracle only
    // the stack-size forms and small frames.
    let emulated = mk.mode.oracle() == super::Oracle::Emulator;
    let stack16 = matches!(mk.mode, Mode::Real16 | Mode::Compat16Ring3);
    let forms: &[(Code, Code)] = match (bits, emulated, stack16) {
        (64, false, _) => &[
            (Code::Enterq_imm16_imm8, Code::Leaveq),
            (Code::Enterw_imm16_imm8, Code::Leavew),
        ],
        (64, true, _) => &[(Code::Enterq_imm16_imm8, Code::Leaveq)],
        (_, true, true) => &[(Code::Enterw_imm16_imm8, Code::Leavew)],
        (_, true, false) => &[(Code::Enterd_imm16_imm8, Code::Leaved)],
        _ => &[
            (Code::Enterd_imm16_imm8, Code::Leaved),
            (Code::Enterw_imm16_imm8, Code::Leavew),
        ],
    };
    let allocs: &[u64] = if emulated {
        &[0, 8, 0x40]
    } else {
        &[0, 8, 0x40, 0x1000]
    };
    for &(enter, leave) in forms {
        for &alloc in allocs {
            for level in [0u64, 1, 2, 3, 7, 8, 9, 31, 32] {
                let mut cb = Cb::new();
                cb.push(build(enter, &[Opnd::Imm(alloc), Opnd::Imm(level)]), false);
                cb.push(Some(super::case::bare(leave)), false);
                mk.emit(cb, 0, false);
            }
        }
    }
}

/// Faults: page kinds, page crossings, non-canonical, limits, #UD, INT n.
fn faults(mk: &mut Maker) {
    mk.name = "faults";
    let bits = mk.mode.bits();
    let mut addrs: Vec<u64> = vec![
        env::W_RO + 0x10,
        env::W_SUP + 0x10,
        env::UNMAPPED + 0x10,
        0x10,
        env::KSTACK + 0x10,
        env::CODE + 0x800,
        env::STACK + 0x10,
    ];
    // Page-crossing accesses into a faulting page: KVM's emulator writes
    // the present part first and reports the second page when both fault
    // (the CPU neither): only with the hardware oracle.
    if mk.mode.oracle() == super::Oracle::Hardware {
        addrs.extend([env::W_RW1 + 0xffe, env::W_RO + 0xffe, env::W_SUP - 2]);
    }
    for &a in &addrs {
        for size in [1usize, 2, 4, 8] {
            if size == 8 && bits != 64 {
                continue;
            }
            for what in 0..3 {
                let mut cb = Cb::new();
                let mm = mk.mem_rbx(
                    a.wrapping_sub(RBX_VALUE) & if bits == 16 { 0xffff } else { u64::MAX },
                );
                let mut mm = mm;
                mm.displ_size = if bits == 16 { 2 } else { 4 };
                if bits == 64 {
                    mm.disp = mm.disp as u32 as i32 as i64 as u64;
                } else {
                    mm.disp &= 0xffff_ffff;
                }
                let r = reg_sized(0, size);
                let (code_ld, code_st, code_rmw) = match size {
                    1 => (Code::Mov_r8_rm8, Code::Mov_rm8_r8, Code::Add_rm8_r8),
                    2 => (Code::Mov_r16_rm16, Code::Mov_rm16_r16, Code::Add_rm16_r16),
                    4 => (Code::Mov_r32_rm32, Code::Mov_rm32_r32, Code::Add_rm32_r32),
                    _ => (Code::Mov_r64_rm64, Code::Mov_rm64_r64, Code::Add_rm64_r64),
                };
                let i = match what {
                    0 => build(code_ld, &[Opnd::Reg(r), Opnd::Mem(mm)]),
                    1 => build(code_st, &[Opnd::Mem(mm), Opnd::Reg(reg_sized(1, size))]),
                    _ => build(code_rmw, &[Opnd::Mem(mm), Opnd::Reg(reg_sized(1, size))]),
                };
                cb.push(i, false);
                mk.emit(cb, 0, false);
            }
        }
    }
    // Non-canonical addresses (64-bit): through a register and RSP-based (#SS).
    if bits == 64 {
        // (Not an access that starts canonical and ends beyond: the CPU
        // faults on the first page before checking the rest, the
        // interpreter raises #GP at once — open, docs/DIFFTEST.md.)
        for v in [
            0x8000_0000_0000u64,
            0xffff_7fff_ffff_f000,
            0x7fff_ffff_f000,
            0x0000_7fff_ffff_e000,
        ] {
            for base in [Register::RSI, Register::RBP] {
                let mut cb = Cb::new();
                cb.push(mov_reg_imm(base, v), true);
                let mm = Mem {
                    base,
                    index: Register::None,
                    scale: 1,
                    disp: 4,
                    displ_size: 1,
                    seg: Register::None,
                };
                cb.push(
                    build(
                        Code::Mov_r64_rm64,
                        &[Opnd::Reg(Register::RAX), Opnd::Mem(mm)],
                    ),
                    false,
                );
                mk.emit(cb, 0, false);
            }
        }
    }
    // #UD, INT n, INT3, INTO, INT1, HLT, LOCK on a register form.
    let mut simple: Vec<Option<Instruction>> = vec![
        Some(super::case::bare(Code::Ud2)),
        Some(super::case::bare(Code::Int3)),
        Some(super::case::bare(Code::Int1)),
        Some(super::case::bare(Code::Hlt)),
    ];
    for v in [
        0u64, 1, 3, 4, 6, 8, 13, 14, 0x1f, 0x20, 0x7f, 0x80, 0x81, 0x83, 0x84, 0xff,
    ] {
        // KVM-PVM turns ring-3 INT n (n other than 3, 4) into #UD, and its
        // real-mode INT n spins for n >= 0x80.
        let ok = match mk.mode {
            Mode::Long64Ring3 => matches!(v, 3 | 4),
            Mode::Real16 => v < 0x80,
            _ => true,
        };
        if ok {
            simple.push(build(Code::Int_imm8, &[Opnd::Imm(v)]));
        }
    }
    let mut lock = build(
        Code::Add_rm32_r32,
        &[Opnd::Reg(Register::EAX), Opnd::Reg(Register::ECX)],
    );
    if let Some(l) = lock.as_mut() {
        l.set_has_lock_prefix(true);
    }
    simple.push(lock);
    let mut lock_mov = build(
        Code::Mov_rm32_r32,
        &[Opnd::Mem(mk.mem_rbx(MEM_DISP)), Opnd::Reg(Register::ECX)],
    );
    if let Some(l) = lock_mov.as_mut() {
        l.set_has_lock_prefix(true);
    }
    simple.push(lock_mov);
    for i in simple {
        let mut cb = Cb::new();
        cb.push(i, false);
        mk.emit(cb, 0, false);
    }
    if bits != 64 {
        for of in [0u64, OF] {
            let mut cb = Cb::new();
            cb.push(Some(super::case::bare(Code::Into)), false);
            mk.emit(cb, of, false);
        }
    }
}

/// Every SSE..SSSE3 XMM form with each MXCSR rounding mode and XMM lanes
/// full of special values (64-bit ring 3 only: the only FP oracle here).
fn sse(mk: &mut Maker) {
    if mk.mode != Mode::Long64Ring3 {
        return;
    }
    mk.name = "sse";
    let xmm = [Register::XMM1, Register::XMM2, Register::XMM3];
    let codes: Vec<Code> = super::fp::fp_groups(mk.mode, |_| true)
        .into_iter()
        .flatten()
        .filter(|c| !super::fp::x87_or_mmx(*c))
        .collect();
    for code in codes {
        let kinds: Vec<K> = code.op_code().op_kinds().to_vec();
        for rc in 0..4u32 {
            for k in 0..3usize {
                let mut cb = Cb::new();
                let mut ops = Vec::new();
                for (n, &kind) in kinds.iter().enumerate() {
                    let op = match kind {
                        K::xmm_reg | K::xmm_rm | K::xmm_or_mem => Opnd::Reg(xmm[(n + k) % 3]),
                        K::r32_or_mem | K::r32_reg | K::r32_rm => {
                            let r = reg_sized([0, 1, 2][(n + k) % 3], 4);
                            cb.push(mov_reg_imm(r, edges(32)[(rc as usize + k) % 6]), true);
                            Opnd::Reg(r)
                        }
                        K::r64_or_mem | K::r64_reg | K::r64_rm => {
                            let r = reg_sized([0, 1, 2][(n + k) % 3], 8);
                            cb.push(mov_reg_imm(r, edges(64)[(rc as usize + k) % 6]), true);
                            Opnd::Reg(r)
                        }
                        K::imm8 => {
                            Opnd::Imm([0x00, 0x1b, 0xe4, 0xff, 0x4e, 0x8d][(rc as usize + k) % 6])
                        }
                        K::mem => {
                            let mm = mk.mem_rbx(MEM_DISP & !15);
                            if code.mnemonic() == Mnemonic::Ldmxcsr {
                                // A valid MXCSR (reserved bits raise #GP,
                                // which KVM-PVM turns into #UD in ring 3).
                                cb.push(mov_mem_imm(mm, 4, 0x1f80 | u64::from(rc << 13)), true);
                            }
                            Opnd::Mem(mm)
                        }
                        _ => {
                            ops.clear();
                            break;
                        }
                    };
                    ops.push(op);
                }
                if ops.len() != kinds.len() {
                    continue;
                }
                let Some(i) = build(code, &ops) else { continue };
                if iced_x86::Encoder::new(64).encode(&i, env::CODE).is_err() {
                    continue;
                }
                cb.push(Some(i), false);
                let idx = mk.n;
                mk.emit_with(cb, 0, false, |case| {
                    let mut rng = Rng::derive(0xf9, idx);
                    super::fp::randomize(&mut rng, &mut case.init);
                    case.init.fpu.mxcsr = 0x1f80 | (rc << 13);
                    if k == 2 {
                        case.init.fpu.mxcsr |= 0x8000; // FTZ (DAZ: open gap G9)
                    }
                    super::fp::sprinkle(&mut rng, &mut case.area);
                });
            }
        }
    }
}

/// The targeted cases for `mode` (independent of the campaign seed).
pub fn cases(mode: Mode, _seed: u64) -> Vec<Case> {
    let mut mk = Maker::new(mode);
    values(&mut mk);
    addressing(&mut mk);
    strings(&mut mk);
    bcd(&mut mk);
    branches(&mut mk);
    frames(&mut mk);
    faults(&mut mk);
    sse(&mut mk);
    mk.out
}

/// Every `step`-th targeted case (for tests with a case budget).
pub fn sample(mode: Mode, step: usize) -> Vec<Case> {
    cases(mode, 0).into_iter().step_by(step.max(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpora_are_valid_and_cover_many_forms() {
        for mode in Mode::ALL {
            let c = cases(mode, 0);
            assert!(c.len() > 2000, "{mode}: {} cases", c.len());
            let forms: std::collections::BTreeSet<Code> = c
                .iter()
                .flat_map(|k| k.items.iter().filter(|i| !i.setup).map(|i| i.instr.code()))
                .collect();
            assert!(forms.len() > 300, "{mode}: {} forms", forms.len());
        }
    }
}
