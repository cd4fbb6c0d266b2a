//! The code a CPU entered last, for crash reports: the start of each block
//! the run loop dispatches (and of each instruction it single-steps), in a
//! fixed ring of [`RECENT`] entries — a few stores per block, nothing per
//! instruction. On the translation tier a dispatch may run several chained
//! translations natively; only the first is recorded.

/// Entries kept.
pub const RECENT: usize = 16;

/// Where a block started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecentEntry {
    pub rip: u64,
    /// CS base (the linear address is `cs_base + rip` outside 64-bit code).
    pub cs_base: u64,
    /// Code size: 16, 32 or 64.
    pub bits: u32,
}

/// A ring of the last [`RECENT`] block starts.
#[derive(Clone, Debug, Default)]
pub struct RecentCode {
    ring: [RecentEntry; RECENT],
    /// Entries pushed so far (the next slot is `pushed % RECENT`).
    pushed: u64,
}

impl RecentCode {
    #[inline]
    pub fn push(&mut self, rip: u64, cs_base: u64, bits: u32) {
        self.ring[(self.pushed % RECENT as u64) as usize] = RecentEntry { rip, cs_base, bits };
        self.pushed += 1;
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> Vec<RecentEntry> {
        let n = self.pushed.min(RECENT as u64);
        (self.pushed - n..self.pushed)
            .map(|k| self.ring[(k % RECENT as u64) as usize])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_entries_oldest_first() {
        let mut r = RecentCode::default();
        assert!(r.entries().is_empty());
        for k in 0..3 {
            r.push(k, 0, 64);
        }
        assert_eq!(
            r.entries().iter().map(|e| e.rip).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        for k in 3..40 {
            r.push(k, 0, 64);
        }
        let rips: Vec<u64> = r.entries().iter().map(|e| e.rip).collect();
        assert_eq!(rips, (40 - RECENT as u64..40).collect::<Vec<_>>());
    }
}
