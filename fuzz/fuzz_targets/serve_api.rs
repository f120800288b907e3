//! Fuzzes the decode server's HTTP API (`serve::api::router`) in process: arbitrary bodies to
//! `/v1/completions`, `/v1/chat/completions`, `/tokenize` and `/detokenize` go through the real
//! handlers (JSON decoding, model check, tokenisation, parameter validation, generation on the
//! sim backend, JSON and SSE encoding). The first input byte picks the endpoint; the rest is the
//! body. Every response must be a documented status with a well-formed body: OpenAI error JSON
//! for errors, JSON for non-streaming success, `data:` events ending in `[DONE]` for streams.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::Router;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use switchyard::serve::api::{router, AppState};
use switchyard::serve::approx_codec::ApproxCodec;
use switchyard::serve::backend::sim::{profile, SimBackend, SimOptions};
use switchyard::serve::engine::{spawn, EngineConfig};
use switchyard::serve::metrics::ServeMetrics;
use tower::ServiceExt as _;

const PATHS: [&str; 4] = [
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
];
/// Small, so generated outputs (bounded by the context) stay cheap per input.
const MAX_MODEL_LEN: usize = 96;
const MAX_BODY: usize = 64 << 10;

struct Server {
    rt: tokio::runtime::Runtime,
    app: Router,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let metrics = Arc::new(ServeMetrics::new("m"));
        let config = EngineConfig {
            model_name: "m".into(),
            block_size: 16,
            max_num_seqs: 8,
            max_num_batched_tokens: 256,
            max_model_len: MAX_MODEL_LEN,
            max_waiting: 64,
            enable_prefix_caching: true,
            num_blocks_override: Some(64),
            gpu_memory_utilization: 0.9,
            seed: 0,
            latency_scale: 1.0,
            eos_token_ids: vec![151_645, 151_643],
        };
        let backend = SimBackend::new(
            profile("l4-qwen2.5-7b").unwrap(),
            SimOptions {
                block_size: 16,
                gpu_memory_utilization: 0.9,
                time_scale: 0.0,
                seed: 1,
            },
        );
        let engine = spawn(config, Box::new(backend), Arc::clone(&metrics), None).unwrap();
        let state = Arc::new(AppState {
            engine,
            codec: Arc::new(ApproxCodec::new(151_643)),
            metrics,
            served_model_names: vec!["m".into(), "alias".into()],
            max_body_bytes: MAX_BODY,
            created: 0,
            limits: Default::default(),
            preprocess: Arc::new(tokio::sync::Semaphore::new(2)),
        });
        Server {
            rt,
            app: router(state),
        }
    })
}

fn check_error(status: u16, body: &[u8]) {
    let v: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "{status} body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    });
    let err = &v["error"];
    assert!(err["message"].is_string(), "{v}");
    assert!(err["type"].is_string(), "{v}");
    assert_eq!(err["code"], status, "{v}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let path = PATHS[selector as usize % PATHS.len()];
    let s = server();
    let req = http::Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
        .unwrap();
    let (status, content_type, bytes) = s.rt.block_on(async {
        let resp = s.app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
            .await
            .unwrap();
        (status, ct, bytes)
    });
    match status {
        200 if content_type.starts_with("text/event-stream") => {
            let text = std::str::from_utf8(&bytes).expect("SSE body is UTF-8");
            assert!(text.ends_with("data: [DONE]\n\n"), "{text:?}");
            for event in text.split("\n\n").filter(|e| !e.is_empty()) {
                let data = event
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("bad event {event:?}"));
                if data != "[DONE]" {
                    let v: Value = serde_json::from_str(data)
                        .unwrap_or_else(|e| panic!("bad event JSON ({e}): {data:?}"));
                    // An error mid-stream is an error object; otherwise a chunk.
                    assert!(
                        v.get("error").is_some() || v.get("choices").is_some(),
                        "{v}"
                    );
                }
            }
        }
        200 => {
            let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "200 body is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&bytes)
                )
            });
            if path.starts_with("/v1/") {
                let usage = &v["usage"];
                let p = usage["prompt_tokens"].as_u64().expect("prompt_tokens");
                let c = usage["completion_tokens"]
                    .as_u64()
                    .expect("completion_tokens");
                assert_eq!(usage["total_tokens"].as_u64(), Some(p + c), "{v}");
                assert!(p + c <= MAX_MODEL_LEN as u64, "{v}");
            }
        }
        // 503: the engine's waiting queue is full (possible only under concurrency).
        400 | 404 | 413 | 503 => check_error(status, &bytes),
        other => panic!(
            "unexpected status {other} for {path}: {:?}",
            String::from_utf8_lossy(&bytes)
        ),
    }
});
