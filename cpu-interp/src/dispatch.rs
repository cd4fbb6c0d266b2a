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
    vex_by_mnemonic: Vec<Vec<Code>>,
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

    /// Register `h` for every VEX-encoded form of `mnemonic`. Returns how
    /// many codes were set.
    pub fn set_vex(&mut self, mnemonic: Mnemonic, h: Handler) -> usize {
        let codes = std::mem::take(&mut self.vex_by_mnemonic[mnemonic as usize]);
        for &c in &codes {
            self.handlers[c as usize] = h;
        }
        let n = codes.len();
        self.vex_by_mnemonic[mnemonic as usize] = codes;
        n
    }

    /// The VEX-encoded codes of `mnemonic`.
    pub fn vex_codes(&self, mnemonic: Mnemonic) -> &[Code] {
        &self.vex_by_mnemonic[mnemonic as usize]
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
    let mut vex_by_mnemonic: Vec<Vec<Code>> = vec![Vec::new(); Mnemonic::values().len()];
    for c in Code::values() {
        match c.encoding() {
            EncodingKind::Legacy => by_mnemonic[c.mnemonic() as usize].push(c),
            EncodingKind::VEX => vex_by_mnemonic[c.mnemonic() as usize].push(c),
            _ => {}
        }
    }
    let mut t = Table {
        handlers: vec![unimplemented as Handler; Code::values().len()],
        by_mnemonic,
        vex_by_mnemonic,
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

/// The [`crate::cpuid::feat`] bits each `Code` needs (0: always there).
/// LZCNT and TZCNT are not gated: without their extension they execute
/// as BSR and BSF, as on processors that lack them.
pub fn required_features() -> &'static [crate::cpuid::Features] {
    static REQ: OnceLock<Vec<crate::cpuid::Features>> = OnceLock::new();
    REQ.get_or_init(|| {
        use crate::cpuid::feat;
        use iced_x86::CpuidFeature as F;
        Code::values()
            .map(|c| {
                if matches!(c.mnemonic(), Mnemonic::Lzcnt | Mnemonic::Tzcnt) {
                    return 0;
                }
                let features = c.cpuid_features();
                // A VEX form of an extension duet does not model (VAES,
                // VPCLMULQDQ, AVX-VNNI, GFNI, ...) is never executed.
                let unknown_vex = c.encoding() == EncodingKind::VEX
                    && features.iter().any(|f| {
                        !matches!(
                            f,
                            F::AVX
                                | F::AVX2
                                | F::FMA
                                | F::F16C
                                | F::BMI1
                                | F::BMI2
                                | F::AES
                                | F::PCLMULQDQ
                        )
                    });
                if unknown_vex {
                    return feat::UNSUPPORTED;
                }
                features.iter().fold(0, |acc, f| {
                    acc | match f {
                        F::SSE3 => feat::SSE3,
                        F::SSSE3 => feat::SSSE3,
                        F::CMPXCHG16B => feat::CX16,
                        F::POPCNT => feat::POPCNT,
                        F::SSE4_1 => feat::SSE4_1,
                        F::SSE4_2 => feat::SSE4_2,
                        F::XSAVE => feat::XSAVE,
                        F::XSAVEOPT => feat::XSAVEOPT,
                        F::XSAVEC => feat::XSAVEC,
                        F::XSAVES => feat::XSAVES,
                        F::AVX => feat::AVX,
                        F::AVX2 => feat::AVX2,
                        F::FMA => feat::FMA,
                        F::F16C => feat::F16C,
                        F::BMI1 => feat::BMI1,
                        F::BMI2 => feat::BMI2,
                        F::MOVBE => feat::MOVBE,
                        F::AES => feat::AES,
                        F::PCLMULQDQ => feat::PCLMULQDQ,
                        _ => 0,
                    }
                })
            })
            .collect()
    })
}

impl Cpu {
    /// The handler for `code` on this CPU: #UD for an instruction of an
    /// extension its model lacks.
    #[inline]
    pub(crate) fn handler_for(&self, code: Code) -> Handler {
        let c = code as usize;
        if required_features()[c] & !self.feat != 0 {
            invalid
        } else {
            table()[c]
        }
    }
}

/// Is `code` implemented by the interpreter?
pub fn implemented(code: Code) -> bool {
    table()[code as usize] as *const () != unimplemented as *const ()
}
