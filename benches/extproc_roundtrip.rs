//! Full ext_proc request round trip over loopback gRPC against an in-process EPP: open a stream,
//! send request headers and a completion body, half-close, read every reply until the EPP ends
//! the stream. Four idle endpoints (the zero-latency backend's metrics) so every default scorer
//! runs. Prints p50/p99 of 2,000 sequential round trips first (target: p50 < 200 µs), then the
//! criterion measurement.

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request as Msg, HttpBody, HttpHeaders, ProcessingRequest,
};
use support::InProcessEpp;
use tonic::transport::Channel;

// The integration tests' helpers: the in-process EPP and its wait for the first scrapes.
#[path = "../tests/support/mod.rs"]
mod support;

fn header(k: &str, v: &str) -> HeaderValue {
    HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.as_bytes().to_vec(),
    }
}

fn request(body: &[u8]) -> Vec<ProcessingRequest> {
    let headers = vec![
        header(":method", "POST"),
        header(":path", "/v1/completions"),
        header("content-type", "application/json"),
        header("content-length", &body.len().to_string()),
    ];
    vec![
        ProcessingRequest {
            request: Some(Msg::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap { headers }),
                end_of_stream: false,
                ..Default::default()
            })),
            ..Default::default()
        },
        ProcessingRequest {
            request: Some(Msg::RequestBody(HttpBody {
                body: body.to_vec(),
                end_of_stream: true,
                ..Default::default()
            })),
            ..Default::default()
        },
    ]
}

async fn round_trip(client: &mut ExternalProcessorClient<Channel>, msgs: Vec<ProcessingRequest>) {
    let mut stream = client
        .process(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let mut replies = 0;
    while let Some(_r) = stream.message().await.unwrap() {
        replies += 1;
    }
    assert!(
        replies >= 2,
        "expected header and body replies, got {replies}"
    );
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (mut client, _epp, _backend) = rt.block_on(async {
        let (addrs, tasks) = switchyard::bench::overhead::zero_latency_backend()
            .await
            .unwrap();
        let epp = InProcessEpp::endpoints(addrs)
            .flags(&[
                "--secure-serving=false",
                "--metrics-endpoint-auth=false",
                "--v",
                "0",
            ])
            .start()
            .await;
        // Wait for the first scrape of every endpoint, else the EPP has nothing to pick from.
        epp.wait_until_scraped(&[(); 4], |_| ()).await;
        let client = ExternalProcessorClient::connect(format!("http://{}", epp.grpc_addr))
            .await
            .unwrap();
        (client, epp, tasks)
    });
    let body = serde_json::json!({
        "model": "m",
        "prompt": "You are a helpful assistant. ".repeat(28),
        "max_tokens": 100,
    })
    .to_string()
    .into_bytes();

    // Distribution of single round trips (criterion reports means of batches).
    let mut samples = Vec::with_capacity(2000);
    rt.block_on(async {
        for _ in 0..200 {
            round_trip(&mut client, request(&body)).await;
        }
        for _ in 0..2000 {
            let start = Instant::now();
            round_trip(&mut client, request(&body)).await;
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    });
    samples.sort_by(f64::total_cmp);
    let pct = |q: f64| switchyard::bench::stats::percentile(&samples, q).unwrap();
    println!(
        "extproc round trip (2000 sequential, {} prompt bytes): p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs",
        body.len(),
        pct(50.0),
        pct(90.0),
        pct(99.0)
    );

    c.bench_function("extproc_roundtrip", |b| {
        b.iter(|| rt.block_on(round_trip(&mut client, request(&body))));
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
