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

/// One interrupt input shared by several sources, electrically a wired-OR
/// (PCI INTx lines are shared; on a PC they are active-low open-drain, so
/// the line is asserted while any device pulls it). Each source gets its
/// own [`IrqLine`] from [`SharedLine::source`]; the input sees a change
/// only when the OR of all sources changes, so lowering one source leaves
/// the line asserted while another still holds it.
pub struct SharedLine {
    /// Number of sources asserting the line, and the input it drives.
    asserted: std::sync::Mutex<u32>,
    input: Box<dyn Fn(bool) + Send + Sync>,
}

impl SharedLine {
    /// A line driving `input` with the OR of its sources.
    pub fn new(input: Box<dyn Fn(bool) + Send + Sync>) -> std::sync::Arc<Self> {
        std::sync::Arc::new(SharedLine {
            asserted: std::sync::Mutex::new(0),
            input,
        })
    }

    /// A new source on the line (de-asserted).
    pub fn source(self: &std::sync::Arc<Self>) -> LineSource {
        LineSource {
            line: self.clone(),
            level: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether any source asserts the line.
    pub fn level(&self) -> bool {
        *self.asserted.lock().unwrap_or_else(|e| e.into_inner()) > 0
    }
}

/// One device's connection to a [`SharedLine`].
pub struct LineSource {
    line: std::sync::Arc<SharedLine>,
    level: std::sync::atomic::AtomicBool,
}

impl IrqLine for LineSource {
    fn set_level(&self, level: bool) {
        // The count and the input change under one lock, so concurrent
        // sources cannot reorder the input's transitions.
        let mut n = self.line.asserted.lock().unwrap_or_else(|e| e.into_inner());
        if self.level.swap(level, std::sync::atomic::Ordering::Relaxed) == level {
            // Edge sources re-driving their level (a pulse's second half
            // after a restore): only a change counts.
            if level && *n > 0 {
                // Re-asserting an asserted line is how an edge source
                // pulses; pass it on so edge-triggered inputs see it.
                (self.line.input)(true);
            }
            return;
        }
        let before = *n > 0;
        if level {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
        }
        let after = *n > 0;
        if before != after {
            (self.line.input)(after);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn line() -> (Arc<SharedLine>, Arc<Mutex<Vec<bool>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (
            SharedLine::new(Box::new(move |l| s.lock().unwrap().push(l))),
            seen,
        )
    }

    #[test]
    fn the_line_stays_asserted_until_the_last_source_lowers_it() {
        let (line, seen) = line();
        let a = line.source();
        let b = line.source();
        a.set_level(true);
        b.set_level(true);
        a.set_level(false);
        assert!(line.level(), "b still holds the line");
        assert_eq!(*seen.lock().unwrap(), vec![true]);
        b.set_level(false);
        assert!(!line.level());
        assert_eq!(*seen.lock().unwrap(), vec![true, false]);
        // Lowering an already-low source changes nothing.
        a.set_level(false);
        assert_eq!(*seen.lock().unwrap(), vec![true, false]);
    }
}
