//! `POST /v1/completions` and `POST /v1/chat/completions`, non-streaming and SSE.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::error::ApiError;
use super::generate::{prepare, Delta, Generation, OutputSpec};
use super::types::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta, ChatMessageIn, ChatMessageOut, ChatRequest,
    ChatResponse, CompletionChoice, CompletionRequest, CompletionResponse, MessageContent, Prompt,
};
use super::AppState;
use crate::serve::codec::ChatMessage;
use crate::serve::protocol::SamplingParams;

/// OpenAI's default `max_tokens` for completions.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// The request body, or the API error for the body-limit rejection.
pub(super) fn read_body(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: state.max_body_bytes,
            }
        } else {
            ApiError::bad(format!("Could not read the request body: {e}"), None)
        }
    })
}

/// Decodes a JSON body (borrowing from it where the type does).
pub(super) fn parse_json<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("Invalid request body: {e}"), None))
}

/// What a generation handler needs once the body is decoded, validated and tokenised.
struct Prepared {
    model: String,
    prompt: Vec<u32>,
    params: SamplingParams,
    spec: OutputSpec,
    stream: bool,
    include_usage: bool,
}

fn prepare_completion(state: &AppState, body: &[u8]) -> Result<Prepared, ApiError> {
    let mut req: CompletionRequest<'_> = parse_json(body)?;
    let common = req.take_common();
    let model = state.check_model(common.model.as_deref())?.to_owned();
    let max_model_len = state.engine.info().max_model_len;
    let (prompt, count) = Prompt::decode(req.prompt, max_model_len)
        .map_err(|e| ApiError::bad(format!("Invalid request body: {e}"), None))?;
    let prompt = match prompt {
        Prompt::Text(text) => state.encode(&text, true)?,
        Prompt::Tokens(ids) if count > ids.len() => {
            // Only the first max_model_len + 1 ids were kept: it cannot fit.
            let max_tokens = common
                .max_tokens
                .map_or(COMPLETIONS_DEFAULT_MAX_TOKENS, |m| {
                    usize::try_from(m).unwrap_or(usize::MAX)
                });
            return Err(ApiError::ContextTooLong {
                max_model_len,
                prompt_tokens: count,
                max_tokens,
            });
        }
        Prompt::Tokens(ids) => ids,
        Prompt::Texts(mut v) if v.len() == 1 => state.encode(&v.remove(0), true)?,
        Prompt::TokenLists(mut v) if v.len() == 1 => v.remove(0),
        _ => {
            return Err(ApiError::bad(
                "Batched prompts are not supported; send one prompt per request.",
                Some("prompt"),
            ))
        }
    };
    let (params, spec) = prepare(
        &state.engine,
        &state.limits,
        &common,
        &prompt,
        common.max_tokens,
        Some(COMPLETIONS_DEFAULT_MAX_TOKENS),
        req.logprobs,
    )?;
    Ok(Prepared {
        model,
        prompt,
        params,
        spec,
        stream: common.stream.unwrap_or(false),
        include_usage: common.stream_options.is_some_and(|o| o.include_usage),
    })
}

fn prepare_chat(state: &AppState, body: &[u8]) -> Result<Prepared, ApiError> {
    let mut req: ChatRequest = parse_json(body)?;
    let common = req.take_common();
    let model = state.check_model(common.model.as_deref())?.to_owned();
    if req.messages.is_empty() {
        return Err(ApiError::bad(
            "messages must not be empty.",
            Some("messages"),
        ));
    }
    let prompt = state.encode_chat(&req.messages)?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (true, top) => Some(top.unwrap_or(0)),
        (false, Some(_)) => {
            return Err(ApiError::bad(
                "top_logprobs requires logprobs to be true.",
                Some("top_logprobs"),
            ))
        }
        (false, None) => None,
    };
    let max_tokens = req.max_completion_tokens.or(common.max_tokens);
    let (params, spec) = prepare(
        &state.engine,
        &state.limits,
        &common,
        &prompt,
        max_tokens,
        None,
        logprobs,
    )?;
    Ok(Prepared {
        model,
        prompt,
        params,
        spec,
        stream: common.stream.unwrap_or(false),
        include_usage: common.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// Decoding, templating, tokenising and validation run on the blocking pool; submission and the
/// response on the async worker.
async fn generate(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let body = read_body(&state, body)?;
    let p = state
        .run_blocking(move |state| match kind {
            Kind::Completion => prepare_completion(state, &body),
            Kind::Chat => prepare_chat(state, &body),
        })
        .await?;
    let gen = Generation::start(
        &state.engine,
        &state.metrics,
        &state.codec,
        p.prompt,
        p.params,
        p.spec,
    )?;
    let prefix = match kind {
        Kind::Completion => "cmpl",
        Kind::Chat => "chatcmpl",
    };
    let ctx = Ctx {
        id: format!("{prefix}-{:032x}", rand::random::<u128>()),
        model: p.model,
        created: now_secs(),
    };
    if p.stream {
        Ok(sse(gen, ctx, kind, p.include_usage))
    } else {
        collect(gen, ctx, kind).await
    }
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(state, body, Kind::Completion).await
}

fn message_text(m: &ChatMessageIn) -> String {
    match &m.content {
        None => String::new(),
        Some(MessageContent::Text(s)) => s.clone(),
        Some(MessageContent::Parts(parts)) => parts
            .iter()
            .filter(|p| p.kind == "text")
            .filter_map(|p| p.text.as_deref())
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(state, body, Kind::Chat).await
}

pub(super) fn chat_messages(messages: &[ChatMessageIn]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|m| ChatMessage {
            role: m.role.clone(),
            content: message_text(m),
        })
        .collect()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug)]
struct Ctx {
    id: String,
    model: String,
    created: u64,
}

fn json_response<T: Serialize>(value: &T) -> Result<Response, ApiError> {
    let body = serde_json::to_vec(value).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn collect(mut gen: Generation, ctx: Ctx, kind: Kind) -> Result<Response, ApiError> {
    let mut tokens = Vec::new();
    while let Some(delta) = gen.next().await? {
        tokens.extend(delta.tokens);
    }
    let finish = gen.finish_reason.map(|r| r.as_str());
    let usage = gen.usage();
    match kind {
        Kind::Completion => {
            let logprobs = gen.completion_logprobs(&tokens, 0);
            let choice = CompletionChoice {
                index: 0,
                text: &gen.text,
                logprobs: logprobs.as_ref(),
                finish_reason: finish,
                stop_reason: gen.stop_reason.as_ref(),
            };
            json_response(&CompletionResponse {
                id: &ctx.id,
                object: "text_completion",
                created: ctx.created,
                model: &ctx.model,
                choices: &[choice],
                usage: Some(usage),
            })
        }
        Kind::Chat => {
            let logprobs = gen.chat_logprobs(&tokens);
            let choice = ChatChoice {
                index: 0,
                message: ChatMessageOut {
                    role: "assistant",
                    content: &gen.text,
                },
                logprobs: logprobs.as_ref(),
                finish_reason: finish,
                stop_reason: gen.stop_reason.as_ref(),
            };
            json_response(&ChatResponse {
                id: &ctx.id,
                object: "chat.completion",
                created: ctx.created,
                model: &ctx.model,
                choices: &[choice],
                usage,
            })
        }
    }
}

/// Where an SSE response is in its sequence of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Role,
    Body,
    Usage,
    Done,
    End,
}

struct SseState {
    gen: Generation,
    ctx: Ctx,
    kind: Kind,
    include_usage: bool,
    phase: Phase,
    /// Text bytes sent so far (completions `text_offset`).
    sent: usize,
}

fn event<T: Serialize>(value: &T) -> Bytes {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"data: ");
    // Serialising plain structs into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut buf, value);
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

impl SseState {
    fn chunk(&mut self, delta: &Delta) -> Bytes {
        let finish = if delta.finished {
            self.gen.finish_reason.map(|r| r.as_str())
        } else {
            None
        };
        let stop_reason = if delta.finished {
            self.gen.stop_reason.as_ref()
        } else {
            None
        };
        let bytes = match self.kind {
            Kind::Completion => {
                let logprobs = self.gen.completion_logprobs(&delta.tokens, self.sent);
                event(&CompletionResponse {
                    id: &self.ctx.id,
                    object: "text_completion",
                    created: self.ctx.created,
                    model: &self.ctx.model,
                    choices: &[CompletionChoice {
                        index: 0,
                        text: &delta.text,
                        logprobs: logprobs.as_ref(),
                        finish_reason: finish,
                        stop_reason,
                    }],
                    usage: None,
                })
            }
            Kind::Chat => {
                let logprobs = self.gen.chat_logprobs(&delta.tokens);
                event(&ChatChunk {
                    id: &self.ctx.id,
                    object: "chat.completion.chunk",
                    created: self.ctx.created,
                    model: &self.ctx.model,
                    choices: &[ChatChunkChoice {
                        index: 0,
                        delta: ChatDelta {
                            role: None,
                            content: Some(&delta.text),
                        },
                        logprobs: logprobs.as_ref(),
                        finish_reason: finish,
                        stop_reason,
                    }],
                    usage: None,
                })
            }
        };
        self.sent += delta.text.len();
        bytes
    }

    fn object(&self) -> &'static str {
        match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        }
    }

    async fn next_bytes(&mut self) -> Option<Bytes> {
        match self.phase {
            Phase::Role => {
                self.phase = Phase::Body;
                Some(event(&ChatChunk {
                    id: &self.ctx.id,
                    object: "chat.completion.chunk",
                    created: self.ctx.created,
                    model: &self.ctx.model,
                    choices: &[ChatChunkChoice {
                        index: 0,
                        delta: ChatDelta {
                            role: Some("assistant"),
                            content: Some(""),
                        },
                        logprobs: None,
                        finish_reason: None,
                        stop_reason: None,
                    }],
                    usage: None,
                }))
            }
            Phase::Body => match self.gen.next().await {
                Ok(Some(delta)) => {
                    if delta.finished {
                        self.phase = if self.include_usage {
                            Phase::Usage
                        } else {
                            Phase::Done
                        };
                    }
                    Some(self.chunk(&delta))
                }
                Ok(None) => {
                    self.phase = Phase::Done;
                    Some(Bytes::new())
                }
                Err(e) => {
                    // Headers are gone already: report the error in-band, then end the stream.
                    tracing::debug!(error = %e, "stream failed");
                    self.phase = Phase::Done;
                    Some(event(&e.body()))
                }
            },
            Phase::Usage => {
                self.phase = Phase::Done;
                Some(event(&ChatChunk {
                    id: &self.ctx.id,
                    object: self.object(),
                    created: self.ctx.created,
                    model: &self.ctx.model,
                    choices: &[],
                    usage: Some(self.gen.usage()),
                }))
            }
            Phase::Done => {
                self.phase = Phase::End;
                Some(Bytes::from_static(b"data: [DONE]\n\n"))
            }
            Phase::End => None,
        }
    }
}

/// The SSE response. The body stream owns the request: when the client disconnects, hyper drops
/// the stream, the engine's receiver goes with it, and the engine aborts the request.
fn sse(gen: Generation, ctx: Ctx, kind: Kind, include_usage: bool) -> Response {
    let phase = if kind == Kind::Chat {
        Phase::Role
    } else {
        Phase::Body
    };
    let state = SseState {
        gen,
        ctx,
        kind,
        include_usage,
        phase,
        sent: 0,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        let bytes = st.next_bytes().await?;
        Some((Ok::<_, Infallible>(bytes), st))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}
