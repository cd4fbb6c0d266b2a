//! A 16550A UART (the PC's COM port), as register logic only.
//!
//! Like rust-vmm's `vm-superio`, the model knows nothing of buses, locks or
//! threads: the machine maps it with [`BusDevice`] at its base port (offsets
//! 0..=7), feeds host input through [`Uart16550::enqueue_input`], and gives it
//! a sink for the transmitted bytes and an [`IrqLine`] for its interrupt.
//!
//! Model and choices:
//!
//! * **Transmitter.** Infinitely fast: a byte written to THR is handed to the
//!   sink at once (and the sink flushed), so LSR.THRE and LSR.TEMT are always
//!   set and there is no transmit FIFO to keep. Writing THR still clears the
//!   THRE interrupt and sets it again when the byte has "left", so the IRQ
//!   output pulses low then high, as on hardware (an edge-triggered PIC sees a
//!   new interrupt). An I/O error of the sink is logged once and the byte is
//!   dropped; it never panics.
//! * **Receiver.** A 16-byte FIFO (1 byte, the RBR, while FIFOs are disabled).
//!   [`Uart16550::enqueue_input`] accepts only what fits and returns how many
//!   bytes it took; the caller keeps the rest and retries later, so host input
//!   is never dropped and never overruns. While loopback is on, the serial
//!   input pin is disconnected: no host input is accepted.
//! * **Character timeout.** Time is not modelled, so the "four character
//!   times" of the timeout have always elapsed: with FIFOs on and the FIFO
//!   holding fewer bytes than the trigger level, IIR reports the character
//!   timeout interrupt (0x0c) at once; at or above the trigger level it
//!   reports received data available (0x04). Both are cleared by draining.
//! * **Overrun.** Only loopback can overrun (the guest transmitting into its
//!   own full receiver): in FIFO mode the new byte is lost, in 16450 mode it
//!   replaces the unread one; either way LSR.OE is set until LSR is read.
//! * **IRQ output.** Level semantics: the line is high while an enabled
//!   interrupt is pending *and* MCR.OUT2 is set *and* loopback is off, and is
//!   driven (`set_level`) each time that value changes. This is the PC
//!   behaviour: PC serial cards gate the UART's INTR pin with the OUT2 pin,
//!   and in loopback the 16550 forces its modem outputs, OUT2 included, to
//!   their inactive state. (QEMU does not gate on OUT2; Linux sets OUT2
//!   anyway, so only guests that forget it see the difference.) IIR always
//!   reports the UART's internal state, whatever OUT2 says.
//! * **THRE interrupt.** Pending after every transmitted byte and when IER.ETBEI
//!   changes to 1 while THR is empty (as QEMU and Bochs do; Windows relies on
//!   it); cleared by writing THR, by reading IIR while THRE is the interrupt
//!   IIR reports, by clearing ETBEI, and by a transmit FIFO reset.
//! * **Modem lines.** Outside loopback, the inputs are fixed at CTS, DSR and
//!   DCD asserted, RI deasserted (what QEMU and vm-superio present). In
//!   loopback DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD. Changes of the lines set
//!   the MSR delta bits (TERI only on RI's trailing edge); reading MSR clears
//!   them.
//! * **Wide accesses.** The UART is byte-wide. An access of N bytes at offset
//!   O is handled as N byte accesses to registers O, O+1, ... (low byte
//!   first), which is what an ISA bus does with `in ax, dx` on real hardware.
//!   Bytes that fall outside 0..=7 read as 0xff and are dropped on write.
//! * **Writes to LSR and MSR** (factory test on real parts) are ignored.
//!   LCR's break bit is stored but has no effect on the (instant) line.
//! * **Is the guest ready for input?** ([`Uart16550::ready_for_input`]) A
//!   host that types before the guest's driver has set the UART up loses
//!   bytes: drivers empty the FIFO while they program it (Linux's 8250
//!   driver clears the FIFOs, then enables the receive interrupt, then reads
//!   RBR "for luck"). The model watches the guest's accesses, without
//!   changing anything it sees, and says the receiver is ready once (a) the
//!   receive interrupt is enabled and routed (IER.ERBFI, MCR.OUT2, no
//!   loopback) *and* the guest has since done something other than set-up —
//!   transmitted a byte or read RBR, i.e. the set-up (and its drain) is
//!   over —, or (b) the guest polls: [`POLL_READS`] reads of LSR in a row
//!   with no other access in between. A host feeding input holds it until
//!   then; nothing is ever dropped.

use std::collections::VecDeque;
use std::io::Write;

use crate::bus::BusDevice;
use crate::irq::IrqLine;

/// Receive FIFO depth of the 16550A.
pub const FIFO_SIZE: usize = 16;

/// Number of byte registers the UART decodes.
pub const REG_COUNT: u64 = 8;

// Register offsets.
const DATA: u64 = 0; // RBR / THR, DLL when DLAB
const IER: u64 = 1; // DLM when DLAB
const IIR_FCR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;

// IER bits.
const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IER_RLS: u8 = 0x04;
const IER_MS: u8 = 0x08;
const IER_MASK: u8 = 0x0f;

// IIR values.
const IIR_NONE: u8 = 0x01;
const IIR_MS: u8 = 0x00;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const IIR_RLS: u8 = 0x06;
const IIR_TIMEOUT: u8 = 0x0c;
const IIR_FIFO_ON: u8 = 0xc0;

// FCR bits.
const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;
const FCR_CLEAR_TX: u8 = 0x04;
/// The bits FCR keeps: enable, DMA mode, trigger level.
const FCR_STORED: u8 = 0xc9;

// LCR bits.
const LCR_DLAB: u8 = 0x80;

// MCR bits.
const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const MCR_MASK: u8 = 0x1f;

// LSR bits.
const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_PE: u8 = 0x04;
const LSR_FE: u8 = 0x08;
const LSR_BI: u8 = 0x10;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const LSR_ERRORS: u8 = LSR_OE | LSR_PE | LSR_FE | LSR_BI;

// MSR bits.
const MSR_DCTS: u8 = 0x01;
const MSR_DDSR: u8 = 0x02;
const MSR_TERI: u8 = 0x04;
const MSR_DDCD: u8 = 0x08;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;
const MSR_DELTAS: u8 = 0x0f;
const MSR_LINES: u8 = 0xf0;

/// Modem inputs outside loopback: CTS, DSR and DCD asserted.
const EXTERNAL_LINES: u8 = MSR_CTS | MSR_DSR | MSR_DCD;

/// LSR reads in a row (nothing else in between) that show a guest polling
/// the receiver.
pub const POLL_READS: u32 = 32;

/// Divisor after reset: 115200 / 12 = 9600 baud.
const DEFAULT_DIVISOR: u16 = 12;

/// Every register of the UART, plus the receive FIFO. Derived values (LSR's
/// DR, THRE and TEMT, IIR) are not stored; they follow from the rest.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Uart16550State {
    /// Divisor latch, low byte.
    pub dll: u8,
    /// Divisor latch, high byte.
    pub dlm: u8,
    /// Interrupt enable register (bits 0-3).
    pub ier: u8,
    /// FIFO control: enable (bit 0), DMA mode (bit 3), trigger (bits 6-7).
    pub fcr: u8,
    pub lcr: u8,
    /// Modem control register (bits 0-4).
    pub mcr: u8,
    /// The latched LSR error bits (OE, PE, FE, BI), cleared by reading LSR.
    pub lsr_errors: u8,
    /// Modem status: line states (bits 4-7) and deltas (bits 0-3).
    pub msr: u8,
    pub scr: u8,
    /// THRE interrupt pending (the "THR empty" event has not been consumed).
    pub thre_pending: bool,
    /// Received bytes not yet read, oldest first.
    pub rx_fifo: VecDeque<u8>,
}

impl Default for Uart16550State {
    /// The state after a hardware reset.
    fn default() -> Self {
        Uart16550State {
            dll: DEFAULT_DIVISOR as u8,
            dlm: (DEFAULT_DIVISOR >> 8) as u8,
            ier: 0,
            fcr: 0,
            lcr: 0,
            mcr: 0,
            lsr_errors: 0,
            msr: EXTERNAL_LINES,
            scr: 0,
            thre_pending: false,
            rx_fifo: VecDeque::with_capacity(FIFO_SIZE),
        }
    }
}

/// A 16550A UART. See the module documentation for the model.
pub struct Uart16550 {
    s: Uart16550State,
    irq: Box<dyn IrqLine>,
    out: Box<dyn Write + Send>,
    /// The level last driven on `irq`.
    irq_level: bool,
    /// The sink failed once already (its errors are logged once).
    out_error_logged: bool,
    /// The interrupt-driven receiver was set up and then used (see
    /// [`Uart16550::ready_for_input`]). Not guest-visible.
    rx_armed: bool,
    /// LSR reads in a row with no other access.
    lsr_polls: u32,
}

impl Uart16550 {
    /// A UART in its reset state, interrupting through `irq` and sending the
    /// transmitted bytes to `out`.
    pub fn new(irq: Box<dyn IrqLine>, out: Box<dyn Write + Send>) -> Self {
        Uart16550 {
            s: Uart16550State::default(),
            irq,
            out,
            irq_level: false,
            out_error_logged: false,
            rx_armed: false,
            lsr_polls: 0,
        }
    }

    /// The receive interrupt is enabled and reaches the interrupt pin.
    fn rx_interrupt_routed(&self) -> bool {
        self.s.ier & IER_RDA != 0 && self.s.mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2
    }

    /// Whether the guest's driver has finished setting the receiver up, so
    /// host input offered now will not be flushed by that set-up (see the
    /// module documentation). Has no side effects.
    pub fn ready_for_input(&self) -> bool {
        (self.rx_armed && self.rx_interrupt_routed()) || self.lsr_polls >= POLL_READS
    }

    /// Watch a guest access for [`Uart16550::ready_for_input`].
    fn observe(&mut self, reg: u64, write: bool) {
        let lsr_read = !write && reg == LSR && !self.dlab();
        self.lsr_polls = if lsr_read {
            self.lsr_polls.saturating_add(1)
        } else {
            0
        };
        let data = reg == DATA && !self.dlab();
        if !self.rx_interrupt_routed() {
            self.rx_armed = false;
        } else if data {
            // A transmitted byte or an RBR read after the set-up.
            self.rx_armed = true;
        } else if write && reg == IIR_FCR {
            // Re-programming the FIFOs is set-up again.
            self.rx_armed = false;
        }
    }

    /// Hardware reset: every register to its reset value, FIFO emptied.
    pub fn reset(&mut self) {
        self.s = Uart16550State::default();
        self.update_irq();
    }

    /// A copy of the register state, for snapshots.
    pub fn state(&self) -> Uart16550State {
        self.s.clone()
    }

    /// Load a register state (from [`Uart16550::state`]). Out-of-range bits
    /// are masked and an over-full FIFO truncated, so any value is safe. The
    /// IRQ line is driven to the level the restored state implies.
    pub fn restore(&mut self, s: &Uart16550State) {
        let mut s = s.clone();
        s.ier &= IER_MASK;
        s.fcr &= FCR_STORED;
        s.mcr &= MCR_MASK;
        s.lsr_errors &= LSR_ERRORS;
        s.rx_fifo.truncate(rx_capacity(s.fcr));
        self.s = s;
        self.irq_level = self.irq_output();
        self.irq.set_level(self.irq_level);
    }

    /// Queue received bytes. Returns how many of `bytes` were accepted (a
    /// prefix); the caller must keep the rest and offer them again later.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.rx_space());
        self.s.rx_fifo.extend(&bytes[..n]);
        if n > 0 {
            self.update_irq();
        }
        n
    }

    /// How many bytes [`Uart16550::enqueue_input`] would accept now: free
    /// room in the receive FIFO (in the RBR in 16450 mode), 0 in loopback.
    pub fn rx_space(&self) -> usize {
        if self.s.mcr & MCR_LOOP != 0 {
            return 0;
        }
        rx_capacity(self.s.fcr).saturating_sub(self.s.rx_fifo.len())
    }

    /// The current baud rate divisor (DLM:DLL).
    pub fn divisor(&self) -> u16 {
        u16::from_le_bytes([self.s.dll, self.s.dlm])
    }

    /// Whether the UART has an enabled interrupt pending (IIR bit 0 clear),
    /// regardless of OUT2. Has no side effects.
    pub fn interrupt_pending(&self) -> bool {
        self.iir_id() != IIR_NONE
    }

    /// The level of the IRQ output: pending, gated by OUT2 and loopback.
    pub fn irq_output(&self) -> bool {
        self.interrupt_pending() && self.s.mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2
    }

    fn fifo_enabled(&self) -> bool {
        self.s.fcr & FCR_ENABLE != 0
    }

    fn dlab(&self) -> bool {
        self.s.lcr & LCR_DLAB != 0
    }

    fn trigger_level(&self) -> usize {
        match self.s.fcr >> 6 {
            0 => 1,
            1 => 4,
            2 => 8,
            _ => 14,
        }
    }

    /// IIR bits 0-3: the highest-priority enabled pending interrupt.
    fn iir_id(&self) -> u8 {
        let ier = self.s.ier;
        if ier & IER_RLS != 0 && self.s.lsr_errors != 0 {
            IIR_RLS
        } else if ier & IER_RDA != 0 && !self.s.rx_fifo.is_empty() {
            if self.fifo_enabled() && self.s.rx_fifo.len() < self.trigger_level() {
                IIR_TIMEOUT
            } else {
                IIR_RDA
            }
        } else if ier & IER_THRE != 0 && self.s.thre_pending {
            IIR_THRE
        } else if ier & IER_MS != 0 && self.s.msr & MSR_DELTAS != 0 {
            IIR_MS
        } else {
            IIR_NONE
        }
    }

    fn lsr(&self) -> u8 {
        let dr = if self.s.rx_fifo.is_empty() { 0 } else { LSR_DR };
        dr | self.s.lsr_errors | LSR_THRE | LSR_TEMT
    }

    /// Drive the IRQ line if its level changed.
    fn update_irq(&mut self) {
        let level = self.irq_output();
        if level != self.irq_level {
            self.irq_level = level;
            self.irq.set_level(level);
        }
    }

    /// Recompute the modem input lines from MCR and latch the deltas.
    fn update_modem_lines(&mut self) {
        let mcr = self.s.mcr;
        let lines = if mcr & MCR_LOOP != 0 {
            let mut l = 0;
            if mcr & MCR_RTS != 0 {
                l |= MSR_CTS;
            }
            if mcr & MCR_DTR != 0 {
                l |= MSR_DSR;
            }
            if mcr & MCR_OUT1 != 0 {
                l |= MSR_RI;
            }
            if mcr & MCR_OUT2 != 0 {
                l |= MSR_DCD;
            }
            l
        } else {
            EXTERNAL_LINES
        };
        let old = self.s.msr & MSR_LINES;
        let changed = old ^ lines;
        let mut deltas = self.s.msr & MSR_DELTAS;
        if changed & MSR_CTS != 0 {
            deltas |= MSR_DCTS;
        }
        if changed & MSR_DSR != 0 {
            deltas |= MSR_DDSR;
        }
        // Trailing edge of RI only.
        if old & MSR_RI != 0 && lines & MSR_RI == 0 {
            deltas |= MSR_TERI;
        }
        if changed & MSR_DCD != 0 {
            deltas |= MSR_DDCD;
        }
        self.s.msr = lines | deltas;
    }

    /// A byte arriving at the receiver from the loopback path.
    fn loopback_receive(&mut self, byte: u8) {
        if self.s.rx_fifo.len() < rx_capacity(self.s.fcr) {
            self.s.rx_fifo.push_back(byte);
        } else {
            self.s.lsr_errors |= LSR_OE;
            if !self.fifo_enabled() {
                // 16450 mode: the new character overwrites the unread one.
                self.s.rx_fifo.clear();
                self.s.rx_fifo.push_back(byte);
            }
            // FIFO mode: the character in the shift register is lost.
        }
    }

    fn transmit(&mut self, byte: u8) {
        // THR is full for an instant: the THRE interrupt goes away...
        self.s.thre_pending = false;
        self.update_irq();
        if self.s.mcr & MCR_LOOP != 0 {
            self.loopback_receive(byte);
        } else {
            let res = self.out.write_all(&[byte]).and_then(|()| self.out.flush());
            if let Err(e) = res {
                if !self.out_error_logged {
                    self.out_error_logged = true;
                    log::warn!("uart: output sink failed, transmitted bytes are lost: {e}");
                }
            }
        }
        // ...and comes back once the byte has gone.
        self.s.thre_pending = true;
        self.update_irq();
    }

    fn write_fcr(&mut self, val: u8) {
        let mut val = val;
        if (val ^ self.s.fcr) & FCR_ENABLE != 0 {
            // Switching the FIFOs on or off empties them.
            val |= FCR_CLEAR_RX | FCR_CLEAR_TX;
        }
        if val & FCR_CLEAR_RX != 0 {
            self.s.rx_fifo.clear();
        }
        if val & FCR_CLEAR_TX != 0 {
            // The (always empty) transmit FIFO is reset: THR is empty.
            self.s.thre_pending = true;
        }
        // The other bits are only programmed while bit 0 is written as 1.
        self.s.fcr = if val & FCR_ENABLE != 0 {
            val & FCR_STORED
        } else {
            0
        };
    }

    fn write_ier(&mut self, val: u8) {
        let val = val & IER_MASK;
        let changed = self.s.ier ^ val;
        self.s.ier = val;
        if changed & IER_THRE != 0 {
            // THR is always empty, so enabling ETBEI raises THRE at once.
            self.s.thre_pending = val & IER_THRE != 0;
        }
    }

    fn read_reg(&mut self, reg: u64) -> u8 {
        match reg {
            DATA if self.dlab() => self.s.dll,
            DATA => self.s.rx_fifo.pop_front().unwrap_or(0),
            IER if self.dlab() => self.s.dlm,
            IER => self.s.ier,
            IIR_FCR => {
                let id = self.iir_id();
                if id == IIR_THRE {
                    self.s.thre_pending = false;
                }
                let fifo = if self.fifo_enabled() { IIR_FIFO_ON } else { 0 };
                id | fifo
            }
            LCR => self.s.lcr,
            MCR => self.s.mcr,
            LSR => {
                let v = self.lsr();
                self.s.lsr_errors = 0;
                v
            }
            MSR => {
                let v = self.s.msr;
                self.s.msr &= MSR_LINES;
                v
            }
            SCR => self.s.scr,
            _ => 0xff,
        }
    }

    fn write_reg(&mut self, reg: u64, val: u8) {
        match reg {
            DATA if self.dlab() => self.s.dll = val,
            DATA => self.transmit(val),
            IER if self.dlab() => self.s.dlm = val,
            IER => self.write_ier(val),
            IIR_FCR => self.write_fcr(val),
            LCR => self.s.lcr = val,
            MCR => {
                self.s.mcr = val & MCR_MASK;
                self.update_modem_lines();
            }
            SCR => self.s.scr = val,
            // LSR, MSR: read-only here. Outside the UART: not ours.
            _ => {}
        }
    }
}

fn rx_capacity(fcr: u8) -> usize {
    if fcr & FCR_ENABLE != 0 {
        FIFO_SIZE
    } else {
        1
    }
}

impl BusDevice for Uart16550 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match offset.checked_add(i as u64) {
                Some(reg) if reg < REG_COUNT => {
                    let v = self.read_reg(reg);
                    self.observe(reg, false);
                    v
                }
                _ => 0xff,
            };
            self.update_irq();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if let Some(reg) = offset.checked_add(i as u64) {
                if reg < REG_COUNT {
                    self.write_reg(reg, b);
                    self.observe(reg, true);
                }
            }
            self.update_irq();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};

    /// A sink collecting the transmitted bytes.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn take(&self) -> Vec<u8> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    /// A sink that always fails.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("broken"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

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
        fn take(&self) -> Vec<bool> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
        fn level(&self) -> bool {
            self.0.lock().unwrap().last().copied().unwrap_or(false)
        }
    }

    fn uart() -> (Uart16550, Sink, Irq) {
        let sink = Sink::default();
        let irq = Irq::default();
        let u = Uart16550::new(Box::new(irq.clone()), Box::new(sink.clone()));
        (u, sink, irq)
    }

    fn rd(u: &mut Uart16550, reg: u64) -> u8 {
        let mut b = [0u8];
        u.read(reg, &mut b);
        b[0]
    }

    fn wr(u: &mut Uart16550, reg: u64, v: u8) {
        u.write(reg, &[v]);
    }

    #[test]
    fn reset_values() {
        let (mut u, _, irq) = uart();
        assert_eq!(rd(&mut u, IER), 0);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE);
        assert_eq!(rd(&mut u, LCR), 0);
        assert_eq!(rd(&mut u, MCR), 0);
        assert_eq!(rd(&mut u, LSR), LSR_THRE | LSR_TEMT);
        assert_eq!(rd(&mut u, MSR), EXTERNAL_LINES);
        assert_eq!(rd(&mut u, SCR), 0);
        assert_eq!(u.divisor(), 12);
        assert!(irq.levels().is_empty());
    }

    /// Linux's 8250 start-up: clear the FIFOs, read the registers, set
    /// OUT2, enable the receive interrupt, read RBR again. Ready only after
    /// that last drain; not ready again once the interrupt is disabled.
    #[test]
    fn ready_for_input_after_an_interrupt_driven_set_up() {
        let (mut u, _, _) = uart();
        assert!(!u.ready_for_input());
        // Early console output: THR writes, no receiver.
        rd(&mut u, LSR);
        wr(&mut u, DATA, b'x');
        assert!(!u.ready_for_input());
        wr(&mut u, IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX | FCR_CLEAR_TX);
        wr(&mut u, IIR_FCR, 0);
        for reg in [LSR, DATA, IIR_FCR, MSR] {
            rd(&mut u, reg);
        }
        wr(&mut u, MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
        assert!(!u.ready_for_input());
        wr(&mut u, IER, IER_RDA | IER_RLS);
        assert!(!u.ready_for_input(), "still in its set-up");
        rd(&mut u, LSR);
        rd(&mut u, DATA);
        assert!(u.ready_for_input());
        rd(&mut u, IIR_FCR);
        rd(&mut u, MSR);
        assert!(u.ready_for_input());
        // FIFO re-programming is set-up again; a transmitted byte ends it.
        wr(&mut u, IIR_FCR, 0xc7);
        assert!(!u.ready_for_input());
        wr(&mut u, DATA, b'y');
        assert!(u.ready_for_input());
        // Interrupt disabled, or loopback: not ready.
        wr(&mut u, MCR, MCR_OUT2 | MCR_LOOP);
        assert!(!u.ready_for_input());
        wr(&mut u, MCR, MCR_OUT2);
        assert!(!u.ready_for_input());
        wr(&mut u, DATA, b'z');
        assert!(u.ready_for_input());
        wr(&mut u, IER, 0);
        assert!(!u.ready_for_input());
    }

    /// A guest that polls LSR for data (no interrupts) is ready once it
    /// has polled [`POLL_READS`] times in a row.
    #[test]
    fn ready_for_input_when_polled() {
        let (mut u, _, _) = uart();
        for _ in 0..POLL_READS - 1 {
            rd(&mut u, LSR);
        }
        assert!(!u.ready_for_input());
        wr(&mut u, DATA, b'a');
        for _ in 0..POLL_READS - 1 {
            rd(&mut u, LSR);
        }
        assert!(!u.ready_for_input());
        rd(&mut u, LSR);
        assert!(u.ready_for_input());
        assert_eq!(u.enqueue_input(b"q"), 1);
        assert_eq!(rd(&mut u, LSR) & LSR_DR, LSR_DR);
        assert_eq!(rd(&mut u, DATA), b'q');
        assert!(!u.ready_for_input());
    }

    #[test]
    fn dlab_selects_divisor_latch() {
        let (mut u, sink, _) = uart();
        wr(&mut u, IER, 0x05);
        wr(&mut u, LCR, LCR_DLAB | 0x03);
        assert_eq!(rd(&mut u, DATA), 12);
        assert_eq!(rd(&mut u, IER), 0);
        wr(&mut u, DATA, 0x01);
        wr(&mut u, IER, 0x02);
        assert_eq!(rd(&mut u, DATA), 0x01);
        assert_eq!(rd(&mut u, IER), 0x02);
        assert_eq!(u.divisor(), 0x0201);
        // Nothing was transmitted and IER untouched.
        assert!(sink.take().is_empty());
        wr(&mut u, LCR, 0x03);
        assert_eq!(rd(&mut u, IER), 0x05);
        assert_eq!(rd(&mut u, LCR), 0x03);
        assert_eq!(u.divisor(), 0x0201);
    }

    #[test]
    fn register_round_trips() {
        let (mut u, _, _) = uart();
        for v in [0x00u8, 0x1b, 0x7f, 0x55, 0xaa, 0x03] {
            wr(&mut u, LCR, v);
            assert_eq!(rd(&mut u, LCR), v);
        }
        for v in 0..=255u8 {
            wr(&mut u, SCR, v);
            assert_eq!(rd(&mut u, SCR), v);
            wr(&mut u, MCR, v);
            assert_eq!(rd(&mut u, MCR), v & MCR_MASK);
            wr(&mut u, IER, v);
            assert_eq!(rd(&mut u, IER), v & IER_MASK);
        }
    }

    #[test]
    fn thr_goes_to_sink() {
        let (mut u, sink, _) = uart();
        for &b in b"hello\n" {
            wr(&mut u, DATA, b);
            assert_eq!(rd(&mut u, LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
        }
        assert_eq!(sink.take(), b"hello\n");
    }

    #[test]
    fn broken_sink_does_not_panic() {
        let mut u = Uart16550::new(Box::new(crate::irq::NullIrq), Box::new(Broken));
        for b in 0..100u8 {
            wr(&mut u, DATA, b);
        }
        assert!(u.out_error_logged);
        assert_eq!(rd(&mut u, LSR) & LSR_THRE, LSR_THRE);
    }

    #[test]
    fn thre_interrupt_set_on_enable_and_cleared_by_iir_read() {
        let (mut u, _, irq) = uart();
        wr(&mut u, MCR, MCR_OUT2);
        wr(&mut u, IER, IER_THRE);
        assert!(irq.level());
        assert_eq!(rd(&mut u, IIR_FCR), IIR_THRE);
        assert!(!irq.level());
        // Reported once only.
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE);
        // Rewriting the same IER value does not bring it back...
        wr(&mut u, IER, IER_THRE);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE);
        // ...toggling ETBEI does.
        wr(&mut u, IER, 0);
        wr(&mut u, IER, IER_THRE);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_THRE);
        // Transmitting a byte raises it again, pulsing the line.
        irq.take();
        wr(&mut u, DATA, b'x');
        assert_eq!(irq.take(), vec![true]);
        wr(&mut u, DATA, b'y');
        assert_eq!(irq.take(), vec![false, true]);
        // Disabling ETBEI drops it.
        wr(&mut u, IER, 0);
        assert_eq!(irq.take(), vec![false]);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE);
    }

    #[test]
    fn iir_priority() {
        let (mut u, _, _) = uart();
        wr(&mut u, MCR, MCR_OUT2 | MCR_LOOP);
        wr(&mut u, IER, IER_MASK);
        // Entering loopback changed every modem line: MS pending (lowest),
        // but THRE (enabled just now) outranks it.
        assert_eq!(rd(&mut u, IIR_FCR), IIR_THRE);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_MS);
        // Received data outranks modem status.
        wr(&mut u, DATA, b'a'); // loops back: RDA, and THRE again
        assert_eq!(rd(&mut u, IIR_FCR), IIR_RDA);
        // An overrun (second byte into the 1-byte RBR) outranks everything.
        wr(&mut u, DATA, b'b');
        assert_eq!(rd(&mut u, IIR_FCR), IIR_RLS);
        assert_eq!(rd(&mut u, LSR), LSR_DR | LSR_OE | LSR_THRE | LSR_TEMT);
        // LSR read cleared OE: back to RDA.
        assert_eq!(rd(&mut u, IIR_FCR), IIR_RDA);
        // 16450 mode: the overrunning byte replaced the unread one.
        assert_eq!(rd(&mut u, DATA), b'b');
        // Then THRE (reading IIR while RDA showed did not clear it).
        assert_eq!(rd(&mut u, IIR_FCR), IIR_THRE);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_MS);
        rd(&mut u, MSR);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE);
    }

    #[test]
    fn rx_fifo_data_ready_and_rda_interrupt() {
        let (mut u, _, irq) = uart();
        wr(&mut u, MCR, MCR_OUT2);
        wr(&mut u, IIR_FCR, FCR_ENABLE | 0xc0); // trigger 14
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE | IIR_FIFO_ON);
        assert_eq!(u.rx_space(), FIFO_SIZE);
        let input: Vec<u8> = (0..20).collect();
        assert_eq!(u.enqueue_input(&input), 16);
        assert_eq!(u.rx_space(), 0);
        assert_eq!(u.enqueue_input(&input[16..]), 0);
        assert_eq!(rd(&mut u, LSR) & LSR_DR, LSR_DR);
        // Not enabled yet: no interrupt.
        assert!(!irq.level());
        wr(&mut u, IER, IER_RDA);
        assert!(irq.level());
        assert_eq!(rd(&mut u, IIR_FCR), IIR_RDA | IIR_FIFO_ON);
        for i in 0..3 {
            assert_eq!(rd(&mut u, DATA), i);
        }
        // 13 left, below the trigger level of 14: character timeout.
        assert_eq!(rd(&mut u, IIR_FCR), IIR_TIMEOUT | IIR_FIFO_ON);
        assert!(irq.level());
        assert_eq!(u.enqueue_input(&input[16..]), 3);
        for i in 3..19 {
            assert_eq!(rd(&mut u, LSR) & LSR_DR, LSR_DR);
            assert_eq!(rd(&mut u, DATA), i);
        }
        assert_eq!(rd(&mut u, LSR) & LSR_DR, 0);
        assert!(!irq.level());
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE | IIR_FIFO_ON);
        // Reading an empty RBR is harmless.
        assert_eq!(rd(&mut u, DATA), 0);
    }

    #[test]
    fn trigger_levels() {
        let (mut u, _, _) = uart();
        wr(&mut u, IER, IER_RDA);
        for (bits, level) in [(0x00u8, 1usize), (0x40, 4), (0x80, 8), (0xc0, 14)] {
            wr(&mut u, IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX | bits);
            u.enqueue_input(&vec![0; level - 1]);
            let expect = if level == 1 { IIR_NONE } else { IIR_TIMEOUT };
            assert_eq!(rd(&mut u, IIR_FCR) & 0x0f, expect, "trigger {level}");
            u.enqueue_input(&[0]);
            assert_eq!(rd(&mut u, IIR_FCR) & 0x0f, IIR_RDA, "trigger {level}");
        }
    }

    #[test]
    fn non_fifo_mode_holds_one_byte() {
        let (mut u, _, _) = uart();
        assert_eq!(u.rx_space(), 1);
        assert_eq!(u.enqueue_input(b"ab"), 1);
        assert_eq!(u.rx_space(), 0);
        assert_eq!(rd(&mut u, DATA), b'a');
        assert_eq!(u.enqueue_input(b"b"), 1);
        assert_eq!(rd(&mut u, DATA), b'b');
    }

    #[test]
    fn fifo_clear() {
        let (mut u, _, irq) = uart();
        wr(&mut u, MCR, MCR_OUT2);
        wr(&mut u, IIR_FCR, FCR_ENABLE);
        wr(&mut u, IER, IER_RDA);
        u.enqueue_input(b"abc");
        assert!(irq.level());
        // Clearing TX only keeps the data.
        wr(&mut u, IIR_FCR, FCR_ENABLE | FCR_CLEAR_TX);
        assert_eq!(u.rx_space(), 13);
        wr(&mut u, IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX);
        assert_eq!(u.rx_space(), 16);
        assert_eq!(rd(&mut u, LSR) & LSR_DR, 0);
        assert!(!irq.level());
        // The clear bits self-clear: FCR keeps only enable/DMA/trigger.
        assert_eq!(u.state().fcr, FCR_ENABLE);
        // Turning the FIFO off empties it too.
        u.enqueue_input(b"xyz");
        wr(&mut u, IIR_FCR, 0);
        assert_eq!(u.state().rx_fifo.len(), 0);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE);
        // Other bits are not programmed while bit 0 is written as 0.
        wr(&mut u, IIR_FCR, 0xc8);
        assert_eq!(u.state().fcr, 0);
    }

    #[test]
    fn loopback() {
        let (mut u, sink, irq) = uart();
        wr(&mut u, IIR_FCR, FCR_ENABLE);
        wr(&mut u, MCR, MCR_LOOP | MCR_OUT2);
        assert_eq!(u.rx_space(), 0);
        assert_eq!(u.enqueue_input(b"host"), 0);
        for b in 0..20u8 {
            wr(&mut u, DATA, b);
        }
        assert!(sink.take().is_empty());
        // 16 fit, the rest overran.
        assert_eq!(rd(&mut u, LSR) & (LSR_DR | LSR_OE), LSR_DR | LSR_OE);
        assert_eq!(rd(&mut u, LSR) & LSR_OE, 0);
        for b in 0..16u8 {
            assert_eq!(rd(&mut u, DATA), b);
        }
        assert_eq!(rd(&mut u, LSR) & LSR_DR, 0);
        // The interrupt is pending internally but the pin is gated off in
        // loopback.
        wr(&mut u, IER, IER_THRE);
        assert!(u.interrupt_pending());
        assert!(!u.irq_output());
        assert!(!irq.level());
        // Leaving loopback reconnects both.
        wr(&mut u, MCR, MCR_OUT2);
        assert!(irq.level());
        wr(&mut u, DATA, b'!');
        assert_eq!(sink.take(), b"!");
        assert_eq!(u.rx_space(), 16);
    }

    #[test]
    fn loopback_msr_mapping_and_deltas() {
        let (mut u, _, _) = uart();
        // Linux's probe: LOOP | RTS | OUT2 reads MSR & 0xf0 == 0x90.
        wr(&mut u, MCR, MCR_LOOP | MCR_RTS | MCR_OUT2);
        let msr = rd(&mut u, MSR);
        assert_eq!(msr & MSR_LINES, MSR_CTS | MSR_DCD);
        // DSR dropped (external DSR was on); CTS and DCD unchanged.
        assert_eq!(msr & MSR_DELTAS, MSR_DDSR);
        // Deltas are cleared by the read.
        assert_eq!(rd(&mut u, MSR), MSR_CTS | MSR_DCD);
        wr(&mut u, MCR, MCR_LOOP | MCR_DTR | MCR_OUT1);
        assert_eq!(
            rd(&mut u, MSR),
            MSR_DSR | MSR_RI | MSR_DCTS | MSR_DDSR | MSR_DDCD
        );
        // RI's leading edge set no TERI; its trailing edge does.
        wr(&mut u, MCR, MCR_LOOP | MCR_DTR);
        assert_eq!(rd(&mut u, MSR), MSR_DSR | MSR_TERI);
        // Leaving loopback restores the external lines.
        wr(&mut u, MCR, 0);
        assert_eq!(rd(&mut u, MSR), EXTERNAL_LINES | MSR_DCTS | MSR_DDCD);
        assert_eq!(rd(&mut u, MSR), EXTERNAL_LINES);
    }

    #[test]
    fn modem_status_interrupt() {
        let (mut u, _, _) = uart();
        wr(&mut u, IER, IER_MS);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE);
        wr(&mut u, MCR, MCR_LOOP);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_MS);
        // Reading IIR does not clear it; reading MSR does.
        assert_eq!(rd(&mut u, IIR_FCR), IIR_MS);
        rd(&mut u, MSR);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE);
    }

    #[test]
    fn out2_gates_the_irq_line() {
        let (mut u, _, irq) = uart();
        wr(&mut u, IER, IER_RDA);
        u.enqueue_input(b"a");
        assert!(u.interrupt_pending());
        assert_eq!(rd(&mut u, IIR_FCR), IIR_RDA);
        assert!(irq.levels().is_empty());
        wr(&mut u, MCR, MCR_OUT2 | MCR_DTR | MCR_RTS);
        assert_eq!(irq.take(), vec![true]);
        wr(&mut u, MCR, MCR_DTR | MCR_RTS);
        assert_eq!(irq.take(), vec![false]);
        wr(&mut u, MCR, MCR_OUT2);
        assert_eq!(irq.take(), vec![true]);
        rd(&mut u, DATA);
        assert_eq!(irq.take(), vec![false]);
    }

    #[test]
    fn irq_is_driven_only_on_changes() {
        let (mut u, _, irq) = uart();
        wr(&mut u, MCR, MCR_OUT2);
        wr(&mut u, IER, IER_RDA);
        u.enqueue_input(b"a");
        wr(&mut u, IIR_FCR, FCR_ENABLE); // clears the FIFO
        wr(&mut u, IIR_FCR, FCR_ENABLE);
        u.enqueue_input(b"bc");
        u.enqueue_input(b"d");
        rd(&mut u, DATA);
        rd(&mut u, DATA);
        rd(&mut u, DATA);
        assert_eq!(irq.take(), vec![true, false, true, false]);
    }

    #[test]
    fn state_restore_round_trip() {
        let (mut u, _, _) = uart();
        wr(&mut u, LCR, LCR_DLAB);
        wr(&mut u, DATA, 0x01);
        wr(&mut u, IER, 0x00);
        wr(&mut u, LCR, 0x03);
        wr(&mut u, IIR_FCR, FCR_ENABLE | 0x80);
        wr(&mut u, IER, IER_RDA | IER_THRE);
        wr(&mut u, MCR, MCR_OUT2 | MCR_DTR);
        wr(&mut u, SCR, 0x5a);
        u.enqueue_input(b"pending");
        let st = u.state();

        let (mut v, _, virq) = uart();
        v.restore(&st);
        assert_eq!(v.state(), st);
        // The restored line level is driven.
        assert_eq!(virq.levels(), vec![true]);
        for reg in [IER, LCR, MCR, LSR, SCR] {
            assert_eq!(rd(&mut u, reg), rd(&mut v, reg), "reg {reg}");
        }
        assert_eq!(v.divisor(), 1);
        let a: Vec<u8> = (0..8).map(|_| rd(&mut u, DATA)).collect();
        let b: Vec<u8> = (0..8).map(|_| rd(&mut v, DATA)).collect();
        assert_eq!(a, b);
        assert_eq!(&b[..7], b"pending");

        // Garbage is sanitised, not trusted.
        let bad = Uart16550State {
            ier: 0xff,
            mcr: 0xff,
            fcr: 0,
            rx_fifo: (0..100).collect(),
            ..Uart16550State::default()
        };
        v.restore(&bad);
        let s = v.state();
        assert_eq!((s.ier, s.mcr, s.rx_fifo.len()), (0x0f, 0x1f, 1));

        v.reset();
        assert_eq!(v.state(), Uart16550State::default());
    }

    #[test]
    fn wide_accesses_hit_consecutive_registers() {
        let (mut u, sink, _) = uart();
        // A 16-bit write at 3 sets LCR and MCR.
        u.write(LCR, &[0x03, 0x0b]);
        assert_eq!(rd(&mut u, LCR), 0x03);
        assert_eq!(rd(&mut u, MCR), 0x0b);
        // A 32-bit read at 4 returns MCR, LSR, MSR, SCR.
        wr(&mut u, SCR, 0x77);
        let mut buf = [0u8; 4];
        u.read(MCR, &mut buf);
        assert_eq!(buf, [0x0b, LSR_THRE | LSR_TEMT, EXTERNAL_LINES, 0x77]);
        // Bytes past the last register read as ones and are dropped.
        let mut buf = [0u8; 4];
        u.read(6, &mut buf);
        assert_eq!(buf, [EXTERNAL_LINES, 0x77, 0xff, 0xff]);
        u.write(7, &[0x11, 0x22, 0x33]);
        assert_eq!(rd(&mut u, SCR), 0x11);
        u.write(u64::MAX, &[1, 2]);
        u.read(u64::MAX, &mut buf);
        assert_eq!(buf, [0xff; 4]);
        // THR then IER in one 16-bit write.
        u.write(DATA, &[b'z', 0x00]);
        assert_eq!(sink.take(), b"z");
    }

    #[derive(Clone, Debug)]
    enum Op {
        Read(u64, usize),
        Write(u64, Vec<u8>),
        Input(Vec<u8>),
    }

    fn op() -> impl Strategy<Value = Op> {
        let offset = prop_oneof![8 => 0u64..10, 1 => any::<u64>()];
        prop_oneof![
            (offset.clone(), 0usize..9).prop_map(|(o, n)| Op::Read(o, n)),
            (offset, proptest::collection::vec(any::<u8>(), 0..9))
                .prop_map(|(o, d)| Op::Write(o, d)),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(Op::Input),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_accesses_never_panic_and_keep_invariants(
            ops in proptest::collection::vec(op(), 0..200)
        ) {
            let (mut u, _, irq) = uart();
            for op in ops {
                match op {
                    Op::Read(o, n) => {
                        let mut buf = vec![0u8; n];
                        u.read(o, &mut buf);
                    }
                    Op::Write(o, d) => u.write(o, &d),
                    Op::Input(d) => {
                        let space = u.rx_space();
                        let n = u.enqueue_input(&d);
                        prop_assert_eq!(n, d.len().min(space));
                    }
                }
                let s = u.state();
                prop_assert!(s.rx_fifo.len() <= FIFO_SIZE);
                prop_assert_eq!(s.ier & !IER_MASK, 0);
                prop_assert_eq!(s.mcr & !MCR_MASK, 0);
                // The line always shows the gated pending state.
                prop_assert_eq!(irq.level(), u.irq_output());
            }
            // Never driven twice in a row to the same level.
            let levels = irq.levels();
            prop_assert!(levels.windows(2).all(|w| w[0] != w[1]));
            if let Some(first) = levels.first() {
                prop_assert!(*first);
            }
            // A restored copy behaves identically.
            let (mut v, _, _) = uart();
            v.restore(&u.state());
            prop_assert_eq!(v.state(), u.state());
        }
    }
}
