//! The 8254 programmable interval timer (PIT) and the timer bits of port
//! 0x61 (NMI status and control register of the PC).
//!
//! # Mapping
//!
//! [`Pit8254`] is the core, shared as `Arc<Mutex<Pit8254>>`. Two bus devices
//! front it, because its ports are not adjacent:
//!
//! * [`PitPorts`] built by [`pit_ports`]: map at [`PIT_BASE`] (0x40), length
//!   4. Offsets 0-2 are the counters' data ports, offset 3 the control word
//!   port (reads of it give 0xff: the 8254 does not drive the bus there).
//! * [`PitPort61`] built by [`port61`]: map at [`PORT_61`], length 1.
//!
//! Both are byte-wide: an access of N bytes at offset O is N byte accesses
//! at O, O+1, ... (low byte first); bytes outside the device's ports read
//! 0xff and are dropped on write. The core also takes absolute port numbers
//! ([`Pit8254::read_port`], [`Pit8254::write_port`]).
//!
//! Port 0x61: bit 0 is channel 2's GATE, bit 1 the speaker data enable
//! (stored only), bits 2-3 (parity / channel check enables) are stored, and
//! on reads bit 4 is the refresh request toggle — derived from the VM clock,
//! it flips every [`REFRESH_PERIOD_NS`] (15.085 µs) — and bit 5 is channel
//! 2's OUT. Bits 6-7 (NMI sources) read 0.
//!
//! # Time
//!
//! The PIT never reads host time: it is given an [`Arc<dyn Clock>`] and its
//! input clock runs at [`PIT_HZ`] (1.193182 MHz) of VM time. Tick n happens
//! at VM time `ceil(n * 1e9 / PIT_HZ)` ns ([`tick_ns`]); the ticks elapsed at
//! time t are `floor(t * PIT_HZ / 1e9)` ([`crate::clock::ns_to_ticks`]).
//! Every counter is a closed-form function of the tick number, so nothing
//! has to run per tick. Every port access first brings the model up to
//! "now".
//!
//! # Counters
//!
//! Three channels, with the 8254's state machine as the datasheet gives it:
//!
//! * **Loading.** A count written to the count register (CR) is transferred
//!   to the counting element (CE) on the next input clock after the write
//!   (so mode 0's OUT rises N + 1 clocks after the count is written, as on
//!   the chip), in modes 0 and 4 at once (a new count restarts them), in
//!   modes 2 and 3 only when the counter was not counting (else at the end
//!   of the current period (mode 2) or half period (mode 3)), in modes 1 and
//!   5 only on the next GATE trigger. Before that transfer the CE keeps its
//!   old value.
//! * **Modes** 0 (interrupt on terminal count), 1 (retriggerable one-shot),
//!   2 (rate generator; 6 is an alias), 3 (square wave, with the datasheet's
//!   odd-count behaviour: high (N+1)/2 clocks, low (N-1)/2; 7 is an alias),
//!   4 (software strobe), 5 (hardware strobe). After the control word OUT is
//!   low in mode 0 and high in every other mode. In modes 0, 1, 4 and 5 the
//!   counter wraps after the terminal count and keeps counting. Writing the
//!   first byte of a two-byte count in mode 0 stops counting and sets OUT low
//!   at once. A count of 0 is 65536 (10000 in BCD). A count of 1 in mode 2
//!   (illegal on the chip) keeps OUT low; in mode 3 it keeps OUT high.
//!   Invalid BCD digits count with their binary weight (0xA = 10), modulo
//!   10000.
//! * **GATE.** Channels 0 and 1 have GATE tied high. Channel 2's GATE is
//!   port 0x61 bit 0: low stops counting in modes 0 and 4 (resumed on the
//!   next clock after it goes high) and in modes 2 and 3 (where it also
//!   forces OUT high); a rising edge (re)triggers modes 1 and 5 and reloads
//!   modes 2 and 3 on the next clock. Triggers before any count was written
//!   since the control word are ignored.
//! * **Reading.** Counter latch command, read-back command (latch count
//!   and/or status of several channels at once; a second latch before the
//!   first is read is ignored; a status latched together with the count is
//!   read first), status byte = OUT, null count, access mode, mode bits as
//!   programmed, BCD. Unlatched reads see the live CE. Reads and writes
//!   have separate byte flip-flops (the datasheet allows interleaving
//!   them); a latched count in lobyte/hibyte mode is always read low byte
//!   first. The control word resets both flip-flops and clears latches.
//!   Every data read (counter or status, latched or not) and every read of
//!   port 0x61 marks the [`TimeTaint`].
//!
//! # IRQ 0 and events
//!
//! Channel 0's OUT drives the IRQ line given to [`Pit8254::new`]. The model
//! implements [`Timed`]: [`Timed::next_deadline`] is the VM time of channel
//! 0's next OUT change (or of a pending reload that may change it), and
//! [`Timed::advance`] brings everything up to `now`, driving the line. If
//! the VMM calls `advance` late (the host did not run duet for a while), OUT
//! may have gone through several periods since the last update. At most one
//! rising edge is produced per update (low-then-high when the line was
//! already high, with a final drop if OUT is low by now), so an
//! edge-triggered PIC sees one interrupt; the other rising edges are
//! **lost ticks**, and, like KVM's PIT (`reinject`) and QEMU's lost-tick
//! policies, the model delivers them later: it counts them (at most
//! [`MAX_LOST_TICKS`]; beyond that they are dropped), and while any are
//! owed it adds one extra rising edge every quarter period (at least
//! [`MIN_CATCH_UP_NS`] apart, so the guest can take each one), reported as
//! a deadline like any other. A guest whose periodic tick counts time
//! (jiffies) thus catches up with the clock instead of falling behind it.
//! Reprogramming channel 0 (a control word or a count) forgets the owed
//! ticks. Port accesses update the line in the same way. The line is only
//! driven on changes, and once at construction / reset / restore.
//!
//! # Start state
//!
//! What a PC BIOS leaves ([`Pit8254::new`], [`Pit8254::reset`]): channel 0
//! in mode 3 with count 0 (18.2 Hz square wave on IRQ 0, lobyte/hibyte),
//! counting from the moment of creation; channel 1 in mode 2 with count 18
//! (the DRAM refresh rate, lobyte only); channel 2 in mode 3
//! lobyte/hibyte with no count and GATE low. Port 0x61 reads 0 apart from
//! bits 4 and 5.
//!
//! Snapshot times ([`Pit8254State`]) are VM nanoseconds.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::bus::BusDevice;
use crate::clock::{ns_to_ticks, Clock, TimeTaint, Timed};
use crate::irq::IrqLine;

/// The PIT's input clock.
pub const PIT_HZ: u64 = 1_193_182;
/// Where the machine maps [`PitPorts`] (length 4).
pub const PIT_BASE: u16 = 0x40;
/// Where the machine maps [`PitPort61`] (length 1).
pub const PORT_61: u16 = 0x61;
/// Lost ticks of channel 0 owed to the guest at most (about 4 s of a
/// 250 Hz tick); more are dropped.
pub const MAX_LOST_TICKS: u32 = 1000;
/// The shortest spacing of catch-up edges.
pub const MIN_CATCH_UP_NS: u64 = 20_000;

/// Half period of port 0x61's refresh toggle (bit 4).
pub const REFRESH_PERIOD_NS: u64 = 15_085;

const P61_GATE2: u8 = 0x01;
const P61_STORED: u8 = 0x0f;
const P61_REFRESH: u8 = 0x10;
const P61_OUT2: u8 = 0x20;

/// Ticks of the input clock elapsed at VM time `ns`.
pub fn ticks(ns: u64) -> u64 {
    ns_to_ticks(ns, PIT_HZ)
}

/// VM time (ns) of input clock tick `t`: the first ns at which
/// `ticks(ns) == t`.
pub fn tick_ns(t: u64) -> u64 {
    let ns = (u128::from(t) * 1_000_000_000).div_ceil(u128::from(PIT_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

fn bcd_decode(v: u16) -> u32 {
    (0..4)
        .map(|i| u32::from((v >> (4 * i)) & 0xf) * 10u32.pow(i))
        .sum()
}

fn bcd_encode(v: u32) -> u16 {
    let v = v % 10_000;
    ((v / 1000) << 12 | (v / 100 % 10) << 8 | (v / 10 % 10) << 4 | (v % 10)) as u16
}

/// What a channel's counting element is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PitCounting {
    /// Not counting: the CE holds `value` and OUT holds `out`. `fired`: the
    /// terminal count was already reached (modes 0 and 4, for resuming).
    Stopped { value: u32, fired: bool, out: bool },
    /// Counting. At the input clock tick at `load_ns` the CE held `start`
    /// (for modes 2 and 3: the period it reloads), and it changes on every
    /// tick after. Before that tick, CE and OUT were `pre_value` and
    /// `pre_out`. `fired`: the terminal count was already reached (modes 0,
    /// 1, 4, 5). `high_first`: mode 3 starts with the high half.
    Running {
        load_ns: u64,
        start: u32,
        fired: bool,
        high_first: bool,
        pre_value: u32,
        pre_out: bool,
    },
}

/// One counter's state. Counts (`value`, `start`) are numbers, not register
/// encodings: up to 65536 in binary mode, 10000 in BCD mode.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PitChannelState {
    /// Mode bits as programmed (0-7; 6 and 7 act as 2 and 3).
    pub mode: u8,
    pub bcd: bool,
    /// Access mode: 1 lobyte, 2 hibyte, 3 lobyte then hibyte.
    pub access: u8,
    /// The count register, as written.
    pub count: u16,
    /// A count was written since the last control word.
    pub has_count: bool,
    /// Write flip-flop: the low byte of a two-byte count waiting for its
    /// high byte.
    pub write_low: Option<u8>,
    /// Read flip-flop for unlatched reads: the high byte is next.
    pub read_msb_next: bool,
    /// Latched count (register encoding), until read.
    pub count_latch: Option<u16>,
    /// The latched count's low byte was read.
    pub latch_msb_next: bool,
    /// Latched status byte, until read.
    pub status_latch: Option<u8>,
    pub gate: bool,
    /// Status bit 6: a count was written but not yet loaded into the CE.
    pub null_count: bool,
    /// When the CR is (to be) transferred to the CE, if scheduled.
    pub cr_load_ns: Option<u64>,
    pub counting: PitCounting,
}

/// A running counter's waveform, relative to its load tick.
struct Seg {
    mode: u8,
    start: u64,
    fired: bool,
    high_first: bool,
    modulus: u64,
}

impl Seg {
    /// Lengths of the high and low halves in mode 3.
    fn halves(&self) -> (u64, u64) {
        (self.start.div_ceil(2), self.start / 2)
    }

    fn value(&self, e: u64) -> u32 {
        let n = self.start;
        let v = match self.mode {
            2 => n - e % n,
            3 => {
                let (h, l) = self.halves();
                let p = e % n;
                let (high, q) = if self.high_first {
                    if p < h {
                        (true, p)
                    } else {
                        (false, p - h)
                    }
                } else if p < l {
                    (false, p)
                } else {
                    (true, p - l)
                };
                let odd = n & 1;
                if q == 0 {
                    n
                } else if high {
                    n + odd - 2 * q
                } else {
                    n - odd - 2 * q
                }
            }
            _ => (n % self.modulus + self.modulus - e % self.modulus) % self.modulus,
        };
        v as u32
    }

    fn out(&self, e: u64) -> bool {
        let n = self.start;
        match self.mode {
            0 | 1 => self.fired || e >= n,
            2 => e % n != n - 1,
            3 => {
                let (h, l) = self.halves();
                let p = e % n;
                if self.high_first {
                    p < h
                } else {
                    p >= l
                }
            }
            _ => self.fired || e != n,
        }
    }

    /// The smallest e > `ea` at which OUT changes.
    fn next_change(&self, ea: u64) -> Option<u64> {
        let n = self.start;
        match self.mode {
            0 | 1 => (!self.fired && n > ea).then_some(n),
            2 | 3 => {
                // Changes at e ≡ x and e ≡ 0 (mod n).
                let x = match self.mode {
                    2 => n - 1,
                    _ if self.high_first => self.halves().0,
                    _ => self.halves().1,
                };
                if x == 0 || x >= n {
                    return None;
                }
                let base = ea - ea % n;
                Some(if ea % n < x { base + x } else { base + n })
            }
            _ => {
                if self.fired {
                    None
                } else if n > ea {
                    Some(n)
                } else if n + 1 > ea {
                    Some(n + 1)
                } else {
                    None
                }
            }
        }
    }
}

impl PitChannelState {
    /// A channel after the control word `mode`/`access`, before any count.
    fn programmed(mode: u8, access: u8, gate: bool) -> Self {
        PitChannelState {
            mode,
            bcd: false,
            access,
            count: 0,
            has_count: false,
            write_low: None,
            read_msb_next: false,
            count_latch: None,
            latch_msb_next: false,
            status_latch: None,
            gate,
            null_count: true,
            cr_load_ns: None,
            counting: PitCounting::Stopped {
                value: 0,
                fired: true,
                out: mode != 0,
            },
        }
    }

    /// A channel counting `count` in `mode` since tick `k`, as a BIOS left it.
    fn bios(mode: u8, access: u8, count: u16, k: u64) -> Self {
        let mut c = Self::programmed(mode, access, true);
        c.count = count;
        c.has_count = true;
        c.null_count = false;
        c.counting = PitCounting::Running {
            load_ns: tick_ns(k),
            start: c.n_eff(),
            fired: false,
            high_first: true,
            pre_value: 0,
            pre_out: true,
        };
        c
    }

    /// The effective mode (6 and 7 are 2 and 3).
    fn m(&self) -> u8 {
        match self.mode & 7 {
            6 => 2,
            7 => 3,
            m => m,
        }
    }

    fn modulus(&self) -> u32 {
        if self.bcd {
            10_000
        } else {
            65_536
        }
    }

    /// The count register as a number of clocks (0 means the modulus).
    fn n_eff(&self) -> u32 {
        let m = self.modulus();
        let n = if self.bcd {
            bcd_decode(self.count) % m
        } else {
            u32::from(self.count)
        };
        if n == 0 {
            m
        } else {
            n
        }
    }

    fn encode(&self, v: u32) -> u16 {
        if self.bcd {
            bcd_encode(v)
        } else {
            (v % 65_536) as u16
        }
    }

    fn seg(&self) -> Option<(u64, Seg)> {
        match self.counting {
            PitCounting::Running {
                load_ns,
                start,
                fired,
                high_first,
                ..
            } => Some((
                ticks(load_ns),
                Seg {
                    mode: self.m(),
                    start: u64::from(start.max(1)),
                    fired,
                    high_first,
                    modulus: u64::from(self.modulus()),
                },
            )),
            PitCounting::Stopped { .. } => None,
        }
    }

    /// The CE value (a number) at tick `k`.
    fn value_at(&self, k: u64) -> u32 {
        match self.counting {
            PitCounting::Stopped { value, .. } => value,
            PitCounting::Running { pre_value, .. } => match self.seg() {
                Some((r, s)) if k >= r => s.value(k - r),
                _ => pre_value,
            },
        }
    }

    /// OUT at tick `k`.
    fn out_at(&self, k: u64) -> bool {
        match self.counting {
            PitCounting::Stopped { out, .. } => out,
            PitCounting::Running { pre_out, .. } => match self.seg() {
                Some((r, s)) if k >= r => s.out(k - r),
                _ => pre_out,
            },
        }
    }

    /// The first tick after `a` at which OUT changes, with the current
    /// counting state.
    fn next_change(&self, a: u64) -> Option<u64> {
        let PitCounting::Running { pre_out, .. } = self.counting else {
            return None;
        };
        let (r, s) = self.seg()?;
        if a < r {
            if s.out(0) != pre_out {
                return Some(r);
            }
            return s.next_change(0).map(|e| r + e);
        }
        s.next_change(a - r).map(|e| r + e)
    }

    /// The first tick after `a` at which OUT rises.
    fn next_rise(&self, a: u64) -> Option<u64> {
        let c = self.next_change(a)?;
        if self.out_at(c) {
            Some(c)
        } else {
            self.next_change(c)
        }
    }

    /// Rising edges in `(a, limit]`, counting at most `cap`.
    fn rises_between(&self, a: u64, limit: u64, cap: u64) -> u64 {
        let mut n = 0;
        let mut x = a;
        while n < cap {
            match self.next_rise(x) {
                Some(r) if r <= limit => {
                    n += 1;
                    x = r;
                }
                _ => break,
            }
        }
        n
    }

    /// Ticks between consecutive rising edges after `a` (periodic modes).
    fn rise_period(&self, a: u64) -> Option<u64> {
        let r1 = self.next_rise(a)?;
        let r2 = self.next_rise(r1)?;
        Some(r2 - r1)
    }

    /// The tick of a pending reload of a new count in modes 2 and 3.
    fn pending_reload(&self) -> Option<u64> {
        let x = ticks(self.cr_load_ns?);
        let (r, _) = self.seg()?;
        (matches!(self.m(), 2 | 3) && r < x).then_some(x)
    }

    /// Apply a CR → CE transfer due at or before tick `k`.
    fn settle(&mut self, k: u64) {
        let Some(x) = self.cr_load_ns else { return };
        let x = ticks(x);
        if x > k {
            return;
        }
        if self.pending_reload().is_some() {
            self.counting = PitCounting::Running {
                load_ns: tick_ns(x),
                start: self.n_eff(),
                fired: false,
                high_first: self.out_at(x),
                pre_value: self.value_at(x.saturating_sub(1)),
                pre_out: self.out_at(x.saturating_sub(1)),
            };
        }
        self.null_count = false;
        self.cr_load_ns = None;
    }

    /// Start counting the CR from the next clock after tick `k`.
    fn load_fresh(&mut self, k: u64, pre_out: bool) {
        self.counting = PitCounting::Running {
            load_ns: tick_ns(k + 1),
            start: self.n_eff(),
            fired: false,
            high_first: true,
            pre_value: self.value_at(k),
            pre_out,
        };
        self.cr_load_ns = Some(tick_ns(k + 1));
    }

    fn control(&mut self, cw: u8, k: u64) {
        let value = self.value_at(k);
        *self = PitChannelState {
            bcd: cw & 1 != 0,
            ..Self::programmed((cw >> 1) & 7, (cw >> 4) & 3, self.gate)
        };
        self.counting = PitCounting::Stopped {
            value: value % self.modulus(),
            fired: true,
            out: self.m() != 0,
        };
    }

    fn write_count(&mut self, count: u16, k: u64) {
        self.count = count;
        self.has_count = true;
        self.null_count = true;
        let out = self.out_at(k);
        match self.m() {
            m @ (0 | 4) => {
                let out = m == 4 && out;
                if self.gate {
                    self.load_fresh(k, out);
                } else {
                    self.counting = PitCounting::Stopped {
                        value: self.n_eff(),
                        fired: false,
                        out,
                    };
                    self.cr_load_ns = Some(tick_ns(k + 1));
                }
            }
            2 | 3 => {
                if !self.gate {
                    self.cr_load_ns = None;
                } else if let Some((r, s)) = self.seg().filter(|(r, _)| *r <= k) {
                    // Counting: the new count waits for the end of the
                    // period (mode 2) or half period (mode 3).
                    let e = k - r;
                    let next = if s.mode == 2 {
                        (e / s.start + 1) * s.start
                    } else {
                        s.next_change(e).unwrap_or(e + 1)
                    };
                    self.cr_load_ns = Some(tick_ns(r + next));
                } else {
                    self.load_fresh(k, out);
                }
            }
            // Modes 1 and 5 wait for a trigger.
            _ => self.cr_load_ns = None,
        }
    }

    fn set_gate(&mut self, level: bool, k: u64) {
        if level == self.gate {
            return;
        }
        self.gate = level;
        let m = self.m();
        if level {
            match (m, self.counting) {
                (1 | 2 | 3 | 5, _) if self.has_count => {
                    let out = self.out_at(k);
                    self.load_fresh(k, out);
                }
                (0 | 4, PitCounting::Stopped { value, fired, out }) if self.has_count => {
                    // Counting resumes on the next clock.
                    self.counting = PitCounting::Running {
                        load_ns: tick_ns(k),
                        start: value,
                        fired,
                        high_first: true,
                        pre_value: value,
                        pre_out: out,
                    };
                }
                _ => {}
            }
            return;
        }
        match m {
            0 | 4 => {
                if let PitCounting::Running {
                    start,
                    fired,
                    pre_out,
                    ..
                } = self.counting
                {
                    self.counting = match self.seg() {
                        Some((r, s)) if k >= r => {
                            let e = k - r;
                            let fired = fired || e >= s.start;
                            PitCounting::Stopped {
                                value: if fired { s.value(e) } else { start - e as u32 },
                                fired,
                                out: s.out(e),
                            }
                        }
                        _ => PitCounting::Stopped {
                            value: start,
                            fired,
                            out: pre_out,
                        },
                    };
                }
            }
            2 | 3 => {
                self.counting = PitCounting::Stopped {
                    value: self.value_at(k),
                    fired: true,
                    out: true,
                };
                self.cr_load_ns = None;
            }
            _ => {}
        }
    }

    fn status(&self, k: u64) -> u8 {
        (u8::from(self.out_at(k)) << 7)
            | (u8::from(self.null_count) << 6)
            | (self.access << 4)
            | ((self.mode & 7) << 1)
            | u8::from(self.bcd)
    }

    fn latch_count(&mut self, k: u64) {
        if self.count_latch.is_none() {
            self.count_latch = Some(self.encode(self.value_at(k)));
            self.latch_msb_next = false;
        }
    }

    fn latch_status(&mut self, k: u64) {
        if self.status_latch.is_none() {
            self.status_latch = Some(self.status(k));
        }
    }

    fn read(&mut self, k: u64) -> u8 {
        if let Some(s) = self.status_latch.take() {
            return s;
        }
        if let Some(c) = self.count_latch {
            let [lo, hi] = c.to_le_bytes();
            return match self.access {
                1 => {
                    self.count_latch = None;
                    lo
                }
                2 => {
                    self.count_latch = None;
                    hi
                }
                _ if !self.latch_msb_next => {
                    self.latch_msb_next = true;
                    lo
                }
                _ => {
                    self.count_latch = None;
                    self.latch_msb_next = false;
                    hi
                }
            };
        }
        let [lo, hi] = self.encode(self.value_at(k)).to_le_bytes();
        match self.access {
            1 => lo,
            2 => hi,
            _ => {
                self.read_msb_next = !self.read_msb_next;
                if self.read_msb_next {
                    lo
                } else {
                    hi
                }
            }
        }
    }

    fn write(&mut self, v: u8, k: u64) {
        match self.access {
            1 => self.write_count(u16::from(v), k),
            2 => self.write_count(u16::from(v) << 8, k),
            _ => match self.write_low.take() {
                None => {
                    self.write_low = Some(v);
                    if self.m() == 0 {
                        // Counting stops and OUT drops at the first byte.
                        self.counting = PitCounting::Stopped {
                            value: self.value_at(k),
                            fired: true,
                            out: false,
                        };
                        self.has_count = false;
                        self.cr_load_ns = None;
                    }
                }
                Some(lo) => self.write_count(u16::from_le_bytes([lo, v]), k),
            },
        }
    }

    /// Clamp every field to what the counter can hold.
    fn sanitize(&mut self, gate: bool) {
        self.mode &= 7;
        if !(1..=3).contains(&self.access) {
            self.access = 3;
        }
        self.gate = gate;
        let m = self.modulus();
        let clamp = |v: u32| if v == 0 { m } else { (v - 1) % m + 1 };
        self.counting = match self.counting {
            PitCounting::Stopped { value, fired, out } => PitCounting::Stopped {
                value: if fired { value % m } else { clamp(value) },
                fired,
                out,
            },
            PitCounting::Running {
                load_ns,
                start,
                fired,
                high_first,
                pre_value,
                pre_out,
            } => PitCounting::Running {
                load_ns,
                start: clamp(start),
                fired,
                high_first,
                // The CE holds 0..=m (m is a full count of 0).
                pre_value: if pre_value <= m {
                    pre_value
                } else {
                    pre_value % m
                },
                pre_out,
            },
        };
    }
}

/// The PIT's state, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pit8254State {
    pub channels: [PitChannelState; 3],
    /// Port 0x61 bits 0-3 as written.
    pub port61: u8,
    /// VM time up to which the IRQ 0 line was brought.
    pub line_ns: u64,
    /// The level last driven on the IRQ 0 line.
    pub irq_level: bool,
    /// Rising edges of channel 0 not delivered yet (lost ticks).
    #[serde(default)]
    pub lost_ticks: u32,
    /// VM time of the next catch-up edge while `lost_ticks` > 0.
    #[serde(default)]
    pub catch_up_ns: u64,
}

impl Pit8254State {
    /// The state a BIOS leaves, with channels 0 and 1 counting since `now`.
    pub fn power_on(now_ns: u64) -> Self {
        let k = ticks(now_ns);
        let mut ch2 = PitChannelState::programmed(3, 3, false);
        ch2.null_count = false;
        Pit8254State {
            channels: [
                PitChannelState::bios(3, 3, 0, k),
                PitChannelState::bios(2, 1, 18, k),
                ch2,
            ],
            port61: 0,
            line_ns: now_ns,
            irq_level: true,
            lost_ticks: 0,
            catch_up_ns: 0,
        }
    }
}

/// The 8254 PIT. See the module documentation.
pub struct Pit8254 {
    s: Pit8254State,
    clock: Arc<dyn Clock>,
    irq0: Box<dyn IrqLine>,
    taint: TimeTaint,
}

impl Pit8254 {
    /// A PIT in the BIOS state, counting from `clock`'s now, with channel
    /// 0's OUT on `irq0` (driven at once to its initial level, high), and
    /// time-dependent reads reported to `taint`.
    pub fn new(clock: Arc<dyn Clock>, irq0: Box<dyn IrqLine>, taint: TimeTaint) -> Self {
        let s = Pit8254State::power_on(clock.now_ns());
        irq0.set_level(s.irq_level);
        Pit8254 {
            s,
            clock,
            irq0,
            taint,
        }
    }

    /// Back to the BIOS state, counting from now.
    pub fn reset(&mut self) {
        self.s = Pit8254State::power_on(self.clock.now_ns());
        self.irq0.set_level(self.s.irq_level);
    }

    pub fn state(&self) -> Pit8254State {
        self.s.clone()
    }

    /// Load a state (from [`Pit8254::state`]). Out-of-range fields are
    /// clamped, so any value is safe; GATE 2 follows port 0x61 bit 0 and
    /// the other gates are high. The IRQ line is driven to the saved level;
    /// the next access or `advance` brings it up to date.
    pub fn restore(&mut self, s: &Pit8254State) {
        let mut s = s.clone();
        s.port61 &= P61_STORED;
        s.lost_ticks = s.lost_ticks.min(MAX_LOST_TICKS);
        let gate2 = s.port61 & P61_GATE2 != 0;
        for (i, c) in s.channels.iter_mut().enumerate() {
            c.sanitize(i != 2 || gate2);
        }
        self.s = s;
        self.irq0.set_level(self.s.irq_level);
    }

    /// Bring counters and the IRQ line up to VM time `now`.
    fn sync(&mut self, now: u64) -> u64 {
        let t = ticks(now).max(ticks(self.s.line_ns));
        let mut a = ticks(self.s.line_ns);
        let cap = u64::from(MAX_LOST_TICKS) + 1;
        let mut rises = 0u64;
        loop {
            let ch0 = &mut self.s.channels[0];
            let reload = ch0.pending_reload().filter(|&r| r <= t);
            let limit = reload.unwrap_or(t);
            rises += ch0.rises_between(a, limit, cap);
            let Some(r) = reload else { break };
            let before = ch0.out_at(r);
            ch0.settle(r);
            if !before && ch0.out_at(r) {
                rises += 1;
            }
            a = r;
        }
        for c in self.s.channels.iter_mut() {
            c.settle(t);
        }
        self.s.line_ns = self.s.line_ns.max(now);
        let out = self.s.channels[0].out_at(t);
        let mut edge = rises > 0;
        if rises > 1 {
            let lost = u64::from(self.s.lost_ticks) + (rises - 1);
            self.s.lost_ticks = lost.min(u64::from(MAX_LOST_TICKS)) as u32;
        }
        if !edge && self.s.lost_ticks > 0 && now >= self.s.catch_up_ns {
            // One owed tick.
            self.s.lost_ticks -= 1;
            edge = true;
        }
        if edge && self.s.lost_ticks > 0 {
            // The next owed tick, a spacing after this edge.
            self.s.catch_up_ns = now.saturating_add(self.catch_up_spacing(t));
        }
        if edge {
            if self.s.irq_level {
                self.irq0.set_level(false);
            }
            self.irq0.set_level(true);
            self.s.irq_level = true;
        }
        self.update_line(t);
        debug_assert_eq!(self.s.irq_level, out);
        t
    }

    /// How far apart catch-up edges go: a quarter of channel 0's period.
    fn catch_up_spacing(&self, t: u64) -> u64 {
        let period = self.s.channels[0].rise_period(t).unwrap_or(0);
        (tick_ns(period) / 4).max(MIN_CATCH_UP_NS)
    }

    /// Drive the line to channel 0's OUT at tick `t` if it differs.
    fn update_line(&mut self, t: u64) {
        let out = self.s.channels[0].out_at(t);
        if out != self.s.irq_level {
            self.s.irq_level = out;
            self.irq0.set_level(out);
        }
    }

    /// The current OUT of channel `ch` (0-2); false for other numbers.
    pub fn output(&mut self, ch: usize) -> bool {
        let t = self.sync(self.clock.now_ns());
        self.s.channels.get(ch).is_some_and(|c| c.out_at(t))
    }

    /// Read an absolute port (0x40-0x43, 0x61); others read 0xff.
    pub fn read_port(&mut self, port: u16) -> u8 {
        if !matches!(port, 0x40..=0x43 | PORT_61) {
            return 0xff;
        }
        let now = self.clock.now_ns();
        let t = self.sync(now);
        match port {
            0x40..=0x42 => {
                self.taint.mark();
                self.s.channels[usize::from(port - 0x40)].read(t)
            }
            PORT_61 => {
                self.taint.mark();
                let mut v = self.s.port61 & P61_STORED;
                if (now / REFRESH_PERIOD_NS) & 1 != 0 {
                    v |= P61_REFRESH;
                }
                if self.s.channels[2].out_at(t) {
                    v |= P61_OUT2;
                }
                v
            }
            // The control port: the 8254 does not drive the bus.
            _ => 0xff,
        }
    }

    /// Write an absolute port (0x40-0x43, 0x61); others are dropped.
    pub fn write_port(&mut self, port: u16, v: u8) {
        let now = self.clock.now_ns();
        let reprograms_ch0 = port == 0x40 || (port == 0x43 && v >> 6 == 0 && v & 0x30 != 0);
        match port {
            0x40..=0x42 => {
                let t = self.sync(now);
                self.s.channels[usize::from(port - 0x40)].write(v, t);
                self.update_line(t);
            }
            0x43 => {
                let t = self.sync(now);
                self.write_control(v, t);
                self.update_line(t);
            }
            PORT_61 => {
                let t = self.sync(now);
                self.s.port61 = v & P61_STORED;
                self.s.channels[2].set_gate(v & P61_GATE2 != 0, t);
            }
            _ => {}
        }
        if reprograms_ch0 {
            // Channel 0 reprogrammed: ticks owed at the old rate are moot.
            self.s.lost_ticks = 0;
        }
    }

    fn write_control(&mut self, v: u8, t: u64) {
        let sc = usize::from(v >> 6);
        if sc == 3 {
            // Read-back: bits 1-3 select channels, bit 5 clear latches the
            // count, bit 4 clear the status.
            for (i, c) in self.s.channels.iter_mut().enumerate() {
                if v & (2 << i) != 0 {
                    if v & 0x20 == 0 {
                        c.latch_count(t);
                    }
                    if v & 0x10 == 0 {
                        c.latch_status(t);
                    }
                }
            }
        } else if v & 0x30 == 0 {
            self.s.channels[sc].latch_count(t);
        } else {
            self.s.channels[sc].control(v, t);
        }
    }
}

impl Timed for Pit8254 {
    fn next_deadline(&self) -> Option<u64> {
        let ch0 = &self.s.channels[0];
        let a = ticks(self.s.line_ns);
        let change = ch0.next_change(a);
        let reload = ch0.pending_reload();
        let hw = match (change, reload) {
            (Some(c), Some(r)) => Some(c.min(r)),
            (c, r) => c.or(r),
        }
        .map(tick_ns);
        let catch_up = (self.s.lost_ticks > 0).then_some(self.s.catch_up_ns);
        match (hw, catch_up) {
            (Some(h), Some(c)) => Some(h.min(c)),
            (h, c) => h.or(c),
        }
    }

    fn advance(&mut self, now: u64) {
        self.sync(now);
    }
}

fn lock(pit: &Mutex<Pit8254>) -> MutexGuard<'_, Pit8254> {
    pit.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ports 0x40-0x43 of a shared [`Pit8254`]; map at [`PIT_BASE`], length 4.
pub struct PitPorts {
    pit: Arc<Mutex<Pit8254>>,
}

/// Port 0x61 of a shared [`Pit8254`]; map at [`PORT_61`], length 1.
pub struct PitPort61 {
    pit: Arc<Mutex<Pit8254>>,
}

/// The counter and control ports (0x40-0x43) of `pit`.
pub fn pit_ports(pit: Arc<Mutex<Pit8254>>) -> PitPorts {
    PitPorts { pit }
}

/// Port 0x61 of `pit`.
pub fn port61(pit: Arc<Mutex<Pit8254>>) -> PitPort61 {
    PitPort61 { pit }
}

/// The absolute port byte `i` of an access at `offset` reaches, if inside a
/// device of `len` ports at `base`.
fn port_of(base: u16, len: u64, offset: u64, i: usize) -> Option<u16> {
    match offset.checked_add(i as u64) {
        Some(o) if o < len => Some(base + o as u16),
        _ => None,
    }
}

impl BusDevice for PitPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match port_of(PIT_BASE, 4, offset, i) {
                Some(p) => lock(&self.pit).read_port(p),
                None => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if let Some(p) = port_of(PIT_BASE, 4, offset, i) {
                lock(&self.pit).write_port(p, b);
            }
        }
    }
}

impl BusDevice for PitPort61 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match port_of(PORT_61, 1, offset, i) {
                Some(p) => lock(&self.pit).read_port(p),
                None => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if let Some(p) = port_of(PORT_61, 1, offset, i) {
                lock(&self.pit).write_port(p, b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, BusKind};
    use crate::clock::ManualClock;
    use proptest::prelude::*;

    /// An IRQ line recording every level driven on it.
    #[derive(Clone, Default)]
    struct Irq(Arc<Mutex<Vec<bool>>>);

    impl IrqLine for Irq {
        fn set_level(&self, level: bool) {
            self.0.lock().unwrap().push(level);
        }
    }

    impl Irq {
        fn take(&self) -> Vec<bool> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
        fn levels(&self) -> Vec<bool> {
            self.0.lock().unwrap().clone()
        }
        fn level(&self) -> bool {
            self.0.lock().unwrap().last().copied().unwrap_or(false)
        }
    }

    struct Rig {
        pit: Pit8254,
        clock: ManualClock,
        irq: Irq,
        taint: TimeTaint,
    }

    fn rig() -> Rig {
        let clock = ManualClock::new();
        let irq = Irq::default();
        let taint = TimeTaint::new();
        let pit = Pit8254::new(
            Arc::new(clock.clone()),
            Box::new(irq.clone()),
            taint.clone(),
        );
        Rig {
            pit,
            clock,
            irq,
            taint,
        }
    }

    impl Rig {
        /// Move to the instant of tick `t`.
        fn at(&self, t: u64) {
            self.clock.set(tick_ns(t));
        }
        /// Move to the last ns before tick `t`.
        fn before(&self, t: u64) {
            self.clock.set(tick_ns(t) - 1);
        }
        fn wr(&mut self, port: u16, v: u8) {
            self.pit.write_port(port, v);
        }
        fn rd(&mut self, port: u16) -> u8 {
            self.pit.read_port(port)
        }
        /// Counter latch command, then two reads (lobyte/hibyte access).
        fn latched(&mut self, ch: u8) -> u16 {
            self.wr(0x43, ch << 6);
            let lo = self.rd(0x40 + u16::from(ch));
            let hi = self.rd(0x40 + u16::from(ch));
            u16::from_le_bytes([lo, hi])
        }
        fn out(&mut self, ch: usize) -> bool {
            self.pit.output(ch)
        }
        /// Program channel `ch` with control word `cw` and a two-byte count.
        fn program(&mut self, cw: u8, count: u16) {
            let ch = u16::from(cw >> 6);
            self.wr(0x43, cw);
            let [lo, hi] = count.to_le_bytes();
            self.wr(0x40 + ch, lo);
            self.wr(0x40 + ch, hi);
        }
        fn gate2(&mut self, level: bool) {
            let v = self.rd(0x61);
            self.wr(0x61, (v & 0x0e) | u8::from(level));
        }
        fn out2_bit(&mut self) -> bool {
            self.rd(0x61) & 0x20 != 0
        }
        /// OUT of channel `ch` at the last ns before tick `t` and at `t`.
        fn edge_at(&mut self, ch: usize, t: u64) -> (bool, bool) {
            self.before(t);
            let a = self.out(ch);
            self.at(t);
            (a, self.out(ch))
        }
    }

    #[test]
    fn tick_times_round_trip() {
        for t in [0u64, 1, 2, 838, 1_193_181, 1_193_182, 1 << 40] {
            assert_eq!(ticks(tick_ns(t)), t);
            if t > 0 {
                assert_eq!(ticks(tick_ns(t) - 1), t - 1);
            }
        }
        assert_eq!(tick_ns(PIT_HZ), 1_000_000_000);
        assert_eq!(tick_ns(u64::MAX), u64::MAX);
        assert_eq!(bcd_decode(0x9999), 9999);
        assert_eq!(bcd_encode(1234), 0x1234);
        assert_eq!(bcd_decode(0x00ab), 111);
    }

    #[test]
    fn power_on_state() {
        let mut r = rig();
        assert_eq!(r.irq.take(), vec![true]);
        // Channel 0: mode 3, count 65536: low after 32768 ticks.
        assert_eq!(r.pit.next_deadline(), Some(tick_ns(32768)));
        // Read-back status: OUT high, mode 3 / mode 2 / mode 3.
        r.wr(0x43, 0xe2);
        assert_eq!(r.rd(0x40), 0xb6);
        r.wr(0x43, 0xe4);
        assert_eq!(r.rd(0x41), 0x94);
        r.wr(0x43, 0xe8);
        assert_eq!(r.rd(0x42), 0xb6);
        r.at(32768);
        r.pit.advance(tick_ns(32768));
        assert_eq!(r.irq.take(), vec![false]);
        assert_eq!(r.pit.next_deadline(), Some(tick_ns(65536)));
        assert_eq!(r.rd(0x61) & 0x2f, 0x20);
    }

    #[test]
    fn mode0_interrupt_on_terminal_count() {
        let mut r = rig();
        r.at(100);
        r.wr(0x43, 0x30);
        assert!(!r.out(0), "low after the control word");
        r.irq.take();
        r.wr(0x40, 5);
        r.wr(0x40, 0);
        // Loaded on tick 101, reaches 0 on tick 106.
        assert_eq!(r.pit.next_deadline(), Some(tick_ns(106)));
        r.at(101);
        assert_eq!(r.latched(0), 5);
        r.at(105);
        assert_eq!(r.latched(0), 1);
        assert_eq!(r.edge_at(0, 106), (false, true));
        assert_eq!(r.latched(0), 0);
        assert_eq!(r.irq.take(), vec![true]);
        // Wraps and keeps counting; OUT stays high.
        r.at(107);
        assert_eq!(r.latched(0), 0xffff);
        r.at(200);
        assert!(r.out(0));
        assert_eq!(r.latched(0), 5u16.wrapping_sub(99));
        assert_eq!(r.pit.next_deadline(), None);
        // A new count: OUT drops at the first byte, counting restarts.
        r.wr(0x40, 3);
        assert!(!r.out(0));
        r.at(203);
        assert_eq!(r.latched(0), 0xffffu16.wrapping_sub(200 - 107));
        r.wr(0x40, 0);
        assert_eq!(r.edge_at(0, 207), (false, true));
        assert_eq!(r.irq.take(), vec![false, true]);
    }

    #[test]
    fn mode0_lobyte_count_and_gate_pause() {
        let mut r = rig();
        r.at(50);
        r.gate2(true);
        r.wr(0x43, 0x90); // channel 2, lobyte, mode 0
        r.wr(0x42, 10);
        // Loaded at 51 (10), 54: 7.
        r.at(54);
        r.gate2(false);
        r.at(200);
        r.wr(0x43, 0x80);
        assert_eq!(r.rd(0x42), 7);
        assert!(!r.out2_bit());
        // Counting resumes on the next clock: 6 at 201, 0 at 207.
        r.gate2(true);
        r.at(201);
        r.wr(0x43, 0x80);
        assert_eq!(r.rd(0x42), 6);
        assert_eq!(r.edge_at(2, 207), (false, true));
    }

    #[test]
    fn mode1_hardware_retriggerable_one_shot() {
        let mut r = rig();
        r.at(10);
        r.program(0xb2, 3); // channel 2, lohi, mode 1
        assert!(r.out(2));
        r.at(20);
        assert!(r.out(2), "no trigger yet");
        r.gate2(true);
        // OUT low on the clock after the trigger, high 3 clocks later.
        assert_eq!(r.edge_at(2, 21), (true, false));
        assert_eq!(r.latched(2), 3);
        assert_eq!(r.edge_at(2, 24), (false, true));
        assert!(r.out2_bit());
        // Retrigger while counting restarts the count.
        r.at(30);
        r.gate2(false);
        r.gate2(true);
        assert_eq!(r.edge_at(2, 31), (true, false));
        r.at(32);
        r.gate2(false);
        r.gate2(true);
        r.at(35);
        assert!(!r.out(2));
        assert_eq!(r.edge_at(2, 36), (false, true));
        // Gate low has no effect on counting.
        r.gate2(false);
        r.at(40);
        assert_eq!(r.latched(2), 0xffff - 3);
    }

    #[test]
    fn mode2_rate_generator() {
        let mut r = rig();
        r.at(1000);
        r.program(0x34, 4);
        assert!(r.out(0), "high after the control word");
        r.at(1001);
        let mut seen = vec![];
        for t in 1001..1010 {
            r.at(t);
            seen.push((r.latched(0), r.out(0)));
        }
        assert_eq!(
            seen,
            vec![
                (4, true),
                (3, true),
                (2, true),
                (1, false),
                (4, true),
                (3, true),
                (2, true),
                (1, false),
                (4, true)
            ]
        );
    }

    #[test]
    fn mode3_square_wave_even_and_odd() {
        let mut r = rig();
        r.at(10);
        r.gate2(true);
        r.program(0xb6, 6);
        let mut seen = vec![];
        for t in 11..18 {
            r.at(t);
            seen.push((r.latched(2), r.out2_bit()));
        }
        assert_eq!(
            seen,
            vec![
                (6, true),
                (4, true),
                (2, true),
                (6, false),
                (4, false),
                (2, false),
                (6, true)
            ]
        );
        // Odd count: high (N+1)/2, low (N-1)/2.
        r.at(100);
        r.program(0xb6, 5);
        let mut seen = vec![];
        for t in 101..108 {
            r.at(t);
            seen.push((r.latched(2), r.out2_bit()));
        }
        assert_eq!(
            seen,
            vec![
                (5, true),
                (4, true),
                (2, true),
                (5, false),
                (2, false),
                (5, true),
                (4, true)
            ]
        );
        // Mode 7 is mode 3; the status shows the bits as programmed.
        r.at(200);
        r.program(0xbe, 2);
        r.wr(0x43, 0xe8);
        assert_eq!(r.rd(0x42) & 0x0e, 0x0e);
        assert_eq!(r.edge_at(2, 202), (true, false));
        assert_eq!(r.edge_at(2, 203), (false, true));
    }

    #[test]
    fn mode4_software_strobe() {
        let mut r = rig();
        r.at(10);
        r.program(0x38, 3);
        r.irq.take();
        assert!(r.out(0));
        assert_eq!(r.pit.next_deadline(), Some(tick_ns(14)));
        assert_eq!(r.edge_at(0, 14), (true, false));
        assert_eq!(r.latched(0), 0);
        assert_eq!(r.edge_at(0, 15), (false, true));
        assert_eq!(r.latched(0), 0xffff);
        assert_eq!(r.irq.take(), vec![false, true]);
        assert_eq!(r.pit.next_deadline(), None);
        r.at(1000);
        assert!(r.out(0));
    }

    #[test]
    fn mode5_hardware_strobe() {
        let mut r = rig();
        r.at(10);
        r.program(0xba, 3);
        r.at(20);
        assert!(r.out(2));
        r.gate2(true);
        r.at(23);
        assert!(r.out(2));
        assert_eq!(r.edge_at(2, 24), (true, false));
        assert_eq!(r.edge_at(2, 25), (false, true));
        r.at(40);
        assert!(r.out(2));
    }

    #[test]
    fn mode6_is_mode2_and_count_0_is_65536() {
        let mut r = rig();
        r.at(0);
        r.program(0x3c, 0);
        r.wr(0x43, 0xe2);
        assert_eq!(r.rd(0x40) & 0x0e, 0x0c);
        assert_eq!(r.pit.next_deadline(), Some(tick_ns(65536)));
        r.at(1);
        assert_eq!(r.latched(0), 0);
        r.at(2);
        assert_eq!(r.latched(0), 0xffff);
        assert_eq!(r.edge_at(0, 65536), (true, false));
        assert_eq!(r.edge_at(0, 65537), (false, true));
        assert_eq!(r.latched(0), 0);
    }

    #[test]
    fn bcd_counting() {
        let mut r = rig();
        r.at(0);
        r.gate2(true);
        r.program(0xb1, 0x0010);
        r.at(1);
        assert_eq!(r.latched(2), 0x0010);
        r.at(2);
        assert_eq!(r.latched(2), 0x0009);
        r.at(11);
        assert_eq!(r.latched(2), 0x0000);
        assert!(r.out2_bit());
        r.at(12);
        assert_eq!(r.latched(2), 0x9999);
        // Count 0 is 10000 in BCD.
        r.at(100);
        r.program(0xb1, 0);
        r.at(101);
        assert_eq!(r.latched(2), 0);
        r.at(102);
        assert_eq!(r.latched(2), 0x9999);
        assert_eq!(r.edge_at(2, 10_101), (false, true));
        // BCD mode 2: period 25 decimal.
        r.at(20_000);
        r.program(0x35, 0x0025);
        assert_eq!(r.pit.next_deadline(), Some(tick_ns(20_000 + 25)));
        r.at(20_002);
        assert_eq!(r.latched(0), 0x0024);
    }

    #[test]
    fn counter_latch_holds_its_value() {
        let mut r = rig();
        r.at(0);
        r.program(0x34, 1000);
        r.at(101);
        r.wr(0x43, 0x00);
        r.at(500);
        // A second latch before the first is read is ignored.
        r.wr(0x43, 0x00);
        assert_eq!(r.rd(0x40), (900u16 & 0xff) as u8);
        r.wr(0x43, 0x00);
        assert_eq!(r.rd(0x40), (900u16 >> 8) as u8);
        // Released: live reads now (lobyte then hibyte).
        let lo = r.rd(0x40);
        let hi = r.rd(0x40);
        assert_eq!(u16::from_le_bytes([lo, hi]), 1000 - 499);
        // A latch after the release takes a new value.
        assert_eq!(r.latched(0), 1000 - 499);
    }

    #[test]
    fn read_back_command() {
        let mut r = rig();
        r.at(10);
        r.program(0x34, 0x1234);
        r.gate2(true);
        r.program(0xb0, 0x0100);
        // Count and status of channels 0 and 2, at the write tick: null
        // count is set until the load clock.
        r.wr(0x43, 0xca);
        assert_eq!(r.rd(0x40), 0x80 | 0x40 | 0x34);
        // The old CE (power-on mode 3, 65536 - 2 * 10) until the load.
        assert_eq!(r.rd(0x40), 0xec);
        assert_eq!(r.rd(0x40), 0xff);
        assert_eq!(r.rd(0x42), 0x40 | 0x30);
        r.rd(0x42);
        r.rd(0x42);
        r.at(11);
        r.wr(0x43, 0xca);
        assert_eq!(r.rd(0x40), 0x80 | 0x34);
        assert_eq!(r.rd(0x40), 0x34);
        assert_eq!(r.rd(0x40), 0x12);
        assert_eq!(r.rd(0x42), 0x30);
        assert_eq!(r.rd(0x42), 0x00);
        assert_eq!(r.rd(0x42), 0x01);
        // Status only; count only; a second status latch is ignored.
        r.at(20);
        r.wr(0x43, 0xe2);
        r.at(11 + 0x100);
        r.wr(0x43, 0xe6);
        assert_eq!(r.rd(0x40), 0x80 | 0x34);
        assert_eq!(r.rd(0x41), 0x94);
        r.wr(0x43, 0xd8);
        assert_eq!(r.rd(0x42), 0x00);
        assert_eq!(r.rd(0x42), 0x00);
        assert!(r.out2_bit());
        // Status latched before the count is read first.
        r.wr(0x43, 0xd2);
        r.wr(0x43, 0xe2);
        assert_eq!(r.rd(0x40), 0x80 | 0x34);
        let lo = r.rd(0x40);
        assert_eq!(u16::from_le_bytes([lo, r.rd(0x40)]), 0x1234 - 0x100);
    }

    #[test]
    fn byte_access_modes_and_flip_flops() {
        let mut r = rig();
        r.at(0);
        r.gate2(true);
        // Lobyte only.
        r.wr(0x43, 0x90);
        r.wr(0x42, 0x34);
        assert_eq!(r.pit.state().channels[2].count, 0x0034);
        // Hibyte only.
        r.wr(0x43, 0xa0);
        r.wr(0x42, 0x12);
        assert_eq!(r.pit.state().channels[2].count, 0x1200);
        r.at(1);
        r.wr(0x43, 0x80);
        assert_eq!(r.rd(0x42), 0x12);
        assert_eq!(r.rd(0x42), 0x12, "hibyte mode: every read is the high byte");
        r.at(2);
        assert_eq!(r.rd(0x42), 0x11, "live");
        // Lobyte/hibyte: reads and writes have separate flip-flops.
        r.wr(0x43, 0xb0);
        r.wr(0x42, 0x00);
        r.wr(0x42, 0x50);
        r.at(10);
        r.wr(0x43, 0x80);
        assert_eq!(r.rd(0x42), 0xf9);
        r.wr(0x42, 0x22);
        assert_eq!(r.rd(0x42), 0x4f);
        r.wr(0x42, 0x11);
        assert_eq!(r.pit.state().channels[2].count, 0x1122);
        // The control word resets the flip-flops and latches.
        r.wr(0x43, 0x80);
        r.rd(0x42);
        r.wr(0x42, 0x99);
        r.wr(0x43, 0xb0);
        let st = &r.pit.state().channels[2];
        assert_eq!((st.count_latch, st.write_low), (None, None));
        assert!(!st.read_msb_next);
    }

    #[test]
    fn linux_pit_calibrate_tsc() {
        let mut r = rig();
        r.at(5000);
        // Gate high, speaker off.
        let v = r.rd(0x61);
        r.wr(0x61, (v & !0x02) | 0x01);
        // Channel 2, mode 0, lobyte/hibyte, 10 ms.
        let latch: u64 = PIT_HZ / 100;
        r.wr(0x43, 0xb0);
        r.wr(0x42, (latch & 0xff) as u8);
        r.wr(0x42, (latch >> 8) as u8);
        assert!(!r.out2_bit());
        r.before(5001 + latch);
        assert!(!r.out2_bit());
        r.at(5001 + latch);
        assert!(r.out2_bit());
        // Stays set.
        r.at(5001 + 3 * latch);
        assert!(r.out2_bit());
    }

    #[test]
    fn linux_quick_pit_calibrate() {
        let mut r = rig();
        r.at(777);
        let v = r.rd(0x61);
        r.wr(0x61, (v & !0x02) | 0x01);
        r.wr(0x43, 0xb0);
        r.wr(0x42, 0xff);
        r.wr(0x42, 0xff);
        // Direct (unlatched) lobyte/hibyte reads; the MSB steps down once
        // every 256 clocks.
        let msb = |r: &mut Rig| {
            r.rd(0x42);
            r.rd(0x42)
        };
        let base = 778;
        for i in 0..100u64 {
            r.before(base + 256 * i + 256);
            assert_eq!(msb(&mut r), 0xff - i as u8);
            r.at(base + 256 * i + 256);
            assert_eq!(msb(&mut r), 0xfe - i as u8);
        }
    }

    #[test]
    fn port61_bits_and_refresh_toggle() {
        let mut r = rig();
        r.wr(0x61, 0xff);
        assert_eq!(r.pit.state().port61, 0x0f);
        assert_eq!(r.rd(0x61) & 0xcf, 0x0f);
        r.wr(0x61, 0x02);
        r.clock.set(REFRESH_PERIOD_NS - 1);
        assert_eq!(r.rd(0x61) & 0x10, 0);
        r.clock.set(REFRESH_PERIOD_NS);
        assert_eq!(r.rd(0x61) & 0x10, 0x10);
        r.clock.set(2 * REFRESH_PERIOD_NS);
        assert_eq!(r.rd(0x61) & 0x10, 0);
        assert_eq!(r.rd(0x61) & 0xc3, 0x02);
    }

    #[test]
    fn gate_in_modes_2_and_3() {
        let mut r = rig();
        r.at(0);
        r.gate2(true);
        r.program(0xb4, 4); // channel 2, mode 2
        r.at(4);
        assert!(!r.out(2));
        // Gate low forces OUT high and stops counting.
        r.gate2(false);
        assert!(r.out(2));
        r.at(100);
        assert_eq!(r.latched(2), 1);
        assert!(r.out(2));
        // Rising gate reloads on the next clock.
        r.gate2(true);
        r.at(101);
        assert_eq!(r.latched(2), 4);
        assert_eq!(r.edge_at(2, 104), (true, false));
        // Mode 3 likewise.
        r.at(200);
        r.program(0xb6, 10);
        r.at(206);
        assert!(!r.out(2));
        r.gate2(false);
        assert!(r.out(2));
        r.at(300);
        r.gate2(true);
        r.at(301);
        assert_eq!(r.latched(2), 10);
        assert_eq!(r.edge_at(2, 306), (true, false));
    }

    #[test]
    fn new_count_waits_for_the_end_of_the_period() {
        let mut r = rig();
        r.at(0);
        r.program(0x34, 10);
        r.at(5);
        r.wr(0x40, 4);
        r.wr(0x40, 0);
        r.wr(0x43, 0xe2);
        assert_eq!(r.rd(0x40) & 0x40, 0x40, "null count");
        r.at(10);
        assert_eq!(r.latched(0), 1);
        assert!(!r.out(0));
        r.at(11);
        assert_eq!(r.latched(0), 4);
        assert!(r.out(0));
        r.wr(0x43, 0xe2);
        assert_eq!(r.rd(0x40) & 0x40, 0);
        assert_eq!(r.edge_at(0, 14), (true, false));
        assert_eq!(r.edge_at(0, 15), (false, true));
        // Mode 3: at the end of the half period, starting with the low half.
        r.at(100);
        r.gate2(true);
        r.program(0xb6, 8);
        // High 101-104, low from 105.
        r.at(102);
        r.wr(0x42, 6);
        r.wr(0x42, 0);
        assert_eq!(r.edge_at(2, 105), (true, false));
        assert_eq!(r.latched(2), 6);
        assert_eq!(r.edge_at(2, 108), (false, true));
        assert_eq!(r.edge_at(2, 111), (true, false));
    }

    #[test]
    fn channel0_periodic_irq_with_deadlines() {
        let mut r = rig();
        r.at(0);
        r.program(0x34, 100);
        r.irq.take();
        let mut deadlines = vec![];
        for _ in 0..6 {
            let d = r.pit.next_deadline().unwrap();
            deadlines.push(d);
            r.clock.set(d);
            r.pit.advance(d);
        }
        assert_eq!(
            deadlines,
            [100, 101, 200, 201, 300, 301].map(tick_ns).to_vec()
        );
        assert_eq!(r.irq.take(), vec![false, true, false, true, false, true]);
        // Calling advance early does nothing.
        r.pit.advance(tick_ns(350));
        assert!(r.irq.take().is_empty());
        // Late by ten periods: one rising edge now; the nine others are
        // owed and follow a quarter period apart, between the regular ones.
        r.clock.set(tick_ns(1350));
        r.pit.advance(tick_ns(1350));
        assert_eq!(r.irq.take(), vec![false, true]);
        assert_eq!(r.pit.state().lost_ticks, 9);
        let mut now = tick_ns(1350);
        while r.pit.state().lost_ticks > 0 {
            now = r.pit.next_deadline().unwrap();
            assert!(now - tick_ns(1350) < tick_ns(1000), "catch-up too slow");
            r.clock.set(now);
            r.pit.advance(now);
        }
        let regular = (1..100u64)
            .filter(|k| (tick_ns(1350) + 1..=now).contains(&tick_ns(k * 100 + 1)))
            .count();
        let rises = r.irq.take().iter().filter(|&&l| l).count();
        assert_eq!(rises, 9 + regular);
        // Late and ending low: a pulse, then low.
        r.clock.set(tick_ns(5000));
        r.pit.advance(tick_ns(5000));
        assert_eq!(r.irq.take(), vec![false, true, false]);
        assert_eq!(r.pit.next_deadline(), Some(tick_ns(5001)));
        // Reprogramming forgets the owed ticks.
        assert!(r.pit.state().lost_ticks > 0);
        r.at(5001);
        r.rd(0x43);
        assert_eq!(r.irq.take(), vec![true]);
        r.program(0x34, 100);
        assert_eq!(r.pit.state().lost_ticks, 0);
        r.irq.take();
    }

    #[test]
    fn channel0_square_wave_and_late_advance() {
        let mut r = rig();
        r.at(0);
        r.program(0x36, 10);
        r.irq.take();
        // Late, missed a rise and ends low: one pulse, then low.
        r.clock.set(tick_ns(57));
        r.pit.advance(tick_ns(57));
        assert_eq!(r.irq.take(), vec![false, true, false]);
        assert_eq!(r.pit.next_deadline(), Some(tick_ns(61)));
        r.clock.set(tick_ns(61));
        r.pit.advance(tick_ns(61));
        assert_eq!(r.irq.take(), vec![true]);
        assert_eq!(r.pit.next_deadline(), Some(tick_ns(66)));
    }

    #[test]
    fn pending_reload_from_a_silent_count_produces_a_deadline() {
        let mut r = rig();
        r.at(0);
        r.program(0x34, 1); // illegal count 1: OUT stays low
        r.at(5);
        assert!(!r.out(0));
        assert_eq!(r.pit.next_deadline(), None);
        r.wr(0x40, 3);
        r.wr(0x40, 0);
        assert_eq!(r.pit.next_deadline(), Some(tick_ns(6)));
        r.irq.take();
        r.clock.set(tick_ns(6));
        r.pit.advance(tick_ns(6));
        assert_eq!(r.irq.take(), vec![true]);
        assert_eq!(r.pit.next_deadline(), Some(tick_ns(8)));
    }

    #[test]
    fn time_taint_marking() {
        let mut r = rig();
        r.taint.take();
        r.wr(0x43, 0x34);
        r.wr(0x40, 1);
        r.wr(0x40, 1);
        r.wr(0x61, 0);
        assert!(!r.taint.take());
        assert_eq!(r.rd(0x43), 0xff);
        assert!(!r.taint.take());
        for port in [0x40, 0x41, 0x42, 0x61] {
            r.rd(port);
            assert!(r.taint.take(), "{port:#x}");
        }
        // Latched values and status count too.
        r.wr(0x43, 0xc2);
        r.rd(0x40);
        assert!(r.taint.take());
        r.pit.advance(1_000_000);
        assert!(!r.taint.take());
    }

    #[test]
    fn restore_keeps_a_full_bcd_count_before_the_load() {
        // Channel 2 in BCD mode 0 with count 0 (= 10000), gated while it
        // loads: the CE value before the load tick is the full count, a
        // legal value the restore must keep (found by the proptest below).
        let mut r = rig();
        r.wr(0x61, 1);
        r.wr(0x43, 0x30);
        r.wr(0x40, 0);
        r.wr(0x40, 0);
        r.wr(0x43, 0xa1);
        r.wr(0x61, 2);
        r.wr(0x42, 0x9a);
        r.wr(0x61, 0x37);
        let st = r.pit.state();
        let mut q = Pit8254::new(
            Arc::new(r.clock.clone()),
            Box::new(Irq::default()),
            r.taint.clone(),
        );
        q.restore(&st);
        assert_eq!(q.state(), st);
    }

    #[test]
    fn state_restore_round_trip() {
        let mut r = rig();
        r.at(100);
        r.gate2(true);
        r.program(0x34, 1000);
        r.program(0xb6, 333);
        r.wr(0x43, 0x00);
        r.wr(0x41, 0x55);
        r.at(450);
        r.wr(0x40, 0x10); // half a count
        let st = r.pit.state();
        let irq = Irq::default();
        let mut q = Pit8254::new(
            Arc::new(r.clock.clone()),
            Box::new(irq.clone()),
            r.taint.clone(),
        );
        q.restore(&st);
        assert_eq!(q.state(), st);
        assert_eq!(irq.level(), st.irq_level);
        for t in [451u64, 700, 1100, 5000] {
            r.at(t);
            for port in [0x40, 0x41, 0x42, 0x61] {
                assert_eq!(q.read_port(port), r.rd(port), "{port:#x} at {t}");
            }
            assert_eq!(q.next_deadline(), r.pit.next_deadline());
        }
        assert_eq!(q.state(), r.pit.state());
        // Garbage is clamped.
        let mut bad = st.clone();
        bad.port61 = 0xfe;
        bad.channels[0].access = 0;
        bad.channels[0].mode = 0xff;
        bad.channels[1].counting = PitCounting::Running {
            load_ns: u64::MAX,
            start: 0,
            fired: false,
            high_first: false,
            pre_value: u32::MAX,
            pre_out: true,
        };
        bad.channels[2].counting = PitCounting::Stopped {
            value: u32::MAX,
            fired: false,
            out: false,
        };
        q.restore(&bad);
        let s = q.state();
        assert_eq!(s.port61, 0x0e);
        assert!(!s.channels[2].gate && s.channels[0].gate);
        assert_eq!(s.channels[0].access, 3);
        assert_eq!(s.channels[0].mode, 7);
        for port in [0x40, 0x41, 0x42, 0x61] {
            q.read_port(port);
        }
        q.next_deadline();
        q.reset();
        assert_eq!(q.state(), Pit8254State::power_on(r.clock.now_ns()));
    }

    #[test]
    fn bus_mapping() {
        let r = rig();
        let clock = r.clock.clone();
        let pit = Arc::new(Mutex::new(r.pit));
        let mut bus = Bus::new(BusKind::Pio);
        bus.insert(
            crate::bus::DeviceId(0),
            "pit",
            PIT_BASE.into(),
            4,
            Arc::new(Mutex::new(pit_ports(pit.clone()))),
        )
        .unwrap();
        bus.insert(
            crate::bus::DeviceId(0),
            "port61",
            PORT_61.into(),
            1,
            Arc::new(Mutex::new(port61(pit.clone()))),
        )
        .unwrap();
        assert!(bus.resolve(0x60, 1).is_none());
        assert!(bus.resolve(0x64, 1).is_none());
        // One 16-bit write: control word to 0x43 would be offset 3; write the
        // count bytes with a wide access to 0x40 instead (0x40 then 0x41).
        assert!(bus.write(0, 0x43, &[0xb0]).is_some());
        assert!(bus.write(0, 0x61, &[0x01]).is_some());
        assert!(bus.write(0, 0x42, &[0x10]).is_some());
        assert!(bus.write(0, 0x42, &[0x00]).is_some());
        clock.set(tick_ns(20));
        let mut b = [0u8];
        assert!(bus.read(0, 0x61, &mut b).is_some());
        assert_eq!(b[0] & 0x21, 0x21);
        let mut d = pit_ports(pit.clone());
        let mut buf = [0u8; 2];
        d.read(3, &mut buf);
        assert_eq!(buf, [0xff, 0xff]);
        d.write(4, &[0x00]);
        d.write(u64::MAX, &[0x00, 0x00]);
        let mut p = port61(pit.clone());
        p.read(0, &mut buf);
        assert_eq!(buf[1], 0xff);
        p.write(1, &[0x00]);
        assert!(lock(&pit).state().channels[2].gate);
    }

    /// One clock of the counting element as the datasheet describes it:
    /// the next (value, OUT) from the current ones.
    fn datasheet_step(mode: u8, n: u64, m: u64, v: u64, out: bool, fired: bool) -> (u64, bool) {
        match mode {
            2 => {
                if v == 1 {
                    (n, true)
                } else if v == 2 {
                    (1, false)
                } else {
                    (v - 1, true)
                }
            }
            3 => {
                let dec = if v == n && n % 2 == 1 {
                    if out {
                        1
                    } else {
                        3
                    }
                } else {
                    2
                };
                if v <= dec {
                    (n, !out)
                } else {
                    (v - dec, out)
                }
            }
            // One-shots: the OUT rule is applied by the caller.
            _ => ((v + m - 1) % m, out || fired),
        }
    }

    proptest! {
        #[test]
        fn closed_forms_agree_with_stepping(
            mode in 0u8..6,
            n in 1u64..40,
            fired in any::<bool>(),
            high_first in any::<bool>(),
            bcd in any::<bool>(),
            ea in 0u64..200,
        ) {
            let m = if bcd { 10_000 } else { 65_536 };
            // Count 1 is illegal in modes 2 and 3.
            prop_assume!(!(matches!(mode, 2 | 3) && n == 1));
            let high_first = high_first || mode != 3;
            let seg = Seg { mode, start: n, fired, high_first, modulus: m };
            // Step from e = 0 and compare every clock.
            let (mut v, mut out) = (n, seg.out(0));
            prop_assert_eq!(u64::from(seg.value(0)), n % m.max(n + 1));
            for e in 1..300u64 {
                let (nv, nout) = datasheet_step(mode, n, m, v, out, fired);
                v = nv;
                out = match mode {
                    0 | 1 => fired || e >= n,
                    4 | 5 => fired || e != n,
                    _ => nout,
                };
                prop_assert_eq!(u64::from(seg.value(e)), v % m, "value at {}", e);
                prop_assert_eq!(seg.out(e), out, "out at {}", e);
            }
            // next_change is the first e > ea where OUT differs from e - 1.
            let scan = (ea + 1..ea + 300).find(|&e| seg.out(e) != seg.out(e - 1));
            prop_assert_eq!(seg.next_change(ea), scan);
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(u16, u8),
        Read(u16),
        Wait(u64),
        Advance,
        AdvanceToDeadline,
        Wide(bool, bool, u64, Vec<u8>),
    }

    fn op() -> impl Strategy<Value = Op> {
        let port = prop_oneof![
            4 => 0x40u16..=0x43,
            1 => Just(0x61u16),
            1 => any::<u16>()
        ];
        prop_oneof![
            6 => (port.clone(), any::<u8>()).prop_map(|(p, v)| Op::Write(p, v)),
            3 => port.prop_map(Op::Read),
            3 => prop_oneof![0u64..2_000, 0u64..100_000_000].prop_map(Op::Wait),
            2 => Just(Op::Advance),
            2 => Just(Op::AdvanceToDeadline),
            1 => (
                any::<bool>(),
                any::<bool>(),
                prop_oneof![0u64..5, any::<u64>()],
                proptest::collection::vec(any::<u8>(), 0..5)
            )
                .prop_map(|(a, w, o, d)| Op::Wide(a, w, o, d)),
        ]
    }

    /// A few programming sequences that make interesting states likely.
    fn programs() -> impl Strategy<Value = Vec<Op>> {
        (0u8..3, 0u8..8, any::<bool>(), any::<u16>()).prop_map(|(ch, mode, bcd, count)| {
            let [lo, hi] = count.to_le_bytes();
            vec![
                Op::Write(0x61, 1),
                Op::Write(0x43, (ch << 6) | 0x30 | (mode << 1) | u8::from(bcd)),
                Op::Write(0x40 + u16::from(ch), lo),
                Op::Write(0x40 + u16::from(ch), hi),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_accesses_never_panic(
            pre in programs(),
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let r = rig();
            let (clock, irq) = (r.clock.clone(), r.irq.clone());
            let pit = Arc::new(Mutex::new(r.pit));
            let mut ports = pit_ports(pit.clone());
            let mut p61 = port61(pit.clone());
            for op in pre.into_iter().chain(ops) {
                match op {
                    Op::Write(p, v) => lock(&pit).write_port(p, v),
                    Op::Read(p) => { lock(&pit).read_port(p); }
                    Op::Wait(ns) => clock.advance_by(ns),
                    Op::Advance => lock(&pit).advance(clock.now_ns()),
                    Op::AdvanceToDeadline => {
                        let d = lock(&pit).next_deadline();
                        if let Some(d) = d {
                            prop_assert!(d > lock(&pit).state().line_ns);
                            if d - clock.now_ns().min(d) < 1_000_000_000 {
                                clock.set(d);
                                lock(&pit).advance(d);
                            }
                        }
                    }
                    Op::Wide(a, w, o, mut d) => {
                        let dev: &mut dyn BusDevice = if a { &mut ports } else { &mut p61 };
                        if w { dev.write(o, &d) } else { dev.read(o, &mut d) }
                    }
                }
                let mut p = lock(&pit);
                let out0 = p.output(0);
                prop_assert_eq!(irq.level(), out0);
                let s = p.state();
                for c in &s.channels {
                    prop_assert!((1..=3).contains(&c.access));
                    if let PitCounting::Running { start, .. } = c.counting {
                        prop_assert!(start >= 1 && start <= c.modulus());
                    }
                }
            }
            let levels = irq.levels();
            prop_assert!(levels.windows(2).all(|w| w[0] != w[1]));
            let p = lock(&pit);
            let irq2 = Irq::default();
            let mut q = Pit8254::new(Arc::new(clock.clone()), Box::new(irq2), TimeTaint::new());
            q.restore(&p.state());
            prop_assert_eq!(q.state(), p.state());
        }
    }
}
