//! Resolution of the `flowControl` section (llm-d-router `pkg/epp/config/loader/flowcontrol.go`):
//! band templates and explicit bands with the reference's defaults, policy references looked
//! up among the plugins (the default policies need no declaration, as the reference registers
//! them itself), settings Switchyard does not implement refused by name.

use std::collections::BTreeMap;

use super::plugins::PluginKind;
use super::resolve::{at, unlocated};
use super::wire::{WireBand, WireFlowControl};
use super::{ConfigError, Invalid, PluginSpec};
use crate::epp::flowcontrol::config::{
    BandConfig, Fairness, FlowControlConfig, DEFAULT_REQUEST_TTL,
};
use crate::epp::flowcontrol::usage::UsageLimit;

/// The validated section, or `None` when the gate is off. With the gate off the section is
/// still checked, and settings in it are reported as ignored (as the reference logs).
pub(super) fn resolve(
    text: &str,
    gate_on: bool,
    wire: Option<WireFlowControl>,
    plugins: &[PluginSpec],
) -> Result<Option<FlowControlConfig>, ConfigError> {
    let configured = wire.is_some();
    let wire = wire.unwrap_or_default();
    if wire.enable_eviction == Some(true) {
        return Err(at(
            text,
            Invalid::UnsupportedFlowSetting("enableEviction"),
            "enableEviction",
            "true",
        ));
    }
    let usage_limit = match wire.usage_limit_policy_plugin_ref.as_deref() {
        None | Some("") | Some("static-usage-limit-policy") => UsageLimit::Static,
        Some(r) => match plugins.iter().find(|p| p.name == r).map(|p| &p.kind) {
            Some(PluginKind::PriorityHoldbackPolicy(params)) => {
                UsageLimit::PriorityHoldback(*params)
            }
            Some(other) => {
                return Err(at(
                    text,
                    Invalid::NotAFlowPolicy {
                        name: r.to_string(),
                        type_name: other.type_name(),
                        expected: "usage limit policy",
                    },
                    "usageLimitPolicyPluginRef",
                    r,
                ))
            }
            None => {
                return Err(at(
                    text,
                    Invalid::UndefinedFlowPolicy(r.to_string()),
                    "usageLimitPolicyPluginRef",
                    r,
                ))
            }
        },
    };
    let default_band = band(text, plugins, wire.default_priority_band.as_ref())?;
    let default_negative_band = match &wire.default_negative_priority_band {
        Some(b) => Some(band(text, plugins, Some(b))?),
        None => None,
    };
    let mut bands = BTreeMap::new();
    for (i, b) in wire.priority_bands.iter().flatten().enumerate() {
        let Some(priority) = b.priority else {
            return Err(unlocated(Invalid::BandWithoutPriority(i)));
        };
        if bands
            .insert(priority, band(text, plugins, Some(b))?)
            .is_some()
        {
            return Err(at(
                text,
                Invalid::DuplicateBand(priority),
                "priority",
                &priority.to_string(),
            ));
        }
    }
    // An explicit 0s turns the TTL off (requests wait until the client leaves); omitted is
    // 60s. The no-endpoint budget follows the default one unless set.
    let ttl = |d: std::time::Duration| (!d.is_zero()).then_some(d);
    let default_request_ttl = ttl(wire.default_request_ttl.unwrap_or(DEFAULT_REQUEST_TTL));
    let no_endpoint_request_ttl = match wire.no_endpoint_request_ttl {
        Some(d) => ttl(d),
        None => default_request_ttl,
    };
    let config = FlowControlConfig {
        // 0 means no global limit, as omitted does.
        max_bytes: wire.max_bytes.filter(|&v| v > 0),
        max_requests: wire.max_requests.filter(|&v| v > 0),
        default_request_ttl,
        no_endpoint_request_ttl,
        default_band,
        default_negative_band,
        bands,
        usage_limit,
    };
    if !gate_on {
        if configured {
            tracing::warn!(
                "the flowControl config section is set but the flowControl feature gate is \
                 disabled; its settings (other than saturationDetector) are ignored"
            );
        }
        return Ok(None);
    }
    tracing::info!(?config, "flow control enabled");
    Ok(Some(config))
}

/// One band: limits (0 or omitted → the reference defaults) and policies.
fn band(
    text: &str,
    plugins: &[PluginSpec],
    wire: Option<&WireBand>,
) -> Result<BandConfig, ConfigError> {
    let defaults = BandConfig::default();
    let Some(w) = wire else {
        return Ok(defaults);
    };
    let fairness = match w.fairness_policy_ref.as_deref() {
        None | Some("") => defaults.fairness,
        Some(name) => match plugins.iter().find(|p| p.name == name).map(|p| &p.kind) {
            Some(PluginKind::GlobalStrictFairnessPolicy) => Fairness::GlobalStrict,
            Some(PluginKind::RoundRobinFairnessPolicy) => Fairness::RoundRobin,
            Some(other) => {
                return Err(at(
                    text,
                    Invalid::NotAFlowPolicy {
                        name: name.to_string(),
                        type_name: other.type_name(),
                        expected: "fairness policy",
                    },
                    "fairnessPolicyRef",
                    name,
                ))
            }
            // The reference registers its default policy by type name itself.
            None if name == Fairness::GlobalStrict.type_name() => Fairness::GlobalStrict,
            None => {
                return Err(at(
                    text,
                    Invalid::UndefinedFlowPolicy(name.to_string()),
                    "fairnessPolicyRef",
                    name,
                ))
            }
        },
    };
    if let Some(name) = w.ordering_policy_ref.as_deref().filter(|n| !n.is_empty()) {
        match plugins.iter().find(|p| p.name == name).map(|p| &p.kind) {
            Some(PluginKind::FcfsOrderingPolicy) => {}
            None if name == "fcfs-ordering-policy" => {}
            Some(other) => {
                return Err(at(
                    text,
                    Invalid::NotAFlowPolicy {
                        name: name.to_string(),
                        type_name: other.type_name(),
                        expected: "ordering policy",
                    },
                    "orderingPolicyRef",
                    name,
                ))
            }
            None => {
                return Err(at(
                    text,
                    Invalid::UndefinedFlowPolicy(name.to_string()),
                    "orderingPolicyRef",
                    name,
                ))
            }
        }
    }
    Ok(BandConfig {
        max_bytes: w.max_bytes.filter(|&v| v > 0).unwrap_or(defaults.max_bytes),
        max_requests: w
            .max_requests
            .filter(|&v| v > 0)
            .unwrap_or(defaults.max_requests),
        fairness,
    })
}
