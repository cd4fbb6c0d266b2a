//! ACPI fixed-hardware power management registers: the PM1a event block
//! (status + enable), the PM1a control block (SCI_EN, sleep type/enable)
//! and the PM timer, as one port range described by the FADT.
//!
//! Layout (offsets from the block base the machine maps, 12 bytes):
//!
//! | offset | register | width |
//! |---|---|---|
//! | 0 | PM1a_STS | 16 |
//! | 2 | PM1a_EN | 16 |
//! | 4 | PM1a_CNT | 16 |
//! | 8 | PM_TMR | 32 (24-bit counter extended to 32 bits: FADT TMR_VAL_EXT) |
//!
//! SCI_EN reads as set (the machine has no SMI command port: ACPI mode is
//! always on). Writing SLP_EN with SLP_TYP = [`S5_SLP_TYP`] asks for power
//! off through [`VmControl`]. The PM timer runs at 3.579545 MHz from the
//! injected clock; its reads are time-dependent.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::clock::{ns_to_ticks, Clock, TimeTaint};
use crate::vm_control::{VmAction, VmControl};

/// PM timer frequency (Hz).
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The sleep type the DSDT's `\_S5` package names for PM1a.
pub const S5_SLP_TYP: u16 = 5;
/// Bytes the machine maps.
pub const BLOCK_LEN: u64 = 12;

const SCI_EN: u16 = 1 << 0;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
/// PM1 status bits that exist (TMR_STS, BM_STS, GBL_STS, PWRBTN_STS,
/// SLPBTN_STS, RTC_STS, WAK_STS); writing 1 clears them.
const STS_MASK: u16 = 0x8f31;
const EN_MASK: u16 = 0x0521;

/// Plain state for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiPmState {
    pub pm1_sts: u16,
    pub pm1_en: u16,
    pub pm1_cnt: u16,
}

pub struct AcpiPm {
    s: AcpiPmState,
    clock: Arc<dyn Clock>,
    taint: TimeTaint,
    control: VmControl,
}

impl AcpiPm {
    pub fn new(clock: Arc<dyn Clock>, taint: TimeTaint, control: VmControl) -> Self {
        AcpiPm {
            s: AcpiPmState {
                pm1_cnt: SCI_EN,
                ..Default::default()
            },
            clock,
            taint,
            control,
        }
    }

    pub fn state(&self) -> AcpiPmState {
        self.s.clone()
    }

    pub fn restore(&mut self, s: &AcpiPmState) {
        self.s = s.clone();
        self.s.pm1_cnt |= SCI_EN;
    }

    /// The PM timer value (32 bits).
    pub fn timer(&self) -> u32 {
        ns_to_ticks(self.clock.now_ns(), PM_TIMER_HZ) as u32
    }

    fn read_byte(&mut self, off: u64) -> u8 {
        let reg16 = |v: u16, hi: bool| if hi { (v >> 8) as u8 } else { v as u8 };
        match off {
            0 | 1 => reg16(self.s.pm1_sts, off == 1),
            2 | 3 => reg16(self.s.pm1_en, off == 3),
            4 | 5 => reg16(self.s.pm1_cnt, off == 5),
            8..=11 => {
                self.taint.mark();
                (self.timer() >> (8 * (off - 8))) as u8
            }
            _ => 0xff,
        }
    }

    fn write16(&mut self, reg: u64, v: u16) {
        match reg {
            0 => self.s.pm1_sts &= !(v & STS_MASK),
            2 => self.s.pm1_en = v & EN_MASK,
            4 => {
                self.s.pm1_cnt = (v & !SLP_EN) | SCI_EN;
                if v & SLP_EN != 0 && (v >> SLP_TYP_SHIFT) & 7 == S5_SLP_TYP {
                    self.control.request(VmAction::PowerOff);
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_byte(offset.wrapping_add(i as u64));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // 16-bit registers: a byte write merges with the other half.
        let mut i = 0;
        while i < data.len() {
            let off = offset.wrapping_add(i as u64);
            let reg = off & !1;
            if reg <= 4 {
                let cur = match reg {
                    0 => 0, // status bits are write-1-to-clear: keep others untouched
                    2 => self.s.pm1_en,
                    _ => self.s.pm1_cnt & !SLP_EN,
                };
                let (lo, hi) = if off & 1 == 0 && i + 1 < data.len() {
                    i += 1;
                    (data[i - 1], data[i])
                } else if off & 1 == 0 {
                    (data[i], (cur >> 8) as u8)
                } else {
                    (cur as u8, data[i])
                };
                self.write16(reg, u16::from_le_bytes([lo, hi]));
            }
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn pm() -> (AcpiPm, ManualClock, VmControl) {
        let c = ManualClock::new();
        let ctl = VmControl::new();
        (
            AcpiPm::new(Arc::new(c.clone()), TimeTaint::new(), ctl.clone()),
            c,
            ctl,
        )
    }

    #[test]
    fn timer_counts_at_3_58_mhz_and_is_time_dependent() {
        let (mut p, c, _) = pm();
        c.set(1_000_000_000);
        let mut b = [0u8; 4];
        p.read(8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 3_579_545);
        assert!(p.taint.take());
    }

    #[test]
    fn s5_powers_off_and_sci_en_stays_set() {
        let (mut p, _, ctl) = pm();
        let mut b = [0u8; 2];
        p.read(4, &mut b);
        assert_eq!(u16::from_le_bytes(b) & SCI_EN, SCI_EN);
        // Sleep type 1 with SLP_EN: not S5, nothing happens.
        p.write(4, &((1u16 << 10) | SLP_EN).to_le_bytes());
        assert_eq!(ctl.take(), None);
        p.write(4, &((S5_SLP_TYP << 10) | SLP_EN).to_le_bytes());
        assert_eq!(ctl.take(), Some(VmAction::PowerOff));
        p.read(4, &mut b);
        assert_eq!(u16::from_le_bytes(b) & SLP_EN, 0);
    }

    #[test]
    fn status_is_write_one_to_clear_and_enable_round_trips() {
        let (mut p, _, _) = pm();
        p.s.pm1_sts = 0x0101;
        p.write(0, &0x0001u16.to_le_bytes());
        assert_eq!(p.s.pm1_sts, 0x0100);
        p.write(2, &0xffffu16.to_le_bytes());
        let mut b = [0u8; 2];
        p.read(2, &mut b);
        assert_eq!(u16::from_le_bytes(b), EN_MASK);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut p, _, _) = pm();
        let mut b = [0u8; 8];
        p.read(u64::MAX, &mut b);
        p.write(u64::MAX - 1, &[1, 2, 3]);
        p.read(6, &mut b[..2]);
        assert_eq!(&b[..2], &[0xff, 0xff]);
    }
}
