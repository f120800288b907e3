use half::f16;

use super::*;

fn h(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_bits().to_le_bytes()
}

/// Deterministic pseudo-random bytes (xorshift), so the tests need no RNG crate.
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

// ---- hand-built blocks: an independent encoder per layout, dequantized values exact ----------

#[test]
fn q8_0_dequantizes_exactly() {
    let mut blk = h(0.5).to_vec();
    let q: Vec<i8> = (0..32).map(|i| (i * 8 - 128) as i8).collect();
    blk.extend(q.iter().map(|v| *v as u8));
    let mut out = [0f32; 32];
    dequantize_row(GgmlType::Q8_0, &blk, &mut out);
    assert_eq!(out[0], -64.0);
    assert_eq!(out[16], 0.0);
    assert_eq!(out[31], 60.0);
    for (o, v) in out.iter().zip(&q) {
        assert_eq!(*o, 0.5 * f32::from(*v));
    }
}

#[test]
fn q5_0_dequantizes_exactly() {
    // Values v in 0..32 (stored as v, meaning v - 16): element j has nibble v & 15 in byte
    // j % 16 (low for j < 16, high otherwise) and its fifth bit in bit j of qh.
    let v: Vec<u32> = (0..32).map(|j| (j * 11 + 3) % 32).collect();
    let mut qh = 0u32;
    let mut qs = [0u8; 16];
    for (j, &x) in v.iter().enumerate() {
        qh |= (x >> 4) << j;
        if j < 16 {
            qs[j] |= (x & 15) as u8;
        } else {
            qs[j - 16] |= ((x & 15) as u8) << 4;
        }
    }
    let mut blk = h(0.25).to_vec();
    blk.extend(qh.to_le_bytes());
    blk.extend(qs);
    assert_eq!(blk.len(), 22);
    let mut out = [0f32; 32];
    dequantize_row(GgmlType::Q5_0, &blk, &mut out);
    assert_eq!(&out[..4], &[-3.25, -0.5, 2.25, -3.0]);
    for (o, x) in out.iter().zip(&v) {
        assert_eq!(*o, 0.25 * (*x as f32 - 16.0));
    }
}

/// Packs 8 six-bit scales and mins the way Q4_K stores them.
fn pack_q4k_scales(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
    s
}

#[test]
fn q4k_dequantizes_exactly() {
    let sc = [1, 7, 13, 63, 32, 17, 48, 5];
    let m = [0, 63, 2, 40, 9, 33, 21, 60];
    let q: Vec<u8> = (0..256).map(|e| ((e * 5 + e / 7) % 16) as u8).collect();
    let mut blk = h(0.5).to_vec();
    blk.extend(h(0.125));
    blk.extend(pack_q4k_scales(sc, m));
    // Element e: 64-chunk c = e / 64; the first 32 are low nibbles of qs[32c..], the next 32
    // the high nibbles of the same bytes; sub-block e / 32.
    let mut qs = [0u8; 128];
    for (e, &x) in q.iter().enumerate() {
        let (c, r) = (e / 64, e % 64);
        if r < 32 {
            qs[32 * c + r] |= x;
        } else {
            qs[32 * c + r - 32] |= x << 4;
        }
    }
    blk.extend(qs);
    assert_eq!(blk.len(), 144);
    let mut out = [0f32; 256];
    dequantize_row(GgmlType::Q4K, &blk, &mut out);
    assert_eq!(out[0], 0.0);
    assert_eq!(out[96], 0.5 * 63.0 * f32::from(q[96]) - 0.125 * 40.0);
    for (e, o) in out.iter().enumerate() {
        let j = e / 32;
        let want = 0.5 * f32::from(sc[j]) * f32::from(q[e]) - 0.125 * f32::from(m[j]);
        assert_eq!(*o, want, "element {e}");
    }
}

#[test]
fn q6k_dequantizes_exactly() {
    let q: Vec<i32> = (0..256).map(|e| (e * 7 + e / 3) % 64 - 32).collect();
    let sc: Vec<i8> = (0..16).map(|g| (g * 9 - 70) as i8).collect();
    // Element e = 128h + 32i + l: low nibble in ql[64h + l] (i = 0, 2: low/high nibble) or
    // ql[64h + 32 + l] (i = 1, 3); high 2 bits at bits 2i of qh[32h + l]; scale sc[e / 16].
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for (e, &v) in q.iter().enumerate() {
        let u = (v + 32) as u8;
        let (hh, i, l) = (e / 128, (e % 128) / 32, e % 32);
        let byte = 64 * hh + l + if i % 2 == 1 { 32 } else { 0 };
        ql[byte] |= if i < 2 { u & 15 } else { (u & 15) << 4 };
        qh[32 * hh + l] |= (u >> 4) << (2 * i);
    }
    let mut blk = ql.to_vec();
    blk.extend(qh);
    blk.extend(sc.iter().map(|s| *s as u8));
    blk.extend(h(0.5));
    assert_eq!(blk.len(), 210);
    let mut out = [0f32; 256];
    dequantize_row(GgmlType::Q6K, &blk, &mut out);
    assert_eq!(out[0], 0.5 * -70.0 * -32.0);
    for (e, o) in out.iter().enumerate() {
        let want = 0.5 * f32::from(sc[e / 16]) * q[e] as f32;
        assert_eq!(*o, want, "element {e}");
    }
}

#[test]
fn f32_rows_read_little_endian() {
    let blk: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut out = [0f32; 2];
    dequantize_row(GgmlType::F32, &blk, &mut out);
    assert_eq!(out, [1.5, -2.0]);
}

// ---- activation quantization ------------------------------------------------------------------

#[test]
fn q8_0_activations_match_ggml() {
    let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
    let mut a = Acts::default();
    a.quantize(ActKind::Q8_0, &x, 1, 32);
    let r = a.row(0);
    assert_eq!(r.d, &[f16::from_f32(16.0 / 127.0).to_f32()]);
    // x · 127/16: -16 → -127, 1 → 7.9375 → 8, 2 → 15.875 → 16, 15 → 119.06 → 119.
    assert_eq!(&r.qs[..4], &[-127, -119, -111, -103]);
    assert_eq!(r.qs[17], 8);
    assert_eq!(r.qs[18], 16);
    assert_eq!(r.qs[31], 119);
    let zeros = vec![0f32; 32];
    a.quantize(ActKind::Q8_0, &zeros, 1, 32);
    assert_eq!(a.row(0).d, &[0.0]);
    assert!(a.row(0).qs.iter().all(|q| *q == 0));
}

#[test]
fn q8k_activations_match_ggml() {
    let x: Vec<f32> = (0..256).map(|i| i as f32).collect();
    let mut a = Acts::default();
    a.quantize(ActKind::Q8K, &x, 1, 256);
    let r = a.row(0);
    // The largest magnitude (255) maps to -127: scale -255/127.
    assert_eq!(r.d, &[1.0 / (-127.0f32 / 255.0)]);
    assert_eq!(&r.qs[..4], &[0, 0, -1, -1]);
    assert_eq!(r.qs[255], -127);
    let want0: i16 = r.qs[..16].iter().map(|v| i16::from(*v)).sum();
    assert_eq!(r.bsums[0], want0);
    assert_eq!(r.bsums.len(), 16);
}

// ---- dot products: reference vs dequantized math, AVX2 vs reference ---------------------------

/// A weight row of `blocks` blocks with random quants and sane (small, finite) scales.
fn random_row(ty: GgmlType, blocks: usize, seed: u64) -> Vec<u8> {
    let mut w = bytes(seed, blocks * ty.block_bytes());
    for (b, blk) in w.chunks_exact_mut(ty.block_bytes()).enumerate() {
        let d = h(0.01 + (b % 5) as f32 * 0.003);
        match ty {
            GgmlType::Q8_0 | GgmlType::Q5_0 => blk[..2].copy_from_slice(&d),
            GgmlType::Q4K => {
                blk[..2].copy_from_slice(&d);
                blk[2..4].copy_from_slice(&h(0.002));
            }
            GgmlType::Q6K => blk[208..210].copy_from_slice(&d),
            GgmlType::F32 => {}
        }
        if ty == GgmlType::Q8_0 {
            // ggml's quantizer never emits -128.
            for q in &mut blk[2..] {
                if *q == 0x80 {
                    *q = 0x81;
                }
            }
        }
    }
    w
}

fn activations(n: usize, seed: u64) -> Vec<f32> {
    bytes(seed, n)
        .iter()
        .enumerate()
        .map(|(i, b)| (f32::from(*b) - 127.5) / 40.0 * (1.0 + (i % 7) as f32))
        .collect()
}

#[test]
fn reference_dot_equals_dequantized_dot() {
    for ty in [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q4K, GgmlType::Q6K] {
        let k = 2 * 256;
        let w = random_row(ty, k / ty.block_len(), 7);
        let x = activations(k, 3);
        let mut a = Acts::default();
        a.quantize(ActKind::for_weights(ty), &x, 1, k);
        let r = a.row(0);
        let mut wf = vec![0f32; k];
        dequantize_row(ty, &w, &mut wf);
        let bl = k / r.d.len();
        let want: f64 = (0..k)
            .map(|i| f64::from(wf[i]) * f64::from(r.qs[i]) * f64::from(r.d[i / bl]))
            .sum();
        let got = f64::from(reference::dot(ty, &w, &r));
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{ty:?}: {got} vs {want}"
        );
        // And close to the unquantized-activation product (8-bit activations lose ~0.5%).
        let exact: f64 = wf
            .iter()
            .zip(&x)
            .map(|(w, x)| f64::from(*w) * f64::from(*x))
            .sum();
        let norm: f64 = wf
            .iter()
            .zip(&x)
            .map(|(w, x)| (f64::from(*w) * f64::from(*x)).abs())
            .sum();
        assert!(
            (got - exact).abs() <= 0.02 * norm,
            "{ty:?}: {got} vs {exact}"
        );
    }
}

#[test]
fn simd_dot_matches_reference() {
    if !simd_available() {
        eprintln!("SKIPPED: no AVX2/FMA/F16C on this CPU");
        return;
    }
    for ty in [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q4K, GgmlType::Q6K] {
        let k = 3 * 256;
        let n = 7;
        let w = random_row(ty, k / ty.block_len(), 11);
        let x = activations(n * k, 5);
        let mut a = Acts::default();
        a.quantize(ActKind::for_weights(ty), &x, n, k);
        let mut got = vec![0f32; n];
        dot_rows(ty, &w, &a, 0, &mut got);
        for (t, g) in got.iter().enumerate() {
            let want = reference::dot(ty, &w, &a.row(t));
            assert!(
                (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{ty:?} row {t}: simd {g} vs reference {want}"
            );
        }
        let one = avx2::dot::<1>(ty, &w, &[a.row(2)])[0];
        assert!((one - got[2]).abs() <= 1e-5 * one.abs().max(1.0), "{ty:?}");
    }
}
