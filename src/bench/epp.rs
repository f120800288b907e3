//! `switchyard epp` as a bench child process: the one place its command line is built, for
//! the routing stack (`stack.rs`) and the overhead benchmark (`overhead.rs`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::client::{get_ok, HttpClient};
use super::procs::{self, ManagedChild, ProcError};

/// Flags that differ between the bench tools; everything else is fixed (loopback, plaintext,
/// no metrics auth, `--v 1`).
#[derive(Debug, Clone, Default)]
pub struct EppOptions {
    /// `--inflight-accounting` (the EPP's default when `None`).
    pub inflight_accounting: Option<bool>,
    /// `--refresh-metrics-interval` in microseconds (the EPP's default when `None`).
    pub refresh_metrics_interval_us: Option<u64>,
    /// `--config-text` (the built-in default config when empty).
    pub config_text: String,
    /// `--max-body-bytes` (the EPP's default when `None`).
    pub max_body_bytes: Option<usize>,
    /// `--fallback-endpoints` (the EPP's default when `None`).
    pub fallback_endpoints: Option<u32>,
    /// Further flags, appended last (the soak passes its own).
    pub extra_args: Vec<String>,
    /// `--endpoints-file` instead of `--endpoints`: a pool file (endpoints and objectives)
    /// written by the caller.
    pub endpoints_file: Option<std::path::PathBuf>,
}

/// A pool file for `--endpoints-file`: `endpoints` and the `objectives` (name → priority)
/// that give requests their priority (`x-gateway-inference-objective`).
pub fn pool_file_text(endpoints: &[SocketAddr], objectives: &[(&str, i32)]) -> String {
    let mut yaml = String::from("endpoints:\n");
    for e in endpoints {
        yaml.push_str(&format!("- address: {e}\n"));
    }
    if !objectives.is_empty() {
        yaml.push_str("objectives:\n");
        for (name, priority) in objectives {
            yaml.push_str(&format!("- {{name: {name}, priority: {priority}}}\n"));
        }
    }
    yaml
}

/// The ports a started EPP listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EppPorts {
    pub grpc: u16,
    pub health: u16,
    pub metrics: u16,
}

/// The `switchyard epp` command line for `endpoints` on `ports`.
pub fn command(
    bin: &Path,
    endpoints: &[SocketAddr],
    ports: EppPorts,
    options: &EppOptions,
) -> Command {
    let endpoints: Vec<String> = endpoints.iter().map(|a| a.to_string()).collect();
    let mut cmd = Command::new(bin);
    cmd.arg("epp");
    match &options.endpoints_file {
        Some(path) => cmd.arg("--endpoints-file").arg(path),
        None => cmd.arg("--endpoints").arg(endpoints.join(",")),
    };
    cmd.args(["--bind-address", "127.0.0.1"])
        .arg(format!("--grpc-port={}", ports.grpc))
        .arg(format!("--grpc-health-port={}", ports.health))
        .arg(format!("--metrics-port={}", ports.metrics))
        .args(["--secure-serving=false", "--metrics-endpoint-auth=false"])
        .args(["--v", "1"]);
    if let Some(on) = options.inflight_accounting {
        cmd.arg(format!("--inflight-accounting={on}"));
    }
    if let Some(us) = options.refresh_metrics_interval_us {
        cmd.arg(format!("--refresh-metrics-interval={us}us"));
    }
    if let Some(bytes) = options.max_body_bytes {
        cmd.arg(format!("--max-body-bytes={bytes}"));
    }
    if let Some(n) = options.fallback_endpoints {
        cmd.arg(format!("--fallback-endpoints={n}"));
    }
    if !options.config_text.is_empty() {
        cmd.arg("--config-text").arg(&options.config_text);
    }
    cmd.args(&options.extra_args);
    cmd
}

/// Starts the EPP on free loopback ports, logging to `log`, and waits until its metrics
/// endpoint answers (at most `timeout`).
pub async fn start(
    bin: &Path,
    endpoints: &[SocketAddr],
    options: &EppOptions,
    name: &str,
    log: &Path,
    timeout: Duration,
    http: &HttpClient,
) -> Result<(ManagedChild, EppPorts), ProcError> {
    let p = procs::free_ports(3)?;
    let ports = EppPorts {
        grpc: p[0],
        health: p[1],
        metrics: p[2],
    };
    let mut cmd = command(bin, endpoints, ports, options);
    let mut epp = ManagedChild::spawn(name, &mut cmd, log)?;
    let url = format!("http://127.0.0.1:{}/metrics", ports.metrics);
    epp.wait_ready(timeout, || get_ok(http, &url)).await?;
    Ok((epp, ports))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: crate::epp::args::EppArgs,
    }

    /// The command line parses as the EPP's own flags, with each option where it belongs.
    #[test]
    fn command_line_parses_as_epp_flags() {
        let ports = EppPorts {
            grpc: 9002,
            health: 9003,
            metrics: 9090,
        };
        let options = EppOptions {
            inflight_accounting: Some(false),
            refresh_metrics_interval_us: Some(2500),
            config_text: "x: y".into(),
            max_body_bytes: Some(1 << 20),
            fallback_endpoints: Some(2),
            extra_args: vec!["--known-models=a,b".into()],
            endpoints_file: None,
        };
        let eps: Vec<SocketAddr> = vec!["127.0.0.1:8000".parse().unwrap()];
        let cmd = command(Path::new("switchyard"), &eps, ports, &options);
        let argv: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(argv[0], "epp");
        let cli = Cli::try_parse_from(
            std::iter::once("epp".to_string()).chain(argv[1..].iter().cloned()),
        )
        .unwrap();
        let a = cli.args;
        assert_eq!(a.endpoints, "127.0.0.1:8000");
        assert_eq!(
            (a.grpc_port, a.grpc_health_port, a.metrics_port),
            (9002, 9003, 9090)
        );
        assert!(!a.secure_serving && !a.metrics_endpoint_auth);
        assert!(!a.inflight_accounting);
        assert_eq!(a.refresh_metrics_interval, Duration::from_micros(2500));
        assert_eq!(a.max_body_bytes, 1 << 20);
        assert_eq!(a.config_text, "x: y");
        assert_eq!(a.fallback_endpoints, 2);
        assert_eq!(a.known_models, ["a", "b"]);
        // Defaults stay the EPP's own.
        let cmd = command(Path::new("switchyard"), &eps, ports, &EppOptions::default());
        let argv: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let a = Cli::try_parse_from(
            std::iter::once("epp".to_string()).chain(argv[1..].iter().cloned()),
        )
        .unwrap()
        .args;
        assert!(a.inflight_accounting);
        assert!(a.config_text.is_empty());
        // A pool file replaces the endpoint list.
        let options = EppOptions {
            endpoints_file: Some("/tmp/pool.yaml".into()),
            ..EppOptions::default()
        };
        let cmd = command(Path::new("switchyard"), &eps, ports, &options);
        let argv: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let a = Cli::try_parse_from(
            std::iter::once("epp".to_string()).chain(argv[1..].iter().cloned()),
        )
        .unwrap()
        .args;
        assert_eq!(a.endpoints, "");
        assert_eq!(
            a.endpoints_file.as_deref(),
            Some(std::path::Path::new("/tmp/pool.yaml"))
        );
        assert_eq!(
            pool_file_text(&eps, &[("interactive", 1), ("batch", -1)]),
            "endpoints:\n- address: 127.0.0.1:8000\nobjectives:\n- {name: interactive, priority: 1}\n- {name: batch, priority: -1}\n"
        );
    }
}
