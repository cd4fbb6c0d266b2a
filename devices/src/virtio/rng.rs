//! virtio-rng (virtio 1.2, 5.4): one queue; every writable buffer the
//! driver offers comes back full of random bytes, from the host's
//! `getrandom` or, for repeatable runs, from a seeded generator
//! (xoshiro256** seeded through SplitMix64).

use super::{device_type, feature, DeviceFault, GuestMemory, Signals, VirtioDevice, Virtqueue};

/// Largest request served at once (a driver asking for more gets this).
const MAX_REQUEST: usize = 64 * 1024;
pub const QUEUE_SIZE: u16 = 256;

/// Where the bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntropySource {
    /// The host kernel's `getrandom`.
    Host,
    /// A deterministic generator with this seed.
    Seeded(u64),
}

/// xoshiro256** (Blackman and Vigna), seeded with SplitMix64.
#[derive(Clone, Debug)]
pub struct SeededRng {
    s: [u64; 4],
}

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        SeededRng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Fill `buf` from the host kernel; false if it failed.
fn host_random(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

pub struct VirtioRng {
    source: EntropySource,
    seeded: Option<SeededRng>,
    queue: Option<Virtqueue>,
    mem: Option<GuestMemory>,
    /// Bytes handed out so far.
    served: u64,
}

impl VirtioRng {
    pub fn new(source: EntropySource) -> Self {
        VirtioRng {
            source,
            seeded: match source {
                EntropySource::Seeded(s) => Some(SeededRng::new(s)),
                EntropySource::Host => None,
            },
            queue: None,
            mem: None,
            served: 0,
        }
    }

    pub fn served(&self) -> u64 {
        self.served
    }

    fn fill(&mut self, buf: &mut [u8]) -> bool {
        match &mut self.seeded {
            Some(r) => {
                r.fill(buf);
                true
            }
            None => host_random(buf),
        }
    }

    fn process(&mut self) -> Result<Signals, DeviceFault> {
        let (Some(mut q), Some(mem)) = (self.queue.take(), self.mem.clone()) else {
            return Ok(Signals::default());
        };
        let mut buf = Vec::new();
        let r = q.serve_all(0, |chain| {
            let want = (chain.writable_len() as usize).min(MAX_REQUEST);
            buf.resize(want, 0);
            let n = if self.fill(&mut buf) {
                chain.write_bytes(&mem, 0, &buf)
            } else {
                0
            };
            self.served += n as u64;
            n as u32
        });
        self.queue = Some(q);
        r
    }
}

impl VirtioDevice for VirtioRng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        feature::COMMON
    }

    fn config_len(&self) -> usize {
        0
    }

    fn read_config(&self, _offset: usize, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        _features: u64,
        mut queues: Vec<Option<Virtqueue>>,
    ) -> Result<Signals, DeviceFault> {
        self.queue = queues.pop().flatten();
        self.mem = Some(mem);
        self.process()
    }

    fn reset(&mut self) {
        self.queue = None;
        self.mem = None;
        // A seeded generator starts over, so a reset guest sees the same bytes.
        if let EntropySource::Seeded(s) = self.source {
            self.seeded = Some(SeededRng::new(s));
        }
    }

    fn notify(&mut self, _queue: usize) -> Result<Signals, DeviceFault> {
        self.process()
    }

    fn describe(&self) -> String {
        format!("{} bytes served", self.served)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeded_generator_repeats_and_differs_by_seed() {
        let mut a = [0u8; 40];
        let mut b = [0u8; 40];
        SeededRng::new(5).fill(&mut a);
        SeededRng::new(5).fill(&mut b);
        assert_eq!(a, b);
        SeededRng::new(6).fill(&mut b);
        assert_ne!(a, b);
        assert_ne!(a, [0; 40]);
    }

    #[test]
    fn host_randomness_is_not_all_zero() {
        let mut a = [0u8; 64];
        assert!(host_random(&mut a));
        assert_ne!(a, [0; 64]);
    }
}
