//! `apic-base`: the local APIC's base and mode in 64-bit ring 0 (issue 16,
//! item 2).
//!
//! 1. IA32_APIC_BASE as reset leaves it; TPR written through the page at
//!    0xfee00000, the page moved to [`MOVED_BASE`] by a WRMSR: the TPR
//!    reads back there, the old address reads all ones; the page moved
//!    back keeps a TPR written at the new one.
//! 2. Reserved values #GP and change nothing: bit 9, the first base bit
//!    at the guest's MAXPHYADDR (CPUID 0x80000008 EAX[7:0], whatever the
//!    backend's width), and x2APIC enable without global enable. The #GP
//!    handler counts and steps over the 2-byte WRMSR.
//! 3. Global disable (EN = 0): CPUID.1:EDX.APIC reads 0 and the page reads
//!    all ones; re-enabled, the bit is back and the registers are at their
//!    reset values (SVR 0xff, TPR 0).
//! 4. CR8 and TPR are one register: `mov cr8, 0xf` reads back as TPR 0xf0,
//!    TPR 0x50 written through the page reads back as CR8 5.
//! 5. The TSC-deadline timer, when CPUID.1:ECX[24] offers it (the
//!    interpreter does; KVM with duet's own LAPIC does not yet): armed in
//!    the future (one interrupt, the MSR reads 0 after it), in the past
//!    (one interrupt at once), and armed then disarmed by a write of 0 (no
//!    interrupt while the guest spins well past the old deadline).
//!
//! Every value printed is fixed (no times), so the output is the same on
//! every backend and clock.

use iced_x86::code_asm::*;

use super::asm::{self, apic, map, DataBlock, GuestProgram, IdtBuilder, Routines};
use super::GuestImage;

pub const NAME: &str = "apic-base";
pub const DESCRIPTION: &str = "64-bit long mode: IA32_APIC_BASE relocation, reserved-bit #GP, global disable with CPUID.1:EDX.APIC, CR8 as TPR, TSC-deadline armed in the future, in the past and disarmed";

/// Where the guest moves the xAPIC page (in the MMIO gap, in the same
/// 2 MiB page as the default base, clear of every device).
pub const MOVED_BASE: u32 = 0xfef0_0000;
const MSR_APIC_BASE: u32 = 0x1b;
const MSR_TSC_DEADLINE: u32 = 0x6e0;
const APIC_BASE_BSP_EN: u32 = 0x900;
const APIC_BASE_EN: u32 = 0x800;
const APIC_BASE_EXTD: u32 = 0x400;
const VECTOR_GP: u8 = 13;
const VECTOR_DEADLINE: u8 = 0x40;
const VECTOR_SPURIOUS: u8 = 0xff;
/// LVT timer mode 10b: TSC-deadline.
const LVT_TIMER_TSC_DEADLINE: u32 = 2 << 17;
/// How far ahead the deadline is armed (TSC cycles).
const DEADLINE_AHEAD: i32 = 100_000;
const CPUID1_EDX_APIC: u32 = 1 << 9;
const CPUID1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Everything the guest writes to COM1 (interpreter).
pub const EXPECTED_SERIAL: &str = "apic-base: in 64-bit long mode\r\n\
apic-base: IA32_APIC_BASE 0x00000000fee00900\r\n\
apic-base: moved: IA32_APIC_BASE 0x00000000fef00900, TPR there 0x20, old page reads 0xffffffff\r\n\
apic-base: moved back: TPR 0x30\r\n\
apic-base: reserved or illegal values: #GP 0x3, IA32_APIC_BASE still 0x00000000fee00900\r\n\
apic-base: disabled: CPUID.1:EDX.APIC 0x0, page reads 0xffffffff\r\n\
apic-base: enabled again: CPUID.1:EDX.APIC 0x1, SVR 0x000000ff, TPR 0x00\r\n\
apic-base: mov cr8, 0xf: TPR 0xf0; TPR 0x50: cr8 0x5\r\n\
apic-base: TSC-deadline in the future: interrupts 0x1, IA32_TSC_DEADLINE after it 0x00000000\r\n\
apic-base: TSC-deadline in the past: interrupts 0x2\r\n\
apic-base: TSC-deadline armed, then 0 written: interrupts still 0x2\r\n\
apic-base: done\r\n";

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("apic-base guest assembles")
}

struct Data {
    gdtr: u32,
    idtr: u32,
    header: u32,
    base: u32,
    moved: u32,
    tpr_there: u32,
    old_reads: u32,
    moved_back: u32,
    reserved: u32,
    still: u32,
    disabled: u32,
    page_reads: u32,
    enabled: u32,
    svr: u32,
    tpr: u32,
    cr8_tpr: u32,
    cr8_back: u32,
    no_deadline: u32,
    future: u32,
    future_msr: u32,
    past: u32,
    zero: u32,
    done: u32,
    line_end: u32,
    unexpected: u32,
    gp_count: u32,
    ticks: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let d = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        header: data.cstr("apic-base: in 64-bit long mode\r\n"),
        base: data.cstr("apic-base: IA32_APIC_BASE 0x"),
        moved: data.cstr("apic-base: moved: IA32_APIC_BASE 0x"),
        tpr_there: data.cstr(", TPR there 0x"),
        old_reads: data.cstr(", old page reads 0x"),
        moved_back: data.cstr("apic-base: moved back: TPR 0x"),
        reserved: data.cstr("apic-base: reserved or illegal values: #GP 0x"),
        still: data.cstr(", IA32_APIC_BASE still 0x"),
        disabled: data.cstr("apic-base: disabled: CPUID.1:EDX.APIC 0x"),
        page_reads: data.cstr(", page reads 0x"),
        enabled: data.cstr("apic-base: enabled again: CPUID.1:EDX.APIC 0x"),
        svr: data.cstr(", SVR 0x"),
        tpr: data.cstr(", TPR 0x"),
        cr8_tpr: data.cstr("apic-base: mov cr8, 0xf: TPR 0x"),
        cr8_back: data.cstr("; TPR 0x50: cr8 0x"),
        no_deadline: data.cstr("apic-base: TSC-deadline not offered (CPUID.1:ECX[24] clear)\r\n"),
        future: data.cstr("apic-base: TSC-deadline in the future: interrupts 0x"),
        future_msr: data.cstr(", IA32_TSC_DEADLINE after it 0x"),
        past: data.cstr("apic-base: TSC-deadline in the past: interrupts 0x"),
        zero: data.cstr("apic-base: TSC-deadline armed, then 0 written: interrupts still 0x"),
        done: data.cstr("apic-base: done\r\n"),
        line_end: data.cstr("\r\n"),
        unexpected: data.cstr("apic-base: unexpected interrupt or exception, stopping\r\n"),
        gp_count: data.zeroed(4, 4),
        ticks: data.zeroed(4, 4),
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

/// RAX = IA32_APIC_BASE. Clobbers RCX, RDX.
fn read_apic_base(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(ecx, MSR_APIC_BASE)?;
    a.rdmsr()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)
}

/// IA32_APIC_BASE = RAX. Clobbers RCX, RDX.
fn write_apic_base(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rdx, rax)?;
    a.shr(rdx, 32)?;
    a.mov(ecx, MSR_APIC_BASE)?;
    a.wrmsr()
}

/// IA32_TSC_DEADLINE = RAX. Clobbers RCX, RDX.
fn write_deadline(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rdx, rax)?;
    a.shr(rdx, 32)?;
    a.mov(ecx, MSR_TSC_DEADLINE)?;
    a.wrmsr()
}

/// RAX = the TSC. Clobbers RDX.
fn read_tsc(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)
}

fn long_mode_code(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let r = Routines::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut unexpected = a.create_label();
    let mut gp_handler = a.create_label();
    let mut deadline_handler = a.create_label();
    let mut spurious_handler = a.create_label();

    asm::emit_load_flat_segments(&mut a)?;
    r.print(&mut a, d.header)?;
    idt.emit_load(
        &mut a,
        d.idtr,
        Some(unexpected),
        [
            (VECTOR_GP, gp_handler),
            (VECTOR_DEADLINE, deadline_handler),
            (VECTOR_SPURIOUS, spurious_handler),
        ],
    )?;
    asm::emit_pic_mask_all(&mut a)?;
    apic::emit_software_enable(&mut a, VECTOR_SPURIOUS)?;

    // 1. The base at reset, then moved and back.
    r.print(&mut a, d.base)?;
    read_apic_base(&mut a)?;
    r.print_hex(&mut a, 16)?;
    r.print(&mut a, d.line_end)?;
    apic::lapic_write(&mut a, apic::TPR, 0x20)?;
    a.mov(eax, MOVED_BASE | APIC_BASE_BSP_EN)?;
    write_apic_base(&mut a)?;
    r.print(&mut a, d.moved)?;
    read_apic_base(&mut a)?;
    r.print_hex(&mut a, 16)?;
    r.print(&mut a, d.tpr_there)?;
    a.mov(edx, MOVED_BASE)?;
    a.mov(eax, dword_ptr(rdx + apic::TPR))?;
    r.print_hex(&mut a, 2)?;
    r.print(&mut a, d.old_reads)?;
    apic::lapic_read(&mut a, apic::TPR)?;
    r.print_hex(&mut a, 8)?;
    r.print(&mut a, d.line_end)?;
    a.mov(edx, MOVED_BASE)?;
    a.mov(dword_ptr(rdx + apic::TPR), 0x30)?;
    a.mov(eax, apic::LAPIC_BASE | APIC_BASE_BSP_EN)?;
    write_apic_base(&mut a)?;
    r.print(&mut a, d.moved_back)?;
    apic::lapic_read(&mut a, apic::TPR)?;
    r.print_hex(&mut a, 2)?;
    r.print(&mut a, d.line_end)?;

    // 2. Reserved values: each WRMSR faults (the handler steps over it).
    a.mov(eax, apic::LAPIC_BASE | APIC_BASE_BSP_EN | (1 << 9))?;
    write_apic_base(&mut a)?;
    // The first base bit at MAXPHYADDR.
    a.mov(eax, 0x8000_0008u32)?;
    a.cpuid()?;
    a.mov(ecx, eax)?;
    a.and(ecx, 0xff)?;
    a.mov(eax, 1)?;
    a.shl(rax, cl)?;
    a.mov(ebx, apic::LAPIC_BASE | APIC_BASE_BSP_EN)?;
    a.or(rax, rbx)?;
    write_apic_base(&mut a)?;
    a.mov(eax, apic::LAPIC_BASE | APIC_BASE_BSP_EN | APIC_BASE_EXTD)?;
    a.and(eax, !APIC_BASE_EN)?;
    write_apic_base(&mut a)?;
    r.print(&mut a, d.reserved)?;
    a.mov(eax, dword_ptr(d.gp_count))?;
    r.print_hex(&mut a, 1)?;
    r.print(&mut a, d.still)?;
    read_apic_base(&mut a)?;
    r.print_hex(&mut a, 16)?;
    r.print(&mut a, d.line_end)?;

    // 3. Global disable and enable.
    a.mov(eax, apic::LAPIC_BASE | 0x100)?;
    write_apic_base(&mut a)?;
    r.print(&mut a, d.disabled)?;
    cpuid1_apic_bit(&mut a)?;
    r.print_hex(&mut a, 1)?;
    r.print(&mut a, d.page_reads)?;
    apic::lapic_read(&mut a, apic::VERSION)?;
    r.print_hex(&mut a, 8)?;
    r.print(&mut a, d.line_end)?;
    a.mov(eax, apic::LAPIC_BASE | APIC_BASE_BSP_EN)?;
    write_apic_base(&mut a)?;
    r.print(&mut a, d.enabled)?;
    cpuid1_apic_bit(&mut a)?;
    r.print_hex(&mut a, 1)?;
    r.print(&mut a, d.svr)?;
    apic::lapic_read(&mut a, apic::SVR)?;
    r.print_hex(&mut a, 8)?;
    r.print(&mut a, d.tpr)?;
    apic::lapic_read(&mut a, apic::TPR)?;
    r.print_hex(&mut a, 2)?;
    r.print(&mut a, d.line_end)?;
    apic::emit_software_enable(&mut a, VECTOR_SPURIOUS)?;

    // 4. CR8 and TPR.
    a.mov(eax, 0xf)?;
    a.mov(cr8, rax)?;
    r.print(&mut a, d.cr8_tpr)?;
    apic::lapic_read(&mut a, apic::TPR)?;
    r.print_hex(&mut a, 2)?;
    apic::lapic_write(&mut a, apic::TPR, 0x50)?;
    r.print(&mut a, d.cr8_back)?;
    a.mov(rax, cr8)?;
    r.print_hex(&mut a, 1)?;
    r.print(&mut a, d.line_end)?;
    a.xor(eax, eax)?;
    a.mov(cr8, rax)?;

    // 5. TSC-deadline, if offered.
    let mut no_deadline = a.create_label();
    let mut finished = a.create_label();
    a.mov(eax, 1)?;
    a.cpuid()?;
    a.test(ecx, CPUID1_ECX_TSC_DEADLINE)?;
    a.jz(no_deadline)?;
    apic::lapic_write(
        &mut a,
        apic::LVT_TIMER,
        LVT_TIMER_TSC_DEADLINE | u32::from(VECTOR_DEADLINE),
    )?;
    // a) In the future: wait for it (CLI/STI;HLT so no wake-up is lost).
    read_tsc(&mut a)?;
    a.add(rax, DEADLINE_AHEAD)?;
    write_deadline(&mut a)?;
    let mut wait = a.create_label();
    let mut arrived = a.create_label();
    a.set_label(&mut wait)?;
    a.cli()?;
    a.cmp(dword_ptr(d.ticks), 1)?;
    a.jae(arrived)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(wait)?;
    a.set_label(&mut arrived)?;
    r.print(&mut a, d.future)?;
    a.mov(eax, dword_ptr(d.ticks))?;
    r.print_hex(&mut a, 1)?;
    r.print(&mut a, d.future_msr)?;
    a.mov(ecx, MSR_TSC_DEADLINE)?;
    a.rdmsr()?;
    a.or(eax, edx)?;
    r.print_hex(&mut a, 8)?;
    r.print(&mut a, d.line_end)?;
    // b) In the past: the interrupt is due at once.
    a.mov(eax, 1)?;
    write_deadline(&mut a)?;
    let mut wait_past = a.create_label();
    let mut arrived_past = a.create_label();
    a.set_label(&mut wait_past)?;
    a.cli()?;
    a.cmp(dword_ptr(d.ticks), 2)?;
    a.jae(arrived_past)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(wait_past)?;
    a.set_label(&mut arrived_past)?;
    r.print(&mut a, d.past)?;
    a.mov(eax, dword_ptr(d.ticks))?;
    r.print_hex(&mut a, 1)?;
    r.print(&mut a, d.line_end)?;
    // c) Armed, then disarmed by 0: spin with interrupts on until well
    // past the old deadline.
    read_tsc(&mut a)?;
    a.add(rax, DEADLINE_AHEAD)?;
    a.mov(rbx, rax)?;
    write_deadline(&mut a)?;
    a.xor(eax, eax)?;
    write_deadline(&mut a)?;
    a.add(rbx, DEADLINE_AHEAD)?;
    let mut spin = a.create_label();
    a.sti()?;
    a.set_label(&mut spin)?;
    read_tsc(&mut a)?;
    a.cmp(rax, rbx)?;
    a.jb(spin)?;
    a.cli()?;
    r.print(&mut a, d.zero)?;
    a.mov(eax, dword_ptr(d.ticks))?;
    r.print_hex(&mut a, 1)?;
    r.print(&mut a, d.line_end)?;
    a.jmp(finished)?;
    a.set_label(&mut no_deadline)?;
    r.print(&mut a, d.no_deadline)?;
    a.set_label(&mut finished)?;
    r.print(&mut a, d.done)?;
    asm::emit_halt(&mut a)?;

    // #GP: count, drop the error code, step over the 2-byte WRMSR.
    a.set_label(&mut gp_handler)?;
    a.inc(dword_ptr(d.gp_count))?;
    a.add(rsp, 8)?;
    a.add(qword_ptr(rsp), 2)?;
    a.iretq()?;

    // The deadline timer: count, EOI.
    a.set_label(&mut deadline_handler)?;
    a.push(rdx)?;
    a.inc(dword_ptr(d.ticks))?;
    apic::lapic_write(&mut a, apic::EOI, 0)?;
    a.pop(rdx)?;
    a.iretq()?;

    // Spurious: no EOI.
    a.set_label(&mut spurious_handler)?;
    a.iretq()?;

    a.set_label(&mut unexpected)?;
    r.print(&mut a, d.unexpected)?;
    asm::emit_halt(&mut a)?;

    idt.emit(&mut a)?;
    r.emit(&mut a)?;
    Ok(asm::assemble(&mut a, map::CODE64)?.blob)
}

/// EAX = CPUID.1:EDX.APIC (0 or 1). Clobbers RBX, RCX, RDX.
fn cpuid1_apic_bit(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(eax, 1)?;
    a.cpuid()?;
    a.mov(eax, edx)?;
    a.shr(eax, CPUID1_EDX_APIC.trailing_zeros())?;
    a.and(eax, 1)
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
            include_str!("../../golden/apic-base.serial.txt"),
            EXPECTED_SERIAL
        );
    }
}
