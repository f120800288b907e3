//! `switchyard serve` KV events consumed by `switchyard epp`, both in-process on loopback: two
//! sim replicas publish vLLM-format events over ZMQ (`--kv-events-config`), a third serves the
//! project's gRPC stream (`--kv-events-port`); all three use the real Qwen tokenizer, and so does
//! the EPP's `precise-prefix-cache-scorer`. A chat conversation and a completion prompt served by
//! one replica are then routed by the EPP to that replica, because its events say it holds the
//! blocks.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{HttpClient, InProcessEpp, TestEpp};
use switchyard::epp::server::RunningEpp;
use switchyard::serve::{self, ServeArgs, ServerHandle};

fn qwen_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/qwen-tokenizer");
    if dir.join("tokenizer.json").is_file() {
        Some(dir)
    } else {
        support::tools::missing_dependency(
            "qwen tokenizer not in .cache/qwen-tokenizer (run scripts/fetch-tokenizer.sh)",
        );
        None
    }
}

const ZMQ_CONFIG: &str = r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:0","topic":"kv@replica@qwen"}"#;

async fn replica(dir: &Path, zmq: bool) -> ServerHandle {
    let mut args = ServeArgs::sim_for_tests("l4-qwen2.5-7b", 0.001);
    args.model = Some(dir.to_path_buf());
    args.served_model_name = vec!["qwen".into()];
    if zmq {
        args.kv_events_config = Some(ZMQ_CONFIG.into());
    } else {
        args.kv_events_port = Some(0);
    }
    serve::start(args).await.unwrap()
}

async fn start_epp(dir: &Path, replicas: &[&ServerHandle]) -> TestEpp {
    let mut sockets = String::new();
    let mut pool = String::from("endpoints:\n");
    for r in replicas {
        let source = match (r.kv_zmq_addr, r.kv_events_addr) {
            (Some(z), _) => format!("tcp://127.0.0.1:{}", z.port()),
            (None, Some(g)) => format!("grpc://{g}"),
            _ => unreachable!(),
        };
        sockets.push_str(&format!("        \"{}\": \"{source}\"\n", r.http_addr));
        pool.push_str(&format!("- address: {}\n", r.http_addr));
    }
    let config = format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig: {{ blockSize: 16 }}
    indexerConfig:
      tokenizersPoolConfig:
        local: {{ autoDiscoveryDir: \"{}\" }}
    kvEventsConfig:
      endpointSockets:
{sockets}- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
  - pluginRef: max-score-picker
",
        dir.display()
    );
    InProcessEpp::endpoints_file(pool)
        .config(config)
        .flags(&["--secure-serving=false", "--pool-name", "pool"])
        .start()
        .await
}

/// Serves `body` on `replica` (directly, as a client would after routing) and returns the
/// usage's cached tokens.
async fn serve_directly(replica: &ServerHandle, path: &str, body: &Value) -> u64 {
    let r = HttpClient::new()
        .post_json(
            &format!("http://{}{path}", replica.http_addr),
            &[],
            body.to_string(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
}

/// Routes `body` for `path` through the EPP's ext_proc stream; returns the destination.
async fn route_via(epp: &RunningEpp, path: &str, body: &[u8]) -> String {
    use support::ext_proc::{destination, exchange, request_body, request_headers};
    let replies = exchange(
        epp.grpc_addr,
        vec![request_headers(path, &[], false), request_body(body, true)],
    )
    .await;
    destination(&replies).expect("no destination in the EPP's replies")
}

/// Event batches the EPP has received from all replicas.
async fn batches(epp: &TestEpp) -> f64 {
    let text = epp.metrics_text().await;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("switchyard_kv_events_batches_total ")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Serves `body` on `owner` until the EPP routes it there (the first events can be published
/// before the EPP's subscription is in place).
async fn expect_routed_to(epp: &TestEpp, owner: &ServerHandle, path: &str, body: &Value) {
    let want = owner.http_addr.to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Route only once the events are in: with no blocks anywhere every endpoint scores 0
        // and a tie-break could pick the owner by chance.
        let before = batches(epp).await;
        serve_directly(owner, path, body).await;
        while batches(epp).await <= before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = route_via(epp, path, body.to_string().as_bytes()).await;
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never routed to {want} (last {got})"
        );
    }
    for _ in 0..5 {
        let got = route_via(epp, path, body.to_string().as_bytes()).await;
        assert_eq!(got, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_events_over_zmq_and_grpc_steer_the_epp() {
    let Some(dir) = qwen_dir() else { return };
    let a = replica(&dir, true).await;
    let b = replica(&dir, false).await;
    let c = replica(&dir, true).await;
    assert!(a.kv_zmq_addr.is_some() && b.kv_events_addr.is_some());
    let epp = start_epp(&dir, &[&a, &b, &c]).await;

    let system = "You are a careful coding assistant. Keep answers short. ".repeat(8);
    let chat = json!({
        "model": "qwen",
        "max_tokens": 4,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "Write fibonacci in Rust."}
        ]
    });
    // A's ZMQ events, tokenized through the chat template on both sides.
    expect_routed_to(&epp, &a, "/v1/chat/completions", &chat).await;
    // The replica really holds what the EPP predicted: the repeat is a prefix hit.
    assert!(serve_directly(&a, "/v1/chat/completions", &chat).await >= 64);

    // B's gRPC stream steers a different prompt to B.
    let completion = json!({
        "model": "qwen",
        "max_tokens": 4,
        "temperature": 0,
        "prompt": "fn main() { println!(\"hello\"); } // explain this program line by line. ".repeat(6)
    });
    expect_routed_to(&epp, &b, "/v1/completions", &completion).await;
    // ... while the chat conversation still goes to A.
    let got = route_via(&epp, "/v1/chat/completions", chat.to_string().as_bytes()).await;
    assert_eq!(got, a.http_addr.to_string());

    epp.shutdown().await;
    for r in [a, b, c] {
        r.shutdown(Duration::from_secs(1)).await;
    }
}
