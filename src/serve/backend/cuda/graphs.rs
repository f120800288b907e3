//! CUDA-graph planning for decode steps (`--cuda-graphs`): which batch-size buckets are
//! captured, which bucket and attention layout a step replays, and the bound on how many
//! graphs are kept. Pure arithmetic, unit-tested without a GPU; the capture and replay live in
//! `runtime/graph.rs`.
//!
//! A graph freezes every kernel argument and grid, so a replayed step must look the same as
//! the captured one: the batch is padded to its bucket (padding rows attend to 0 keys, write
//! no cache slot and produce logits nobody reads), block tables use a fixed row stride (the
//! longest context's block count), and the attention launch covers a *partition bucket* — the
//! partition count rounded up to a power of two — whose extra partitions exit at once because
//! each row reads its own key count on the device. Only decode steps (one new token per
//! sequence) replay; prefill and mixed steps run eagerly.

use super::launch::{choose_partition_size, PARTITION_SIZE};

/// Most graphs kept at once; a step whose key is new when the cache is full runs eagerly
/// (bounded device memory; a long-running server sees few distinct keys: buckets × partition
/// sizes × log₂ of the context).
pub const MAX_GRAPHS: usize = 256;

/// Batch sizes graphs are captured for: 1, 2, 4, then every multiple of 8 (vLLM's
/// `cudagraph_capture_sizes` rule), up to `max_rows`, which is always included so every
/// decode batch the engine can form has a bucket.
pub fn capture_sizes(max_rows: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = [1, 2, 4]
        .into_iter()
        .chain((8..=max_rows).step_by(8))
        .filter(|&s| s <= max_rows)
        .collect();
    if max_rows > 0 && sizes.last() != Some(&max_rows) {
        sizes.push(max_rows);
    }
    sizes
}

/// The smallest bucket holding `rows` rows (`sizes` ascending), if any.
pub fn bucket_for(rows: usize, sizes: &[usize]) -> Option<usize> {
    if rows == 0 {
        return None;
    }
    sizes.iter().copied().find(|&s| s >= rows)
}

/// What a captured graph is specialised to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GraphKey {
    /// Padded batch (query rows = sequences = logits rows).
    pub rows: usize,
    /// Split-K partition size of the attention launch.
    pub partition_size: usize,
    /// Partitions the launch covers (grid z, and the partial buffers' stride).
    pub num_partitions: usize,
}

/// Device facts the choice depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphLimits {
    pub num_kv_heads: usize,
    pub sm_count: usize,
    /// (row × partition) units of the partial buffers (`memory::partial_capacity`).
    pub partial_capacity: usize,
    /// Longest context (`--max-model-len`).
    pub max_model_len: usize,
}

/// The graph a decode step of `rows` sequences whose longest attends to `max_keys` keys
/// replays, or `None` to run it eagerly (no bucket, or the bucket's partials would not fit).
pub fn graph_key(
    rows: usize,
    max_keys: usize,
    sizes: &[usize],
    lim: &GraphLimits,
) -> Option<GraphKey> {
    let bucket = bucket_for(rows, sizes)?;
    if max_keys == 0 || max_keys > lim.max_model_len {
        return None;
    }
    let partition_size = choose_partition_size(
        lim.num_kv_heads,
        bucket,
        max_keys,
        lim.sm_count,
        lim.partial_capacity,
    );
    let needed = max_keys.div_ceil(partition_size);
    // Round up to a power of two so a growing context re-captures log₂ times, not once per
    // partition — but never beyond the longest context.
    let most = lim.max_model_len.div_ceil(partition_size).max(needed);
    let num_partitions = needed.next_power_of_two().min(most);
    if num_partitions > 1 && bucket * num_partitions > lim.partial_capacity {
        return None;
    }
    debug_assert!(partition_size <= PARTITION_SIZE);
    Some(GraphKey {
        rows: bucket,
        partition_size,
        num_partitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_sizes_follow_vllm() {
        assert_eq!(capture_sizes(1), vec![1]);
        assert_eq!(capture_sizes(5), vec![1, 2, 4, 5]);
        assert_eq!(capture_sizes(8), vec![1, 2, 4, 8]);
        assert_eq!(capture_sizes(20), vec![1, 2, 4, 8, 16, 20]);
        let s = capture_sizes(256);
        assert_eq!(s.len(), 3 + 32);
        assert_eq!(&s[..5], &[1, 2, 4, 8, 16]);
        assert_eq!(s.last(), Some(&256));
        assert!(capture_sizes(0).is_empty());
    }

    #[test]
    fn bucket_is_the_smallest_that_fits() {
        let s = capture_sizes(64);
        let got: Vec<Option<usize>> = [0, 1, 2, 3, 4, 5, 8, 9, 17, 63, 64, 65]
            .iter()
            .map(|&r| bucket_for(r, &s))
            .collect();
        assert_eq!(
            got,
            vec![
                None,
                Some(1),
                Some(2),
                Some(4),
                Some(4),
                Some(8),
                Some(8),
                Some(16),
                Some(24),
                Some(64),
                Some(64),
                None
            ]
        );
    }

    #[test]
    fn keys_by_batch_and_context() {
        // Qwen2.5-7B on an H100 (4 KV heads, 132 SMs), 32k context.
        let lim = GraphLimits {
            num_kv_heads: 4,
            sm_count: 132,
            partial_capacity: 4609,
            max_model_len: 32_768,
        };
        let s = capture_sizes(256);
        let key = |rows, keys| graph_key(rows, keys, &s, &lim);
        let k = |rows, partition_size, num_partitions| {
            Some(GraphKey {
                rows,
                partition_size,
                num_partitions,
            })
        };
        // Batch 1: split-K with 64-key partitions at 512 keys (8), rounded partition counts.
        assert_eq!(key(1, 512), k(1, 64, 8));
        assert_eq!(key(1, 513), k(1, 64, 16));
        assert_eq!(key(1, 600), k(1, 64, 16));
        // 8192 keys: 128-key partitions, 64 of them.
        assert_eq!(key(1, 8192), k(1, 128, 64));
        // Contexts 1 … 512 at batch 1 share few graphs: 1 key → single pass (512, 1).
        assert_eq!(key(1, 1), k(1, 512, 1));
        // Batch 3 pads to 4; 64 rows × 2048 keys keep 512-key partitions.
        assert_eq!(key(3, 2048), k(4, 128, 16));
        assert_eq!(key(64, 2048), k(64, 512, 4));
        assert_eq!(key(64, 300), k(64, 512, 1));
        // Distinct keys over a batch-1 generation from 1 to 32k tokens: a handful, not 32k.
        let mut seen: Vec<GraphKey> = (1..=32_768).filter_map(|n| key(1, n)).collect();
        seen.sort();
        seen.dedup();
        assert!(seen.len() <= 32, "{} graphs", seen.len());
        assert_eq!(key(257, 100), None);
        assert_eq!(key(1, 0), None);
        assert_eq!(key(1, 40_000), None);
        // Partials that cannot hold a bucket's rows × partitions run eagerly.
        let tight = GraphLimits {
            partial_capacity: 64,
            ..lim
        };
        assert_eq!(graph_key(64, 2048, &s, &tight), None);
        assert_eq!(graph_key(16, 2048, &s, &tight), k(16, 512, 4));
    }
}
