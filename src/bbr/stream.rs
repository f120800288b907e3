//! One BBR ext_proc stream, message by message, with upstream's replies (GIE v1.5.0
//! `pkg/bbr/handlers/{server,request,response}.go`). Pure and synchronous: `on_message` maps a
//! ProcessingRequest to the replies to send.
//!
//! ```text
//! request headers ─(streaming, no eos: held)─▶ body chunks ─eos─▶ parse + plugins
//!    └─(otherwise) empty HeadersResponse        streaming: header reply (ClearRouteCache,
//!                                               plugin headers, Content-Length) + body chunks
//!                                               buffered: BodyResponse with the headers
//! bad JSON ─▶ ImmediateResponse 400 "inference error: BadRequest - failed to parse request
//!             body: <Go's error>", stream ends
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation::Mutation, processing_request::Request as Msg, processing_response::Response,
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingRequest, ProcessingResponse, StreamedBodyResponse, TrailersResponse,
};
use serde_json::value::RawValue;

use super::gojson;
use super::metrics::BbrMetrics;
use super::plugins::{go_format, AdaptersStore, Plugin, BASE_MODEL_HEADER};

/// Largest body chunk sent back in one StreamedBodyResponse (upstream `BodyByteLimit`).
pub const BODY_CHUNK_LIMIT: usize = 62_000;

/// What every stream shares.
#[derive(Debug)]
pub struct BbrShared {
    /// `--streaming`: Envoy runs the filter in FULL_DUPLEX_STREAMED mode.
    pub streaming: bool,
    pub plugins: Vec<Plugin>,
    pub adapters: AdaptersStore,
    /// Largest request or response body held (upstream holds any size).
    pub max_body_bytes: usize,
    pub metrics: BbrMetrics,
}

/// Why a stream ends with an ImmediateResponse.
#[derive(Debug, thiserror::Error)]
pub enum BbrError {
    #[error("inference error: BadRequest - failed to parse request body: {0}")]
    BadBody(String),
    #[error("inference error: PayloadTooLarge - request body exceeds the limit of {0} bytes (--max-body-bytes)")]
    TooLarge(usize),
}

impl BbrError {
    fn status(&self) -> i32 {
        match self {
            BbrError::BadBody(_) => 400,
            BbrError::TooLarge(_) => 413,
        }
    }
}

pub struct BbrStream {
    shared: Arc<BbrShared>,
    /// Request headers as Envoy sent them (lowercase names).
    headers: BTreeMap<String, String>,
    request_body: Vec<u8>,
    response_body: Vec<u8>,
    /// The response body outgrew the limit: its held part was sent, the rest passes through.
    response_passthrough: bool,
}

impl BbrStream {
    pub fn new(shared: Arc<BbrShared>) -> Self {
        BbrStream {
            shared,
            headers: BTreeMap::new(),
            request_body: Vec::new(),
            response_body: Vec::new(),
            response_passthrough: false,
        }
    }

    /// Handles one message, pushing replies to `out`; true when the stream must end.
    pub fn on_message(
        &mut self,
        msg: ProcessingRequest,
        out: &mut Vec<ProcessingResponse>,
    ) -> bool {
        let streaming = self.shared.streaming;
        let result = match msg.request {
            Some(Msg::RequestHeaders(h)) => {
                for hv in h.headers.map(|m| m.headers).unwrap_or_default() {
                    let value = if hv.raw_value.is_empty() {
                        hv.value
                    } else {
                        String::from_utf8_lossy(&hv.raw_value).into_owned()
                    };
                    self.headers.insert(hv.key, value);
                }
                if !streaming || h.end_of_stream {
                    out.push(headers_reply(Response::RequestHeaders, None));
                }
                Ok(())
            }
            Some(Msg::RequestBody(b)) => {
                if self.request_body.len().saturating_add(b.body.len()) > self.shared.max_body_bytes
                {
                    Err(BbrError::TooLarge(self.shared.max_body_bytes))
                } else {
                    self.request_body.extend_from_slice(&b.body);
                    if streaming && !b.end_of_stream {
                        Ok(())
                    } else {
                        self.request_body_done(out)
                    }
                }
            }
            Some(Msg::RequestTrailers(_)) => {
                out.push(ProcessingResponse {
                    response: Some(Response::RequestTrailers(TrailersResponse::default())),
                    ..Default::default()
                });
                Ok(())
            }
            Some(Msg::ResponseHeaders(h)) => {
                if !streaming || h.end_of_stream {
                    out.push(headers_reply(Response::ResponseHeaders, None));
                }
                Ok(())
            }
            Some(Msg::ResponseBody(b)) => {
                self.response_body_chunk(&b.body, b.end_of_stream, out);
                Ok(())
            }
            Some(Msg::ResponseTrailers(_)) => {
                out.push(ProcessingResponse {
                    response: Some(Response::ResponseTrailers(TrailersResponse::default())),
                    ..Default::default()
                });
                Ok(())
            }
            None => Ok(()),
        };
        match result {
            Ok(()) => false,
            Err(e) => {
                tracing::debug!(error = %e, "request rejected");
                out.push(ProcessingResponse {
                    response: Some(Response::ImmediateResponse(ImmediateResponse {
                        status: Some(HttpStatus { code: e.status() }),
                        body: e.to_string().into_bytes(),
                        ..Default::default()
                    })),
                    ..Default::default()
                });
                true
            }
        }
    }

    /// Parses the complete body, runs the plugins and replies (upstream `HandleRequestBody`).
    fn request_body_done(&mut self, out: &mut Vec<ProcessingResponse>) -> Result<(), BbrError> {
        let body = std::mem::take(&mut self.request_body);
        if let Some(e) = gojson::unmarshal_error(&body) {
            return Err(BbrError::BadBody(e));
        }
        // Go accepts `null` as an empty map; serde needs an object.
        let fields: BTreeMap<String, &RawValue> = if body.trim_ascii() == b"null" {
            BTreeMap::new()
        } else {
            serde_json::from_slice(&body).map_err(|e| BbrError::BadBody(e.to_string()))?
        };
        let mut set: Vec<(String, String)> = Vec::new();
        for plugin in &self.shared.plugins {
            let (field, header) = match plugin {
                Plugin::BodyFieldToHeader { field, header } => (field.as_str(), header.as_str()),
                Plugin::BaseModelToHeader => ("model", BASE_MODEL_HEADER),
            };
            let Some(raw) = fields.get(field) else {
                if matches!(plugin, Plugin::BodyFieldToHeader { .. }) {
                    self.shared.metrics.field_not_found(field);
                }
                continue;
            };
            let value = serde_json::from_str(raw.get())
                .map(|v| go_format(&v))
                .map_err(|e| BbrError::BadBody(e.to_string()))?;
            let value = match plugin {
                Plugin::BodyFieldToHeader { .. } if value.is_empty() => {
                    self.shared.metrics.field_empty(field);
                    continue;
                }
                Plugin::BodyFieldToHeader { .. } => value,
                Plugin::BaseModelToHeader => self.shared.adapters.base_model(&value).to_string(),
            };
            // Upstream marks a header mutated only when it differs from the request's own.
            if self.headers.get(header) == Some(&value) {
                continue;
            }
            self.headers.insert(header.to_string(), value.clone());
            set.retain(|(k, _)| k != header);
            set.push((header.to_string(), value));
        }
        self.shared.metrics.success.inc();
        if self.shared.streaming {
            // Content-Length tells Envoy the size of the body that follows.
            set.push(("Content-Length".into(), body.len().to_string()));
            out.push(headers_reply(Response::RequestHeaders, Some(&set)));
            streamed_body(&body, true, out, Response::RequestBody);
        } else {
            out.push(ProcessingResponse {
                response: Some(Response::RequestBody(BodyResponse {
                    response: Some(mutation(&set)),
                })),
                ..Default::default()
            });
        }
        Ok(())
    }

    /// Upstream `HandleResponseBody` without response plugins: buffered mode answers each
    /// chunk with an empty BodyResponse; streaming mode holds the body until its end, then
    /// sends the held response headers reply and the body back.
    fn response_body_chunk(&mut self, chunk: &[u8], eos: bool, out: &mut Vec<ProcessingResponse>) {
        if !self.shared.streaming {
            out.push(ProcessingResponse {
                response: Some(Response::ResponseBody(BodyResponse::default())),
                ..Default::default()
            });
            return;
        }
        if self.response_passthrough {
            streamed_body(chunk, eos, out, Response::ResponseBody);
            return;
        }
        self.response_body.extend_from_slice(chunk);
        let over = self.response_body.len() > self.shared.max_body_bytes;
        if eos || over {
            // Over the limit the held part goes now and the rest passes through, so memory
            // stays bounded (upstream holds the whole response).
            out.push(headers_reply(Response::ResponseHeaders, None));
            let held = std::mem::take(&mut self.response_body);
            streamed_body(&held, eos, out, Response::ResponseBody);
            self.response_passthrough = over && !eos;
        }
    }
}

/// `ClearRouteCache` plus the headers to set (overwriting a client's own values).
fn mutation(set: &[(String, String)]) -> CommonResponse {
    CommonResponse {
        clear_route_cache: true,
        header_mutation: Some(HeaderMutation {
            set_headers: set
                .iter()
                .map(|(k, v)| HeaderValueOption {
                    header: Some(HeaderValue {
                        key: k.clone(),
                        value: String::new(),
                        raw_value: v.clone().into_bytes(),
                    }),
                    append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                    ..Default::default()
                })
                .collect(),
            remove_headers: Vec::new(),
        }),
        ..Default::default()
    }
}

/// A headers reply: empty, or with the routing mutation.
fn headers_reply(
    variant: fn(HeadersResponse) -> Response,
    set: Option<&[(String, String)]>,
) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(variant(HeadersResponse {
            response: set.map(mutation),
        })),
        ..Default::default()
    }
}

/// `body` in ≤ 62,000-byte StreamedBodyResponse chunks, the last carrying `eos` (one empty
/// chunk for an empty body), as upstream `BuildChunkedBodyResponses`.
fn streamed_body(
    body: &[u8],
    eos: bool,
    out: &mut Vec<ProcessingResponse>,
    variant: fn(BodyResponse) -> Response,
) {
    let push = |out: &mut Vec<ProcessingResponse>, chunk: &[u8], end: bool| {
        out.push(ProcessingResponse {
            response: Some(variant(BodyResponse {
                response: Some(CommonResponse {
                    body_mutation: Some(BodyMutation {
                        mutation: Some(Mutation::StreamedResponse(StreamedBodyResponse {
                            body: chunk.to_vec(),
                            end_of_stream: end,
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                }),
            })),
            ..Default::default()
        })
    };
    if body.is_empty() {
        push(out, body, eos);
        return;
    }
    let n = body.len().div_ceil(BODY_CHUNK_LIMIT);
    for (i, chunk) in body.chunks(BODY_CHUNK_LIMIT).enumerate() {
        push(out, chunk, eos && i + 1 == n);
    }
}

#[cfg(test)]
mod tests;
