//! Kubernetes discovery against the fake API server (tests/fake_apiserver; no real API server can
//! be installed on these machines): pods becoming ready, unready, deleted and re-labelled; pool
//! selector and ports changing; the v1alpha2 pool shape; selector mode without CRDs; objectives
//! and rewrites; a watch expiring with 410 Gone and recovering by re-listing.

mod fake_apiserver;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_apiserver::objects::*;
use fake_apiserver::FakeApiServer;
use switchyard::epp::datastore::{Datastore, RequestPolicy, RewriteTarget};
use switchyard::epp::discovery::kubernetes::{KubeDiscoveryConfig, KubernetesDiscovery};
use switchyard::epp::discovery::Discovery;
use switchyard::epp::endpoint::EngineType;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(10);

struct Running {
    ds: Arc<Datastore>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), switchyard::epp::discovery::DiscoveryError>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.send_replace(true);
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("discovery stops on shutdown");
        result.unwrap().unwrap();
    }
}

fn pool_config(group: &str) -> KubeDiscoveryConfig {
    KubeDiscoveryConfig {
        pool_name: "pool".into(),
        pool_namespace: NS.into(),
        pool_group: group.into(),
        endpoint_selector: None,
        endpoint_target_ports: vec![],
    }
}

fn start(fake: &FakeApiServer, config: KubeDiscoveryConfig) -> Running {
    let ds = Arc::new(Datastore::new());
    let (shutdown, rx) = watch::channel(false);
    let discovery: Box<dyn Discovery> = Box::new(KubernetesDiscovery::new(fake.client(), config));
    let task = tokio::spawn(discovery.run(ds.clone(), rx));
    Running { ds, shutdown, task }
}

fn endpoints(ds: &Datastore) -> Vec<(String, String)> {
    ds.snapshot()
        .iter()
        .map(|s| (s.endpoint.name.clone(), s.endpoint.addr.to_string()))
        .collect()
}

fn owned(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(n, a)| (n.to_string(), a.to_string()))
        .collect()
}

/// Waits until the datastore holds exactly `expected` (name, address), sorted by name.
async fn expect_endpoints(ds: &Datastore, expected: &[(&str, &str)]) {
    let want = owned(expected);
    let start = Instant::now();
    loop {
        let got = endpoints(ds);
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "endpoints: want {want:?}, got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn expect_policy(ds: &Datastore, want: &RequestPolicy) {
    let start = Instant::now();
    loop {
        let got = ds.policy();
        if *got == *want {
            return;
        }
        assert!(start.elapsed() < WAIT, "policy: want {want:?}, got {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const APP: (&str, &str) = ("app", "vllm");

#[tokio::test]
async fn pods_ready_unready_deleted_relabelled() {
    let fake = FakeApiServer::start().await;
    fake.apply(pool_v1("pool", &[APP], &[8000]));
    fake.apply(pod("p1", "10.0.0.1", &[APP], true));
    fake.apply(pod("p2", "10.0.0.2", &[APP], false));
    fake.apply(pod("p3", "10.0.0.3", &[("app", "other")], true));
    let run = start(&fake, pool_config("inference.networking.k8s.io"));

    expect_endpoints(&run.ds, &[("p1-rank-0", "10.0.0.1:8000")]).await;
    assert!(run.ds.is_synced());

    // p2 becomes ready.
    fake.apply(pod("p2", "10.0.0.2", &[APP], true));
    expect_endpoints(
        &run.ds,
        &[
            ("p1-rank-0", "10.0.0.1:8000"),
            ("p2-rank-0", "10.0.0.2:8000"),
        ],
    )
    .await;
    // p1 becomes unready.
    fake.apply(pod("p1", "10.0.0.1", &[APP], false));
    expect_endpoints(&run.ds, &[("p2-rank-0", "10.0.0.2:8000")]).await;
    // p3 is re-labelled into the pool, p2 out of it (the selector watch sees p2 as deleted).
    fake.apply(pod("p3", "10.0.0.3", &[APP], true));
    expect_endpoints(
        &run.ds,
        &[
            ("p2-rank-0", "10.0.0.2:8000"),
            ("p3-rank-0", "10.0.0.3:8000"),
        ],
    )
    .await;
    fake.apply(pod("p2", "10.0.0.2", &[("app", "retired")], true));
    expect_endpoints(&run.ds, &[("p3-rank-0", "10.0.0.3:8000")]).await;
    // p3 starts terminating: gone at once, before the object is deleted.
    fake.apply(deleting(pod("p3", "10.0.0.3", &[APP], true)));
    expect_endpoints(&run.ds, &[]).await;
    fake.delete(POD, NS, "p3");
    // A new pod with an engine label: the endpoint carries the engine and the pod's labels.
    fake.apply(pod(
        "p4",
        "10.0.0.4",
        &[APP, (EngineType::LABEL, "sglang"), ("zone", "a")],
        true,
    ));
    expect_endpoints(&run.ds, &[("p4-rank-0", "10.0.0.4:8000")]).await;
    let ep = run.ds.slot("p4-rank-0").unwrap().endpoint();
    assert_eq!(
        switchyard::epp::scrape::MetricsExtractorConfig::default().engine_of(&ep),
        EngineType::Sglang
    );
    assert_eq!(ep.labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(ep.labels.len(), 3);
    // Deleted outright.
    fake.delete(POD, NS, "p4");
    expect_endpoints(&run.ds, &[]).await;
    run.stop().await;
}

#[tokio::test]
async fn pool_selector_and_ports_change() {
    let fake = FakeApiServer::start().await;
    fake.apply(pool_v1("pool", &[("app", "a")], &[8000]));
    fake.apply(pod("a1", "10.0.1.1", &[("app", "a")], true));
    fake.apply(pod("b1", "10.0.2.1", &[("app", "b")], true));
    fake.apply(pod("b2", "10.0.2.2", &[("app", "b")], true));
    let run = start(&fake, pool_config("inference.networking.k8s.io"));
    expect_endpoints(&run.ds, &[("a1-rank-0", "10.0.1.1:8000")]).await;
    assert_eq!(fake.requests("list /pods"), 1);

    // A second target port: one endpoint per port, ranked by position, no re-list needed.
    fake.apply(pool_v1("pool", &[("app", "a")], &[8000, 8001]));
    expect_endpoints(
        &run.ds,
        &[
            ("a1-rank-0", "10.0.1.1:8000"),
            ("a1-rank-1", "10.0.1.1:8001"),
        ],
    )
    .await;
    assert_eq!(fake.requests("list /pods"), 1);

    // New selector: the pods are re-listed with it.
    fake.apply(pool_v1("pool", &[("app", "b")], &[8000, 8001]));
    expect_endpoints(
        &run.ds,
        &[
            ("b1-rank-0", "10.0.2.1:8000"),
            ("b1-rank-1", "10.0.2.1:8001"),
            ("b2-rank-0", "10.0.2.2:8000"),
            ("b2-rank-1", "10.0.2.2:8001"),
        ],
    )
    .await;
    assert_eq!(fake.requests("list /pods"), 2);

    // Ports shrink to the second one: rank follows the new position.
    fake.apply(pool_v1("pool", &[("app", "b")], &[8001]));
    expect_endpoints(
        &run.ds,
        &[
            ("b1-rank-0", "10.0.2.1:8001"),
            ("b2-rank-0", "10.0.2.2:8001"),
        ],
    )
    .await;

    // Pool deleted: the datastore is cleared, as in the reference.
    fake.delete(POOL_V1, NS, "pool");
    expect_endpoints(&run.ds, &[]).await;
    // ... and it comes back.
    fake.apply(pool_v1("pool", &[("app", "a")], &[9000]));
    expect_endpoints(&run.ds, &[("a1-rank-0", "10.0.1.1:9000")]).await;
    run.stop().await;
}

#[tokio::test]
async fn not_synced_until_the_pool_exists_and_v1alpha2_shape() {
    let fake = FakeApiServer::start().await;
    fake.apply(pod("s1", "10.0.3.1", &[("app", "sg")], true));
    // A v1 pool of the same name must not be read when the old group is configured.
    fake.apply(pool_v1("pool", &[("app", "sg")], &[1234]));
    let run = start(&fake, pool_config("inference.networking.x-k8s.io"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!run.ds.is_synced());
    assert!(run.ds.is_empty());

    fake.apply(pool_v1alpha2("pool", &[("app", "sg")], 30000));
    expect_endpoints(&run.ds, &[("s1-rank-0", "10.0.3.1:30000")]).await;
    assert!(run.ds.is_synced());
    run.stop().await;
}

#[tokio::test]
async fn endpoint_selector_mode_reads_no_crd() {
    let fake = FakeApiServer::start().await;
    fake.apply(pod("m1", "10.0.4.1", &[APP, ("tier", "gpu")], true));
    fake.apply(pod("m2", "10.0.4.2", &[APP, ("tier", "cpu")], true));
    let config = KubeDiscoveryConfig {
        endpoint_selector: Some("app=vllm,tier!=cpu".into()),
        endpoint_target_ports: vec![8000, 8002],
        ..pool_config("inference.networking.k8s.io")
    };
    let run = start(&fake, config);
    expect_endpoints(
        &run.ds,
        &[
            ("m1-rank-0", "10.0.4.1:8000"),
            ("m1-rank-1", "10.0.4.1:8002"),
        ],
    )
    .await;
    assert!(run.ds.is_synced());
    fake.apply(pod("m2", "10.0.4.2", &[APP, ("tier", "gpu")], true));
    expect_endpoints(
        &run.ds,
        &[
            ("m1-rank-0", "10.0.4.1:8000"),
            ("m1-rank-1", "10.0.4.1:8002"),
            ("m2-rank-0", "10.0.4.2:8000"),
            ("m2-rank-1", "10.0.4.2:8002"),
        ],
    )
    .await;
    assert_eq!(fake.requests(&format!("list {POOL_V1}")), 0);
    assert_eq!(fake.requests(&format!("list {OBJECTIVE}")), 0);
    run.stop().await;
}

fn policy(objectives: &[(&str, i32)], rewrites: &[(&str, &[(&str, u32)])]) -> RequestPolicy {
    RequestPolicy {
        objectives: objectives
            .iter()
            .map(|(n, p)| (n.to_string(), *p))
            .collect(),
        model_rewrites: rewrites
            .iter()
            .map(|(m, ts)| {
                let targets = ts
                    .iter()
                    .map(|(t, w)| RewriteTarget {
                        model: t.to_string(),
                        weight: *w,
                    })
                    .collect();
                (m.to_string(), targets)
            })
            .collect::<HashMap<_, _>>(),
        default_rewrite: None,
    }
}

#[tokio::test]
async fn objectives_and_rewrites_for_our_pool() {
    let fake = FakeApiServer::start().await;
    fake.apply(pool_v1("pool", &[APP], &[8000]));
    fake.apply(objective("sql-lora", "pool", Some(2)));
    fake.apply(objective("sql-lora-sheddable", "pool", Some(0)));
    fake.apply(objective("unset", "pool", None));
    fake.apply(objective("elsewhere", "other-pool", Some(9)));
    fake.apply(rewrite(
        "r-old",
        "pool",
        "model-to-be-rewritten",
        &[("rewritten-model", 1)],
        "2026-01-01T00:00:00Z",
    ));
    fake.apply(rewrite(
        "r-new",
        "pool",
        "model-to-be-rewritten",
        &[("ignored", 1)],
        "2026-03-01T00:00:00Z",
    ));
    fake.apply(rewrite(
        "r-other",
        "other-pool",
        "m",
        &[("x", 1)],
        "2026-01-01T00:00:00Z",
    ));
    let run = start(&fake, pool_config("inference.networking.k8s.io"));
    expect_policy(
        &run.ds,
        &policy(
            &[("sql-lora", 2), ("sql-lora-sheddable", 0), ("unset", 0)],
            &[("model-to-be-rewritten", &[("rewritten-model", 1)])],
        ),
    )
    .await;

    // Priority changes; the sheddable one goes negative; one is deleted.
    fake.apply(objective("sql-lora", "pool", Some(5)));
    fake.apply(objective("sql-lora-sheddable", "pool", Some(-1)));
    fake.delete(OBJECTIVE, NS, "unset");
    // The older rewrite is deleted: the newer one takes over; a weighted split is added.
    fake.delete(REWRITE, NS, "r-old");
    fake.apply(rewrite(
        "split",
        "pool",
        "canary",
        &[("canary-v1", 90), ("canary-v2", 10)],
        "2026-02-01T00:00:00Z",
    ));
    expect_policy(
        &run.ds,
        &policy(
            &[("sql-lora", 5), ("sql-lora-sheddable", -1)],
            &[
                ("model-to-be-rewritten", &[("ignored", 1)]),
                ("canary", &[("canary-v1", 90), ("canary-v2", 10)]),
            ],
        ),
    )
    .await;

    // An objective moved to another pool no longer applies.
    fake.apply(objective("sql-lora", "other-pool", Some(5)));
    expect_policy(
        &run.ds,
        &policy(
            &[("sql-lora-sheddable", -1)],
            &[
                ("model-to-be-rewritten", &[("ignored", 1)]),
                ("canary", &[("canary-v1", 90), ("canary-v2", 10)]),
            ],
        ),
    )
    .await;
    run.stop().await;
}

#[tokio::test]
async fn watch_expired_with_410_relists_and_recovers() {
    let fake = FakeApiServer::start().await;
    fake.apply(pool_v1("pool", &[APP], &[8000]));
    fake.apply(pod("e1", "10.0.5.1", &[APP], true));
    fake.apply(objective("o", "pool", Some(1)));
    let run = start(&fake, pool_config("inference.networking.k8s.io"));
    expect_endpoints(&run.ds, &[("e1-rank-0", "10.0.5.1:8000")]).await;
    expect_policy(&run.ds, &policy(&[("o", 1)], &[])).await;
    let pod_lists = fake.requests("list /pods");
    let objective_lists = fake.requests(&format!("list {OBJECTIVE}"));

    // Compaction: open watches end, their versions are too old. Changes made meanwhile are
    // only seen through the re-list.
    fake.expire_watches();
    fake.delete(POD, NS, "e1");
    fake.apply(pod("e2", "10.0.5.2", &[APP], true));
    fake.apply(objective("o", "pool", Some(3)));
    expect_endpoints(&run.ds, &[("e2-rank-0", "10.0.5.2:8000")]).await;
    expect_policy(&run.ds, &policy(&[("o", 3)], &[])).await;
    assert!(
        fake.requests("list /pods") > pod_lists,
        "pods were re-listed after 410"
    );
    assert!(fake.requests(&format!("list {OBJECTIVE}")) > objective_lists);

    // And the new watch delivers live events again.
    fake.apply(pod("e3", "10.0.5.3", &[APP], true));
    expect_endpoints(
        &run.ds,
        &[
            ("e2-rank-0", "10.0.5.2:8000"),
            ("e3-rank-0", "10.0.5.3:8000"),
        ],
    )
    .await;
    run.stop().await;
}
