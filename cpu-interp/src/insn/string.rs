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
    let fast = rep && (OP == MOVS || OP == STOS) && step == size as u64;
    loop {
        if rep && cpu.gpr[gpr::RCX] & am == 0 {
            break;
        }
        if fast {
            if let Some(k) = fast_chunk::<OP>(cpu, p, size, am, src_seg)? {
                // Count page-sized chunks lightly against the yield budget.
                n += k.div_ceil(16);
                if n >= CHUNK && cpu.gpr[gpr::RCX] & am != 0 {
                    cpu.rip = d.i.ip();
                    cpu.end_block = true;
                    break;
                }
                continue;
            }
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
        if (OP == INS || OP == OUTS) && p.stop_requested() && cpu.gpr[gpr::RCX] & am != 0 {
            cpu.rip = d.i.ip();
            cpu.end_block = true;
            break;
        }
    }
    if OP == INS || OP == OUTS {
        cpu.end_block = true;
    }
    Ok(())
}

/// REP MOVS / REP STOS with DF = 0 on RAM: do as many elements as fit in
/// the current source and destination pages with one host copy. Returns
/// `None` when the slow path must take the next element (MMIO, a page
/// holding decoded code, an element crossing a page, an address-size wrap).
fn fast_chunk<const OP: u8>(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    size: usize,
    am: u64,
    src_seg: usize,
) -> XResult<Option<u64>> {
    let count = cpu.gpr[gpr::RCX] & am;
    let di = cpu.gpr[gpr::RDI] & am;
    let user = cpu.user();
    let dst_lin = cpu.linear(sreg::ES, di, size as u64, true)?;
    let mut k = count.min((0x1000 - (dst_lin & 0xfff)) / size as u64);
    // Stay below the address-size wrap.
    k = k.min((am - di) / size as u64 + 1);
    let si = cpu.gpr[gpr::RSI] & am;
    let src_lin = if OP == MOVS {
        let l = cpu.linear(src_seg, si, size as u64, false)?;
        k = k.min((0x1000 - (l & 0xfff)) / size as u64);
        k = k.min((am - si) / size as u64 + 1);
        l
    } else {
        0
    };
    if k < 2 {
        return Ok(None);
    }
    let bytes = k * size as u64;
    // Segment limits for the whole chunk.
    cpu.linear(sreg::ES, di, bytes, true)?;
    if OP == MOVS {
        cpu.linear(src_seg, si, bytes, false)?;
    }
    let Some(dst) = cpu.host_ptr(p, dst_lin, crate::mmu::Access::Write, user)? else {
        return Ok(None);
    };
    if OP == MOVS {
        let Some(src) = cpu.host_ptr(p, src_lin, crate::mmu::Access::Read, user)? else {
            return Ok(None);
        };
        let (s0, d0) = (src as usize, dst as usize);
        if d0 > s0 && d0 < s0 + bytes as usize {
            // Overlap with the destination ahead: x86 copies forward one
            // element at a time, replicating the pattern.
            for e in 0..k as usize * size {
                // SAFETY: both ranges lie inside one mapped RAM page each
                // (host_ptr checked the page, k keeps the range in it).
                unsafe { *dst.add(e) = *src.add(e) };
            }
        } else {
            // SAFETY: as above; `copy` handles the remaining overlap case
            // (destination before source), where a forward copy is exact.
            unsafe { std::ptr::copy(src, dst, bytes as usize) };
        }
        bump(cpu, gpr::RSI, bytes, am);
    } else {
        let v = cpu.gpr[gpr::RAX].to_le_bytes();
        if size == 1 {
            // SAFETY: the range lies inside one mapped RAM page.
            unsafe { std::ptr::write_bytes(dst, v[0], bytes as usize) };
        } else {
            for e in 0..k as usize {
                // SAFETY: as above, element e ends within the page.
                unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), dst.add(e * size), size) };
            }
        }
    }
    bump(cpu, gpr::RDI, bytes, am);
    bump(cpu, gpr::RCX, k.wrapping_neg(), am);
    Ok(Some(k))
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
    fn fast_rep_paths_match_x86_semantics() {
        // rep movsb (f3 a4) with the destination one byte ahead of the
        // source replicates the first byte; then rep stosd (f3 ab) across a
        // page boundary.
        let code = [
            0xf3, 0xa4, 0xbf, 0xf8, 0x2f, 0x00, 0x00, 0xb9, 0x04, 0, 0, 0, 0xf3, 0xab,
        ];
        let c = run(Mode::Prot32, &code, |c| {
            write_phys(c, 0x5000, b"abcdefgh");
            c.set_gpr(RSI, 0x5000);
            c.set_gpr(RDI, 0x5001);
            c.set_gpr(RCX, 7);
            c.set_gpr(RAX, 0x1122_3344);
        });
        let mut b = [0u8; 8];
        assert!(c.ram().read(0x5000, &mut b));
        assert_eq!(&b, b"aaaaaaaa");
        // mov edi, 0x2ff8 ; mov ecx, 4 ; rep stosd: 16 bytes over 0x3000.
        for k in 0..4 {
            assert_eq!(read_phys(&c, 0x2ff8 + 4 * k, 4), 0x1122_3344);
        }
        assert_eq!(c.gpr(RDI), 0x3008);
        assert_eq!(c.gpr(RCX), 0);
    }

    #[test]
    fn rep_movs_into_code_invalidates_it() {
        // The copy overwrites the HLT that follows with a NOP... the
        // block containing it was decoded already, so the write must drop it.
        // rep movsb (f3 a4) copying one NOP (0x90) over the byte at CODE+2,
        // then inc ebx (43) and HLT.
        let code = [0xf3, 0xa4, 0xf4, 0x43];
        let c = run(Mode::Prot32, &code, |c| {
            write_phys(c, 0x5000, &[0x90, 0x90]);
            c.set_gpr(RSI, 0x5000);
            c.set_gpr(RDI, CODE + 2);
            c.set_gpr(RCX, 2);
        });
        // Both the HLT and the INC were replaced by NOPs; the appended HLT ran.
        assert_eq!(c.gpr(RBX), 0);
        assert_eq!(c.rip(), CODE + 5);
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
