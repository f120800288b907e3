//! `switchyard serve` failure and operations paths over the sim backend: every error as OpenAI
//! JSON with its exact status, 503 with Retry-After over the waiting limit, client disconnect
//! freeing blocks, and the `/metrics` exposition (checked with promtool when available).

mod serve_support;
mod support;

use std::time::Duration;

use serde_json::json;
use serve_support::*;
use support::tools;
use support::HttpClient;
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
        tools::missing_dependency("promtool not found (run scripts/install-test-deps.sh)");
        h.shutdown(Duration::from_secs(2)).await;
        return;
    };
    let (code, report) = tools::promtool_check(&promtool, &text);
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
async fn startup_errors_name_the_flag() {
    let mut args = switchyard::serve::ServeArgs::sim_for_tests("tpu-qwen", FAST);
    let e = switchyard::serve::start(args.clone()).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown --sim-profile \"tpu-qwen\" (known: l4-qwen2.5-7b, l4-qwen2.5-coder-14b-fp8, h100-qwen2.5-7b)"
    );
    args.sim_profile = "l4-qwen2.5-7b".into();
    args.num_gpu_blocks_override = Some(10);
    let e = switchyard::serve::start(args.clone()).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "KV cache has 10 blocks of 16 tokens (160 tokens), fewer than --max-model-len 32768; lower \
         --max-model-len or give the KV cache more memory"
    );
    args.num_gpu_blocks_override = None;
    args.tensor_parallel_size = 2;
    let e = switchyard::serve::start(args.clone()).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid flag: --tensor-parallel-size 2 is not supported yet: one replica serves on one GPU \
         (multi-GPU design: docs/multi-gpu.md); run more replicas instead"
    );
    args.tensor_parallel_size = 1;
    args.backend = switchyard::serve::BackendKind::Cpu;
    let e = switchyard::serve::start(args).await.unwrap_err();
    assert_eq!(e.to_string(), "--backend cpu needs --model DIR");
}
