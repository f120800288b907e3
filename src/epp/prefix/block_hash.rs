//! XXH64 (seed 0) of `block ‖ le_u64(prev)` for blocks that are whole 32-byte stripes, the chain
//! step of [`super::hash_prompt`].
//!
//! Written out here because it is the scheduler's largest single cost after the index walk (512
//! calls for an 8k-token prompt): the generic one-shot `xxh64` spends ~150 instructions on a
//! 72-byte input and needs the block and the previous hash copied into one buffer. Specialised,
//! the stripes are read straight from the prompt and the chained hash enters only the last round,
//! so consecutive blocks' stripe work overlaps. Equality with `xxhash_rust` is tested on every
//! stripe count.

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;

/// Stripe size of XXH64: four 8-byte lanes.
pub(super) const STRIPE: usize = 32;

#[inline(always)]
fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

#[inline(always)]
fn merge_round(h: u64, v: u64) -> u64 {
    (h ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4)
}

#[inline(always)]
fn lane(stripe: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&stripe[i * 8..i * 8 + 8]);
    u64::from_le_bytes(b)
}

/// `xxh64(block ‖ prev.to_le_bytes(), 0)`, or `None` when `block` is empty or not a whole
/// number of 32-byte stripes (the caller then uses the generic hasher).
#[inline]
pub(super) fn chained(block: &[u8], prev: u64) -> Option<u64> {
    if block.is_empty() || !block.len().is_multiple_of(STRIPE) {
        return None;
    }
    let mut v = [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)];
    for stripe in block.chunks_exact(STRIPE) {
        for (i, acc) in v.iter_mut().enumerate() {
            *acc = round(*acc, lane(stripe, i));
        }
    }
    let mut h = v[0]
        .rotate_left(1)
        .wrapping_add(v[1].rotate_left(7))
        .wrapping_add(v[2].rotate_left(12))
        .wrapping_add(v[3].rotate_left(18));
    for acc in v {
        h = merge_round(h, acc);
    }
    h = h.wrapping_add(block.len() as u64 + 8);
    // The 8-byte tail: the previous block's hash.
    h ^= round(0, prev);
    h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
    // Avalanche.
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^= h >> 32;
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use xxhash_rust::xxh64::xxh64;

    fn reference(block: &[u8], prev: u64) -> u64 {
        let mut buf = block.to_vec();
        buf.extend_from_slice(&prev.to_le_bytes());
        xxh64(&buf, 0)
    }

    #[test]
    fn known_value_of_one_default_block() {
        // 64 bytes of 'a' chained to 0, and to a non-zero hash: the crate's values.
        let block = [b'a'; 64];
        assert_eq!(chained(&block, 0), Some(reference(&block, 0)));
        assert_eq!(
            chained(&block, 0x0123_4567_89AB_CDEF),
            Some(reference(&block, 0x0123_4567_89AB_CDEF))
        );
    }

    #[test]
    fn blocks_that_are_not_whole_stripes_are_left_to_the_generic_hasher() {
        assert_eq!(chained(&[], 1), None);
        assert_eq!(chained(&[0u8; 4], 1), None);
        assert_eq!(chained(&[0u8; 48], 1), None);
        assert!(chained(&[0u8; 32], 1).is_some());
    }

    proptest! {
        #[test]
        fn equals_xxhash_rust(stripes in 1usize..10, seed in any::<u64>(), prev in any::<u64>()) {
            let mut x = seed | 1;
            let block: Vec<u8> = (0..stripes * STRIPE)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            prop_assert_eq!(chained(&block, prev), Some(reference(&block, prev)));
        }
    }
}
