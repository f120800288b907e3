//! Sandboxes through agent-sandbox v1beta1: the agent creates a `SandboxClaim` naming the warm
//! pool, waits for it to be bound and its Sandbox `Ready`, reaches the runtime through the
//! sandbox router with upstream's `X-Sandbox-*` headers, and deletes the claim at the end — also
//! when the claim fails or never binds.
//!
//! No Kubernetes API server can run on these machines, so the API is a mock on loopback
//! (`MockApi`: create/get/delete of sandboxclaims, get of sandboxes, with the controller's
//! status updates simulated) behind a real `kube::Client`. The router is a mock too (it checks
//! the headers and forwards to a real `switchyard sandbox` runtime); the sandbox work is real.

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use parking_lot::Mutex;
use serde_json::{json, Value};
use support::sandbox::SandboxRuntime;
use support::HttpClient;
use switchyard::agent::claim::ClaimConfig;
use switchyard::agent::events::Event;
use switchyard::agent::gateway::GatewayConfig;
use switchyard::agent::http::HttpClient as AgentHttp;
use switchyard::agent::runner::{Agent, AgentConfig, TaskRequest};
use switchyard::agent::session::SandboxSource;
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
const NS: &str = "agents";
const CLAIMS: &str = "/apis/extensions.agents.x-k8s.io/v1beta1/namespaces/agents/sandboxclaims";
const GATEWAY: &str =
    "/apis/gateway.networking.k8s.io/v1/namespaces/agents/gateways/inference-gateway";
const SANDBOXES: &str = "/apis/agents.x-k8s.io/v1beta1/namespaces/agents/sandboxes";

/// How the simulated controller treats the claim.
#[derive(Debug, Clone, Copy)]
enum Controller {
    /// Bound to `sbx-1` from the 2nd claim GET; the Sandbox Ready from its 2nd GET.
    Binds,
    /// Ready=False with reason TemplateNotFound.
    TemplateMissing,
    /// Never bound.
    Stuck,
}

#[derive(Debug)]
struct ApiState {
    controller: Controller,
    claim: Option<Value>,
    claim_gets: u32,
    sandbox_gets: u32,
    gateway_gets: u32,
    /// "METHOD path" of every request.
    log: Vec<String>,
    created: Vec<Value>,
}

fn status_404(name: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("\"{name}\" not found"), "reason": "NotFound", "code": 404}),
        ),
    )
        .into_response()
}

async fn api(State(state): State<Arc<Mutex<ApiState>>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let body = to_bytes(request.into_body(), 1 << 20).await.unwrap();
    let mut s = state.lock();
    s.log.push(format!("{method} {path}"));
    let claim_name = s
        .claim
        .as_ref()
        .map(|c| c["metadata"]["name"].as_str().unwrap().to_string());
    if method == "POST" && path == CLAIMS {
        let mut claim: Value = serde_json::from_slice(&body).unwrap();
        s.created.push(claim.clone());
        claim["metadata"]["uid"] = json!("uid-1");
        claim["metadata"]["resourceVersion"] = json!("1");
        claim["metadata"]["namespace"] = json!(NS);
        s.claim = Some(claim.clone());
        return (StatusCode::CREATED, Json(claim)).into_response();
    }
    if let Some(name) = path.strip_prefix(&format!("{CLAIMS}/")) {
        let Some(mut claim) = s
            .claim
            .clone()
            .filter(|_| claim_name.as_deref() == Some(name))
        else {
            return status_404(name);
        };
        if method == "DELETE" {
            s.claim = None;
            return Json(claim).into_response();
        }
        s.claim_gets += 1;
        match s.controller {
            Controller::Binds if s.claim_gets >= 2 => {
                claim["status"] = json!({"sandbox": {"name": "sbx-1"}});
            }
            Controller::TemplateMissing => {
                claim["status"] = json!({"conditions": [{"type": "Ready", "status": "False",
                    "reason": "TemplateNotFound", "message": "warm pool python-pool has no template"}]});
            }
            _ => {}
        }
        return Json(claim).into_response();
    }
    if path == format!("{SANDBOXES}/sbx-1") && method == "GET" {
        s.sandbox_gets += 1;
        let ready = if s.sandbox_gets >= 2 { "True" } else { "False" };
        return Json(json!({"apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox",
            "metadata": {"name": "sbx-1", "namespace": NS},
            "status": {"conditions": [{"type": "Ready", "status": ready}], "podIPs": ["127.0.0.1"]}}))
        .into_response();
    }
    if path == GATEWAY && method == "GET" {
        s.gateway_gets += 1;
        let status = if s.gateway_gets >= 2 {
            json!({"addresses": [{"type": "IPAddress", "value": "fd00::7"}]})
        } else {
            json!({})
        };
        return Json(
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "inference-gateway", "namespace": NS}, "status": status}),
        )
        .into_response();
    }
    status_404(&path)
}

struct MockApi {
    state: Arc<Mutex<ApiState>>,
    client: kube::Client,
}

impl MockApi {
    async fn start(controller: Controller) -> Self {
        let state = Arc::new(Mutex::new(ApiState {
            controller,
            claim: None,
            claim_gets: 0,
            sandbox_gets: 0,
            gateway_gets: 0,
            log: Vec::new(),
            created: Vec::new(),
        }));
        let app = Router::new().fallback(api).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = kube::Config::new(url.parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        Self { state, client }
    }

    /// The log with the claim's (random) name replaced by NAME.
    fn log(&self) -> Vec<String> {
        let s = self.state.lock();
        let name = s
            .created
            .first()
            .map(|c| c["metadata"]["name"].as_str().unwrap().to_string());
        s.log
            .iter()
            .map(|l| match &name {
                Some(n) => l.replace(n.as_str(), "NAME"),
                None => l.clone(),
            })
            .collect()
    }
}

/// `X-Sandbox-*` headers of one request.
type Headers = Vec<(String, String)>;

/// The router: forwards to the runtime and records the `X-Sandbox-*` headers of each request.
#[derive(Clone)]
struct MockRouter {
    runtime: String,
    seen: Arc<Mutex<Vec<Headers>>>,
}

async fn route(State(router): State<MockRouter>, request: Request) -> Response {
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("x-sandbox-"))
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
        .collect();
    router.seen.lock().push(headers);
    let method = request.method().clone();
    let uri = request.uri().clone();
    let content_type = request
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let body = to_bytes(request.into_body(), 1 << 24).await.unwrap();
    let mut h = Vec::new();
    if let Some(ct) = &content_type {
        h.push(("content-type", ct.as_str()));
    }
    let r = HttpClient::new()
        .send(method, &format!("{}{}", router.runtime, uri), &h, body)
        .await
        .unwrap();
    (r.status, Body::from(r.body)).into_response()
}

async fn start_router(runtime: &str) -> (String, MockRouter) {
    let router = MockRouter {
        runtime: runtime.to_string(),
        seen: Arc::default(),
    };
    let app = Router::new().fallback(route).with_state(router.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, router)
}

/// A model that writes a file, runs it, and finishes.
async fn start_model() -> String {
    let turn = Arc::new(Mutex::new(0usize));
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(|State(turn): State<Arc<Mutex<usize>>>| async move {
                let n = {
                    let mut t = turn.lock();
                    *t += 1;
                    *t
                };
                let calls = match n {
                    1 => json!([
                        {"id": "1", "type": "function", "function": {"name": "write_file",
                            "arguments": "{\"path\": \"hello.py\", \"content\": \"print('hello from the claim')\\n\"}"}},
                        {"id": "2", "type": "function", "function": {"name": "shell",
                            "arguments": "{\"command\": \"python3 hello.py\"}"}}
                    ]),
                    _ => json!([{"id": "3", "type": "function", "function": {"name": "finish",
                        "arguments": "{\"answer\": \"ok\"}"}}]),
                };
                Json(json!({"choices": [{"index": 0, "finish_reason": "tool_calls",
                    "message": {"role": "assistant", "content": null, "tool_calls": calls}}]}))
            }),
        )
        .with_state(turn);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn agent(gateway: &str, api: &MockApi, router: &str, ready_timeout: Duration) -> Agent {
    Agent::new(
        AgentConfig {
            models: vec!["m".into()],
            gateway: GatewayConfig {
                url: gateway.into(),
                timeout: Duration::from_secs(20),
                temperature: 0.0,
                max_tokens: None,
            },
            sandbox: SandboxSource::Claim {
                client: api.client.clone(),
                router_url: router.into(),
                claim: ClaimConfig {
                    namespace: NS.into(),
                    warm_pool: "python-pool".into(),
                    ready_timeout,
                    poll_interval: Duration::from_millis(20),
                },
                port: 8888,
            },
            sandbox_timeout: Duration::from_secs(30),
            max_steps: 4,
            max_steps_limit: 8,
            malformed_retries: 1,
            system_prompt: "sys".into(),
        },
        AgentHttp::new(),
    )
}

async fn run(agent: &Agent) -> Vec<Event> {
    let (tx, mut rx) = mpsc::channel(64);
    let request = TaskRequest {
        task: "t".into(),
        ..TaskRequest::default()
    };
    let collect = async {
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            events.push(e);
        }
        events
    };
    let ((), events) = tokio::join!(agent.run(request, tx), collect);
    events
}

#[tokio::test]
async fn claims_a_sandbox_uses_it_through_the_router_and_deletes_the_claim() {
    let rt = SandboxRuntime::start(BIN.as_ref(), &[], &[]).await.unwrap();
    let api = MockApi::start(Controller::Binds).await;
    let (router_url, router) = start_router(&rt.base).await;
    let model = start_model().await;
    let events = run(&agent(&model, &api, &router_url, Duration::from_secs(20))).await;

    let created = api.state.lock().created.clone();
    assert_eq!(created.len(), 1);
    let name = created[0]["metadata"]["name"].as_str().unwrap().to_string();
    assert!(
        name.starts_with("switchyard-agent-") && name.len() == 29,
        "{name}"
    );
    let requested_at = created[0]["metadata"]["annotations"]
        ["agents.x-k8s.io/client-first-requested-at"]
        .as_str()
        .unwrap();
    assert!(
        humantime::parse_rfc3339(requested_at).is_ok(),
        "{requested_at}"
    );
    assert_eq!(
        created[0],
        json!({"apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxClaim",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "switchyard-agent"},
                "annotations": {"agents.x-k8s.io/client-first-requested-at": requested_at}},
            "spec": {"warmPoolRef": {"name": "python-pool"}}})
    );

    assert_eq!(
        events[..2],
        [
            Event::Started {
                task: "t".into(),
                models: vec!["m".into()],
                max_steps: 4,
                sandbox: format!("claim from warm pool agents/python-pool via {router_url}"),
            },
            Event::Sandbox {
                url: router_url.clone(),
                claim: Some(name.clone()),
            },
        ]
    );
    let shell = events
        .iter()
        .find_map(|e| match e {
            Event::Tool { name, output, .. } if name == "shell" => Some(output.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        shell,
        json!({"exit_code": 0, "stdout": "hello from the claim\n", "stderr": ""})
    );
    assert_eq!(
        events.last().unwrap(),
        &Event::Done {
            steps: 2,
            model: "m".into(),
            answer: "ok".into()
        }
    );
    assert_eq!(
        std::fs::read_to_string(rt.workspace.join("hello.py")).unwrap(),
        "print('hello from the claim')\n"
    );

    // Every runtime request carried the router headers upstream's client sends.
    let seen = router.seen.lock().clone();
    assert_eq!(seen.len(), 2, "upload and execute");
    for headers in seen {
        assert_eq!(
            headers,
            [
                ("x-sandbox-id", "sbx-1"),
                ("x-sandbox-namespace", "agents"),
                ("x-sandbox-port", "8888"),
                ("x-sandbox-timeout", "30"),
                ("x-sandbox-pod-ip", "127.0.0.1"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }
    // Created, polled until bound, the Sandbox polled until Ready, deleted once at the end.
    assert_eq!(
        api.log(),
        [
            format!("POST {CLAIMS}"),
            format!("GET {CLAIMS}/NAME"),
            format!("GET {CLAIMS}/NAME"),
            format!("GET {SANDBOXES}/sbx-1"),
            format!("GET {SANDBOXES}/sbx-1"),
            format!("DELETE {CLAIMS}/NAME"),
        ]
    );
    assert!(api.state.lock().claim.is_none());
}

#[tokio::test]
async fn a_failed_or_stuck_claim_is_deleted_and_reported() {
    let model = start_model().await;

    let api = MockApi::start(Controller::TemplateMissing).await;
    let events = run(&agent(
        &model,
        &api,
        "http://127.0.0.1:9",
        Duration::from_secs(20),
    ))
    .await;
    let name = api.state.lock().created[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        events.last().unwrap(),
        &Event::Failed {
            steps: 0,
            kind: "sandbox",
            message: format!(
                "no sandbox: SandboxClaim {name} failed: TemplateNotFound: warm pool python-pool has no template"
            ),
        }
    );
    assert_eq!(
        api.log(),
        [
            format!("POST {CLAIMS}"),
            format!("GET {CLAIMS}/NAME"),
            format!("DELETE {CLAIMS}/NAME"),
        ]
    );

    let api = MockApi::start(Controller::Stuck).await;
    let events = run(&agent(
        &model,
        &api,
        "http://127.0.0.1:9",
        Duration::from_millis(500),
    ))
    .await;
    let name = api.state.lock().created[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        events.last().unwrap(),
        &Event::Failed {
            steps: 0,
            kind: "sandbox",
            message: format!(
                "no sandbox: SandboxClaim {name}: no ready sandbox within 500ms (not bound to a sandbox)"
            ),
        }
    );
    let log = api.log();
    assert_eq!(log.first().unwrap(), &format!("POST {CLAIMS}"));
    assert_eq!(log.last().unwrap(), &format!("DELETE {CLAIMS}/NAME"));
    assert!(api.state.lock().claim.is_none());
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    options: switchyard::agent::config::AgentOptions,
}

#[tokio::test]
async fn gateway_url_comes_from_the_gateway_status_without_a_flag() {
    use clap::Parser;
    let api = MockApi::start(Controller::Stuck).await;
    // What the chart sets when `agent.gatewayURL` is empty (plus a runtime URL for the sandbox).
    let cli = Cli::try_parse_from([
        "agent",
        "--model=m",
        "--gateway-name=inference-gateway",
        "--namespace=agents",
        "--sandbox-url=http://127.0.0.1:8888",
    ])
    .unwrap();
    let client = api.client.clone();
    let config = cli
        .options
        .build(|| async move { Ok(client) })
        .await
        .unwrap();
    assert_eq!(config.gateway.url, "http://[fd00::7]");
    assert_eq!(
        api.log(),
        [format!("GET {GATEWAY}"), format!("GET {GATEWAY}")]
    );
}
