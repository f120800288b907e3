//! The routing comparison: the same planned workload against the same replica setup (fresh
//! processes per policy, so every policy starts with cold caches) under each routing policy,
//! summarised per policy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::client::RequestOutcome;
use super::envoy::LbPolicy;
use super::load::{self, LoadOptions, Scheduled};
use super::stack::{Gateway, ReplicaCounters, ReplicaSpec, Stack, StackError};
use super::stats::{self, Quantiles};
use crate::epp::config::{DEFAULT_CONFIG, REFERENCE_DEFAULT_CONFIG};

/// EPP with scorers off and a random picker.
const RANDOM_CONFIG: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: random-picker
";

/// EPP with prefix 3 : queue 5 : kv-cache 2.
const WEIGHTS_352_CONFIG: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: queue-scorer
    weight: 5
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: max-score-picker
";

/// The work-aware default with bounded-load placement (`loadBoundFactor: 2`): no endpoint takes
/// a request while it holds twice the mean of the EPP's requests in flight, so a hot prefix
/// spreads to a second replica.
pub fn load_bound_config() -> String {
    DEFAULT_CONFIG.replacen(
        "- type: predicted-ttft-scorer\n",
        "- type: predicted-ttft-scorer\n  parameters:\n    loadBoundFactor: 2\n",
        1,
    )
}

/// Work-aware load alone: the predicted-TTFT scorer without a prefix index (every prompt
/// counts as uncached), so no affinity.
const WORK_ONLY_CONFIG: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: predicted-ttft-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: predicted-ttft-scorer
    weight: 1
  - pluginRef: max-score-picker
";

/// The reference default weights (prefix 3 : queue 2 : kv-cache 2) with the precise prefix
/// scorer in place of the approximate one: the replicas publish vLLM-format KV events over ZMQ
/// and the EPP scores by the blocks they report (`docs/precise-prefix.md`).
const PRECISE_CONFIG: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: precise-prefix-cache-scorer
  parameters:
    kvEventsConfig:
      endpointSockets: {KV_EVENT_SOCKETS}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: precise-prefix-cache-scorer
    weight: 3
";
/// The EPP default with flow control (`featureGates: [flowControl]`): requests wait in the EPP
/// while the replicas already queue (a mean of one waiting request, counting the EPP's own
/// dispatches since the last scrape), interactive before batch; batch waits at most 200 deep
/// and 60 s (then 429).
pub fn flow_control_config() -> String {
    let mut c = DEFAULT_CONFIG.replacen(
        "plugins:\n",
        "plugins:\n- type: utilization-detector\n  parameters: {queueDepthThreshold: 1}\n",
        1,
    );
    c.push_str(
        "featureGates: [flowControl]\nflowControl:\n  defaultRequestTTL: 60s\n  priorityBands:\n  - priority: -1\n    maxRequests: 200\n",
    );
    c
}

/// [`flow_control_config`] with priority holdback: a `concurrency-detector` at 16 requests in
/// flight per endpoint (the mixed-priority replicas' `--max-num-seqs`), with `decodeSafety`
/// counting a request waiting for its first token as full (`queueDepthThreshold: 1`), and a
/// `priority-holdback-policy` whose lowest band (batch, -1) stops dispatching at 0.75, i.e.
/// once an endpoint has 12 requests in flight or one not started; the highest (interactive,
/// 1, declared so it counts as active before its first request) dispatches up to 16. Four
/// slots per replica stay free for interactive requests under a batch flood, and no batch
/// prefill queues ahead of them.
pub fn flow_holdback_config() -> String {
    let mut c = DEFAULT_CONFIG.replacen(
        "plugins:\n",
        "plugins:\n- type: concurrency-detector\n  parameters: {maxConcurrency: 16, decodeSafety: {queueDepthThreshold: 1}}\n- type: priority-holdback-policy\n  parameters: {minCeiling: 0.75}\n",
        1,
    );
    c.push_str(
        "featureGates: [flowControl]\nflowControl:\n  defaultRequestTTL: 60s\n  usageLimitPolicyPluginRef: priority-holdback-policy\n  saturationDetector: {pluginRef: concurrency-detector}\n  priorityBands:\n  - priority: 1\n  - priority: -1\n    maxRequests: 200\n",
    );
    c
}

/// A routing policy under comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Policy {
    /// Envoy `ROUND_ROBIN` over the replicas.
    #[value(name = "round-robin")]
    RoundRobin,
    /// Envoy `LEAST_REQUEST` over the replicas.
    #[value(name = "least-request")]
    LeastRequest,
    /// EPP with `random-picker` (no scorers).
    #[value(name = "epp-random")]
    EppRandom,
    /// EPP default profile: freshness filter + predicted-TTFT scorer with prefix credit.
    #[value(name = "epp-default")]
    EppDefault,
    /// The reference default profile (prefix 3 : queue 2 : kv-cache 2), the EPP's default
    /// before issue 10.
    #[value(name = "epp-reference-default")]
    EppReferenceDefault,
    /// EPP with prefix 3 : queue 5 : kv-cache 2.
    #[value(name = "epp-3-5-2")]
    Epp352,
    /// The reference default profile scoring scraped numbers alone
    /// (`--inflight-accounting=false`, the reference's behaviour).
    #[value(name = "epp-reference-scraped-only")]
    EppReferenceScrapedOnly,
    /// EPP predicted-TTFT scorer without the prefix index: work-aware load alone.
    #[value(name = "epp-work-only")]
    EppWorkOnly,
    /// EPP default with bounded-load placement ([`load_bound_config`]).
    #[value(name = "epp-load-bound")]
    EppLoadBound,
    /// The reference default weights with `precise-prefix-cache-scorer` (replicas publish
    /// vLLM-format KV events over ZMQ).
    #[value(name = "epp-precise")]
    EppPrecise,
    /// EPP default with flow control on ([`flow_control_config`]).
    #[value(name = "epp-flow-control")]
    EppFlowControl,
    /// Flow control with priority holdback ([`flow_holdback_config`]).
    #[value(name = "epp-flow-holdback")]
    EppFlowHoldback,
    /// The EndpointPickerConfig given with `--epp-config-file`.
    #[value(name = "epp-custom")]
    EppCustom,
}

impl Policy {
    pub const ALL: [Policy; 7] = [
        Policy::RoundRobin,
        Policy::LeastRequest,
        Policy::EppRandom,
        Policy::EppReferenceDefault,
        Policy::Epp352,
        Policy::EppWorkOnly,
        Policy::EppDefault,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "envoy round-robin",
            Policy::LeastRequest => "envoy least-request",
            Policy::EppRandom => "epp random-picker",
            Policy::EppDefault => "epp default (work-aware)",
            Policy::EppReferenceDefault => "epp reference default (3:2:2)",
            Policy::Epp352 => "epp 3:5:2",
            Policy::EppReferenceScrapedOnly => "epp reference, scraped only",
            Policy::EppWorkOnly => "epp work-aware load only",
            Policy::EppLoadBound => "epp default + load bound 2x",
            Policy::EppPrecise => "epp precise prefix (3:2:2, KV events)",
            Policy::EppFlowControl => "epp default + flow control",
            Policy::EppFlowHoldback => "epp flow control + priority holdback",
            Policy::EppCustom => "epp custom config",
        }
    }

    /// Short label for file names and progress lines.
    pub fn slug(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::LeastRequest => "least-request",
            Policy::EppRandom => "epp-random",
            Policy::EppDefault => "epp-default",
            Policy::EppReferenceDefault => "epp-reference-default",
            Policy::Epp352 => "epp-3-5-2",
            Policy::EppReferenceScrapedOnly => "epp-reference-scraped-only",
            Policy::EppWorkOnly => "epp-work-only",
            Policy::EppLoadBound => "epp-load-bound",
            Policy::EppPrecise => "epp-precise",
            Policy::EppFlowControl => "epp-flow-control",
            Policy::EppFlowHoldback => "epp-flow-holdback",
            Policy::EppCustom => "epp-custom",
        }
    }

    pub fn gateway(self) -> Gateway {
        match self {
            Policy::RoundRobin => Gateway::Envoy(LbPolicy::RoundRobin),
            Policy::LeastRequest => Gateway::Envoy(LbPolicy::LeastRequest),
            Policy::EppRandom => Gateway::Epp {
                config_text: RANDOM_CONFIG.to_owned(),
                inflight_accounting: true,
            },
            Policy::EppDefault => Gateway::Epp {
                config_text: String::new(),
                inflight_accounting: true,
            },
            Policy::Epp352 => Gateway::Epp {
                config_text: WEIGHTS_352_CONFIG.to_owned(),
                inflight_accounting: true,
            },
            Policy::EppReferenceDefault => Gateway::Epp {
                config_text: REFERENCE_DEFAULT_CONFIG.to_owned(),
                inflight_accounting: true,
            },
            Policy::EppReferenceScrapedOnly => Gateway::Epp {
                config_text: REFERENCE_DEFAULT_CONFIG.to_owned(),
                inflight_accounting: false,
            },
            Policy::EppWorkOnly => Gateway::Epp {
                config_text: WORK_ONLY_CONFIG.to_owned(),
                inflight_accounting: true,
            },
            Policy::EppLoadBound => Gateway::Epp {
                config_text: load_bound_config(),
                inflight_accounting: true,
            },
            Policy::EppPrecise => Gateway::Epp {
                config_text: PRECISE_CONFIG.to_owned(),
                inflight_accounting: true,
            },
            Policy::EppFlowControl => Gateway::Epp {
                config_text: flow_control_config(),
                inflight_accounting: true,
            },
            Policy::EppFlowHoldback => Gateway::Epp {
                config_text: flow_holdback_config(),
                inflight_accounting: true,
            },
            // The text comes from the comparison ([`Comparison::custom_config`]).
            Policy::EppCustom => Gateway::Epp {
                config_text: String::new(),
                inflight_accounting: true,
            },
        }
    }
}

/// Everything one comparison needs.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The `epp-custom` policy's EndpointPickerConfig.
    pub custom_config: Option<String>,
    pub bin: PathBuf,
    pub envoy: PathBuf,
    pub replicas: ReplicaSpec,
    pub policies: Vec<Policy>,
    pub plan: Vec<Scheduled>,
    pub load: LoadOptions,
    /// Logs and configs go here.
    pub dir: PathBuf,
    /// Print a progress line while each policy runs.
    pub progress: bool,
}

/// One policy's numbers. Latencies are in simulated milliseconds (wall-clock ÷ time scale),
/// i.e. what the modelled accelerator would show; throughput likewise per simulated second.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyResult {
    pub policy: Policy,
    pub name: &'static str,
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    pub ttft_ms: Quantiles,
    pub itl_p50_ms: f64,
    pub e2e_ms: Quantiles,
    pub output_tokens_per_s: f64,
    /// Prefix-cache hit rate over the run: Σ hits / Σ queries of the replicas' counters.
    pub prefix_hit_rate: f64,
    /// Fraction of finished requests per replica.
    pub replica_share: Vec<f64>,
    /// Wall-clock seconds the run took.
    pub wall_s: f64,
    /// Up to five distinct error messages.
    pub error_samples: Vec<String>,
    /// Every successful request's TTFT (simulated ms), for the plot.
    #[serde(skip)]
    pub ttft_samples_ms: Vec<f64>,
    /// Per objective, when the workload sends objectives (mixed priority).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<ClassResult>,
    /// Prefix-hit prediction accuracy per index, from the EPP's metrics (EPP policies).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prediction: Vec<super::prediction::IndexAccuracy>,
}

/// One objective's numbers within a policy's run.
#[derive(Debug, Clone, Serialize)]
pub struct ClassResult {
    pub objective: &'static str,
    pub requests: usize,
    pub ok: usize,
    /// Answered 429 (flow control or the reference's sheddable admission).
    pub rejected_429: usize,
    pub ttft_ms: Quantiles,
    pub e2e_ms: Quantiles,
}

/// Splits `outcomes` (in plan order) by the objective each planned request carried.
pub fn class_results(
    plan: &[Scheduled],
    outcomes: &[RequestOutcome],
    sim_per_wall: f64,
) -> Vec<ClassResult> {
    let ms = 1000.0 * sim_per_wall;
    let mut objectives: Vec<&'static str> = Vec::new();
    for o in plan.iter().filter_map(|s| s.objective) {
        if !objectives.contains(&o) {
            objectives.push(o);
        }
    }
    objectives
        .into_iter()
        .map(|objective| {
            let mine: Vec<&RequestOutcome> = plan
                .iter()
                .zip(outcomes)
                .filter(|(s, _)| s.objective == Some(objective))
                .map(|(_, o)| o)
                .collect();
            let ok: Vec<&&RequestOutcome> = mine.iter().filter(|o| o.ok()).collect();
            let ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft_s).map(|t| t * ms).collect();
            let e2e: Vec<f64> = ok.iter().map(|o| o.e2e_s * ms).collect();
            ClassResult {
                objective,
                requests: mine.len(),
                ok: ok.len(),
                rejected_429: mine.iter().filter(|o| o.status == 429).count(),
                ttft_ms: Quantiles::of(&ttft),
                e2e_ms: Quantiles::of(&e2e),
            }
        })
        .collect()
}

/// Summarises one run. `sim_per_wall` converts wall-clock seconds to simulated ones.
pub fn summarise(
    policy: Policy,
    outcomes: &[RequestOutcome],
    wall_s: f64,
    sim_per_wall: f64,
    counters: &[ReplicaCounters],
) -> PolicyResult {
    let ok: Vec<&RequestOutcome> = outcomes.iter().filter(|o| o.ok()).collect();
    let ms = 1000.0 * sim_per_wall;
    let ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft_s).map(|t| t * ms).collect();
    let e2e: Vec<f64> = ok.iter().map(|o| o.e2e_s * ms).collect();
    let mut itl: Vec<f64> = ok
        .iter()
        .flat_map(|o| o.itl_s.iter().map(|t| t * ms))
        .collect();
    stats::sort(&mut itl);
    let tokens: u64 = ok.iter().map(|o| o.output_tokens).sum();
    let queries: f64 = counters.iter().map(|c| c.prefix_queries).sum();
    let hits: f64 = counters.iter().map(|c| c.prefix_hits).sum();
    let finished: f64 = counters.iter().map(|c| c.requests).sum();
    let mut error_samples: Vec<String> = Vec::new();
    for o in outcomes {
        if let Some(e) = &o.error {
            if error_samples.len() < 5 && !error_samples.contains(e) {
                error_samples.push(e.clone());
            }
        }
    }
    PolicyResult {
        policy,
        name: policy.name(),
        requests: outcomes.len(),
        ok: ok.len(),
        errors: outcomes.len() - ok.len(),
        ttft_ms: Quantiles::of(&ttft),
        itl_p50_ms: stats::percentile(&itl, 50.0).unwrap_or(0.0),
        e2e_ms: Quantiles::of(&e2e),
        output_tokens_per_s: if wall_s > 0.0 {
            tokens as f64 / (wall_s * sim_per_wall)
        } else {
            0.0
        },
        prefix_hit_rate: if queries > 0.0 { hits / queries } else { 0.0 },
        replica_share: counters
            .iter()
            .map(|c| {
                if finished > 0.0 {
                    c.requests / finished
                } else {
                    0.0
                }
            })
            .collect(),
        wall_s,
        error_samples,
        ttft_samples_ms: ttft,
        classes: Vec::new(),
        prediction: Vec::new(),
    }
}

/// Runs every policy of `cmp` in turn.
pub async fn run(cmp: &Comparison) -> Result<Vec<PolicyResult>, StackError> {
    let sim_per_wall = if cmp.replicas.time_scale > 0.0 {
        1.0 / cmp.replicas.time_scale
    } else {
        1.0
    };
    let mut results = Vec::with_capacity(cmp.policies.len());
    for &policy in &cmp.policies {
        let result = run_policy(cmp, policy, sim_per_wall, &cmp.dir).await?;
        eprintln!(
            "{:<22} ok {}/{}  TTFT p50 {:.0} ms  p90 {:.0} ms  hit rate {:.1}%",
            policy.name(),
            result.ok,
            result.requests,
            result.ttft_ms.p50,
            result.ttft_ms.p90,
            100.0 * result.prefix_hit_rate
        );
        results.push(result);
    }
    Ok(results)
}

async fn run_policy(
    cmp: &Comparison,
    policy: Policy,
    sim_per_wall: f64,
    dir: &Path,
) -> Result<PolicyResult, StackError> {
    tracing::info!(policy = policy.slug(), "starting stack");
    let gateway = match (policy, &cmp.custom_config) {
        (Policy::EppCustom, Some(text)) => Gateway::Epp {
            config_text: text.clone(),
            inflight_accounting: true,
        },
        _ => policy.gateway(),
    };
    let mut stack = Stack::start(
        &cmp.bin,
        &cmp.envoy,
        &cmp.replicas,
        &gateway,
        dir,
        policy.slug(),
    )
    .await?;
    let outcome = async {
        let before = stack.replica_counters().await?;
        let predicted_before = super::prediction::scrape(stack.epp_metrics).await;
        let opts = LoadOptions {
            progress_label: cmp.progress.then(|| policy.slug().to_owned()),
            ..cmp.load.clone()
        };
        let res = load::run(&stack.completions_url(), &cmp.plan, &opts).await;
        // A crashed replica or EPP would otherwise show up only as errors.
        stack.check_running()?;
        let after = stack.replica_counters().await?;
        let deltas: Vec<ReplicaCounters> =
            after.iter().zip(&before).map(|(a, b)| a.since(b)).collect();
        let mut result = summarise(policy, &res.outcomes, res.wall_s, sim_per_wall, &deltas);
        result.classes = class_results(&cmp.plan, &res.outcomes, sim_per_wall);
        let predicted_after = super::prediction::scrape(stack.epp_metrics).await;
        if let (Some(a), Some(b)) = (predicted_after, predicted_before) {
            result.prediction = super::prediction::accuracy_since(&a, &b);
        }
        Ok::<_, StackError>(result)
    }
    .await;
    stack.stop().await;
    // Let sockets of the stopped stack close before the next one binds fresh ports.
    tokio::time::sleep(Duration::from_millis(200)).await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_control_policies_parse_to_what_they_describe() {
        use crate::epp::config::parse_config;
        use crate::epp::flowcontrol::usage::{HoldbackDomain, HoldbackParams, UsageLimit};
        use crate::epp::saturation::{ConcurrencyConfig, DetectorConfig};
        let plain = parse_config(&flow_control_config()).unwrap();
        assert_eq!(plain.flow_control.unwrap().usage_limit, UsageLimit::Static);
        let c = parse_config(&flow_holdback_config()).unwrap();
        assert_eq!(
            c.saturation,
            DetectorConfig::Concurrency(ConcurrencyConfig {
                max_concurrency: 16,
                headroom: 0.0,
                decode_safety: Some(crate::epp::saturation::SaturationConfig {
                    queue_depth_threshold: 1,
                    ..Default::default()
                }),
            })
        );
        let fc = c.flow_control.unwrap();
        assert_eq!(
            fc.usage_limit,
            UsageLimit::PriorityHoldback(HoldbackParams {
                domain: HoldbackDomain::Rank,
                min_ceiling: 0.75,
                max_ceiling: 1.0,
            })
        );
        assert_eq!(fc.bands.keys().copied().collect::<Vec<_>>(), [-1, 1]);
        assert_eq!(fc.band(-1).max_requests, 200);
    }

    #[test]
    fn the_load_bound_policy_is_the_default_plus_its_bound() {
        use crate::epp::config::{parse_config, PluginKind};
        let bound = |text: &str| match &parse_config(text)
            .unwrap()
            .plugin("predicted-ttft-scorer")
            .unwrap()
            .kind
        {
            PluginKind::PredictedTtftScorer(p) => p.load_bound_factor,
            _ => unreachable!("predicted-ttft-scorer decodes to its own kind"),
        };
        assert_eq!(bound(DEFAULT_CONFIG), None);
        assert_eq!(bound(&load_bound_config()), Some(2.0));
    }

    #[test]
    fn summary_converts_to_simulated_time_and_counts() {
        let o = |ttft: f64, e2e: f64, tokens: u64, err: Option<&str>| RequestOutcome {
            ttft_s: Some(ttft),
            e2e_s: e2e,
            itl_s: vec![0.001, 0.003],
            output_tokens: tokens,
            error: err.map(str::to_owned),
            ..RequestOutcome::default()
        };
        let outcomes = vec![
            o(0.01, 0.1, 10, None),
            o(0.02, 0.2, 10, None),
            o(0.03, 0.3, 10, None),
            o(0.0, 0.0, 0, Some("boom")),
        ];
        let counters = [
            ReplicaCounters {
                prefix_queries: 100.0,
                prefix_hits: 50.0,
                requests: 1.0,
            },
            ReplicaCounters {
                prefix_queries: 100.0,
                prefix_hits: 0.0,
                requests: 2.0,
            },
            ReplicaCounters::default(),
        ];
        // time scale 0.1: 10 simulated seconds per wall second.
        let r = summarise(Policy::EppDefault, &outcomes, 1.0, 10.0, &counters);
        assert_eq!((r.requests, r.ok, r.errors), (4, 3, 1));
        assert!((r.ttft_ms.p50 - 200.0).abs() < 1e-9);
        assert!((r.e2e_ms.p50 - 2000.0).abs() < 1e-9);
        assert!((r.itl_p50_ms - 20.0).abs() < 1e-9);
        assert!((r.output_tokens_per_s - 3.0).abs() < 1e-9);
        assert!((r.prefix_hit_rate - 0.25).abs() < 1e-12);
        assert_eq!(r.replica_share.len(), 3);
        assert!((r.replica_share[1] - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.error_samples, vec!["boom".to_owned()]);
    }

    #[test]
    fn classes_split_by_objective_and_count_429s() {
        let sched = |objective| Scheduled {
            at: Duration::ZERO,
            body: bytes::Bytes::new(),
            objective,
        };
        let plan = vec![
            sched(Some("interactive")),
            sched(Some("batch")),
            sched(Some("interactive")),
            sched(Some("batch")),
        ];
        let ok = |ttft: f64| RequestOutcome {
            ttft_s: Some(ttft),
            e2e_s: 2.0 * ttft,
            status: 200,
            ..RequestOutcome::default()
        };
        let shed = RequestOutcome {
            status: 429,
            error: Some("HTTP 429".into()),
            ..RequestOutcome::default()
        };
        let outcomes = vec![ok(0.01), shed, ok(0.03), ok(0.5)];
        let c = class_results(&plan, &outcomes, 10.0);
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].objective, c[0].requests, c[0].ok, c[0].rejected_429),
            ("interactive", 2, 2, 0)
        );
        assert!((c[0].ttft_ms.p50 - 200.0).abs() < 1e-9);
        assert_eq!(
            (c[1].objective, c[1].requests, c[1].ok, c[1].rejected_429),
            ("batch", 2, 1, 1)
        );
        assert!((c[1].ttft_ms.p99 - 5000.0).abs() < 1e-9);
        // The flow-control policy's config is a valid EndpointPickerConfig with the gate on.
        let parsed = crate::epp::config::parse_config(&flow_control_config()).unwrap();
        let fc = parsed.flow_control.unwrap();
        assert_eq!(fc.band(-1).max_requests, 200);
        assert!(matches!(
            parsed.saturation,
            crate::epp::saturation::DetectorConfig::Utilization(
                crate::epp::saturation::SaturationConfig {
                    queue_depth_threshold: 1,
                    ..
                }
            )
        ));
    }
}
