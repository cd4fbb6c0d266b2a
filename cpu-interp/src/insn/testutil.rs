//! A small harness for instruction unit tests: a CPU over 4 MiB of RAM in
//! real mode, flat 32-bit protected mode, or 64-bit long mode (identity
//! mapped with 2 MiB pages), code at 0x1000 followed by HLT.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::cpu::{Cpu, CpuExit, CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};
use crate::memory::Ram;
use crate::platform::Platform;
use crate::state::{gpr, CpuState, DescriptorTable, Segment};

pub const CODE: u64 = 0x1000;
pub const STACK_TOP: u64 = 0x8000;
pub const GDT: u64 = 0x500;
pub const IDT: u64 = 0x3000;
pub const PML4: u64 = 0x10_0000;
pub const RAM_SIZE: usize = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Real16,
    Prot32,
    Long64,
}

/// A platform that records port writes and answers port reads from a script.
#[derive(Default)]
pub struct TestPlatform {
    pub out: Vec<(u16, Vec<u8>)>,
    pub in_value: u32,
    pub mmio_writes: Vec<(u64, Vec<u8>)>,
}

impl Platform for TestPlatform {
    fn io_read(&mut self, _port: u16, data: &mut [u8]) {
        let v = self.in_value.to_le_bytes();
        data.copy_from_slice(&v[..data.len()]);
    }
    fn io_write(&mut self, port: u16, data: &[u8]) {
        self.out.push((port, data.to_vec()));
    }
    fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.mmio_writes.push((addr, data.to_vec()));
    }
}

/// A CPU over fresh RAM, on the tier `DUET_TEST_TIER` names (`jit` or
/// `interp`, the default), so the whole unit suite can run on either.
pub fn new_cpu() -> Cpu {
    let mut c = new_cpu_interp();
    if std::env::var("DUET_TEST_TIER").as_deref() == Ok("jit") {
        c.set_tier(crate::Tier::Jit).expect("JIT available");
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some(j) = c.jit.as_mut() {
            j.hot = 1;
        }
    }
    c
}

/// A CPU over fresh RAM on the interpreter.
pub fn new_cpu_interp() -> Cpu {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap();
    Cpu::new(Ram::new(mem))
}

pub fn write_phys(c: &Cpu, addr: u64, bytes: &[u8]) {
    assert!(c.ram().write(addr, bytes));
}

pub fn read_phys(c: &Cpu, addr: u64, size: usize) -> u64 {
    let mut b = [0u8; 8];
    assert!(c.ram().read(addr, &mut b[..size]));
    u64::from_le_bytes(b)
}

fn flat(code: bool, long: bool, sel: u16) -> Segment {
    Segment {
        selector: sel,
        base: 0,
        limit: 0xffff_ffff,
        type_: if code { 0xb } else { 0x3 },
        s: true,
        dpl: 0,
        present: true,
        l: long && code,
        db: !(long && code),
        g: true,
        ..Default::default()
    }
}

/// Put the CPU in `mode` with code at [`CODE`], stack at [`STACK_TOP`],
/// a GDT (null, code32 0x8, data 0x10, code64 0x18, user code32 0x23,
/// user data 0x2b, user code64 0x33) and page tables for long mode.
pub fn setup(c: &mut Cpu, mode: Mode) {
    let mut s = CpuState::reset();
    let gdt: [u64; 7] = [
        0,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00af_9b00_0000_ffff,
        0x00cf_fb00_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
    ];
    for (k, e) in gdt.iter().enumerate() {
        write_phys(c, GDT + 8 * k as u64, &e.to_le_bytes());
    }
    s.sregs.gdt = DescriptorTable {
        base: GDT,
        limit: 7 * 8 - 1,
    };
    s.sregs.idt = DescriptorTable {
        base: IDT,
        limit: 0xfff,
    };
    match mode {
        Mode::Real16 => {
            s = CpuState::real_mode_at(0, CODE as u16);
            s.sregs.idt = DescriptorTable {
                base: 0,
                limit: 0x3ff,
            };
        }
        Mode::Prot32 => {
            s.sregs.cr0 = CR0_PE | CR0_ET;
            s.sregs.cs = flat(true, false, 0x8);
            let d = flat(false, false, 0x10);
            (s.sregs.ds, s.sregs.es, s.sregs.ss, s.sregs.fs, s.sregs.gs) = (d, d, d, d, d);
        }
        Mode::Long64 => {
            // PML4 -> PDPT -> PD with 2 MiB pages covering 1 GiB.
            let pdpt = PML4 + 0x1000;
            let pd = PML4 + 0x2000;
            write_phys(c, PML4, &(pdpt | 7).to_le_bytes());
            write_phys(c, pdpt, &(pd | 7).to_le_bytes());
            for k in 0..512u64 {
                write_phys(c, pd + 8 * k, &((k << 21) | 0x87).to_le_bytes());
            }
            s.sregs.cr0 = CR0_PE | CR0_PG | CR0_ET;
            s.sregs.cr3 = PML4;
            s.sregs.cr4 = CR4_PAE;
            s.sregs.efer = EFER_LME | EFER_LMA;
            s.sregs.cs = flat(true, true, 0x18);
            let d = flat(false, false, 0x10);
            (s.sregs.ds, s.sregs.es, s.sregs.ss, s.sregs.fs, s.sregs.gs) = (d, d, d, d, d);
        }
    }
    s.regs.rip = CODE;
    s.regs.gpr[gpr::RSP] = STACK_TOP;
    c.set_state(&s);
}

/// Run `code` (HLT appended) in `mode` after `init`; return the CPU.
pub fn run(mode: Mode, code: &[u8], init: impl FnOnce(&mut Cpu)) -> Cpu {
    let (c, _) = run_with(mode, code, init);
    c
}

/// Like [`run`], also returning the platform.
pub fn run_with(mode: Mode, code: &[u8], init: impl FnOnce(&mut Cpu)) -> (Cpu, TestPlatform) {
    let mut c = new_cpu();
    setup(&mut c, mode);
    let mut bytes = code.to_vec();
    bytes.push(0xf4);
    write_phys(&c, CODE, &bytes);
    init(&mut c);
    let mut p = TestPlatform::default();
    let exit = c.run(&mut p, 1_000_000);
    assert_eq!(
        exit,
        CpuExit::Halted,
        "test code did not reach HLT (rip {:#x})",
        c.rip()
    );
    (c, p)
}

/// Assemble `f`'s instructions as `bits`-bit code at [`CODE`].
pub fn asm(
    bits: u32,
    f: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler) -> Result<(), iced_x86::IcedError>,
) -> Vec<u8> {
    let mut a = iced_x86::code_asm::CodeAssembler::new(bits).expect("bitness");
    f(&mut a).expect("assemble");
    a.assemble(CODE).expect("encode")
}

/// CR4.OSFXSR, OSXMMEXCPT and OSXSAVE on, XCR0 = x87 | SSE | AVX.
pub fn avx_on(c: &mut Cpu) {
    let mut s = c.state();
    s.sregs.cr4 |= crate::cpu::CR4_OSFXSR | crate::cpu::CR4_OSXMMEXCPT | crate::cpu::CR4_OSXSAVE;
    s.xcr0 = 7;
    c.set_state(&s);
}

/// Execute the one instruction at the start of `code` and return its
/// handler's result without delivering any exception.
pub fn exec_one(
    mode: Mode,
    code: &[u8],
    init: impl FnOnce(&mut Cpu),
) -> (Cpu, crate::exception::XResult<()>) {
    let mut c = new_cpu();
    setup(&mut c, mode);
    write_phys(&c, CODE, code);
    init(&mut c);
    let mut p = TestPlatform::default();
    let insn = c.decode_one(&mut p).expect("decodable");
    let r = (insn.h)(&mut c, &mut p, &insn);
    (c, r)
}
