//! Architectural exceptions, carried through the interpreter in `Result`.

use std::fmt;

pub const DE: u8 = 0;
pub const DB: u8 = 1;
pub const NMI: u8 = 2;
pub const BP: u8 = 3;
pub const OF: u8 = 4;
pub const BR: u8 = 5;
pub const UD: u8 = 6;
pub const NM: u8 = 7;
pub const DF: u8 = 8;
pub const TS: u8 = 10;
pub const NP: u8 = 11;
pub const SS: u8 = 12;
pub const GP: u8 = 13;
pub const PF: u8 = 14;
pub const MF: u8 = 16;
pub const AC: u8 = 17;
pub const MC: u8 = 18;
pub const XM: u8 = 19;

/// A fault or trap raised by an instruction. `#PF` has already written CR2
/// by the time one of these exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exception {
    pub vector: u8,
    pub error_code: Option<u32>,
}

impl Exception {
    #[inline]
    pub const fn new(vector: u8) -> Self {
        Exception {
            vector,
            error_code: None,
        }
    }
    #[inline]
    pub const fn with_code(vector: u8, code: u32) -> Self {
        Exception {
            vector,
            error_code: Some(code),
        }
    }
    pub const fn ud() -> Self {
        Self::new(UD)
    }
    pub const fn de() -> Self {
        Self::new(DE)
    }
    pub const fn gp(code: u32) -> Self {
        Self::with_code(GP, code)
    }
    pub const fn gp0() -> Self {
        Self::with_code(GP, 0)
    }
    pub const fn ss(code: u32) -> Self {
        Self::with_code(SS, code)
    }
    pub const fn np(code: u32) -> Self {
        Self::with_code(NP, code)
    }
    pub const fn ts(code: u32) -> Self {
        Self::with_code(TS, code)
    }
    pub const fn nm() -> Self {
        Self::new(NM)
    }

    /// Exception classes for the double-fault rules (SDM vol. 3, table 6-5).
    pub fn class(vector: u8) -> Class {
        match vector {
            DE | TS | NP | SS | GP => Class::Contributory,
            PF => Class::PageFault,
            DF => Class::DoubleFault,
            _ => Class::Benign,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Benign,
    Contributory,
    PageFault,
    DoubleFault,
}

impl fmt::Display for Exception {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.vector {
            DE => "#DE",
            DB => "#DB",
            NMI => "NMI",
            BP => "#BP",
            OF => "#OF",
            BR => "#BR",
            UD => "#UD",
            NM => "#NM",
            DF => "#DF",
            TS => "#TS",
            NP => "#NP",
            SS => "#SS",
            GP => "#GP",
            PF => "#PF",
            MF => "#MF",
            AC => "#AC",
            MC => "#MC",
            XM => "#XM",
            _ => "vector",
        };
        write!(f, "{name}({})", self.vector)?;
        if let Some(c) = self.error_code {
            write!(f, " error code {c:#x}")?;
        }
        Ok(())
    }
}

/// Does this vector push an error code when raised as an exception?
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, DF | TS | NP | SS | GP | PF | AC) || vector == 21
}

pub type XResult<T> = Result<T, Exception>;
