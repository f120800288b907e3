//! The CUDA backend against the CPU reference backend on tiny random Qwen2 models: logits within
//! a stated bf16 tolerance and identical greedy tokens, over ragged batches (a prefill chunk and
//! decodes in one step), chunked prefill, block boundaries, contexts across the 512-token
//! flash-decoding partition, and the GQA ratios of Qwen2.5 0.5B (7), 7B (7) and 14B (5) with
//! head sizes 64 and 128. Also the no-GPU contract: without a driver `load` returns
//! `Unavailable` (no panic) and `--tensor-parallel-size 2` is rejected.
//!
//! FP8 weights and CUDA graphs against the bf16 eager path on the same random weights: greedy
//! tokens equal on fixed prompts (teacher-forced, asserted wherever the bf16 top-2 margin
//! exceeds twice the tolerance) and logits within the stated tolerance.
//!
//! GPU tests print `SKIPPED: no CUDA device (<why>)` and pass on machines without a usable GPU.

use std::path::Path;

use switchyard::serve::backend::cpu::{CpuBackend, CpuOptions};
use switchyard::serve::backend::cuda::memory::WeightFormat;
use switchyard::serve::backend::cuda::{self, weights, CudaBackend, CudaOptions};
use switchyard::serve::backend::{Backend, BackendError, SeqSlice, StepBatch, StepOutput};
use switchyard::serve::model::testing::{write_tiny_qwen2_with, TinyDtype, TinyQwen2};

/// Tolerance on logits, relative to the row's largest |logit| (the CPU's). Both backends use the
/// same bf16 weights; the CPU computes in f32, the GPU rounds activations to bf16 (unit roundoff
/// u = 2^-8) at each op output: per layer the norm, QKV, RoPE'd K/V in the cache, attention, o_proj,
/// the second norm, gate/up, SiLU·mul and down (9; the residual stream and the lm_head output
/// stay f32), plus the final norm: k = 19 roundings for 2 layers, 10 for 1. Roundings are
/// independent (relative error within ±u, RMS u/√3) and add in quadrature through GEMMs over
/// 256–1280 terms, so the logits' error has RMS ≈ √k·u/√3 ≈ 0.01 of their RMS, which is ≈ 1.0
/// for these models (measured on the CPU: RMS 1.02–1.08, max|logit| 2.9–4.0). The largest of 300
/// such errors is ≈ 3σ ≈ 0.03 ≈ 0.01 × max|logit|; 0.02 leaves a factor 2. (All k roundings
/// aligned, k·u ≈ 0.074, would need errors correlated across every GEMM term.) The previous
/// 0.06 × max(1, max|logit|) let through ≈ 0.2 absolute, a fifth of a logit's RMS. Evidence at
/// the H100 run (2026-11-22): `cuda_serve` agreed on all 24 greedy tokens with CPU top-2 gaps down
/// to 0.0085, consistent with errors well under this bound; this value itself has not yet run
/// on a GPU.
const LOGIT_TOL: f32 = 0.02;
const BLOCK: usize = 16;

fn spec(layers: usize, heads: usize, kv_heads: usize, head: usize) -> TinyQwen2 {
    TinyQwen2 {
        seed: 42,
        layers,
        hidden: heads * head,
        heads,
        kv_heads,
        intermediate: 256,
        vocab: 300,
        dtype: TinyDtype::BF16,
        max_position_embeddings: 2048,
        tokenizer: false,
        ..TinyQwen2::default()
    }
}

fn skip() -> bool {
    match cuda::gpu_available() {
        Ok(()) => false,
        Err(why) => {
            println!("SKIPPED: no CUDA device ({why})");
            true
        }
    }
}

/// A sequence driven through both backends with the same block table.
struct Seq {
    tokens: Vec<u32>,
    cached: usize,
    blocks: Vec<u32>,
}

struct Pair {
    cpu: CpuBackend,
    gpu: CudaBackend,
    next_block: u32,
    vocab: usize,
}

impl Pair {
    fn new(dir: &Path) -> Pair {
        let mut cpu = CpuBackend::load(
            dir,
            CpuOptions {
                block_size: BLOCK,
                kv_cache_memory_bytes: 64 << 20,
                threads: 0,
            },
        )
        .unwrap();
        let mut gpu = CudaBackend::load(
            dir,
            CudaOptions {
                block_size: BLOCK,
                max_num_batched_tokens: 1024,
                max_num_seqs: 8,
                num_gpu_blocks_override: Some(512),
                ..CudaOptions::default()
            },
        )
        .unwrap();
        cpu.init_kv(256).unwrap();
        gpu.init_kv(256).unwrap();
        // Same geometry; the CPU keeps f32 K/V, the GPU bf16, so a GPU block is half the bytes.
        let (c, g) = (cpu.kv_spec(), gpu.kv_spec());
        assert_eq!(
            (c.num_layers, c.num_kv_heads, c.head_size, c.block_size),
            (g.num_layers, g.num_kv_heads, g.head_size, g.block_size)
        );
        assert_eq!(
            g.bytes_per_block,
            2 * g.num_layers * g.num_kv_heads * g.head_size * g.block_size * 2
        );
        assert_eq!(c.bytes_per_block, 2 * g.bytes_per_block);
        let vocab = cpu.vocab_size();
        Pair {
            cpu,
            gpu,
            next_block: 0,
            vocab,
        }
    }

    /// Runs one step in which `seqs[i]` advances by `take[i]` tokens; returns, per sequence
    /// that reached the end of its known tokens, (cpu logits, gpu logits).
    fn step(&mut self, seqs: &mut [Seq], take: &[usize]) -> Vec<(Vec<f32>, Vec<f32>)> {
        let mut b = StepBatch::default();
        for (s, &n) in seqs.iter_mut().zip(take) {
            if n == 0 {
                continue;
            }
            let start = b.token_ids.len();
            let end = s.cached + n;
            while s.blocks.len() * BLOCK < end {
                s.blocks.push(self.next_block);
                self.next_block += 1;
            }
            for p in s.cached..end {
                b.token_ids.push(s.tokens[p]);
                b.positions.push(p as u32);
                b.slot_mapping
                    .push(s.blocks[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32);
            }
            b.seqs.push(SeqSlice {
                query_start: start,
                query_len: n,
                context_len: s.cached,
            });
            b.block_tables.push(s.blocks.clone());
            s.cached = end;
            if end == s.tokens.len() {
                b.logits_rows.push(start + n - 1);
            }
        }
        let (mut oc, mut og) = (StepOutput::default(), StepOutput::default());
        self.cpu.execute(&b, &mut oc).unwrap();
        self.gpu.execute(&b, &mut og).unwrap();
        (0..b.logits_rows.len())
            .map(|r| (oc.row(r).unwrap().to_vec(), og.row(r).unwrap().to_vec()))
            .collect()
    }
}

fn argmax(v: &[f32]) -> (usize, f32) {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    (idx[0], v[idx[0]] - v[idx[1]])
}

/// Compares logits and greedy choices; returns the CPU's token (teacher forcing keeps the two
/// sequences identical even when a near-tie is allowed to differ).
fn check(cpu: &[f32], gpu: &[f32], what: &str) -> u32 {
    let max_diff = cpu
        .iter()
        .zip(gpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // No floor at 1: these models' logits reach 2.9–4.0, and a floor would loosen the bound
    // for a row of small logits instead of failing it.
    let scale = cpu.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        max_diff <= LOGIT_TOL * scale,
        "{what}: max |Δlogit| {max_diff} > {LOGIT_TOL} × {scale}"
    );
    let (c, margin) = argmax(cpu);
    let (g, _) = argmax(gpu);
    if margin > 2.0 * LOGIT_TOL * scale {
        assert_eq!(c, g, "{what}: greedy token differs (cpu margin {margin})");
    }
    c as u32
}

fn prompt(len: usize, salt: u32, vocab: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ salt) % (vocab as u32 - 1))
        .collect()
}

/// Prefill in `chunk`-token chunks, then `decode` greedy steps, for two sequences sharing
/// every step (a ragged batch).
fn run_model(spec: &TinyQwen2, lens: [usize; 2], chunk: usize, decode: usize) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2_with(dir.path(), spec).unwrap();
    let mut pair = Pair::new(dir.path());
    let vocab = pair.vocab;
    let mut seqs: Vec<Seq> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| Seq {
            tokens: prompt(l, i as u32 * 7919, vocab),
            cached: 0,
            blocks: Vec::new(),
        })
        .collect();
    let mut generated = 0;
    let mut steps = 0;
    while generated < decode {
        steps += 1;
        let take: Vec<usize> = seqs
            .iter()
            .map(|s| (s.tokens.len() - s.cached).min(chunk))
            .collect();
        let rows = pair.step(&mut seqs, &take);
        let mut r = rows.into_iter();
        for (i, s) in seqs.iter_mut().enumerate() {
            if s.cached == s.tokens.len() && take[i] > 0 {
                let (c, g) = r.next().unwrap();
                let what = format!("seq {i} at {} tokens (step {steps})", s.cached);
                s.tokens.push(check(&c, &g, &what));
            }
        }
        if seqs.iter().all(|s| s.cached + 1 == s.tokens.len()) {
            generated += 1;
        }
    }
}

#[test]
fn greedy_tokens_match_cpu_head64_gqa2() {
    if skip() {
        return;
    }
    // 17 and 33 tokens: the prompts end just past block boundaries.
    run_model(&spec(2, 4, 2, 64), [17, 33], 64, 24);
}

#[test]
fn chunked_prefill_across_partitions_qwen05b_ratio() {
    if skip() {
        return;
    }
    // Qwen2.5-0.5B: 14 heads over 2 KV heads, head 64. 600 and 1100 tokens cross one and two
    // 512-token partitions; 100-token chunks exercise chunked prefill over the paged cache.
    run_model(&spec(1, 14, 2, 64), [600, 1100], 100, 4);
}

#[test]
fn qwen7b_ratio_head128() {
    if skip() {
        return;
    }
    // Qwen2.5-7B: 28 / 4 = 7 heads per KV head, head 128.
    run_model(&spec(1, 7, 1, 128), [513, 40], 256, 8);
}

#[test]
fn qwen14b_ratio_head128() {
    if skip() {
        return;
    }
    // Qwen2.5-14B: 40 / 8 = 5 heads per KV head, head 128.
    run_model(&spec(1, 10, 2, 128), [70, 530], 128, 8);
}

#[test]
fn without_gpu_load_is_unavailable_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2_with(dir.path(), &spec(1, 4, 2, 64)).unwrap();
    match CudaBackend::load(dir.path(), CudaOptions::default()) {
        Ok(_) => println!("a GPU is present; the no-GPU path is covered elsewhere"),
        Err(BackendError::Unavailable(msg)) => {
            assert!(msg.contains("not found"), "{msg}");
            println!("no GPU here, as expected: {msg}");
        }
        Err(e) => {
            // A driver without a device (or a broken install) must still be an error, not a panic.
            assert!(cuda::gpu_available().is_err(), "unexpected failure: {e}");
        }
    }
}

#[test]
fn tensor_parallel_2_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2_with(dir.path(), &spec(1, 4, 2, 64)).unwrap();
    let err = CudaBackend::load(
        dir.path(),
        CudaOptions {
            tensor_parallel_size: 2,
            ..CudaOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, BackendError::Unavailable(m) if m.contains("--tensor-parallel-size 2 is not supported")),
        "{err}"
    );
}

#[test]
fn head_size_outside_kernels_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    // Head size 16 (hidden 64 over 4 heads): no kernel instantiation.
    write_tiny_qwen2_with(dir.path(), &spec(1, 4, 2, 16)).unwrap();
    let err = CudaBackend::load(dir.path(), CudaOptions::default()).unwrap_err();
    assert!(
        matches!(&err, BackendError::Unavailable(m) if m.contains("head size 16")),
        "{err}"
    );
}

/// Logits of FP8 weights vs bf16 weights (same random model): each weight moves by ≤ 2⁻⁴
/// relative (half an E4M3 ulp), with random signs, so a logit moves by ~2⁻⁴ / √3 of the
/// spread of its terms over 4 layers; 0.1 × max(1, max |logit|) holds that with room. The
/// measured maximum is printed.
const FP8_LOGIT_TOL: f32 = 0.1;

fn random_cfg() -> switchyard::serve::model::ModelConfig {
    // Qwen2.5-0.5B's attention shape (14 / 2 heads, head 64) at 4 layers and a small vocab.
    switchyard::serve::model::ModelConfig::from_json(&serde_json::json!({
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 2432,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "num_hidden_layers": 4,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "vocab_size": 4096,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": false
    }))
    .unwrap()
}

fn random_backend(format: WeightFormat, graphs: bool, gemv_bf16: bool) -> CudaBackend {
    let cfg = random_cfg();
    let mut be = CudaBackend::from_store(
        cfg.clone(),
        weights::random_store(&cfg, 3),
        CudaOptions {
            block_size: BLOCK,
            max_num_batched_tokens: 1024,
            max_num_seqs: 16,
            max_model_len: Some(4096),
            num_gpu_blocks_override: Some(512),
            weight_format: format,
            cuda_graphs: graphs,
            gemv_bf16,
            ..CudaOptions::default()
        },
    )
    .unwrap();
    be.init_kv(512).unwrap();
    assert_eq!(be.weight_format(), format);
    be
}

/// Drives `reference` and `other` through the same steps: prefill of `prompts` in 128-token
/// chunks, then `decode` greedy steps for all sequences together (a decode batch, which
/// graphs replay), teacher-forced on the reference's tokens. Returns (max |Δlogit| / scale,
/// greedy tokens compared, tokens equal).
fn compare_greedy(
    reference: &mut CudaBackend,
    other: &mut CudaBackend,
    prompts: &[Vec<u32>],
    decode: usize,
    tol: f32,
) -> (f32, usize, usize) {
    let mut seqs: Vec<Seq> = prompts
        .iter()
        .map(|p| Seq {
            tokens: p.clone(),
            cached: 0,
            blocks: Vec::new(),
        })
        .collect();
    let mut next_block = 0u32;
    let (mut worst, mut compared, mut equal) = (0f32, 0usize, 0usize);
    let mut steps = 0;
    loop {
        let take: Vec<usize> = seqs
            .iter()
            .map(|s| (s.tokens.len() - s.cached).min(128))
            .collect();
        let mut b = StepBatch::default();
        let mut wants = Vec::new();
        for (i, (s, &n)) in seqs.iter_mut().zip(&take).enumerate() {
            if n == 0 {
                continue;
            }
            let start = b.token_ids.len();
            let end = s.cached + n;
            while s.blocks.len() * BLOCK < end {
                s.blocks.push(next_block);
                next_block += 1;
            }
            for p in s.cached..end {
                b.token_ids.push(s.tokens[p]);
                b.positions.push(p as u32);
                b.slot_mapping
                    .push(s.blocks[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32);
            }
            b.seqs.push(SeqSlice {
                query_start: start,
                query_len: n,
                context_len: s.cached,
            });
            b.block_tables.push(s.blocks.clone());
            s.cached = end;
            if end == s.tokens.len() {
                b.logits_rows.push(start + n - 1);
                wants.push(i);
            }
        }
        let (mut o1, mut o2) = (StepOutput::default(), StepOutput::default());
        reference.execute(&b, &mut o1).unwrap();
        other.execute(&b, &mut o2).unwrap();
        for (r, &i) in wants.iter().enumerate() {
            let (a, g) = (o1.row(r).unwrap(), o2.row(r).unwrap());
            let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
            let diff = a
                .iter()
                .zip(g)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            worst = worst.max(diff / scale);
            assert!(
                diff <= tol * scale,
                "seq {i} step {steps}: max |Δlogit| {diff} > {tol} × {scale}"
            );
            let (ta, margin) = argmax(a);
            let (tg, _) = argmax(g);
            compared += 1;
            equal += usize::from(ta == tg);
            if margin > 2.0 * tol * scale {
                assert_eq!(
                    ta, tg,
                    "seq {i} step {steps}: greedy token differs (margin {margin})"
                );
            }
            seqs[i].tokens.push(ta as u32);
        }
        steps += 1;
        // Done once every sequence has generated `decode` tokens.
        if seqs
            .iter()
            .zip(prompts)
            .all(|(s, p)| s.tokens.len() >= p.len() + decode)
        {
            break;
        }
    }
    (worst, compared, equal)
}

fn fixed_prompts(vocab: usize) -> Vec<Vec<u32>> {
    // Three prompts: short, one block boundary past, and across two 512-key partitions.
    [9usize, 33, 1100]
        .iter()
        .enumerate()
        .map(|(i, &l)| prompt(l, i as u32 * 104_729, vocab))
        .collect()
}

#[test]
fn fp8_greedy_tokens_match_bf16_random_weights() {
    if skip() {
        return;
    }
    let mut bf = random_backend(WeightFormat::Bf16, false, false);
    let mut f8 = random_backend(WeightFormat::Fp8, false, false);
    let prompts = fixed_prompts(4096);
    let (worst, compared, equal) = compare_greedy(&mut bf, &mut f8, &prompts, 24, FP8_LOGIT_TOL);
    println!(
        "fp8 vs bf16: max |Δlogit| {worst:.4} × scale (tolerance {FP8_LOGIT_TOL}), greedy tokens \
         equal {equal}/{compared}"
    );
    assert!(compared >= 3 * 24);
}

/// Graph replay runs the same kernels on padded rows with a fixed layout, so logits match the
/// eager path up to split-K and cuBLAS choices for a different row count: 0.01 × scale.
#[test]
fn cuda_graphs_match_eager_bf16_and_fp8() {
    if skip() {
        return;
    }
    for format in [WeightFormat::Bf16, WeightFormat::Fp8] {
        let mut eager = random_backend(format, false, false);
        let mut graphs = random_backend(format, true, false);
        let prompts = fixed_prompts(4096);
        let (worst, compared, equal) = compare_greedy(&mut eager, &mut graphs, &prompts, 24, 0.01);
        println!(
            "{format:?} graphs vs eager: max |Δlogit| {worst:.5} × scale, greedy tokens equal \
             {equal}/{compared}, {} graphs captured",
            graphs.graphs_captured()
        );
        assert!(graphs.graphs_captured() >= 1);
        assert_eq!(eager.graphs_captured(), 0);
    }
}

/// bf16 projections through `gemv_bf16` (≤ 8 rows) vs cuBLAS: the same products summed in a
/// different order, so logits within 0.01 × scale and the same greedy rule.
#[test]
fn gemv_bf16_matches_cublas() {
    if skip() {
        return;
    }
    let mut blas = random_backend(WeightFormat::Bf16, false, false);
    let mut gemv = random_backend(WeightFormat::Bf16, false, true);
    let prompts = fixed_prompts(4096);
    let (worst, compared, equal) = compare_greedy(&mut blas, &mut gemv, &prompts, 24, 0.01);
    println!(
        "gemv_bf16 vs cuBLAS: max |Δlogit| {worst:.5} × scale, greedy tokens equal {equal}/{compared}"
    );
}
