//! Resolution: the decoded wire config → defaults (GIE `pkg/epp/config/loader/defaults.go`) →
//! cross-reference checks → one [`EppConfig`] whose slices are handed to their owners.

use std::sync::Arc;

use super::plugins::{Instance, PickerParams, PluginKind};
use super::wire::{WireConfig, WireProfile, WireProfilePlugin};
use super::{ConfigError, EppConfig, Invalid, PluginSpec, API_VERSIONS, KIND};
use crate::epp::prefix::PrefixCacheParams;
use crate::epp::saturation::{DetectorConfig, SaturationConfig};
use crate::epp::scheduling::plugins::ProfileHandler;
use crate::epp::scheduling::{ProfileConfig, SchedulerConfig};
use crate::epp::scrape::DataLayerConfig;

/// Feature gates the reference registers, and whether Switchyard implements them.
const FEATURE_GATES: &[(&str, bool)] = &[
    ("dataLayer", true),
    ("enableLegacyMetrics", true),
    ("flowControl", true),
];

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

/// An error located at the first `key: value` in the text.
pub(super) fn at(text: &str, reason: Invalid, key: &str, value: &str) -> ConfigError {
    ConfigError::Invalid {
        reason,
        line: line_of(text, key, value),
    }
}

/// An error without a location.
pub(super) fn unlocated(reason: Invalid) -> ConfigError {
    ConfigError::Invalid { reason, line: None }
}

pub(super) fn resolve(text: &str, wire: WireConfig) -> Result<EppConfig, ConfigError> {
    match wire.api_version.as_deref() {
        Some(v) if API_VERSIONS.contains(&v) => {}
        Some(other) => {
            return Err(at(
                text,
                Invalid::ApiVersion {
                    got: other.to_string(),
                },
                "apiVersion",
                other,
            ))
        }
        None => return Err(unlocated(Invalid::ApiVersionMissing)),
    }
    match wire.kind.as_deref() {
        Some(KIND) => {}
        Some(other) => return Err(at(text, Invalid::Kind(other.to_string()), "kind", other)),
        None => return Err(unlocated(Invalid::KindMissing)),
    }

    // Gates are `name`, `name=true` or `name=false` (reference `loadFeatureConfig`).
    let feature_gates = wire.feature_gates.unwrap_or_default();
    let mut enabled_gates: Vec<String> = Vec::new();
    for gate in &feature_gates {
        let (name, value) = match gate.split_once('=') {
            Some((n, v)) => (n, Some(v.trim())),
            None => (gate.as_str(), None),
        };
        let reason = match FEATURE_GATES.iter().find(|(known, _)| *known == name) {
            Some((_, true)) => match value.map(crate::flagfmt::parse_go_bool) {
                None | Some(Ok(true)) => {
                    enabled_gates.push(name.to_string());
                    continue;
                }
                Some(Ok(false)) => continue,
                Some(Err(_)) => Invalid::GateValue(gate.clone()),
            },
            Some((_, false)) => Invalid::UnsupportedGate(name.to_string()),
            None => Invalid::UnknownGate(name.to_string()),
        };
        return Err(ConfigError::Invalid {
            reason,
            line: text
                .lines()
                .position(|l| l.contains(gate.as_str()))
                .map(|i| i + 1),
        });
    }
    let mut wire_flow = wire.flow_control;
    let flow_detector = wire_flow
        .as_mut()
        .and_then(|f| f.saturation_detector.take());

    // Static defaults: name = type; names unique; every instance built once, here.
    let mut plugins: Vec<PluginSpec> = Vec::new();
    for p in wire.plugins.unwrap_or_default() {
        let name = match p.name {
            Some(n) if !n.is_empty() => n,
            _ => p.kind.type_name().to_string(),
        };
        if plugins.iter().any(|q| q.name == name) {
            return Err(at(
                text,
                Invalid::DuplicatePlugin(name.clone()),
                "name",
                &name,
            ));
        }
        plugins.push(PluginSpec::new(name, p.kind));
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
                            p.instance,
                            Instance::Filter(_) | Instance::Scorer(_) | Instance::Picker(_)
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
    let has_handler = plugins
        .iter()
        .any(|p| matches!(p.instance, Instance::ProfileHandler(_)));
    if wire_profiles.len() == 1 && !has_handler {
        add_default(&mut plugins, PluginKind::SingleProfileHandler)?;
    }
    let default_picker = match plugins.iter().find_map(|p| match &p.instance {
        Instance::Picker(picker) => Some(picker.clone()),
        _ => None,
    }) {
        Some(p) => p,
        None => {
            let i = add_default(
                &mut plugins,
                PluginKind::MaxScorePicker(PickerParams::default()),
            )?;
            match &plugins[i].instance {
                Instance::Picker(p) => p.clone(),
                // A max-score-picker always instantiates as a picker.
                _ => return Err(unlocated(Invalid::NoPicker)),
            }
        }
    };

    // Profiles: validate references and put the built instances into their slots.
    let mut profiles: Vec<ProfileConfig> = Vec::new();
    for (i, wp) in wire_profiles.into_iter().enumerate() {
        if wp.name.is_empty() {
            return Err(unlocated(Invalid::ProfileWithoutName(i)));
        }
        if profiles.iter().any(|p| p.name == wp.name) {
            return Err(at(
                text,
                Invalid::DuplicateProfile {
                    index: i,
                    name: wp.name.clone(),
                },
                "name",
                &wp.name,
            ));
        }
        let mut filters = Vec::new();
        let mut scorers = Vec::new();
        let mut picker: Option<(String, _)> = None;
        for (j, r) in wp.plugins.unwrap_or_default().into_iter().enumerate() {
            if r.plugin_ref.is_empty() {
                return Err(unlocated(Invalid::MissingPluginRef {
                    profile: wp.name.clone(),
                    index: j,
                }));
            }
            let Some(spec) = plugins.iter().find(|p| p.name == r.plugin_ref) else {
                return Err(at(
                    text,
                    Invalid::UndefinedProfilePlugin {
                        profile: wp.name.clone(),
                        plugin: r.plugin_ref.clone(),
                    },
                    "pluginRef",
                    &r.plugin_ref,
                ));
            };
            match &spec.instance {
                Instance::Filter(f) => filters.push(f.clone()),
                Instance::Scorer(s) => scorers.push((s.clone(), r.weight.unwrap_or(1.0))),
                Instance::Picker(p) => {
                    if let Some((first, _)) = &picker {
                        return Err(at(
                            text,
                            Invalid::TwoPickers {
                                profile: wp.name.clone(),
                                first: first.clone(),
                                second: spec.name.clone(),
                            },
                            "pluginRef",
                            &spec.name,
                        ));
                    }
                    picker = Some((spec.name.clone(), p.clone()));
                }
                // The reference silently ignores other plugins (e.g. data producers) here.
                Instance::ProfileHandler(_) | Instance::Other => {
                    tracing::debug!(profile = %wp.name, plugin = %spec.name,
                        "plugin has no scheduling role; ignored in profile");
                }
            }
        }
        profiles.push(ProfileConfig {
            name: wp.name,
            filters,
            scorers,
            picker: picker.map_or_else(|| default_picker.clone(), |(_, p)| p),
        });
    }

    let handlers: Vec<(&PluginSpec, &Arc<dyn ProfileHandler>)> = plugins
        .iter()
        .filter_map(|p| match &p.instance {
            Instance::ProfileHandler(h) => Some((p, h)),
            _ => None,
        })
        .collect();
    let (handler_spec, handler) = match handlers.as_slice() {
        [] => return Err(unlocated(Invalid::NoProfileHandler)),
        [one] => *one,
        [(a, _), (b, _), ..] => {
            return Err(at(
                text,
                Invalid::SeveralProfileHandlers {
                    first: a.name.clone(),
                    second: b.name.clone(),
                },
                "type",
                b.kind.type_name(),
            ))
        }
    };
    if handler_spec.kind == PluginKind::SingleProfileHandler && profiles.len() > 1 {
        return Err(ConfigError::Invalid {
            reason: Invalid::SingleHandlerManyProfiles,
            line: line_of(text, "name", &profiles[1].name),
        });
    }
    let handler = handler.clone();

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
                return Err(at(
                    text,
                    Invalid::PrefixParamsDiffer {
                        first: first.to_string(),
                        other: other.to_string(),
                    },
                    "name",
                    other,
                ));
            }
        }
    }
    // The precise scorer falls back to the approximate index for endpoints without events, and
    // the affinity filter reads it; upstream injects the approximate producer for both.
    let precise = plugins
        .iter()
        .any(|p| matches!(p.kind, PluginKind::PrecisePrefixCacheScorer(_)));
    let affinity_filter = plugins
        .iter()
        .any(|p| matches!(p.kind, PluginKind::PrefixCacheAffinityFilter(_)));
    let prefix_cache = producer
        .or_else(|| scorer_params.first().map(|(_, p)| *p))
        .or_else(|| (precise || affinity_filter).then(PrefixCacheParams::default));

    // Saturation detector (ensureSaturationDetector + validateSaturationDetector).
    // `flowControl.saturationDetector` (llm-d-router) wins over the top-level one (GIE v1.5.0).
    let sd_ref = match flow_detector
        .filter(|r| !r.plugin_ref.is_empty())
        .or(wire.saturation_detector)
    {
        Some(r) if !r.plugin_ref.is_empty() => r.plugin_ref,
        _ => "utilization-detector".to_string(),
    };
    let (saturation_detector, saturation) = match plugins.iter().find(|p| p.name == sd_ref) {
        Some(PluginSpec {
            kind: PluginKind::UtilizationDetector(params),
            name,
            ..
        }) => (name.clone(), DetectorConfig::Utilization(*params)),
        Some(PluginSpec {
            kind: PluginKind::ConcurrencyDetector(params),
            name,
            ..
        }) => (name.clone(), DetectorConfig::Concurrency(*params)),
        Some(other) => {
            return Err(at(
                text,
                Invalid::NotASaturationDetector {
                    name: other.name.clone(),
                    type_name: other.kind.type_name(),
                },
                "pluginRef",
                &sd_ref,
            ))
        }
        None if sd_ref == "utilization-detector" => {
            add_default(
                &mut plugins,
                PluginKind::UtilizationDetector(SaturationConfig::default()),
            )?;
            (sd_ref, DetectorConfig::default())
        }
        None => {
            return Err(at(
                text,
                Invalid::UndefinedSaturationDetector(sd_ref.clone()),
                "pluginRef",
                &sd_ref,
            ))
        }
    };

    // Parser: only the OpenAI parser exists here. `requestHandler.parsers` wins over the
    // deprecated top-level `parser` when both are set (llm-d-router LoadRawConfig).
    let parsers = match wire.request_handler {
        Some(rh) if !rh.parsers.is_empty() => rh.parsers,
        _ => wire.parser.into_iter().collect(),
    };
    for p in parsers {
        match plugins.iter().find(|s| s.name == p.plugin_ref) {
            Some(PluginSpec {
                kind: PluginKind::OpenAiParser,
                ..
            }) => {}
            Some(other) => {
                return Err(at(
                    text,
                    Invalid::NotAParser(other.name.clone()),
                    "pluginRef",
                    &p.plugin_ref,
                ))
            }
            None if p.plugin_ref == "openai-parser" => {}
            None => {
                return Err(at(
                    text,
                    Invalid::ParserNotLoaded(p.plugin_ref.clone()),
                    "pluginRef",
                    &p.plugin_ref,
                ))
            }
        }
    }

    // Data layer: explicit sources, else the first declared source/extractor, else defaults.
    let mut source = None;
    let mut extractor = None;
    if let Some(dl) = &wire.data_layer {
        let unsupported = [
            ("discovery", dl.discovery.is_some()),
            ("peerDiscovery", dl.peer_discovery.is_some()),
            (
                "crossReplicaSyncerPluginRef",
                dl.cross_replica_syncer_plugin_ref.is_some(),
            ),
            (
                "crossReplicaSyncInterval",
                dl.cross_replica_sync_interval.is_some(),
            ),
            ("injectDefaults", dl.inject_defaults == Some(false)),
        ];
        if let Some((key, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(ConfigError::Invalid {
                reason: Invalid::UnsupportedDataLayer(key),
                line: text
                    .lines()
                    .position(|l| l.trim_start().starts_with(&format!("{key}:")))
                    .map(|i| i + 1),
            });
        }
    }
    if let Some(dl) = wire.data_layer {
        for src in dl.sources {
            match plugins
                .iter()
                .find(|p| p.name == src.plugin_ref)
                .map(|p| &p.kind)
            {
                Some(PluginKind::MetricsDataSource(params)) => {
                    source.get_or_insert_with(|| params.clone());
                }
                _ => {
                    return Err(at(
                        text,
                        Invalid::NotADataSource(src.plugin_ref.clone()),
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
                        extractor.get_or_insert_with(|| params.clone());
                    }
                    _ => {
                        return Err(at(
                            text,
                            Invalid::NotAnExtractor(ex.plugin_ref.clone()),
                            "pluginRef",
                            &ex.plugin_ref,
                        ))
                    }
                }
            }
        }
    }
    let data_layer = DataLayerConfig {
        source: source
            .or_else(|| {
                plugins.iter().find_map(|p| match &p.kind {
                    PluginKind::MetricsDataSource(params) => Some(params.clone()),
                    _ => None,
                })
            })
            .unwrap_or_default(),
        extractor: extractor
            .or_else(|| {
                plugins.iter().find_map(|p| match &p.kind {
                    PluginKind::CoreMetricsExtractor(params) => Some(params.clone()),
                    _ => None,
                })
            })
            .unwrap_or_default(),
    };

    let hooks = plugins.iter().filter_map(|p| p.hook.clone()).collect();
    let served_verifier = plugins
        .iter()
        .any(|p| p.kind == PluginKind::DestinationEndpointServedVerifier);
    let flow_control = super::flow::resolve(
        text,
        enabled_gates
            .iter()
            .any(|g| g == crate::epp::flowcontrol::FEATURE_GATE),
        wire_flow,
        &plugins,
    )?;

    Ok(EppConfig {
        flow_control,
        plugins,
        scheduling: SchedulerConfig {
            profiles,
            handler,
            prefix_cache,
            hooks,
        },
        served_verifier,
        saturation_detector,
        saturation,
        data_layer,
        feature_gates: enabled_gates,
    })
}

/// Registers a default plugin instance named after its type (GIE `registerDefaultPlugin`);
/// returns its index.
fn add_default(plugins: &mut Vec<PluginSpec>, kind: PluginKind) -> Result<usize, ConfigError> {
    let name = kind.type_name();
    if let Some(existing) = plugins.iter().find(|p| p.name == name) {
        // A differently-typed plugin squats on the default's name.
        return Err(unlocated(Invalid::DefaultNameTaken {
            name,
            type_name: existing.kind.type_name(),
        }));
    }
    plugins.push(PluginSpec::new(name.to_string(), kind));
    Ok(plugins.len() - 1)
}
