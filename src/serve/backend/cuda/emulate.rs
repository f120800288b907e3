//! Host emulation of the kernels (test only), pinning the arithmetic they implement; the GPU
//! tests (`tests/cuda_kernels.rs`) check the kernels themselves against the same references.
//!
//! - `attention.cu`: the paged-cache index formulas (key groups of `KEY_X`, value rows per
//!   dim), GQA head mapping, split-K partitions of any supported size with per-partition
//!   softmax, and the max-rescaled reduction, against plain full softmax attention.
//! - `gemv.cu`: lane-strided 16-weight chunks with FMA, butterfly warp sum, per-channel FP8
//!   scale after the sum, against f64.
//! - `fused_add_rms_norm` and `qkv_bias_rope_cache`: the fused kernels against the unfused
//!   pair they replace (cache index formulas, bf16 rounding points).

use super::compile::KEY_X;
use super::launch::{MIN_PARTITION_SIZE, PARTITION_SIZE};

struct Cache {
    kv_heads: usize,
    d: usize,
    bs: usize,
    key: Vec<f32>,
    value: Vec<f32>,
}

impl Cache {
    fn tile(&self, block: usize, h: usize) -> usize {
        (block * self.kv_heads + h) * self.d * self.bs
    }
    /// `reshape_and_cache`'s index formulas.
    fn write(&mut self, slot: usize, h: usize, k: &[f32], v: &[f32]) {
        let (block, off) = (slot / self.bs, slot % self.bs);
        let tile = self.tile(block, h);
        for d in 0..self.d {
            self.key[tile + (d / KEY_X) * self.bs * KEY_X + off * KEY_X + d % KEY_X] = k[d];
            self.value[tile + d * self.bs + off] = v[d];
        }
    }
    fn key(&self, block: usize, off: usize, h: usize, d: usize) -> f32 {
        self.key[self.tile(block, h) + (d / KEY_X) * self.bs * KEY_X + off * KEY_X + d % KEY_X]
    }
    fn value(&self, block: usize, off: usize, h: usize, d: usize) -> f32 {
        self.value[self.tile(block, h) + d * self.bs + off]
    }
}

/// What one (row, head) computes with `partition`-key partitions: partitions then reduction,
/// as the two kernels do.
fn emulate_row(
    cache: &Cache,
    table: &[usize],
    q: &[f32],
    kv_head: usize,
    n_keys: usize,
    partition: usize,
) -> Vec<f32> {
    let d = cache.d;
    let scale = 1.0 / (d as f32).sqrt();
    let parts = n_keys.div_ceil(partition);
    let mut partial = Vec::new();
    for p in 0..parts {
        let start = p * partition;
        let end = (start + partition).min(n_keys);
        let logits: Vec<f32> = (start..end)
            .map(|k| {
                let (b, off) = (table[k / cache.bs], k % cache.bs);
                (0..d)
                    .map(|i| q[i] * scale * cache.key(b, off, kv_head, i))
                    .sum()
            })
            .collect();
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
        let s: f32 = e.iter().sum();
        let o: Vec<f32> = (0..d)
            .map(|i| {
                (start..end)
                    .zip(&e)
                    .map(|(k, w)| w * cache.value(table[k / cache.bs], k % cache.bs, kv_head, i))
                    .sum::<f32>()
                    / s
            })
            .collect();
        partial.push((m, s, o));
    }
    if parts == 1 {
        return partial.remove(0).2;
    }
    let big_m = partial
        .iter()
        .map(|p| p.0)
        .fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f32> = partial
        .iter()
        .map(|(m, s, _)| s * (m - big_m).exp())
        .collect();
    let total: f32 = w.iter().sum();
    (0..d)
        .map(|i| partial.iter().zip(&w).map(|(p, w)| w * p.2[i]).sum::<f32>() / total)
        .collect()
}

/// `gemv_impl` for one output channel: lane l sums chunks l, l + 32, … of 16 weights with FMA
/// in order, the butterfly warp sum combines the 32 lanes, then the channel scale.
/// `w` holds the decoded weights (FP8 code values or bf16 values), `x` one token row.
fn gemv_channel(w: &[f32], x: &[f32], scale: f32) -> f32 {
    let chunks = w.len() / 16;
    let mut lanes = [0f32; 32];
    for (lane, acc) in lanes.iter_mut().enumerate() {
        for c in (lane..chunks).step_by(32) {
            for i in c * 16..c * 16 + 16 {
                *acc = w[i].mul_add(x[i], *acc);
            }
        }
    }
    for o in [16, 8, 4, 2, 1] {
        let prev = lanes;
        for (l, v) in lanes.iter_mut().enumerate() {
            *v = prev[l] + prev[l ^ o];
        }
    }
    lanes[0] * scale
}

/// bf16 rounding as `f2bf` does it (round to nearest even).
fn bf(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// `fused_add_rms_norm` over one row with `threads` threads: `hidden += branch` in f32, the
/// thread-strided sum of squares (FMA), warp butterflies, the warps summed in order; returns the
/// normed row (bf16 values). `rsqrt` is taken exactly here (the device's `rsqrtf` is within
/// 2 ulp, far inside the bf16 output rounding).
fn fused_add_rms_norm(hidden: &mut [f32], branch: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let threads = super::launch::ROW_THREADS;
    let n = hidden.len();
    let mut partial = vec![0f32; threads];
    for (t, acc) in partial.iter_mut().enumerate() {
        for i in (t..n).step_by(threads) {
            let v = hidden[i] + branch[i];
            hidden[i] = v;
            *acc = v.mul_add(v, *acc);
        }
    }
    let mut total = 0f32;
    for warp in partial.chunks_exact(32) {
        let mut lanes: Vec<f32> = warp.to_vec();
        for o in [16, 8, 4, 2, 1] {
            let prev = lanes.clone();
            for (l, v) in lanes.iter_mut().enumerate() {
                *v = prev[l] + prev[l ^ o];
            }
        }
        total += lanes[0];
    }
    let inv = 1.0 / (total / n as f32 + eps).sqrt();
    hidden
        .iter()
        .zip(weight)
        .map(|(x, w)| bf(x * inv * w))
        .collect()
}

/// Geometry of one token's fused QKV row.
#[derive(Clone, Copy)]
struct QkvShape {
    heads: usize,
    kv_heads: usize,
    d: usize,
}

impl QkvShape {
    fn width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.d
    }
}

/// `qkv_bias_rope` on one token row (in place) — the unfused first half.
fn qkv_bias_rope(s: QkvShape, row: &mut [f32], bias: &[f32], cs: &[f32]) {
    let half = s.d / 2;
    for p in 0..(s.heads + s.kv_heads) * half {
        let (h, i) = (p / half, p % half);
        let a = h * s.d + i;
        let b = a + half;
        let x1 = row[a] + bias[a];
        let x2 = row[b] + bias[b];
        let (c, sn) = (cs[2 * i], cs[2 * i + 1]);
        row[a] = bf(x1 * c - x2 * sn);
        row[b] = bf(x2 * c + x1 * sn);
    }
    for i in (s.heads + s.kv_heads) * s.d..s.width() {
        row[i] = bf(row[i] + bias[i]);
    }
}

/// `qkv_bias_rope_cache` on one token: Q rotated in place, K rotated and V biased straight into
/// the cache with the kernel's own index formulas (not `Cache::write`, so the two paths are
/// independent).
fn qkv_bias_rope_cache(
    s: QkvShape,
    row: &mut [f32],
    bias: &[f32],
    cs: &[f32],
    cache: &mut Cache,
    slot: i64,
) {
    let half = s.d / 2;
    let bs = cache.bs;
    let (block, off) = if slot >= 0 {
        (slot as usize / bs, slot as usize % bs)
    } else {
        (0, 0)
    };
    for p in 0..(s.heads + s.kv_heads) * half {
        let (h, i) = (p / half, p % half);
        let a = h * s.d + i;
        let b = a + half;
        let x1 = row[a] + bias[a];
        let x2 = row[b] + bias[b];
        let (c, sn) = (cs[2 * i], cs[2 * i + 1]);
        let ra = bf(x1 * c - x2 * sn);
        let rb = bf(x2 * c + x1 * sn);
        if h < s.heads {
            row[a] = ra;
            row[b] = rb;
        } else if slot >= 0 {
            let tile = (block * s.kv_heads + (h - s.heads)) * s.d * bs;
            cache.key[tile + (i / KEY_X) * bs * KEY_X + off * KEY_X + i % KEY_X] = ra;
            let j = i + half;
            cache.key[tile + (j / KEY_X) * bs * KEY_X + off * KEY_X + j % KEY_X] = rb;
        }
    }
    if slot < 0 {
        return;
    }
    let v0 = (s.heads + s.kv_heads) * s.d;
    for i in 0..s.kv_heads * s.d {
        let (h, d) = (i / s.d, i % s.d);
        let tile = (block * s.kv_heads + h) * s.d * bs;
        cache.value[tile + d * bs + off] = bf(row[v0 + i] + bias[v0 + i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// γ_n = n·u / (1 − n·u), u = 2⁻²⁴: the classic bound on the relative error of n f32
    /// operations in sequence (Higham, ch. 3).
    fn gamma(n: usize) -> f64 {
        let nu = n as f64 * 2f64.powi(-24);
        nu / (1.0 - nu)
    }

    #[test]
    fn partitioned_gqa_attention_equals_full_softmax() {
        // Qwen2.5-7B ratio (7 query heads per KV head), head 128, block 16; contexts below, at
        // and across every split-K partition size, with every partition size the planner can
        // pick (64 … 512), each partition's softmax then the rescaled reduction.
        let (heads, kv_heads, d, bs) = (7, 1, 128, 16);
        let mut seed = 1;
        let mut worst = 0f64;
        for n_keys in [1usize, 17, 64, 65, 512, 513, 1300] {
            let blocks = n_keys.div_ceil(bs);
            // Scattered physical blocks: table[i] = reversed order with a gap.
            let table: Vec<usize> = (0..blocks).map(|i| 2 * (blocks - 1 - i) + 1).collect();
            let num_blocks = 2 * blocks + 1;
            let mut cache = Cache {
                kv_heads,
                d,
                bs,
                key: vec![f32::NAN; num_blocks * kv_heads * d * bs],
                value: vec![f32::NAN; num_blocks * kv_heads * d * bs],
            };
            let keys: Vec<Vec<f32>> = (0..n_keys)
                .map(|_| (0..d).map(|_| rand(&mut seed) * 3.0).collect())
                .collect();
            let vals: Vec<Vec<f32>> = (0..n_keys)
                .map(|_| (0..d).map(|_| rand(&mut seed)).collect())
                .collect();
            for k in 0..n_keys {
                let slot = table[k / bs] * bs + k % bs;
                cache.write(slot, 0, &keys[k], &vals[k]);
            }
            for head in 0..heads {
                let q: Vec<f32> = (0..d).map(|_| rand(&mut seed)).collect();
                let kv_head = head / (heads / kv_heads);
                // Full softmax in f64.
                let scale = 1.0 / (d as f64).sqrt();
                let logits: Vec<f64> = keys
                    .iter()
                    .map(|k| {
                        k.iter()
                            .zip(&q)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let s: f64 = e.iter().sum();
                // Tolerance, from the f32 arithmetic: each logit is a d-term dot product, off
                // by δ ≤ γ_(d+1) · Σ|q·k| · scale; perturbing every logit by ≤ δ moves each
                // softmax weight by a factor within e^(±2δ), so the output (a convex
                // combination of values with |v| ≤ 1) moves by ≤ e^(2δ) − 1. The exp-sums and
                // the weighted value sums over n keys add γ_(n + partitions + 4) relative each
                // (exp itself and the final division a few ulps). With |k| ≤ 3, |q| ≤ 1, d = 128:
                // δ ≤ 3.2e-4 worst case, 2.3e-6 … 1.5e-4 for these draws.
                let delta = keys
                    .iter()
                    .map(|k| {
                        k.iter()
                            .zip(&q)
                            .map(|(a, b)| (a * b).abs() as f64)
                            .sum::<f64>()
                    })
                    .fold(0f64, f64::max)
                    * scale
                    * gamma(d + 1);
                let tol = (2.0 * delta).exp_m1() + 2.0 * gamma(2 * n_keys + 16);
                for partition in [64, 128, 256, 512] {
                    assert!((MIN_PARTITION_SIZE..=PARTITION_SIZE).contains(&partition));
                    let got = emulate_row(&cache, &table, &q, kv_head, n_keys, partition);
                    for i in 0..d {
                        let want: f64 = e
                            .iter()
                            .zip(&vals)
                            .map(|(w, v)| w * v[i] as f64)
                            .sum::<f64>()
                            / s;
                        let err = (got[i] as f64 - want).abs();
                        worst = worst.max(err / tol);
                        assert!(
                            err <= tol,
                            "{n_keys} keys, partition {partition}, head {head}, dim {i}: {} vs \
                             {want} (|Δ| {err:e} > {tol:e})",
                            got[i]
                        );
                    }
                }
            }
        }
        println!("worst attention error: {:.3} of the bound", worst);
    }

    #[test]
    fn fp8_gemv_against_f64_and_the_bf16_weights() {
        use crate::serve::backend::cuda::fp8;
        // Qwen2.5-7B's hidden size as K; 24 output channels of very different magnitudes (a
        // per-channel scale must follow each), 1 and 8 token rows.
        let (n, k) = (24usize, 3584usize);
        let mut seed = 7;
        let w_bits: Vec<u16> = (0..n * k)
            .map(|i| {
                let mag = 2f32.powi((i / k) as i32 % 9 - 6);
                half::bf16::from_f32(rand(&mut seed) * mag).to_bits()
            })
            .collect();
        let q = fp8::quantize_rows(&w_bits, n, k);
        let mut worst_sum = 0f64;
        let mut worst_quant = 0f64;
        for rows in [1usize, 8] {
            let x: Vec<f32> = (0..rows * k).map(|_| bf(rand(&mut seed) * 2.0)).collect();
            for t in 0..rows {
                let xt = &x[t * k..(t + 1) * k];
                for o in 0..n {
                    let codes = &q.codes[o * k..(o + 1) * k];
                    let wq: Vec<f32> = codes.iter().map(|&c| fp8::decode_like_kernel(c)).collect();
                    let got = gemv_channel(&wq, xt, q.scales[o]);
                    // Against f64 on the same FP8 weights: each lane adds k/32 products in
                    // sequence, 5 butterfly levels and the scale follow, so the f32 error is at
                    // most γ_(k/32 + 6) · Σ|w·x| · scale.
                    let exact: f64 = wq
                        .iter()
                        .zip(xt)
                        .map(|(w, x)| *w as f64 * *x as f64)
                        .sum::<f64>()
                        * q.scales[o] as f64;
                    let mag: f64 = wq
                        .iter()
                        .zip(xt)
                        .map(|(w, x)| (*w as f64 * *x as f64).abs())
                        .sum::<f64>()
                        * q.scales[o] as f64;
                    let bound = gamma(k / 32 + 6) * mag;
                    let err = (got as f64 - exact).abs();
                    worst_sum = worst_sum.max(err / bound);
                    assert!(err <= bound, "row {t} channel {o}: {got} vs {exact}");
                    // Against the original bf16 weights: each FP8 weight is within half an ulp
                    // (2⁻⁴ relative, or 2⁻¹⁰ · scale in the subnormal range).
                    let bf16_exact: f64 = w_bits[o * k..(o + 1) * k]
                        .iter()
                        .zip(xt)
                        .map(|(&b, x)| half::bf16::from_bits(b).to_f64() * *x as f64)
                        .sum();
                    let qbound: f64 = w_bits[o * k..(o + 1) * k]
                        .iter()
                        .zip(xt)
                        .map(|(&b, x)| {
                            let w = half::bf16::from_bits(b).to_f64().abs();
                            (w / 16.0).max(q.scales[o] as f64 / 1024.0) * (*x as f64).abs()
                        })
                        .sum::<f64>()
                        + bound;
                    let qerr = (got as f64 - bf16_exact).abs();
                    worst_quant = worst_quant.max(qerr / qbound);
                    assert!(
                        qerr <= qbound,
                        "row {t} channel {o}: quantization {qerr} > {qbound}"
                    );
                }
            }
        }
        println!(
            "fp8 gemv: worst f32 error {worst_sum:.3} of its bound, worst quantization error \
             {worst_quant:.3} of its bound"
        );
        // The bf16 GEMV is the same arithmetic with scale 1.
        let x: Vec<f32> = (0..k).map(|_| bf(rand(&mut seed))).collect();
        let w: Vec<f32> = w_bits[..k]
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect();
        let exact: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
        let mag: f64 = w
            .iter()
            .zip(&x)
            .map(|(a, b)| (*a as f64 * *b as f64).abs())
            .sum();
        assert!((gemv_channel(&w, &x, 1.0) as f64 - exact).abs() <= gamma(k / 32 + 6) * mag);
    }

    #[test]
    fn fused_add_rms_norm_matches_f64() {
        // Qwen2.5-14B hidden size: 5120 = 20 elements per thread.
        let n = 5120;
        let mut seed = 3;
        let hidden0: Vec<f32> = (0..n).map(|_| rand(&mut seed) * 4.0).collect();
        let branch: Vec<f32> = (0..n).map(|_| bf(rand(&mut seed))).collect();
        let weight: Vec<f32> = (0..n).map(|_| bf(1.0 + rand(&mut seed) / 4.0)).collect();
        let mut hidden = hidden0.clone();
        let out = fused_add_rms_norm(&mut hidden, &branch, &weight, 1e-6);
        // The residual stream is exactly the f32 sum (what `residual_add` stores).
        for i in 0..n {
            assert_eq!(hidden[i], hidden0[i] + branch[i]);
        }
        let ss: f64 = hidden.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
        let inv = 1.0 / (ss + 1e-6).sqrt();
        for i in 0..n {
            let want = hidden[i] as f64 * inv * weight[i] as f64;
            // bf16 output rounding (≤ 2⁻⁸ relative) dominates; the f32 sum of squares adds
            // γ_(20 + 5 + 8) relative on ss (half that on 1/rms) and the two f32 products 2u.
            let tol = want.abs() * (2f64.powi(-8) + gamma(40)) + 1e-30;
            assert!(
                (out[i] as f64 - want).abs() <= tol,
                "{i}: {} vs {want}",
                out[i]
            );
        }
    }

    #[test]
    fn rope_into_cache_equals_rope_then_reshape_and_cache() {
        // Qwen2.5-7B head layout (28 / 4 heads, head 128) scaled down to 7 / 1 and 14 / 2 with
        // head 64; tokens spread over blocks, one padding token (slot −1).
        for (heads, kv_heads, d) in [(7usize, 1usize, 128usize), (14, 2, 64)] {
            let s = QkvShape { heads, kv_heads, d };
            let bs = 16;
            let num_blocks = 4;
            let new_cache = || Cache {
                kv_heads,
                d,
                bs,
                key: vec![0.0; num_blocks * kv_heads * d * bs],
                value: vec![0.0; num_blocks * kv_heads * d * bs],
            };
            let (mut fused, mut unfused) = (new_cache(), new_cache());
            let mut seed = 11;
            let bias: Vec<f32> = (0..s.width()).map(|_| bf(rand(&mut seed) / 10.0)).collect();
            let rope = super::super::weights::rope_table(d, 1_000_000.0, 64);
            for (pos, slot) in [(0usize, 5i64), (17, 63), (40, 16), (63, -1), (1, 0)] {
                let row0: Vec<f32> = (0..s.width()).map(|_| bf(rand(&mut seed))).collect();
                let cs = &rope[pos * d..(pos + 1) * d];
                let mut a = row0.clone();
                qkv_bias_rope_cache(s, &mut a, &bias, cs, &mut fused, slot);
                let mut b = row0.clone();
                qkv_bias_rope(s, &mut b, &bias, cs);
                if slot >= 0 {
                    let kvw = kv_heads * d;
                    let k0 = heads * d;
                    for h in 0..kv_heads {
                        unfused.write(
                            slot as usize,
                            h,
                            &b[k0 + h * d..k0 + (h + 1) * d],
                            &b[k0 + kvw + h * d..k0 + kvw + (h + 1) * d],
                        );
                    }
                }
                // Q (what attention reads from the QKV buffer) is identical.
                assert_eq!(&a[..heads * d], &b[..heads * d], "Q at position {pos}");
            }
            assert_eq!(
                fused.key, unfused.key,
                "{heads}/{kv_heads} heads, key cache"
            );
            assert_eq!(
                fused.value, unfused.value,
                "{heads}/{kv_heads} heads, value cache"
            );
            assert!(fused.key.iter().any(|&v| v != 0.0));
        }
    }
}
