//! A small assembler over iced-x86's encoder: instructions are encoded one
//! at a time at their final address, with forward labels for the
//! translator's out-of-line paths (rel32 branches patched at the end).

use iced_x86::{Code, Encoder, IcedError, Instruction, MemoryOperand, Register};

/// A host general-purpose register by hardware number (0 = RAX ... 15 = R15).
pub type Reg = u8;

pub const RAX: Reg = 0;
pub const RCX: Reg = 1;
pub const RDX: Reg = 2;
pub const RBX: Reg = 3;
pub const RSP: Reg = 4;
pub const RBP: Reg = 5;
pub const RSI: Reg = 6;
pub const RDI: Reg = 7;
pub const R8: Reg = 8;
pub const R9: Reg = 9;
pub const R10: Reg = 10;
pub const R11: Reg = 11;
pub const R12: Reg = 12;
pub const R13: Reg = 13;
pub const R14: Reg = 14;
pub const R15: Reg = 15;

/// The iced register for hardware register `n` at `size` bytes (low byte
/// registers for size 1: AL..BL, SPL..DIL, R8L..R15L).
pub fn reg(n: Reg, size: u32) -> Register {
    let n = n as usize;
    let r = match size {
        1 if n < 4 => Register::AL as usize + n,
        1 => Register::SPL as usize + (n - 4),
        2 => Register::AX as usize + n,
        4 => Register::EAX as usize + n,
        _ => Register::RAX as usize + n,
    };
    Register::try_from(r).unwrap_or(Register::None)
}

/// `r64` shorthand.
pub fn r64(n: Reg) -> Register {
    reg(n, 8)
}

/// `[base + disp]`.
pub fn mem(base: Reg, disp: i64) -> MemoryOperand {
    MemoryOperand::with_base_displ(r64(base), disp)
}

/// `[base + index*scale + disp]`.
pub fn mem_idx(base: Reg, index: Reg, scale: u32, disp: i64) -> MemoryOperand {
    MemoryOperand::with_base_index_scale_displ_size(r64(base), r64(index), scale, disp, 1)
}

/// A forward (or backward) jump target inside one assembly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Label(usize);

/// Condition codes as in Jcc/SETcc/CMOVcc (low nibble of the opcode).
pub mod cc {
    pub const O: u8 = 0;
    pub const B: u8 = 2;
    pub const AE: u8 = 3;
    pub const E: u8 = 4;
    pub const NE: u8 = 5;
    pub const S: u8 = 8;
}

pub struct Asm {
    code: Vec<u8>,
    base: u64,
    enc: Encoder,
    labels: Vec<Option<usize>>,
    /// (position of a rel32 field, label it targets)
    fixups: Vec<(usize, Label)>,
}

/// A point to roll an assembly back to.
#[derive(Clone, Copy)]
pub struct Mark {
    len: usize,
    labels: usize,
    fixups: usize,
}

impl Asm {
    /// Assemble for execution at `base`.
    pub fn new(base: u64) -> Self {
        Asm {
            code: Vec::with_capacity(1024),
            base,
            enc: Encoder::new(64),
            labels: Vec::new(),
            fixups: Vec::new(),
        }
    }

    /// The address the next byte will have.
    pub fn ip(&self) -> u64 {
        self.base + self.code.len() as u64
    }

    pub fn len(&self) -> usize {
        self.code.len()
    }

    pub fn is_empty(&self) -> bool {
        self.code.is_empty()
    }

    pub fn mark(&self) -> Mark {
        Mark {
            len: self.code.len(),
            labels: self.labels.len(),
            fixups: self.fixups.len(),
        }
    }

    /// Drop everything emitted since `m` (labels created since too).
    pub fn rollback(&mut self, m: Mark) {
        self.code.truncate(m.len);
        self.labels.truncate(m.labels);
        self.fixups.truncate(m.fixups);
        for l in self.labels.iter_mut() {
            if l.is_some_and(|at| at > m.len) {
                *l = None;
            }
        }
    }

    /// Encode one instruction here.
    pub fn emit(&mut self, i: &Instruction) -> Result<(), IcedError> {
        let ip = self.ip();
        let r = self.enc.encode(i, ip);
        let mut b = self.enc.take_buffer();
        if r.is_ok() {
            self.code.extend_from_slice(&b);
        }
        // A failed encoding may leave partial bytes: drop them either way.
        b.clear();
        self.enc.set_buffer(b);
        r.map(|_| ())
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.code.extend_from_slice(b);
    }

    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    pub fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.code.len());
    }

    fn rel32_to(&mut self, l: Label) {
        self.fixups.push((self.code.len(), l));
        self.code.extend_from_slice(&[0; 4]);
    }

    /// `jmp rel32` to a label.
    pub fn jmp(&mut self, l: Label) {
        self.code.push(0xe9);
        self.rel32_to(l);
    }

    /// `jcc rel32` to a label.
    pub fn jcc(&mut self, cc: u8, l: Label) {
        self.code.extend_from_slice(&[0x0f, 0x80 | cc]);
        self.rel32_to(l);
    }

    /// `jmp rel32` to an absolute address (within ±2 GiB). Returns the
    /// position of the rel32 field (for later patching).
    pub fn jmp_abs(&mut self, target: u64) -> usize {
        self.code.push(0xe9);
        let at = self.code.len();
        let rel = target.wrapping_sub(self.ip() + 4) as i64;
        self.code.extend_from_slice(&(rel as i32).to_le_bytes());
        at
    }

    /// `jcc rel32` to an absolute address.
    pub fn jcc_abs(&mut self, cc: u8, target: u64) {
        self.code.extend_from_slice(&[0x0f, 0x80 | cc]);
        let rel = target.wrapping_sub(self.ip() + 4) as i64;
        self.code.extend_from_slice(&(rel as i32).to_le_bytes());
    }

    /// The execute address of byte position `pos`.
    pub fn addr_of(&self, pos: usize) -> u64 {
        self.base + pos as u64
    }

    /// The address a bound label stands for.
    pub fn label_addr(&self, l: Label) -> Option<u64> {
        self.labels[l.0].map(|p| self.base + p as u64)
    }

    /// Resolve label fixups; the finished code.
    pub fn finish(mut self) -> Vec<u8> {
        for &(at, l) in &self.fixups {
            let target = self.labels[l.0].expect("jump to an unbound label");
            let rel = target as i64 - (at as i64 + 4);
            self.code[at..at + 4].copy_from_slice(&(rel as i32).to_le_bytes());
        }
        self.code
    }

    // ---- common instruction forms (unwrap: these always encode) ---------

    fn e(&mut self, r: Result<Instruction, IcedError>) {
        let i = r.expect("JIT helper instruction forms are valid");
        self.emit(&i).expect("JIT helper instruction forms encode");
    }

    pub fn mov_rr(&mut self, dst: Reg, src: Reg) {
        self.e(Instruction::with2(Code::Mov_r64_rm64, r64(dst), r64(src)));
    }
    pub fn mov_rm(&mut self, dst: Reg, m: MemoryOperand) {
        self.e(Instruction::with2(Code::Mov_r64_rm64, r64(dst), m));
    }
    pub fn mov_mr(&mut self, m: MemoryOperand, src: Reg) {
        self.e(Instruction::with2(Code::Mov_rm64_r64, m, r64(src)));
    }
    pub fn mov_ri(&mut self, dst: Reg, v: u64) {
        if v <= u32::MAX as u64 {
            self.e(Instruction::with2(
                Code::Mov_r32_imm32,
                reg(dst, 4),
                v as u32,
            ));
        } else if (v as i64) >= i32::MIN as i64 && (v as i64) <= i32::MAX as i64 {
            self.e(Instruction::with2(
                Code::Mov_rm64_imm32,
                r64(dst),
                v as i64 as i32,
            ));
        } else {
            self.e(Instruction::with2(Code::Mov_r64_imm64, r64(dst), v));
        }
    }
    /// `mov qword [m], imm32` (sign-extended).
    pub fn mov_mi(&mut self, m: MemoryOperand, v: i32) {
        self.e(Instruction::with2(Code::Mov_rm64_imm32, m, v));
    }
    /// `mov dword [m], imm32`.
    pub fn mov_mi32(&mut self, m: MemoryOperand, v: u32) {
        self.e(Instruction::with2(Code::Mov_rm32_imm32, m, v));
    }
    pub fn mov_m8i(&mut self, m: MemoryOperand, v: u8) {
        self.e(Instruction::with2(Code::Mov_rm8_imm8, m, v as u32));
    }
    pub fn lea(&mut self, dst: Reg, m: MemoryOperand) {
        self.e(Instruction::with2(Code::Lea_r64_m, r64(dst), m));
    }
    pub fn lea32(&mut self, dst: Reg, m: MemoryOperand) {
        self.e(Instruction::with2(Code::Lea_r32_m, reg(dst, 4), m));
    }
    pub fn add_rm(&mut self, dst: Reg, m: MemoryOperand) {
        self.e(Instruction::with2(Code::Add_r64_rm64, r64(dst), m));
    }
    pub fn add_ri(&mut self, dst: Reg, v: i32) {
        self.e(Instruction::with2(Code::Add_rm64_imm32, r64(dst), v));
    }
    pub fn sub_ri(&mut self, dst: Reg, v: i32) {
        self.e(Instruction::with2(Code::Sub_rm64_imm32, r64(dst), v));
    }
    pub fn sub_rm(&mut self, dst: Reg, m: MemoryOperand) {
        self.e(Instruction::with2(Code::Sub_r64_rm64, r64(dst), m));
    }
    pub fn sub_rr(&mut self, dst: Reg, src: Reg) {
        self.e(Instruction::with2(Code::Sub_rm64_r64, r64(dst), r64(src)));
    }
    pub fn and_ri(&mut self, dst: Reg, v: i32) {
        self.e(Instruction::with2(Code::And_rm64_imm32, r64(dst), v));
    }
    pub fn and_r32i(&mut self, dst: Reg, v: u32) {
        self.e(Instruction::with2(Code::And_rm32_imm32, reg(dst, 4), v));
    }
    pub fn or_rr(&mut self, dst: Reg, src: Reg) {
        self.e(Instruction::with2(Code::Or_rm64_r64, r64(dst), r64(src)));
    }
    pub fn or_r32i(&mut self, dst: Reg, v: u32) {
        self.e(Instruction::with2(Code::Or_rm32_imm32, reg(dst, 4), v));
    }
    pub fn xor_rr(&mut self, dst: Reg, src: Reg) {
        self.e(Instruction::with2(Code::Xor_rm64_r64, r64(dst), r64(src)));
    }
    pub fn shl_ri(&mut self, dst: Reg, n: u32) {
        self.e(Instruction::with2(Code::Shl_rm64_imm8, r64(dst), n));
    }
    pub fn shr_ri(&mut self, dst: Reg, n: u32) {
        self.e(Instruction::with2(Code::Shr_rm64_imm8, r64(dst), n));
    }
    pub fn cmp_rm(&mut self, a: Reg, m: MemoryOperand) {
        self.e(Instruction::with2(Code::Cmp_r64_rm64, r64(a), m));
    }
    pub fn test_r32(&mut self, a: Reg, b: Reg) {
        self.e(Instruction::with2(
            Code::Test_rm32_r32,
            reg(a, 4),
            reg(b, 4),
        ));
    }
    pub fn push_r(&mut self, r: Reg) {
        self.e(Instruction::with1(Code::Push_r64, r64(r)));
    }
    pub fn pop_r(&mut self, r: Reg) {
        self.e(Instruction::with1(Code::Pop_r64, r64(r)));
    }
    pub fn pushfq(&mut self) {
        self.bytes(&[0x9c]);
    }
    pub fn popfq(&mut self) {
        self.bytes(&[0x9d]);
    }
    /// `sahf`: SF, ZF, AF, PF, CF from AH (64-bit mode needs CPUID
    /// 8000_0001h ECX bit 0, see [`host_has_sahf`]).
    pub fn sahf(&mut self) {
        self.bytes(&[0x9e]);
    }
    pub fn mov_r32r32(&mut self, dst: Reg, src: Reg) {
        self.e(Instruction::with2(
            Code::Mov_r32_rm32,
            reg(dst, 4),
            reg(src, 4),
        ));
    }
    pub fn shl_r32i(&mut self, dst: Reg, n: u32) {
        self.e(Instruction::with2(Code::Shl_rm32_imm8, reg(dst, 4), n));
    }
    /// `bt r32, bit`: CF = that bit.
    pub fn bt_r32i(&mut self, r: Reg, bit: u32) {
        self.e(Instruction::with2(Code::Bt_rm32_imm8, reg(r, 4), bit));
    }
    /// `adc al, imm8`.
    pub fn adc_al_i(&mut self, v: u8) {
        self.e(Instruction::with2(
            Code::Adc_AL_imm8,
            Register::AL,
            v as u32,
        ));
    }
    pub fn call_r(&mut self, r: Reg) {
        self.e(Instruction::with1(Code::Call_rm64, r64(r)));
    }
    pub fn jmp_r(&mut self, r: Reg) {
        self.e(Instruction::with1(Code::Jmp_rm64, r64(r)));
    }
    pub fn jmp_m(&mut self, m: MemoryOperand) {
        self.e(Instruction::with1(Code::Jmp_rm64, m));
    }
    pub fn inc_m(&mut self, m: MemoryOperand) {
        self.e(Instruction::with1(Code::Inc_rm64, m));
    }
    pub fn ret(&mut self) {
        self.bytes(&[0xc3]);
    }
    /// `bt qword [m], bit`: CF = that bit.
    pub fn bt_mi(&mut self, m: MemoryOperand, bit: u32) {
        self.e(Instruction::with2(Code::Bt_rm64_imm8, m, bit));
    }
    /// `setc byte [m]`.
    pub fn setc_m(&mut self, m: MemoryOperand) {
        self.e(Instruction::with1(Code::Setb_rm8, m));
    }
}

/// Does the host run LAHF/SAHF in 64-bit mode?
pub fn host_has_sahf() -> bool {
    let max = core::arch::x86_64::__cpuid(0x8000_0000).eax;
    max >= 0x8000_0001 && core::arch::x86_64::__cpuid(0x8000_0001).ecx & 1 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_table() {
        assert_eq!(reg(RAX, 1), Register::AL);
        assert_eq!(reg(RBX, 1), Register::BL);
        assert_eq!(reg(RSI, 1), Register::SIL);
        assert_eq!(reg(R8, 1), Register::R8L);
        assert_eq!(reg(R15, 2), Register::R15W);
        assert_eq!(reg(RSP, 4), Register::ESP);
        assert_eq!(reg(R13, 8), Register::R13);
    }

    #[test]
    fn labels_and_rollback() {
        let mut a = Asm::new(0x1000);
        let l = a.label();
        a.jmp(l);
        let m = a.mark();
        a.mov_ri(RAX, 1);
        a.rollback(m);
        a.bind(l);
        a.ret();
        let code = a.finish();
        assert_eq!(code, vec![0xe9, 0, 0, 0, 0, 0xc3]);
    }
}
