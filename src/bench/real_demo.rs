//! `switchyard demo --model real`: the real Qwen2.5-Coder GGUF on `cpu` replicas behind Envoy and
//! the EPP (default config), a few coding questions sharing a system prompt, each asked twice;
//! prints every answer and the routing table (which replica served it, how much of its prompt
//! that replica already held).
//!
//! Requests go one at a time, so the replica that served a request is the one whose finished
//! count moved, and each replica can use every core.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

use super::client::{self, HttpClient};
use super::procs::ScratchDir;
use super::routing::Policy;
use super::stack::{self, ReplicaSpec, Stack};

/// What `--model` names to ask for this demo.
pub const REAL: &str = "real";
/// Where `scripts/fetch-model.sh` puts the model.
pub const DEFAULT_GGUF: &str = ".cache/models/qwen2.5-coder-0.5b-instruct.gguf";
/// The name the replicas serve it under.
const SERVED_NAME: &str = "qwen2.5-coder-0.5b-instruct";
/// One answer on two shared cores takes seconds; a stuck one is a failure, not a wait.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Shared by every request: the prefix the EPP should keep on one replica.
const SYSTEM: &str = "You are a senior Rust engineer reviewing code for a high-throughput \
inference router. Answer in at most three sentences. Prefer the standard library and the \
well-kept crates of the ecosystem (tokio, hyper, serde). Say why, briefly.";

const QUESTIONS: [&str; 3] = [
    "Write a Rust function that returns the n-th Fibonacci number iteratively.",
    "How do I read a file line by line in Rust?",
    "What does the ? operator do in Rust?",
];

/// One answered request of the demo.
#[derive(Debug, Clone)]
pub struct DemoRow {
    pub question: usize,
    pub replica: usize,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub seconds: f64,
    pub text: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RealDemoError {
    #[error(
        "the model file {0} does not exist: run scripts/fetch-model.sh (491 MB from PyPI) or pass --model-file"
    )]
    NoModel(PathBuf),
    #[error("request {0}: {1}")]
    Request(usize, String),
    #[error("request {0}: no replica's finished count moved (or more than one did)")]
    Unattributed(usize),
}

/// Runs the demo: starts the stack, asks every question twice, stops everything.
pub async fn run(
    bin: &Path,
    envoy: &Path,
    model_file: &Path,
    replicas: usize,
    max_tokens: u32,
    keep_logs: bool,
) -> anyhow::Result<Vec<DemoRow>> {
    if !model_file.is_file() {
        return Err(RealDemoError::NoModel(model_file.to_owned()).into());
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let spec = ReplicaSpec {
        count: replicas,
        sim_profile: String::new(),
        time_scale: 1.0,
        model: SERVED_NAME.to_owned(),
        extra_args: Vec::new(),
        gguf: Some((model_file.to_owned(), threads)),
    };
    let scratch = ScratchDir::new("switchyard-demo-real", keep_logs)?;
    if keep_logs {
        eprintln!("logs and configs in {}", scratch.path().display());
    }
    let gateway = Policy::EppDefault.gateway();
    let stack = Stack::start(bin, envoy, &spec, &gateway, scratch.path(), "real").await?;
    let rows = ask_all(&stack, max_tokens).await;
    stack.stop().await;
    rows
}

async fn ask_all(stack: &Stack, max_tokens: u32) -> anyhow::Result<Vec<DemoRow>> {
    let http = client::http_client();
    let url = format!("http://{}/v1/chat/completions", stack.gateway);
    let order = (0..QUESTIONS.len()).chain(0..QUESTIONS.len());
    let mut rows = Vec::new();
    for (i, question) in order.enumerate() {
        let before = stack.replica_counters().await?;
        let start = Instant::now();
        let body = chat_body(QUESTIONS[question], max_tokens);
        let answer = post_json(&http, &url, body)
            .await
            .map_err(|e| RealDemoError::Request(i, e))?;
        let seconds = start.elapsed().as_secs_f64();
        let after = stack.replica_counters().await?;
        let moved: Vec<usize> = after
            .iter()
            .zip(&before)
            .enumerate()
            .filter(|(_, (a, b))| a.since(b).requests > 0.0)
            .map(|(r, _)| r)
            .collect();
        let [replica] = moved[..] else {
            return Err(RealDemoError::Unattributed(i).into());
        };
        let usage = &answer["usage"];
        let row = DemoRow {
            question,
            replica,
            prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
            cached_tokens: usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0),
            completion_tokens: usage["completion_tokens"].as_u64().unwrap_or(0),
            seconds,
            text: answer["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        };
        eprintln!(
            "  request {}: question {} -> replica {} in {:.1} s",
            i + 1,
            question + 1,
            replica,
            seconds
        );
        rows.push(row);
    }
    Ok(rows)
}

/// A greedy chat request: the same question gets the same answer wherever it runs.
fn chat_body(question: &str, max_tokens: u32) -> Bytes {
    let body = json!({
        "model": SERVED_NAME,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    });
    Bytes::from(body.to_string())
}

async fn post_json(http: &HttpClient, url: &str, body: Bytes) -> Result<Value, String> {
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let work = async {
        let resp = http.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = http_body_util::Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if status != http::StatusCode::OK {
            return Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("bad JSON: {e}"))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .map_err(|_| format!("timed out after {REQUEST_TIMEOUT:?}"))?
}

/// The answers, then the routing table (markdown).
pub fn render(rows: &[DemoRow]) -> String {
    let mut out = String::new();
    for (i, q) in QUESTIONS.iter().enumerate() {
        out.push_str(&format!("### Q{}: {q}\n\n", i + 1));
        if let Some(r) = rows.iter().find(|r| r.question == i) {
            out.push_str(r.text.trim());
            out.push_str("\n\n");
        }
    }
    out.push_str(
        "| request | question | replica | prompt tokens | cached tokens | completion tokens | seconds | answer |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (i, r) in rows.iter().enumerate() {
        // A repeat must answer exactly as the first ask did (greedy decoding).
        let first = rows.iter().position(|f| f.question == r.question);
        let answer = match first {
            Some(f) if f < i && rows[f].text == r.text => {
                "same as request ".to_owned() + &(f + 1).to_string()
            }
            Some(f) if f < i => "DIFFERS from request ".to_owned() + &(f + 1).to_string(),
            _ => "first".to_owned(),
        };
        out.push_str(&format!(
            "| {} | Q{} | {} | {} | {} | {} | {:.1} | {answer} |\n",
            i + 1,
            r.question + 1,
            r.replica,
            r.prompt_tokens,
            r.cached_tokens,
            r.completion_tokens,
            r.seconds
        ));
    }
    out
}

/// `switchyard demo --model real` from the demo's flags.
pub async fn run_from_flags(
    setup: &super::cli::SetupArgs,
    model_file: &Path,
    max_tokens: u32,
) -> anyhow::Result<String> {
    let envoy = super::envoy::ensure_envoy(setup.envoy.as_deref()).await?;
    let bin = stack::switchyard_bin(setup.switchyard_bin.as_deref())?;
    eprintln!(
        "switchyard demo --model real: {} cpu replicas of {} behind Envoy + EPP (Ctrl-C stops everything)",
        setup.replicas,
        model_file.display()
    );
    let rows = run(
        &bin,
        &envoy,
        model_file,
        setup.replicas,
        max_tokens,
        setup.keep_logs,
    )
    .await?;
    Ok(render(&rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_each_answer_once_and_every_request() {
        let row = |question, replica, cached, text: &str| DemoRow {
            question,
            replica,
            prompt_tokens: 60,
            cached_tokens: cached,
            completion_tokens: 8,
            seconds: 1.5,
            text: text.to_owned(),
        };
        let rows = vec![
            row(0, 1, 0, " fib "),
            row(0, 1, 48, " fib "),
            row(0, 0, 0, "other"),
        ];
        let text = render(&rows);
        assert!(text.starts_with(&format!("### Q1: {}\n\nfib\n\n### Q2:", QUESTIONS[0])));
        assert!(text.ends_with(
            "| 1 | Q1 | 1 | 60 | 0 | 8 | 1.5 | first |\n\
             | 2 | Q1 | 1 | 60 | 48 | 8 | 1.5 | same as request 1 |\n\
             | 3 | Q1 | 0 | 60 | 0 | 8 | 1.5 | DIFFERS from request 1 |\n"
        ));
    }

    #[test]
    fn the_request_is_greedy_and_carries_the_shared_system_prompt() {
        let v: Value = serde_json::from_slice(&chat_body("q?", 7)).unwrap();
        assert_eq!(
            v,
            json!({"model": SERVED_NAME, "max_tokens": 7, "temperature": 0,
                   "messages": [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": "q?"}]})
        );
    }
}
