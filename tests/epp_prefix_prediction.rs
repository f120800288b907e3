//! Prefix-hit prediction accuracy (`switchyard_prefix_prediction_*`): an in-process EPP with
//! the `precise-prefix-cache-scorer` in front of one sim replica (`switchyard serve`, 12 KV
//! blocks of 16 tokens). The replica's events come over its gRPC stream, which the EPP replays
//! from the first event and whose `ServerInfo.next_sequence` tells the test when the EPP has
//! applied all of them (vLLM's ZMQ format feeds the same index: `precise_prefix_e2e.rs`,
//! `epp_precise_prefix.rs`). Each request is routed through the EPP's
//! ext_proc stream, served by the replica, and its real response goes back through the same
//! stream, so the EPP compares the cached tokens each index predicted with the replica's
//! `usage.prompt_tokens_details.cached_tokens`: a first prompt (nothing cached: both exact), its
//! repeat (7 of its 8 blocks reported, both exact), and the repeat after another prompt evicted
//! it (the replica reports 0; the precise index follows the eviction, the approximate one still
//! predicts 112 tokens).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use serde_json::{json, Value};
use support::ext_proc::{
    destination, request_body, request_headers, response_headers, served_metadata,
};
use support::{HttpClient, InProcessEpp, TestEpp};
use switchyard::serve::{self, ServeArgs, ServerHandle};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// A prompt of `tokens` tokens for the approximate codec (4 bytes each), unique per `tag`.
fn prompt(tag: char, tokens: usize) -> String {
    let mut s = String::with_capacity(tokens * 4);
    for i in 0..tokens {
        s.push(tag);
        s.push_str(&format!("{:03}", i % 1000));
    }
    s
}

fn completion(prompt: &str) -> Value {
    json!({"model": "m", "prompt": prompt, "max_tokens": 1, "temperature": 0})
}

async fn replica() -> ServerHandle {
    let mut args = ServeArgs::sim_for_tests("l4-qwen2.5-7b", 0.001);
    args.served_model_name = vec!["m".into()];
    args.num_gpu_blocks_override = Some(12);
    args.max_model_len = Some(192);
    args.kv_events_port = Some(0);
    serve::start(args).await.unwrap()
}

/// The approximate index's parameters are set (not referenced by the profile, which uses only
/// the precise scorer): its default autoTune would size its LRU by the replica's 12 blocks
/// split over 16 shards, so it would forget most of a prompt by itself.
async fn start_epp(r: &ServerHandle) -> TestEpp {
    let grpc = r
        .kv_events_addr
        .expect("replica serves its KV-event stream");
    let config = format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig: {{ blockSize: 16 }}
    kvEventsConfig:
      endpointSockets:
        \"{}\": \"grpc://{}\"
- type: prefix-cache-scorer
  parameters: {{ autoTune: false, blockSizeTokens: 16, lruCapacityPerServer: 1000 }}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
  - pluginRef: max-score-picker
",
        r.http_addr, grpc
    );
    InProcessEpp::endpoints_file(format!("endpoints:\n- address: {}\n", r.http_addr))
        .config(config)
        .flags(&["--secure-serving=false", "--pool-name", "pool"])
        .start()
        .await
}

/// Serves `body` on the replica directly; returns the response body and its cached tokens.
async fn serve_directly(r: &ServerHandle, body: &Value) -> (Vec<u8>, u64) {
    let resp = HttpClient::new()
        .post_json(
            &format!("http://{}/v1/completions", r.http_addr),
            &[],
            body.to_string(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    let v: Value = serde_json::from_slice(&resp.body).unwrap();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("usage with cached_tokens");
    (resp.body.to_vec(), cached)
}

/// One request as Envoy would carry it: routed through the EPP's ext_proc stream, served by the
/// replica, and its response sent back through the same stream (with `served` as Envoy's
/// served-endpoint metadata when given). Returns the cached tokens the replica reported.
async fn round_trip(epp: SocketAddr, r: &ServerHandle, body: &Value, served: Option<&str>) -> u64 {
    let (tx, rx) = mpsc::channel::<ProcessingRequest>(8);
    let mut client = ExternalProcessorClient::connect(format!("http://{epp}"))
        .await
        .unwrap();
    let send = |m: ProcessingRequest| {
        let tx = tx.clone();
        async move { tx.send(m).await.unwrap() }
    };
    send(request_headers("/v1/completions", &[], false)).await;
    send(request_body(body.to_string().as_bytes(), true)).await;
    let mut stream = client
        .process(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut replies: Vec<ProcessingResponse> = Vec::new();
    while destination(&replies).is_none() {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
        match next {
            Ok(Ok(Some(m))) => replies.push(m),
            other => panic!("no routing reply: {other:?} after {replies:?}"),
        }
    }
    assert_eq!(destination(&replies).unwrap(), r.http_addr.to_string());
    let (response, cached) = serve_directly(r, body).await;
    send(response_headers(served.map(served_metadata))).await;
    send(request_body_as_response(response)).await;
    drop(tx);
    // The EPP ends the stream once the response is complete and our side has closed.
    while let Ok(Ok(Some(_))) =
        tokio::time::timeout(Duration::from_secs(10), stream.message()).await
    {}
    cached
}

/// The response body as one ext_proc message.
fn request_body_as_response(body: Vec<u8>) -> ProcessingRequest {
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
    use envoy_types::pb::envoy::service::ext_proc::v3::HttpBody;
    ProcessingRequest {
        request: Some(Request::ResponseBody(HttpBody {
            body,
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The value of the sample `name` (full sample name with labels) in `text`, 0 when absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The sequence number the replica's KV-event log gives its next event.
async fn next_sequence(r: &ServerHandle) -> u64 {
    use switchyard::serve::kv_events::pb;
    let addr = r
        .kv_events_addr
        .expect("replica serves its KV-event stream");
    let mut client = pb::kv_events_client::KvEventsClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut stream = client
        .subscribe(pb::SubscribeRequest { from_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    match stream.message().await.unwrap().and_then(|m| m.message) {
        Some(pb::subscribe_response::Message::Info(info)) => info.next_sequence,
        other => panic!("expected ServerInfo first, got {other:?}"),
    }
}

/// Waits until the EPP has applied every event the replica has logged (events are numbered
/// from 1; the EPP counts one batch per gRPC event). Asked twice, so an event the engine logs
/// just after a response was sent is waited for too.
async fn settle(epp: &TestEpp, r: &ServerHandle) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let next = next_sequence(r).await;
        loop {
            let got = sample(
                &epp.metrics_text().await,
                "switchyard_kv_events_batches_total",
            );
            if got >= (next - 1) as f64 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the EPP applied {got} of {} KV events",
                next - 1
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if next_sequence(r).await == next {
            return;
        }
    }
}

/// The prediction metrics of one index: [exact, over, under, error sum, error count,
/// predicted tokens, reported tokens].
fn accuracy(text: &str, index: &str) -> [f64; 7] {
    let outcome = |o: &str| {
        sample(
            text,
            &format!(
                "switchyard_prefix_prediction_outcomes_total{{index=\"{index}\",outcome=\"{o}\"}}"
            ),
        )
    };
    let labelled = |name: &str| {
        sample(
            text,
            &format!("switchyard_prefix_prediction_{name}{{index=\"{index}\"}}"),
        )
    };
    [
        outcome("exact"),
        outcome("over"),
        outcome("under"),
        labelled("error_tokens_sum"),
        labelled("error_tokens_count"),
        labelled("predicted_tokens_total"),
        labelled("reported_tokens_total"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precise_index_predicts_cached_tokens_the_approximate_one_misses_evictions() {
    let r = replica().await;
    let epp = start_epp(&r).await;
    let grpc = epp.grpc_addr;

    // The replica's log starts with AllCleared (event 1): once applied, the stream is live.
    settle(&epp, &r).await;

    // P: 128 tokens, 8 blocks. First time: nothing cached, both predict 0.
    let p = completion(&prompt('p', 128));
    assert_eq!(round_trip(grpc, &r, &p, None).await, 0);
    settle(&epp, &r).await;
    assert_eq!(
        sample(&epp.metrics_text().await, "switchyard_kv_events_index_keys"),
        8.0
    );
    // Its repeat: the replica reports 7 blocks (it computes the last token), as both predict.
    assert_eq!(round_trip(grpc, &r, &p, None).await, 112);
    let text = epp.metrics_text().await;
    assert_eq!(
        accuracy(&text, "approximate"),
        [2.0, 0.0, 0.0, 0.0, 2.0, 112.0, 112.0]
    );
    assert_eq!(
        accuracy(&text, "precise"),
        [2.0, 0.0, 0.0, 0.0, 2.0, 112.0, 112.0]
    );

    // Q (180 tokens: 11 full blocks and a partial one, all 12 blocks) evicts P; served directly, so only the
    // replica's events tell the EPP. The index then holds Q's 11 blocks.
    serve_directly(&r, &completion(&prompt('q', 180))).await;
    settle(&epp, &r).await;
    assert_eq!(
        sample(&epp.metrics_text().await, "switchyard_kv_events_index_keys"),
        11.0
    );
    assert_eq!(round_trip(grpc, &r, &p, None).await, 0);
    let text = epp.metrics_text().await;
    // The approximate index still credits the replica with P: over by 112 tokens.
    assert_eq!(
        accuracy(&text, "approximate"),
        [2.0, 1.0, 0.0, 112.0, 3.0, 224.0, 112.0]
    );
    assert_eq!(
        accuracy(&text, "precise"),
        [3.0, 0.0, 0.0, 0.0, 3.0, 112.0, 112.0]
    );

    // A response served by another endpoint (Envoy's fallback) says nothing about the
    // prediction for the primary: not counted.
    round_trip(grpc, &r, &p, Some("10.255.0.1:8000")).await;
    let after = epp.metrics_text().await;
    assert_eq!(
        accuracy(&after, "approximate"),
        accuracy(&text, "approximate")
    );
    assert_eq!(accuracy(&after, "precise"), accuracy(&text, "precise"));

    epp.shutdown().await;
    r.shutdown(Duration::from_secs(1)).await;
}
