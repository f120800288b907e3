//! vLLM KV-event payloads as the EPP's subscribers decode them (`kvwire::decode_batch`), then
//! apply them to a precise index.
//!
//! Input: one msgpack payload (frame 2 of a ZMQ message). Invariants: decoding never panics; a
//! decoded batch re-encodes to a payload that decodes to the same batch; applying its events to
//! an index (block sizes 1 and 16, a 64-key cap) never panics and never exceeds the cap.

use switchyard::epp::kvcache::{BlockIndex, IndexConfig};
use switchyard::kvwire::{decode_batch, encode_batch, DecodeLimits};

pub fn run(data: &[u8]) {
    let Ok(batch) = decode_batch(data, DecodeLimits { max_events: 4096 }) else {
        return;
    };
    let mut again = Vec::new();
    encode_batch(&batch, &mut again);
    let round = decode_batch(&again, DecodeLimits { max_events: 4096 })
        .expect("a re-encoded batch decodes");
    assert_eq!(round.ts.to_bits(), batch.ts.to_bits());
    assert_eq!(round.events, batch.events);
    assert_eq!(round.data_parallel_rank, batch.data_parallel_rank);
    for block_size in [1, 16] {
        let index = BlockIndex::new(IndexConfig {
            block_size,
            hash_seed: String::new(),
            max_keys_per_endpoint: 64,
        });
        let ep = index.endpoint("e");
        for ev in &batch.events {
            index.apply(&ep, ev);
            assert!(ep.len() <= 64);
        }
    }
}
