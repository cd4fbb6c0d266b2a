//! The fixed environment every case runs in: memory layout, descriptor
//! tables, exception stubs, page tables, and the initial CPU state of each
//! mode.
//!
//! Everything the cases can see lives in the first 64 KiB, identity mapped,
//! so that the same addresses work in 64-bit, 32-bit, 16-bit protected and
//! real mode:
//!
//! ```text
//! 0x0000  IVT (real mode); not present in the page tables (null page)
//! 0x1000  GDT, 64-bit TSS (0x1100), 32-bit TSS (0x1200), 32-bit IDT (0x1800)   RO, supervisor
//! 0x2000  64-bit IDT                                                          RO, supervisor
//! 0x3000  exception stubs, 16 bytes per vector: out <vector>,al; hlt; jmp $-1 RO, supervisor
//! 0x4000  64-bit page tables (PML4, PDPT, PD, PT)                              RO, supervisor
//! 0x8000  kernel stack (TSS RSP0/ESP0 = 0x9000)                                RW, supervisor
//! 0x9000  case code                                                            RO, user
//! 0xa000  stack page (RSP starts in its middle)                                RW, user
//! 0xb000  window page 0                                                        RO, user
//! 0xc000  window page 1                                                        RW, supervisor
//! 0xd000  window page 2                                                        RW, user
//! 0xe000  window page 3                                                        RW, user
//! 0xf000  not present (#PF next to the window)
//! 0x10000 32-bit page directory and page table, 0x12000 PAE PDPT (unused:
//!         KVM-PVM cannot page in legacy protected mode)
//! ```
//!
//! Page-table entries have their accessed and dirty bits preset so that
//! neither side writes them, and every descriptor has its accessed bit set.

use vm_memory::{Bytes, GuestAddress};

use cpu_interp::state::{gpr, CpuState, DescriptorTable, Segment};

use super::{DifftestError, GuestMemory, Mode};

/// Guest RAM per side.
pub const MEM_SIZE: usize = 1 << 20;
/// The part of guest memory a case can touch (compared after every case).
pub const SPACE: u64 = 0x1_0000;

pub const IVT: u64 = 0x0000;
pub const GDT: u64 = 0x1000;
pub const TSS64: u64 = 0x1100;
pub const TSS32: u64 = 0x1200;
pub const IDT32: u64 = 0x1800;
pub const IDT64: u64 = 0x2000;
pub const STUBS: u64 = 0x3000;
pub const STUB_SIZE: u64 = 16;
pub const PML4: u64 = 0x4000;
const PDPT: u64 = 0x5000;
const PD: u64 = 0x6000;
pub const PT: u64 = 0x7000;
pub const KSTACK: u64 = 0x8000;
pub const KSTACK_TOP: u64 = 0x9000;
pub const CODE: u64 = 0x9000;
pub const STACK: u64 = 0xa000;
/// Initial stack pointer (the middle of the stack page).
pub const STACK_INIT: u64 = 0xa800;
pub const W_RO: u64 = 0xb000;
pub const W_SUP: u64 = 0xc000;
pub const W_RW0: u64 = 0xd000;
pub const W_RW1: u64 = 0xe000;
pub const UNMAPPED: u64 = 0xf000;
pub const PD32: u64 = 0x1_0000;
const PT32: u64 = 0x1_1000;
/// PAE page-directory-pointer table for legacy protected mode (its first
/// entry points at the 64-bit PD, whose entries have the same format).
pub const PDPT_PAE: u64 = 0x1_2000;
/// Where the per-case contents start (kernel stack .. end of the space).
pub const CASE_AREA: u64 = KSTACK;

/// The limited data segment (selector [`SEL_LIMITED`]): base and limit.
pub const LIMITED_BASE: u64 = 0xd000;
pub const LIMITED_LIMIT: u32 = 0x1fff;
/// FS base in 64-bit mode.
pub const FS_BASE64: u64 = 0xd000;

pub const SEL_CODE64: u16 = 0x08;
pub const SEL_DATA0: u16 = 0x10;
pub const SEL_CODE32: u16 = 0x18;
pub const SEL_DATA3: u16 = 0x23;
pub const SEL_CODE64_3: u16 = 0x2b;
pub const SEL_CODE32_3: u16 = 0x33;
pub const SEL_CODE16_3: u16 = 0x3b;
pub const SEL_DATA16_3: u16 = 0x43;
pub const SEL_LIMITED: u16 = 0x4b;
pub const SEL_TSS64: u16 = 0x50;
pub const SEL_TSS32: u16 = 0x60;
/// A 64-bit call gate (16 bytes), DPL 3, to [`GATE_TARGET`] in the ring-3
/// 64-bit code segment. (No generator uses it yet: far transfers through
/// gates have no oracle on KVM-PVM, and the interpreter lacks gates.)
pub const SEL_CALL_GATE64: u16 = 0x70;
/// Where that gate leads: near the end of the code page, which holds HLT
/// there (a #GP in ring 3, so the case ends with the gate's frame).
pub const GATE_TARGET: u64 = CODE + 0xf00;
pub const GDT_ENTRIES: usize = 16;

/// Port the case code writes to when it reaches its end (ring 0 and real
/// mode: `out 0xff, al`).
pub const PORT_END: u8 = 0xff;
/// Vector ring-3 cases end with (`ud2`: #UD, whose frame points at the
/// terminator itself). KVM-PVM runs guest ring 3 with IOPL 0 whatever
/// RFLAGS says, so a ring-3 `out` always faults; it turns every ring-3
/// `int n` but `int3`/`int 4` into #UD, and in compatibility mode those too.
pub const VECTOR_END: u8 = 6;
/// Software-interrupt vectors with DPL-3 gates (callable from ring 3).
pub const USER_VECTORS: [u8; 4] = [0x80, 0x81, 0x82, 0x83];
/// A software-interrupt vector with a DPL-0 gate (#GP from ring 3).
pub const KERNEL_VECTOR: u8 = 0x84;

const PTE_P: u64 = 1;
const PTE_RW: u64 = 2;
const PTE_US: u64 = 4;
const PTE_A: u64 = 0x20;
const PTE_D: u64 = 0x40;

/// A GDT descriptor.
fn desc(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    u64::from(limit & 0xffff)
        | (u64::from(base & 0x00ff_ffff) << 16)
        | (u64::from(access) << 40)
        | (u64::from((limit >> 16) & 0xf) << 48)
        | (u64::from(flags & 0xf) << 52)
        | (u64::from(base >> 24) << 56)
}

fn gdt() -> [u64; GDT_ENTRIES] {
    let mut g = [0u64; GDT_ENTRIES];
    g[1] = desc(0, 0xfffff, 0x9b, 0xa); // 0x08 code64 DPL0
    g[2] = desc(0, 0xfffff, 0x93, 0xc); // 0x10 data DPL0
    g[3] = desc(0, 0xfffff, 0x9b, 0xc); // 0x18 code32 DPL0
    g[4] = desc(0, 0xfffff, 0xf3, 0xc); // 0x20 data DPL3
    g[5] = desc(0, 0xfffff, 0xfb, 0xa); // 0x28 code64 DPL3
    g[6] = desc(0, 0xfffff, 0xfb, 0xc); // 0x30 code32 DPL3
    g[7] = desc(0, 0xffff, 0xfb, 0x0); // 0x38 code16 DPL3
    g[8] = desc(0, 0xffff, 0xf3, 0x0); // 0x40 data16 DPL3
    g[9] = desc(LIMITED_BASE as u32, LIMITED_LIMIT, 0xf3, 0x4); // 0x48 limited data DPL3
                                                                // 0x50: 64-bit TSS (busy), 16 bytes.
    g[10] = desc(TSS64 as u32, 0x67, 0x8b, 0x0);
    g[11] = 0;
    // 0x60: 32-bit TSS (busy).
    g[12] = desc(TSS32 as u32, 0x67, 0x8b, 0x0);
    g[13] = desc(0, 0xffff, 0x9b, 0x0); // 0x68 code16 DPL0
                                        // 0x70: 64-bit call gate, DPL 3, present, to SEL_CODE64_3:GATE_TARGET.
    g[14] = (GATE_TARGET & 0xffff)
        | (u64::from(SEL_CODE64_3) << 16)
        | (0xecu64 << 40)
        | (((GATE_TARGET >> 16) & 0xffff) << 48);
    g[15] = GATE_TARGET >> 32;
    g
}

/// A virtual alias of the 64-bit page-table page ([`PT`]), read-write and
/// supervisor, through which ring-0 cases write page-table entries (to
/// clear accessed/dirty bits and check that the code under test sets
/// them). Outside the compared space: its writes land in [`PT`].
pub const PT_ALIAS: u64 = 0x1_7000;

/// Page-table leaf flags for the page at `addr` (0 = not present).
pub fn page_flags(addr: u64) -> u64 {
    let base = PTE_P | PTE_A | PTE_D;
    match addr {
        0x1000..=0x7fff => base,
        KSTACK => base | PTE_RW,
        CODE => base | PTE_US,
        STACK => base | PTE_RW | PTE_US,
        W_RO => base | PTE_US,
        W_SUP => base | PTE_RW,
        W_RW0 | W_RW1 => base | PTE_RW | PTE_US,
        _ => 0,
    }
}

/// The pristine contents of the first [`SPACE`] bytes plus the 32-bit
/// page tables, as (address, bytes) pieces.
pub fn image() -> Vec<(u64, Vec<u8>)> {
    let mut low = vec![0u8; SPACE as usize];
    let put = |buf: &mut Vec<u8>, at: u64, bytes: &[u8]| {
        let a = at as usize;
        buf[a..a + bytes.len()].copy_from_slice(bytes);
    };
    // IVT and stubs.
    for v in 0..256u64 {
        let stub = STUBS + v * STUB_SIZE;
        put(&mut low, IVT + v * 4, &(stub as u32).to_le_bytes());
        let mut s = [0x90u8; STUB_SIZE as usize];
        s[..5].copy_from_slice(&[0xe6, v as u8, 0xf4, 0xeb, 0xfd]);
        put(&mut low, stub, &s);
    }
    for (k, d) in gdt().iter().enumerate() {
        put(&mut low, GDT + 8 * k as u64, &d.to_le_bytes());
    }
    // TSSs: RSP0/ESP0, SS0, no I/O bitmap (offset past the limit).
    put(&mut low, TSS64 + 4, &KSTACK_TOP.to_le_bytes());
    put(&mut low, TSS64 + 0x66, &0x68u16.to_le_bytes());
    put(&mut low, TSS32 + 4, &(KSTACK_TOP as u32).to_le_bytes());
    put(&mut low, TSS32 + 8, &u32::from(SEL_DATA0).to_le_bytes());
    put(&mut low, TSS32 + 0x66, &0x68u16.to_le_bytes());
    // IDTs.
    for v in 0..256u64 {
        let vector = v as u8;
        let dpl: u64 = if USER_VECTORS.contains(&vector) || vector == 3 || vector == 4 {
            3
        } else {
            0
        };
        let present = v < 32 || USER_VECTORS.contains(&vector) || vector == KERNEL_VECTOR;
        if !present {
            continue;
        }
        let off = STUBS + v * STUB_SIZE;
        let attr: u64 = 0x80 | (dpl << 5) | 0xe;
        let lo64 = (off & 0xffff)
            | (u64::from(SEL_CODE64) << 16)
            | (attr << 40)
            | (((off >> 16) & 0xffff) << 48);
        put(&mut low, IDT64 + v * 16, &lo64.to_le_bytes());
        put(&mut low, IDT64 + v * 16 + 8, &(off >> 32).to_le_bytes());
        let g32 = (off & 0xffff)
            | (u64::from(SEL_CODE32) << 16)
            | (attr << 40)
            | (((off >> 16) & 0xffff) << 48);
        put(&mut low, IDT32 + v * 8, &g32.to_le_bytes());
    }
    // 64-bit page tables: one PT maps the first 2 MiB.
    let upper = PTE_P | PTE_RW | PTE_US | PTE_A;
    put(&mut low, PML4, &(PDPT | upper).to_le_bytes());
    put(&mut low, PDPT, &(PD | upper).to_le_bytes());
    put(&mut low, PD, &(PT | upper).to_le_bytes());
    let mut pt32 = vec![0u8; 0x2000];
    pt32[..4].copy_from_slice(&((PT32 | upper) as u32).to_le_bytes());
    for page in 0..16u64 {
        let f = page_flags(page << 12);
        if f != 0 {
            put(&mut low, PT + page * 8, &((page << 12) | f).to_le_bytes());
            let e = (((page << 12) | f) as u32).to_le_bytes();
            let at = 0x1000 + page as usize * 4;
            pt32[at..at + 4].copy_from_slice(&e);
        }
    }
    put(
        &mut low,
        PT + (PT_ALIAS >> 12) * 8,
        &(PT | PTE_P | PTE_RW | PTE_A | PTE_D).to_le_bytes(),
    );
    // PAE PDPT: PDPTEs allow only P (and caching bits).
    let mut pae = vec![0u8; 32];
    pae[..8].copy_from_slice(&(PD | PTE_P).to_le_bytes());
    vec![(0, low), (PD32, pt32), (PDPT_PAE, pae)]
}

/// Write the environment into `mem`.
pub fn install(mem: &GuestMemory) -> Result<(), DifftestError> {
    for (at, bytes) in image() {
        mem.write_slice(&bytes, GuestAddress(at))
            .map_err(|e| DifftestError::Memory(format!("writing the environment: {e}")))?;
    }
    Ok(())
}

/// A new guest memory of [`MEM_SIZE`] bytes with the environment installed.
pub fn new_memory() -> Result<GuestMemory, DifftestError> {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .map_err(|e| DifftestError::Memory(format!("allocating guest memory: {e}")))?;
    install(&mem)?;
    Ok(mem)
}

fn seg(selector: u16, base: u64, limit: u32, type_: u8, dpl: u8, db: bool, l: bool) -> Segment {
    Segment {
        selector,
        base,
        limit,
        type_,
        s: true,
        dpl,
        present: true,
        avl: false,
        l,
        db,
        g: limit > 0xfffff,
        unusable: false,
    }
}

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 2;
const CR0_ET: u64 = 0x10;
const CR0_NE: u64 = 0x20;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bits of the environment: IF in ring 3 (IOPL stays 0: KVM-PVM
/// forces it there), nothing in ring 0.
pub const RFLAGS_IF: u64 = 1 << 9;

/// The host's XCR0 (what XGETBV returns in the difftest process), 1 when
/// the host has no OSXSAVE.
pub fn host_xcr0() -> u64 {
    static XCR0: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *XCR0.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let l1 = std::arch::x86_64::__cpuid(1);
            if l1.ecx & (1 << 27) == 0 {
                return 1;
            }
            let (lo, hi): (u32, u32);
            // SAFETY: XGETBV with ECX = 0 is valid when CPUID.1:ECX.OSXSAVE
            // is set (checked above); it only reads XCR0.
            unsafe {
                std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
                    options(nomem, nostack, preserves_flags));
            }
            (u64::from(hi) << 32) | u64::from(lo)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            1
        }
    })
}

/// XCR0 of the 64-bit ring-3 cases: the host's own XCR0 (limited to the
/// state components the interpreter holds). KVM-PVM runs guest ring-3
/// code with the host's XCR0 whatever KVM_SET_XCRS said (XGETBV there
/// returns it), so the interpreter must use the same; on other hosts KVM
/// loads the value set. 1 (no XSAVE) when the host has no OSXSAVE.
/// Components the host enables beyond these (AMX tiles, say) are kept
/// out of the cases (`gen::isa`): the interpreter cannot hold them.
pub fn oracle_xcr0() -> u64 {
    use cpu_interp::insn::xsave::{xcr0_valid, CARRIED};
    let carried = host_xcr0() & CARRIED;
    if xcr0_valid(carried, CARRIED) {
        carried
    } else {
        carried & 7
    }
}

/// Segment base of segment register `sr` (iced order ES CS SS DS FS GS) as
/// the initial state of `mode` has it.
pub fn seg_base(mode: Mode, sr: usize) -> u64 {
    let s = base_state(mode);
    let seg = match sr {
        0 => s.sregs.es,
        1 => s.sregs.cs,
        2 => s.sregs.ss,
        3 => s.sregs.ds,
        4 => s.sregs.fs,
        _ => s.sregs.gs,
    };
    seg.base
}

/// Segment limit of segment register `sr` in `mode` (u32::MAX when not
/// checked, i.e. 64-bit mode).
pub fn seg_limit(mode: Mode, sr: usize) -> u32 {
    if mode.bits() == 64 {
        return u32::MAX;
    }
    let s = base_state(mode);
    let seg = match sr {
        0 => s.sregs.es,
        1 => s.sregs.cs,
        2 => s.sregs.ss,
        3 => s.sregs.ds,
        4 => s.sregs.fs,
        _ => s.sregs.gs,
    };
    seg.limit
}

/// The environment part of the initial state of `mode` (registers zero,
/// RIP at [`CODE`], RSP at [`STACK_INIT`], FPU in its FNINIT state with
/// the default MXCSR).
pub fn base_state(mode: Mode) -> CpuState {
    let mut s = CpuState::reset();
    s.regs.rip = CODE;
    s.regs.gpr[gpr::RSP] = STACK_INIT;
    s.regs.rflags = 2;
    s.xcr0 = 1;
    s.sregs.cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT;
    let flat = 0xffff_ffffu32;
    match mode {
        Mode::Real16 => {
            let d = Segment::real_mode(0, false);
            s.sregs.cs = Segment::real_mode(0, true);
            (s.sregs.ds, s.sregs.es, s.sregs.fs, s.sregs.gs, s.sregs.ss) = (d, d, d, d, d);
            s.sregs.idt = DescriptorTable {
                base: IVT,
                limit: 0x3ff,
            };
            s.sregs.cr0 = CR0_MP | CR0_ET | CR0_NE;
            return s;
        }
        Mode::Prot32Ring0 => {
            // No paging: KVM-PVM cannot run legacy protected mode with
            // paging at all (32-bit or PAE tables: the guest triple-faults
            // at its first fetch), so this mode is flat segmentation only.
            // The 32-bit and PAE tables are still installed (PD32,
            // PDPT_PAE) for interpreter-only use.
            s.sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE;
            s.sregs.cr3 = 0;
            s.sregs.efer = 0;
            s.sregs.cs = seg(SEL_CODE32, 0, flat, 0xb, 0, true, false);
            let d = seg(SEL_DATA0, 0, flat, 0x3, 0, true, false);
            (s.sregs.ds, s.sregs.es, s.sregs.gs, s.sregs.ss) = (d, d, d, d);
            s.sregs.fs = seg(
                SEL_LIMITED,
                LIMITED_BASE,
                LIMITED_LIMIT,
                0x3,
                3,
                true,
                false,
            );
            s.sregs.idt = DescriptorTable {
                base: IDT32,
                limit: 0x7ff,
            };
            s.sregs.tr = Segment {
                selector: SEL_TSS32,
                base: TSS32,
                limit: 0x67,
                type_: 0xb,
                present: true,
                ..Default::default()
            };
        }
        _ => {
            s.sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
            s.sregs.cr3 = PML4;
            s.sregs.cr4 |= CR4_PAE;
            s.sregs.efer = EFER_LME | EFER_LMA;
            s.sregs.idt = DescriptorTable {
                base: IDT64,
                limit: 0xfff,
            };
            s.sregs.tr = Segment {
                selector: SEL_TSS64,
                base: TSS64,
                limit: 0x67,
                type_: 0xb,
                present: true,
                ..Default::default()
            };
            match mode {
                // 64-bit code: FS and GS hold null selectors with their
                // bases set directly, as 64-bit OSes do (under KVM-PVM the
                // guest's FS/GS selectors never reach the hardware).
                Mode::Long64Ring0 => {
                    s.sregs.cs = seg(SEL_CODE64, 0, flat, 0xb, 0, false, true);
                    let d = seg(SEL_DATA0, 0, flat, 0x3, 0, true, false);
                    (s.sregs.ds, s.sregs.es, s.sregs.ss) = (d, d, d);
                    s.sregs.fs = seg(0, FS_BASE64, flat, 0x3, 0, true, false);
                    s.sregs.gs = seg(0, 0, flat, 0x3, 0, true, false);
                }
                Mode::Long64Ring3 => {
                    s.sregs.cs = seg(SEL_CODE64_3, 0, flat, 0xb, 3, false, true);
                    let d = seg(SEL_DATA3, 0, flat, 0x3, 3, true, false);
                    (s.sregs.ds, s.sregs.es, s.sregs.ss) = (d, d, d);
                    s.sregs.fs = seg(0, FS_BASE64, flat, 0x3, 3, true, false);
                    s.sregs.gs = seg(0, 0, flat, 0x3, 3, true, false);
                    // The hardware oracle: AVX enabled (x86-64-v3 cases).
                    let xcr0 = oracle_xcr0();
                    if xcr0 & 6 == 6 {
                        s.sregs.cr4 |= CR4_OSXSAVE;
                        s.xcr0 = xcr0;
                    }
                }
                Mode::Compat32Ring3 => {
                    s.sregs.cs = seg(SEL_CODE32_3, 0, flat, 0xb, 3, true, false);
                    let d = seg(SEL_DATA3, 0, flat, 0x3, 3, true, false);
                    (s.sregs.ds, s.sregs.es, s.sregs.ss, s.sregs.gs) = (d, d, d, d);
                    s.sregs.fs = seg(
                        SEL_LIMITED,
                        LIMITED_BASE,
                        LIMITED_LIMIT,
                        0x3,
                        3,
                        true,
                        false,
                    );
                }
                _ => {
                    // Compat16Ring3: 16-bit code, 16-bit data and stack.
                    s.sregs.cs = seg(SEL_CODE16_3, 0, 0xffff, 0xb, 3, false, false);
                    let d = seg(SEL_DATA16_3, 0, 0xffff, 0x3, 3, false, false);
                    (s.sregs.ds, s.sregs.es, s.sregs.ss, s.sregs.gs) = (d, d, d, d);
                    s.sregs.fs = seg(
                        SEL_LIMITED,
                        LIMITED_BASE,
                        LIMITED_LIMIT,
                        0x3,
                        3,
                        true,
                        false,
                    );
                }
            }
        }
    }
    s.sregs.gdt = DescriptorTable {
        base: GDT,
        limit: (GDT_ENTRIES * 8 - 1) as u16,
    };
    if mode.ring() == 3 {
        s.regs.rflags |= RFLAGS_IF;
    }
    s
}

/// The exception vector whose stub contains `rip` (the stub's `out` has
/// executed, so RIP is 2 bytes into it), if any.
pub fn stub_vector(cs_base: u64, rip: u64) -> Option<u8> {
    let lin = cs_base.wrapping_add(rip);
    if (STUBS..STUBS + 256 * STUB_SIZE).contains(&lin) {
        Some(((lin - STUBS) / STUB_SIZE) as u8)
    } else {
        None
    }
}

/// Vectors for which the CPU pushes an error code (in protected modes).
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_and_tables() {
        // Flat 64-bit ring-0 code: the classic 0x00af9b000000ffff.
        assert_eq!(gdt()[1], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt()[2], 0x00cf_9300_0000_ffff);
        let img = image();
        let low = &img[0].1;
        // Stub for #PF.
        let s = (STUBS + 14 * STUB_SIZE) as usize;
        assert_eq!(&low[s..s + 5], &[0xe6, 14, 0xf4, 0xeb, 0xfd]);
        // The window's unmapped neighbour and the null page are absent.
        let pte =
            |p: u64| u64::from_le_bytes(low[(PT + p * 8) as usize..][..8].try_into().unwrap());
        assert_eq!(pte(0), 0);
        assert_eq!(pte(0xf), 0);
        assert_eq!(pte(0xd) & 7, 7);
        assert_eq!(pte(0xb) & 7, 5);
        assert_eq!(pte(0xc) & 7, 3);
        assert_eq!(stub_vector(0, STUBS + 14 * STUB_SIZE + 2), Some(14));
        assert_eq!(stub_vector(0, CODE), None);
    }
}
