//! f32 kernels of the CPU forward pass: dot products, the weight matmul, RMSNorm, RoPE, SwiGLU.
//!
//! Hand-written rather than a BLAS crate: the shapes are fixed (activations × transposed weight
//! rows), a BLAS would bring a C/Fortran toolchain into the build, and the CPU backend is the
//! correctness oracle first; these loops are written so LLVM vectorises them on any x86-64/ARM.

use rayon::prelude::*;

use super::quant::{self, ActKind, Acts};
use crate::serve::model::matrix::{Matrix, QuantMatrix};

/// Lanes of the dot-product accumulators: independent partial sums let LLVM keep several SIMD
/// registers busy (float addition is not associative, so one accumulator would serialise).
const LANES: usize = 16;

/// Tokens processed together against one weight chunk, so their activation rows stay in L1/L2
/// while each weight row streams once per tile.
const TOKEN_TILE: usize = 8;

/// `Σ a[i]·b[i]` over the shorter of the two slices.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    let mut acc = [0f32; LANES];
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    // Pairwise reduction of the lanes keeps the rounding error independent of the length.
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0] + s
}

/// Tokens per tile in the quantized matmul: their 8-bit activation rows (a few KB each) stay in
/// L1/L2 while each weight row is unpacked once per four of them.
const QUANT_TOKEN_TILE: usize = 32;

/// A weight matrix as the kernels read it.
#[derive(Debug, Clone, Copy)]
pub enum Weight<'a> {
    F32(&'a [f32]),
    Quant(&'a QuantMatrix),
}

impl<'a> From<&'a [f32]> for Weight<'a> {
    fn from(w: &'a [f32]) -> Self {
        Weight::F32(w)
    }
}

impl<'a> From<&'a Vec<f32>> for Weight<'a> {
    fn from(w: &'a Vec<f32>) -> Self {
        Weight::F32(w)
    }
}

impl<'a> From<&'a Matrix> for Weight<'a> {
    fn from(w: &'a Matrix) -> Self {
        match w {
            Matrix::F32(v) => Weight::F32(v),
            Matrix::Quant(q) => Weight::Quant(q),
        }
    }
}

/// Buffers a matmul reuses across calls: the transposed result of multi-token matmuls and the
/// quantized activations.
#[derive(Debug, Default)]
pub struct MatmulScratch {
    buf: Vec<f32>,
    acts: Acts,
}

/// A PyTorch linear layer: `weight` is `[out_features, in_features]` row-major.
#[derive(Debug, Clone, Copy)]
pub struct Linear<'a> {
    pub weight: Weight<'a>,
    pub out_features: usize,
    pub in_features: usize,
    pub bias: Option<&'a [f32]>,
}

impl<'a> Linear<'a> {
    pub fn new(weight: impl Into<Weight<'a>>, out_features: usize, in_features: usize) -> Self {
        Linear {
            weight: weight.into(),
            out_features,
            in_features,
            bias: None,
        }
    }

    pub fn with_bias(self, bias: &'a [f32]) -> Self {
        Linear {
            bias: Some(bias),
            ..self
        }
    }
}

/// `out[n × m] = x[n × k] · Wᵀ + bias`, multi-threaded over output features
/// (`m = out_features`, `k = in_features`).
///
/// Weights are PyTorch's `[out_features, in_features]`, so every output is a dot product of two
/// contiguous rows. Work is split over chunks of weight rows (rayon, on the backend's own pool:
/// the pool's threads are reused across the dozens of matmuls of a step, where spawning threads
/// per matmul would cost more than a decode matmul itself); each chunk reads its slice of `W`
/// from memory once per token tile, which is what bounds decode (memory-bound) and prefill alike.
/// `scratch` holds the transposed `[m × n]` result when `n > 1`, since a chunk of output
/// features is a strided column block of `out`.
///
/// Quantized weights go through [`linear_quant`].
pub fn linear(x: &[f32], n: usize, l: Linear<'_>, out: &mut Vec<f32>, s: &mut MatmulScratch) {
    let w = match l.weight {
        Weight::F32(w) => w,
        Weight::Quant(q) => return linear_quant(x, n, q, l.bias, out, s),
    };
    let scratch = &mut s.buf;
    let (m, k, bias) = (l.out_features, l.in_features, l.bias);
    debug_assert!(x.len() >= n * k && w.len() >= m * k);
    out.clear();
    out.resize(n * m, 0.0);
    if n == 0 || m == 0 {
        return;
    }
    let tasks = rayon::current_num_threads() * 4;
    let rows = m.div_ceil(tasks).max(1);
    let bias_of = |o: usize| bias.and_then(|b| b.get(o)).copied().unwrap_or(0.0);
    if n == 1 {
        out.par_chunks_mut(rows)
            .enumerate()
            .for_each(|(ci, chunk)| {
                let o0 = ci * rows;
                for (r, dst) in chunk.iter_mut().enumerate() {
                    let o = o0 + r;
                    *dst = dot(x, &w[o * k..(o + 1) * k]) + bias_of(o);
                }
            });
        return;
    }
    scratch.clear();
    scratch.resize(m * n, 0.0);
    scratch
        .par_chunks_mut(rows * n)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let o0 = ci * rows;
            let nrows = chunk.len() / n;
            for t0 in (0..n).step_by(TOKEN_TILE) {
                let t1 = (t0 + TOKEN_TILE).min(n);
                for r in 0..nrows {
                    let o = o0 + r;
                    let wrow = &w[o * k..(o + 1) * k];
                    let b = bias_of(o);
                    let dst = &mut chunk[r * n..(r + 1) * n];
                    for t in t0..t1 {
                        dst[t] = dot(&x[t * k..(t + 1) * k], wrow) + b;
                    }
                }
            }
        });
    let src: &[f32] = scratch;
    out.par_chunks_mut(m).enumerate().for_each(|(t, row)| {
        for (o, dst) in row.iter_mut().enumerate() {
            *dst = src[o * n + t];
        }
    });
}

/// Several linear layers over the same input (Q/K/V, gate/up). For one token on quantized
/// weights of one activation kind they run as one parallel region with the activations
/// quantized once: a decode step is ~170 small matmuls, and each region costs a wake-up of the
/// worker threads. Anything else runs them one after another through [`linear`].
pub fn linear_many<const N: usize>(
    x: &[f32],
    n: usize,
    layers: [Linear<'_>; N],
    outs: [&mut Vec<f32>; N],
    s: &mut MatmulScratch,
) {
    let quant: Option<Vec<&QuantMatrix>> = layers
        .iter()
        .map(|l| match l.weight {
            Weight::Quant(q) => Some(q),
            Weight::F32(_) => None,
        })
        .collect();
    let fused = quant.filter(|q| {
        n == 1
            && q.iter().all(|m| {
                ActKind::for_weights(m.ty) == ActKind::for_weights(q[0].ty) && m.cols == q[0].cols
            })
    });
    let Some(q) = fused else {
        for (l, out) in layers.into_iter().zip(outs) {
            linear(x, n, l, out, s);
        }
        return;
    };
    let k = q[0].cols;
    s.acts
        .quantize(ActKind::for_weights(q[0].ty), &x[..k], 1, k);
    let acts = &s.acts;
    let total: usize = q.iter().map(|m| m.rows).sum();
    let rows = total.div_ceil(rayon::current_num_threads() * 4).max(1);
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(4 * N + N);
    for (i, out) in outs.into_iter().enumerate() {
        out.clear();
        out.resize(q[i].rows, 0.0);
        for (ci, chunk) in out.chunks_mut(rows).enumerate() {
            tasks.push((i, ci * rows, chunk));
        }
    }
    tasks.into_par_iter().for_each(|(i, o0, chunk)| {
        let (w, bias) = (q[i], layers[i].bias);
        for (r, dst) in chunk.iter_mut().enumerate() {
            let o = o0 + r;
            quant::dot_rows(w.ty, w.row(o), acts, 0, std::slice::from_mut(dst));
            *dst += bias.and_then(|b| b.get(o)).copied().unwrap_or(0.0);
        }
    });
}

/// [`linear`] on ggml blocks: the activations are quantized once (8-bit, per block, as ggml
/// does), then every output is a block dot product on the weight row where it lies, split over
/// chunks of weight rows like the f32 path; multi-token calls walk tiles of tokens so each
/// weight row is unpacked once per four tokens of a tile.
pub fn linear_quant(
    x: &[f32],
    n: usize,
    w: &QuantMatrix,
    bias: Option<&[f32]>,
    out: &mut Vec<f32>,
    s: &mut MatmulScratch,
) {
    let (m, k) = (w.rows, w.cols);
    debug_assert!(x.len() >= n * k);
    out.clear();
    out.resize(n * m, 0.0);
    if n == 0 || m == 0 {
        return;
    }
    s.acts
        .quantize(ActKind::for_weights(w.ty), &x[..n * k], n, k);
    let acts = &s.acts;
    let tasks = rayon::current_num_threads() * 4;
    let rows = m.div_ceil(tasks).max(1);
    let bias_of = |o: usize| bias.and_then(|b| b.get(o)).copied().unwrap_or(0.0);
    if n == 1 {
        out.par_chunks_mut(rows)
            .enumerate()
            .for_each(|(ci, chunk)| {
                let o0 = ci * rows;
                for (r, dst) in chunk.iter_mut().enumerate() {
                    let o = o0 + r;
                    quant::dot_rows(w.ty, w.row(o), acts, 0, std::slice::from_mut(dst));
                    *dst += bias_of(o);
                }
            });
        return;
    }
    let scratch = &mut s.buf;
    scratch.clear();
    scratch.resize(m * n, 0.0);
    scratch
        .par_chunks_mut(rows * n)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let o0 = ci * rows;
            let nrows = chunk.len() / n;
            for t0 in (0..n).step_by(QUANT_TOKEN_TILE) {
                let t1 = (t0 + QUANT_TOKEN_TILE).min(n);
                for r in 0..nrows {
                    let o = o0 + r;
                    let dst = &mut chunk[r * n + t0..r * n + t1];
                    quant::dot_rows(w.ty, w.row(o), acts, t0, dst);
                    let b = bias_of(o);
                    for d in dst.iter_mut() {
                        *d += b;
                    }
                }
            }
        });
    let src: &[f32] = scratch;
    out.par_chunks_mut(m).enumerate().for_each(|(t, row)| {
        for (o, dst) in row.iter_mut().enumerate() {
            *dst = src[o * n + t];
        }
    });
}

/// `out = x / sqrt(mean(x²) + eps) * weight`, row by row (`x` and `out` are `[rows × w.len()]`).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut Vec<f32>) {
    let h = weight.len();
    out.clear();
    out.resize(x.len(), 0.0);
    if h == 0 {
        return;
    }
    for (src, dst) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let mean_sq = dot(src, src) / h as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for ((d, s), w) in dst.iter_mut().zip(src).zip(weight) {
            *d = s * inv * w;
        }
    }
}

/// Rotates every head of one token in place (NeoX/Qwen "rotate half": element `i` pairs with
/// `i + head/2`). `cos_sin` holds `(cos, sin)` of `position · inv_freq[i]` for `i < head/2`.
pub fn rope_in_place(token: &mut [f32], head_size: usize, cos_sin: &[(f32, f32)]) {
    let half = head_size / 2;
    for head in token.chunks_exact_mut(head_size) {
        let (lo, hi) = head.split_at_mut(half);
        for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(cos_sin) {
            let (x1, x2) = (*a, *b);
            *a = x1 * c - x2 * s;
            *b = x2 * c + x1 * s;
        }
    }
}

/// `(cos, sin)` of `position · θ^(-2i/d)` for `i < d/2`, computed in f64 then rounded, so long
/// positions lose no accuracy to an f32 angle.
pub fn rope_cos_sin(position: u32, inv_freq: &[f64], out: &mut [(f32, f32)]) {
    for (dst, f) in out.iter_mut().zip(inv_freq) {
        let (s, c) = (f64::from(position) * f).sin_cos();
        *dst = (c as f32, s as f32);
    }
}

/// `θ^(-2i/d)` for `i < d/2`.
pub fn rope_inv_freq(head_size: usize, theta: f64) -> Vec<f64> {
    (0..head_size / 2)
        .map(|i| theta.powf(-((2 * i) as f64) / head_size as f64))
        .collect()
}

/// `gate = silu(gate) · up`, elementwise, in place.
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `x += y`, elementwise.
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_for_odd_lengths() {
        for n in [0, 1, 7, 16, 17, 33, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
            assert!((f64::from(dot(&a, &b)) - naive).abs() < 1e-4, "n={n}");
        }
    }

    #[test]
    fn matmul_matches_naive() {
        let (n, k, m) = (11, 19, 23);
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let w: Vec<f32> = (0..m * k)
            .map(|i| ((i * 5) % 11) as f32 * 0.5 - 2.0)
            .collect();
        let bias: Vec<f32> = (0..m).map(|i| i as f32).collect();
        for rows in [1, n] {
            let (mut out, mut scratch) = (Vec::new(), MatmulScratch::default());
            let l = Linear::new(&w, m, k).with_bias(&bias);
            linear(&x, rows, l, &mut out, &mut scratch);
            assert_eq!(out.len(), rows * m);
            for t in 0..rows {
                for o in 0..m {
                    let want: f32 =
                        (0..k).map(|i| x[t * k + i] * w[o * k + i]).sum::<f32>() + bias[o];
                    assert_eq!(out[t * m + o], want, "t={t} o={o}");
                }
            }
        }
    }

    #[test]
    fn quantized_linear_fused_equals_separate() {
        use crate::serve::model::gguf::{writer::quantize, GgmlType};
        use crate::serve::model::matrix::SharedBytes;
        let (k, m) = (64, 40);
        let mat = |ty: GgmlType, seed: usize| {
            let w: Vec<f32> = (0..m * k)
                .map(|i| (((i * 31 + seed) % 97) as f32 - 48.0) / 50.0)
                .collect();
            let bytes = SharedBytes::from_vec(quantize(ty, &w).unwrap());
            Matrix::Quant(QuantMatrix::new(ty, m, k, bytes).unwrap())
        };
        let (a, b) = (mat(GgmlType::Q5_0, 1), mat(GgmlType::Q8_0, 2));
        let bias: Vec<f32> = (0..m).map(|i| i as f32 * 0.5).collect();
        let x: Vec<f32> = (0..3 * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let mut s = MatmulScratch::default();
        for n in [1, 3] {
            let (mut o1, mut o2, mut f1, mut f2) = (vec![], vec![], vec![], vec![]);
            linear(
                &x,
                n,
                Linear::new(&a, m, k).with_bias(&bias),
                &mut o1,
                &mut s,
            );
            linear(&x, n, Linear::new(&b, m, k), &mut o2, &mut s);
            linear_many(
                &x,
                n,
                [
                    Linear::new(&a, m, k).with_bias(&bias),
                    Linear::new(&b, m, k),
                ],
                [&mut f1, &mut f2],
                &mut s,
            );
            assert_eq!((o1.len(), o2.len()), (n * m, n * m));
            assert_eq!((&f1, &f2), (&o1, &o2), "n={n}");
            // Row 0 of the multi-token result equals the single-token one.
            let mut single = vec![];
            linear(
                &x,
                1,
                Linear::new(&a, m, k).with_bias(&bias),
                &mut single,
                &mut s,
            );
            assert_eq!(&o1[..m], &single[..]);
        }
    }

    #[test]
    fn rope_rotates_pairs() {
        let inv = rope_inv_freq(4, 10000.0);
        assert_eq!(inv, vec![1.0, 0.01]);
        let mut cs = [(0.0, 0.0); 2];
        rope_cos_sin(0, &inv, &mut cs);
        let mut v = [1.0, 2.0, 3.0, 4.0];
        rope_in_place(&mut v, 4, &cs);
        assert_eq!(v, [1.0, 2.0, 3.0, 4.0]);
        rope_cos_sin(1, &inv, &mut cs);
        let mut v = [1.0, 0.0, 0.0, 0.0];
        rope_in_place(&mut v, 4, &cs);
        assert!((v[0] - 1f32.cos()).abs() < 1e-7 && (v[2] - 1f32.sin()).abs() < 1e-7);
    }
}
