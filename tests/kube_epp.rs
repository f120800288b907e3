//! `switchyard epp` wired to Kubernetes, end to end against the fake API server
//! (tests/fake_apiserver; no real API server can be installed on these machines) reached through
//! a kubeconfig: endpoints from the InferencePool, readiness only after the sync and only on the
//! leader (liveness unaffected), losing the lease stops readiness, `/metrics` behind
//! TokenReview + SubjectAccessReview.

mod fake_apiserver;
mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use fake_apiserver::objects::*;
use fake_apiserver::FakeApiServer;
use support::http_client::HttpClient;
use support::InProcessEpp;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const LEASE_NAME: &str = "epp-default-pool.gateway-api-inference-extension.sigs.k8s.io";
const READER: &str = "system:serviceaccount:default:inference-gateway-sa-metrics-reader";
/// The reference lease duration the EPP uses.
const LEASE_DURATION: Duration = Duration::from_secs(15);

async fn health(addr: std::net::SocketAddr, service: &str) -> i32 {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .unwrap();
    reply.into_inner().status
}

async fn wait_health(
    addr: std::net::SocketAddr,
    service: &str,
    want: ServingStatus,
    within: Duration,
) {
    let start = Instant::now();
    loop {
        let got = health(addr, service).await;
        if got == want as i32 {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{service}: want {want:?}, got {got}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn epp_in_kubernetes_discovery_leader_readiness_and_metrics_auth() {
    let fake = FakeApiServer::start().await;
    fake.apply(pool_v1("pool", &[("app", "vllm")], &[18000]));
    // Loopback pod IPs with nothing listening: scrapes fail fast and do not matter here.
    fake.apply(pod("p1", "127.0.0.1", &[("app", "vllm")], true));
    fake.apply(pod("p2", "127.0.0.2", &[("app", "vllm")], true));
    fake.apply(pod("p3", "127.0.0.3", &[("app", "vllm")], false));
    fake.add_token("reader-token", READER, &[]);
    fake.add_token("app-token", "system:serviceaccount:default:app", &[]);
    fake.allow_metrics(READER);

    let mut kubeconfig = tempfile::NamedTempFile::new().unwrap();
    write!(
        kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
         users:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\n    namespace: default\n\
         current-context: c\n",
        fake.url()
    )
    .unwrap();
    // The only test in this binary, so nothing else reads the environment concurrently.
    std::env::set_var("KUBECONFIG", kubeconfig.path());

    let epp = InProcessEpp::discovered()
        .flags(&[
            "--pool-name",
            "pool",
            "--pool-namespace",
            NS,
            "--secure-serving=false",
            "--ha-enable-leader-election",
            "--metrics-endpoint-auth=true",
        ])
        .start()
        .await;

    // Endpoints from the pool; ready once synced and leading.
    wait_health(
        epp.health_addr,
        "readiness",
        ServingStatus::Serving,
        Duration::from_secs(10),
    )
    .await;
    let names: Vec<_> = epp
        .datastore
        .snapshot()
        .iter()
        .map(|s| (s.endpoint.name.clone(), s.endpoint.addr.to_string()))
        .collect();
    assert_eq!(
        names,
        [
            ("p1-rank-0".to_string(), "127.0.0.1:18000".to_string()),
            ("p2-rank-0".to_string(), "127.0.0.2:18000".to_string())
        ]
    );
    let stored = fake
        .get(LEASE, NS, LEASE_NAME)
        .expect("the EPP created its lease");
    assert!(stored["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .starts_with("switchyard-epp_"));
    assert_eq!(stored["spec"]["leaseDurationSeconds"], 15);

    // /metrics: 401 without or with a bad token, 403 for a user without the RBAC, 200 for the reader.
    let http = HttpClient::new();
    let url = format!("http://{}/metrics", epp.metrics_addr);
    let get = |token: Option<&'static str>| {
        let http = &http;
        let url = url.clone();
        async move {
            let auth = token.map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("authorization", a.as_str())).collect();
            http.send(http::Method::GET, &url, &headers, Default::default())
                .await
                .unwrap()
        }
    };
    assert_eq!(get(None).await.status, 401);
    assert_eq!(get(Some("wrong")).await.status, 401);
    assert_eq!(get(Some("app-token")).await.status, 403);
    let ok = get(Some("reader-token")).await;
    assert_eq!(ok.status, 200);
    assert!(
        ok.text().contains("inference_pool_ready_pods"),
        "{}",
        ok.text()
    );

    // Another replica takes the lease: not ready within the lease duration, still live.
    let taken = Instant::now();
    fake.apply(lease(LEASE_NAME, "other-replica", 15));
    wait_health(
        epp.health_addr,
        "readiness",
        ServingStatus::NotServing,
        LEASE_DURATION,
    )
    .await;
    wait_health(
        epp.health_addr,
        "envoy.service.ext_proc.v3.ExternalProcessor",
        ServingStatus::NotServing,
        Duration::from_secs(1),
    )
    .await;
    assert!(taken.elapsed() < LEASE_DURATION);
    assert_eq!(
        health(epp.health_addr, "liveness").await,
        ServingStatus::Serving as i32
    );

    epp.shutdown().await;
}
