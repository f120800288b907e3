//! EndpointPickerConfig: strict YAML decoding, the reference's defaulting rules, and validation
//! into a [`SchedulerConfig`] (GIE v1.5.0 `apix/config/v1alpha1`, `pkg/epp/config/loader`).
//!
//! Errors name the offending key and line: structural errors come from serde_yaml with their
//! location; per-plugin errors (unknown type, bad parameter) are raised while the plugin entry is
//! decoded, so they carry its location too; cross-reference errors (undefined `pluginRef`) are
//! located by searching the text for the reference.

use std::fmt;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::plugins::freshness::DEFAULT_STALENESS;
pub use super::plugins::predicted_ttft::PredictedTtftParams;
use crate::epp::endpoint::EngineType;

pub const API_VERSION: &str = "inference.networking.x-k8s.io/v1alpha1";
pub const KIND: &str = "EndpointPickerConfig";

/// The reference Helm chart's `default-plugins.yaml` (vLLM over HTTP): prefix 3, queue 2, kv 2.
pub const DEFAULT_CONFIG: &str = r#"apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
  parameters:
    scheme: "http"
    path: "/metrics"
    insecureSkipVerify: true
- type: core-metrics-extractor
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
"#;

/// Feature gates the reference registers; others are rejected.
const FEATURE_GATE_DATA_LAYER: &str = "dataLayer";
const FEATURE_GATE_LEGACY_METRICS: &str = "enableLegacyMetrics";
const FEATURE_GATE_FLOW_CONTROL: &str = "flowControl";

/// Plugin types the reference registers that Switchyard does not implement (rejected with a
/// clearer message than "not registered").
const UNSUPPORTED_REFERENCE_TYPES: &[&str] = &[
    "token-load-scorer",
    "latency-scorer",
    "predicted-latency-scorer",
    "predicted-latency-producer",
    "latency-slo-admitter",
    "prefix-cache-affinity-filter",
    "slo-headroom-tier-filter",
    "inflight-load-producer",
    "header-based-testing-filter",
    "destination-endpoint-served-verifier",
    "k8s-notification-source",
    "endpoint-notification-source",
    "request-attribute-reporter",
    "vllmgrpc-parser",
    "passthrough-parser",
    "concurrency-detector",
    "global-strict-fairness-policy",
    "round-robin-fairness-policy",
    "fcfs-ordering-policy",
    "edf-ordering-policy",
    "slo-deadline-ordering-policy",
    "static-usage-limit-policy",
    "eviction-sheddable-filter",
    "eviction-priority-then-time-ordering",
];

/// Why a configuration was rejected. `Display` is the startup error text.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Malformed YAML, wrong shape, unknown key, unknown plugin type or bad parameter.
    #[error("invalid EndpointPickerConfig: {0}")]
    Decode(#[from] serde_yaml::Error),
    /// Well-formed but inconsistent (e.g. a profile references an undefined plugin).
    #[error("invalid EndpointPickerConfig: {message}{}", line_suffix(*.line))]
    Invalid {
        message: String,
        line: Option<usize>,
    },
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Validated configuration
// ---------------------------------------------------------------------------------------------

/// Parameters of the approximate prefix index (`prefix-cache-scorer` /
/// `approx-prefix-cache-producer`; GIE `approximateprefix/types.go`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixCacheParams {
    /// Take block size and LRU capacity from the endpoints' reported KV-cache config when known.
    pub auto_tune: bool,
    pub block_size_tokens: usize,
    pub max_prefix_blocks_to_match: usize,
    /// When > 0, overrides `max_prefix_blocks_to_match` as `this / block size`.
    pub max_prefix_tokens_to_match: usize,
    pub lru_capacity_per_server: usize,
}

impl Default for PrefixCacheParams {
    fn default() -> Self {
        PrefixCacheParams {
            auto_tune: true,
            block_size_tokens: 16,
            max_prefix_blocks_to_match: 256,
            max_prefix_tokens_to_match: 0,
            lru_capacity_per_server: 31250,
        }
    }
}

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

/// `utilization-detector` parameters (GIE `saturationdetector/utilization/config.go`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UtilizationDetectorParams {
    pub queue_depth_threshold: u32,
    pub kv_cache_util_threshold: f64,
    pub metrics_staleness_threshold: Duration,
    pub headroom: f64,
}

impl Default for UtilizationDetectorParams {
    fn default() -> Self {
        UtilizationDetectorParams {
            queue_depth_threshold: 5,
            kv_cache_util_threshold: 0.8,
            metrics_staleness_threshold: Duration::from_millis(200),
            headroom: 0.0,
        }
    }
}

/// `metrics-data-source` parameters: how model-server metrics are fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsDataSourceParams {
    /// `http` or `https`.
    pub scheme: String,
    pub path: String,
    pub insecure_skip_verify: bool,
}

impl Default for MetricsDataSourceParams {
    fn default() -> Self {
        MetricsDataSourceParams {
            scheme: "http".into(),
            path: "/metrics".into(),
            insecure_skip_verify: true,
        }
    }
}

/// `core-metrics-extractor` parameters: which engine's metric names apply to a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsExtractorParams {
    pub engine_label_key: String,
    pub default_engine: EngineType,
}

impl Default for MetricsExtractorParams {
    fn default() -> Self {
        MetricsExtractorParams {
            engine_label_key: EngineType::LABEL.into(),
            default_engine: EngineType::Vllm,
        }
    }
}

/// A configured plugin instance's type and validated parameters.
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
    UtilizationDetector(UtilizationDetectorParams),
    MetricsDataSource(MetricsDataSourceParams),
    CoreMetricsExtractor(MetricsExtractorParams),
    OpenAiParser,
    PredictedTtftScorer(PredictedTtftParams),
    /// `metricsStalenessThreshold`.
    ScrapeFreshnessFilter(Duration),
}

/// What a plugin does in a scheduling profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginRole {
    Filter,
    Scorer,
    Picker,
    ProfileHandler,
    /// Used outside scheduling (data layer, saturation, parsing); ignored in profiles.
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
            PluginKind::MetricsDataSource(_) => "metrics-data-source",
            PluginKind::CoreMetricsExtractor(_) => "core-metrics-extractor",
            PluginKind::OpenAiParser => "openai-parser",
            PluginKind::PredictedTtftScorer(_) => "predicted-ttft-scorer",
            PluginKind::ScrapeFreshnessFilter(_) => "scrape-freshness-filter",
        }
    }

    pub fn role(&self) -> PluginRole {
        match self {
            PluginKind::QueueScorer
            | PluginKind::RunningRequestsSizeScorer
            | PluginKind::KvCacheUtilizationScorer
            | PluginKind::LoraAffinityScorer
            | PluginKind::PrefixCacheScorer(_)
            | PluginKind::PredictedTtftScorer(_) => PluginRole::Scorer,
            PluginKind::ScrapeFreshnessFilter(_) => PluginRole::Filter,
            PluginKind::MaxScorePicker(_)
            | PluginKind::RandomPicker(_)
            | PluginKind::WeightedRandomPicker(_) => PluginRole::Picker,
            PluginKind::SingleProfileHandler => PluginRole::ProfileHandler,
            PluginKind::ApproxPrefixCacheProducer(_)
            | PluginKind::UtilizationDetector(_)
            | PluginKind::MetricsDataSource(_)
            | PluginKind::CoreMetricsExtractor(_)
            | PluginKind::OpenAiParser => PluginRole::Other,
        }
    }
}

/// One plugin instance: its unique name and kind.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSpec {
    pub name: String,
    pub kind: PluginKind,
}

/// A scheduling profile with its plugins resolved into slots.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileSpec {
    pub name: String,
    /// Filter plugin names, in order.
    pub filters: Vec<String>,
    /// Scorer plugin names and weights, in order.
    pub scorers: Vec<(String, f64)>,
    /// Picker plugin name.
    pub picker: String,
}

/// A validated EndpointPickerConfig with every default applied.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// All plugin instances, in declaration order, then the injected defaults.
    pub plugins: Vec<PluginSpec>,
    pub profiles: Vec<ProfileSpec>,
    /// Name of the profile handler plugin.
    pub profile_handler: String,
    /// Prefix index parameters when any prefix plugin is configured.
    pub prefix_cache: Option<PrefixCacheParams>,
    /// The saturation detector plugin's name and parameters (`utilization-detector`).
    pub saturation_detector: (String, UtilizationDetectorParams),
    /// Effective data layer: metrics source and extractor (defaults when not configured).
    pub metrics_source: MetricsDataSourceParams,
    pub metrics_extractor: MetricsExtractorParams,
    pub feature_gates: Vec<String>,
}

impl SchedulerConfig {
    pub fn plugin(&self, name: &str) -> Option<&PluginSpec> {
        self.plugins.iter().find(|p| p.name == name)
    }
}

// ---------------------------------------------------------------------------------------------
// Wire format
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireConfig {
    api_version: Option<String>,
    kind: Option<String>,
    feature_gates: Option<Vec<String>>,
    plugins: Option<Vec<WirePlugin>>,
    scheduling_profiles: Option<Vec<WireProfile>>,
    saturation_detector: Option<WireOptionalRef>,
    data_layer: Option<WireDataLayer>,
    // Only read by the reference when the flowControl gate is on, which Switchyard rejects.
    #[allow(dead_code)]
    flow_control: Option<serde_yaml::Value>,
    parser: Option<WireRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireProfile {
    #[serde(default)]
    name: String,
    #[serde(default)]
    plugins: Option<Vec<WireProfilePlugin>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireProfilePlugin {
    #[serde(default)]
    plugin_ref: String,
    #[serde(default, deserialize_with = "weight")]
    weight: Option<f64>,
}

fn weight<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let w = Option::<f64>::deserialize(d)?;
    match w {
        Some(w) if !w.is_finite() || w < 0.0 => Err(de::Error::custom(format!(
            "weight must be a finite number >= 0, got {w}"
        ))),
        _ => Ok(w),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireRef {
    plugin_ref: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireOptionalRef {
    #[serde(default)]
    plugin_ref: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireDataLayer {
    #[serde(default)]
    sources: Vec<WireSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireSource {
    plugin_ref: String,
    #[serde(default)]
    extractors: Vec<WireRef>,
}

/// A `plugins[]` entry, decoded with its parameters checked against its type.
struct WirePlugin {
    name: Option<String>,
    kind: PluginKind,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TypeTag {
    Queue,
    Running,
    KvCache,
    Lora,
    Prefix,
    MaxScore,
    Random,
    WeightedRandom,
    SingleProfile,
    ApproxPrefix,
    Utilization,
    MetricsSource,
    MetricsExtractor,
    OpenAiParser,
    PredictedTtft,
    Freshness,
}

impl TypeTag {
    fn parse(s: &str) -> Result<TypeTag, String> {
        Ok(match s {
            "queue-scorer" => TypeTag::Queue,
            "running-requests-size-scorer" => TypeTag::Running,
            "kv-cache-utilization-scorer" => TypeTag::KvCache,
            "lora-affinity-scorer" => TypeTag::Lora,
            "prefix-cache-scorer" => TypeTag::Prefix,
            "max-score-picker" => TypeTag::MaxScore,
            "random-picker" => TypeTag::Random,
            "weighted-random-picker" => TypeTag::WeightedRandom,
            "single-profile-handler" => TypeTag::SingleProfile,
            "approx-prefix-cache-producer" => TypeTag::ApproxPrefix,
            "utilization-detector" => TypeTag::Utilization,
            "metrics-data-source" => TypeTag::MetricsSource,
            "core-metrics-extractor" => TypeTag::MetricsExtractor,
            "openai-parser" => TypeTag::OpenAiParser,
            "predicted-ttft-scorer" => TypeTag::PredictedTtft,
            "scrape-freshness-filter" => TypeTag::Freshness,
            "" => return Err("plugin is missing a type".into()),
            other if UNSUPPORTED_REFERENCE_TYPES.contains(&other) => {
                return Err(format!(
                    "plugin type '{other}' is not supported by switchyard"
                ))
            }
            other => return Err(format!("plugin type '{other}' is not registered")),
        })
    }
}

/// Rejects any key in a parameterless plugin's `parameters`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WirePrefixParams {
    auto_tune: Option<bool>,
    block_size_tokens: Option<i64>,
    block_size: Option<i64>,
    max_prefix_blocks_to_match: Option<i64>,
    max_prefix_tokens_to_match: Option<i64>,
    lru_capacity_per_server: Option<i64>,
}

fn non_negative(key: &str, v: i64) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("{key} must be >= 0, got {v}"))
}

impl WirePrefixParams {
    fn validate(self) -> Result<PrefixCacheParams, String> {
        let d = PrefixCacheParams::default();
        let auto_tune = self.auto_tune.unwrap_or(d.auto_tune);
        let block_size_tokens = self.block_size_tokens.unwrap_or(d.block_size_tokens as i64);
        if self.block_size.unwrap_or(0) > 0 && block_size_tokens <= 0 {
            return Err(format!(
                "blockSize ({}) is deprecated; use blockSizeTokens to set the cache block size in tokens",
                self.block_size.unwrap_or(0)
            ));
        }
        if !auto_tune && block_size_tokens <= 0 {
            return Err(format!(
                "blockSizeTokens must be > 0 when autoTune is disabled, got {block_size_tokens}"
            ));
        }
        let lru = self
            .lru_capacity_per_server
            .unwrap_or(d.lru_capacity_per_server as i64);
        if lru <= 0 {
            return Err(format!("lruCapacityPerServer must be > 0, got {lru}"));
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

#[derive(Deserialize)]
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireUtilizationParams {
    queue_depth_threshold: Option<i64>,
    kv_cache_util_threshold: Option<f64>,
    metrics_staleness_threshold: Option<String>,
    headroom: Option<f64>,
}

impl WireUtilizationParams {
    fn validate(self) -> Result<UtilizationDetectorParams, String> {
        let d = UtilizationDetectorParams::default();
        let q = self
            .queue_depth_threshold
            .unwrap_or(i64::from(d.queue_depth_threshold));
        let queue_depth_threshold = u32::try_from(q)
            .ok()
            .filter(|&q| q > 0)
            .ok_or_else(|| format!("queueDepthThreshold must be strictly positive, got {q}"))?;
        let kv = self
            .kv_cache_util_threshold
            .unwrap_or(d.kv_cache_util_threshold);
        if !(kv > 0.0 && kv <= 1.0) {
            return Err(format!(
                "kvCacheUtilThreshold must be in (0.0, 1.0], got {kv}"
            ));
        }
        let staleness = match self.metrics_staleness_threshold {
            Some(s) => crate::flagfmt::parse_go_duration(&s)
                .map_err(|e| format!("metricsStalenessThreshold: {e}"))?,
            None => d.metrics_staleness_threshold,
        };
        if staleness.is_zero() {
            return Err("metricsStalenessThreshold must be strictly positive, got 0s".into());
        }
        let headroom = self.headroom.unwrap_or(d.headroom);
        if !(headroom >= 0.0 && headroom.is_finite()) {
            return Err(format!(
                "headroom must be a non-negative value, got {headroom}"
            ));
        }
        Ok(UtilizationDetectorParams {
            queue_depth_threshold,
            kv_cache_util_threshold: kv,
            metrics_staleness_threshold: staleness,
            headroom,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireSourceParams {
    scheme: Option<String>,
    path: Option<String>,
    insecure_skip_verify: Option<bool>,
}

impl WireSourceParams {
    fn validate(self) -> Result<MetricsDataSourceParams, String> {
        let d = MetricsDataSourceParams::default();
        let scheme = self.scheme.filter(|s| !s.is_empty()).unwrap_or(d.scheme);
        if scheme != "http" && scheme != "https" {
            return Err(format!("scheme must be 'http' or 'https', got '{scheme}'"));
        }
        let path = self.path.filter(|s| !s.is_empty()).unwrap_or(d.path);
        if !path.starts_with('/') {
            return Err(format!("path must start with '/', got '{path}'"));
        }
        Ok(MetricsDataSourceParams {
            scheme,
            path,
            insecure_skip_verify: self.insecure_skip_verify.unwrap_or(d.insecure_skip_verify),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireExtractorParams {
    engine_label_key: Option<String>,
    default_engine: Option<String>,
    engine_configs: Option<serde_yaml::Value>,
}

impl WireExtractorParams {
    fn validate(self) -> Result<MetricsExtractorParams, String> {
        if self.engine_configs.is_some() {
            return Err(
                "engineConfigs is not supported by switchyard (engine metric specs are built in)"
                    .into(),
            );
        }
        let d = MetricsExtractorParams::default();
        let default_engine = match self.default_engine.as_deref() {
            None | Some("") => d.default_engine,
            Some(e) => e.parse().map_err(|e| format!("defaultEngine: {e}"))?,
        };
        Ok(MetricsExtractorParams {
            engine_label_key: self
                .engine_label_key
                .filter(|k| !k.is_empty())
                .unwrap_or(d.engine_label_key),
            default_engine,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WirePredictedTtftParams {
    initial_prefill_tokens_per_second: Option<f64>,
    request_overhead_tokens: Option<i64>,
}

impl WirePredictedTtftParams {
    fn validate(self) -> Result<PredictedTtftParams, String> {
        let d = PredictedTtftParams::default();
        let rate = self
            .initial_prefill_tokens_per_second
            .unwrap_or(d.initial_prefill_tokens_per_s);
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!(
                "initialPrefillTokensPerSecond must be a finite number > 0, got {rate}"
            ));
        }
        let overhead = match self.request_overhead_tokens {
            Some(v) => non_negative("requestOverheadTokens", v)? as u64,
            None => d.request_overhead_tokens,
        };
        Ok(PredictedTtftParams {
            initial_prefill_tokens_per_s: rate,
            request_overhead_tokens: overhead,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireFreshnessParams {
    metrics_staleness_threshold: Option<String>,
}

impl WireFreshnessParams {
    fn validate(self) -> Result<Duration, String> {
        let staleness = match self.metrics_staleness_threshold {
            Some(s) => crate::flagfmt::parse_go_duration(&s)
                .map_err(|e| format!("metricsStalenessThreshold {s:?}: {e}"))?,
            None => DEFAULT_STALENESS,
        };
        if staleness.is_zero() {
            return Err("metricsStalenessThreshold must be > 0".into());
        }
        Ok(staleness)
    }
}

/// Decodes `parameters` for one plugin type (with serde_yaml's location on errors).
struct ParamsSeed(TypeTag);

impl<'de> DeserializeSeed<'de> for ParamsSeed {
    type Value = PluginKind;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<PluginKind, D::Error> {
        fn opt<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<T>, D::Error> {
            Option::<T>::deserialize(d)
        }
        let custom = de::Error::custom;
        Ok(match self.0 {
            TypeTag::Queue
            | TypeTag::Running
            | TypeTag::KvCache
            | TypeTag::Lora
            | TypeTag::SingleProfile
            | TypeTag::OpenAiParser => {
                opt::<NoParams, D>(d)?;
                kind_with_defaults(self.0)
            }
            TypeTag::Prefix | TypeTag::ApproxPrefix => {
                let p = match opt::<WirePrefixParams, D>(d)? {
                    Some(w) => w.validate().map_err(custom)?,
                    None => PrefixCacheParams::default(),
                };
                if self.0 == TypeTag::Prefix {
                    PluginKind::PrefixCacheScorer(p)
                } else {
                    PluginKind::ApproxPrefixCacheProducer(p)
                }
            }
            TypeTag::MaxScore | TypeTag::Random | TypeTag::WeightedRandom => {
                let p = opt::<WirePickerParams, D>(d)?
                    .map(WirePickerParams::validate)
                    .unwrap_or_default();
                match self.0 {
                    TypeTag::MaxScore => PluginKind::MaxScorePicker(p),
                    TypeTag::Random => PluginKind::RandomPicker(p),
                    _ => PluginKind::WeightedRandomPicker(p),
                }
            }
            TypeTag::Utilization => {
                PluginKind::UtilizationDetector(match opt::<WireUtilizationParams, D>(d)? {
                    Some(w) => w.validate().map_err(custom)?,
                    None => UtilizationDetectorParams::default(),
                })
            }
            TypeTag::MetricsSource => {
                PluginKind::MetricsDataSource(match opt::<WireSourceParams, D>(d)? {
                    Some(w) => w.validate().map_err(custom)?,
                    None => MetricsDataSourceParams::default(),
                })
            }
            TypeTag::MetricsExtractor => {
                PluginKind::CoreMetricsExtractor(match opt::<WireExtractorParams, D>(d)? {
                    Some(w) => w.validate().map_err(custom)?,
                    None => MetricsExtractorParams::default(),
                })
            }
            TypeTag::PredictedTtft => {
                PluginKind::PredictedTtftScorer(match opt::<WirePredictedTtftParams, D>(d)? {
                    Some(w) => w.validate().map_err(custom)?,
                    None => PredictedTtftParams::default(),
                })
            }
            TypeTag::Freshness => {
                PluginKind::ScrapeFreshnessFilter(match opt::<WireFreshnessParams, D>(d)? {
                    Some(w) => w.validate().map_err(custom)?,
                    None => DEFAULT_STALENESS,
                })
            }
        })
    }
}

fn kind_with_defaults(tag: TypeTag) -> PluginKind {
    match tag {
        TypeTag::Queue => PluginKind::QueueScorer,
        TypeTag::Running => PluginKind::RunningRequestsSizeScorer,
        TypeTag::KvCache => PluginKind::KvCacheUtilizationScorer,
        TypeTag::Lora => PluginKind::LoraAffinityScorer,
        TypeTag::Prefix => PluginKind::PrefixCacheScorer(PrefixCacheParams::default()),
        TypeTag::MaxScore => PluginKind::MaxScorePicker(PickerParams::default()),
        TypeTag::Random => PluginKind::RandomPicker(PickerParams::default()),
        TypeTag::WeightedRandom => PluginKind::WeightedRandomPicker(PickerParams::default()),
        TypeTag::SingleProfile => PluginKind::SingleProfileHandler,
        TypeTag::ApproxPrefix => {
            PluginKind::ApproxPrefixCacheProducer(PrefixCacheParams::default())
        }
        TypeTag::Utilization => PluginKind::UtilizationDetector(Default::default()),
        TypeTag::MetricsSource => PluginKind::MetricsDataSource(Default::default()),
        TypeTag::MetricsExtractor => PluginKind::CoreMetricsExtractor(Default::default()),
        TypeTag::OpenAiParser => PluginKind::OpenAiParser,
        TypeTag::PredictedTtft => PluginKind::PredictedTtftScorer(PredictedTtftParams::default()),
        TypeTag::Freshness => PluginKind::ScrapeFreshnessFilter(DEFAULT_STALENESS),
    }
}

impl<'de> Deserialize<'de> for WirePlugin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PluginVisitor;
        impl<'de> Visitor<'de> for PluginVisitor {
            type Value = WirePlugin;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a plugin with `type`, optional `name` and `parameters`")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WirePlugin, A::Error> {
                const FIELDS: &[&str] = &["name", "type", "parameters"];
                let mut name: Option<String> = None;
                let mut tag: Option<TypeTag> = None;
                let mut kind: Option<PluginKind> = None;
                // `parameters` written before `type` cannot be decoded yet; keep it as a value.
                let mut early_params: Option<serde_yaml::Value> = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "name" => name = map.next_value::<Option<String>>()?,
                        "type" => {
                            let t: String = map.next_value()?;
                            tag = Some(TypeTag::parse(&t).map_err(de::Error::custom)?);
                        }
                        "parameters" => match tag {
                            Some(t) => kind = Some(map.next_value_seed(ParamsSeed(t))?),
                            None => early_params = Some(map.next_value()?),
                        },
                        other => return Err(de::Error::unknown_field(other, FIELDS)),
                    }
                }
                let tag = tag.ok_or_else(|| de::Error::missing_field("type"))?;
                let kind = match (kind, early_params) {
                    (Some(k), _) => k,
                    (None, Some(v)) => ParamsSeed(tag)
                        .deserialize(v)
                        .map_err(|e| de::Error::custom(format!("parameters: {e}")))?,
                    (None, None) => kind_with_defaults(tag),
                };
                Ok(WirePlugin { name, kind })
            }
        }
        d.deserialize_map(PluginVisitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Loading: decode → static defaults → system defaults → validation
// ---------------------------------------------------------------------------------------------

/// Line (1-based) of the first `key: value` in `text` (flow or block style, optionally quoted).
fn line_of(text: &str, key: &str, value: &str) -> Option<usize> {
    if key.is_empty() {
        return None;
    }
    text.lines().enumerate().find_map(|(i, line)| {
        let mut rest = line;
        while let Some(pos) = rest.find(key) {
            let before = rest[..pos].chars().last();
            let after = rest[pos + key.len()..].trim_start();
            rest = &rest[pos + key.len()..];
            if !matches!(before, None | Some(' ' | '\t' | '-' | '{' | ',')) {
                continue;
            }
            let Some(v) = after.strip_prefix(':') else {
                continue;
            };
            let v = v.trim_start();
            let v = v.trim_start_matches(['"', '\'']);
            if let Some(tail) = v.strip_prefix(value) {
                let end = tail.chars().next();
                if matches!(end, None | Some('"' | '\'' | ',' | '}' | ' ' | '\t' | '#')) {
                    return Some(i + 1);
                }
            }
        }
        None
    })
}

fn invalid(text: &str, message: String, key: &str, value: &str) -> ConfigError {
    ConfigError::Invalid {
        line: line_of(text, key, value),
        message,
    }
}

/// Parses and validates an EndpointPickerConfig. Empty text means the reference default config.
pub fn parse_config(yaml: &str) -> Result<SchedulerConfig, ConfigError> {
    if yaml.trim().is_empty() {
        return parse_config(DEFAULT_CONFIG);
    }
    let wire: WireConfig = serde_yaml::from_str(yaml)?;
    build(yaml, wire)
}

fn build(text: &str, wire: WireConfig) -> Result<SchedulerConfig, ConfigError> {
    match wire.api_version.as_deref() {
        Some(API_VERSION) => {}
        Some(other) => {
            return Err(invalid(
                text,
                format!("apiVersion must be '{API_VERSION}', got '{other}'"),
                "apiVersion",
                other,
            ))
        }
        None => {
            return Err(ConfigError::Invalid {
                message: "apiVersion is missing".into(),
                line: None,
            })
        }
    }
    match wire.kind.as_deref() {
        Some(KIND) => {}
        Some(other) => {
            return Err(invalid(
                text,
                format!("kind must be '{KIND}', got '{other}'"),
                "kind",
                other,
            ))
        }
        None => {
            return Err(ConfigError::Invalid {
                message: "kind is missing".into(),
                line: None,
            })
        }
    }

    let feature_gates = wire.feature_gates.unwrap_or_default();
    for gate in &feature_gates {
        match gate.as_str() {
            FEATURE_GATE_DATA_LAYER | FEATURE_GATE_LEGACY_METRICS => {}
            FEATURE_GATE_FLOW_CONTROL => {
                return Err(ConfigError::Invalid {
                    message: format!("feature gate '{gate}' is not supported by switchyard"),
                    line: text
                        .lines()
                        .position(|l| l.contains(gate.as_str()))
                        .map(|i| i + 1),
                })
            }
            _ => {
                return Err(ConfigError::Invalid {
                    message: format!("feature gate '{gate}' is unknown or unregistered"),
                    line: text
                        .lines()
                        .position(|l| l.contains(gate.as_str()))
                        .map(|i| i + 1),
                })
            }
        }
    }

    // Static defaults: name = type; names unique.
    let mut plugins: Vec<PluginSpec> = Vec::new();
    for p in wire.plugins.unwrap_or_default() {
        let name = match p.name {
            Some(n) if !n.is_empty() => n,
            _ => p.kind.type_name().to_string(),
        };
        if plugins.iter().any(|q| q.name == name) {
            return Err(invalid(
                text,
                format!("duplicate plugin name '{name}'"),
                "name",
                &name,
            ));
        }
        plugins.push(PluginSpec { name, kind: p.kind });
    }

    // System defaults for scheduling (GIE loader/defaults.go ensureSchedulingLayer).
    let mut wire_profiles: Vec<WireProfile> = wire.scheduling_profiles.unwrap_or_default();
    if wire_profiles.is_empty() {
        // The reference fills the default profile from a map (random order); we keep
        // declaration order so the result is reproducible.
        wire_profiles.push(WireProfile {
            name: "default".into(),
            plugins: Some(
                plugins
                    .iter()
                    .filter(|p| {
                        matches!(
                            p.kind.role(),
                            PluginRole::Filter | PluginRole::Scorer | PluginRole::Picker
                        )
                    })
                    .map(|p| WireProfilePlugin {
                        plugin_ref: p.name.clone(),
                        weight: None,
                    })
                    .collect(),
            ),
        });
    }
    let handlers: Vec<&PluginSpec> = plugins
        .iter()
        .filter(|p| p.kind.role() == PluginRole::ProfileHandler)
        .collect();
    if wire_profiles.len() == 1 && handlers.is_empty() {
        add_default(&mut plugins, PluginKind::SingleProfileHandler)?;
    }
    let default_picker = match plugins.iter().find(|p| p.kind.role() == PluginRole::Picker) {
        Some(p) => p.name.clone(),
        None => add_default(
            &mut plugins,
            PluginKind::MaxScorePicker(PickerParams::default()),
        )?,
    };

    // Profiles: validate references and resolve plugins into slots.
    let mut profiles: Vec<ProfileSpec> = Vec::new();
    for (i, wp) in wire_profiles.into_iter().enumerate() {
        if wp.name.is_empty() {
            return Err(ConfigError::Invalid {
                message: format!("schedulingProfiles[{i}] is missing a name"),
                line: None,
            });
        }
        if profiles.iter().any(|p| p.name == wp.name) {
            return Err(invalid(
                text,
                format!("schedulingProfiles[{i}] has duplicate name '{}'", wp.name),
                "name",
                &wp.name,
            ));
        }
        let mut profile = ProfileSpec {
            name: wp.name.clone(),
            filters: Vec::new(),
            scorers: Vec::new(),
            picker: String::new(),
        };
        for (j, r) in wp.plugins.unwrap_or_default().into_iter().enumerate() {
            if r.plugin_ref.is_empty() {
                return Err(ConfigError::Invalid {
                    message: format!(
                        "schedulingProfiles[{}].plugins[{j}] is missing a 'pluginRef'",
                        wp.name
                    ),
                    line: None,
                });
            }
            let Some(spec) = plugins.iter().find(|p| p.name == r.plugin_ref) else {
                return Err(invalid(
                    text,
                    format!(
                        "schedulingProfiles[{}] references undefined plugin '{}'",
                        wp.name, r.plugin_ref
                    ),
                    "pluginRef",
                    &r.plugin_ref,
                ));
            };
            match spec.kind.role() {
                PluginRole::Filter => profile.filters.push(spec.name.clone()),
                PluginRole::Scorer => profile
                    .scorers
                    .push((spec.name.clone(), r.weight.unwrap_or(1.0))),
                PluginRole::Picker => {
                    if !profile.picker.is_empty() {
                        return Err(invalid(
                            text,
                            format!(
                                "schedulingProfiles[{}] has two pickers: '{}' and '{}'",
                                wp.name, profile.picker, spec.name
                            ),
                            "pluginRef",
                            &spec.name,
                        ));
                    }
                    profile.picker = spec.name.clone();
                }
                // The reference silently ignores other plugins (e.g. data producers) here.
                PluginRole::ProfileHandler | PluginRole::Other => {
                    tracing::debug!(profile = %wp.name, plugin = %spec.name,
                        "plugin has no scheduling role; ignored in profile");
                }
            }
        }
        if profile.picker.is_empty() {
            profile.picker = default_picker.clone();
        }
        profiles.push(profile);
    }

    let handlers: Vec<&PluginSpec> = plugins
        .iter()
        .filter(|p| p.kind.role() == PluginRole::ProfileHandler)
        .collect();
    let profile_handler = match handlers.as_slice() {
        [] => {
            return Err(ConfigError::Invalid {
                message: "no profile handler configured".into(),
                line: None,
            })
        }
        [one] => one,
        [a, b, ..] => {
            return Err(invalid(
                text,
                format!(
                    "multiple profile handlers found ('{}', '{}'); only one is allowed",
                    a.name, b.name
                ),
                "type",
                b.kind.type_name(),
            ))
        }
    };
    if profile_handler.kind == PluginKind::SingleProfileHandler && profiles.len() > 1 {
        return Err(ConfigError::Invalid {
            message: "SingleProfileHandler cannot support multiple scheduling profiles".into(),
            line: line_of(text, "name", &profiles[1].name),
        });
    }
    let profile_handler = profile_handler.name.clone();

    // Prefix index parameters: an explicit producer wins; otherwise the scorer's own.
    let producer = plugins.iter().find_map(|p| match &p.kind {
        PluginKind::ApproxPrefixCacheProducer(params) => Some(*params),
        _ => None,
    });
    let scorer_params: Vec<(&str, PrefixCacheParams)> = plugins
        .iter()
        .filter_map(|p| match &p.kind {
            PluginKind::PrefixCacheScorer(params) => Some((p.name.as_str(), *params)),
            _ => None,
        })
        .collect();
    if producer.is_none() {
        if let [(first, a), rest @ ..] = scorer_params.as_slice() {
            if let Some((other, _)) = rest.iter().find(|(_, b)| b != a) {
                return Err(invalid(
                    text,
                    format!(
                        "prefix-cache-scorer plugins '{first}' and '{other}' have different parameters; they share one prefix index"
                    ),
                    "name",
                    other,
                ));
            }
        }
    }
    let prefix_cache = producer.or_else(|| scorer_params.first().map(|(_, p)| *p));

    // Saturation detector (ensureSaturationDetector + validateSaturationDetector).
    let sd_ref = match wire.saturation_detector {
        Some(r) if !r.plugin_ref.is_empty() => r.plugin_ref,
        _ => "utilization-detector".to_string(),
    };
    let saturation_detector = match plugins.iter().find(|p| p.name == sd_ref) {
        Some(PluginSpec {
            kind: PluginKind::UtilizationDetector(params),
            name,
        }) => (name.clone(), *params),
        Some(other) => {
            return Err(invalid(
                text,
                format!(
                    "saturation detector '{}' is a '{}', not a saturation detector",
                    other.name,
                    other.kind.type_name()
                ),
                "pluginRef",
                &sd_ref,
            ))
        }
        None if sd_ref == "utilization-detector" => {
            add_default(
                &mut plugins,
                PluginKind::UtilizationDetector(Default::default()),
            )?;
            (sd_ref, UtilizationDetectorParams::default())
        }
        None => {
            return Err(invalid(
                text,
                format!("saturation detector references undefined plugin '{sd_ref}'"),
                "pluginRef",
                &sd_ref,
            ))
        }
    };

    // Parser: only the OpenAI parser exists here.
    if let Some(p) = wire.parser {
        match plugins.iter().find(|s| s.name == p.plugin_ref) {
            Some(PluginSpec {
                kind: PluginKind::OpenAiParser,
                ..
            }) => {}
            Some(other) => {
                return Err(invalid(
                    text,
                    format!("parser '{}' is not a parser plugin", other.name),
                    "pluginRef",
                    &p.plugin_ref,
                ))
            }
            None if p.plugin_ref == "openai-parser" => {}
            None => {
                return Err(invalid(
                    text,
                    format!("the configured parser '{}' is not loaded", p.plugin_ref),
                    "pluginRef",
                    &p.plugin_ref,
                ))
            }
        }
    }

    // Data layer: explicit sources, else the first declared source/extractor, else defaults.
    let mut metrics_source = None;
    let mut metrics_extractor = None;
    if let Some(dl) = wire.data_layer {
        for src in dl.sources {
            match plugins
                .iter()
                .find(|p| p.name == src.plugin_ref)
                .map(|p| &p.kind)
            {
                Some(PluginKind::MetricsDataSource(params)) => {
                    metrics_source.get_or_insert_with(|| params.clone());
                }
                _ => {
                    return Err(invalid(
                        text,
                        format!("the plugin '{}' is not a data source", src.plugin_ref),
                        "pluginRef",
                        &src.plugin_ref,
                    ))
                }
            }
            for ex in src.extractors {
                match plugins
                    .iter()
                    .find(|p| p.name == ex.plugin_ref)
                    .map(|p| &p.kind)
                {
                    Some(PluginKind::CoreMetricsExtractor(params)) => {
                        metrics_extractor.get_or_insert_with(|| params.clone());
                    }
                    _ => {
                        return Err(invalid(
                            text,
                            format!("the plugin '{}' is not an extractor", ex.plugin_ref),
                            "pluginRef",
                            &ex.plugin_ref,
                        ))
                    }
                }
            }
        }
    }
    let metrics_source = metrics_source
        .or_else(|| {
            plugins.iter().find_map(|p| match &p.kind {
                PluginKind::MetricsDataSource(params) => Some(params.clone()),
                _ => None,
            })
        })
        .unwrap_or_default();
    let metrics_extractor = metrics_extractor
        .or_else(|| {
            plugins.iter().find_map(|p| match &p.kind {
                PluginKind::CoreMetricsExtractor(params) => Some(params.clone()),
                _ => None,
            })
        })
        .unwrap_or_default();

    Ok(SchedulerConfig {
        plugins,
        profiles,
        profile_handler,
        prefix_cache,
        saturation_detector,
        metrics_source,
        metrics_extractor,
        feature_gates,
    })
}

/// Registers a default plugin instance named after its type (GIE `registerDefaultPlugin`).
fn add_default(plugins: &mut Vec<PluginSpec>, kind: PluginKind) -> Result<String, ConfigError> {
    let name = kind.type_name().to_string();
    if let Some(existing) = plugins.iter().find(|p| p.name == name) {
        // A differently-typed plugin squats on the default's name.
        return Err(ConfigError::Invalid {
            message: format!(
                "cannot add default plugin '{name}': the name is used by a '{}' plugin",
                existing.kind.type_name()
            ),
            line: None,
        });
    }
    plugins.push(PluginSpec {
        name: name.clone(),
        kind,
    });
    Ok(name)
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
