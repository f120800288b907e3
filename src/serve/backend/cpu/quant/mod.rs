//! Matrix-vector products on ggml-quantized weights (Q4_K, Q5_0, Q6_K, Q8_0), computed on the
//! blocks where they lie instead of on an f32 copy: decode on a few cores is bound by memory
//! bandwidth, and a 4-6 bit weight moves 5-8× fewer bytes than f32.
//!
//! As in ggml, the activations are quantized once per matmul to 8 bits (Q8_0 blocks of 32 for
//! the 32-element formats, Q8_K blocks of 256 with per-16 sums for the K-quants), so each block
//! dot product is integer multiply-adds plus one float scale. [`reference`] is the scalar
//! specification; [`avx2`] the kernels used when the CPU has AVX2+FMA+F16C, tested against it.

pub mod avx2;
pub mod reference;

use std::sync::OnceLock;

use crate::serve::model::gguf::GgmlType;

pub use reference::dequantize_row;

/// How activations are quantized for a weight type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActKind {
    /// Plain f32 (F32 weights).
    F32,
    /// Blocks of 32: f16-rounded scale, 32 × i8 (for Q5_0, Q8_0).
    Q8_0,
    /// Blocks of 256: f32 scale, 256 × i8, 16 sums of 16 (for Q4_K, Q6_K).
    Q8K,
}

impl ActKind {
    pub fn for_weights(ty: GgmlType) -> ActKind {
        match ty {
            GgmlType::F32 => ActKind::F32,
            GgmlType::Q5_0 | GgmlType::Q8_0 => ActKind::Q8_0,
            GgmlType::Q4K | GgmlType::Q6K => ActKind::Q8K,
        }
    }

    fn block(self) -> usize {
        match self {
            ActKind::F32 => 1,
            ActKind::Q8_0 => 32,
            ActKind::Q8K => 256,
        }
    }
}

/// `rows` activation rows of `k` elements, quantized for one weight type. Reused across
/// matmuls (the buffers only grow).
#[derive(Debug, Default)]
pub struct Acts {
    kind: Option<ActKind>,
    k: usize,
    rows: usize,
    x: Vec<f32>,
    qs: Vec<i8>,
    d: Vec<f32>,
    bsums: Vec<i16>,
}

/// One activation row as the dot products read it.
#[derive(Debug, Clone, Copy)]
pub struct ActsRow<'a> {
    /// The f32 row (only for [`ActKind::F32`]).
    pub x: &'a [f32],
    pub qs: &'a [i8],
    /// One scale per block.
    pub d: &'a [f32],
    /// Q8_K only: the sum of each 16 consecutive `qs`.
    pub bsums: &'a [i16],
}

impl Acts {
    /// Quantizes `x` (`rows × k`, `k` a whole number of blocks of `kind`).
    pub fn quantize(&mut self, kind: ActKind, x: &[f32], rows: usize, k: usize) {
        debug_assert_eq!(x.len(), rows * k);
        debug_assert_eq!(k % kind.block(), 0);
        self.kind = Some(kind);
        self.k = k;
        self.rows = rows;
        self.x.clear();
        self.qs.clear();
        self.d.clear();
        self.bsums.clear();
        match kind {
            ActKind::F32 => self.x.extend_from_slice(x),
            ActKind::Q8_0 => {
                self.qs.resize(x.len(), 0);
                for (src, dst) in x.chunks_exact(32).zip(self.qs.chunks_exact_mut(32)) {
                    self.d.push(quantize_q8_0(src, dst));
                }
            }
            ActKind::Q8K => {
                self.qs.resize(x.len(), 0);
                self.bsums.resize(x.len() / 16, 0);
                for ((src, dst), sums) in x
                    .chunks_exact(256)
                    .zip(self.qs.chunks_exact_mut(256))
                    .zip(self.bsums.chunks_exact_mut(16))
                {
                    self.d.push(quantize_q8k(src, dst, sums));
                }
            }
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row `t` (`t < rows`).
    pub fn row(&self, t: usize) -> ActsRow<'_> {
        let k = self.k;
        let nb = k / self.kind.map_or(1, ActKind::block);
        match self.kind {
            Some(ActKind::F32) | None => ActsRow {
                x: self.x.get(t * k..(t + 1) * k).unwrap_or(&[]),
                qs: &[],
                d: &[],
                bsums: &[],
            },
            Some(ActKind::Q8_0) => ActsRow {
                x: &[],
                qs: &self.qs[t * k..(t + 1) * k],
                d: &self.d[t * nb..(t + 1) * nb],
                bsums: &[],
            },
            Some(ActKind::Q8K) => ActsRow {
                x: &[],
                qs: &self.qs[t * k..(t + 1) * k],
                d: &self.d[t * nb..(t + 1) * nb],
                bsums: &self.bsums[t * k / 16..(t + 1) * k / 16],
            },
        }
    }
}

/// One Q8_0 activation block the way ggml's x86 path does it: scale `max|x| / 127` stored as
/// f16, values `round_half_even(x · 127 / max|x|)`. Returns the (f16-rounded) scale.
fn quantize_q8_0(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = half::f16::from_f32(amax / 127.0).to_f32();
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    for (dst, v) in q.iter_mut().zip(x) {
        *dst = (v * id).round_ties_even() as i8;
    }
    d
}

/// One Q8_K block (ggml's `quantize_row_q8_K_ref`): the element of largest magnitude maps to
/// -127, values round half to even and clamp at 127, plus the sum of each 16. Returns the scale.
fn quantize_q8k(x: &[f32], q: &mut [i8], sums: &mut [i16]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        sums.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (dst, v) in q.iter_mut().zip(x) {
        *dst = ((iscale * v).round_ties_even() as i32).min(127) as i8;
    }
    for (s, g) in sums.iter_mut().zip(q.chunks_exact(16)) {
        *s = g.iter().map(|v| i16::from(*v)).sum();
    }
    1.0 / iscale
}

/// Whether the AVX2 kernels can run here (checked once).
pub fn simd_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(avx2::available)
}

/// `out[j] = Σ w·acts.row(t0 + j)` for `j < out.len()`: one weight row against consecutive
/// activation rows, four at a time so each weight block is unpacked once per four tokens.
pub fn dot_rows(ty: GgmlType, w: &[u8], acts: &Acts, t0: usize, out: &mut [f32]) {
    if ty != GgmlType::F32 && simd_available() {
        let mut j = 0;
        while j + 4 <= out.len() {
            let rows = [
                acts.row(t0 + j),
                acts.row(t0 + j + 1),
                acts.row(t0 + j + 2),
                acts.row(t0 + j + 3),
            ];
            out[j..j + 4].copy_from_slice(&avx2::dot::<4>(ty, w, &rows));
            j += 4;
        }
        for (jj, o) in out.iter_mut().enumerate().skip(j) {
            *o = avx2::dot::<1>(ty, w, &[acts.row(t0 + jj)])[0];
        }
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = reference::dot(ty, w, &acts.row(t0 + j));
    }
}

#[cfg(test)]
mod tests;
