//! Flow-control metrics under the reference's names and labels: GIE v1.5.0's
//! `inference_extension_flow_control_*` and llm-d-router's `llm_d_epp_flow_control_*` twins
//! (`pkg/epp/metrics/metrics.go`, `llm_d_router_metrics.go`), so either generation of dashboards
//! works. Fairness ids come from a client header, so their label values are capped
//! ([`MAX_FAIRNESS_LABELS`], then `other`) as the reference caps them.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::epp::metrics::{Buckets, HistogramFamily};

/// Distinct fairness ids reported as themselves (the reference's `maxFairnessLabelValues`).
pub const MAX_FAIRNESS_LABELS: usize = 1000;
/// Label value of every fairness id past the cap.
pub const OVERFLOW_LABEL: &str = "other";

const QUEUE_DURATION_BUCKETS: [f64; 16] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

crate::escaped_label_set! {
    pub struct QueueLabels {
        pub fairness_id: String,
        pub priority: String,
        pub inference_pool: String,
        pub model_name: String,
        pub target_model_name: String,
    }
}

crate::escaped_label_set! {
    pub struct DurationLabels {
        pub fairness_id: String,
        pub priority: String,
        pub outcome: String,
        pub inference_pool: String,
        pub model_name: String,
        pub target_model_name: String,
    }
}

crate::escaped_label_set! {
    pub struct OutcomeLabels {
        pub outcome: String,
        pub priority: String,
        pub inference_pool: String,
    }
}

crate::escaped_label_set! {
    pub struct PoolLabels {
        pub inference_pool: String,
    }
}

/// How a request left flow control (the reference's `QueueOutcome` strings, a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Dispatched,
    RejectedCapacity,
    RejectedNoEndpoints,
    RejectedOther,
    EvictedTtl,
    EvictedNoEndpoints,
    EvictedContextCancelled,
    EvictedOther,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Dispatched => "Dispatched",
            Outcome::RejectedCapacity => "RejectedCapacity",
            Outcome::RejectedNoEndpoints => "RejectedNoEndpoints",
            Outcome::RejectedOther => "RejectedOther",
            Outcome::EvictedTtl => "EvictedTTL",
            Outcome::EvictedNoEndpoints => "EvictedNoEndpoints",
            Outcome::EvictedContextCancelled => "EvictedContextCancelled",
            Outcome::EvictedOther => "EvictedOther",
        }
    }
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// One family under both generations of names.
#[derive(Clone, Default)]
struct Twin<M> {
    gie: M,
    llmd: M,
}

/// Handles of the flow-control metrics. Cheap to clone.
#[derive(Clone)]
pub struct FlowMetrics {
    pool: String,
    queue_size: Twin<Family<QueueLabels, Gauge>>,
    queue_bytes: Twin<Family<QueueLabels, Gauge>>,
    queue_duration: Twin<HistogramFamily<DurationLabels>>,
    pool_saturation: Twin<Family<PoolLabels, FloatGauge>>,
    requests: Family<OutcomeLabels, Counter>,
    fairness_labels: Arc<Mutex<HashSet<String>>>,
}

/// The gauges one queued request moves, resolved once at enqueue.
#[derive(Debug)]
pub struct QueuedGauges {
    size: [Gauge; 2],
    bytes: [Gauge; 2],
    amount: i64,
}

impl QueuedGauges {
    fn add(&self) {
        for g in &self.size {
            g.inc();
        }
        for g in &self.bytes {
            g.inc_by(self.amount);
        }
    }

    /// The request left the queue.
    pub fn release(&self) {
        for g in &self.size {
            g.dec();
        }
        for g in &self.bytes {
            g.dec_by(self.amount);
        }
    }
}

/// The label values of one request.
#[derive(Debug, Clone)]
pub struct RequestLabels {
    pub fairness_id: String,
    pub priority: String,
    pub model_name: String,
    pub target_model_name: String,
}

impl FlowMetrics {
    pub fn new(registry: &mut Registry, pool: &str) -> Self {
        let m = FlowMetrics {
            pool: pool.to_string(),
            queue_size: Twin::default(),
            queue_bytes: Twin::default(),
            queue_duration: Twin {
                gie: Family::new_with_constructor(Buckets(&QUEUE_DURATION_BUCKETS)),
                llmd: Family::new_with_constructor(Buckets(&QUEUE_DURATION_BUCKETS)),
            },
            pool_saturation: Twin::default(),
            requests: Family::default(),
            fairness_labels: Arc::new(Mutex::new(HashSet::new())),
        };
        for (prefix, size, bytes, duration, saturation) in [
            (
                "inference_extension",
                &m.queue_size.gie,
                &m.queue_bytes.gie,
                &m.queue_duration.gie,
                &m.pool_saturation.gie,
            ),
            (
                "llm_d_epp",
                &m.queue_size.llmd,
                &m.queue_bytes.llmd,
                &m.queue_duration.llmd,
                &m.pool_saturation.llmd,
            ),
        ] {
            registry.register(
                format!("{prefix}_flow_control_request_queue_duration_seconds"),
                "Distribution of total time requests spend in the Flow Control layer (from enqueue to final outcome).",
                duration.clone(),
            );
            registry.register(
                format!("{prefix}_flow_control_queue_size"),
                "Current number of requests actively held in the Flow Control queue.",
                size.clone(),
            );
            registry.register(
                format!("{prefix}_flow_control_queue_bytes"),
                "Current total size in bytes of requests actively held in the Flow Control queue.",
                bytes.clone(),
            );
            registry.register(
                format!("{prefix}_flow_control_pool_saturation"),
                "Pool saturation signal gating Flow Control dispatch (1.0 = saturated).",
                saturation.clone(),
            );
        }
        // prometheus-client appends `_total`.
        registry.register(
            "llm_d_epp_flow_control_requests",
            "Total number of requests processed by the Flow Control layer.",
            m.requests.clone(),
        );
        m
    }

    /// `id` as a label value: itself while fewer than [`MAX_FAIRNESS_LABELS`] distinct ids
    /// have been seen (an id once admitted stays itself, so gauge pairs balance), else `other`.
    pub fn fairness_label(&self, id: &str) -> String {
        let mut seen = self.fairness_labels.lock();
        if seen.contains(id) {
            return id.to_string();
        }
        if seen.len() >= MAX_FAIRNESS_LABELS {
            return OVERFLOW_LABEL.to_string();
        }
        seen.insert(id.to_string());
        id.to_string()
    }

    fn queue_labels(&self, l: &RequestLabels) -> QueueLabels {
        QueueLabels {
            fairness_id: l.fairness_id.clone(),
            priority: l.priority.clone(),
            inference_pool: self.pool.clone(),
            model_name: l.model_name.clone(),
            target_model_name: l.target_model_name.clone(),
        }
    }

    /// Counts a request into the queue gauges; [`QueuedGauges::release`] takes it out.
    pub fn queued(&self, l: &RequestLabels, bytes: u64) -> QueuedGauges {
        let labels = self.queue_labels(l);
        let g = QueuedGauges {
            size: [
                self.queue_size.gie.get_or_create(&labels).clone(),
                self.queue_size.llmd.get_or_create(&labels).clone(),
            ],
            bytes: [
                self.queue_bytes.gie.get_or_create(&labels).clone(),
                self.queue_bytes.llmd.get_or_create(&labels).clone(),
            ],
            amount: i64::try_from(bytes).unwrap_or(i64::MAX),
        };
        g.add();
        g
    }

    /// Records how a request left flow control and how long it spent there.
    pub fn finished(&self, l: &RequestLabels, outcome: Outcome, waited: Duration) {
        let labels = DurationLabels {
            fairness_id: l.fairness_id.clone(),
            priority: l.priority.clone(),
            outcome: outcome.as_str().to_string(),
            inference_pool: self.pool.clone(),
            model_name: l.model_name.clone(),
            target_model_name: l.target_model_name.clone(),
        };
        let secs = waited.as_secs_f64();
        self.queue_duration.gie.get_or_create(&labels).observe(secs);
        self.queue_duration
            .llmd
            .get_or_create(&labels)
            .observe(secs);
        self.requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str().to_string(),
                priority: l.priority.clone(),
                inference_pool: self.pool.clone(),
            })
            .inc();
    }

    /// The saturation the last dispatch decision saw.
    pub fn set_pool_saturation(&self, saturation: f64) {
        let labels = PoolLabels {
            inference_pool: self.pool.clone(),
        };
        self.pool_saturation
            .gie
            .get_or_create(&labels)
            .set(saturation);
        self.pool_saturation
            .llmd
            .get_or_create(&labels)
            .set(saturation);
    }
}
