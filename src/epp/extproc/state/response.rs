//! The response side of a stream: status and content type, usage from JSON bodies or SSE
//! chunks, duration/size/token metrics once the response is complete, and the model name
//! rewritten back to the client's.

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, ProcessingResponse};
use envoy_types::pb::google::protobuf::value::Kind;

use super::super::replies::{self, Direction};
use super::super::usage::{self, SseUsageScanner, Usage};
use super::{
    Phase, Route, RouteMetrics, RunningGuard, StreamState, SERVED_KEY, TEST_SERVED_HEADER,
};
use crate::epp::director::Decision;

/// What happens to response body bytes (full-duplex mode).
#[derive(Debug)]
enum BodyState {
    /// A JSON body is held until complete, to read its usage.
    Buffering(Vec<u8>),
    /// Too big to buffer (or SSE): forwarded chunk by chunk, usage read on the fly if SSE.
    Passthrough,
    /// The response is complete; later body messages are ignored.
    Complete,
}

/// The response phase: the route it answers plus the response's progress.
#[derive(Debug)]
pub(super) struct Responding {
    /// The routed request; `None` when Envoy sends a response for a request the EPP never
    /// routed (its metrics then carry empty model labels).
    decision: Option<Decision>,
    running: Option<RunningGuard>,
    metrics: RouteMetrics,
    /// SSE (from the request's `stream` flag, then the response content type).
    streaming: bool,
    body: BodyState,
    sse: SseUsageScanner,
    usage: Option<Usage>,
    size: usize,
    served: Option<String>,
}

impl Responding {
    fn new(
        decision: Option<Decision>,
        running: Option<RunningGuard>,
        metrics: RouteMetrics,
    ) -> Self {
        Responding {
            streaming: decision.as_ref().is_some_and(|d| d.stream),
            decision,
            running,
            metrics,
            body: BodyState::Buffering(Vec::new()),
            sse: SseUsageScanner::default(),
            usage: None,
            size: 0,
            served: None,
        }
    }

    /// Label values of the routed request's models (allow-listed by the director).
    fn models(&self) -> (&str, &str) {
        match &self.decision {
            Some(d) => (&d.model_label, &d.target_label),
            None => ("", ""),
        }
    }

    pub(super) fn is_complete(&self) -> bool {
        matches!(self.body, BodyState::Complete)
    }
}

impl StreamState {
    /// Takes the response phase out of `self.phase`, entering it from `Routed` (or, for a
    /// response the EPP never routed, from any other phase). The caller puts it back.
    fn take_responding(&mut self) -> Box<Responding> {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Responding(r) => r,
            Phase::Routed(route) => {
                let Route {
                    decision,
                    running,
                    metrics,
                } = *route;
                Box::new(Responding::new(Some(decision), running, metrics))
            }
            _ => Box::new(Responding::new(
                None,
                None,
                RouteMetrics::resolve(&self.shared.metrics, "", ""),
            )),
        }
    }

    pub(super) fn on_response_headers(
        &mut self,
        headers: HttpHeaders,
        metadata: Option<&Metadata>,
        out: &mut Vec<ProcessingResponse>,
    ) {
        let mut r = self.take_responding();
        let mut status_error = false;
        for h in headers.headers.map(|m| m.headers).unwrap_or_default() {
            let value = if h.raw_value.is_empty() {
                h.value.into_bytes()
            } else {
                h.raw_value
            };
            match h.key.to_ascii_lowercase().as_str() {
                ":status" | "status" => status_error = value != b"200",
                "content-type" => {
                    if contains(&value, b"text/event-stream") {
                        r.streaming = true;
                    } else if contains(&value, b"application/json") {
                        r.streaming = false;
                    }
                }
                _ => {}
            }
        }
        if let Some(served) = metadata.and_then(served_endpoint) {
            r.served = Some(served);
        }
        if status_error {
            let (model, target) = r.models();
            self.shared
                .metrics
                .record_error(model, target, "ModelServerError");
        }
        let mut set = vec![replies::set_header("x-went-into-resp-headers", "true")];
        if let Some(d) = &r.decision {
            for (k, v) in &d.response_headers {
                set.push(replies::set_header(k, v.as_bytes()));
            }
        }
        if self.shared.config.served_verifier {
            // The verifier's texts (llm-d-router `destination_endpoint_served_verifier.go`).
            let value = match metadata {
                Some(m)
                    if m.filter_metadata
                        .contains_key(replies::DESTINATION_NAMESPACE) =>
                {
                    served_endpoint(m).unwrap_or_else(|| {
                        "fail: missing destination endpoint served metadata".to_string()
                    })
                }
                _ => "fail: missing envoy lb metadata".to_string(),
            };
            set.push(replies::set_header(TEST_SERVED_HEADER, value));
        } else if self.echo_served {
            let served = r
                .served
                .clone()
                .or_else(|| r.decision.as_ref().map(|d| d.destination.clone()))
                .unwrap_or_default();
            set.push(replies::set_header(TEST_SERVED_HEADER, served));
        }
        out.push(replies::response_headers(set));
        self.phase = Phase::Responding(r);
    }

    pub(super) fn on_response_body(&mut self, body: HttpBody, out: &mut Vec<ProcessingResponse>) {
        let mut r = self.take_responding();
        self.response_body(&mut r, body, out);
        self.phase = Phase::Responding(r);
    }

    fn response_body(&self, r: &mut Responding, body: HttpBody, out: &mut Vec<ProcessingResponse>) {
        if r.is_complete() {
            return;
        }
        let chunk = body.body;
        let eos = body.end_of_stream;
        r.size += chunk.len();
        if !chunk.is_empty() || eos {
            // The first response bytes end the request's prefill at its endpoint.
            if let Some(work) = r.decision.as_mut().and_then(|d| d.work.as_mut()) {
                work.first_token(std::time::Instant::now());
            }
        }
        if !self.response_full_duplex {
            // Envoy keeps ownership of the body in non-duplex modes; we only observe it.
            self.observe_response_chunk(r, &chunk, eos);
            out.push(replies::response_body_continue());
            return;
        }
        if r.streaming || matches!(r.body, BodyState::Passthrough) {
            self.observe_response_chunk(r, &chunk, eos);
            let chunk = rewrite_model_back(r, chunk);
            replies::streamed_body(Direction::Response, &chunk, eos, out);
            return;
        }
        let cap = self.shared.config.max_response_buffer_bytes;
        let BodyState::Buffering(buffer) = &mut r.body else {
            return;
        };
        if buffer.len() + chunk.len() > cap {
            // Too big to buffer: flush what we hold and stream the rest unparsed.
            let mut held = std::mem::take(buffer);
            r.body = BodyState::Passthrough;
            held.extend_from_slice(&chunk);
            replies::streamed_body(Direction::Response, &held, eos, out);
            if eos {
                self.complete_response(r);
            }
            return;
        }
        buffer.extend_from_slice(&chunk);
        if eos {
            self.flush_buffered_response(r, true, out);
        }
    }

    pub(super) fn on_response_trailers(&mut self, out: &mut Vec<ProcessingResponse>) {
        let mut r = self.take_responding();
        if self.response_full_duplex && !r.streaming && matches!(r.body, BodyState::Buffering(_)) {
            self.flush_buffered_response(&mut r, false, out);
        } else if !r.is_complete() {
            self.complete_response(&mut r);
        }
        out.push(replies::response_trailers_ack());
        self.phase = Phase::Responding(r);
    }

    fn flush_buffered_response(
        &self,
        r: &mut Responding,
        eos: bool,
        out: &mut Vec<ProcessingResponse>,
    ) {
        let body = match std::mem::replace(&mut r.body, BodyState::Passthrough) {
            BodyState::Buffering(b) => b,
            other => {
                r.body = other;
                Vec::new()
            }
        };
        if r.usage.is_none() {
            r.usage = usage::from_json(&body);
            self.record_usage(r);
        }
        let body = rewrite_model_back(r, body);
        replies::streamed_body(Direction::Response, &body, eos, out);
        self.complete_response(r);
    }

    fn observe_response_chunk(&self, r: &mut Responding, chunk: &[u8], eos: bool) {
        if r.usage.is_none() {
            if r.streaming {
                r.usage = r.sse.feed(chunk);
            } else if !matches!(r.body, BodyState::Passthrough) {
                // Non-duplex JSON: Envoy sends the whole body in one message.
                if eos {
                    r.usage = usage::from_json(chunk);
                }
            }
            self.record_usage(r);
        }
        if eos {
            self.complete_response(r);
        }
    }

    fn record_usage(&self, r: &Responding) {
        let Some(u) = r.usage else { return };
        let m = &self.shared.metrics;
        let labels = &r.metrics.labels;
        m.input_tokens
            .get_or_create(labels)
            .observe(u.prompt_tokens as f64);
        m.output_tokens
            .get_or_create(labels)
            .observe(u.completion_tokens as f64);
        if let Some(cached) = u.cached_tokens {
            m.prompt_cached_tokens
                .get_or_create(labels)
                .observe(cached as f64);
            // The prediction was for the primary; a fallback's usage says nothing about it.
            if let Some(d) = r.decision.as_ref().filter(|d| served_primary(d, &r.served)) {
                m.prefix_prediction.record(&d.prediction, cached);
            }
        }
    }

    fn complete_response(&self, r: &mut Responding) {
        if r.is_complete() {
            return;
        }
        r.body = BodyState::Complete;
        let elapsed = self.received_at.elapsed().as_secs_f64();
        r.metrics.request_duration.observe(elapsed);
        r.metrics.response_sizes.observe(r.size as f64);
        if let Some(u) = r.usage.filter(|u| u.completion_tokens > 0) {
            self.shared
                .metrics
                .normalized_time_per_output_token
                .get_or_create(&r.metrics.labels)
                .observe(elapsed / u.completion_tokens as f64);
        }
        // The request is no longer running once its response is complete.
        r.running = None;
        tracing::trace!(request_id = %self.meta.request_id, served = ?r.served, "response complete");
    }
}

/// The reference rewrites the target model back to the client's model name in responses.
fn rewrite_model_back(r: &Responding, body: Vec<u8>) -> Vec<u8> {
    match &r.decision {
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

/// Whether the response came from the decision's primary (assumed when Envoy sent no served
/// endpoint metadata).
fn served_primary(d: &Decision, served: &Option<String>) -> bool {
    match served {
        Some(s) => d.destination.split(',').next() == Some(s.as_str()),
        None => true,
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
