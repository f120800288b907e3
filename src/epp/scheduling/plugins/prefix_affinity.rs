//! `prefix-cache-affinity-filter` (llm-d-router `scheduling/filter/prefixcacheaffinity`): keeps
//! only the "sticky" endpoints, whose approximate prefix-cache score (matched blocks / the
//! request's blocks) reaches `affinityThreshold`, unless none is sticky, a random draw below
//! `explorationProbability` skips the gate, or the best sticky endpoint's estimated TTFT
//! (in-flight uncached prompt tokens / `peakPrefillThroughput`) is more than
//! `maxTTFTPenaltyMs` worse than the best other endpoint's.

use std::sync::Arc;
use std::time::Instant;

use rand::Rng;

use super::{Filter, Plugin};
use crate::epp::endpoint::EndpointSnapshot;
use crate::epp::scheduling::SchedulingRequest;

/// The filter's parameters (upstream defaults in [`Default`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixAffinityParams {
    pub affinity_threshold: f64,
    pub exploration_probability: f64,
    pub max_ttft_penalty_ms: f64,
    pub peak_prefill_throughput: f64,
}

impl Default for PrefixAffinityParams {
    fn default() -> Self {
        PrefixAffinityParams {
            affinity_threshold: 0.80,
            exploration_probability: 0.0,
            max_ttft_penalty_ms: 18000.0,
            peak_prefill_throughput: 15928.0,
        }
    }
}

#[derive(Debug)]
pub struct PrefixCacheAffinityFilter {
    pub name: String,
    pub params: PrefixAffinityParams,
}

impl Plugin for PrefixCacheAffinityFilter {
    fn plugin_type(&self) -> &'static str {
        "prefix-cache-affinity-filter"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl PrefixCacheAffinityFilter {
    /// Estimated TTFT (ms) of the best of `eps`.
    fn best_ttft(&self, eps: &[&Arc<EndpointSnapshot>], now: Instant) -> f64 {
        eps.iter()
            .map(|e| {
                let tokens = e
                    .dispatch
                    .as_ref()
                    .map_or(0, |d| d.work.view(now).prefill_tokens);
                tokens as f64 / self.params.peak_prefill_throughput * 1000.0
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// The gate, given a draw in [0, 1) for exploration.
    fn apply(
        &self,
        endpoints: &mut Vec<Arc<EndpointSnapshot>>,
        matches: &[usize],
        total_blocks: usize,
        draw: f64,
    ) {
        let p = &self.params;
        if endpoints.len() <= 1 || p.affinity_threshold <= 0.0 || draw < p.exploration_probability {
            return;
        }
        let score = |i: usize| -> f64 {
            if total_blocks == 0 {
                return 0.0;
            }
            matches.get(i).copied().unwrap_or(0) as f64 / total_blocks as f64
        };
        let (mut sticky, mut other) = (Vec::new(), Vec::new());
        for (i, e) in endpoints.iter().enumerate() {
            if score(i) >= p.affinity_threshold {
                sticky.push(e);
            } else {
                other.push(e);
            }
        }
        if sticky.is_empty() {
            return;
        }
        if p.max_ttft_penalty_ms > 0.0 && !other.is_empty() {
            let now = Instant::now();
            if self.best_ttft(&sticky, now) - self.best_ttft(&other, now) > p.max_ttft_penalty_ms {
                return;
            }
        }
        let kept: Vec<Arc<EndpointSnapshot>> = sticky.into_iter().cloned().collect();
        *endpoints = kept;
    }
}

impl Filter for PrefixCacheAffinityFilter {
    /// Without prefix data (no index): keeps every endpoint.
    fn filter(&self, _: &SchedulingRequest<'_>, _: &mut Vec<Arc<EndpointSnapshot>>) {}

    fn uses_prefix_matches(&self) -> bool {
        true
    }

    fn filter_with_prefix(
        &self,
        _: &SchedulingRequest<'_>,
        endpoints: &mut Vec<Arc<EndpointSnapshot>>,
        matches: &[usize],
        total_blocks: usize,
    ) {
        let draw = rand::rng().random::<f64>();
        self.apply(endpoints, matches, total_blocks, draw);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epp::endpoint::{DispatchCounters, Endpoint};
    use crate::epp::work::WorkGuard;

    fn ep(name: &str, queued_tokens: u64) -> Arc<EndpointSnapshot> {
        let mut endpoint = Endpoint::from_addr("127.0.0.1:8000".parse().unwrap());
        endpoint.name = name.into();
        let counters = Arc::new(DispatchCounters::default());
        if queued_tokens > 0 {
            // Kept alive for the test: the tokens stay queued.
            std::mem::forget(WorkGuard::dispatch(
                &counters,
                queued_tokens,
                Instant::now(),
            ));
        }
        Arc::new(EndpointSnapshot {
            endpoint: Arc::new(endpoint),
            metrics: Default::default(),
            dispatch: Some(counters),
        })
    }

    fn names(eps: &[Arc<EndpointSnapshot>]) -> Vec<&str> {
        eps.iter().map(|e| e.endpoint.name.as_str()).collect()
    }

    fn run(
        params: PrefixAffinityParams,
        loads: [u64; 3],
        matches: [usize; 3],
        draw: f64,
    ) -> Vec<String> {
        let f = PrefixCacheAffinityFilter {
            name: "f".into(),
            params,
        };
        let mut eps = vec![ep("a", loads[0]), ep("b", loads[1]), ep("c", loads[2])];
        f.apply(&mut eps, &matches, 10, draw);
        names(&eps).into_iter().map(String::from).collect()
    }

    #[test]
    fn keeps_sticky_endpoints_unless_too_slow_or_exploring() {
        let d = PrefixAffinityParams::default();
        assert_eq!(run(d, [0, 0, 0], [9, 8, 2], 0.5), ["a", "b"]);
        assert_eq!(
            run(d, [0, 0, 0], [7, 1, 0], 0.5),
            ["a", "b", "c"],
            "none sticky"
        );
        // 15928 tokens/s: 318,560 queued tokens is 20 s, over the 18 s penalty.
        assert_eq!(run(d, [318_560, 0, 0], [9, 0, 0], 0.5), ["a", "b", "c"]);
        assert_eq!(run(d, [159_280, 0, 0], [9, 0, 0], 0.5), ["a"]);
        let explore = PrefixAffinityParams {
            exploration_probability: 0.1,
            ..d
        };
        assert_eq!(run(explore, [0, 0, 0], [9, 0, 0], 0.05), ["a", "b", "c"]);
        assert_eq!(run(explore, [0, 0, 0], [9, 0, 0], 0.5), ["a"]);
        let off = PrefixAffinityParams {
            affinity_threshold: 0.0,
            ..d
        };
        assert_eq!(run(off, [0, 0, 0], [9, 0, 0], 0.5), ["a", "b", "c"]);
    }
}
