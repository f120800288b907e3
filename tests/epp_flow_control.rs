//! Flow control (`featureGates: [flowControl]`) over a real gRPC ext_proc connection to an
//! in-process `switchyard epp`, with two mock model servers serving real vLLM Prometheus text:
//! requests wait while the pool is saturated, are rejected at capacity with the reference's
//! 429, leave the queue when their stream closes, are bound to the endpoint that is best when
//! they leave (not when they arrived), and time out with the reference's 429.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request as Msg, processing_response::Response as Reply, HttpBody,
    HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use support::{InProcessEpp, MockModelServer, TestEpp};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// Queue scorer only (the pick follows the scraped queues), flow control on, one sheddable
/// request allowed to wait.
fn config(ttl: &str) -> String {
    format!(
        r#"apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
flowControl:
  defaultRequestTTL: {ttl}
  priorityBands:
  - priority: -1
    maxRequests: 1
"#
    )
}

struct Stack {
    pods: Vec<MockModelServer>,
    epp: TestEpp,
}

impl Stack {
    /// Two pods with these waiting queues, scraped, behind an EPP with `config(ttl)`.
    async fn start(queues: [u32; 2], ttl: &str) -> Stack {
        let ips: Vec<IpAddr> = (1..=2)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
            .collect();
        let pods = MockModelServer::start_group(&ips, "P").await.unwrap();
        let mut yaml = String::from("endpoints:\n");
        for p in &pods {
            yaml.push_str(&format!("- address: {}\n", p.addr));
        }
        yaml.push_str(
            "objectives:\n- {name: critical, priority: 2}\n- {name: batch, priority: -1}\n",
        );
        let epp = InProcessEpp::endpoints_file(yaml)
            .config(config(ttl))
            .flags(&["--secure-serving=false", "--pool-name", "pool"])
            .start()
            .await;
        let stack = Stack { pods, epp };
        stack.set_queues(queues).await;
        stack
    }

    /// Serves these waiting queues and waits until the EPP has scraped them.
    async fn set_queues(&self, queues: [u32; 2]) {
        for (p, q) in self.pods.iter().zip(queues) {
            p.set_metrics(q, 0, 0.0);
        }
        self.epp
            .wait_until_scraped(&queues, |m| m.waiting_queue_size)
            .await;
    }

    fn addr(&self, i: usize) -> String {
        self.pods[i].addr.to_string()
    }

    async fn metrics(&self) -> String {
        self.epp.metrics_text().await
    }

    /// Polls `/metrics` until it contains `line`.
    async fn wait_metric(&self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = self.metrics().await;
            if text.contains(line) {
                return;
            }
            assert!(Instant::now() < deadline, "no {line:?} in\n{text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Opens a stream and sends one completion request with this objective; the stream stays
    /// open (the sender is kept) until the returned handle is dropped.
    async fn send(&self, objective: &str) -> Open {
        let mut client = ExternalProcessorClient::connect(format!("http://{}", self.epp.grpc_addr))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(4);
        let header = |k: &str, v: &str| HeaderValue {
            key: k.into(),
            value: String::new(),
            raw_value: v.as_bytes().to_vec(),
        };
        let headers = vec![
            header(":method", "POST"),
            header(":path", "/v1/completions"),
            header("x-gateway-inference-objective", objective),
        ];
        tx.send(ProcessingRequest {
            request: Some(Msg::RequestHeaders(HttpHeaders {
                headers: Some(HeaderMap { headers }),
                end_of_stream: false,
                ..Default::default()
            })),
            ..Default::default()
        })
        .await
        .unwrap();
        tx.send(ProcessingRequest {
            request: Some(Msg::RequestBody(HttpBody {
                body: br#"{"model":"m","prompt":"hello","max_tokens":4}"#.to_vec(),
                end_of_stream: true,
                ..Default::default()
            })),
            ..Default::default()
        })
        .await
        .unwrap();
        let replies = client
            .process(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Open { _tx: tx, replies }
    }
}

struct Open {
    _tx: mpsc::Sender<ProcessingRequest>,
    replies: Streaming<ProcessingResponse>,
}

impl Open {
    /// The first reply within `wait`, if any.
    async fn reply_within(&mut self, wait: Duration) -> Option<ProcessingResponse> {
        match tokio::time::timeout(wait, self.replies.message()).await {
            Ok(Ok(r)) => r,
            Ok(Err(status)) => panic!("stream failed: {status:?}"),
            Err(_) => None,
        }
    }
}

fn destination(r: &ProcessingResponse) -> String {
    let Some(Reply::RequestHeaders(h)) = &r.response else {
        panic!("expected the routed header reply, got {r:?}");
    };
    h.response
        .as_ref()
        .and_then(|c| c.header_mutation.as_ref())
        .and_then(|m| {
            m.set_headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == "x-gateway-destination-endpoint")
        })
        .map(|h| String::from_utf8(h.raw_value.clone()).unwrap())
        .unwrap()
}

/// (status, body, dropped-reason header) of an error reply.
fn immediate(r: &ProcessingResponse) -> (i32, String, String) {
    let Some(Reply::ImmediateResponse(i)) = &r.response else {
        panic!("expected an immediate response, got {r:?}");
    };
    let reason = i
        .headers
        .as_ref()
        .and_then(|m| m.set_headers.first())
        .and_then(|h| h.header.as_ref())
        .map(|h| format!("{}: {}", h.key, String::from_utf8_lossy(&h.raw_value)))
        .unwrap_or_default();
    (
        i.status.unwrap().code,
        String::from_utf8(i.body.clone()).unwrap(),
        reason,
    )
}

fn queue_size(priority: i32, value: u32) -> String {
    format!(
        "inference_extension_flow_control_queue_size{{fairness_id=\"default-flow\",priority=\"{priority}\",inference_pool=\"pool\",model_name=\"other\",target_model_name=\"other\"}} {value}"
    )
}

#[tokio::test]
async fn saturated_pool_queues_rejects_cancels_and_binds_late() {
    // Both pods at 10 waiting: saturation (10/5 + 10/5) / 2 = 2.
    let s = Stack::start([10, 10], "60s").await;

    let mut critical = s.send("critical").await;
    let batch = s.send("batch").await;
    assert!(critical
        .reply_within(Duration::from_millis(300))
        .await
        .is_none());
    s.wait_metric(&queue_size(2, 1)).await;
    s.wait_metric(&queue_size(-1, 1)).await;

    // The sheddable band holds one request: the next is refused at once.
    let mut refused = s.send("batch").await;
    let r = refused.reply_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        immediate(&r),
        (
            429,
            "inference error: ResourceExhausted - request rejected pre-queue: queue at capacity"
                .to_string(),
            "x-llm-d-request-dropped-reason: rejected-saturated".to_string()
        )
    );

    // Its client goes away: the place is free again (no dispatch needed).
    drop(batch);
    s.wait_metric(&queue_size(-1, 0)).await;
    s.wait_metric("llm_d_epp_flow_control_requests_total{outcome=\"EvictedContextCancelled\",priority=\"-1\",inference_pool=\"pool\"} 1").await;
    let mut batch2 = s.send("batch").await;
    assert!(batch2
        .reply_within(Duration::from_millis(300))
        .await
        .is_none());
    s.wait_metric(&queue_size(-1, 1)).await;

    // Room appears: the pod that was as loaded as the other at arrival is now idle, while the
    // other is busier than before (the pool mean, (12/5 + 0/5) / 2 = 1.2, would still hold
    // the queue; one endpoint with room is enough). The critical request goes there, chosen
    // now.
    s.set_queues([12, 0]).await;
    let r = critical.reply_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!(destination(&r), s.addr(1));
    let r = batch2.reply_within(Duration::from_secs(5)).await.unwrap();
    assert!(
        matches!(r.response, Some(Reply::RequestHeaders(_))),
        "{r:?}"
    );
    s.wait_metric(&queue_size(2, 0)).await;
    let text = s.metrics().await;
    for line in [
        "llm_d_epp_flow_control_requests_total{outcome=\"Dispatched\",priority=\"2\",inference_pool=\"pool\"} 1",
        "llm_d_epp_flow_control_requests_total{outcome=\"Dispatched\",priority=\"-1\",inference_pool=\"pool\"} 1",
        "llm_d_epp_flow_control_requests_total{outcome=\"RejectedCapacity\",priority=\"-1\",inference_pool=\"pool\"} 1",
        "inference_extension_flow_control_request_queue_duration_seconds_count{fairness_id=\"default-flow\",priority=\"2\",outcome=\"Dispatched\",inference_pool=\"pool\",model_name=\"other\",target_model_name=\"other\"} 1",
    ] {
        assert!(text.contains(line), "no {line:?} in\n{text}");
    }
    // Real Prometheus tooling accepts the page with the flow-control families on it.
    match support::tools::promtool() {
        Some(promtool) => {
            // Exit 3 is lint only. The one lint allowed is upstream's own naming: promtool
            // reads the `d` of `llm_d_epp_` as the abbreviated unit "days".
            let (code, report) = support::tools::promtool_check(&promtool, &text);
            let upstream_lint_only = report.lines().filter(|l| !l.is_empty()).all(|l| {
                l.starts_with("llm_d_epp_flow_control_")
                    && l.ends_with("metric names should not contain abbreviated units")
            });
            assert!(
                code == 0 || (code == 3 && upstream_lint_only),
                "promtool exit {code}: {report}"
            );
        }
        None => support::tools::missing_dependency(
            "promtool not found for the promtool part (run scripts/install-test-deps.sh)",
        ),
    }
}

#[tokio::test]
async fn a_request_that_waits_past_its_ttl_gets_the_reference_429() {
    let s = Stack::start([10, 10], "400ms").await;
    let started = Instant::now();
    let mut waiting = s.send("critical").await;
    let r = waiting.reply_within(Duration::from_secs(5)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(
        immediate(&r),
        (
            429,
            "inference error: ResourceExhausted - request timed out in queue: request evicted from queue: request TTL expired".to_string(),
            "x-llm-d-request-dropped-reason: rejected-ttl-expired".to_string()
        )
    );
    s.wait_metric("llm_d_epp_flow_control_requests_total{outcome=\"EvictedTTL\",priority=\"2\",inference_pool=\"pool\"} 1").await;
}
