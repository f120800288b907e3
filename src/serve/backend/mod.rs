//! The narrow interface between the engine and whatever runs the model.
//!
//! The engine (scheduler, block manager, prefix cache, sampling, metrics) never knows which backend
//! runs: it hands over one [`StepBatch`] per step and reads back logits (or, for backends that do
//! not compute a real distribution, sampled tokens).

pub mod cpu;
pub mod cuda;
pub mod scripted;
pub mod sim;

/// Shape of the paged KV cache a backend needs, so the engine can size the block pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvSpec {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_size: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Bytes one block takes across all layers, K and V together.
    pub bytes_per_block: usize,
}

/// One sequence's slice of a step batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSlice {
    /// Offset of this sequence's first new token in `StepBatch::token_ids`.
    pub query_start: usize,
    /// Number of new tokens this step (prefill chunk length, or 1 for decode).
    pub query_len: usize,
    /// Tokens already in the KV cache before this step (prefix hits + earlier chunks).
    pub context_len: usize,
}

/// Everything a backend needs to run one forward step over a ragged batch.
///
/// Invariants the engine guarantees: `token_ids`, `positions` and `slot_mapping` have one entry
/// per new token; `seqs[i]` covers `token_ids[query_start .. query_start + query_len]`;
/// `block_tables[i]` lists the physical blocks of sequence `i` in order and covers
/// `context_len + query_len` tokens; `slot = block * block_size + offset`; `logits_rows` are
/// indices into `token_ids`, ascending, one per row the engine wants logits for.
#[derive(Debug, Clone, Default)]
pub struct StepBatch {
    pub token_ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
    pub block_tables: Vec<Vec<u32>>,
    pub slot_mapping: Vec<u32>,
    pub logits_rows: Vec<usize>,
}

impl StepBatch {
    pub fn clear(&mut self) {
        self.token_ids.clear();
        self.positions.clear();
        self.seqs.clear();
        self.block_tables.clear();
        self.slot_mapping.clear();
        self.logits_rows.clear();
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}

/// What a backend returns for one step. Reused across steps to avoid reallocating.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    /// Row-major `[logits_rows.len(), vocab_size]`, filled by real backends.
    pub logits: Vec<f32>,
    pub vocab_size: usize,
    /// Filled instead of `logits` by backends that pick tokens themselves (the `sim` backend);
    /// one per logits row. When non-empty the engine skips sampling.
    pub sampled: Vec<u32>,
}

impl StepOutput {
    pub fn clear(&mut self) {
        self.logits.clear();
        self.sampled.clear();
    }

    /// Logits of the `row`-th requested row, if the backend produced logits.
    pub fn row(&self, row: usize) -> Option<&[f32]> {
        let start = row.checked_mul(self.vocab_size)?;
        self.logits.get(start..start.checked_add(self.vocab_size)?)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend not available: {0}")]
    Unavailable(String),
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    #[error("KV cache not initialised")]
    KvNotInitialised,
    #[error("backend failure: {0}")]
    Failed(String),
}

/// A model runner. Called only from the engine's step loop (one owner, no locking).
pub trait Backend: Send + 'static {
    /// Short name used in logs and `/version` (`cpu`, `sim`, `cuda`).
    fn name(&self) -> &'static str;

    fn kv_spec(&self) -> KvSpec;

    fn vocab_size(&self) -> usize;

    /// How many KV blocks fit in the memory budget the backend was configured with.
    fn available_kv_blocks(&self) -> usize;

    /// Whether `execute` fills logits (else it picks tokens itself, as the plain sim does).
    fn computes_logits(&self) -> bool {
        true
    }

    /// Allocates the KV cache for `num_blocks` blocks. Called once before the first `execute`.
    fn init_kv(&mut self, num_blocks: usize) -> Result<(), BackendError>;

    /// Runs one forward step: writes K/V of every new token to its slot, and fills `out` with
    /// logits (or sampled tokens) for `batch.logits_rows`.
    fn execute(&mut self, batch: &StepBatch, out: &mut StepOutput) -> Result<(), BackendError>;
}
