//! The High Precision Event Timer (IA-PC HPET specification 1.0a), as
//! register logic only.
//!
//! # Mapping
//!
//! [`Hpet`] is one [`BusDevice`] for the 1 KiB register block
//! ([`MMIO_SIZE`]) the machine maps at [`DEFAULT_BASE`] and describes in the
//! ACPI `HPET` table. Registers are 64 bits wide and may be read and written
//! with 4- or 8-byte accesses (as the specification says) or narrower ones
//! (handled as a read-modify-write of the bytes written). Offsets that name
//! no register read 0 and drop writes.
//!
//! # Counter and time
//!
//! The main counter runs at [`COUNTER_HZ`] (100 MHz, a period of 10 ns,
//! reported in femtoseconds in the capabilities register) from the VM clock
//! while ENABLE_CNF is set, and holds its value while it is clear. Nothing
//! reads host time: the counter is `counter_base` plus the clock's
//! nanoseconds since `base_ns` divided by 10, so values are exact under
//! `--clock virtual` and [`HpetState`] holds only VM nanoseconds and counts.
//! The counter is 64 bits wide; it may be written only while halted (a
//! write while it runs is dropped and logged, rate-limited).
//!
//! # Timers
//!
//! [`TIMERS`] comparators, each 64-bit capable (SIZE_CAP) and periodic
//! capable (PER_INT_CAP), with no FSB (MSI) delivery. A timer matches when
//! the main counter reaches its comparator (in 32-bit mode, when the
//! counter's low 32 bits do, so a comparator "in the past" matches after
//! the low half wraps, as on hardware). In periodic mode each match adds
//! the period to the comparator; a write to the comparator of a periodic
//! timer sets the period and, only while VAL_SET_CNF is set (which the
//! write clears), the comparator itself - QEMU's reading of the
//! specification, and what Linux's periodic set-up expects. Matches the VMM
//! was late for are merged into one interrupt (the comparator is moved past
//! the counter in one step).
//!
//! * **Edge** timers (INT_TYPE_CNF = 0) pulse their line on a match while
//!   INT_ENB_CNF is set; their status bit stays 0.
//! * **Level** timers set their bit in the general interrupt status
//!   register on a match (whatever INT_ENB_CNF says) and hold their line
//!   asserted while the bit and INT_ENB_CNF are set and the counter is
//!   enabled; writing 1 to the bit clears it.
//!
//! # Routing
//!
//! With LEG_RT_CNF set, timer 0 drives ISA IRQ0 (the 8259's IRQ0 and IOAPIC
//! pin 2) and timer 1 IRQ8, and the machine's PIT and RTC outputs on those
//! lines are cut off through the [`IrqGate`] the HPET closes (QEMU does
//! the same); the other timers, and all of them without LEG_RT_CNF, drive
//! the IOAPIC pin INT_ROUTE_CNF names, which must be one of the pins in
//! INT_ROUTE_CAP (a write naming another keeps the old route, so the value
//! read back differs as the specification says). LEG_RT_CAP is offered only
//! when the machine gives the HPET the legacy lines.
//!
//! Every access first brings the timers up to the clock's now; reads of the
//! main counter and of the status register mark the [`TimeTaint`].

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::clock::{Clock, TimeTaint, Timed};
use crate::irq::{IrqGate, IrqLine};
use crate::ratelimit::RateLimiter;

/// Where PCs put the HPET (and where duet maps it).
pub const DEFAULT_BASE: u64 = 0xfed0_0000;
/// The register block's size.
pub const MMIO_SIZE: u64 = 0x400;
/// Number of comparators.
pub const TIMERS: usize = 3;
/// Main counter frequency.
pub const COUNTER_HZ: u64 = 100_000_000;
/// The counter period in femtoseconds (10 ns).
pub const PERIOD_FS: u64 = 1_000_000_000_000_000 / COUNTER_HZ;
const NS_PER_TICK: u64 = 1_000_000_000 / COUNTER_HZ;
/// Intel's PCI vendor ID, as chipsets (and QEMU) report it.
pub const VENDOR_ID: u64 = 0x8086;
/// The IOAPIC pins a timer can be routed to without legacy replacement:
/// ISA lines no other device of the machine uses.
pub const ROUTE_PINS: [u8; 2] = [10, 11];
/// The ISA IRQs of legacy replacement (timer 0, timer 1).
pub const LEGACY_IRQS: [u8; 2] = [0, 8];

// Register offsets.
pub const REG_CAPABILITIES: u64 = 0x000;
pub const REG_CONFIG: u64 = 0x010;
pub const REG_INT_STATUS: u64 = 0x020;
pub const REG_COUNTER: u64 = 0x0f0;
/// Timer `n`'s registers start at `TIMER_BASE + n * TIMER_STRIDE`.
pub const TIMER_BASE: u64 = 0x100;
pub const TIMER_STRIDE: u64 = 0x20;
pub const TIMER_CONFIG: u64 = 0x00;
pub const TIMER_COMPARATOR: u64 = 0x08;
pub const TIMER_FSB_ROUTE: u64 = 0x10;

// General capabilities.
const CAP_REV_ID: u64 = 0x01;
const CAP_COUNT_SIZE: u64 = 1 << 13;
pub const CAP_LEG_RT: u64 = 1 << 15;

// General configuration.
pub const CFG_ENABLE: u64 = 1 << 0;
pub const CFG_LEGACY: u64 = 1 << 1;
const CFG_WRITABLE: u64 = CFG_ENABLE | CFG_LEGACY;

// Timer configuration.
pub const TN_INT_LEVEL: u64 = 1 << 1;
pub const TN_INT_ENABLE: u64 = 1 << 2;
pub const TN_PERIODIC: u64 = 1 << 3;
pub const TN_PERIODIC_CAP: u64 = 1 << 4;
pub const TN_SIZE_CAP: u64 = 1 << 5;
pub const TN_VAL_SET: u64 = 1 << 6;
pub const TN_32BIT: u64 = 1 << 8;
const TN_ROUTE_SHIFT: u32 = 9;
const TN_ROUTE_MASK: u64 = 0x1f << TN_ROUTE_SHIFT;
const TN_WRITABLE: u64 = TN_INT_LEVEL | TN_INT_ENABLE | TN_PERIODIC | TN_VAL_SET | TN_32BIT;
const TN_CAPS: u64 = TN_PERIODIC_CAP | TN_SIZE_CAP;

/// Matches further away than this (about 58 years at 100 MHz) get no
/// deadline.
const FAR_TICKS: u64 = 1 << 58;

static COUNTER_WRITE_WHILE_RUNNING: RateLimiter = RateLimiter::new(4);

/// One comparator's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HpetTimerState {
    /// The writable configuration bits and the route (capabilities are
    /// computed).
    pub config: u64,
    /// The comparator (in 32-bit mode only its low half is used).
    pub comparator: u64,
    /// The period added on each match in periodic mode.
    pub period: u64,
}

/// The HPET's state, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HpetState {
    /// ENABLE_CNF and LEG_RT_CNF.
    pub config: u64,
    /// Level-triggered timers' status bits.
    pub int_status: u64,
    /// The counter at `base_ns` (its value while halted).
    pub counter_base: u64,
    /// VM time at which the counter had `counter_base`.
    pub base_ns: u64,
    /// The counter value up to which matches have been handled.
    pub synced: u64,
    pub timers: [HpetTimerState; TIMERS],
}

/// Timer 0's and timer 1's legacy-replacement lines (IRQ0, IRQ8).
pub type LegacyLines = [Box<dyn IrqLine>; 2];

/// The lines a timer can drive.
pub struct HpetLines {
    /// Timer 0 → IRQ0 and timer 1 → IRQ8 under legacy replacement (None:
    /// no LEG_RT_CAP), and the gate that cuts the PIT and RTC off meanwhile.
    pub legacy: Option<(LegacyLines, Arc<IrqGate>)>,
    /// For each pin of [`ROUTE_PINS`], one source per timer.
    pub routed: Vec<(u8, [Box<dyn IrqLine>; TIMERS])>,
}

impl HpetLines {
    /// Lines made by `line(isa_irq_or_gsi)` for every destination, with
    /// the legacy lines when `legacy` names the gate.
    pub fn new(legacy: Option<Arc<IrqGate>>, line: impl Fn(u32) -> Box<dyn IrqLine>) -> Self {
        HpetLines {
            legacy: legacy.map(|g| {
                (
                    [
                        line(u32::from(LEGACY_IRQS[0])),
                        line(u32::from(LEGACY_IRQS[1])),
                    ],
                    g,
                )
            }),
            routed: ROUTE_PINS
                .iter()
                .map(|&p| (p, std::array::from_fn(|_| line(u32::from(p)))))
                .collect(),
        }
    }

    /// Lines to nowhere (tests).
    pub fn none() -> Self {
        HpetLines {
            legacy: None,
            routed: Vec::new(),
        }
    }
}

/// Where a timer's interrupt goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    Legacy(usize),
    Routed(usize),
    Nowhere,
}

/// The HPET.
pub struct Hpet {
    clock: Arc<dyn Clock>,
    taint: TimeTaint,
    lines: HpetLines,
    s: HpetState,
    /// The level each timer drives on its destination now.
    driven: [(Dest, bool); TIMERS],
}

impl Hpet {
    pub fn new(clock: Arc<dyn Clock>, taint: TimeTaint, lines: HpetLines) -> Self {
        let mut h = Hpet {
            clock,
            taint,
            lines,
            s: HpetState::default(),
            driven: [(Dest::Nowhere, false); TIMERS],
        };
        h.reset();
        h
    }

    /// The state at power-on: halted at 0, timers disabled, comparators
    /// all ones (as the specification's reset values).
    pub fn reset(&mut self) {
        let now = self.clock.now_ns();
        self.s = HpetState {
            base_ns: now,
            ..HpetState::default()
        };
        for t in &mut self.s.timers {
            t.comparator = u64::MAX;
        }
        self.update_lines();
    }

    pub fn state(&self) -> HpetState {
        self.s.clone()
    }

    /// Restore `s`; the lines are driven to the levels it implies.
    pub fn restore(&mut self, s: &HpetState) {
        self.s = s.clone();
        for t in &mut self.s.timers {
            t.config &= TN_WRITABLE | TN_ROUTE_MASK;
        }
        self.s.config &= CFG_WRITABLE;
        self.update_lines();
    }

    /// The general capabilities and ID register.
    pub fn capabilities(&self) -> u64 {
        let legacy = if self.lines.legacy.is_some() {
            CAP_LEG_RT
        } else {
            0
        };
        PERIOD_FS << 32
            | VENDOR_ID << 16
            | legacy
            | CAP_COUNT_SIZE
            | ((TIMERS as u64 - 1) << 8)
            | CAP_REV_ID
    }

    fn route_cap(&self) -> u64 {
        self.lines
            .routed
            .iter()
            .fold(0u64, |m, (p, _)| m | (1u64 << p))
    }

    fn enabled(&self) -> bool {
        self.s.config & CFG_ENABLE != 0
    }

    fn legacy(&self) -> bool {
        self.s.config & CFG_LEGACY != 0 && self.lines.legacy.is_some()
    }

    /// The main counter at VM time `now`.
    pub fn counter_at(&self, now: u64) -> u64 {
        if self.enabled() {
            self.s
                .counter_base
                .wrapping_add(now.saturating_sub(self.s.base_ns) / NS_PER_TICK)
        } else {
            self.s.counter_base
        }
    }

    /// VM time at which the counter reaches `value` (after the counter now,
    /// modulo 2^64).
    fn time_of(&self, value: u64) -> u64 {
        self.s.base_ns.saturating_add(
            value
                .wrapping_sub(self.s.counter_base)
                .saturating_mul(NS_PER_TICK),
        )
    }

    /// How many ticks after counter value `from` timer `n` next matches
    /// (at least 1; the counter wraps at 2^64, a 32-bit timer's comparator
    /// every 2^32 ticks).
    fn ticks_to_match(&self, n: usize, from: u64) -> u64 {
        let t = &self.s.timers[n];
        if t.config & TN_32BIT != 0 {
            match (t.comparator as u32).wrapping_sub(from as u32) {
                0 => 1 << 32,
                d => u64::from(d),
            }
        } else {
            match t.comparator.wrapping_sub(from) {
                0 => u64::MAX,
                d => d,
            }
        }
    }

    /// Handle every match in (synced, counter(now)], modulo 2^64.
    fn sync(&mut self, now: u64) {
        if !self.enabled() {
            return;
        }
        let to = self.counter_at(now);
        let from = self.s.synced;
        let delta = to.wrapping_sub(from);
        if delta == 0 {
            return;
        }
        for n in 0..TIMERS {
            let d = self.ticks_to_match(n, from);
            if d > delta {
                continue;
            }
            self.fire(n);
            let t = &mut self.s.timers[n];
            if t.config & TN_PERIODIC != 0 {
                // Step the comparator past `to` in one go.
                let period = if t.config & TN_32BIT != 0 {
                    t.period & 0xffff_ffff
                } else {
                    t.period
                };
                if let Some(whole) = (delta - d).checked_div(period) {
                    let x = from.wrapping_add(d);
                    let next = x.wrapping_add((whole + 1).wrapping_mul(period));
                    t.comparator = if t.config & TN_32BIT != 0 {
                        next & 0xffff_ffff
                    } else {
                        next
                    };
                }
            }
        }
        self.s.synced = to;
    }

    fn fire(&mut self, n: usize) {
        let cfg = self.s.timers[n].config;
        if cfg & TN_INT_LEVEL != 0 {
            self.s.int_status |= 1 << n;
            self.update_lines();
        } else if cfg & TN_INT_ENABLE != 0 {
            if let Some(line) = self.line_of(n, self.dest(n)) {
                line.set_level(true);
                line.set_level(false);
            }
        }
    }

    fn dest(&self, n: usize) -> Dest {
        if self.legacy() && n < 2 {
            return Dest::Legacy(n);
        }
        let route = ((self.s.timers[n].config & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT) as u8;
        match self.lines.routed.iter().position(|(p, _)| *p == route) {
            Some(i) => Dest::Routed(i),
            None => Dest::Nowhere,
        }
    }

    fn line_of(&self, n: usize, d: Dest) -> Option<&dyn IrqLine> {
        match d {
            Dest::Legacy(i) => self.lines.legacy.as_ref().map(|(l, _)| l[i].as_ref()),
            Dest::Routed(i) => Some(self.lines.routed[i].1[n].as_ref()),
            Dest::Nowhere => None,
        }
    }

    /// Drive every timer's level-triggered output to what the state says,
    /// and the legacy gate.
    fn update_lines(&mut self) {
        for n in 0..TIMERS {
            let cfg = self.s.timers[n].config;
            let want_dest = self.dest(n);
            let level = self.enabled()
                && cfg & TN_INT_LEVEL != 0
                && cfg & TN_INT_ENABLE != 0
                && self.s.int_status & (1 << n) != 0;
            let (old_dest, old_level) = self.driven[n];
            if old_dest != want_dest && old_level {
                if let Some(l) = self.line_of(n, old_dest) {
                    l.set_level(false);
                }
            }
            let moved_high = old_dest != want_dest && level;
            if moved_high || (old_dest == want_dest && old_level != level) {
                if let Some(l) = self.line_of(n, want_dest) {
                    l.set_level(level);
                }
            }
            self.driven[n] = (want_dest, level);
        }
        if let Some((_, gate)) = &self.lines.legacy {
            gate.set_closed(self.s.config & CFG_LEGACY != 0);
        }
    }

    fn timer_config(&self, n: usize) -> u64 {
        self.s.timers[n].config | TN_CAPS | (self.route_cap() << 32)
    }

    fn read_reg(&mut self, reg: u64, now: u64) -> u64 {
        match reg {
            REG_CAPABILITIES => self.capabilities(),
            REG_CONFIG => self.s.config,
            REG_INT_STATUS => {
                self.taint.mark();
                self.s.int_status
            }
            REG_COUNTER => {
                self.taint.mark();
                self.counter_at(now)
            }
            r if (TIMER_BASE..TIMER_BASE + TIMERS as u64 * TIMER_STRIDE).contains(&r) => {
                let n = ((r - TIMER_BASE) / TIMER_STRIDE) as usize;
                let t = &self.s.timers[n];
                match (r - TIMER_BASE) % TIMER_STRIDE {
                    TIMER_CONFIG => self.timer_config(n),
                    TIMER_COMPARATOR if t.config & TN_32BIT != 0 => t.comparator & 0xffff_ffff,
                    TIMER_COMPARATOR => t.comparator,
                    _ => 0,
                }
            }
            _ => 0,
        }
    }

    /// Write `value` to the bytes of register `reg` selected by `mask`.
    fn write_reg(&mut self, reg: u64, value: u64, mask: u64, now: u64) {
        let merge = |old: u64| (old & !mask) | (value & mask);
        match reg {
            REG_CONFIG => {
                let new = merge(self.s.config) & CFG_WRITABLE;
                let was_enabled = self.enabled();
                // Freeze or restart the counter at its value now.
                let counter = self.counter_at(now);
                self.s.config = new;
                if was_enabled != self.enabled() {
                    self.s.counter_base = counter;
                    self.s.base_ns = now;
                    self.s.synced = counter;
                }
                self.update_lines();
            }
            REG_INT_STATUS => {
                self.s.int_status &= !(value & mask);
                self.update_lines();
            }
            REG_COUNTER => {
                if self.enabled() {
                    if COUNTER_WRITE_WHILE_RUNNING.allow() {
                        log::warn!("hpet: main counter written while it runs; dropped");
                    }
                    return;
                }
                let v = merge(self.s.counter_base);
                self.s.counter_base = v;
                self.s.base_ns = now;
                self.s.synced = v;
            }
            r if (TIMER_BASE..TIMER_BASE + TIMERS as u64 * TIMER_STRIDE).contains(&r) => {
                let n = ((r - TIMER_BASE) / TIMER_STRIDE) as usize;
                match (r - TIMER_BASE) % TIMER_STRIDE {
                    TIMER_CONFIG => self.write_timer_config(n, merge(self.timer_config(n))),
                    TIMER_COMPARATOR => {
                        let old = self.read_reg(r, now);
                        self.write_comparator(n, merge(old));
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn write_timer_config(&mut self, n: usize, value: u64) {
        let cap = self.route_cap();
        let t = &mut self.s.timers[n];
        let route = (value & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT;
        let route_bits = if cap & (1 << route) != 0 {
            value & TN_ROUTE_MASK
        } else {
            t.config & TN_ROUTE_MASK
        };
        let was_32 = t.config & TN_32BIT != 0;
        t.config = (value & TN_WRITABLE) | route_bits;
        if !was_32 && t.config & TN_32BIT != 0 {
            t.comparator &= 0xffff_ffff;
            t.period &= 0xffff_ffff;
        }
        // An edge timer has no status bit.
        if t.config & TN_INT_LEVEL == 0 {
            self.s.int_status &= !(1 << n);
        }
        self.update_lines();
    }

    fn write_comparator(&mut self, n: usize, value: u64) {
        let t = &mut self.s.timers[n];
        let value = if t.config & TN_32BIT != 0 {
            value & 0xffff_ffff
        } else {
            value
        };
        let periodic = t.config & TN_PERIODIC != 0;
        if !periodic || t.config & TN_VAL_SET != 0 {
            t.comparator = value;
        }
        if periodic {
            t.period = value;
        }
        t.config &= !TN_VAL_SET;
    }

    fn access(&mut self, offset: u64, len: usize) -> Option<(u64, u32, u64)> {
        if len == 0 || len > 8 || offset >= MMIO_SIZE {
            return None;
        }
        let reg = offset & !7;
        let shift = ((offset & 7) * 8) as u32;
        if (offset & 7) as usize + len > 8 {
            return None;
        }
        let mask = if len == 8 {
            u64::MAX
        } else {
            ((1u64 << (len * 8)) - 1) << shift
        };
        Some((reg, shift, mask))
    }
}

impl Timed for Hpet {
    fn next_deadline(&self) -> Option<u64> {
        if !self.enabled() {
            return None;
        }
        (0..TIMERS)
            .filter(|&n| self.s.timers[n].config & TN_INT_ENABLE != 0)
            .map(|n| self.ticks_to_match(n, self.s.synced))
            // A 64-bit comparator behind the counter matches after the
            // counter wraps, thousands of years on: no deadline.
            .filter(|&d| d <= FAR_TICKS)
            .map(|d| self.time_of(self.s.synced.wrapping_add(d)))
            .min()
    }

    fn advance(&mut self, now: u64) {
        self.sync(now);
    }
}

impl BusDevice for Hpet {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((reg, shift, _)) = self.access(offset, data.len()) else {
            data.fill(0);
            return;
        };
        let now = self.clock.now_ns();
        self.sync(now);
        let v = self.read_reg(reg, now) >> shift;
        let bytes = v.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some((reg, shift, mask)) = self.access(offset, data.len()) else {
            return;
        };
        let now = self.clock.now_ns();
        self.sync(now);
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(b) << shift;
        self.write_reg(reg, value, mask, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::Mutex;

    /// A line that records its transitions.
    #[derive(Clone, Default)]
    struct Probe(Arc<Mutex<Vec<bool>>>);

    impl IrqLine for Probe {
        fn set_level(&self, level: bool) {
            self.0.lock().unwrap().push(level);
        }
    }

    impl Probe {
        fn take(&self) -> Vec<bool> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
        fn pulses(&self) -> usize {
            self.take().iter().filter(|l| **l).count()
        }
    }

    struct Rig {
        clock: ManualClock,
        hpet: Hpet,
        irq0: Probe,
        irq8: Probe,
        /// Pin 10 (timer 0, 1, 2) and pin 11 sources.
        pin10: [Probe; TIMERS],
        gate: Arc<IrqGate>,
        taint: TimeTaint,
    }

    fn rig() -> Rig {
        let clock = ManualClock::new();
        let taint = TimeTaint::new();
        let irq0 = Probe::default();
        let irq8 = Probe::default();
        let pin10: [Probe; TIMERS] = Default::default();
        let gate = IrqGate::new();
        let lines = HpetLines {
            legacy: Some((
                [Box::new(irq0.clone()), Box::new(irq8.clone())],
                gate.clone(),
            )),
            routed: vec![
                (
                    10,
                    [
                        Box::new(pin10[0].clone()),
                        Box::new(pin10[1].clone()),
                        Box::new(pin10[2].clone()),
                    ],
                ),
                (
                    11,
                    [
                        Box::new(Probe::default()),
                        Box::new(Probe::default()),
                        Box::new(Probe::default()),
                    ],
                ),
            ],
        };
        let hpet = Hpet::new(Arc::new(clock.clone()), taint.clone(), lines);
        Rig {
            clock,
            hpet,
            irq0,
            irq8,
            pin10,
            gate,
            taint,
        }
    }

    impl Rig {
        fn rd(&mut self, off: u64) -> u64 {
            let mut b = [0u8; 8];
            self.hpet.read(off, &mut b);
            u64::from_le_bytes(b)
        }
        fn rd32(&mut self, off: u64) -> u32 {
            let mut b = [0u8; 4];
            self.hpet.read(off, &mut b);
            u32::from_le_bytes(b)
        }
        fn wr(&mut self, off: u64, v: u64) {
            self.hpet.write(off, &v.to_le_bytes());
        }
        fn wr32(&mut self, off: u64, v: u32) {
            self.hpet.write(off, &v.to_le_bytes());
        }
        fn tcfg(n: usize) -> u64 {
            TIMER_BASE + n as u64 * TIMER_STRIDE + TIMER_CONFIG
        }
        fn tcmp(n: usize) -> u64 {
            TIMER_BASE + n as u64 * TIMER_STRIDE + TIMER_COMPARATOR
        }
        /// Run the clock to `ns`, advancing at every deadline on the way
        /// (as the VMM's timer loop does).
        fn run_to(&mut self, ns: u64) {
            while let Some(d) = self.hpet.next_deadline() {
                if d > ns {
                    break;
                }
                self.clock.set(d);
                self.hpet.advance(d);
            }
            self.clock.set(ns);
            self.hpet.advance(ns);
        }
    }

    #[test]
    fn capabilities_describe_three_64bit_timers_at_100mhz_with_legacy_routing() {
        let mut r = rig();
        let cap = r.rd(REG_CAPABILITIES);
        assert_eq!(cap & 0xff, 1, "revision");
        assert_eq!((cap >> 8) & 0x1f, 2, "NUM_TIM_CAP is the last timer");
        assert_ne!(cap & CAP_COUNT_SIZE, 0);
        assert_ne!(cap & CAP_LEG_RT, 0);
        assert_eq!((cap >> 16) & 0xffff, 0x8086);
        assert_eq!(cap >> 32, 10_000_000, "10 ns in fs");
        // The high half alone, as Linux reads it.
        assert_eq!(r.rd32(REG_CAPABILITIES + 4), 10_000_000);
        // The capabilities register is read-only.
        r.wr(REG_CAPABILITIES, 0);
        assert_eq!(r.rd(REG_CAPABILITIES), cap);
        // No legacy lines: no LEG_RT_CAP.
        let h = Hpet::new(
            Arc::new(ManualClock::new()),
            TimeTaint::new(),
            HpetLines::none(),
        );
        assert_eq!(h.capabilities() & CAP_LEG_RT, 0);
    }

    #[test]
    fn reset_values() {
        let mut r = rig();
        assert_eq!(r.rd(REG_CONFIG), 0);
        assert_eq!(r.rd(REG_INT_STATUS), 0);
        assert_eq!(r.rd(REG_COUNTER), 0);
        for n in 0..TIMERS {
            let c = r.rd(Rig::tcfg(n));
            assert_eq!(c & 0xffff_ffff, TN_PERIODIC_CAP | TN_SIZE_CAP);
            assert_eq!(c >> 32, (1 << 10) | (1 << 11), "INT_ROUTE_CAP");
            assert_eq!(r.rd(Rig::tcmp(n)), u64::MAX);
        }
        assert_eq!(r.rd(0x3f8), 0, "unnamed offsets read 0");
    }

    #[test]
    fn counter_halts_runs_at_100mhz_and_is_writable_only_while_halted() {
        let mut r = rig();
        r.clock.set(1_000);
        assert_eq!(r.rd(REG_COUNTER), 0, "halted at reset");
        r.wr(REG_COUNTER, 500);
        assert_eq!(r.rd(REG_COUNTER), 500);
        r.wr(REG_CONFIG, CFG_ENABLE);
        r.clock.set(1_000 + 1_000_000);
        assert_eq!(r.rd(REG_COUNTER), 500 + 100_000, "1 ms is 100000 ticks");
        assert!(r.taint.take(), "counter reads are time-dependent");
        r.wr(REG_COUNTER, 7);
        assert_eq!(r.rd(REG_COUNTER), 100_500, "write while running dropped");
        r.wr(REG_CONFIG, 0);
        r.clock.advance_by(5_000_000);
        assert_eq!(r.rd(REG_COUNTER), 100_500, "halted counter holds");
        // 32-bit halves.
        r.wr32(REG_COUNTER + 4, 1);
        assert_eq!(r.rd(REG_COUNTER), (1 << 32) | 100_500);
        assert_eq!(r.rd32(REG_COUNTER + 4), 1);
        r.wr(REG_CONFIG, CFG_ENABLE);
        r.clock.advance_by(10);
        assert_eq!(r.rd(REG_COUNTER), (1 << 32) | 100_501);
    }

    #[test]
    fn one_shot_edge_timer_pulses_once_at_the_comparator() {
        let mut r = rig();
        r.wr(Rig::tcfg(2), (10 << TN_ROUTE_SHIFT) | TN_INT_ENABLE);
        r.wr(Rig::tcmp(2), 1_000);
        r.wr(REG_CONFIG, CFG_ENABLE);
        assert_eq!(r.hpet.next_deadline(), Some(10_000));
        r.run_to(9_990);
        assert_eq!(r.pin10[2].pulses(), 0);
        r.run_to(10_000);
        assert_eq!(r.pin10[2].take(), vec![true, false]);
        assert_eq!(r.rd(REG_INT_STATUS), 0, "edge timers set no status");
        r.run_to(1_000_000_000);
        assert_eq!(r.pin10[2].pulses(), 0, "one-shot");
        assert_eq!(
            r.hpet.next_deadline(),
            None,
            "64-bit comparator in the past"
        );
    }

    #[test]
    fn comparator_in_the_past_fires_after_the_32bit_wrap_only_in_32bit_mode() {
        let mut r = rig();
        r.wr(REG_CONFIG, CFG_ENABLE);
        r.run_to(100_000); // counter 10_000
        r.wr(
            Rig::tcfg(2),
            (10 << TN_ROUTE_SHIFT) | TN_INT_ENABLE | TN_32BIT,
        );
        r.wr(Rig::tcmp(2), 5_000);
        let d = r.hpet.next_deadline().unwrap();
        assert_eq!(d, 100_000 + ((1u64 << 32) - 5_000) * 10);
        assert_eq!(
            r.rd(Rig::tcmp(2)),
            5_000,
            "upper half reads 0 in 32-bit mode"
        );
        r.run_to(d);
        assert_eq!(r.pin10[2].pulses(), 1);
    }

    #[test]
    fn periodic_timer_with_val_set_as_linux_programs_it() {
        let mut r = rig();
        // Linux: stop, read the counter, program, start.
        r.wr(REG_CONFIG, CFG_LEGACY);
        let now = r.rd(REG_COUNTER);
        r.wr(
            Rig::tcfg(0),
            TN_INT_ENABLE | TN_PERIODIC | TN_VAL_SET | TN_32BIT,
        );
        let delta = 100_000; // 1 ms
        r.wr32(Rig::tcmp(0), (now + delta) as u32);
        r.wr32(Rig::tcmp(0), delta as u32);
        assert_eq!(r.rd(Rig::tcfg(0)) & TN_VAL_SET, 0, "VAL_SET clears");
        r.wr(REG_CONFIG, CFG_LEGACY | CFG_ENABLE);
        r.run_to(10_000_000 - 1);
        assert_eq!(r.irq0.pulses(), 9);
        r.run_to(10_000_000);
        assert_eq!(r.irq0.pulses(), 1);
        assert_eq!(r.rd(Rig::tcmp(0)), 1_100_000, "comparator steps by period");
        // A late VMM: several periods merge into one interrupt.
        r.clock.set(15_500_000);
        r.hpet.advance(15_500_000);
        assert_eq!(r.irq0.pulses(), 1);
        assert_eq!(r.rd(Rig::tcmp(0)), 1_600_000);
        assert_eq!(r.irq8.pulses(), 0);
    }

    #[test]
    fn level_timer_holds_its_line_until_the_status_bit_is_cleared() {
        let mut r = rig();
        r.wr(
            Rig::tcfg(1),
            (10 << TN_ROUTE_SHIFT) | TN_INT_ENABLE | TN_INT_LEVEL,
        );
        r.wr(Rig::tcmp(1), 50);
        r.wr(REG_CONFIG, CFG_ENABLE);
        r.run_to(500);
        assert_eq!(r.pin10[1].take(), vec![true]);
        assert_eq!(r.rd(REG_INT_STATUS), 0b10);
        assert!(r.taint.take());
        r.wr(REG_INT_STATUS, 0b01); // another bit: no effect
        assert_eq!(r.rd(REG_INT_STATUS), 0b10);
        assert!(r.pin10[1].take().is_empty());
        r.wr(REG_INT_STATUS, 0b10);
        assert_eq!(r.pin10[1].take(), vec![false]);
        assert_eq!(r.rd(REG_INT_STATUS), 0);
    }

    #[test]
    fn level_status_is_set_with_interrupts_disabled_and_line_follows_enable() {
        let mut r = rig();
        r.wr(Rig::tcfg(1), (10 << TN_ROUTE_SHIFT) | TN_INT_LEVEL);
        r.wr(Rig::tcmp(1), 50);
        r.wr(REG_CONFIG, CFG_ENABLE);
        assert_eq!(
            r.hpet.next_deadline(),
            None,
            "no interrupt, no deadline needed"
        );
        r.clock.set(1_000);
        assert_eq!(r.rd(REG_INT_STATUS), 0b10, "status brought up to date");
        assert!(r.pin10[1].take().is_empty());
        r.wr(
            Rig::tcfg(1),
            (10 << TN_ROUTE_SHIFT) | TN_INT_LEVEL | TN_INT_ENABLE,
        );
        assert_eq!(r.pin10[1].take(), vec![true]);
        // Halting the counter lowers the line; the bit stays.
        r.wr(REG_CONFIG, 0);
        assert_eq!(r.pin10[1].take(), vec![false]);
        assert_eq!(r.rd(REG_INT_STATUS), 0b10);
    }

    #[test]
    fn routes_outside_the_capability_are_refused_and_legacy_overrides_timers_0_and_1() {
        let mut r = rig();
        r.wr(Rig::tcfg(0), 3 << TN_ROUTE_SHIFT);
        assert_eq!((r.rd(Rig::tcfg(0)) >> TN_ROUTE_SHIFT) & 0x1f, 0);
        r.wr(Rig::tcfg(0), 11 << TN_ROUTE_SHIFT);
        assert_eq!((r.rd(Rig::tcfg(0)) >> TN_ROUTE_SHIFT) & 0x1f, 11);
        // Timer 1 level on pin 10, then legacy replacement moves it to IRQ8.
        r.wr(
            Rig::tcfg(1),
            (10 << TN_ROUTE_SHIFT) | TN_INT_ENABLE | TN_INT_LEVEL,
        );
        r.wr(Rig::tcmp(1), 1);
        r.wr(REG_CONFIG, CFG_ENABLE);
        r.run_to(100);
        assert_eq!(r.pin10[1].take(), vec![true]);
        assert!(!r.gate.closed());
        r.wr(REG_CONFIG, CFG_ENABLE | CFG_LEGACY);
        assert!(r.gate.closed(), "PIT and RTC cut off");
        assert_eq!(r.pin10[1].take(), vec![false]);
        assert_eq!(r.irq8.take(), vec![true]);
        r.wr(REG_CONFIG, CFG_ENABLE);
        assert!(!r.gate.closed());
        assert_eq!(r.irq8.take(), vec![false]);
        assert_eq!(r.pin10[1].take(), vec![true]);
    }

    #[test]
    fn the_counter_wraps_and_timers_keep_matching() {
        let mut r = rig();
        r.wr(REG_COUNTER, u64::MAX - 99);
        r.wr(Rig::tcfg(2), (10 << TN_ROUTE_SHIFT) | TN_INT_ENABLE);
        r.wr(Rig::tcmp(2), 50);
        r.wr(REG_CONFIG, CFG_ENABLE);
        // 100 ticks to the wrap, 50 more to the comparator.
        assert_eq!(r.hpet.next_deadline(), Some(1_500));
        r.run_to(2_000);
        assert_eq!(r.pin10[2].pulses(), 1);
        assert_eq!(r.rd(REG_COUNTER), 100);
        assert_eq!(r.hpet.next_deadline(), None, "one-shot, far behind now");
    }

    #[test]
    fn narrow_and_unaligned_accesses() {
        let mut r = rig();
        let mut b = [0u8; 2];
        r.hpet.read(REG_CAPABILITIES + 6, &mut b);
        assert_eq!(u16::from_le_bytes(b), (PERIOD_FS >> 16) as u16);
        // An access crossing a register boundary is ignored.
        let mut b = [0xffu8; 4];
        r.hpet.read(REG_CAPABILITIES + 6, &mut b);
        assert_eq!(b, [0; 4]);
        r.hpet.write(REG_CONFIG, &[CFG_ENABLE as u8]);
        assert_eq!(r.rd(REG_CONFIG), CFG_ENABLE);
        r.hpet.write(MMIO_SIZE - 1, &[1]);
        r.hpet.write(MMIO_SIZE + 8, &[1]);
    }

    #[test]
    fn save_and_restore_resume_the_same_counter_and_timers() {
        let mut r = rig();
        r.wr(
            Rig::tcfg(0),
            TN_INT_ENABLE | TN_PERIODIC | TN_VAL_SET | (10 << TN_ROUTE_SHIFT),
        );
        r.wr(Rig::tcmp(0), 100);
        r.wr(Rig::tcmp(0), 100);
        r.wr(REG_CONFIG, CFG_ENABLE);
        r.run_to(5_000);
        let s = r.hpet.state();
        let mut other = rig();
        other.clock.set(5_000);
        other.hpet.restore(&s);
        assert_eq!(other.hpet.state(), s);
        assert_eq!(other.hpet.next_deadline(), r.hpet.next_deadline());
        other.run_to(20_000);
        r.run_to(20_000);
        assert_eq!(other.rd(REG_COUNTER), r.rd(REG_COUNTER));
        assert_eq!(other.pin10[0].pulses(), 15);
        assert_eq!(other.hpet.state(), r.hpet.state());
    }
}
