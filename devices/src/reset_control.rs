//! The PCI-style reset control register at port 0xcf9, named by the FADT's
//! RESET_REG: writing a value with bit 2 (reset CPU) set asks for a reset.

use crate::bus::BusDevice;
use crate::vm_control::{VmAction, VmControl};

/// The value the FADT tells the OS to write (full reset: bits 1 and 2).
pub const RESET_VALUE: u8 = 0x06;

pub struct ResetControl {
    last: u8,
    control: VmControl,
}

impl ResetControl {
    pub fn new(control: VmControl) -> Self {
        ResetControl { last: 0, control }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = self.last;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        if let Some(&v) = data.first() {
            self.last = v & 0x0e;
            if v & 0x04 != 0 {
                self.control.request(VmAction::Reset);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_the_reset_value_resets() {
        let ctl = VmControl::new();
        let mut r = ResetControl::new(ctl.clone());
        r.write(0, &[0x02]);
        assert_eq!(ctl.take(), None);
        r.write(0, &[RESET_VALUE]);
        assert_eq!(ctl.take(), Some(VmAction::Reset));
        let mut b = [0u8; 1];
        r.read(0, &mut b);
        assert_eq!(b[0], 0x06);
    }
}
