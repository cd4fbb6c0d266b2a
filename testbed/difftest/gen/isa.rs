//! x86-64-v2 and v3 cases: SSE4.1/4.2 (CRC32 and the string compares
//! included), AVX/AVX2 in every 128- and 256-bit form, FMA3, F16C,
//! BMI1/2, LZCNT/TZCNT, MOVBE, POPCNT, AES-NI, PCLMULQDQ and the
//! user-level XSAVE family (XSAVE/XSAVEOPT/XSAVEC/XRSTOR, XGETBV).
//!
//! Generated only in 64-bit ring 3, where the CPU itself is the oracle:
//! the state starts with XSAVE enabled (CR4.OSXSAVE, XCR0 = x87|SSE|AVX),
//! random XMM/YMM contents full of special values and a random MXCSR.
//! Memory operands of the unaligned forms are unaligned and cross pages
//! (into the not-present page too); the aligned forms (legacy 16-byte
//! operands, VMOVAPS & co.) stay aligned, because a #GP raised in ring 3
//! reaches the guest as #UD under KVM-PVM (docs/DIFFTEST.md). Gathers get
//! their index and mask vectors from memory written just before, with
//! elements aimed at every page of the window — the not-present one too,
//! so that a gather faults part-way. XRSTOR only restores an area an
//! XSAVE of the same case wrote (a random header is a #GP).
//!
//! Not generated: XSETBV, XSAVES, XRSTORS (CPL 0), VRCPPS & co. (their
//! approximations are implementation-specific), VMASKMOVDQU (implicit
//! [rDI]) — the unit tests cover these.

use iced_x86::{Code, CpuidFeature as F, EncodingKind, Mnemonic, OpCodeOperandKind as K, Register};

use super::{build, mov_mem_imm, mov_reg_imm, Builder, Generator, Mem, Opnd};
use crate::difftest::env;
use crate::difftest::rng::Rng;
use crate::difftest::Mode;
use cpu_interp::state::CpuState;

/// The extensions these cases cover, as the coverage report names them.
pub const EXTENSIONS: &[(&str, &[F])] = &[
    ("SSE4.1", &[F::SSE4_1]),
    ("SSE4.2", &[F::SSE4_2]),
    ("POPCNT", &[F::POPCNT]),
    ("AVX", &[F::AVX]),
    ("AVX2", &[F::AVX2]),
    ("FMA", &[F::FMA]),
    ("F16C", &[F::F16C]),
    ("BMI1", &[F::BMI1]),
    ("BMI2", &[F::BMI2]),
    ("LZCNT", &[F::LZCNT]),
    ("MOVBE", &[F::MOVBE]),
    ("AES", &[F::AES]),
    ("PCLMULQDQ", &[F::PCLMULQDQ]),
    ("XSAVE", &[F::XSAVE, F::XSAVEOPT, F::XSAVEC, F::XSAVES]),
];

/// Does `c` belong to one of [`EXTENSIONS`] (and to nothing else)?
pub fn is_isa(c: Code) -> bool {
    let f = c.cpuid_features();
    matches!(c.encoding(), EncodingKind::Legacy | EncodingKind::VEX)
        && !f.is_empty()
        && f.iter()
            .all(|x| EXTENSIONS.iter().any(|(_, fs)| fs.contains(x)))
}

/// The extension name of `c`, for the coverage report.
pub fn extension_of(c: Code) -> Option<&'static str> {
    if !is_isa(c) {
        return None;
    }
    let f = c.cpuid_features();
    // The most specific first: [AES, AVX] is AES, [PCLMULQDQ, AVX] PCLMULQDQ.
    EXTENSIONS
        .iter()
        .rev()
        .find(|(_, fs)| f.iter().any(|x| fs.contains(x)))
        .map(|(n, _)| *n)
}

/// Does the host processor (the hardware oracle) have `f`? Probed with
/// CPUID; features this module does not generate count as absent.
pub fn host_has(f: F) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        let max = __cpuid(0).eax;
        let max_ext = __cpuid(0x8000_0000).eax;
        let l1 = __cpuid(1);
        let l7 = if max >= 7 {
            __cpuid_count(7, 0)
        } else {
            __cpuid(0)
        };
        let ld1 = if max >= 0xd {
            __cpuid_count(0xd, 1).eax
        } else {
            0
        };
        let e1 = if max_ext >= 0x8000_0001 {
            __cpuid(0x8000_0001).ecx
        } else {
            0
        };
        let bit = |r: u32, b: u32| r & (1 << b) != 0;
        match f {
            F::SSE4_1 => bit(l1.ecx, 19),
            F::SSE4_2 => bit(l1.ecx, 20),
            F::POPCNT => bit(l1.ecx, 23),
            F::MOVBE => bit(l1.ecx, 22),
            F::PCLMULQDQ => bit(l1.ecx, 1),
            F::AES => bit(l1.ecx, 25),
            F::FMA => bit(l1.ecx, 12),
            F::XSAVE => bit(l1.ecx, 26),
            F::AVX => bit(l1.ecx, 28),
            F::F16C => bit(l1.ecx, 29),
            F::AVX2 => max >= 7 && bit(l7.ebx, 5),
            F::BMI1 => max >= 7 && bit(l7.ebx, 3),
            F::BMI2 => max >= 7 && bit(l7.ebx, 8),
            F::LZCNT => bit(e1, 5),
            F::XSAVEOPT => bit(ld1, 0),
            F::XSAVEC => bit(ld1, 1),
            F::XSAVES => bit(ld1, 3),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = f;
        false
    }
}

/// The extensions of [`EXTENSIONS`] the host lacks (entirely or in part):
/// their forms are not generated, and the summary says so.
pub fn host_lacks() -> Vec<&'static str> {
    EXTENSIONS
        .iter()
        .filter(|(_, fs)| fs.iter().any(|f| !host_has(*f)))
        .map(|(n, _)| *n)
        .collect()
}

/// Can the hardware oracle run `c` (the host has all its features)?
pub fn host_runs(c: Code) -> bool {
    c.cpuid_features().iter().all(|f| host_has(*f))
}

/// Not generated (see the module documentation), or generated only by a
/// template of their own.
fn excluded(c: Code) -> bool {
    matches!(
        c.mnemonic(),
        Mnemonic::Xsetbv
            | Mnemonic::Xsaves
            | Mnemonic::Xsaves64
            | Mnemonic::Xrstors
            | Mnemonic::Xrstors64
            | Mnemonic::Xsave
            | Mnemonic::Xsave64
            | Mnemonic::Xsaveopt
            | Mnemonic::Xsaveopt64
            | Mnemonic::Xsavec
            | Mnemonic::Xsavec64
            | Mnemonic::Xrstor
            | Mnemonic::Xrstor64
            | Mnemonic::Xgetbv
            | Mnemonic::Vrcpps
            | Mnemonic::Vrcpss
            | Mnemonic::Vrsqrtps
            | Mnemonic::Vrsqrtss
            | Mnemonic::Vmaskmovdqu
    )
}

fn kinds_supported(c: Code) -> bool {
    c.op_code().op_kinds().iter().all(|k| {
        matches!(
            k,
            K::imm8
                | K::mem
                | K::mem_vsib32x
                | K::mem_vsib32y
                | K::mem_vsib64x
                | K::mem_vsib64y
                | K::r8_or_mem
                | K::r16_or_mem
                | K::r32_or_mem
                | K::r64_or_mem
                | K::r16_reg
                | K::r32_reg
                | K::r64_reg
                | K::r32_rm
                | K::r64_rm
                | K::r32_vvvv
                | K::r64_vvvv
                | K::xmm_reg
                | K::xmm_rm
                | K::xmm_vvvv
                | K::xmm_is4
                | K::xmm_or_mem
                | K::ymm_reg
                | K::ymm_rm
                | K::ymm_vvvv
                | K::ymm_is4
                | K::ymm_or_mem
        )
    })
}

/// The v2/v3 codes generated in `mode` (64-bit ring 3 only), grouped by
/// mnemonic.
pub fn isa_groups(mode: Mode) -> Vec<Vec<Code>> {
    if mode != Mode::Long64Ring3 {
        return Vec::new();
    }
    let mut by: std::collections::BTreeMap<u32, Vec<Code>> = Default::default();
    for c in Code::values() {
        let oc = c.op_code();
        if !is_isa(c)
            || !host_runs(c)
            || excluded(c)
            || !kinds_supported(c)
            || !cpu_interp::dispatch::implemented(c)
            || !oc.mode64()
            || !oc.intel_decoder64()
            || !oc.cpl3()
            || !oc.is_instruction()
            || oc.decoder_option() != 0
        {
            continue;
        }
        by.entry(c.mnemonic() as u32).or_default().push(c);
    }
    by.into_values().collect()
}

/// Every x86-64-v2/v3 form the generator can produce on this host: the
/// random forms of [`isa_groups`] and the XSAVE/XGETBV templates'.
pub fn generatable_forms() -> Vec<Code> {
    isa_groups(Mode::Long64Ring3)
        .into_iter()
        .flatten()
        .chain(
            [
                Code::Xsave_mem,
                Code::Xsave64_mem,
                Code::Xsaveopt_mem,
                Code::Xsaveopt64_mem,
                Code::Xsavec_mem,
                Code::Xsavec64_mem,
                Code::Xrstor_mem,
                Code::Xrstor64_mem,
                Code::Xgetbv,
            ]
            .into_iter()
            .filter(|&c| host_runs(c)),
        )
        .collect()
}

/// The aligned forms: a misaligned operand is #GP (a #UD under KVM-PVM
/// in ring 3, so they stay aligned).
fn needs_alignment(c: Code) -> Option<u64> {
    let m = c.mnemonic();
    let size = c.op_code().memory_size().size() as u64;
    if c.encoding() == EncodingKind::VEX {
        return matches!(
            m,
            Mnemonic::Vmovaps
                | Mnemonic::Vmovapd
                | Mnemonic::Vmovdqa
                | Mnemonic::Vmovntps
                | Mnemonic::Vmovntpd
                | Mnemonic::Vmovntdq
                | Mnemonic::Vmovntdqa
        )
        .then_some(size);
    }
    // Legacy 16-byte operands, except the string compares.
    let unaligned = matches!(
        m,
        Mnemonic::Pcmpestri
            | Mnemonic::Pcmpestri64
            | Mnemonic::Pcmpestrm
            | Mnemonic::Pcmpestrm64
            | Mnemonic::Pcmpistri
            | Mnemonic::Pcmpistrm
    );
    (size == 16 && !unaligned).then_some(16)
}

const YMM: [Register; 16] = [
    Register::YMM0,
    Register::YMM1,
    Register::YMM2,
    Register::YMM3,
    Register::YMM4,
    Register::YMM5,
    Register::YMM6,
    Register::YMM7,
    Register::YMM8,
    Register::YMM9,
    Register::YMM10,
    Register::YMM11,
    Register::YMM12,
    Register::YMM13,
    Register::YMM14,
    Register::YMM15,
];

fn xmm_n(n: usize) -> Register {
    super::xmm_index_reg(n)
}

/// Random YMM upper halves full of special values (the state the ISA
/// cases start from), and the XINUSE the KVM side derives from them.
pub fn randomize(rng: &mut Rng, s: &mut CpuState) {
    super::super::fp::randomize(rng, s);
    for y in s.fpu.ymm_hi.iter_mut() {
        *y = match rng.below(8) {
            0 => 0,
            1 => u128::MAX,
            _ if rng.bool() => (0..4).fold(0u128, |a, k| {
                a | (u128::from(super::super::fp::f32_bits(rng)) << (32 * k))
            }),
            _ => {
                u128::from(super::super::fp::f64_bits(rng))
                    | (u128::from(super::super::fp::f64_bits(rng)) << 64)
            }
        };
    }
    // x87 and SSE are always marked in use when the state reaches KVM.
    s.xstate.xinuse = 0b11
        | if s.fpu.ymm_hi.iter().any(|&y| y != 0) {
            0b100
        } else {
            0
        };
}

impl Generator {
    /// One v2/v3 test (or a gather, XSAVE or XGETBV template).
    pub(super) fn gen_isa(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        match rng.below(100) {
            0..=5 => self.gen_gather(b, rng),
            6..=9 => self.gen_xsave(b, rng),
            10 => self.gen_xgetbv(b, rng),
            _ => {
                let Some(group) = rng.pick(&self.isa_groups) else {
                    return false;
                };
                let Some(&code) = rng.pick(group) else {
                    return false;
                };
                if is_gather(code) {
                    return self.gen_gather(b, rng);
                }
                self.gen_isa_code(b, rng, code)
            }
        }
    }

    fn gen_isa_code(&mut self, b: &mut Builder, rng: &mut Rng, code: Code) -> bool {
        let oc = code.op_code();
        let msize = oc.memory_size().size() as u64;
        // Lengths for the explicit-length string compares, set before the
        // memory operand (which may use RAX/RDX as its index) is built.
        if matches!(
            code.mnemonic(),
            Mnemonic::Pcmpestri
                | Mnemonic::Pcmpestri64
                | Mnemonic::Pcmpestrm
                | Mnemonic::Pcmpestrm64
                | Mnemonic::Vpcmpestri
                | Mnemonic::Vpcmpestri64
                | Mnemonic::Vpcmpestrm
                | Mnemonic::Vpcmpestrm64
        ) {
            for r in [Register::RAX, Register::RDX] {
                let v = match rng.below(4) {
                    0 => rng.edgy(64),
                    1 => (rng.below(40) as i64 - 20) as u64,
                    _ => rng.below(17),
                };
                b.setup(mov_reg_imm(r, v));
            }
        }
        b.fp_operand = true;
        b.align = needs_alignment(code).unwrap_or(1);
        let mut ops = Vec::new();
        let mut mem = None;
        for n in 0..oc.op_count() {
            let k = oc.op_kind(n);
            let dest = n == 0;
            let op = match k {
                K::xmm_reg | K::xmm_rm | K::xmm_vvvv | K::xmm_is4 => {
                    Opnd::Reg(xmm_n(rng.below(16) as usize))
                }
                K::ymm_reg | K::ymm_rm | K::ymm_vvvv | K::ymm_is4 => {
                    Opnd::Reg(YMM[rng.below(16) as usize])
                }
                K::xmm_or_mem | K::ymm_or_mem => {
                    if mem.is_none() && rng.chance(2, 5) {
                        mem = Some(n);
                        Opnd::Mem(self.mem_operand(b, rng, msize))
                    } else if k == K::xmm_or_mem {
                        Opnd::Reg(xmm_n(rng.below(16) as usize))
                    } else {
                        Opnd::Reg(YMM[rng.below(16) as usize])
                    }
                }
                K::mem => {
                    mem = Some(n);
                    Opnd::Mem(self.mem_operand(b, rng, msize.max(1)))
                }
                K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem => {
                    let size = match k {
                        K::r8_or_mem => 1,
                        K::r16_or_mem => 2,
                        K::r32_or_mem => 4,
                        _ => 8,
                    };
                    if mem.is_none() && rng.chance(2, 5) {
                        mem = Some(n);
                        Opnd::Mem(self.mem_operand(b, rng, msize.max(size as u64)))
                    } else {
                        Opnd::Reg(self.pick_reg(rng, 64, size, dest))
                    }
                }
                K::r16_reg => Opnd::Reg(self.pick_reg(rng, 64, 2, dest)),
                K::r32_reg | K::r32_rm | K::r32_vvvv => {
                    Opnd::Reg(self.pick_reg(rng, 64, 4, dest || is_mulx_dest(code, n)))
                }
                K::r64_reg | K::r64_rm | K::r64_vvvv => {
                    Opnd::Reg(self.pick_reg(rng, 64, 8, dest || is_mulx_dest(code, n)))
                }
                K::imm8 => Opnd::Imm(rng.edgy(8)),
                _ => return false,
            };
            ops.push(op);
        }
        b.align = 0;
        // A valid MXCSR image for VLDMXCSR (an invalid one is #GP, which
        // arrives as #UD under KVM-PVM).
        if code.mnemonic() == Mnemonic::Vldmxcsr {
            if let Some(Opnd::Mem(m)) = ops.first() {
                let v = 0x1f80
                    | (rng.below(4) << 13)
                    | (rng.below(0x40) & if rng.bool() { 0x3f } else { 0 });
                b.setup(mov_mem_imm(*m, 4, v));
            }
        }
        let Some(i) = build(code, &ops) else {
            return false;
        };
        self.finish(b, rng, i, None)
    }

    /// A gather: the index vector and the mask come from memory written
    /// just before (dwords or qwords in the read/write window), the base
    /// is RBX; elements aim at every page of the window, so some gathers
    /// fault part-way on the not-present or supervisor page.
    fn gen_gather(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let gathers: Vec<Code> = self
            .isa_groups
            .iter()
            .flatten()
            .copied()
            .filter(|&c| is_gather(c))
            .collect();
        let Some(&code) = rng.pick(&gathers) else {
            return false;
        };
        let oc = code.op_code();
        let vsib = oc.op_kind(1);
        let iw: u64 = if matches!(vsib, K::mem_vsib32x | K::mem_vsib32y) {
            4
        } else {
            8
        };
        let wide_index = matches!(vsib, K::mem_vsib32y | K::mem_vsib64y);
        let wide_data = oc.op_kind(0) == K::ymm_reg;
        let w = oc.memory_size().size() as u64;
        // Three distinct registers (one case in 20 shares two: #UD).
        let mut regs: Vec<usize> = (0..16).collect();
        let mut pick = |rng: &mut Rng| -> usize {
            let k = rng.below(regs.len() as u64) as usize;
            regs.swap_remove(k)
        };
        let (d, ix, mk) = (pick(rng), pick(rng), pick(rng));
        let (ix, mk) = if rng.chance(1, 20) { (d, mk) } else { (ix, mk) };
        let reg = |n: usize, wide: bool| if wide { YMM[n] } else { xmm_n(n) };
        let scale = 1u64 << rng.below(4);
        // Element targets, then indices relative to the base W_RO.
        let n_idx = if wide_index { 32 / iw } else { 16 / iw };
        let base_t = env::W_RO;
        let scratch = env::W_RW1 + 0xf00;
        for k in 0..n_idx {
            let t = match rng.below(10) {
                0 => env::UNMAPPED + rng.below(0x1000),
                1 => env::UNMAPPED - rng.range(1, w + 1),
                2 => env::W_SUP + rng.below(0x1000),
                _ => env::W_RO + rng.below(0x4000 - w),
            };
            let idx = (t.wrapping_sub(base_t) / scale) as i64;
            let m = self.abs_mem(b, scratch + k * iw);
            if !b.setup(mov_mem_imm(m, 4, idx as u64 & 0xffff_ffff)) {
                return false;
            }
            if iw == 8
                && !b.setup(mov_mem_imm(
                    with_disp(m, 4),
                    4,
                    (idx >> 32) as u64 & 0xffff_ffff,
                ))
            {
                return false;
            }
        }
        // The mask: each element's sign bit set with probability 3/4.
        let mask_at = scratch + 0x80;
        for k in 0..8u64 {
            let v: u64 = if rng.chance(3, 4) {
                0x8000_0000
            } else {
                rng.below(0x8000_0000)
            };
            if !b.setup(mov_mem_imm(self.abs_mem(b, mask_at + 4 * k), 4, v)) {
                return false;
            }
        }
        let load = |r: Register, at: Mem| {
            let c = if r.is_ymm() {
                Code::VEX_Vmovdqu_ymm_ymmm256
            } else {
                Code::VEX_Vmovdqu_xmm_xmmm128
            };
            build(c, &[Opnd::Reg(r), Opnd::Mem(at)])
        };
        let index_reg = reg(ix, wide_index);
        let mask_reg = reg(mk, wide_data);
        if !b.setup(load(index_reg, self.abs_mem(b, scratch)))
            || !b.setup(load(mask_reg, self.abs_mem(b, mask_at)))
        {
            return false;
        }
        let disp = base_t.wrapping_sub(b.model.rbx) as i32 as i64 as u64;
        let m = Mem {
            base: Register::RBX,
            index: index_reg,
            scale: scale as u32,
            disp,
            // iced encodes a 32-bit displacement with 64-bit addressing
            // only when told 8 (with 4 every gather failed to encode, so
            // none was ever generated: issue 19's 16 missing AVX2 forms).
            displ_size: 8,
            seg: Register::None,
        };
        let Some(i) = build(
            code,
            &[
                Opnd::Reg(reg(d, wide_data)),
                Opnd::Mem(m),
                Opnd::Reg(mask_reg),
            ],
        ) else {
            return false;
        };
        self.finish(b, rng, i, None)
    }

    /// XSAVE/XSAVEOPT/XSAVEC to a 64-byte aligned area (sometimes running
    /// into the not-present page), then perhaps a vector instruction and an
    /// XRSTOR of the same area, each with a random EDX:EAX.
    fn gen_xsave(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let saves = [
            Code::Xsave_mem,
            Code::Xsave64_mem,
            Code::Xsaveopt_mem,
            Code::Xsaveopt64_mem,
            Code::Xsavec_mem,
            Code::Xsavec64_mem,
        ];
        let saves: Vec<Code> = saves.into_iter().filter(|&c| host_runs(c)).collect();
        let Some(&code) = rng.pick(&saves) else {
            return false;
        };
        let area = if rng.chance(1, 8) {
            env::UNMAPPED - 64 * rng.range(1, 14)
        } else {
            // Room for every component of the oracle's XCR0 (AVX-512: 2688 bytes).
            env::W_RW0 + 64 * rng.below((0x2000 - 2688) / 64)
        };
        let m = self.abs_mem(b, area);
        // Never a component the host enables and the interpreter cannot
        // hold (AMX tiles): the CPU would save what the interpreter has not.
        let foreign = env::host_xcr0() & !env::oracle_xcr0();
        let rfbm = |rng: &mut Rng| -> u64 {
            let v = match rng.below(4) {
                0 => 7,
                1 => u64::from(u32::MAX),
                2 => rng.below(0x400),
                _ => rng.below(8),
            };
            v & !foreign
        };
        let v = rfbm(rng);
        if !b.setup(mov_reg_imm(Register::EAX, v))
            || !b.setup(mov_reg_imm(
                Register::EDX,
                if rng.chance(1, 4) { rng.edgy(32) } else { 0 },
            ))
        {
            return false;
        }
        let Some(save) = build(code, &[Opnd::Mem(m)]) else {
            return false;
        };
        if !self.finish(b, rng, save, None) {
            return false;
        }
        if rng.chance(1, 2) {
            return true;
        }
        if rng.bool() {
            let _ = self.gen_isa(b, rng);
        }
        let restore = if matches!(
            code,
            Code::Xsave_mem | Code::Xsaveopt_mem | Code::Xsavec_mem
        ) {
            Code::Xrstor_mem
        } else {
            Code::Xrstor64_mem
        };
        let v = rfbm(rng);
        if !b.setup(mov_reg_imm(Register::EAX, v)) || !b.setup(mov_reg_imm(Register::EDX, 0)) {
            return false;
        }
        let Some(r) = build(restore, &[Opnd::Mem(self.abs_mem(b, area))]) else {
            return false;
        };
        self.finish(b, rng, r, None)
    }

    /// XGETBV with ECX = 0 (XCR0) or 1 (XCR0 AND XINUSE).
    fn gen_xgetbv(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        // The CPU reports the host's XCR0: only comparable when the
        // interpreter can hold every component it names.
        if env::host_xcr0() != env::oracle_xcr0() {
            return false;
        }
        let ecx = if xgetbv1_on_host() { rng.below(2) } else { 0 };
        if !b.setup(mov_reg_imm(Register::ECX, ecx)) {
            return false;
        }
        let Some(i) = build(Code::Xgetbv, &[]) else {
            return false;
        };
        self.finish(b, rng, i, None)
    }
}

/// XGETBV with ECX = 1 (CPUID.(EAX=0DH,ECX=1):EAX[2]).
fn xgetbv1_on_host() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        __cpuid(0).eax >= 0xd && __cpuid_count(0xd, 1).eax & (1 << 2) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn is_gather(c: Code) -> bool {
    matches!(
        c.mnemonic(),
        Mnemonic::Vgatherdps
            | Mnemonic::Vgatherdpd
            | Mnemonic::Vgatherqps
            | Mnemonic::Vgatherqpd
            | Mnemonic::Vpgatherdd
            | Mnemonic::Vpgatherdq
            | Mnemonic::Vpgatherqd
            | Mnemonic::Vpgatherqq
    )
}

/// MULX writes operand 1 (VEX.vvvv) as well.
fn is_mulx_dest(c: Code, n: u32) -> bool {
    c.mnemonic() == Mnemonic::Mulx && n == 1
}

fn with_disp(m: Mem, add: u64) -> Mem {
    Mem {
        disp: m.disp.wrapping_add(add),
        ..m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generator produces every form it counts as generatable (the
    /// coverage report's denominator): none is dropped silently by an
    /// operand kind, an encoding or a template that never builds it.
    #[test]
    fn every_generatable_form_is_generated() {
        let mut g = Generator::new(Mode::Long64Ring3);
        if !g.isa || g.isa_groups.is_empty() {
            println!("SKIPPED: the host runs no x86-64-v2/v3 forms (no AVX in XCR0)");
            return;
        }
        g.isa_only = true;
        let mut seen = std::collections::BTreeSet::new();
        let mut rng = Rng::new(0x1919);
        for k in 0..30_000 {
            let c = g.case(&mut rng, format!("t{k}"));
            seen.extend(
                c.items
                    .iter()
                    .filter(|it| !it.setup)
                    .map(|it| it.instr.code()),
            );
        }
        let missing: Vec<String> = generatable_forms()
            .into_iter()
            .filter(|c| !seen.contains(c))
            .map(|c| format!("{c:?}"))
            .collect();
        assert!(
            missing.is_empty(),
            "never generated: {}",
            missing.join(", ")
        );
    }
}
