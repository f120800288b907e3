//! The metrics poller against real HTTP servers on loopback: metrics are published, stop
//! advancing when the server goes away, exactly one poller runs per endpoint across endpoint-set
//! changes, and the scraper's failure modes are reported precisely.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use switchyard::epp::datastore::{Datastore, DiscoveryEvent};
use switchyard::epp::endpoint::Endpoint;
use switchyard::epp::scrape::{
    spawn_scrape_manager, ScrapeConfig, ScrapeError, Scraper, MAX_BODY_BYTES,
};

fn vllm_page(waiting: u32, kv: f64) -> String {
    format!(
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"m\"}} {waiting}.0\n\
         # HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",model_name=\"m\"}} 2.0\n\
         # TYPE vllm:e2e_request_latency_seconds histogram\n\
         vllm:e2e_request_latency_seconds_bucket{{le=\"+Inf\",model_name=\"m\"}} 1.0\n\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"m\"}} {kv}\n"
    )
}

/// A model server's `/metrics`, counting requests.
struct Mock {
    body: Mutex<Vec<u8>>,
    status: AtomicU16,
    delay_ms: AtomicU64,
    hits: AtomicU64,
}

struct MockServer {
    addr: SocketAddr,
    state: Arc<Mock>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl MockServer {
    async fn start(body: String) -> MockServer {
        let state = Arc::new(Mock {
            body: Mutex::new(body.into_bytes()),
            status: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/metrics", get(metrics))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        MockServer {
            addr,
            state,
            stop: Some(stop),
            task,
        }
    }

    fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }

    fn set_body(&self, body: impl Into<Vec<u8>>) {
        *self.state.body.lock() = body.into();
    }

    /// Stops accepting, closes keep-alive connections and waits until the server is gone.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("server did not shut down")
            .unwrap();
    }
}

async fn metrics(State(mock): State<Arc<Mock>>) -> (StatusCode, Vec<u8>) {
    mock.hits.fetch_add(1, Ordering::SeqCst);
    let delay = mock.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = StatusCode::from_u16(mock.status.load(Ordering::SeqCst)).unwrap();
    (status, mock.body.lock().clone())
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Requests `server` received during `window`.
async fn hits_during(server: &MockServer, window: Duration) -> u64 {
    let before = server.hits();
    tokio::time::sleep(window).await;
    server.hits() - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_metrics_and_stops_advancing_when_the_server_stops() {
    let server = MockServer::start(vllm_page(3, 0.25)).await;
    let datastore = Arc::new(Datastore::new());
    datastore.apply(DiscoveryEvent::Reset(vec![Endpoint::from_addr(
        server.addr,
    )]));
    let (stop_tx, stop_rx) = watch::channel(false);
    let config = ScrapeConfig {
        interval: Duration::from_millis(20),
        timeout: Duration::from_secs(1),
    };
    let manager = spawn_scrape_manager(datastore.clone(), config, stop_rx);
    let slot = datastore.slot(&server.addr.to_string()).unwrap();

    wait_until("first publish", || slot.load().metrics.updated_at.is_some()).await;
    let m = slot.load().metrics.clone();
    assert_eq!(
        (m.waiting_queue_size, m.running_requests, m.kv_cache_usage),
        (3, 2, 0.25)
    );
    assert_eq!(m.kv_block_size, None);

    server.set_body(vllm_page(9, 0.5));
    wait_until("second value", || {
        slot.load().metrics.waiting_queue_size == 9
    })
    .await;
    let first = slot.load().metrics.updated_at.unwrap();
    wait_until("updated_at advancing", || {
        slot.load().metrics.updated_at.is_some_and(|t| t > first)
    })
    .await;

    server.stop().await;
    // Let an in-flight scrape finish, then nothing may be published any more.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let last = slot.load().metrics.clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = slot.load().metrics.clone();
    assert_eq!(
        later.updated_at, last.updated_at,
        "updated_at must stop advancing"
    );
    assert_eq!(later.waiting_queue_size, 9, "the old metrics are kept");
    assert!(later.is_stale(Instant::now(), Duration::from_millis(200)));

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(2), manager)
        .await
        .expect("manager did not stop")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_poller_per_endpoint_across_changes() {
    let a = MockServer::start(vllm_page(1, 0.1)).await;
    let b = MockServer::start(vllm_page(2, 0.2)).await;
    let ep_a = Endpoint::from_addr(a.addr);
    let ep_b = Endpoint::from_addr(b.addr);
    let datastore = Arc::new(Datastore::new());
    datastore.apply(DiscoveryEvent::Reset(vec![ep_a.clone()]));
    let (stop_tx, stop_rx) = watch::channel(false);
    let interval = Duration::from_millis(100);
    let config = ScrapeConfig {
        interval,
        timeout: Duration::from_secs(1),
    };
    let manager = spawn_scrape_manager(datastore.clone(), config, stop_rx);

    // With MissedTickBehavior::Delay one poller makes at most window/interval + 1 requests in a
    // window; a duplicate poller would double that.
    let window = Duration::from_millis(1000);
    let one_poller = 3..=12;
    wait_until("a polled", || a.hits() > 0).await;
    let n = hits_during(&a, window).await;
    assert!(one_poller.contains(&n), "a: {n} requests in {window:?}");

    // Re-listing the same endpoints bumps the version but must not start another poller.
    datastore.apply(DiscoveryEvent::Reset(vec![ep_a.clone()]));
    datastore.apply(DiscoveryEvent::Reset(vec![ep_a.clone()]));
    let n = hits_during(&a, window).await;
    assert!(one_poller.contains(&n), "a after re-list: {n}");
    assert_eq!(b.hits(), 0);

    // Adding b starts exactly one poller for it.
    datastore.apply(DiscoveryEvent::Upsert(ep_b.clone()));
    wait_until("b polled", || b.hits() > 0).await;
    let before_a = a.hits();
    let n = hits_during(&b, window).await;
    assert!(one_poller.contains(&n), "b: {n}");
    let n = a.hits() - before_a;
    assert!(one_poller.contains(&n), "a beside b: {n}");

    // Replacing a (same name, new labels) swaps its poller rather than adding one.
    let mut replaced = ep_a.clone();
    replaced.labels.insert("zone".into(), "z".into());
    datastore.apply(DiscoveryEvent::Upsert(replaced));
    tokio::time::sleep(interval + Duration::from_millis(50)).await;
    let n = hits_during(&a, window).await;
    assert!(one_poller.contains(&n), "a after replace: {n}");
    let slot_a = datastore.slot(&ep_a.name).unwrap();
    wait_until("replaced slot published", || {
        slot_a.load().metrics.updated_at.is_some()
    })
    .await;

    // Removing a stops its poller.
    datastore.apply(DiscoveryEvent::Remove(ep_a.name.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let n = hits_during(&a, Duration::from_millis(400)).await;
    assert_eq!(n, 0, "a is no longer polled");
    assert!(b.hits() > 0);

    // Shutdown stops every poller.
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(2), manager)
        .await
        .expect("manager did not stop")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        hits_during(&b, Duration::from_millis(300)).await,
        0,
        "b stopped on shutdown"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn scraper_reports_each_failure_precisely() {
    let server = MockServer::start(vllm_page(4, 0.75)).await;
    let endpoint = Endpoint::from_addr(server.addr);
    let scraper = Scraper::new(Duration::from_millis(300));

    let m = scraper.scrape(&endpoint).await.unwrap();
    assert_eq!(
        (m.waiting_queue_size, m.kv_cache_usage, m.updated_at),
        (4, 0.75, None)
    );

    server.state.status.store(503, Ordering::SeqCst);
    let err = scraper.scrape(&endpoint).await.unwrap_err();
    assert!(
        matches!(err, ScrapeError::Status { status: 503, .. }),
        "{err}"
    );
    server.state.status.store(200, Ordering::SeqCst);

    server.set_body(vec![b'#'; MAX_BODY_BYTES + 1]);
    let err = scraper.scrape(&endpoint).await.unwrap_err();
    assert!(matches!(err, ScrapeError::BodyTooLarge { .. }), "{err}");

    server.set_body(vec![0xff, 0xfe, b'\n']);
    let err = scraper.scrape(&endpoint).await.unwrap_err();
    assert!(matches!(err, ScrapeError::NotUtf8 { .. }), "{err}");

    server.set_body("# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 1\n");
    let err = scraper.scrape(&endpoint).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "metric family \"vllm:num_requests_running\" not found as a gauge or counter"
    );

    server.set_body(vllm_page(1, 0.1));
    server.state.delay_ms.store(2000, Ordering::SeqCst);
    let started = Instant::now();
    let err = scraper.scrape(&endpoint).await.unwrap_err();
    assert!(matches!(err, ScrapeError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_millis(1500));
    server.state.delay_ms.store(0, Ordering::SeqCst);

    let addr = server.addr;
    server.stop().await;
    let err = scraper
        .scrape(&Endpoint::from_addr(addr))
        .await
        .unwrap_err();
    assert!(matches!(err, ScrapeError::Http { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("GET http://{addr}/metrics: ")),
        "{err}"
    );
}
