//! EPP flow control: the reference's `flowControl` feature gate (llm-d-router
//! `pkg/epp/flowcontrol`). Off by default; with the gate on, requests no longer go straight to
//! a replica's queue when the pool is saturated. They wait here, in one band per priority
//! (InferenceObjective priority), one flow per `x-gateway-inference-fairness-id` inside a
//! band, and leave best first when the saturation detector says the pool has room; the
//! endpoint is chosen when a request leaves (late binding). Capacity limits reject at arrival
//! (429, or 503 with no endpoints), a queue-wait TTL evicts (429, or 503 with no endpoints).
//!
//! - [`config`]: validated settings and the reference's defaults.
//! - [`queues`]: bands, flows and capacity, pure data.
//! - [`controller`]: enqueue/await tickets and the dispatcher task.
//! - [`binding`]: what an ext_proc request queues with and how the director dispatches it.
//! - [`metrics`]: the reference's `*_flow_control_*` metrics.
//! - [`usage`]: usage-limit policies (per-band dispatch ceilings; priority holdback).

pub mod binding;
pub mod config;
pub mod controller;
pub mod metrics;
pub mod queues;
pub mod usage;

pub use binding::{DirectorDispatch, EppFlowController, QueuedRequest, Routed};
pub use config::{BandConfig, Fairness, FlowControlConfig, FEATURE_GATE};
pub use controller::{Dispatch, FlowController, FlowError, FlowRequest, PoolState, Ticket};
pub use metrics::{FlowMetrics, Outcome};
pub use usage::{HoldbackDomain, HoldbackParams, UsageLimit};

#[cfg(test)]
mod tests;
