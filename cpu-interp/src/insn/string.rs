//! String instructions: MOVS STOS LODS CMPS SCAS INS OUTS with REP/REPE/
//! REPNE. Each iteration commits before the next, so a fault mid-way leaves
//! RCX/RSI/RDI as hardware does and the instruction restarts where it
//! stopped. Long repeats yield every [`CHUNK`] iterations (RIP stays on the
//! instruction) so that interrupts are not held off.

use iced_x86::{Mnemonic, OpKind};

use crate::block::Insn;
use crate::cpu::{sreg, Cpu};
use crate::dispatch::Table;
use crate::exception::XResult;
use crate::flags::{self, FlagOp};
use crate::platform::Platform;
use crate::state::gpr;

/// Iterations of a REP string instruction between event checks.
pub const CHUNK: u64 = 4096;

pub fn register(t: &mut Table) {
    for m in [
        Mnemonic::Movsb,
        Mnemonic::Movsw,
        Mnemonic::Movsd,
        Mnemonic::Movsq,
    ] {
        // MOVSD also names the SSE2 scalar move; only the string forms have
        // string operand kinds, checked in the handler.
        t.set_mnemonic(m, string_op::<MOVS>);
    }
    for m in [
        Mnemonic::Stosb,
        Mnemonic::Stosw,
        Mnemonic::Stosd,
        Mnemonic::Stosq,
    ] {
        t.set_mnemonic(m, string_op::<STOS>);
    }
    for m in [
        Mnemonic::Lodsb,
        Mnemonic::Lodsw,
        Mnemonic::Lodsd,
        Mnemonic::Lodsq,
    ] {
        t.set_mnemonic(m, string_op::<LODS>);
    }
    for m in [
        Mnemonic::Cmpsb,
        Mnemonic::Cmpsw,
        Mnemonic::Cmpsd,
        Mnemonic::Cmpsq,
    ] {
        t.set_mnemonic(m, string_op::<CMPS>);
    }
    for m in [
        Mnemonic::Scasb,
        Mnemonic::Scasw,
        Mnemonic::Scasd,
        Mnemonic::Scasq,
    ] {
        t.set_mnemonic(m, string_op::<SCAS>);
    }
    for m in [Mnemonic::Insb, Mnemonic::Insw, Mnemonic::Insd] {
        t.set_mnemonic(m, string_op::<INS>);
    }
    for m in [Mnemonic::Outsb, Mnemonic::Outsw, Mnemonic::Outsd] {
        t.set_mnemonic(m, string_op::<OUTS>);
    }
}

const MOVS: u8 = 0;
const STOS: u8 = 1;
const LODS: u8 = 2;
const CMPS: u8 = 3;
const SCAS: u8 = 4;
const INS: u8 = 5;
const OUTS: u8 = 6;

/// Element size from the memory operand.
fn element_size(d: &Insn) -> usize {
    d.i.memory_size().size()
}

#[inline(always)]
fn bump(cpu: &mut Cpu, r: usize, delta: u64, am: u64) {
    let v = cpu.gpr[r].wrapping_add(delta) & am;
    cpu.gpr[r] = if am == 0xffff {
        (cpu.gpr[r] & !0xffff) | v
    } else {
        v
    };
}

fn string_op<const OP: u8>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let is_string = (0..d.i.op_count()).any(|n| {
        matches!(
            d.i.op_kind(n),
            OpKind::MemorySegSI
                | OpKind::MemorySegESI
                | OpKind::MemorySegRSI
                | OpKind::MemoryESDI
                | OpKind::MemoryESEDI
                | OpKind::MemoryESRDI
        )
    });
    if !is_string {
        return crate::dispatch::unimplemented(cpu, p, d);
    }
    let size = element_size(d);
    let am = d.amask;
    let rep = d.i.has_rep_prefix() || d.i.has_repne_prefix();
    let repne = d.i.has_repne_prefix();
    let src_seg = d.seg as usize;
    if OP == INS || OP == OUTS {
        let port = cpu.gpr[gpr::RDX] as u16;
        cpu.check_io_permission(p, port, size)?;
    }
    let step = if cpu.flags.test(flags::DF) {
        (size as u64).wrapping_neg()
    } else {
        size as u64
    };
    let mut n = 0u64;
    loop {
        if rep && cpu.gpr[gpr::RCX] & am == 0 {
            break;
        }
        let si = cpu.gpr[gpr::RSI] & am;
        let di = cpu.gpr[gpr::RDI] & am;
        match OP {
            MOVS => {
                let v = cpu.read_mem(p, src_seg, si, size)?;
                cpu.write_mem(p, sreg::ES, di, size, v)?;
                bump(cpu, gpr::RSI, step, am);
                bump(cpu, gpr::RDI, step, am);
            }
            STOS => {
                let v = cpu.gpr[gpr::RAX];
                cpu.write_mem(p, sreg::ES, di, size, v)?;
                bump(cpu, gpr::RDI, step, am);
            }
            LODS => {
                let v = cpu.read_mem(p, src_seg, si, size)?;
                cpu.set_gpr_sized(gpr::RAX, size as u32, v);
                bump(cpu, gpr::RSI, step, am);
            }
            CMPS => {
                let a = cpu.read_mem(p, src_seg, si, size)?;
                let b = cpu.read_mem(p, sreg::ES, di, size)?;
                bump(cpu, gpr::RSI, step, am);
                bump(cpu, gpr::RDI, step, am);
                cpu.flags
                    .set_lazy(FlagOp::Sub, size as u32 * 8, a, b, a.wrapping_sub(b));
            }
            SCAS => {
                let a = cpu.gpr[gpr::RAX] & super::mask(size);
                let b = cpu.read_mem(p, sreg::ES, di, size)?;
                bump(cpu, gpr::RDI, step, am);
                cpu.flags
                    .set_lazy(FlagOp::Sub, size as u32 * 8, a, b, a.wrapping_sub(b));
            }
            INS => {
                // The destination is checked before the port is read.
                cpu.probe_write(p, sreg::ES, di, size)?;
                let mut buf = [0u8; 4];
                p.retired_hint(cpu.retired);
    cpu.io_happened = true;
                p.io_read(cpu.gpr[gpr::RDX] as u16, &mut buf[..size]);
                cpu.write_mem(p, sreg::ES, di, size, u64::from(u32::from_le_bytes(buf)))?;
                bump(cpu, gpr::RDI, step, am);
            }
            _ => {
                let v = cpu.read_mem(p, src_seg, si, size)?;
                p.retired_hint(cpu.retired);
    cpu.io_happened = true;
                p.io_write(cpu.gpr[gpr::RDX] as u16, &v.to_le_bytes()[..size]);
                bump(cpu, gpr::RSI, step, am);
            }
        }
        if !rep {
            break;
        }
        bump(cpu, gpr::RCX, u64::MAX, am);
        if OP == CMPS || OP == SCAS {
            let zf = cpu.flags.zf();
            if (repne && zf) || (!repne && !zf) {
                break;
            }
        }
        n += 1;
        if n >= CHUNK && cpu.gpr[gpr::RCX] & am != 0 {
            // Yield: re-execute this instruction after event checks.
            cpu.rip = d.i.ip();
            cpu.end_block = true;
            break;
        }
        if OP == INS || OP == OUTS {
            if p.stop_requested() && cpu.gpr[gpr::RCX] & am != 0 {
                cpu.rip = d.i.ip();
                cpu.end_block = true;
                break;
            }
        }
    }
    if OP == INS || OP == OUTS {
        cpu.end_block = true;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::flags::*;
    use crate::insn::testutil::*;
    use crate::state::gpr::*;

    #[test]
    fn rep_movsb_stosd_64() {
        // rep movsb (f3 a4) ; rep stosd (f3 ab)
        let code = [0xf3, 0xa4, 0xf3, 0xab];
        let c = run(Mode::Long64, &code, |c| {
            write_phys(c, 0x2000, b"hello");
            c.set_gpr(RSI, 0x2000);
            c.set_gpr(RDI, 0x3000);
            c.set_gpr(RCX, 5);
            c.set_gpr(RAX, 0x4141_4141);
        });
        let mut b = [0u8; 5];
        assert!(c.ram().read(0x3000, &mut b));
        assert_eq!(&b, b"hello");
        // RCX was 0 for the stosd: nothing stored, RDI stays.
        assert_eq!(c.gpr(RDI), 0x3005);
        assert_eq!(c.gpr(RSI), 0x2005);
    }

    #[test]
    fn repne_scasb_finds_terminator_16() {
        // repne scasb (f2 ae): search for AL=0 in "abc\0"
        let code = [0xf2, 0xae];
        let c = run(Mode::Real16, &code, |c| {
            write_phys(c, 0x2000, b"abc\0xyz");
            c.set_gpr(RDI, 0x2000);
            c.set_gpr(RCX, 0xffff);
            c.set_gpr(RAX, 0);
        });
        assert_eq!(c.gpr(RDI), 0x2004);
        assert_eq!(c.gpr(RCX), 0xffff - 4);
        assert_ne!(c.rflags() & ZF, 0);
    }

    #[test]
    fn repe_cmpsd_and_std_lodsw_32() {
        // repe cmpsd (f3 a7) ; std (fd) ; lodsw (66 ad)
        let code = [0xf3, 0xa7, 0xfd, 0x66, 0xad];
        let c = run(Mode::Prot32, &code, |c| {
            write_phys(c, 0x2000, &[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]);
            write_phys(c, 0x3000, &[1, 0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0]);
            c.set_gpr(RSI, 0x2000);
            c.set_gpr(RDI, 0x3000);
            c.set_gpr(RCX, 3);
        });
        // Stops after the third (mismatching) element.
        assert_eq!(c.gpr(RCX), 0);
        assert_eq!(c.rflags() & (ZF | CF), CF);
        // lodsw at ESI=0x200c reads 0, then ESI -= 2.
        assert_eq!(c.gpr(RSI), 0x200a);
    }

    #[test]
    fn rep_outsb_traces_each_element() {
        // rep outsb (f3 6e)
        let code = [0xf3, 0x6e];
        let (_, p) = run_with(Mode::Prot32, &code, |c| {
            write_phys(c, 0x2000, b"hi!");
            c.set_gpr(RSI, 0x2000);
            c.set_gpr(RCX, 3);
            c.set_gpr(RDX, 0x3f8);
        });
        let bytes: Vec<u8> = p
            .out
            .iter()
            .map(|(port, d)| {
                assert_eq!(*port, 0x3f8);
                d[0]
            })
            .collect();
        assert_eq!(bytes, b"hi!");
    }
}
