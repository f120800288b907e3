//! vLLM's KV-cache event wire format (`vllm/distributed/kv_events.py`), shared by the decode
//! server (publisher, `serve --kv-events-config`) and the EPP (subscriber, precise prefix scoring).
//!
//! A ZMQ PUB socket sends one multipart message per engine step that changed the prefix cache:
//!
//! ```text
//! frame 0: topic (UTF-8, may be empty; llm-d uses "kv@<pod>@<model>")
//! frame 1: sequence number, 8 bytes big-endian, 0 for the first batch, +1 per batch
//! frame 2: msgpack KVEventBatch
//! ```
//!
//! The payload is msgspec's encoding of structs declared `array_like=True, omit_defaults=True`
//! (events additionally `tag=True`): each struct is a msgpack array of its fields in declaration
//! order, a tagged event starts with its class name, and trailing fields that hold their default
//! are left out:
//!
//! ```text
//! KVEventBatch     = [ts: float64, events: [event...], data_parallel_rank: int|nil]
//! BlockStored      = ["BlockStored", block_hashes: [hash...], parent_block_hash: hash|nil,
//!                     token_ids: [int...], block_size: int, lora_id: int|nil,
//!                     medium: str|nil, lora_name: str|nil, (extra_keys, group_idx, ... omitted)]
//! BlockRemoved     = ["BlockRemoved", block_hashes: [hash...], medium: str|nil]
//! AllBlocksCleared = ["AllBlocksCleared"]
//! hash             = int (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES) | bin (sha256 digest, default)
//! ```
//!
//! Decoding also accepts the map form (`{"ts":..,"events":[{"type":"BlockStored",..}]}`) that
//! msgspec writes for structs without `array_like`, since later vLLM versions dropped it. Engine
//! hashes are opaque keys to the consumer; a `bin` hash becomes its last 8 bytes read big-endian,
//! as llm-d-kv-cache does (`getHashAsUint64`), so both hash forms index the same way.

mod codec;

pub use codec::{decode_batch, encode_batch, DecodeLimits, WireError};

/// One `KVEventBatch`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// Publisher wall-clock time, Unix seconds.
    pub ts: f64,
    pub events: Vec<Event>,
    /// vLLM sets it to the publishing data-parallel rank (0 without DP).
    pub data_parallel_rank: Option<i64>,
}

/// One KV-cache event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Stored(BlockStored),
    Removed(BlockRemoved),
    AllCleared,
}

/// Consecutive full blocks of one sequence became prefix-cache hits.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockStored {
    /// Engine keys, in chain order.
    pub block_hashes: Vec<u64>,
    /// Engine key of the block before `block_hashes[0]`; `None` when the first block starts the
    /// sequence.
    pub parent_block_hash: Option<u64>,
    /// `block_hashes.len() * block_size` token ids.
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    pub lora_id: Option<i64>,
    /// Device tier, `"GPU"` for vLLM's own cache.
    pub medium: Option<String>,
    /// LoRA adapter the blocks were computed with (vLLM hashes it into the chain).
    pub lora_name: Option<String>,
}

/// These engine keys are no longer held.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockRemoved {
    pub block_hashes: Vec<u64>,
    pub medium: Option<String>,
}

/// vLLM's `medium` for blocks in the engine's own (GPU) KV cache.
pub const MEDIUM_GPU: &str = "GPU";

/// Frame 1 of a published message: the batch sequence number, 8 bytes big-endian.
pub fn sequence_frame(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Reads frame 1; `None` unless it is exactly 8 bytes.
pub fn parse_sequence_frame(frame: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(frame).ok().map(u64::from_be_bytes)
}

/// The pod and model parts of an llm-d style topic `kv@<pod>@<model>`; `None` for other topics.
pub fn parse_llmd_topic(topic: &str) -> Option<(&str, &str)> {
    let mut parts = topic.split('@');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(pod), Some(model), None) => Some((pod, model)),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
