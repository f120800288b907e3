//! Host emulation of `kernels/attention.cu` (test only): the same paged-cache index formulas
//! (key groups of `KEY_X`, value rows per dim), GQA head mapping, 512-key partitions with
//! per-partition softmax, and the max-rescaled reduction, checked against plain full softmax
//! attention. It pins the arithmetic the kernels implement; the GPU tests check the kernels.

use super::compile::KEY_X;
use super::launch::PARTITION_SIZE;

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

/// What one (row, head) computes: partitions then reduction, as the two kernels do.
fn emulate_row(
    cache: &Cache,
    table: &[usize],
    q: &[f32],
    kv_head: usize,
    n_keys: usize,
) -> Vec<f32> {
    let d = cache.d;
    let scale = 1.0 / (d as f32).sqrt();
    let parts = n_keys.div_ceil(PARTITION_SIZE);
    let mut partial = Vec::new();
    for p in 0..parts {
        let start = p * PARTITION_SIZE;
        let end = (start + PARTITION_SIZE).min(n_keys);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn partitioned_gqa_attention_equals_full_softmax() {
        // Qwen2.5-7B ratio (7 query heads per KV head), head 128, block 16; contexts below, at
        // and across the 512-key partition.
        let (heads, kv_heads, d, bs) = (7, 1, 128, 16);
        let mut seed = 1;
        for n_keys in [1usize, 17, 512, 513, 1300] {
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
                let got = emulate_row(&cache, &table, &q, kv_head, n_keys);
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
                for i in 0..d {
                    let want: f64 = e
                        .iter()
                        .zip(&vals)
                        .map(|(w, v)| w * v[i] as f64)
                        .sum::<f64>()
                        / s;
                    assert!(
                        (got[i] as f64 - want).abs() < 1e-4,
                        "{n_keys} keys, head {head}, dim {i}: {} vs {want}",
                        got[i]
                    );
                }
            }
        }
    }
}
