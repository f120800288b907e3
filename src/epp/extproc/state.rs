//! Per-stream state machine. Pure and synchronous: `on_message` maps one ProcessingRequest to the
//! replies to send, so it is tested without gRPC.

use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValueOption, Metadata};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request as Msg, HttpBody, HttpHeaders, ProcessingRequest,
    ProcessingResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use prometheus_client::metrics::gauge::Gauge;
use rand::Rng;

use super::replies::{self, Direction};
use super::usage::{self, SseUsageScanner, Usage};
use super::Shared;
use crate::epp::director::{split_subset, Decision, ErrorCode, RequestMeta, RoutingError};
use crate::epp::endpoint::InflightGuard;
use crate::epp::metrics::{EppMetrics, ModelNameLabel, ModelPriorityLabels};
use crate::epp::request::ApiType;
use crate::epp::work::WorkGuard;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
pub const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";
pub const MODEL_REWRITE_HEADER: &str = "x-gateway-model-name-rewrite";
pub const FAIRNESS_HEADER: &str = "x-gateway-inference-fairness-id";
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
pub const SERVED_KEY: &str = "x-gateway-destination-endpoint-served";
pub const TEST_SELECTION_HEADER: &str = "test-epp-endpoint-selection";
pub const TEST_SERVED_HEADER: &str = "x-conformance-test-served-endpoint";

/// Headers the EPP owns and therefore never copies back (reference `IsSystemOwnedHeader`, plus
/// pseudo-headers, which Envoy refuses to mutate).
fn is_system_owned(key: &str) -> bool {
    key.starts_with(':')
        || matches!(
            key,
            "content-length"
                | replies::DESTINATION_KEY
                | SERVED_KEY
                | OBJECTIVE_HEADER
                | MODEL_REWRITE_HEADER
                | FAIRNESS_HEADER
                | SUBSET_KEY
        )
}

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
    /// Routed; waiting for (or processing) the response.
    Routed,
    /// Error reply sent; nothing more to do.
    Done,
}

/// Releases the running-requests gauge when the stream ends, however it ends.
struct RunningGuard(Gauge);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Debug, Default)]
struct ResponseState {
    streaming: bool,
    status_error: bool,
    buffer: Vec<u8>,
    /// Buffer overflowed: pass the rest through without parsing.
    passthrough: bool,
    sse: SseUsageScanner,
    usage: Option<Usage>,
    size: usize,
    complete: bool,
    served: Option<String>,
}

pub struct StreamState {
    shared: Arc<Shared>,
    mode: RequestMode,
    response_full_duplex: bool,
    phase: Phase,
    received_at: Instant,
    meta: RequestMeta,
    /// Incoming headers to set again on the routed request, in arrival order (raw values).
    forward_headers: Vec<(String, Vec<u8>)>,
    echo_served: bool,
    decision: Option<Decision>,
    running: Option<RunningGuard>,
    /// This request's share of its primary endpoint's in-flight count; released on drop.
    inflight: Option<InflightGuard>,
    /// This request's predicted prefill (then decode) work at its primary; released on drop.
    work: Option<WorkGuard>,
    response: ResponseState,
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
            forward_headers: Vec::new(),
            echo_served: false,
            decision: None,
            running: None,
            inflight: None,
            work: None,
            response: ResponseState::default(),
        }
    }

    /// Handles one message; pushes replies to `out`. Returns true when the stream should end.
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
        let metadata = msg.metadata_context;
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
                Ok(())
            }
            Some(Msg::ResponseTrailers(_)) => {
                self.on_response_trailers(out);
                Ok(())
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

    fn fail(&mut self, err: &RoutingError, out: &mut Vec<ProcessingResponse>) {
        tracing::debug!(request_id = %self.meta.request_id, error = %err, "request rejected");
        self.shared
            .metrics
            .record_error(&err.model, &err.target_model, err.code.as_str());
        out.push(replies::immediate_error(err));
        self.phase = Phase::Done;
    }

    fn on_request_headers(
        &mut self,
        headers: HttpHeaders,
        metadata: Option<&Metadata>,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), RoutingError> {
        if !matches!(self.phase, Phase::Start) {
            return Ok(());
        }
        self.received_at = Instant::now();
        self.read_request_headers(headers.headers.unwrap_or_default());
        if let Some(subset) = metadata.and_then(subset_hint) {
            self.meta.subset = Some(subset);
        }
        if headers.end_of_stream || self.mode == RequestMode::HeadersOnly {
            let decision = self.shared.director.route_headers_only(&self.meta)?;
            let set = self.routing_headers(&decision, None);
            out.push(replies::request_headers_routed(set, &decision.destination));
            self.routed(decision);
            return Ok(());
        }
        if self.mode == RequestMode::Buffered {
            out.push(replies::request_headers_continue());
        }
        self.phase = Phase::Body { buf: Vec::new() };
        Ok(())
    }

    fn read_request_headers(&mut self, map: HeaderMap) {
        let mut request_id = None;
        for h in map.headers {
            let key = h.key.to_ascii_lowercase();
            let raw = if h.raw_value.is_empty() {
                h.value.into_bytes()
            } else {
                h.raw_value
            };
            let text = || String::from_utf8_lossy(&raw).into_owned();
            match key.as_str() {
                ":path" => self.meta.api = ApiType::from_path(&text()),
                REQUEST_ID_HEADER => request_id = Some(text()),
                OBJECTIVE_HEADER => self.meta.objective = Some(text()),
                MODEL_REWRITE_HEADER => self.meta.model_rewrite = Some(text()),
                TEST_SELECTION_HEADER => {
                    self.echo_served = true;
                    self.meta.subset = Some(split_subset(&text()));
                }
                _ => {}
            }
            if !is_system_owned(&key) {
                self.forward_headers.push((key, raw));
            }
        }
        self.meta.request_id = match request_id.filter(|id| !id.is_empty()) {
            Some(id) => id,
            None => {
                let id = new_request_id();
                self.forward_headers
                    .push((REQUEST_ID_HEADER.to_string(), id.clone().into_bytes()));
                id
            }
        };
    }

    fn on_request_body(
        &mut self,
        body: HttpBody,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), RoutingError> {
        let Phase::Body { buf } = &mut self.phase else {
            // Envoy can repeat the last chunk of bodies over 1 MB after end_of_stream: ignore
            // anything that is not part of the body we are gathering.
            return Ok(());
        };
        let limit = self.shared.config.max_body_bytes;
        if buf.len().saturating_add(body.body.len()) > limit {
            return Err(RoutingError::new(
                ErrorCode::PayloadTooLarge,
                format!("request body exceeds the limit of {limit} bytes (--max-body-bytes)"),
            ));
        }
        if buf.is_empty() {
            *buf = body.body;
        } else {
            buf.extend_from_slice(&body.body);
        }
        // Buffered modes deliver the whole (or the partial-buffered) body in one message.
        if body.end_of_stream || self.mode == RequestMode::Buffered {
            self.finish_request_body(true, out)?;
        }
        Ok(())
    }

    /// A request that ends with trailers has no body end_of_stream: route when trailers arrive.
    fn on_request_trailers(
        &mut self,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), RoutingError> {
        if matches!(self.phase, Phase::Body { .. }) {
            self.finish_request_body(false, out)?;
        }
        out.push(replies::request_trailers_ack());
        Ok(())
    }

    fn finish_request_body(
        &mut self,
        eos: bool,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), RoutingError> {
        let buf = match std::mem::replace(&mut self.phase, Phase::Routed) {
            Phase::Body { buf } => buf,
            other => {
                self.phase = other;
                return Ok(());
            }
        };
        let decision = self.shared.director.route(&self.meta, &buf)?;
        let body: &[u8] = decision.rewritten_body.as_deref().unwrap_or(&buf);
        let set = self.routing_headers(&decision, Some(body.len()));
        match self.mode {
            RequestMode::Buffered => out.push(replies::request_body_routed(
                set,
                &decision.destination,
                decision.rewritten_body.clone(),
            )),
            _ => {
                out.push(replies::request_headers_routed(set, &decision.destination));
                replies::streamed_body(Direction::Request, body, eos, out);
            }
        }
        let m = &self.shared.metrics;
        let labels = EppMetrics::model_labels(&decision.model_label, &decision.target_label);
        m.requests
            .get_or_create(&ModelPriorityLabels {
                model_name: decision.model_label.clone(),
                target_model_name: decision.target_label.clone(),
                priority: decision.priority.to_string(),
            })
            .inc();
        m.request_sizes
            .get_or_create(&labels)
            .observe(body.len() as f64);
        self.routed(decision);
        Ok(())
    }

    fn routed(&mut self, decision: Decision) {
        tracing::trace!(request_id = %self.meta.request_id, destination = %decision.destination, "routed");
        let gauge = self
            .shared
            .metrics
            .running_requests
            .get_or_create(&ModelNameLabel {
                model_name: decision.model_label.clone(),
            })
            .clone();
        gauge.inc();
        self.running = Some(RunningGuard(gauge));
        if self.shared.config.inflight_accounting {
            // Fallbacks are only tried if the primary fails; count the primary alone.
            self.inflight = decision
                .endpoints
                .first()
                .and_then(|e| e.metrics.dispatch.as_ref())
                .map(|d| d.dispatch());
            self.work = decision
                .endpoints
                .first()
                .and_then(|e| e.metrics.dispatch.as_ref())
                .map(|d| WorkGuard::dispatch(d, decision.prefill_tokens, Instant::now()));
        }
        self.response.streaming = decision.stream;
        self.decision = Some(decision);
        self.phase = Phase::Routed;
    }

    /// Destination, Content-Length (when a body is sent), then every forwarded incoming header.
    fn routing_headers(
        &self,
        decision: &Decision,
        body_len: Option<usize>,
    ) -> Vec<HeaderValueOption> {
        let mut set = Vec::with_capacity(self.forward_headers.len() + 2);
        set.push(replies::set_header(
            replies::DESTINATION_KEY,
            decision.destination.as_bytes(),
        ));
        if let Some(len) = body_len.filter(|&l| l > 0) {
            set.push(replies::set_header("Content-Length", len.to_string()));
        }
        for (k, v) in &self.forward_headers {
            set.push(replies::set_header(k, v.clone()));
        }
        set
    }

    fn on_response_headers(
        &mut self,
        headers: HttpHeaders,
        metadata: Option<&Metadata>,
        out: &mut Vec<ProcessingResponse>,
    ) {
        for h in headers.headers.map(|m| m.headers).unwrap_or_default() {
            let value = if h.raw_value.is_empty() {
                h.value.into_bytes()
            } else {
                h.raw_value
            };
            match h.key.to_ascii_lowercase().as_str() {
                ":status" | "status" => self.response.status_error = value != b"200",
                "content-type" => {
                    if contains(&value, b"text/event-stream") {
                        self.response.streaming = true;
                    } else if contains(&value, b"application/json") {
                        self.response.streaming = false;
                    }
                }
                _ => {}
            }
        }
        if let Some(served) = metadata.and_then(served_endpoint) {
            self.response.served = Some(served);
        }
        if self.response.status_error {
            let (model, target) = self.models();
            self.shared
                .metrics
                .record_error(&model, &target, "ModelServerError");
        }
        let mut set = vec![replies::set_header("x-went-into-resp-headers", "true")];
        if self.echo_served {
            let served = self
                .response
                .served
                .clone()
                .or_else(|| self.decision.as_ref().map(|d| d.destination.clone()))
                .unwrap_or_default();
            set.push(replies::set_header(TEST_SERVED_HEADER, served));
        }
        out.push(replies::response_headers(set));
    }

    fn on_response_body(&mut self, body: HttpBody, out: &mut Vec<ProcessingResponse>) {
        if self.response.complete {
            return;
        }
        let chunk = body.body;
        let eos = body.end_of_stream;
        self.response.size += chunk.len();
        if let Some(work) = self.work.as_mut().filter(|_| !chunk.is_empty() || eos) {
            work.first_token(Instant::now());
        }
        if !self.response_full_duplex {
            // Envoy keeps ownership of the body in non-duplex modes; we only observe it.
            self.observe_response_chunk(&chunk, eos);
            out.push(replies::response_body_continue());
            return;
        }
        if self.response.streaming || self.response.passthrough {
            self.observe_response_chunk(&chunk, eos);
            let chunk = self.rewrite_model_back(chunk);
            replies::streamed_body(Direction::Response, &chunk, eos, out);
            return;
        }
        let cap = self.shared.config.max_response_buffer_bytes;
        if self.response.buffer.len() + chunk.len() > cap {
            // Too big to buffer: flush what we hold and stream the rest unparsed.
            self.response.passthrough = true;
            let mut held = std::mem::take(&mut self.response.buffer);
            held.extend_from_slice(&chunk);
            replies::streamed_body(Direction::Response, &held, eos, out);
            if eos {
                self.complete_response();
            }
            return;
        }
        self.response.buffer.extend_from_slice(&chunk);
        if eos {
            self.flush_buffered_response(true, out);
        }
    }

    fn on_response_trailers(&mut self, out: &mut Vec<ProcessingResponse>) {
        if self.response_full_duplex
            && !self.response.streaming
            && !self.response.passthrough
            && !self.response.complete
        {
            self.flush_buffered_response(false, out);
        } else if !self.response.complete {
            self.complete_response();
        }
        out.push(replies::response_trailers_ack());
    }

    fn flush_buffered_response(&mut self, eos: bool, out: &mut Vec<ProcessingResponse>) {
        let body = std::mem::take(&mut self.response.buffer);
        if self.response.usage.is_none() {
            self.response.usage = usage::from_json(&body);
            self.record_usage();
        }
        let body = self.rewrite_model_back(body);
        replies::streamed_body(Direction::Response, &body, eos, out);
        self.complete_response();
    }

    fn observe_response_chunk(&mut self, chunk: &[u8], eos: bool) {
        if self.response.usage.is_none() {
            if self.response.streaming {
                self.response.usage = self.response.sse.feed(chunk);
            } else if !self.response.passthrough {
                // Non-duplex JSON: Envoy sends the whole body in one message.
                if eos {
                    self.response.usage = usage::from_json(chunk);
                }
            }
            self.record_usage();
        }
        if eos {
            self.complete_response();
        }
    }

    fn record_usage(&self) {
        let Some(u) = self.response.usage else { return };
        let (model, target) = self.models();
        let labels = EppMetrics::model_labels(&model, &target);
        let m = &self.shared.metrics;
        m.input_tokens
            .get_or_create(&labels)
            .observe(u.prompt_tokens as f64);
        m.output_tokens
            .get_or_create(&labels)
            .observe(u.completion_tokens as f64);
        if let Some(cached) = u.cached_tokens {
            m.prompt_cached_tokens
                .get_or_create(&labels)
                .observe(cached as f64);
        }
    }

    fn complete_response(&mut self) {
        if self.response.complete {
            return;
        }
        self.response.complete = true;
        let (model, target) = self.models();
        let labels = EppMetrics::model_labels(&model, &target);
        let m = &self.shared.metrics;
        let elapsed = self.received_at.elapsed().as_secs_f64();
        m.request_duration.get_or_create(&labels).observe(elapsed);
        m.response_sizes
            .get_or_create(&labels)
            .observe(self.response.size as f64);
        if let Some(u) = self.response.usage.filter(|u| u.completion_tokens > 0) {
            m.normalized_time_per_output_token
                .get_or_create(&labels)
                .observe(elapsed / u.completion_tokens as f64);
        }
        // The request is no longer running once its response is complete.
        self.running = None;
        tracing::trace!(request_id = %self.meta.request_id, served = ?self.response.served, "response complete");
    }

    /// The reference rewrites the target model back to the client's model name in responses.
    fn rewrite_model_back(&self, body: Vec<u8>) -> Vec<u8> {
        match &self.decision {
            Some(d)
                if !d.target_model.is_empty()
                    && !d.incoming_model.is_empty()
                    && d.target_model != d.incoming_model =>
            {
                rewrite_model_name(body, &d.target_model, &d.incoming_model)
            }
            _ => body,
        }
    }

    /// Label values of the routed request's models (allow-listed by the director).
    fn models(&self) -> (String, String) {
        match &self.decision {
            Some(d) => (d.model_label.clone(), d.target_label.clone()),
            None => (String::new(), String::new()),
        }
    }
}

/// Replaces `"model":"<from>"` (or `"model": "<from>"`) with the same form naming `to`.
fn rewrite_model_name(body: Vec<u8>, from: &str, to: &str) -> Vec<u8> {
    for sep in [":", ": "] {
        let old = format!("\"model\"{sep}\"{from}\"");
        if contains(&body, old.as_bytes()) {
            let new = format!("\"model\"{sep}\"{to}\"");
            return replace_all(&body, old.as_bytes(), new.as_bytes());
        }
    }
    body
}

fn replace_all(hay: &[u8], old: &[u8], new: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(old) {
            out.extend_from_slice(new);
            i += old.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Subset hint from `filter_metadata["envoy.lb.subset_hint"]["x-gateway-destination-endpoint-subset"]`,
/// given as a list of strings or a comma-separated string.
fn subset_hint(metadata: &Metadata) -> Option<Vec<String>> {
    let value = metadata
        .filter_metadata
        .get(SUBSET_NAMESPACE)?
        .fields
        .get(SUBSET_KEY)?;
    match value.kind.as_ref()? {
        Kind::ListValue(list) => Some(
            list.values
                .iter()
                .filter_map(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => Some(s.trim().to_string()),
                    _ => None,
                })
                .collect(),
        ),
        Kind::StringValue(s) => Some(split_subset(s)),
        _ => None,
    }
}

fn served_endpoint(metadata: &Metadata) -> Option<String> {
    let value = metadata
        .filter_metadata
        .get(replies::DESTINATION_NAMESPACE)?
        .fields
        .get(SERVED_KEY)?;
    match value.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// A random RFC 4122 version-4 UUID, as the reference generates for requests without an id.
fn new_request_id() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests;
