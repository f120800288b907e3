//! Paged-attention and reshape-and-cache kernels against an f64 reference on random bf16
//! inputs: ragged rows (decodes and a causal prefill chunk in one launch), scattered block
//! tables, block boundaries, contexts below / at / across the 512-key partition, and the GQA
//! shapes of Qwen2.5 0.5B (14/2, head 64), 7B (28/4, head 128) and 14B (40/8, head 128).
//!
//! Tolerance: |Δ| ≤ 0.01 + 0.01 |ref| per output element (bf16 output rounding is 2^-9
//! relative; `__expf` and f32 accumulation add less). Prints `SKIPPED: <why>` without a GPU.

use switchyard::serve::backend::cuda::harness::{AttentionHarness, HarnessShape, Rows};
use switchyard::serve::backend::cuda::{self};

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
    let (out, _) = h.attention(&rows, 0).unwrap();

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
                    "heads {heads}/{kv_heads} d {d}: row {r} (seq {seq}, {n} keys) head {head} dim {i}: {got} vs {want}"
                );
            }
        }
    }
}

fn skip() -> bool {
    match cuda::gpu_available() {
        Ok(()) => false,
        Err(why) => {
            println!("SKIPPED: {why}");
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
