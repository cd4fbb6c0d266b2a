//! SSE, SSE2 and SSE3 floating point and 128-bit data movement: moves
//! (MOVAPS..MOVDQU, MOVSS/MOVSD, MOVLPS/MOVHPS..., MOVMSKPS/PD, MOVNT*,
//! MOVQ2DQ/MOVDQ2Q, MOVDDUP/MOVSHDUP/MOVSLDUP, LDDQU, MOVNTI), arithmetic
//! (ADD SUB MUL DIV SQRT MIN MAX, PS/SS/PD/SD; RCP/RSQRT PS/SS; ADDSUB,
//! HADD, HSUB), CMPccPS/SS/PD/SD, (U)COMISS/SD, logic, SHUFPS/PD, UNPCK*,
//! every conversion, LDMXCSR/STMXCSR, and the XMM-only SSE2 integer
//! shuffles and byte shifts (PSHUFD/HW/LW, PSLLDQ/PSRLDQ, PUNPCKL/HQDQ).
//! The integer instructions shared with MMX are in `mmx.rs`; the IEEE
//! arithmetic with MXCSR semantics is in `simd_fp.rs`.
//!
//! Every instruction checks CR0.EM / CR4.OSFXSR (#UD) and CR0.TS (#NM)
//! first; 16-byte memory operands must be aligned (#GP(0)) except for the
//! explicitly unaligned forms (MOVUPS, MOVUPD, MOVDQU, LDDQU). Floating-point
//! results are committed only after the MXCSR exception check: an unmasked
//! exception leaves the destination unchanged and raises #XM (CR4.OSXMMEXCPT)
//! or #UD.

use iced_x86::{Code, Mnemonic, OpKind};

use super::sext;
use super::simd::{lane, op_bytes, set_lane};
use super::simd_fp::{self as sf, Env, Fmt, F32, F64};
use crate::block::Insn;
use crate::cpu::Cpu;
use crate::dispatch::Table;
use crate::exception::XResult;
use crate::flags;
use crate::platform::Platform;

pub fn register(t: &mut Table) {
    // Moves.
    t.set_mnemonic(Mnemonic::Movaps, mov128::<true>);
    t.set_mnemonic(Mnemonic::Movapd, mov128::<true>);
    t.set_mnemonic(Mnemonic::Movdqa, mov128::<true>);
    t.set_mnemonic(Mnemonic::Movntps, mov128::<true>);
    t.set_mnemonic(Mnemonic::Movntpd, mov128::<true>);
    t.set_mnemonic(Mnemonic::Movntdq, mov128::<true>);
    t.set_mnemonic(Mnemonic::Movups, mov128::<false>);
    t.set_mnemonic(Mnemonic::Movupd, mov128::<false>);
    t.set_mnemonic(Mnemonic::Movdqu, mov128::<false>);
    t.set_mnemonic(Mnemonic::Lddqu, mov128::<false>);
    t.set_mnemonic(Mnemonic::Movss, mov_scalar::<4>);
    t.set_all(
        &[Code::Movsd_xmm_xmmm64, Code::Movsd_xmmm64_xmm],
        mov_scalar::<8>,
    );
    t.set_mnemonic(Mnemonic::Movlps, movlp);
    t.set_mnemonic(Mnemonic::Movlpd, movlp);
    t.set_mnemonic(Mnemonic::Movhps, movhp);
    t.set_mnemonic(Mnemonic::Movhpd, movhp);
    t.set_mnemonic(Mnemonic::Movhlps, movhlps);
    t.set_mnemonic(Mnemonic::Movlhps, movlhps);
    t.set_mnemonic(Mnemonic::Movmskps, movmsk::<4>);
    t.set_mnemonic(Mnemonic::Movmskpd, movmsk::<8>);
    t.set_mnemonic(Mnemonic::Movddup, movddup);
    t.set_mnemonic(Mnemonic::Movshdup, movshdup);
    t.set_mnemonic(Mnemonic::Movsldup, movsldup);
    t.set_mnemonic(Mnemonic::Movq2dq, movq2dq);
    t.set_mnemonic(Mnemonic::Movdq2q, movdq2q);
    t.set_mnemonic(Mnemonic::Movnti, movnti);
    t.set_mnemonic(Mnemonic::Ldmxcsr, ldmxcsr);
    t.set_mnemonic(Mnemonic::Stmxcsr, stmxcsr);

    // Arithmetic.
    t.set_mnemonic(Mnemonic::Addps, addps);
    t.set_mnemonic(Mnemonic::Addss, addss);
    t.set_mnemonic(Mnemonic::Addpd, addpd);
    t.set_mnemonic(Mnemonic::Addsd, addsd);
    t.set_mnemonic(Mnemonic::Subps, subps);
    t.set_mnemonic(Mnemonic::Subss, subss);
    t.set_mnemonic(Mnemonic::Subpd, subpd);
    t.set_mnemonic(Mnemonic::Subsd, subsd);
    t.set_mnemonic(Mnemonic::Mulps, mulps);
    t.set_mnemonic(Mnemonic::Mulss, mulss);
    t.set_mnemonic(Mnemonic::Mulpd, mulpd);
    t.set_mnemonic(Mnemonic::Mulsd, mulsd);
    t.set_mnemonic(Mnemonic::Divps, divps);
    t.set_mnemonic(Mnemonic::Divss, divss);
    t.set_mnemonic(Mnemonic::Divpd, divpd);
    t.set_mnemonic(Mnemonic::Divsd, divsd);
    t.set_mnemonic(Mnemonic::Minps, minps);
    t.set_mnemonic(Mnemonic::Minss, minss);
    t.set_mnemonic(Mnemonic::Minpd, minpd);
    t.set_mnemonic(Mnemonic::Minsd, minsd);
    t.set_mnemonic(Mnemonic::Maxps, maxps);
    t.set_mnemonic(Mnemonic::Maxss, maxss);
    t.set_mnemonic(Mnemonic::Maxpd, maxpd);
    t.set_mnemonic(Mnemonic::Maxsd, maxsd);
    t.set_mnemonic(Mnemonic::Sqrtps, sqrtps);
    t.set_mnemonic(Mnemonic::Sqrtss, sqrtss);
    t.set_mnemonic(Mnemonic::Sqrtpd, sqrtpd);
    t.set_mnemonic(Mnemonic::Sqrtsd, sqrtsd);
    t.set_mnemonic(Mnemonic::Rcpps, rcpps);
    t.set_mnemonic(Mnemonic::Rcpss, rcpss);
    t.set_mnemonic(Mnemonic::Rsqrtps, rsqrtps);
    t.set_mnemonic(Mnemonic::Rsqrtss, rsqrtss);
    t.set_mnemonic(Mnemonic::Addsubps, addsubps);
    t.set_mnemonic(Mnemonic::Addsubpd, addsubpd);
    t.set_mnemonic(Mnemonic::Haddps, horiz::<F32, false>);
    t.set_mnemonic(Mnemonic::Haddpd, horiz::<F64, false>);
    t.set_mnemonic(Mnemonic::Hsubps, horiz::<F32, true>);
    t.set_mnemonic(Mnemonic::Hsubpd, horiz::<F64, true>);

    // Comparisons.
    t.set_mnemonic(Mnemonic::Cmpps, cmp::<F32, true>);
    t.set_mnemonic(Mnemonic::Cmppd, cmp::<F64, true>);
    t.set_mnemonic(Mnemonic::Cmpss, cmp::<F32, false>);
    t.set(Code::Cmpsd_xmm_xmmm64_imm8, cmp::<F64, false>);
    t.set_mnemonic(Mnemonic::Comiss, comis::<F32, true>);
    t.set_mnemonic(Mnemonic::Ucomiss, comis::<F32, false>);
    t.set_mnemonic(Mnemonic::Comisd, comis::<F64, true>);
    t.set_mnemonic(Mnemonic::Ucomisd, comis::<F64, false>);

    // Logic, shuffles, unpacks.
    t.set_mnemonic(Mnemonic::Andps, andps);
    t.set_mnemonic(Mnemonic::Andpd, andps);
    t.set_mnemonic(Mnemonic::Andnps, andnps);
    t.set_mnemonic(Mnemonic::Andnpd, andnps);
    t.set_mnemonic(Mnemonic::Orps, orps);
    t.set_mnemonic(Mnemonic::Orpd, orps);
    t.set_mnemonic(Mnemonic::Xorps, xorps);
    t.set_mnemonic(Mnemonic::Xorpd, xorps);
    t.set_mnemonic(Mnemonic::Shufps, shufps);
    t.set_mnemonic(Mnemonic::Shufpd, shufpd);
    t.set_mnemonic(Mnemonic::Unpcklps, unpcklps);
    t.set_mnemonic(Mnemonic::Unpckhps, unpckhps);
    t.set_mnemonic(Mnemonic::Unpcklpd, unpcklpd);
    t.set_mnemonic(Mnemonic::Unpckhpd, unpckhpd);
    t.set_mnemonic(Mnemonic::Pshufd, pshufd);
    t.set_mnemonic(Mnemonic::Pshufhw, pshufhw);
    t.set_mnemonic(Mnemonic::Pshuflw, pshuflw);
    t.set_mnemonic(Mnemonic::Pslldq, pslldq);
    t.set_mnemonic(Mnemonic::Psrldq, psrldq);
    t.set_mnemonic(Mnemonic::Punpcklqdq, punpcklqdq);
    t.set_mnemonic(Mnemonic::Punpckhqdq, punpckhqdq);

    // Conversions.
    t.set_mnemonic(Mnemonic::Cvtpi2ps, cvtpi2p::<F32>);
    t.set_mnemonic(Mnemonic::Cvtpi2pd, cvtpi2p::<F64>);
    t.set_mnemonic(Mnemonic::Cvtps2pi, cvtp2pi::<F32, false>);
    t.set_mnemonic(Mnemonic::Cvttps2pi, cvtp2pi::<F32, true>);
    t.set_mnemonic(Mnemonic::Cvtpd2pi, cvtp2pi::<F64, false>);
    t.set_mnemonic(Mnemonic::Cvttpd2pi, cvtp2pi::<F64, true>);
    t.set_mnemonic(Mnemonic::Cvtsi2ss, cvtsi2s::<F32>);
    t.set_mnemonic(Mnemonic::Cvtsi2sd, cvtsi2s::<F64>);
    t.set_mnemonic(Mnemonic::Cvtss2si, cvts2si::<F32, false>);
    t.set_mnemonic(Mnemonic::Cvttss2si, cvts2si::<F32, true>);
    t.set_mnemonic(Mnemonic::Cvtsd2si, cvts2si::<F64, false>);
    t.set_mnemonic(Mnemonic::Cvttsd2si, cvts2si::<F64, true>);
    t.set_mnemonic(Mnemonic::Cvtss2sd, cvtss2sd);
    t.set_mnemonic(Mnemonic::Cvtsd2ss, cvtsd2ss);
    t.set_mnemonic(Mnemonic::Cvtps2pd, cvtps2pd);
    t.set_mnemonic(Mnemonic::Cvtpd2ps, cvtpd2ps);
    t.set_mnemonic(Mnemonic::Cvtdq2ps, cvtdq2ps);
    t.set_mnemonic(Mnemonic::Cvtps2dq, cvtp2dq::<F32, false>);
    t.set_mnemonic(Mnemonic::Cvttps2dq, cvtp2dq::<F32, true>);
    t.set_mnemonic(Mnemonic::Cvtdq2pd, cvtdq2pd);
    t.set_mnemonic(Mnemonic::Cvtpd2dq, cvtp2dq::<F64, false>);
    t.set_mnemonic(Mnemonic::Cvttpd2dq, cvtp2dq::<F64, true>);
}

// ---- moves ------------------------------------------------------------------

/// MOVAPS/MOVAPD/MOVDQA/MOVNT* (aligned) and MOVUPS/MOVUPD/MOVDQU/LDDQU.
fn mov128<const ALIGN: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    if d.i.op0_kind() == OpKind::Register {
        let v = cpu.vec_read(p, d, 1, ALIGN)?;
        cpu.set_xmm_reg(d.i.op0_register(), v);
        Ok(())
    } else {
        let v = cpu.xmm_reg(d.i.op1_register());
        cpu.vec_store(p, d, 16, v, ALIGN)
    }
}

/// MOVSS/MOVSD: register to register merges the low lane; a load zeroes
/// the rest of the register; a store writes the low lane.
fn mov_scalar<const W: usize>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    match (d.i.op0_kind(), d.i.op1_kind()) {
        (OpKind::Register, OpKind::Register) => {
            let dst = d.i.op0_register();
            let v = lane(cpu.xmm_reg(d.i.op1_register()), 0, W);
            let r = set_lane(cpu.xmm_reg(dst), 0, W, v);
            cpu.set_xmm_reg(dst, r);
            Ok(())
        }
        (OpKind::Register, _) => {
            let v = cpu.vec_load(p, d, W, false)?;
            cpu.set_xmm_reg(d.i.op0_register(), v);
            Ok(())
        }
        _ => {
            let v = lane(cpu.xmm_reg(d.i.op1_register()), 0, W);
            cpu.vec_store(p, d, W, u128::from(v), false)
        }
    }
}

/// MOVLPS/MOVLPD: the low quadword from or to memory.
fn movlp(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    if d.i.op0_kind() == OpKind::Register {
        let v = cpu.vec_load(p, d, 8, false)? as u64;
        let dst = d.i.op0_register();
        let r = set_lane(cpu.xmm_reg(dst), 0, 8, v);
        cpu.set_xmm_reg(dst, r);
        Ok(())
    } else {
        let v = lane(cpu.xmm_reg(d.i.op1_register()), 0, 8);
        cpu.vec_store(p, d, 8, u128::from(v), false)
    }
}

/// MOVHPS/MOVHPD: the high quadword from or to memory.
fn movhp(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    if d.i.op0_kind() == OpKind::Register {
        let v = cpu.vec_load(p, d, 8, false)? as u64;
        let dst = d.i.op0_register();
        let r = set_lane(cpu.xmm_reg(dst), 1, 8, v);
        cpu.set_xmm_reg(dst, r);
        Ok(())
    } else {
        let v = lane(cpu.xmm_reg(d.i.op1_register()), 1, 8);
        cpu.vec_store(p, d, 8, u128::from(v), false)
    }
}

fn movhlps(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let dst = d.i.op0_register();
    let v = lane(cpu.xmm_reg(d.i.op1_register()), 1, 8);
    let r = set_lane(cpu.xmm_reg(dst), 0, 8, v);
    cpu.set_xmm_reg(dst, r);
    Ok(())
}

fn movlhps(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let dst = d.i.op0_register();
    let v = lane(cpu.xmm_reg(d.i.op1_register()), 0, 8);
    let r = set_lane(cpu.xmm_reg(dst), 1, 8, v);
    cpu.set_xmm_reg(dst, r);
    Ok(())
}

/// MOVMSKPS/MOVMSKPD r32/r64, xmm: the lane sign bits, zero-extended.
fn movmsk<const W: usize>(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let v = cpu.xmm_reg(d.i.op1_register());
    let m = (0..16 / W).fold(0u64, |m, i| m | ((lane(v, i, W) >> (8 * W - 1)) << i));
    cpu.set_reg(d.i.op0_register(), m);
    Ok(())
}

fn movddup(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let b = cpu.vec_read(p, d, 1, true)? as u64;
    cpu.set_xmm_reg(d.i.op0_register(), u128::from(b) | (u128::from(b) << 64));
    Ok(())
}

fn dup32(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn, odd: usize) -> XResult<()> {
    cpu.check_sse()?;
    let b = cpu.vec_read(p, d, 1, true)?;
    let mut r = 0u128;
    for i in 0..4 {
        r = set_lane(r, i, 4, lane(b, (i & !1) | odd, 4));
    }
    cpu.set_xmm_reg(d.i.op0_register(), r);
    Ok(())
}

fn movshdup(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    dup32(cpu, p, d, 1)
}

fn movsldup(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    dup32(cpu, p, d, 0)
}

/// MOVQ2DQ xmm, mm (an MMX-state instruction: x87 → MMX transition).
fn movq2dq(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    cpu.x87_pending_check()?;
    let v = cpu.mm_reg(d.i.op1_register());
    cpu.mmx_switch();
    cpu.set_xmm_reg(d.i.op0_register(), u128::from(v));
    Ok(())
}

/// MOVDQ2Q mm, xmm.
fn movdq2q(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    cpu.x87_pending_check()?;
    let v = cpu.xmm_reg(d.i.op1_register()) as u64;
    cpu.mmx_switch();
    cpu.set_mm_reg(d.i.op0_register(), v);
    Ok(())
}

/// MOVNTI m32/m64, r32/r64: an ordinary store (no SSE state involved).
fn movnti(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let r = d.i.op1_register();
    let v = cpu.reg(r);
    let off = cpu.ea(d);
    cpu.write_mem(p, d.seg as usize, off, r.size(), v)
}

fn ldmxcsr(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let v = cpu.vec_load(p, d, 4, false)? as u32;
    cpu.load_mxcsr(v)
}

fn stmxcsr(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let v = cpu.fpu.mxcsr;
    cpu.vec_store(p, d, 4, u128::from(v), false)
}

// ---- floating-point arithmetic --------------------------------------------------

/// `dst[i] = f(dst[i], src[i], i)` over all lanes (packed) or lane 0
/// (scalar, other lanes kept), with the MXCSR check before the write.
#[inline(always)]
fn fp_lanes<T: Fmt>(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
    packed: bool,
    f: impl Fn(&mut Env, u64, u64, usize) -> u64,
) -> XResult<()> {
    cpu.check_sse()?;
    let b = cpu.vec_read(p, d, 1, true)?;
    let dst = d.i.op0_register();
    let a = cpu.xmm_reg(dst);
    let mut e = Env::new(cpu.fpu.mxcsr);
    let w = T::BYTES;
    let lanes = if packed { 16 / w } else { 1 };
    let mut r = a;
    for i in 0..lanes {
        r = set_lane(r, i, w, f(&mut e, lane(a, i, w), lane(b, i, w), i));
    }
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_xmm_reg(dst, r);
    Ok(())
}

macro_rules! fp_ops {
    ($($name:ident: $t:ty, $packed:expr, $f:expr;)*) => {
        $(
            fn $name(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
                fp_lanes::<$t>(cpu, p, d, $packed, $f)
            }
        )*
    };
}

fp_ops! {
    addps: F32, true, |e, a, b, _| sf::add::<F32>(e, a, b);
    addss: F32, false, |e, a, b, _| sf::add::<F32>(e, a, b);
    addpd: F64, true, |e, a, b, _| sf::add::<F64>(e, a, b);
    addsd: F64, false, |e, a, b, _| sf::add::<F64>(e, a, b);
    subps: F32, true, |e, a, b, _| sf::sub::<F32>(e, a, b);
    subss: F32, false, |e, a, b, _| sf::sub::<F32>(e, a, b);
    subpd: F64, true, |e, a, b, _| sf::sub::<F64>(e, a, b);
    subsd: F64, false, |e, a, b, _| sf::sub::<F64>(e, a, b);
    mulps: F32, true, |e, a, b, _| sf::mul::<F32>(e, a, b);
    mulss: F32, false, |e, a, b, _| sf::mul::<F32>(e, a, b);
    mulpd: F64, true, |e, a, b, _| sf::mul::<F64>(e, a, b);
    mulsd: F64, false, |e, a, b, _| sf::mul::<F64>(e, a, b);
    divps: F32, true, |e, a, b, _| sf::div::<F32>(e, a, b);
    divss: F32, false, |e, a, b, _| sf::div::<F32>(e, a, b);
    divpd: F64, true, |e, a, b, _| sf::div::<F64>(e, a, b);
    divsd: F64, false, |e, a, b, _| sf::div::<F64>(e, a, b);
    minps: F32, true, |e, a, b, _| sf::min::<F32>(e, a, b);
    minss: F32, false, |e, a, b, _| sf::min::<F32>(e, a, b);
    minpd: F64, true, |e, a, b, _| sf::min::<F64>(e, a, b);
    minsd: F64, false, |e, a, b, _| sf::min::<F64>(e, a, b);
    maxps: F32, true, |e, a, b, _| sf::max::<F32>(e, a, b);
    maxss: F32, false, |e, a, b, _| sf::max::<F32>(e, a, b);
    maxpd: F64, true, |e, a, b, _| sf::max::<F64>(e, a, b);
    maxsd: F64, false, |e, a, b, _| sf::max::<F64>(e, a, b);
    sqrtps: F32, true, |e, _, b, _| sf::sqrt::<F32>(e, b);
    sqrtss: F32, false, |e, _, b, _| sf::sqrt::<F32>(e, b);
    sqrtpd: F64, true, |e, _, b, _| sf::sqrt::<F64>(e, b);
    sqrtsd: F64, false, |e, _, b, _| sf::sqrt::<F64>(e, b);
    rcpps: F32, true, |_, _, b, _| sf::rcp(b);
    rcpss: F32, false, |_, _, b, _| sf::rcp(b);
    rsqrtps: F32, true, |_, _, b, _| sf::rsqrt(b);
    rsqrtss: F32, false, |_, _, b, _| sf::rsqrt(b);
    addsubps: F32, true, |e, a, b, i| if i & 1 == 0 { sf::sub::<F32>(e, a, b) } else { sf::add::<F32>(e, a, b) };
    addsubpd: F64, true, |e, a, b, i| if i & 1 == 0 { sf::sub::<F64>(e, a, b) } else { sf::add::<F64>(e, a, b) };
}

/// HADDPS/HADDPD/HSUBPS/HSUBPD: pairs of the destination, then of the
/// source.
fn horiz<T: Fmt, const SUB: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let b = cpu.vec_read(p, d, 1, true)?;
    let dst = d.i.op0_register();
    let a = cpu.xmm_reg(dst);
    let mut e = Env::new(cpu.fpu.mxcsr);
    let w = T::BYTES;
    let per = 16 / w / 2;
    let mut r = 0u128;
    for (k, src) in [a, b].into_iter().enumerate() {
        for i in 0..per {
            let (x, y) = (lane(src, 2 * i, w), lane(src, 2 * i + 1, w));
            let v = if SUB {
                sf::sub::<T>(&mut e, x, y)
            } else {
                sf::add::<T>(&mut e, x, y)
            };
            r = set_lane(r, k * per + i, w, v);
        }
    }
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_xmm_reg(dst, r);
    Ok(())
}

/// CMPPS/CMPPD/CMPSS/CMPSD xmm, xmm/m, imm8 (predicate imm8[2:0]).
fn cmp<T: Fmt, const PACKED: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let imm = d.i.immediate8();
    fp_lanes::<T>(cpu, p, d, PACKED, |e, a, b, _| {
        sf::cmp_pred::<T>(e, a, b, imm)
    })
}

/// COMISS/COMISD (IE on any NaN) and UCOMISS/UCOMISD (IE on SNaN): ZF, PF,
/// CF from the comparison, OF SF AF cleared.
fn comis<T: Fmt, const SIGNALING: bool>(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    cpu.check_sse()?;
    let b = lane(cpu.vec_read(p, d, 1, true)?, 0, T::BYTES);
    let a = lane(cpu.xmm_reg(d.i.op0_register()), 0, T::BYTES);
    let mut e = Env::new(cpu.fpu.mxcsr);
    let o = sf::compare::<T>(&mut e, a, b, SIGNALING);
    cpu.sse_commit_flags(e.flags)?;
    let f = match o {
        None => flags::ZF | flags::PF | flags::CF,
        Some(std::cmp::Ordering::Less) => flags::CF,
        Some(std::cmp::Ordering::Equal) => flags::ZF,
        Some(std::cmp::Ordering::Greater) => 0,
    };
    cpu.flags.set_arith(f);
    Ok(())
}

// ---- logic, shuffles, unpacks ----------------------------------------------------

/// `dst = f(dst, src, imm8)` on whole registers (no MXCSR involvement).
#[inline(always)]
fn vec_op(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
    f: impl Fn(u128, u128, u8) -> u128,
) -> XResult<()> {
    cpu.check_sse()?;
    let imm = if d.i.op_count() == 3 {
        d.i.immediate8()
    } else {
        0
    };
    let b = cpu.vec_read(p, d, 1, true)?;
    let dst = d.i.op0_register();
    let r = f(cpu.xmm_reg(dst), b, imm);
    cpu.set_xmm_reg(dst, r);
    Ok(())
}

/// A whole-register operation `(dst, src, imm8) -> result`.
pub(crate) type VecOp = fn(u128, u128, u8) -> u128;

/// Define, per operation, the function `$k` and its legacy handler `$name`.
macro_rules! vec_ops {
    ($($name:ident, $k:ident = $f:expr;)*) => {
        $(
            pub(crate) const $k: VecOp = $f;
            fn $name(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
                vec_op(cpu, p, d, $k)
            }
        )*
    };
}

vec_ops! {
    andps, ANDPS = |a, b, _| a & b;
    andnps, ANDNPS = |a, b, _| !a & b;
    orps, ORPS = |a, b, _| a | b;
    xorps, XORPS = |a, b, _| a ^ b;
    shufps, SHUFPS = |a, b, imm| {
        let s = |k: u32| usize::from((imm >> (2 * k)) & 3);
        let mut r = set_lane(0, 0, 4, lane(a, s(0), 4));
        r = set_lane(r, 1, 4, lane(a, s(1), 4));
        r = set_lane(r, 2, 4, lane(b, s(2), 4));
        set_lane(r, 3, 4, lane(b, s(3), 4))
    };
    shufpd, SHUFPD = |a, b, imm| {
        let lo = lane(a, usize::from(imm & 1), 8);
        let hi = lane(b, usize::from((imm >> 1) & 1), 8);
        u128::from(lo) | (u128::from(hi) << 64)
    };
    unpcklps, UNPCKLPS = |a, b, _| interleave::<4>(a, b, 0);
    unpckhps, UNPCKHPS = |a, b, _| interleave::<4>(a, b, 2);
    unpcklpd, UNPCKLPD = |a, b, _| interleave::<8>(a, b, 0);
    unpckhpd, UNPCKHPD = |a, b, _| interleave::<8>(a, b, 1);
    punpcklqdq, PUNPCKLQDQ = |a, b, _| interleave::<8>(a, b, 0);
    punpckhqdq, PUNPCKHQDQ = |a, b, _| interleave::<8>(a, b, 1);
    pshufd, PSHUFD = |_, b, imm| {
        (0..4).fold(0, |r, i| set_lane(r, i, 4, lane(b, usize::from((imm >> (2 * i)) & 3), 4)))
    };
    pshuflw, PSHUFLW = |_, b, imm| {
        (0..4).fold(b, |r, i| set_lane(r, i, 2, lane(b, usize::from((imm >> (2 * i)) & 3), 2)))
    };
    pshufhw, PSHUFHW = |_, b, imm| {
        (0..4).fold(b, |r, i| {
            set_lane(r, 4 + i, 2, lane(b, 4 + usize::from((imm >> (2 * i)) & 3), 2))
        })
    };
    pslldq, PSLLDQ = |a, b, _| if b < 16 { a << (8 * b) } else { 0 };
    psrldq, PSRLDQ = |a, b, _| if b < 16 { a >> (8 * b) } else { 0 };
}

/// Interleave `W`-byte lanes of `a` and `b` starting at lane `from`.
#[inline(always)]
fn interleave<const W: usize>(a: u128, b: u128, from: usize) -> u128 {
    let per = 16 / W / 2;
    let mut r = 0u128;
    for i in 0..per {
        r = set_lane(r, 2 * i, W, lane(a, from + i, W));
        r = set_lane(r, 2 * i + 1, W, lane(b, from + i, W));
    }
    r
}

// ---- conversions ------------------------------------------------------------------

/// Low 32 bits of `x`, sign-extended.
#[inline(always)]
fn i32_of(x: u64) -> i64 {
    i64::from(x as i32)
}

/// CVTPI2PS xmm, mm/m64 (low two lanes; upper kept) and CVTPI2PD xmm,
/// mm/m64 (both lanes). An MMX register source makes the x87 → MMX
/// transition.
fn cvtpi2p<T: Fmt>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let from_mm = d.i.op1_kind() == OpKind::Register;
    if from_mm {
        cpu.x87_pending_check()?;
        cpu.mmx_early_switch();
    }
    let b = cpu.vec_read(p, d, 1, false)?;
    let dst = d.i.op0_register();
    let mut e = Env::new(cpu.fpu.mxcsr);
    let mut r = cpu.xmm_reg(dst);
    for i in 0..2 {
        let v = sf::from_int::<T>(&mut e, i32_of(lane(b, i, 4)));
        r = set_lane(r, i, T::BYTES, v);
    }
    if from_mm {
        // Before a SIMD exception on both vendors.
        cpu.mmx_switch();
    }
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_xmm_reg(dst, r);
    Ok(())
}

/// CVT(T)PS2PI mm, xmm/m64 and CVT(T)PD2PI mm, xmm/m128.
fn cvtp2pi<T: Fmt, const TRUNC: bool>(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    cpu.check_sse()?;
    cpu.x87_pending_check()?;
    cpu.mmx_early_switch();
    let b = cpu.vec_read(p, d, 1, true)?;
    let mut e = Env::new(cpu.fpu.mxcsr);
    let mut r = 0u64;
    for i in 0..2 {
        let v = sf::to_int::<T>(&mut e, lane(b, i, T::BYTES), 32, TRUNC);
        r |= v << (32 * i);
    }
    // Before a SIMD exception on both vendors.
    cpu.mmx_switch();
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_mm_reg(d.i.op0_register(), r);
    Ok(())
}

/// CVTSI2SS/CVTSI2SD xmm, r/m32|64 (lane 0).
fn cvtsi2s<T: Fmt>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let size = op_bytes(d, 1);
    let v = sext(cpu.vec_read(p, d, 1, false)? as u64, size) as i64;
    let dst = d.i.op0_register();
    let mut e = Env::new(cpu.fpu.mxcsr);
    let x = sf::from_int::<T>(&mut e, v);
    cpu.sse_commit_flags(e.flags)?;
    let r = set_lane(cpu.xmm_reg(dst), 0, T::BYTES, x);
    cpu.set_xmm_reg(dst, r);
    Ok(())
}

/// CVT(T)SS2SI / CVT(T)SD2SI r32|64, xmm/m.
fn cvts2si<T: Fmt, const TRUNC: bool>(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    cpu.check_sse()?;
    let b = lane(cpu.vec_read(p, d, 1, true)?, 0, T::BYTES);
    let dst = d.i.op0_register();
    let width = if dst.size() == 8 { 64 } else { 32 };
    let mut e = Env::new(cpu.fpu.mxcsr);
    let v = sf::to_int::<T>(&mut e, b, width, TRUNC);
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_reg(dst, v);
    Ok(())
}

fn cvtss2sd(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    fp_lanes::<F64>(cpu, p, d, false, |e, _, b, _| {
        sf::f32_to_f64(e, b & 0xffff_ffff)
    })
}

fn cvtsd2ss(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let b = lane(cpu.vec_read(p, d, 1, true)?, 0, 8);
    let dst = d.i.op0_register();
    let mut e = Env::new(cpu.fpu.mxcsr);
    let v = sf::f64_to_f32(&mut e, b);
    cpu.sse_commit_flags(e.flags)?;
    let r = set_lane(cpu.xmm_reg(dst), 0, 4, v);
    cpu.set_xmm_reg(dst, r);
    Ok(())
}

fn cvtps2pd(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let b = cpu.vec_read(p, d, 1, true)?;
    let mut e = Env::new(cpu.fpu.mxcsr);
    let lo = sf::f32_to_f64(&mut e, lane(b, 0, 4));
    let hi = sf::f32_to_f64(&mut e, lane(b, 1, 4));
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_xmm_reg(d.i.op0_register(), u128::from(lo) | (u128::from(hi) << 64));
    Ok(())
}

fn cvtpd2ps(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let b = cpu.vec_read(p, d, 1, true)?;
    let mut e = Env::new(cpu.fpu.mxcsr);
    let lo = sf::f64_to_f32(&mut e, lane(b, 0, 8));
    let hi = sf::f64_to_f32(&mut e, lane(b, 1, 8));
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_xmm_reg(d.i.op0_register(), u128::from(lo | (hi << 32)));
    Ok(())
}

fn cvtdq2ps(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    fp_lanes::<F32>(cpu, p, d, true, |e, _, b, _| {
        sf::from_int::<F32>(e, i32_of(b))
    })
}

fn cvtdq2pd(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_sse()?;
    let b = cpu.vec_read(p, d, 1, true)?;
    let mut e = Env::new(cpu.fpu.mxcsr);
    let lo = sf::from_int::<F64>(&mut e, i32_of(lane(b, 0, 4)));
    let hi = sf::from_int::<F64>(&mut e, i32_of(lane(b, 1, 4)));
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_xmm_reg(d.i.op0_register(), u128::from(lo) | (u128::from(hi) << 64));
    Ok(())
}

/// CVT(T)PS2DQ (four lanes) and CVT(T)PD2DQ (two lanes, upper half zeroed).
fn cvtp2dq<T: Fmt, const TRUNC: bool>(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    cpu.check_sse()?;
    let b = cpu.vec_read(p, d, 1, true)?;
    let mut e = Env::new(cpu.fpu.mxcsr);
    let mut r = 0u128;
    for i in 0..16 / T::BYTES {
        let v = sf::to_int::<T>(&mut e, lane(b, i, T::BYTES), 32, TRUNC);
        r = set_lane(r, i, 4, v);
    }
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_xmm_reg(d.i.op0_register(), r);
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::cpu::{Cpu, CR0_TS, CR4_OSFXSR, CR4_OSXMMEXCPT};
    use crate::exception::{Exception, XResult, XM};
    use crate::flags::*;
    use crate::insn::testutil::*;
    use crate::state::gpr::*;

    /// CR4.OSFXSR and CR4.OSXMMEXCPT on.
    pub(crate) fn sse_on(c: &mut Cpu) {
        let mut s = c.state();
        s.sregs.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT;
        c.set_state(&s);
    }

    /// Execute the one instruction at `code` and return its handler's
    /// result without delivering any exception.
    pub(crate) fn exec1(
        mode: Mode,
        code: &[u8],
        init: impl FnOnce(&mut Cpu),
    ) -> (Cpu, XResult<()>) {
        let mut c = new_cpu();
        setup(&mut c, mode);
        write_phys(&c, CODE, code);
        init(&mut c);
        let mut p = TestPlatform::default();
        let insn = c.decode_one(&mut p).expect("decodable");
        let r = (insn.h)(&mut c, &mut p, &insn);
        (c, r)
    }

    fn f4(v: [f32; 4]) -> u128 {
        v.iter()
            .enumerate()
            .fold(0, |r, (i, x)| r | (u128::from(x.to_bits()) << (32 * i)))
    }

    fn d2(lo: f64, hi: f64) -> u128 {
        u128::from(lo.to_bits()) | (u128::from(hi.to_bits()) << 64)
    }

    const RN: u32 = 0x1f80;

    #[test]
    fn addps_rounding_modes() {
        // addps xmm0, xmm1 (0f 58 c1)
        let a = f4([1.0, -1.0, 3.0, 1e30]);
        let t = f32::EPSILON / 2.0; // half an ulp of 1.0: ties
        let b = f4([t, -t, 1.0, 1.0]);
        let cases = [
            (0u32, [1.0, -1.0, 4.0, 1e30]),
            (1, [1.0, -1.0 - f32::EPSILON, 4.0, 1e30]),
            (
                2,
                [
                    1.0 + f32::EPSILON,
                    -1.0,
                    4.0,
                    f32::from_bits(1e30f32.to_bits() + 1),
                ],
            ),
            (3, [1.0, -1.0, 4.0, 1e30]),
        ];
        for (rc, want) in cases {
            let c = run(Mode::Long64, &[0x0f, 0x58, 0xc1], |c| {
                sse_on(c);
                c.fpu.xmm[0] = a;
                c.fpu.xmm[1] = b;
                c.fpu.mxcsr = RN | rc << 13;
            });
            assert_eq!(c.fpu.xmm[0], f4(want), "rc {rc}");
            assert_eq!(c.fpu.mxcsr, RN | rc << 13 | 0x20, "PE set, rc {rc}");
        }
    }

    #[test]
    fn divss_by_zero_masked_and_unmasked() {
        // divss xmm0, xmm1 (f3 0f 5e c1)
        let code = [0xf3, 0x0f, 0x5e, 0xc1];
        let init = |c: &mut Cpu, mx: u32| {
            sse_on(c);
            c.fpu.xmm[0] = f4([-2.0, 5.0, 6.0, 7.0]);
            c.fpu.xmm[1] = f4([0.0, 1.0, 1.0, 1.0]);
            c.fpu.mxcsr = mx;
        };
        let c = run(Mode::Long64, &code, |c| init(c, RN));
        assert_eq!(c.fpu.xmm[0], f4([f32::NEG_INFINITY, 5.0, 6.0, 7.0]));
        assert_eq!(c.fpu.mxcsr, RN | 0x4);
        // ZM clear, OSXMMEXCPT set → #XM, destination unchanged, ZE recorded.
        let (c, r) = exec1(Mode::Long64, &code, |c| init(c, RN & !(1 << 9)));
        assert_eq!(r, Err(Exception::new(XM)));
        assert_eq!(c.fpu.xmm[0], f4([-2.0, 5.0, 6.0, 7.0]));
        assert_eq!(c.fpu.mxcsr, (RN & !(1 << 9)) | 0x4);
        // Without CR4.OSXMMEXCPT → #UD.
        let (c, r) = exec1(Mode::Long64, &code, |c| {
            init(c, RN & !(1 << 9));
            let mut s = c.state();
            s.sregs.cr4 &= !CR4_OSXMMEXCPT;
            c.set_state(&s);
        });
        assert_eq!(r, Err(Exception::ud()));
        assert_eq!(c.fpu.xmm[0], f4([-2.0, 5.0, 6.0, 7.0]));
    }

    #[test]
    fn unmasked_precomputation_exception_drops_other_flags() {
        // addps xmm0, xmm1: lane 0 inexact (PE masked), lane 1 SNaN (IE unmasked).
        let (c, r) = exec1(Mode::Long64, &[0x0f, 0x58, 0xc1], |c| {
            sse_on(c);
            c.fpu.xmm[0] = f4([1.0, 1.0, 0.0, 0.0]);
            c.fpu.xmm[1] = f4([1e-10, f32::from_bits(0x7f80_0001), 0.0, 0.0]);
            c.fpu.mxcsr = RN & !(1 << 7);
        });
        assert_eq!(r, Err(Exception::new(XM)));
        assert_eq!(c.fpu.mxcsr & 0x3f, 0x1);
        // Unmasked post-computation exception (PE) records all flags.
        let (c, r) = exec1(Mode::Long64, &[0x0f, 0x58, 0xc1], |c| {
            sse_on(c);
            c.fpu.xmm[0] = f4([1.0, 1.0, 0.0, 0.0]);
            c.fpu.xmm[1] = f4([1e-10, f32::from_bits(0x7f80_0001), 0.0, 0.0]);
            c.fpu.mxcsr = RN & !(1 << 12);
        });
        assert_eq!(r, Err(Exception::new(XM)));
        assert_eq!(c.fpu.mxcsr & 0x3f, 0x21);
        assert_eq!(c.fpu.xmm[0], f4([1.0, 1.0, 0.0, 0.0]));
    }

    #[test]
    fn cvttsd2si_overflow_and_conversions() {
        // cvttsd2si eax, xmm0 (f2 0f 2c c0) ; cvttsd2si rbx, xmm1 (f2 48 0f 2c d9)
        // cvtsd2si ecx, xmm2 (f2 0f 2d ca) ; cvtsi2sd xmm3, rdx (f2 48 0f 2a da)
        let code = [
            0xf2, 0x0f, 0x2c, 0xc0, 0xf2, 0x48, 0x0f, 0x2c, 0xd9, 0xf2, 0x0f, 0x2d, 0xca, 0xf2,
            0x48, 0x0f, 0x2a, 0xda,
        ];
        let c = run(Mode::Long64, &code, |c| {
            sse_on(c);
            c.fpu.xmm[0] = d2(3e9, 0.0);
            c.fpu.xmm[1] = d2(f64::NAN, 0.0);
            c.fpu.xmm[2] = d2(-2.5, 0.0);
            c.fpu.xmm[3] = d2(0.0, 42.0);
            c.set_gpr(RAX, u64::MAX);
            c.set_gpr(RDX, (-3i64) as u64);
        });
        assert_eq!(c.gpr(RAX), 0x8000_0000);
        assert_eq!(c.gpr(RBX), 0x8000_0000_0000_0000);
        assert_eq!(c.gpr(RCX), 0xffff_fffe);
        assert_eq!(c.fpu.xmm[3], d2(-3.0, 42.0));
        assert_eq!(c.fpu.mxcsr, RN | 0x21);
    }

    #[test]
    fn comisd_ucomisd_flags() {
        // comisd xmm0, xmm1 (66 0f 2f c1)
        let c = run(Mode::Long64, &[0x66, 0x0f, 0x2f, 0xc1], |c| {
            sse_on(c);
            c.fpu.xmm[0] = d2(1.0, 0.0);
            c.fpu.xmm[1] = d2(f64::NAN, 0.0);
            c.flags.set_arith(OF | SF | AF);
        });
        assert_eq!(c.rflags() & ARITH, ZF | PF | CF);
        assert_eq!(c.fpu.mxcsr, RN | 1);
        // ucomisd xmm0, xmm1 (66 0f 2e c1): QNaN → no IE.
        let c = run(Mode::Long64, &[0x66, 0x0f, 0x2e, 0xc1], |c| {
            sse_on(c);
            c.fpu.xmm[0] = d2(1.0, 0.0);
            c.fpu.xmm[1] = d2(f64::NAN, 0.0);
        });
        assert_eq!(c.rflags() & ARITH, ZF | PF | CF);
        assert_eq!(c.fpu.mxcsr, RN);
        // ucomiss xmm0, [0x2000] (0f 2e 04 25 00 20 00 00): 1 < 2 → CF; misaligned ok.
        let c = run(
            Mode::Long64,
            &[0x0f, 0x2e, 0x04, 0x25, 0x01, 0x20, 0x00, 0x00],
            |c| {
                sse_on(c);
                c.fpu.xmm[0] = f4([1.0, 0.0, 0.0, 0.0]);
                write_phys(c, 0x2001, &2f32.to_le_bytes());
                c.flags.set_arith(ZF | OF);
            },
        );
        assert_eq!(c.rflags() & ARITH, CF);
        // comiss with unmasked IE: #XM and EFLAGS unchanged.
        let (c, r) = exec1(Mode::Long64, &[0x0f, 0x2f, 0xc1], |c| {
            sse_on(c);
            c.fpu.xmm[1] = f4([f32::NAN, 0.0, 0.0, 0.0]);
            c.fpu.mxcsr = RN & !(1 << 7);
            c.flags.set_arith(OF);
        });
        assert_eq!(r, Err(Exception::new(XM)));
        assert_eq!(c.rflags() & ARITH, OF);
    }

    #[test]
    fn alignment_and_availability_faults() {
        // movaps xmm0, [0x2008] (0f 28 04 25 08 20 00 00) → #GP(0)
        let code = [0x0f, 0x28, 0x04, 0x25, 0x08, 0x20, 0x00, 0x00];
        let (_, r) = exec1(Mode::Long64, &code, sse_on);
        assert_eq!(r, Err(Exception::gp0()));
        // movups xmm0, [0x2008] (0f 10 04 25 08 20 00 00) is fine.
        let c = run(
            Mode::Long64,
            &[0x0f, 0x10, 0x04, 0x25, 0x08, 0x20, 0x00, 0x00],
            |c| {
                sse_on(c);
                write_phys(
                    c,
                    0x2008,
                    &0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10u128.to_le_bytes(),
                );
            },
        );
        assert_eq!(c.fpu.xmm[0], 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
        // addpd xmm0, [0x2004] (66 0f 58 04 25 04 20 00 00) → #GP(0);
        // addsd xmm0, [0x2004] (f2 0f 58 04 25 04 20 00 00) is fine.
        let (_, r) = exec1(
            Mode::Long64,
            &[0x66, 0x0f, 0x58, 0x04, 0x25, 0x04, 0x20, 0x00, 0x00],
            sse_on,
        );
        assert_eq!(r, Err(Exception::gp0()));
        let (_, r) = exec1(
            Mode::Long64,
            &[0xf2, 0x0f, 0x58, 0x04, 0x25, 0x04, 0x20, 0x00, 0x00],
            sse_on,
        );
        assert_eq!(r, Ok(()));
        // movaps [0x2008], xmm0 (0f 29 04 25 08 20 00 00): #GP, memory untouched.
        let (c, r) = exec1(
            Mode::Long64,
            &[0x0f, 0x29, 0x04, 0x25, 0x08, 0x20, 0x00, 0x00],
            |c| {
                sse_on(c);
                c.fpu.xmm[0] = u128::MAX;
            },
        );
        assert_eq!(r, Err(Exception::gp0()));
        assert_eq!(read_phys(&c, 0x2008, 8), 0);
        // CR0.TS → #NM; CR4.OSFXSR clear → #UD.
        let (_, r) = exec1(Mode::Long64, &[0x0f, 0x58, 0xc1], |c| {
            sse_on(c);
            let mut s = c.state();
            s.sregs.cr0 |= CR0_TS;
            c.set_state(&s);
        });
        assert_eq!(r, Err(Exception::nm()));
        let (_, r) = exec1(Mode::Long64, &[0x0f, 0x58, 0xc1], |_| {});
        assert_eq!(r, Err(Exception::ud()));
    }

    #[test]
    fn ldmxcsr_stmxcsr() {
        // ldmxcsr [0x2000] (0f ae 14 25 00 20 00 00) ; stmxcsr [0x2004] (0f ae 1c 25 04 20 00 00)
        let code = [
            0x0f, 0xae, 0x14, 0x25, 0x00, 0x20, 0x00, 0x00, 0x0f, 0xae, 0x1c, 0x25, 0x04, 0x20,
            0x00, 0x00,
        ];
        let c = run(Mode::Long64, &code, |c| {
            sse_on(c);
            write_phys(c, 0x2000, &0xffc0u32.to_le_bytes());
        });
        assert_eq!(c.fpu.mxcsr, 0xffc0);
        assert_eq!(read_phys(&c, 0x2004, 4), 0xffc0);
        let (c, r) = exec1(Mode::Long64, &code[..8], |c| {
            sse_on(c);
            write_phys(c, 0x2000, &0x1_1f80u32.to_le_bytes());
        });
        assert_eq!(r, Err(Exception::gp0()));
        assert_eq!(c.fpu.mxcsr, RN);
    }

    #[test]
    fn scalar_moves_and_upper_lanes() {
        // movss xmm0, xmm1 (f3 0f 10 c1) ; movss xmm2, [0x2000] (f3 0f 10 14 25 00 20 00 00)
        // movsd xmm3, [0x2000] (f2 0f 10 1c 25 00 20 00 00) ; sqrtsd xmm4, xmm5 (f2 0f 51 e5)
        // movsd [0x2010], xmm4 (f2 0f 11 24 25 10 20 00 00)
        let code = [
            0xf3, 0x0f, 0x10, 0xc1, 0xf3, 0x0f, 0x10, 0x14, 0x25, 0x00, 0x20, 0x00, 0x00, 0xf2,
            0x0f, 0x10, 0x1c, 0x25, 0x00, 0x20, 0x00, 0x00, 0xf2, 0x0f, 0x51, 0xe5, 0xf2, 0x0f,
            0x11, 0x24, 0x25, 0x10, 0x20, 0x00, 0x00,
        ];
        let c = run(Mode::Long64, &code, |c| {
            sse_on(c);
            c.fpu.xmm[0] = u128::MAX;
            c.fpu.xmm[1] = 0x1234_5678;
            c.fpu.xmm[2] = u128::MAX;
            c.fpu.xmm[3] = u128::MAX;
            c.fpu.xmm[4] = d2(0.0, 7.0);
            c.fpu.xmm[5] = d2(2.25, 9.0);
            write_phys(c, 0x2000, &0xaaaa_bbbb_cccc_ddddu64.to_le_bytes());
        });
        assert_eq!(c.fpu.xmm[0], (u128::MAX << 32) | 0x1234_5678);
        assert_eq!(c.fpu.xmm[2], 0xcccc_dddd);
        assert_eq!(c.fpu.xmm[3], 0xaaaa_bbbb_cccc_dddd);
        assert_eq!(c.fpu.xmm[4], d2(1.5, 7.0));
        assert_eq!(read_phys(&c, 0x2010, 8), 1.5f64.to_bits());
    }

    #[test]
    fn shuffles_and_sse3() {
        // shufps xmm0, xmm1, 0x1b (0f c6 c1 1b) ; unpcklps xmm2, xmm3 (0f 14 d3)
        // pshufd xmm4, xmm5, 0x4e (66 0f 70 e5 4e) ; pslldq xmm6, 3 (66 0f 73 fe 03)
        // haddps xmm7, xmm1 (f2 0f 7c f9) ; movshdup xmm8, xmm1 (f3 44 0f 16 c1)
        let code = [
            0x0f, 0xc6, 0xc1, 0x1b, 0x0f, 0x14, 0xd3, 0x66, 0x0f, 0x70, 0xe5, 0x4e, 0x66, 0x0f,
            0x73, 0xfe, 0x03, 0xf2, 0x0f, 0x7c, 0xf9, 0xf3, 0x44, 0x0f, 0x16, 0xc1,
        ];
        let c = run(Mode::Long64, &code, |c| {
            sse_on(c);
            c.fpu.xmm[0] = f4([0.0, 1.0, 2.0, 3.0]);
            c.fpu.xmm[1] = f4([4.0, 5.0, 6.0, 7.0]);
            c.fpu.xmm[2] = 0x4444_4444_3333_3333_2222_2222_1111_1111;
            c.fpu.xmm[3] = 0x8888_8888_7777_7777_6666_6666_5555_5555;
            c.fpu.xmm[5] = 0x1111_1111_1111_1111_2222_2222_2222_2222;
            c.fpu.xmm[6] = 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10;
            c.fpu.xmm[7] = f4([1.0, 2.0, 10.0, 20.0]);
        });
        assert_eq!(c.fpu.xmm[0], f4([3.0, 2.0, 5.0, 4.0]));
        assert_eq!(c.fpu.xmm[2], 0x6666_6666_2222_2222_5555_5555_1111_1111);
        assert_eq!(c.fpu.xmm[4], 0x2222_2222_2222_2222_1111_1111_1111_1111);
        assert_eq!(c.fpu.xmm[6], 0x0405_0607_0809_0a0b_0c0d_0e0f_1000_0000);
        assert_eq!(c.fpu.xmm[7], f4([3.0, 30.0, 9.0, 13.0]));
        assert_eq!(c.fpu.xmm[8], f4([5.0, 5.0, 7.0, 7.0]));
    }

    #[test]
    fn packed_conversions_32bit_mode() {
        // cvtps2pd xmm0, xmm1 (0f 5a c1) ; cvtpd2ps xmm2, xmm3 (66 0f 5a d3)
        // cvtps2dq xmm4, xmm5 (66 0f 5b e5) ; cvttps2dq xmm6, xmm5 (f3 0f 5b f5)
        // cvtdq2pd xmm7, xmm4 (f3 0f e6 fc)
        let code = [
            0x0f, 0x5a, 0xc1, 0x66, 0x0f, 0x5a, 0xd3, 0x66, 0x0f, 0x5b, 0xe5, 0xf3, 0x0f, 0x5b,
            0xf5, 0xf3, 0x0f, 0xe6, 0xfc,
        ];
        let c = run(Mode::Prot32, &code, |c| {
            sse_on(c);
            c.fpu.xmm[1] = f4([1.5, -0.25, 99.0, 99.0]);
            c.fpu.xmm[2] = u128::MAX;
            c.fpu.xmm[3] = d2(0.1, 1e300);
            c.fpu.xmm[5] = f4([2.5, -2.5, 3.7, 3e9]);
        });
        assert_eq!(c.fpu.xmm[0], d2(1.5, -0.25));
        assert_eq!(c.fpu.xmm[2], f4([0.1, f32::INFINITY, 0.0, 0.0]));
        assert_eq!(c.fpu.xmm[4], 0x8000_0000_0000_0004_ffff_fffe_0000_0002);
        assert_eq!(c.fpu.xmm[6], 0x8000_0000_0000_0003_ffff_fffe_0000_0002);
        assert_eq!(c.fpu.xmm[7], d2(2.0, -2.0));
        // PE (0.1, 3.7), OE (1e300), IE (3e9).
        assert_eq!(c.fpu.mxcsr, RN | 0x29);
    }

    #[test]
    fn cvtpi2ps_and_cvtps2pi_touch_mmx_state() {
        // cvtpi2ps xmm0, mm1 (0f 2a c1) ; cvtps2pi mm2, xmm0 (0f 2d d0)
        let c = run(Mode::Long64, &[0x0f, 0x2a, 0xc1, 0x0f, 0x2d, 0xd0], |c| {
            sse_on(c);
            c.fpu.regs[1] = 0x0000_0007_ffff_fffd;
            c.fpu.xmm[0] = u128::MAX;
            c.fpu.set_top(6);
        });
        assert_eq!(c.fpu.xmm[0], (u128::MAX << 64) | f4([-3.0, 7.0, 0.0, 0.0]));
        assert_eq!(c.fpu.regs[2], (0xffff << 64) | 0x0000_0007_ffff_fffd);
        assert_eq!(c.fpu.top(), 0);
        assert_eq!(c.fpu.ftw, 0);
    }

    #[test]
    fn min_max_cmp_logic() {
        // maxps xmm0, xmm1 (0f 5f c1) ; cmpltpd xmm2, xmm3 (66 0f c2 d3 01)
        // andnps xmm4, xmm5 (0f 55 e5) ; movmskps eax, xmm0 (0f 50 c0)
        let code = [
            0x0f, 0x5f, 0xc1, 0x66, 0x0f, 0xc2, 0xd3, 0x01, 0x0f, 0x55, 0xe5, 0x0f, 0x50, 0xc0,
        ];
        let c = run(Mode::Long64, &code, |c| {
            sse_on(c);
            c.fpu.xmm[0] = f4([f32::NAN, 0.0, -5.0, 1.0]);
            c.fpu.xmm[1] = f4([1.0, -0.0, -6.0, f32::NAN]);
            c.fpu.xmm[2] = d2(1.0, 3.0);
            c.fpu.xmm[3] = d2(2.0, 2.0);
            c.fpu.xmm[4] = 0xff00;
            c.fpu.xmm[5] = 0xffff;
            c.set_gpr(RAX, u64::MAX);
        });
        // NaN in either → source; zeros → source.
        let want = f4([1.0, -0.0, -5.0, f32::NAN]);
        assert_eq!(c.fpu.xmm[0], want);
        assert_eq!(c.fpu.xmm[2], u128::from(u64::MAX));
        assert_eq!(c.fpu.xmm[4], 0xff);
        assert_eq!(c.gpr(RAX), 0b0110);
        assert_eq!(c.fpu.mxcsr, RN | 1);
    }

    #[test]
    fn straddling_store_faults_before_writing() {
        // movups [0x1ffff8], xmm0 (0f 11 04 25 f8 ff 1f 00) with the 2 MiB page
        // at 0x200000 not present: #PF, and the first half is not written.
        let code = [0x0f, 0x11, 0x04, 0x25, 0xf8, 0xff, 0x1f, 0x00];
        let (c, r) = exec1(Mode::Long64, &code, |c| {
            sse_on(c);
            c.fpu.xmm[0] = u128::MAX;
            write_phys(c, PML4 + 0x2000 + 8, &0u64.to_le_bytes());
        });
        assert_eq!(r.map_err(|e| e.vector), Err(crate::exception::PF));
        assert_eq!(read_phys(&c, 0x1f_fff8, 8), 0);
        // movdqu xmm1, [0x1ffff8] (f3 0f 6f 0c 25 f8 ff 1f 00): #PF, xmm1 kept.
        let code = [0xf3, 0x0f, 0x6f, 0x0c, 0x25, 0xf8, 0xff, 0x1f, 0x00];
        let (c, r) = exec1(Mode::Long64, &code, |c| {
            sse_on(c);
            c.fpu.xmm[1] = 7;
            write_phys(c, PML4 + 0x2000 + 8, &0u64.to_le_bytes());
        });
        assert_eq!(r.map_err(|e| e.vector), Err(crate::exception::PF));
        assert_eq!(c.fpu.xmm[1], 7);
        // A straddling store to present pages writes both halves.
        let c = run(
            Mode::Long64,
            &[0x0f, 0x11, 0x04, 0x25, 0xf8, 0xff, 0x1f, 0x00],
            |c| {
                sse_on(c);
                c.fpu.xmm[0] = 0x1111_2222_3333_4444_5555_6666_7777_8888;
            },
        );
        assert_eq!(read_phys(&c, 0x1f_fff8, 8), 0x5555_6666_7777_8888);
        assert_eq!(read_phys(&c, 0x20_0000, 8), 0x1111_2222_3333_4444);
    }

    #[test]
    fn real_mode_sse() {
        // movdqu xmm0, [0x2000] (f3 0f 6f 06 00 20) ; paddd xmm0, xmm0 (66 0f fe c0)
        // movntdq [0x2010], xmm0 (66 0f e7 06 10 20)
        let code = [
            0xf3, 0x0f, 0x6f, 0x06, 0x00, 0x20, 0x66, 0x0f, 0xfe, 0xc0, 0x66, 0x0f, 0xe7, 0x06,
            0x10, 0x20,
        ];
        let c = run(Mode::Real16, &code, |c| {
            sse_on(c);
            write_phys(
                c,
                0x2000,
                &0x8000_0000_0000_0003_0000_0002_0000_0001u128.to_le_bytes(),
            );
        });
        assert_eq!(c.fpu.xmm[0], 0x0000_0006_0000_0004_0000_0002);
        assert_eq!(read_phys(&c, 0x2010, 8), 0x0000_0004_0000_0002);
    }

    #[test]
    fn daz_ftz_through_instructions() {
        // mulss xmm0, xmm1 (f3 0f 59 c1) ; addsd xmm2, xmm3 (f2 0f 58 d3)
        let code = [0xf3, 0x0f, 0x59, 0xc1, 0xf2, 0x0f, 0x58, 0xd3];
        let c = run(Mode::Long64, &code, |c| {
            sse_on(c);
            c.fpu.mxcsr = RN | 0x8040; // FTZ | DAZ
            c.fpu.xmm[0] = f4([1e-20, 0.0, 0.0, 0.0]);
            c.fpu.xmm[1] = f4([1e-20, 0.0, 0.0, 0.0]);
            c.fpu.xmm[2] = d2(1.0, 5.0);
            c.fpu.xmm[3] = 1; // denormal: zero under DAZ, no DE
        });
        assert_eq!(c.fpu.xmm[0], 0);
        assert_eq!(c.fpu.xmm[2], d2(1.0, 5.0));
        assert_eq!(c.fpu.mxcsr, RN | 0x8040 | 0x30);
        // Without DAZ the denormal raises DE and makes the sum inexact.
        let c = run(Mode::Long64, &code[4..], |c| {
            sse_on(c);
            c.fpu.xmm[2] = d2(1.0, 5.0);
            c.fpu.xmm[3] = 1;
        });
        assert_eq!(c.fpu.xmm[2], d2(1.0, 5.0));
        assert_eq!(c.fpu.mxcsr, RN | 0x22);
    }

    #[test]
    fn half_moves_and_scalar_conversions() {
        // movhps xmm0, [0x2000] (0f 16 04 25 00 20 00 00) ; movlps [0x2010], xmm0 (0f 13 04 25 10 20 00 00)
        // movhlps xmm1, xmm0 (0f 12 c8) ; movlhps xmm2, xmm0 (0f 16 d0)
        // cvtss2sd xmm3, xmm4 (f3 0f 5a dc) ; cvtsd2ss xmm5, xmm3 (f2 0f 5a eb)
        let code = [
            0x0f, 0x16, 0x04, 0x25, 0x00, 0x20, 0x00, 0x00, 0x0f, 0x13, 0x04, 0x25, 0x10, 0x20,
            0x00, 0x00, 0x0f, 0x12, 0xc8, 0x0f, 0x16, 0xd0, 0xf3, 0x0f, 0x5a, 0xdc, 0xf2, 0x0f,
            0x5a, 0xeb,
        ];
        let c = run(Mode::Long64, &code, |c| {
            sse_on(c);
            c.fpu.xmm[0] = 0x1111;
            c.fpu.xmm[1] = u128::MAX;
            c.fpu.xmm[2] = 0x2222;
            c.fpu.xmm[3] = u128::MAX;
            c.fpu.xmm[4] = f4([-0.375, 1.0, 2.0, 3.0]);
            c.fpu.xmm[5] = u128::MAX;
            write_phys(c, 0x2000, &0xaaaa_u64.to_le_bytes());
        });
        assert_eq!(c.fpu.xmm[0], (0xaaaa << 64) | 0x1111);
        assert_eq!(read_phys(&c, 0x2010, 8), 0x1111);
        assert_eq!(c.fpu.xmm[1], (u128::MAX << 64) | 0xaaaa);
        assert_eq!(c.fpu.xmm[2], (0x1111 << 64) | 0x2222);
        assert_eq!(
            c.fpu.xmm[3],
            (u128::MAX << 64) | u128::from((-0.375f64).to_bits())
        );
        assert_eq!(
            c.fpu.xmm[5],
            (u128::MAX << 32) | u128::from((-0.375f32).to_bits())
        );
        assert_eq!(c.fpu.mxcsr, RN);
    }

    #[test]
    fn approximations_and_packed_sqrt() {
        // rcpps xmm0, xmm1 (0f 53 c1) ; rsqrtss xmm2, xmm1 (f3 0f 52 d1) ; sqrtps xmm3, xmm1 (0f 51 d9)
        let code = [0x0f, 0x53, 0xc1, 0xf3, 0x0f, 0x52, 0xd1, 0x0f, 0x51, 0xd9];
        let c = run(Mode::Long64, &code, |c| {
            sse_on(c);
            c.fpu.xmm[1] = f4([4.0, 0.0, -1.0, f32::INFINITY]);
            c.fpu.xmm[2] = u128::MAX;
        });
        assert_eq!(c.fpu.xmm[0], f4([0.25, f32::INFINITY, -1.0, 0.0]));
        assert_eq!(c.fpu.xmm[2], (u128::MAX << 32) | f4([0.5, 0.0, 0.0, 0.0]));
        assert_eq!(
            c.fpu.xmm[3],
            f4([2.0, 0.0, f32::from_bits(0xffc0_0000), f32::INFINITY])
        );
        assert_eq!(c.fpu.mxcsr, RN | 1);
    }

    #[test]
    fn mmx_conversions_and_misc_stores() {
        // cvtpi2pd xmm0, mm1 (66 0f 2a c1) ; cvttpd2pi mm2, xmm3 (66 0f 2c d3)
        // maskmovdqu xmm4, xmm5 (66 0f f7 e5) at [rdi] ; movnti [0x2100], rax (48 0f c3 04 25 00 21 00 00)
        // lddqu xmm6, [0x2101] (f2 0f f0 34 25 01 21 00 00)
        let code = [
            0x66, 0x0f, 0x2a, 0xc1, 0x66, 0x0f, 0x2c, 0xd3, 0x66, 0x0f, 0xf7, 0xe5, 0x48, 0x0f,
            0xc3, 0x04, 0x25, 0x00, 0x21, 0x00, 0x00, 0xf2, 0x0f, 0xf0, 0x34, 0x25, 0x01, 0x21,
            0x00, 0x00,
        ];
        let c = run(Mode::Long64, &code, |c| {
            sse_on(c);
            c.fpu.regs[1] = 0x8000_0000_0000_0005;
            c.fpu.xmm[3] = d2(-7.9, 1e10);
            c.fpu.xmm[4] = 0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100;
            c.fpu.xmm[5] = 0x8000_0000_0000_0000_0000_0000_0000_0080;
            c.set_gpr(RDI, 0x2000);
            write_phys(c, 0x2000, &[0xee; 16]);
            c.set_gpr(RAX, 0x0123_4567_89ab_cdef);
        });
        assert_eq!(c.fpu.xmm[0], d2(5.0, -2147483648.0));
        assert_eq!(c.fpu.regs[2], (0xffff << 64) | 0x8000_0000_ffff_fff9);
        assert_eq!(read_phys(&c, 0x2000, 8), 0xeeee_eeee_eeee_ee00);
        assert_eq!(read_phys(&c, 0x2008, 8), 0x0fee_eeee_eeee_eeee);
        assert_eq!(read_phys(&c, 0x2100, 8), 0x0123_4567_89ab_cdef);
        assert_eq!(c.fpu.xmm[6], 0x0001_2345_6789_abcd);
        // PE (-7.9 truncated) and IE (1e10).
        assert_eq!(c.fpu.mxcsr, RN | 0x21);
        assert_eq!(c.fpu.ftw, 0);
    }

    #[test]
    fn sse3_arithmetic_and_dups() {
        // addsubps xmm0, xmm1 (f2 0f d0 c1) ; hsubpd xmm2, xmm3 (66 0f 7d d3)
        // movddup xmm4, [0x2000] (f2 0f 12 24 25 00 20 00 00) ; movsldup xmm5, xmm1 (f3 0f 12 e9)
        let code = [
            0xf2, 0x0f, 0xd0, 0xc1, 0x66, 0x0f, 0x7d, 0xd3, 0xf2, 0x0f, 0x12, 0x24, 0x25, 0x00,
            0x20, 0x00, 0x00, 0xf3, 0x0f, 0x12, 0xe9,
        ];
        let c = run(Mode::Long64, &code, |c| {
            sse_on(c);
            c.fpu.xmm[0] = f4([10.0, 10.0, 10.0, 10.0]);
            c.fpu.xmm[1] = f4([1.0, 2.0, 3.0, 4.0]);
            c.fpu.xmm[2] = d2(5.0, 3.0);
            c.fpu.xmm[3] = d2(1.0, 10.0);
            write_phys(c, 0x2000, &1.25f64.to_le_bytes());
        });
        assert_eq!(c.fpu.xmm[0], f4([9.0, 12.0, 7.0, 14.0]));
        assert_eq!(c.fpu.xmm[2], d2(2.0, -9.0));
        assert_eq!(c.fpu.xmm[4], d2(1.25, 1.25));
        assert_eq!(c.fpu.xmm[5], f4([1.0, 1.0, 3.0, 3.0]));
    }

    #[test]
    fn every_mmx_sse_to_ssse3_form_is_implemented() {
        use iced_x86::{Code, CpuidFeature, EncodingKind};
        let ours = [
            CpuidFeature::MMX,
            CpuidFeature::SSE,
            CpuidFeature::SSE2,
            CpuidFeature::SSE3,
            CpuidFeature::SSSE3,
        ];
        let forms: Vec<Code> = Code::values()
            .filter(|c| c.encoding() == EncodingKind::Legacy)
            .filter(|c| {
                let f = c.cpuid_features();
                !f.is_empty() && f.iter().all(|x| ours.contains(x))
            })
            .collect();
        assert!(forms.len() > 300, "{} forms", forms.len());
        let missing: Vec<&Code> = forms
            .iter()
            .filter(|c| !crate::dispatch::implemented(**c))
            .collect();
        assert!(missing.is_empty(), "not implemented: {missing:?}");
    }
}
