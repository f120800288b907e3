//! The plugin registry: every `plugins[].type` Switchyard accepts, how its `parameters` decode
//! and validate, and the instance it becomes.
//!
//! Adding a plugin type is a change to this file only: a [`PluginKind`] variant, its arm in
//! [`decode`] (type name → validated parameters) and, enforced by the compiler, its arms in
//! [`PluginKind::type_name`] and [`PluginKind::instantiate`]. Resolution (`resolve.rs`) only
//! sees the built [`Instance`]s and the few kinds it wires outside scheduling.

use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::epp::endpoint::EngineType;
use crate::epp::flowcontrol::usage::HoldbackParams;
use crate::epp::kvcache::{self, PreciseHandle};
use crate::epp::prefix::PrefixCacheParams;
use crate::epp::saturation::{ConcurrencyConfig, SaturationConfig};
use crate::epp::scheduling::plugins::conformance::HeaderBasedTestingFilter;
use crate::epp::scheduling::plugins::freshness::{ScrapeFreshnessFilter, DEFAULT_STALENESS};
use crate::epp::scheduling::plugins::load::{
    ActiveRequestParams, ActiveRequestScorer, LoadAwareScorer, TokenLoadScorer,
    DEFAULT_LOAD_AWARE_THRESHOLD, DEFAULT_QUEUE_THRESHOLD_TOKENS,
};
use crate::epp::scheduling::plugins::pickers::{
    MaxScorePicker, RandomPicker, WeightedRandomPicker,
};
use crate::epp::scheduling::plugins::predicted_ttft::{PredictedTtftParams, PredictedTtftScorer};
use crate::epp::scheduling::plugins::prefix_affinity::{
    PrefixAffinityParams, PrefixCacheAffinityFilter,
};
use crate::epp::scheduling::plugins::profile::SingleProfileHandler;
use crate::epp::scheduling::plugins::scorers::{
    KvCacheUtilizationScorer, LoraAffinityScorer, PrefixCacheScorer, QueueScorer,
    RunningRequestsScorer,
};
use crate::epp::scheduling::plugins::session_affinity::{
    self, SessionAffinity, Strategy as SessionStrategy,
};
use crate::epp::scheduling::plugins::{Filter, Picker, ProfileHandler, RequestHook, Scorer};
use crate::epp::scrape::{MetricsExtractorConfig, MetricsSourceConfig};

/// `maxNumOfEndpoints` of a picker (≤ 0 in the config means the default, 1, as in the reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PickerParams {
    pub max_num_of_endpoints: usize,
}

impl Default for PickerParams {
    fn default() -> Self {
        PickerParams {
            max_num_of_endpoints: 1,
        }
    }
}

/// A configured plugin's type and validated parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum PluginKind {
    QueueScorer,
    RunningRequestsSizeScorer,
    KvCacheUtilizationScorer,
    LoraAffinityScorer,
    PrefixCacheScorer(PrefixCacheParams),
    MaxScorePicker(PickerParams),
    RandomPicker(PickerParams),
    WeightedRandomPicker(PickerParams),
    SingleProfileHandler,
    ApproxPrefixCacheProducer(PrefixCacheParams),
    UtilizationDetector(SaturationConfig),
    /// llm-d-router's in-flight saturation detector (`requests` mode).
    ConcurrencyDetector(ConcurrencyConfig),
    MetricsDataSource(MetricsSourceConfig),
    CoreMetricsExtractor(MetricsExtractorConfig),
    OpenAiParser,
    PredictedTtftScorer(PredictedTtftParams),
    /// `metricsStalenessThreshold`.
    ScrapeFreshnessFilter(Duration),
    // llm-d-router types.
    SessionAffinityScorer(SessionStrategy),
    SessionAffinityFilter(SessionStrategy),
    ActiveRequestScorer(ActiveRequestParams),
    /// `queueThresholdTokens`.
    TokenLoadScorer(u64),
    /// `threshold`.
    LoadAwareScorer(u32),
    /// Accepted without effect: Switchyard's in-flight accounting produces what it would.
    InflightLoadProducer,
    PrefixCacheAffinityFilter(PrefixAffinityParams),
    HeaderBasedTestingFilter,
    /// Writes the served endpoint into `x-conformance-test-served-endpoint` (response side).
    DestinationEndpointServedVerifier,
    /// Flow-control policies, referenced from `flowControl` bands.
    GlobalStrictFairnessPolicy,
    RoundRobinFairnessPolicy,
    FcfsOrderingPolicy,
    /// Usage-limit policy, referenced from `flowControl.usageLimitPolicyPluginRef`.
    PriorityHoldbackPolicy(HoldbackParams),
    /// Scores by the blocks endpoints report in KV-cache events (`epp::kvcache`).
    PrecisePrefixCacheScorer(PreciseHandle),
}

/// What a plugin instance is to the scheduler.
#[derive(Debug, Clone)]
pub enum Instance {
    Filter(Arc<dyn Filter>),
    Scorer(Arc<dyn Scorer>),
    Picker(Arc<dyn Picker>),
    ProfileHandler(Arc<dyn ProfileHandler>),
    /// Used outside scheduling (data layer, saturation, parsing, the prefix producer); its
    /// parameters are read from the [`PluginKind`] by resolution. Ignored in profiles.
    Other,
}

impl PluginKind {
    /// The config `type` string.
    pub fn type_name(&self) -> &'static str {
        match self {
            PluginKind::QueueScorer => "queue-scorer",
            PluginKind::RunningRequestsSizeScorer => "running-requests-size-scorer",
            PluginKind::KvCacheUtilizationScorer => "kv-cache-utilization-scorer",
            PluginKind::LoraAffinityScorer => "lora-affinity-scorer",
            PluginKind::PrefixCacheScorer(_) => "prefix-cache-scorer",
            PluginKind::MaxScorePicker(_) => "max-score-picker",
            PluginKind::RandomPicker(_) => "random-picker",
            PluginKind::WeightedRandomPicker(_) => "weighted-random-picker",
            PluginKind::SingleProfileHandler => "single-profile-handler",
            PluginKind::ApproxPrefixCacheProducer(_) => "approx-prefix-cache-producer",
            PluginKind::UtilizationDetector(_) => "utilization-detector",
            PluginKind::ConcurrencyDetector(_) => "concurrency-detector",
            PluginKind::PriorityHoldbackPolicy(_) => "priority-holdback-policy",
            PluginKind::MetricsDataSource(_) => "metrics-data-source",
            PluginKind::CoreMetricsExtractor(_) => "core-metrics-extractor",
            PluginKind::OpenAiParser => "openai-parser",
            PluginKind::PredictedTtftScorer(_) => "predicted-ttft-scorer",
            PluginKind::ScrapeFreshnessFilter(_) => "scrape-freshness-filter",
            PluginKind::SessionAffinityScorer(_) => "session-affinity-scorer",
            PluginKind::SessionAffinityFilter(_) => "session-affinity-filter",
            PluginKind::ActiveRequestScorer(_) => "active-request-scorer",
            PluginKind::TokenLoadScorer(_) => "token-load-scorer",
            PluginKind::LoadAwareScorer(_) => "load-aware-scorer",
            PluginKind::InflightLoadProducer => "inflight-load-producer",
            PluginKind::PrefixCacheAffinityFilter(_) => "prefix-cache-affinity-filter",
            PluginKind::HeaderBasedTestingFilter => "header-based-testing-filter",
            PluginKind::DestinationEndpointServedVerifier => "destination-endpoint-served-verifier",
            PluginKind::GlobalStrictFairnessPolicy => "global-strict-fairness-policy",
            PluginKind::RoundRobinFairnessPolicy => "round-robin-fairness-policy",
            PluginKind::FcfsOrderingPolicy => "fcfs-ordering-policy",
            PluginKind::PrecisePrefixCacheScorer(_) => "precise-prefix-cache-scorer",
        }
    }

    /// Builds the instance named `name`, and its request hook when it has one.
    pub fn instantiate(&self, name: &str) -> (Instance, Option<Arc<dyn RequestHook>>) {
        match self {
            PluginKind::SessionAffinityScorer(strategy) => {
                let s = SessionAffinity::scorer(name.to_string(), strategy.clone());
                (Instance::Scorer(s.clone()), Some(s))
            }
            PluginKind::SessionAffinityFilter(strategy) => {
                let f = SessionAffinity::filter(name.to_string(), strategy.clone());
                (Instance::Filter(f.clone()), Some(f))
            }
            // With speculative indexing the scorer also credits the primary after the decision.
            PluginKind::PrecisePrefixCacheScorer(p) if p.0.params.speculative_ttl.is_some() => {
                let s = Arc::new(kvcache::scorer::PrecisePrefixScorer {
                    name: name.to_string(),
                    precise: Arc::clone(&p.0),
                });
                (Instance::Scorer(s.clone()), Some(s))
            }
            other => (other.instance(name.to_string()), None),
        }
    }

    fn instance(&self, name: String) -> Instance {
        match self {
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
            PluginKind::PrefixCacheScorer(_) => {
                Instance::Scorer(Arc::new(PrefixCacheScorer { name }))
            }
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
                Instance::ProfileHandler(Arc::new(SingleProfileHandler { name }))
            }
            PluginKind::PredictedTtftScorer(params) => {
                Instance::Scorer(Arc::new(PredictedTtftScorer {
                    name,
                    params: *params,
                }))
            }
            PluginKind::ScrapeFreshnessFilter(staleness) => {
                Instance::Filter(Arc::new(ScrapeFreshnessFilter {
                    name,
                    staleness: *staleness,
                }))
            }
            PluginKind::PrecisePrefixCacheScorer(p) => {
                Instance::Scorer(Arc::new(kvcache::scorer::PrecisePrefixScorer {
                    name,
                    precise: Arc::clone(&p.0),
                }))
            }
            PluginKind::ActiveRequestScorer(params) => {
                Instance::Scorer(Arc::new(ActiveRequestScorer {
                    name,
                    params: *params,
                }))
            }
            PluginKind::TokenLoadScorer(threshold) => Instance::Scorer(Arc::new(TokenLoadScorer {
                name,
                queue_threshold_tokens: *threshold,
            })),
            PluginKind::LoadAwareScorer(threshold) => Instance::Scorer(Arc::new(LoadAwareScorer {
                name,
                threshold: *threshold,
            })),
            PluginKind::HeaderBasedTestingFilter => {
                Instance::Filter(Arc::new(HeaderBasedTestingFilter { name }))
            }
            PluginKind::PrefixCacheAffinityFilter(params) => {
                Instance::Filter(Arc::new(PrefixCacheAffinityFilter {
                    name,
                    params: *params,
                }))
            }
            // Built with their hooks in `instantiate`.
            PluginKind::SessionAffinityScorer(_) | PluginKind::SessionAffinityFilter(_) => {
                Instance::Other
            }
            PluginKind::InflightLoadProducer
            | PluginKind::DestinationEndpointServedVerifier
            | PluginKind::ApproxPrefixCacheProducer(_)
            | PluginKind::UtilizationDetector(_)
            | PluginKind::ConcurrencyDetector(_)
            | PluginKind::PriorityHoldbackPolicy(_)
            | PluginKind::MetricsDataSource(_)
            | PluginKind::CoreMetricsExtractor(_)
            | PluginKind::OpenAiParser
            | PluginKind::GlobalStrictFairnessPolicy
            | PluginKind::RoundRobinFairnessPolicy
            | PluginKind::FcfsOrderingPolicy => Instance::Other,
        }
    }
}

/// Why a plugin `type` was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypeError {
    #[error("plugin is missing a type")]
    Missing,
    #[error("plugin type '{0}' is not supported by switchyard: {1}")]
    Unsupported(String, &'static str),
    #[error("plugin type '{0}' is not registered")]
    Unregistered(String),
}

/// Checks that `type_name` is registered, before its parameters are read.
pub fn check_type(type_name: &str) -> Result<(), TypeError> {
    type Probe = de::value::UnitDeserializer<de::value::Error>;
    match decode::<Probe>(type_name, None) {
        // An error without parameters: registered, with a required parameter
        // (`priority-holdback-policy`'s `minCeiling`), reported when the entry is read.
        Ok(Some(_)) | Err(_) => Ok(()),
        _ if type_name.is_empty() => Err(TypeError::Missing),
        _ => match super::upstream::unsupported_reason(type_name) {
            Some(reason) => Err(TypeError::Unsupported(type_name.to_string(), reason)),
            None => Err(TypeError::Unregistered(type_name.to_string())),
        },
    }
}

/// The registry proper: decodes and validates `parameters` (`None` when absent) for the plugin
/// type `type_name`; `Ok(None)` when the type is not registered. Errors carry serde_yaml's
/// location of the offending value.
pub fn decode<'de, D: Deserializer<'de>>(
    type_name: &str,
    params: Option<D>,
) -> Result<Option<PluginKind>, D::Error> {
    let custom = de::Error::custom;
    Ok(Some(match type_name {
        "queue-scorer" => none(params, PluginKind::QueueScorer)?,
        "running-requests-size-scorer" => none(params, PluginKind::RunningRequestsSizeScorer)?,
        "kv-cache-utilization-scorer" => none(params, PluginKind::KvCacheUtilizationScorer)?,
        "lora-affinity-scorer" => none(params, PluginKind::LoraAffinityScorer)?,
        "single-profile-handler" => none(params, PluginKind::SingleProfileHandler)?,
        "openai-parser" => none(params, PluginKind::OpenAiParser)?,
        "global-strict-fairness-policy" => none(params, PluginKind::GlobalStrictFairnessPolicy)?,
        "round-robin-fairness-policy" => none(params, PluginKind::RoundRobinFairnessPolicy)?,
        "fcfs-ordering-policy" => none(params, PluginKind::FcfsOrderingPolicy)?,
        "prefix-cache-scorer" => PluginKind::PrefixCacheScorer(
            wire::<WirePrefixParams, D>(params)?
                .validate()
                .map_err(custom)?,
        ),
        "approx-prefix-cache-producer" => PluginKind::ApproxPrefixCacheProducer(
            wire::<WirePrefixParams, D>(params)?
                .validate()
                .map_err(custom)?,
        ),
        "max-score-picker" => {
            PluginKind::MaxScorePicker(wire::<WirePickerParams, D>(params)?.validate())
        }
        "random-picker" => {
            PluginKind::RandomPicker(wire::<WirePickerParams, D>(params)?.validate())
        }
        "weighted-random-picker" => {
            PluginKind::WeightedRandomPicker(wire::<WirePickerParams, D>(params)?.validate())
        }
        "utilization-detector" => PluginKind::UtilizationDetector(
            wire::<WireUtilizationParams, D>(params)?
                .validate()
                .map_err(custom)?,
        ),
        "concurrency-detector" => PluginKind::ConcurrencyDetector(
            wire::<super::flow_plugins::WireConcurrencyParams, D>(params)?
                .validate()
                .map_err(de::Error::custom)?,
        ),
        "priority-holdback-policy" => PluginKind::PriorityHoldbackPolicy(
            wire::<super::flow_plugins::WireHoldbackParams, D>(params)?
                .validate()
                .map_err(de::Error::custom)?,
        ),
        "metrics-data-source" => PluginKind::MetricsDataSource(
            wire::<WireSourceParams, D>(params)?
                .validate()
                .map_err(custom)?,
        ),
        "core-metrics-extractor" => PluginKind::CoreMetricsExtractor(
            wire::<WireExtractorParams, D>(params)?
                .validate()
                .map_err(custom)?,
        ),
        "predicted-ttft-scorer" => PluginKind::PredictedTtftScorer(
            wire::<WirePredictedTtftParams, D>(params)?
                .validate()
                .map_err(custom)?,
        ),
        "scrape-freshness-filter" => PluginKind::ScrapeFreshnessFilter(
            wire::<WireFreshnessParams, D>(params)?
                .validate()
                .map_err(custom)?,
        ),
        "session-affinity-scorer" => PluginKind::SessionAffinityScorer(
            wire::<WireSessionParams, D>(params)?
                .validate()
                .map_err(custom)?,
        ),
        "session-affinity-filter" => PluginKind::SessionAffinityFilter(
            wire::<WireSessionParams, D>(params)?
                .validate()
                .map_err(custom)?,
        ),
        "active-request-scorer" => {
            PluginKind::ActiveRequestScorer(wire::<WireActiveRequestParams, D>(params)?.validate())
        }
        "token-load-scorer" => {
            let p = wire::<WireTokenLoadParams, D>(params)?;
            // Upstream replaces a value <= 0 by the default instead of failing.
            PluginKind::TokenLoadScorer(match p.queue_threshold_tokens {
                Some(n) if n > 0 => n as u64,
                _ => DEFAULT_QUEUE_THRESHOLD_TOKENS,
            })
        }
        "load-aware-scorer" => {
            let p = wire::<WireLoadAwareParams, D>(params)?;
            PluginKind::LoadAwareScorer(match p.threshold {
                Some(n) if n > 0 => u32::try_from(n).unwrap_or(u32::MAX),
                _ => DEFAULT_LOAD_AWARE_THRESHOLD,
            })
        }
        "inflight-load-producer" => {
            if wire::<WireInflightParams, D>(params)?.add_estimated_output_tokens == Some(true) {
                return Err(custom(ParamError::EstimatedOutputTokens));
            }
            PluginKind::InflightLoadProducer
        }
        "header-based-testing-filter" => none(params, PluginKind::HeaderBasedTestingFilter)?,
        "prefix-cache-affinity-filter" => PluginKind::PrefixCacheAffinityFilter(
            wire::<WirePrefixAffinityParams, D>(params)?
                .validate()
                .map_err(custom)?,
        ),
        "destination-endpoint-served-verifier" => {
            none(params, PluginKind::DestinationEndpointServedVerifier)?
        }
        "precise-prefix-cache-scorer" => {
            let params = wire::<kvcache::WirePreciseParams, D>(params)?
                .validate()
                .map_err(de::Error::custom)?;
            PluginKind::PrecisePrefixCacheScorer(PreciseHandle(Arc::new(
                kvcache::Precise::new(params).map_err(de::Error::custom)?,
            )))
        }
        _ => return Ok(None),
    }))
}

/// A parameterless type: any key in `parameters` is an error.
fn none<'de, D: Deserializer<'de>>(
    params: Option<D>,
    kind: PluginKind,
) -> Result<PluginKind, D::Error> {
    wire::<NoParams, D>(params)?;
    Ok(kind)
}

/// Decodes `parameters` as written (all keys optional); absent or `null` is all defaults.
fn wire<'de, W: Deserialize<'de> + Default, D: Deserializer<'de>>(
    params: Option<D>,
) -> Result<W, D::Error> {
    match params {
        Some(d) => Ok(Option::<W>::deserialize(d)?.unwrap_or_default()),
        None => Ok(W::default()),
    }
}

/// Why a plugin's parameters were rejected (each names the offending key).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    #[error(
        "blockSize ({0}) is deprecated; use blockSizeTokens to set the cache block size in tokens"
    )]
    DeprecatedBlockSize(i64),
    #[error("blockSizeTokens must be > 0 when autoTune is disabled, got {0}")]
    BlockSizeTokens(i64),
    #[error("lruCapacityPerServer must be > 0, got {0}")]
    LruCapacity(i64),
    #[error("{key} must be >= 0, got {value}")]
    Negative { key: &'static str, value: i64 },
    #[error("queueDepthThreshold must be strictly positive, got {0}")]
    QueueDepthThreshold(i64),
    #[error("kvCacheUtilThreshold must be in (0.0, 1.0], got {0}")]
    KvCacheUtilThreshold(f64),
    #[error("metricsStalenessThreshold: {0}")]
    StalenessSyntax(String),
    #[error("metricsStalenessThreshold must be strictly positive, got 0s")]
    StalenessZero,
    #[error("headroom must be a non-negative value, got {0}")]
    Headroom(f64),
    #[error("scheme must be 'http' or 'https', got '{0}'")]
    Scheme(String),
    #[error("scheme 'https' is not supported by switchyard (metrics are scraped over plain HTTP)")]
    HttpsScheme,
    #[error("{0} is not supported by switchyard (metrics are scraped over plain HTTP)")]
    TlsSource(&'static str),
    #[error("interval {given:?}: {reason}")]
    SourceInterval { given: String, reason: String },
    #[error("path must start with '/' and contain no spaces, got '{0}'")]
    Path(String),
    #[error("engineConfigs is not supported by switchyard (engine metric specs are built in)")]
    EngineConfigs,
    #[error("defaultEngine: {0}")]
    DefaultEngine(String),
    #[error("initialPrefillTokensPerSecond must be a finite number > 0, got {0}")]
    PrefillRate(f64),
    #[error("loadBoundFactor must be a finite number >= 1, got {0}")]
    LoadBoundFactor(f64),
    #[error("metricsStalenessThreshold {given:?}: {reason}")]
    FreshnessSyntax { given: String, reason: String },
    #[error("metricsStalenessThreshold must be > 0")]
    FreshnessZero,
    #[error("strategy must be \"encoded_endpoint_header\" or \"session_id\", got {0:?}")]
    SessionStrategy(String),
    #[error("profileName {0:?}: per-profile session affinity is for P/D disaggregation, which switchyard does not implement")]
    SessionProfileName(String),
    #[error("sessionIdConfig.sources[{0}]: exactly one of header or attribute must be set")]
    SessionSource(usize),
    #[error("sessionIdConfig.sources[{0}]: attribute/producer {1:?} is not supported by switchyard (request attributes are not modelled); use header")]
    SessionAttribute(usize, String),
    #[error("sessionIdConfig.{key} must be > 0, got {value}")]
    SessionSeconds { key: &'static str, value: f64 },
    #[error("{key} must be {range}, got {value}")]
    AffinityRange {
        key: &'static str,
        range: &'static str,
        value: f64,
    },
    #[error("ttftSource \"latencyPredictor\" is not supported by switchyard (no latency-predictor sidecar); use prefillThroughput")]
    TtftSourcePredictor,
    #[error("ttftSource must be \"prefillThroughput\" or \"latencyPredictor\", got {0:?}")]
    TtftSource(String),
    #[error("peakPrefillThroughput must be > 0 when ttftSource is prefillThroughput")]
    PeakThroughputZero,
    #[error("addEstimatedOutputTokens is not supported by switchyard (in-flight tokens are the uncached prompt tokens until the first response bytes)")]
    EstimatedOutputTokens,
}

/// Rejects any key in a parameterless plugin's `parameters`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WirePrefixParams {
    auto_tune: Option<bool>,
    block_size_tokens: Option<i64>,
    block_size: Option<i64>,
    max_prefix_blocks_to_match: Option<i64>,
    max_prefix_tokens_to_match: Option<i64>,
    lru_capacity_per_server: Option<i64>,
}

fn non_negative(key: &'static str, value: i64) -> Result<usize, ParamError> {
    usize::try_from(value).map_err(|_| ParamError::Negative { key, value })
}

impl WirePrefixParams {
    fn validate(self) -> Result<PrefixCacheParams, ParamError> {
        let d = PrefixCacheParams::default();
        let auto_tune = self.auto_tune.unwrap_or(d.auto_tune);
        let block_size_tokens = self.block_size_tokens.unwrap_or(d.block_size_tokens as i64);
        if self.block_size.unwrap_or(0) > 0 && block_size_tokens <= 0 {
            return Err(ParamError::DeprecatedBlockSize(
                self.block_size.unwrap_or(0),
            ));
        }
        if !auto_tune && block_size_tokens <= 0 {
            return Err(ParamError::BlockSizeTokens(block_size_tokens));
        }
        let lru = self
            .lru_capacity_per_server
            .unwrap_or(d.lru_capacity_per_server as i64);
        if lru <= 0 {
            return Err(ParamError::LruCapacity(lru));
        }
        Ok(PrefixCacheParams {
            auto_tune,
            block_size_tokens: non_negative("blockSizeTokens", block_size_tokens)?,
            max_prefix_blocks_to_match: non_negative(
                "maxPrefixBlocksToMatch",
                self.max_prefix_blocks_to_match
                    .unwrap_or(d.max_prefix_blocks_to_match as i64),
            )?,
            max_prefix_tokens_to_match: non_negative(
                "maxPrefixTokensToMatch",
                self.max_prefix_tokens_to_match.unwrap_or(0),
            )?,
            lru_capacity_per_server: non_negative("lruCapacityPerServer", lru)?,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WirePickerParams {
    max_num_of_endpoints: Option<i64>,
}

impl WirePickerParams {
    fn validate(self) -> PickerParams {
        // The reference falls back to the default for values <= 0 instead of failing.
        match self.max_num_of_endpoints {
            Some(n) if n > 0 => PickerParams {
                max_num_of_endpoints: usize::try_from(n).unwrap_or(usize::MAX),
            },
            _ => PickerParams::default(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct WireUtilizationParams {
    queue_depth_threshold: Option<i64>,
    kv_cache_util_threshold: Option<f64>,
    metrics_staleness_threshold: Option<String>,
    headroom: Option<f64>,
}

impl WireUtilizationParams {
    /// The reference's `utilization-detector` ranges (GIE `saturationdetector/utilization/config.go`).
    pub(super) fn validate(self) -> Result<SaturationConfig, ParamError> {
        let d = SaturationConfig::default();
        let q = self
            .queue_depth_threshold
            .unwrap_or(i64::from(d.queue_depth_threshold));
        let queue_depth_threshold = u32::try_from(q)
            .ok()
            .filter(|&q| q > 0)
            .ok_or(ParamError::QueueDepthThreshold(q))?;
        let kv = self
            .kv_cache_util_threshold
            .unwrap_or(d.kv_cache_util_threshold);
        // Written as a negated range check so NaN is rejected too.
        if !(kv > 0.0 && kv <= 1.0) {
            return Err(ParamError::KvCacheUtilThreshold(kv));
        }
        let staleness: Duration = match self.metrics_staleness_threshold {
            Some(s) => crate::flagfmt::parse_go_duration(&s)
                .map_err(|e| ParamError::StalenessSyntax(e.to_string()))?,
            None => d.metrics_staleness_threshold,
        };
        if staleness.is_zero() {
            return Err(ParamError::StalenessZero);
        }
        let headroom = self.headroom.unwrap_or(d.headroom);
        if !(headroom >= 0.0 && headroom.is_finite()) {
            return Err(ParamError::Headroom(headroom));
        }
        Ok(SaturationConfig {
            queue_depth_threshold,
            kv_cache_util_threshold: kv,
            metrics_staleness_threshold: staleness,
            headroom,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireSourceParams {
    scheme: Option<String>,
    path: Option<String>,
    insecure_skip_verify: Option<bool>,
    /// llm-d-router v0.10 fields.
    interval: Option<String>,
    ca_cert_path: Option<String>,
    client_cert_path: Option<String>,
    client_key_path: Option<String>,
}

impl WireSourceParams {
    fn validate(self) -> Result<MetricsSourceConfig, ParamError> {
        let d = MetricsSourceConfig::default();
        let scheme = self.scheme.filter(|s| !s.is_empty()).unwrap_or(d.scheme);
        match scheme.as_str() {
            "http" => {}
            "https" => return Err(ParamError::HttpsScheme),
            _ => return Err(ParamError::Scheme(scheme)),
        }
        for (key, set) in [
            ("caCertPath", &self.ca_cert_path),
            ("clientCertPath", &self.client_cert_path),
            ("clientKeyPath", &self.client_key_path),
        ] {
            if set.as_ref().is_some_and(|v| !v.is_empty()) {
                return Err(ParamError::TlsSource(key));
            }
        }
        let path = self.path.filter(|s| !s.is_empty()).unwrap_or(d.path);
        if !path.starts_with('/') || path.contains(char::is_whitespace) {
            return Err(ParamError::Path(path));
        }
        let interval = match self.interval.filter(|s| !s.is_empty()) {
            Some(s) => {
                let v = crate::flagfmt::parse_go_duration(&s).map_err(|reason| {
                    ParamError::SourceInterval {
                        given: s.clone(),
                        reason,
                    }
                })?;
                if v.is_zero() {
                    return Err(ParamError::SourceInterval {
                        given: s,
                        reason: "must be > 0".into(),
                    });
                }
                Some(v)
            }
            None => None,
        };
        Ok(MetricsSourceConfig {
            scheme,
            path,
            insecure_skip_verify: self.insecure_skip_verify.unwrap_or(d.insecure_skip_verify),
            interval,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireExtractorParams {
    engine_label_key: Option<String>,
    default_engine: Option<String>,
    engine_configs: Option<serde_yaml::Value>,
}

impl WireExtractorParams {
    fn validate(self) -> Result<MetricsExtractorConfig, ParamError> {
        if self.engine_configs.is_some() {
            return Err(ParamError::EngineConfigs);
        }
        let d = MetricsExtractorConfig::default();
        let default_engine = match self.default_engine.as_deref() {
            None | Some("") => d.default_engine,
            Some(e) => e
                .parse::<EngineType>()
                .map_err(|e| ParamError::DefaultEngine(e.to_string()))?,
        };
        Ok(MetricsExtractorConfig {
            engine_label_key: self
                .engine_label_key
                .filter(|k| !k.is_empty())
                .unwrap_or(d.engine_label_key),
            default_engine,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WirePredictedTtftParams {
    initial_prefill_tokens_per_second: Option<f64>,
    request_overhead_tokens: Option<i64>,
    load_bound_factor: Option<f64>,
}

impl WirePredictedTtftParams {
    fn validate(self) -> Result<PredictedTtftParams, ParamError> {
        let d = PredictedTtftParams::default();
        let rate = self
            .initial_prefill_tokens_per_second
            .unwrap_or(d.initial_prefill_tokens_per_s);
        if !(rate.is_finite() && rate > 0.0) {
            return Err(ParamError::PrefillRate(rate));
        }
        let overhead = match self.request_overhead_tokens {
            Some(v) => non_negative("requestOverheadTokens", v)? as u64,
            None => d.request_overhead_tokens,
        };
        if let Some(f) = self.load_bound_factor {
            if !(f.is_finite() && f >= 1.0) {
                return Err(ParamError::LoadBoundFactor(f));
            }
        }
        Ok(PredictedTtftParams {
            initial_prefill_tokens_per_s: rate,
            request_overhead_tokens: overhead,
            load_bound_factor: self.load_bound_factor,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireFreshnessParams {
    metrics_staleness_threshold: Option<String>,
}

impl WireFreshnessParams {
    fn validate(self) -> Result<Duration, ParamError> {
        let staleness = match self.metrics_staleness_threshold {
            Some(s) => crate::flagfmt::parse_go_duration(&s).map_err(|reason| {
                ParamError::FreshnessSyntax {
                    given: s.clone(),
                    reason,
                }
            })?,
            None => DEFAULT_STALENESS,
        };
        if staleness.is_zero() {
            return Err(ParamError::FreshnessZero);
        }
        Ok(staleness)
    }
}

/// Parameters shared by `session-affinity-scorer` and `session-affinity-filter`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireSessionParams {
    strategy: Option<String>,
    profile_name: Option<String>,
    encoded_endpoint_header_config: Option<WireTokenConfig>,
    session_id_config: Option<WireSessionIdConfig>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WireTokenConfig {
    header: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireSessionIdConfig {
    sources: Option<Vec<WireSessionSource>>,
    eviction_ttl_seconds: Option<f64>,
    eviction_sweep_seconds: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WireSessionSource {
    header: Option<String>,
    attribute: Option<String>,
    producer: Option<String>,
}

/// Header names are compared lowercased (Envoy lowercases request headers).
fn header_name(name: Option<String>, default: &str) -> String {
    match name.map(|n| n.trim().to_ascii_lowercase()) {
        Some(n) if !n.is_empty() => n,
        _ => default.to_string(),
    }
}

fn seconds(key: &'static str, value: Option<f64>, default: f64) -> Result<Duration, ParamError> {
    // Upstream treats 0 as unset.
    let v = value.filter(|&v| v != 0.0).unwrap_or(default);
    if !(v.is_finite() && v > 0.0 && v <= 1e9) {
        return Err(ParamError::SessionSeconds { key, value: v });
    }
    Ok(Duration::from_secs_f64(v))
}

impl WireSessionParams {
    fn validate(self) -> Result<SessionStrategy, ParamError> {
        if let Some(p) = self.profile_name.filter(|p| !p.is_empty()) {
            return Err(ParamError::SessionProfileName(p));
        }
        match self.strategy.as_deref().unwrap_or("") {
            "" | "encoded_endpoint_header" => Ok(SessionStrategy::EncodedEndpointHeader {
                header: header_name(
                    self.encoded_endpoint_header_config.and_then(|c| c.header),
                    session_affinity::DEFAULT_TOKEN_HEADER,
                ),
            }),
            "session_id" => {
                let c = self.session_id_config.unwrap_or_default();
                let mut headers = Vec::new();
                for (i, s) in c.sources.unwrap_or_default().into_iter().enumerate() {
                    match (
                        s.header.filter(|h| !h.is_empty()),
                        s.attribute.filter(|a| !a.is_empty()),
                    ) {
                        (Some(h), None) => headers.push(header_name(Some(h), "")),
                        (None, Some(a)) => return Err(ParamError::SessionAttribute(i, a)),
                        _ => return Err(ParamError::SessionSource(i)),
                    }
                    if let Some(p) = s.producer.filter(|p| !p.is_empty()) {
                        return Err(ParamError::SessionAttribute(i, p));
                    }
                }
                if headers.is_empty() {
                    headers.push(session_affinity::DEFAULT_SESSION_ID_HEADER.to_string());
                }
                Ok(SessionStrategy::SessionId {
                    headers,
                    ttl: seconds("evictionTtlSeconds", c.eviction_ttl_seconds, 300.0)?,
                    sweep: seconds("evictionSweepSeconds", c.eviction_sweep_seconds, 10.0)?,
                })
            }
            other => Err(ParamError::SessionStrategy(other.to_string())),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireActiveRequestParams {
    idle_threshold: Option<i64>,
    max_busy_score: Option<f64>,
    /// Deprecated upstream and ignored there too.
    #[allow(dead_code)]
    request_timeout: Option<String>,
    /// Names the producer; Switchyard's accounting is the only one.
    #[allow(dead_code)]
    in_flight_load_producer_name: Option<String>,
}

impl WireActiveRequestParams {
    /// Upstream falls back to the defaults for out-of-range values instead of failing.
    fn validate(self) -> ActiveRequestParams {
        let d = ActiveRequestParams::default();
        ActiveRequestParams {
            idle_threshold: self
                .idle_threshold
                .filter(|&n| n >= 0)
                .map_or(d.idle_threshold, |n| u32::try_from(n).unwrap_or(u32::MAX)),
            max_busy_score: self
                .max_busy_score
                .filter(|s| (0.0..=1.0).contains(s))
                .unwrap_or(d.max_busy_score),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireTokenLoadParams {
    queue_threshold_tokens: Option<i64>,
    #[allow(dead_code)]
    in_flight_load_producer_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WireLoadAwareParams {
    threshold: Option<i64>,
}

/// `inflight-load-producer` parameters: accepted for compatibility. Switchyard's accounting
/// charges uncached prompt tokens until the first response bytes (upstream's default) and does
/// not add estimated output tokens.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireInflightParams {
    add_estimated_output_tokens: Option<bool>,
    #[allow(dead_code)]
    output_ratio: Option<f64>,
    #[allow(dead_code)]
    max_estimated_output_tokens: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WirePrefixAffinityParams {
    affinity_threshold: Option<f64>,
    exploration_probability: Option<f64>,
    #[serde(rename = "maxTTFTPenaltyMs")]
    max_ttft_penalty_ms: Option<f64>,
    ttft_source: Option<String>,
    peak_prefill_throughput: Option<f64>,
    // Producer names: Switchyard has one prefix index and one in-flight accounting.
    #[allow(dead_code)]
    prefix_match_info_producer_name: Option<String>,
    #[allow(dead_code)]
    latency_prediction_info_producer_name: Option<String>,
    #[allow(dead_code)]
    in_flight_load_producer_name: Option<String>,
}

impl WirePrefixAffinityParams {
    /// Upstream's `validate` (`prefixcacheaffinity/plugin.go`).
    fn validate(self) -> Result<PrefixAffinityParams, ParamError> {
        let d = PrefixAffinityParams::default();
        let p = PrefixAffinityParams {
            affinity_threshold: self.affinity_threshold.unwrap_or(d.affinity_threshold),
            exploration_probability: self
                .exploration_probability
                .unwrap_or(d.exploration_probability),
            max_ttft_penalty_ms: self.max_ttft_penalty_ms.unwrap_or(d.max_ttft_penalty_ms),
            peak_prefill_throughput: self
                .peak_prefill_throughput
                .unwrap_or(d.peak_prefill_throughput),
        };
        let range = |key, range, value: f64, ok: bool| {
            if ok && value.is_finite() {
                Ok(())
            } else {
                Err(ParamError::AffinityRange { key, range, value })
            }
        };
        range(
            "affinityThreshold",
            "<= 1.0",
            p.affinity_threshold,
            p.affinity_threshold <= 1.0,
        )?;
        range(
            "explorationProbability",
            "in [0, 1]",
            p.exploration_probability,
            (0.0..=1.0).contains(&p.exploration_probability),
        )?;
        range(
            "maxTTFTPenaltyMs",
            ">= 0",
            p.max_ttft_penalty_ms,
            p.max_ttft_penalty_ms >= 0.0,
        )?;
        range(
            "peakPrefillThroughput",
            ">= 0",
            p.peak_prefill_throughput,
            p.peak_prefill_throughput >= 0.0,
        )?;
        match self.ttft_source.as_deref() {
            None | Some("") | Some("prefillThroughput") => {}
            Some("latencyPredictor") => return Err(ParamError::TtftSourcePredictor),
            Some(other) => return Err(ParamError::TtftSource(other.to_string())),
        }
        if p.max_ttft_penalty_ms > 0.0 && p.peak_prefill_throughput == 0.0 {
            return Err(ParamError::PeakThroughputZero);
        }
        Ok(p)
    }
}
