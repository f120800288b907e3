//! Physical KV blocks: reference counts, the prefix-cache hash map and the free queue.
//!
//! Freed blocks keep their hash (so a later request can reuse them) and sit in an LRU free queue;
//! allocation takes the least recently freed block and only then drops its hash. The free queue is
//! an intrusive doubly linked list over block ids, so removing a block that a prefix hit revives is
//! O(1) (vLLM `vllm/v1/core/block_pool.py`, `FreeKVCacheBlockQueue`).
//!
//! Every change to the set of cached hashes is recorded as a [`PoolEvent`] for the KV-event stream.

use std::collections::HashMap;

const NIL: u32 = u32::MAX;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("block {block} freed while its reference count is already 0")]
    DoubleFree { block: u32 },
    #[error("block {block} out of range (pool has {total} blocks)")]
    OutOfRange { block: u32, total: usize },
}

/// A change to the set of hashes the pool can serve as prefix hits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolEvent {
    /// Consecutive full blocks of one sequence became cacheable. `block_hashes[0]`'s parent is
    /// `parent_hash`; each later hash's parent is the hash before it.
    Stored {
        block_hashes: Vec<u64>,
        parent_hash: u64,
        token_ids: Vec<u32>,
    },
    /// These hashes are no longer held (their blocks were reused).
    Removed { block_hashes: Vec<u64> },
    /// Every cached hash was dropped.
    AllCleared,
}

#[derive(Debug, Clone, Copy)]
struct BlockMeta {
    ref_cnt: u32,
    /// Hash of the full block this block holds, if registered in the prefix cache.
    hash: Option<u64>,
    prev: u32,
    next: u32,
    in_free_queue: bool,
}

/// The pool of `num_blocks` KV blocks.
#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<BlockMeta>,
    head: u32,
    tail: u32,
    num_free: usize,
    cached: HashMap<u64, u32>,
    caching: bool,
    record_events: bool,
    events: Vec<PoolEvent>,
}

impl BlockPool {
    /// A pool whose blocks are all free. `caching` enables prefix caching; `record_events` keeps
    /// [`PoolEvent`]s for [`BlockPool::drain_events`].
    pub fn new(num_blocks: usize, caching: bool, record_events: bool) -> Self {
        let n = num_blocks.min(NIL as usize - 1);
        let blocks = (0..n)
            .map(|i| BlockMeta {
                ref_cnt: 0,
                hash: None,
                prev: if i == 0 { NIL } else { i as u32 - 1 },
                next: if i + 1 == n { NIL } else { i as u32 + 1 },
                in_free_queue: true,
            })
            .collect();
        Self {
            blocks,
            head: if n == 0 { NIL } else { 0 },
            tail: if n == 0 { NIL } else { n as u32 - 1 },
            num_free: n,
            cached: HashMap::with_capacity(n),
            caching,
            record_events,
            events: Vec::new(),
        }
    }

    pub fn num_total(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks with no reference (cached-but-free blocks count as free).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Blocks whose hash is registered in the prefix cache (in use or free).
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    pub fn caching_enabled(&self) -> bool {
        self.caching
    }

    /// `1 − free/total`, as `vllm:kv_cache_usage_perc` reports it.
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.num_free as f64 / self.blocks.len() as f64
    }

    pub fn ref_count(&self, block: u32) -> Option<u32> {
        self.blocks.get(block as usize).map(|b| b.ref_cnt)
    }

    /// The block holding `hash`, if cached.
    pub fn lookup(&self, hash: u64) -> Option<u32> {
        if !self.caching {
            return None;
        }
        self.cached.get(&hash).copied()
    }

    /// Takes one free block (least recently freed first), dropping any hash it held.
    /// `None` when the pool is exhausted: the caller decides whether to preempt.
    pub fn allocate(&mut self) -> Option<u32> {
        let id = self.head;
        if id == NIL {
            return None;
        }
        self.unlink(id);
        let meta = &mut self.blocks[id as usize];
        meta.ref_cnt = 1;
        if let Some(hash) = meta.hash.take() {
            // Only remove the map entry if it points at this block (a duplicate full block of the
            // same content may exist unregistered).
            if self.cached.get(&hash) == Some(&id) {
                self.cached.remove(&hash);
                if self.record_events {
                    match self.events.last_mut() {
                        Some(PoolEvent::Removed { block_hashes }) => block_hashes.push(hash),
                        _ => self.events.push(PoolEvent::Removed {
                            block_hashes: vec![hash],
                        }),
                    }
                }
            }
        }
        Some(id)
    }

    /// Adds a reference to a cached block (a prefix hit), reviving it from the free queue.
    pub fn touch(&mut self, block: u32) -> Result<(), PoolError> {
        let total = self.blocks.len();
        let meta = self
            .blocks
            .get(block as usize)
            .ok_or(PoolError::OutOfRange { block, total })?;
        if meta.in_free_queue {
            self.unlink(block);
        }
        self.blocks[block as usize].ref_cnt += 1;
        Ok(())
    }

    /// Drops one reference; at zero the block joins the tail of the free queue (keeping its hash).
    pub fn free(&mut self, block: u32) -> Result<(), PoolError> {
        let total = self.blocks.len();
        let meta = self
            .blocks
            .get_mut(block as usize)
            .ok_or(PoolError::OutOfRange { block, total })?;
        if meta.ref_cnt == 0 {
            return Err(PoolError::DoubleFree { block });
        }
        meta.ref_cnt -= 1;
        if meta.ref_cnt == 0 {
            if !self.caching {
                meta.hash = None;
            }
            self.push_tail(block);
        }
        Ok(())
    }

    /// Registers `block` as holding the full block `hash`. Returns false when another block
    /// already holds that hash (two sequences computed the same content concurrently); the block
    /// then stays unregistered and is reused like any uncached block.
    pub fn register(&mut self, block: u32, hash: u64) -> bool {
        if !self.caching {
            return false;
        }
        let Some(meta) = self.blocks.get_mut(block as usize) else {
            return false;
        };
        if self.cached.contains_key(&hash) {
            return false;
        }
        meta.hash = Some(hash);
        self.cached.insert(hash, block);
        true
    }

    /// Records that one sequence's consecutive blocks `hashes` (parent `parent_hash`, covering
    /// `token_ids`) became cached.
    pub fn record_stored(&mut self, hashes: Vec<u64>, parent_hash: u64, token_ids: Vec<u32>) {
        if self.record_events && !hashes.is_empty() {
            self.events.push(PoolEvent::Stored {
                block_hashes: hashes,
                parent_hash,
                token_ids,
            });
        }
    }

    pub fn records_events(&self) -> bool {
        self.record_events
    }

    /// Drops every hash of blocks that are not in use, e.g. on an operator request. Blocks in use
    /// lose their hash too, so the cache starts empty.
    pub fn reset_prefix_cache(&mut self) {
        for meta in &mut self.blocks {
            meta.hash = None;
        }
        self.cached.clear();
        if self.record_events {
            self.events.push(PoolEvent::AllCleared);
        }
    }

    /// Events recorded since the last drain, oldest first.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, PoolEvent> {
        self.events.drain(..)
    }

    fn unlink(&mut self, id: u32) {
        let BlockMeta { prev, next, .. } = self.blocks[id as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let meta = &mut self.blocks[id as usize];
        meta.prev = NIL;
        meta.next = NIL;
        meta.in_free_queue = false;
        self.num_free -= 1;
    }

    fn push_tail(&mut self, id: u32) {
        let tail = self.tail;
        {
            let meta = &mut self.blocks[id as usize];
            meta.prev = tail;
            meta.next = NIL;
            meta.in_free_queue = true;
        }
        if tail == NIL {
            self.head = id;
        } else {
            self.blocks[tail as usize].next = id;
        }
        self.tail = id;
        self.num_free += 1;
    }

    /// Checks the free list against the reference counts (tests and debug assertions).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = 0usize;
        let mut cur = self.head;
        let mut prev = NIL;
        while cur != NIL {
            let meta = self
                .blocks
                .get(cur as usize)
                .ok_or("free list points out of range")?;
            if meta.ref_cnt != 0 || !meta.in_free_queue {
                return Err(format!(
                    "block {cur} in free list with ref_cnt {}",
                    meta.ref_cnt
                ));
            }
            if meta.prev != prev {
                return Err(format!("block {cur} has a broken prev link"));
            }
            seen += 1;
            if seen > self.blocks.len() {
                return Err("free list has a cycle".into());
            }
            prev = cur;
            cur = meta.next;
        }
        if prev != self.tail {
            return Err("tail does not end the free list".into());
        }
        let zero = self.blocks.iter().filter(|b| b.ref_cnt == 0).count();
        if seen != self.num_free || zero != self.num_free {
            return Err(format!(
                "free list {seen}, counter {}, ref 0 {zero}",
                self.num_free
            ));
        }
        for (&hash, &block) in &self.cached {
            if self.blocks.get(block as usize).and_then(|b| b.hash) != Some(hash) {
                return Err(format!(
                    "map entry {hash:x} -> {block} does not match the block"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_in_lru_order_and_evicts_hashes_last_freed_last() {
        let mut pool = BlockPool::new(3, true, true);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert_eq!((a, b, pool.num_free()), (0, 1, 1));
        assert!(pool.register(a, 0xa));
        assert!(pool.register(b, 0xb));
        pool.free(b).unwrap();
        pool.free(a).unwrap();
        assert_eq!(pool.num_free(), 3);
        assert_eq!(pool.usage(), 0.0);
        // Free order: 2 (never used), then b, then a.
        assert_eq!(pool.allocate(), Some(2));
        assert_eq!(pool.allocate(), Some(b));
        assert_eq!(pool.lookup(0xb), None);
        assert_eq!(pool.lookup(0xa), Some(a));
        let events: Vec<_> = pool.drain_events().collect();
        assert_eq!(
            events,
            vec![PoolEvent::Removed {
                block_hashes: vec![0xb]
            }]
        );
        pool.check_invariants().unwrap();
    }

    #[test]
    fn touch_revives_a_free_cached_block_and_double_free_is_an_error() {
        let mut pool = BlockPool::new(2, true, false);
        let a = pool.allocate().unwrap();
        pool.register(a, 7);
        pool.free(a).unwrap();
        assert_eq!(pool.free(a), Err(PoolError::DoubleFree { block: a }));
        pool.touch(a).unwrap();
        pool.touch(a).unwrap();
        assert_eq!(pool.ref_count(a), Some(2));
        assert_eq!(pool.num_free(), 1);
        pool.check_invariants().unwrap();
        assert_eq!(pool.allocate(), Some(1));
        assert_eq!(pool.allocate(), None);
        assert_eq!(
            pool.touch(9),
            Err(PoolError::OutOfRange { block: 9, total: 2 })
        );
    }

    #[test]
    fn duplicate_hash_keeps_the_first_block() {
        let mut pool = BlockPool::new(2, true, false);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert!(pool.register(a, 1));
        assert!(!pool.register(b, 1));
        pool.free(a).unwrap();
        pool.free(b).unwrap();
        assert_eq!(pool.allocate(), Some(a));
        assert_eq!(pool.lookup(1), None);
        pool.check_invariants().unwrap();
    }
}
