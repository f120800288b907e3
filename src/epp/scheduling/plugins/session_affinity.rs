//! Session affinity (llm-d-router `scheduling/{scorer,filter}/sessionaffinity`,
//! `util/sessionaffinity`): `session-affinity-scorer` prefers and `session-affinity-filter` pins
//! the endpoint that served the session before.
//!
//! Two strategies, as upstream:
//! - `encoded_endpoint_header` (stateless): the response carries `x-session-token` (or the
//!   configured header) = base64 of the endpoint's name; the client sends it back.
//! - `session_id` (stateful): the client sends an opaque id in a header; the EPP binds it to the
//!   endpoint that served it in a bounded store whose unused entries expire after
//!   `evictionTtlSeconds`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use parking_lot::Mutex;

use super::{CycleState, Filter, Plugin, RequestHook, RequestScratch, Scorer};
use crate::epp::endpoint::EndpointSnapshot;
use crate::epp::scheduling::SchedulingRequest;

/// Upstream's default token header.
pub const DEFAULT_TOKEN_HEADER: &str = "x-session-token";
/// Upstream's default session-id header.
pub const DEFAULT_SESSION_ID_HEADER: &str = "x-session-id";
/// Most sessions one `session_id` instance remembers; new sessions are not bound while the
/// store is full of unexpired ones (upstream has no limit; memory here stays bounded).
pub const MAX_SESSIONS: usize = 100_000;
/// Longest session id bound (longer ids express no preference), so one entry stays small.
pub const MAX_SESSION_ID_BYTES: usize = 256;

/// How the session is identified.
#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    /// The request header that carries (and the response header that returns) the token.
    EncodedEndpointHeader { header: String },
    /// Request headers tried in order for the session id, and the binding lifetime.
    SessionId {
        headers: Vec<String>,
        ttl: Duration,
        sweep: Duration,
    },
}

/// One bound session: the endpoint's name and when the binding was last used.
#[derive(Debug)]
struct Binding {
    endpoint: String,
    last_seen: Instant,
}

#[derive(Debug, Default)]
struct Store {
    bindings: HashMap<String, Binding>,
    last_sweep: Option<Instant>,
}

/// The shared state and logic of the scorer and the filter.
#[derive(Debug)]
pub struct SessionAffinity {
    pub name: String,
    type_name: &'static str,
    strategy: Strategy,
    store: Mutex<Store>,
}

impl SessionAffinity {
    pub fn scorer(name: String, strategy: Strategy) -> Arc<Self> {
        Arc::new(Self::new(name, "session-affinity-scorer", strategy))
    }

    pub fn filter(name: String, strategy: Strategy) -> Arc<Self> {
        Arc::new(Self::new(name, "session-affinity-filter", strategy))
    }

    fn new(name: String, type_name: &'static str, strategy: Strategy) -> Self {
        SessionAffinity {
            name,
            type_name,
            strategy,
            store: Mutex::new(Store::default()),
        }
    }

    /// The endpoint name the session points at, if the request names one.
    fn wanted(&self, req: &SchedulingRequest<'_>) -> Option<String> {
        match &self.strategy {
            Strategy::EncodedEndpointHeader { header } => {
                let token = req.header(header)?;
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(token.trim_ascii())
                    .ok()?;
                String::from_utf8(decoded).ok()
            }
            Strategy::SessionId { .. } => {
                let id = self.session_id(req)?;
                let store = self.store.lock();
                store.bindings.get(id).map(|b| b.endpoint.clone())
            }
        }
    }

    /// The first non-empty session id among the configured headers (as text, trimmed).
    fn session_id<'r>(&self, req: &'r SchedulingRequest<'_>) -> Option<&'r str> {
        let Strategy::SessionId { headers, .. } = &self.strategy else {
            return None;
        };
        headers.iter().find_map(|h| {
            let v = std::str::from_utf8(req.header(h)?).ok()?.trim();
            (!v.is_empty() && v.len() <= MAX_SESSION_ID_BYTES).then_some(v)
        })
    }

    /// Binds the session to `endpoint` (session_id strategy), sweeping expired bindings at most
    /// once per sweep interval.
    fn bind(&self, id: &str, endpoint: &str, now: Instant) {
        let Strategy::SessionId { ttl, sweep, .. } = &self.strategy else {
            return;
        };
        let mut store = self.store.lock();
        if store
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= *sweep)
        {
            store
                .bindings
                .retain(|_, b| now.saturating_duration_since(b.last_seen) < *ttl);
            store.last_sweep = Some(now);
        }
        if let Some(b) = store.bindings.get_mut(id) {
            if b.endpoint != endpoint {
                b.endpoint = endpoint.to_string();
            }
            b.last_seen = now;
            return;
        }
        if store.bindings.len() >= MAX_SESSIONS {
            tracing::debug!(plugin = %self.name, "session store full; session not bound");
            return;
        }
        store.bindings.insert(
            id.to_string(),
            Binding {
                endpoint: endpoint.to_string(),
                last_seen: now,
            },
        );
    }

    /// Sessions currently bound (for tests and debugging).
    pub fn bound_sessions(&self) -> usize {
        self.store.lock().bindings.len()
    }
}

impl Plugin for SessionAffinity {
    fn plugin_type(&self) -> &'static str {
        self.type_name
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// The scorer: 1 for the session's endpoint, 0 for every other.
impl Scorer for SessionAffinity {
    fn score(&self, cycle: &CycleState<'_>, eps: &[Arc<EndpointSnapshot>], out: &mut [f64]) {
        out.fill(0.0);
        if let Some(wanted) = self.wanted(cycle.request) {
            for (o, e) in out.iter_mut().zip(eps) {
                if e.endpoint.name == wanted {
                    *o = 1.0;
                }
            }
        }
    }
}

/// The filter: only the session's endpoint when it is a candidate, else every candidate.
impl Filter for SessionAffinity {
    fn filter(&self, request: &SchedulingRequest<'_>, endpoints: &mut Vec<Arc<EndpointSnapshot>>) {
        if let Some(wanted) = self.wanted(request) {
            if endpoints.iter().any(|e| e.endpoint.name == wanted) {
                endpoints.retain(|e| e.endpoint.name == wanted);
            }
        }
    }
}

impl RequestHook for SessionAffinity {
    fn pre_request(
        &self,
        request: &SchedulingRequest<'_>,
        primary: &EndpointSnapshot,
        _scratch: &RequestScratch,
    ) {
        if let Some(id) = self.session_id(request) {
            self.bind(id, &primary.endpoint.name, Instant::now());
        }
    }

    fn response_headers(
        &self,
        _request: &SchedulingRequest<'_>,
        primary: &EndpointSnapshot,
        out: &mut Vec<(String, String)>,
    ) {
        if let Strategy::EncodedEndpointHeader { header } = &self.strategy {
            let token =
                base64::engine::general_purpose::STANDARD.encode(primary.endpoint.name.as_bytes());
            out.push((header.clone(), token));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epp::scheduling::plugins::scorers::tests::ep;

    fn req<'a>(headers: &'a [(String, Vec<u8>)]) -> SchedulingRequest<'a> {
        SchedulingRequest {
            request_id: "r",
            target_model: "m",
            api: Default::default(),
            prompt: b"",
            cache_salt: b"",
            fallbacks: 0,
            headers,
        }
    }

    fn cycle<'a>(r: &'a SchedulingRequest<'a>) -> CycleState<'a> {
        CycleState {
            request: r,
            prefix_hashes: &[],
            prefix_block_tokens: 0,
            prefix_matches: &[],
            scratch: &crate::epp::scheduling::plugins::scratch::NOTHING_STORED,
        }
    }

    fn token_strategy() -> Strategy {
        Strategy::EncodedEndpointHeader {
            header: DEFAULT_TOKEN_HEADER.into(),
        }
    }

    #[test]
    fn token_round_trips_and_scores_the_named_endpoint() {
        let s = SessionAffinity::scorer("sa".into(), token_strategy());
        let eps = vec![
            ep("pod-a", Default::default()),
            ep("pod-b", Default::default()),
        ];
        let mut headers = Vec::new();
        s.response_headers(&req(&[]), &eps[1], &mut headers);
        assert_eq!(
            headers,
            vec![("x-session-token".to_string(), "cG9kLWI=".to_string())]
        );
        let sent = vec![("x-session-token".to_string(), b"cG9kLWI=".to_vec())];
        let r = req(&sent);
        let mut out = vec![0.5; 2];
        s.score(&cycle(&r), &eps, &mut out);
        assert_eq!(out, vec![0.0, 1.0]);
        // Garbage or an unknown endpoint: no preference.
        for bad in [b"%%%".to_vec(), b"b3RoZXI=".to_vec()] {
            let sent = vec![("x-session-token".to_string(), bad)];
            let r = req(&sent);
            s.score(&cycle(&r), &eps, &mut out);
            assert_eq!(out, vec![0.0, 0.0]);
        }
    }

    #[test]
    fn filter_pins_only_when_the_endpoint_is_a_candidate() {
        let f = SessionAffinity::filter("sa".into(), token_strategy());
        let sent = vec![("x-session-token".to_string(), b"cG9kLWI=".to_vec())];
        let r = req(&sent);
        let mut eps = vec![
            ep("pod-a", Default::default()),
            ep("pod-b", Default::default()),
        ];
        f.filter(&r, &mut eps);
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].endpoint.name, "pod-b");
        let mut others = vec![
            ep("pod-a", Default::default()),
            ep("pod-c", Default::default()),
        ];
        f.filter(&r, &mut others);
        assert_eq!(others.len(), 2);
    }

    #[test]
    fn session_id_binds_after_the_decision_and_expires() {
        let s = SessionAffinity::scorer(
            "sa".into(),
            Strategy::SessionId {
                headers: vec!["x-session-id".into()],
                ttl: Duration::from_secs(300),
                sweep: Duration::from_secs(10),
            },
        );
        let eps = vec![
            ep("pod-a", Default::default()),
            ep("pod-b", Default::default()),
        ];
        let sent = vec![("x-session-id".to_string(), b" chat-7 ".to_vec())];
        let r = req(&sent);
        let mut out = vec![0.0; 2];
        s.score(&cycle(&r), &eps, &mut out);
        assert_eq!(out, vec![0.0, 0.0], "unbound session: no preference");
        s.pre_request(&r, &eps[1], &RequestScratch::new());
        s.score(&cycle(&r), &eps, &mut out);
        assert_eq!(out, vec![0.0, 1.0]);
        let mut headers = Vec::new();
        s.response_headers(&r, &eps[1], &mut headers);
        assert!(headers.is_empty(), "session_id writes nothing back");

        // A sweep after the TTL drops the unused binding.
        let later = Instant::now() + Duration::from_secs(301);
        s.bind("other", "pod-a", later);
        assert_eq!(s.bound_sessions(), 1);
        s.score(&cycle(&r), &eps, &mut out);
        assert_eq!(out, vec![0.0, 0.0]);
    }

    #[test]
    fn session_store_is_bounded() {
        let s = SessionAffinity::scorer(
            "sa".into(),
            Strategy::SessionId {
                headers: vec!["x-session-id".into()],
                ttl: Duration::from_secs(300),
                sweep: Duration::from_secs(10),
            },
        );
        let now = Instant::now();
        for i in 0..MAX_SESSIONS + 10 {
            s.bind(&i.to_string(), "pod-a", now);
        }
        assert_eq!(s.bound_sessions(), MAX_SESSIONS);
        let long = "x".repeat(MAX_SESSION_ID_BYTES + 1);
        let sent = vec![("x-session-id".to_string(), long.into_bytes())];
        assert_eq!(s.session_id(&req(&sent)), None);
    }
}
