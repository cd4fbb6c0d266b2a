//! System instructions for the random generator: control and debug
//! register moves, descriptor-table loads (LGDT/LIDT/LLDT/LTR and their
//! stores), far transfers (direct, through call gates, IRET, far RET),
//! SYSCALL/SYSRET and SYSENTER/SYSEXIT, RDMSR/WRMSR, CPUID, INVLPG,
//! CLTS/LMSW/SMSW/SWAPGS, and accessed/dirty bits set by the code under
//! test.
//!
//! In ring 0 (64-bit, 32-bit and real mode: the emulator oracle on
//! KVM-PVM) these run; in ring 3 the privileged ones must fault. Cases
//! that need descriptors the environment lacks first load a copy of the
//! environment's GDT from the read-write window ([`GDT_COPY`], written into
//! the case's initial memory), with LDT, TSS and call-gate descriptors
//! appended, some with non-canonical bases (issue 16: LTR/LLDT from a
//! 16-byte descriptor with a non-canonical base #GP). Values are chosen so
//! that the case can still reach its terminator (paging stays on where it
//! is on, the code and stack stay mapped) or fault cleanly.

use iced_x86::{Code, Instruction, Register};

use cpu_interp::state::gpr;

use super::super::case::{Item, SdmFault};
use super::super::env;
use super::super::rng::Rng;
use super::super::{Mode, Oracle};
use super::{build, mov_mem_imm, mov_reg_imm, reg_sized, Builder, Generator, Mem, Opnd};

/// Where cases put their copy of the GDT (read-write window page 3).
pub const GDT_COPY: u64 = env::W_RW1 + 0x800;
/// Where the pseudo-descriptors for LGDT/LIDT go.
const PSEUDO: u64 = env::W_RW1 + 0x700;
/// A virtual alias of the page-table page (read-write, supervisor) that
/// ring-0 cases write page-table entries through (see `env`).
const PT_ALIAS: u64 = env::PT_ALIAS;

/// Selectors of the descriptors appended to the copy.
pub const SEL_LDT: u16 = 0x80;
pub const SEL_TSS_AVAIL: u16 = 0x90;
pub const SEL_LDT_NONCANON: u16 = 0xa0;
pub const SEL_TSS_NONCANON: u16 = 0xb0;
pub const SEL_LDT_NOT_PRESENT: u16 = 0xc0;
pub const SEL_CALL_GATE: u16 = 0xd0;
/// A ring-0 data segment whose accessed bit is clear.
pub const SEL_DATA_UNACCESSED: u16 = 0xe0;
const COPY_LIMIT: u16 = 0xef;

/// A base that is not canonical (bit 47 set, 63:48 clear).
const NONCANON: u64 = 0x0000_8000_0000_3000;
/// A canonical upper-half base.
const CANON_HIGH: u64 = 0xffff_8000_0000_3000;

/// The MSRs the generator reads and writes: those both sides hold the
/// same way (moved with the state, or segment bases), with whether their
/// value must be canonical.
const MSRS: &[(u32, bool)] = &[
    (0xc000_0100, true),  // FS_BASE
    (0xc000_0101, true),  // GS_BASE
    (0xc000_0102, true),  // KERNEL_GS_BASE
    (0xc000_0081, false), // STAR
    (0xc000_0082, true),  // LSTAR
    (0xc000_0083, true),  // CSTAR
    (0xc000_0084, false), // SFMASK
    (0x174, false),       // SYSENTER_CS
    (0x175, true),        // SYSENTER_ESP
    (0x176, true),        // SYSENTER_EIP
    (0x277, false),       // PAT
];

/// A #GP the SDM requires where KVM's emulator does not raise it.
fn gp(cond: bool, error_code: Option<u64>, erratum: &'static str) -> Option<SdmFault> {
    cond.then_some(SdmFault {
        vector: 13,
        error_code,
        erratum,
    })
}

fn is_canonical(v: u64) -> bool {
    ((v as i64) << 16 >> 16) as u64 == v
}

fn desc8(base: u64, limit: u32, access: u8, flags: u8) -> u64 {
    u64::from(limit & 0xffff)
        | ((base & 0x00ff_ffff) << 16)
        | (u64::from(access) << 40)
        | (u64::from((limit >> 16) & 0xf) << 48)
        | (u64::from(flags & 0xf) << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// The GDT copy: the environment's descriptors, then the extra ones (in
/// long mode the system descriptors take 16 bytes; in legacy mode the
/// upper halves are zero).
pub fn gdt_copy(mode: Mode) -> Vec<u8> {
    let img = env::image();
    let low = &img[0].1;
    let env_len = env::GDT_ENTRIES * 8;
    let mut g = low[env::GDT as usize..env::GDT as usize + env_len].to_vec();
    g.resize(usize::from(COPY_LIMIT) + 1, 0);
    let long = mode.long();
    let mut sys = |at: u16, base: u64, access: u8, limit: u32| {
        let lo = desc8(base, limit, access, 0);
        let a = usize::from(at);
        g[a..a + 8].copy_from_slice(&lo.to_le_bytes());
        let hi = if long { base >> 32 } else { 0 };
        g[a + 8..a + 16].copy_from_slice(&hi.to_le_bytes());
    };
    let tss = if long { env::TSS64 } else { env::TSS32 };
    sys(SEL_LDT, env::W_RW0, 0x82, 0xfff);
    sys(SEL_TSS_AVAIL, tss, 0x89, 0x67);
    sys(SEL_LDT_NONCANON, NONCANON, 0x82, 0xfff);
    sys(SEL_TSS_NONCANON, NONCANON, 0x89, 0x67);
    sys(SEL_LDT_NOT_PRESENT, env::W_RW0, 0x02, 0xfff);
    // The call gate: offset patched by the case (a label), 0 for now.
    let (gate_cs, gate_type) = if long {
        (env::SEL_CODE64, 0x8c)
    } else {
        (env::SEL_CODE32, 0x8c)
    };
    let gate = (u64::from(gate_cs) << 16) | (u64::from(gate_type as u8) << 40);
    let a = usize::from(SEL_CALL_GATE);
    g[a..a + 8].copy_from_slice(&gate.to_le_bytes());
    g[a + 8..a + 16].copy_from_slice(&0u64.to_le_bytes());
    let data = desc8(0, 0xfffff, 0x92, 0xc); // accessed bit clear
    let a = usize::from(SEL_DATA_UNACCESSED);
    g[a..a + 8].copy_from_slice(&data.to_le_bytes());
    g
}

/// What the generator knows about system state within a case.
#[derive(Clone, Debug, Default)]
pub struct SysModel {
    /// The GDT copy is loaded (GDTR points at [`GDT_COPY`]).
    pub gdt_copy: bool,
    /// A system instruction changed the privilege level or the mode:
    /// stop generating system instructions.
    pub left_ring: bool,
    /// CR0/CR4 as the case has set them (None: the environment's).
    pub cr0: Option<u64>,
    pub cr4: Option<u64>,
}

impl Generator {
    /// Append `i` as a test item that the SDM makes fault as `fault` says
    /// where KVM's emulator is known not to; an ordinary test item on the
    /// hardware oracle or without `fault`.
    fn finish_sdm(
        &mut self,
        b: &mut Builder,
        rng: &mut Rng,
        i: Instruction,
        fault: Option<SdmFault>,
    ) -> bool {
        let Some(fault) = fault.filter(|_| self.mode.oracle() == Oracle::Emulator) else {
            return self.finish(b, rng, i, None);
        };
        let mut enc = iced_x86::Encoder::new(b.bits);
        if enc.encode(&i, env::CODE).is_err() || b.writes_reserved(&i) {
            return false;
        }
        let mut it = Item::new(0, i);
        it.sdm_fault = Some(fault);
        b.push_test(it, rng)
    }

    /// One system-instruction template.
    pub(super) fn gen_system(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        if b.sys.left_ring {
            return false;
        }
        let ring0 = self.mode.ring() == 0;
        if !ring0 {
            return self.gen_privileged_in_ring3(b, rng);
        }
        match rng.below(15) {
            0 | 1 => self.gen_cr(b, rng),
            2 => self.gen_dr(b, rng),
            3 => self.gen_table_load(b, rng),
            4 | 5 => self.gen_ltr_lldt(b, rng),
            6 => self.gen_far(b, rng),
            7 => self.gen_iret(b, rng),
            8 => self.gen_syscall(b, rng),
            9 | 10 => self.gen_msr(b, rng),
            11 => self.gen_cpuid(b, rng),
            12 => self.gen_accessed_dirty(b, rng),
            13 => self.gen_segment_accessed(b, rng),
            _ => self.gen_misc_sys(b, rng),
        }
    }

    fn gpr_scratch(&self, rng: &mut Rng, size: usize) -> Register {
        let n = *rng
            .pick(if self.mode.bits() == 64 {
                &[0usize, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15][..]
            } else {
                &[0usize, 1, 2, 6, 7][..]
            })
            .unwrap_or(&0);
        reg_sized(n, size)
    }

    fn word(&self) -> usize {
        match self.mode.bits() {
            64 => 8,
            32 => 4,
            _ => 2,
        }
    }

    /// `mov reg, value` with the mode's widest register; the register.
    fn load(&self, b: &mut Builder, rng: &mut Rng, v: u64) -> Option<Register> {
        let w = self.word().max(if self.mode.bits() == 16 { 4 } else { 0 });
        let r = self.gpr_scratch(rng, w);
        b.setup(mov_reg_imm(r, v)).then_some(r)
    }

    /// The environment's (or the case's) CR0.
    fn cr0(&self, b: &Builder) -> u64 {
        b.sys
            .cr0
            .unwrap_or_else(|| env::base_state(self.mode).sregs.cr0)
    }

    fn cr4(&self, b: &Builder) -> u64 {
        b.sys
            .cr4
            .unwrap_or_else(|| env::base_state(self.mode).sregs.cr4)
    }

    /// MOV from/to CR0, CR2, CR3, CR4, CR8.
    fn gen_cr(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let long = self.mode.bits() == 64;
        let size = if long { 8 } else { 4 };
        let (to_cr, from_cr) = if long {
            (Code::Mov_cr_r64, Code::Mov_r64_cr)
        } else {
            (Code::Mov_cr_r32, Code::Mov_r32_cr)
        };
        let crs: &[Register] = if long {
            &[
                Register::CR0,
                Register::CR2,
                Register::CR3,
                Register::CR4,
                Register::CR8,
            ]
        } else {
            &[Register::CR0, Register::CR2, Register::CR3, Register::CR4]
        };
        let cr = *rng.pick(crs).unwrap_or(&Register::CR0);
        if rng.chance(1, 3) {
            let r = self.gpr_scratch(rng, size);
            let Some(i) = build(from_cr, &[Opnd::Reg(r), Opnd::Reg(cr)]) else {
                return false;
            };
            return self.finish(b, rng, i, None);
        }
        let paged = self.mode.paged();
        let v = match cr {
            Register::CR0 => {
                let cur = self.cr0(b);
                // TS, MP, EM, NE, WP, AM; CD/NW (NW without CD: #GP); a
                // reserved bit (#GP); PE/PG stay as they are.
                let toggles = [1u64 << 3, 1 << 1, 1 << 2, 1 << 5, 1 << 16, 1 << 18];
                let mut v = cur;
                for t in toggles {
                    if rng.chance(1, 4) {
                        v ^= t;
                    }
                }
                match rng.below(10) {
                    0 => v | (1 << 29), // NW alone
                    1 => v | (3 << 29),
                    2 if long => v | (1 << 40),
                    3 => v | (1 << 6), // reserved
                    _ => v,
                }
            }
            Register::CR2 => {
                if long {
                    rng.edgy(64)
                } else {
                    rng.edgy(32)
                }
            }
            Register::CR3 => {
                let base = env::base_state(self.mode).sregs.cr3;
                match rng.below(6) {
                    0 => base | 0x8,  // PWT
                    1 => base | 0x10, // PCD
                    2 if long => base | (1 << 62),
                    3 if !paged => rng.edgy(32) & 0xffff_f000,
                    _ => base,
                }
            }
            Register::CR4 => {
                let cur = self.cr4(b);
                // VME, PVI, TSD, DE, PSE, MCE, PGE, PCE, OSXMMEXCPT; PAE off
                // in long mode (#GP); a reserved bit (#GP).
                let toggles = [1u64, 2, 4, 8, 0x10, 0x40, 0x80, 0x100, 0x400];
                let mut v = cur;
                for t in toggles {
                    if rng.chance(1, 5) {
                        v ^= t;
                    }
                }
                match rng.below(10) {
                    0 if paged => v & !0x20,
                    1 => v | (1 << 15),
                    2 if long => v | (1 << 40),
                    _ => v,
                }
            }
            _ => {
                // CR8: a priority class, or a reserved bit (#GP).
                if rng.chance(1, 5) {
                    0x10 << rng.below(4)
                } else {
                    rng.below(16)
                }
            }
        };
        let Some(r) = self.load(b, rng, v) else {
            return false;
        };
        let r = reg_sized(r.full_register() as usize - Register::RAX as usize, size);
        let Some(i) = build(to_cr, &[Opnd::Reg(cr), Opnd::Reg(r)]) else {
            return false;
        };
        let upper = long && matches!(cr, Register::CR0 | Register::CR4) && v >> 32 != 0;
        if !self.finish_sdm(
            b,
            rng,
            i,
            gp(
                upper,
                Some(0),
                "MOV to CR0/CR4 with a bit of 63:32 set accepted (KVM-PVM; SDM: #GP(0))",
            ),
        ) {
            return false;
        }
        match cr {
            Register::CR0 => b.sys.cr0 = Some(v),
            Register::CR4 => b.sys.cr4 = Some(v),
            _ => {}
        }
        true
    }

    /// MOV from/to DR0-DR7 (no breakpoint enabled, no general detect).
    fn gen_dr(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let long = self.mode.bits() == 64;
        let size = if long { 8 } else { 4 };
        let (to_dr, from_dr) = if long {
            (Code::Mov_dr_r64, Code::Mov_r64_dr)
        } else {
            (Code::Mov_dr_r32, Code::Mov_r32_dr)
        };
        let drs = [
            Register::DR0,
            Register::DR1,
            Register::DR2,
            Register::DR3,
            Register::DR4,
            Register::DR5,
            Register::DR6,
            Register::DR7,
        ];
        let dr = drs[rng.below(8) as usize];
        if rng.chance(1, 3) {
            let r = self.gpr_scratch(rng, size);
            let Some(i) = build(from_dr, &[Opnd::Reg(r), Opnd::Reg(dr)]) else {
                return false;
            };
            return self.finish(b, rng, i, None);
        }
        let v = match dr {
            Register::DR6 | Register::DR4 => {
                let v = 0xffff_0ff0 | (rng.below(16)) | (rng.below(8) << 13);
                if long && rng.chance(1, 6) {
                    v | (1 << 40) // reserved: #GP
                } else {
                    v
                }
            }
            Register::DR7 | Register::DR5 => {
                // Lengths and types set, but no L0-3/G0-3 enable and no GD:
                // no breakpoint fires (issue 16 covers breakpoints).
                let v = 0x400 | (rng.next_u64() & 0xffff_0000) | (rng.below(2) << 8);
                if long && rng.chance(1, 6) {
                    v | (1 << 40)
                } else {
                    v
                }
            }
            _ => {
                if long {
                    rng.edgy(64)
                } else {
                    rng.edgy(32)
                }
            }
        };
        let Some(r) = self.load(b, rng, v) else {
            return false;
        };
        let r = reg_sized(r.full_register() as usize - Register::RAX as usize, size);
        let Some(i) = build(to_dr, &[Opnd::Reg(dr), Opnd::Reg(r)]) else {
            return false;
        };
        let upper =
            long && matches!(
                dr,
                Register::DR4 | Register::DR5 | Register::DR6 | Register::DR7
            ) && v >> 32 != 0;
        self.finish_sdm(b, rng, i, gp(upper, Some(0), "MOV to DR6/DR7 (or DR4/DR5 aliases) with a bit of 63:32 set accepted (KVM-PVM; SDM: #GP(0))"))
    }

    /// `[rbx + disp]` for linear address `t`, as an operand.
    fn at(&self, b: &Builder, t: u64) -> Mem {
        self.abs_mem(b, t)
    }

    /// Write `bytes` at `t` in the case's initial memory.
    fn patch(&self, b: &mut Builder, t: u64, bytes: &[u8]) {
        b.patches.push((t, bytes.to_vec()));
    }

    /// A pseudo-descriptor (limit, base) at [`PSEUDO`] + `k`*16.
    fn pseudo(&self, b: &mut Builder, k: u64, limit: u16, base: u64) -> u64 {
        let at = PSEUDO + k * 16;
        let mut p = limit.to_le_bytes().to_vec();
        p.extend_from_slice(&base.to_le_bytes());
        self.patch(b, at, &p);
        at
    }

    fn lgdt_code(&self) -> (Code, Code, Code, Code) {
        match self.mode.bits() {
            64 => (
                Code::Lgdt_m1664,
                Code::Lidt_m1664,
                Code::Sgdt_m1664,
                Code::Sidt_m1664,
            ),
            32 => (
                Code::Lgdt_m1632,
                Code::Lidt_m1632,
                Code::Sgdt_m1632,
                Code::Sidt_m1632,
            ),
            _ => (
                Code::Lgdt_m1632_16,
                Code::Lidt_m1632_16,
                Code::Sgdt_m1632_16,
                Code::Sidt_m1632_16,
            ),
        }
    }

    /// Load the GDT copy (once per case).
    fn load_gdt_copy(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        if b.sys.gdt_copy {
            return true;
        }
        let copy = gdt_copy(self.mode);
        self.patch(b, GDT_COPY, &copy);
        let at = self.pseudo(b, 0, COPY_LIMIT, GDT_COPY);
        let (lgdt, ..) = self.lgdt_code();
        let m = self.at(b, at);
        let Some(i) = build(lgdt, &[Opnd::Mem(m)]) else {
            return false;
        };
        let _ = rng;
        if !b.setup(Some(i)) {
            return false;
        }
        b.sys.gdt_copy = true;
        true
    }

    /// LGDT/LIDT (same tables, another limit, a non-canonical base) and
    /// SGDT/SIDT.
    fn gen_table_load(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let (lgdt, lidt, sgdt, sidt) = self.lgdt_code();
        if rng.chance(1, 3) {
            let code = if rng.bool() { sgdt } else { sidt };
            let t = (env::W_RW0 + rng.below(0xff0)) & !1;
            let m = self.at(b, t);
            let Some(i) = build(code, &[Opnd::Mem(m)]) else {
                return false;
            };
            return self.finish(b, rng, i, None);
        }
        let s = env::base_state(self.mode).sregs;
        let idt = rng.bool();
        let (code, cur) = if idt { (lidt, s.idt) } else { (lgdt, s.gdt) };
        let long = self.mode.bits() == 64;
        let (limit, base) = match rng.below(5) {
            0 if long => (cur.limit, NONCANON | cur.base),
            1 if long => (cur.limit, CANON_HIGH),
            2 => (cur.limit.saturating_add(rng.below(0x100) as u16), cur.base),
            _ if !idt => {
                self.patch(b, GDT_COPY, &gdt_copy(self.mode));
                (COPY_LIMIT, GDT_COPY)
            }
            _ => (cur.limit, cur.base),
        };
        let at = self.pseudo(b, 1 + rng.below(4), limit, base);
        let m = self.at(b, at);
        let Some(i) = build(code, &[Opnd::Mem(m)]) else {
            return false;
        };
        let noncanon = long && !is_canonical(base);
        if !self.finish_sdm(b, rng, i, gp(noncanon, Some(0), "LGDT/LIDT of a non-canonical base accepted (KVM-PVM; APM and KVM's own emulator: #GP(0))")) {
            return false;
        }
        if !idt && base == GDT_COPY {
            b.sys.gdt_copy = true;
        }
        // A table moved into the non-canonical hole or the upper half
        // breaks every later exception: end the system part here.
        if base == CANON_HIGH {
            b.sys.left_ring = true;
        }
        true
    }

    /// LTR / LLDT from the GDT copy (canonical and non-canonical bases,
    /// busy and available TSSs, a not-present LDT, null), SLDT / STR.
    fn gen_ltr_lldt(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        if self.mode.real() {
            // #UD in real mode.
            let Some(i) = build(Code::Ltr_rm16, &[Opnd::Reg(Register::AX)]) else {
                return false;
            };
            return self.finish(b, rng, i, None);
        }
        if !self.load_gdt_copy(b, rng) {
            return false;
        }
        let ltr = rng.bool();
        let sel = if ltr {
            *rng.pick(&[
                SEL_TSS_AVAIL,
                SEL_TSS_AVAIL,
                SEL_TSS_NONCANON,
                SEL_TSS_NONCANON,
                env::SEL_TSS64,
                SEL_LDT,
                0,
            ])
            .unwrap_or(&SEL_TSS_AVAIL)
        } else {
            *rng.pick(&[
                SEL_LDT,
                SEL_LDT,
                SEL_LDT_NONCANON,
                SEL_LDT_NONCANON,
                SEL_LDT_NOT_PRESENT,
                SEL_TSS_AVAIL,
                0,
                3,
            ])
            .unwrap_or(&SEL_LDT)
        };
        let (code, store) = if ltr {
            (Code::Ltr_rm16, Code::Str_rm16)
        } else {
            (Code::Lldt_rm16, Code::Sldt_rm16)
        };
        let i = if rng.chance(1, 3) {
            let t = (env::W_RW0 + rng.below(0xff0)) & !1;
            let m = self.at(b, t);
            if !b.setup(mov_mem_imm(m, 2, u64::from(sel))) {
                return false;
            }
            build(code, &[Opnd::Mem(m)])
        } else {
            let Some(r) = self.load(b, rng, u64::from(sel)) else {
                return false;
            };
            let r16 = reg_sized(r.full_register() as usize - Register::RAX as usize, 2);
            build(code, &[Opnd::Reg(r16)])
        };
        let Some(i) = i else { return false };
        let noncanon = self.mode.long() && (sel == SEL_TSS_NONCANON || sel == SEL_LDT_NONCANON);
        let erratum = if ltr {
            "LTR of a 16-byte TSS descriptor with a non-canonical base accepted (KVM-PVM; SDM: #GP(selector))"
        } else {
            "LLDT of a 16-byte LDT descriptor with a non-canonical base accepted (KVM-PVM; SDM: #GP(selector))"
        };
        if !self.finish_sdm(b, rng, i, gp(noncanon, Some(u64::from(sel)), erratum)) {
            return false;
        }
        if rng.bool() {
            let r = self.gpr_scratch(rng, 2);
            if let Some(s) = build(store, &[Opnd::Reg(r)]) {
                let _ = self.finish(b, rng, s, None);
            }
        }
        true
    }

    /// Far JMP/CALL (through memory, to a code segment or through the
    /// call gate) and far RET, to the next item.
    fn gen_far(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let bits = self.mode.bits();
        let w = self.word();
        let cs = env::base_state(self.mode).sregs.cs.selector;
        // Up to 3 setups (gate offset, pointer offset, selector) and the
        // transfer: the target lies beyond.
        let target = b.next_id + 4 + rng.below(2) as usize;
        // Far transfers through call gates have no oracle on KVM-PVM (its
        // emulator refuses them in ring 0; in ring 3 they come back as
        // #UD) and the interpreter does not implement gates: not
        // generated (docs/DIFFTEST.md).
        let gate = false;
        if gate && !self.load_gdt_copy(b, rng) {
            return false;
        }
        if gate {
            // The gate's offset (bits 15:0) is the target label; the rest
            // of the offset is 0 (the code page is below 64 KiB).
            let m = self.at(b, GDT_COPY + u64::from(SEL_CALL_GATE));
            let Some(s) = mov_mem_imm(m, 2, 0) else {
                return false;
            };
            let mut it = Item::new(0, s);
            it.setup = true;
            it.imm_target = Some(target);
            if b.push_item(it).is_err() {
                return false;
            }
        }
        match rng.below(3) {
            0 | 1 => {
                // jmp/call far [m]: m16:16/32/64 pointer in the window.
                let call = rng.bool();
                let t = (env::W_RW0 + rng.below(0xfe0)) & !7;
                // (m16:64 only on the hardware oracle: KVM's emulator
                // refuses it.)
                let wide = self.mode.oracle() == Oracle::Hardware && rng.chance(1, 4);
                let (code, off_size) = match (bits, call, wide) {
                    (64, false, true) => (Code::Jmp_m1664, 8),
                    (64, true, true) => (Code::Call_m1664, 8),
                    (16, false, _) => (Code::Jmp_m1616, 2),
                    (16, true, _) => (Code::Call_m1616, 2),
                    (_, false, _) => (Code::Jmp_m1632, 4),
                    (_, true, _) => (Code::Call_m1632, 4),
                };
                let m = self.at(b, t);
                let sel = if gate {
                    SEL_CALL_GATE
                } else if rng.chance(1, 8) && !self.mode.real() {
                    // A data segment: #GP(selector).
                    env::SEL_DATA0
                } else {
                    cs
                };
                let off_setup = mov_mem_imm(m, off_size.min(4), 0);
                let Some(s) = off_setup else { return false };
                let mut it = Item::new(0, s);
                it.setup = true;
                it.imm_target = Some(target);
                if b.push_item(it).is_err() {
                    return false;
                }
                let mut sel_mem = m;
                sel_mem.disp = m.disp.wrapping_add(off_size as u64);
                if bits == 64 {
                    sel_mem.disp = sel_mem.disp as i32 as i64 as u64;
                }
                if !b.setup(mov_mem_imm(sel_mem, 2, u64::from(sel))) {
                    return false;
                }
                let Some(i) = build(code, &[Opnd::Mem(m)]) else {
                    return false;
                };
                self.finish(b, rng, i, Some(target))
            }
            _ => {
                // push cs; push label; retf
                let (push_imm, retf) = match bits {
                    64 => (Code::Pushq_imm32, Code::Retfq),
                    32 => (Code::Pushd_imm32, Code::Retfd),
                    _ => (Code::Push_imm16, Code::Retfw),
                };
                let _ = w;
                if !b.setup(build(push_imm, &[Opnd::Imm(u64::from(cs))])) {
                    return false;
                }
                let Some(p) = build(push_imm, &[Opnd::Imm(0)]) else {
                    return false;
                };
                let mut it = Item::new(0, p);
                it.setup = true;
                it.imm_target = Some(target);
                if b.push_item(it).is_err() {
                    return false;
                }
                self.finish(b, rng, crate::difftest::case::bare(retf), Some(target))
            }
        }
    }

    /// IRET to the next item at the same privilege level (or, in 64-bit
    /// mode, sometimes to ring 3: the rest of the case then runs in user
    /// mode).
    fn gen_iret(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        if self.mode == Mode::Prot32Ring0 {
            // KVM's emulator refuses protected-mode IRET (no oracle).
            return self.gen_misc_sys(b, rng);
        }
        let bits = self.mode.bits();
        let st = env::base_state(self.mode);
        let (push, iret) = match bits {
            64 => (Code::Pushq_imm32, Code::Iretq),
            32 => (Code::Pushd_imm32, Code::Iretd),
            _ => (Code::Push_imm16, Code::Iretw),
        };
        // Flags the IRET loads: arithmetic flags and DF (no TF, no IF
        // change in ring 0 cases: interrupts are not modelled).
        let flags = 2 | (rng.next_u64() & (super::super::case::ARITH | (1 << 10)));
        let to_user = bits == 64 && rng.chance(1, 4);
        if bits == 64 {
            // KVM-PVM raises #GP(0) at an IRETQ executed with RFLAGS.AC set
            // (settled; the SDM has no such condition): clear it first.
            if !b.setup(build(push, &[Opnd::Imm(2)]))
                || !b.setup(Some(crate::difftest::case::bare(Code::Popfq)))
            {
                return false;
            }
        }
        if to_user {
            // DS/ES of DPL 0 would be nulled by the return to ring 3 (SDM
            // IRET); KVM-PVM keeps them (settled): give them the ring-3
            // data selector first.
            let Some(r) = self.load(b, rng, u64::from(env::SEL_DATA3)) else {
                return false;
            };
            let r16 = reg_sized(r.full_register() as usize - Register::RAX as usize, 2);
            for sr in [Register::DS, Register::ES] {
                if !b.setup(build(Code::Mov_Sreg_rm16, &[Opnd::Reg(sr), Opnd::Reg(r16)])) {
                    return false;
                }
            }
        }
        // Up to 5 pushes, then IRET: the target lies beyond.
        let target = b.next_id + 6 + rng.below(2) as usize;
        let mut pushes: Vec<u64> = Vec::new();
        if bits == 64 {
            let (ss, rsp) = if to_user {
                (
                    u64::from(env::SEL_DATA3),
                    b.model.rsp.wrapping_sub(0x80) & !7,
                )
            } else {
                (u64::from(st.sregs.ss.selector), b.model.rsp)
            };
            pushes.push(ss);
            pushes.push(rsp);
        }
        pushes.push(flags | if to_user { env::RFLAGS_IF } else { 0 });
        pushes.push(u64::from(if to_user {
            env::SEL_CODE64_3
        } else {
            st.sregs.cs.selector
        }));
        for v in pushes {
            if !b.setup(build(push, &[Opnd::Imm(v)])) {
                return false;
            }
        }
        let Some(p) = build(push, &[Opnd::Imm(0)]) else {
            return false;
        };
        let mut it = Item::new(0, p);
        it.setup = true;
        it.imm_target = Some(target);
        if b.push_item(it).is_err() {
            return false;
        }
        let rsp_before = b.model.rsp;
        if !self.finish(b, rng, crate::difftest::case::bare(iret), Some(target)) {
            return false;
        }
        if bits == 64 {
            // IRETQ loads RSP from the frame.
            b.model.rsp = if to_user {
                rsp_before.wrapping_sub(0x80) & !7
            } else {
                b.model.rsp
            };
        }
        if to_user {
            // The rest runs in ring 3, where KVM-PVM's view of the state
            // is the host's: end the case (its terminator #GPs there).
            b.sys.left_ring = true;
            b.done = true;
        }
        true
    }

    /// `mov ecx, msr; mov edx, hi; mov eax, lo; wrmsr` as setups (4
    /// items); the EAX move carries `label` as its immediate if given.
    fn wrmsr_setup(&self, b: &mut Builder, msr: u32, v: u64, label: Option<usize>) -> bool {
        if !b.setup(mov_reg_imm(Register::ECX, u64::from(msr)))
            || !b.setup(mov_reg_imm(Register::EDX, v >> 32))
        {
            return false;
        }
        let Some(a) = mov_reg_imm(Register::EAX, v & 0xffff_ffff) else {
            return false;
        };
        let mut it = Item::new(0, a);
        it.setup = true;
        it.imm_target = label;
        if b.push_item(it).is_err() {
            return false;
        }
        b.setup(Some(crate::difftest::case::bare(Code::Wrmsr)))
    }

    /// SYSCALL (to LSTAR) and SYSRET (to ring 3), SYSENTER and SYSEXIT (to
    /// ring 3), with their MSRs set by WRMSR first; SYSCALL with EFER.SCE
    /// clear (#UD), SYSENTER with SYSENTER_CS = 0 (#GP).
    fn gen_syscall(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        if self.mode.real() {
            // SYSCALL: #UD in real mode; SYSENTER: #GP(0).
            let i = if rng.bool() {
                Code::Syscall
            } else {
                Code::Sysenter
            };
            return self.finish(b, rng, crate::difftest::case::bare(i), None);
        }
        let long = self.mode.bits() == 64;
        let efer = env::base_state(self.mode).sregs.efer;
        // STAR: kernel CS 0x08 (SS 0x10); user base 0x18, so that SYSRET
        // loads CS 0x2b and SS 0x23 (the environment's ring-3 selectors).
        let star = (0x18u64 << 48) | (u64::from(env::SEL_CODE64) << 32);
        let skip = rng.below(2) as usize;
        match rng.below(if long { 4 } else { 2 }) {
            0 | 1 if !long || rng.bool() => {
                // SYSENTER: 3 WRMSRs (12 items), then the instruction; the
                // target leaves room for a flag definer before it.
                let target = b.next_id + 14 + skip;
                let cs = if long {
                    env::SEL_CODE64
                } else {
                    env::SEL_CODE32
                };
                let cs = if rng.chance(1, 8) { 0 } else { cs };
                let rsp = b.model.rsp;
                if !self.wrmsr_setup(b, 0x174, u64::from(cs), None)
                    || !self.wrmsr_setup(b, 0x175, rsp, None)
                    || !self.wrmsr_setup(b, 0x176, 0, Some(target))
                {
                    return false;
                }
                self.finish(
                    b,
                    rng,
                    crate::difftest::case::bare(Code::Sysenter),
                    Some(target),
                )
            }
            0 | 1 => {
                // SYSEXIT (64-bit) to ring 3 at RDX with RSP = RCX.
                let target = b.next_id + 8 + skip;
                let rsp = b.model.rsp.wrapping_sub(0x40) & !7;
                if !self.wrmsr_setup(b, 0x174, u64::from(env::SEL_CODE64), None)
                    || !b.setup(mov_reg_imm(Register::RCX, rsp))
                {
                    return false;
                }
                let Some(d) = mov_reg_imm(Register::EDX, 0) else {
                    return false;
                };
                let mut it = Item::new(0, d);
                it.setup = true;
                it.imm_target = Some(target);
                if b.push_item(it).is_err() {
                    return false;
                }
                if !self.finish(
                    b,
                    rng,
                    crate::difftest::case::bare(Code::Sysexitq),
                    Some(target),
                ) {
                    return false;
                }
                b.model.rsp = rsp;
                b.sys.left_ring = true;
                b.done = true;
                true
            }
            2 => {
                // SYSCALL: EFER.SCE (or not), STAR, SFMASK, LSTAR: 16
                // items, a definer (SYSCALL reads RFLAGS), the instruction.
                let target = b.next_id + 18 + skip;
                let sce = !rng.chance(1, 8);
                let sfmask = rng.next_u64() & 0x4d5;
                if !self.wrmsr_setup(b, 0xc000_0080, efer | u64::from(sce), None)
                    || !self.wrmsr_setup(b, 0xc000_0081, star, None)
                    || !self.wrmsr_setup(b, 0xc000_0084, sfmask, None)
                    || !self.wrmsr_setup(b, 0xc000_0082, 0, Some(target))
                {
                    return false;
                }
                self.finish(
                    b,
                    rng,
                    crate::difftest::case::bare(Code::Syscall),
                    Some(target),
                )
            }
            _ => {
                // SYSRETQ to ring 3 at RCX with RFLAGS = R11.
                let target = b.next_id + 11 + skip;
                // KVM-PVM's SYSRET does not load R11's arithmetic flags
                // (settled; SDM: RFLAGS <- R11 & 3C7FD7H | 2): IF only.
                let flags = 2 | env::RFLAGS_IF;
                if !self.wrmsr_setup(b, 0xc000_0080, efer | 1, None)
                    || !self.wrmsr_setup(b, 0xc000_0081, star, None)
                    || !b.setup(mov_reg_imm(Register::R11, flags))
                {
                    return false;
                }
                let Some(c) = mov_reg_imm(Register::ECX, 0) else {
                    return false;
                };
                let mut it = Item::new(0, c);
                it.setup = true;
                it.imm_target = Some(target);
                if b.push_item(it).is_err() {
                    return false;
                }
                if !self.finish(
                    b,
                    rng,
                    crate::difftest::case::bare(Code::Sysretq),
                    Some(target),
                ) {
                    return false;
                }
                b.sys.left_ring = true;
                b.done = true;
                true
            }
        }
    }

    /// RDMSR/WRMSR of the compared MSRs, with canonical, non-canonical and
    /// reserved values; an MSR neither side implements (#GP).
    fn gen_msr(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let (msr, canon) = *rng.pick(MSRS).unwrap_or(&(0xc000_0100, true));
        let msr = if rng.chance(1, 12) { 0x4000_1234 } else { msr };
        if !b.setup(mov_reg_imm(Register::ECX, u64::from(msr))) {
            return false;
        }
        if rng.chance(1, 3) {
            return self.finish(b, rng, crate::difftest::case::bare(Code::Rdmsr), None);
        }
        let v = match msr {
            0x277 => {
                // PAT: valid types 0,1,4,5,6,7 per byte (KVM-PVM takes
                // invalid ones, which the SDM makes #GP: not generated).
                let mut v = 0u64;
                for k in 0..8 {
                    let t = *rng.pick(&[0u64, 1, 4, 5, 6, 7]).unwrap_or(&6);
                    v |= t << (8 * k);
                }
                v
            }
            0x174 => rng.below(0x10000),
            // SFMASK's upper half is reserved; KVM keeps what is written
            // there, the interpreter drops it (not compared: see
            // docs/DIFFTEST.md).
            0xc000_0084 => rng.edgy(32),
            _ if canon => match rng.below(6) {
                0 => NONCANON | rng.below(0x1000),
                1 => 0x7fff_ffff_ffff,
                2 => 0x8000_0000_0000,
                3 => CANON_HIGH,
                4 => 0xffff_0000_0000_0000 | rng.below(0x1_0000_0000),
                // A window address (a usable FS/GS base).
                _ => env::W_RW0 + rng.below(0x1000),
            },
            _ => rng.edgy(64),
        };
        if !b.setup(mov_reg_imm(Register::EDX, v >> 32)) {
            return false;
        }
        if !b.setup(mov_reg_imm(Register::EAX, v & 0xffff_ffff)) {
            return false;
        }
        let noncanon = canon && msr != 0x4000_1234 && !is_canonical(v);
        if !self.finish_sdm(b, rng, crate::difftest::case::bare(Code::Wrmsr), gp(noncanon, Some(0), "WRMSR of a non-canonical value to FS_BASE/GS_BASE/KERNEL_GS_BASE/LSTAR/CSTAR/SYSENTER_EIP/ESP accepted (KVM-PVM; SDM: #GP(0))")) {
            return false;
        }
        // A read back, sometimes.
        if rng.bool() {
            let _ = self.finish(b, rng, crate::difftest::case::bare(Code::Rdmsr), None);
        }
        true
    }

    /// CPUID of a standard, extended or out-of-range leaf.
    fn gen_cpuid(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let leaf = *rng
            .pick(&[
                0u64,
                1,
                4,
                7,
                0xb,
                0xd,
                0x8000_0000,
                0x8000_0001,
                0x8000_0008,
                0x4000_0000,
                0x1234,
            ])
            .unwrap_or(&0);
        if !b.setup(mov_reg_imm(Register::EAX, leaf)) {
            return false;
        }
        if !b.setup(mov_reg_imm(Register::ECX, rng.below(3))) {
            return false;
        }
        // CPUID writes RBX, which holds a window address: push it as a
        // test item (not through `finish`, which refuses writes of the
        // reserved registers), then restore RBX. Its four results are
        // configuration, not semantics (KVM's guest CPUID is the host's,
        // the interpreter's is duet's model): the analysis leaves them
        // undefined.
        let mut enc = iced_x86::Encoder::new(b.bits);
        let i = crate::difftest::case::bare(Code::Cpuid);
        if enc.encode(&i, env::CODE).is_err() {
            return false;
        }
        if !b.push_test(Item::new(0, i), rng) {
            return false;
        }
        let rbx = b.model.rbx;
        let r = reg_sized(gpr::RBX, if self.mode.bits() == 64 { 8 } else { 4 });
        b.setup(mov_reg_imm(r, rbx))
    }

    /// Accessed and dirty bits: a ring-0 case in 64-bit mode clears A and D
    /// in the page-table entry of a window page through the page-table
    /// alias, INVLPGs it, then the code under test reads or writes it; the
    /// memory comparison covers the page tables.
    fn gen_accessed_dirty(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        if self.mode != Mode::Long64Ring0 || self.mode.oracle() != Oracle::Emulator {
            return self.gen_misc_sys(b, rng);
        }
        let page = *rng
            .pick(&[env::W_RO, env::W_SUP, env::W_RW0, env::W_RW1])
            .unwrap_or(&env::W_RW0);
        let pte_at = PT_ALIAS + (page >> 12) * 8;
        let pte = (page | env::page_flags(page)) & !0x60;
        let m = self.at(b, pte_at);
        let Some(r) = self.load(b, rng, pte) else {
            return false;
        };
        let r64 = reg_sized(r.full_register() as usize - Register::RAX as usize, 8);
        if !b.setup(build(Code::Mov_rm64_r64, &[Opnd::Mem(m), Opnd::Reg(r64)])) {
            return false;
        }
        let target = self.at(b, page + rng.below(0xff8));
        let Some(inv) = build(Code::Invlpg_m, &[Opnd::Mem(target)]) else {
            return false;
        };
        if !self.finish(b, rng, inv, None) {
            return false;
        }
        // The access (a read, a write, or none: then A stays clear).
        let t = self.at(b, page + rng.below(0xff8));
        let r2 = self.gpr_scratch(rng, 8);
        let acc = match rng.below(3) {
            0 => build(Code::Mov_r64_rm64, &[Opnd::Reg(r2), Opnd::Mem(t)]),
            1 => build(Code::Mov_rm64_r64, &[Opnd::Mem(t), Opnd::Reg(r2)]),
            _ => return true,
        };
        let Some(acc) = acc else { return false };
        self.finish(b, rng, acc, None)
    }

    /// A segment load from the GDT copy's descriptor without its accessed
    /// bit: the CPU sets it (in the copy, which is compared).
    fn gen_segment_accessed(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        if self.mode.real() || !self.load_gdt_copy(b, rng) {
            return self.gen_misc_sys(b, rng);
        }
        let Some(r) = self.load(b, rng, u64::from(SEL_DATA_UNACCESSED)) else {
            return false;
        };
        let r16 = reg_sized(r.full_register() as usize - Register::RAX as usize, 2);
        let seg = *rng
            .pick(&[Register::DS, Register::ES, Register::FS, Register::GS])
            .unwrap_or(&Register::ES);
        let Some(i) = build(Code::Mov_Sreg_rm16, &[Opnd::Reg(seg), Opnd::Reg(r16)]) else {
            return false;
        };
        self.finish(b, rng, i, None)
    }

    /// CLTS, LMSW, SMSW, SWAPGS, INVLPG, WBINVD.
    fn gen_misc_sys(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let i = match rng.below(6) {
            0 => Some(crate::difftest::case::bare(Code::Clts)),
            1 => {
                let cr0 = self.cr0(b);
                // LMSW can set PE but never clear it; keep MP/EM/TS toggles.
                let v = (cr0 & 0xffff) ^ (rng.below(8) << 1);
                let Some(r) = self.load(b, rng, v) else {
                    return false;
                };
                let r16 = reg_sized(r.full_register() as usize - Register::RAX as usize, 2);
                if let Some(c) = b.sys.cr0.as_mut() {
                    *c = (*c & !0xe) | (v & 0xe);
                } else {
                    b.sys.cr0 = Some((cr0 & !0xe) | (v & 0xe));
                }
                build(Code::Lmsw_rm16, &[Opnd::Reg(r16)])
            }
            2 => {
                let r = self.gpr_scratch(rng, 2);
                build(Code::Smsw_rm16, &[Opnd::Reg(r)])
            }
            3 if self.mode.bits() == 64 => Some(crate::difftest::case::bare(Code::Swapgs)),
            4 if self.mode.paged() => {
                let t = self.at(b, env::W_RW0 + rng.below(0x2000));
                build(Code::Invlpg_m, &[Opnd::Mem(t)])
            }
            _ => Some(crate::difftest::case::bare(Code::Wbinvd)),
        };
        let Some(i) = i else { return false };
        self.finish(b, rng, i, None)
    }

    /// In ring 3 a privileged system instruction raises #GP(0) (the case
    /// ends there).
    fn gen_privileged_in_ring3(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let long = self.mode.bits() == 64;
        // (Not on the hardware oracle: a far JMP with a guest selector is
        // emulated by KVM-PVM there too, and that clears RFLAGS.NT.)
        if self.mode.long() && self.mode.oracle() == Oracle::Emulator && rng.chance(1, 4) {
            return self.gen_far_ring3(b, rng);
        }
        let r = if long { Register::RAX } else { Register::EAX };
        let i = match rng.below(10) {
            0 => build(
                if long {
                    Code::Mov_cr_r64
                } else {
                    Code::Mov_cr_r32
                },
                &[Opnd::Reg(Register::CR0), Opnd::Reg(r)],
            ),
            1 => build(
                if long {
                    Code::Mov_r64_cr
                } else {
                    Code::Mov_r32_cr
                },
                &[Opnd::Reg(r), Opnd::Reg(Register::CR3)],
            ),
            2 => build(
                if long {
                    Code::Mov_dr_r64
                } else {
                    Code::Mov_dr_r32
                },
                &[Opnd::Reg(Register::DR7), Opnd::Reg(r)],
            ),
            3 => Some(crate::difftest::case::bare(Code::Wrmsr)),
            4 => Some(crate::difftest::case::bare(Code::Rdmsr)),
            5 => {
                let t = self.at(b, env::W_RW0 + rng.below(0xff0));
                build(Code::Invlpg_m, &[Opnd::Mem(t)])
            }
            6 => {
                let (lgdt, ..) = self.lgdt_code();
                let t = self.at(b, env::W_RW0 + rng.below(0xff0));
                build(lgdt, &[Opnd::Mem(t)])
            }
            7 => build(Code::Ltr_rm16, &[Opnd::Reg(Register::AX)]),
            8 => Some(crate::difftest::case::bare(Code::Clts)),
            _ => Some(crate::difftest::case::bare(if long {
                Code::Swapgs
            } else {
                Code::Clts
            })),
        };
        let Some(i) = i else { return false };
        self.finish(b, rng, i, None)
    }

    /// In ring 3 (long mode): a far JMP through memory to the next item
    /// in the same code segment, or to a ring-0 code segment (#GP).
    fn gen_far_ring3(&mut self, b: &mut Builder, rng: &mut Rng) -> bool {
        let bits = self.mode.bits();
        let cs = if rng.chance(1, 4) {
            env::SEL_CODE64
        } else {
            env::base_state(self.mode).sregs.cs.selector
        };
        let t = (env::W_RW0 + rng.below(0xfe0)) & !7;
        let m = self.at(b, t);
        let (off_size, jmp) = match bits {
            16 => (2, Code::Jmp_m1616),
            _ => (4, Code::Jmp_m1632),
        };
        let mut sel_mem = m;
        sel_mem.disp = m.disp.wrapping_add(off_size as u64);
        if bits == 64 {
            sel_mem.disp = sel_mem.disp as i32 as i64 as u64;
        } else if bits == 16 {
            sel_mem.disp &= 0xffff;
        }
        // Direct far JMP to the next item.
        let target = b.next_id + 3 + rng.below(2) as usize;
        let Some(s) = mov_mem_imm(m, off_size, 0) else {
            return false;
        };
        let mut it = Item::new(0, s);
        it.setup = true;
        it.imm_target = Some(target);
        if b.push_item(it).is_err() || !b.setup(mov_mem_imm(sel_mem, 2, u64::from(cs))) {
            return false;
        }
        let Some(i) = build(jmp, &[Opnd::Mem(m)]) else {
            return false;
        };
        self.finish(b, rng, i, Some(target))
    }
}
