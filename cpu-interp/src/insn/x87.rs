//! x87 FPU instructions: loads and stores (FLD FST FSTP FILD FIST FISTP
//! FISTTP FBLD FBSTP FXCH FCMOVcc and the constants), arithmetic (FADD ..
//! FDIVR and their P/I forms, FSQRT FABS FCHS FRNDINT FSCALE FXTRACT FPREM
//! FPREM1), comparisons (FCOM FUCOM FCOMI FUCOMI FICOM FTST FXAM),
//! transcendentals (FSIN FCOS FSINCOS FPTAN FPATAN F2XM1 FYL2X FYL2XP1)
//! and control (FINIT FLDCW FSTCW FSTSW FCLEX FFREE(P) FINCSTP FDECSTP FNOP
//! WAIT FSTENV FLDENV FSAVE FRSTOR FXSAVE FXRSTOR).
//!
//! The numerics are in [`crate::softfloat80`]; this file moves operands
//! and results between memory, the register stack and FSW.
//!
//! Exceptions (SDM vol. 1, 8.4-8.7): every instruction first checks
//! CR0.EM/TS (#NM). Waiting instructions (all but FNINIT, FNCLEX, FNSTCW,
//! FNSTSW, FNSTENV, FNSAVE and FXSAVE/FXRSTOR) then raise #MF when an
//! unmasked exception is pending (FSW.ES) and CR0.NE = 1; with CR0.NE = 0
//! they proceed (PC-style FERR# is not modelled, see
//! `Cpu::check_pending_x87`). Memory faults come next; x87 state changes
//! only after every memory access that can fault has been done. An
//! unmasked invalid-operation, denormal or zero-divide exception leaves the
//! destination and TOP unchanged; an unmasked overflow or underflow stores
//! the bias-adjusted result into a register destination and nothing into a
//! memory destination; all of them set ES and B.
//!
//! FIP/FCS/FOP are updated by every instruction except the control ones
//! (FINIT FLDCW FSTCW FSTSW FCLEX FSTENV FLDENV FSAVE FRSTOR FXSAVE FXRSTOR
//! WAIT and the 8087/287 no-ops); FDP/FDS by those with a memory operand.
//! (Pentium 4 and later processors outside "FOP compatibility mode" update
//! FOP only on unmasked exceptions; duet always records it, as the 387
//! did, see [`FOP_ALWAYS`].)

use iced_x86::{CodeSize, Instruction, MemorySize, Mnemonic, OpCodeOperandKind, OpKind, Register};

use super::sext;
use crate::block::Insn;
use crate::cpu::{sreg, Cpu, CR0_MP, CR0_TS, CR4_OSFXSR};
use crate::dispatch::Table;
use crate::exception::{Exception, XResult};
use crate::flags::{CF, PF, ZF};
use crate::fpu::*;
use crate::platform::Platform;
use crate::softfloat80::trans::{self, Trig, W};
use crate::softfloat80::{self as sf, Cmp, Ctx, Res, DE, IE, INDEFINITE, OE, UE, ZE};

/// Record FOP on every non-control instruction (the 387 behaviour, and
/// that of later processors in FOP compatibility mode, IA32_MISC_ENABLE
/// bit 2). When false, FOP is only recorded while an unmasked exception
/// is pending (the default of Pentium 4 and later).
pub const FOP_ALWAYS: bool = true;

pub fn register(t: &mut Table) {
    use Mnemonic as M;
    // Loads and stores.
    t.set_mnemonic(M::Fld, fld);
    t.set_mnemonic(M::Fild, fild);
    t.set_mnemonic(M::Fbld, fbld);
    t.set_mnemonic(M::Fld1, fldc::<0>);
    t.set_mnemonic(M::Fldl2t, fldc::<1>);
    t.set_mnemonic(M::Fldl2e, fldc::<2>);
    t.set_mnemonic(M::Fldpi, fldc::<3>);
    t.set_mnemonic(M::Fldlg2, fldc::<4>);
    t.set_mnemonic(M::Fldln2, fldc::<5>);
    t.set_mnemonic(M::Fldz, fldc::<6>);
    t.set_mnemonic(M::Fst, fst::<false>);
    t.set_mnemonic(M::Fstp, fst::<true>);
    // D9 D8+i: an undocumented alias of FSTP ST(i).
    t.set_mnemonic(M::Fstpnce, fst::<true>);
    t.set_mnemonic(M::Fist, fist::<false, false>);
    t.set_mnemonic(M::Fistp, fist::<true, false>);
    t.set_mnemonic(M::Fisttp, fist::<true, true>);
    t.set_mnemonic(M::Fbstp, fbstp);
    t.set_mnemonic(M::Fxch, fxch);
    t.set_mnemonic(M::Fcmovb, fcmov::<0>);
    t.set_mnemonic(M::Fcmove, fcmov::<1>);
    t.set_mnemonic(M::Fcmovbe, fcmov::<2>);
    t.set_mnemonic(M::Fcmovu, fcmov::<3>);
    t.set_mnemonic(M::Fcmovnb, fcmov::<4>);
    t.set_mnemonic(M::Fcmovne, fcmov::<5>);
    t.set_mnemonic(M::Fcmovnbe, fcmov::<6>);
    t.set_mnemonic(M::Fcmovnu, fcmov::<7>);
    // Arithmetic.
    t.set_mnemonic(M::Fadd, arith::<ADD, false>);
    t.set_mnemonic(M::Faddp, arith::<ADD, true>);
    t.set_mnemonic(M::Fiadd, arith::<ADD, false>);
    t.set_mnemonic(M::Fsub, arith::<SUB, false>);
    t.set_mnemonic(M::Fsubp, arith::<SUB, true>);
    t.set_mnemonic(M::Fisub, arith::<SUB, false>);
    t.set_mnemonic(M::Fsubr, arith::<SUBR, false>);
    t.set_mnemonic(M::Fsubrp, arith::<SUBR, true>);
    t.set_mnemonic(M::Fisubr, arith::<SUBR, false>);
    t.set_mnemonic(M::Fmul, arith::<MUL, false>);
    t.set_mnemonic(M::Fmulp, arith::<MUL, true>);
    t.set_mnemonic(M::Fimul, arith::<MUL, false>);
    t.set_mnemonic(M::Fdiv, arith::<DIV, false>);
    t.set_mnemonic(M::Fdivp, arith::<DIV, true>);
    t.set_mnemonic(M::Fidiv, arith::<DIV, false>);
    t.set_mnemonic(M::Fdivr, arith::<DIVR, false>);
    t.set_mnemonic(M::Fdivrp, arith::<DIVR, true>);
    t.set_mnemonic(M::Fidivr, arith::<DIVR, false>);
    t.set_mnemonic(M::Fsqrt, unary::<SQRT>);
    t.set_mnemonic(M::Fabs, unary::<ABS>);
    t.set_mnemonic(M::Fchs, unary::<CHS>);
    t.set_mnemonic(M::Frndint, unary::<RNDINT>);
    t.set_mnemonic(M::F2xm1, unary::<F2XM1>);
    t.set_mnemonic(M::Fscale, fscale);
    t.set_mnemonic(M::Fxtract, fxtract);
    t.set_mnemonic(M::Fprem, fprem::<false>);
    t.set_mnemonic(M::Fprem1, fprem::<true>);
    // Comparisons.
    t.set_mnemonic(M::Fcom, fcom::<0, false>);
    t.set_mnemonic(M::Fcomp, fcom::<1, false>);
    t.set_mnemonic(M::Fcompp, fcom::<2, false>);
    t.set_mnemonic(M::Ficom, fcom::<0, false>);
    t.set_mnemonic(M::Ficomp, fcom::<1, false>);
    t.set_mnemonic(M::Fucom, fcom::<0, true>);
    t.set_mnemonic(M::Fucomp, fcom::<1, true>);
    t.set_mnemonic(M::Fucompp, fcom::<2, true>);
    t.set_mnemonic(M::Fcomi, fcomi::<false, false>);
    t.set_mnemonic(M::Fcomip, fcomi::<true, false>);
    t.set_mnemonic(M::Fucomi, fcomi::<false, true>);
    t.set_mnemonic(M::Fucomip, fcomi::<true, true>);
    t.set_mnemonic(M::Ftst, ftst);
    t.set_mnemonic(M::Fxam, fxam);
    // Transcendentals.
    t.set_mnemonic(M::Fsin, ftrig::<SIN>);
    t.set_mnemonic(M::Fcos, ftrig::<COS>);
    t.set_mnemonic(M::Fsincos, ftrig::<SINCOS>);
    t.set_mnemonic(M::Fptan, ftrig::<TAN>);
    t.set_mnemonic(M::Fpatan, binary_pop::<PATAN>);
    t.set_mnemonic(M::Fyl2x, binary_pop::<YL2X>);
    t.set_mnemonic(M::Fyl2xp1, binary_pop::<YL2XP1>);
    // Control.
    t.set_mnemonic(M::Fninit, finit::<false>);
    t.set_mnemonic(M::Finit, finit::<true>);
    t.set_mnemonic(M::Fldcw, fldcw);
    t.set_mnemonic(M::Fnstcw, fstcw::<false>);
    t.set_mnemonic(M::Fstcw, fstcw::<true>);
    t.set_mnemonic(M::Fnstsw, fstsw::<false>);
    t.set_mnemonic(M::Fstsw, fstsw::<true>);
    t.set_mnemonic(M::Fnclex, fclex::<false>);
    t.set_mnemonic(M::Fclex, fclex::<true>);
    t.set_mnemonic(M::Ffree, ffree::<false>);
    t.set_mnemonic(M::Ffreep, ffree::<true>);
    t.set_mnemonic(M::Fincstp, fincdec::<1>);
    t.set_mnemonic(M::Fdecstp, fincdec::<7>);
    t.set_mnemonic(M::Fnop, fnop);
    t.set_mnemonic(M::Wait, fwait);
    t.set_mnemonic(M::Fnstenv, fstenv::<false>);
    t.set_mnemonic(M::Fstenv, fstenv::<true>);
    t.set_mnemonic(M::Fldenv, fldenv::<false>);
    t.set_mnemonic(M::Fnsave, fsave::<false>);
    t.set_mnemonic(M::Fsave, fsave::<true>);
    t.set_mnemonic(M::Frstor, fldenv::<true>);
    t.set_mnemonic(M::Fxsave, fxsave::<false>);
    t.set_mnemonic(M::Fxsave64, fxsave::<true>);
    t.set_mnemonic(M::Fxrstor, fxrstor::<false>);
    t.set_mnemonic(M::Fxrstor64, fxrstor::<true>);
    // 8087/287 instructions that the 387 and later execute as no-ops.
    t.set_mnemonic(M::Fneni, legacy_nop::<false>);
    t.set_mnemonic(M::Feni, legacy_nop::<true>);
    t.set_mnemonic(M::Fndisi, legacy_nop::<false>);
    t.set_mnemonic(M::Fdisi, legacy_nop::<true>);
    t.set_mnemonic(M::Fnsetpm, legacy_nop::<false>);
    t.set_mnemonic(M::Fsetpm, legacy_nop::<true>);
}

// ---- common helpers -------------------------------------------------------

/// Index of an iced ST(i) register.
#[inline]
fn sti(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::ST0 as usize) & 7
}

/// Prologue of waiting instructions: #NM, then #MF for a pending
/// unmasked exception.
#[inline]
fn begin(cpu: &Cpu) -> XResult<()> {
    cpu.check_x87()?;
    cpu.check_pending_x87()
}

#[inline]
fn ctx(cpu: &Cpu) -> Ctx {
    Ctx::from_fcw(cpu.fpu.fcw)
}

#[inline]
fn has_mem(i: &Instruction) -> bool {
    (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory)
}

/// Record the last non-control instruction: FIP/FCS, FOP and, with a
/// memory operand, FDP/FDS.
fn note(cpu: &mut Cpu, d: &Insn) {
    if FOP_ALWAYS || cpu.fpu.fsw & FSW_ES != 0 {
        cpu.fpu.fop = fop_of(&d.i);
    }
    cpu.fpu.fip = d.i.ip();
    cpu.fpu.fcs = cpu.seg[sreg::CS].selector;
    if has_mem(&d.i) {
        cpu.fpu.fdp = cpu.ea(d);
        cpu.fpu.fds = cpu.seg[d.seg as usize].selector;
    }
}

/// The 11-bit FOP: low three bits of the D8..DF opcode byte, then ModR/M.
pub(crate) fn fop_of(i: &Instruction) -> u16 {
    let info = i.code().op_code();
    let op = info.op_code();
    let (first, second) = if info.op_code_len() == 2 {
        (op >> 8, Some(op & 0xff))
    } else {
        (op, None)
    };
    let reg = info.group_index().max(0) as u8 & 7;
    let modrm = if has_mem(i) {
        modrm_mem(i, reg)
    } else {
        // Register forms: the ST(i) operand (or a fixed rm) completes ModR/M.
        let rm = if info.rm_group_index() >= 0 {
            info.rm_group_index() as u8
        } else {
            (0..i.op_count())
                .find(|&n| info.op_kind(n) == OpCodeOperandKind::sti_opcode)
                .map(|n| sti(i.op_register(n)) as u8)
                .unwrap_or(0)
        };
        match second {
            Some(b) if b >= 0xc0 => (b as u8) | rm,
            _ => 0xc0 | (reg << 3) | rm,
        }
    };
    (((first & 7) as u16) << 8) | u16::from(modrm)
}

/// Reconstruct the ModR/M byte of a memory operand from its addressing.
fn modrm_mem(i: &Instruction, reg: u8) -> u8 {
    let base = i.memory_base();
    let index = i.memory_index();
    let dsz = i.memory_displ_size();
    let md = |b: Register| -> u8 {
        if b == Register::None {
            0
        } else {
            match dsz {
                0 => 0,
                1 => 1,
                _ => 2,
            }
        }
    };
    let r = (reg & 7) << 3;
    if base.size() == 2
        || index.size() == 2
        || (base == Register::None && index == Register::None && dsz == 2)
    {
        use Register::*;
        let rm = match (base, index) {
            (BX, SI) => 0,
            (BX, DI) => 1,
            (BP, SI) => 2,
            (BP, DI) => 3,
            (SI, None) => 4,
            (DI, None) => 5,
            (BP, None) => 6,
            (BX, None) => 7,
            _ => 6, // [disp16]
        };
        return (md(base) << 6) | r | rm;
    }
    if base == Register::RIP || base == Register::EIP {
        return r | 5;
    }
    if base == Register::None && index == Register::None {
        // Absolute disp32: rm = 101 outside 64-bit mode, a SIB byte inside.
        return r | if i.code_size() == CodeSize::Code64 {
            4
        } else {
            5
        };
    }
    if index != Register::None || base == Register::None || base.number() & 7 == 4 {
        return (md(base) << 6) | r | 4;
    }
    (md(base) << 6) | r | (base.number() & 7) as u8
}

/// FCW invalid-operation mask.
const FCW_IM: u16 = 1;

/// Stack underflow (IE + SF, C1 = 0). True when masked: the masked
/// response (write the real indefinite) proceeds.
fn underflow(f: &mut Fpu) -> bool {
    f.set_c1(false);
    f.raise(FSW_IE | FSW_SF);
    f.fcw & FCW_IM != 0
}

/// Stack overflow (IE + SF, C1 = 1). True when masked.
fn overflow(f: &mut Fpu) -> bool {
    f.set_c1(true);
    f.raise(FSW_IE | FSW_SF);
    f.fcw & FCW_IM != 0
}

/// Record an operation's flags. False when an unmasked invalid-operation,
/// denormal or zero-divide exception suppresses the result (only those
/// pre-computation flags are recorded then).
fn accept(f: &mut Fpu, flags: u16) -> bool {
    // An invalid operation takes precedence over a denormal operand: only
    // IE is reported (as on the processors).
    let flags = if flags & IE != 0 { flags & !DE } else { flags };
    let pre = IE | DE | ZE;
    if flags & f.unmasked() & pre != 0 {
        f.raise(flags & pre);
        false
    } else {
        f.raise(flags);
        true
    }
}

/// Would a memory store of a result with these flags happen? (Unmasked
/// overflow and underflow also suppress stores to memory.)
fn store_ok(f: &Fpu, flags: u16) -> bool {
    flags & f.unmasked() & (IE | DE | ZE | OE | UE) == 0
}

/// Record the flags of a memory store decided by [`store_ok`].
fn record_store(f: &mut Fpu, flags: u16, stored: bool, up: bool) {
    if stored {
        f.raise(flags);
        f.set_c1(up);
    } else {
        f.raise(flags & !sf::PE);
        f.set_c1(false);
    }
}

/// Write a result to ST(i) with C1 = rounded up, unless suppressed.
fn put(f: &mut Fpu, i: usize, r: Res<u128>) -> bool {
    if accept(f, r.flags) {
        f.set_st(i, r.v);
        f.set_c1(r.up);
        true
    } else {
        f.set_c1(false);
        false
    }
}

/// Push a loaded or computed value, with the stack-overflow check. An
/// unmasked invalid operation (FLD of an SNaN) suppresses the push; an
/// unmasked denormal operand (FLD m32fp/m64fp of a denormal) does not: the
/// exception is flagged and the value still pushed (SDM FLD; Emerald
/// Rapids: TOP decremented, the tag valid, the normalised value in ST(0)).
fn push_res(f: &mut Fpu, r: Res<u128>) {
    if !f.st_empty(7) {
        if overflow(f) {
            f.push(INDEFINITE);
        }
        return;
    }
    if accept(f, r.flags & !DE) {
        f.raise(r.flags & DE);
        f.push(r.v);
        f.set_c1(r.up);
    } else {
        f.set_c1(false);
    }
}

// ---- memory ---------------------------------------------------------------

fn chunk(n: usize) -> usize {
    match n {
        8.. => 8,
        4..=7 => 4,
        2..=3 => 2,
        _ => 1,
    }
}

/// Read `buf.len()` bytes at `seg:off` (segment checks on the whole range
/// first).
fn read_bytes(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    seg: usize,
    off: u64,
    amask: u64,
    buf: &mut [u8],
) -> XResult<()> {
    cpu.linear(seg, off, buf.len() as u64, false)?;
    let mut k = 0;
    while k < buf.len() {
        let n = chunk(buf.len() - k);
        let v = cpu.read_mem(p, seg, off.wrapping_add(k as u64) & amask, n)?;
        buf[k..k + n].copy_from_slice(&v.to_le_bytes()[..n]);
        k += n;
    }
    Ok(())
}

/// Write `data` at `seg:off`, probing the whole range before the first
/// byte is written.
fn write_bytes(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    seg: usize,
    off: u64,
    amask: u64,
    data: &[u8],
) -> XResult<()> {
    cpu.probe_write(p, seg, off, data.len())?;
    let mut k = 0;
    while k < data.len() {
        let n = chunk(data.len() - k);
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&data[k..k + n]);
        cpu.write_mem(
            p,
            seg,
            off.wrapping_add(k as u64) & amask,
            n,
            u64::from_le_bytes(b),
        )?;
        k += n;
    }
    Ok(())
}

fn read_m80(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<u128> {
    let mut b = [0u8; 16];
    let off = cpu.ea(d);
    read_bytes(cpu, p, d.seg as usize, off, d.amask, &mut b[..10])?;
    Ok(u128::from_le_bytes(b))
}

/// On Intel an m80 store is an 8-byte store, then a 2-byte one: when only
/// the last two bytes fall in a faulting page, the first eight are already
/// written (`Quirks::m80_store_split`).
fn write_m80(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn, v: u128) -> XResult<()> {
    let off = cpu.ea(d);
    let seg = d.seg as usize;
    if !cpu.quirks.m80_store_split {
        // AMD checks all ten bytes first.
        return write_bytes(cpu, p, seg, off, d.amask, &v.to_le_bytes()[..10]);
    }
    cpu.linear(seg, off, 10, true)?;
    cpu.write_mem(p, seg, off, 8, v as u64)?;
    let hi = off.wrapping_add(8) & d.amask;
    cpu.write_mem(p, seg, hi, 2, (v >> 64) as u64 & 0xffff)
}

/// A store an unmasked exception suppresses still checks its destination
/// (a #PF there comes first, as on the processors).
/// The destination check of a store an unmasked exception suppresses
/// (`Quirks::suppressed_store_checks_destination`).
fn probe_m(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn, size: usize) -> XResult<()> {
    if !cpu.quirks.suppressed_store_checks_destination {
        return Ok(());
    }
    let off = cpu.ea(d);
    cpu.probe_write(p, d.seg as usize, off, size)
}

fn read_m(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn, size: usize) -> XResult<u64> {
    let off = cpu.ea(d);
    cpu.read_mem(p, d.seg as usize, off, size)
}

fn write_m(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn, size: usize, v: u64) -> XResult<()> {
    let off = cpu.ea(d);
    cpu.write_mem(p, d.seg as usize, off, size, v)
}

/// A memory source operand converted to double extended, with the flags
/// of the conversion (IE for an SNaN, DE for a denormal).
fn mem_source(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<Res<u128>> {
    let exact = |v: u128| Res {
        v,
        flags: 0,
        up: false,
    };
    Ok(match d.i.memory_size() {
        MemorySize::Float32 => sf::from_f32(read_m(cpu, p, d, 4)? as u32),
        MemorySize::Float64 => sf::from_f64(read_m(cpu, p, d, 8)?),
        MemorySize::Float80 => exact(read_m80(cpu, p, d)?),
        MemorySize::Int16 => exact(sf::from_i64(sext(read_m(cpu, p, d, 2)?, 2) as i64)),
        MemorySize::Int32 => exact(sf::from_i64(sext(read_m(cpu, p, d, 4)?, 4) as i64)),
        MemorySize::Int64 => exact(sf::from_i64(read_m(cpu, p, d, 8)? as i64)),
        _ => return Err(Exception::ud()),
    })
}

// ---- loads and stores -----------------------------------------------------

fn fld(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    if d.i.op0_kind() == OpKind::Register {
        let i = sti(d.i.op0_register());
        let f = &mut cpu.fpu;
        // The source is read before the push: an empty ST(i) is a stack
        // underflow (C1 = 0) even when the register pushed into is full
        // (seen on Emerald Rapids).
        if f.st_empty(i) {
            if underflow(f) {
                f.push(INDEFINITE);
            }
        } else if !f.st_empty(7) {
            if overflow(f) {
                f.push(INDEFINITE);
            }
        } else {
            let v = f.st(i);
            f.push(v);
            f.set_c1(false);
        }
    } else {
        // FLD m80 loads the raw bits: no SNaN or denormal exceptions.
        let r = mem_source(cpu, p, d)?;
        push_res(&mut cpu.fpu, r);
    }
    note(cpu, d);
    Ok(())
}

fn fild(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let r = mem_source(cpu, p, d)?;
    push_res(&mut cpu.fpu, r);
    note(cpu, d);
    Ok(())
}

fn fbld(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let v = sf::from_bcd(read_m80(cpu, p, d)?);
    push_res(
        &mut cpu.fpu,
        Res {
            v,
            flags: 0,
            up: false,
        },
    );
    note(cpu, d);
    Ok(())
}

/// The constants of FLD1 .. FLDZ, rounded by RC from their exact values
/// (SDM vol. 1, 8.3.8: with RC = nearest they match the 8087/287 values).
fn constant(k: u8, rc: sf::Rc) -> u128 {
    let w = match k {
        0 => return sf::ONE,
        1 => W::L2T,
        2 => W::LOG2E,
        3 => W::PI,
        4 => W::LG2,
        5 => W::LN2,
        _ => return 0,
    };
    sf::round_const(w.exp, w.sig, rc)
}

fn fldc<const K: u8>(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let v = constant(K, ctx(cpu).rc);
    push_res(
        &mut cpu.fpu,
        Res {
            v,
            flags: 0,
            up: false,
        },
    );
    note(cpu, d);
    Ok(())
}

fn fst<const POP: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    if d.i.op0_kind() == OpKind::Register {
        // Register destinations copy the raw value: no exceptions.
        let i = sti(d.i.op0_register());
        let f = &mut cpu.fpu;
        if f.st_empty(0) && d.i.mnemonic() == Mnemonic::Fstpnce {
            // The undocumented D9 D8+i alias does not check for an empty
            // ST(0): no underflow, nothing stored, just the pop (C1 = 0).
            f.set_c1(false);
            f.pop();
        } else if f.st_empty(0) {
            if underflow(f) {
                f.set_st(i, INDEFINITE);
                if POP {
                    f.pop();
                }
            }
        } else {
            let v = f.st(0);
            f.set_st(i, v);
            f.set_c1(false);
            if POP {
                f.pop();
            }
        }
        note(cpu, d);
        return Ok(());
    }
    let c = ctx(cpu);
    let empty = cpu.fpu.st_empty(0);
    let x = cpu.fpu.st(0);
    let size = d.i.memory_size().size();
    let (bits, r) = match size {
        4 => {
            let r = sf::to_f32(x, &c);
            let v = if empty { sf::F32_INDEFINITE } else { r.v };
            (
                u128::from(v),
                Res {
                    v: (),
                    flags: r.flags,
                    up: r.up,
                },
            )
        }
        8 => {
            let r = sf::to_f64(x, &c);
            let v = if empty { sf::F64_INDEFINITE } else { r.v };
            (
                u128::from(v),
                Res {
                    v: (),
                    flags: r.flags,
                    up: r.up,
                },
            )
        }
        _ => {
            // FSTP m80 stores the raw bits.
            let v = if empty { INDEFINITE } else { x };
            (
                v,
                Res {
                    v: (),
                    flags: 0,
                    up: false,
                },
            )
        }
    };
    let store = if empty {
        cpu.fpu.fcw & FCW_IM != 0
    } else {
        store_ok(&cpu.fpu, r.flags)
    };
    if store {
        if size == 10 {
            write_m80(cpu, p, d, bits)?;
        } else {
            write_m(cpu, p, d, size, bits as u64)?;
        }
    } else {
        probe_m(cpu, p, d, size)?;
    }
    let f = &mut cpu.fpu;
    if empty {
        underflow(f);
    } else {
        record_store(f, r.flags, store, r.up);
    }
    if store && POP {
        f.pop();
    }
    note(cpu, d);
    Ok(())
}

/// FIST/FISTP (rounding by RC) and FISTTP (truncating, SSE3).
fn fist<const POP: bool, const TRUNC: bool>(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    begin(cpu)?;
    let size = d.i.memory_size().size();
    let empty = cpu.fpu.st_empty(0);
    let rc = if TRUNC { None } else { Some(ctx(cpu).rc) };
    let r = sf::to_int(cpu.fpu.st(0), size as u32 * 8, rc);
    let v = if empty {
        i64::MIN >> (64 - size * 8)
    } else {
        r.v
    };
    let store = if empty {
        cpu.fpu.fcw & FCW_IM != 0
    } else {
        store_ok(&cpu.fpu, r.flags)
    };
    if store {
        write_m(cpu, p, d, size, v as u64 & super::mask(size))?;
    } else {
        probe_m(cpu, p, d, size)?;
    }
    let f = &mut cpu.fpu;
    if empty {
        underflow(f);
    } else {
        record_store(f, r.flags, store, r.up);
    }
    if store && POP {
        f.pop();
    }
    note(cpu, d);
    Ok(())
}

fn fbstp(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let empty = cpu.fpu.st_empty(0);
    let r = sf::to_bcd(cpu.fpu.st(0), ctx(cpu).rc);
    let v = if empty { sf::BCD_INDEFINITE } else { r.v };
    let store = if empty {
        cpu.fpu.fcw & FCW_IM != 0
    } else {
        store_ok(&cpu.fpu, r.flags)
    };
    if store {
        write_m80(cpu, p, d, v)?;
    } else {
        probe_m(cpu, p, d, 10)?;
    }
    let f = &mut cpu.fpu;
    if empty {
        underflow(f);
    } else {
        record_store(f, r.flags, store, r.up);
    }
    if store {
        f.pop();
    }
    note(cpu, d);
    Ok(())
}

fn fxch(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let i = sti(d.i.op1_register());
    let f = &mut cpu.fpu;
    let (e0, ei) = (f.st_empty(0), f.st_empty(i));
    // Masked underflow: the empty register(s) take the indefinite first.
    if !(e0 || ei) || underflow(f) {
        let a = if e0 { INDEFINITE } else { f.st(0) };
        let b = if ei { INDEFINITE } else { f.st(i) };
        f.set_st(0, b);
        f.set_st(i, a);
        if !(e0 || ei) {
            f.set_c1(false);
        }
    }
    note(cpu, d);
    Ok(())
}

fn fcmov<const CC: u8>(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let i = sti(d.i.op1_register());
    let (cf, zf, pf) = (cpu.flags.cf(), cpu.flags.zf(), cpu.flags.pf());
    let cond = match CC {
        0 => cf,
        1 => zf,
        2 => cf || zf,
        3 => pf,
        4 => !cf,
        5 => !zf,
        6 => !(cf || zf),
        _ => !pf,
    };
    let f = &mut cpu.fpu;
    if f.st_empty(0) || f.st_empty(i) {
        if underflow(f) {
            f.set_st(0, INDEFINITE);
        }
    } else if cond {
        // C1 is kept (only a stack underflow clears it), as on hardware.
        let v = f.st(i);
        f.set_st(0, v);
    }
    note(cpu, d);
    Ok(())
}

// ---- arithmetic -----------------------------------------------------------

const ADD: u8 = 0;
const SUB: u8 = 1;
const SUBR: u8 = 2;
const MUL: u8 = 3;
const DIV: u8 = 4;
const DIVR: u8 = 5;

/// FADD/FSUB/FSUBR/FMUL/FDIV/FDIVR with a memory (real or integer) or
/// register source, and the popping forms.
fn arith<const OP: u8, const POP: bool>(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    begin(cpu)?;
    let c = ctx(cpu);
    let (dst, src, conv, src_empty) = if has_mem(&d.i) {
        let r = mem_source(cpu, p, d)?;
        (0, r.v, r.flags, false)
    } else {
        let dst = sti(d.i.op0_register());
        let s = sti(d.i.op1_register());
        (dst, cpu.fpu.st(s), 0, cpu.fpu.st_empty(s))
    };
    let f = &mut cpu.fpu;
    if f.st_empty(dst) || src_empty {
        if underflow(f) {
            f.set_st(dst, INDEFINITE);
            if POP {
                f.pop();
            }
        }
        note(cpu, d);
        return Ok(());
    }
    let x = f.st(dst);
    let nan = |v: u128| matches!(sf::classify(v), sf::Class::QNaN | sf::Class::SNaN);
    let (a, b) = if OP == SUBR || OP == DIVR {
        (src, x)
    } else {
        (x, src)
    };
    let mut r = match OP {
        ADD => sf::add(a, b, &c),
        SUB | SUBR => sf::sub(a, b, &c),
        MUL => sf::mul(a, b, &c),
        _ => sf::div(a, b, &c),
    };
    // A memory operand that was a denormal in its single or double format
    // is a normal double extended value by now: the arithmetic could not
    // see it, so its DE follows the arithmetic's own rules for a denormal
    // operand. With a NaN operand the result is the NaN, and a zero
    // divisor reports only #Z (also an FDIVR's memory dividend): no DE
    // then (Emerald Rapids, every FADD…FDIVR/FCOM form with m32 and m64
    // against each class of ST(0)).
    let conv = if nan(x) || nan(src) || r.flags & ZE != 0 {
        conv & !DE
    } else {
        conv
    };
    r.flags |= conv;
    // A memory operand that was an SNaN reached the arithmetic quietened by
    // its conversion; the NaN rules still see an SNaN there (SDM vol. 1,
    // table 4-7): a QNaN in the register wins over it, and of two SNaNs
    // the larger significand (seen on Emerald Rapids: FSUBR with an m64
    // SNaN of larger significand returns ST(0)'s QNaN).
    if conv & IE != 0 && nan(src) {
        let q = |v: u128| v | (1u128 << 62);
        match sf::classify(x) {
            sf::Class::QNaN => r.v = x,
            sf::Class::SNaN => {
                let (qx, qs) = (q(x), src);
                r.v = if sf::sig_field(qx) > sf::sig_field(qs)
                    || (sf::sig_field(qx) == sf::sig_field(qs) && x >> 79 == 0)
                {
                    qx
                } else {
                    qs
                };
            }
            _ => {}
        }
    }
    // Zen 4: of two QNaN operands, the real indefinite wins
    // (`Quirks::x87_indefinite_wins`).
    if cpu.quirks.x87_indefinite_wins
        && matches!(sf::classify(a), sf::Class::QNaN)
        && matches!(sf::classify(b), sf::Class::QNaN)
        && (a == INDEFINITE || b == INDEFINITE)
    {
        r.v = INDEFINITE;
    }
    let f = &mut cpu.fpu;
    if put(f, dst, r) && POP {
        f.pop();
    }
    note(cpu, d);
    Ok(())
}

const SQRT: u8 = 0;
const ABS: u8 = 1;
const CHS: u8 = 2;
const RNDINT: u8 = 3;
const F2XM1: u8 = 4;

/// One-operand instructions on ST(0).
fn unary<const OP: u8>(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let c = ctx(cpu);
    let f = &mut cpu.fpu;
    if f.st_empty(0) {
        if underflow(f) {
            f.set_st(0, INDEFINITE);
        }
    } else {
        let x = f.st(0);
        match OP {
            SQRT => {
                put(f, 0, sf::sqrt(x, &c));
            }
            RNDINT => {
                put(f, 0, sf::round_int(x, &c));
            }
            F2XM1 => {
                put(f, 0, trans::f2xm1(x, &c));
            }
            // FABS and FCHS change only the sign bit, even of NaNs.
            ABS => {
                f.set_st(0, x & !(1 << 79));
                f.set_c1(false);
            }
            _ => {
                f.set_st(0, x ^ (1 << 79));
                f.set_c1(false);
            }
        }
    }
    note(cpu, d);
    Ok(())
}

fn fscale(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let c = ctx(cpu);
    let f = &mut cpu.fpu;
    if f.st_empty(0) || f.st_empty(1) {
        if underflow(f) {
            f.set_st(0, INDEFINITE);
        }
    } else {
        let r = sf::scale(f.st(0), f.st(1), &c);
        put(f, 0, r);
    }
    note(cpu, d);
    Ok(())
}

/// Masked response of FXTRACT, FPTAN, FSINCOS to a stack fault: ST(0) and
/// the pushed register both receive the indefinite.
fn replace_push_fault(f: &mut Fpu, under: bool) {
    let masked = if under { underflow(f) } else { overflow(f) };
    if masked {
        f.set_st(0, INDEFINITE);
        f.push(INDEFINITE);
    }
}

fn fxtract(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let f = &mut cpu.fpu;
    if f.st_empty(0) || !f.st_empty(7) {
        let under = f.st_empty(0);
        replace_push_fault(f, under);
    } else {
        let (e, s, flags) = sf::xtract(f.st(0));
        f.set_c1(false);
        if accept(f, flags) {
            f.set_st(0, e);
            f.push(s);
        }
    }
    note(cpu, d);
    Ok(())
}

/// FPREM / FPREM1: C2 = incomplete reduction, C0 C3 C1 = quotient bits
/// 2, 1, 0.
fn fprem<const IEEE: bool>(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let c = ctx(cpu);
    let f = &mut cpu.fpu;
    f.set_cc(FSW_C1 | FSW_C2, 0);
    if f.st_empty(0) || f.st_empty(1) {
        if underflow(f) {
            f.set_st(0, INDEFINITE);
        }
    } else {
        let r = sf::rem(f.st(0), f.st(1), IEEE, &c);
        if accept(f, r.r.flags) {
            f.set_st(0, r.r.v);
            if !r.invalid {
                let q = r.q;
                let cc = if r.partial {
                    FSW_C2
                } else {
                    (if q & 4 != 0 { FSW_C0 } else { 0 })
                        | (if q & 2 != 0 { FSW_C3 } else { 0 })
                        | (if q & 1 != 0 { FSW_C1 } else { 0 })
                };
                f.set_cc(FSW_C0 | FSW_C1 | FSW_C2 | FSW_C3, cc);
            }
        }
    }
    note(cpu, d);
    Ok(())
}

// ---- comparisons ----------------------------------------------------------

fn cc_of(c: Cmp) -> u16 {
    match c {
        Cmp::Greater => 0,
        Cmp::Less => FSW_C0,
        Cmp::Equal => FSW_C3,
        Cmp::Unordered => FSW_C0 | FSW_C2 | FSW_C3,
    }
}

const CC3: u16 = FSW_C0 | FSW_C2 | FSW_C3;

/// FCOM/FCOMP/FCOMPP/FICOM/FICOMP (signalling) and FUCOM/FUCOMP/FUCOMPP
/// (quiet); `POPS` pops after the comparison.
fn fcom<const POPS: u8, const QUIET: bool>(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    begin(cpu)?;
    let (b, conv, b_empty) = if has_mem(&d.i) {
        let r = mem_source(cpu, p, d)?;
        (r.v, r.flags, false)
    } else {
        let i = match d.i.op_count() {
            0 => 1,
            n => sti(d.i.op_register(n - 1)),
        };
        (cpu.fpu.st(i), 0, cpu.fpu.st_empty(i))
    };
    let f = &mut cpu.fpu;
    // The condition codes are set even when an unmasked exception stops
    // the pop (as the processors do): unordered after a stack underflow.
    let done = if f.st_empty(0) || b_empty {
        let masked = underflow(f);
        f.set_cc(CC3, CC3);
        masked
    } else {
        let (c, flags) = sf::compare(f.st(0), b, QUIET);
        let ok = accept(f, flags | conv);
        f.set_cc(CC3, cc_of(c));
        f.set_c1(false);
        ok
    };
    if done {
        for _ in 0..POPS {
            f.pop();
        }
    }
    note(cpu, d);
    Ok(())
}

/// FCOMI/FCOMIP (signalling) and FUCOMI/FUCOMIP (quiet): ZF PF CF.
fn fcomi<const POP: bool, const QUIET: bool>(
    cpu: &mut Cpu,
    _p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    begin(cpu)?;
    let i = sti(d.i.op1_register());
    let f = &mut cpu.fpu;
    // EFLAGS take the result even when an unmasked exception stops the
    // pop (as the processors do): unordered after a stack underflow.
    let (bits, done) = if f.st_empty(0) || f.st_empty(i) {
        (ZF | PF | CF, underflow(f))
    } else {
        // C1 is kept (only a stack underflow clears it), as on hardware.
        let (c, flags) = sf::compare(f.st(0), f.st(i), QUIET);
        let bits = match c {
            Cmp::Greater => 0,
            Cmp::Less => CF,
            Cmp::Equal => ZF,
            Cmp::Unordered => ZF | PF | CF,
        };
        (bits, accept(f, flags))
    };
    // OF, SF and AF are cleared.
    cpu.flags.set_arith(bits);
    if done && POP {
        cpu.fpu.pop();
    }
    note(cpu, d);
    Ok(())
}

fn ftst(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let f = &mut cpu.fpu;
    // Condition codes as in `fcom`, whatever the masks.
    if f.st_empty(0) {
        underflow(f);
        f.set_cc(CC3, CC3);
    } else {
        let (c, flags) = sf::compare(f.st(0), 0, false);
        f.set_c1(false);
        accept(f, flags);
        f.set_cc(CC3, cc_of(c));
    }
    note(cpu, d);
    Ok(())
}

/// FXAM: C3 C2 C0 = class, C1 = sign (also of an empty register's stale
/// contents).
fn fxam(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let f = &mut cpu.fpu;
    let x = f.st(0);
    let cc = if f.st_empty(0) {
        FSW_C3 | FSW_C0
    } else {
        match sf::classify(x) {
            sf::Class::Unsupported => 0,
            sf::Class::QNaN | sf::Class::SNaN => FSW_C0,
            sf::Class::Normal => FSW_C2,
            sf::Class::Infinity => FSW_C2 | FSW_C0,
            sf::Class::Zero => FSW_C3,
            sf::Class::Denormal => FSW_C3 | FSW_C2,
        }
    };
    let c1 = if sf::sign(x) { FSW_C1 } else { 0 };
    f.set_cc(CC3 | FSW_C1, cc | c1);
    note(cpu, d);
    Ok(())
}

// ---- transcendentals ------------------------------------------------------

const SIN: u8 = 0;
const COS: u8 = 1;
const SINCOS: u8 = 2;
const TAN: u8 = 3;

/// FSIN, FCOS (replace ST(0)), FSINCOS, FPTAN (replace ST(0) and push).
fn ftrig<const K: u8>(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let c = ctx(cpu);
    let pushes = K == SINCOS || K == TAN;
    let f = &mut cpu.fpu;
    f.set_cc(FSW_C1 | FSW_C2, 0);
    if f.st_empty(0) {
        if pushes {
            replace_push_fault(f, true);
        } else if underflow(f) {
            f.set_st(0, INDEFINITE);
        }
    } else if pushes && !f.st_empty(7) {
        replace_push_fault(f, false);
    } else {
        match trans::trig(f.st(0), K == TAN, &c) {
            Trig::OutOfRange => f.set_cc(FSW_C2, FSW_C2),
            Trig::Special(r) => {
                if accept(f, r.flags) {
                    f.set_st(0, r.v);
                    if pushes {
                        f.push(r.v);
                    }
                }
            }
            Trig::Done(s, co) => match K {
                SIN => {
                    put(f, 0, s);
                }
                COS => {
                    put(f, 0, co);
                }
                _ => {
                    // FSINCOS: ST(1) = sin, ST(0) = cos; FPTAN: ST(1) =
                    // tan, ST(0) = 1.
                    if accept(f, s.flags | co.flags) {
                        f.set_st(0, s.v);
                        f.push(co.v);
                        f.set_c1(if K == TAN { s.up } else { co.up });
                    }
                }
            },
        }
    }
    note(cpu, d);
    Ok(())
}

const PATAN: u8 = 0;
const YL2X: u8 = 1;
const YL2XP1: u8 = 2;

/// FPATAN, FYL2X, FYL2XP1: ST(1) = f(ST(0), ST(1)), then pop.
fn binary_pop<const K: u8>(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let c = ctx(cpu);
    let f = &mut cpu.fpu;
    if f.st_empty(0) || f.st_empty(1) {
        if underflow(f) {
            f.set_st(1, INDEFINITE);
            f.pop();
        }
    } else {
        let (x, y) = (f.st(0), f.st(1));
        let r = match K {
            PATAN => trans::fpatan(x, y, &c),
            YL2X => trans::fyl2x(x, y, &c),
            _ => trans::fyl2xp1(x, y, &c),
        };
        if put(f, 1, r) {
            f.pop();
        }
    }
    note(cpu, d);
    Ok(())
}

// ---- control --------------------------------------------------------------

fn finit<const WAIT: bool>(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    if WAIT {
        begin(cpu)?;
    } else {
        cpu.check_x87()?;
    }
    cpu.fpu.init();
    Ok(())
}

fn fldcw(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let v = read_m(cpu, p, d, 2)? as u16;
    // Unmasking a pending exception sets ES: the next waiting
    // instruction raises #MF.
    cpu.fpu.load_fcw(v);
    Ok(())
}

fn fstcw<const WAIT: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    if WAIT {
        begin(cpu)?;
    } else {
        cpu.check_x87()?;
    }
    let v = cpu.fpu.fcw;
    write_m(cpu, p, d, 2, u64::from(v))
}

fn fstsw<const WAIT: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    if WAIT {
        begin(cpu)?;
    } else {
        cpu.check_x87()?;
    }
    let v = u64::from(cpu.fpu.fsw);
    if d.i.op0_kind() == OpKind::Register {
        cpu.set_reg(Register::AX, v);
        Ok(())
    } else {
        write_m(cpu, p, d, 2, v)
    }
}

fn fclex<const WAIT: bool>(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    if WAIT {
        begin(cpu)?;
    } else {
        cpu.check_x87()?;
    }
    // PE UE OE ZE DE IE, SF, ES and B; C0..C3 and TOP are kept.
    cpu.fpu.fsw &= !(0x00ff | FSW_B);
    Ok(())
}

fn ffree<const POP: bool>(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let i = sti(d.i.op0_register());
    let f = &mut cpu.fpu;
    let r = f.phys(i);
    f.set_tag(r, TAG_EMPTY);
    if POP {
        f.pop();
    }
    note(cpu, d);
    Ok(())
}

/// FINCSTP (`DELTA` 1) and FDECSTP (`DELTA` 7): rotate TOP, tags unchanged.
fn fincdec<const DELTA: usize>(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let f = &mut cpu.fpu;
    f.set_top(f.top() + DELTA);
    f.set_c1(false);
    note(cpu, d);
    Ok(())
}

fn fnop(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    note(cpu, d);
    Ok(())
}

/// WAIT/FWAIT: #NM only when CR0.MP and CR0.TS are both set (CR0.EM is
/// ignored), then the pending-exception check.
fn fwait(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    if cpu.cr0 & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS {
        return Err(Exception::nm());
    }
    cpu.check_pending_x87()
}

fn legacy_nop<const WAIT: bool>(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    if WAIT {
        begin(cpu)
    } else {
        cpu.check_x87()
    }
}

// ---- environment and state images ------------------------------------------

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from(get32(b, at)) | (u64::from(get32(b, at + 4)) << 32)
}

/// The FSTENV image (SDM vol. 1, figures 8-9 to 8-12): 28 bytes for a
/// 32-bit operand size (also in 64-bit mode), 14 for 16-bit; protected
/// mode stores offsets and selectors, real and virtual-8086 mode 20/32-bit
/// linear addresses. Unused upper halves are stored as 1s, as Intel
/// processors do.
fn env_image(cpu: &Cpu, big: bool) -> [u8; 28] {
    let f = &cpu.fpu;
    let mut b = [0u8; 28];
    let ftw = f.computed_tag_word();
    let prot = cpu.protected() && !cpu.vm86();
    let fop = f.fop & 0x7ff;
    let fip_lin = (u32::from(f.fcs) << 4).wrapping_add(f.fip as u32);
    let fdp_lin = (u32::from(f.fds) << 4).wrapping_add(f.fdp as u32);
    if big {
        put32(&mut b, 0, 0xffff_0000 | u32::from(f.fcw));
        put32(&mut b, 4, 0xffff_0000 | u32::from(f.fsw));
        put32(&mut b, 8, 0xffff_0000 | u32::from(ftw));
        if prot {
            put32(&mut b, 12, f.fip as u32);
            put32(&mut b, 16, u32::from(f.fcs) | (u32::from(fop) << 16));
            put32(&mut b, 20, f.fdp as u32);
            put32(&mut b, 24, 0xffff_0000 | u32::from(f.fds));
        } else {
            put32(&mut b, 12, 0xffff_0000 | (fip_lin & 0xffff));
            put32(&mut b, 16, ((fip_lin >> 16) << 12) | u32::from(fop));
            put32(&mut b, 20, 0xffff_0000 | (fdp_lin & 0xffff));
            put32(&mut b, 24, (fdp_lin >> 16) << 12);
        }
    } else {
        put16(&mut b, 0, f.fcw);
        put16(&mut b, 2, f.fsw);
        put16(&mut b, 4, ftw);
        if prot {
            put16(&mut b, 6, f.fip as u16);
            put16(&mut b, 8, f.fcs);
            put16(&mut b, 10, f.fdp as u16);
            put16(&mut b, 12, f.fds);
        } else {
            put16(&mut b, 6, fip_lin as u16);
            put16(&mut b, 8, ((((fip_lin >> 16) & 0xf) << 12) as u16) | fop);
            put16(&mut b, 10, fdp_lin as u16);
            put16(&mut b, 12, (((fdp_lin >> 16) & 0xf) << 12) as u16);
        }
    }
    b
}

/// Load an FLDENV/FRSTOR environment image; returns the tag word (applied
/// by the caller once the registers are in place).
fn load_env(cpu: &mut Cpu, b: &[u8], big: bool) -> u16 {
    let prot = cpu.protected() && !cpu.vm86();
    let f = &mut cpu.fpu;
    let ftw;
    if big {
        f.fcw = (get16(b, 0) & !FCW_RESERVED) | 0x40;
        f.fsw = get16(b, 4);
        ftw = get16(b, 8);
        if prot {
            f.fip = u64::from(get32(b, 12));
            f.fcs = get16(b, 16);
            f.fop = get16(b, 18) & 0x7ff;
            f.fdp = u64::from(get32(b, 20));
            f.fds = get16(b, 24);
        } else {
            f.fip = u64::from(get16(b, 12)) | (u64::from((get32(b, 16) >> 12) & 0xffff) << 16);
            f.fop = get16(b, 16) & 0x7ff;
            f.fdp = u64::from(get16(b, 20)) | (u64::from((get32(b, 24) >> 12) & 0xffff) << 16);
            f.fcs = 0;
            f.fds = 0;
        }
    } else {
        f.fcw = (get16(b, 0) & !FCW_RESERVED) | 0x40;
        f.fsw = get16(b, 2);
        ftw = get16(b, 4);
        if prot {
            f.fip = u64::from(get16(b, 6));
            f.fcs = get16(b, 8);
            f.fdp = u64::from(get16(b, 10));
            f.fds = get16(b, 12);
        } else {
            f.fip = u64::from(get16(b, 6)) | (u64::from(get16(b, 8) >> 12) << 16);
            f.fop = get16(b, 8) & 0x7ff;
            f.fdp = u64::from(get16(b, 10)) | (u64::from(get16(b, 12) >> 12) << 16);
            f.fcs = 0;
            f.fds = 0;
        }
    }
    ftw
}

fn is_big_env(d: &Insn) -> bool {
    matches!(
        d.i.memory_size(),
        MemorySize::FpuEnv28 | MemorySize::FpuState108
    )
}

/// FSTENV/FNSTENV: store the environment, then mask all exceptions.
fn fstenv<const WAIT: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    if WAIT {
        begin(cpu)?;
    } else {
        cpu.check_x87()?;
    }
    let big = is_big_env(d);
    let img = env_image(cpu, big);
    let off = cpu.ea(d);
    write_bytes(
        cpu,
        p,
        d.seg as usize,
        off,
        d.amask,
        &img[..if big { 28 } else { 14 }],
    )?;
    cpu.fpu.fcw |= FP_EXCEPTIONS;
    Ok(())
}

/// FSAVE/FNSAVE: environment and ST(0)..ST(7), then FNINIT.
fn fsave<const WAIT: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    if WAIT {
        begin(cpu)?;
    } else {
        cpu.check_x87()?;
    }
    let big = is_big_env(d);
    let env_len = if big { 28 } else { 14 };
    let mut img = [0u8; 108];
    img[..env_len].copy_from_slice(&env_image(cpu, big)[..env_len]);
    for i in 0..8 {
        let at = env_len + 10 * i;
        img[at..at + 10].copy_from_slice(&cpu.fpu.st(i).to_le_bytes()[..10]);
    }
    let off = cpu.ea(d);
    write_bytes(cpu, p, d.seg as usize, off, d.amask, &img[..env_len + 80])?;
    cpu.fpu.init();
    Ok(())
}

/// FLDENV (`REGS` false) and FRSTOR (`REGS` true).
fn fldenv<const REGS: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    begin(cpu)?;
    let big = is_big_env(d);
    let env_len = if big { 28 } else { 14 };
    let len = if REGS { env_len + 80 } else { env_len };
    let mut img = [0u8; 108];
    let off = cpu.ea(d);
    read_bytes(cpu, p, d.seg as usize, off, d.amask, &mut img[..len])?;
    let ftw = load_env(cpu, &img, big);
    let f = &mut cpu.fpu;
    if REGS {
        for i in 0..8 {
            let at = env_len + 10 * i;
            let mut w = [0u8; 16];
            w[..10].copy_from_slice(&img[at..at + 10]);
            let r = f.phys(i);
            f.regs[r] = u128::from_le_bytes(w);
        }
    }
    f.load_tag_word(ftw);
    // A pending unmasked exception in the loaded status word is raised by
    // the next waiting instruction.
    f.update_es();
    Ok(())
}

/// Linear address of the memory operand without segment checks (for the
/// FXSAVE/FXRSTOR alignment check, which comes first).
fn raw_linear(cpu: &Cpu, d: &Insn) -> u64 {
    let off = cpu.ea(d);
    let seg = d.seg as usize;
    if cpu.bits == 64 {
        if seg >= sreg::FS {
            cpu.seg[seg].base.wrapping_add(off)
        } else {
            off
        }
    } else {
        cpu.seg[seg].base.wrapping_add(off) & 0xffff_ffff
    }
}

/// FXSAVE/FXSAVE64: the 512-byte image (SDM vol. 1, tables 10-2, 10-3).
/// The XMM registers (8 outside 64-bit mode) and MXCSR/MXCSR_MASK are
/// saved only when CR4.OSFXSR = 1; bytes 416..511 are not written.
fn fxsave<const REX_W: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_x87()?;
    if raw_linear(cpu, d) & 15 != 0 {
        return Err(Exception::gp0());
    }
    let osfxsr = cpu.cr4 & CR4_OSFXSR != 0;
    let nxmm = if cpu.bits == 64 { 16 } else { 8 };
    let f = &cpu.fpu;
    let mut img = [0u8; 512];
    put16(&mut img, 0, f.fcw);
    put16(&mut img, 2, f.fsw);
    img[4] = f.abridged_tags();
    put16(&mut img, 6, f.fop & 0x7ff);
    if REX_W {
        img[8..16].copy_from_slice(&f.fip.to_le_bytes());
        img[16..24].copy_from_slice(&f.fdp.to_le_bytes());
    } else {
        put32(&mut img, 8, f.fip as u32);
        put16(&mut img, 12, f.fcs);
        put32(&mut img, 16, f.fdp as u32);
        put16(&mut img, 20, f.fds);
    }
    put32(&mut img, 24, f.mxcsr);
    put32(&mut img, 28, MXCSR_MASK);
    for i in 0..8 {
        let at = 32 + 16 * i;
        img[at..at + 10].copy_from_slice(&f.st(i).to_le_bytes()[..10]);
    }
    for (i, x) in f.xmm.iter().enumerate().take(nxmm) {
        let at = 160 + 16 * i;
        img[at..at + 16].copy_from_slice(&x.to_le_bytes());
    }
    let seg = d.seg as usize;
    let off = cpu.ea(d);
    // Faults are checked on the whole 512 bytes before anything is written.
    cpu.probe_write(p, seg, off, 512)?;
    if osfxsr {
        write_bytes(cpu, p, seg, off, d.amask, &img[..160 + 16 * nxmm])?;
    } else {
        write_bytes(cpu, p, seg, off, d.amask, &img[..24])?;
        write_bytes(
            cpu,
            p,
            seg,
            off.wrapping_add(32) & d.amask,
            d.amask,
            &img[32..160],
        )?;
    }
    Ok(())
}

/// FXRSTOR/FXRSTOR64. #GP(0) for a misaligned operand or reserved MXCSR
/// bits (checked only when MXCSR is loaded, i.e. CR4.OSFXSR = 1).
fn fxrstor<const REX_W: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.check_x87()?;
    if raw_linear(cpu, d) & 15 != 0 {
        return Err(Exception::gp0());
    }
    let osfxsr = cpu.cr4 & CR4_OSFXSR != 0;
    let nxmm = if cpu.bits == 64 { 16 } else { 8 };
    let mut img = [0u8; 512];
    let off = cpu.ea(d);
    let seg = d.seg as usize;
    cpu.linear(seg, off, 512, false)?;
    read_bytes(cpu, p, seg, off, d.amask, &mut img[..160 + 16 * nxmm])?;
    let mxcsr = get32(&img, 24);
    if osfxsr && mxcsr & !MXCSR_MASK != 0 {
        return Err(Exception::gp0());
    }
    let f = &mut cpu.fpu;
    f.fcw = (get16(&img, 0) & !FCW_RESERVED) | 0x40;
    f.fsw = get16(&img, 2);
    f.fop = get16(&img, 6) & 0x7ff;
    if REX_W {
        f.fip = get64(&img, 8);
        f.fdp = get64(&img, 16);
        f.fcs = 0;
        f.fds = 0;
    } else {
        f.fip = u64::from(get32(&img, 8));
        f.fcs = get16(&img, 12);
        f.fdp = u64::from(get32(&img, 16));
        f.fds = get16(&img, 20);
    }
    for i in 0..8 {
        let at = 32 + 16 * i;
        let mut w = [0u8; 16];
        w[..10].copy_from_slice(&img[at..at + 10]);
        let r = f.phys(i);
        f.regs[r] = u128::from_le_bytes(w);
    }
    f.set_abridged_tags(img[4]);
    if osfxsr {
        f.mxcsr = mxcsr;
        for i in 0..nxmm {
            let at = 160 + 16 * i;
            let mut w = [0u8; 16];
            w.copy_from_slice(&img[at..at + 16]);
            f.xmm[i] = u128::from_le_bytes(w);
        }
    }
    f.update_es();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{CR0_NE, CR0_TS};
    use crate::flags::{AF, ARITH, OF, SF};
    use crate::insn::testutil::*;
    use crate::softfloat80::{INDEFINITE, PE};
    use crate::state::gpr::*;

    const D: u32 = 0x2000;
    const HANDLER: u64 = 0x1800;

    /// An 80-bit value from its sign/exponent word and significand.
    fn x(h: u16, s: u64) -> u128 {
        sf::pack(h >> 15 != 0, h & 0x7fff, s)
    }

    fn f(v: f64) -> u128 {
        sf::from_f64(v.to_bits()).v
    }

    /// `op /reg [addr]` with a disp32 (32-bit addressing, no base).
    fn m(op: &[u8], reg: u8, addr: u32) -> Vec<u8> {
        let mut v = op.to_vec();
        v.push((reg << 3) | 5);
        v.extend_from_slice(&addr.to_le_bytes());
        v
    }

    fn code(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn put_f64(c: &Cpu, addr: u32, v: f64) {
        write_phys(c, u64::from(addr), &v.to_bits().to_le_bytes());
    }

    fn put_u16(c: &Cpu, addr: u32, v: u16) {
        write_phys(c, u64::from(addr), &v.to_le_bytes());
    }

    fn read80(c: &Cpu, addr: u32) -> u128 {
        u128::from(read_phys(c, u64::from(addr), 8))
            | (u128::from(read_phys(c, u64::from(addr) + 8, 2)) << 64)
    }

    /// A 32-bit interrupt gate for `vector` to a HLT at [`HANDLER`].
    fn trap(c: &Cpu, vector: u8) {
        let h = HANDLER;
        let g: u64 = (h & 0xffff) | (0x8 << 16) | (0x8e00 << 32) | ((h >> 16) << 48);
        write_phys(c, IDT + 8 * u64::from(vector), &g.to_le_bytes());
        write_phys(c, HANDLER, &[0xf4]);
    }

    /// Did the exception handler run, and for which instruction address?
    fn trapped_at(c: &Cpu) -> Option<u64> {
        (c.rip() == HANDLER + 1).then(|| read_phys(c, c.gpr(RSP), 4))
    }

    /// Same, for an exception with an error code: (EIP, error code).
    fn trapped_with_code(c: &Cpu) -> Option<(u64, u64)> {
        (c.rip() == HANDLER + 1)
            .then(|| (read_phys(c, c.gpr(RSP) + 4, 4), read_phys(c, c.gpr(RSP), 4)))
    }

    fn set_cr0(c: &mut Cpu, bits: u64) {
        let mut s = c.state();
        s.sregs.cr0 |= bits;
        c.set_state(&s);
    }

    #[test]
    fn exact_double_results() {
        let prog = code(&[
            &[0xd9, 0xe8],            // fld1
            &[0xd9, 0xeb],            // fldpi
            &[0xde, 0xc1],            // faddp st(1), st
            &m(&[0xdd], 3, D),        // fstp qword [0x2000]
            &m(&[0xdd], 0, D + 8),    // fld qword [0x2008]      (0.1)
            &m(&[0xdc], 0, D + 0x10), // fadd qword [0x2010]     (0.2)
            &m(&[0xdd], 3, D + 0x18), // fstp qword [0x2018]
            &m(&[0xd9], 0, D + 0x20), // fld dword [0x2020]      (1.5f)
            &m(&[0xd8], 1, D + 0x24), // fmul dword [0x2024]     (-4.0f)
            &m(&[0xd9], 3, D + 0x28), // fstp dword [0x2028]
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            put_f64(c, D + 8, 0.1);
            put_f64(c, D + 0x10, 0.2);
            write_phys(c, u64::from(D) + 0x20, &1.5f32.to_bits().to_le_bytes());
            write_phys(c, u64::from(D) + 0x24, &(-4.0f32).to_bits().to_le_bytes());
        });
        // 1 + π rounded to 64 then 53 bits (computed with mpmath).
        assert_eq!(read_phys(&c, u64::from(D), 8), 0x4010_90fd_aa22_168c);
        assert_eq!(
            read_phys(&c, u64::from(D) + 0x18, 8),
            (0.1f64 + 0.2).to_bits()
        );
        assert_eq!(
            read_phys(&c, u64::from(D) + 0x28, 4),
            u64::from((-6.0f32).to_bits())
        );
        assert_eq!(c.fpu.top(), 0);
        assert_eq!(c.fpu.ftw, 0xffff);
        assert_eq!(c.fpu.fsw & FSW_PE, FSW_PE);
    }

    #[test]
    fn division_precision_and_rounding_control() {
        let prog = code(&[
            &m(&[0xd9], 5, D + 4),    // fldcw [0x2004]
            &[0xd9, 0xe8],            // fld1
            &m(&[0xdb], 0, D),        // fild dword [0x2000]     (3)
            &[0xde, 0xf9],            // fdivp st(1), st
            &m(&[0xdb], 7, D + 0x10), // fstp tword [0x2010]
        ]);
        let cases = [
            (0x037f, 0x3ffd, 0xaaaa_aaaa_aaaa_aaab), // nearest
            (0x077f, 0x3ffd, 0xaaaa_aaaa_aaaa_aaaa), // down
            (0x0b7f, 0x3ffd, 0xaaaa_aaaa_aaaa_aaab), // up
            (0x0f7f, 0x3ffd, 0xaaaa_aaaa_aaaa_aaaa), // toward zero
            (0x007f, 0x3ffd, 0xaaaa_ab00_0000_0000), // PC = 24 bits
            (0x027f, 0x3ffd, 0xaaaa_aaaa_aaaa_a800), // PC = 53 bits
        ];
        for (cw, h, s) in cases {
            let c = run(Mode::Prot32, &prog, |c| {
                write_phys(c, u64::from(D), &3u32.to_le_bytes());
                put_u16(c, D + 4, cw);
            });
            assert_eq!(read80(&c, D + 0x10), x(h, s), "fcw {cw:#x}");
            assert_eq!(c.fpu.fcw, cw);
            assert_eq!(c.fpu.fsw & (FSW_PE | FSW_IE), FSW_PE);
        }
    }

    #[test]
    fn fist_rounding_and_fisttp() {
        let prog = code(&[
            &m(&[0xd9], 5, D),        // fldcw [0x2000]
            &m(&[0xdd], 0, D + 8),    // fld qword [0x2008]
            &m(&[0xdb], 2, D + 0x10), // fist dword [0x2010]
            &m(&[0xdf], 1, D + 0x14), // fisttp word [0x2014]
        ]);
        let cases = [
            (0x037f, 2.5, 2, 2),
            (0x077f, 2.5, 2, 2),
            (0x0b7f, 2.5, 3, 2),
            (0x0f7f, 2.5, 2, 2),
            (0x037f, -2.5, -2, -2),
            (0x077f, -2.5, -3, -2),
            (0x0b7f, -2.5, -2, -2),
            (0x0f7f, -2.5, -2, -2),
            (0x037f, 3.5, 4, 3),
        ];
        for (cw, v, rounded, truncated) in cases {
            let c = run(Mode::Prot32, &prog, |c| {
                put_u16(c, D, cw);
                put_f64(c, D + 8, v);
            });
            assert_eq!(
                read_phys(&c, u64::from(D) + 0x10, 4) as i32,
                rounded,
                "{cw:#x} {v}"
            );
            assert_eq!(
                read_phys(&c, u64::from(D) + 0x14, 2) as i16,
                truncated as i16
            );
            assert_eq!(c.fpu.fsw & (FSW_PE | FSW_IE), FSW_PE);
            assert!(c.fpu.st_empty(0));
        }
    }

    #[test]
    fn integer_indefinite() {
        let prog = code(&[
            &m(&[0xdd], 0, D + 8),    // fld qword [0x2008]      (40000.0)
            &m(&[0xdf], 3, D + 0x10), // fistp word [0x2010]
            &m(&[0xdd], 0, D + 0x18), // fld qword [0x2018]      (NaN)
            &m(&[0xdf], 7, D + 0x20), // fistp qword [0x2020]
            &m(&[0xdd], 0, D + 8),    // fld qword [0x2008]
            &m(&[0xdb], 3, D + 0x28), // fistp dword [0x2028]    (fits)
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            put_f64(c, D + 8, 40000.0);
            put_f64(c, D + 0x18, f64::NAN);
        });
        assert_eq!(read_phys(&c, u64::from(D) + 0x10, 2), 0x8000);
        assert_eq!(read_phys(&c, u64::from(D) + 0x20, 8), 0x8000_0000_0000_0000);
        assert_eq!(read_phys(&c, u64::from(D) + 0x28, 4), 40000);
        assert_eq!(c.fpu.fsw & 0xff, FSW_IE);
        assert_eq!(c.fpu.top(), 0);
        // Unmasked: nothing stored, nothing popped, ES and B set.
        let prog = code(&[
            &m(&[0xd9], 5, D),        // fldcw [0x2000]          (IM clear)
            &m(&[0xdd], 0, D + 8),    // fld qword [0x2008]
            &m(&[0xdf], 3, D + 0x10), // fistp word [0x2010]
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            put_u16(c, D, 0x037e);
            put_f64(c, D + 8, 40000.0);
            write_phys(c, u64::from(D) + 0x10, &[0x55, 0x55]);
        });
        assert_eq!(read_phys(&c, u64::from(D) + 0x10, 2), 0x5555);
        assert_eq!(c.fpu.st(0), f(40000.0));
        assert_eq!(
            c.fpu.fsw & (FSW_IE | FSW_ES | FSW_B),
            FSW_IE | FSW_ES | FSW_B
        );
    }

    #[test]
    fn stack_overflow_and_underflow() {
        // Nine pushes: the ninth overflows (IE, SF, C1 = 1) and pushes the
        // real indefinite when masked.
        let prog = [0xd9, 0xe8].repeat(9); // fld1 x 9
        let c = run(Mode::Prot32, &prog, |_| {});
        let f = &c.fpu;
        assert_eq!(f.fsw & (FSW_IE | FSW_SF | FSW_C1), FSW_IE | FSW_SF | FSW_C1);
        assert_eq!(f.top(), 7);
        assert_eq!(f.st(0), INDEFINITE);
        assert_eq!(f.st(1), sf::ONE);
        // Unmasked: no push, ES set.
        let c = run(Mode::Prot32, &prog, |c| c.fpu.fcw = 0x037e);
        assert_eq!(c.fpu.top(), 0);
        assert_eq!(
            c.fpu.fsw & (FSW_IE | FSW_SF | FSW_C1 | FSW_ES),
            FSW_IE | FSW_SF | FSW_C1 | FSW_ES
        );
        assert_eq!(c.fpu.st(0), sf::ONE);
        // Underflow: fadd st, st(1) on an empty stack (C1 = 0).
        let prog = [
            0xd9, 0xe8, // fld1
            0xd8, 0xc1, // fadd st, st(1)
        ];
        let c = run(Mode::Prot32, &prog, |_| {});
        assert_eq!(c.fpu.fsw & (FSW_IE | FSW_SF | FSW_C1), FSW_IE | FSW_SF);
        assert_eq!(c.fpu.st(0), INDEFINITE);
        // FSTP of an empty register stores the indefinite and pops.
        let prog = code(&[
            &m(&[0xdd], 3, D), // fstp qword [0x2000]
        ]);
        let c = run(Mode::Prot32, &prog, |_| {});
        assert_eq!(read_phys(&c, u64::from(D), 8), sf::F64_INDEFINITE);
        assert_eq!(c.fpu.top(), 1);
    }

    #[test]
    fn reversed_and_integer_forms() {
        let prog = code(&[
            &m(&[0xdd], 0, D),        // fld qword [0x2000]      (10)
            &m(&[0xdd], 0, D + 8),    // fld qword [0x2008]      (4)
            &[0xdc, 0xe9],            // fsub st(1), st          st1 = 10 - 4
            &[0xdc, 0xe1],            // fsubr st(1), st         st1 = 4 - 6
            &[0xd8, 0xf9],            // fdivr st, st(1)         st0 = -2 / 4
            &m(&[0xda], 5, D + 0x10), // fisubr dword [0x2010]   st0 = 3 - -0.5
            &m(&[0xde], 6, D + 0x14), // fidiv word [0x2014]     st0 = 3.5 / 7
            &[0xde, 0xf9],            // fdivp st(1), st         st1 = -2 / 0.5; pop
            &m(&[0xde], 0, D + 0x14), // fiadd word [0x2014]     st0 = -4 + 7
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            put_f64(c, D, 10.0);
            put_f64(c, D + 8, 4.0);
            write_phys(c, u64::from(D) + 0x10, &3i32.to_le_bytes());
            write_phys(c, u64::from(D) + 0x14, &7i16.to_le_bytes());
        });
        assert_eq!((c.fpu.top(), c.fpu.st(0)), (7, f(3.0)));
        assert_eq!(c.fpu.fsw & 0xff, 0);
        assert_eq!(c.fpu.fdp, u64::from(D) + 0x14);
        assert_eq!(c.fpu.fop, 0x605); // DE /0 [disp32]
    }

    #[test]
    fn unmasked_numeric_exceptions() {
        // Overflow into a register: the exponent is bias-adjusted by -24576.
        let prog = code(&[
            &m(&[0xdb], 5, D), // fld tword [0x2000]      (largest finite)
            &[0xd9, 0xc0],     // fld st(0)
            &[0xde, 0xc9],     // fmulp st(1), st
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            write_phys(c, u64::from(D), &x(0x7ffe, u64::MAX).to_le_bytes()[..10]);
            c.fpu.fcw = 0x0377;
        });
        assert_eq!(c.fpu.st(0), x(0x5ffe, 0xffff_ffff_ffff_fffe));
        assert_eq!(c.fpu.fsw & 0x82ff, FSW_OE | FSW_PE | FSW_ES | FSW_B);
        // Overflow into memory: nothing stored, nothing popped.
        let prog = code(&[
            &m(&[0xdd], 0, D),     // fld qword [0x2000]      (1e300)
            &m(&[0xd9], 3, D + 8), // fstp dword [0x2008]
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            put_f64(c, D, 1e300);
            c.fpu.fcw = 0x0377;
        });
        assert_eq!(read_phys(&c, u64::from(D) + 8, 4), 0);
        assert_eq!((c.fpu.top(), c.fpu.st(0)), (7, f(1e300)));
        assert_eq!(c.fpu.fsw & 0x80ff, FSW_OE | FSW_ES | FSW_B);
        // Same with overflow masked: infinity stored, popped.
        let c = run(Mode::Prot32, &prog, |c| put_f64(c, D, 1e300));
        assert_eq!(read_phys(&c, u64::from(D) + 8, 4), 0x7f80_0000);
        assert_eq!((c.fpu.top(), c.fpu.fsw & 0xff), (0, FSW_OE | FSW_PE));
        // Denormal operand, unmasked: FLD m64 flags it and still pushes
        // (SDM FLD; fix 51).
        let prog = code(&[
            &m(&[0xdd], 0, D), // fld qword [0x2000]      (denormal)
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            write_phys(c, u64::from(D), &1u64.to_le_bytes());
            c.fpu.fcw = 0x037d;
        });
        assert_eq!(c.fpu.top(), 7);
        assert_eq!(c.fpu.st(0), x(0x3fff - 1074, 1 << 63));
        assert_eq!(c.fpu.fsw & 0x80ff, FSW_DE | FSW_ES | FSW_B);
        // ...masked, it loads the (normalised) value.
        let c = run(Mode::Prot32, &prog, |c| {
            write_phys(c, u64::from(D), &1u64.to_le_bytes())
        });
        assert_eq!(c.fpu.st(0), x(0x3fff - 1074, 1 << 63));
        assert_eq!(c.fpu.fsw & 0xff, FSW_DE);
    }

    #[test]
    fn long_mode_rip_relative() {
        let prog = [
            0xdd, 0x05, 0xfa, 0x0f, 0x00, 0x00, // fld qword [rip+0xffa]   (0x2000)
            0xd9, 0xfa, // fsqrt
            0xdd, 0x1d, 0xfa, 0x0f, 0x00, 0x00, // fstp qword [rip+0xffa]  (0x2008)
        ];
        let c = run(Mode::Long64, &prog, |c| put_f64(c, D, 2.0));
        assert_eq!(read_phys(&c, u64::from(D) + 8, 8), 2f64.sqrt().to_bits());
        assert_eq!(
            (c.fpu.fip, c.fpu.fdp, c.fpu.fop),
            (CODE + 8, u64::from(D) + 8, 0x51d)
        );
    }

    #[test]
    fn fcomi_and_fucomi_flags() {
        let prog = code(&[
            &m(&[0xdd], 0, D),     // fld qword [0x2000]      (b)
            &m(&[0xdd], 0, D + 8), // fld qword [0x2008]      (a)
            &[0xdb, 0xf1],         // fcomi st, st(1)
        ]);
        let qprog = code(&[
            &m(&[0xdd], 0, D),     // fld qword [0x2000]
            &m(&[0xdd], 0, D + 8), // fld qword [0x2008]
            &[0xdf, 0xe9],         // fucomip st, st(1)
        ]);
        let cases = [
            (1.0, 2.0, CF),
            (2.0, 2.0, ZF),
            (3.0, 2.0, 0),
            (f64::NAN, 2.0, ZF | PF | CF),
        ];
        for (a, b, want) in cases {
            for (p, quiet) in [(&prog, false), (&qprog, true)] {
                let c = run(Mode::Prot32, p, |c| {
                    put_f64(c, D, b);
                    put_f64(c, D + 8, a);
                    let mut s = c.state();
                    s.regs.rflags |= OF | SF | AF;
                    c.set_state(&s);
                });
                assert_eq!(c.rflags() & ARITH, want, "{a} {b} {quiet}");
                let ie = a.is_nan() && !quiet;
                assert_eq!(c.fpu.fsw & FSW_IE != 0, ie);
                assert_eq!(c.fpu.top(), if quiet { 7 } else { 6 });
            }
        }
    }

    #[test]
    fn fcom_condition_codes() {
        let prog = code(&[
            &m(&[0xdd], 0, D + 8), // fld qword [0x2008]
            &m(&[0xdc], 3, D),     // fcomp qword [0x2000]
            &[0xdf, 0xe0],         // fnstsw ax
        ]);
        for (a, b, want) in [
            (1.0, 2.0, FSW_C0),
            (2.0, 2.0, FSW_C3),
            (3.0, 2.0, 0),
            (1.0, f64::NAN, FSW_C0 | FSW_C2 | FSW_C3),
        ] {
            let c = run(Mode::Prot32, &prog, |c| {
                put_f64(c, D, b);
                put_f64(c, D + 8, a);
            });
            let ax = c.gpr(RAX) as u16;
            assert_eq!(ax & (FSW_C0 | FSW_C1 | FSW_C2 | FSW_C3), want, "{a} {b}");
            assert_eq!(ax & FSW_IE != 0, b.is_nan());
            assert_eq!((ax >> 11) & 7, 0); // popped
        }
        // FTST and FICOM.
        let prog = code(&[
            &m(&[0xdd], 0, D + 8), // fld qword [0x2008]      (-0.5)
            &[0xd9, 0xe4],         // ftst
            &[0xdf, 0xe0],         // fnstsw ax
            &[0x89, 0xc3],         // mov ebx, eax
            &m(&[0xda], 2, D),     // ficom dword [0x2000]    (-1)
            &[0xdf, 0xe0],         // fnstsw ax
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            put_f64(c, D + 8, -0.5);
            write_phys(c, u64::from(D), &(-1i32).to_le_bytes());
        });
        assert_eq!(c.gpr(RBX) as u16 & CC3, FSW_C0);
        assert_eq!(c.gpr(RAX) as u16 & CC3, 0);
    }

    #[test]
    fn fxam_classes() {
        let prog = code(&[
            &m(&[0xdb], 5, D),   // fld tword [0x2000]
            &[0xd9, 0xe5],       // fxam
            &[0x9b, 0xdf, 0xe0], // fstsw ax
        ]);
        let cases = [
            (x(0x3fff, 1 << 63), FSW_C2),
            (x(0xbfff, 1 << 63), FSW_C2 | FSW_C1),
            (0, FSW_C3),
            (x(0x8000, 0), FSW_C3 | FSW_C1),
            (x(0, 1), FSW_C3 | FSW_C2),
            (x(0, 1 << 63), FSW_C3 | FSW_C2), // pseudo-denormal
            (x(0x7fff, 1 << 63), FSW_C2 | FSW_C0),
            (x(0xffff, 0xc000_0000_0000_0000), FSW_C1 | FSW_C0),
            (x(0x7fff, 0x8000_0000_0000_0001), FSW_C0), // SNaN
            (x(0x3fff, 1 << 62), 0),                    // unnormal
        ];
        for (v, want) in cases {
            let c = run(Mode::Prot32, &prog, |c| {
                write_phys(c, u64::from(D), &v.to_le_bytes()[..10]);
            });
            assert_eq!(c.gpr(RAX) as u16 & (CC3 | FSW_C1), want, "{v:#x}");
            assert_eq!(c.fpu.fsw & 0xff, 0, "FLD m80 and FXAM raise nothing");
        }
        // Empty: C3 C0, C1 from the stale contents.
        let c = run(Mode::Prot32, &[0xd9, 0xe5, 0xdf, 0xe0], |c| {
            c.fpu.regs[0] = x(0x8000, 0);
        });
        assert_eq!(c.gpr(RAX) as u16 & (CC3 | FSW_C1), FSW_C3 | FSW_C0 | FSW_C1);
    }

    #[test]
    fn fprem_quotient_bits() {
        let prog = |op: u8| {
            code(&[
                &m(&[0xdd], 0, D),     // fld qword [0x2000]      (divisor)
                &m(&[0xdd], 0, D + 8), // fld qword [0x2008]      (dividend)
                &[0xd9, op],           // fprem (f8) / fprem1 (f5)
            ])
        };
        let cases = [
            (0xf8, 10.0, 3.0, 1.0, FSW_C3 | FSW_C1),   // q = 3
            (0xf5, 10.0, 3.0, 1.0, FSW_C3 | FSW_C1),   // q = 3
            (0xf8, 7.0, 2.0, 1.0, FSW_C3 | FSW_C1),    // q = 3
            (0xf5, 7.0, 2.0, -1.0, FSW_C0),            // q = 4
            (0xf8, -13.0, 2.0, -1.0, FSW_C3 | FSW_C1), // q = 6 -> 110: C0 C3
        ];
        for (op, a, b, r, cc) in cases {
            let c = run(Mode::Prot32, &prog(op), |c| {
                put_f64(c, D, b);
                put_f64(c, D + 8, a);
            });
            assert_eq!(c.fpu.st(0), f(r), "{op:#x} {a} {b}");
            let want = if a == -13.0 { FSW_C0 | FSW_C3 } else { cc };
            assert_eq!(c.fpu.fsw & (CC3 | FSW_C1), want, "{op:#x} {a} {b}");
        }
        // Incomplete reduction: C2 = 1.
        let c = run(Mode::Prot32, &prog(0xf8), |c| {
            put_f64(c, D, 3.0);
            put_f64(c, D + 8, 2f64.powi(100));
        });
        assert_eq!(c.fpu.fsw & (CC3 | FSW_C1), FSW_C2);
    }

    #[test]
    fn fxsave_fxrstor_round_trip() {
        let prog = code(&[
            &[0xd9, 0xe8],                         // fld1
            &[0xd9, 0xee],                         // fldz
            &[0xd9, 0xeb],                         // fldpi
            &[0x0f, 0xae, 0x05, 0x00, 0x20, 0, 0], // fxsave [0x2000]
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            let mut s = c.state();
            s.sregs.cr4 |= 1 << 9;
            c.set_state(&s);
            c.fpu.xmm[3] = 0x0011_2233_4455_6677_8899_aabb_ccdd_eeff;
            c.fpu.xmm[9] = 0x1234; // not saved outside 64-bit mode
            c.fpu.mxcsr = 0x1fa0;
        });
        let rd = |a: u32, n: usize| read_phys(&c, u64::from(D + a), n);
        assert_eq!(rd(0, 2), 0x037f);
        assert_eq!(rd(2, 2), u64::from(c.fpu.fsw));
        assert_eq!(rd(4, 1), 0xe0); // R5..R7 in use
        assert_eq!(rd(6, 2), 0x1eb); // FOP of fldpi (D9 EB)
        assert_eq!(rd(8, 4), 0x1004); // FIP
        assert_eq!(rd(12, 2), 0x8); // FCS
        assert_eq!(rd(24, 4), 0x1fa0);
        assert_eq!(rd(28, 4), 0xffff);
        assert_eq!(read80(&c, D + 32), x(0x4000, 0xc90f_daa2_2168_c235));
        assert_eq!(rd(42, 6), 0);
        assert_eq!(read80(&c, D + 48), 0);
        assert_eq!(read80(&c, D + 64), sf::ONE);
        assert_eq!(rd(160 + 48, 8), 0x8899_aabb_ccdd_eeff);
        assert_eq!(rd(160 + 56, 8), 0x0011_2233_4455_6677);
        assert_eq!(rd(160 + 9 * 16, 8), 0);
        // Restore into a reset FPU from a modified image.
        let mut img = vec![0u8; 512];
        for (k, b) in img.iter_mut().enumerate() {
            *b = read_phys(&c, u64::from(D) + k as u64, 1) as u8;
        }
        img[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        img[160 + 16..160 + 32].copy_from_slice(&[7u8; 16]);
        let restore = code(&[
            &[0x0f, 0xae, 0x0d, 0x00, 0x20, 0, 0], // fxrstor [0x2000]
        ]);
        let old = c.fpu;
        let c2 = run(Mode::Prot32, &restore, |c| {
            let mut s = c.state();
            s.sregs.cr4 |= 1 << 9;
            c.set_state(&s);
            write_phys(c, u64::from(D), &img);
        });
        let f = &c2.fpu;
        assert_eq!(
            (f.fcw, f.fsw, f.ftw, f.fop, f.fip),
            (old.fcw, old.fsw, old.ftw, old.fop, old.fip)
        );
        assert_eq!(f.ftw, 0x13ff); // R5 valid (π), R6 zero, R7 valid (1.0)
        assert_eq!(f.regs[5..8], old.regs[5..8]);
        assert_eq!(f.mxcsr, 0x1f80);
        assert_eq!(f.xmm[1], u128::from_le_bytes([7; 16]));
        assert_eq!(f.xmm[3], old.xmm[3]);
    }

    #[test]
    fn fxsave64_and_faults() {
        // fxsave64 [0x2000]: 64-bit FIP/FDP, all 16 XMM registers.
        let prog = code(&[
            &[0xd9, 0xe8],                                     // fld1
            &[0x48, 0x0f, 0xae, 0x04, 0x25, 0x00, 0x20, 0, 0], // fxsave64 [0x2000]
        ]);
        let c = run(Mode::Long64, &prog, |c| {
            let mut s = c.state();
            s.sregs.cr4 |= 1 << 9;
            c.set_state(&s);
            c.fpu.xmm[15] = 0xabcd;
        });
        assert_eq!(read_phys(&c, u64::from(D) + 8, 8), CODE);
        assert_eq!(read_phys(&c, u64::from(D) + 160 + 15 * 16, 8), 0xabcd);
        // Misaligned operand: #GP(0).
        let prog = [0x0f, 0xae, 0x05, 0x08, 0x20, 0, 0]; // fxsave [0x2008]
        let c = run(Mode::Prot32, &prog, |c| trap(c, crate::exception::GP));
        assert_eq!(trapped_with_code(&c), Some((CODE, 0)));
        // Reserved MXCSR bits: #GP(0) from FXRSTOR, nothing loaded.
        let prog = [0x0f, 0xae, 0x0d, 0x00, 0x20, 0, 0]; // fxrstor [0x2000]
        let c = run(Mode::Prot32, &prog, |c| {
            trap(c, crate::exception::GP);
            let mut s = c.state();
            s.sregs.cr4 |= 1 << 9;
            c.set_state(&s);
            write_phys(c, u64::from(D) + 24, &0x1_0000u32.to_le_bytes());
            write_phys(c, u64::from(D), &0x0000u16.to_le_bytes());
        });
        assert_eq!(trapped_with_code(&c), Some((CODE, 0)));
        assert_eq!(c.fpu.fcw, 0x037f);
    }

    #[test]
    fn fstenv_fldenv_protected_32() {
        let prog = code(&[
            &[0xd9, 0xe8],             // fld1                    (0x1000)
            &m(&[0xdc], 0, D + 0x100), // fadd qword [0x2100]     (0x1002)
            &m(&[0xd9], 6, D),         // fnstenv [0x2000]
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            put_f64(c, D + 0x100, 2.0);
            c.fpu.fcw = 0x0372; // ZE, IE... unmasked: none raised here
        });
        let rd = |a: u32| read_phys(&c, u64::from(D + a), 4);
        assert_eq!(rd(0), 0xffff_0372);
        assert_eq!(rd(4), 0xffff_3800); // TOP = 7
        assert_eq!(rd(8), 0xffff_3fff); // R7 valid, others empty
        assert_eq!(rd(12), 0x1002);
        assert_eq!(rd(16), 0x0405_0008); // FOP DC /0 [disp32] = 0x405, CS 8
        assert_eq!(rd(20), 0x2100);
        assert_eq!(rd(24), 0xffff_0010);
        // FSTENV masks all exceptions afterwards.
        assert_eq!(c.fpu.fcw, 0x037f);
        assert_eq!(c.fpu.st(0), f(3.0));

        // FLDENV: new control/status/tags/pointers; a pending unmasked
        // flag sets ES and B.
        let prog = code(&[
            &m(&[0xd9], 4, D), // fldenv [0x2000]
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            let img: [u32; 7] = [
                0xffff_037b,
                0xffff_1804,
                0xffff_f3ff,
                0x1234_5678,
                0x0123_0008,
                0x9abc,
                0xffff_0010,
            ];
            for (k, w) in img.iter().enumerate() {
                write_phys(c, u64::from(D) + 4 * k as u64, &w.to_le_bytes());
            }
            c.fpu.regs[5] = 0;
        });
        let fp = &c.fpu;
        assert_eq!(fp.fcw, 0x037b);
        assert_eq!(fp.fsw, 0x1804 | FSW_ES | FSW_B);
        assert_eq!(fp.top(), 3);
        // Only "empty" is taken from the image: R5 holds 0, so it is tagged zero.
        assert_eq!(fp.ftw, 0xf7ff);
        assert_eq!(
            (fp.fip, fp.fcs, fp.fop, fp.fdp, fp.fds),
            (0x1234_5678, 8, 0x123, 0x9abc, 0x10)
        );
    }

    #[test]
    fn fnstenv_real_mode_16() {
        let prog = [
            0xd9, 0xe8, // fld1                        (0000:1000)
            0xdd, 0x06, 0x00, 0x20, // fld qword [0x2000]
            0xd9, 0x36, 0x00, 0x21, // fnstenv [0x2100] (14 bytes, real-mode layout)
        ];
        let c = run(Mode::Real16, &prog, |c| put_f64(c, D, 1.0));
        let rd = |a: u32| read_phys(&c, u64::from(0x2100 + a), 2);
        assert_eq!(rd(0), 0x037f);
        assert_eq!(rd(4), 0x0fff);
        assert_eq!(rd(6), 0x1002); // FIP[15:0] (linear)
        assert_eq!(rd(8), 0x0506); // FIP[19:16] << 12 | FOP (DD /0 [disp16] = 0x506)
        assert_eq!(rd(10), 0x2000);
        assert_eq!(rd(12), 0);
    }

    #[test]
    fn fsave_frstor() {
        let prog = code(&[
            &[0xd9, 0xeb],     // fldpi
            &[0xd9, 0xe8],     // fld1
            &m(&[0xdd], 6, D), // fnsave [0x2000]
            &[0xd9, 0xee],     // fldz
            &m(&[0xdd], 4, D), // frstor [0x2000]
        ]);
        let c = run(Mode::Prot32, &prog, |_| {});
        assert_eq!(read_phys(&c, u64::from(D) + 8, 4), 0xffff_0fff);
        assert_eq!(read80(&c, D + 28), sf::ONE);
        assert_eq!(read80(&c, D + 38), x(0x4000, 0xc90f_daa2_2168_c235));
        assert_eq!(c.fpu.top(), 6);
        assert_eq!(c.fpu.st(0), sf::ONE);
        assert_eq!(c.fpu.ftw, 0x0fff);
    }

    #[test]
    fn nm_with_cr0_ts_and_wait() {
        let prog = [0xd9, 0xe8]; // fld1
        let c = run(Mode::Prot32, &prog, |c| {
            trap(c, crate::exception::NM);
            set_cr0(c, CR0_TS);
        });
        assert_eq!(trapped_at(&c), Some(CODE));
        assert!(c.fpu.st_empty(0));
        // WAIT: #NM only with MP and TS.
        let prog = [0x9b]; // wait
        let c = run(Mode::Prot32, &prog, |c| {
            trap(c, crate::exception::NM);
            set_cr0(c, CR0_TS);
        });
        assert_eq!(trapped_at(&c), None);
        let c = run(Mode::Prot32, &prog, |c| {
            trap(c, crate::exception::NM);
            set_cr0(c, CR0_TS | crate::cpu::CR0_MP);
        });
        assert_eq!(trapped_at(&c), Some(CODE));
        // FXSAVE also raises #NM.
        let prog = [0x0f, 0xae, 0x05, 0x00, 0x20, 0, 0];
        let c = run(Mode::Prot32, &prog, |c| {
            trap(c, crate::exception::NM);
            set_cr0(c, crate::cpu::CR0_EM);
        });
        assert_eq!(trapped_at(&c), Some(CODE));
    }

    #[test]
    fn mf_with_unmasked_exception() {
        let prog = [
            0xd9, 0xe8, // fld1                        (0x1000)
            0xd9, 0xee, // fldz                        (0x1002)
            0xde, 0xf9, // fdivp st(1), st             (0x1004) ZE unmasked
            0xdf, 0xe0, // fnstsw ax                   (0x1006) no-wait
            0xd9, 0xe8, // fld1                        (0x1008) #MF here
        ];
        let c = run(Mode::Prot32, &prog, |c| {
            trap(c, crate::exception::MF);
            set_cr0(c, CR0_NE);
            c.fpu.fcw = 0x037b;
        });
        assert_eq!(trapped_at(&c), Some(CODE + 8));
        let f = &c.fpu;
        assert_eq!(f.fsw & 0x80ff, FSW_ZE | FSW_ES | FSW_B);
        assert_eq!(c.gpr(RAX) as u16 & 0x80ff, FSW_ZE | FSW_ES | FSW_B);
        // The divide was suppressed: both operands are still there.
        assert_eq!((f.top(), f.st(0), f.st(1)), (6, 0, sf::ONE));
        assert_eq!((f.fip, f.fop), (CODE + 4, 0x6f9));
        // CR0.NE = 0: no exception inside the processor (FERR# is external).
        let c = run(Mode::Prot32, &prog, |c| {
            trap(c, crate::exception::MF);
            c.fpu.fcw = 0x037b;
        });
        assert_eq!(trapped_at(&c), None);
        assert_eq!(c.fpu.top(), 5);
        // FLDCW unmasking a pending flag: the next waiting instruction traps.
        let prog = code(&[
            &[0xd9, 0xe8],     // fld1
            &[0xd9, 0xee],     // fldz
            &[0xde, 0xf9],     // fdivp st(1), st   (ZE masked)
            &m(&[0xd9], 5, D), // fldcw [0x2000]    (0x037b)
            &[0x9b],           // fwait
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            trap(c, crate::exception::MF);
            set_cr0(c, CR0_NE);
            put_u16(c, D, 0x037b);
        });
        assert_eq!(trapped_at(&c), Some(CODE + 12));
    }

    #[test]
    fn exp_log_through_instructions() {
        // 2^x the way libm does it: frndint, f2xm1, fscale.
        let prog = code(&[
            &m(&[0xdd], 0, D),     // fld qword [0x2000]      (3.5)
            &[0xd9, 0xc0],         // fld st(0)
            &[0xd9, 0xfc],         // frndint
            &[0xdc, 0xe9],         // fsub st(1), st
            &[0xd9, 0xc9],         // fxch st(1)
            &[0xd9, 0xf0],         // f2xm1
            &[0xd9, 0xe8],         // fld1
            &[0xde, 0xc1],         // faddp st(1), st
            &[0xd9, 0xfd],         // fscale
            &[0xdd, 0xd9],         // fstp st(1)
            &[0xd9, 0xed],         // fldln2
            &m(&[0xdd], 0, D + 8), // fld qword [0x2008]      (0.75)
            &[0xd9, 0xf1],         // fyl2x
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            put_f64(c, D, 3.5);
            put_f64(c, D + 8, 0.75);
        });
        assert_eq!(c.fpu.st(1), x(0x4002, 0xb504_f333_f9de_6484)); // 2^3.5
        assert_eq!(c.fpu.st(0), x(0xbffd, 0x934b_1089_a6dc_93c2)); // ln 0.75
        assert_eq!(c.fpu.top(), 6);
    }

    #[test]
    fn trig_instructions() {
        let prog = code(&[
            &m(&[0xdd], 0, D),     // fld qword [0x2000]      (2.0)
            &[0xd9, 0xfb],         // fsincos
            &m(&[0xdd], 0, D + 8), // fld qword [0x2008]      (0.5)
            &[0xd9, 0xf2],         // fptan
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            put_f64(c, D, 2.0);
            put_f64(c, D + 8, 0.5);
        });
        let fp = &c.fpu;
        assert_eq!(fp.st(0), sf::ONE);
        assert_eq!(fp.st(1), x(0x3ffe, 0x8bda_7adf_9a3a_5219)); // tan 0.5
        assert_eq!(fp.st(2), x(0xbffd, 0xd511_32ba_9b90_2522)); // cos 2
        assert_eq!(fp.st(3), x(0x3ffe, 0xe8c7_b756_8da2_2efd)); // sin 2
        assert_eq!(fp.fsw & FSW_C2, 0);
        // Out of range: C2 = 1, ST(0) unchanged, nothing pushed.
        let prog = code(&[
            &m(&[0xdd], 0, D), // fld qword [0x2000]      (1e19)
            &[0xd9, 0xf2],     // fptan
            &[0xd9, 0xfe],     // fsin
        ]);
        let c = run(Mode::Prot32, &prog, |c| put_f64(c, D, 1e19));
        assert_eq!((c.fpu.top(), c.fpu.st(0)), (7, f(1e19)));
        assert_eq!(c.fpu.fsw & (FSW_C2 | FSW_PE), FSW_C2);
    }

    #[test]
    fn moves_exchanges_and_conditional_moves() {
        let prog = code(&[
            &[0xd9, 0xe8], // fld1
            &[0xd9, 0xeb], // fldpi
            &[0xd9, 0xc9], // fxch st(1)
            &[0xf9],       // stc
            &[0xda, 0xc1], // fcmovb st, st(1)       (taken)
            &[0xdb, 0xc2], // fcmovnb st, st(2)      (not taken; st(2) empty -> #IS)
        ]);
        let c = run(Mode::Prot32, &prog, |_| {});
        // The underflow of the second fcmov (masked) writes the indefinite.
        assert_eq!(c.fpu.st(0), INDEFINITE);
        assert_eq!(c.fpu.st(1), x(0x4000, 0xc90f_daa2_2168_c235));
        let prog = code(&[
            &[0xd9, 0xe8],            // fld1
            &[0xd9, 0xeb],            // fldpi
            &[0xd9, 0xc9],            // fxch st(1)
            &[0xf9],                  // stc
            &[0xda, 0xc1],            // fcmovb st, st(1)
            &[0xdb, 0xc9],            // fcmovne st, st(1)      (ZF = 0: taken)
            &[0xd9, 0xe0],            // fchs
            &[0xdd, 0xd2],            // fst st(2)
            &m(&[0xdf], 7, D),        // fistp qword [0x2000]
            &m(&[0xdf], 6, D + 0x10), // fbstp [0x2010]
            &m(&[0xdf], 4, D + 0x10), // fbld [0x2010]
            &[0xdd, 0xc0],            // ffree st(0)
            &[0xd9, 0xf7],            // fincstp
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            let mut s = c.state();
            s.regs.rflags &= !ZF;
            c.set_state(&s);
        });
        // fistp stored -π rounded; fbstp the copy of π left below it.
        assert_eq!(read_phys(&c, u64::from(D), 8) as i64, -3);
        assert_eq!(read80(&c, D + 0x10), 3);
        assert_eq!(c.fpu.st(7), f(3.0)); // loaded by fbld, freed by ffree
        assert!(c.fpu.st_empty(7));
        assert_eq!(c.fpu.st(0), x(0xc000, 0xc90f_daa2_2168_c235)); // fst st(2)
        assert_eq!(c.fpu.top(), 0);
    }

    #[test]
    fn control_words() {
        let prog = code(&[
            &m(&[0xd9], 5, D),           // fldcw [0x2000]
            &m(&[0xd9], 7, D + 2),       // fnstcw [0x2002]
            &[0x9b, 0xdb, 0xe2],         // fclex
            &[0x9b, 0xdb, 0xe3],         // finit
            &m(&[0x9b, 0xdd], 7, D + 4), // fstsw [0x2004]
        ]);
        let c = run(Mode::Prot32, &prog, |c| {
            put_u16(c, D, 0xffff);
            c.fpu.fsw = 0x0021;
        });
        // Reserved bits: 6 reads as 1, 7 and 13..15 as 0.
        assert_eq!(read_phys(&c, u64::from(D) + 2, 2), 0x1f7f);
        assert_eq!(read_phys(&c, u64::from(D) + 4, 2), 0);
        assert_eq!((c.fpu.fcw, c.fpu.fsw, c.fpu.ftw), (0x037f, 0, 0xffff));
    }

    /// FOP reconstruction from iced's decoding matches the encoded bytes.
    #[test]
    fn fop_matches_encoding() {
        let cases: &[(u32, &[u8])] = &[
            (32, &[0xd8, 0xc1]),
            (32, &[0xdc, 0x05, 0, 0x20, 0, 0]),
            (32, &[0xd9, 0x44, 0x24, 0x08]),
            (32, &[0xdd, 0x45, 0xf8]),
            (32, &[0xdb, 0x2c, 0x24]),
            (32, &[0xdf, 0x3c, 0x85, 0, 0x10, 0, 0]),
            (32, &[0xdd, 0x84, 0xb3, 0, 1, 0, 0]),
            (32, &[0xd8, 0x00]),
            (32, &[0xd9, 0xee]),
            (32, &[0xde, 0xd9]),
            (32, &[0xda, 0xe9]),
            (32, &[0xdd, 0xd9]),
            (32, &[0xd9, 0xc9]),
            (32, &[0xdb, 0xf1]),
            (32, &[0xdc, 0xe9]),
            (32, &[0xde, 0xc1]),
            (32, &[0xdf, 0xc1]),
            (32, &[0x67, 0xd9, 0x06, 0, 0x20]),
            (32, &[0x3e, 0xdd, 0x45, 0x00]),
            (64, &[0xdd, 0x05, 0x10, 0, 0, 0]),
            (64, &[0xd9, 0x04, 0x25, 0, 0x20, 0, 0]),
            (64, &[0x41, 0xdd, 0x45, 0x00]),
            (64, &[0x41, 0xdb, 0x2c, 0x24]),
            (64, &[0x42, 0xd9, 0x04, 0xe0]),
            (64, &[0x67, 0xd9, 0x00]),
            (64, &[0x48, 0xdf, 0x3c, 0x24]),
            (16, &[0xd9, 0x06, 0, 0x20]),
            (16, &[0xdd, 0x07]),
            (16, &[0xdd, 0x46, 0x00]),
            (16, &[0xdc, 0x40, 0x08]),
            (16, &[0xdb, 0x2b]),
            (16, &[0xdf, 0x87, 0x34, 0x12]),
            (16, &[0x66, 0xd9, 0x34]),
        ];
        for &(bits, bytes) in cases {
            let mut dec = iced_x86::Decoder::new(bits, bytes, iced_x86::DecoderOptions::NONE);
            let i = dec.decode();
            assert!(!i.is_invalid(), "{bytes:x?}");
            let k = bytes
                .iter()
                .position(|b| (0xd8..=0xdf).contains(b))
                .unwrap();
            let want = (u16::from(bytes[k] & 7) << 8) | u16::from(bytes[k + 1]);
            assert_eq!(fop_of(&i), want, "{} {bytes:x?}", crate::disasm(&i));
        }
    }

    /// iced decodes the 9B prefix of FSTSW, FSTCW, FINIT, FSTENV... as a
    /// separate WAIT; the pair behaves as the waiting instruction.
    #[test]
    fn waiting_forms() {
        let i = iced_x86::Decoder::new(32, &[0x9b, 0xdf, 0xe0], iced_x86::DecoderOptions::NONE)
            .decode();
        assert_eq!((i.mnemonic(), i.len()), (Mnemonic::Wait, 1));
        let prog = [
            0xd9, 0xee, // fldz                   (0x1000)
            0xd9, 0xee, // fldz                   (0x1002)
            0xde, 0xf9, // fdivp st(1), st        (0x1004) IE unmasked
            0xdf, 0xe0, // fnstsw ax              (0x1006)
            0x9b, 0xdf, 0xe0, // fstsw ax         (0x1008) #MF at the WAIT
        ];
        let c = run(Mode::Prot32, &prog, |c| {
            trap(c, crate::exception::MF);
            set_cr0(c, CR0_NE);
            c.fpu.fcw = 0x037e;
        });
        assert_eq!(trapped_at(&c), Some(CODE + 8));
        assert_eq!(c.gpr(RAX) as u16 & 0x80ff, FSW_IE | FSW_ES | FSW_B);
        let _ = PE;
    }

    /// Nothing panics whatever the register contents and control word.
    #[test]
    fn arbitrary_register_contents() {
        let ops: &[&[u8]] = &[
            &[0xd8, 0xc1],
            &[0xd8, 0xc9],
            &[0xd8, 0xe1],
            &[0xd8, 0xf1],
            &[0xd8, 0xf9],
            &[0xd9, 0xfa],
            &[0xd9, 0xfc],
            &[0xd9, 0xfd],
            &[0xd9, 0xf4],
            &[0xd9, 0xf8],
            &[0xd9, 0xf5],
            &[0xd9, 0xf0],
            &[0xd9, 0xf1],
            &[0xd9, 0xf9],
            &[0xd9, 0xf3],
            &[0xd9, 0xfe],
            &[0xd9, 0xff],
            &[0xd9, 0xfb],
            &[0xd9, 0xf2],
            &[0xdb, 0xf1],
            &[0xdd, 0xe1],
            &[0xd9, 0xe5],
            &[0xd9, 0xe4],
            &[0xdd, 0x15, 0, 0x20, 0, 0],
            &[0xd9, 0x15, 0, 0x20, 0, 0],
            &[0xdf, 0x35, 0, 0x20, 0, 0],
            &[0xdb, 0x15, 0, 0x20, 0, 0],
            &[0xdf, 0x0d, 0, 0x20, 0, 0],
        ];
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let specials = [
            0u128,
            INDEFINITE,
            x(0x7fff, 1 << 63),
            x(0x7fff, 0),
            x(0x3fff, 1),
            x(0, 1),
            x(0x7fff, 0x8000_0000_0000_0001),
        ];
        for round in 0..60 {
            for op in ops {
                let regs: Vec<u128> = (0..8)
                    .map(|k| {
                        if (round + k) % 3 == 0 {
                            specials[(next() % specials.len() as u64) as usize]
                        } else {
                            (u128::from(next()) | (u128::from(next()) << 64)) & ((1 << 80) - 1)
                        }
                    })
                    .collect();
                let fcw = next() as u16 | 0x3f;
                let c = run(Mode::Prot32, op, |c| {
                    for (k, v) in regs.iter().enumerate() {
                        c.fpu.regs[k] = *v;
                    }
                    c.fpu.set_abridged_tags(0xff);
                    c.fpu.fcw = fcw;
                });
                assert!(c.fpu.top() < 8);
            }
        }
    }

    // ---- behaviour settled against the hardware oracle (docs/DIFFTEST.md) --

    /// FLDCW [D] with `cw`, then `prog`, in 32-bit protected mode.
    fn with_cw(cw: u16, prog: &[&[u8]], init: impl FnOnce(&mut Cpu)) -> Cpu {
        let mut parts: Vec<&[u8]> = Vec::new();
        let ld = m(&[0xd9], 5, D);
        parts.push(&ld);
        parts.extend_from_slice(prog);
        let all = code(&parts);
        run(Mode::Prot32, &all, |c| {
            put_u16(c, D, cw);
            init(c);
        })
    }

    #[test]
    fn fcmov_and_fcomi_keep_c1() {
        // fcmovb st, st(1) (da c1); fcomi st, st(1) (db f1) on a stack of
        // two ones with C1 set: both leave it set.
        for op in [[0xda, 0xc1], [0xdb, 0xf1]] {
            let c = run(Mode::Prot32, &op, |c| {
                c.fpu.push(f(1.0));
                c.fpu.push(f(1.0));
                c.fpu.fsw |= FSW_C1;
            });
            assert_ne!(c.fpu.fsw & FSW_C1, 0, "{op:02x?}");
        }
    }

    #[test]
    fn compares_set_condition_codes_even_with_unmasked_exceptions() {
        let qnan = f64::from_bits(0x7ff8_0000_0000_0001);
        // FCW 0x37e (IE unmasked): fld qword [D+8] (a QNaN); fcomp st(0)
        // (d8 d8): IE, C3 C2 C0 = unordered, and no pop.
        let ld = m(&[0xdd], 0, D + 8);
        let c = with_cw(0x37e, &[&ld, &[0xd8, 0xd8]], |c| put_f64(c, D + 8, qnan));
        assert_eq!(
            c.fpu.fsw & (FSW_C0 | FSW_C2 | FSW_C3),
            FSW_C0 | FSW_C2 | FSW_C3
        );
        assert_ne!(c.fpu.fsw & FSW_IE, 0);
        assert_eq!(c.fpu.top(), 7);
        // fcomi st, st(0) (db f0): ZF PF CF even though IE is unmasked.
        let c = with_cw(0x37e, &[&ld, &[0xdb, 0xf0]], |c| put_f64(c, D + 8, qnan));
        assert_eq!(c.rflags() & (ZF | PF | CF), ZF | PF | CF);
        // ftst (d9 e4) on an empty stack with IE unmasked: unordered too.
        let c = with_cw(0x37e, &[&[0xd9, 0xe4]], |_| {});
        assert_eq!(
            c.fpu.fsw & (FSW_C0 | FSW_C2 | FSW_C3),
            FSW_C0 | FSW_C2 | FSW_C3
        );
    }

    #[test]
    fn fstp1_alias_pops_an_empty_register_quietly() {
        // d9 d8+i (FSTP1, "fstpnce"): with ST(0) empty nothing is stored,
        // no underflow is raised, C1 = 0, and TOP moves on.
        let c = run(Mode::Prot32, &[0xd9, 0xdf], |c| {
            c.fpu.fsw |= FSW_C1;
        });
        assert_eq!(c.fpu.fsw & (FSW_IE | FSW_SF | FSW_C1), 0);
        assert_eq!(c.fpu.top(), 1);
        assert_eq!(c.fpu.ftw, 0xffff);
    }

    #[test]
    fn denormal_operand_rules() {
        let den = f64::from_bits(1); // smallest double denormal
                                     // fld tbyte [D+0x20] (an extended denormal); fldz; fdivp st(1), st
                                     // (de f9): denormal / 0 reports ZE only.
        let ld = m(&[0xdb], 5, D + 0x20);
        let put_den = |c: &mut Cpu| {
            write_phys(c, u64::from(D) + 0x20, &x(0, 1).to_le_bytes()[..10]);
        };
        let c = run(
            Mode::Prot32,
            &code(&[&ld, &[0xd9, 0xee], &[0xde, 0xf9]]),
            put_den,
        );
        assert_eq!(c.fpu.fsw & 0x3f, FSW_ZE);
        // fst qword [D+0x10] (dd /2) of it: UE PE, no DE.
        let st = m(&[0xdd], 2, D + 0x10);
        let c = run(Mode::Prot32, &code(&[&ld, &st]), put_den);
        assert_eq!(c.fpu.fsw & FSW_DE, 0);
        assert_ne!(c.fpu.fsw & FSW_UE, 0);
        // fld qword [D] (QNaN); fnclex; fmul qword [D+8] (denormal): the
        // NaN propagates, no DE for the memory denormal.
        let ld0 = m(&[0xdd], 0, D);
        let mul = m(&[0xdc], 1, D + 8);
        let c = run(Mode::Prot32, &code(&[&ld0, &[0xdb, 0xe2], &mul]), |c| {
            put_f64(c, D, f64::NAN);
            put_f64(c, D + 8, den);
        });
        assert_eq!(c.fpu.fsw & FSW_DE, 0);
    }

    /// Fix 50 (soak 20261208, case 165944: `fdivr st, dword [m]` with a
    /// single denormal in memory and +0 in ST(0)): a zero divisor reports
    /// #Z alone, also when the denormal dividend came from memory; the
    /// memory denormal's DE stays where the divisor is not zero.
    #[test]
    fn a_zero_divisor_hides_a_memory_denormal_dividend() {
        // fldcw [D+0x10]; fldz / fld1; fdivr (or fdiv) m32/m64 [D].
        let cw = m(&[0xd9], 5, D + 0x10);
        for (op, val, size) in [(0xd8u8, 0x8000_0001u64, 4), (0xdc, 1, 8)] {
            for (fcw, unmasked_de) in [(0x037fu16, false), (0x037d, true)] {
                let put = |c: &mut Cpu| {
                    write_phys(c, u64::from(D), &val.to_le_bytes()[..size]);
                    put_u16(c, D + 0x10, fcw);
                };
                // FDIVR: [D] / +0: -inf (or +inf), ZE only, whatever DM says.
                let c = run(
                    Mode::Prot32,
                    &code(&[&cw, &[0xd9, 0xee], &m(&[op], 7, D)]),
                    put,
                );
                assert_eq!(c.fpu.fsw & 0xff, FSW_ZE, "{op:#x} fcw {fcw:#x}");
                let inf = if size == 4 { 0xffff } else { 0x7fff };
                assert_eq!(c.fpu.st(0), x(inf, 1 << 63));
                // FDIV: 1 / [D]: the denormal is reported (and with DM
                // clear it suppresses the result).
                let c = run(
                    Mode::Prot32,
                    &code(&[&cw, &[0xd9, 0xe8], &m(&[op], 6, D)]),
                    put,
                );
                assert_ne!(c.fpu.fsw & FSW_DE, 0, "{op:#x} fcw {fcw:#x}");
                assert_eq!(c.fpu.fsw & FSW_ZE, 0);
                assert_eq!(c.fpu.st(0) == sf::ONE, unmasked_de);
            }
        }
    }

    /// Fix 51 (jit soak 20261207, 64-bit ring 3 case 47024): FLD m32fp or
    /// m64fp of a denormal with DM clear flags #D (DE, ES, B) and still
    /// pushes the normalised value (SDM FLD); an SNaN with IM clear is not
    /// pushed.
    #[test]
    fn fld_of_a_denormal_with_the_exception_unmasked_still_pushes() {
        let cw = m(&[0xd9], 5, D + 0x10);
        for (op, val, size, want) in [
            (0xd9u8, 0x0000_0001u64, 4, x(0x3f6a, 1 << 63)),
            (
                0xdd,
                0x800f_ffff_ffff_ffff,
                8,
                x(0xbc00, 0xffff_ffff_ffff_f000),
            ),
        ] {
            let c = run(Mode::Prot32, &code(&[&cw, &m(&[op], 0, D)]), |c| {
                write_phys(c, u64::from(D), &val.to_le_bytes()[..size]);
                put_u16(c, D + 0x10, 0x037d);
            });
            assert_eq!(c.fpu.fsw & 0xff, FSW_DE | FSW_ES, "{op:#x}");
            assert_ne!(c.fpu.fsw & FSW_B, 0);
            assert_eq!(c.fpu.top(), 7);
            assert_eq!(c.fpu.ftw, 0x3fff);
            assert_eq!(c.fpu.st(0), want);
        }
        // fld dword [D] of an SNaN with IM clear: IE, nothing pushed.
        let c = run(Mode::Prot32, &code(&[&cw, &m(&[0xd9], 0, D)]), |c| {
            write_phys(c, u64::from(D), &0x7f80_0001u32.to_le_bytes());
            put_u16(c, D + 0x10, 0x037e);
        });
        assert_eq!(c.fpu.fsw & 0xff, FSW_IE | FSW_ES);
        assert_eq!((c.fpu.top(), c.fpu.ftw), (0, 0xffff));
    }

    #[test]
    fn pseudo_denormals_come_back_normalised() {
        // fld tbyte [D] (a pseudo-denormal: exponent 0, integer bit set);
        // fldz; fxch; fscale (d9 fd) by 0: exponent 1, same significand.
        let ld = m(&[0xdb], 5, D);
        let st = m(&[0xdb], 7, D + 0x10);
        let c = run(
            Mode::Prot32,
            &code(&[&[0xd9, 0xee], &ld, &[0xd9, 0xfd], &st]),
            |c| {
                let v = x(0x8000, 0xd7e1_0009_3601_7524);
                write_phys(c, u64::from(D), &v.to_le_bytes()[..10]);
            },
        );
        assert_eq!(read80(&c, D + 0x10), x(0x8001, 0xd7e1_0009_3601_7524));
    }

    #[test]
    fn fld_of_an_empty_register_onto_a_full_stack_is_an_underflow() {
        // Eight values pushed (the register FLD would push into is full),
        // ffree st(6) (dd c6), fld st(6) (d9 c6): the empty source wins,
        // stack underflow with C1 = 0 (as on Emerald Rapids), the
        // indefinite pushed.
        let c = run(Mode::Prot32, &[0xdd, 0xc6, 0xd9, 0xc6], |c| {
            for k in 0..8 {
                c.fpu.push(f(f64::from(k)));
            }
        });
        assert_eq!(c.fpu.fsw & (FSW_IE | FSW_SF | FSW_C1), FSW_IE | FSW_SF);
        assert_eq!(c.fpu.st(0), INDEFINITE);
    }

    #[test]
    fn a_register_qnan_wins_over_a_memory_snan() {
        // fsubr st, qword [D] (dc 2d D) with ST(0) a QNaN and the m64 an
        // SNaN of larger significand: ST(0)'s QNaN (SDM table 4-7; seen on
        // Emerald Rapids), IE for the SNaN.
        let qnan = x(0xffff, 0xf0b0_e706_c0c9_88f1);
        let c = run(Mode::Prot32, &m(&[0xdc], 5, D), |c| {
            c.fpu.push(qnan);
            let v = 0xfff2_a0b9_fb4b_f000u64 & !(1 << 51); // an SNaN
            write_phys(c, u64::from(D), &v.to_le_bytes());
        });
        assert_eq!(c.fpu.st(0), qnan);
        assert_ne!(c.fpu.fsw & FSW_IE, 0);
    }

    #[test]
    fn two_qnans_give_the_larger_significand_or_the_indefinite_per_cpu() {
        // movd mm0, eax (MMX: all tags valid); fld1 overflows the stack
        // (masked: the indefinite in ST(0)); fdivr dword [D] with a QNaN of
        // larger significand in memory. The SDM's rule gives the memory
        // NaN; Zen 4 gives the indefinite (`Quirks::x87_indefinite_wins`).
        let prog = code(&[&[0x0f, 0x6e, 0xc0], &[0xd9, 0xe8], &m(&[0xd8], 7, D)]);
        for (wins, want) in [
            (false, x(0x7fff, 0xf2a7_8600_0000_0000)),
            (true, INDEFINITE),
        ] {
            let c = run(Mode::Prot32, &prog, |c| {
                c.set_quirks(crate::quirks::Quirks {
                    x87_indefinite_wins: wins,
                    ..crate::quirks::Quirks::INTEL
                });
                write_phys(c, u64::from(D), &0x7ff2_a786u32.to_le_bytes());
            });
            assert_eq!(c.fpu.st(0), want, "indefinite wins: {wins}");
            assert_eq!(c.fpu.fsw & 0x41, 0x41, "stack fault (SF, IE) recorded");
        }
    }

    #[test]
    fn an_m80_store_into_a_faulting_page_per_vendor() {
        // fstp tbyte [0x1f_fff8] (db 3c 25 f8 ff 1f 00) with the 2 MiB page
        // at 0x20_0000 not present: #PF either way; Intel has written the
        // first eight bytes, AMD nothing.
        for (q, written) in [
            (crate::quirks::Quirks::INTEL, true),
            (crate::quirks::Quirks::AMD, false),
        ] {
            let mut c = new_cpu();
            setup(&mut c, Mode::Long64);
            c.set_quirks(q);
            write_phys(&c, PML4 + 0x2000 + 8, &0u64.to_le_bytes());
            write_phys(&c, CODE, &[0xdb, 0x3c, 0x25, 0xf8, 0xff, 0x1f, 0x00]);
            c.fpu.push(f(1.0));
            let mut p = TestPlatform::default();
            let insn = c.decode_one(&mut p).expect("decodable");
            let e = (insn.h)(&mut c, &mut p, &insn).expect_err("#PF");
            assert_eq!(e.vector, crate::exception::PF);
            let low = read_phys(&c, 0x1f_fff8, 8);
            assert_eq!(low == f(1.0) as u64, written, "{q:?}");
        }
    }

    #[test]
    fn a_suppressed_store_still_checks_its_destination() {
        // An unmasked invalid operation (empty ST(0), FCW 0x37e) suppresses
        // the store of FIST, but a #PF on its destination comes first.
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        // 2 MiB page at 0x20_0000 not present.
        write_phys(&c, PML4 + 0x2000 + 8, &0u64.to_le_bytes());
        // fist word [0x20_0000] (df 14 25 00 00 20 00) with an empty
        // ST(0) and IE unmasked.
        write_phys(&c, CODE, &[0xdf, 0x14, 0x25, 0x00, 0x00, 0x20, 0x00]);
        c.fpu.fcw = 0x37e;
        let mut p = TestPlatform::default();
        let insn = c.decode_one(&mut p).expect("decodable");
        let e = (insn.h)(&mut c, &mut p, &insn).expect_err("#PF");
        assert_eq!(e.vector, crate::exception::PF);
        // Emerald Rapids skips the check: the instruction completes with
        // the stack fault recorded (a later x87 instruction takes #MF).
        c.set_quirks(crate::quirks::Quirks {
            suppressed_store_checks_destination: false,
            ..crate::quirks::Quirks::INTEL
        });
        (insn.h)(&mut c, &mut p, &insn).expect("no #PF");
        assert_eq!(c.fpu.fsw & 0x41, 0x41);
    }
}
