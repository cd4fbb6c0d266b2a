//! `lapic-timer`: the local APIC timer in one-shot and periodic mode, in
//! 64-bit long mode.
//!
//! The guest masks the PICs, software-enables the local APIC (SVR 0x1ff)
//! and sets the timer's divide configuration to 0x3 (divide by 16; read
//! back). The timer input is 1 GHz before the divider, so an initial count
//! of 6250 is 100 µs.
//!
//! - **One-shot** (LVT timer vector 0x31, mode 0): [`INTERRUPTS`] times,
//!   the guest writes the initial count with interrupts disabled and
//!   waits for the interrupt with `sti; hlt` (a one-shot fires once, so
//!   exactly one interrupt answers each arming). Right after the first
//!   arming it reads the current-count register once: that value depends
//!   on elapsed time (the trace marks it), so it is never printed and only
//!   checked to lie in 0..=6250 (an answer that does not change the
//!   guest's device accesses).
//! - **Periodic** (vector 0x32, LVT bit 17): one write of the initial
//!   count, then [`INTERRUPTS`] interrupts counted by the handler. The last
//!   handler masks the LVT entry, writes initial count 0 (stopping the
//!   timer) and returns with IF clear (it edits the saved RFLAGS), so the
//!   device accesses do not depend on how fast the periods pass.
//!
//! Each handler writes the EOI register exactly once. At the end the guest
//! software-disables the local APIC (an expiry that beat the mask, on a
//! host that stalled the guest for a whole period inside the last handler,
//! can then not be delivered either).
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

use super::asm::{self, apic, map, DataBlock, DecimalPrinter, GuestProgram, IdtBuilder, Routines};
use super::GuestImage;

pub const NAME: &str = "lapic-timer";
pub const DESCRIPTION: &str =
    "64-bit long mode: local APIC timer, divide by 16, 10 one-shot then 10 periodic interrupts";

/// Interrupts the guest waits for in each mode.
pub const INTERRUPTS: u32 = 10;
pub const VECTOR_ONE_SHOT: u8 = 0x31;
pub const VECTOR_PERIODIC: u8 = 0x32;
/// Divide configuration register value for divide by 16.
pub const DIVIDE_BY_16: u32 = 0x3;
/// 100 µs at 1 GHz / 16.
pub const INITIAL_COUNT: u32 = 6250;

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("lapic-timer guest assembles")
}

struct Data {
    gdtr: u32,
    idtr: u32,
    header: u32,
    header_end: u32,
    one_shot_prefix: u32,
    one_shot_suffix: u32,
    current_in_range: u32,
    current_out_of_range: u32,
    periodic_prefix: u32,
    periodic_suffix: u32,
    unexpected: u32,
    divide: u32,
    one_shot_count: u32,
    periodic_count: u32,
    /// 1 when the current count read back lay outside 0..=INITIAL_COUNT.
    current_bad: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let d = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        header: data.cstr(
            "lapic-timer: in 64-bit long mode: local APIC enabled, timer divide configuration 0x",
        ),
        header_end: data.cstr(&format!(
            " (divide by 16), initial count {INITIAL_COUNT} (100 us at 1 GHz / 16)\r\n"
        )),
        one_shot_prefix: data.cstr(&format!(
            "lapic-timer: one-shot (vector {VECTOR_ONE_SHOT:#04x}): "
        )),
        one_shot_suffix: data.cstr(" interrupts, one per arming\r\n"),
        current_in_range: data.cstr(&format!(
            "lapic-timer: current count read once while armed: within 0..={INITIAL_COUNT}\r\n"
        )),
        current_out_of_range: data.cstr(&format!(
            "lapic-timer: current count read once while armed: NOT within 0..={INITIAL_COUNT}\r\n"
        )),
        periodic_prefix: data.cstr(&format!(
            "lapic-timer: periodic (vector {VECTOR_PERIODIC:#04x}): "
        )),
        periodic_suffix: data.cstr(" interrupts from one arming, then masked and stopped\r\n"),
        unexpected: data.cstr("lapic-timer: unexpected interrupt or exception, stopping\r\n"),
        divide: data.zeroed(4, 4),
        one_shot_count: data.zeroed(4, 4),
        periodic_count: data.zeroed(4, 4),
        current_bad: data.zeroed(4, 4),
    };

    asm::long_mode_apic_program(d.gdtr, long_mode_code(&d)?, data.finish())
}

fn long_mode_code(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let decimal = DecimalPrinter::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut unexpected = a.create_label();
    let mut one_shot_handler = a.create_label();
    let mut periodic_handler = a.create_label();

    asm::emit_load_flat_segments(&mut a)?;
    idt.emit_load(
        &mut a,
        d.idtr,
        Some(unexpected),
        [
            (VECTOR_ONE_SHOT, one_shot_handler),
            (VECTOR_PERIODIC, periodic_handler),
        ],
    )?;

    asm::emit_pic_mask_all(&mut a)?;
    apic::emit_software_enable(&mut a, 0xff)?;
    apic::lapic_write(&mut a, apic::TIMER_DIVIDE, DIVIDE_BY_16)?;
    apic::lapic_read(&mut a, apic::TIMER_DIVIDE)?;
    a.mov(dword_ptr(d.divide), eax)?;
    routines.print(&mut a, d.header)?;
    a.mov(eax, dword_ptr(d.divide))?;
    routines.print_hex(&mut a, 8)?;
    routines.print(&mut a, d.header_end)?;

    // One-shot: arm, wait for its one interrupt, N times. EBX = the count
    // to wait for (handlers preserve it).
    apic::lapic_write(&mut a, apic::LVT_TIMER, u32::from(VECTOR_ONE_SHOT))?;
    let mut arm = a.create_label();
    let mut wait_one_shot = a.create_label();
    a.xor(ebx, ebx)?;
    a.set_label(&mut arm)?;
    a.inc(ebx)?;
    apic::lapic_write(&mut a, apic::TIMER_INITIAL, INITIAL_COUNT)?;
    a.cmp(ebx, 1)?;
    a.jne(wait_one_shot)?;
    // The one time-dependent read: checked, never printed.
    apic::lapic_read(&mut a, apic::TIMER_CURRENT)?;
    a.cmp(eax, INITIAL_COUNT)?;
    a.jbe(wait_one_shot)?;
    a.mov(dword_ptr(d.current_bad), 1)?;
    a.set_label(&mut wait_one_shot)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.cmp(dword_ptr(d.one_shot_count), ebx)?;
    a.jb(wait_one_shot)?;
    a.cmp(ebx, INTERRUPTS)?;
    a.jb(arm)?;

    routines.print(&mut a, d.one_shot_prefix)?;
    a.mov(eax, dword_ptr(d.one_shot_count))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.one_shot_suffix)?;
    let mut current_printed = a.create_label();
    let mut current_bad = a.create_label();
    a.cmp(dword_ptr(d.current_bad), 0)?;
    a.jne(current_bad)?;
    routines.print(&mut a, d.current_in_range)?;
    a.jmp(current_printed)?;
    a.set_label(&mut current_bad)?;
    routines.print(&mut a, d.current_out_of_range)?;
    a.set_label(&mut current_printed)?;

    // Periodic: one arming, N interrupts.
    apic::lapic_write(
        &mut a,
        apic::LVT_TIMER,
        apic::LVT_TIMER_PERIODIC | u32::from(VECTOR_PERIODIC),
    )?;
    apic::lapic_write(&mut a, apic::TIMER_INITIAL, INITIAL_COUNT)?;
    let mut wait_periodic = a.create_label();
    a.set_label(&mut wait_periodic)?;
    a.sti()?;
    a.hlt()?;
    a.cmp(dword_ptr(d.periodic_count), INTERRUPTS)?;
    a.jb(wait_periodic)?;
    a.cli()?;
    apic::lapic_write(&mut a, apic::SVR, 0xff)?;

    routines.print(&mut a, d.periodic_prefix)?;
    a.mov(eax, dword_ptr(d.periodic_count))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.periodic_suffix)?;
    asm::emit_halt(&mut a)?;

    // One-shot handler: count, EOI.
    a.set_label(&mut one_shot_handler)?;
    a.push(rdx)?;
    a.inc(dword_ptr(d.one_shot_count))?;
    apic::lapic_write(&mut a, apic::EOI, 0)?;
    a.pop(rdx)?;
    a.iretq()?;

    // Periodic handler: count; the last one masks and stops the timer and
    // returns with IF clear; EOI. [rsp] RDX, then the CPU's frame.
    let mut eoi = a.create_label();
    a.set_label(&mut periodic_handler)?;
    a.push(rdx)?;
    a.inc(dword_ptr(d.periodic_count))?;
    a.cmp(dword_ptr(d.periodic_count), INTERRUPTS)?;
    a.jb(eoi)?;
    apic::lapic_write(
        &mut a,
        apic::LVT_TIMER,
        apic::LVT_MASKED | apic::LVT_TIMER_PERIODIC | u32::from(VECTOR_PERIODIC),
    )?;
    apic::lapic_write(&mut a, apic::TIMER_INITIAL, 0)?;
    asm::emit_return_with_interrupts_disabled(&mut a, 8)?;
    a.set_label(&mut eoi)?;
    apic::lapic_write(&mut a, apic::EOI, 0)?;
    a.pop(rdx)?;
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
    fn initial_count_is_100_us() {
        const TIMER_HZ: u64 = 1_000_000_000;
        let ns = u64::from(INITIAL_COUNT) * 16 * 1_000_000_000 / TIMER_HZ;
        assert_eq!(ns, 100_000);
    }

    #[test]
    fn reads_the_current_count_exactly_once() {
        use iced_x86::{Decoder, DecoderOptions, Register};
        let program = program();
        let code = program.code.iter().find(|c| c.bitness == 64).unwrap();
        let reads = Decoder::with_ip(64, &code.bytes, code.addr, DecoderOptions::NONE)
            .into_iter()
            .filter(|i| {
                i.op_count() == 2
                    && i.op0_register() == Register::EAX
                    && i.memory_base() == Register::RDX
                    && i.memory_displacement64() == u64::from(apic::TIMER_CURRENT)
            })
            .count();
        assert_eq!(reads, 1);
    }
}
