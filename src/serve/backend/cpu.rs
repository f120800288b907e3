//! CPU reference backend: an f32 Qwen2 forward pass over the engine's ragged batches, reading
//! and writing K/V through the same paged layout, block tables and slot mapping as the GPU backend.
//!
//! It is the correctness oracle for the engine and the CUDA backend, so it favours plain,
//! checkable code; the matmuls and attention are still multi-threaded (rayon, own pool) to make
//! small models usable for end-to-end tests and demos.

pub mod greedy;
mod kernels;
mod kv;
pub mod quant;

use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;

use self::kernels::{
    add_in_place, dot, linear, linear_many, rms_norm, rope_cos_sin, rope_in_place, Linear,
    MatmulScratch,
};
use self::kv::{KvCache, KvGeometry, LayerKv, X};
use super::{Backend, BackendError, KvSpec, StepBatch, StepOutput};
use crate::serve::model::matrix::Matrix;
use crate::serve::model::qwen2::Qwen2Weights;
use crate::serve::model::{ModelConfig, ModelError};

/// Options of the CPU backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuOptions {
    /// Tokens per KV block (the engine's `--block-size`).
    pub block_size: usize,
    /// KV cache budget (`--kv-cache-memory`); the block count is this over bytes per block.
    pub kv_cache_memory_bytes: usize,
    /// Worker threads for the matmuls and attention (0: one per available core).
    pub threads: usize,
}

/// Buffers reused across steps so a step allocates nothing once warmed up.
#[derive(Debug, Default)]
struct Scratch {
    /// Per new token: index of its sequence in the batch.
    tok_seq: Vec<usize>,
    /// Per new token: its index within its sequence (`context_len + j`), i.e. the last key it
    /// may attend to.
    tok_abs: Vec<usize>,
    /// Per new token: RoPE `(cos, sin)` for each of the `head_size / 2` frequencies.
    cos_sin: Vec<(f32, f32)>,
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    matmul: MatmulScratch,
}

pub struct CpuBackend {
    cfg: ModelConfig,
    weights: Qwen2Weights,
    opts: CpuOptions,
    pool: rayon::ThreadPool,
    inv_freq: Vec<f64>,
    geo: KvGeometry,
    kv: Option<KvCache>,
    scratch: Scratch,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("cfg", &self.cfg)
            .field("opts", &self.opts)
            .field("threads", &self.pool.current_num_threads())
            .field("kv_blocks", &self.kv.as_ref().map(|kv| kv.num_blocks))
            .finish()
    }
}

impl CpuBackend {
    /// Loads the model in `dir` (config + safetensors) for CPU inference.
    pub fn load(dir: &Path, opts: CpuOptions) -> Result<CpuBackend, ModelError> {
        let started = Instant::now();
        let cfg = ModelConfig::load(dir)?;
        let weights = Qwen2Weights::load(dir, &cfg)?;
        let backend = CpuBackend::new(cfg, weights, opts)?;
        tracing::info!(
            dir = %dir.display(),
            layers = backend.cfg.num_hidden_layers,
            hidden = backend.cfg.hidden_size,
            vocab = backend.cfg.vocab_size,
            threads = backend.pool.current_num_threads(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "cpu backend loaded"
        );
        Ok(backend)
    }

    /// Builds the backend from weights already in memory (tests, benches).
    pub fn new(
        cfg: ModelConfig,
        weights: Qwen2Weights,
        opts: CpuOptions,
    ) -> Result<CpuBackend, ModelError> {
        let fail = |reason: String| ModelError::Backend {
            backend: "cpu",
            reason,
        };
        if opts.block_size == 0 {
            return Err(fail("block_size must be greater than 0".into()));
        }
        if weights.layers.len() != cfg.num_hidden_layers {
            return Err(fail(format!(
                "{} layers of weights for num_hidden_layers {}",
                weights.layers.len(),
                cfg.num_hidden_layers
            )));
        }
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            opts.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("cpu-backend-{i}"))
            .build()
            .map_err(|e| fail(format!("cannot start {threads} worker threads: {e}")))?;
        let head_size = cfg.head_dim();
        Ok(CpuBackend {
            inv_freq: kernels::rope_inv_freq(head_size, cfg.rope_theta),
            geo: KvGeometry {
                num_kv_heads: cfg.num_key_value_heads,
                head_size,
                block_size: opts.block_size,
            },
            cfg,
            weights,
            opts,
            pool,
            kv: None,
            scratch: Scratch::default(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn kv_spec(&self) -> KvSpec {
        KvSpec {
            num_layers: self.cfg.num_hidden_layers,
            num_kv_heads: self.geo.num_kv_heads,
            head_size: self.geo.head_size,
            block_size: self.geo.block_size,
            // K and V, f32, every layer.
            bytes_per_block: 2
                * self.cfg.num_hidden_layers
                * self.geo.block_len()
                * std::mem::size_of::<f32>(),
        }
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn available_kv_blocks(&self) -> usize {
        self.opts.kv_cache_memory_bytes / self.kv_spec().bytes_per_block.max(1)
    }

    fn init_kv(&mut self, num_blocks: usize) -> Result<(), BackendError> {
        // Drop any previous cache first so re-initialising does not need twice the memory.
        self.kv = None;
        self.kv = Some(KvCache::new(
            self.geo,
            self.cfg.num_hidden_layers,
            num_blocks,
        )?);
        tracing::info!(
            num_blocks,
            bytes = num_blocks.saturating_mul(self.kv_spec().bytes_per_block),
            "cpu backend KV cache allocated"
        );
        Ok(())
    }

    fn execute(&mut self, batch: &StepBatch, out: &mut StepOutput) -> Result<(), BackendError> {
        let started = Instant::now();
        let kv = self.kv.as_mut().ok_or(BackendError::KvNotInitialised)?;
        validate(
            batch,
            kv.num_blocks,
            self.geo.block_size,
            self.cfg.vocab_size,
            &mut self.scratch,
        )?;
        out.clear();
        out.vocab_size = self.cfg.vocab_size;
        if batch.token_ids.is_empty() {
            return Ok(());
        }
        let model = Model {
            cfg: &self.cfg,
            w: &self.weights,
            inv_freq: &self.inv_freq,
            geo: self.geo,
        };
        let scratch = &mut self.scratch;
        self.pool
            .install(|| model.forward(batch, kv, scratch, &mut out.logits));
        tracing::trace!(
            tokens = batch.token_ids.len(),
            seqs = batch.seqs.len(),
            logits_rows = batch.logits_rows.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "cpu step"
        );
        Ok(())
    }
}

/// Checks every engine invariant the forward pass relies on, and fills the per-token
/// sequence index and absolute position. Any violation is an `InvalidBatch`, never a panic.
fn validate(
    b: &StepBatch,
    num_blocks: usize,
    block_size: usize,
    vocab: usize,
    s: &mut Scratch,
) -> Result<(), BackendError> {
    let bad = |msg: String| Err(BackendError::InvalidBatch(msg));
    let n = b.token_ids.len();
    if b.positions.len() != n || b.slot_mapping.len() != n {
        return bad(format!(
            "{n} token_ids but {} positions and {} slot_mapping entries",
            b.positions.len(),
            b.slot_mapping.len()
        ));
    }
    if b.block_tables.len() != b.seqs.len() {
        return bad(format!(
            "{} seqs but {} block tables",
            b.seqs.len(),
            b.block_tables.len()
        ));
    }
    if let Some((i, t)) = b
        .token_ids
        .iter()
        .enumerate()
        .find(|(_, t)| **t as usize >= vocab)
    {
        return bad(format!(
            "token_ids[{i}] = {t} is not below vocab_size {vocab}"
        ));
    }
    if let Some(r) = b.logits_rows.iter().find(|r| **r >= n) {
        return bad(format!(
            "logits row {r} is not below the {n} tokens of the batch"
        ));
    }
    s.tok_seq.clear();
    s.tok_seq.resize(n, usize::MAX);
    s.tok_abs.clear();
    s.tok_abs.resize(n, 0);
    for (i, (seq, table)) in b.seqs.iter().zip(&b.block_tables).enumerate() {
        let end = seq.query_start.checked_add(seq.query_len);
        let total = seq.context_len.checked_add(seq.query_len);
        let (Some(end), Some(total)) = (end, total) else {
            return bad(format!("seq {i}: length overflow"));
        };
        if end > n {
            return bad(format!(
                "seq {i}: tokens {}..{end} run past the {n} tokens of the batch",
                seq.query_start
            ));
        }
        if table.len().saturating_mul(block_size) < total {
            return bad(format!(
                "seq {i}: {} blocks of {block_size} cannot hold {total} tokens",
                table.len()
            ));
        }
        if let Some(blk) = table.iter().find(|blk| **blk as usize >= num_blocks) {
            return bad(format!(
                "seq {i}: block {blk} is not below the {num_blocks} KV blocks"
            ));
        }
        for j in 0..seq.query_len {
            let t = seq.query_start + j;
            if s.tok_seq[t] != usize::MAX {
                return bad(format!(
                    "token {t} belongs to both seq {} and seq {i}",
                    s.tok_seq[t]
                ));
            }
            let abs = seq.context_len + j;
            // Causal masking counts keys by index in the sequence while RoPE uses `positions`;
            // for Qwen2 they are the same number, and a disagreement is an engine bug.
            if b.positions[t] as usize != abs {
                return bad(format!(
                    "seq {i}: positions[{t}] = {} but the token is at index {abs} of its sequence",
                    b.positions[t]
                ));
            }
            // The cache is read through the block table, so a slot that disagrees with it would
            // write K/V where attention never looks: a silent wrong answer, refused here.
            let want = table
                .get(abs / block_size)
                .map(|blk| *blk as usize * block_size + abs % block_size);
            let got = b.slot_mapping[t] as usize;
            if want != Some(got) {
                return bad(format!(
                    "seq {i}: slot_mapping[{t}] = {got} but the block table puts token {abs} at slot {}",
                    want.map_or_else(|| "-".to_string(), |w| w.to_string())
                ));
            }
            s.tok_seq[t] = i;
            s.tok_abs[t] = abs;
        }
    }
    if let Some(t) = s.tok_seq.iter().position(|x| *x == usize::MAX) {
        return bad(format!("token {t} belongs to no seq"));
    }
    Ok(())
}

/// Borrowed view of the model for one forward pass.
struct Model<'a> {
    cfg: &'a ModelConfig,
    w: &'a Qwen2Weights,
    inv_freq: &'a [f64],
    geo: KvGeometry,
}

impl Model<'_> {
    /// The forward pass over a validated batch. Runs inside the backend's rayon pool.
    fn forward(&self, b: &StepBatch, kv: &mut KvCache, s: &mut Scratch, logits: &mut Vec<f32>) {
        let cfg = self.cfg;
        let n = b.token_ids.len();
        let hidden = cfg.hidden_size;
        let head = cfg.head_dim();
        let q_dim = cfg.num_attention_heads * head;
        let kv_dim = cfg.num_key_value_heads * head;
        let inter = cfg.intermediate_size;
        let eps = cfg.rms_norm_eps as f32;

        s.x.clear();
        s.x.resize(n * hidden, 0.0);
        for (&t, dst) in b.token_ids.iter().zip(s.x.chunks_exact_mut(hidden)) {
            let t = t as usize;
            match &self.w.embed_tokens {
                Matrix::F32(e) => dst.copy_from_slice(&e[t * hidden..(t + 1) * hidden]),
                Matrix::Quant(q) => quant::dequantize_row(q.ty, q.row(t), dst),
            }
        }
        let half = head / 2;
        s.cos_sin.clear();
        s.cos_sin.resize(n * half, (1.0, 0.0));
        for (&pos, cs) in b.positions.iter().zip(s.cos_sin.chunks_exact_mut(half)) {
            rope_cos_sin(pos, self.inv_freq, cs);
        }

        for (lw, layer_kv) in self.w.layers.iter().zip(kv.layers.iter_mut()) {
            // Attention block.
            rms_norm(&s.x, &lw.input_norm, eps, &mut s.h);
            linear_many(
                &s.h,
                n,
                [
                    Linear::new(&lw.q_proj, q_dim, hidden).with_bias(&lw.q_bias),
                    Linear::new(&lw.k_proj, kv_dim, hidden).with_bias(&lw.k_bias),
                    Linear::new(&lw.v_proj, kv_dim, hidden).with_bias(&lw.v_bias),
                ],
                [&mut s.q, &mut s.k, &mut s.v],
                &mut s.matmul,
            );
            for (t, cs) in s.cos_sin.chunks_exact(half).enumerate() {
                rope_in_place(&mut s.q[t * q_dim..(t + 1) * q_dim], head, cs);
                rope_in_place(&mut s.k[t * kv_dim..(t + 1) * kv_dim], head, cs);
            }
            // Write first: each new token attends to itself and to earlier tokens of its chunk.
            for (t, &slot) in b.slot_mapping.iter().enumerate() {
                layer_kv.write(
                    &self.geo,
                    slot as usize,
                    &s.k[t * kv_dim..(t + 1) * kv_dim],
                    &s.v[t * kv_dim..(t + 1) * kv_dim],
                );
            }
            self.attention(b, &s.tok_seq, &s.tok_abs, &s.q, layer_kv, &mut s.attn);
            linear(
                &s.attn,
                n,
                Linear::new(&lw.o_proj, hidden, q_dim),
                &mut s.o,
                &mut s.matmul,
            );
            add_in_place(&mut s.x, &s.o);

            // MLP block (SwiGLU).
            rms_norm(&s.x, &lw.post_norm, eps, &mut s.h);
            linear_many(
                &s.h,
                n,
                [
                    Linear::new(&lw.gate_proj, inter, hidden),
                    Linear::new(&lw.up_proj, inter, hidden),
                ],
                [&mut s.gate, &mut s.up],
                &mut s.matmul,
            );
            kernels::swiglu_in_place(&mut s.gate, &s.up);
            linear(
                &s.gate,
                n,
                Linear::new(&lw.down_proj, hidden, inter),
                &mut s.o,
                &mut s.matmul,
            );
            add_in_place(&mut s.x, &s.o);
        }

        // Final norm and lm_head only for the rows the engine samples from.
        s.o.clear();
        for &r in &b.logits_rows {
            s.o.extend_from_slice(&s.x[r * hidden..(r + 1) * hidden]);
        }
        rms_norm(&s.o, &self.w.norm, eps, &mut s.h);
        linear(
            &s.h,
            b.logits_rows.len(),
            Linear::new(self.w.output_weight(), cfg.vocab_size, hidden),
            logits,
            &mut s.matmul,
        );
    }

    /// Paged attention for every (new token, query head), in parallel. Token `t` of sequence
    /// `i` attends to keys `0..=tok_abs[t]` of that sequence, found through `block_tables[i]`:
    /// the whole cached context plus the causal part of its own chunk.
    fn attention(
        &self,
        b: &StepBatch,
        tok_seq: &[usize],
        tok_abs: &[usize],
        q: &[f32],
        kv: &LayerKv,
        out: &mut Vec<f32>,
    ) {
        let head = self.geo.head_size;
        let heads = self.cfg.num_attention_heads;
        let group = self.cfg.group_size();
        let scale = 1.0 / (head as f32).sqrt();
        out.clear();
        out.resize(q.len(), 0.0);
        out.par_chunks_mut(head)
            .zip(q.par_chunks(head))
            .enumerate()
            .for_each_init(Vec::new, |scores, (i, (o, qh))| {
                let t = i / heads;
                let kv_head = (i % heads) / group;
                let table = &b.block_tables[tok_seq[t]];
                self.attend(qh, kv_head, scale, table, tok_abs[t] + 1, kv, scores, o);
            });
    }

    /// One query head over `n_keys` cached keys: softmax(q·Kᵀ·scale)·V into `o`.
    #[allow(clippy::too_many_arguments)] // the hot inner function; a struct would only rename them
    fn attend(
        &self,
        q: &[f32],
        kv_head: usize,
        scale: f32,
        table: &[u32],
        n_keys: usize,
        kv: &LayerKv,
        scores: &mut Vec<f32>,
        o: &mut [f32],
    ) {
        let geo = &self.geo;
        let bs = geo.block_size;
        let tile_len = geo.tile_len();
        scores.clear();
        scores.resize(n_keys, 0.0);
        let blocks = table.iter().take(n_keys.div_ceil(bs)).enumerate();
        for (bi, &blk) in blocks.clone() {
            let p0 = bi * bs;
            let cnt = (n_keys - p0).min(bs);
            let base = geo.tile_start(blk as usize, kv_head);
            let ktile = &kv.key[base..base + tile_len];
            let sc = &mut scores[p0..p0 + cnt];
            // Key tile is [head/X, block, X]: for each group of X dims, the block's tokens are
            // contiguous, so the inner loop walks memory linearly.
            for (g, qg) in q.chunks_exact(X).enumerate() {
                let rows = &ktile[g * bs * X..g * bs * X + cnt * X];
                for (s, kk) in sc.iter_mut().zip(rows.chunks_exact(X)) {
                    *s += qg[0] * kk[0] + qg[1] * kk[1] + qg[2] * kk[2] + qg[3] * kk[3];
                }
            }
        }
        let mut max = f32::NEG_INFINITY;
        for s in scores.iter_mut() {
            *s *= scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        o.fill(0.0);
        for (bi, &blk) in blocks {
            let p0 = bi * bs;
            let cnt = (n_keys - p0).min(bs);
            let base = geo.tile_start(blk as usize, kv_head);
            let vtile = &kv.value[base..base + tile_len];
            let w = &scores[p0..p0 + cnt];
            // Value tile is [head, block]: each dim's block of tokens is contiguous.
            for (d, od) in o.iter_mut().enumerate() {
                *od += dot(&vtile[d * bs..d * bs + cnt], w);
            }
        }
        let inv = 1.0 / sum;
        for od in o.iter_mut() {
            *od *= inv;
        }
    }
}
