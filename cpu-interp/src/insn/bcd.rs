//! Decimal adjust: DAA DAS AAA AAS AAM AAD (legacy modes only; the decoder
//! rejects them in 64-bit mode).

use iced_x86::{Mnemonic, Register};

use crate::block::Insn;
use crate::cpu::Cpu;
use crate::dispatch::Table;
use crate::exception::{Exception, XResult};
use crate::flags::{self, szp};
use crate::platform::Platform;
use crate::state::gpr;

pub fn register(t: &mut Table) {
    t.set_mnemonic(Mnemonic::Daa, daa);
    t.set_mnemonic(Mnemonic::Das, das);
    t.set_mnemonic(Mnemonic::Aaa, aaa);
    t.set_mnemonic(Mnemonic::Aas, aas);
    t.set_mnemonic(Mnemonic::Aam, aam);
    t.set_mnemonic(Mnemonic::Aad, aad);
}

fn daa(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    let old_al = cpu.reg(Register::AL);
    let old_cf = cpu.flags.cf();
    let mut al = old_al;
    // The carry out of the low-nibble step is superseded by the high step.
    let af = if al & 0xf > 9 || cpu.flags.af() {
        al = (al + 6) & 0xff;
        true
    } else {
        false
    };
    let cf = old_al > 0x99 || old_cf;
    if cf {
        al = (al + 0x60) & 0xff;
    }
    cpu.set_reg(Register::AL, al);
    cpu.flags
        .set_arith(szp(8, al) | bit(cf, flags::CF) | bit(af, flags::AF));
    Ok(())
}

fn das(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    let old_al = cpu.reg(Register::AL);
    let old_cf = cpu.flags.cf();
    let mut al = old_al;
    let mut cf = false;
    let af = if al & 0xf > 9 || cpu.flags.af() {
        cf = old_cf || al < 6;
        al = al.wrapping_sub(6) & 0xff;
        true
    } else {
        false
    };
    if old_al > 0x99 || old_cf {
        al = al.wrapping_sub(0x60) & 0xff;
        cf = true;
    }
    cpu.set_reg(Register::AL, al);
    cpu.flags
        .set_arith(szp(8, al) | bit(cf, flags::CF) | bit(af, flags::AF));
    Ok(())
}

fn aaa(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    let ax = cpu.gpr[gpr::RAX] & 0xffff;
    let adjust = ax & 0xf > 9 || cpu.flags.af();
    let nax = if adjust { ax.wrapping_add(0x106) } else { ax };
    let nax = nax & 0xff0f;
    cpu.set_gpr_sized(gpr::RAX, 2, nax);
    let keep = cpu.flags.arith() & (flags::SF | flags::ZF | flags::PF | flags::OF);
    cpu.flags
        .set_arith(keep | bit(adjust, flags::CF | flags::AF));
    Ok(())
}

fn aas(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    let ax = cpu.gpr[gpr::RAX] & 0xffff;
    let adjust = ax & 0xf > 9 || cpu.flags.af();
    // SDM AAS: AX <- AX - 6 (a borrow out of AL reaches AH), then
    // AH <- AH - 1, as AAA adds 106H to AX (the 8086 adjusted AL and AH
    // separately; the SDM describes every processor since).
    let nax = if adjust {
        ax.wrapping_sub(6).wrapping_sub(0x100) & 0xffff
    } else {
        ax
    };
    cpu.set_gpr_sized(gpr::RAX, 2, nax & 0xff0f);
    let keep = cpu.flags.arith() & (flags::SF | flags::ZF | flags::PF | flags::OF);
    cpu.flags
        .set_arith(keep | bit(adjust, flags::CF | flags::AF));
    Ok(())
}

fn aam(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let base = d.i.immediate(0) & 0xff;
    if base == 0 {
        return Err(Exception::de());
    }
    let al = cpu.reg(Register::AL);
    let nal = al % base;
    cpu.set_gpr_sized(gpr::RAX, 2, ((al / base) << 8) | nal);
    cpu.flags.set_arith(szp(8, nal));
    Ok(())
}

fn aad(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let base = d.i.immediate(0) & 0xff;
    let al = cpu.reg(Register::AL);
    let ah = cpu.reg(Register::AH);
    let nal = (al + ah * base) & 0xff;
    cpu.set_gpr_sized(gpr::RAX, 2, nal);
    cpu.flags.set_arith(szp(8, nal));
    Ok(())
}

#[inline(always)]
fn bit(on: bool, b: u64) -> u64 {
    if on {
        b
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use crate::flags::*;
    use crate::insn::testutil::*;
    use crate::state::gpr::*;

    #[test]
    fn daa_after_add() {
        // add al, 0x38 (04 38) ; daa (27): 0x79 + 0x38 = 0xb1 -> 0x17 with CF (79 + 38 = 117)
        let c = run(Mode::Real16, &[0x04, 0x38, 0x27], |c| c.set_gpr(RAX, 0x79));
        assert_eq!(c.gpr(RAX) & 0xff, 0x17);
        assert_ne!(c.rflags() & CF, 0);
    }

    #[test]
    fn das_aaa_aas_aam_aad() {
        // sub al, 0x47 (2c 47) ; das (2f): 0x35 - 0x47 -> 0x88 with CF (35 - 47 = -12 -> 88)
        let c = run(Mode::Real16, &[0x2c, 0x47, 0x2f], |c| c.set_gpr(RAX, 0x35));
        assert_eq!(c.gpr(RAX) & 0xff, 0x88);
        assert_ne!(c.rflags() & CF, 0);
        // mov ax, 0x0009 ; add al, 8 ; aaa -> ax = 0x0107
        let c = run(Mode::Real16, &[0xb8, 0x09, 0x00, 0x04, 0x08, 0x37], |_| {});
        assert_eq!(c.gpr(RAX) & 0xffff, 0x0107);
        // mov ax, 0x0102 ; sub al, 5 ; aas -> ax = 0x0007 with CF
        let c = run(Mode::Real16, &[0xb8, 0x02, 0x01, 0x2c, 0x05, 0x3f], |_| {});
        assert_eq!(c.gpr(RAX) & 0xffff, 0x0007);
        // mov al, 47 ; aam (d4 0a) -> ax = 0x0407 ; aad (d5 0a) -> ax = 47
        let c = run(Mode::Prot32, &[0xb0, 47, 0xd4, 0x0a], |_| {});
        assert_eq!(c.gpr(RAX) & 0xffff, 0x0407);
        let c = run(Mode::Prot32, &[0xb8, 0x07, 0x04, 0, 0, 0xd5, 0x0a], |_| {});
        assert_eq!(c.gpr(RAX) & 0xffff, 47);
    }
}
