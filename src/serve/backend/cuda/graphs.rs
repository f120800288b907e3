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
use super::pack::PackedBatch;
use super::CudaError;

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

/// Rows of a packed step if it is a decode step a graph can replay: one row per sequence, in
/// sequence order, each row's logits wanted in row order.
pub fn decode_rows(p: &PackedBatch) -> Option<usize> {
    let rows = p.token_ids.len();
    let decode = rows > 0
        && p.row_seq.len() == rows
        && p.logits_rows.len() == rows
        && p.row_seq.iter().enumerate().all(|(i, &s)| s as usize == i)
        && p.logits_rows
            .iter()
            .enumerate()
            .all(|(i, &r)| r as usize == i);
    decode.then_some(rows)
}

/// Host arrays of a decode step padded to its graph bucket (reused between steps).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PaddedStep {
    pub token_ids: Vec<u32>,
    pub positions: Vec<i32>,
    pub slots: Vec<i32>,
    pub row_seq: Vec<i32>,
    pub row_keys: Vec<i32>,
    pub logits_rows: Vec<i32>,
    /// `[rows of the step, stride]`: each sequence's block table at the fixed graph stride
    /// (only the real rows: padding rows read no keys, so no table).
    pub tables: Vec<i32>,
}

impl PaddedStep {
    /// Fills from decode step `p` padded to `rows` rows: padding rows are token 0 at position
    /// 0 with no cache slot (−1) and 0 keys, read sequence 0's table (never dereferenced), and
    /// every row's logits are computed (rows 0..`rows`; the caller copies out the real ones).
    pub fn fill(&mut self, p: &PackedBatch, rows: usize, stride: usize) -> Result<(), CudaError> {
        let n = p.token_ids.len();
        if n > rows || p.max_blocks > stride || p.block_tables.len() != n * p.max_blocks {
            return Err(CudaError::Launch(format!(
                "decode step of {n} rows (table width {}) does not fit a {rows}-row graph of \
                 stride {stride}",
                p.max_blocks
            )));
        }
        let pad = |v: &mut Vec<i32>, src: &[i32], fill: i32| {
            v.clear();
            v.extend_from_slice(src);
            v.resize(rows, fill);
        };
        self.token_ids.clear();
        self.token_ids.extend_from_slice(&p.token_ids);
        self.token_ids.resize(rows, 0);
        pad(&mut self.positions, &p.positions, 0);
        pad(&mut self.slots, &p.slot_mapping, -1);
        pad(&mut self.row_seq, &p.row_seq, 0);
        pad(&mut self.row_keys, &p.row_keys, 0);
        self.logits_rows.clear();
        self.logits_rows.extend(0..rows as i32);
        self.tables.clear();
        self.tables.resize(n * stride, 0);
        if p.max_blocks > 0 {
            for (dst, src) in self
                .tables
                .chunks_exact_mut(stride)
                .zip(p.block_tables.chunks_exact(p.max_blocks))
            {
                dst[..p.max_blocks].copy_from_slice(src);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_step(tables: &[&[i32]], keys: &[i32]) -> PackedBatch {
        let n = keys.len();
        let max_blocks = tables.iter().map(|t| t.len()).max().unwrap_or(0);
        PackedBatch {
            token_ids: (0..n as u32).map(|i| 100 + i).collect(),
            positions: keys.iter().map(|k| k - 1).collect(),
            slot_mapping: (0..n as i32).map(|i| 1000 + i).collect(),
            row_seq: (0..n as i32).collect(),
            row_keys: keys.to_vec(),
            block_tables: tables
                .iter()
                .flat_map(|t| {
                    let mut row = t.to_vec();
                    row.resize(max_blocks, 0);
                    row
                })
                .collect(),
            max_blocks,
            max_keys: keys.iter().copied().max().unwrap_or(0) as usize,
            logits_rows: (0..n as i32).collect(),
        }
    }

    #[test]
    fn padding_a_decode_step_to_its_bucket() {
        let p = decode_step(&[&[7, 3], &[9], &[4, 5, 6]], &[20, 5, 40]);
        assert_eq!(decode_rows(&p), Some(3));
        let mut s = PaddedStep::default();
        s.fill(&p, 4, 5).unwrap();
        assert_eq!(s.token_ids, vec![100, 101, 102, 0]);
        assert_eq!(s.positions, vec![19, 4, 39, 0]);
        assert_eq!(s.slots, vec![1000, 1001, 1002, -1]);
        assert_eq!(s.row_seq, vec![0, 1, 2, 0]);
        assert_eq!(s.row_keys, vec![20, 5, 40, 0]);
        assert_eq!(s.logits_rows, vec![0, 1, 2, 3]);
        assert_eq!(s.tables, vec![7, 3, 0, 0, 0, 9, 0, 0, 0, 0, 4, 5, 6, 0, 0]);
        // Reuse shrinks and regrows cleanly.
        let q = decode_step(&[&[1]], &[3]);
        s.fill(&q, 1, 5).unwrap();
        assert_eq!(
            (s.token_ids.len(), &s.tables[..]),
            (1, &[1, 0, 0, 0, 0][..])
        );
        // Too many rows or too wide a table is an error, not an out-of-bounds write.
        assert!(s.fill(&p, 2, 5).is_err());
        assert!(s.fill(&p, 4, 2).is_err());
    }

    #[test]
    fn only_decode_steps_replay() {
        let mut p = decode_step(&[&[1], &[2]], &[3, 4]);
        assert_eq!(decode_rows(&p), Some(2));
        // A prefill chunk (two rows of one sequence) is not a decode step.
        p.row_seq = vec![0, 0];
        assert_eq!(decode_rows(&p), None);
        // Logits wanted for only one of two sequences: not a decode step either.
        let mut p = decode_step(&[&[1], &[2]], &[3, 4]);
        p.logits_rows = vec![1];
        assert_eq!(decode_rows(&p), None);
        assert_eq!(decode_rows(&PackedBatch::default()), None);
    }

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
