//! AVX and the VEX encoding of the SSE families: 128- and 256-bit forms
//! with a non-destructive source (VEX.vvvv), zeroing of the destination's
//! upper bits (bits 255:128 for VEX.128, and the carried AVX-512 bits
//! 511:256 always), unaligned memory operands except for the explicitly
//! aligned moves, and the AVX-only additions of this file (VZEROUPPER,
//! VZEROALL, VTESTPS/PD, VMASKMOVDQU, 32-predicate VCMP*).
//!
//! The lane arithmetic is shared with the legacy encodings: integer
//! operations from `mmx.rs`, whole-register SSE operations from `sse.rs`,
//! SSE4 ones from `sse4.rs`, IEEE arithmetic from `simd_fp.rs`; a 256-bit
//! form applies the same function to each 128-bit lane. The permutes,
//! broadcasts, gathers, masked moves and variable shifts of AVX/AVX2 are
//! in `avx2.rs`.
//!
//! Every VEX instruction first checks (SDM vol. 2, 2.8): #UD in real and
//! virtual-8086 mode, without CR4.OSXSAVE, or with XCR0[2:1] != 11b; #NM
//! with CR0.TS. CR0.EM and CR4.OSFXSR do not matter.

use iced_x86::{Mnemonic, OpKind, Register};

use super::mmx;
use super::simd::{lane, set_lane};
use super::simd_fp::{self as sf, Env, Fmt, F32, F64};
use super::sse;
use super::sse4;
use super::xsave;
use crate::block::Insn;
use crate::cpu::{sreg, Cpu, CR0_TS, CR4_OSXSAVE};
use crate::dispatch::{Handler, Table};
use crate::exception::{Exception, XResult};
use crate::flags;
use crate::platform::Platform;

/// A YMM value: low 128 bits, high 128 bits.
pub type Y = [u128; 2];

/// Index of an XMM or YMM register.
#[inline(always)]
pub(crate) fn vidx(r: Register) -> usize {
    let n = r as usize;
    let base = if r.is_ymm() {
        Register::YMM0 as usize
    } else {
        Register::XMM0 as usize
    };
    n.wrapping_sub(base) & 15
}

impl Cpu {
    /// The checks every VEX-encoded instruction makes.
    #[inline(always)]
    pub(crate) fn check_avx(&self) -> XResult<()> {
        if self.real_like() || self.cr4 & CR4_OSXSAVE == 0 || self.xcr0 & 6 != 6 {
            return Err(Exception::ud());
        }
        if self.cr0 & CR0_TS != 0 {
            return Err(Exception::nm());
        }
        Ok(())
    }

    /// The full 256 bits of an XMM or YMM register.
    #[inline(always)]
    pub(crate) fn vreg(&self, r: Register) -> Y {
        let i = vidx(r);
        [self.fpu.xmm[i], self.fpu.ymm_hi[i]]
    }

    /// Write vector register `i` as a VEX instruction does: the low 128
    /// bits, the high 128 bits (`wide`) or zeros, and zeros above.
    #[inline(always)]
    pub(crate) fn set_vreg_index(&mut self, i: usize, v: Y, wide: bool) {
        self.fpu.xmm[i] = v[0];
        self.fpu.ymm_hi[i] = if wide { v[1] } else { 0 };
        self.xstate.zmm_hi256[i] = [0, 0];
        // A 256-bit write, even of zeros, puts the AVX state in use; a
        // 128-bit one leaves it as it was (what XSAVEOPT/XSAVEC then save,
        // as the hardware oracle shows it; see `set_vreg_vex256`).
        self.xstate.xinuse |= if wide {
            xsave::SSE | xsave::AVX
        } else {
            xsave::SSE
        };
    }

    /// Write an XMM register from an instruction encoded with VEX.L = 1
    /// (VEXTRACTF128, VCVTPD2PS xmm, ymm, a gather with a YMM index, ...):
    /// the processor counts the AVX state in use afterwards although bits
    /// 255:128 end up zero.
    #[inline(always)]
    pub(crate) fn set_vreg_vex256(&mut self, r: Register, v: Y) {
        self.set_vreg(r, v);
        self.xstate.xinuse |= xsave::AVX;
    }

    /// Write an XMM (upper bits zeroed) or YMM register.
    #[inline(always)]
    pub(crate) fn set_vreg(&mut self, r: Register, v: Y) {
        self.set_vreg_index(vidx(r), v, r.is_ymm());
    }

    /// #GP(0) unless the memory operand's linear address is a multiple of
    /// `size` (the aligned moves).
    fn vmem_align(&self, d: &Insn, size: usize) -> XResult<()> {
        let off = self.ea(d);
        let seg = d.seg as usize;
        let base = if self.bits == 64 && seg < sreg::FS {
            0
        } else {
            self.seg[seg].base
        };
        if base.wrapping_add(off) & (size as u64 - 1) != 0 {
            return Err(Exception::gp0());
        }
        Ok(())
    }

    /// Load `size` (1..=32) bytes of the memory operand, zero-extended.
    pub(crate) fn vmem_load(
        &mut self,
        p: &mut dyn Platform,
        d: &Insn,
        size: usize,
        align: bool,
    ) -> XResult<Y> {
        if align {
            self.vmem_align(d, size)?;
        }
        let off = self.ea(d);
        let seg = d.seg as usize;
        match size {
            1 | 2 | 4 | 8 => Ok([u128::from(self.read_mem(p, seg, off, size)?), 0]),
            _ => {
                let lin = self.linear_access(p, seg, off, size as u64, false)?;
                let mut b = [0u8; 32];
                self.read_lin_bytes(p, lin, &mut b[..size])?;
                let mut lo = [0u8; 16];
                let mut hi = [0u8; 16];
                lo.copy_from_slice(&b[..16]);
                hi.copy_from_slice(&b[16..]);
                Ok([u128::from_le_bytes(lo), u128::from_le_bytes(hi)])
            }
        }
    }

    /// Store the low `size` (1..=32) bytes of `v` to the memory operand;
    /// nothing is written unless all of it can be.
    pub(crate) fn vmem_store(
        &mut self,
        p: &mut dyn Platform,
        d: &Insn,
        v: Y,
        size: usize,
        align: bool,
    ) -> XResult<()> {
        if align {
            self.vmem_align(d, size)?;
        }
        let off = self.ea(d);
        let seg = d.seg as usize;
        match size {
            1 | 2 | 4 | 8 => self.write_mem(p, seg, off, size, v[0] as u64),
            _ => {
                let lin = self.linear_access(p, seg, off, size as u64, true)?;
                self.probe_lin_range(p, lin, size, true)?;
                let mut b = [0u8; 32];
                b[..16].copy_from_slice(&v[0].to_le_bytes());
                b[16..].copy_from_slice(&v[1].to_le_bytes());
                self.write_lin_bytes(p, lin, &b[..size])
            }
        }
    }

    /// Operand `n`: a vector register (256 bits), a GPR, memory of its
    /// iced size (unaligned), or an immediate.
    #[inline]
    pub(crate) fn vsrc(&mut self, p: &mut dyn Platform, d: &Insn, n: u32) -> XResult<Y> {
        match d.i.op_kind(n) {
            OpKind::Register => {
                let r = d.i.op_register(n);
                if r.is_xmm() || r.is_ymm() {
                    Ok(self.vreg(r))
                } else {
                    Ok([u128::from(self.reg(r)), 0])
                }
            }
            OpKind::Memory => {
                let size = d.i.memory_size().size();
                self.vmem_load(p, d, size, false)
            }
            _ => Ok([u128::from(d.i.immediate(n)), 0]),
        }
    }
}

/// The immediate of the instruction (its last operand), or 0.
#[inline(always)]
pub(crate) fn imm8(d: &Insn) -> u8 {
    let n = d.i.op_count();
    if n > 0 && d.i.op_kind(n - 1) == OpKind::Immediate8 {
        d.i.immediate8()
    } else {
        0
    }
}

/// Number of operands other than a trailing immediate.
#[inline(always)]
fn nonimm_ops(d: &Insn) -> u32 {
    let n = d.i.op_count();
    if n > 0 && d.i.op_kind(n - 1) == OpKind::Immediate8 {
        n - 1
    } else {
        n
    }
}

/// How an in-lane operation takes its operands.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// `dst, src1, src2[, imm]`: f(src1, src2, imm); a two-operand form
    /// (dst, src) takes `a = b = src`.
    Bin,
    /// Shifts: `dst, src, imm8` (count = imm) or `dst, src, xmm/m128`
    /// (count = the low 64 bits of the whole operand, for both lanes).
    Shift,
}

/// Apply `f` to each 128-bit lane of the sources and write the
/// destination (XMM: upper bits zeroed).
#[inline(always)]
pub(crate) fn lanes(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
    shape: Shape,
    f: impl Fn(u128, u128, u8, usize) -> u128,
) -> XResult<()> {
    cpu.check_avx()?;
    let dst = d.i.op0_register();
    let imm = imm8(d);
    let (a, b) = match shape {
        Shape::Bin => {
            if nonimm_ops(d) >= 3 {
                let a = cpu.vreg(d.i.op1_register());
                (a, cpu.vsrc(p, d, 2)?)
            } else {
                let b = cpu.vsrc(p, d, 1)?;
                (b, b)
            }
        }
        Shape::Shift => {
            let a = cpu.vsrc(p, d, 1)?;
            let c = cpu.vsrc(p, d, 2)?;
            (a, [c[0], c[0]])
        }
    };
    let wide = dst.is_ymm();
    let lo = f(a[0], b[0], imm, 0);
    let hi = if wide { f(a[1], b[1], imm, 1) } else { 0 };
    cpu.set_vreg(dst, [lo, hi]);
    Ok(())
}

// ---- integer and whole-register operations ----------------------------------------

macro_rules! int_handlers {
    ($($h:ident: $m:ident => $shape:ident, $f:expr;)*) => {
        $(
            fn $h(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
                lanes(cpu, p, d, Shape::$shape, $f)
            }
        )*
        /// (mnemonic, handler) of every in-lane integer VEX operation.
        const INT_HANDLERS: &[(Mnemonic, Handler)] = &[$((Mnemonic::$m, $h as Handler),)*];
    };
}

/// An `mmx.rs` operation on a 16-byte lane.
macro_rules! mx {
    ($k:ident) => {
        |a, b, imm, _| mmx::$k(a, b, 16, imm)
    };
}

/// An `sse.rs` or `sse4.rs` whole-register operation.
macro_rules! vx {
    ($f:expr) => {
        |a, b, imm, _| ($f)(a, b, imm)
    };
}

int_handlers! {
    vpaddb: Vpaddb => Bin, mx!(PADDB);
    vpaddw: Vpaddw => Bin, mx!(PADDW);
    vpaddd: Vpaddd => Bin, mx!(PADDD);
    vpaddq: Vpaddq => Bin, mx!(PADDQ);
    vpsubb: Vpsubb => Bin, mx!(PSUBB);
    vpsubw: Vpsubw => Bin, mx!(PSUBW);
    vpsubd: Vpsubd => Bin, mx!(PSUBD);
    vpsubq: Vpsubq => Bin, mx!(PSUBQ);
    vpaddsb: Vpaddsb => Bin, mx!(PADDSB);
    vpaddsw: Vpaddsw => Bin, mx!(PADDSW);
    vpaddusb: Vpaddusb => Bin, mx!(PADDUSB);
    vpaddusw: Vpaddusw => Bin, mx!(PADDUSW);
    vpsubsb: Vpsubsb => Bin, mx!(PSUBSB);
    vpsubsw: Vpsubsw => Bin, mx!(PSUBSW);
    vpsubusb: Vpsubusb => Bin, mx!(PSUBUSB);
    vpsubusw: Vpsubusw => Bin, mx!(PSUBUSW);
    vpmullw: Vpmullw => Bin, mx!(PMULLW);
    vpmulhw: Vpmulhw => Bin, mx!(PMULHW);
    vpmulhuw: Vpmulhuw => Bin, mx!(PMULHUW);
    vpmaddwd: Vpmaddwd => Bin, mx!(PMADDWD);
    vpmuludq: Vpmuludq => Bin, mx!(PMULUDQ);
    vpcmpeqb: Vpcmpeqb => Bin, mx!(PCMPEQB);
    vpcmpeqw: Vpcmpeqw => Bin, mx!(PCMPEQW);
    vpcmpeqd: Vpcmpeqd => Bin, mx!(PCMPEQD);
    vpcmpgtb: Vpcmpgtb => Bin, mx!(PCMPGTB);
    vpcmpgtw: Vpcmpgtw => Bin, mx!(PCMPGTW);
    vpcmpgtd: Vpcmpgtd => Bin, mx!(PCMPGTD);
    vpand: Vpand => Bin, mx!(PAND);
    vpandn: Vpandn => Bin, mx!(PANDN);
    vpor: Vpor => Bin, mx!(POR);
    vpxor: Vpxor => Bin, mx!(PXOR);
    vpsllw: Vpsllw => Shift, mx!(PSLLW);
    vpslld: Vpslld => Shift, mx!(PSLLD);
    vpsllq: Vpsllq => Shift, mx!(PSLLQ);
    vpsrlw: Vpsrlw => Shift, mx!(PSRLW);
    vpsrld: Vpsrld => Shift, mx!(PSRLD);
    vpsrlq: Vpsrlq => Shift, mx!(PSRLQ);
    vpsraw: Vpsraw => Shift, mx!(PSRAW);
    vpsrad: Vpsrad => Shift, mx!(PSRAD);
    vpacksswb: Vpacksswb => Bin, mx!(PACKSSWB);
    vpackssdw: Vpackssdw => Bin, mx!(PACKSSDW);
    vpackuswb: Vpackuswb => Bin, mx!(PACKUSWB);
    vpunpcklbw: Vpunpcklbw => Bin, mx!(PUNPCKLBW);
    vpunpcklwd: Vpunpcklwd => Bin, mx!(PUNPCKLWD);
    vpunpckldq: Vpunpckldq => Bin, mx!(PUNPCKLDQ);
    vpunpckhbw: Vpunpckhbw => Bin, mx!(PUNPCKHBW);
    vpunpckhwd: Vpunpckhwd => Bin, mx!(PUNPCKHWD);
    vpunpckhdq: Vpunpckhdq => Bin, mx!(PUNPCKHDQ);
    vpavgb: Vpavgb => Bin, mx!(PAVGB);
    vpavgw: Vpavgw => Bin, mx!(PAVGW);
    vpmaxub: Vpmaxub => Bin, mx!(PMAXUB);
    vpminub: Vpminub => Bin, mx!(PMINUB);
    vpmaxsw: Vpmaxsw => Bin, mx!(PMAXSW);
    vpminsw: Vpminsw => Bin, mx!(PMINSW);
    vpsadbw: Vpsadbw => Bin, mx!(PSADBW);
    vpshufb: Vpshufb => Bin, mx!(PSHUFB);
    vpalignr: Vpalignr => Bin, mx!(PALIGNR);
    vpabsb: Vpabsb => Bin, mx!(PABSB);
    vpabsw: Vpabsw => Bin, mx!(PABSW);
    vpabsd: Vpabsd => Bin, mx!(PABSD);
    vphaddw: Vphaddw => Bin, mx!(PHADDW);
    vphaddd: Vphaddd => Bin, mx!(PHADDD);
    vphaddsw: Vphaddsw => Bin, mx!(PHADDSW);
    vphsubw: Vphsubw => Bin, mx!(PHSUBW);
    vphsubd: Vphsubd => Bin, mx!(PHSUBD);
    vphsubsw: Vphsubsw => Bin, mx!(PHSUBSW);
    vpmaddubsw: Vpmaddubsw => Bin, mx!(PMADDUBSW);
    vpmulhrsw: Vpmulhrsw => Bin, mx!(PMULHRSW);
    vpsignb: Vpsignb => Bin, mx!(PSIGNB);
    vpsignw: Vpsignw => Bin, mx!(PSIGNW);
    vpsignd: Vpsignd => Bin, mx!(PSIGND);
    vandps: Vandps => Bin, vx!(sse::ANDPS);
    vandpd: Vandpd => Bin, vx!(sse::ANDPS);
    vandnps: Vandnps => Bin, vx!(sse::ANDNPS);
    vandnpd: Vandnpd => Bin, vx!(sse::ANDNPS);
    vorps: Vorps => Bin, vx!(sse::ORPS);
    vorpd: Vorpd => Bin, vx!(sse::ORPS);
    vxorps: Vxorps => Bin, vx!(sse::XORPS);
    vxorpd: Vxorpd => Bin, vx!(sse::XORPS);
    vshufps: Vshufps => Bin, vx!(sse::SHUFPS);
    vshufpd: Vshufpd => Bin, |a, b, imm, k| sse::SHUFPD(a, b, imm >> (2 * k));
    vunpcklps: Vunpcklps => Bin, vx!(sse::UNPCKLPS);
    vunpckhps: Vunpckhps => Bin, vx!(sse::UNPCKHPS);
    vunpcklpd: Vunpcklpd => Bin, vx!(sse::UNPCKLPD);
    vunpckhpd: Vunpckhpd => Bin, vx!(sse::UNPCKHPD);
    vpunpcklqdq: Vpunpcklqdq => Bin, vx!(sse::PUNPCKLQDQ);
    vpunpckhqdq: Vpunpckhqdq => Bin, vx!(sse::PUNPCKHQDQ);
    vpshufd: Vpshufd => Bin, vx!(sse::PSHUFD);
    vpshufhw: Vpshufhw => Bin, vx!(sse::PSHUFHW);
    vpshuflw: Vpshuflw => Bin, vx!(sse::PSHUFLW);
    vpslldq: Vpslldq => Shift, vx!(sse::PSLLDQ);
    vpsrldq: Vpsrldq => Shift, vx!(sse::PSRLDQ);
    vblendps: Vblendps => Bin, |a, b, imm, k| sse4::blendps(a, b, imm >> (4 * k));
    vblendpd: Vblendpd => Bin, |a, b, imm, k| sse4::blendpd(a, b, imm >> (2 * k));
    vpblendw: Vpblendw => Bin, vx!(sse4::pblendw);
    vpblendd: Vpblendd => Bin, |a, b, imm, k| sse4::blendps(a, b, imm >> (4 * k));
    vmpsadbw: Vmpsadbw => Bin, |a, b, imm, k| sse4::mpsadbw(a, b, imm >> (3 * k));
    vpackusdw: Vpackusdw => Bin, vx!(sse4::packusdw);
    vphminposuw: Vphminposuw => Bin, vx!(sse4::phminposuw);
    vpmuldq: Vpmuldq => Bin, vx!(sse4::pmuldq);
    vpmulld: Vpmulld => Bin, vx!(sse4::pmulld);
    vpcmpeqq: Vpcmpeqq => Bin, vx!(sse4::pcmpeqq);
    vpcmpgtq: Vpcmpgtq => Bin, vx!(sse4::pcmpgtq);
    vpmaxsb: Vpmaxsb => Bin, vx!(sse4::pmaxsb);
    vpmaxsd: Vpmaxsd => Bin, vx!(sse4::pmaxsd);
    vpmaxuw: Vpmaxuw => Bin, vx!(sse4::pmaxuw);
    vpmaxud: Vpmaxud => Bin, vx!(sse4::pmaxud);
    vpminsb: Vpminsb => Bin, vx!(sse4::pminsb);
    vpminsd: Vpminsd => Bin, vx!(sse4::pminsd);
    vpminuw: Vpminuw => Bin, vx!(sse4::pminuw);
    vpminud: Vpminud => Bin, vx!(sse4::pminud);
}

/// VBLENDVPS/VBLENDVPD/VPBLENDVB dst, src1, src2, mask (register in imm8[7:4]).
fn vblendv(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let dst = d.i.op0_register();
    let a = cpu.vreg(d.i.op1_register());
    let b = cpu.vsrc(p, d, 2)?;
    let m = cpu.vreg(d.i.op3_register());
    let f = match d.i.mnemonic() {
        Mnemonic::Vblendvps => sse4::blendv::<4>,
        Mnemonic::Vblendvpd => sse4::blendv::<8>,
        _ => sse4::blendv::<1>,
    };
    let wide = dst.is_ymm();
    let r = [
        f(a[0], b[0], m[0]),
        if wide { f(a[1], b[1], m[1]) } else { 0 },
    ];
    cpu.set_vreg(dst, r);
    Ok(())
}

// ---- floating point ---------------------------------------------------------------

/// Packed operation over every element of the 128 or 256 bits, `f(env,
/// a, b, element index)`; two-operand forms (dst, src) pass the source as
/// both. Flags are committed (an unmasked exception raised) before the
/// destination is written.
#[inline(always)]
fn fp_packed<T: Fmt>(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
    f: impl Fn(&mut Env, u64, u64, usize) -> u64,
) -> XResult<()> {
    cpu.check_avx()?;
    let dst = d.i.op0_register();
    let (a, b) = if nonimm_ops(d) >= 3 {
        let a = cpu.vreg(d.i.op1_register());
        (a, cpu.vsrc(p, d, 2)?)
    } else {
        let b = cpu.vsrc(p, d, 1)?;
        (b, b)
    };
    let wide = dst.is_ymm();
    let w = T::BYTES;
    let per = 16 / w;
    let mut e = Env::new(cpu.fpu.mxcsr);
    let mut r = [0u128; 2];
    for (k, out) in r.iter_mut().enumerate().take(if wide { 2 } else { 1 }) {
        for i in 0..per {
            *out = set_lane(
                *out,
                i,
                w,
                f(&mut e, lane(a[k], i, w), lane(b[k], i, w), k * per + i),
            );
        }
    }
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_vreg(dst, r);
    Ok(())
}

/// Scalar operation: `dst = src1` with element 0 = f(src1[0], src2[0]);
/// bits 255:128 zeroed.
#[inline(always)]
fn fp_scalar<T: Fmt>(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
    f: impl Fn(&mut Env, u64, u64, usize) -> u64,
) -> XResult<()> {
    cpu.check_avx()?;
    let dst = d.i.op0_register();
    let a = cpu.vreg(d.i.op1_register())[0];
    let b = cpu.vsrc(p, d, 2)?[0];
    let w = T::BYTES;
    let mut e = Env::new(cpu.fpu.mxcsr);
    let v = f(&mut e, lane(a, 0, w), lane(b, 0, w), 0);
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_vreg(dst, [set_lane(a, 0, w, v), 0]);
    Ok(())
}

macro_rules! fp_handlers {
    ($($h:ident: $m:ident => $kind:ident<$t:ty>, $f:expr;)*) => {
        $(
            fn $h(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
                $kind::<$t>(cpu, p, d, $f)
            }
        )*
        const FP_HANDLERS: &[(Mnemonic, Handler)] = &[$((Mnemonic::$m, $h as Handler),)*];
    };
}

fp_handlers! {
    vaddps: Vaddps => fp_packed<F32>, |e, a, b, _| sf::add::<F32>(e, a, b);
    vaddpd: Vaddpd => fp_packed<F64>, |e, a, b, _| sf::add::<F64>(e, a, b);
    vaddss: Vaddss => fp_scalar<F32>, |e, a, b, _| sf::add::<F32>(e, a, b);
    vaddsd: Vaddsd => fp_scalar<F64>, |e, a, b, _| sf::add::<F64>(e, a, b);
    vsubps: Vsubps => fp_packed<F32>, |e, a, b, _| sf::sub::<F32>(e, a, b);
    vsubpd: Vsubpd => fp_packed<F64>, |e, a, b, _| sf::sub::<F64>(e, a, b);
    vsubss: Vsubss => fp_scalar<F32>, |e, a, b, _| sf::sub::<F32>(e, a, b);
    vsubsd: Vsubsd => fp_scalar<F64>, |e, a, b, _| sf::sub::<F64>(e, a, b);
    vmulps: Vmulps => fp_packed<F32>, |e, a, b, _| sf::mul::<F32>(e, a, b);
    vmulpd: Vmulpd => fp_packed<F64>, |e, a, b, _| sf::mul::<F64>(e, a, b);
    vmulss: Vmulss => fp_scalar<F32>, |e, a, b, _| sf::mul::<F32>(e, a, b);
    vmulsd: Vmulsd => fp_scalar<F64>, |e, a, b, _| sf::mul::<F64>(e, a, b);
    vdivps: Vdivps => fp_packed<F32>, |e, a, b, _| sf::div::<F32>(e, a, b);
    vdivpd: Vdivpd => fp_packed<F64>, |e, a, b, _| sf::div::<F64>(e, a, b);
    vdivss: Vdivss => fp_scalar<F32>, |e, a, b, _| sf::div::<F32>(e, a, b);
    vdivsd: Vdivsd => fp_scalar<F64>, |e, a, b, _| sf::div::<F64>(e, a, b);
    vminps: Vminps => fp_packed<F32>, |e, a, b, _| sf::min::<F32>(e, a, b);
    vminpd: Vminpd => fp_packed<F64>, |e, a, b, _| sf::min::<F64>(e, a, b);
    vminss: Vminss => fp_scalar<F32>, |e, a, b, _| sf::min::<F32>(e, a, b);
    vminsd: Vminsd => fp_scalar<F64>, |e, a, b, _| sf::min::<F64>(e, a, b);
    vmaxps: Vmaxps => fp_packed<F32>, |e, a, b, _| sf::max::<F32>(e, a, b);
    vmaxpd: Vmaxpd => fp_packed<F64>, |e, a, b, _| sf::max::<F64>(e, a, b);
    vmaxss: Vmaxss => fp_scalar<F32>, |e, a, b, _| sf::max::<F32>(e, a, b);
    vmaxsd: Vmaxsd => fp_scalar<F64>, |e, a, b, _| sf::max::<F64>(e, a, b);
    vsqrtps: Vsqrtps => fp_packed<F32>, |e, _, b, _| sf::sqrt::<F32>(e, b);
    vsqrtpd: Vsqrtpd => fp_packed<F64>, |e, _, b, _| sf::sqrt::<F64>(e, b);
    vsqrtss: Vsqrtss => fp_scalar<F32>, |e, _, b, _| sf::sqrt::<F32>(e, b);
    vsqrtsd: Vsqrtsd => fp_scalar<F64>, |e, _, b, _| sf::sqrt::<F64>(e, b);
    vrcpps: Vrcpps => fp_packed<F32>, |_, _, b, _| sf::rcp(b);
    vrcpss: Vrcpss => fp_scalar<F32>, |_, _, b, _| sf::rcp(b);
    vrsqrtps: Vrsqrtps => fp_packed<F32>, |_, _, b, _| sf::rsqrt(b);
    vrsqrtss: Vrsqrtss => fp_scalar<F32>, |_, _, b, _| sf::rsqrt(b);
    vaddsubps: Vaddsubps => fp_packed<F32>, |e, a, b, i| if i & 1 == 0 { sf::sub::<F32>(e, a, b) } else { sf::add::<F32>(e, a, b) };
    vaddsubpd: Vaddsubpd => fp_packed<F64>, |e, a, b, i| if i & 1 == 0 { sf::sub::<F64>(e, a, b) } else { sf::add::<F64>(e, a, b) };
    vcvtdq2ps: Vcvtdq2ps => fp_packed<F32>, |e, _, b, _| sf::from_int::<F32>(e, i64::from(b as u32 as i32));
    vcvtps2dq: Vcvtps2dq => fp_packed<F32>, |e, _, b, _| sf::to_int::<F32>(e, b, 32, false);
    vcvttps2dq: Vcvttps2dq => fp_packed<F32>, |e, _, b, _| sf::to_int::<F32>(e, b, 32, true);
    vcvtss2sd: Vcvtss2sd => fp_scalar<F64>, |e, _, b, _| sf::f32_to_f64(e, b & 0xffff_ffff);
}

/// VCMPPS/VCMPPD/VCMPSS/VCMPSD with the 5-bit predicate.
fn vcmp(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let imm = imm8(d);
    match d.i.mnemonic() {
        Mnemonic::Vcmpps => {
            fp_packed::<F32>(cpu, p, d, |e, a, b, _| sf::cmp_pred32::<F32>(e, a, b, imm))
        }
        Mnemonic::Vcmppd => {
            fp_packed::<F64>(cpu, p, d, |e, a, b, _| sf::cmp_pred32::<F64>(e, a, b, imm))
        }
        Mnemonic::Vcmpss => {
            fp_scalar::<F32>(cpu, p, d, |e, a, b, _| sf::cmp_pred32::<F32>(e, a, b, imm))
        }
        _ => fp_scalar::<F64>(cpu, p, d, |e, a, b, _| sf::cmp_pred32::<F64>(e, a, b, imm)),
    }
}

/// VROUNDPS/PD (dst, src, imm) and VROUNDSS/SD (dst, src1, src2, imm).
fn vround(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let imm = imm8(d);
    match d.i.mnemonic() {
        Mnemonic::Vroundps => {
            fp_packed::<F32>(cpu, p, d, |e, _, b, _| sf::round_int::<F32>(e, b, imm))
        }
        Mnemonic::Vroundpd => {
            fp_packed::<F64>(cpu, p, d, |e, _, b, _| sf::round_int::<F64>(e, b, imm))
        }
        Mnemonic::Vroundss => {
            fp_scalar::<F32>(cpu, p, d, |e, _, b, _| sf::round_int::<F32>(e, b, imm))
        }
        _ => fp_scalar::<F64>(cpu, p, d, |e, _, b, _| sf::round_int::<F64>(e, b, imm)),
    }
}

/// An MXCSR operation on whole 128-bit lanes (DPPS per lane, DPPD,
/// horizontal adds and subtracts).
fn fp_lanes(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
    f: impl Fn(&mut Env, u128, u128, u8) -> u128,
) -> XResult<()> {
    cpu.check_avx()?;
    let dst = d.i.op0_register();
    let a = cpu.vreg(d.i.op1_register());
    let b = cpu.vsrc(p, d, 2)?;
    let imm = imm8(d);
    let wide = dst.is_ymm();
    let mut e = Env::new(cpu.fpu.mxcsr);
    let lo = f(&mut e, a[0], b[0], imm);
    let hi = if wide { f(&mut e, a[1], b[1], imm) } else { 0 };
    // Flags a first step recorded as its own (VDPPS/VDPPD's products).
    cpu.fpu.mxcsr |= e.mxcsr & 0x3f;
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_vreg(dst, [lo, hi]);
    Ok(())
}

/// HADDPS/HADDPD/HSUBPS/HSUBPD on one 128-bit lane: pairs of `a`, then
/// pairs of `b`.
pub(crate) fn horiz<T: Fmt>(e: &mut Env, a: u128, b: u128, sub: bool) -> u128 {
    let w = T::BYTES;
    let per = 16 / w / 2;
    let mut r = 0u128;
    for (k, src) in [a, b].into_iter().enumerate() {
        for i in 0..per {
            let (x, y) = (lane(src, 2 * i, w), lane(src, 2 * i + 1, w));
            let v = if sub {
                sf::sub::<T>(e, x, y)
            } else {
                sf::add::<T>(e, x, y)
            };
            r = set_lane(r, k * per + i, w, v);
        }
    }
    r
}

fn vhoriz(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    match d.i.mnemonic() {
        Mnemonic::Vhaddps => fp_lanes(cpu, p, d, |e, a, b, _| horiz::<F32>(e, a, b, false)),
        Mnemonic::Vhaddpd => fp_lanes(cpu, p, d, |e, a, b, _| horiz::<F64>(e, a, b, false)),
        Mnemonic::Vhsubps => fp_lanes(cpu, p, d, |e, a, b, _| horiz::<F32>(e, a, b, true)),
        _ => fp_lanes(cpu, p, d, |e, a, b, _| horiz::<F64>(e, a, b, true)),
    }
}

/// VDPPS/VDPPD: a YMM VDPPS takes each step on both lanes at once
/// (`sse4::dp_lanes`).
fn vdp(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let dst = d.i.op0_register();
    let a = cpu.vreg(d.i.op1_register());
    let b = cpu.vsrc(p, d, 2)?;
    let lanes = if dst.is_ymm() { 2 } else { 1 };
    let mut e = Env::new(cpu.fpu.mxcsr);
    let r = if d.i.mnemonic() == Mnemonic::Vdpps {
        sse4::dp_lanes::<F32>(&mut e, &a[..lanes], &b[..lanes], imm8(d))
    } else {
        sse4::dp_lanes::<F64>(&mut e, &a[..lanes], &b[..lanes], imm8(d))
    };
    // Flags of the steps before a faulting one.
    cpu.fpu.mxcsr |= e.mxcsr & 0x3f;
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_vreg(dst, r);
    Ok(())
}

// ---- conversions that change the width ---------------------------------------------

/// VCVTPS2PD / VCVTDQ2PD: 2 or 4 source elements (xmm/m64, xmm/m128)
/// widened to doubles.
fn vcvt_widen(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let dst = d.i.op0_register();
    let b = cpu.vsrc(p, d, 1)?[0];
    let n = if dst.is_ymm() { 4 } else { 2 };
    let from_int = d.i.mnemonic() == Mnemonic::Vcvtdq2pd;
    let mut e = Env::new(cpu.fpu.mxcsr);
    let mut r = [0u128; 2];
    for i in 0..n {
        let x = lane(b, i, 4);
        let v = if from_int {
            sf::from_int::<F64>(&mut e, i64::from(x as u32 as i32))
        } else {
            sf::f32_to_f64(&mut e, x)
        };
        r[i / 2] = set_lane(r[i / 2], i % 2, 8, v);
    }
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_vreg(dst, r);
    Ok(())
}

/// VCVTPD2PS / VCVT(T)PD2DQ: 2 or 4 doubles (xmm/m128 or ymm/m256)
/// narrowed into an XMM register, upper bits zeroed.
fn vcvt_narrow(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let dst = d.i.op0_register();
    let src_wide = match d.i.op1_kind() {
        OpKind::Register => d.i.op1_register().is_ymm(),
        _ => d.i.memory_size().size() == 32,
    };
    let b = cpu.vsrc(p, d, 1)?;
    let n = if src_wide { 4 } else { 2 };
    let m = d.i.mnemonic();
    let mut e = Env::new(cpu.fpu.mxcsr);
    let mut r = 0u128;
    for i in 0..n {
        let x = lane(b[i / 2], i % 2, 8);
        let v = match m {
            Mnemonic::Vcvtpd2ps => sf::f64_to_f32(&mut e, x),
            Mnemonic::Vcvtpd2dq => sf::to_int::<F64>(&mut e, x, 32, false),
            _ => sf::to_int::<F64>(&mut e, x, 32, true),
        };
        r = set_lane(r, i, 4, v);
    }
    cpu.sse_commit_flags(e.flags)?;
    if src_wide {
        cpu.set_vreg_vex256(dst, [r, 0]);
    } else {
        cpu.set_vreg(dst, [r, 0]);
    }
    Ok(())
}

/// VCVTSD2SS xmm1, xmm2, xmm3/m64.
fn vcvtsd2ss(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let dst = d.i.op0_register();
    let a = cpu.vreg(d.i.op1_register())[0];
    let b = cpu.vsrc(p, d, 2)?[0] as u64;
    let mut e = Env::new(cpu.fpu.mxcsr);
    let v = sf::f64_to_f32(&mut e, b);
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_vreg(dst, [set_lane(a, 0, 4, v), 0]);
    Ok(())
}

/// VCVTSI2SS/VCVTSI2SD xmm1, xmm2, r/m32|64.
fn vcvtsi2s(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let dst = d.i.op0_register();
    let a = cpu.vreg(d.i.op1_register())[0];
    let size = match d.i.op2_kind() {
        OpKind::Register => d.i.op2_register().size(),
        _ => d.i.memory_size().size(),
    };
    let v = super::sext(cpu.vsrc(p, d, 2)?[0] as u64, size) as i64;
    let mut e = Env::new(cpu.fpu.mxcsr);
    let r = if d.i.mnemonic() == Mnemonic::Vcvtsi2ss {
        set_lane(a, 0, 4, sf::from_int::<F32>(&mut e, v))
    } else {
        set_lane(a, 0, 8, sf::from_int::<F64>(&mut e, v))
    };
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_vreg(dst, [r, 0]);
    Ok(())
}

/// VCVT(T)SS2SI / VCVT(T)SD2SI r32|64, xmm/m.
fn vcvts2si(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let b = cpu.vsrc(p, d, 1)?[0];
    let dst = d.i.op0_register();
    let width = if dst.size() == 8 { 64 } else { 32 };
    let mut e = Env::new(cpu.fpu.mxcsr);
    let v = match d.i.mnemonic() {
        Mnemonic::Vcvtss2si => sf::to_int::<F32>(&mut e, lane(b, 0, 4), width, false),
        Mnemonic::Vcvttss2si => sf::to_int::<F32>(&mut e, lane(b, 0, 4), width, true),
        Mnemonic::Vcvtsd2si => sf::to_int::<F64>(&mut e, lane(b, 0, 8), width, false),
        _ => sf::to_int::<F64>(&mut e, lane(b, 0, 8), width, true),
    };
    cpu.sse_commit_flags(e.flags)?;
    cpu.set_reg(dst, v);
    Ok(())
}

/// VCOMISS/VUCOMISS/VCOMISD/VUCOMISD.
fn vcomis(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let b = cpu.vsrc(p, d, 1)?[0];
    let a = cpu.vreg(d.i.op0_register())[0];
    let mut e = Env::new(cpu.fpu.mxcsr);
    let o = match d.i.mnemonic() {
        Mnemonic::Vcomiss => sf::compare::<F32>(&mut e, lane(a, 0, 4), lane(b, 0, 4), true),
        Mnemonic::Vucomiss => sf::compare::<F32>(&mut e, lane(a, 0, 4), lane(b, 0, 4), false),
        Mnemonic::Vcomisd => sf::compare::<F64>(&mut e, lane(a, 0, 8), lane(b, 0, 8), true),
        _ => sf::compare::<F64>(&mut e, lane(a, 0, 8), lane(b, 0, 8), false),
    };
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

// ---- moves --------------------------------------------------------------------------

/// VMOVAPS/APD/DQA, VMOVNTPS/PD/DQ, VMOVNTDQA (aligned: #GP(0) unless the
/// address is a multiple of the operand size) and VMOVUPS/UPD/DQU,
/// VLDDQU.
fn vmov_full<const ALIGN: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    if d.i.op0_kind() == OpKind::Register {
        let dst = d.i.op0_register();
        let v = match d.i.op1_kind() {
            OpKind::Register => cpu.vreg(d.i.op1_register()),
            _ => {
                let size = d.i.memory_size().size();
                cpu.vmem_load(p, d, size, ALIGN)?
            }
        };
        cpu.set_vreg(dst, v);
        Ok(())
    } else {
        let src = d.i.op1_register();
        let size = if src.is_ymm() { 32 } else { 16 };
        let v = cpu.vreg(src);
        cpu.vmem_store(p, d, v, size, ALIGN)
    }
}

/// VMOVSS/VMOVSD: three registers merge (dst = src1 with element 0 of
/// src2); a load zero-extends; a store writes element 0.
fn vmov_scalar(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let w = if d.i.mnemonic() == Mnemonic::Vmovss {
        4
    } else {
        8
    };
    if d.i.op0_kind() == OpKind::Memory {
        let v = cpu.vreg(d.i.op1_register());
        return cpu.vmem_store(p, d, [u128::from(lane(v[0], 0, w)), 0], w, false);
    }
    let dst = d.i.op0_register();
    if d.i.op_count() == 3 {
        let a = cpu.vreg(d.i.op1_register())[0];
        let b = cpu.vreg(d.i.op2_register())[0];
        cpu.set_vreg(dst, [set_lane(a, 0, w, lane(b, 0, w)), 0]);
    } else {
        let v = cpu.vmem_load(p, d, w, false)?;
        cpu.set_vreg(dst, v);
    }
    Ok(())
}

/// VMOVLPS/VMOVLPD/VMOVHPS/VMOVHPD: loads `dst, src1, m64` (the other half
/// from src1), stores `m64, xmm`.
fn vmov_half(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let high = matches!(d.i.mnemonic(), Mnemonic::Vmovhps | Mnemonic::Vmovhpd);
    let k = usize::from(high);
    if d.i.op0_kind() == OpKind::Memory {
        let v = cpu.vreg(d.i.op1_register())[0];
        return cpu.vmem_store(p, d, [u128::from(lane(v, k, 8)), 0], 8, false);
    }
    let a = cpu.vreg(d.i.op1_register())[0];
    let m = cpu.vmem_load(p, d, 8, false)?[0] as u64;
    cpu.set_vreg(d.i.op0_register(), [set_lane(a, k, 8, m), 0]);
    Ok(())
}

/// VMOVHLPS xmm1, xmm2, xmm3 = [xmm3.hi, xmm2.hi]; VMOVLHPS = [xmm2.lo, xmm3.lo].
fn vmov_hl_lh(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let a = cpu.vreg(d.i.op1_register())[0];
    let b = cpu.vreg(d.i.op2_register())[0];
    let r = if d.i.mnemonic() == Mnemonic::Vmovhlps {
        u128::from(lane(b, 1, 8)) | (u128::from(lane(a, 1, 8)) << 64)
    } else {
        u128::from(lane(a, 0, 8)) | (u128::from(lane(b, 0, 8)) << 64)
    };
    cpu.set_vreg(d.i.op0_register(), [r, 0]);
    Ok(())
}

/// VMOVD/VMOVQ in every form (vector destinations zero-extended).
fn vmovd_q(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let size = if d.i.mnemonic() == Mnemonic::Vmovd {
        4
    } else {
        8
    };
    let v = cpu.vsrc(p, d, 1)?[0] as u64;
    let v = if size == 4 { v & 0xffff_ffff } else { v };
    match d.i.op0_kind() {
        OpKind::Memory => cpu.vmem_store(p, d, [u128::from(v), 0], size, false),
        _ => {
            let r = d.i.op0_register();
            if r.is_xmm() {
                cpu.set_vreg(r, [u128::from(v), 0]);
            } else {
                cpu.set_reg(r, v);
            }
            Ok(())
        }
    }
}

/// VMOVDDUP / VMOVSHDUP / VMOVSLDUP.
fn vdup(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let m = d.i.mnemonic();
    lanes(cpu, p, d, Shape::Bin, move |_, b, _, _| match m {
        Mnemonic::Vmovddup => {
            let q = u128::from(lane(b, 0, 8));
            q | (q << 64)
        }
        _ => {
            let odd = usize::from(m == Mnemonic::Vmovshdup);
            (0..4).fold(0, |r, i| set_lane(r, i, 4, lane(b, (i & !1) | odd, 4)))
        }
    })
}

/// VMOVMSKPS/VMOVMSKPD/VPMOVMSKB r, xmm|ymm: the element sign bits.
fn vmovmsk(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let src = d.i.op1_register();
    let v = cpu.vreg(src);
    let w = match d.i.mnemonic() {
        Mnemonic::Vmovmskps => 4,
        Mnemonic::Vmovmskpd => 8,
        _ => 1,
    };
    let per = 16 / w;
    let halves = if src.is_ymm() { 2 } else { 1 };
    let mut m = 0u64;
    for (k, h) in v.iter().enumerate().take(halves) {
        for i in 0..per {
            m |= (lane(*h, i, w) >> (8 * w - 1) & 1) << (k * per + i);
        }
    }
    cpu.set_reg(d.i.op0_register(), m);
    Ok(())
}

/// VLDMXCSR / VSTMXCSR.
fn vldmxcsr(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let v = cpu.vmem_load(p, d, 4, false)?[0] as u32;
    cpu.load_mxcsr(v)
}

fn vstmxcsr(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let v = cpu.fpu.mxcsr;
    cpu.vmem_store(p, d, [u128::from(v), 0], 4, false)
}

/// VZEROUPPER (bits 255:128 — and the carried 511:256 — of every
/// register) and VZEROALL (everything); YMM8..15 only in 64-bit mode.
fn vzero(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let n = if cpu.bits == 64 { 16 } else { 8 };
    let all = d.i.mnemonic() == Mnemonic::Vzeroall;
    for i in 0..n {
        if all {
            cpu.fpu.xmm[i] = 0;
        }
        cpu.fpu.ymm_hi[i] = 0;
        cpu.xstate.zmm_hi256[i] = [0, 0];
    }
    // The upper halves are in their initial configuration again, and after
    // VZEROALL the XMM registers too (XSAVE on the hardware oracle then
    // marks neither in XSTATE_BV; XSAVEC still marks SSE unless MXCSR is
    // 1F80H: see `Cpu::xinuse_compacted`).
    if all {
        cpu.xstate.xinuse &= !xsave::SSE;
    }
    cpu.xstate.xinuse &= !(xsave::AVX | xsave::ZMM_HI256);
    Ok(())
}

/// VPTEST (all bits) and VTESTPS/VTESTPD (element sign bits).
fn vtest(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let a = cpu.vreg(d.i.op0_register());
    let b = cpu.vsrc(p, d, 1)?;
    let wide = d.i.op0_register().is_ymm();
    let mask: u128 = match d.i.mnemonic() {
        Mnemonic::Vtestps => 0x8000_0000_8000_0000_8000_0000_8000_0000,
        Mnemonic::Vtestpd => 0x8000_0000_0000_0000_8000_0000_0000_0000,
        _ => u128::MAX,
    };
    let n = if wide { 2 } else { 1 };
    let and_zero = (0..n).all(|k| a[k] & b[k] & mask == 0);
    let andn_zero = (0..n).all(|k| !a[k] & b[k] & mask == 0);
    cpu.flags.set_arith(sse4::ptest_flags(and_zero, andn_zero));
    Ok(())
}

/// VPEXTRB/W/D/Q, VEXTRACTPS.
fn vextract(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let v = cpu.vreg(d.i.op1_register())[0];
    let (x, w) = sse4::extract_lane(d.i.mnemonic(), v, imm8(d));
    match d.i.op0_kind() {
        OpKind::Memory => cpu.vmem_store(p, d, [u128::from(x), 0], w, false),
        _ => {
            cpu.set_reg(d.i.op0_register(), x);
            Ok(())
        }
    }
}

/// VPINSRB/W/D/Q, VINSERTPS xmm1, xmm2, src, imm8.
fn vinsert(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let a = cpu.vreg(d.i.op1_register())[0];
    let imm = imm8(d);
    let src = match d.i.op2_kind() {
        OpKind::Register => {
            let r = d.i.op2_register();
            if r.is_xmm() {
                lane(cpu.vreg(r)[0], usize::from(imm >> 6), 4)
            } else {
                cpu.reg(r)
            }
        }
        _ => {
            let size = d.i.memory_size().size();
            cpu.vmem_load(p, d, size, false)?[0] as u64
        }
    };
    let r = match d.i.mnemonic() {
        Mnemonic::Vpinsrw => set_lane(a, usize::from(imm & 7), 2, src),
        m => sse4::insert_lane(m, a, src, imm),
    };
    cpu.set_vreg(d.i.op0_register(), [r, 0]);
    Ok(())
}

/// VPMOVSX*/VPMOVZX*: the XMM form widens the low elements of an XMM
/// register or memory; the YMM form those of a whole XMM/m128.
fn vpmovx(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let dst = d.i.op0_register();
    let b = cpu.vsrc(p, d, 1)?[0];
    let f = sse4::pmovx_op(d.i.mnemonic());
    let lo = f(b);
    let hi = if dst.is_ymm() {
        // The high lane widens the source elements after the low lane's.
        let (from, to) = sse4::pmovx_widths(d.i.mnemonic());
        f(b >> (8 * from * (16 / to)))
    } else {
        0
    };
    cpu.set_vreg(dst, [lo, hi]);
    Ok(())
}

/// VMASKMOVDQU xmm1, xmm2: the bytes of xmm1 selected by xmm2 to [rDI]
/// (the legacy MASKMOVDQU's semantics under the AVX checks).
fn vmaskmovdqu(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let data = cpu.vreg(d.i.op1_register())[0].to_le_bytes();
    let mask = cpu.vreg(d.i.op2_register())[0].to_le_bytes();
    let sel: Vec<usize> = (0..16).filter(|&i| mask[i] & 0x80 != 0).collect();
    if let (Some(&first), Some(&last)) = (sel.first(), sel.last()) {
        let di = cpu.gpr[crate::state::gpr::RDI] & d.amask;
        let seg = d.seg as usize;
        let start = di.wrapping_add(first as u64) & d.amask;
        let len = last - first + 1;
        let lin = cpu.linear_access(p, seg, start, len as u64, true)?;
        cpu.probe_lin_range(p, lin, len, true)?;
        for &i in &sel {
            let off = di.wrapping_add(i as u64) & d.amask;
            cpu.write_mem(p, seg, off, 1, u64::from(data[i]))?;
        }
    }
    Ok(())
}

/// VPCMPESTRI/VPCMPESTRM/VPCMPISTRI/VPCMPISTRM (128-bit only).
fn vpcmpstr(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_avx()?;
    let b = cpu.vsrc(p, d, 1)?[0];
    let a = cpu.vreg(d.i.op0_register())[0];
    sse4::pcmpstr_exec(cpu, d.i.mnemonic(), a, b, imm8(d), true);
    Ok(())
}

pub fn register(t: &mut Table) {
    for &(m, h) in INT_HANDLERS.iter().chain(FP_HANDLERS.iter()) {
        let n = t.set_vex(m, h);
        debug_assert!(n > 0, "{m:?} has no VEX form");
    }
    for m in [
        Mnemonic::Vblendvps,
        Mnemonic::Vblendvpd,
        Mnemonic::Vpblendvb,
    ] {
        t.set_vex(m, vblendv);
    }
    for m in [
        Mnemonic::Vcmpps,
        Mnemonic::Vcmppd,
        Mnemonic::Vcmpss,
        Mnemonic::Vcmpsd,
    ] {
        t.set_vex(m, vcmp);
    }
    for m in [
        Mnemonic::Vroundps,
        Mnemonic::Vroundpd,
        Mnemonic::Vroundss,
        Mnemonic::Vroundsd,
    ] {
        t.set_vex(m, vround);
    }
    for m in [
        Mnemonic::Vhaddps,
        Mnemonic::Vhaddpd,
        Mnemonic::Vhsubps,
        Mnemonic::Vhsubpd,
    ] {
        t.set_vex(m, vhoriz);
    }
    t.set_vex(Mnemonic::Vdpps, vdp);
    t.set_vex(Mnemonic::Vdppd, vdp);
    t.set_vex(Mnemonic::Vcvtps2pd, vcvt_widen);
    t.set_vex(Mnemonic::Vcvtdq2pd, vcvt_widen);
    t.set_vex(Mnemonic::Vcvtpd2ps, vcvt_narrow);
    t.set_vex(Mnemonic::Vcvtpd2dq, vcvt_narrow);
    t.set_vex(Mnemonic::Vcvttpd2dq, vcvt_narrow);
    t.set_vex(Mnemonic::Vcvtsd2ss, vcvtsd2ss);
    t.set_vex(Mnemonic::Vcvtsi2ss, vcvtsi2s);
    t.set_vex(Mnemonic::Vcvtsi2sd, vcvtsi2s);
    for m in [
        Mnemonic::Vcvtss2si,
        Mnemonic::Vcvttss2si,
        Mnemonic::Vcvtsd2si,
        Mnemonic::Vcvttsd2si,
    ] {
        t.set_vex(m, vcvts2si);
    }
    for m in [
        Mnemonic::Vcomiss,
        Mnemonic::Vucomiss,
        Mnemonic::Vcomisd,
        Mnemonic::Vucomisd,
    ] {
        t.set_vex(m, vcomis);
    }
    for m in [
        Mnemonic::Vmovaps,
        Mnemonic::Vmovapd,
        Mnemonic::Vmovdqa,
        Mnemonic::Vmovntps,
        Mnemonic::Vmovntpd,
        Mnemonic::Vmovntdq,
        Mnemonic::Vmovntdqa,
    ] {
        t.set_vex(m, vmov_full::<true>);
    }
    for m in [
        Mnemonic::Vmovups,
        Mnemonic::Vmovupd,
        Mnemonic::Vmovdqu,
        Mnemonic::Vlddqu,
    ] {
        t.set_vex(m, vmov_full::<false>);
    }
    t.set_vex(Mnemonic::Vmovss, vmov_scalar);
    t.set_vex(Mnemonic::Vmovsd, vmov_scalar);
    for m in [
        Mnemonic::Vmovlps,
        Mnemonic::Vmovlpd,
        Mnemonic::Vmovhps,
        Mnemonic::Vmovhpd,
    ] {
        t.set_vex(m, vmov_half);
    }
    t.set_vex(Mnemonic::Vmovhlps, vmov_hl_lh);
    t.set_vex(Mnemonic::Vmovlhps, vmov_hl_lh);
    t.set_vex(Mnemonic::Vmovd, vmovd_q);
    t.set_vex(Mnemonic::Vmovq, vmovd_q);
    for m in [Mnemonic::Vmovddup, Mnemonic::Vmovshdup, Mnemonic::Vmovsldup] {
        t.set_vex(m, vdup);
    }
    for m in [
        Mnemonic::Vmovmskps,
        Mnemonic::Vmovmskpd,
        Mnemonic::Vpmovmskb,
    ] {
        t.set_vex(m, vmovmsk);
    }
    t.set_vex(Mnemonic::Vldmxcsr, vldmxcsr);
    t.set_vex(Mnemonic::Vstmxcsr, vstmxcsr);
    t.set_vex(Mnemonic::Vzeroupper, vzero);
    t.set_vex(Mnemonic::Vzeroall, vzero);
    for m in [Mnemonic::Vptest, Mnemonic::Vtestps, Mnemonic::Vtestpd] {
        t.set_vex(m, vtest);
    }
    for m in [
        Mnemonic::Vpextrb,
        Mnemonic::Vpextrw,
        Mnemonic::Vpextrd,
        Mnemonic::Vpextrq,
        Mnemonic::Vextractps,
    ] {
        t.set_vex(m, vextract);
    }
    for m in [
        Mnemonic::Vpinsrb,
        Mnemonic::Vpinsrw,
        Mnemonic::Vpinsrd,
        Mnemonic::Vpinsrq,
        Mnemonic::Vinsertps,
    ] {
        t.set_vex(m, vinsert);
    }
    for m in [
        Mnemonic::Vpmovsxbw,
        Mnemonic::Vpmovsxbd,
        Mnemonic::Vpmovsxbq,
        Mnemonic::Vpmovsxwd,
        Mnemonic::Vpmovsxwq,
        Mnemonic::Vpmovsxdq,
        Mnemonic::Vpmovzxbw,
        Mnemonic::Vpmovzxbd,
        Mnemonic::Vpmovzxbq,
        Mnemonic::Vpmovzxwd,
        Mnemonic::Vpmovzxwq,
        Mnemonic::Vpmovzxdq,
    ] {
        t.set_vex(m, vpmovx);
    }
    t.set_vex(Mnemonic::Vmaskmovdqu, vmaskmovdqu);
    for m in [
        Mnemonic::Vpcmpestri,
        Mnemonic::Vpcmpestri64,
        Mnemonic::Vpcmpestrm,
        Mnemonic::Vpcmpestrm64,
        Mnemonic::Vpcmpistri,
        Mnemonic::Vpcmpistrm,
    ] {
        t.set_vex(m, vpcmpstr);
    }
}

#[cfg(test)]
mod coverage {
    use iced_x86::{Code, CpuidFeature as F, EncodingKind};

    /// Every legacy and VEX form of the x86-64-v2/v3 extensions (and AES,
    /// PCLMULQDQ, the XSAVE family) has a handler.
    #[test]
    fn every_v2_v3_form_is_implemented() {
        let ours = [
            F::SSE4_1,
            F::SSE4_2,
            F::POPCNT,
            F::AVX,
            F::AVX2,
            F::FMA,
            F::F16C,
            F::BMI1,
            F::BMI2,
            F::LZCNT,
            F::MOVBE,
            F::AES,
            F::PCLMULQDQ,
            F::XSAVE,
            F::XSAVEOPT,
            F::XSAVEC,
            F::XSAVES,
        ];
        let forms: Vec<Code> = Code::values()
            .filter(|c| matches!(c.encoding(), EncodingKind::Legacy | EncodingKind::VEX))
            .filter(|c| {
                let f = c.cpuid_features();
                !f.is_empty() && f.iter().all(|x| ours.contains(x))
            })
            .collect();
        assert!(forms.len() > 780, "{} forms", forms.len());
        let missing: Vec<&Code> = forms
            .iter()
            .filter(|c| !crate::dispatch::implemented(**c))
            .collect();
        assert!(
            missing.is_empty(),
            "not implemented ({}): {missing:?}",
            missing.len()
        );
    }
}
