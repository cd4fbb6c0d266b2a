//! Decoded-block cache: code is decoded once per block, not per execution.
//!
//! A block is a run of instructions starting at one RIP, ending at the first
//! control transfer, at a page end, or at [`MAX_BLOCK`] instructions. Blocks
//! are keyed by (physical address, RIP, code size), so the same physical code
//! mapped at two linear addresses gets two blocks with correct RIP-relative
//! targets. A write to a page holding decoded code drops that page's blocks
//! (self-modifying code, Linux's boot-time text patching).
//!
//! The cache is bounded: every block's host memory is accounted
//! ([`CacheStats::bytes`]) and when the total reaches the limit
//! ([`DEFAULT_CACHE_LIMIT`], [`BlockCache::set_limit`]) the run loop drops
//! every block at the next block boundary and decodes afresh, so a guest
//! that keeps generating new code cannot grow duet's memory without bound.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use iced_x86::Instruction;

use crate::dispatch::Handler;

pub const MAX_BLOCK: usize = 64;
const FAST_SIZE: usize = 4096;

/// Default bound on the host memory the decoded-block cache accounts for
/// (see [`BlockCache::set_limit`]). A Linux boot decodes a few tens of
/// MiB's worth; code that keeps generating fresh code flushes the cache
/// when it reaches this.
pub const DEFAULT_CACHE_LIMIT: usize = 64 << 20;

/// Bytes a block costs beyond its instructions: the box, the key in the
/// map and the fast table's share, its page-list entries.
const BLOCK_OVERHEAD: usize = std::mem::size_of::<Block>() + 64;

/// Counters of a code cache, for `--stats` and the memory-bound tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Blocks that can be looked up now.
    pub live_blocks: u64,
    /// Host bytes held (live blocks and unlinked ones not yet reclaimed).
    pub bytes: u64,
    /// The most the cache held at once.
    pub peak_bytes: u64,
    /// The bound: reaching it flushes the cache.
    pub limit: u64,
    /// Flushes because the bound was reached.
    pub flushes: u64,
    /// Pages whose blocks were dropped because their bytes changed.
    pub invalidated_pages: u64,
    /// Blocks decoded since the start.
    pub decoded_blocks: u64,
}

/// One decoded instruction with what its handler needs precomputed.
#[derive(Clone)]
pub struct Insn {
    pub i: Instruction,
    pub h: Handler,
    /// RIP of the following instruction, already wrapped to the code size.
    pub next: u64,
    /// Address-size mask for the memory operand and string registers.
    pub amask: u64,
    /// Size in bytes of operand 0 (register or memory), or 0.
    pub size: u8,
    /// Segment register index of the memory operand.
    pub seg: u8,
    /// GPR index of operand 0 / operand 1 when they are full-width-indexable
    /// registers (AL..R15 except AH/CH/DH/BH), else 0xff. For fast handlers.
    pub r0: u8,
    pub r1: u8,
    /// The immediate operand (op 1 or op 2), sign-extended as the
    /// instruction defines and masked to the operand size.
    pub imm: u64,
}

pub struct Block {
    pub insns: Box<[Insn]>,
    /// Physical address of the first byte (the lookup key).
    pub key_paddr: u64,
    pub rip: u64,
    pub bits: u32,
    /// Physical pages the block's bytes come from.
    pub pages: [u64; 2],
    /// Executions so far (translated when hot).
    pub heat: std::cell::Cell<u32>,
    /// Translation id + 1 per privilege (supervisor, user); 0: none.
    pub jit: [std::cell::Cell<u32>; 2],
    /// Interpreted executions (counted only while profiling).
    pub execs: std::cell::Cell<u64>,
}

/// FxHash: fast hashing of integer keys.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl Hasher for FxHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
}

type Fx = BuildHasherDefault<FxHasher>;
type Key = (u64, u64, u32);

/// Index of a block in the arena.
pub type BlockId = u32;

#[derive(Clone, Copy)]
struct FastEntry {
    key: Key,
    id: BlockId,
}

const NO_KEY: Key = (u64::MAX, 0, 0);

/// Blocks live in an arena of boxes that is only emptied by [`clear`]
/// (never while a block executes): invalidation unlinks a block from the
/// lookup structures but keeps its memory, so a block that rewrote itself
/// can finish safely. [`clear`] runs when dead blocks pile up, at a point
/// where nothing is executing.
///
/// [`clear`]: BlockCache::clear
pub struct BlockCache {
    // Boxed on purpose: a block's address must survive the arena growing.
    #[allow(clippy::vec_box)]
    arena: Vec<Box<Block>>,
    map: HashMap<Key, BlockId, Fx>,
    by_page: HashMap<u64, Vec<BlockId>, Fx>,
    code_pages: HashSet<u64, Fx>,
    fast: Vec<FastEntry>,
    dead: usize,
    /// Accounted host bytes of everything in the arena.
    bytes: usize,
    limit: usize,
    stats: CacheStats,
}

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockCache {
    pub fn new() -> Self {
        BlockCache {
            arena: Vec::new(),
            map: HashMap::default(),
            by_page: HashMap::default(),
            code_pages: HashSet::default(),
            fast: vec![FastEntry { key: NO_KEY, id: 0 }; FAST_SIZE],
            dead: 0,
            bytes: 0,
            limit: DEFAULT_CACHE_LIMIT,
            stats: CacheStats::default(),
        }
    }

    /// Bound the host memory the cache holds: when the accounted bytes
    /// reach `bytes`, the run loop flushes every block at the next block
    /// boundary (as QEMU flushes its translation buffer when full).
    pub fn set_limit(&mut self, bytes: usize) {
        self.limit = bytes.max(64 << 10);
    }

    /// Has the cache reached its bound? (Checked before decoding a block.)
    #[inline]
    pub fn over_limit(&self) -> bool {
        self.bytes >= self.limit
    }

    /// The accounted host bytes of a block.
    fn footprint(block: &Block) -> usize {
        BLOCK_OVERHEAD + block.insns.len() * std::mem::size_of::<Insn>()
    }

    /// The cache's counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            live_blocks: self.map.len() as u64,
            bytes: self.bytes as u64,
            limit: self.limit as u64,
            ..self.stats
        }
    }

    /// Drop every block because the bound was reached.
    pub fn flush_for_space(&mut self) {
        self.stats.flushes += 1;
        self.clear();
    }

    #[inline(always)]
    fn fast_index(paddr: u64, rip: u64) -> usize {
        ((paddr ^ (paddr >> 12) ^ (rip << 3)) as usize) & (FAST_SIZE - 1)
    }

    /// The block for this key, if decoded.
    #[inline]
    pub fn get(&mut self, paddr: u64, rip: u64, bits: u32) -> Option<BlockId> {
        let key = (paddr, rip, bits);
        let fi = Self::fast_index(paddr, rip);
        let f = self.fast[fi];
        if f.key == key {
            return Some(f.id);
        }
        let id = *self.map.get(&key)?;
        self.fast[fi] = FastEntry { key, id };
        Some(id)
    }

    /// The block with this id. Ids stay valid until [`BlockCache::clear`].
    #[inline(always)]
    pub fn block(&self, id: BlockId) -> &Block {
        &self.arena[id as usize]
    }

    /// A pointer to the block, stable until [`BlockCache::clear`] (the
    /// block is boxed; the arena only grows in between).
    #[inline(always)]
    pub fn block_ptr(&self, id: BlockId) -> *const Block {
        &*self.arena[id as usize] as *const Block
    }

    pub fn insert(&mut self, paddr: u64, block: Block) -> BlockId {
        let key = (paddr, block.rip, block.bits);
        let pages = block.pages;
        let id = self.arena.len() as BlockId;
        self.bytes += Self::footprint(&block);
        self.stats.peak_bytes = self.stats.peak_bytes.max(self.bytes as u64);
        self.stats.decoded_blocks += 1;
        self.arena.push(Box::new(block));
        if let Some(old) = self.map.insert(key, id) {
            let _ = old;
            self.dead += 1;
        }
        for (k, pg) in pages.iter().enumerate() {
            if k == 1 && *pg == pages[0] {
                continue;
            }
            self.by_page.entry(*pg).or_default().push(id);
            self.code_pages.insert(*pg);
        }
        self.fast[Self::fast_index(paddr, key.1)] = FastEntry { key, id };
        id
    }

    #[inline]
    pub fn is_code_page(&self, paddr_page: u64) -> bool {
        !self.code_pages.is_empty() && self.code_pages.contains(&paddr_page)
    }

    /// Unlink every block with bytes on this physical page. True if any was.
    pub fn invalidate_page(&mut self, page: u64) -> bool {
        self.invalidate_page_with(page, |_| {})
    }

    /// [`BlockCache::invalidate_page`], calling `dropped` for each block
    /// unlinked (so translations of it can be dropped too).
    pub fn invalidate_page_with(&mut self, page: u64, mut dropped: impl FnMut(&Block)) -> bool {
        if !self.code_pages.remove(&page) {
            return false;
        }
        self.stats.invalidated_pages += 1;
        if let Some(ids) = self.by_page.remove(&page) {
            for id in ids {
                let b = &self.arena[id as usize];
                dropped(b);
                let key = (b.key_paddr, b.rip, b.bits);
                if self.map.get(&key) == Some(&id) {
                    self.map.remove(&key);
                    self.dead += 1;
                }
                for pg in b.pages {
                    if pg != page {
                        if let Some(v) = self.by_page.get_mut(&pg) {
                            v.retain(|x| *x != id);
                        }
                    }
                }
            }
        }
        for f in self.fast.iter_mut() {
            if f.key != NO_KEY {
                let b = &self.arena[f.id as usize];
                if b.pages[0] == page || b.pages[1] == page {
                    f.key = NO_KEY;
                }
            }
        }
        true
    }

    /// Live blocks (for profiles).
    pub fn live(&self) -> impl Iterator<Item = &Block> {
        self.map.values().map(|&id| &*self.arena[id as usize])
    }

    /// Blocks unlinked but still in memory.
    pub fn dead(&self) -> usize {
        self.dead
    }

    /// Drop every block. Must not be called while a block executes.
    pub fn clear(&mut self) {
        self.arena.clear();
        self.map.clear();
        self.by_page.clear();
        self.code_pages.clear();
        self.fast.fill(FastEntry { key: NO_KEY, id: 0 });
        self.dead = 0;
        self.bytes = 0;
        // Give the memory back: a guest that filled the cache once must
        // not keep its peak allocated.
        self.arena.shrink_to(1024);
        self.map.shrink_to(1024);
        self.by_page.shrink_to(256);
        self.code_pages.shrink_to(256);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use crate::insn::testutil::*;
    use crate::CpuExit;

    const AREA: u64 = 0x20_0000;
    const AREA_END: u64 = 0x30_0000;
    const STUBS_PER_PAGE: u64 = 512;

    /// A guest that keeps generating fresh code: it fills a page with 512
    /// stubs `mov eax, n; ret`, calls each, moves to the next page of a
    /// 1 MiB area, and starts over `passes` times (rewriting code pages).
    /// R14 sums what the stubs return.
    fn code_generator(passes: u32) -> Vec<u8> {
        use iced_x86::code_asm::*;
        let mut a = CodeAssembler::new(64).unwrap();
        let (mut pass, mut page, mut fill, mut call) = (
            a.create_label(),
            a.create_label(),
            a.create_label(),
            a.create_label(),
        );
        a.mov(r15d, passes).unwrap();
        a.xor(r14d, r14d).unwrap();
        a.set_label(&mut pass).unwrap();
        a.mov(rbx, AREA).unwrap();
        a.set_label(&mut page).unwrap();
        a.mov(rdi, rbx).unwrap();
        a.mov(ecx, STUBS_PER_PAGE as u32).unwrap();
        a.set_label(&mut fill).unwrap();
        a.mov(byte_ptr(rdi), 0xb8u32).unwrap();
        a.mov(dword_ptr(rdi + 1), ecx).unwrap();
        a.mov(byte_ptr(rdi + 5), 0xc3u32).unwrap();
        a.add(rdi, 8).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(fill).unwrap();
        a.mov(rdi, rbx).unwrap();
        a.mov(ecx, STUBS_PER_PAGE as u32).unwrap();
        a.set_label(&mut call).unwrap();
        a.call(rdi).unwrap();
        a.add(r14, rax).unwrap();
        a.add(rdi, 8).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(call).unwrap();
        a.add(rbx, 0x1000).unwrap();
        a.mov(rax, AREA_END).unwrap();
        a.cmp(rbx, rax).unwrap();
        a.jb(page).unwrap();
        a.dec(r15d).unwrap();
        a.jnz(pass).unwrap();
        a.hlt().unwrap();
        a.assemble(CODE).unwrap()
    }

    /// Resident set size of this process in bytes (Linux), if known and
    /// this test's own: with more threads than the harness's and the
    /// test's (threaded `cargo test` runs other tests beside it; nextest
    /// gives each its own process) the process's RSS says nothing of it.
    fn rss() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let threads: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))?
            .trim()
            .parse()
            .ok()?;
        if threads > 2 {
            return None;
        }
        let s = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * 4096)
    }

    /// Run the generator with a cache limit, sampling the accounted bytes
    /// (and the RSS) every 50,000 instructions. Returns (cpu, peak
    /// accounted bytes seen, peak RSS growth).
    fn run_generator(
        limit: usize,
        passes: u32,
        interp_only: bool,
    ) -> (crate::Cpu, u64, Option<u64>) {
        let mut c = if interp_only {
            new_cpu_interp()
        } else {
            new_cpu()
        };
        setup(&mut c, Mode::Long64);
        c.set_cache_limit(limit);
        write_phys(&c, CODE, &code_generator(passes));
        let mut rss0 = rss();
        let mut peak = 0u64;
        let mut peak_rss = 0u64;
        loop {
            let target = c.retired() + 50_000;
            let exit = c.run_until(&mut crate::NullPlatform, target);
            peak = peak.max(c.cache_stats().bytes);
            match rss() {
                Some(r) => peak_rss = peak_rss.max(r),
                // Another test ran beside this one: no RSS verdict.
                None => rss0 = None,
            }
            match exit {
                CpuExit::BudgetExhausted => {}
                CpuExit::Halted => break,
                e => panic!("unexpected exit {e:?} at {:#x}", c.rip()),
            }
        }
        let growth = rss0.map(|r0| peak_rss.saturating_sub(r0));
        (c, peak, growth)
    }

    fn expected_sum(passes: u64) -> u64 {
        let pages = (AREA_END - AREA) / 0x1000;
        passes * pages * (STUBS_PER_PAGE * (STUBS_PER_PAGE + 1) / 2)
    }

    #[test]
    fn fresh_code_in_a_loop_stays_under_the_cache_bound() {
        const LIMIT: usize = 8 << 20;
        let passes = 3;
        let (c, peak, rss_growth) = run_generator(LIMIT, passes, false);
        assert_eq!(
            c.gpr(crate::state::gpr::R14),
            expected_sum(u64::from(passes)),
            "the generated code ran correctly"
        );
        let st = c.cache_stats();
        // At most one block beyond the bound (the flush comes before the
        // next decode).
        let slack = 64 * 1024;
        assert!(peak <= LIMIT as u64 + slack, "peak {peak} over {LIMIT}");
        assert!(st.peak_bytes <= LIMIT as u64 + slack, "{st:?}");
        assert!(st.flushes >= 3, "the bound was reached and flushed: {st:?}");
        assert!(
            st.decoded_blocks > u64::from(passes) * 256 * STUBS_PER_PAGE,
            "{st:?}"
        );
        // Host memory: the 1 MiB of guest code touched, the cache bound,
        // and allocator slack — far below what the cache would hold
        // unbounded (checked below).
        if let Some(g) = rss_growth {
            eprintln!(
                "RSS growth {} KiB (cache limit {} KiB)",
                g >> 10,
                LIMIT >> 10
            );
            // On the translation tier its code and metadata have the same
            // bound.
            let bounds: u64 = if c.tier() == crate::Tier::Jit { 2 } else { 1 };
            assert!(
                g < bounds * (LIMIT as u64) + (24 << 20),
                "RSS grew by {} MiB",
                g >> 20
            );
        } else {
            eprintln!("RSS bound not checked: other tests shared this process");
        }
    }

    #[test]
    fn without_the_bound_the_same_guest_would_hold_much_more() {
        // The control for the test above: with no effective bound the
        // cache holds every block it decoded.
        let (c, peak, _) = run_generator(usize::MAX, 3, true);
        assert_eq!(c.gpr(crate::state::gpr::R14), expected_sum(3));
        assert_eq!(c.cache_stats().flushes, 0);
        // Each pass after the first rewrites code pages: invalidations.
        assert!(c.cache_stats().invalidated_pages > 0);
        assert!(peak > 32 << 20, "unbounded peak only {} KiB", peak >> 10);
    }

    #[test]
    fn invalidation_keeps_working_after_a_flush() {
        // Tiny bound: flushes all the time; code rewritten in place must
        // still be seen (the SMC path after flushes).
        let (c, _, _) = run_generator(64 << 10, 2, false);
        assert_eq!(c.gpr(crate::state::gpr::R14), expected_sum(2));
        assert!(c.cache_stats().flushes > 100);
    }
}
