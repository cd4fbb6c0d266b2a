//! `self-ipi`: interprocessor interrupts a CPU sends itself through the
//! local APIC's interrupt command register (ICR), in 64-bit long mode.
//!
//! After masking the PICs and software-enabling the local APIC, the guest
//! reads its APIC ID and sends, each time with interrupts disabled (the IPI
//! only sets IRR), then takes it with `sti; hlt; cli`:
//!
//! 1. fixed vector 0x40 with the destination shorthand "self" (ICR bits
//!    18-19 = 01; the ICR is read back: delivery status 0);
//! 2. fixed vector 0x41, no shorthand, physical destination = its own APIC
//!    ID (ICR high bits 24-31);
//! 3. fixed vector 0x42 with the shorthand "all including self";
//! 4. fixed vector 0x43 with the shorthand "all excluding self": on this
//!    one-CPU machine nobody receives it, so the guest only checks that
//!    IRR does not hold 0x43 (it does not wait for it).
//!
//! Each vector has its own stub that records the vector taken; the common
//! handler counts and writes the EOI register once.
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

use super::asm::{self, apic, map, DataBlock, DecimalPrinter, GuestProgram, IdtBuilder, Routines};
use super::GuestImage;

pub const NAME: &str = "self-ipi";
pub const DESCRIPTION: &str =
    "64-bit long mode: self-IPIs through the local APIC ICR (shorthand self, own APIC ID, all incl./excl. self)";

pub const VECTOR_SHORTHAND_SELF: u8 = 0x40;
pub const VECTOR_OWN_ID: u8 = 0x41;
pub const VECTOR_ALL_INCLUDING_SELF: u8 = 0x42;
pub const VECTOR_ALL_EXCLUDING_SELF: u8 = 0x43;

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("self-ipi guest assembles")
}

struct Data {
    gdtr: u32,
    idtr: u32,
    header: u32,
    header_end: u32,
    self_prefix: u32,
    own_id_prefix: u32,
    own_id_low: u32,
    all_including_prefix: u32,
    all_excluding_prefix: u32,
    all_excluding_suffix: u32,
    took: u32,
    not_taken: u32,
    line_end: u32,
    total_prefix: u32,
    total_suffix: u32,
    unexpected: u32,
    apic_id: u32,
    icr_readback: u32,
    /// The vector the last interrupt came in on (0: none since cleared).
    last_vector: u32,
    taken: u32,
    irr_excluding: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let d = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        header: data.cstr("self-ipi: in 64-bit long mode: local APIC ID 0x"),
        header_end: data.cstr(", enabled; each IPI sent with interrupts disabled, then sti; hlt\r\n"),
        self_prefix: data.cstr(&format!("self-ipi: ICR {:#010x} (fixed, shorthand self), reads back 0x", icr(apic::ICR_SELF, VECTOR_SHORTHAND_SELF))),
        own_id_prefix: data.cstr("self-ipi: ICR high 0x"),
        own_id_low: data.cstr(&format!(" low {:#010x} (fixed, physical destination = own APIC ID)", icr(0, VECTOR_OWN_ID))),
        all_including_prefix: data.cstr(&format!(
            "self-ipi: ICR {:#010x} (fixed, shorthand all including self)",
            icr(apic::ICR_ALL_INCLUDING_SELF, VECTOR_ALL_INCLUDING_SELF)
        )),
        all_excluding_prefix: data.cstr(&format!(
            "self-ipi: ICR {:#010x} (fixed, shorthand all excluding self): not delivered here (IRR for {:#04x}: 0x",
            icr(apic::ICR_ALL_EXCLUDING_SELF, VECTOR_ALL_EXCLUDING_SELF),
            VECTOR_ALL_EXCLUDING_SELF
        )),
        all_excluding_suffix: data.cstr(")\r\n"),
        took: data.cstr(": took vector 0x"),
        not_taken: data.cstr(": NOT TAKEN"),
        line_end: data.cstr("\r\n"),
        total_prefix: data.cstr("self-ipi: "),
        total_suffix: data.cstr(" IPIs taken, EOI each\r\n"),
        unexpected: data.cstr("self-ipi: unexpected interrupt or exception, stopping\r\n"),
        apic_id: data.zeroed(4, 4),
        icr_readback: data.zeroed(4, 4),
        last_vector: data.zeroed(4, 4),
        taken: data.zeroed(4, 4),
        irr_excluding: data.zeroed(4, 4),
    };

    asm::long_mode_apic_program(d.gdtr, long_mode_code(&d)?, data.finish())
}

/// ICR low: fixed delivery, physical, edge, assert, with `shorthand`.
const fn icr(shorthand: u32, vector: u8) -> u32 {
    shorthand | apic::ICR_ASSERT | vector as u32
}

/// Take the pending IPI (`sti; hlt; cli`), then print ": took vector 0x.."
/// or ": NOT TAKEN", and clear the slot.
fn take_and_report(a: &mut CodeAssembler, d: &Data, routines: &Routines) -> Result<(), IcedError> {
    a.mov(dword_ptr(d.last_vector), 0)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    let mut taken = a.create_label();
    let mut done = a.create_label();
    a.cmp(dword_ptr(d.last_vector), 0)?;
    a.jne(taken)?;
    routines.print(a, d.not_taken)?;
    a.jmp(done)?;
    a.set_label(&mut taken)?;
    routines.print(a, d.took)?;
    a.mov(eax, dword_ptr(d.last_vector))?;
    routines.print_hex(a, 2)?;
    a.set_label(&mut done)?;
    routines.print(a, d.line_end)
}

fn long_mode_code(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let decimal = DecimalPrinter::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut unexpected = a.create_label();
    let mut common = a.create_label();
    let mut stubs = [
        (a.create_label(), VECTOR_SHORTHAND_SELF),
        (a.create_label(), VECTOR_OWN_ID),
        (a.create_label(), VECTOR_ALL_INCLUDING_SELF),
        (a.create_label(), VECTOR_ALL_EXCLUDING_SELF),
    ];

    asm::emit_load_flat_segments(&mut a)?;
    let gates = stubs.map(|(label, vector)| (vector, label));
    idt.emit_load(&mut a, d.idtr, Some(unexpected), gates)?;

    asm::emit_pic_mask_all(&mut a)?;
    apic::emit_software_enable(&mut a, 0xff)?;
    apic::lapic_read(&mut a, apic::ID)?;
    a.mov(dword_ptr(d.apic_id), eax)?;
    routines.print(&mut a, d.header)?;
    a.mov(eax, dword_ptr(d.apic_id))?;
    a.shr(eax, 24)?;
    routines.print_hex(&mut a, 2)?;
    routines.print(&mut a, d.header_end)?;

    // 1. Shorthand self.
    apic::lapic_write(
        &mut a,
        apic::ICR_LOW,
        icr(apic::ICR_SELF, VECTOR_SHORTHAND_SELF),
    )?;
    apic::lapic_read(&mut a, apic::ICR_LOW)?;
    a.mov(dword_ptr(d.icr_readback), eax)?;
    routines.print(&mut a, d.self_prefix)?;
    a.mov(eax, dword_ptr(d.icr_readback))?;
    routines.print_hex(&mut a, 8)?;
    take_and_report(&mut a, d, &routines)?;

    // 2. Destination = own APIC ID (ICR high first: writing ICR low sends).
    a.mov(eax, dword_ptr(d.apic_id))?;
    a.and(eax, 0xff00_0000u32 as i32)?;
    apic::lapic_write_eax(&mut a, apic::ICR_HIGH)?;
    apic::lapic_write(&mut a, apic::ICR_LOW, icr(0, VECTOR_OWN_ID))?;
    routines.print(&mut a, d.own_id_prefix)?;
    apic::lapic_read(&mut a, apic::ICR_HIGH)?;
    routines.print_hex(&mut a, 8)?;
    routines.print(&mut a, d.own_id_low)?;
    take_and_report(&mut a, d, &routines)?;

    // 3. All including self.
    apic::lapic_write(
        &mut a,
        apic::ICR_LOW,
        icr(apic::ICR_ALL_INCLUDING_SELF, VECTOR_ALL_INCLUDING_SELF),
    )?;
    routines.print(&mut a, d.all_including_prefix)?;
    take_and_report(&mut a, d, &routines)?;

    // 4. All excluding self: nobody else, so nothing arrives.
    let (irr_register, irr_bit) = apic::vector_register(apic::IRR, VECTOR_ALL_EXCLUDING_SELF);
    apic::lapic_write(
        &mut a,
        apic::ICR_LOW,
        icr(apic::ICR_ALL_EXCLUDING_SELF, VECTOR_ALL_EXCLUDING_SELF),
    )?;
    apic::lapic_read(&mut a, irr_register)?;
    a.and(eax, irr_bit)?;
    a.mov(dword_ptr(d.irr_excluding), eax)?;
    routines.print(&mut a, d.all_excluding_prefix)?;
    a.mov(eax, dword_ptr(d.irr_excluding))?;
    routines.print_hex(&mut a, 8)?;
    routines.print(&mut a, d.all_excluding_suffix)?;

    routines.print(&mut a, d.total_prefix)?;
    a.mov(eax, dword_ptr(d.taken))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.total_suffix)?;
    asm::emit_halt(&mut a)?;

    // Stubs: [rsp] vector, then the CPU's frame.
    for (label, vector) in stubs.iter_mut() {
        a.set_label(label)?;
        a.push(i32::from(*vector))?;
        a.jmp(common)?;
    }
    a.set_label(&mut common)?;
    a.push(rax)?;
    a.push(rdx)?;
    a.mov(rax, qword_ptr(rsp + 16))?;
    a.mov(dword_ptr(d.last_vector), eax)?;
    a.inc(dword_ptr(d.taken))?;
    apic::lapic_write(&mut a, apic::EOI, 0)?;
    a.pop(rdx)?;
    a.pop(rax)?;
    a.add(rsp, 8)?;
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
    fn icr_values() {
        assert_eq!(icr(apic::ICR_SELF, VECTOR_SHORTHAND_SELF), 0x0004_4040);
        assert_eq!(icr(0, VECTOR_OWN_ID), 0x0000_4041);
        assert_eq!(
            icr(apic::ICR_ALL_EXCLUDING_SELF, VECTOR_ALL_EXCLUDING_SELF),
            0x000c_4043
        );
    }
}
