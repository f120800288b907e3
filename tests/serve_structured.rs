//! Structured outputs over HTTP: the tiny random-weight CPU model (its output is noise, so every
//! valid result is the mask's doing) constrained by `response_format` / `structured_outputs` /
//! forced tool calls yields output that parses and validates against each schema, for several
//! seeds; forced tool calls on the scripted sim; exact 400s for what cannot be compiled or
//! applied.

mod serve_support;
mod support;

use std::path::Path;

use serde_json::{json, Value};
use serve_support::*;
use switchyard::serve::model::testing::{
    set_chat_template, write_tiny_qwen2, TINY_TOOL_CHAT_TEMPLATE,
};
use switchyard::serve::{BackendKind, ServerHandle};

async fn cpu_server(dir: &Path) -> (ServerHandle, String) {
    write_tiny_qwen2(dir, 0).unwrap();
    set_chat_template(dir, TINY_TOOL_CHAT_TEMPLATE).unwrap();
    let dir = dir.to_path_buf();
    start(move |a| {
        a.backend = BackendKind::Cpu;
        a.model = Some(dir);
        a.kv_cache_memory = 16 << 20;
        a.max_model_len = Some(1024);
        a.threads = Some(1);
    })
    .await
}

/// Schema A: an object of bounded fields (response_format json_schema, chat).
fn schema_a() -> Value {
    json!({"type": "object", "properties": {
        "ok": {"type": "boolean"},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "level": {"type": "string", "enum": ["low", "mid", "high"]}},
        "required": ["ok", "score", "level"], "additionalProperties": false})
}

fn valid_a(v: &Value) -> bool {
    v.as_object().is_some_and(|o| o.len() == 3)
        && v["ok"].is_boolean()
        && v["score"].as_u64().is_some_and(|n| n <= 100)
        && ["low", "mid", "high"].contains(&v["level"].as_str().unwrap_or(""))
}

/// Schema B: a non-empty list of at most 3 tags (structured_outputs json, completions).
fn schema_b() -> Value {
    json!({"type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "string", "enum": ["red", "green", "blue"]}})
}

fn valid_b(v: &Value) -> bool {
    v.as_array().is_some_and(|a| {
        (1..=3).contains(&a.len())
            && a.iter()
                .all(|t| ["red", "green", "blue"].contains(&t.as_str().unwrap_or("")))
    })
}

/// Schema C: a tool's parameters (tool_choice naming it): a short word and an enum.
fn schema_c() -> Value {
    json!({"type": "object", "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z]{1,8}$"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": false})
}

fn valid_c(v: &Value) -> bool {
    let city = v["city"].as_str().unwrap_or("");
    v.as_object().is_some_and(|o| o.len() == 2)
        && (1..=8).contains(&city.len())
        && city.bytes().all(|b| b.is_ascii_alphabetic())
        && ["celsius", "fahrenheit"].contains(&v["unit"].as_str().unwrap_or(""))
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[tokio::test]
async fn random_weights_under_a_mask_still_produce_valid_json() {
    let dir = tempfile::tempdir().unwrap();
    let (_h, base) = cpu_server(dir.path()).await;
    for seed in 0..4 {
        // A: response_format json_schema on chat.
        let r = post(
            &base,
            "/v1/chat/completions",
            json!({"messages": user("Rate it."), "seed": seed, "max_tokens": 400,
                   "response_format": {"type": "json_schema",
                       "json_schema": {"name": "rating", "schema": schema_a()}}}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = json_of(&r);
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        let out: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(valid_a(&out), "seed {seed}: {text}");

        // B: structured_outputs json on completions, compact.
        let r = post(
            &base,
            "/v1/completions",
            json!({"prompt": "Colours:", "seed": seed, "max_tokens": 200,
                   "structured_outputs": {"json": schema_b(), "disable_any_whitespace": true}}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = json_of(&r);
        let text = v["choices"][0]["text"].as_str().unwrap();
        let out: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(valid_b(&out) && !text.contains(' '), "seed {seed}: {text}");

        // C: a forced tool call; its arguments validate against the tool's schema.
        let r = post(
            &base,
            "/v1/chat/completions",
            json!({"messages": user("Weather?"), "seed": seed, "max_tokens": 300,
                   "tools": [{"type": "function", "function": {"name": "get_weather",
                       "parameters": schema_c()}}],
                   "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = json_of(&r);
        let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
        assert_eq!(call["name"], "get_weather", "{v}");
        let args = call["arguments"].as_str().unwrap();
        let out: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{e}: {args:?}"));
        assert!(valid_c(&out), "seed {seed}: {args}");
        assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
    }

    // regex, choice and grammar, streamed: the concatenated deltas match.
    for (so, check) in [
        (
            json!({"regex": "[0-9]{2}:[0-5][0-9]"}),
            Box::new(|t: &str| {
                t.len() == 5 && t.as_bytes()[2] == b':' && t.replace(':', "").parse::<u32>().is_ok()
            }) as Box<dyn Fn(&str) -> bool>,
        ),
        (
            json!({"choice": ["positive", "negative", "it depends"]}),
            Box::new(|t: &str| ["positive", "negative", "it depends"].contains(&t)),
        ),
        (
            json!({"grammar": "start: \"SELECT \" col (\", \" col)* \" FROM t\"\ncol: /[a-z]{1,5}/"}),
            Box::new(|t: &str| {
                t.strip_prefix("SELECT ")
                    .and_then(|r| r.strip_suffix(" FROM t"))
                    .is_some_and(|cols| {
                        cols.split(", ").all(|c| {
                            (1..=5).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_lowercase())
                        })
                    })
            }),
        ),
    ] {
        let r = post(
            &base,
            "/v1/chat/completions",
            json!({"messages": user("Go."), "seed": 7, "max_tokens": 200, "stream": true,
                   "structured_outputs": so}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let events = sse_data(&r);
        let mut text = String::new();
        for e in &events[..events.len() - 1] {
            let c: Value = serde_json::from_str(e).unwrap();
            if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
                text.push_str(t);
            }
        }
        assert!(check(&text), "{so}: {text:?}");
    }
}

#[tokio::test]
async fn uncompilable_constraints_are_400s_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (_h, base) = cpu_server(dir.path()).await;
    for (path, body, message, param) in [
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "structured_outputs": {"regex": "(unclosed"}}),
            "Invalid structured_outputs: at 1(8): invalid regex \"(unclosed\" (in regex): regex parse \
             error:\n    (unclosed\n    ^\nerror: unclosed group\n   1 | \
             start: /(unclosed/\n              ^\n",
            "structured_outputs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "response_format": {"type": "json_schema", "json_schema":
                {"name": "n", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}),
            "Invalid response_format: Reference segment '$defs' not found in '#/$defs/missing'.",
            "response_format",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "structured_outputs": {"grammar": "start: undefined_rule"}}),
            "Invalid structured_outputs: at 1(8): unknown name: \"undefined_rule\"\n   1 | start: \
             undefined_rule\n              ^\n",
            "structured_outputs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "structured_outputs": {"choice": ["a"], "json": {}}}),
            "You can only use one kind of constraints for structured outputs ('json', 'regex', 'choice', 'grammar' or 'json_object').",
            "structured_outputs",
        ),
    ] {
        let r = post(&base, path, body).await;
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(
            error_of(&r),
            json!({"message": message, "type": "BadRequestError", "param": param, "code": 400})
        );
    }

    // The plain sim has no logits to mask.
    let (_h2, sim) = start(|_| {}).await;
    let r = post(
        &sim,
        "/v1/completions",
        json!({"prompt": "x", "response_format": {"type": "json_object"}}),
    )
    .await;
    assert_eq!(
        error_of(&r),
        json!({"message": "response_format needs constrained decoding, which needs a backend \
            that computes logits; the sim backend picks tokens without them (use --sim-script, \
            cpu or cuda).", "type": "BadRequestError", "param": "response_format", "code": 400})
    );
}

#[tokio::test]
async fn forced_tool_calls_on_the_scripted_sim() {
    // The script is a valid `required` answer, so the mask lets every scripted token through.
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2(dir.path(), 0).unwrap();
    set_chat_template(dir.path(), TINY_TOOL_CHAT_TEMPLATE).unwrap();
    let script = dir.path().join("script.txt");
    std::fs::write(
        &script,
        "[{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Lima\", \"unit\": \"celsius\"}}]",
    )
    .unwrap();
    let model = dir.path().to_path_buf();
    let (_h, base) = start(move |a| {
        a.model = Some(model);
        a.sim_script = Some(script);
    })
    .await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": schema_c()}},
                       {"type": "function", "function": {"name": "run_python", "parameters": {"type": "object"}}}]);
    let r = post(
        &base,
        "/v1/chat/completions",
        json!({"messages": user("Weather in Lima?"), "tools": tools, "tool_choice": "required",
               "max_tokens": 200}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json_of(&r);
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(
        calls[0]["function"]["arguments"],
        "{\"city\": \"Lima\", \"unit\": \"celsius\"}"
    );
}
