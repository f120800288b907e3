//! Load-test benchmarks (`switchyard bench`) and the one-command local demo (`switchyard demo`).

/// Flags of `switchyard bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {}

/// Flags of `switchyard demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {}

pub async fn run_bench(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("switchyard bench is not implemented yet")
}

pub async fn run_demo(_args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("switchyard demo is not implemented yet")
}
