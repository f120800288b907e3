//! Live-heap accounting for the prefix index memory bound, shared by `benches/prefix_memory.rs`
//! (the table) and `tests/prefix_memory.rs` (the ≤ 32 B assertion): a counting global allocator
//! and a fill of the index with distinct 256-block prompts.

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

pub const CAPACITY: usize = 31_250;
pub const BLOCKS_PER_REQUEST: u64 = 256;

/// Routes `requests` distinct 256-block prompts round-robin over `endpoints`; returns
/// (entries, bytes per entry). Counts every live heap byte of the process, so call it while no
/// other thread allocates.
pub fn fill(endpoints: usize, requests: u64) -> (usize, f64) {
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
