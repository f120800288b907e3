//! Wiring of `switchyard epp`: discovery and scrapers feeding the datastore, the ext_proc and
//! health gRPC servers, the metrics HTTP server, and graceful shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;

pub use super::args::EppArgs;
use super::args::{ArgsError, EndpointSource, LogEncoder};
use super::config::ConfigError;
use super::config::{self, EppConfig};
use super::datastore::Datastore;
use super::director::{Director, DirectorConfig};
use super::discovery::file::FileDiscovery;
use super::discovery::kubernetes::KubeDiscoveryError;
use super::discovery::kubernetes::{KubeDiscoveryConfig, KubernetesDiscovery};
use super::discovery::static_list::{parse_endpoint_list, StaticDiscovery};
use super::discovery::Discovery;
use super::discovery::DiscoveryError;
use super::extproc::{ExtProcConfig, ExtProcService, Shared};
use super::flowcontrol::{DirectorDispatch, EppFlowController, FlowMetrics};
use super::kube_client::KubeClientError;
use super::metrics::{self, EppMetrics};
use super::metrics_auth::{AuthCacheConfig, MetricsAuth};
use super::saturation::SaturationDetector;
use super::scheduling::Scheduler;
use super::scrape::{spawn_scrape_manager_with_layer, ScrapeConfig};
use super::tls::TlsError;
use crate::process::{self, LogFormat};

/// Health services the reference answers on (REFERENCE.md §1 "Health").
const READINESS_SERVICES: [&str; 4] = [
    "readiness",
    "envoy.service.ext_proc.v3.ExternalProcessor",
    "inference-extension",
    "",
];

/// Why the EPP could not start (or `--check-config` failed). `Display` is the first line `main`
/// prints; the `source` chain follows.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error("reading --config-file {path}")]
    ReadConfig {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid EndpointPickerConfig ({origin})")]
    Config {
        origin: String,
        #[source]
        source: ConfigError,
    },
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Kubernetes(#[from] KubeDiscoveryError),
    #[error(transparent)]
    KubeClient(#[from] KubeClientError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("binding {what} port {port}")]
    Bind {
        what: &'static str,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Binds `port` on the configured address.
async fn bind(args: &EppArgs, what: &'static str, port: u16) -> Result<TcpListener, StartError> {
    TcpListener::bind((args.bind_address, port))
        .await
        .map_err(|source| StartError::Bind { what, port, source })
}

/// Runs the EPP until SIGTERM/SIGINT.
pub async fn run(args: EppArgs) -> Result<(), StartError> {
    init_logging(&args);
    if args.check_config {
        check_config(&args)?;
        println!("configuration OK");
        return Ok(());
    }
    let epp = start(args).await?;
    let signal = process::shutdown_signal().await;
    tracing::info!(?signal, "shutdown requested; draining open streams");
    epp.shutdown().await;
    Ok(())
}

fn init_logging(args: &EppArgs) {
    let format = match args.zap_encoder {
        LogEncoder::Json => LogFormat::Json,
        LogEncoder::Console => LogFormat::Console,
    };
    process::init_logging(args.log_filter(), format);
}

/// The EndpointPickerConfig from `--config-text`, `--config-file` or the built-in default.
fn load_config(args: &EppArgs) -> Result<EppConfig, StartError> {
    let (text, origin) = if !args.config_text.is_empty() {
        (args.config_text.clone(), "--config-text".to_string())
    } else if !args.config_file.is_empty() {
        let text = std::fs::read_to_string(&args.config_file).map_err(|source| {
            StartError::ReadConfig {
                path: args.config_file.clone(),
                source,
            }
        })?;
        (text, args.config_file.clone())
    } else {
        (
            config::DEFAULT_CONFIG.to_string(),
            "built-in default".to_string(),
        )
    };
    config::parse_config(&text).map_err(|source| StartError::Config { origin, source })
}

/// `--check-config`: everything `start` would reject, without binding ports or calling APIs.
fn check_config(args: &EppArgs) -> Result<(), StartError> {
    let source = args.validate()?;
    load_config(args)?;
    match source {
        EndpointSource::Static(list) => {
            parse_endpoint_list(&list)?;
        }
        EndpointSource::File(path) => {
            super::discovery::file::load_pool_file(&path)?;
        }
        EndpointSource::Kubernetes => kube_config(args).validate()?,
    }
    if !args.cert_path.is_empty() {
        super::tls::load_from_dir(Path::new(&args.cert_path))?;
    }
    Ok(())
}

fn kube_config(args: &EppArgs) -> KubeDiscoveryConfig {
    KubeDiscoveryConfig {
        pool_name: args.pool_name.clone(),
        pool_namespace: pool_namespace(args),
        pool_group: args.pool_group.clone(),
        endpoint_selector: (!args.endpoint_selector.is_empty())
            .then(|| args.endpoint_selector.clone()),
        endpoint_target_ports: args.endpoint_target_ports.clone(),
    }
}

/// The `name` label of the pool gauges: the InferencePool's name, or `local` without one.
fn pool_label(args: &EppArgs) -> String {
    if args.pool_name.is_empty() {
        "local".to_string()
    } else {
        args.pool_name.clone()
    }
}

fn pool_namespace(args: &EppArgs) -> String {
    if !args.pool_namespace.is_empty() {
        return args.pool_namespace.clone();
    }
    std::env::var("NAMESPACE")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

/// A running EPP: its bound addresses and what is needed to stop it.
pub struct RunningEpp {
    pub grpc_addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub datastore: Arc<Datastore>,
    shared: Arc<Shared>,
    health: tonic_health::server::HealthReporter,
    shutdown_tx: watch::Sender<bool>,
    drain_timeout: Duration,
    tasks: Vec<JoinHandle<()>>,
    grpc_task: JoinHandle<()>,
}

impl RunningEpp {
    /// Stops accepting, reports NOT_SERVING, waits for open streams up to the drain timeout.
    pub async fn shutdown(self) {
        for svc in READINESS_SERVICES {
            self.health
                .set_service_status(svc, ServingStatus::NotServing)
                .await;
        }
        let _ = self.shutdown_tx.send(true);
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        while self.shared.open_streams() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.shared.open_streams();
        if left > 0 {
            tracing::warn!(
                open_streams = left,
                "drain timeout reached; closing remaining streams"
            );
        }
        self.grpc_task.abort();
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Starts every part of the EPP and returns once all ports are bound.
pub async fn start(args: EppArgs) -> Result<RunningEpp, StartError> {
    let source = args.validate()?;
    let config = load_config(&args)?;
    let mut registry = Registry::default();
    let epp_metrics = EppMetrics::new(&mut registry);
    // Flow control (`flowControl` feature gate); its metrics exist only when it is on.
    let flow = config
        .flow_control
        .clone()
        .map(|fc| EppFlowController::new(fc, FlowMetrics::new(&mut registry, &pool_label(&args))));
    let scheduler = Arc::new(Scheduler::new(&config.scheduling, &mut registry));
    let datastore = Arc::new(Datastore::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    // Discovery (and, in Kubernetes, leader election and metrics auth).
    let mut leader_rx: Option<watch::Receiver<bool>> = None;
    let mut metrics_auth: Option<Arc<MetricsAuth>> = None;
    if args.metrics_endpoint_auth && !matches!(source, EndpointSource::Kubernetes) {
        tracing::warn!(
            metrics_port = args.metrics_port,
            "--metrics-endpoint-auth=true cannot apply without Kubernetes (it needs the TokenReview \
             API): /metrics is served WITHOUT authentication to anyone who can reach the metrics \
             port; restrict that port (docs/security.md) or pass --metrics-endpoint-auth=false \
             to acknowledge"
        );
    }
    let discovery: Box<dyn Discovery> = match source {
        EndpointSource::Static(list) => Box::new(StaticDiscovery::new(parse_endpoint_list(&list)?)),
        EndpointSource::File(path) => {
            super::discovery::file::load_pool_file(&path)?;
            Box::new(FileDiscovery::new(path, Duration::from_secs(1)))
        }
        EndpointSource::Kubernetes => {
            let config = kube_config(&args);
            config.validate()?;
            let client = super::kube_client::client_from_env().await?;
            if args.ha_enable_leader_election {
                let identity = format!(
                    "{}_{:08x}",
                    std::env::var("POD_NAME").unwrap_or_else(|_| "switchyard-epp".to_string()),
                    rand::random::<u32>()
                );
                let lease = super::leader::LeaseConfig::for_pool(
                    &config.pool_namespace,
                    &config.pool_name,
                    identity,
                );
                leader_rx = Some(super::leader::spawn_leader_election(
                    client.clone(),
                    lease,
                    shutdown_rx.clone(),
                ));
            }
            if args.metrics_endpoint_auth {
                metrics_auth = Some(Arc::new(MetricsAuth::with_cache(
                    client.clone(),
                    AuthCacheConfig {
                        reviews_per_second: args.metrics_auth_reviews_per_second,
                        review_burst: args.metrics_auth_review_burst.max(1),
                        ..AuthCacheConfig::default()
                    },
                )));
            }
            Box::new(KubernetesDiscovery::new(client, config))
        }
    };
    {
        let ds = datastore.clone();
        let rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = discovery.run(ds, rx).await {
                tracing::error!(error = %e, "endpoint discovery stopped");
            }
        }));
    }
    tasks.push(spawn_scrape_manager_with_layer(
        datastore.clone(),
        ScrapeConfig {
            interval: args.refresh_metrics_interval,
            timeout: args.metrics_scrape_timeout,
        },
        config.data_layer.clone(),
        shutdown_rx.clone(),
    ));
    // One KV-event subscriber set per configured precise-prefix-cache-scorer.
    for spec in &config.plugins {
        if let super::config::PluginKind::PrecisePrefixCacheScorer(p) = &spec.kind {
            let metrics = super::kvcache::subscriber::StreamMetrics::default();
            metrics.register(&p.0.index, &mut registry);
            if p.0.params.tokenizer_dir.is_none() {
                tracing::warn!(plugin = %spec.name, "precise-prefix-cache-scorer has no tokenizer \
                    (indexerConfig.tokenizersPoolConfig.local.autoDiscoveryDir): prompts are \
                    tokenized approximately (4 bytes per token, as serve --backend sim without --model)");
            }
            tasks.push(super::kvcache::subscriber::spawn_manager(
                datastore.clone(),
                Arc::clone(&p.0),
                metrics,
                shutdown_rx.clone(),
            ));
        }
    }
    tasks.push(spawn_endpoint_bookkeeping(
        datastore.clone(),
        scheduler.clone(),
        epp_metrics.clone(),
        pool_label(&args),
        args.refresh_prometheus_metrics_interval,
        args.metrics_staleness_threshold,
    ));

    let director = Arc::new(Director::new(
        datastore.clone(),
        scheduler,
        SaturationDetector::new(config.saturation),
        DirectorConfig {
            fallback_endpoints: args.fallback_endpoints,
            disable_subset_filter: args.disable_endpoint_subset_filter,
            known_models: args.known_models.iter().cloned().collect(),
            inflight_accounting: args.inflight_accounting,
        },
    ));
    if let Some(flow) = &flow {
        let (flow, dispatch) = (flow.clone(), DirectorDispatch(director.clone()));
        let (recheck, rx) = (args.refresh_metrics_interval, shutdown_rx.clone());
        tasks.push(tokio::spawn(async move {
            flow.run(dispatch, recheck, rx).await;
        }));
    }
    let shared = Shared::with_flow_control(
        director,
        epp_metrics,
        ExtProcConfig {
            max_body_bytes: args.max_body_bytes,
            max_response_buffer_bytes: args.max_response_buffer_bytes,
            stream_timeout: (!args.grpc_stream_timeout.is_zero())
                .then_some(args.grpc_stream_timeout),
            conformance_test_header: args.enable_conformance_test_header,
            served_verifier: config.served_verifier,
        },
        flow,
    );

    // Health.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("liveness", ServingStatus::Serving)
        .await;
    for svc in READINESS_SERVICES {
        health
            .set_service_status(svc, ServingStatus::NotServing)
            .await;
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
    tasks.push(spawn_readiness(
        datastore.clone(),
        health.clone(),
        leader_rx,
    ));

    // Metrics HTTP.
    let metrics_listener = bind(&args, "metrics", args.metrics_port).await?;
    let metrics_addr = metrics_listener.local_addr()?;
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(serve_metrics))
        .with_state(MetricsState {
            registry: Arc::new(registry),
            auth: metrics_auth,
        });
    tasks.push(tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics_listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    }));

    // ext_proc.
    let grpc_listener = bind(&args, "ext_proc", args.grpc_port).await?;
    let grpc_addr = grpc_listener.local_addr()?;
    let service = ExtProcService::new(shared.clone()).into_server();
    let mut stop = shutdown_rx.clone();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let limits = GrpcLimits::from_args(&args);
    let tls = if args.secure_serving {
        let cert_dir = (!args.cert_path.is_empty()).then(|| Path::new(&args.cert_path));
        Some((
            super::tls::acceptor(cert_dir, args.enable_cert_reload)?,
            super::tls::HandshakeLimits {
                timeout: args.tls_handshake_timeout,
                max_concurrent: args.tls_max_concurrent_handshakes,
            },
        ))
    } else {
        None
    };
    let grpc_task = if args.ext_proc_own_thread {
        // Built on the ext_proc thread so the listener and every accepted socket register with
        // that thread's reactor (`own_thread`).
        let listener = grpc_listener.into_std()?;
        super::own_thread::spawn("ext-proc", move || async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => serve_listener(listener, tls, service, limits, stopped).await,
                Err(e) => tracing::error!(error = %e, "ext_proc listener"),
            }
        })?
    } else {
        tokio::spawn(serve_listener(grpc_listener, tls, service, limits, stopped))
    };
    tracing::info!(%grpc_addr, %health_addr, %metrics_addr, tls = args.secure_serving, "switchyard epp started");

    Ok(RunningEpp {
        grpc_addr,
        health_addr,
        metrics_addr,
        datastore,
        shared,
        health,
        shutdown_tx,
        drain_timeout: args.drain_timeout,
        tasks,
        grpc_task,
    })
}

/// HTTP/2 limits of the ext_proc server (docs/security.md).
#[derive(Debug, Clone, Copy)]
struct GrpcLimits {
    max_concurrent_streams: u32,
    keepalive_interval: Option<Duration>,
    keepalive_timeout: Duration,
}

impl GrpcLimits {
    fn from_args(args: &EppArgs) -> Self {
        GrpcLimits {
            max_concurrent_streams: args.grpc_max_concurrent_streams,
            keepalive_interval: (!args.grpc_keepalive_interval.is_zero())
                .then_some(args.grpc_keepalive_interval),
            keepalive_timeout: args.grpc_keepalive_timeout,
        }
    }
}

/// Accepts ext_proc connections on `listener` (TLS when `tls` is given) and serves them on the
/// current runtime until `stopped`.
async fn serve_listener(
    listener: TcpListener,
    tls: Option<(tokio_rustls::TlsAcceptor, super::tls::HandshakeLimits)>,
    service: super::extproc::ExtProcServer,
    limits: GrpcLimits,
    stopped: impl std::future::Future<Output = ()>,
) {
    match tls {
        Some((acceptor, handshake)) => {
            // The accept task ends once `incoming` is dropped.
            let (_accept_task, incoming) =
                super::tls::spawn_tls_accept(listener, acceptor, handshake);
            serve_ext_proc(service, incoming, limits, stopped).await;
        }
        None => {
            // tonic ignores `Server::tcp_nodelay` with a custom incoming stream: set it on the
            // accepted sockets, or Nagle + delayed ACK stall every small ext_proc reply (~40 ms).
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            serve_ext_proc(service, incoming, limits, stopped).await;
        }
    }
}

/// Serves ext_proc on an accepted-connection stream (plain TCP or TLS) until `stopped`.
async fn serve_ext_proc<S, IO, E>(
    service: super::extproc::ExtProcServer,
    incoming: S,
    limits: GrpcLimits,
    stopped: impl std::future::Future<Output = ()>,
) where
    S: futures::Stream<Item = Result<IO, E>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // A half-open connection (peer gone without a FIN) fails its keepalive ping; hyper then
    // closes it, every stream on it ends, and their in-flight counts are released.
    if let Err(e) = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(limits.keepalive_interval)
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, stopped)
        .await
    {
        tracing::error!(error = %e, "ext_proc server stopped");
    }
}

/// Readiness: SERVING once discovery has synced and, with leader election, only on the leader.
fn spawn_readiness(
    datastore: Arc<Datastore>,
    health: tonic_health::server::HealthReporter,
    leader: Option<watch::Receiver<bool>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = None;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            let leading = leader.as_ref().is_none_or(|rx| *rx.borrow());
            let ready = datastore.is_synced() && leading;
            if last != Some(ready) {
                let status = if ready {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                for svc in READINESS_SERVICES {
                    health.set_service_status(svc, status).await;
                }
                tracing::info!(ready, leading, "readiness changed");
                last = Some(ready);
            }
        }
    })
}

/// Follows endpoint-set changes: forgets departed endpoints in the prefix index and refreshes
/// the pool gauges.
fn spawn_endpoint_bookkeeping(
    datastore: Arc<Datastore>,
    scheduler: Arc<Scheduler>,
    metrics: EppMetrics,
    pool: String,
    gauge_interval: Duration,
    staleness: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut changes = datastore.subscribe();
        let mut known: Vec<String> = Vec::new();
        let mut tick = tokio::time::interval(gauge_interval.max(Duration::from_millis(10)));
        loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() { return; }
                    let now: Vec<String> = datastore.slots().iter().map(|s| s.endpoint().name.clone()).collect();
                    for gone in known.iter().filter(|n| !now.contains(n)) {
                        scheduler.remove_endpoint(gone);
                    }
                    tracing::info!(endpoints = now.len(), "endpoint set changed");
                    known = now;
                    metrics.refresh_pool_gauges(&pool, &datastore, staleness);
                }
                _ = tick.tick() => metrics.refresh_pool_gauges(&pool, &datastore, staleness),
            }
        }
    })
}

#[derive(Clone)]
struct MetricsState {
    registry: Arc<Registry>,
    auth: Option<Arc<MetricsAuth>>,
}

async fn serve_metrics(
    State(state): State<MetricsState>,
    headers: HeaderMap,
) -> axum::response::Response {
    if let Some(auth) = &state.auth {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Err(e) = auth.authorize(bearer).await {
            let status = StatusCode::from_u16(e.status().as_u16()).unwrap_or(StatusCode::FORBIDDEN);
            return (status, e.to_string()).into_response();
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::encode(&state.registry),
    )
        .into_response()
}
