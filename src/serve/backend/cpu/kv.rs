//! The CPU backend's paged KV cache, in vLLM's decode-kernel layout (REFERENCE.md §6) so the
//! CPU and CUDA backends index blocks identically:
//!
//! ```text
//! key   [num_blocks, num_kv_heads, head_size / X, block_size, X]   X = 16 bytes / 4 = 4 f32
//! value [num_blocks, num_kv_heads, head_size, block_size]
//! slot  = block * block_size + offset
//! ```

use super::super::BackendError;

/// f32 elements per 16-byte key group.
pub const X: usize = 4;

/// Geometry of the cache, shared by writes and reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    pub num_kv_heads: usize,
    pub head_size: usize,
    pub block_size: usize,
}

impl KvGeometry {
    /// f32 elements of one (block, kv head) tile, K or V.
    pub fn tile_len(&self) -> usize {
        self.head_size * self.block_size
    }

    /// f32 elements of one block in one layer, K or V.
    pub fn block_len(&self) -> usize {
        self.num_kv_heads * self.tile_len()
    }

    /// Start of the (block, kv head) tile in either cache.
    #[inline]
    pub fn tile_start(&self, block: usize, kv_head: usize) -> usize {
        (block * self.num_kv_heads + kv_head) * self.tile_len()
    }

    /// Index of key element `d` of the token at `offset` within a tile.
    #[inline]
    pub fn key_index(&self, d: usize, offset: usize) -> usize {
        (d / X) * self.block_size * X + offset * X + d % X
    }

    /// Index of value element `d` of the token at `offset` within a tile.
    #[inline]
    pub fn value_index(&self, d: usize, offset: usize) -> usize {
        d * self.block_size + offset
    }
}

/// One layer's K and V caches.
#[derive(Debug)]
pub struct LayerKv {
    pub key: Vec<f32>,
    pub value: Vec<f32>,
}

/// All layers' caches.
#[derive(Debug)]
pub struct KvCache {
    pub num_blocks: usize,
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    /// Allocates `num_blocks` zeroed blocks per layer; fails (instead of aborting) when the
    /// memory is not there.
    pub fn new(
        geo: KvGeometry,
        num_layers: usize,
        num_blocks: usize,
    ) -> Result<KvCache, BackendError> {
        let per_layer = num_blocks.checked_mul(geo.block_len()).ok_or_else(|| {
            BackendError::Failed(format!("{num_blocks} KV blocks overflow usize"))
        })?;
        let alloc = |what: &str| -> Result<Vec<f32>, BackendError> {
            let mut v = Vec::new();
            v.try_reserve_exact(per_layer).map_err(|e| {
                BackendError::Failed(format!(
                    "cannot allocate the {what} cache ({num_blocks} blocks, {} bytes per layer): {e}",
                    per_layer * 4
                ))
            })?;
            v.resize(per_layer, 0.0);
            Ok(v)
        };
        let mut layers = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            layers.push(LayerKv {
                key: alloc("key")?,
                value: alloc("value")?,
            });
        }
        Ok(KvCache { num_blocks, layers })
    }
}

impl LayerKv {
    /// Stores one token's K and V (`[num_kv_heads × head_size]` each) at `slot`. The caller has
    /// checked `slot < num_blocks * block_size`.
    pub fn write(&mut self, geo: &KvGeometry, slot: usize, k: &[f32], v: &[f32]) {
        let (block, offset) = (slot / geo.block_size, slot % geo.block_size);
        for (h, (kh, vh)) in k
            .chunks_exact(geo.head_size)
            .zip(v.chunks_exact(geo.head_size))
            .enumerate()
        {
            let base = geo.tile_start(block, h);
            let ktile = &mut self.key[base..base + geo.tile_len()];
            for (d, &x) in kh.iter().enumerate() {
                ktile[geo.key_index(d, offset)] = x;
            }
            let vtile = &mut self.value[base..base + geo.tile_len()];
            for (d, &x) in vh.iter().enumerate() {
                vtile[geo.value_index(d, offset)] = x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_reference_strides() {
        let geo = KvGeometry {
            num_kv_heads: 2,
            head_size: 8,
            block_size: 4,
        };
        // key [blocks, heads, head/X, block, X]: strides (64, 32, 16, 4, 1).
        assert_eq!(
            geo.tile_start(3, 1) + geo.key_index(5, 2),
            3 * 64 + 32 + 16 + 2 * 4 + 1
        );
        // value [blocks, heads, head, block]: strides (64, 32, 4, 1).
        assert_eq!(
            geo.tile_start(3, 1) + geo.value_index(5, 2),
            3 * 64 + 32 + 5 * 4 + 2
        );
        let mut kv = KvCache::new(geo, 1, 4).unwrap();
        let k: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let v: Vec<f32> = (0..16).map(|i| 100.0 + i as f32).collect();
        kv.layers[0].write(&geo, 3 * 4 + 2, &k, &v);
        assert_eq!(kv.layers[0].key[3 * 64 + 32 + 16 + 8 + 1], 13.0);
        assert_eq!(kv.layers[0].value[3 * 64 + 32 + 20 + 2], 113.0);
        assert_eq!(kv.layers[0].key.iter().filter(|x| **x != 0.0).count(), 15);
    }

    #[test]
    fn impossible_allocation_is_an_error() {
        let geo = KvGeometry {
            num_kv_heads: 8,
            head_size: 128,
            block_size: 16,
        };
        assert!(matches!(
            KvCache::new(geo, 1, usize::MAX / 4),
            Err(BackendError::Failed(_))
        ));
    }
}
