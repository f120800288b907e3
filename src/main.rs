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
    /// Decode server with an OpenAI-compatible API and vLLM-compatible metrics.
    Serve(Box<switchyard::serve::ServeArgs>),
    /// Open-loop load generator and routing benchmarks.
    Bench(Box<switchyard::bench::BenchArgs>),
    /// Local stack on an embedded default: sim replicas, the EPP and Envoy, compared live.
    Demo(Box<switchyard::bench::DemoArgs>),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Epp(args) => Ok(runtime.block_on(switchyard::epp::run(*args))?),
        Command::Serve(args) => runtime.block_on(switchyard::serve::run(*args)),
        Command::Bench(args) => runtime.block_on(switchyard::bench::run_bench(*args)),
        Command::Demo(args) => runtime.block_on(switchyard::bench::run_demo(*args)),
    }
}
