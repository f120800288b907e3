//! How well the EPP predicts prefix-cache hits: for each routed request, the cached tokens each
//! index predicted at the primary endpoint ([`CachedPrediction`], carried with the decision) are
//! compared with the `usage.prompt_tokens_details.cached_tokens` the replica reports, and the
//! error is counted per index kind (`switchyard_prefix_prediction_*`, [`PredictionMetrics`]).
//!
//! Both predictions follow the engine's rule for what it can report: whole blocks only, and at
//! most `(prompt_tokens - 1) / block` blocks, because vLLM (and `switchyard serve`) always
//! computes the prompt's last token ([`engine_hit_tokens`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Cached prompt tokens the EPP expects the primary endpoint to report, per index. `None` where
/// that index made no prediction (no approximate index configured; no precise scorer, an
/// endpoint without a live event stream, or a prompt the EPP cannot tokenize).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CachedPrediction {
    pub approximate: Option<u64>,
    pub precise: Option<u64>,
}

/// The tokens an engine reports cached when `matched_tokens` leading prompt tokens are in its
/// cache: whole `block`-token blocks, at most `(prompt_tokens - 1) / block` of them.
pub fn engine_hit_tokens(matched_tokens: u64, prompt_tokens: u64, block: u64) -> u64 {
    if block == 0 {
        return 0;
    }
    let max_blocks = prompt_tokens.saturating_sub(1) / block;
    (matched_tokens / block).min(max_blocks) * block
}

/// Histogram buckets of |predicted − reported| tokens: `le="0"` counts exact predictions.
const ERROR_BUCKETS: [f64; 12] = [
    0.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IndexLabel {
    index: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    index: &'static str,
    outcome: &'static str,
}

/// One index kind's handles, resolved at construction so recording looks nothing up.
#[derive(Debug, Clone)]
struct KindMetrics {
    error: Histogram,
    exact: Counter,
    over: Counter,
    under: Counter,
    predicted: Counter,
    reported: Counter,
}

impl KindMetrics {
    fn record(&self, predicted: u64, reported: u64) {
        self.error.observe(predicted.abs_diff(reported) as f64);
        match predicted.cmp(&reported) {
            std::cmp::Ordering::Equal => self.exact.inc(),
            std::cmp::Ordering::Greater => self.over.inc(),
            std::cmp::Ordering::Less => self.under.inc(),
        };
        self.predicted.inc_by(predicted);
        self.reported.inc_by(reported);
    }
}

/// `switchyard_prefix_prediction_*`, labelled `index="approximate"|"precise"`.
#[derive(Debug, Clone)]
pub struct PredictionMetrics {
    approximate: KindMetrics,
    precise: KindMetrics,
}

impl PredictionMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let error = Family::<IndexLabel, Histogram, _>::new_with_constructor(
            (|| Histogram::new(ERROR_BUCKETS)) as fn() -> Histogram,
        );
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        let predicted = Family::<IndexLabel, Counter>::default();
        let reported = Family::<IndexLabel, Counter>::default();
        let kind = |index: &'static str| {
            let outcome = |outcome| {
                outcomes
                    .get_or_create(&OutcomeLabels { index, outcome })
                    .clone()
            };
            KindMetrics {
                error: error.get_or_create(&IndexLabel { index }).clone(),
                exact: outcome("exact"),
                over: outcome("over"),
                under: outcome("under"),
                predicted: predicted.get_or_create(&IndexLabel { index }).clone(),
                reported: reported.get_or_create(&IndexLabel { index }).clone(),
            }
        };
        let m = PredictionMetrics {
            approximate: kind("approximate"),
            precise: kind("precise"),
        };
        let r = registry.sub_registry_with_prefix("switchyard_prefix_prediction");
        r.register(
            "error_tokens",
            "Absolute difference between the cached prompt tokens an index predicted at the primary endpoint and those the endpoint reported (usage.prompt_tokens_details.cached_tokens), per index kind",
            error,
        );
        // prometheus-client appends `_total` to counters.
        r.register(
            "outcomes",
            "Routed requests whose reported cached tokens the index predicted exactly, over or under",
            outcomes,
        );
        r.register(
            "predicted_tokens",
            "Cached prompt tokens predicted at the primary endpoint, summed over requests with reported usage",
            predicted,
        );
        r.register(
            "reported_tokens",
            "Cached prompt tokens the endpoint reported for the requests an index predicted",
            reported,
        );
        m
    }

    /// Compares each index's prediction with the `reported` cached tokens of the response.
    pub fn record(&self, prediction: &CachedPrediction, reported: u64) {
        if let Some(p) = prediction.approximate {
            self.approximate.record(p, reported);
        }
        if let Some(p) = prediction.precise {
            self.precise.record(p, reported);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_hits_are_whole_blocks_short_of_the_last_token() {
        // 128 prompt tokens fully cached: the engine recomputes the last block.
        assert_eq!(engine_hit_tokens(128, 128, 16), 112);
        assert_eq!(engine_hit_tokens(128, 129, 16), 128);
        assert_eq!(engine_hit_tokens(40, 200, 16), 32);
        assert_eq!(engine_hit_tokens(0, 200, 16), 0);
        assert_eq!(engine_hit_tokens(64, 0, 16), 0);
        assert_eq!(engine_hit_tokens(64, 100, 0), 0);
    }

    #[test]
    fn records_error_and_outcome_per_index() {
        let mut registry = Registry::default();
        let m = PredictionMetrics::new(&mut registry);
        m.record(
            &CachedPrediction {
                approximate: Some(112),
                precise: Some(112),
            },
            112,
        );
        m.record(
            &CachedPrediction {
                approximate: Some(112),
                precise: Some(0),
            },
            0,
        );
        m.record(
            &CachedPrediction {
                approximate: Some(0),
                precise: None,
            },
            48,
        );
        m.record(&CachedPrediction::default(), 16);
        let text = crate::promencode::encode(&registry);
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        };
        let a = "{index=\"approximate\"}";
        let p = "{index=\"precise\"}";
        assert_eq!(
            value(&format!("switchyard_prefix_prediction_error_tokens_sum{a}")),
            160.0
        );
        assert_eq!(
            value(&format!(
                "switchyard_prefix_prediction_error_tokens_count{a}"
            )),
            3.0
        );
        assert_eq!(
            value(&format!("switchyard_prefix_prediction_error_tokens_sum{p}")),
            0.0
        );
        assert_eq!(
            value(&format!(
                "switchyard_prefix_prediction_error_tokens_count{p}"
            )),
            2.0
        );
        let bucket0 = |index: &str| {
            value(&format!(
                "switchyard_prefix_prediction_error_tokens_bucket{{le=\"0.0\",index=\"{index}\"}}"
            ))
        };
        assert_eq!(bucket0("approximate"), 1.0);
        assert_eq!(bucket0("precise"), 2.0);
        let outcome = |index: &str, outcome: &str| {
            value(&format!(
                "switchyard_prefix_prediction_outcomes_total{{index=\"{index}\",outcome=\"{outcome}\"}}"
            ))
        };
        assert_eq!(
            [
                outcome("approximate", "exact"),
                outcome("approximate", "over"),
                outcome("approximate", "under")
            ],
            [1.0, 1.0, 1.0]
        );
        assert_eq!(
            [
                outcome("precise", "exact"),
                outcome("precise", "over"),
                outcome("precise", "under")
            ],
            [2.0, 0.0, 0.0]
        );
        assert_eq!(
            value(&format!(
                "switchyard_prefix_prediction_predicted_tokens_total{a}"
            )),
            224.0
        );
        assert_eq!(
            value(&format!(
                "switchyard_prefix_prediction_reported_tokens_total{a}"
            )),
            160.0
        );
        assert_eq!(
            value(&format!(
                "switchyard_prefix_prediction_reported_tokens_total{p}"
            )),
            112.0
        );
    }
}
