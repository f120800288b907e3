//! One routing setup as local processes: N `switchyard serve --backend sim` replicas, optionally
//! `switchyard epp` over them, and Envoy in front; plus the replicas' counters the comparison
//! reads (prefix-cache queries/hits, finished requests).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::client::{self, get_ok, get_text, HttpClient};
use super::envoy::{EnvoyError, EnvoyProc, LbPolicy, Routing};
use super::epp::{self, EppOptions};
use super::procs::{self, ManagedChild, ProcError};
use super::workload::{
    BATCH_OBJECTIVE, BATCH_PRIORITY, INTERACTIVE_OBJECTIVE, INTERACTIVE_PRIORITY,
};
use crate::promtext;

/// How long a replica or the EPP may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the first request through a fresh stack may keep failing (the EPP needs one scrape
/// of every replica before it can pick).
const WARMUP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Envoy(#[from] EnvoyError),
    #[error("no request succeeded through the gateway within {waited:?}: {last}")]
    Warmup { waited: Duration, last: String },
    #[error("scraping {url}: {reason}")]
    Scrape { url: String, reason: String },
}

/// How the gateway picks a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gateway {
    /// Envoy alone with its own load balancer.
    Envoy(LbPolicy),
    /// Envoy + ext_proc to `switchyard epp` with this EndpointPickerConfig (empty: default).
    Epp {
        config_text: String,
        /// `--inflight-accounting` of the EPP.
        inflight_accounting: bool,
    },
    /// Envoy + ext_proc to the EPP (default config) with `--fallback-endpoints=fallbacks`,
    /// routed through Envoy's override_host pool so a dead primary is retried on a fallback; the
    /// EPP gets `epp_args` too (the soak).
    EppWithFallbacks {
        fallbacks: u32,
        epp_args: Vec<String>,
    },
}

/// The replicas every policy gets (fresh processes each time, so caches start cold).
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    pub count: usize,
    pub sim_profile: String,
    /// Real seconds per simulated second.
    pub time_scale: f64,
    pub model: String,
    /// Extra `switchyard serve` flags (e.g. `--num-gpu-blocks-override=2000`).
    pub extra_args: Vec<String>,
    /// Serve this GGUF on the `cpu` backend instead of the `sim` backend, with this many
    /// threads each (`switchyard demo --model real`).
    pub gguf: Option<(PathBuf, usize)>,
}

/// The processes of one setup.
#[derive(Debug)]
pub struct Stack {
    replicas: Vec<ManagedChild>,
    pub replica_addrs: Vec<SocketAddr>,
    epp: Option<ManagedChild>,
    /// The EPP's Prometheus address, when there is an EPP.
    pub epp_metrics: Option<SocketAddr>,
    envoy: Option<EnvoyProc>,
    pub gateway: SocketAddr,
    /// What [`Stack::restart_replica`] needs to start a replica again.
    bin: PathBuf,
    spec: ReplicaSpec,
    dir: PathBuf,
    label: String,
    /// Flags of one replica only (its KV-event publisher port).
    replica_args: Vec<Vec<String>>,
    /// Restarts so far, per replica.
    restarts: Vec<u32>,
}

/// Placeholder in an EPP config for the replicas' KV-event sockets (a YAML flow map
/// `{"ip:port": "tcp://127.0.0.1:zmq_port", ...}`), filled in by [`Stack::start`].
pub const KV_EVENT_SOCKETS: &str = "{KV_EVENT_SOCKETS}";

/// Starts replica `i` of `spec` on `port` (not waiting for it).
fn spawn_replica(
    bin: &Path,
    spec: &ReplicaSpec,
    i: usize,
    port: u16,
    dir: &Path,
    label: &str,
    own_args: &[String],
) -> Result<ManagedChild, ProcError> {
    let name = format!("{label}-replica{i}");
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--host", "127.0.0.1"])
        .arg("--port")
        .arg(port.to_string());
    match &spec.gguf {
        Some((file, threads)) => cmd
            .args([
                "--backend",
                "cpu",
                "--threads",
                &threads.to_string(),
                "--model",
            ])
            .arg(file),
        None => cmd
            .args(["--backend", "sim", "--sim-profile"])
            .arg(&spec.sim_profile)
            .arg("--time-scale")
            .arg(spec.time_scale.to_string()),
    };
    cmd.arg("--served-model-name")
        .arg(&spec.model)
        .arg("--seed")
        .arg(i.to_string())
        .args(&spec.extra_args)
        .args(own_args)
        .env("RUST_LOG", "warn");
    ManagedChild::spawn(&name, &mut cmd, &dir.join(format!("{name}.log")))
}

impl Stack {
    /// Starts the replicas, the EPP (for [`Gateway::Epp`]) and Envoy, then sends one tiny
    /// request through the gateway until it succeeds.
    pub async fn start(
        bin: &Path,
        envoy: &Path,
        spec: &ReplicaSpec,
        gateway: &Gateway,
        dir: &Path,
        label: &str,
    ) -> Result<Self, StackError> {
        let ports = procs::free_ports(spec.count)?;
        // A precise-prefix EPP subscribes to each replica's vLLM-format ZMQ publisher: give each
        // its own port and tell the EPP which is whose (`{KV_EVENT_SOCKETS}` in the config).
        let mut gateway = gateway.clone();
        let mut replica_args = vec![Vec::new(); spec.count];
        if let Gateway::Epp { config_text, .. } = &mut gateway {
            if config_text.contains(KV_EVENT_SOCKETS) {
                let zmq_ports = procs::free_ports(spec.count)?;
                let mut sockets = Vec::new();
                for ((args, port), zport) in replica_args.iter_mut().zip(&ports).zip(&zmq_ports) {
                    args.push("--kv-events-config".to_string());
                    args.push(format!(
                        r#"{{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:{zport}","topic":"kv@127.0.0.1@model"}}"#
                    ));
                    sockets.push(format!("\"127.0.0.1:{port}\": \"tcp://127.0.0.1:{zport}\""));
                }
                *config_text =
                    config_text.replace(KV_EVENT_SOCKETS, &format!("{{{}}}", sockets.join(", ")));
            }
        }
        let gateway = &gateway;
        let mut replicas = Vec::with_capacity(spec.count);
        let mut replica_addrs = Vec::with_capacity(spec.count);
        for (i, port) in ports.iter().enumerate() {
            replicas.push(spawn_replica(
                bin,
                spec,
                i,
                *port,
                dir,
                label,
                &replica_args[i],
            )?);
            replica_addrs.push(SocketAddr::from(([127, 0, 0, 1], *port)));
        }
        let http = client::http_client();
        for (child, addr) in replicas.iter_mut().zip(&replica_addrs) {
            let url = format!("http://{addr}/health");
            child
                .wait_ready(START_TIMEOUT, || get_ok(&http, &url))
                .await?;
        }
        let mut stack = Stack {
            replicas,
            replica_addrs,
            epp: None,
            epp_metrics: None,
            envoy: None,
            gateway: SocketAddr::from(([127, 0, 0, 1], 0)),
            bin: bin.to_owned(),
            spec: spec.clone(),
            dir: dir.to_owned(),
            label: label.to_owned(),
            replica_args,
            restarts: vec![0; spec.count],
        };
        let (options, fallbacks): (EppOptions, Option<u32>) = match gateway {
            Gateway::Envoy(_) => (EppOptions::default(), None),
            Gateway::Epp {
                config_text,
                inflight_accounting,
            } => {
                // The mixed-priority workload's objectives, so its requests carry priorities
                // (requests without the objective header are unaffected).
                let pool = dir.join(format!("{label}-pool.yaml"));
                let objectives = [
                    (INTERACTIVE_OBJECTIVE, INTERACTIVE_PRIORITY),
                    (BATCH_OBJECTIVE, BATCH_PRIORITY),
                ];
                std::fs::write(
                    &pool,
                    epp::pool_file_text(&stack.replica_addrs, &objectives),
                )
                .map_err(|source| ProcError::Log {
                    path: pool.clone(),
                    source,
                })?;
                (
                    EppOptions {
                        inflight_accounting: Some(*inflight_accounting),
                        config_text: config_text.clone(),
                        endpoints_file: Some(pool),
                        ..EppOptions::default()
                    },
                    None,
                )
            }
            Gateway::EppWithFallbacks {
                fallbacks,
                epp_args,
            } => (
                EppOptions {
                    fallback_endpoints: Some(*fallbacks),
                    extra_args: epp_args.clone(),
                    ..EppOptions::default()
                },
                Some(*fallbacks),
            ),
        };
        let routing = match gateway {
            Gateway::Envoy(lb) => Routing::Plain { lb: *lb },
            Gateway::Epp { .. } | Gateway::EppWithFallbacks { .. } => {
                let name = format!("{label}-epp");
                let options = EppOptions {
                    refresh_metrics_interval_us: Some(scrape_interval_us(spec.time_scale)),
                    ..options
                };
                let (epp, ports) = epp::start(
                    bin,
                    &stack.replica_addrs,
                    &options,
                    &name,
                    &dir.join(format!("{name}.log")),
                    START_TIMEOUT,
                    &http,
                )
                .await?;
                stack.epp = Some(epp);
                stack.epp_metrics = Some(SocketAddr::from(([127, 0, 0, 1], ports.metrics)));
                match fallbacks {
                    None => Routing::Epp {
                        grpc_port: ports.grpc,
                        health_port: ports.health,
                    },
                    Some(_) => Routing::EppPool {
                        grpc_port: ports.grpc,
                        health_port: ports.health,
                    },
                }
            }
        };
        let envoy_proc = EnvoyProc::start(
            envoy,
            &routing,
            &stack.replica_addrs,
            dir,
            &format!("{label}-envoy"),
        )
        .await?;
        stack.gateway = envoy_proc.listen;
        stack.envoy = Some(envoy_proc);
        // One parseable line: what is running now and must be gone after we stop (tests read it).
        let pids: Vec<String> = stack.pids().iter().map(u32::to_string).collect();
        eprintln!("  [{label}] processes: {}", pids.join(" "));
        stack.warm_up(&http, &spec.model).await?;
        Ok(stack)
    }

    async fn warm_up(&mut self, http: &HttpClient, model: &str) -> Result<(), StackError> {
        let url = self.completions_url();
        let body = super::workload::completion_body(model, "warm up", 1);
        let start = std::time::Instant::now();
        loop {
            let out =
                client::stream_completion(http, &url, body.clone(), Duration::from_secs(10)).await;
            let Some(err) = out.error else {
                return Ok(());
            };
            self.check_running()?;
            if start.elapsed() > WARMUP_TIMEOUT {
                return Err(StackError::Warmup {
                    waited: WARMUP_TIMEOUT,
                    last: err,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `http://<gateway>/v1/completions`.
    pub fn completions_url(&self) -> String {
        format!("http://{}/v1/completions", self.gateway)
    }

    /// An error naming the first process that has exited.
    pub fn check_running(&mut self) -> Result<(), ProcError> {
        for r in &mut self.replicas {
            r.check_running()?;
        }
        if let Some(e) = &mut self.epp {
            e.check_running()?;
        }
        if let Some(e) = &mut self.envoy {
            e.child.check_running()?;
        }
        Ok(())
    }

    /// Process ids of everything started (for the no-orphans check).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.replicas.iter().map(ManagedChild::pid).collect();
        pids.extend(self.epp.as_ref().map(ManagedChild::pid));
        pids.extend(self.envoy.as_ref().map(|e| e.child.pid()));
        pids
    }

    /// The EPP's pid, when there is one.
    pub fn epp_pid(&self) -> Option<u32> {
        self.epp.as_ref().map(ManagedChild::pid)
    }

    /// Envoy's pid.
    pub fn envoy_pid(&self) -> Option<u32> {
        self.envoy.as_ref().map(|e| e.child.pid())
    }

    /// The replicas' pids, in replica order.
    pub fn replica_pids(&self) -> Vec<u32> {
        self.replicas.iter().map(ManagedChild::pid).collect()
    }

    /// Stops replica `i` — SIGKILL when `crash` (a crashed pod), else SIGTERM with `grace` to
    /// drain (a rolling restart) — and starts it again on the same port, waiting until its
    /// `/health` answers. Each life of a replica logs to its own file (`…-replica<i>.<n>.log`).
    pub async fn restart_replica(
        &mut self,
        i: usize,
        crash: bool,
        grace: Duration,
    ) -> Result<(), ProcError> {
        let Some(addr) = self.replica_addrs.get(i).copied() else {
            return Ok(());
        };
        if i >= self.replicas.len() {
            return Ok(());
        }
        let old = self.replicas.remove(i);
        if crash {
            drop(old); // SIGKILL to the group, reaped
        } else {
            old.stop(grace).await;
        }
        let life = self.restarts.get(i).copied().unwrap_or(0) + 1;
        if let Some(r) = self.restarts.get_mut(i) {
            *r = life;
        }
        let label = format!("{}-life{life}", self.label);
        let own = self.replica_args.get(i).cloned().unwrap_or_default();
        let mut fresh = spawn_replica(
            &self.bin,
            &self.spec,
            i,
            addr.port(),
            &self.dir,
            &label,
            &own,
        )?;
        let http = client::http_client();
        let url = format!("http://{addr}/health");
        let ready = fresh
            .wait_ready(START_TIMEOUT, || get_ok(&http, &url))
            .await;
        self.replicas.insert(i, fresh);
        ready
    }

    /// Counters of every replica, in replica order.
    pub async fn replica_counters(&self) -> Result<Vec<ReplicaCounters>, StackError> {
        let http = client::http_client();
        let mut out = Vec::with_capacity(self.replica_addrs.len());
        for addr in &self.replica_addrs {
            let url = format!("http://{addr}/metrics");
            let text = get_text(&http, &url)
                .await
                .map_err(|reason| StackError::Scrape {
                    url: url.clone(),
                    reason,
                })?;
            out.push(
                ReplicaCounters::parse(&text)
                    .map_err(|reason| StackError::Scrape { url, reason })?,
            );
        }
        Ok(out)
    }

    /// Stops Envoy, the EPP, then the replicas (gateway first, so nothing new reaches them).
    pub async fn stop(mut self) {
        let grace = Duration::from_secs(3);
        if let Some(e) = self.envoy.take() {
            e.child.stop(grace).await;
        }
        if let Some(e) = self.epp.take() {
            e.stop(grace).await;
        }
        for r in self.replicas.drain(..) {
            r.stop(grace).await;
        }
    }
}

/// The counters of one replica the comparison needs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReplicaCounters {
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: f64,
    /// Prompt tokens found there.
    pub prefix_hits: f64,
    /// Finished requests (every `finished_reason`).
    pub requests: f64,
}

impl ReplicaCounters {
    pub fn parse(text: &str) -> Result<Self, String> {
        // Asked for by sample name: matches both `# TYPE x counter` (vLLM) and
        // `# TYPE x_total counter` (prometheus-client, our decode server).
        let wanted = [
            "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total",
            "vllm:request_success_total",
        ];
        let fams = promtext::parse(text, &wanted, &promtext::Limits::default())
            .map_err(|e| e.to_string())?;
        let sum = |name: &str| -> f64 {
            fams.get(name)
                .map_or(0.0, |f| f.samples.iter().map(|s| s.value).sum())
        };
        Ok(Self {
            prefix_queries: sum("vllm:prefix_cache_queries_total"),
            prefix_hits: sum("vllm:prefix_cache_hits_total"),
            requests: sum("vllm:request_success_total"),
        })
    }

    /// `self - before`, per counter.
    pub fn since(&self, before: &Self) -> Self {
        Self {
            prefix_queries: self.prefix_queries - before.prefix_queries,
            prefix_hits: self.prefix_hits - before.prefix_hits,
            requests: self.requests - before.requests,
        }
    }
}

/// The `switchyard` binary to start children from: `explicit`, else this executable.
/// The EPP's scrape interval for replicas whose simulated time runs `1 / time_scale` times
/// faster than real time: production's 50 ms of (simulated) time, so the EPP sees metrics as
/// stale as it would in front of real GPUs, floored at 2 ms.
pub fn scrape_interval_us(time_scale: f64) -> u64 {
    const PRODUCTION_US: f64 = 50_000.0;
    const FLOOR_US: f64 = 2_000.0;
    let scaled = PRODUCTION_US * time_scale;
    if scaled.is_finite() {
        scaled.clamp(FLOOR_US, PRODUCTION_US) as u64
    } else {
        PRODUCTION_US as u64
    }
}

pub fn switchyard_bin(explicit: Option<&Path>) -> std::io::Result<PathBuf> {
    match explicit {
        Some(p) => Ok(p.to_owned()),
        None => std::env::current_exe(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_interval_follows_simulated_time() {
        assert_eq!(scrape_interval_us(1.0), 50_000);
        assert_eq!(scrape_interval_us(0.25), 12_500);
        assert_eq!(scrape_interval_us(0.05), 2_500);
        assert_eq!(scrape_interval_us(0.01), 2_000);
        assert_eq!(scrape_interval_us(4.0), 50_000);
        assert_eq!(scrape_interval_us(f64::NAN), 50_000);
    }

    #[test]
    fn counters_sum_over_labels_and_subtract() {
        let text = "# TYPE vllm:prefix_cache_queries counter\nvllm:prefix_cache_queries_total{model_name=\"m\"} 100\n# TYPE vllm:prefix_cache_hits_total counter\nvllm:prefix_cache_hits_total{model_name=\"m\"} 40\n# TYPE vllm:request_success counter\nvllm:request_success_total{finished_reason=\"length\",model_name=\"m\"} 3\nvllm:request_success_total{finished_reason=\"stop\",model_name=\"m\"} 2\n";
        let c = ReplicaCounters::parse(text).unwrap();
        assert_eq!(
            c,
            ReplicaCounters {
                prefix_queries: 100.0,
                prefix_hits: 40.0,
                requests: 5.0
            }
        );
        let d = c.since(&ReplicaCounters {
            prefix_queries: 10.0,
            prefix_hits: 4.0,
            requests: 1.0,
        });
        assert_eq!(d.prefix_hits, 36.0);
        assert_eq!(d.requests, 4.0);
    }
}
