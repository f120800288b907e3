//! Property tests: arbitrary ext_proc message sequences never panic the state machine, and its
//! replies keep the protocol's invariants.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request::Request as Msg, processing_response::Response as Reply, HttpBody,
    HttpHeaders, HttpTrailers, ProcessingRequest,
};
use prometheus_client::registry::Registry;
use proptest::prelude::*;

use super::super::{ExtProcConfig, Shared};
use super::StreamState;
use crate::epp::datastore::{Datastore, DiscoveryEvent};
use crate::epp::director::{Director, DirectorConfig};
use crate::epp::endpoint::{Endpoint, EndpointMetrics};
use crate::epp::metrics::EppMetrics;
use crate::epp::saturation::SaturationDetector;
use crate::epp::scheduling::{parse_config, Scheduler, DEFAULT_CONFIG};

fn shared(endpoints: usize, max_body: usize) -> Arc<Shared> {
    let mut registry = Registry::default();
    let metrics = EppMetrics::new(&mut registry);
    let scheduler = Arc::new(Scheduler::new(
        &parse_config(DEFAULT_CONFIG).unwrap(),
        &mut registry,
    ));
    let ds = Arc::new(Datastore::new());
    let eps: Vec<Endpoint> = (0..endpoints)
        .map(|i| Endpoint::from_addr(format!("10.0.0.{}:8000", i + 1).parse().unwrap()))
        .collect();
    ds.apply(DiscoveryEvent::Reset(eps));
    for slot in ds.slots().iter() {
        slot.publish(EndpointMetrics {
            updated_at: Some(std::time::Instant::now()),
            ..Default::default()
        });
    }
    let director = Director::new(
        ds,
        scheduler,
        SaturationDetector::default(),
        DirectorConfig {
            fallback_endpoints: 1,
            disable_subset_filter: false,
        },
    );
    Shared::new(
        Arc::new(director),
        metrics,
        ExtProcConfig {
            max_body_bytes: max_body,
            max_response_buffer_bytes: max_body,
        },
    )
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
        let shared = shared(endpoints, 256);
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
        for model in ["", "m"] {
            let label = crate::epp::metrics::ModelNameLabel { model_name: model.to_string() };
            prop_assert_eq!(shared.metrics.running_requests.get_or_create(&label).get(), 0);
        }
    }
}
