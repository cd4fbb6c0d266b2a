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

/// A switch in front of some interrupt sources: while closed, their lines
/// are held de-asserted and what they drive is only remembered; opening it
/// drives each line to its source's current level again. The HPET's legacy
/// replacement closes the gate in front of the PIT's IRQ0 and the RTC's
/// IRQ8.
#[derive(Default)]
pub struct IrqGate {
    closed: std::sync::atomic::AtomicBool,
    lines: std::sync::Mutex<Vec<std::sync::Weak<GatedInner>>>,
}

struct GatedInner {
    gate: std::sync::Arc<IrqGate>,
    /// The line behind the gate and the level its source drives.
    line: std::sync::Mutex<(Box<dyn IrqLine>, bool)>,
}

/// A source's line through an [`IrqGate`].
pub struct GatedLine(std::sync::Arc<GatedInner>);

impl IrqGate {
    pub fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(IrqGate::default())
    }

    /// `line` behind this gate.
    pub fn line(self: &std::sync::Arc<Self>, line: Box<dyn IrqLine>) -> GatedLine {
        let inner = std::sync::Arc::new(GatedInner {
            gate: self.clone(),
            line: std::sync::Mutex::new((line, false)),
        });
        let mut v = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(std::sync::Arc::downgrade(&inner));
        GatedLine(inner)
    }

    pub fn closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Close (or open) the gate; a change re-drives every line behind it.
    pub fn set_closed(&self, closed: bool) {
        if self
            .closed
            .swap(closed, std::sync::atomic::Ordering::AcqRel)
            == closed
        {
            return;
        }
        let lines: Vec<_> = self
            .lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|w| w.upgrade())
            .collect();
        for l in lines {
            let g = l.line.lock().unwrap_or_else(|e| e.into_inner());
            if g.1 {
                g.0.set_level(!closed);
            }
        }
    }
}

impl IrqLine for GatedLine {
    fn set_level(&self, level: bool) {
        let mut g = self.0.line.lock().unwrap_or_else(|e| e.into_inner());
        g.1 = level;
        if !self.0.gate.closed() {
            g.0.set_level(level);
        }
    }
}

#[cfg(test)]
mod gate_tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Probe(Arc<Mutex<Vec<bool>>>);
    impl IrqLine for Probe {
        fn set_level(&self, level: bool) {
            self.0.lock().unwrap().push(level);
        }
    }

    #[test]
    fn a_closed_gate_holds_lines_low_and_opening_restores_their_level() {
        let gate = IrqGate::new();
        let p = Probe::default();
        let l = gate.line(Box::new(p.clone()));
        l.set_level(true);
        gate.set_closed(true);
        l.set_level(false);
        l.set_level(true);
        gate.set_closed(true);
        gate.set_closed(false);
        l.set_level(false);
        assert_eq!(*p.0.lock().unwrap(), vec![true, false, true, false]);
    }
}
