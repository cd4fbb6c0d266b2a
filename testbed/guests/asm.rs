//! Shared pieces of the built-in guests: the low-memory map they all use,
//! the GDT they load, a builder for data blocks at fixed addresses, and
//! subroutines (UART output, hex printing, page tables, mode switches) that
//! assemble in whichever bitness they are needed.
//!
//! # Memory map (all guests; a guest uses the parts it needs)
//!
//! ```text
//! 0x0000_0500 .. 0x0000_0520  GDT (null, 64-bit code, flat data, 32-bit code)
//! 0x0000_1000 .. 0x0000_2000  PML4                      (built at run time)
//! 0x0000_2000 .. 0x0000_3000  PDPT                      (built at run time)
//! 0x0000_3000 .. 0x0000_4000  PD for 0 .. 1 GiB         (built at run time)
//! 0x0000_4000 .. 0x0000_5000  PT for 0 .. 2 MiB, 4 KiB pages (built at run time)
//! 0x0000_5000 .. 0x0000_6000  PD for the alias at 1 GiB: one 2 MiB page
//!                             mapping virtual 0x4000_0000 to physical 0
//! 0x0000_6000 .. 0x0000_7000  stack (grows down from 0x7000)
//! 0x0000_7c00 .. 0x0000_8000  16-bit real-mode code (entry: CS=0, IP=0x7c00)
//! 0x0000_8000 .. 0x0000_9000  32-bit code (protected or compatibility mode)
//! 0x0000_9000 .. 0x0000_a000  64-bit code
//! 0x0000_a000 .. 0x0000_b000  data: descriptor-table registers, strings, slots
//! 0x0000_b000 .. 0x0000_c000  IDT, 256 long-mode gates (built at run time)
//! 0x0000_c000 .. 0x0000_d000  PD for 3 .. 4 GiB: 2 MiB uncached pages over
//!                             the IOAPIC and the local APIC (built at run
//!                             time by the guests that use them)
//! ```
//!
//! # Subroutine conventions
//!
//! The subroutines emitted by [`Routines::emit`] assemble in any bitness
//! (16, 32 or 64) unless noted:
//! - `putc`: writes AL to COM1 once LSR.THRE (bit 5 of port 0x3fd) is set.
//!   Clobbers AH and DX.
//! - `print_str`: writes the NUL-terminated string at DS:SI / ESI / RSI
//!   with `lodsb` + `putc`. Clobbers AL, AH, DX and the string pointer.
//! - `print_hex` (32- and 64-bit code only): writes the low ECX nibbles of
//!   EAX (32-bit code) or RAX (64-bit code) as lowercase hex digits.
//!   Clobbers (R/E)AX, (R/E)BX, ECX, DX, EDI.

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use cpu_interp::state::CpuState;

use super::GuestImage;
use crate::layout::ports;

/// Fixed guest-physical addresses shared by the built-in guests.
pub mod map {
    pub const GDT: u64 = 0x0500;
    pub const PML4: u64 = 0x1000;
    pub const PDPT: u64 = 0x2000;
    pub const PD_LOW: u64 = 0x3000;
    pub const PT_LOW: u64 = 0x4000;
    pub const PD_ALIAS: u64 = 0x5000;
    /// One past the last page-table page.
    pub const PAGE_TABLES_END: u64 = 0x6000;
    pub const STACK_BOTTOM: u64 = 0x6000;
    pub const STACK_TOP: u64 = 0x7000;
    pub const CODE16: u64 = 0x7c00;
    pub const CODE32: u64 = 0x8000;
    pub const CODE64: u64 = 0x9000;
    pub const DATA: u64 = 0xa000;
    pub const IDT: u64 = 0xb000;
    /// 256 gates of 16 bytes.
    pub const IDT_END: u64 = 0xc000;
    /// PD for 3 .. 4 GiB (see [`super::emit_map_apic_pages`]).
    pub const PD_MMIO: u64 = 0xc000;
    pub const PD_MMIO_END: u64 = 0xd000;
    /// Virtual address where the alias PD maps physical 0 with a 2 MiB page.
    pub const ALIAS_BASE: u64 = 0x4000_0000;
    /// Everything a built-in guest places or builds lies below this.
    pub const LOW_MEMORY_END: u64 = 0x10_0000;
}

/// GDT selectors (see [`GDT_DESCRIPTORS`]).
pub mod selector {
    pub const CODE64: u16 = 0x08;
    pub const DATA: u16 = 0x10;
    pub const CODE32: u16 = 0x18;
}

/// The GDT every guest that leaves real mode loads. Accessed bits are
/// preset so loading a segment never writes the table.
pub const GDT_DESCRIPTORS: [u64; 4] = [
    0,
    // 64-bit code: present, DPL 0, execute/read, L=1, G=1.
    0x00af_9b00_0000_ffff,
    // Flat data: present, DPL 0, read/write, D/B=1, G=1, 4 GiB.
    0x00cf_9300_0000_ffff,
    // Flat 32-bit code: present, DPL 0, execute/read, D=1, G=1, 4 GiB.
    0x00cf_9b00_0000_ffff,
];

/// CR0 bits the guests touch.
pub mod cr0 {
    pub const PE: u32 = 1 << 0;
    pub const NW: u32 = 1 << 29;
    pub const CD: u32 = 1 << 30;
    pub const PG: u32 = 1 << 31;
}
/// CR4.PAE.
pub const CR4_PAE: u32 = 1 << 5;
/// The EFER MSR and its LME bit.
pub const MSR_EFER: u32 = 0xc000_0080;
pub const EFER_LME: u32 = 1 << 8;

/// Page-table entry bits.
pub mod pte {
    pub const PRESENT: u32 = 1 << 0;
    pub const WRITABLE: u32 = 1 << 1;
    pub const LARGE_PAGE: u32 = 1 << 7;
    pub const WRITE_THROUGH: u32 = 1 << 3;
    pub const CACHE_DISABLE: u32 = 1 << 4;
}

/// UART register offsets from COM1 and the LSR bit the guests poll.
pub mod uart {
    pub const THR_OR_DLL: u16 = 0;
    pub const IER_OR_DLM: u16 = 1;
    pub const FCR: u16 = 2;
    pub const LCR: u16 = 3;
    pub const MCR: u16 = 4;
    pub const LSR: u16 = 5;
    pub const LSR_THRE: i32 = 0x20;
    pub const LCR_DLAB: i32 = 0x80;
    pub const LCR_8N1: i32 = 0x03;
    /// Divisor 1: 115200 baud.
    pub const DIVISOR: u16 = 1;
    /// FIFO enable, clear both FIFOs, 14-byte trigger.
    pub const FCR_ENABLE_AND_CLEAR: i32 = 0xc7;
    /// DTR | RTS (OUT2 stays clear: no interrupts).
    pub const MCR_DTR_RTS: i32 = 0x03;
}

/// A block of code assembled for a fixed address and bitness.
#[derive(Clone, Debug)]
pub struct CodeBlob {
    pub addr: u64,
    pub bitness: u32,
    pub bytes: Vec<u8>,
}

/// A built-in guest before it is flattened into a [`GuestImage`]: code
/// blobs keep their bitness (for disassembly checks) and the areas the guest
/// writes at run time are listed (for overlap checks).
#[derive(Clone, Debug)]
pub struct GuestProgram {
    pub code: Vec<CodeBlob>,
    pub data: Vec<(u64, Vec<u8>)>,
    /// `[start, end)` ranges the guest fills at run time, with what they hold.
    pub work_areas: Vec<(u64, u64, &'static str)>,
    pub entry: CpuState,
}

impl GuestProgram {
    /// Flatten into the loadable image.
    pub fn into_image(self) -> GuestImage {
        let mut blobs: Vec<(u64, Vec<u8>)> =
            self.code.into_iter().map(|c| (c.addr, c.bytes)).collect();
        blobs.extend(self.data);
        GuestImage {
            blobs,
            entry: self.entry,
            pci_devices: Vec::new(),
            virtio_devices: Vec::new(),
        }
    }
}

/// The common real-mode entry point: CS=0, IP=0x7c00.
pub fn real_mode_entry() -> CpuState {
    CpuState::real_mode_at(0, map::CODE16 as u16)
}

/// The GDT blob at [`map::GDT`].
pub fn gdt_blob() -> (u64, Vec<u8>) {
    let bytes = GDT_DESCRIPTORS
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect();
    (map::GDT, bytes)
}

/// Data placed at a fixed guest-physical address, handing out the address
/// of each item as it is added (the code refers to data by absolute address).
pub struct DataBlock {
    base: u64,
    bytes: Vec<u8>,
}

impl DataBlock {
    pub fn new(base: u64) -> Self {
        DataBlock {
            base,
            bytes: Vec::new(),
        }
    }

    fn align(&mut self, align: usize) {
        while self.bytes.len() % align != 0 {
            self.bytes.push(0);
        }
    }

    fn next_address(&self) -> u32 {
        u32::try_from(self.base + self.bytes.len() as u64).expect("guest data lies below 4 GiB")
    }

    /// Raw bytes aligned to `align`; returns their address.
    pub fn bytes(&mut self, bytes: &[u8], align: usize) -> u32 {
        self.align(align);
        let addr = self.next_address();
        self.bytes.extend_from_slice(bytes);
        addr
    }

    /// A NUL-terminated string; returns its address.
    pub fn cstr(&mut self, text: &str) -> u32 {
        assert!(!text.contains('\0'), "guest strings are NUL-terminated");
        let addr = self.bytes(text.as_bytes(), 1);
        self.bytes.push(0);
        addr
    }

    /// `len` zero bytes aligned to `align` (a variable the guest writes).
    pub fn zeroed(&mut self, len: usize, align: usize) -> u32 {
        self.bytes(&vec![0; len], align)
    }

    /// A GDTR/IDTR pseudo-descriptor (16-bit limit, 64-bit base: the first
    /// six bytes serve 16- and 32-bit code); returns its address.
    pub fn table_register(&mut self, base: u64, limit: u16) -> u32 {
        let mut bytes = limit.to_le_bytes().to_vec();
        bytes.extend_from_slice(&base.to_le_bytes());
        self.bytes(&bytes, 8)
    }

    /// A far pointer m16:32 (offset, then selector); returns its address.
    pub fn far_pointer(&mut self, selector: u16, offset: u32) -> u32 {
        let mut bytes = offset.to_le_bytes().to_vec();
        bytes.extend_from_slice(&selector.to_le_bytes());
        self.bytes(&bytes, 8)
    }

    pub fn finish(self) -> (u64, Vec<u8>) {
        (self.base, self.bytes)
    }
}

/// Code assembled at `addr`, with label addresses available.
pub struct Assembled {
    pub blob: CodeBlob,
    result: CodeAssemblerResult,
}

impl Assembled {
    /// Guest address of a label set in the assembled code.
    pub fn label_address(&self, label: &CodeLabel) -> u64 {
        self.result
            .label_ip(label)
            .expect("label was set in this code")
    }
}

/// Assemble `a` for address `addr`.
pub fn assemble(a: &mut CodeAssembler, addr: u64) -> Result<Assembled, IcedError> {
    let result = a.assemble_options(addr, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let blob = CodeBlob {
        addr,
        bitness: a.bitness(),
        bytes: result.inner.code_buffer.clone(),
    };
    Ok(Assembled { blob, result })
}

/// Write `value` to UART register `offset` (clobbers AL, DX).
fn uart_write(a: &mut CodeAssembler, offset: u16, value: i32) -> Result<(), IcedError> {
    a.mov(dx, u32::from(ports::COM1 + offset))?;
    a.mov(al, value)?;
    a.out(dx, al)
}

/// Program COM1: interrupts off, 115200 baud via DLAB, 8N1, FIFOs on,
/// DTR|RTS. Any bitness. Clobbers AL, DX.
pub fn emit_uart_init(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let [divisor_low, divisor_high] = uart::DIVISOR.to_le_bytes();
    uart_write(a, uart::IER_OR_DLM, 0)?;
    uart_write(a, uart::LCR, uart::LCR_DLAB)?;
    uart_write(a, uart::THR_OR_DLL, i32::from(divisor_low))?;
    uart_write(a, uart::IER_OR_DLM, i32::from(divisor_high))?;
    uart_write(a, uart::LCR, uart::LCR_8N1)?;
    uart_write(a, uart::FCR, uart::FCR_ENABLE_AND_CLEAR)?;
    uart_write(a, uart::MCR, uart::MCR_DTR_RTS)
}

/// Real-mode start: interrupts off, string ops forward, DS=ES=SS=0 and the
/// stack at [`map::STACK_TOP`].
pub fn emit_real_mode_prologue(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.cli()?;
    a.cld()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, map::STACK_TOP as u32)
}

/// Load the flat data selector into every data segment register and point
/// the stack at [`map::STACK_TOP`] (32- or 64-bit code).
pub fn emit_load_flat_segments(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(ax, u32::from(selector::DATA))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(fs, ax)?;
    a.mov(gs, ax)?;
    a.mov(ss, ax)?;
    // In 64-bit code this zero-extends into RSP.
    a.mov(esp, map::STACK_TOP as u32)?;
    a.cld()
}

/// `lgdt` the shared GDT whose pseudo-descriptor is at `gdtr` (16- or
/// 32-bit code; the address must fit the current segment).
pub fn emit_load_gdt(a: &mut CodeAssembler, gdtr: u32) -> Result<(), IcedError> {
    a.lgdt(ptr(gdtr))
}

/// Set CR0.PE (clearing CD/NW) and far-jump to 32-bit code at
/// [`map::CODE32`] through [`selector::CODE32`]. 16-bit code, after the GDT
/// is loaded.
pub fn emit_enter_protected_mode(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(eax, cr0)?;
    a.and(eax, !(cr0::CD | cr0::NW))?;
    a.or(eax, cr0::PE)?;
    a.mov(cr0, eax)?;
    a.jmp_far(selector::CODE32, map::CODE32 as u32)
}

/// Build the 4-level page tables (16- or 32-bit code; everything lies below
/// 64 KiB so real mode can do it with DS=ES=0):
/// - PML4[0] -> PDPT; PDPT[0] -> PD_LOW; PD_LOW[0] -> PT_LOW, whose 512
///   4 KiB entries identity-map 0 .. 2 MiB;
/// - PDPT[1] -> PD_ALIAS, whose entry 0 is a 2 MiB page mapping virtual
///   [`map::ALIAS_BASE`] to physical 0.
///
/// Clobbers EAX, ECX, EDI.
pub fn emit_build_page_tables(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let table = pte::PRESENT | pte::WRITABLE;
    // Zero all five table pages.
    a.cld()?;
    a.xor(eax, eax)?;
    a.mov(edi, map::PML4 as u32)?;
    a.mov(ecx, ((map::PAGE_TABLES_END - map::PML4) / 4) as u32)?;
    a.rep().stosd()?;
    a.mov(dword_ptr(map::PML4), map::PDPT as u32 | table)?;
    a.mov(dword_ptr(map::PDPT), map::PD_LOW as u32 | table)?;
    a.mov(dword_ptr(map::PDPT + 8), map::PD_ALIAS as u32 | table)?;
    a.mov(dword_ptr(map::PD_LOW), map::PT_LOW as u32 | table)?;
    a.mov(dword_ptr(map::PD_ALIAS), table | pte::LARGE_PAGE)?;
    // 512 PTEs: physical address | present | writable.
    let mut fill = a.create_label();
    a.mov(edi, map::PT_LOW as u32)?;
    a.mov(eax, table)?;
    a.mov(ecx, 512u32)?;
    a.set_label(&mut fill)?;
    a.mov(dword_ptr(edi), eax)?;
    a.add(eax, 0x1000)?;
    a.add(edi, 8)?;
    a.dec(ecx)?;
    a.jnz(fill)
}

/// Map the IOAPIC and local APIC pages (16- or 32-bit code, after
/// [`emit_build_page_tables`]): zero [`map::PD_MMIO`], point PDPT[3]
/// (3 .. 4 GiB) at it, and identity-map the 2 MiB pages holding
/// [`apic::IOAPIC_BASE`] and [`apic::LAPIC_BASE`], uncached (PCD | PWT).
/// Clobbers EAX, ECX, EDI.
pub fn emit_map_apic_pages(a: &mut CodeAssembler) -> Result<(), IcedError> {
    const TWO_MIB: u64 = 2 << 20;
    let table = pte::PRESENT | pte::WRITABLE;
    let mmio_page = table | pte::LARGE_PAGE | pte::CACHE_DISABLE | pte::WRITE_THROUGH;
    a.cld()?;
    a.xor(eax, eax)?;
    a.mov(edi, map::PD_MMIO as u32)?;
    a.mov(ecx, ((map::PD_MMIO_END - map::PD_MMIO) / 4) as u32)?;
    a.rep().stosd()?;
    a.mov(dword_ptr(map::PDPT + 3 * 8), map::PD_MMIO as u32 | table)?;
    for base in [apic::IOAPIC_BASE, apic::LAPIC_BASE] {
        let base = u64::from(base);
        let entry = map::PD_MMIO + ((base % (1 << 30)) / TWO_MIB) * 8;
        a.mov(dword_ptr(entry), (base & !(TWO_MIB - 1)) as u32 | mmio_page)?;
    }
    Ok(())
}

/// Identity-map the whole 3 .. 4 GiB MMIO gap (PCI windows, ECAM, the
/// IOAPIC and the local APIC) with 2 MiB uncached pages (16- or 32-bit
/// code, after [`emit_build_page_tables`]; it replaces
/// [`emit_map_apic_pages`]). Clobbers EAX, ECX, EDI.
pub fn emit_map_mmio_gap(a: &mut CodeAssembler) -> Result<(), IcedError> {
    const TWO_MIB: u32 = 2 << 20;
    let table = pte::PRESENT | pte::WRITABLE;
    let mmio_page = table | pte::LARGE_PAGE | pte::CACHE_DISABLE | pte::WRITE_THROUGH;
    let mut fill = a.create_label();
    a.mov(dword_ptr(map::PDPT + 3 * 8), map::PD_MMIO as u32 | table)?;
    a.cld()?;
    a.mov(edi, map::PD_MMIO as u32)?;
    a.mov(eax, 0xc000_0000u32 | mmio_page)?;
    a.mov(ecx, 512u32)?;
    a.set_label(&mut fill)?;
    a.mov(dword_ptr(edi), eax)?;
    a.mov(dword_ptr(edi + 4), 0u32)?;
    a.add(eax, TWO_MIB)?;
    a.add(edi, 8)?;
    a.dec(ecx)?;
    a.jnz(fill)
}

/// The 16-bit start most long-mode guests share: real-mode prologue, COM1
/// set-up, page tables (with the MMIO gap mapped uncached when
/// `map_mmio`), then straight into 64-bit code at [`map::CODE64`]
/// through the GDT whose pseudo-descriptor is at `gdtr`. Returns the
/// 16-bit code blob.
pub fn long_mode_entry(gdtr: u32, map_mmio: bool) -> Result<CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    emit_real_mode_prologue(&mut a)?;
    emit_uart_init(&mut a)?;
    emit_build_page_tables(&mut a)?;
    if map_mmio {
        emit_map_mmio_gap(&mut a)?;
    }
    emit_real_mode_to_long_mode(&mut a, gdtr)?;
    Ok(assemble(&mut a, map::CODE16)?.blob)
}

/// [`long_mode_entry`] for the interrupt guests: the local APIC and
/// IOAPIC pages mapped (uncached, [`map::PD_MMIO`]) instead of the whole
/// MMIO gap.
pub fn long_mode_entry_with_apic_pages(gdtr: u32) -> Result<CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    emit_real_mode_prologue(&mut a)?;
    emit_uart_init(&mut a)?;
    emit_build_page_tables(&mut a)?;
    emit_map_apic_pages(&mut a)?;
    emit_real_mode_to_long_mode(&mut a, gdtr)?;
    Ok(assemble(&mut a, map::CODE16)?.blob)
}

/// An interrupt guest whole: the real-mode entry of
/// [`long_mode_entry_with_apic_pages`], its 64-bit `code64`, the GDT and
/// its `data` block, with the areas that entry fills at run time.
pub fn long_mode_apic_program(
    gdtr: u32,
    code64: CodeBlob,
    data: (u64, Vec<u8>),
) -> Result<GuestProgram, IcedError> {
    let code16 = long_mode_entry_with_apic_pages(gdtr)?;
    Ok(GuestProgram {
        code: vec![code16, code64],
        data: vec![gdt_blob(), data],
        work_areas: vec![
            (map::PML4, map::PAGE_TABLES_END, "page tables"),
            (map::STACK_BOTTOM, map::STACK_TOP, "stack"),
            (map::IDT, map::IDT_END, "IDT"),
            (map::PD_MMIO, map::PD_MMIO_END, "PD for the APIC pages"),
        ],
        entry: real_mode_entry(),
    })
}

/// Turn on long mode: CR4.PAE, CR3 = [`map::PML4`], EFER.LME, then CR0.PE
/// and CR0.PG together (clearing CD/NW). 16- or 32-bit code; the caller
/// far-jumps to 64-bit code next. Clobbers EAX, ECX, EDX.
pub fn emit_enable_long_mode(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(eax, cr4)?;
    a.or(eax, CR4_PAE)?;
    a.mov(cr4, eax)?;
    a.mov(eax, map::PML4 as u32)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, MSR_EFER)?;
    a.rdmsr()?;
    a.or(eax, EFER_LME)?;
    a.wrmsr()?;
    a.mov(eax, cr0)?;
    a.and(eax, !(cr0::CD | cr0::NW))?;
    a.or(eax, cr0::PE | cr0::PG)?;
    a.mov(cr0, eax)
}

/// Straight from real mode to 64-bit code at [`map::CODE64`]: `lgdt`, turn
/// on long mode with CR0.PE and CR0.PG in one write, far-jump through
/// [`selector::CODE64`]. 16-bit code, after the page tables are built.
pub fn emit_real_mode_to_long_mode(a: &mut CodeAssembler, gdtr: u32) -> Result<(), IcedError> {
    emit_load_gdt(a, gdtr)?;
    emit_enable_long_mode(a)?;
    a.jmp_far(selector::CODE64, map::CODE64 as u32)
}

/// `cli; hlt`, looping back should the CPU ever continue.
pub fn emit_halt(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut halt = a.create_label();
    a.set_label(&mut halt)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(halt)
}

/// Labels of the shared subroutines; call [`Routines::emit`] once, after
/// the code that uses them.
#[derive(Clone, Copy)]
pub struct Routines {
    pub putc: CodeLabel,
    pub print_str: CodeLabel,
    pub print_hex: CodeLabel,
}

impl Routines {
    pub fn new(a: &mut CodeAssembler) -> Self {
        Routines {
            putc: a.create_label(),
            print_str: a.create_label(),
            print_hex: a.create_label(),
        }
    }

    /// Print the string at `text`. Clobbers AX, DX and the string pointer.
    pub fn print(&self, a: &mut CodeAssembler, text: u32) -> Result<(), IcedError> {
        if a.bitness() == 16 {
            a.mov(si, text)?;
        } else {
            // Zero-extends into RSI in 64-bit code.
            a.mov(esi, text)?;
        }
        a.call(self.print_str)
    }

    /// Print the low `digits` nibbles of EAX/RAX in hex (32/64-bit code).
    pub fn print_hex(&self, a: &mut CodeAssembler, digits: u32) -> Result<(), IcedError> {
        a.mov(ecx, digits)?;
        a.call(self.print_hex)
    }

    /// Emit the subroutine bodies.
    pub fn emit(mut self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        // putc: AL -> COM1 once the transmitter holding register is empty.
        let mut poll = a.create_label();
        a.set_label(&mut self.putc)?;
        a.mov(ah, al)?;
        a.mov(dx, u32::from(ports::COM1 + uart::LSR))?;
        a.set_label(&mut poll)?;
        a.in_(al, dx)?;
        a.test(al, uart::LSR_THRE)?;
        a.jz(poll)?;
        a.mov(al, ah)?;
        a.mov(dx, u32::from(ports::COM1 + uart::THR_OR_DLL))?;
        a.out(dx, al)?;
        a.ret()?;

        // print_str: lodsb until NUL.
        let mut done = a.create_label();
        a.set_label(&mut self.print_str)?;
        a.lodsb()?;
        a.test(al, al)?;
        a.jz(done)?;
        a.call(self.putc)?;
        a.jmp(self.print_str)?;
        a.set_label(&mut done)?;
        a.ret()?;

        if a.bitness() >= 32 {
            self.emit_print_hex(a)?;
        }
        Ok(())
    }

    fn emit_print_hex(&mut self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        let wide = a.bitness() == 64;
        let mut next_digit = a.create_label();
        let mut decimal_digit = a.create_label();
        a.set_label(&mut self.print_hex)?;
        if wide {
            a.mov(rbx, rax)?;
        } else {
            a.mov(ebx, eax)?;
        }
        a.mov(edi, ecx)?;
        a.set_label(&mut next_digit)?;
        a.dec(edi)?;
        a.mov(ecx, edi)?;
        a.shl(ecx, 2)?;
        if wide {
            a.mov(rax, rbx)?;
            a.shr(rax, cl)?;
        } else {
            a.mov(eax, ebx)?;
            a.shr(eax, cl)?;
        }
        a.and(al, 0xf)?;
        a.cmp(al, 10)?;
        a.jb(decimal_digit)?;
        a.add(al, i32::from(b'a' - b'0' - 10))?;
        a.set_label(&mut decimal_digit)?;
        a.add(al, i32::from(b'0'))?;
        a.call(self.putc)?;
        a.test(edi, edi)?;
        a.jnz(next_digit)?;
        a.ret()
    }
}

/// Long-mode IDT support for 64-bit code: zero the IDT at [`map::IDT`] and
/// a `set_gate` subroutine (EDI = vector, RAX = handler; writes a present
/// DPL-0 64-bit interrupt gate through [`selector::CODE64`]; clobbers RDX,
/// RDI).
pub struct IdtBuilder {
    pub set_gate: CodeLabel,
}

impl IdtBuilder {
    pub const GATE_SIZE: u64 = 16;
    /// Present, DPL 0, 64-bit interrupt gate (type 0xe), IST 0.
    const GATE_ATTRIBUTES: u32 = 0x8e00;

    pub fn new(a: &mut CodeAssembler) -> Self {
        IdtBuilder {
            set_gate: a.create_label(),
        }
    }

    /// Zero all 256 gates. Clobbers RAX, RCX, RDI.
    pub fn emit_clear(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.cld()?;
        a.xor(eax, eax)?;
        a.mov(edi, map::IDT as u32)?;
        a.mov(ecx, ((map::IDT_END - map::IDT) / 8) as u32)?;
        a.rep().stosq()
    }

    /// Point gate `vector` at `handler`. Clobbers RAX, RDX, RDI.
    pub fn emit_install(
        &self,
        a: &mut CodeAssembler,
        vector: u8,
        handler: CodeLabel,
    ) -> Result<(), IcedError> {
        a.lea(rax, ptr(handler))?;
        a.mov(edi, u32::from(vector))?;
        a.call(self.set_gate)
    }

    /// Point all 256 gates at `handler` (a catch-all, before the gates the
    /// guest wants are installed). Clobbers RAX, RCX, RDX, RDI.
    pub fn emit_install_all(
        &self,
        a: &mut CodeAssembler,
        handler: CodeLabel,
    ) -> Result<(), IcedError> {
        let mut next = a.create_label();
        a.xor(ecx, ecx)?;
        a.set_label(&mut next)?;
        a.lea(rax, ptr(handler))?;
        a.mov(edi, ecx)?;
        a.call(self.set_gate)?;
        a.inc(ecx)?;
        a.cmp(ecx, 256)?;
        a.jb(next)
    }

    /// The whole IDT set-up: clear every gate, point all of them at
    /// `catch_all` if given, install `gates` (vector, handler) in order,
    /// then LIDT from the pseudo-descriptor at `idtr`. Clobbers RAX, RCX,
    /// RDX, RDI.
    pub fn emit_load(
        &self,
        a: &mut CodeAssembler,
        idtr: u32,
        catch_all: Option<CodeLabel>,
        gates: impl IntoIterator<Item = (u8, CodeLabel)>,
    ) -> Result<(), IcedError> {
        self.emit_clear(a)?;
        if let Some(handler) = catch_all {
            self.emit_install_all(a, handler)?;
        }
        for (vector, handler) in gates {
            self.emit_install(a, vector, handler)?;
        }
        a.lidt(ptr(idtr))
    }

    /// Emit the `set_gate` subroutine.
    pub fn emit(mut self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.set_label(&mut self.set_gate)?;
        a.shl(edi, 4)?;
        a.add(edi, map::IDT as u32)?;
        a.mov(word_ptr(rdi), ax)?;
        a.mov(word_ptr(rdi + 2), u32::from(selector::CODE64))?;
        a.mov(word_ptr(rdi + 4), Self::GATE_ATTRIBUTES)?;
        a.mov(rdx, rax)?;
        a.shr(rdx, 16)?;
        a.mov(word_ptr(rdi + 6), dx)?;
        a.shr(rdx, 16)?;
        a.mov(dword_ptr(rdi + 8), edx)?;
        a.mov(dword_ptr(rdi + 12), 0)?;
        a.ret()
    }
}

/// `print_dec` for 64-bit code: writes EAX as an unsigned decimal number.
/// Uses the `putc` of a [`Routines`]; clobbers RAX, RCX, RDX, RDI.
pub struct DecimalPrinter {
    pub print_dec: CodeLabel,
}

impl DecimalPrinter {
    pub fn new(a: &mut CodeAssembler) -> Self {
        DecimalPrinter {
            print_dec: a.create_label(),
        }
    }

    /// Print EAX in decimal.
    pub fn print(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.call(self.print_dec)
    }

    /// Emit the subroutine (64-bit code).
    pub fn emit(mut self, a: &mut CodeAssembler, routines: &Routines) -> Result<(), IcedError> {
        let mut next_digit = a.create_label();
        let mut put_digit = a.create_label();
        a.set_label(&mut self.print_dec)?;
        a.mov(ecx, 10)?;
        a.xor(edi, edi)?;
        a.set_label(&mut next_digit)?;
        a.xor(edx, edx)?;
        a.div(ecx)?;
        a.add(edx, i32::from(b'0'))?;
        a.push(rdx)?;
        a.inc(edi)?;
        a.test(eax, eax)?;
        a.jnz(next_digit)?;
        a.set_label(&mut put_digit)?;
        a.pop(rax)?;
        a.call(routines.putc)?;
        a.dec(edi)?;
        a.jnz(put_digit)?;
        a.ret()
    }
}

/// Port I/O with immediate port numbers (any bitness): `mov al, value;
/// out port, al` / `in al, port`. Clobber AL.
pub fn emit_outb(a: &mut CodeAssembler, port: u8, value: u8) -> Result<(), IcedError> {
    a.mov(al, i32::from(value))?;
    a.out(i32::from(port), al)
}

pub fn emit_inb(a: &mut CodeAssembler, port: u8) -> Result<(), IcedError> {
    a.in_(al, i32::from(port))
}

/// In an interrupt handler of 64-bit code: clear IF in the RFLAGS image
/// of the interrupt frame at `[rsp + frame]` (the saved RIP's offset), so
/// the handler's `iretq` returns with interrupts disabled. The guests use
/// it in the handler of the last interrupt they wait for: whatever the
/// source does afterwards, no further interrupt is taken.
pub fn emit_return_with_interrupts_disabled(
    a: &mut CodeAssembler,
    frame: i32,
) -> Result<(), IcedError> {
    const RFLAGS_IF: i32 = 1 << 9;
    a.and(qword_ptr(rsp + (frame + 16)), !RFLAGS_IF)
}

/// The 8259A PIC pair: ports and the commands the guests send.
pub mod pic {
    pub const MASTER_COMMAND: u8 = 0x20;
    pub const MASTER_DATA: u8 = 0x21;
    pub const SLAVE_COMMAND: u8 = 0xa0;
    pub const SLAVE_DATA: u8 = 0xa1;
    /// ICW1: edge-triggered, cascade, ICW4 follows.
    pub const ICW1: u8 = 0x11;
    /// ICW3 of the master: a slave on IR2.
    pub const ICW3_MASTER: u8 = 1 << 2;
    /// ICW3 of the slave: its cascade identity, 2.
    pub const ICW3_SLAVE: u8 = 2;
    /// ICW4: 8086 mode, normal EOI.
    pub const ICW4: u8 = 0x01;
    /// OCW2: non-specific EOI.
    pub const EOI: u8 = 0x20;
    /// OCW2: specific EOI, add the level (0-7).
    pub const SPECIFIC_EOI: u8 = 0x60;
    /// OCW3: the next read of the command port returns ISR / IRR.
    pub const READ_ISR: u8 = 0x0b;
    pub const READ_IRR: u8 = 0x0a;
    /// Vector bases the guests program (as Linux does).
    pub const MASTER_VECTOR: u8 = 0x20;
    pub const SLAVE_VECTOR: u8 = 0x28;
}

/// Mask every line of both PICs (OCW1 0xff to each). Any bitness.
/// Clobbers AL.
pub fn emit_pic_mask_all(a: &mut CodeAssembler) -> Result<(), IcedError> {
    emit_outb(a, pic::MASTER_DATA, 0xff)?;
    emit_outb(a, pic::SLAVE_DATA, 0xff)
}

/// Initialise both PICs as Linux's `init_8259A` does: mask everything,
/// ICW1-ICW4 on the master (vectors from `master_vector`, slave on IR2)
/// and on the slave (vectors from `slave_vector`, identity 2), then mask
/// everything again (ICW1 clears the mask register). Any bitness.
/// Clobbers AL.
pub fn emit_pic_init(
    a: &mut CodeAssembler,
    master_vector: u8,
    slave_vector: u8,
) -> Result<(), IcedError> {
    emit_pic_mask_all(a)?;
    emit_outb(a, pic::MASTER_COMMAND, pic::ICW1)?;
    emit_outb(a, pic::MASTER_DATA, master_vector)?;
    emit_outb(a, pic::MASTER_DATA, pic::ICW3_MASTER)?;
    emit_outb(a, pic::MASTER_DATA, pic::ICW4)?;
    emit_outb(a, pic::SLAVE_COMMAND, pic::ICW1)?;
    emit_outb(a, pic::SLAVE_DATA, slave_vector)?;
    emit_outb(a, pic::SLAVE_DATA, pic::ICW3_SLAVE)?;
    emit_outb(a, pic::SLAVE_DATA, pic::ICW4)?;
    emit_pic_mask_all(a)
}

/// The 8254 PIT: ports and the values the guests use.
pub mod pit {
    pub const CHANNEL0: u8 = 0x40;
    pub const COMMAND: u8 = 0x43;
    /// Control word: channel 0, lobyte/hibyte, mode 2 (rate generator),
    /// binary.
    pub const CHANNEL0_RATE_GENERATOR: u8 = 0x34;
    /// Control word: channel 0, lobyte/hibyte, mode 0 (interrupt on
    /// terminal count), binary.
    pub const CHANNEL0_TERMINAL_COUNT: u8 = 0x30;
    /// Control word: latch channel 0's count.
    pub const LATCH_CHANNEL0: u8 = 0x00;
    /// Input clock, Hz.
    pub const HZ: u32 = 1_193_182;
    /// Divisor for 1000 Hz, as Linux's `LATCH` for HZ=1000.
    pub const DIVISOR_1KHZ: u16 = 1193;
}

/// Program PIT channel 0 as a rate generator (mode 2) with `divisor`: its
/// OUT, ISA IRQ0, rises once per period. Any bitness. Clobbers AL.
pub fn emit_pit_rate_generator(a: &mut CodeAssembler, divisor: u16) -> Result<(), IcedError> {
    let [low, high] = divisor.to_le_bytes();
    emit_outb(a, pit::COMMAND, pit::CHANNEL0_RATE_GENERATOR)?;
    emit_outb(a, pit::CHANNEL0, low)?;
    emit_outb(a, pit::CHANNEL0, high)
}

/// The local APIC and the IOAPIC as 64-bit code reaches them (through the
/// pages [`emit_map_apic_pages`] maps): addresses, registers, helpers. The
/// helpers address the registers through RDX (a 32-bit absolute address
/// does not fit a sign-extended displacement), with plain 32-bit `mov`s.
pub mod apic {
    use iced_x86::code_asm::*;

    pub const LAPIC_BASE: u32 = 0xfee0_0000;
    pub const IOAPIC_BASE: u32 = 0xfec0_0000;

    // Local APIC registers (offsets in its page).
    pub const ID: u32 = 0x020;
    pub const VERSION: u32 = 0x030;
    pub const TPR: u32 = 0x080;
    pub const PPR: u32 = 0x0a0;
    pub const EOI: u32 = 0x0b0;
    pub const SVR: u32 = 0x0f0;
    pub const ISR: u32 = 0x100;
    pub const IRR: u32 = 0x200;
    pub const ICR_LOW: u32 = 0x300;
    pub const ICR_HIGH: u32 = 0x310;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_LINT0: u32 = 0x350;
    pub const TIMER_INITIAL: u32 = 0x380;
    pub const TIMER_CURRENT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3e0;
    /// SVR: APIC software enable.
    pub const SVR_ENABLE: u32 = 1 << 8;
    /// LVT: masked.
    pub const LVT_MASKED: u32 = 1 << 16;
    /// LVT timer mode: periodic.
    pub const LVT_TIMER_PERIODIC: u32 = 1 << 17;
    /// ICR: level "assert" (bit 14), destination shorthands (bits 18-19).
    pub const ICR_ASSERT: u32 = 1 << 14;
    pub const ICR_SELF: u32 = 1 << 18;
    pub const ICR_ALL_INCLUDING_SELF: u32 = 2 << 18;
    pub const ICR_ALL_EXCLUDING_SELF: u32 = 3 << 18;

    /// The ISR / IRR register (offset from [`ISR`] or [`IRR`]) holding
    /// `vector`, and its bit there.
    pub const fn vector_register(first: u32, vector: u8) -> (u32, u32) {
        (first + (vector as u32 / 32) * 0x10, 1 << (vector % 32))
    }

    // IOAPIC registers: MMIO offsets, then indices.
    pub const IOREGSEL: i32 = 0x00;
    pub const IOWIN: i32 = 0x10;
    /// Redirection entry `pin`: low dword index (the high dword is + 1).
    pub const fn redirection(pin: u8) -> u32 {
        0x10 + 2 * pin as u32
    }
    /// Redirection entry bits.
    pub const RTE_REMOTE_IRR: u32 = 1 << 14;
    pub const RTE_LEVEL: u32 = 1 << 15;
    pub const RTE_MASKED: u32 = 1 << 16;

    /// `mov dword [LAPIC_BASE + reg], value`. Clobbers RDX.
    pub fn lapic_write(a: &mut CodeAssembler, reg: u32, value: u32) -> Result<(), IcedError> {
        a.mov(edx, LAPIC_BASE)?;
        a.mov(dword_ptr(rdx + reg), value)
    }

    /// Software-enable the local APIC (SVR bit 8) with spurious vector
    /// `spurious`. Clobbers RDX.
    pub fn emit_software_enable(a: &mut CodeAssembler, spurious: u8) -> Result<(), IcedError> {
        lapic_write(a, SVR, SVR_ENABLE | u32::from(spurious))
    }

    /// `mov dword [LAPIC_BASE + reg], eax`. Clobbers RDX.
    pub fn lapic_write_eax(a: &mut CodeAssembler, reg: u32) -> Result<(), IcedError> {
        a.mov(edx, LAPIC_BASE)?;
        a.mov(dword_ptr(rdx + reg), eax)
    }

    /// `mov eax, dword [LAPIC_BASE + reg]`. Clobbers RDX.
    pub fn lapic_read(a: &mut CodeAssembler, reg: u32) -> Result<(), IcedError> {
        a.mov(edx, LAPIC_BASE)?;
        a.mov(eax, dword_ptr(rdx + reg))
    }

    /// Write IOAPIC register `index` (IOREGSEL, then IOWIN). Clobbers RDX.
    pub fn ioapic_write(a: &mut CodeAssembler, index: u32, value: u32) -> Result<(), IcedError> {
        a.mov(edx, IOAPIC_BASE)?;
        a.mov(dword_ptr(rdx + IOREGSEL), index)?;
        a.mov(dword_ptr(rdx + IOWIN), value)
    }

    /// Read IOAPIC register `index` into EAX. Clobbers RDX.
    pub fn ioapic_read(a: &mut CodeAssembler, index: u32) -> Result<(), IcedError> {
        a.mov(edx, IOAPIC_BASE)?;
        a.mov(dword_ptr(rdx + IOREGSEL), index)?;
        a.mov(eax, dword_ptr(rdx + IOWIN))
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Checks every guest's tests apply to its [`GuestProgram`].

    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    /// Blobs and work areas are non-empty, lie in [0x500, 1 MiB) and do
    /// not overlap; the entry point is the start of a 16-bit code blob.
    pub fn check_layout(program: &GuestProgram) {
        let mut ranges: Vec<(u64, u64, String)> = Vec::new();
        for c in &program.code {
            ranges.push((
                c.addr,
                c.addr + c.bytes.len() as u64,
                format!("{}-bit code", c.bitness),
            ));
        }
        for (addr, bytes) in &program.data {
            ranges.push((*addr, addr + bytes.len() as u64, "data".to_string()));
        }
        for (start, end, what) in &program.work_areas {
            ranges.push((*start, *end, what.to_string()));
        }
        for (start, end, what) in &ranges {
            assert!(start < end, "{what} at {start:#x} is empty");
            assert!(
                *start >= map::GDT,
                "{what} at {start:#x} overlaps the real-mode IVT/BDA"
            );
            assert!(
                *end <= map::LOW_MEMORY_END,
                "{what} at {start:#x}..{end:#x} crosses 1 MiB"
            );
        }
        ranges.sort();
        for pair in ranges.windows(2) {
            assert!(
                pair[0].1 <= pair[1].0,
                "{} at {:#x}..{:#x} overlaps {} at {:#x}..{:#x}",
                pair[0].2,
                pair[0].0,
                pair[0].1,
                pair[1].2,
                pair[1].0,
                pair[1].1
            );
        }
        let entry = &program.entry;
        let entry_address = entry.sregs.cs.base + entry.regs.rip;
        assert!(
            program
                .code
                .iter()
                .any(|c| c.bitness == 16 && c.addr == entry_address),
            "entry {entry_address:#x} is not the start of 16-bit code"
        );
        assert_eq!(entry.sregs.cr0 & 1, 0, "guests start in real mode");
    }

    /// Every code byte decodes, in the blob's bitness, to a valid
    /// instruction; returns the number of instructions.
    pub fn check_decodes(program: &GuestProgram) -> usize {
        let mut count = 0;
        for c in &program.code {
            let mut decoder = Decoder::with_ip(c.bitness, &c.bytes, c.addr, DecoderOptions::NONE);
            let mut decoded_len = 0;
            for instruction in &mut decoder {
                assert!(
                    !instruction.is_invalid(),
                    "invalid {}-bit instruction at {:#x}",
                    c.bitness,
                    instruction.ip()
                );
                decoded_len += instruction.len();
                count += 1;
            }
            assert_eq!(decoded_len, c.bytes.len());
        }
        count
    }

    /// Both checks plus the image's blob list matching the program's.
    pub fn check_program(program: &GuestProgram) {
        check_layout(program);
        let instructions = check_decodes(program);
        assert!(instructions < 1000, "guest has {instructions} instructions");
        let blob_count = program.code.len() + program.data.len();
        assert_eq!(program.clone().into_image().blobs.len(), blob_count);
    }

    /// Decode one 16-, 32- or 64-bit blob into Intel syntax lines (for
    /// debugging failures).
    #[allow(dead_code)]
    pub fn disassemble(blob: &CodeBlob) -> Vec<String> {
        let decoder = Decoder::with_ip(blob.bitness, &blob.bytes, blob.addr, DecoderOptions::NONE);
        decoder
            .into_iter()
            .map(|i| format!("{:08x} {}", i.ip(), cpu_interp::disasm(&i)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_block_hands_out_aligned_addresses() {
        let mut data = DataBlock::new(0xa000);
        assert_eq!(data.cstr("ab"), 0xa000);
        assert_eq!(data.table_register(0x500, 31), 0xa008);
        assert_eq!(data.far_pointer(0x18, 0x8000), 0xa018);
        let (base, bytes) = data.finish();
        assert_eq!(base, 0xa000);
        assert_eq!(&bytes[..3], b"ab\0");
        assert_eq!(&bytes[8..10], &[31, 0]);
        assert_eq!(&bytes[10..18], &0x500u64.to_le_bytes());
        assert_eq!(&bytes[0x18..0x1e], &[0x00, 0x80, 0, 0, 0x18, 0]);
    }

    #[test]
    fn routines_assemble_in_every_bitness() {
        for bitness in [16, 32, 64] {
            let mut a = CodeAssembler::new(bitness).unwrap();
            let routines = Routines::new(&mut a);
            emit_uart_init(&mut a).unwrap();
            routines.print(&mut a, 0xa000).unwrap();
            if bitness >= 32 {
                routines.print_hex(&mut a, 8).unwrap();
            }
            emit_halt(&mut a).unwrap();
            routines.emit(&mut a).unwrap();
            let code = assemble(&mut a, 0x8000).unwrap();
            let program = GuestProgram {
                code: vec![code.blob],
                data: vec![],
                work_areas: vec![],
                entry: real_mode_entry(),
            };
            testing::check_decodes(&program);
        }
    }

    #[test]
    fn gdt_descriptors_decode_as_intended() {
        let (addr, bytes) = gdt_blob();
        assert_eq!(addr, map::GDT);
        assert_eq!(bytes.len(), 32);
        let access = |d: u64| (d >> 40) & 0xff;
        let flags = |d: u64| (d >> 52) & 0xf;
        assert_eq!(access(GDT_DESCRIPTORS[1]), 0x9b);
        assert_eq!(flags(GDT_DESCRIPTORS[1]), 0xa, "64-bit code: G and L");
        assert_eq!(access(GDT_DESCRIPTORS[2]), 0x93);
        assert_eq!(flags(GDT_DESCRIPTORS[3]), 0xc, "32-bit code: G and D");
        assert_eq!(usize::from(selector::CODE32) / 8, 3);
    }
}
