//! The vocabulary the decode server's parts share: what a request asks for ([`SamplingParams`]),
//! what the API hands the engine ([`EngineRequest`]), what comes back ([`SeqEvent`],
//! [`FinishReason`], [`TokenLogprobs`]) and why a submission is refused ([`SubmitError`]).
//!
//! A leaf: it imports nothing from the rest of `serve`, so the API, the engine and `metrics` can
//! all depend on it without depending on each other.

use std::collections::HashSet;
use std::time::Instant;

use tokio::sync::mpsc;

/// Why a request ended (the `finished_reason` label and the API's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the model's context length.
    Length,
    /// The client went away.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Log-probability of the chosen token and the top alternatives (from the raw logits, before
/// temperature and filtering, as vLLM reports them by default).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Output of one request, in order: `Started`, then `Token`s, then `Finished` (or `Failed`).
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    /// First admitted: prompt length and how many prompt tokens came from the prefix cache.
    Started {
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    Token {
        id: u32,
        logprobs: Option<TokenLogprobs>,
    },
    /// `stop_token` is the stop token id that ended generation, if any (not EOS).
    Finished {
        reason: FinishReason,
        stop_token: Option<u32>,
    },
    Failed {
        message: String,
    },
}

/// `stop_token_ids` as the engine checks them once per generated token: a linear scan while the
/// list is short (typical: a handful of ids), a hash set beyond, so the per-token cost stays O(1)
/// however many ids the API admitted (`--max-stop-token-ids`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StopTokenIds {
    #[default]
    None,
    Few(Vec<u32>),
    Many(HashSet<u32>),
}

impl StopTokenIds {
    /// Up to this many ids a scan of a `Vec` beats hashing.
    const SCAN_MAX: usize = 16;

    pub fn new(ids: Vec<u32>) -> Self {
        if ids.is_empty() {
            StopTokenIds::None
        } else if ids.len() <= Self::SCAN_MAX {
            StopTokenIds::Few(ids)
        } else {
            StopTokenIds::Many(ids.into_iter().collect())
        }
    }

    pub fn contains(&self, id: u32) -> bool {
        match self {
            StopTokenIds::None => false,
            StopTokenIds::Few(v) => v.contains(&id),
            StopTokenIds::Many(s) => s.contains(&id),
        }
    }
}

impl From<Vec<u32>> for StopTokenIds {
    fn from(ids: Vec<u32>) -> Self {
        StopTokenIds::new(ids)
    }
}

/// Per-request sampling parameters, already validated by the API layer.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 disables nucleus filtering.
    pub top_p: f32,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    pub seed: Option<u64>,
    /// Generated tokens at most (at least 1).
    pub max_tokens: usize,
    /// Generation ends when one of these is sampled (it is included in the output).
    pub stop_token_ids: StopTokenIds,
    /// Do not end on the model's EOS tokens.
    pub ignore_eos: bool,
    /// Number of top alternatives to return per token; `None` returns no logprobs.
    pub logprobs: Option<usize>,
    /// Scheduling priority, lower first (vLLM's request `priority`; only under
    /// `--scheduling-policy priority`). Not a sampling knob, but it travels with the
    /// parameters the API validated.
    pub priority: i64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            max_tokens: 16,
            stop_token_ids: StopTokenIds::None,
            ignore_eos: false,
            logprobs: None,
            priority: 0,
        }
    }
}

/// A request's output constraint (structured outputs, forced tool calls): the engine masks each
/// sampling row's logits with it and then advances it with the sampled token. Runs on the engine
/// thread; both calls are per generated token, so they must be cheap (a bitmask, not a compile).
pub trait TokenConstraint: Send + std::fmt::Debug {
    /// Sets the logits of the tokens it forbids next to `-inf`. `Err`: it cannot go on (the
    /// engine then allows only EOS, ending the request).
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String>;
    /// Advances past `token`, the one sampled from the masked logits.
    fn accept(&mut self, token: u32) -> Result<(), String>;
}

/// A request handed to the engine.
#[derive(Debug)]
pub struct EngineRequest {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub arrival: Instant,
    /// Bounded: a client that leaves `capacity - 3` events unread has its request aborted.
    pub events: mpsc::Sender<SeqEvent>,
    pub constraint: Option<Box<dyn TokenConstraint>>,
}

/// Why the engine refused a request at submission.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("server overloaded: {waiting} requests waiting (limit {max})")]
    Overloaded { waiting: usize, max: usize },
    #[error("engine is not running")]
    EngineDead,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_token_ids_small_and_large_agree() {
        let few = StopTokenIds::new(vec![3, 7, 11]);
        assert!(matches!(few, StopTokenIds::Few(_)));
        assert!(few.contains(7));
        assert!(!few.contains(8));
        let many = StopTokenIds::new((0..1000).map(|i| i * 2).collect());
        assert!(matches!(many, StopTokenIds::Many(_)));
        assert!(many.contains(1998));
        assert!(!many.contains(1999));
        assert!(!StopTokenIds::new(Vec::new()).contains(0));
    }
}
