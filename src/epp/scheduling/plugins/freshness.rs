//! `scrape-freshness-filter`: drops endpoints whose metrics were never scraped or whose last
//! successful scrape is older than a threshold, unless that would drop every endpoint.
//!
//! An endpoint nobody could scrape looks empty (queue 0, KV 0, no work) and would otherwise win
//! every request — typically a dead port. It comes back by itself once a scrape succeeds.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Filter, Plugin};
use crate::epp::endpoint::EndpointSnapshot;
use crate::epp::scheduling::SchedulingRequest;

/// Default `metricsStalenessThreshold`: 20 scrapes at the default 50 ms interval.
pub const DEFAULT_STALENESS: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct ScrapeFreshnessFilter {
    pub name: String,
    pub staleness: Duration,
}

impl Plugin for ScrapeFreshnessFilter {
    fn plugin_type(&self) -> &'static str {
        "scrape-freshness-filter"
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl ScrapeFreshnessFilter {
    fn apply(&self, endpoints: &mut Vec<Arc<EndpointSnapshot>>, now: Instant) {
        let fresh = |e: &Arc<EndpointSnapshot>| !e.metrics.is_stale(now, self.staleness);
        // All stale (startup, or the scraper itself is cut off): keep everyone rather than
        // fail every request.
        if endpoints.iter().any(fresh) && !endpoints.iter().all(fresh) {
            let before = endpoints.len();
            endpoints.retain(fresh);
            tracing::trace!(
                filter = %self.name,
                dropped = before - endpoints.len(),
                "dropped endpoints with stale or missing metrics"
            );
        }
    }
}

impl Filter for ScrapeFreshnessFilter {
    fn filter(&self, _: &SchedulingRequest<'_>, endpoints: &mut Vec<Arc<EndpointSnapshot>>) {
        self.apply(endpoints, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epp::endpoint::{Endpoint, EndpointMetrics};

    fn ep(name: &str, updated_at: Option<Instant>) -> Arc<EndpointSnapshot> {
        let mut endpoint = Endpoint::from_addr("127.0.0.1:8000".parse().unwrap());
        endpoint.name = name.to_string();
        Arc::new(EndpointSnapshot {
            endpoint: Arc::new(endpoint),
            metrics: EndpointMetrics {
                updated_at,
                ..Default::default()
            },
            dispatch: None,
        })
    }

    fn names(eps: &[Arc<EndpointSnapshot>]) -> Vec<&str> {
        eps.iter().map(|e| e.endpoint.name.as_str()).collect()
    }

    #[test]
    fn stale_and_never_scraped_are_dropped_unless_all_are() {
        let f = ScrapeFreshnessFilter {
            name: "f".into(),
            staleness: Duration::from_secs(1),
        };
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        let mut eps = vec![
            ep("fresh", Some(now - Duration::from_millis(500))),
            ep("never", None),
            ep("stale", Some(now - Duration::from_millis(1500))),
            ep("edge", Some(now - Duration::from_secs(1))),
        ];
        f.apply(&mut eps, now);
        assert_eq!(names(&eps), vec!["fresh", "edge"]);

        let mut all_stale = vec![ep("never", None), ep("stale", Some(t0))];
        f.apply(&mut all_stale, now);
        assert_eq!(names(&all_stale), vec!["never", "stale"]);

        // Recovery: the same endpoint scraped again is kept.
        let mut recovered = vec![ep("fresh", Some(now)), ep("stale", Some(now))];
        f.apply(&mut recovered, now);
        assert_eq!(names(&recovered), vec!["fresh", "stale"]);
    }
}
