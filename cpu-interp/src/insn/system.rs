//! System instructions: HLT, flag instructions (CLI STI CLC STC CMC CLD
//! STD), descriptor tables (LGDT LIDT SGDT SIDT LLDT SLDT LTR STR),
//! control and debug registers (MOV CRn/DRn, CLTS, LMSW, SMSW), TLB and
//! cache control (INVLPG WBINVD INVD CLFLUSH), CPUID, RDMSR/WRMSR, RDTSC,
//! RDTSCP, RDPMC, SWAPGS, SYSCALL/SYSRET, SYSENTER/SYSEXIT, LAR LSL VERR
//! VERW, ARPL, XGETBV/XSETBV.

use iced_x86::{Code, Mnemonic, OpKind, Register};

use super::mask;
use crate::block::Insn;
use crate::cpu::*;
use crate::dispatch::Table;
use crate::exception::{Exception, XResult};
use crate::flags;
use crate::platform::Platform;
use crate::segment::{canonical, is_code, parse_descriptor};
use crate::state::{gpr, msr, Segment};

pub fn register(t: &mut Table) {
    t.set_mnemonic(Mnemonic::Hlt, hlt);
    t.set_mnemonic(Mnemonic::Cli, cli);
    t.set_mnemonic(Mnemonic::Sti, sti);
    t.set_mnemonic(Mnemonic::Clc, flag_op::<0>);
    t.set_mnemonic(Mnemonic::Stc, flag_op::<1>);
    t.set_mnemonic(Mnemonic::Cmc, flag_op::<2>);
    t.set_mnemonic(Mnemonic::Cld, flag_op::<3>);
    t.set_mnemonic(Mnemonic::Std, flag_op::<4>);
    t.set_mnemonic(Mnemonic::Lgdt, lgdt_lidt);
    t.set_mnemonic(Mnemonic::Lidt, lgdt_lidt);
    t.set_mnemonic(Mnemonic::Sgdt, sgdt_sidt);
    t.set_mnemonic(Mnemonic::Sidt, sgdt_sidt);
    t.set_mnemonic(Mnemonic::Lldt, lldt);
    t.set_mnemonic(Mnemonic::Ltr, ltr);
    t.set_mnemonic(Mnemonic::Sldt, sldt_str);
    t.set_mnemonic(Mnemonic::Str, sldt_str);
    for &c in t.codes(Mnemonic::Mov).to_vec().iter() {
        match c {
            Code::Mov_r32_cr | Code::Mov_r64_cr => t.set(c, mov_from_cr),
            Code::Mov_cr_r32 | Code::Mov_cr_r64 => t.set(c, mov_to_cr),
            Code::Mov_r32_dr | Code::Mov_r64_dr => t.set(c, mov_from_dr),
            Code::Mov_dr_r32 | Code::Mov_dr_r64 => t.set(c, mov_to_dr),
            Code::Mov_r32_tr | Code::Mov_tr_r32 => t.set(c, crate::dispatch::invalid),
            _ => {}
        }
    }
    t.set_mnemonic(Mnemonic::Clts, clts);
    t.set_mnemonic(Mnemonic::Lmsw, lmsw);
    t.set_mnemonic(Mnemonic::Smsw, smsw);
    t.set_mnemonic(Mnemonic::Invlpg, invlpg);
    t.set_mnemonic(Mnemonic::Wbinvd, privileged_nop);
    t.set_mnemonic(Mnemonic::Invd, privileged_nop);
    t.set_mnemonic(Mnemonic::Clflush, clflush);
    t.set_mnemonic(Mnemonic::Cpuid, cpuid);
    t.set_mnemonic(Mnemonic::Rdmsr, rdmsr);
    t.set_mnemonic(Mnemonic::Wrmsr, wrmsr);
    t.set_mnemonic(Mnemonic::Rdtsc, rdtsc);
    t.set_mnemonic(Mnemonic::Rdtscp, rdtscp);
    t.set_mnemonic(Mnemonic::Rdpmc, rdpmc);
    t.set_mnemonic(Mnemonic::Swapgs, swapgs);
    t.set_mnemonic(Mnemonic::Syscall, syscall);
    t.set_mnemonic(Mnemonic::Sysret, sysret);
    t.set_mnemonic(Mnemonic::Sysretq, sysret);
    t.set_mnemonic(Mnemonic::Sysenter, sysenter);
    t.set_mnemonic(Mnemonic::Sysexit, sysexit);
    t.set_mnemonic(Mnemonic::Sysexitq, sysexit);
    t.set_mnemonic(Mnemonic::Lar, lar_lsl::<true>);
    t.set_mnemonic(Mnemonic::Lsl, lar_lsl::<false>);
    t.set_mnemonic(Mnemonic::Verr, verr_verw::<false>);
    t.set_mnemonic(Mnemonic::Verw, verr_verw::<true>);
    t.set_mnemonic(Mnemonic::Arpl, arpl);
    t.set_mnemonic(Mnemonic::Clac, clac_stac::<false>);
    t.set_mnemonic(Mnemonic::Stac, clac_stac::<true>);
    t.set_mnemonic(Mnemonic::Clflushopt, host_clflush);
    t.set_mnemonic(Mnemonic::Clwb, host_clflush);
    t.set_mnemonic(Mnemonic::Invpcid, invpcid);
    t.set_mnemonic(Mnemonic::Rdpid, rdpid);
    t.set_mnemonic(Mnemonic::Ud0, crate::dispatch::invalid);
    t.set_mnemonic(Mnemonic::Ud1, crate::dispatch::invalid);
    t.set_mnemonic(Mnemonic::Ud2, crate::dispatch::invalid);
}

fn hlt(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    cpu.require_cpl0()?;
    cpu.events.halted = true;
    cpu.end_block = true;
    Ok(())
}

/// CLI/STI permission: real mode always; protected mode needs CPL <= IOPL;
/// virtual-8086 mode needs IOPL = 3 (VME is not advertised).
fn check_if_permission(cpu: &Cpu) -> XResult<()> {
    if !cpu.protected() {
        return Ok(());
    }
    let iopl = cpu.flags.iopl();
    if (cpu.vm86() && iopl < 3) || (!cpu.vm86() && cpu.cpl > iopl) {
        return Err(Exception::gp0());
    }
    Ok(())
}

fn cli(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    check_if_permission(cpu)?;
    cpu.flags.set_bit(flags::IF, false);
    Ok(())
}

fn sti(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    check_if_permission(cpu)?;
    if !cpu.flags.test(flags::IF) {
        cpu.flags.set_bit(flags::IF, true);
        cpu.events.sti_shadow = true;
        cpu.end_block = true;
    }
    Ok(())
}

fn flag_op<const OP: u8>(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    match OP {
        0 => cpu.flags.update_arith(flags::CF, 0),
        1 => cpu.flags.update_arith(flags::CF, flags::CF),
        2 => {
            let cf = cpu.flags.cf();
            cpu.flags
                .update_arith(flags::CF, if cf { 0 } else { flags::CF });
        }
        3 => cpu.flags.set_bit(flags::DF, false),
        _ => cpu.flags.set_bit(flags::DF, true),
    }
    Ok(())
}

fn lgdt_lidt(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.require_cpl0()?;
    if cpu.vm86() {
        return Err(Exception::gp0());
    }
    let off = cpu.ea(d);
    let seg = d.seg as usize;
    let limit = cpu.read_mem(p, seg, off, 2)? as u16;
    let base_size = if cpu.bits == 64 { 8 } else { 4 };
    let mut base = cpu.read_mem(p, seg, off.wrapping_add(2) & d.amask, base_size)?;
    if cpu.bits == 64 {
        if !canonical(base) {
            return Err(Exception::gp0());
        }
    } else if d.i.code() == Code::Lgdt_m1632_16 || d.i.code() == Code::Lidt_m1632_16 {
        base &= 0xff_ffff;
    }
    let t = crate::state::DescriptorTable { base, limit };
    if d.i.mnemonic() == Mnemonic::Lgdt {
        cpu.gdtr = t;
    } else {
        cpu.idtr = t;
    }
    Ok(())
}

fn sgdt_sidt(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let t = if d.i.mnemonic() == Mnemonic::Sgdt {
        cpu.gdtr
    } else {
        cpu.idtr
    };
    let off = cpu.ea(d);
    let seg = d.seg as usize;
    let base_size = if cpu.bits == 64 { 8 } else { 4 };
    cpu.probe_write(p, seg, off, 2 + base_size)?;
    cpu.write_mem(p, seg, off, 2, u64::from(t.limit))?;
    cpu.write_mem(p, seg, off.wrapping_add(2) & d.amask, base_size, t.base)
}

fn require_protected_cpl0(cpu: &Cpu) -> XResult<()> {
    if !cpu.protected() || cpu.vm86() {
        return Err(Exception::ud());
    }
    cpu.require_cpl0()
}

fn lldt(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    require_protected_cpl0(cpu)?;
    let sel = cpu.op_read(p, d, 0, 2)? as u16;
    if sel & !3 == 0 {
        cpu.ldtr = Segment {
            selector: sel,
            unusable: true,
            ..Default::default()
        };
        return Ok(());
    }
    let err = u32::from(sel & !3);
    if sel & 4 != 0 {
        return Err(Exception::gp(err));
    }
    let (lo, hi) = cpu.read_system_descriptor(p, sel)?;
    let mut s = parse_descriptor(lo);
    if s.s || s.type_ != 2 {
        return Err(Exception::gp(err));
    }
    if !s.present {
        return Err(Exception::np(err));
    }
    if cpu.long_mode() {
        // The 16-byte descriptor's base must be canonical (SDM LLDT:
        // #GP(selector)).
        s.base |= (hi & 0xffff_ffff) << 32;
        if !canonical(s.base) {
            return Err(Exception::gp(err));
        }
    }
    s.selector = sel;
    cpu.ldtr = s;
    Ok(())
}

fn ltr(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    require_protected_cpl0(cpu)?;
    let sel = cpu.op_read(p, d, 0, 2)? as u16;
    let err = u32::from(sel & !3);
    if sel & !3 == 0 {
        return Err(Exception::gp0());
    }
    if sel & 4 != 0 {
        return Err(Exception::gp(err));
    }
    let (lo, hi) = cpu.read_system_descriptor(p, sel)?;
    let mut s = parse_descriptor(lo);
    let ok = !s.s
        && if cpu.long_mode() {
            s.type_ == 9
        } else {
            s.type_ == 1 || s.type_ == 9
        };
    if !ok {
        return Err(Exception::gp(err));
    }
    if !s.present {
        return Err(Exception::np(err));
    }
    if cpu.long_mode() {
        // The 16-byte descriptor's base must be canonical (SDM LTR:
        // #GP(selector)), checked before the busy bit is set.
        s.base |= (hi & 0xffff_ffff) << 32;
        if !canonical(s.base) {
            return Err(Exception::gp(err));
        }
    }
    // Mark the descriptor busy.
    let a = cpu
        .gdtr
        .base
        .wrapping_add(u64::from(sel & !7))
        .wrapping_add(5)
        & cpu.lin_mask();
    cpu.write_lin(p, a, 1, ((lo >> 40) & 0xff) | 2, false)?;
    s.type_ |= 2;
    s.selector = sel;
    cpu.tr = s;
    Ok(())
}

fn sldt_str(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    if !cpu.protected() || cpu.vm86() {
        return Err(Exception::ud());
    }
    let v = u64::from(if d.i.mnemonic() == Mnemonic::Sldt {
        cpu.ldtr.selector
    } else {
        cpu.tr.selector
    });
    if d.i.op0_kind() == OpKind::Register {
        cpu.set_reg(d.i.op0_register(), v);
        Ok(())
    } else {
        let off = cpu.ea(d);
        cpu.write_mem(p, d.seg as usize, off, 2, v)
    }
}

fn cr_number(r: Register) -> u8 {
    (r as usize - Register::CR0 as usize) as u8
}

fn mov_from_cr(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.require_cpl0()?;
    if cpu.vm86() {
        return Err(Exception::gp0());
    }
    let v = match cr_number(d.i.op1_register()) {
        0 => cpu.cr0,
        2 => cpu.cr2,
        3 => cpu.cr3,
        4 => cpu.cr4,
        8 if cpu.bits == 64 => {
            if let Some(v) = p.read_cr8() {
                cpu.cr8 = v & 0xf;
            }
            cpu.cr8
        }
        _ => return Err(Exception::ud()),
    };
    cpu.set_reg(d.i.op0_register(), v);
    Ok(())
}

/// CR4 bits the interpreter lets software set.
const CR4_SUPPORTED: u64 = CR4_VME
    | CR4_PVI
    | CR4_TSD
    | CR4_DE
    | CR4_PSE
    | CR4_PAE
    | CR4_MCE
    | CR4_PGE
    | CR4_PCE
    | CR4_OSFXSR
    | CR4_OSXMMEXCPT;

impl Cpu {
    /// Write CR0 with the checks and side effects of MOV to CR0.
    pub(crate) fn write_cr0(&mut self, v: u64) -> XResult<()> {
        if v >> 32 != 0 {
            return Err(Exception::gp0());
        }
        // Bits 6-15, 17, 19-28 are reserved: writes to them are ignored
        // and they read as 0 (SDM 2.5; #GP only for bits 63:32). ET is
        // fixed at 1.
        const CR0_DEFINED: u64 = 0xe005_003f;
        let v = (v & CR0_DEFINED) | CR0_ET;
        if (v & CR0_PG != 0 && v & CR0_PE == 0) || (v & CR0_NW != 0 && v & CR0_CD == 0) {
            return Err(Exception::gp0());
        }
        let old = self.cr0;
        let enabling_pg = v & CR0_PG != 0 && old & CR0_PG == 0;
        let disabling_pg = v & CR0_PG == 0 && old & CR0_PG != 0;
        if enabling_pg && self.efer & EFER_LME != 0 {
            if self.cr4 & CR4_PAE == 0 || self.seg[sreg::CS].l {
                return Err(Exception::gp0());
            }
            self.efer |= EFER_LMA;
        }
        if disabling_pg && self.long_mode() {
            if self.bits == 64 {
                return Err(Exception::gp0());
            }
            self.efer &= !EFER_LMA;
        }
        if v & CR0_PE == 0 && old & CR0_PE != 0 {
            // Back to real mode: CPL 0.
            self.cpl = 0;
        }
        self.cr0 = v;
        if (old ^ v) & (CR0_PG | CR0_WP | CR0_PE) != 0 {
            self.tlb.flush_all();
        }
        self.update_mode();
        self.end_block = true;
        Ok(())
    }

    pub(crate) fn write_cr4(&mut self, v: u64) -> XResult<()> {
        let xsave = if self.has(crate::cpuid::feat::XSAVE) {
            CR4_OSXSAVE
        } else {
            0
        };
        if v & !(CR4_SUPPORTED | xsave) != 0 {
            return Err(Exception::gp0());
        }
        if self.long_mode() && v & CR4_PAE == 0 {
            return Err(Exception::gp0());
        }
        let old = self.cr4;
        self.cr4 = v;
        if (old ^ v) & (CR4_PGE | CR4_PAE | CR4_PSE | CR4_SMEP | CR4_SMAP) != 0 {
            self.tlb.flush_all();
        }
        if (old ^ v) & CR4_DE != 0 {
            // I/O breakpoints exist only with CR4.DE.
            self.debug_regs_changed();
        }
        self.end_block = true;
        Ok(())
    }

    pub(crate) fn write_cr3(&mut self, v: u64) -> XResult<()> {
        let v = if self.long_mode() {
            if v >> crate::mmu::PHYS_ADDR_BITS != 0 {
                return Err(Exception::gp0());
            }
            v
        } else {
            v & 0xffff_ffff
        };
        self.cr3 = v;
        if self.cr4 & CR4_PGE != 0 {
            self.tlb.flush_nonglobal();
        } else {
            self.tlb.flush_all();
        }
        self.end_block = true;
        Ok(())
    }
}

fn mov_to_cr(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.require_cpl0()?;
    if cpu.vm86() {
        return Err(Exception::gp0());
    }
    let v = cpu.reg(d.i.op1_register());
    match cr_number(d.i.op0_register()) {
        0 => cpu.write_cr0(v),
        2 => {
            cpu.cr2 = v;
            Ok(())
        }
        3 => cpu.write_cr3(v),
        4 => cpu.write_cr4(v),
        8 if cpu.bits == 64 => {
            if v & !0xf != 0 {
                return Err(Exception::gp0());
            }
            cpu.cr8 = v;
            p.retired_hint(cpu.retired);
            if p.write_cr8(v) {
                // A lower priority may let a pending interrupt in: the
                // machine gets a look at the next boundary.
                cpu.io_happened = true;
            }
            cpu.end_block = true;
            Ok(())
        }
        _ => Err(Exception::ud()),
    }
}

fn dr_number(r: Register) -> usize {
    r as usize - Register::DR0 as usize
}

fn mov_from_dr(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.require_cpl0()?;
    if cpu.vm86() {
        return Err(Exception::gp0());
    }
    let n = dr_number(d.i.op1_register());
    if (n == 4 || n == 5) && cpu.cr4 & CR4_DE != 0 {
        return Err(Exception::ud());
    }
    general_detect(cpu)?;
    let v = match n {
        0..=3 => cpu.dr.db[n],
        6 => cpu.dr.dr6,
        7 => cpu.dr.dr7,
        4 | 5 if cpu.cr4 & CR4_DE == 0 => {
            if n == 4 {
                cpu.dr.dr6
            } else {
                cpu.dr.dr7
            }
        }
        _ => return Err(Exception::ud()),
    };
    cpu.set_reg(d.i.op0_register(), v);
    Ok(())
}

fn mov_to_dr(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.require_cpl0()?;
    if cpu.vm86() {
        return Err(Exception::gp0());
    }
    let n = dr_number(d.i.op0_register());
    let v = cpu.reg(d.i.op1_register());
    let n = match n {
        4 | 5 if cpu.cr4 & CR4_DE == 0 => n + 2,
        4 | 5 => return Err(Exception::ud()),
        _ => n,
    };
    general_detect(cpu)?;
    if (n == 6 || n == 7) && v >> 32 != 0 {
        return Err(Exception::gp0());
    }
    match n {
        0..=3 => cpu.dr.db[n] = if cpu.bits == 64 { v } else { v & 0xffff_ffff },
        6 => cpu.dr.dr6 = (v & 0x0001_e00f) | 0xffff_0ff0,
        _ => cpu.dr.dr7 = (v & 0xffff_2bff) | 0x400,
    }
    if n != 6 {
        cpu.debug_regs_changed();
    }
    Ok(())
}

/// DR7.GD: a debug-register access is a #DB fault reporting BD (checked
/// after the privilege and DR4/DR5 checks, as KVM's emulator does).
fn general_detect(cpu: &mut Cpu) -> XResult<()> {
    if cpu.dr.dr7 & crate::debug::DR7_GD != 0 {
        cpu.dr.dr6 = (cpu.dr.dr6 & !crate::debug::DR6_B_MASK) | crate::debug::DR6_BD;
        return Err(Exception::new(crate::exception::DB));
    }
    Ok(())
}

fn clts(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    cpu.require_cpl0()?;
    if cpu.vm86() {
        return Err(Exception::gp0());
    }
    cpu.cr0 &= !CR0_TS;
    Ok(())
}

fn lmsw(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.require_cpl0()?;
    if cpu.vm86() {
        return Err(Exception::gp0());
    }
    let v = cpu.op_read(p, d, 0, 2)?;
    // Loads PE MP EM TS; PE can be set but not cleared.
    let nv = (cpu.cr0 & !0xe) | (v & 0xe) | ((cpu.cr0 | v) & 1);
    cpu.write_cr0(nv)
}

fn smsw(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let v = cpu.cr0;
    if d.i.op0_kind() == OpKind::Register {
        let size = d.size as usize;
        cpu.set_reg(d.i.op0_register(), v & mask(size));
        Ok(())
    } else {
        let off = cpu.ea(d);
        cpu.write_mem(p, d.seg as usize, off, 2, v & 0xffff)
    }
}

fn invlpg(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.require_cpl0()?;
    if cpu.vm86() {
        return Err(Exception::gp0());
    }
    let off = cpu.ea(d);
    let s = &cpu.seg[d.seg as usize];
    let lin = if cpu.bits == 64 {
        if d.seg as usize >= sreg::FS {
            s.base.wrapping_add(off)
        } else {
            off
        }
    } else {
        s.base.wrapping_add(off) & 0xffff_ffff
    };
    cpu.tlb.flush_page(lin);
    cpu.end_block = true;
    Ok(())
}

fn privileged_nop(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    cpu.require_cpl0()?;
    if cpu.vm86() {
        return Err(Exception::gp0());
    }
    Ok(())
}

fn clflush(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    // Faults like a byte read; no other effect.
    let off = cpu.ea(d);
    cpu.read_mem(p, d.seg as usize, off, 1).map(|_| ())
}

/// Instructions of features the interpreter does not advertise run only
/// for a KVM guest that picked them from the host's CPUID.
fn require_host_feature(cpu: &Cpu) -> XResult<()> {
    if cpu.host_features {
        Ok(())
    } else {
        Err(Exception::ud())
    }
}

fn clac_stac<const SET: bool>(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    require_host_feature(cpu)?;
    if cpu.protected() && cpu.cpl != 0 || cpu.vm86() {
        return Err(Exception::ud());
    }
    cpu.flags.set_bit(flags::AC, SET);
    cpu.tlb.flush_all();
    Ok(())
}

fn host_clflush(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    require_host_feature(cpu)?;
    clflush(cpu, p, d)
}

fn invpcid(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    require_host_feature(cpu)?;
    cpu.require_cpl0()?;
    let kind = cpu.reg(d.i.op0_register());
    let off = cpu.ea(d);
    let pcid = cpu.read_mem(p, d.seg as usize, off, 8)?;
    let lin = cpu.read_mem(p, d.seg as usize, off.wrapping_add(8) & d.amask, 8)?;
    if kind > 3 || pcid > 0xfff || (kind == 0 && !canonical(lin)) {
        return Err(Exception::gp0());
    }
    // The interpreter keeps no PCID-tagged entries: flush what it has.
    match kind {
        0 => cpu.tlb.flush_page(lin),
        1 | 3 => cpu.tlb.flush_nonglobal(),
        _ => cpu.tlb.flush_all(),
    }
    cpu.end_block = true;
    Ok(())
}

fn rdpid(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    require_host_feature(cpu)?;
    let v = cpu.msrs.tsc_aux;
    cpu.set_reg(d.i.op0_register(), v);
    Ok(())
}

fn cpuid(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    let leaf = cpu.gpr[gpr::RAX] as u32;
    let sub = cpu.gpr[gpr::RCX] as u32;
    let dy = crate::cpuid::Dynamic {
        osxsave: cpu.cr4 & CR4_OSXSAVE != 0,
        xcr0: cpu.xcr0,
        xss: cpu.xstate.xss,
    };
    let mut r = crate::cpuid::query_with(&cpu.cpuid_cfg, &dy, leaf, sub);
    if leaf == 1 && cpu.apic_base & crate::cpu::APIC_BASE_ENABLE == 0 {
        // CPUID.1:EDX.APIC follows IA32_APIC_BASE.EN (a globally disabled
        // APIC is not there).
        r[3] &= !crate::cpuid::leaf1_edx::APIC;
    }
    cpu.gpr[gpr::RAX] = u64::from(r[0]);
    cpu.gpr[gpr::RBX] = u64::from(r[1]);
    cpu.gpr[gpr::RCX] = u64::from(r[2]);
    cpu.gpr[gpr::RDX] = u64::from(r[3]);
    Ok(())
}

/// Valid PAT memory types: 0, 1, 4, 5, 6, 7.
fn pat_valid(v: u64) -> bool {
    (0..8).all(|k| matches!((v >> (8 * k)) & 0xff, 0 | 1 | 4 | 5 | 6 | 7))
}

const MTRR_PHYS_FIRST: u32 = crate::state::MTRR_VARIABLE_FIRST;
const MTRR_PHYS_LAST: u32 = MTRR_PHYS_FIRST + 15;
const MTRR_FIXED: [u32; 11] = crate::state::MTRR_FIXED_MSRS;

impl Cpu {
    /// RDMSR semantics; `None` means #GP (an MSR duet does not know).
    pub fn read_msr(&mut self, p: &mut dyn Platform, index: u32) -> Option<u64> {
        Some(match index {
            msr::TSC => self.read_tsc(p),
            msr::APIC_BASE => self.apic_base,
            msr::EFER => self.efer,
            msr::STAR => self.msrs.star,
            msr::LSTAR => self.msrs.lstar,
            msr::CSTAR => self.msrs.cstar,
            msr::SFMASK => self.msrs.sfmask,
            msr::FS_BASE => self.seg[sreg::FS].base,
            msr::GS_BASE => self.seg[sreg::GS].base,
            msr::KERNEL_GS_BASE => self.msrs.kernel_gs_base,
            msr::SYSENTER_CS => self.msrs.sysenter_cs,
            msr::SYSENTER_ESP => self.msrs.sysenter_esp,
            msr::SYSENTER_EIP => self.msrs.sysenter_eip,
            msr::PAT => self.msrs.pat,
            msr::TSC_AUX => self.msrs.tsc_aux,
            msr::MISC_ENABLE => self.msrs.misc_enable,
            msr::XSS if self.has(crate::cpuid::feat::XSAVES) => self.xstate.xss,
            // IA32_BIOS_SIGN_ID: microcode revision 0 (no microcode loaded).
            msr::BIOS_SIGN_ID => 0,
            // Read-only (writes #GP). Not for a KVM guest (`host_features`):
            // it saw KVM's CPUID and MSR, not the interpreter's.
            msr::ARCH_CAPABILITIES if !self.host_features => crate::cpuid::ARCH_CAPABILITIES,
            // 8 variable ranges, fixed ranges, write-combining.
            msr::MTRRCAP => 0x508,
            msr::MTRR_DEF_TYPE => *self.mtrr.get(&index).unwrap_or(&0xc06),
            MTRR_PHYS_FIRST..=MTRR_PHYS_LAST => *self.mtrr.get(&index).unwrap_or(&0),
            i if MTRR_FIXED.contains(&i) => {
                *self.mtrr.get(&index).unwrap_or(&0x0606_0606_0606_0606)
            }
            i if crate::mca::owns(i) => return self.mca.read(i),
            _ => return None,
        })
    }

    /// WRMSR semantics; `Err` is the #GP to raise.
    pub fn write_msr(&mut self, p: &mut dyn Platform, index: u32, v: u64) -> XResult<()> {
        let gp = Err(Exception::gp0());
        match index {
            msr::TSC => {
                let now = self.read_tsc(p).wrapping_sub(self.tsc_offset);
                self.tsc_offset = v.wrapping_sub(now);
            }
            msr::APIC_BASE => {
                if v & !0xf_ffff_fd00 != 0 {
                    return gp;
                }
                self.apic_base = v;
            }
            msr::EFER => {
                let allowed = EFER_SCE | EFER_LME | EFER_NXE | EFER_LMA;
                if v & !allowed != 0 {
                    return gp;
                }
                // LME cannot change while paging is on.
                if self.cr0 & CR0_PG != 0 && (v ^ self.efer) & EFER_LME != 0 {
                    return gp;
                }
                let lma = self.efer & EFER_LMA;
                self.efer = (v & !EFER_LMA) | lma;
                self.tlb.flush_all();
                self.end_block = true;
            }
            msr::STAR => self.msrs.star = v,
            msr::LSTAR
            | msr::CSTAR
            | msr::FS_BASE
            | msr::GS_BASE
            | msr::KERNEL_GS_BASE
            | msr::SYSENTER_ESP
            | msr::SYSENTER_EIP
                if !canonical(v) =>
            {
                return gp
            }
            msr::LSTAR => self.msrs.lstar = v,
            msr::CSTAR => self.msrs.cstar = v,
            msr::SFMASK => self.msrs.sfmask = v & 0xffff_ffff,
            msr::FS_BASE => self.seg[sreg::FS].base = v,
            msr::GS_BASE => self.seg[sreg::GS].base = v,
            msr::KERNEL_GS_BASE => self.msrs.kernel_gs_base = v,
            msr::SYSENTER_CS => self.msrs.sysenter_cs = v & 0xffff,
            msr::SYSENTER_ESP => self.msrs.sysenter_esp = v,
            msr::SYSENTER_EIP => self.msrs.sysenter_eip = v,
            msr::PAT => {
                if !pat_valid(v) {
                    return gp;
                }
                self.msrs.pat = v;
            }
            msr::TSC_AUX => {
                if v >> 32 != 0 {
                    return gp;
                }
                self.msrs.tsc_aux = v;
            }
            msr::MISC_ENABLE => self.msrs.misc_enable = v,
            // No supervisor state component is supported.
            msr::XSS if self.has(crate::cpuid::feat::XSAVES) && v == 0 => self.xstate.xss = 0,
            // Writing 0 before CPUID is how software asks for the revision.
            msr::BIOS_SIGN_ID => {}
            msr::MTRR_DEF_TYPE => {
                if v & !0xcff != 0 {
                    return gp;
                }
                self.mtrr.insert(index, v);
            }
            MTRR_PHYS_FIRST..=MTRR_PHYS_LAST => {
                self.mtrr.insert(index, v);
            }
            i if MTRR_FIXED.contains(&i) => {
                self.mtrr.insert(index, v);
            }
            i if crate::mca::owns(i) => return self.mca.write(i, v).or(gp),
            _ => return gp,
        }
        Ok(())
    }
}

fn rdmsr(cpu: &mut Cpu, p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    cpu.require_cpl0()?;
    if cpu.vm86() {
        return Err(Exception::gp0());
    }
    let idx = cpu.gpr[gpr::RCX] as u32;
    p.retired_hint(cpu.retired);
    let from_machine = match p.read_msr(idx) {
        crate::platform::MsrResult::Done(v) => Some(v),
        crate::platform::MsrResult::Fault => return Err(Exception::gp0()),
        crate::platform::MsrResult::Unhandled => cpu.read_msr(p, idx),
    };
    match from_machine {
        Some(v) => {
            cpu.gpr[gpr::RAX] = v & 0xffff_ffff;
            cpu.gpr[gpr::RDX] = v >> 32;
            Ok(())
        }
        None => {
            cpu.note_unknown_msr(idx, false);
            Err(Exception::gp0())
        }
    }
}

fn wrmsr(cpu: &mut Cpu, p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    cpu.require_cpl0()?;
    if cpu.vm86() {
        return Err(Exception::gp0());
    }
    let idx = cpu.gpr[gpr::RCX] as u32;
    let v = (cpu.gpr[gpr::RDX] << 32) | (cpu.gpr[gpr::RAX] & 0xffff_ffff);
    p.retired_hint(cpu.retired);
    match p.write_msr(idx, v) {
        crate::platform::MsrResult::Done(_) => {
            if idx == msr::APIC_BASE {
                cpu.apic_base = v;
            }
            // An EOI, TPR or ICR write may make an interrupt deliverable, a
            // timer MSR may move the next deadline: check at this boundary.
            cpu.io_happened = true;
            cpu.end_block = true;
            return Ok(());
        }
        crate::platform::MsrResult::Fault => return Err(Exception::gp0()),
        crate::platform::MsrResult::Unhandled => {}
    }
    let r = cpu.write_msr(p, idx, v);
    if r.is_err() && cpu.read_msr(p, idx).is_none() {
        cpu.note_unknown_msr(idx, true);
    }
    r
}

fn rdtsc(cpu: &mut Cpu, p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    if cpu.cr4 & CR4_TSD != 0 && cpu.cpl != 0 && cpu.protected() {
        return Err(Exception::gp0());
    }
    let t = cpu.read_tsc(p);
    cpu.gpr[gpr::RAX] = t & 0xffff_ffff;
    cpu.gpr[gpr::RDX] = t >> 32;
    Ok(())
}

fn rdtscp(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    rdtsc(cpu, p, d)?;
    cpu.gpr[gpr::RCX] = cpu.msrs.tsc_aux & 0xffff_ffff;
    Ok(())
}

fn rdpmc(_cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    // No performance counters exist.
    Err(Exception::gp0())
}

fn swapgs(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    if cpu.bits != 64 {
        return Err(Exception::ud());
    }
    cpu.require_cpl0()?;
    std::mem::swap(&mut cpu.seg[sreg::GS].base, &mut cpu.msrs.kernel_gs_base);
    Ok(())
}

/// A flat code or data segment for SYSCALL/SYSENTER and their returns.
fn flat_segment(sel: u16, code: bool, long: bool, dpl: u8) -> Segment {
    Segment {
        selector: sel,
        base: 0,
        limit: 0xffff_ffff,
        type_: if code { 0xb } else { 0x3 },
        s: true,
        dpl,
        present: true,
        avl: false,
        l: code && long,
        db: !(code && long),
        g: true,
        unusable: false,
    }
}

fn syscall(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    // Intel: SYSCALL exists only in 64-bit mode.
    if cpu.bits != 64 || cpu.efer & EFER_SCE == 0 {
        return Err(Exception::ud());
    }
    let sel = ((cpu.msrs.star >> 32) & 0xffff) as u16;
    cpu.gpr[gpr::RCX] = cpu.rip;
    cpu.gpr[gpr::R11] = cpu.flags.get() & !flags::RF;
    let f = cpu.flags.get() & !cpu.msrs.sfmask & !flags::RF;
    cpu.flags.set(f);
    cpu.seg[sreg::CS] = flat_segment(sel & 0xfffc, true, true, 0);
    cpu.seg[sreg::SS] = flat_segment((sel & 0xfffc).wrapping_add(8), false, false, 0);
    cpu.cpl = 0;
    cpu.rip = cpu.msrs.lstar;
    cpu.update_mode();
    cpu.end_block = true;
    Ok(())
}

fn sysret(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    if cpu.bits != 64 || cpu.efer & EFER_SCE == 0 {
        return Err(Exception::ud());
    }
    cpu.require_cpl0()?;
    let to64 = d.i.mnemonic() == Mnemonic::Sysretq;
    let rcx = cpu.gpr[gpr::RCX];
    if to64 && !canonical(rcx) {
        return Err(Exception::gp0());
    }
    let base = ((cpu.msrs.star >> 48) & 0xffff) as u16;
    let cs_sel = if to64 { base.wrapping_add(16) } else { base } | 3;
    cpu.seg[sreg::CS] = flat_segment(cs_sel, true, to64, 3);
    // SS keeps the selector from STAR; its cache becomes a flat DPL 3 data segment.
    cpu.seg[sreg::SS] = flat_segment(base.wrapping_add(8) | 3, false, false, 3);
    let f = (cpu.gpr[gpr::R11] & !(flags::RF | flags::VM)) | flags::FIXED1;
    cpu.flags.set(f);
    cpu.cpl = 3;
    cpu.rip = if to64 { rcx } else { rcx & 0xffff_ffff };
    cpu.update_mode();
    cpu.end_block = true;
    Ok(())
}

fn sysenter(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    if !cpu.protected() {
        return Err(Exception::gp0());
    }
    let cs = (cpu.msrs.sysenter_cs & 0xfffc) as u16;
    if cs == 0 {
        return Err(Exception::gp0());
    }
    let long = cpu.long_mode();
    cpu.flags.set_bit(flags::VM, false);
    cpu.flags.set_bit(flags::IF, false);
    cpu.flags.set_bit(flags::RF, false);
    cpu.seg[sreg::CS] = flat_segment(cs, true, long, 0);
    cpu.seg[sreg::SS] = flat_segment(cs.wrapping_add(8), false, false, 0);
    cpu.cpl = 0;
    cpu.gpr[gpr::RSP] = if long {
        cpu.msrs.sysenter_esp
    } else {
        cpu.msrs.sysenter_esp & 0xffff_ffff
    };
    cpu.rip = if long {
        cpu.msrs.sysenter_eip
    } else {
        cpu.msrs.sysenter_eip & 0xffff_ffff
    };
    cpu.update_mode();
    cpu.end_block = true;
    Ok(())
}

fn sysexit(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    let cs = (cpu.msrs.sysenter_cs & 0xfffc) as u16;
    if !cpu.protected() || cpu.vm86() || cpu.cpl != 0 || cs == 0 {
        return Err(Exception::gp0());
    }
    let to64 = d.i.mnemonic() == Mnemonic::Sysexitq;
    let (rip, rsp) = (cpu.gpr[gpr::RDX], cpu.gpr[gpr::RCX]);
    if to64 && (!canonical(rip) || !canonical(rsp)) {
        return Err(Exception::gp0());
    }
    let (cs_sel, ss_sel) = if to64 {
        (cs.wrapping_add(32) | 3, cs.wrapping_add(40) | 3)
    } else {
        (cs.wrapping_add(16) | 3, cs.wrapping_add(24) | 3)
    };
    cpu.seg[sreg::CS] = flat_segment(cs_sel, true, to64, 3);
    cpu.seg[sreg::SS] = flat_segment(ss_sel, false, false, 3);
    cpu.cpl = 3;
    cpu.gpr[gpr::RSP] = if to64 { rsp } else { rsp & 0xffff_ffff };
    cpu.rip = if to64 { rip } else { rip & 0xffff_ffff };
    cpu.update_mode();
    cpu.end_block = true;
    Ok(())
}

/// LAR / LSL: load access rights or the segment limit if the selector is
/// visible at the current privilege; ZF tells.
fn lar_lsl<const LAR: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    if !cpu.protected() || cpu.vm86() {
        return Err(Exception::ud());
    }
    let sel = cpu.op_read(p, d, 1, 2)? as u16;
    let ok = match descriptor_visible(cpu, p, sel)? {
        Some((raw, s)) => {
            let valid_type = if s.s {
                true
            } else if LAR {
                matches!(s.type_, 1 | 2 | 3 | 4 | 5 | 9 | 0xb | 0xc)
                    && !(cpu.long_mode() && matches!(s.type_, 1 | 3 | 4 | 5))
            } else {
                matches!(s.type_, 1 | 2 | 3 | 9 | 0xb)
                    && !(cpu.long_mode() && matches!(s.type_, 1 | 3))
            };
            if valid_type {
                let v = if LAR {
                    (raw >> 32) & 0x00f0_ff00
                } else {
                    u64::from(s.limit)
                };
                let size = d.size as usize;
                cpu.set_reg(d.i.op0_register(), v & mask(size));
                true
            } else {
                false
            }
        }
        None => false,
    };
    cpu.flags
        .update_arith(flags::ZF, if ok { flags::ZF } else { 0 });
    Ok(())
}

/// The descriptor for `sel` if it exists and passes the DPL checks of
/// LAR/LSL/VERR/VERW (conforming code is always visible).
fn descriptor_visible(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    sel: u16,
) -> XResult<Option<(u64, Segment)>> {
    if sel & !3 == 0 {
        return Ok(None);
    }
    let raw = match cpu.read_descriptor(p, sel) {
        Ok(r) => r,
        Err(e) if e.vector == crate::exception::GP => return Ok(None),
        Err(e) => return Err(e),
    };
    let s = parse_descriptor(raw);
    let conforming = is_code(&s) && s.type_ & 4 != 0;
    let rpl = (sel & 3) as u8;
    if !conforming && (s.dpl < cpu.cpl || s.dpl < rpl) {
        return Ok(None);
    }
    Ok(Some((raw, s)))
}

fn verr_verw<const WRITE: bool>(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    if !cpu.protected() || cpu.vm86() {
        return Err(Exception::ud());
    }
    let sel = cpu.op_read(p, d, 0, 2)? as u16;
    let ok = match descriptor_visible(cpu, p, sel)? {
        Some((_, s)) if s.s => {
            if WRITE {
                !is_code(&s) && s.type_ & 2 != 0
            } else {
                !is_code(&s) || s.type_ & 2 != 0
            }
        }
        _ => false,
    };
    cpu.flags
        .update_arith(flags::ZF, if ok { flags::ZF } else { 0 });
    Ok(())
}

fn arpl(cpu: &mut Cpu, p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    if !cpu.protected() || cpu.vm86() {
        return Err(Exception::ud());
    }
    let dst = cpu.op_read(p, d, 0, 2)?;
    let src = cpu.op_read(p, d, 1, 2)?;
    if dst & 3 < src & 3 {
        cpu.op0_write(p, d, 2, (dst & !3) | (src & 3))?;
        cpu.flags.update_arith(flags::ZF, flags::ZF);
    } else {
        cpu.flags.update_arith(flags::ZF, 0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::cpu::*;
    use crate::flags::*;
    use crate::insn::testutil::*;
    use crate::state::gpr::*;

    #[test]
    fn cli_sti_flags_cpuid() {
        // sti (fb) ; cli (fa) ; stc (f9) ; cmc (f5) ; std (fd) ; cpuid (0f a2)
        let code = [0xfb, 0xfa, 0xf9, 0xf5, 0xfd, 0x0f, 0xa2];
        let c = run(Mode::Prot32, &code, |c| c.set_gpr(RAX, 0));
        assert_eq!(c.rflags() & (IF | CF | DF), DF);
        assert_eq!(c.gpr(RBX) as u32, u32::from_le_bytes(*b"Genu"));
    }

    #[test]
    fn lgdt_sgdt_and_control_registers_32() {
        // lgdt [0x2000] (0f 01 15 00 20 00 00) ; sgdt [0x2010] (0f 01 05 10 20 00 00)
        // mov eax, cr0 (0f 20 c0) ; or eax, 0x10000 (0d 00 00 01 00) ; mov cr0, eax (0f 22 c0)
        let code = [
            0x0f, 0x01, 0x15, 0x00, 0x20, 0, 0, 0x0f, 0x01, 0x05, 0x10, 0x20, 0, 0, 0x0f, 0x20,
            0xc0, 0x0d, 0x00, 0x00, 0x01, 0x00, 0x0f, 0x22, 0xc0,
        ];
        let c = run(Mode::Prot32, &code, |c| {
            // A copy of the harness GDT's descriptor (same base) so segments stay valid.
            write_phys(c, 0x2000, &[0x37, 0x00, 0x00, 0x05, 0x00, 0x00]);
        });
        assert_eq!(read_phys(&c, 0x2010, 2), 0x37);
        assert_eq!(read_phys(&c, 0x2012, 4), 0x500);
        assert_ne!(c.state().sregs.cr0 & CR0_WP, 0);
    }

    /// LTR/LLDT in 64-bit mode take a 16-byte descriptor whose base must
    /// be canonical: #GP(selector) otherwise, and the TSS is not marked
    /// busy.
    #[test]
    fn ltr_lldt_need_a_canonical_base_in_long_mode() {
        // ltr ax (0f 00 d8) / lldt ax (0f 00 d0), with a #GP gate to a HLT.
        for (insn, type_) in [([0x0f, 0x00, 0xd8], 9u64), ([0x0f, 0x00, 0xd0], 2)] {
            for (hi, ok) in [(0xffff_ffffu64, true), (0x0000_8000, false), (0, true)] {
                let c = run(Mode::Long64, &insn, |c| {
                    // Descriptor 7 (selector 0x38): base 0x1234_5000 | hi << 32.
                    let lo: u64 = 0x67
                        | (0x5000 << 16)
                        | (0x34 << 32)
                        | ((0x80 | type_) << 40)
                        | (0x12 << 56);
                    write_phys(c, GDT + 7 * 8, &lo.to_le_bytes());
                    write_phys(c, GDT + 8 * 8, &hi.to_le_bytes());
                    let mut s = c.state();
                    s.sregs.gdt.limit = 9 * 8 - 1;
                    c.set_state(&s);
                    c.set_gpr(RAX, 0x38);
                    let h = 0x4000u64;
                    let g = (h & 0xffff) | (0x18 << 16) | (0x8e00 << 32);
                    write_phys(c, crate::insn::testutil::IDT + 16 * 13, &g.to_le_bytes());
                    write_phys(c, h, &[0xf4]);
                });
                let faulted = c.rip() == 0x4001;
                assert_eq!(faulted, !ok, "type {type_} high {hi:#x}");
                let s = c.state();
                if ok {
                    let seg = if type_ == 9 { s.sregs.tr } else { s.sregs.ldt };
                    assert_eq!(seg.base, 0x1234_5000 | (hi << 32));
                } else {
                    assert_eq!(read_phys(&c, c.gpr(RSP), 8), 0x38, "error code");
                    // Not marked busy.
                    assert_eq!(read_phys(&c, GDT + 7 * 8 + 5, 1), 0x80 | type_);
                }
            }
        }
    }

    /// CPUID.1:EDX.APIC reads 0 while IA32_APIC_BASE.EN is clear.
    #[test]
    fn cpuid_apic_bit_follows_the_apic_base_enable() {
        // cpuid (0f a2)
        for (base, apic) in [(0xfee0_0900u64, true), (0xfee0_0100, false)] {
            let c = run(Mode::Long64, &[0x0f, 0xa2], |c| {
                c.set_cpuid_config(crate::cpuid::CpuidConfig {
                    apic: true,
                    ..Default::default()
                });
                let mut s = c.state();
                s.sregs.apic_base = base;
                c.set_state(&s);
                c.set_gpr(RAX, 1);
            });
            assert_eq!(c.gpr(RDX) & (1 << 9) != 0, apic, "base {base:#x}");
        }
    }

    #[test]
    fn cr0_reserved_bits_are_ignored_and_the_upper_half_faults() {
        // mov cr0, eax (0f 22 c0) with bit 6 (reserved) set: no #GP, the bit
        // reads back as 0 (as KVM and the processors do); in 64-bit mode a
        // bit of 63:32 is #GP(0).
        let c = run(Mode::Prot32, &[0x0f, 0x22, 0xc0], |c| {
            c.set_gpr(RAX, CR0_PE | CR0_ET | (1 << 6));
        });
        assert_eq!(c.state().sregs.cr0, CR0_PE | CR0_ET);
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        write_phys(&c, CODE, &[0x0f, 0x22, 0xc0]);
        c.set_gpr(RAX, c.state().sregs.cr0 | (1 << 40));
        let mut p = TestPlatform::default();
        let insn = c.decode_one(&mut p).expect("decodable");
        let e = (insn.h)(&mut c, &mut p, &insn).expect_err("#GP");
        assert_eq!(e.vector, crate::exception::GP);
    }

    #[test]
    fn msr_round_trip_and_unknown_msr_faults() {
        // wrmsr (0f 30) to STAR ; rdmsr (0f 32) from LSTAR (set through the state)
        let code = [0x0f, 0x30, 0xb9, 0x82, 0x00, 0x00, 0xc0, 0x0f, 0x32];
        let c = run(Mode::Long64, &code, |c| {
            c.set_gpr(RCX, 0xc000_0081);
            c.set_gpr(RAX, 0x1111);
            c.set_gpr(RDX, 0x2222);
            let mut s = c.state();
            s.msrs.lstar = 0xffff_ffff_8100_0000;
            c.set_state(&s);
        });
        assert_eq!(c.state().msrs.star, 0x2222_0000_1111);
        assert_eq!(c.gpr(RAX), 0x8100_0000);
        assert_eq!(c.gpr(RDX), 0xffff_ffff);
    }

    #[test]
    fn host_feature_instructions_need_the_host_flag() {
        // stac (0f 01 cb) raises #UD on the interpreter's own CPU...
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        write_phys(&c, CODE, &[0x0f, 0x01, 0xcb, 0xf4]);
        let mut p = TestPlatform::default();
        // (the harness's IDT is empty, so the #UD escalates to a triple fault)
        assert_eq!(c.step(&mut p), Some(CpuExit::TripleFault));
        // With host features (KVM fallback) it sets AC; clac clears it.
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        c.set_host_features(true);
        write_phys(&c, CODE, &[0x0f, 0x01, 0xcb, 0x0f, 0x01, 0xca]);
        c.step(&mut p);
        assert_ne!(c.rflags() & AC, 0);
        c.step(&mut p);
        assert_eq!(c.rflags() & AC, 0);
        assert_eq!(c.rip(), CODE + 6);
    }

    #[test]
    fn syscall_sysret_round_trip() {
        // User side: syscall ; syscall. Kernel at 0x4000:
        // inc ebx (ff c3) ; cmp ebx, 2 (83 fb 02) ; je done (74 03) ; sysretq (48 0f 07) ; done: hlt
        let code = [0x0f, 0x05, 0x0f, 0x05];
        let c = run(Mode::Long64, &code, |c| {
            write_phys(
                c,
                0x4000,
                &[
                    0xff, 0xc3, 0x83, 0xfb, 0x02, 0x74, 0x03, 0x48, 0x0f, 0x07, 0xf4,
                ],
            );
            let mut s = c.state();
            s.sregs.efer |= EFER_SCE;
            s.msrs.lstar = 0x4000;
            s.msrs.sfmask = IF;
            // Kernel CS 0x18 (SS 0x20); user base 0x20 -> CS 0x33, SS 0x2b.
            s.msrs.star = (0x20u64 << 48) | (0x18u64 << 32);
            c.set_state(&s);
        });
        assert_eq!(c.gpr(RBX), 2);
        // Second syscall came from ring 3 right after the first one.
        assert_eq!(c.gpr(RCX), CODE + 4);
        let s = c.state();
        assert_eq!(s.sregs.cs.selector, 0x18);
        assert_eq!(s.sregs.ss.selector, 0x20);
    }
}
