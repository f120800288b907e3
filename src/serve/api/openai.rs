//! `POST /v1/completions` and `POST /v1/chat/completions`, non-streaming and SSE.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::constrained::GrammarError;
use super::error::ApiError;
use super::generate::{prepare, Delta, Generation, OutputSpec};
use super::messages::{resolve_tools, ToolChoice, Tools};
use super::params::{check_unsupported, Endpoint};
use super::structured;
use super::tools::{ToolEvent, ToolParser};
use super::types::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta, ChatMessageOut, ChatRequest, ChatResponse,
    CommonParams, CompletionChoice, CompletionRequest, CompletionResponse, FunctionDelta,
    FunctionOut, Prompt, ToolCallDelta, ToolCallOut,
};
use super::AppState;
use crate::serve::codec::ChatExtras;
use crate::serve::protocol::{SamplingParams, TokenConstraint};

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

/// How a chat response reports tool calls.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ToolMode {
    /// `auto` (or `required`, whose output is a JSON list of calls): calls are parsed out of
    /// the text, and a response with calls finishes with `tool_calls`.
    Parse { names: Vec<String>, parallel: bool },
    /// `tool_choice` names the function: the output is its arguments; finishes with `stop`
    /// (as OpenAI does for a forced function).
    Named(String),
}

impl ToolMode {
    fn from_tools(tools: &Tools) -> Option<Self> {
        match &tools.choice {
            ToolChoice::None => None,
            ToolChoice::Auto | ToolChoice::Required => Some(ToolMode::Parse {
                names: tools.names(),
                parallel: tools.parallel,
            }),
            ToolChoice::Named(name) => Some(ToolMode::Named(name.clone())),
        }
    }

    fn parser(&self) -> ToolParser {
        match self {
            ToolMode::Parse { names, parallel } => ToolParser::new(names.clone(), *parallel),
            ToolMode::Named(name) => ToolParser::named(name.clone()),
        }
    }

    /// The response's `finish_reason` given the engine's and whether calls were found.
    fn finish_reason(&self, engine: Option<&'static str>, calls: bool) -> Option<&'static str> {
        match (self, engine) {
            (ToolMode::Parse { .. }, Some("stop")) if calls => Some("tool_calls"),
            _ => engine,
        }
    }
}

/// What a generation handler needs once the body is decoded, validated and tokenised.
struct Prepared {
    model: String,
    prompt: Vec<u32>,
    params: SamplingParams,
    spec: OutputSpec,
    stream: bool,
    include_usage: bool,
    request_id: Option<String>,
    tools: Option<ToolMode>,
    constraint: Option<Box<dyn TokenConstraint>>,
}

/// Checks shared by both endpoints before anything is tokenised.
fn check_common(common: &CommonParams) -> Result<(), ApiError> {
    if common.stream_options.is_some() && !common.stream.unwrap_or(false) {
        return Err(ApiError::bad(
            "Stream options can only be defined when `stream=True`.",
            Some("stream_options"),
        ));
    }
    Ok(())
}

/// The request's output constraint, compiled (an uncompilable one is a 400 with the reason).
fn constraint(
    state: &AppState,
    common: &CommonParams,
    tools: Option<&Tools>,
) -> Result<Option<Box<dyn TokenConstraint>>, ApiError> {
    let Some(spec) = structured::plan(
        common.response_format.as_ref(),
        common.structured_outputs.as_ref(),
        tools,
    )?
    else {
        return Ok(None);
    };
    if !state.engine.info().computes_logits {
        return Err(ApiError::bad(
            format!(
                "{} needs constrained decoding, which needs a backend that computes logits; the \
                 sim backend picks tokens without them (use --sim-script, cpu or cuda).",
                spec.param
            ),
            Some(spec.param),
        ));
    }
    state
        .grammars
        .compile(&spec)
        .map(Some)
        .map_err(|e| match e {
            GrammarError::Unavailable(_) => {
                ApiError::bad(format!("{}: {e}", spec.param), Some(spec.param))
            }
            GrammarError::Compile(reason) => ApiError::bad(
                format!("Invalid {}: {reason}", spec.param),
                Some(spec.param),
            ),
        })
}

fn prepare_completion(state: &AppState, body: &[u8]) -> Result<Prepared, ApiError> {
    check_unsupported(body, Endpoint::Completion)?;
    let mut req: CompletionRequest<'_> = parse_json(body)?;
    let common = req.take_common();
    let model = state.check_model(common.model.as_deref())?.to_owned();
    check_common(&common)?;
    let add_special = req.add_special_tokens.unwrap_or(true);
    let max_model_len = state.engine.info().max_model_len;
    let (prompt, count) = Prompt::decode(req.prompt, max_model_len)
        .map_err(|e| ApiError::bad(format!("Invalid request body: {e}"), None))?;
    let prompt = match prompt {
        Prompt::Text(text) => state.encode(&text, add_special)?,
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
        Prompt::Texts(mut v) if v.len() == 1 => state.encode(&v.remove(0), add_special)?,
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
    let constraint = constraint(state, &common, None)?;
    Ok(Prepared {
        model,
        prompt,
        params,
        spec,
        stream: common.stream.unwrap_or(false),
        include_usage: common.stream_options.is_some_and(|o| o.include_usage),
        request_id: common.request_id,
        tools: None,
        constraint,
    })
}

fn prepare_chat(state: &AppState, body: &[u8]) -> Result<Prepared, ApiError> {
    check_unsupported(body, Endpoint::Chat)?;
    let mut req: ChatRequest = parse_json(body)?;
    let common = req.take_common();
    let model = state.check_model(common.model.as_deref())?.to_owned();
    check_common(&common)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad(
            "messages must not be empty.",
            Some("messages"),
        ));
    }
    let tools = resolve_tools(
        req.tools.as_deref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    if tools.is_some() && !state.codec.supports_tools() {
        return Err(ApiError::bad(
            "This model's chat template does not support tools.",
            Some("tools"),
        ));
    }
    let extras = ChatExtras {
        // vLLM renders the tools even with `tool_choice: "none"`.
        tools: req.tools.as_deref().filter(|_| tools.is_some()),
        add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
        kwargs: req.chat_template_kwargs.as_ref(),
    };
    let prompt = state.encode_chat(
        &req.messages,
        &extras,
        req.add_special_tokens.unwrap_or(false),
    )?;
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
    let constraint = constraint(state, &common, tools.as_ref())?;
    Ok(Prepared {
        model,
        prompt,
        params,
        spec,
        stream: common.stream.unwrap_or(false),
        include_usage: common.stream_options.is_some_and(|o| o.include_usage),
        request_id: common.request_id,
        tools: tools.as_ref().and_then(ToolMode::from_tools),
        constraint,
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
        p.constraint,
    )?;
    let prefix = match kind {
        Kind::Completion => "cmpl",
        Kind::Chat => "chatcmpl",
    };
    let id = match &p.request_id {
        Some(rid) => format!("{prefix}-{rid}"),
        None => format!("{prefix}-{:032x}", rand::random::<u128>()),
    };
    let ctx = Ctx {
        id,
        model: p.model,
        created: now_secs(),
    };
    if p.stream {
        Ok(sse(gen, ctx, kind, p.include_usage, p.tools))
    } else {
        collect(gen, ctx, kind, p.tools).await
    }
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(state, body, Kind::Completion).await
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(state, body, Kind::Chat).await
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

async fn collect(
    mut gen: Generation,
    ctx: Ctx,
    kind: Kind,
    tools: Option<ToolMode>,
) -> Result<Response, ApiError> {
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
            let (content, calls, finish) = match &tools {
                None => (Some(gen.text.clone()), Vec::new(), finish),
                Some(mode) => {
                    let mut parser = mode.parser();
                    let mut events = parser.feed(&gen.text);
                    events.extend(parser.finish());
                    let content: String = events
                        .iter()
                        .filter_map(|e| match e {
                            ToolEvent::Content(t) => Some(t.as_str()),
                            _ => None,
                        })
                        .collect();
                    let calls = parser.reported_calls().to_vec();
                    let finish = mode.finish_reason(finish, !calls.is_empty());
                    // vLLM: content is null when the model only called tools.
                    let content = (!content.is_empty() || calls.is_empty()).then_some(content);
                    (content, calls, finish)
                }
            };
            let calls_out: Vec<ToolCallOut<'_>> = calls
                .iter()
                .map(|c| ToolCallOut {
                    id: &c.id,
                    kind: "function",
                    function: FunctionOut {
                        name: &c.name,
                        arguments: &c.arguments,
                    },
                })
                .collect();
            let choice = ChatChoice {
                index: 0,
                message: ChatMessageOut {
                    role: "assistant",
                    content: content.as_deref(),
                    tool_calls: &calls_out,
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
    /// Chat with tools: the parser turning text into content and call deltas.
    tools: Option<(ToolMode, ToolParser)>,
}

/// Content and call deltas of parser events, merged per call (a call's start and its first
/// argument fragments in one entry).
fn tool_deltas(events: Vec<ToolEvent>) -> (String, Vec<ToolCallDelta>) {
    let mut content = String::new();
    let mut calls: Vec<ToolCallDelta> = Vec::new();
    for e in events {
        match e {
            ToolEvent::Content(t) => content.push_str(&t),
            ToolEvent::Start { index, id, name } => calls.push(ToolCallDelta {
                index,
                id: Some(id),
                kind: Some("function"),
                function: FunctionDelta {
                    name: Some(name),
                    arguments: None,
                },
            }),
            ToolEvent::Args { index, fragment } => match calls.last_mut() {
                Some(last) if last.index == index => last
                    .function
                    .arguments
                    .get_or_insert_with(String::new)
                    .push_str(&fragment),
                _ => calls.push(ToolCallDelta {
                    index,
                    id: None,
                    kind: None,
                    function: FunctionDelta {
                        name: None,
                        arguments: Some(fragment),
                    },
                }),
            },
        }
    }
    (content, calls)
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
                let (content, calls, finish) = match &mut self.tools {
                    None => (Some(delta.text.clone()), Vec::new(), finish),
                    Some((mode, parser)) => {
                        let mut events = parser.feed(&delta.text);
                        if delta.finished {
                            events.extend(parser.finish());
                        }
                        let (content, calls) = tool_deltas(events);
                        let finish = if delta.finished {
                            mode.finish_reason(finish, !parser.reported_calls().is_empty())
                        } else {
                            finish
                        };
                        if content.is_empty()
                            && calls.is_empty()
                            && finish.is_none()
                            && logprobs.is_none()
                        {
                            // The parser holds this text back: nothing to send yet.
                            self.sent += delta.text.len();
                            return Bytes::new();
                        }
                        ((!content.is_empty()).then_some(content), calls, finish)
                    }
                };
                event(&ChatChunk {
                    id: &self.ctx.id,
                    object: "chat.completion.chunk",
                    created: self.ctx.created,
                    model: &self.ctx.model,
                    choices: &[ChatChunkChoice {
                        index: 0,
                        delta: ChatDelta {
                            role: None,
                            content: content.as_deref(),
                            tool_calls: (!calls.is_empty()).then_some(calls.as_slice()),
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
                            tool_calls: None,
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
fn sse(
    gen: Generation,
    ctx: Ctx,
    kind: Kind,
    include_usage: bool,
    tools: Option<ToolMode>,
) -> Response {
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
        tools: tools.map(|m| {
            let p = m.parser();
            (m, p)
        }),
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
