//! Scheduling: picks the endpoint(s) for one request by running the configured profile's
//! filters → scorers (weighted sum of clamped scores) → picker, as configured by an
//! EndpointPickerConfig, and teaches the prefix index where the request went.
//!
//! Ported from GIE v1.5.0 `pkg/epp/scheduling/{scheduler,scheduler_profile}.go`; the prefix
//! index's PrepareData/PreRequest hooks are folded in: the prompt is hashed once per request,
//! the hashes are shared by the prefix scorer and the recording step.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rand::RngCore;

use crate::epp::endpoint::EndpointSnapshot;
use crate::epp::prefix::{self, PrefixIndex, PrefixIndexConfig};

pub mod config;
pub mod plugins;

pub use config::{
    parse_config, ConfigError, PluginKind, PrefixCacheParams, ProfileSpec, SchedulerConfig,
    DEFAULT_CONFIG,
};
use plugins::freshness::ScrapeFreshnessFilter;
use plugins::pickers::{MaxScorePicker, RandomPicker, WeightedRandomPicker};
use plugins::predicted_ttft::PredictedTtftScorer;
use plugins::profile::SingleProfileHandler;
use plugins::scorers::{
    KvCacheUtilizationScorer, LoraAffinityScorer, PrefixCacheScorer, QueueScorer,
    RunningRequestsScorer,
};
use plugins::{CycleState, Filter, Picker, ProfileHandler, ProfileOutcome, Scored, Scorer};

/// What scheduling needs to know about one request.
#[derive(Debug, Clone, Copy)]
pub struct SchedulingRequest<'a> {
    pub request_id: &'a str,
    /// Model after rewrite; LoRA affinity compares adapters to it; it seeds the prefix hashes.
    pub target_model: &'a str,
    /// Bytes the prefix index hashes (prepared by `request.rs`).
    pub prompt: &'a [u8],
    /// Empty unless the body has `cache_salt`.
    pub cache_salt: &'a [u8],
    /// Extra endpoints wanted after the primary (`--fallback-endpoints`).
    pub fallbacks: usize,
}

/// The decision for one request.
#[derive(Debug, Clone)]
pub struct ScheduleResult {
    /// Primary first, then the picker's further picks (`maxNumOfEndpoints`), then, up to
    /// `1 + fallbacks` in all, the best remaining endpoints in descending score order. Distinct.
    pub endpoints: Vec<Arc<EndpointSnapshot>>,
    /// Name of the primary profile.
    pub profile: String,
    /// Prefix blocks the primary endpoint was estimated to hold, and the request's block count.
    pub prefix_matched_blocks: usize,
    pub prefix_total_blocks: usize,
    /// The primary's predicted prefill work: prompt tokens (bytes / 4) less its matched prefix.
    pub prefill_tokens: u64,
    /// Total weighted score of each entry of `endpoints`.
    pub scores: Vec<f64>,
}

/// Why no endpoint was picked. `Display` is the text after "failed to find target endpoint: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The profile ran out of endpoints (none given, or a filter removed all of them).
    #[error("failed to run scheduler profile '{profile}'")]
    ProfileFailed { profile: String },
    #[error("failed to run any scheduler profile for request {request_id}")]
    NoProfileRan { request_id: String },
    #[error("single profile handler is intended to be used with a single profile, failed to process multiple profiles")]
    MultipleProfiles,
}

/// Extension-point label values of `inference_extension_plugin_duration_seconds`.
const EP_PROFILE_PICKER: &str = "ProfilePicker";
const EP_FILTER: &str = "Filter";
const EP_SCORER: &str = "Scorer";
const EP_PICKER: &str = "Picker";
const EP_PROCESS_RESULTS: &str = "ProcessProfilesResults";

/// Reference buckets (`pkg/epp/metrics/metrics.go`).
const LATENCY_BUCKETS: [f64; 10] = [
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
];
const HIT_RATIO_BUCKETS: [f64; 11] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
const HIT_BYTES_BUCKETS: [f64; 14] = [
    0.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
    65536.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    extension_point: String,
    plugin_type: String,
    plugin_name: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Metric handles, resolved once at construction.
struct Metrics {
    plugin_duration: Family<PluginLabels, Histogram, fn() -> Histogram>,
    e2e: Histogram,
    hit_ratio: Histogram,
    hit_bytes: Histogram,
    handler_pick: Histogram,
    handler_process: Histogram,
}

impl Metrics {
    fn new(registry: &mut Registry, index_size: Gauge, handler: &dyn ProfileHandler) -> Self {
        let plugin_duration =
            Family::<PluginLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        let e2e = latency_histogram();
        let hit_ratio = Histogram::new(HIT_RATIO_BUCKETS);
        let hit_bytes = Histogram::new(HIT_BYTES_BUCKETS);
        registry.register(
            "inference_extension_scheduler_e2e_duration_seconds",
            "End-to-end scheduling latency distribution in seconds.",
            e2e.clone(),
        );
        registry.register(
            "inference_extension_plugin_duration_seconds",
            "Plugin processing latency distribution in seconds for each extension point, plugin type and plugin name.",
            plugin_duration.clone(),
        );
        registry.register(
            "inference_extension_prefix_indexer_size",
            "Size of the prefix indexer.",
            index_size,
        );
        registry.register(
            "inference_extension_prefix_indexer_hit_ratio",
            "Ratio of prefix length matched to total prefix length in the cache lookup.",
            hit_ratio.clone(),
        );
        registry.register(
            "inference_extension_prefix_indexer_hit_bytes",
            "Length of the prefix match in number of bytes in the cache lookup.",
            hit_bytes.clone(),
        );
        let mut m = Metrics {
            plugin_duration,
            e2e,
            hit_ratio,
            hit_bytes,
            handler_pick: latency_histogram(),
            handler_process: latency_histogram(),
        };
        m.handler_pick = m.plugin(EP_PROFILE_PICKER, handler.plugin_type(), handler.name());
        m.handler_process = m.plugin(EP_PROCESS_RESULTS, handler.plugin_type(), handler.name());
        m
    }

    fn plugin(&self, point: &str, plugin_type: &str, name: &str) -> Histogram {
        self.plugin_duration
            .get_or_create(&PluginLabels {
                extension_point: point.to_string(),
                plugin_type: plugin_type.to_string(),
                plugin_name: name.to_string(),
            })
            .clone()
    }
}

fn observe_since(h: &Histogram, start: Instant) {
    h.observe(start.elapsed().as_secs_f64());
}

/// One scheduling profile: its plugins with their latency histograms.
struct Profile {
    name: String,
    filters: Vec<(Arc<dyn Filter>, Histogram)>,
    scorers: Vec<(Arc<dyn Scorer>, f64, Histogram)>,
    picker: (Arc<dyn Picker>, Histogram),
}

/// A successful profile run.
struct ProfileRun {
    endpoints: Vec<Arc<EndpointSnapshot>>,
    scores: Vec<f64>,
    /// The primary's matched prefix blocks, when this profile ran the prefix scorer.
    primary_prefix_match: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProfileFailure {
    NoEndpoints,
}

impl Profile {
    fn run(
        &self,
        cycle: &mut CycleState<'_>,
        candidates: &[Arc<EndpointSnapshot>],
        fallbacks: usize,
        rng: &mut dyn RngCore,
    ) -> Result<ProfileRun, ProfileFailure> {
        let filtered: Vec<Arc<EndpointSnapshot>>;
        let endpoints: &[Arc<EndpointSnapshot>] = if self.filters.is_empty() {
            candidates
        } else {
            let mut kept = candidates.to_vec();
            for (filter, hist) in &self.filters {
                let t = Instant::now();
                filter.filter(cycle, &mut kept);
                observe_since(hist, t);
                if kept.is_empty() {
                    tracing::debug!(profile = %self.name, filter = filter.name(),
                        "filter eliminated all endpoints");
                    break;
                }
            }
            filtered = kept;
            &filtered
        };
        if endpoints.is_empty() {
            return Err(ProfileFailure::NoEndpoints);
        }

        let n = endpoints.len();
        cycle.prefix_matches.clear();
        let mut total = vec![0.0f64; n];
        let mut buf = vec![0.0f64; n];
        for (scorer, weight, hist) in &self.scorers {
            buf.fill(0.0);
            let t = Instant::now();
            scorer.score(cycle, endpoints, &mut buf);
            observe_since(hist, t);
            for (acc, s) in total.iter_mut().zip(&buf) {
                // Clamp to [0, 1]; a NaN score counts as 0.
                let s = if s.is_nan() { 0.0 } else { s.clamp(0.0, 1.0) };
                *acc += weight * s;
            }
        }

        let mut scored: Vec<Scored> = total
            .iter()
            .enumerate()
            .map(|(index, &score)| Scored { index, score })
            .collect();
        let (picker, hist) = &self.picker;
        let t = Instant::now();
        let picked = picker.pick(&mut scored, rng).clamp(1, n);
        observe_since(hist, t);

        let wanted = fallbacks.saturating_add(1).min(n);
        if picked < wanted {
            scored[picked..].sort_by(|a, b| b.score.total_cmp(&a.score));
        }
        let take = picked.max(wanted);
        let primary_prefix_match = cycle.prefix_matches.get(scored[0].index).copied();
        if tracing::enabled!(tracing::Level::TRACE) {
            tracing::trace!(request_id = cycle.request.request_id, profile = %self.name,
                picked = ?scored[..take].iter().map(|s| (&endpoints[s.index].endpoint.name, s.score)).collect::<Vec<_>>(),
                "profile picked endpoints");
        }
        Ok(ProfileRun {
            endpoints: scored[..take]
                .iter()
                .map(|s| endpoints[s.index].clone())
                .collect(),
            scores: scored[..take].iter().map(|s| s.score).collect(),
            primary_prefix_match,
        })
    }
}

/// The prefix index and how requests are hashed for it.
struct PrefixRuntime {
    index: Arc<PrefixIndex>,
    params: PrefixCacheParams,
}

impl PrefixRuntime {
    /// Block size (tokens): the first candidate's reported KV block size under autoTune.
    fn block_tokens(&self, candidates: &[Arc<EndpointSnapshot>]) -> usize {
        if self.params.auto_tune {
            if let Some(b) = candidates
                .first()
                .and_then(|c| c.metrics.kv_block_size)
                .filter(|&b| b > 0)
            {
                return b as usize;
            }
        }
        self.params.block_size_tokens
    }

    fn hash(
        &self,
        req: &SchedulingRequest<'_>,
        candidates: &[Arc<EndpointSnapshot>],
        out: &mut Vec<u64>,
    ) -> usize {
        let block = self.block_tokens(candidates);
        let max_blocks = if self.params.max_prefix_tokens_to_match > 0 && block > 0 {
            self.params.max_prefix_tokens_to_match / block
        } else {
            self.params.max_prefix_blocks_to_match
        };
        prefix::hash_prompt(
            req.target_model.as_bytes(),
            req.cache_salt,
            req.prompt,
            block,
            max_blocks,
            out,
        );
        block
    }

    /// LRU capacity for a newly seen endpoint: its KV block count under autoTune.
    fn capacity_hint(&self, endpoint: &EndpointSnapshot) -> Option<usize> {
        if !self.params.auto_tune {
            return None;
        }
        endpoint
            .metrics
            .kv_num_blocks
            .filter(|&n| n > 0)
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }
}

/// Runs scheduling cycles for the configured profiles. Shared by all request tasks.
pub struct Scheduler {
    profiles: Vec<Profile>,
    profile_names: Vec<String>,
    handler: Arc<dyn ProfileHandler>,
    prefix: Option<PrefixRuntime>,
    metrics: Metrics,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("profiles", &self.profile_names)
            .field("handler", &self.handler.name())
            .field("prefix_index", &self.prefix.as_ref().map(|p| &p.index))
            .finish()
    }
}

enum Instance {
    Filter(Arc<dyn Filter>),
    Scorer(Arc<dyn Scorer>),
    Picker(Arc<dyn Picker>),
    Handler(Arc<dyn ProfileHandler>),
    Other,
}

impl Scheduler {
    pub fn new(config: &SchedulerConfig, registry: &mut Registry) -> Self {
        let prefix = config.prefix_cache.map(|params| PrefixRuntime {
            index: Arc::new(PrefixIndex::new(PrefixIndexConfig {
                lru_capacity_per_endpoint: params.lru_capacity_per_server,
            })),
            params,
        });
        let index_size = prefix
            .as_ref()
            .map(|p| p.index.size_gauge().clone())
            .unwrap_or_default();

        let instances: Vec<(&str, Instance)> = config
            .plugins
            .iter()
            .map(|spec| {
                let name = spec.name.clone();
                let inst = match &spec.kind {
                    PluginKind::QueueScorer => Instance::Scorer(Arc::new(QueueScorer { name })),
                    PluginKind::RunningRequestsSizeScorer => {
                        Instance::Scorer(Arc::new(RunningRequestsScorer { name }))
                    }
                    PluginKind::KvCacheUtilizationScorer => {
                        Instance::Scorer(Arc::new(KvCacheUtilizationScorer { name }))
                    }
                    PluginKind::LoraAffinityScorer => {
                        Instance::Scorer(Arc::new(LoraAffinityScorer { name }))
                    }
                    PluginKind::PrefixCacheScorer(_) => match &prefix {
                        Some(p) => Instance::Scorer(Arc::new(PrefixCacheScorer {
                            name,
                            index: p.index.clone(),
                        })),
                        // Unreachable: a prefix scorer always yields prefix parameters.
                        None => Instance::Other,
                    },
                    PluginKind::MaxScorePicker(p) => Instance::Picker(Arc::new(MaxScorePicker {
                        name,
                        max_num_of_endpoints: p.max_num_of_endpoints,
                    })),
                    PluginKind::RandomPicker(p) => Instance::Picker(Arc::new(RandomPicker {
                        name,
                        max_num_of_endpoints: p.max_num_of_endpoints,
                    })),
                    PluginKind::WeightedRandomPicker(p) => {
                        Instance::Picker(Arc::new(WeightedRandomPicker {
                            name,
                            max_num_of_endpoints: p.max_num_of_endpoints,
                        }))
                    }
                    PluginKind::SingleProfileHandler => {
                        Instance::Handler(Arc::new(SingleProfileHandler { name }))
                    }
                    PluginKind::PredictedTtftScorer(params) => {
                        Instance::Scorer(Arc::new(PredictedTtftScorer {
                            name,
                            index: prefix.as_ref().map(|p| p.index.clone()),
                            params: *params,
                        }))
                    }
                    PluginKind::ScrapeFreshnessFilter(staleness) => {
                        Instance::Filter(Arc::new(ScrapeFreshnessFilter {
                            name,
                            staleness: *staleness,
                        }))
                    }
                    PluginKind::ApproxPrefixCacheProducer(_)
                    | PluginKind::UtilizationDetector(_)
                    | PluginKind::MetricsDataSource(_)
                    | PluginKind::CoreMetricsExtractor(_)
                    | PluginKind::OpenAiParser => Instance::Other,
                };
                (spec.name.as_str(), inst)
            })
            .collect();
        let find = |name: &str| instances.iter().find(|(n, _)| *n == name).map(|(_, i)| i);

        let handler: Arc<dyn ProfileHandler> = match find(&config.profile_handler) {
            Some(Instance::Handler(h)) => h.clone(),
            // A validated config always names a handler; fall back to the only kind there is.
            _ => Arc::new(SingleProfileHandler {
                name: config.profile_handler.clone(),
            }),
        };
        let metrics = Metrics::new(registry, index_size, handler.as_ref());

        let profiles: Vec<Profile> = config
            .profiles
            .iter()
            .map(|spec| {
                let scorers = spec
                    .scorers
                    .iter()
                    .filter_map(|(name, weight)| match find(name) {
                        Some(Instance::Scorer(s)) => Some((
                            s.clone(),
                            *weight,
                            metrics.plugin(EP_SCORER, s.plugin_type(), s.name()),
                        )),
                        _ => None,
                    })
                    .collect();
                let picker: Arc<dyn Picker> = match find(&spec.picker) {
                    Some(Instance::Picker(p)) => p.clone(),
                    _ => Arc::new(MaxScorePicker {
                        name: spec.picker.clone(),
                        max_num_of_endpoints: 1,
                    }),
                };
                let picker_hist = metrics.plugin(EP_PICKER, picker.plugin_type(), picker.name());
                let filters = spec
                    .filters
                    .iter()
                    .filter_map(|name| match find(name) {
                        Some(Instance::Filter(f)) => Some((
                            f.clone(),
                            metrics.plugin(EP_FILTER, f.plugin_type(), f.name()),
                        )),
                        _ => None,
                    })
                    .collect();
                Profile {
                    name: spec.name.clone(),
                    filters,
                    scorers,
                    picker: (picker, picker_hist),
                }
            })
            .collect();
        let profile_names = profiles.iter().map(|p| p.name.clone()).collect();
        tracing::info!(
            profiles = ?config.profiles,
            prefix_cache = ?config.prefix_cache,
            "scheduler configured"
        );
        Scheduler {
            profiles,
            profile_names,
            handler,
            prefix,
            metrics,
        }
    }

    /// Runs profiles → filters → scorers → picker over `candidates` and, on success, records the
    /// request's prefix hashes for the primary endpoint (the reference does this in PreRequest).
    pub fn schedule(
        &self,
        req: &SchedulingRequest<'_>,
        candidates: &[Arc<EndpointSnapshot>],
    ) -> Result<ScheduleResult, ScheduleError> {
        let start = Instant::now();
        let mut hashes = Vec::new();
        let block_tokens = match &self.prefix {
            Some(p) => p.hash(req, candidates, &mut hashes),
            None => 0,
        };
        let mut cycle = CycleState {
            request: req,
            prefix_hashes: &hashes,
            prefix_block_tokens: block_tokens,
            prefix_matches: Vec::new(),
        };
        let mut rng = rand::rng();
        let n = self.profiles.len();
        let mut outcomes = vec![ProfileOutcome::NotRun; n];
        let mut runs: Vec<Option<ProfileRun>> = (0..n).map(|_| None).collect();
        let mut next = Vec::new();
        // Each profile runs at most once, so at most n + 1 rounds (the last one picks nothing).
        for _ in 0..=n {
            next.clear();
            let t = Instant::now();
            self.handler.pick_profiles(&outcomes, &mut next);
            observe_since(&self.metrics.handler_pick, t);
            next.retain(|&i| outcomes.get(i) == Some(&ProfileOutcome::NotRun));
            if next.is_empty() {
                break;
            }
            for &i in &next {
                let profile = &self.profiles[i];
                match profile.run(&mut cycle, candidates, req.fallbacks, &mut rng) {
                    Ok(run) => {
                        outcomes[i] = ProfileOutcome::Picked;
                        runs[i] = Some(run);
                    }
                    Err(ProfileFailure::NoEndpoints) => {
                        tracing::debug!(request_id = req.request_id, profile = %profile.name,
                            "no endpoints available for the given request");
                        outcomes[i] = ProfileOutcome::Failed;
                    }
                }
            }
        }
        if outcomes.iter().all(|o| *o == ProfileOutcome::NotRun) {
            observe_since(&self.metrics.e2e, start);
            return Err(ScheduleError::NoProfileRan {
                request_id: req.request_id.to_string(),
            });
        }
        let t = Instant::now();
        let primary = self.handler.process_results(&self.profile_names, &outcomes);
        observe_since(&self.metrics.handler_process, t);
        observe_since(&self.metrics.e2e, start);
        let primary = primary?;
        let Some(run) = runs.get_mut(primary).and_then(Option::take) else {
            return Err(ScheduleError::ProfileFailed {
                profile: self.profile_names.get(primary).cloned().unwrap_or_default(),
            });
        };

        let mut matched = 0;
        if let (Some(p), Some(first)) = (&self.prefix, run.endpoints.first()) {
            matched = match run.primary_prefix_match {
                Some(m) => m,
                None => {
                    let mut out = Vec::new();
                    p.index.match_prefix(
                        &hashes,
                        std::iter::once(first.endpoint.name.as_str()),
                        &mut out,
                    );
                    out.first().copied().unwrap_or(0)
                }
            };
            p.index
                .record(&hashes, &first.endpoint.name, p.capacity_hint(first));
            let chars = prefix::AVERAGE_CHARS_PER_TOKEN * block_tokens;
            self.metrics.hit_bytes.observe((matched * chars) as f64);
            if !hashes.is_empty() {
                self.metrics
                    .hit_ratio
                    .observe(matched as f64 / hashes.len() as f64);
            }
        }
        let prompt_tokens = plugins::predicted_ttft::prompt_tokens(req.prompt);
        let cached = (matched as u64).saturating_mul(block_tokens as u64);
        Ok(ScheduleResult {
            prefill_tokens: prompt_tokens.saturating_sub(cached),
            endpoints: run.endpoints,
            profile: self.profile_names.get(primary).cloned().unwrap_or_default(),
            prefix_matched_blocks: matched,
            prefix_total_blocks: hashes.len(),
            scores: run.scores,
        })
    }

    /// Appends a filter built in code (no filter plugin types are configurable yet) to the
    /// named profile. Returns false when there is no such profile.
    pub fn push_filter(&mut self, profile: &str, filter: Arc<dyn Filter>) -> bool {
        let hist = self
            .metrics
            .plugin(EP_FILTER, filter.plugin_type(), filter.name());
        match self.profiles.iter_mut().find(|p| p.name == profile) {
            Some(p) => {
                p.filters.push((filter, hist));
                true
            }
            None => false,
        }
    }

    /// Forget everything about an endpoint that left the pool.
    pub fn remove_endpoint(&self, name: &str) {
        if let Some(p) = &self.prefix {
            p.index.remove_endpoint(name);
        }
    }

    /// Forgets every endpoint for which `live` is false (periodic sync with the pool).
    pub fn retain_endpoints(&self, live: impl Fn(&str) -> bool) {
        if let Some(p) = &self.prefix {
            for name in p.index.endpoints() {
                if !live(&name) {
                    p.index.remove_endpoint(&name);
                }
            }
        }
    }

    /// Prefix-cache scorer's own view, for tests/metrics: matched blocks per candidate.
    pub fn prefix_match(
        &self,
        req: &SchedulingRequest<'_>,
        candidates: &[Arc<EndpointSnapshot>],
    ) -> Vec<usize> {
        let mut out = vec![0; candidates.len()];
        if let Some(p) = &self.prefix {
            let mut hashes = Vec::new();
            p.hash(req, candidates, &mut hashes);
            p.index.match_prefix(
                &hashes,
                candidates.iter().map(|c| c.endpoint.name.as_str()),
                &mut out,
            );
        }
        out
    }

    /// The shared prefix index, when a prefix plugin is configured.
    pub fn prefix_index(&self) -> Option<&Arc<PrefixIndex>> {
        self.prefix.as_ref().map(|p| &p.index)
    }
}

#[cfg(test)]
mod tests;
