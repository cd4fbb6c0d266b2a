//! `tsc-pit`: the TSC advances consistently with the PIT (both run from
//! the VM clock), in 64-bit long mode.
//!
//! Linux calibrates the TSC against PIT channel 2 by polling port 0x61 for
//! OUT2; the number of polls depends on time, and so would this guest's
//! device accesses. Counting periodic PIT interrupts is no better: a PIT
//! period the VMM is late for (a busy host) is coalesced with the next, as
//! the model documents, so N interrupts may span more than N periods. This
//! guest waits for a single PIT event instead, and measures how long it
//! really took:
//!
//! 1. With interrupts disabled: PIT channel 0 control word for mode 0
//!    ("interrupt on terminal count": OUT, ISA IRQ0, goes low and stays low
//!    until the count expires), then the PICs are initialised as Linux does
//!    (vectors 0x20 / 0x28; ICW1 forgets any edge latched before) with only
//!    IRQ0 unmasked, then the count [`COUNT`] is written — the PIT starts
//!    counting — and the TSC is read (`rdtsc`).
//! 2. `sti; hlt` until the one interrupt: OUT rises COUNT + 1 PIT clocks
//!    after the count was written, once. The handler latches channel 0's
//!    count (control word 0x00), reads the TSC, reads the latched count
//!    (the counter keeps counting down past 0 in mode 0, so the value tells
//!    how many PIT clocks passed: COUNT - value, modulo 65536, plus one for
//!    the load — the interrupt's delivery latency included), masks IRQ0,
//!    sends its EOI and returns with IF clear.
//!
//! The implied TSC frequency, `delta_tsc * 1193182 / pit_clocks`, is
//! compared with what the platform says the TSC runs at: CPUID leaf 0x15
//! (crystal Hz × EBX / EAX) when all three are nonzero, else leaf 0x16
//! (base MHz) when nonzero; with neither it must lie in a wide plausible
//! band, 100 MHz to 20 GHz. The guest prints only whether the measurement
//! lies within 20 % of that reference — never a raw number: the TSC values,
//! the latched count (a time-dependent read, marked in the trace), the
//! reference and the latency differ between backends and runs. None of them
//! changes which devices the guest touches.
//!
//! Memory map (see [`super::asm`] for the shared one):
//!
//! ```text
//! 0x0000_0500  GDT                   0x0000_6000 .. 0x7000  stack
//! 0x0000_1000 .. 0x0000_6000  page tables, built by the 16-bit code
//! 0x0000_7c00  16-bit code (entry: CS=0, IP=0x7c00)
//! 0x0000_9000  64-bit code           0x0000_a000  data: GDTR, IDTR, strings, slots
//! 0x0000_b000 .. 0x0000_c000  IDT, built by the 64-bit code
//! ```

use iced_x86::code_asm::*;

use super::asm::{self, map, pic, pit, DataBlock, GuestProgram, IdtBuilder, Routines};
use super::GuestImage;

pub const NAME: &str = "tsc-pit";
pub const DESCRIPTION: &str =
    "64-bit long mode: TSC against one PIT terminal count (27.5 ms, count latched); within 20% of CPUID's frequency";

/// The PIT count: 32768 clocks, 27.5 ms. The handler's latched count tells
/// the elapsed clocks exactly as long as the interrupt comes less than
/// 65536 - COUNT clocks (27.5 ms) late.
pub const COUNT: u16 = 0x8000;
const VECTOR: u8 = pic::MASTER_VECTOR;
/// The band used when CPUID gives no TSC frequency.
const BAND_LOW_HZ: u64 = 100_000_000;
const BAND_HIGH_HZ: u64 = 20_000_000_000;

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("tsc-pit guest assembles")
}

struct Data {
    gdtr: u32,
    idtr: u32,
    header: u32,
    yes: u32,
    no: u32,
    unexpected: u32,
    count: u32,
    tsc_start: u32,
    tsc_end: u32,
    /// The latched count, low byte then high byte.
    latched: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let d = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        header: data.cstr(&format!(
            "tsc-pit: in 64-bit long mode: TSC read after writing PIT channel 0 count {COUNT} \
             (mode 0, IRQ0 through the PIC) and in the IRQ0 handler, count latched there\r\n"
        )),
        yes: data.cstr("tsc-pit: tsc/pit ratio within 20%: yes\r\n"),
        no: data.cstr("tsc-pit: tsc/pit ratio within 20%: no\r\n"),
        unexpected: data.cstr("tsc-pit: unexpected interrupt or exception, stopping\r\n"),
        count: data.zeroed(4, 4),
        tsc_start: data.zeroed(8, 8),
        tsc_end: data.zeroed(8, 8),
        latched: data.zeroed(2, 2),
    };

    let code16 = asm::long_mode_entry(d.gdtr, false)?;

    let code64 = long_mode_code(&d)?;

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

/// `rdtsc` into RAX (64 bits). Clobbers RDX.
fn read_tsc(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)
}

fn long_mode_code(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut unexpected = a.create_label();
    let mut timer_handler = a.create_label();
    let [count_low, count_high] = COUNT.to_le_bytes();

    asm::emit_load_flat_segments(&mut a)?;
    routines.print(&mut a, d.header)?;
    idt.emit_load(&mut a, d.idtr, Some(unexpected), [(VECTOR, timer_handler)])?;

    // OUT low and no count: no edge can come until the count runs out.
    asm::emit_outb(&mut a, pit::COMMAND, pit::CHANNEL0_TERMINAL_COUNT)?;
    asm::emit_pic_init(&mut a, pic::MASTER_VECTOR, pic::SLAVE_VECTOR)?;
    asm::emit_outb(&mut a, pic::MASTER_DATA, 0xfe)?;
    asm::emit_outb(&mut a, pit::CHANNEL0, count_low)?;
    asm::emit_outb(&mut a, pit::CHANNEL0, count_high)?;
    read_tsc(&mut a)?;
    a.mov(qword_ptr(d.tsc_start), rax)?;

    let mut wait = a.create_label();
    a.set_label(&mut wait)?;
    a.sti()?;
    a.hlt()?;
    a.cmp(dword_ptr(d.count), 1)?;
    a.jb(wait)?;
    a.cli()?;

    // R8 = measured Hz = delta_tsc * PIT_HZ / pit_clocks, where
    // pit_clocks = ((COUNT - latched) mod 65536) + 1.
    a.movzx(ecx, word_ptr(d.latched))?;
    a.mov(eax, u32::from(COUNT))?;
    a.sub(eax, ecx)?;
    a.and(eax, 0xffff)?;
    a.inc(eax)?;
    a.mov(ecx, eax)?;
    a.mov(rax, qword_ptr(d.tsc_end))?;
    a.sub(rax, qword_ptr(d.tsc_start))?;
    a.mov(r11d, pit::HZ)?;
    a.mul(r11)?;
    a.div(rcx)?;
    a.mov(r8, rax)?;

    // R9 = the reference from CPUID.
    let mut no_leaf_15 = a.create_label();
    let mut no_reference = a.create_label();
    let mut have_reference = a.create_label();
    a.xor(eax, eax)?;
    a.cpuid()?;
    a.mov(r10d, eax)?;
    a.cmp(r10d, 0x15)?;
    a.jb(no_reference)?;
    a.mov(eax, 0x15)?;
    a.xor(ecx, ecx)?;
    a.cpuid()?;
    a.test(eax, eax)?;
    a.jz(no_leaf_15)?;
    a.test(ebx, ebx)?;
    a.jz(no_leaf_15)?;
    a.test(ecx, ecx)?;
    a.jz(no_leaf_15)?;
    // ECX * EBX / EAX, in 64 bits.
    a.mov(r11d, eax)?;
    a.mov(eax, ecx)?;
    a.mov(ebx, ebx)?;
    a.mul(rbx)?;
    a.div(r11)?;
    a.mov(r9, rax)?;
    a.jmp(have_reference)?;
    a.set_label(&mut no_leaf_15)?;
    a.cmp(r10d, 0x16)?;
    a.jb(no_reference)?;
    a.mov(eax, 0x16)?;
    a.xor(ecx, ecx)?;
    a.cpuid()?;
    a.and(eax, 0xffff)?;
    a.jz(no_reference)?;
    a.imul_3(rax, rax, 1_000_000)?;
    a.mov(r9, rax)?;
    a.jmp(have_reference)?;

    // No reference: the wide band.
    let mut no = a.create_label();
    let mut yes = a.create_label();
    let mut print_answer = a.create_label();
    a.set_label(&mut no_reference)?;
    a.mov(rax, BAND_LOW_HZ)?;
    a.cmp(r8, rax)?;
    a.jb(no)?;
    a.mov(rax, BAND_HIGH_HZ)?;
    a.cmp(r8, rax)?;
    a.ja(no)?;
    a.jmp(yes)?;

    // Within 20 %: 4 * ref <= 5 * measured <= 6 * ref.
    a.set_label(&mut have_reference)?;
    a.imul_3(rax, r8, 5)?;
    a.imul_3(rcx, r9, 4)?;
    a.cmp(rax, rcx)?;
    a.jb(no)?;
    a.imul_3(rcx, r9, 6)?;
    a.cmp(rax, rcx)?;
    a.ja(no)?;
    a.set_label(&mut yes)?;
    a.mov(esi, d.yes)?;
    a.jmp(print_answer)?;
    a.set_label(&mut no)?;
    a.mov(esi, d.no)?;
    a.set_label(&mut print_answer)?;
    a.call(routines.print_str)?;
    asm::emit_halt(&mut a)?;

    // IRQ0: latch the count, read the TSC, read the count; mask, EOI,
    // return with IF clear. [rsp] RDX, [rsp+8] RAX, then the CPU's frame.
    a.set_label(&mut timer_handler)?;
    a.push(rax)?;
    a.push(rdx)?;
    asm::emit_outb(&mut a, pit::COMMAND, pit::LATCH_CHANNEL0)?;
    read_tsc(&mut a)?;
    a.mov(qword_ptr(d.tsc_end), rax)?;
    asm::emit_inb(&mut a, pit::CHANNEL0)?;
    a.mov(byte_ptr(d.latched), al)?;
    asm::emit_inb(&mut a, pit::CHANNEL0)?;
    a.mov(byte_ptr(u64::from(d.latched) + 1), al)?;
    a.inc(dword_ptr(d.count))?;
    asm::emit_outb(&mut a, pic::MASTER_DATA, 0xff)?;
    asm::emit_return_with_interrupts_disabled(&mut a, 16)?;
    asm::emit_outb(&mut a, pic::MASTER_COMMAND, pic::EOI)?;
    a.pop(rdx)?;
    a.pop(rax)?;
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
    fn arithmetic_fits_64_bits() {
        // A 20 GHz TSC over at most 65536 PIT clocks, times the PIT's rate.
        let delta = u128::from(BAND_HIGH_HZ) * 65536 / u128::from(pit::HZ);
        assert!(delta * u128::from(pit::HZ) < u128::from(u64::MAX));
        assert!(BAND_HIGH_HZ.checked_mul(6).is_some());
    }

    #[test]
    fn reads_the_tsc_twice_and_never_polls() {
        use iced_x86::{Decoder, DecoderOptions, Mnemonic};
        let program = program();
        let code = program.code.iter().find(|c| c.bitness == 64).unwrap();
        let insns: Vec<_> = Decoder::with_ip(64, &code.bytes, code.addr, DecoderOptions::NONE)
            .into_iter()
            .collect();
        assert_eq!(
            insns
                .iter()
                .filter(|i| i.mnemonic() == Mnemonic::Rdtsc)
                .count(),
            2
        );
        // Port 0x61 is never touched.
        assert!(!insns
            .iter()
            .any(|i| matches!(i.mnemonic(), Mnemonic::In | Mnemonic::Out)
                && (0..i.op_count()).any(|k| i.op_kind(k) == iced_x86::OpKind::Immediate8)
                && i.immediate8() == 0x61));
    }
}
