//! The flow controller: requests wait here while the pool is saturated and leave, best first,
//! when it has room (llm-d-router `pkg/epp/flowcontrol/controller`).
//!
//! ```text
//!  stream task ── enqueue ──▶ Queues (capacity checked now: reject at once or queue)
//!      │ awaits its Ticket                    │
//!      │                 dispatcher task: woken by enqueue, a finished request, a TTL
//!      │                 deadline or the recheck tick; expires what is past its TTL, then
//!      │                 while the pool has room: pop best → Dispatch::dispatch (schedule NOW)
//!      ◀──────── Ok(R) / Err(FlowError) ──────┘
//!  dropping the Ticket (Envoy closed the stream) removes the request and frees its capacity
//! ```
//!
//! Late binding: the endpoint is chosen by [`Dispatch::dispatch`] when the request leaves the
//! queue, on the metrics of that moment, and the dispatcher schedules synchronously, so the
//! in-flight accounting of one dispatch is visible to the gate before the next.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;

use super::config::FlowControlConfig;
use super::metrics::{FlowMetrics, Outcome, QueuedGauges, RequestLabels};
use super::queues::Queues;

/// Why a request did not get through flow control. The texts are the reference's error chains
/// with the prefix its admission controller adds (llm-d-router
/// `requestcontrol/admission.go` `translateFlowControlOutcome`); the HTTP status of each is
/// chosen in `extproc::replies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("request rejected pre-queue: queue at capacity")]
    RejectedCapacity,
    #[error("no endpoints available: request rejected pre-queue: no endpoints available")]
    RejectedNoEndpoints,
    #[error("request timed out in queue: request evicted from queue: request TTL expired")]
    EvictedTtl,
    #[error("request timed out in queue and no endpoints are available: request evicted from queue: request TTL expired: no endpoints available")]
    EvictedNoEndpoints,
    #[error("client disconnected: request evicted from queue: request context cancelled")]
    Cancelled,
    #[error(
        "flow controller shutting down: request rejected pre-queue: flow controller is not running"
    )]
    NotRunning,
    #[error(
        "flow controller shutting down: request evicted from queue: flow controller is not running"
    )]
    ShutDown,
}

impl FlowError {
    /// The outcome label this error is counted under.
    pub fn outcome(self) -> Outcome {
        match self {
            FlowError::RejectedCapacity => Outcome::RejectedCapacity,
            FlowError::RejectedNoEndpoints => Outcome::RejectedNoEndpoints,
            FlowError::EvictedTtl => Outcome::EvictedTtl,
            FlowError::EvictedNoEndpoints => Outcome::EvictedNoEndpoints,
            FlowError::Cancelled => Outcome::EvictedContextCancelled,
            FlowError::NotRunning => Outcome::RejectedOther,
            FlowError::ShutDown => Outcome::EvictedOther,
        }
    }
}

/// The pool as the dispatcher sees it at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolState {
    pub endpoints: usize,
    /// The saturation detector's pool value (mean endpoint score; the pool-saturation metric).
    pub saturation: f64,
    /// The lowest endpoint score: below 1.0 some endpoint has room.
    pub least_loaded: f64,
}

impl PoolState {
    /// Whether a request whose band's usage ceiling is `ceiling` (1.0 under the static
    /// policy) may leave the queue: some endpoint scores below it. The reference gates on the
    /// pool mean instead; with a mean, one busy replica holds the queue while another sits
    /// idle, and a request waits for the whole pool to drain rather than for the first
    /// endpoint with room (measured in `docs/benchmarks.md`, mixed priority).
    pub fn has_room(&self, ceiling: f64) -> bool {
        self.endpoints > 0 && self.least_loaded < ceiling
    }
}

/// How long a priority counts as active for the usage-limit policy after its last request
/// (explicitly configured bands always count). Long enough that a lull in interactive
/// traffic does not hand its reserved headroom to batch just before the next request.
pub const ACTIVE_PRIORITY_WINDOW: Duration = Duration::from_secs(300);

/// What the dispatcher needs from the rest of the EPP.
pub trait Dispatch<T, R>: Send + 'static {
    /// The pool now (endpoints and saturation, counting this EPP's latest dispatches).
    fn pool(&mut self) -> PoolState;
    /// Binds a request leaving the queue: scheduling happens here, not at arrival. `ceiling`
    /// is its band's usage ceiling: below 1.0 (a held-back band) it should go only to an
    /// endpoint scoring below it, so the headroom is kept on every endpoint.
    fn dispatch(&mut self, value: T, ceiling: f64) -> R;
}

/// A request offered to flow control.
#[derive(Debug)]
pub struct FlowRequest<T> {
    pub priority: i32,
    /// Fairness id (already defaulted and capped by the caller).
    pub fairness_id: Arc<str>,
    /// Request size counted against `maxBytes` (the body length, as the reference counts it).
    pub bytes: u64,
    /// Metric label values (fairness id capped by [`FlowMetrics::fairness_label`]).
    pub labels: RequestLabels,
    pub value: T,
}

struct Pending<T, R> {
    value: T,
    tx: oneshot::Sender<Result<R, FlowError>>,
    labels: RequestLabels,
    gauges: QueuedGauges,
    enqueued_at: Instant,
}

struct State<T, R> {
    queues: Queues<Pending<T, R>>,
    /// Whether the pool had no endpoints at the dispatcher's last look, and since when: which
    /// TTL budget applies, and it restarts when this changes (reference `isExpired`).
    empty: bool,
    since: Instant,
    running: bool,
    /// Priorities seen, with when each was last enqueued (the usage-limit policy's active
    /// priorities; pruned after [`ACTIVE_PRIORITY_WINDOW`]).
    seen: BTreeMap<i32, Instant>,
}

struct Inner<T, R> {
    state: Mutex<State<T, R>>,
    wake: Notify,
    config: Arc<FlowControlConfig>,
    metrics: FlowMetrics,
}

/// Handle to the flow controller; cheap to clone.
pub struct FlowController<T, R> {
    inner: Arc<Inner<T, R>>,
}

impl<T, R> Clone for FlowController<T, R> {
    fn clone(&self) -> Self {
        FlowController {
            inner: self.inner.clone(),
        }
    }
}

/// Removes a cancelled request (type-erased so a [`Ticket`] does not carry `T`).
trait Cancel: Send + Sync {
    fn cancel(&self, seq: u64);
}

impl<T: Send + 'static, R: Send + 'static> Cancel for Inner<T, R> {
    fn cancel(&self, seq: u64) {
        let removed = self.state.lock().queues.remove(seq);
        if let Some(entry) = removed {
            let p = entry.value;
            p.gauges.release();
            self.metrics.finished(
                &p.labels,
                Outcome::EvictedContextCancelled,
                p.enqueued_at.elapsed(),
            );
            tracing::trace!(seq, "queued request cancelled");
        }
    }
}

/// A queued request's claim on its outcome. Await it; dropping it before it resolves takes the
/// request out of the queue (its capacity is free at once).
pub struct Ticket<R> {
    rx: oneshot::Receiver<Result<R, FlowError>>,
    seq: u64,
    cancel: Option<Arc<dyn Cancel>>,
}

impl<R> std::fmt::Debug for Ticket<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("seq", &self.seq).finish()
    }
}

impl<R> Future for Ticket<R> {
    type Output = Result<R, FlowError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                self.cancel = None;
                // The sender is only dropped unsent if the controller itself is gone.
                Poll::Ready(r.unwrap_or(Err(FlowError::ShutDown)))
            }
        }
    }
}

impl<R> Drop for Ticket<R> {
    fn drop(&mut self) {
        if let Some(c) = self.cancel.take() {
            c.cancel(self.seq);
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> FlowController<T, R> {
    pub fn new(config: FlowControlConfig, metrics: FlowMetrics) -> Self {
        let config = Arc::new(config);
        FlowController {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    queues: Queues::new(config.clone()),
                    empty: false,
                    since: Instant::now(),
                    running: true,
                    seen: BTreeMap::new(),
                }),
                wake: Notify::new(),
                config,
                metrics,
            }),
        }
    }

    pub fn metrics(&self) -> &FlowMetrics {
        &self.inner.metrics
    }

    /// Requests waiting now.
    pub fn queued(&self) -> usize {
        self.inner.state.lock().queues.len()
    }

    /// Queues `req`, or rejects it at once when its band or the global limits are full.
    pub fn enqueue(&self, req: FlowRequest<T>) -> Result<Ticket<R>, FlowError> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        let refused = if !st.running {
            Some(FlowError::NotRunning)
        } else if st.queues.check(req.priority, req.bytes).is_err() {
            // With no endpoints the queue is a scale-from-zero waiting room, and a full one
            // means nothing can serve: 503, not backpressure (reference processor.enqueue).
            Some(if st.empty {
                FlowError::RejectedNoEndpoints
            } else {
                FlowError::RejectedCapacity
            })
        } else {
            None
        };
        if let Some(err) = refused {
            drop(st);
            inner
                .metrics
                .finished(&req.labels, err.outcome(), Duration::ZERO);
            return Err(err);
        }
        st.seen.insert(req.priority, Instant::now());
        let (tx, rx) = oneshot::channel();
        let gauges = inner.metrics.queued(&req.labels, req.bytes);
        let pending = Pending {
            value: req.value,
            tx,
            labels: req.labels,
            gauges,
            enqueued_at: Instant::now(),
        };
        let seq = match st
            .queues
            .push(req.priority, req.fairness_id, req.bytes, pending)
        {
            Ok(seq) => seq,
            // `check` just passed under the same lock.
            Err((_, p)) => {
                drop(st);
                p.gauges.release();
                inner
                    .metrics
                    .finished(&p.labels, Outcome::RejectedCapacity, Duration::ZERO);
                return Err(FlowError::RejectedCapacity);
            }
        };
        drop(st);
        inner.wake.notify_one();
        Ok(Ticket {
            rx,
            seq,
            cancel: Some(self.inner.clone() as Arc<dyn Cancel>),
        })
    }

    /// Something that frees room changed (a request finished): look again now.
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// The dispatcher. Runs until `shutdown` turns true (or its sender is dropped), then fails
    /// every queued request with [`FlowError::ShutDown`] and refuses new ones. `recheck` bounds
    /// how long a blocked queue waits for the pool to change without being woken (scrapes
    /// arrive on their own interval, so this is the refresh-metrics interval).
    pub async fn run<D: Dispatch<T, R>>(
        &self,
        mut dispatcher: D,
        recheck: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            if *shutdown.borrow() {
                break;
            }
            let (deadline, waiting) = self.cycle(&mut dispatcher);
            let until_deadline = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let recheck_tick = async {
                if waiting {
                    tokio::time::sleep(recheck).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = until_deadline => {}
                _ = recheck_tick => {}
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
        }
        self.stop();
    }

    /// One pass: expire, then dispatch while the pool has room. Returns the next TTL deadline
    /// and whether anything is still waiting.
    fn cycle<D: Dispatch<T, R>>(&self, dispatcher: &mut D) -> (Option<Instant>, bool) {
        let inner = &self.inner;
        let mut pool = dispatcher.pool();
        inner.metrics.set_pool_saturation(pool.saturation);
        let now = Instant::now();
        let mut expired = Vec::new();
        let error = {
            let mut st = inner.state.lock();
            let empty = pool.endpoints == 0;
            if empty != st.empty {
                st.empty = empty;
                st.since = now;
            }
            let (budget, error) = self.budget(empty);
            if let Some(budget) = budget {
                // Every request has the same budget and arrived in seq order, so the oldest
                // is always the first to expire.
                while let Some((seq, e)) = st.queues.oldest() {
                    let from = e.value.enqueued_at.max(st.since);
                    if now < from + budget {
                        break;
                    }
                    if let Some(entry) = st.queues.remove(seq) {
                        expired.push(entry.value);
                    }
                }
            }
            error
        };
        for p in expired {
            p.gauges.release();
            inner
                .metrics
                .finished(&p.labels, error.outcome(), now - p.enqueued_at);
            tracing::debug!(error = %error, "queued request expired");
            let _ = p.tx.send(Err(error));
        }

        loop {
            let popped = {
                let mut st = inner.state.lock();
                let Some(priority) = st.queues.next_priority() else {
                    break;
                };
                let ceiling = self.ceiling(&mut st, priority, now);
                // Ceilings never rise as priority falls, so when the best waiting band has
                // no room, no lower band has either.
                if !pool.has_room(ceiling) {
                    break;
                }
                st.queues.pop_next().map(|(_, e)| (e, ceiling))
            };
            let Some((entry, ceiling)) = popped else {
                break;
            };
            let p = entry.value;
            p.gauges.release();
            let waited = p.enqueued_at.elapsed();
            if p.tx.is_closed() {
                // The stream went away after the request was taken off the queue.
                inner
                    .metrics
                    .finished(&p.labels, Outcome::EvictedContextCancelled, waited);
                continue;
            }
            let routed = dispatcher.dispatch(p.value, ceiling);
            inner
                .metrics
                .finished(&p.labels, Outcome::Dispatched, waited);
            // A receiver gone by now drops `routed`, which releases whatever it holds.
            let _ = p.tx.send(Ok(routed));
            pool = dispatcher.pool();
            inner.metrics.set_pool_saturation(pool.saturation);
        }

        let st = inner.state.lock();
        let (budget, _) = self.budget(st.empty);
        let deadline = match (budget, st.queues.oldest()) {
            (Some(b), Some((_, e))) => Some(e.value.enqueued_at.max(st.since) + b),
            _ => None,
        };
        (deadline, !st.queues.is_empty())
    }

    /// The usage ceiling of `priority` among the active priorities (configured bands and
    /// those seen within [`ACTIVE_PRIORITY_WINDOW`]).
    fn ceiling(&self, st: &mut State<T, R>, priority: i32, now: Instant) -> f64 {
        let config = &self.inner.config;
        if config.usage_limit == super::usage::UsageLimit::Static {
            return 1.0;
        }
        st.seen
            .retain(|_, at| now.saturating_duration_since(*at) < ACTIVE_PRIORITY_WINDOW);
        let active: BTreeSet<i32> = st.seen.keys().chain(config.bands.keys()).copied().collect();
        config.usage_limit.ceiling(priority, &active)
    }

    /// The TTL in force and the error of a request that exhausts it.
    fn budget(&self, empty: bool) -> (Option<Duration>, FlowError) {
        let c = &self.inner.config;
        if empty {
            (c.no_endpoint_request_ttl, FlowError::EvictedNoEndpoints)
        } else {
            (c.default_request_ttl, FlowError::EvictedTtl)
        }
    }

    /// Refuses new requests and fails the queued ones.
    fn stop(&self) {
        let drained = {
            let mut st = self.inner.state.lock();
            st.running = false;
            st.queues.drain()
        };
        let count = drained.len();
        for (_, entry) in drained {
            let p = entry.value;
            p.gauges.release();
            self.inner
                .metrics
                .finished(&p.labels, Outcome::EvictedOther, p.enqueued_at.elapsed());
            let _ = p.tx.send(Err(FlowError::ShutDown));
        }
        tracing::info!(failed = count, "flow controller stopped");
    }
}
