//! The engine: scheduler, block manager with prefix cache, sequences and sampling, driven by one
//! loop on its own thread that owns all of them and the backend (no shared mutable state).
//!
//! Requests arrive on a bounded channel ([`EngineHandle::submit`]); each request's tokens leave on
//! its own channel as [`SeqEvent`]s. Dropping the receiver aborts the request and frees its
//! blocks at the start of the next step.

pub mod block_pool;
pub mod core;
pub mod hashing;
pub mod kv_manager;
pub mod sampling;
pub mod scheduler;
pub mod sequence;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::serve::backend::{Backend, BackendError};
use crate::serve::kv_events::KvEventLog;
use crate::serve::metrics::ServeMetrics;

pub use self::core::EngineCore;
pub use self::scheduler::SchedulingPolicy;
pub use crate::serve::protocol::{
    EngineRequest, FinishReason, SamplingParams, SeqEvent, SubmitError, TokenConstraint,
    TokenLogprobs,
};

/// Engine settings (validated by `serve::run` from the flags).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_name: String,
    pub block_size: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
    /// Waiting-queue order and preemption victims (`--scheduling-policy`).
    pub scheduling_policy: SchedulingPolicy,
    /// Requests waiting (queued + not yet admitted) beyond which new ones are refused.
    pub max_waiting: usize,
    pub enable_prefix_caching: bool,
    /// Use this many KV blocks instead of what the backend says fits (vLLM's
    /// `--num-gpu-blocks-override`).
    pub num_blocks_override: Option<usize>,
    /// Reported in `vllm:cache_config_info`.
    pub gpu_memory_utilization: f64,
    pub seed: u64,
    /// Real durations are multiplied by this before they reach the latency histograms
    /// (`1 / --time-scale` for the sim backend, so they read as simulated seconds).
    pub latency_scale: f64,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(
        "KV cache has {num_blocks} blocks of {block_size} tokens ({} tokens), fewer than \
         --max-model-len {max_model_len}; lower --max-model-len or give the KV cache more memory",
        num_blocks * block_size
    )]
    KvTooSmall {
        num_blocks: usize,
        block_size: usize,
        max_model_len: usize,
    },
    #[error("invalid engine config: {0}")]
    Config(String),
    #[error("cannot start the engine thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Live engine state for the API (health, admission). Written by the engine loop.
#[derive(Debug, Default)]
pub struct EngineShared {
    alive: AtomicBool,
    num_waiting: AtomicUsize,
    num_running: AtomicUsize,
    num_free_blocks: AtomicUsize,
}

impl EngineShared {
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
    pub fn num_waiting(&self) -> usize {
        self.num_waiting.load(Ordering::Relaxed)
    }
    pub fn num_running(&self) -> usize {
        self.num_running.load(Ordering::Relaxed)
    }
    pub fn num_free_blocks(&self) -> usize {
        self.num_free_blocks.load(Ordering::Relaxed)
    }
}

/// Facts about a started engine.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub model_name: String,
    pub backend: &'static str,
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_model_len: usize,
    pub max_waiting: usize,
    pub scheduling_policy: SchedulingPolicy,
    pub eos_token_ids: Vec<u32>,
    pub vocab_size: usize,
    /// The backend returns logits (so output constraints can apply); the plain sim does not.
    pub computes_logits: bool,
}

#[derive(Debug)]
pub enum Command {
    Submit(EngineRequest),
    /// End a request as `stop` (the API matched a stop string) and free its blocks.
    Stop {
        id: u64,
    },
}

/// Cloneable front of a running engine.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<EngineShared>,
    next_id: Arc<AtomicU64>,
    info: Arc<EngineInfo>,
    /// Capacity of each request's event channel (`--max-unread-stream-events`).
    max_unread_events: usize,
}

/// Default capacity of a request's event channel.
pub const DEFAULT_MAX_UNREAD_EVENTS: usize = 8192;

/// A submitted request: its id and the receiver its output arrives on. Dropping it aborts.
#[derive(Debug)]
pub struct RequestStream {
    pub id: u64,
    pub events: mpsc::Receiver<SeqEvent>,
}

impl EngineHandle {
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Output events a request may have waiting for its client before the engine aborts it
    /// (at least 8).
    pub fn with_max_unread_events(mut self, n: usize) -> Self {
        self.max_unread_events = n.max(8);
        self
    }

    pub fn shared(&self) -> &EngineShared {
        &self.shared
    }

    /// Queues a request. The prompt and parameters must already be validated against
    /// `max_model_len` (the engine fails requests that are not).
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<RequestStream, SubmitError> {
        self.submit_constrained(prompt, params, None)
    }

    /// [`EngineHandle::submit`] with an output constraint.
    pub fn submit_constrained(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        constraint: Option<Box<dyn TokenConstraint>>,
    ) -> Result<RequestStream, SubmitError> {
        if !self.shared.alive() {
            return Err(SubmitError::EngineDead);
        }
        let queued = self.tx.max_capacity() - self.tx.capacity();
        let waiting = self.shared.num_waiting() + queued;
        if waiting >= self.info.max_waiting {
            return Err(SubmitError::Overloaded {
                waiting,
                max: self.info.max_waiting,
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = mpsc::channel(self.max_unread_events);
        let req = EngineRequest {
            id,
            prompt,
            params,
            arrival: Instant::now(),
            events,
            constraint,
        };
        match self.tx.try_send(Command::Submit(req)) {
            Ok(()) => Ok(RequestStream { id, events: rx }),
            Err(mpsc::error::TrySendError::Full(_)) => Err(SubmitError::Overloaded {
                waiting,
                max: self.info.max_waiting,
            }),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SubmitError::EngineDead),
        }
    }

    /// Ends request `id` with reason `stop`. Best effort: if the command queue is full the
    /// caller's dropped receiver still aborts the request.
    /// Returns false when the command could not be queued.
    pub fn stop(&self, id: u64) -> bool {
        self.tx.try_send(Command::Stop { id }).is_ok()
    }
}

/// Sizes the KV cache, initialises the backend and starts the engine thread.
pub fn spawn(
    config: EngineConfig,
    backend: Box<dyn Backend>,
    metrics: Arc<ServeMetrics>,
    kv_events: Option<Arc<KvEventLog>>,
) -> Result<EngineHandle, EngineError> {
    let shared = Arc::new(EngineShared::default());
    let core = EngineCore::new(
        config.clone(),
        backend,
        metrics,
        kv_events,
        Arc::clone(&shared),
    )?;
    let info = Arc::new(core.info());
    // Room for the whole waiting allowance, so admission control, not the channel, refuses.
    let (tx, rx) = mpsc::channel(config.max_waiting.clamp(1, 1 << 16));
    shared.alive.store(true, Ordering::Release);
    std::thread::Builder::new()
        .name("switchyard-engine".into())
        .spawn(move || core.run(rx))
        .map_err(EngineError::Spawn)?;
    Ok(EngineHandle {
        tx,
        shared,
        next_id: Arc::new(AtomicU64::new(1)),
        info,
        max_unread_events: DEFAULT_MAX_UNREAD_EVENTS,
    })
}
