//! EPP configuration in three steps (the EndpointPickerConfig, GIE v1.5.0
//! `apix/config/v1alpha1` and `pkg/epp/config/loader`):
//!
//! 1. [`wire`]: the YAML as written — serde types with `deny_unknown_fields`; structural errors
//!    carry serde_yaml's line. Plugin parameters are decoded by the registry in [`plugins`]
//!    while the entry is read, so their errors are located too.
//! 2. [`resolve`](resolve.rs): the reference's defaulting rules and cross-reference checks
//!    (undefined `pluginRef`, two pickers, …), located by searching the text.
//! 3. One [`EppConfig`] whose slices go to their owners: [`SchedulerConfig`] (profiles with their
//!    plugin instances already built) to `Scheduler::new`, [`DetectorConfig`] to the
//!    saturation detector, [`DataLayerConfig`] to the scrape manager. Nothing downstream looks a
//!    plugin up by name.
//!
//! Where a field takes effect: `plugins[].parameters` → the instance built in
//! `plugins.rs::PluginKind::instantiate` (prefix parameters → `prefix::PrefixCacheParams`,
//! used by the scheduler's prefix cache); `schedulingProfiles` → `scheduling::Scheduler`;
//! `saturationDetector` → `saturation::SaturationDetector`; `dataLayer` → `scrape`;
//! `featureGates: [flowControl]` + `flowControl` → `flowcontrol::FlowController` (`flow.rs`).

use std::sync::Arc;

use crate::epp::flowcontrol::FlowControlConfig;
use crate::epp::saturation::DetectorConfig;
use crate::epp::scheduling::plugins::RequestHook;
use crate::epp::scheduling::SchedulerConfig;
use crate::epp::scrape::DataLayerConfig;

mod flow;
mod flow_plugins;
pub mod plugins;
mod resolve;
pub mod upstream;
mod wire;

pub use plugins::{Instance, PickerParams, PluginKind};

/// apiVersions accepted in the header: the llm-d-router group (v0.10, where the reference EPP
/// moved) and GIE's, which llm-d-router still reads as deprecated. Both decode the same schema.
pub const API_VERSIONS: &[&str] = &[LLMD_API_VERSION, API_VERSION];
pub const API_VERSION: &str = "inference.networking.x-k8s.io/v1alpha1";
pub const LLMD_API_VERSION: &str = "llm-d.ai/v1alpha1";
pub const KIND: &str = "EndpointPickerConfig";

/// Switchyard's default: stale or never-scraped endpoints filtered, then the predicted-TTFT
/// scorer (queued prefill tokens + this prompt's uncached part, over the learned prefill rate),
/// with prefix matching over up to 1024 blocks (16k tokens at 16-token blocks). It keeps the
/// tail where the reference default loses it (`docs/benchmarks.md`, issue 10).
pub const DEFAULT_CONFIG: &str = r#"apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: scrape-freshness-filter
- type: approx-prefix-cache-producer
  parameters:
    maxPrefixBlocksToMatch: 1024
- type: predicted-ttft-scorer
- type: max-score-picker
- type: metrics-data-source
  parameters:
    scheme: "http"
    path: "/metrics"
    insecureSkipVerify: true
- type: core-metrics-extractor
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: scrape-freshness-filter
  - pluginRef: predicted-ttft-scorer
    weight: 1
  - pluginRef: max-score-picker
"#;

/// The reference Helm chart's `default-plugins.yaml` (vLLM over HTTP): prefix 3, queue 2, kv 2.
/// Selectable with `--config-text` / `--config-file`; the default before issue 10.
pub const REFERENCE_DEFAULT_CONFIG: &str = r#"apiVersion: inference.networking.x-k8s.io/v1alpha1
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

/// llm-d-router v0.10's default (`pkg/epp/config/loader/defaults.go` `loadDefaultConfig`):
/// the reference chart's weights (queue 2, KV 2, prefix 3) with the metrics data layer wired
/// explicitly. What an llm-d-router EPP runs without a config; pass it with `--config-text` to
/// run the same here.
pub const LLMD_DEFAULT_CONFIG: &str = r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
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
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors:
    - pluginRef: core-metrics-extractor
"#;

/// Why a configuration was rejected. `Display` is the startup error text.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Malformed YAML, wrong shape, unknown key, unknown plugin type or bad parameter.
    #[error("invalid EndpointPickerConfig: {0}")]
    Decode(#[from] serde_yaml::Error),
    /// Well-formed but inconsistent (e.g. a profile references an undefined plugin).
    #[error("invalid EndpointPickerConfig: {reason}{}", line_suffix(*.line))]
    Invalid {
        reason: Invalid,
        line: Option<usize>,
    },
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

/// What is inconsistent in a well-formed configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("apiVersion is missing")]
    ApiVersionMissing,
    #[error("apiVersion must be {}, got '{got}'", quoted_list(API_VERSIONS))]
    ApiVersion { got: String },
    #[error("kind is missing")]
    KindMissing,
    #[error("kind must be '{KIND}', got '{0}'")]
    Kind(String),
    #[error("feature gate '{0}' is not supported by switchyard")]
    UnsupportedGate(String),
    #[error("feature gate '{0}' is unknown or unregistered")]
    UnknownGate(String),
    #[error("feature gate '{0}' has an invalid value (expected true or false)")]
    GateValue(String),
    #[error("flowControl.{0} is not supported by switchyard")]
    UnsupportedFlowSetting(&'static str),
    #[error("flowControl.priorityBands[{0}] is missing 'priority'")]
    BandWithoutPriority(usize),
    #[error("flowControl.priorityBands has two bands with priority {0}")]
    DuplicateBand(i32),
    #[error("flowControl references undefined plugin '{0}'")]
    UndefinedFlowPolicy(String),
    #[error("flowControl references '{name}', a '{type_name}', not a {expected}")]
    NotAFlowPolicy {
        name: String,
        type_name: &'static str,
        expected: &'static str,
    },
    #[error("duplicate plugin name '{0}'")]
    DuplicatePlugin(String),
    #[error("schedulingProfiles[{0}] is missing a name")]
    ProfileWithoutName(usize),
    #[error("schedulingProfiles[{index}] has duplicate name '{name}'")]
    DuplicateProfile { index: usize, name: String },
    #[error("schedulingProfiles[{profile}].plugins[{index}] is missing a 'pluginRef'")]
    MissingPluginRef { profile: String, index: usize },
    #[error("schedulingProfiles[{profile}] references undefined plugin '{plugin}'")]
    UndefinedProfilePlugin { profile: String, plugin: String },
    #[error("schedulingProfiles[{profile}] has two pickers: '{first}' and '{second}'")]
    TwoPickers {
        profile: String,
        first: String,
        second: String,
    },
    #[error("no picker configured")]
    NoPicker,
    #[error("no profile handler configured")]
    NoProfileHandler,
    #[error("multiple profile handlers found ('{first}', '{second}'); only one is allowed")]
    SeveralProfileHandlers { first: String, second: String },
    #[error("SingleProfileHandler cannot support multiple scheduling profiles")]
    SingleHandlerManyProfiles,
    #[error("prefix-cache-scorer plugins '{first}' and '{other}' have different parameters; they share one prefix index")]
    PrefixParamsDiffer { first: String, other: String },
    #[error("saturation detector '{name}' is a '{type_name}', not a saturation detector")]
    NotASaturationDetector {
        name: String,
        type_name: &'static str,
    },
    #[error("saturation detector references undefined plugin '{0}'")]
    UndefinedSaturationDetector(String),
    #[error("parser '{0}' is not a parser plugin")]
    NotAParser(String),
    #[error("the configured parser '{0}' is not loaded")]
    ParserNotLoaded(String),
    #[error("the plugin '{0}' is not a data source")]
    NotADataSource(String),
    #[error("the plugin '{0}' is not an extractor")]
    NotAnExtractor(String),
    #[error("dataLayer.{0} is not supported by switchyard (endpoints come from the InferencePool or --endpoints; metrics are always scraped from every endpoint)")]
    UnsupportedDataLayer(&'static str),
    #[error("cannot add default plugin '{name}': the name is used by a '{type_name}' plugin")]
    DefaultNameTaken {
        name: &'static str,
        type_name: &'static str,
    },
}

fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// One plugin instance: its unique name, its validated parameters and the built instance.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    pub name: String,
    pub kind: PluginKind,
    pub instance: Instance,
    /// Its PreRequest / ResponseHeader hook, when it has one.
    pub hook: Option<Arc<dyn RequestHook>>,
}

impl PluginSpec {
    fn new(name: String, kind: PluginKind) -> Self {
        let (instance, hook) = kind.instantiate(&name);
        PluginSpec {
            name,
            kind,
            instance,
            hook,
        }
    }
}

/// A validated EndpointPickerConfig with every default applied, in slices for its owners.
#[derive(Debug, Clone)]
pub struct EppConfig {
    /// All plugin instances, in declaration order, then the injected defaults.
    pub plugins: Vec<PluginSpec>,
    /// Profiles with built plugins, the profile handler and the prefix index parameters.
    pub scheduling: SchedulerConfig,
    /// Name of the saturation detector plugin (`utilization-detector` unless configured).
    pub saturation_detector: String,
    /// Its kind and validated parameters (the utilization detector with the reference
    /// defaults when not configured).
    pub saturation: DetectorConfig,
    /// Effective data layer: metrics source and extractor (defaults when not configured).
    pub data_layer: DataLayerConfig,
    /// Enabled feature gates (names).
    pub feature_gates: Vec<String>,
    /// A `destination-endpoint-served-verifier` is configured: responses carry the served
    /// endpoint in `x-conformance-test-served-endpoint`.
    pub served_verifier: bool,
    /// Flow control settings; `Some` only with the `flowControl` gate on.
    pub flow_control: Option<FlowControlConfig>,
}

impl EppConfig {
    pub fn plugin(&self, name: &str) -> Option<&PluginSpec> {
        self.plugins.iter().find(|p| p.name == name)
    }
}

/// Parses and validates an EndpointPickerConfig. Empty text means [`DEFAULT_CONFIG`].
pub fn parse_config(yaml: &str) -> Result<EppConfig, ConfigError> {
    let yaml = if yaml.trim().is_empty() {
        DEFAULT_CONFIG
    } else {
        yaml
    };
    let wire: wire::WireConfig = serde_yaml::from_str(yaml)?;
    resolve::resolve(yaml, wire)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_llmd;
