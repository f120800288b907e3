//! Prefix-cache block hashes: the chained XXH64 the engine keys its cache by and the KV-event
//! stream publishes (documented for routers in `proto/kv_events.proto`).
//!
//! ```text
//! root = XXH64(seed 0, model_name bytes)
//! h[i] = XXH64(seed 0, le_u64(h[i-1] or root) ‖ le_u32(t) for t in tokens[i*B .. (i+1)*B])
//! ```
//! Only full blocks of `B` tokens are hashed; a trailing partial block has no hash.

use xxhash_rust::xxh64::{xxh64, Xxh64};

/// The parent hash of a sequence's first block for `model_name`.
pub fn root_hash(model_name: &str) -> u64 {
    xxh64(model_name.as_bytes(), 0)
}

/// Hash of one full block given its parent's hash.
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = Xxh64::new(0);
    h.update(&parent.to_le_bytes());
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    h.digest()
}

/// Extends `hashes` so it covers every full block of `tokens` (hashes already there are kept).
pub fn extend_hashes(root: u64, block_size: usize, tokens: &[u32], hashes: &mut Vec<u64>) {
    if block_size == 0 {
        return;
    }
    let full = tokens.len() / block_size;
    while hashes.len() < full {
        let i = hashes.len();
        let parent = hashes.last().copied().unwrap_or(root);
        hashes.push(block_hash(
            parent,
            &tokens[i * block_size..(i + 1) * block_size],
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_chain_over_little_endian_ids() {
        let root = root_hash("m");
        assert_eq!(root, xxh64(b"m", 0));
        let mut bytes = root.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(block_hash(root, &[1, 2]), xxh64(&bytes, 0));
        let mut hashes = Vec::new();
        extend_hashes(root, 2, &[1, 2, 3, 4, 5], &mut hashes);
        assert_eq!(
            hashes,
            vec![block_hash(root, &[1, 2]), block_hash(hashes[0], &[3, 4])]
        );
        // A different first block changes every later hash.
        let mut other = Vec::new();
        extend_hashes(root, 2, &[9, 2, 3, 4], &mut other);
        assert_ne!(other[1], hashes[1]);
    }
}
