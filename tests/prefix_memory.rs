//! The prefix index's memory bound under `cargo test`: at most 32 live heap bytes per (block
//! hash, endpoint) entry, below capacity and at capacity with every endpoint's LRU evicting
//! (README "Performance"; `cargo bench --bench prefix_memory` prints the full table). One test
//! only: the counting allocator sees every thread's allocations.

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::{fill, BLOCKS_PER_REQUEST, CAPACITY};

const TARGET_BYTES_PER_ENTRY: f64 = 32.0;

#[test]
fn prefix_index_stays_within_32_bytes_per_entry() {
    for (endpoints, requests) in [(1usize, 60u64), (4, 500)] {
        let (entries, per) = fill(endpoints, requests);
        // Filled as intended: below capacity every block is kept; at capacity each endpoint's
        // LRU is full (per-shard capacities round down, so a few entries short of it).
        let recorded = requests * BLOCKS_PER_REQUEST;
        let capacity = (endpoints * CAPACITY) as u64;
        if recorded <= capacity {
            assert_eq!(entries as u64, recorded, "{endpoints} endpoints");
        } else {
            assert!(
                (capacity * 99 / 100..=capacity).contains(&(entries as u64)),
                "{endpoints} endpoints: {entries} entries, capacity {capacity}"
            );
        }
        assert!(
            per <= TARGET_BYTES_PER_ENTRY,
            "{per:.1} bytes per entry with {endpoints} endpoints ({entries} entries): over the {TARGET_BYTES_PER_ENTRY} B target"
        );
        println!("{endpoints} endpoints, {entries} entries: {per:.1} B per entry");
    }
}
