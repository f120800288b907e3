//! Tool calling and "never silent" request fields over HTTP on loopback: a sim server whose
//! output is scripted (`--sim-script`) with the tiny tokenizer and a tool-aware chat template,
//! non-streaming and streaming (`tool_calls` deltas, `finish_reason: "tool_calls"`), and every
//! unimplemented vLLM request field refused with a 400 that names it.

mod serve_support;
mod support;

use std::path::Path;

use serde_json::{json, Value};
use serve_support::*;
use switchyard::serve::api::params::{unsupported_error, Endpoint};
use switchyard::serve::model::testing::{
    set_chat_template, write_tiny_qwen2, TINY_TOOL_CHAT_TEMPLATE,
};
use switchyard::serve::ServerHandle;

const HERMES: &str = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>";

/// A scripted sim server answering `script` to everything (tiny tokenizer, tool template).
async fn scripted(dir: &Path, script: &str) -> (ServerHandle, String) {
    write_tiny_qwen2(dir, 0).unwrap();
    set_chat_template(dir, TINY_TOOL_CHAT_TEMPLATE).unwrap();
    let file = dir.join("script.txt");
    std::fs::write(&file, script).unwrap();
    let dir = dir.to_path_buf();
    start(move |a| {
        a.model = Some(dir);
        a.sim_script = Some(file);
        a.max_model_len = Some(4096);
    })
    .await
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "run_python",
            "parameters": {"type": "object", "properties": {"code": {"type": "string"}}}}}
    ])
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": "qwen",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": tools(),
        "temperature": 0,
        "max_tokens": 200,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn hermes_call_non_streaming_and_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let (_h, base) = scripted(dir.path(), HERMES).await;

    let r = post(&base, "/v1/chat/completions", chat(json!({}))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json_of(&r);
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let mut message = choice["message"].clone();
    let id = message["tool_calls"][0]["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("chatcmpl-tool-"), "{id}");
    message["tool_calls"][0]["id"] = json!("ID");
    assert_eq!(
        message,
        json!({"role": "assistant", "content": null, "tool_calls": [{"id": "ID", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]})
    );
    let args: Value = serde_json::from_str(
        message["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(args, json!({"city": "Paris", "unit": "celsius"}));

    // Streaming: role chunk, then call deltas (id/type/name first, then argument fragments
    // that concatenate to the same arguments), then finish_reason tool_calls.
    let r = post(&base, "/v1/chat/completions", chat(json!({"stream": true}))).await;
    assert_eq!(r.status, 200);
    let events = sse_data(&r);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let mut name = None;
    let mut arguments = String::new();
    let mut fragments = 0;
    for c in &chunks[1..] {
        let delta = &c["choices"][0]["delta"];
        assert!(delta.get("content").is_none(), "no content: {delta}");
        let Some(calls) = delta.get("tool_calls") else {
            continue;
        };
        let call = &calls[0];
        assert_eq!(call["index"], 0);
        if let Some(n) = call["function"].get("name") {
            assert!(name.is_none(), "name once");
            assert!(call["id"].as_str().unwrap().starts_with("chatcmpl-tool-"));
            assert_eq!(call["type"], "function");
            name = Some(n.as_str().unwrap().to_owned());
        } else {
            assert!(
                call.get("id").is_none() && call.get("type").is_none(),
                "{call}"
            );
        }
        if let Some(a) = call["function"].get("arguments") {
            arguments.push_str(a.as_str().unwrap());
            fragments += 1;
        }
    }
    assert_eq!(name.as_deref(), Some("get_weather"));
    assert_eq!(arguments, "{\"city\": \"Paris\", \"unit\": \"celsius\"}");
    assert!(fragments > 1, "arguments arrive in fragments ({fragments})");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    // tool_choice none: the same text is plain content.
    let r = post(
        &base,
        "/v1/chat/completions",
        chat(json!({"tool_choice": "none"})),
    )
    .await;
    let v = json_of(&r);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["choices"][0]["message"],
        json!({"role": "assistant", "content": HERMES})
    );

    // The call and its result go back in the history.
    let r = post(
        &base,
        "/v1/chat/completions",
        chat(json!({"messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": id, "content": "18 C, sunny"}
        ]})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn qwen_coder_fenced_call_and_parallel_tool_calls() {
    let dir = tempfile::tempdir().unwrap();
    let script = "```json\n[{\"name\": \"run_python\", \"arguments\": {\"code\": \"print(1)\"}}, {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}]\n```";
    let (_h, base) = scripted(dir.path(), script).await;
    let r = post(&base, "/v1/chat/completions", chat(json!({}))).await;
    let v = json_of(&r);
    let calls: Vec<(String, String)> = v["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["function"]["name"].as_str().unwrap().to_owned(),
                c["function"]["arguments"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        calls,
        vec![
            ("run_python".into(), "{\"code\": \"print(1)\"}".into()),
            ("get_weather".into(), "{\"city\": \"Oslo\"}".into())
        ]
    );
    let r = post(
        &base,
        "/v1/chat/completions",
        chat(json!({"parallel_tool_calls": false})),
    )
    .await;
    let v = json_of(&r);
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn tools_need_a_template_that_renders_them() {
    // The plain sim has no chat template (ChatML fallback).
    let (_h, base) = start(|_| {}).await;
    let r = post(&base, "/v1/chat/completions", chat(json!({}))).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        error_of(&r),
        json!({"message": "This model's chat template does not support tools.",
               "type": "BadRequestError", "param": "tools", "code": 400})
    );
}

/// A value no table entry accepts as "off".
const ON: &str = "on";

#[tokio::test]
async fn every_unimplemented_field_is_a_400_naming_it() {
    let (_h, base) = start(|_| {}).await;
    let chat_body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let completion_body = json!({"prompt": "hi", "max_tokens": 2});
    for (endpoint, path, base_body) in [
        (Endpoint::Chat, "/v1/chat/completions", &chat_body),
        (Endpoint::Completion, "/v1/completions", &completion_body),
    ] {
        let mut all_off = base_body.clone();
        for (field, off) in endpoint.unsupported() {
            let mut body = base_body.clone();
            body[*field] = json!(ON);
            let r = post(&base, path, body).await;
            assert_eq!(r.status, 400, "{path} {field}");
            let (message, param) = match unsupported_error(field, off) {
                switchyard::serve::api::error::ApiError::BadRequest { message, param } => {
                    (message, param)
                }
                e => panic!("{e:?}"),
            };
            assert_eq!(param, Some(*field));
            assert_eq!(
                error_of(&r),
                json!({"message": message, "type": "BadRequestError", "param": field, "code": 400}),
                "{path}"
            );
            all_off[*field] = match off[off.len() - 1] {
                switchyard::serve::api::params::Off::Null => Value::Null,
                switchyard::serve::api::params::Off::Bool(b) => json!(b),
                switchyard::serve::api::params::Off::Num(n) => json!(n),
                switchyard::serve::api::params::Off::EmptyList => json!([]),
                switchyard::serve::api::params::Off::EmptyObject => json!({}),
            };
        }
        // Every field at its "off" value at once is accepted.
        let r = post(&base, path, all_off).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }

    // Exact texts for a few, as a client sees them.
    for (path, body, message, param) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"11": 5}}),
            "logit_bias is not supported by this server; omit it or set it to null or {}.",
            "logit_bias",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "use_beam_search": true}),
            "use_beam_search is not supported by this server; omit it or set it to null or false.",
            "use_beam_search",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "frequency_penalty": 0.5}),
            "frequency_penalty is not supported by this server; omit it or set it to null or 0.",
            "frequency_penalty",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]}),
            "functions is not supported by this server; omit it or set it to null.",
            "functions",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "n": 3}),
            "n must be 1, got 3.",
            "n",
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "stream_options": {"include_usage": true}}),
            "Stream options can only be defined when `stream=True`.",
            "stream_options",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}),
            "messages[0] has a `image_url` content part; this server accepts text only.",
            "messages",
        ),
    ] {
        let r = post(&base, path, body).await;
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(
            error_of(&r),
            json!({"message": message, "type": "BadRequestError", "param": param, "code": 400})
        );
    }

    // Implemented vLLM extras: request_id names the response; unknown fields are ignored.
    let r = post(
        &base,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
               "request_id": "abc123", "user": "u", "session_id": "s", "not_a_field": 1}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(json_of(&r)["id"], "chatcmpl-abc123");
}
