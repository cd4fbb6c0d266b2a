//! `long-mode`: the demo guest `duet run` boots by default. Climbs from
//! 16-bit real mode through 32-bit protected mode into 64-bit long mode,
//! printing a line in each.
//!
//! - Real mode: program the UART, print, `lgdt`, set CR0.PE and far-jump
//!   to 32-bit code.
//! - 32-bit protected mode (flat segments): print, build 4-level page
//!   tables (0 .. 2 MiB identity-mapped with 4 KiB pages, plus a 2 MiB page
//!   mapping virtual 0x4000_0000 to physical 0), set CR4.PAE, CR3,
//!   EFER.LME (WRMSR), CR0.PG, far-jump to 64-bit code.
//! - 64-bit long mode: print, compute fib(90) with 64-bit registers and
//!   print it in decimal (64-bit DIV) and hex, print a line read through the
//!   2 MiB alias mapping, then `cli; hlt`.
//!
//! Memory map (see [`super::asm`] for the shared one):
//!
//! ```text
//! 0x0000_0500  GDT                   0x0000_6000 .. 0x7000  stack
//! 0x0000_1000 .. 0x0000_6000  page tables, built by the 32-bit code
//! 0x0000_7c00  16-bit code (entry: CS=0, IP=0x7c00)
//! 0x0000_8000  32-bit code           0x0000_9000  64-bit code
//! 0x0000_a000  data: GDTR, strings, decimal-conversion buffer
//! ```

use iced_x86::code_asm::*;

use super::asm::{self, map, selector, DataBlock, GuestProgram, Routines};
use super::GuestImage;

pub const NAME: &str = "long-mode";
pub const DESCRIPTION: &str =
    "real mode -> 32-bit protected mode -> 64-bit long mode, printing in each (the default)";

const REAL_MODE_LINE: &str = "long-mode: hello from 16-bit real mode\r\n";
const PROTECTED_MODE_LINE: &str =
    "long-mode: now in 32-bit protected mode, building 4-level page tables\r\n";
const LONG_MODE_LINE: &str = "long-mode: now in 64-bit long mode\r\n";
const FIB_PREFIX: &str = "long-mode: fib(90) = ";
const FIB_MIDDLE: &str = " = 0x";
const FIB_SUFFIX: &str = " (64-bit arithmetic)\r\n";
const ALIAS_LINE: &str =
    "long-mode: this line was read through a 2 MiB page at virtual 0x40000000\r\n";
const DONE_LINE: &str = "long-mode: all modes reached, halting\r\n";

/// The Fibonacci number the 64-bit code computes (it needs 62 bits).
const FIB_INDEX: u32 = 90;

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("long-mode guest assembles")
}

struct Strings {
    gdtr: u32,
    real_mode: u32,
    protected_mode: u32,
    long_mode: u32,
    fib_prefix: u32,
    fib_middle: u32,
    fib_suffix: u32,
    alias_line: u32,
    done: u32,
    /// One past the last digit slot of the decimal buffer (holds the NUL).
    decimal_end: u32,
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let gdt_limit = (asm::GDT_DESCRIPTORS.len() * 8 - 1) as u16;
    let strings = Strings {
        gdtr: data.table_register(map::GDT, gdt_limit),
        real_mode: data.cstr(REAL_MODE_LINE),
        protected_mode: data.cstr(PROTECTED_MODE_LINE),
        long_mode: data.cstr(LONG_MODE_LINE),
        fib_prefix: data.cstr(FIB_PREFIX),
        fib_middle: data.cstr(FIB_MIDDLE),
        fib_suffix: data.cstr(FIB_SUFFIX),
        alias_line: data.cstr(ALIAS_LINE),
        done: data.cstr(DONE_LINE),
        // u64::MAX has 20 decimal digits; one more byte for the NUL.
        decimal_end: data.zeroed(21, 1) + 20,
    };

    let code16 = real_mode_stage(&strings)?;
    let code32 = protected_mode_stage(&strings)?;
    let code64 = long_mode_stage(&strings)?;

    Ok(GuestProgram {
        code: vec![code16, code32, code64],
        data: vec![asm::gdt_blob(), data.finish()],
        work_areas: vec![
            (map::PML4, map::PAGE_TABLES_END, "page tables"),
            (map::STACK_BOTTOM, map::STACK_TOP, "stack"),
        ],
        entry: asm::real_mode_entry(),
    })
}

fn real_mode_stage(strings: &Strings) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    let routines = Routines::new(&mut a);
    asm::emit_real_mode_prologue(&mut a)?;
    asm::emit_uart_init(&mut a)?;
    routines.print(&mut a, strings.real_mode)?;
    asm::emit_load_gdt(&mut a, strings.gdtr)?;
    asm::emit_enter_protected_mode(&mut a)?;
    routines.emit(&mut a)?;
    Ok(asm::assemble(&mut a, map::CODE16)?.blob)
}

fn protected_mode_stage(strings: &Strings) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let routines = Routines::new(&mut a);
    asm::emit_load_flat_segments(&mut a)?;
    routines.print(&mut a, strings.protected_mode)?;
    asm::emit_build_page_tables(&mut a)?;
    asm::emit_enable_long_mode(&mut a)?;
    // Paging is on and EFER.LMA is set: this is compatibility mode until
    // CS is reloaded with the 64-bit code selector.
    a.jmp_far(selector::CODE64, map::CODE64 as u32)?;
    routines.emit(&mut a)?;
    Ok(asm::assemble(&mut a, map::CODE32)?.blob)
}

fn long_mode_stage(strings: &Strings) -> Result<asm::CodeBlob, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let routines = Routines::new(&mut a);
    let mut print_decimal = a.create_label();

    asm::emit_load_flat_segments(&mut a)?;
    routines.print(&mut a, strings.long_mode)?;

    // fib(90) in R12: (RAX, RDX) = (F(i), F(i+1)), R8 the 64-bit sum.
    let mut fib_step = a.create_label();
    a.xor(eax, eax)?;
    a.mov(edx, 1)?;
    a.mov(ecx, FIB_INDEX)?;
    a.set_label(&mut fib_step)?;
    a.lea(r8, ptr(rax + rdx))?;
    a.mov(rax, rdx)?;
    a.mov(rdx, r8)?;
    a.dec(ecx)?;
    a.jnz(fib_step)?;
    a.mov(r12, rax)?;

    routines.print(&mut a, strings.fib_prefix)?;
    a.mov(rax, r12)?;
    a.call(print_decimal)?;
    routines.print(&mut a, strings.fib_middle)?;
    a.mov(rax, r12)?;
    routines.print_hex(&mut a, 16)?;
    routines.print(&mut a, strings.fib_suffix)?;

    // Read this string through the 2 MiB page at virtual 1 GiB.
    let alias = u32::try_from(map::ALIAS_BASE + u64::from(strings.alias_line))
        .expect("alias address fits 32 bits");
    routines.print(&mut a, alias)?;
    routines.print(&mut a, strings.done)?;
    asm::emit_halt(&mut a)?;

    // print_decimal: RAX in decimal, digits stored backwards with 64-bit
    // DIV by 10. Clobbers RAX, RBX, RDX, RSI, RDI.
    let mut next_digit = a.create_label();
    a.set_label(&mut print_decimal)?;
    a.mov(ebx, 10)?;
    a.mov(edi, strings.decimal_end)?;
    a.set_label(&mut next_digit)?;
    a.xor(edx, edx)?;
    a.div(rbx)?;
    a.add(dl, i32::from(b'0'))?;
    a.dec(rdi)?;
    a.mov(byte_ptr(rdi), dl)?;
    a.test(rax, rax)?;
    a.jnz(next_digit)?;
    a.mov(rsi, rdi)?;
    a.jmp(routines.print_str)?;

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
    fn golden_is_built_from_the_guest_strings() {
        let (mut previous, mut current) = (0u64, 1u64);
        for _ in 0..FIB_INDEX {
            (previous, current) = (current, previous + current);
        }
        let expected = format!(
            "{REAL_MODE_LINE}{PROTECTED_MODE_LINE}{LONG_MODE_LINE}\
             {FIB_PREFIX}{previous}{FIB_MIDDLE}{previous:016x}{FIB_SUFFIX}\
             {ALIAS_LINE}{DONE_LINE}"
        );
        assert_eq!(expected, include_str!("../../golden/long-mode.serial.txt"));
    }
}
