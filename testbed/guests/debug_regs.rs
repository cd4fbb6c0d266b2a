//! `debug-regs`: debug-register breakpoints in 64-bit ring 0, counted by
//! the guest's own #DB handler.
//!
//! In turn, each with DR7 set for it alone (and cleared after):
//!
//! 1. an instruction breakpoint (DR0, R/W 00) on a `nop`: a fault, the
//!    handler returns with RF set in the image so the `nop` then runs;
//! 2. a write watchpoint (DR1, 4 bytes): a read of the watched dword first
//!    (no #DB), then a write (a trap after it);
//! 3. a read/write watchpoint (DR2, 8 bytes) hit by a 64-bit read;
//! 4. general detect (DR7.GD): `mov rax, dr0` faults with DR6.BD, the
//!    handler's entry cleared GD, so the MOV succeeds when retried;
//! 5. single-step and the DR1 write watchpoint on the same instruction
//!    (TF set by POPFQ): one #DB reporting BS and B1.
//!
//! The handler prints DR6 (bits 0–3 and 13–15), checks the saved RIP
//! against the address the code armed (the instruction for faults, the
//! next one for traps), clears DR6 and the saved TF, sets the saved RF,
//! and returns with `iretq`.
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

use super::asm::{self, map, DataBlock, GuestProgram, IdtBuilder, Routines};
use super::GuestImage;

pub const NAME: &str = "debug-regs";
pub const DESCRIPTION: &str = "64-bit long mode: instruction breakpoint, write and read/write watchpoints, general detect, single-step with a watchpoint; counts its #DBs";

const VECTOR_DB: u8 = 1;
const DEBUG_EXCEPTIONS: u32 = 5;
/// DR6 bits the guest prints: B0-B3, BD, BS, BT.
const DR6_REPORTED: u32 = 0xe00f;
const RFLAGS_TF: i32 = 1 << 8;
const RFLAGS_RF: i32 = 1 << 16;

/// DR7 for breakpoint `n`: local enable, R/W and LEN fields.
const fn dr7_bits(n: u32, rw: u32, len_code: u32) -> u32 {
    (1 << (2 * n)) | (rw << (16 + 4 * n)) | (len_code << (18 + 4 * n))
}
const DR7_EXEC_DR0: u32 = dr7_bits(0, 0, 0);
const DR7_WRITE4_DR1: u32 = dr7_bits(1, 1, 3);
const DR7_RW8_DR2: u32 = dr7_bits(2, 3, 2);
const DR7_GD: u32 = 1 << 13;

/// Everything the guest writes to COM1.
pub const EXPECTED_SERIAL: &str = "debug-regs: in 64-bit long mode\r\n\
debug-regs: instruction breakpoint (DR0)\r\n\
debug-regs: #DB dr6 0x0001 at the expected rip\r\n\
debug-regs: write watchpoint (DR1, 4 bytes): a read, then a write\r\n\
debug-regs: #DB dr6 0x0002 at the expected rip\r\n\
debug-regs: read/write watchpoint (DR2, 8 bytes)\r\n\
debug-regs: #DB dr6 0x0004 at the expected rip\r\n\
debug-regs: general detect (DR7.GD), mov rax, dr0\r\n\
debug-regs: #DB dr6 0x2000 at the expected rip\r\n\
debug-regs: single-step and the DR1 watchpoint on one instruction\r\n\
debug-regs: #DB dr6 0x4002 at the expected rip\r\n\
debug-regs: 5 debug exceptions, as expected\r\n";

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("debug-regs guest assembles")
}

struct Data {
    gdtr: u32,
    idtr: u32,
    header: u32,
    case_exec: u32,
    case_write: u32,
    case_rw: u32,
    case_gd: u32,
    case_step: u32,
    db_prefix: u32,
    expected_rip: u32,
    unexpected_rip: u32,
    line_end: u32,
    all_taken: u32,
    count_wrong: u32,
    /// The address the next #DB must report (0: none expected).
    expect_rip_slot: u32,
    /// The data the watchpoints watch.
    watched: u32,
    db_count: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let addresses = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        header: data.cstr("debug-regs: in 64-bit long mode\r\n"),
        case_exec: data.cstr("debug-regs: instruction breakpoint (DR0)\r\n"),
        case_write: data
            .cstr("debug-regs: write watchpoint (DR1, 4 bytes): a read, then a write\r\n"),
        case_rw: data.cstr("debug-regs: read/write watchpoint (DR2, 8 bytes)\r\n"),
        case_gd: data.cstr("debug-regs: general detect (DR7.GD), mov rax, dr0\r\n"),
        case_step: data
            .cstr("debug-regs: single-step and the DR1 watchpoint on one instruction\r\n"),
        db_prefix: data.cstr("debug-regs: #DB dr6 0x"),
        expected_rip: data.cstr(" at the expected rip\r\n"),
        unexpected_rip: data.cstr(" at unexpected rip 0x"),
        line_end: data.cstr("\r\n"),
        all_taken: data.cstr("debug-regs: 5 debug exceptions, as expected\r\n"),
        count_wrong: data.cstr("debug-regs: wrong number of debug exceptions\r\n"),
        expect_rip_slot: data.zeroed(8, 8),
        watched: data.zeroed(16, 16),
        db_count: data.zeroed(4, 4),
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

/// Expect the next #DB to report `at`. Clobbers RAX.
fn expect(a: &mut CodeAssembler, addresses: &Data, at: CodeLabel) -> Result<(), IcedError> {
    a.lea(rax, ptr(at))?;
    a.mov(qword_ptr(addresses.expect_rip_slot), rax)
}

/// DR7 = `value`. Clobbers RAX.
fn set_dr7(a: &mut CodeAssembler, value: u32) -> Result<(), IcedError> {
    a.mov(eax, value)?;
    a.mov(dr7, rax)
}

fn long_mode_code(addresses: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut db_handler = a.create_label();

    asm::emit_load_flat_segments(&mut a)?;
    routines.print(&mut a, addresses.header)?;
    idt.emit_load(&mut a, addresses.idtr, None, [(VECTOR_DB, db_handler)])?;
    a.xor(eax, eax)?;
    a.mov(dr6, rax)?;

    // 1. Instruction breakpoint: a fault before the NOP.
    routines.print(&mut a, addresses.case_exec)?;
    let mut bp_target = a.create_label();
    a.lea(rax, ptr(bp_target))?;
    a.mov(dr0, rax)?;
    expect(&mut a, addresses, bp_target)?;
    set_dr7(&mut a, DR7_EXEC_DR0)?;
    a.set_label(&mut bp_target)?;
    a.nop()?;
    set_dr7(&mut a, 0)?;

    // 2. Write watchpoint: a read does not trigger it, a write does (a
    // trap: RIP after the write).
    routines.print(&mut a, addresses.case_write)?;
    a.mov(eax, addresses.watched)?;
    a.mov(dr1, rax)?;
    set_dr7(&mut a, DR7_WRITE4_DR1)?;
    a.mov(ecx, dword_ptr(addresses.watched))?;
    let mut after_write = a.create_label();
    expect(&mut a, addresses, after_write)?;
    a.mov(dword_ptr(addresses.watched), 1)?;
    a.set_label(&mut after_write)?;
    set_dr7(&mut a, 0)?;

    // 3. Read/write watchpoint, 8 bytes, hit by a read of its upper half.
    routines.print(&mut a, addresses.case_rw)?;
    a.mov(eax, addresses.watched)?;
    a.mov(dr2, rax)?;
    set_dr7(&mut a, DR7_RW8_DR2)?;
    let mut after_read = a.create_label();
    expect(&mut a, addresses, after_read)?;
    a.mov(ecx, dword_ptr(addresses.watched + 4))?;
    a.set_label(&mut after_read)?;
    set_dr7(&mut a, 0)?;

    // 4. General detect: the MOV from DR0 faults; the handler's entry
    // cleared GD, so it runs when the handler returns to it.
    routines.print(&mut a, addresses.case_gd)?;
    let mut gd_at = a.create_label();
    expect(&mut a, addresses, gd_at)?;
    set_dr7(&mut a, DR7_GD)?;
    a.set_label(&mut gd_at)?;
    a.mov(rax, dr0)?;

    // 5. Single-step (TF from POPFQ traps after the next instruction) and
    // the write watchpoint on that same instruction: one #DB.
    routines.print(&mut a, addresses.case_step)?;
    set_dr7(&mut a, DR7_WRITE4_DR1)?;
    let mut after_step = a.create_label();
    expect(&mut a, addresses, after_step)?;
    a.pushfq()?;
    a.or(qword_ptr(rsp), RFLAGS_TF)?;
    a.popfq()?;
    a.mov(dword_ptr(addresses.watched), 2)?;
    a.set_label(&mut after_step)?;
    set_dr7(&mut a, 0)?;

    let mut count_wrong = a.create_label();
    a.cmp(dword_ptr(addresses.db_count), DEBUG_EXCEPTIONS)?;
    a.jne(count_wrong)?;
    routines.print(&mut a, addresses.all_taken)?;
    asm::emit_halt(&mut a)?;
    a.set_label(&mut count_wrong)?;
    routines.print(&mut a, addresses.count_wrong)?;
    asm::emit_halt(&mut a)?;

    // The #DB handler. Frame after the saves: RIP, CS, RFLAGS.
    const SAVED: [AsmRegister64; 6] = [rax, rbx, rcx, rdx, rsi, rdi];
    const SAVED_RIP: i32 = SAVED.len() as i32 * 8;
    const SAVED_RFLAGS: i32 = SAVED_RIP + 16;
    let mut wrong_rip = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut db_handler)?;
    for register in SAVED {
        a.push(register)?;
    }
    a.inc(dword_ptr(addresses.db_count))?;
    routines.print(&mut a, addresses.db_prefix)?;
    a.mov(rax, dr6)?;
    a.and(eax, DR6_REPORTED)?;
    routines.print_hex(&mut a, 4)?;
    a.mov(rax, qword_ptr(rsp + SAVED_RIP))?;
    a.cmp(rax, qword_ptr(addresses.expect_rip_slot))?;
    a.jne(wrong_rip)?;
    routines.print(&mut a, addresses.expected_rip)?;
    a.jmp(done)?;
    a.set_label(&mut wrong_rip)?;
    routines.print(&mut a, addresses.unexpected_rip)?;
    a.mov(rax, qword_ptr(rsp + SAVED_RIP))?;
    routines.print_hex(&mut a, 16)?;
    routines.print(&mut a, addresses.line_end)?;
    a.set_label(&mut done)?;
    a.xor(eax, eax)?;
    a.mov(qword_ptr(addresses.expect_rip_slot), rax)?;
    a.mov(dr6, rax)?;
    a.and(qword_ptr(rsp + SAVED_RFLAGS), !RFLAGS_TF)?;
    a.or(qword_ptr(rsp + SAVED_RFLAGS), RFLAGS_RF)?;
    for register in SAVED.iter().rev() {
        a.pop(*register)?;
    }
    a.iretq()?;

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
            include_str!("../../golden/debug-regs.serial.txt"),
            EXPECTED_SERIAL
        );
    }
}
