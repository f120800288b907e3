//! Validated flow-control settings (the `flowControl` section of the EndpointPickerConfig, read
//! by `epp::config`), with the reference's defaults (llm-d-router
//! `pkg/epp/flowcontrol/registry/config.go`, `controller/config.go`).

use std::collections::BTreeMap;
use std::time::Duration;

use super::usage::UsageLimit;

/// The feature gate that turns flow control on (reference `flowcontrol.FeatureGate`).
pub const FEATURE_GATE: &str = "flowControl";
/// Queue-wait budget when `defaultRequestTTL` is not set.
pub const DEFAULT_REQUEST_TTL: Duration = Duration::from_secs(60);
/// A band's byte capacity when not configured (per-band limits are always bounded upstream).
pub const DEFAULT_BAND_MAX_BYTES: u64 = 1_000_000_000;
/// A band's request capacity when not configured.
pub const DEFAULT_BAND_MAX_REQUESTS: u64 = 5000;
/// Fairness id of requests without `x-gateway-inference-fairness-id`.
pub const DEFAULT_FAIRNESS_ID: &str = "default-flow";
/// Longest fairness id kept; longer ids are cut (ids come from a client header).
pub const MAX_FAIRNESS_ID_BYTES: usize = 256;

/// How a band chooses between its flows (one flow per fairness id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fairness {
    /// `global-strict-fairness-policy` (the reference default): the oldest request in the band
    /// goes first, whichever flow it is in; FCFS across the band.
    #[default]
    GlobalStrict,
    /// `round-robin-fairness-policy`: flows take turns in fairness-id order (a cursor on the
    /// last served id), so a flow with many requests cannot starve one with few.
    RoundRobin,
}

impl Fairness {
    pub fn type_name(self) -> &'static str {
        match self {
            Fairness::GlobalStrict => "global-strict-fairness-policy",
            Fairness::RoundRobin => "round-robin-fairness-policy",
        }
    }
}

/// One priority band's limits and policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BandConfig {
    pub max_bytes: u64,
    pub max_requests: u64,
    pub fairness: Fairness,
}

impl Default for BandConfig {
    fn default() -> Self {
        BandConfig {
            max_bytes: DEFAULT_BAND_MAX_BYTES,
            max_requests: DEFAULT_BAND_MAX_REQUESTS,
            fairness: Fairness::GlobalStrict,
        }
    }
}

/// Everything the flow controller needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowControlConfig {
    /// Global byte limit over all bands; `None`: no global limit (the reference default).
    pub max_bytes: Option<u64>,
    /// Global request limit over all bands; `None`: no global limit.
    pub max_requests: Option<u64>,
    /// Longest a request may wait while the pool has endpoints; `None` (`0s`): no limit.
    pub default_request_ttl: Option<Duration>,
    /// Longest a request may wait while the pool has no endpoints; `None`: no limit.
    pub no_endpoint_request_ttl: Option<Duration>,
    /// Template for priorities without an explicit band.
    pub default_band: BandConfig,
    /// Template for negative priorities without an explicit band (else `default_band`).
    pub default_negative_band: Option<BandConfig>,
    /// Explicit bands by priority (always active for the usage-limit policy).
    pub bands: BTreeMap<i32, BandConfig>,
    /// How full the pool may be before each band stops dispatching
    /// (`usageLimitPolicyPluginRef`; default: the static policy, 1.0 for every band).
    pub usage_limit: UsageLimit,
}

impl Default for FlowControlConfig {
    fn default() -> Self {
        FlowControlConfig {
            max_bytes: None,
            max_requests: None,
            default_request_ttl: Some(DEFAULT_REQUEST_TTL),
            no_endpoint_request_ttl: Some(DEFAULT_REQUEST_TTL),
            default_band: BandConfig::default(),
            default_negative_band: None,
            bands: BTreeMap::new(),
            usage_limit: UsageLimit::Static,
        }
    }
}

impl FlowControlConfig {
    /// The band settings that apply to `priority`.
    pub fn band(&self, priority: i32) -> BandConfig {
        if let Some(b) = self.bands.get(&priority) {
            return *b;
        }
        match self.default_negative_band {
            Some(b) if priority < 0 => b,
            _ => self.default_band,
        }
    }
}

/// Why a Kubernetes quantity was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("invalid quantity {0:?}")]
    Syntax(String),
    #[error("must be non-negative, got {0:?}")]
    Negative(String),
    #[error("quantity {0:?} is too large")]
    TooLarge(String),
}

/// Parses a Kubernetes resource quantity (`100`, `1k`, `500M`, `1Gi`, `1.5Gi`, `2e3`) to the
/// integer the reference reads with `Quantity.Value()` (fractions round up).
pub fn parse_quantity(input: &str) -> Result<u64, QuantityError> {
    let s = input.trim();
    let syntax = || QuantityError::Syntax(input.to_string());
    if let Some(rest) = s.strip_prefix('-') {
        // "-0" is zero; anything else negative is refused, as the reference does.
        return match parse_quantity(rest) {
            Ok(0) => Ok(0),
            Ok(_) => Err(QuantityError::Negative(input.to_string())),
            Err(e) => Err(e),
        };
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    if num_end == 0 {
        return Err(syntax());
    }
    let number: f64 = s[..num_end].parse().map_err(|_| syntax())?;
    let suffix = &s[num_end..];
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let e: i32 = exp[1..].parse().map_err(|_| syntax())?;
            10f64.powi(e)
        }
        _ => return Err(syntax()),
    };
    let value = (number * multiplier).ceil();
    if !value.is_finite() || value >= u64::MAX as f64 {
        return Err(QuantityError::TooLarge(input.to_string()));
    }
    Ok(value as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_read_like_kubernetes_values() {
        let cases = [
            ("100", 100),
            ("1k", 1000),
            ("500M", 500_000_000),
            ("1Gi", 1 << 30),
            ("1.5Ki", 1536),
            ("2e3", 2000),
            ("100m", 1),
            ("0", 0),
            ("-0", 0),
            (" 7 ", 7),
        ];
        for (text, want) in cases {
            assert_eq!(parse_quantity(text), Ok(want), "{text}");
        }
        assert_eq!(
            parse_quantity("-5"),
            Err(QuantityError::Negative("-5".into()))
        );
        assert_eq!(
            parse_quantity("5 apples"),
            Err(QuantityError::Syntax("5 apples".into()))
        );
        assert_eq!(
            parse_quantity("Gi"),
            Err(QuantityError::Syntax("Gi".into()))
        );
        assert_eq!(
            parse_quantity("1e30"),
            Err(QuantityError::TooLarge("1e30".into()))
        );
    }

    #[test]
    fn bands_fall_back_to_the_templates() {
        let explicit = BandConfig {
            max_bytes: 10,
            max_requests: 2,
            fairness: Fairness::RoundRobin,
        };
        let negative = BandConfig {
            max_requests: 7,
            ..BandConfig::default()
        };
        let mut c = FlowControlConfig::default();
        c.bands.insert(5, explicit);
        assert_eq!(c.band(5), explicit);
        assert_eq!(c.band(-1), BandConfig::default());
        c.default_negative_band = Some(negative);
        assert_eq!(c.band(-1), negative);
        assert_eq!(c.band(0), BandConfig::default());
    }
}
