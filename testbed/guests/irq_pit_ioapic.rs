//! `irq-pit-ioapic`: PIT interrupts through the IOAPIC and the local APIC,
//! the path every modern OS uses, in 64-bit long mode.
//!
//! With interrupts disabled the guest masks both 8259A PICs (OCW1 0xff),
//! software-enables the local APIC (SVR = 0x1ff: enabled, spurious vector
//! 0xff), programs PIT channel 0 as a 1000 Hz rate generator, and routes
//! IOAPIC pin 2 — where ISA IRQ0 arrives (the usual interrupt source
//! override) — to vector 0x30: fixed delivery, edge-triggered, active high,
//! physical destination 0 (the local APIC's ID, which it reads first).
//! It reads the entry back.
//!
//! Then it waits for exactly [`INTERRUPTS`] interrupts with
//! `sti; hlt; cmp [count], N; jb`. The handler reads the local APIC's ISR
//! (vector 0x30 must be in service) and writes the EOI register once. The
//! last one first masks pin 2 and returns with IF clear (it edits the saved
//! RFLAGS), so later ticks add no interrupt and the device accesses do not
//! depend on timing. Afterwards ISR must be clear and the entry masked; the
//! guest software-disables the local APIC before it stops, so an edge that
//! beat the mask (a host that stalled the guest for a whole period inside
//! the last handler) could not be delivered either.
//!
//! Memory map (see [`super::asm`] for the shared one):
//!
//! ```text
//! 0x0000_0500  GDT                   0x0000_6000 .. 0x7000  stack
//! 0x0000_1000 .. 0x0000_6000  page tables, built by the 16-bit code
//! 0x0000_7c00  16-bit code (entry: CS=0, IP=0x7c00)
//! 0x0000_9000  64-bit code           0x0000_a000  data: GDTR, IDTR, strings, counters
//! 0x0000_b000 .. 0x0000_c000  IDT, built by the 64-bit code
//! 0x0000_c000 .. 0x0000_d000  PD mapping the IOAPIC and local APIC pages
//! ```

use iced_x86::code_asm::*;

use super::asm::{
    self, apic, map, pit, DataBlock, DecimalPrinter, GuestProgram, IdtBuilder, Routines,
};
use super::GuestImage;

pub const NAME: &str = "irq-pit-ioapic";
pub const DESCRIPTION: &str =
    "64-bit long mode: 10 PIT interrupts through IOAPIC pin 2 and the local APIC (vector 0x30)";

/// Interrupts the guest waits for.
pub const INTERRUPTS: u32 = 10;
/// IOAPIC pin of ISA IRQ0.
pub const PIN: u8 = 2;
pub const VECTOR: u8 = 0x30;
/// SVR: software enabled, spurious vector 0xff.
const SVR: u32 = apic::SVR_ENABLE | 0xff;

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("irq-pit-ioapic guest assembles")
}

struct Data {
    gdtr: u32,
    idtr: u32,
    header: u32,
    version_prefix: u32,
    svr_prefix: u32,
    header_end: u32,
    route_prefix: u32,
    route_middle: u32,
    count_prefix: u32,
    count_suffix: u32,
    isr_prefix: u32,
    isr_varied: u32,
    after_prefix: u32,
    entry_prefix: u32,
    masked_suffix: u32,
    line_end: u32,
    unexpected: u32,
    count: u32,
    apic_id: u32,
    apic_version: u32,
    svr: u32,
    entry_programmed: u32,
    entry_after: u32,
    /// AND and OR of the ISR dword holding vector 0x30, read in the handlers.
    isr_and: u32,
    isr_or: u32,
    isr_after: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let d = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        header: data.cstr("irq-pit-ioapic: in 64-bit long mode: PIC masked, local APIC ID 0x"),
        version_prefix: data.cstr(" version 0x"),
        svr_prefix: data.cstr(", SVR 0x"),
        header_end: data.cstr(", PIT channel 0 at 1000 Hz\r\n"),
        route_prefix: data.cstr(&format!(
            "irq-pit-ioapic: IOAPIC pin {PIN} (ISA IRQ0): edge, fixed, vector {VECTOR:#04x}, physical destination 0x"
        )),
        route_middle: data.cstr("; entry low dword reads 0x"),
        count_prefix: data.cstr("irq-pit-ioapic: "),
        count_suffix: data.cstr(&format!(
            " timer interrupts through the IOAPIC (vector {VECTOR:#04x}), local APIC EOI each\r\n"
        )),
        isr_prefix: data.cstr(&format!(
            "irq-pit-ioapic: local APIC ISR for {VECTOR:#04x} in every handler 0x"
        )),
        isr_varied: data.cstr(&format!(
            "irq-pit-ioapic: local APIC ISR for {VECTOR:#04x} not the same in every handler, AND 0x"
        )),
        after_prefix: data.cstr(", after the last EOI 0x"),
        entry_prefix: data.cstr(&format!("; pin {PIN} entry 0x")),
        masked_suffix: data.cstr(" (masked)\r\n"),
        line_end: data.cstr("\r\n"),
        unexpected: data.cstr("irq-pit-ioapic: unexpected interrupt or exception, stopping\r\n"),
        count: data.zeroed(4, 4),
        apic_id: data.zeroed(4, 4),
        apic_version: data.zeroed(4, 4),
        svr: data.zeroed(4, 4),
        entry_programmed: data.zeroed(4, 4),
        entry_after: data.zeroed(4, 4),
        isr_and: data.bytes(&u32::MAX.to_le_bytes(), 4),
        isr_or: data.zeroed(4, 4),
        isr_after: data.zeroed(4, 4),
    };

    asm::long_mode_apic_program(d.gdtr, long_mode_code(&d)?, data.finish())
}

fn long_mode_code(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let decimal = DecimalPrinter::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut unexpected = a.create_label();
    let mut timer_handler = a.create_label();
    let (isr_register, _) = apic::vector_register(apic::ISR, VECTOR);
    let entry = apic::redirection(PIN);

    asm::emit_load_flat_segments(&mut a)?;
    idt.emit_load(&mut a, d.idtr, Some(unexpected), [(VECTOR, timer_handler)])?;

    // PICs masked; local APIC on.
    asm::emit_pic_mask_all(&mut a)?;
    apic::lapic_write(&mut a, apic::SVR, SVR)?;
    apic::lapic_read(&mut a, apic::SVR)?;
    a.mov(dword_ptr(d.svr), eax)?;
    apic::lapic_read(&mut a, apic::ID)?;
    a.mov(dword_ptr(d.apic_id), eax)?;
    apic::lapic_read(&mut a, apic::VERSION)?;
    a.mov(dword_ptr(d.apic_version), eax)?;

    asm::emit_pit_rate_generator(&mut a, pit::DIVISOR_1KHZ)?;

    // Pin 2 → vector 0x30 at this APIC's ID: high dword first, as Linux.
    a.mov(eax, dword_ptr(d.apic_id))?;
    a.and(eax, 0xff00_0000u32 as i32)?;
    a.mov(ecx, eax)?;
    a.mov(edx, apic::IOAPIC_BASE)?;
    a.mov(dword_ptr(rdx + apic::IOREGSEL), entry + 1)?;
    a.mov(dword_ptr(rdx + apic::IOWIN), ecx)?;
    apic::ioapic_write(&mut a, entry, u32::from(VECTOR))?;
    apic::ioapic_read(&mut a, entry)?;
    a.mov(dword_ptr(d.entry_programmed), eax)?;

    // The header (the values just read), then wait.
    routines.print(&mut a, d.header)?;
    a.mov(eax, dword_ptr(d.apic_id))?;
    a.shr(eax, 24)?;
    routines.print_hex(&mut a, 2)?;
    routines.print(&mut a, d.version_prefix)?;
    a.mov(eax, dword_ptr(d.apic_version))?;
    routines.print_hex(&mut a, 8)?;
    routines.print(&mut a, d.svr_prefix)?;
    a.mov(eax, dword_ptr(d.svr))?;
    routines.print_hex(&mut a, 8)?;
    routines.print(&mut a, d.header_end)?;
    routines.print(&mut a, d.route_prefix)?;
    a.mov(eax, dword_ptr(d.apic_id))?;
    a.shr(eax, 24)?;
    routines.print_hex(&mut a, 2)?;
    routines.print(&mut a, d.route_middle)?;
    a.mov(eax, dword_ptr(d.entry_programmed))?;
    routines.print_hex(&mut a, 8)?;
    routines.print(&mut a, d.line_end)?;

    let mut wait = a.create_label();
    a.set_label(&mut wait)?;
    a.sti()?;
    a.hlt()?;
    a.cmp(dword_ptr(d.count), INTERRUPTS)?;
    a.jb(wait)?;
    a.cli()?;

    apic::lapic_read(&mut a, isr_register)?;
    a.mov(dword_ptr(d.isr_after), eax)?;
    apic::ioapic_read(&mut a, entry)?;
    a.mov(dword_ptr(d.entry_after), eax)?;
    // Nothing more can be delivered.
    apic::lapic_write(&mut a, apic::SVR, 0xff)?;

    routines.print(&mut a, d.count_prefix)?;
    a.mov(eax, dword_ptr(d.count))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.count_suffix)?;
    let mut isr_same = a.create_label();
    let mut isr_done = a.create_label();
    a.mov(eax, dword_ptr(d.isr_and))?;
    a.cmp(eax, dword_ptr(d.isr_or))?;
    a.je(isr_same)?;
    routines.print(&mut a, d.isr_varied)?;
    a.jmp(isr_done)?;
    a.set_label(&mut isr_same)?;
    routines.print(&mut a, d.isr_prefix)?;
    a.set_label(&mut isr_done)?;
    a.mov(eax, dword_ptr(d.isr_and))?;
    routines.print_hex(&mut a, 8)?;
    routines.print(&mut a, d.after_prefix)?;
    a.mov(eax, dword_ptr(d.isr_after))?;
    routines.print_hex(&mut a, 8)?;
    routines.print(&mut a, d.entry_prefix)?;
    a.mov(eax, dword_ptr(d.entry_after))?;
    routines.print_hex(&mut a, 8)?;
    routines.print(&mut a, d.masked_suffix)?;
    asm::emit_halt(&mut a)?;

    // Vector 0x30. [rsp] RDX, [rsp+8] RAX, then the CPU's frame.
    let mut eoi = a.create_label();
    a.set_label(&mut timer_handler)?;
    a.push(rax)?;
    a.push(rdx)?;
    a.inc(dword_ptr(d.count))?;
    apic::lapic_read(&mut a, isr_register)?;
    a.and(dword_ptr(d.isr_and), eax)?;
    a.or(dword_ptr(d.isr_or), eax)?;
    a.cmp(dword_ptr(d.count), INTERRUPTS)?;
    a.jb(eoi)?;
    apic::ioapic_write(&mut a, entry, apic::RTE_MASKED | u32::from(VECTOR))?;
    asm::emit_return_with_interrupts_disabled(&mut a, 16)?;
    a.set_label(&mut eoi)?;
    apic::lapic_write(&mut a, apic::EOI, 0)?;
    a.pop(rdx)?;
    a.pop(rax)?;
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
    fn isr_dword_of_the_vector() {
        assert_eq!(
            apic::vector_register(apic::ISR, VECTOR),
            (0x110, 0x0001_0000)
        );
        assert_eq!(apic::redirection(PIN), 0x14);
    }
}
