//! `serial-echo`: serial *receive* interrupts, in 64-bit long mode. This
//! guest needs input: it waits for [`BYTES`] bytes on COM1 and never stops
//! without them (see [`super::BuiltinGuest::needs_input`]).
//!
//! COM1 is programmed 8N1 at 115200 baud with its FIFOs on and the
//! receive trigger level at 1 byte (FCR = 0x07), IER = "received data
//! available" only (so the guest's own prints raise nothing) and MCR.OUT2
//! set (PC serial cards gate the UART's interrupt pin with it). ISA IRQ4
//! goes through IOAPIC pin 4, programmed edge-triggered, active high,
//! fixed, physical destination 0, vector [`VECTOR`]; the PICs are masked
//! and the local APIC is software-enabled.
//!
//! The guest prints [`PROMPT`] and waits with `sti; hlt; cli` until
//! [`BYTES`] bytes have arrived. The handler reads RBR while LSR.DR is set
//! (the FIFO drained, the UART's line drops, so the next byte makes a new
//! edge), stores up to [`BYTES`] bytes (any more are read and dropped), and
//! writes the local APIC's EOI register once. A byte arriving after the
//! handler's last LSR read raises the line again: the IOAPIC sends a new
//! interrupt, which the local APIC holds in IRR until the EOI. How many
//! interrupts it takes depends on how the bytes arrive, so the guest does
//! not print that number.
//!
//! Then IER = 0, OUT2 off, pin 4 masked, the local APIC software-disabled;
//! the guest prints `serial-echo: received "<the bytes>"` and stops with
//! `cli; hlt`.
//!
//! Memory map (see [`super::asm`] for the shared one):
//!
//! ```text
//! 0x0000_0500  GDT                   0x0000_6000 .. 0x7000  stack
//! 0x0000_1000 .. 0x0000_6000  page tables, built by the 16-bit code
//! 0x0000_7c00  16-bit code (entry: CS=0, IP=0x7c00)
//! 0x0000_9000  64-bit code           0x0000_a000  data: GDTR, IDTR, strings, buffer
//! 0x0000_b000 .. 0x0000_c000  IDT, built by the 64-bit code
//! 0x0000_c000 .. 0x0000_d000  PD mapping the IOAPIC and local APIC pages
//! ```

use iced_x86::code_asm::*;

use super::asm::{self, apic, map, uart, DataBlock, GuestProgram, IdtBuilder, Routines};
use super::GuestImage;
use crate::layout::ports;

pub const NAME: &str = "serial-echo";
pub const DESCRIPTION: &str =
    "64-bit long mode: COM1 receive interrupts through IOAPIC pin 4; waits for 8 bytes of serial input and echoes them";

/// How many bytes the guest waits for.
pub const BYTES: u32 = 8;
/// IOAPIC pin of ISA IRQ4 (COM1).
pub const PIN: u8 = 4;
pub const VECTOR: u8 = 0x36;
/// The first line, printed once the guest is ready for input.
pub const PROMPT: &str = "serial-echo: ready, type 8 bytes\r\n";

/// IER: received data available interrupt only.
const IER_RDA: u8 = 0x01;
/// FCR: FIFO enable, clear both FIFOs, receive trigger level 1 byte.
const FCR_TRIGGER_1: u8 = 0x07;
/// MCR: DTR | RTS | OUT2.
const MCR_OUT2: u8 = 0x0b;
/// LSR: data ready.
const LSR_DR: i32 = 0x01;

/// Everything the guest writes to COM1 when it receives `input`.
pub fn expected_serial(input: &[u8]) -> String {
    format!(
        "{PROMPT}serial-echo: received \"{}\"\r\n",
        String::from_utf8_lossy(input)
    )
}

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("serial-echo guest assembles")
}

struct Data {
    gdtr: u32,
    idtr: u32,
    prompt: u32,
    received_prefix: u32,
    received_suffix: u32,
    unexpected: u32,
    /// Bytes received so far (stored ones only, at most [`BYTES`]).
    count: u32,
    buffer: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let d = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        prompt: data.cstr(PROMPT),
        received_prefix: data.cstr("serial-echo: received \""),
        received_suffix: data.cstr("\"\r\n"),
        unexpected: data.cstr("serial-echo: unexpected interrupt or exception, stopping\r\n"),
        count: data.zeroed(4, 4),
        buffer: data.zeroed(BYTES as usize, 8),
    };

    asm::long_mode_apic_program(d.gdtr, long_mode_code(&d)?, data.finish())
}

/// Write `value` to COM1 register `offset`. Clobbers AL, DX.
fn uart_write(a: &mut CodeAssembler, offset: u16, value: u8) -> Result<(), IcedError> {
    a.mov(dx, u32::from(ports::COM1 + offset))?;
    a.mov(al, i32::from(value))?;
    a.out(dx, al)
}

/// Read COM1 register `offset` into AL. Clobbers DX.
fn uart_read(a: &mut CodeAssembler, offset: u16) -> Result<(), IcedError> {
    a.mov(dx, u32::from(ports::COM1 + offset))?;
    a.in_(al, dx)
}

/// Program pin 4: edge, active high, fixed, physical destination 0.
fn route_pin(a: &mut CodeAssembler, masked: bool) -> Result<(), IcedError> {
    let entry = apic::redirection(PIN);
    apic::ioapic_write(a, entry + 1, 0)?;
    let mask = if masked { apic::RTE_MASKED } else { 0 };
    apic::ioapic_write(a, entry, mask | u32::from(VECTOR))
}

fn long_mode_code(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut unexpected = a.create_label();
    let mut rx_handler = a.create_label();

    asm::emit_load_flat_segments(&mut a)?;
    idt.emit_load(&mut a, d.idtr, Some(unexpected), [(VECTOR, rx_handler)])?;

    asm::emit_pic_mask_all(&mut a)?;
    apic::emit_software_enable(&mut a, 0xff)?;
    route_pin(&mut a, false)?;
    // 8N1 and the divisor are set by the 16-bit code; FIFOs on (emptied),
    // trigger level 1; receive interrupt only; OUT2.
    uart_write(&mut a, uart::FCR, FCR_TRIGGER_1)?;
    uart_write(&mut a, uart::IER_OR_DLM, IER_RDA)?;
    uart_write(&mut a, uart::MCR, MCR_OUT2)?;

    routines.print(&mut a, d.prompt)?;

    let mut wait = a.create_label();
    a.set_label(&mut wait)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.cmp(dword_ptr(d.count), BYTES)?;
    a.jb(wait)?;

    // Quiet everything, then report.
    uart_write(&mut a, uart::IER_OR_DLM, 0)?;
    uart_write(&mut a, uart::MCR, uart::MCR_DTR_RTS as u8)?;
    route_pin(&mut a, true)?;
    apic::lapic_write(&mut a, apic::SVR, 0xff)?;

    routines.print(&mut a, d.received_prefix)?;
    let mut echo = a.create_label();
    a.xor(ebx, ebx)?;
    a.set_label(&mut echo)?;
    a.mov(al, byte_ptr(rbx + d.buffer as i32))?;
    a.call(routines.putc)?;
    a.inc(ebx)?;
    a.cmp(ebx, BYTES)?;
    a.jb(echo)?;
    routines.print(&mut a, d.received_suffix)?;
    asm::emit_halt(&mut a)?;

    // Receive: drain the FIFO while LSR.DR, keep the first BYTES bytes,
    // EOI once.
    const SAVED: [AsmRegister64; 3] = [rax, rcx, rdx];
    let mut drain = a.create_label();
    let mut drop_byte = a.create_label();
    let mut drained = a.create_label();
    a.set_label(&mut rx_handler)?;
    for r in SAVED {
        a.push(r)?;
    }
    a.set_label(&mut drain)?;
    uart_read(&mut a, uart::LSR)?;
    a.test(al, LSR_DR)?;
    a.jz(drained)?;
    uart_read(&mut a, uart::THR_OR_DLL)?;
    a.mov(ecx, dword_ptr(d.count))?;
    a.cmp(ecx, BYTES)?;
    a.jae(drop_byte)?;
    a.mov(byte_ptr(rcx + d.buffer as i32), al)?;
    a.inc(dword_ptr(d.count))?;
    a.set_label(&mut drop_byte)?;
    a.jmp(drain)?;
    a.set_label(&mut drained)?;
    apic::lapic_write(&mut a, apic::EOI, 0)?;
    for r in SAVED.iter().rev() {
        a.pop(*r)?;
    }
    a.iretq()?;

    a.set_label(&mut unexpected)?;
    routines.print(&mut a, d.unexpected)?;
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
    fn golden_matches_expected_output() {
        assert_eq!(
            include_str!("../../golden/serial-echo.serial.txt"),
            expected_serial(b"duet-rx!")
        );
    }

    #[test]
    fn prompt_names_the_byte_count() {
        assert!(PROMPT.contains(&format!("type {BYTES} bytes")));
    }
}
