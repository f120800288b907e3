//! One request inside the engine: its tokens, KV blocks, progress, sampling state and the channel
//! its output leaves on.

use std::time::Instant;

use rand::rngs::StdRng;
use tokio::sync::mpsc::Sender;

use crate::serve::protocol::{
    EngineRequest, FinishReason, SamplingParams, SeqEvent, TokenConstraint,
};

/// Most events one step sends a sequence (`Started`, `Token`, `Finished`).
const EVENTS_PER_STEP: usize = 3;

/// Lifecycle timestamps used for the latency histograms.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub arrival: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
}

#[derive(Debug)]
pub struct Sequence {
    pub id: u64,
    /// Prompt followed by every generated token.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    pub num_computed: usize,
    /// Physical blocks, in order.
    pub block_table: Vec<u32>,
    /// Hashes of the full blocks of `tokens` computed so far.
    pub block_hashes: Vec<u64>,
    /// Leading blocks already registered in the prefix cache (or found there).
    pub num_registered: usize,
    pub params: SamplingParams,
    pub rng: StdRng,
    pub events: Sender<SeqEvent>,
    pub timing: Timing,
    /// Prompt tokens served from the prefix cache at first admission (reported in usage).
    pub cached_tokens: Option<usize>,
    pub finished: Option<FinishReason>,
    pub num_preemptions: u32,
    /// Structured-output mask state, advanced once per sampled token (kept across preemption:
    /// recompute re-runs the same tokens, it does not re-sample them).
    pub constraint: Option<Box<dyn TokenConstraint>>,
}

impl Sequence {
    /// A new, waiting sequence for `req` (its token buffer sized for the whole output).
    pub fn new(req: EngineRequest, rng: StdRng) -> Self {
        let capacity = req.prompt.len().saturating_add(req.params.max_tokens);
        let mut tokens = Vec::with_capacity(capacity);
        tokens.extend_from_slice(&req.prompt);
        Self {
            id: req.id,
            prompt_len: tokens.len(),
            tokens,
            num_computed: 0,
            block_table: Vec::new(),
            block_hashes: Vec::new(),
            num_registered: 0,
            params: req.params,
            rng,
            events: req.events,
            timing: Timing {
                arrival: req.arrival,
                first_scheduled: None,
                first_token: None,
                last_token: None,
            },
            cached_tokens: None,
            finished: None,
            num_preemptions: 0,
            constraint: req.constraint,
        }
    }

    /// Order under the priority policy: priority, then arrival, then id (submission order, for
    /// arrivals within one clock tick).
    pub fn sched_key(&self) -> (i64, Instant, u64) {
        (self.params.priority, self.timing.arrival, self.id)
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// The client dropped its receiver (disconnect or stop string), or stopped reading: its
    /// channel has no room left for one more step's events (`Started`, `Token`, `Finished`)
    /// plus the `Finished` that ends it. Either way the request is aborted.
    pub fn client_gone(&self) -> bool {
        self.events.is_closed() || self.events.capacity() <= EVENTS_PER_STEP
    }

    /// Never blocks the engine: the scan at the start of each step aborts a sequence before its
    /// channel could be full, so sends fail only when the client has gone.
    pub fn send(&self, event: SeqEvent) {
        let _ = self.events.try_send(event);
    }
}
