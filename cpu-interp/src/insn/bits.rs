//! Bit instructions: BT BTS BTR BTC, BSF BSR, POPCNT (and TZCNT/LZCNT, which
//! execute as BSF/BSR because BMI1/LZCNT are not advertised, exactly as on a
//! processor without them).

use iced_x86::{Mnemonic, OpKind};

use super::{mask, sext};
use crate::block::Insn;
use crate::cpu::Cpu;
use crate::dispatch::Table;
use crate::exception::XResult;
use crate::flags::{self, szp};
use crate::platform::Platform;

pub fn register(t: &mut Table) {
    t.set_mnemonic(Mnemonic::Bt, bt::<BT>);
    t.set_mnemonic(Mnemonic::Bts, bt::<BTS>);
    t.set_mnemonic(Mnemonic::Btr, bt::<BTR>);
    t.set_mnemonic(Mnemonic::Btc, bt::<BTC>);
    t.set_mnemonic(Mnemonic::Bsf, bsf);
    t.set_mnemonic(Mnemonic::Tzcnt, bsf);
    t.set_mnemonic(Mnemonic::Bsr, bsr);
    t.set_mnemonic(Mnemonic::Lzcnt, bsr);
    t.set_mnemonic(Mnemonic::Popcnt, popcnt);
}

const BT: u8 = 0;
const BTS: u8 = 1;
const BTR: u8 = 2;
const BTC: u8 = 3;

fn bt<const OP: u8>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let bits = size as u64 * 8;
    let raw = cpu.op_read(p, d, 1, size)?;
    let (bit, byte_off) = if d.i.op0_kind() == OpKind::Memory && d.i.op1_kind() == OpKind::Register
    {
        // A register bit offset addresses memory beyond the operand.
        let off = sext(raw, size) as i64;
        let word = off >> bits.trailing_zeros();
        (off as u64 & (bits - 1), (word * size as i64) as u64)
    } else {
        (raw & (bits - 1), 0)
    };
    let (v, write_at) = if d.i.op0_kind() == OpKind::Memory {
        let off = cpu.ea(d).wrapping_add(byte_off) & d.amask;
        let v = if OP == BT {
            cpu.read_mem(p, d.seg as usize, off, size)?
        } else {
            cpu.read_mem_rmw(p, d.seg as usize, off, size)?
        };
        (v, Some(off))
    } else {
        (cpu.reg(d.i.op0_register()), None)
    };
    let cf = (v >> bit) & 1 != 0;
    let nv = match OP {
        BTS => v | (1 << bit),
        BTR => v & !(1 << bit),
        BTC => v ^ (1 << bit),
        _ => v,
    } & mask(size);
    if OP != BT {
        match write_at {
            Some(off) => cpu.write_mem(p, d.seg as usize, off, size, nv)?,
            None => cpu.set_reg(d.i.op0_register(), nv),
        }
    }
    cpu.flags
        .update_arith(flags::CF, if cf { flags::CF } else { 0 });
    Ok(())
}

pub(crate) fn bsf(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let v = cpu.op_read(p, d, 1, size)? & mask(size);
    if v == 0 {
        cpu.flags.update_arith(flags::ZF, flags::ZF);
    } else {
        cpu.set_reg(d.i.op0_register(), u64::from(v.trailing_zeros()));
        cpu.flags.update_arith(flags::ZF, 0);
    }
    Ok(())
}

pub(crate) fn bsr(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let v = cpu.op_read(p, d, 1, size)? & mask(size);
    if v == 0 {
        cpu.flags.update_arith(flags::ZF, flags::ZF);
    } else {
        cpu.set_reg(d.i.op0_register(), u64::from(63 - v.leading_zeros()));
        cpu.flags.update_arith(flags::ZF, 0);
    }
    Ok(())
}

fn popcnt(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let v = cpu.op_read(p, d, 1, size)? & mask(size);
    cpu.set_reg(d.i.op0_register(), u64::from(v.count_ones()));
    cpu.flags.set_arith(if v == 0 { flags::ZF } else { 0 });
    let _ = szp;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::flags::*;
    use crate::insn::testutil::*;
    use crate::state::gpr::*;

    #[test]
    fn bt_family_register_and_memory() {
        // bts eax, 5 (0f ba e8 05) ; btr dword [0x2000], ecx (0f b3 0d 00 20 00 00) with ecx = 35
        // bsf edx, esi (0f bc d6) ; bsr edi, esi (0f bd fe) ; popcnt ebx, esi (f3 0f b8 de)
        let code = [
            0x0f, 0xba, 0xe8, 0x05, 0x0f, 0xb3, 0x0d, 0x00, 0x20, 0, 0, 0x0f, 0xbc, 0xd6, 0x0f,
            0xbd, 0xfe, 0xf3, 0x0f, 0xb8, 0xde,
        ];
        let c = run(Mode::Prot32, &code, |c| {
            c.set_gpr(RAX, 0);
            c.set_gpr(RCX, 35);
            c.set_gpr(RSI, 0x0001_0100);
            write_phys(c, 0x2000, &[0, 0, 0, 0, 0xff, 0, 0, 0]);
        });
        assert_eq!(c.gpr(RAX), 0x20);
        // Bit 35 = bit 3 of the dword at 0x2004.
        assert_eq!(read_phys(&c, 0x2004, 4), 0xf7);
        assert_eq!(c.gpr(RDX), 8);
        assert_eq!(c.gpr(RDI), 16);
        assert_eq!(c.gpr(RBX), 2);
        assert_eq!(c.rflags() & ZF, 0);
    }

    #[test]
    fn bt_negative_offset_and_bsf_zero() {
        // bt word [0x2002], ax (66 0f a3 05 02 20 00 00) with ax = -1 -> bit 15 of word at 0x2000
        // bsf ecx, edx (0f bc ca) with edx = 0: ZF set, ecx unchanged
        let code = [0x66, 0x0f, 0xa3, 0x05, 0x02, 0x20, 0, 0, 0x0f, 0xbc, 0xca];
        let c = run(Mode::Prot32, &code, |c| {
            c.set_gpr(RAX, 0xffff);
            c.set_gpr(RCX, 77);
            c.set_gpr(RDX, 0);
            write_phys(c, 0x2000, &[0x00, 0x80]);
        });
        assert_eq!(c.rflags() & (CF | ZF), CF | ZF);
        assert_eq!(c.gpr(RCX), 77);
    }
}
