//! Plugin types the reference EPPs register (GIE v1.5.0 and llm-d-router v0.10
//! `cmd/epp/runner/runner.go`) that Switchyard does not implement, each with the reason it
//! gives. A type listed here is rejected with "plugin type '<t>' is not supported by switchyard:
//! <reason>"; any other unknown type is "not registered". The README's plugin table lists the
//! same entries.
//!
//! Implementing one of these means: remove it here, add it to `plugins.rs`.

/// Why a group of upstream plugin types is not available.
pub const PD: &str = "prefill/decode (and encode) disaggregation is not implemented; every \
    request is scheduled by one profile onto one decode server that also prefills";
pub const PRECISE_PREFIX: &str = "the split form (precise-prefix-cache-producer + \
    prefix-cache-scorer with prefixMatchInfoProducerName) is not built; use \
    precise-prefix-cache-scorer with the same parameters (it owns its index and tokenizer)";
pub const LATENCY: &str = "needs upstream's latency-predictor sidecar; use \
    predicted-ttft-scorer (Switchyard's own TTFT model)";
pub const FLOW_CONTROL: &str = "this flow-control policy is not implemented (flowControl \
    supports global-strict-fairness-policy, round-robin-fairness-policy, fcfs-ordering-policy \
    and priority-holdback-policy)";
pub const MULTICLUSTER: &str = "multi-cluster pools are not supported";
pub const MULTIMODAL: &str = "multimodal request content is not inspected";
pub const PARSER: &str = "only openai-parser (OpenAI completions and chat completions) is \
    implemented";
pub const DATA_SOURCE: &str = "only metrics-data-source with core-metrics-extractor is \
    implemented";
pub const TOKENIZER: &str = "prompts are not tokenized by the EPP (tokens are estimated from \
    bytes)";
pub const ATTRIBUTES: &str = "request and endpoint attributes from other plugins are not \
    modelled; session affinity reads headers";
pub const LABELS: &str = "endpoint selection by labels or attributes is not implemented";
pub const NOT_BUILT: &str = "not implemented";

/// (type, reason) for every rejected upstream type.
pub const UNSUPPORTED: &[(&str, &str)] = &[
    // P/D disaggregation.
    ("decode-filter", PD),
    ("prefill-filter", PD),
    ("encode-filter", PD),
    ("pd-profile-handler", PD),
    ("disagg-profile-handler", PD),
    ("disagg-headers-handler", PD),
    ("prefill-header-handler", PD),
    ("always-disagg-pd-decider", PD),
    ("prefix-based-pd-decider", PD),
    ("always-disagg-multimodal-decider", PD),
    ("data-parallel-profile-handler", PD),
    ("disaggregatedset-rollout-screener", PD),
    // Precise prefix routing: the combined precise-prefix-cache-scorer is implemented.
    ("precise-prefix-cache-producer", PRECISE_PREFIX),
    // Latency prediction.
    ("latency-scorer", LATENCY),
    ("predicted-latency-scorer", LATENCY),
    ("predicted-latency-producer", LATENCY),
    ("latency-slo-admitter", LATENCY),
    ("slo-headroom-tier-filter", LATENCY),
    // Flow control.
    ("program-aware-fairness", FLOW_CONTROL),
    ("edf-ordering-policy", FLOW_CONTROL),
    ("slo-deadline-ordering-policy", FLOW_CONTROL),
    // The static policy is the default; it is used by name in usageLimitPolicyPluginRef.
    ("static-usage-limit-policy", FLOW_CONTROL),
    ("soft-reflective-ceiling-policy", FLOW_CONTROL),
    ("sheddable-eviction-filter", FLOW_CONTROL),
    ("eviction-sheddable-filter", FLOW_CONTROL),
    ("priority-then-time-eviction-order-policy", FLOW_CONTROL),
    ("eviction-priority-then-time-ordering", FLOW_CONTROL),
    ("probabilistic-admitter", FLOW_CONTROL),
    // Multi-cluster.
    ("multicluster-session-affinity-filter", MULTICLUSTER),
    ("multicluster-queue-scorer", MULTICLUSTER),
    ("multicluster-kv-cache-utilization-scorer", MULTICLUSTER),
    ("multicluster-prefix-cache-scorer", MULTICLUSTER),
    ("multicluster-approx-prefix-cache-producer", MULTICLUSTER),
    ("multicluster-metrics-data-source", MULTICLUSTER),
    ("multicluster-metrics-extractor", MULTICLUSTER),
    ("multicluster-file-discovery", MULTICLUSTER),
    // Multimodal.
    ("mm-embeddings-cache-producer", MULTIMODAL),
    ("mm-embeddings-cache-scorer", MULTIMODAL),
    // Parsers.
    ("vllmgrpc-parser", PARSER),
    ("passthrough-parser", PARSER),
    ("anthropic-parser", PARSER),
    ("vllmhttp-parser", PARSER),
    ("sglanghttp-parser", PARSER),
    ("vertexai-parser", PARSER),
    // Data layer.
    ("models-data-source", DATA_SOURCE),
    ("models-data-extractor", DATA_SOURCE),
    ("dcgm-data-source", DATA_SOURCE),
    ("dcgm-extractor", DATA_SOURCE),
    ("topology-extractor", DATA_SOURCE),
    ("k8s-notification-source", DATA_SOURCE),
    ("endpoint-notification-source", DATA_SOURCE),
    ("file-discovery", DATA_SOURCE),
    // Tokenizer and attributes.
    ("token-producer", TOKENIZER),
    ("tokenizer", TOKENIZER),
    ("session-id-producer", ATTRIBUTES),
    ("agent-identity", ATTRIBUTES),
    ("request-attribute-reporter", ATTRIBUTES),
    ("burst-prefix-cache-producer", NOT_BUILT),
    ("p2p-source-producer", NOT_BUILT),
    // Selection by labels, attributes, topology.
    ("label-selector-filter", LABELS),
    ("by-label", LABELS),
    ("by-label-selector", LABELS),
    ("endpoint-attribute-filter", LABELS),
    ("endpoint-attribute-scorer", LABELS),
    ("topology-affinity-filter", LABELS),
    ("topology-affinity-scorer", LABELS),
    ("header-label-affinity-scorer", LABELS),
    ("header-profile-handler", LABELS),
    // Other scorers and filters.
    ("utilization-filter", NOT_BUILT),
    ("context-length-aware", NOT_BUILT),
    ("no-hit-lru-scorer", NOT_BUILT),
];

/// The reason `type_name` is rejected, when it is an upstream type Switchyard lacks.
pub fn unsupported_reason(type_name: &str) -> Option<&'static str> {
    UNSUPPORTED
        .iter()
        .find(|(t, _)| *t == type_name)
        .map(|(_, r)| *r)
}
