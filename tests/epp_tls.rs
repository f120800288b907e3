//! `--secure-serving`: the ext_proc port speaks TLS (ALPN h2) with a self-signed certificate by
//! default, or the one in `--cert-path` (reloaded with `--enable-cert-reload`), and real gRPC
//! works over it. SIGTERM-style shutdown drains open streams.

mod support;

use rustls::pki_types::ServerName;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request as Msg, processing_response::Response as Reply, HttpHeaders,
    ProcessingRequest,
};
use support::{InProcessEpp, TestEpp};
use switchyard::epp::server::RunningEpp;
use tokio::net::TcpStream;

/// Handshakes and returns (negotiated ALPN, leaf certificate DER).
async fn handshake(epp: &RunningEpp) -> (Option<Vec<u8>>, Vec<u8>) {
    let tcp = TcpStream::connect(epp.grpc_addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(support::tls_client::insecure_h2_config());
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (_, conn) = tls.get_ref();
    let alpn = conn.alpn_protocol().map(|p| p.to_vec());
    let leaf = conn.peer_certificates().unwrap()[0].to_vec();
    (alpn, leaf)
}

async fn start_epp(extra: &[&str]) -> TestEpp {
    InProcessEpp::endpoints(["127.0.0.1:9"])
        .flags(&["--drain-timeout", "2s"])
        .flags(extra)
        .start()
        .await
}

/// `GET /v1/models` without a body: routed on the headers alone.
fn header_only_request() -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Msg::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![HeaderValue {
                    key: ":path".into(),
                    value: String::new(),
                    raw_value: b"/v1/models".to_vec(),
                }],
            }),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// A header-only ext_proc request over TLS (real gRPC on a rustls stream).
async fn grpc_over_tls(epp: &RunningEpp) -> Reply {
    let addr = epp.grpc_addr;
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
    let msg = header_only_request();
    let mut stream = client
        .process(tokio_stream::iter(vec![msg]))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap().response.unwrap()
}

#[tokio::test]
async fn self_signed_by_default_and_grpc_works_over_tls() {
    let epp = start_epp(&[]).await;
    let (alpn, leaf) = handshake(&epp).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert!(!leaf.is_empty());
    // Routed to the only endpoint (header-only request).
    match grpc_over_tls(&epp).await {
        Reply::RequestHeaders(h) => {
            let set = &h.response.unwrap().header_mutation.unwrap().set_headers;
            let dest = set
                .iter()
                .find(|o| o.header.as_ref().unwrap().key == "x-gateway-destination-endpoint")
                .unwrap();
            assert_eq!(dest.header.as_ref().unwrap().raw_value, b"127.0.0.1:9");
        }
        other => panic!("unexpected reply {other:?}"),
    }
    epp.shutdown().await;
}

fn write_cert(dir: &std::path::Path, name: &str) -> Vec<u8> {
    let cert = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    std::fs::write(dir.join("tls.key"), cert.key_pair.serialize_pem()).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.cert.pem()).unwrap();
    cert.cert.der().to_vec()
}

#[tokio::test]
async fn cert_path_is_served_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let first = write_cert(dir.path(), "first.example");
    let path = dir.path().to_str().unwrap().to_string();
    let epp = start_epp(&["--cert-path", &path, "--enable-cert-reload"]).await;
    assert_eq!(handshake(&epp).await.1, first);

    // mtime granularity: make sure the rewrite is seen as a change.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = write_cert(dir.path(), "second.example");
    let deadline = Instant::now() + Duration::from_secs(10);
    while handshake(&epp).await.1 != second {
        assert!(Instant::now() < deadline, "certificate never reloaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    epp.shutdown().await;
}

#[tokio::test]
async fn bad_cert_path_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_string();
    let err = InProcessEpp::endpoints(["127.0.0.1:9"])
        .flags(&["--cert-path", &path])
        .try_start()
        .await
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        format!("reading {path}/tls.crt: No such file or directory (os error 2)")
    );
}

#[tokio::test]
async fn shutdown_waits_for_open_streams_then_stops() {
    let epp = InProcessEpp::endpoints(["127.0.0.1:9"])
        .flags(&["--secure-serving=false", "--drain-timeout", "20s"])
        .start()
        .await;
    let mut client = ExternalProcessorClient::connect(format!("http://{}", epp.grpc_addr))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let headers = header_only_request();
    tx.send(headers).await.unwrap();
    let mut stream = client
        .process(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());

    // The stream is still open (the response path has not happened): shutdown must wait.
    let started = Instant::now();
    let shutdown = tokio::spawn(epp.shutdown());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !shutdown.is_finished(),
        "shutdown did not wait for the open stream"
    );

    // Envoy finishes the request: the stream closes and the drain completes well before 20 s.
    drop(tx);
    while let Ok(Some(_)) = stream.message().await {}
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("drain did not finish")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(6));
}
