//! Builders for the ext_proc replies the EPP sends, shaped exactly like the reference's
//! (GIE v1.5.0 `pkg/epp/handlers`, `pkg/common/envoy`), and the one place where an error
//! becomes a reply: [`error_code`] picks the status for each [`StreamError`], and
//! [`immediate_error`] writes `inference error: <Code> - <message>`.

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation::Mutation, processing_response::Response, BodyMutation, BodyResponse,
    CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse, ProcessingResponse,
    StreamedBodyResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};

use super::StreamError;
use crate::epp::director::RouteError;
use crate::epp::flowcontrol::FlowError;

/// Error classes the reference maps to HTTP statuses in an ImmediateResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    PayloadTooLarge,
    ResourceExhausted,
    Internal,
    ServiceUnavailable,
}

impl ErrorCode {
    /// The code's name in the reply body and the `error_code` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BadRequest",
            ErrorCode::PayloadTooLarge => "PayloadTooLarge",
            ErrorCode::ResourceExhausted => "ResourceExhausted",
            ErrorCode::Internal => "Internal",
            ErrorCode::ServiceUnavailable => "ServiceUnavailable",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::ResourceExhausted => 429,
            ErrorCode::Internal => 500,
            ErrorCode::ServiceUnavailable => 503,
        }
    }
}

/// The reference's error class for each way a stream can fail (REFERENCE.md §1).
pub fn error_code(err: &StreamError) -> ErrorCode {
    match err {
        StreamError::BodyTooLarge { .. } => ErrorCode::PayloadTooLarge,
        StreamError::Route(e) => match &e.reason {
            RouteError::Request(_) => ErrorCode::BadRequest,
            RouteError::NoPods => ErrorCode::Internal,
            RouteError::Saturated | RouteError::Schedule(_) => ErrorCode::ResourceExhausted,
            RouteError::NoCandidates => ErrorCode::ServiceUnavailable,
            // 429 means the pool exists but is contended (backpressure); 503 means nothing
            // can serve now (llm-d-router `translateFlowControlOutcome`).
            RouteError::FlowControl(f) => match f {
                FlowError::RejectedCapacity | FlowError::EvictedTtl => ErrorCode::ResourceExhausted,
                FlowError::RejectedNoEndpoints
                | FlowError::EvictedNoEndpoints
                | FlowError::Cancelled
                | FlowError::NotRunning
                | FlowError::ShutDown => ErrorCode::ServiceUnavailable,
            },
        },
    }
}

/// Header naming why flow control dropped a request (llm-d-router
/// `pkg/common/error.RequestDroppedReasonHeaderKey`), set on its error reply.
pub const DROPPED_REASON_HEADER: &str = "x-llm-d-request-dropped-reason";

/// The reference's dropped-reason value for a flow-control error; `None` for other errors.
pub fn dropped_reason(err: &StreamError) -> Option<&'static str> {
    let StreamError::Route(e) = err else {
        return None;
    };
    let RouteError::FlowControl(f) = &e.reason else {
        return None;
    };
    Some(match f {
        FlowError::RejectedCapacity => "rejected-saturated",
        FlowError::RejectedNoEndpoints | FlowError::EvictedNoEndpoints => "rejected-no-endpoints",
        FlowError::EvictedTtl => "rejected-ttl-expired",
        FlowError::Cancelled => "rejected-context-cancelled",
        FlowError::NotRunning | FlowError::ShutDown => "rejected-shutting-down",
    })
}

/// Largest body chunk sent back in one StreamedBodyResponse (the reference's `BodyByteLimit`).
pub const BODY_CHUNK_LIMIT: usize = 62_000;

pub const DESTINATION_NAMESPACE: &str = "envoy.lb";
pub const DESTINATION_KEY: &str = "x-gateway-destination-endpoint";

/// A header set with overwrite semantics (the EPP always replaces client-supplied values).
pub fn set_header(key: &str, raw_value: impl Into<Vec<u8>>) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: String::new(),
            raw_value: raw_value.into(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// `{"envoy.lb": {"x-gateway-destination-endpoint": "<destination>"}}`
pub fn destination_metadata(destination: &str) -> Struct {
    let inner = Struct {
        fields: [(
            DESTINATION_KEY.to_string(),
            Value {
                kind: Some(Kind::StringValue(destination.to_string())),
            },
        )]
        .into_iter()
        .collect(),
    };
    Struct {
        fields: [(
            DESTINATION_NAMESPACE.to_string(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into_iter()
        .collect(),
    }
}

/// Header reply that routes the request (full-duplex mode; sent after body end_of_stream).
pub fn request_headers_routed(
    set_headers: Vec<HeaderValueOption>,
    destination: &str,
) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::RequestHeaders(HeadersResponse {
            response: Some(routing_common(set_headers)),
        })),
        dynamic_metadata: Some(destination_metadata(destination)),
        ..Default::default()
    }
}

/// Body reply that routes the request (buffered mode): headers and, when rewritten, the body.
pub fn request_body_routed(
    set_headers: Vec<HeaderValueOption>,
    destination: &str,
    new_body: Option<Vec<u8>>,
) -> ProcessingResponse {
    let mut common = routing_common(set_headers);
    common.body_mutation = new_body.map(|b| BodyMutation {
        mutation: Some(Mutation::Body(b)),
    });
    ProcessingResponse {
        response: Some(Response::RequestBody(BodyResponse {
            response: Some(common),
        })),
        dynamic_metadata: Some(destination_metadata(destination)),
        ..Default::default()
    }
}

fn routing_common(set_headers: Vec<HeaderValueOption>) -> CommonResponse {
    CommonResponse {
        clear_route_cache: true,
        header_mutation: Some(HeaderMutation {
            set_headers,
            remove_headers: Vec::new(),
        }),
        ..Default::default()
    }
}

/// "Continue unchanged" replies.
pub fn request_headers_continue() -> ProcessingResponse {
    wrap(Response::RequestHeaders(HeadersResponse::default()))
}

pub fn response_body_continue() -> ProcessingResponse {
    wrap(Response::ResponseBody(BodyResponse::default()))
}

pub fn request_trailers_ack() -> ProcessingResponse {
    wrap(Response::RequestTrailers(TrailersResponse::default()))
}

pub fn response_trailers_ack() -> ProcessingResponse {
    wrap(Response::ResponseTrailers(TrailersResponse::default()))
}

pub fn response_headers(set_headers: Vec<HeaderValueOption>) -> ProcessingResponse {
    wrap(Response::ResponseHeaders(HeadersResponse {
        response: Some(CommonResponse {
            header_mutation: Some(HeaderMutation {
                set_headers,
                remove_headers: Vec::new(),
            }),
            ..Default::default()
        }),
    }))
}

fn wrap(response: Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(response),
        ..Default::default()
    }
}

/// Which direction a streamed body belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// Splits `body` into StreamedBodyResponse chunks of at most [`BODY_CHUNK_LIMIT`] bytes, with
/// `end_of_stream` on the last one when `eos`. An empty body still yields one (empty) chunk.
pub fn streamed_body(
    direction: Direction,
    body: &[u8],
    eos: bool,
    out: &mut Vec<ProcessingResponse>,
) {
    let mut chunks = body.chunks(BODY_CHUNK_LIMIT).peekable();
    if chunks.peek().is_none() {
        out.push(streamed_chunk(direction, Vec::new(), eos));
        return;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        out.push(streamed_chunk(direction, chunk.to_vec(), eos && last));
    }
}

fn streamed_chunk(direction: Direction, body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
    let body = BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(Mutation::StreamedResponse(StreamedBodyResponse {
                    body,
                    end_of_stream,
                    ..Default::default()
                })),
            }),
            ..Default::default()
        }),
    };
    wrap(match direction {
        Direction::Request => Response::RequestBody(body),
        Direction::Response => Response::ResponseBody(body),
    })
}

/// The reference's error reply: status code and body `inference error: <Code> - <Msg>`.
pub fn immediate_error(err: &StreamError) -> ProcessingResponse {
    let code = error_code(err);
    wrap(Response::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus {
            code: i32::from(code.http_status()),
        }),
        body: format!("inference error: {} - {err}", code.as_str()).into_bytes(),
        headers: dropped_reason(err).map(|reason| HeaderMutation {
            set_headers: vec![set_header(DROPPED_REASON_HEADER, reason)],
            remove_headers: Vec::new(),
        }),
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epp::director::RoutingError;
    use crate::epp::request::RequestError;
    use crate::epp::scheduling::ScheduleError;

    fn reply(err: StreamError) -> (i32, String) {
        match immediate_error(&err).response {
            Some(Response::ImmediateResponse(r)) => (
                r.status.map_or(0, |s| s.code),
                String::from_utf8(r.body).unwrap_or_default(),
            ),
            other => panic!("not an immediate response: {other:?}"),
        }
    }

    fn route(reason: RouteError) -> StreamError {
        StreamError::Route(RoutingError::from(reason))
    }

    /// Every error's status and body, byte for byte as REFERENCE.md lists them.
    #[test]
    fn each_error_maps_to_the_reference_status_and_text() {
        let bad_json = serde_json::from_slice::<serde_json::Value>(b"no healthy upstream")
            .err()
            .map(RequestError::InvalidJson);
        let cases = [
            (
                StreamError::BodyTooLarge { limit: 10 },
                413,
                "inference error: PayloadTooLarge - request body exceeds the limit of 10 bytes (--max-body-bytes)",
            ),
            (
                route(RouteError::Request(RequestError::MissingModel)),
                400,
                "inference error: BadRequest - model not found in request body",
            ),
            (
                route(RouteError::NoPods),
                500,
                "inference error: Internal - no pods available in datastore",
            ),
            (
                route(RouteError::Saturated),
                429,
                "inference error: ResourceExhausted - system saturated, sheddable request dropped",
            ),
            (
                route(RouteError::NoCandidates),
                503,
                "inference error: ServiceUnavailable - failed to find endpoint candidates for serving the request",
            ),
            (
                route(RouteError::Schedule(ScheduleError::ProfileFailed {
                    profile: "default".into(),
                })),
                429,
                "inference error: ResourceExhausted - failed to find target endpoint: failed to run scheduler profile 'default'",
            ),
        ];
        for (err, status, body) in cases {
            assert_eq!(reply(err), (status, body.to_string()));
        }
        // Flow control (llm-d-router `translateFlowControlOutcome`), with the dropped reason.
        let flow = [
            (
                FlowError::RejectedCapacity,
                429,
                "inference error: ResourceExhausted - request rejected pre-queue: queue at capacity",
                "rejected-saturated",
            ),
            (
                FlowError::RejectedNoEndpoints,
                503,
                "inference error: ServiceUnavailable - no endpoints available: request rejected pre-queue: no endpoints available",
                "rejected-no-endpoints",
            ),
            (
                FlowError::EvictedTtl,
                429,
                "inference error: ResourceExhausted - request timed out in queue: request evicted from queue: request TTL expired",
                "rejected-ttl-expired",
            ),
            (
                FlowError::EvictedNoEndpoints,
                503,
                "inference error: ServiceUnavailable - request timed out in queue and no endpoints are available: request evicted from queue: request TTL expired: no endpoints available",
                "rejected-no-endpoints",
            ),
            (
                FlowError::Cancelled,
                503,
                "inference error: ServiceUnavailable - client disconnected: request evicted from queue: request context cancelled",
                "rejected-context-cancelled",
            ),
            (
                FlowError::NotRunning,
                503,
                "inference error: ServiceUnavailable - flow controller shutting down: request rejected pre-queue: flow controller is not running",
                "rejected-shutting-down",
            ),
            (
                FlowError::ShutDown,
                503,
                "inference error: ServiceUnavailable - flow controller shutting down: request evicted from queue: flow controller is not running",
                "rejected-shutting-down",
            ),
        ];
        for (f, status, body, reason) in flow {
            let err = route(RouteError::FlowControl(f));
            assert_eq!(dropped_reason(&err), Some(reason));
            let headers = match immediate_error(&err).response {
                Some(Response::ImmediateResponse(r)) => r.headers,
                _ => None,
            };
            let header = headers
                .and_then(|h| h.set_headers.into_iter().next())
                .and_then(|h| h.header)
                .map(|h| (h.key, h.raw_value));
            assert_eq!(
                header,
                Some((
                    DROPPED_REASON_HEADER.to_string(),
                    reason.as_bytes().to_vec()
                ))
            );
            assert_eq!(reply(err), (status, body.to_string()));
        }
        assert_eq!(dropped_reason(&route(RouteError::Saturated)), None);
        let (status, body) = reply(route(RouteError::Request(bad_json.unwrap())));
        assert_eq!(status, 400);
        assert_eq!(
            body,
            "inference error: BadRequest - expected ident at line 1 column 2"
        );
    }
}
