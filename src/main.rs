//! `switchyard`: one binary, one subcommand per part of the stack.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Inference routing stack for Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Envoy ext_proc Endpoint Picker (drop-in for the Gateway API Inference Extension EPP).
    Epp(Box<switchyard::epp::args::EppArgs>),
    /// Body-based routing ext_proc: body `model` → `X-Gateway-Model-Name` for HTTPRoutes.
    Bbr(Box<switchyard::bbr::BbrArgs>),
    /// Decode server with an OpenAI-compatible API and vLLM-compatible metrics.
    Serve(Box<switchyard::serve::ServeArgs>),
    /// Open-loop load generator and routing benchmarks.
    Bench(Box<switchyard::bench::BenchArgs>),
    /// Local stack on an embedded default: sim replicas, the EPP and Envoy, compared live.
    Demo(Box<switchyard::bench::DemoArgs>),
    /// Code-generation agent: OpenAI tool loop through the gateway, model fallback, sandboxes.
    Agent(Box<switchyard::agent::AgentArgs>),
    /// Agent-sandbox runtime API on 8888: contained command execution and workspace files.
    Sandbox(Box<switchyard::sandbox::SandboxArgs>),
    /// agent-sandbox's sandbox router: forwards a request to the sandbox named in X-Sandbox-ID.
    SandboxRouter(Box<switchyard::sandbox::router::RouterArgs>),
    /// Runs one command contained (started by `switchyard sandbox` per /execute).
    #[command(hide = true)]
    SandboxExec(Box<switchyard::sandbox::supervise::SuperviseArgs>),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The supervisor must stay single-threaded until it has entered its namespaces: no async
    // runtime for it.
    if let Command::SandboxExec(args) = cli.command {
        std::process::exit(switchyard::sandbox::supervise::main(*args));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Epp(args) => Ok(runtime.block_on(switchyard::epp::run(*args))?),
        Command::Bbr(args) => Ok(runtime.block_on(switchyard::bbr::run(*args))?),
        Command::Serve(args) => runtime.block_on(switchyard::serve::run(*args)),
        Command::Bench(args) => runtime.block_on(switchyard::bench::run_bench(*args)),
        Command::Demo(args) => runtime.block_on(switchyard::bench::run_demo(*args)),
        Command::Agent(args) => runtime.block_on(switchyard::agent::run(*args)),
        Command::Sandbox(args) => runtime.block_on(switchyard::sandbox::run(*args)),
        Command::SandboxRouter(args) => runtime.block_on(switchyard::sandbox::router::run(*args)),
        // Ran above, before the runtime existed.
        Command::SandboxExec(_) => Ok(()),
    }
}
