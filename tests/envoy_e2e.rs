//! End-to-end tests of `switchyard epp` behind a real Envoy (`deploy/envoy/envoy.yaml`), with
//! three mock OpenAI/vLLM model servers on 127.0.0.1/.2/.3 sharing one port (the reference
//! scenarios' `192.168.1.x:8000` pods, on loopback).
//!
//! Envoy comes from `scripts/install-test-deps.sh` (`.cache/venv/bin/envoy`, or
//! `SWITCHYARD_ENVOY`); without it these tests print `SKIPPED:` and pass. promtool likewise.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde_json::json;
use support::envoy::render_config;
use support::tools;
use support::{EnvoyConfig, EnvoyProcess, HttpClient, HttpResponse, MockModelServer, RouteCluster};

const POD_IPS: [IpAddr; 3] =
    [IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3))];

async fn pods() -> Vec<MockModelServer> {
    MockModelServer::start_group(&POD_IPS, "pod").await.unwrap()
}

fn addrs(mocks: &[MockModelServer]) -> Vec<SocketAddr> {
    mocks.iter().map(|m| m.addr).collect()
}

fn completion(model: &str, prompt: &str, stream: bool) -> String {
    json!({"max_tokens": 5, "model": model, "prompt": prompt, "stream": stream, "temperature": 0}).to_string()
}

/// Index of the mock that answered, from the `x-mock-server: pod<i>` header.
fn served_by(resp: &HttpResponse) -> Option<usize> {
    resp.header("x-mock-server").strip_prefix("pod")?.parse().ok()
}

fn served_counts(mocks: &[MockModelServer]) -> Vec<usize> {
    mocks.iter().map(MockModelServer::requests_served).collect()
}

/// Runs `promtool check metrics` on `text`; returns (success, output).
fn promtool_check(promtool: &PathBuf, text: &str) -> (bool, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

// ---------------------------------------------------------------------------------------------
// The mock model server itself (what every other test leans on).

#[tokio::test]
async fn mock_metrics_are_valid_vllm_prometheus_text() {
    let promtool = require_tool!(tools::promtool(), "promtool");
    let mock = MockModelServer::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), "m").await.unwrap();
    mock.set_metrics(7, 3, 0.25);
    mock.set_lora(2, &["sql-lora", "tweet"], &["pii"]);
    let m = HttpClient::new().get(&format!("http://{}/metrics", mock.addr)).await.unwrap();
    assert_eq!(m.status, 200);
    let text = m.text();
    for line in [
        "vllm:num_requests_waiting{engine=\"0\",model_name=\"mock-model\"} 7.0",
        "vllm:num_requests_running{engine=\"0\",model_name=\"mock-model\"} 3.0",
        "vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"mock-model\"} 0.25",
        "vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"sql-lora,tweet\",waiting_lora_adapters=\"pii\"} 1.7e+09",
        "# TYPE vllm:e2e_request_latency_seconds histogram",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    assert!(text.contains("vllm:cache_config_info{block_size=\"16\""), "{text}");
    let (ok, out) = promtool_check(&promtool, &text);
    assert!(ok, "promtool rejected the mock's metrics: {out}\n{text}");
    assert_eq!(mock.metrics_scrapes(), 1);

    mock.set_metrics_text(Some("# TYPE x gauge\nx 1\n".to_owned()));
    let m = HttpClient::new().get(&format!("http://{}/metrics", mock.addr)).await.unwrap();
    assert_eq!(m.text(), "# TYPE x gauge\nx 1\n");
    mock.stop().await;
}

#[tokio::test]
async fn mock_answers_json_sse_chunked_and_failures() {
    let mock = MockModelServer::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), "pod9").await.unwrap();
    let base = format!("http://{}", mock.addr);
    let client = HttpClient::new();

    // Non-streamed: JSON with usage, and the server's name in header and body.
    let r = client.post_json(&format!("{base}/v1/completions"), &[], completion("m1", "abcdefgh", false)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(served_by(&r), Some(9));
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["mock_server"], "pod9");
    assert_eq!(v["model"], "m1");
    assert_eq!(v["usage"], json!({"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 0}}));
    assert_eq!(Some(r.body.clone()), mock.last_response());

    // Streamed: one event per token, a usage event, [DONE], as separate frames.
    let r = client.post_json(&format!("{base}/v1/chat/completions"), &[], json!({"model": "m1", "messages": [{"role": "user", "content": "hi there"}], "stream": true, "max_tokens": 3}).to_string()).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "text/event-stream");
    let events: Vec<&str> = std::str::from_utf8(&r.body).unwrap().split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 5, "{}", r.text());
    assert_eq!(events[4], "data: [DONE]");
    assert!(events[3].contains("\"usage\":{\"completion_tokens\":3,\"prompt_tokens\":2,"), "{}", events[3]);
    assert!(r.frames >= 2, "SSE arrived in {} frame(s)", r.frames);
    assert_eq!(Some(r.body.clone()), mock.last_response());

    // A chunked request body (what Envoy sends in FULL_DUPLEX_STREAMED mode) is accepted whole.
    let body = completion("m1", &"x".repeat(100_000), false);
    let chunks: Vec<Result<bytes::Bytes, std::convert::Infallible>> =
        body.as_bytes().chunks(7_000).map(|c| Ok(bytes::Bytes::copy_from_slice(c))).collect();
    let req = http::Request::post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::StreamBody::new(futures::stream::iter(chunks.into_iter().map(|c| c.map(hyper::body::Frame::data)))))
        .unwrap();
    let chunked_client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let resp = chunked_client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let (headers, got) = mock.last_request().unwrap();
    assert_eq!(headers.get("transfer-encoding").map(|v| v.to_str().unwrap()), Some("chunked"));
    assert_eq!(got, body.as_bytes());
    let v: serde_json::Value = serde_json::from_slice(&mock.last_response().unwrap()).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 25_000);

    // Told to fail: that status, OpenAI error JSON, still counted.
    mock.set_fail(Some(503));
    let r = client.post_json(&format!("{base}/v1/completions"), &[], completion("m1", "p", false)).await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(served_by(&r), Some(9));
    assert_eq!(mock.requests_served(), 4);
    mock.stop().await;

    // Stopped: the port refuses connections.
    assert!(client.post_json(&format!("{base}/v1/completions"), &[], completion("m1", "p", false)).await.is_err());
}

// ---------------------------------------------------------------------------------------------
// The Envoy configuration, checked against Envoy alone (no EPP running: its port is closed).

fn config_without_epp(failure_mode_allow: bool, route: RouteCluster, pool: Vec<SocketAddr>) -> EnvoyConfig {
    let p = support::ports::free_ports(2).unwrap();
    EnvoyConfig { epp_port: p[0], epp_health_port: p[1], failure_mode_allow, route, pool }
}

#[tokio::test]
async fn envoy_config_renders_and_validates() {
    let envoy = require_tool!(tools::envoy(), "envoy");
    let dir = tempfile::tempdir().unwrap();
    let pool = vec![SocketAddr::from(([127, 0, 0, 1], 8000)), SocketAddr::from(([127, 0, 0, 2], 8000))];
    for route in [RouteCluster::OriginalDestination, RouteCluster::InferencePool] {
        for allow in [false, true] {
            let text = render_config(&config_without_epp(allow, route, pool.clone()), 18080, 19901).unwrap();
            assert!(!text.contains("${"), "unrendered placeholder in\n{text}");
            assert!(text.contains(&format!("failure_mode_allow: {allow}")));
            let path = dir.path().join("envoy.yaml");
            std::fs::write(&path, &text).unwrap();
            let out = std::process::Command::new(&envoy).args(["--mode", "validate", "-c"]).arg(&path).output().unwrap();
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && log.contains("OK"), "envoy rejected {route:?}/{allow}:\n{log}");
        }
    }
    // A typo in a placeholder name is caught before Envoy sees it.
    let err = support::envoy::render("port: ${LISTEN_PROT}", &[("LISTEN_PORT", "1".into())]).unwrap_err();
    assert_eq!(err.to_string(), "no value for placeholder ${LISTEN_PROT}");
}

#[tokio::test]
async fn envoy_fails_closed_without_epp() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let mocks = pods().await;
    for route in [RouteCluster::OriginalDestination, RouteCluster::InferencePool] {
        let envoy = EnvoyProcess::start(&envoy_bin, &config_without_epp(false, route, addrs(&mocks))).await.unwrap();
        let r = HttpClient::new().post_json(&envoy.url("/v1/completions"), &[], completion("m", "hello", false)).await.unwrap();
        // ext_proc cannot open its stream and failure_mode_allow is false: Envoy answers 500
        // itself and no model server sees the request.
        assert_eq!(r.status, 500, "{route:?}: {} {}", r.status, r.text());
        assert_eq!(served_counts(&mocks), [0, 0, 0]);
    }
}

#[tokio::test]
async fn envoy_fails_open_round_robin_over_the_pool_without_epp() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let mocks = pods().await;
    let envoy = EnvoyProcess::start(&envoy_bin, &config_without_epp(true, RouteCluster::InferencePool, addrs(&mocks))).await.unwrap();
    let client = HttpClient::new();
    for _ in 0..6 {
        let r = client.post_json(&envoy.url("/v1/completions"), &[], completion("m", "hello", false)).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // No pick → override_host's fallback policy: round robin, so 6 requests are 2 per pod.
    assert_eq!(served_counts(&mocks), [2, 2, 2]);

    // The reference ORIGINAL_DST route has nowhere to send a request without a pick.
    let envoy = EnvoyProcess::start(&envoy_bin, &config_without_epp(true, RouteCluster::OriginalDestination, addrs(&mocks))).await.unwrap();
    let r = client.post_json(&envoy.url("/v1/completions"), &[], completion("m", "hello", false)).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(served_counts(&mocks), [2, 2, 2]);
}

#[tokio::test]
async fn envoy_override_host_tries_fallbacks_in_order() {
    // The mechanism the EPP's `--fallback-endpoints` relies on, driven by a destination header
    // set by the client (ext_proc fails open here, so Envoy uses the header as given).
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let mut mocks = pods().await;
    let envoy = EnvoyProcess::start(&envoy_bin, &config_without_epp(true, RouteCluster::InferencePool, addrs(&mocks))).await.unwrap();
    let client = HttpClient::new();
    let list = |order: [usize; 3], mocks: &[MockModelServer]| order.map(|i| mocks[i].addr.to_string()).join(",");

    let r = client.post_json(&envoy.url("/v1/completions"), &[("x-gateway-destination-endpoint", &list([2, 0, 1], &mocks))], completion("m", "p", false)).await.unwrap();
    assert_eq!((r.status.as_u16(), served_by(&r)), (200, Some(2)), "{}", r.text());

    let dead = mocks.remove(1);
    let dead_addr = dead.addr;
    dead.stop().await;
    let header = format!("{dead_addr},{},{}", mocks[1].addr, mocks[0].addr);
    let r = client.post_json(&envoy.url("/v1/completions"), &[("x-gateway-destination-endpoint", &header)], completion("m", "p", false)).await.unwrap();
    // Attempt 1 → the dead primary (connection refused), attempt 2 → the first fallback (pod2).
    assert_eq!((r.status.as_u16(), served_by(&r)), (200, Some(2)), "{}", r.text());
    assert_eq!(envoy.stat("cluster.inference_pool.upstream_rq_retry").await.unwrap(), Some(1));
    assert_eq!(served_counts(&mocks), [0, 2]);

    // ORIGINAL_DST takes one address only: a list is an invalid destination there.
    let envoy = EnvoyProcess::start(&envoy_bin, &config_without_epp(true, RouteCluster::OriginalDestination, vec![])).await.unwrap();
    let header = format!("{},{}", mocks[0].addr, mocks[1].addr);
    let r = client.post_json(&envoy.url("/v1/completions"), &[("x-gateway-destination-endpoint", &header)], completion("m", "p", false)).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(envoy.stat("cluster.original_destination.original_dst_host_invalid").await.unwrap(), Some(1));
    let r = client.post_json(&envoy.url("/v1/completions"), &[("x-gateway-destination-endpoint", &mocks[1].addr.to_string())], completion("m", "p", false)).await.unwrap();
    assert_eq!((r.status.as_u16(), served_by(&r)), (200, Some(2)), "{}", r.text());
}
