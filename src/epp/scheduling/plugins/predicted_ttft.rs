//! `predicted-ttft-scorer`: scores each candidate by the time to first token it would give this
//! request — the prefill work already waiting there plus this request's own uncached prompt,
//! over the endpoint's learned prefill rate.
//!
//! This one formula is both the load term and the hot-spot-safe affinity term: a prefix hit is
//! worth exactly the prefill it saves, so the holder of a cached prefix wins while the tokens it
//! saves exceed the extra work queued there, and a hot prefix spills to (and is then learned on)
//! a second replica once its holder is busier by more than the hit is worth.
//!
//! ```text
//!   predicted_i = (queued_prefill_i + foreign_waiting_i × mean_prompt_i
//!                  + overhead × requests_i + prompt − cached_i) / rate_i
//!   score_i     = min_j predicted_j / predicted_i        (1 for the best, in (0, 1])
//! ```
//! A ratio rather than min-max keeps the scale: 10 % more predicted wait scores 0.91, not 0.
//!
//! The formula is greedy: for one request a cached 16k-token prefix beats any cold prefill,
//! so a hot prefix never leaves its holder even when that replica decodes for twice as many
//! requests as the others (slower steps for all of them, every later hit waiting behind its
//! prefills). With `loadBoundFactor` set, bounded-load placement (consistent hashing with
//! bounded loads, Mirrokni et al.) caps each endpoint's in-flight requests from this EPP:
//!
//! ```text
//!   cap       = ceil(loadBoundFactor × (in_flight_total + 1) / endpoints)
//!   eligible  = in_flight_i < cap          (at least one endpoint always is)
//!   score_i   = min_eligible predicted / predicted_i,   0 for an endpoint at the cap
//! ```
//! so the request goes to the best endpoint under the cap, and a hot prefix spreads to a
//! second replica (learned there) once its holder carries more than its share.

use std::sync::Arc;
use std::time::Instant;

use super::{CycleState, Plugin, Scorer};
use crate::epp::endpoint::EndpointSnapshot;
use crate::epp::prefix::AVERAGE_CHARS_PER_TOKEN;
use crate::epp::work::{clock_ns, WorkView, DEFAULT_PREFILL_TOKENS_PER_S};

/// Validated parameters (`plugins[].parameters` of `predicted-ttft-scorer`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PredictedTtftParams {
    /// Prefill rate (tokens/s) assumed for an endpoint until responses teach one; endpoints
    /// without a sample use the mean of those with one.
    pub initial_prefill_tokens_per_s: f64,
    /// Prefill-equivalent tokens charged per request already at the endpoint (prefilling or
    /// decoding): every running sequence lengthens each step a little, and it breaks ties
    /// between idle-looking endpoints toward the less busy one.
    pub request_overhead_tokens: u64,
    /// Bounded-load factor (≥ 1): an endpoint already holding `ceil(factor × mean)` of this
    /// EPP's in-flight requests (the mean counting this one) scores 0. `None`: no bound.
    pub load_bound_factor: Option<f64>,
}

impl Default for PredictedTtftParams {
    fn default() -> Self {
        PredictedTtftParams {
            initial_prefill_tokens_per_s: DEFAULT_PREFILL_TOKENS_PER_S,
            request_overhead_tokens: 32,
            load_bound_factor: None,
        }
    }
}

/// The in-flight request count at or above which an endpoint is over its bound, given the
/// candidates' total in flight (before this request) and their number. Some endpoint is
/// always under it: all at `cap` would hold `n × cap ≥ factor × (total + 1) > total`.
pub fn load_cap(factor: f64, total_in_flight: u64, endpoints: usize) -> u64 {
    let mean = (total_in_flight as f64 + 1.0) / endpoints.max(1) as f64;
    // The float is small and positive; `as` saturates anyway.
    (factor.max(1.0) * mean).ceil() as u64
}

/// Reads the prefix matches the scheduler prepared ([`CycleState::prefix_matches`]); without
/// a prefix index every prompt counts as uncached.
#[derive(Debug)]
pub struct PredictedTtftScorer {
    pub name: String,
    pub params: PredictedTtftParams,
}

impl Plugin for PredictedTtftScorer {
    fn plugin_type(&self) -> &'static str {
        "predicted-ttft-scorer"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// Prompt tokens estimated from bytes, as the prefix index counts them.
pub fn prompt_tokens(prompt: &[u8]) -> u64 {
    prompt.len().div_ceil(AVERAGE_CHARS_PER_TOKEN) as u64
}

fn work_of(e: &EndpointSnapshot, now_ns: u64) -> WorkView {
    e.dispatch
        .as_ref()
        .map(|d| d.work.view_at(now_ns))
        .unwrap_or_default()
}

impl Scorer for PredictedTtftScorer {
    fn score(&self, cycle: &CycleState<'_>, eps: &[Arc<EndpointSnapshot>], out: &mut [f64]) {
        self.score_at(cycle, eps, out, Instant::now());
    }

    fn uses_prefix_matches(&self) -> bool {
        true
    }
}

impl PredictedTtftScorer {
    /// [`Scorer::score`] as of `now` (tests pin the clock).
    pub fn score_at(
        &self,
        cycle: &CycleState<'_>,
        eps: &[Arc<EndpointSnapshot>],
        out: &mut [f64],
        now: Instant,
    ) {
        let prompt = prompt_tokens(cycle.request.prompt);
        let block = cycle.prefix_block_tokens as u64;

        // Endpoints with no learned rate yet use the mean of those with one, so one fast
        // sample does not make an endpoint look slower than its unmeasured peers.
        // One view per endpoint, on one clock reading: the rate mean and the load bound need
        // every endpoint before the first score.
        let now_ns = clock_ns(now);
        let views: Vec<WorkView> = eps.iter().map(|e| work_of(e, now_ns)).collect();
        let (mut sum, mut count, mut in_flight) = (0.0, 0u32, 0u64);
        for w in &views {
            if let Some(r) = w.prefill_rate {
                sum += r;
                count += 1;
            }
            in_flight += u64::from(w.prefilling) + u64::from(w.decoding);
        }
        let cap = self
            .params
            .load_bound_factor
            .map_or(u64::MAX, |f| load_cap(f, in_flight, eps.len()));
        let fallback_rate = if count > 0 {
            sum / f64::from(count)
        } else {
            self.params.initial_prefill_tokens_per_s
        };
        // Rates within 25 % of the pool mean are noise between like replicas: use the mean,
        // or idle traffic would pile onto whichever replica's estimate came out fastest.
        let rate_of = |learned: Option<f64>| match learned {
            Some(r) if !(0.8..=1.25).contains(&(r / fallback_rate)) => r,
            _ => fallback_rate,
        };

        let mut best = f64::INFINITY;
        for (i, ((o, e), w)) in out.iter_mut().zip(eps).zip(&views).enumerate() {
            let requests = u64::from(w.prefilling) + u64::from(w.decoding);
            if requests >= cap {
                // Over its bound: marked, and left out of `best`.
                *o = f64::INFINITY;
                continue;
            }
            let rate = rate_of(w.prefill_rate).max(1e-9);
            let cached = cycle
                .prefix_matches
                .get(i)
                .map_or(0, |&m| (m as u64).saturating_mul(block))
                .min(prompt);
            // Waiting requests the scrape shows beyond the ones this EPP is waiting on came
            // from elsewhere (another EPP replica, direct traffic); charge each like an
            // average request of ours there, or like this one when there is none.
            let foreign =
                u64::from(e.metrics.waiting_queue_size).saturating_sub(u64::from(w.prefilling));
            let per_request = if w.prefilling > 0 {
                w.prefill_tokens / u64::from(w.prefilling)
            } else {
                prompt
            };
            let work = foreign
                .saturating_mul(per_request)
                .saturating_add(w.remaining_prefill(rate))
                .saturating_add(requests.saturating_mul(self.params.request_overhead_tokens))
                .saturating_add(prompt - cached);
            let predicted = work as f64 / rate;
            best = best.min(predicted);
            *o = predicted;
        }
        for o in out.iter_mut() {
            *o = if *o <= 0.0 { 1.0 } else { best / *o };
        }
        if tracing::enabled!(tracing::Level::TRACE) {
            tracing::trace!(request_id = cycle.request.request_id, prompt_tokens = prompt,
                scores = ?out, "predicted-ttft scores");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epp::endpoint::{DispatchCounters, Endpoint, EndpointMetrics};
    use crate::epp::scheduling::SchedulingRequest;
    use crate::epp::work::WorkGuard;
    use std::time::Duration;

    fn ep(name: &str, d: &Arc<DispatchCounters>) -> Arc<EndpointSnapshot> {
        let mut endpoint = Endpoint::from_addr("127.0.0.1:8000".parse().unwrap());
        endpoint.name = name.to_string();
        Arc::new(EndpointSnapshot {
            endpoint: Arc::new(endpoint),
            metrics: EndpointMetrics::default(),
            dispatch: Some(d.clone()),
        })
    }

    /// Scores as of the moment `at` (work dispatched at `at` has had no time to drain), with
    /// no prefix matches.
    fn score_at(
        s: &PredictedTtftScorer,
        eps: &[Arc<EndpointSnapshot>],
        prompt: &[u8],
        at: Instant,
    ) -> Vec<f64> {
        score_matched(s, eps, prompt, &[], at)
    }

    /// Scores with `matches[i]` 16-token blocks of the prompt cached on `eps[i]`, as the
    /// scheduler's prefix lookup prepares them.
    fn score_matched(
        s: &PredictedTtftScorer,
        eps: &[Arc<EndpointSnapshot>],
        prompt: &[u8],
        matches: &[usize],
        at: Instant,
    ) -> Vec<f64> {
        let req = SchedulingRequest {
            request_id: "r",
            target_model: "m",
            api: Default::default(),
            prompt,
            cache_salt: b"",
            fallbacks: 0,
            headers: &[],
        };
        // Four 16-token blocks (64 tokens = 256 bytes) of hashes.
        let hashes = [1u64, 2, 3, 4];
        let cycle = CycleState {
            request: &req,
            prefix_hashes: &hashes,
            prefix_block_tokens: 16,
            prefix_matches: matches,
            scratch: &crate::epp::scheduling::plugins::scratch::NOTHING_STORED,
        };
        let mut out = vec![f64::NAN; eps.len()];
        s.score_at(&cycle, eps, &mut out, at);
        out
    }

    /// Scores are ratios of float divisions: equal to the last bit is not the contract.
    fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }

    fn scorer() -> PredictedTtftScorer {
        PredictedTtftScorer {
            name: "t".into(),
            params: PredictedTtftParams {
                initial_prefill_tokens_per_s: 1000.0,
                request_overhead_tokens: 0,
                load_bound_factor: None,
            },
        }
    }

    #[test]
    fn queued_prefill_tokens_decide_not_request_counts() {
        let (a, b) = (Arc::default(), Arc::default());
        let t = Instant::now();
        // a: one 3000-token prompt waiting; b: three 100-token prompts.
        let _g = WorkGuard::dispatch(&a, 3000, t);
        let _h: Vec<_> = (0..3).map(|_| WorkGuard::dispatch(&b, 100, t)).collect();
        let eps = [ep("a", &a), ep("b", &b)];
        // 100-token prompt: a predicts 3100, b 400 tokens of work.
        let got = score_at(&scorer(), &eps, &[b'x'; 400], t);
        assert_close(&got, &[400.0 / 3100.0, 1.0]);
    }

    #[test]
    fn a_prefix_hit_wins_only_while_it_saves_more_than_the_extra_queue() {
        // The holder has all four 16-token blocks of the prompt's head cached.
        let matches = [4, 0];
        let (h, o) = (Arc::default(), Arc::default());
        let eps = [ep("holder", &h), ep("other", &o)];
        let s = scorer();
        let t = Instant::now();
        // 80-token prompt, 64 cached on the holder: 16 vs 80 tokens, holder wins.
        let prompt = [b'x'; 320];
        let got = score_matched(&s, &eps, &prompt, &matches, t);
        assert_close(&got, &[1.0, 16.0 / 80.0]);
        // 40 tokens queued at the holder: 56 vs 80, still the holder.
        let _q = WorkGuard::dispatch(&h, 40, t);
        let got = score_matched(&s, &eps, &prompt, &matches, t);
        assert_close(&got, &[1.0, 56.0 / 80.0]);
        // 100 queued: 116 vs 80 — the hit saves less than the queue costs; go elsewhere.
        let _r = WorkGuard::dispatch(&h, 60, t);
        let got = score_matched(&s, &eps, &prompt, &matches, t);
        assert_close(&got, &[80.0 / 116.0, 1.0]);
    }

    #[test]
    fn a_half_done_prefill_counts_only_what_is_left() {
        let (a, b) = (Arc::default(), Arc::default());
        let t = Instant::now();
        // a started a 7000-token prefill 3 s ago at 1000 tokens/s: 4000 left.
        let _g = WorkGuard::dispatch(&a, 7000, t);
        let _h = WorkGuard::dispatch(&b, 5000, t + Duration::from_secs(3));
        let eps = [ep("a", &a), ep("b", &b)];
        let got = score_at(&scorer(), &eps, &[b'x'; 4000], t + Duration::from_secs(3));
        // a: 4000 + 1000 own; b: 5000 + 1000.
        assert_close(&got, &[1.0, 5000.0 / 6000.0]);
    }

    #[test]
    fn learned_rates_scale_the_prediction_and_unmeasured_use_the_mean() {
        let (fast, slow, new) = (Arc::default(), Arc::default(), Arc::default());
        let t = Instant::now();
        // fast: 1000 tokens in 0.25 s (4000/s); slow: 1000 tokens in 1 s (1000/s).
        WorkGuard::dispatch(&fast, 1000, t).first_token(t + Duration::from_millis(250));
        WorkGuard::dispatch(&slow, 1000, t).first_token(t + Duration::from_secs(1));
        let eps = [ep("fast", &fast), ep("slow", &slow), ep("new", &new)];
        // 1000-token prompt: 0.25 s, 1 s, and 1000 / 2500 = 0.4 s at the mean rate.
        let got = score_at(&scorer(), &eps, &[b'x'; 4000], t);
        assert_close(&got, &[1.0, 0.25, 0.25 / 0.4]);
    }

    #[test]
    fn rates_close_to_the_mean_count_as_the_mean() {
        let (a, b) = (Arc::default(), Arc::default());
        let t = Instant::now();
        // 1000 and 1100 tokens/s: within 25 % of their mean 1050, so both use 1050.
        WorkGuard::dispatch(&a, 1000, t).first_token(t + Duration::from_secs(1));
        WorkGuard::dispatch(&b, 1100, t).first_token(t + Duration::from_secs(1));
        let eps = [ep("a", &a), ep("b", &b)];
        assert_eq!(score_at(&scorer(), &eps, &[b'x'; 4000], t), vec![1.0, 1.0]);
    }

    #[test]
    fn scraped_waiting_requests_not_ours_count_as_work() {
        let (a, b) = (Arc::default(), Arc::default());
        let t = Instant::now();
        let _g = WorkGuard::dispatch(&a, 300, t);
        let mut busy = ep("a", &a).as_ref().clone();
        // The scrape shows 3 waiting, one of them ours: 2 foreign × 300 tokens each.
        busy.metrics.waiting_queue_size = 3;
        let mut other = ep("b", &b).as_ref().clone();
        // 2 foreign waiting with none of ours: charged like this 100-token request.
        other.metrics.waiting_queue_size = 2;
        let eps = [Arc::new(busy), Arc::new(other)];
        let got = score_at(&scorer(), &eps, &[b'x'; 400], t);
        // a: 600 + 300 + 100 = 1000; b: 200 + 100 = 300.
        assert_close(&got, &[0.3, 1.0]);
    }

    #[test]
    fn idle_endpoints_tie_and_request_overhead_breaks_it() {
        let (a, b) = (Arc::default(), Arc::default());
        let eps = [ep("a", &a), ep("b", &b)];
        let mut s = scorer();
        let t = Instant::now();
        assert_eq!(score_at(&s, &eps, &[b'x'; 40], t), vec![1.0, 1.0]);
        assert_eq!(score_at(&s, &eps, b"", t), vec![1.0, 1.0]);
        s.params.request_overhead_tokens = 10;
        let mut g = WorkGuard::dispatch(&a, 0, t);
        g.first_token(t);
        // a: one decoding request = 10 tokens + 10 own; b: 10 own.
        assert_eq!(score_at(&s, &eps, &[b'x'; 40], t), vec![0.5, 1.0]);
    }

    #[test]
    fn load_cap_is_the_ceiling_of_factor_times_the_mean_with_this_request() {
        // 9 in flight + this one over 4 endpoints: mean 2.5.
        assert_eq!(load_cap(1.25, 9, 4), 4); // 3.125 → 4
        assert_eq!(load_cap(1.0, 9, 4), 3); // 2.5 → 3
        assert_eq!(load_cap(2.0, 9, 4), 5);
        // Nothing in flight: only an idle endpoint is under the cap.
        assert_eq!(load_cap(1.25, 0, 4), 1);
        // A factor below 1 counts as 1; no endpoints counts as one.
        assert_eq!(load_cap(0.5, 9, 4), 3);
        assert_eq!(load_cap(1.0, 3, 0), 4);
    }

    #[test]
    fn a_hot_prefix_holder_at_its_load_bound_scores_zero_and_the_prefix_spreads() {
        let matches = [4, 0, 0];
        let (h, a, b) = (Arc::default(), Arc::default(), Arc::default());
        let t = Instant::now();
        // The holder decodes 4 requests, a 1, b none: 5 in flight, cap ceil(1.25 × 6 / 3) = 3.
        let mut hot: Vec<_> = (0..4).map(|_| WorkGuard::dispatch(&h, 0, t)).collect();
        let mut warm = WorkGuard::dispatch(&a, 0, t);
        for g in hot.iter_mut().chain(std::iter::once(&mut warm)) {
            g.first_token(t);
        }
        let eps = [ep("holder", &h), ep("a", &a), ep("b", &b)];
        // 80-token prompt, 64 tokens cached on the holder.
        let prompt = [b'x'; 320];
        let mut s = scorer();
        s.params.request_overhead_tokens = 10;
        // Unbounded, the hit wins: holder 40 + 16 = 56, a 10 + 80 = 90, b 80 tokens.
        let got = score_matched(&s, &eps, &prompt, &matches, t);
        assert_close(&got, &[1.0, 56.0 / 90.0, 56.0 / 80.0]);
        // Bounded: the holder is at the cap; b (idle) is best among the rest.
        s.params.load_bound_factor = Some(1.25);
        let got = score_matched(&s, &eps, &prompt, &matches, t);
        assert_close(&got, &[0.0, 80.0 / 90.0, 1.0]);
        // A looser bound (cap ceil(2 × 6 / 3) = 4) still excludes it; 3 × leaves it the hit.
        s.params.load_bound_factor = Some(2.0);
        let got = score_matched(&s, &eps, &prompt, &matches, t);
        assert_close(&got, &[0.0, 80.0 / 90.0, 1.0]);
        s.params.load_bound_factor = Some(3.0);
        let got = score_matched(&s, &eps, &prompt, &matches, t);
        assert_close(&got, &[1.0, 56.0 / 90.0, 56.0 / 80.0]);
        // Once b also holds the prefix it takes the hot prefix's traffic under the bound.
        s.params.load_bound_factor = Some(1.25);
        let got = score_matched(&s, &eps, &prompt, &[4, 0, 4], t);
        assert_close(&got, &[0.0, 16.0 / 90.0, 1.0]);
    }

    #[test]
    fn with_every_endpoint_idle_the_bound_leaves_all_eligible() {
        let (a, b) = (Arc::default(), Arc::default());
        let eps = [ep("a", &a), ep("b", &b)];
        let mut s = scorer();
        s.params.load_bound_factor = Some(1.0);
        let t = Instant::now();
        assert_eq!(score_at(&s, &eps, &[b'x'; 40], t), vec![1.0, 1.0]);
        // One request at a: cap ceil(2 / 2) = 1, so a is at the bound.
        let _g = WorkGuard::dispatch(&a, 10, t);
        assert_eq!(score_at(&s, &eps, &[b'x'; 40], t), vec![0.0, 1.0]);
    }
}
