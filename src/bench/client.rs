//! OpenAI streaming client for load tests: sends one `/v1/completions` request with
//! `stream: true`, parses the server-sent events as they arrive and records time to first token,
//! inter-token gaps and end-to-end latency.

use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

/// Largest single SSE event accepted (a chunk of a few tokens is well under 1 KiB).
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// Inter-token gaps kept per request (enough for any output length the workloads use).
pub const MAX_ITL_SAMPLES: usize = 8192;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SseError {
    #[error("server-sent event larger than {max} bytes")]
    EventTooLarge { max: usize },
}

/// One `data:` payload of a server-sent event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseData {
    /// A JSON chunk (not parsed yet).
    Json(String),
    /// The OpenAI end marker `data: [DONE]`.
    Done,
}

/// Incremental parser of `text/event-stream`: bytes in, complete events' data out. Events end at
/// a blank line (`\n\n` or `\r\n\r\n`); multi-line data is joined with `\n`; comments and other
/// fields (`event:`, `id:`) are ignored, as the OpenAI stream never needs them.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: BytesMut,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `chunk` and returns the data of every event it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseData>, SseError> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some((end, sep)) = find_event_end(&self.buf) {
            let event = self.buf.split_to(end);
            self.buf.advance(sep);
            if let Some(data) = event_data(&event) {
                out.push(data);
            }
        }
        if self.buf.len() > MAX_EVENT_BYTES {
            return Err(SseError::EventTooLarge {
                max: MAX_EVENT_BYTES,
            });
        }
        Ok(out)
    }
}

/// Position of the first blank line and the length of the separator.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn event_data(event: &[u8]) -> Option<SseData> {
    let text = String::from_utf8_lossy(event);
    let mut data: Option<String> = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("data:") else {
            continue;
        };
        let rest = rest.strip_prefix(' ').unwrap_or(rest);
        match &mut data {
            Some(d) => {
                d.push('\n');
                d.push_str(rest);
            }
            None => data = Some(rest.to_owned()),
        }
    }
    let data = data?;
    if data.trim() == "[DONE]" {
        Some(SseData::Done)
    } else {
        Some(SseData::Json(data))
    }
}

#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<ChunkUsage>,
    error: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    delta: Option<ChunkDelta>,
}

#[derive(Debug, Deserialize)]
struct ChunkDelta {
    content: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChunkUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

/// What one request measured. Times are wall-clock seconds from the moment it was sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RequestOutcome {
    /// Scheduled send time, seconds from the start of the run.
    pub sent_at_s: f64,
    pub ttft_s: Option<f64>,
    pub e2e_s: f64,
    /// Gaps between consecutive content chunks (each chunk carries one token with the sim).
    #[serde(skip)]
    pub itl_s: Vec<f64>,
    pub output_tokens: u64,
    pub prompt_tokens: u64,
    pub status: u16,
    pub error: Option<String>,
}

impl RequestOutcome {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// A pooled HTTP/1.1 client (one per load run).
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(4096)
        .build(connector)
}

/// Sends `body` (a streaming completion request) to `url` and reads the stream to its end,
/// giving up after `timeout`. Never fails: errors are recorded in the outcome.
pub async fn stream_completion(
    client: &HttpClient,
    url: &str,
    body: Bytes,
    timeout: Duration,
) -> RequestOutcome {
    stream_completion_with(client, url, body, None, timeout).await
}

/// [`stream_completion`] with an `x-gateway-inference-objective` header when `objective` is
/// given (the EPP's priority for the request).
pub async fn stream_completion_with(
    client: &HttpClient,
    url: &str,
    body: Bytes,
    objective: Option<&str>,
    timeout: Duration,
) -> RequestOutcome {
    let start = Instant::now();
    let mut out = RequestOutcome::default();
    let result =
        tokio::time::timeout(timeout, run(client, url, body, objective, start, &mut out)).await;
    out.e2e_s = start.elapsed().as_secs_f64();
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => out.error = Some(e),
        Err(_) => out.error = Some(format!("timed out after {timeout:?}")),
    }
    out
}

async fn run(
    client: &HttpClient,
    url: &str,
    body: Bytes,
    objective: Option<&str>,
    start: Instant,
    out: &mut RequestOutcome,
) -> Result<(), String> {
    let mut req = http::Request::post(url).header(http::header::CONTENT_TYPE, "application/json");
    if let Some(o) = objective {
        req = req.header("x-gateway-inference-objective", o);
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| format!("bad request: {e}"))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("send: {e}"))?;
    out.status = resp.status().as_u16();
    let mut body = resp.into_body();
    if out.status != 200 {
        // Read a bounded part of the error body for the message.
        let mut text = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() {
                text.extend_from_slice(&data);
            }
            if text.len() > 512 {
                break;
            }
        }
        text.truncate(512);
        return Err(format!(
            "HTTP {}: {}",
            out.status,
            String::from_utf8_lossy(&text).trim()
        ));
    }
    let mut parser = SseParser::new();
    let mut last_token: Option<Instant> = None;
    let mut chunks = 0u64;
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for event in parser.push(&data).map_err(|e| e.to_string())? {
            let json = match event {
                SseData::Done => {
                    done = true;
                    continue;
                }
                SseData::Json(json) => json,
            };
            let chunk: Chunk =
                serde_json::from_str(&json).map_err(|e| format!("bad chunk {json:?}: {e}"))?;
            if let Some(err) = chunk.error {
                return Err(format!("stream error: {err}"));
            }
            if let Some(u) = chunk.usage {
                out.prompt_tokens = u.prompt_tokens.unwrap_or(0);
                out.output_tokens = u.completion_tokens.unwrap_or(0);
            }
            let has_text = chunk.choices.iter().any(|c| {
                c.text.as_deref().is_some_and(|t| !t.is_empty())
                    || c.delta
                        .as_ref()
                        .and_then(|d| d.content.as_deref())
                        .is_some_and(|t| !t.is_empty())
            });
            if has_text {
                let now = Instant::now();
                match last_token {
                    None => out.ttft_s = Some((now - start).as_secs_f64()),
                    Some(prev) if out.itl_s.len() < MAX_ITL_SAMPLES => {
                        out.itl_s.push((now - prev).as_secs_f64());
                    }
                    Some(_) => {}
                }
                last_token = Some(now);
                chunks += 1;
            }
        }
    }
    if !done {
        return Err("stream ended without [DONE]".to_owned());
    }
    if out.output_tokens == 0 {
        out.output_tokens = chunks;
    }
    Ok(())
}

/// Whether GET `url` answers 200.
pub async fn get_ok(client: &HttpClient, url: &str) -> bool {
    let Ok(req) = http::Request::get(url).body(Full::new(Bytes::new())) else {
        return false;
    };
    match tokio::time::timeout(Duration::from_secs(2), client.request(req)).await {
        Ok(Ok(resp)) => {
            let ok = resp.status() == http::StatusCode::OK;
            let _ = resp.into_body().collect().await;
            ok
        }
        _ => false,
    }
}

/// GET `url` as text, bounded to 8 MiB.
pub async fn get_text(client: &HttpClient, url: &str) -> Result<String, String> {
    let req = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("HTTP {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), 8 << 20)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_separators() {
        let mut p = SseParser::new();
        assert_eq!(p.push(b"data: {\"a\":").unwrap(), vec![]);
        assert_eq!(
            p.push(b"1}\n\ndata: {\"b\":2}\r\n\r\n: comment\n\nda")
                .unwrap(),
            vec![
                SseData::Json("{\"a\":1}".into()),
                SseData::Json("{\"b\":2}".into())
            ]
        );
        assert_eq!(p.push(b"ta: [DONE]\n\n").unwrap(), vec![SseData::Done]);
        assert_eq!(p.push(b"").unwrap(), vec![]);
    }

    #[test]
    fn multi_line_data_and_other_fields() {
        let mut p = SseParser::new();
        assert_eq!(
            p.push(b"event: message\nid: 3\ndata: x\ndata:y\n\n")
                .unwrap(),
            vec![SseData::Json("x\ny".into())]
        );
    }

    #[test]
    fn oversized_event_is_an_error() {
        let mut p = SseParser::new();
        let big = vec![b'a'; MAX_EVENT_BYTES + 1];
        assert_eq!(
            p.push(&big),
            Err(SseError::EventTooLarge {
                max: MAX_EVENT_BYTES
            })
        );
    }

    /// A canned SSE server: checks TTFT, ITL count and usage parsing end to end.
    #[tokio::test]
    async fn stream_completion_measures_a_canned_stream() {
        use axum::response::IntoResponse;
        async fn handler() -> impl IntoResponse {
            let stream = futures::stream::iter((0..5).map(|i| {
                let s = if i < 4 {
                    format!("data: {{\"choices\":[{{\"index\":0,\"text\":\" t{i}\"}}]}}\n\n")
                } else {
                    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n".to_owned()
                };
                Ok::<_, std::convert::Infallible>(Bytes::from(s))
            }));
            (
                [(http::header::CONTENT_TYPE, "text/event-stream")],
                axum::body::Body::from_stream(stream),
            )
        }
        let app = axum::Router::new().route("/v1/completions", axum::routing::post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = http_client();
        let out = stream_completion(
            &client,
            &format!("http://{addr}/v1/completions"),
            Bytes::from_static(b"{}"),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(out.error, None);
        assert_eq!(out.status, 200);
        assert_eq!(out.output_tokens, 4);
        assert_eq!(out.prompt_tokens, 7);
        assert_eq!(out.itl_s.len(), 3);
        assert!(out.ttft_s.is_some());
    }

    #[tokio::test]
    async fn http_errors_are_recorded() {
        let app = axum::Router::new().route(
            "/v1/completions",
            axum::routing::post(|| async { (http::StatusCode::SERVICE_UNAVAILABLE, "busy") }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let out = stream_completion(
            &http_client(),
            &format!("http://{addr}/v1/completions"),
            Bytes::from_static(b"{}"),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(out.status, 503);
        assert_eq!(out.error.as_deref(), Some("HTTP 503: busy"));
    }
}
