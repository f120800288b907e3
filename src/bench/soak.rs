//! `switchyard bench soak`: the local stack (sim replicas, the EPP with fallback endpoints,
//! Envoy) under a fixed request rate for a fixed time, with churn — some replicas restarted
//! periodically, alternately drained (SIGTERM) and crashed (SIGKILL) — and a fraction of bad
//! requests (invalid JSON, huge distinct model names, no model, oversize bodies). Meanwhile the
//! resident memory (`VmRSS`) and open file descriptors of the EPP and of the replicas that are
//! never restarted are sampled from `/proc`, and the EPP's own `/metrics` is scraped as
//! Prometheus would (its size is sampled too). After the warm-up, growth of each is measured
//! and the run fails (non-zero exit) when any exceeds its bound, when good requests fail beyond
//! `--min-success`, when a bad request gets anything but a 4xx, or when a process that is not
//! being restarted dies.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use parking_lot::Mutex;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::arrivals::{Arrivals, RateShape};
use super::cli::SetupArgs;
use super::client::{self, HttpClient};
use super::procs::ScratchDir;
use super::stack::{self, Gateway, ReplicaSpec, Stack};
use super::workload::completion_body;

/// Request body limit the soak gives the EPP (`--max-body-bytes`): oversize requests exceed it.
const EPP_MAX_BODY_BYTES: usize = 1 << 20;
/// Length of the huge model names (each one distinct).
const HUGE_MODEL_BYTES: usize = 16 << 10;
/// Shared prompt prefixes the good requests draw from (exercises the prefix index).
const PREFIXES: u64 = 64;
/// How long a draining replica may take before it is killed.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// How long requests still in flight at the end may take.
const FINAL_DRAIN: Duration = Duration::from_secs(30);
/// Error texts kept for the report.
const MAX_ERROR_EXAMPLES: usize = 5;

/// Sizes of the soak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SoakPreset {
    /// 30 s (15 s warm-up) at 20 requests/s, a restart every 5 s: the test suite's run.
    Ci,
    /// 20 min (5 min warm-up) at 30 requests/s, a restart every 30 s: the documented run.
    Long,
}

/// Flags of `switchyard bench soak`.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Size preset; individual flags override it. Without one: 10 min, 2 min warm-up,
    /// 30 requests/s, a restart every 20 s.
    #[arg(long, value_enum)]
    pub preset: Option<SoakPreset>,
    /// How long load is sent.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Samples before this are not measured (caches and pools fill up first).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub warmup: Option<Duration>,
    /// Requests per second (Poisson arrivals, real time).
    #[arg(long)]
    pub rate: Option<f64>,
    /// How many replicas (the first ones) are restarted in turn; the others are measured.
    #[arg(long, default_value_t = 1)]
    pub churn_replicas: usize,
    /// Time between replica restarts (drain and crash alternate).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub restart_every: Option<Duration>,
    /// Fraction of requests that are bad (invalid JSON, huge model name, no model, oversize).
    #[arg(long, default_value_t = 0.1)]
    pub bad_fraction: f64,
    /// Output tokens per good request.
    #[arg(long, default_value_t = 16)]
    pub output_tokens: u32,
    /// Time between samples of RSS, open FDs and the EPP's `/metrics` size.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub sample_every: Option<Duration>,
    /// Largest RSS growth after warm-up, per measured process (MiB).
    #[arg(long, default_value_t = 16.0)]
    pub max_rss_growth_mib: f64,
    /// Largest growth of open file descriptors after warm-up, per measured process.
    #[arg(long, default_value_t = 8.0, allow_negative_numbers = true)]
    pub max_fd_growth: f64,
    /// Largest growth of the EPP's `/metrics` text after warm-up (KiB).
    #[arg(long, default_value_t = 64.0)]
    pub max_metrics_growth_kib: f64,
    /// Smallest fraction of good requests that must succeed (crashes fail the requests in
    /// flight on the crashed replica).
    #[arg(long, default_value_t = 0.99)]
    pub min_success: f64,
    /// Write the report (with every sample) as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The validated plan.
#[derive(Debug, Clone, Serialize)]
pub struct SoakPlan {
    pub duration_s: f64,
    pub warmup_s: f64,
    pub rate: f64,
    pub replicas: usize,
    pub churn_replicas: usize,
    pub restart_every_s: f64,
    pub bad_fraction: f64,
    pub sample_every_s: f64,
    pub time_scale: f64,
    pub max_rss_growth_mib: f64,
    pub max_fd_growth: f64,
    pub max_metrics_growth_kib: f64,
    pub min_success: f64,
}

impl SoakArgs {
    pub fn plan(&self) -> anyhow::Result<SoakPlan> {
        let (duration, warmup, rate, restart, sample) = match self.preset {
            Some(SoakPreset::Ci) => (30.0, 15.0, 20.0, 5.0, 0.5),
            Some(SoakPreset::Long) => (1200.0, 300.0, 30.0, 30.0, 2.0),
            None => (600.0, 120.0, 30.0, 20.0, 1.0),
        };
        let secs = |d: Option<Duration>, default: f64| d.map_or(default, |d| d.as_secs_f64());
        let plan = SoakPlan {
            duration_s: secs(self.duration, duration),
            warmup_s: secs(self.warmup, warmup),
            rate: self.rate.unwrap_or(rate),
            replicas: self.setup.replicas,
            churn_replicas: self.churn_replicas,
            restart_every_s: secs(self.restart_every, restart),
            bad_fraction: self.bad_fraction,
            sample_every_s: secs(self.sample_every, sample),
            time_scale: self.setup.time_scale.unwrap_or(0.05),
            max_rss_growth_mib: self.max_rss_growth_mib,
            max_fd_growth: self.max_fd_growth,
            max_metrics_growth_kib: self.max_metrics_growth_kib,
            min_success: self.min_success,
        };
        anyhow::ensure!(plan.duration_s > 0.0, "--duration must be positive");
        anyhow::ensure!(
            plan.warmup_s >= 0.0 && plan.warmup_s < plan.duration_s,
            "--warmup must be shorter than --duration"
        );
        anyhow::ensure!(
            plan.rate.is_finite() && plan.rate > 0.0,
            "--rate must be positive"
        );
        anyhow::ensure!(
            plan.churn_replicas < plan.replicas,
            "--churn-replicas must leave at least one replica that is not restarted (got {} of {})",
            plan.churn_replicas,
            plan.replicas
        );
        anyhow::ensure!(
            plan.restart_every_s > 0.0,
            "--restart-every must be positive"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&plan.bad_fraction),
            "--bad-fraction must be within 0..=1"
        );
        anyhow::ensure!(
            plan.sample_every_s >= 0.05,
            "--sample-every must be at least 50ms"
        );
        anyhow::ensure!(
            plan.time_scale.is_finite() && plan.time_scale >= 0.0,
            "--time-scale must be ≥ 0"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&plan.min_success),
            "--min-success must be within 0..=1"
        );
        Ok(plan)
    }
}

// ---------------------------------------------------------------------------------------------
// Requests.

/// The kinds of bad request mixed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BadKind {
    /// A body cut off mid-JSON.
    InvalidJson,
    /// A distinct 16 KiB model name each time (label cardinality, memory).
    HugeModel,
    /// Valid JSON without `model`.
    MissingModel,
    /// A body larger than the EPP's `--max-body-bytes`.
    Oversize,
}

impl BadKind {
    const ALL: [BadKind; 4] = [
        BadKind::InvalidJson,
        BadKind::HugeModel,
        BadKind::MissingModel,
        BadKind::Oversize,
    ];

    fn body(self, n: u64, model: &str) -> Bytes {
        match self {
            BadKind::InvalidJson => Bytes::from(format!(
                "{{\"model\": \"{model}\", \"prompt\": \"request {n} cut off"
            )),
            BadKind::HugeModel => {
                let mut name = format!("huge-{n}-");
                while name.len() < HUGE_MODEL_BYTES {
                    name.push_str("0123456789abcdef");
                }
                completion_body(&name, "hello", 4)
            }
            BadKind::MissingModel => Bytes::from(
                serde_json::json!({"prompt": format!("request {n} without a model"), "max_tokens": 4})
                    .to_string(),
            ),
            BadKind::Oversize => {
                let prompt = "z".repeat(EPP_MAX_BODY_BYTES + (64 << 10));
                completion_body(model, &prompt, 4)
            }
        }
    }
}

/// What the load sent and got.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestStats {
    pub good_sent: u64,
    pub good_ok: u64,
    pub good_failed: u64,
    /// A few of the good requests' errors.
    pub good_errors: Vec<String>,
    /// Status of each bad request by kind (0: no HTTP answer).
    pub bad: BTreeMap<BadKind, BTreeMap<u16, u64>>,
}

impl RequestStats {
    pub fn good_success(&self) -> f64 {
        if self.good_sent == 0 {
            1.0
        } else {
            self.good_ok as f64 / self.good_sent as f64
        }
    }

    /// Bad requests answered with something other than a 4xx.
    pub fn bad_not_4xx(&self) -> Vec<(BadKind, u16, u64)> {
        self.bad
            .iter()
            .flat_map(|(k, statuses)| statuses.iter().map(move |(s, n)| (*k, *s, *n)))
            .filter(|(_, s, _)| !(400..500).contains(s))
            .collect()
    }
}

/// Sends one bad request; its HTTP status, or 0 when no answer came.
async fn send_bad(http: &HttpClient, url: &str, body: Bytes, timeout: Duration) -> u16 {
    let Ok(req) = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
    else {
        return 0;
    };
    let fut = async {
        let resp = http.request(req).await.ok()?;
        let status = resp.status().as_u16();
        // Read (a bounded part of) the answer so the connection can be reused.
        let _ = http_body_util::Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await;
        Some(status)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// The open-loop driver: Poisson arrivals at `plan.rate` for `plan.duration_s`.
async fn drive(
    url: String,
    model: String,
    plan: SoakPlan,
    output_tokens: u32,
    seed: u64,
    max_in_flight: usize,
    timeout: Duration,
) -> RequestStats {
    let http = client::http_client();
    let stats = Arc::new(Mutex::new(RequestStats::default()));
    let slots = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Ok(arrivals) = Arrivals::new(RateShape::Constant { rate: plan.rate }, seed) else {
        return RequestStats::default();
    };
    let end = Duration::from_secs_f64(plan.duration_s);
    let start = tokio::time::Instant::now();
    let mut tasks = JoinSet::new();
    for (n, at) in (0u64..).zip(arrivals) {
        if at >= end {
            break;
        }
        tokio::time::sleep_until(start + at).await;
        let bad = rng.random_bool(plan.bad_fraction);
        let kind = BadKind::ALL[rng.random_range(0..BadKind::ALL.len())];
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            let mut s = stats.lock();
            if bad {
                *s.bad.entry(kind).or_default().entry(0).or_default() += 1;
            } else {
                s.good_sent += 1;
                s.good_failed += 1;
                if s.good_errors.len() < MAX_ERROR_EXAMPLES {
                    s.good_errors
                        .push(format!("dropped: {max_in_flight} requests in flight"));
                }
            }
            continue;
        };
        let (http, url, stats) = (http.clone(), url.clone(), Arc::clone(&stats));
        if bad {
            let body = kind.body(n, &model);
            tasks.spawn(async move {
                let status = send_bad(&http, &url, body, timeout).await;
                drop(permit);
                *stats
                    .lock()
                    .bad
                    .entry(kind)
                    .or_default()
                    .entry(status)
                    .or_default() += 1;
            });
        } else {
            let prefix = rng.random_range(0..PREFIXES);
            let prompt = format!(
                "[system {prefix}] {} [user] question {n}",
                "You are a careful assistant for the Switchyard soak test. ".repeat(16)
            );
            let body = completion_body(&model, &prompt, output_tokens);
            tasks.spawn(async move {
                let out = client::stream_completion(&http, &url, body, timeout).await;
                drop(permit);
                let mut s = stats.lock();
                s.good_sent += 1;
                match out.error {
                    None => s.good_ok += 1,
                    Some(e) => {
                        s.good_failed += 1;
                        if s.good_errors.len() < MAX_ERROR_EXAMPLES {
                            s.good_errors.push(e);
                        }
                    }
                }
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(FINAL_DRAIN, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let unfinished = tasks.len() as u64;
    tasks.abort_all();
    let mut s = stats.lock().clone();
    if unfinished > 0 {
        s.good_errors.push(format!(
            "{unfinished} request(s) unfinished {FINAL_DRAIN:?} after the end"
        ));
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Sampling.

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t_s: f64,
    pub rss_kib: u64,
    pub fds: u64,
}

/// `VmRSS` of `/proc/<pid>/status`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Entries of `/proc/<pid>/fd`.
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// A sampled process.
#[derive(Debug, Clone, Serialize)]
pub struct Tracked {
    pub name: String,
    pub pid: u32,
    /// Whether its growth is held to the bounds (Envoy is reported, not judged).
    pub judged: bool,
    pub samples: Vec<Sample>,
}

/// Samples every `every` until `stop` turns true.
async fn sample_loop(
    mut procs: Vec<Tracked>,
    metrics_url: Option<String>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> (Vec<Tracked>, MetricsScrapes) {
    let http = client::http_client();
    let start = Instant::now();
    let mut metrics = MetricsScrapes::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let t_s = start.elapsed().as_secs_f64();
        for p in &mut procs {
            if let (Some(rss_kib), Some(fds)) = (rss_kib(p.pid), open_fds(p.pid)) {
                p.samples.push(Sample { t_s, rss_kib, fds });
            }
        }
        if let Some(url) = &metrics_url {
            match client::get_text(&http, url).await {
                Ok(text) => metrics.sizes.push((t_s, text.len() as u64)),
                Err(e) => {
                    metrics.errors += 1;
                    if metrics.first_error.is_none() {
                        metrics.first_error = Some(format!("at {t_s:.1} s: {e}"));
                    }
                }
            }
        }
    }
    (procs, metrics)
}

/// The EPP's `/metrics` as a scraper saw it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MetricsScrapes {
    /// (seconds since start, bytes) of each successful scrape.
    pub sizes: Vec<(f64, u64)>,
    /// Scrapes that failed (the limit is 8 MiB and 5 s, as `bench::client::get_text` reads).
    pub errors: u64,
    pub first_error: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Analysis.

/// How a quantity moved after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Trend {
    /// Samples after the warm-up.
    pub samples: usize,
    /// Median of the first quarter of those samples.
    pub start: f64,
    /// Median of the last quarter.
    pub end: f64,
    /// `end - start`: what the bound applies to (medians ignore a single spike).
    pub growth: f64,
    /// Least-squares slope over the measured window, per hour.
    pub slope_per_hour: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The trend of `(t_s, value)` points at or after `warmup_s`; None with fewer than 4 points.
pub fn trend(points: &[(f64, f64)], warmup_s: f64) -> Option<Trend> {
    let window: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(t, _)| *t >= warmup_s)
        .collect();
    let n = window.len();
    if n < 4 {
        return None;
    }
    let q = (n / 4).max(1);
    let mut first: Vec<f64> = window[..q].iter().map(|p| p.1).collect();
    let mut last: Vec<f64> = window[n - q..].iter().map(|p| p.1).collect();
    let (start, end) = (median(&mut first), median(&mut last));
    let nf = n as f64;
    let mean_t = window.iter().map(|p| p.0).sum::<f64>() / nf;
    let mean_v = window.iter().map(|p| p.1).sum::<f64>() / nf;
    let sxx: f64 = window.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
    let sxy: f64 = window.iter().map(|p| (p.0 - mean_t) * (p.1 - mean_v)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    Some(Trend {
        samples: n,
        start,
        end,
        growth: end - start,
        slope_per_hour: slope * 3600.0,
    })
}

/// One process's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessReport {
    pub name: String,
    pub judged: bool,
    /// RSS in MiB.
    pub rss_mib: Option<Trend>,
    pub fds: Option<Trend>,
}

/// Everything the soak measured.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub plan: SoakPlan,
    pub requests: RequestStats,
    /// Replica restarts: (drained with SIGTERM, crashed with SIGKILL).
    pub restarts_drained: u32,
    pub restarts_crashed: u32,
    pub processes: Vec<ProcessReport>,
    /// Size of the EPP's `/metrics` text in KiB.
    pub epp_metrics_kib: Option<Trend>,
    /// Why the soak failed (empty: it passed).
    pub failures: Vec<String>,
    pub samples: Vec<Tracked>,
    pub epp_metrics: MetricsScrapes,
}

/// Applies the bounds: the reasons the soak fails.
pub fn judge(
    plan: &SoakPlan,
    requests: &RequestStats,
    processes: &[ProcessReport],
    metrics_kib: Option<&Trend>,
    metrics: &MetricsScrapes,
) -> Vec<String> {
    let mut out = Vec::new();
    for p in processes.iter().filter(|p| p.judged) {
        match (&p.rss_mib, &p.fds) {
            (Some(rss), Some(fds)) => {
                if rss.growth > plan.max_rss_growth_mib {
                    out.push(format!(
                        "{}: RSS grew {:.1} MiB after warm-up ({:.1} → {:.1}; bound {} MiB)",
                        p.name, rss.growth, rss.start, rss.end, plan.max_rss_growth_mib
                    ));
                }
                if fds.growth > plan.max_fd_growth {
                    out.push(format!(
                        "{}: open FDs grew by {} after warm-up ({} → {}; bound {})",
                        p.name, fds.growth, fds.start, fds.end, plan.max_fd_growth
                    ));
                }
            }
            _ => out.push(format!("{}: too few samples after warm-up", p.name)),
        }
    }
    match metrics_kib {
        Some(m) if m.growth > plan.max_metrics_growth_kib => out.push(format!(
            "EPP /metrics grew {:.1} KiB after warm-up ({:.1} → {:.1}; bound {} KiB)",
            m.growth, m.start, m.end, plan.max_metrics_growth_kib
        )),
        Some(_) => {}
        None => out.push("EPP /metrics: too few samples after warm-up".to_owned()),
    }
    if metrics.errors > 0 {
        out.push(format!(
            "EPP /metrics failed {} scrape(s), first {}",
            metrics.errors,
            metrics.first_error.as_deref().unwrap_or("?")
        ));
    }
    if requests.good_success() < plan.min_success {
        out.push(format!(
            "{} of {} good requests failed (success {:.4} < {}); e.g. {:?}",
            requests.good_failed,
            requests.good_sent,
            requests.good_success(),
            plan.min_success,
            requests.good_errors
        ));
    }
    for (kind, status, n) in requests.bad_not_4xx() {
        out.push(format!(
            "{n} {kind:?} request(s) answered {} instead of a 4xx",
            if status == 0 {
                "nothing".to_owned()
            } else {
                status.to_string()
            }
        ));
    }
    out
}

/// The report as a markdown table plus the request summary.
pub fn render(r: &SoakReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "soak: {:.0} s at {} req/s ({:.0}% bad), {} replicas ({} restarted: {} drained, {} crashed), measured after {:.0} s",
        r.plan.duration_s,
        r.plan.rate,
        r.plan.bad_fraction * 100.0,
        r.plan.replicas,
        r.plan.churn_replicas,
        r.restarts_drained,
        r.restarts_crashed,
        r.plan.warmup_s
    );
    let _ = writeln!(
        s,
        "\n| process | RSS start → end (MiB) | RSS growth (MiB) | RSS slope (MiB/h) | FDs start → end | FD growth |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for p in &r.processes {
        let name = if p.judged {
            p.name.clone()
        } else {
            format!("{} (not judged)", p.name)
        };
        match (&p.rss_mib, &p.fds) {
            (Some(m), Some(f)) => {
                let _ = writeln!(
                    s,
                    "| {name} | {:.1} → {:.1} | {:+.1} | {:+.1} | {:.0} → {:.0} | {:+.0} |",
                    m.start, m.end, m.growth, m.slope_per_hour, f.start, f.end, f.growth
                );
            }
            _ => {
                let _ = writeln!(s, "| {name} | – | – | – | – | – |");
            }
        }
    }
    if let Some(m) = &r.epp_metrics_kib {
        let _ = writeln!(
            s,
            "\nEPP /metrics: {:.1} → {:.1} KiB ({:+.1} KiB after warm-up)",
            m.start, m.end, m.growth
        );
    }
    let q = &r.requests;
    let _ = writeln!(
        s,
        "good requests: {} sent, {} ok, {} failed (success {:.4})",
        q.good_sent,
        q.good_ok,
        q.good_failed,
        q.good_success()
    );
    for e in &q.good_errors {
        let _ = writeln!(s, "  e.g. {e}");
    }
    for (kind, statuses) in &q.bad {
        let list: Vec<String> = statuses
            .iter()
            .map(|(st, n)| format!("{n}× {st}"))
            .collect();
        let _ = writeln!(s, "bad {kind:?}: {}", list.join(", "));
    }
    if r.failures.is_empty() {
        let _ = writeln!(s, "\nPASS: growth within bounds");
    } else {
        let _ = writeln!(s, "\nFAIL:");
        for f in &r.failures {
            let _ = writeln!(s, "  - {f}");
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The run.

/// `switchyard bench soak`.
pub async fn run(args: SoakArgs) -> anyhow::Result<()> {
    let plan = args.plan()?;
    let envoy = super::envoy::ensure_envoy(args.setup.envoy.as_deref()).await?;
    let bin = stack::switchyard_bin(args.setup.switchyard_bin.as_deref())?;
    let scratch = ScratchDir::new("switchyard-soak", args.setup.keep_logs)?;
    if args.setup.keep_logs {
        eprintln!("logs and configs in {}", scratch.path().display());
    }
    let spec = ReplicaSpec {
        count: plan.replicas,
        sim_profile: args.setup.sim_profile.clone(),
        time_scale: plan.time_scale,
        model: args.setup.model.clone(),
        extra_args: args.setup.replica_arg.clone(),
        gguf: None,
    };
    // Two fallbacks (fewer with fewer replicas): a restarting replica costs a retry, not a
    // failure.
    let fallbacks = u32::try_from(plan.replicas.saturating_sub(1).min(2)).unwrap_or(2);
    let gateway = Gateway::EppWithFallbacks {
        fallbacks,
        epp_args: vec![format!("--max-body-bytes={EPP_MAX_BODY_BYTES}")],
    };
    let mut stack = Stack::start(&bin, &envoy, &spec, &gateway, scratch.path(), "soak").await?;
    let result = soak(&mut stack, &plan, &args).await;
    stack.stop().await;
    let report = result?;
    println!("{}", render(&report));
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    anyhow::ensure!(
        report.failures.is_empty(),
        "soak failed: {}",
        report.failures.join("; ")
    );
    Ok(())
}

async fn soak(stack: &mut Stack, plan: &SoakPlan, args: &SoakArgs) -> anyhow::Result<SoakReport> {
    let mut tracked = Vec::new();
    if let Some(pid) = stack.epp_pid() {
        tracked.push(Tracked {
            name: "epp".to_owned(),
            pid,
            judged: true,
            samples: Vec::new(),
        });
    }
    for (i, pid) in stack
        .replica_pids()
        .into_iter()
        .enumerate()
        .skip(plan.churn_replicas)
    {
        tracked.push(Tracked {
            name: format!("replica{i}"),
            pid,
            judged: true,
            samples: Vec::new(),
        });
    }
    if let Some(pid) = stack.envoy_pid() {
        tracked.push(Tracked {
            name: "envoy".to_owned(),
            pid,
            judged: false,
            samples: Vec::new(),
        });
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics_url = stack.epp_metrics.map(|a| format!("http://{a}/metrics"));
    let sampler = tokio::spawn(sample_loop(
        tracked,
        metrics_url,
        Duration::from_secs_f64(plan.sample_every_s),
        stop_rx,
    ));
    let timeout = args.setup.request_timeout.min(Duration::from_secs(60));
    let driver = tokio::spawn(drive(
        stack.completions_url(),
        args.setup.model.clone(),
        plan.clone(),
        args.output_tokens,
        args.seed,
        args.setup.max_in_flight,
        timeout,
    ));
    eprintln!(
        "soak: {:.0} s at {} req/s, restarting one of {} replica(s) every {:.0} s",
        plan.duration_s, plan.rate, plan.churn_replicas, plan.restart_every_s
    );

    // Churn until the load ends; between restarts, make sure nothing else died.
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(plan.duration_s);
    let every = Duration::from_secs_f64(plan.restart_every_s);
    let (mut drained, mut crashed) = (0u32, 0u32);
    let mut next_restart = start + every;
    let mut turn = 0usize;
    let churn_result: anyhow::Result<()> = async {
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(200)).await;
            stack.check_running()?;
            if plan.churn_replicas > 0 && Instant::now() >= next_restart && Instant::now() < end {
                let i = turn % plan.churn_replicas;
                let crash = turn % 2 == 1;
                stack.restart_replica(i, crash, DRAIN_GRACE).await?;
                if crash {
                    crashed += 1;
                } else {
                    drained += 1;
                }
                turn += 1;
                next_restart += every;
                eprintln!(
                    "  [soak] {:>5.1}s  replica{i} {}",
                    start.elapsed().as_secs_f64(),
                    if crash {
                        "crashed and restarted"
                    } else {
                        "drained and restarted"
                    }
                );
            }
        }
        Ok(())
    }
    .await;
    let requests = driver.await.context("load driver")?;
    stop_tx.send_replace(true);
    let (tracked, epp_metrics) = sampler.await.context("sampler")?;
    churn_result?;

    let processes: Vec<ProcessReport> = tracked
        .iter()
        .map(|t| {
            let rss: Vec<(f64, f64)> = t
                .samples
                .iter()
                .map(|s| (s.t_s, s.rss_kib as f64 / 1024.0))
                .collect();
            let fds: Vec<(f64, f64)> = t.samples.iter().map(|s| (s.t_s, s.fds as f64)).collect();
            ProcessReport {
                name: t.name.clone(),
                judged: t.judged,
                rss_mib: trend(&rss, plan.warmup_s),
                fds: trend(&fds, plan.warmup_s),
            }
        })
        .collect();
    let sizes: Vec<(f64, f64)> = epp_metrics
        .sizes
        .iter()
        .map(|(t, b)| (*t, *b as f64 / 1024.0))
        .collect();
    let epp_metrics_kib = trend(&sizes, plan.warmup_s);
    let failures = judge(
        plan,
        &requests,
        &processes,
        epp_metrics_kib.as_ref(),
        &epp_metrics,
    );
    Ok(SoakReport {
        plan: plan.clone(),
        requests,
        restarts_drained: drained,
        restarts_crashed: crashed,
        processes,
        epp_metrics_kib,
        failures,
        samples: tracked,
        epp_metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> SoakPlan {
        SoakPlan {
            duration_s: 100.0,
            warmup_s: 50.0,
            rate: 10.0,
            replicas: 3,
            churn_replicas: 1,
            restart_every_s: 5.0,
            bad_fraction: 0.1,
            sample_every_s: 1.0,
            time_scale: 0.05,
            max_rss_growth_mib: 16.0,
            max_fd_growth: 8.0,
            max_metrics_growth_kib: 64.0,
            min_success: 0.99,
        }
    }

    fn report(name: &str, rss: &[(f64, f64)], fds: &[(f64, f64)]) -> ProcessReport {
        ProcessReport {
            name: name.to_owned(),
            judged: true,
            rss_mib: trend(rss, 50.0),
            fds: trend(fds, 50.0),
        }
    }

    #[test]
    fn trend_ignores_warmup_and_spikes() {
        // Warm-up from 10 to 40 MiB, then flat at 40 with one 90 MiB spike.
        let mut pts: Vec<(f64, f64)> = (0..50)
            .map(|t| (f64::from(t), 10.0 + f64::from(t) * 0.6))
            .collect();
        pts.extend((50..100).map(|t| (f64::from(t), if t == 80 { 90.0 } else { 40.0 })));
        let t = trend(&pts, 50.0).unwrap();
        assert_eq!(t.samples, 50);
        assert_eq!((t.start, t.end, t.growth), (40.0, 40.0, 0.0));

        // A leak of 0.5 MiB/s: quarter medians at t = 55.5 s and 93.5 s → growth 19 MiB,
        // slope exactly 1800 MiB/h.
        let leak: Vec<(f64, f64)> = (0..100)
            .map(|t| (f64::from(t), 100.0 + 0.5 * f64::from(t)))
            .collect();
        let t = trend(&leak, 50.0).unwrap();
        assert_eq!(t.start, 100.0 + 0.5 * 55.5);
        assert_eq!(t.end, 100.0 + 0.5 * 93.5);
        assert_eq!(t.growth, 19.0);
        assert!(
            (t.slope_per_hour - 1800.0).abs() < 1e-6,
            "{}",
            t.slope_per_hour
        );

        assert_eq!(trend(&leak[..53], 50.0), None, "3 samples are too few");
    }

    #[test]
    fn judge_names_every_bound_exceeded() {
        let flat: Vec<(f64, f64)> = (0..100).map(|t| (f64::from(t), 30.0)).collect();
        let fds: Vec<(f64, f64)> = (0..100).map(|t| (f64::from(t), 20.0)).collect();
        let leaky_fds: Vec<(f64, f64)> = (0..100)
            .map(|t| (f64::from(t), 20.0 + f64::from(t / 4)))
            .collect();
        let leaky_rss: Vec<(f64, f64)> = (0..100)
            .map(|t| (f64::from(t), 30.0 + f64::from(t)))
            .collect();
        let mut requests = RequestStats {
            good_sent: 1000,
            good_ok: 995,
            good_failed: 5,
            ..RequestStats::default()
        };
        requests
            .bad
            .entry(BadKind::InvalidJson)
            .or_default()
            .insert(400, 20);
        let metrics = trend(&flat, 50.0);
        let procs = vec![report("epp", &flat, &fds), report("replica1", &flat, &fds)];
        let scrapes = MetricsScrapes::default();
        assert_eq!(
            judge(&plan(), &requests, &procs, metrics.as_ref(), &scrapes),
            Vec::<String>::new()
        );

        let procs = vec![
            report("epp", &leaky_rss, &fds),
            report("replica1", &flat, &leaky_fds),
        ];
        requests.good_ok = 980;
        requests.good_failed = 20;
        requests
            .bad
            .entry(BadKind::Oversize)
            .or_default()
            .insert(502, 2);
        requests
            .bad
            .entry(BadKind::HugeModel)
            .or_default()
            .insert(0, 1);
        let leaky_kib: Vec<(f64, f64)> = (0..100)
            .map(|t| (f64::from(t), 30.0 + 2.0 * f64::from(t)))
            .collect();
        let growing = trend(&leaky_kib, 50.0);
        let failed_scrapes = MetricsScrapes {
            errors: 3,
            first_error: Some("at 1.5 s: timed out".to_owned()),
            ..MetricsScrapes::default()
        };
        let failures = judge(
            &plan(),
            &requests,
            &procs,
            growing.as_ref(),
            &failed_scrapes,
        );
        assert_eq!(failures.len(), 7, "{failures:#?}");
        assert!(
            failures[0].starts_with("epp: RSS grew 38.0 MiB"),
            "{}",
            failures[0]
        );
        assert!(
            failures[1].starts_with("replica1: open FDs grew by 9.5"),
            "{}",
            failures[1]
        );
        assert!(
            failures[2].starts_with("EPP /metrics grew 76.0 KiB"),
            "{}",
            failures[2]
        );
        assert_eq!(
            failures[3],
            "EPP /metrics failed 3 scrape(s), first at 1.5 s: timed out"
        );
        assert!(
            failures[4].starts_with("20 of 1000 good requests failed"),
            "{}",
            failures[4]
        );
        assert_eq!(
            failures[5],
            "1 HugeModel request(s) answered nothing instead of a 4xx"
        );
        assert_eq!(
            failures[6],
            "2 Oversize request(s) answered 502 instead of a 4xx"
        );

        // A process with no samples after warm-up is a failure, not a pass.
        let empty = vec![report("epp", &flat[..10], &fds[..10])];
        let requests = RequestStats::default();
        assert_eq!(
            judge(&plan(), &requests, &empty, metrics.as_ref(), &scrapes),
            ["epp: too few samples after warm-up"]
        );
    }

    #[test]
    fn bad_bodies_are_what_they_say() {
        let invalid = BadKind::InvalidJson.body(1, "m");
        assert!(serde_json::from_slice::<serde_json::Value>(&invalid).is_err());
        let huge: serde_json::Value =
            serde_json::from_slice(&BadKind::HugeModel.body(7, "m")).unwrap();
        let name = huge["model"].as_str().unwrap();
        assert!(name.len() >= HUGE_MODEL_BYTES && name.starts_with("huge-7-"));
        let missing: serde_json::Value =
            serde_json::from_slice(&BadKind::MissingModel.body(1, "m")).unwrap();
        assert!(missing.get("model").is_none());
        assert!(BadKind::Oversize.body(1, "m").len() > EPP_MAX_BODY_BYTES);
    }

    #[test]
    fn plan_validation() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            soak: SoakArgs,
        }
        let parse = |args: &[&str]| {
            let mut argv = vec!["soak"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).unwrap().soak.plan()
        };
        let p = parse(&["--preset", "ci", "--replicas", "3"]).unwrap();
        assert_eq!(
            (p.duration_s, p.warmup_s, p.rate, p.restart_every_s),
            (30.0, 15.0, 20.0, 5.0)
        );
        let p = parse(&["--preset", "ci", "--duration", "2m", "--rate", "5"]).unwrap();
        assert_eq!((p.duration_s, p.rate), (120.0, 5.0));
        let err = |args: &[&str]| parse(args).unwrap_err().to_string();
        assert_eq!(
            err(&["--replicas", "2", "--churn-replicas", "2"]),
            "--churn-replicas must leave at least one replica that is not restarted (got 2 of 2)"
        );
        assert_eq!(
            err(&["--duration", "10s", "--warmup", "10s"]),
            "--warmup must be shorter than --duration"
        );
        assert_eq!(
            err(&["--bad-fraction", "1.5"]),
            "--bad-fraction must be within 0..=1"
        );
    }
}
