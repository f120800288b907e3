//! The EndpointPickerConfig's data layer takes effect: an sglang pool whose pods carry no
//! engine label is scraped over real HTTP on loopback, at the configured path, with sglang's
//! metric names because `defaultEngine: sglang` says so, and routing follows those metrics.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use support::ext_proc::{destination, exchange, request_body, request_headers};
use support::{InProcessEpp, MockModelServer, TestEpp};

fn config(engine: &str) -> String {
    format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: metrics-data-source
  parameters:
    scheme: http
    path: /custom/metrics
- type: core-metrics-extractor
  parameters:
    defaultEngine: {engine}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors:
    - pluginRef: core-metrics-extractor
"
    )
}

/// sglang's exposition (names from sglang's `metrics/collector.py`) with this queue depth.
fn sglang_text(queue: u32, running: u32, usage: f64) -> String {
    format!(
        "# HELP sglang:num_queue_reqs The number of requests in the waiting queue\n\
         # TYPE sglang:num_queue_reqs gauge\n\
         sglang:num_queue_reqs{{model_name=\"m\"}} {queue}.0\n\
         # HELP sglang:num_running_reqs The number of running requests\n\
         # TYPE sglang:num_running_reqs gauge\n\
         sglang:num_running_reqs{{model_name=\"m\"}} {running}.0\n\
         # HELP sglang:token_usage The token usage\n\
         # TYPE sglang:token_usage gauge\n\
         sglang:token_usage{{model_name=\"m\"}} {usage}\n"
    )
}

async fn start_epp(endpoints: &str, config: &str) -> TestEpp {
    InProcessEpp::endpoints([endpoints])
        .config(config)
        .flags(&[
            "--secure-serving=false",
            "--metrics-endpoint-auth=false",
            "--inflight-accounting=false",
        ])
        .start()
        .await
}

#[tokio::test]
async fn sglang_pool_without_labels_scraped_with_default_engine() {
    let ips: Vec<IpAddr> = (1..=2)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
        .collect();
    let pods = MockModelServer::start_group(&ips, "S").await.unwrap();
    let port = pods[0].addr.port();
    pods[0].set_metrics_text(Some(sglang_text(7, 2, 0.5)));
    pods[1].set_metrics_text(Some(sglang_text(1, 3, 0.25)));
    let endpoints = format!("127.0.0.1:{port},127.0.0.2:{port}");

    let epp = start_epp(&endpoints, &config("sglang")).await;
    epp.wait_until_scraped(&[(7, 2, 0.5), (1, 3, 0.25)], |m| {
        (m.waiting_queue_size, m.running_requests, m.kv_cache_usage)
    })
    .await;
    let replies = exchange(
        epp.grpc_addr,
        vec![
            request_headers("/v1/completions", &[], false),
            request_body(br#"{"model":"m","prompt":"hi"}"#, true),
        ],
    )
    .await;
    assert_eq!(destination(&replies), Some(format!("127.0.0.2:{port}")));
    let scrapes = pods[0].metrics_scrapes();
    assert!(scrapes > 0);

    // The same pool read with vLLM's names (the default engine) yields no metrics at all:
    // the engine really comes from the config.
    let vllm = start_epp(&endpoints, &config("vllm")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(vllm
        .datastore
        .snapshot()
        .iter()
        .all(|s| s.metrics.updated_at.is_none()));
    assert!(pods[0].metrics_scrapes() > scrapes, "it did scrape");
}
