//! `pci`: the PCI platform from a guest's side, in 64-bit long mode, with
//! two of duet's PCI test devices plugged in (slots 3 and 7, whose INTA#
//! share one interrupt line).
//!
//! 1. **Enumeration through both configuration mechanisms.** For every
//!    slot of bus 0 the guest reads the ID dword through mechanism #1
//!    (CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at 0xcfc); for each present
//!    function it prints the IDs and class and checks that ECAM (MMCONFIG
//!    at 0xe0000000) reads the same.
//! 2. **BAR sizing and moving** on the first test device: with decoding
//!    off it writes all ones to BAR0 (32-bit memory), BAR1 (I/O) and
//!    BAR2/3 (64-bit memory), reads the sizes back, restores them; then it
//!    moves BAR0 to 0xd0000000, turns decoding on, and reads the device's
//!    ID register at the new address and all ones at the old one.
//! 3. **MSI**: finds the MSI capability in the list, programs it (local
//!    APIC 0, vector 0x61), enables it and has the device signal it.
//! 4. **MSI-X**: disables MSI, finds the MSI-X capability, programs entry
//!    3 of the table in BAR2 (vector 0x62), masks it, has the device
//!    signal vector 3 (the PBA shows it pending), unmasks it: the
//!    interrupt arrives.
//! 5. **A shared level-triggered line**: routes the devices' GSI (read
//!    from the interrupt line register) level-triggered, active-low,
//!    through the IOAPIC; both devices assert INTA#; the first handler
//!    lowers the first device only and EOIs: the line is still held by the
//!    second, so the interrupt comes again; the second handler lowers it.
//!
//! Everything is deterministic (no time involved): the serial output and
//! the device trace are the same on both backends.

use iced_x86::code_asm::*;

use super::asm::{self, apic, map, DataBlock, GuestProgram, IdtBuilder, Routines};
use super::GuestImage;
use crate::layout::{self, ports};
use crate::machine::{PciDeviceKind, PciDeviceSpec};
use devices::pci::test_device::{self, regs};

pub const NAME: &str = "pci";
pub const DESCRIPTION: &str =
    "64-bit long mode: PCI enumeration (mechanism #1 and ECAM), BAR sizing and moving, MSI, MSI-X, a shared INTx line";

/// Where the two test devices sit.
pub const SLOT_A: u8 = 3;
pub const SLOT_B: u8 = 7;
pub const MSI_VECTOR: u8 = 0x61;
pub const MSIX_VECTOR: u8 = 0x62;
pub const INTX_VECTOR: u8 = 0x63;
pub const MSIX_ENTRY: u32 = 3;
/// Where the guest moves the first device's BAR0.
pub const NEW_BAR0: u32 = 0xd000_0000;

const ECAM: u32 = layout::pci::ECAM_BASE as u32;
const CONFIG_ADDRESS: u16 = ports::PCI_CONFIG;
const CONFIG_DATA: u16 = ports::PCI_CONFIG + 4;
const TEST_ID: u32 = (test_device::DEVICE_ID as u32) << 16 | test_device::VENDOR_ID as u32;

pub fn build() -> GuestImage {
    let mut image = program().into_image();
    image.pci_devices = [SLOT_A, SLOT_B]
        .map(|slot| PciDeviceSpec {
            kind: PciDeviceKind::Test,
            slot: Some(slot),
        })
        .to_vec();
    image
}

pub fn program() -> GuestProgram {
    assemble_program().expect("pci guest assembles")
}

struct Data {
    gdtr: u32,
    idtr: u32,
    header: u32,
    fn_prefix: u32,
    fn_dot: u32,
    colon: u32,
    class: u32,
    ecam_same: u32,
    ecam_differs: u32,
    bar0_size: u32,
    bar1_size: u32,
    bar2_size: u32,
    moved: u32,
    moved_id: u32,
    moved_old: u32,
    msi: u32,
    msix_pba: u32,
    msix_got: u32,
    intx: u32,
    intx_count: u32,
    line_end: u32,
    unexpected: u32,
    // Variables.
    slot: u32,
    id: u32,
    found_a: u32,
    found_b: u32,
    bar0_a: u32,
    bar0_b: u32,
    msi_count: u32,
    msix_count: u32,
    intx_handled: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let d = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        header: data.cstr(
            "pci: enumerating bus 0 through mechanism #1 (0xcf8/0xcfc) and ECAM (0xe0000000)\r\n",
        ),
        fn_prefix: data.cstr("pci: 00:"),
        fn_dot: data.cstr(".0 "),
        colon: data.cstr(":"),
        class: data.cstr(" class "),
        ecam_same: data.cstr(", ECAM reads the same\r\n"),
        ecam_differs: data.cstr(", ECAM reads DIFFERENT IDs\r\n"),
        bar0_size: data.cstr("pci: test device BAR0 (32-bit memory) size 0x"),
        bar1_size: data.cstr(", BAR1 (I/O) size 0x"),
        bar2_size: data.cstr(", BAR2 (64-bit memory) size 0x"),
        moved: data.cstr("pci: BAR0 moved from 0x"),
        moved_id: data.cstr(" to 0xd0000000: ID register 0x"),
        moved_old: data.cstr(", old address reads 0x"),
        msi: data.cstr("pci: MSI (vector 0x61) interrupts received: "),
        msix_pba: data.cstr("pci: MSI-X entry 3 masked, vector signalled: PBA 0x"),
        msix_got: data.cstr("; unmasked: vector 0x62 interrupts received: "),
        intx: data.cstr("pci: INTA# of both devices on GSI "),
        intx_count: data
            .cstr(" (level, active-low): interrupts taken while one or both held the line: "),
        line_end: data.cstr("\r\n"),
        unexpected: data.cstr("pci: unexpected interrupt or exception, stopping\r\n"),
        slot: data.zeroed(4, 4),
        id: data.zeroed(4, 4),
        found_a: data.bytes(&u32::MAX.to_le_bytes(), 4),
        found_b: data.bytes(&u32::MAX.to_le_bytes(), 4),
        bar0_a: data.zeroed(4, 4),
        bar0_b: data.zeroed(4, 4),
        msi_count: data.zeroed(4, 4),
        msix_count: data.zeroed(4, 4),
        intx_handled: data.zeroed(4, 4),
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

/// R12 = ECAM base of the function in slot `[slot_var]`. Clobbers RAX.
fn ecam_base(a: &mut CodeAssembler, slot_var: u32, reg: AsmRegister64) -> Result<(), IcedError> {
    a.mov(eax, dword_ptr(u64::from(slot_var)))?;
    a.shl(eax, 15)?;
    a.add(eax, ECAM)?;
    a.mov(reg, rax)
}

/// Find capability `id` of the function whose ECAM base is in R12: its
/// offset in R15 (0 when absent). Clobbers RAX.
fn find_capability(a: &mut CodeAssembler, id: u8) -> Result<(), IcedError> {
    let mut next = a.create_label();
    let mut done = a.create_label();
    a.movzx(r15d, byte_ptr(r12 + 0x34))?;
    a.set_label(&mut next)?;
    a.test(r15d, r15d)?;
    a.jz(done)?;
    a.movzx(eax, byte_ptr(r12 + r15))?;
    a.cmp(eax, i32::from(id))?;
    a.je(done)?;
    a.movzx(r15d, byte_ptr(r12 + r15 + 1))?;
    a.jmp(next)?;
    a.set_label(&mut done)?;
    Ok(())
}

fn long_mode_code(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let decimal = asm::DecimalPrinter::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut unexpected = a.create_label();
    let mut msi_handler = a.create_label();
    let mut msix_handler = a.create_label();
    let mut intx_handler = a.create_label();

    asm::emit_load_flat_segments(&mut a)?;
    routines.print(&mut a, d.header)?;
    idt.emit_load(
        &mut a,
        d.idtr,
        Some(unexpected),
        [
            (MSI_VECTOR, msi_handler),
            (MSIX_VECTOR, msix_handler),
            (INTX_VECTOR, intx_handler),
        ],
    )?;
    asm::emit_pic_mask_all(&mut a)?;
    apic::emit_software_enable(&mut a, 0xff)?;

    // 1. Enumerate: every slot through mechanism #1, compared with ECAM.
    let mut scan = a.create_label();
    let mut next_slot = a.create_label();
    let mut not_a = a.create_label();
    let mut recorded = a.create_label();
    let mut differs = a.create_label();
    a.mov(dword_ptr(u64::from(d.slot)), 0)?;
    a.set_label(&mut scan)?;
    a.mov(eax, dword_ptr(u64::from(d.slot)))?;
    a.shl(eax, 11)?;
    a.or(eax, 0x8000_0000u32 as i32)?;
    a.mov(dx, u32::from(CONFIG_ADDRESS))?;
    a.out(dx, eax)?;
    a.mov(dx, u32::from(CONFIG_DATA))?;
    a.in_(eax, dx)?;
    a.cmp(eax, -1)?;
    a.je(next_slot)?;
    a.mov(dword_ptr(u64::from(d.id)), eax)?;
    // Remember the test devices' slots.
    a.cmp(eax, TEST_ID as i32)?;
    a.jne(recorded)?;
    a.mov(eax, dword_ptr(u64::from(d.slot)))?;
    a.cmp(dword_ptr(u64::from(d.found_a)), -1)?;
    a.jne(not_a)?;
    a.mov(dword_ptr(u64::from(d.found_a)), eax)?;
    a.jmp(recorded)?;
    a.set_label(&mut not_a)?;
    a.mov(dword_ptr(u64::from(d.found_b)), eax)?;
    a.set_label(&mut recorded)?;
    routines.print(&mut a, d.fn_prefix)?;
    a.mov(eax, dword_ptr(u64::from(d.slot)))?;
    routines.print_hex(&mut a, 2)?;
    routines.print(&mut a, d.fn_dot)?;
    a.mov(eax, dword_ptr(u64::from(d.id)))?;
    routines.print_hex(&mut a, 4)?;
    routines.print(&mut a, d.colon)?;
    a.mov(eax, dword_ptr(u64::from(d.id)))?;
    a.shr(eax, 16)?;
    routines.print_hex(&mut a, 4)?;
    routines.print(&mut a, d.class)?;
    // Class code through mechanism #1 (register 8, bits 31:8).
    a.mov(eax, dword_ptr(u64::from(d.slot)))?;
    a.shl(eax, 11)?;
    a.or(eax, 0x8000_0008u32 as i32)?;
    a.mov(dx, u32::from(CONFIG_ADDRESS))?;
    a.out(dx, eax)?;
    a.mov(dx, u32::from(CONFIG_DATA))?;
    a.in_(eax, dx)?;
    a.shr(eax, 8)?;
    routines.print_hex(&mut a, 6)?;
    ecam_base(&mut a, d.slot, r12)?;
    a.mov(eax, dword_ptr(r12))?;
    a.cmp(eax, dword_ptr(u64::from(d.id)))?;
    a.jne(differs)?;
    routines.print(&mut a, d.ecam_same)?;
    a.jmp(next_slot)?;
    a.set_label(&mut differs)?;
    routines.print(&mut a, d.ecam_differs)?;
    a.set_label(&mut next_slot)?;
    a.inc(dword_ptr(u64::from(d.slot)))?;
    a.cmp(dword_ptr(u64::from(d.slot)), 32)?;
    a.jb(scan)?;

    // 2. BAR sizing on device A (ECAM base in R12, device B's in R13),
    // with decoding off.
    ecam_base(&mut a, d.found_a, r12)?;
    ecam_base(&mut a, d.found_b, r13)?;
    a.mov(word_ptr(r12 + 4), 0u32)?;
    // BAR0: 32-bit memory.
    a.mov(r14d, dword_ptr(r12 + 0x10))?;
    a.mov(dword_ptr(r12 + 0x10), -1)?;
    a.mov(eax, dword_ptr(r12 + 0x10))?;
    a.and(eax, -16)?;
    a.neg(eax)?;
    a.mov(dword_ptr(r12 + 0x10), r14d)?;
    a.mov(ebx, eax)?;
    routines.print(&mut a, d.bar0_size)?;
    a.mov(eax, ebx)?;
    routines.print_hex(&mut a, 8)?;
    // BAR1: I/O (16-bit decode).
    a.mov(r15d, dword_ptr(r12 + 0x14))?;
    a.mov(dword_ptr(r12 + 0x14), -1)?;
    a.mov(eax, dword_ptr(r12 + 0x14))?;
    a.and(eax, -4)?;
    a.neg(eax)?;
    a.and(eax, 0xffff)?;
    a.mov(dword_ptr(r12 + 0x14), r15d)?;
    a.mov(ebx, eax)?;
    routines.print(&mut a, d.bar1_size)?;
    a.mov(eax, ebx)?;
    routines.print_hex(&mut a, 4)?;
    // BAR2/3: 64-bit memory.
    a.mov(r15d, dword_ptr(r12 + 0x18))?;
    a.mov(dword_ptr(r12 + 0x18), -1)?;
    a.mov(dword_ptr(r12 + 0x1c), -1)?;
    a.mov(eax, dword_ptr(r12 + 0x1c))?;
    a.shl(rax, 32)?;
    a.mov(ecx, dword_ptr(r12 + 0x18))?;
    a.or(rax, rcx)?;
    a.and(rax, -16)?;
    a.neg(rax)?;
    a.mov(dword_ptr(r12 + 0x18), r15d)?;
    a.mov(dword_ptr(r12 + 0x1c), 0)?;
    a.mov(rbx, rax)?;
    routines.print(&mut a, d.bar2_size)?;
    a.mov(rax, rbx)?;
    routines.print_hex(&mut a, 16)?;
    routines.print(&mut a, d.line_end)?;

    // Move BAR0 (R14 = its old value), then decode memory and I/O again.
    a.mov(dword_ptr(r12 + 0x10), NEW_BAR0)?;
    a.mov(word_ptr(r12 + 4), 7u32)?;
    a.mov(dword_ptr(u64::from(d.bar0_a)), NEW_BAR0)?;
    a.mov(eax, dword_ptr(r13 + 0x10))?;
    a.and(eax, -16)?;
    a.mov(dword_ptr(u64::from(d.bar0_b)), eax)?;
    routines.print(&mut a, d.moved)?;
    a.mov(eax, r14d)?;
    a.and(eax, -16)?;
    routines.print_hex(&mut a, 8)?;
    routines.print(&mut a, d.moved_id)?;
    a.mov(edx, NEW_BAR0)?;
    a.mov(eax, dword_ptr(rdx + regs::ID as i32))?;
    routines.print_hex(&mut a, 8)?;
    routines.print(&mut a, d.moved_old)?;
    a.mov(edx, r14d)?;
    a.and(edx, -16)?;
    a.mov(eax, dword_ptr(rdx + regs::ID as i32))?;
    routines.print_hex(&mut a, 8)?;
    routines.print(&mut a, d.line_end)?;

    // 3. MSI on device A.
    find_capability(&mut a, devices::pci::config::cap_id::MSI)?;
    a.mov(dword_ptr(r12 + r15 + 4), apic::LAPIC_BASE)?;
    a.mov(dword_ptr(r12 + r15 + 8), 0)?;
    a.mov(word_ptr(r12 + r15 + 12), u32::from(MSI_VECTOR))?;
    a.mov(dword_ptr(r12 + r15 + 16), 0)?;
    a.mov(word_ptr(r12 + r15 + 2), 1u32)?;
    a.mov(edx, NEW_BAR0)?;
    a.mov(dword_ptr(rdx + regs::MSI as i32), 1)?;
    let mut wait_msi = a.create_label();
    a.set_label(&mut wait_msi)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.cmp(dword_ptr(u64::from(d.msi_count)), 0)?;
    a.je(wait_msi)?;
    routines.print(&mut a, d.msi)?;
    a.mov(eax, dword_ptr(u64::from(d.msi_count)))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.line_end)?;
    a.mov(word_ptr(r12 + r15 + 2), 0u32)?;

    // 4. MSI-X on device A: entry MSIX_ENTRY of the table at BAR2 (RBX).
    find_capability(&mut a, devices::pci::config::cap_id::MSIX)?;
    a.mov(ebx, dword_ptr(r12 + 0x1c))?;
    a.shl(rbx, 32)?;
    a.mov(eax, dword_ptr(r12 + 0x18))?;
    a.and(eax, -16)?;
    a.or(rbx, rax)?;
    let entry = (MSIX_ENTRY * 16) as i32;
    a.mov(dword_ptr(rbx + entry), apic::LAPIC_BASE)?;
    a.mov(dword_ptr(rbx + (entry + 4)), 0)?;
    a.mov(dword_ptr(rbx + (entry + 8)), u32::from(MSIX_VECTOR))?;
    a.mov(dword_ptr(rbx + (entry + 12)), 1)?;
    a.mov(word_ptr(r12 + r15 + 2), 0x8000u32)?;
    a.mov(edx, NEW_BAR0)?;
    a.mov(dword_ptr(rdx + regs::MSIX as i32), MSIX_ENTRY)?;
    // Masked: pending in the PBA.
    routines.print(&mut a, d.msix_pba)?;
    a.mov(eax, dword_ptr(rbx + test_device::PBA_OFFSET as i32))?;
    a.push(rbx)?;
    routines.print_hex(&mut a, 2)?;
    a.pop(rbx)?;
    a.mov(dword_ptr(rbx + (entry + 12)), 0)?;
    let mut wait_msix = a.create_label();
    a.set_label(&mut wait_msix)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.cmp(dword_ptr(u64::from(d.msix_count)), 0)?;
    a.je(wait_msix)?;
    routines.print(&mut a, d.msix_got)?;
    a.mov(eax, dword_ptr(u64::from(d.msix_count)))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.line_end)?;
    a.mov(word_ptr(r12 + r15 + 2), 0u32)?;

    // 5. The shared INTx line: IOAPIC entry for the GSI in the interrupt
    // line register, level-triggered, active-low, vector INTX_VECTOR.
    a.mov(edx, apic::IOAPIC_BASE)?;
    a.movzx(eax, byte_ptr(r12 + 0x3c))?;
    a.lea(eax, dword_ptr(rax * 2 + 0x11))?;
    a.mov(dword_ptr(rdx + apic::IOREGSEL), eax)?;
    a.mov(dword_ptr(rdx + apic::IOWIN), 0)?;
    a.dec(eax)?;
    a.mov(dword_ptr(rdx + apic::IOREGSEL), eax)?;
    a.mov(
        dword_ptr(rdx + apic::IOWIN),
        u32::from(INTX_VECTOR) | apic::RTE_LEVEL | 1 << 13,
    )?;
    a.mov(edx, dword_ptr(u64::from(d.bar0_a)))?;
    a.mov(dword_ptr(rdx + regs::INTX as i32), 1)?;
    a.mov(edx, dword_ptr(u64::from(d.bar0_b)))?;
    a.mov(dword_ptr(rdx + regs::INTX as i32), 1)?;
    let mut wait_intx = a.create_label();
    a.set_label(&mut wait_intx)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.cmp(dword_ptr(u64::from(d.intx_handled)), 2)?;
    a.jb(wait_intx)?;
    routines.print(&mut a, d.intx)?;
    a.movzx(eax, byte_ptr(r12 + 0x3c))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.intx_count)?;
    a.mov(eax, dword_ptr(u64::from(d.intx_handled)))?;
    decimal.print(&mut a)?;
    routines.print(&mut a, d.line_end)?;
    asm::emit_halt(&mut a)?;

    const SAVED: [AsmRegister64; 3] = [rax, rcx, rdx];
    let eoi_and_return = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        apic::lapic_write(a, apic::EOI, 0)?;
        for r in SAVED.iter().rev() {
            a.pop(*r)?;
        }
        a.iretq()
    };

    a.set_label(&mut msi_handler)?;
    for r in SAVED {
        a.push(r)?;
    }
    a.inc(dword_ptr(u64::from(d.msi_count)))?;
    eoi_and_return(&mut a)?;

    a.set_label(&mut msix_handler)?;
    for r in SAVED {
        a.push(r)?;
    }
    a.inc(dword_ptr(u64::from(d.msix_count)))?;
    eoi_and_return(&mut a)?;

    // First INTx: lower device A only (B keeps the line asserted); second:
    // lower B.
    let mut lower_b = a.create_label();
    let mut lowered = a.create_label();
    a.set_label(&mut intx_handler)?;
    for r in SAVED {
        a.push(r)?;
    }
    a.inc(dword_ptr(u64::from(d.intx_handled)))?;
    a.cmp(dword_ptr(u64::from(d.intx_handled)), 1)?;
    a.jne(lower_b)?;
    a.mov(edx, dword_ptr(u64::from(d.bar0_a)))?;
    a.jmp(lowered)?;
    a.set_label(&mut lower_b)?;
    a.mov(edx, dword_ptr(u64::from(d.bar0_b)))?;
    a.set_label(&mut lowered)?;
    a.mov(dword_ptr(rdx + regs::INTX as i32), 0)?;
    eoi_and_return(&mut a)?;

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
    fn both_devices_share_one_line() {
        assert_eq!(
            crate::irqchip::pci_intx_gsi(SLOT_A, 1),
            crate::irqchip::pci_intx_gsi(SLOT_B, 1)
        );
    }
}
