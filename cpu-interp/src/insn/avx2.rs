//! The AVX and AVX2 instructions that cross or ignore the 128-bit lanes:
//! broadcasts (VBROADCASTSS/SD/F128/I128, VPBROADCASTB/W/D/Q), 128-bit
//! inserts, extracts and permutes (VINSERTF128/I128, VEXTRACTF128/I128,
//! VPERM2F128/I128), VPERMILPS/PD, VPERMD/PS/Q/PD, masked moves
//! (VMASKMOVPS/PD, VPMASKMOVD/Q), variable shifts (VPSLLVD/Q, VPSRLVD/Q,
//! VPSRAVD) and the gathers (VGATHERDPS/DPD/QPS/QPD, VPGATHERDD/DQ/QD/QQ).

use iced_x86::{Mnemonic, OpKind, Register};

use super::avx::{imm8, vidx, Y};
use super::simd::{lane, set_lane};
use super::xsave;
use crate::block::Insn;
use crate::cpu::Cpu;
use crate::dispatch::Table;
use crate::exception::{Exception, XResult};
use crate::platform::Platform;

pub fn register(t: &mut Table) {
    for m in [
        Mnemonic::Vbroadcastss,
        Mnemonic::Vbroadcastsd,
        Mnemonic::Vbroadcastf128,
        Mnemonic::Vbroadcasti128,
        Mnemonic::Vpbroadcastb,
        Mnemonic::Vpbroadcastw,
        Mnemonic::Vpbroadcastd,
        Mnemonic::Vpbroadcastq,
    ] {
        t.set_vex(m, vbroadcast);
    }
    t.set_vex(Mnemonic::Vinsertf128, vinsert128);
    t.set_vex(Mnemonic::Vinserti128, vinsert128);
    t.set_vex(Mnemonic::Vextractf128, vextract128);
    t.set_vex(Mnemonic::Vextracti128, vextract128);
    t.set_vex(Mnemonic::Vperm2f128, vperm2x128);
    t.set_vex(Mnemonic::Vperm2i128, vperm2x128);
    t.set_vex(Mnemonic::Vpermilps, vpermil);
    t.set_vex(Mnemonic::Vpermilpd, vpermil);
    t.set_vex(Mnemonic::Vpermd, vperm_var);
    t.set_vex(Mnemonic::Vpermps, vperm_var);
    t.set_vex(Mnemonic::Vpermq, vperm_imm);
    t.set_vex(Mnemonic::Vpermpd, vperm_imm);
    for m in [
        Mnemonic::Vmaskmovps,
        Mnemonic::Vmaskmovpd,
        Mnemonic::Vpmaskmovd,
        Mnemonic::Vpmaskmovq,
    ] {
        t.set_vex(m, vmaskmov);
    }
    for m in [
        Mnemonic::Vpsllvd,
        Mnemonic::Vpsllvq,
        Mnemonic::Vpsrlvd,
        Mnemonic::Vpsrlvq,
        Mnemonic::Vpsravd,
    ] {
        t.set_vex(m, vshiftv);
    }
    for m in [
        Mnemonic::Vgatherdps,
        Mnemonic::Vgatherdpd,
        Mnemonic::Vgatherqps,
        Mnemonic::Vgatherqpd,
        Mnemonic::Vpgatherdd,
        Mnemonic::Vpgatherdq,
        Mnemonic::Vpgatherqd,
        Mnemonic::Vpgatherqq,
    ] {
        t.set_vex(m, vgather);
    }
}

/// Element `i` of width `w` of a 256-bit value.
#[inline(always)]
pub(crate) fn yl(v: &Y, i: usize, w: usize) -> u64 {
    let per = 16 / w;
    lane(v[i / per], i % per, w)
}

/// `v` with element `i` of width `w` replaced.
#[inline(always)]
pub(crate) fn set_yl(v: &mut Y, i: usize, w: usize, x: u64) {
    let per = 16 / w;
    v[i / per] = set_lane(v[i / per], i % per, w, x);
}

/// VBROADCASTSS/SD, VPBROADCASTB/W/D/Q (element 0 of a register or
/// memory), VBROADCASTF128/I128 (m128 to both halves).
fn vbroadcast(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let dst = d.i.op0_register();
    let src = cpu.vsrc(p, d, 1)?;
    let w = match d.i.mnemonic() {
        Mnemonic::Vpbroadcastb => 1,
        Mnemonic::Vpbroadcastw => 2,
        Mnemonic::Vbroadcastss | Mnemonic::Vpbroadcastd => 4,
        Mnemonic::Vbroadcastsd | Mnemonic::Vpbroadcastq => 8,
        _ => 16,
    };
    let v = if w == 16 {
        [src[0], src[0]]
    } else {
        let x = lane(src[0], 0, w);
        let l = (0..16 / w).fold(0u128, |r, i| set_lane(r, i, w, x));
        [l, l]
    };
    cpu.set_vreg(dst, v);
    Ok(())
}

/// VINSERTF128/I128 ymm1, ymm2, xmm3/m128, imm8.
fn vinsert128(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let mut v = cpu.vreg(d.i.op1_register());
    let x = cpu.vsrc(p, d, 2)?[0];
    v[usize::from(imm8(d) & 1)] = x;
    cpu.set_vreg(d.i.op0_register(), v);
    Ok(())
}

/// VEXTRACTF128/I128 xmm1/m128, ymm2, imm8.
fn vextract128(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let v = cpu.vreg(d.i.op1_register())[usize::from(imm8(d) & 1)];
    match d.i.op0_kind() {
        OpKind::Register => {
            cpu.set_vreg_vex256(d.i.op0_register(), [v, 0]);
            Ok(())
        }
        _ => cpu.vmem_store(p, d, [v, 0], 16, false),
    }
}

/// VPERM2F128/I128 ymm1, ymm2, ymm3/m256, imm8.
fn vperm2x128(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let a = cpu.vreg(d.i.op1_register());
    let b = cpu.vsrc(p, d, 2)?;
    let imm = imm8(d);
    let pick = |c: u8| -> u128 {
        if c & 8 != 0 {
            0
        } else {
            match c & 3 {
                0 => a[0],
                1 => a[1],
                2 => b[0],
                _ => b[1],
            }
        }
    };
    cpu.set_vreg(d.i.op0_register(), [pick(imm), pick(imm >> 4)]);
    Ok(())
}

/// VPERMILPS/VPERMILPD: within each 128-bit lane, elements picked by an
/// immediate (dst, src, imm) or by a control vector (dst, src, ctl).
fn vpermil(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let dst = d.i.op0_register();
    let ps = d.i.mnemonic() == Mnemonic::Vpermilps;
    let (src, ctl): (Y, Option<Y>) = if d.i.op_kind(2) == OpKind::Immediate8 {
        (cpu.vsrc(p, d, 1)?, None)
    } else {
        let s = cpu.vreg(d.i.op1_register());
        (s, Some(cpu.vsrc(p, d, 2)?))
    };
    let imm = imm8(d);
    let mut r = [0u128; 2];
    for k in 0..2 {
        if ps {
            for i in 0..4 {
                let sel = match ctl {
                    Some(c) => lane(c[k], i, 4) as usize & 3,
                    None => usize::from(imm >> (2 * i)) & 3,
                };
                r[k] = set_lane(r[k], i, 4, lane(src[k], sel, 4));
            }
        } else {
            for i in 0..2 {
                let sel = match ctl {
                    Some(c) => (lane(c[k], i, 8) >> 1) as usize & 1,
                    None => usize::from(imm >> (2 * k + i)) & 1,
                };
                r[k] = set_lane(r[k], i, 8, lane(src[k], sel, 8));
            }
        }
    }
    if !dst.is_ymm() {
        r[1] = 0;
    }
    cpu.set_vreg(dst, r);
    Ok(())
}

/// VPERMD/VPERMPS ymm1, ymm2 (indices), ymm3/m256 (table).
fn vperm_var(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let idx = cpu.vreg(d.i.op1_register());
    let src = cpu.vsrc(p, d, 2)?;
    let mut r = [0u128; 2];
    for i in 0..8 {
        let sel = yl(&idx, i, 4) as usize & 7;
        set_yl(&mut r, i, 4, yl(&src, sel, 4));
    }
    cpu.set_vreg(d.i.op0_register(), r);
    Ok(())
}

/// VPERMQ/VPERMPD ymm1, ymm2/m256, imm8.
fn vperm_imm(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let src = cpu.vsrc(p, d, 1)?;
    let imm = imm8(d);
    let mut r = [0u128; 2];
    for i in 0..4 {
        let sel = usize::from(imm >> (2 * i)) & 3;
        set_yl(&mut r, i, 8, yl(&src, sel, 8));
    }
    cpu.set_vreg(d.i.op0_register(), r);
    Ok(())
}

/// VPSLLVD/Q, VPSRLVD/Q, VPSRAVD: each element shifted by its own count.
fn vshiftv(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let dst = d.i.op0_register();
    let a = cpu.vreg(d.i.op1_register());
    let c = cpu.vsrc(p, d, 2)?;
    let m = d.i.mnemonic();
    let w = if matches!(m, Mnemonic::Vpsllvq | Mnemonic::Vpsrlvq) {
        8
    } else {
        4
    };
    let bits = 8 * w as u64;
    let n = if dst.is_ymm() { 32 / w } else { 16 / w };
    let mut r = [0u128; 2];
    for i in 0..n {
        let x = yl(&a, i, w);
        let s = yl(&c, i, w);
        let v = match m {
            Mnemonic::Vpsllvd | Mnemonic::Vpsllvq => {
                if s >= bits {
                    0
                } else {
                    x << s
                }
            }
            Mnemonic::Vpsrlvd | Mnemonic::Vpsrlvq => {
                if s >= bits {
                    0
                } else {
                    x >> s
                }
            }
            _ => ((x as u32 as i32) >> s.min(31)) as u32 as u64,
        };
        set_yl(&mut r, i, w, v);
    }
    cpu.set_vreg(dst, r);
    Ok(())
}

/// VMASKMOVPS/PD, VPMASKMOVD/Q. Loads (dst, mask, mem): elements whose
/// mask sign bit is set are read, the others are zero. Stores (mem,
/// mask, src): only the selected elements are written. Only the selected
/// elements are accessed, so only they can fault; a store checks all of
/// them before writing any (the span's first byte, then its last, then
/// each element: the fault address the processor reports).
fn vmaskmov(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let w = match d.i.mnemonic() {
        Mnemonic::Vmaskmovps | Mnemonic::Vpmaskmovd => 4,
        _ => 8,
    };
    let off = cpu.ea(d);
    let seg = d.seg as usize;
    if d.i.op0_kind() == OpKind::Register {
        let dst = d.i.op0_register();
        let mask = cpu.vreg(d.i.op1_register());
        let n = if dst.is_ymm() { 32 / w } else { 16 / w };
        let mut r = [0u128; 2];
        for i in 0..n {
            if yl(&mask, i, w) >> (8 * w - 1) != 0 {
                let a = off.wrapping_add((i * w) as u64) & d.amask;
                let v = cpu.read_mem(p, seg, a, w)?;
                set_yl(&mut r, i, w, v);
            }
        }
        cpu.set_vreg(dst, r);
        Ok(())
    } else {
        let mask = cpu.vreg(d.i.op1_register());
        let srcr = d.i.op2_register();
        let src = cpu.vreg(srcr);
        let n = if srcr.is_ymm() { 32 / w } else { 16 / w };
        let sel: Vec<usize> = (0..n)
            .filter(|&i| yl(&mask, i, w) >> (8 * w - 1) != 0)
            .collect();
        // The processor checks the first and the last byte of the span of
        // selected elements first (a fault there is what it reports),
        // then the elements themselves.
        if let (Some(&first), Some(&last)) = (sel.first(), sel.last()) {
            let lo = off.wrapping_add((first * w) as u64) & d.amask;
            let hi = off.wrapping_add((last * w + w - 1) as u64) & d.amask;
            cpu.probe_write(p, seg, lo, 1)?;
            cpu.probe_write(p, seg, hi, 1)?;
        }
        for &i in &sel {
            let a = off.wrapping_add((i * w) as u64) & d.amask;
            cpu.probe_write(p, seg, a, w)?;
        }
        for &i in &sel {
            let a = off.wrapping_add((i * w) as u64) & d.amask;
            cpu.write_mem(p, seg, a, w, yl(&src, i, w))?;
        }
        Ok(())
    }
}

/// The gathers: for each element from the lowest, if its mask sign bit is
/// set, load it from base + index[i] × scale + disp, store it in the
/// destination and clear the mask element. A fault leaves the elements
/// below the faulting one gathered and their mask elements cleared; on
/// completion the whole mask is zero. Destination, index and mask must be
/// three different registers (#UD otherwise).
fn vgather(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let dst = d.i.op0_register();
    let maskr = d.i.op2_register();
    let index = d.i.memory_index();
    let (di, mi, ii) = (vidx(dst), vidx(maskr), vidx(index));
    if di == mi || di == ii || mi == ii {
        return Err(Exception::ud());
    }
    let m = d.i.mnemonic();
    // Data element width, index element width.
    let (w, iw) = match m {
        Mnemonic::Vgatherdps | Mnemonic::Vpgatherdd => (4, 4),
        Mnemonic::Vgatherdpd | Mnemonic::Vpgatherdq => (8, 4),
        Mnemonic::Vgatherqps | Mnemonic::Vpgatherqd => (4, 8),
        _ => (8, 8),
    };
    let idxv = cpu.vreg(index);
    let n = if index.is_ymm() {
        32 / iw
    } else if dst.is_ymm() {
        32 / w
    } else {
        (16 / iw).min(16 / w)
    };
    let n = n.min(if dst.is_ymm() { 32 / w } else { 16 / w });
    let mut v = cpu.vreg(dst);
    let mut mask = cpu.vreg(maskr);
    let base = match d.i.memory_base() {
        Register::None => 0,
        Register::RIP | Register::EIP => d.next,
        r => cpu.reg(r),
    };
    let disp = d.i.memory_displacement64();
    let scale = u64::from(d.i.memory_index_scale());
    let seg = d.seg as usize;
    let mut gathered = 0;
    let mut fault = None;
    for i in 0..n {
        if yl(&mask, i, w) >> (8 * w - 1) == 0 {
            continue;
        }
        let raw = yl(&idxv, i, iw);
        let ix = if iw == 4 {
            raw as u32 as i32 as i64 as u64
        } else {
            raw
        };
        let off = base.wrapping_add(disp).wrapping_add(ix.wrapping_mul(scale)) & d.amask;
        match cpu.read_mem(p, seg, off, w) {
            Ok(x) => {
                set_yl(&mut v, i, w, x);
                set_yl(&mut mask, i, w, 0);
                gathered += 1;
            }
            Err(e) => {
                fault = Some(e);
                break;
            }
        }
    }
    if let Some(e) = fault {
        let vex256 = index.is_ymm() || dst.is_ymm();
        gather_fault_state(cpu, (dst, v), (maskr, mask), w, vex256, gathered > 0);
        return Err(e);
    }
    // Done: the whole mask is zero, and the destination's elements beyond
    // the gathered width are zeroed (the XMM forms of a wider index, and
    // VEX.128's bits 255:128).
    let keep = n * w;
    for (k, h) in v.iter_mut().enumerate() {
        *h = mask_bytes(*h, keep.saturating_sub(16 * k));
    }
    if index.is_ymm() || dst.is_ymm() {
        // VEX.L = 1 (see `set_vreg_vex256`).
        cpu.set_vreg_vex256(dst, v);
        cpu.set_vreg_vex256(maskr, [0, 0]);
    } else {
        cpu.set_vreg(dst, v);
        cpu.set_vreg(maskr, [0, 0]);
    }
    Ok(())
}

/// The destination and mask registers as a gather leaves them when an
/// element faults (hardware oracle, fix 55; the SDM only says that the
/// elements gathered so far have their mask elements cleared):
/// - the mask: every element of the mask register (its whole XMM or YMM
///   width, also beyond the elements the index selects) holds its sign
///   bit spread over the element, all ones if still to be gathered, zero
///   if gathered or not selected; the bits above the register are kept
///   (VEX.128's bits 255:128 are not zeroed);
/// - the destination: untouched if no element was gathered; otherwise
///   the gathered elements are merged into its old contents and bits
///   255:128 are zeroed by VEX.128 forms (VEX.L = 0) and kept by VEX.256
///   ones, even with an XMM destination (VGATHERQPS/VPGATHERQD with a YMM
///   index).
fn gather_fault_state(
    cpu: &mut Cpu,
    (dst, v): (Register, Y),
    (maskr, mut mask): (Register, Y),
    w: usize,
    vex256: bool,
    gathered: bool,
) {
    let mi = vidx(maskr);
    let width = if maskr.is_ymm() { 32 } else { 16 };
    let ones = u64::MAX >> (64 - 8 * w);
    for i in 0..width / w {
        let sign = yl(&mask, i, w) >> (8 * w - 1);
        set_yl(&mut mask, i, w, if sign != 0 { ones } else { 0 });
    }
    cpu.fpu.xmm[mi] = mask[0];
    if maskr.is_ymm() {
        cpu.fpu.ymm_hi[mi] = mask[1];
        cpu.xstate.xinuse |= xsave::AVX;
    }
    cpu.xstate.xinuse |= xsave::SSE;
    if gathered {
        // VEX.L = 1 works on all 256 bits: those not gathered are kept,
        // also above an XMM destination of a YMM index.
        cpu.set_vreg_index(vidx(dst), v, vex256);
    }
}

/// The low `n` bytes of `v` (all of it from 16 on).
fn mask_bytes(v: u128, n: usize) -> u128 {
    if n >= 16 {
        v
    } else if n == 0 {
        0
    } else {
        v & ((1u128 << (8 * n)) - 1)
    }
}

#[cfg(test)]
mod tests {
    use iced_x86::code_asm::*;

    use super::*;
    use crate::exception::PF;
    use crate::insn::testutil::*;
    use crate::state::gpr::RBX;

    /// Where the gathered data lies (RBX), filled with a byte pattern.
    const DATA: u64 = 0x20_0000;
    /// The first address above the 1 GiB the harness maps: a #PF.
    const NOWHERE: u64 = 0x4000_0000;
    /// NOWHERE as an index from DATA.
    const FAR: u64 = NOWHERE - DATA;
    /// The old contents of the destination's and the mask's bits 255:128.
    const DST_HI: u128 = 0xd5d5_d5d5_0000_0000_1111_2222_3333_4444;
    const MASK_HI: u128 = 0x8000_0000_0000_0001_8000_0002_0000_0003;

    fn pack(elems: &[u64], w: usize) -> u128 {
        let mut y = [0, 0];
        for (i, &e) in elems.iter().enumerate() {
            set_yl(&mut y, i, w, e);
        }
        y[0]
    }

    fn pack256(elems: &[u64], w: usize) -> Y {
        let mut y = [0, 0];
        for (i, &e) in elems.iter().enumerate() {
            set_yl(&mut y, i, w, e);
        }
        y
    }

    /// The `w` bytes of data at DATA + `off`.
    fn datum(c: &Cpu, off: u64, w: usize) -> u64 {
        read_phys(c, DATA + off, w)
    }

    /// Run the gather `code` (destination register 0, index 1, mask 2)
    /// with the three registers' 256 bits given; return the CPU after it
    /// and the handler's result.
    fn gather(code: &[u8], dst: Y, index: Y, mask: Y) -> (Cpu, XResult<()>) {
        exec_one(Mode::Long64, code, |c| {
            avx_on(c);
            let pattern: Vec<u8> = (0..0x200u32).map(|k| (k * 7 + 3) as u8).collect();
            write_phys(c, DATA, &pattern);
            c.set_gpr(RBX, DATA);
            for (r, v) in [(0, dst), (1, index), (2, mask)] {
                c.fpu.xmm[r] = v[0];
                c.fpu.ymm_hi[r] = v[1];
            }
        })
    }

    fn reg(c: &Cpu, r: usize) -> Y {
        [c.fpu.xmm[r], c.fpu.ymm_hi[r]]
    }

    fn assert_page_fault(c: &Cpu, r: XResult<()>) {
        let e = r.expect_err("the gather faults");
        assert_eq!(e.vector, PF, "{e:?}");
        assert_eq!(c.cr2, NOWHERE);
    }

    /// VEX.128 (VPGATHERDD xmm): the first selected element is gathered,
    /// the third faults. The mask shows what is left (sign bits spread:
    /// all ones or zero), the destination holds the gathered element and
    /// VEX.128's zeroed bits 255:128; the mask's bits 255:128 are kept
    /// (the hardware oracle, fix 55).
    #[test]
    fn an_xmm_gather_faulting_part_way() {
        let code = asm(64, |a| a.vpgatherdd_3(xmm0, ptr(rbx + xmm1), xmm2));
        let old = pack(&[0x1111_1111, 0x2222_2222, 0x3333_3333, 0x4444_4444], 4);
        let (c, r) = gather(
            &code,
            [old, DST_HI],
            [pack(&[0x10, 0x20, FAR, 0x30], 4), 0],
            [
                pack(&[0x8000_0000, 0x1234_5678, 0x8000_0001, 0xffff_fff0], 4),
                MASK_HI,
            ],
        );
        assert_page_fault(&c, r);
        let got = datum(&c, 0x10, 4);
        assert_ne!(got, 0x1111_1111);
        assert_eq!(
            reg(&c, 0),
            [pack(&[got, 0x2222_2222, 0x3333_3333, 0x4444_4444], 4), 0]
        );
        assert_eq!(
            reg(&c, 2),
            [pack(&[0, 0, 0xffff_ffff, 0xffff_ffff], 4), MASK_HI]
        );
    }

    /// The same form faulting on its first selected element: the
    /// destination is untouched, bits 255:128 included; the mask is still
    /// normalised.
    #[test]
    fn an_xmm_gather_faulting_before_any_element() {
        let code = asm(64, |a| a.vpgatherdd_3(xmm0, ptr(rbx + xmm1), xmm2));
        let old = pack(&[0x1111_1111, 0x2222_2222, 0x3333_3333, 0x4444_4444], 4);
        let (c, r) = gather(
            &code,
            [old, DST_HI],
            [pack(&[0x40, FAR, 0x20, 0x30], 4), 0],
            [
                pack(&[0x7fff_ffff, 0xffff_fff0, 0x8000_0000, 0x0000_0001], 4),
                MASK_HI,
            ],
        );
        assert_page_fault(&c, r);
        assert_eq!(reg(&c, 0), [old, DST_HI]);
        assert_eq!(
            reg(&c, 2),
            [pack(&[0, 0xffff_ffff, 0xffff_ffff, 0], 4), MASK_HI]
        );
    }

    /// VEX.256 (VPGATHERQQ ymm, scale 8): two elements gathered, the third
    /// faults; the fourth, selected, is left for the restart.
    #[test]
    fn a_ymm_gather_faulting_part_way() {
        let code = asm(64, |a| a.vpgatherqq_3(ymm0, ptr(rbx + ymm1 * 8), ymm2));
        let old = [1, 2, 3, 4].map(|k| 0x0101_0101_0101_0101u64 * k);
        let (c, r) = gather(
            &code,
            pack256(&old, 8),
            pack256(&[1, 2, FAR / 8, 3], 8),
            pack256(&[1 << 63, u64::MAX >> 1, (1 << 63) | 5, 1 << 63], 8),
        );
        assert_page_fault(&c, r);
        let a = datum(&c, 8, 8);
        assert_eq!(reg(&c, 0), pack256(&[a, old[1], old[2], old[3]], 8));
        assert_eq!(reg(&c, 2), pack256(&[0, 0, u64::MAX, u64::MAX], 8));
        // Restarted over a present page, it completes: the mask all zero.
        let (c, r) = gather(
            &code,
            pack256(&old, 8),
            pack256(&[1, 2, 4, 3], 8),
            pack256(&[1 << 63, 0, 1 << 63, 0], 8),
        );
        assert_eq!(r, Ok(()));
        let d = datum(&c, 32, 8);
        assert_eq!(reg(&c, 0), pack256(&[a, old[1], d, old[3]], 8));
        assert_eq!(reg(&c, 2), [0, 0]);
    }

    /// VEX.256 with an XMM destination (VGATHERQPS xmm, [ymm index]): on a
    /// fault after the first element the destination's and the mask's
    /// bits 255:128 are kept, unlike VEX.128's.
    #[test]
    fn a_ymm_index_gather_into_xmm_faulting_part_way() {
        let code = asm(64, |a| a.vgatherqps_3(xmm0, ptr(rbx + ymm1), xmm2));
        let old = pack(&[0x1111_1111, 0x2222_2222, 0x3333_3333, 0x4444_4444], 4);
        let (c, r) = gather(
            &code,
            [old, DST_HI],
            pack256(&[0x40, FAR, 0x50, 0x60], 8),
            [
                pack(&[0x8000_0000, 0x8000_0000, 0x0000_0007, 0x9000_0000], 4),
                MASK_HI,
            ],
        );
        assert_page_fault(&c, r);
        let got = datum(&c, 0x40, 4);
        assert_eq!(
            reg(&c, 0),
            [
                pack(&[got, 0x2222_2222, 0x3333_3333, 0x4444_4444], 4),
                DST_HI
            ]
        );
        assert_eq!(
            reg(&c, 2),
            [pack(&[0, 0xffff_ffff, 0, 0xffff_ffff], 4), MASK_HI]
        );
    }

    /// An element at a non-canonical address: #GP(0) part-way, with the
    /// same registers as a #PF (the SDM; not comparable with the CPU here:
    /// KVM-PVM turns a ring-3 #GP of a vector instruction into #UD).
    #[test]
    fn a_gather_element_at_a_non_canonical_address() {
        let code = asm(64, |a| a.vpgatherqq_3(ymm0, ptr(rbx + ymm1), ymm2));
        let old = [1, 2, 3, 4].map(|k| 0x0101_0101_0101_0101u64 * k);
        let (c, r) = gather(
            &code,
            pack256(&old, 8),
            pack256(&[0x20, 1 << 63, 0x30, 0x40], 8),
            pack256(&[1 << 63; 4], 8),
        );
        assert_eq!(r, Err(Exception::gp0()));
        let a = datum(&c, 0x20, 8);
        assert_eq!(reg(&c, 0), pack256(&[a, old[1], old[2], old[3]], 8));
        assert_eq!(reg(&c, 2), pack256(&[0, u64::MAX, u64::MAX, u64::MAX], 8));
    }

    /// VEX.128 with qword indices and dword data (VPGATHERQD xmm, [xmm]):
    /// two elements, the mask's elements 3:2 correspond to none. A fault
    /// normalises them too and keeps the destination's bits 127:64; on
    /// completion the SDM's zeroing applies (bits 127:64 and 255:128).
    #[test]
    fn a_narrow_gather_and_the_elements_beyond_it() {
        let code = asm(64, |a| a.vpgatherqd_3(xmm0, ptr(rbx + xmm1), xmm2));
        let old = pack(&[0x1111_1111, 0x2222_2222, 0x3333_3333, 0x4444_4444], 4);
        let mask = pack(&[0x8000_0000, 0x8000_0000, 0x8000_0000, 0x0000_1234], 4);
        let (c, r) = gather(
            &code,
            [old, DST_HI],
            [pack(&[0x10, FAR], 8), 0],
            [mask, MASK_HI],
        );
        assert_page_fault(&c, r);
        let got = datum(&c, 0x10, 4);
        assert_eq!(
            reg(&c, 0),
            [pack(&[got, 0x2222_2222, 0x3333_3333, 0x4444_4444], 4), 0]
        );
        assert_eq!(
            reg(&c, 2),
            [pack(&[0, 0xffff_ffff, 0xffff_ffff, 0], 4), MASK_HI]
        );
        let (c, r) = gather(
            &code,
            [old, DST_HI],
            [pack(&[0x10, 0x18], 8), 0],
            [mask, MASK_HI],
        );
        assert_eq!(r, Ok(()));
        let next = datum(&c, 0x18, 4);
        assert_eq!(reg(&c, 0), [pack(&[got, next], 4), 0]);
        assert_eq!(reg(&c, 2), [0, 0]);
    }
}
