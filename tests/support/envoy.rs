//! Runs a real Envoy with `deploy/envoy/envoy.yaml` rendered for a test: placeholders filled,
//! process started with its output captured, `/ready` awaited, and the process killed and reaped
//! on drop (its log tail is printed when the test is failing).

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::http_client::HttpClient;
use super::ports;

/// How long Envoy may take to report LIVE on `/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The cluster the route sends requests to (see `deploy/envoy/README.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteCluster {
    /// Reference ORIGINAL_DST cluster keyed by `x-gateway-destination-endpoint`: one endpoint.
    OriginalDestination,
    /// Static pool with the override_host policy: primary + fallbacks, round robin without a pick.
    InferencePool,
}

impl RouteCluster {
    fn name(self) -> &'static str {
        match self {
            RouteCluster::OriginalDestination => "original_destination",
            RouteCluster::InferencePool => "inference_pool",
        }
    }
}

/// How Envoy hands request bodies to the EPP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// The reference deployments' mode: chunks stream to the EPP and back as they arrive.
    FullDuplexStreamed,
    /// Envoy buffers the whole body and sends it in one message (older gateways; also the only
    /// mode in which Envoy 1.40 honours `failure_mode_allow` for requests with a body).
    Buffered,
}

impl BodyMode {
    fn name(self) -> &'static str {
        match self {
            BodyMode::FullDuplexStreamed => "FULL_DUPLEX_STREAMED",
            BodyMode::Buffered => "BUFFERED",
        }
    }
}

/// What to render into the template.
#[derive(Debug, Clone)]
pub struct EnvoyConfig {
    /// Port of the EPP's ext_proc server (`--grpc-port`).
    pub epp_port: u16,
    /// Port of the EPP's gRPC health server (`--grpc-health-port`).
    pub epp_health_port: u16,
    /// ext_proc `failure_mode_allow`.
    pub failure_mode_allow: bool,
    /// ext_proc `request_body_mode`.
    pub request_body_mode: BodyMode,
    pub route: RouteCluster,
    /// The model servers of the `inference_pool` cluster.
    pub pool: Vec<SocketAddr>,
}

/// Path of the config template in the repository.
pub fn template_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy/envoy.yaml")
}

/// Replaces every `${NAME}` in `template` with its value; an unknown or unfilled placeholder is
/// an error (a typo must not reach Envoy as literal text).
pub fn render(template: &str, vars: &[(&str, String)]) -> anyhow::Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .with_context(|| format!("unterminated placeholder at {:?}", &rest[start..]))?;
        let name = &after[..end];
        let value = vars
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
            .with_context(|| format!("no value for placeholder ${{{name}}}"))?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The YAML flow list of `lb_endpoints` for `${POOL_LB_ENDPOINTS}`.
pub fn pool_lb_endpoints(pool: &[SocketAddr]) -> String {
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

/// Renders the repository's template for `cfg` with the given listener and admin ports.
pub fn render_config(
    cfg: &EnvoyConfig,
    listen_port: u16,
    admin_port: u16,
) -> anyhow::Result<String> {
    let template =
        std::fs::read_to_string(template_path()).context("reading deploy/envoy/envoy.yaml")?;
    render(
        &template,
        &[
            ("LISTEN_PORT", listen_port.to_string()),
            ("ADMIN_PORT", admin_port.to_string()),
            ("EPP_HOST", "127.0.0.1".to_owned()),
            ("EPP_PORT", cfg.epp_port.to_string()),
            ("EPP_HEALTH_PORT", cfg.epp_health_port.to_string()),
            ("FAILURE_MODE_ALLOW", cfg.failure_mode_allow.to_string()),
            ("REQUEST_BODY_MODE", cfg.request_body_mode.name().to_owned()),
            ("ROUTE_CLUSTER", cfg.route.name().to_owned()),
            ("POOL_LB_ENDPOINTS", pool_lb_endpoints(&cfg.pool)),
        ],
    )
}

/// A running Envoy; killed and reaped on drop.
pub struct EnvoyProcess {
    child: Child,
    /// The client-facing listener.
    pub listen: SocketAddr,
    /// The admin interface.
    pub admin: SocketAddr,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl EnvoyProcess {
    /// Starts `envoy` with the rendered config and waits until `/ready` answers LIVE.
    pub async fn start(envoy: &Path, cfg: &EnvoyConfig) -> anyhow::Result<Self> {
        Self::start_rendered(envoy, |listen, admin| render_config(cfg, listen, admin)).await
    }

    /// Starts `envoy` with the config `render(listen_port, admin_port)` returns.
    pub async fn start_rendered(
        envoy: &Path,
        render: impl FnOnce(u16, u16) -> anyhow::Result<String>,
    ) -> anyhow::Result<Self> {
        let ports = ports::free_ports(2)?;
        let (listen_port, admin_port) = (ports[0], ports[1]);
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, render(listen_port, admin_port)?)?;
        let log_path = dir.path().join("envoy.log");
        let log = std::fs::File::create(&log_path)?;
        let level =
            std::env::var("SWITCHYARD_ENVOY_LOG_LEVEL").unwrap_or_else(|_| "warning".to_owned());
        let child = Command::new(envoy)
            .arg("-c")
            .arg(&config_path)
            // Several Envoys run at once in one test binary: no shared-memory hot-restart region.
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                &level,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", envoy.display()))?;
        let mut envoy = Self {
            child,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, listen_port)),
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, admin_port)),
            log_path,
            _dir: dir,
        };
        envoy.wait_ready().await?;
        Ok(envoy)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = HttpClient::new();
        let url = format!("http://{}/ready", self.admin);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "envoy exited with {status} before becoming ready:\n{}",
                    self.logs()
                );
            }
            if let Ok(resp) = client.get(&url).await {
                if resp.status == 200 && resp.text().trim() == "LIVE" {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("envoy not LIVE after {READY_TIMEOUT:?}:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://<listener><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }

    /// Everything Envoy has written (logs and access log).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A counter or gauge from the admin `/stats` (None when absent).
    pub async fn stat(&self, name: &str) -> anyhow::Result<Option<u64>> {
        let resp = HttpClient::new()
            .get(&format!("http://{}/stats?filter=^{name}$", self.admin))
            .await?;
        Ok(resp.text().lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        }))
    }
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("---- envoy log (last {} lines) ----", tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}
