//! llm-d-router's load scorers, on Switchyard's own in-flight accounting
//! (`--inflight-accounting`, which plays the part of upstream's `inflight-load-producer`):
//! `active-request-scorer` (`scorer/activerequest`), `token-load-scorer` (`scorer/tokenload`)
//! and `load-aware-scorer` (`scorer/loadaware`, scraped queue depth). With
//! `--inflight-accounting=false` the first two see no load and score every endpoint 1.

use std::sync::Arc;
use std::time::Instant;

use super::predicted_ttft::prompt_tokens;
use super::{CycleState, Plugin, Scorer};
use crate::epp::endpoint::EndpointSnapshot;

/// `active-request-scorer` parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActiveRequestParams {
    /// At or below this many in-flight requests an endpoint scores 1.
    pub idle_threshold: u32,
    /// Highest score of a busy endpoint, in [0, 1].
    pub max_busy_score: f64,
}

impl Default for ActiveRequestParams {
    fn default() -> Self {
        ActiveRequestParams {
            idle_threshold: 0,
            max_busy_score: 1.0,
        }
    }
}

/// `active-request-scorer`: idle endpoints score 1; busy ones `(max − n) / max × maxBusyScore`
/// over the candidates' in-flight request counts.
#[derive(Debug)]
pub struct ActiveRequestScorer {
    pub name: String,
    pub params: ActiveRequestParams,
}

impl Plugin for ActiveRequestScorer {
    fn plugin_type(&self) -> &'static str {
        "active-request-scorer"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

fn in_flight(e: &EndpointSnapshot) -> u32 {
    e.dispatch.as_ref().map_or(0, |d| d.in_flight())
}

impl Scorer for ActiveRequestScorer {
    fn score(&self, _: &CycleState<'_>, eps: &[Arc<EndpointSnapshot>], out: &mut [f64]) {
        let max = eps.iter().map(|e| in_flight(e)).max().unwrap_or(0);
        for (o, e) in out.iter_mut().zip(eps) {
            let n = in_flight(e);
            *o = if n <= self.params.idle_threshold {
                1.0
            } else {
                // n > idle_threshold >= 0, so max >= n > 0.
                f64::from(max - n) / f64::from(max) * self.params.max_busy_score
            };
        }
    }
}

/// Upstream's default `queueThresholdTokens` (128 requests of 32k tokens).
pub const DEFAULT_QUEUE_THRESHOLD_TOKENS: u64 = 4_194_304;

/// `token-load-scorer`: `1 − min(1, tokens / queueThresholdTokens)`, where tokens are the
/// uncached prompt tokens in flight at the endpoint (released at the first response bytes)
/// plus this request's uncached part there.
#[derive(Debug)]
pub struct TokenLoadScorer {
    pub name: String,
    pub queue_threshold_tokens: u64,
}

impl Plugin for TokenLoadScorer {
    fn plugin_type(&self) -> &'static str {
        "token-load-scorer"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl Scorer for TokenLoadScorer {
    fn score(&self, cycle: &CycleState<'_>, eps: &[Arc<EndpointSnapshot>], out: &mut [f64]) {
        let now = Instant::now();
        let prompt = prompt_tokens(cycle.request.prompt);
        let threshold = self.queue_threshold_tokens.max(1) as f64;
        for (i, (o, e)) in out.iter_mut().zip(eps).enumerate() {
            let queued = e
                .dispatch
                .as_ref()
                .map_or(0, |d| d.work.view(now).prefill_tokens);
            let cached = cycle.prefix_matches.get(i).map_or(0, |&m| {
                (m as u64).saturating_mul(cycle.prefix_block_tokens as u64)
            });
            let tokens = queued.saturating_add(prompt.saturating_sub(cached)) as f64;
            *o = 1.0 - (tokens / threshold).min(1.0);
        }
    }

    fn uses_prefix_matches(&self) -> bool {
        true
    }
}

/// Upstream's default `threshold` of `load-aware-scorer`.
pub const DEFAULT_LOAD_AWARE_THRESHOLD: u32 = 128;

/// `load-aware-scorer`: 0.5 for an empty queue, falling linearly to 0 at `threshold` waiting
/// requests (scraped, plus those routed since the last scrape).
#[derive(Debug)]
pub struct LoadAwareScorer {
    pub name: String,
    pub threshold: u32,
}

impl Plugin for LoadAwareScorer {
    fn plugin_type(&self) -> &'static str {
        "load-aware-scorer"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl Scorer for LoadAwareScorer {
    fn score(&self, _: &CycleState<'_>, eps: &[Arc<EndpointSnapshot>], out: &mut [f64]) {
        let threshold = f64::from(self.threshold.max(1));
        for (o, e) in out.iter_mut().zip(eps) {
            let waiting = f64::from(e.metrics.waiting_queue_size.saturating_add(e.unscraped()));
            *o = if waiting >= threshold {
                0.0
            } else {
                0.5 * (1.0 - waiting / threshold)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epp::endpoint::{DispatchCounters, Endpoint, EndpointMetrics};
    use crate::epp::scheduling::SchedulingRequest;

    fn ep_with_load(name: &str, in_flight: usize, waiting: u32) -> Arc<EndpointSnapshot> {
        let mut endpoint = Endpoint::from_addr("127.0.0.1:8000".parse().unwrap());
        endpoint.name = name.into();
        let counters = Arc::new(DispatchCounters::default());
        for _ in 0..in_flight {
            // Leaked on purpose: the count must stay up for the test's lifetime.
            std::mem::forget(counters.dispatch());
        }
        Arc::new(EndpointSnapshot {
            endpoint: Arc::new(endpoint),
            metrics: EndpointMetrics {
                waiting_queue_size: waiting,
                ..Default::default()
            },
            dispatch: Some(counters),
        })
    }

    fn run(s: &dyn Scorer, eps: &[Arc<EndpointSnapshot>], prompt: &[u8]) -> Vec<f64> {
        let req = SchedulingRequest {
            request_id: "r",
            target_model: "m",
            api: Default::default(),
            prompt,
            cache_salt: b"",
            fallbacks: 0,
            headers: &[],
        };
        let cycle = CycleState {
            request: &req,
            prefix_hashes: &[],
            prefix_block_tokens: 16,
            prefix_matches: &[],
            scratch: &crate::epp::scheduling::plugins::scratch::NOTHING_STORED,
        };
        let mut out = vec![f64::NAN; eps.len()];
        s.score(&cycle, eps, &mut out);
        out
    }

    #[test]
    fn active_request_scores_match_upstream() {
        let eps = [
            ep_with_load("a", 0, 0),
            ep_with_load("b", 2, 0),
            ep_with_load("c", 4, 0),
        ];
        let s = ActiveRequestScorer {
            name: "x".into(),
            params: ActiveRequestParams::default(),
        };
        assert_eq!(run(&s, &eps, b""), vec![1.0, 0.5, 0.0]);
        let s = ActiveRequestScorer {
            name: "x".into(),
            params: ActiveRequestParams {
                idle_threshold: 2,
                max_busy_score: 0.5,
            },
        };
        assert_eq!(run(&s, &eps, b""), vec![1.0, 1.0, 0.0]);
    }

    #[test]
    fn token_load_counts_this_requests_tokens() {
        let eps = [ep_with_load("a", 0, 0)];
        let s = TokenLoadScorer {
            name: "x".into(),
            queue_threshold_tokens: 100,
        };
        // 200 bytes ≈ 50 tokens of a 100-token threshold.
        assert_eq!(run(&s, &eps, &[b'x'; 200]), vec![0.5]);
        assert_eq!(run(&s, &eps, &[b'x'; 800]), vec![0.0]);
        assert_eq!(run(&s, &eps, b""), vec![1.0]);
    }

    #[test]
    fn load_aware_is_half_at_idle_and_zero_at_threshold() {
        let eps = [
            ep_with_load("a", 0, 0),
            ep_with_load("b", 0, 64),
            ep_with_load("c", 0, 200),
        ];
        let s = LoadAwareScorer {
            name: "x".into(),
            threshold: 128,
        };
        assert_eq!(run(&s, &eps, b""), vec![0.5, 0.25, 0.0]);
    }
}
