//! One routing decision: parse → admission → candidates → schedule → reply data.
//!
//! Deciding is a function of (request, datastore snapshot); what a decision teaches (prefix
//! index, in-flight counts) is recorded right after it in [`Director::remember`]. No protocol
//! details live here (those are in `extproc`). Error texts and codes are the reference EPP's (GIE v1.5.0
//! `pkg/epp/requestcontrol/director.go`).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use rand::Rng;

use super::datastore::{Datastore, RequestPolicy, RewriteTarget};
use super::endpoint::{EndpointSnapshot, InflightGuard};
use super::flowcontrol::{FlowError, PoolState};
use super::kvcache::CachedPrediction;
use super::request::{self, ApiType, RequestError};
use super::saturation::SaturationDetector;
use super::scheduling::{ScheduleError, ScheduleResult, Scheduler, SchedulingRequest};
use super::work::WorkGuard;

/// Why a request cannot be routed. Which HTTP status and reply text each reason gets is decided
/// in one place, `extproc::replies` (the texts are the reference's, GIE v1.5.0 `director.go`).
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The body is not a JSON object with a string `model`.
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("no pods available in datastore")]
    NoPods,
    #[error("system saturated, sheddable request dropped")]
    Saturated,
    /// No endpoint left after the subset hint.
    #[error("failed to find endpoint candidates for serving the request")]
    NoCandidates,
    #[error("failed to find target endpoint: {0}")]
    Schedule(#[from] ScheduleError),
    /// Flow control rejected or evicted the request (`flowControl` feature gate).
    #[error(transparent)]
    FlowControl(#[from] FlowError),
}

/// A [`RouteError`] with the model labels of the error metric (empty when the body was not
/// parsed).
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct RoutingError {
    #[source]
    pub reason: RouteError,
    /// Model label values for the error metric (empty when the body was not parsed; allow-listed
    /// by [`label_for_model`], so never request text the configuration does not name).
    pub model: String,
    pub target_model: String,
}

impl From<RouteError> for RoutingError {
    fn from(reason: RouteError) -> Self {
        RoutingError {
            reason,
            model: String::new(),
            target_model: String::new(),
        }
    }
}

impl RoutingError {
    pub fn with_models(mut self, model: &str, target: &str) -> Self {
        self.model = model.to_string();
        self.target_model = target.to_string();
        self
    }
}

/// Request facts taken from the headers and metadata before the body arrives.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    pub api: ApiType,
    pub request_id: String,
    pub objective: Option<String>,
    pub model_rewrite: Option<String>,
    /// Subset hint from `envoy.lb.subset_hint` metadata or, with
    /// `--enable-conformance-test-header`, the conformance test header.
    pub subset: Option<Vec<String>>,
    /// Incoming headers (lowercase names, raw values) that are set again on the routed request;
    /// plugins read them too (session affinity, the conformance test filter).
    pub headers: Vec<(String, Vec<u8>)>,
    /// `x-gateway-inference-fairness-id` (flow control's flow key; absent: `default-flow`).
    pub fairness_id: Option<String>,
}

/// Where to send the request and what to send.
#[derive(Debug)]
pub struct Decision {
    /// Primary first, then fallbacks; never empty.
    pub endpoints: Vec<Arc<EndpointSnapshot>>,
    /// This request's share of its primary endpoint's in-flight count (`--inflight-accounting`),
    /// released when the decision is dropped (the stream ends, however it ends).
    pub inflight: Option<InflightGuard>,
    /// This request's predicted prefill (then decode) work at the primary, for the work-aware
    /// scorer (`--inflight-accounting`); the response side marks the first token on it.
    pub work: Option<WorkGuard>,
    /// `ip:port[,ip:port...]` for the destination header and metadata.
    pub destination: String,
    /// The body to forward when the model was rewritten; `None` forwards the original bytes.
    pub rewritten_body: Option<Vec<u8>>,
    pub incoming_model: String,
    pub target_model: String,
    /// `incoming_model` / `target_model` as metric label values ([`label_for_model`]).
    pub model_label: String,
    pub target_label: String,
    pub priority: i32,
    pub stream: bool,
    /// Predicted prefill tokens at the primary (prompt less its expected cached prefix), what
    /// the work-aware accounting charges it until the first response bytes.
    pub prefill_tokens: u64,
    /// Headers plugins want on the response to the client (e.g. the session token).
    pub response_headers: Vec<(String, String)>,
    /// Cached tokens the primary is expected to report, compared with its usage on the
    /// response path (`kvcache::accuracy`).
    pub prediction: CachedPrediction,
}

impl Decision {
    /// The endpoint the request goes to first (the one in-flight accounting counts).
    pub fn primary(&self) -> Option<&Arc<EndpointSnapshot>> {
        self.endpoints.first()
    }
}

/// What routing learns from a body before it chooses an endpoint. Flow control queues a
/// request with this and binds it to an endpoint later ([`Director::route_parsed`]).
#[derive(Debug, Clone)]
pub struct Parsed {
    pub incoming_model: String,
    pub target_model: String,
    pub priority: i32,
    /// `incoming_model` / `target_model` as metric label values ([`label_for_model`]).
    pub model_label: String,
    pub target_label: String,
}

impl Parsed {
    /// `reason` with this request's model labels.
    pub fn error(&self, reason: RouteError) -> RoutingError {
        RoutingError::from(reason).with_models(&self.model_label, &self.target_label)
    }
}

/// Static knobs of the director, from flags.
#[derive(Debug, Clone)]
pub struct DirectorConfig {
    /// Extra endpoints after the primary in the destination header (`--fallback-endpoints`).
    pub fallback_endpoints: usize,
    /// Ignore subset hints (`--disable-endpoint-subset-filter`).
    pub disable_subset_filter: bool,
    /// Model names allowed as metric label values besides those the policy names
    /// (`--known-models`).
    pub known_models: HashSet<String>,
    /// Count each routed request against its primary endpoint until its stream ends
    /// (`--inflight-accounting`), so scorers see load the last scrape could not show yet.
    pub inflight_accounting: bool,
}

/// The label value every model name not allow-listed is counted under.
pub const OTHER_MODEL_LABEL: &str = "other";
/// Longest model name used as a label value (the reference CRDs cap model names at 256).
pub const MAX_MODEL_LABEL_BYTES: usize = 256;

/// The metric label value for a model name taken from a request (body `model` or the rewrite
/// header): the name itself when the configuration names it — an objective, a rewrite rule's
/// model or target, or `--known-models` — or a pool endpoint reports serving it as a LoRA
/// adapter (running or waiting, from its scraped metrics), and it is at most
/// [`MAX_MODEL_LABEL_BYTES`]; else [`OTHER_MODEL_LABEL`]. The empty name (no body) stays empty.
/// Label values are therefore a set the operator and the pool's servers define, whatever clients
/// send; their text is still escaped when encoded.
pub fn label_for_model<'a>(
    name: &'a str,
    policy: &RequestPolicy,
    known: &HashSet<String>,
    pool: &[Arc<EndpointSnapshot>],
) -> &'a str {
    if name.is_empty() {
        return name;
    }
    let named = name.len() <= MAX_MODEL_LABEL_BYTES
        && (known.contains(name)
            || policy.objectives.contains_key(name)
            || policy.model_rewrites.contains_key(name)
            || policy
                .model_rewrites
                .values()
                .chain(policy.default_rewrite.as_ref())
                .flatten()
                .any(|t| t.model == name)
            || pool
                .iter()
                .filter_map(|e| e.metrics.lora.as_ref())
                .any(|l| l.running.iter().chain(&l.waiting).any(|a| a == name)));
    if named {
        name
    } else {
        OTHER_MODEL_LABEL
    }
}

pub struct Director {
    datastore: Arc<Datastore>,
    scheduler: Arc<Scheduler>,
    saturation: SaturationDetector,
    config: DirectorConfig,
}

impl Director {
    pub fn new(
        datastore: Arc<Datastore>,
        scheduler: Arc<Scheduler>,
        saturation: SaturationDetector,
        config: DirectorConfig,
    ) -> Self {
        Director {
            datastore,
            scheduler,
            saturation,
            config,
        }
    }

    /// Routes a request that has no body (header-only). The reference picks a random endpoint;
    /// we run the scheduler with an empty prompt, so queue and KV load still count.
    pub fn route_headers_only(&self, meta: &RequestMeta) -> Result<Decision, RoutingError> {
        let snapshot = self.datastore.snapshot();
        if snapshot.is_empty() {
            return Err(RouteError::NoPods.into());
        }
        let candidates = non_empty(self.subset(snapshot, meta)).map_err(RoutingError::from)?;
        let req = SchedulingRequest {
            request_id: &meta.request_id,
            target_model: "",
            api: meta.api,
            prompt: &[],
            cache_salt: &[],
            fallbacks: self.config.fallback_endpoints,
            headers: &meta.headers,
        };
        let result = self
            .scheduler
            .schedule(&req, &candidates)
            .map_err(RouteError::from)?;
        let (inflight, work) = self.remember(&result);
        let response_headers = self.scheduler.after_decision(&req, &result);
        Ok(Decision {
            destination: destination_value(&result.endpoints),
            endpoints: result.endpoints,
            inflight,
            work,
            rewritten_body: None,
            incoming_model: String::new(),
            target_model: String::new(),
            model_label: String::new(),
            target_label: String::new(),
            priority: 0,
            stream: false,
            prefill_tokens: result.prefill_tokens,
            response_headers,
            prediction: result.prediction,
        })
    }

    /// Routes a request with its complete body (flow control off): parse, the reference's
    /// saturation admission for sheddable requests, then schedule.
    pub fn route(&self, meta: &RequestMeta, body: &[u8]) -> Result<Decision, RoutingError> {
        let inspected = request::inspect(body, meta.api).map_err(RouteError::from)?;
        let snapshot = self.datastore.snapshot();
        let parsed = self.parse_inspected(meta, &inspected, &snapshot);
        // Admission looks at the subset-filtered candidates, as the reference's admission
        // controller does; an empty subset therefore counts as saturated for sheddable requests.
        let candidates = self.subset(snapshot, meta);
        if parsed.priority < 0
            && self
                .saturation
                .is_saturated(&candidates, tokio::time::Instant::now())
        {
            return Err(parsed.error(RouteError::Saturated));
        }
        self.decide(meta, body, &inspected, parsed, candidates)
    }

    /// Parses a request for flow control: what it queues with (priority, target model,
    /// labels). Bad bodies fail here, before they take a place in a queue.
    pub fn parse(&self, meta: &RequestMeta, body: &[u8]) -> Result<Parsed, RoutingError> {
        let inspected = request::inspect(body, meta.api).map_err(RouteError::from)?;
        Ok(self.parse_inspected(meta, &inspected, &self.datastore.snapshot()))
    }

    /// Schedules a request flow control has just let out of its queue (late binding: the
    /// endpoint is chosen now, on the metrics of now). The body is parsed again rather than
    /// kept parsed, because the parsed prompt borrows from it; this costs microseconds against
    /// a wait in the queue. `ceiling` is the request's band's usage ceiling: below 1.0 (a
    /// band held back by `priority-holdback-policy`) only endpoints scoring below it are
    /// candidates, so the headroom it leaves for higher bands stays on every endpoint, not
    /// just on the pool as a whole.
    pub fn route_parsed(
        &self,
        meta: &RequestMeta,
        body: &[u8],
        parsed: Parsed,
        ceiling: f64,
    ) -> Result<Decision, RoutingError> {
        let inspected = match request::inspect(body, meta.api) {
            Ok(i) => i,
            Err(e) => return Err(parsed.error(e.into())),
        };
        let mut candidates = self.subset(self.datastore.snapshot(), meta);
        if ceiling < 1.0 {
            let now = tokio::time::Instant::now();
            let below: Vec<_> = candidates
                .iter()
                .filter(|e| self.saturation.gate_score(e, now) < ceiling)
                .cloned()
                .collect();
            // The gate saw room a moment ago; if it is gone (a subset hint, a finished
            // scrape), schedule over all rather than fail a request that was let out.
            if !below.is_empty() {
                candidates = below;
            }
        }
        self.decide(meta, body, &inspected, parsed, candidates)
    }

    /// The pool as flow control's dispatch gate sees it: endpoint count, the saturation
    /// detector's mean and lowest endpoint score, counting requests this EPP dispatched since
    /// the last scrape as waiting (otherwise a whole queue would leave between two scrapes).
    pub fn pool_state(&self) -> PoolState {
        let snapshot = self.datastore.snapshot();
        let (saturation, least_loaded) = self
            .saturation
            .scores_with_dispatches(&snapshot, tokio::time::Instant::now());
        PoolState {
            endpoints: snapshot.len(),
            saturation,
            least_loaded,
        }
    }

    /// Target model (rewrite header, else the body's model; a rewrite rule for the incoming
    /// model then picks a weighted target, in the reference's order), priority and labels.
    fn parse_inspected(
        &self,
        meta: &RequestMeta,
        inspected: &request::InspectedBody<'_>,
        snapshot: &[Arc<EndpointSnapshot>],
    ) -> Parsed {
        let policy = self.datastore.policy();
        let incoming_model = inspected.model.to_string();
        let mut target_model = meta
            .model_rewrite
            .clone()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| incoming_model.clone());
        let rule = policy
            .model_rewrites
            .get(&incoming_model)
            .or(policy.default_rewrite.as_ref());
        if let Some(targets) = rule {
            if let Some(t) = pick_weighted(targets, &mut rand::rng()) {
                target_model = t.to_string();
            }
        }
        let priority = meta
            .objective
            .as_deref()
            .and_then(|name| policy.objectives.get(name).copied())
            .unwrap_or(0);
        let known = &self.config.known_models;
        let model_label = label_for_model(&incoming_model, &policy, known, snapshot).to_string();
        let target_label = if target_model == incoming_model {
            model_label.clone()
        } else {
            label_for_model(&target_model, &policy, known, snapshot).to_string()
        };
        Parsed {
            incoming_model,
            target_model,
            priority,
            model_label,
            target_label,
        }
    }

    /// Candidates → schedule → remember → the decision.
    fn decide(
        &self,
        meta: &RequestMeta,
        body: &[u8],
        inspected: &request::InspectedBody<'_>,
        parsed: Parsed,
        candidates: Vec<Arc<EndpointSnapshot>>,
    ) -> Result<Decision, RoutingError> {
        let candidates = match non_empty(candidates) {
            Ok(c) => c,
            Err(e) => return Err(parsed.error(e)),
        };
        let req = SchedulingRequest {
            request_id: &meta.request_id,
            target_model: &parsed.target_model,
            api: meta.api,
            prompt: &inspected.prompt,
            cache_salt: inspected.cache_salt.as_bytes(),
            fallbacks: self.config.fallback_endpoints,
            headers: &meta.headers,
        };
        let result = match self.scheduler.schedule(&req, &candidates) {
            Ok(r) => r,
            Err(e) => return Err(parsed.error(e.into())),
        };
        let (inflight, work) = self.remember(&result);
        let response_headers = self.scheduler.after_decision(&req, &result);

        let Parsed {
            incoming_model,
            target_model,
            priority,
            model_label,
            target_label,
        } = parsed;
        let rewritten_body =
            (target_model != incoming_model).then(|| inspected.rewrite_model(body, &target_model));
        Ok(Decision {
            destination: destination_value(&result.endpoints),
            endpoints: result.endpoints,
            inflight,
            work,
            rewritten_body,
            incoming_model,
            target_model,
            model_label,
            target_label,
            priority,
            stream: inspected.stream,
            prefill_tokens: result.prefill_tokens,
            response_headers,
            prediction: result.prediction,
        })
    }

    /// What is learnt from a decision, in one place: the prefix index remembers that the prompt
    /// now sits on the primary endpoint, and (with `--inflight-accounting`) the primary counts
    /// the request and its predicted prefill work until the returned guards are dropped.
    /// Fallbacks are only tried if the primary fails, so they count nothing.
    fn remember(&self, result: &ScheduleResult) -> (Option<InflightGuard>, Option<WorkGuard>) {
        if let Some(prefix) = self.scheduler.prefix_cache() {
            prefix.record(result);
        }
        if !self.config.inflight_accounting {
            return (None, None);
        }
        let Some(counters) = result.primary().and_then(|e| e.dispatch.as_ref()) else {
            return (None, None);
        };
        (
            Some(counters.dispatch()),
            Some(WorkGuard::dispatch(
                counters,
                result.prefill_tokens,
                Instant::now(),
            )),
        )
    }

    /// Applies the subset hint (unless disabled).
    fn subset(
        &self,
        snapshot: Vec<Arc<EndpointSnapshot>>,
        meta: &RequestMeta,
    ) -> Vec<Arc<EndpointSnapshot>> {
        match (&meta.subset, self.config.disable_subset_filter) {
            (Some(subset), false) => {
                let filters: Vec<SubsetEntry> = subset
                    .iter()
                    .filter_map(|s| SubsetEntry::parse(s))
                    .collect();
                snapshot
                    .into_iter()
                    .filter(|s| filters.iter().any(|f| f.matches(s.endpoint.addr)))
                    .collect()
            }
            _ => snapshot,
        }
    }
}

/// No candidate left after the subset hint.
fn non_empty(
    candidates: Vec<Arc<EndpointSnapshot>>,
) -> Result<Vec<Arc<EndpointSnapshot>>, RouteError> {
    if candidates.is_empty() {
        return Err(RouteError::NoCandidates);
    }
    Ok(candidates)
}

fn destination_value(endpoints: &[Arc<EndpointSnapshot>]) -> String {
    let mut out = String::with_capacity(endpoints.len() * 22);
    for (i, e) in endpoints.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&e.endpoint.addr.to_string());
    }
    out
}

/// Weighted random choice among rewrite targets; all-zero weights choose uniformly.
fn pick_weighted<'a>(targets: &'a [RewriteTarget], rng: &mut impl Rng) -> Option<&'a str> {
    if targets.is_empty() {
        return None;
    }
    let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
    if total == 0 {
        return targets
            .get(rng.random_range(0..targets.len()))
            .map(|t| t.model.as_str());
    }
    let mut point = rng.random_range(0..total);
    for t in targets {
        let w = u64::from(t.weight);
        if point < w {
            return Some(&t.model);
        }
        point -= w;
    }
    targets.last().map(|t| t.model.as_str())
}

/// One subset-hint entry: `ip:port` matches exactly, a bare `ip` matches every port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubsetEntry {
    Exact(SocketAddr),
    AnyPort(IpAddr),
}

impl SubsetEntry {
    fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Some(SubsetEntry::Exact(addr));
        }
        let bare = s.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<IpAddr>().ok().map(SubsetEntry::AnyPort)
    }

    fn matches(self, addr: SocketAddr) -> bool {
        match self {
            SubsetEntry::Exact(a) => a == addr,
            SubsetEntry::AnyPort(ip) => ip == addr.ip(),
        }
    }
}

/// Splits a subset hint given as a comma-separated string.
pub fn split_subset(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn metric_labels_name_only_configured_or_served_models() {
        use crate::epp::endpoint::{Endpoint, EndpointMetrics, LoraInfo};
        let policy = RequestPolicy {
            objectives: [("objective-model".to_string(), 1)].into(),
            model_rewrites: [(
                "source".to_string(),
                vec![RewriteTarget {
                    model: "target".to_string(),
                    weight: 1,
                }],
            )]
            .into(),
            default_rewrite: Some(vec![RewriteTarget {
                model: "fallback".to_string(),
                weight: 1,
            }]),
        };
        let known: HashSet<String> = ["flag-model".to_string()].into();
        let pool = vec![Arc::new(EndpointSnapshot {
            endpoint: Arc::new(Endpoint::from_addr("10.0.0.1:8000".parse().unwrap())),
            metrics: EndpointMetrics {
                lora: Some(LoraInfo {
                    max_lora: 2,
                    running: vec!["adapter-a".to_string()],
                    waiting: vec!["adapter-b".to_string()],
                }),
                ..Default::default()
            },
            dispatch: None,
        })];
        let long = "x".repeat(MAX_MODEL_LABEL_BYTES + 1);
        let cases = [
            ("", ""),
            ("objective-model", "objective-model"),
            ("source", "source"),
            ("target", "target"),
            ("fallback", "fallback"),
            ("flag-model", "flag-model"),
            ("adapter-a", "adapter-a"),
            ("adapter-b", "adapter-b"),
            ("anything-else", OTHER_MODEL_LABEL),
            ("evil\"} 1\n", OTHER_MODEL_LABEL),
            (long.as_str(), OTHER_MODEL_LABEL),
        ];
        for (name, want) in cases {
            assert_eq!(
                label_for_model(name, &policy, &known, &pool),
                want,
                "{name:?}"
            );
        }
        let mut long_known = known.clone();
        long_known.insert(long.clone());
        assert_eq!(
            label_for_model(&long, &policy, &long_known, &pool),
            OTHER_MODEL_LABEL,
            "over the length cap even when configured"
        );
    }

    #[test]
    fn subset_entries_match_exact_or_any_port() {
        let a: SocketAddr = "10.0.0.1:8000".parse().unwrap();
        assert!(SubsetEntry::parse("10.0.0.1:8000").unwrap().matches(a));
        assert!(!SubsetEntry::parse("10.0.0.1:8001").unwrap().matches(a));
        assert!(SubsetEntry::parse("10.0.0.1").unwrap().matches(a));
        assert!(SubsetEntry::parse("[::1]")
            .unwrap()
            .matches("[::1]:9".parse().unwrap()));
        assert_eq!(SubsetEntry::parse("not-an-ip"), None);
        assert_eq!(split_subset(" a, b ,,c"), vec!["a", "b", "c"]);
    }

    #[test]
    fn weighted_rewrite_respects_weights() {
        let targets = vec![
            RewriteTarget {
                model: "a".into(),
                weight: 0,
            },
            RewriteTarget {
                model: "b".into(),
                weight: 3,
            },
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..100 {
            assert_eq!(pick_weighted(&targets, &mut rng), Some("b"));
        }
        let zero = vec![
            RewriteTarget {
                model: "a".into(),
                weight: 0,
            },
            RewriteTarget {
                model: "b".into(),
                weight: 0,
            },
        ];
        let picks: std::collections::HashSet<_> = (0..100)
            .filter_map(|_| pick_weighted(&zero, &mut rng))
            .collect();
        assert_eq!(picks.len(), 2);
        assert_eq!(pick_weighted(&[], &mut rng), None);
    }
}
