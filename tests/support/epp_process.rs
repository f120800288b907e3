//! Runs the real `switchyard epp` binary for a test on free ports, waits until its gRPC health
//! server says SERVING for service `""`, and kills and reaps it on drop (printing its log tail
//! when the test is failing).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::ports;

/// How long the EPP may take to report SERVING.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How to start the EPP.
#[derive(Debug, Clone)]
pub struct EppOptions {
    /// Model servers, passed as `--endpoints ip:port,...` (none: the flag is left out, for
    /// Kubernetes discovery through `extra_args` and `env`).
    pub endpoints: Vec<SocketAddr>,
    /// `--fallback-endpoints`.
    pub fallback_endpoints: u32,
    /// Written to a file and passed as `--config-file` (None: the built-in default config).
    pub config: Option<String>,
    /// `--refresh-metrics-interval` (Go duration text).
    pub refresh_metrics_interval: String,
    /// Appended after the standard flags.
    pub extra_args: Vec<String>,
    /// Environment variables set for the process (e.g. `KUBECONFIG`).
    pub env: Vec<(String, String)>,
}

impl EppOptions {
    pub fn new(endpoints: Vec<SocketAddr>) -> Self {
        Self {
            endpoints,
            fallback_endpoints: 0,
            config: None,
            refresh_metrics_interval: "50ms".to_owned(),
            extra_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A running `switchyard epp`; killed and reaped on drop.
pub struct EppProcess {
    child: Child,
    /// ext_proc port (`--grpc-port`).
    pub grpc_port: u16,
    /// gRPC health port (`--grpc-health-port`).
    pub health_port: u16,
    /// Prometheus port (`--metrics-port`).
    pub metrics_port: u16,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl EppProcess {
    /// Starts the binary built for this test run (`CARGO_BIN_EXE_switchyard`).
    pub async fn start(opts: &EppOptions) -> anyhow::Result<Self> {
        let p = ports::free_ports(3)?;
        let (grpc_port, health_port, metrics_port) = (p[0], p[1], p[2]);
        let dir = tempfile::tempdir()?;
        let endpoints: Vec<String> = opts.endpoints.iter().map(ToString::to_string).collect();
        let mut args: Vec<String> = vec!["epp".into()];
        if !endpoints.is_empty() {
            args.push("--endpoints".into());
            args.push(endpoints.join(","));
        }
        args.extend([
            "--grpc-port".into(),
            grpc_port.to_string(),
            "--grpc-health-port".into(),
            health_port.to_string(),
            "--metrics-port".into(),
            metrics_port.to_string(),
            "--secure-serving=false".into(),
            "--metrics-endpoint-auth=false".into(),
            format!(
                "--refresh-metrics-interval={}",
                opts.refresh_metrics_interval
            ),
            format!("--fallback-endpoints={}", opts.fallback_endpoints),
            "--zap-encoder".into(),
            "console".into(),
            "--v".into(),
            "2".into(),
        ]);
        if let Some(config) = &opts.config {
            let path = dir.path().join("epp-config.yaml");
            std::fs::write(&path, config)?;
            args.push("--config-file".into());
            args.push(path.display().to_string());
        }
        args.extend(opts.extra_args.iter().cloned());
        let log_path = dir.path().join("epp.log");
        let child = spawn(&args, &opts.env, &log_path)?;
        let mut epp = Self {
            child,
            grpc_port,
            health_port,
            metrics_port,
            args,
            env: opts.env.clone(),
            log_path,
            _dir: dir,
        };
        epp.wait_serving().await?;
        Ok(epp)
    }

    /// Kills the process (SIGKILL, like a crashed pod) and starts it again with the same flags
    /// on the same ports, waiting until it serves. The earlier run's log is kept in front.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.child = spawn(&self.args, &self.env, &self.log_path)?;
        self.wait_serving().await
    }

    async fn wait_serving(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = format!("http://127.0.0.1:{}", self.health_port);
        let mut last: String;
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "switchyard epp exited with {status} before serving:\n{}",
                    self.logs()
                );
            }
            match health(&url).await {
                Ok(ServingStatus::Serving) => return Ok(()),
                Ok(other) => last = format!("{other:?}"),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "switchyard epp not SERVING after {READY_TIMEOUT:?} (last: {last}):\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:<metrics port>/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }

    /// The ext_proc address.
    pub fn grpc_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.grpc_port))
    }

    /// The process id (to read its memory from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the EPP has logged.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Kills the process now (to test behaviour with the EPP down); idempotent.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `switchyard <args>` with its output appended to `log_path`.
fn spawn(args: &[String], env: &[(String, String)], log_path: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawning switchyard epp")
}

/// One gRPC health check of service `""` at `url`.
async fn health(url: &str) -> anyhow::Result<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .connect()
        .await?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(ServingStatus::try_from(resp.into_inner().status).unwrap_or(ServingStatus::Unknown))
}

impl Drop for EppProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("---- switchyard epp log (last {} lines) ----", tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}
