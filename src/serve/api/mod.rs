//! HTTP API of the decode server (axum): OpenAI-compatible generation endpoints, vLLM's
//! tokenizer endpoints, health, version and Prometheus metrics.

pub mod constrained;
pub mod detok;
pub mod error;
pub mod generate;
pub mod messages;
pub mod openai;
pub mod params;
pub mod structured;
pub mod tools;
pub mod types;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use tokio::sync::Semaphore;

use crate::serve::codec::{ChatExtras, TextCodec};
use crate::serve::engine::EngineHandle;
use crate::serve::metrics::ServeMetrics;

use self::error::ApiError;
use self::generate::RequestLimits;
use self::types::{ChatMessageIn, DetokenizeRequest, TokenizeRequest};

/// Everything the handlers share.
pub struct AppState {
    pub engine: EngineHandle,
    pub codec: Arc<dyn TextCodec>,
    pub metrics: Arc<ServeMetrics>,
    /// `--served-model-name` values; the first is the canonical one.
    pub served_model_names: Vec<String>,
    pub max_body_bytes: usize,
    pub created: u64,
    pub limits: RequestLimits,
    /// Permits for CPU-heavy request work on the blocking pool (`--tokenizer-pool-size`).
    pub preprocess: Arc<Semaphore>,
    /// Compiles structured-output constraints (token table built on first use).
    pub grammars: constrained::Grammars,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("models", &self.served_model_names)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// The model name a request asked for, if served (absent means the default model).
    pub fn check_model<'a>(&'a self, requested: Option<&'a str>) -> Result<&'a str, ApiError> {
        match requested {
            None => Ok(self.served_model_names.first().map_or("", String::as_str)),
            Some(m) if self.served_model_names.iter().any(|n| n == m) => Ok(m),
            Some(m) => Err(ApiError::ModelNotFound {
                model: m.to_owned(),
            }),
        }
    }

    /// Runs CPU-heavy request work (decoding a large body, templating, tokenising) on tokio's
    /// blocking pool, at most `--tokenizer-pool-size` jobs at a time, so the async workers stay
    /// free for `/health`, `/metrics` and streaming responses whatever clients send.
    pub async fn run_blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let _permit = self
            .preprocess
            .acquire()
            .await
            .map_err(|_| ApiError::EngineDead)?;
        let state = Arc::clone(self);
        tokio::task::spawn_blocking(move || work(&state))
            .await
            .map_err(|e| ApiError::Internal(format!("request preparation failed: {e}")))?
    }

    /// Refuses prompt text that cannot fit the context, before any tokenising.
    pub fn check_prompt_bytes(&self, bytes: usize, param: &'static str) -> Result<(), ApiError> {
        if bytes > self.limits.max_prompt_bytes {
            return Err(ApiError::PromptTooLarge {
                bytes,
                max_bytes: self.limits.max_prompt_bytes,
                max_model_len: self.engine.info().max_model_len,
                param,
            });
        }
        Ok(())
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
        self.check_prompt_bytes(text.len(), "prompt")?;
        self.codec
            .encode(text, add_special_tokens)
            .map_err(|e| ApiError::bad(e.to_string(), Some("prompt")))
    }

    /// Renders and tokenises a conversation. `add_special_tokens` adds the tokenizer's own
    /// special tokens on top of what the template wrote (vLLM's chat default: false).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessageIn],
        extras: &ChatExtras<'_>,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, ApiError> {
        let text_bytes = messages.iter().map(ChatMessageIn::text_len).sum();
        self.check_prompt_bytes(text_bytes, "messages")?;
        let text = self
            .codec
            .render_chat_with(&messages::chat_messages(messages)?, extras)
            .map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
        self.encode(&text, add_special_tokens)
    }
}

/// The router over `state`, with the request body limited to `state.max_body_bytes`.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let max_model_len = state.engine.info().max_model_len;
    let root = state
        .served_model_names
        .first()
        .cloned()
        .unwrap_or_default();
    let data: Vec<_> = state
        .served_model_names
        .iter()
        .map(|name| {
            json!({
                "id": name,
                "object": "model",
                "created": state.created,
                "owned_by": "switchyard",
                "root": root,
                "parent": null,
                "max_model_len": max_model_len,
            })
        })
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

async fn health(State(state): State<Arc<AppState>>) -> StatusCode {
    if state.engine.shared().alive() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn version() -> Json<serde_json::Value> {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = openai::read_body(&state, body)?;
    let tokens = state
        .run_blocking(move |state| {
            let req: TokenizeRequest = openai::parse_json(&body)?;
            state.check_model(req.model.as_deref())?;
            match (&req.prompt, &req.messages) {
                (Some(prompt), None) => {
                    state.encode(prompt, req.add_special_tokens.unwrap_or(true))
                }
                (None, Some(messages)) => {
                    state.encode_chat(messages, &ChatExtras::default(), false)
                }
                _ => Err(ApiError::bad(
                    "Send exactly one of prompt or messages.",
                    Some("prompt"),
                )),
            }
        })
        .await?;
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": state.engine.info().max_model_len,
        "tokens": tokens,
    })))
}

async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = openai::read_body(&state, body)?;
    let prompt = state
        .run_blocking(move |state| {
            let req: DetokenizeRequest = openai::parse_json(&body)?;
            state.check_model(req.model.as_deref())?;
            let vocab = state.engine.info().vocab_size;
            if let Some(&bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::bad(
                    format!("Token id {bad} is out of vocabulary (vocabulary size {vocab})."),
                    Some("tokens"),
                ));
            }
            state
                .codec
                .decode(&req.tokens, false)
                .map_err(|e| ApiError::bad(e.to_string(), Some("tokens")))
        })
        .await?;
    Ok(Json(json!({ "prompt": prompt })))
}
