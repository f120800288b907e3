//! Parameters of the flow-control plugins that carry settings: `priority-holdback-policy`
//! (llm-d-router's usage-limit policy) and `concurrency-detector` (its in-flight saturation
//! detector, `requests` mode). Ranges are upstream's.

use serde::Deserialize;

use crate::epp::flowcontrol::usage::{HoldbackDomain, HoldbackParams};
use crate::epp::saturation::{ConcurrencyConfig, DEFAULT_MAX_CONCURRENCY};

/// Why a flow-control plugin's parameters were rejected (each names the offending key).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FlowParamError {
    #[error("minCeiling is required (the ceiling of the lowest priority, in [0.0, 1.0))")]
    MinCeilingMissing,
    #[error("minCeiling must be in [0.0, 1.0), got {0}")]
    MinCeiling(f64),
    #[error("maxCeiling must be in (0.0, 1.0], got {0}")]
    MaxCeiling(f64),
    #[error("minCeiling ({min}) must not be above maxCeiling ({max})")]
    CeilingOrder { min: f64, max: f64 },
    #[error("shape must be \"linear\", got {0:?}")]
    Shape(String),
    #[error("domain must be \"rank\" or \"value\", got {0:?}")]
    Domain(String),
    #[error("concurrencyMode {0:?} is not supported by switchyard (only \"requests\")")]
    ConcurrencyMode(String),
    #[error("maxConcurrency must be > 0, got {0}")]
    MaxConcurrency(i64),
    #[error("headroom must be a non-negative value, got {0}")]
    Headroom(f64),
    #[error("decodeSafety.{0}")]
    DecodeSafety(String),
    #[error("{0} is not supported by switchyard (concurrency is counted in requests only)")]
    TokenSetting(&'static str),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct WireHoldbackParams {
    shape: Option<String>,
    domain: Option<String>,
    min_ceiling: Option<f64>,
    max_ceiling: Option<f64>,
}

impl WireHoldbackParams {
    pub(super) fn validate(self) -> Result<HoldbackParams, FlowParamError> {
        match self.shape.as_deref() {
            None | Some("") | Some("linear") => {}
            Some(other) => return Err(FlowParamError::Shape(other.to_string())),
        }
        let domain = match self.domain.as_deref() {
            None | Some("") | Some("rank") => HoldbackDomain::Rank,
            Some("value") => HoldbackDomain::Value,
            Some(other) => return Err(FlowParamError::Domain(other.to_string())),
        };
        let min = self.min_ceiling.ok_or(FlowParamError::MinCeilingMissing)?;
        // Negated range checks so NaN is rejected too.
        if !(0.0..1.0).contains(&min) {
            return Err(FlowParamError::MinCeiling(min));
        }
        let max = self.max_ceiling.unwrap_or(1.0);
        if !(max > 0.0 && max <= 1.0) {
            return Err(FlowParamError::MaxCeiling(max));
        }
        if min > max {
            return Err(FlowParamError::CeilingOrder { min, max });
        }
        Ok(HoldbackParams {
            domain,
            min_ceiling: min,
            max_ceiling: max,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct WireConcurrencyParams {
    concurrency_mode: Option<String>,
    max_concurrency: Option<i64>,
    headroom: Option<f64>,
    /// Upstream names the producer of its in-flight counts; here they are the EPP's own.
    #[allow(dead_code)]
    in_flight_load_producer_name: Option<String>,
    max_token_concurrency: Option<serde_yaml::Value>,
    max_token_concurrency_by_role: Option<serde_yaml::Value>,
    /// A utilization-detector configuration (its parameters and ranges).
    decode_safety: Option<super::plugins::WireUtilizationParams>,
}

impl WireConcurrencyParams {
    pub(super) fn validate(self) -> Result<ConcurrencyConfig, FlowParamError> {
        let decode_safety = match self.decode_safety {
            Some(w) => Some(
                w.validate()
                    .map_err(|e| FlowParamError::DecodeSafety(e.to_string()))?,
            ),
            None => None,
        };
        match self.concurrency_mode.as_deref() {
            None | Some("") | Some("requests") => {}
            Some(other) => return Err(FlowParamError::ConcurrencyMode(other.to_string())),
        }
        if self.max_token_concurrency.is_some() {
            return Err(FlowParamError::TokenSetting("maxTokenConcurrency"));
        }
        if self.max_token_concurrency_by_role.is_some() {
            return Err(FlowParamError::TokenSetting("maxTokenConcurrencyByRole"));
        }
        let max = self
            .max_concurrency
            .unwrap_or(i64::from(DEFAULT_MAX_CONCURRENCY));
        let max_concurrency = u32::try_from(max)
            .ok()
            .filter(|&m| m > 0)
            .ok_or(FlowParamError::MaxConcurrency(max))?;
        let headroom = self.headroom.unwrap_or(0.0);
        if !(headroom >= 0.0 && headroom.is_finite()) {
            return Err(FlowParamError::Headroom(headroom));
        }
        Ok(ConcurrencyConfig {
            max_concurrency,
            headroom,
            decode_safety,
        })
    }
}
