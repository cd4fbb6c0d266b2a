//! QEMU's `isa-debug-exit`: a port a test guest writes to end the VM with a
//! chosen status.
//!
//! A write of value V requests [`VmAction::DebugExit`] with status
//! `(V << 1) | 1` (wrapping u32 arithmetic), exactly as QEMU computes it, so
//! test harnesses written for QEMU (`-device isa-debug-exit`) read the same
//! exit codes. The status is always odd, so it can never be mistaken for a
//! clean exit of the VMM.
//!
//! Choices:
//!
//! * The offset within the device's range is ignored (QEMU ignores it too);
//!   the machine decides where and how wide the range is (QEMU's default is
//!   port 0x501, 2 bytes).
//! * The value is the write's bytes in little-endian order. 1, 2 and 4 byte
//!   writes are the sizes port I/O produces; a wider write (MMIO) uses its
//!   low 4 bytes, a zero-length write does nothing.
//! * Reads return all ones and have no effect.
//! * The device posts the action and nothing else: the run loop stops the
//!   VM. A second write before that is ignored by [`VmControl`] (the first
//!   request wins).

use crate::bus::BusDevice;
use crate::vm_control::{VmAction, VmControl};

/// The isa-debug-exit device.
pub struct DebugExit {
    ctl: VmControl,
}

impl DebugExit {
    pub fn new(ctl: VmControl) -> Self {
        DebugExit { ctl }
    }

    /// The exit status QEMU derives from a written value.
    pub fn status_for(value: u32) -> u32 {
        value.wrapping_shl(1) | 1
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut le = [0u8; 4];
        let n = data.len().min(4);
        le[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(le);
        self.ctl
            .request(VmAction::DebugExit(Self::status_for(value)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dev() -> (DebugExit, VmControl) {
        let ctl = VmControl::new();
        (DebugExit::new(ctl.clone()), ctl)
    }

    #[test]
    fn status_is_value_shifted_left_plus_one() {
        let (mut d, ctl) = dev();
        d.write(0, &[0x31]);
        assert_eq!(ctl.take(), Some(VmAction::DebugExit(0x63)));
        d.write(0, &[0x00]);
        assert_eq!(ctl.take(), Some(VmAction::DebugExit(1)));
        d.write(0, &[0x01]);
        assert_eq!(ctl.take(), Some(VmAction::DebugExit(3)));
    }

    #[test]
    fn widths_are_little_endian() {
        let (mut d, ctl) = dev();
        d.write(0, &[0x34, 0x12]);
        assert_eq!(ctl.take(), Some(VmAction::DebugExit(0x2469)));
        d.write(1, &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(ctl.take(), Some(VmAction::DebugExit(0x2468_acf1)));
        // The top bit is shifted out (wrapping).
        d.write(0, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(ctl.take(), Some(VmAction::DebugExit(0xffff_ffff)));
        d.write(0, &[0x00, 0x00, 0x00, 0x80]);
        assert_eq!(ctl.take(), Some(VmAction::DebugExit(1)));
        // Three bytes, and eight (low four used).
        d.write(0, &[0x01, 0x02, 0x03]);
        assert_eq!(ctl.take(), Some(VmAction::DebugExit(0x0006_0403)));
        d.write(0, &[1, 0, 0, 0, 9, 9, 9, 9]);
        assert_eq!(ctl.take(), Some(VmAction::DebugExit(3)));
        // Nothing at all.
        d.write(0, &[]);
        assert_eq!(ctl.take(), None);
    }

    #[test]
    fn first_write_wins_until_taken() {
        let (mut d, ctl) = dev();
        d.write(0, &[2]);
        d.write(0, &[3]);
        assert_eq!(ctl.take(), Some(VmAction::DebugExit(5)));
        assert_eq!(ctl.take(), None);
    }

    #[test]
    fn reads_are_all_ones_and_post_nothing() {
        let (mut d, ctl) = dev();
        for n in 0..9 {
            let mut buf = vec![0u8; n];
            d.read(n as u64, &mut buf);
            assert!(buf.iter().all(|&b| b == 0xff));
        }
        assert!(!ctl.is_pending());
    }

    proptest! {
        #[test]
        fn arbitrary_accesses_never_panic(
            ops in proptest::collection::vec(
                (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..9), any::<bool>()),
                0..50,
            )
        ) {
            let (mut d, ctl) = dev();
            for (offset, mut data, is_write) in ops {
                if is_write {
                    d.write(offset, &data);
                    if !data.is_empty() {
                        let mut le = [0u8; 4];
                        let n = data.len().min(4);
                        le[..n].copy_from_slice(&data[..n]);
                        let v = u32::from_le_bytes(le);
                        let want = VmAction::DebugExit(v.wrapping_mul(2).wrapping_add(1));
                        prop_assert_eq!(ctl.take(), Some(want));
                    }
                } else {
                    d.read(offset, &mut data);
                    prop_assert!(data.iter().all(|&b| b == 0xff));
                }
                prop_assert!(!ctl.is_pending());
            }
        }
    }
}
