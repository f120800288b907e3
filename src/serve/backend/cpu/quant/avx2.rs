//! AVX2 block dot products (x86-64 with AVX2, FMA and F16C; detected at run time). Each kernel
//! takes one weight row and `N` activation rows, unpacks a weight block into 32 bytes once and
//! multiplies it against all `N` rows (`maddubs` u8×i8 pairs → i16, `madd` → i32), so prefill
//! reuses each unpacked block `N` times. Results equal [`super::reference::dot`] up to float
//! summation order; the tests in `tests.rs` hold them to that.
#![allow(unsafe_code)]

use super::ActsRow;
use crate::serve::model::gguf::GgmlType;

#[cfg(target_arch = "x86_64")]
pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
pub fn available() -> bool {
    false
}

/// `Σ w·a` for each of the `N` rows. Callers check [`available`] first; shapes are checked
/// here (every activation row covers the weight row).
#[cfg(target_arch = "x86_64")]
pub fn dot<const N: usize>(ty: GgmlType, w: &[u8], a: &[ActsRow<'_>; N]) -> [f32; N] {
    assert!(available(), "AVX2 kernels called without AVX2/FMA/F16C");
    let blocks = w.len() / ty.block_bytes();
    let elems = blocks * ty.block_len();
    for r in a {
        assert!(r.qs.len() >= elems && r.d.len() * ty.block_len() >= elems);
        if matches!(ty, GgmlType::Q4K | GgmlType::Q6K) {
            assert!(r.bsums.len() * 16 >= elems);
        }
    }
    // SAFETY: the CPU has AVX2, FMA and F16C (asserted above); the kernels read `w` block by
    // block through bounds-checked slices and the activation rows within `elems`, checked above.
    unsafe {
        match ty {
            GgmlType::Q8_0 => dot_q8_0::<N>(w, a),
            GgmlType::Q5_0 => dot_q5_0::<N>(w, a),
            GgmlType::Q4K => dot_q4k::<N>(w, a),
            GgmlType::Q6K => dot_q6k::<N>(w, a),
            GgmlType::F32 => {
                let mut out = [0f32; N];
                for (o, r) in out.iter_mut().zip(a) {
                    *o = super::reference::dot(ty, w, r);
                }
                out
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub fn dot<const N: usize>(ty: GgmlType, w: &[u8], a: &[ActsRow<'_>; N]) -> [f32; N] {
    let mut out = [0f32; N];
    for (o, r) in out.iter_mut().zip(a) {
        *o = super::reference::dot(ty, w, r);
    }
    out
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// 32 bytes from a slice that has at least 32 (bounds-checked by the slice index).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load32<T: Copy>(s: &[T]) -> __m256i {
    let s = &s[..32 / std::mem::size_of::<T>()];
    _mm256_loadu_si256(s.as_ptr().cast())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn f16_to_f32(b: &[u8]) -> f32 {
    let bits = u16::from_le_bytes([b[0], b[1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// Signed i8 × signed i8, 32 pairs summed into 8 i32 lanes (`maddubs` needs an unsigned left
/// operand: |x| and sign(x)·y give the same products).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_i8(ax: __m256i, x: __m256i, y: __m256i) -> __m256i {
    let sy = _mm256_sign_epi8(y, x);
    _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
}

/// Q8_0 / Q5_0 weights against Q8_0 activations: the blocks differ only in how the 32 signed
/// weights are unpacked (`Q5` selects at compile time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_32<const N: usize, const Q5: bool>(w: &[u8], a: &[ActsRow<'_>; N]) -> [f32; N] {
    let bb = if Q5 { 22 } else { 34 };
    let mut acc = [_mm256_setzero_ps(); N];
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let wd = f16_to_f32(blk);
        let qx = if Q5 {
            unpack_q5_0(blk)
        } else {
            load32(&blk[2..34])
        };
        let ax = _mm256_sign_epi8(qx, qx);
        for t in 0..N {
            let qy = load32(&a[t].qs[32 * b..]);
            let p = _mm256_cvtepi32_ps(dot_i8(ax, qx, qy));
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(wd * a[t].d[b]), p, acc[t]);
        }
    }
    let mut out = [0f32; N];
    for t in 0..N {
        out[t] = hsum_ps(acc[t]);
    }
    out
}

/// The 32 weights of a Q5_0 block as signed bytes (`value - 16`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn unpack_q5_0(blk: &[u8]) -> __m256i {
    // Nibbles: low 128 bits = low nibbles (elements 0..16), high = high nibbles (16..32).
    let raw = _mm_loadu_si128(blk[6..22].as_ptr().cast());
    let nib = _mm256_and_si256(
        _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
        _mm256_set1_epi8(0x0F),
    );
    // Fifth bits: byte i becomes 0xFF when bit i of qh is set.
    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh as i32),
        _mm256_setr_epi64x(
            0,
            0x0101_0101_0101_0101,
            0x0202_0202_0202_0202,
            0x0303_0303_0303_0303,
        ),
    );
    let bits = _mm256_cmpeq_epi8(
        _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64)),
        _mm256_set1_epi64x(-1),
    );
    // value - 16 as i8: with the fifth bit it is the nibble, without it the nibble | 0xF0.
    _mm256_or_si256(
        nib,
        _mm256_andnot_si256(bits, _mm256_set1_epi8(0xF0u8 as i8)),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0<const N: usize>(w: &[u8], a: &[ActsRow<'_>; N]) -> [f32; N] {
    dot_32::<N, false>(w, a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_0<const N: usize>(w: &[u8], a: &[ActsRow<'_>; N]) -> [f32; N] {
    dot_32::<N, true>(w, a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4k<const N: usize>(w: &[u8], a: &[ActsRow<'_>; N]) -> [f32; N] {
    let mut acc = [_mm256_setzero_ps(); N];
    let mut acc_min = [0f32; N];
    let low = _mm256_set1_epi8(0x0F);
    for (b, blk) in w.chunks_exact(144).enumerate() {
        let d = f16_to_f32(&blk[0..2]);
        let dmin = f16_to_f32(&blk[2..4]);
        let mut sc = [0i16; 8];
        let mut mn = [0i32; 8];
        for j in 0..8 {
            let (s, m) = super::reference::q4k_scale_min(j, &blk[4..16]);
            sc[j] = i16::from(s);
            mn[j] = i32::from(m);
        }
        let mut sumi = [_mm256_setzero_si256(); N];
        for c in 0..4 {
            let q4 = load32(&blk[16 + 32 * c..]);
            let lo = _mm256_and_si256(q4, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), low);
            let (s_lo, s_hi) = (
                _mm256_set1_epi16(sc[2 * c]),
                _mm256_set1_epi16(sc[2 * c + 1]),
            );
            for t in 0..N {
                let base = 256 * b + 64 * c;
                let p_lo = _mm256_maddubs_epi16(lo, load32(&a[t].qs[base..]));
                let p_hi = _mm256_maddubs_epi16(hi, load32(&a[t].qs[base + 32..]));
                sumi[t] = _mm256_add_epi32(
                    sumi[t],
                    _mm256_add_epi32(_mm256_madd_epi16(s_lo, p_lo), _mm256_madd_epi16(s_hi, p_hi)),
                );
            }
        }
        for t in 0..N {
            let bs = &a[t].bsums[16 * b..16 * b + 16];
            let summ: i32 = (0..8)
                .map(|j| mn[j] * (i32::from(bs[2 * j]) + i32::from(bs[2 * j + 1])))
                .sum();
            let ad = a[t].d[b];
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(ad * d), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
            acc_min[t] += ad * dmin * summ as f32;
        }
    }
    let mut out = [0f32; N];
    for t in 0..N {
        out[t] = hsum_ps(acc[t]) - acc_min[t];
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6k<const N: usize>(w: &[u8], a: &[ActsRow<'_>; N]) -> [f32; N] {
    let mut out = [0f32; N];
    let low = _mm256_set1_epi8(0x0F);
    let two = _mm256_set1_epi8(0x03);
    for (b, blk) in w.chunks_exact(210).enumerate() {
        let d = f16_to_f32(&blk[208..210]);
        let sc: [i16; 16] = std::array::from_fn(|i| i16::from(blk[192 + i] as i8));
        let mut sumi = [_mm256_setzero_si256(); N];
        for h in 0..2 {
            let l1 = load32(&blk[64 * h..]);
            let l2 = load32(&blk[64 * h + 32..]);
            let hb = load32(&blk[128 + 32 * h..]);
            // Unsigned 6-bit values (0..64); the -32 offset is applied below through the sums.
            let q = [
                _mm256_or_si256(
                    _mm256_and_si256(l1, low),
                    _mm256_slli_epi16(_mm256_and_si256(hb, two), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(l2, low),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), two), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l1, 4), low),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), two), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(l2, 4), low),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), two), 4),
                ),
            ];
            // Group i covers 32 elements: the first 16 take scale 8h+2i, the next 16 8h+2i+1.
            let s: [__m256i; 4] = std::array::from_fn(|i| {
                _mm256_set_m128i(
                    _mm_set1_epi16(sc[8 * h + 2 * i + 1]),
                    _mm_set1_epi16(sc[8 * h + 2 * i]),
                )
            });
            for t in 0..N {
                let base = 256 * b + 128 * h;
                let mut p = _mm256_setzero_si256();
                for i in 0..4 {
                    let m = _mm256_maddubs_epi16(q[i], load32(&a[t].qs[base + 32 * i..]));
                    p = _mm256_add_epi32(p, _mm256_madd_epi16(s[i], m));
                }
                sumi[t] = _mm256_add_epi32(sumi[t], p);
            }
        }
        for t in 0..N {
            let bs = &a[t].bsums[16 * b..16 * b + 16];
            let offset: i32 = (0..16).map(|g| i32::from(sc[g]) * i32::from(bs[g])).sum();
            let total = hsum_epi32(sumi[t]) - 32 * offset;
            out[t] += a[t].d[b] * d * total as f32;
        }
    }
    out
}
