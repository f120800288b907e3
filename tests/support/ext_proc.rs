//! A raw ext_proc client for tests that drive an EPP (or BBR) without Envoy: build
//! ProcessingRequest messages, exchange them over one stream, and read the replies.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request as Msg, processing_response::Response as Reply, CommonResponse,
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};

pub fn header(k: &str, v: &str) -> HeaderValue {
    HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.as_bytes().to_vec(),
    }
}

/// Request headers: POST `path` plus `extra`.
pub fn request_headers(path: &str, extra: &[(&str, &str)], eos: bool) -> ProcessingRequest {
    let mut headers = vec![header(":method", "POST"), header(":path", path)];
    headers.extend(extra.iter().map(|(k, v)| header(k, v)));
    ProcessingRequest {
        request: Some(Msg::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap { headers }),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub fn request_body(body: &[u8], eos: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Msg::RequestBody(HttpBody {
            body: body.to_vec(),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Response headers (`:status` 200, JSON) with `metadata` as Envoy's metadata context.
pub fn response_headers(metadata: Option<Metadata>) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Msg::ResponseHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    header(":status", "200"),
                    header("content-type", "application/json"),
                ],
            }),
            end_of_stream: false,
            ..Default::default()
        })),
        metadata_context: metadata,
        ..Default::default()
    }
}

/// Envoy metadata `{"envoy.lb": {"x-gateway-destination-endpoint-served": served}}`.
pub fn served_metadata(served: &str) -> Metadata {
    let inner = Struct {
        fields: [(
            "x-gateway-destination-endpoint-served".to_string(),
            Value {
                kind: Some(Kind::StringValue(served.to_string())),
            },
        )]
        .into_iter()
        .collect(),
    };
    Metadata {
        filter_metadata: [("envoy.lb".to_string(), inner)].into_iter().collect(),
        ..Default::default()
    }
}

/// Sends `msgs`, half-closes, and reads every reply until the server ends the stream.
pub async fn exchange(addr: SocketAddr, msgs: Vec<ProcessingRequest>) -> Vec<ProcessingResponse> {
    let mut client = ExternalProcessorClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut stream = client
        .process(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
            Ok(Ok(Some(r))) => out.push(r),
            Ok(_) => break,
            Err(_) => panic!("timed out after {} replies; got {out:?}", out.len()),
        }
    }
    out
}

pub fn common(r: &ProcessingResponse) -> &CommonResponse {
    match r.response.as_ref().unwrap() {
        Reply::RequestHeaders(h) | Reply::ResponseHeaders(h) => h.response.as_ref().unwrap(),
        Reply::RequestBody(b) | Reply::ResponseBody(b) => b.response.as_ref().unwrap(),
        other => panic!("not a common response: {other:?}"),
    }
}

/// The headers a reply sets, as text, in order.
pub fn set_headers(r: &ProcessingResponse) -> Vec<(String, String)> {
    common(r)
        .header_mutation
        .as_ref()
        .map(|m| {
            m.set_headers
                .iter()
                .map(|h| {
                    let h = h.header.as_ref().unwrap();
                    let v = if h.raw_value.is_empty() {
                        h.value.clone()
                    } else {
                        String::from_utf8(h.raw_value.clone()).unwrap()
                    };
                    (h.key.clone(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn set_header(r: &ProcessingResponse, key: &str) -> Option<String> {
    set_headers(r)
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
}

/// The first reply that is a request-headers reply with a destination header.
pub fn destination(replies: &[ProcessingResponse]) -> Option<String> {
    replies
        .iter()
        .filter(|r| {
            matches!(
                r.response,
                Some(Reply::RequestHeaders(_)) | Some(Reply::RequestBody(_))
            )
        })
        .find_map(|r| set_header(r, "x-gateway-destination-endpoint"))
}

/// The reply to the response headers.
pub fn response_headers_reply(replies: &[ProcessingResponse]) -> Option<&ProcessingResponse> {
    replies
        .iter()
        .find(|r| matches!(r.response, Some(Reply::ResponseHeaders(_))))
}

/// (HTTP status, body) of an ImmediateResponse, if `r` is one.
pub fn immediate(r: &ProcessingResponse) -> Option<(i32, String)> {
    match r.response.as_ref()? {
        Reply::ImmediateResponse(i) => Some((
            i.status.map_or(0, |s| s.code),
            String::from_utf8_lossy(&i.body).into_owned(),
        )),
        _ => None,
    }
}
