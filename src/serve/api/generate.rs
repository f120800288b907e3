//! From a decoded request to engine output: parameter validation, submission, and the
//! [`Generation`] that turns engine token events into text deltas (detokenisation, stop strings,
//! logprobs) for both the completions and chat endpoints.

use std::sync::Arc;

use crate::serve::codec::TextCodec;
use crate::serve::engine::{EngineHandle, RequestStream, SchedulingPolicy};
use crate::serve::metrics::ServeMetrics;
use crate::serve::protocol::{
    FinishReason, SamplingParams, SeqEvent, StopTokenIds, TokenConstraint, TokenLogprobs,
};

use super::detok::{Detokenizer, StopMatcher};
use super::error::ApiError;
use super::types::{
    ChatLogprobs, ChatTokenLogprob, CommonParams, CompletionLogprobs, StopReason, StopSpec,
    TopLogprob, Usage,
};

/// Largest `logprobs` / `top_logprobs` accepted (OpenAI's limit).
pub const MAX_LOGPROBS: i64 = 20;

/// Per-request input caps (flags of `switchyard serve`; docs/security.md, "Decode server
/// limits"). Defaults sit far above what real requests send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// `--max-stop-strings`.
    pub max_stop_strings: usize,
    /// `--max-stop-string-bytes`: the longest stop string.
    pub max_stop_string_bytes: usize,
    /// `--max-stop-token-ids`.
    pub max_stop_token_ids: usize,
    /// Prompt text (or the chat messages' text) above this many bytes cannot fit the context
    /// (`--max-prompt-bytes`, default `--max-model-len` × the longest token in bytes), and is
    /// refused before it is templated or tokenised.
    pub max_prompt_bytes: usize,
}

/// The flag defaults, with no prompt byte cap (that one depends on the model).
impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_stop_strings: 64,
            max_stop_string_bytes: 1024,
            max_stop_token_ids: 1024,
            max_prompt_bytes: usize::MAX,
        }
    }
}

/// Output-side options that are not engine sampling parameters.
#[derive(Debug, Clone)]
pub struct OutputSpec {
    pub stops: StopMatcher,
    pub skip_special: bool,
    pub include_stop: bool,
    /// Tokens that end generation (EOS unless ignored, and `stop_token_ids`); their text is
    /// left out of the output unless `include_stop_str_in_output`.
    pub terminal_ids: StopTokenIds,
}

/// Validates the shared parameters against the prompt and the engine's limits.
///
/// `default_max_tokens`: `None` means "the rest of the context" (chat).
pub fn prepare(
    engine: &EngineHandle,
    limits: &RequestLimits,
    common: &CommonParams,
    prompt: &[u32],
    max_tokens: Option<i64>,
    default_max_tokens: Option<usize>,
    logprobs: Option<i64>,
) -> Result<(SamplingParams, OutputSpec), ApiError> {
    let info = engine.info();
    if prompt.is_empty() {
        return Err(ApiError::bad(
            "The prompt must not be empty.",
            Some("prompt"),
        ));
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= info.vocab_size) {
        return Err(ApiError::bad(
            format!(
                "Token id {bad} is out of vocabulary (vocabulary size {}).",
                info.vocab_size
            ),
            Some("prompt"),
        ));
    }
    if let Some(n) = common.n {
        if n != 1 {
            return Err(ApiError::bad(format!("n must be 1, got {n}."), Some("n")));
        }
    }
    let max_tokens = match max_tokens {
        Some(m) if m < 1 => {
            return Err(ApiError::bad(
                format!("max_tokens must be at least 1, got {m}."),
                Some("max_tokens"),
            ))
        }
        Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
        None => default_max_tokens
            .unwrap_or_else(|| info.max_model_len.saturating_sub(prompt.len()).max(1)),
    };
    if prompt.len().saturating_add(max_tokens) > info.max_model_len {
        return Err(ApiError::ContextTooLong {
            max_model_len: info.max_model_len,
            prompt_tokens: prompt.len(),
            max_tokens,
        });
    }
    let temperature = common.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ApiError::bad(
            format!("temperature must be a non-negative number, got {temperature}."),
            Some("temperature"),
        ));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(
            format!("top_p must be in (0, 1], got {top_p}."),
            Some("top_p"),
        ));
    }
    let top_k = match common.top_k.unwrap_or(0) {
        k if k == -1 || k == 0 => 0,
        k if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        k => {
            return Err(ApiError::bad(
                format!("top_k must be -1 (disable) or at least 1, got {k}."),
                Some("top_k"),
            ))
        }
    };
    let logprobs = match logprobs {
        None => None,
        Some(n) if (0..=MAX_LOGPROBS).contains(&n) => Some(n as usize),
        Some(n) => {
            return Err(ApiError::bad(
                format!("logprobs must be between 0 and {MAX_LOGPROBS}, got {n}."),
                Some("logprobs"),
            ))
        }
    };
    let stops = match &common.stop {
        None => Vec::new(),
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => v.clone(),
    };
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::bad(
            "Stop strings must not be empty.",
            Some("stop"),
        ));
    }
    if stops.len() > limits.max_stop_strings {
        return Err(ApiError::bad(
            format!(
                "stop has {} strings; at most {} are allowed.",
                stops.len(),
                limits.max_stop_strings
            ),
            Some("stop"),
        ));
    }
    if let Some(long) = stops
        .iter()
        .map(String::len)
        .find(|&n| n > limits.max_stop_string_bytes)
    {
        return Err(ApiError::bad(
            format!(
                "A stop string is {long} bytes long; at most {} bytes are allowed.",
                limits.max_stop_string_bytes
            ),
            Some("stop"),
        ));
    }
    let ignore_eos = common.ignore_eos.unwrap_or(false);
    let stop_token_ids = common.stop_token_ids.clone().unwrap_or_default();
    if stop_token_ids.len() > limits.max_stop_token_ids {
        return Err(ApiError::bad(
            format!(
                "stop_token_ids has {} ids; at most {} are allowed.",
                stop_token_ids.len(),
                limits.max_stop_token_ids
            ),
            Some("stop_token_ids"),
        ));
    }
    let mut terminal_ids = stop_token_ids.clone();
    if !ignore_eos {
        terminal_ids.extend_from_slice(&info.eos_token_ids);
    }
    let include_stop = common.include_stop_str_in_output.unwrap_or(false);
    let priority = common.priority.unwrap_or(0);
    // vLLM's check and text (`vllm/v1/engine/processor.py`): a priority the server would ignore
    // is refused rather than silently dropped.
    if priority != 0 && info.scheduling_policy != SchedulingPolicy::Priority {
        return Err(ApiError::bad(
            format!("Got priority {priority} but Priority scheduling is not enabled."),
            Some("priority"),
        ));
    }
    let params = SamplingParams {
        temperature,
        top_p,
        top_k,
        // Negative seeds are valid in the OpenAI API; reinterpret the bits.
        seed: common.seed.map(|s| s as u64),
        max_tokens,
        stop_token_ids: StopTokenIds::new(stop_token_ids),
        ignore_eos,
        logprobs,
        priority,
    };
    let spec = OutputSpec {
        stops: StopMatcher::new(stops, include_stop)
            .map_err(|e| ApiError::bad(format!("Invalid stop strings: {e}"), Some("stop")))?,
        skip_special: common.skip_special_tokens.unwrap_or(true),
        include_stop,
        terminal_ids: StopTokenIds::new(terminal_ids),
    };
    Ok((params, spec))
}

/// A piece of output: new text and the tokens that produced it.
#[derive(Debug, Default)]
pub struct Delta {
    pub text: String,
    pub tokens: Vec<(u32, Option<TokenLogprobs>)>,
    pub finished: bool,
}

/// One running request's output side.
pub struct Generation {
    engine: EngineHandle,
    metrics: Arc<ServeMetrics>,
    codec: Arc<dyn TextCodec>,
    stream: RequestStream,
    detok: Detokenizer,
    spec: OutputSpec,
    want_logprobs: bool,
    /// All output text so far (after stop-string truncation).
    pub text: String,
    emitted: usize,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
    done: bool,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("id", &self.stream.id)
            .finish_non_exhaustive()
    }
}

impl Generation {
    /// Submits the request to the engine.
    pub fn start(
        engine: &EngineHandle,
        metrics: &Arc<ServeMetrics>,
        codec: &Arc<dyn TextCodec>,
        prompt: Vec<u32>,
        params: SamplingParams,
        spec: OutputSpec,
        constraint: Option<Box<dyn TokenConstraint>>,
    ) -> Result<Self, ApiError> {
        let detok = Detokenizer::new(Arc::clone(codec), spec.skip_special, &prompt);
        let prompt_tokens = prompt.len();
        let want_logprobs = params.logprobs.is_some();
        let stream = engine.submit_constrained(prompt, params, constraint)?;
        Ok(Self {
            engine: engine.clone(),
            metrics: Arc::clone(metrics),
            codec: Arc::clone(codec),
            stream,
            detok,
            spec,
            want_logprobs,
            text: String::new(),
            emitted: 0,
            prompt_tokens,
            cached_tokens: 0,
            completion_tokens: 0,
            finish_reason: None,
            stop_reason: None,
            done: false,
        })
    }

    pub fn usage(&self) -> Usage {
        Usage::new(
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
        )
    }

    pub fn codec(&self) -> &Arc<dyn TextCodec> {
        &self.codec
    }

    /// The next delta with new text (or the final one); `None` once finished.
    pub async fn next(&mut self) -> Result<Option<Delta>, ApiError> {
        if self.done {
            return Ok(None);
        }
        let mut delta = Delta::default();
        loop {
            let Some(event) = self.stream.events.recv().await else {
                // The engine dropped the request without finishing it: it died.
                self.done = true;
                return Err(ApiError::EngineDead);
            };
            match event {
                SeqEvent::Started {
                    prompt_tokens,
                    cached_tokens,
                } => {
                    self.prompt_tokens = prompt_tokens;
                    self.cached_tokens = cached_tokens;
                }
                SeqEvent::Token { id, logprobs } => {
                    self.completion_tokens += 1;
                    delta.tokens.push((id, logprobs));
                    let terminal = self.spec.terminal_ids.contains(id);
                    if !terminal || self.spec.include_stop {
                        let prev = self.text.len();
                        let piece = self
                            .detok
                            .push(id)
                            .map_err(|e| ApiError::Internal(e.to_string()))?;
                        self.text.push_str(&piece);
                        if let Some(stop) = self.spec.stops.check(&mut self.text, prev) {
                            self.end_in_engine();
                            self.finish_reason = Some(FinishReason::Stop);
                            self.stop_reason = Some(StopReason::Text(stop));
                            return Ok(Some(self.finish(delta)));
                        }
                    }
                    let safe = self.spec.stops.safe_len(&self.text);
                    if let Some(piece) = self.text.get(self.emitted..safe).filter(|p| !p.is_empty())
                    {
                        delta.text.push_str(piece);
                        self.emitted = safe;
                        return Ok(Some(delta));
                    }
                }
                SeqEvent::Finished { reason, stop_token } => {
                    self.finish_reason = Some(reason);
                    self.stop_reason = stop_token.map(StopReason::Token);
                    return Ok(Some(self.finish(delta)));
                }
                SeqEvent::Failed { message } => {
                    self.done = true;
                    return Err(ApiError::Internal(message));
                }
            }
        }
    }

    /// Ends the request in the engine with reason `stop`. The receiver is kept (drained in a
    /// task) until the engine confirms, so the engine never mistakes the end of this response
    /// for a client disconnect and counts it as `abort`.
    fn end_in_engine(&mut self) {
        if !self.engine.stop(self.stream.id) {
            return; // dropping the receiver with `self` aborts the request instead
        }
        let (_, closed) = tokio::sync::mpsc::channel(1);
        let mut events = std::mem::replace(&mut self.stream.events, closed);
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if matches!(ev, SeqEvent::Finished { .. } | SeqEvent::Failed { .. }) {
                    break;
                }
            }
        });
    }

    fn finish(&mut self, mut delta: Delta) -> Delta {
        if let Some(reason) = self.finish_reason {
            self.metrics.request_finished(reason);
        }
        if let Some(rest) = self.text.get(self.emitted..) {
            delta.text.push_str(rest);
        }
        self.emitted = self.text.len();
        delta.finished = true;
        self.done = true;
        delta
    }

    fn token_text(&self, id: u32) -> String {
        self.codec.decode(&[id], false).unwrap_or_default()
    }

    /// Completions-style logprobs for `tokens`, text offsets starting at `offset`.
    pub fn completion_logprobs(
        &self,
        tokens: &[(u32, Option<TokenLogprobs>)],
        mut offset: usize,
    ) -> Option<CompletionLogprobs> {
        if !self.want_logprobs {
            return None;
        }
        let mut out = CompletionLogprobs::default();
        for (id, lp) in tokens {
            let lp = lp.as_ref()?;
            let text = self.token_text(*id);
            out.text_offset.push(offset);
            offset += text.len();
            out.tokens.push(text);
            out.token_logprobs.push(lp.logprob);
            let mut top = serde_json::Map::new();
            for &(t, l) in &lp.top {
                top.insert(self.token_text(t), serde_json::Value::from(f64::from(l)));
            }
            out.top_logprobs.push(top);
        }
        Some(out)
    }

    /// Chat-style logprobs for `tokens`.
    pub fn chat_logprobs(&self, tokens: &[(u32, Option<TokenLogprobs>)]) -> Option<ChatLogprobs> {
        if !self.want_logprobs {
            return None;
        }
        let mut out = ChatLogprobs::default();
        for (id, lp) in tokens {
            let lp = lp.as_ref()?;
            let token = self.token_text(*id);
            let top_logprobs = lp
                .top
                .iter()
                .map(|&(t, l)| {
                    let token = self.token_text(t);
                    TopLogprob {
                        bytes: token.as_bytes().to_vec(),
                        token,
                        logprob: l,
                    }
                })
                .collect();
            out.content.push(ChatTokenLogprob {
                bytes: token.as_bytes().to_vec(),
                token,
                logprob: lp.logprob,
                top_logprobs,
            });
        }
        Some(out)
    }
}

/// `vllm:request_success_total` is counted here, where the reason the client sees is known (a
/// stop string may end a request the engine was about to finish by length); a response dropped
/// before its end is an abort.
impl Drop for Generation {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.request_finished(FinishReason::Abort);
        }
    }
}
