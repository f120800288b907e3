//! Scalar reference of the ggml block formats: dequantization (used for embedding rows and as
//! the definition the tests check) and the block dot products against quantized activations
//! (the specification the AVX2 kernels are tested against). Layouts and arithmetic follow ggml's
//! `ggml-common.h` / `ggml-quants.c`.

use half::f16;

use super::ActsRow;
use crate::serve::model::gguf::GgmlType;

#[inline]
pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Q4_K's 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes: sub-blocks 0-3
/// keep theirs in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7 split theirs into the
/// nibbles of bytes 8-11 plus the top 2 bits of bytes 0-3 / 4-7.
#[inline]
pub(super) fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Dequantizes one row (`out.len()` elements, a whole number of blocks) of `ty`.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let bl = ty.block_len();
    for (blk, y) in bytes
        .chunks_exact(ty.block_bytes())
        .zip(out.chunks_exact_mut(bl))
    {
        match ty {
            GgmlType::F32 => y[0] = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]),
            GgmlType::Q8_0 => {
                let d = f16_at(blk, 0);
                for (v, &q) in y.iter_mut().zip(&blk[2..34]) {
                    *v = d * f32::from(q as i8);
                }
            }
            GgmlType::Q5_0 => {
                let d = f16_at(blk, 0);
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                for j in 0..16 {
                    let q = blk[6 + j];
                    // Element j takes the low nibble, element j+16 the high one; bit j / j+16 of
                    // qh is each one's fifth bit.
                    let lo = (q & 0x0F) as i32 | ((((qh >> j) & 1) << 4) as i32);
                    let hi = (q >> 4) as i32 | ((((qh >> (j + 16)) & 1) << 4) as i32);
                    y[j] = d * (lo - 16) as f32;
                    y[j + 16] = d * (hi - 16) as f32;
                }
            }
            GgmlType::Q4K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let scales = &blk[4..16];
                let qs = &blk[16..144];
                // Four 64-element chunks: 32 low nibbles (sub-block 2c) then the same 32 bytes'
                // high nibbles (sub-block 2c+1).
                for c in 0..4 {
                    let (sc0, m0) = q4k_scale_min(2 * c, scales);
                    let (sc1, m1) = q4k_scale_min(2 * c + 1, scales);
                    let (d0, m0) = (d * f32::from(sc0), dmin * f32::from(m0));
                    let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
                    let q = &qs[32 * c..32 * c + 32];
                    for l in 0..32 {
                        y[64 * c + l] = d0 * f32::from(q[l] & 0x0F) - m0;
                        y[64 * c + 32 + l] = d1 * f32::from(q[l] >> 4) - m1;
                    }
                }
            }
            GgmlType::Q6K => {
                let (ql, qh) = (&blk[0..128], &blk[128..192]);
                let sc = &blk[192..208];
                let d = f16_at(blk, 208);
                // Two halves of 128: element l + 32i (i < 4) takes a nibble of ql and 2 bits of
                // qh[l], and scale sc[8·half + 2i + l/16].
                for h in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * h..], &qh[32 * h..], &sc[8 * h..]);
                    let y = &mut y[128 * h..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * f32::from(sc[is] as i8) * q1 as f32;
                        y[l + 32] = d * f32::from(sc[is + 2] as i8) * q2 as f32;
                        y[l + 64] = d * f32::from(sc[is + 4] as i8) * q3 as f32;
                        y[l + 96] = d * f32::from(sc[is + 6] as i8) * q4 as f32;
                    }
                }
            }
        }
    }
}

/// `Σ w·x` of one weight row against one quantized activation row (scalar).
pub fn dot(ty: GgmlType, w: &[u8], a: &ActsRow<'_>) -> f32 {
    match ty {
        GgmlType::F32 => w
            .chunks_exact(4)
            .zip(a.x)
            .map(|(b, x)| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * x)
            .sum(),
        GgmlType::Q8_0 | GgmlType::Q5_0 => {
            let mut sum = 0f32;
            let mut q = [0i32; 32];
            for ((blk, aq), ad) in w
                .chunks_exact(ty.block_bytes())
                .zip(a.qs.chunks_exact(32))
                .zip(a.d)
            {
                unpack_q32(ty, blk, &mut q);
                let sumi: i32 = q.iter().zip(aq).map(|(x, y)| x * i32::from(*y)).sum();
                sum += sumi as f32 * (f16_at(blk, 0) * ad);
            }
            sum
        }
        GgmlType::Q4K => {
            let mut sum = 0f32;
            for (((blk, aq), ad), bs) in w
                .chunks_exact(144)
                .zip(a.qs.chunks_exact(256))
                .zip(a.d)
                .zip(a.bsums.chunks_exact(16))
            {
                let scales = &blk[4..16];
                let qs = &blk[16..144];
                let (mut sumi, mut summ) = (0i32, 0i32);
                for c in 0..4 {
                    let (sc0, m0) = q4k_scale_min(2 * c, scales);
                    let (sc1, m1) = q4k_scale_min(2 * c + 1, scales);
                    let q = &qs[32 * c..32 * c + 32];
                    let (a0, a1) = (&aq[64 * c..64 * c + 32], &aq[64 * c + 32..64 * c + 64]);
                    let lo: i32 = q
                        .iter()
                        .zip(a0)
                        .map(|(x, y)| i32::from(x & 0x0F) * i32::from(*y))
                        .sum();
                    let hi: i32 = q
                        .iter()
                        .zip(a1)
                        .map(|(x, y)| i32::from(x >> 4) * i32::from(*y))
                        .sum();
                    sumi += i32::from(sc0) * lo + i32::from(sc1) * hi;
                    summ += i32::from(m0) * (i32::from(bs[4 * c]) + i32::from(bs[4 * c + 1]))
                        + i32::from(m1) * (i32::from(bs[4 * c + 2]) + i32::from(bs[4 * c + 3]));
                }
                let d = ad * f16_at(blk, 0);
                let dmin = ad * f16_at(blk, 2);
                sum += d * sumi as f32 - dmin * summ as f32;
            }
            sum
        }
        GgmlType::Q6K => {
            let mut sum = 0f32;
            let mut q = [0i32; 256];
            for ((blk, aq), ad) in w.chunks_exact(210).zip(a.qs.chunks_exact(256)).zip(a.d) {
                unpack_q6k(blk, &mut q);
                let sc = &blk[192..208];
                let mut sumi = 0i32;
                for (g, s) in sc.iter().enumerate() {
                    let part: i32 = q[16 * g..16 * g + 16]
                        .iter()
                        .zip(&aq[16 * g..16 * g + 16])
                        .map(|(x, y)| x * i32::from(*y))
                        .sum();
                    sumi += i32::from(*s as i8) * part;
                }
                sum += ad * f16_at(blk, 208) * sumi as f32;
            }
            sum
        }
    }
}

/// The 32 signed integer weights of a Q8_0 or Q5_0 block.
fn unpack_q32(ty: GgmlType, blk: &[u8], q: &mut [i32; 32]) {
    if ty == GgmlType::Q8_0 {
        for (d, s) in q.iter_mut().zip(&blk[2..34]) {
            *d = i32::from(*s as i8);
        }
        return;
    }
    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
    for j in 0..16 {
        let b = blk[6 + j];
        q[j] = ((b & 0x0F) as i32 | (((qh >> j) & 1) << 4) as i32) - 16;
        q[j + 16] = ((b >> 4) as i32 | (((qh >> (j + 16)) & 1) << 4) as i32) - 16;
    }
}

/// The 256 signed 6-bit weights of a Q6_K block, in element order.
fn unpack_q6k(blk: &[u8], q: &mut [i32; 256]) {
    for h in 0..2 {
        let (ql, qh) = (
            &blk[64 * h..64 * h + 64],
            &blk[128 + 32 * h..128 + 32 * h + 32],
        );
        let q = &mut q[128 * h..128 * h + 128];
        for l in 0..32 {
            q[l] = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            q[l + 32] = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            q[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            q[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
        }
    }
}
