//! `switchyard bbr`: flags (upstream's names and defaults: ext_proc on 9004, health on 9005,
//! metrics on 9090, `--streaming`, `--secure-serving`, repeatable `--plugin`), and the servers.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures::Stream;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::ServingStatus;

use super::metrics::BbrMetrics;
use super::plugins::{AdaptersStore, Plugin, PluginError, PluginSpec};
use super::stream::{BbrShared, BbrStream};
use crate::flagfmt::parse_go_bool as go_bool;
use crate::process::{self, LogFormat};

/// Flags of `switchyard bbr`.
#[derive(Debug, Clone, clap::Args)]
pub struct BbrArgs {
    /// gRPC port for communicating with Envoy proxy.
    #[arg(long, default_value_t = 9004)]
    pub grpc_port: u16,
    /// The port for gRPC liveness and readiness probes.
    #[arg(long, default_value_t = 9005)]
    pub grpc_health_port: u16,
    /// The metrics port exposed by BBR.
    #[arg(long, default_value_t = 9090)]
    pub metrics_port: u16,
    /// Enables streaming support for Envoy full-duplex streaming mode.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = go_bool)]
    pub streaming: bool,
    /// Enables secure serving (self-signed certificate unless --cert-path is given).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", value_parser = go_bool)]
    pub secure_serving: bool,
    /// Directory with tls.crt and tls.key (Switchyard's, as the EPP's --cert-path).
    #[arg(long, default_value = "")]
    pub cert_path: String,
    /// Repeatable. --plugin <type>:<name>[:<json>] (body-field-to-header, base-model-to-header);
    /// none: the model header and the base-model header.
    #[arg(long = "plugin")]
    pub plugins: Vec<String>,
    /// Repeatable. A YAML file of ConfigMaps (data.baseModel, data.adapters) mapping LoRA
    /// adapters to base models for base-model-to-header (upstream watches ConfigMaps labelled
    /// inference.networking.k8s.io/bbr-managed; mount or render them here).
    #[arg(long = "adapters-file")]
    pub adapters_files: Vec<PathBuf>,
    /// Largest request body held (larger gets 413), and response body held in streaming mode.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Address the servers bind.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub bind_address: IpAddr,
    /// Log verbosity (0 info, 1+ debug, 4+ trace).
    #[arg(long, short = 'v', default_value_t = 0)]
    pub v: u8,
    /// Accepted for compatibility (no traces are exported).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", value_parser = go_bool)]
    pub tracing: bool,
    /// Accepted for compatibility (no pprof endpoints).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", value_parser = go_bool)]
    pub enable_pprof: bool,
    /// Accepted for compatibility: /metrics is served without authentication (restrict the port).
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", value_parser = go_bool)]
    pub metrics_endpoint_auth: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BbrStartError {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("port conflict: grpc-port ({0}), grpc-health-port ({1}), and metrics-port ({2}) must all be different")]
    PortConflict(u16, u16, u16),
    #[error("binding {what} port {port}: {source}")]
    Bind {
        what: &'static str,
        port: u16,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::epp::tls::TlsError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A started BBR; servers stop when it is dropped or shut down.
pub struct RunningBbr {
    pub grpc_addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningBbr {
    pub fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for RunningBbr {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(args: BbrArgs) -> Result<(), BbrStartError> {
    let filter = match args.v {
        0 => "info",
        1..=3 => "debug",
        _ => "trace",
    };
    process::init_logging(filter, LogFormat::Json);
    let bbr = start(args).await?;
    let signal = process::shutdown_signal().await;
    tracing::info!(?signal, "shutdown requested");
    bbr.shutdown();
    Ok(())
}

async fn bind(args: &BbrArgs, what: &'static str, port: u16) -> Result<TcpListener, BbrStartError> {
    TcpListener::bind((args.bind_address, port))
        .await
        .map_err(|source| BbrStartError::Bind { what, port, source })
}

/// Validates the flags, loads plugins and adapters, and starts the servers.
pub async fn start(args: BbrArgs) -> Result<RunningBbr, BbrStartError> {
    let ports = [args.grpc_port, args.grpc_health_port, args.metrics_port];
    if ports.iter().filter(|&&p| p != 0).count()
        != ports
            .iter()
            .filter(|&&p| p != 0)
            .collect::<std::collections::HashSet<_>>()
            .len()
    {
        return Err(BbrStartError::PortConflict(ports[0], ports[1], ports[2]));
    }
    let plugins = if args.plugins.is_empty() {
        Plugin::defaults()
    } else {
        args.plugins
            .iter()
            .map(|s| Plugin::from_spec(&s.parse::<PluginSpec>()?))
            .collect::<Result<Vec<_>, _>>()?
    };
    let adapters = AdaptersStore::load(&args.adapters_files)?;
    let mut registry = Registry::default();
    let shared = Arc::new(BbrShared {
        streaming: args.streaming,
        plugins,
        adapters,
        max_body_bytes: args.max_body_bytes,
        metrics: BbrMetrics::new(&mut registry),
    });
    let mut tasks = Vec::new();

    let (health, health_service) = tonic_health::server::health_reporter();
    for svc in [
        "",
        "liveness",
        "readiness",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    ] {
        health.set_service_status(svc, ServingStatus::Serving).await;
    }
    let health_listener = bind(&args, "health", args.grpc_health_port).await?;
    let health_addr = health_listener.local_addr()?;
    tasks.push(tokio::spawn(async move {
        let incoming =
            tonic::transport::server::TcpIncoming::from(health_listener).with_nodelay(Some(true));
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(health_service)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(error = %e, "health server stopped");
        }
    }));

    let metrics_listener = bind(&args, "metrics", args.metrics_port).await?;
    let metrics_addr = metrics_listener.local_addr()?;
    let registry = Arc::new(registry);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut text = String::new();
                let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    tasks.push(tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics_listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    }));

    let grpc_listener = bind(&args, "ext_proc", args.grpc_port).await?;
    let grpc_addr = grpc_listener.local_addr()?;
    let limit = args.max_body_bytes.saturating_add(1 << 20);
    let service = ExternalProcessorServer::new(BbrService { shared })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(service);
    if args.secure_serving {
        let cert_dir = (!args.cert_path.is_empty()).then(|| std::path::Path::new(&args.cert_path));
        let acceptor = crate::epp::tls::acceptor(cert_dir, false)?;
        let (accept_task, incoming) = crate::epp::tls::spawn_tls_accept(
            grpc_listener,
            acceptor,
            crate::epp::tls::HandshakeLimits {
                timeout: Duration::from_secs(10),
                max_concurrent: 1024,
            },
        );
        tasks.push(accept_task);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = server.serve_with_incoming(incoming).await {
                tracing::error!(error = %e, "ext_proc server stopped");
            }
        }));
    } else {
        let incoming =
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = server.serve_with_incoming(incoming).await {
                tracing::error!(error = %e, "ext_proc server stopped");
            }
        }));
    }
    tracing::info!(%grpc_addr, %health_addr, %metrics_addr, streaming = args.streaming,
        tls = args.secure_serving, "switchyard bbr started");
    Ok(RunningBbr {
        grpc_addr,
        health_addr,
        metrics_addr,
        tasks,
    })
}

#[derive(Clone)]
struct BbrService {
    shared: Arc<BbrShared>,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for BbrService {
    type ProcessStream = ReplyStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let mut state = BbrStream::new(self.shared.clone());
        tokio::spawn(async move {
            let mut out = Vec::with_capacity(4);
            while let Ok(Some(msg)) = inbound.message().await {
                out.clear();
                let finished = state.on_message(msg, &mut out);
                for reply in out.drain(..) {
                    if tx.send(Ok(reply)).await.is_err() {
                        return;
                    }
                }
                if finished {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
