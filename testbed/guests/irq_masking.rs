//! `irq-masking`: interrupts held back — by IF, by the task priority, by an
//! IOAPIC mask bit — stay pending and are taken once released; and a
//! spurious interrupt of the 8259A pair. 64-bit long mode. Every step is
//! made of the guest's own actions: no timer is involved, so the order of
//! events cannot depend on time.
//!
//! 1. **IF.** With interrupts disabled the guest sends itself vector 0x50
//!    (ICR shorthand "self"). The local APIC's IRR shows it pending; it is
//!    not taken. `sti; hlt; cli` takes it.
//! 2. **TPR.** With TPR = 0x60 (priority class 6) the guest enables
//!    interrupts and sends 0x50 again (class 5): PPR reads 0x60, IRR holds
//!    the vector, ISR does not, and no interrupt arrives although IF is set
//!    and the IPI made the VMM look. Then, interrupts disabled again, TPR
//!    = 0 and `sti; hlt; cli` takes it.
//! 3. **IOAPIC mask.** A level-triggered source that needs no time: COM1's
//!    THRE interrupt (IER 0x02 with MCR.OUT2) on ISA IRQ4, IOAPIC pin 4
//!    programmed level-triggered to vector 0x54 but masked. With the line
//!    high and interrupts enabled nothing is delivered (IRR clear, remote
//!    IRR clear). Unmasking the entry (interrupts disabled) delivers it at
//!    once, as the IOAPIC does for a level line that is still asserted; the
//!    handler reads IIR (the line drops) and writes the EOI.
//! 4. **Spurious IRQ 15.** The PICs are initialised as Linux does (vectors
//!    0x20 / 0x28) with only the cascade (master IR2) and IRQ12 (slave IR4)
//!    unmasked. The i8042's command 0xD3 puts a byte in its output buffer
//!    as if the (absent) mouse had sent it; with the command byte's aux
//!    interrupt enabled that raises IRQ12 at once. The slave requests, its
//!    INTR raises the master's IR2, whose edge the master latches. With
//!    interrupts still disabled the guest reads the slave's IRR (IRQ12
//!    pending) and then masks IRQ12 at the slave: the slave's request is
//!    gone, the master's latched IR2 request is not. On `sti` the CPU runs
//!    the INTA cycle (LINT0 is in ExtINT mode): the master grants IR2, the
//!    slave has nothing to give and answers its lowest-priority vector,
//!    0x2f, "IRQ 15" — the spurious slave interrupt of the 8259A data
//!    sheet, the one Linux counts in `spurious_irq_mask`. The handler
//!    finds nothing in service on the slave and IR2 in service on the
//!    master, and so sends the EOI to the master only (specific EOI 0x62),
//!    as Linux does. The guest then reads the i8042 byte back (IRQ12
//!    drops) and masks both PICs.
//!
//! **The local APIC's spurious vector.** The guest programs SVR = 0x1ff
//! (vector 0xff, APIC enabled) and prints it. The local APIC delivers its
//! spurious vector when the interrupt it signalled is no longer
//! deliverable at the INTA cycle (TPR raised in between). In duet the VMM
//! checks and acknowledges in one step with the vCPU stopped, so no guest
//! can land an instruction between the two: that path cannot be reached
//! deterministically from a guest. It is covered by the LAPIC model's
//! unit test `spurious_vector_when_tpr_rises_before_inta`
//! (devices/src/lapic.rs).
//!
//! Every handler writes exactly one EOI: the local APIC's for 0x50 and
//! 0x54, the master PIC's for the spurious 0x2f (the local APIC has
//! nothing in service for an ExtINT interrupt).
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

use super::asm::{self, apic, map, pic, uart, DataBlock, GuestProgram, IdtBuilder, Routines};
use super::GuestImage;
use crate::layout::ports;

pub const NAME: &str = "irq-masking";
pub const DESCRIPTION: &str =
    "64-bit long mode: interrupts held by IF, TPR and an IOAPIC mask, taken when released; a spurious PIC IRQ 15";

pub const VECTOR_IPI: u8 = 0x50;
pub const VECTOR_LEVEL: u8 = 0x54;
/// The slave PIC's IR7 after ICW2 0x28.
pub const VECTOR_SPURIOUS_SLAVE: u8 = pic::SLAVE_VECTOR | 7;
/// TPR that holds class-5 vectors.
const TPR_HOLD: u32 = 0x60;
/// SVR: enabled, spurious vector 0xff.
const SVR: u32 = apic::SVR_ENABLE | 0xff;
/// IOAPIC pin of ISA IRQ4 (COM1).
const PIN_COM1: u8 = 4;
/// i8042 ports and commands.
const I8042_DATA: u8 = 0x60;
const I8042_COMMAND: u8 = 0x64;
const I8042_WRITE_COMMAND_BYTE: u8 = 0x60;
const I8042_WRITE_AUX_OUTPUT: u8 = 0xd3;
/// Command byte: aux interrupt, system flag, translation (no keyboard
/// interrupt).
const I8042_COMMAND_BYTE: u8 = 0x46;
const AUX_BYTE: u8 = 0x5a;
/// IRQ12 on the slave PIC: IR4.
const SLAVE_IRQ12: u8 = 1 << 4;

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("irq-masking guest assembles")
}

/// Data addresses: strings (`s_*`) and slots the guest fills.
struct Data {
    gdtr: u32,
    idtr: u32,
    s_header: u32,
    s_header_end: u32,
    s_if_prefix: u32,
    s_taken: u32,
    s_time: u32,
    s_times: u32,
    s_if_after: u32,
    s_tpr_prefix: u32,
    s_irr: u32,
    s_isr: u32,
    s_tpr_after: u32,
    s_level_prefix: u32,
    s_entry: u32,
    s_level_after: u32,
    s_level_iir: u32,
    s_spurious_prefix: u32,
    s_spurious_middle: u32,
    s_slave_isr: u32,
    s_master_isr: u32,
    s_spurious_end: u32,
    s_not_taken: u32,
    s_line_end: u32,
    s_unexpected: u32,
    svr: u32,
    ipi_count: u32,
    level_count: u32,
    spurious_count: u32,
    irr_if: u32,
    taken_if: u32,
    ppr_tpr: u32,
    irr_tpr: u32,
    isr_tpr: u32,
    taken_tpr: u32,
    irr_masked: u32,
    entry_masked: u32,
    level_iir: u32,
    slave_irr: u32,
    spurious_vector: u32,
    slave_isr: u32,
    master_isr: u32,
    master_isr_after: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let d = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        s_header: data.cstr("irq-masking: in 64-bit long mode: local APIC SVR 0x"),
        s_header_end: data.cstr(" (spurious vector 0xff, software enabled)\r\n"),
        s_if_prefix: data.cstr(&format!(
            "irq-masking: IF=0: self-IPI {VECTOR_IPI:#04x} pending (IRR 0x"
        )),
        s_taken: data.cstr("), taken "),
        s_time: data.cstr(" time"),
        s_times: data.cstr(" times"),
        s_if_after: data.cstr("; after sti: taken "),
        s_tpr_prefix: data.cstr(&format!(
            "irq-masking: TPR {TPR_HOLD:#04x}, IF=1: self-IPI {VECTOR_IPI:#04x} held (PPR 0x"
        )),
        s_irr: data.cstr(", IRR 0x"),
        s_isr: data.cstr(", ISR 0x"),
        s_tpr_after: data.cstr("; TPR 0: taken "),
        s_level_prefix: data.cstr(&format!(
            "irq-masking: IOAPIC pin {PIN_COM1} level (COM1 THRE) masked while asserted, IF=1: nothing delivered (IRR 0x"
        )),
        s_entry: data.cstr(", entry 0x"),
        s_level_after: data.cstr("); unmasked: taken "),
        s_level_iir: data.cstr(&format!(" (vector {VECTOR_LEVEL:#04x}), IIR 0x")),
        s_spurious_prefix: data.cstr("irq-masking: spurious IRQ 15: slave IRR 0x"),
        s_spurious_middle: data.cstr(" (IRQ12 from the i8042), IRQ12 masked before INTA: vector 0x"),
        s_slave_isr: data.cstr(", slave ISR 0x"),
        s_master_isr: data.cstr(", master ISR 0x"),
        s_spurious_end: data.cstr("; EOI to the master only, master ISR now 0x"),
        s_not_taken: data.cstr("none taken"),
        s_line_end: data.cstr("\r\n"),
        s_unexpected: data.cstr("irq-masking: unexpected interrupt or exception, stopping\r\n"),
        svr: data.zeroed(4, 4),
        ipi_count: data.zeroed(4, 4),
        level_count: data.zeroed(4, 4),
        spurious_count: data.zeroed(4, 4),
        irr_if: data.zeroed(4, 4),
        taken_if: data.zeroed(4, 4),
        ppr_tpr: data.zeroed(4, 4),
        irr_tpr: data.zeroed(4, 4),
        isr_tpr: data.zeroed(4, 4),
        taken_tpr: data.zeroed(4, 4),
        irr_masked: data.zeroed(4, 4),
        entry_masked: data.zeroed(4, 4),
        level_iir: data.zeroed(4, 4),
        slave_irr: data.zeroed(4, 4),
        spurious_vector: data.zeroed(4, 4),
        slave_isr: data.zeroed(4, 4),
        master_isr: data.zeroed(4, 4),
        master_isr_after: data.zeroed(4, 4),
    };

    asm::long_mode_apic_program(d.gdtr, long_mode_code(&d)?, data.finish())
}

/// Store EAX in `slot`.
fn save(a: &mut CodeAssembler, slot: u32) -> Result<(), IcedError> {
    a.mov(dword_ptr(slot), eax)
}

/// Print `prefix`, then the slot in hex with `digits` digits.
fn print_slot(
    a: &mut CodeAssembler,
    routines: &Routines,
    prefix: u32,
    slot: u32,
    digits: u32,
) -> Result<(), IcedError> {
    routines.print(a, prefix)?;
    a.mov(eax, dword_ptr(slot))?;
    routines.print_hex(a, digits)
}

/// Print `prefix`, then "N time(s)" for the count in `slot` (0-9).
fn print_times(
    a: &mut CodeAssembler,
    d: &Data,
    routines: &Routines,
    prefix: u32,
    slot: u32,
) -> Result<(), IcedError> {
    routines.print(a, prefix)?;
    a.mov(eax, dword_ptr(slot))?;
    a.add(eax, i32::from(b'0'))?;
    a.call(routines.putc)?;
    let mut plural = a.create_label();
    let mut done = a.create_label();
    a.cmp(dword_ptr(slot), 1)?;
    a.jne(plural)?;
    routines.print(a, d.s_time)?;
    a.jmp(done)?;
    a.set_label(&mut plural)?;
    routines.print(a, d.s_times)?;
    a.set_label(&mut done)?;
    Ok(())
}

/// Write `value` to COM1 register `offset`. Clobbers AL, DX.
fn uart_write(a: &mut CodeAssembler, offset: u16, value: u8) -> Result<(), IcedError> {
    a.mov(dx, u32::from(ports::COM1 + offset))?;
    a.mov(al, i32::from(value))?;
    a.out(dx, al)
}

fn long_mode_code(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut unexpected = a.create_label();
    let mut ipi_handler = a.create_label();
    let mut level_handler = a.create_label();
    let mut spurious_handler = a.create_label();
    let (irr_ipi, irr_ipi_bit) = apic::vector_register(apic::IRR, VECTOR_IPI);
    let (isr_ipi, isr_ipi_bit) = apic::vector_register(apic::ISR, VECTOR_IPI);
    let (irr_level, irr_level_bit) = apic::vector_register(apic::IRR, VECTOR_LEVEL);
    let entry = apic::redirection(PIN_COM1);
    let self_ipi = apic::ICR_SELF | apic::ICR_ASSERT | u32::from(VECTOR_IPI);

    asm::emit_load_flat_segments(&mut a)?;
    idt.emit_load(
        &mut a,
        d.idtr,
        Some(unexpected),
        [
            (VECTOR_IPI, ipi_handler),
            (VECTOR_LEVEL, level_handler),
            (VECTOR_SPURIOUS_SLAVE, spurious_handler),
        ],
    )?;

    asm::emit_pic_mask_all(&mut a)?;
    apic::lapic_write(&mut a, apic::SVR, SVR)?;
    apic::lapic_read(&mut a, apic::SVR)?;
    save(&mut a, d.svr)?;
    print_slot(&mut a, &routines, d.s_header, d.svr, 8)?;
    routines.print(&mut a, d.s_header_end)?;

    // 1. IF: the IPI waits in IRR until sti.
    apic::lapic_write(&mut a, apic::ICR_LOW, self_ipi)?;
    apic::lapic_read(&mut a, irr_ipi)?;
    a.and(eax, irr_ipi_bit)?;
    save(&mut a, d.irr_if)?;
    a.mov(eax, dword_ptr(d.ipi_count))?;
    save(&mut a, d.taken_if)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    print_slot(&mut a, &routines, d.s_if_prefix, d.irr_if, 8)?;
    print_times(&mut a, d, &routines, d.s_taken, d.taken_if)?;
    print_times(&mut a, d, &routines, d.s_if_after, d.ipi_count)?;
    routines.print(&mut a, d.s_line_end)?;

    // 2. TPR: held with IF set, taken once TPR drops.
    a.mov(dword_ptr(d.ipi_count), 0)?;
    apic::lapic_write(&mut a, apic::TPR, TPR_HOLD)?;
    a.sti()?;
    apic::lapic_write(&mut a, apic::ICR_LOW, self_ipi)?;
    apic::lapic_read(&mut a, apic::PPR)?;
    save(&mut a, d.ppr_tpr)?;
    apic::lapic_read(&mut a, irr_ipi)?;
    a.and(eax, irr_ipi_bit)?;
    save(&mut a, d.irr_tpr)?;
    apic::lapic_read(&mut a, isr_ipi)?;
    a.and(eax, isr_ipi_bit)?;
    save(&mut a, d.isr_tpr)?;
    a.cli()?;
    a.mov(eax, dword_ptr(d.ipi_count))?;
    save(&mut a, d.taken_tpr)?;
    apic::lapic_write(&mut a, apic::TPR, 0)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    print_slot(&mut a, &routines, d.s_tpr_prefix, d.ppr_tpr, 8)?;
    print_slot(&mut a, &routines, d.s_irr, d.irr_tpr, 8)?;
    print_slot(&mut a, &routines, d.s_isr, d.isr_tpr, 8)?;
    print_times(&mut a, d, &routines, d.s_taken, d.taken_tpr)?;
    print_times(&mut a, d, &routines, d.s_tpr_after, d.ipi_count)?;
    routines.print(&mut a, d.s_line_end)?;

    // 3. IOAPIC mask: a level line held back, delivered on unmask.
    apic::ioapic_write(&mut a, entry + 1, 0)?;
    apic::ioapic_write(
        &mut a,
        entry,
        apic::RTE_MASKED | apic::RTE_LEVEL | u32::from(VECTOR_LEVEL),
    )?;
    uart_write(&mut a, uart::IER_OR_DLM, 0)?;
    uart_write(&mut a, uart::MCR, 0x0b)?;
    uart_write(&mut a, uart::IER_OR_DLM, 0x02)?;
    a.sti()?;
    apic::lapic_read(&mut a, irr_level)?;
    a.and(eax, irr_level_bit)?;
    save(&mut a, d.irr_masked)?;
    apic::ioapic_read(&mut a, entry)?;
    save(&mut a, d.entry_masked)?;
    a.cli()?;
    apic::ioapic_write(&mut a, entry, apic::RTE_LEVEL | u32::from(VECTOR_LEVEL))?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    uart_write(&mut a, uart::IER_OR_DLM, 0)?;
    uart_write(&mut a, uart::MCR, uart::MCR_DTR_RTS as u8)?;
    apic::ioapic_write(
        &mut a,
        entry,
        apic::RTE_MASKED | apic::RTE_LEVEL | u32::from(VECTOR_LEVEL),
    )?;
    print_slot(&mut a, &routines, d.s_level_prefix, d.irr_masked, 8)?;
    print_slot(&mut a, &routines, d.s_entry, d.entry_masked, 8)?;
    print_times(&mut a, d, &routines, d.s_level_after, d.level_count)?;
    print_slot(&mut a, &routines, d.s_level_iir, d.level_iir, 2)?;
    routines.print(&mut a, d.s_line_end)?;

    // 4. Spurious IRQ 15 through the PIC pair.
    asm::emit_pic_init(&mut a, pic::MASTER_VECTOR, pic::SLAVE_VECTOR)?;
    asm::emit_outb(&mut a, pic::MASTER_DATA, !pic::ICW3_MASTER)?;
    asm::emit_outb(&mut a, pic::SLAVE_DATA, !SLAVE_IRQ12)?;
    asm::emit_outb(&mut a, I8042_COMMAND, I8042_WRITE_COMMAND_BYTE)?;
    asm::emit_outb(&mut a, I8042_DATA, I8042_COMMAND_BYTE)?;
    asm::emit_outb(&mut a, I8042_COMMAND, I8042_WRITE_AUX_OUTPUT)?;
    asm::emit_outb(&mut a, I8042_DATA, AUX_BYTE)?;
    asm::emit_outb(&mut a, pic::SLAVE_COMMAND, pic::READ_IRR)?;
    asm::emit_inb(&mut a, pic::SLAVE_COMMAND)?;
    a.movzx(eax, al)?;
    save(&mut a, d.slave_irr)?;
    asm::emit_outb(&mut a, pic::SLAVE_DATA, 0xff)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    asm::emit_outb(&mut a, pic::MASTER_COMMAND, pic::READ_ISR)?;
    asm::emit_inb(&mut a, pic::MASTER_COMMAND)?;
    a.movzx(eax, al)?;
    save(&mut a, d.master_isr_after)?;
    asm::emit_inb(&mut a, I8042_DATA)?;
    asm::emit_outb(&mut a, pic::MASTER_DATA, 0xff)?;
    apic::lapic_write(&mut a, apic::SVR, 0xff)?;
    print_slot(&mut a, &routines, d.s_spurious_prefix, d.slave_irr, 2)?;
    routines.print(&mut a, d.s_spurious_middle)?;
    let mut no_spurious = a.create_label();
    let mut spurious_printed = a.create_label();
    a.cmp(dword_ptr(d.spurious_count), 1)?;
    a.jne(no_spurious)?;
    a.mov(eax, dword_ptr(d.spurious_vector))?;
    routines.print_hex(&mut a, 2)?;
    print_slot(&mut a, &routines, d.s_slave_isr, d.slave_isr, 2)?;
    print_slot(&mut a, &routines, d.s_master_isr, d.master_isr, 2)?;
    a.jmp(spurious_printed)?;
    a.set_label(&mut no_spurious)?;
    routines.print(&mut a, d.s_not_taken)?;
    a.set_label(&mut spurious_printed)?;
    print_slot(&mut a, &routines, d.s_spurious_end, d.master_isr_after, 2)?;
    routines.print(&mut a, d.s_line_end)?;
    asm::emit_halt(&mut a)?;

    // Handlers. Each saves what it uses.
    a.set_label(&mut ipi_handler)?;
    a.push(rdx)?;
    a.inc(dword_ptr(d.ipi_count))?;
    apic::lapic_write(&mut a, apic::EOI, 0)?;
    a.pop(rdx)?;
    a.iretq()?;

    a.set_label(&mut level_handler)?;
    a.push(rax)?;
    a.push(rdx)?;
    a.inc(dword_ptr(d.level_count))?;
    a.mov(dx, u32::from(ports::COM1 + 2))?;
    a.in_(al, dx)?;
    a.movzx(eax, al)?;
    save(&mut a, d.level_iir)?;
    apic::lapic_write(&mut a, apic::EOI, 0)?;
    a.pop(rdx)?;
    a.pop(rax)?;
    a.iretq()?;

    a.set_label(&mut spurious_handler)?;
    a.push(rax)?;
    a.inc(dword_ptr(d.spurious_count))?;
    a.mov(
        dword_ptr(d.spurious_vector),
        u32::from(VECTOR_SPURIOUS_SLAVE),
    )?;
    asm::emit_outb(&mut a, pic::SLAVE_COMMAND, pic::READ_ISR)?;
    asm::emit_inb(&mut a, pic::SLAVE_COMMAND)?;
    a.movzx(eax, al)?;
    save(&mut a, d.slave_isr)?;
    asm::emit_outb(&mut a, pic::MASTER_COMMAND, pic::READ_ISR)?;
    asm::emit_inb(&mut a, pic::MASTER_COMMAND)?;
    a.movzx(eax, al)?;
    save(&mut a, d.master_isr)?;
    asm::emit_outb(
        &mut a,
        pic::MASTER_COMMAND,
        pic::SPECIFIC_EOI | pic::ICW3_SLAVE,
    )?;
    a.pop(rax)?;
    a.iretq()?;

    a.set_label(&mut unexpected)?;
    routines.print(&mut a, d.s_unexpected)?;
    asm::emit_halt(&mut a)?;

    idt.emit(&mut a)?;
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
    fn vectors_and_priorities() {
        assert_eq!(VECTOR_SPURIOUS_SLAVE, 0x2f);
        // TPR's class must be at least the IPI's class to hold it.
        assert!(TPR_HOLD >> 4 >= u32::from(VECTOR_IPI >> 4));
        assert_eq!(
            apic::vector_register(apic::IRR, VECTOR_IPI),
            (0x220, 1 << 16)
        );
        assert_eq!(
            apic::vector_register(apic::IRR, VECTOR_LEVEL),
            (0x220, 1 << 20)
        );
        // The specific EOI for the cascade level.
        assert_eq!(pic::SPECIFIC_EOI | pic::ICW3_SLAVE, 0x62);
    }
}
