//! `switchyard bbr` behind a real Envoy (`deploy/envoy/bbr.yaml`): two models, two pools, one
//! Envoy. Each request reaches its model's pool (a LoRA adapter its base model's pool), a model
//! no route names gets Envoy's 404, and a body that is not JSON gets upstream BBR's 400.
//!
//! Envoy comes from `scripts/install-test-deps.sh`; without it this test prints `SKIPPED:`.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use clap::Parser;
use support::envoy::{pool_lb_endpoints, render};
use support::in_process_epp::LOOPBACK_PORTS;
use support::{tools, EnvoyProcess, HttpClient, MockModelServer};
use switchyard::bbr::{start, BbrArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BbrArgs,
}

const ADAPTERS: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: llama-adapters
  labels: {inference.networking.k8s.io/bbr-managed: \"true\"}
data:
  baseModel: meta-llama/Llama-3.1-8B-Instruct
  adapters: |
    - sql-lora
    - chat-lora
";

#[tokio::test]
async fn two_models_reach_their_own_pools() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");
    let a = MockModelServer::start(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0), "A")
        .await
        .unwrap();
    let b = MockModelServer::start(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0), "B")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let adapters = dir.path().join("adapters.yaml");
    std::fs::write(&adapters, ADAPTERS).unwrap();
    let adapters = adapters.to_str().unwrap().to_string();
    let argv = ["bbr"].into_iter().chain(LOOPBACK_PORTS).chain([
        "--secure-serving=false",
        "--streaming",
        "--adapters-file",
        &adapters,
    ]);
    let args = Cli::try_parse_from(argv).unwrap().args;
    let bbr = start(args).await.unwrap();
    let template = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy/bbr.yaml"),
    )
    .unwrap();
    let envoy = EnvoyProcess::start_rendered(&envoy_bin, |listen, admin| {
        render(
            &template,
            &[
                ("LISTEN_PORT", listen.to_string()),
                ("ADMIN_PORT", admin.to_string()),
                ("BBR_PORT", bbr.grpc_addr.port().to_string()),
                ("BBR_HEALTH_PORT", bbr.health_addr.port().to_string()),
                ("MODEL_A", "meta-llama/Llama-3.1-8B-Instruct".to_string()),
                ("MODEL_B", "Qwen/Qwen2.5-7B-Instruct".to_string()),
                ("POOL_A_LB_ENDPOINTS", pool_lb_endpoints(&[a.addr])),
                ("POOL_B_LB_ENDPOINTS", pool_lb_endpoints(&[b.addr])),
            ],
        )
    })
    .await
    .unwrap();

    let client = HttpClient::new();
    let url = envoy.url("/v1/completions");
    let send = |model: &str| {
        let body = format!(r#"{{"model":"{model}","prompt":"hello","max_tokens":2}}"#);
        let client = client.clone();
        let url = url.clone();
        async move { client.post_json(&url, &[], body).await.unwrap() }
    };
    for (model, want_a, want_b) in [
        ("meta-llama/Llama-3.1-8B-Instruct", 1, 0),
        ("Qwen/Qwen2.5-7B-Instruct", 1, 1),
        ("Qwen/Qwen2.5-7B-Instruct", 1, 2),
        // A LoRA adapter of pool A's base model goes by X-Gateway-Base-Model-Name.
        ("sql-lora", 2, 2),
        ("meta-llama/Llama-3.1-8B-Instruct", 3, 2),
    ] {
        let resp = send(model).await;
        assert_eq!(resp.status, 200, "{model}: {}", resp.text());
        assert_eq!(
            (a.requests_served(), b.requests_served()),
            (want_a, want_b),
            "{model}"
        );
        // The pool saw the headers BBR set.
        let (headers, _) = if want_b > 0 && model.starts_with("Qwen") {
            b.last_request().unwrap()
        } else {
            a.last_request().unwrap()
        };
        assert_eq!(headers["x-gateway-model-name"], model);
    }
    let (headers, _) = a.last_request().unwrap();
    assert_eq!(
        headers["x-gateway-base-model-name"],
        "meta-llama/Llama-3.1-8B-Instruct"
    );

    // No route for an unknown model: Envoy's 404, no pool reached.
    let resp = send("gpt-4").await;
    assert_eq!(resp.status, 404);
    assert_eq!((a.requests_served(), b.requests_served()), (3, 2));

    // Bad JSON: upstream BBR's reply, through Envoy.
    let resp = client.post_json(&url, &[], "{model}").await.unwrap();
    assert_eq!(resp.status, 400);
    assert_eq!(
        resp.text(),
        "inference error: BadRequest - failed to parse request body: invalid character 'm' looking for beginning of object key string"
    );
    assert_eq!((a.requests_served(), b.requests_served()), (3, 2));
}
