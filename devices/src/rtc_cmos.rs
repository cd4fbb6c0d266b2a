//! The MC146818A real-time clock and CMOS RAM of the PC, as register logic
//! only.
//!
//! # Mapping
//!
//! [`RtcCmos`] is one [`BusDevice`] for ports 0x70..0x72 ([`PORT_COUNT`]):
//! offset 0 is the index port (write-only: bits 0-6 select the register,
//! bit 7 is the NMI mask of the PC, stored and exposed through
//! [`RtcCmos::nmi_masked`] for the machine to apply), offset 1 the data
//! port. The extended bank of later chipsets is optional: map
//! [`EXTENDED_PORT_COUNT`] ports (0x70..0x74) and offsets 2 / 3 (ports
//! 0x72 / 0x73) are a second index / data pair for bytes 128-255 (the index
//! written selects `0x80 | (value & 0x7f)`). Reads of an index port return
//! 0xff. Wide accesses are handled as byte accesses to consecutive ports;
//! bytes beyond the mapped ports read 0xff and are dropped.
//!
//! # Time
//!
//! Nothing reads host time. The constructor gets the wall-clock time at VM
//! start (seconds since the Unix epoch, UTC; the VMM passes the host's time,
//! or a fixed value in virtual-clock mode) and the RTC shows that time plus
//! the VM clock's elapsed time. The 32.768 kHz divider chain is a phase
//! origin in VM time (`div_origin_ns`); its cycle count is computed from
//! the clock, never stepped: the time registers advance (the "update")
//! every 32768 cycles, periodic interrupts come every 2^(RS-1) cycles. The
//! time itself is kept as an offset: RTC seconds = `secs_offset` + updates
//! since the origin. So every value is exact and [`RtcCmosState`] holds
//! only VM nanoseconds and offsets.
//!
//! * **Formats.** Time registers are read in the format register B asks for
//!   at the time of the read (DM bit: BCD or binary; 24/12 bit: in 12-hour
//!   mode hours are 1-12 with bit 7 = PM, so midnight is 12 AM and noon 12
//!   PM) - as QEMU does; the chip itself would need the time rewritten after
//!   a format change. The day of week (1 = Sunday) is computed from the
//!   date; writing it has no lasting effect. The century byte 0x32 follows
//!   the same format as the other time registers (BCD by default, as
//!   firmware and Linux expect).
//! * **Setting the time.** Setting SET (register B bit 7) freezes a copy of
//!   the time registers (and clears UIE and UIP, as the chip does): reads
//!   return that copy, writes change it. Clearing SET decodes the copy in
//!   the then-current format and makes it the RTC's time; the divider phase
//!   is kept, so the next update comes at the next second boundary. Out of
//!   range values are clamped (seconds to 59, day of month to the month's
//!   length, ...) where the chip would count through garbage. A write to a
//!   time register while SET is clear takes effect at once (as QEMU).
//! * **Divider.** Register A bits 6-4: 000, 001, 010 run (all treated as
//!   the 32.768 kHz time base, as QEMU); other values stop the chain (time
//!   frozen, no UIP, no interrupts). When it restarts, the first update
//!   comes 500 ms later, as the data sheet says for the divider reset.
//! * **UIP** (register A bit 7) is set during the last 8 divider cycles
//!   (244.14 µs) before each update, while the chain runs and SET is clear.
//!   The update itself is instantaneous (the chip takes 2 ms; UIP covers
//!   that window for software that follows the rules).
//! * **Interrupts.** Periodic (PF, rate RS3-0 of register A: 1 and 2 give
//!   256 and 128 Hz, 3-15 give 2^(16-RS) Hz, 0 none), alarm (AF, when an
//!   update makes seconds, minutes and hours equal the alarm bytes 1, 3, 5;
//!   a byte 0xC0-0xFF matches anything), update-ended (UF, every update).
//!   Each flag in register C is set whatever register B enables; IRQF
//!   (bit 7) and the IRQ8 line are high while a flag is set and its enable
//!   bit (PIE, AIE, UIE) too. Reading C returns and clears the flags and
//!   lowers IRQ8 (so the edge-triggered PIC sees each interrupt anew).
//! * **Lost periodic ticks.** With PIE set, periodic ticks that come while
//!   PF is still set (the guest has not read C yet), or that the VMM was late
//!   for, would merge into one interrupt. As QEMU's `lost_tick_policy=slew`
//!   does, the model counts them (at most [`MAX_LOST_TICKS`]) and, after
//!   each read of C, raises PF again [`REINJECT_DELAY_NS`] later while any
//!   are owed, so the guest sees every tick. Writing A or B forgets them.
//!   Daylight saving (DSE) and the square wave (SQWE) are stored only.
//! * **Scheduling.** [`Timed::next_deadline`] reports the next periodic tick
//!   while PIE is set and the next update while UIE or AIE is; flags whose
//!   interrupt is disabled are brought up to date at the next access (the
//!   alarm is checked for every second that passed, at most one day's
//!   worth). Every access first brings the model up to the clock's now.
//! * **Time taint.** Reads of the time registers (0, 2, 4, 6-9, 0x32),
//!   register A (UIP) and register C mark the [`TimeTaint`].
//!
//! # Registers at start
//!
//! As firmware leaves them (and QEMU starts): A = 0x26 (divider running,
//! 1024 Hz rate selected), B = 0x02 (24-hour, BCD, no interrupts), C = 0,
//! D = 0x80 (valid RAM and time). NVRAM is zero until the machine fills it:
//! [`RtcCmos::set_nvram`] and [`RtcCmos::set_memory_size`] (the BIOS
//! memory-size bytes). The RTC is battery-backed: a machine reset does not
//! reset it.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::clock::{Clock, TimeTaint, Timed};
use crate::irq::IrqLine;
use crate::ratelimit::RateLimiter;

/// The index port.
pub const INDEX_PORT: u16 = 0x70;
/// The data port.
pub const DATA_PORT: u16 = 0x71;
/// Ports to map at [`INDEX_PORT`] for the standard bank.
pub const PORT_COUNT: u64 = 2;
/// Ports to map at [`INDEX_PORT`] to include the extended bank at
/// 0x72 / 0x73.
pub const EXTENDED_PORT_COUNT: u64 = 4;

// Register indices.
pub const REG_SECONDS: u8 = 0x00;
pub const REG_SECONDS_ALARM: u8 = 0x01;
pub const REG_MINUTES: u8 = 0x02;
pub const REG_MINUTES_ALARM: u8 = 0x03;
pub const REG_HOURS: u8 = 0x04;
pub const REG_HOURS_ALARM: u8 = 0x05;
pub const REG_DAY_OF_WEEK: u8 = 0x06;
pub const REG_DAY_OF_MONTH: u8 = 0x07;
pub const REG_MONTH: u8 = 0x08;
pub const REG_YEAR: u8 = 0x09;
pub const REG_A: u8 = 0x0a;
pub const REG_B: u8 = 0x0b;
pub const REG_C: u8 = 0x0c;
pub const REG_D: u8 = 0x0d;
/// The century byte (IBM PC convention; ACPI FADT "century" = 0x32).
pub const REG_CENTURY: u8 = 0x32;
/// First general-purpose NVRAM byte.
pub const NVRAM_FIRST: u8 = 0x0e;

// Register A.
pub const A_UIP: u8 = 0x80;
const A_DV_MASK: u8 = 0x70;
const A_RS_MASK: u8 = 0x0f;
const A_WRITE_MASK: u8 = 0x7f;

// Register B.
pub const B_SET: u8 = 0x80;
pub const B_PIE: u8 = 0x40;
pub const B_AIE: u8 = 0x20;
pub const B_UIE: u8 = 0x10;
pub const B_SQWE: u8 = 0x08;
pub const B_DM_BINARY: u8 = 0x04;
pub const B_24H: u8 = 0x02;
pub const B_DSE: u8 = 0x01;

// Register C.
pub const C_IRQF: u8 = 0x80;
pub const C_PF: u8 = 0x40;
pub const C_AF: u8 = 0x20;
pub const C_UF: u8 = 0x10;
const C_FLAGS: u8 = C_PF | C_AF | C_UF;

/// Periodic interrupts owed to the guest at most; more are dropped.
pub const MAX_LOST_TICKS: u32 = 1000;
/// How long after a read of C an owed periodic interrupt comes.
pub const REINJECT_DELAY_NS: u64 = 10_000;

// Register D.
pub const D_VRT: u8 = 0x80;

/// The time base.
const OSC_HZ: u128 = 32_768;
/// Divider cycles per second (per update).
const CYCLES_PER_UPDATE: u64 = 32_768;
/// UIP is set for this many cycles before an update (244.14 µs).
const UIP_CYCLES: u64 = 8;
const NS_PER_SEC: i128 = 1_000_000_000;
const SECS_PER_DAY: i64 = 86_400;

/// Register A after firmware: time base running, RS = 6 (1024 Hz).
const A_INITIAL: u8 = 0x26;
/// Register B after firmware: 24-hour, BCD.
const B_INITIAL: u8 = B_24H;

/// The time registers as raw bytes (as read / written by the guest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimeRegs {
    pub seconds: u8,
    pub minutes: u8,
    pub hours: u8,
    pub day_of_week: u8,
    pub day_of_month: u8,
    pub month: u8,
    pub year: u8,
    pub century: u8,
}

impl TimeRegs {
    fn get(&self, reg: u8) -> Option<u8> {
        Some(match reg {
            REG_SECONDS => self.seconds,
            REG_MINUTES => self.minutes,
            REG_HOURS => self.hours,
            REG_DAY_OF_WEEK => self.day_of_week,
            REG_DAY_OF_MONTH => self.day_of_month,
            REG_MONTH => self.month,
            REG_YEAR => self.year,
            REG_CENTURY => self.century,
            _ => return None,
        })
    }

    fn slot(&mut self, reg: u8) -> Option<&mut u8> {
        Some(match reg {
            REG_SECONDS => &mut self.seconds,
            REG_MINUTES => &mut self.minutes,
            REG_HOURS => &mut self.hours,
            REG_DAY_OF_WEEK => &mut self.day_of_week,
            REG_DAY_OF_MONTH => &mut self.day_of_month,
            REG_MONTH => &mut self.month,
            REG_YEAR => &mut self.year,
            REG_CENTURY => &mut self.century,
            _ => return None,
        })
    }
}

fn is_time_reg(reg: u8) -> bool {
    matches!(
        reg,
        REG_SECONDS
            | REG_MINUTES
            | REG_HOURS
            | REG_DAY_OF_WEEK
            | REG_DAY_OF_MONTH
            | REG_MONTH
            | REG_YEAR
            | REG_CENTURY
    )
}

/// The RTC and CMOS state, for snapshots. Times are VM nanoseconds and
/// offsets, never host time.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RtcCmosState {
    /// Register selected by the index port (bits 0-6).
    pub index: u8,
    /// Index port bit 7.
    pub nmi_masked: bool,
    /// Byte selected by the extended index port (128-255).
    pub ext_index: u8,
    /// Register A, bits 0-6 (UIP is computed).
    pub reg_a: u8,
    pub reg_b: u8,
    /// Register C's PF, AF, UF (IRQF is computed).
    pub flags: u8,
    /// Alarm bytes: seconds, minutes, hours.
    pub alarm: [u8; 3],
    /// CMOS RAM; bytes 0x0e-0xff are used (except the century byte 0x32).
    #[serde(with = "crate::state::byte_array")]
    pub nvram: [u8; 256],
    /// RTC seconds = `secs_offset` + updates since `div_origin_ns`, while
    /// the divider runs.
    pub secs_offset: i64,
    /// The frozen time (Unix seconds) while the divider is stopped.
    pub held_secs: Option<i64>,
    /// The time registers copy while SET is set.
    pub set_image: Option<TimeRegs>,
    /// VM time (ns, may be negative) at which the divider's cycle count was 0.
    pub div_origin_ns: i64,
    /// VM time up to which flags are up to date.
    pub synced_ns: u64,
    /// Periodic interrupts merged into others, owed to the guest.
    #[serde(default)]
    pub lost_ticks: u32,
    /// When the next owed periodic interrupt is raised.
    #[serde(default)]
    pub reinject_ns: Option<u64>,
}

impl RtcCmosState {
    /// The state at VM start, showing `start_unix_secs` at VM time 0.
    pub fn new(start_unix_secs: i64) -> Self {
        RtcCmosState {
            index: 0,
            nmi_masked: false,
            ext_index: 0x80,
            reg_a: A_INITIAL,
            reg_b: B_INITIAL,
            flags: 0,
            alarm: [0; 3],
            nvram: [0; 256],
            secs_offset: start_unix_secs,
            held_secs: None,
            set_image: None,
            div_origin_ns: 0,
            synced_ns: 0,
            lost_ticks: 0,
            reinject_ns: None,
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01: (year, month 1-12, day 1-31).
fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m as u8, d as u8)
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: u8) -> u8 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Broken-down UTC time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tm {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 0 = Sunday.
    weekday: u8,
}

impl Tm {
    fn from_secs(secs: i64) -> Tm {
        let days = secs.div_euclid(SECS_PER_DAY);
        let sod = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        Tm {
            year,
            month,
            day,
            hour: (sod / 3600) as u8,
            minute: (sod / 60 % 60) as u8,
            second: (sod % 60) as u8,
            weekday: (days + 4).rem_euclid(7) as u8,
        }
    }

    fn to_secs(self) -> i64 {
        days_from_civil(self.year, i64::from(self.month), i64::from(self.day)) * SECS_PER_DAY
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0f)
}

/// The MC146818A RTC with its CMOS RAM. See the module documentation.
pub struct RtcCmos {
    s: RtcCmosState,
    clock: Arc<dyn Clock>,
    taint: TimeTaint,
    irq: Box<dyn IrqLine>,
    /// The level last driven on `irq`.
    irq_level: bool,
    log_limit: RateLimiter,
}

impl RtcCmos {
    /// An RTC showing `start_unix_secs` (UTC) at VM time 0, interrupting
    /// through `irq` (IRQ8). Reads of time-dependent registers mark `taint`.
    pub fn new(
        clock: Arc<dyn Clock>,
        taint: TimeTaint,
        irq: Box<dyn IrqLine>,
        start_unix_secs: u64,
    ) -> Self {
        let start = i64::try_from(start_unix_secs).unwrap_or(i64::MAX);
        let mut s = RtcCmosState::new(start);
        s.synced_ns = clock.now_ns();
        RtcCmos {
            s,
            clock,
            taint,
            irq,
            irq_level: false,
            log_limit: RateLimiter::new(10),
        }
    }

    /// A copy of the state, for snapshots.
    pub fn state(&self) -> RtcCmosState {
        self.s.clone()
    }

    /// Load a state (from [`RtcCmos::state`]). Reserved bits are cleared and
    /// the held time is made consistent with the divider, so any value is
    /// safe. IRQ8 is driven to the level the restored state implies.
    pub fn restore(&mut self, s: &RtcCmosState) {
        let mut s = s.clone();
        s.index &= 0x7f;
        s.ext_index |= 0x80;
        s.reg_a &= A_WRITE_MASK;
        s.flags &= C_FLAGS;
        s.lost_ticks = s.lost_ticks.min(MAX_LOST_TICKS);
        self.s = s;
        let synced = self.s.synced_ns;
        if self.running() {
            if let Some(h) = self.s.held_secs.take() {
                self.s.secs_offset = h.saturating_sub(self.updates(synced));
            }
        } else if self.s.held_secs.is_none() {
            self.s.held_secs = Some(self.s.secs_offset.saturating_add(self.updates(synced)));
        }
        if self.s.reg_b & B_SET == 0 {
            self.s.set_image = None;
        } else if self.s.set_image.is_none() {
            self.s.set_image = Some(self.image_of(self.current_secs(synced)));
        }
        self.irq_level = self.irq_output();
        self.irq.set_level(self.irq_level);
    }

    /// Index port bit 7 as last written: NMIs masked.
    pub fn nmi_masked(&self) -> bool {
        self.s.nmi_masked
    }

    /// The IRQ8 output level.
    pub fn irq_output(&self) -> bool {
        self.s.flags & self.s.reg_b & C_FLAGS != 0
    }

    /// The RTC's time now, as Unix seconds (the SET copy is not included).
    pub fn unix_time(&self) -> i64 {
        self.current_secs(self.clock.now_ns())
    }

    /// Set a CMOS RAM byte (`index` 0x0e-0xff, except the century byte
    /// 0x32); false for other indices.
    pub fn set_nvram(&mut self, index: u8, value: u8) -> bool {
        if index < NVRAM_FIRST || index == REG_CENTURY {
            return false;
        }
        self.s.nvram[usize::from(index)] = value;
        true
    }

    /// A CMOS RAM byte (`index` 0x0e-0xff, except 0x32).
    pub fn nvram(&self, index: u8) -> Option<u8> {
        (index >= NVRAM_FIRST && index != REG_CENTURY).then(|| self.s.nvram[usize::from(index)])
    }

    fn set_nvram16(&mut self, index: u8, value: u64) {
        let v = value.min(0xffff) as u16;
        let [lo, hi] = v.to_le_bytes();
        self.set_nvram(index, lo);
        self.set_nvram(index + 1, hi);
    }

    /// The memory-size bytes a BIOS leaves in CMOS: 0x15/0x16 base memory
    /// (KiB, at most 640), 0x17/0x18 and 0x30/0x31 memory above 1 MiB (KiB,
    /// at most 0xffff), 0x34/0x35 memory above 16 MiB below 4 GiB (64 KiB
    /// units, at most 0xffff), 0x5b-0x5d memory above 4 GiB (64 KiB units,
    /// 24 bits). All little-endian.
    pub fn set_memory_size(&mut self, below_4g_bytes: u64, above_4g_bytes: u64) {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        self.set_nvram16(0x15, below_4g_bytes.min(640 * KIB) / KIB);
        let ext = below_4g_bytes.saturating_sub(MIB) / KIB;
        self.set_nvram16(0x17, ext);
        self.set_nvram16(0x30, ext);
        self.set_nvram16(0x34, below_4g_bytes.saturating_sub(16 * MIB) / (64 * KIB));
        let high = (above_4g_bytes / (64 * KIB)).min(0xff_ffff) as u32;
        let b = high.to_le_bytes();
        for (i, &v) in b[..3].iter().enumerate() {
            self.set_nvram(0x5b + i as u8, v);
        }
    }

    // ----- Divider and time -----

    /// The divider chain runs (DV = 000, 001 or 010).
    fn running(&self) -> bool {
        self.s.reg_a & A_DV_MASK <= 0x20
    }

    /// Divider cycles since the origin at VM time `t`.
    fn cycles(&self, t: u64) -> u64 {
        let d = i128::from(t) - i128::from(self.s.div_origin_ns);
        if d <= 0 {
            return 0;
        }
        u64::try_from(d as u128 * OSC_HZ / NS_PER_SEC as u128).unwrap_or(u64::MAX)
    }

    /// The first VM nanosecond at which `cycles` divider cycles have passed.
    fn cycle_time(&self, cycles: u64) -> u64 {
        let ns = (u128::from(cycles) * NS_PER_SEC as u128).div_ceil(OSC_HZ) as i128
            + i128::from(self.s.div_origin_ns);
        u64::try_from(ns.max(0)).unwrap_or(u64::MAX)
    }

    /// Updates (second boundaries) since the origin at `t`.
    fn updates(&self, t: u64) -> i64 {
        (self.cycles(t) / CYCLES_PER_UPDATE) as i64
    }

    /// The periodic interrupt period in divider cycles (None: RS = 0).
    fn period_cycles(&self) -> Option<u64> {
        match self.s.reg_a & A_RS_MASK {
            0 => None,
            1 => Some(1 << 7),
            2 => Some(1 << 8),
            rs => Some(1 << (rs - 1)),
        }
    }

    /// The RTC's time (Unix seconds) at `now`, ignoring the SET copy.
    fn current_secs(&self, now: u64) -> i64 {
        self.s
            .held_secs
            .unwrap_or_else(|| self.s.secs_offset.saturating_add(self.updates(now)))
    }

    fn set_current_secs(&mut self, now: u64, secs: i64) {
        if self.running() {
            self.s.secs_offset = secs.saturating_sub(self.updates(now));
        } else {
            self.s.held_secs = Some(secs);
        }
    }

    fn uip(&self, now: u64) -> bool {
        self.running()
            && self.s.reg_b & B_SET == 0
            && self.cycles(now) % CYCLES_PER_UPDATE >= CYCLES_PER_UPDATE - UIP_CYCLES
    }

    // ----- Formats -----

    fn binary(&self) -> bool {
        self.s.reg_b & B_DM_BINARY != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            from_bcd(v)
        }
    }

    fn encode_hours(&self, h: u8) -> u8 {
        if self.s.reg_b & B_24H != 0 {
            self.encode(h)
        } else {
            let h12 = match h % 12 {
                0 => 12,
                x => x,
            };
            self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
        }
    }

    fn decode_hours(&self, raw: u8) -> u8 {
        if self.s.reg_b & B_24H != 0 {
            self.decode(raw).min(23)
        } else {
            let h12 = self.decode(raw & 0x7f).clamp(1, 12);
            h12 % 12 + if raw & 0x80 != 0 { 12 } else { 0 }
        }
    }

    /// The time registers showing `secs` in the current format.
    fn image_of(&self, secs: i64) -> TimeRegs {
        let tm = Tm::from_secs(secs);
        TimeRegs {
            seconds: self.encode(tm.second),
            minutes: self.encode(tm.minute),
            hours: self.encode_hours(tm.hour),
            day_of_week: self.encode(tm.weekday + 1),
            day_of_month: self.encode(tm.day),
            month: self.encode(tm.month),
            year: self.encode(tm.year.rem_euclid(100) as u8),
            century: self.encode(tm.year.div_euclid(100).rem_euclid(100) as u8),
        }
    }

    /// Decode time registers in the current format, clamping garbage.
    fn secs_of(&self, r: &TimeRegs) -> i64 {
        let year = i64::from(self.decode(r.century).min(99)) * 100
            + i64::from(self.decode(r.year).min(99));
        let month = self.decode(r.month).clamp(1, 12);
        let tm = Tm {
            year,
            month,
            day: self
                .decode(r.day_of_month)
                .clamp(1, days_in_month(year, month)),
            hour: self.decode_hours(r.hours),
            minute: self.decode(r.minutes).min(59),
            second: self.decode(r.seconds).min(59),
            weekday: 0,
        };
        tm.to_secs()
    }

    /// Do the alarm bytes match the time `secs` (only the time of day
    /// matters, so this needs no calendar)?
    fn alarm_matches(&self, secs: i64) -> bool {
        let sod = secs.rem_euclid(SECS_PER_DAY);
        let now = [
            self.encode((sod % 60) as u8),
            self.encode((sod / 60 % 60) as u8),
            self.encode_hours((sod / 3600) as u8),
        ];
        self.s
            .alarm
            .iter()
            .zip(now)
            .all(|(&a, n)| a & 0xc0 == 0xc0 || a == n)
    }

    // ----- Events -----

    /// Bring the flags up to `now`.
    fn sync(&mut self, now: u64) {
        if self.s.reinject_ns.is_some_and(|r| now >= r) {
            self.s.reinject_ns = None;
            if self.s.lost_ticks > 0 && self.s.reg_b & B_PIE != 0 {
                self.s.lost_ticks -= 1;
                self.s.flags |= C_PF;
            }
        }
        let from = self.s.synced_ns;
        if now <= from {
            return;
        }
        self.s.synced_ns = now;
        if !self.running() {
            return;
        }
        let c0 = self.cycles(from);
        let c1 = self.cycles(now);
        if let Some(p) = self.period_cycles() {
            let ticks = c1 / p - c0 / p;
            if ticks > 0 {
                if self.s.reg_b & B_PIE != 0 {
                    let merged = if self.s.flags & C_PF != 0 {
                        ticks
                    } else {
                        ticks - 1
                    };
                    let owed = u64::from(self.s.lost_ticks) + merged;
                    self.s.lost_ticks = owed.min(u64::from(MAX_LOST_TICKS)) as u32;
                }
                self.s.flags |= C_PF;
            }
        }
        if self.s.reg_b & B_SET != 0 {
            return;
        }
        let u0 = c0 / CYCLES_PER_UPDATE;
        let u1 = c1 / CYCLES_PER_UPDATE;
        if u1 > u0 {
            self.s.flags |= C_UF;
            // The alarm repeats daily at most: the last day is enough.
            let first = (u0 + 1).max(u1.saturating_sub(SECS_PER_DAY as u64 - 1));
            if (first..=u1).any(|u| self.alarm_matches(self.s.secs_offset.saturating_add(u as i64)))
            {
                self.s.flags |= C_AF;
            }
        }
    }

    fn update_irq(&mut self) {
        let level = self.irq_output();
        if level != self.irq_level {
            self.irq_level = level;
            self.irq.set_level(level);
        }
    }

    // ----- Registers -----

    fn read_reg(&mut self, reg: u8, now: u64) -> u8 {
        match reg {
            r if is_time_reg(r) => {
                self.taint.mark();
                let img = self
                    .s
                    .set_image
                    .unwrap_or_else(|| self.image_of(self.current_secs(now)));
                img.get(r).unwrap_or(0)
            }
            REG_SECONDS_ALARM => self.s.alarm[0],
            REG_MINUTES_ALARM => self.s.alarm[1],
            REG_HOURS_ALARM => self.s.alarm[2],
            REG_A => {
                self.taint.mark();
                self.s.reg_a | if self.uip(now) { A_UIP } else { 0 }
            }
            REG_B => self.s.reg_b,
            REG_C => {
                self.taint.mark();
                let v = self.s.flags | if self.irq_output() { C_IRQF } else { 0 };
                self.s.flags = 0;
                if self.s.lost_ticks > 0 && self.s.reg_b & B_PIE != 0 {
                    self.s.reinject_ns = Some(now.saturating_add(REINJECT_DELAY_NS));
                }
                v
            }
            REG_D => D_VRT,
            _ => self.s.nvram[usize::from(reg)],
        }
    }

    fn write_a(&mut self, value: u8, now: u64) {
        let was_running = self.running();
        let secs = self.current_secs(now);
        self.s.reg_a = value & A_WRITE_MASK;
        match (was_running, self.running()) {
            (true, false) => self.s.held_secs = Some(secs),
            (false, true) => {
                // The first update comes 500 ms after the divider restarts.
                self.s.div_origin_ns = i64::try_from(now)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(500_000_000);
                self.s.held_secs = None;
                self.set_current_secs(now, secs);
            }
            _ => {}
        }
    }

    fn write_b(&mut self, value: u8, now: u64) {
        let old = self.s.reg_b;
        let mut v = value;
        if v & B_SET != 0 {
            v &= !B_UIE;
            if old & B_SET == 0 {
                self.s.set_image = Some(self.image_of(self.current_secs(now)));
            }
        }
        self.s.reg_b = v;
        if v & B_SET == 0 {
            if let Some(img) = self.s.set_image.take() {
                let secs = self.secs_of(&img);
                self.set_current_secs(now, secs);
            }
        }
    }

    fn write_time_reg(&mut self, reg: u8, value: u8, now: u64) {
        if let Some(img) = &mut self.s.set_image {
            if let Some(slot) = img.slot(reg) {
                *slot = value;
            }
            return;
        }
        let mut img = self.image_of(self.current_secs(now));
        if let Some(slot) = img.slot(reg) {
            *slot = value;
        }
        let secs = self.secs_of(&img);
        self.set_current_secs(now, secs);
    }

    fn write_reg(&mut self, reg: u8, value: u8, now: u64) {
        match reg {
            r if is_time_reg(r) => self.write_time_reg(r, value, now),
            REG_SECONDS_ALARM => self.s.alarm[0] = value,
            REG_MINUTES_ALARM => self.s.alarm[1] = value,
            REG_HOURS_ALARM => self.s.alarm[2] = value,
            REG_A | REG_B => {
                // A new rate or interrupt enable: owed ticks are moot.
                self.s.lost_ticks = 0;
                self.s.reinject_ns = None;
                if reg == REG_A {
                    self.write_a(value, now);
                } else {
                    self.write_b(value, now);
                }
            }
            REG_C | REG_D => {
                if self.log_limit.allow() {
                    log::debug!("rtc: write {value:#04x} to read-only register {reg:#x} ignored");
                }
            }
            _ => self.s.nvram[usize::from(reg)] = value,
        }
    }

    /// One byte read at port offset `port` (0-3).
    fn read_port(&mut self, port: u64) -> u8 {
        match port {
            1 => {
                let now = self.clock.now_ns();
                self.sync(now);
                let v = self.read_reg(self.s.index, now);
                self.update_irq();
                v
            }
            3 => self.s.nvram[usize::from(self.s.ext_index)],
            // Index ports are write-only.
            _ => 0xff,
        }
    }

    fn write_port(&mut self, port: u64, value: u8) {
        match port {
            0 => {
                self.s.index = value & 0x7f;
                self.s.nmi_masked = value & 0x80 != 0;
            }
            1 => {
                let now = self.clock.now_ns();
                self.sync(now);
                self.write_reg(self.s.index, value, now);
                self.update_irq();
            }
            2 => self.s.ext_index = value | 0x80,
            3 => self.s.nvram[usize::from(self.s.ext_index)] = value,
            _ => {}
        }
    }
}

impl Timed for RtcCmos {
    fn next_deadline(&self) -> Option<u64> {
        if !self.running() {
            return None;
        }
        let c = self.cycles(self.s.synced_ns);
        let periodic = match self.period_cycles() {
            Some(p) if self.s.reg_b & B_PIE != 0 => Some(self.cycle_time((c / p + 1) * p)),
            _ => None,
        };
        let update = (self.s.reg_b & B_SET == 0 && self.s.reg_b & (B_UIE | B_AIE) != 0)
            .then(|| self.cycle_time((c / CYCLES_PER_UPDATE + 1) * CYCLES_PER_UPDATE));
        [periodic, update, self.s.reinject_ns]
            .into_iter()
            .flatten()
            .min()
    }

    fn advance(&mut self, now: u64) {
        self.sync(now);
        self.update_irq();
    }
}

impl BusDevice for RtcCmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match offset.checked_add(i as u64) {
                Some(port) if port < EXTENDED_PORT_COUNT => self.read_port(port),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if let Some(port) = offset.checked_add(i as u64) {
                if port < EXTENDED_PORT_COUNT {
                    self.write_port(port, b);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use proptest::prelude::*;
    use std::sync::Mutex;

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

    const SEC: u64 = 1_000_000_000;
    /// 2024-02-28 23:59:59 UTC, a Wednesday.
    const LEAP_EVE: u64 = 1_709_164_799;

    struct Rig {
        rtc: RtcCmos,
        clock: ManualClock,
        taint: TimeTaint,
        irq: Irq,
    }

    fn rig(start: u64) -> Rig {
        let clock = ManualClock::new();
        let taint = TimeTaint::new();
        let irq = Irq::default();
        let rtc = RtcCmos::new(
            Arc::new(clock.clone()),
            taint.clone(),
            Box::new(irq.clone()),
            start,
        );
        Rig {
            rtc,
            clock,
            taint,
            irq,
        }
    }

    impl Rig {
        fn rd(&mut self, reg: u8) -> u8 {
            self.rtc.write(0, &[reg]);
            let mut b = [0u8];
            self.rtc.read(1, &mut b);
            b[0]
        }
        fn wr(&mut self, reg: u8, v: u8) {
            self.rtc.write(0, &[reg]);
            self.rtc.write(1, &[v]);
        }
        /// seconds, minutes, hours, weekday, day, month, year, century.
        fn time(&mut self) -> [u8; 8] {
            [
                REG_SECONDS,
                REG_MINUTES,
                REG_HOURS,
                REG_DAY_OF_WEEK,
                REG_DAY_OF_MONTH,
                REG_MONTH,
                REG_YEAR,
                REG_CENTURY,
            ]
            .map(|r| self.rd(r))
        }
        fn at(&mut self, ns: u64) {
            self.clock.set(ns);
            self.rtc.advance(ns);
        }
        /// Let the VMM run its scheduler up to `ns`, one deadline at a time.
        fn run_until(&mut self, ns: u64) -> usize {
            let mut n = 0;
            while let Some(d) = self.rtc.next_deadline() {
                if d > ns {
                    break;
                }
                self.at(d);
                n += 1;
            }
            self.at(ns);
            n
        }
    }

    #[test]
    fn calendar_helpers_agree_with_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for d in [-800_000i64, -1, 0, 59, 10_000, 2_932_896] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, i64::from(m), i64::from(dd)), d);
        }
        assert_eq!(Tm::from_secs(LEAP_EVE as i64).weekday, 3);
        assert_eq!(Tm::from_secs(LEAP_EVE as i64).to_secs(), LEAP_EVE as i64);
    }

    #[test]
    fn registers_at_start() {
        let mut r = rig(LEAP_EVE);
        assert_eq!(r.rd(REG_A), 0x26);
        assert_eq!(r.rd(REG_B), 0x02);
        assert_eq!(r.rd(REG_C), 0x00);
        assert_eq!(r.rd(REG_D), 0x80);
        assert!(!r.rtc.nmi_masked());
        assert_eq!(r.rtc.next_deadline(), None);
        // Read-only registers.
        r.wr(REG_C, 0xff);
        r.wr(REG_D, 0x00);
        assert_eq!(r.rd(REG_C), 0x00);
        assert_eq!(r.rd(REG_D), 0x80);
        // The index port is write-only.
        let mut b = [0u8];
        r.rtc.read(0, &mut b);
        assert_eq!(b, [0xff]);
    }

    #[test]
    fn bcd_and_binary() {
        let mut r = rig(LEAP_EVE);
        assert_eq!(r.time(), [0x59, 0x59, 0x23, 0x04, 0x28, 0x02, 0x24, 0x20]);
        assert_eq!(r.rtc.unix_time(), LEAP_EVE as i64);
        r.wr(REG_B, B_24H | B_DM_BINARY);
        assert_eq!(r.time(), [59, 59, 23, 4, 28, 2, 24, 20]);
        assert!(r.taint.take());
        // Alarm / status / NVRAM reads are not time-dependent.
        r.rd(REG_B);
        r.rd(REG_SECONDS_ALARM);
        r.rd(0x40);
        assert!(!r.taint.take());
    }

    #[test]
    fn twelve_hour_mode_incl_midnight_and_noon() {
        // 2024-06-15 00:30:00.
        let mut r = rig(1_718_411_400);
        r.wr(REG_B, 0); // 12-hour, BCD
        assert_eq!(r.rd(REG_HOURS), 0x12, "00:30 is 12 AM");
        r.at(11 * 3600 * SEC);
        assert_eq!(r.rd(REG_HOURS), 0x11);
        r.at(12 * 3600 * SEC);
        assert_eq!(r.rd(REG_HOURS), 0x92, "12:30 is 12 PM");
        r.at(13 * 3600 * SEC);
        assert_eq!(r.rd(REG_HOURS), 0x81);
        r.at(23 * 3600 * SEC);
        assert_eq!(r.rd(REG_HOURS), 0x91);
        r.wr(REG_B, B_DM_BINARY);
        assert_eq!(r.rd(REG_HOURS), 0x8b);
        r.at(24 * 3600 * SEC);
        assert_eq!(r.rd(REG_HOURS), 12);
        r.at(36 * 3600 * SEC);
        assert_eq!(r.rd(REG_HOURS), 0x8c);
        // Setting 12 AM / 12 PM in 12-hour mode.
        r.wr(REG_B, B_SET);
        r.wr(REG_HOURS, 0x12);
        r.wr(REG_MINUTES, 0x00);
        r.wr(REG_SECONDS, 0x00);
        r.wr(REG_B, 0);
        r.wr(REG_B, B_24H);
        assert_eq!(r.rd(REG_HOURS), 0x00);
        r.wr(REG_B, B_SET);
        r.wr(REG_HOURS, 0x92);
        r.wr(REG_B, 0);
        r.wr(REG_B, B_24H);
        assert_eq!(r.rd(REG_HOURS), 0x12);
    }

    #[test]
    fn date_roll_over_midnight_leap_day_month_year_century() {
        let mut r = rig(LEAP_EVE);
        r.at(SEC);
        // Thursday 2024-02-29 00:00:00.
        assert_eq!(r.time(), [0x00, 0x00, 0x00, 0x05, 0x29, 0x02, 0x24, 0x20]);
        r.at(SEC + 86_400 * SEC);
        assert_eq!(r.time(), [0x00, 0x00, 0x00, 0x06, 0x01, 0x03, 0x24, 0x20]);
        // 2023 is not a leap year.
        let mut r = rig(1_677_628_799);
        r.at(SEC);
        assert_eq!(r.time(), [0x00, 0x00, 0x00, 0x04, 0x01, 0x03, 0x23, 0x20]);
        // 30-day month.
        let mut r = rig(1_714_521_599);
        r.at(SEC);
        assert_eq!(&r.time()[4..], &[0x01, 0x05, 0x24, 0x20]);
        // Year and century.
        let mut r = rig(1_735_689_599);
        r.at(SEC);
        assert_eq!(&r.time()[4..], &[0x01, 0x01, 0x25, 0x20]);
        let mut r = rig(4_102_444_799);
        assert_eq!(r.rd(REG_DAY_OF_WEEK), 0x05);
        r.at(SEC);
        assert_eq!(r.time(), [0x00, 0x00, 0x00, 0x06, 0x01, 0x01, 0x00, 0x21]);
        // Not one second early.
        let mut r = rig(LEAP_EVE);
        r.at(SEC - 1);
        assert_eq!(r.rd(REG_SECONDS), 0x59);
    }

    #[test]
    fn uip_window_timing() {
        let mut r = rig(LEAP_EVE);
        r.clock.set(SEC - 244_141);
        assert_eq!(r.rd(REG_A), 0x26);
        assert!(r.taint.take());
        r.clock.set(SEC - 244_140);
        assert_eq!(r.rd(REG_A), 0xa6);
        assert_eq!(r.rd(REG_SECONDS), 0x59);
        r.clock.set(SEC - 1);
        assert_eq!(r.rd(REG_A), 0xa6);
        r.clock.set(SEC);
        assert_eq!(r.rd(REG_A), 0x26);
        assert_eq!(r.rd(REG_SECONDS), 0x00);
        // SET clears it.
        r.clock.set(2 * SEC - 1000);
        assert_eq!(r.rd(REG_A) & A_UIP, A_UIP);
        r.wr(REG_B, B_24H | B_SET);
        assert_eq!(r.rd(REG_A) & A_UIP, 0);
        // So does a stopped divider.
        r.wr(REG_B, B_24H);
        r.wr(REG_A, 0x76);
        assert_eq!(r.rd(REG_A), 0x76);
        // Writes cannot set UIP.
        r.wr(REG_A, 0xa6);
        r.clock.set(2 * SEC + SEC / 2);
        assert_eq!(r.rd(REG_A), 0x26);
    }

    #[test]
    fn set_mode_and_writing_the_time() {
        let mut r = rig(LEAP_EVE);
        r.clock.set(SEC / 4);
        r.wr(REG_B, B_24H | B_SET | B_UIE);
        // SET clears UIE.
        assert_eq!(r.rd(REG_B), B_24H | B_SET);
        // Frozen while SET: the update at 1 s does not happen.
        r.at(3 * SEC / 2);
        assert_eq!(r.rd(REG_SECONDS), 0x59);
        assert_eq!(r.rd(REG_C) & C_UF, 0);
        for (reg, v) in [
            (REG_SECONDS, 0x56),
            (REG_MINUTES, 0x34),
            (REG_HOURS, 0x12),
            (REG_DAY_OF_MONTH, 0x31),
            (REG_MONTH, 0x12),
            (REG_YEAR, 0x99),
            (REG_CENTURY, 0x19),
        ] {
            r.wr(reg, v);
        }
        // Reads return what was written while SET is on.
        assert_eq!(r.rd(REG_MINUTES), 0x34);
        r.at(7 * SEC / 4);
        r.wr(REG_B, B_24H);
        assert_eq!(
            r.time(),
            [0x56, 0x34, 0x12, 0x06, 0x31, 0x12, 0x99, 0x19],
            "1999-12-31 was a Friday"
        );
        assert_eq!(r.rtc.unix_time(), 946_643_696);
        // The divider phase is kept: the next update at 2 s.
        r.at(2 * SEC - 1);
        assert_eq!(r.rd(REG_SECONDS), 0x56);
        r.at(2 * SEC);
        assert_eq!(r.rd(REG_SECONDS), 0x57);
        // Garbage is clamped.
        r.wr(REG_B, B_24H | B_SET);
        r.wr(REG_DAY_OF_MONTH, 0x31);
        r.wr(REG_MONTH, 0x02);
        r.wr(REG_SECONDS, 0x7a);
        r.wr(REG_B, B_24H);
        assert_eq!(r.rd(REG_DAY_OF_MONTH), 0x28);
        assert_eq!(r.rd(REG_SECONDS), 0x59);
        // A write while SET is clear takes effect at once.
        r.wr(REG_MINUTES, 0x00);
        assert_eq!(&r.time()[..3], &[0x59, 0x00, 0x12]);
        r.wr(REG_YEAR, 0x24);
        r.wr(REG_CENTURY, 0x20);
        assert_eq!(&r.time()[4..], &[0x28, 0x02, 0x24, 0x20]);
        // In binary.
        r.wr(REG_B, B_24H | B_DM_BINARY | B_SET);
        r.wr(REG_HOURS, 7);
        r.wr(REG_B, B_24H | B_DM_BINARY);
        assert_eq!(r.rd(REG_HOURS), 7);
    }

    #[test]
    fn divider_reset_holds_time_and_restarts_half_a_second_later() {
        let mut r = rig(LEAP_EVE);
        r.wr(REG_A, 0x20); // no periodic flag in the way
        r.wr(REG_SECONDS_ALARM, 0x30); // nor the alarm (0:0:0 = midnight)
        r.wr(REG_B, B_24H | B_UIE);
        r.clock.set(SEC / 2);
        r.wr(REG_A, 0x70);
        assert_eq!(r.rtc.next_deadline(), None);
        r.at(5 * SEC);
        assert_eq!(r.rd(REG_SECONDS), 0x59);
        assert_eq!(r.rd(REG_C), 0);
        r.clock.set(5 * SEC + 123);
        r.wr(REG_A, 0x20);
        assert_eq!(r.rtc.next_deadline(), Some(5 * SEC + 123 + SEC / 2));
        r.at(5 * SEC + 123 + SEC / 2 - 1);
        assert_eq!(r.rd(REG_SECONDS), 0x59);
        r.at(5 * SEC + 123 + SEC / 2);
        assert_eq!(r.rd(REG_SECONDS), 0x00);
        assert_eq!(r.rd(REG_C), C_IRQF | C_UF);
    }

    #[test]
    fn periodic_rates() {
        for (rs, hz) in [
            (1u8, 256u64),
            (2, 128),
            (3, 8192),
            (6, 1024),
            (10, 64),
            (15, 2),
        ] {
            let mut r = rig(LEAP_EVE);
            r.wr(REG_A, 0x20 | rs);
            r.wr(REG_B, B_24H | B_PIE);
            for k in 1..=4u64 {
                let expect = (k * SEC).div_ceil(hz);
                assert_eq!(r.rtc.next_deadline(), Some(expect), "rs {rs} k {k}");
                r.at(expect - 1);
                assert!(!r.irq.level());
                r.at(expect);
                assert!(r.irq.level(), "rs {rs} k {k}");
                assert_eq!(r.rd(REG_C) & (C_IRQF | C_PF), C_IRQF | C_PF);
                assert!(!r.irq.level());
            }
        }
        // RS = 6: 1024 interrupts in one second.
        let mut r = rig(LEAP_EVE);
        r.wr(REG_B, B_24H | B_PIE);
        assert_eq!(r.rtc.next_deadline(), Some(976_563));
        assert_eq!(r.run_until(SEC), 1024);
        r.rd(REG_C);
        // RS = 0: none.
        r.wr(REG_A, 0x20);
        assert_eq!(r.rtc.next_deadline(), None);
        r.at(2 * SEC);
        assert_eq!(r.rd(REG_C), C_UF);
    }

    /// Periodic ticks the guest could not see (PF still set, or the VMM
    /// late) come back one per read of C.
    #[test]
    fn lost_periodic_ticks_are_reinjected_after_each_read_of_c() {
        let mut r = rig(LEAP_EVE);
        r.wr(REG_B, B_24H | B_PIE); // 1024 Hz
        let period = 976_563;
        // Ten periods late: one interrupt now, nine owed.
        r.at(10 * period);
        assert!(r.irq.level());
        assert_eq!(r.rtc.state().lost_ticks, 9);
        let mut seen = 0;
        let mut now = 10 * period;
        while seen < 20 {
            if r.irq.level() {
                seen += 1;
                assert_eq!(r.rd(REG_C) & C_PF, C_PF);
            }
            match r.rtc.next_deadline() {
                Some(d) if d < 10 * period + period / 2 => {
                    now = d;
                    r.at(d);
                }
                _ => break,
            }
        }
        assert_eq!(seen, 10, "one now and nine owed, within half a period");
        assert!(now < 10 * period + period / 2);
        assert_eq!(r.rtc.state().lost_ticks, 0);
        // Writing B forgets owed ticks.
        r.at(20 * period);
        assert!(r.rtc.state().lost_ticks > 0);
        r.wr(REG_B, B_24H | B_PIE);
        assert_eq!(r.rtc.state().lost_ticks, 0);
    }

    #[test]
    fn periodic_flag_without_interrupt_enable() {
        let mut r = rig(LEAP_EVE);
        assert_eq!(r.rtc.next_deadline(), None);
        r.clock.set(SEC / 100);
        assert_eq!(r.rd(REG_C), C_PF);
        assert!(r.irq.levels().is_empty());
        // Enabling PIE while PF is set raises IRQ8 at once.
        r.clock.set(SEC / 50);
        r.wr(REG_B, B_24H | B_PIE);
        assert!(r.irq.level());
        assert_eq!(r.rd(REG_C), C_IRQF | C_PF);
    }

    #[test]
    fn update_ended_interrupt() {
        let mut r = rig(LEAP_EVE);
        r.wr(REG_A, 0x20);
        // The alarm bytes start at 0:0:0, which matches at midnight.
        r.wr(REG_SECONDS_ALARM, 0x30);
        r.clock.set(SEC / 3);
        r.wr(REG_B, B_24H | B_UIE);
        assert_eq!(r.rtc.next_deadline(), Some(SEC));
        r.at(SEC);
        assert_eq!(r.irq.take(), vec![true]);
        assert_eq!(r.rd(REG_C), C_IRQF | C_UF);
        assert_eq!(r.irq.take(), vec![false]);
        assert_eq!(r.rtc.next_deadline(), Some(2 * SEC));
        // Flags without the enable: UF set, no IRQ.
        r.wr(REG_B, B_24H);
        r.at(3 * SEC);
        assert!(r.irq.take().is_empty());
        assert_eq!(r.rd(REG_C), C_UF);
    }

    #[test]
    fn register_c_read_clears_and_irq8_follows_irqf() {
        let mut r = rig(LEAP_EVE);
        r.wr(REG_SECONDS_ALARM, 0x30);
        r.wr(REG_B, B_24H | B_UIE | B_PIE);
        r.at(SEC);
        assert!(r.irq.level());
        assert_eq!(r.rd(REG_C), C_IRQF | C_PF | C_UF);
        assert!(!r.irq.level());
        assert_eq!(r.rd(REG_C), 0);
        assert!(r.taint.take());
        // Disabling the enables drops IRQ8 but keeps the flag.
        r.at(SEC + SEC / 1000);
        assert!(r.irq.level());
        r.wr(REG_B, B_24H);
        assert!(!r.irq.level());
        assert_eq!(r.rd(REG_C), C_PF);
        assert_eq!(r.irq.levels(), vec![true, false, true, false]);
    }

    #[test]
    fn alarm_with_and_without_dont_care_bytes() {
        let mut r = rig(LEAP_EVE);
        r.wr(REG_A, 0x20);
        // 00:00:05 exactly.
        r.wr(REG_SECONDS_ALARM, 0x05);
        r.wr(REG_MINUTES_ALARM, 0x00);
        r.wr(REG_HOURS_ALARM, 0x00);
        r.wr(REG_B, B_24H | B_AIE);
        assert_eq!(r.rtc.next_deadline(), Some(SEC));
        r.at(5 * SEC);
        r.run_until(5 * SEC);
        assert!(!r.irq.level());
        r.at(6 * SEC - 1);
        assert!(!r.irq.level());
        r.at(6 * SEC);
        assert!(r.irq.level());
        assert_eq!(r.rd(REG_C), C_IRQF | C_AF | C_UF);
        r.at(7 * SEC);
        assert!(!r.irq.level());
        assert_eq!(r.rd(REG_C), C_UF);
        // Hours and minutes don't care: once a minute, at second 5.
        r.wr(REG_HOURS_ALARM, 0xc0);
        r.wr(REG_MINUTES_ALARM, 0xff);
        r.run_until(66 * SEC - 1);
        assert!(!r.irq.level());
        r.run_until(66 * SEC);
        assert!(r.irq.level());
        assert_eq!(r.rd(REG_C), C_IRQF | C_AF | C_UF);
        // All don't care: every second.
        r.wr(REG_SECONDS_ALARM, 0xc3);
        r.at(67 * SEC);
        assert_eq!(r.rd(REG_C), C_IRQF | C_AF | C_UF);
        // AF is found for seconds that passed between accesses, even with
        // AIE off and nobody scheduling.
        r.wr(REG_B, B_24H);
        r.wr(REG_SECONDS_ALARM, 0x30);
        r.wr(REG_MINUTES_ALARM, 0x01);
        r.wr(REG_HOURS_ALARM, 0x00);
        r.clock.set(200 * SEC);
        assert_eq!(r.rd(REG_C), C_AF | C_UF);
        // A 12-hour PM alarm compares with the PM bit.
        let mut r = rig(1_718_452_799); // 11:59:59
        r.wr(REG_A, 0x20);
        r.wr(REG_B, B_AIE);
        r.wr(REG_SECONDS_ALARM, 0x00);
        r.wr(REG_MINUTES_ALARM, 0x00);
        r.wr(REG_HOURS_ALARM, 0x92);
        r.at(SEC);
        assert_eq!(r.rd(REG_C), C_IRQF | C_AF | C_UF);
    }

    #[test]
    fn nvram_round_trip_and_extended_bank() {
        let mut r = rig(LEAP_EVE);
        for i in NVRAM_FIRST..0x80 {
            if i != REG_CENTURY {
                r.wr(i, i ^ 0x5a);
            }
        }
        for i in NVRAM_FIRST..0x80 {
            if i != REG_CENTURY {
                assert_eq!(r.rd(i), i ^ 0x5a);
                assert_eq!(r.rtc.nvram(i), Some(i ^ 0x5a));
            }
        }
        // Index bit 7 is the NMI mask, not an address bit.
        r.rtc.write(0, &[0x80 | 0x20]);
        assert!(r.rtc.nmi_masked());
        let mut b = [0u8];
        r.rtc.read(1, &mut b);
        assert_eq!(b, [0x20 ^ 0x5a]);
        r.rtc.write(0, &[0x20]);
        assert!(!r.rtc.nmi_masked());
        // Extended bank through 0x72 / 0x73.
        r.rtc.write(2, &[0x10]);
        r.rtc.write(3, &[0xab]);
        assert_eq!(r.rtc.nvram(0x90), Some(0xab));
        r.rtc.read(3, &mut b);
        assert_eq!(b, [0xab]);
        r.rtc.write(2, &[0x90]);
        r.rtc.read(3, &mut b);
        assert_eq!(b, [0xab]);
        // A 16-bit write to 0x72 sets the index and writes the data.
        r.rtc.write(2, &[0x11, 0xcd]);
        assert_eq!(r.rtc.nvram(0x91), Some(0xcd));
        // The standard bank's 0x10 is a different byte.
        assert_eq!(r.rd(0x10), 0x10 ^ 0x5a);
        // set_nvram only for NVRAM.
        assert!(r.rtc.set_nvram(0x0e, 1));
        assert!(r.rtc.set_nvram(0xff, 2));
        assert!(!r.rtc.set_nvram(0x0d, 3));
        assert!(!r.rtc.set_nvram(REG_CENTURY, 3));
        assert_eq!(r.rtc.nvram(0x0d), None);
        assert_eq!(r.rd(0x0e), 1);
        // Beyond the mapped ports.
        let mut w = [0u8; 3];
        r.rtc.read(3, &mut w);
        assert_eq!(w[1..], [0xff, 0xff]);
        r.rtc.write(u64::MAX, &[1, 2]);
        r.rtc.read(u64::MAX, &mut w);
        assert_eq!(w, [0xff; 3]);
    }

    #[test]
    fn memory_size_bytes() {
        let mut r = rig(LEAP_EVE);
        // 3 GiB below 4 GiB, 5 GiB above.
        r.rtc.set_memory_size(3 << 30, 5 << 30);
        let w = |r: &mut Rig, i: u8| u16::from(r.rd(i)) | u16::from(r.rd(i + 1)) << 8;
        assert_eq!(w(&mut r, 0x15), 640);
        assert_eq!(w(&mut r, 0x17), 0xffff);
        assert_eq!(w(&mut r, 0x30), 0xffff);
        // (3 GiB - 16 MiB) / 64 KiB = 48896.
        assert_eq!(w(&mut r, 0x34), 0xbf00);
        let above =
            u32::from(r.rd(0x5b)) | u32::from(r.rd(0x5c)) << 8 | u32::from(r.rd(0x5d)) << 16;
        assert_eq!(above, 5 << 14);
        // 32 MiB machine.
        r.rtc.set_memory_size(32 << 20, 0);
        assert_eq!(w(&mut r, 0x15), 640);
        assert_eq!(w(&mut r, 0x17), 31 * 1024);
        assert_eq!(w(&mut r, 0x30), 31 * 1024);
        assert_eq!(w(&mut r, 0x34), 256);
        assert_eq!(r.rd(0x5b) | r.rd(0x5c) | r.rd(0x5d), 0);
        // Tiny.
        r.rtc.set_memory_size(512 << 10, 0);
        assert_eq!(w(&mut r, 0x15), 512);
        assert_eq!(w(&mut r, 0x17), 0);
        assert_eq!(w(&mut r, 0x34), 0);
    }

    #[test]
    fn state_restore_round_trip() {
        let mut r = rig(LEAP_EVE);
        r.wr(REG_B, B_24H | B_PIE | B_UIE);
        r.wr(0x40, 0x99);
        r.wr(REG_SECONDS_ALARM, 0xc0);
        r.rtc.write(0, &[0x80 | REG_MINUTES]);
        r.at(SEC + 5);
        let st = r.rtc.state();
        let mut v = rig(0);
        v.clock.set(SEC + 5);
        v.rtc.restore(&st);
        assert_eq!(v.rtc.state(), st);
        assert_eq!(v.irq.levels(), vec![true]);
        assert!(v.rtc.nmi_masked());
        assert_eq!(v.rtc.next_deadline(), r.rtc.next_deadline());
        assert_eq!(v.time(), r.time());
        assert_eq!(v.rd(REG_C), r.rd(REG_C));
        assert_eq!(v.rd(0x40), 0x99);
        // Inconsistent states are repaired: a stopped divider holds a time.
        let bad = RtcCmosState {
            reg_a: 0xff,
            flags: 0xff,
            index: 0xff,
            ..RtcCmosState::new(LEAP_EVE as i64)
        };
        v.rtc.restore(&bad);
        let s = v.rtc.state();
        assert_eq!((s.reg_a, s.flags, s.index), (0x7f, 0x70, 0x7f));
        assert!(s.held_secs.is_some());
        assert_eq!(v.rd(REG_MONTH), 0x02);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Read(u64, usize),
        Write(u64, Vec<u8>),
        Reg(u8, u8),
        Advance(u64),
        Nvram(u8, u8),
        Memory(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let reg = prop_oneof![4 => 0u8..0x0e, 1 => Just(REG_CENTURY), 1 => any::<u8>()];
        prop_oneof![
            2 => (0u64..5, 0usize..5).prop_map(|(o, n)| Op::Read(o, n)),
            1 => (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..5))
                .prop_map(|(o, d)| Op::Write(o, d)),
            4 => (reg, any::<u8>()).prop_map(|(r, v)| Op::Reg(r, v)),
            2 => prop_oneof![0u64..2_000_000, 0u64..100 * SEC, Just(1u64 << 50)]
                .prop_map(Op::Advance),
            1 => (any::<u8>(), any::<u8>()).prop_map(|(i, v)| Op::Nvram(i, v)),
            1 => (any::<u64>(), any::<u64>()).prop_map(|(a, b)| Op::Memory(a, b)),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_sequences_never_panic(
            start in prop_oneof![Just(LEAP_EVE), any::<u64>()],
            ops in proptest::collection::vec(op(), 0..200)
        ) {
            let mut r = rig(start);
            for op in ops {
                match op {
                    Op::Read(o, n) => {
                        let mut buf = vec![0u8; n];
                        r.rtc.read(o, &mut buf);
                    }
                    Op::Write(o, d) => r.rtc.write(o, &d),
                    Op::Reg(reg, v) => {
                        if v & 1 == 0 {
                            r.wr(reg, v);
                        } else {
                            r.rd(reg);
                        }
                    }
                    Op::Advance(d) => {
                        r.clock.advance_by(d);
                        let now = r.clock.now_ns();
                        if r.rtc.next_deadline().is_some_and(|dl| dl <= now) {
                            r.rtc.advance(now);
                        }
                    }
                    Op::Nvram(i, v) => { r.rtc.set_nvram(i, v); }
                    Op::Memory(a, b) => r.rtc.set_memory_size(a, b),
                }
                // The line always shows IRQF.
                prop_assert_eq!(r.irq.level(), r.rtc.irq_output());
                let s = r.rtc.state();
                prop_assert_eq!(s.flags & !C_FLAGS, 0);
                prop_assert_eq!(s.reg_a & A_UIP, 0);
                prop_assert_eq!(s.set_image.is_some(), s.reg_b & B_SET != 0);
                prop_assert_eq!(s.held_secs.is_some(), s.reg_a & A_DV_MASK > 0x20);
                let now = r.clock.now_ns();
                r.rtc.advance(now);
                if let Some(dl) = r.rtc.next_deadline() {
                    prop_assert!(dl > now);
                }
            }
            let levels = r.irq.levels();
            prop_assert!(levels.windows(2).all(|w| w[0] != w[1]));
            let mut v = rig(0);
            v.clock.set(r.clock.now_ns());
            v.rtc.restore(&r.rtc.state());
            prop_assert_eq!(v.rtc.state(), r.rtc.state());
        }
    }
}
