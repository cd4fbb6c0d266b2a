//! The XSAVE feature set (SDM vol. 1, chapter 13): XGETBV, XSETBV, XSAVE,
//! XSAVEOPT, XSAVEC, XSAVES, XRSTOR (standard and compacted forms) and
//! XRSTORS, over the state components the CPU has:
//!
//! | i | component | where |
//! |---|---|---|
//! | 0 | x87 | `Fpu` (legacy region bytes 0..24, 32..160) |
//! | 1 | SSE (XMM, MXCSR) | `Fpu` (bytes 24..32, 160..416) |
//! | 2 | AVX (YMM bits 255:128) | `Fpu::ymm_hi` (offset 576, 256 bytes) |
//! | 5, 6, 7 | AVX-512 opmask, ZMM_Hi256, Hi16_ZMM | `XState`, carried only |
//! | 9 | PKRU | `XState`, carried only |
//!
//! duet's own CPUID offers components 0–2; a KVM guest's may offer the
//! AVX-512 and PKRU components too (KVM-PVM forces the host's into the
//! guest), and the KVM backend's fallback then runs these instructions
//! over them (`Cpu::set_xsave_components`). No supervisor component is
//! supported, so IA32_XSS stays 0 and XSAVES/XRSTORS act on user state.
//!
//! XINUSE (which components may be out of their initial configuration,
//! SDM 13.6) is tracked as the hardware oracle shows it: XRSTOR sets it
//! from XSTATE_BV, any write to an XMM register sets the SSE bit, a write
//! of a YMM register (even of zeros) or of an XMM register by a VEX.256
//! instruction (VEXTRACTF128, VCVTPD2PS xmm, ymm) the AVX bit too,
//! VZEROUPPER clears the AVX bit and VZEROALL the AVX bit and, when MXCSR
//! is 1F80H, the SSE bit; (V)LDMXCSR sets the SSE bit; a VEX.128 write
//! leaves the AVX bit as it was. A component whose contents
//! are not the initial ones always counts as in use. XSAVEOPT, XSAVEC and XSAVES use the init optimization (components
//! not in use are not written); none uses the modified optimization, which
//! the SDM leaves optional.

use iced_x86::Mnemonic;

use crate::block::Insn;
use crate::cpu::{sreg, Cpu, CR0_TS, CR4_OSXSAVE};
use crate::cpuid::feat;
use crate::dispatch::Table;
use crate::exception::{Exception, XResult};
use crate::fpu::{FCW_INIT, FCW_RESERVED, MXCSR_INIT, MXCSR_MASK};
use crate::platform::Platform;
use crate::state::gpr;

pub const X87: u64 = 1 << 0;
pub const SSE: u64 = 1 << 1;
pub const AVX: u64 = 1 << 2;
pub const OPMASK: u64 = 1 << 5;
pub const ZMM_HI256: u64 = 1 << 6;
pub const HI16_ZMM: u64 = 1 << 7;
pub const PKRU: u64 = 1 << 9;
/// The AVX-512 components, enabled together.
pub const AVX512: u64 = OPMASK | ZMM_HI256 | HI16_ZMM;
/// Every component the CPU can hold.
pub const CARRIED: u64 = X87 | SSE | AVX | AVX512 | PKRU;

/// Size of the legacy region plus the XSAVE header.
const HEADER_END: usize = 576;
const XSTATE_BV: usize = 512;
/// XCOMP_BV bit 63: compacted format.
const COMPACTED: u64 = 1 << 63;

/// (standard-format offset, size) of the extended components 2..=9.
const EXTENDED: [(usize, usize, usize); 5] = [
    (2, 576, 256),
    (5, 1088, 64),
    (6, 1152, 512),
    (7, 1664, 1024),
    (9, 2688, 8),
];

pub fn register(t: &mut Table) {
    t.set_mnemonic(Mnemonic::Xgetbv, xgetbv);
    t.set_mnemonic(Mnemonic::Xsetbv, xsetbv);
    t.set_mnemonic(Mnemonic::Xsave, save::<false, STD>);
    t.set_mnemonic(Mnemonic::Xsave64, save::<true, STD>);
    t.set_mnemonic(Mnemonic::Xsaveopt, save::<false, OPT>);
    t.set_mnemonic(Mnemonic::Xsaveopt64, save::<true, OPT>);
    t.set_mnemonic(Mnemonic::Xsavec, save::<false, COMPACT>);
    t.set_mnemonic(Mnemonic::Xsavec64, save::<true, COMPACT>);
    t.set_mnemonic(Mnemonic::Xsaves, save::<false, SUPER>);
    t.set_mnemonic(Mnemonic::Xsaves64, save::<true, SUPER>);
    t.set_mnemonic(Mnemonic::Xrstor, restore::<false, false>);
    t.set_mnemonic(Mnemonic::Xrstor64, restore::<true, false>);
    t.set_mnemonic(Mnemonic::Xrstors, restore::<false, true>);
    t.set_mnemonic(Mnemonic::Xrstors64, restore::<true, true>);
}

/// Which save instruction.
const STD: u8 = 0;
const OPT: u8 = 1;
const COMPACT: u8 = 2;
const SUPER: u8 = 3;

// ---- component state --------------------------------------------------------

impl Cpu {
    /// XINUSE as the save instructions report it: the tracked bits, plus
    /// every component whose contents are not the initial ones.
    pub(crate) fn xinuse(&self) -> u64 {
        let f = &self.fpu;
        let x = &self.xstate;
        let mut v = x.xinuse;
        let x87_init = f.fcw == FCW_INIT
            && f.fsw == 0
            && f.ftw == 0xffff
            && f.fop == 0
            && f.fip == 0
            && f.fdp == 0
            && f.fcs == 0
            && f.fds == 0
            && f.regs.iter().all(|&r| r == 0);
        if !x87_init {
            v |= X87;
        }
        if f.xmm.iter().any(|&r| r != 0) {
            v |= SSE;
        }
        if f.ymm_hi.iter().any(|&r| r != 0) {
            v |= AVX;
        }
        if x.opmask.iter().any(|&r| r != 0) {
            v |= OPMASK;
        }
        if x.zmm_hi256.iter().flatten().any(|&r| r != 0) {
            v |= ZMM_HI256;
        }
        if x.hi16_zmm.iter().flatten().any(|&r| r != 0) {
            v |= HI16_ZMM;
        }
        if x.pkru != 0 {
            v |= PKRU;
        }
        v & CARRIED
    }

    /// XINUSE as XSAVEC/XSAVES store it and XGETBV(1) reports it: the
    /// SSE bit also covers MXCSR there (a compacted XRSTOR sets MXCSR to
    /// 1F80H when XSTATE_BV[1] is clear), so it is set while MXCSR is not
    /// 1F80H. For every save form, LDMXCSR of any value sets XINUSE[1]
    /// like a write of an XMM register, until VZEROALL or an XRSTOR whose
    /// RFBM[1] is set (the hardware oracle, fix 46: VZEROALL, LDMXCSR
    /// 1F80H, XSAVE stores XSTATE_BV[1] = 1 and XSAVEOPT writes the XMM
    /// area; an XRSTOR of the x87 or AVX component alone leaves it set).
    pub(crate) fn xinuse_compacted(&self) -> u64 {
        let mx = self.fpu.mxcsr != MXCSR_INIT;
        self.xinuse() | if mx { SSE } else { 0 }
    }

    /// Contents of extended component `i` as stored in an XSAVE area.
    fn component_bytes(&self, i: usize) -> Vec<u8> {
        let x = &self.xstate;
        match i {
            2 => self
                .fpu
                .ymm_hi
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            5 => x.opmask.iter().flat_map(|v| v.to_le_bytes()).collect(),
            6 => x
                .zmm_hi256
                .iter()
                .flatten()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            7 => x
                .hi16_zmm
                .iter()
                .flatten()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            _ => {
                let mut b = x.pkru.to_le_bytes().to_vec();
                b.extend_from_slice(&[0; 4]);
                b
            }
        }
    }

    /// Load extended component `i` from XSAVE-area bytes (all zeros: the
    /// initial configuration).
    fn set_component(&mut self, i: usize, b: &[u8]) {
        let u128_at = |k: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[16 * k..16 * k + 16]);
            u128::from_le_bytes(a)
        };
        let x = &mut self.xstate;
        match i {
            2 => {
                for (k, y) in self.fpu.ymm_hi.iter_mut().enumerate() {
                    *y = u128_at(k);
                }
            }
            5 => {
                for (k, m) in x.opmask.iter_mut().enumerate() {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&b[8 * k..8 * k + 8]);
                    *m = u64::from_le_bytes(a);
                }
            }
            6 => {
                for (k, z) in x.zmm_hi256.iter_mut().enumerate() {
                    *z = [u128_at(2 * k), u128_at(2 * k + 1)];
                }
            }
            7 => {
                for (k, z) in x.hi16_zmm.iter_mut().enumerate() {
                    *z = [
                        u128_at(4 * k),
                        u128_at(4 * k + 1),
                        u128_at(4 * k + 2),
                        u128_at(4 * k + 3),
                    ];
                }
            }
            _ => x.pkru = u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }

    /// The x87 part of the legacy region (bytes 0..24 and 32..160) in
    /// FXSAVE layout; `rex_w`: 64-bit FIP/FDP.
    fn x87_image(&self, img: &mut [u8], rex_w: bool) {
        let f = &self.fpu;
        img[0..2].copy_from_slice(&f.fcw.to_le_bytes());
        img[2..4].copy_from_slice(&f.fsw.to_le_bytes());
        img[4] = f.abridged_tags();
        img[5] = 0;
        img[6..8].copy_from_slice(&(f.fop & 0x7ff).to_le_bytes());
        if rex_w {
            img[8..16].copy_from_slice(&f.fip.to_le_bytes());
            img[16..24].copy_from_slice(&f.fdp.to_le_bytes());
        } else {
            img[8..12].copy_from_slice(&(f.fip as u32).to_le_bytes());
            img[12..14].copy_from_slice(&f.fcs.to_le_bytes());
            img[14..16].fill(0);
            img[16..20].copy_from_slice(&(f.fdp as u32).to_le_bytes());
            img[20..22].copy_from_slice(&f.fds.to_le_bytes());
            img[22..24].fill(0);
        }
        for i in 0..8 {
            let at = 32 + 16 * i;
            img[at..at + 16].fill(0);
            img[at..at + 10].copy_from_slice(&f.st(i).to_le_bytes()[..10]);
        }
    }

    /// Load the x87 state from a legacy-region image (as FXRSTOR does).
    fn load_x87(&mut self, img: &[u8], rex_w: bool) {
        let g16 = |k: usize| u16::from_le_bytes([img[k], img[k + 1]]);
        let g32 = |k: usize| u32::from_le_bytes([img[k], img[k + 1], img[k + 2], img[k + 3]]);
        let f = &mut self.fpu;
        f.fcw = (g16(0) & !FCW_RESERVED) | 0x40;
        f.fsw = g16(2);
        f.fop = g16(6) & 0x7ff;
        if rex_w {
            f.fip = u64::from(g32(8)) | (u64::from(g32(12)) << 32);
            f.fdp = u64::from(g32(16)) | (u64::from(g32(20)) << 32);
            f.fcs = 0;
            f.fds = 0;
        } else {
            f.fip = u64::from(g32(8));
            f.fcs = g16(12);
            f.fdp = u64::from(g32(16));
            f.fds = g16(20);
        }
        for i in 0..8 {
            let at = 32 + 16 * i;
            let mut w = [0u8; 16];
            w[..10].copy_from_slice(&img[at..at + 10]);
            let r = f.phys(i);
            f.regs[r] = u128::from_le_bytes(w);
        }
        f.set_abridged_tags(img[4]);
    }

    /// The x87 state's initial configuration.
    fn init_x87(&mut self) {
        let f = &mut self.fpu;
        f.init();
        f.regs = [0; 8];
    }

    /// XMM registers an XSAVE-family instruction covers in this mode.
    fn xsave_nregs(&self) -> usize {
        if self.bits == 64 {
            16
        } else {
            8
        }
    }
}

// ---- XGETBV / XSETBV ----------------------------------------------------------

fn xgetbv(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    if cpu.cr4 & CR4_OSXSAVE == 0 {
        return Err(Exception::ud());
    }
    let v = match cpu.gpr[gpr::RCX] as u32 {
        0 => cpu.xcr0,
        1 if cpu.has(feat::XGETBV1) => cpu.xcr0 & cpu.xinuse_compacted(),
        _ => return Err(Exception::gp0()),
    };
    cpu.gpr[gpr::RAX] = v & 0xffff_ffff;
    cpu.gpr[gpr::RDX] = v >> 32;
    Ok(())
}

/// Is `v` a value XSETBV accepts for XCR0 on a CPU supporting `mask`?
pub fn xcr0_valid(v: u64, mask: u64) -> bool {
    v & X87 != 0
        && v & !mask == 0
        && (v & AVX == 0 || v & SSE != 0)
        && (v & AVX512 == 0 || (v & AVX512 == AVX512 && v & AVX != 0))
}

fn xsetbv(cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    if cpu.cr4 & CR4_OSXSAVE == 0 {
        return Err(Exception::ud());
    }
    if cpu.vm86() {
        return Err(Exception::gp0());
    }
    cpu.require_cpl0()?;
    let v = (cpu.gpr[gpr::RDX] << 32) | (cpu.gpr[gpr::RAX] & 0xffff_ffff);
    if cpu.gpr[gpr::RCX] as u32 != 0 || !xcr0_valid(v, cpu.xcr0_mask) {
        return Err(Exception::gp0());
    }
    cpu.xcr0 = v;
    Ok(())
}

// ---- the XSAVE area -------------------------------------------------------------

/// Common checks: #UD without CR4.OSXSAVE, #NM with CR0.TS, #GP(0) for
/// XSAVES/XRSTORS above CPL 0 and for an area not 64-byte aligned. Returns
/// the area's linear address after the segment checks for `size` bytes.
fn area(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
    supervisor: bool,
    size: usize,
    write: bool,
) -> XResult<u64> {
    if cpu.cr4 & CR4_OSXSAVE == 0 {
        return Err(Exception::ud());
    }
    if cpu.cr0 & CR0_TS != 0 {
        return Err(Exception::nm());
    }
    if supervisor && cpu.protected() && cpu.cpl != 0 {
        return Err(Exception::gp0());
    }
    let off = cpu.ea(d);
    let seg = d.seg as usize;
    let raw = if cpu.bits == 64 && seg < sreg::FS {
        off
    } else {
        cpu.seg[seg].base.wrapping_add(off)
    };
    if raw & 63 != 0 {
        return Err(Exception::gp0());
    }
    cpu.linear_access(p, seg, off, size as u64, write)
}

/// Offsets of the extended components of `xcomp` in the compacted format
/// (none of the carried components needs 64-byte alignment), and the size
/// of the whole area.
fn compacted_layout(xcomp: u64) -> (Vec<(usize, usize, usize)>, usize) {
    let mut at = HEADER_END;
    let mut v = Vec::new();
    for &(i, _, size) in EXTENDED.iter() {
        if xcomp & (1 << i) != 0 {
            v.push((i, at, size));
            at += size;
        }
    }
    (v, at)
}

fn standard_size(rfbm: u64) -> usize {
    EXTENDED
        .iter()
        .filter(|e| rfbm & (1 << e.0) != 0)
        .map(|e| e.1 + e.2)
        .max()
        .unwrap_or(HEADER_END)
        .max(HEADER_END)
}

fn edx_eax(cpu: &Cpu) -> u64 {
    ((cpu.gpr[gpr::RDX] & 0xffff_ffff) << 32) | (cpu.gpr[gpr::RAX] & 0xffff_ffff)
}

fn get64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// XSAVE / XSAVEOPT (standard format) and XSAVEC / XSAVES (compacted).
fn save<const REX_W: bool, const KIND: u8>(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    let supervisor = KIND == SUPER;
    let enabled = cpu.xcr0 | if supervisor { cpu.xstate.xss } else { 0 };
    let rfbm = edx_eax(cpu) & enabled;
    let compacted = KIND == COMPACT || KIND == SUPER;
    let (layout, size) = if compacted {
        compacted_layout(rfbm)
    } else {
        (
            EXTENDED
                .iter()
                .filter(|e| rfbm & (1 << e.0) != 0)
                .copied()
                .collect(),
            standard_size(rfbm),
        )
    };
    let lin = area(cpu, p, d, supervisor, size, true)?;
    let inuse = if compacted {
        cpu.xinuse_compacted()
    } else {
        cpu.xinuse()
    };
    // The init optimization: XSAVEOPT, XSAVEC and XSAVES skip components
    // not in use.
    let optimized = KIND != STD;
    let saves = |i: u64| rfbm & i != 0 && (!optimized || inuse & i != 0);

    // Every byte the instruction may write is checked before the first
    // write: the first and the last byte of the area first (a fault there
    // is what the processor reports), then the legacy region and header,
    // and the components saved.
    let mask = cpu.lin_mask();
    cpu.probe_lin_range(p, lin, 1, true)?;
    cpu.probe_lin_range(p, lin.wrapping_add(size as u64 - 1) & mask, 1, true)?;
    cpu.probe_lin_range(p, lin, HEADER_END, true)?;
    for &(_, at, len) in &layout {
        cpu.probe_lin_range(p, lin.wrapping_add(at as u64) & cpu.lin_mask(), len, true)?;
    }
    let mut header = [0u8; 64];
    if !compacted {
        cpu.read_lin_bytes(
            p,
            lin.wrapping_add(XSTATE_BV as u64) & cpu.lin_mask(),
            &mut header[..8],
        )?;
    }

    let mut img = [0u8; 512];
    let mut writes: Vec<(usize, Vec<u8>)> = Vec::new();
    if saves(X87) {
        cpu.x87_image(&mut img, REX_W);
        writes.push((0, img[0..24].to_vec()));
        writes.push((32, img[32..160].to_vec()));
    }
    // The compacted forms store MXCSR with the SSE component, so the init
    // optimization skips it too (the hardware oracle: after VZEROALL with
    // MXCSR = 1F80H, XSAVEC leaves bytes 24..32 alone).
    let mxcsr = if compacted {
        saves(SSE)
    } else {
        rfbm & (SSE | AVX) != 0
    };
    if mxcsr {
        let mut m = cpu.fpu.mxcsr.to_le_bytes().to_vec();
        m.extend_from_slice(&MXCSR_MASK.to_le_bytes());
        writes.push((24, m));
    }
    if saves(SSE) {
        let n = cpu.xsave_nregs();
        let b: Vec<u8> = cpu.fpu.xmm[..n]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        writes.push((160, b));
    }
    for &(i, at, len) in &layout {
        if !saves(1 << i) {
            continue;
        }
        let mut b = cpu.component_bytes(i);
        if i == 2 && cpu.bits != 64 {
            // YMM8..15 are not saved outside 64-bit mode.
            b.truncate(128);
        }
        debug_assert!(b.len() <= len);
        writes.push((at, b));
    }
    if compacted {
        header[..8].copy_from_slice(&(inuse & rfbm).to_le_bytes());
        header[8..16].copy_from_slice(&(COMPACTED | rfbm).to_le_bytes());
        writes.push((XSTATE_BV, header[..16].to_vec()));
    } else {
        let old = get64(&header, 0);
        let bv = (old & !rfbm) | (inuse & rfbm);
        writes.push((XSTATE_BV, bv.to_le_bytes().to_vec()));
    }
    for (at, b) in writes {
        cpu.write_lin_bytes(p, lin.wrapping_add(at as u64) & mask, &b)?;
    }
    Ok(())
}

/// XRSTOR (standard or compacted form, by XCOMP_BV[63]) and XRSTORS.
fn restore<const REX_W: bool, const SUPERVISOR: bool>(
    cpu: &mut Cpu,
    p: &mut dyn Platform,
    d: &Insn,
) -> XResult<()> {
    let enabled = cpu.xcr0 | if SUPERVISOR { cpu.xstate.xss } else { 0 };
    let rfbm = edx_eax(cpu) & enabled;
    let lin = area(cpu, p, d, SUPERVISOR, HEADER_END, false)?;
    let mask = cpu.lin_mask();
    // XCOMP_BV (the format) is read first, then the rest of the header.
    let mut header = [0u8; 64];
    cpu.read_lin_bytes(p, lin.wrapping_add(520) & mask, &mut header[8..16])?;
    cpu.read_lin_bytes(
        p,
        lin.wrapping_add(XSTATE_BV as u64) & mask,
        &mut header[..8],
    )?;
    cpu.read_lin_bytes(p, lin.wrapping_add(528) & mask, &mut header[16..])?;
    let bv = get64(&header, 0);
    let xcomp = get64(&header, 8);
    let compacted = xcomp & COMPACTED != 0;
    let gp = Err(Exception::gp0());
    // Then the first and last byte of the area — the standard format's
    // extent for RFBM, or (once XCOMP_BV is known to be valid) the
    // compacted one — before the rest of the header is checked, as the
    // hardware oracle orders these faults.
    if compacted && ((!SUPERVISOR && !cpu.has(feat::XSAVEC)) || xcomp & !COMPACTED & !enabled != 0)
    {
        return gp;
    }
    let extent = if compacted {
        compacted_layout(xcomp & CARRIED).1
    } else {
        standard_size(rfbm)
    };
    cpu.probe_lin_range(p, lin, 1, false)?;
    cpu.probe_lin_range(p, lin.wrapping_add(extent as u64 - 1) & mask, 1, false)?;
    if compacted {
        if !SUPERVISOR && !cpu.has(feat::XSAVEC) {
            return gp;
        }
        if xcomp & !COMPACTED & !enabled != 0
            || bv & !xcomp != 0
            || header[16..].iter().any(|&b| b != 0)
        {
            return gp;
        }
    } else {
        if SUPERVISOR || bv & !cpu.xcr0 != 0 || header[8..24].iter().any(|&b| b != 0) {
            return gp;
        }
    }
    let layout: Vec<(usize, usize, usize)> = if compacted {
        compacted_layout(xcomp & !COMPACTED).0
    } else {
        EXTENDED.to_vec()
    };
    let size = layout
        .iter()
        .filter(|e| rfbm & bv & (1 << e.0) != 0)
        .map(|e| e.1 + e.2)
        .max()
        .unwrap_or(HEADER_END)
        .max(HEADER_END);
    // The segment check over everything read.
    let off = cpu.ea(d);
    cpu.linear_access(p, d.seg as usize, off, size as u64, false)?;

    let load = |i: u64| rfbm & i != 0 && bv & i != 0;
    let mut img = [0u8; 512];
    let mxcsr_loaded = if compacted {
        load(SSE)
    } else {
        rfbm & (SSE | AVX) != 0
    };
    if load(X87) || load(SSE) || mxcsr_loaded {
        cpu.read_lin_bytes(p, lin, &mut img)?;
    }
    let mxcsr = u32::from_le_bytes([img[24], img[25], img[26], img[27]]);
    if mxcsr_loaded && mxcsr & !MXCSR_MASK != 0 {
        return gp;
    }
    let mut comps: Vec<(usize, Vec<u8>)> = Vec::new();
    for &(i, at, len) in &layout {
        if load(1 << i) {
            let mut b = vec![0u8; len];
            cpu.read_lin_bytes(p, lin.wrapping_add(at as u64) & mask, &mut b)?;
            comps.push((i, b));
        }
    }

    // Nothing faults from here on.
    if rfbm & X87 != 0 {
        if load(X87) {
            cpu.load_x87(&img, REX_W);
        } else {
            cpu.init_x87();
        }
    }
    let n = cpu.xsave_nregs();
    if rfbm & SSE != 0 {
        for (k, x) in cpu.fpu.xmm.iter_mut().enumerate().take(n) {
            *x = if load(SSE) {
                let mut a = [0u8; 16];
                a.copy_from_slice(&img[160 + 16 * k..176 + 16 * k]);
                u128::from_le_bytes(a)
            } else {
                0
            };
        }
    }
    if mxcsr_loaded {
        cpu.fpu.mxcsr = mxcsr;
    } else if compacted && rfbm & SSE != 0 {
        cpu.fpu.mxcsr = MXCSR_INIT;
    }
    for &(i, _, len) in EXTENDED.iter() {
        if rfbm & (1 << i) == 0 {
            continue;
        }
        match comps.iter().find(|c| c.0 == i) {
            Some((_, b)) => {
                if i == 2 && n == 8 {
                    // Outside 64-bit mode YMM8..15 keep their upper halves.
                    let keep: Vec<u128> = cpu.fpu.ymm_hi[8..].to_vec();
                    cpu.set_component(i, b);
                    cpu.fpu.ymm_hi[8..].copy_from_slice(&keep);
                } else {
                    cpu.set_component(i, b);
                }
            }
            None => {
                if i == 2 && n == 8 {
                    cpu.fpu.ymm_hi[..8].fill(0);
                } else {
                    cpu.set_component(i, &vec![0u8; len]);
                }
            }
        }
    }
    cpu.xstate.xinuse = (cpu.xstate.xinuse & !rfbm) | (bv & rfbm);
    Ok(())
}

#[cfg(test)]
mod tests {
    use iced_x86::code_asm::*;

    use super::*;
    use crate::cpu::{CR0_TS, CR4_OSFXSR};
    use crate::exception::GP;
    use crate::insn::testutil::*;
    use crate::state::gpr::*;

    const AREA: u64 = 0x4000;

    fn read_bytes(c: &Cpu, addr: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        assert!(c.ram().read(addr, &mut b));
        b
    }

    fn state_in_every_component(c: &mut Cpu) {
        avx_on(c);
        for k in 0..16 {
            c.fpu.xmm[k] =
                0x1111_0000_0000_0000_0000_0000_0000_0000u128.wrapping_mul(k as u128 + 1) + 7;
            c.fpu.ymm_hi[k] = 0xaaaa_0000_0000_0000_0000_0000_0000_0000 | k as u128;
        }
        c.fpu.mxcsr = 0x1f80 | 0x6000 | 0x21;
        c.fpu.fcw = 0x027f;
        c.fpu.push(0x3fff_8000_0000_0000_0000); // 1.0
        c.set_gpr(RAX, 7);
        c.set_gpr(RDX, 0);
        c.set_gpr(RBX, AREA);
    }

    #[test]
    fn xsave_then_xrstor_round_trip_in_the_standard_format() {
        let code = asm(64, |a| {
            a.xsave64(ptr(rbx))?;
            a.mov(rcx, qword_ptr(rbx + 512))?;
            a.mov(r8, rcx)?;
            a.and(ecx, 7)?;
            a.mov(qword_ptr(rbx + 512), rcx)?;
            // Clobber every component (an all-init image), then restore.
            a.xrstor64(ptr(rbx + 0x1000))?;
            a.xrstor64(ptr(rbx))
        });
        let c = run(Mode::Long64, &code, |c| {
            state_in_every_component(c);
            write_phys(c, AREA + 0x1000 + 24, &0x1f80u32.to_le_bytes());
            write_phys(c, AREA + 512, &[0xf0, 0, 0, 0, 0, 0, 0, 0]);
        });
        let img = read_bytes(&c, AREA, 832);
        assert_eq!(u16::from_le_bytes([img[0], img[1]]), 0x027f);
        assert_eq!(img[4], 0x80, "abridged tags: R7 valid");
        assert_eq!(
            u32::from_le_bytes(img[24..28].try_into().unwrap()),
            0x1f80 | 0x6021
        );
        assert_eq!(
            u32::from_le_bytes(img[28..32].try_into().unwrap()),
            MXCSR_MASK
        );
        assert_eq!(img[32 + 7], 0x80, "ST0 = 1.0");
        assert_eq!(
            u128::from_le_bytes(img[160..176].try_into().unwrap()),
            c.fpu.xmm[0]
        );
        assert_eq!(
            u128::from_le_bytes(img[576 + 16 * 15..592 + 16 * 15].try_into().unwrap()),
            0xaaaa << 112 | 15
        );
        // XSTATE_BV: XINUSE for RFBM; the other bits were kept, then
        // cleared again by hand so that XRSTOR accepts the header.
        assert_eq!(get64(&img, 512), 0x7);
        assert_eq!(get64(&img, 520), 0, "XCOMP_BV not written");
        assert_eq!(c.gpr(R8), 0xf7, "XSTATE_BV bits beyond RFBM are kept");
        // Restored.
        for k in 0..16 {
            assert_eq!(
                c.fpu.xmm[k],
                0x1111_0000_0000_0000_0000_0000_0000_0000u128.wrapping_mul(k as u128 + 1) + 7
            );
            assert_eq!(
                c.fpu.ymm_hi[k],
                0xaaaa_0000_0000_0000_0000_0000_0000_0000 | k as u128
            );
        }
        assert_eq!(c.fpu.mxcsr, 0x1f80 | 0x6021);
        assert_eq!(c.fpu.fcw, 0x027f);
        assert_eq!(c.fpu.st(0), 0x3fff_8000_0000_0000_0000);
    }

    /// XSTATE_BV as XSAVE (standard) and XSAVEC (compacted) store it after
    /// `body`, from the initial state with XINUSE = x87|SSE (what the
    /// hardware oracle showed for each of these sequences, 2026-12-06,
    /// Intel family 6 model 0xcf).
    fn bv_after(body: fn(&mut CodeAssembler) -> Result<(), IcedError>, mxcsr: u32) -> (u64, u64) {
        let code = asm(64, |a| {
            body(a)?;
            a.mov(eax, -1)?;
            a.mov(edx, -1)?;
            a.mov(rbx, AREA as i64)?;
            a.xsave64(ptr(rbx))?;
            a.xsavec64(ptr(rbx + 0x1000))
        });
        let c = run(Mode::Long64, &code, |c| {
            avx_on(c);
            c.fpu.mxcsr = mxcsr;
            c.xstate.xinuse = X87 | SSE;
            write_phys(c, AREA + 0x800, &0x1f80u32.to_le_bytes());
        });
        let std = get64(&read_bytes(&c, AREA, 576), 512);
        let cmp = get64(&read_bytes(&c, AREA + 0x1000, 576), 512);
        (std, cmp)
    }

    #[test]
    fn xinuse_follows_the_hardware_oracle() {
        // A VEX.128 write leaves AVX clean; a VEX.256 write (even of zeros)
        // or a VEX.256 instruction writing an XMM register dirties it.
        assert_eq!(bv_after(|a| a.vpaddd(xmm1, xmm2, xmm3), MXCSR_INIT), (3, 3));
        assert_eq!(bv_after(|a| a.vpxor(ymm1, ymm1, ymm1), MXCSR_INIT), (7, 7));
        assert_eq!(
            bv_after(|a| a.vextractf128(xmm1, ymm2, 1), MXCSR_INIT),
            (7, 7)
        );
        assert_eq!(
            bv_after(
                |a| {
                    a.vpxor(ymm1, ymm1, ymm1)?;
                    a.vzeroupper()
                },
                MXCSR_INIT
            ),
            (3, 3)
        );
        // VZEROALL cleans SSE too; XSAVEC still marks it while MXCSR is
        // not 1F80H. LDMXCSR of any value after it marks SSE for XSAVE as
        // well (fix 46).
        assert_eq!(bv_after(|a| a.vzeroall(), MXCSR_INIT), (1, 1));
        assert_eq!(bv_after(|a| a.vzeroall(), 0x5f80), (1, 3));
        assert_eq!(
            bv_after(
                |a| {
                    a.vzeroall()?;
                    a.mov(rcx, (AREA + 0x800) as i64)?;
                    a.ldmxcsr(dword_ptr(rcx))
                },
                MXCSR_INIT
            ),
            (3, 3)
        );
        // VZEROALL followed by a VEX.128 write: SSE in use, AVX not.
        assert_eq!(
            bv_after(
                |a| {
                    a.vzeroall()?;
                    a.vpaddd(xmm1, xmm2, xmm3)
                },
                MXCSR_INIT
            ),
            (3, 3)
        );
    }

    /// LDMXCSR after VZEROALL puts the SSE component in use for XSAVE and
    /// XSAVEOPT too, even loading 1F80H: XSAVEOPT then writes the XMM area
    /// (seed 19074 `--isa-only` case 231958, and a probe on the host CPU).
    /// An XRSTOR of another component leaves it in use; one of SSE with
    /// XSTATE_BV[1] clear takes it out of use (fix 46).
    #[test]
    fn ldmxcsr_puts_the_sse_component_in_use_for_every_save_form() {
        fn xsaveopt_after(tail: fn(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
            let code = asm(64, |a| {
                a.vzeroall()?;
                a.mov(rcx, (AREA + 0x800) as i64)?;
                a.vldmxcsr(dword_ptr(rcx))?;
                tail(a)?;
                a.mov(eax, 2)?;
                a.xor(edx, edx)?;
                a.mov(rbx, AREA as i64)?;
                a.xsaveopt64(ptr(rbx))
            });
            let c = run(Mode::Long64, &code, |c| {
                avx_on(c);
                c.xstate.xinuse = X87 | SSE;
                write_phys(c, AREA, &[0xee; 576]);
                write_phys(c, AREA + 0x800, &0x1f80u32.to_le_bytes());
                // An x87-only and an all-init XRSTOR image.
                write_phys(c, AREA + 0x1000, &[0; 576]);
                write_phys(c, AREA + 0x1000, &0x037fu16.to_le_bytes());
                write_phys(c, AREA + 0x1000 + 24, &0x1f80u32.to_le_bytes());
                write_phys(c, AREA + 0x1000 + 512, &X87.to_le_bytes());
            });
            read_bytes(&c, AREA, 576)
        }
        let img = xsaveopt_after(|_| Ok(()));
        assert_eq!(get64(&img, 512) & SSE, SSE, "XSTATE_BV[1]");
        assert_eq!(&img[160..176], &[0; 16], "XMM0 written");
        assert_eq!(&img[24..28], &0x1f80u32.to_le_bytes());
        // XRSTOR of the x87 component alone: still in use.
        let img = xsaveopt_after(|a| {
            a.mov(eax, 1)?;
            a.xor(edx, edx)?;
            a.mov(rsi, (AREA + 0x1000) as i64)?;
            a.xrstor64(ptr(rsi))
        });
        assert_eq!(get64(&img, 512) & SSE, SSE);
        assert_eq!(&img[160..176], &[0; 16]);
        // XRSTOR of SSE with XSTATE_BV[1] clear: initial, not written.
        let img = xsaveopt_after(|a| {
            a.mov(eax, 2)?;
            a.xor(edx, edx)?;
            a.mov(rsi, (AREA + 0x1000) as i64)?;
            a.xrstor64(ptr(rsi))
        });
        assert_eq!(get64(&img, 512) & SSE, 0);
        assert_eq!(&img[160..176], &[0xee; 16], "XMM area skipped");
    }

    #[test]
    fn xrstor_initialises_components_whose_xstate_bv_bit_is_clear() {
        let code = asm(64, |a| a.xrstor64(ptr(rbx)));
        let c = run(Mode::Long64, &code, |c| {
            state_in_every_component(c);
            // XSTATE_BV = 0: everything in RFBM goes to its initial state;
            // the standard form still loads MXCSR (RFBM[1] set).
            write_phys(c, AREA + 24, &0x1f85u32.to_le_bytes());
        });
        assert_eq!(c.fpu.xmm, [0; 16]);
        assert_eq!(c.fpu.ymm_hi, [0; 16]);
        assert_eq!((c.fpu.fcw, c.fpu.fsw, c.fpu.ftw), (0x37f, 0, 0xffff));
        assert_eq!(c.fpu.regs, [0; 8]);
        assert_eq!(c.fpu.mxcsr, 0x1f85);
        assert_eq!(c.xinuse(), 0);
        // RFBM without AVX: the YMM upper halves stay.
        let c = run(Mode::Long64, &code, |c| {
            state_in_every_component(c);
            c.set_gpr(RAX, 3);
            write_phys(c, AREA + 24, &0x1f80u32.to_le_bytes());
        });
        assert_eq!(c.fpu.xmm, [0; 16]);
        assert_eq!(c.fpu.ymm_hi[3], 0xaaaa << 112 | 3);
    }

    #[test]
    fn xrstor_faults() {
        let code = asm(64, |a| a.xrstor64(ptr(rbx)));
        let gp = Err(Exception::gp0());
        // XSTATE_BV with a bit not in XCR0.
        let (_, r) = exec_one(Mode::Long64, &code, |c| {
            state_in_every_component(c);
            write_phys(c, AREA + 512, &8u64.to_le_bytes());
        });
        assert_eq!(r, gp);
        // Bytes 23:8 of the header not zero (standard form).
        let (_, r) = exec_one(Mode::Long64, &code, |c| {
            state_in_every_component(c);
            write_phys(c, AREA + 528, &1u64.to_le_bytes());
        });
        assert_eq!(r, gp);
        // Reserved MXCSR bits.
        let (_, r) = exec_one(Mode::Long64, &code, |c| {
            state_in_every_component(c);
            write_phys(c, AREA + 24, &0x1_0000u32.to_le_bytes());
        });
        assert_eq!(r, gp);
        // Misaligned area.
        let (c, r) = exec_one(Mode::Long64, &code, |c| {
            state_in_every_component(c);
            c.set_gpr(RBX, AREA + 16);
        });
        assert_eq!(r, gp);
        assert_ne!(c.fpu.xmm[1], 0, "nothing loaded");
        // CR0.TS: #NM; no CR4.OSXSAVE: #UD.
        let (_, r) = exec_one(Mode::Long64, &code, |c| {
            state_in_every_component(c);
            let mut s = c.state();
            s.sregs.cr0 |= CR0_TS;
            c.set_state(&s);
        });
        assert_eq!(r, Err(Exception::nm()));
        let (_, r) = exec_one(Mode::Long64, &code, |c| {
            let mut s = c.state();
            s.sregs.cr4 |= CR4_OSFXSR;
            c.set_state(&s);
        });
        assert_eq!(r, Err(Exception::ud()));
        // A compacted header that says a component is there which its
        // XCOMP_BV does not list.
        let (_, r) = exec_one(Mode::Long64, &code, |c| {
            state_in_every_component(c);
            write_phys(c, AREA + 512, &4u64.to_le_bytes());
            write_phys(c, AREA + 520, &(COMPACTED | 3).to_le_bytes());
        });
        assert_eq!(r, gp);
    }

    #[test]
    fn xsavec_uses_the_compacted_format_and_the_init_optimization() {
        let code = asm(64, |a| a.xsavec64(ptr(rbx)));
        let c = run(Mode::Long64, &code, |c| {
            state_in_every_component(c);
            c.init_x87(); // x87 in its initial configuration: not written
            c.xstate.xinuse = 0;
            c.set_gpr(RAX, 5); // x87 and AVX; SSE not requested
            write_phys(c, AREA, &[0xee; 1024]);
        });
        let img = read_bytes(&c, AREA, 1024);
        assert_eq!(get64(&img, 512), AVX, "XSTATE_BV = XINUSE & RFBM");
        assert_eq!(get64(&img, 520), COMPACTED | 5);
        assert_eq!(&img[0..24], &[0xee; 24], "x87 not in use: not written");
        assert_eq!(
            &img[24..32],
            &[0xee; 8],
            "MXCSR only with RFBM[1] in XSAVEC"
        );
        assert_eq!(&img[160..176], &[0xee; 16], "SSE not requested");
        assert_eq!(
            u128::from_le_bytes(img[576..592].try_into().unwrap()),
            0xaaaa << 112,
            "AVX right after the header"
        );
        assert_eq!(&img[832..848], &[0xee; 16]);
        // XRSTOR reads it back in the compacted form.
        let code = asm(64, |a| {
            a.xsavec64(ptr(rbx))?;
            a.xrstor64(ptr(rbx + 0x1000))?;
            a.xrstor64(ptr(rbx))
        });
        let c = run(Mode::Long64, &code, |c| {
            state_in_every_component(c);
            write_phys(c, AREA, &[0; 1024]);
            write_phys(c, AREA + 0x1000 + 24, &0x1f80u32.to_le_bytes());
        });
        assert_eq!(c.fpu.ymm_hi[9], 0xaaaa << 112 | 9);
        assert_eq!(
            c.fpu.xmm[9],
            0x1111_0000_0000_0000_0000_0000_0000_0000 * 10 + 7
        );
    }

    #[test]
    fn xgetbv_xsetbv_and_cpuid_leaf_0xd() {
        // xsetbv with XCR0 = x87|SSE, then cpuid(0xd, 0), xgetbv(1).
        let code = asm(64, |a| {
            a.xor(ecx, ecx)?;
            a.mov(eax, 3)?;
            a.xor(edx, edx)?;
            a.xsetbv()?;
            a.mov(eax, 0xd)?;
            a.xor(ecx, ecx)?;
            a.cpuid()?;
            a.mov(r8d, ebx)?;
            a.mov(r9d, ecx)?;
            a.mov(r10d, eax)?;
            a.mov(ecx, 1)?;
            a.xgetbv()
        });
        let c = run(Mode::Long64, &code, |c| {
            avx_on(c);
            c.fpu.xmm[2] = 1;
        });
        assert_eq!(c.xcr0, 3);
        let sup = crate::cpuid::xcr0_supported(crate::cpuid::CpuModel::Max.features());
        assert_eq!(c.gpr(R8), 576, "size for the enabled components");
        assert_eq!(
            c.gpr(R9),
            u64::from(crate::cpuid::xsave_size(sup)),
            "size for every supported component"
        );
        assert_eq!(c.gpr(R10), sup);
        assert_eq!(c.gpr(RAX), 2, "XCR0 & XINUSE: SSE only");
        // Invalid XCR0 values and CPL 3.
        for (v, which) in [(0u64, 0u64), (5, 0), (2, 0), (0x27, 0), (0xe7, 0), (3, 1)] {
            let code = asm(64, |a| a.xsetbv());
            let (_, r) = exec_one(Mode::Long64, &code, |c| {
                avx_on(c);
                c.set_gpr(RAX, v);
                c.set_gpr(RCX, which);
            });
            assert_eq!(r.map_err(|e| e.vector), Err(GP), "xcr0 {v:#x} ecx {which}");
        }
        // The KVM fallback's CPU takes the AVX-512 components.
        let code = asm(64, |a| {
            a.xsetbv()?;
            a.xsave64(ptr(rbx))
        });
        let c = run(Mode::Long64, &code, |c| {
            avx_on(c);
            c.set_host_features(true);
            c.set_xsave_components(0xe7);
            c.set_gpr(RAX, 0xe7);
            c.set_gpr(RBX, AREA);
            c.xstate.opmask[1] = 0x1234;
            c.xstate.hi16_zmm[15][3] = 0x77 << 120;
        });
        assert_eq!(c.xcr0, 0xe7);
        let img = read_bytes(&c, AREA, 2688);
        assert_eq!(get64(&img, 1088 + 8), 0x1234);
        assert_eq!(img[2687], 0x77);
        assert_eq!(get64(&img, 512) & 0xe0, OPMASK | HI16_ZMM);
    }

    #[test]
    fn xsaves_needs_cpl_0_and_xss_takes_only_zero() {
        let code = asm(64, |a| a.xsaves64(ptr(rbx)));
        let (_, r) = exec_one(Mode::Long64, &code, |c| {
            state_in_every_component(c);
            let mut s = c.state();
            s.sregs.cs.dpl = 3;
            s.sregs.ss.dpl = 3;
            c.set_state(&s);
        });
        assert_eq!(r, Err(Exception::gp0()));
        let mut c = new_cpu();
        let mut p = TestPlatform::default();
        assert_eq!(c.read_msr(&mut p, crate::state::msr::XSS), Some(0));
        assert!(c.write_msr(&mut p, crate::state::msr::XSS, 0).is_ok());
        assert!(c.write_msr(&mut p, crate::state::msr::XSS, 1 << 8).is_err());
    }

    #[test]
    fn cpu_models_gate_their_instructions() {
        use crate::cpuid::{CpuModel, CpuidConfig};
        let model = |m: CpuModel| {
            move |c: &mut Cpu| {
                c.set_cpuid_config(CpuidConfig {
                    model: m,
                    ..Default::default()
                })
            }
        };
        // POPCNT is x86-64-v2: #UD on v1.
        let code = asm(64, |a| a.popcnt(eax, ecx));
        let c = run(Mode::Long64, &code, |c| {
            model(CpuModel::V2)(c);
            c.set_gpr(RCX, 0xff);
        });
        assert_eq!(c.gpr(RAX), 8);
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        model(CpuModel::V1)(&mut c);
        write_phys(&c, CODE, &code);
        let mut p = TestPlatform::default();
        let insn = c.decode_one(&mut p).unwrap();
        assert_eq!((insn.h)(&mut c, &mut p, &insn), Err(Exception::ud()));
        // CR4.OSXSAVE cannot be set without XSAVE (v2).
        let mut c = new_cpu();
        setup(&mut c, Mode::Long64);
        model(CpuModel::V2)(&mut c);
        assert!(c.write_cr4(c.cr4 | CR4_OSXSAVE).is_err());
        model(CpuModel::V3)(&mut c);
        assert!(c.write_cr4(c.cr4 | CR4_OSXSAVE).is_ok());
        // CPUID follows the model.
        let l1 = |m: CpuModel| {
            crate::cpuid::query(
                &CpuidConfig {
                    model: m,
                    ..Default::default()
                },
                1,
                0,
            )[2]
        };
        assert_eq!(l1(CpuModel::V1) & crate::cpuid::leaf1_ecx::SSE3, 0);
        assert_ne!(l1(CpuModel::V2) & crate::cpuid::leaf1_ecx::SSE4_2, 0);
        assert_eq!(l1(CpuModel::V2) & crate::cpuid::leaf1_ecx::AVX, 0);
        assert_ne!(l1(CpuModel::V3) & crate::cpuid::leaf1_ecx::AVX, 0);
        assert_eq!(l1(CpuModel::V3) & crate::cpuid::leaf1_ecx::AES, 0);
        assert_eq!(
            l1(CpuModel::Max) & !crate::cpuid::LEAF1_ECX,
            crate::cpuid::feature_bits(crate::cpuid::feat::IMPLEMENTED).0
        );
    }
}
