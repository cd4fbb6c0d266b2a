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
    if rep && am == 0xffff_ffff {
        // With a 32-bit address size, REP writes ECX back (zero-extended)
        // even when it runs no iteration or faults in the first one, and
        // REP MOVS/STOS do the same with their pointers (as hardware does;
        // REP LODS/CMPS/SCAS leave the pointers alone until they move).
        cpu.gpr[gpr::RCX] &= am;
        if matches!(OP, MOVS | STOS) {
            cpu.gpr[gpr::RDI] &= am;
        }
        if OP == MOVS {
            cpu.gpr[gpr::RSI] &= am;
        }
    }
    // A REP CMPS/SCAS that faults part-way leaves RFLAGS as it was before
    // the instruction on Intel (and KVM's emulator), as the last completed
    // iteration left them on AMD; the registers show the progress so far.
    let restore_flags = rep && cpu.quirks.rep_fault_restores_flags;
    let saved_flags = cpu.flags;
    macro_rules! keep_flags {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => {
                    if restore_flags {
                        cpu.flags = saved_flags;
                    }
                    return Err(e);
                }
            }
        };
    }
    let mut n = 0u64;
    // Single-stepping traps after every iteration, and so may a watchpoint:
    // do one, then come back.
    let tf = cpu.flags.test(flags::TF) || cpu.debug_active();
    let chunk = if tf { 1 } else { CHUNK };
    let fast = rep && !tf && (OP == MOVS || OP == STOS) && step == size as u64;
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
                // Most processors access ES:[rDI] before DS:[rSI] here
                // (unlike MOVS): a fault on both reports the rDI one; Zen 4
                // reads the source first (`Quirks::cmps_source_first`).
                let (a, b) = if cpu.quirks.cmps_source_first {
                    let a = keep_flags!(cpu.read_mem(p, src_seg, si, size));
                    (a, keep_flags!(cpu.read_mem(p, sreg::ES, di, size)))
                } else {
                    let b = keep_flags!(cpu.read_mem(p, sreg::ES, di, size));
                    (keep_flags!(cpu.read_mem(p, src_seg, si, size)), b)
                };
                bump(cpu, gpr::RSI, step, am);
                bump(cpu, gpr::RDI, step, am);
                cpu.flags
                    .set_lazy(FlagOp::Sub, size as u32 * 8, a, b, a.wrapping_sub(b));
            }
            SCAS => {
                let a = cpu.gpr[gpr::RAX] & super::mask(size);
                let b = keep_flags!(cpu.read_mem(p, sreg::ES, di, size));
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
                cpu.take_foreign_writes();
                cpu.note_io_access(cpu.gpr[gpr::RDX] as u16, size);
                cpu.write_mem(p, sreg::ES, di, size, u64::from(u32::from_le_bytes(buf)))?;
                bump(cpu, gpr::RDI, step, am);
            }
            _ => {
                let v = cpu.read_mem(p, src_seg, si, size)?;
                p.retired_hint(cpu.retired);
                cpu.io_happened = true;
                p.io_write(cpu.gpr[gpr::RDX] as u16, &v.to_le_bytes()[..size]);
                cpu.take_foreign_writes();
                cpu.note_io_access(cpu.gpr[gpr::RDX] as u16, size);
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
        if n >= chunk && cpu.gpr[gpr::RCX] & am != 0 {
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
    let si = cpu.gpr[gpr::RSI] & am;
    let user = cpu.user();
    // MOVS reads its source first: its faults come first, as on hardware.
    let src_lin = if OP == MOVS {
        cpu.linear(src_seg, si, size as u64, false)?
    } else {
        0
    };
    let dst_lin = cpu.linear(sreg::ES, di, size as u64, true)?;
    let mut k = count.min((0x1000 - (dst_lin & 0xfff)) / size as u64);
    // Stay below the address-size wrap.
    // (With 64-bit addresses and a pointer of 0 the bound is 2^64: it
    // saturates, found by the cpu_exec fuzzer in an overflow-checked build.)
    k = k.min(((am - di) / size as u64).saturating_add(1));
    if OP == MOVS {
        k = k.min((0x1000 - (src_lin & 0xfff)) / size as u64);
        k = k.min(((am - si) / size as u64).saturating_add(1));
    }
    if k < 2 {
        return Ok(None);
    }
    let bytes = k * size as u64;
    // Segment limits for the whole chunk.
    if OP == MOVS {
        cpu.linear(src_seg, si, bytes, false)?;
    }
    cpu.linear(sreg::ES, di, bytes, true)?;
    let src = if OP == MOVS {
        match cpu.host_ptr(p, src_lin, crate::mmu::Access::Read, user)? {
            Some(s) => s,
            None => return Ok(None),
        }
    } else {
        std::ptr::null_mut()
    };
    let Some(dst) = cpu.host_ptr(p, dst_lin, crate::mmu::Access::Write, user)? else {
        return Ok(None);
    };
    if OP == MOVS {
        let (s0, d0) = (src as usize, dst as usize);
        if d0 > s0 && d0 < s0 + bytes as usize {
            // Overlap with the destination ahead: x86 moves one element at
            // a time, each read whole before it is written (so a distance
            // smaller than the element size does not replicate bytes).
            for e in 0..k as usize {
                let mut tmp = [0u8; 8];
                // SAFETY: both ranges lie inside one mapped RAM page each
                // (host_ptr checked the page, k keeps the range in it);
                // `tmp` holds `size` <= 8 bytes and overlaps neither.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.add(e * size), tmp.as_mut_ptr(), size);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst.add(e * size), size);
                }
            }
        } else {
            // SAFETY: as above; `copy` handles the remaining overlap case
            // (destination before source), where a forward copy is exact.
            unsafe { std::ptr::copy(src, dst, bytes as usize) };
        }
        bump(cpu, gpr::RSI, bytes, am);
    } else {
        let v = cpu.gpr[gpr::RAX].to_le_bytes();
        if v[1..size].iter().all(|&b| b == v[0]) {
            // One byte repeated (the kernel's zeroing `rep stosq`): a memset.
            // SAFETY: the range lies inside one mapped RAM page.
            unsafe { std::ptr::write_bytes(dst, v[0], bytes as usize) };
        } else {
            // Typed stores (a copy of `size` bytes per element would be a
            // call to memcpy each).
            let n = k as usize;
            let rax = cpu.gpr[gpr::RAX];
            // SAFETY: as above, element e of `size` bytes ends within the
            // page; unaligned stores are fine on any address.
            unsafe {
                match size {
                    2 => (0..n).for_each(|e| dst.cast::<u16>().add(e).write_unaligned(rax as u16)),
                    4 => (0..n).for_each(|e| dst.cast::<u32>().add(e).write_unaligned(rax as u32)),
                    _ => (0..n).for_each(|e| dst.cast::<u64>().add(e).write_unaligned(rax)),
                }
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
    fn rep_with_32_bit_addresses_writes_back_32_bit_registers() {
        // rep stosq [edi] (67 f3 48 ab) in 64-bit mode with RCX = 0 and
        // RDI = 0x1_0000_3000: no iteration, but RDI is written back as EDI
        // (zero-extended), as on hardware; a plain stosq [edi] (67 48 ab)
        // updates RDI as EDI + 8; rep lodsb [esi] (67 f3 ac) with RCX = 0
        // leaves RSI alone but writes ECX back.
        let c = run(Mode::Long64, &[0x67, 0xf3, 0x48, 0xab], |c| {
            c.set_gpr(RDI, 0x1_0000_3000);
            c.set_gpr(RCX, 0);
        });
        assert_eq!(c.gpr(RDI), 0x3000);
        let c = run(Mode::Long64, &[0x67, 0x48, 0xab], |c| {
            c.set_gpr(RDI, 0x1_0000_3000);
        });
        assert_eq!(c.gpr(RDI), 0x3008);
        let c = run(Mode::Long64, &[0x67, 0xf3, 0xac], |c| {
            c.set_gpr(RSI, 0x1_0000_3000);
            c.set_gpr(RCX, 0x1_0000_0000);
        });
        assert_eq!((c.gpr(RSI), c.gpr(RCX)), (0x1_0000_3000, 0));
    }

    #[test]
    fn faulting_rep_cmps_keeps_the_flags_from_before() {
        // repne scasb (f2 ae) from 0x1ffffe into the 2 MiB page at 0x200000
        // made not present, with AL = 0xff and no match: two iterations,
        // then #PF, RDI/RCX showing the progress. Intel leaves RFLAGS as
        // before the instruction (ZF CF set); AMD as the last completed
        // compare left them (0xff - 2: no borrow, not zero, negative).
        for (quirks, flags) in [
            (crate::quirks::Quirks::INTEL, ZF | CF),
            (crate::quirks::Quirks::AMD, SF),
        ] {
            let mut c = new_cpu();
            setup(&mut c, Mode::Long64);
            c.set_quirks(quirks);
            write_phys(&c, CODE, &[0xf2, 0xae]);
            write_phys(&c, PML4 + 0x2000 + 8, &0u64.to_le_bytes());
            write_phys(&c, 0x1f_fffe, &[1, 2]);
            c.set_gpr(RDI, 0x1f_fffe);
            c.set_gpr(RCX, 5);
            c.set_gpr(RAX, 0xff);
            c.flags = crate::flags::Flags::new(0x2 | ZF | CF);
            let mut p = TestPlatform::default();
            let insn = c.decode_one(&mut p).expect("decodable");
            let e = (insn.h)(&mut c, &mut p, &insn).expect_err("#PF");
            assert_eq!(e.vector, crate::exception::PF);
            assert_eq!((c.gpr(RDI), c.gpr(RCX)), (0x20_0000, 3));
            assert_eq!(c.rflags() & (ZF | CF | SF), flags, "{quirks:?}");
        }
    }

    #[test]
    fn overlapping_rep_movsq_moves_whole_elements() {
        // rep movsq (f3 48 a5) with RDI = RSI + 3 and RCX = 4: each 8-byte
        // element is read, then written, so element k sees the 3 bytes the
        // previous one wrote and 5 original ones (as on hardware).
        let src: Vec<u8> = (0u8..40).collect();
        let c = run(Mode::Long64, &[0xf3, 0x48, 0xa5], |c| {
            write_phys(c, 0x2000, &src);
            c.set_gpr(RSI, 0x2000);
            c.set_gpr(RDI, 0x2003);
            c.set_gpr(RCX, 4);
        });
        let mut want = src.clone();
        for e in 0..4 {
            let tmp: Vec<u8> = want[8 * e..8 * e + 8].to_vec();
            want[3 + 8 * e..3 + 8 * e + 8].copy_from_slice(&tmp);
        }
        let mut got = vec![0u8; 40];
        assert!(c.ram().read(0x2000, &mut got));
        assert_eq!(got, want);
    }

    #[test]
    fn cmps_reads_the_destination_first() {
        // cmpsb (a6) and repe cmpsb (f3 a6) with RSI and RDI both in the
        // unmapped 1 GiB at 0x40000000: the #PF reports the ES:[RDI] access
        // (CR2 = RDI), as on Intel and Zen 3; Zen 4 reports DS:[RSI]
        // (`Quirks::cmps_source_first`).
        for code in [&[0xa6][..], &[0xf3, 0xa6]] {
            for (source_first, cr2) in [(false, 0x4000_0200), (true, 0x4000_0100)] {
                let mut c = new_cpu();
                setup(&mut c, Mode::Long64);
                c.set_quirks(crate::quirks::Quirks {
                    cmps_source_first: source_first,
                    ..crate::quirks::Quirks::INTEL
                });
                write_phys(&c, CODE, code);
                c.set_gpr(RSI, 0x4000_0100);
                c.set_gpr(RDI, 0x4000_0200);
                c.set_gpr(RCX, 3);
                let mut p = TestPlatform::default();
                let insn = c.decode_one(&mut p).expect("decodable");
                let e = (insn.h)(&mut c, &mut p, &insn).expect_err("#PF");
                assert_eq!(e.vector, crate::exception::PF);
                assert_eq!(c.cr2, cr2, "{code:x?} source first {source_first}");
            }
        }
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
    fn fast_rep_stos_stores_every_width_and_pattern() {
        // rep stosw (66 f3 ab), rep stosq (f3 48 ab) with a pattern, then
        // rep stosq of a repeated byte (the memset path), each crossing a
        // page boundary; mov rdi/rcx/rax between them.
        let mut code = vec![0x66, 0xf3, 0xab];
        code.extend([0x48, 0xc7, 0xc7, 0xf0, 0x5f, 0, 0]); // mov rdi, 0x5ff0
        code.extend([0x48, 0xc7, 0xc1, 0x04, 0, 0, 0]); // mov rcx, 4
        code.extend([0x48, 0xb8, 1, 2, 3, 4, 5, 6, 7, 8]); // mov rax, imm64
        code.extend([0xf3, 0x48, 0xab]);
        code.extend([0x48, 0xc7, 0xc7, 0xf8, 0x6f, 0, 0]); // mov rdi, 0x6ff8
        code.extend([0x48, 0xc7, 0xc1, 0x03, 0, 0, 0]); // mov rcx, 3
        code.extend([0x48, 0xb8, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5]);
        code.extend([0xf3, 0x48, 0xab]);
        let c = run(Mode::Long64, &code, |c| {
            c.set_gpr(RDI, 0x4ffa);
            c.set_gpr(RCX, 5);
            c.set_gpr(RAX, 0xffff_1234);
        });
        for k in 0..5 {
            assert_eq!(read_phys(&c, 0x4ffa + 2 * k, 2), 0x1234, "word {k}");
        }
        assert_eq!(read_phys(&c, 0x5004, 2), 0, "no sixth word");
        for k in 0..4 {
            assert_eq!(
                read_phys(&c, 0x5ff0 + 8 * k, 8),
                0x0807_0605_0403_0201,
                "qword {k}"
            );
        }
        for k in 0..3 {
            assert_eq!(read_phys(&c, 0x6ff8 + 8 * k, 8), 0xa5a5_a5a5_a5a5_a5a5);
        }
        assert_eq!(read_phys(&c, 0x7010, 8), 0, "stops after three");
        assert_eq!(c.gpr(RDI), 0x7010);
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
