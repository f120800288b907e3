//! `switchyard agent`: a code-generation agent. It asks the gateway (OpenAI tool calling) for
//! the next step, runs the tool calls in a sandbox (agent-sandbox runtime API), and streams the
//! steps. See `docs/agent.md`.
//!
//! ```text
//! config          flags / chart environment → AgentConfig
//! runner          the tool loop: model fallback, malformed-call retries, step budget
//! gateway         one chat completion, failures sorted for the fallback list
//! openai          chat-completions wire types
//! tools           tool schemas and the parse of a call
//! session         a task's sandbox: --sandbox-url, or a claim through the router
//! claim           SandboxClaim lifecycle (kube-rs dynamic API)
//! discovery       the gateway's URL from its Gateway's status (no --gateway-url)
//! sandbox_client  the runtime API client (/execute, /upload, /download, /list)
//! server          GET /healthz, POST /v1/tasks (NDJSON events)
//! events          the events a task reports
//! http            the HTTP client with deadlines and body caps
//! ```

pub mod claim;
pub mod config;
pub mod discovery;
pub mod events;
pub mod gateway;
pub mod http;
pub mod openai;
pub mod runner;
pub mod sandbox_client;
pub mod server;
pub mod session;
pub mod tools;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::mpsc;

use self::config::AgentOptions;
use self::events::Event;
use self::runner::{Agent, TaskRequest};
use crate::process::{init_logging, shutdown_signal, LogFormat};

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: AgentCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum AgentCommand {
    /// Serves GET /healthz and POST /v1/tasks (NDJSON step events).
    Serve(Box<ServeArgs>),
    /// Runs one task and prints its steps.
    Run(Box<RunArgs>),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to serve the API on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Tasks running at once; more get 429.
    #[arg(long, default_value_t = 4)]
    pub max_tasks: usize,
    #[command(flatten)]
    pub options: AgentOptions,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// What to do, e.g. "write fizzbuzz and test it".
    pub task: String,
    /// Print the raw NDJSON events instead of readable lines.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub options: AgentOptions,
}

fn log_format(text: &str) -> anyhow::Result<LogFormat> {
    match text {
        "console" => Ok(LogFormat::Console),
        "json" => Ok(LogFormat::Json),
        other => anyhow::bail!("--log-format: `{other}` (use console or json)"),
    }
}

async fn agent(options: &AgentOptions) -> anyhow::Result<Agent> {
    let config = options
        .build(|| async {
            crate::epp::kube_client::client_from_env()
                .await
                .map_err(|e| e.to_string())
        })
        .await?;
    Ok(Agent::new(config, self::http::HttpClient::new()))
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    match args.command {
        AgentCommand::Serve(args) => serve(*args).await,
        AgentCommand::Run(args) => run_once(*args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging("info", log_format(&args.options.log_format)?);
    let agent = Arc::new(agent(&args.options).await?);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        models = ?agent.config().models,
        sandbox = %agent.config().sandbox.describe(),
        "agent serving"
    );
    server::serve(listener, agent, args.max_tasks, async {
        let signal = shutdown_signal().await;
        tracing::info!(?signal, "shutting down");
    })
    .await?;
    Ok(())
}

/// One readable line per event.
pub fn describe(event: &Event) -> String {
    match event {
        Event::Started {
            task,
            models,
            max_steps,
            sandbox,
        } => format!(
            "task: {task}\nmodels: {} (max {max_steps} steps), sandbox: {sandbox}",
            models.join(", ")
        ),
        Event::Sandbox { url, claim } => match claim {
            Some(c) => format!("sandbox ready: claim {c} via {url}"),
            None => format!("sandbox: {url}"),
        },
        Event::Fallback {
            step,
            from,
            to,
            reason,
        } => format!(
            "[{step}] {from} failed ({reason}); {}",
            to.as_deref()
                .map(|t| format!("trying {t}"))
                .unwrap_or_else(|| "no model left".into())
        ),
        Event::Retry {
            step,
            model,
            attempt,
            reason,
        } => format!("[{step}] {model}: malformed tool call ({reason}), retry {attempt}"),
        Event::Assistant {
            step,
            model,
            content,
            tool_calls,
        } => {
            let mut s = format!("[{step}] {model}:");
            if let Some(c) = content.as_deref().filter(|c| !c.trim().is_empty()) {
                s.push_str(&format!(" {}", c.trim()));
            }
            for call in tool_calls {
                s.push_str(&format!("\n    → {}({})", call.name, call.arguments));
            }
            s
        }
        Event::Tool {
            step,
            name,
            ok,
            output,
        } => format!(
            "[{step}] {name} {}: {output}",
            if *ok { "ok" } else { "failed" }
        ),
        Event::Done {
            steps,
            model,
            answer,
        } => format!("done after {steps} steps ({model}): {answer}"),
        Event::Failed {
            steps,
            kind,
            message,
        } => format!("failed after {steps} steps [{kind}]: {message}"),
    }
}

async fn run_once(args: RunArgs) -> anyhow::Result<()> {
    init_logging("warn", log_format(&args.options.log_format)?);
    let agent = agent(&args.options).await?;
    let (tx, mut rx) = mpsc::channel(64);
    let request = TaskRequest {
        task: args.task,
        model: None,
        max_steps: None,
    };
    let task = tokio::spawn(async move { agent.run(request, tx).await });
    let mut failed = None;
    while let Some(event) = rx.recv().await {
        if args.json {
            print!("{}", event.to_line());
        } else {
            println!("{}", describe(&event));
        }
        if let Event::Failed { kind, .. } = &event {
            failed = Some(*kind);
        }
    }
    task.await.context("agent task")?;
    match failed {
        Some(kind) => anyhow::bail!("the task failed ({kind})"),
        None => Ok(()),
    }
}
