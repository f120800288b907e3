//! `switchyard epp` flags: the reference EPP's names and defaults (GIE v1.5.0
//! `pkg/epp/server/options.go`), Go-style values (`--flag=false`, `50ms`), plus Switchyard's own.

use std::path::PathBuf;
use std::time::Duration;

use crate::flagfmt::{parse_go_bool, parse_go_duration};

fn duration(s: &str) -> Result<Duration, String> {
    parse_go_duration(s)
}

fn go_bool(s: &str) -> Result<bool, String> {
    parse_go_bool(s)
}

fn port_list(s: &str) -> Result<u16, String> {
    s.trim()
        .parse::<u16>()
        .map_err(|_| format!("invalid port number {s:?}"))
}

/// Log encoding (`--zap-encoder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogEncoder {
    Json,
    Console,
}

#[derive(Debug, Clone, clap::Args)]
pub struct EppArgs {
    // --- ports ---
    /// gRPC port used for communicating with Envoy proxy.
    #[arg(long, default_value_t = 9002)]
    pub grpc_port: u16,
    /// The port used for gRPC liveness and readiness probes.
    #[arg(long, default_value_t = 9003)]
    pub grpc_health_port: u16,
    /// The metrics port exposed by EPP.
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Address the three servers bind to.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: std::net::IpAddr,

    // --- pool / discovery ---
    /// Name of the InferencePool this Endpoint Picker is associated with (Kubernetes discovery).
    #[arg(long, default_value = "")]
    pub pool_name: String,
    /// Namespace of the InferencePool (default: $NAMESPACE, else "default").
    #[arg(long, default_value = "")]
    pub pool_namespace: String,
    /// Kubernetes resource group of the InferencePool.
    #[arg(long, default_value = "inference.networking.k8s.io")]
    pub pool_group: String,
    /// Selector for model-server pods without an InferencePool (`key=value,...`).
    #[arg(long, default_value = "")]
    pub endpoint_selector: String,
    /// Target ports of model-server pods (with --endpoint-selector), comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = port_list)]
    pub endpoint_target_ports: Vec<u16>,
    /// Static endpoints `ip:port,ip:port` (no Kubernetes).
    #[arg(long, default_value = "")]
    pub endpoints: String,
    /// YAML file with endpoints, objectives and model rewrites, reloaded on change (no Kubernetes).
    #[arg(long)]
    pub endpoints_file: Option<PathBuf>,
    /// The inference extension conformance contract (lightweight EPP): the
    /// `test-epp-endpoint-selection` request header restricts the candidates like a subset hint
    /// and responses carry `x-conformance-test-served-endpoint`. Test use only: any client could
    /// pick the endpoint.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = go_bool)]
    pub enable_conformance_test_header: bool,
    /// Disables respecting the x-gateway-destination-endpoint-subset metadata.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = go_bool)]
    pub disable_endpoint_subset_filter: bool,

    // --- scheduling ---
    /// The path to the EndpointPickerConfig file.
    #[arg(long, default_value = "")]
    pub config_file: String,
    /// The EndpointPickerConfig as text, in lieu of a file.
    #[arg(long, default_value = "")]
    pub config_text: String,
    /// Fallback endpoints to add after the primary in x-gateway-destination-endpoint.
    #[arg(long, default_value_t = 0)]
    pub fallback_endpoints: usize,
    /// Model names reported as themselves in metric labels, besides those objectives and model
    /// rewrites name (comma-separated); any other model is counted as `other`.
    #[arg(long, value_delimiter = ',')]
    pub known_models: Vec<String>,
    /// Largest request body accepted; larger requests get 413.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Count the requests this EPP routed to each endpoint until they finish, and add those not
    /// yet visible in a scrape to the queue and running-requests scores (false: the reference's
    /// scores on scraped numbers alone).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", value_parser = go_bool)]
    pub inflight_accounting: bool,

    // --- metrics scraping ---
    /// Interval to refresh metrics.
    #[arg(long, default_value = "50ms", value_parser = duration)]
    pub refresh_metrics_interval: Duration,
    /// Interval to flush Prometheus metrics (pool gauges).
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub refresh_prometheus_metrics_interval: Duration,
    /// Duration after which metrics are considered stale.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub metrics_staleness_threshold: Duration,
    /// Timeout of one metrics scrape.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub metrics_scrape_timeout: Duration,

    // --- serving ---
    /// Enables secure serving (TLS) on the ext_proc port.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", value_parser = go_bool)]
    pub secure_serving: bool,
    /// Directory with tls.crt and tls.key; self-signed when unset.
    #[arg(long, default_value = "")]
    pub cert_path: String,
    /// Reload the certificate in --cert-path when it changes.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = go_bool)]
    pub enable_cert_reload: bool,
    /// Enables leader election for high availability (readiness only on the leader).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = go_bool)]
    pub ha_enable_leader_election: bool,
    /// Enables authentication and authorization of the metrics endpoint (Kubernetes only).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", value_parser = go_bool)]
    pub metrics_endpoint_auth: bool,
    /// Sustained rate of TokenReviews for bearer tokens with no cached decision (metrics auth);
    /// scrapes beyond it get 429.
    #[arg(long, default_value_t = 5.0)]
    pub metrics_auth_reviews_per_second: f64,
    /// TokenReviews allowed in a burst above --metrics-auth-reviews-per-second.
    #[arg(long, default_value_t = 10)]
    pub metrics_auth_review_burst: u32,
    /// How long SIGTERM waits for open streams to finish.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub drain_timeout: Duration,

    // --- ext_proc connection limits (docs/security.md) ---
    /// Longest a TLS handshake on the ext_proc port may take; slower clients are disconnected.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub tls_handshake_timeout: Duration,
    /// Most TLS handshakes in progress at once; connections beyond it are closed at accept.
    #[arg(long, default_value_t = 1024)]
    pub tls_max_concurrent_handshakes: usize,
    /// HTTP/2 MAX_CONCURRENT_STREAMS advertised on the ext_proc port (one stream per request;
    /// Envoy opens another connection when a connection is full).
    #[arg(long, default_value_t = 2048)]
    pub grpc_max_concurrent_streams: u32,
    /// Interval of HTTP/2 keepalive pings on ext_proc connections (0s: off).
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub grpc_keepalive_interval: Duration,
    /// A connection whose keepalive ping is not answered within this time is closed, and the
    /// requests on it are released.
    #[arg(long, default_value = "20s", value_parser = duration)]
    pub grpc_keepalive_timeout: Duration,
    /// Longest an ext_proc stream (one HTTP request, response streaming included) may stay
    /// open; longer streams are ended with DEADLINE_EXCEEDED (0s: no limit).
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub grpc_stream_timeout: Duration,
    /// Serve ext_proc on a thread of its own (single-threaded runtime): each exchange stays on
    /// one thread instead of waking tokio workers across threads (~20 % less CPU per request
    /// measured, p50 latency no different; docs/benchmarks.md); caps ext_proc at one core.
    /// false: the shared runtime (one worker per CPU, or `TOKIO_WORKER_THREADS`).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", value_parser = go_bool)]
    pub ext_proc_own_thread: bool,
    /// Largest JSON response body buffered for usage parsing; larger responses pass through
    /// unparsed (server-sent events are never buffered).
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_response_buffer_bytes: usize,

    // --- logging / observability ---
    /// Number for the log level verbosity (reference levels: 2 default, 3 verbose, 4 debug, 5 trace).
    #[arg(short = 'v', long = "v", default_value_t = 2)]
    pub verbosity: u8,
    /// Zap log encoding: json or console.
    #[arg(long, value_enum, default_value = "console")]
    pub zap_encoder: LogEncoder,
    /// Accepted for compatibility (zap's level; --v decides).
    #[arg(long)]
    pub zap_log_level: Option<String>,
    /// Accepted for compatibility.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub zap_devel: Option<bool>,
    /// Accepted for compatibility.
    #[arg(long)]
    pub zap_stacktrace_level: Option<String>,
    /// Accepted for compatibility.
    #[arg(long)]
    pub zap_time_encoding: Option<String>,
    /// Enables emitting traces (accepted; OpenTelemetry export is not built in).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", value_parser = go_bool)]
    pub tracing: bool,
    /// Accepted for compatibility (health checking is always on).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub health_checking: Option<bool>,
    /// Accepted for compatibility (no pprof in a Rust binary).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub enable_pprof: Option<bool>,
    /// Accepted for compatibility; metrics are always scraped over http from /metrics.
    #[arg(long)]
    pub model_server_metrics_scheme: Option<String>,
    /// Accepted for compatibility.
    #[arg(long)]
    pub model_server_metrics_path: Option<String>,
    /// Accepted for compatibility.
    #[arg(long)]
    pub model_server_metrics_port: Option<u16>,
    /// Accepted for compatibility.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub model_server_metrics_https_insecure_skip_verify: Option<bool>,

    /// Parse flags and configuration, report problems, and exit without serving.
    #[arg(long)]
    pub check_config: bool,

    /// Accepted for llm-d-router compatibility: Switchyard has no plugin stability gate.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = go_bool)]
    pub allow_experimental_plugins: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("both the \"configText\" and \"configFile\" flags can not be set at the same time")]
    BothConfigs,
    #[error(
        "only one endpoint source may be set: --endpoints, --endpoints-file or --endpoint-selector"
    )]
    SeveralSources,
    #[error(
        "no endpoint source: set --endpoints, --endpoints-file, --pool-name or --endpoint-selector"
    )]
    NoSource,
    #[error("flag \"endpoint-target-ports\" should have length from 1 to 8")]
    TargetPorts,
    #[error("unexpected {0:?} value for \"model-server-metrics-scheme\" flag, it can only be set to 'http'")]
    Scheme(String),
    #[error("--refresh-metrics-interval must be greater than zero")]
    ZeroInterval,
    #[error("--{0} must be greater than zero")]
    ZeroLimit(&'static str),
}

/// Where endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSource {
    Static(String),
    File(PathBuf),
    Kubernetes,
}

impl EppArgs {
    /// Cross-flag checks (the reference's `Validate`).
    pub fn validate(&self) -> Result<EndpointSource, ArgsError> {
        if !self.config_file.is_empty() && !self.config_text.is_empty() {
            return Err(ArgsError::BothConfigs);
        }
        if let Some(s) = self
            .model_server_metrics_scheme
            .as_deref()
            .filter(|s| *s != "http")
        {
            return Err(ArgsError::Scheme(s.to_string()));
        }
        if self.refresh_metrics_interval.is_zero() {
            return Err(ArgsError::ZeroInterval);
        }
        let limits = [
            (
                "tls-handshake-timeout",
                self.tls_handshake_timeout.is_zero(),
            ),
            (
                "tls-max-concurrent-handshakes",
                self.tls_max_concurrent_handshakes == 0,
            ),
            (
                "grpc-max-concurrent-streams",
                self.grpc_max_concurrent_streams == 0,
            ),
            (
                "grpc-keepalive-timeout",
                self.grpc_keepalive_timeout.is_zero(),
            ),
        ];
        if !(self.metrics_auth_reviews_per_second.is_finite()
            && self.metrics_auth_reviews_per_second > 0.0)
        {
            return Err(ArgsError::ZeroLimit("metrics-auth-reviews-per-second"));
        }
        if let Some((flag, _)) = limits.iter().find(|(_, zero)| *zero) {
            return Err(ArgsError::ZeroLimit(flag));
        }
        if !self.endpoint_selector.is_empty()
            && (self.endpoint_target_ports.is_empty() || self.endpoint_target_ports.len() > 8)
        {
            return Err(ArgsError::TargetPorts);
        }
        // A local source wins; --pool-name then only names the pool in metrics.
        let local = [
            !self.endpoints.is_empty(),
            self.endpoints_file.is_some(),
            !self.endpoint_selector.is_empty(),
        ];
        if local.iter().filter(|s| **s).count() > 1 {
            return Err(ArgsError::SeveralSources);
        }
        if !self.endpoints.is_empty() {
            Ok(EndpointSource::Static(self.endpoints.clone()))
        } else if let Some(p) = &self.endpoints_file {
            Ok(EndpointSource::File(p.clone()))
        } else if !self.pool_name.is_empty() || !self.endpoint_selector.is_empty() {
            Ok(EndpointSource::Kubernetes)
        } else {
            Err(ArgsError::NoSource)
        }
    }

    /// `tracing` filter directive for `--v`.
    pub fn log_filter(&self) -> &'static str {
        match self.verbosity {
            0..=3 => "info",
            4 => "debug",
            _ => "trace",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: EppArgs,
    }

    fn parse(args: &[&str]) -> Result<EppArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("epp").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn reference_chart_args_are_accepted() {
        let a = parse(&[
            "--pool-name",
            "vllm-pool",
            "--pool-namespace",
            "default",
            "--pool-group",
            "inference.networking.k8s.io",
            "--zap-encoder",
            "json",
            "--config-file",
            "/config/default-plugins.yaml",
            "--v",
            "1",
            "--tracing=false",
            "--metrics-endpoint-auth=false",
            "--ha-enable-leader-election",
            "--refresh-metrics-interval=50ms",
            "--metrics-staleness-threshold",
            "2s",
        ])
        .unwrap();
        assert_eq!(a.pool_name, "vllm-pool");
        assert!(!a.tracing);
        assert!(!a.metrics_endpoint_auth);
        assert!(a.ha_enable_leader_election);
        assert!(a.secure_serving);
        assert_eq!(a.verbosity, 1);
        assert_eq!(a.zap_encoder, LogEncoder::Json);
        assert_eq!(a.refresh_metrics_interval, Duration::from_millis(50));
        assert_eq!(a.validate(), Ok(EndpointSource::Kubernetes));
    }

    #[test]
    fn defaults_match_the_reference() {
        let a = parse(&["--endpoints", "10.0.0.1:8000"]).unwrap();
        assert_eq!(
            (a.grpc_port, a.grpc_health_port, a.metrics_port),
            (9002, 9003, 9090)
        );
        assert_eq!(a.refresh_metrics_interval, Duration::from_millis(50));
        assert_eq!(a.metrics_staleness_threshold, Duration::from_secs(2));
        assert!(a.secure_serving && a.metrics_endpoint_auth && a.tracing);
        assert_eq!(a.max_body_bytes, 16 << 20);
        assert_eq!(a.fallback_endpoints, 0);
        assert!(a.inflight_accounting);
        assert!(a.ext_proc_own_thread);
        assert!(
            !parse(&["--ext-proc-own-thread=false"])
                .unwrap()
                .ext_proc_own_thread
        );
        assert!(
            !parse(&["--inflight-accounting=false"])
                .unwrap()
                .inflight_accounting
        );
        assert_eq!(
            a.validate(),
            Ok(EndpointSource::Static("10.0.0.1:8000".into()))
        );
    }

    #[test]
    fn bad_flags_are_rejected() {
        assert!(parse(&["--refresh-metrics-interval", "fast"]).is_err());
        assert!(parse(&["--secure-serving=maybe"]).is_err());
        assert!(parse(&["--grpc-port", "70000"]).is_err());
        let both = parse(&[
            "--endpoints",
            "1.2.3.4:1",
            "--config-file",
            "a",
            "--config-text",
            "b",
        ])
        .unwrap();
        assert_eq!(both.validate(), Err(ArgsError::BothConfigs));
        let none = parse(&[]).unwrap();
        assert_eq!(none.validate(), Err(ArgsError::NoSource));
        let named = parse(&["--endpoints", "1.2.3.4:1", "--pool-name", "p"]).unwrap();
        assert_eq!(
            named.validate(),
            Ok(EndpointSource::Static("1.2.3.4:1".into()))
        );
        let two = parse(&["--endpoints", "1.2.3.4:1", "--endpoints-file", "f.yaml"]).unwrap();
        assert_eq!(two.validate(), Err(ArgsError::SeveralSources));
        let sel = parse(&["--endpoint-selector", "app=x"]).unwrap();
        assert_eq!(sel.validate(), Err(ArgsError::TargetPorts));
        let sel = parse(&[
            "--endpoint-selector",
            "app=x",
            "--endpoint-target-ports",
            "8000,8001",
        ])
        .unwrap();
        assert_eq!(sel.endpoint_target_ports, vec![8000, 8001]);
        assert_eq!(sel.validate(), Ok(EndpointSource::Kubernetes));
    }
}
