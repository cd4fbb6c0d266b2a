//! `hello-real`: the smallest guest. Stays in 16-bit real mode, programs
//! the UART and prints one line.
//!
//! ```text
//! 0x0000_6000 .. 0x0000_7000  stack (SS:SP = 0:0x7000)
//! 0x0000_7c00                 16-bit code (entry: CS=0, IP=0x7c00)
//! 0x0000_a000                 data: the message
//! ```
//!
//! Serial output: `Hello from real mode!\r\n`, then `cli; hlt`.

use iced_x86::code_asm::*;

use super::asm::{self, map, DataBlock, GuestProgram, Routines};
use super::GuestImage;

pub const NAME: &str = "hello-real";
pub const DESCRIPTION: &str = "16-bit real mode: programs the UART and prints one line";
/// Everything the guest writes to COM1.
pub const EXPECTED_SERIAL: &str = "Hello from real mode!\r\n";

pub fn build() -> GuestImage {
    program().into_image()
}

pub fn program() -> GuestProgram {
    assemble_program().expect("hello-real guest assembles")
}

fn assemble_program() -> Result<GuestProgram, IcedError> {
    let mut data = DataBlock::new(map::DATA);
    let message = data.cstr(EXPECTED_SERIAL);

    let mut a = CodeAssembler::new(16)?;
    let routines = Routines::new(&mut a);
    asm::emit_real_mode_prologue(&mut a)?;
    asm::emit_uart_init(&mut a)?;
    routines.print(&mut a, message)?;
    asm::emit_halt(&mut a)?;
    routines.emit(&mut a)?;
    let code16 = asm::assemble(&mut a, map::CODE16)?;

    Ok(GuestProgram {
        code: vec![code16.blob],
        data: vec![data.finish()],
        work_areas: vec![(map::STACK_BOTTOM, map::STACK_TOP, "stack")],
        entry: asm::real_mode_entry(),
    })
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
