//! `irq-level-eoi`: a level-triggered interrupt through the IOAPIC, and the
//! EOI that ends it, in 64-bit long mode.
//!
//! The source is COM1's own "transmitter holding register empty" (THRE)
//! interrupt on ISA IRQ4: with MCR.OUT2 set (PC serial cards gate the
//! UART's interrupt pin with it), writing IER = 0x02 while THR is empty
//! raises it at once, and it stays raised — a level — until the guest
//! reads IIR (which clears the THRE interrupt when IIR reports it) or
//! clears IER. It is deterministic: no time is involved.
//!
//! The PICs are masked; IOAPIC pin 4 is programmed level-triggered, active
//! high, fixed, physical destination 0, unmasked; the local APIC is
//! software-enabled.
//!
//! **Phase 1** ([`INTERRUPTS`] times, vector 0x34): with interrupts
//! disabled the guest writes IER = 0x02, the line rises and the IOAPIC
//! sends the interrupt (setting the entry's remote IRR, bit 14); `sti; hlt;
//! cli` takes it. The handler reads the redirection entry (remote IRR must
//! be set: the IOAPIC waits for the EOI), reads IIR (0xc2: FIFOs on, THRE;
//! the line drops), writes the local APIC's EOI register once (the local
//! APIC broadcasts the EOI of a level-triggered vector to the IOAPIC, which
//! clears remote IRR), and reads the entry again (remote IRR clear). The
//! main code then writes IER = 0 before anything else, so its own prints
//! (which empty THR again) raise nothing.
//!
//! **Phase 2** (vector 0x35): the EOI comes *before* the source is
//! cleared. The IOAPIC sees the line still asserted when remote IRR
//! clears and sends the interrupt again at once, so one assertion gives
//! two interrupts: the first handler finds remote IRR set again after its
//! EOI (and IIR 0xc2), the second finds it clear after its EOI (and IIR
//! 0xc1: nothing pending, the first read cleared it). The guest waits for
//! both with `sti; hlt`.
//!
//! At the end IER = 0, OUT2 off, pin 4 masked, the local APIC
//! software-disabled.
//!
//! Memory map (see [`super::asm`] for the shared one):
//!
//! ```text
//! 0x0000_0500  GDT                   0x0000_6000 .. 0x7000  stack
//! 0x0000_1000 .. 0x0000_6000  page tables, built by the 16-bit code
//! 0x0000_7c00  16-bit code (entry: CS=0, IP=0x7c00)
//! 0x0000_9000  64-bit code           0x0000_a000  data: GDTR, IDTR, strings, slots
//! 0x0000_b000 .. 0x0000_c000  IDT, built by the 64-bit code
//! 0x0000_c000 .. 0x0000_d000  PD mapping the IOAPIC and local APIC pages
//! ```

use iced_x86::code_asm::*;

use super::asm::{
    self, apic, map, uart, DataBlock, DecimalPrinter, GuestProgram, IdtBuilder, Routines,
};
use super::GuestImage;
use crate::layout::ports;

pub const NAME: &str = "irq-level-eoi";
pub const DESCRIPTION: &str =
    "64-bit long mode: COM1's THRE interrupt, level-triggered through IOAPIC pin 4; remote IRR until the EOI";

/// Phase-1 interrupts.
pub const INTERRUPTS: u32 = 10;
/// IOAPIC pin of ISA IRQ4 (COM1).
pub const PIN: u8 = 4;
pub const VECTOR: u8 = 0x34;
pub const VECTOR_EARLY_EOI: u8 = 0x35;
/// IER: transmitter holding register empty interrupt.
const IER_THRE: u8 = 0x02;
/// MCR: DTR | RTS | OUT2.
const MCR_OUT2: u8 = 0x0b;
/// Offset of IIR from COM1.
const IIR: u16 = 2;

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("irq-level-eoi guest assembles")
}

struct Data {
    gdtr: u32,
    idtr: u32,
    header: u32,
    count_prefix: u32,
    count_suffix: u32,
    remote_irr_ok: u32,
    remote_irr_bad: u32,
    iir_prefix: u32,
    iir_varied: u32,
    thre_suffix: u32,
    early_prefix: u32,
    early_suffix: u32,
    first_prefix: u32,
    iir_middle: u32,
    second_prefix: u32,
    line_end: u32,
    unexpected: u32,
    count: u32,
    /// Remote IRR (0 or 1) read before the EOI, ANDed over the handlers;
    /// after it, ORed.
    before_and: u32,
    after_or: u32,
    iir_and: u32,
    iir_or: u32,
    early_count: u32,
    /// Per phase-2 handler: remote IRR after the EOI, IIR.
    early_after: u32,
    early_iir: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let d = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        header: data.cstr(&format!(
            "irq-level-eoi: in 64-bit long mode: COM1 THRE interrupt (IER {IER_THRE:#04x}, MCR OUT2) on ISA IRQ4, \
             IOAPIC pin {PIN} level-triggered, PICs masked\r\n"
        )),
        count_prefix: data.cstr("irq-level-eoi: "),
        count_suffix: data.cstr(&format!(
            " level-triggered interrupts (vector {VECTOR:#04x}), one per assertion\r\n"
        )),
        remote_irr_ok: data.cstr(
            "irq-level-eoi: in every handler: remote IRR set before the EOI, clear after it",
        ),
        remote_irr_bad: data.cstr(
            "irq-level-eoi: in some handler: remote IRR NOT set before the EOI or NOT clear after it",
        ),
        iir_prefix: data.cstr("; IIR 0x"),
        iir_varied: data.cstr("; IIR varied, AND 0x"),
        thre_suffix: data.cstr(" (THRE)\r\n"),
        early_prefix: data.cstr("irq-level-eoi: EOI before clearing the source: delivered again, "),
        early_suffix: data.cstr(&format!(
            " interrupts (vector {VECTOR_EARLY_EOI:#04x}) for one assertion\r\n"
        )),
        first_prefix: data.cstr("irq-level-eoi: first handler: remote IRR after EOI "),
        iir_middle: data.cstr(", IIR 0x"),
        second_prefix: data.cstr("; second handler: remote IRR after EOI "),
        line_end: data.cstr("\r\n"),
        unexpected: data.cstr("irq-level-eoi: unexpected interrupt or exception, stopping\r\n"),
        count: data.zeroed(4, 4),
        before_and: data.bytes(&u32::MAX.to_le_bytes(), 4),
        after_or: data.zeroed(4, 4),
        iir_and: data.bytes(&[0xff], 1),
        iir_or: data.zeroed(1, 1),
        early_count: data.zeroed(4, 4),
        early_after: data.zeroed(8, 4),
        early_iir: data.zeroed(2, 1),
    };

    asm::long_mode_apic_program(d.gdtr, long_mode_code(&d)?, data.finish())
}

/// Write `value` to COM1 register `offset`. Clobbers AL, DX.
fn uart_write(a: &mut CodeAssembler, offset: u16, value: u8) -> Result<(), IcedError> {
    a.mov(dx, u32::from(ports::COM1 + offset))?;
    a.mov(al, i32::from(value))?;
    a.out(dx, al)
}

/// Read COM1's IIR into AL. Clobbers DX.
fn read_iir(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, u32::from(ports::COM1 + IIR))?;
    a.in_(al, dx)
}

/// Read pin 4's entry and leave its remote IRR bit in ECX as 0 or 1.
/// Clobbers EAX, RDX.
fn read_remote_irr(a: &mut CodeAssembler) -> Result<(), IcedError> {
    apic::ioapic_read(a, apic::redirection(PIN))?;
    a.mov(ecx, eax)?;
    a.shr(ecx, apic::RTE_REMOTE_IRR.trailing_zeros())?;
    a.and(ecx, 1)
}

/// Program pin 4: level, active high, fixed, physical destination 0.
fn route_pin(a: &mut CodeAssembler, vector: u8, masked: bool) -> Result<(), IcedError> {
    let entry = apic::redirection(PIN);
    apic::ioapic_write(a, entry + 1, 0)?;
    let mask = if masked { apic::RTE_MASKED } else { 0 };
    apic::ioapic_write(a, entry, mask | apic::RTE_LEVEL | u32::from(vector))
}

fn long_mode_code(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let decimal = DecimalPrinter::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut unexpected = a.create_label();
    let mut level_handler = a.create_label();
    let mut early_eoi_handler = a.create_label();

    asm::emit_load_flat_segments(&mut a)?;
    routines.print(&mut a, d.header)?;
    idt.emit_load(
        &mut a,
        d.idtr,
        Some(unexpected),
        [
            (VECTOR, level_handler),
            (VECTOR_EARLY_EOI, early_eoi_handler),
        ],
    )?;

    asm::emit_pic_mask_all(&mut a)?;
    apic::emit_software_enable(&mut a, 0xff)?;
    route_pin(&mut a, VECTOR, false)?;
    uart_write(&mut a, uart::IER_OR_DLM, 0)?;
    uart_write(&mut a, uart::MCR, MCR_OUT2)?;

    // Phase 1. EBX = the count to wait for (handlers preserve it).
    let mut assert_line = a.create_label();
    let mut wait = a.create_label();
    a.xor(ebx, ebx)?;
    a.set_label(&mut assert_line)?;
    a.inc(ebx)?;
    uart_write(&mut a, uart::IER_OR_DLM, IER_THRE)?;
    a.set_label(&mut wait)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.cmp(dword_ptr(d.count), ebx)?;
    a.jb(wait)?;
    uart_write(&mut a, uart::IER_OR_DLM, 0)?;
    a.cmp(ebx, INTERRUPTS)?;
    a.jb(assert_line)?;

    // Phase 2: one assertion, the handler EOIs before reading IIR.
    route_pin(&mut a, VECTOR_EARLY_EOI, false)?;
    uart_write(&mut a, uart::IER_OR_DLM, IER_THRE)?;
    let mut wait_early = a.create_label();
    a.set_label(&mut wait_early)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.cmp(dword_ptr(d.early_count), 2)?;
    a.jb(wait_early)?;

    // Quiet everything before printing (a print empties THR again).
    uart_write(&mut a, uart::IER_OR_DLM, 0)?;
    uart_write(&mut a, uart::MCR, uart::MCR_DTR_RTS as u8)?;
    route_pin(&mut a, VECTOR_EARLY_EOI, true)?;
    apic::lapic_write(&mut a, apic::SVR, 0xff)?;

    routines.print(&mut a, d.count_prefix)?;
    a.mov(eax, dword_ptr(d.count))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.count_suffix)?;

    let mut remote_bad = a.create_label();
    let mut remote_done = a.create_label();
    a.cmp(dword_ptr(d.before_and), 1)?;
    a.jne(remote_bad)?;
    a.cmp(dword_ptr(d.after_or), 0)?;
    a.jne(remote_bad)?;
    routines.print(&mut a, d.remote_irr_ok)?;
    a.jmp(remote_done)?;
    a.set_label(&mut remote_bad)?;
    routines.print(&mut a, d.remote_irr_bad)?;
    a.set_label(&mut remote_done)?;
    let mut iir_same = a.create_label();
    let mut iir_done = a.create_label();
    a.mov(al, byte_ptr(d.iir_and))?;
    a.cmp(al, byte_ptr(d.iir_or))?;
    a.je(iir_same)?;
    routines.print(&mut a, d.iir_varied)?;
    a.jmp(iir_done)?;
    a.set_label(&mut iir_same)?;
    routines.print(&mut a, d.iir_prefix)?;
    a.set_label(&mut iir_done)?;
    a.movzx(eax, byte_ptr(d.iir_and))?;
    routines.print_hex(&mut a, 2)?;
    routines.print(&mut a, d.thre_suffix)?;

    routines.print(&mut a, d.early_prefix)?;
    a.mov(eax, dword_ptr(d.early_count))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.early_suffix)?;
    routines.print(&mut a, d.first_prefix)?;
    a.mov(eax, dword_ptr(d.early_after))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.iir_middle)?;
    a.movzx(eax, byte_ptr(d.early_iir))?;
    routines.print_hex(&mut a, 2)?;
    routines.print(&mut a, d.second_prefix)?;
    a.mov(eax, dword_ptr(u64::from(d.early_after) + 4))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.iir_middle)?;
    a.movzx(eax, byte_ptr(u64::from(d.early_iir) + 1))?;
    routines.print_hex(&mut a, 2)?;
    routines.print(&mut a, d.line_end)?;
    asm::emit_halt(&mut a)?;

    const SAVED: [AsmRegister64; 3] = [rax, rcx, rdx];

    // Phase 1: remote IRR, IIR (clears the source), EOI, remote IRR.
    a.set_label(&mut level_handler)?;
    for r in SAVED {
        a.push(r)?;
    }
    a.inc(dword_ptr(d.count))?;
    read_remote_irr(&mut a)?;
    a.and(dword_ptr(d.before_and), ecx)?;
    read_iir(&mut a)?;
    a.and(byte_ptr(d.iir_and), al)?;
    a.or(byte_ptr(d.iir_or), al)?;
    apic::lapic_write(&mut a, apic::EOI, 0)?;
    read_remote_irr(&mut a)?;
    a.or(dword_ptr(d.after_or), ecx)?;
    for r in SAVED.iter().rev() {
        a.pop(*r)?;
    }
    a.iretq()?;

    // Phase 2: EOI first, then remote IRR and IIR, kept per invocation.
    a.set_label(&mut early_eoi_handler)?;
    for r in SAVED {
        a.push(r)?;
    }
    apic::lapic_write(&mut a, apic::EOI, 0)?;
    read_remote_irr(&mut a)?;
    a.mov(eax, dword_ptr(d.early_count))?;
    a.and(eax, 1)?;
    a.mov(dword_ptr(rax * 4 + d.early_after as i32), ecx)?;
    a.mov(ecx, eax)?;
    read_iir(&mut a)?;
    a.mov(byte_ptr(rcx + d.early_iir as i32), al)?;
    a.inc(dword_ptr(d.early_count))?;
    for r in SAVED.iter().rev() {
        a.pop(*r)?;
    }
    a.iretq()?;

    a.set_label(&mut unexpected)?;
    routines.print(&mut a, d.unexpected)?;
    asm::emit_halt(&mut a)?;

    idt.emit(&mut a)?;
    decimal.emit(&mut a, &routines)?;
    routines.emit(&mut a)?;
    Ok(asm::assemble(&mut a, map::CODE64)?.blob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guests::asm::testing;

    #[test]
    fn assembles_and_decodes() {
        testing::check_program(&program());
    }

    #[test]
    fn entry_bits() {
        assert_eq!(apic::redirection(PIN), 0x18);
        assert_eq!(apic::RTE_REMOTE_IRR.trailing_zeros(), 14);
    }
}
