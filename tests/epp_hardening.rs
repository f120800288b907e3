//! Issue 11, EPP side: each attack reproduced over real sockets against an in-process
//! `switchyard epp` (or the real binary where memory is measured), asserting the exact answer
//! and that a well-behaved client on its own connection is still served promptly.
//!
//! - item 1: an idle TCP connection on the TLS port no longer blocks other clients, and is
//!   closed at `--tls-handshake-timeout`; handshakes beyond `--tls-max-concurrent-handshakes`
//!   are refused at once.
//! - item 2: model names from requests become metric labels only when configured (else `other`),
//!   label values are escaped, and ten 2 MB model names grow neither RSS nor the scrape.
//! - item 4: a 15 MB `stream` array is skipped without being built.
//! - item 5: MAX_CONCURRENT_STREAMS is advertised, a half-open connection is detected by
//!   keepalive and its in-flight counts released, and a stream past `--grpc-stream-timeout` ends
//!   with DEADLINE_EXCEEDED.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request as Msg, processing_response::Response as Reply, HttpBody,
    HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use rustls::pki_types::ServerName;
use support::{EppOptions, EppProcess, HttpClient, InProcessEpp, TestEpp};
use switchyard::epp::server::RunningEpp;
use switchyard::promtext;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The only endpoint; nothing listens there (routing does not need it to).
const ENDPOINT: &str = "127.0.0.1:9";

async fn start_epp(extra: &[&str]) -> TestEpp {
    InProcessEpp::endpoints([ENDPOINT])
        .flags(&["--metrics-endpoint-auth=false", "--drain-timeout", "1s"])
        .flags(extra)
        .start()
        .await
}

fn header(k: &str, v: &[u8]) -> HeaderValue {
    HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.to_vec(),
    }
}

fn headers_msg(extra: &[(&str, &[u8])], eos: bool) -> ProcessingRequest {
    let mut headers = vec![
        header(":method", b"POST"),
        header(":path", b"/v1/completions"),
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

fn body_msg(body: Vec<u8>) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Msg::RequestBody(HttpBody {
            body,
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn completion(model: &str) -> Vec<u8> {
    serde_json::json!({"model": model, "prompt": "hello", "max_tokens": 5})
        .to_string()
        .into_bytes()
}

/// The destination the EPP set on a routed header reply.
fn destination(r: &ProcessingResponse) -> String {
    let Some(Reply::RequestHeaders(h)) = &r.response else {
        panic!("not a header reply: {r:?}");
    };
    let set = &h
        .response
        .as_ref()
        .unwrap()
        .header_mutation
        .as_ref()
        .unwrap()
        .set_headers;
    let dest = set
        .iter()
        .map(|o| o.header.as_ref().unwrap())
        .find(|h| h.key == "x-gateway-destination-endpoint")
        .expect("destination header");
    String::from_utf8(dest.raw_value.clone()).unwrap()
}

/// Sends a routed completion on a fresh plain-gRPC connection and returns its first reply and
/// how long it took.
async fn route_once(
    addr: SocketAddr,
    extra: &[(&str, &[u8])],
    body: Vec<u8>,
) -> (ProcessingResponse, Duration) {
    let t = Instant::now();
    let mut client = ExternalProcessorClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_encoding_message_size(64 << 20);
    let msgs = vec![headers_msg(extra, false), body_msg(body)];
    let mut stream = client
        .process(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no reply within 10 s")
        .unwrap()
        .unwrap();
    (first, t.elapsed())
}

async fn metrics_text(url: &str) -> String {
    let r = HttpClient::new().get(url).await.unwrap();
    assert_eq!(r.status, 200);
    r.text()
}

fn metrics_url(epp: &RunningEpp) -> String {
    format!("http://{}/metrics", epp.metrics_addr)
}

// ---------------------------------------------------------------- item 1: TLS accept

/// A header-only ext_proc request over a fresh TLS connection; returns the destination and the
/// time from connect to reply.
async fn grpc_over_tls(addr: SocketAddr) -> (String, Duration) {
    let t = Instant::now();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| async move {
            let tcp = TcpStream::connect(addr).await?;
            let tls = tokio_rustls::TlsConnector::from(support::tls_client::insecure_h2_config())
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }))
        .await
        .unwrap();
    let mut client = ExternalProcessorClient::new(channel);
    let mut stream = client
        .process(tokio_stream::iter(vec![headers_msg(&[], true)]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    (destination(&reply), t.elapsed())
}

/// Reads until the peer closes; returns how long that took (EOF or reset both count).
async fn closed_within(conn: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(limit.saturating_sub(t.elapsed()), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn idle_tcp_connection_does_not_block_tls_clients_and_times_out() {
    let epp = start_epp(&["--tls-handshake-timeout=3s"]).await;
    let (dest, baseline) = grpc_over_tls(epp.grpc_addr).await;
    assert_eq!(dest, ENDPOINT);

    // The attack: connect and send nothing. Before the fix every later client waited behind it.
    let mut idle = TcpStream::connect(epp.grpc_addr).await.unwrap();
    let opened = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (dest, latency) =
        tokio::time::timeout(Duration::from_secs(5), grpc_over_tls(epp.grpc_addr))
            .await
            .expect("a TLS client was blocked by an idle TCP connection");
    assert_eq!(dest, ENDPOINT);
    // Normal latency (generous for a loaded test machine), and while the idle socket is still
    // open: before the fix this client waited until that socket closed.
    assert!(
        latency < baseline * 5 + Duration::from_secs(1),
        "served in {latency:?} with an idle connection open (baseline {baseline:?})"
    );
    assert!(
        opened.elapsed() < Duration::from_secs(3),
        "idle socket must still be open here"
    );

    // The idle connection is closed by the server at the handshake timeout, not before.
    let closed = closed_within(&mut idle, Duration::from_secs(10))
        .await
        .expect("idle connection never closed");
    let at = opened.elapsed();
    assert!(
        at >= Duration::from_millis(2900) && at < Duration::from_secs(6),
        "idle connection closed after {at:?} (read waited {closed:?}); timeout is 3s"
    );
    epp.shutdown().await;
}

#[tokio::test]
async fn handshakes_beyond_the_cap_are_refused_at_once() {
    let epp = start_epp(&[
        "--tls-handshake-timeout=3s",
        "--tls-max-concurrent-handshakes=2",
    ])
    .await;
    let _idle: Vec<TcpStream> = vec![
        TcpStream::connect(epp.grpc_addr).await.unwrap(),
        TcpStream::connect(epp.grpc_addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third handshake would exceed the cap: closed at accept, not left hanging.
    let mut third = TcpStream::connect(epp.grpc_addr).await.unwrap();
    let _ = third.write_all(b"\x16\x03\x01").await;
    let closed = closed_within(&mut third, Duration::from_secs(2))
        .await
        .expect("connection over the handshake cap was left open");
    assert!(closed < Duration::from_secs(1), "closed after {closed:?}");
    // Once the idle ones time out, clients are served again.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let (dest, _) = tokio::time::timeout(Duration::from_secs(5), grpc_over_tls(epp.grpc_addr))
        .await
        .expect("TLS client not served after the idle handshakes timed out");
    assert_eq!(dest, ENDPOINT);
    epp.shutdown().await;
}

/// `--ext-proc-own-thread` on (default) and off: plain and TLS ext_proc are served, and after
/// shutdown the port no longer accepts (the own thread's runtime, with its listener, is gone).
#[tokio::test]
async fn both_runtime_shapes_serve_plain_and_tls_and_release_the_port() {
    for own_thread in ["--ext-proc-own-thread=true", "--ext-proc-own-thread=false"] {
        let epp = start_epp(&[own_thread, "--secure-serving=false"]).await;
        let addr = epp.grpc_addr;
        let (r, _) = route_once(addr, &[], completion("m")).await;
        assert_eq!(destination(&r), ENDPOINT, "{own_thread}, plain");
        epp.shutdown().await;
        assert_port_closed(addr, own_thread).await;

        let epp = start_epp(&[own_thread]).await;
        let addr = epp.grpc_addr;
        let (dest, _) = tokio::time::timeout(Duration::from_secs(10), grpc_over_tls(addr))
            .await
            .expect("TLS client not served");
        assert_eq!(dest, ENDPOINT, "{own_thread}, TLS");
        epp.shutdown().await;
        assert_port_closed(addr, own_thread).await;
    }
}

/// Waits (generously, for a loaded machine) until connecting to `addr` is refused.
async fn assert_port_closed(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "{what}: {addr} still accepts after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- item 2: metric labels

const FORGERY: &str = "evil\"} 1\ninference_pool_ready_pods{name=\"local\"} 9999\n";
const TRICKY_KNOWN: &str = "q\"uote\\back\nline";

#[tokio::test]
async fn model_labels_are_allow_listed_and_escaped() {
    let known = format!("--known-models=known-model,{TRICKY_KNOWN}");
    let epp = start_epp(&["--secure-serving=false", &known]).await;
    let url = metrics_url(&epp);

    let (r, _) = route_once(epp.grpc_addr, &[], completion(FORGERY)).await;
    assert_eq!(destination(&r), ENDPOINT);
    let (r, _) = route_once(
        epp.grpc_addr,
        &[("x-gateway-model-name-rewrite", b"unconfigured-target")],
        completion("known-model"),
    )
    .await;
    assert_eq!(destination(&r), ENDPOINT);
    let (r, _) = route_once(epp.grpc_addr, &[], completion(TRICKY_KNOWN)).await;
    assert_eq!(destination(&r), ENDPOINT);

    let text = metrics_text(&url).await;
    assert!(
        !text.contains("evil"),
        "request text leaked into /metrics:\n{text}"
    );
    let ready: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("inference_pool_ready_pods"))
        .collect();
    assert_eq!(
        ready,
        vec![r#"inference_pool_ready_pods{name="local"} 1.0"#]
    );
    for line in [
        r#"inference_objective_request_total{model_name="other",target_model_name="other",priority="0"} 1"#,
        r#"inference_objective_request_total{model_name="known-model",target_model_name="other",priority="0"} 1"#,
        r#"inference_objective_request_total{model_name="q\"uote\\back\nline",target_model_name="q\"uote\\back\nline",priority="0"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
    }

    // The page re-parses with exactly the labels that were recorded.
    let families = promtext::parse(
        &text,
        &["inference_objective_request_total"],
        &promtext::Limits::default(),
    )
    .unwrap();
    let mut got: Vec<(String, String)> = families
        .get("inference_objective_request_total")
        .unwrap()
        .samples
        .iter()
        .map(|s| {
            (
                s.label("model_name").unwrap().to_string(),
                s.label("target_model_name").unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    let mut want = vec![
        ("other".to_string(), "other".to_string()),
        ("known-model".to_string(), "other".to_string()),
        (TRICKY_KNOWN.to_string(), TRICKY_KNOWN.to_string()),
    ];
    want.sort();
    assert_eq!(got, want);

    // And promtool accepts it.
    if let Some(promtool) = support::tools::promtool() {
        let (code, report) = support::tools::promtool_check(&promtool, &text);
        assert_eq!(code, 0, "promtool: {report}");
    } else {
        support::tools::missing_dependency(
            "promtool not found for the promtool part (run scripts/install-test-deps.sh)",
        );
    }
    epp.shutdown().await;
}

/// `VmRSS` / `VmHWM` of a process, in bytes.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

async fn epp_binary(extra: &[&str]) -> EppProcess {
    let mut opts = EppOptions::new(vec![ENDPOINT.parse().unwrap()]);
    opts.extra_args = extra.iter().map(|s| s.to_string()).collect();
    EppProcess::start(&opts).await.unwrap()
}

#[tokio::test]
async fn ten_2mb_model_names_grow_neither_rss_nor_the_scrape() {
    let epp = epp_binary(&[]).await;
    let (r, baseline) = route_once(epp.grpc_addr(), &[], completion("m")).await;
    assert_eq!(destination(&r), ENDPOINT);
    let page_before = metrics_text(&epp.metrics_url()).await;
    let rss_before = proc_status_kib(epp.pid(), "VmRSS");

    let attack = async {
        for i in 0..10u8 {
            let name = format!("{i}{}", "x".repeat(2 << 20));
            let (r, _) = route_once(epp.grpc_addr(), &[], completion(&name)).await;
            assert_eq!(destination(&r), ENDPOINT);
        }
    };
    // A well-behaved client meanwhile, on its own connections.
    let normal = async {
        let mut worst = Duration::ZERO;
        for _ in 0..5 {
            let (r, latency) = route_once(epp.grpc_addr(), &[], completion("m")).await;
            assert_eq!(destination(&r), ENDPOINT);
            worst = worst.max(latency);
        }
        worst
    };
    let ((), latency) = tokio::join!(attack, normal);
    let page_after = metrics_text(&epp.metrics_url()).await;
    let rss_after = proc_status_kib(epp.pid(), "VmRSS");
    println!(
        "scrape {} -> {} bytes, RSS {} -> {} MiB, latency {baseline:?} -> {latency:?}",
        page_before.len(),
        page_after.len(),
        rss_before >> 20,
        rss_after >> 20
    );
    // Same series (all `other`); only counter digits changed.
    let series = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.rsplit_once(' ').unwrap().0.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(series(&page_before), series(&page_after));
    assert!(page_after.len() < page_before.len() + 1024);
    // Before the fix: +130 MiB and a 1.18 GB scrape.
    assert!(
        rss_after < rss_before + (32 << 20),
        "RSS grew {} MiB",
        (rss_after.saturating_sub(rss_before)) >> 20
    );
    assert!(
        latency < Duration::from_secs(2),
        "normal request took {latency:?}"
    );
}

// ---------------------------------------------------------------- item 4: stream as a Value

#[tokio::test]
async fn a_15mb_stream_array_is_skipped_without_building_it() {
    let epp = epp_binary(&[]).await;
    let (r, _) = route_once(epp.grpc_addr(), &[], completion("m")).await;
    assert_eq!(destination(&r), ENDPOINT);
    let hwm_before = proc_status_kib(epp.pid(), "VmHWM");
    // 15 MB: 7.5 M array elements, a serde_json::Value of ~240 MB before the fix.
    let mut body = br#"{"model":"m","prompt":"hello","stream":["#.to_vec();
    let n = 15 << 19;
    body.reserve(n * 2 + 2);
    for i in 0..n {
        if i > 0 {
            body.push(b',');
        }
        body.push(b'0');
    }
    body.extend_from_slice(b"]}");
    let len = body.len();
    let ((r, _), (normal, latency)) = tokio::join!(
        route_once(epp.grpc_addr(), &[], body),
        route_once(epp.grpc_addr(), &[], completion("m"))
    );
    assert_eq!(destination(&r), ENDPOINT);
    assert_eq!(destination(&normal), ENDPOINT);
    assert!(
        latency < Duration::from_secs(2),
        "normal request took {latency:?}"
    );
    let hwm_after = proc_status_kib(epp.pid(), "VmHWM");
    let grew = hwm_after.saturating_sub(hwm_before);
    println!(
        "{len}-byte body: peak RSS {} -> {} MiB (+{} MiB)",
        hwm_before >> 20,
        hwm_after >> 20,
        grew >> 20
    );
    // The body is held a few times over (gRPC frame, decoded message, body buffer): ~4x 15 MB.
    assert!(grew < 100 << 20, "peak RSS grew {} MiB", grew >> 20);
}

// ---------------------------------------------------------------- item 5: HTTP/2 limits

#[tokio::test]
async fn max_concurrent_streams_is_advertised() {
    let epp = start_epp(&["--secure-serving=false", "--grpc-max-concurrent-streams=7"]).await;
    let tcp = TcpStream::connect(epp.grpc_addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    // The server's SETTINGS arrive right after the preface.
    while client.current_max_send_streams() != 7 {
        assert!(
            Instant::now() < deadline,
            "MAX_CONCURRENT_STREAMS is {}",
            client.current_max_send_streams()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        client = client.ready().await.unwrap();
    }
    epp.shutdown().await;
}

/// A TCP relay that can be frozen: afterwards it forwards nothing in either direction and
/// closes nothing, as a peer that vanished without a FIN looks.
struct FreezableProxy {
    addr: SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezableProxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (down, _) = listener.accept().await.unwrap();
                let up = TcpStream::connect(upstream).await.unwrap();
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                held.push(tokio::spawn(pipe(dr, uw, rx.clone())));
                held.push(tokio::spawn(pipe(ur, dw, rx.clone())));
            }
        });
        FreezableProxy { addr, frozen, task }
    }

    fn freeze(&self) {
        let _ = self.frozen.send(true);
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            _ = async { frozen.wait_for(|f| *f).await.is_ok() } => {
                // Hold both sockets open forever.
                std::future::pending::<()>().await;
            }
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
}

fn in_flight(epp: &RunningEpp) -> u32 {
    epp.datastore.slots()[0].dispatch().in_flight()
}

fn running_gauge(text: &str) -> String {
    text.lines()
        .find(|l| l.starts_with("inference_objective_running_requests{"))
        .unwrap_or("none")
        .to_string()
}

/// Opens a stream, routes one request on it and keeps the stream open.
async fn routed_open_stream(
    addr: SocketAddr,
) -> (
    tokio::sync::mpsc::Sender<ProcessingRequest>,
    tonic::Streaming<ProcessingResponse>,
) {
    let mut client = ExternalProcessorClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(headers_msg(&[], false)).await.unwrap();
    tx.send(body_msg(completion("m"))).await.unwrap();
    let mut stream = client
        .process(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(destination(&first), ENDPOINT);
    (tx, stream)
}

#[tokio::test]
async fn half_open_connection_is_detected_and_its_requests_released() {
    let epp = start_epp(&[
        "--secure-serving=false",
        "--grpc-keepalive-interval=300ms",
        "--grpc-keepalive-timeout=300ms",
    ])
    .await;
    let url = metrics_url(&epp);
    let proxy = FreezableProxy::start(epp.grpc_addr).await;
    let (_tx, _stream) = routed_open_stream(proxy.addr).await;
    assert_eq!(in_flight(&epp), 1);
    assert_eq!(
        running_gauge(&metrics_text(&url).await),
        r#"inference_objective_running_requests{model_name="other"} 1"#
    );

    // Envoy's side vanishes without a FIN.
    proxy.freeze();
    let frozen_at = Instant::now();
    // Another client on its own connection is served as usual meanwhile.
    let (r, latency) = route_once(epp.grpc_addr, &[], completion("m")).await;
    assert_eq!(destination(&r), ENDPOINT);
    assert!(latency < Duration::from_secs(2), "took {latency:?}");

    let deadline = Instant::now() + Duration::from_secs(10);
    while in_flight(&epp) != 0 {
        assert!(
            Instant::now() < deadline,
            "half-open connection still holds its request"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let released = frozen_at.elapsed();
    assert!(
        released >= Duration::from_millis(300),
        "released after {released:?}: before the keepalive could have failed?"
    );
    assert_eq!(
        running_gauge(&metrics_text(&url).await),
        r#"inference_objective_running_requests{model_name="other"} 0"#
    );
    epp.shutdown().await;
}

#[tokio::test]
async fn stream_past_its_deadline_ends_with_deadline_exceeded() {
    let epp = start_epp(&["--secure-serving=false", "--grpc-stream-timeout=700ms"]).await;
    let opened = Instant::now();
    let (_tx, mut stream) = routed_open_stream(epp.grpc_addr).await;
    assert_eq!(in_flight(&epp), 1);
    // The body reply follows the header reply; then the deadline ends the stream.
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("stream outlived its deadline")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    let at = opened.elapsed();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    assert_eq!(
        status.message(),
        "ext_proc stream exceeded --grpc-stream-timeout"
    );
    assert!(at >= Duration::from_millis(700), "ended after {at:?}");
    assert_eq!(in_flight(&epp), 0);
    // Streams within their deadline are unaffected.
    let (r, latency) = route_once(epp.grpc_addr, &[], completion("m")).await;
    assert_eq!(destination(&r), ENDPOINT);
    assert!(latency < Duration::from_secs(2), "took {latency:?}");
    epp.shutdown().await;
}

/// `--max-response-buffer-bytes`: a JSON response larger than the cap is not held; what was
/// buffered is flushed at once and the rest streams through unparsed.
#[tokio::test]
async fn response_buffer_is_capped_per_stream() {
    let epp = start_epp(&["--secure-serving=false", "--max-response-buffer-bytes=1000"]).await;
    let (tx, mut stream) = routed_open_stream(epp.grpc_addr).await;
    // The body reply of the request.
    stream.message().await.unwrap().unwrap();
    let msg = |m: Msg| ProcessingRequest {
        request: Some(m),
        ..Default::default()
    };
    tx.send(msg(Msg::ResponseHeaders(HttpHeaders {
        headers: Some(HeaderMap {
            headers: vec![
                header(":status", b"200"),
                header("content-type", b"application/json"),
            ],
        }),
        ..Default::default()
    })))
    .await
    .unwrap();
    let r = stream.message().await.unwrap().unwrap();
    assert!(
        matches!(r.response, Some(Reply::ResponseHeaders(_))),
        "{r:?}"
    );
    let streamed = |r: ProcessingResponse| -> (Vec<u8>, bool) {
        use envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation;
        let Some(Reply::ResponseBody(b)) = r.response else {
            panic!("not a response body reply: {r:?}");
        };
        match b.response.unwrap().body_mutation.unwrap().mutation.unwrap() {
            Mutation::StreamedResponse(s) => (s.body, s.end_of_stream),
            other => panic!("not streamed: {other:?}"),
        }
    };
    // Under the cap: held until the end of the body.
    let first = vec![b'a'; 600];
    tx.send(msg(Msg::ResponseBody(HttpBody {
        body: first.clone(),
        end_of_stream: false,
        ..Default::default()
    })))
    .await
    .unwrap();
    // Over the cap: everything held so far comes back at once, before the body ends.
    let second = vec![b'b'; 600];
    tx.send(msg(Msg::ResponseBody(HttpBody {
        body: second.clone(),
        end_of_stream: false,
        ..Default::default()
    })))
    .await
    .unwrap();
    let (body, eos) = streamed(
        tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("response held past the buffer cap")
            .unwrap()
            .unwrap(),
    );
    assert_eq!(body, [first, second].concat());
    assert!(!eos);
    epp.shutdown().await;
}

// ---------------------------------------------------------------- item 7: auth that cannot apply

/// With static discovery the default `--metrics-endpoint-auth=true` cannot be applied (there is
/// no TokenReview API): the binary says so loudly at startup instead of silently serving
/// `/metrics` to everyone.
#[tokio::test]
async fn metrics_auth_without_kubernetes_is_a_loud_warning() {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "epp",
            "--endpoints",
            ENDPOINT,
            "--grpc-port=0",
            "--grpc-health-port=0",
            "--metrics-port=0",
            "--bind-address=127.0.0.1",
            "--zap-encoder=console",
        ])
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let warning = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("--metrics-endpoint-auth=true cannot apply") => break line,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("no warning within 20 s; log:\n{}", seen.join("\n"));
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains("/metrics is served WITHOUT authentication"),
        "{warning}"
    );
}
