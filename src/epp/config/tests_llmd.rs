//! llm-d-router v0.10 configurations: its apiVersion, default, plugin types and parameters,
//! and the types it registers that Switchyard refuses (with the reason).

use std::time::Duration;

use super::plugins::PluginKind;
use super::*;
use crate::epp::scheduling::plugins::load::ActiveRequestParams;
use crate::epp::scheduling::plugins::session_affinity::Strategy;

const HEAD: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n";

fn cfg(body: &str) -> Result<EppConfig, ConfigError> {
    parse_config(&format!("{HEAD}{body}"))
}

fn err(body: &str) -> String {
    match cfg(body) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn kind(body: &str, name: &str) -> PluginKind {
    cfg(body).unwrap().plugin(name).unwrap().kind.clone()
}

#[test]
fn both_api_versions_decode_the_same() {
    let gie = REFERENCE_DEFAULT_CONFIG;
    let llmd = gie.replace("inference.networking.x-k8s.io/v1alpha1", LLMD_API_VERSION);
    let a = parse_config(gie).unwrap();
    let b = parse_config(&llmd).unwrap();
    let names =
        |c: &EppConfig| -> Vec<String> { c.plugins.iter().map(|p| p.name.clone()).collect() };
    assert_eq!(names(&a), names(&b));
    let e = parse_config("apiVersion: llm-d.ai/v1beta1\nkind: EndpointPickerConfig\n")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "invalid EndpointPickerConfig: apiVersion must be 'llm-d.ai/v1alpha1' or \
         'inference.networking.x-k8s.io/v1alpha1', got 'llm-d.ai/v1beta1' at line 1"
    );
    // Strict decoding applies to the new apiVersion too, with the line.
    assert_eq!(
        err("plugins:\n- type: queue-scorer\n  weight: 2\n"),
        "invalid EndpointPickerConfig: plugins[0]: unknown field `weight`, expected one of `name`, `type`, `parameters` at line 4 column 3"
    );
}

#[test]
fn llmd_default_is_upstreams() {
    let c = parse_config(LLMD_DEFAULT_CONFIG).unwrap();
    let p = &c.scheduling.profiles[0];
    let scorers: Vec<(&str, f64)> = p.scorers.iter().map(|(s, w)| (s.name(), *w)).collect();
    assert_eq!(
        scorers,
        vec![
            ("queue-scorer", 2.0),
            ("kv-cache-utilization-scorer", 2.0),
            ("prefix-cache-scorer", 3.0)
        ]
    );
    assert_eq!(p.picker.name(), "max-score-picker");
    assert_eq!(c.data_layer, crate::epp::scrape::DataLayerConfig::default());
    // The example file is the same set.
    let file = parse_config(include_str!("../../../docs/examples/llm-d-default.yaml")).unwrap();
    let names =
        |c: &EppConfig| -> Vec<String> { c.plugins.iter().map(|p| p.name.clone()).collect() };
    assert_eq!(names(&file), names(&c));
}

#[test]
fn session_affinity_parameters() {
    assert_eq!(
        kind(
            "plugins:\n- type: session-affinity-scorer\n",
            "session-affinity-scorer"
        ),
        PluginKind::SessionAffinityScorer(Strategy::EncodedEndpointHeader {
            header: "x-session-token".into()
        })
    );
    assert_eq!(
        kind(
            "plugins:\n- type: session-affinity-filter\n  parameters:\n    encodedEndpointHeaderConfig: {header: X-My-Token}\n",
            "session-affinity-filter"
        ),
        PluginKind::SessionAffinityFilter(Strategy::EncodedEndpointHeader {
            header: "x-my-token".into()
        })
    );
    assert_eq!(
        kind(
            "plugins:\n- type: session-affinity-scorer\n  parameters:\n    strategy: session_id\n    sessionIdConfig:\n      sources: [{header: x-chat}, {header: x-session-id}]\n      evictionTtlSeconds: 60\n",
            "session-affinity-scorer"
        ),
        PluginKind::SessionAffinityScorer(Strategy::SessionId {
            headers: vec!["x-chat".into(), "x-session-id".into()],
            ttl: Duration::from_secs(60),
            sweep: Duration::from_secs(10),
        })
    );
    for (params, message) in [
        (
            "{strategy: sticky}",
            "strategy must be \"encoded_endpoint_header\" or \"session_id\", got \"sticky\"",
        ),
        (
            "{profileName: prefill}",
            "profileName \"prefill\": per-profile session affinity is for P/D disaggregation, which switchyard does not implement",
        ),
        (
            "{strategy: session_id, sessionIdConfig: {sources: [{attribute: agent-identity}]}}",
            "sessionIdConfig.sources[0]: attribute/producer \"agent-identity\" is not supported by switchyard (request attributes are not modelled); use header",
        ),
        (
            "{strategy: session_id, sessionIdConfig: {sources: [{}]}}",
            "sessionIdConfig.sources[0]: exactly one of header or attribute must be set",
        ),
        (
            "{strategy: session_id, sessionIdConfig: {evictionTtlSeconds: -1}}",
            "sessionIdConfig.evictionTtlSeconds must be > 0, got -1",
        ),
        (
            "{encodedEndpointHeaderConfig: {name: x}}",
            "unknown field `name`, expected `header`",
        ),
    ] {
        let e = err(&format!(
            "plugins:\n- type: session-affinity-scorer\n  parameters: {params}\n"
        ));
        assert!(e.contains(message), "{params}: {e}");
        assert!(e.contains("line 4") || e.contains("line 5"), "{params}: {e}");
    }
}

#[test]
fn load_scorer_parameters_follow_upstream_defaults() {
    assert_eq!(
        kind("plugins:\n- type: active-request-scorer\n  parameters: {idleThreshold: 2, maxBusyScore: 0.5, requestTimeout: 2m}\n", "active-request-scorer"),
        PluginKind::ActiveRequestScorer(ActiveRequestParams { idle_threshold: 2, max_busy_score: 0.5 })
    );
    // Out-of-range values fall back to the defaults, as upstream does.
    assert_eq!(
        kind("plugins:\n- type: active-request-scorer\n  parameters: {idleThreshold: -1, maxBusyScore: 3}\n", "active-request-scorer"),
        PluginKind::ActiveRequestScorer(ActiveRequestParams::default())
    );
    assert_eq!(
        kind("plugins:\n- type: token-load-scorer\n", "token-load-scorer"),
        PluginKind::TokenLoadScorer(4_194_304)
    );
    assert_eq!(
        kind(
            "plugins:\n- type: token-load-scorer\n  parameters: {queueThresholdTokens: 1000}\n",
            "token-load-scorer"
        ),
        PluginKind::TokenLoadScorer(1000)
    );
    assert_eq!(
        kind(
            "plugins:\n- type: load-aware-scorer\n  parameters: {threshold: 0}\n",
            "load-aware-scorer"
        ),
        PluginKind::LoadAwareScorer(128)
    );
    assert_eq!(
        kind(
            "plugins:\n- type: inflight-load-producer\n",
            "inflight-load-producer"
        ),
        PluginKind::InflightLoadProducer
    );
    assert!(err("plugins:\n- type: inflight-load-producer\n  parameters: {addEstimatedOutputTokens: true}\n")
        .contains("addEstimatedOutputTokens is not supported by switchyard"));
}

#[test]
fn upstream_types_switchyard_lacks_are_rejected_with_a_reason() {
    for (t, reason) in [
        ("decode-filter", upstream::PD),
        ("prefill-filter", upstream::PD),
        ("pd-profile-handler", upstream::PD),
        ("disagg-profile-handler", upstream::PD),
        ("precise-prefix-cache-producer", upstream::PRECISE_PREFIX),
        ("no-hit-lru-scorer", upstream::NOT_BUILT),
        ("session-id-producer", upstream::ATTRIBUTES),
        ("vllmgrpc-parser", upstream::PARSER),
    ] {
        assert_eq!(
            err(&format!("plugins:\n- type: {t}\n")),
            format!("invalid EndpointPickerConfig: plugins[0]: plugin type '{t}' is not supported by switchyard: {reason} at line 4 column 3")
        );
    }
    assert_eq!(
        err("plugins:\n- type: fancy-scorer\n"),
        "invalid EndpointPickerConfig: plugins[0]: plugin type 'fancy-scorer' is not registered at line 4 column 3"
    );
    // Every rejected name is really unregistered here (no type is both).
    for (t, _) in upstream::UNSUPPORTED {
        assert!(plugins::check_type(t).is_err(), "{t}");
    }
}

#[test]
fn llmd_sections_request_handler_flow_control_data_layer() {
    // requestHandler.parsers takes over from the deprecated parser.
    cfg("requestHandler:\n  parsers:\n  - pluginRef: openai-parser\n").unwrap();
    assert_eq!(
        err("plugins:\n- type: queue-scorer\nrequestHandler:\n  parsers:\n  - pluginRef: queue-scorer\n"),
        "invalid EndpointPickerConfig: parser 'queue-scorer' is not a parser plugin at line 7"
    );
    // flowControl.saturationDetector is honoured; the rest is ignored with a warning.
    let c = cfg("plugins:\n- type: utilization-detector\n  name: sd\n  parameters: {queueDepthThreshold: 7}\nflowControl:\n  maxRequests: 100\n  saturationDetector:\n    pluginRef: sd\n").unwrap();
    assert_eq!(c.saturation_detector, "sd");
    assert!(matches!(
        c.saturation,
        crate::epp::saturation::DetectorConfig::Utilization(
            crate::epp::saturation::SaturationConfig {
                queue_depth_threshold: 7,
                ..
            }
        )
    ));
    for (key, yaml) in [
        (
            "discovery",
            "dataLayer:\n  discovery:\n    pluginRef: file-discovery\n",
        ),
        (
            "peerDiscovery",
            "dataLayer:\n  peerDiscovery:\n    pluginRef: x\n",
        ),
        ("injectDefaults", "dataLayer:\n  injectDefaults: false\n"),
    ] {
        assert_eq!(
            err(yaml),
            format!("invalid EndpointPickerConfig: dataLayer.{key} is not supported by switchyard (endpoints come from the InferencePool or --endpoints; metrics are always scraped from every endpoint) at line 4")
        );
    }
    cfg("dataLayer:\n  injectDefaults: true\n").unwrap();
}

#[test]
fn conformance_plugins_resolve() {
    let c = cfg("plugins:\n- type: header-based-testing-filter\n- type: destination-endpoint-served-verifier\nschedulingProfiles:\n- name: conformance-profile\n  plugins:\n  - pluginRef: header-based-testing-filter\n").unwrap();
    assert!(c.served_verifier);
    assert_eq!(
        c.scheduling.profiles[0].filters[0].name(),
        "header-based-testing-filter"
    );
    assert!(!parse_config(LLMD_DEFAULT_CONFIG).unwrap().served_verifier);
}

#[test]
fn prefix_cache_affinity_filter_parameters() {
    use crate::epp::scheduling::plugins::prefix_affinity::PrefixAffinityParams;
    let c = cfg("plugins:\n- type: prefix-cache-affinity-filter\n  name: pa\n  parameters: {affinityThreshold: 0.9, explorationProbability: 0.01, maxTTFTPenaltyMs: 5000, ttftSource: prefillThroughput}\n- type: weighted-random-picker\n").unwrap();
    assert_eq!(
        c.plugin("pa").unwrap().kind,
        PluginKind::PrefixCacheAffinityFilter(PrefixAffinityParams {
            affinity_threshold: 0.9,
            exploration_probability: 0.01,
            max_ttft_penalty_ms: 5000.0,
            peak_prefill_throughput: 15928.0,
        })
    );
    // It brings the approximate prefix index with it.
    assert!(c.scheduling.prefix_cache.is_some());
    assert_eq!(c.scheduling.profiles[0].filters[0].name(), "pa");
    for (params, message) in [
        (
            "{ttftSource: latencyPredictor}",
            "ttftSource \"latencyPredictor\" is not supported by switchyard",
        ),
        (
            "{affinityThreshold: 1.5}",
            "affinityThreshold must be <= 1.0, got 1.5",
        ),
        (
            "{explorationProbability: -0.1}",
            "explorationProbability must be in [0, 1], got -0.1",
        ),
        (
            "{peakPrefillThroughput: 0}",
            "peakPrefillThroughput must be > 0 when ttftSource is prefillThroughput",
        ),
        ("{maxTtftPenaltyMs: 1}", "unknown field `maxTtftPenaltyMs`"),
    ] {
        let e = err(&format!(
            "plugins:\n- type: prefix-cache-affinity-filter\n  parameters: {params}\n"
        ));
        assert!(e.contains(message), "{params}: {e}");
    }
}

#[test]
fn precise_scorer_speculative_indexing() {
    let body = |params: &str| {
        format!(
            "plugins:\n- type: precise-prefix-cache-scorer\n  parameters:\n{params}\
             schedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: precise-prefix-cache-scorer\n"
        )
    };
    let spec = |params: &str| {
        let c = cfg(&body(params)).unwrap();
        let p = c.plugin("precise-prefix-cache-scorer").unwrap();
        let PluginKind::PrecisePrefixCacheScorer(h) = &p.kind else {
            panic!("{:?}", p.kind)
        };
        // On, the scorer is also the hook that credits the primary after the decision.
        assert_eq!(h.0.params.speculative_ttl.is_some(), p.hook.is_some());
        h.0.params.speculative_ttl
    };
    assert_eq!(spec("    speculativeIndexing: false\n"), None);
    assert_eq!(
        spec("    speculativeIndexing: true\n"),
        Some(Duration::from_secs(2))
    );
    assert_eq!(
        spec("    speculativeIndexing: true\n    speculativeTTL: 30s\n"),
        Some(Duration::from_secs(30))
    );
    let e = err(&body(
        "    speculativeIndexing: true\n    speculativeTTL: soon\n",
    ));
    assert_eq!(
        e,
        "invalid EndpointPickerConfig: plugins[0]: speculativeTTL: invalid duration \"soon\" at line 4 column 3"
    );
}
