//! The POST code port (0x80): firmware and kernels write progress codes
//! there, and Linux also uses it as an I/O delay (`outb_p`), so it is written
//! often and must be cheap and quiet.
//!
//! Choices:
//!
//! * A write records its byte as [`PostCode::last`]; nothing is logged (the
//!   port is far too busy for that, and a guest controls the rate).
//! * A read returns the last byte written, as the POST card latch on many
//!   boards does, or 0xff (a floating bus) before the first write.
//! * The device is one byte wide. As for the UART, an N-byte access at
//!   offset O is N byte accesses at O, O+1, ...; only offset 0 is the latch,
//!   other bytes read 0xff and are dropped on write (on a PC 0x81.. are DMA
//!   page registers, which belong to someone else).

use crate::bus::BusDevice;

/// The register state, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PostCodeState {
    /// The last code written, if any.
    pub last: Option<u8>,
    /// How many codes were written.
    pub writes: u64,
}

/// The POST code latch.
#[derive(Debug, Default)]
pub struct PostCode {
    s: PostCodeState,
}

impl PostCode {
    pub fn new() -> Self {
        Self::default()
    }

    /// The last POST code written, `None` before the first write.
    pub fn last(&self) -> Option<u8> {
        self.s.last
    }

    /// How many codes were written so far.
    pub fn writes(&self) -> u64 {
        self.s.writes
    }

    pub fn state(&self) -> PostCodeState {
        self.s.clone()
    }

    pub fn restore(&mut self, s: &PostCodeState) {
        self.s = s.clone();
    }
}

impl BusDevice for PostCode {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match offset.checked_add(i as u64) {
                Some(0) => self.s.last.unwrap_or(0xff),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if offset.checked_add(i as u64) == Some(0) {
                self.s.last = Some(b);
                self.s.writes = self.s.writes.wrapping_add(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn records_last_code_and_reads_it_back() {
        let mut p = PostCode::new();
        let mut b = [0u8];
        p.read(0, &mut b);
        assert_eq!(b, [0xff]);
        assert_eq!(p.last(), None);
        for code in [0x00u8, 0x55, 0xaa] {
            p.write(0, &[code]);
            assert_eq!(p.last(), Some(code));
            p.read(0, &mut b);
            assert_eq!(b, [code]);
        }
        assert_eq!(p.writes(), 3);
    }

    #[test]
    fn wide_and_offset_accesses() {
        let mut p = PostCode::new();
        // A 16-bit write: the low byte is the code, the high byte is not ours.
        p.write(0, &[0x12, 0x34]);
        assert_eq!(p.last(), Some(0x12));
        let mut buf = [0u8; 4];
        p.read(0, &mut buf);
        assert_eq!(buf, [0x12, 0xff, 0xff, 0xff]);
        p.write(1, &[0x99]);
        p.write(u64::MAX, &[0x98, 0x97]);
        assert_eq!(p.last(), Some(0x12));
        p.read(u64::MAX, &mut buf);
        assert_eq!(buf, [0xff; 4]);
        assert_eq!(p.writes(), 1);
    }

    #[test]
    fn state_round_trip() {
        let mut p = PostCode::new();
        p.write(0, &[0x42]);
        let mut q = PostCode::new();
        q.restore(&p.state());
        assert_eq!(q.state(), p.state());
        assert_eq!(q.last(), Some(0x42));
    }

    proptest! {
        #[test]
        fn arbitrary_accesses_never_panic(
            ops in proptest::collection::vec(
                (prop_oneof![0u64..4, any::<u64>()],
                 proptest::collection::vec(any::<u8>(), 0..9),
                 any::<bool>()),
                0..100,
            )
        ) {
            let mut p = PostCode::new();
            let mut last = None;
            for (offset, mut data, is_write) in ops {
                if is_write {
                    p.write(offset, &data);
                    if offset == 0 && !data.is_empty() {
                        last = Some(data[0]);
                    }
                } else {
                    p.read(offset, &mut data);
                }
                prop_assert_eq!(p.last(), last);
            }
        }
    }
}
