//! A mock OpenAI/vLLM model server for integration tests: vLLM-style Prometheus `/metrics` whose
//! values tests set, and `/v1/completions` + `/v1/chat/completions` that answer JSON or SSE and say
//! which server answered (`x-mock-server` header, `mock_server` field).
//!
//! Every response is deterministic for a given request and server name, and the last request and
//! last response body are recorded, so tests can check bodies byte-for-byte on both sides of a
//! proxy. State that grows with traffic is bounded: only counters and the last exchange are kept.
//!
//! Fault hooks for the fault-injection tests: completions can be held (parked mid-request, so a
//! test knows exactly which requests are in flight where) and `/metrics` can hang.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt as _;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// The `model_name` label the mock's metrics carry (vLLM labels with the served model).
pub const MOCK_MODEL: &str = "mock-model";
/// Requests larger than this are refused with 413 (a cap, so a runaway test cannot eat memory).
pub const MAX_REQUEST_BYTES: usize = 64 << 20;
/// Completion tokens produced when the request has no `max_tokens`.
const DEFAULT_COMPLETION_TOKENS: u64 = 5;
/// Upper bound on completion tokens (and hence SSE chunks) per request.
const MAX_COMPLETION_TOKENS: u64 = 32;
/// Pause between SSE chunks so that they cross proxies as separate chunks.
const SSE_CHUNK_GAP: Duration = Duration::from_millis(20);
/// The `created` timestamp in every response (fixed so responses are deterministic).
const CREATED: u64 = 1_700_000_000;

/// Live values the mock reports on `/metrics`.
#[derive(Debug, Clone)]
struct MetricsState {
    waiting: u32,
    running: u32,
    kv_usage: f64,
    max_lora: u32,
    running_lora: Vec<String>,
    waiting_lora: Vec<String>,
    /// When set, served verbatim instead of the generated text.
    raw: Option<String>,
}

#[derive(Debug, Default)]
struct Exchange {
    request: Option<(HeaderMap, Bytes)>,
    response: Option<Bytes>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    metrics: Mutex<MetricsState>,
    fail: Mutex<Option<StatusCode>>,
    last: Mutex<Exchange>,
    served: AtomicUsize,
    scrapes: AtomicUsize,
    /// While true, completions park (see [`MockModelServer::hold_completions`]).
    hold: watch::Sender<bool>,
    /// Completions parked right now.
    parked: AtomicUsize,
    /// While true, `/metrics` requests hang.
    hang_metrics: watch::Sender<bool>,
    prompt_tokens_total: AtomicUsize,
    generation_tokens_total: AtomicUsize,
}

/// A running mock model server; stop it with [`MockModelServer::stop`] (dropping it also stops
/// accepting connections, without waiting).
pub struct MockModelServer {
    /// The address it listens on (the real port when started on port 0).
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MockModelServer {
    /// Binds `bind` (port 0 picks a free port) and serves until stopped. `name` is what the
    /// server reports as having answered.
    pub async fn start(bind: SocketAddr, name: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding mock model server {name} on {bind}"))?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            name: name.to_owned(),
            metrics: Mutex::new(MetricsState {
                waiting: 0,
                running: 0,
                kv_usage: 0.0,
                max_lora: 4,
                running_lora: Vec::new(),
                waiting_lora: Vec::new(),
                raw: None,
            }),
            fail: Mutex::new(None),
            last: Mutex::new(Exchange::default()),
            served: AtomicUsize::new(0),
            scrapes: AtomicUsize::new(0),
            hold: watch::channel(false).0,
            parked: AtomicUsize::new(0),
            hang_metrics: watch::channel(false).0,
            prompt_tokens_total: AtomicUsize::new(0),
            generation_tokens_total: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/metrics", get(metrics))
            // A second path for tests of the EPP's configured metrics path.
            .route("/custom/metrics", get(metrics))
            .route("/health", get(|| async { StatusCode::OK }))
            .route("/v1/models", get(models))
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat_completions))
            .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
            .with_state(inner.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Self {
            addr,
            inner,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// Starts one server per IP, all on the same port (the first IP picks a free one), named
    /// `{prefix}{index}`. Mirrors the reference's `192.168.1.x:8000` pods on loopback
    /// (127.0.0.0/8 is all local on Linux). Retries when another process holds the port on one
    /// of the later IPs.
    pub async fn start_group(ips: &[IpAddr], prefix: &str) -> anyhow::Result<Vec<Self>> {
        let first = *ips.first().context("start_group needs at least one IP")?;
        let mut last_err = None;
        for _attempt in 0..20 {
            let head = Self::start(SocketAddr::new(first, 0), &format!("{prefix}0")).await?;
            let port = head.addr.port();
            let mut group = vec![head];
            let mut failed = false;
            for (i, ip) in ips.iter().enumerate().skip(1) {
                match Self::start(SocketAddr::new(*ip, port), &format!("{prefix}{i}")).await {
                    Ok(server) => group.push(server),
                    Err(e) => {
                        last_err = Some(e);
                        failed = true;
                        break;
                    }
                }
            }
            if !failed {
                return Ok(group);
            }
            for server in group {
                server.stop().await;
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("could not bind a common port")))
    }

    /// The name given at start (the `x-mock-server` value).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Sets `vllm:num_requests_waiting`, `vllm:num_requests_running` and
    /// `vllm:kv_cache_usage_perc` (0..1).
    pub fn set_metrics(&self, waiting: u32, running: u32, kv_usage: f64) {
        let mut m = self.inner.metrics.lock();
        m.waiting = waiting;
        m.running = running;
        m.kv_usage = kv_usage;
    }

    /// Sets the labels of `vllm:lora_requests_info`.
    pub fn set_lora(&self, max_lora: u32, running: &[&str], waiting: &[&str]) {
        let mut m = self.inner.metrics.lock();
        m.max_lora = max_lora;
        m.running_lora = running.iter().map(|s| (*s).to_owned()).collect();
        m.waiting_lora = waiting.iter().map(|s| (*s).to_owned()).collect();
    }

    /// Serves `raw` verbatim on `/metrics` (None: back to the generated vLLM text).
    pub fn set_metrics_text(&self, raw: Option<String>) {
        self.inner.metrics.lock().raw = raw;
    }

    /// Answers completions with this status and an OpenAI error body (None: answer normally).
    pub fn set_fail(&self, status: Option<u16>) {
        *self.inner.fail.lock() = status.and_then(|s| StatusCode::from_u16(s).ok());
    }

    /// Completion requests (both paths) this server has answered, failures included.
    pub fn requests_served(&self) -> usize {
        self.inner.served.load(Ordering::SeqCst)
    }

    /// While `hold` is true, every completion request parks once it is known to be valid: a
    /// non-streamed one before its response, a streamed one after its first event (response
    /// started). Setting it back to false releases them all.
    pub fn hold_completions(&self, hold: bool) {
        self.inner.hold.send_replace(hold);
    }

    /// Completion requests parked by [`MockModelServer::hold_completions`] right now.
    pub fn parked(&self) -> usize {
        self.inner.parked.load(Ordering::SeqCst)
    }

    /// While `hang` is true, `GET /metrics` never answers (a scraper must time out).
    pub fn hang_metrics(&self, hang: bool) {
        self.inner.hang_metrics.send_replace(hang);
    }

    /// `GET /metrics` requests received (hung ones included).
    pub fn metrics_scrapes(&self) -> usize {
        self.inner.scrapes.load(Ordering::SeqCst)
    }

    /// Headers and complete body of the last completion request, as the server received them.
    pub fn last_request(&self) -> Option<(HeaderMap, Bytes)> {
        self.inner.last.lock().request.clone()
    }

    /// The complete body of the last completion response (for SSE: every chunk concatenated).
    pub fn last_response(&self) -> Option<Bytes> {
        self.inner.last.lock().response.clone()
    }

    /// The generated `/metrics` text for the current values (what a scrape returns unless
    /// overridden with [`MockModelServer::set_metrics_text`]).
    pub fn metrics_text(&self) -> String {
        render_metrics(&self.inner)
    }

    /// Stops accepting connections, lets open ones finish (closing idle keep-alives), and waits
    /// up to 2 s for that before abandoning them.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(2), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for MockModelServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn metrics(State(inner): State<Arc<Inner>>) -> Response {
    inner.scrapes.fetch_add(1, Ordering::SeqCst);
    let mut hang = inner.hang_metrics.subscribe();
    let _ = hang.wait_for(|h| !*h).await;
    let raw = inner.metrics.lock().raw.clone();
    let body = raw.unwrap_or_else(|| render_metrics(&inner));
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn models() -> Response {
    axum::Json(json!({"object": "list", "data": [{"id": MOCK_MODEL, "object": "model", "owned_by": "switchyard-tests"}]}))
        .into_response()
}

fn render_metrics(inner: &Inner) -> String {
    use std::fmt::Write as _;
    let m = inner.metrics.lock().clone();
    let served = inner.served.load(Ordering::SeqCst);
    let prompt = inner.prompt_tokens_total.load(Ordering::SeqCst);
    let generated = inner.generation_tokens_total.load(Ordering::SeqCst);
    let l = format!("engine=\"0\",model_name=\"{MOCK_MODEL}\"");
    let mut s = String::with_capacity(4096);
    // Writing into a String cannot fail.
    let _ = write!(
        s,
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{{l}}} {running}.0\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{{l}}} {waiting}.0\n\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{{l}}} {kv:?}\n\
         # HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n\
         # TYPE vllm:cache_config_info gauge\n\
         vllm:cache_config_info{{block_size=\"16\",cache_dtype=\"auto\",calculate_kv_scales=\"False\",enable_prefix_caching=\"True\",engine=\"0\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"None\",num_gpu_blocks=\"2048\",prefix_caching_hash_algo=\"sha256\"}} 1.0\n\
         # HELP vllm:lora_requests_info Running stats on lora requests.\n\
         # TYPE vllm:lora_requests_info gauge\n\
         vllm:lora_requests_info{{max_lora=\"{max_lora}\",running_lora_adapters=\"{running_lora}\",waiting_lora_adapters=\"{waiting_lora}\"}} 1.7e+09\n\
         # HELP vllm:request_success_total Count of successfully processed requests.\n\
         # TYPE vllm:request_success_total counter\n\
         vllm:request_success_total{{{l},finished_reason=\"length\"}} {served}.0\n\
         # HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n\
         # TYPE vllm:prompt_tokens_total counter\n\
         vllm:prompt_tokens_total{{{l}}} {prompt}.0\n\
         # HELP vllm:generation_tokens_total Number of generation tokens processed.\n\
         # TYPE vllm:generation_tokens_total counter\n\
         vllm:generation_tokens_total{{{l}}} {generated}.0\n\
         # HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.\n\
         # TYPE vllm:e2e_request_latency_seconds histogram\n",
        running = m.running,
        waiting = m.waiting,
        kv = m.kv_usage,
        max_lora = m.max_lora,
        running_lora = m.running_lora.join(","),
        waiting_lora = m.waiting_lora.join(","),
    );
    // Every mock request "takes" 10 ms, so all of them fall in the buckets from 0.01 up.
    for le in ["0.005", "0.01", "0.1", "1.0", "10.0", "+Inf"] {
        let n = if le == "0.005" { 0 } else { served };
        let _ = writeln!(
            s,
            "vllm:e2e_request_latency_seconds_bucket{{{l},le=\"{le}\"}} {n}.0"
        );
    }
    let _ = writeln!(
        s,
        "vllm:e2e_request_latency_seconds_sum{{{l}}} {:?}",
        served as f64 * 0.01
    );
    let _ = writeln!(
        s,
        "vllm:e2e_request_latency_seconds_count{{{l}}} {served}.0"
    );
    s
}

/// Counts a parked request until dropped (also when the client goes away while parked).
struct Parked(Arc<Inner>);

impl Drop for Parked {
    fn drop(&mut self) {
        self.0.parked.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits while completions are held.
async fn park(inner: &Arc<Inner>) {
    let mut hold = inner.hold.subscribe();
    if !*hold.borrow_and_update() {
        return;
    }
    inner.parked.fetch_add(1, Ordering::SeqCst);
    let _parked = Parked(inner.clone());
    let _ = hold.wait_for(|h| !*h).await;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Completions,
    Chat,
}

async fn completions(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    answer(inner, Api::Completions, headers, body).await
}

async fn chat_completions(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(inner, Api::Chat, headers, body).await
}

/// The bytes a request's prompt occupies (completions: `prompt`; chat: the message contents).
fn prompt_bytes(api: Api, req: &Value) -> usize {
    match api {
        Api::Completions => match req.get("prompt") {
            Some(Value::String(s)) => s.len(),
            Some(other) => other.to_string().len(),
            None => 0,
        },
        Api::Chat => req
            .get("messages")
            .and_then(Value::as_array)
            .map(|msgs| {
                msgs.iter()
                    .map(|m| m.get("content").and_then(Value::as_str).map_or(0, str::len))
                    .sum()
            })
            .unwrap_or(0),
    }
}

fn error_response(inner: &Inner, status: StatusCode, message: &str) -> Response {
    let body = json!({"object": "error", "message": message, "type": "BadRequestError", "code": status.as_u16()});
    let bytes = Bytes::from(body.to_string());
    inner.last.lock().response = Some(bytes.clone());
    with_server_header(
        &inner.name,
        (status, [("content-type", "application/json")], bytes).into_response(),
    )
}

fn with_server_header(name: &str, mut resp: Response) -> Response {
    if let Ok(v) = HeaderValue::from_str(name) {
        resp.headers_mut().insert("x-mock-server", v);
    }
    resp
}

async fn answer(inner: Arc<Inner>, api: Api, headers: HeaderMap, body: Bytes) -> Response {
    inner.served.fetch_add(1, Ordering::SeqCst);
    inner.last.lock().request = Some((headers, body.clone()));
    let fail = *inner.fail.lock();
    if let Some(status) = fail {
        return error_response(
            &inner,
            status,
            &format!("mock server {} told to fail", inner.name),
        );
    }
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error_response(
                &inner,
                StatusCode::BAD_REQUEST,
                &format!("invalid JSON body: {e}"),
            )
        }
    };
    let Some(model) = req.get("model").and_then(Value::as_str).map(str::to_owned) else {
        return error_response(&inner, StatusCode::BAD_REQUEST, "model is required");
    };
    let prompt_tokens = (prompt_bytes(api, &req) as u64).div_ceil(4).max(1);
    let completion_tokens = req
        .get("max_tokens")
        .or_else(|| req.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_COMPLETION_TOKENS)
        .clamp(1, MAX_COMPLETION_TOKENS);
    inner
        .prompt_tokens_total
        .fetch_add(prompt_tokens as usize, Ordering::SeqCst);
    inner
        .generation_tokens_total
        .fetch_add(completion_tokens as usize, Ordering::SeqCst);
    let n = inner.served.load(Ordering::SeqCst);
    let id = format!("cmpl-{}-{n}", inner.name);
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    });
    let streaming = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if streaming {
        let chunks = sse_chunks(api, &inner.name, &id, &model, completion_tokens, &usage);
        let whole: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        inner.last.lock().response = Some(Bytes::from(whole));
        let held = inner.clone();
        let stream =
            futures::stream::iter(chunks.into_iter().enumerate()).then(move |(i, chunk)| {
                let held = held.clone();
                async move {
                    if i == 1 {
                        // The first event is out: the response has started.
                        park(&held).await;
                    }
                    tokio::time::sleep(SSE_CHUNK_GAP).await;
                    Ok::<_, Infallible>(chunk)
                }
            });
        let resp = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
            .body(Body::from_stream(stream));
        return match resp {
            Ok(r) => with_server_header(&inner.name, r),
            Err(e) => error_response(&inner, StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        };
    }
    park(&inner).await;
    let text = words(completion_tokens).concat();
    let body = match api {
        Api::Completions => json!({
            "id": id, "object": "text_completion", "created": CREATED, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "length"}],
            "usage": usage, "mock_server": inner.name,
        }),
        Api::Chat => json!({
            "id": id, "object": "chat.completion", "created": CREATED, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
            "usage": usage, "mock_server": inner.name,
        }),
    };
    let bytes = Bytes::from(body.to_string());
    inner.last.lock().response = Some(bytes.clone());
    with_server_header(
        &inner.name,
        ([("content-type", "application/json")], bytes).into_response(),
    )
}

/// The deterministic "generated" tokens: ` tok0`, ` tok1`, ...
fn words(n: u64) -> Vec<String> {
    (0..n).map(|i| format!(" tok{i}")).collect()
}

/// vLLM-shaped SSE: one `data:` event per token, then a usage event with empty `choices`, then
/// `data: [DONE]`. (vLLM sends the usage event only with `stream_options.include_usage`; the
/// mock always sends it so that usage parsing on the response path is always exercised.)
fn sse_chunks(
    api: Api,
    name: &str,
    id: &str,
    model: &str,
    tokens: u64,
    usage: &Value,
) -> Vec<Bytes> {
    let (object, delta) = match api {
        Api::Completions => ("text_completion", false),
        Api::Chat => ("chat.completion.chunk", true),
    };
    let mut out = Vec::with_capacity(tokens as usize + 2);
    for (i, w) in words(tokens).into_iter().enumerate() {
        let last = i as u64 + 1 == tokens;
        let choice = if delta {
            json!({"index": 0, "delta": {"content": w}, "finish_reason": if last { json!("length") } else { Value::Null }})
        } else {
            json!({"index": 0, "text": w, "logprobs": null, "finish_reason": if last { json!("length") } else { Value::Null }})
        };
        let ev = json!({"id": id, "object": object, "created": CREATED, "model": model, "choices": [choice], "mock_server": name});
        out.push(Bytes::from(format!("data: {ev}\n\n")));
    }
    let ev = json!({"id": id, "object": object, "created": CREATED, "model": model, "choices": [], "usage": usage, "mock_server": name});
    out.push(Bytes::from(format!("data: {ev}\n\n")));
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}
