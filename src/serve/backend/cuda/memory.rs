//! Device-memory budgeting: activation workspace sizes for the largest step, KV block bytes, and
//! the block count that fits `--gpu-memory-utilization` after weights and workspace (measured
//! on the device with `cuMemGetInfo`, as vLLM does after its profiling run).

use super::CudaError;

/// bf16 bytes.
const BF16: usize = 2;
const F32: usize = 4;

/// Budget for the flash-decoding partial buffers; attention launches are split into row chunks
/// that fit (a 8192-token prefill over a 32k context would otherwise need gigabytes).
pub const PARTIALS_BUDGET_BYTES: usize = 64 << 20;

/// Model dimensions the workspace depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub hidden: usize,
    pub intermediate: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_size: usize,
    pub num_layers: usize,
    pub vocab: usize,
}

impl Dims {
    /// Width of the fused QKV projection.
    pub fn qkv_width(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_size
    }

    /// Bytes of one KV block over all layers, K and V, bf16.
    pub fn kv_block_bytes(&self, block_size: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_size * block_size * BF16
    }

    /// Bytes of the bf16 weights (fused QKV with bias, o, fused gate/up, down, two norms per
    /// layer; embedding, final norm, and an untied lm_head).
    pub fn weight_bytes(&self, tied: bool) -> usize {
        let h = self.hidden;
        let per_layer = h * self.qkv_width()
            + self.qkv_width()
            + self.num_heads * self.head_size * h
            + 2 * h * self.intermediate
            + self.intermediate * h
            + 2 * h;
        let emb = self.vocab * h;
        BF16 * (self.num_layers * per_layer + emb + h + if tied { 0 } else { emb })
    }
}

/// Element counts of every activation buffer, sized for `max_tokens` new tokens per step and
/// `max_logits` logits rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workspace {
    pub max_tokens: usize,
    pub max_logits: usize,
    /// f32 residual stream `[tokens, hidden]`.
    pub hidden: usize,
    /// bf16 normed input / attention output / MLP output, each `[tokens, hidden]`.
    pub normed: usize,
    pub qkv: usize,
    pub attn: usize,
    pub gate_up: usize,
    pub act: usize,
    /// f32 logits `[max_logits, vocab]` and bf16 final-normed rows `[max_logits, hidden]`.
    pub logits: usize,
    pub final_normed: usize,
    /// (row × partition) units the partial buffers hold; see [`partial_capacity`].
    pub partial_capacity: usize,
    /// f32 partial outputs and (max, sum) stats of one chunked attention launch.
    pub partial_out: usize,
    pub partial_stats: usize,
}

impl Workspace {
    pub fn new(
        d: &Dims,
        max_tokens: usize,
        max_logits: usize,
        max_model_len: usize,
    ) -> Result<Workspace, CudaError> {
        if max_tokens == 0 || max_logits == 0 || max_model_len == 0 {
            return Err(CudaError::Config(
                "workspace needs max tokens, logits rows and model length > 0".into(),
            ));
        }
        let capacity = partial_capacity(d, max_model_len);
        Ok(Workspace {
            max_tokens,
            max_logits,
            hidden: max_tokens * d.hidden,
            normed: max_tokens * d.hidden,
            qkv: max_tokens * d.qkv_width(),
            attn: max_tokens * d.num_heads * d.head_size,
            gate_up: max_tokens * 2 * d.intermediate,
            act: max_tokens * d.intermediate,
            logits: max_logits * d.vocab,
            final_normed: max_logits * d.hidden,
            partial_capacity: capacity,
            partial_out: capacity * d.num_heads * d.head_size,
            partial_stats: capacity * d.num_heads,
        })
    }

    pub fn bytes(&self) -> usize {
        F32 * (self.hidden + self.logits + self.partial_out + 2 * self.partial_stats)
            + BF16
                * (2 * self.normed
                    + self.qkv
                    + self.attn
                    + self.gate_up
                    + self.act
                    + self.final_normed)
    }
}

/// Capacity of the partial buffers in (row × partition) units: what fits the budget, but at
/// least one row at the longest context (`max_model_len`).
pub fn partial_capacity(d: &Dims, max_model_len: usize) -> usize {
    let longest = max_model_len.div_ceil(super::launch::PARTITION_SIZE).max(1);
    let per_row_partition = F32 * d.num_heads * (d.head_size + 2);
    (PARTIALS_BUDGET_BYTES / per_row_partition).max(longest)
}

/// Query rows per attention launch at `max_keys` keys so `rows × partitions` stays within
/// `capacity` (from [`partial_capacity`]); unbounded for single-pass launches, which write
/// straight to the output. Callers guarantee `max_keys ≤ max_model_len`, so at least one row
/// always fits.
pub fn rows_per_attention_launch(max_keys: usize, capacity: usize) -> usize {
    let partitions = max_keys.div_ceil(super::launch::PARTITION_SIZE).max(1);
    if partitions == 1 {
        return usize::MAX;
    }
    (capacity / partitions).max(1)
}

/// KV blocks that fit: `total × utilization − used`, where `used` is what the process holds
/// after weights and workspace were allocated.
pub fn kv_blocks_for_budget(
    total: usize,
    used: usize,
    utilization: f64,
    block_bytes: usize,
) -> Result<usize, CudaError> {
    if !(utilization > 0.0 && utilization <= 1.0) {
        return Err(CudaError::Config(format!(
            "--gpu-memory-utilization must be in (0, 1], got {utilization}"
        )));
    }
    let target = (total as f64 * utilization) as usize;
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    if used >= target || block_bytes == 0 {
        return Err(CudaError::OutOfMemory(format!(
            "weights + workspace use {:.2} GiB of the {:.2} GiB budget ({:.2} GiB × {utilization}); \
             no room for KV blocks — raise --gpu-memory-utilization or lower \
             --max-num-batched-tokens",
            gib(used),
            gib(target),
            gib(total)
        )));
    }
    let blocks = (target - used) / block_bytes;
    if blocks == 0 {
        return Err(CudaError::OutOfMemory(format!(
            "{:.3} GiB left for the KV cache is less than one {block_bytes}-byte block",
            gib(target - used)
        )));
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-7B.
    const Q7B: Dims = Dims {
        hidden: 3584,
        intermediate: 18944,
        num_heads: 28,
        num_kv_heads: 4,
        head_size: 128,
        num_layers: 28,
        vocab: 152_064,
    };

    #[test]
    fn qwen7b_sizes() {
        // 2 × 28 layers × 4 heads × 128 × 16 tokens × 2 bytes = 917 504.
        assert_eq!(Q7B.kv_block_bytes(16), 917_504);
        assert_eq!(Q7B.qkv_width(), 4608);
        // 7.62 B parameters (untied) → 15.23 GB in bf16.
        let w = Q7B.weight_bytes(false);
        assert_eq!(w, 15_231_233_024);
    }

    #[test]
    fn l4_budget_for_qwen7b() {
        let total = 23_034_331_136; // an L4's cuMemGetInfo total (22.45 GiB usable)
        let used = Q7B.weight_bytes(false) + 1_200_000_000;
        let blocks = kv_blocks_for_budget(total, used, 0.9, Q7B.kv_block_bytes(16)).unwrap();
        assert_eq!(blocks, (((total as f64 * 0.9) as usize) - used) / 917_504);
        assert_eq!(blocks, 4686);
    }

    #[test]
    fn budget_errors_are_clear() {
        let e = kv_blocks_for_budget(100, 95, 0.9, 1).unwrap_err();
        assert!(
            e.to_string().contains("raise --gpu-memory-utilization"),
            "{e}"
        );
        assert!(kv_blocks_for_budget(100, 10, 1.5, 1).is_err());
        assert!(kv_blocks_for_budget(100, 10, 0.9, 1000).is_err());
        assert_eq!(kv_blocks_for_budget(1000, 100, 1.0, 100).unwrap(), 9);
    }

    #[test]
    fn attention_row_chunks_bound_the_partials() {
        // 28 heads × 130 floats × 4 B = 14 560 B per (row, partition) → 4609 fit in 64 MiB.
        let cap = partial_capacity(&Q7B, 32_768);
        assert_eq!(cap, 4609);
        assert_eq!(rows_per_attention_launch(512, cap), usize::MAX);
        assert_eq!(rows_per_attention_launch(32_768, cap), 72);
        assert_eq!(rows_per_attention_launch(1025, cap), 1536);
        // Every context up to the model length fits the buffer the workspace allocates.
        let ws = Workspace::new(&Q7B, 8192, 256, 32_768).unwrap();
        assert_eq!(ws.partial_out, 4609 * 28 * 128);
        assert!(ws.partial_out * 4 + ws.partial_stats * 8 <= PARTIALS_BUDGET_BYTES);
        for keys in (513usize..=32_768).step_by(97) {
            let parts = keys.div_ceil(512);
            let rows = rows_per_attention_launch(keys, cap);
            assert!(rows * parts * 28 * 128 <= ws.partial_out, "{keys} keys");
        }
        // A tiny budget still holds one row at the longest context.
        assert_eq!(partial_capacity(&Q7B, 10_000_000), 19_532);
        assert!(Workspace::new(&Q7B, 0, 1, 1).is_err());
    }
}
