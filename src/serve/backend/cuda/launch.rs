//! Host-side launch geometry of the CUDA kernels: grid/block shapes, flash-decoding partition
//! counts and dynamic shared-memory sizes. Pure arithmetic, so it is unit-tested on machines
//! without a GPU; the kernels in `kernels/*.cu` index exactly the way these numbers assume.

use super::CudaError;

/// Largest keys per flash-decoding partition (REFERENCE.md §6: 512-token partitions); the
/// kernel's static block-id table is sized for it.
pub const PARTITION_SIZE: usize = 512;
/// Smallest split-K partition: below 64 keys a 256-thread block would idle most threads in Q·K
/// and the partial outputs (one f32 row per query head) outweigh the K/V they summarise.
pub const MIN_PARTITION_SIZE: usize = 64;
/// Split-K stops shrinking partitions once a launch has this many blocks per SM (one full wave;
/// `__launch_bounds__(256, 3)` lets up to three share an SM). To be tuned on a GPU:
/// `benches/cuda_decode.rs` sweeps every partition size at batch 1.
pub const SPLIT_TARGET_BLOCKS_PER_SM: usize = 1;
/// Warps (output channels) per GEMV block.
pub const GEMV_WARPS: usize = 8;
/// Most token rows one GEMV launch serves (each lane keeps one accumulator per row); larger
/// batches go to cuBLAS.
pub const GEMV_MAX_ROWS: usize = 8;
/// Threads per attention thread block (8 warps). A block serves a whole GQA group, so at small
/// batches there are few blocks; 256 threads halve each thread's serial share of the keys
/// (measured on an H100: batch 1 × 512 keys went from 52 µs at 128 threads).
pub const ATTN_THREADS: usize = 256;
pub const WARP_SIZE: usize = 32;
/// Threads per row of the row-wise kernels (RMSNorm, embedding, SiLU-and-mul, residual add).
pub const ROW_THREADS: usize = 256;
/// Head sizes the kernels are compiled for (Qwen2.5 0.5B–72B all use 64 or 128).
pub const SUPPORTED_HEAD_SIZES: [usize; 2] = [64, 128];
/// Most query heads per KV head one attention block serves (Qwen2.5: 5–8; the kernel keeps
/// one accumulator per head in registers).
pub const MAX_GROUP: usize = 8;
/// Shared memory every CUDA device since sm_70 grants a block without opting in.
pub const DEFAULT_SHARED_MEM_LIMIT: usize = 48 * 1024;

/// A kernel launch shape (mirrors `cudarc::driver::LaunchConfig`, kept separate so this
/// module does not depend on a loaded driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

/// Shape of one attention launch over a ragged batch of query rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_size: usize,
    /// Query rows (decode: one per sequence; prefill: one per new token).
    pub num_rows: usize,
    /// Most keys any row attends to (context + position in the chunk + 1).
    pub max_keys: usize,
}

/// How an attention launch is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionPlan {
    /// Keys per partition (the kernels' `partition_size` argument).
    pub partition_size: usize,
    /// Logits each head keeps in shared memory (the kernel's `logits_len` argument).
    pub logits_len: usize,
    /// Partitions per row; 1 means the single-pass kernel writes the output directly.
    pub num_partitions: usize,
    /// Heads sharing one KV head.
    pub group_size: usize,
    /// Thread groups that split the keys when accumulating V (threads / head_size).
    pub v_groups: usize,
    pub main: Launch,
    /// The reduction launch, present only when `num_partitions > 1`.
    pub reduce: Option<Launch>,
}

impl AttentionPlan {
    /// Elements of the f32 partial-output buffer `[rows, heads, partitions, head_size]`.
    pub fn partial_out_len(&self, shape: &AttentionShape) -> usize {
        shape.num_rows * shape.num_heads * self.num_partitions * shape.head_size
    }

    /// Elements of each of the max-logit and exp-sum buffers `[rows, heads, partitions]`.
    pub fn partial_stats_len(&self, shape: &AttentionShape) -> usize {
        shape.num_rows * shape.num_heads * self.num_partitions
    }
}

/// Dynamic shared memory of the attention kernel (one block per KV head): the partition's
/// logits for each of the `group` query heads (each row padded to 4 floats for 16-byte reads),
/// one reduction slot per warp, each head's max and exp-sum (`MAX_GROUP` slots each), and per
/// head `v_groups × head_size = ATTN_THREADS` f32 partial outputs (Q is staged in that area
/// first; it needs `group × head_size` ≤ that).
pub fn attention_shared_bytes(partition: usize, group: usize) -> usize {
    let warps = ATTN_THREADS / WARP_SIZE;
    4 * (group * partition.next_multiple_of(4) + warps + 2 * MAX_GROUP + group * ATTN_THREADS)
}

/// Static shared memory of the attention kernel: the partition's block ids.
pub const ATTENTION_STATIC_SHARED_BYTES: usize = 4 * (PARTITION_SIZE + 1);

/// Shared memory of the reduction kernel: each partition's max logit and rescaled exp-sum.
pub fn reduce_shared_bytes(num_partitions: usize) -> usize {
    4 * 2 * num_partitions
}

/// Split-K partition size for a launch: the largest of 512, 256, 128, 64 keys that gives at
/// least `SPLIT_TARGET_BLOCKS_PER_SM × sm_count` blocks (KV heads × rows × partitions), so a
/// short batch (decode at batch 1: 4–8 blocks at 512 keys) spreads its context over every SM
/// instead of leaving most idle. Halving stops when `rows × partitions` would exceed
/// `partial_capacity` (the workspace's partial buffers, `memory::partial_capacity`). Of sizes
/// giving the same partition count (a context shorter than the partition) the largest wins,
/// so an unsplit launch always reads as 512.
pub fn choose_partition_size(
    num_kv_heads: usize,
    num_rows: usize,
    max_keys: usize,
    sm_count: usize,
    partial_capacity: usize,
) -> usize {
    let target = SPLIT_TARGET_BLOCKS_PER_SM * sm_count;
    let parts = |p: usize| max_keys.div_ceil(p);
    let mut p = PARTITION_SIZE;
    while p > MIN_PARTITION_SIZE
        && num_kv_heads * num_rows * parts(p) < target
        && num_rows * parts(p / 2) <= partial_capacity
    {
        p /= 2;
    }
    while p < PARTITION_SIZE && parts(2 * p) == parts(p) {
        p *= 2;
    }
    p
}

/// Plans an attention launch with 512-key partitions (the large-batch layout).
pub fn plan_attention(shape: &AttentionShape) -> Result<AttentionPlan, CudaError> {
    plan_attention_split(shape, PARTITION_SIZE)
}

/// Plans an attention launch with `partition_size`-key partitions: single pass when every row
/// fits one partition; otherwise the flash-decoding split with one reduction block per
/// (row, head).
pub fn plan_attention_split(
    shape: &AttentionShape,
    partition_size: usize,
) -> Result<AttentionPlan, CudaError> {
    if !(MIN_PARTITION_SIZE..=PARTITION_SIZE).contains(&partition_size)
        || !partition_size.is_multiple_of(MIN_PARTITION_SIZE)
    {
        return Err(CudaError::Launch(format!(
            "partition size {partition_size} (must be a multiple of {MIN_PARTITION_SIZE} up to \
             {PARTITION_SIZE})"
        )));
    }
    if !SUPPORTED_HEAD_SIZES.contains(&shape.head_size) {
        return Err(CudaError::Unsupported(format!(
            "head size {} (kernels support {:?})",
            shape.head_size, SUPPORTED_HEAD_SIZES
        )));
    }
    if shape.num_kv_heads == 0 || !shape.num_heads.is_multiple_of(shape.num_kv_heads) {
        return Err(CudaError::Unsupported(format!(
            "{} attention heads over {} KV heads (must divide evenly)",
            shape.num_heads, shape.num_kv_heads
        )));
    }
    let group = shape.num_heads / shape.num_kv_heads;
    if group > MAX_GROUP {
        return Err(CudaError::Unsupported(format!(
            "{group} attention heads per KV head (kernels support up to {MAX_GROUP})"
        )));
    }
    if shape.num_rows == 0 || shape.max_keys == 0 {
        return Err(CudaError::Launch(
            "attention launch with no rows or no keys".into(),
        ));
    }
    let num_partitions = shape.max_keys.div_ceil(partition_size);
    let grid_y = u32::try_from(shape.num_rows)
        .ok()
        .filter(|&y| y <= 65_535)
        .ok_or_else(|| {
            CudaError::Launch(format!("{} query rows exceed grid.y 65535", shape.num_rows))
        })?;
    // Single pass only needs room for the keys actually present, so short contexts use less
    // shared memory (and fit more blocks per SM) than a full partition.
    let logits_len = shape.max_keys.min(partition_size);
    let main = Launch {
        grid: (shape.num_kv_heads as u32, grid_y, num_partitions as u32),
        block: (ATTN_THREADS as u32, 1, 1),
        shared_mem_bytes: attention_shared_bytes(logits_len, group) as u32,
    };
    let reduce = (num_partitions > 1).then(|| Launch {
        grid: (shape.num_heads as u32, grid_y, 1),
        block: (shape.head_size as u32, 1, 1),
        shared_mem_bytes: reduce_shared_bytes(num_partitions) as u32,
    });
    if reduce.map_or(0, |r| r.shared_mem_bytes as usize) > DEFAULT_SHARED_MEM_LIMIT {
        return Err(CudaError::Launch(format!(
            "{} keys need {num_partitions} partitions, beyond the reduction kernel's shared memory",
            shape.max_keys
        )));
    }
    Ok(AttentionPlan {
        partition_size,
        logits_len,
        num_partitions,
        group_size: group,
        v_groups: ATTN_THREADS / shape.head_size,
        main,
        reduce,
    })
}

/// GEMV over `rows ≤ GEMV_MAX_ROWS` token rows of an `[n, k]` weight: one warp per output
/// channel. `k` must be a multiple of 16 (one 16-byte chunk of FP8 codes per lane step).
pub fn gemv_launch(n: usize, k: usize, rows: usize) -> Result<Launch, CudaError> {
    if rows == 0 || rows > GEMV_MAX_ROWS {
        return Err(CudaError::Launch(format!(
            "GEMV over {rows} rows (1..={GEMV_MAX_ROWS})"
        )));
    }
    if k == 0 || !k.is_multiple_of(16) || i32::try_from(k).is_err() {
        return Err(CudaError::Unsupported(format!(
            "GEMV inner dimension {k} (must be a positive multiple of 16)"
        )));
    }
    let grid = u32::try_from(n.div_ceil(GEMV_WARPS))
        .ok()
        .filter(|&g| (1..=i32::MAX as u32).contains(&g))
        .ok_or_else(|| CudaError::Launch(format!("GEMV over {n} outputs")))?;
    Ok(Launch {
        grid: (grid, 1, 1),
        block: ((GEMV_WARPS * WARP_SIZE) as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One block per row, `ROW_THREADS` threads striding over the row.
pub fn row_launch(rows: usize) -> Result<Launch, CudaError> {
    let grid = u32::try_from(rows)
        .ok()
        .filter(|&g| (1..=i32::MAX as u32).contains(&g))
        .ok_or_else(|| CudaError::Launch(format!("row kernel over {rows} rows")))?;
    Ok(Launch {
        grid: (grid, 1, 1),
        block: (ROW_THREADS as u32, 1, 1),
        // One f32 per warp for the block reduction of RMSNorm.
        shared_mem_bytes: (4 * ROW_THREADS / WARP_SIZE) as u32,
    })
}

/// Enough 256-thread blocks to cover `n` elements, one element per thread.
pub fn elementwise_launch(n: usize) -> Result<Launch, CudaError> {
    let blocks = n.div_ceil(ROW_THREADS);
    let grid = u32::try_from(blocks)
        .ok()
        .filter(|&g| g >= 1)
        .ok_or_else(|| CudaError::Launch(format!("elementwise kernel over {n} elements")))?;
    Ok(Launch {
        grid: (grid, 1, 1),
        block: (ROW_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Reshape-and-cache: one block per new token, one thread per (kv head, dim) pair.
pub fn cache_write_launch(
    num_tokens: usize,
    num_kv_heads: usize,
    head_size: usize,
) -> Result<Launch, CudaError> {
    let threads = (num_kv_heads * head_size).min(1024);
    let grid = u32::try_from(num_tokens)
        .ok()
        .filter(|&g| g >= 1)
        .ok_or_else(|| CudaError::Launch(format!("cache write over {num_tokens} tokens")))?;
    Ok(Launch {
        grid: (grid, 1, 1),
        block: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5 attention shapes: (name, heads, kv heads, head size).
    const QWEN: [(&str, usize, usize, usize); 3] =
        [("0.5B", 14, 2, 64), ("7B", 28, 4, 128), ("14B", 40, 8, 128)];

    fn shape(h: usize, kv: usize, d: usize, rows: usize, keys: usize) -> AttentionShape {
        AttentionShape {
            num_heads: h,
            num_kv_heads: kv,
            head_size: d,
            num_rows: rows,
            max_keys: keys,
        }
    }

    #[test]
    fn qwen_gqa_ratios() {
        let groups: Vec<usize> = QWEN
            .iter()
            .map(|&(_, h, kv, d)| plan_attention(&shape(h, kv, d, 1, 10)).unwrap().group_size)
            .collect();
        assert_eq!(groups, vec![7, 7, 5]);
    }

    #[test]
    fn short_context_is_single_pass() {
        let p = plan_attention(&shape(28, 4, 128, 8, 512)).unwrap();
        assert_eq!(p.num_partitions, 1);
        assert_eq!(p.reduce, None);
        // One block per KV head, serving its 7 query heads.
        assert_eq!(p.main.grid, (4, 8, 1));
        assert_eq!(p.main.block, (256, 1, 1));
        // 7 heads × 512 logits + 8 warp slots + 2 × 8 stats + 7 heads × 256 partial outputs.
        assert_eq!(p.main.shared_mem_bytes, 4 * (7 * 512 + 8 + 16 + 7 * 256));
        assert_eq!(p.v_groups, 2);
    }

    #[test]
    fn shared_memory_by_group() {
        assert_eq!(attention_shared_bytes(512, 1), 4 * (512 + 8 + 16 + 256));
        assert_eq!(attention_shared_bytes(100, 5), 4 * (500 + 8 + 16 + 5 * 256));
        let p = plan_attention(&shape(14, 2, 64, 3, 37)).unwrap();
        assert_eq!(p.main.grid, (2, 3, 1));
        // 37 logits padded to 40 per head.
        assert_eq!(p.main.shared_mem_bytes, 4 * (7 * 40 + 8 + 16 + 7 * 256));
        assert_eq!(p.v_groups, 4);
        // The largest group at a full partition still fits the default shared memory, and Q
        // (group × head_size floats) fits the partial-output area it is staged in.
        assert!(
            attention_shared_bytes(PARTITION_SIZE, MAX_GROUP) + ATTENTION_STATIC_SHARED_BYTES
                <= DEFAULT_SHARED_MEM_LIMIT
        );
        for d in SUPPORTED_HEAD_SIZES {
            assert!(MAX_GROUP * d <= MAX_GROUP * ATTN_THREADS);
        }
    }

    #[test]
    fn partitions_across_the_boundary() {
        let counts: Vec<usize> = [1, 511, 512, 513, 1024, 1025, 32768]
            .iter()
            .map(|&k| {
                plan_attention(&shape(40, 8, 128, 2, k))
                    .unwrap()
                    .num_partitions
            })
            .collect();
        assert_eq!(counts, vec![1, 1, 1, 2, 2, 3, 64]);
        let s = shape(40, 8, 128, 2, 1025);
        let p = plan_attention(&s).unwrap();
        assert_eq!(p.main.grid, (8, 2, 3));
        assert_eq!(p.main.shared_mem_bytes, 4 * (5 * 512 + 8 + 16 + 5 * 256));
        assert_eq!(
            p.reduce,
            Some(Launch {
                grid: (40, 2, 1),
                block: (128, 1, 1),
                shared_mem_bytes: 24
            })
        );
        assert_eq!(p.partial_out_len(&s), 2 * 40 * 3 * 128);
        assert_eq!(p.partial_stats_len(&s), 2 * 40 * 3);
    }

    #[test]
    fn rejects_unsupported_shapes() {
        assert!(matches!(
            plan_attention(&shape(28, 4, 96, 1, 1)),
            Err(CudaError::Unsupported(_))
        ));
        assert!(matches!(
            plan_attention(&shape(28, 5, 128, 1, 1)),
            Err(CudaError::Unsupported(_))
        ));
        // 16 heads per KV head: beyond the kernel's register accumulators.
        assert!(matches!(
            plan_attention(&shape(32, 2, 128, 1, 1)),
            Err(CudaError::Unsupported(m)) if m.contains("16 attention heads per KV head")
        ));
        assert!(matches!(
            plan_attention(&shape(28, 4, 128, 0, 1)),
            Err(CudaError::Launch(_))
        ));
        assert!(matches!(
            plan_attention(&shape(28, 4, 128, 70_000, 1)),
            Err(CudaError::Launch(_))
        ));
    }

    #[test]
    fn split_k_partition_size_by_batch_context_and_sms() {
        // (kv heads, rows, keys, SMs) → partition size. H100: 132 SMs; L4: 58.
        let cap = 4609; // Qwen2.5-7B's partial capacity (memory.rs)
        let cases = [
            // Qwen2.5-7B (4 KV heads), batch 1 on an H100: 512 keys → 8 × 64-key partitions
            // (32 blocks; the context cannot give more); 8192 keys → 64 × 128 (256 blocks).
            ((4, 1, 512), 132, 64),
            ((4, 1, 2048), 132, 64),
            ((4, 1, 8192), 132, 128),
            ((4, 1, 32768), 132, 512),
            // The same on an L4: 8192 keys already give 64 blocks ≥ 58 at 512.
            ((4, 1, 8192), 58, 512),
            ((4, 1, 2048), 58, 128),
            // Qwen2.5-14B (8 KV heads), batch 1, 8192 keys: 128 blocks at 512, 256 at 256.
            ((8, 1, 8192), 132, 256),
            // Batches that already fill the device keep 512-key partitions.
            ((4, 32, 2048), 132, 512),
            ((4, 64, 8192), 132, 512),
            ((4, 8, 8192), 132, 512),
            // 4 rows × 2048 keys: 64 blocks at 512, 128 at 256, 256 at 128.
            ((4, 4, 2048), 132, 128),
            // Short contexts: 100 keys split in two 64-key partitions; a context that fits
            // every size is one 512-key partition (single pass).
            ((4, 1, 100), 132, 64),
            ((4, 1, 1), 132, 512),
            ((4, 2, 64), 132, 512),
            ((4, 1, 65), 132, 64),
        ];
        for ((kv, rows, keys), sms, want) in cases {
            assert_eq!(
                choose_partition_size(kv, rows, keys, sms, cap),
                want,
                "{kv} KV heads × {rows} rows × {keys} keys on {sms} SMs"
            );
        }
        // The partial buffers bound the split: 8192 keys with room for only 32
        // (row × partition) units keep 256-key partitions (32 of them), not 128 (64).
        assert_eq!(choose_partition_size(4, 1, 8192, 132, 32), 256);
        assert_eq!(choose_partition_size(4, 1, 8192, 132, 4609), 128);
        // Every choice is a kernel-supported size.
        for keys in [1usize, 63, 64, 65, 511, 513, 4097, 32768] {
            for rows in [1usize, 3, 64] {
                let p = choose_partition_size(8, rows, keys, 132, cap);
                assert!(plan_attention_split(&shape(40, 8, 128, rows, keys), p).is_ok());
            }
        }
    }

    #[test]
    fn split_plan_layout() {
        // Batch 1 × 8192 keys at 128-key partitions: 64 partitions, reduction over them.
        let s = shape(28, 4, 128, 1, 8192);
        let p = plan_attention_split(&s, 128).unwrap();
        assert_eq!(
            (p.partition_size, p.logits_len, p.num_partitions),
            (128, 128, 64)
        );
        assert_eq!(p.main.grid, (4, 1, 64));
        assert_eq!(p.main.shared_mem_bytes, 4 * (7 * 128 + 8 + 16 + 7 * 256));
        assert_eq!(
            p.reduce,
            Some(Launch {
                grid: (28, 1, 1),
                block: (128, 1, 1),
                shared_mem_bytes: 8 * 64
            })
        );
        assert_eq!(p.partial_out_len(&s), 28 * 64 * 128);
        // 100 keys at 64-key partitions: 2 partitions, 64 logits per head.
        let p = plan_attention_split(&shape(28, 4, 128, 1, 100), 64).unwrap();
        assert_eq!((p.num_partitions, p.logits_len), (2, 64));
        for bad in [0, 32, 96, 1024] {
            assert!(matches!(
                plan_attention_split(&s, bad),
                Err(CudaError::Launch(m)) if m.contains("partition size")
            ));
        }
        // The default plan is the 512-key one.
        assert_eq!(
            plan_attention(&s).unwrap(),
            plan_attention_split(&s, 512).unwrap()
        );
    }

    #[test]
    fn gemv_launch_shape() {
        // Qwen2.5-14B fused QKV: 7168 outputs over 5120 inputs, 8 warps per block.
        let g = gemv_launch(7168, 5120, 1).unwrap();
        assert_eq!((g.grid, g.block), ((896, 1, 1), (256, 1, 1)));
        assert_eq!(gemv_launch(7169, 5120, 8).unwrap().grid, (897, 1, 1));
        assert!(matches!(
            gemv_launch(64, 5120, 9),
            Err(CudaError::Launch(_))
        ));
        assert!(matches!(
            gemv_launch(64, 5120, 0),
            Err(CudaError::Launch(_))
        ));
        assert!(matches!(
            gemv_launch(64, 100, 1),
            Err(CudaError::Unsupported(_))
        ));
        assert!(gemv_launch(0, 16, 1).is_err());
    }

    #[test]
    fn row_and_elementwise_launches() {
        assert_eq!(row_launch(7).unwrap().grid, (7, 1, 1));
        assert_eq!(row_launch(7).unwrap().shared_mem_bytes, 32);
        assert!(row_launch(0).is_err());
        assert_eq!(elementwise_launch(257).unwrap().grid, (2, 1, 1));
        assert_eq!(elementwise_launch(256).unwrap().grid, (1, 1, 1));
        assert!(elementwise_launch(0).is_err());
        let c = cache_write_launch(5, 4, 128).unwrap();
        assert_eq!((c.grid, c.block), ((5, 1, 1), (512, 1, 1)));
        let c = cache_write_launch(5, 8, 128).unwrap();
        assert_eq!(c.block, (1024, 1, 1));
    }
}
