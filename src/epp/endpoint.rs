//! Endpoints (one per pod × target port) and the live metrics scraped from them.
//!
//! Scrapers publish a fresh immutable [`EndpointSnapshot`] per endpoint; the scheduler works on a
//! `&[Arc<EndpointSnapshot>]` taken once per request, so no lock is held while scoring.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

/// Model-server flavour, which decides the metric names scraped from it (REFERENCE.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EngineType {
    #[default]
    Vllm,
    Sglang,
    TrtllmServe,
    TritonTensorrtLlm,
}

impl EngineType {
    /// Pod label that selects the engine type (default `vllm`).
    pub const LABEL: &'static str = "inference.networking.k8s.io/engine-type";

    pub fn as_str(self) -> &'static str {
        match self {
            EngineType::Vllm => "vllm",
            EngineType::Sglang => "sglang",
            EngineType::TrtllmServe => "trtllm-serve",
            EngineType::TritonTensorrtLlm => "triton-tensorrt-llm",
        }
    }
}

impl fmt::Display for EngineType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown engine type {0:?} (expected vllm, sglang, trtllm-serve or triton-tensorrt-llm)")]
pub struct UnknownEngineType(pub String);

impl FromStr for EngineType {
    type Err = UnknownEngineType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vllm" | "" => Ok(EngineType::Vllm),
            "sglang" => Ok(EngineType::Sglang),
            "trtllm-serve" => Ok(EngineType::TrtllmServe),
            "triton-tensorrt-llm" => Ok(EngineType::TritonTensorrtLlm),
            other => Err(UnknownEngineType(other.to_string())),
        }
    }
}

/// A routable model-server endpoint: pod IP × target port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Stable name, unique in the pool (`<pod>-rank-<i>` in Kubernetes; the address for static lists).
    pub name: String,
    pub addr: SocketAddr,
    /// The engine named for this endpoint itself (pool file `engineType`); `None`: decided by
    /// the data layer from the labels and `defaultEngine` (`scrape::MetricsExtractorConfig`).
    pub engine: Option<EngineType>,
    pub labels: BTreeMap<String, String>,
}

impl Endpoint {
    /// An endpoint named by its address, with the default engine and no labels.
    pub fn from_addr(addr: SocketAddr) -> Self {
        Endpoint {
            name: addr.to_string(),
            addr,
            engine: None,
            labels: BTreeMap::new(),
        }
    }
}

/// LoRA adapter state reported by vLLM's `vllm:lora_requests_info`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraInfo {
    pub max_lora: u32,
    pub running: Vec<String>,
    pub waiting: Vec<String>,
}

/// Last scraped metrics of one endpoint. `updated_at == None` means never scraped successfully.
/// `updated_at` is tokio's clock, so paused-time tests can age metrics past the staleness
/// threshold exactly (it is the wall clock otherwise).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointMetrics {
    pub waiting_queue_size: u32,
    pub running_requests: u32,
    /// KV-cache utilisation in 0..=1.
    pub kv_cache_usage: f64,
    pub kv_block_size: Option<u32>,
    pub kv_num_blocks: Option<u64>,
    pub lora: Option<LoraInfo>,
    pub updated_at: Option<Instant>,
}

impl EndpointMetrics {
    /// True when the last successful scrape is older than `threshold` (or there was none).
    pub fn is_stale(&self, now: Instant, threshold: std::time::Duration) -> bool {
        match self.updated_at {
            Some(t) => now.saturating_duration_since(t) > threshold,
            None => true,
        }
    }
}

/// Per-endpoint accounting of the requests this EPP sent, kept with atomics so the request path
/// never locks. Between two scrapes every request sees the same scraped queue and KV numbers;
/// without this a burst all goes to the one endpoint that looked best at the last scrape.
///
/// ```text
///   dispatch() ──▶ in_flight +1, since_scrape +1 ──▶ InflightGuard dropped ──▶ in_flight −1
///   begin_scrape() reads since_scrape = m ──▶ GET /metrics ──▶ scraped(m): since_scrape −= m
/// ```
/// Requests dispatched while a scrape is in flight stay counted: the page may predate them.
#[derive(Debug, Default)]
pub struct DispatchCounters {
    in_flight: AtomicU32,
    since_scrape: AtomicU32,
    /// Outstanding prefill/decode work and the learned prefill rate (`work-aware` scoring).
    pub work: crate::epp::work::WorkCounters,
}

/// Identity: two handles are equal when they count for the same endpoint slot.
impl PartialEq for DispatchCounters {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

/// What [`DispatchCounters::begin_scrape`] saw: dispatches the coming scrape may include.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrapeMark(u32);

impl DispatchCounters {
    /// Records one request committed to this endpoint. The count stays in flight until the
    /// returned guard is dropped (response complete, or the stream ended in any other way).
    pub fn dispatch(self: &Arc<Self>) -> InflightGuard {
        saturating_inc(&self.in_flight);
        saturating_inc(&self.since_scrape);
        InflightGuard(self.clone())
    }

    /// Requests dispatched here whose streams have not ended.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests dispatched here since the last scrape began.
    pub fn dispatched_since_scrape(&self) -> u32 {
        self.since_scrape.load(Ordering::Relaxed)
    }

    /// What scorers add to the scraped queue / running counts: the dispatches since the last
    /// scrape, but no more than are still in flight. The cap keeps a request that already
    /// finished (or an endpoint whose scrapes keep failing) from being counted until the next
    /// successful scrape; it is also what bounds the correction.
    pub fn unscraped(&self) -> u32 {
        self.dispatched_since_scrape().min(self.in_flight())
    }

    /// Call right before requesting `/metrics`; pass the mark to [`Self::scraped`] on success.
    pub fn begin_scrape(&self) -> ScrapeMark {
        ScrapeMark(self.since_scrape.load(Ordering::Relaxed))
    }

    /// A scrape that began at `mark` was published: the dispatches counted up to then are in
    /// the scraped numbers from now on.
    pub fn scraped(&self, mark: ScrapeMark) {
        let _ = self
            .since_scrape
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(mark.0))
            });
    }

    /// Forgets every dispatch since the last scrape (metrics published from outside a poller).
    pub fn reset_since_scrape(&self) {
        self.since_scrape.store(0, Ordering::Relaxed);
    }
}

/// `+1` that sticks at `u32::MAX` instead of wrapping (bounded even if scrapes never succeed).
fn saturating_inc(counter: &AtomicU32) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1));
}

/// One dispatched request's share of [`DispatchCounters::in_flight`], released on drop.
#[derive(Debug)]
pub struct InflightGuard(Arc<DispatchCounters>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        // Never below zero: a saturated increment leaves more guards than counted requests.
        let _ = self
            .0
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

/// Immutable view of one endpoint at one moment: what scheduling reads.
#[derive(Debug, Clone)]
pub struct EndpointSnapshot {
    pub endpoint: Arc<Endpoint>,
    /// Last scraped metrics.
    pub metrics: EndpointMetrics,
    /// The EPP's own live dispatch counters for this endpoint (not scraped). The datastore's
    /// slot owns them and attaches them to every snapshot it publishes; `None` (snapshots built
    /// without a datastore, e.g. in tests) scores exactly like the reference.
    pub dispatch: Option<Arc<DispatchCounters>>,
}

impl EndpointSnapshot {
    /// Requests this EPP dispatched to the endpoint that the scraped numbers do not include
    /// yet and that may still be running (see [`DispatchCounters::unscraped`]); 0 without
    /// counters.
    pub fn unscraped(&self) -> u32 {
        self.dispatch.as_ref().map_or(0, |d| d.unscraped())
    }

    /// Counts one request routed here until the returned guard is dropped; `None` without
    /// counters.
    pub fn dispatch(&self) -> Option<InflightGuard> {
        self.dispatch.as_ref().map(|d| d.dispatch())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_counts_until_scraped_or_finished() {
        let d = Arc::new(DispatchCounters::default());
        let g1 = d.dispatch();
        let g2 = d.dispatch();
        assert_eq!(
            (d.in_flight(), d.dispatched_since_scrape(), d.unscraped()),
            (2, 2, 2)
        );
        // A scrape starts, a third request is routed while it is in flight.
        let mark = d.begin_scrape();
        let g3 = d.dispatch();
        d.scraped(mark);
        // The page may predate the third request: it stays counted.
        assert_eq!(
            (d.in_flight(), d.dispatched_since_scrape(), d.unscraped()),
            (3, 1, 1)
        );
        drop(g3);
        // Finished: no longer counted even though no scrape has seen it.
        assert_eq!(
            (d.in_flight(), d.dispatched_since_scrape(), d.unscraped()),
            (2, 1, 1)
        );
        drop(g1);
        drop(g2);
        assert_eq!((d.in_flight(), d.unscraped()), (0, 0));
        d.reset_since_scrape();
        assert_eq!(d.dispatched_since_scrape(), 0);
    }

    /// Snapshots without counters (`dispatch: None`, as in tests and the reference) and with
    /// zeroed counters score identically, and exactly as the reference formula on the scraped
    /// numbers alone; live counters then move the scores, so a scorer that ignored them, or
    /// counted zeroed counters as load, fails here.
    #[test]
    fn snapshots_without_counters_score_like_the_reference() {
        use crate::epp::scheduling::plugins::scorers::{QueueScorer, RunningRequestsScorer};
        use crate::epp::scheduling::plugins::{CycleState, Scorer};
        use crate::epp::scheduling::SchedulingRequest;

        // (waiting, running) scraped from endpoints a, b, c.
        let scraped = [(6u32, 2u32), (0, 4), (10, 12)];
        let snapshots = |counters: &[Option<Arc<DispatchCounters>>]| -> Vec<Arc<EndpointSnapshot>> {
            scraped
                .iter()
                .zip(counters)
                .enumerate()
                .map(|(i, (&(waiting, running), dispatch))| {
                    let addr = SocketAddr::from(([127, 0, 0, 1], 8000 + i as u16));
                    Arc::new(EndpointSnapshot {
                        endpoint: Arc::new(Endpoint::from_addr(addr)),
                        metrics: EndpointMetrics {
                            waiting_queue_size: waiting,
                            running_requests: running,
                            ..EndpointMetrics::default()
                        },
                        dispatch: dispatch.clone(),
                    })
                })
                .collect()
        };
        let score = |scorer: &dyn Scorer, eps: &[Arc<EndpointSnapshot>]| -> Vec<f64> {
            let request = SchedulingRequest {
                request_id: "r",
                target_model: "m",
                api: Default::default(),
                prompt: b"",
                cache_salt: b"",
                fallbacks: 0,
                headers: &[],
            };
            let cycle = CycleState {
                request: &request,
                prefix_hashes: &[],
                prefix_block_tokens: 16,
                prefix_matches: &[],
                scratch: &crate::epp::scheduling::plugins::scratch::NOTHING_STORED,
            };
            let mut out = vec![f64::NAN; eps.len()];
            scorer.score(&cycle, eps, &mut out);
            out
        };
        let queue = QueueScorer { name: "q".into() };
        let running = RunningRequestsScorer { name: "r".into() };
        // The reference's (max − v) / (max − min): waiting 6, 0, 10 and running 2, 4, 12.
        let want_queue = vec![0.4, 1.0, 0.0];
        let want_running = vec![1.0, 0.8, 0.0];

        let without = snapshots(&[None, None, None]);
        let counters: Vec<Option<Arc<DispatchCounters>>> = (0..3)
            .map(|_| Some(Arc::new(DispatchCounters::default())))
            .collect();
        let zeroed = snapshots(&counters);
        for (scorer, want) in [
            (&queue as &dyn Scorer, &want_queue),
            (&running as &dyn Scorer, &want_running),
        ] {
            assert_eq!(score(scorer, &without), *want, "{}", scorer.name());
            assert_eq!(score(scorer, &zeroed), *want, "{}", scorer.name());
        }

        // Four requests routed to b since its last scrape and still in flight: b now counts
        // waiting 0 + 4 and running 4 + 4 (the snapshots share the live counters), so the
        // queue minimum is b's 4: (10 − 6) / (10 − 4), (10 − 4) / 6, 0.
        let b = counters[1].as_ref().unwrap();
        let guards: Vec<InflightGuard> = (0..4).map(|_| b.dispatch()).collect();
        assert_eq!(score(&queue, &zeroed), vec![4.0 / 6.0, 1.0, 0.0]);
        assert_eq!(score(&running, &zeroed), vec![1.0, 0.4, 0.0]);
        // Without counters the same snapshots cannot see those requests.
        assert_eq!(score(&queue, &without), want_queue);
        // Streams ended: back to the scraped numbers.
        drop(guards);
        assert_eq!(score(&queue, &zeroed), want_queue);
        assert_eq!(score(&running, &zeroed), want_running);
    }
}
