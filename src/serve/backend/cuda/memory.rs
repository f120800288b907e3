//! Device-memory budgeting: activation workspace sizes for the largest step, KV block bytes, and
//! the block count that fits `--gpu-memory-utilization` after weights and workspace (measured
//! on the device with `cuMemGetInfo`, as vLLM does after its profiling run).

use super::CudaError;

/// bf16 bytes.
const BF16: usize = 2;
const F32: usize = 4;

/// Scratch for the FP8 prefill path: slices of a weight's rows are dequantized to bf16 here and
/// multiplied by cuBLAS a slice at a time (32 MiB: ≥ 1 213 rows of Qwen2.5-14B's widest input,
/// 13 824).
pub const FP8_SCRATCH_BYTES: usize = 32 << 20;

/// What the CUDA context, cuBLAS's handle and workspace and the allocator's slack take beyond
/// the buffers we size (an estimate for planning only: the runtime *measures* it with
/// `cuMemGetInfo`; to be replaced by the L4 measurement).
pub const CONTEXT_RESERVE_BYTES: usize = 512 << 20;

/// How the linear layers' weights are stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// bf16 everywhere.
    #[default]
    Bf16,
    /// FP8 E4M3 with one f32 scale per output channel for every projection and an untied
    /// lm_head; embeddings, norms and biases stay bf16.
    Fp8,
}

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
        self.weight_bytes_as(tied, WeightFormat::Bf16)
    }

    /// Bytes of the weights in `format`: a projection `[n, k]` is `2·n·k` in bf16, `n·k + 4·n`
    /// in FP8 (codes + per-channel f32 scales); biases, norms and the embedding are bf16.
    pub fn weight_bytes_as(&self, tied: bool, format: WeightFormat) -> usize {
        let h = self.hidden;
        let proj = |n: usize, k: usize| match format {
            WeightFormat::Bf16 => BF16 * n * k,
            WeightFormat::Fp8 => n * k + F32 * n,
        };
        let per_layer = proj(self.qkv_width(), h)
            + proj(h, self.num_heads * self.head_size)
            + proj(2 * self.intermediate, h)
            + proj(h, self.intermediate)
            + BF16 * (self.qkv_width() + 2 * h);
        let emb = BF16 * self.vocab * h;
        self.num_layers * per_layer + emb + BF16 * h + if tied { 0 } else { proj(self.vocab, h) }
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
    /// bf16 elements of the FP8 dequantization scratch (0 for bf16 weights).
    pub fp8_scratch: usize,
}

impl Workspace {
    pub fn new(
        d: &Dims,
        max_tokens: usize,
        max_logits: usize,
        max_model_len: usize,
    ) -> Result<Workspace, CudaError> {
        Self::with_format(d, max_tokens, max_logits, max_model_len, WeightFormat::Bf16)
    }

    /// The workspace for weights in `format` (FP8 adds the dequantization scratch).
    pub fn with_format(
        d: &Dims,
        max_tokens: usize,
        max_logits: usize,
        max_model_len: usize,
        format: WeightFormat,
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
            fp8_scratch: match format {
                WeightFormat::Bf16 => 0,
                WeightFormat::Fp8 => FP8_SCRATCH_BYTES / BF16,
            },
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
                    + self.final_normed
                    + self.fp8_scratch)
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

/// A predicted memory plan (what `CudaBackend::load` will measure, computed ahead of time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub weight_bytes: usize,
    pub workspace_bytes: usize,
    pub reserve_bytes: usize,
    pub kv_block_bytes: usize,
    pub kv_blocks: usize,
}

impl MemoryPlan {
    /// Tokens the KV cache holds.
    pub fn kv_tokens(&self, block_size: usize) -> usize {
        self.kv_blocks * block_size
    }
}

/// Plans a model on a device of `total` bytes: weights in `format`, the workspace for
/// `max_tokens` / `max_logits` / `max_model_len`, [`CONTEXT_RESERVE_BYTES`] for the context and
/// cuBLAS, and KV blocks in what is left of `total × utilization` (the same arithmetic the
/// runtime applies to its measured usage).
#[allow(clippy::too_many_arguments)]
pub fn plan(
    d: &Dims,
    tied: bool,
    format: WeightFormat,
    block_size: usize,
    total: usize,
    utilization: f64,
    max_tokens: usize,
    max_logits: usize,
    max_model_len: usize,
) -> Result<MemoryPlan, CudaError> {
    let weight_bytes = d.weight_bytes_as(tied, format);
    let workspace_bytes =
        Workspace::with_format(d, max_tokens, max_logits, max_model_len, format)?.bytes();
    let used = weight_bytes + workspace_bytes + CONTEXT_RESERVE_BYTES;
    let kv_block_bytes = d.kv_block_bytes(block_size);
    let kv_blocks = kv_blocks_for_budget(total, used, utilization, kv_block_bytes)?;
    Ok(MemoryPlan {
        weight_bytes,
        workspace_bytes,
        reserve_bytes: CONTEXT_RESERVE_BYTES,
        kv_block_bytes,
        kv_blocks,
    })
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

    /// Qwen2.5-Coder-14B (config.json of the checkpoint: untied, 32k positions).
    const Q14B: Dims = Dims {
        hidden: 5120,
        intermediate: 13824,
        num_heads: 40,
        num_kv_heads: 8,
        head_size: 128,
        num_layers: 48,
        vocab: 152_064,
    };

    /// An L4's 23 034 MiB (`nvidia-smi`'s total, which `cuMemGetInfo` reports).
    const L4_TOTAL: usize = 23_034 << 20;

    #[test]
    fn qwen14b_fp8_plans_on_an_l4() {
        // Weights: per layer 275 251 200 FP8 codes (QKV 7168 × 5120, o 5120², gate/up
        // 27 648 × 5120, down 5120 × 13 824) + 45 056 f32 scales + 7168 bf16 biases + two
        // 5120 norms = 275 466 240 B; × 48 = 13 222 379 520. Embedding 152 064 × 5120 bf16 =
        // 1 557 135 360; lm_head FP8 778 567 680 + 608 256 scales; final norm 10 240.
        assert_eq!(
            Q14B.weight_bytes_as(false, WeightFormat::Fp8),
            15_558_701_056
        );
        // bf16 for comparison: 29.5 GB, which no 24 GB card holds.
        assert_eq!(Q14B.weight_bytes(false), 29_540_067_328);
        assert!(Q14B.weight_bytes(false) > L4_TOTAL);
        // 2 × 48 layers × 8 KV heads × 128 × 16 tokens × 2 B.
        assert_eq!(Q14B.kv_block_bytes(16), 3_145_728);

        // `--gpu-memory-utilization 0.9`, 16-token blocks, `--max-num-batched-tokens 2048`
        // (vLLM's default for `vllm serve` on GPUs under 70 GiB), `--max-num-seqs 256`,
        // `--max-model-len 32768`.
        let p = plan(
            &Q14B,
            false,
            WeightFormat::Fp8,
            16,
            L4_TOTAL,
            0.9,
            2048,
            256,
            32_768,
        )
        .unwrap();
        println!(
            "Qwen2.5-Coder-14B FP8 on an L4 (23 034 MiB) at 0.9: weights {:.2} GB, workspace \
             {:.1} MB, reserve {} MiB → {} KV blocks of 16 tokens ({} tokens)",
            p.weight_bytes as f64 / 1e9,
            p.workspace_bytes as f64 / 1e6,
            p.reserve_bytes >> 20,
            p.kv_blocks,
            p.kv_tokens(16)
        );
        // Workspace: residual f32 41 943 040, normed + branch 41 943 040, QKV 29 360 128,
        // attention out 20 971 520, gate/up 113 246 208, act 56 623 104, final-normed
        // 2 621 440, logits f32 155 713 536, partials 3226 × 40 × (128 + 2) × 4 = 67 100 800,
        // FP8 scratch 33 554 432.
        assert_eq!(p.workspace_bytes, 563_077_248);
        // (⌊23 034 MiB × 0.9⌋ − 15 558 701 056 − 563 077 248 − 512 MiB) / 3 145 728.
        let budget = ((L4_TOTAL as f64) * 0.9) as usize;
        let left = budget - 15_558_701_056 - 563_077_248 - (512 << 20);
        assert_eq!(p.kv_blocks, left / 3_145_728);
        assert_eq!(p.kv_blocks, 1_614);
        assert!(p.kv_blocks >= 1_500);
        // With vLLM's H100-class default of 8192 batched tokens the workspace alone costs
        // ~1.2 GB more, below the bar: an L4 deployment keeps 2048.
        let big = plan(
            &Q14B,
            false,
            WeightFormat::Fp8,
            16,
            L4_TOTAL,
            0.9,
            8192,
            256,
            32_768,
        )
        .unwrap();
        println!(
            "  at --max-num-batched-tokens 8192: {} blocks",
            big.kv_blocks
        );
        assert!(big.kv_blocks < 1_500);
        // bf16 14B does not plan at all.
        assert!(matches!(
            plan(
                &Q14B,
                false,
                WeightFormat::Bf16,
                16,
                L4_TOTAL,
                0.9,
                2048,
                256,
                32_768
            ),
            Err(CudaError::OutOfMemory(_))
        ));
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
