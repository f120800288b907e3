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
use super::generate::{prepare, Delta, Generation};
use super::types::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta, ChatMessageIn, ChatMessageOut, ChatRequest,
    ChatResponse, CompletionChoice, CompletionRequest, CompletionResponse, MessageContent, Prompt,
};
use super::AppState;
use crate::serve::codec::ChatMessage;

/// OpenAI's default `max_tokens` for completions.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// Decodes a JSON body, turning the body-limit rejection and parse errors into API errors.
pub(super) fn parse_body<T: serde::de::DeserializeOwned>(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: state.max_body_bytes,
            }
        } else {
            ApiError::bad(format!("Could not read the request body: {e}"), None)
        }
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("Invalid request body: {e}"), None))
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(&state, body)?;
    let model = state.check_model(req.common.model.as_deref())?.to_owned();
    let prompt = match req.prompt {
        Prompt::Text(text) => state.encode(&text, true)?,
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
        &req.common,
        &prompt,
        req.common.max_tokens,
        Some(COMPLETIONS_DEFAULT_MAX_TOKENS),
        req.logprobs,
    )?;
    let gen = Generation::start(
        &state.engine,
        &state.metrics,
        &state.codec,
        prompt,
        params,
        spec,
    )?;
    let stream = req.common.stream.unwrap_or(false);
    let include_usage = req.common.stream_options.is_some_and(|o| o.include_usage);
    let ctx = Ctx {
        id: format!("cmpl-{:032x}", rand::random::<u128>()),
        model,
        created: now_secs(),
    };
    if stream {
        Ok(sse(gen, ctx, Kind::Completion, include_usage))
    } else {
        collect(gen, ctx, Kind::Completion).await
    }
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
    let req: ChatRequest = parse_body(&state, body)?;
    let model = state.check_model(req.common.model.as_deref())?.to_owned();
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
    let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
    let (params, spec) = prepare(
        &state.engine,
        &req.common,
        &prompt,
        max_tokens,
        None,
        logprobs,
    )?;
    let gen = Generation::start(
        &state.engine,
        &state.metrics,
        &state.codec,
        prompt,
        params,
        spec,
    )?;
    let stream = req.common.stream.unwrap_or(false);
    let include_usage = req.common.stream_options.is_some_and(|o| o.include_usage);
    let ctx = Ctx {
        id: format!("chatcmpl-{:032x}", rand::random::<u128>()),
        model,
        created: now_secs(),
    };
    if stream {
        Ok(sse(gen, ctx, Kind::Chat, include_usage))
    } else {
        collect(gen, ctx, Kind::Chat).await
    }
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
