//! Scheduling: picks the endpoint(s) for one request by running the configured profile's
//! filters → scorers (weighted sum of clamped scores) → picker, as configured by an
//! EndpointPickerConfig (resolved into [`SchedulerConfig`] by `epp::config`).
//!
//! Ported from GIE v1.5.0 `pkg/epp/scheduling/{scheduler,scheduler_profile}.go`. Deciding is
//! separate from learning: the prompt is hashed and looked up once per request before scoring
//! (the reference's PrepareData), scorers are pure, and the director records the routed request
//! afterwards with [`PrefixCache::record`] (the reference's PreRequest).

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rand::RngCore;

use crate::epp::endpoint::EndpointSnapshot;
use crate::epp::kvcache::accuracy::engine_hit_tokens;
use crate::epp::kvcache::CachedPrediction;
use crate::epp::prefix::PrefixIndex;

pub mod plugins;
mod prefix_cache;

pub use prefix_cache::PrefixCache;

pub use crate::epp::prefix::PrefixCacheParams;
use plugins::{
    CycleState, Filter, Picker, ProfileHandler, ProfileOutcome, RequestHook, RequestScratch,
    Scored, Scorer,
};

/// The scheduling slice of the EPP configuration, resolved by `epp::config`: profiles with
/// their plugin instances already built, the profile handler, and the prefix index parameters
/// (present when any prefix plugin is configured).
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub profiles: Vec<ProfileConfig>,
    pub handler: Arc<dyn ProfileHandler>,
    pub prefix_cache: Option<PrefixCacheParams>,
    /// Plugins that learn from each decision or add response headers, in declaration order
    /// (the reference's PreRequest and ResponseHeader extension points).
    pub hooks: Vec<Arc<dyn RequestHook>>,
}

/// One scheduling profile: filters in order, weighted scorers, one picker.
#[derive(Debug, Clone)]
pub struct ProfileConfig {
    pub name: String,
    pub filters: Vec<Arc<dyn Filter>>,
    pub scorers: Vec<(Arc<dyn Scorer>, f64)>,
    pub picker: Arc<dyn Picker>,
}

/// What scheduling needs to know about one request.
#[derive(Debug, Clone, Copy, Default)]
pub struct SchedulingRequest<'a> {
    pub request_id: &'a str,
    /// Model after rewrite; LoRA affinity compares adapters to it; it seeds the prefix hashes.
    pub target_model: &'a str,
    /// Which OpenAI API the prompt is for (how `prompt` is tokenized by the precise scorer).
    pub api: crate::epp::request::ApiType,
    /// Bytes the prefix index hashes (prepared by `request.rs`).
    pub prompt: &'a [u8],
    /// Empty unless the body has `cache_salt`.
    pub cache_salt: &'a [u8],
    /// Extra endpoints wanted after the primary (`--fallback-endpoints`).
    pub fallbacks: usize,
    /// The request's headers (lowercase names, raw values) that plugins may read (session
    /// affinity, the conformance test filter).
    pub headers: &'a [(String, Vec<u8>)],
}

impl SchedulingRequest<'_> {
    /// The first value of header `name` (lowercase), if the request has it.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
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
    /// The request's prefix-block hashes and their block size (tokens), for
    /// [`PrefixCache::record`]; empty without a prefix plugin.
    pub prefix_hashes: Vec<u64>,
    pub prefix_block_tokens: usize,
    /// Total weighted score of each entry of `endpoints`.
    pub scores: Vec<f64>,
    /// Cached tokens the primary is expected to report, per index (`kvcache::accuracy`).
    pub prediction: CachedPrediction,
    /// What plugins derived from the request while deciding, for the hooks after it.
    pub scratch: RequestScratch,
}

impl ScheduleResult {
    /// The endpoint the request goes to first.
    pub fn primary(&self) -> Option<&Arc<EndpointSnapshot>> {
        self.endpoints.first()
    }
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
    handler_pick: Histogram,
    handler_process: Histogram,
}

impl Metrics {
    fn new(
        registry: &mut Registry,
        prefix: Option<&PrefixCache>,
        handler: &dyn ProfileHandler,
    ) -> Self {
        let index_size = prefix
            .map(|p| p.index().size_gauge().clone())
            .unwrap_or_default();
        let (hit_ratio, hit_bytes) = match prefix {
            Some(p) => (p.hit_ratio.clone(), p.hit_bytes.clone()),
            None => PrefixCache::empty_histograms(),
        };
        let plugin_duration =
            Family::<PluginLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        let e2e = latency_histogram();
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
            hit_ratio,
        );
        registry.register(
            "inference_extension_prefix_indexer_hit_bytes",
            "Length of the prefix match in number of bytes in the cache lookup.",
            hit_bytes,
        );
        let mut m = Metrics {
            plugin_duration,
            e2e,
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
    /// Whether a scorer reads prefix matches (then they are looked up before scoring).
    uses_prefix_matches: bool,
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
        req: &SchedulingRequest<'_>,
        prepared: &Prepared<'_>,
        candidates: &[Arc<EndpointSnapshot>],
        fallbacks: usize,
        rng: &mut dyn RngCore,
    ) -> Result<ProfileRun, ProfileFailure> {
        let filtered: Vec<Arc<EndpointSnapshot>>;
        let endpoints: &[Arc<EndpointSnapshot>] = if self.filters.is_empty() {
            candidates
        } else {
            let mut kept = candidates.to_vec();
            let mut filter_matches = Vec::new();
            for (filter, hist) in &self.filters {
                let t = Instant::now();
                match prepared.index {
                    Some(index) if filter.uses_prefix_matches() => {
                        index.match_prefix(
                            prepared.hashes,
                            kept.iter().map(|e| e.endpoint.name.as_str()),
                            &mut filter_matches,
                        );
                        filter.filter_with_prefix(
                            req,
                            &mut kept,
                            &filter_matches,
                            prepared.hashes.len(),
                        );
                    }
                    _ => filter.filter(req, &mut kept),
                }
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
        let mut matches = Vec::new();
        if self.uses_prefix_matches {
            if let Some(index) = prepared.index {
                index.match_prefix(
                    prepared.hashes,
                    endpoints.iter().map(|e| e.endpoint.name.as_str()),
                    &mut matches,
                );
            }
        }
        let cycle = CycleState {
            request: req,
            prefix_hashes: prepared.hashes,
            prefix_block_tokens: prepared.block_tokens,
            prefix_matches: &matches,
            scratch: prepared.scratch,
        };
        let mut total = vec![0.0f64; n];
        let mut buf = vec![0.0f64; n];
        for (scorer, weight, hist) in &self.scorers {
            buf.fill(0.0);
            let t = Instant::now();
            scorer.score(&cycle, endpoints, &mut buf);
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
        let primary_prefix_match = matches.get(scored[0].index).copied();
        if tracing::enabled!(tracing::Level::TRACE) {
            tracing::trace!(request_id = req.request_id, profile = %self.name,
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

/// Per-request data prepared once before the profiles run.
struct Prepared<'a> {
    hashes: &'a [u64],
    block_tokens: usize,
    index: Option<&'a PrefixIndex>,
    scratch: &'a RequestScratch,
}

/// Runs scheduling cycles for the configured profiles. Shared by all request tasks.
pub struct Scheduler {
    profiles: Vec<Profile>,
    profile_names: Vec<String>,
    handler: Arc<dyn ProfileHandler>,
    prefix: Option<Arc<PrefixCache>>,
    hooks: Vec<Arc<dyn RequestHook>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("profiles", &self.profile_names)
            .field("handler", &self.handler.name())
            .field("prefix_cache", &self.prefix)
            .finish()
    }
}

impl Scheduler {
    /// Takes the resolved scheduling slice of the configuration; registers the scheduler and
    /// prefix-index metrics.
    pub fn new(config: &SchedulerConfig, registry: &mut Registry) -> Self {
        let prefix = config
            .prefix_cache
            .map(|params| Arc::new(PrefixCache::new(params)));
        let handler = config.handler.clone();
        let metrics = Metrics::new(registry, prefix.as_deref(), handler.as_ref());
        let profiles: Vec<Profile> = config
            .profiles
            .iter()
            .map(|spec| Profile {
                name: spec.name.clone(),
                filters: spec
                    .filters
                    .iter()
                    .map(|f| {
                        let h = metrics.plugin(EP_FILTER, f.plugin_type(), f.name());
                        (f.clone(), h)
                    })
                    .collect(),
                scorers: spec
                    .scorers
                    .iter()
                    .map(|(s, weight)| {
                        let h = metrics.plugin(EP_SCORER, s.plugin_type(), s.name());
                        (s.clone(), *weight, h)
                    })
                    .collect(),
                picker: (
                    spec.picker.clone(),
                    metrics.plugin(EP_PICKER, spec.picker.plugin_type(), spec.picker.name()),
                ),
                uses_prefix_matches: spec.scorers.iter().any(|(s, _)| s.uses_prefix_matches()),
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
            hooks: config.hooks.clone(),
            metrics,
        }
    }

    /// Runs profiles → filters → scorers → picker over `candidates`. Reads shared state only:
    /// remembering where the request went ([`PrefixCache::record`]) is the caller's next step.
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
        let scratch = RequestScratch::default();
        let prepared = Prepared {
            hashes: &hashes,
            block_tokens,
            index: self.prefix.as_ref().map(|p| p.index().as_ref()),
            scratch: &scratch,
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
                match profile.run(req, &prepared, candidates, req.fallbacks, &mut rng) {
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
                // No scorer of the primary profile looked the prefix up: look up the primary.
                None => {
                    let mut out = Vec::new();
                    p.index().match_prefix(
                        &hashes,
                        std::iter::once(first.endpoint.name.as_str()),
                        &mut out,
                    );
                    out.first().copied().unwrap_or(0)
                }
            };
        }
        let prompt_tokens = plugins::predicted_ttft::prompt_tokens(req.prompt);
        let cached = (matched as u64).saturating_mul(block_tokens as u64);
        let prediction = CachedPrediction {
            approximate: self
                .prefix
                .as_ref()
                .map(|_| engine_hit_tokens(cached, prompt_tokens, block_tokens as u64)),
            precise: match (self.profiles.get(primary), run.endpoints.first()) {
                (Some(profile), Some(first)) => profile
                    .scorers
                    .iter()
                    .find_map(|(s, _, _)| s.predicted_cached_tokens(req, first, &scratch)),
                _ => None,
            },
        };
        Ok(ScheduleResult {
            prefill_tokens: prompt_tokens.saturating_sub(cached),
            endpoints: run.endpoints,
            profile: self.profile_names.get(primary).cloned().unwrap_or_default(),
            prefix_matched_blocks: matched,
            prefix_total_blocks: hashes.len(),
            prefix_hashes: hashes,
            prefix_block_tokens: block_tokens,
            scores: run.scores,
            prediction,
            scratch,
        })
    }

    /// Tells every hook where the request went (the reference's PreRequest) and collects the
    /// response headers they want set (its ResponseHeader, decided here because the primary is
    /// the endpoint the response comes from).
    pub fn after_decision(
        &self,
        req: &SchedulingRequest<'_>,
        result: &ScheduleResult,
    ) -> Vec<(String, String)> {
        let mut headers = Vec::new();
        if let Some(primary) = result.primary() {
            for hook in &self.hooks {
                hook.pre_request(req, primary, &result.scratch);
                hook.response_headers(req, primary, &mut headers);
            }
        }
        headers
    }

    /// Forget everything about an endpoint that left the pool.
    pub fn remove_endpoint(&self, name: &str) {
        if let Some(p) = &self.prefix {
            p.index().remove_endpoint(name);
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
            p.index().match_prefix(
                &hashes,
                candidates.iter().map(|c| c.endpoint.name.as_str()),
                &mut out,
            );
        }
        out
    }

    /// The shared prefix index, when a prefix plugin is configured.
    pub fn prefix_index(&self) -> Option<&Arc<PrefixIndex>> {
        self.prefix.as_ref().map(|p| p.index())
    }

    /// The prefix cache, when a prefix plugin is configured: the director records each routed
    /// request in it.
    pub fn prefix_cache(&self) -> Option<&Arc<PrefixCache>> {
        self.prefix.as_ref()
    }
}

#[cfg(test)]
mod tests;
