//! Pool saturation for admission control and flow control's dispatch gate, by one of two
//! detectors:
//!
//! - `utilization-detector` (the reference default, GIE v1.5.0
//!   `pkg/epp/framework/plugins/flowcontrol/saturationdetector/utilization/`): each endpoint
//!   scores `max(waiting / queueDepthThreshold, kv_usage / kvCacheUtilThreshold)` (1.0 when
//!   its metrics are stale or were never scraped).
//! - `concurrency-detector` (llm-d-router, `requests` mode): each endpoint scores its requests
//!   in flight from this EPP / `maxConcurrency`. A replica's running slots fill without any
//!   request waiting, which the utilization score cannot see; in-flight counts can, so a
//!   usage ceiling below 1.0 keeps slots free on every endpoint (priority holdback).
//!
//! The pool's saturation is the mean score, and the pool is saturated at 1.0 or more.
//! Sheddable requests (priority < 0) are rejected while the pool is saturated.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::endpoint::{EndpointMetrics, EndpointSnapshot};

/// Reference default for `queueDepthThreshold`.
pub const DEFAULT_QUEUE_DEPTH_THRESHOLD: u32 = 5;
/// Reference default for `kvCacheUtilThreshold`.
pub const DEFAULT_KV_CACHE_UTIL_THRESHOLD: f64 = 0.8;
/// Reference default for `metricsStalenessThreshold`.
pub const DEFAULT_METRICS_STALENESS_THRESHOLD: Duration = Duration::from_millis(200);

/// Validated detector settings (`utilization-detector` parameters, validated by `epp::config`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SaturationConfig {
    /// Waiting requests at which one endpoint counts as full (> 0).
    pub queue_depth_threshold: u32,
    /// KV-cache utilisation at which one endpoint counts as full, in (0, 1].
    pub kv_cache_util_threshold: f64,
    /// Metrics older than this make an endpoint count as full (> 0).
    pub metrics_staleness_threshold: Duration,
    /// Burst allowance above the thresholds (≥ 0). Validated and logged; the reference uses it
    /// in its scheduling-filter role, which Switchyard does not have.
    pub headroom: f64,
}

impl Default for SaturationConfig {
    fn default() -> Self {
        SaturationConfig {
            queue_depth_threshold: DEFAULT_QUEUE_DEPTH_THRESHOLD,
            kv_cache_util_threshold: DEFAULT_KV_CACHE_UTIL_THRESHOLD,
            metrics_staleness_threshold: DEFAULT_METRICS_STALENESS_THRESHOLD,
            headroom: 0.0,
        }
    }
}

/// Upstream default for the concurrency detector's `maxConcurrency`.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 100;

/// Validated `concurrency-detector` settings (`requests` mode).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConcurrencyConfig {
    /// Requests in flight at which one endpoint counts as full (> 0).
    pub max_concurrency: u32,
    /// Burst allowance for upstream's scheduling-filter role (≥ 0); validated and logged,
    /// Switchyard uses the detector for saturation only.
    pub headroom: f64,
    /// `decodeSafety`: a utilization score combined with the in-flight one by `max`, so an
    /// endpoint with free slots but queued prefills also counts as loaded.
    pub decode_safety: Option<SaturationConfig>,
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        ConcurrencyConfig {
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            headroom: 0.0,
            decode_safety: None,
        }
    }
}

/// Which detector, with its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DetectorConfig {
    Utilization(SaturationConfig),
    Concurrency(ConcurrencyConfig),
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig::Utilization(SaturationConfig::default())
    }
}

impl From<SaturationConfig> for DetectorConfig {
    fn from(c: SaturationConfig) -> Self {
        DetectorConfig::Utilization(c)
    }
}

impl From<ConcurrencyConfig> for DetectorConfig {
    fn from(c: ConcurrencyConfig) -> Self {
        DetectorConfig::Concurrency(c)
    }
}

/// Computes pool saturation from endpoint snapshots; cheap and lock-free (reads snapshots only).
#[derive(Debug, Clone)]
pub struct SaturationDetector {
    config: DetectorConfig,
}

impl Default for SaturationDetector {
    fn default() -> Self {
        SaturationDetector::new(SaturationConfig::default())
    }
}

impl SaturationDetector {
    pub fn new(config: impl Into<DetectorConfig>) -> Self {
        let config = config.into();
        match config {
            DetectorConfig::Utilization(c) => tracing::info!(
                queue_depth_threshold = c.queue_depth_threshold,
                kv_cache_util_threshold = c.kv_cache_util_threshold,
                metrics_staleness_threshold = ?c.metrics_staleness_threshold,
                headroom = c.headroom,
                "utilization-detector configured"
            ),
            DetectorConfig::Concurrency(c) => tracing::info!(
                max_concurrency = c.max_concurrency,
                headroom = c.headroom,
                "concurrency-detector configured"
            ),
        }
        SaturationDetector { config }
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// One endpoint's score from its scraped metrics alone: for the utilization detector its
    /// most constrained resource relative to the thresholds; for the concurrency detector
    /// its running and waiting requests over `maxConcurrency`.
    pub fn endpoint_score(&self, metrics: &EndpointMetrics, now: Instant) -> f64 {
        match &self.config {
            DetectorConfig::Utilization(c) => {
                if metrics.is_stale(now, c.metrics_staleness_threshold) {
                    return 1.0;
                }
                let queue =
                    f64::from(metrics.waiting_queue_size) / f64::from(c.queue_depth_threshold);
                let kv = metrics.kv_cache_usage / c.kv_cache_util_threshold;
                queue.max(kv)
            }
            DetectorConfig::Concurrency(c) => {
                let load = metrics
                    .running_requests
                    .saturating_add(metrics.waiting_queue_size);
                f64::from(load) / f64::from(c.max_concurrency)
            }
        }
    }

    /// Mean endpoint score over `endpoints`. An empty pool is fully saturated (1.0), as in the
    /// reference: with nothing to serve them, sheddable requests are shed. The utilization
    /// detector reads scraped numbers only (the reference's admission); the concurrency
    /// detector counts this EPP's requests in flight, as upstream's does.
    pub fn saturation(&self, endpoints: &[Arc<EndpointSnapshot>], now: Instant) -> f64 {
        if endpoints.is_empty() {
            return 1.0;
        }
        let total: f64 = endpoints
            .iter()
            .map(|e| match self.config {
                DetectorConfig::Utilization(_) => self.endpoint_score(&e.metrics, now),
                DetectorConfig::Concurrency(_) => self.gate_score(e, now),
            })
            .sum();
        total / endpoints.len() as f64
    }

    /// One endpoint's score as flow control's dispatch gate sees it, counting this EPP's own
    /// dispatches at once (see [`Self::saturation_with_dispatches`]). Utilization: waiting is
    /// at least the dispatches since the last scrape on top of the scraped queue, and at least
    /// this EPP's requests there without a first token. Concurrency: this EPP's requests in
    /// flight there (the scraped running + waiting when in-flight accounting is off).
    pub fn gate_score(&self, e: &EndpointSnapshot, now: Instant) -> f64 {
        match &self.config {
            DetectorConfig::Utilization(c) => utilization_gate(c, e, now).unwrap_or(1.0),
            DetectorConfig::Concurrency(c) => {
                let in_flight = match &e.dispatch {
                    Some(d) => f64::from(d.in_flight()) / f64::from(c.max_concurrency),
                    None => self.endpoint_score(&e.metrics, now),
                };
                // Stale telemetry adds no pressure (upstream's decodeSafety); this EPP's own
                // requests without a first token still do.
                let safety = c.decode_safety.as_ref().map_or(0.0, |u| {
                    utilization_gate(u, e, now).unwrap_or_else(|| {
                        f64::from(not_started(e, now)) / f64::from(u.queue_depth_threshold)
                    })
                });
                in_flight.max(safety)
            }
        }
    }

    /// [`Self::saturation`] with the requests this EPP dispatched to each endpoint since its
    /// last scrape counted as waiting there ([`EndpointSnapshot::unscraped`]), and at least
    /// as many waiting as this EPP's requests there without a first token: flow control's
    /// dispatch gate. Without them a scrape interval's worth of queued requests would all see
    /// the same (pre-dispatch) numbers and leave at once. Endpoints without counters score as
    /// in [`Self::saturation`].
    pub fn saturation_with_dispatches(
        &self,
        endpoints: &[Arc<EndpointSnapshot>],
        now: Instant,
    ) -> f64 {
        self.scores_with_dispatches(endpoints, now).0
    }

    /// (mean, lowest) endpoint score counting dispatches since the last scrape as waiting
    /// (see [`Self::saturation_with_dispatches`]); (1.0, 1.0) for an empty pool.
    pub fn scores_with_dispatches(
        &self,
        endpoints: &[Arc<EndpointSnapshot>],
        now: Instant,
    ) -> (f64, f64) {
        if endpoints.is_empty() {
            return (1.0, 1.0);
        }
        let mut total = 0.0;
        let mut least = f64::INFINITY;
        for e in endpoints {
            let score = self.gate_score(e, now);
            total += score;
            least = least.min(score);
        }
        (total / endpoints.len() as f64, least)
    }

    /// Whether the pool is saturated (mean score ≥ 1.0).
    pub fn is_saturated(&self, endpoints: &[Arc<EndpointSnapshot>], now: Instant) -> bool {
        self.saturation(endpoints, now) >= 1.0
    }
}

/// This EPP's requests at `e` that have no first token yet.
fn not_started(e: &EndpointSnapshot, now: Instant) -> u32 {
    e.dispatch
        .as_ref()
        .map_or(0, |d| d.work.view(now.into_std()).prefilling)
}

/// The utilization score counting this EPP's dispatches (`None` when the metrics are stale):
/// waiting is at least the dispatches since the last scrape on top of the scraped queue, and
/// at least this EPP's requests there without a first token, which are queued (or
/// prefilling) whatever the last scrape says: scraped numbers lag the dispatches by a scrape
/// and by the server's own metric update.
fn utilization_gate(c: &SaturationConfig, e: &EndpointSnapshot, now: Instant) -> Option<f64> {
    if e.metrics.is_stale(now, c.metrics_staleness_threshold) {
        return None;
    }
    let waiting = e
        .metrics
        .waiting_queue_size
        .saturating_add(e.unscraped())
        .max(not_started(e, now));
    let queue = f64::from(waiting) / f64::from(c.queue_depth_threshold);
    Some(queue.max(e.metrics.kv_cache_usage / c.kv_cache_util_threshold))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epp::endpoint::Endpoint;

    fn snapshot(queue: u32, kv: f64, age: Option<Duration>, now: Instant) -> Arc<EndpointSnapshot> {
        Arc::new(EndpointSnapshot {
            endpoint: Arc::new(Endpoint::from_addr("10.0.0.1:8000".parse().unwrap())),
            metrics: EndpointMetrics {
                waiting_queue_size: queue,
                kv_cache_usage: kv,
                updated_at: age.map(|a| now - a),
                ..Default::default()
            },
            dispatch: None,
        })
    }

    #[test]
    fn score_is_the_most_constrained_resource() {
        let now = Instant::now();
        let fresh = Some(Duration::from_millis(10));
        let d = SaturationDetector::default();
        // queue 2/5 = 0.4 vs kv 0.4/0.8 = 0.5 → 0.5
        assert_eq!(
            d.endpoint_score(&snapshot(2, 0.4, fresh, now).metrics, now),
            0.5
        );
        // queue 10/5 = 2.0 vs kv 0.2/0.8 = 0.25 → 2.0
        assert_eq!(
            d.endpoint_score(&snapshot(10, 0.2, fresh, now).metrics, now),
            2.0
        );
        assert_eq!(
            d.endpoint_score(&snapshot(0, 0.0, fresh, now).metrics, now),
            0.0
        );
    }

    #[test]
    fn stale_and_never_scraped_endpoints_count_as_full() {
        let now = Instant::now();
        let d = SaturationDetector::default();
        // Exactly at the threshold is still fresh (the reference compares with `>`).
        let at = snapshot(0, 0.0, Some(Duration::from_millis(200)), now);
        assert_eq!(d.endpoint_score(&at.metrics, now), 0.0);
        let over = snapshot(0, 0.0, Some(Duration::from_millis(201)), now);
        assert_eq!(d.endpoint_score(&over.metrics, now), 1.0);
        let never = snapshot(0, 0.0, None, now);
        assert_eq!(d.endpoint_score(&never.metrics, now), 1.0);
    }

    #[test]
    fn pool_saturation_is_the_mean_and_saturated_at_one() {
        let now = Instant::now();
        let fresh = Some(Duration::from_millis(5));
        let d = SaturationDetector::default();
        assert_eq!(d.saturation(&[], now), 1.0);
        assert!(d.is_saturated(&[], now));
        // Scores 0.5, 2.0, 1.0 (stale) → mean 3.5 / 3.
        let pool = [
            snapshot(2, 0.4, fresh, now),
            snapshot(10, 0.2, fresh, now),
            snapshot(0, 0.0, Some(Duration::from_secs(1)), now),
        ];
        assert_eq!(d.saturation(&pool, now), 3.5 / 3.0);
        assert!(d.is_saturated(&pool, now));
        // Scores 0.5 and 1.0 (queue 5/5) → 0.75: not saturated.
        let pool = [snapshot(2, 0.4, fresh, now), snapshot(5, 0.0, fresh, now)];
        assert_eq!(d.saturation(&pool, now), 0.75);
        assert!(!d.is_saturated(&pool, now));
        // Mean exactly 1.0 is saturated.
        let pool = [snapshot(5, 0.0, fresh, now), snapshot(0, 0.8, fresh, now)];
        assert_eq!(d.saturation(&pool, now), 1.0);
        assert!(d.is_saturated(&pool, now));
    }

    #[test]
    fn dispatches_since_the_last_scrape_count_as_waiting() {
        use crate::epp::endpoint::DispatchCounters;
        let now = Instant::now();
        let d = SaturationDetector::default();
        let counters = Arc::new(DispatchCounters::default());
        let mut e = (*snapshot(1, 0.0, Some(Duration::from_millis(5)), now)).clone();
        e.dispatch = Some(counters.clone());
        let pool = [Arc::new(e)];
        // waiting 1 of 5 → 0.2; the plain detector agrees while nothing was dispatched.
        assert_eq!(d.saturation_with_dispatches(&pool, now), 0.2);
        let guards: Vec<_> = (0..4).map(|_| counters.dispatch()).collect();
        // 1 scraped + 4 dispatched since → 5 / 5: saturated; the plain detector still says 0.2.
        assert_eq!(d.saturation_with_dispatches(&pool, now), 1.0);
        assert_eq!(d.saturation(&pool, now), 0.2);
        drop(guards);
        assert_eq!(d.saturation_with_dispatches(&pool, now), 0.2);
        assert_eq!(d.saturation_with_dispatches(&[], now), 1.0);
        // A scrape that has seen three dispatches but shows them neither waiting nor running
        // yet (server metrics lag): the three without a first token still count.
        let work: Vec<_> = (0..3)
            .map(|_| crate::epp::work::WorkGuard::dispatch(&counters, 100, now.into_std()))
            .collect();
        assert_eq!(d.saturation_with_dispatches(&pool, now), 0.6);
        drop(work);
        assert_eq!(d.saturation_with_dispatches(&pool, now), 0.2);
    }

    #[test]
    fn concurrency_detector_scores_requests_in_flight() {
        use crate::epp::endpoint::DispatchCounters;
        let now = Instant::now();
        let d = SaturationDetector::new(ConcurrencyConfig {
            max_concurrency: 16,
            ..ConcurrencyConfig::default()
        });
        // No counters (in-flight accounting off): scraped running 6 + waiting 2 of 16, stale
        // or not (the detector has no staleness threshold).
        let mut scraped = (*snapshot(2, 0.9, Some(Duration::from_secs(30)), now)).clone();
        scraped.metrics.running_requests = 6;
        assert_eq!(d.endpoint_score(&scraped.metrics, now), 0.5);
        assert_eq!(d.gate_score(&scraped, now), 0.5);
        // With counters only this EPP's requests in flight count: 12 of 16, whatever the
        // (lagging) scrape says.
        let counters = Arc::new(DispatchCounters::default());
        let mut counted = scraped.clone();
        counted.dispatch = Some(counters.clone());
        let guards: Vec<_> = (0..12).map(|_| counters.dispatch()).collect();
        assert_eq!(d.gate_score(&counted, now), 0.75);
        let pool = [Arc::new(counted), Arc::new(scraped)];
        assert_eq!(d.scores_with_dispatches(&pool, now), (0.625, 0.5));
        assert_eq!(d.saturation(&pool, now), 0.625);
        drop(guards);
        assert_eq!(d.scores_with_dispatches(&pool, now), (0.25, 0.0));
        assert_eq!(d.scores_with_dispatches(&[], now), (1.0, 1.0));
    }

    #[test]
    fn decode_safety_adds_queued_prefills_to_the_in_flight_score() {
        use crate::epp::endpoint::DispatchCounters;
        use crate::epp::work::WorkGuard;
        let now = Instant::now();
        let d = SaturationDetector::new(ConcurrencyConfig {
            max_concurrency: 16,
            decode_safety: Some(SaturationConfig {
                queue_depth_threshold: 2,
                ..SaturationConfig::default()
            }),
            ..ConcurrencyConfig::default()
        });
        let counters = Arc::new(DispatchCounters::default());
        let mut e = (*snapshot(0, 0.1, Some(Duration::from_millis(5)), now)).clone();
        e.dispatch = Some(counters.clone());
        // 4 in flight of 16 = 0.25, but all 4 dispatched since the last scrape count as
        // waiting too (the utilization gate's rule): 4 / 2 = 2.0.
        let inflight: Vec<_> = (0..4).map(|_| counters.dispatch()).collect();
        assert_eq!(d.gate_score(&e, now), 2.0);
        // A scrape has seen them: none waiting, kv 0.1 / 0.8 = 0.125, in flight 0.25 wins.
        counters.scraped(counters.begin_scrape());
        assert_eq!(d.gate_score(&e, now), 0.25);
        // Three of them without a first token: 3 / 2 = 1.5 wins.
        let work: Vec<_> = (0..3)
            .map(|_| WorkGuard::dispatch(&counters, 500, now.into_std()))
            .collect();
        assert_eq!(d.gate_score(&e, now), 1.5);
        // Stale telemetry: the scraped queue (9) and KV add nothing, the three still count.
        let mut stale = e.clone();
        stale.metrics.waiting_queue_size = 9;
        stale.metrics.kv_cache_usage = 0.9;
        stale.metrics.updated_at = Some(now - Duration::from_secs(5));
        assert_eq!(d.gate_score(&stale, now), 1.5);
        drop(work);
        assert_eq!(d.gate_score(&stale, now), 0.25);
        drop(inflight);
    }

    #[test]
    fn custom_thresholds_change_the_scores() {
        let now = Instant::now();
        let d = SaturationDetector::new(SaturationConfig {
            queue_depth_threshold: 10,
            kv_cache_util_threshold: 0.5,
            metrics_staleness_threshold: Duration::from_secs(2),
            headroom: 0.0,
        });
        let e = snapshot(5, 0.25, Some(Duration::from_secs(1)), now);
        assert_eq!(d.endpoint_score(&e.metrics, now), 0.5);
    }
}
