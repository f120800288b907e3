//! Which prefix blocks each endpoint really holds, kept from its KV-cache events.
//!
//! Two key spaces, as in llm-d-kv-cache's dual-key design: an event names blocks by the
//! engine's own hashes (**engine keys**: vLLM's sha256 with a per-process random seed, our
//! XXH64, …), which the EPP cannot compute from a prompt; so every `BlockStored` is re-hashed
//! from its token ids into **request keys** (the chain of [`request_keys`]), the index is keyed by
//! those, and an `engine key → request keys` map lets `BlockRemoved` find what to drop. Scoring
//! tokenizes the prompt, chains the same request keys and counts how many leading ones an
//! endpoint holds.
//!
//! Memory is bounded per endpoint (`max_keys_per_endpoint` request keys; a store beyond it is
//! skipped and counted) and an endpoint's entry goes when the endpoint leaves the pool.
//!
//! **Speculative credits** (llm-d's `speculativeIndexing`): after a routing decision the chosen
//! endpoint is credited with the prompt's request keys until a TTL passes, so the next request
//! with the same prefix finds it before the engine's `BlockStored` arrives. A stored key
//! confirms (replaces) its credit; `BlockRemoved` drops stored keys only (a credit made after
//! the store stands for a routed request that will store the block again) and credits expire;
//! `AllBlocksCleared` drops everything. Credits per endpoint are capped at
//! `max_keys_per_endpoint` too (the oldest go first).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use parking_lot::RwLock;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::kvwire::{BlockRemoved, BlockStored, Event};
use crate::serve::engine::hashing;

/// The first parent of a request-key chain for a cache namespace ("" for the base model, else
/// the LoRA adapter name), seeded by `hashSeed`.
pub fn chain_root(seed: &str, namespace: &str) -> u64 {
    let mut bytes = Vec::with_capacity(seed.len() + 1 + namespace.len());
    bytes.extend_from_slice(seed.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(namespace.as_bytes());
    xxhash_rust::xxh64::xxh64(&bytes, 0)
}

/// Appends the request keys of every full `block_size`-token block of `tokens`, chained from
/// `parent` (`h = XXH64(le_u64(parent) ‖ le_u32(t)…)`, the decode server's block hash).
pub fn request_keys(parent: u64, block_size: usize, tokens: &[u32], out: &mut Vec<u64>) {
    if block_size == 0 {
        return;
    }
    let mut parent = parent;
    for chunk in tokens.chunks_exact(block_size) {
        parent = hashing::block_hash(parent, chunk);
        out.push(parent);
    }
}

/// Why (part of) an event was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// The parent engine key is unknown (an event was missed): the chain cannot be placed.
    UnknownParent,
    /// The event's block size is not a multiple of the configured one, or its token count does
    /// not match its hashes.
    BlockSize,
    /// The endpoint already holds `max_keys_per_endpoint` request keys.
    Full,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::UnknownParent => "unknown_parent",
            Skip::BlockSize => "block_size",
            Skip::Full => "full",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct SkipLabels {
    pub reason: &'static str,
}

/// Index-wide counters (registered by the subscriber manager).
#[derive(Debug, Clone, Default)]
pub struct IndexMetrics {
    pub keys: Gauge,
    pub skipped: Family<SkipLabels, Counter>,
}

#[derive(Debug, Default)]
struct Blocks {
    /// Engine key → the request keys its tokens hash to (one unless the engine's block size is
    /// a multiple of ours).
    engine: HashMap<u64, Box<[u64]>>,
    /// Request key → how many engine blocks hold it.
    held: HashMap<u64, u32>,
    /// LoRA adapters seen in stored events (their blocks chain from their own root).
    loras: HashSet<String>,
    /// Speculative credits not yet confirmed: request key → when the credit expires.
    spec: HashMap<u64, Instant>,
    /// Every credit made, oldest first. One TTL for all, so this is also expiry order; an entry
    /// whose key was re-credited, confirmed or removed since is skipped when it is popped.
    spec_order: VecDeque<(u64, Instant)>,
}

impl Blocks {
    fn holds(&self, key: &u64, now: Instant) -> bool {
        self.held.contains_key(key) || self.spec.get(key).is_some_and(|&exp| exp > now)
    }

    /// Pops the oldest credit, dropping its key unless a later credit renewed it.
    fn pop_credit(&mut self) {
        if let Some((k, exp)) = self.spec_order.pop_front() {
            if self.spec.get(&k) == Some(&exp) {
                self.spec.remove(&k);
            }
        }
    }
}

/// One endpoint's blocks. `live` says whether its event stream is connected; scoring falls
/// back to the approximate index for endpoints that are not.
#[derive(Debug, Default)]
pub struct EndpointBlocks {
    blocks: RwLock<Blocks>,
    live: AtomicBool,
    /// The engine's block size (tokens) from its last applied `BlockStored`; 0 before one.
    engine_block: AtomicU32,
}

impl EndpointBlocks {
    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Release);
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Request keys held.
    pub fn len(&self) -> usize {
        self.blocks.read().held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many of `keys`, from the first, this endpoint holds or is speculatively credited
    /// with.
    pub fn matched(&self, keys: &[u64]) -> usize {
        let b = self.blocks.read();
        if b.spec.is_empty() {
            return keys.iter().take_while(|k| b.held.contains_key(k)).count();
        }
        let now = Instant::now();
        keys.iter().take_while(|k| b.holds(k, now)).count()
    }

    /// Speculative credits (unconfirmed, possibly expired but not yet swept).
    pub fn speculative_len(&self) -> usize {
        self.blocks.read().spec.len()
    }

    pub fn has_lora(&self, name: &str) -> bool {
        self.blocks.read().loras.contains(name)
    }

    /// The engine's block size, once a stored event has told it.
    pub fn engine_block_size(&self) -> Option<u32> {
        Some(self.engine_block.load(Ordering::Relaxed)).filter(|&b| b > 0)
    }
}

/// Parameters of the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexConfig {
    /// Tokens per request-key block.
    pub block_size: usize,
    pub hash_seed: String,
    pub max_keys_per_endpoint: usize,
}

/// The precise index of every endpoint with an event stream.
#[derive(Debug)]
pub struct BlockIndex {
    cfg: IndexConfig,
    endpoints: RwLock<HashMap<String, Arc<EndpointBlocks>>>,
    pub metrics: IndexMetrics,
}

impl BlockIndex {
    pub fn new(cfg: IndexConfig) -> Self {
        BlockIndex {
            cfg,
            endpoints: RwLock::new(HashMap::new()),
            metrics: IndexMetrics::default(),
        }
    }

    pub fn config(&self) -> &IndexConfig {
        &self.cfg
    }

    /// The entry of `endpoint`, created empty (and not live) when missing.
    pub fn endpoint(&self, endpoint: &str) -> Arc<EndpointBlocks> {
        if let Some(e) = self.endpoints.read().get(endpoint) {
            return Arc::clone(e);
        }
        Arc::clone(
            self.endpoints
                .write()
                .entry(endpoint.to_string())
                .or_default(),
        )
    }

    /// The entry of `endpoint` if it has one.
    pub fn get(&self, endpoint: &str) -> Option<Arc<EndpointBlocks>> {
        self.endpoints.read().get(endpoint).cloned()
    }

    /// Forgets an endpoint that left the pool.
    pub fn remove_endpoint(&self, endpoint: &str) {
        if let Some(e) = self.endpoints.write().remove(endpoint) {
            self.metrics.keys.dec_by(e.len() as i64);
        }
    }

    fn skip(&self, reason: Skip) {
        self.metrics
            .skipped
            .get_or_create(&SkipLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Applies one event to `endpoint`'s blocks.
    pub fn apply(&self, endpoint: &EndpointBlocks, event: &Event) {
        match event {
            Event::Stored(s) => self.store(endpoint, s),
            Event::Removed(r) => self.remove(endpoint, r),
            Event::AllCleared => self.clear(endpoint),
        }
    }

    /// Drops every block of `endpoint` (AllBlocksCleared, or its engine restarted).
    pub fn clear(&self, endpoint: &EndpointBlocks) {
        let mut b = endpoint.blocks.write();
        self.metrics.keys.dec_by(b.held.len() as i64);
        *b = Blocks::default();
    }

    /// Credits `endpoint` with `keys` (a routed prompt's request keys) until `ttl` from now.
    /// Expired credits are swept first, and beyond
    /// `max_keys_per_endpoint` credits the oldest go.
    pub fn credit(&self, endpoint: &EndpointBlocks, keys: &[u64], ttl: Duration) {
        let now = Instant::now();
        let exp = now + ttl;
        let cap = self.cfg.max_keys_per_endpoint;
        let mut b = endpoint.blocks.write();
        while b.spec_order.front().is_some_and(|&(_, e)| e <= now) {
            b.pop_credit();
        }
        // Held keys are credited too: the engine may evict them before this request's
        // prefill, which would store them again (llm-d keeps both entries as well).
        for &k in keys {
            while b.spec_order.len() >= cap {
                b.pop_credit();
            }
            b.spec.insert(k, exp);
            b.spec_order.push_back((k, exp));
        }
    }

    fn store(&self, endpoint: &EndpointBlocks, ev: &BlockStored) {
        let bs = self.cfg.block_size;
        let ebs = ev.block_size as usize;
        if bs == 0
            || ebs == 0
            || !ebs.is_multiple_of(bs)
            || Some(ev.token_ids.len()) != ev.block_hashes.len().checked_mul(ebs)
        {
            self.skip(Skip::BlockSize);
            return;
        }
        endpoint
            .engine_block
            .store(ev.block_size, Ordering::Relaxed);
        let mut b = endpoint.blocks.write();
        let mut parent = match ev.parent_block_hash {
            None => chain_root(
                &self.cfg.hash_seed,
                ev.lora_name.as_deref().unwrap_or_default(),
            ),
            Some(p) => match b.engine.get(&p).and_then(|keys| keys.last()) {
                Some(&k) => k,
                None => {
                    self.skip(Skip::UnknownParent);
                    return;
                }
            },
        };
        if let Some(lora) = &ev.lora_name {
            if !b.loras.contains(lora) && b.loras.len() < 1024 {
                b.loras.insert(lora.clone());
            }
        }
        let mut keys = Vec::with_capacity(ebs / bs);
        for (i, &engine_key) in ev.block_hashes.iter().enumerate() {
            keys.clear();
            request_keys(parent, bs, &ev.token_ids[i * ebs..(i + 1) * ebs], &mut keys);
            let Some(&last) = keys.last() else { return };
            parent = last;
            if b.held.len() + keys.len() > self.cfg.max_keys_per_endpoint
                && !b.engine.contains_key(&engine_key)
            {
                self.skip(Skip::Full);
                return;
            }
            if let Some(old) = b.engine.insert(engine_key, keys.clone().into_boxed_slice()) {
                self.release(&mut b, &old);
            }
            for &k in &keys {
                let n = b.held.entry(k).or_insert(0);
                if *n == 0 {
                    self.metrics.keys.inc();
                }
                *n += 1;
                // Confirmed: the held key replaces the credit (its queue entry is skipped).
                if !b.spec.is_empty() {
                    b.spec.remove(&k);
                }
            }
        }
    }

    fn release(&self, b: &mut Blocks, keys: &[u64]) {
        for k in keys {
            if let Some(n) = b.held.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    b.held.remove(k);
                    self.metrics.keys.dec();
                }
            }
        }
    }

    fn remove(&self, endpoint: &EndpointBlocks, ev: &BlockRemoved) {
        let mut b = endpoint.blocks.write();
        for h in &ev.block_hashes {
            if let Some(keys) = b.engine.remove(h) {
                self.release(&mut b, &keys);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvwire::BlockStored;

    fn index(block_size: usize, max: usize) -> BlockIndex {
        BlockIndex::new(IndexConfig {
            block_size,
            hash_seed: String::new(),
            max_keys_per_endpoint: max,
        })
    }

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32], bs: u32) -> Event {
        Event::Stored(BlockStored {
            block_hashes: hashes.to_vec(),
            parent_block_hash: parent,
            token_ids: tokens.to_vec(),
            block_size: bs,
            ..BlockStored::default()
        })
    }

    fn prompt_keys(tokens: &[u32], bs: usize) -> Vec<u64> {
        let mut out = Vec::new();
        request_keys(chain_root("", ""), bs, tokens, &mut out);
        out
    }

    #[test]
    fn stores_chains_and_removes_by_engine_key() {
        let idx = index(2, 100);
        let ep = idx.endpoint("a");
        // Engine keys are opaque (here 100, 200, 300); request keys come from the tokens.
        idx.apply(&ep, &stored(&[100, 200], None, &[1, 2, 3, 4], 2));
        idx.apply(&ep, &stored(&[300], Some(200), &[5, 6], 2));
        let keys = prompt_keys(&[1, 2, 3, 4, 5, 6, 7], 2);
        assert_eq!(keys.len(), 3);
        assert_eq!(ep.matched(&keys), 3);
        assert_eq!(ep.len(), 3);
        assert_eq!(idx.metrics.keys.get(), 3);
        // Another prompt sharing the first block only.
        assert_eq!(ep.matched(&prompt_keys(&[1, 2, 9, 9], 2)), 1);
        idx.apply(
            &ep,
            &Event::Removed(BlockRemoved {
                block_hashes: vec![200, 999],
                medium: None,
            }),
        );
        assert_eq!(ep.matched(&keys), 1);
        assert_eq!(ep.len(), 2);
        idx.apply(&ep, &Event::AllCleared);
        assert_eq!(ep.matched(&keys), 0);
        assert_eq!(idx.metrics.keys.get(), 0);
    }

    #[test]
    fn engine_blocks_split_into_smaller_request_blocks() {
        let idx = index(2, 100);
        let ep = idx.endpoint("a");
        idx.apply(&ep, &stored(&[7], None, &[1, 2, 3, 4], 4));
        assert_eq!(ep.matched(&prompt_keys(&[1, 2, 3, 4], 2)), 2);
        // A 3-token engine block does not split into 2-token blocks: skipped.
        idx.apply(&ep, &stored(&[8], Some(7), &[5, 6, 7], 3));
        // Token count not matching the hashes: skipped.
        idx.apply(&ep, &stored(&[9, 10], Some(7), &[5, 6, 7, 8], 4));
        // Unknown parent: skipped.
        idx.apply(&ep, &stored(&[11], Some(12345), &[5, 6, 7, 8], 4));
        assert_eq!(ep.len(), 2);
        let skipped = |r: Skip| {
            idx.metrics
                .skipped
                .get_or_create(&SkipLabels { reason: r.as_str() })
                .get()
        };
        assert_eq!(skipped(Skip::BlockSize), 2);
        assert_eq!(skipped(Skip::UnknownParent), 1);
    }

    #[test]
    fn bounded_per_endpoint_and_shared_keys_are_counted() {
        let idx = index(1, 2);
        let ep = idx.endpoint("a");
        idx.apply(&ep, &stored(&[1, 2, 3], None, &[1, 2, 3], 1));
        assert_eq!(ep.len(), 2);
        assert_eq!(
            idx.metrics
                .skipped
                .get_or_create(&SkipLabels { reason: "full" })
                .get(),
            1
        );
        // Two engine keys for the same tokens (e.g. two hash seeds): the request key stays
        // until both are removed.
        let idx = index(1, 10);
        let ep = idx.endpoint("a");
        idx.apply(&ep, &stored(&[1], None, &[5], 1));
        idx.apply(&ep, &stored(&[2], None, &[5], 1));
        let keys = prompt_keys(&[5], 1);
        idx.apply(
            &ep,
            &Event::Removed(BlockRemoved {
                block_hashes: vec![1],
                medium: None,
            }),
        );
        assert_eq!(ep.matched(&keys), 1);
        idx.apply(
            &ep,
            &Event::Removed(BlockRemoved {
                block_hashes: vec![2],
                medium: None,
            }),
        );
        assert_eq!(ep.matched(&keys), 0);
        idx.remove_endpoint("a");
        assert!(idx.get("a").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn credits_count_until_the_ttl_and_stored_keys_confirm_them() {
        let idx = index(2, 100);
        let ep = idx.endpoint("a");
        let ttl = Duration::from_secs(2);
        let keys = prompt_keys(&[1, 2, 3, 4, 5, 6], 2);
        idx.credit(&ep, &keys, ttl);
        assert_eq!(ep.matched(&keys), 3);
        assert_eq!(ep.speculative_len(), 3);
        // Credits are not stored blocks: the gauge counts what the engine reported.
        assert_eq!((ep.len(), idx.metrics.keys.get()), (0, 0));
        // The engine stores the first two blocks: confirmed, no longer speculative.
        idx.apply(&ep, &stored(&[100, 200], None, &[1, 2, 3, 4], 2));
        assert_eq!(ep.speculative_len(), 1);
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert_eq!(ep.matched(&keys), 3);
        tokio::time::advance(Duration::from_millis(1)).await;
        // The third block's credit expired; the confirmed two stay.
        assert_eq!(ep.matched(&keys), 2);
        // A later credit sweeps the expired entries first.
        idx.credit(&ep, &keys[..1], ttl);
        assert_eq!(ep.speculative_len(), 1);
        // A credit made after the store survives BlockRemoved (its request stores it again)...
        idx.apply(
            &ep,
            &Event::Removed(BlockRemoved {
                block_hashes: vec![100, 200],
                medium: None,
            }),
        );
        assert_eq!(ep.matched(&keys), 1);
        // ...but not AllBlocksCleared.
        idx.apply(&ep, &Event::AllCleared);
        assert_eq!((ep.matched(&keys), ep.speculative_len()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn credits_are_capped_oldest_first_and_renewed_on_recredit() {
        let idx = index(1, 4);
        let ep = idx.endpoint("a");
        let ttl = Duration::from_secs(2);
        let first = prompt_keys(&[1, 2, 3], 1);
        idx.credit(&ep, &first, ttl);
        tokio::time::advance(Duration::from_secs(1)).await;
        // Two more keys exceed the cap of 4: the oldest credit (first[0]) goes.
        let second = prompt_keys(&[7, 8], 1);
        idx.credit(&ep, &second, ttl);
        assert_eq!(ep.speculative_len(), 4);
        assert_eq!(ep.matched(&first), 0);
        assert_eq!(ep.matched(&second), 2);
        // Re-crediting renews: at 3.5 s the credits of 1 s have expired, the one renewed at 2 s
        // has not (the sweep at 2 s dropped the credits of 0 s).
        tokio::time::advance(Duration::from_secs(1)).await;
        idx.credit(&ep, &second[..1], ttl);
        assert_eq!(ep.speculative_len(), 2);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(ep.matched(&second), 1);
        assert_eq!(ep.matched(&first[1..]), 0);
    }

    #[test]
    fn lora_blocks_chain_from_their_own_root() {
        let idx = index(1, 10);
        let ep = idx.endpoint("a");
        idx.apply(
            &ep,
            &Event::Stored(BlockStored {
                block_hashes: vec![1],
                token_ids: vec![5],
                block_size: 1,
                lora_name: Some("sql-lora".into()),
                ..BlockStored::default()
            }),
        );
        assert!(ep.has_lora("sql-lora"));
        assert_eq!(ep.matched(&prompt_keys(&[5], 1)), 0);
        let mut lora = Vec::new();
        request_keys(chain_root("", "sql-lora"), 1, &[5], &mut lora);
        assert_eq!(ep.matched(&lora), 1);
    }
}
