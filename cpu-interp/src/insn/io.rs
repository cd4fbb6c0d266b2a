//! Port I/O: IN, OUT, and the IOPL / TSS I/O-bitmap permission check shared
//! with INS/OUTS.

use iced_x86::{Mnemonic, OpKind};

use crate::block::Insn;
use crate::cpu::Cpu;
use crate::dispatch::Table;
use crate::exception::{Exception, XResult};
use crate::platform::Platform;
use crate::state::gpr;

pub fn register(t: &mut Table) {
    t.set_mnemonic(Mnemonic::In, in_);
    t.set_mnemonic(Mnemonic::Out, out);
}

impl Cpu {
    /// #GP(0) unless the current privilege may access `size` ports at
    /// `port`: always in real mode and when CPL <= IOPL, else (and always in
    /// virtual-8086 mode) only if the TSS I/O bitmap clears every bit.
    pub(crate) fn check_io_permission(
        &mut self,
        p: &mut dyn Platform,
        port: u16,
        size: usize,
    ) -> XResult<()> {
        if !self.protected() || (!self.vm86() && self.cpl <= self.flags.iopl()) {
            return Ok(());
        }
        let tr = self.tr;
        // Only a 32/64-bit TSS has a bitmap.
        if tr.unusable || tr.type_ & 0x9 != 0x9 || tr.limit < 0x67 {
            return Err(Exception::gp0());
        }
        let base_lin = tr.base.wrapping_add(0x66) & self.lin_mask();
        let map = self.read_lin(p, base_lin, 2, false)?;
        let first = map + u64::from(port / 8);
        if first + 1 > u64::from(tr.limit) {
            return Err(Exception::gp0());
        }
        let bits = self.read_lin(p, tr.base.wrapping_add(first) & self.lin_mask(), 2, false)?;
        let want = ((1u64 << size) - 1) << (port % 8);
        if bits & want != 0 {
            return Err(Exception::gp0());
        }
        Ok(())
    }
}

fn port_of(cpu: &Cpu, d: &Insn, n: u32) -> u16 {
    match d.i.op_kind(n) {
        OpKind::Immediate8 => d.i.immediate8() as u16,
        _ => cpu.gpr[gpr::RDX] as u16,
    }
}

fn in_(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.size as usize;
    let port = port_of(cpu, d, 1);
    cpu.check_io_permission(p, port, size)?;
    let mut buf = [0u8; 4];
    p.retired_hint(cpu.retired);
    cpu.io_happened = true;
    p.io_read(port, &mut buf[..size]);
    cpu.take_foreign_writes();
    cpu.note_io_access(port, size);
    cpu.set_gpr_sized(gpr::RAX, size as u32, u64::from(u32::from_le_bytes(buf)));
    cpu.end_block = true;
    Ok(())
}

fn out(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let size = d.i.op1_register().size();
    let port = port_of(cpu, d, 0);
    cpu.check_io_permission(p, port, size)?;
    let v = cpu.gpr[gpr::RAX];
    p.retired_hint(cpu.retired);
    cpu.io_happened = true;
    p.io_write(port, &v.to_le_bytes()[..size]);
    cpu.take_foreign_writes();
    cpu.note_io_access(port, size);
    cpu.end_block = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::insn::testutil::*;
    use crate::state::gpr::*;

    #[test]
    fn in_out_forms() {
        // out 0x80, al (e6 80) ; mov dx, 0x3f8 (66 ba f8 03) ; out dx, eax (ef)
        // in ax, dx (66 ed) ; in al, 0x61 (e4 61)
        let code = [
            0xe6, 0x80, 0x66, 0xba, 0xf8, 0x03, 0xef, 0x66, 0xed, 0xe4, 0x61,
        ];
        let (c, p) = run_with(Mode::Prot32, &code, |c| c.set_gpr(RAX, 0x1122_3344));
        assert_eq!(p.out[0], (0x80, vec![0x44]));
        assert_eq!(p.out[1], (0x3f8, vec![0x44, 0x33, 0x22, 0x11]));
        // TestPlatform answers reads with in_value = 0.
        assert_eq!(c.gpr(RAX), 0x1122_0000);
    }
}
