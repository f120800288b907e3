//! Scheduler tests: the REFERENCE.md §2 worked example, prefix affinity, tie spreading,
//! fallbacks, failures and metrics.

use std::collections::HashMap;

use super::plugins::Plugin;
use super::*;
use crate::epp::config::{parse_config, REFERENCE_DEFAULT_CONFIG};
use crate::epp::endpoint::{Endpoint, EndpointMetrics, LoraInfo};

fn ep(i: u8, metrics: EndpointMetrics) -> Arc<EndpointSnapshot> {
    let addr = format!("192.168.1.{i}:8000").parse().unwrap();
    Arc::new(EndpointSnapshot {
        endpoint: Arc::new(Endpoint::from_addr(addr)),
        metrics,
        dispatch: None,
    })
}

fn m(queue: u32, kv: f64) -> EndpointMetrics {
    EndpointMetrics {
        waiting_queue_size: queue,
        kv_cache_usage: kv,
        ..Default::default()
    }
}

fn req(prompt: &[u8]) -> SchedulingRequest<'_> {
    SchedulingRequest {
        request_id: "test-request-id",
        target_model: "sql-lora-1fdg2",
        api: Default::default(),
        prompt,
        cache_salt: b"",
        fallbacks: 0,
        headers: &[],
    }
}

fn scheduler(yaml: &str) -> (Scheduler, Registry) {
    let mut registry = Registry::default();
    let s = Scheduler::new(&parse_config(yaml).unwrap().scheduling, &mut registry);
    (s, registry)
}

/// Schedules and then records the decision, as the director does.
fn route(
    s: &Scheduler,
    r: &SchedulingRequest<'_>,
    pods: &[Arc<EndpointSnapshot>],
) -> Result<ScheduleResult, ScheduleError> {
    let out = s.schedule(r, pods)?;
    if let Some(p) = s.prefix_cache() {
        p.record(&out);
    }
    Ok(out)
}

fn names(r: &ScheduleResult) -> Vec<String> {
    r.endpoints
        .iter()
        .map(|e| e.endpoint.name.clone())
        .collect()
}

const QUEUE_KV_LORA: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: lora-affinity-scorer
";

/// REFERENCE.md §2: all weights 1, no prefix hits → 2.2 / 1.15 / 0.1, P0 wins.
#[test]
fn reference_worked_example() {
    let (s, _) = scheduler(QUEUE_KV_LORA);
    let mut p0 = m(6, 0.2);
    p0.lora = Some(LoraInfo {
        max_lora: 2,
        running: vec!["sql-lora-1fdg2".into()],
        waiting: vec![],
    });
    let pods = [ep(1, p0), ep(2, m(0, 0.85)), ep(3, m(10, 0.9))];
    let mut r = req(b"hello");
    r.fallbacks = 2;
    let out = route(&s, &r, &pods).unwrap();
    assert_eq!(
        names(&out),
        ["192.168.1.1:8000", "192.168.1.2:8000", "192.168.1.3:8000"]
    );
    let expected = [2.2, 1.15, 0.1];
    for (got, want) in out.scores.iter().zip(expected) {
        assert!((got - want).abs() < 1e-9, "{:?}", out.scores);
    }
    assert_eq!(out.profile, "default");
    assert_eq!(out.prefix_total_blocks, 0);
}

/// REFERENCE.md §5 "lower queue and kv wins" with the default config.
#[test]
fn default_config_prefers_lower_queue_and_kv() {
    let (s, _) = scheduler(REFERENCE_DEFAULT_CONFIG);
    let pods = [ep(1, m(3, 0.2)), ep(2, m(0, 0.1)), ep(3, m(10, 0.2))];
    let out = route(&s, &req(b"test"), &pods).unwrap();
    assert_eq!(names(&out), ["192.168.1.2:8000"]);
}

#[test]
fn shared_prefix_sticks_to_the_first_choice() {
    let (s, _) = scheduler(REFERENCE_DEFAULT_CONFIG);
    let pods = [ep(1, m(0, 0.0)), ep(2, m(0, 0.0)), ep(3, m(0, 0.0))];
    let prompt = "You are a helpful assistant. ".repeat(40); // 1160 bytes → 18 blocks of 64
    let first = route(&s, &req(prompt.as_bytes()), &pods).unwrap();
    assert_eq!(first.prefix_total_blocks, 18);
    assert_eq!(first.prefix_matched_blocks, 0);
    let chosen = first.endpoints[0].endpoint.name.clone();
    let longer = format!("{prompt}And now a new question?");
    for _ in 0..20 {
        let out = route(&s, &req(longer.as_bytes()), &pods).unwrap();
        assert_eq!(out.endpoints[0].endpoint.name, chosen);
        assert_eq!(out.prefix_matched_blocks, 18);
    }
    let view = s.prefix_match(&req(prompt.as_bytes()), &pods);
    let want: Vec<usize> = pods
        .iter()
        .map(|p| if p.endpoint.name == chosen { 18 } else { 0 })
        .collect();
    assert_eq!(view, want);
    // A different model does not share the prefix.
    let mut other = req(prompt.as_bytes());
    other.target_model = "other-model";
    assert_eq!(s.prefix_match(&other, &pods), vec![0, 0, 0]);
    // Once the endpoint leaves, its entries are gone.
    s.remove_endpoint(&chosen);
    assert_eq!(
        s.prefix_match(&req(prompt.as_bytes()), &pods),
        vec![0, 0, 0]
    );
    assert_eq!(s.prefix_index().unwrap().len(), 0);
}

/// Deciding does not learn: only `PrefixCache::record` changes what later requests see.
#[test]
fn scheduling_alone_leaves_the_prefix_index_untouched() {
    let (s, registry) = scheduler(REFERENCE_DEFAULT_CONFIG);
    let pods = [ep(1, m(0, 0.0)), ep(2, m(0, 0.0))];
    let prompt = "z".repeat(64 * 3);
    let out = s.schedule(&req(prompt.as_bytes()), &pods).unwrap();
    assert_eq!(out.prefix_total_blocks, 3);
    assert_eq!(out.prefix_hashes.len(), 3);
    assert_eq!(out.prefix_block_tokens, 16);
    assert_eq!(s.prefix_index().unwrap().len(), 0);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("inference_extension_prefix_indexer_hit_ratio_count 0"),
        "{text}"
    );
    s.prefix_cache().unwrap().record(&out);
    assert_eq!(s.prefix_index().unwrap().len(), 3);
    let again = s.schedule(&req(prompt.as_bytes()), &pods).unwrap();
    assert_eq!(
        again.endpoints[0].endpoint.name,
        out.endpoints[0].endpoint.name
    );
    assert_eq!(again.prefix_matched_blocks, 3);
}

#[test]
fn load_outweighs_a_partial_prefix_hit() {
    let (s, _) = scheduler(REFERENCE_DEFAULT_CONFIG);
    let prompt = "x".repeat(64 * 4);
    let pods = [ep(1, m(0, 0.0)), ep(2, m(0, 0.0))];
    let first = route(&s, &req(prompt.as_bytes()), &pods).unwrap();
    let hot = first.endpoints[0].endpoint.name.clone();
    // The prefix holder becomes the busiest and fullest: 3×1 < 2×1 + 2×1.
    let loaded: Vec<_> = (1..=2u8)
        .map(|i| {
            let name = format!("192.168.1.{i}:8000");
            ep(i, if name == hot { m(10, 1.0) } else { m(0, 0.0) })
        })
        .collect();
    let out = route(&s, &req(prompt.as_bytes()), &loaded).unwrap();
    assert_ne!(out.endpoints[0].endpoint.name, hot);
    assert!((out.scores[0] - 4.0).abs() < 1e-9, "{:?}", out.scores);
}

#[test]
fn equal_scores_are_spread_across_endpoints() {
    let (s, _) = scheduler(QUEUE_KV_LORA);
    let pods: Vec<_> = (1..=3).map(|i| ep(i, m(2, 0.5))).collect();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..3000 {
        let out = route(&s, &req(b""), &pods).unwrap();
        *counts
            .entry(out.endpoints[0].endpoint.name.clone())
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 3);
    for (name, n) in counts {
        // Expected 1000 each; a generous bound (about 8 sigma).
        assert!((800..=1200).contains(&n), "{name}: {n}");
    }
}

#[test]
fn fallbacks_are_distinct_in_descending_score_order() {
    let (s, _) = scheduler(QUEUE_KV_LORA);
    let pods = [
        ep(1, m(5, 0.5)),
        ep(2, m(0, 0.0)),
        ep(3, m(10, 0.9)),
        ep(4, m(1, 0.1)),
    ];
    let mut r = req(b"");
    r.fallbacks = 2;
    let out = route(&s, &r, &pods).unwrap();
    assert_eq!(
        names(&out),
        ["192.168.1.2:8000", "192.168.1.4:8000", "192.168.1.1:8000"]
    );
    r.fallbacks = 10;
    let out = route(&s, &r, &pods).unwrap();
    assert_eq!(out.endpoints.len(), 4);
    assert!(
        out.scores.windows(2).all(|w| w[0] >= w[1]),
        "{:?}",
        out.scores
    );
}

#[test]
fn picker_max_endpoints_is_honoured() {
    let (s, _) = scheduler(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 2}
",
    );
    let pods = [ep(1, m(5, 0.0)), ep(2, m(0, 0.0)), ep(3, m(10, 0.0))];
    let out = route(&s, &req(b""), &pods).unwrap();
    assert_eq!(names(&out), ["192.168.1.2:8000", "192.168.1.1:8000"]);
}

#[derive(Debug)]
struct DropAll;

impl Plugin for DropAll {
    fn plugin_type(&self) -> &'static str {
        "drop-all-filter"
    }
    fn name(&self) -> &str {
        "drop-all"
    }
}

impl Filter for DropAll {
    fn filter(&self, _: &SchedulingRequest<'_>, endpoints: &mut Vec<Arc<EndpointSnapshot>>) {
        endpoints.clear();
    }
}

#[test]
fn no_endpoints_or_empty_filter_fails_the_profile() {
    let (s, _) = scheduler(REFERENCE_DEFAULT_CONFIG);
    let e = route(&s, &req(b"hi"), &[]).unwrap_err();
    assert_eq!(e.to_string(), "failed to run scheduler profile 'default'");
    let mut config = parse_config(REFERENCE_DEFAULT_CONFIG).unwrap().scheduling;
    config.profiles[0].filters.push(Arc::new(DropAll));
    let s = Scheduler::new(&config, &mut Registry::default());
    let pods = [ep(1, m(0, 0.0))];
    let e = route(&s, &req(b"hi"), &pods).unwrap_err();
    assert_eq!(
        e,
        ScheduleError::ProfileFailed {
            profile: "default".into()
        }
    );
    assert_eq!(s.prefix_index().unwrap().len(), 0);
}

#[test]
fn auto_tune_uses_the_endpoint_block_size_and_capacity() {
    // A small default capacity keeps one shard, so the endpoint's LRU order is exact.
    let (s, _) = scheduler(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
  parameters: {lruCapacityPerServer: 100}
",
    );
    let mut metrics = m(0, 0.0);
    metrics.kv_block_size = Some(1); // 4-byte blocks
    metrics.kv_num_blocks = Some(2); // LRU capacity 2
    let pods = [ep(1, metrics)];
    let out = route(&s, &req(b"aaaabbbbcccc"), &pods).unwrap();
    assert_eq!(out.prefix_total_blocks, 3);
    let index = s.prefix_index().unwrap();
    assert_eq!(index.endpoint_capacity("192.168.1.1:8000"), 2);
    assert_eq!(index.endpoint_len("192.168.1.1:8000"), 2);
    // The head of the prompt survives eviction (recorded last-first).
    assert_eq!(s.prefix_match(&req(b"aaaabbbbcccc"), &pods), vec![2]);
}

#[test]
fn metrics_are_registered_and_observed() {
    let (s, registry) = scheduler(REFERENCE_DEFAULT_CONFIG);
    let pods = [ep(1, m(0, 0.0)), ep(2, m(1, 0.5))];
    let prompt = "y".repeat(64 * 2);
    route(&s, &req(prompt.as_bytes()), &pods).unwrap();
    route(&s, &req(prompt.as_bytes()), &pods).unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for needle in [
        "inference_extension_scheduler_e2e_duration_seconds_count 2",
        "inference_extension_plugin_duration_seconds_count{extension_point=\"Scorer\",plugin_type=\"prefix-cache-scorer\",plugin_name=\"prefix-cache-scorer\"} 2",
        "inference_extension_plugin_duration_seconds_count{extension_point=\"Picker\",plugin_type=\"max-score-picker\",plugin_name=\"max-score-picker\"} 2",
        "inference_extension_plugin_duration_seconds_count{extension_point=\"ProfilePicker\",plugin_type=\"single-profile-handler\",plugin_name=\"single-profile-handler\"} 4",
        "inference_extension_prefix_indexer_size 2",
        "inference_extension_prefix_indexer_hit_ratio_sum 1.0",
        "inference_extension_prefix_indexer_hit_ratio_count 2",
        "inference_extension_prefix_indexer_hit_bytes_sum 128.0",
        "inference_extension_prefix_indexer_hit_bytes_bucket{le=\"128.0\"} 2",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

const QUEUE_ONLY: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
";

/// Endpoints whose snapshots carry live dispatch counters, as the datastore publishes them.
fn counted(queues: &[u32]) -> Vec<Arc<EndpointSnapshot>> {
    queues
        .iter()
        .zip(1u8..)
        .map(|(&q, i)| {
            let mut snapshot = (*ep(i, m(q, 0.0))).clone();
            snapshot.dispatch = Some(Arc::default());
            Arc::new(snapshot)
        })
        .collect()
}

/// Nine picks between two scrapes, scraped queues 0 / 1 / 1. Each routed request counts against
/// its endpoint (as the ext_proc path does), so the picks fill the queues level: effective loads
/// end at 3, 4, 4 whatever the tie-breaks. Without counting, all nine herd onto the endpoint
/// that looked best at the last scrape.
#[test]
fn picks_between_scrapes_spread_by_inflight_counts() {
    let (s, _) = scheduler(QUEUE_ONLY);
    let pods = counted(&[0, 1, 1]);
    let mut guards = Vec::new();
    for _ in 0..9 {
        let out = route(&s, &req(b"x"), &pods).unwrap();
        guards.push(out.primary().unwrap().dispatch().unwrap());
    }
    let mut loads: Vec<u32> = pods
        .iter()
        .map(|p| p.metrics.waiting_queue_size + p.unscraped())
        .collect();
    loads.sort_unstable();
    assert_eq!(loads, [3, 4, 4]);
    // Finished requests stop counting even before the next scrape.
    guards.clear();
    assert!(pods.iter().all(|p| p.unscraped() == 0));

    // The reference behaviour (no counting): every pick goes to the same endpoint.
    let pods = counted(&[0, 1, 1]);
    for _ in 0..9 {
        let out = route(&s, &req(b"x"), &pods).unwrap();
        assert_eq!(names(&out), ["192.168.1.1:8000"]);
    }
}
