//! The pool's endpoints, their live metrics, and the objectives and model rewrites that apply to
//! requests. Written by discovery (endpoint set) and the scrapers (metrics); read lock-free by the
//! request path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::endpoint::{DispatchCounters, Endpoint, EndpointMetrics, EndpointSnapshot, ScrapeMark};

/// A change to the endpoint set, as emitted by a discovery source.
#[derive(Debug, Clone)]
pub enum DiscoveryEvent {
    /// Replace the whole set (first sync, re-list, file reload).
    Reset(Vec<Endpoint>),
    /// Add an endpoint, or replace the one with the same name.
    Upsert(Endpoint),
    /// Remove the endpoint with this name.
    Remove(String),
}

/// One endpoint's slot: scrapers swap in a new snapshot, readers load it without locking.
/// The slot owns the endpoint's [`DispatchCounters`] and attaches them to every snapshot.
#[derive(Debug)]
pub struct EndpointSlot {
    current: ArcSwap<EndpointSnapshot>,
    dispatch: Arc<DispatchCounters>,
}

impl EndpointSlot {
    /// A slot starting from `metrics` and `dispatch` (an endpoint that was replaced keeps its
    /// counters, so the requests still in flight to it keep counting).
    fn new(
        endpoint: Arc<Endpoint>,
        metrics: EndpointMetrics,
        dispatch: Arc<DispatchCounters>,
    ) -> Self {
        EndpointSlot {
            current: ArcSwap::from_pointee(EndpointSnapshot {
                endpoint,
                metrics,
                dispatch: Some(dispatch.clone()),
            }),
            dispatch,
        }
    }

    pub fn endpoint(&self) -> Arc<Endpoint> {
        self.current.load().endpoint.clone()
    }

    pub fn load(&self) -> Arc<EndpointSnapshot> {
        self.current.load_full()
    }

    /// This endpoint's dispatch counters (the same ones every snapshot of the slot carries).
    pub fn dispatch(&self) -> &Arc<DispatchCounters> {
        &self.dispatch
    }

    /// Publishes metrics for this endpoint as if scraped right now: every dispatch so far is
    /// taken to be included in them.
    pub fn publish(&self, metrics: EndpointMetrics) {
        self.store(metrics);
        self.dispatch.reset_since_scrape();
    }

    /// Publishes the result of a scrape that began at `mark` (see
    /// [`DispatchCounters::begin_scrape`]); dispatches after the mark stay counted.
    pub fn publish_scraped(&self, metrics: EndpointMetrics, mark: ScrapeMark) {
        self.store(metrics);
        self.dispatch.scraped(mark);
    }

    fn store(&self, metrics: EndpointMetrics) {
        let endpoint = self.current.load().endpoint.clone();
        self.current.store(Arc::new(EndpointSnapshot {
            endpoint,
            metrics,
            dispatch: Some(self.dispatch.clone()),
        }));
    }
}

/// Scheduling priority and model rewrites, keyed as the reference keys them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestPolicy {
    /// Objective name (value of `x-gateway-inference-objective`) → priority.
    pub objectives: HashMap<String, i32>,
    /// Source model → weighted targets.
    pub model_rewrites: HashMap<String, Vec<RewriteTarget>>,
    /// Targets of a rewrite rule without matches: applies to every model with no exact rule.
    pub default_rewrite: Option<Vec<RewriteTarget>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RewriteTarget {
    pub model: String,
    pub weight: u32,
}

/// Endpoints by name, sorted by name so snapshots have a stable order.
#[derive(Debug)]
pub struct Datastore {
    slots: ArcSwap<Vec<Arc<EndpointSlot>>>,
    policy: ArcSwap<RequestPolicy>,
    synced: AtomicBool,
    /// Bumped on every endpoint-set change; the scrape manager follows it.
    version_tx: watch::Sender<u64>,
}

impl Default for Datastore {
    fn default() -> Self {
        Self::new()
    }
}

impl Datastore {
    pub fn new() -> Self {
        Datastore {
            slots: ArcSwap::from_pointee(Vec::new()),
            policy: ArcSwap::from_pointee(RequestPolicy::default()),
            synced: AtomicBool::new(false),
            version_tx: watch::channel(0).0,
        }
    }

    /// Applies a discovery event. Slots of endpoints that survive unchanged keep their metrics.
    /// Only discovery calls this, from one task per source, so the read-modify-write is not racy
    /// in practice; it is still serialised by `rcu`.
    pub fn apply(&self, event: DiscoveryEvent) {
        self.slots.rcu(|current| {
            let mut by_name: Vec<Arc<EndpointSlot>> = match &event {
                DiscoveryEvent::Reset(_) => Vec::new(),
                _ => current.iter().cloned().collect(),
            };
            let upserts: Vec<&Endpoint> = match &event {
                DiscoveryEvent::Reset(list) => list.iter().collect(),
                DiscoveryEvent::Upsert(e) => vec![e],
                DiscoveryEvent::Remove(_) => Vec::new(),
            };
            if let DiscoveryEvent::Remove(name) = &event {
                by_name.retain(|s| s.endpoint().name != *name);
            }
            for ep in upserts {
                let existing = current.iter().find(|s| s.endpoint().name == ep.name);
                let slot = match existing {
                    Some(slot) if *slot.endpoint() == *ep => slot.clone(),
                    Some(slot) => Arc::new(EndpointSlot::new(
                        Arc::new(ep.clone()),
                        slot.load().metrics.clone(),
                        slot.dispatch().clone(),
                    )),
                    None => Arc::new(EndpointSlot::new(
                        Arc::new(ep.clone()),
                        EndpointMetrics::default(),
                        Arc::default(),
                    )),
                };
                by_name.retain(|s| s.endpoint().name != ep.name);
                by_name.push(slot);
            }
            by_name.sort_by(|a, b| a.endpoint().name.cmp(&b.endpoint().name));
            by_name
        });
        self.version_tx.send_modify(|v| *v += 1);
    }

    /// Marks the first full sync done (readiness depends on it).
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    /// Readiness drops again, e.g. when the InferencePool is deleted.
    pub fn mark_unsynced(&self) {
        self.synced.store(false, Ordering::Release);
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The current slots (for scrapers and discovery bookkeeping).
    pub fn slots(&self) -> Arc<Vec<Arc<EndpointSlot>>> {
        self.slots.load_full()
    }

    pub fn slot(&self, name: &str) -> Option<Arc<EndpointSlot>> {
        self.slots
            .load()
            .iter()
            .find(|s| s.endpoint().name == name)
            .cloned()
    }

    /// One consistent-enough view of every endpoint for one scheduling decision.
    pub fn snapshot(&self) -> Vec<Arc<EndpointSnapshot>> {
        self.slots.load().iter().map(|s| s.load()).collect()
    }

    pub fn len(&self) -> usize {
        self.slots.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Receives the endpoint-set version on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }

    pub fn policy(&self) -> Arc<RequestPolicy> {
        self.policy.load_full()
    }

    pub fn set_policy(&self, policy: RequestPolicy) {
        self.policy.store(Arc::new(policy));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str) -> Endpoint {
        Endpoint::from_addr(addr.parse().unwrap())
    }

    #[test]
    fn reset_upsert_remove_keep_sorted_and_metrics() {
        let ds = Datastore::new();
        ds.apply(DiscoveryEvent::Reset(vec![
            ep("10.0.0.2:8000"),
            ep("10.0.0.1:8000"),
        ]));
        let names: Vec<_> = ds
            .snapshot()
            .iter()
            .map(|s| s.endpoint.name.clone())
            .collect();
        assert_eq!(names, ["10.0.0.1:8000", "10.0.0.2:8000"]);

        ds.slot("10.0.0.2:8000").unwrap().publish(EndpointMetrics {
            waiting_queue_size: 7,
            ..Default::default()
        });
        // Re-listing the same endpoints keeps their metrics.
        ds.apply(DiscoveryEvent::Reset(vec![
            ep("10.0.0.1:8000"),
            ep("10.0.0.2:8000"),
        ]));
        assert_eq!(
            ds.slot("10.0.0.2:8000")
                .unwrap()
                .load()
                .metrics
                .waiting_queue_size,
            7
        );

        ds.apply(DiscoveryEvent::Upsert(ep("10.0.0.0:8000")));
        ds.apply(DiscoveryEvent::Remove("10.0.0.2:8000".into()));
        let names: Vec<_> = ds
            .snapshot()
            .iter()
            .map(|s| s.endpoint.name.clone())
            .collect();
        assert_eq!(names, ["10.0.0.0:8000", "10.0.0.1:8000"]);
        assert_eq!(*ds.subscribe().borrow(), 4);
    }
}
