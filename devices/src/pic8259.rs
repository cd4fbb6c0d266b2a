//! The PC's two cascaded 8259A programmable interrupt controllers, with the
//! edge/level control registers (ELCR) of the PIIX/ICH south bridges.
//!
//! # Mapping
//!
//! [`Pic8259Pair`] is the core (register logic only), shared as
//! `Arc<Mutex<Pic8259Pair>>`. Three small bus devices front it, because its
//! ports are not adjacent:
//!
//! * [`PicPorts`] built by [`pic_master_port`]: map at [`MASTER_BASE`]
//!   (0x20), length 2. Offset 0 is the command port (A0 = 0), offset 1 the
//!   data / mask port (A0 = 1).
//! * [`PicPorts`] built by [`pic_slave_port`]: map at [`SLAVE_BASE`] (0xa0),
//!   length 2, likewise.
//! * [`PicPorts`] built by [`elcr_port`]: map at [`ELCR_BASE`] (0x4d0),
//!   length 2. Offset 0 is the master's ELCR, offset 1 the slave's.
//!
//! The chip is byte-wide: an access of N bytes at offset O is N byte accesses
//! at O, O+1, ... (low byte first), as an ISA bus splits `in ax, dx`; bytes
//! that fall outside the device's two ports read 0xff and are dropped on
//! write. The core also takes absolute port numbers directly
//! ([`Pic8259Pair::read_port`], [`Pic8259Pair::write_port`]).
//!
//! # Wiring
//!
//! * **Inputs.** [`Pic8259Pair::set_irq`] drives ISA IRQ 0-15 (0-7 master,
//!   8-15 slave). IRQ 2 is the cascade input and is not an ISA line (the AT
//!   wires the ISA bus's IRQ2 pin to IRQ 9): driving it is ignored (logged
//!   once). [`irq_line`] adapts a pin of a shared pair to an [`IrqLine`], so
//!   a device's output can drive a PIC input directly.
//! * **Cascade.** The slave's INTR output drives the master's IR2 input, as
//!   on every AT. The master treats IR2 as a slave input (lets the slave
//!   supply the vector) when it was initialised in cascade mode with ICW3
//!   bit 2 set; the slave's own ICW3 identity is stored but not checked.
//! * **Output.** [`Pic8259Pair::interrupt_pending`] is the master's INTR pin
//!   (the machine wires it to the local APIC's LINT0, virtual-wire mode);
//!   optionally it also drives an [`IrqLine`] given to
//!   [`Pic8259Pair::set_intr_line`], on every change. That line is driven
//!   with the pair borrowed (typically: its mutex held), so it must not call
//!   back into the pair. [`Pic8259Pair::acknowledge`] is the INTA cycle.
//!
//! # Model
//!
//! * **Triggering.** A line is level-triggered when its ELCR bit is set or
//!   ICW1.LTIM was given (LTIM makes all eight lines of that chip
//!   level-triggered). ELCR bits that cannot be level on a PC are reserved
//!   and read as 0: IRQ 0, 1, 2 on the master, IRQ 8 and 13 on the slave.
//!   A level-triggered request bit (IRR) follows the line. An
//!   edge-triggered one is latched on the line's rising edge and held until
//!   the interrupt is acknowledged (as QEMU and KVM do; the datasheet asks
//!   the line to stay high until INTA, so on real hardware a pulse that
//!   ends early becomes a spurious IRQ 7 — we keep the request instead, so
//!   a device model that raises and lowers a line at one VM instant is not
//!   lost). ICW1 resets the edge detectors: a line high at that moment must
//!   go low and high again to request.
//! * **INTA** ([`Pic8259Pair::acknowledge`]): the highest-priority unmasked
//!   request that beats the highest-priority in-service level moves from
//!   IRR to ISR (unless AEOI; a level-triggered IRR bit stays as long as the
//!   line is high) and its vector (ICW2 base | level) is returned. When the
//!   request went away between INTR and INTA (line dropped, masked), the
//!   master answers its spurious vector, base | 7, and sets no ISR bit. When
//!   the master picks IR2 and the slave has nothing left, the slave answers
//!   base | 7 (IRQ 15) and the master's IR2 is in service (as the 8259A
//!   datasheet describes; the OS sends the master an EOI for it).
//! * **Priorities.** Fixed with IR0 highest after ICW1; OCW2 can rotate them
//!   (rotate on non-specific EOI, rotate on specific EOI, set priority,
//!   rotate in AEOI mode). Special fully nested mode (ICW4 bit 4) is stored
//!   but has no effect (logged once); buffered mode bits are stored only.
//! * **Special mask mode** (OCW3 ESMM/SMM): every unmasked level not itself
//!   in service may interrupt, whatever else is in service (the datasheet's
//!   "enables interrupts from all other levels, lower as well as higher,
//!   that are not masked"; as Bochs).
//! * **OCW3 reads.** IRR or ISR at A0 = 0 as last selected (IRR after ICW1),
//!   IMR at A0 = 1. After a poll command (OCW3 P), the next read of either
//!   port of that chip returns 0x80 | level and acknowledges that level on
//!   that chip alone (sets its ISR bit unless AEOI; a poll of the master
//!   that finds IR2 does not touch the slave), or 0x00 when nothing is
//!   requesting.
//! * **MCS-80/85 mode** (ICW4 bit 0 clear, or no ICW4) is meaningless on an
//!   x86 CPU: vectors are formed as in 8086 mode (logged once).
//! * **ICW1** clears IMR, ISR, the edge latches, special mask, rotation and
//!   poll, selects IRR for reads and, without IC4, zeroes the ICW4 options;
//!   ISR is cleared too (as QEMU, KVM and Bochs). Writes at A0 = 1 during the
//!   initialisation sequence are ICW2, ICW3 (cascade mode only) and ICW4
//!   (only if ICW1 asked for it); at A0 = 0 they are always decoded as
//!   ICW1 / OCW2 / OCW3.
//! * **Start state** ([`Pic8259State::default`], also after
//!   [`Pic8259Pair::reset`]): what a PC BIOS leaves behind — master vectors
//!   0x08-0x0f, slave 0x70-0x77, cascade on IR2, 8086 mode, normal EOI, all
//!   lines edge-triggered and masked (IMR 0xff on both chips).

use std::sync::{Arc, Mutex, MutexGuard};

use crate::bus::BusDevice;
use crate::irq::IrqLine;
use crate::ratelimit::RateLimiter;

/// Where the machine maps the master's [`PicPorts`] (length 2).
pub const MASTER_BASE: u16 = 0x20;
/// Where the machine maps the slave's [`PicPorts`] (length 2).
pub const SLAVE_BASE: u16 = 0xa0;
/// Where the machine maps the ELCR [`PicPorts`] (length 2).
pub const ELCR_BASE: u16 = 0x4d0;

/// The master input the slave's INTR is wired to.
pub const CASCADE_IRQ: u8 = 2;

/// ELCR bits that can be set: not IRQ 0, 1, 2.
pub const ELCR_MASTER_MASK: u8 = 0xf8;
/// ELCR bits that can be set: not IRQ 8, 13.
pub const ELCR_SLAVE_MASK: u8 = 0xde;

// ICW1 bits.
const ICW1_IC4: u8 = 0x01;
const ICW1_SNGL: u8 = 0x02;
const ICW1_LTIM: u8 = 0x08;
const ICW1_INIT: u8 = 0x10;

// ICW4 bits.
const ICW4_8086: u8 = 0x01;
const ICW4_AEOI: u8 = 0x02;
const ICW4_SFNM: u8 = 0x10;
const ICW4_MASK: u8 = 0x1f;

// OCW3 bits.
const OCW3_SEL: u8 = 0x08;
const OCW3_RIS: u8 = 0x01;
const OCW3_RR: u8 = 0x02;
const OCW3_POLL: u8 = 0x04;
const OCW3_SMM: u8 = 0x20;
const OCW3_ESMM: u8 = 0x40;

/// The register state of one 8259A.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PicChipState {
    /// Interrupt request register.
    pub irr: u8,
    /// In-service register.
    pub isr: u8,
    /// Interrupt mask register (OCW1).
    pub imr: u8,
    /// The levels of the eight input lines (for edge detection and for
    /// level-triggered requests).
    pub pins: u8,
    /// Edge/level control register (1 = level); reserved bits are 0.
    pub elcr: u8,
    /// ICW1.LTIM: all lines level-triggered.
    pub ltim: bool,
    /// ICW1.SNGL: single (no cascade) mode.
    pub single: bool,
    /// ICW1.IC4: ICW4 expected.
    pub icw4_needed: bool,
    /// ICW2: vector base (bits 7:3).
    pub vector_base: u8,
    /// ICW3: slave inputs (master) or cascade identity (slave).
    pub icw3: u8,
    /// ICW4 (bits 4:0).
    pub icw4: u8,
    /// 0 when operational; 2, 3 or 4 while waiting for that ICW.
    pub init_step: u8,
    /// The level that currently has the highest priority (0-7).
    pub highest_priority: u8,
    /// OCW2 rotate in automatic EOI mode.
    pub rotate_in_aeoi: bool,
    /// OCW3 special mask mode.
    pub special_mask: bool,
    /// OCW3 RIS: reads at A0 = 0 return ISR (else IRR).
    pub read_isr: bool,
    /// OCW3 P: the next read is a poll.
    pub poll: bool,
}

impl PicChipState {
    /// A chip as a BIOS leaves it: initialised for 8086 mode in cascade,
    /// all lines masked.
    fn bios(vector_base: u8, icw3: u8) -> Self {
        PicChipState {
            irr: 0,
            isr: 0,
            imr: 0xff,
            pins: 0,
            elcr: 0,
            ltim: false,
            single: false,
            icw4_needed: true,
            vector_base,
            icw3,
            icw4: ICW4_8086,
            init_step: 0,
            highest_priority: 0,
            rotate_in_aeoi: false,
            special_mask: false,
            read_isr: false,
            poll: false,
        }
    }

    fn level_mask(&self) -> u8 {
        if self.ltim {
            0xff
        } else {
            self.elcr
        }
    }

    fn aeoi(&self) -> bool {
        self.icw4 & ICW4_AEOI != 0
    }

    /// Make the level-triggered request bits follow their lines.
    fn sync_level_irr(&mut self) {
        let lm = self.level_mask();
        self.irr = (self.irr & !lm) | (self.pins & lm);
    }

    /// Change the trigger mode (ELCR or LTIM): lines that become
    /// level-triggered follow their pins, lines that become edge-triggered
    /// start with no request (their edge detector is fresh).
    fn set_trigger(&mut self, elcr: u8, ltim: bool) {
        let old = self.level_mask();
        self.elcr = elcr;
        self.ltim = ltim;
        let new = self.level_mask();
        self.irr &= !(old & !new);
        self.sync_level_irr();
    }

    fn set_input(&mut self, irq: u8, level: bool) {
        let bit = 1u8 << (irq & 7);
        let was = self.pins & bit != 0;
        if level {
            self.pins |= bit;
        } else {
            self.pins &= !bit;
        }
        if self.level_mask() & bit != 0 {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && !was {
            self.irr |= bit;
        }
    }

    /// Priority of a level: 0 is the highest.
    fn priority(&self, irq: u8) -> u8 {
        irq.wrapping_sub(self.highest_priority) & 7
    }

    /// The highest-priority level set in `mask`.
    fn best(&self, mask: u8) -> Option<u8> {
        (0..8)
            .map(|p| (self.highest_priority + p) & 7)
            .find(|&irq| mask & (1 << irq) != 0)
    }

    /// The level INTR is raised for, if any.
    fn pending(&self) -> Option<u8> {
        let req = self.irr & !self.imr;
        if self.special_mask {
            return self.best(req & !self.isr);
        }
        let r = self.best(req)?;
        match self.best(self.isr) {
            Some(s) if self.priority(s) <= self.priority(r) => None,
            _ => Some(r),
        }
    }

    /// The INTA (or poll) of `irq` on this chip.
    fn ack(&mut self, irq: u8) {
        let bit = 1u8 << irq;
        if self.aeoi() {
            if self.rotate_in_aeoi {
                self.highest_priority = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        if self.level_mask() & bit == 0 {
            self.irr &= !bit;
        }
    }

    fn vector(&self, irq: u8) -> u8 {
        (self.vector_base & 0xf8) | (irq & 7)
    }

    fn icw1(&mut self, v: u8) {
        self.icw4_needed = v & ICW1_IC4 != 0;
        self.single = v & ICW1_SNGL != 0;
        // The edge sense circuit is reset: edge requests are forgotten.
        self.irr = 0;
        self.set_trigger(self.elcr, v & ICW1_LTIM != 0);
        self.imr = 0;
        self.isr = 0;
        self.highest_priority = 0;
        self.rotate_in_aeoi = false;
        self.special_mask = false;
        self.read_isr = false;
        self.poll = false;
        if !self.icw4_needed {
            self.icw4 = 0;
        }
        self.init_step = 2;
    }

    fn ocw2(&mut self, v: u8) {
        let level = v & 7;
        match v >> 5 {
            0 => self.rotate_in_aeoi = false,
            1 | 5 => {
                if let Some(s) = self.best(self.isr) {
                    self.isr &= !(1 << s);
                    if v >> 5 == 5 {
                        self.highest_priority = (s + 1) & 7;
                    }
                }
            }
            2 => {}
            3 => self.isr &= !(1 << level),
            4 => self.rotate_in_aeoi = true,
            6 => self.highest_priority = (level + 1) & 7,
            _ => {
                self.isr &= !(1 << level);
                self.highest_priority = (level + 1) & 7;
            }
        }
    }

    fn ocw3(&mut self, v: u8) {
        if v & OCW3_ESMM != 0 {
            self.special_mask = v & OCW3_SMM != 0;
        }
        if v & OCW3_POLL != 0 {
            self.poll = true;
        }
        if v & OCW3_RR != 0 {
            self.read_isr = v & OCW3_RIS != 0;
        }
    }

    /// Clamp every field to what the chip can hold.
    fn sanitize(&mut self, elcr_mask: u8) {
        self.elcr &= elcr_mask;
        self.vector_base &= 0xf8;
        self.icw4 &= ICW4_MASK;
        self.highest_priority &= 7;
        if !matches!(self.init_step, 0 | 2..=4) {
            self.init_step = 0;
        }
        self.sync_level_irr();
    }
}

/// Both chips' state, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pic8259State {
    pub master: PicChipState,
    pub slave: PicChipState,
}

impl Default for Pic8259State {
    /// The state a PC BIOS leaves (see the module documentation).
    fn default() -> Self {
        Pic8259State {
            master: PicChipState::bios(0x08, 1 << CASCADE_IRQ),
            slave: PicChipState::bios(0x70, CASCADE_IRQ),
        }
    }
}

/// Which chip of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PicChip {
    Master,
    Slave,
}

/// The cascaded pair. See the module documentation.
pub struct Pic8259Pair {
    s: Pic8259State,
    intr: Option<Box<dyn IrqLine>>,
    intr_level: bool,
    log_limit: RateLimiter,
    logged_sfnm: bool,
    logged_mcs80: bool,
}

impl Default for Pic8259Pair {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic8259Pair {
    /// A pair in the BIOS-initialised start state, with no INTR line.
    pub fn new() -> Self {
        Pic8259Pair {
            s: Pic8259State::default(),
            intr: None,
            intr_level: false,
            log_limit: RateLimiter::new(10),
            logged_sfnm: false,
            logged_mcs80: false,
        }
    }

    /// Also drive `line` with the master's INTR level from now on (it is
    /// driven at once with the current level).
    pub fn set_intr_line(&mut self, line: Box<dyn IrqLine>) {
        self.intr_level = self.interrupt_pending();
        line.set_level(self.intr_level);
        self.intr = Some(line);
    }

    /// Back to the start state. The input line levels are kept (they belong
    /// to the devices driving them).
    pub fn reset(&mut self) {
        let (mp, sp) = (self.s.master.pins, self.s.slave.pins);
        self.s = Pic8259State::default();
        self.s.master.pins = mp & !(1 << CASCADE_IRQ);
        self.s.slave.pins = sp;
        self.update();
    }

    /// A copy of the register state.
    pub fn state(&self) -> Pic8259State {
        self.s.clone()
    }

    /// Load a state (from [`Pic8259Pair::state`]). Reserved bits are masked
    /// and inconsistent fields repaired, so any value is safe; the INTR line
    /// is driven to the level the state implies.
    pub fn restore(&mut self, s: &Pic8259State) {
        let mut s = s.clone();
        s.master.sanitize(ELCR_MASTER_MASK);
        s.slave.sanitize(ELCR_SLAVE_MASK);
        self.s = s;
        self.update();
        self.intr_level = self.interrupt_pending();
        if let Some(l) = &self.intr {
            l.set_level(self.intr_level);
        }
    }

    /// Drive ISA IRQ `irq` (0-15) to `level`.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            0..=7 if irq != CASCADE_IRQ => self.s.master.set_input(irq, level),
            8..=15 => self.s.slave.set_input(irq - 8, level),
            _ => {
                if self.log_limit.allow() {
                    log::warn!("pic: set_irq({irq}) ignored: not an ISA IRQ input");
                }
                return;
            }
        }
        self.update();
    }

    /// The master's INTR output.
    pub fn interrupt_pending(&self) -> bool {
        self.s.master.pending().is_some()
    }

    /// The INTA cycle: the vector of the interrupt the CPU takes now.
    pub fn acknowledge(&mut self) -> u8 {
        self.check_mode_logs();
        let m = &self.s.master;
        let vector = match m.pending() {
            None => m.vector(7),
            Some(irq) if irq == CASCADE_IRQ && self.cascade_on_ir2() => {
                let v = match self.s.slave.pending() {
                    Some(sirq) => {
                        self.s.slave.ack(sirq);
                        self.s.slave.vector(sirq)
                    }
                    None => self.s.slave.vector(7),
                };
                self.s.master.ack(irq);
                v
            }
            Some(irq) => {
                self.s.master.ack(irq);
                self.s.master.vector(irq)
            }
        };
        self.update();
        vector
    }

    /// The master lets the slave supply IR2's vector.
    fn cascade_on_ir2(&self) -> bool {
        let m = &self.s.master;
        !m.single && m.icw3 & (1 << CASCADE_IRQ) != 0
    }

    fn chip(&mut self, c: PicChip) -> &mut PicChipState {
        match c {
            PicChip::Master => &mut self.s.master,
            PicChip::Slave => &mut self.s.slave,
        }
    }

    /// Read register A0 (0 or 1) of chip `c`.
    pub fn read_reg(&mut self, c: PicChip, a0: u8) -> u8 {
        let chip = self.chip(c);
        if chip.poll {
            chip.poll = false;
            let v = match chip.pending() {
                Some(irq) => {
                    chip.ack(irq);
                    0x80 | irq
                }
                None => 0,
            };
            self.update();
            return v;
        }
        if a0 & 1 == 0 {
            if chip.read_isr {
                chip.isr
            } else {
                chip.irr
            }
        } else {
            chip.imr
        }
    }

    /// Write register A0 (0 or 1) of chip `c`.
    pub fn write_reg(&mut self, c: PicChip, a0: u8, v: u8) {
        let chip = self.chip(c);
        if a0 & 1 == 0 {
            if v & ICW1_INIT != 0 {
                chip.icw1(v);
            } else if v & OCW3_SEL != 0 {
                chip.ocw3(v);
            } else {
                chip.ocw2(v);
            }
        } else {
            match chip.init_step {
                2 => {
                    chip.vector_base = v & 0xf8;
                    chip.init_step = match (chip.single, chip.icw4_needed) {
                        (false, _) => 3,
                        (true, true) => 4,
                        (true, false) => 0,
                    };
                }
                3 => {
                    chip.icw3 = v;
                    chip.init_step = if chip.icw4_needed { 4 } else { 0 };
                }
                4 => {
                    chip.icw4 = v & ICW4_MASK;
                    chip.init_step = 0;
                }
                _ => chip.imr = v,
            }
        }
        self.update();
    }

    /// Read an absolute port (0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1);
    /// any other reads 0xff.
    pub fn read_port(&mut self, port: u16) -> u8 {
        match port {
            0x20 | 0x21 => self.read_reg(PicChip::Master, (port & 1) as u8),
            0xa0 | 0xa1 => self.read_reg(PicChip::Slave, (port & 1) as u8),
            0x4d0 => self.s.master.elcr,
            0x4d1 => self.s.slave.elcr,
            _ => 0xff,
        }
    }

    /// Write an absolute port (as [`Pic8259Pair::read_port`]); writes to
    /// other ports are dropped.
    pub fn write_port(&mut self, port: u16, v: u8) {
        match port {
            0x20 | 0x21 => self.write_reg(PicChip::Master, (port & 1) as u8, v),
            0xa0 | 0xa1 => self.write_reg(PicChip::Slave, (port & 1) as u8, v),
            0x4d0 => {
                let ltim = self.s.master.ltim;
                self.s.master.set_trigger(v & ELCR_MASTER_MASK, ltim);
                self.update();
            }
            0x4d1 => {
                let ltim = self.s.slave.ltim;
                self.s.slave.set_trigger(v & ELCR_SLAVE_MASK, ltim);
                self.update();
            }
            _ => {}
        }
    }

    /// Propagate the slave's INTR to the master's IR2, then drive INTR.
    fn update(&mut self) {
        let slave_int = self.s.slave.pending().is_some();
        self.s.master.set_input(CASCADE_IRQ, slave_int);
        let level = self.interrupt_pending();
        if level != self.intr_level {
            self.intr_level = level;
            if let Some(l) = &self.intr {
                l.set_level(level);
            }
        }
    }

    fn check_mode_logs(&mut self) {
        for c in [&self.s.master, &self.s.slave] {
            if c.icw4 & ICW4_SFNM != 0 && !self.logged_sfnm {
                self.logged_sfnm = true;
                log::info!("pic: special fully nested mode is not modelled");
            }
            if c.icw4 & ICW4_8086 == 0 && !self.logged_mcs80 {
                self.logged_mcs80 = true;
                log::info!("pic: MCS-80/85 mode programmed; delivering 8086-style vectors");
            }
        }
    }
}

fn lock(pair: &Mutex<Pic8259Pair>) -> MutexGuard<'_, Pic8259Pair> {
    pair.lock().unwrap_or_else(|e| e.into_inner())
}

/// Two consecutive byte ports of a shared [`Pic8259Pair`], starting at an
/// absolute port. Map with length 2.
pub struct PicPorts {
    pair: Arc<Mutex<Pic8259Pair>>,
    base: u16,
}

/// The master's command and data ports (map at [`MASTER_BASE`], length 2).
pub fn pic_master_port(pair: Arc<Mutex<Pic8259Pair>>) -> PicPorts {
    PicPorts {
        pair,
        base: MASTER_BASE,
    }
}

/// The slave's command and data ports (map at [`SLAVE_BASE`], length 2).
pub fn pic_slave_port(pair: Arc<Mutex<Pic8259Pair>>) -> PicPorts {
    PicPorts {
        pair,
        base: SLAVE_BASE,
    }
}

/// The two ELCR ports (map at [`ELCR_BASE`], length 2).
pub fn elcr_port(pair: Arc<Mutex<Pic8259Pair>>) -> PicPorts {
    PicPorts {
        pair,
        base: ELCR_BASE,
    }
}

impl PicPorts {
    fn port(&self, offset: u64, i: usize) -> Option<u16> {
        match offset.checked_add(i as u64) {
            Some(o @ 0..=1) => Some(self.base + o as u16),
            _ => None,
        }
    }
}

impl BusDevice for PicPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match self.port(offset, i) {
                Some(p) => lock(&self.pair).read_port(p),
                None => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if let Some(p) = self.port(offset, i) {
                lock(&self.pair).write_port(p, b);
            }
        }
    }
}

/// An [`IrqLine`] driving input `irq` of a shared pair.
pub struct PicIrqLine {
    pair: Arc<Mutex<Pic8259Pair>>,
    irq: u8,
}

/// The [`IrqLine`] that drives ISA IRQ `irq` of `pair`.
pub fn irq_line(pair: Arc<Mutex<Pic8259Pair>>, irq: u8) -> PicIrqLine {
    PicIrqLine { pair, irq }
}

impl IrqLine for PicIrqLine {
    fn set_level(&self, level: bool) {
        lock(&self.pair).set_irq(self.irq, level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, BusKind};
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
        fn levels(&self) -> Vec<bool> {
            self.0.lock().unwrap().clone()
        }
        fn level(&self) -> bool {
            self.0.lock().unwrap().last().copied().unwrap_or(false)
        }
    }

    /// Initialise as Linux's init_8259A does (vectors 0x20 / 0x28), then
    /// unmask everything.
    fn linux_init(p: &mut Pic8259Pair, auto_eoi: bool) {
        p.write_port(0x21, 0xff);
        p.write_port(0x20, 0x11);
        p.write_port(0x21, 0x20);
        p.write_port(0x21, 0x04);
        p.write_port(0x21, if auto_eoi { 0x03 } else { 0x01 });
        p.write_port(0xa0, 0x11);
        p.write_port(0xa1, 0x28);
        p.write_port(0xa1, 0x02);
        p.write_port(0xa1, 0x01);
        p.write_port(0x21, 0x00);
        p.write_port(0xa1, 0x00);
    }

    fn pic() -> (Pic8259Pair, Irq) {
        let mut p = Pic8259Pair::new();
        let intr = Irq::default();
        p.set_intr_line(Box::new(intr.clone()));
        linux_init(&mut p, false);
        (p, intr)
    }

    fn isr(p: &mut Pic8259Pair, port: u16) -> u8 {
        p.write_port(port, 0x0b);
        let v = p.read_port(port);
        p.write_port(port, 0x0a);
        v
    }

    fn irr(p: &mut Pic8259Pair, port: u16) -> u8 {
        p.write_port(port, 0x0a);
        p.read_port(port)
    }

    #[test]
    fn start_state_is_bios_like() {
        let mut p = Pic8259Pair::new();
        assert_eq!(p.read_port(0x21), 0xff);
        assert_eq!(p.read_port(0xa1), 0xff);
        p.set_irq(1, true);
        assert!(!p.interrupt_pending());
        p.write_port(0x21, 0xfd);
        assert!(p.interrupt_pending());
        assert_eq!(p.acknowledge(), 0x09);
        p.write_port(0x20, 0x20);
        p.write_port(0xa1, 0xfe);
        p.write_port(0x21, 0xfb);
        p.set_irq(8, true);
        assert_eq!(p.acknowledge(), 0x70);
    }

    #[test]
    fn linux_init_sequence() {
        let (mut p, intr) = pic();
        let s = p.state();
        assert_eq!(s.master.vector_base, 0x20);
        assert_eq!(s.slave.vector_base, 0x28);
        assert_eq!(s.master.icw3, 4);
        assert_eq!(s.slave.icw3, 2);
        assert_eq!(s.master.icw4, 1);
        assert_eq!(s.master.init_step, 0);
        assert_eq!(s.slave.init_step, 0);
        // IMR round trip (Linux's probe_8259A).
        p.write_port(0x21, 0xfb);
        assert_eq!(p.read_port(0x21), 0xfb);
        p.write_port(0x21, 0x00);
        assert!(!p.interrupt_pending());
        assert!(!intr.level());
        // IRR is selected for reads after ICW1.
        p.set_irq(3, true);
        assert_eq!(p.read_port(0x20), 0x08);
        assert!(intr.level());
        assert_eq!(p.acknowledge(), 0x23);
        assert!(!intr.level());
        assert_eq!(isr(&mut p, 0x20), 0x08);
        // Linux's mask_and_ack: specific EOI.
        p.write_port(0x20, 0x63);
        assert_eq!(isr(&mut p, 0x20), 0);
    }

    #[test]
    fn icw_sequence_variants() {
        let mut p = Pic8259Pair::new();
        // Single mode, no ICW4: ICW2 ends the sequence.
        p.write_port(0x20, 0x12);
        p.write_port(0x21, 0x40);
        assert_eq!(p.state().master.init_step, 0);
        p.write_port(0x21, 0x5a);
        assert_eq!(p.read_port(0x21), 0x5a);
        assert_eq!(p.state().master.icw4, 0);
        // Single mode with ICW4.
        p.write_port(0x20, 0x13);
        p.write_port(0x21, 0x48);
        assert_eq!(p.state().master.init_step, 4);
        p.write_port(0x21, 0x01);
        assert_eq!(p.state().master.init_step, 0);
        assert_eq!(p.state().master.vector_base, 0x48);
        // In single mode IR2 is a plain input: the master supplies base | 2.
        p.write_port(0x21, 0x00);
        p.s.master.set_input(2, true);
        p.update();
        assert_eq!(p.acknowledge(), 0x4a);
        // Cascade without ICW4.
        p.write_port(0xa0, 0x10);
        p.write_port(0xa1, 0x30);
        assert_eq!(p.state().slave.init_step, 3);
        p.write_port(0xa1, 0x02);
        assert_eq!(p.state().slave.init_step, 0);
        // ICW2 keeps only bits 7:3.
        p.write_port(0xa0, 0x11);
        p.write_port(0xa1, 0x77);
        assert_eq!(p.state().slave.vector_base, 0x70);
    }

    #[test]
    fn edge_triggering_latches_rising_edges() {
        let (mut p, _) = pic();
        p.set_irq(4, true);
        // A pulse is not lost.
        p.set_irq(4, false);
        assert!(p.interrupt_pending());
        assert_eq!(p.acknowledge(), 0x24);
        p.write_port(0x20, 0x20);
        // Staying high does not request again.
        p.set_irq(5, true);
        assert_eq!(p.acknowledge(), 0x25);
        p.write_port(0x20, 0x20);
        p.set_irq(5, true);
        assert!(!p.interrupt_pending());
        // A new edge does.
        p.set_irq(5, false);
        p.set_irq(5, true);
        assert_eq!(p.acknowledge(), 0x25);
        p.write_port(0x20, 0x20);
        // ICW1 resets the edge detector: a line high at init is ignored
        // until it goes low and high again.
        p.set_irq(6, true);
        linux_init(&mut p, false);
        assert!(!p.interrupt_pending());
        p.set_irq(6, true);
        assert!(!p.interrupt_pending());
        p.set_irq(6, false);
        p.set_irq(6, true);
        assert_eq!(p.acknowledge(), 0x26);
    }

    #[test]
    fn level_triggering_follows_the_line() {
        let (mut p, _) = pic();
        p.write_port(0x4d1, 0xff);
        assert_eq!(p.read_port(0x4d1), ELCR_SLAVE_MASK);
        p.set_irq(11, true);
        assert!(p.interrupt_pending());
        assert_eq!(p.acknowledge(), 0x2b);
        // Still high: IRR stays, but in service blocks it.
        assert_eq!(irr(&mut p, 0xa0), 0x08);
        assert!(!p.interrupt_pending());
        p.write_port(0xa0, 0x20);
        p.write_port(0x20, 0x20);
        // Still high after EOI: requested again.
        assert!(p.interrupt_pending());
        assert_eq!(p.acknowledge(), 0x2b);
        // A handler that EOIs before the device drops its line: the slave
        // raised INTR again at its EOI and the master latched that edge, so
        // when the line drops the master still interrupts, and the slave
        // answers its spurious IRQ 15.
        p.write_port(0xa0, 0x20);
        p.write_port(0x20, 0x20);
        p.set_irq(11, false);
        assert_eq!(irr(&mut p, 0xa0), 0);
        assert_eq!(p.acknowledge(), 0x2f);
        assert_eq!(isr(&mut p, 0x20), 0x04);
        assert_eq!(isr(&mut p, 0xa0), 0x00);
        p.write_port(0x20, 0x20);
        assert!(!p.interrupt_pending());
    }

    #[test]
    fn ltim_makes_all_lines_level() {
        let mut p = Pic8259Pair::new();
        p.write_port(0x20, 0x19); // ICW1 with LTIM
        p.write_port(0x21, 0x20);
        p.write_port(0x21, 0x04);
        p.write_port(0x21, 0x01);
        p.write_port(0x21, 0x00);
        p.set_irq(0, true);
        p.set_irq(0, false);
        assert!(!p.interrupt_pending());
        p.set_irq(0, true);
        assert_eq!(p.acknowledge(), 0x20);
    }

    #[test]
    fn elcr_reserved_bits_and_switching() {
        let (mut p, _) = pic();
        p.write_port(0x4d0, 0xff);
        assert_eq!(p.read_port(0x4d0), ELCR_MASTER_MASK);
        p.write_port(0x4d1, 0x21);
        assert_eq!(p.read_port(0x4d1), 0x00);
        // A level line high when switched to level requests at once.
        p.write_port(0x4d0, 0);
        p.set_irq(9, true);
        p.acknowledge();
        p.write_port(0xa0, 0x20);
        p.write_port(0x20, 0x20);
        assert!(!p.interrupt_pending());
        p.write_port(0x4d1, 0x02);
        assert!(p.interrupt_pending());
        // Back to edge: the slave's request is gone, but the master's IR2
        // edge latch holds: a spurious IRQ 15.
        p.write_port(0x4d1, 0x00);
        assert_eq!(irr(&mut p, 0xa0), 0);
        assert_eq!(p.acknowledge(), 0x2f);
    }

    #[test]
    fn masking() {
        let (mut p, intr) = pic();
        p.write_port(0x21, 0x01);
        p.set_irq(0, true);
        assert!(!p.interrupt_pending());
        assert_eq!(irr(&mut p, 0x20), 0x01);
        p.write_port(0x21, 0x00);
        assert!(intr.level());
        assert_eq!(p.acknowledge(), 0x20);
        // Masking the cascade input masks the whole slave.
        p.write_port(0x20, 0x20);
        p.write_port(0x21, 0x04);
        p.set_irq(14, true);
        assert!(!p.interrupt_pending());
        p.write_port(0x21, 0x00);
        assert_eq!(p.acknowledge(), 0x2e);
    }

    #[test]
    fn fixed_priority_and_nesting() {
        let (mut p, _) = pic();
        for irq in [7, 5, 3] {
            p.set_irq(irq, true);
        }
        assert_eq!(p.acknowledge(), 0x23);
        // 5 and 7 wait behind 3.
        assert!(!p.interrupt_pending());
        // A higher priority nests.
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), 0x21);
        assert_eq!(isr(&mut p, 0x20), 0x0a);
        // Non-specific EOI clears the highest in service (1).
        p.write_port(0x20, 0x20);
        assert_eq!(isr(&mut p, 0x20), 0x08);
        assert!(!p.interrupt_pending());
        p.write_port(0x20, 0x20);
        assert_eq!(p.acknowledge(), 0x25);
        p.write_port(0x20, 0x20);
        assert_eq!(p.acknowledge(), 0x27);
        p.write_port(0x20, 0x20);
        // Slave levels have the priority of IR2.
        p.set_irq(3, false);
        p.set_irq(3, true);
        p.set_irq(12, true);
        assert_eq!(p.acknowledge(), 0x2c);
        assert_eq!(isr(&mut p, 0x20), 0x04);
        assert_eq!(isr(&mut p, 0xa0), 0x10);
        // IRQ3 is lower than the cascade.
        assert!(!p.interrupt_pending());
        p.write_port(0xa0, 0x20);
        p.write_port(0x20, 0x20);
        assert_eq!(p.acknowledge(), 0x23);
    }

    #[test]
    fn rotation_commands() {
        let (mut p, _) = pic();
        // Rotate on non-specific EOI: the served level becomes lowest.
        p.set_irq(0, true);
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), 0x20);
        p.write_port(0x20, 0xa0);
        assert_eq!(p.state().master.highest_priority, 1);
        p.set_irq(0, false);
        p.set_irq(0, true);
        // IRQ1 now beats IRQ0.
        assert_eq!(p.acknowledge(), 0x21);
        p.write_port(0x20, 0xa0);
        assert_eq!(p.acknowledge(), 0x20);
        // Rotate on specific EOI.
        p.write_port(0x20, 0xe0);
        assert_eq!(p.state().master.highest_priority, 1);
        assert_eq!(isr(&mut p, 0x20), 0);
        // Set priority: IRQ4 lowest, so IRQ5 highest.
        p.write_port(0x20, 0xc4);
        assert_eq!(p.state().master.highest_priority, 5);
        p.set_irq(4, true);
        p.set_irq(6, true);
        assert_eq!(p.acknowledge(), 0x26);
        // IRQ4 (lowest) waits behind 6 in service.
        assert!(!p.interrupt_pending());
        p.write_port(0x20, 0x20);
        assert_eq!(p.acknowledge(), 0x24);
        p.write_port(0x20, 0x20);
        // No-op OCW2.
        p.write_port(0x20, 0x40);
        assert_eq!(p.state().master.highest_priority, 5);
    }

    #[test]
    fn specific_eoi_only_clears_its_level() {
        let (mut p, _) = pic();
        p.set_irq(5, true);
        assert_eq!(p.acknowledge(), 0x25);
        p.set_irq(2 + 1, true);
        assert_eq!(p.acknowledge(), 0x23);
        p.write_port(0x20, 0x65);
        assert_eq!(isr(&mut p, 0x20), 0x08);
        p.write_port(0x20, 0x67); // not in service: nothing happens
        assert_eq!(isr(&mut p, 0x20), 0x08);
        p.write_port(0x20, 0x63);
        assert_eq!(isr(&mut p, 0x20), 0);
    }

    #[test]
    fn auto_eoi_and_rotation_in_aeoi() {
        let mut p = Pic8259Pair::new();
        linux_init(&mut p, true);
        p.set_irq(0, true);
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), 0x20);
        assert_eq!(isr(&mut p, 0x20), 0);
        assert_eq!(p.acknowledge(), 0x21);
        assert_eq!(isr(&mut p, 0x20), 0);
        // Rotate in AEOI: each served level becomes the lowest.
        p.write_port(0x20, 0x80);
        p.set_irq(0, false);
        p.set_irq(1, false);
        p.set_irq(0, true);
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), 0x20);
        assert_eq!(p.state().master.highest_priority, 1);
        p.set_irq(0, false);
        p.set_irq(0, true);
        assert_eq!(p.acknowledge(), 0x21);
        assert_eq!(p.acknowledge(), 0x20);
        // Clear rotate in AEOI.
        p.write_port(0x20, 0x00);
        assert!(!p.state().master.rotate_in_aeoi);
    }

    #[test]
    fn spurious_master_irq7() {
        let (mut p, intr) = pic();
        p.write_port(0x4d0, 0x08);
        p.set_irq(3, true);
        assert!(intr.level());
        // The level request vanishes before INTA.
        p.set_irq(3, false);
        assert!(!intr.level());
        assert_eq!(p.acknowledge(), 0x27);
        assert_eq!(isr(&mut p, 0x20), 0);
        // Masked between INTR and INTA.
        p.set_irq(5, true);
        p.write_port(0x21, 0x20);
        assert_eq!(p.acknowledge(), 0x27);
        assert_eq!(isr(&mut p, 0x20), 0);
    }

    #[test]
    fn spurious_slave_irq15() {
        let (mut p, _) = pic();
        p.set_irq(10, true);
        assert!(p.interrupt_pending());
        // The slave's request is masked away; the master's IR2 edge latch
        // still holds.
        p.write_port(0xa1, 0x04);
        assert!(p.interrupt_pending());
        assert_eq!(p.acknowledge(), 0x2f);
        assert_eq!(isr(&mut p, 0xa0), 0);
        assert_eq!(isr(&mut p, 0x20), 0x04);
        // The OS's EOI to the master for the cascade.
        p.write_port(0x20, 0x62);
        assert_eq!(isr(&mut p, 0x20), 0);
    }

    #[test]
    fn poll_mode() {
        let (mut p, _) = pic();
        p.set_irq(6, true);
        p.write_port(0x20, 0x0c);
        assert_eq!(p.read_port(0x20), 0x86);
        assert_eq!(isr(&mut p, 0x20), 0x40);
        // Poll is one-shot: the next read is IRR again.
        assert_eq!(p.read_port(0x20), 0x00);
        // Nothing requesting.
        p.write_port(0x20, 0x0c);
        assert_eq!(p.read_port(0x21), 0x00);
        // Poll of the slave, through the data port.
        p.set_irq(13, true);
        p.write_port(0xa0, 0x0c);
        assert_eq!(p.read_port(0xa1), 0x85);
        assert_eq!(isr(&mut p, 0xa0), 0x20);
        assert_eq!(p.read_port(0xa1), 0x00, "IMR again");
    }

    #[test]
    fn special_mask_mode() {
        let (mut p, _) = pic();
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), 0x21);
        p.set_irq(4, true);
        assert!(!p.interrupt_pending());
        // The handler masks its own level and enters special mask mode.
        p.write_port(0x21, 0x02);
        p.write_port(0x20, 0x68);
        assert!(p.state().master.special_mask);
        assert!(p.interrupt_pending());
        assert_eq!(p.acknowledge(), 0x24);
        // Levels in service still do not request again.
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert!(!p.interrupt_pending());
        // Leave special mask mode.
        p.write_port(0x20, 0x48);
        assert!(!p.state().master.special_mask);
        p.write_port(0x20, 0x64);
        p.write_port(0x20, 0x61);
        p.write_port(0x21, 0x00);
        assert_eq!(p.acknowledge(), 0x24);
    }

    #[test]
    fn icw1_clears_state() {
        let (mut p, _) = pic();
        p.set_irq(3, true);
        p.acknowledge();
        p.write_port(0x20, 0xc4);
        p.write_port(0x20, 0x6b);
        p.write_port(0x20, 0x0b);
        p.write_port(0x20, 0x11);
        let s = p.state().master;
        assert_eq!((s.isr, s.imr, s.irr), (0, 0, 0));
        assert_eq!(s.highest_priority, 0);
        assert!(!s.special_mask && !s.read_isr);
        assert_eq!(s.init_step, 2);
    }

    #[test]
    fn irq2_and_out_of_range_inputs_are_ignored() {
        let (mut p, _) = pic();
        p.set_irq(2, true);
        p.set_irq(16, true);
        p.set_irq(255, true);
        assert!(!p.interrupt_pending());
        assert_eq!(p.acknowledge(), 0x27);
    }

    #[test]
    fn state_restore_round_trip() {
        let (mut p, _) = pic();
        p.write_port(0x4d1, 0x08);
        p.set_irq(11, true);
        p.set_irq(5, true);
        p.write_port(0x20, 0xc2);
        p.write_port(0xa0, 0x0b);
        let st = p.state();
        let mut q = Pic8259Pair::new();
        let intr = Irq::default();
        q.set_intr_line(Box::new(intr.clone()));
        q.restore(&st);
        assert_eq!(q.state(), st);
        assert!(intr.level());
        for _ in 0..3 {
            assert_eq!(q.acknowledge(), p.acknowledge());
            q.write_port(0x20, 0x20);
            p.write_port(0x20, 0x20);
        }
        assert_eq!(q.state(), p.state());
        // Garbage is repaired.
        let mut bad = st.clone();
        bad.master.init_step = 9;
        bad.master.highest_priority = 200;
        bad.slave.elcr = 0xff;
        bad.slave.pins = 0x00;
        bad.slave.irr = 0xff;
        q.restore(&bad);
        let s = q.state();
        assert_eq!(s.master.init_step, 0);
        assert!(s.master.highest_priority < 8);
        assert_eq!(s.slave.elcr, ELCR_SLAVE_MASK);
        assert_eq!(s.slave.irr & ELCR_SLAVE_MASK, 0);
        q.reset();
        let mut d = Pic8259State::default();
        d.slave.pins = s.slave.pins;
        d.master.pins = s.master.pins & !4;
        assert_eq!(q.state(), d);
    }

    #[test]
    fn bus_mapping_and_irq_line_adapter() {
        let pair = Arc::new(Mutex::new(Pic8259Pair::new()));
        let mut bus = Bus::new(BusKind::Pio);
        bus.insert(
            crate::bus::DeviceId(0),
            "pic-master",
            MASTER_BASE.into(),
            2,
            Arc::new(Mutex::new(pic_master_port(pair.clone()))),
        )
        .unwrap();
        bus.insert(
            crate::bus::DeviceId(0),
            "pic-slave",
            SLAVE_BASE.into(),
            2,
            Arc::new(Mutex::new(pic_slave_port(pair.clone()))),
        )
        .unwrap();
        bus.insert(
            crate::bus::DeviceId(0),
            "elcr",
            ELCR_BASE.into(),
            2,
            Arc::new(Mutex::new(elcr_port(pair.clone()))),
        )
        .unwrap();
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x38),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0x00),
            (0xa1, 0x00),
        ] {
            assert!(bus.write(0, port, &[v]).is_some());
        }
        // One 16-bit write sets both ELCRs.
        assert!(bus.write(0, 0x4d0, &[0x20, 0x02]).is_some());
        let mut b = [0u8; 2];
        assert!(bus.read(0, 0x4d0, &mut b).is_some());
        assert_eq!(b, [0x20, 0x02]);
        let line = irq_line(pair.clone(), 9);
        line.set_level(true);
        assert!(lock(&pair).interrupt_pending());
        assert_eq!(lock(&pair).acknowledge(), 0x39);
        // Wide and out-of-range accesses on the wrapper.
        let mut m = pic_master_port(pair.clone());
        let mut buf = [0u8; 4];
        m.read(1, &mut buf);
        assert_eq!(buf, [0x00, 0xff, 0xff, 0xff]);
        m.write(2, &[0xff]);
        m.write(u64::MAX, &[0xff, 0xff]);
        assert_eq!(lock(&pair).read_port(0x21), 0x00);
        assert_eq!(lock(&pair).read_port(0x22), 0xff);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(u16, u8),
        Read(u16),
        Irq(u8, bool),
        Ack,
        Wide(u8, bool, u64, Vec<u8>),
    }

    fn op() -> impl Strategy<Value = Op> {
        let port = prop_oneof![
            Just(0x20u16),
            Just(0x21),
            Just(0xa0),
            Just(0xa1),
            Just(0x4d0),
            Just(0x4d1),
            any::<u16>()
        ];
        prop_oneof![
            4 => (port.clone(), any::<u8>()).prop_map(|(p, v)| Op::Write(p, v)),
            2 => port.prop_map(Op::Read),
            4 => (0u8..18, any::<bool>()).prop_map(|(i, l)| Op::Irq(i, l)),
            2 => Just(Op::Ack),
            1 => (
                0u8..3,
                any::<bool>(),
                prop_oneof![0u64..3, any::<u64>()],
                proptest::collection::vec(any::<u8>(), 0..5)
            )
                .prop_map(|(d, w, o, v)| Op::Wide(d, w, o, v)),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_accesses_never_panic(ops in proptest::collection::vec(op(), 0..300)) {
            let pair = Arc::new(Mutex::new(Pic8259Pair::new()));
            let intr = Irq::default();
            lock(&pair).set_intr_line(Box::new(intr.clone()));
            let mut devs = [
                pic_master_port(pair.clone()),
                pic_slave_port(pair.clone()),
                elcr_port(pair.clone()),
            ];
            for op in ops {
                match op {
                    Op::Write(port, v) => lock(&pair).write_port(port, v),
                    Op::Read(port) => { lock(&pair).read_port(port); }
                    Op::Irq(i, l) => lock(&pair).set_irq(i, l),
                    Op::Ack => {
                        let mut p = lock(&pair);
                        let pending = p.interrupt_pending();
                        let v = p.acknowledge();
                        let s = p.state();
                        if !pending {
                            prop_assert_eq!(v, s.master.vector_base | 7);
                        }
                    }
                    Op::Wide(d, w, o, mut data) => {
                        let dev = &mut devs[usize::from(d)];
                        if w { dev.write(o, &data) } else { dev.read(o, &mut data) }
                    }
                }
                let p = lock(&pair);
                let s = p.state();
                prop_assert_eq!(intr.level(), p.interrupt_pending());
                prop_assert_eq!(s.master.elcr & !ELCR_MASTER_MASK, 0);
                prop_assert_eq!(s.slave.elcr & !ELCR_SLAVE_MASK, 0);
                for c in [&s.master, &s.slave] {
                    let lm = c.level_mask();
                    prop_assert_eq!(c.irr & lm, c.pins & lm);
                    prop_assert!(c.highest_priority < 8);
                }
                // The cascade input mirrors the slave's INTR.
                prop_assert_eq!(s.master.pins & 4 != 0, s.slave.pending().is_some());
            }
            let levels = intr.levels();
            prop_assert!(levels.windows(2).all(|w| w[0] != w[1]));
            let mut q = Pic8259Pair::new();
            let st = lock(&pair).state();
            q.restore(&st);
            prop_assert_eq!(q.state(), st);
        }
    }
}
