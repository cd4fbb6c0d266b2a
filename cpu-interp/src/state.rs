//! Plain, backend-neutral x86-64 CPU state.
//!
//! These structs are the currency between backends: the KVM backend converts
//! its kvm-bindings structures to and from them, the interpreter runs on them
//! directly, and later snapshots serialise them. They hold data only.

/// Indices into [`Regs::gpr`].
pub mod gpr {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
    pub const R8: usize = 8;
    pub const R9: usize = 9;
    pub const R10: usize = 10;
    pub const R11: usize = 11;
    pub const R12: usize = 12;
    pub const R13: usize = 13;
    pub const R14: usize = 14;
    pub const R15: usize = 15;
}

/// General-purpose registers, RIP and RFLAGS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Regs {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15 (hardware encoding order).
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    /// Limit in bytes (already scaled by the granularity bit).
    pub limit: u32,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    /// S bit: 1 for code/data, 0 for system segments.
    pub s: bool,
    pub dpl: u8,
    pub present: bool,
    pub avl: bool,
    /// L bit (64-bit code segment).
    pub l: bool,
    /// D/B bit (default operation size / big).
    pub db: bool,
    /// Granularity bit (kept for round trips; `limit` is already scaled).
    pub g: bool,
    /// Unusable segment (a null selector loaded in protected mode).
    pub unusable: bool,
}

impl Segment {
    /// A real-mode style segment: base = selector << 4, 64 KiB limit.
    pub fn real_mode(selector: u16, code: bool) -> Self {
        Segment {
            selector,
            base: u64::from(selector) << 4,
            limit: 0xffff,
            type_: if code { 0xb } else { 0x3 },
            s: true,
            dpl: 0,
            present: true,
            ..Default::default()
        }
    }

    /// A flat system segment (used for LDTR/TR defaults).
    pub fn system(type_: u8) -> Self {
        Segment {
            limit: 0xffff,
            type_,
            present: true,
            ..Default::default()
        }
    }
}

/// GDTR / IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, control and descriptor-table registers plus EFER and APIC base.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// Debug registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DebugRegs {
    pub db: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
}

/// x87 / MMX / SSE state in the FXSAVE layout's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FpuState {
    /// ST0..ST7 as 80-bit values in physical register order R0..R7
    /// (the FXSAVE image stores them by stack position; converters rotate).
    pub st: [[u8; 10]; 8],
    pub fcw: u16,
    pub fsw: u16,
    /// Full (not abridged) tag word: 2 bits per physical register.
    pub ftw: u16,
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    pub xmm: [u128; 16],
    pub mxcsr: u32,
    /// Bits 255:128 of YMM0..YMM15 (XSAVE state component 2, AVX); the
    /// low halves are `xmm`.
    pub ymm_hi: [u128; 16],
}

impl Default for FpuState {
    fn default() -> Self {
        FpuState {
            st: [[0; 10]; 8],
            fcw: 0x37f,
            fsw: 0,
            ftw: 0xffff,
            fop: 0,
            fip: 0,
            fdp: 0,
            xmm: [0; 16],
            mxcsr: 0x1f80,
            ymm_hi: [0; 16],
        }
    }
}

/// MSR numbers the interpreter models (and the KVM backend transfers).
pub mod msr {
    pub const TSC: u32 = 0x10;
    pub const APIC_BASE: u32 = 0x1b;
    pub const BIOS_SIGN_ID: u32 = 0x8b;
    pub const ARCH_CAPABILITIES: u32 = 0x10a;
    pub const MTRRCAP: u32 = 0xfe;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MISC_ENABLE: u32 = 0x1a0;
    pub const XSS: u32 = 0xda0;
    pub const PAT: u32 = 0x277;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const EFER: u32 = 0xc000_0080;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SFMASK: u32 = 0xc000_0084;
    pub const FS_BASE: u32 = 0xc000_0100;
    pub const GS_BASE: u32 = 0xc000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const TSC_AUX: u32 = 0xc000_0103;
}

/// MSRs that live outside [`Sregs`] (EFER and APIC base are there;
/// FS/GS bases are in the segment caches).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub pat: u64,
    pub tsc_aux: u64,
    pub misc_enable: u64,
    /// Memory-type range registers (the interpreter keeps what the guest
    /// writes; KVM keeps its own).
    pub mtrr: Mtrrs,
}

/// The MTRRs: default type, the 16 variable-range MSRs (0x200-0x20f, base
/// and mask pairs) and the 11 fixed-range MSRs, in MSR order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mtrrs {
    pub def_type: u64,
    pub variable: [u64; 16],
    pub fixed: [u64; 11],
}

/// The fixed-range MTRR MSR numbers, in [`Mtrrs::fixed`] order.
pub const MTRR_FIXED_MSRS: [u32; 11] = [
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
];
/// The first variable-range MTRR MSR (PHYSBASE0).
pub const MTRR_VARIABLE_FIRST: u32 = 0x200;

impl Default for Mtrrs {
    /// What RDMSR returns before the guest writes them: write-back default
    /// type, MTRRs enabled, fixed ranges write-back.
    fn default() -> Self {
        Mtrrs {
            def_type: 0xc06,
            variable: [0; 16],
            fixed: [0x0606_0606_0606_0606; 11],
        }
    }
}

impl Default for Msrs {
    fn default() -> Self {
        Msrs {
            star: 0,
            lstar: 0,
            cstar: 0,
            sfmask: 0,
            kernel_gs_base: 0,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            pat: 0x0007_0406_0007_0406,
            tsc_aux: 0,
            misc_enable: 1, // fast strings
            mtrr: Mtrrs::default(),
        }
    }
}

/// Interrupt-related state that is not in registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingEvents {
    /// An external interrupt accepted for injection but not yet delivered.
    pub interrupt: Option<u8>,
    /// An NMI is pending.
    pub nmi_pending: bool,
    /// NMIs are blocked (inside an NMI handler until IRET).
    pub nmi_masked: bool,
    /// STI interrupt shadow active for the next instruction.
    pub sti_shadow: bool,
    /// MOV SS / POP SS shadow active for the next instruction.
    pub mov_ss_shadow: bool,
    /// The CPU is halted waiting for an interrupt.
    pub halted: bool,
    /// A single-step #DB trap is due before the next instruction: the
    /// instruction that took it ended in an exit to the VMM (a port write
    /// that stops the VM, say) before the trap could be delivered.
    pub single_step_pending: bool,
}

/// XSAVE-managed state beyond x87, SSE and AVX (those are in
/// [`FpuState`]), and the XSAVE bookkeeping. The interpreter implements no
/// AVX-512 instruction, but a KVM guest's CPUID may enable the AVX-512 and
/// PKRU components: the interpreter then carries them unchanged through
/// XSAVE/XRSTOR (and zeroes the ZMM upper bits a VEX instruction clears).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct XState {
    /// XINUSE (SDM vol. 1, 13.6): bit i clear means state component i is
    /// in its initial configuration. What XSAVEOPT/XSAVEC store as
    /// XSTATE_BV; a KVM XSAVE image's XSTATE_BV.
    pub xinuse: u64,
    /// IA32_XSS: the supervisor state components XSAVES/XRSTORS manage.
    pub xss: u64,
    /// Opmask registers k0..k7 (component 5).
    pub opmask: [u64; 8],
    /// Bits 511:256 of ZMM0..ZMM15 (component 6), low 128 bits first.
    pub zmm_hi256: [[u128; 2]; 16],
    /// ZMM16..ZMM31 (component 7), low 128 bits first.
    pub hi16_zmm: [[u128; 4]; 16],
    /// PKRU (component 9).
    pub pkru: u32,
}

/// Everything needed to move a vCPU between backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuState {
    pub regs: Regs,
    pub sregs: Sregs,
    pub msrs: Msrs,
    pub fpu: FpuState,
    pub debug: DebugRegs,
    pub xcr0: u64,
    /// XSAVE state not in `fpu` (AVX-512, PKRU, XINUSE, IA32_XSS).
    pub xstate: XState,
    pub events: PendingEvents,
    /// Time-stamp counter value.
    pub tsc: u64,
}

impl CpuState {
    /// The architectural state after RESET (SDM vol. 3, table 9-1), with the
    /// conventional CS:IP of F000:FFF0.
    pub fn reset() -> Self {
        let mut cs = Segment::real_mode(0xf000, true);
        cs.base = 0xffff_0000;
        let data = Segment::real_mode(0, false);
        CpuState {
            regs: Regs {
                gpr: [0; 16],
                rip: 0xfff0,
                rflags: 0x2,
            },
            sregs: Sregs {
                cs,
                ds: data,
                es: data,
                fs: data,
                gs: data,
                ss: data,
                tr: Segment::system(0xb),
                ldt: Segment::system(0x2),
                gdt: DescriptorTable {
                    base: 0,
                    limit: 0xffff,
                },
                idt: DescriptorTable {
                    base: 0,
                    limit: 0xffff,
                },
                cr0: 0x6000_0010,
                cr2: 0,
                cr3: 0,
                cr4: 0,
                cr8: 0,
                efer: 0,
                apic_base: 0xfee0_0900,
            },
            msrs: Msrs::default(),
            fpu: FpuState::default(),
            debug: DebugRegs {
                db: [0; 4],
                dr6: 0xffff_0ff0,
                dr7: 0x400,
            },
            xcr0: 1,
            xstate: XState::default(),
            events: PendingEvents::default(),
            tsc: 0,
        }
    }

    /// Real mode at `cs:ip` with all data segments zero-based — what the
    /// built-in guests and flat real-mode loaders start from.
    pub fn real_mode_at(cs: u16, ip: u16) -> Self {
        let mut s = Self::reset();
        s.sregs.cs = Segment::real_mode(cs, true);
        s.regs.rip = u64::from(ip);
        s
    }
}

#[cfg(test)]
mod serde_tests {
    //! The CPU state round-trips through its saved form: set it on a CPU,
    //! save, restore into a fresh CPU, save again: the same bytes; and both
    //! CPUs then execute the same code to the same state.

    use super::*;
    use crate::{Cpu, NullPlatform, Ram};
    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn cpu() -> Cpu {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        // mov ecx, 0x2ff; rdmsr; add ax, bx; mov ecx, 0x250; rdmsr; hlt
        let code = [
            0x66, 0xb9, 0xff, 0x02, 0, 0, 0x0f, 0x32, 0x01, 0xd8, 0x66, 0xb9, 0x50, 0x02, 0, 0,
            0x0f, 0x32, 0xf4,
        ];
        mem.write_slice(&code, GuestAddress(0x100)).unwrap();
        Cpu::new(Ram::new(mem))
    }

    prop_compose! {
        fn state()(gpr in prop::array::uniform16(any::<u64>()),
                   arith in 0u64..0x1000,
                   mtrr_var in prop::array::uniform16(any::<u64>()),
                   def_type in any::<u64>(),
                   fixed in prop::array::uniform11(any::<u64>()),
                   xmm in prop::array::uniform16(any::<u128>()),
                   ymm_hi in prop::array::uniform16(any::<u128>()),
                   opmask in prop::array::uniform8(any::<u64>()),
                   st in prop::array::uniform8(prop::array::uniform10(any::<u8>())),
                   star in any::<u64>(), pat in any::<u64>(), tsc in any::<u64>()) -> CpuState {
            let mut s = CpuState::real_mode_at(0, 0x100);
            s.regs.gpr = gpr;
            s.regs.rflags = 0x2 | (arith & 0x8d5);
            s.msrs.star = star;
            s.msrs.pat = pat;
            s.msrs.mtrr = Mtrrs { def_type, variable: mtrr_var, fixed };
            s.fpu.xmm = xmm;
            s.fpu.ymm_hi = ymm_hi;
            s.xstate.opmask = opmask;
            s.fpu.st = st;
            s.tsc = tsc;
            s
        }
    }

    proptest! {
        #[test]
        fn cpu_state_round_trips(s in state()) {
            let mut a = cpu();
            a.set_state(&s);
            let bytes = serde_json::to_vec(&a.state()).unwrap();
            let decoded: CpuState = serde_json::from_slice(&bytes).unwrap();
            let mut b = cpu();
            b.set_state(&decoded);
            prop_assert_eq!(serde_json::to_vec(&b.state()).unwrap(), bytes);
            let (ea, eb) = (a.run(&mut NullPlatform, 8), b.run(&mut NullPlatform, 8));
            prop_assert_eq!(ea, eb);
            prop_assert_eq!(a.state(), b.state());
            // RDMSR saw the restored MTRRs.
            prop_assert_eq!(a.state().regs.gpr[2] << 32 | (a.state().regs.gpr[0] & 0xffff_ffff),
                            s.msrs.mtrr.fixed[0]);
        }
    }
}
