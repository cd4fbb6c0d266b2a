//! Decoded-block cache: code is decoded once per block, not per execution.
//!
//! A block is a run of instructions starting at one RIP, ending at the first
//! control transfer, at a page end, or at [`MAX_BLOCK`] instructions. Blocks
//! are keyed by (physical address, RIP, code size), so the same physical code
//! mapped at two linear addresses gets two blocks with correct RIP-relative
//! targets. A write to a page holding decoded code drops that page's blocks
//! (self-modifying code, Linux's boot-time text patching).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use iced_x86::Instruction;

use crate::dispatch::Handler;

pub const MAX_BLOCK: usize = 64;
const FAST_SIZE: usize = 4096;

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
        }
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
        if !self.code_pages.remove(&page) {
            return false;
        }
        if let Some(ids) = self.by_page.remove(&page) {
            for id in ids {
                let b = &self.arena[id as usize];
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
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
