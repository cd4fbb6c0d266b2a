//! `e1000`: a small e1000 driver in 64-bit long mode that sends a fixed
//! number of frames through an emulated 82540EM whose backend loops every
//! frame straight back (the same workload on every backend, for the I/O
//! benchmark and for trace comparisons).
//!
//! 1. Finds the NIC on bus 0 through mechanism #1 (8086:100e), reads BAR0
//!    and the interrupt line, routes that GSI level-triggered, active-low
//!    through the IOAPIC.
//! 2. Resets the device (CTRL.RST), reads the MAC from the EEPROM through
//!    EERD, sets up a 16-descriptor transmit ring and a 16-descriptor
//!    receive ring (2 KiB buffers, FCS stripped), unmasks RXT0.
//! 3. For each of [`FRAMES`] frames: writes its sequence number into the
//!    frame, queues one legacy descriptor (EOP, RS, IFCS), bumps TDT,
//!    `hlt`s until the receive interrupt (the handler reads ICR and EOIs),
//!    checks the received descriptor (DD, EOP, length) and the sequence
//!    number, adds it to a checksum and gives the descriptor back (RDT).
//! 4. Prints the count, the bytes, the interrupts taken and the checksum.
//!
//! Deterministic (the loopback backend answers inside the TDT write): the
//! serial output and the device trace are the same on both backends.

use iced_x86::code_asm::*;

use super::asm::{self, apic, map, DataBlock, GuestProgram, IdtBuilder, Routines};
use super::GuestImage;
use crate::layout::ports;
use crate::machine::{PciDeviceKind, PciDeviceSpec};
use devices::e1000::{ctrl, eerd, icr, rctl, reg, rxd, tctl, txd};

pub const NAME: &str = "e1000";
pub const DESCRIPTION: &str =
    "64-bit long mode: a small e1000 driver loops frames through an 82540EM with a loopback backend";

/// Frames sent (and received back).
pub const FRAMES: u32 = 512;
/// Bytes per frame (a full Ethernet payload, without FCS).
pub const FRAME_LEN: u32 = 1514;
/// Where the NIC sits.
pub const SLOT: u8 = 4;
pub const VECTOR: u8 = 0x64;
const RING: u32 = 16;

// Guest-physical layout of the driver's memory (below 1 MiB, identity mapped).
const TX_RING: u32 = 0x2_0000;
const RX_RING: u32 = 0x2_1000;
const TX_BUF: u32 = 0x2_2000;
const RX_BUFS: u32 = 0x3_0000;
const RX_BUF_LEN: u32 = 2048;

const CONFIG_ADDRESS: u16 = ports::PCI_CONFIG;
const CONFIG_DATA: u16 = ports::PCI_CONFIG + 4;
const E1000_ID: u32 = (devices::e1000::DEVICE_ID as u32) << 16 | devices::e1000::VENDOR_ID as u32;

pub fn build() -> GuestImage {
    build_with(FRAMES, FRAME_LEN)
}

/// `e1000-bar-move`: the same driver, but it first moves BAR 0 to
/// [`MOVED_BAR0`] (memory decoding off, BAR written, decoding on), checks
/// that the old address no longer answers, then makes 256 writes to the
/// multicast table (a coalesced range) and reads them back in order before
/// it loops [`MOVED_FRAMES`] frames. With `--coalesced-mmio on` the
/// coalesced ranges must have followed the BAR.
pub const MOVED_NAME: &str = "e1000-bar-move";
pub const MOVED_DESCRIPTION: &str =
    "64-bit long mode: the e1000 driver moves the NIC's BAR 0, writes the multicast table in order, loops frames";
/// Where `e1000-bar-move` puts BAR 0 (inside the host bridge's window,
/// away from where the machine places BARs).
pub const MOVED_BAR0: u32 = 0xd000_0000;
pub const MOVED_FRAMES: u32 = 64;
/// The multicast-table writes of `e1000-bar-move`: write `i` goes to
/// MTA[i % 8].
pub const MTA_WRITES: u32 = 256;

pub fn build_moved() -> GuestImage {
    build_program(MOVED_FRAMES, FRAME_LEN, true)
}

/// The same driver with another frame count and length (the I/O
/// benchmark's runs); `frame_len` is clamped to 64..=1514.
pub fn build_with(frames: u32, frame_len: u32) -> GuestImage {
    build_program(frames, frame_len, false)
}

fn build_program(frames: u32, frame_len: u32, move_bar: bool) -> GuestImage {
    let frame_len = frame_len.clamp(64, FRAME_LEN);
    let mut image = assemble_program(frames, frame_len, move_bar)
        .expect("e1000 guest assembles")
        .into_image();
    image.pci_devices = vec![PciDeviceSpec {
        kind: PciDeviceKind::E1000Loopback,
        slot: Some(SLOT),
    }];
    image
}

pub fn program() -> GuestProgram {
    assemble_program(FRAMES, FRAME_LEN, false).expect("e1000 guest assembles")
}

struct Data {
    gdtr: u32,
    idtr: u32,
    header: u32,
    found: u32,
    mac: u32,
    sent: u32,
    bytes: u32,
    irqs: u32,
    sum: u32,
    bad: u32,
    line_end: u32,
    missing: u32,
    unexpected: u32,
    moved: u32,
    moved_to: u32,
    old_reads: u32,
    mta: u32,
    space: u32,
    // Variables.
    slot: u32,
    bar0: u32,
    interrupts: u32,
    checksum: u32,
}

fn assemble_program(
    frames: u32,
    frame_len: u32,
    move_bar: bool,
) -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let d = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        header: data.cstr("e1000: looking for 8086:100e on bus 0\r\n"),
        found: data.cstr("e1000: found in slot "),
        mac: data.cstr(", MAC words from the EEPROM: "),
        sent: data.cstr("e1000: frames looped back: "),
        bytes: data.cstr(", bytes: "),
        irqs: data.cstr(", receive interrupts: "),
        sum: data.cstr(", checksum 0x"),
        bad: data.cstr("e1000: received frame did not match, stopping at frame "),
        line_end: data.cstr("\r\n"),
        missing: data.cstr("e1000: no NIC found\r\n"),
        unexpected: data.cstr("e1000: unexpected interrupt or exception, stopping\r\n"),
        moved: data.cstr(", BAR0 moved from 0x"),
        moved_to: data.cstr(" to 0x"),
        old_reads: data.cstr(", the old address reads 0x"),
        mta: data.cstr("e1000: MTA[0..8] after 256 writes:"),
        space: data.cstr(" "),
        slot: data.zeroed(4, 4),
        bar0: data.zeroed(4, 4),
        interrupts: data.zeroed(4, 4),
        checksum: data.zeroed(4, 4),
    };
    let code16 = asm::long_mode_entry(d.gdtr, true)?;
    let code64 = long_mode_code(&d, frames, frame_len, move_bar)?;
    Ok(GuestProgram {
        code: vec![code16, code64],
        data: vec![asm::gdt_blob(), data.finish()],
        work_areas: vec![
            (map::PML4, map::PAGE_TABLES_END, "page tables"),
            (map::STACK_BOTTOM, map::STACK_TOP, "stack"),
            (map::IDT, map::IDT_END, "IDT"),
            (map::PD_MMIO, map::PD_MMIO_END, "PD for the MMIO gap"),
            (
                u64::from(TX_RING),
                u64::from(RX_BUFS + RING * RX_BUF_LEN),
                "rings and buffers",
            ),
        ],
        entry: asm::real_mode_entry(),
    })
}

/// Config dword `offset` of the function in `[slot]` into EAX (mechanism #1).
fn config_read(a: &mut CodeAssembler, slot: u32, offset: u32) -> Result<(), IcedError> {
    a.mov(eax, dword_ptr(u64::from(slot)))?;
    a.shl(eax, 11)?;
    a.or(eax, (0x8000_0000 | offset) as i32)?;
    a.mov(dx, u32::from(CONFIG_ADDRESS))?;
    a.out(dx, eax)?;
    a.mov(dx, u32::from(CONFIG_DATA))?;
    a.in_(eax, dx)
}

/// Write `value` to config dword `offset` of the function
/// in `[slot]` (mechanism #1). Clobbers EAX and EDX.
fn config_write(
    a: &mut CodeAssembler,
    slot: u32,
    offset: u32,
    value: u32,
) -> Result<(), IcedError> {
    a.mov(eax, dword_ptr(u64::from(slot)))?;
    a.shl(eax, 11)?;
    a.or(eax, (0x8000_0000 | offset) as i32)?;
    a.mov(dx, u32::from(CONFIG_ADDRESS))?;
    a.out(dx, eax)?;
    a.mov(dx, u32::from(CONFIG_DATA))?;
    a.mov(eax, value)?;
    a.out(dx, eax)
}

fn long_mode_code(
    d: &Data,
    frames: u32,
    frame_len: u32,
    move_bar: bool,
) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let decimal = asm::DecimalPrinter::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut unexpected = a.create_label();
    let mut handler = a.create_label();
    let mut missing = a.create_label();
    let mut bad = a.create_label();

    asm::emit_load_flat_segments(&mut a)?;
    routines.print(&mut a, d.header)?;
    idt.emit_load(&mut a, d.idtr, Some(unexpected), [(VECTOR, handler)])?;
    asm::emit_pic_mask_all(&mut a)?;
    apic::emit_software_enable(&mut a, 0xff)?;

    // 1. Find the NIC.
    let mut scan = a.create_label();
    let mut found = a.create_label();
    a.mov(dword_ptr(u64::from(d.slot)), 0)?;
    a.set_label(&mut scan)?;
    config_read(&mut a, d.slot, 0)?;
    a.cmp(eax, E1000_ID as i32)?;
    a.je(found)?;
    a.inc(dword_ptr(u64::from(d.slot)))?;
    a.cmp(dword_ptr(u64::from(d.slot)), 32)?;
    a.jb(scan)?;
    a.jmp(missing)?;
    a.set_label(&mut found)?;
    routines.print(&mut a, d.found)?;
    a.mov(eax, dword_ptr(u64::from(d.slot)))?;
    decimal.print(&mut a)?;
    config_read(&mut a, d.slot, 0x10)?;
    a.and(eax, -16)?;
    a.mov(dword_ptr(u64::from(d.bar0)), eax)?;
    if move_bar {
        use devices::pci::config::{command, reg as cfg};
        let cmd = u32::from(command::IO_SPACE | command::BUS_MASTER);
        config_write(&mut a, d.slot, cfg::COMMAND as u32, cmd)?;
        config_write(&mut a, d.slot, cfg::BAR0 as u32, MOVED_BAR0)?;
        let cmd = cmd | u32::from(command::MEMORY_SPACE);
        config_write(&mut a, d.slot, cfg::COMMAND as u32, cmd)?;
        routines.print(&mut a, d.moved)?;
        a.mov(eax, dword_ptr(u64::from(d.bar0)))?;
        routines.print_hex(&mut a, 8)?;
        routines.print(&mut a, d.moved_to)?;
        config_read(&mut a, d.slot, 0x10)?;
        a.and(eax, -16)?;
        routines.print_hex(&mut a, 8)?;
        routines.print(&mut a, d.old_reads)?;
        a.mov(edx, dword_ptr(u64::from(d.bar0)))?;
        a.mov(eax, dword_ptr(rdx + reg::STATUS as i32))?;
        routines.print_hex(&mut a, 8)?;
        config_read(&mut a, d.slot, 0x10)?;
        a.and(eax, -16)?;
        a.mov(dword_ptr(u64::from(d.bar0)), eax)?;
    }
    // The GSI: IOAPIC entry, level-triggered, active-low.
    config_read(&mut a, d.slot, 0x3c)?;
    a.movzx(eax, al)?;
    a.mov(edx, apic::IOAPIC_BASE)?;
    a.lea(eax, dword_ptr(rax * 2 + 0x11))?;
    a.mov(dword_ptr(rdx + apic::IOREGSEL), eax)?;
    a.mov(dword_ptr(rdx + apic::IOWIN), 0)?;
    a.dec(eax)?;
    a.mov(dword_ptr(rdx + apic::IOREGSEL), eax)?;
    a.mov(
        dword_ptr(rdx + apic::IOWIN),
        u32::from(VECTOR) | apic::RTE_LEVEL | 1 << 13,
    )?;

    // 2. Reset, MAC, rings. RBX = BAR0 from here on.
    a.mov(ebx, dword_ptr(u64::from(d.bar0)))?;
    a.mov(dword_ptr(rbx + reg::IMC as i32), -1)?;
    a.mov(dword_ptr(rbx + reg::CTRL as i32), ctrl::RST as i32)?;
    a.mov(eax, dword_ptr(rbx + reg::ICR as i32))?;
    routines.print(&mut a, d.mac)?;
    for word in 0..3u32 {
        a.mov(
            dword_ptr(rbx + reg::EERD as i32),
            eerd::START | word << eerd::ADDR_SHIFT,
        )?;
        a.mov(eax, dword_ptr(rbx + reg::EERD as i32))?;
        a.shr(eax, eerd::DATA_SHIFT)?;
        routines.print_hex(&mut a, 4)?;
        a.mov(ebx, dword_ptr(u64::from(d.bar0)))?;
    }
    routines.print(&mut a, d.line_end)?;
    a.mov(ebx, dword_ptr(u64::from(d.bar0)))?;
    // Clear the rings, fill the receive descriptors' buffer addresses.
    a.cld()?;
    a.mov(edi, TX_RING)?;
    a.xor(eax, eax)?;
    a.mov(ecx, (RX_RING + RING * 16 - TX_RING) / 4)?;
    a.rep().stosd()?;
    for i in 0..RING {
        a.mov(
            dword_ptr(u64::from(RX_RING + i * 16)),
            RX_BUFS + i * RX_BUF_LEN,
        )?;
    }
    // The frame: to our own MAC, from it, a private ethertype, a pattern.
    a.mov(edi, TX_BUF)?;
    a.mov(ecx, frame_len)?;
    a.mov(eax, 0x5a)?;
    a.rep().stosb()?;
    a.mov(dword_ptr(u64::from(TX_BUF)), 0x1200_5452)?;
    a.mov(word_ptr(u64::from(TX_BUF + 4)), 0x5634u32)?;
    a.mov(dword_ptr(u64::from(TX_BUF + 6)), 0x1200_5452)?;
    a.mov(word_ptr(u64::from(TX_BUF + 10)), 0x5634u32)?;
    a.mov(word_ptr(u64::from(TX_BUF + 12)), 0xb588u32)?; // 0x88b5, local experimental
    let w = |a: &mut CodeAssembler, r: u32, v: u32| a.mov(dword_ptr(rbx + r as i32), v);
    w(&mut a, reg::TDBAL, TX_RING)?;
    w(&mut a, reg::TDBAH, 0)?;
    w(&mut a, reg::TDLEN, RING * 16)?;
    w(&mut a, reg::TDH, 0)?;
    w(&mut a, reg::TDT, 0)?;
    w(&mut a, reg::TCTL, tctl::EN | tctl::PSP)?;
    w(&mut a, reg::RDBAL, RX_RING)?;
    w(&mut a, reg::RDBAH, 0)?;
    w(&mut a, reg::RDLEN, RING * 16)?;
    w(&mut a, reg::RDH, 0)?;
    w(&mut a, reg::RDT, RING - 1)?;
    w(&mut a, reg::RCTL, rctl::EN | rctl::BAM | rctl::SECRC)?;
    w(&mut a, reg::IMS, icr::RXT0)?;
    if move_bar {
        // Write i to MTA[i % 8], in order; read the eight back.
        let mut more = a.create_label();
        a.xor(ecx, ecx)?;
        a.set_label(&mut more)?;
        a.mov(eax, ecx)?;
        a.and(eax, 7)?;
        a.mov(dword_ptr(rbx + rax * 4 + reg::MTA as i32), ecx)?;
        a.inc(ecx)?;
        a.cmp(ecx, MTA_WRITES as i32)?;
        a.jb(more)?;
        routines.print(&mut a, d.mta)?;
        for i in 0..8u32 {
            routines.print(&mut a, d.space)?;
            a.mov(ebx, dword_ptr(u64::from(d.bar0)))?;
            a.mov(eax, dword_ptr(rbx + (reg::MTA + 4 * i) as i32))?;
            routines.print_hex(&mut a, 8)?;
        }
        routines.print(&mut a, d.line_end)?;
        a.mov(ebx, dword_ptr(u64::from(d.bar0)))?;
    }

    // 3. The loop: R12 = frame number, R13 = ring index, R14 = checksum.
    let mut next = a.create_label();
    let mut wait = a.create_label();
    let mut arrived = a.create_label();
    a.xor(r12d, r12d)?;
    a.xor(r13d, r13d)?;
    a.xor(r14d, r14d)?;
    a.set_label(&mut next)?;
    a.mov(dword_ptr(u64::from(TX_BUF + 14)), r12d)?;
    // Transmit descriptor R13: address, length, CMD.
    a.mov(eax, r13d)?;
    a.shl(eax, 4)?;
    a.mov(dword_ptr(rax + TX_RING as i32), TX_BUF)?;
    a.mov(dword_ptr(rax + (TX_RING + 4) as i32), 0)?;
    a.mov(
        dword_ptr(rax + (TX_RING + 8) as i32),
        frame_len | u32::from(txd::EOP | txd::RS | txd::IFCS) << 24,
    )?;
    a.mov(dword_ptr(rax + (TX_RING + 12) as i32), 0)?;
    a.lea(ecx, dword_ptr(r13 + 1))?;
    a.and(ecx, (RING - 1) as i32)?;
    a.mov(r15d, dword_ptr(u64::from(d.interrupts)))?;
    a.mov(dword_ptr(rbx + reg::TDT as i32), ecx)?;
    // Wait for the receive interrupt, then look at descriptor R13.
    a.set_label(&mut wait)?;
    a.cmp(dword_ptr(u64::from(d.interrupts)), r15d)?;
    a.jne(arrived)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.jmp(wait)?;
    a.set_label(&mut arrived)?;
    a.mov(esi, r13d)?;
    a.shl(esi, 4)?;
    a.add(esi, RX_RING as i32)?;
    a.movzx(eax, byte_ptr(rsi + 12))?;
    a.and(eax, i32::from(rxd::DD | rxd::EOP))?;
    a.cmp(eax, i32::from(rxd::DD | rxd::EOP))?;
    a.jne(bad)?;
    a.movzx(eax, word_ptr(rsi + 8))?;
    a.cmp(eax, frame_len as i32)?;
    a.jne(bad)?;
    a.mov(eax, dword_ptr(rsi))?;
    a.mov(eax, dword_ptr(rax + 14))?;
    a.cmp(eax, r12d)?;
    a.jne(bad)?;
    // checksum = rotl(checksum, 5) ^ (sequence + last byte).
    a.rol(r14d, 5)?;
    a.mov(ecx, dword_ptr(rsi))?;
    a.movzx(ecx, byte_ptr(rcx + (frame_len - 1) as i32))?;
    a.add(eax, ecx)?;
    a.xor(r14d, eax)?;
    // Give the descriptor back.
    a.mov(byte_ptr(rsi + 12), 0)?;
    a.mov(dword_ptr(rbx + reg::RDT as i32), r13d)?;
    a.inc(r13d)?;
    a.and(r13d, (RING - 1) as i32)?;
    a.inc(r12d)?;
    a.cmp(r12d, frames as i32)?;
    a.jb(next)?;
    a.mov(dword_ptr(u64::from(d.checksum)), r14d)?;

    // 4. Report.
    routines.print(&mut a, d.sent)?;
    a.mov(eax, frames)?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.bytes)?;
    a.mov(eax, frames.wrapping_mul(frame_len))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.irqs)?;
    a.mov(eax, dword_ptr(u64::from(d.interrupts)))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.sum)?;
    a.mov(eax, dword_ptr(u64::from(d.checksum)))?;
    routines.print_hex(&mut a, 8)?;
    routines.print(&mut a, d.line_end)?;
    asm::emit_halt(&mut a)?;

    a.set_label(&mut bad)?;
    routines.print(&mut a, d.bad)?;
    a.mov(eax, r12d)?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.line_end)?;
    asm::emit_halt(&mut a)?;

    a.set_label(&mut missing)?;
    routines.print(&mut a, d.missing)?;
    asm::emit_halt(&mut a)?;

    // The interrupt: read ICR (lowers INTA#), count, EOI.
    a.set_label(&mut handler)?;
    a.push(rax)?;
    a.push(rdx)?;
    a.mov(edx, dword_ptr(u64::from(d.bar0)))?;
    a.mov(eax, dword_ptr(rdx + reg::ICR as i32))?;
    a.inc(dword_ptr(u64::from(d.interrupts)))?;
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
}
