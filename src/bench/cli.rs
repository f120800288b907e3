//! Flags of `switchyard bench` and `switchyard demo`, turned into a validated workload, rate and
//! replica setup, and the two entry points.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use super::arrivals::{Arrivals, RateShape};
use super::load::{LoadOptions, Scheduled};
use super::procs::ScratchDir;
use super::report::{self, Machine, RunInfo};
use super::routing::{self, Comparison, Policy, PolicyResult};
use super::stack::{self, ReplicaSpec};
use super::workload::{
    completion_body_with_priority, engine_priority, PlannedRequest, Workload, INTERACTIVE_OBJECTIVE,
};
use crate::process::{self, LogFormat, Signal};
use crate::serve::engine::SchedulingPolicy;

/// Flags of `switchyard bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// Same workload, same replicas, each routing policy in turn (Envoy round-robin and
    /// least-request, EPP random, default and 3:5:2); table, JSON and plot to --out-dir.
    Routing(Box<RoutingArgs>),
    /// Drive a workload against an existing OpenAI-compatible endpoint and print its latencies.
    Run(Box<RunArgs>),
    /// Envoy with and without the EPP's ext_proc in front of a zero-latency backend.
    Overhead(Box<super::overhead::OverheadArgs>),
    /// The stack at a fixed rate for a fixed time with replica restarts and bad requests;
    /// fails when RSS, open FDs or the EPP's /metrics keep growing after the warm-up.
    Soak(Box<super::soak::SoakArgs>),
}

/// Scaled presets of the shared-prefix comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Seconds per policy: the test suite's ordering check and the demo's default.
    Ci,
    /// The documented run: the reference prompt shape (6000/1200 tokens) with 48 groups and
    /// 64 output tokens, about a minute per policy.
    Small,
    /// The reference shape: 150 groups × 5 prompts, 6000/1200/1000 tokens.
    Full,
}

/// Which workload the flags describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadKind {
    SharedPrefix,
    BurstyChat,
    MultiTurn,
    CodingAgent,
    /// Interactive requests at a steady rate under bursts of sheddable batch requests.
    MixedPriority,
}

/// Workload, arrival and size flags shared by `bench routing`, `bench run` and `demo`. Rates
/// and durations are in simulated seconds (scaled by the replicas' `--time-scale`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WorkloadArgs {
    /// Shared-prefix preset (sizes, rate and time scale); individual flags still override it.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Workload shape (ignored with --workload-file).
    #[arg(long, value_enum)]
    pub workload: Option<WorkloadKind>,
    /// YAML file: `workload: {kind: shared-prefix, groups: ..}`, `rate: {kind: constant, rate: ..}`,
    /// optional `duration_s`, `max_requests`, `seed`.
    #[arg(long)]
    pub workload_file: Option<PathBuf>,
    #[arg(long)]
    pub groups: Option<u32>,
    #[arg(long)]
    pub prompts_per_group: Option<u32>,
    #[arg(long)]
    pub system_tokens: Option<u32>,
    #[arg(long)]
    pub question_tokens: Option<u32>,
    #[arg(long)]
    pub output_tokens: Option<u32>,
    /// Requests (bursty-chat, coding-agent).
    #[arg(long)]
    pub requests: Option<u32>,
    #[arg(long)]
    pub prompt_tokens_min: Option<u32>,
    #[arg(long)]
    pub prompt_tokens_max: Option<u32>,
    #[arg(long)]
    pub conversations: Option<u32>,
    #[arg(long)]
    pub turns: Option<u32>,
    #[arg(long)]
    pub user_tokens: Option<u32>,
    #[arg(long)]
    pub repos: Option<u32>,
    #[arg(long)]
    pub repo_tokens: Option<u32>,
    #[arg(long)]
    pub edit_tokens: Option<u32>,
    /// Interactive requests (mixed-priority).
    #[arg(long)]
    pub interactive_requests: Option<u32>,
    /// Interactive requests per simulated second (mixed-priority; --rate shapes the batch).
    #[arg(long)]
    pub interactive_rate: Option<f64>,
    /// Sheddable batch requests (mixed-priority).
    #[arg(long)]
    pub batch_requests: Option<u32>,
    /// Replicas' `--scheduling-policy` (default: `priority` for mixed-priority, else the
    /// server's `fcfs`). Under `priority` requests that carry an objective also carry vLLM's body
    /// `priority` (interactive 0, batch 1); `fcfs` reproduces runs before the replicas had it.
    #[arg(long, value_enum)]
    pub replica_scheduling_policy: Option<SchedulingPolicy>,
    /// Poisson arrival rate, requests per simulated second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Ramp the rate linearly from --rate to this over --ramp-over.
    #[arg(long)]
    pub ramp_to: Option<f64>,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub ramp_over: Duration,
    /// Stop sending after this much simulated time.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Stop sending after this many requests.
    #[arg(long)]
    pub max_requests: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadFile {
    workload: Workload,
    rate: RateShape,
    duration_s: Option<f64>,
    max_requests: Option<usize>,
    seed: Option<u64>,
}

/// A validated workload with its schedule.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub workload: Workload,
    pub rate: RateShape,
    pub duration: Duration,
    pub max_requests: usize,
    pub seed: u64,
    /// Time scale the preset suggests.
    pub time_scale: Option<f64>,
    /// Replica flags the workload suggests (used when `--replica-arg` is not given).
    pub replica_args: Vec<String>,
    /// Send vLLM's `priority` in the body of requests with an objective (the replicas run
    /// `--scheduling-policy priority`, else they would refuse it).
    pub body_priority: bool,
}

impl WorkloadArgs {
    /// Applies the preset, the YAML file and the flags, in that order of precedence (flags win).
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        if let Some(path) = &self.workload_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let f: WorkloadFile = serde_yaml::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            f.workload.validate()?;
            f.rate.validate()?;
            return Ok(Resolved {
                workload: f.workload,
                rate: f.rate,
                duration: Duration::try_from_secs_f64(f.duration_s.unwrap_or(3600.0).max(0.0))
                    .map_err(|_| anyhow::anyhow!("duration_s out of range"))?,
                max_requests: f.max_requests.unwrap_or(usize::MAX),
                seed: f.seed.unwrap_or(self.seed),
                time_scale: None,
                replica_args: Vec::new(),
                body_priority: false,
            });
        }
        let kind = self.workload.unwrap_or(WorkloadKind::SharedPrefix);
        // (workload, rate, time scale) defaults.
        let (workload, rate, time_scale) = match kind {
            WorkloadKind::SharedPrefix => {
                let (g, p, sys, q, out, rate, ts) = match self.preset {
                    Some(Preset::Ci) => (16, 5, 2000, 200, 16, 4.0, 0.25),
                    Some(Preset::Small) => (48, 5, 6000, 1200, 64, 2.0, 0.5),
                    Some(Preset::Full) | None => (150, 5, 6000, 1200, 1000, 0.5, 0.1),
                };
                (
                    Workload::SharedPrefix {
                        groups: self.groups.unwrap_or(g),
                        prompts_per_group: self.prompts_per_group.unwrap_or(p),
                        system_tokens: self.system_tokens.unwrap_or(sys),
                        question_tokens: self.question_tokens.unwrap_or(q),
                        output_tokens: self.output_tokens.unwrap_or(out),
                    },
                    RateShape::Constant { rate },
                    Some(ts),
                )
            }
            WorkloadKind::BurstyChat => (
                Workload::BurstyChat {
                    requests: self.requests.unwrap_or(300),
                    prompt_tokens_min: self.prompt_tokens_min.unwrap_or(300),
                    prompt_tokens_max: self.prompt_tokens_max.unwrap_or(3000),
                    output_tokens: self.output_tokens.unwrap_or(128),
                },
                // Bursts of ~40 requests in 2 s (10 per replica, ~16k prefill tokens each:
                // seconds of queueing) over 1 req/s.
                RateShape::Bursts {
                    base: 1.0,
                    burst: 20.0,
                    period_s: 20.0,
                    burst_s: 2.0,
                },
                Some(0.1),
            ),
            WorkloadKind::MultiTurn => (
                Workload::MultiTurn {
                    conversations: self.conversations.unwrap_or(40),
                    turns: self.turns.unwrap_or(5),
                    user_tokens: self.user_tokens.unwrap_or(300),
                    output_tokens: self.output_tokens.unwrap_or(128),
                },
                RateShape::Constant { rate: 2.0 },
                Some(0.05),
            ),
            WorkloadKind::CodingAgent => (
                Workload::CodingAgent {
                    repos: self.repos.unwrap_or(6),
                    repo_tokens: self.repo_tokens.unwrap_or(16_000),
                    requests: self.requests.unwrap_or(200),
                    edit_tokens: self.edit_tokens.unwrap_or(300),
                    output_tokens: self.output_tokens.unwrap_or(200),
                },
                RateShape::Constant { rate: 0.5 },
                Some(0.05),
            ),
            WorkloadKind::MixedPriority => (
                Workload::MixedPriority {
                    interactive_requests: self.interactive_requests.unwrap_or(60),
                    interactive_rate: self.interactive_rate.unwrap_or(1.0),
                    batch_requests: self.batch_requests.unwrap_or(360),
                    prompt_tokens_min: self.prompt_tokens_min.unwrap_or(300),
                    prompt_tokens_max: self.prompt_tokens_max.unwrap_or(1500),
                    output_tokens: self.output_tokens.unwrap_or(64),
                },
                // Batch: 30 req/s for 4 s of every 20 s, nothing between (the flood an
                // async processor sends when its queue fills), far over what 4 replicas serve.
                RateShape::Bursts {
                    base: 0.0,
                    burst: 30.0,
                    period_s: 20.0,
                    burst_s: 4.0,
                },
                Some(0.2),
            ),
        };
        let rate = match (self.rate, self.ramp_to) {
            (Some(from), Some(to)) => RateShape::Ramp {
                from,
                to,
                over_s: self.ramp_over.as_secs_f64(),
            },
            (None, Some(to)) => RateShape::Ramp {
                from: 0.0,
                to,
                over_s: self.ramp_over.as_secs_f64(),
            },
            (Some(r), None) => match rate {
                // --rate scales a bursty shape, keeping its burst-to-base ratio.
                RateShape::Bursts {
                    base,
                    burst,
                    period_s,
                    burst_s,
                } => RateShape::Bursts {
                    base: r,
                    burst: r * burst / base.max(f64::MIN_POSITIVE),
                    period_s,
                    burst_s,
                },
                _ => RateShape::Constant { rate: r },
            },
            (None, None) => rate,
        };
        workload.validate()?;
        rate.validate()?;
        // Mixed priority: replicas that admit 16 sequences at a time, so a flood queues in
        // the replicas (where the EPP cannot reorder it) unless the EPP holds it back.
        let mut replica_args = match kind {
            WorkloadKind::MixedPriority => vec!["--max-num-seqs=16".to_owned()],
            _ => Vec::new(),
        };
        // Mixed priority: the replicas also order their own queues and batches by priority
        // (preempting batch work for interactive), as vLLM does with `--scheduling-policy
        // priority`.
        let policy = self.replica_scheduling_policy.unwrap_or(match kind {
            WorkloadKind::MixedPriority => SchedulingPolicy::Priority,
            _ => SchedulingPolicy::Fcfs,
        });
        if policy == SchedulingPolicy::Priority {
            replica_args.push("--scheduling-policy=priority".to_owned());
        }
        Ok(Resolved {
            workload,
            rate,
            duration: self.duration.unwrap_or(Duration::from_secs(24 * 3600)),
            max_requests: self.max_requests.unwrap_or(usize::MAX),
            seed: self.seed,
            time_scale,
            replica_args,
            body_priority: policy == SchedulingPolicy::Priority,
        })
    }
}

impl Resolved {
    /// The request bodies with their wall-clock send times (simulated arrival × `time_scale`).
    pub fn schedule(&self, model: &str, time_scale: f64) -> anyhow::Result<Vec<Scheduled>> {
        let plan = self.workload.plan(self.seed)?;
        let wall_per_sim = if time_scale > 0.0 { time_scale } else { 1.0 };
        let arrivals = Arrivals::new(self.rate, self.seed.wrapping_add(0x5eed))?;
        let timed: Vec<(&PlannedRequest, Duration)> = match self.workload {
            // Each class its own arrival process (interactive steady, batch the run's rate
            // shape), merged by time.
            Workload::MixedPriority {
                interactive_rate, ..
            } => {
                let interactive = Arrivals::new(
                    RateShape::Constant {
                        rate: interactive_rate,
                    },
                    self.seed.wrapping_add(0x1a7e),
                )?;
                let (first, batch): (Vec<&PlannedRequest>, Vec<&PlannedRequest>) = plan
                    .iter()
                    .partition(|r| r.objective == Some(INTERACTIVE_OBJECTIVE));
                let mut all: Vec<(&PlannedRequest, Duration)> = first
                    .into_iter()
                    .zip(interactive)
                    .chain(batch.into_iter().zip(arrivals))
                    .collect();
                all.sort_by_key(|(_, at)| *at);
                all
            }
            _ => plan.iter().zip(arrivals).collect(),
        };
        Ok(timed
            .into_iter()
            .take_while(|(_, at)| *at < self.duration)
            .take(self.max_requests)
            .map(|(req, at)| Scheduled {
                at: at.mul_f64(wall_per_sim),
                body: completion_body_with_priority(
                    model,
                    &req.prompt,
                    req.max_tokens,
                    engine_priority(req.objective).filter(|_| self.body_priority),
                ),
                objective: req.objective,
            })
            .collect())
    }
}

/// Flags of `switchyard bench routing`.
#[derive(Debug, Clone, clap::Args)]
pub struct RoutingArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Policies to compare, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Policy::ALL.to_vec())]
    pub policies: Vec<Policy>,
    /// Where the markdown, JSON and SVG go.
    #[arg(long, default_value = "benches/results")]
    pub out_dir: PathBuf,
    /// File name stem of the results (default `routing-<workload>`).
    #[arg(long)]
    pub name: Option<String>,
    /// Print the table only.
    #[arg(long)]
    pub no_write: bool,
    /// Write results although tracked files differ from the commit (the files then say so).
    #[arg(long)]
    pub allow_dirty: bool,
}

/// Replica, binary and process flags shared by `bench routing` and `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct SetupArgs {
    /// Sim replicas behind the gateway.
    #[arg(long, default_value_t = 4)]
    pub replicas: usize,
    #[arg(long, default_value = "l4-qwen2.5-7b")]
    pub sim_profile: String,
    /// Real seconds per simulated second (default: the preset's, else 0.05).
    #[arg(long)]
    pub time_scale: Option<f64>,
    /// Model name the replicas serve; `switchyard demo --model real` serves the real GGUF
    /// (`--model-file`) on `cpu` replicas instead of simulating one.
    #[arg(long, default_value = "Qwen/Qwen2.5-7B-Instruct")]
    pub model: String,
    /// Extra flag for every replica (repeatable), e.g. `--replica-arg=--max-num-seqs=64`.
    #[arg(long, allow_hyphen_values = true)]
    pub replica_arg: Vec<String>,
    /// Envoy binary (default: $SWITCHYARD_ENVOY, .cache/venv/bin/envoy, PATH).
    #[arg(long)]
    pub envoy: Option<PathBuf>,
    /// The switchyard binary to start replicas and the EPP from (default: this one).
    #[arg(long)]
    pub switchyard_bin: Option<PathBuf>,
    /// Requests in flight at most (beyond: dropped and counted as errors).
    #[arg(long, default_value_t = 4096)]
    pub max_in_flight: usize,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub request_timeout: Duration,
    /// Keep the child processes' logs and configs (their directory is printed).
    #[arg(long)]
    pub keep_logs: bool,
    /// EndpointPickerConfig for the `epp-custom` policy (to compare a configuration of your
    /// own; the results name the policy `epp custom config`, not the file's content).
    #[arg(long)]
    pub epp_config_file: Option<PathBuf>,
}

/// Flags of `switchyard bench run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Completions endpoint, e.g. http://127.0.0.1:8081/v1/completions.
    #[arg(long)]
    pub url: String,
    #[arg(long, default_value = "Qwen/Qwen2.5-7B-Instruct")]
    pub model: String,
    /// Divide measured times by this (the servers' --time-scale) to report simulated time.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    #[arg(long, default_value_t = 4096)]
    pub max_in_flight: usize,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub request_timeout: Duration,
}

/// Flags of `switchyard demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    pub setup: SetupArgs,
    /// With `--model real`: the GGUF the `cpu` replicas serve (`scripts/fetch-model.sh` puts
    /// Qwen2.5-Coder-0.5B-Instruct here).
    #[arg(long, default_value = super::real_demo::DEFAULT_GGUF)]
    pub model_file: PathBuf,
}

/// Builds and runs a comparison (shared by `bench routing`, `demo` and the tests).
pub async fn compare(
    workload: &WorkloadArgs,
    setup: &SetupArgs,
    policies: &[Policy],
    default_preset: Preset,
) -> anyhow::Result<(Vec<PolicyResult>, RunInfo)> {
    let mut workload = workload.clone();
    if workload.preset.is_none() && workload.workload.is_none() && workload.workload_file.is_none()
    {
        workload.preset = Some(default_preset);
    }
    let resolved = workload.resolve()?;
    let time_scale = setup.time_scale.or(resolved.time_scale).unwrap_or(0.05);
    anyhow::ensure!(
        time_scale.is_finite() && time_scale >= 0.0,
        "--time-scale must be ≥ 0"
    );
    anyhow::ensure!(setup.replicas >= 1, "--replicas must be at least 1");
    let plan = resolved.schedule(&setup.model, time_scale)?;
    anyhow::ensure!(!plan.is_empty(), "the workload schedules no request");
    let envoy = super::envoy::ensure_envoy(setup.envoy.as_deref()).await?;
    let bin = stack::switchyard_bin(setup.switchyard_bin.as_deref())?;
    let scratch = ScratchDir::new("switchyard-bench", setup.keep_logs)?;
    if setup.keep_logs {
        eprintln!("logs and configs in {}", scratch.path().display());
    }
    let last_s = plan.last().map_or(0.0, |s| s.at.as_secs_f64());
    eprintln!(
        "{} requests of {} over ~{:.0} s per policy (time scale {time_scale}), {} policies",
        plan.len(),
        resolved.workload.name(),
        last_s,
        policies.len()
    );
    let replica_args = if setup.replica_arg.is_empty() {
        resolved.replica_args.clone()
    } else {
        setup.replica_arg.clone()
    };
    anyhow::ensure!(
        !resolved.body_priority
            || replica_args
                .iter()
                .any(|a| a == "--scheduling-policy=priority"),
        "requests carry a body priority but --replica-arg lacks --scheduling-policy=priority \
         (add it, or pass --replica-scheduling-policy fcfs)"
    );
    let info = RunInfo {
        workload: serde_json::to_value(&resolved.workload)?,
        rate: serde_json::to_value(resolved.rate)?,
        requests: plan.len(),
        replicas: setup.replicas,
        sim_profile: setup.sim_profile.clone(),
        time_scale,
        seed: resolved.seed,
        replica_args: replica_args.clone(),
    };
    let custom_config = match &setup.epp_config_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading --epp-config-file {}", path.display()))?,
        ),
        None => None,
    };
    anyhow::ensure!(
        custom_config.is_some() || !policies.contains(&Policy::EppCustom),
        "the epp-custom policy needs --epp-config-file"
    );
    let cmp = Comparison {
        custom_config,
        bin,
        envoy,
        replicas: ReplicaSpec {
            count: setup.replicas,
            sim_profile: setup.sim_profile.clone(),
            time_scale,
            model: setup.model.clone(),
            extra_args: replica_args,
            gguf: None,
        },
        policies: policies.to_vec(),
        plan,
        load: LoadOptions {
            request_timeout: setup.request_timeout,
            max_in_flight: setup.max_in_flight,
            progress_label: None,
        },
        dir: scratch.path().to_owned(),
        progress: true,
    };
    let results = routing::run(&cmp).await?;
    Ok((results, info))
}

/// `switchyard bench`.
pub async fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    init_logging();
    match args.command {
        BenchCommand::Routing(a) => {
            let machine = Machine::for_results(a.allow_dirty || a.no_write)?;
            let (results, info) =
                with_ctrl_c(compare(&a.workload, &a.setup, &a.policies, Preset::Full)).await?;
            println!("{}", report::markdown_table(&results));
            println!("{}", super::prediction::markdown_table(&results));
            if !a.no_write {
                let name = a.name.clone().unwrap_or_else(|| {
                    let w = info.workload["kind"]
                        .as_str()
                        .unwrap_or("workload")
                        .to_owned();
                    match a.workload.preset {
                        Some(p) => format!("routing-{w}-{}", format!("{p:?}").to_lowercase()),
                        None => format!("routing-{w}"),
                    }
                });
                let written = report::write(&a.out_dir, &name, &machine, &info, &results)?;
                println!(
                    "wrote {}, {} and {}",
                    written.markdown.display(),
                    written.json.display(),
                    written.svg.display()
                );
            }
            Ok(())
        }
        BenchCommand::Run(a) => {
            let resolved = a.workload.resolve()?;
            let plan = resolved.schedule(&a.model, a.time_scale)?;
            let res = with_ctrl_c(async {
                Ok(super::load::run(
                    &a.url,
                    &plan,
                    &LoadOptions {
                        request_timeout: a.request_timeout,
                        max_in_flight: a.max_in_flight,
                        progress_label: Some("run".to_owned()),
                    },
                )
                .await)
            })
            .await?;
            let sim_per_wall = if a.time_scale > 0.0 {
                1.0 / a.time_scale
            } else {
                1.0
            };
            let mut r = routing::summarise(
                Policy::EppDefault,
                &res.outcomes,
                res.wall_s,
                sim_per_wall,
                &[],
            );
            r.name = "endpoint";
            println!("{}", report::markdown_table(&[r]));
            println!(
                "(prefix hit rate and load share need the replicas' metrics: use `bench routing`)"
            );
            Ok(())
        }
        BenchCommand::Overhead(a) => with_ctrl_c(super::overhead::run(*a)).await,
        BenchCommand::Soak(a) => with_ctrl_c(super::soak::run(*a)).await,
    }
}

/// `switchyard demo`: round-robin vs the EPP on a short shared-prefix workload.
pub async fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    init_logging();
    if args.setup.model == super::real_demo::REAL {
        let max_tokens = args.workload.output_tokens.unwrap_or(48);
        let table = with_ctrl_c(super::real_demo::run_from_flags(
            &args.setup,
            &args.model_file,
            max_tokens,
        ))
        .await?;
        println!("{table}");
        return Ok(());
    }
    eprintln!(
        "switchyard demo: {} sim replicas behind Envoy, round-robin vs the EPP (Ctrl-C stops everything)",
        args.setup.replicas
    );
    let (results, _) = with_ctrl_c(compare(
        &args.workload,
        &args.setup,
        &[Policy::RoundRobin, Policy::EppDefault],
        Preset::Ci,
    ))
    .await?;
    println!("{}", report::markdown_table(&results));
    Ok(())
}

/// Runs `fut` until it finishes or Ctrl-C/SIGTERM arrives; dropping it stops (and reaps) every
/// child process it started, through their guards.
async fn with_ctrl_c<T>(
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        r = fut => r,
        signal = process::shutdown_signal() => {
            let what = match signal {
                Signal::Interrupt => "interrupted",
                Signal::Terminate => "terminated",
            };
            eprintln!("{what}: stopping everything started");
            anyhow::bail!(what)
        }
    }
}

fn init_logging() {
    process::init_logging("warn", LogFormat::Console);
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        workload: WorkloadArgs,
    }

    fn body_priorities(r: &Resolved) -> Vec<(Option<&'static str>, serde_json::Value)> {
        r.schedule("m", 1.0)
            .unwrap()
            .into_iter()
            .map(|s| {
                let v: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
                (s.objective, v["priority"].clone())
            })
            .collect()
    }

    #[test]
    fn mixed_priority_replicas_schedule_by_priority_unless_told_fcfs() {
        let args = [
            "bench",
            "--workload",
            "mixed-priority",
            "--batch-requests",
            "2",
        ];
        let r = Cli::parse_from(args).workload.resolve().unwrap();
        assert_eq!(
            r.replica_args,
            ["--max-num-seqs=16", "--scheduling-policy=priority"]
        );
        let sent = body_priorities(&r);
        assert_eq!(sent.len(), 62);
        for (objective, priority) in &sent {
            let want = if *objective == Some(INTERACTIVE_OBJECTIVE) {
                0
            } else {
                1
            };
            assert_eq!(*priority, want, "{objective:?}");
        }

        let fcfs = [&args[..], &["--replica-scheduling-policy", "fcfs"]].concat();
        let r = Cli::parse_from(fcfs).workload.resolve().unwrap();
        assert_eq!(r.replica_args, ["--max-num-seqs=16"]);
        assert!(body_priorities(&r).iter().all(|(_, p)| p.is_null()));

        let other = Cli::parse_from(["bench", "--workload", "bursty-chat"]);
        assert!(other.workload.resolve().unwrap().replica_args.is_empty());
    }
}
