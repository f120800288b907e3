//! Per-stream state machine. Pure and synchronous: `on_message` maps one ProcessingRequest to the
//! replies to send, so it is tested without gRPC. The request side (`request.rs`: headers, body,
//! routing) and the response side (`response.rs`: usage, sizes, model name rewrite) are separate
//! files; this one holds the phases they move through.
//!
//! ```text
//!  Start ──headers──▶ Body { buf } ──body eos──▶ Routed(Route) ──response──▶ Responding { route, .. }
//!    │                     │ (flowControl gate)      ▲                                  │
//!    │                     └──▶ Queued ──admitted────┘ (ticket awaited by the stream task)
//!    │  (headers-only: route at once) ─────────────▲                                  │
//!    └───────────── any error ──▶ Done (ImmediateResponse sent)        complete: running released
//! ```
//!
//! A [`Route`] carries everything a routed request owns: the decision (with its in-flight
//! guard), the running-requests guard and the metric handles resolved once for its model
//! labels. Dropping the stream drops the phase and so releases both guards, however it ends.

use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request as Msg, ProcessingRequest, ProcessingResponse,
};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use super::replies;
use super::Shared;
use super::StreamError;
use crate::epp::director::{Decision, RequestMeta, RouteError, RoutingError};
use crate::epp::flowcontrol::binding::WakeOnDrop;
use crate::epp::flowcontrol::{FlowError, Routed, Ticket};
use crate::epp::metrics::{EppMetrics, ModelLabels, ModelNameLabel};

mod request;
mod response;

use response::Responding;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
pub const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";
pub const MODEL_REWRITE_HEADER: &str = "x-gateway-model-name-rewrite";
pub const FAIRNESS_HEADER: &str = "x-gateway-inference-fairness-id";
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
pub const SERVED_KEY: &str = "x-gateway-destination-endpoint-served";
pub const TEST_SELECTION_HEADER: &str = "test-epp-endpoint-selection";
pub const TEST_SERVED_HEADER: &str = "x-conformance-test-served-endpoint";

/// How Envoy sends the request body, from `protocol_config` on the first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestMode {
    /// FULL_DUPLEX_STREAMED (also assumed when Envoy does not say): hold the header reply until
    /// the body is complete.
    FullDuplex,
    /// BUFFERED / BUFFERED_PARTIAL: Envoy waits for the header reply before sending the body, so
    /// headers are answered at once and the body reply carries the routing mutations.
    Buffered,
    /// NONE / STREAMED: no usable body before the header reply; route on headers alone.
    HeadersOnly,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for request headers.
    Start,
    /// Gathering the request body.
    Body { buf: Vec<u8> },
    /// Parsed and waiting in flow control (the ticket is on the state); the body is in the
    /// queue and comes back with the decision. The labels are for an error reply.
    Queued {
        eos: bool,
        model_label: String,
        target_label: String,
    },
    /// Routed; no response message yet.
    Routed(Box<Route>),
    /// The response is flowing back.
    Responding(Box<Responding>),
    /// Error reply sent; nothing more to do.
    Done,
}

/// Releases the running-requests gauge when dropped, however the stream ends.
#[derive(Debug)]
struct RunningGuard(Gauge);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Metric handles of one routed request, resolved once for its model label values (allow-listed
/// by the director, `director::label_for_model`). Series observed
/// only sometimes (token counts, errors) are created on first observation, as before, so an
/// unobserved series never appears in `/metrics`; they reuse the labels built here.
#[derive(Debug)]
struct RouteMetrics {
    labels: ModelLabels,
    request_duration: Histogram,
    response_sizes: Histogram,
}

impl RouteMetrics {
    fn resolve(metrics: &EppMetrics, model: &str, target: &str) -> Self {
        let labels = EppMetrics::model_labels(model, target);
        RouteMetrics {
            request_duration: metrics.request_duration.get_or_create(&labels).clone(),
            response_sizes: metrics.response_sizes.get_or_create(&labels).clone(),
            labels,
        }
    }
}

/// What a routed request owns until its stream ends.
#[derive(Debug)]
struct Route {
    decision: Decision,
    /// Counts the request in `inference_objective_running_requests` until its response is
    /// complete (then `None`).
    running: Option<RunningGuard>,
    metrics: RouteMetrics,
}

impl Route {
    fn new(shared: &Shared, decision: Decision) -> Self {
        let gauge = shared
            .metrics
            .running_requests
            .get_or_create(&ModelNameLabel {
                model_name: decision.model_label.clone(),
            })
            .clone();
        gauge.inc();
        let metrics = RouteMetrics::resolve(
            &shared.metrics,
            &decision.model_label,
            &decision.target_label,
        );
        Route {
            decision,
            running: Some(RunningGuard(gauge)),
            metrics,
        }
    }
}

pub struct StreamState {
    shared: Arc<Shared>,
    mode: RequestMode,
    response_full_duplex: bool,
    phase: Phase,
    received_at: Instant,
    meta: RequestMeta,
    /// `x-conformance-test-served-endpoint` is wanted on the response (the test header with
    /// `--enable-conformance-test-header`).
    echo_served: bool,
    /// Set while the request waits in flow control; the stream task awaits it.
    ticket: Option<Ticket<Routed>>,
    /// Wakes flow control's dispatcher when this (flow-controlled) stream ends.
    _flow_wake: Option<WakeOnDrop>,
}

impl StreamState {
    pub fn new(shared: Arc<Shared>) -> Self {
        StreamState {
            shared,
            mode: RequestMode::FullDuplex,
            response_full_duplex: true,
            phase: Phase::Start,
            received_at: Instant::now(),
            meta: RequestMeta::default(),
            echo_served: false,
            ticket: None,
            _flow_wake: None,
        }
    }

    /// The flow-control ticket of a request that was just queued: the stream task awaits it
    /// (while watching for Envoy closing the stream) and hands the outcome to
    /// [`Self::on_admitted`]. Dropping it instead takes the request out of the queue.
    pub fn take_ticket(&mut self) -> Option<Ticket<Routed>> {
        self.ticket.take()
    }

    /// A queued request's flow-control outcome: route it with the decision made at dispatch,
    /// or reply with the error. Returns true when the stream should end.
    pub fn on_admitted(
        &mut self,
        admitted: Result<Routed, FlowError>,
        out: &mut Vec<ProcessingResponse>,
    ) -> bool {
        let (eos, model_label, target_label) = match std::mem::replace(&mut self.phase, Phase::Done)
        {
            Phase::Queued {
                eos,
                model_label,
                target_label,
            } => (eos, model_label, target_label),
            other => {
                self.phase = other;
                return false;
            }
        };
        let err = match admitted {
            Ok(Routed {
                result: Ok(decision),
                body,
            }) => {
                self._flow_wake = self.shared.flow.clone().map(WakeOnDrop);
                self.send_routed(decision, &body, eos, out);
                return false;
            }
            Ok(Routed { result: Err(e), .. }) => e,
            Err(e) => RoutingError::from(RouteError::FlowControl(e))
                .with_models(&model_label, &target_label),
        };
        self.fail(&StreamError::Route(err), out);
        true
    }

    /// Handles one message; pushes replies to `out`. Returns true when the stream should end
    /// (after those replies): an error reply was sent, or the response is complete.
    pub fn on_message(
        &mut self,
        msg: ProcessingRequest,
        out: &mut Vec<ProcessingResponse>,
    ) -> bool {
        if let Some(pc) = msg.protocol_config {
            self.mode = match BodySendMode::try_from(pc.request_body_mode) {
                Ok(BodySendMode::Buffered | BodySendMode::BufferedPartial) => RequestMode::Buffered,
                Ok(BodySendMode::None | BodySendMode::Streamed) => RequestMode::HeadersOnly,
                _ => RequestMode::FullDuplex,
            };
            self.response_full_duplex = matches!(
                BodySendMode::try_from(pc.response_body_mode),
                Ok(BodySendMode::FullDuplexStreamed)
            );
        }
        let metadata: Option<Metadata> = msg.metadata_context;
        let result = match msg.request {
            Some(Msg::RequestHeaders(h)) => self.on_request_headers(h, metadata.as_ref(), out),
            Some(Msg::RequestBody(b)) => self.on_request_body(b, out),
            Some(Msg::RequestTrailers(_)) => self.on_request_trailers(out),
            Some(Msg::ResponseHeaders(h)) => {
                self.on_response_headers(h, metadata.as_ref(), out);
                Ok(())
            }
            Some(Msg::ResponseBody(b)) => {
                self.on_response_body(b, out);
                return self.response_complete();
            }
            Some(Msg::ResponseTrailers(_)) => {
                self.on_response_trailers(out);
                return self.response_complete();
            }
            None => Ok(()),
        };
        match result {
            Ok(()) => false,
            Err(err) => {
                self.fail(&err, out);
                true
            }
        }
    }

    /// The response is complete (body end_of_stream or trailers): Envoy sends nothing more on
    /// this stream, so it can end with the last reply. Ending here puts the gRPC trailers in
    /// the same write as that reply, instead of one more round (Envoy's half-close, a wake-up
    /// of the stream, a write of the trailers) per request.
    fn response_complete(&self) -> bool {
        matches!(&self.phase, Phase::Responding(r) if r.is_complete())
    }

    fn fail(&mut self, err: &StreamError, out: &mut Vec<ProcessingResponse>) {
        tracing::debug!(request_id = %self.meta.request_id, error = %err, "request rejected");
        let (model, target) = match err {
            StreamError::Route(e) => (e.model.as_str(), e.target_model.as_str()),
            StreamError::BodyTooLarge { .. } => ("", ""),
        };
        self.shared
            .metrics
            .record_error(model, target, replies::error_code(err).as_str());
        out.push(replies::immediate_error(err));
        self.phase = Phase::Done;
    }

    /// Enters the routed phase (the request side's last step).
    fn routed(&mut self, decision: Decision) {
        tracing::trace!(request_id = %self.meta.request_id, destination = %decision.destination, "routed");
        self.phase = Phase::Routed(Box::new(Route::new(&self.shared, decision)));
    }
}

#[cfg(test)]
mod tests;
