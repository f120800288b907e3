//! The EPP's own Prometheus metrics, with the reference EPP's names, labels and buckets
//! (GIE v1.5.0 `pkg/epp/metrics/metrics.go`) so existing dashboards keep working.
//! Scheduler and prefix-index metrics are registered by `scheduling`; the prefix-hit prediction
//! metrics (Switchyard's own) by `kvcache::accuracy`.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::datastore::Datastore;
use super::kvcache::PredictionMetrics;

const GENERAL_LATENCY_BUCKETS: [f64; 35] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0,
    1200.0, 1800.0, 2700.0, 3600.0,
];
const REQUEST_SIZE_BUCKETS: [f64; 25] = [
    64.0,
    128.0,
    256.0,
    512.0,
    1024.0,
    2048.0,
    4096.0,
    8192.0,
    16384.0,
    32768.0,
    65536.0,
    131072.0,
    262144.0,
    524288.0,
    1048576.0,
    2097152.0,
    4194304.0,
    8388608.0,
    16777216.0,
    33554432.0,
    67108864.0,
    134217728.0,
    268435456.0,
    536870912.0,
    1073741824.0,
];
// 32778 (sic) is the reference's value; kept so bucket boundaries match its dashboards.
const RESPONSE_SIZE_BUCKETS: [f64; 15] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32778.0, 65536.0,
];
const TOKEN_BUCKETS: [f64; 19] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32778.0, 65536.0, 131072.0, 262144.0, 524288.0, 1048576.0,
];
const OUTPUT_TOKEN_BUCKETS: [f64; 12] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];
const NTPOT_BUCKETS: [f64; 13] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

// Model names and pod names come from outside the binary (requests, discovery): every label set
// escapes its values when encoded (`promencode::Escaped`); model names are also allow-listed
// before they get here (`director::label_for_model`).
crate::escaped_label_set! {
    pub struct ModelLabels {
        pub model_name: String,
        pub target_model_name: String,
    }
}

crate::escaped_label_set! {
    pub struct ModelPriorityLabels {
        pub model_name: String,
        pub target_model_name: String,
        pub priority: String,
    }
}

crate::escaped_label_set! {
    pub struct ModelErrorLabels {
        pub model_name: String,
        pub target_model_name: String,
        pub error_code: String,
    }
}

crate::escaped_label_set! {
    pub struct ModelNameLabel {
        pub model_name: String,
    }
}

crate::escaped_label_set! {
    pub struct PoolLabel {
        pub name: String,
    }
}

crate::escaped_label_set! {
    pub struct PoolPodLabels {
        pub name: String,
        pub model_server_pod: String,
    }
}

crate::escaped_label_set! {
    pub struct InfoLabels {
        pub commit: String,
        pub build_ref: String,
    }
}

/// Builds histograms with fixed bucket boundaries for a [`Family`].
#[derive(Clone, Copy, Debug)]
pub struct Buckets(pub &'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

pub type HistogramFamily<L> = Family<L, Histogram, Buckets>;

fn histogram_family<L>(buckets: &'static [f64]) -> HistogramFamily<L>
where
    L: Clone + std::hash::Hash + Eq,
{
    Family::new_with_constructor(Buckets(buckets))
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Handles of every request-path metric. Cheap to clone (all handles are `Arc`s inside).
#[derive(Clone)]
pub struct EppMetrics {
    pub requests: Family<ModelPriorityLabels, Counter>,
    pub request_errors: Family<ModelErrorLabels, Counter>,
    pub request_duration: HistogramFamily<ModelLabels>,
    pub request_sizes: HistogramFamily<ModelLabels>,
    pub response_sizes: HistogramFamily<ModelLabels>,
    pub input_tokens: HistogramFamily<ModelLabels>,
    pub output_tokens: HistogramFamily<ModelLabels>,
    pub prompt_cached_tokens: HistogramFamily<ModelLabels>,
    pub normalized_time_per_output_token: HistogramFamily<ModelLabels>,
    pub running_requests: Family<ModelNameLabel, Gauge>,
    /// Predicted vs reported cached tokens (`switchyard_prefix_prediction_*`).
    pub prefix_prediction: PredictionMetrics,
    pool_avg_kv: Family<PoolLabel, FloatGauge>,
    pool_avg_queue: Family<PoolLabel, FloatGauge>,
    pool_avg_running: Family<PoolLabel, FloatGauge>,
    pool_ready_pods: Family<PoolLabel, FloatGauge>,
    pool_per_pod_queue: Family<PoolPodLabels, FloatGauge>,
}

impl EppMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = EppMetrics {
            requests: Family::default(),
            request_errors: Family::default(),
            request_duration: histogram_family(&GENERAL_LATENCY_BUCKETS),
            request_sizes: histogram_family(&REQUEST_SIZE_BUCKETS),
            response_sizes: histogram_family(&RESPONSE_SIZE_BUCKETS),
            input_tokens: histogram_family(&TOKEN_BUCKETS),
            output_tokens: histogram_family(&OUTPUT_TOKEN_BUCKETS),
            prompt_cached_tokens: histogram_family(&TOKEN_BUCKETS),
            normalized_time_per_output_token: histogram_family(&NTPOT_BUCKETS),
            running_requests: Family::default(),
            prefix_prediction: PredictionMetrics::new(registry),
            pool_avg_kv: Family::default(),
            pool_avg_queue: Family::default(),
            pool_avg_running: Family::default(),
            pool_ready_pods: Family::default(),
            pool_per_pod_queue: Family::default(),
        };
        // prometheus-client appends `_total` to counters.
        registry.register(
            "inference_objective_request",
            "Counter of inference objective requests broken out for each model and target model",
            m.requests.clone(),
        );
        registry.register(
            "inference_objective_request_error",
            "Counter of inference objective requests errors broken out for each model and target model",
            m.request_errors.clone(),
        );
        registry.register(
            "inference_objective_request_duration_seconds",
            "Inference objective response latency distribution in seconds for each model and target model",
            m.request_duration.clone(),
        );
        registry.register(
            "inference_objective_request_sizes",
            "Inference objective requests size distribution in bytes for each model and target model",
            m.request_sizes.clone(),
        );
        registry.register(
            "inference_objective_response_sizes",
            "Inference objective responses size distribution in bytes for each model and target model",
            m.response_sizes.clone(),
        );
        registry.register(
            "inference_objective_input_tokens",
            "Inference objective input token count distribution for requests in each model",
            m.input_tokens.clone(),
        );
        registry.register(
            "inference_objective_output_tokens",
            "Inference objective output token count distribution for requests in each model",
            m.output_tokens.clone(),
        );
        registry.register(
            "inference_objective_prompt_cached_tokens",
            "Inference objective prompt cached token count distribution for requests in each model",
            m.prompt_cached_tokens.clone(),
        );
        registry.register(
            "inference_objective_normalized_time_per_output_token_seconds",
            "Inference objective latency divided by number of output tokens in seconds for each model and target model",
            m.normalized_time_per_output_token.clone(),
        );
        registry.register(
            "inference_objective_running_requests",
            "Inference objective number of running requests in each model",
            m.running_requests.clone(),
        );
        registry.register(
            "inference_pool_average_kv_cache_utilization",
            "The average kv cache utilization for an inference server pool",
            m.pool_avg_kv.clone(),
        );
        registry.register(
            "inference_pool_average_queue_size",
            "The average number of requests pending in the model server queue",
            m.pool_avg_queue.clone(),
        );
        registry.register(
            "inference_pool_average_running_requests",
            "The average number of running requests across model servers in the pool",
            m.pool_avg_running.clone(),
        );
        registry.register(
            "inference_pool_ready_pods",
            "The number of ready pods in the inference server pool",
            m.pool_ready_pods.clone(),
        );
        registry.register(
            "inference_pool_per_pod_queue_size",
            "The total number of requests pending in the model server queue for each underlying pod",
            m.pool_per_pod_queue.clone(),
        );
        let info: Family<InfoLabels, Gauge> = Family::default();
        info.get_or_create(&InfoLabels {
            commit: option_env!("SWITCHYARD_COMMIT")
                .unwrap_or("unknown")
                .to_string(),
            build_ref: env!("CARGO_PKG_VERSION").to_string(),
        })
        .set(1);
        registry.register(
            "inference_extension_info",
            "General information of the current build of Inference Extension",
            info,
        );
        m
    }

    pub fn model_labels(model: &str, target: &str) -> ModelLabels {
        ModelLabels {
            model_name: model.to_string(),
            target_model_name: target.to_string(),
        }
    }

    pub fn record_error(&self, model: &str, target: &str, code: &str) {
        self.request_errors
            .get_or_create(&ModelErrorLabels {
                model_name: model.to_string(),
                target_model_name: target.to_string(),
                error_code: code.to_string(),
            })
            .inc();
    }

    /// Recomputes the pool gauges from the datastore (run periodically, not per request).
    /// Only endpoints whose metrics are fresh within `staleness` count towards the averages.
    pub fn refresh_pool_gauges(&self, pool: &str, datastore: &Datastore, staleness: Duration) {
        let now = tokio::time::Instant::now();
        let snapshot = datastore.snapshot();
        let label = PoolLabel {
            name: pool.to_string(),
        };
        let fresh: Vec<_> = snapshot
            .iter()
            .filter(|s| !s.metrics.is_stale(now, staleness))
            .collect();
        let n = fresh.len() as f64;
        let avg = |f: &dyn Fn(&super::endpoint::EndpointMetrics) -> f64| {
            if fresh.is_empty() {
                0.0
            } else {
                fresh.iter().map(|s| f(&s.metrics)).sum::<f64>() / n
            }
        };
        self.pool_avg_kv
            .get_or_create(&label)
            .set(avg(&|m| m.kv_cache_usage));
        self.pool_avg_queue
            .get_or_create(&label)
            .set(avg(&|m| f64::from(m.waiting_queue_size)));
        self.pool_avg_running
            .get_or_create(&label)
            .set(avg(&|m| f64::from(m.running_requests)));
        self.pool_ready_pods
            .get_or_create(&label)
            .set(snapshot.len() as f64);
        // Rebuild the per-pod series so endpoints that left the pool disappear.
        self.pool_per_pod_queue.clear();
        for s in &snapshot {
            self.pool_per_pod_queue
                .get_or_create(&PoolPodLabels {
                    name: pool.to_string(),
                    model_server_pod: s.endpoint.name.clone(),
                })
                .set(f64::from(s.metrics.waiting_queue_size));
        }
    }
}

/// Encodes a registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    crate::promencode::encode(registry)
}

/// Shared, immutable-after-startup registry.
pub type SharedRegistry = Arc<Registry>;
