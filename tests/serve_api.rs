//! `switchyard serve` generation endpoints over the sim backend, on loopback: completions and
//! chat, streaming and not, usage and cached tokens, stop strings, logprobs, chunked bodies,
//! models and tokenizer endpoints.

mod serve_support;
mod support;

use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use serve_support::*;
use support::HttpClient;
#[tokio::test]
async fn completion_non_streaming_and_streaming_agree_with_usage_and_cache_hits() {
    let (h, base) = start(|_| {}).await;
    // 100 bytes → 25 tokens with the approximate codec.
    let prompt = "x".repeat(60) + &"y".repeat(40);
    let body = json!({"model": "qwen", "prompt": prompt, "max_tokens": 7, "temperature": 0});
    let r = post(&base, "/v1/completions", body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json_of(&r);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "qwen");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let text = v["choices"][0]["text"].as_str().unwrap().to_owned();
    // Sim tokens decode to 4 characters each.
    assert_eq!(text.len(), 28, "{text:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 25, "completion_tokens": 7, "total_tokens": 32,
               "prompt_tokens_details": {"cached_tokens": 0}})
    );

    // Same prompt again: the first full block (16 tokens) is a prefix hit; output identical.
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let r = post(&base, "/v1/completions", stream_body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "text/event-stream");
    let events = sse_data(&r);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": 25, "completion_tokens": 7, "total_tokens": 32,
               "prompt_tokens_details": {"cached_tokens": 16}})
    );
    let body_chunks = &chunks[..chunks.len() - 1];
    let streamed: String = body_chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(
        body_chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert!(body_chunks[..body_chunks.len() - 1]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));

    metrics_when(&base, "vllm:e2e_request_latency_seconds_count", "", 2.0).await;
    let m = metrics_when(
        &base,
        "vllm:request_success_total",
        "finished_reason=\"length\"",
        2.0,
    )
    .await;
    assert_eq!(metric(&m, "vllm:prefix_cache_queries_total", ""), 50.0);
    assert_eq!(metric(&m, "vllm:prefix_cache_hits_total", ""), 16.0);
    assert_eq!(metric(&m, "vllm:prompt_tokens_total", ""), 50.0);
    assert_eq!(metric(&m, "vllm:generation_tokens_total", ""), 14.0);
    assert_eq!(
        metric(
            &m,
            "vllm:request_success_total",
            "finished_reason=\"length\""
        ),
        2.0
    );
    assert_eq!(
        metric(&m, "vllm:e2e_request_latency_seconds_count", ""),
        2.0
    );
    assert_eq!(metric(&m, "vllm:kv_cache_usage_perc", ""), 0.0);
    h.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn chat_streams_role_first_then_content_and_usage() {
    let (h, base) = start(|_| {}).await;
    let messages = json!([{"role": "system", "content": "be brief"},
                          {"role": "user", "content": [{"type": "text", "text": "hello"}]}]);
    let r = post(
        &base,
        "/v1/chat/completions",
        json!({"model": "qwen-alias", "messages": messages, "max_tokens": 5}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = json_of(&r);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "qwen-alias");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(content.len(), 20);
    // The prompt is the ChatML rendering, 4 bytes per token.
    let rendered = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n";
    let prompt_tokens = rendered.len().div_ceil(4);
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    let tok = post(&base, "/tokenize", json!({"messages": messages})).await;
    assert_eq!(json_of(&tok)["count"], prompt_tokens);

    let r = post(
        &base,
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 5,
        "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    let events = sse_data(&r);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_eq!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"],
        16 * ((prompt_tokens - 1) / 16)
    );
    let streamed: String = chunks[1..chunks.len() - 1]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, content);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
    h.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn stop_strings_end_generation_and_are_cut_from_the_text() {
    let (h, base) = start(|_| {}).await;
    let base_req = json!({"prompt": "stop string test prompt", "max_tokens": 12});
    let full = json_of(&post(&base, "/v1/completions", base_req.clone()).await)["choices"][0]
        ["text"]
        .as_str()
        .unwrap()
        .to_owned();
    // The third sim token's text, e.g. " abc".
    let stop = full[8..12].to_owned();
    let expected = &full[..full.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut req = base_req.clone();
        req["stop"] = json!(["never-appears", stop]);
        req["stream"] = json!(stream);
        let r = post(&base, "/v1/completions", req).await;
        assert_eq!(r.status, 200);
        let (text, last) = if stream {
            let events = sse_data(&r);
            let chunks: Vec<Value> = events[..events.len() - 1]
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            let text: String = chunks
                .iter()
                .map(|c| c["choices"][0]["text"].as_str().unwrap())
                .collect();
            (text, chunks.last().unwrap()["choices"][0].clone())
        } else {
            let v = json_of(&r);
            (
                v["choices"][0]["text"].as_str().unwrap().to_owned(),
                v["choices"][0].clone(),
            )
        };
        assert_eq!(text, expected, "stream={stream}");
        assert_eq!(last["finish_reason"], "stop");
        assert_eq!(last["stop_reason"], json!(stop));
    }
    // include_stop_str_in_output keeps it.
    let mut req = base_req.clone();
    req["stop"] = json!(stop);
    req["include_stop_str_in_output"] = json!(true);
    let v = json_of(&post(&base, "/v1/completions", req).await);
    assert_eq!(v["choices"][0]["text"], format!("{expected}{stop}"));
    // Stopped requests are counted as `stop` and free their blocks.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics_text(&base).await;
        if metric(&m, "vllm:request_success_total", "finished_reason=\"stop\"") == 3.0
            && metric(&m, "vllm:kv_cache_usage_perc", "") == 0.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn models_health_version_tokenize_detokenize() {
    let (h, base) = start(|a| a.max_model_len = Some(4096)).await;
    let client = HttpClient::new();
    let r = client.get(&format!("{base}/health")).await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.len()), (200, 0));
    let v = json_of(&client.get(&format!("{base}/version")).await.unwrap());
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let v = json_of(&client.get(&format!("{base}/v1/models")).await.unwrap());
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["qwen", "qwen-alias"]);
    assert_eq!(v["data"][0]["max_model_len"], 4096);
    assert_eq!(v["data"][1]["root"], "qwen");

    let v = json_of(&post(&base, "/tokenize", json!({"prompt": "abcdefghi"})).await);
    assert_eq!(v["count"], 3);
    assert_eq!(v["max_model_len"], 4096);
    let tokens = v["tokens"].clone();
    // Prompt as token ids: same usage as the text.
    let r = json_of(
        &post(
            &base,
            "/v1/completions",
            json!({"prompt": tokens, "max_tokens": 1}),
        )
        .await,
    );
    assert_eq!(r["usage"]["prompt_tokens"], 3);
    let v = json_of(&post(&base, "/detokenize", json!({"tokens": [0, 1, 151645]})).await);
    assert_eq!(v["prompt"], " aaa baa<|im_end|>");
    let r = post(
        &base,
        "/detokenize",
        json!({"tokens": [1], "model": "other"}),
    )
    .await;
    assert_eq!(r.status, 404);
    h.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn chunked_request_bodies_are_accepted() {
    use http_body_util::StreamBody;
    let (h, base) = start(|_| {}).await;
    let parts = [
        r#"{"prompt": "chunked bo"#,
        r#"dy", "max_"#,
        r#"tokens": 2}"#,
    ];
    let frames = futures::stream::iter(parts.map(|p| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(p)))
    }));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<StreamBody<_>>();
    let req = http::Request::post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(StreamBody::new(frames))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 2);
    h.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn logprobs_only_when_asked() {
    let (h, base) = start(|_| {}).await;
    let r = post(
        &base,
        "/v1/completions",
        json!({"prompt": "logprob test", "max_tokens": 3, "stream": true}),
    )
    .await;
    let events = sse_data(&r);
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert!(c["choices"][0]["logprobs"].is_null(), "{e}");
    }
    let v = json_of(
        &post(
            &base,
            "/v1/completions",
            json!({"prompt": "logprob test", "max_tokens": 3, "logprobs": 2}),
        )
        .await,
    );
    let lp = &v["choices"][0]["logprobs"];
    let text = v["choices"][0]["text"].as_str().unwrap();
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), text);
    // The sim backend picks tokens with certainty.
    assert_eq!(lp["token_logprobs"], json!([0.0, 0.0, 0.0]));
    assert_eq!(lp["text_offset"], json!([0, 4, 8]));
    assert_eq!(lp["top_logprobs"][1], json!({tokens[1]: 0.0}));
    let v = json_of(
        &post(
            &base,
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}],
        "max_tokens": 2, "logprobs": true, "top_logprobs": 1}),
        )
        .await,
    );
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 2);
    assert_eq!(content[0]["logprob"], 0.0);
    assert_eq!(content[0]["top_logprobs"][0]["token"], content[0]["token"]);
    let r = post(
        &base,
        "/v1/completions",
        json!({"prompt": "x", "logprobs": 21}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        error_of(&r)["message"],
        "logprobs must be between 0 and 20, got 21."
    );
    h.shutdown(Duration::from_secs(2)).await;
}
