//! Load-test benchmarks (`switchyard bench`) and the one-command local demo (`switchyard demo`).
//!
//! - [`arrivals`]: open-loop Poisson schedules (fixed rate, ramp, bursts).
//! - [`workload`]: the synthetic workloads (shared-prefix, bursty chat, multi-turn, coding agent).
//! - [`client`] + [`load`]: the streaming OpenAI client and the open-loop driver.
//! - [`stack`] + [`epp`] + [`envoy`] + [`procs`]: local sim replicas, the EPP and Envoy as child
//!   processes ([`epp`] builds the one EPP command line; HTTP probes live in [`client`]).
//! - [`routing`]: the same workload under each routing policy; [`report`]: table, JSON, plot;
//!   [`prediction`]: the EPP's prefix-hit prediction accuracy per policy.
//! - [`overhead`]: what the ext_proc hop costs in front of a zero-latency backend.
//! - [`soak`]: the stack under steady load with churn and bad requests; RSS/FD growth.

pub mod arrivals;
pub mod cli;
pub mod client;
pub mod envoy;
pub mod epp;
pub mod load;
pub mod overhead;
pub mod prediction;
pub mod procs;
pub mod real_demo;
pub mod report;
pub mod routing;
pub mod soak;
pub mod stack;
pub mod stats;
pub mod workload;

pub use cli::{BenchArgs, DemoArgs};

/// `switchyard bench`.
pub async fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    cli::run_bench(args).await
}

/// `switchyard demo`.
pub async fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    cli::run_demo(args).await
}
