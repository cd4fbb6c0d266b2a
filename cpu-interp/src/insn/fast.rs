//! Fast forms of hot instructions, chosen at decode time by
//! [`super::specialize`]: operands resolved to GPR indices and immediates,
//! widths known at compile time. Each computes exactly what the generic
//! handler of its group computes (results and flags); the unit tests below
//! run both forms on the same inputs.

use iced_x86::{Mnemonic, OpKind};

use super::{mask, sext};
use crate::block::Insn;
use crate::cpu::Cpu;
use crate::dispatch::Handler;
use crate::exception::XResult;
use crate::flags::{self, szp};
use crate::platform::Platform;
use crate::state::gpr;

pub(crate) fn specialize(d: &Insn) -> Option<Handler> {
    let size = d.size;
    match d.i.mnemonic() {
        Mnemonic::Imul if d.r0 != 0xff && matches!(size, 4 | 8) && d.i.op_count() >= 2 => {
            let src_ok = d.i.op_count() == 2 || d.i.op_kind(2) != OpKind::Register;
            if !src_ok {
                return None;
            }
            Some(if size == 4 { imul_r::<4> } else { imul_r::<8> })
        }
        Mnemonic::Shl | Mnemonic::Sal | Mnemonic::Shr | Mnemonic::Sar
            if d.r0 != 0xff
                && matches!(size, 4 | 8)
                && d.i.op_count() == 2
                && d.i.op1_kind() == OpKind::Immediate8 =>
        {
            let c = (d.i.immediate8() as u32) & if size == 8 { 0x3f } else { 0x1f };
            if c == 0 {
                return None;
            }
            Some(match (d.i.mnemonic(), size) {
                (Mnemonic::Shr, 4) => shift_ri::<SHR, 4>,
                (Mnemonic::Shr, _) => shift_ri::<SHR, 8>,
                (Mnemonic::Sar, 4) => shift_ri::<SAR, 4>,
                (Mnemonic::Sar, _) => shift_ri::<SAR, 8>,
                (_, 4) => shift_ri::<SHL, 4>,
                _ => shift_ri::<SHL, 8>,
            })
        }
        Mnemonic::Movzx | Mnemonic::Movsx if d.r0 != 0xff && matches!(size, 4 | 8) => {
            let sx = d.i.mnemonic() == Mnemonic::Movsx;
            match d.i.op1_kind() {
                OpKind::Register if d.r1 != 0xff => {
                    let ss = d.i.op1_register().size();
                    Some(match (sx, ss) {
                        (false, 1) => ext_r::<false, 1>,
                        (false, 2) => ext_r::<false, 2>,
                        (true, 1) => ext_r::<true, 1>,
                        (true, 2) => ext_r::<true, 2>,
                        _ => return None,
                    })
                }
                OpKind::Memory => Some(match (sx, d.i.memory_size().size()) {
                    (false, 1) => ext_m::<false, 1>,
                    (false, 2) => ext_m::<false, 2>,
                    (true, 1) => ext_m::<true, 1>,
                    (true, 2) => ext_m::<true, 2>,
                    _ => return None,
                }),
                _ => None,
            }
        }
        Mnemonic::Push if d.r0 != 0xff && size == 8 && d.i.stack_pointer_increment() == -8 => {
            Some(push_r64)
        }
        Mnemonic::Pop if d.r0 != 0xff && size == 8 && d.i.stack_pointer_increment() == 8 => {
            Some(pop_r64)
        }
        _ => None,
    }
}

/// IMUL r, r/m  and  IMUL r, r/m, imm (register destination, 4/8 bytes).
fn imul_r<const SIZE: usize>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let (a, b) = if d.i.op_count() == 2 {
        (cpu.gpr[d.r0 as usize], cpu.op_read(p, d, 1, SIZE)?)
    } else {
        (cpu.op_read(p, d, 1, SIZE)?, d.imm)
    };
    let (lo, overflow) = if SIZE == 4 {
        let prod = i64::from(a as i32) * i64::from(b as i32);
        (prod as u64 & 0xffff_ffff, prod != i64::from(prod as i32))
    } else {
        let (prod, of) = (a as i64).overflowing_mul(b as i64);
        (prod as u64, of)
    };
    cpu.gpr[d.r0 as usize] = lo;
    let mut f = szp(SIZE as u32 * 8, lo);
    if overflow {
        f |= flags::CF | flags::OF;
    }
    cpu.flags.set_arith(f);
    Ok(())
}

const SHL: u8 = 0;
const SHR: u8 = 1;
const SAR: u8 = 2;

/// SHL/SHR/SAR reg, imm8 with a non-zero masked count.
fn shift_ri<const OP: u8, const SIZE: usize>(
    cpu: &mut Cpu,
    _p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    let bits = SIZE as u32 * 8;
    let m = mask(SIZE);
    let c = (d.i.immediate8() as u32) & if SIZE == 8 { 0x3f } else { 0x1f };
    let r0 = d.r0 as usize;
    let a = cpu.gpr[r0] & m;
    let msb = |v: u64| (v >> (bits - 1)) & 1 != 0;
    let (r, cf, of) = match OP {
        SHL => {
            let r = (a << c) & m;
            let cf = (a >> (bits - c)) & 1 != 0;
            (r, cf, msb(r) ^ cf)
        }
        SHR => (a >> c, (a >> (c - 1)) & 1 != 0, c == 1 && msb(a)),
        _ => {
            let sa = sext(a, SIZE) as i64;
            ((sa >> c) as u64 & m, (sa >> (c - 1)) & 1 != 0, false)
        }
    };
    cpu.gpr[r0] = r;
    let mut f = szp(bits, r);
    if cf {
        f |= flags::CF;
    }
    if of {
        f |= flags::OF;
    }
    cpu.flags.set_arith(f);
    Ok(())
}

#[inline(always)]
fn extend<const SX: bool, const SRC: usize>(v: u64, dst_size: usize) -> u64 {
    let v = v & mask(SRC);
    if SX {
        sext(v, SRC) & mask(dst_size)
    } else {
        v
    }
}

/// MOVZX/MOVSX r32/64, r8/16 (not AH..BH).
fn ext_r<const SX: bool, const SRC: usize>(
    cpu: &mut Cpu,
    _p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    let v = cpu.gpr[d.r1 as usize];
    cpu.gpr[d.r0 as usize] = extend::<SX, SRC>(v, d.size as usize);
    Ok(())
}

/// MOVZX/MOVSX r32/64, m8/16.
fn ext_m<const SX: bool, const SRC: usize>(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    let off = cpu.ea(d);
    let v = cpu.read_mem(p, d.seg as usize, off, SRC)?;
    cpu.gpr[d.r0 as usize] = extend::<SX, SRC>(v, d.size as usize);
    Ok(())
}

/// PUSH r64 (64-bit mode).
fn push_r64(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let v = cpu.gpr[d.r0 as usize];
    cpu.push(p, 8, v)
}

/// POP r64 (64-bit mode); POP RSP loads the popped value.
fn pop_r64(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let v = cpu.peek(p, 8, 0)?;
    cpu.gpr[gpr::RSP] = cpu.gpr[gpr::RSP].wrapping_add(8);
    cpu.gpr[d.r0 as usize] = v;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::dispatch;
    use crate::exec::make_insn;
    use crate::flags::ARITH;
    use crate::insn::testutil::*;
    use crate::state::gpr::*;
    use iced_x86::{Decoder, DecoderOptions};
    use proptest::prelude::*;

    /// Run `bytes` once through the generic handler and once through the
    /// fast one; both CPUs must end in the same state.
    fn same_both_ways(bytes: &[u8], regs: [u64; 4], flags_in: u64) {
        let mut i = Decoder::with_ip(64, bytes, CODE, DecoderOptions::NONE).decode();
        assert!(!i.is_invalid());
        i.set_next_ip(CODE + bytes.len() as u64);
        let generic = dispatch::table()[i.code() as usize];
        let fast_insn = make_insn(i, 64, generic);
        assert!(
            fast_insn.h as *const () != generic as *const (),
            "{bytes:02x?} not specialized"
        );
        let mut slow_insn = fast_insn.clone();
        slow_insn.h = generic;
        let mut cpus = [new_cpu(), new_cpu()];
        for c in cpus.iter_mut() {
            setup(c, Mode::Long64);
            for (k, r) in [RAX, RBX, RCX, RDX].iter().enumerate() {
                c.set_gpr(*r, regs[k]);
            }
            write_phys(c, 0x2000, &regs[1].to_le_bytes());
            let mut s = c.state();
            s.regs.rflags = flags_in | 2;
            c.set_state(&s);
        }
        let mut p = TestPlatform::default();
        (fast_insn.h)(&mut cpus[0], &mut p, &fast_insn).unwrap();
        (slow_insn.h)(&mut cpus[1], &mut p, &slow_insn).unwrap();
        let (a, b) = (cpus[0].state(), cpus[1].state());
        assert_eq!(a.regs.gpr, b.regs.gpr, "{bytes:02x?}");
        assert_eq!(a.regs.rflags & ARITH, b.regs.rflags & ARITH, "{bytes:02x?}");
    }

    const FORMS: &[&[u8]] = &[
        &[0x48, 0x0f, 0xaf, 0xc3],                         // imul rax, rbx
        &[0x0f, 0xaf, 0xc3],                               // imul eax, ebx
        &[0x48, 0x6b, 0xc3, 0xf9],                         // imul rax, rbx, -7
        &[0x69, 0xc3, 0x10, 0x32, 0x54, 0x76],             // imul eax, ebx, 0x76543210
        &[0x48, 0x0f, 0xaf, 0x04, 0x25, 0x00, 0x20, 0, 0], // imul rax, [0x2000]
        &[0x48, 0xc1, 0xe0, 0x05],                         // shl rax, 5
        &[0xc1, 0xe8, 0x01],                               // shr eax, 1
        &[0x48, 0xc1, 0xf8, 0x3f],                         // sar rax, 63
        &[0xc1, 0xe0, 0x1f],                               // shl eax, 31
        &[0x0f, 0xb6, 0xc3],                               // movzx eax, bl
        &[0x48, 0x0f, 0xbf, 0xc3],                         // movsx rax, bx
        &[0x0f, 0xbe, 0x04, 0x25, 0x00, 0x20, 0, 0],       // movsx eax, byte [0x2000]
        &[0x48, 0x0f, 0xb7, 0x04, 0x25, 0x00, 0x20, 0, 0], // movzx rax, word [0x2000]
        &[0x53],                                           // push rbx
        &[0x59],                                           // pop rcx
    ];

    proptest! {
        #[test]
        fn fast_forms_match_the_generic_handlers(
            regs in any::<[u64; 4]>(),
            cf in any::<bool>(),
            k in 0..FORMS.len(),
        ) {
            same_both_ways(FORMS[k], regs, if cf { 1 } else { 0 });
        }
    }

    #[test]
    fn edge_values() {
        for &v in &[
            0u64,
            1,
            u64::MAX,
            1 << 63,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
        ] {
            for form in FORMS {
                same_both_ways(form, [v, v.rotate_left(7), 3, v], 0);
            }
        }
    }
}
