//! Hostile clients against the real decode server on loopback (issue 11 items 3, 4, 6, 8): each
//! test reproduces an attack over real sockets, asserts the server's exact answer, and checks that
//! a well-behaved client running at the same time is served within its normal latency.

mod serve_support;
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_support::*;
use support::HttpClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The well-behaved request: 16 tokens, non-streaming.
fn small() -> Value {
    json!({"prompt": "hello there", "max_tokens": 16})
}

/// Median latency of the well-behaved request on an idle server.
async fn baseline(base: &str) -> Duration {
    let mut v = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let r = post(base, "/v1/completions", small()).await;
        assert_eq!(r.status, 200, "{}", r.text());
        v.push(t.elapsed());
    }
    v.sort();
    v[2]
}

/// The well-behaved request and `/health` both answer within a bound of the idle latency (loose,
/// for a loaded test machine; the attacks made them take seconds).
async fn assert_served_normally(base: &str, idle: Duration) {
    // 3 s of slack: a CI run on 2 loaded cores measured 1.98 s here with nothing wrong.
    let bound = idle * 20 + Duration::from_secs(3);
    let t = Instant::now();
    let r = post(base, "/v1/completions", small()).await;
    let took = t.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json_of(&r)["usage"]["completion_tokens"], 16);
    assert!(
        took <= bound,
        "well-behaved request took {took:?} (idle {idle:?})"
    );
    let t = Instant::now();
    let h = HttpClient::new()
        .get(&format!("{base}/health"))
        .await
        .unwrap();
    assert_eq!(h.status, 200);
    assert!(t.elapsed() <= bound, "/health took {:?}", t.elapsed());
}

async fn post_raw(base: &str, path: &str, body: String) -> support::HttpResponse {
    HttpClient::new()
        .post_json(&format!("{base}{path}"), &[], body)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_are_capped_and_matched_in_one_pass() {
    let (h, base) = start(|a| a.max_model_len = Some(4096)).await;
    let idle = baseline(&base).await;

    // The attack shape (many long stops), scaled down: refused before any work.
    let stops: Vec<String> = (0..1400)
        .map(|i| format!("{i:04}{}", "s".repeat(2000)))
        .collect();
    let r = post(
        &base,
        "/v1/completions",
        json!({"prompt": "x", "stop": stops}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        error_of(&r),
        json!({"message": "stop has 1400 strings; at most 64 are allowed.",
               "type": "BadRequestError", "param": "stop", "code": 400})
    );
    let r = post(
        &base,
        "/v1/completions",
        json!({"prompt": "x", "stop": ["ok", "y".repeat(1025)]}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        error_of(&r),
        json!({"message": "A stop string is 1025 bytes long; at most 1024 bytes are allowed.",
               "type": "BadRequestError", "param": "stop", "code": 400})
    );

    // The most the caps allow (64 stops of 1 KiB that never match), on long generations, while
    // the well-behaved client runs.
    let stops: Vec<String> = (0..64)
        .map(|i| format!("{i:02}{}", "#".repeat(1022)))
        .collect();
    let heavy = json!({"prompt": "x", "max_tokens": 2000, "stop": stops, "stream": true});
    let mut attackers = Vec::new();
    for _ in 0..3 {
        let (b, body) = (base.clone(), heavy.to_string());
        attackers.push(tokio::spawn(async move {
            post_raw(&b, "/v1/completions", body).await
        }));
    }
    assert_served_normally(&base, idle).await;
    for a in attackers {
        let r = a.await.unwrap();
        assert_eq!(r.status, 200);
        let events = sse_data(&r);
        let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length");
    }

    // A stop string that straddles tokens still ends the output exactly where it starts.
    let r = post(
        &base,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 64, "temperature": 0}),
    )
    .await;
    let text = json_of(&r)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    let stop = &text[5..11];
    let cut = text.find(stop).unwrap();
    let r = post(
        &base,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 64, "temperature": 0,
               "stop": ["never-there", stop]}),
    )
    .await;
    let v = json_of(&r);
    assert_eq!(v["choices"][0]["text"], text[..cut]);
    assert_eq!(v["choices"][0]["stop_reason"], stop);
    h.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_that_cannot_fit_are_refused_before_tokenising() {
    // The sim codec takes 4 bytes per token: 64 tokens hold at most 256 bytes.
    let (h, base) = start(|a| a.max_model_len = Some(64)).await;
    let idle = baseline(&base).await;
    let r = post(
        &base,
        "/v1/completions",
        json!({"prompt": "a".repeat(257), "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        error_of(&r),
        json!({"message": "The prompt is 257 bytes, more than the 256 bytes that can fit this \
               model's maximum context length of 64 tokens. Please reduce the length of the \
               prompt.", "type": "BadRequestError", "param": "prompt", "code": 400})
    );
    let r = post(
        &base,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "b".repeat(200)},
                            {"role": "user", "content": [{"type": "text", "text": "c".repeat(100)}]}]}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(error_of(&r)["param"], "messages");
    assert!(error_of(&r)["message"]
        .as_str()
        .unwrap()
        .starts_with("The prompt is 300 bytes"));

    // Thirty-two 1 MB prompts and chats at once: refused cheaply, others unaffected.
    let mut attackers = Vec::new();
    for i in 0..32 {
        let b = base.clone();
        let body = if i % 2 == 0 {
            json!({"prompt": "z".repeat(1 << 20)})
        } else {
            json!({"messages": [{"role": "user", "content": "z".repeat(1 << 20)}]})
        };
        let path = if i % 2 == 0 {
            "/v1/completions"
        } else {
            "/v1/chat/completions"
        };
        attackers.push(tokio::spawn(async move {
            post_raw(&b, path, body.to_string()).await
        }));
    }
    assert_served_normally(&base, idle).await;
    for a in attackers {
        assert_eq!(a.await.unwrap().status, 400);
    }
    // A token-array prompt far over the context is counted, not kept.
    let ids: Vec<u32> = (0..200_000).map(|i| i % 1000).collect();
    let r = post(
        &base,
        "/v1/completions",
        json!({"prompt": ids, "max_tokens": 4}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        error_of(&r)["message"],
        "This model's maximum context length is 64 tokens. However, you requested 200004 \
         tokens (200000 in the messages, 4 in the completion). Please reduce the length of the \
         messages or completion."
    );
    h.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_token_ids_are_capped_and_checked_in_constant_time() {
    let (h, base) = start(|a| {
        a.max_model_len = Some(4096);
        a.max_request_body_bytes = 64 << 20;
    })
    .await;
    let ids: Vec<u32> = (200_000..201_025).collect();
    let r = post(
        &base,
        "/v1/completions",
        json!({"prompt": "x", "stop_token_ids": ids}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        error_of(&r),
        json!({"message": "stop_token_ids has 1025 ids; at most 1024 are allowed.",
               "type": "BadRequestError", "param": "stop_token_ids", "code": 400})
    );
    h.shutdown(Duration::from_secs(2)).await;

    // Raise the cap far beyond the default: a million ids per request (out of vocabulary, so
    // they never match) must still cost other requests nothing per token.
    let (h, base) = start(|a| {
        a.max_model_len = Some(4096);
        a.max_request_body_bytes = 64 << 20;
        a.max_stop_token_ids = 2_000_000;
        // ~0.65 ms per decode step: the attackers are still running when measured.
        a.time_scale = 0.01;
    })
    .await;
    let idle = baseline(&base).await;
    let ids: Vec<u32> = (200_000..1_200_000).collect();
    let heavy = json!({"prompt": "x", "max_tokens": 1000, "stop_token_ids": ids}).to_string();
    let mut attackers = Vec::new();
    for _ in 0..3 {
        let (b, body) = (base.clone(), heavy.clone());
        attackers.push(tokio::spawn(async move {
            post_raw(&b, "/v1/completions", body).await
        }));
    }
    // Let them reach the engine before measuring.
    wait_metrics(&base, "attackers running", |m| {
        metric(m, "vllm:num_requests_running", "") >= 1.0
    })
    .await;
    assert_served_normally(&base, idle).await;
    for a in attackers {
        let r = a.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(json_of(&r)["usage"]["completion_tokens"], 1000);
    }
    h.shutdown(Duration::from_secs(2)).await;
}

/// Reads until EOF or `limit`; returns what was read and whether EOF came.
async fn read_until_eof(tcp: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

/// Replaces every connection in `held` the server refused (it has bytes to read: the 503) until
/// a settle period passes with all of them held open and silent.
async fn fill_the_cap(held: &mut [TcpStream], addr: std::net::SocketAddr) {
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut refused = 0;
        for tcp in held.iter_mut() {
            let mut byte = [0u8; 1];
            // Ready to read means refused: a 503 or EOF. `WouldBlock` means held and silent.
            let held_silent = matches!(tcp.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            if !held_silent {
                *tcp = TcpStream::connect(addr).await.unwrap();
                refused += 1;
            }
        }
        if refused == 0 {
            return;
        }
    }
    panic!("the server kept refusing connections under its cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_excess_connections_are_closed() {
    let (h, base) = start(|a| {
        a.header_read_timeout = Duration::from_millis(500);
        a.idle_timeout = Duration::from_secs(1);
        a.max_connections = 8;
    })
    .await;
    let idle = baseline(&base).await;
    let addr = h.http_addr;

    // A partial request head: closed at the header-read timeout, with nothing to answer.
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    assert_served_normally(&base, idle).await;
    let (got, eof) = read_until_eof(&mut partial, Duration::from_secs(5)).await;
    assert!(eof, "partial-header connection still open after 5 s");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );

    // A keep-alive connection left idle after its response: closed too.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (got, eof) = read_until_eof(&mut kept, Duration::from_secs(5)).await;
    assert!(eof, "idle keep-alive connection still open after 5 s");
    assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));

    h.shutdown(Duration::from_secs(2)).await;

    // The connection cap, with timeouts long enough not to interfere.
    let (h, base) = start(|a| {
        a.header_read_timeout = Duration::from_secs(20);
        a.idle_timeout = Duration::from_secs(20);
        a.max_connections = 8;
    })
    .await;
    let idle = baseline(&base).await;
    let addr = h.http_addr;
    // Six silent connections (under the cap) do not delay others.
    let mut silent = Vec::new();
    for _ in 0..6 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_served_normally(&base, idle).await;
    // Eight silent ones fill the cap: the next connection is answered 503 and closed. The
    // server may still hold the connections of the requests above for a moment, so a silent
    // one can be refused; such a one has a 503 waiting, and is replaced until eight are held.
    for _ in 0..2 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    fill_the_cap(&mut silent, addr).await;
    let mut over = TcpStream::connect(addr).await.unwrap();
    over.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (got, eof) = read_until_eof(&mut over, Duration::from_secs(5)).await;
    assert!(eof);
    let text = String::from_utf8(got).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{head}"
    );
    assert!(head.contains("retry-after: 1"), "{head}");
    assert_eq!(
        serde_json::from_str::<Value>(body).unwrap(),
        json!({"error": {"message": "Too many open connections (limit 8). Retry later.",
                         "type": "ServiceUnavailableError", "param": null, "code": 503}})
    );
    // Once they leave, the server serves again at once.
    drop(silent);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_served_normally(&base, idle).await;
    h.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_stream_is_aborted_with_bounded_buffering() {
    let (h, base) = start(|a| {
        a.time_scale = 0.0;
        a.max_unread_stream_events = 64;
        a.idle_timeout = Duration::from_secs(30);
    })
    .await;
    let idle = baseline(&base).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(h.http_addr).await.unwrap();
    let body = json!({"prompt": "x", "max_tokens": 30000, "stream": true}).to_string();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    // The client reads nothing: once the socket buffers are full, at most 64 events wait, then
    // the engine aborts the request and frees its blocks.
    let m = wait_metrics(&base, "unread stream aborted", |m| {
        metric(m, "vllm:num_requests_running", "") == 0.0
            && metric(m, "vllm:kv_cache_usage_perc", "") == 0.0
            && metric(m, "vllm:generation_tokens_total", "") > 16.0 * 5.0
    })
    .await;
    let generated = metric(&m, "vllm:generation_tokens_total", "");
    assert!(generated < 30000.0, "generated {generated}");
    assert_served_normally(&base, idle).await;
    // When it finally reads, the stream ends with the abort and [DONE].
    let (got, _) = read_until_eof(&mut tcp, Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        &text[..200.min(text.len())]
    );
    let tail = &text[text.len().saturating_sub(600)..];
    assert!(tail.contains("\"finish_reason\":\"abort\""), "{tail}");
    assert!(tail.contains("data: [DONE]"), "{tail}");
    let m = metrics_when(
        &base,
        "vllm:request_success_total",
        "finished_reason=\"abort\"",
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &m,
            "vllm:request_success_total",
            "finished_reason=\"abort\""
        ),
        1.0
    );
    h.shutdown(Duration::from_secs(2)).await;
}
