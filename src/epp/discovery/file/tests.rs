//! Pool-file tests: validation with line numbers, caps, and live reload from a temp directory.

use std::time::Instant;

use super::*;

const FULL: &str = "\
endpoints:
- address: 10.0.0.1:8000
  name: pod-a-rank-0
  engineType: sglang
  labels: {zone: a}
- address: \"[fd00::2]:8000\"
- address: 10.0.0.3:8000
  labels:
    inference.networking.k8s.io/engine-type: trtllm-serve
objectives:
- name: sql-lora
  priority: 2
- name: sql-lora-sheddable
  priority: -1
- name: unset
modelRewrites:
- model: model-to-be-rewritten
  targets: [{model: rewritten-model, weight: 1}]
- model: split
  targets:
  - {model: a, weight: 3}
  - {model: b}
";

fn names(ds: &Datastore) -> Vec<String> {
    ds.snapshot()
        .iter()
        .map(|s| s.endpoint.name.clone())
        .collect()
}

#[test]
fn full_file_is_validated_into_endpoints_and_policy() {
    let pool = parse_pool_file(FULL.as_bytes(), "pool.yaml").unwrap();
    assert_eq!(pool.endpoints.len(), 3);
    let a = &pool.endpoints[0];
    assert_eq!(a.name, "pod-a-rank-0");
    assert_eq!(a.addr, "10.0.0.1:8000".parse().unwrap());
    assert_eq!(a.engine, Some(EngineType::Sglang));
    assert_eq!(a.labels.get("zone").map(String::as_str), Some("a"));
    let b = &pool.endpoints[1];
    assert_eq!(b.name, "[fd00::2]:8000");
    assert_eq!(b.engine, None);
    assert_eq!(
        crate::epp::scrape::MetricsExtractorConfig::default().engine_of(b),
        EngineType::Vllm
    );
    assert!(b.labels.is_empty());
    assert_eq!(
        crate::epp::scrape::MetricsExtractorConfig::default().engine_of(&pool.endpoints[2]),
        EngineType::TrtllmServe
    );

    let objectives = &pool.policy.objectives;
    assert_eq!(objectives.len(), 3);
    assert_eq!(objectives["sql-lora"], 2);
    assert_eq!(objectives["sql-lora-sheddable"], -1);
    assert_eq!(objectives["unset"], 0);
    let rewrites = &pool.policy.model_rewrites;
    assert_eq!(
        rewrites["model-to-be-rewritten"],
        [RewriteTarget {
            model: "rewritten-model".into(),
            weight: 1
        }]
    );
    assert_eq!(
        rewrites["split"],
        [
            RewriteTarget {
                model: "a".into(),
                weight: 3
            },
            RewriteTarget {
                model: "b".into(),
                weight: 1
            }
        ]
    );
}

#[test]
fn minimal_file_and_empty_endpoint_list() {
    let pool = parse_pool_file(b"endpoints: []\n", "p").unwrap();
    assert!(pool.endpoints.is_empty());
    assert_eq!(pool.policy, RequestPolicy::default());
}

#[test]
fn bad_files_are_errors_naming_the_line() {
    let cases: [(&str, &str); 8] = [
        (
            "endpoints:\n- address: 10.0.0.1:8000\n  port: 3\n",
            "p: line 3, column 3: endpoints[0]: unknown field `port`, expected one of `address`, `name`, `engineType`, `labels`",
        ),
        (
            "endpoints:\n- address: 10.0.0.1:8000\n- address: nope\n",
            "p: line 3, column 12: endpoints[1].address: address \"nope\": expected ip:port (IPv6 as [addr]:port)",
        ),
        (
            "endpoints:\n- address: 10.0.0.1:0\n",
            "p: line 2, column 12: endpoints[0].address: address \"10.0.0.1:0\": port 0 is not routable",
        ),
        (
            "endpoints:\n- address: 10.0.0.1:8000\n  engineType: tgi\n",
            "p: line 3, column 15: endpoints[0].engineType: unknown engine type \"tgi\" (expected vllm, sglang, trtllm-serve or triton-tensorrt-llm)",
        ),
        ("endpoints:\n- name: x\n", "p: line 2, column 3: endpoints[0]: missing field `address`"),
        ("objectives: []\n", "p: line 1, column 1: missing field `endpoints`"),
        (
            "endpoints: []\nobjectives:\n- name: a\n  priority: high\n",
            "p: line 4, column 13: objectives[0].priority: invalid type: string \"high\", expected i32",
        ),
        ("endpoints: [\n", "p: line 2, column 1: did not find expected node content"),
    ];
    let mismatches: Vec<String> = cases
        .iter()
        .filter_map(|(text, message)| {
            let got = parse_pool_file(text.as_bytes(), "p")
                .unwrap_err()
                .to_string();
            (got != *message).then(|| format!("{text:?}\n  got:  {got}\n  want: {message}"))
        })
        .collect();
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn semantic_errors_name_the_entry() {
    let cases: [(&str, &str); 7] = [
        (
            "endpoints:\n- {address: 10.0.0.1:8000, name: a}\n- {address: 10.0.0.2:8000, name: a}\n",
            "p: endpoints[1]: duplicate name \"a\" (also endpoints[0])",
        ),
        (
            "endpoints:\n- {address: 10.0.0.1:8000, name: a}\n- {address: 10.0.0.1:8000, name: b}\n",
            "p: endpoints[1]: duplicate address 10.0.0.1:8000 (also endpoints[0])",
        ),
        (
            "endpoints:\n- address: 10.0.0.1:8000\n  labels: {inference.networking.k8s.io/engine-type: tgi}\n",
            "p: endpoints[0].labels: unknown engine type \"tgi\" (expected vllm, sglang, trtllm-serve or triton-tensorrt-llm)",
        ),
        (
            "endpoints: []\nobjectives: [{name: a}, {name: a, priority: 1}]\n",
            "p: objectives[1]: duplicate objective \"a\"",
        ),
        (
            "endpoints: []\nmodelRewrites: [{model: m, targets: []}]\n",
            "p: modelRewrites[0]: targets must not be empty",
        ),
        (
            "endpoints: []\nmodelRewrites: [{model: m, targets: [{model: x, weight: 0}]}]\n",
            "p: modelRewrites[0]: at least one target needs a weight above 0",
        ),
        (
            "endpoints: []\nmodelRewrites:\n- {model: m, targets: [{model: x}]}\n- {model: m, targets: [{model: y}]}\n",
            "p: modelRewrites[1]: duplicate rewrite for model \"m\"",
        ),
    ];
    for (text, message) in cases {
        let err = parse_pool_file(text.as_bytes(), "p").unwrap_err();
        assert_eq!(err.to_string(), message, "{text:?}");
    }
}

#[test]
fn size_and_count_caps() {
    let big = vec![b' '; MAX_POOL_FILE_BYTES as usize + 1];
    assert!(matches!(
        parse_pool_file(&big, "p"),
        Err(DiscoveryError::TooLarge { .. })
    ));
    let mut at_cap = String::from("endpoints:\n");
    for i in 0..MAX_ENDPOINTS {
        at_cap.push_str(&format!("- address: 10.{}.{}.1:8000\n", i / 256, i % 256));
    }
    assert_eq!(
        parse_pool_file(at_cap.as_bytes(), "p")
            .unwrap()
            .endpoints
            .len(),
        MAX_ENDPOINTS
    );
    let over = format!("{at_cap}- address: 10.255.255.1:8000\n");
    assert_eq!(
        parse_pool_file(over.as_bytes(), "p")
            .unwrap_err()
            .to_string(),
        "p: 10001 endpoints, over the limit of 10000"
    );
}

#[test]
fn load_pool_file_reports_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.yaml");
    let err = load_pool_file(&path).unwrap_err();
    assert!(matches!(err, DiscoveryError::Read { .. }), "{err}");
    std::fs::write(&path, FULL).unwrap();
    assert_eq!(load_pool_file(&path).unwrap().endpoints.len(), 3);
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Writes `text` to `path` the way a ConfigMap update does: a new file renamed over the old one.
fn replace_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn reloads_on_change_and_keeps_state_on_bad_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.yaml");
    std::fs::write(
        &path,
        "endpoints:\n- address: 10.0.0.1:8000\nobjectives: [{name: a, priority: 1}]\n",
    )
    .unwrap();
    let ds = Arc::new(Datastore::new());
    let (tx, rx) = watch::channel(false);
    let discovery = Box::new(FileDiscovery::new(path.clone(), Duration::from_millis(10)));
    let task = tokio::spawn(discovery.run(ds.clone(), rx));

    wait_until("first load", || ds.is_synced()).await;
    assert_eq!(names(&ds), ["10.0.0.1:8000"]);
    assert_eq!(ds.policy().objectives["a"], 1);

    // In-place edit.
    std::fs::write(
        &path,
        "endpoints:\n- address: 10.0.0.1:8000\n- address: 10.0.0.2:8000\n",
    )
    .unwrap();
    wait_until("reload", || ds.len() == 2).await;
    assert_eq!(names(&ds), ["10.0.0.1:8000", "10.0.0.2:8000"]);
    assert!(ds.policy().objectives.is_empty());

    // A bad file keeps the previous endpoints and policy.
    let version = *ds.subscribe().borrow();
    replace_by_rename(&path, "endpoints:\n- address: bogus\n");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(names(&ds), ["10.0.0.1:8000", "10.0.0.2:8000"]);
    assert_eq!(*ds.subscribe().borrow(), version, "no event applied");

    // The file vanishing (mid-swap) also keeps the state; the fixed file is then picked up.
    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(ds.len(), 2);
    replace_by_rename(
        &path,
        "endpoints:\n- {address: 10.0.0.3:8000, name: c}\nmodelRewrites: [{model: m, targets: [{model: n}]}]\n",
    );
    wait_until("reload after rename", || ds.slot("c").is_some()).await;
    assert_eq!(names(&ds), ["c"]);
    assert_eq!(ds.policy().model_rewrites["m"][0].model, "n");

    // Unchanged content is not re-applied.
    let version = *ds.subscribe().borrow();
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(*ds.subscribe().borrow(), version);

    tx.send(true).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn bad_file_at_startup_is_an_error_and_not_synced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.yaml");
    std::fs::write(&path, "endpoints:\n- address: 10.0.0.1:8000\n  weight: 3\n").unwrap();
    let ds = Arc::new(Datastore::new());
    let (_tx, rx) = watch::channel(false);
    let err = Box::new(FileDiscovery::new(path, Duration::from_millis(10)))
        .run(ds.clone(), rx)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("line 3, column 3"), "{err}");
    assert!(!ds.is_synced());
    assert!(ds.is_empty());
}
