//! The agent's tool loop against a scripted OpenAI mock on loopback and a real `switchyard
//! sandbox` runtime: model fallback on 503, 429 and a timeout, malformed tool calls retried then
//! fallen back from, the step budget, the HTTP API (`/healthz`, NDJSON `/v1/tasks`), and the
//! binary's `agent serve` / `agent run` as the image check and a user start them.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use parking_lot::Mutex;
use serde_json::{json, Value};
use support::sandbox::SandboxRuntime;
use support::HttpClient;
use switchyard::agent::events::{CallView, Event};
use switchyard::agent::gateway::GatewayConfig;
use switchyard::agent::http::HttpClient as AgentHttp;
use switchyard::agent::runner::{Agent, AgentConfig, TaskRequest};
use switchyard::agent::session::SandboxSource;
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// What the mock answers for one request.
#[derive(Debug, Clone)]
enum Answer {
    Status(u16),
    /// Never answers (the agent's request timeout fires).
    Hang,
    /// An assistant message.
    Message(Value),
}

/// One tool call in the OpenAI reply shape.
fn call(id: &str, name: &str, arguments: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

fn calls(list: Vec<Value>) -> Answer {
    Answer::Message(json!({"role": "assistant", "content": null, "tool_calls": list}))
}

#[derive(Default)]
struct Script {
    /// Per model, answers in order; the last one repeats.
    answers: HashMap<String, Vec<Answer>>,
    /// Every request body, in arrival order.
    seen: Vec<Value>,
}

#[derive(Clone)]
struct MockGateway {
    script: Arc<Mutex<Script>>,
    base: String,
}

async fn chat(
    State(script): State<Arc<Mutex<Script>>>,
    Json(body): Json<Value>,
) -> axum::response::Response {
    let model = body["model"].as_str().unwrap_or("").to_string();
    let answer = {
        let mut s = script.lock();
        s.seen.push(body);
        match s.answers.get_mut(&model) {
            Some(list) if list.len() > 1 => list.remove(0),
            Some(list) if !list.is_empty() => list[0].clone(),
            _ => Answer::Status(404),
        }
    };
    match answer {
        Answer::Status(code) => (
            StatusCode::from_u16(code).unwrap(),
            Json(json!({"error": {"message": format!("mock {code} for {model}")}})),
        )
            .into_response(),
        Answer::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Answer::Message(m) => Json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": m, "finish_reason": "tool_calls"}]
        }))
        .into_response(),
    }
}

impl MockGateway {
    async fn start(answers: Vec<(&str, Vec<Answer>)>) -> Self {
        let script = Arc::new(Mutex::new(Script {
            answers: answers
                .into_iter()
                .map(|(m, a)| (m.to_string(), a))
                .collect(),
            seen: Vec::new(),
        }));
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { script, base }
    }

    /// The `model` of every request, in order.
    fn models_asked(&self) -> Vec<String> {
        self.script
            .lock()
            .seen
            .iter()
            .map(|b| b["model"].as_str().unwrap_or("").to_string())
            .collect()
    }

    fn request(&self, i: usize) -> Value {
        self.script.lock().seen[i].clone()
    }
}

async fn sandbox() -> SandboxRuntime {
    SandboxRuntime::start(BIN.as_ref(), &[], &[])
        .await
        .expect("sandbox runtime starts")
}

fn config(gateway: &str, sandbox: &str, models: &[&str]) -> AgentConfig {
    AgentConfig {
        models: models.iter().map(|m| m.to_string()).collect(),
        gateway: GatewayConfig {
            url: gateway.to_string(),
            timeout: Duration::from_secs(20),
            temperature: 0.0,
            max_tokens: None,
        },
        sandbox: SandboxSource::Direct {
            url: sandbox.to_string(),
        },
        sandbox_timeout: Duration::from_secs(30),
        max_steps: 8,
        max_steps_limit: 64,
        malformed_retries: 2,
        system_prompt: "sys".into(),
    }
}

async fn run(agent: &Agent, task: &str, max_steps: Option<u32>) -> Vec<Event> {
    let (tx, mut rx) = mpsc::channel(64);
    let request = TaskRequest {
        task: task.into(),
        model: None,
        max_steps,
    };
    let runner = agent.run(request, tx);
    let collect = async {
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            events.push(e);
        }
        events
    };
    let ((), events) = tokio::join!(runner, collect);
    events
}

fn started(models: &[&str], max_steps: u32, sandbox: &str) -> Event {
    Event::Started {
        task: "t".into(),
        models: models.iter().map(|m| m.to_string()).collect(),
        max_steps,
        sandbox: sandbox.into(),
    }
}

fn sandbox_event(url: &str) -> Event {
    Event::Sandbox {
        url: url.into(),
        claim: None,
    }
}

fn finish_answer() -> Answer {
    calls(vec![call("c1", "finish", r#"{"answer": "all done"}"#)])
}

#[tokio::test]
async fn falls_back_on_503_429_and_timeout() {
    let rt = sandbox().await;
    let gw = MockGateway::start(vec![
        ("a", vec![Answer::Status(503)]),
        ("b", vec![Answer::Status(429)]),
        ("c", vec![Answer::Hang]),
        ("d", vec![finish_answer()]),
    ])
    .await;
    let mut cfg = config(&gw.base, &rt.base, &["a", "b", "c", "d"]);
    // Long enough for a loaded machine to answer a loopback request, short for the test.
    cfg.gateway.timeout = Duration::from_secs(2);
    let agent = Agent::new(cfg, AgentHttp::new());
    let events = run(&agent, "t", None).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    assert_eq!(
        events,
        vec![
            started(&["a", "b", "c", "d"], 8, &rt.base),
            sandbox_event(&rt.base),
            Event::Fallback {
                step: 1,
                from: "a".into(),
                to: Some("b".into()),
                reason: r#"HTTP 503: {"error":{"message":"mock 503 for a"}}"#.into(),
            },
            Event::Fallback {
                step: 1,
                from: "b".into(),
                to: Some("c".into()),
                reason: r#"HTTP 429: {"error":{"message":"mock 429 for b"}}"#.into(),
            },
            Event::Fallback {
                step: 1,
                from: "c".into(),
                to: Some("d".into()),
                reason: format!("no complete reply from {url} within 2s"),
            },
            Event::Assistant {
                step: 1,
                model: "d".into(),
                content: None,
                tool_calls: vec![CallView {
                    name: "finish".into(),
                    arguments: r#"{"answer": "all done"}"#.into()
                }],
            },
            Event::Done {
                steps: 1,
                model: "d".into(),
                answer: "all done".into(),
            },
        ]
    );
    assert_eq!(gw.models_asked(), ["a", "b", "c", "d"]);
    // Every request offers the six tools and the conversation so far.
    let body = gw.request(3);
    assert_eq!(body["tool_choice"], "auto");
    assert_eq!(body["stream"], false);
    assert_eq!(body["tools"].as_array().unwrap().len(), 6);
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "sys"}, {"role": "user", "content": "t"}])
    );

    // Every model failing ends the task with each model's reason.
    let gw = MockGateway::start(vec![
        ("a", vec![Answer::Status(500)]),
        ("b", vec![Answer::Status(502)]),
    ])
    .await;
    let agent = Agent::new(config(&gw.base, &rt.base, &["a", "b"]), AgentHttp::new());
    let events = run(&agent, "t", None).await;
    assert_eq!(
        events.last().unwrap(),
        &Event::Failed {
            steps: 1,
            kind: "models_failed",
            message: "every model failed at step 1: a: HTTP 500: {\"error\":{\"message\":\"mock 500 for a\"}}; \
                      b: HTTP 502: {\"error\":{\"message\":\"mock 502 for b\"}}"
                .into(),
        }
    );

    // A 400 is the request's fault: no fallback.
    let gw = MockGateway::start(vec![("a", vec![Answer::Status(400)])]).await;
    let agent = Agent::new(config(&gw.base, &rt.base, &["a", "b"]), AgentHttp::new());
    let events = run(&agent, "t", None).await;
    assert_eq!(
        events.last().unwrap(),
        &Event::Failed {
            steps: 1,
            kind: "refused",
            message: "model a refused the request: request refused with HTTP 400: {\"error\":{\"message\":\"mock 400 for a\"}}"
                .into(),
        }
    );
    assert_eq!(gw.models_asked(), ["a"]);
}

#[tokio::test]
async fn malformed_calls_are_retried_then_fall_back() {
    let rt = sandbox().await;
    let gw = MockGateway::start(vec![
        (
            "bad",
            vec![
                calls(vec![call("x1", "run_code", "{\"code\": ")]),
                calls(vec![call("x2", "delete_everything", "{}")]),
                calls(vec![call(
                    "x3",
                    "write_file",
                    r#"{"path": "../up.txt", "content": "x"}"#,
                )]),
            ],
        ),
        (
            "good",
            vec![
                calls(vec![call(
                    "g1",
                    "write_file",
                    r#"{"path": "notes/hello.txt", "content": "hi\n"}"#,
                )]),
                finish_answer(),
            ],
        ),
    ])
    .await;
    let agent = Agent::new(
        config(&gw.base, &rt.base, &["bad", "good"]),
        AgentHttp::new(),
    );
    let events = run(&agent, "t", None).await;
    let bad_args = "bad arguments for `run_code`: EOF while parsing a value at line 1 column 9";
    assert_eq!(
        events[2..7],
        vec![
            Event::Retry {
                step: 1,
                model: "bad".into(),
                attempt: 1,
                reason: bad_args.into(),
            },
            Event::Retry {
                step: 1,
                model: "bad".into(),
                attempt: 2,
                reason: "unknown tool `delete_everything` (tools: run_code, shell, write_file, read_file, list_files, finish)".into(),
            },
            Event::Fallback {
                step: 1,
                from: "bad".into(),
                to: Some("good".into()),
                reason: "malformed tool call after 2 retries: bad arguments for `write_file`: `path` must not contain `..`".into(),
            },
            Event::Assistant {
                step: 1,
                model: "good".into(),
                content: None,
                tool_calls: vec![CallView {
                    name: "write_file".into(),
                    arguments: r#"{"path": "notes/hello.txt", "content": "hi\n"}"#.into(),
                }],
            },
            Event::Tool {
                step: 1,
                name: "write_file".into(),
                ok: true,
                output: json!({"path": "notes/hello.txt", "bytes": 3}),
            },
        ][..],
        "{events:#?}"
    );
    assert_eq!(
        events.last().unwrap(),
        &Event::Done {
            steps: 2,
            model: "good".into(),
            answer: "all done".into()
        }
    );
    assert_eq!(
        std::fs::read_to_string(rt.workspace.join("notes/hello.txt")).unwrap(),
        "hi\n"
    );
    // The retry showed the model its error as the call's result; the fallback started clean.
    let retry = gw.request(1);
    let msgs = retry["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 4, "{msgs:#?}");
    assert_eq!(msgs[2]["tool_calls"][0]["id"], "x1");
    assert_eq!(
        msgs[3],
        json!({"role": "tool", "tool_call_id": "x1", "content": format!(
            "error: {bad_args}. Call one of the tools with valid JSON arguments, or answer in text.")})
    );
    assert_eq!(gw.request(3)["messages"].as_array().unwrap().len(), 2);
    assert_eq!(gw.models_asked()[..4], ["bad", "bad", "bad", "good"]);
}

#[tokio::test]
async fn step_budget_ends_the_task_with_a_clear_error() {
    let rt = sandbox().await;
    std::fs::write(rt.workspace.join("a.txt"), "abc").unwrap();
    let gw = MockGateway::start(vec![(
        "m",
        vec![calls(vec![call("l", "list_files", r#"{"path": ""}"#)])],
    )])
    .await;
    let agent = Agent::new(config(&gw.base, &rt.base, &["m"]), AgentHttp::new());
    let events = run(&agent, "t", Some(3)).await;
    let tools: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Tool { .. }))
        .collect();
    assert_eq!(tools.len(), 3);
    let Event::Tool { ok, output, .. } = tools[0] else {
        unreachable!()
    };
    assert!(ok);
    assert_eq!(
        output["entries"],
        json!([{"name": "a.txt", "type": "file", "size": 3}])
    );
    assert_eq!(
        events.last().unwrap(),
        &Event::Failed {
            steps: 3,
            kind: "step_budget",
            message: "step budget exhausted: 3 model steps without a final answer (raise max_steps or simplify the task)".into(),
        }
    );
    assert_eq!(gw.models_asked().len(), 3);
    // The third request carried both earlier calls and their results.
    assert_eq!(gw.request(2)["messages"].as_array().unwrap().len(), 6);
}

#[tokio::test]
async fn tools_run_in_the_sandbox_and_errors_reach_the_model() {
    let rt = sandbox().await;
    let gw = MockGateway::start(vec![(
        "m",
        vec![
            calls(vec![
                call(
                    "1",
                    "write_file",
                    r#"{"path": "p/x.py", "content": "print(6*7)\n"}"#,
                ),
                call(
                    "2",
                    "shell",
                    r#"{"command": "python3 p/x.py && echo ok >&2"}"#,
                ),
                call("3", "run_code", r#"{"code": "import sys; sys.exit(3)"}"#),
                call("4", "read_file", r#"{"path": "p/x.py"}"#),
                call("5", "read_file", r#"{"path": "missing.txt"}"#),
            ]),
            Answer::Message(json!({"role": "assistant", "content": "42 it is"})),
        ],
    )])
    .await;
    let agent = Agent::new(config(&gw.base, &rt.base, &["m"]), AgentHttp::new());
    let events = run(&agent, "t", None).await;
    let outputs: Vec<(String, bool, Value)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Tool {
                name, ok, output, ..
            } => Some((name.clone(), *ok, output.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        outputs,
        vec![
            (
                "write_file".into(),
                true,
                json!({"path": "p/x.py", "bytes": 11})
            ),
            (
                "shell".into(),
                true,
                json!({"exit_code": 0, "stdout": "42\n", "stderr": "ok\n"})
            ),
            (
                "run_code".into(),
                false,
                json!({"exit_code": 3, "stdout": "", "stderr": ""})
            ),
            (
                "read_file".into(),
                true,
                json!({"path": "p/x.py", "content": "print(6*7)\n"})
            ),
            (
                "read_file".into(),
                false,
                json!({"error": "sandbox download failed with HTTP 404: File not found"})
            ),
        ]
    );
    // A reply without tool calls is the answer.
    assert_eq!(
        events.last().unwrap(),
        &Event::Done {
            steps: 2,
            model: "m".into(),
            answer: "42 it is".into()
        }
    );
    let second = gw.request(1);
    assert_eq!(
        second["messages"][7],
        json!({"role": "tool", "tool_call_id": "5",
            "content": "{\"error\":\"sandbox download failed with HTTP 404: File not found\"}"})
    );
}

/// NDJSON lines of a `/v1/tasks` reply.
fn lines(body: &[u8]) -> Vec<Value> {
    std::str::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test]
async fn http_api_streams_ndjson_and_refuses_bad_tasks() {
    let rt = sandbox().await;
    let gw = MockGateway::start(vec![
        ("m", vec![finish_answer()]),
        ("x", vec![Answer::Status(503)]),
    ])
    .await;
    let agent = Arc::new(Agent::new(
        config(&gw.base, &rt.base, &["m"]),
        AgentHttp::new(),
    ));
    let (addr, _task) = switchyard::agent::server::spawn("127.0.0.1:0".parse().unwrap(), agent, 2)
        .await
        .unwrap();
    let client = HttpClient::new();
    let base = format!("http://{addr}");

    let r = client.get(&format!("{base}/healthz")).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (200, r#"{"status":"ok"}"#.into())
    );

    let r = client
        .post_json(
            &format!("{base}/v1/tasks"),
            &[],
            r#"{"task": "t", "model": "x", "max_steps": 2}"#,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "application/x-ndjson");
    let got = lines(&r.body);
    let types: Vec<&str> = got.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["started", "sandbox", "fallback", "assistant", "done"]
    );
    assert_eq!(got[0]["models"], json!(["x", "m"]));
    assert_eq!(got[0]["max_steps"], 2);
    assert_eq!(
        got[4],
        json!({"type": "done", "steps": 1, "model": "m", "answer": "all done"})
    );

    for (body, message) in [
        (r#"{"task": "  "}"#, "`task` is empty"),
        (r#"{"task": "t", "max_steps": 0}"#, "`max_steps` must be between 1 and 64, got 0"),
        (r#"{"task": "t", "max_steps": 65}"#, "`max_steps` must be between 1 and 64, got 65"),
        (
            r#"{"task": "t", "tools": []}"#,
            "invalid task body: unknown field `tools`, expected one of `task`, `model`, `max_steps` at line 1 column 21",
        ),
    ] {
        let r = client
            .post_json(&format!("{base}/v1/tasks"), &[], body.to_string())
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(
            serde_json::from_slice::<Value>(&r.body).unwrap(),
            json!({"error": {"message": message, "type": "invalid_request_error"}}),
            "{body}"
        );
    }
}

#[tokio::test]
async fn binary_serves_healthz_and_runs_a_task() {
    // As scripts/check-images.sh starts the image: nothing behind the URLs, /healthz answers.
    let port = support::ports::free_port().unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "agent",
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--model",
            "check",
            "--gateway-url",
            "http://127.0.0.1:9",
            "--sandbox-url",
            "http://127.0.0.1:9",
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = HttpClient::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        if let Ok(r) = client
            .get(&format!("http://127.0.0.1:{port}/healthz"))
            .await
        {
            break r.text();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent serve did not answer /healthz"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body, r#"{"status":"ok"}"#);
    child.kill().await.unwrap();

    // `agent run` prints readable steps and exits 0 on success.
    let rt = sandbox().await;
    let gw = MockGateway::start(vec![(
        "m",
        vec![
            calls(vec![call("1", "shell", r#"{"command": "echo hi"}"#)]),
            finish_answer(),
        ],
    )])
    .await;
    let out = tokio::process::Command::new(BIN)
        .args(["agent", "run", "say hi", "--model", "m", "--gateway-url"])
        .arg(&gw.base)
        .arg("--sandbox-url")
        .arg(&rt.base)
        .env_remove("INFERENCE_MODEL")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        format!(
            "task: say hi\nmodels: m (max 16 steps), sandbox: {base}\nsandbox: {base}\n\
             [1] m:\n    → shell({{\"command\": \"echo hi\"}})\n\
             [1] shell ok: {{\"exit_code\":0,\"stdout\":\"hi\\n\",\"stderr\":\"\"}}\n\
             [2] m:\n    → finish({{\"answer\": \"all done\"}})\n\
             done after 2 steps (m): all done\n",
            base = rt.base
        )
    );

    // A failing task exits non-zero with the reason.
    let out = tokio::process::Command::new(BIN)
        .args([
            "agent",
            "run",
            "t",
            "--max-steps",
            "1",
            "--model",
            "nobody",
            "--gateway-url",
        ])
        .arg(&gw.base)
        .arg("--sandbox-url")
        .arg(&rt.base)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.ends_with(
            "failed after 1 steps [refused]: model nobody refused the request: request refused with HTTP 404: {\"error\":{\"message\":\"mock 404 for nobody\"}}\n"
        ),
        "{stdout}"
    );
}
