//! Kernels against host references on random bf16 inputs:
//!
//! - paged attention (+ reduction) and reshape-and-cache against f64: ragged rows (decodes and
//!   a causal prefill chunk in one launch), scattered block tables, block boundaries, contexts
//!   below / at / across the partition, every split-K partition size (64–512), and the GQA
//!   shapes of Qwen2.5 0.5B (14/2, head 64), 7B (28/4, head 128) and 14B (40/8, head 128).
//!   Tolerance: |Δ| ≤ 0.01 + 0.01 |ref| per output element (bf16 output rounding is ≤ 2^-8
//!   relative; `__expf` and f32 accumulation add less);
//! - the GEMV (FP8 and bf16 weights) against f64 and FP8 dequantization bit for bit;
//! - the fused kernels (`fused_add_rms_norm`, `qkv_bias_rope_cache`) bit for bit against the
//!   pairs they replace.
//!
//! Prints `SKIPPED: no CUDA device (<why>)` without a GPU.

use switchyard::serve::backend::cuda::harness::{
    AttentionHarness, GemvWeights, HarnessShape, KernelHarness, Rows,
};
use switchyard::serve::backend::cuda::{self, fp8, weights};

const BS: usize = 16;

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn bf(&mut self, scale: f32) -> u16 {
        half::bf16::from_f32(self.f() * scale).to_bits()
    }
}

fn f(b: u16) -> f64 {
    half::bf16::from_bits(b).to_f64()
}

fn check_shape(heads: usize, kv_heads: usize, d: usize) {
    for partition in [512, 256, 128, 64] {
        check_shape_split(heads, kv_heads, d, partition);
    }
}

fn check_shape_split(heads: usize, kv_heads: usize, d: usize, partition: usize) {
    // Sequence contexts (keys already cached before this step); the last sequence also gets
    // a 5-token causal prefill chunk.
    let contexts = [1usize, 17, 511, 512, 513, 1300];
    let chunk = 5;
    let seq_tokens: Vec<usize> = contexts
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            if i + 1 == contexts.len() {
                c + chunk
            } else {
                c
            }
        })
        .collect();
    let max_blocks = seq_tokens.iter().map(|t| t.div_ceil(BS)).max().unwrap();
    let total_blocks: usize = seq_tokens.iter().map(|t| t.div_ceil(BS)).sum();
    let shape = HarnessShape {
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_size: d,
        block_size: BS,
        num_blocks: total_blocks + 3,
    };
    let mut h = AttentionHarness::new(shape).unwrap();
    let mut rng = Rng(heads as u64 * 31 + d as u64);
    let kvw = kv_heads * d;

    // Scattered physical blocks: hand them out in a strided order.
    let mut order: Vec<u32> = (0..shape.num_blocks as u32).collect();
    order.sort_by_key(|&b| (b * 7919) % shape.num_blocks as u32);
    let mut next = order.into_iter();
    let mut tables = Vec::new();
    let (mut ks, mut vs) = (Vec::new(), Vec::new());
    let (mut all_k, mut all_v, mut slots) = (Vec::new(), Vec::new(), Vec::new());
    for &t in &seq_tokens {
        let table: Vec<u32> = (0..t.div_ceil(BS)).map(|_| next.next().unwrap()).collect();
        let k: Vec<u16> = (0..t * kvw).map(|_| rng.bf(2.0)).collect();
        let v: Vec<u16> = (0..t * kvw).map(|_| rng.bf(1.0)).collect();
        for p in 0..t {
            slots.push((table[p / BS] as usize * BS + p % BS) as i32);
        }
        all_k.extend_from_slice(&k);
        all_v.extend_from_slice(&v);
        tables.push(table);
        ks.push(k);
        vs.push(v);
    }
    h.write_kv(&all_k, &all_v, &slots).unwrap();

    let mut rows = Rows {
        max_blocks,
        ..Rows::default()
    };
    for t in &tables {
        rows.block_tables.extend(t.iter().map(|&b| b as i32));
        rows.block_tables
            .extend(std::iter::repeat_n(0, max_blocks - t.len()));
    }
    for (i, &c) in contexts.iter().enumerate() {
        let n_rows = if i + 1 == contexts.len() { chunk } else { 1 };
        for j in 0..n_rows {
            rows.row_seq.push(i as i32);
            // Decode rows attend to their whole context (the new token was just written);
            // prefill row j sees keys 0 ..= c + j.
            rows.row_keys
                .push(if n_rows == 1 { c } else { c + j + 1 } as i32);
            rows.q.extend((0..heads * d).map(|_| rng.bf(1.0)));
        }
    }
    let (out, _) = h.attention_split(&rows, 0, partition).unwrap();

    let group = heads / kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    for (r, (&seq, &n)) in rows.row_seq.iter().zip(&rows.row_keys).enumerate() {
        let (k, v) = (&ks[seq as usize], &vs[seq as usize]);
        for head in 0..heads {
            let kvh = head / group;
            let q = &rows.q[(r * heads + head) * d..(r * heads + head + 1) * d];
            let logits: Vec<f64> = (0..n as usize)
                .map(|p| {
                    (0..d)
                        .map(|i| f(q[i]) * f(k[p * kvw + kvh * d + i]))
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
            let s: f64 = e.iter().sum();
            for i in 0..d {
                let want = e
                    .iter()
                    .enumerate()
                    .map(|(p, w)| w * f(v[p * kvw + kvh * d + i]))
                    .sum::<f64>()
                    / s;
                let got = f(out[(r * heads + head) * d + i]);
                assert!(
                    (got - want).abs() <= 0.01 + 0.01 * want.abs(),
                    "heads {heads}/{kv_heads} d {d} partition {partition}: row {r} (seq {seq}, {n} keys) head {head} dim {i}: {got} vs {want}"
                );
            }
        }
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

#[test]
fn attention_qwen05b_shape() {
    if !skip() {
        check_shape(14, 2, 64);
    }
}

#[test]
fn attention_qwen7b_shape() {
    if !skip() {
        check_shape(28, 4, 128);
    }
}

#[test]
fn attention_qwen14b_shape() {
    if !skip() {
        check_shape(40, 8, 128);
    }
}

/// FP8 GEMV at Qwen2.5-7B's hidden size (k = 3584), an output count that leaves a partial
/// block (n = 203), 1 / 3 / 8 rows, channels of very different magnitudes. Against f64 on the
/// same FP8 weights: |Δ| ≤ 2⁻⁸ |ref| + 2⁻¹⁶ Σ|w·x| (bf16 output rounding is ≤ 2⁻⁸ relative; the f32 sum's
/// bound γ_(k/32+6) ≈ 7e-6 relative to Σ|w·x|, pinned on the host by the emulate test).
#[test]
fn gemv_fp8_and_bf16_against_f64() {
    if skip() {
        return;
    }
    let h = KernelHarness::new().unwrap();
    let (n, k) = (203usize, 3584usize);
    let mut rng = Rng(5);
    let w: Vec<u16> = (0..n * k)
        .map(|i| rng.bf(2f32.powi((i / k) as i32 % 7 - 4)))
        .collect();
    let q = fp8::quantize_rows(&w, n, k);
    for rows in [1usize, 3, 8] {
        let x: Vec<u16> = (0..rows * k).map(|_| rng.bf(1.0)).collect();
        for (fp8w, name) in [(true, "fp8"), (false, "bf16")] {
            let gw = if fp8w {
                GemvWeights::Fp8(&q)
            } else {
                GemvWeights::Bf16(&w)
            };
            let (out, _) = h.gemv(gw, &x, n, k, rows, 0).unwrap();
            for t in 0..rows {
                for o in 0..n {
                    let wv = |i: usize| {
                        if fp8w {
                            fp8::decode(q.codes[o * k + i]) as f64 * q.scales[o] as f64
                        } else {
                            f(w[o * k + i])
                        }
                    };
                    let terms = (0..k).map(|i| wv(i) * f(x[t * k + i]));
                    let want: f64 = terms.clone().sum();
                    let mag: f64 = terms.map(f64::abs).sum();
                    let got = f(out[t * n + o]);
                    assert!(
                        (got - want).abs() <= want.abs() / 256.0 + mag / 65536.0,
                        "{name} row {t} channel {o}: {got} vs {want}"
                    );
                }
            }
        }
    }
    // Dequantization: bf16(decode(code) · scale), bit for bit.
    let deq = h.fp8_dequant(&q).unwrap();
    for (i, &got) in deq.iter().enumerate() {
        let want = half::bf16::from_f32(fp8::decode(q.codes[i]) * q.scales[i / k]).to_bits();
        assert_eq!(got, want, "element {i}");
    }
}

/// `fused_add_rms_norm` is bit-identical to `residual_add` then `rms_norm` (hidden and output),
/// at Qwen2.5-7B's and 14B's hidden sizes.
#[test]
fn fused_add_rms_norm_is_bit_identical() {
    if skip() {
        return;
    }
    let h = KernelHarness::new().unwrap();
    let mut rng = Rng(9);
    for hidden in [3584usize, 5120] {
        let rows = 5;
        let x: Vec<f32> = (0..rows * hidden).map(|_| rng.f() * 4.0).collect();
        let branch: Vec<u16> = (0..rows * hidden).map(|_| rng.bf(1.0)).collect();
        let weight: Vec<u16> = (0..hidden).map(|_| rng.bf(1.5)).collect();
        let fused = h.add_rms_norm(true, &x, &branch, &weight, 1e-6).unwrap();
        let pair = h.add_rms_norm(false, &x, &branch, &weight, 1e-6).unwrap();
        assert_eq!(
            fused.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            pair.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "hidden {hidden}: residual stream"
        );
        assert_eq!(fused.1, pair.1, "hidden {hidden}: normed output");
    }
}

/// `qkv_bias_rope_cache` is bit-identical to `qkv_bias_rope` then `reshape_and_cache`: the
/// rotated Q in the QKV buffer and both caches, Qwen2.5-7B (28/4, head 128) and 0.5B (14/2,
/// head 64) layouts, scattered slots and one padding token.
#[test]
fn rope_into_cache_is_bit_identical() {
    if skip() {
        return;
    }
    let h = KernelHarness::new().unwrap();
    let mut rng = Rng(13);
    for (heads, kv_heads, d) in [(28usize, 4usize, 128usize), (14, 2, 64)] {
        let shape = HarnessShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_size: d,
            block_size: BS,
            num_blocks: 6,
        };
        let width = (heads + 2 * kv_heads) * d;
        let positions = [0i32, 17, 95, 40, 3, 63];
        let slots = [5i32, 63, 90, -1, 16, 0];
        let qkv: Vec<u16> = (0..positions.len() * width).map(|_| rng.bf(1.0)).collect();
        let bias: Vec<u16> = (0..width).map(|_| rng.bf(0.1)).collect();
        let rope = weights::rope_table(d, 1_000_000.0, 128);
        let fused = h
            .rope_cache(true, shape, &qkv, &bias, &rope, &positions, &slots)
            .unwrap();
        let pair = h
            .rope_cache(false, shape, &qkv, &bias, &rope, &positions, &slots)
            .unwrap();
        assert_eq!(fused.qkv, pair.qkv, "{heads}/{kv_heads}: Q");
        assert_eq!(
            fused.key_cache, pair.key_cache,
            "{heads}/{kv_heads}: key cache"
        );
        assert_eq!(
            fused.value_cache, pair.value_cache,
            "{heads}/{kv_heads}: value cache"
        );
        assert!(fused.key_cache.iter().any(|&b| b != 0));
    }
}
