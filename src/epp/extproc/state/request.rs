//! The request side of a stream: headers (request id, objective, rewrite, subset hint), the
//! body gathered up to `--max-body-bytes`, then one routing decision and the replies that carry
//! it to Envoy.

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValueOption, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, ProcessingResponse};
use envoy_types::pb::google::protobuf::value::Kind;
use rand::Rng;

use super::super::replies::{self, Direction};
use super::super::StreamError;
use super::{
    Phase, RequestMode, StreamState, FAIRNESS_HEADER, MODEL_REWRITE_HEADER, OBJECTIVE_HEADER,
    REQUEST_ID_HEADER, SERVED_KEY, SUBSET_KEY, SUBSET_NAMESPACE, TEST_SELECTION_HEADER,
};
use crate::epp::director::{split_subset, Decision, RouteError, RoutingError};
use crate::epp::metrics::{EppMetrics, ModelPriorityLabels};
use crate::epp::request::ApiType;

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

impl StreamState {
    pub(super) fn on_request_headers(
        &mut self,
        headers: HttpHeaders,
        metadata: Option<&Metadata>,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), StreamError> {
        if !matches!(self.phase, Phase::Start) {
            return Ok(());
        }
        self.received_at = std::time::Instant::now();
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
                FAIRNESS_HEADER => self.meta.fairness_id = Some(text()),
                TEST_SELECTION_HEADER if self.shared.config.conformance_test_header => {
                    self.echo_served = true;
                    self.meta.subset = Some(split_subset(&text()));
                }
                _ => {}
            }
            if !is_system_owned(&key) {
                self.meta.headers.push((key, raw));
            }
        }
        self.meta.request_id = match request_id.filter(|id| !id.is_empty()) {
            Some(id) => id,
            None => {
                let id = new_request_id();
                self.meta
                    .headers
                    .push((REQUEST_ID_HEADER.to_string(), id.clone().into_bytes()));
                id
            }
        };
    }

    pub(super) fn on_request_body(
        &mut self,
        body: HttpBody,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), StreamError> {
        let Phase::Body { buf } = &mut self.phase else {
            // Envoy can repeat the last chunk of bodies over 1 MB after end_of_stream: ignore
            // anything that is not part of the body we are gathering.
            return Ok(());
        };
        let limit = self.shared.config.max_body_bytes;
        if buf.len().saturating_add(body.body.len()) > limit {
            return Err(StreamError::BodyTooLarge { limit });
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
    pub(super) fn on_request_trailers(
        &mut self,
        out: &mut Vec<ProcessingResponse>,
    ) -> Result<(), StreamError> {
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
    ) -> Result<(), StreamError> {
        let buf = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Body { buf } => buf,
            other => {
                self.phase = other;
                return Ok(());
            }
        };
        if let Some(flow) = self.shared.flow.clone() {
            // Flow control: parse now (bad bodies fail before taking a place in a queue),
            // choose the endpoint when the request leaves the queue.
            let parsed = self.shared.director.parse(&self.meta, &buf)?;
            let (model_label, target_label) =
                (parsed.model_label.clone(), parsed.target_label.clone());
            return match flow.admit(self.meta.clone(), buf, parsed) {
                Ok(ticket) => {
                    self.ticket = Some(ticket);
                    self.phase = Phase::Queued {
                        eos,
                        model_label,
                        target_label,
                    };
                    Ok(())
                }
                Err(e) => Err(RoutingError::from(RouteError::FlowControl(e))
                    .with_models(&model_label, &target_label)
                    .into()),
            };
        }
        let decision = self.shared.director.route(&self.meta, &buf)?;
        self.send_routed(decision, &buf, eos, out);
        Ok(())
    }

    /// The replies that carry a decision to Envoy (header reply, then the body in full-duplex
    /// mode; one body reply in buffered mode), the per-request metrics, and the routed phase.
    pub(super) fn send_routed(
        &mut self,
        decision: Decision,
        buf: &[u8],
        eos: bool,
        out: &mut Vec<ProcessingResponse>,
    ) {
        let body: &[u8] = decision.rewritten_body.as_deref().unwrap_or(buf);
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
        // Observed once per request, so resolved here rather than kept on the route.
        let m = &self.shared.metrics;
        m.requests
            .get_or_create(&ModelPriorityLabels {
                model_name: decision.model_label.clone(),
                target_model_name: decision.target_label.clone(),
                priority: decision.priority.to_string(),
            })
            .inc();
        m.request_sizes
            .get_or_create(&EppMetrics::model_labels(
                &decision.model_label,
                &decision.target_label,
            ))
            .observe(body.len() as f64);
        self.routed(decision);
    }

    /// Destination, Content-Length (when a body is sent), then every forwarded incoming header.
    fn routing_headers(
        &self,
        decision: &Decision,
        body_len: Option<usize>,
    ) -> Vec<HeaderValueOption> {
        let mut set = Vec::with_capacity(self.meta.headers.len() + 2);
        set.push(replies::set_header(
            replies::DESTINATION_KEY,
            decision.destination.as_bytes(),
        ));
        if let Some(len) = body_len.filter(|&l| l > 0) {
            set.push(replies::set_header("Content-Length", len.to_string()));
        }
        for (k, v) in &self.meta.headers {
            set.push(replies::set_header(k, v.clone()));
        }
        set
    }
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
