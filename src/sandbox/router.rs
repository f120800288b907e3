//! `switchyard sandbox-router`: agent-sandbox's sandbox router (v0.5.6
//! `clients/python/agentic-sandbox-client/sandbox-router`), so the code-agent chart needs no
//! upstream staging image. A request names its sandbox in `X-Sandbox-ID` (plus
//! `X-Sandbox-Namespace`, default `default`, and `X-Sandbox-Port`, default 8888) and is forwarded,
//! streamed both ways, to `http://<id>.<namespace>.svc.cluster.local:<port>` with the same path,
//! query and headers (less `host` and hop-by-hop headers). Errors are upstream's FastAPI shape
//! `{"detail": …}` with its texts: 400 for a missing or malformed id, namespace or port, 401 for a
//! missing or wrong bearer token when `ROUTER_AUTH_TOKEN` is set, 502 when the sandbox cannot be
//! reached. Differences: a sandbox that does not answer within the proxy timeout is a 504 (upstream:
//! 500), an invalid `PROXY_TIMEOUT_SECONDS` is a startup error (upstream: a warning and 180 s), and
//! only ASCII letters and digits (with `-`) are accepted in names, as DNS requires.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

use crate::serve::kv_events::{digests_equal, sha256};

const DEFAULT_NAMESPACE: &str = "default";
const DEFAULT_SANDBOX_PORT: u16 = 8888;

/// Command-line flags of `switchyard sandbox-router` (upstream's environment names).
#[derive(Debug, Clone, clap::Args)]
pub struct RouterArgs {
    #[arg(long, default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// HTTP port (upstream's image listens on 8080; 0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Seconds to wait for a sandbox to connect and answer (must be > 0).
    #[arg(long, env = "PROXY_TIMEOUT_SECONDS", default_value_t = 180.0)]
    pub proxy_timeout_seconds: f64,
    /// Bearer token every proxied request must carry; unset: no authentication (warned).
    #[arg(long, env = "ROUTER_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Host a sandbox is reached at; `{id}` and `{namespace}` are replaced (tests point it at
    /// loopback).
    #[arg(long, default_value = "{id}.{namespace}.svc.cluster.local")]
    pub sandbox_host_template: String,
}

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("--proxy-timeout-seconds (PROXY_TIMEOUT_SECONDS) must be a positive number of seconds, got {0}")]
    Timeout(f64),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

struct Routing {
    client: Client<HttpConnector, Body>,
    timeout: Duration,
    /// SHA-256 of the required bearer token (compared by digest, as the KV-event stream does).
    token_digest: Option<[u8; 32]>,
    host_template: String,
}

/// A started router.
pub struct RunningRouter {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Binds and serves until `shutdown` completes.
pub async fn start(
    args: &RouterArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<RunningRouter, RouterError> {
    let secs = args.proxy_timeout_seconds;
    if !(secs.is_finite() && secs > 0.0) {
        return Err(RouterError::Timeout(secs));
    }
    if args.auth_token.is_none() {
        tracing::warn!(
            "ROUTER_AUTH_TOKEN is not set: anyone who can reach the router can use every sandbox"
        );
    }
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs_f64(secs)));
    let routing = Arc::new(Routing {
        client: Client::builder(TokioExecutor::new()).build(connector),
        timeout: Duration::from_secs_f64(secs),
        token_digest: args
            .auth_token
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(|t| sha256(t.as_bytes())),
        host_template: args.sandbox_host_template.clone(),
    });
    let app = Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .fallback(proxy)
        .with_state(routing);
    let addr = SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RouterError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| RouterError::Bind { addr, source })?;
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    Ok(RunningRouter { addr, task })
}

/// `switchyard sandbox-router`.
pub async fn run(args: RouterArgs) -> anyhow::Result<()> {
    crate::process::init_logging("info", crate::process::LogFormat::Console);
    let running = start(&args, async {
        crate::process::shutdown_signal().await;
    })
    .await?;
    tracing::info!(addr = %running.addr, timeout_s = args.proxy_timeout_seconds, "sandbox router listening");
    running.task.await??;
    Ok(())
}

fn detail(status: StatusCode, text: impl Into<String>) -> Response {
    (status, Json(json!({"detail": text.into()}))).into_response()
}

/// Upstream's check: non-empty once `-` is removed, and only letters and digits.
fn dns_safe(name: &str) -> bool {
    let rest: Vec<u8> = name.bytes().filter(|&b| b != b'-').collect();
    !rest.is_empty() && rest.iter().all(u8::is_ascii_alphanumeric)
}

/// Why a request is not forwarded: upstream's status and `detail` text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refusal(StatusCode, &'static str);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        detail(self.0, self.1)
    }
}

/// Where a request goes, from its headers.
fn target(routing: &Routing, headers: &HeaderMap, uri: &Uri) -> Result<(String, Uri), Refusal> {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    if let Some(want) = &routing.token_digest {
        let presented = text("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|v| v.split(' ').next().unwrap_or(""));
        match presented {
            None => {
                return Err(Refusal(
                    StatusCode::UNAUTHORIZED,
                    "Missing or invalid Authorization header.",
                ))
            }
            Some(t) if !digests_equal(&sha256(t.as_bytes()), want) => {
                return Err(Refusal(StatusCode::UNAUTHORIZED, "Invalid token."))
            }
            Some(_) => {}
        }
    }
    let id = match text("x-sandbox-id") {
        Some(id) if !id.is_empty() => id,
        _ => {
            return Err(Refusal(
                StatusCode::BAD_REQUEST,
                "X-Sandbox-ID header is required.",
            ))
        }
    };
    if !dns_safe(id) {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            "Invalid sandbox ID format.",
        ));
    }
    let namespace = text("x-sandbox-namespace").unwrap_or(DEFAULT_NAMESPACE);
    if !dns_safe(namespace) {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            "Invalid namespace format.",
        ));
    }
    let port = match text("x-sandbox-port") {
        None => DEFAULT_SANDBOX_PORT,
        Some(p) => p
            .trim()
            .parse()
            .map_err(|_| Refusal(StatusCode::BAD_REQUEST, "Invalid port format."))?,
    };
    let host = routing
        .host_template
        .replace("{id}", id)
        .replace("{namespace}", namespace);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let url: Uri = format!("http://{host}:{port}{path}")
        .parse()
        .map_err(|_| Refusal(StatusCode::BAD_REQUEST, "Invalid sandbox ID format."))?;
    Ok((id.to_owned(), url))
}

/// Headers that describe one connection, not the message: never forwarded.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
    )
}

async fn proxy(State(routing): State<Arc<Routing>>, req: Request<Body>) -> Response {
    if !matches!(
        *req.method(),
        Method::GET | Method::POST | Method::PUT | Method::DELETE | Method::PATCH
    ) {
        return detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    let (parts, body) = req.into_parts();
    let (id, url) = match target(&routing, &parts.headers, &parts.uri) {
        Ok(t) => t,
        Err(refusal) => return refusal.into_response(),
    };
    let mut out = Request::builder().method(parts.method).uri(url.clone());
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            out = out.header(name, value);
        }
    }
    let Ok(out) = out.body(body) else {
        return detail(
            StatusCode::INTERNAL_SERVER_ERROR,
            "An internal error occurred in the proxy.",
        );
    };
    tracing::debug!(sandbox = %id, %url, "proxying");
    match tokio::time::timeout(routing.timeout, routing.client.request(out)).await {
        Ok(Ok(resp)) => {
            let (mut parts, body) = resp.into_parts();
            let names: Vec<HeaderName> = parts
                .headers
                .keys()
                .filter(|n| hop_by_hop(n))
                .cloned()
                .collect();
            for n in names {
                parts.headers.remove(n);
            }
            Response::from_parts(parts, Body::new(body))
        }
        Ok(Err(e)) if e.is_connect() => {
            tracing::warn!(sandbox = %id, %url, error = %e, "sandbox unreachable");
            detail(
                StatusCode::BAD_GATEWAY,
                format!("Could not connect to the backend sandbox: {id}"),
            )
        }
        Ok(Err(e)) => {
            tracing::warn!(sandbox = %id, %url, error = %e, "proxying failed");
            detail(
                StatusCode::INTERNAL_SERVER_ERROR,
                "An internal error occurred in the proxy.",
            )
        }
        Err(_) => detail(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "The backend sandbox {id} did not answer within {} s.",
                routing.timeout.as_secs_f64()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(token: Option<&str>) -> Routing {
        Routing {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            timeout: Duration::from_secs(1),
            token_digest: token.map(|t| sha256(t.as_bytes())),
            host_template: "{id}.{namespace}.svc.cluster.local".into(),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    async fn rejected(r: &Routing, pairs: &[(&'static str, &str)]) -> (u16, String) {
        let uri: Uri = "/execute".parse().unwrap();
        let reply = target(r, &headers(pairs), &uri)
            .unwrap_err()
            .into_response();
        let status = reply.status().as_u16();
        let body = axum::body::to_bytes(reply.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[test]
    fn targets_follow_upstream_dns_names() {
        let r = routing(None);
        let uri: Uri = "/download/a%20b?x=1".parse().unwrap();
        let (id, url) = target(&r, &headers(&[("x-sandbox-id", "sb-1")]), &uri).unwrap();
        assert_eq!(id, "sb-1");
        assert_eq!(
            url.to_string(),
            "http://sb-1.default.svc.cluster.local:8888/download/a%20b?x=1"
        );
        let h = headers(&[
            ("x-sandbox-id", "sb"),
            ("x-sandbox-namespace", "team-a"),
            ("x-sandbox-port", "9000"),
        ]);
        let (_, url) = target(&r, &h, &uri).unwrap();
        assert_eq!(
            url.to_string(),
            "http://sb.team-a.svc.cluster.local:9000/download/a%20b?x=1"
        );
    }

    #[tokio::test]
    async fn bad_headers_get_upstream_replies() {
        let r = routing(None);
        for (pairs, want) in [
            (vec![], r#"{"detail":"X-Sandbox-ID header is required."}"#),
            (
                vec![("x-sandbox-id", "")],
                r#"{"detail":"X-Sandbox-ID header is required."}"#,
            ),
            (
                vec![("x-sandbox-id", "a.b")],
                r#"{"detail":"Invalid sandbox ID format."}"#,
            ),
            (
                vec![("x-sandbox-id", "---")],
                r#"{"detail":"Invalid sandbox ID format."}"#,
            ),
            (
                vec![("x-sandbox-id", "a"), ("x-sandbox-namespace", "x/y")],
                r#"{"detail":"Invalid namespace format."}"#,
            ),
            (
                vec![("x-sandbox-id", "a"), ("x-sandbox-port", "http")],
                r#"{"detail":"Invalid port format."}"#,
            ),
            (
                vec![("x-sandbox-id", "a"), ("x-sandbox-port", "70000")],
                r#"{"detail":"Invalid port format."}"#,
            ),
        ] {
            assert_eq!(
                rejected(&r, &pairs).await,
                (400, want.to_owned()),
                "{pairs:?}"
            );
        }
        let r = routing(Some("s3cret"));
        assert_eq!(
            rejected(&r, &[("x-sandbox-id", "a")]).await,
            (
                401,
                r#"{"detail":"Missing or invalid Authorization header."}"#.to_owned()
            )
        );
        assert_eq!(
            rejected(
                &r,
                &[("x-sandbox-id", "a"), ("authorization", "Basic s3cret")]
            )
            .await
            .0,
            401
        );
        assert_eq!(
            rejected(
                &r,
                &[("x-sandbox-id", "a"), ("authorization", "Bearer s3cre")]
            )
            .await,
            (401, r#"{"detail":"Invalid token."}"#.to_owned())
        );
        let ok = headers(&[("x-sandbox-id", "a"), ("authorization", "Bearer s3cret")]);
        assert!(target(&r, &ok, &"/".parse().unwrap()).is_ok());
    }
}
