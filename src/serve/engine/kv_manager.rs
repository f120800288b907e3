//! Per-sequence KV-cache bookkeeping over the [`BlockPool`]: prefix lookup, slot allocation,
//! registering newly full blocks in the prefix cache, and freeing.
//!
//! Allocation never evicts a running sequence's blocks: when the pool cannot cover a request,
//! [`KvManager::allocate`] returns `false` and changes nothing, and the scheduler decides whom to
//! preempt.

use super::block_pool::{BlockPool, PoolError};
use super::hashing;
use super::sequence::Sequence;

#[derive(Debug)]
pub struct KvManager {
    pool: BlockPool,
    block_size: usize,
    root: u64,
}

impl KvManager {
    pub fn new(pool: BlockPool, block_size: usize, model_name: &str) -> Self {
        Self {
            pool,
            block_size: block_size.max(1),
            root: hashing::root_hash(model_name),
        }
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn pool_mut(&mut self) -> &mut BlockPool {
        &mut self.pool
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn root_hash(&self) -> u64 {
        self.root
    }

    /// Cached blocks that form a prefix of `seq` (which holds no blocks yet), written to `hits`.
    /// At least one token is always left to compute, because the step that computes it produces
    /// the logits for the next token.
    pub fn find_prefix(&self, seq: &mut Sequence, hits: &mut Vec<u32>) {
        hits.clear();
        if !self.pool.caching_enabled() || seq.num_tokens() == 0 {
            return;
        }
        hashing::extend_hashes(
            self.root,
            self.block_size,
            &seq.tokens,
            &mut seq.block_hashes,
        );
        let max_blocks = (seq.num_tokens() - 1) / self.block_size;
        for &hash in seq.block_hashes.iter().take(max_blocks) {
            match self.pool.lookup(hash) {
                Some(block) => hits.push(block),
                None => break,
            }
        }
    }

    /// Extends `seq`'s block table so it covers `num_computed + hits·B + num_new` tokens, taking
    /// `hits` (from [`find_prefix`](Self::find_prefix), only for a sequence without blocks) as its
    /// first blocks. Returns false, changing nothing, when the pool is too small.
    pub fn allocate(&mut self, seq: &mut Sequence, hits: &[u32], num_new: usize) -> bool {
        let covered = seq.num_computed + hits.len() * self.block_size + num_new;
        let needed = covered.div_ceil(self.block_size);
        let have = seq.block_table.len() + hits.len();
        let new_blocks = needed.saturating_sub(have);
        // Hits that sit in the free queue stop being allocatable once we take them.
        let revived = hits
            .iter()
            .filter(|&&b| self.pool.ref_count(b) == Some(0))
            .count();
        if new_blocks > self.pool.num_free().saturating_sub(revived) {
            return false;
        }
        for &block in hits {
            // Hits came from the pool's own map a moment ago, so touch cannot fail.
            if self.pool.touch(block).is_ok() {
                seq.block_table.push(block);
            }
        }
        if !hits.is_empty() {
            seq.num_computed += hits.len() * self.block_size;
            seq.num_registered = hits.len();
        }
        for _ in 0..new_blocks {
            match self.pool.allocate() {
                Some(block) => seq.block_table.push(block),
                None => return false, // unreachable: counted above
            }
        }
        true
    }

    /// Registers the blocks `seq` filled since the last call in the prefix cache.
    pub fn commit(&mut self, seq: &mut Sequence) {
        if !self.pool.caching_enabled() {
            return;
        }
        let full = (seq.num_computed / self.block_size).min(seq.block_table.len());
        if full <= seq.num_registered {
            return;
        }
        hashing::extend_hashes(
            self.root,
            self.block_size,
            &seq.tokens,
            &mut seq.block_hashes,
        );
        let record = self.pool.records_events();
        let mut run_start = seq.num_registered;
        let mut run: Vec<u64> = Vec::new();
        for idx in seq.num_registered..full {
            let (Some(&hash), Some(&block)) = (seq.block_hashes.get(idx), seq.block_table.get(idx))
            else {
                break;
            };
            if self.pool.register(block, hash) {
                if run.is_empty() {
                    run_start = idx;
                }
                if record {
                    run.push(hash);
                }
            } else if !run.is_empty() {
                self.flush(seq, run_start, std::mem::take(&mut run));
            }
        }
        if !run.is_empty() {
            self.flush(seq, run_start, run);
        }
        seq.num_registered = full;
    }

    fn flush(&mut self, seq: &Sequence, start: usize, hashes: Vec<u64>) {
        let parent = match start.checked_sub(1) {
            Some(i) => seq.block_hashes.get(i).copied().unwrap_or(self.root),
            None => self.root,
        };
        let bs = self.block_size;
        let range = start * bs..(start + hashes.len()) * bs;
        let tokens = seq
            .tokens
            .get(range)
            .map(<[u32]>::to_vec)
            .unwrap_or_default();
        self.pool.record_stored(hashes, parent, tokens);
    }

    /// Releases every block of `seq`, last block first so a shared prefix is evicted last.
    pub fn free(&mut self, seq: &mut Sequence) -> Result<(), PoolError> {
        let mut result = Ok(());
        for &block in seq.block_table.iter().rev() {
            if let Err(e) = self.pool.free(block) {
                result = Err(e);
            }
        }
        seq.block_table.clear();
        seq.num_computed = 0;
        seq.num_registered = 0;
        result
    }
}
