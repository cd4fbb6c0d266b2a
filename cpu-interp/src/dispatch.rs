//! The dispatch table: one handler per iced-x86 `Code`.
//!
//! Each instruction module registers its handlers in [`build`]; every `Code`
//! without a handler raises #UD (logged once per form).

use std::sync::OnceLock;

use iced_x86::{Code, EncodingKind, Mnemonic};

use crate::block::Insn;
use crate::cpu::Cpu;
use crate::exception::{Exception, XResult};
use crate::platform::Platform;

/// An instruction's semantics.
pub type Handler = fn(&mut Cpu, &mut dyn Platform, &Insn) -> XResult<()>;

/// The table under construction.
pub struct Table {
    handlers: Vec<Handler>,
    by_mnemonic: Vec<Vec<Code>>,
}

impl Table {
    /// Register `h` for `code`.
    pub fn set(&mut self, code: Code, h: Handler) {
        self.handlers[code as usize] = h;
    }

    /// Register `h` for every code in `codes`.
    pub fn set_all(&mut self, codes: &[Code], h: Handler) {
        for &c in codes {
            self.set(c, h);
        }
    }

    /// Register `h` for every legacy-encoded (non-VEX/EVEX) form of
    /// `mnemonic`. Returns how many codes were set.
    pub fn set_mnemonic(&mut self, mnemonic: Mnemonic, h: Handler) -> usize {
        let mut n = 0;
        for &c in self.by_mnemonic[mnemonic as usize].iter() {
            self.handlers[c as usize] = h;
            n += 1;
        }
        n
    }

    /// The legacy-encoded codes of `mnemonic`.
    pub fn codes(&self, mnemonic: Mnemonic) -> &[Code] {
        &self.by_mnemonic[mnemonic as usize]
    }

    pub fn is_set(&self, code: Code) -> bool {
        self.handlers[code as usize] as *const () != unimplemented as *const ()
    }
}

/// Raise #UD for an instruction the interpreter does not implement.
pub fn unimplemented(cpu: &mut Cpu, _p: &mut dyn Platform, d: &Insn) -> XResult<()> {
    cpu.note_unimplemented(&d.i);
    Err(Exception::ud())
}

/// #UD without logging (invalid encodings, UD0/1/2).
pub fn invalid(_cpu: &mut Cpu, _p: &mut dyn Platform, _d: &Insn) -> XResult<()> {
    Err(Exception::ud())
}

fn build() -> Vec<Handler> {
    let mut by_mnemonic: Vec<Vec<Code>> = vec![Vec::new(); Mnemonic::values().len()];
    for c in Code::values() {
        if c.encoding() == EncodingKind::Legacy {
            by_mnemonic[c.mnemonic() as usize].push(c);
        }
    }
    let mut t = Table {
        handlers: vec![unimplemented as Handler; Code::values().len()],
        by_mnemonic,
    };
    t.set(Code::INVALID, invalid);
    crate::insn::register_all(&mut t);
    t.handlers
}

/// The table, built on first use.
pub fn table() -> &'static [Handler] {
    static TABLE: OnceLock<Vec<Handler>> = OnceLock::new();
    TABLE.get_or_init(build)
}

/// Is `code` implemented by the interpreter?
pub fn implemented(code: Code) -> bool {
    table()[code as usize] as *const () != unimplemented as *const ()
}
