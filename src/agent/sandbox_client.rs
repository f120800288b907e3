//! Client of the agent-sandbox runtime API (`switchyard sandbox`, or upstream's runtime), direct
//! or through the sandbox router: the same routes and shapes `src/sandbox/api.rs` serves —
//! `POST /execute {"command"}` → `{"stdout","stderr","exit_code"}`, `POST /upload` (multipart
//! field `file`, the filename is the workspace path), `GET /download/{path}`, `GET /list/{path}`.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request};
use http_body_util::Full;
use serde::{Deserialize, Serialize};

use super::http::{encode_path, join, HttpClient, HttpError};

/// Largest download or listing the agent reads back.
const MAX_REPLY: usize = 16 * 1024 * 1024;

/// The `/execute` reply (upstream's `ExecuteResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Executed {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

/// One `/list` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub size: u64,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub mod_time: f64,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SandboxError {
    /// The runtime (or router) could not be reached: the task cannot go on.
    #[error("sandbox unreachable: {0}")]
    Transport(HttpError),
    /// The runtime answered with an error (404 file not found, 403 access denied, ...): the
    /// model is told and may try something else.
    #[error("sandbox {op} failed with HTTP {status}: {detail}")]
    Status {
        op: &'static str,
        status: u16,
        detail: String,
    },
    #[error("sandbox {op} reply unreadable: {reason}")]
    BadReply { op: &'static str, reason: String },
}

impl SandboxError {
    /// Whether the task must stop (the sandbox is gone) rather than report to the model.
    pub fn is_fatal(&self) -> bool {
        match self {
            SandboxError::Transport(_) => true,
            // The router answers 502/503/504 when it cannot reach the sandbox pod.
            SandboxError::Status { status, .. } => *status >= 500,
            SandboxError::BadReply { .. } => false,
        }
    }
}

/// Where the runtime is and how to address it.
#[derive(Debug, Clone)]
pub struct SandboxClient {
    base: String,
    /// `X-Sandbox-*` router headers (empty for a runtime reached directly).
    headers: Vec<(HeaderName, HeaderValue)>,
    http: HttpClient,
    timeout: Duration,
}

impl SandboxClient {
    pub fn new(
        base: &str,
        headers: Vec<(HeaderName, HeaderValue)>,
        http: HttpClient,
        timeout: Duration,
    ) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            headers,
            http,
            timeout,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        content_type: Option<String>,
        body: Bytes,
    ) -> Result<Bytes, SandboxError> {
        let url = join(&self.base, path);
        let mut builder = Request::builder().method(method).uri(&url);
        for (k, v) in &self.headers {
            builder = builder.header(k, v);
        }
        if let Some(ct) = content_type {
            builder = builder.header(header::CONTENT_TYPE, ct);
        }
        let request = builder.body(Full::new(body)).map_err(|e| {
            SandboxError::Transport(HttpError::Invalid {
                url: url.clone(),
                reason: e.to_string(),
            })
        })?;
        let reply = self
            .http
            .send(request, self.timeout, MAX_REPLY)
            .await
            .map_err(SandboxError::Transport)?;
        if !reply.status.is_success() {
            return Err(SandboxError::Status {
                op,
                status: reply.status.as_u16(),
                detail: error_detail(&reply.body).unwrap_or_else(|| reply.snippet(300)),
            });
        }
        Ok(reply.body)
    }

    /// `GET /`: the runtime is up.
    pub async fn health(&self) -> Result<(), SandboxError> {
        self.call("health", Method::GET, "/", None, Bytes::new())
            .await
            .map(|_| ())
    }

    pub async fn execute(&self, command: &str) -> Result<Executed, SandboxError> {
        let body = serde_json::to_vec(&serde_json::json!({ "command": command })).map_err(|e| {
            SandboxError::BadReply {
                op: "execute",
                reason: e.to_string(),
            }
        })?;
        let reply = self
            .call(
                "execute",
                Method::POST,
                "/execute",
                Some("application/json".into()),
                Bytes::from(body),
            )
            .await?;
        serde_json::from_slice(&reply).map_err(|e| SandboxError::BadReply {
            op: "execute",
            reason: e.to_string(),
        })
    }

    /// Writes `content` to the workspace `path` (parents are created by the runtime).
    pub async fn upload(&self, path: &str, content: &[u8]) -> Result<(), SandboxError> {
        let boundary = format!("switchyard-{:016x}", rand::random::<u64>());
        let mut body = Vec::with_capacity(content.len() + 256);
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; \
                 filename=\"{path}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(content);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        self.call(
            "upload",
            Method::POST,
            "/upload",
            Some(format!("multipart/form-data; boundary={boundary}")),
            Bytes::from(body),
        )
        .await
        .map(|_| ())
    }

    pub async fn download(&self, path: &str) -> Result<Bytes, SandboxError> {
        let route = format!("/download/{}", encode_path(path));
        self.call("download", Method::GET, &route, None, Bytes::new())
            .await
    }

    pub async fn list(&self, path: &str) -> Result<Vec<Entry>, SandboxError> {
        let route = format!("/list/{}", encode_path(path));
        let reply = self
            .call("list", Method::GET, &route, None, Bytes::new())
            .await?;
        serde_json::from_slice(&reply).map_err(|e| SandboxError::BadReply {
            op: "list",
            reason: e.to_string(),
        })
    }
}

/// The runtime's `{"detail": ...}` / `{"message": ...}` error text.
fn error_detail(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("detail")
        .or_else(|| v.get("message"))
        .and_then(|d| d.as_str())
        .map(str::to_string)
}
