//! `switchyard agent` end to end on loopback: the agent's HTTP API → real Envoy → `switchyard
//! epp` → `switchyard serve --backend sim --sim-script` (a scripted tool-calling model: the tiny
//! tokenizer with a Hermes tool template, answering with the script below) → a real `switchyard
//! sandbox` runtime. The model writes fizzbuzz and its test, runs the test, and finishes; the
//! files are in the sandbox workspace and the test's own output proves the sandbox ran it.
//!
//! Envoy comes from `scripts/install-test-deps.sh`; without it this prints `SKIPPED:` (and fails
//! under CI=true).

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::sandbox::SandboxRuntime;
use support::{
    tools, BodyMode, EnvoyConfig, EnvoyProcess, EppOptions, EppProcess, HttpClient, RouteCluster,
};
use switchyard::agent::gateway::GatewayConfig;
use switchyard::agent::http::HttpClient as AgentHttp;
use switchyard::agent::runner::{Agent, AgentConfig, DEFAULT_SYSTEM_PROMPT};
use switchyard::agent::session::SandboxSource;
use switchyard::serve::model::testing::{
    set_chat_template, write_tiny_qwen2_with, TinyQwen2, TINY_TOOL_CHAT_TEMPLATE,
};
use switchyard::serve::{self, ServeArgs};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

const FIZZBUZZ: &str = "def fizzbuzz(n):\n    if n % 15 == 0:\n        return \"FizzBuzz\"\n    if n % 3 == 0:\n        return \"Fizz\"\n    if n % 5 == 0:\n        return \"Buzz\"\n    return str(n)\n";

const TEST: &str = "from fizzbuzz import fizzbuzz\nwant = [\"1\", \"2\", \"Fizz\", \"4\", \"Buzz\", \"Fizz\", \"7\", \"8\", \"Fizz\", \"Buzz\", \"11\", \"Fizz\", \"13\", \"14\", \"FizzBuzz\"]\ngot = [fizzbuzz(i) for i in range(1, 16)]\nassert got == want, got\nopen(\"result.txt\", \"w\").write(\"passed\")\nprint(\"15 checks passed\")\n";

/// The model's calls: (name, arguments JSON text as the model writes it).
fn script_calls() -> Vec<(&'static str, String)> {
    vec![
        (
            "write_file",
            json!({"path": "fizzbuzz.py", "content": FIZZBUZZ}).to_string(),
        ),
        (
            "write_file",
            json!({"path": "test_fizzbuzz.py", "content": TEST}).to_string(),
        ),
        (
            "shell",
            json!({"command": "python3 test_fizzbuzz.py"}).to_string(),
        ),
        (
            "finish",
            json!({"answer": "fizzbuzz.py written; test_fizzbuzz.py passes"}).to_string(),
        ),
    ]
}

/// Hermes tool-call blocks, as Qwen models write them.
fn script() -> String {
    script_calls()
        .iter()
        .map(|(name, args)| {
            format!("<tool_call>\n{{\"name\": \"{name}\", \"arguments\": {args}}}\n</tool_call>")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ndjson(body: &[u8]) -> Vec<Value> {
    std::str::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test]
async fn agent_writes_and_tests_fizzbuzz_through_envoy_epp_and_sandbox() {
    let envoy_bin = require_tool!(tools::envoy(), "envoy");

    // The decode server: sim backend answering the script, with the tiny tool-aware tokenizer.
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2_with(
        dir.path(),
        &TinyQwen2 {
            max_position_embeddings: 16384,
            ..TinyQwen2::default()
        },
    )
    .unwrap();
    set_chat_template(dir.path(), TINY_TOOL_CHAT_TEMPLATE).unwrap();
    let script_file = dir.path().join("script.txt");
    std::fs::write(&script_file, script()).unwrap();
    let mut args = ServeArgs::sim_for_tests("l4-qwen2.5-7b", 0.001);
    args.model = Some(dir.path().to_path_buf());
    args.sim_script = Some(script_file);
    args.max_model_len = Some(16384);
    args.served_model_name = vec!["qwen-coder".into()];
    let server = serve::start(args).await.unwrap();

    let epp = EppProcess::start(&EppOptions::new(vec![server.http_addr]))
        .await
        .unwrap();
    let envoy = EnvoyProcess::start(
        &envoy_bin,
        &EnvoyConfig {
            epp_port: epp.grpc_port,
            epp_health_port: epp.health_port,
            failure_mode_allow: false,
            request_body_mode: BodyMode::FullDuplexStreamed,
            route: RouteCluster::InferencePool,
            pool: vec![server.http_addr],
        },
    )
    .await
    .unwrap();
    let rt = SandboxRuntime::start(BIN.as_ref(), &[], &[]).await.unwrap();

    let agent = Arc::new(Agent::new(
        AgentConfig {
            models: vec!["qwen-coder".into()],
            gateway: GatewayConfig {
                url: envoy.url(""),
                timeout: Duration::from_secs(60),
                temperature: 0.0,
                max_tokens: Some(2048),
            },
            sandbox: SandboxSource::Direct {
                url: rt.base.clone(),
            },
            sandbox_timeout: Duration::from_secs(60),
            max_steps: 4,
            max_steps_limit: 16,
            malformed_retries: 1,
            system_prompt: DEFAULT_SYSTEM_PROMPT.into(),
        },
        AgentHttp::new(),
    ));
    let (addr, _serving) =
        switchyard::agent::server::spawn("127.0.0.1:0".parse().unwrap(), agent, 1)
            .await
            .unwrap();

    let task = "write fizzbuzz and test it";
    let r = HttpClient::new()
        .post_json(
            &format!("http://{addr}/v1/tasks"),
            &[],
            json!({ "task": task }).to_string(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let events = ndjson(&r.body);
    let calls: Vec<Value> = script_calls()
        .into_iter()
        .map(|(name, arguments)| json!({"name": name, "arguments": arguments}))
        .collect();
    let expected = vec![
        json!({"type": "started", "task": task, "models": ["qwen-coder"], "max_steps": 4,
            "sandbox": rt.base}),
        json!({"type": "sandbox", "url": rt.base, "claim": null}),
        json!({"type": "assistant", "step": 1, "model": "qwen-coder", "content": null,
            "tool_calls": calls}),
        json!({"type": "tool", "step": 1, "name": "write_file", "ok": true,
            "output": {"path": "fizzbuzz.py", "bytes": FIZZBUZZ.len()}}),
        json!({"type": "tool", "step": 1, "name": "write_file", "ok": true,
            "output": {"path": "test_fizzbuzz.py", "bytes": TEST.len()}}),
        json!({"type": "tool", "step": 1, "name": "shell", "ok": true,
            "output": {"exit_code": 0, "stdout": "15 checks passed\n", "stderr": ""}}),
        json!({"type": "done", "steps": 1, "model": "qwen-coder",
            "answer": "fizzbuzz.py written; test_fizzbuzz.py passes"}),
    ];
    assert_eq!(
        events,
        expected,
        "{}\nenvoy:\n{}\nepp:\n{}",
        r.text(),
        envoy.logs(),
        epp.logs()
    );

    // The files are in the sandbox's workspace, and the test ran there (it wrote its result).
    assert_eq!(
        std::fs::read_to_string(rt.workspace.join("fizzbuzz.py")).unwrap(),
        FIZZBUZZ
    );
    assert_eq!(
        std::fs::read_to_string(rt.workspace.join("test_fizzbuzz.py")).unwrap(),
        TEST
    );
    assert_eq!(
        std::fs::read_to_string(rt.workspace.join("result.txt")).unwrap(),
        "passed"
    );
    // The request went through Envoy and the EPP to the decode server.
    assert_eq!(
        envoy
            .stat("http.inference_gateway.ext_proc.streams_started")
            .await
            .unwrap(),
        Some(1)
    );
    server.shutdown(Duration::from_secs(1)).await;
}
