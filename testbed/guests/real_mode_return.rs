//! `real-mode-return`: protected mode back to real mode and forward again,
//! as boot loaders and CPU test suites do.
//!
//! 1. Starts in real mode, programs the UART, loads its own GDT and enters
//!    32-bit protected mode; stores a marker there.
//! 2. Returns to real mode the architectural way: a far jump to a 16-bit
//!    code segment (limit 64 KiB), 16-bit data segments loaded into DS, ES,
//!    FS, GS and SS, CR0.PE cleared, a far jump to a real-mode CS, real-mode
//!    segment values reloaded, and the real-mode IVT (IDTR base 0, limit
//!    0x3ff) loaded.
//! 3. Runs 16-bit code there without any BIOS: a software interrupt through
//!    its own IVT entry, segment:offset addressing of the marker written in
//!    protected mode, CMOS RAM through ports 0x70/0x71, a word sum with
//!    `lodsw`, SMSW, and serial output.
//! 4. Enters protected mode again and checks what real mode computed,
//!    printing each value and the verdict.
//!
//! ```text
//! 0x0000_0100  IVT entry 0x40 (built at run time)
//! 0x0000_6000 .. 0x0000_7000  stack
//! 0x0000_7c00  16-bit code: the start (entry: CS=0, IP=0x7c00)
//! 0x0000_8000  32-bit code: first protected-mode visit
//! 0x0000_8800  32-bit code: second visit, the checks
//! 0x0000_9000  16-bit code: 16-bit protected mode, CR0.PE cleared
//! 0x0000_9100  16-bit code: real-mode work, then forward again
//! 0x0000_9800  16-bit code: the real-mode handler of `int 0x40`
//! 0x0000_a000  data: GDT (with 16-bit segments), GDTR, strings, slots
//! ```

use iced_x86::code_asm::*;

use super::asm::{self, map, DataBlock, GuestProgram, Routines};
use super::GuestImage;

pub const NAME: &str = "real-mode-return";
pub const DESCRIPTION: &str =
    "32-bit protected mode back to real mode (16-bit segments, CR0.PE cleared), BIOS-less 16-bit code and I/O, and protected mode again";

const CODE32_FIRST: u64 = map::CODE32;
const CODE32_SECOND: u64 = map::CODE32 + 0x800;
const CODE16_RETURN: u64 = map::CODE64;
const CODE16_REAL: u64 = map::CODE64 + 0x100;
const CODE16_HANDLER: u64 = map::CODE64 + 0x800;

/// The guest's GDT selectors.
mod sel {
    pub const DATA32: u16 = 0x10;
    pub const CODE32: u16 = 0x18;
    pub const CODE16: u16 = 0x20;
    pub const DATA16: u16 = 0x28;
}

/// null, (unused), flat data, flat 32-bit code, 16-bit code and data
/// (base 0, limit 64 KiB, byte granular): accessed bits preset.
const GDT: [u64; 6] = [
    0,
    0,
    0x00cf_9300_0000_ffff,
    0x00cf_9b00_0000_ffff,
    0x0000_9b00_0000_ffff,
    0x0000_9300_0000_ffff,
];

/// The software interrupt real mode takes, and what its handler does.
const VECTOR: u8 = 0x40;
const INT_INPUT: u32 = 0x1234;
/// Written in protected mode, read back in real mode through ES = 0x0a00.
const MARKER: u32 = 0x600d_c0de;
const REAL_MODE_SEGMENT: u16 = (map::DATA >> 4) as u16;
/// CMOS RAM: the shutdown status byte, written and read back.
const CMOS_REGISTER: u8 = 0x0f;
const CMOS_VALUE: u8 = 0x5a;
/// Words summed with `lodsw`: 1, 2, ..., 16.
const WORDS: u16 = 16;

const PREFIX: &str = "real-mode-return: ";

/// Everything the guest prints.
pub fn expected_serial() -> String {
    let sum: u32 = (1..=u32::from(WORDS)).sum();
    [
        format!("{PREFIX}started in real mode\r\n"),
        format!("{PREFIX}32-bit protected mode\r\n"),
        format!("{PREFIX}back in real mode\r\n"),
        format!("{PREFIX}protected mode again\r\n"),
        format!(
            "{PREFIX}int 0x40: {:04x}, marker via es: {MARKER:08x}, cmos: {CMOS_VALUE:02x}, \
             sum: {sum:04x}, cr0.pe: {:x}\r\n",
            INT_INPUT + 1,
            0
        ),
        format!("{PREFIX}results ok\r\n"),
    ]
    .concat()
}

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("real-mode-return guest assembles")
}

struct Data {
    gdtr: u32,
    real_idtr: u32,
    started: u32,
    protected: u32,
    back: u32,
    again: u32,
    int_label: u32,
    marker_label: u32,
    cmos_label: u32,
    sum_label: u32,
    pe_label: u32,
    line_end: u32,
    ok: u32,
    bad: u32,
    words: u32,
    marker_slot: u32,
    int_slot: u32,
    marker_read_slot: u32,
    cmos_slot: u32,
    sum_slot: u32,
    pe_slot: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_bytes: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    let gdt = data.bytes(&gdt_bytes, 8);
    let words: Vec<u8> = (1..=WORDS).flat_map(|w| w.to_le_bytes()).collect();
    let d = Data {
        gdtr: data.table_register(u64::from(gdt), (GDT.len() * 8 - 1) as u16),
        real_idtr: data.table_register(0, 0x3ff),
        started: data.cstr(&format!("{PREFIX}started in real mode\r\n")),
        protected: data.cstr(&format!("{PREFIX}32-bit protected mode\r\n")),
        back: data.cstr(&format!("{PREFIX}back in real mode\r\n")),
        again: data.cstr(&format!("{PREFIX}protected mode again\r\n")),
        int_label: data.cstr(&format!("{PREFIX}int 0x40: ")),
        marker_label: data.cstr(", marker via es: "),
        cmos_label: data.cstr(", cmos: "),
        sum_label: data.cstr(", sum: "),
        pe_label: data.cstr(", cr0.pe: "),
        line_end: data.cstr("\r\n"),
        ok: data.cstr(&format!("{PREFIX}results ok\r\n")),
        bad: data.cstr(&format!("{PREFIX}results BAD\r\n")),
        words: data.bytes(&words, 2),
        marker_slot: data.zeroed(4, 4),
        int_slot: data.zeroed(4, 4),
        marker_read_slot: data.zeroed(4, 4),
        cmos_slot: data.zeroed(4, 4),
        sum_slot: data.zeroed(4, 4),
        pe_slot: data.zeroed(4, 4),
    };

    Ok(GuestProgram {
        code: vec![
            start(&d)?,
            first_protected_visit(&d)?,
            second_protected_visit(&d)?,
            leave_protected_mode()?,
            real_mode_work(&d)?,
            interrupt_handler()?,
        ],
        data: vec![data.finish()],
        // (The IVT entry the guest writes at 0x100 is the real-mode IVT's
        // own, below what the layout check covers.)
        work_areas: vec![(map::STACK_BOTTOM, map::STACK_TOP, "stack")],
        entry: asm::real_mode_entry(),
    })
}

/// Enter protected mode through this guest's GDT (16-bit code, GDT
/// loaded): CR0.PE set, CD/NW cleared, far jump to `target`.
fn enter_protected_mode(a: &mut CodeAssembler, target: u64) -> Result<(), IcedError> {
    a.mov(eax, cr0)?;
    a.and(eax, !(asm::cr0::CD | asm::cr0::NW))?;
    a.or(eax, asm::cr0::PE)?;
    a.mov(cr0, eax)?;
    a.jmp_far(sel::CODE32, target as u32)
}

fn load_flat_segments(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(ax, u32::from(sel::DATA32))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(fs, ax)?;
    a.mov(gs, ax)?;
    a.mov(ss, ax)?;
    a.mov(esp, map::STACK_TOP as u32)
}

/// 0x7c00: real mode → protected mode.
fn start(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    let r = Routines::new(&mut a);
    asm::emit_real_mode_prologue(&mut a)?;
    asm::emit_uart_init(&mut a)?;
    r.print(&mut a, d.started)?;
    a.lgdt(ptr(d.gdtr))?;
    enter_protected_mode(&mut a, CODE32_FIRST)?;
    r.emit(&mut a)?;
    Ok(asm::assemble(&mut a, map::CODE16)?.blob)
}

/// 0x8000: 32-bit code; stores the marker, then heads back to real mode
/// through the 16-bit code segment.
fn first_protected_visit(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let r = Routines::new(&mut a);
    load_flat_segments(&mut a)?;
    r.print(&mut a, d.protected)?;
    a.mov(dword_ptr(d.marker_slot), MARKER)?;
    a.jmp_far(sel::CODE16, CODE16_RETURN as u32)?;
    r.emit(&mut a)?;
    Ok(asm::assemble(&mut a, CODE32_FIRST)?.blob)
}

/// 0x9000: 16-bit protected mode → real mode.
fn leave_protected_mode() -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    // 16-bit data segments (64 KiB limits) in every data register.
    a.mov(ax, u32::from(sel::DATA16))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(fs, ax)?;
    a.mov(gs, ax)?;
    a.mov(ss, ax)?;
    a.mov(eax, cr0)?;
    a.and(eax, !asm::cr0::PE)?;
    a.mov(cr0, eax)?;
    a.jmp_far(0, CODE16_REAL as u32)?;
    Ok(asm::assemble(&mut a, CODE16_RETURN)?.blob)
}

/// 0x9100: real mode: the work, then protected mode again.
fn real_mode_work(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    let r = Routines::new(&mut a);
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(fs, ax)?;
    a.mov(gs, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, map::STACK_TOP as u32)?;
    a.lidt(ptr(d.real_idtr))?;
    r.print(&mut a, d.back)?;

    // A software interrupt through our own IVT entry.
    let ivt = u32::from(VECTOR) * 4;
    a.mov(word_ptr(ivt), CODE16_HANDLER as u32)?;
    a.mov(word_ptr(ivt + 2), 0u32)?;
    a.mov(ax, INT_INPUT)?;
    a.int(u32::from(VECTOR))?;
    a.mov(word_ptr(d.int_slot), ax)?;

    // Segment:offset: the marker through ES = DATA >> 4.
    a.mov(ax, u32::from(REAL_MODE_SEGMENT))?;
    a.mov(es, ax)?;
    a.mov(eax, dword_ptr(d.marker_slot - map::DATA as u32).es())?;
    a.mov(dword_ptr(d.marker_read_slot), eax)?;
    a.xor(ax, ax)?;
    a.mov(es, ax)?;

    // CMOS RAM through ports 0x70/0x71.
    asm::emit_outb(&mut a, 0x70, CMOS_REGISTER)?;
    asm::emit_outb(&mut a, 0x71, CMOS_VALUE)?;
    asm::emit_outb(&mut a, 0x70, CMOS_REGISTER)?;
    asm::emit_inb(&mut a, 0x71)?;
    a.mov(byte_ptr(d.cmos_slot), al)?;

    // A word sum with lodsw.
    let mut next = a.create_label();
    a.cld()?;
    a.mov(si, d.words)?;
    a.mov(cx, u32::from(WORDS))?;
    a.xor(bx, bx)?;
    a.set_label(&mut next)?;
    a.lodsw()?;
    a.add(bx, ax)?;
    a.loop_(next)?;
    a.mov(word_ptr(d.sum_slot), bx)?;

    // CR0.PE as real mode sees it.
    a.smsw(ax)?;
    a.and(ax, 1)?;
    a.mov(word_ptr(d.pe_slot), ax)?;

    // Forward again.
    a.lgdt(ptr(d.gdtr))?;
    enter_protected_mode(&mut a, CODE32_SECOND)?;
    r.emit(&mut a)?;
    Ok(asm::assemble(&mut a, CODE16_REAL)?.blob)
}

/// 0x9800: `int 0x40` in real mode adds one to AX.
fn interrupt_handler() -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    a.add(ax, 1)?;
    a.iret()?;
    Ok(asm::assemble(&mut a, CODE16_HANDLER)?.blob)
}

/// 0x8800: protected mode again; print and check the results.
fn second_protected_visit(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let r = Routines::new(&mut a);
    let mut bad = a.create_label();
    load_flat_segments(&mut a)?;
    r.print(&mut a, d.again)?;
    let values = [
        (d.int_label, d.int_slot, 4, INT_INPUT + 1),
        (d.marker_label, d.marker_read_slot, 8, MARKER),
        (d.cmos_label, d.cmos_slot, 2, u32::from(CMOS_VALUE)),
        (d.sum_label, d.sum_slot, 4, (1..=u32::from(WORDS)).sum()),
        (d.pe_label, d.pe_slot, 1, 0),
    ];
    for (label, slot, digits, _) in values {
        r.print(&mut a, label)?;
        a.mov(eax, dword_ptr(slot))?;
        r.print_hex(&mut a, digits)?;
    }
    r.print(&mut a, d.line_end)?;
    for (_, slot, _, want) in values {
        a.cmp(dword_ptr(slot), want)?;
        a.jne(bad)?;
    }
    r.print(&mut a, d.ok)?;
    asm::emit_halt(&mut a)?;
    a.set_label(&mut bad)?;
    r.print(&mut a, d.bad)?;
    asm::emit_halt(&mut a)?;
    r.emit(&mut a)?;
    Ok(asm::assemble(&mut a, CODE32_SECOND)?.blob)
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
            include_str!("../../golden/real-mode-return.serial.txt"),
            expected_serial()
        );
    }
}
