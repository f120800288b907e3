//! BBR's Prometheus metrics, with upstream's names (GIE v1.5.0 `pkg/bbr/metrics`): requests
//! processed, and body fields missing or empty. The `field` label takes only configured field
//! names, so its values are bounded.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FieldLabel {
    pub field: String,
}

#[derive(Debug, Clone, Default)]
pub struct BbrMetrics {
    pub success: Counter,
    pub not_found: Family<FieldLabel, Counter>,
    pub empty: Family<FieldLabel, Counter>,
}

impl BbrMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = BbrMetrics::default();
        registry.register(
            "bbr_success",
            "Count of time the request was processed successfully.",
            m.success.clone(),
        );
        registry.register(
            "bbr_body_field_not_found",
            "Count of times a field wasn't found in a request body.",
            m.not_found.clone(),
        );
        registry.register(
            "bbr_body_field_empty",
            "Count of times a field was found in a request body but was empty.",
            m.empty.clone(),
        );
        m
    }

    pub fn field_not_found(&self, field: &str) {
        self.not_found
            .get_or_create(&FieldLabel {
                field: field.to_string(),
            })
            .inc();
    }

    pub fn field_empty(&self, field: &str) {
        self.empty
            .get_or_create(&FieldLabel {
                field: field.to_string(),
            })
            .inc();
    }
}
