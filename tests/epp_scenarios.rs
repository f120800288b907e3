//! The reference EPP's integration scenarios (REFERENCE.md §5), driven as raw ProcessingRequest
//! sequences over a real gRPC connection to an in-process `switchyard epp`, with three mock
//! model servers on 127.0.0.1/2/3 (same port) serving real vLLM Prometheus text. The reference's
//! pods 192.168.1.{1,2,3}:8000 are 127.0.0.{1,2,3}:PORT here.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation::Mutation, processing_request::Request as Msg,
    processing_response::Response as Reply, CommonResponse, HttpBody, HttpHeaders, HttpTrailers,
    ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
};
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
use support::{InProcessEpp, MockModelServer, TestEpp};
use switchyard::epp::server::RunningEpp;

/// All scorers at weight 1 plus LoRA affinity, as the reference's integration tests configure.
const TEST_CONFIG: &str = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: lora-affinity-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: lora-affinity-scorer
  - pluginRef: prefix-cache-scorer
"#;

struct Pods {
    servers: Vec<MockModelServer>,
    port: u16,
}

impl Pods {
    async fn start() -> Pods {
        let ips: Vec<IpAddr> = (1..=3)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
            .collect();
        let servers = MockModelServer::start_group(&ips, "P").await.unwrap();
        let port = servers[0].addr.port();
        Pods { servers, port }
    }

    fn addr(&self, i: usize) -> String {
        format!("127.0.0.{}:{}", i + 1, self.port)
    }

    /// (queue, kv, running LoRA adapters) per pod.
    fn set(&self, pods: &[(u32, f64, &[&str])]) {
        for (server, (q, kv, lora)) in self.servers.iter().zip(pods) {
            server.set_metrics(*q, 0, *kv);
            if !lora.is_empty() {
                server.set_lora(2, lora, &[]);
            }
        }
    }
}

/// The pool file's YAML: the first `count` pods plus the reference tests' objectives and model
/// rewrite.
fn pool_yaml(pods: &Pods, count: usize) -> String {
    let mut yaml = String::from("endpoints:\n");
    for i in 0..count {
        yaml.push_str(&format!("- address: {}\n", pods.addr(i)));
    }
    if count == 0 {
        yaml = "endpoints: []\n".to_string();
    }
    yaml.push_str(
        "objectives:\n- {name: sql-lora, priority: 2}\n- {name: sql-lora-sheddable, priority: 0}\n\
         - {name: sql-lora-shed, priority: -1}\n- {name: my-model, priority: 2}\n- {name: direct-model, priority: 2}\n\
         modelRewrites:\n- model: model-to-be-rewritten\n  targets: [{model: rewritten-model, weight: 1}]\n",
    );
    yaml
}

async fn start_epp(pool_yaml: String, extra: &[&str]) -> TestEpp {
    InProcessEpp::endpoints_file(pool_yaml)
        .config(TEST_CONFIG)
        .flags(&[
            "--secure-serving=false",
            "--pool-name",
            "pool",
            "--refresh-prometheus-metrics-interval",
            "50ms",
        ])
        .flags(extra)
        .start()
        .await
}

/// Three pods with these (queue, kv, LoRA) metrics, an EPP in front of them (extra flags), and
/// the pods' metrics already scraped.
async fn stack(metrics: &[(u32, f64, &[&str])], extra: &[&str]) -> (Pods, TestEpp) {
    let pods = Pods::start().await;
    pods.set(metrics);
    let epp = start_epp(pool_yaml(&pods, 3), extra).await;
    let want: Vec<(u32, f64)> = metrics.iter().map(|(q, kv, _)| (*q, *kv)).collect();
    wait_scraped(&epp, &want).await;
    (pods, epp)
}

/// Waits until every endpoint's scraped (queue, kv) is what the pods serve.
async fn wait_scraped(epp: &TestEpp, want: &[(u32, f64)]) {
    epp.wait_until_scraped(want, |m| (m.waiting_queue_size, m.kv_cache_usage))
        .await;
}

fn header(k: &str, v: &str) -> HeaderValue {
    HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.as_bytes().to_vec(),
    }
}

fn headers_msg(path: &str, extra: &[(&str, &str)], eos: bool) -> ProcessingRequest {
    let mut headers = vec![
        header(":method", "POST"),
        header(":path", path),
        header("hi", "mom"),
        header("x-request-id", "test-request-id"),
    ];
    headers.extend(extra.iter().map(|(k, v)| header(k, v)));
    ProcessingRequest {
        request: Some(Msg::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap { headers }),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn body_msg(body: &[u8], eos: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Msg::RequestBody(HttpBody {
            body: body.to_vec(),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn standard_body(model: &str, prompt: &str) -> Vec<u8> {
    format!(r#"{{"max_tokens":100,"model":"{model}","prompt":"{prompt}","temperature":0}}"#)
        .into_bytes()
}

/// Sends `msgs`, half-closes, and reads every reply until the EPP ends the stream. Fails if
/// fewer than `expect` replies arrive.
async fn exchange(
    epp: &RunningEpp,
    msgs: Vec<ProcessingRequest>,
    expect: usize,
) -> Vec<ProcessingResponse> {
    let mut client = ExternalProcessorClient::connect(format!("http://{}", epp.grpc_addr))
        .await
        .unwrap();
    let outbound = tokio_stream::iter(msgs);
    let mut stream = client.process(outbound).await.unwrap().into_inner();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
            Ok(Ok(Some(r))) => out.push(r),
            Ok(_) => break,
            Err(_) => panic!("timed out after {} replies; got {out:?}", out.len()),
        }
    }
    assert!(
        out.len() >= expect,
        "expected {expect} replies, got {out:?}"
    );
    out
}

fn common(r: &ProcessingResponse) -> &CommonResponse {
    match r.response.as_ref().unwrap() {
        Reply::RequestHeaders(h) | Reply::ResponseHeaders(h) => h.response.as_ref().unwrap(),
        Reply::RequestBody(b) | Reply::ResponseBody(b) => b.response.as_ref().unwrap(),
        other => panic!("not a common response: {other:?}"),
    }
}

fn set_headers(r: &ProcessingResponse) -> Vec<(String, String)> {
    common(r)
        .header_mutation
        .as_ref()
        .map(|m| {
            m.set_headers
                .iter()
                .map(|h| {
                    let h = h.header.as_ref().unwrap();
                    (
                        h.key.clone(),
                        String::from_utf8(h.raw_value.clone()).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn destination(r: &ProcessingResponse) -> String {
    let hs = set_headers(r);
    let header = hs
        .iter()
        .find(|(k, _)| k == "x-gateway-destination-endpoint")
        .map(|(_, v)| v.clone())
        .unwrap();
    let md = r
        .dynamic_metadata
        .as_ref()
        .unwrap()
        .fields
        .get("envoy.lb")
        .unwrap();
    let Some(Kind::StructValue(s)) = &md.kind else {
        panic!("metadata")
    };
    let Some(Kind::StringValue(v)) = &s.fields.get("x-gateway-destination-endpoint").unwrap().kind
    else {
        panic!()
    };
    assert_eq!(&header, v, "header and metadata must carry the same value");
    header
}

fn streamed(r: &ProcessingResponse) -> (Vec<u8>, bool) {
    match &common(r).body_mutation.as_ref().unwrap().mutation {
        Some(Mutation::StreamedResponse(s)) => (s.body.clone(), s.end_of_stream),
        other => panic!("expected a streamed body, got {other:?}"),
    }
}

fn immediate(r: &ProcessingResponse) -> (i32, String) {
    match r.response.as_ref().unwrap() {
        Reply::ImmediateResponse(i) => (
            i.status.unwrap().code,
            String::from_utf8(i.body.clone()).unwrap(),
        ),
        other => panic!("expected an immediate response, got {other:?}"),
    }
}

/// Routes the standard request and returns (destination, replies).
async fn route(
    epp: &RunningEpp,
    model: &str,
    objective: &str,
) -> (String, Vec<ProcessingResponse>) {
    let body = standard_body(model, "test1");
    let replies = exchange(
        epp,
        vec![
            headers_msg(
                "/v1/completions",
                &[("x-gateway-inference-objective", objective)],
                false,
            ),
            body_msg(&body, true),
        ],
        2,
    )
    .await;
    (destination(&replies[0]), replies)
}

#[tokio::test]
async fn lower_queue_and_kv_wins_with_exact_reply_and_metrics() {
    let (pods, epp) = stack(&[(3, 0.2, &[]), (0, 0.1, &[]), (10, 0.2, &[])], &[]).await;

    let body = standard_body("my-model", "test1");
    let replies = exchange(
        &epp,
        vec![
            headers_msg(
                "/v1/completions",
                &[("x-gateway-inference-objective", "my-model")],
                false,
            ),
            body_msg(&body, true),
        ],
        2,
    )
    .await;
    assert_eq!(replies.len(), 2);
    assert!(common(&replies[0]).clear_route_cache);
    assert_eq!(
        set_headers(&replies[0]),
        vec![
            ("x-gateway-destination-endpoint".to_string(), pods.addr(1)),
            ("Content-Length".to_string(), body.len().to_string()),
            ("hi".to_string(), "mom".to_string()),
            ("x-request-id".to_string(), "test-request-id".to_string()),
        ]
    );
    assert_eq!(destination(&replies[0]), pods.addr(1));
    assert_eq!(streamed(&replies[1]), (body.clone(), true));

    let text = epp.metrics_text().await;
    assert!(
        text.contains(r#"inference_objective_request_total{model_name="my-model",target_model_name="my-model",priority="2"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"inference_pool_ready_pods{name="pool"} 3"#),
        "{text}"
    );
    epp.shutdown().await;
}

#[tokio::test]
async fn lora_affinity_scenarios() {
    let pods = Pods::start().await;
    let epp = start_epp(pool_yaml(&pods, 3), &[]).await;

    // Active LoRA, low queue.
    pods.set(&[
        (0, 0.2, &["foo", "bar"]),
        (0, 0.1, &["foo", "sql-lora-1fdg2"]),
        (10, 0.2, &["foo", "bar"]),
    ]);
    wait_scraped(&epp, &[(0, 0.2), (0, 0.1), (10, 0.2)]).await;
    assert_eq!(
        route(&epp, "sql-lora-1fdg2", "sql-lora").await.0,
        pods.addr(1)
    );

    // Active LoRA despite higher KV usage.
    pods.set(&[
        (10, 0.2, &["foo", "bar"]),
        (10, 0.4, &["foo", "sql-lora-1fdg2"]),
        (10, 0.3, &["foo", "bar"]),
    ]);
    wait_scraped(&epp, &[(10, 0.2), (10, 0.4), (10, 0.3)]).await;
    assert_eq!(
        route(&epp, "sql-lora-1fdg2", "sql-lora").await.0,
        pods.addr(1)
    );
    epp.shutdown().await;
}

#[tokio::test]
async fn saturated_pool_sheds_only_negative_priority() {
    let (pods, epp) = stack(
        &[
            (6, 0.2, &["sql-lora-1fdg2"]),
            (0, 0.85, &[]),
            (10, 0.9, &[]),
        ],
        &[],
    )
    .await;

    // Priority 0 is not shed even though the pool is saturated; P0 wins with 2.2 vs 1.15 vs 0.1.
    assert_eq!(
        route(&epp, "sql-lora-1fdg2", "sql-lora-sheddable").await.0,
        pods.addr(0)
    );

    let body = standard_body("sql-lora-1fdg2", "test1");
    let replies = exchange(
        &epp,
        vec![
            headers_msg(
                "/v1/completions",
                &[("x-gateway-inference-objective", "sql-lora-shed")],
                false,
            ),
            body_msg(&body, true),
        ],
        1,
    )
    .await;
    assert_eq!(
        immediate(&replies[0]),
        (
            429,
            "inference error: ResourceExhausted - system saturated, sheddable request dropped"
                .to_string()
        )
    );
    let text = epp.metrics_text().await;
    assert!(
        text.contains(r#"inference_objective_request_error_total{model_name="sql-lora-1fdg2",target_model_name="sql-lora-1fdg2",error_code="ResourceExhausted"} 1"#),
        "{text}"
    );
    epp.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_reference_errors() {
    let (_pods, epp) = stack(
        &[(0, 0.1, &[]), (0, 0.1, &[]), (0, 0.1, &[])],
        &["--max-body-bytes", "1000"],
    )
    .await;

    let replies = exchange(
        &epp,
        vec![
            headers_msg("/v1/completions", &[], false),
            body_msg(b"no healthy upstream", true),
        ],
        1,
    )
    .await;
    let (status, text) = immediate(&replies[0]);
    assert_eq!(status, 400);
    // serde_json's description of the first bad byte, after the reference's prefix.
    assert_eq!(
        text,
        "inference error: BadRequest - expected ident at line 1 column 2"
    );

    let replies = exchange(
        &epp,
        vec![
            headers_msg("/v1/completions", &[], false),
            body_msg(br#"{"prompt":"hello world"}"#, true),
        ],
        1,
    )
    .await;
    assert_eq!(
        immediate(&replies[0]),
        (
            400,
            "inference error: BadRequest - model not found in request body".to_string()
        )
    );

    let big = standard_body("m", &"x".repeat(2000));
    let replies = exchange(
        &epp,
        vec![
            headers_msg("/v1/completions", &[], false),
            body_msg(&big, true),
        ],
        1,
    )
    .await;
    let (status, text) = immediate(&replies[0]);
    assert_eq!(status, 413);
    assert_eq!(text, "inference error: PayloadTooLarge - request body exceeds the limit of 1000 bytes (--max-body-bytes)");
    epp.shutdown().await;
}

#[tokio::test]
async fn header_only_requests() {
    let pods = Pods::start().await;
    let epp = start_epp(pool_yaml(&pods, 0), &[]).await;
    let replies = exchange(&epp, vec![headers_msg("/v1/models", &[], true)], 1).await;
    assert_eq!(
        immediate(&replies[0]),
        (
            500,
            "inference error: Internal - no pods available in datastore".to_string()
        )
    );
    epp.shutdown().await;

    pods.set(&[(5, 0.5, &[]), (0, 0.1, &[]), (5, 0.5, &[])]);
    let epp = start_epp(pool_yaml(&pods, 3), &[]).await;
    wait_scraped(&epp, &[(5, 0.5), (0, 0.1), (5, 0.5)]).await;
    let replies = exchange(&epp, vec![headers_msg("/v1/models", &[], true)], 1).await;
    assert_eq!(destination(&replies[0]), pods.addr(1));
    assert!(!set_headers(&replies[0])
        .iter()
        .any(|(k, _)| k == "Content-Length"));
    epp.shutdown().await;
}

#[tokio::test]
async fn body_split_in_chunks_and_repeated_last_chunk() {
    let (pods, epp) = stack(&[(3, 0.2, &[]), (0, 0.1, &[]), (10, 0.2, &[])], &[]).await;

    let body = standard_body("my-model", "test2");
    let (a, b) = body.split_at(20);
    let replies = exchange(
        &epp,
        vec![
            headers_msg("/v1/completions", &[], false),
            body_msg(a, false),
            body_msg(b, true),
            // Envoy may repeat the last chunk of large bodies after end_of_stream: ignored.
            body_msg(b, true),
        ],
        2,
    )
    .await;
    assert_eq!(
        replies.len(),
        2,
        "a repeated chunk must not produce replies: {replies:?}"
    );
    assert_eq!(destination(&replies[0]), pods.addr(1));
    assert_eq!(streamed(&replies[1]), (body, true));
    epp.shutdown().await;
}

#[tokio::test]
async fn large_body_comes_back_in_62000_byte_chunks() {
    let (_pods, epp) = stack(&[(0, 0.1, &[]), (0, 0.1, &[]), (0, 0.1, &[])], &[]).await;
    let body = standard_body("m", &"y".repeat(150_000));
    let replies = exchange(
        &epp,
        vec![
            headers_msg("/v1/completions", &[], false),
            body_msg(&body, true),
        ],
        4,
    )
    .await;
    assert_eq!(replies.len(), 4);
    let sizes: Vec<(usize, bool)> = replies[1..]
        .iter()
        .map(|r| {
            let (b, e) = streamed(r);
            (b.len(), e)
        })
        .collect();
    assert_eq!(
        sizes,
        vec![
            (62_000, false),
            (62_000, false),
            (body.len() - 124_000, true)
        ]
    );
    let joined: Vec<u8> = replies[1..].iter().flat_map(|r| streamed(r).0).collect();
    assert_eq!(joined, body);
    epp.shutdown().await;
}

fn subset_metadata(value: Kind) -> Metadata {
    let inner = Struct {
        fields: [(
            "x-gateway-destination-endpoint-subset".to_string(),
            Value { kind: Some(value) },
        )]
        .into_iter()
        .collect(),
    };
    Metadata {
        filter_metadata: [("envoy.lb.subset_hint".to_string(), inner)]
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn subset_hints_list_string_and_no_match() {
    let (pods, epp) = stack(&[(3, 0.2, &[]), (0, 0.1, &[]), (10, 0.2, &[])], &[]).await;
    let body = standard_body("my-model", "test1");
    let with_subset = |kind: Kind| {
        let mut h = headers_msg("/v1/completions", &[], false);
        h.metadata_context = Some(subset_metadata(kind));
        vec![h, body_msg(&body, true)]
    };
    let list = |items: Vec<String>| {
        Kind::ListValue(ListValue {
            values: items
                .into_iter()
                .map(|s| Value {
                    kind: Some(Kind::StringValue(s)),
                })
                .collect(),
        })
    };

    let r = exchange(
        &epp,
        with_subset(list(vec![pods.addr(0), pods.addr(1), pods.addr(2)])),
        2,
    )
    .await;
    assert_eq!(destination(&r[0]), pods.addr(1));
    let r = exchange(&epp, with_subset(list(vec![pods.addr(2)])), 2).await;
    assert_eq!(destination(&r[0]), pods.addr(2));
    // Comma-separated string; a bare IP matches every port of that IP.
    let r = exchange(
        &epp,
        with_subset(Kind::StringValue("127.0.0.1, 127.0.0.3".into())),
        2,
    )
    .await;
    assert_eq!(destination(&r[0]), pods.addr(0));
    let r = exchange(&epp, with_subset(list(vec!["127.0.0.99:8000".into()])), 1).await;
    assert_eq!(
        immediate(&r[0]),
        (503, "inference error: ServiceUnavailable - failed to find endpoint candidates for serving the request".to_string())
    );
    // Admission looks at the subset: an empty subset is saturated, so a sheddable request is shed.
    let mut h = headers_msg(
        "/v1/completions",
        &[("x-gateway-inference-objective", "sql-lora-shed")],
        false,
    );
    h.metadata_context = Some(subset_metadata(list(vec!["127.0.0.99:8000".into()])));
    let r = exchange(&epp, vec![h, body_msg(&body, true)], 1).await;
    assert_eq!(immediate(&r[0]).0, 429);
    epp.shutdown().await;
}

#[tokio::test]
async fn model_rewrite_changes_only_the_model() {
    let (_pods, epp) = stack(&[(0, 0.1, &[]), (0, 0.1, &[]), (0, 0.1, &[])], &[]).await;
    let body = standard_body("model-to-be-rewritten", "test1");
    let r = exchange(
        &epp,
        vec![
            headers_msg("/v1/completions", &[], false),
            body_msg(&body, true),
        ],
        2,
    )
    .await;
    let expected = standard_body("rewritten-model", "test1");
    assert_eq!(streamed(&r[1]), (expected.clone(), true));
    assert!(
        set_headers(&r[0]).contains(&("Content-Length".to_string(), expected.len().to_string()))
    );

    // The rewrite header wins over the body's model.
    let body = standard_body("direct-model", "test1");
    let r = exchange(
        &epp,
        vec![
            headers_msg(
                "/v1/completions",
                &[("x-gateway-model-name-rewrite", "other-model")],
                false,
            ),
            body_msg(&body, true),
        ],
        2,
    )
    .await;
    assert_eq!(streamed(&r[1]).0, standard_body("other-model", "test1"));
    assert!(!set_headers(&r[0])
        .iter()
        .any(|(k, _)| k == "x-gateway-model-name-rewrite"));
    epp.shutdown().await;
}

fn response_headers(content_type: &str) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Msg::ResponseHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    header(":status", "200"),
                    header("content-type", content_type),
                ],
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn response_body(body: &[u8], eos: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Msg::ResponseBody(HttpBody {
            body: body.to_vec(),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[tokio::test]
async fn response_path_json_buffering_invalid_json_and_sse_usage() {
    let (_pods, epp) = stack(&[(0, 0.1, &[]), (0, 0.1, &[]), (0, 0.1, &[])], &[]).await;
    let req = standard_body("my-model", "test1");

    // Buffered JSON response in two chunks → one joined chunk with end_of_stream.
    let json = br#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
    let (a, b) = json.split_at(10);
    let r = exchange(
        &epp,
        vec![
            headers_msg("/v1/completions", &[], false),
            body_msg(&req, true),
            response_headers("application/json"),
            response_body(a, false),
            response_body(b, true),
        ],
        4,
    )
    .await;
    assert_eq!(
        set_headers(&r[2]),
        vec![("x-went-into-resp-headers".to_string(), "true".to_string())]
    );
    assert_eq!(streamed(&r[3]), (json.to_vec(), true));

    // Invalid JSON passes through unchanged.
    let r = exchange(
        &epp,
        vec![
            headers_msg("/v1/completions", &[], false),
            body_msg(&req, true),
            response_headers("application/json"),
            response_body(b"not json {", true),
        ],
        4,
    )
    .await;
    assert_eq!(streamed(&r[3]), (b"not json {".to_vec(), true));

    // SSE: every chunk passed through at once; usage parsed.
    let chunks: [&[u8]; 3] = [
        b"data: {\"choices\":[{\"text\":\"hi\"}]}\n\n",
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":1}}\n\n",
        b"data: [DONE]\n\n",
    ];
    let mut msgs = vec![
        headers_msg("/v1/completions", &[], false),
        body_msg(&req, true),
        response_headers("text/event-stream"),
    ];
    msgs.extend(
        chunks
            .iter()
            .enumerate()
            .map(|(i, c)| response_body(c, i == 2)),
    );
    let r = exchange(&epp, msgs, 6).await;
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(streamed(&r[3 + i]), (c.to_vec(), i == 2));
    }
    let text = epp.metrics_text().await;
    assert!(text.contains(r#"inference_objective_input_tokens_sum{model_name="my-model",target_model_name="my-model"} 10.0"#), "{text}");
    assert!(text.contains(r#"inference_objective_input_tokens_count{model_name="my-model",target_model_name="my-model"} 2"#), "{text}");
    epp.shutdown().await;
}

#[tokio::test]
async fn buffered_mode_fallbacks_trailers_and_generated_request_id() {
    let (pods, epp) = stack(
        &[(3, 0.2, &[]), (0, 0.1, &[]), (10, 0.2, &[])],
        &["--fallback-endpoints", "2"],
    )
    .await;
    let body = standard_body("model-to-be-rewritten", "test1");

    // BUFFERED: headers answered at once; the body reply carries the routing mutations.
    let mut h = headers_msg("/v1/completions", &[], false);
    h.protocol_config = Some(ProtocolConfiguration {
        request_body_mode: BodySendMode::Buffered as i32,
        ..Default::default()
    });
    let r = exchange(&epp, vec![h, body_msg(&body, true)], 2).await;
    // "Continue" with no mutation.
    assert!(matches!(&r[0].response, Some(Reply::RequestHeaders(h)) if h.response.is_none()));
    assert!(matches!(r[1].response, Some(Reply::RequestBody(_))));
    assert!(common(&r[1]).clear_route_cache);
    // Primary first, then fallbacks in score order.
    assert_eq!(
        destination(&r[1]),
        format!("{},{},{}", pods.addr(1), pods.addr(0), pods.addr(2))
    );
    match &common(&r[1]).body_mutation.as_ref().unwrap().mutation {
        Some(Mutation::Body(b)) => assert_eq!(b, &standard_body("rewritten-model", "test1")),
        other => panic!("expected a body mutation, got {other:?}"),
    }

    // A request that ends with trailers is routed when they arrive; no x-request-id → generated.
    let mut h = headers_msg("/v1/completions", &[], false);
    if let Some(Msg::RequestHeaders(hh)) = &mut h.request {
        hh.headers
            .as_mut()
            .unwrap()
            .headers
            .retain(|x| x.key != "x-request-id");
    }
    let trailers = ProcessingRequest {
        request: Some(Msg::RequestTrailers(HttpTrailers::default())),
        ..Default::default()
    };
    let body = standard_body("my-model", "t");
    let r = exchange(&epp, vec![h, body_msg(&body, false), trailers], 3).await;
    assert_eq!(streamed(&r[1]), (body, false));
    assert!(matches!(r[2].response, Some(Reply::RequestTrailers(_))));
    let id = set_headers(&r[0])
        .into_iter()
        .find(|(k, _)| k == "x-request-id")
        .unwrap()
        .1;
    assert_eq!(id.len(), 36, "uuid: {id}");
    epp.shutdown().await;
}

#[tokio::test]
async fn broken_stream_releases_running_requests() {
    let (_pods, epp) = stack(&[(0, 0.1, &[]), (0, 0.1, &[]), (0, 0.1, &[])], &[]).await;
    let body = standard_body("my-model", "x");
    // Routed, then the client goes away before the response.
    let r = exchange(
        &epp,
        vec![
            headers_msg("/v1/completions", &[], false),
            body_msg(&body, true),
        ],
        2,
    )
    .await;
    assert_eq!(r.len(), 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = epp.metrics_text().await;
        if text.contains(r#"inference_objective_running_requests{model_name="my-model"} 0"#) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "running requests never released: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    epp.shutdown().await;
}
