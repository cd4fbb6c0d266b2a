//! `irq-pit-pic`: the PC's oldest interrupt path, PIT → 8259A → CPU, in
//! 64-bit long mode.
//!
//! With interrupts disabled the guest programs PIT channel 0 as a rate
//! generator (mode 2) with divisor 1193 (1000 Hz), initialises both PICs as
//! Linux's `init_8259A` does (ICW1-ICW4; vectors 0x20 and 0x28, slave on
//! IR2), selects ISR for command-port reads (OCW3) and unmasks IRQ0 alone.
//! The local APIC is left as firmware leaves it: LINT0 in ExtINT mode
//! ("virtual wire"), so the master's INTR reaches the CPU and the vector
//! comes from the PIC's INTA cycle.
//!
//! It then waits for exactly [`INTERRUPTS`] interrupts with
//! `sti; hlt; cmp [count], N; jb`. The handler (only vector 0x20 has one;
//! every other vector stops the guest) reads the master's ISR, which must
//! show IRQ0 in service, and sends a non-specific EOI (`out 0x20, 0x20`).
//! The last one first masks every line and returns with IF clear (it
//! edits the saved RFLAGS), so no later tick can add an interrupt: the
//! guest's device accesses are the same however late or early the ticks
//! come. Afterwards ISR must read 0 and IMR 0xff.
//!
//! Memory map (see [`super::asm`] for the shared one):
//!
//! ```text
//! 0x0000_0500  GDT                   0x0000_6000 .. 0x7000  stack
//! 0x0000_1000 .. 0x0000_6000  page tables, built by the 16-bit code
//! 0x0000_7c00  16-bit code (entry: CS=0, IP=0x7c00)
//! 0x0000_9000  64-bit code           0x0000_a000  data: GDTR, IDTR, strings, counters
//! 0x0000_b000 .. 0x0000_c000  IDT, built by the 64-bit code
//! ```

use iced_x86::code_asm::*;

use super::asm::{
    self, map, pic, pit, DataBlock, DecimalPrinter, GuestProgram, IdtBuilder, Routines,
};
use super::GuestImage;

pub const NAME: &str = "irq-pit-pic";
pub const DESCRIPTION: &str =
    "64-bit long mode: 10 PIT interrupts at 1000 Hz through the 8259A PIC (vector 0x20), EOI each";

/// Interrupts the guest waits for.
pub const INTERRUPTS: u32 = 10;
/// IRQ0's vector after the guest's ICW2.
pub const VECTOR: u8 = pic::MASTER_VECTOR;

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("irq-pit-pic guest assembles")
}

struct Data {
    gdtr: u32,
    idtr: u32,
    header: u32,
    count_prefix: u32,
    count_suffix: u32,
    isr_prefix: u32,
    isr_varied: u32,
    after_prefix: u32,
    imr_prefix: u32,
    line_end: u32,
    unexpected: u32,
    count: u32,
    /// AND and OR of the ISR values read in the handlers.
    isr_and: u32,
    isr_or: u32,
    isr_after: u32,
    imr_after: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let addresses = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        header: data.cstr(&format!(
            "irq-pit-pic: in 64-bit long mode: PIC vectors {:#04x}/{:#04x}, PIT channel 0 mode 2 \
             divisor {} (1000 Hz), IRQ0 unmasked\r\n",
            pic::MASTER_VECTOR,
            pic::SLAVE_VECTOR,
            pit::DIVISOR_1KHZ
        )),
        count_prefix: data.cstr("irq-pit-pic: "),
        count_suffix: data.cstr(&format!(
            " timer interrupts through the PIC (vector {VECTOR:#04x})\r\n"
        )),
        isr_prefix: data.cstr("irq-pit-pic: PIC ISR in every handler 0x"),
        isr_varied: data.cstr("irq-pit-pic: PIC ISR not the same in every handler, AND 0x"),
        after_prefix: data.cstr(", after the last EOI 0x"),
        imr_prefix: data.cstr("; IMR 0x"),
        line_end: data.cstr("\r\n"),
        unexpected: data.cstr("irq-pit-pic: unexpected interrupt or exception, stopping\r\n"),
        count: data.zeroed(4, 4),
        isr_and: data.bytes(&[0xff], 1),
        isr_or: data.zeroed(1, 1),
        isr_after: data.zeroed(1, 1),
        imr_after: data.zeroed(1, 1),
    };

    let code16 = asm::long_mode_entry(addresses.gdtr, false)?;

    let code64 = long_mode_code(&addresses)?;

    Ok(GuestProgram {
        code: vec![code16, code64],
        data: vec![asm::gdt_blob(), data.finish()],
        work_areas: vec![
            (map::PML4, map::PAGE_TABLES_END, "page tables"),
            (map::STACK_BOTTOM, map::STACK_TOP, "stack"),
            (map::IDT, map::IDT_END, "IDT"),
        ],
        entry: asm::real_mode_entry(),
    })
}

fn long_mode_code(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let decimal = DecimalPrinter::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut unexpected = a.create_label();
    let mut timer_handler = a.create_label();

    asm::emit_load_flat_segments(&mut a)?;
    routines.print(&mut a, d.header)?;
    idt.emit_load(&mut a, d.idtr, Some(unexpected), [(VECTOR, timer_handler)])?;

    // The PIT first: its control word may move OUT (IRQ0); the PICs'
    // ICW1 then forgets any edge latched so far.
    asm::emit_pit_rate_generator(&mut a, pit::DIVISOR_1KHZ)?;
    asm::emit_pic_init(&mut a, pic::MASTER_VECTOR, pic::SLAVE_VECTOR)?;
    asm::emit_outb(&mut a, pic::MASTER_COMMAND, pic::READ_ISR)?;
    asm::emit_outb(&mut a, pic::MASTER_DATA, 0xfe)?;

    let mut wait = a.create_label();
    a.set_label(&mut wait)?;
    a.sti()?;
    a.hlt()?;
    a.cmp(dword_ptr(d.count), INTERRUPTS)?;
    a.jb(wait)?;
    a.cli()?;

    asm::emit_inb(&mut a, pic::MASTER_COMMAND)?;
    a.mov(byte_ptr(d.isr_after), al)?;
    asm::emit_inb(&mut a, pic::MASTER_DATA)?;
    a.mov(byte_ptr(d.imr_after), al)?;

    routines.print(&mut a, d.count_prefix)?;
    a.mov(eax, dword_ptr(d.count))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.count_suffix)?;

    let mut isr_same = a.create_label();
    let mut isr_done = a.create_label();
    a.mov(al, byte_ptr(d.isr_and))?;
    a.cmp(al, byte_ptr(d.isr_or))?;
    a.je(isr_same)?;
    routines.print(&mut a, d.isr_varied)?;
    a.jmp(isr_done)?;
    a.set_label(&mut isr_same)?;
    routines.print(&mut a, d.isr_prefix)?;
    a.set_label(&mut isr_done)?;
    a.movzx(eax, byte_ptr(d.isr_and))?;
    routines.print_hex(&mut a, 2)?;
    routines.print(&mut a, d.after_prefix)?;
    a.movzx(eax, byte_ptr(d.isr_after))?;
    routines.print_hex(&mut a, 2)?;
    routines.print(&mut a, d.imr_prefix)?;
    a.movzx(eax, byte_ptr(d.imr_after))?;
    routines.print_hex(&mut a, 2)?;
    routines.print(&mut a, d.line_end)?;
    asm::emit_halt(&mut a)?;

    // IRQ0. [rsp] saved RAX, then the CPU's RIP, CS, RFLAGS, RSP, SS.
    let mut eoi = a.create_label();
    a.set_label(&mut timer_handler)?;
    a.push(rax)?;
    a.inc(dword_ptr(d.count))?;
    asm::emit_inb(&mut a, pic::MASTER_COMMAND)?;
    a.and(byte_ptr(d.isr_and), al)?;
    a.or(byte_ptr(d.isr_or), al)?;
    a.cmp(dword_ptr(d.count), INTERRUPTS)?;
    a.jb(eoi)?;
    asm::emit_outb(&mut a, pic::MASTER_DATA, 0xff)?;
    asm::emit_return_with_interrupts_disabled(&mut a, 8)?;
    a.set_label(&mut eoi)?;
    asm::emit_outb(&mut a, pic::MASTER_COMMAND, pic::EOI)?;
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
    fn waits_with_hlt_and_sends_one_eoi_per_interrupt() {
        use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind};
        let program = program();
        let code = program.code.iter().find(|c| c.bitness == 64).unwrap();
        let insns: Vec<_> = Decoder::with_ip(64, &code.bytes, code.addr, DecoderOptions::NONE)
            .into_iter()
            .collect();
        // `sti` directly followed by `hlt`: an interrupt pending at `sti`
        // is taken after the `hlt`, never before it.
        assert!(insns
            .windows(2)
            .any(|w| w[0].mnemonic() == Mnemonic::Sti && w[1].mnemonic() == Mnemonic::Hlt));
        // Exactly one `out 0x20, al` (the EOI) in the handler.
        let eoi_outs = insns
            .iter()
            .filter(|i| {
                i.mnemonic() == Mnemonic::Out
                    && i.op0_kind() == OpKind::Immediate8
                    && i.immediate8() == pic::MASTER_COMMAND
            })
            .count();
        // The EOI and the PIC's ICW1 and OCW3.
        assert_eq!(eoi_outs, 3);
    }
}
