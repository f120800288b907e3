//! Prefix index memory per (hash, endpoint) entry, measured with a counting global allocator:
//! fills the index to N entries (N/31,250 endpoints at the default capacity, plus an
//! at-capacity run where every endpoint's LRU keeps evicting) and prints live heap bytes per
//! entry. Target: ≤ 32 bytes (the reference uses 60–70); the bench fails if a row exceeds it
//! (and `tests/prefix_memory.rs` checks the same bound under `cargo test`).
//!
//! Run: `cargo bench --bench prefix_memory`.

#[path = "../tests/support/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::{fill, CAPACITY};

/// The README's target for bytes per (hash, endpoint) entry.
const TARGET_BYTES_PER_ENTRY: f64 = 32.0;

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
        assert!(
            per <= TARGET_BYTES_PER_ENTRY,
            "{per:.1} bytes per entry with {endpoints} endpoints: over the {TARGET_BYTES_PER_ENTRY} B target"
        );
    }
    println!("every row within the {TARGET_BYTES_PER_ENTRY} B per entry target");
}
