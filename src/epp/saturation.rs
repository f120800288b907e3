//! Pool saturation for admission control: the reference `utilization-detector` (GIE v1.5.0
//! `pkg/epp/framework/plugins/flowcontrol/saturationdetector/utilization/`).
//!
//! Each endpoint scores `max(waiting / queueDepthThreshold, kv_usage / kvCacheUtilThreshold)`
//! (1.0 when its metrics are stale or were never scraped); the pool's saturation is the mean
//! score, and the pool is saturated at 1.0 or more. Sheddable requests (priority < 0) are
//! rejected while the pool is saturated.

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

/// Computes pool saturation from endpoint snapshots; cheap and lock-free (reads snapshots only).
#[derive(Debug, Clone)]
pub struct SaturationDetector {
    config: SaturationConfig,
}

impl Default for SaturationDetector {
    fn default() -> Self {
        SaturationDetector::new(SaturationConfig::default())
    }
}

impl SaturationDetector {
    pub fn new(config: SaturationConfig) -> Self {
        tracing::info!(
            queue_depth_threshold = config.queue_depth_threshold,
            kv_cache_util_threshold = config.kv_cache_util_threshold,
            metrics_staleness_threshold = ?config.metrics_staleness_threshold,
            headroom = config.headroom,
            "utilization-detector configured"
        );
        SaturationDetector { config }
    }

    pub fn config(&self) -> &SaturationConfig {
        &self.config
    }

    fn is_stale(&self, metrics: &EndpointMetrics, now: Instant) -> bool {
        metrics.is_stale(now, self.config.metrics_staleness_threshold)
    }

    /// One endpoint's score: its most constrained resource relative to the thresholds.
    pub fn endpoint_score(&self, metrics: &EndpointMetrics, now: Instant) -> f64 {
        if self.is_stale(metrics, now) {
            return 1.0;
        }
        let queue =
            f64::from(metrics.waiting_queue_size) / f64::from(self.config.queue_depth_threshold);
        let kv = metrics.kv_cache_usage / self.config.kv_cache_util_threshold;
        queue.max(kv)
    }

    /// Mean endpoint score over `endpoints`. An empty pool is fully saturated (1.0), as in the
    /// reference: with nothing to serve them, sheddable requests are shed.
    pub fn saturation(&self, endpoints: &[Arc<EndpointSnapshot>], now: Instant) -> f64 {
        if endpoints.is_empty() {
            return 1.0;
        }
        let total: f64 = endpoints
            .iter()
            .map(|e| self.endpoint_score(&e.metrics, now))
            .sum();
        total / endpoints.len() as f64
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
            let score = if self.is_stale(&e.metrics, now) {
                1.0
            } else {
                // Requests this EPP sent that have no first token yet are queued (or
                // prefilling) there whatever the last scrape says: scraped numbers lag the
                // dispatches by a scrape and by the server's own metric update.
                let not_started = e
                    .dispatch
                    .as_ref()
                    .map_or(0, |d| d.work.view(now.into_std()).prefilling);
                let waiting = e
                    .metrics
                    .waiting_queue_size
                    .saturating_add(e.unscraped())
                    .max(not_started);
                let queue = f64::from(waiting) / f64::from(self.config.queue_depth_threshold);
                queue.max(e.metrics.kv_cache_usage / self.config.kv_cache_util_threshold)
            };
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
