//! `hpet`: the HPET from a 64-bit ring-0 guest (issue 16, item 3).
//!
//! 1. The capabilities register (vendor, legacy routing, 64-bit counter,
//!    three comparators, the period in femtoseconds) and a halted counter.
//! 2. Enabled, the counter moves between two reads.
//! 3. Timer 0 under legacy replacement, edge-triggered, drives IRQ0 (IOAPIC
//!    pin 2, vector 0x30): once as a one-shot, then three times periodic.
//! 4. Timer 2, level-triggered, routed to IOAPIC pin 11 (vector 0x31): the
//!    handler clears its status bit before the EOI; one interrupt.
//!
//! Only counts and fixed register values are printed, and only fixed
//! values written (each arming restarts the counter from 0): the same
//! output and device trace on every backend and clock.

use iced_x86::code_asm::*;

use super::asm::{self, apic, map, DataBlock, GuestProgram, IdtBuilder, Routines};
use super::GuestImage;

pub const NAME: &str = "hpet";
pub const DESCRIPTION: &str = "64-bit long mode: HPET capabilities, counter, timer 0 one-shot and periodic through legacy replacement (IRQ0), timer 2 level-triggered on IOAPIC pin 11";

const HPET: u32 = devices::hpet::DEFAULT_BASE as u32;
const VECTOR_TIMER0: u8 = 0x30;
const VECTOR_TIMER2: u8 = 0x31;
const VECTOR_SPURIOUS: u8 = 0xff;
/// 1 ms at 100 MHz.
const TICKS: i32 = 100_000;
/// Iterations of the delay loop between two counter reads (no device
/// accesses, so both backends make the same ones).
const DELAY_LOOPS: u32 = 100_000;
const PERIODIC_INTERRUPTS: u32 = 3;
const IOAPIC_PIN_IRQ0: u8 = 2;
const IOAPIC_PIN_TIMER2: u8 = 11;

/// Offset of timer `n`'s register `offset`.
fn timer_reg(n: u64, offset: u64) -> u64 {
    devices::hpet::TIMER_BASE + n * devices::hpet::TIMER_STRIDE + offset
}

/// EAX = the dword at HPET + `offset`. Clobbers RDX.
fn read32(a: &mut CodeAssembler, offset: u64) -> Result<(), IcedError> {
    a.mov(edx, HPET)?;
    a.mov(eax, dword_ptr(rdx + offset as i32))
}

/// RAX = the qword at HPET + `offset`. Clobbers RDX.
fn read64(a: &mut CodeAssembler, offset: u64) -> Result<(), IcedError> {
    a.mov(edx, HPET)?;
    a.mov(rax, qword_ptr(rdx + offset as i32))
}

/// The qword at HPET + `offset` = `value` (sign-extended 32 bits). Clobbers RDX.
fn write64(a: &mut CodeAssembler, offset: u64, value: i32) -> Result<(), IcedError> {
    a.mov(edx, HPET)?;
    a.mov(qword_ptr(rdx + offset as i32), value)
}

/// Everything the guest writes to COM1.
pub const EXPECTED_SERIAL: &str = "hpet: in 64-bit long mode\r\n\
hpet: capabilities 0x8086a201, period 0x00989680 fs, counter halted at 0x00000000\r\n\
hpet: enabled: the counter moves\r\n\
hpet: timer 0 one-shot on IRQ0 (legacy replacement): interrupts 0x1\r\n\
hpet: timer 0 periodic on IRQ0: interrupts 0x4\r\n\
hpet: timer 2 level-triggered on IOAPIC pin 11: interrupts 0x1, status after 0x0\r\n\
hpet: done\r\n";

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("hpet guest assembles")
}

struct Data {
    gdtr: u32,
    idtr: u32,
    header: u32,
    caps: u32,
    period: u32,
    halted: u32,
    moves: u32,
    stuck: u32,
    one_shot: u32,
    periodic: u32,
    level: u32,
    status_after: u32,
    done: u32,
    line_end: u32,
    unexpected: u32,
    timer0_count: u32,
    timer2_count: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let d = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        header: data.cstr("hpet: in 64-bit long mode\r\n"),
        caps: data.cstr("hpet: capabilities 0x"),
        period: data.cstr(", period 0x"),
        halted: data.cstr(" fs, counter halted at 0x"),
        moves: data.cstr("hpet: enabled: the counter moves\r\n"),
        stuck: data.cstr("hpet: enabled: the counter does NOT move\r\n"),
        one_shot: data.cstr("hpet: timer 0 one-shot on IRQ0 (legacy replacement): interrupts 0x"),
        periodic: data.cstr("hpet: timer 0 periodic on IRQ0: interrupts 0x"),
        level: data.cstr("hpet: timer 2 level-triggered on IOAPIC pin 11: interrupts 0x"),
        status_after: data.cstr(", status after 0x"),
        done: data.cstr("hpet: done\r\n"),
        line_end: data.cstr("\r\n"),
        unexpected: data.cstr("hpet: unexpected interrupt or exception, stopping\r\n"),
        timer0_count: data.zeroed(4, 4),
        timer2_count: data.zeroed(4, 4),
    };
    let code16 = asm::long_mode_entry(d.gdtr, true)?;
    let code64 = long_mode_code(&d)?;
    Ok(GuestProgram {
        code: vec![code16, code64],
        data: vec![asm::gdt_blob(), data.finish()],
        work_areas: vec![
            (map::PML4, map::PAGE_TABLES_END, "page tables"),
            (map::STACK_BOTTOM, map::STACK_TOP, "stack"),
            (map::IDT, map::IDT_END, "IDT"),
            (map::PD_MMIO, map::PD_MMIO_END, "PD for the MMIO gap"),
        ],
        entry: asm::real_mode_entry(),
    })
}

/// Halt the counter (configuration `config` without ENABLE) and set it
/// to 0. Clobbers RDX.
fn restart_at_zero(a: &mut CodeAssembler, config: u64) -> Result<(), IcedError> {
    write64(a, devices::hpet::REG_CONFIG, config as i32)?;
    write64(a, devices::hpet::REG_COUNTER, 0)
}

/// Wait (CLI, STI;HLT) until the dword at `count` reaches `n`.
fn wait_for(a: &mut CodeAssembler, count: u32, n: u32) -> Result<(), IcedError> {
    let mut wait = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut wait)?;
    a.cli()?;
    a.cmp(dword_ptr(count), n)?;
    a.jae(done)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(wait)?;
    a.set_label(&mut done)
}

fn long_mode_code(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    use devices::hpet::{
        CFG_ENABLE, CFG_LEGACY, REG_CAPABILITIES, REG_CONFIG, REG_COUNTER, REG_INT_STATUS,
        TIMER_COMPARATOR, TIMER_CONFIG, TN_INT_ENABLE, TN_INT_LEVEL, TN_PERIODIC, TN_VAL_SET,
    };
    let mut a = CodeAssembler::new(64)?;
    let r = Routines::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut unexpected = a.create_label();
    let mut timer0_handler = a.create_label();
    let mut timer2_handler = a.create_label();
    let mut spurious_handler = a.create_label();

    asm::emit_load_flat_segments(&mut a)?;
    r.print(&mut a, d.header)?;
    idt.emit_load(
        &mut a,
        d.idtr,
        Some(unexpected),
        [
            (VECTOR_TIMER0, timer0_handler),
            (VECTOR_TIMER2, timer2_handler),
            (VECTOR_SPURIOUS, spurious_handler),
        ],
    )?;
    asm::emit_pic_mask_all(&mut a)?;
    apic::emit_software_enable(&mut a, VECTOR_SPURIOUS)?;
    apic::ioapic_write(
        &mut a,
        apic::redirection(IOAPIC_PIN_IRQ0),
        u32::from(VECTOR_TIMER0),
    )?;
    apic::ioapic_write(
        &mut a,
        apic::redirection(IOAPIC_PIN_TIMER2),
        apic::RTE_LEVEL | u32::from(VECTOR_TIMER2),
    )?;

    // 1. Capabilities and the halted counter.
    r.print(&mut a, d.caps)?;
    read32(&mut a, REG_CAPABILITIES)?;
    r.print_hex(&mut a, 8)?;
    r.print(&mut a, d.period)?;
    read32(&mut a, REG_CAPABILITIES + 4)?;
    r.print_hex(&mut a, 8)?;
    r.print(&mut a, d.halted)?;
    read32(&mut a, REG_COUNTER)?;
    r.print_hex(&mut a, 8)?;
    r.print(&mut a, d.line_end)?;

    // 2. Enabled, it moves (legacy replacement on from here).
    write64(&mut a, REG_CONFIG, (CFG_ENABLE | CFG_LEGACY) as i32)?;
    let mut moved = a.create_label();
    let mut printed = a.create_label();
    read64(&mut a, REG_COUNTER)?;
    a.mov(rbx, rax)?;
    a.mov(ecx, DELAY_LOOPS)?;
    let mut delay = a.create_label();
    a.set_label(&mut delay)?;
    a.dec(ecx)?;
    a.jnz(delay)?;
    read64(&mut a, REG_COUNTER)?;
    a.cmp(rax, rbx)?;
    a.ja(moved)?;
    r.print(&mut a, d.stuck)?;
    a.jmp(printed)?;
    a.set_label(&mut moved)?;
    r.print(&mut a, d.moves)?;
    a.set_label(&mut printed)?;

    // 3. Timer 0: one-shot, then periodic (Linux's sequence: VAL_SET, the
    // first comparator, then the period). Each arming halts the counter
    // and restarts it from 0, so every value written is fixed.
    restart_at_zero(&mut a, CFG_LEGACY)?;
    write64(&mut a, timer_reg(0, TIMER_CONFIG), TN_INT_ENABLE as i32)?;
    write64(&mut a, timer_reg(0, TIMER_COMPARATOR), TICKS)?;
    write64(&mut a, REG_CONFIG, (CFG_ENABLE | CFG_LEGACY) as i32)?;
    wait_for(&mut a, d.timer0_count, 1)?;
    r.print(&mut a, d.one_shot)?;
    a.mov(eax, dword_ptr(d.timer0_count))?;
    r.print_hex(&mut a, 1)?;
    r.print(&mut a, d.line_end)?;
    restart_at_zero(&mut a, CFG_LEGACY)?;
    write64(
        &mut a,
        timer_reg(0, TIMER_CONFIG),
        (TN_INT_ENABLE | TN_PERIODIC | TN_VAL_SET) as i32,
    )?;
    write64(&mut a, timer_reg(0, TIMER_COMPARATOR), TICKS)?;
    write64(&mut a, timer_reg(0, TIMER_COMPARATOR), TICKS)?;
    write64(&mut a, REG_CONFIG, (CFG_ENABLE | CFG_LEGACY) as i32)?;
    // The handler turns timer 0 off at the last one.
    wait_for(&mut a, d.timer0_count, 1 + PERIODIC_INTERRUPTS)?;
    r.print(&mut a, d.periodic)?;
    a.mov(eax, dword_ptr(d.timer0_count))?;
    r.print_hex(&mut a, 1)?;
    r.print(&mut a, d.line_end)?;

    // 4. Timer 2: level-triggered on pin 11, one-shot.
    restart_at_zero(&mut a, 0)?;
    write64(
        &mut a,
        timer_reg(2, TIMER_CONFIG),
        (TN_INT_ENABLE | TN_INT_LEVEL | (u64::from(IOAPIC_PIN_TIMER2) << 9)) as i32,
    )?;
    write64(&mut a, timer_reg(2, TIMER_COMPARATOR), TICKS)?;
    write64(&mut a, REG_CONFIG, CFG_ENABLE as i32)?;
    wait_for(&mut a, d.timer2_count, 1)?;
    r.print(&mut a, d.level)?;
    a.mov(eax, dword_ptr(d.timer2_count))?;
    r.print_hex(&mut a, 1)?;
    r.print(&mut a, d.status_after)?;
    read32(&mut a, REG_INT_STATUS)?;
    r.print_hex(&mut a, 1)?;
    r.print(&mut a, d.line_end)?;
    write64(&mut a, REG_CONFIG, 0)?;
    r.print(&mut a, d.done)?;
    asm::emit_halt(&mut a)?;

    // Timer 0 (edge): count; off after the last periodic one; EOI.
    let mut eoi = a.create_label();
    a.set_label(&mut timer0_handler)?;
    a.push(rdx)?;
    a.inc(dword_ptr(d.timer0_count))?;
    a.cmp(dword_ptr(d.timer0_count), 1 + PERIODIC_INTERRUPTS)?;
    a.jb(eoi)?;
    write64(&mut a, timer_reg(0, TIMER_CONFIG), 0)?;
    a.set_label(&mut eoi)?;
    apic::lapic_write(&mut a, apic::EOI, 0)?;
    a.pop(rdx)?;
    a.iretq()?;

    // Timer 2 (level): count, clear its status bit (the line drops), EOI.
    a.set_label(&mut timer2_handler)?;
    a.push(rdx)?;
    a.inc(dword_ptr(d.timer2_count))?;
    write64(&mut a, REG_INT_STATUS, 1 << 2)?;
    apic::lapic_write(&mut a, apic::EOI, 0)?;
    a.pop(rdx)?;
    a.iretq()?;

    a.set_label(&mut spurious_handler)?;
    a.iretq()?;

    a.set_label(&mut unexpected)?;
    r.print(&mut a, d.unexpected)?;
    asm::emit_halt(&mut a)?;

    idt.emit(&mut a)?;
    r.emit(&mut a)?;
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
            include_str!("../../golden/hpet.serial.txt"),
            EXPECTED_SERIAL
        );
    }
}
