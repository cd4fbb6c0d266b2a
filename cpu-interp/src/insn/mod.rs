//! Instruction semantics, one module per group, and the operand helpers
//! they share. Handlers must raise every fault before changing any
//! architectural state (memory writes first, then registers and flags), so
//! that a faulting instruction can be restarted.

use iced_x86::{OpKind, Register};

use crate::block::Insn;
use crate::cpu::Cpu;
use crate::dispatch::Table;
use crate::exception::{Exception, XResult};
use crate::platform::Platform;
use crate::state::gpr;

pub mod aes;
pub mod alu;
pub mod avx;
pub mod avx2;
pub mod bcd;
pub mod bits;
pub mod bmi;
pub mod control;
pub mod fast;
pub mod fma;
pub mod io;
pub mod mmx;
pub mod mov;
pub mod muldiv;
pub mod shift;
pub mod simd;
pub mod simd_fp;
pub mod sse;
pub mod sse4;
pub mod stack;
pub mod string;
pub mod system;
pub mod x87;
pub mod xsave;

/// Register every group's handlers.
pub fn register_all(t: &mut Table) {
    alu::register(t);
    bcd::register(t);
    bits::register(t);
    control::register(t);
    io::register(t);
    mov::register(t);
    muldiv::register(t);
    shift::register(t);
    stack::register(t);
    string::register(t);
    system::register(t);
    xsave::register(t);
    // Floating point and vectors last: they override string-instruction
    // mnemonics shared with SSE (MOVSD, CMPSD).
    x87::register(t);
    mmx::register(t);
    sse::register(t);
    sse4::register(t);
    avx::register(t);
    avx2::register(t);
    fma::register(t);
    bmi::register(t);
    aes::register(t);
}

/// Pick a faster handler for common operand forms (register and
/// immediate operands resolved at decode time). Returns `h` unchanged when
/// no special form applies.
pub fn specialize(d: &Insn, h: crate::dispatch::Handler) -> crate::dispatch::Handler {
    alu::specialize(d)
        .or_else(|| mov::specialize(d))
        .or_else(|| fast::specialize(d))
        .unwrap_or(h)
}

/// Mask of the low `size` bytes.
#[inline(always)]
pub(crate) fn mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// Sign-extend the low `size` bytes of `v`.
#[inline(always)]
pub(crate) fn sext(v: u64, size: usize) -> u64 {
    let sh = 64 - 8 * size as u32;
    (((v << sh) as i64) >> sh) as u64
}

impl Cpu {
    /// Offset (effective address) of the instruction's memory operand.
    #[inline(always)]
    pub(crate) fn ea(&self, d: &Insn) -> u64 {
        let i = &d.i;
        let mut a = i.memory_displacement64();
        let b = i.memory_base();
        if b != Register::None && b != Register::RIP && b != Register::EIP {
            a = a.wrapping_add(self.reg(b));
        }
        let x = i.memory_index();
        if x != Register::None {
            a = a.wrapping_add(self.reg(x).wrapping_mul(u64::from(i.memory_index_scale())));
        }
        a & d.amask
    }

    /// Read operand `n` as `size` bytes (immediates are sign-extended by
    /// the decoder and masked here).
    #[inline(always)]
    pub(crate) fn op_read(
        &mut self,
        p: &mut dyn Platform,
        d: &Insn,
        n: u32,
        size: usize,
    ) -> XResult<u64> {
        match d.i.op_kind(n) {
            OpKind::Register => Ok(self.reg(d.i.op_register(n))),
            OpKind::Memory => {
                let off = self.ea(d);
                self.read_mem(p, d.seg as usize, off, size)
            }
            _ => Ok(d.i.immediate(n) & mask(size)),
        }
    }

    /// Write operand 0 (register or memory) with `size` bytes.
    #[inline(always)]
    pub(crate) fn op0_write(
        &mut self,
        p: &mut dyn Platform,
        d: &Insn,
        size: usize,
        v: u64,
    ) -> XResult<()> {
        if d.i.op0_kind() == OpKind::Register {
            self.set_reg(d.i.op0_register(), v);
            Ok(())
        } else {
            let off = self.ea(d);
            self.write_mem(p, d.seg as usize, off, size, v)
        }
    }

    /// Operand size of a stack push/pop for this instruction (2, 4, 8).
    #[inline(always)]
    pub(crate) fn stack_op_size(&self, d: &Insn) -> usize {
        let inc = d.i.stack_pointer_increment();
        inc.unsigned_abs() as usize
    }

    /// Push `size` bytes.
    #[inline(always)]
    pub(crate) fn push(&mut self, p: &mut dyn Platform, size: usize, v: u64) -> XResult<()> {
        let w = self.stack_width();
        let sp = self.gpr[gpr::RSP].wrapping_sub(size as u64) & w;
        let ss = crate::cpu::sreg::SS;
        if self.bits == 64 {
            if !crate::segment::canonical(sp) {
                return Err(Exception::ss(0));
            }
            let user = self.user();
            self.write_lin(p, sp, size, v, user)?;
        } else {
            self.write_mem(p, ss, sp, size, v)?;
        }
        self.set_sp(sp);
        Ok(())
    }

    /// Read the value `pop` would return, without moving the stack pointer.
    #[inline(always)]
    pub(crate) fn peek(&mut self, p: &mut dyn Platform, size: usize, skip: u64) -> XResult<u64> {
        let w = self.stack_width();
        let sp = self.gpr[gpr::RSP].wrapping_add(skip) & w;
        if self.bits == 64 {
            if !crate::segment::canonical(sp) {
                return Err(Exception::ss(0));
            }
            let user = self.user();
            self.read_lin(p, sp, size, user)
        } else {
            self.read_mem(p, crate::cpu::sreg::SS, sp, size)
        }
    }

    /// Privilege check for instructions that require CPL 0.
    #[inline]
    pub(crate) fn require_cpl0(&self) -> XResult<()> {
        if self.protected() && self.cpl != 0 {
            Err(Exception::gp0())
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
pub(crate) mod testutil;
