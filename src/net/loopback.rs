//! `loopback`: a backend that hands every frame the guest sends straight
//! back to it, with no host side at all. Deterministic (nothing arrives
//! from outside), so the built-in NIC guests give the same serial output
//! and device trace on every backend, and the I/O benchmark measures the
//! device path alone.

use std::collections::VecDeque;

use devices::virtio::net::{NetBackend, NetHeader, RxFrame};

/// Frames waiting to come back; more are dropped, as a full wire would.
pub const QUEUE_FRAMES: usize = 256;

#[derive(Default)]
pub struct LoopbackBackend {
    queue: VecDeque<RxFrame>,
    looped: u64,
    dropped: u64,
}

impl LoopbackBackend {
    pub fn new() -> Self {
        Self::default()
    }
}

impl NetBackend for LoopbackBackend {
    fn send(&mut self, header: &NetHeader, frame: &[u8]) {
        if self.queue.len() >= QUEUE_FRAMES {
            self.dropped += 1;
            return;
        }
        self.looped += 1;
        self.queue.push_back(RxFrame {
            header: *header,
            data: frame.to_vec(),
        });
    }

    fn recv(&mut self) -> Option<RxFrame> {
        self.queue.pop_front()
    }

    fn unrecv(&mut self, frame: RxFrame) {
        self.queue.push_front(frame);
    }

    fn describe(&self) -> String {
        format!(
            "loopback ({} looped, {} dropped)",
            self.looped, self.dropped
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_back_in_order_and_a_full_queue_drops() {
        let mut b = LoopbackBackend::new();
        let h = [0u8; devices::virtio::net::HDR_LEN];
        for i in 0..QUEUE_FRAMES + 3 {
            b.send(&h, &[i as u8; 3]);
        }
        assert_eq!(b.recv().unwrap().data, vec![0u8; 3]);
        let f = b.recv().unwrap();
        assert_eq!(f.data, vec![1u8; 3]);
        b.unrecv(f);
        assert_eq!(b.recv().unwrap().data, vec![1u8; 3]);
        assert!(b.describe().contains("3 dropped"), "{}", b.describe());
    }
}
