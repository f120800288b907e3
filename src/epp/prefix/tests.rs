//! Unit and property tests for the prefix hashing and index.

use super::*;
use proptest::prelude::*;
use xxhash_rust::xxh64::xxh64;

fn hashes(model: &str, prompt: &str, block_tokens: usize, max_blocks: usize) -> Vec<u64> {
    let mut out = Vec::new();
    hash_prompt(
        model.as_bytes(),
        b"",
        prompt.as_bytes(),
        block_tokens,
        max_blocks,
        &mut out,
    );
    out
}

fn index(cap: usize) -> PrefixIndex {
    PrefixIndex::new(PrefixIndexConfig {
        lru_capacity_per_endpoint: cap,
    })
}

fn matched(idx: &PrefixIndex, h: &[u64], eps: &[&str]) -> Vec<usize> {
    let mut out = Vec::new();
    idx.match_prefix(h, eps.iter().copied(), &mut out);
    out
}

#[test]
fn xxh64_library_matches_published_vectors() {
    assert_eq!(xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
    assert_eq!(xxh64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
}

#[test]
fn chaining_is_xxh64_of_block_then_le_previous() {
    let got = hashes("test-model1", "aaaabbbbcc", 1, 256);
    let h0 = xxh64(b"test-model1", 0);
    let mut buf = b"aaaa".to_vec();
    buf.extend_from_slice(&h0.to_le_bytes());
    let h1 = xxh64(&buf, 0);
    let mut buf = b"bbbb".to_vec();
    buf.extend_from_slice(&h1.to_le_bytes());
    let h2 = xxh64(&buf, 0);
    assert_eq!(got, vec![h1, h2]);
}

#[test]
fn cache_salt_is_appended_to_the_model_in_h0() {
    let mut salted = Vec::new();
    hash_prompt(b"m", b"salt", b"aaaa", 1, 256, &mut salted);
    let mut buf = b"aaaa".to_vec();
    buf.extend_from_slice(&xxh64(b"msalt", 0).to_le_bytes());
    assert_eq!(salted, vec![xxh64(&buf, 0)]);
    assert_ne!(salted, hashes("m", "aaaa", 1, 256));
}

#[test]
fn short_input_partial_block_and_block_cap() {
    assert!(hashes("m", "aaa", 1, 256).is_empty());
    assert_eq!(hashes("m", "aaaaaa", 1, 256).len(), 1);
    assert_eq!(hashes("m", "aaaabbbbccccdddd", 1, 2).len(), 2);
    assert_eq!(
        hashes("m", "aaaabbbbccccdddd", 1, 2),
        hashes("m", "aaaabbbb", 1, 256)
    );
    assert!(hashes("m", "aaaabbbb", 0, 256).is_empty());
    // 16 tokens × 4 = 64-byte blocks.
    assert_eq!(hashes("m", &"x".repeat(64 * 3 + 10), 16, 256).len(), 3);
    assert_ne!(hashes("m1", "aaaa", 1, 256), hashes("m2", "aaaa", 1, 256));
}

/// GIE `TestPrefixPluginCompletion`: "aaaaaa" routed to pod1, then "aaaabbbb".
#[test]
fn reference_test_vector() {
    let idx = index(31250);
    let first = hashes("test-model1", "aaaaaa", 1, 256);
    assert_eq!(first.len(), 1);
    idx.record(&first, "pod1", None);
    let second = hashes("test-model1", "aaaabbbb", 1, 256);
    assert_eq!(second.len(), 2);
    assert_eq!(
        matched(&idx, &second, &["pod1", "pod2", "pod3"]),
        vec![1, 0, 0]
    );
}

#[test]
fn lru_evicts_least_recent_at_capacity() {
    let idx = index(3);
    assert_eq!(idx.shard_count(), 1);
    let h: Vec<u64> = (1..=5).collect();
    // Recorded last-first: 1 is the most recent; capacity 3 keeps 1, 2, 3.
    idx.record(&h, "a", None);
    assert_eq!(idx.endpoint_len("a"), 3);
    assert_eq!(idx.len(), 3);
    for (hash, held) in [(1, 1), (2, 1), (3, 1), (4, 0), (5, 0)] {
        assert_eq!(matched(&idx, &[hash], &["a"]), vec![held], "hash {hash}");
    }
    // Touch 3 (now MRU), then add 9: the LRU entry (2) goes.
    idx.record(&[3], "a", None);
    idx.record(&[9], "a", None);
    for (hash, held) in [(1, 1), (2, 0), (3, 1), (9, 1)] {
        assert_eq!(matched(&idx, &[hash], &["a"]), vec![held], "hash {hash}");
    }
    assert_eq!(idx.len(), 3);
    idx.check_invariants().unwrap();
}

#[test]
fn eviction_only_drops_that_endpoint_from_the_hash() {
    let idx = index(1);
    idx.record(&[7], "a", None);
    idx.record(&[7], "b", None);
    idx.record(&[8], "a", None); // evicts (7, a) only
    assert_eq!(matched(&idx, &[7], &["a", "b"]), vec![0, 1]);
    assert_eq!(matched(&idx, &[8], &["a", "b"]), vec![1, 0]);
    assert_eq!(idx.len(), 2);
    idx.check_invariants().unwrap();
}

#[test]
fn match_counts_consecutive_blocks_and_stops_at_first_unknown() {
    let idx = index(100);
    idx.record(&[1, 2, 3], "a", None);
    idx.record(&[1, 2], "b", None);
    idx.record(&[5], "c", None);
    // 4 is unknown to everyone: the walk stops there even though c holds 5.
    assert_eq!(
        matched(&idx, &[1, 2, 3, 4, 5], &["a", "b", "c", "d"]),
        vec![3, 2, 0, 0]
    );
    // b holds 1 but not 9: its run ends at 1 even if it held a later block.
    idx.record(&[3], "b", None);
    assert_eq!(matched(&idx, &[1, 9, 3], &["a", "b"]), vec![1, 1]);
    // Duplicate names get the same count; unknown names 0.
    assert_eq!(matched(&idx, &[1, 2], &["a", "zz", "a"]), vec![2, 0, 2]);
    assert_eq!(matched(&idx, &[], &["a"]), vec![0]);
}

#[test]
fn capacity_hint_applies_on_first_sight_only() {
    let idx = index(100);
    idx.record(&[1], "a", Some(2));
    assert_eq!(idx.endpoint_capacity("a"), 2);
    idx.record(&[2, 3, 4], "a", Some(50));
    assert_eq!(idx.endpoint_capacity("a"), 2);
    assert_eq!(idx.endpoint_len("a"), 2);
    idx.remove_endpoint("a");
    idx.record(&[2, 3, 4], "a", Some(50));
    assert_eq!(idx.endpoint_capacity("a"), 50);
    assert_eq!(idx.endpoint_len("a"), 3);
}

#[test]
fn remove_endpoint_forgets_it_and_recycles_the_id() {
    let idx = index(100);
    idx.record(&[1, 2, 3], "a", None);
    idx.record(&[1, 2], "b", None);
    idx.remove_endpoint("a");
    idx.remove_endpoint("never-seen");
    assert_eq!(idx.len(), 2);
    assert_eq!(matched(&idx, &[1, 2, 3], &["a", "b"]), vec![0, 2]);
    assert_eq!(idx.size_gauge().get(), 2);
    idx.record(&[3], "c", None); // takes a's old id
    assert_eq!(matched(&idx, &[3], &["a", "c"]), vec![0, 1]);
    let mut names = idx.endpoints();
    names.sort();
    assert_eq!(names, vec!["b", "c"]);
    idx.check_invariants().unwrap();
}

#[test]
fn sharded_index_splits_capacity_exactly() {
    let idx = index(31250);
    assert_eq!(idx.shard_count(), 16);
    let h: Vec<u64> = (0..40_000u64).map(|i| xxh64(&i.to_le_bytes(), 0)).collect();
    idx.record(&h, "a", None);
    assert_eq!(idx.endpoint_capacity("a"), 31250);
    // Per-shard shares are ~1953; a few shards saturate slightly early.
    let held = idx.endpoint_len("a");
    assert!(held <= 31250 && held > 30_000, "held {held}");
    assert_eq!(idx.size_gauge().get() as usize, held);
    idx.check_invariants().unwrap();
}

#[test]
fn capacity_is_clamped_to_the_hard_maximum() {
    let idx = index(usize::MAX);
    assert_eq!(idx.shard_count(), MAX_SHARDS);
    idx.record(&[1], "a", Some(usize::MAX));
    assert_eq!(idx.endpoint_capacity("a"), MAX_CAPACITY_PER_ENDPOINT);
}

#[derive(Debug, Clone)]
enum Op {
    Record(u8, Vec<u8>),
    Remove(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, prop::collection::vec(0u8..24, 0..12)).prop_map(|(e, h)| Op::Record(e, h)),
        1 => (0u8..4).prop_map(Op::Remove),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Capacity is never exceeded; entry count == sum of LRU lengths; the index agrees with a
    /// simple model of per-endpoint LRU lists.
    #[test]
    fn index_matches_lru_model(cap in 1usize..6, ops in prop::collection::vec(op(), 1..40)) {
        let idx = index(cap);
        let mut model: Vec<Vec<u64>> = vec![Vec::new(); 4]; // front = most recent
        for op in ops {
            match op {
                Op::Record(e, hs) => {
                    let hs: Vec<u64> = hs.into_iter().map(u64::from).collect();
                    idx.record(&hs, &format!("ep{e}"), None);
                    let lru = &mut model[usize::from(e)];
                    for &h in hs.iter().rev() {
                        lru.retain(|&x| x != h);
                        lru.insert(0, h);
                        lru.truncate(cap);
                    }
                }
                Op::Remove(e) => {
                    idx.remove_endpoint(&format!("ep{e}"));
                    model[usize::from(e)].clear();
                }
            }
            prop_assert!(idx.check_invariants().is_ok(), "{:?}", idx.check_invariants());
            let mut sum = 0;
            for (e, lru) in model.iter().enumerate() {
                let name = format!("ep{e}");
                prop_assert!(idx.endpoint_len(&name) <= cap);
                prop_assert_eq!(idx.endpoint_len(&name), lru.len());
                sum += lru.len();
                for h in 0u64..24 {
                    let held = matched(&idx, &[h], &[name.as_str()])[0];
                    prop_assert_eq!(held == 1, lru.contains(&h));
                }
            }
            prop_assert_eq!(idx.len(), sum);
        }
    }
}

#[test]
fn capacity_below_shard_count_is_still_a_hard_cap() {
    let idx = index(31250);
    let h: Vec<u64> = (0..1000u64).map(|i| xxh64(&i.to_le_bytes(), 0)).collect();
    idx.record(&h, "tiny", Some(3));
    assert_eq!(idx.endpoint_capacity("tiny"), 3);
    assert_eq!(idx.endpoint_len("tiny"), 3);
    idx.check_invariants().unwrap();
}

#[test]
fn concurrent_record_match_and_remove_keep_the_index_consistent() {
    let idx = Arc::new(index(4096)); // 4 shards of 1024
    assert_eq!(idx.shard_count(), 4);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let idx = idx.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for i in 0..300u64 {
                    let h: Vec<u64> = (0..32)
                        .map(|b| xxh64(&(i % 40 * 64 + b).to_le_bytes(), 0))
                        .collect();
                    let name = format!("ep{}", (i + t) % 6);
                    idx.record(&h, &name, Some(200));
                    idx.match_prefix(&h, ["ep0", "ep1", "ep2", "ep3"], &mut out);
                    if i % 50 == 49 {
                        idx.remove_endpoint(&format!("ep{}", t % 6));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    idx.check_invariants().unwrap();
    for e in 0..6 {
        assert!(idx.endpoint_len(&format!("ep{e}")) <= 200);
    }
}
