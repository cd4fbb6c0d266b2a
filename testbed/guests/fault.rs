//! `fault`: takes four exceptions on purpose in 64-bit ring 0, through its
//! own IDT, and returns from each with `iretq`:
//!
//! - #UD: `ud2`;
//! - #GP: loading DS with selector 0x40, beyond the GDT limit (error code
//!   0x40);
//! - #PF: a byte write to 0x123456, whose 4 KiB page the real-mode code
//!   left not present (error code 0x2: write, not present; CR2 = 0x123456);
//! - #DE: `div ecx` with ECX = 0.
//!
//! Before each faulting instruction the code stores the instruction's
//! address and its resume address (both from labels, via RIP-relative
//! `lea`) in two slots. The handler prints the vector, the error code when
//! the vector has one, CR2 for #PF, checks the saved RIP against the first
//! slot, then replaces the saved RIP with the resume address and returns.
//! An exception nobody armed stops the guest.
//!
//! Memory map (see [`super::asm`] for the shared one):
//!
//! ```text
//! 0x0000_0500  GDT                   0x0000_6000 .. 0x7000  stack
//! 0x0000_1000 .. 0x0000_6000  page tables, built by the 16-bit code
//! 0x0000_7c00  16-bit code (entry: CS=0, IP=0x7c00)
//! 0x0000_9000  64-bit code           0x0000_a000  data: GDTR, IDTR, strings, slots
//! 0x0000_b000 .. 0x0000_c000  IDT, built by the 64-bit code
//! 0x0012_3000 .. 0x0012_4000  the page left unmapped
//! ```

use iced_x86::code_asm::*;

use super::asm::{self, map, DataBlock, GuestProgram, IdtBuilder, Routines};
use super::GuestImage;

pub const NAME: &str = "fault";
pub const DESCRIPTION: &str =
    "64-bit long mode: takes #UD, #GP, #PF and #DE through its own IDT and returns from each";

/// The address the #PF test writes; its page is not present.
pub const UNMAPPED_ADDRESS: u64 = 0x12_3456;
/// A selector past the GDT limit.
pub const BAD_SELECTOR: u16 = 0x40;

// The #PF target's PTE is in PT_LOW (which covers 0 .. 2 MiB), away from
// everything the guest uses; the bad selector is past the GDT's end.
const _: () = assert!(UNMAPPED_ADDRESS < 2 << 20 && UNMAPPED_ADDRESS >= map::LOW_MEMORY_END);
const _: () = assert!(BAD_SELECTOR as usize >= asm::GDT_DESCRIPTORS.len() * 8);

const VECTOR_DE: u8 = 0;
const VECTOR_UD: u8 = 6;
const VECTOR_GP: u8 = 13;
const VECTOR_PF: u8 = 14;
/// Exceptions that push an error code (bit n set for vector n).
const ERROR_CODE_VECTORS: u32 = (1 << 8)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 13)
    | (1 << 14)
    | (1 << 17)
    | (1 << 21)
    | (1 << 29)
    | (1 << 30);
const EXCEPTIONS_TAKEN: u32 = 4;

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("fault guest assembles")
}

struct Data {
    gdtr: u32,
    idtr: u32,
    header: u32,
    vector_prefix: u32,
    space: u32,
    error_prefix: u32,
    cr2_prefix: u32,
    expected_rip: u32,
    unexpected_rip: u32,
    line_end: u32,
    unexpected_exception: u32,
    all_handled: u32,
    not_all_handled: u32,
    name_de: u32,
    name_ud: u32,
    name_gp: u32,
    name_pf: u32,
    /// Address of the instruction expected to fault next (0: none).
    fault_rip_slot: u32,
    /// Where the handler resumes (0: no exception expected).
    resume_rip_slot: u32,
    handled_count: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let addresses = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        header: data.cstr("fault: in 64-bit long mode, raising #UD, #GP, #PF and #DE\r\n"),
        vector_prefix: data.cstr("fault: vector 0x"),
        space: data.cstr(" "),
        error_prefix: data.cstr(" error 0x"),
        cr2_prefix: data.cstr(" cr2 0x"),
        expected_rip: data.cstr(" at the expected rip\r\n"),
        unexpected_rip: data.cstr(" at unexpected rip 0x"),
        line_end: data.cstr("\r\n"),
        unexpected_exception: data.cstr("fault: unexpected exception, stopping\r\n"),
        all_handled: data.cstr("fault: all 4 exceptions handled\r\n"),
        not_all_handled: data.cstr("fault: not every exception was handled\r\n"),
        name_de: data.cstr("#DE (divide error)"),
        name_ud: data.cstr("#UD (invalid opcode)"),
        name_gp: data.cstr("#GP (general protection)"),
        name_pf: data.cstr("#PF (page fault)"),
        fault_rip_slot: data.zeroed(8, 8),
        resume_rip_slot: data.zeroed(8, 8),
        handled_count: data.zeroed(4, 4),
    };

    let mut a = CodeAssembler::new(16)?;
    asm::emit_real_mode_prologue(&mut a)?;
    asm::emit_uart_init(&mut a)?;
    asm::emit_build_page_tables(&mut a)?;
    // Leave the page holding UNMAPPED_ADDRESS not present.
    let unmapped_pte = map::PT_LOW + ((UNMAPPED_ADDRESS >> 12) & 0x1ff) * 8;
    a.mov(dword_ptr(unmapped_pte), 0)?;
    asm::emit_real_mode_to_long_mode(&mut a, addresses.gdtr)?;
    let code16 = asm::assemble(&mut a, map::CODE16)?.blob;

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

/// Store the addresses of `fault_at` and `resume_at` in the slots.
/// Clobbers RAX.
fn arm(
    a: &mut CodeAssembler,
    addresses: &Data,
    fault_at: CodeLabel,
    resume_at: CodeLabel,
) -> Result<(), IcedError> {
    a.lea(rax, ptr(fault_at))?;
    a.mov(qword_ptr(addresses.fault_rip_slot), rax)?;
    a.lea(rax, ptr(resume_at))?;
    a.mov(qword_ptr(addresses.resume_rip_slot), rax)
}

fn long_mode_code(addresses: &Data) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut stub_de = a.create_label();
    let mut stub_ud = a.create_label();
    let mut stub_gp = a.create_label();
    let mut stub_pf = a.create_label();
    let mut common_handler = a.create_label();

    asm::emit_load_flat_segments(&mut a)?;
    routines.print(&mut a, addresses.header)?;
    idt.emit_load(
        &mut a,
        addresses.idtr,
        None,
        [
            (VECTOR_DE, stub_de),
            (VECTOR_UD, stub_ud),
            (VECTOR_GP, stub_gp),
            (VECTOR_PF, stub_pf),
        ],
    )?;

    // #UD
    let mut ud_at = a.create_label();
    let mut ud_resume = a.create_label();
    arm(&mut a, addresses, ud_at, ud_resume)?;
    a.set_label(&mut ud_at)?;
    a.ud2()?;
    a.set_label(&mut ud_resume)?;

    // #GP: the selector is past the GDT limit.
    let mut gp_at = a.create_label();
    let mut gp_resume = a.create_label();
    arm(&mut a, addresses, gp_at, gp_resume)?;
    a.mov(eax, u32::from(BAD_SELECTOR))?;
    a.set_label(&mut gp_at)?;
    a.mov(ds, ax)?;
    a.set_label(&mut gp_resume)?;

    // #PF: write to the page that is not present.
    let mut pf_at = a.create_label();
    let mut pf_resume = a.create_label();
    arm(&mut a, addresses, pf_at, pf_resume)?;
    a.set_label(&mut pf_at)?;
    a.mov(byte_ptr(UNMAPPED_ADDRESS), 1)?;
    a.set_label(&mut pf_resume)?;

    // #DE: divide by zero.
    let mut de_at = a.create_label();
    let mut de_resume = a.create_label();
    arm(&mut a, addresses, de_at, de_resume)?;
    a.mov(eax, 1234)?;
    a.xor(edx, edx)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut de_at)?;
    a.div(ecx)?;
    a.set_label(&mut de_resume)?;

    let mut not_all_handled = a.create_label();
    a.cmp(dword_ptr(addresses.handled_count), EXCEPTIONS_TAKEN)?;
    a.jne(not_all_handled)?;
    routines.print(&mut a, addresses.all_handled)?;
    asm::emit_halt(&mut a)?;
    a.set_label(&mut not_all_handled)?;
    routines.print(&mut a, addresses.not_all_handled)?;
    asm::emit_halt(&mut a)?;

    // Stubs give every exception the same frame: [rsp] vector, [rsp+8]
    // name, [rsp+16] error code (0 pushed for vectors without one), then
    // the CPU's RIP, CS, RFLAGS, RSP, SS.
    for (label, vector, name) in [
        (&mut stub_de, VECTOR_DE, addresses.name_de),
        (&mut stub_ud, VECTOR_UD, addresses.name_ud),
        (&mut stub_gp, VECTOR_GP, addresses.name_gp),
        (&mut stub_pf, VECTOR_PF, addresses.name_pf),
    ] {
        a.set_label(label)?;
        if ERROR_CODE_VECTORS & (1 << vector) == 0 {
            a.push(0)?;
        }
        // `push imm32` (sign-extended to 64 bits): the data lies below 2 GiB.
        a.push(i32::try_from(name).expect("data address fits an imm32"))?;
        a.push(i32::from(vector))?;
        a.jmp(common_handler)?;
    }

    const SAVED: [AsmRegister64; 6] = [rax, rbx, rcx, rdx, rsi, rdi];
    const FRAME: i32 = SAVED.len() as i32 * 8;
    const VECTOR: i32 = FRAME;
    const NAME: i32 = FRAME + 8;
    const ERROR_CODE: i32 = FRAME + 16;
    const SAVED_RIP: i32 = FRAME + 24;
    let mut no_error_code = a.create_label();
    let mut no_cr2 = a.create_label();
    let mut wrong_rip = a.create_label();
    let mut unexpected = a.create_label();

    a.set_label(&mut common_handler)?;
    for register in SAVED {
        a.push(register)?;
    }
    routines.print(&mut a, addresses.vector_prefix)?;
    a.mov(rax, qword_ptr(rsp + VECTOR))?;
    routines.print_hex(&mut a, 2)?;
    routines.print(&mut a, addresses.space)?;
    a.mov(rsi, qword_ptr(rsp + NAME))?;
    a.call(routines.print_str)?;

    a.mov(eax, dword_ptr(rsp + VECTOR))?;
    a.mov(edx, ERROR_CODE_VECTORS)?;
    a.bt(edx, eax)?;
    a.jnc(no_error_code)?;
    routines.print(&mut a, addresses.error_prefix)?;
    a.mov(rax, qword_ptr(rsp + ERROR_CODE))?;
    routines.print_hex(&mut a, 8)?;
    a.set_label(&mut no_error_code)?;

    a.cmp(qword_ptr(rsp + VECTOR), i32::from(VECTOR_PF))?;
    a.jne(no_cr2)?;
    routines.print(&mut a, addresses.cr2_prefix)?;
    a.mov(rax, cr2)?;
    routines.print_hex(&mut a, 16)?;
    a.set_label(&mut no_cr2)?;

    a.mov(rax, qword_ptr(rsp + SAVED_RIP))?;
    a.cmp(rax, qword_ptr(addresses.fault_rip_slot))?;
    a.jne(wrong_rip)?;
    routines.print(&mut a, addresses.expected_rip)?;
    a.mov(rax, qword_ptr(addresses.resume_rip_slot))?;
    a.test(rax, rax)?;
    a.jz(unexpected)?;
    a.mov(qword_ptr(rsp + SAVED_RIP), rax)?;
    a.xor(eax, eax)?;
    a.mov(qword_ptr(addresses.fault_rip_slot), rax)?;
    a.mov(qword_ptr(addresses.resume_rip_slot), rax)?;
    a.inc(dword_ptr(addresses.handled_count))?;
    for register in SAVED.iter().rev() {
        a.pop(*register)?;
    }
    // Drop vector, name and error code.
    a.add(rsp, 24)?;
    a.iretq()?;

    a.set_label(&mut wrong_rip)?;
    routines.print(&mut a, addresses.unexpected_rip)?;
    a.mov(rax, qword_ptr(rsp + SAVED_RIP))?;
    routines.print_hex(&mut a, 16)?;
    routines.print(&mut a, addresses.line_end)?;
    a.set_label(&mut unexpected)?;
    routines.print(&mut a, addresses.unexpected_exception)?;
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
}
