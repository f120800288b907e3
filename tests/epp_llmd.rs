//! llm-d-router configurations (`apiVersion: llm-d.ai/v1alpha1`) through the real binary
//! (`--check-config`) and an in-process `switchyard epp` over real gRPC, with mock vLLM servers
//! on 127.0.0.1/2 serving real Prometheus text: the upstream default plugin set routes by load,
//! session affinity brings a client back to its replica, an unknown plugin type is refused with
//! its name, and the conformance contract works behind its flag and its plugins.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use support::ext_proc::{
    destination, exchange, immediate, request_body, request_headers, response_headers,
    response_headers_reply, served_metadata, set_header,
};
use support::{InProcessEpp, MockModelServer, TestEpp};

const DEFAULT_CONFIG: &str = include_str!("../docs/examples/llm-d-default.yaml");
const SESSION_CONFIG: &str = include_str!("../docs/examples/llm-d-session-affinity.yaml");

fn examples(name: &str) -> String {
    format!("{}/docs/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// `switchyard epp --check-config` on a config file: (success, stdout, stderr).
fn check_config(path: &str) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "epp",
            "--check-config",
            "--endpoints",
            "127.0.0.1:8000",
            "--secure-serving=false",
            "--config-file",
            path,
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn llmd_configs_pass_check_config() {
    for name in ["llm-d-default.yaml", "llm-d-session-affinity.yaml"] {
        let (ok, stdout, stderr) = check_config(&examples(name));
        assert!(ok, "{name}: {stderr}");
        assert_eq!(stdout, "configuration OK\n", "{name}");
    }
}

#[test]
fn unknown_and_unsupported_plugin_types_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    let path = path.to_str().unwrap();
    std::fs::write(
        path,
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: fancy-scorer\n",
    )
    .unwrap();
    let (ok, _, stderr) = check_config(path);
    assert!(!ok);
    assert!(
        stderr.starts_with(&format!(
            "Error: invalid EndpointPickerConfig ({path})\n\nCaused by:\n    0: invalid EndpointPickerConfig: plugins[1]: plugin type 'fancy-scorer' is not registered at line 5 column 3\n"
        )),
        "{stderr}"
    );
    std::fs::write(
        path,
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: pd-profile-handler\n",
    )
    .unwrap();
    let (ok, _, stderr) = check_config(path);
    assert!(!ok);
    assert!(
        stderr.contains("    0: invalid EndpointPickerConfig: plugins[0]: plugin type 'pd-profile-handler' is not supported by switchyard: prefill/decode (and encode) disaggregation is not implemented; every request is scheduled by one profile onto one decode server that also prefills at line 4 column 3\n"),
        "{stderr}"
    );
}

struct Pods {
    servers: Vec<MockModelServer>,
    port: u16,
}

impl Pods {
    async fn start() -> Pods {
        let ips: Vec<IpAddr> = (1..=2)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
            .collect();
        let servers = MockModelServer::start_group(&ips, "P").await.unwrap();
        let port = servers[0].addr.port();
        Pods { servers, port }
    }

    fn addr(&self, i: usize) -> String {
        format!("127.0.0.{}:{}", i + 1, self.port)
    }
}

async fn start_epp(pods: &Pods, config: &str, extra: &[&str]) -> TestEpp {
    InProcessEpp::endpoints([pods.addr(0), pods.addr(1)])
        .config(config)
        .flags(&["--secure-serving=false", "--metrics-endpoint-auth=false"])
        .flags(extra)
        .start()
        .await
}

/// Waits until both endpoints carry these scraped queue depths.
async fn wait_scraped(epp: &TestEpp, queues: &[u32]) {
    epp.wait_until_scraped(queues, |m| m.waiting_queue_size)
        .await;
}

fn body(prompt: &str) -> Vec<u8> {
    format!(r#"{{"model":"m","prompt":"{prompt}","max_tokens":5}}"#).into_bytes()
}

#[tokio::test]
async fn llmd_default_config_routes_by_load() {
    let pods = Pods::start().await;
    pods.servers[0].set_metrics(10, 0, 0.9);
    pods.servers[1].set_metrics(0, 0, 0.1);
    let epp = start_epp(&pods, DEFAULT_CONFIG, &["--inflight-accounting=false"]).await;
    wait_scraped(&epp, &[10, 0]).await;
    for _ in 0..3 {
        let replies = exchange(
            epp.grpc_addr,
            vec![
                request_headers("/v1/completions", &[], false),
                request_body(&body("hello"), true),
            ],
        )
        .await;
        assert_eq!(destination(&replies), Some(pods.addr(1)));
    }
}

#[tokio::test]
async fn session_affinity_brings_the_client_back() {
    let pods = Pods::start().await;
    pods.servers[0].set_metrics(0, 0, 0.0);
    pods.servers[1].set_metrics(5, 0, 0.0);
    let epp = start_epp(&pods, SESSION_CONFIG, &[]).await;
    wait_scraped(&epp, &[0, 5]).await;

    // No token: load decides (pod 0), and the response hands out pod 0's token.
    let replies = exchange(
        epp.grpc_addr,
        vec![
            request_headers("/v1/completions", &[], false),
            request_body(&body("hi"), true),
            response_headers(None),
        ],
    )
    .await;
    assert_eq!(destination(&replies), Some(pods.addr(0)));
    let token = set_header(response_headers_reply(&replies).unwrap(), "x-session-token").unwrap();
    assert_eq!(token, base64_of(&pods.addr(0)));

    // Pod 0 gets busy; a client holding pod 1's token still goes to pod 1, one without goes
    // by load, and one holding pod 0's token stays on pod 0.
    pods.servers[0].set_metrics(9, 0, 0.0);
    wait_scraped(&epp, &[9, 5]).await;
    for (token, want) in [
        (Some(base64_of(&pods.addr(1))), 1),
        (None, 1),
        (Some(token), 0),
    ] {
        let extra: Vec<(&str, &str)> = token
            .as_deref()
            .map(|t| vec![("x-session-token", t)])
            .unwrap_or_default();
        let replies = exchange(
            epp.grpc_addr,
            vec![
                request_headers("/v1/completions", &extra, false),
                request_body(&body("hi"), true),
            ],
        )
        .await;
        assert_eq!(destination(&replies), Some(pods.addr(want)), "{token:?}");
    }
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The conformance suite's EPP config (GIE v1.5.0 `conformance/resources/base.yaml`), under
/// the llm-d apiVersion.
const CONFORMANCE_CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: destination-endpoint-served-verifier
schedulingProfiles:
- name: conformance-profile
  plugins:
  - pluginRef: header-based-testing-filter
";

/// Shaped like the suite's `GatewayFollowingEPPRouting` and `GatewayDestinationEndpointServed`
/// cases: the header picks each pod in turn (and a list of pods, in order), and the response
/// reports the endpoint Envoy says served the request.
#[tokio::test]
async fn conformance_plugins_follow_the_selection_header() {
    let pods = Pods::start().await;
    let epp = start_epp(&pods, CONFORMANCE_CONFIG, &[]).await;
    // A list of pods keeps them all as candidates; with no scorer they tie, and the picker
    // breaks ties at random (as upstream's max-score-picker), so either may be picked.
    let both = vec![pods.addr(1), pods.addr(0)];
    for (selection, allowed) in [
        (pods.addr(0), vec![pods.addr(0)]),
        (pods.addr(1), vec![pods.addr(1)]),
        ("127.0.0.2".to_string(), vec![pods.addr(1)]),
        (both.join(","), both.clone()),
    ] {
        // Envoy reports the first allowed pod as served; the verifier echoes what Envoy says.
        let served_by = allowed[0].clone();
        let replies = exchange(
            epp.grpc_addr,
            vec![
                request_headers(
                    "/v1/completions",
                    &[("test-epp-endpoint-selection", &selection)],
                    false,
                ),
                request_body(&body("x"), true),
                response_headers(Some(served_metadata(&served_by))),
            ],
        )
        .await;
        let picked = destination(&replies).unwrap_or_else(|| panic!("{selection}: no destination"));
        assert!(allowed.contains(&picked), "{selection}: picked {picked}");
        let served = set_header(
            response_headers_reply(&replies).unwrap(),
            "x-conformance-test-served-endpoint",
        );
        assert_eq!(served, Some(served_by));
    }
    // Without Envoy's served metadata the verifier says so.
    let replies = exchange(
        epp.grpc_addr,
        vec![
            request_headers(
                "/v1/completions",
                &[("test-epp-endpoint-selection", &pods.addr(0))],
                false,
            ),
            request_body(&body("x"), true),
            response_headers(None),
        ],
    )
    .await;
    assert_eq!(
        set_header(
            response_headers_reply(&replies).unwrap(),
            "x-conformance-test-served-endpoint"
        )
        .as_deref(),
        Some("fail: missing envoy lb metadata")
    );
    // A selection naming no pod leaves the filter nothing: the profile fails.
    let replies = exchange(
        epp.grpc_addr,
        vec![
            request_headers(
                "/v1/completions",
                &[("test-epp-endpoint-selection", "10.9.9.9")],
                false,
            ),
            request_body(&body("x"), true),
        ],
    )
    .await;
    assert_eq!(
        immediate(&replies[0]),
        Some((
            429,
            "inference error: ResourceExhausted - failed to find target endpoint: failed to run scheduler profile 'conformance-profile'".to_string()
        ))
    );
}

/// The lightweight EPP's contract behind `--enable-conformance-test-header`; without the flag
/// the header is an ordinary header and load decides.
#[tokio::test]
async fn conformance_header_flag_gates_the_contract() {
    let pods = Pods::start().await;
    pods.servers[0].set_metrics(0, 0, 0.0);
    pods.servers[1].set_metrics(9, 0, 0.9);
    let plain = start_epp(&pods, DEFAULT_CONFIG, &[]).await;
    let flagged = start_epp(&pods, DEFAULT_CONFIG, &["--enable-conformance-test-header"]).await;
    wait_scraped(&plain, &[0, 9]).await;
    wait_scraped(&flagged, &[0, 9]).await;
    let msgs = || {
        vec![
            request_headers(
                "/v1/completions",
                &[("test-epp-endpoint-selection", "127.0.0.2")],
                false,
            ),
            request_body(&body("x"), true),
            response_headers(Some(served_metadata("127.0.0.2:1"))),
        ]
    };
    let replies = exchange(plain.grpc_addr, msgs()).await;
    assert_eq!(destination(&replies), Some(pods.addr(0)));
    assert_eq!(
        set_header(
            response_headers_reply(&replies).unwrap(),
            "x-conformance-test-served-endpoint"
        ),
        None
    );
    let replies = exchange(flagged.grpc_addr, msgs()).await;
    assert_eq!(destination(&replies), Some(pods.addr(1)));
    assert_eq!(
        set_header(
            response_headers_reply(&replies).unwrap(),
            "x-conformance-test-served-endpoint"
        )
        .as_deref(),
        Some("127.0.0.2:1")
    );
}
