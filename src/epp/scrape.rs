//! Model-server metrics: the engine metric specs (REFERENCE.md §3), extraction of
//! [`EndpointMetrics`] from a `/metrics` page, and one poller task per endpoint that keeps the
//! datastore's snapshots fresh.
//!
//! Ported behaviour: GIE v1.5.0 `pkg/epp/framework/plugins/datalayer/extractor/metrics/`
//! (`factories.go` for the per-engine names, `spec.go`/`loraspec.go` for series selection).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::datastore::{Datastore, EndpointSlot};
use super::endpoint::{Endpoint, EndpointMetrics, EngineType, LoraInfo};
use crate::promtext::{self, Families, MetricKind, PromTextError, Sample};

/// Largest `/metrics` body read from a model server.
pub const MAX_BODY_BYTES: usize = promtext::DEFAULT_MAX_BYTES;

/// Why one scrape failed. The poller keeps the previous metrics on any of these.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("invalid exposition: {0}")]
    Parse(#[from] PromTextError),
    #[error("metric family {family:?} not found as a gauge or counter")]
    MissingFamily { family: &'static str },
    #[error("metric family {family:?} has type {kind:?}; only gauge and counter are read")]
    WrongType {
        family: &'static str,
        kind: MetricKind,
    },
    #[error("no series of {family:?} matches {selector}")]
    NoMatchingSeries {
        family: &'static str,
        selector: String,
    },
    #[error("metric {family:?} has invalid value {value} (want a finite number >= 0)")]
    InvalidValue { family: &'static str, value: f64 },
    #[error("GET {uri}: {reason}")]
    Http { uri: String, reason: String },
    #[error("GET {uri}: status {status}")]
    Status { uri: String, status: u16 },
    #[error("GET {uri}: body over {max} bytes")]
    BodyTooLarge { uri: String, max: usize },
    #[error("GET {uri}: timed out after {timeout:?}")]
    Timeout { uri: String, timeout: Duration },
    #[error("GET {uri}: body is not UTF-8")]
    NotUtf8 { uri: String },
}

/// One metric: a family name and the labels a series must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricSpec {
    pub name: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
}

const fn plain(name: &'static str) -> MetricSpec {
    MetricSpec { name, labels: &[] }
}

/// Where an engine reports its KV-cache geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSpec {
    /// An info-style gauge whose labels carry the block size and block count.
    InfoLabels {
        metric: MetricSpec,
        block_size_label: &'static str,
        num_blocks_label: &'static str,
    },
    /// Two gauges whose values are the block size and block count.
    Gauges {
        block_size: MetricSpec,
        num_blocks: MetricSpec,
    },
}

/// The metric names one engine exposes (REFERENCE.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineSpec {
    pub waiting: MetricSpec,
    pub running: MetricSpec,
    pub kv_usage: MetricSpec,
    /// Older name of the KV usage gauge, read when `kv_usage` is absent.
    pub kv_usage_fallback: Option<MetricSpec>,
    pub cache: CacheSpec,
    pub lora: Option<MetricSpec>,
    /// Every family name above, for the parser.
    pub families: &'static [&'static str],
}

const VLLM: EngineSpec = EngineSpec {
    waiting: plain("vllm:num_requests_waiting"),
    running: plain("vllm:num_requests_running"),
    kv_usage: plain("vllm:kv_cache_usage_perc"),
    kv_usage_fallback: Some(plain("vllm:gpu_cache_usage_perc")),
    cache: CacheSpec::InfoLabels {
        metric: plain("vllm:cache_config_info"),
        block_size_label: "block_size",
        num_blocks_label: "num_gpu_blocks",
    },
    lora: Some(plain("vllm:lora_requests_info")),
    families: &[
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:cache_config_info",
        "vllm:lora_requests_info",
    ],
};

const SGLANG: EngineSpec = EngineSpec {
    waiting: plain("sglang:num_queue_reqs"),
    running: plain("sglang:num_running_reqs"),
    kv_usage: plain("sglang:token_usage"),
    kv_usage_fallback: None,
    cache: CacheSpec::InfoLabels {
        metric: plain("sglang:cache_config_info"),
        block_size_label: "page_size",
        num_blocks_label: "num_pages",
    },
    lora: None,
    families: &[
        "sglang:num_queue_reqs",
        "sglang:num_running_reqs",
        "sglang:token_usage",
        "sglang:cache_config_info",
    ],
};

const TRTLLM_SERVE: EngineSpec = EngineSpec {
    waiting: plain("trtllm_num_requests_waiting"),
    running: plain("trtllm_num_requests_running"),
    kv_usage: plain("trtllm_kv_cache_utilization"),
    kv_usage_fallback: None,
    cache: CacheSpec::Gauges {
        block_size: plain("trtllm_kv_cache_tokens_per_block"),
        num_blocks: plain("trtllm_kv_cache_max_blocks"),
    },
    lora: None,
    families: &[
        "trtllm_num_requests_waiting",
        "trtllm_num_requests_running",
        "trtllm_kv_cache_utilization",
        "trtllm_kv_cache_tokens_per_block",
        "trtllm_kv_cache_max_blocks",
    ],
};

const TRITON_REQUESTS: &str = "nv_trt_llm_request_metrics";
const TRITON_KV: &str = "nv_trt_llm_kv_cache_block_metrics";

const TRITON_TRTLLM: EngineSpec = EngineSpec {
    waiting: MetricSpec {
        name: TRITON_REQUESTS,
        labels: &[("request_type", "waiting")],
    },
    running: MetricSpec {
        name: TRITON_REQUESTS,
        labels: &[("request_type", "scheduled")],
    },
    kv_usage: MetricSpec {
        name: TRITON_KV,
        labels: &[("kv_cache_block_type", "fraction")],
    },
    kv_usage_fallback: None,
    cache: CacheSpec::Gauges {
        block_size: MetricSpec {
            name: TRITON_KV,
            labels: &[("kv_cache_block_type", "tokens_per")],
        },
        num_blocks: MetricSpec {
            name: TRITON_KV,
            labels: &[("kv_cache_block_type", "max")],
        },
    },
    lora: None,
    families: &[TRITON_REQUESTS, TRITON_KV],
};

/// The metric names scraped from `engine`.
pub fn engine_spec(engine: EngineType) -> &'static EngineSpec {
    match engine {
        EngineType::Vllm => &VLLM,
        EngineType::Sglang => &SGLANG,
        EngineType::TrtllmServe => &TRTLLM_SERVE,
        EngineType::TritonTensorrtLlm => &TRITON_TRTLLM,
    }
}

/// Extracts an endpoint's metrics from its `/metrics` page (everything but `updated_at`).
///
/// Queue, running and KV usage are required; a missing one is an error naming the family.
/// Cache geometry and LoRA state are optional: absent or unparsable values leave them `None`
/// (vLLM reports `num_gpu_blocks="None"` until it has profiled memory).
pub fn extract_metrics(engine: EngineType, text: &str) -> Result<EndpointMetrics, ScrapeError> {
    let spec = engine_spec(engine);
    let families = promtext::parse(text, spec.families, &promtext::Limits::default())?;

    let waiting = required_value(&families, &spec.waiting)?;
    let running = required_value(&families, &spec.running)?;
    let kv_usage = match spec.kv_usage_fallback {
        Some(old)
            if families.get(spec.kv_usage.name).is_none() && families.get(old.name).is_some() =>
        {
            required_value(&families, &old)?
        }
        _ => required_value(&families, &spec.kv_usage)?,
    };

    let (kv_block_size, kv_num_blocks) = match spec.cache {
        CacheSpec::InfoLabels {
            metric,
            block_size_label,
            num_blocks_label,
        } => match latest_series(&families, &metric) {
            Ok(series) => (
                series.label(block_size_label).and_then(|v| v.parse().ok()),
                series.label(num_blocks_label).and_then(|v| v.parse().ok()),
            ),
            Err(_) => (None, None),
        },
        CacheSpec::Gauges {
            block_size,
            num_blocks,
        } => (
            optional_value(&families, &block_size).map(to_u32),
            optional_value(&families, &num_blocks).map(to_u64),
        ),
    };

    let lora = spec.lora.and_then(|lora| lora_info(&families, &lora));

    Ok(EndpointMetrics {
        waiting_queue_size: to_u32(waiting),
        running_requests: to_u32(running),
        kv_cache_usage: kv_usage,
        kv_block_size,
        kv_num_blocks,
        lora,
        updated_at: None,
    })
}

/// Truncates a validated (finite, non-negative) value to `u32`; `as` saturates at the bounds.
fn to_u32(value: f64) -> u32 {
    value as u32
}

fn to_u64(value: f64) -> u64 {
    value as u64
}

/// The series the reference reads: among those matching the labels, the one with the largest
/// timestamp; the first on the page when none (or equal ones) carry timestamps.
fn latest_series<'f, 'a>(
    families: &'f Families<'a>,
    spec: &MetricSpec,
) -> Result<&'f Sample<'a>, ScrapeError> {
    let family = match families.get(spec.name) {
        Some(family) => family,
        None => {
            return Err(match families.raw(spec.name).and_then(|f| f.kind) {
                Some(kind) if !kind.is_counted() => ScrapeError::WrongType {
                    family: spec.name,
                    kind,
                },
                _ => ScrapeError::MissingFamily { family: spec.name },
            })
        }
    };
    let mut best: Option<&Sample<'a>> = None;
    for sample in family.samples.iter().filter(|s| s.matches(spec.labels)) {
        let ts = sample.timestamp_ms.unwrap_or(0);
        if best.is_none_or(|b| ts > b.timestamp_ms.unwrap_or(0)) {
            best = Some(sample);
        }
    }
    best.ok_or_else(|| ScrapeError::NoMatchingSeries {
        family: spec.name,
        selector: format_selector(spec.labels),
    })
}

fn format_selector(labels: &[(&str, &str)]) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{{}}}", inner.join(","))
}

fn required_value(families: &Families<'_>, spec: &MetricSpec) -> Result<f64, ScrapeError> {
    let value = latest_series(families, spec)?.value;
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(ScrapeError::InvalidValue {
            family: spec.name,
            value,
        })
    }
}

fn optional_value(families: &Families<'_>, spec: &MetricSpec) -> Option<f64> {
    let value = latest_series(families, spec).ok()?.value;
    (value.is_finite() && value >= 0.0).then_some(value)
}

/// vLLM's `lora_requests_info`: every change of the adapter sets starts a new series whose value
/// is its creation time, so the series with the largest value is the current one.
fn lora_info(families: &Families<'_>, spec: &MetricSpec) -> Option<LoraInfo> {
    let family = families.get(spec.name)?;
    let mut best: Option<&Sample<'_>> = None;
    for sample in family.samples.iter().filter(|s| s.matches(spec.labels)) {
        // NaN never wins; ties keep the first series, as the reference does.
        if sample.value > best.map_or(-1.0, |b| b.value) {
            best = Some(sample);
        }
    }
    let series = best?;
    Some(LoraInfo {
        max_lora: series
            .label("max_lora")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
        running: adapter_list(series.label("running_lora_adapters")),
        waiting: adapter_list(series.label("waiting_lora_adapters")),
    })
}

fn adapter_list(csv: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in csv.unwrap_or("").split(',').map(str::trim) {
        if !name.is_empty() && !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    out
}

/// `metrics-data-source` parameters: how model-server metrics are fetched. Only `http` is
/// accepted (configuration rejects `https` and client certificates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSourceConfig {
    /// `http`.
    pub scheme: String,
    /// Path of the metrics page on each endpoint, starting with `/`.
    pub path: String,
    /// Accepted for compatibility; only meaningful with `https`.
    pub insecure_skip_verify: bool,
    /// Scrape period (llm-d-router `interval`), rounded to a multiple of
    /// `--refresh-metrics-interval`; `None`: every refresh interval.
    pub interval: Option<Duration>,
}

impl Default for MetricsSourceConfig {
    fn default() -> Self {
        MetricsSourceConfig {
            scheme: "http".into(),
            path: "/metrics".into(),
            insecure_skip_verify: true,
            interval: None,
        }
    }
}

/// llm-d-router's engine label, read after the configured key.
pub const LLMD_ENGINE_LABEL: &str = "llm-d.ai/engine-type";

/// `core-metrics-extractor` parameters: which engine's metric names apply to a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsExtractorConfig {
    pub engine_label_key: String,
    /// The engine of endpoints whose labels name none (the chart writes it from
    /// `modelServerType`).
    pub default_engine: EngineType,
}

impl Default for MetricsExtractorConfig {
    fn default() -> Self {
        MetricsExtractorConfig {
            engine_label_key: EngineType::LABEL.into(),
            default_engine: EngineType::Vllm,
        }
    }
}

impl MetricsExtractorConfig {
    /// The engine whose metric names `endpoint` serves: its explicit engine (pool file
    /// `engineType`), else its label under `engineLabelKey`, then llm-d-router's and GIE's
    /// keys, else `defaultEngine`. An unknown label value falls back to `defaultEngine`.
    pub fn engine_of(&self, endpoint: &Endpoint) -> EngineType {
        if let Some(engine) = endpoint.engine {
            return engine;
        }
        let label = [
            self.engine_label_key.as_str(),
            LLMD_ENGINE_LABEL,
            EngineType::LABEL,
        ]
        .into_iter()
        .find_map(|k| endpoint.labels.get(k));
        match label.map(|v| v.parse::<EngineType>()) {
            Some(Ok(engine)) => engine,
            Some(Err(e)) => {
                tracing::debug!(endpoint = %endpoint.name, error = %e, default = %self.default_engine,
                    "unknown engine type label; using defaultEngine");
                self.default_engine
            }
            None => self.default_engine,
        }
    }
}

/// The EndpointPickerConfig's data layer (its `dataLayer` section, or the first declared
/// source and extractor, or the defaults), resolved by `epp::config` and applied by the
/// [`Scraper`]: URL scheme and path, scrape interval, and each endpoint's engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataLayerConfig {
    pub source: MetricsSourceConfig,
    pub extractor: MetricsExtractorConfig,
}

impl DataLayerConfig {
    /// The poller period: the source's `interval` rounded to the nearest multiple of the base
    /// refresh interval (at least one), as llm-d-router does; the base interval without one.
    pub fn poll_interval(&self, base: Duration) -> Duration {
        match self.source.interval {
            Some(want) if !base.is_zero() => {
                let n = (want.as_secs_f64() / base.as_secs_f64()).round().max(1.0);
                base.mul_f64(n)
            }
            _ => base,
        }
    }
}

/// Poller settings (`--refresh-metrics-interval`, scrape timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrapeConfig {
    /// Time between the starts of two scrapes of one endpoint.
    pub interval: Duration,
    /// Limit on one scrape, connect to last body byte.
    pub timeout: Duration,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        ScrapeConfig {
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
        }
    }
}

/// An HTTP/1.1 keep-alive client that fetches and parses model-server metrics pages.
#[derive(Clone, Debug)]
pub struct Scraper {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
    layer: Arc<DataLayerConfig>,
}

impl Scraper {
    /// A scraper with the default data layer (`http://<addr>/metrics`, vLLM unless labelled).
    pub fn new(timeout: Duration) -> Self {
        Self::with_data_layer(timeout, DataLayerConfig::default())
    }

    /// A scraper applying the configured data layer.
    pub fn with_data_layer(timeout: Duration, layer: DataLayerConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            // Each poller runs one request at a time, so one idle connection per endpoint suffices.
            .pool_max_idle_per_host(1)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Scraper {
            client,
            timeout,
            layer: Arc::new(layer),
        }
    }

    /// Fetches `<scheme>://<addr><path>` and extracts the endpoint's metrics with its engine's
    /// names (`updated_at` unset).
    pub async fn scrape(&self, endpoint: &Endpoint) -> Result<EndpointMetrics, ScrapeError> {
        let source = &self.layer.source;
        let uri = format!("{}://{}{}", source.scheme, endpoint.addr, source.path);
        let body = match tokio::time::timeout(self.timeout, self.fetch(&uri)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(ScrapeError::Timeout {
                    uri,
                    timeout: self.timeout,
                })
            }
        };
        let text = std::str::from_utf8(&body).map_err(|_| ScrapeError::NotUtf8 { uri })?;
        extract_metrics(self.layer.extractor.engine_of(endpoint), text)
    }

    async fn fetch(&self, uri: &str) -> Result<Bytes, ScrapeError> {
        let http_err = |reason: String| ScrapeError::Http {
            uri: uri.to_string(),
            reason,
        };
        let request = http::Request::get(uri)
            .header(
                http::header::ACCEPT,
                "text/plain;version=0.0.4;q=1,application/openmetrics-text;version=1.0.0;q=0.5",
            )
            .body(Empty::new())
            .map_err(|e| http_err(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| http_err(e.to_string()))?;
        if response.status() != http::StatusCode::OK {
            return Err(ScrapeError::Status {
                uri: uri.to_string(),
                status: response.status().as_u16(),
            });
        }
        let too_large = || ScrapeError::BodyTooLarge {
            uri: uri.to_string(),
            max: MAX_BODY_BYTES,
        };
        let declared = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
            return Err(too_large());
        }
        match Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Err(e) => Err(http_err(e.to_string())),
        }
    }
}

/// Where a poller gets one endpoint's metrics: the HTTP [`Scraper`] in production; tests use
/// an in-memory source so pollers run under paused time.
pub trait MetricsSource: Clone + Send + Sync + 'static {
    /// Fetches and extracts the endpoint's metrics (`updated_at` unset).
    fn scrape(
        &self,
        endpoint: &Endpoint,
    ) -> impl std::future::Future<Output = Result<EndpointMetrics, ScrapeError>> + Send;
}

impl MetricsSource for Scraper {
    fn scrape(
        &self,
        endpoint: &Endpoint,
    ) -> impl std::future::Future<Output = Result<EndpointMetrics, ScrapeError>> + Send {
        Scraper::scrape(self, endpoint)
    }
}

/// Starts the task that runs exactly one poller per endpoint slot, following the datastore's
/// endpoint set until `shutdown` turns true (or its sender is dropped).
pub fn spawn_scrape_manager(
    datastore: Arc<Datastore>,
    config: ScrapeConfig,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    spawn_scrape_manager_with(datastore, config, Scraper::new(config.timeout), shutdown)
}

/// [`spawn_scrape_manager`] applying the configured data layer (URL, interval, engines).
pub fn spawn_scrape_manager_with_layer(
    datastore: Arc<Datastore>,
    config: ScrapeConfig,
    layer: DataLayerConfig,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let config = ScrapeConfig {
        interval: layer.poll_interval(config.interval),
        ..config
    };
    tracing::info!(scheme = %layer.source.scheme, path = %layer.source.path,
        engine_label_key = %layer.extractor.engine_label_key,
        default_engine = %layer.extractor.default_engine, "metrics data layer");
    let scraper = Scraper::with_data_layer(config.timeout, layer);
    spawn_scrape_manager_with(datastore, config, scraper, shutdown)
}

/// [`spawn_scrape_manager`] with the metrics coming from `scraper`.
pub fn spawn_scrape_manager_with<S: MetricsSource>(
    datastore: Arc<Datastore>,
    config: ScrapeConfig,
    scraper: S,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut versions = datastore.subscribe();
        // Keyed by slot identity: the datastore keeps the same slot for an unchanged endpoint and
        // makes a new one when it changes, so a replaced endpoint gets a fresh poller. Holding the
        // Arc keeps the address from being reused while the key is in the map.
        let mut pollers: HashMap<usize, (Arc<EndpointSlot>, JoinHandle<()>)> = HashMap::new();
        tracing::info!(
            interval = ?config.interval,
            timeout = ?config.timeout,
            "metrics scraping started"
        );
        loop {
            versions.borrow_and_update();
            reconcile(&datastore, &mut pollers, &scraper, config);
            tokio::select! {
                changed = versions.changed() => if changed.is_err() { break },
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        for (_, (_, handle)) in pollers.drain() {
            handle.abort();
            let _ = handle.await;
        }
        tracing::info!("metrics scraping stopped");
    })
}

fn slot_key(slot: &Arc<EndpointSlot>) -> usize {
    Arc::as_ptr(slot) as usize
}

fn reconcile<S: MetricsSource>(
    datastore: &Datastore,
    pollers: &mut HashMap<usize, (Arc<EndpointSlot>, JoinHandle<()>)>,
    scraper: &S,
    config: ScrapeConfig,
) {
    let slots = datastore.slots();
    let current: HashMap<usize, &Arc<EndpointSlot>> =
        slots.iter().map(|s| (slot_key(s), s)).collect();
    pollers.retain(|key, (slot, handle)| {
        let keep = current.contains_key(key);
        if !keep {
            handle.abort();
            tracing::debug!(endpoint = %slot.endpoint().name, "metrics poller stopped");
        }
        keep
    });
    for (key, slot) in current {
        if pollers.contains_key(&key) {
            continue;
        }
        let handle = tokio::spawn(poll_endpoint(slot.clone(), scraper.clone(), config));
        tracing::debug!(endpoint = %slot.endpoint().name, "metrics poller started");
        pollers.insert(key, (slot.clone(), handle));
    }
}

/// How often a persistently failing endpoint's error is logged.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

async fn poll_endpoint<S: MetricsSource>(
    slot: Arc<EndpointSlot>,
    scraper: S,
    config: ScrapeConfig,
) {
    let endpoint = slot.endpoint();
    let interval = config.interval.max(Duration::from_millis(1));
    // Spread pollers over one interval so that many endpoints are not scraped in lockstep.
    let offset_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    let offset = Duration::from_millis(rand::random_range(0..offset_ms.max(1)));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
    // A slow scrape delays the next one instead of bursting to catch up.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_logged: Option<Instant> = None;
    let mut suppressed = 0u64;
    let mut failing = false;
    loop {
        ticker.tick().await;
        let mark = slot.dispatch().begin_scrape();
        match scraper.scrape(&endpoint).await {
            Ok(mut metrics) => {
                tracing::trace!(
                    endpoint = %endpoint.name,
                    waiting = metrics.waiting_queue_size,
                    running = metrics.running_requests,
                    kv_cache_usage = metrics.kv_cache_usage,
                    "metrics scraped"
                );
                metrics.updated_at = Some(tokio::time::Instant::now());
                slot.publish_scraped(metrics, mark);
                if failing {
                    tracing::debug!(endpoint = %endpoint.name, "metrics scrape recovered");
                    failing = false;
                    last_logged = None;
                    suppressed = 0;
                }
            }
            Err(error) => {
                failing = true;
                let now = Instant::now();
                if last_logged.is_none_or(|t| now.duration_since(t) >= FAILURE_LOG_EVERY) {
                    tracing::debug!(
                        endpoint = %endpoint.name,
                        %error,
                        suppressed,
                        "metrics scrape failed; keeping previous metrics"
                    );
                    last_logged = Some(now);
                    suppressed = 0;
                } else {
                    suppressed += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
