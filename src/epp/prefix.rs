//! Approximate prefix-cache index: chained XXH64 hashes of prompt blocks and, per endpoint, an
//! LRU of the block hashes recently routed there, so the scheduler can estimate which model
//! server already holds a prompt's prefix in its KV cache.
//!
//! Behaviour follows the GIE v1.5.0 `approximateprefix` plugin (`hashing.go`, `indexer.go`);
//! the layout is ours. Differences from the reference, all deliberate:
//! - a request's hashes are recorded last-block-first, so the *first* block is the most recently
//!   used one and LRU eviction takes a prompt's tail before its head (as vLLM evicts KV blocks);
//! - a match counts the blocks each endpoint holds *consecutively from the start* (the reference
//!   also counts later hits after an endpoint's first miss);
//! - with many entries per endpoint the index is split into up to 16 hash-sharded parts, each
//!   with its own lock and a 1/16 share of every endpoint's LRU capacity (LRU within a shard);
//!   small capacities (< 2048) keep one shard and therefore an exact LRU.
//!
//! Memory layout (≈ 12 B node + 5 B/load-factor table slot ≈ 18–23 B per (hash, endpoint)
//! entry, measured by `benches/prefix_memory.rs`; the reference uses 60–70 B):
//!
//! ```text
//!  shard ─ table: HashTable<u32>   value = endpoint id << 16 | local node index, keyed by the
//!        │                         node's hash (duplicates allowed: one slot per holder)
//!        └ regions[endpoint id] ─ nodes: Vec<Node{hash, prev, next}>  (≤ 65,535, u16 links)
//!                                 head (MRU) ⇄ … ⇄ tail (LRU)
//! ```

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use hashbrown::{HashMap, HashTable};
use parking_lot::{RwLock, RwLockReadGuard, RwLockUpgradableReadGuard};
use prometheus_client::metrics::gauge::Gauge;
use xxhash_rust::xxh64::Xxh64;

/// Characters (bytes) per token assumed when turning `blockSizeTokens` into a byte block size.
pub const AVERAGE_CHARS_PER_TOKEN: usize = 4;
/// Most endpoints the index tracks at once (ids are 16 bits). Records for more are dropped.
pub const MAX_ENDPOINTS: usize = 1 << 16;
/// Most shards; each holds at most [`MAX_NODES_PER_SHARD`] entries per endpoint.
pub const MAX_SHARDS: usize = 16;
/// Per-endpoint entries one shard can hold (node links are u16; `u16::MAX` is the list end).
pub const MAX_NODES_PER_SHARD: usize = u16::MAX as usize;
/// Largest per-endpoint LRU capacity the index accepts; larger requests are clamped to it.
pub const MAX_CAPACITY_PER_ENDPOINT: usize = MAX_SHARDS * MAX_NODES_PER_SHARD;
/// Per-endpoint capacity that earns one more shard (below 2 × this, the index has one shard).
const ENTRIES_PER_SHARD_TARGET: usize = 1024;

const NIL: u16 = u16::MAX;

/// Hashes `prompt` into chained block hashes, appending them to `out` (cleared first).
///
/// `h0 = XXH64(model ‖ cache_salt)`, `h_i = XXH64(block_i ‖ le_u64(h_{i-1}))`, seed 0, where a
/// block is `block_size_tokens × 4` bytes. Input shorter than one block yields nothing; input is
/// cut to `max_blocks` blocks and a trailing partial block is dropped (GIE `hashPrompt`).
pub fn hash_prompt(
    model: &[u8],
    cache_salt: &[u8],
    prompt: &[u8],
    block_size_tokens: usize,
    max_blocks: usize,
    out: &mut Vec<u64>,
) {
    out.clear();
    let Some(block) = block_size_tokens.checked_mul(AVERAGE_CHARS_PER_TOKEN) else {
        return;
    };
    if block == 0 || prompt.len() < block {
        return;
    }
    let blocks = (prompt.len() / block).min(max_blocks);
    out.reserve(blocks);
    let mut hasher = Xxh64::new(0);
    hasher.update(model);
    hasher.update(cache_salt);
    let mut prev = hasher.digest();
    for chunk in prompt.chunks_exact(block).take(blocks) {
        prev = block_hash::chained(chunk, prev).unwrap_or_else(|| {
            let mut hasher = Xxh64::new(0);
            hasher.update(chunk);
            hasher.update(&prev.to_le_bytes());
            hasher.digest()
        });
        out.push(prev);
    }
}

/// One (hash, endpoint) entry: 12 bytes (the hash is split so the struct is 4-aligned).
#[derive(Clone, Copy)]
struct Node {
    hash: [u32; 2],
    prev: u16,
    next: u16,
}

impl Node {
    fn hash(&self) -> u64 {
        (u64::from(self.hash[1]) << 32) | u64::from(self.hash[0])
    }
    fn set_hash(&mut self, h: u64) {
        self.hash = [h as u32, (h >> 32) as u32];
    }
}

/// One endpoint's entries within one shard, as an intrusive LRU list over a dense node array.
struct Region {
    nodes: Vec<Node>,
    head: u16,
    tail: u16,
    cap: u16,
}

impl Default for Region {
    fn default() -> Self {
        Region {
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
            cap: 0,
        }
    }
}

impl Region {
    fn unlink(&mut self, i: u16) {
        let Node { prev, next, .. } = self.nodes[usize::from(i)];
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[usize::from(prev)].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[usize::from(next)].prev = prev;
        }
    }

    fn push_front(&mut self, i: u16) {
        let old = self.head;
        {
            let n = &mut self.nodes[usize::from(i)];
            n.prev = NIL;
            n.next = old;
        }
        if old == NIL {
            self.tail = i;
        } else {
            self.nodes[usize::from(old)].prev = i;
        }
        self.head = i;
    }

    /// Grows the node array by half (not double) so spare capacity stays small, never past `cap`.
    fn reserve_one(&mut self) {
        if self.nodes.len() == self.nodes.capacity() {
            let room = usize::from(self.cap) - self.nodes.len();
            let grow = (self.nodes.len() / 2).clamp(8, 4096).min(room).max(1);
            self.nodes.reserve_exact(grow);
        }
    }
}

fn pack(ep: u16, local: u16) -> u32 {
    (u32::from(ep) << 16) | u32::from(local)
}

fn unpack(v: u32) -> (u16, u16) {
    ((v >> 16) as u16, v as u16)
}

#[derive(Default)]
struct Shard {
    table: HashTable<u32>,
    regions: Vec<Region>,
}

fn node_hash(regions: &[Region], v: u32) -> u64 {
    let (ep, local) = unpack(v);
    regions
        .get(usize::from(ep))
        .and_then(|r| r.nodes.get(usize::from(local)))
        .map_or(0, Node::hash)
}

impl Shard {
    /// Endpoint ids holding `hash`.
    fn holders(&self, hash: u64) -> impl Iterator<Item = u16> + '_ {
        self.table
            .iter_hash(hash)
            .filter(move |&&v| node_hash(&self.regions, v) == hash)
            .map(|&v| unpack(v).0)
    }

    /// Records `hash` for `ep` as most recently used; returns the change in entry count (0 or 1).
    fn touch(&mut self, ep: u16, hash: u64, cap: u16) -> i64 {
        if cap == 0 {
            // This endpoint's capacity is smaller than the shard count; this shard gets none.
            return 0;
        }
        let Shard { table, regions } = self;
        let idx = usize::from(ep);
        if regions.len() <= idx {
            regions.resize_with(idx + 1, Region::default);
        }
        if let Some(&v) = table.find(hash, |&v| {
            unpack(v).0 == ep && node_hash(regions, v) == hash
        }) {
            let region = &mut regions[idx];
            let local = unpack(v).1;
            if region.head != local {
                region.unlink(local);
                region.push_front(local);
            }
            return 0;
        }
        let region = &mut regions[idx];
        if region.cap == 0 {
            region.cap = cap;
        }
        let (local, delta) = if region.nodes.len() < usize::from(region.cap) {
            region.reserve_one();
            let local = region.nodes.len() as u16;
            region.nodes.push(Node {
                hash: [0, 0],
                prev: NIL,
                next: NIL,
            });
            (local, 1)
        } else {
            // At capacity: the least recently used entry makes room (and leaves the table).
            let victim = region.tail;
            let old = region.nodes[usize::from(victim)].hash();
            region.unlink(victim);
            if let Ok(entry) = table.find_entry(old, |&v| v == pack(ep, victim)) {
                entry.remove();
            }
            (victim, 0)
        };
        region.nodes[usize::from(local)].set_hash(hash);
        region.push_front(local);
        table.insert_unique(hash, pack(ep, local), |&v| node_hash(regions, v));
        delta
    }

    /// Drops every entry of `ep`; returns how many there were.
    fn remove(&mut self, ep: u16) -> i64 {
        let Shard { table, regions } = self;
        let Some(region) = regions.get_mut(usize::from(ep)) else {
            return 0;
        };
        let region = std::mem::take(region);
        for (local, node) in region.nodes.iter().enumerate() {
            let packed = pack(ep, local as u16);
            if let Ok(entry) = table.find_entry(node.hash(), |&v| v == packed) {
                entry.remove();
            }
        }
        region.nodes.len() as i64
    }
}

struct EndpointEntry {
    name: Box<str>,
    /// Per-shard LRU capacity, fixed when the endpoint is first recorded (as the reference does).
    shard_caps: Box<[u16]>,
}

#[derive(Default)]
struct Interner {
    ids: HashMap<Box<str>, u16>,
    slots: Vec<Option<EndpointEntry>>,
    free: Vec<u16>,
}

/// Parameters of the approximate prefix index (`prefix-cache-scorer` /
/// `approx-prefix-cache-producer`; GIE `approximateprefix/types.go`), validated by
/// `epp::config`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixCacheParams {
    /// Take block size and LRU capacity from the endpoints' reported KV-cache config when known.
    pub auto_tune: bool,
    pub block_size_tokens: usize,
    pub max_prefix_blocks_to_match: usize,
    /// When > 0, overrides `max_prefix_blocks_to_match` as `this / block size`.
    pub max_prefix_tokens_to_match: usize,
    pub lru_capacity_per_server: usize,
}

impl Default for PrefixCacheParams {
    fn default() -> Self {
        PrefixCacheParams {
            auto_tune: true,
            block_size_tokens: 16,
            max_prefix_blocks_to_match: 256,
            max_prefix_tokens_to_match: 0,
            lru_capacity_per_server: 31250,
        }
    }
}

/// Settings of a [`PrefixIndex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixIndexConfig {
    /// Default per-endpoint LRU capacity (`lruCapacityPerServer`).
    pub lru_capacity_per_endpoint: usize,
}

/// Hash → endpoints index with a bounded per-endpoint LRU. Shared by all request tasks.
pub struct PrefixIndex {
    interner: RwLock<Interner>,
    shards: Box<[RwLock<Shard>]>,
    shard_mask: u64,
    default_capacity: usize,
    entries: AtomicI64,
    size_gauge: Gauge,
}

impl std::fmt::Debug for PrefixIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixIndex")
            .field("shards", &self.shards.len())
            .field("default_capacity", &self.default_capacity)
            .field("entries", &self.len())
            .finish()
    }
}

impl PrefixIndex {
    pub fn new(config: PrefixIndexConfig) -> Self {
        let default_capacity = config
            .lru_capacity_per_endpoint
            .clamp(1, MAX_CAPACITY_PER_ENDPOINT);
        let mut shards = 1usize;
        while shards < MAX_SHARDS && default_capacity / (shards * 2) >= ENTRIES_PER_SHARD_TARGET {
            shards *= 2;
        }
        PrefixIndex {
            interner: RwLock::new(Interner::default()),
            shards: (0..shards).map(|_| RwLock::new(Shard::default())).collect(),
            shard_mask: shards as u64 - 1,
            default_capacity,
            entries: AtomicI64::new(0),
            size_gauge: Gauge::default(),
        }
    }

    /// The `inference_extension_prefix_indexer_size` gauge (total entries), kept current.
    pub fn size_gauge(&self) -> &Gauge {
        &self.size_gauge
    }

    /// Number of shards (1 when the default capacity is small, so LRU order is exact).
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn shard_of(&self, hash: u64) -> usize {
        // Middle bits: hashbrown uses the low bits for the bucket and the top 7 for tags.
        ((hash >> 32) & self.shard_mask) as usize
    }

    fn add_entries(&self, delta: i64) {
        if delta != 0 {
            self.entries.fetch_add(delta, Ordering::Relaxed);
            self.size_gauge.inc_by(delta);
        }
    }

    /// Total (hash, endpoint) entries.
    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed).max(0) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries currently held for `endpoint`.
    pub fn endpoint_len(&self, endpoint: &str) -> usize {
        let interner = self.interner.read();
        let Some(&ep) = interner.ids.get(endpoint) else {
            return 0;
        };
        self.shards
            .iter()
            .map(|s| {
                s.read()
                    .regions
                    .get(usize::from(ep))
                    .map_or(0, |r| r.nodes.len())
            })
            .sum()
    }

    /// LRU capacity in effect for `endpoint` (0 when it has never been recorded).
    pub fn endpoint_capacity(&self, endpoint: &str) -> usize {
        let interner = self.interner.read();
        interner
            .ids
            .get(endpoint)
            .and_then(|&ep| interner.slots.get(usize::from(ep)))
            .and_then(Option::as_ref)
            .map_or(0, |e| e.shard_caps.iter().map(|&c| usize::from(c)).sum())
    }

    /// For each endpoint in `endpoints`, how many of `hashes` it holds consecutively from the
    /// first; written to `out` (resized to `endpoints.len()`). Stops walking as soon as no
    /// endpoint can extend its run.
    pub fn match_prefix<'a, I>(&self, hashes: &[u64], endpoints: I, out: &mut Vec<usize>)
    where
        I: IntoIterator<Item = &'a str>,
        I::IntoIter: ExactSizeIterator,
    {
        let endpoints = endpoints.into_iter();
        out.clear();
        out.resize(endpoints.len(), 0);
        if hashes.is_empty() || out.is_empty() {
            return;
        }
        let interner = self.interner.read();
        // Endpoint id → candidate position (several candidates may share a name).
        let mut candidate_of: Vec<u32> = vec![u32::MAX; interner.slots.len()];
        let mut duplicates: Vec<(usize, usize)> = Vec::new();
        let mut any = false;
        for (i, name) in endpoints.enumerate() {
            if let Some(&ep) = interner.ids.get(name) {
                let slot = &mut candidate_of[usize::from(ep)];
                if *slot == u32::MAX {
                    *slot = i as u32;
                } else {
                    duplicates.push((*slot as usize, i));
                }
                any = true;
            }
        }
        if !any {
            return;
        }
        // Each shard's read lock is taken once, on first use, and held for the rest of the walk:
        // a lock per block cost two locked atomics, which also kept the CPU from overlapping one
        // block's cache misses with the next block's. `read_recursive` never waits behind a
        // queued writer while we hold other shards (writers hold one shard at a time and never
        // wait while holding it), so holding several cannot deadlock.
        let mut guards: [Option<RwLockReadGuard<'_, Shard>>; MAX_SHARDS] =
            [const { None }; MAX_SHARDS];
        for (depth, &hash) in hashes.iter().enumerate() {
            let s = self.shard_of(hash);
            let shard = guards[s].get_or_insert_with(|| self.shards[s].read_recursive());
            let mut advanced = false;
            for ep in shard.holders(hash) {
                if let Some(&c) = candidate_of.get(usize::from(ep)) {
                    if c != u32::MAX && out[c as usize] == depth {
                        out[c as usize] = depth + 1;
                        advanced = true;
                    }
                }
            }
            if !advanced {
                break;
            }
        }
        for (first, dup) in duplicates {
            out[dup] = out[first];
        }
    }

    /// Records that `endpoint` now holds every block of `hashes` (it was just routed the
    /// request). `capacity` sets the endpoint's LRU capacity the first time it is seen (the
    /// configured default when `None`); later values are ignored until it is removed.
    pub fn record(&self, hashes: &[u64], endpoint: &str, capacity: Option<usize>) {
        if hashes.is_empty() {
            return;
        }
        let Some((interner, ep)) = self.intern(endpoint, capacity) else {
            tracing::debug!(
                endpoint,
                "prefix index endpoint limit reached; not recording"
            );
            return;
        };
        let Some(Some(entry)) = interner.slots.get(usize::from(ep)) else {
            return;
        };
        // Hashes grouped by shard (a counting sort), each group last block first so the
        // prompt's head ends up most recently used; one pass instead of one per shard.
        let mut start = [0usize; MAX_SHARDS + 1];
        for &h in hashes {
            start[self.shard_of(h) + 1] += 1;
        }
        for s in 0..MAX_SHARDS {
            start[s + 1] += start[s];
        }
        let mut next = start;
        let mut grouped = vec![0u64; hashes.len()];
        for &h in hashes.iter().rev() {
            let slot = &mut next[self.shard_of(h)];
            grouped[*slot] = h;
            *slot += 1;
        }
        let mut delta = 0;
        for (s, lock) in self.shards.iter().enumerate() {
            let group = &grouped[start[s]..start[s + 1]];
            if group.is_empty() {
                continue;
            }
            let cap = entry.shard_caps.get(s).copied().unwrap_or(0);
            let mut shard = lock.write();
            for &h in group {
                delta += shard.touch(ep, h, cap);
            }
        }
        drop(interner);
        self.add_entries(delta);
    }

    /// Looks `endpoint` up, interning it on first sight. Returns the interner read guard (held
    /// while the caller writes shards, so `remove_endpoint` cannot recycle the id meanwhile).
    fn intern(
        &self,
        endpoint: &str,
        capacity: Option<usize>,
    ) -> Option<(parking_lot::RwLockReadGuard<'_, Interner>, u16)> {
        {
            let interner = self.interner.read();
            if let Some(&ep) = interner.ids.get(endpoint) {
                return Some((interner, ep));
            }
        }
        let guard = self.interner.upgradable_read();
        if let Some(&ep) = guard.ids.get(endpoint) {
            return Some((RwLockUpgradableReadGuard::downgrade(guard), ep));
        }
        let mut interner = RwLockUpgradableReadGuard::upgrade(guard);
        let ep = match interner.free.pop() {
            Some(ep) => ep,
            None if interner.slots.len() < MAX_ENDPOINTS => {
                interner.slots.push(None);
                (interner.slots.len() - 1) as u16
            }
            None => return None,
        };
        let total = capacity
            .unwrap_or(self.default_capacity)
            .clamp(1, MAX_CAPACITY_PER_ENDPOINT);
        let n = self.shards.len();
        let shard_caps: Box<[u16]> = (0..n)
            .map(|s| {
                let share = total / n + usize::from(s < total % n);
                share.min(MAX_NODES_PER_SHARD) as u16
            })
            .collect();
        let name: Box<str> = endpoint.into();
        interner.ids.insert(name.clone(), ep);
        interner.slots[usize::from(ep)] = Some(EndpointEntry { name, shard_caps });
        tracing::debug!(
            endpoint,
            id = ep,
            capacity = total,
            "prefix index tracks new endpoint"
        );
        Some((parking_lot::RwLockWriteGuard::downgrade(interner), ep))
    }

    /// Forgets everything about `endpoint` (it left the pool). Unknown names are ignored.
    pub fn remove_endpoint(&self, endpoint: &str) {
        let mut interner = self.interner.write();
        let Some(ep) = interner.ids.remove(endpoint) else {
            return;
        };
        let mut removed = 0;
        for lock in self.shards.iter() {
            removed += lock.write().remove(ep);
        }
        if let Some(slot) = interner.slots.get_mut(usize::from(ep)) {
            *slot = None;
        }
        interner.free.push(ep);
        drop(interner);
        self.add_entries(-removed);
        tracing::debug!(endpoint, removed, "prefix index forgot endpoint");
    }

    /// Names of the endpoints the index holds entries for (or has interned).
    pub fn endpoints(&self) -> Vec<String> {
        let interner = self.interner.read();
        interner
            .slots
            .iter()
            .flatten()
            .map(|e| e.name.to_string())
            .collect()
    }

    /// Checks internal consistency; returns a description of the first problem found.
    /// For tests: table slots ↔ nodes, LRU links, per-shard capacities, the entry counter.
    pub fn check_invariants(&self) -> Result<(), String> {
        let interner = self.interner.read();
        let mut total = 0usize;
        for (s, lock) in self.shards.iter().enumerate() {
            let shard = lock.read();
            let mut region_total = 0usize;
            for (ep, region) in shard.regions.iter().enumerate() {
                let n = region.nodes.len();
                if n == 0 {
                    continue;
                }
                let Some(Some(entry)) = interner.slots.get(ep) else {
                    return Err(format!("shard {s}: region for unknown endpoint {ep}"));
                };
                let cap = usize::from(entry.shard_caps.get(s).copied().unwrap_or(0));
                if n > cap {
                    return Err(format!(
                        "shard {s} endpoint {ep}: {n} entries > capacity {cap}"
                    ));
                }
                let (mut seen, mut cur, mut prev) = (0usize, region.head, NIL);
                while cur != NIL {
                    let node = region.nodes.get(usize::from(cur)).ok_or("dangling link")?;
                    if node.prev != prev {
                        return Err(format!("shard {s} endpoint {ep}: broken prev link"));
                    }
                    seen += 1;
                    if seen > n {
                        return Err(format!("shard {s} endpoint {ep}: LRU cycle"));
                    }
                    prev = cur;
                    cur = node.next;
                }
                if seen != n || region.tail != prev {
                    return Err(format!(
                        "shard {s} endpoint {ep}: LRU has {seen} of {n} nodes"
                    ));
                }
                region_total += n;
            }
            if shard.table.len() != region_total {
                return Err(format!(
                    "shard {s}: table has {} slots, regions {region_total} nodes",
                    shard.table.len()
                ));
            }
            for &v in shard.table.iter() {
                let h = node_hash(&shard.regions, v);
                if shard.table.find(h, |&w| w == v).is_none() {
                    return Err(format!("shard {s}: slot {v:#x} not findable by its hash"));
                }
            }
            total += region_total;
        }
        if total != self.len() {
            return Err(format!("counter {} != {} entries", self.len(), total));
        }
        Ok(())
    }
}

/// Convenience for callers that share one index.
pub type SharedPrefixIndex = Arc<PrefixIndex>;

mod block_hash;
#[cfg(test)]
mod tests;
