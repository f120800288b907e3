//! The vocabulary the decode server's parts share: what a request asks for ([`SamplingParams`]),
//! what the API hands the engine ([`EngineRequest`]), what comes back ([`SeqEvent`],
//! [`FinishReason`], [`TokenLogprobs`]) and why a submission is refused ([`SubmitError`]).
//!
//! A leaf: it imports nothing from the rest of `serve`, so the API, the engine and `metrics` can
//! all depend on it without depending on each other.

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
    pub stop_token_ids: Vec<u32>,
    /// Do not end on the model's EOS tokens.
    pub ignore_eos: bool,
    /// Number of top alternatives to return per token; `None` returns no logprobs.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            max_tokens: 16,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

/// A request handed to the engine.
#[derive(Debug)]
pub struct EngineRequest {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub arrival: Instant,
    pub events: mpsc::UnboundedSender<SeqEvent>,
}

/// Why the engine refused a request at submission.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("server overloaded: {waiting} requests waiting (limit {max})")]
    Overloaded { waiting: usize, max: usize },
    #[error("engine is not running")]
    EngineDead,
}
