//! EndpointPickerConfig decoding, defaulting and rejection tests.

use std::time::Duration;

use super::*;
use crate::epp::endpoint::EngineType;
use crate::epp::prefix::PrefixCacheParams;
use crate::epp::saturation::SaturationConfig;
use crate::epp::scrape::MetricsSourceConfig;

const HEAD: &str =
    "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n";

fn cfg(body: &str) -> Result<EppConfig, ConfigError> {
    parse_config(&format!("{HEAD}{body}"))
}

fn err(body: &str) -> String {
    match cfg(body) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn names(c: &EppConfig) -> Vec<(&str, &str)> {
    c.plugins
        .iter()
        .map(|p| (p.name.as_str(), p.kind.type_name()))
        .collect()
}

/// A profile as names: (name, filters, (scorer, weight)s, picker).
#[derive(Debug, PartialEq)]
struct ProfileSpec {
    name: String,
    filters: Vec<String>,
    scorers: Vec<(String, f64)>,
    picker: String,
}

fn profiles(c: &EppConfig) -> Vec<ProfileSpec> {
    c.scheduling
        .profiles
        .iter()
        .map(|p| ProfileSpec {
            name: p.name.clone(),
            filters: p.filters.iter().map(|f| f.name().to_string()).collect(),
            scorers: p
                .scorers
                .iter()
                .map(|(s, w)| (s.name().to_string(), *w))
                .collect(),
            picker: p.picker.name().to_string(),
        })
        .collect()
}

#[test]
fn reference_default_config_is_the_reference_chart() {
    let c = parse_config(REFERENCE_DEFAULT_CONFIG).unwrap();
    assert_eq!(
        names(&c),
        vec![
            ("queue-scorer", "queue-scorer"),
            ("kv-cache-utilization-scorer", "kv-cache-utilization-scorer"),
            ("prefix-cache-scorer", "prefix-cache-scorer"),
            ("metrics-data-source", "metrics-data-source"),
            ("core-metrics-extractor", "core-metrics-extractor"),
            ("single-profile-handler", "single-profile-handler"),
            ("max-score-picker", "max-score-picker"),
            ("utilization-detector", "utilization-detector"),
        ]
    );
    assert_eq!(
        profiles(&c),
        vec![ProfileSpec {
            name: "default".into(),
            filters: vec![],
            scorers: vec![
                ("queue-scorer".into(), 2.0),
                ("kv-cache-utilization-scorer".into(), 2.0),
                ("prefix-cache-scorer".into(), 3.0),
            ],
            picker: "max-score-picker".into(),
        }]
    );
    assert_eq!(c.scheduling.handler.name(), "single-profile-handler");
    assert_eq!(
        c.scheduling.prefix_cache,
        Some(PrefixCacheParams {
            auto_tune: true,
            block_size_tokens: 16,
            max_prefix_blocks_to_match: 256,
            max_prefix_tokens_to_match: 0,
            lru_capacity_per_server: 31250,
        })
    );
    assert_eq!(c.data_layer.source, MetricsSourceConfig::default());
    assert_eq!(c.saturation_detector, "utilization-detector");
    assert_eq!(c.saturation, SaturationConfig::default().into());
    // Empty text means Switchyard's default (the work-aware profile), not this one.
    let empty = parse_config("  \n").unwrap();
    assert_ne!(profiles(&empty), profiles(&c));
}

#[test]
fn default_config_is_the_work_aware_profile() {
    let c = parse_config(DEFAULT_CONFIG).unwrap();
    let empty = parse_config("  \n").unwrap();
    assert_eq!(names(&empty), names(&c));
    assert_eq!(profiles(&empty), profiles(&c));
    assert_eq!(
        profiles(&c),
        vec![ProfileSpec {
            name: "default".into(),
            filters: vec!["scrape-freshness-filter".into()],
            scorers: vec![("predicted-ttft-scorer".into(), 1.0)],
            picker: "max-score-picker".into(),
        }]
    );
}

#[test]
fn no_profiles_makes_a_default_profile_of_all_scheduling_plugins() {
    let c = cfg("plugins:\n- type: queue-scorer\n- type: lora-affinity-scorer\n  name: lora\n- type: random-picker\n- type: metrics-data-source\n").unwrap();
    assert_eq!(
        profiles(&c),
        vec![ProfileSpec {
            name: "default".into(),
            filters: vec![],
            scorers: vec![("queue-scorer".into(), 1.0), ("lora".into(), 1.0)],
            picker: "random-picker".into(),
        }]
    );
    assert_eq!(c.scheduling.handler.name(), "single-profile-handler");
    assert_eq!(c.scheduling.prefix_cache, None);
}

#[test]
fn missing_picker_and_weight_get_defaults() {
    let c = cfg("plugins:\n- type: kv-cache-utilization-scorer\n  name: kv\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: kv\n").unwrap();
    assert_eq!(profiles(&c)[0].scorers, vec![("kv".into(), 1.0)]);
    assert_eq!(profiles(&c)[0].picker, "max-score-picker");
    assert!(matches!(
        c.plugin("max-score-picker").unwrap().kind,
        PluginKind::MaxScorePicker(PickerParams {
            max_num_of_endpoints: 1
        })
    ));
}

#[test]
fn picker_parameters() {
    let c = cfg("plugins:\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 3}\n- type: weighted-random-picker\n  parameters:\n    maxNumOfEndpoints: 0\nschedulingProfiles:\n- name: default\n  plugins: [{pluginRef: max-score-picker}]\n").unwrap();
    assert_eq!(
        c.plugin("max-score-picker").unwrap().kind,
        PluginKind::MaxScorePicker(PickerParams {
            max_num_of_endpoints: 3
        })
    );
    // <= 0 falls back to 1 as in the reference.
    assert_eq!(
        c.plugin("weighted-random-picker").unwrap().kind,
        PluginKind::WeightedRandomPicker(PickerParams {
            max_num_of_endpoints: 1
        })
    );
}

#[test]
fn two_pickers_in_one_profile_are_rejected() {
    // As in the reference: the implicit default profile takes every picker.
    let e = err("plugins:\n- type: max-score-picker\n- type: random-picker\n");
    assert!(
        e.contains("has two pickers: 'max-score-picker' and 'random-picker'"),
        "{e}"
    );
}

#[test]
fn prefix_parameters_and_parameters_before_type() {
    let c = cfg("plugins:\n- parameters: {blockSizeTokens: 32, autoTune: false, maxPrefixTokensToMatch: 1024, lruCapacityPerServer: 500}\n  type: prefix-cache-scorer\n").unwrap();
    assert_eq!(
        c.scheduling.prefix_cache,
        Some(PrefixCacheParams {
            auto_tune: false,
            block_size_tokens: 32,
            max_prefix_blocks_to_match: 256,
            max_prefix_tokens_to_match: 1024,
            lru_capacity_per_server: 500,
        })
    );
}

#[test]
fn optional_top_level_sections() {
    let c = cfg(r#"featureGates: [dataLayer]
plugins:
- type: queue-scorer
- name: sat
  type: utilization-detector
  parameters: {queueDepthThreshold: 8, kvCacheUtilThreshold: 0.9, metricsStalenessThreshold: 1s, headroom: 0.1}
- name: src
  type: metrics-data-source
  parameters: {scheme: http, path: /stats, insecureSkipVerify: false, interval: 1s}
- name: ex
  type: core-metrics-extractor
  parameters: {defaultEngine: sglang}
- type: openai-parser
saturationDetector:
  pluginRef: sat
dataLayer:
  sources:
  - pluginRef: src
    extractors:
    - pluginRef: ex
parser:
  pluginRef: openai-parser
flowControl:
  maxRequests: "100"
"#)
    .unwrap();
    assert_eq!(c.feature_gates, vec!["dataLayer".to_string()]);
    assert_eq!(c.saturation_detector, "sat");
    assert_eq!(
        c.saturation,
        SaturationConfig {
            queue_depth_threshold: 8,
            kv_cache_util_threshold: 0.9,
            metrics_staleness_threshold: Duration::from_secs(1),
            headroom: 0.1,
        }
        .into()
    );
    assert_eq!(
        c.data_layer.source,
        MetricsSourceConfig {
            scheme: "http".into(),
            path: "/stats".into(),
            insecure_skip_verify: false,
            interval: Some(Duration::from_secs(1)),
        }
    );
    // Rounded to a multiple of the refresh interval.
    assert_eq!(
        c.data_layer.poll_interval(Duration::from_millis(300)),
        Duration::from_millis(900)
    );
    assert_eq!(
        c.data_layer.poll_interval(Duration::from_secs(2)),
        Duration::from_secs(2)
    );
    for (params, message) in [
        (
            "{scheme: https}",
            "scheme 'https' is not supported by switchyard (metrics are scraped over plain HTTP)",
        ),
        (
            "{caCertPath: /ca.pem}",
            "caCertPath is not supported by switchyard",
        ),
        (
            "{scheme: ftp}",
            "scheme must be 'http' or 'https', got 'ftp'",
        ),
        (
            "{path: metrics}",
            "path must start with '/' and contain no spaces, got 'metrics'",
        ),
        ("{interval: soon}", "interval \"soon\": "),
    ] {
        let e = err(&format!(
            "plugins:\n- type: metrics-data-source\n  parameters: {params}\n"
        ));
        assert!(e.contains(message), "{params}: {e}");
    }
    assert_eq!(c.data_layer.extractor.default_engine, EngineType::Sglang);
    assert!(c.plugin("utilization-detector").is_none());
}

#[test]
fn unknown_plugin_type_names_type_and_line() {
    let e = err("plugins:\n- type: queue-scorer\n- type: fancy-scorer\n  name: x\n");
    assert!(
        e.contains("plugin type 'fancy-scorer' is not registered"),
        "{e}"
    );
    assert!(e.contains("line 5"), "{e}");
    let e = err("plugins:\n- type: latency-scorer\n");
    assert!(
        e.contains("'latency-scorer' is not supported by switchyard: needs upstream's latency-predictor sidecar"),
        "{e}"
    );
    assert!(e.contains("line 4"), "{e}");
    let e = err("plugins:\n- name: x\n");
    assert!(
        e.contains("missing field `type`") && e.contains("line 4"),
        "{e}"
    );
}

#[test]
fn bad_parameters_are_rejected_with_their_line() {
    let e = err("plugins:\n- type: prefix-cache-scorer\n  parameters:\n    blockSizeTokens: 16\n    lruCapacity: 5\n");
    assert!(
        e.contains("unknown field `lruCapacity`") && e.contains("line 7"),
        "{e}"
    );
    let e = err("plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSizeTokens: 0, autoTune: false}\n");
    assert!(
        e.contains("blockSizeTokens must be > 0 when autoTune is disabled, got 0"),
        "{e}"
    );
    // Value checks run once the entry is read, so they point at the entry's first line.
    assert!(e.contains("plugins[0]") && e.contains("line 4"), "{e}");
    let e = err("plugins:\n- type: prefix-cache-scorer\n  parameters: {lruCapacityPerServer: 0}\n");
    assert!(e.contains("lruCapacityPerServer must be > 0"), "{e}");
    let e = err("plugins:\n- type: queue-scorer\n  parameters: {threshold: 1}\n");
    assert!(e.contains("unknown field `threshold`"), "{e}");
    let e = err("plugins:\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: many}\n");
    assert!(
        e.contains("maxNumOfEndpoints") && e.contains("line 5"),
        "{e}"
    );
    let e =
        err("plugins:\n- type: utilization-detector\n  parameters: {kvCacheUtilThreshold: 1.5}\n");
    assert!(
        e.contains("kvCacheUtilThreshold must be in (0.0, 1.0], got 1.5"),
        "{e}"
    );
    // The other utilization-detector ranges (the only place they are validated).
    for (params, message) in [
        (
            "{queueDepthThreshold: 0}",
            "queueDepthThreshold must be strictly positive, got 0",
        ),
        (
            "{queueDepthThreshold: -3}",
            "queueDepthThreshold must be strictly positive, got -3",
        ),
        (
            "{kvCacheUtilThreshold: 0.0}",
            "kvCacheUtilThreshold must be in (0.0, 1.0], got 0",
        ),
        (
            "{metricsStalenessThreshold: 0s}",
            "metricsStalenessThreshold must be strictly positive, got 0s",
        ),
        (
            "{metricsStalenessThreshold: soon}",
            "metricsStalenessThreshold: ",
        ),
        (
            "{headroom: -0.1}",
            "headroom must be a non-negative value, got -0.1",
        ),
    ] {
        let e = err(&format!(
            "plugins:\n- type: utilization-detector\n  parameters: {params}\n"
        ));
        assert!(e.contains(message), "{params}: {e}");
    }
    let e = err("plugins:\n- type: core-metrics-extractor\n  parameters: {defaultEngine: tgi}\n");
    assert!(e.contains("unknown engine type \"tgi\""), "{e}");
}

#[test]
fn bad_weights_and_keys_are_rejected() {
    let e = err("plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n    weight: -2\n");
    assert!(
        e.contains("weight must be a finite number >= 0, got -2"),
        "{e}"
    );
    assert!(
        e.contains("schedulingProfiles[0].plugins[0]") && e.contains("line 8"),
        "{e}"
    );
    let e = err("plugins: []\nschedulingProfile: []\n");
    assert!(
        e.contains("unknown field `schedulingProfile`") && e.contains("line 4"),
        "{e}"
    );
    let e = err("plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n    wieght: 2\n");
    assert!(
        e.contains("unknown field `wieght`") && e.contains("line 9"),
        "{e}"
    );
}

#[test]
fn cross_reference_errors_are_located() {
    let e = err("plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n  - pluginRef: kv-scorer\n");
    assert_eq!(
        e,
        "invalid EndpointPickerConfig: schedulingProfiles[default] references undefined plugin 'kv-scorer' at line 9"
    );
    let e = err("plugins:\n- type: queue-scorer\n- type: queue-scorer\n");
    assert!(e.contains("duplicate plugin name 'queue-scorer'"), "{e}");
    let e = err("plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins: [{pluginRef: queue-scorer}]\n- name: b\n  plugins: [{pluginRef: queue-scorer}]\n");
    assert!(e.contains("no profile handler configured"), "{e}");
    let e = err(
        "plugins:\n- type: single-profile-handler\nschedulingProfiles:\n- name: a\n- name: b\n",
    );
    assert!(
        e.contains("SingleProfileHandler cannot support multiple scheduling profiles at line 7"),
        "{e}"
    );
    let e = err("plugins:\n- type: queue-scorer\nsaturationDetector: {pluginRef: queue-scorer}\n");
    assert!(
        e.contains("is a 'queue-scorer', not a saturation detector"),
        "{e}"
    );
    let e = err("plugins:\n- type: prefix-cache-scorer\n- type: prefix-cache-scorer\n  name: p2\n  parameters: {blockSizeTokens: 8}\n");
    assert!(e.contains("have different parameters"), "{e}");
}

#[test]
fn header_is_checked() {
    let e = parse_config("kind: EndpointPickerConfig\nplugins: []\n")
        .unwrap_err()
        .to_string();
    assert_eq!(e, "invalid EndpointPickerConfig: apiVersion is missing");
    let e = parse_config("apiVersion: v1\nkind: EndpointPickerConfig\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("apiVersion must be") && e.contains("line 1"),
        "{e}"
    );
    let e = err("featureGates: [warpDrive]\n");
    assert!(
        e.contains("feature gate 'warpDrive' is unknown or unregistered at line 3"),
        "{e}"
    );
    let e = parse_config("plugins: [\n").unwrap_err().to_string();
    assert!(
        e.starts_with("invalid EndpointPickerConfig: ") && e.contains("line"),
        "{e}"
    );
}

/// The work-aware plugins (issue 10): parameters decode, defaults apply, and each becomes its
/// instance in the profile slot its role gives it.
#[test]
fn work_aware_plugins_decode_and_take_their_slots() {
    let c = cfg("plugins:\n- type: scrape-freshness-filter\n  parameters: {metricsStalenessThreshold: 2s}\n- type: predicted-ttft-scorer\n  parameters: {initialPrefillTokensPerSecond: 5000, requestOverheadTokens: 8, loadBoundFactor: 1.5}\n- type: prefix-cache-scorer\n").unwrap();
    assert_eq!(
        c.plugin("scrape-freshness-filter").unwrap().kind,
        PluginKind::ScrapeFreshnessFilter(Duration::from_secs(2))
    );
    assert!(matches!(
        c.plugin("predicted-ttft-scorer").unwrap().kind,
        PluginKind::PredictedTtftScorer(p)
            if p.initial_prefill_tokens_per_s == 5000.0 && p.request_overhead_tokens == 8
                && p.load_bound_factor == Some(1.5)
    ));
    assert_eq!(
        profiles(&c),
        vec![ProfileSpec {
            name: "default".into(),
            filters: vec!["scrape-freshness-filter".into()],
            scorers: vec![
                ("predicted-ttft-scorer".into(), 1.0),
                ("prefix-cache-scorer".into(), 1.0)
            ],
            picker: "max-score-picker".into(),
        }]
    );
    let d = cfg("plugins:\n- type: scrape-freshness-filter\n").unwrap();
    assert_eq!(
        d.plugin("scrape-freshness-filter").unwrap().kind,
        PluginKind::ScrapeFreshnessFilter(Duration::from_secs(1))
    );
    let e = err("plugins:\n- type: predicted-ttft-scorer\n  parameters: {initialPrefillTokensPerSecond: 0}\n");
    assert!(
        e.contains("initialPrefillTokensPerSecond must be a finite number > 0, got 0"),
        "{e}"
    );
    let e = err("plugins:\n- type: scrape-freshness-filter\n  parameters: {metricsStalenessThreshold: 0s}\n");
    assert!(e.contains("metricsStalenessThreshold must be > 0"), "{e}");
    let e =
        err("plugins:\n- type: predicted-ttft-scorer\n  parameters: {requestOverheadTokens: -1}\n");
    assert!(
        e.contains("requestOverheadTokens must be >= 0, got -1"),
        "{e}"
    );
    let e = err("plugins:\n- type: predicted-ttft-scorer\n  parameters: {loadBoundFactor: 0.9}\n");
    assert!(
        e.contains("loadBoundFactor must be a finite number >= 1, got 0.9"),
        "{e}"
    );
}

/// The `flowControl` section (llm-d-router `FlowControlConfig`): off without the gate, the
/// reference's defaults when on, every field decoded, errors located.
#[test]
fn flow_control_section_and_gate() {
    use crate::epp::flowcontrol::{BandConfig, Fairness, FlowControlConfig};
    // Without the gate the section is checked but nothing is enabled.
    let c = cfg("flowControl:\n  maxRequests: 10\n").unwrap();
    assert_eq!(c.flow_control, None);
    assert_eq!(
        cfg("featureGates: [\"flowControl=false\"]\n")
            .unwrap()
            .flow_control,
        None
    );
    // The gate alone: reference defaults (60 s TTL, 5000 requests / 1 GB per band, no global
    // limit, global-strict fairness).
    let c = cfg("featureGates: [flowControl]\n").unwrap();
    assert_eq!(c.flow_control, Some(FlowControlConfig::default()));
    assert_eq!(c.feature_gates, vec!["flowControl".to_string()]);

    let c = cfg(r#"featureGates: ["flowControl=true"]
plugins:
- name: fair
  type: round-robin-fairness-policy
- name: sat
  type: utilization-detector
  parameters: {queueDepthThreshold: 3}
flowControl:
  maxBytes: 1Gi
  maxRequests: "2k"
  defaultRequestTTL: 30s
  noEndpointRequestTTL: 2m
  defaultPriorityBand: {maxRequests: 100, fairnessPolicyRef: fair}
  defaultNegativePriorityBand: {maxRequests: 10, maxBytes: 1M}
  priorityBands:
  - priority: 2
    maxBytes: "0"
    fairnessPolicyRef: global-strict-fairness-policy
    orderingPolicyRef: fcfs-ordering-policy
  saturationDetector: {pluginRef: sat}
"#)
    .unwrap();
    let fair = BandConfig {
        max_requests: 100,
        fairness: Fairness::RoundRobin,
        ..BandConfig::default()
    };
    let mut want = FlowControlConfig {
        max_bytes: Some(1 << 30),
        max_requests: Some(2000),
        default_request_ttl: Some(Duration::from_secs(30)),
        no_endpoint_request_ttl: Some(Duration::from_secs(120)),
        default_band: fair,
        default_negative_band: Some(BandConfig {
            max_requests: 10,
            max_bytes: 1_000_000,
            fairness: Fairness::GlobalStrict,
        }),
        ..FlowControlConfig::default()
    };
    want.bands.insert(2, BandConfig::default());
    assert_eq!(c.flow_control, Some(want));
    // flowControl.saturationDetector picks the detector (llm-d-router's newer place for it).
    assert_eq!(c.saturation_detector, "sat");
    assert!(matches!(
        c.saturation,
        DetectorConfig::Utilization(SaturationConfig {
            queue_depth_threshold: 3,
            ..
        })
    ));

    // 0s turns the TTL off; the no-endpoint budget follows the default one.
    let c = cfg("featureGates: [flowControl]\nflowControl: {defaultRequestTTL: 0s}\n").unwrap();
    let fc = c.flow_control.unwrap();
    assert_eq!(
        (fc.default_request_ttl, fc.no_endpoint_request_ttl),
        (None, None)
    );

    let cases = [
        ("featureGates: [flowControl]\nflowControl:\n  maxRequests: -3\n", "must be non-negative, got \"-3\" at line 5"),
        ("featureGates: [flowControl]\nflowControl:\n  maxBytes: 1Zi\n", "invalid quantity \"1Zi\" at line 5"),
        ("featureGates: [flowControl]\nflowControl:\n  defaultRequestTTL: soon\n", "at line 5"),
        ("featureGates: [flowControl]\nflowControl:\n  maxRequest: 3\n", "unknown field `maxRequest`"),
        ("featureGates: [flowControl]\nflowControl:\n  priorityBands:\n  - maxRequests: 3\n", "flowControl.priorityBands[0] is missing 'priority'"),
        ("featureGates: [flowControl]\nflowControl:\n  priorityBands:\n  - priority: 1\n  - priority: 1\n", "flowControl.priorityBands has two bands with priority 1 at line 6"),
        ("featureGates: [flowControl]\nflowControl:\n  defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy}\n", "flowControl references undefined plugin 'round-robin-fairness-policy' at line 5"),
        ("featureGates: [flowControl]\nplugins:\n- type: queue-scorer\nflowControl:\n  defaultPriorityBand: {fairnessPolicyRef: queue-scorer}\n", "flowControl references 'queue-scorer', a 'queue-scorer', not a fairness policy at line 7"),
        ("featureGates: [flowControl]\nflowControl:\n  enableEviction: true\n", "flowControl.enableEviction is not supported by switchyard at line 5"),
        ("featureGates: [flowControl]\nflowControl:\n  usageLimitPolicyPluginRef: holdback\n", "flowControl references undefined plugin 'holdback' at line 5"),
        ("featureGates: [flowControl]\nplugins:\n- type: queue-scorer\nflowControl:\n  usageLimitPolicyPluginRef: queue-scorer\n", "flowControl references 'queue-scorer', a 'queue-scorer', not a usage limit policy at line 7"),
        ("featureGates: [flowControl]\nplugins:\n- type: priority-holdback-policy\n", "minCeiling is required"),
        ("featureGates: [flowControl]\nplugins:\n- type: priority-holdback-policy\n  parameters: {minCeiling: 1.0}\n", "minCeiling must be in [0.0, 1.0), got 1"),
        ("featureGates: [flowControl]\nplugins:\n- type: priority-holdback-policy\n  parameters: {minCeiling: 0.8, maxCeiling: 0.5}\n", "minCeiling (0.8) must not be above maxCeiling (0.5)"),
        ("featureGates: [flowControl]\nplugins:\n- type: priority-holdback-policy\n  parameters: {minCeiling: 0.5, domain: log}\n", "domain must be \"rank\" or \"value\", got \"log\""),
        ("plugins:\n- type: concurrency-detector\n  parameters: {maxConcurrency: 0}\n", "maxConcurrency must be > 0, got 0"),
        ("plugins:\n- type: concurrency-detector\n  parameters: {decodeSafety: {queueDepthThreshold: 0}}\n", "decodeSafety.queueDepthThreshold must be strictly positive, got 0"),
        ("plugins:\n- type: concurrency-detector\n  parameters: {concurrencyMode: tokens}\n", "concurrencyMode \"tokens\" is not supported by switchyard (only \"requests\")"),
        ("featureGates: [\"flowControl=maybe\"]\n", "feature gate 'flowControl=maybe' has an invalid value (expected true or false) at line 3"),
    ];
    for (body, want) in cases {
        let e = err(body);
        assert!(e.contains(want), "{body:?}: {e}");
    }
}

#[test]
fn priority_holdback_and_concurrency_detector_resolve() {
    use crate::epp::flowcontrol::usage::{HoldbackDomain, HoldbackParams, UsageLimit};
    use crate::epp::saturation::ConcurrencyConfig;
    let c = cfg(r#"
featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters:
    maxConcurrency: 16
    headroom: 0.25
    concurrencyMode: requests
    decodeSafety: {queueDepthThreshold: 1}
- type: priority-holdback-policy
  name: holdback
  parameters: {domain: value, minCeiling: 0.5, maxCeiling: 0.9}
flowControl:
  usageLimitPolicyPluginRef: holdback
  saturationDetector: {pluginRef: concurrency-detector}
"#)
    .unwrap();
    assert_eq!(c.saturation_detector, "concurrency-detector");
    assert_eq!(
        c.saturation,
        DetectorConfig::Concurrency(ConcurrencyConfig {
            max_concurrency: 16,
            headroom: 0.25,
            decode_safety: Some(SaturationConfig {
                queue_depth_threshold: 1,
                ..SaturationConfig::default()
            }),
        })
    );
    assert_eq!(
        c.flow_control.unwrap().usage_limit,
        UsageLimit::PriorityHoldback(HoldbackParams {
            domain: HoldbackDomain::Value,
            min_ceiling: 0.5,
            max_ceiling: 0.9,
        })
    );
    // The static policy by name, and defaults: rank domain, maxCeiling 1.0, 100 requests.
    let c = cfg("featureGates: [flowControl]\nflowControl: {usageLimitPolicyPluginRef: static-usage-limit-policy}\n").unwrap();
    assert_eq!(c.flow_control.unwrap().usage_limit, UsageLimit::Static);
    let c = cfg("featureGates: [flowControl]\nplugins:\n- type: priority-holdback-policy\n  parameters: {minCeiling: 0.25}\n- type: concurrency-detector\nsaturationDetector: {pluginRef: concurrency-detector}\nflowControl: {usageLimitPolicyPluginRef: priority-holdback-policy}\n").unwrap();
    assert_eq!(
        c.flow_control.unwrap().usage_limit,
        UsageLimit::PriorityHoldback(HoldbackParams {
            domain: HoldbackDomain::Rank,
            min_ceiling: 0.25,
            max_ceiling: 1.0,
        })
    );
    assert_eq!(
        c.saturation,
        DetectorConfig::Concurrency(ConcurrencyConfig::default())
    );
}
