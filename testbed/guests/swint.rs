//! `swint`: software interrupts in ring 0 under long mode, each returning
//! with `iretq`: `int3` (vector 3) and `int 0x40` from 64-bit code, and
//! `into` (vector 4) with OF set. INTO is invalid in 64-bit code, so the
//! guest far-jumps to a 32-bit compatibility-mode segment for it (after
//! first checking that `into` with OF clear does not trap) and far-jumps
//! back. All three are traps: the handler checks that the saved RIP is the
//! address after the instruction (stored in a slot beforehand), prints the
//! vector and the interrupted CS, and returns.
//!
//! On KVM-PVM the host's instruction emulator refuses `int3`, `int n` and
//! `into` in ring 0; duet's KVM backend runs those instructions on its
//! interpreter instead (three fallbacks per run). This guest exists to exercise that path;
//! its output is the same on every backend.
//!
//! Memory map (see [`super::asm`] for the shared one):
//!
//! ```text
//! 0x0000_0500  GDT                   0x0000_6000 .. 0x7000  stack
//! 0x0000_1000 .. 0x0000_6000  page tables, built by the 16-bit code
//! 0x0000_7c00  16-bit code (entry: CS=0, IP=0x7c00)
//! 0x0000_8000  32-bit compatibility-mode code (CS=0x18)
//! 0x0000_9000  64-bit code           0x0000_a000  data: GDTR, IDTR, strings, slots
//! 0x0000_b000 .. 0x0000_c000  IDT, built by the 64-bit code
//! ```

use iced_x86::code_asm::*;

use super::asm::{self, map, selector, DataBlock, GuestProgram, IdtBuilder, Routines};
use super::GuestImage;

pub const NAME: &str = "swint";
pub const DESCRIPTION: &str =
    "64-bit ring 0: int3, int 0x40 and into (from compatibility mode), each returning with iretq";

const VECTOR_BP: u8 = 3;
const VECTOR_OF: u8 = 4;
const VECTOR_SOFTWARE: u8 = 0x40;
const INTERRUPTS_TAKEN: u32 = 3;

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("swint guest assembles")
}

struct Data {
    gdtr: u32,
    idtr: u32,
    compatibility_mode_entry: u32,
    header: u32,
    vector_prefix: u32,
    name_prefix: u32,
    cs_prefix: u32,
    expected_rip: u32,
    unexpected_rip: u32,
    line_end: u32,
    all_returned: u32,
    not_all_returned: u32,
    name_bp: u32,
    name_of: u32,
    name_software: u32,
    /// Where the next interrupt must return (0: none expected).
    return_rip_slot: u32,
    taken_count: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let idt_limit = (map::IDT_END - map::IDT - 1) as u16;
    let addresses = Data {
        gdtr: data.table_register(map::GDT, gdt_limit),
        idtr: data.table_register(map::IDT, idt_limit),
        compatibility_mode_entry: data.far_pointer(selector::CODE32, map::CODE32 as u32),
        header: data.cstr(
            "swint: in 64-bit long mode: int3 and int 0x40 from 64-bit code, into from compatibility mode\r\n",
        ),
        vector_prefix: data.cstr("swint: vector 0x"),
        name_prefix: data.cstr(" ("),
        cs_prefix: data.cstr(") from cs 0x"),
        expected_rip: data.cstr(", returning to the expected rip\r\n"),
        unexpected_rip: data.cstr(", unexpected return rip 0x"),
        line_end: data.cstr("\r\n"),
        all_returned: data.cstr("swint: all 3 software interrupts returned\r\n"),
        not_all_returned: data.cstr("swint: not every software interrupt was taken\r\n"),
        name_bp: data.cstr("int3, #BP"),
        name_of: data.cstr("into, #OF"),
        name_software: data.cstr("int 0x40"),
        return_rip_slot: data.zeroed(8, 8),
        taken_count: data.zeroed(4, 4),
    };

    let code16 = asm::long_mode_entry(addresses.gdtr, false)?;

    let (code64, back_in_long_mode) = long_mode_code(&addresses)?;
    // The compatibility-mode code stores the address after its `into`,
    // which is known once it is assembled: assemble twice (the store's
    // encoding does not depend on the value).
    let (_, after_into) = compatibility_mode_code(&addresses, 0, back_in_long_mode)?;
    let (code32, after_into_again) =
        compatibility_mode_code(&addresses, after_into, back_in_long_mode)?;
    assert_eq!(
        after_into, after_into_again,
        "compatibility-mode code layout is stable"
    );

    Ok(GuestProgram {
        code: vec![code16, code32, code64],
        data: vec![asm::gdt_blob(), data.finish()],
        work_areas: vec![
            (map::PML4, map::PAGE_TABLES_END, "page tables"),
            (map::STACK_BOTTOM, map::STACK_TOP, "stack"),
            (map::IDT, map::IDT_END, "IDT"),
        ],
        entry: asm::real_mode_entry(),
    })
}

/// Store the address of `return_to` in the return slot. Clobbers RAX.
fn expect_return_to(
    a: &mut CodeAssembler,
    addresses: &Data,
    return_to: CodeLabel,
) -> Result<(), IcedError> {
    a.lea(rax, ptr(return_to))?;
    a.mov(qword_ptr(addresses.return_rip_slot), rax)
}

/// The 64-bit code and the address the compatibility-mode code jumps back to.
fn long_mode_code(addresses: &Data) -> Result<(asm::CodeBlob, u32), IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let idt = IdtBuilder::new(&mut a);
    let mut stub_bp = a.create_label();
    let mut stub_of = a.create_label();
    let mut stub_software = a.create_label();
    let mut common_handler = a.create_label();

    asm::emit_load_flat_segments(&mut a)?;
    routines.print(&mut a, addresses.header)?;
    idt.emit_load(
        &mut a,
        addresses.idtr,
        None,
        [
            (VECTOR_BP, stub_bp),
            (VECTOR_OF, stub_of),
            (VECTOR_SOFTWARE, stub_software),
        ],
    )?;

    let mut after_int3 = a.create_label();
    expect_return_to(&mut a, addresses, after_int3)?;
    a.int3()?;
    a.set_label(&mut after_int3)?;

    let mut after_int_n = a.create_label();
    expect_return_to(&mut a, addresses, after_int_n)?;
    a.int(i32::from(VECTOR_SOFTWARE))?;
    a.set_label(&mut after_int_n)?;

    // `into` runs in compatibility mode, which jumps back here.
    let mut back_in_long_mode = a.create_label();
    a.jmp(fword_ptr(addresses.compatibility_mode_entry))?;
    a.set_label(&mut back_in_long_mode)?;

    let mut not_all_returned = a.create_label();
    a.cmp(dword_ptr(addresses.taken_count), INTERRUPTS_TAKEN)?;
    a.jne(not_all_returned)?;
    routines.print(&mut a, addresses.all_returned)?;
    asm::emit_halt(&mut a)?;
    a.set_label(&mut not_all_returned)?;
    routines.print(&mut a, addresses.not_all_returned)?;
    asm::emit_halt(&mut a)?;

    // Stubs: [rsp] vector, [rsp+8] name, then the CPU's RIP, CS, RFLAGS,
    // RSP, SS.
    for (label, vector, name) in [
        (&mut stub_bp, VECTOR_BP, addresses.name_bp),
        (&mut stub_of, VECTOR_OF, addresses.name_of),
        (&mut stub_software, VECTOR_SOFTWARE, addresses.name_software),
    ] {
        a.set_label(label)?;
        // `push imm32` (sign-extended to 64 bits): the data lies below 2 GiB.
        a.push(i32::try_from(name).expect("data address fits an imm32"))?;
        a.push(i32::from(vector))?;
        a.jmp(common_handler)?;
    }

    const SAVED: [AsmRegister64; 6] = [rax, rbx, rcx, rdx, rsi, rdi];
    const FRAME: i32 = SAVED.len() as i32 * 8;
    const VECTOR: i32 = FRAME;
    const NAME: i32 = FRAME + 8;
    const SAVED_RIP: i32 = FRAME + 16;
    const SAVED_CS: i32 = FRAME + 24;
    let mut wrong_rip = a.create_label();

    a.set_label(&mut common_handler)?;
    for register in SAVED {
        a.push(register)?;
    }
    routines.print(&mut a, addresses.vector_prefix)?;
    a.mov(rax, qword_ptr(rsp + VECTOR))?;
    routines.print_hex(&mut a, 2)?;
    routines.print(&mut a, addresses.name_prefix)?;
    a.mov(rsi, qword_ptr(rsp + NAME))?;
    a.call(routines.print_str)?;
    routines.print(&mut a, addresses.cs_prefix)?;
    a.mov(rax, qword_ptr(rsp + SAVED_CS))?;
    routines.print_hex(&mut a, 4)?;

    a.mov(rax, qword_ptr(rsp + SAVED_RIP))?;
    a.cmp(rax, qword_ptr(addresses.return_rip_slot))?;
    a.jne(wrong_rip)?;
    routines.print(&mut a, addresses.expected_rip)?;
    a.mov(qword_ptr(addresses.return_rip_slot), 0)?;
    a.inc(dword_ptr(addresses.taken_count))?;
    for register in SAVED.iter().rev() {
        a.pop(*register)?;
    }
    // Drop vector and name.
    a.add(rsp, 16)?;
    a.iretq()?;

    a.set_label(&mut wrong_rip)?;
    routines.print(&mut a, addresses.unexpected_rip)?;
    a.mov(rax, qword_ptr(rsp + SAVED_RIP))?;
    routines.print_hex(&mut a, 16)?;
    routines.print(&mut a, addresses.line_end)?;
    asm::emit_halt(&mut a)?;

    idt.emit(&mut a)?;
    routines.emit(&mut a)?;
    let assembled = asm::assemble(&mut a, map::CODE64)?;
    let back = u32::try_from(assembled.label_address(&back_in_long_mode))
        .expect("64-bit code lies below 4 GiB");
    Ok((assembled.blob, back))
}

/// The compatibility-mode code at [`map::CODE32`] and the address after its
/// trapping `into` (`after_into` is the value it stores as the expected
/// return address).
fn compatibility_mode_code(
    addresses: &Data,
    after_into: u32,
    back_in_long_mode: u32,
) -> Result<(asm::CodeBlob, u32), IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let slot_low = u64::from(addresses.return_rip_slot);
    let slot_high = slot_low + 4;

    // OF clear: `into` must not trap (the slot holds 0, so a trap would
    // be reported as an unexpected return address).
    a.mov(dword_ptr(slot_low), 0)?;
    a.mov(dword_ptr(slot_high), 0)?;
    a.xor(eax, eax)?;
    CodeAssembler::into(&mut a)?;

    // OF set: 0x7f + 1 overflows a signed byte.
    let mut after_trapping_into = a.create_label();
    a.mov(dword_ptr(slot_low), after_into)?;
    a.mov(al, 0x7f)?;
    a.add(al, 1)?;
    CodeAssembler::into(&mut a)?;
    a.set_label(&mut after_trapping_into)?;
    a.jmp_far(selector::CODE64, back_in_long_mode)?;

    let assembled = asm::assemble(&mut a, map::CODE32)?;
    let after = u32::try_from(assembled.label_address(&after_trapping_into))
        .expect("32-bit code lies below 4 GiB");
    Ok((assembled.blob, after))
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
    fn interrupt_instructions_are_where_the_guest_needs_them() {
        use iced_x86::{Decoder, DecoderOptions, Mnemonic};
        let program = program();
        let mnemonics = |bitness: u32| -> Vec<Mnemonic> {
            program
                .code
                .iter()
                .filter(|c| c.bitness == bitness)
                .flat_map(|c| {
                    Decoder::with_ip(c.bitness, &c.bytes, c.addr, DecoderOptions::NONE)
                        .into_iter()
                        .map(|i| i.mnemonic())
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let long_mode = mnemonics(64);
        assert!(long_mode.contains(&Mnemonic::Int3));
        assert!(long_mode.contains(&Mnemonic::Int));
        assert!(long_mode.contains(&Mnemonic::Iretq));
        let compatibility_mode = mnemonics(32);
        assert_eq!(
            compatibility_mode
                .iter()
                .filter(|&&m| m == Mnemonic::Into)
                .count(),
            2
        );
    }
}
