//! `switchyard`: one binary, one subcommand per part of the stack.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about = "Inference routing stack for Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Envoy ext_proc Endpoint Picker (drop-in for the Gateway API Inference Extension EPP).
    Epp(Box<switchyard::epp::server::EppArgs>),
    /// Decode server with an OpenAI-compatible API and vLLM-compatible metrics.
    Serve(Box<switchyard::serve::ServeArgs>),
}

fn main() -> anyhow::Result<()> {
    // Go's flag package accepts `-flag` as well as `--flag`; the reference chart's args may use
    // either, so single-dash long flags are normalised before clap sees them.
    let args = std::env::args_os().map(|a| match a.to_str() {
        Some(s) if s.len() > 2 && s.starts_with('-') && !s.starts_with("--") && s.as_bytes()[1].is_ascii_alphabetic() && s[1..].chars().nth(1).is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '=') => {
            std::ffi::OsString::from(format!("-{s}"))
        }
        _ => a,
    });
    let cli = Cli::parse_from(args);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Epp(args) => runtime.block_on(switchyard::epp::server::run(*args)),
        Command::Serve(args) => runtime.block_on(switchyard::serve::run(*args)),
    }
}
