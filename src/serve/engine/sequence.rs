//! One request inside the engine: its tokens, KV blocks, progress, sampling state and the channel
//! its output leaves on.

use std::time::Instant;

use rand::rngs::StdRng;
use tokio::sync::mpsc::UnboundedSender;

use super::sampling::SamplingParams;
use super::{FinishReason, SeqEvent};

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
    pub events: UnboundedSender<SeqEvent>,
    pub timing: Timing,
    /// Prompt tokens served from the prefix cache at first admission (reported in usage).
    pub cached_tokens: Option<usize>,
    pub finished: Option<FinishReason>,
    pub num_preemptions: u32,
}

impl Sequence {
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// The client dropped its receiver (disconnect or stop string): abort.
    pub fn client_gone(&self) -> bool {
        self.events.is_closed()
    }

    pub fn send(&self, event: SeqEvent) {
        // A failed send means the client went away; the next step's scan aborts the sequence.
        let _ = self.events.send(event);
    }
}
