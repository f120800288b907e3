//! The EndpointPickerConfig as written (GIE v1.5.0 `apix/config/v1alpha1`): serde types with
//! `deny_unknown_fields`, so serde_yaml reports every unknown key and bad value with its line.
//! Plugin parameters are decoded by the registry (`plugins.rs`) while the entry is read, so
//! their errors are located too.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::plugins::{self, PluginKind};
use crate::epp::flowcontrol::config::parse_quantity;
use crate::flagfmt::parse_go_duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct WireConfig {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub feature_gates: Option<Vec<String>>,
    pub plugins: Option<Vec<WirePlugin>>,
    pub scheduling_profiles: Option<Vec<WireProfile>>,
    pub saturation_detector: Option<WireOptionalRef>,
    pub data_layer: Option<WireDataLayer>,
    /// Read when the `flowControl` gate is on (llm-d-router `FlowControlConfig`); checked
    /// strictly either way.
    pub flow_control: Option<WireFlowControl>,
    /// Deprecated in llm-d-router for `requestHandler.parsers`.
    pub parser: Option<WireRef>,
    pub request_handler: Option<WireRequestHandler>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct WireRequestHandler {
    #[serde(default)]
    pub parsers: Vec<WireRef>,
}

/// `flowControl` (llm-d-router `apix/config/v1alpha1` `FlowControlConfig`). Quantities and
/// durations are validated while decoding, so their errors carry the line.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct WireFlowControl {
    #[serde(default, deserialize_with = "quantity")]
    pub max_bytes: Option<u64>,
    #[serde(default, deserialize_with = "quantity")]
    pub max_requests: Option<u64>,
    #[serde(default, rename = "defaultRequestTTL", deserialize_with = "duration")]
    pub default_request_ttl: Option<Duration>,
    #[serde(
        default,
        rename = "noEndpointRequestTTL",
        deserialize_with = "duration"
    )]
    pub no_endpoint_request_ttl: Option<Duration>,
    pub default_priority_band: Option<WireBand>,
    pub default_negative_priority_band: Option<WireBand>,
    pub priority_bands: Option<Vec<WireBand>>,
    pub usage_limit_policy_plugin_ref: Option<String>,
    pub saturation_detector: Option<WireOptionalRef>,
    pub enable_eviction: Option<bool>,
}

/// A priority band (`PriorityBandConfig`); `priority` is required in `priorityBands` and
/// ignored in the two templates.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct WireBand {
    pub priority: Option<i32>,
    #[serde(default, deserialize_with = "quantity")]
    pub max_bytes: Option<u64>,
    #[serde(default, deserialize_with = "quantity")]
    pub max_requests: Option<u64>,
    pub fairness_policy_ref: Option<String>,
    pub ordering_policy_ref: Option<String>,
}

/// A Kubernetes resource quantity written as a number or a string (`100`, `"1Gi"`).
fn quantity<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Float(f64),
        Text(String),
    }
    let text = match Option::<Raw>::deserialize(d)? {
        None => return Ok(None),
        Some(Raw::Int(i)) => i.to_string(),
        Some(Raw::Float(f)) => f.to_string(),
        Some(Raw::Text(t)) => t,
    };
    parse_quantity(&text).map(Some).map_err(de::Error::custom)
}

/// A Go duration string (`60s`, `1m30s`, `0s`).
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(t) => parse_go_duration(&t).map(Some).map_err(de::Error::custom),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct WireProfile {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub plugins: Option<Vec<WireProfilePlugin>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct WireProfilePlugin {
    #[serde(default)]
    pub plugin_ref: String,
    #[serde(default, deserialize_with = "weight")]
    pub weight: Option<f64>,
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
pub(super) struct WireRef {
    pub plugin_ref: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct WireOptionalRef {
    #[serde(default)]
    pub plugin_ref: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct WireDataLayer {
    #[serde(default)]
    pub sources: Vec<WireSource>,
    // llm-d-router v0.10 fields: checked (and mostly rejected) in resolution.
    pub inject_defaults: Option<bool>,
    pub discovery: Option<serde_yaml::Value>,
    pub peer_discovery: Option<serde_yaml::Value>,
    pub cross_replica_syncer_plugin_ref: Option<String>,
    pub cross_replica_sync_interval: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct WireSource {
    pub plugin_ref: String,
    #[serde(default)]
    pub extractors: Vec<WireRef>,
}

/// A `plugins[]` entry, decoded with its parameters checked against its type.
pub(super) struct WirePlugin {
    pub name: Option<String>,
    pub kind: PluginKind,
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
                let mut type_name: Option<String> = None;
                let mut kind: Option<PluginKind> = None;
                // `parameters` written before `type` cannot be decoded yet; keep it as a value.
                let mut early_params: Option<serde_yaml::Value> = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "name" => name = map.next_value::<Option<String>>()?,
                        "type" => {
                            let t: String = map.next_value()?;
                            plugins::check_type(&t).map_err(de::Error::custom)?;
                            type_name = Some(t);
                        }
                        "parameters" => match &type_name {
                            Some(t) => kind = Some(map.next_value_seed(ParamsSeed(t))?),
                            None => early_params = Some(map.next_value()?),
                        },
                        other => return Err(de::Error::unknown_field(other, FIELDS)),
                    }
                }
                let type_name = type_name.ok_or_else(|| de::Error::missing_field("type"))?;
                let kind = match (kind, early_params) {
                    (Some(k), _) => k,
                    (None, Some(v)) => plugins::decode(&type_name, Some(v))
                        .map_err(|e| de::Error::custom(format!("parameters: {e}")))?
                        .ok_or_else(|| de::Error::custom("plugin type is not registered"))?,
                    (None, None) => plugins::decode::<serde_yaml::Value>(&type_name, None)
                        .map_err(de::Error::custom)?
                        .ok_or_else(|| de::Error::custom("plugin type is not registered"))?,
                };
                Ok(WirePlugin { name, kind })
            }
        }
        d.deserialize_map(PluginVisitor)
    }
}

/// Decodes `parameters` for one (already checked) plugin type, with serde_yaml's location.
struct ParamsSeed<'a>(&'a str);

impl<'de> de::DeserializeSeed<'de> for ParamsSeed<'_> {
    type Value = PluginKind;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<PluginKind, D::Error> {
        plugins::decode(self.0, Some(d))?
            .ok_or_else(|| de::Error::custom(format!("plugin type '{}' is not registered", self.0)))
    }
}
