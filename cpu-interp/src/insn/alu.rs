//! Integer arithmetic and logic: ADD OR ADC SBB AND SUB XOR CMP TEST, INC
//! DEC NEG NOT.

use iced_x86::{Mnemonic, OpKind};

use super::mask;
use crate::block::Insn;
use crate::cpu::Cpu;
use crate::dispatch::Table;
use crate::exception::XResult;
use crate::flags::FlagOp;
use crate::platform::Platform;

pub fn register(t: &mut Table) {
    t.set_mnemonic(Mnemonic::Add, binop::<ADD>);
    t.set_mnemonic(Mnemonic::Or, binop::<OR>);
    t.set_mnemonic(Mnemonic::Adc, binop::<ADC>);
    t.set_mnemonic(Mnemonic::Sbb, binop::<SBB>);
    t.set_mnemonic(Mnemonic::And, binop::<AND>);
    t.set_mnemonic(Mnemonic::Sub, binop::<SUB>);
    t.set_mnemonic(Mnemonic::Xor, binop::<XOR>);
    t.set_mnemonic(Mnemonic::Cmp, binop::<CMP>);
    t.set_mnemonic(Mnemonic::Test, binop::<TEST>);
    t.set_mnemonic(Mnemonic::Inc, incdec::<true>);
    t.set_mnemonic(Mnemonic::Dec, incdec::<false>);
    t.set_mnemonic(Mnemonic::Neg, neg);
    t.set_mnemonic(Mnemonic::Not, not);
}

/// Fast forms: register/register and register/immediate with 4- or 8-byte
/// operands, the shapes compilers emit most.
pub(crate) fn specialize(d: &Insn) -> Option<crate::dispatch::Handler> {
    let op = match d.i.mnemonic() {
        Mnemonic::Add => ADD,
        Mnemonic::Or => OR,
        Mnemonic::Adc => ADC,
        Mnemonic::Sbb => SBB,
        Mnemonic::And => AND,
        Mnemonic::Sub => SUB,
        Mnemonic::Xor => XOR,
        Mnemonic::Cmp => CMP,
        Mnemonic::Test => TEST,
        Mnemonic::Inc | Mnemonic::Dec => {
            if d.r0 == 0xff || !matches!(d.size, 4 | 8) {
                return None;
            }
            let inc = d.i.mnemonic() == Mnemonic::Inc;
            return Some(match (inc, d.size) {
                (true, 4) => incdec_r::<true, 4>,
                (true, _) => incdec_r::<true, 8>,
                (false, 4) => incdec_r::<false, 4>,
                (false, _) => incdec_r::<false, 8>,
            });
        }
        _ => return None,
    };
    if d.r0 == 0xff || !matches!(d.size, 4 | 8) || d.i.op_count() != 2 {
        return None;
    }
    let reg_src = d.r1 != 0xff;
    let imm_src = !reg_src && d.i.op1_kind() != OpKind::Memory;
    macro_rules! pick {
        ($($k:ident),*) => {
            match (op, d.size, reg_src) {
                $(
                    ($k, 4, true) => Some(binop_rr::<$k, 4> as crate::dispatch::Handler),
                    ($k, 8, true) => Some(binop_rr::<$k, 8>),
                    ($k, 4, false) if imm_src => Some(binop_ri::<$k, 4>),
                    ($k, 8, false) if imm_src => Some(binop_ri::<$k, 8>),
                )*
                _ => None,
            }
        };
    }
    pick!(ADD, OR, ADC, SBB, AND, SUB, XOR, CMP, TEST)
}

#[inline(always)]
fn alu_core<const OP: u8, const SIZE: usize>(cpu: &mut Cpu, r0: usize, a: u64, b: u64) {
    let w = SIZE as u32 * 8;
    let m = mask(SIZE);
    let (r, op) = match OP {
        ADD => (a.wrapping_add(b), FlagOp::Add),
        OR => (a | b, FlagOp::Logic),
        ADC => {
            let c = cpu.flags.cf();
            let r = a.wrapping_add(b).wrapping_add(c as u64) & m;
            cpu.flags.set_lazy_carry(FlagOp::Adc, w, a, b, r, c);
            cpu.gpr[r0] = r;
            return;
        }
        SBB => {
            let c = cpu.flags.cf();
            let r = a.wrapping_sub(b).wrapping_sub(c as u64) & m;
            cpu.flags.set_lazy_carry(FlagOp::Sbb, w, a, b, r, c);
            cpu.gpr[r0] = r;
            return;
        }
        AND | TEST => (a & b, FlagOp::Logic),
        SUB | CMP => (a.wrapping_sub(b), FlagOp::Sub),
        _ => (a ^ b, FlagOp::Logic),
    };
    let r = r & m;
    if OP != CMP && OP != TEST {
        // 32-bit results zero-extend; the mask already did it.
        cpu.gpr[r0] = r;
    }
    cpu.flags.set_lazy(op, w, a, b, r);
}

fn binop_rr<const OP: u8, const SIZE: usize>(
    cpu: &mut Cpu,
    _p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    let m = mask(SIZE);
    let (r0, r1) = (d.r0 as usize, d.r1 as usize);
    let a = cpu.gpr[r0] & m;
    let b = cpu.gpr[r1] & m;
    alu_core::<OP, SIZE>(cpu, r0, a, b);
    Ok(())
}

fn binop_ri<const OP: u8, const SIZE: usize>(
    cpu: &mut Cpu,
    _p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    let r0 = d.r0 as usize;
    let a = cpu.gpr[r0] & mask(SIZE);
    alu_core::<OP, SIZE>(cpu, r0, a, d.imm);
    Ok(())
}

fn incdec_r<const INC: bool, const SIZE: usize>(
    cpu: &mut Cpu,
    _p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    let r0 = d.r0 as usize;
    let a = cpu.gpr[r0] & mask(SIZE);
    let r = if INC {
        a.wrapping_add(1)
    } else {
        a.wrapping_sub(1)
    } & mask(SIZE);
    cpu.gpr[r0] = r;
    cpu.flags.set_incdec(INC, SIZE as u32 * 8, a, r);
    Ok(())
}

const ADD: u8 = 0;
const OR: u8 = 1;
const ADC: u8 = 2;
const SBB: u8 = 3;
const AND: u8 = 4;
const SUB: u8 = 5;
const XOR: u8 = 6;
const CMP: u8 = 7;
const TEST: u8 = 8;

impl Cpu {
    /// Read operand 0 of a read-modify-write instruction; a memory operand
    /// is checked for writing first (see [`Cpu::read_mem_rmw`]).
    pub(crate) fn op0_read_rmw(
        &mut self,
        p: &mut dyn Platform,
        d: &Insn,
        size: usize,
    ) -> XResult<u64> {
        if d.i.op0_kind() == OpKind::Memory {
            let off = self.ea(d);
            return self.read_mem_rmw(p, d.seg as usize, off, size);
        }
        self.op_read(p, d, 0, size)
    }
}

fn binop<const OP: u8>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let a = if OP == CMP || OP == TEST {
        cpu.op_read(p, d, 0, size)?
    } else {
        cpu.op0_read_rmw(p, d, size)?
    };
    let b = cpu.op_read(p, d, 1, size)?;
    let w = size as u32 * 8;
    let (r, op, carry) = match OP {
        ADD => (a.wrapping_add(b), FlagOp::Add, false),
        OR => (a | b, FlagOp::Logic, false),
        ADC => {
            let c = cpu.flags.cf();
            (a.wrapping_add(b).wrapping_add(c as u64), FlagOp::Adc, c)
        }
        SBB => {
            let c = cpu.flags.cf();
            (a.wrapping_sub(b).wrapping_sub(c as u64), FlagOp::Sbb, c)
        }
        AND | TEST => (a & b, FlagOp::Logic, false),
        SUB | CMP => (a.wrapping_sub(b), FlagOp::Sub, false),
        _ => (a ^ b, FlagOp::Logic, false),
    };
    let r = r & mask(size);
    if OP != CMP && OP != TEST {
        cpu.op0_write(p, d, size, r)?;
    }
    if matches!(OP, ADC | SBB) {
        cpu.flags.set_lazy_carry(op, w, a, b, r, carry);
    } else {
        cpu.flags.set_lazy(op, w, a, b, r);
    }
    Ok(())
}

fn incdec<const INC: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let a = cpu.op0_read_rmw(p, d, size)?;
    let r = if INC {
        a.wrapping_add(1)
    } else {
        a.wrapping_sub(1)
    } & mask(size);
    cpu.op0_write(p, d, size, r)?;
    cpu.flags.set_incdec(INC, size as u32 * 8, a, r);
    Ok(())
}

fn neg(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let a = cpu.op0_read_rmw(p, d, size)?;
    let r = 0u64.wrapping_sub(a) & mask(size);
    cpu.op0_write(p, d, size, r)?;
    cpu.flags.set_lazy(FlagOp::Sub, size as u32 * 8, 0, a, r);
    Ok(())
}

fn not(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let a = cpu.op0_read_rmw(p, d, size)?;
    cpu.op0_write(p, d, size, !a & mask(size))
}

#[cfg(test)]
mod tests {
    use crate::flags::*;
    use crate::insn::testutil::*;
    use crate::state::gpr::*;

    #[test]
    fn read_modify_write_faults_report_a_write() {
        // With the 1 GiB at 0x40000000 not mapped (PDPT entry 1 empty):
        // add dword [0x40000000], eax (01 04 25 00 00 00 40) is a
        // read-modify-write, so its #PF error code has W/R set (2, not
        // present, supervisor) as on hardware; cmp dword [0x40000000], eax
        // (39 04 25 00 00 00 40) only reads (error code 0).
        for (code, want) in [
            ([0x01u8, 0x04, 0x25, 0x00, 0x00, 0x00, 0x40], 2u32),
            ([0x39u8, 0x04, 0x25, 0x00, 0x00, 0x00, 0x40], 0u32),
        ] {
            let mut c = new_cpu();
            setup(&mut c, Mode::Long64);
            write_phys(&c, CODE, &code);
            let mut p = TestPlatform::default();
            let insn = c.decode_one(&mut p).expect("decodable");
            let r = (insn.h)(&mut c, &mut p, &insn);
            let e = r.expect_err("#PF");
            assert_eq!(e.vector, crate::exception::PF);
            assert_eq!(e.error_code, Some(want));
            assert_eq!(c.cr2, 0x4000_0000);
        }
        // or qword [0x3ffffffc], rax (48 09 04 25 fc ff ff 3f) straddles
        // into the unmapped GiB: CR2 is the first byte of that page.
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        write_phys(&c, CODE, &[0x48, 0x09, 0x04, 0x25, 0xfc, 0xff, 0xff, 0x3f]);
        let mut p = TestPlatform::default();
        let insn = c.decode_one(&mut p).expect("decodable");
        let e = (insn.h)(&mut c, &mut p, &insn).expect_err("#PF");
        assert_eq!(e.error_code, Some(2));
        assert_eq!(c.cr2, 0x4000_0000);
    }

    #[test]
    fn add_sub_cmp_flags_64() {
        // add rax, rbx ; sub rcx, 1 ; cmp rdx, rdx
        let code = [0x48, 0x01, 0xd8, 0x48, 0x83, 0xe9, 0x01, 0x48, 0x39, 0xd2];
        let c = run(Mode::Long64, &code, |c| {
            c.set_gpr(RAX, u64::MAX);
            c.set_gpr(RBX, 2);
            c.set_gpr(RCX, 0);
            c.set_gpr(RDX, 7);
        });
        assert_eq!(c.gpr(RAX), 1);
        assert_eq!(c.gpr(RCX), u64::MAX);
        assert_eq!(c.rflags() & ARITH, ZF | PF);
    }

    #[test]
    fn partial_registers_and_memory_operands_32() {
        // add al, 0x80 (04 80) ; or ah, 1 (80 cc 01) ; xor ebx, ebx (31 db)
        // adc dword [0x2000], ecx (11 0d 00 20 00 00) ; inc word [0x2004] (66 ff 05 04 20 00 00)
        let code = [
            0x04, 0x80, 0x80, 0xcc, 0x01, 0x31, 0xdb, 0x11, 0x0d, 0x00, 0x20, 0x00, 0x00, 0x66,
            0xff, 0x05, 0x04, 0x20, 0x00, 0x00,
        ];
        let c = run(Mode::Prot32, &code, |c| {
            c.set_gpr(RAX, 0x1234_5680);
            c.set_gpr(RBX, 0xdead);
            c.set_gpr(RCX, 5);
            write_phys(c, 0x2000, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        });
        assert_eq!(c.gpr(RAX), 0x1234_5700);
        assert_eq!(c.gpr(RBX), 0);
        // 0xffffffff + 5 + CF(0: xor cleared it) = 4
        assert_eq!(read_phys(&c, 0x2000, 4), 4);
        assert_eq!(read_phys(&c, 0x2004, 2), 0);
        // inc sets ZF, keeps CF from adc (which carried).
        assert_eq!(c.rflags() & (ZF | CF), ZF | CF);
    }

    #[test]
    fn neg_not_inc_dec_16() {
        // neg ax (f7 d8) ; not bx (f7 d3) ; dec cx (49)
        let code = [0xf7, 0xd8, 0xf7, 0xd3, 0x49];
        let c = run(Mode::Real16, &code, |c| {
            c.set_gpr(RAX, 0xffff_0001);
            c.set_gpr(RBX, 0x00ff);
            c.set_gpr(RCX, 0);
        });
        assert_eq!(c.gpr(RAX), 0xffff_ffff);
        assert_eq!(c.gpr(RBX), 0xff00);
        assert_eq!(c.gpr(RCX), 0xffff);
        // dec keeps CF set by neg of a non-zero value.
        assert_eq!(c.rflags() & (CF | SF | AF), CF | SF | AF);
    }
}
