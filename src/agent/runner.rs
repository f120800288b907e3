//! The tool-calling loop of one task:
//!
//! ```text
//! open sandbox ─▶ step 1..=max_steps:
//!                   ask models in order ── 429/5xx/timeout/connect ─▶ next model
//!                     │            └─ malformed call ─▶ tell it, ask again (N times) ─▶ next model
//!                     ▼
//!                   no tool calls ─▶ done (the text is the answer)
//!                   run each call in the sandbox; `finish` ─▶ done
//!                 budget spent ─▶ failed (step_budget)
//! close sandbox (delete the claim) ─▶ final event
//! ```

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::claim::ClaimError;
use super::events::{CallView, Event};
use super::gateway::{Gateway, GatewayConfig, ModelError};
use super::http::HttpClient;
use super::openai::Message;
use super::sandbox_client::{SandboxClient, SandboxError};
use super::session::{SandboxSource, Session};
use super::tools::{self, Malformed, Tool};

/// Text of one tool result shown to the model, at most (keeps the context bounded).
const MAX_TOOL_TEXT: usize = 16 * 1024;

pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a coding agent working in a sandboxed workspace. \
Use the tools: write_file to create files, run_code or shell to run and test them, read_file and \
list_files to inspect the workspace. Test what you write. When the work is done and its tests \
pass, call finish with a short answer for the user.";

/// Validated agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Models in fallback order (never empty).
    pub models: Vec<String>,
    pub gateway: GatewayConfig,
    pub sandbox: SandboxSource,
    /// Per sandbox request.
    pub sandbox_timeout: Duration,
    /// Model steps per task unless the request asks for fewer (or more, up to `max_steps_limit`).
    pub max_steps: u32,
    pub max_steps_limit: u32,
    /// Times one model is asked again after a malformed tool call before falling back.
    pub malformed_retries: u32,
    pub system_prompt: String,
}

/// One task as the API and the CLI take it.
#[derive(Debug, Clone, Default)]
pub struct TaskRequest {
    pub task: String,
    /// Tried first, before the configured models.
    pub model: Option<String>,
    pub max_steps: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("no sandbox: {0}")]
    Sandbox(#[from] ClaimError),
    #[error("{0}")]
    SandboxLost(SandboxError),
    #[error("every model failed at step {step}: {}", join_failures(.failures))]
    Models {
        step: u32,
        failures: Vec<(String, String)>,
    },
    #[error("model {model} refused the request: {error}")]
    Refused { model: String, error: ModelError },
    #[error("step budget exhausted: {max_steps} model steps without a final answer (raise max_steps or simplify the task)")]
    StepBudget { max_steps: u32 },
    #[error("the client went away")]
    Cancelled,
}

fn join_failures(failures: &[(String, String)]) -> String {
    failures
        .iter()
        .map(|(model, reason)| format!("{model}: {reason}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl TaskError {
    pub fn kind(&self) -> &'static str {
        match self {
            TaskError::Sandbox(_) => "sandbox",
            TaskError::SandboxLost(_) => "sandbox_lost",
            TaskError::Models { .. } => "models_failed",
            TaskError::Refused { .. } => "refused",
            TaskError::StepBudget { .. } => "step_budget",
            TaskError::Cancelled => "cancelled",
        }
    }
}

/// The agent: shared by every task.
#[derive(Debug, Clone)]
pub struct Agent {
    config: AgentConfig,
    gateway: Gateway,
    http: HttpClient,
    tools: Value,
}

/// Sends events; a closed channel means the client left, which stops the task.
struct Emitter<'a>(&'a mpsc::Sender<Event>);

impl Emitter<'_> {
    async fn emit(&self, event: Event) -> Result<(), TaskError> {
        self.0.send(event).await.map_err(|_| TaskError::Cancelled)
    }
}

/// What a finished loop produced.
struct Answer {
    steps: u32,
    model: String,
    text: String,
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} more bytes]", &text[..end], text.len() - end)
}

/// Gives calls without an id (some servers omit it) a unique one, so results can refer to them.
fn fill_ids(message: &mut Message, step: u32) {
    for (i, call) in message.tool_calls.iter_mut().enumerate() {
        if call.id.is_empty() {
            call.id = format!("call_{step}_{i}");
        }
    }
}

/// The calls of a reply, parsed; empty for a plain text answer.
fn validate(message: &Message) -> Result<Vec<Tool>, Malformed> {
    if message.tool_calls.is_empty() {
        return match message.content.as_deref().map(str::trim) {
            Some(text) if !text.is_empty() => Ok(Vec::new()),
            _ => Err(Malformed::Empty),
        };
    }
    message
        .tool_calls
        .iter()
        .map(|c| Tool::parse(&c.function.name, &c.function.arguments))
        .collect()
}

impl Agent {
    pub fn new(config: AgentConfig, http: HttpClient) -> Self {
        let gateway = Gateway::new(config.gateway.clone(), http.clone());
        Self {
            config,
            gateway,
            http,
            tools: tools::definitions(),
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The models for a request, in order, without repeats.
    fn models_for(&self, request: &TaskRequest) -> Vec<String> {
        let mut models: Vec<String> = request.model.iter().cloned().collect();
        for m in &self.config.models {
            if !models.contains(m) {
                models.push(m.clone());
            }
        }
        models
    }

    /// Runs one task to its end, sending every event (the last is `done` or `failed`) to `tx`.
    pub async fn run(&self, request: TaskRequest, tx: mpsc::Sender<Event>) {
        let out = Emitter(&tx);
        let models = self.models_for(&request);
        let max_steps = request
            .max_steps
            .unwrap_or(self.config.max_steps)
            .clamp(1, self.config.max_steps_limit);
        let started = Event::Started {
            task: request.task.clone(),
            models: models.clone(),
            max_steps,
            sandbox: self.config.sandbox.describe(),
        };
        let mut steps = 0;
        let result = match out.emit(started).await {
            Err(e) => Err(e),
            Ok(()) => match Session::open(
                &self.config.sandbox,
                self.http.clone(),
                self.config.sandbox_timeout,
            )
            .await
            {
                Err(e) => Err(TaskError::Sandbox(e)),
                Ok(session) => {
                    let result = match out
                        .emit(Event::Sandbox {
                            url: session.client.base().to_string(),
                            claim: session.claim_name().map(str::to_string),
                        })
                        .await
                    {
                        Ok(()) => {
                            self.drive(
                                &session.client,
                                &request.task,
                                &models,
                                max_steps,
                                &out,
                                &mut steps,
                            )
                            .await
                        }
                        Err(e) => Err(e),
                    };
                    // Always given back, whatever the loop's outcome (the claim must not leak).
                    if let Err(e) = session.close().await {
                        tracing::warn!(error = %e, "could not release the sandbox");
                    }
                    result
                }
            },
        };
        let last = match result {
            Ok(answer) => Event::Done {
                steps: answer.steps,
                model: answer.model,
                answer: answer.text,
            },
            Err(e) => {
                tracing::debug!(error = %e, "task failed");
                Event::Failed {
                    steps,
                    kind: e.kind(),
                    message: e.to_string(),
                }
            }
        };
        let _ = tx.send(last).await;
    }

    async fn drive(
        &self,
        sandbox: &SandboxClient,
        task: &str,
        models: &[String],
        max_steps: u32,
        out: &Emitter<'_>,
        steps: &mut u32,
    ) -> Result<Answer, TaskError> {
        let mut messages = vec![
            Message::text("system", self.config.system_prompt.clone()),
            Message::text("user", task),
        ];
        for step in 1..=max_steps {
            *steps = step;
            let (model, reply, calls) = self.ask(step, &messages, models, out).await?;
            out.emit(Event::Assistant {
                step,
                model: model.clone(),
                content: reply.content.clone(),
                tool_calls: reply
                    .tool_calls
                    .iter()
                    .map(|c| CallView {
                        name: c.function.name.clone(),
                        arguments: c.function.arguments.clone(),
                    })
                    .collect(),
            })
            .await?;
            if calls.is_empty() {
                return Ok(Answer {
                    steps: step,
                    model,
                    text: reply.content.unwrap_or_default(),
                });
            }
            let ids: Vec<String> = reply.tool_calls.iter().map(|c| c.id.clone()).collect();
            messages.push(reply);
            for (tool, id) in calls.into_iter().zip(ids) {
                if let Tool::Finish { answer } = tool {
                    return Ok(Answer {
                        steps: step,
                        model,
                        text: answer,
                    });
                }
                let (name, ok, output) = self.run_tool(sandbox, &tool).await?;
                out.emit(Event::Tool {
                    step,
                    name,
                    ok,
                    output: output.clone(),
                })
                .await?;
                let text = match &output {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                messages.push(Message::tool_result(&id, truncate(&text, MAX_TOOL_TEXT)));
            }
        }
        Err(TaskError::StepBudget { max_steps })
    }

    /// One step's reply: the models in order, with retries after malformed calls.
    async fn ask(
        &self,
        step: u32,
        messages: &[Message],
        models: &[String],
        out: &Emitter<'_>,
    ) -> Result<(String, Message, Vec<Tool>), TaskError> {
        let mut failures = Vec::new();
        for (i, model) in models.iter().enumerate() {
            // Feedback about malformed calls goes to this model only; the next starts clean.
            let mut attempt_messages = messages.to_vec();
            let mut retries = 0;
            let reason = loop {
                let mut reply = match self
                    .gateway
                    .complete(model, &attempt_messages, &self.tools)
                    .await
                {
                    Ok(reply) => reply,
                    Err(error) if !error.falls_back() => {
                        return Err(TaskError::Refused {
                            model: model.clone(),
                            error,
                        })
                    }
                    Err(error) => break error.to_string(),
                };
                fill_ids(&mut reply, step);
                let problem = match validate(&reply) {
                    Ok(calls) => return Ok((model.clone(), reply, calls)),
                    Err(problem) => problem,
                };
                if retries >= self.config.malformed_retries {
                    break format!("malformed tool call after {retries} retries: {problem}");
                }
                retries += 1;
                out.emit(Event::Retry {
                    step,
                    model: model.clone(),
                    attempt: retries,
                    reason: problem.to_string(),
                })
                .await?;
                let feedback = format!("error: {problem}. Call one of the tools with valid JSON arguments, or answer in text.");
                if reply.tool_calls.is_empty() {
                    attempt_messages.push(reply);
                    attempt_messages.push(Message::text("user", feedback));
                } else {
                    let ids: Vec<String> = reply.tool_calls.iter().map(|c| c.id.clone()).collect();
                    attempt_messages.push(reply);
                    for id in ids {
                        attempt_messages.push(Message::tool_result(&id, feedback.clone()));
                    }
                }
            };
            tracing::debug!(%model, step, %reason, "falling back");
            out.emit(Event::Fallback {
                step,
                from: model.clone(),
                to: models.get(i + 1).cloned(),
                reason: reason.clone(),
            })
            .await?;
            failures.push((model.clone(), reason));
        }
        Err(TaskError::Models { step, failures })
    }

    /// Runs one call in the sandbox: (tool name, ok, output). Errors the model can act on are
    /// an output with `ok: false`; a sandbox that cannot be reached ends the task.
    async fn run_tool(
        &self,
        sandbox: &SandboxClient,
        tool: &Tool,
    ) -> Result<(String, bool, Value), TaskError> {
        let fail = |name: &str, e: SandboxError| -> Result<(String, bool, Value), TaskError> {
            if e.is_fatal() {
                Err(TaskError::SandboxLost(e))
            } else {
                Ok((name.to_string(), false, json!({"error": e.to_string()})))
            }
        };
        match tool {
            Tool::RunCode { .. } | Tool::Shell { .. } => {
                let name = if matches!(tool, Tool::Shell { .. }) {
                    "shell"
                } else {
                    "run_code"
                };
                let command = match tool.command_line() {
                    Some(Ok(c)) => c,
                    Some(Err(reason)) => {
                        return Ok((name.into(), false, json!({ "error": reason })))
                    }
                    None => return Ok((name.into(), false, json!({"error": "not a command"}))),
                };
                match sandbox.execute(&command).await {
                    Ok(r) => Ok((
                        name.into(),
                        r.exit_code == 0,
                        json!({
                            "exit_code": r.exit_code,
                            "stdout": truncate(&r.stdout, MAX_TOOL_TEXT / 2),
                            "stderr": truncate(&r.stderr, MAX_TOOL_TEXT / 2),
                        }),
                    )),
                    Err(e) => fail(name, e),
                }
            }
            Tool::WriteFile { path, content } => {
                match sandbox.upload(path, content.as_bytes()).await {
                    Ok(()) => Ok((
                        "write_file".into(),
                        true,
                        json!({"path": path, "bytes": content.len()}),
                    )),
                    Err(e) => fail("write_file", e),
                }
            }
            Tool::ReadFile { path } => match sandbox.download(path).await {
                Ok(bytes) => Ok((
                    "read_file".into(),
                    true,
                    json!({"path": path, "content": truncate(&String::from_utf8_lossy(&bytes), MAX_TOOL_TEXT)}),
                )),
                Err(e) => fail("read_file", e),
            },
            Tool::ListFiles { path } => match sandbox.list(path).await {
                Ok(entries) => Ok((
                    "list_files".into(),
                    true,
                    json!({"path": path, "entries": entries.iter().take(500).map(|e| json!({
                        "name": e.name, "type": e.kind, "size": e.size})).collect::<Vec<_>>()}),
                )),
                Err(e) => fail("list_files", e),
            },
            Tool::Finish { answer } => Ok(("finish".into(), true, json!({ "answer": answer }))),
        }
    }
}
