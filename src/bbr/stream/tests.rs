//! BBR stream replies, exact: upstream's header and body replies in both modes, and its 400.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request as Msg, processing_response::Response, HttpBody, HttpHeaders,
    ProcessingRequest, ProcessingResponse,
};

use super::*;
use crate::bbr::plugins::{AdaptersStore, Plugin};

fn shared(streaming: bool) -> Arc<BbrShared> {
    let mut adapters = AdaptersStore::default();
    adapters
        .add(&BTreeMap::from([
            ("baseModel".into(), "llama".into()),
            ("adapters".into(), "[sql-lora]".into()),
        ]))
        .unwrap();
    Arc::new(BbrShared {
        streaming,
        plugins: Plugin::defaults(),
        adapters,
        max_body_bytes: 1 << 20,
        metrics: BbrMetrics::default(),
    })
}

fn headers(eos: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Msg::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![HeaderValue {
                    key: ":path".into(),
                    value: "/v1/completions".into(),
                    raw_value: Vec::new(),
                }],
            }),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn body(b: &[u8], eos: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Msg::RequestBody(HttpBody {
            body: b.to_vec(),
            end_of_stream: eos,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn run(streaming: bool, msgs: Vec<ProcessingRequest>) -> (Vec<ProcessingResponse>, bool) {
    let mut s = BbrStream::new(shared(streaming));
    let mut out = Vec::new();
    let mut ended = false;
    for m in msgs {
        ended = s.on_message(m, &mut out);
    }
    (out, ended)
}

fn set(r: &CommonResponse) -> Vec<(String, String, i32)> {
    r.header_mutation
        .as_ref()
        .unwrap()
        .set_headers
        .iter()
        .map(|h| {
            let hv = h.header.as_ref().unwrap();
            (
                hv.key.clone(),
                String::from_utf8(hv.raw_value.clone()).unwrap(),
                h.append_action,
            )
        })
        .collect()
}

const OVERWRITE: i32 = HeaderAppendAction::OverwriteIfExistsOrAdd as i32;

#[test]
fn streaming_mode_holds_headers_and_sends_model_headers_with_the_body() {
    let b = br#"{"model":"sql-lora","prompt":"hi"}"#;
    let (out, ended) = run(
        true,
        vec![headers(false), body(&b[..10], false), body(&b[10..], true)],
    );
    assert!(!ended);
    assert_eq!(out.len(), 2);
    let Some(Response::RequestHeaders(h)) = &out[0].response else {
        panic!("{out:?}")
    };
    let common = h.response.as_ref().unwrap();
    assert!(common.clear_route_cache);
    assert_eq!(
        set(common),
        vec![
            ("X-Gateway-Model-Name".into(), "sql-lora".into(), OVERWRITE),
            (
                "X-Gateway-Base-Model-Name".into(),
                "llama".into(),
                OVERWRITE
            ),
            ("Content-Length".into(), b.len().to_string(), OVERWRITE),
        ]
    );
    let Some(Response::RequestBody(r)) = &out[1].response else {
        panic!()
    };
    let Some(Mutation::StreamedResponse(sb)) = &r
        .response
        .as_ref()
        .unwrap()
        .body_mutation
        .as_ref()
        .unwrap()
        .mutation
    else {
        panic!()
    };
    assert_eq!((sb.body.as_slice(), sb.end_of_stream), (&b[..], true));
}

#[test]
fn buffered_mode_answers_headers_then_mutates_on_the_body() {
    let (out, _) = run(
        false,
        vec![headers(false), body(br#"{"model":"llama"}"#, true)],
    );
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[0].response,
        Some(Response::RequestHeaders(HeadersResponse { response: None }))
    );
    let Some(Response::RequestBody(r)) = &out[1].response else {
        panic!()
    };
    assert_eq!(
        set(r.response.as_ref().unwrap()),
        vec![
            ("X-Gateway-Model-Name".into(), "llama".into(), OVERWRITE),
            (
                "X-Gateway-Base-Model-Name".into(),
                "llama".into(),
                OVERWRITE
            ),
        ]
    );
    // Unknown model: the base-model header is set empty, as upstream does.
    let (out, _) = run(
        false,
        vec![headers(false), body(br#"{"model":"gpt"}"#, true)],
    );
    let Some(Response::RequestBody(r)) = &out[1].response else {
        panic!()
    };
    assert_eq!(
        set(r.response.as_ref().unwrap()),
        vec![
            ("X-Gateway-Model-Name".into(), "gpt".into(), OVERWRITE),
            ("X-Gateway-Base-Model-Name".into(), "".into(), OVERWRITE),
        ]
    );
    // No model field: nothing set, still routed.
    let (out, _) = run(
        false,
        vec![headers(false), body(br#"{"prompt":"x"}"#, true)],
    );
    let Some(Response::RequestBody(r)) = &out[1].response else {
        panic!()
    };
    assert!(set(r.response.as_ref().unwrap()).is_empty());
}

#[test]
fn bad_json_gets_upstreams_400_and_ends_the_stream() {
    for streaming in [true, false] {
        let (out, ended) = run(streaming, vec![headers(false), body(b"{model}", true)]);
        assert!(ended);
        let Some(Response::ImmediateResponse(i)) = &out.last().unwrap().response else {
            panic!("{out:?}")
        };
        assert_eq!(i.status.unwrap().code, 400);
        assert_eq!(
            String::from_utf8(i.body.clone()).unwrap(),
            "inference error: BadRequest - failed to parse request body: invalid character 'm' looking for beginning of object key string"
        );
    }
}

#[test]
fn header_only_request_and_responses_pass() {
    let (out, _) = run(true, vec![headers(true)]);
    assert_eq!(
        out,
        vec![ProcessingResponse {
            response: Some(Response::RequestHeaders(HeadersResponse { response: None })),
            ..Default::default()
        }]
    );
    // Streaming responses: headers held until the body ends, then sent back whole.
    let mut s = BbrStream::new(shared(true));
    let mut out = Vec::new();
    s.on_message(
        ProcessingRequest {
            request: Some(Msg::ResponseHeaders(HttpHeaders::default())),
            ..Default::default()
        },
        &mut out,
    );
    assert!(out.is_empty());
    for (chunk, eos) in [(&b"ab"[..], false), (&b"c"[..], true)] {
        s.on_message(
            ProcessingRequest {
                request: Some(Msg::ResponseBody(HttpBody {
                    body: chunk.to_vec(),
                    end_of_stream: eos,
                    ..Default::default()
                })),
                ..Default::default()
            },
            &mut out,
        );
    }
    assert_eq!(out.len(), 2);
    assert!(matches!(
        out[0].response,
        Some(Response::ResponseHeaders(_))
    ));
    let Some(Response::ResponseBody(r)) = &out[1].response else {
        panic!()
    };
    let Some(Mutation::StreamedResponse(sb)) = &r
        .response
        .as_ref()
        .unwrap()
        .body_mutation
        .as_ref()
        .unwrap()
        .mutation
    else {
        panic!()
    };
    assert_eq!((sb.body.as_slice(), sb.end_of_stream), (&b"abc"[..], true));
}
