//! Where things go in guest memory: the RAM a loader may use and the
//! ranges already claimed, with every claim checked for overlap before
//! anything is written.

use crate::layout::{self, boot};

/// A claimed range of guest-physical memory, `[start, end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    pub what: String,
}

/// The RAM a loader may place things in and what is already there.
#[derive(Clone, Debug)]
pub struct MemoryPlan {
    /// Usable RAM ranges `[start, end)`, ascending.
    ram: Vec<(u64, u64)>,
    used: Vec<Region>,
}

impl MemoryPlan {
    /// The plan for a guest with `ram_below_gap` bytes of RAM below the
    /// 32-bit MMIO gap: low RAM up to the EBDA (the MP and ACPI tables live
    /// above it) and RAM from 1 MiB; the boot GDT is already claimed.
    pub fn new(ram_below_gap: u64) -> Self {
        let mut ram = vec![(0, boot::EBDA_START.min(ram_below_gap))];
        if ram_below_gap > layout::HIGH_RAM_START {
            ram.push((layout::HIGH_RAM_START, ram_below_gap));
        }
        let mut p = MemoryPlan {
            ram,
            used: Vec::new(),
        };
        p.used.push(Region {
            start: boot::GDT,
            end: boot::GDT + BOOT_GDT_LEN,
            what: "the boot GDT".into(),
        });
        p
    }

    /// The RAM ranges, for messages.
    pub fn describe_ram(&self) -> String {
        let v: Vec<String> = self
            .ram
            .iter()
            .map(|(s, e)| format!("{s:#x}..{e:#x}"))
            .collect();
        v.join(" and ")
    }

    /// Claimed regions, in claim order.
    pub fn regions(&self) -> &[Region] {
        &self.used
    }

    /// Claim `[start, start + len)` for `what`: it must lie in RAM and
    /// overlap nothing claimed before. An empty range claims nothing.
    pub fn claim(&mut self, start: u64, len: u64, what: impl Into<String>) -> Result<(), String> {
        let what = what.into();
        let Some(end) = start.checked_add(len) else {
            return Err(format!(
                "{what} at {start:#x} (+{len:#x} bytes) runs past the end of the address space"
            ));
        };
        if len == 0 {
            return Ok(());
        }
        if !self.ram.iter().any(|&(s, e)| start >= s && end <= e) {
            return Err(format!(
                "{what} at {start:#x}..{end:#x} is not in guest RAM (usable RAM: {}; a larger \
                 --memory may help if it lies above)",
                self.describe_ram()
            ));
        }
        if let Some(r) = self.used.iter().find(|r| start < r.end && r.start < end) {
            return Err(format!(
                "{what} at {start:#x}..{end:#x} overlaps {} at {:#x}..{:#x}",
                r.what, r.start, r.end
            ));
        }
        self.used.push(Region { start, end, what });
        Ok(())
    }

    fn is_free(&self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        self.ram.iter().any(|&(s, e)| start >= s && end <= e)
            && !self.used.iter().any(|r| start < r.end && r.start < end)
    }

    /// The lowest `align`-aligned address in `[lo, hi)` where `len` bytes
    /// (at least one) are free.
    pub fn find_low(&self, len: u64, align: u64, lo: u64, hi: u64) -> Option<u64> {
        let len = len.max(1);
        let candidates = self
            .ram
            .iter()
            .map(|r| r.0)
            .chain(self.used.iter().map(|r| r.end))
            .chain(std::iter::once(lo));
        let mut best: Option<u64> = None;
        for c in candidates {
            let Some(a) = align_up(c.max(lo), align) else {
                continue;
            };
            let fits = a.checked_add(len).is_some_and(|e| e <= hi);
            if fits && self.is_free(a, len) && best.is_none_or(|b| a < b) {
                best = Some(a);
            }
        }
        best
    }

    /// The highest `align`-aligned address at or above `lo` where `len`
    /// bytes (at least one) are free and end at or below `hi`.
    pub fn find_high(&self, len: u64, align: u64, lo: u64, hi: u64) -> Option<u64> {
        let len = len.max(1);
        let candidates = self
            .ram
            .iter()
            .map(|r| r.1)
            .chain(self.used.iter().map(|r| r.start))
            .chain(std::iter::once(hi));
        let mut best: Option<u64> = None;
        for c in candidates {
            let Some(a) = c.min(hi).checked_sub(len).map(|a| a & !(align - 1)) else {
                continue;
            };
            if a >= lo && self.is_free(a, len) && best.is_none_or(|b| a > b) {
                best = Some(a);
            }
        }
        best
    }

    /// The end of the highest claimed region (0 when nothing is claimed).
    pub fn highest_end(&self) -> u64 {
        self.used.iter().map(|r| r.end).max().unwrap_or(0)
    }
}

/// The boot GDT's size (4 descriptors).
pub const BOOT_GDT_LEN: u64 = 4 * 8;

/// `v` rounded up to a multiple of `align` (a power of two), or None on
/// overflow.
pub fn align_up(v: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    v.checked_add(align - 1).map(|x| x & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn claims_must_be_in_ram_and_disjoint() {
        let mut p = MemoryPlan::new(64 * MIB);
        p.claim(MIB, MIB, "kernel").unwrap();
        let e = p.claim(MIB + 4096, 10, "initrd").unwrap_err();
        assert_eq!(
            e,
            "initrd at 0x101000..0x10100a overlaps kernel at 0x100000..0x200000"
        );
        let e = p.claim(0xa0000, 16, "thing").unwrap_err();
        assert!(e.contains("is not in guest RAM"), "{e}");
        let e = p.claim(64 * MIB - 4, 8, "thing").unwrap_err();
        assert!(e.contains("is not in guest RAM"), "{e}");
        let e = p.claim(u64::MAX - 4, 8, "thing").unwrap_err();
        assert!(e.contains("past the end of the address space"), "{e}");
        let e = p.claim(0x500, 8, "kernel").unwrap_err();
        assert!(e.contains("the boot GDT"), "{e}");
        p.claim(2 * MIB, 0, "empty").unwrap();
        p.claim(2 * MIB, 1, "byte").unwrap();
    }

    #[test]
    fn finds_free_space_both_ways() {
        let mut p = MemoryPlan::new(8 * MIB);
        p.claim(MIB, 3 * MIB + 5, "kernel").unwrap();
        assert_eq!(p.find_low(4096, 4096, MIB, u64::MAX), Some(4 * MIB + 4096));
        assert_eq!(p.find_high(4096, 4096, 0, u64::MAX), Some(8 * MIB - 4096));
        assert_eq!(
            p.find_high(4096, 4096, 0, 6 * MIB + 7),
            Some(6 * MIB - 4096)
        );
        // Above the kernel nothing of 4 MiB + 1 fits; below 2 MiB only under
        // the kernel, not above `lo`.
        assert_eq!(p.find_high(4 * MIB + 1, 4096, MIB, u64::MAX), None);
        let low = p
            .find_high(0x4_0000, 4096, 0, 2 * MIB)
            .expect("room below the kernel");
        assert!(low + 0x4_0000 <= MIB, "{low:#x}");
        assert_eq!(p.find_high(0x4_0000, 4096, MIB, 2 * MIB), None);
        // Low memory when nothing above fits.
        assert_eq!(p.find_low(8 * MIB, 4096, 0, u64::MAX), None);
        assert_eq!(p.find_low(0x1000, 0x1000, 0, u64::MAX), Some(0x1000));
    }

    proptest! {
        /// Whatever is claimed, found space is free, aligned, in bounds,
        /// and a claim there succeeds.
        #[test]
        fn found_space_can_be_claimed(
            claims in proptest::collection::vec((0u64..(16 * MIB), 1u64..(4 * MIB)), 0..8),
            len in 1u64..(8 * MIB),
            lo in 0u64..(16 * MIB),
        ) {
            let mut p = MemoryPlan::new(16 * MIB);
            for (s, l) in claims {
                let _ = p.claim(s, l, "x");
            }
            if let Some(a) = p.find_low(len, 4096, lo, 16 * MIB) {
                prop_assert_eq!(a % 4096, 0);
                prop_assert!(a >= lo);
                prop_assert!(p.clone().claim(a, len, "y").is_ok());
            }
            if let Some(a) = p.find_high(len, 4096, 0, 12 * MIB) {
                prop_assert_eq!(a % 4096, 0);
                prop_assert!(a + len <= 12 * MIB);
                prop_assert!(p.clone().claim(a, len, "y").is_ok());
            }
        }
    }
}
