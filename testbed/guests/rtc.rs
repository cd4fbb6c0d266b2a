//! `rtc`: the MC146818 real-time clock's interrupts through the slave PIC,
//! and a date read, in 64-bit long mode.
//!
//! The PICs are initialised as Linux does (vectors 0x20 / 0x28) with only
//! the cascade (master IR2) and IRQ8 (slave IR0) unmasked; the local APIC
//! stays in virtual-wire mode, so the PICs' vectors reach the CPU.
//!
//! 1. **Periodic interrupt.** Register A = 0x27 (time base running, rate
//!    select 7: 512 Hz), register C read once to drop stale flags, register
//!    B = 0x42 (PIE, 24-hour, BCD). The guest waits for exactly
//!    [`INTERRUPTS`] interrupts with `sti; hlt; cmp [count], N; jb`. The
//!    handler reads register C (read-to-clear: IRQ8 drops, so the next
//!    periodic flag is a new edge for the slave) and sends EOIs to the
//!    slave, then the master. The last one first clears PIE (so no further
//!    periodic interrupt can be raised) and returns with IF clear (it edits
//!    the saved RFLAGS). Register C must show PF in every read.
//! 2. **Update-ended interrupt.** Register B = 0x12 (UIE). The guest waits
//!    for the one interrupt with `sti; hlt`; the handler clears UIE, reads
//!    register C (UF must be set) and EOIs slave and master.
//! 3. **Date read.** The classic recipe polls register A until UIP is clear;
//!    that loop's number of reads depends on time, so this guest uses the
//!    data sheet's other method: right after the update-ended interrupt the
//!    time registers are stable for almost a second. It reads register A
//!    once, then seconds, minutes, hours, day of month, month, year and the
//!    century byte (0x32), in BCD, and checks that UIP is clear and each
//!    field is valid BCD in range. It prints only "date fields valid" (or
//!    not): the date itself differs between runs.
//!
//! Register A, register C and the time registers are time-dependent reads
//! (the trace marks them); their values only decide what the final line
//! says, never which devices the guest touches.
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

use super::asm::{self, map, pic, DataBlock, DecimalPrinter, GuestProgram, IdtBuilder, Routines};
use super::GuestImage;

pub const NAME: &str = "rtc";
pub const DESCRIPTION: &str =
    "64-bit long mode: RTC periodic and update-ended interrupts on IRQ8 through the slave PIC; a date read";

/// Periodic interrupts the guest waits for.
pub const INTERRUPTS: u32 = 10;
/// IRQ8's vector: the slave's IR0.
pub const VECTOR: u8 = pic::SLAVE_VECTOR;

const INDEX: u8 = 0x70;
const DATA: u8 = 0x71;
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_DAY_OF_MONTH: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_CENTURY: u8 = 0x32;
/// Register A: divider 010 (32.768 kHz time base), rate select 7 (512 Hz).
pub const REG_A_512HZ: u8 = 0x27;
const A_UIP: u8 = 0x80;
/// Register B: 24-hour mode, BCD.
const B_24H: u8 = 0x02;
const B_PIE: u8 = 0x40;
const B_UIE: u8 = 0x10;
const C_PF: u8 = 0x40;
const C_UF: u8 = 0x10;

/// The date fields read, with the inclusive BCD range each must lie in.
const DATE_FIELDS: [(u8, u8, u8); 7] = [
    (REG_SECONDS, 0x00, 0x59),
    (REG_MINUTES, 0x00, 0x59),
    (REG_HOURS, 0x00, 0x23),
    (REG_DAY_OF_MONTH, 0x01, 0x31),
    (REG_MONTH, 0x01, 0x12),
    (REG_YEAR, 0x00, 0x99),
    (REG_CENTURY, 0x19, 0x29),
];

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("rtc guest assembles")
}

struct Data {
    gdtr: u32,
    idtr: u32,
    header: u32,
    count_prefix: u32,
    pf_ok: u32,
    pf_missing: u32,
    uf_ok: u32,
    uf_missing: u32,
    date_valid: u32,
    date_invalid: u32,
    unexpected: u32,
    count: u32,
    update_count: u32,
    /// AND of register C over the periodic handlers.
    c_and: u32,
    c_update: u32,
    /// Register A, then the date fields in [`DATE_FIELDS`] order.
    reg_a: u32,
    date: u32,
    /// Set to 1 by a failed check.
    invalid: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let d = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        header: data.cstr(&format!(
            "rtc: in 64-bit long mode: periodic interrupt, register A {REG_A_512HZ:#04x} (512 Hz), \
             register B PIE, IRQ8 through the slave PIC (vector {VECTOR:#04x})\r\n"
        )),
        count_prefix: data.cstr("rtc: "),
        pf_ok: data.cstr(
            " periodic interrupts; register C read in each: PF set every time; EOI to slave and master\r\n",
        ),
        pf_missing: data.cstr(
            " periodic interrupts; register C read in each: PF MISSING in some; EOI to slave and master\r\n",
        ),
        uf_ok: data.cstr("rtc: update-ended interrupt (register B UIE): register C had UF set\r\n"),
        uf_missing: data
            .cstr("rtc: update-ended interrupt (register B UIE): register C had NO UF\r\n"),
        date_valid: data.cstr("rtc: date fields valid\r\n"),
        date_invalid: data.cstr("rtc: date fields INVALID\r\n"),
        unexpected: data.cstr("rtc: unexpected interrupt or exception, stopping\r\n"),
        count: data.zeroed(4, 4),
        update_count: data.zeroed(4, 4),
        c_and: data.bytes(&[0xff], 1),
        c_update: data.zeroed(1, 1),
        reg_a: data.zeroed(1, 1),
        date: data.zeroed(DATE_FIELDS.len(), 1),
        invalid: data.zeroed(4, 4),
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

/// Write RTC register `reg`. Clobbers AL.
fn rtc_write(a: &mut CodeAssembler, reg: u8, value: u8) -> Result<(), IcedError> {
    asm::emit_outb(a, INDEX, reg)?;
    asm::emit_outb(a, DATA, value)
}

/// Read RTC register `reg` into AL.
fn rtc_read(a: &mut CodeAssembler, reg: u8) -> Result<(), IcedError> {
    asm::emit_outb(a, INDEX, reg)?;
    asm::emit_inb(a, DATA)
}

/// EOI to the slave, then the master. Clobbers AL.
fn eoi_slave_and_master(a: &mut CodeAssembler) -> Result<(), IcedError> {
    asm::emit_outb(a, pic::SLAVE_COMMAND, pic::EOI)?;
    asm::emit_outb(a, pic::MASTER_COMMAND, pic::EOI)
}

/// Print `ok` when `[slot] & bits == bits`, else `bad`.
fn print_if_bits(
    a: &mut CodeAssembler,
    routines: &Routines,
    slot: u32,
    bits: u8,
    ok: u32,
    bad: u32,
) -> Result<(), IcedError> {
    let mut missing = a.create_label();
    let mut done = a.create_label();
    a.mov(al, byte_ptr(slot))?;
    a.and(al, i32::from(bits))?;
    a.cmp(al, i32::from(bits))?;
    a.jne(missing)?;
    routines.print(a, ok)?;
    a.jmp(done)?;
    a.set_label(&mut missing)?;
    routines.print(a, bad)?;
    a.set_label(&mut done)?;
    Ok(())
}

fn long_mode_code(d: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let decimal = DecimalPrinter::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut unexpected = a.create_label();
    let mut periodic_handler = a.create_label();
    let mut update_handler = a.create_label();
    let mut check_bcd = a.create_label();

    asm::emit_load_flat_segments(&mut a)?;
    routines.print(&mut a, d.header)?;
    idt.emit_load(
        &mut a,
        d.idtr,
        Some(unexpected),
        [(VECTOR, periodic_handler)],
    )?;

    asm::emit_pic_init(&mut a, pic::MASTER_VECTOR, pic::SLAVE_VECTOR)?;
    asm::emit_outb(&mut a, pic::MASTER_DATA, !pic::ICW3_MASTER)?;
    asm::emit_outb(&mut a, pic::SLAVE_DATA, 0xfe)?;

    // 1. Periodic interrupts.
    rtc_write(&mut a, REG_A, REG_A_512HZ)?;
    rtc_read(&mut a, REG_C)?;
    rtc_write(&mut a, REG_B, B_PIE | B_24H)?;
    let mut wait = a.create_label();
    a.set_label(&mut wait)?;
    a.sti()?;
    a.hlt()?;
    a.cmp(dword_ptr(d.count), INTERRUPTS)?;
    a.jb(wait)?;
    a.cli()?;

    // 2. One update-ended interrupt.
    idt.emit_install(&mut a, VECTOR, update_handler)?;
    rtc_write(&mut a, REG_B, B_UIE | B_24H)?;
    let mut wait_update = a.create_label();
    a.set_label(&mut wait_update)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.cmp(dword_ptr(d.update_count), 1)?;
    a.jb(wait_update)?;

    // 3. The date, right after the update.
    rtc_read(&mut a, REG_A)?;
    a.mov(byte_ptr(d.reg_a), al)?;
    for (i, (reg, _, _)) in DATE_FIELDS.iter().enumerate() {
        rtc_read(&mut a, *reg)?;
        a.mov(byte_ptr(u64::from(d.date) + i as u64), al)?;
    }
    asm::emit_pic_mask_all(&mut a)?;

    // Checks (no device access depends on them).
    let mut uip_clear = a.create_label();
    a.test(byte_ptr(d.reg_a), i32::from(A_UIP))?;
    a.jz(uip_clear)?;
    a.mov(dword_ptr(d.invalid), 1)?;
    a.set_label(&mut uip_clear)?;
    for (i, (_, min, max)) in DATE_FIELDS.iter().enumerate() {
        a.mov(al, byte_ptr(u64::from(d.date) + i as u64))?;
        a.mov(cl, i32::from(*min))?;
        a.mov(ch, i32::from(*max))?;
        a.call(check_bcd)?;
    }

    routines.print(&mut a, d.count_prefix)?;
    a.mov(eax, dword_ptr(d.count))?;
    decimal.print(&mut a)?;
    print_if_bits(&mut a, &routines, d.c_and, C_PF, d.pf_ok, d.pf_missing)?;
    print_if_bits(&mut a, &routines, d.c_update, C_UF, d.uf_ok, d.uf_missing)?;
    let mut print_date = a.create_label();
    a.mov(esi, d.date_valid)?;
    a.cmp(dword_ptr(d.invalid), 0)?;
    a.je(print_date)?;
    a.mov(esi, d.date_invalid)?;
    a.set_label(&mut print_date)?;
    a.call(routines.print_str)?;
    asm::emit_halt(&mut a)?;

    // check_bcd: AL must be two BCD digits within [CL, CH]; else set
    // `invalid`. Clobbers AH.
    let mut bad = a.create_label();
    a.set_label(&mut check_bcd)?;
    a.mov(ah, al)?;
    a.and(ah, 0x0f)?;
    a.cmp(ah, 9)?;
    a.ja(bad)?;
    a.mov(ah, al)?;
    a.shr(ah, 4)?;
    a.cmp(ah, 9)?;
    a.ja(bad)?;
    a.cmp(al, cl)?;
    a.jb(bad)?;
    a.cmp(al, ch)?;
    a.ja(bad)?;
    a.ret()?;
    a.set_label(&mut bad)?;
    a.mov(dword_ptr(d.invalid), 1)?;
    a.ret()?;

    // Periodic: [rsp] RAX, then the CPU's frame.
    let mut read_c = a.create_label();
    a.set_label(&mut periodic_handler)?;
    a.push(rax)?;
    a.inc(dword_ptr(d.count))?;
    a.cmp(dword_ptr(d.count), INTERRUPTS)?;
    a.jb(read_c)?;
    rtc_write(&mut a, REG_B, B_24H)?;
    asm::emit_return_with_interrupts_disabled(&mut a, 8)?;
    a.set_label(&mut read_c)?;
    rtc_read(&mut a, REG_C)?;
    a.and(byte_ptr(d.c_and), al)?;
    eoi_slave_and_master(&mut a)?;
    a.pop(rax)?;
    a.iretq()?;

    // Update-ended: UIE off, register C, EOIs.
    a.set_label(&mut update_handler)?;
    a.push(rax)?;
    a.inc(dword_ptr(d.update_count))?;
    rtc_write(&mut a, REG_B, B_24H)?;
    rtc_read(&mut a, REG_C)?;
    a.mov(byte_ptr(d.c_update), al)?;
    eoi_slave_and_master(&mut a)?;
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
    fn rate_select_7_is_512_hz() {
        let rs = u32::from(REG_A_512HZ & 0x0f);
        assert_eq!(1u32 << (16 - rs), 512);
    }

    #[test]
    fn never_polls_register_a() {
        // Register A (UIP) is selected exactly once: `mov al, 0x0a; out 0x70, al`.
        use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind};
        let program = program();
        let code = program.code.iter().find(|c| c.bitness == 64).unwrap();
        let insns: Vec<_> = Decoder::with_ip(64, &code.bytes, code.addr, DecoderOptions::NONE)
            .into_iter()
            .collect();
        let selects_a = insns
            .windows(2)
            .filter(|w| {
                w[0].mnemonic() == Mnemonic::Mov
                    && w[0].op1_kind() == OpKind::Immediate8
                    && w[0].immediate8() == REG_A
                    && w[1].mnemonic() == Mnemonic::Out
                    && w[1].immediate8() == INDEX
            })
            .count();
        // One write of register A, one read.
        assert_eq!(selects_a, 2);
    }
}
