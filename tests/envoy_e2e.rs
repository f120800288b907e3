//! End-to-end tests of `switchyard epp` behind a real Envoy (`deploy/envoy/envoy.yaml`), with
//! three mock OpenAI/vLLM model servers on 127.0.0.1/.2/.3 sharing one port (the reference
//! scenarios' `192.168.1.x:8000` pods, on loopback).
//!
//! Envoy comes from `scripts/install-test-deps.sh` (`.cache/venv/bin/envoy`, or
//! `SWITCHYARD_ENVOY`); without it these tests print `SKIPPED:` and pass. promtool likewise.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use std::time::{Duration, Instant};

use serde_json::json;
use support::envoy::render_config;
use support::tools;
use support::{
    BodyMode, EnvoyConfig, EnvoyProcess, EppOptions, EppProcess, HttpClient, HttpResponse,
    MockModelServer, RouteCluster,
};

const POD_IPS: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
];

async fn pods() -> Vec<MockModelServer> {
    MockModelServer::start_group(&POD_IPS, "pod").await.unwrap()
}

fn addrs(mocks: &[MockModelServer]) -> Vec<SocketAddr> {
    mocks.iter().map(|m| m.addr).collect()
}

fn completion(model: &str, prompt: &str, stream: bool) -> String {
    json!({"max_tokens": 5, "model": model, "prompt": prompt, "stream": stream, "temperature": 0})
        .to_string()
}

/// Index of the mock that answered, from the `x-mock-server: pod<i>` header.
fn served_by(resp: &HttpResponse) -> Option<usize> {
    resp.header("x-mock-server")
        .strip_prefix("pod")?
        .parse()
        .ok()
}

fn served_counts(mocks: &[MockModelServer]) -> Vec<usize> {
    mocks.iter().map(MockModelServer::requests_served).collect()
}

/// The value of the first sample of `name` that carries all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            return None;
        }
        let (series, value) = rest.rsplit_once(' ')?;
        labels
            .iter()
            .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.parse().ok())?
    })
}

// ---------------------------------------------------------------------------------------------
// The mock model server itself (what every other test leans on).

#[tokio::test]
async fn mock_metrics_are_valid_vllm_prometheus_text() {
    let promtool = require_tool!(tools::promtool(), "promtool");
    let mock = MockModelServer::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), "m")
        .await
        .unwrap();
    mock.set_metrics(7, 3, 0.25);
    mock.set_lora(2, &["sql-lora", "tweet"], &["pii"]);
    let m = HttpClient::new()
        .get(&format!("http://{}/metrics", mock.addr))
        .await
        .unwrap();
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
    assert!(
        text.contains("vllm:cache_config_info{block_size=\"16\""),
        "{text}"
    );
    // vLLM's real names contain ':', which promtool's linter flags (exit code 3); that is the
    // only complaint allowed.
    let (code, out) = tools::promtool_check(&promtool, &text);
    let lint_only_colons = code == 3
        && out
            .lines()
            .all(|l| l.trim().is_empty() || l.ends_with("metric names should not contain ':'"));
    assert!(
        code == 0 || lint_only_colons,
        "promtool rejected the mock's metrics (exit {code}): {out}\n{text}"
    );
    assert_eq!(mock.metrics_scrapes(), 1);

    mock.set_metrics_text(Some("# TYPE x gauge\nx 1\n".to_owned()));
    let m = HttpClient::new()
        .get(&format!("http://{}/metrics", mock.addr))
        .await
        .unwrap();
    assert_eq!(m.text(), "# TYPE x gauge\nx 1\n");
    mock.stop().await;
}

#[tokio::test]
async fn mock_answers_json_sse_chunked_and_failures() {
    let mock = MockModelServer::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), "pod9")
        .await
        .unwrap();
    let base = format!("http://{}", mock.addr);
    let client = HttpClient::new();

    // Non-streamed: JSON with usage, and the server's name in header and body.
    let r = client
        .post_json(
            &format!("{base}/v1/completions"),
            &[],
            completion("m1", "abcdefgh", false),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(served_by(&r), Some(9));
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["mock_server"], "pod9");
    assert_eq!(v["model"], "m1");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 0}})
    );
    assert_eq!(Some(r.body.clone()), mock.last_response());

    // Streamed: one event per token, a usage event, [DONE], as separate frames.
    let r = client.post_json(&format!("{base}/v1/chat/completions"), &[], json!({"model": "m1", "messages": [{"role": "user", "content": "hi there"}], "stream": true, "max_tokens": 3}).to_string()).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "text/event-stream");
    let events: Vec<&str> = std::str::from_utf8(&r.body)
        .unwrap()
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .collect();
    assert_eq!(events.len(), 5, "{}", r.text());
    assert_eq!(events[4], "data: [DONE]");
    // Parsed, not matched as text: key order follows serde_json's features (preserve_order is on
    // since minijinja's preserve_order).
    let usage_event: serde_json::Value =
        serde_json::from_str(events[3].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(
        usage_event["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}}),
        "{}",
        events[3]
    );
    assert!(r.frames >= 2, "SSE arrived in {} frame(s)", r.frames);
    assert_eq!(Some(r.body.clone()), mock.last_response());

    // A chunked request body (what Envoy sends in FULL_DUPLEX_STREAMED mode) is accepted whole.
    let body = completion("m1", &"x".repeat(100_000), false);
    let chunks: Vec<Result<bytes::Bytes, std::convert::Infallible>> = body
        .as_bytes()
        .chunks(7_000)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let req = http::Request::post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::StreamBody::new(futures::stream::iter(
            chunks.into_iter().map(|c| c.map(hyper::body::Frame::data)),
        )))
        .unwrap();
    let chunked_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let resp = chunked_client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let (headers, got) = mock.last_request().unwrap();
    assert_eq!(
        headers
            .get("transfer-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("chunked")
    );
    assert_eq!(got, body.as_bytes());
    let v: serde_json::Value = serde_json::from_slice(&mock.last_response().unwrap()).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 25_000);

    // Told to fail: that status, OpenAI error JSON, still counted.
    mock.set_fail(Some(503));
    let r = client
        .post_json(
            &format!("{base}/v1/completions"),
            &[],
            completion("m1", "p", false),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(served_by(&r), Some(9));
    assert_eq!(mock.requests_served(), 4);
    mock.stop().await;

    // Stopped: the port refuses connections.
    assert!(client
        .post_json(
            &format!("{base}/v1/completions"),
            &[],
            completion("m1", "p", false)
        )
        .await
        .is_err());
}

// ---------------------------------------------------------------------------------------------
// The Envoy configuration, checked against Envoy alone (no EPP running: its port is closed).

fn config_without_epp(
    failure_mode_allow: bool,
    request_body_mode: BodyMode,
    route: RouteCluster,
    pool: Vec<SocketAddr>,
) -> EnvoyConfig {
    let p = support::ports::free_ports(2).unwrap();
    EnvoyConfig {
        epp_port: p[0],
        epp_health_port: p[1],
        failure_mode_allow,
        request_body_mode,
        route,
        pool,
    }
}

#[tokio::test]
async fn envoy_config_renders_and_validates() {
    let envoy = require_tool!(tools::envoy(), "envoy");
    let dir = tempfile::tempdir().unwrap();
    let pool = vec![
        SocketAddr::from(([127, 0, 0, 1], 8000)),
        SocketAddr::from(([127, 0, 0, 2], 8000)),
    ];
    for route in [
        RouteCluster::OriginalDestination,
        RouteCluster::InferencePool,
    ] {
        for (allow, mode) in [
            (false, BodyMode::FullDuplexStreamed),
            (true, BodyMode::Buffered),
        ] {
            let text = render_config(
                &config_without_epp(allow, mode, route, pool.clone()),
                18080,
                19901,
            )
            .unwrap();
            assert!(!text.contains("${"), "unrendered placeholder in\n{text}");
            assert!(text.contains(&format!("failure_mode_allow: {allow}")));
            let path = dir.path().join("envoy.yaml");
            std::fs::write(&path, &text).unwrap();
            let out = std::process::Command::new(&envoy)
                .args(["--mode", "validate", "-c"])
                .arg(&path)
                .output()
                .unwrap();
            let log = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && log.contains("OK"),
                "envoy rejected {route:?}/{allow}/{mode:?}:\n{log}"
            );
        }
    }
    // A typo in a placeholder name is caught before Envoy sees it.
    let err =
        support::envoy::render("port: ${LISTEN_PROT}", &[("LISTEN_PORT", "1".into())]).unwrap_err();
    assert_eq!(err.to_string(), "no value for placeholder ${LISTEN_PROT}");
}

#[tokio::test]
async fn envoy_fails_closed_without_epp() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let mocks = pods().await;
    let client = HttpClient::new();
    for route in [
        RouteCluster::OriginalDestination,
        RouteCluster::InferencePool,
    ] {
        let envoy = EnvoyProcess::start(
            &envoy_bin,
            &config_without_epp(false, BodyMode::FullDuplexStreamed, route, addrs(&mocks)),
        )
        .await
        .unwrap();
        // ext_proc cannot open its stream and failure_mode_allow is false: Envoy answers 500
        // itself (details ext_proc_error_gRPC_error_14) and no model server sees the request.
        let r = client
            .post_json(
                &envoy.url("/v1/completions"),
                &[],
                completion("m", "hello", false),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 500, "{route:?}: {}", r.text());
        let r = client.get(&envoy.url("/v1/models")).await.unwrap();
        assert_eq!(r.status, 500, "{route:?}: {}", r.text());
        assert_eq!(served_counts(&mocks), [0, 0, 0]);
        assert_eq!(
            envoy
                .stat("http.inference_gateway.ext_proc.streams_failed")
                .await
                .unwrap(),
            Some(2)
        );
    }
}

#[tokio::test]
async fn envoy_fails_open_round_robin_over_the_pool_without_epp() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let mocks = pods().await;
    let client = HttpClient::new();

    // Envoy 1.40 cannot fail open once it has streamed body chunks to the processor in
    // FULL_DUPLEX_STREAMED mode (it kept no copy to forward): a POST still gets 500, and only
    // a request without a body goes through.
    let envoy = EnvoyProcess::start(
        &envoy_bin,
        &config_without_epp(
            true,
            BodyMode::FullDuplexStreamed,
            RouteCluster::InferencePool,
            addrs(&mocks),
        ),
    )
    .await
    .unwrap();
    let r = client
        .post_json(
            &envoy.url("/v1/completions"),
            &[],
            completion("m", "hello", false),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 500, "{}", r.text());
    let r = client.get(&envoy.url("/v1/models")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    drop(envoy);

    // With BUFFERED request bodies fail-open works: no pick, so override_host's fallback policy
    // (round robin) spreads 6 requests 2 per pod.
    let envoy = EnvoyProcess::start(
        &envoy_bin,
        &config_without_epp(
            true,
            BodyMode::Buffered,
            RouteCluster::InferencePool,
            addrs(&mocks),
        ),
    )
    .await
    .unwrap();
    let before = served_counts(&mocks);
    for _ in 0..6 {
        let r = client
            .post_json(
                &envoy.url("/v1/completions"),
                &[],
                completion("m", "hello", false),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let after = served_counts(&mocks);
    assert_eq!(
        [
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2]
        ],
        [2, 2, 2]
    );
    assert_eq!(
        envoy
            .stat("http.inference_gateway.ext_proc.failure_mode_allowed")
            .await
            .unwrap(),
        Some(6)
    );
    drop(envoy);

    // The reference ORIGINAL_DST route has nowhere to send a request without a pick.
    let envoy = EnvoyProcess::start(
        &envoy_bin,
        &config_without_epp(
            true,
            BodyMode::Buffered,
            RouteCluster::OriginalDestination,
            addrs(&mocks),
        ),
    )
    .await
    .unwrap();
    let r = client
        .post_json(
            &envoy.url("/v1/completions"),
            &[],
            completion("m", "hello", false),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(served_counts(&mocks), after);
}

#[tokio::test]
async fn envoy_override_host_tries_fallbacks_in_order() {
    // The mechanism the EPP's `--fallback-endpoints` relies on, driven by a destination header
    // the client sets (ext_proc fails open here, so Envoy uses the header as given).
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let mut mocks = pods().await;
    let envoy = EnvoyProcess::start(
        &envoy_bin,
        &config_without_epp(
            true,
            BodyMode::Buffered,
            RouteCluster::InferencePool,
            addrs(&mocks),
        ),
    )
    .await
    .unwrap();
    let client = HttpClient::new();
    let url = envoy.url("/v1/completions");

    let header = format!("{},{},{}", mocks[2].addr, mocks[0].addr, mocks[1].addr);
    let r = client
        .post_json(
            &url,
            &[("x-gateway-destination-endpoint", &header)],
            completion("m", "p", false),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), served_by(&r)),
        (200, Some(2)),
        "{}",
        r.text()
    );

    let dead = mocks.remove(1);
    let dead_addr = dead.addr;
    dead.stop().await;
    let header = format!("{dead_addr},{},{}", mocks[1].addr, mocks[0].addr);
    let r = client
        .post_json(
            &url,
            &[("x-gateway-destination-endpoint", &header)],
            completion("m", "p", false),
        )
        .await
        .unwrap();
    // Attempt 1 → the dead primary (connection refused), attempt 2 → the first fallback (pod2).
    assert_eq!(
        (r.status.as_u16(), served_by(&r)),
        (200, Some(2)),
        "{}",
        r.text()
    );
    assert_eq!(
        envoy
            .stat("cluster.inference_pool.upstream_rq_retry")
            .await
            .unwrap(),
        Some(1)
    );
    assert_eq!(served_counts(&mocks), [0, 2]);
    drop(envoy);

    // ORIGINAL_DST takes one address only: a list is an invalid destination there.
    let envoy = EnvoyProcess::start(
        &envoy_bin,
        &config_without_epp(
            true,
            BodyMode::Buffered,
            RouteCluster::OriginalDestination,
            vec![],
        ),
    )
    .await
    .unwrap();
    let url = envoy.url("/v1/completions");
    let header = format!("{},{}", mocks[0].addr, mocks[1].addr);
    let r = client
        .post_json(
            &url,
            &[("x-gateway-destination-endpoint", &header)],
            completion("m", "p", false),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        envoy
            .stat("cluster.original_destination.original_dst_host_invalid")
            .await
            .unwrap(),
        Some(1)
    );
    let r = client
        .post_json(
            &url,
            &[("x-gateway-destination-endpoint", &mocks[1].addr.to_string())],
            completion("m", "p", false),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), served_by(&r)),
        (200, Some(2)),
        "{}",
        r.text()
    );
}

// ---------------------------------------------------------------------------------------------
// The real EPP behind Envoy.

/// Three mock pods, `switchyard epp` over them, and Envoy in front.
struct Stack {
    mocks: Vec<MockModelServer>,
    epp: EppProcess,
    envoy: EnvoyProcess,
    client: HttpClient,
}

impl Stack {
    async fn start(
        envoy_bin: &std::path::Path,
        route: RouteCluster,
        mode: BodyMode,
        failure_mode_allow: bool,
        fallbacks: u32,
    ) -> Self {
        let mocks = pods().await;
        let mut opts = EppOptions::new(addrs(&mocks));
        opts.fallback_endpoints = fallbacks;
        // Metric labels name only configured models (others are `other`).
        opts.extra_args.push("--known-models=metrics-model".into());
        let epp = EppProcess::start(&opts).await.unwrap();
        let cfg = EnvoyConfig {
            epp_port: epp.grpc_port,
            epp_health_port: epp.health_port,
            failure_mode_allow,
            request_body_mode: mode,
            route,
            pool: addrs(&mocks),
        };
        let envoy = EnvoyProcess::start(envoy_bin, &cfg).await.unwrap();
        let stack = Self {
            mocks,
            epp,
            envoy,
            client: HttpClient::new(),
        };
        // Every pod scraped (twice, so a full round has landed) before the first request.
        stack.wait_scrapes(2).await;
        stack
    }

    /// Waits until every mock has been scraped `n` more times, so values set before this call
    /// are what the EPP now holds (the scrape in flight at the call may still carry old ones).
    async fn wait_scrapes(&self, n: usize) {
        let start: Vec<usize> = self
            .mocks
            .iter()
            .map(MockModelServer::metrics_scrapes)
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .mocks
            .iter()
            .zip(&start)
            .any(|(m, s)| m.metrics_scrapes() < s + n)
        {
            assert!(
                Instant::now() < deadline,
                "EPP did not scrape every pod {n} times within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn post(&self, path: &str, body: String) -> HttpResponse {
        self.client
            .post_json(
                &self.envoy.url(path),
                &[("hi", "mom"), ("x-request-id", "e2e-request-id")],
                body,
            )
            .await
            .unwrap()
    }

    /// Sends a completion and returns the index of the pod that answered (asserting 200).
    async fn complete(&self, model: &str, prompt: &str) -> usize {
        let r = self
            .post("/v1/completions", completion(model, prompt, false))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        served_by(&r).unwrap_or_else(|| panic!("no x-mock-server in {:?}", r.headers))
    }
}

/// About 4 KB of text, different from every other `seed`'s from the first byte on.
fn long_prefix(seed: &str) -> String {
    let mut s = format!("[{seed}] You are a careful assistant for the Switchyard project. ");
    while s.len() < 4096 {
        s.push_str("Answer with precise, verifiable statements and cite the file you read. ");
    }
    s
}

#[tokio::test]
async fn shared_prefixes_stick_to_one_pod_and_distinct_prefixes_spread() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let s = Stack::start(
        &envoy_bin,
        RouteCluster::OriginalDestination,
        BodyMode::FullDuplexStreamed,
        false,
        0,
    )
    .await;

    let prefix = long_prefix("shared");
    let mut picks = Vec::new();
    for i in 0..20 {
        picks.push(
            s.complete(
                "prefix-model",
                &format!("{prefix} Question {i}: what is {i} squared?"),
            )
            .await,
        );
    }
    assert!(
        picks.iter().all(|p| *p == picks[0]),
        "a shared 4 KB prefix moved between pods: {picks:?}"
    );

    // No prefix in common and equal load: ties broken at random, so 12 requests use more than one
    // pod (all on one pod by chance: probability 3 × 3^-12 ≈ 6e-6).
    let mut distinct = Vec::new();
    for i in 0..12 {
        distinct.push(
            s.complete("prefix-model", &long_prefix(&format!("distinct-{i}")))
                .await,
        );
    }
    let used: std::collections::BTreeSet<usize> = distinct.iter().copied().collect();
    assert!(
        used.len() >= 2,
        "distinct prefixes all went to one pod: {distinct:?}"
    );
}

#[tokio::test]
async fn queue_and_kv_load_move_new_traffic_away() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let s = Stack::start(
        &envoy_bin,
        RouteCluster::OriginalDestination,
        BodyMode::FullDuplexStreamed,
        false,
        0,
    )
    .await;

    let prefix = long_prefix("load");
    let home = s.complete("load-model", &format!("{prefix} warm-up")).await;
    for i in 0..3 {
        assert_eq!(
            s.complete("load-model", &format!("{prefix} again {i}"))
                .await,
            home
        );
    }

    // The prefix's pod becomes busy: score 3×1 (prefix) + 2×0 (queue) + 2×0.05 (kv) = 3.1 against
    // 2×1 + 2×1 = 4 for an idle pod, so the prefix moves, and then sticks to its new pod.
    s.mocks[home].set_metrics(50, 10, 0.95);
    s.wait_scrapes(3).await;
    let mut after = Vec::new();
    for i in 0..6 {
        after.push(
            s.complete("load-model", &format!("{prefix} under load {i}"))
                .await,
        );
    }
    assert!(
        after.iter().all(|p| *p != home),
        "requests still went to the loaded pod {home}: {after:?}"
    );
    assert!(
        after.iter().all(|p| *p == after[0]),
        "the moved prefix did not stick: {after:?}"
    );
    for i in 0..6 {
        let p = s
            .complete("load-model", &long_prefix(&format!("fresh-{i}")))
            .await;
        assert_ne!(p, home, "a fresh request went to the loaded pod");
    }

    // Load gone: the home pod wins again. It still holds the prefix's first blocks, so it
    // scores 3×(matched fraction) + 2×1 + 2×1 > 4, the score of the third, idle pod, which holds
    // none of them; the moved-to pod is loaded now (≈ 3 + 0.1).
    s.mocks[home].set_metrics(0, 0, 0.0);
    s.mocks[after[0]].set_metrics(50, 10, 0.95);
    s.wait_scrapes(3).await;
    assert_eq!(
        s.complete("load-model", &format!("{prefix} later")).await,
        home,
        "with the load gone the prefix should go back to its home pod"
    );
}

#[tokio::test]
async fn bodies_pass_through_intact() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let s = Stack::start(
        &envoy_bin,
        RouteCluster::OriginalDestination,
        BodyMode::FullDuplexStreamed,
        false,
        0,
    )
    .await;

    // Non-streamed JSON: request bytes reach the pod unchanged, response bytes reach the client.
    let body = completion("intact-model", "Say hello in French.", false);
    let r = s.post("/v1/completions", body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let pod = &s.mocks[served_by(&r).unwrap()];
    let (headers, got) = pod.last_request().unwrap();
    assert_eq!(got, body.as_bytes());
    assert_eq!(Some(r.body.clone()), pod.last_response());
    assert_eq!(headers.get("hi").unwrap(), "mom");
    assert_eq!(headers.get("x-request-id").unwrap(), "e2e-request-id");
    assert_eq!(
        headers
            .get("x-gateway-destination-endpoint")
            .unwrap()
            .to_str()
            .unwrap(),
        pod.addr.to_string()
    );

    // Streamed (SSE) completion: every byte, in more than one piece.
    let body = completion("intact-model", "Count to five.", true);
    let r = s.post("/v1/completions", body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), "text/event-stream");
    let pod = &s.mocks[served_by(&r).unwrap()];
    assert_eq!(
        Some(r.body.clone()),
        pod.last_response(),
        "SSE body changed on the way"
    );
    assert!(r.text().ends_with("data: [DONE]\n\n"), "{}", r.text());
    assert!(
        r.frames >= 2,
        "SSE arrived in {} frame(s): buffered instead of streamed",
        r.frames
    );

    // Streamed chat completion.
    let body = json!({"model": "intact-model", "stream": true, "max_tokens": 4,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ünïcødé ✓"}]})
    .to_string();
    let r = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let pod = &s.mocks[served_by(&r).unwrap()];
    assert_eq!(pod.last_request().unwrap().1, body.as_bytes());
    assert_eq!(Some(r.body.clone()), pod.last_response());

    // A 300 KB prompt crosses the EPP in several ≤ 62,000-byte chunks and arrives whole.
    let prompt: String = (0..300_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let body = completion("intact-model", &prompt, false);
    let r = s.post("/v1/completions", body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let pod = &s.mocks[served_by(&r).unwrap()];
    let got = pod.last_request().unwrap().1;
    assert_eq!(got.len(), body.len());
    assert!(got == body.as_bytes(), "300 KB body changed on the way");
    assert_eq!(Some(r.body.clone()), pod.last_response());

    // A client cannot choose the pod: the EPP overwrites a destination header it sends.
    let r = s
        .client
        .post_json(
            &s.envoy.url("/v1/completions"),
            &[("x-gateway-destination-endpoint", "127.0.0.9:1")],
            completion("intact-model", "spoof", false),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let pod = &s.mocks[served_by(&r).unwrap()];
    let (headers, _) = pod.last_request().unwrap();
    assert_eq!(
        headers
            .get("x-gateway-destination-endpoint")
            .unwrap()
            .to_str()
            .unwrap(),
        pod.addr.to_string()
    );

    // A model-server error reaches the client as sent, and is not retried (the route retries
    // connection failures only).
    for m in &s.mocks {
        m.set_fail(Some(503));
    }
    let before: usize = served_counts(&s.mocks).iter().sum();
    let r = s
        .post("/v1/completions", completion("intact-model", "fail", false))
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    let pod = &s.mocks[served_by(&r).unwrap()];
    assert_eq!(Some(r.body.clone()), pod.last_response());
    assert_eq!(served_counts(&s.mocks).iter().sum::<usize>(), before + 1);
}

#[tokio::test]
async fn dead_primary_is_retried_on_the_next_fallback() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let mut s = Stack::start(
        &envoy_bin,
        RouteCluster::InferencePool,
        BodyMode::FullDuplexStreamed,
        false,
        2,
    )
    .await;

    // pod0 is the clear favourite; pod1 and pod2 are busy.
    s.mocks[1].set_metrics(20, 5, 0.7);
    s.mocks[2].set_metrics(40, 5, 0.8);
    s.wait_scrapes(3).await;
    let r = s
        .post(
            "/v1/completions",
            completion("fallback-model", "first", false),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), served_by(&r)),
        (200, Some(0)),
        "{}",
        r.text()
    );
    let dest = s.mocks[0]
        .last_request()
        .unwrap()
        .0
        .get("x-gateway-destination-endpoint")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let expected = format!(
        "{},{},{}",
        s.mocks[0].addr, s.mocks[1].addr, s.mocks[2].addr
    );
    assert_eq!(dest, expected, "primary + 2 fallbacks in score order");

    // pod0 dies; until the EPP notices, it stays the primary and Envoy must use the fallback.
    let dead = s.mocks.remove(0);
    dead.stop().await;
    let r = s
        .post(
            "/v1/completions",
            completion("fallback-model", "second", false),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-mock-server"),
        "pod1",
        "served by the first fallback"
    );
    let retries = s
        .envoy
        .stat("cluster.inference_pool.upstream_rq_retry")
        .await
        .unwrap();
    assert_eq!(
        retries,
        Some(1),
        "expected exactly one retry:\n{}",
        s.envoy.logs()
    );
    assert_eq!(
        s.mocks[0].last_request().unwrap().1,
        completion("fallback-model", "second", false).as_bytes()
    );
}

#[tokio::test]
async fn epp_down_fails_closed() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let mut s = Stack::start(
        &envoy_bin,
        RouteCluster::OriginalDestination,
        BodyMode::FullDuplexStreamed,
        false,
        0,
    )
    .await;
    s.complete("down-model", "before").await;
    let served = served_counts(&s.mocks);
    s.epp.kill();
    let r = s
        .post("/v1/completions", completion("down-model", "after", false))
        .await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(
        served_counts(&s.mocks),
        served,
        "a request reached a pod with the EPP down"
    );
}

#[tokio::test]
async fn epp_down_fails_open_with_failure_mode_allow() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    // Fail-open needs BUFFERED request bodies in Envoy 1.40 (deploy/envoy/README.md); this also
    // runs the EPP's BUFFERED path behind a real Envoy.
    let mut s = Stack::start(
        &envoy_bin,
        RouteCluster::InferencePool,
        BodyMode::Buffered,
        true,
        0,
    )
    .await;
    let prefix = long_prefix("open");
    let home = s.complete("open-model", &format!("{prefix} 1")).await;
    assert_eq!(
        s.complete("open-model", &format!("{prefix} 2")).await,
        home,
        "the EPP picked in BUFFERED mode"
    );

    s.epp.kill();
    let before = served_counts(&s.mocks);
    for i in 0..3 {
        s.complete("open-model", &format!("{prefix} without EPP {i}"))
            .await;
    }
    // No pick: round robin over the pool, one request per pod.
    let after = served_counts(&s.mocks);
    assert_eq!(
        [
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2]
        ],
        [1, 1, 1]
    );
}

#[tokio::test]
async fn epp_metrics_pass_promtool() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let promtool = require_tool!(tools::promtool(), "promtool");
    let s = Stack::start(
        &envoy_bin,
        RouteCluster::InferencePool,
        BodyMode::FullDuplexStreamed,
        false,
        0,
    )
    .await;
    for i in 0..3 {
        s.complete("metrics-model", &format!("metrics {i}")).await;
    }
    let r = s
        .post(
            "/v1/completions",
            json!({"model": "metrics-model", "prompt": "s", "stream": true}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200);

    let m = s.client.get(&s.epp.metrics_url()).await.unwrap();
    assert_eq!(m.status, 200, "{}", m.text());
    let text = m.text();
    // Counted on the request path, with the reference labels (no objective → priority 0).
    let model = [
        ("model_name", "metrics-model"),
        ("target_model_name", "metrics-model"),
    ];
    let value = |name: &str, labels: &[(&str, &str)]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in\n{text}"))
    };
    assert_eq!(
        value(
            "inference_objective_request_total",
            &[model[0], model[1], ("priority", "0")]
        ),
        4.0
    );
    // Usage parsed on the response path, from JSON (3 × "metrics N": 3 prompt tokens each at
    // the mock's 4 bytes per token) and SSE ("s": 1); 5 completion tokens each.
    assert_eq!(value("inference_objective_input_tokens_sum", &model), 10.0);
    assert_eq!(value("inference_objective_input_tokens_count", &model), 4.0);
    assert_eq!(value("inference_objective_output_tokens_sum", &model), 20.0);
    assert_eq!(value("inference_pool_ready_pods", &[]), 3.0);

    let (code, out) = tools::promtool_check(&promtool, &text);
    assert_eq!(
        code, 0,
        "promtool check metrics failed (exit 3 = lint problems):\n{out}\n{text}"
    );
}
