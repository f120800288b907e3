//! `switchyard sandbox-router` in front of the real `switchyard sandbox` runtime on loopback:
//! requests carrying upstream's `X-Sandbox-*` headers reach the runtime unchanged (health,
//! execute, upload + download through a streamed multipart body) and its replies come back byte
//! for byte; an unreachable sandbox is upstream's 502, a silent one a 504 at the proxy timeout, a
//! missing or wrong bearer token a 401; an invalid timeout is a startup error.
//!
//! Kubernetes DNS (`<id>.<namespace>.svc.cluster.local`) does not exist here: the router's
//! `--sandbox-host-template` points every sandbox at 127.0.0.1, and `X-Sandbox-Port` picks the
//! runtime.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use support::sandbox::SandboxRuntime;
use support::HttpClient;
use switchyard::sandbox::router::{start, RouterArgs, RunningRouter};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

async fn router(token: Option<&str>, timeout_s: f64) -> RunningRouter {
    let args = RouterArgs {
        host: "127.0.0.1".parse().unwrap(),
        port: 0,
        proxy_timeout_seconds: timeout_s,
        auth_token: token.map(str::to_owned),
        sandbox_host_template: "127.0.0.1".into(),
    };
    start(&args, std::future::pending()).await.unwrap()
}

fn sandbox_headers(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("x-sandbox-id", "sandbox-7".to_owned()),
        ("x-sandbox-namespace", "agents".to_owned()),
        ("x-sandbox-port", port.to_string()),
    ]
}

async fn send(
    router: &RunningRouter,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: impl Into<Bytes>,
) -> support::HttpResponse {
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    HttpClient::new()
        .send(
            method,
            &format!("http://{}{path}", router.addr),
            &h,
            body.into(),
        )
        .await
        .unwrap()
}

fn port_of(rt: &SandboxRuntime) -> u16 {
    rt.base.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_the_runtime_api_to_the_named_sandbox() {
    let rt = SandboxRuntime::start(BIN.as_ref(), &[], &[]).await.unwrap();
    let r = router(None, 30.0).await;
    let hs = sandbox_headers(port_of(&rt));

    let health = send(&r, Method::GET, "/healthz", &[], "").await;
    assert_eq!(
        (health.status.as_u16(), health.text()),
        (200, r#"{"status":"ok"}"#.to_owned())
    );

    let via = send(&r, Method::GET, "/", &hs, "").await;
    assert_eq!(via.status, 200);
    assert_eq!(
        via.text(),
        r#"{"status":"ok","message":"Sandbox Runtime is active."}"#
    );

    let mut json = hs.clone();
    json.push(("content-type", "application/json".to_owned()));
    let ran = send(
        &r,
        Method::POST,
        "/execute",
        &json,
        r#"{"command": "echo routed"}"#,
    )
    .await;
    assert_eq!(ran.status, 200, "{}", ran.text());
    let direct = rt.execute("echo routed").await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&ran.body).unwrap();
    assert_eq!(v["stdout"], direct.stdout);
    assert_eq!(v["exit_code"], 0);

    // A multipart upload through the router, then the file back through it.
    let boundary = "b0undary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"n.txt\"\r\n\r\nrouted bytes\r\n--{boundary}--\r\n"
    );
    let mut multipart = hs.clone();
    multipart.push((
        "content-type",
        format!("multipart/form-data; boundary={boundary}"),
    ));
    let up = send(&r, Method::POST, "/upload", &multipart, body).await;
    assert_eq!(up.status, 200, "{}", up.text());
    let down = send(&r, Method::GET, "/download/n.txt", &hs, "").await;
    assert_eq!(
        (down.status.as_u16(), &down.body[..]),
        (200, &b"routed bytes"[..])
    );
    assert_eq!(
        std::fs::read(rt.workspace.join("n.txt")).unwrap(),
        b"routed bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_silent_and_unauthenticated_sandboxes() {
    // Nothing listens on this port: upstream's 502.
    let closed = support::ports::free_port().unwrap();
    let r = router(None, 30.0).await;
    let gone = send(&r, Method::GET, "/", &sandbox_headers(closed), "").await;
    assert_eq!(gone.status, 502);
    assert_eq!(
        gone.text(),
        r#"{"detail":"Could not connect to the backend sandbox: sandbox-7"}"#
    );

    // Accepts and never answers: 504 at the proxy timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let _held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    let r = router(None, 0.5).await;
    let started = std::time::Instant::now();
    let slow = send(&r, Method::GET, "/", &sandbox_headers(silent_port), "").await;
    assert_eq!(slow.status, 504);
    assert_eq!(
        slow.text(),
        r#"{"detail":"The backend sandbox sandbox-7 did not answer within 0.5 s."}"#
    );
    assert!(started.elapsed() >= Duration::from_millis(450));

    let r = router(Some("t0ken"), 30.0).await;
    let mut hs = sandbox_headers(closed);
    let denied = send(&r, Method::GET, "/", &hs, "").await;
    assert_eq!(
        (denied.status.as_u16(), denied.text()),
        (
            401,
            r#"{"detail":"Missing or invalid Authorization header."}"#.to_owned()
        )
    );
    hs.push(("authorization", "Bearer t0ken".to_owned()));
    // Past the token check: the (closed) sandbox is tried.
    assert_eq!(send(&r, Method::GET, "/", &hs, "").await.status, 502);
    // The health check needs no token (probes carry none).
    assert_eq!(send(&r, Method::GET, "/healthz", &[], "").await.status, 200);
}

#[test]
fn an_invalid_timeout_is_a_startup_error() {
    let out = std::process::Command::new(BIN)
        .args(["sandbox-router", "--host", "127.0.0.1", "--port", "0"])
        .env("PROXY_TIMEOUT_SECONDS", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "--proxy-timeout-seconds (PROXY_TIMEOUT_SECONDS) must be a positive number of seconds, got 0"
        ),
        "{stderr}"
    );
}
