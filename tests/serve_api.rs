//! `switchyard serve` HTTP API over the sim backend, on loopback: completions and chat,
//! streaming and not, usage and cached tokens, stop strings, every error path, client disconnect,
//! and the `/metrics` exposition (checked with promtool when available).

mod support;

use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use support::tools;
use support::{HttpClient, HttpResponse};
use switchyard::serve::{self, ServeArgs, ServerHandle};

/// Fast sim: one L4 decode step (~65 ms simulated) takes ~65 µs.
const FAST: f64 = 0.001;

async fn start(f: impl FnOnce(&mut ServeArgs)) -> (ServerHandle, String) {
    let mut args = ServeArgs::sim_for_tests("l4-qwen2.5-7b", FAST);
    args.served_model_name = vec!["qwen".into(), "qwen-alias".into()];
    f(&mut args);
    let h = serve::start(args).await.unwrap();
    let base = format!("http://{}", h.http_addr);
    (h, base)
}

async fn post(base: &str, path: &str, body: Value) -> HttpResponse {
    HttpClient::new()
        .post_json(&format!("{base}{path}"), &[], body.to_string())
        .await
        .unwrap()
}

fn json_of(r: &HttpResponse) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(r: &HttpResponse) -> Vec<String> {
    let text = r.text();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("bad event {e:?}"))
                .to_owned()
        })
        .collect()
}

/// Sum of the samples of `name` (exact series name, any labels) matching `filter`.
fn metric(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| l.contains(filter))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

async fn metrics_text(base: &str) -> String {
    let r = HttpClient::new()
        .get(&format!("{base}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    r.text()
}

fn error_of(r: &HttpResponse) -> Value {
    assert_eq!(r.header("content-type"), "application/json");
    json_of(r)["error"].clone()
}

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

    let m = metrics_text(&base).await;
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
async fn errors_are_openai_json_with_exact_status() {
    let (h, base) = start(|a| {
        a.max_model_len = Some(64);
        a.max_request_body_bytes = 2048;
    })
    .await;
    let client = HttpClient::new();

    let r = client
        .post_json(&format!("{base}/v1/completions"), &[], "{not json")
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let e = error_of(&r);
    assert_eq!(e["type"], "BadRequestError");
    assert_eq!(e["code"], 400);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("Invalid request body: "),
        "{e}"
    );

    // 40 tokens of prompt + 30 > 64.
    let r = post(
        &base,
        "/v1/completions",
        json!({"prompt": "a".repeat(160), "max_tokens": 30}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        error_of(&r),
        json!({"message": "This model's maximum context length is 64 tokens. However, you \
               requested 70 tokens (40 in the messages, 30 in the completion). Please reduce the \
               length of the messages or completion.",
               "type": "BadRequestError", "param": "max_tokens", "code": 400})
    );

    let r = post(
        &base,
        "/v1/chat/completions",
        json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        error_of(&r),
        json!({"message": "The model `nope` does not exist.", "type": "NotFoundError",
               "param": "model", "code": 404})
    );

    for (body, message, param) in [
        (
            json!({"prompt": "hi", "max_tokens": 0}),
            "max_tokens must be at least 1, got 0.",
            "max_tokens",
        ),
        (json!({"prompt": "hi", "n": 2}), "n must be 1, got 2.", "n"),
        (
            json!({"prompt": ""}),
            "The prompt must not be empty.",
            "prompt",
        ),
        (
            json!({"prompt": [1, 2, 999999]}),
            "Token id 999999 is out of vocabulary (vocabulary size 152064).",
            "prompt",
        ),
        (
            json!({"prompt": "hi", "temperature": -1}),
            "temperature must be a non-negative number, got -1.",
            "temperature",
        ),
        (
            json!({"prompt": "hi", "top_p": 0}),
            "top_p must be in (0, 1], got 0.",
            "top_p",
        ),
        (
            json!({"prompt": ["a", "b"]}),
            "Batched prompts are not supported; send one prompt per request.",
            "prompt",
        ),
        (
            json!({"prompt": "hi", "stop": [""]}),
            "Stop strings must not be empty.",
            "stop",
        ),
    ] {
        let r = post(&base, "/v1/completions", body.clone()).await;
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(
            error_of(&r),
            json!({"message": message, "type": "BadRequestError", "param": param, "code": 400}),
            "{body}"
        );
    }

    let r = client
        .post_json(
            &format!("{base}/v1/completions"),
            &[],
            json!({"prompt": "a".repeat(4096)}).to_string(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(
        error_of(&r)["message"],
        "Request body too large (limit 2048 bytes)."
    );
    h.shutdown(Duration::from_secs(2)).await;
}

/// Opens a streaming request and returns the response once its first body frame arrived.
async fn open_stream(base: &str, body: Value) -> hyper::Response<hyper::body::Incoming> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let mut resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let frame = resp.body_mut().frame().await.unwrap().unwrap();
    assert!(frame.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
    resp
}

async fn wait_metrics(base: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics_text(base).await;
        if ok(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn disconnect_mid_stream_aborts_and_frees_blocks() {
    // ~3 ms per decode step: 4000 tokens would take ~13 s.
    let (h, base) = start(|a| a.time_scale = 0.05).await;
    let resp = open_stream(
        &base,
        json!({"prompt": "z".repeat(400), "max_tokens": 4000, "stream": true}),
    )
    .await;
    wait_metrics(&base, "request running", |m| {
        metric(m, "vllm:num_requests_running", "") == 1.0
            && metric(m, "vllm:kv_cache_usage_perc", "") > 0.0
    })
    .await;
    drop(resp);
    let m = wait_metrics(&base, "blocks freed", |m| {
        metric(m, "vllm:kv_cache_usage_perc", "") == 0.0
            && metric(m, "vllm:num_requests_running", "") == 0.0
    })
    .await;
    assert_eq!(
        metric(
            &m,
            "vllm:request_success_total",
            "finished_reason=\"abort\""
        ),
        1.0
    );
    assert!(metric(&m, "vllm:generation_tokens_total", "") < 4000.0);
    assert_eq!(
        h.engine.shared().num_free_blocks(),
        h.engine.info().num_blocks
    );
    h.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn waiting_queue_over_limit_gets_503_with_retry_after() {
    let (h, base) = start(|a| {
        a.time_scale = 0.05;
        a.max_num_seqs = 1;
        a.max_waiting = 1;
    })
    .await;
    let body = json!({"prompt": "q".repeat(64), "max_tokens": 4000, "stream": true});
    let first = open_stream(&base, body.clone()).await;
    // The engine publishes its queue sizes after a step; wait until the first one is counted
    // as running so the second is judged against a settled queue.
    wait_metrics(&base, "first running", |m| {
        metric(m, "vllm:num_requests_running", "") == 1.0
            && metric(m, "vllm:num_requests_waiting", "") == 0.0
    })
    .await;
    // The second one waits (one sequence at a time); its stream has no frame yet, so send it in
    // the background.
    let b2 = base.clone();
    let b = body.clone();
    let second = tokio::spawn(async move {
        HttpClient::new()
            .post_json(&format!("{b2}/v1/completions"), &[], b.to_string())
            .await
    });
    wait_metrics(&base, "one waiting", |m| {
        metric(m, "vllm:num_requests_waiting", "") == 1.0
    })
    .await;
    let r = post(&base, "/v1/completions", body).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(
        error_of(&r),
        json!({"message": "Server overloaded: 1 requests waiting (limit 1). Retry later.",
               "type": "ServiceUnavailableError", "param": null, "code": 503})
    );
    drop(first);
    second.abort();
    wait_metrics(&base, "all aborted", |m| {
        metric(m, "vllm:num_requests_running", "") + metric(m, "vllm:num_requests_waiting", "")
            == 0.0
            && metric(m, "vllm:kv_cache_usage_perc", "") == 0.0
    })
    .await;
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
async fn metrics_have_every_vllm_name_and_pass_promtool() {
    let (h, base) = start(|_| {}).await;
    let r = post(
        &base,
        "/v1/completions",
        json!({"prompt": "metrics please", "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = HttpClient::new()
        .get(&format!("{base}/metrics"))
        .await
        .unwrap();
    assert!(r
        .header("content-type")
        .starts_with("text/plain; version=0.0.4"));
    let text = r.text();
    for name in switchyard::serve::metrics::METRIC_NAMES {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}\n{text}"
        );
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "no TYPE for {name}\n{text}"
        );
    }
    for line in [
        "# TYPE vllm:num_requests_running gauge",
        "# TYPE vllm:prompt_tokens_total counter",
        "# TYPE vllm:time_to_first_token_seconds histogram",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?}\n{text}");
    }
    let labels = "model_name=\"qwen\",engine=\"0\"";
    assert!(
        text.contains(&format!("vllm:num_requests_running{{{labels}}} 0")),
        "{text}"
    );
    assert!(
        text.contains(&format!("vllm:generation_tokens_total{{{labels}}} 3")),
        "{text}"
    );
    assert!(
        text.contains("vllm:time_to_first_token_seconds_bucket{model_name=\"qwen\",engine=\"0\",le=\"0.001\"}"),
        "{text}"
    );
    assert!(
        text.contains("vllm:time_to_first_token_seconds_bucket{model_name=\"qwen\",engine=\"0\",le=\"2560.0\"}"),
        "{text}"
    );
    assert!(
        text.contains(
            "vllm:inter_token_latency_seconds_bucket{model_name=\"qwen\",engine=\"0\",le=\"80.0\"}"
        ),
        "{text}"
    );
    assert!(
        text.contains("vllm:request_decode_time_seconds_bucket{model_name=\"qwen\",engine=\"0\",le=\"7680.0\"}"),
        "{text}"
    );
    let blocks = h.engine.info().num_blocks;
    assert!(
        text.contains(&format!(
            "vllm:cache_config_info{{model_name=\"qwen\",engine=\"0\",block_size=\"16\",num_gpu_blocks=\"{blocks}\""
        )),
        "{text}"
    );
    assert!(
        text.contains("vllm:request_success_total{model_name=\"qwen\",engine=\"0\",finished_reason=\"length\"}"),
        "{text}"
    );
    // Scraper view: the EPP's parser reads the numbers it needs.
    let wanted = [
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_waiting",
        "vllm:generation_tokens_total",
    ];
    let page = switchyard::promtext::parse(&text, &wanted, &Default::default()).unwrap();
    for name in wanted {
        assert_eq!(page.get(name).map(|f| f.samples.len()), Some(1), "{name}");
    }
    assert_eq!(
        page.get("vllm:generation_tokens_total").unwrap().samples[0].value,
        3.0
    );

    let Some(promtool) = tools::promtool() else {
        println!("SKIPPED: promtool not found (run scripts/install-test-deps.sh)");
        h.shutdown(Duration::from_secs(2)).await;
        return;
    };
    use std::io::Write as _;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let code = out.status.code().unwrap_or(-1);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // vLLM's names contain ':', which promtool's linter flags (exit 3); nothing else may be.
    let colons_only = code == 3
        && report
            .lines()
            .all(|l| l.trim().is_empty() || l.ends_with("metric names should not contain ':'"));
    assert!(
        code == 0 || colons_only,
        "promtool exit {code}: {report}\n{text}"
    );
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
