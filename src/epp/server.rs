//! Wiring of the EPP: ext_proc and health gRPC servers, metrics HTTP, discovery, scrapers, shutdown.

/// Command-line flags of `switchyard epp`, named like the reference EPP's.
#[derive(Debug, Clone, clap::Args)]
pub struct EppArgs {
    /// ext_proc gRPC port.
    #[arg(long, default_value_t = 9002)]
    pub grpc_port: u16,
}

pub async fn run(_args: EppArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
