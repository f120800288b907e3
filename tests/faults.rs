//! Fault injection through real Envoy (`deploy/envoy/envoy.yaml`) and the real `switchyard epp`
//! binary: a replica killed under load (and whether later requests still try it, with and
//! without the `scrape-freshness-filter`), the EPP restarted under load (fail-closed and
//! fail-open), a model server whose `/metrics` hangs, and the Kubernetes watch cut, expired and
//! failing (fake API server). Each test states the outcome it expects and asserts it with exact
//! counts.
//!
//! Requests in flight are made exact with the mock's hold: completions park (a non-streamed one
//! before its response, a streamed one after its first event) until released, so the test knows
//! which replica holds which request when the fault lands. Replicas are killed through a TCP
//! proxy ([`FaultProxy`]) that refuses new connections and resets open ones, as a dead process's
//! kernel does.
//!
//! Envoy comes from `scripts/install-test-deps.sh`; without it these tests print `SKIPPED:`.

mod fake_apiserver;
mod support;

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use fake_apiserver::objects::*;
use fake_apiserver::FakeApiServer;
use serde_json::json;
use support::tools;
use support::{
    BodyMode, EnvoyConfig, EnvoyProcess, EppOptions, EppProcess, FaultProxy, HttpClient,
    HttpResponse, MockModelServer, RouteCluster,
};
use tokio::task::JoinSet;

/// How long a condition the test waits for may take (generous: the machine may be busy).
const WAIT: Duration = Duration::from_secs(15);

fn completion(prompt: &str, stream: bool) -> String {
    json!({"model": "fault-model", "prompt": prompt, "max_tokens": 3, "stream": stream}).to_string()
}

/// Index of the mock that answered, from its `x-mock-server: pod<i>` header.
fn served_by(resp: &HttpResponse) -> Option<usize> {
    resp.header("x-mock-server")
        .strip_prefix("pod")?
        .parse()
        .ok()
}

/// What one request through the gateway came to.
#[derive(Debug)]
struct Outcome {
    /// 200 with a complete body (for SSE: through `data: [DONE]`).
    ok: bool,
    status: Option<u16>,
    server: Option<usize>,
    latency: Duration,
    error: String,
}

async fn send(client: &HttpClient, url: &str, body: String, stream: bool) -> Outcome {
    let start = Instant::now();
    let r = client.post_json(url, &[], body).await;
    let latency = start.elapsed();
    match r {
        Ok(r) => {
            let complete = !stream || r.body.ends_with(b"data: [DONE]\n\n");
            Outcome {
                ok: r.status == 200 && complete,
                status: Some(r.status.as_u16()),
                server: served_by(&r),
                latency,
                error: if r.status == 200 {
                    String::new()
                } else {
                    r.text()
                },
            }
        }
        Err(e) => Outcome {
            ok: false,
            status: None,
            server: None,
            latency,
            error: format!("{e:#}"),
        },
    }
}

/// Starts `n` requests at once (even ones streamed), returning their handles in order.
fn start_wave(client: &HttpClient, url: &str, tag: &str, n: usize) -> JoinSet<(usize, Outcome)> {
    let mut set = JoinSet::new();
    for i in 0..n {
        let (client, url) = (client.clone(), url.to_owned());
        let stream = i % 2 == 0;
        let body = completion(&format!("{tag} request {i}"), stream);
        set.spawn(async move { (i, send(&client, &url, body, stream).await) });
    }
    set
}

async fn finish(mut set: JoinSet<(usize, Outcome)>) -> Vec<Outcome> {
    let mut out: Vec<Option<Outcome>> = (0..set.len()).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, o) = r.unwrap();
        out[i] = Some(o);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// `n` requests, `concurrency` at a time.
async fn load(
    client: &HttpClient,
    url: &str,
    tag: &str,
    n: usize,
    concurrency: usize,
) -> Vec<Outcome> {
    let mut all = Vec::with_capacity(n);
    for batch in 0..n.div_ceil(concurrency) {
        let size = concurrency.min(n - batch * concurrency);
        all.extend(
            finish(start_wave(
                client,
                url,
                &format!("{tag} batch {batch}"),
                size,
            ))
            .await,
        );
    }
    all
}

fn failures(outcomes: &[Outcome]) -> usize {
    outcomes.iter().filter(|o| !o.ok).count()
}

fn failures_of(outcomes: &[(usize, &Outcome)]) -> usize {
    outcomes.iter().filter(|(_, o)| !o.ok).count()
}

fn describe(outcomes: &[Outcome]) -> String {
    outcomes
        .iter()
        .enumerate()
        .map(|(i, o)| {
            format!(
                "  #{i}: ok={} status={:?} server={:?} {}\n",
                o.ok,
                o.status,
                o.server,
                o.error.trim()
            )
        })
        .collect()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every mock has been scraped `n` more times.
async fn wait_scrapes(mocks: &[&MockModelServer], n: usize) {
    let start: Vec<usize> = mocks.iter().map(|m| m.metrics_scrapes()).collect();
    wait_until("scrapes", || {
        mocks
            .iter()
            .zip(&start)
            .all(|(m, s)| m.metrics_scrapes() >= s + n)
    })
    .await;
}

fn served_counts(mocks: &[MockModelServer]) -> Vec<usize> {
    mocks.iter().map(MockModelServer::requests_served).collect()
}

fn parked(mocks: &[MockModelServer]) -> Vec<usize> {
    mocks.iter().map(MockModelServer::parked).collect()
}

fn hold(mocks: &[MockModelServer], on: bool) {
    for m in mocks {
        m.hold_completions(on);
    }
}

/// The value of the first sample of `name` carrying all of `labels` in `/metrics` text.
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

async fn mocks(n: usize) -> Vec<MockModelServer> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(
            MockModelServer::start(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                &format!("pod{i}"),
            )
            .await
            .unwrap(),
        );
    }
    out
}

async fn envoy(
    bin: &Path,
    epp: &EppProcess,
    route: RouteCluster,
    mode: BodyMode,
    failure_mode_allow: bool,
    pool: Vec<SocketAddr>,
) -> EnvoyProcess {
    EnvoyProcess::start(
        bin,
        &EnvoyConfig {
            epp_port: epp.grpc_port,
            epp_health_port: epp.health_port,
            failure_mode_allow,
            request_body_mode: mode,
            route,
            pool,
        },
    )
    .await
    .unwrap()
}

// ---------------------------------------------------------------------------------------------

/// Expected: with `--fallback-endpoints=2` behind Envoy's override_host pool, killing a replica
/// fails exactly the requests in flight on it (their responses were under way: nothing can
/// retry them) and nothing else; every later request succeeds on the other replicas, those
/// that named the dead one first being retried on a fallback.
#[tokio::test]
async fn replica_killed_under_load_fails_only_its_in_flight_requests() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    const WAVE: usize = 12;
    let mocks = mocks(3).await;
    let mut proxies = Vec::new();
    for m in &mocks {
        proxies.push(
            FaultProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), m.addr)
                .await
                .unwrap(),
        );
    }
    let pool: Vec<SocketAddr> = proxies.iter().map(|p| p.addr).collect();
    let mut opts = EppOptions::new(pool.clone());
    opts.fallback_endpoints = 2;
    let epp = EppProcess::start(&opts).await.unwrap();
    let envoy = envoy(
        &envoy_bin,
        &epp,
        RouteCluster::InferencePool,
        BodyMode::FullDuplexStreamed,
        false,
        pool,
    )
    .await;
    wait_scrapes(&mocks.iter().collect::<Vec<_>>(), 2).await;
    let client = HttpClient::new();
    let url = envoy.url("/v1/completions");

    // A wave of requests, all parked on the replicas (half mid-stream, half before answering).
    hold(&mocks, true);
    let wave = start_wave(&client, &url, "wave", WAVE);
    wait_until("the whole wave parked", || {
        parked(&mocks).iter().sum::<usize>() == WAVE
    })
    .await;
    let in_flight = parked(&mocks);
    let victim = (0..3).max_by_key(|&i| (in_flight[i], 3 - i)).unwrap();
    let on_victim = in_flight[victim];
    assert!(on_victim > 0, "{in_flight:?}");

    // Kill it, then let the others finish.
    let reset = proxies[victim].kill().await;
    hold(&mocks, false);
    let outcomes = finish(wave).await;
    assert_eq!(
        failures(&outcomes),
        on_victim,
        "in flight per replica {in_flight:?}, victim pod{victim} ({reset} connections reset):\n{}",
        describe(&outcomes)
    );
    assert!(outcomes
        .iter()
        .filter(|o| o.ok)
        .all(|o| o.server.is_some_and(|s| s != victim)));

    // Later requests: all succeed, none on the dead replica. Those whose primary was the dead
    // one cost Envoy a refused connection and a retry on the next fallback.
    let retries_before = envoy
        .stat("cluster.inference_pool.upstream_rq_retry")
        .await
        .unwrap()
        .unwrap_or(0);
    let served_before = served_counts(&mocks);
    let later = load(&client, &url, "after kill", 30, 6).await;
    assert_eq!(failures(&later), 0, "{}", describe(&later));
    assert_eq!(served_counts(&mocks)[victim], served_before[victim]);
    let served_after = served_counts(&mocks);
    let live: usize = (0..3)
        .filter(|&i| i != victim)
        .map(|i| served_after[i] - served_before[i])
        .sum();
    assert_eq!(live, 30);
    let retries = envoy
        .stat("cluster.inference_pool.upstream_rq_retry")
        .await
        .unwrap()
        .unwrap_or(0)
        - retries_before;
    eprintln!("after the kill: 30 requests, {retries} retried off the dead replica");
}

/// The reference default profile plus the `scrape-freshness-filter` (threshold 500 ms).
const FRESHNESS_CONFIG: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: scrape-freshness-filter
  parameters:
    metricsStalenessThreshold: 500ms
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: scrape-freshness-filter
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
";

/// Kills one of three replicas (`--fallback-endpoints=2`), waits 2 s (its metrics are stale by
/// then), sends 30 requests 6 at a time and returns how many Envoy retried, having asserted
/// that none failed and none reached the dead replica.
async fn retries_after_a_replica_died(config: Option<&str>) -> Option<u64> {
    let envoy_bin = tools::envoy()?;
    let mocks = mocks(3).await;
    let mut proxies = Vec::new();
    for m in &mocks {
        proxies.push(
            FaultProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), m.addr)
                .await
                .unwrap(),
        );
    }
    let pool: Vec<SocketAddr> = proxies.iter().map(|p| p.addr).collect();
    let mut opts = EppOptions::new(pool.clone());
    opts.fallback_endpoints = 2;
    opts.config = config.map(str::to_owned);
    let epp = EppProcess::start(&opts).await.unwrap();
    let envoy = envoy(
        &envoy_bin,
        &epp,
        RouteCluster::InferencePool,
        BodyMode::FullDuplexStreamed,
        false,
        pool,
    )
    .await;
    wait_scrapes(&mocks.iter().collect::<Vec<_>>(), 2).await;
    let client = HttpClient::new();
    let url = envoy.url("/v1/completions");
    proxies[0].kill().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let retries = || async {
        envoy
            .stat("cluster.inference_pool.upstream_rq_retry")
            .await
            .unwrap()
            .unwrap_or(0)
    };
    let before = retries().await;
    let served = mocks[0].requests_served();
    let later = load(&client, &url, "after the kill", 30, 6).await;
    assert_eq!(failures(&later), 0, "{}", describe(&later));
    assert_eq!(mocks[0].requests_served(), served);
    Some(retries().await - before)
}

/// Expected: with the `scrape-freshness-filter` in the profile, once a killed replica's
/// metrics are stale the EPP names it for nobody, so later requests do not even try it: no
/// Envoy retry, no failure.
#[tokio::test]
async fn killed_replica_is_avoided_once_stale_with_the_freshness_filter() {
    let retries = require_tool!(
        retries_after_a_replica_died(Some(FRESHNESS_CONFIG)).await,
        "envoy"
    );
    assert_eq!(retries, 0, "requests still tried the dead replica first");
}

/// Expected with the reference default profile (no freshness filter): the dead replica keeps
/// its last scraped numbers and stays some requests' primary, so it costs Envoy retries — and
/// still no failure, because the fallbacks take those requests. (Switchyard's default profile
/// has the filter since issue 10.)
#[tokio::test]
async fn killed_replica_costs_retries_not_failures_with_the_reference_profile() {
    let retries = require_tool!(
        retries_after_a_replica_died(Some(switchyard::epp::config::REFERENCE_DEFAULT_CONFIG)).await,
        "envoy"
    );
    assert!(
        retries > 0,
        "no request tried the dead replica: the fallbacks went untested"
    );
}

/// Restarts the EPP (SIGKILL, then the same flags and ports) while requests are in flight and
/// while more arrive. Expected, exactly as Envoy's ext_proc `failure_mode_allow` says:
/// - fail-closed (`false`, the reference): every request whose ext_proc stream was open fails
///   (Envoy answers 500 itself, or resets a response already under way), every request that
///   arrives while the EPP is down gets 500 and reaches no replica;
/// - fail-open (`true`, BUFFERED request bodies, see deploy/envoy/README.md): a request whose
///   response has not started carries on unprocessed and succeeds; a response already streaming
///   through the EPP (`response_body_mode: FULL_DUPLEX_STREAMED`) is reset, because Envoy 1.40
///   cannot fail open once body chunks went to the processor; requests arriving while the EPP is
///   down succeed, round robin over the pool (no pick).
///
/// Once the EPP serves again every request succeeds and is picked by it.
async fn epp_restart_under_load(fail_open: bool) {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    const WAVE: usize = 6;
    const DOWN: usize = 9;
    let mocks = mocks(3).await;
    let pool: Vec<SocketAddr> = mocks.iter().map(|m| m.addr).collect();
    let mut epp = EppProcess::start(&EppOptions::new(pool.clone()))
        .await
        .unwrap();
    let (route, mode) = if fail_open {
        (RouteCluster::InferencePool, BodyMode::Buffered)
    } else {
        (
            RouteCluster::OriginalDestination,
            BodyMode::FullDuplexStreamed,
        )
    };
    let envoy = envoy(&envoy_bin, &epp, route, mode, fail_open, pool).await;
    wait_scrapes(&mocks.iter().collect::<Vec<_>>(), 2).await;
    let client = HttpClient::new();
    let url = envoy.url("/v1/completions");
    let before = load(&client, &url, "before", 6, 3).await;
    assert_eq!(failures(&before), 0, "{}", describe(&before));

    // In flight when the EPP dies.
    hold(&mocks, true);
    let wave = start_wave(&client, &url, "wave", WAVE);
    wait_until("the whole wave parked", || {
        parked(&mocks).iter().sum::<usize>() == WAVE
    })
    .await;
    // Let the streamed responses' first events make their way through the EPP to the clients
    // (generous: on a loaded machine that hop is what decides which kind of failure it is).
    tokio::time::sleep(Duration::from_secs(1)).await;
    epp.kill();
    // Give Envoy the stream resets before the replicas answer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    hold(&mocks, false);
    let wave = finish(wave).await;
    // Even requests are streamed (their responses were under way), odd ones had no response yet.
    let (streamed, waiting): (Vec<_>, Vec<_>) =
        wave.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    assert_eq!(
        (failures_of(&streamed), failures_of(&waiting)),
        if fail_open {
            (WAVE / 2, 0)
        } else {
            (WAVE / 2, WAVE / 2)
        },
        "in flight at the kill:\n{}",
        describe(&wave)
    );
    if !fail_open {
        // No response yet: Envoy's own 500.
        assert!(
            waiting.iter().all(|(_, o)| o.status == Some(500)),
            "{}",
            describe(&wave)
        );
    }

    // Arriving while the EPP is down.
    let served = served_counts(&mocks);
    let down = load(&client, &url, "down", DOWN, 3).await;
    let after = served_counts(&mocks);
    let delta: Vec<usize> = (0..3).map(|i| after[i] - served[i]).collect();
    if fail_open {
        assert_eq!(failures(&down), 0, "{}", describe(&down));
        // No pick: Envoy's round robin over the pool.
        assert_eq!(delta, [3, 3, 3]);
        for m in &mocks {
            let (headers, _) = m.last_request().unwrap();
            assert!(headers.get("x-gateway-destination-endpoint").is_none());
        }
    } else {
        assert_eq!(failures(&down), DOWN, "{}", describe(&down));
        assert!(
            down.iter().all(|o| o.status == Some(500)),
            "{}",
            describe(&down)
        );
        assert_eq!(
            delta,
            [0, 0, 0],
            "a request reached a replica with the EPP down"
        );
    }

    // Back up: every request succeeds and carries the EPP's pick.
    epp.restart().await.unwrap();
    let served = served_counts(&mocks);
    let up = load(&client, &url, "restarted", 9, 3).await;
    assert_eq!(failures(&up), 0, "after the restart:\n{}", describe(&up));
    let after = served_counts(&mocks);
    assert_eq!((0..3).map(|i| after[i] - served[i]).sum::<usize>(), 9);
    for o in &up {
        let (headers, _) = mocks[o.server.unwrap()].last_request().unwrap();
        assert!(headers.get("x-gateway-destination-endpoint").is_some());
    }
}

#[tokio::test]
async fn epp_restarted_under_load_fails_closed() {
    epp_restart_under_load(false).await;
}

#[tokio::test]
async fn epp_restarted_under_load_fails_open() {
    epp_restart_under_load(true).await;
}

/// A model server whose `/metrics` hangs (the scrape timeout, 2 s here, is longer than the
/// staleness threshold, 500 ms). Expected: routing never waits on the hung scrape (every request
/// succeeds well under the scrape timeout); the hung endpoint keeps its last scraped values but
/// drops out of the pool averages once stale; the other replicas' scrapes carry on; at most one
/// scrape per timeout is in flight against the hung server; when it answers again its metrics
/// are fresh again.
#[tokio::test]
async fn hung_metrics_go_stale_while_routing_continues() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let mocks = mocks(3).await;
    let pool: Vec<SocketAddr> = mocks.iter().map(|m| m.addr).collect();
    let mut opts = EppOptions::new(pool.clone());
    opts.fallback_endpoints = 2;
    opts.extra_args = vec![
        "--metrics-scrape-timeout=2s".into(),
        "--metrics-staleness-threshold=500ms".into(),
        "--refresh-prometheus-metrics-interval=100ms".into(),
    ];
    let epp = EppProcess::start(&opts).await.unwrap();
    let envoy = envoy(
        &envoy_bin,
        &epp,
        RouteCluster::InferencePool,
        BodyMode::FullDuplexStreamed,
        false,
        pool,
    )
    .await;
    let client = HttpClient::new();
    let url = envoy.url("/v1/completions");
    let metrics = |client: HttpClient, epp_url: String| async move {
        client.get(&epp_url).await.unwrap().text()
    };
    let gauge = |text: &str, name: &str| sample(text, name, &[]);
    let pod2 = format!("{}", mocks[2].addr);

    // pod2 reports a queue of 30: the pool average is 10.
    mocks[2].set_metrics(30, 0, 0.0);
    let deadline = Instant::now() + WAIT;
    loop {
        let text = metrics(client.clone(), epp.metrics_url()).await;
        if gauge(&text, "inference_pool_average_queue_size") == Some(10.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "average never reached 10:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    mocks[2].hang_metrics(true);
    let hung_at = Instant::now();
    let scrapes_at_hang = mocks[2].metrics_scrapes();
    // pod0's queue changes during the hang: its scrapes must not wait behind pod2's.
    mocks[0].set_metrics(6, 0, 0.0);
    let mut outcomes = Vec::new();
    for i in 0..40 {
        let stream = i % 4 == 0;
        outcomes.push(
            send(
                &client,
                &url,
                completion(&format!("during hang {i}"), stream),
                stream,
            )
            .await,
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(failures(&outcomes), 0, "{}", describe(&outcomes));
    let slowest = outcomes.iter().map(|o| o.latency).max().unwrap();
    assert!(
        slowest < Duration::from_secs(1),
        "a request waited {slowest:?} (the scrape timeout is 2 s)"
    );

    // Stale (hung for > 500 ms + a gauge refresh): pod2 leaves the averages, pod0 (6) and pod1
    // (0) are fresh. pod2 stays in the pool with its last value.
    let deadline = Instant::now() + WAIT;
    let text = loop {
        let text = metrics(client.clone(), epp.metrics_url()).await;
        if gauge(&text, "inference_pool_average_queue_size") == Some(3.0) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "average never reached 3:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(hung_at.elapsed() > Duration::from_millis(500));
    assert_eq!(
        gauge(&text, "inference_pool_ready_pods"),
        Some(3.0),
        "{text}"
    );
    let per_pod: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("inference_pool_per_pod_queue_size{") && l.contains(&pod2))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect();
    assert_eq!(per_pod, [30.0], "{text}");
    // One scrape in flight at a time: a new one starts only after the last timed out.
    let hung_for = hung_at.elapsed();
    let scrapes = mocks[2].metrics_scrapes() - scrapes_at_hang;
    let most = (hung_for.as_secs_f64() / 2.0).floor() as usize + 1;
    assert!(
        (1..=most).contains(&scrapes),
        "{scrapes} scrapes of the hung server in {hung_for:?}"
    );

    // It answers again: fresh, back in the average ((6 + 0 + 30) / 3 = 12).
    mocks[2].hang_metrics(false);
    let deadline = Instant::now() + WAIT;
    loop {
        let text = metrics(client.clone(), epp.metrics_url()).await;
        if gauge(&text, "inference_pool_average_queue_size") == Some(12.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "average never reached 12:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends requests until one is served by mock `want` (all must succeed meanwhile); returns how
/// many it took.
async fn until_served_by(client: &HttpClient, url: &str, tag: &str, want: usize) -> usize {
    let deadline = Instant::now() + WAIT;
    for i in 1.. {
        let o = send(client, url, completion(&format!("{tag} {i}"), false), false).await;
        assert!(o.ok, "{tag}: request {i} failed: {o:?}");
        if o.server == Some(want) {
            return i;
        }
        assert!(
            Instant::now() < deadline,
            "{tag}: never served by pod{want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

/// The EPP discovering pods through the fake API server. Expected:
/// - the pods watch is cut (connection closed): the EPP watches again from the version it had,
///   without re-listing, and a pod added after the cut is routed to;
/// - the watch expires (410 Gone, compaction): the EPP re-lists, routes to the pod added
///   meanwhile and never again to the pod deleted meanwhile;
/// - the API server fails (500) while the watch is down: routing to the known pods carries on,
///   and a pod added during the outage is routed to once the API server answers again.
#[tokio::test]
async fn kubernetes_watch_dropped_relists_and_picks_up_new_pods() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    const APP: (&str, &str) = ("app", "vllm");
    let ips: Vec<IpAddr> = (1..=4)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
        .collect();
    let mocks = MockModelServer::start_group(&ips, "pod").await.unwrap();
    let port = mocks[0].addr.port();
    let fake = FakeApiServer::start().await;
    fake.apply(pool_v1("pool", &[APP], &[port]));
    fake.apply(pod("p0", "127.0.0.1", &[APP], true));
    fake.apply(pod("p1", "127.0.0.2", &[APP], true));

    let mut kubeconfig = tempfile::NamedTempFile::new().unwrap();
    write!(
        kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
         users:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\n    namespace: default\n\
         current-context: c\n",
        fake.url()
    )
    .unwrap();
    let mut opts = EppOptions::new(Vec::new());
    opts.extra_args = vec![
        "--pool-name".into(),
        "pool".into(),
        "--pool-namespace".into(),
        NS.into(),
    ];
    opts.env = vec![("KUBECONFIG".into(), kubeconfig.path().display().to_string())];
    let epp = EppProcess::start(&opts).await.unwrap();
    let pool: Vec<SocketAddr> = mocks.iter().map(|m| m.addr).collect();
    let envoy = envoy(
        &envoy_bin,
        &epp,
        RouteCluster::OriginalDestination,
        BodyMode::FullDuplexStreamed,
        false,
        pool,
    )
    .await;
    let client = HttpClient::new();
    let url = envoy.url("/v1/completions");
    wait_scrapes(&[&mocks[0], &mocks[1]], 2).await;
    let first = load(&client, &url, "initial", 6, 3).await;
    assert_eq!(failures(&first), 0, "{}", describe(&first));
    assert!(
        first.iter().all(|o| matches!(o.server, Some(0 | 1))),
        "{}",
        describe(&first)
    );
    assert_eq!(served_counts(&mocks)[2..], [0, 0]);

    // The known pods look busy, so a new pod is the clear pick as soon as the EPP knows it.
    mocks[0].set_metrics(50, 8, 0.9);
    mocks[1].set_metrics(50, 8, 0.9);

    // 1. The watch connection is cut; a pod is added right after.
    let lists = fake.requests("list /pods");
    let watches = fake.requests("watch /pods");
    fake.close_watches();
    fake.apply(pod("p2", "127.0.0.3", &[APP], true));
    let took = until_served_by(&client, &url, "after the cut", 2).await;
    eprintln!("new pod routed to after {took} request(s)");
    assert!(fake.requests("watch /pods") > watches, "watched again");
    assert_eq!(
        fake.requests("list /pods"),
        lists,
        "resumed without a re-list"
    );

    // 2. Compaction: the watch ends and its version is gone (410). Meanwhile p0 is deleted and
    // p3 added; only a re-list can tell.
    mocks[2].set_metrics(50, 8, 0.9);
    fake.expire_watches();
    fake.delete(POD, NS, "p0");
    fake.apply(pod("p3", "127.0.0.4", &[APP], true));
    until_served_by(&client, &url, "after the 410", 3).await;
    assert!(fake.requests("list /pods") > lists, "re-listed after 410");
    let served = served_counts(&mocks);
    let later = load(&client, &url, "after the 410", 12, 3).await;
    assert_eq!(failures(&later), 0, "{}", describe(&later));
    assert_eq!(
        served_counts(&mocks)[0],
        served[0],
        "the deleted pod was routed to"
    );

    // 3. The API server fails while the watch is down: routing carries on with what it knew,
    // and once the API server is back a change made meanwhile arrives.
    fake.set_failing(POD, true);
    fake.close_watches();
    wait_until("the EPP to hit the failing API server", || {
        fake.requests("failed /pods") > 0
    })
    .await;
    let served = served_counts(&mocks);
    let during = load(&client, &url, "API down", 12, 3).await;
    assert_eq!(failures(&during), 0, "{}", describe(&during));
    let after = served_counts(&mocks);
    assert_eq!(after[0], served[0]);
    assert_eq!((1..4).map(|i| after[i] - served[i]).sum::<usize>(), 12);
    // p0 comes back idle, the others are busy: it is the pick as soon as the EPP knows it.
    mocks[3].set_metrics(50, 8, 0.9);
    mocks[0].set_metrics(0, 0, 0.0);
    fake.apply(pod("p0", "127.0.0.1", &[APP], true));
    fake.set_failing(POD, false);
    until_served_by(&client, &url, "API back", 0).await;
}
