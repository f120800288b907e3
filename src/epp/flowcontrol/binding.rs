//! Flow control bound to the EPP: what a queued ext_proc request carries into the queue, and
//! the dispatcher that schedules it with the director when it leaves.

use std::sync::Arc;

use super::config::{DEFAULT_FAIRNESS_ID, MAX_FAIRNESS_ID_BYTES};
use super::controller::{Dispatch, FlowController, FlowError, FlowRequest, PoolState, Ticket};
use super::metrics::RequestLabels;
use crate::epp::director::{Decision, Director, Parsed, RequestMeta, RoutingError};

/// A request waiting for its endpoint. It owns the body so the queue's memory is bounded by
/// `maxBytes`; the body comes back with the decision.
#[derive(Debug)]
pub struct QueuedRequest {
    pub meta: RequestMeta,
    pub body: Vec<u8>,
    pub parsed: Parsed,
}

/// A request that left the queue: its routing result (chosen at dispatch) and its body.
#[derive(Debug)]
pub struct Routed {
    pub result: Result<Decision, RoutingError>,
    pub body: Vec<u8>,
}

pub type EppFlowController = FlowController<QueuedRequest, Routed>;

/// Schedules requests leaving the queue with the director, on the pool of that moment.
pub struct DirectorDispatch(pub Arc<Director>);

impl Dispatch<QueuedRequest, Routed> for DirectorDispatch {
    fn pool(&mut self) -> PoolState {
        self.0.pool_state()
    }

    fn dispatch(&mut self, q: QueuedRequest, ceiling: f64) -> Routed {
        let result = self.0.route_parsed(&q.meta, &q.body, q.parsed, ceiling);
        Routed {
            result,
            body: q.body,
        }
    }
}

/// The flow key of a request: its fairness header, `default-flow` when absent or empty, cut
/// to [`MAX_FAIRNESS_ID_BYTES`] at a character boundary.
pub fn fairness_id(meta: &RequestMeta) -> Arc<str> {
    match meta.fairness_id.as_deref().filter(|s| !s.is_empty()) {
        None => Arc::from(DEFAULT_FAIRNESS_ID),
        Some(id) => {
            let mut end = id.len().min(MAX_FAIRNESS_ID_BYTES);
            while !id.is_char_boundary(end) {
                end -= 1;
            }
            Arc::from(&id[..end])
        }
    }
}

impl EppFlowController {
    /// Offers a parsed request to flow control.
    pub fn admit(
        &self,
        meta: RequestMeta,
        body: Vec<u8>,
        parsed: Parsed,
    ) -> Result<Ticket<Routed>, FlowError> {
        let fairness_id = fairness_id(&meta);
        let labels = RequestLabels {
            fairness_id: self.metrics().fairness_label(&fairness_id),
            priority: parsed.priority.to_string(),
            model_name: parsed.model_label.clone(),
            target_model_name: parsed.target_label.clone(),
        };
        self.enqueue(FlowRequest {
            priority: parsed.priority,
            fairness_id,
            bytes: body.len() as u64,
            labels,
            value: QueuedRequest { meta, body, parsed },
        })
    }
}

/// Wakes the dispatcher when dropped: a flow-controlled request's stream ended, so its
/// endpoint may have room again before the next scrape shows it.
#[derive(Debug)]
pub struct WakeOnDrop(pub EppFlowController);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        self.0.wake();
    }
}

impl<T, R> std::fmt::Debug for FlowController<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlowController")
    }
}
