//! Decode server: OpenAI-compatible HTTP API and vLLM-compatible metrics over one engine
//! (paged KV cache, prefix caching, continuous batching) and pluggable backends.

pub mod api;
pub mod approx_codec;
pub mod backend;
pub mod codec;
pub mod engine;
pub mod kv_events;
pub mod metrics;
pub mod model;

/// Command-line flags of `switchyard serve` (named like vLLM's where they overlap).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// HTTP port.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
}

/// Runs the decode server until shutdown.
pub async fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("switchyard serve is not implemented yet")
}
