//! Dead and stale endpoints through a real Envoy and the real `switchyard epp`: an endpoint
//! that was never scraped (a dead port) gets no traffic, a replica killed under load costs no
//! request when fallbacks are configured, and a replica that comes back takes traffic again.
//!
//! Envoy comes from `scripts/install-test-deps.sh`; without it these tests print `SKIPPED:`.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::tools;
use support::{
    BodyMode, EnvoyConfig, EnvoyProcess, EppOptions, EppProcess, HttpClient, MockModelServer,
    RouteCluster,
};

const POD_IPS: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
];

/// The work-aware profile with a short staleness threshold, so a dead replica is dropped
/// within a test's patience.
const CONFIG: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: scrape-freshness-filter
  parameters:
    metricsStalenessThreshold: 300ms
- type: approx-prefix-cache-producer
- type: predicted-ttft-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: scrape-freshness-filter
  - pluginRef: predicted-ttft-scorer
    weight: 1
  - pluginRef: max-score-picker
";

fn completion(prompt: &str) -> String {
    json!({"max_tokens": 5, "model": "m", "prompt": prompt, "stream": false}).to_string()
}

async fn start(
    envoy_bin: &std::path::Path,
    pool: &[SocketAddr],
    fallbacks: u32,
) -> (EppProcess, EnvoyProcess) {
    let mut opts = EppOptions::new(pool.to_vec());
    opts.fallback_endpoints = fallbacks;
    opts.config = Some(CONFIG.to_owned());
    let epp = EppProcess::start(&opts).await.unwrap();
    let cfg = EnvoyConfig {
        epp_port: epp.grpc_port,
        epp_health_port: epp.health_port,
        failure_mode_allow: false,
        request_body_mode: BodyMode::FullDuplexStreamed,
        route: RouteCluster::InferencePool,
        pool: pool.to_vec(),
    };
    let envoy = EnvoyProcess::start(envoy_bin, &cfg).await.unwrap();
    (epp, envoy)
}

async fn wait_scrapes(mocks: &[&MockModelServer], n: usize) {
    let start: Vec<usize> = mocks.iter().map(|m| m.metrics_scrapes()).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while mocks
        .iter()
        .zip(&start)
        .any(|(m, s)| m.metrics_scrapes() < s + n)
    {
        assert!(Instant::now() < deadline, "no scrapes within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_never_scraped_dead_port_gets_no_traffic() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let mut mocks = MockModelServer::start_group(&POD_IPS[..2], "pod")
        .await
        .unwrap();
    // pod1's address stays in the pool with nothing listening: a dead port, never scraped.
    let dead = mocks.remove(1);
    let dead_addr = dead.addr;
    dead.stop().await;
    let live = &mocks[0];
    // The live pod is busy; the dead one would look empty.
    live.set_metrics(20, 8, 0.9);
    let (_epp, envoy) = start(&envoy_bin, &[live.addr, dead_addr], 0).await;
    wait_scrapes(&[live], 2).await;

    let client = HttpClient::new();
    for i in 0..20 {
        let r = client
            .post_json(
                &envoy.url("/v1/completions"),
                &[],
                completion(&format!("q{i}")),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.header("x-mock-server"), "pod0");
        // The EPP's own pick, not something Envoy corrected.
        let (headers, _) = live.last_request().unwrap();
        assert_eq!(
            headers
                .get("x-gateway-destination-endpoint")
                .and_then(|v| v.to_str().ok()),
            Some(live.addr.to_string().as_str()),
            "request {i}"
        );
    }
    assert_eq!(live.requests_served(), 20);
}

#[tokio::test]
async fn a_replica_killed_under_load_fails_no_request_and_recovers() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let mut mocks = MockModelServer::start_group(&POD_IPS, "pod").await.unwrap();
    let pool: Vec<SocketAddr> = mocks.iter().map(|m| m.addr).collect();
    let (_epp, envoy) = start(&envoy_bin, &pool, 2).await;
    wait_scrapes(&mocks.iter().collect::<Vec<_>>(), 2).await;

    // Four clients send back to back until told to stop.
    let url = envoy.url("/v1/completions");
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // (when, what) of every failed request.
    let failures = Arc::new(parking_lot::Mutex::new(Vec::<(Instant, String)>::new()));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (url, stop, sent, failed, failures) = (
                url.clone(),
                stop.clone(),
                sent.clone(),
                failed.clone(),
                failures.clone(),
            );
            tokio::spawn(async move {
                let client = HttpClient::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let r = client
                        .post_json(&url, &[], completion(&format!("w{w} r{i}")))
                        .await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    match r {
                        Ok(r) if r.status == 200 => {}
                        Ok(r) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            failures
                                .lock()
                                .push((Instant::now(), format!("{}: {}", r.status, r.text())));
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            failures.lock().push((Instant::now(), e.to_string()));
                        }
                    }
                    i += 1;
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(700)).await;
    let dead = mocks.remove(0);
    let dead_addr = dead.addr;
    let killed_at = Instant::now();
    dead.stop().await;
    // Well past the 300 ms staleness threshold (plus scrapes delayed on a busy machine): the
    // dead replica is filtered, so Envoy stops retrying away from it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let retries_after_filter = envoy
        .stat("cluster.inference_pool.upstream_rq_retry")
        .await
        .unwrap()
        .unwrap_or(0);
    let served_after_filter: usize = mocks.iter().map(|m| m.requests_served()).sum();
    tokio::time::sleep(Duration::from_millis(700)).await;

    // It comes back on the same address and is scraped again.
    let back = MockModelServer::start(dead_addr, "pod0-back")
        .await
        .unwrap();
    wait_scrapes(&[&back], 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }

    let sent = sent.load(Ordering::Relaxed);
    assert!(sent > 40, "only {sent} requests sent");
    // Only requests in flight on the replica as it went away may fail (at most one per
    // client), and only around the kill; everything after is retried or routed elsewhere.
    let failures = failures.lock().clone();
    assert_eq!(failed.load(Ordering::Relaxed), failures.len());
    assert!(
        failures.len() <= 4
            && failures
                .iter()
                .all(|(at, _)| at.saturating_duration_since(killed_at) < Duration::from_secs(1)),
        "failed requests: {:?}",
        failures
            .iter()
            .map(|(at, e)| (at.saturating_duration_since(killed_at), e))
            .collect::<Vec<_>>()
    );
    let served_later: usize = mocks.iter().map(|m| m.requests_served()).sum();
    assert!(
        served_later > served_after_filter,
        "the survivors took the load"
    );
    let retries_end = envoy
        .stat("cluster.inference_pool.upstream_rq_retry")
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(
        retries_end, retries_after_filter,
        "the filtered replica was still picked as primary"
    );
    assert!(
        back.requests_served() > 0,
        "the recovered replica got no traffic"
    );
}
