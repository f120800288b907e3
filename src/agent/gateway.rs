//! One chat-completions call to the gateway (Envoy + EPP, or any OpenAI-compatible URL), with
//! its failure sorted into what the fallback list acts on: retryable (429, 5xx, timeout,
//! connection) or not.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;

use super::http::{join, HttpClient, HttpError};
use super::openai::{ChatRequest, ChatResponse, Message};

/// Replies above this are refused (a chat reply with tool calls is a few KiB).
const MAX_REPLY: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// 429 or 5xx: the next model may answer.
    #[error("HTTP {status}: {detail}")]
    Status { status: u16, detail: String },
    #[error("{0}")]
    Transport(HttpError),
    /// 4xx other than 429: the request itself was refused.
    #[error("request refused with HTTP {status}: {detail}")]
    Refused { status: u16, detail: String },
    #[error("unreadable reply: {0}")]
    BadReply(String),
}

impl ModelError {
    /// Whether the next model in the fallback list should be tried.
    pub fn falls_back(&self) -> bool {
        match self {
            ModelError::Status { .. } | ModelError::Transport(_) | ModelError::BadReply(_) => true,
            // The request itself is wrong (400, 401, 404 ...): another model gets the same bytes.
            ModelError::Refused { .. } => false,
        }
    }
}

/// Settings of each call.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Base URL; `/v1/chat/completions` is appended.
    pub url: String,
    pub timeout: Duration,
    pub temperature: f32,
    pub max_tokens: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Gateway {
    config: GatewayConfig,
    http: HttpClient,
}

impl Gateway {
    pub fn new(config: GatewayConfig, http: HttpClient) -> Self {
        Self { config, http }
    }

    /// One non-streamed completion; returns the first choice's message.
    pub async fn complete(
        &self,
        model: &str,
        messages: &[Message],
        tools: &Value,
    ) -> Result<Message, ModelError> {
        let body = ChatRequest {
            model,
            messages,
            tools,
            tool_choice: "auto",
            temperature: self.config.temperature,
            max_tokens: self.config.max_tokens,
            stream: false,
        };
        let body = serde_json::to_vec(&body).map_err(|e| ModelError::BadReply(e.to_string()))?;
        let url = join(&self.config.url, "/v1/chat/completions");
        let request = Request::builder()
            .method(Method::POST)
            .uri(&url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| {
                ModelError::Transport(HttpError::Invalid {
                    url: url.clone(),
                    reason: e.to_string(),
                })
            })?;
        let reply = self
            .http
            .send(request, self.config.timeout, MAX_REPLY)
            .await
            .map_err(ModelError::Transport)?;
        let status = reply.status;
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(ModelError::Status {
                status: status.as_u16(),
                detail: reply.snippet(300),
            });
        }
        if !status.is_success() {
            return Err(ModelError::Refused {
                status: status.as_u16(),
                detail: reply.snippet(300),
            });
        }
        let parsed: ChatResponse =
            serde_json::from_slice(&reply.body).map_err(|e| ModelError::BadReply(e.to_string()))?;
        parsed
            .choices
            .into_iter()
            .next()
            .map(|c| c.message)
            .ok_or_else(|| ModelError::BadReply("no choices".into()))
    }
}
