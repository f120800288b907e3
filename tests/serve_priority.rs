//! `--scheduling-policy priority` and the request body's `priority` over real HTTP on loopback:
//! vLLM's 400s for a priority the server cannot use or a value that is not an integer, and a
//! high-priority request preempting a low-priority one that holds the only slot.

mod serve_support;
mod support;

use std::time::Duration;

use http_body_util::BodyExt as _;
use serde_json::json;
use serve_support::*;
use switchyard::serve::engine::SchedulingPolicy;

#[tokio::test]
async fn priority_is_an_integer_and_needs_the_priority_policy() {
    let (_h, base) = start(|_| {}).await;
    let cases = [
        (
            json!("high"),
            "priority must be an integer, got the string \"high\"",
        ),
        (json!(1.5), "priority must be an integer, got 1.5"),
        (json!(true), "priority must be an integer, got true"),
        (json!([1]), "priority must be an integer, got an array"),
    ];
    for (value, message) in cases {
        let body = json!({"prompt": "hi", "max_tokens": 2, "priority": value});
        let r = post(&base, "/v1/completions", body).await;
        assert_eq!(r.status, 400, "{value}: {}", r.text());
        let e = error_of(&r);
        let text = e["message"].as_str().unwrap();
        assert!(
            text.starts_with(&format!("Invalid request body: {message}")),
            "{text}"
        );
    }
    // Under FCFS only the default is accepted (vLLM's check and text).
    let body = json!({"prompt": "hi", "max_tokens": 2, "priority": 3});
    let r = post(&base, "/v1/completions", body).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        error_of(&r),
        json!({"message": "Got priority 3 but Priority scheduling is not enabled.",
               "type": "BadRequestError", "param": "priority", "code": 400})
    );
    for priority in [json!(0), json!(null)] {
        let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                          "priority": priority});
        let r = post(&base, "/v1/chat/completions", body).await;
        assert_eq!(r.status, 200, "{priority}: {}", r.text());
    }
}

#[tokio::test]
async fn high_priority_request_preempts_the_one_holding_the_only_slot() {
    // One slot; 10 ms real per simulated second, so the low-priority request's 8000 tokens take
    // seconds, far longer than the high-priority one needs.
    let (_h, base) = start(|a| {
        a.scheduling_policy = SchedulingPolicy::Priority;
        a.max_num_seqs = 1;
        a.time_scale = 0.01;
    })
    .await;
    let low = json!({"prompt": "low ".repeat(20), "max_tokens": 8000, "priority": 10,
                     "stream": true, "ignore_eos": true});
    let mut low_stream = open_stream(&base, low).await;

    let high = json!({"prompt": "high ".repeat(20), "max_tokens": 5, "priority": -1,
                      "ignore_eos": true});
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        post(&base, "/v1/completions", high),
    )
    .await
    .expect("the high-priority request waited for the low-priority one");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json_of(&r)["usage"]["completion_tokens"], 5);

    // The low-priority request gave up its slot once, and is still running (recomputed), not
    // finished: only the high-priority request has succeeded.
    let m = metrics_when(&base, "vllm:request_success_total", "", 1.0).await;
    assert_eq!(metric(&m, "vllm:num_preemptions_total", ""), 1.0);
    assert_eq!(metric(&m, "vllm:request_success_total", ""), 1.0);
    let frame = low_stream.body_mut().frame().await.unwrap().unwrap();
    assert!(frame.data_ref().is_some_and(|d| d.starts_with(b"data: ")));
}
