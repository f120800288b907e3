//! FP8 E4M3 (the OCP "FN" variant: `torch.float8_e4m3fn`, the safetensors `F8_E4M3` dtype)
//! for weight-only quantization: the exact host decode and encode (round to nearest even,
//! saturating at ±448 like NVIDIA's `__NV_SATFINITE` conversion), per-output-channel
//! quantization of bf16 weights at load, and the decode the GEMV kernel uses on the device.
//!
//! Layout of a code: sign (1) | exponent (4, bias 7) | mantissa (3). No infinities; only
//! `S.1111.111` is NaN. Largest finite 0x7E = 1.75 · 2⁸ = 448; smallest normal 2⁻⁶;
//! subnormals `m · 2⁻⁹`.

/// Largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;
/// Code of +448 (the saturation value).
pub const E4M3_MAX_CODE: u8 = 0x7E;
/// Code of +NaN (`0xFF` is −NaN).
pub const E4M3_NAN: u8 = 0x7F;

/// Whether `code` is one of the two NaN codes.
pub fn is_nan(code: u8) -> bool {
    code & 0x7F == 0x7F
}

/// Exact value of an E4M3 code (NaN for the two NaN codes).
pub fn decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = i32::from((code >> 3) & 0xF);
    let m = f32::from(code & 7);
    if e == 15 && code & 7 == 7 {
        return f32::NAN;
    }
    let mag = if e == 0 {
        m * 2f32.powi(-9)
    } else {
        (1.0 + m / 8.0) * 2f32.powi(e - 7)
    };
    sign * mag
}

/// The kernel's decode (`fp8_to_f32` in `kernels/gemv.cu`): the seven magnitude bits placed at
/// the top of an f32's exponent/mantissa fields give `value · 2⁻¹²⁰` for normal *and*
/// subnormal codes (E4M3 subnormals land on f32 subnormals, which NVRTC keeps without
/// `--ftz`), so one multiply by 2¹²⁰ finishes it. Equal to [`decode`] on every finite code
/// (tested); a NaN code decodes as ±480, which is why loading rejects NaN codes.
pub fn decode_like_kernel(code: u8) -> f32 {
    let mag = f32::from_bits(u32::from(code & 0x7F) << 20) * 2f32.powi(120);
    if code & 0x80 != 0 {
        -mag
    } else {
        mag
    }
}

/// Nearest E4M3 code to `x`: round to nearest, ties to even; finite values beyond ±448 and
/// ±infinity saturate to ±448; NaN gives NaN (`0x7F`, sign kept).
pub fn encode(x: f32) -> u8 {
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return sign | E4M3_NAN;
    }
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | E4M3_MAX_CODE;
    }
    // Below the smallest normal (2⁻⁶) the grid is uniform with step 2⁻⁹: code = the rounded
    // count of steps (8 steps is exactly 2⁻⁶, whose code is 0x08 — the formula carries into
    // the exponent by itself). The scaling by 2⁹ is exact in f32.
    if a < 2f32.powi(-6) {
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // Normal: keep the top 3 of the f32 mantissa's 23 bits, rounding the 20 dropped bits to
    // nearest even. Adding the rounding carry to (exponent | mantissa) as one integer moves
    // into the next binade exactly as the format does.
    let bits = a.to_bits();
    let exp = (bits >> 23) as i32 - 127; // −6 ..= 8 here
    let mant = bits & 0x7F_FFFF;
    let kept = mant >> 20;
    let rest = mant & 0xF_FFFF;
    let half = 0x8_0000;
    let round_up = rest > half || (rest == half && kept & 1 == 1);
    let code = (((exp + 7) as u32) << 3 | kept) + u32::from(round_up);
    // 448 < a < 480 rounds to 448 (the next step would be the NaN code); saturate anyway.
    sign | code.min(u32::from(E4M3_MAX_CODE)) as u8
}

/// A `[rows, cols]` weight in E4M3 with one f32 scale per row (output channel):
/// `w[r, c] ≈ decode(codes[r, c]) · scales[r]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Matrix {
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
}

impl Fp8Matrix {
    /// Appends `other`'s rows (fusing QKV and gate/up the way the bf16 path stacks them).
    pub fn stack(&mut self, other: Fp8Matrix) -> Result<(), String> {
        if other.cols != self.cols {
            return Err(format!(
                "cannot stack a [{}, {}] FP8 weight under [{}, {}]",
                other.rows, other.cols, self.rows, self.cols
            ));
        }
        self.rows += other.rows;
        self.codes.extend(other.codes);
        self.scales.extend(other.scales);
        Ok(())
    }

    /// Bytes on the device: one per weight plus an f32 scale per row.
    pub fn device_bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }
}

/// Per-row quantization of bf16 bits `[rows, cols]`: `scale = max|w| / 448` (1 for an all-zero
/// row, so no division by zero), `code = encode(w / scale)`. The row maximum maps exactly to
/// ±448, so nothing saturates.
pub fn quantize_rows(bf16: &[u16], rows: usize, cols: usize) -> Fp8Matrix {
    let mut codes = Vec::with_capacity(rows * cols);
    let mut scales = Vec::with_capacity(rows);
    for row in bf16.chunks_exact(cols.max(1)).take(rows) {
        let vals = row.iter().map(|&b| half::bf16::from_bits(b).to_f32());
        let amax = vals.clone().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if amax > 0.0 && amax.is_finite() {
            amax / E4M3_MAX
        } else {
            1.0
        };
        codes.extend(vals.map(|v| encode(v / scale)));
        scales.push(scale);
    }
    Fp8Matrix {
        rows,
        cols,
        codes,
        scales,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every positive finite value of the format, built from its definition in f64
    /// independently of `decode`: subnormals m·2⁻⁹, then (8 + m)·2^(e−10) for e = 1..=15.
    fn positive_grid() -> Vec<f64> {
        let mut v: Vec<f64> = (0..8).map(|m| m as f64 / 512.0).collect();
        for e in 1..=15 {
            for m in 0..8 {
                if e == 15 && m == 7 {
                    continue;
                }
                v.push((8 + m) as f64 * 2f64.powi(e - 10));
            }
        }
        v
    }

    #[test]
    fn decode_all_256_codes() {
        let grid = positive_grid();
        assert_eq!(grid.len(), 127);
        for code in 0..=255u8 {
            let v = decode(code);
            if code & 0x7F == 0x7F {
                assert!(v.is_nan(), "{code:#04x}");
                assert!(is_nan(code));
                continue;
            }
            assert!(!is_nan(code));
            let want = grid[usize::from(code & 0x7F)];
            let want = if code & 0x80 != 0 { -want } else { want };
            assert_eq!(v as f64, want, "{code:#04x}");
            assert_eq!(v.is_sign_negative(), code & 0x80 != 0, "{code:#04x} sign");
            // The kernel's shift-and-scale decode agrees on every finite code, bit for bit.
            assert_eq!(
                decode_like_kernel(code).to_bits(),
                v.to_bits(),
                "{code:#04x}"
            );
            // Every code survives a round trip (−0 included).
            assert_eq!(encode(v), code, "{code:#04x}");
        }
        assert_eq!(decode(0x7E), 448.0);
        assert_eq!(decode(0x38), 1.0);
        assert_eq!(decode(0x08), 2f32.powi(-6));
        assert_eq!(decode(0x01), 2f32.powi(-9));
        assert_eq!(decode(0xC0), -2.0);
        // A NaN code through the kernel's decode is ±480: loading must reject NaN codes.
        assert_eq!(decode_like_kernel(0x7F), 480.0);
    }

    #[test]
    fn encode_rounds_to_nearest_even_between_every_pair() {
        let grid = positive_grid();
        for (i, pair) in grid.windows(2).enumerate() {
            let (lo, hi) = (pair[0], pair[1]);
            let mid = (lo + hi) / 2.0; // exact in f32: the grid has 4 significant bits
            let mid32 = mid as f32;
            assert_eq!(mid32 as f64, mid);
            let even = if i % 2 == 0 { i } else { i + 1 } as u8;
            assert_eq!(encode(mid32), even, "tie between {lo} and {hi}");
            assert_eq!(encode(-mid32), 0x80 | even, "tie between -{lo} and -{hi}");
            // One f32 ulp either side of the midpoint goes to the nearer value.
            let below = f32::from_bits(mid32.to_bits() - 1);
            let above = f32::from_bits(mid32.to_bits() + 1);
            assert_eq!(encode(below), i as u8, "just below the {lo}/{hi} midpoint");
            assert_eq!(
                encode(above),
                i as u8 + 1,
                "just above the {lo}/{hi} midpoint"
            );
        }
    }

    #[test]
    fn encode_saturates_and_keeps_nan() {
        for x in [
            448.0f32,
            449.0,
            463.9,
            464.0,
            479.0,
            480.0,
            1e9,
            f32::MAX,
            f32::INFINITY,
        ] {
            assert_eq!(encode(x), 0x7E, "{x}");
            assert_eq!(encode(-x), 0xFE, "-{x}");
        }
        assert_eq!(encode(f32::NAN), 0x7F);
        assert_eq!(encode(-f32::NAN), 0xFF);
        // Below half the smallest subnormal: zero, sign kept; exactly half ties to 0 (even).
        assert_eq!(encode(2f32.powi(-11)), 0x00);
        assert_eq!(encode(-2f32.powi(-10)), 0x80);
        assert_eq!(encode(f32::from_bits(2f32.powi(-10).to_bits() + 1)), 0x01);
        assert_eq!(encode(f32::MIN_POSITIVE / 4.0), 0x00);
        assert_eq!(encode(-0.0), 0x80);
        // Carry out of the mantissa into the next binade: 1.9375 is the 1.875/2.0 midpoint
        // (1.875 = code 0x3F has an odd mantissa) → 2.0.
        assert_eq!(encode(1.9375), 0x40);
        // The subnormal/normal seam: 15/16 · 2⁻⁶ ties between 7·2⁻⁹ (odd) and 2⁻⁶ (even).
        assert_eq!(encode(7.5 / 512.0), 0x08);
    }

    #[test]
    fn quantize_rows_is_per_channel_and_bounded() {
        let vals = [[0.5f32, -1.0, 0.25, 0.0], [0.0; 4], [3.0, 0.001, -2.0, 1.5]];
        let bits: Vec<u16> = vals
            .iter()
            .flatten()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let q = quantize_rows(&bits, 3, 4);
        assert_eq!((q.rows, q.cols, q.codes.len()), (3, 4, 12));
        assert_eq!(q.scales, vec![1.0 / 448.0, 1.0, 3.0 / 448.0]);
        // The row maximum is exactly ±448 · scale.
        assert_eq!(q.codes[1], 0xFE);
        assert_eq!(q.codes[8], 0x7E);
        assert_eq!(&q.codes[4..8], &[0, 0, 0, 0]);
        for (r, row) in vals.iter().enumerate() {
            for (c, &w) in row.iter().enumerate() {
                let got = decode(q.codes[r * 4 + c]) * q.scales[r];
                // Half an ulp: 2⁻⁴ relative in the normal range, 2⁻¹⁰ · scale below it.
                let bound = (w.abs() / 16.0).max(q.scales[r] * 2f32.powi(-10)) * 1.0001;
                assert!((got - w).abs() <= bound, "[{r},{c}] {w} → {got}");
            }
        }
        assert_eq!(q.device_bytes(), 12 + 12);
        let mut a = q.clone();
        a.stack(q.clone()).unwrap();
        assert_eq!((a.rows, a.codes.len(), a.scales.len()), (6, 24, 6));
        assert!(a
            .stack(Fp8Matrix {
                rows: 1,
                cols: 5,
                codes: vec![0; 5],
                scales: vec![1.0]
            })
            .is_err());
    }
}
