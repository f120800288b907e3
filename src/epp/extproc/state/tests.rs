//! Property tests: arbitrary ext_proc message sequences never panic the state machine, and its
//! replies keep the protocol's invariants.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request as Msg, processing_response::Response as Reply, HttpBody,
    HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse,
};
use prometheus_client::registry::Registry;
use proptest::prelude::*;

use super::super::{ExtProcConfig, Shared};
use super::StreamState;
use crate::epp::config::{parse_config, REFERENCE_DEFAULT_CONFIG};
use crate::epp::datastore::{Datastore, DiscoveryEvent};
use crate::epp::director::{Director, DirectorConfig};
use crate::epp::endpoint::{Endpoint, EndpointMetrics};
use crate::epp::metrics::EppMetrics;
use crate::epp::saturation::SaturationDetector;
use crate::epp::scheduling::Scheduler;

fn shared(endpoints: usize, max_body: usize) -> (Arc<Shared>, Arc<Datastore>) {
    shared_with(endpoints, max_body, true)
}

fn shared_with(
    endpoints: usize,
    max_body: usize,
    inflight_accounting: bool,
) -> (Arc<Shared>, Arc<Datastore>) {
    let mut registry = Registry::default();
    let metrics = EppMetrics::new(&mut registry);
    let scheduler = Arc::new(Scheduler::new(
        &parse_config(REFERENCE_DEFAULT_CONFIG).unwrap().scheduling,
        &mut registry,
    ));
    let ds = Arc::new(Datastore::new());
    let eps: Vec<Endpoint> = (0..endpoints)
        .map(|i| Endpoint::from_addr(format!("10.0.0.{}:8000", i + 1).parse().unwrap()))
        .collect();
    ds.apply(DiscoveryEvent::Reset(eps));
    for slot in ds.slots().iter() {
        slot.publish(EndpointMetrics {
            updated_at: Some(tokio::time::Instant::now()),
            ..Default::default()
        });
    }
    let director = Director::new(
        ds.clone(),
        scheduler,
        SaturationDetector::default(),
        DirectorConfig {
            fallback_endpoints: 1,
            disable_subset_filter: false,
            known_models: Default::default(),
            inflight_accounting,
        },
    );
    let shared = Shared::new(
        Arc::new(director),
        metrics,
        ExtProcConfig {
            max_body_bytes: max_body,
            max_response_buffer_bytes: max_body,
            stream_timeout: None,
            conformance_test_header: true,
            served_verifier: false,
        },
    );
    (shared, ds)
}

fn arb_headers() -> impl Strategy<Value = HttpHeaders> {
    let header = (
        prop::sample::select(vec![
            ":path",
            ":status",
            "content-type",
            "x-request-id",
            "x-gateway-inference-objective",
            "x-gateway-model-name-rewrite",
            "test-epp-endpoint-selection",
            "hi",
            "content-length",
        ]),
        prop::collection::vec(any::<u8>(), 0..24),
    )
        .prop_map(|(k, v)| HeaderValue {
            key: k.to_string(),
            value: String::new(),
            raw_value: v,
        });
    (prop::collection::vec(header, 0..6), any::<bool>()).prop_map(|(headers, end_of_stream)| {
        HttpHeaders {
            headers: Some(HeaderMap { headers }),
            end_of_stream,
            ..Default::default()
        }
    })
}

fn arb_body() -> impl Strategy<Value = HttpBody> {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        Just(br#"{"model":"m","prompt":"hello world hello world"}"#.to_vec()),
        Just(br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true}"#.to_vec()),
        Just(b"data: {\"usage\":{\"prompt_tokens\":3}}\n\n".to_vec()),
    ];
    (bytes, any::<bool>()).prop_map(|(body, end_of_stream)| HttpBody {
        body,
        end_of_stream,
        ..Default::default()
    })
}

fn arb_msg() -> impl Strategy<Value = ProcessingRequest> {
    let msg = prop_oneof![
        arb_headers().prop_map(Msg::RequestHeaders),
        arb_body().prop_map(Msg::RequestBody),
        Just(Msg::RequestTrailers(HttpTrailers::default())),
        arb_headers().prop_map(Msg::ResponseHeaders),
        arb_body().prop_map(Msg::ResponseBody),
        Just(Msg::ResponseTrailers(HttpTrailers::default())),
    ];
    prop::option::of(msg).prop_map(|request| ProcessingRequest {
        request,
        ..Default::default()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_sequences_keep_protocol_invariants(
        msgs in prop::collection::vec(arb_msg(), 0..12),
        endpoints in 0usize..3,
    ) {
        let (shared, ds) = shared(endpoints, 256);
        let mut state = StreamState::new(shared.clone());
        let mut routed_headers = 0;
        let mut out = Vec::new();
        for msg in msgs {
            out.clear();
            let finished = state.on_message(msg, &mut out);
            for r in &out {
                match &r.response {
                    Some(Reply::RequestHeaders(h)) if h.response.as_ref().is_some_and(|c| c.clear_route_cache) => routed_headers += 1,
                    Some(Reply::ImmediateResponse(i)) => {
                        let code = i.status.map(|s| s.code).unwrap_or_default();
                        prop_assert!([400, 413, 429, 500, 503].contains(&code), "status {code}");
                        prop_assert!(String::from_utf8_lossy(&i.body).starts_with("inference error: "));
                        prop_assert!(finished, "an immediate response ends the stream");
                    }
                    Some(Reply::RequestBody(b) | Reply::ResponseBody(b)) => {
                        if let Some(m) = b.response.as_ref().and_then(|c| c.body_mutation.as_ref()) {
                            if let Some(envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation::StreamedResponse(s)) = &m.mutation {
                                prop_assert!(s.body.len() <= super::super::BODY_CHUNK_LIMIT);
                            }
                        }
                    }
                    _ => {}
                }
            }
            prop_assert!(routed_headers <= 1, "the request is routed at most once");
            if finished {
                break;
            }
        }
        drop(state);
        // However the stream ended, in-flight accounting is released.
        for model in ["", "m", crate::epp::director::OTHER_MODEL_LABEL] {
            let label = crate::epp::metrics::ModelNameLabel { model_name: model.to_string() };
            prop_assert_eq!(shared.metrics.running_requests.get_or_create(&label).get(), 0);
        }
        prop_assert_eq!(in_flight(&ds), vec![0; endpoints]);
    }
}

/// Each endpoint's in-flight count as the datastore's counters hold it.
fn in_flight(datastore: &Datastore) -> Vec<u32> {
    datastore
        .slots()
        .iter()
        .map(|s| s.dispatch().in_flight())
        .collect()
}

fn header(key: &str, value: &str) -> HeaderValue {
    HeaderValue {
        key: key.to_string(),
        value: String::new(),
        raw_value: value.as_bytes().to_vec(),
    }
}

/// Routes one completion request through a fresh stream; returns the stream, still open.
fn route_one(shared: &Arc<Shared>) -> StreamState {
    let mut state = StreamState::new(shared.clone());
    let mut out = Vec::new();
    let headers = HttpHeaders {
        headers: Some(HeaderMap {
            headers: vec![
                header(":path", "/v1/completions"),
                header("x-request-id", "r1"),
            ],
        }),
        ..Default::default()
    };
    let body = HttpBody {
        body: br#"{"model":"m","prompt":"hello"}"#.to_vec(),
        end_of_stream: true,
        ..Default::default()
    };
    for msg in [Msg::RequestHeaders(headers), Msg::RequestBody(body)] {
        let finished = state.on_message(
            ProcessingRequest {
                request: Some(msg),
                ..Default::default()
            },
            &mut out,
        );
        assert!(!finished);
    }
    assert!(
        out.iter()
            .any(|r| matches!(&r.response, Some(Reply::RequestHeaders(_)))),
        "routed: {out:?}"
    );
    state
}

#[test]
fn routed_request_counts_in_flight_until_the_stream_ends() {
    let (shared, ds) = shared(3, 1024);
    let a = route_one(&shared);
    let b = route_one(&shared);
    let mut counts = in_flight(&ds);
    counts.sort_unstable();
    // Two requests, two different endpoints (the second sees the first's count), the fallback
    // endpoint is not counted.
    assert_eq!(counts, [0, 1, 1]);
    // A stream that breaks mid-response releases its count like one that completes.
    drop(a);
    assert_eq!(in_flight(&ds).iter().sum::<u32>(), 1);
    drop(b);
    assert_eq!(in_flight(&ds), [0, 0, 0]);
}

#[test]
fn inflight_accounting_off_counts_nothing() {
    let (shared, ds) = shared_with(3, 1024, false);
    let _a = route_one(&shared);
    assert_eq!(in_flight(&ds), [0, 0, 0]);
}

fn send(state: &mut StreamState, msg: Msg, out: &mut Vec<ProcessingResponse>) -> bool {
    out.clear();
    state.on_message(
        ProcessingRequest {
            request: Some(msg),
            ..Default::default()
        },
        out,
    )
}

fn response_body(body: &[u8], end_of_stream: bool) -> Msg {
    Msg::ResponseBody(HttpBody {
        body: body.to_vec(),
        end_of_stream,
        ..Default::default()
    })
}

/// The stream ends with the reply that completes the response (Envoy sends nothing after it),
/// not before: headers and body chunks before end_of_stream keep it open.
#[test]
fn stream_ends_with_the_reply_that_completes_the_response() {
    let (shared, ds) = shared(3, 1024);
    let mut out = Vec::new();

    // JSON body in two chunks, end_of_stream on the second.
    let mut state = route_one(&shared);
    assert!(!send(
        &mut state,
        Msg::ResponseHeaders(HttpHeaders::default()),
        &mut out
    ));
    assert!(matches!(&out[..], [r] if matches!(r.response, Some(Reply::ResponseHeaders(_)))));
    assert!(!send(
        &mut state,
        response_body(b"{\"usage\":", false),
        &mut out
    ));
    assert!(
        out.is_empty(),
        "a JSON body is held until complete: {out:?}"
    );
    assert!(send(&mut state, response_body(b"{}}", true), &mut out));
    assert!(matches!(&out[..], [r] if matches!(r.response, Some(Reply::ResponseBody(_)))));
    drop(state);

    // A body without end_of_stream, completed by trailers: body reply and trailers ack.
    let mut state = route_one(&shared);
    assert!(!send(
        &mut state,
        Msg::ResponseHeaders(HttpHeaders::default()),
        &mut out
    ));
    assert!(!send(&mut state, response_body(b"{}", false), &mut out));
    assert!(send(
        &mut state,
        Msg::ResponseTrailers(HttpTrailers::default()),
        &mut out
    ));
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(matches!(out[0].response, Some(Reply::ResponseBody(_))));
    assert!(matches!(out[1].response, Some(Reply::ResponseTrailers(_))));
    drop(state);
    assert_eq!(in_flight(&ds), [0, 0, 0]);
}
