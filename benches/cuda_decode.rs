//! CUDA backend benchmarks (issue 6), on a GPU machine:
//!
//! 1. device copy bandwidth (device-to-device memcpy, read + write bytes / time);
//! 2. the paged-attention decode kernel alone (Qwen2.5-7B attention: 28 heads / 4 KV heads,
//!    head 128), batch × context sweep: KV bytes read per launch / launch time as a fraction of
//!    the copy bandwidth (target ≥ 80%);
//! 3. single-stream decode tok/s for Qwen2.5-7B shapes (random bf16 weights) against the
//!    bandwidth roofline (weights + KV bytes per token / copy bandwidth; target ≥ 85%);
//! 4. batched decode throughput at 1–64 concurrent sequences;
//! 5. (issue 16) split-K attention at batch 1 for every partition size and the planner's
//!    choice; the GEMV kernel (bf16 and FP8 weights) at Qwen2.5-14B projection shapes vs copy
//!    bandwidth; single-stream and batched decode with and without CUDA graphs, bf16 and FP8
//!    weights, each against its own roofline (FP8 moves half the projection bytes).
//!
//! Without a GPU it prints `SKIPPED: no CUDA device (<why>)` and exits 0. Run:
//! `cargo bench --bench cuda_decode` (`-- --quick` for fewer steps).

use std::time::Instant;

use switchyard::serve::backend::cuda::harness::{
    self, AttentionHarness, GemvWeights, HarnessShape, KernelHarness, Rows,
};
use switchyard::serve::backend::cuda::memory::{Dims, WeightFormat};
use switchyard::serve::backend::cuda::{self, fp8, launch, weights, CudaBackend, CudaOptions};
use switchyard::serve::backend::{Backend, SeqSlice, StepBatch, StepOutput};
use switchyard::serve::model::ModelConfig;

const BLOCK: usize = 16;

fn qwen7b(layers: usize, intermediate: usize, vocab: usize) -> ModelConfig {
    ModelConfig::from_json(&serde_json::json!({
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": intermediate,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "num_hidden_layers": layers,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": false
    }))
    .expect("valid config")
}

fn copy_bandwidth() -> anyhow::Result<f64> {
    let ctx = cudarc::driver::CudaContext::new(0)?;
    let s = ctx.default_stream();
    let n = 256usize << 20; // 1 GiB of f32
    let src = s.alloc_zeros::<f32>(n)?;
    let mut dst = s.alloc_zeros::<f32>(n)?;
    s.memcpy_dtod(&src, &mut dst)?;
    s.synchronize()?;
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        s.memcpy_dtod(&src, &mut dst)?;
    }
    s.synchronize()?;
    Ok(2.0 * (n * 4 * reps) as f64 / t.elapsed().as_secs_f64())
}

/// Sequences with their block tables, advanced through one backend.
struct Runner {
    be: CudaBackend,
    next_block: u32,
    out: StepOutput,
}

impl Runner {
    fn new(
        cfg: ModelConfig,
        max_tokens: usize,
        max_seqs: usize,
        format: WeightFormat,
        graphs: bool,
        gemv_bf16: bool,
    ) -> anyhow::Result<Runner> {
        let store = weights::random_store(&cfg, 1);
        let mut be = CudaBackend::from_store(
            cfg,
            store,
            CudaOptions {
                block_size: BLOCK,
                max_num_batched_tokens: max_tokens,
                max_num_seqs: max_seqs,
                max_model_len: Some(32768),
                weight_format: format,
                cuda_graphs: graphs,
                gemv_bf16,
                ..CudaOptions::default()
            },
        )?;
        let blocks = be.available_kv_blocks();
        be.init_kv(blocks)?;
        Ok(Runner {
            be,
            next_block: 0,
            out: StepOutput::default(),
        })
    }

    /// One step: sequence `i` at `lens[i]` cached tokens adds `take[i]` tokens.
    fn step(
        &mut self,
        tables: &mut [Vec<u32>],
        lens: &mut [usize],
        take: &[usize],
    ) -> anyhow::Result<()> {
        let mut b = StepBatch::default();
        for ((t, len), &n) in tables.iter_mut().zip(lens.iter_mut()).zip(take) {
            let start = b.token_ids.len();
            while t.len() * BLOCK < *len + n {
                t.push(self.next_block);
                self.next_block += 1;
            }
            for p in *len..*len + n {
                b.token_ids.push((p % 1000) as u32);
                b.positions.push(p as u32);
                b.slot_mapping
                    .push(t[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32);
            }
            b.seqs.push(SeqSlice {
                query_start: start,
                query_len: n,
                context_len: *len,
            });
            b.block_tables.push(t.clone());
            b.logits_rows.push(start + n - 1);
            *len += n;
        }
        self.be.execute(&b, &mut self.out)?;
        Ok(())
    }

    fn reset(&mut self) {
        self.next_block = 0;
    }

    /// Prefills `batch` sequences to `ctx` tokens, then times `steps` decode steps.
    fn decode_time(&mut self, batch: usize, ctx: usize, steps: usize) -> anyhow::Result<f64> {
        self.reset();
        let mut tables = vec![Vec::new(); batch];
        let mut lens = vec![0usize; batch];
        for i in 0..batch {
            while lens[i] < ctx {
                let n = (ctx - lens[i]).min(4096);
                // Prefill one sequence at a time (sequences with 0 new tokens are skipped).
                let (mut t1, mut l1) = (vec![tables[i].clone()], vec![lens[i]]);
                self.step(&mut t1, &mut l1, &[n])?;
                tables[i] = t1.remove(0);
                lens[i] = l1[0];
            }
        }
        let ones = vec![1; batch];
        self.step(&mut tables, &mut lens, &ones)?; // warm-up
        let t = Instant::now();
        for _ in 0..steps {
            self.step(&mut tables, &mut lens, &ones)?;
        }
        Ok(t.elapsed().as_secs_f64() / steps as f64)
    }
}

fn main() -> anyhow::Result<()> {
    if let Err(why) = cuda::gpu_available() {
        println!("SKIPPED: no CUDA device ({why})");
        return Ok(());
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let steps = if quick { 8 } else { 32 };
    let bw = copy_bandwidth()?;
    println!("device copy bandwidth: {:.1} GB/s", bw / 1e9);

    // 2. Paged-attention decode kernel alone (Qwen2.5-7B attention: 28 / 4 heads, head 128).
    let kv_token_bytes = (2 * 4 * 128 * 2) as f64; // K + V, 4 KV heads, bf16, one layer
    let (max_batch, max_ctx) = (64usize, 8192usize);
    let mut h = AttentionHarness::new(HarnessShape {
        num_heads: 28,
        num_kv_heads: 4,
        head_size: 128,
        block_size: BLOCK,
        num_blocks: max_batch * max_ctx / BLOCK,
    })?;
    println!("paged-attention decode kernel (Qwen2.5-7B attention shape, one layer)");
    println!("batch  context  us/launch  kv_GB/s  fraction_of_copy");
    for &batch in &[1usize, 8, 32, 64] {
        for &ctx in &[512usize, 2048, 8192] {
            let per_seq = ctx / BLOCK;
            let rows = Rows {
                q: vec![0x3f80; batch * 28 * 128],
                row_seq: (0..batch as i32).collect(),
                row_keys: vec![ctx as i32; batch],
                block_tables: (0..(batch * per_seq) as i32).collect(),
                max_blocks: per_seq,
            };
            let (_, t) = h.attention(&rows, if quick { 5 } else { 50 })?;
            let gbs = batch as f64 * ctx as f64 * kv_token_bytes / t;
            println!(
                "{batch:5}  {ctx:7}  {:9.1}  {:7.1}  {:5.1}%",
                t * 1e6,
                gbs / 1e9,
                100.0 * gbs / bw
            );
        }
    }

    // 5a. Split-K at batch 1: every partition size, and what the planner picks.
    let sms = harness::sm_count()?;
    println!("split-K paged attention, batch 1 (Qwen2.5-7B attention shape, {sms} SMs)");
    println!("context  partition  us/launch  kv_GB/s  fraction_of_copy");
    for &ctx in &[512usize, 2048, 8192] {
        let per_seq = ctx / BLOCK;
        let rows = Rows {
            q: vec![0x3f80; 28 * 128],
            row_seq: vec![0],
            row_keys: vec![ctx as i32],
            block_tables: (0..per_seq as i32).collect(),
            max_blocks: per_seq,
        };
        let auto = launch::choose_partition_size(4, 1, ctx, sms, 4609);
        for &p in &[512usize, 256, 128, 64] {
            let (_, t) = h.attention_split(&rows, if quick { 5 } else { 200 }, p)?;
            let gbs = ctx as f64 * kv_token_bytes / t;
            println!(
                "{ctx:7}  {p:9}{}  {:9.1}  {:7.1}  {:5.1}%",
                if p == auto { "*" } else { " " },
                t * 1e6,
                gbs / 1e9,
                100.0 * gbs / bw
            );
        }
    }
    println!("(* = the planner's choice, launch::choose_partition_size)");
    drop(h);
    let kv_token_bytes_per_layer = kv_token_bytes;

    // 5b. GEMV kernel alone at Qwen2.5-14B projection shapes, batch 1: weight bytes / time.
    let kh = KernelHarness::new()?;
    println!("GEMV kernel, batch 1, Qwen2.5-14B projections");
    println!("shape            weights  us/launch  GB/s  fraction_of_copy");
    for &(name, n, k) in &[
        ("qkv", 7168usize, 5120usize),
        ("o", 5120, 5120),
        ("gate_up", 27648, 5120),
        ("down", 5120, 13824),
    ] {
        let w: Vec<u16> = (0..n * k)
            .map(|i| half::bf16::from_f32(((i % 17) as f32 - 8.0) / 64.0).to_bits())
            .collect();
        let q = fp8::quantize_rows(&w, n, k);
        let x = vec![0x3f80u16; k];
        let iters = if quick { 5 } else { 100 };
        for (label, gw, bytes) in [
            ("bf16", GemvWeights::Bf16(&w), 2 * n * k),
            ("fp8", GemvWeights::Fp8(&q), n * k + 4 * n),
        ] {
            let (_, t) = kh.gemv(gw, &x, n, k, 1, iters)?;
            let gbs = bytes as f64 / t;
            println!(
                "{name:8} {n:5}x{k:<5} {label:5} {:9.1}  {:6.1}  {:5.1}%",
                t * 1e6,
                gbs / 1e9,
                100.0 * gbs / bw
            );
        }
    }
    drop(kh);

    // 3 + 4 (+ 5c). Full Qwen2.5-7B shapes: bf16 / FP8 weights, without / with CUDA graphs.
    let cfg = qwen7b(28, 18944, 152_064);
    let dims = Dims {
        hidden: 3584,
        intermediate: 18944,
        num_heads: 28,
        num_kv_heads: 4,
        head_size: 128,
        num_layers: 28,
        vocab: 152_064,
    };
    let ctx = 512;
    let kv_bytes = ctx as f64 * kv_token_bytes_per_layer * 28.0;
    let mut single = Vec::new();
    // (weights, CUDA graphs, bf16 projections through gemv_bf16 instead of cuBLAS at ≤ 8 rows)
    let variants = [
        (WeightFormat::Bf16, false, false),
        (WeightFormat::Bf16, true, false),
        (WeightFormat::Bf16, true, true),
        (WeightFormat::Fp8, false, false),
        (WeightFormat::Fp8, true, false),
    ];
    for (format, graphs, gemv) in variants {
        // Bytes a decode step must read: every weight except the embedding table (one row is
        // gathered), plus the context's K/V.
        let weight_bytes = (dims.weight_bytes_as(false, format) - 2 * 152_064 * 3584) as f64;
        let roofline = bw / (weight_bytes + kv_bytes);
        let label = format!(
            "{format:?} weights, cuda graphs {}{}",
            if graphs { "on" } else { "off" },
            if gemv { ", gemv_bf16" } else { "" }
        );
        let mut r = Runner::new(cfg.clone(), 4096, 64, format, graphs, gemv)?;
        let t = r.decode_time(1, ctx, steps)?;
        println!(
            "single-stream decode, Qwen2.5-7B shapes, {label}, context {ctx}: {:.1} tok/s, \
             roofline {:.1} tok/s ({:.1}%)",
            1.0 / t,
            roofline,
            100.0 / t / roofline
        );
        single.push((format, graphs, gemv, t));
        println!("batched decode, Qwen2.5-7B shapes, {label}, context {ctx}");
        println!("batch  step_ms  tok/s  step/batch-1-step");
        let mut t1 = None;
        for &batch in &[1usize, 2, 4, 8, 16, 32, 64] {
            let t = r.decode_time(batch, ctx, steps)?;
            let base = *t1.get_or_insert(t);
            println!(
                "{batch:5}  {:7.2}  {:7.1}  {:5.2}x",
                t * 1e3,
                batch as f64 / t,
                t / base
            );
        }
        if graphs {
            println!("  ({} graphs captured)", r.be.graphs_captured());
        }
    }
    if let (Some(off), Some(on)) = (
        single
            .iter()
            .find(|s| s.0 == WeightFormat::Bf16 && !s.1 && !s.2),
        single
            .iter()
            .find(|s| s.0 == WeightFormat::Bf16 && s.1 && !s.2),
    ) {
        println!(
            "cuda graphs, bf16 single stream: {:.2} -> {:.2} ms per token ({:.2}x)",
            off.3 * 1e3,
            on.3 * 1e3,
            off.3 / on.3
        );
    }
    println!(
        "PyTorch + transformers baseline on the same shapes: python3 benches/torch_decode.py (docs/cuda-backend.md)"
    );
    Ok(())
}
