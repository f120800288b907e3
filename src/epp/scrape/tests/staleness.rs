//! Staleness under paused time: an endpoint whose scrapes start failing keeps its last metrics,
//! turns stale exactly `metrics_staleness_threshold` after its last successful scrape (dropped
//! by the freshness filter, scored as full by the saturation detector), and is fresh again from
//! the first scrape that succeeds.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{endpoint, settle, FakeSource, MS};
use crate::epp::datastore::{Datastore, DiscoveryEvent};
use crate::epp::saturation::{SaturationConfig, SaturationDetector};
use crate::epp::scheduling::plugins::freshness::ScrapeFreshnessFilter;
use crate::epp::scheduling::plugins::Filter;
use crate::epp::scheduling::SchedulingRequest;
use crate::epp::scrape::{spawn_scrape_manager_with, ScrapeConfig};

const INTERVAL: Duration = Duration::from_millis(50);
const THRESHOLD: Duration = Duration::from_secs(1);
/// Large enough that a scraped queue scores below 1.0 (full) throughout.
const QUEUE_THRESHOLD: u32 = 1000;

/// Advances paused time to `at` a millisecond at a time, letting every poller due on the way
/// run at its own instant (one large step would fire each overdue ticker once, late).
async fn advance_to(at: Instant) {
    while Instant::now() < at {
        tokio::time::advance(MS.min(at - Instant::now())).await;
        settle().await;
    }
}

/// The endpoints the freshness filter keeps now.
fn kept(filter: &ScrapeFreshnessFilter, datastore: &Datastore) -> Vec<String> {
    let mut endpoints = datastore.snapshot();
    filter.filter(&SchedulingRequest::default(), &mut endpoints);
    endpoints.iter().map(|e| e.endpoint.name.clone()).collect()
}

#[tokio::test(start_paused = true)]
async fn a_failing_endpoint_turns_stale_at_the_threshold_and_recovers_on_its_next_scrape() {
    let datastore = Arc::new(Datastore::new());
    let (a, b) = (endpoint(1), endpoint(2));
    datastore.apply(DiscoveryEvent::Reset(vec![a.clone(), b.clone()]));
    let source = FakeSource::default();
    let (_stop_tx, stop_rx) = watch::channel(false);
    let config = ScrapeConfig {
        interval: INTERVAL,
        timeout: Duration::from_secs(1),
    };
    let _manager = spawn_scrape_manager_with(datastore.clone(), config, source.clone(), stop_rx);
    settle().await;
    // Every poller's first tick comes within one interval.
    advance_to(Instant::now() + INTERVAL).await;
    let filter = ScrapeFreshnessFilter {
        name: "f".into(),
        staleness: THRESHOLD,
    };
    let detector = SaturationDetector::new(SaturationConfig {
        queue_depth_threshold: QUEUE_THRESHOLD,
        metrics_staleness_threshold: THRESHOLD,
        ..Default::default()
    });
    let both = vec![a.name.clone(), b.name.clone()];
    assert_eq!(kept(&filter, &datastore), both);

    // b's scrapes fail from now on.
    source.down.lock().push(b.name.clone());
    let slot_b = datastore.slot(&b.name).unwrap();
    let last = slot_b.load().metrics.clone();
    let scraped_at = last.updated_at.expect("b was scraped");
    let queue = last.waiting_queue_size;
    let score_b = || detector.endpoint_score(&slot_b.load().metrics, Instant::now());

    // At the threshold b is still fresh (the age is compared with `>`) ...
    advance_to(scraped_at + THRESHOLD).await;
    assert_eq!(
        slot_b.load().metrics,
        last,
        "failed scrapes keep the last metrics"
    );
    assert_eq!(kept(&filter, &datastore), both);
    assert_eq!(score_b(), f64::from(queue) / f64::from(QUEUE_THRESHOLD));
    // ... and a millisecond later it is stale: filtered out and scored as full, while a,
    // scraped every interval, stays.
    advance_to(scraped_at + THRESHOLD + MS).await;
    assert_eq!(kept(&filter, &datastore), vec![a.name.clone()]);
    assert_eq!(score_b(), 1.0);
    let a_age = Instant::now()
        - datastore
            .slot(&a.name)
            .unwrap()
            .load()
            .metrics
            .updated_at
            .unwrap();
    assert!(a_age < INTERVAL, "a scraped {a_age:?} ago");

    // b answers again: still stale until its next tick (its ticks stay on the interval grid
    // from its last success, THRESHOLD being a whole number of intervals) ...
    source.down.lock().clear();
    let next_tick = scraped_at + THRESHOLD + INTERVAL;
    advance_to(next_tick - MS).await;
    assert_eq!(kept(&filter, &datastore), vec![a.name.clone()]);
    assert_eq!(score_b(), 1.0);
    // ... and fresh from that scrape on, with its new metrics.
    advance_to(next_tick).await;
    assert_eq!(slot_b.load().metrics.updated_at, Some(next_tick));
    assert_eq!(kept(&filter, &datastore), both);
    assert_eq!(score_b(), f64::from(queue + 1) / f64::from(QUEUE_THRESHOLD));
}
