//! The metrics poller against real HTTP servers on loopback: metrics are published, stop
//! advancing when the server goes away, and the scraper's failure modes are reported precisely.
//! Poller cadence (one poller per endpoint across endpoint-set changes, one scrape per interval)
//! is tested exactly under paused time in `src/epp/scrape/tests.rs`.

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
    assert!(
        server.hits() >= 1,
        "published metrics come from a real request"
    );
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
    assert!(later.is_stale(tokio::time::Instant::now(), Duration::from_millis(200)));

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(2), manager)
        .await
        .expect("manager did not stop")
        .unwrap();
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
