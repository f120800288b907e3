//! Prefix index memory per (hash, endpoint) entry, measured with a counting global allocator:
//! fills the index to N entries (N/31,250 endpoints at the default capacity, plus an
//! at-capacity run where every endpoint's LRU keeps evicting) and prints live heap bytes per
//! entry. Target: ≤ 32 bytes (the reference uses 60–70).
//!
//! Run: `cargo bench --bench prefix_memory`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use switchyard::epp::prefix::{PrefixIndex, PrefixIndexConfig};
use xxhash_rust::xxh64::xxh64;

/// Live heap bytes of the whole process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees hold; the counter is only bookkeeping.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (i.e. `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is; `ptr`/`layout` describe a block from `System`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CAPACITY: usize = 31_250;
const BLOCKS_PER_REQUEST: u64 = 256;

/// Routes `requests` distinct 256-block prompts round-robin over `endpoints`; returns
/// (entries, bytes per entry).
fn fill(endpoints: usize, requests: u64) -> (usize, f64) {
    let before = LIVE.load(Ordering::Relaxed);
    let index = PrefixIndex::new(PrefixIndexConfig {
        lru_capacity_per_endpoint: CAPACITY,
    });
    let names: Vec<String> = (0..endpoints).map(|i| format!("pod-{i}-rank-0")).collect();
    let mut hashes = Vec::with_capacity(BLOCKS_PER_REQUEST as usize);
    for r in 0..requests {
        hashes.clear();
        hashes.extend(
            (0..BLOCKS_PER_REQUEST).map(|b| xxh64(&(r * BLOCKS_PER_REQUEST + b).to_le_bytes(), 0)),
        );
        index.record(&hashes, &names[(r as usize) % endpoints], None);
    }
    drop(hashes);
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    let entries = index.len();
    drop(index);
    (entries, bytes as f64 / entries.max(1) as f64)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    println!("prefix index memory (capacity {CAPACITY} per endpoint, 256-block requests)");
    println!(
        "{:>10} {:>12} {:>12} {:>14}",
        "endpoints", "requests", "entries", "bytes/entry"
    );
    for (endpoints, requests) in [
        (1usize, 60u64), // 15,360 entries, below capacity
        (1, 123),        // exactly at capacity (31,488 recorded, 31,250 kept)
        (4, 1_000),      // at capacity, evicting
        (16, 2_000),     // 500,000 entries: 16 × 31,250
        (64, 8_000),     // 2,000,000 entries
    ] {
        let (entries, per) = fill(endpoints, requests);
        println!("{endpoints:>10} {requests:>12} {entries:>12} {per:>14.1}");
    }
}
