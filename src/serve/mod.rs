//! Decode server: OpenAI-compatible HTTP API and vLLM-compatible metrics over one engine
//! (paged KV cache, prefix caching, continuous batching) and pluggable backends.
//!
//! [`start`] wires backend → engine thread → HTTP (and optionally the KV-event gRPC stream) and
//! returns the bound addresses, so tests run the real server on `127.0.0.1:0`; [`run`] is the
//! `switchyard serve` entry point.
//!
//! ```text
//! protocol   shared vocabulary (SamplingParams, EngineRequest, SeqEvent, FinishReason,
//!            SubmitError); a leaf every other part may import
//! api/       HTTP routes, OpenAI types, detokenising + stop strings, the one error → reply point
//! engine/    one thread: scheduler (schedule → update, owns all queue and KV state), block pool
//!            + prefix cache, sampling; talks to the model only through backend::Backend
//! backend/   the Backend trait and its cpu, sim and cuda implementations
//! model/     config, weights, tokenizer, chat template
//! metrics    vLLM-named Prometheus metrics (written by the engine, encoded by /metrics)
//! ```

pub mod api;
pub mod approx_codec;
pub mod backend;
pub mod codec;
pub mod conn;
pub mod engine;
pub mod kv_events;
pub mod kv_zmq;
pub mod metrics;
pub mod model;
pub mod protocol;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::api::generate::RequestLimits;
use self::api::AppState;
use self::approx_codec::ApproxCodec;
use self::backend::sim::{SimBackend, SimOptions};
use self::backend::Backend;
use self::codec::TextCodec;
use self::engine::{EngineConfig, EngineError, EngineHandle};
use self::kv_events::KvEventLog;
use self::metrics::ServeMetrics;

/// Which backend runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// Reference f32 CPU implementation (needs `--model`).
    Cpu,
    /// Roofline-modelled accelerator for load tests (no weights).
    Sim,
    /// NVIDIA GPU through cudarc + NVRTC-compiled kernels (needs `--model`, a driver, CUDA 12
    /// NVRTC and cuBLAS at run time; see docs/cuda-backend.md).
    Cuda,
}

/// Weight quantization (`--quantization`, vLLM's flag and value names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantization {
    /// FP8 E4M3 projection weights with per-channel scales (cuda backend).
    Fp8,
}

/// Command-line flags of `switchyard serve` (named like vLLM's where they overlap).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Model directory (Hugging Face layout: config.json, *.safetensors, tokenizer.json).
    /// Required for `cpu`; for `sim` it only supplies the tokenizer (else 4 bytes per token).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    #[arg(long, default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// HTTP port (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Model names clients may ask for; the first is used in metrics. Default: the model
    /// directory (cpu) or the sim profile's model.
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Context length (prompt + output). Default: the model's (or sim profile's) maximum.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Sequences per step at most.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Tokens per step at most (prefills are chunked to fit).
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    /// Waiting requests beyond which new ones get 503 with Retry-After.
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,
    /// `fcfs`: first come, first served. `priority`: by the request body's `priority` (lower
    /// first, default 0), then arrival; a waiting request preempts (recompute) the worst
    /// running one of a strictly higher priority number when no slot or KV block is free.
    #[arg(long, value_enum, default_value_t = engine::SchedulingPolicy::Fcfs)]
    pub scheduling_policy: engine::SchedulingPolicy,
    /// Fraction of device memory for weights + KV cache (sim, cuda).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// KV-cache size for the cpu backend, in bytes (suffixes KiB, MiB, GiB accepted).
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub kv_cache_memory: u64,
    /// Use exactly this many KV blocks.
    #[arg(long)]
    pub num_gpu_blocks_override: Option<usize>,
    /// Disable prefix caching.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// Accepted for vLLM compatibility (prefix caching is on by default).
    #[arg(long, hide = true)]
    pub enable_prefix_caching: bool,
    /// Accelerator + model the sim backend models.
    #[arg(long, default_value = "l4-qwen2.5-7b")]
    pub sim_profile: String,
    /// Sim backend: real seconds per simulated second (0.01 runs 100× faster; 0 never sleeps).
    /// Reported latencies are in simulated seconds.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Sim backend, for API tests and demos: every response is the text of this file (tokenised
    /// with `--model`'s tokenizer) followed by EOS, produced as logits so sampling, structured
    /// output masks and tool-call parsing run as for a real model.
    #[arg(long)]
    pub sim_script: Option<PathBuf>,
    /// Seed for sampling without a request seed, and for sim tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Serve the KV-cache event stream (gRPC `switchyard.kvevents.v1.KvEvents`) on this port.
    /// Off by default so several replicas can share a host.
    #[arg(long)]
    pub kv_events_port: Option<u16>,
    /// Events the KV-event log retains for resuming subscribers.
    #[arg(long, default_value_t = 100_000)]
    pub kv_events_buffer: usize,
    /// File holding the bearer token KV-event subscribers must send
    /// (`authorization: Bearer <token>`); without it any client that reaches the port may
    /// subscribe (the stream carries prompt token ids).
    #[arg(long)]
    pub kv_events_token_file: Option<std::path::PathBuf>,
    /// Concurrent KV-event subscribers; one more gets RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 64)]
    pub kv_events_max_subscribers: usize,
    /// vLLM's KV-event publisher config (JSON), e.g.
    /// `{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","topic":"kv-events"}`:
    /// the same events as `--kv-events-port`, in vLLM's msgpack format over ZMQ PUB.
    #[arg(long)]
    pub kv_events_config: Option<String>,
    /// Largest accepted request body.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_request_body_bytes: usize,
    // --- limits against hostile clients (docs/security.md, "Decode server limits") ---
    /// Most stop strings per request (400 naming `stop` above).
    #[arg(long, default_value_t = 64)]
    pub max_stop_strings: usize,
    /// Longest stop string in bytes (400 naming `stop` above).
    #[arg(long, default_value_t = 1024)]
    pub max_stop_string_bytes: usize,
    /// Most `stop_token_ids` per request (400 naming `stop_token_ids` above).
    #[arg(long, default_value_t = 1024)]
    pub max_stop_token_ids: usize,
    /// Prompt text bytes beyond which a prompt cannot fit the context and is refused before
    /// tokenising. 0: `--max-model-len` × the longest vocabulary entry in bytes.
    #[arg(long, default_value_t = 0)]
    pub max_prompt_bytes: usize,
    /// Requests decoded, templated and tokenised at once on the blocking pool. 0: one per CPU.
    #[arg(long, default_value_t = 0)]
    pub tokenizer_pool_size: usize,
    /// Most open HTTP connections; more are answered 503 and closed.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// A request head must arrive within this, from connect or from the previous response
    /// (so it is also the HTTP/1 keep-alive idle limit).
    #[arg(long, default_value = "60s", value_parser = crate::flagfmt::parse_go_duration)]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no traffic, or whose peer reads nothing the
    /// server has to send, is closed after this.
    #[arg(long, default_value = "300s", value_parser = crate::flagfmt::parse_go_duration)]
    pub idle_timeout: Duration,
    /// Output events a streaming client may leave unread before its request is aborted.
    #[arg(long, default_value_t = 8192)]
    pub max_unread_stream_events: usize,
    /// cpu backend threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// GPUs per replica (vLLM's flag). Only 1 is supported until tensor parallelism lands
    /// (design: docs/multi-gpu.md).
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// Weight quantization: `fp8` stores every projection (and an untied lm_head) as FP8 E4M3
    /// with per-channel scales, quantized at load (cuda backend only; an FP8 checkpoint selects
    /// it by itself). See docs/cuda-backend.md.
    #[arg(long, value_enum)]
    pub quantization: Option<Quantization>,
    /// cuda backend: replay decode steps from CUDA graphs captured per batch-size bucket
    /// (off by default until measured on a GPU; docs/cuda-backend.md).
    #[arg(long)]
    pub cuda_graphs: bool,
}

impl ServeArgs {
    /// Defaults for a sim server on `127.0.0.1:0` (tests and benchmarks).
    pub fn sim_for_tests(profile: &str, time_scale: f64) -> Self {
        Self {
            model: None,
            backend: BackendKind::Sim,
            host: IpAddr::from([127, 0, 0, 1]),
            port: 0,
            served_model_name: Vec::new(),
            max_model_len: None,
            block_size: 16,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            max_waiting: 1024,
            scheduling_policy: engine::SchedulingPolicy::Fcfs,
            gpu_memory_utilization: 0.9,
            kv_cache_memory: 1 << 30,
            num_gpu_blocks_override: None,
            no_enable_prefix_caching: false,
            enable_prefix_caching: false,
            sim_profile: profile.to_owned(),
            time_scale,
            sim_script: None,
            seed: 0,
            kv_events_port: None,
            tensor_parallel_size: 1,
            kv_events_buffer: 100_000,
            kv_events_token_file: None,
            kv_events_max_subscribers: 64,
            kv_events_config: None,
            max_request_body_bytes: 32 * 1024 * 1024,
            max_stop_strings: 64,
            max_stop_string_bytes: 1024,
            max_stop_token_ids: 1024,
            max_prompt_bytes: 0,
            tokenizer_pool_size: 0,
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(300),
            max_unread_stream_events: 8192,
            threads: None,
            quantization: None,
            cuda_graphs: false,
        }
    }
}

/// Parses a byte size: plain bytes or a number with KiB/MiB/GiB/KB/MB/GB (also K/M/G).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    Ok((value * mult) as u64)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("unknown --sim-profile {name:?} (known: {known})")]
    UnknownProfile { name: String, known: String },
    #[error("--backend {0} needs --model DIR")]
    MissingModel(&'static str),
    #[error("--backend {0} is not available in this build")]
    BackendUnavailable(&'static str),
    #[error("invalid flag: {0}")]
    InvalidFlag(String),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error(transparent)]
    KvZmq(#[from] kv_zmq::KvZmqError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    pub http_addr: SocketAddr,
    pub kv_events_addr: Option<SocketAddr>,
    /// Where the vLLM-format ZMQ publisher bound (`--kv-events-config` with a wildcard host).
    pub kv_zmq_addr: Option<SocketAddr>,
    pub engine: EngineHandle,
    pub metrics: Arc<ServeMetrics>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    /// Stops accepting, lets in-flight responses finish (bounded by `grace`), then returns.
    pub async fn shutdown(self, grace: Duration) {
        self.shutdown.send_replace(true);
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(grace, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

struct Built {
    backend: Box<dyn Backend>,
    codec: Arc<dyn TextCodec>,
    default_name: String,
    default_max_model_len: usize,
    latency_scale: f64,
}

fn build_backend(args: &ServeArgs) -> Result<Built, ServeError> {
    if args.backend != BackendKind::Cuda && (args.quantization.is_some() || args.cuda_graphs) {
        return Err(ServeError::InvalidFlag(
            "--quantization and --cuda-graphs apply to --backend cuda only".into(),
        ));
    }
    match args.backend {
        BackendKind::Sim => {
            let profile = backend::sim::profile(&args.sim_profile).ok_or_else(|| {
                let known: Vec<_> = backend::sim::profiles().iter().map(|p| p.name).collect();
                ServeError::UnknownProfile {
                    name: args.sim_profile.clone(),
                    known: known.join(", "),
                }
            })?;
            if !(args.time_scale.is_finite() && args.time_scale >= 0.0) {
                return Err(ServeError::InvalidFlag(format!(
                    "--time-scale must be ≥ 0, got {}",
                    args.time_scale
                )));
            }
            let codec: Arc<dyn TextCodec> = match &args.model {
                Some(dir) => model::load_codec(dir)?,
                None => Arc::new(ApproxCodec::new(profile.regular_vocab)),
            };
            let opts = SimOptions {
                block_size: args.block_size,
                gpu_memory_utilization: args.gpu_memory_utilization,
                time_scale: args.time_scale,
                seed: args.seed,
            };
            let default_name = profile.model.to_owned();
            let default_max_model_len = profile.max_model_len;
            let sim = SimBackend::new(profile, opts);
            let backend: Box<dyn Backend> = match &args.sim_script {
                None => Box::new(sim),
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        ServeError::InvalidFlag(format!("--sim-script {}: {e}", path.display()))
                    })?;
                    let script = codec
                        .encode(&text, false)
                        .map_err(|e| ServeError::InvalidFlag(format!("--sim-script: {e}")))?;
                    let eos = codec.eos_token_ids().first().copied().unwrap_or(0);
                    Box::new(backend::scripted::ScriptedBackend::new(sim, script, eos))
                }
            };
            Ok(Built {
                default_name,
                default_max_model_len,
                latency_scale: if args.time_scale > 0.0 {
                    1.0 / args.time_scale
                } else {
                    1.0
                },
                backend,
                codec,
            })
        }
        BackendKind::Cpu => {
            let dir = args.model.as_ref().ok_or(ServeError::MissingModel("cpu"))?;
            cpu_backend(args, dir)
        }
        BackendKind::Cuda => {
            let dir = args
                .model
                .as_ref()
                .ok_or(ServeError::MissingModel("cuda"))?;
            cuda_backend(args, dir)
        }
    }
}

fn cuda_backend(args: &ServeArgs, dir: &std::path::Path) -> Result<Built, ServeError> {
    let config = model::ModelConfig::load(dir)?;
    let codec = model::load_codec(dir)?;
    let opts = backend::cuda::CudaOptions {
        block_size: args.block_size,
        gpu_memory_utilization: args.gpu_memory_utilization,
        tensor_parallel_size: args.tensor_parallel_size,
        num_gpu_blocks_override: args.num_gpu_blocks_override,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_num_seqs: args.max_num_seqs,
        max_model_len: args.max_model_len,
        device: 0,
        kernel_cache_dir: backend::cuda::compile::KernelCache::default_dir(),
        weight_format: match args.quantization {
            Some(Quantization::Fp8) => backend::cuda::memory::WeightFormat::Fp8,
            None => backend::cuda::memory::WeightFormat::Bf16,
        },
        cuda_graphs: args.cuda_graphs,
        gemv_bf16: false,
    };
    let backend = backend::cuda::CudaBackend::load(dir, opts)?;
    Ok(Built {
        backend: Box::new(backend),
        codec,
        default_name: dir.display().to_string(),
        default_max_model_len: config.max_position_embeddings,
        latency_scale: 1.0,
    })
}

fn cpu_backend(args: &ServeArgs, dir: &std::path::Path) -> Result<Built, ServeError> {
    let opts = backend::cpu::CpuOptions {
        block_size: args.block_size,
        kv_cache_memory_bytes: usize::try_from(args.kv_cache_memory).unwrap_or(usize::MAX),
        threads: args.threads.unwrap_or(0),
    };
    // `--model` is a model directory (config.json + safetensors) or one GGUF file.
    let (config, codec, backend) = if model::is_gguf(dir) {
        let m = model::load_gguf(dir)?;
        let backend = backend::cpu::CpuBackend::new(m.config.clone(), m.weights, opts)?;
        (m.config, m.codec, backend)
    } else {
        let config = model::ModelConfig::load(dir)?;
        let codec = model::load_codec(dir)?;
        (config, codec, backend::cpu::CpuBackend::load(dir, opts)?)
    };
    Ok(Built {
        backend: Box::new(backend),
        codec,
        // vLLM names the model after the path it was given.
        default_name: dir.display().to_string(),
        default_max_model_len: config.max_position_embeddings,
        latency_scale: 1.0,
    })
}

/// Starts the engine and the listeners; returns once they are bound.
/// The KV-event subscriber policy from the flags: the token file is read once at startup.
fn kv_events_policy(args: &ServeArgs) -> Result<kv_events::SubscriberPolicy, ServeError> {
    if args.kv_events_max_subscribers == 0 {
        return Err(ServeError::InvalidFlag(
            "--kv-events-max-subscribers must be at least 1".into(),
        ));
    }
    let token = match &args.kv_events_token_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ServeError::InvalidFlag(format!("--kv-events-token-file {}: {e}", path.display()))
            })?;
            let token = text.trim();
            if token.is_empty() {
                return Err(ServeError::InvalidFlag(format!(
                    "--kv-events-token-file {} is empty",
                    path.display()
                )));
            }
            Some(token.to_string())
        }
    };
    Ok(kv_events::SubscriberPolicy {
        token,
        max_subscribers: args.kv_events_max_subscribers,
    })
}

pub async fn start(args: ServeArgs) -> Result<ServerHandle, ServeError> {
    if args.tensor_parallel_size != 1 {
        return Err(ServeError::InvalidFlag(format!(
            "--tensor-parallel-size {} is not supported yet: one replica serves on one GPU \
             (multi-GPU design: docs/multi-gpu.md); run more replicas instead",
            args.tensor_parallel_size
        )));
    }
    for (name, value) in [
        ("--max-connections", args.max_connections),
        ("--max-unread-stream-events", args.max_unread_stream_events),
    ] {
        if !(8..=1 << 20).contains(&value) {
            return Err(ServeError::InvalidFlag(format!(
                "{name} must be between 8 and 1048576, got {value}"
            )));
        }
    }
    if args.header_read_timeout.is_zero() || args.idle_timeout.is_zero() {
        return Err(ServeError::InvalidFlag(
            "--header-read-timeout and --idle-timeout must be positive".into(),
        ));
    }
    let built = build_backend(&args)?;
    if args.gpu_memory_utilization <= 0.0 || args.gpu_memory_utilization > 1.0 {
        return Err(ServeError::InvalidFlag(format!(
            "--gpu-memory-utilization must be in (0, 1], got {}",
            args.gpu_memory_utilization
        )));
    }
    let names = if args.served_model_name.is_empty() {
        vec![built.default_name.clone()]
    } else {
        args.served_model_name.clone()
    };
    let model_name = names[0].clone();
    let max_model_len = args.max_model_len.unwrap_or(built.default_max_model_len);
    let metrics = Arc::new(ServeMetrics::new(&model_name));
    let zmq_config = match &args.kv_events_config {
        Some(json) => kv_zmq::KvEventsConfig::parse(json)?,
        None => None,
    };
    // One log feeds both outputs; without the gRPC port it needs to retain nothing.
    let kv_log = match (args.kv_events_port, &zmq_config) {
        (Some(_), _) => Some(KvEventLog::new(
            args.kv_events_buffer,
            &model_name,
            args.block_size,
        )),
        (None, Some(_)) => Some(KvEventLog::new(1, &model_name, args.block_size)),
        (None, None) => None,
    };
    let config = EngineConfig {
        model_name: model_name.clone(),
        block_size: args.block_size,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_model_len,
        max_waiting: args.max_waiting,
        scheduling_policy: args.scheduling_policy,
        enable_prefix_caching: !args.no_enable_prefix_caching,
        num_blocks_override: args.num_gpu_blocks_override,
        gpu_memory_utilization: args.gpu_memory_utilization,
        seed: args.seed,
        latency_scale: built.latency_scale,
        eos_token_ids: built.codec.eos_token_ids().to_vec(),
    };
    let engine = engine::spawn(config, built.backend, Arc::clone(&metrics), kv_log.clone())?
        .with_max_unread_events(args.max_unread_stream_events);

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut kv_zmq_addr = None;
    if let (Some(cfg), Some(log)) = (&zmq_config, &kv_log) {
        let publisher = kv_zmq::start(cfg, shutdown_rx.clone()).await?;
        kv_zmq_addr = publisher.addr;
        log.attach_zmq(publisher.sink);
        tasks.push(publisher.task);
        tracing::info!(endpoint = %cfg.endpoint, bound = ?kv_zmq_addr, topic = %cfg.topic,
            replay = ?publisher.replay_addr, "publishing vLLM-format KV events over ZMQ");
    }
    let http = SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(http)
        .await
        .map_err(|source| ServeError::Bind { addr: http, source })?;
    let http_addr = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr: http, source })?;
    let max_prompt_bytes = match args.max_prompt_bytes {
        0 => max_model_len.saturating_mul(built.codec.max_token_bytes()),
        n => n,
    };
    let pool_size = match args.tokenizer_pool_size {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n,
    };
    let state = Arc::new(AppState {
        engine: engine.clone(),
        codec: Arc::clone(&built.codec),
        metrics: Arc::clone(&metrics),
        served_model_names: names,
        max_body_bytes: args.max_request_body_bytes,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        limits: RequestLimits {
            max_stop_strings: args.max_stop_strings,
            max_stop_string_bytes: args.max_stop_string_bytes,
            max_stop_token_ids: args.max_stop_token_ids,
            max_prompt_bytes,
        },
        preprocess: Arc::new(tokio::sync::Semaphore::new(pool_size)),
        grammars: api::constrained::Grammars::new(
            Arc::clone(&built.codec),
            engine.info().vocab_size,
            engine.info().eos_token_ids.first().copied(),
        ),
    });
    let app = api::router(state);
    let limits = conn::ConnLimits {
        max_connections: args.max_connections,
        header_read_timeout: args.header_read_timeout,
        idle_timeout: args.idle_timeout,
    };
    tasks.push(tokio::spawn(conn::serve(
        listener,
        app,
        limits,
        shutdown_rx.clone(),
    )));

    let mut kv_events_addr = None;
    if let (Some(port), Some(log)) = (args.kv_events_port, kv_log) {
        let addr = SocketAddr::new(args.host, port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        kv_events_addr = Some(
            listener
                .local_addr()
                .map_err(|source| ServeError::Bind { addr, source })?,
        );
        let policy = kv_events_policy(&args)?;
        if policy.token.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "KV-event stream has no --kv-events-token-file: any client that reaches this \
                 port can read the token ids of cached prompts"
            );
        }
        let mut rx = shutdown_rx.clone();
        let service = log.service(policy);
        tasks.push(tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let signal = async move {
                let _ = rx.wait_for(|v| *v).await;
            };
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, signal)
                .await
            {
                tracing::error!(error = %e, "KV-event server failed");
            }
        }));
    }
    tracing::info!(
        %http_addr,
        kv_events = ?kv_events_addr,
        kv_zmq = ?kv_zmq_addr,
        model = %model_name,
        backend = engine.info().backend,
        max_model_len,
        "switchyard serve listening"
    );
    Ok(ServerHandle {
        http_addr,
        kv_events_addr,
        kv_zmq_addr,
        engine,
        metrics,
        shutdown,
        tasks,
    })
}

/// Runs the decode server until SIGTERM/SIGINT.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    crate::process::init_logging("info", crate::process::LogFormat::Console);
    let handle = start(args).await?;
    let signal = crate::process::shutdown_signal().await;
    tracing::info!(?signal, "shutting down");
    handle.shutdown(Duration::from_secs(10)).await;
    Ok(())
}
