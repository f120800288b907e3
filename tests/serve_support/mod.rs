//! Helpers for the `serve_api*` tests: a sim server on loopback, JSON/SSE/metrics readers.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use serde_json::Value;
use switchyard::serve::{self, ServeArgs, ServerHandle};

use crate::support::{HttpClient, HttpResponse};

/// Fast sim: one L4 decode step (~65 ms simulated) takes ~65 µs.
pub const FAST: f64 = 0.001;

pub async fn start(f: impl FnOnce(&mut ServeArgs)) -> (ServerHandle, String) {
    let mut args = ServeArgs::sim_for_tests("l4-qwen2.5-7b", FAST);
    args.served_model_name = vec!["qwen".into(), "qwen-alias".into()];
    f(&mut args);
    let h = serve::start(args).await.unwrap();
    let base = format!("http://{}", h.http_addr);
    (h, base)
}

pub async fn post(base: &str, path: &str, body: Value) -> HttpResponse {
    HttpClient::new()
        .post_json(&format!("{base}{path}"), &[], body.to_string())
        .await
        .unwrap()
}

pub fn json_of(r: &HttpResponse) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(r: &HttpResponse) -> Vec<String> {
    let text = r.text();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("bad event {e:?}"))
                .to_owned()
        })
        .collect()
}

/// Sum of the samples of `name` (exact series name, any labels) matching `filter`.
pub fn metric(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| l.contains(filter))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// Metrics once `name{filter}` reads `want`: the API layer records a request's end after the
/// client has read its last byte, so a scrape right after a response can be one request behind.
pub async fn metrics_when(base: &str, name: &str, filter: &str, want: f64) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = metrics_text(base).await;
        if metric(&text, name, filter) == want || std::time::Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

pub async fn metrics_text(base: &str) -> String {
    let r = HttpClient::new()
        .get(&format!("{base}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    r.text()
}

pub fn error_of(r: &HttpResponse) -> Value {
    assert_eq!(r.header("content-type"), "application/json");
    json_of(r)["error"].clone()
}

/// Opens a streaming request and returns the response once its first body frame arrived.
pub async fn open_stream(base: &str, body: Value) -> hyper::Response<hyper::body::Incoming> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let mut resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let frame = resp.body_mut().frame().await.unwrap().unwrap();
    assert!(frame.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
    resp
}

pub async fn wait_metrics(base: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics_text(base).await;
        if ok(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
