//! Scorers with the reference formulas (GIE v1.5.0 `framework/plugins/scheduling/scorer/*`):
//! queue depth, running requests, KV-cache utilisation, LoRA affinity and prefix-cache affinity.

use std::sync::Arc;

use super::{CycleState, Plugin, Scorer};
use crate::epp::endpoint::{EndpointMetrics, EndpointSnapshot};

macro_rules! plugin_impl {
    ($t:ty, $type_name:literal) => {
        impl Plugin for $t {
            fn plugin_type(&self) -> &'static str {
                $type_name
            }
            fn name(&self) -> &str {
                &self.name
            }
        }
    };
}

/// `(max − v) / (max − min)`, 1.0 for all when every value is equal (`queuedepth/queue.go`).
fn min_max_inverse(values: impl Iterator<Item = u32> + Clone, out: &mut [f64]) {
    let (mut lo, mut hi) = (u32::MAX, u32::MIN);
    for v in values.clone() {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    for (o, v) in out.iter_mut().zip(values) {
        *o = if hi == lo {
            1.0
        } else {
            f64::from(hi - v) / f64::from(hi - lo)
        };
    }
}

/// [`min_max_inverse`] over a scraped count plus the requests routed to each endpoint since its
/// last scrape: they are waiting or running there by now, but the scrape cannot show them yet
/// (0 with `--inflight-accounting=false`).
fn min_max_inverse_with_unscraped(
    eps: &[Arc<EndpointSnapshot>],
    scraped: impl Fn(&EndpointMetrics) -> u32,
    out: &mut [f64],
) {
    min_max_inverse(
        eps.iter()
            .map(|e| scraped(&e.metrics).saturating_add(e.unscraped())),
        out,
    );
}

/// `queue-scorer`: fewer waiting requests score higher, relative to the other candidates.
#[derive(Debug)]
pub struct QueueScorer {
    pub name: String,
}
plugin_impl!(QueueScorer, "queue-scorer");

impl Scorer for QueueScorer {
    fn score(&self, _: &CycleState<'_>, eps: &[Arc<EndpointSnapshot>], out: &mut [f64]) {
        min_max_inverse_with_unscraped(eps, |m| m.waiting_queue_size, out);
    }
}

/// `running-requests-size-scorer`: the queue formula on running requests.
#[derive(Debug)]
pub struct RunningRequestsScorer {
    pub name: String,
}
plugin_impl!(RunningRequestsScorer, "running-requests-size-scorer");

impl Scorer for RunningRequestsScorer {
    fn score(&self, _: &CycleState<'_>, eps: &[Arc<EndpointSnapshot>], out: &mut [f64]) {
        min_max_inverse_with_unscraped(eps, |m| m.running_requests, out);
    }
}

/// `kv-cache-utilization-scorer`: `1 − kv_usage`.
#[derive(Debug)]
pub struct KvCacheUtilizationScorer {
    pub name: String,
}
plugin_impl!(KvCacheUtilizationScorer, "kv-cache-utilization-scorer");

impl Scorer for KvCacheUtilizationScorer {
    fn score(&self, _: &CycleState<'_>, eps: &[Arc<EndpointSnapshot>], out: &mut [f64]) {
        for (o, e) in out.iter_mut().zip(eps) {
            *o = 1.0 - e.metrics.kv_cache_usage;
        }
    }
}

/// `lora-affinity-scorer`: 1.0 when the target adapter is active, 0.8 when another adapter can
/// be loaded, 0.6 when it is waiting, else 0 (`loraaffinity/lora_affinity.go`).
#[derive(Debug)]
pub struct LoraAffinityScorer {
    pub name: String,
}
plugin_impl!(LoraAffinityScorer, "lora-affinity-scorer");

impl Scorer for LoraAffinityScorer {
    fn score(&self, cycle: &CycleState<'_>, eps: &[Arc<EndpointSnapshot>], out: &mut [f64]) {
        let target = cycle.request.target_model;
        for (o, e) in out.iter_mut().zip(eps) {
            *o = match &e.metrics.lora {
                None => 0.0,
                Some(lora) => {
                    let active = lora.running.iter().any(|a| a == target);
                    let waiting = lora.waiting.iter().any(|a| a == target);
                    // Slots are counted over distinct adapters, as the reference's maps do.
                    let used = distinct(&lora.running, &lora.waiting);
                    if active {
                        1.0
                    } else if used < lora.max_lora as usize {
                        0.8
                    } else if waiting {
                        0.6
                    } else {
                        0.0
                    }
                }
            };
        }
    }
}

/// `len(ActiveModels) + len(WaitingModels)` where each is a set of adapter names.
fn distinct(running: &[String], waiting: &[String]) -> usize {
    let count = |list: &[String]| {
        list.iter()
            .enumerate()
            .filter(|(i, a)| !list[..*i].contains(a))
            .count()
    };
    count(running) + count(waiting)
}

/// `prefix-cache-scorer`: `matched_blocks / total_blocks`, from the matches the scheduler looked
/// up in the shared prefix index before scoring (0 when the prompt has no full block).
#[derive(Debug)]
pub struct PrefixCacheScorer {
    pub name: String,
}
plugin_impl!(PrefixCacheScorer, "prefix-cache-scorer");

impl Scorer for PrefixCacheScorer {
    fn score(&self, cycle: &CycleState<'_>, eps: &[Arc<EndpointSnapshot>], out: &mut [f64]) {
        let total = cycle.prefix_hashes.len();
        for (i, o) in out.iter_mut().enumerate().take(eps.len()) {
            let m = cycle.prefix_matches.get(i).copied().unwrap_or(0);
            *o = if total == 0 {
                0.0
            } else {
                m as f64 / total as f64
            };
        }
    }

    fn uses_prefix_matches(&self) -> bool {
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::epp::endpoint::{Endpoint, EndpointMetrics, LoraInfo};
    use crate::epp::scheduling::SchedulingRequest;

    pub(crate) fn ep(name: &str, metrics: EndpointMetrics) -> Arc<EndpointSnapshot> {
        let addr = "127.0.0.1:8000".parse().unwrap();
        let mut endpoint = Endpoint::from_addr(addr);
        endpoint.name = name.to_string();
        Arc::new(EndpointSnapshot {
            endpoint: Arc::new(endpoint),
            metrics,
            dispatch: None,
        })
    }

    fn req() -> SchedulingRequest<'static> {
        SchedulingRequest {
            request_id: "r",
            target_model: "sql-lora",
            api: Default::default(),
            prompt: b"",
            cache_salt: b"",
            fallbacks: 0,
            headers: &[],
        }
    }

    fn run(s: &dyn Scorer, eps: &[Arc<EndpointSnapshot>], hashes: &[u64]) -> Vec<f64> {
        run_with(s, eps, hashes, &[])
    }

    fn run_with(
        s: &dyn Scorer,
        eps: &[Arc<EndpointSnapshot>],
        hashes: &[u64],
        matches: &[usize],
    ) -> Vec<f64> {
        let r = req();
        let cycle = CycleState {
            request: &r,
            prefix_hashes: hashes,
            prefix_block_tokens: 16,
            prefix_matches: matches,
            scratch: &crate::epp::scheduling::plugins::scratch::NOTHING_STORED,
        };
        let mut out = vec![f64::NAN; eps.len()];
        s.score(&cycle, eps, &mut out);
        out
    }

    fn queue(q: u32) -> EndpointMetrics {
        EndpointMetrics {
            waiting_queue_size: q,
            ..Default::default()
        }
    }

    #[test]
    fn queue_scorer_min_max() {
        let s = QueueScorer { name: "q".into() };
        let eps = [ep("a", queue(6)), ep("b", queue(0)), ep("c", queue(10))];
        assert_eq!(run(&s, &eps, &[]), vec![0.4, 1.0, 0.0]);
        let eps = [ep("a", queue(3)), ep("b", queue(3))];
        assert_eq!(run(&s, &eps, &[]), vec![1.0, 1.0]);
        assert_eq!(run(&s, &[ep("a", queue(7))], &[]), vec![1.0]);
    }

    #[test]
    fn running_requests_scorer_min_max() {
        let s = RunningRequestsScorer { name: "r".into() };
        let m = |r| EndpointMetrics {
            running_requests: r,
            waiting_queue_size: 99,
            ..Default::default()
        };
        let eps = [ep("a", m(2)), ep("b", m(4)), ep("c", m(12))];
        assert_eq!(run(&s, &eps, &[]), vec![1.0, 0.8, 0.0]);
    }

    #[test]
    fn kv_cache_scorer_is_one_minus_usage() {
        let s = KvCacheUtilizationScorer { name: "kv".into() };
        let m = |kv| EndpointMetrics {
            kv_cache_usage: kv,
            ..Default::default()
        };
        let eps = [ep("a", m(0.25)), ep("b", m(1.0)), ep("c", m(0.0))];
        assert_eq!(run(&s, &eps, &[]), vec![0.75, 0.0, 1.0]);
    }

    #[test]
    fn lora_scorer_levels() {
        let s = LoraAffinityScorer { name: "l".into() };
        let m = |max_lora, running: &[&str], waiting: &[&str]| EndpointMetrics {
            lora: Some(LoraInfo {
                max_lora,
                running: running.iter().map(|s| s.to_string()).collect(),
                waiting: waiting.iter().map(|s| s.to_string()).collect(),
            }),
            ..Default::default()
        };
        let eps = [
            ep("active", m(1, &["sql-lora"], &[])),
            ep("room", m(2, &["other"], &[])),
            ep("waiting", m(2, &["x"], &["sql-lora"])),
            ep("full", m(1, &["other"], &[])),
            ep("none", EndpointMetrics::default()),
        ];
        assert_eq!(run(&s, &eps, &[]), vec![1.0, 0.8, 0.6, 0.0, 0.0]);
    }

    #[test]
    fn prefix_scorer_is_matched_over_total() {
        let s = PrefixCacheScorer { name: "p".into() };
        assert!(s.uses_prefix_matches());
        let eps = [ep("a", queue(0)), ep("b", queue(0)), ep("c", queue(0))];
        assert_eq!(
            run_with(&s, &eps, &[1, 2, 3, 4], &[4, 1, 0]),
            vec![1.0, 0.25, 0.0]
        );
        assert_eq!(run_with(&s, &eps, &[], &[]), vec![0.0, 0.0, 0.0]);
        // Missing matches count as none.
        assert_eq!(run_with(&s, &eps, &[1, 2], &[2]), vec![1.0, 0.0, 0.0]);
    }
}
