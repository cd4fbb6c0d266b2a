//! Abstract interrupt lines.
//!
//! A device raises or lowers its output through an [`IrqLine`]; what the line
//! is wired to (a PIC pin, an IOAPIC pin, nothing) is the machine's business.

/// The output pin of a device's interrupt logic.
pub trait IrqLine: Send {
    /// Drive the line to `level` (true = asserted).
    fn set_level(&self, level: bool);
}

/// A line wired to nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullIrq;

impl IrqLine for NullIrq {
    fn set_level(&self, _level: bool) {}
}
