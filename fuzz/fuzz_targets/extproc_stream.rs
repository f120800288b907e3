//! Fuzzes the EPP's ext_proc state machine (`epp::extproc::StreamState`) with arbitrary message
//! sequences: structured messages built from the input (realistic headers, request bodies split
//! anywhere, SSE/JSON response bodies, protocol configs, subset-hint metadata) and raw protobuf
//! pieces decoded with prost as tonic would. Checks the protocol invariants the property test in
//! `src/epp/extproc/state/tests.rs` checks: error replies are 4xx/5xx `inference error: ...` and
//! end the stream, a request is routed at most once, streamed chunks respect the chunk limit, and
//! in-flight accounting returns to zero however the stream ends.
#![no_main]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arbitrary::{Arbitrary, Unstructured};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation::Mutation, processing_request::Request as Msg,
    processing_response::Response as Reply, HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest,
    ProtocolConfiguration,
};
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value as PbValue};
use libfuzzer_sys::fuzz_target;
use prometheus_client::registry::Registry;
use prost::Message;
use switchyard::epp::datastore::{Datastore, DiscoveryEvent, RequestPolicy, RewriteTarget};
use switchyard::epp::director::{Director, DirectorConfig};
use switchyard::epp::endpoint::{Endpoint, EndpointMetrics};
use switchyard::epp::extproc::{ExtProcConfig, Shared, StreamState, BODY_CHUNK_LIMIT};
use switchyard::epp::metrics::{EppMetrics, ModelNameLabel};
use switchyard::epp::saturation::SaturationDetector;
use switchyard::epp::config::{parse_config, DEFAULT_CONFIG};
use switchyard::epp::scheduling::Scheduler;

const MODELS: [&str; 5] = ["m", "food-review", "rewrite-me", "", "sql-lora"];
const HEADER_KEYS: [&str; 12] = [
    ":path",
    ":method",
    ":status",
    "content-type",
    "content-length",
    "x-request-id",
    "x-gateway-inference-objective",
    "x-gateway-model-name-rewrite",
    "x-gateway-inference-fairness-id",
    "test-epp-endpoint-selection",
    "x-gateway-destination-endpoint",
    "hi",
];
const PATHS: [&str; 6] = [
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/embeddings?x=1",
    "/",
    "/v1/chat/completions/",
];

#[derive(Arbitrary, Debug)]
struct Setup {
    endpoints: u8,
    max_body: u16,
    loads: [(u8, u8, bool); 4],
    fallback_endpoints: u8,
    disable_subset_filter: bool,
}

#[derive(Arbitrary, Debug)]
enum HeaderVal {
    Path(u8),
    Model(u8),
    Endpoints(u8, u8),
    Raw(Vec<u8>),
    /// In `value` rather than `raw_value`, as older Envoys send.
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum BodyTemplate {
    Completion {
        model: u8,
        prompt: String,
        stream: bool,
    },
    Chat {
        model: u8,
        turns: Vec<String>,
        stream: bool,
    },
    Responses {
        model: u8,
        input: String,
    },
    SseUsage {
        prompt: u32,
        completion: u32,
        done: bool,
    },
    JsonUsage {
        prompt: u32,
        completion: u32,
    },
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Body {
    template: BodyTemplate,
    /// Sub-range of the rendered template, so a body can arrive split across messages.
    from: u16,
    to: u16,
    end_of_stream: bool,
}

#[derive(Arbitrary, Debug)]
enum Step {
    RequestHeaders(Vec<(u8, HeaderVal)>, bool),
    RequestBody(Body),
    RequestTrailers,
    ResponseHeaders(Vec<(u8, HeaderVal)>, bool),
    ResponseBody(Body),
    ResponseTrailers,
    Empty,
    /// Raw protobuf bytes, decoded as the gRPC layer would (skipped if they do not decode).
    Proto(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Extra {
    /// (request_body_mode, response_body_mode) when present.
    protocol: Option<(i32, i32)>,
    /// Subset hint: as a list of addresses (true) or a comma-separated string (false).
    subset: Option<(bool, Vec<u8>)>,
}

fn addr(i: u8) -> String {
    format!("10.0.0.{}:8000", i % 6 + 1)
}

fn headers(list: Vec<(u8, HeaderVal)>, end_of_stream: bool) -> HttpHeaders {
    let headers = list
        .into_iter()
        .map(|(k, v)| {
            let key = HEADER_KEYS[k as usize % HEADER_KEYS.len()].to_string();
            let (value, raw_value) = match v {
                HeaderVal::Path(p) => (String::new(), PATHS[p as usize % PATHS.len()].into()),
                HeaderVal::Model(m) => (String::new(), MODELS[m as usize % MODELS.len()].into()),
                HeaderVal::Endpoints(a, b) => (
                    String::new(),
                    format!("{}, {}", addr(a), addr(b)).into_bytes(),
                ),
                HeaderVal::Raw(raw) => (String::new(), raw),
                HeaderVal::Text(t) => (t, Vec::new()),
            };
            HeaderValue {
                key,
                value,
                raw_value,
            }
        })
        .collect();
    HttpHeaders {
        headers: Some(HeaderMap { headers }),
        end_of_stream,
        ..Default::default()
    }
}

fn render(t: BodyTemplate) -> Vec<u8> {
    let model = |m: u8| MODELS[m as usize % MODELS.len()];
    match t {
        BodyTemplate::Completion {
            model: m,
            prompt,
            stream,
        } => serde_json::json!({"model": model(m), "prompt": prompt, "stream": stream})
            .to_string()
            .into_bytes(),
        BodyTemplate::Chat {
            model: m,
            turns,
            stream,
        } => {
            let messages: Vec<_> = turns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let role = if i % 2 == 0 { "user" } else { "assistant" };
                    serde_json::json!({"role": role, "content": c})
                })
                .collect();
            serde_json::json!({"model": model(m), "messages": messages, "stream": stream})
                .to_string()
                .into_bytes()
        }
        BodyTemplate::Responses { model: m, input } => {
            serde_json::json!({"model": model(m), "input": input})
                .to_string()
                .into_bytes()
        }
        BodyTemplate::SseUsage {
            prompt,
            completion,
            done,
        } => {
            let mut s = format!(
                "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt},\"completion_tokens\":{completion}}}}}\n\n"
            );
            if done {
                s.push_str("data: [DONE]\n\n");
            }
            s.into_bytes()
        }
        BodyTemplate::JsonUsage { prompt, completion } => serde_json::json!({
            "choices": [{"text": "x"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": u64::from(prompt) + u64::from(completion)}
        })
        .to_string()
        .into_bytes(),
        BodyTemplate::Raw(b) => b,
    }
}

fn body(b: Body) -> HttpBody {
    let full = render(b.template);
    let from = (b.from as usize).min(full.len());
    let to = (b.to as usize).clamp(from, full.len());
    // `to == 0` means "to the end", so most generated bodies are whole.
    let to = if b.to == 0 { full.len() } else { to };
    HttpBody {
        body: full[from..to].to_vec(),
        end_of_stream: b.end_of_stream,
        ..Default::default()
    }
}

fn metadata(list: bool, raw: Vec<u8>) -> Metadata {
    let text = String::from_utf8_lossy(&raw).into_owned();
    let kind = if list {
        Kind::ListValue(ListValue {
            values: text
                .split(',')
                .map(|s| PbValue {
                    kind: Some(Kind::StringValue(s.to_string())),
                })
                .collect(),
        })
    } else {
        Kind::StringValue(text)
    };
    let mut fields = HashMap::new();
    fields.insert(
        "x-gateway-destination-endpoint-subset".to_string(),
        PbValue { kind: Some(kind) },
    );
    let mut filter_metadata = HashMap::new();
    filter_metadata.insert("envoy.lb.subset_hint".to_string(), Struct { fields });
    Metadata {
        filter_metadata,
        ..Default::default()
    }
}

fn shared(setup: &Setup) -> Arc<Shared> {
    let mut registry = Registry::default();
    let metrics = EppMetrics::new(&mut registry);
    let scheduler = Arc::new(Scheduler::new(
        &parse_config(DEFAULT_CONFIG)
            .expect("default config")
            .scheduling,
        &mut registry,
    ));
    let ds = Arc::new(Datastore::new());
    let n = setup.endpoints % 5;
    let eps: Vec<Endpoint> = (0..n)
        .map(|i| Endpoint::from_addr(addr(i).parse().expect("addr")))
        .collect();
    ds.apply(DiscoveryEvent::Reset(eps));
    for (slot, &(queue, kv, fresh)) in ds.slots().iter().zip(setup.loads.iter()) {
        slot.publish(EndpointMetrics {
            waiting_queue_size: u32::from(queue % 16),
            running_requests: u32::from(queue / 16),
            kv_cache_usage: f64::from(kv) / 255.0,
            updated_at: fresh.then(Instant::now),
            ..Default::default()
        });
    }
    let mut policy = RequestPolicy::default();
    policy.objectives.insert("sql-lora".into(), 2);
    policy.objectives.insert("sheddable".into(), -1);
    policy.model_rewrites.insert(
        "rewrite-me".into(),
        vec![
            RewriteTarget {
                model: "m".into(),
                weight: 3,
            },
            RewriteTarget {
                model: "food-review".into(),
                weight: 0,
            },
        ],
    );
    ds.set_policy(policy);
    let director = Director::new(
        ds,
        scheduler,
        SaturationDetector::default(),
        DirectorConfig {
            fallback_endpoints: usize::from(setup.fallback_endpoints % 4),
            disable_subset_filter: setup.disable_subset_filter,
            known_models: Default::default(),
            inflight_accounting: true,
        },
    );
    let max = usize::from(setup.max_body).max(1);
    Shared::new(
        Arc::new(director),
        metrics,
        ExtProcConfig {
            max_body_bytes: max,
            max_response_buffer_bytes: max,
            stream_timeout: None,
        },
    )
}

fn run(data: &[u8]) -> arbitrary::Result<()> {
    let mut u = Unstructured::new(data);
    let setup = Setup::arbitrary(&mut u)?;
    let shared = shared(&setup);
    let mut state = StreamState::new(Arc::clone(&shared));
    let mut routed = 0;
    let mut out = Vec::new();
    let mut steps = 0;
    while !u.is_empty() && steps < 64 {
        steps += 1;
        let step = Step::arbitrary(&mut u)?;
        let extra = Extra::arbitrary(&mut u)?;
        let request = match step {
            Step::RequestHeaders(h, eos) => Some(Msg::RequestHeaders(headers(h, eos))),
            Step::RequestBody(b) => Some(Msg::RequestBody(body(b))),
            Step::RequestTrailers => Some(Msg::RequestTrailers(HttpTrailers::default())),
            Step::ResponseHeaders(h, eos) => Some(Msg::ResponseHeaders(headers(h, eos))),
            Step::ResponseBody(b) => Some(Msg::ResponseBody(body(b))),
            Step::ResponseTrailers => Some(Msg::ResponseTrailers(HttpTrailers::default())),
            Step::Empty => None,
            Step::Proto(bytes) => match ProcessingRequest::decode(bytes.as_slice()) {
                Ok(m) => m.request,
                Err(_) => continue,
            },
        };
        let msg = ProcessingRequest {
            request,
            metadata_context: extra.subset.map(|(list, raw)| metadata(list, raw)),
            protocol_config: extra.protocol.map(|(req, resp)| ProtocolConfiguration {
                request_body_mode: req.rem_euclid(7) - 1,
                response_body_mode: resp.rem_euclid(7) - 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        out.clear();
        let finished = state.on_message(msg, &mut out);
        for r in &out {
            match &r.response {
                Some(Reply::RequestHeaders(h))
                    if h.response.as_ref().is_some_and(|c| c.clear_route_cache) =>
                {
                    routed += 1
                }
                Some(Reply::ImmediateResponse(i)) => {
                    let code = i.status.map(|s| s.code).unwrap_or_default();
                    assert!([400, 413, 429, 500, 503].contains(&code), "status {code}");
                    assert!(
                        String::from_utf8_lossy(&i.body).starts_with("inference error: "),
                        "{:?}",
                        String::from_utf8_lossy(&i.body)
                    );
                    assert!(finished, "an immediate response ends the stream");
                }
                Some(Reply::RequestBody(b) | Reply::ResponseBody(b)) => {
                    if let Some(Mutation::StreamedResponse(s)) = b
                        .response
                        .as_ref()
                        .and_then(|c| c.body_mutation.as_ref())
                        .and_then(|m| m.mutation.as_ref())
                    {
                        assert!(s.body.len() <= BODY_CHUNK_LIMIT, "chunk {}", s.body.len());
                    }
                }
                _ => {}
            }
        }
        assert!(routed <= 1, "the request was routed {routed} times");
        if finished {
            break;
        }
    }
    drop(state);
    // However the stream ended, in-flight accounting is released.
    // Models nothing configures are counted under "other".
    for model in MODELS.iter().chain(&[switchyard::epp::director::OTHER_MODEL_LABEL]) {
        let label = ModelNameLabel {
            model_name: model.to_string(),
        };
        assert_eq!(
            shared.metrics.running_requests.get_or_create(&label).get(),
            0,
            "running requests for {model:?} not released"
        );
    }
    assert_eq!(shared.open_streams(), 0);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
