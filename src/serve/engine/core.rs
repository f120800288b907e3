//! The engine loop, once per step: schedule → build the batch → execute on the backend → sample
//! → [`Scheduler::update`] → report (events to clients, metrics). One owner for scheduler, KV
//! manager and backend; the scheduler makes every state change, this loop only drives it and
//! tells the outside world. It talks to the backend through the [`Backend`] trait alone.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::block_pool::BlockPool;
use super::kv_manager::KvManager;
use super::sampling::{request_rng, Sampler};
use super::scheduler::{MissingRow, Sampled, Scheduler, SchedulerConfig, StepPlan, TokenUpdate};
use super::sequence::Sequence;
use super::{Command, EngineConfig, EngineError, EngineInfo, EngineShared};
use crate::serve::backend::{Backend, BackendError, SeqSlice, StepBatch, StepOutput};
use crate::serve::kv_events::KvEventLog;
use crate::serve::metrics::{CacheConfigInfo, ServeMetrics};
use crate::serve::protocol::{EngineRequest, FinishReason, SeqEvent, TokenLogprobs};

/// Scheduler, KV manager and backend with the buffers one step reuses.
pub struct EngineCore {
    cfg: EngineConfig,
    sched: Scheduler,
    backend: Box<dyn Backend>,
    num_blocks: usize,
    batch: StepBatch,
    out: StepOutput,
    plan: StepPlan,
    sampled: Vec<Sampled>,
    sampler: Sampler,
    /// A constrained row's logits, masked (the raw row stays for logprobs, as vLLM reports them).
    masked: Vec<f32>,
    metrics: Arc<ServeMetrics>,
    kv_events: Option<Arc<KvEventLog>>,
    shared: Arc<EngineShared>,
}

impl std::fmt::Debug for EngineCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineCore")
            .field("backend", &self.backend.name())
            .field("num_blocks", &self.num_blocks)
            .finish_non_exhaustive()
    }
}

/// Marks the engine dead when the loop ends for any reason, panics included.
struct AliveGuard(Arc<EngineShared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Release);
    }
}

impl EngineCore {
    /// Validates `cfg`, sizes the block pool and initialises the backend's KV cache.
    pub fn new(
        cfg: EngineConfig,
        mut backend: Box<dyn Backend>,
        metrics: Arc<ServeMetrics>,
        kv_events: Option<Arc<KvEventLog>>,
        shared: Arc<EngineShared>,
    ) -> Result<Self, EngineError> {
        let nonzero = [
            ("block_size", cfg.block_size),
            ("max_num_seqs", cfg.max_num_seqs),
            ("max_num_batched_tokens", cfg.max_num_batched_tokens),
            ("max_model_len", cfg.max_model_len),
            ("max_waiting", cfg.max_waiting),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(EngineError::Config(format!("{name} must be at least 1")));
        }
        let spec = backend.kv_spec();
        if spec.block_size != cfg.block_size {
            return Err(EngineError::Config(format!(
                "backend block size {} differs from --block-size {}",
                spec.block_size, cfg.block_size
            )));
        }
        let num_blocks = cfg
            .num_blocks_override
            .unwrap_or_else(|| backend.available_kv_blocks());
        if num_blocks.saturating_mul(cfg.block_size) < cfg.max_model_len {
            return Err(EngineError::KvTooSmall {
                num_blocks,
                block_size: cfg.block_size,
                max_model_len: cfg.max_model_len,
            });
        }
        backend.init_kv(num_blocks)?;
        let pool = BlockPool::new(num_blocks, cfg.enable_prefix_caching, kv_events.is_some());
        let kv = KvManager::new(pool, cfg.block_size, &cfg.model_name);
        let sched = Scheduler::new(
            SchedulerConfig {
                policy: cfg.scheduling_policy,
                max_num_seqs: cfg.max_num_seqs,
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                max_model_len: cfg.max_model_len,
                eos_token_ids: cfg.eos_token_ids.clone(),
            },
            kv,
        );
        metrics.set_cache_config(&CacheConfigInfo {
            block_size: cfg.block_size,
            num_gpu_blocks: num_blocks,
            enable_prefix_caching: cfg.enable_prefix_caching,
            gpu_memory_utilization: cfg.gpu_memory_utilization,
        });
        if let Some(log) = &kv_events {
            log.set_num_blocks(num_blocks);
        }
        shared.num_free_blocks.store(num_blocks, Ordering::Relaxed);
        tracing::info!(
            backend = backend.name(),
            num_blocks,
            block_size = cfg.block_size,
            kv_tokens = num_blocks * cfg.block_size,
            "engine ready"
        );
        Ok(Self {
            cfg,
            sched,
            backend,
            num_blocks,
            batch: StepBatch::default(),
            out: StepOutput::default(),
            plan: StepPlan::default(),
            sampled: Vec::new(),
            sampler: Sampler::default(),
            masked: Vec::new(),
            metrics,
            kv_events,
            shared,
        })
    }

    pub fn info(&self) -> EngineInfo {
        EngineInfo {
            model_name: self.cfg.model_name.clone(),
            backend: self.backend.name(),
            block_size: self.cfg.block_size,
            num_blocks: self.num_blocks,
            max_model_len: self.cfg.max_model_len,
            max_waiting: self.cfg.max_waiting,
            scheduling_policy: self.cfg.scheduling_policy,
            eos_token_ids: self.cfg.eos_token_ids.clone(),
            vocab_size: self.backend.vocab_size(),
            computes_logits: self.backend.computes_logits(),
        }
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    pub fn has_work(&self) -> bool {
        self.sched.has_work()
    }

    /// Runs until every [`EngineHandle`](super::EngineHandle) is dropped and the work is done,
    /// or the backend fails (then every request gets `Failed` and `/health` turns 503).
    pub fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let _guard = AliveGuard(Arc::clone(&self.shared));
        loop {
            if !self.sched.has_work() {
                match rx.blocking_recv() {
                    Some(cmd) => self.handle(cmd),
                    None => break,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            match self.step() {
                Ok(0) if self.sched.has_work() => {
                    // Nothing fits this step (only possible transiently); do not spin hot.
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "engine step failed; engine stops");
                    self.shared.alive.store(false, Ordering::Release);
                    let message = format!("engine failure: {e}");
                    self.sched.remove_where(
                        |_| true,
                        |s| {
                            s.send(SeqEvent::Failed {
                                message: message.clone(),
                            })
                        },
                    );
                    self.publish();
                    return;
                }
            }
        }
        tracing::info!("engine stopped");
    }

    /// Applies one command from the API.
    pub fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(req) => self.submit(req),
            Command::Stop { id } => {
                if let Some(seq) = self.sched.abort(id) {
                    self.finish(&seq, FinishReason::Stop, None, Instant::now());
                }
            }
        }
    }

    /// Queues a request (the engine-side check of what the API validated).
    pub fn submit(&mut self, req: EngineRequest) {
        let total = req.prompt.len().saturating_add(req.params.max_tokens);
        if req.prompt.is_empty() || req.params.max_tokens == 0 || total > self.cfg.max_model_len {
            let _ = req.events.try_send(SeqEvent::Failed {
                message: format!(
                    "invalid request: prompt {} tokens, max_tokens {}, max_model_len {}",
                    req.prompt.len(),
                    req.params.max_tokens,
                    self.cfg.max_model_len
                ),
            });
            return;
        }
        tracing::trace!(
            request_id = req.id,
            prompt_tokens = req.prompt.len(),
            "request queued"
        );
        let rng = request_rng(&req.params, self.cfg.seed, req.id);
        self.sched.add(Sequence::new(req, rng));
        self.shared
            .num_waiting
            .store(self.sched.num_waiting(), Ordering::Relaxed);
    }

    /// One engine step. Returns the number of tokens the backend processed.
    pub fn step(&mut self) -> Result<usize, EngineError> {
        let (metrics, scale) = (&self.metrics, self.cfg.latency_scale);
        self.sched.remove_where(Sequence::client_gone, |seq| {
            tracing::debug!(
                request_id = seq.id,
                "client gone or not reading; request aborted"
            );
            finish_seq(
                metrics,
                scale,
                &seq,
                FinishReason::Abort,
                None,
                Instant::now(),
            );
        });
        let now = Instant::now();
        self.sched.schedule(&mut self.plan, now);
        // Publish the new queue sizes before this step's tokens reach clients, so a client that
        // reacts to a token never sees its own request still counted as waiting.
        self.publish_queue_sizes();
        self.metrics.num_preemptions.inc_by(self.plan.num_preempted);
        self.metrics
            .prefix_cache_queries
            .inc_by(self.plan.prefix_queries);
        self.metrics.prefix_cache_hits.inc_by(self.plan.prefix_hits);
        if self.plan.scheduled.is_empty() {
            self.publish();
            return Ok(0);
        }
        self.build_batch();
        self.out.clear();
        self.backend.execute(&self.batch, &mut self.out)?;
        let num_tokens = self.batch.num_tokens();
        self.sample()?;
        let now = Instant::now();
        let (metrics, scale) = (&self.metrics, self.cfg.latency_scale);
        self.sched
            .update(&self.plan, &mut self.sampled, now, |u| {
                report_token(metrics, scale, u, now)
            })
            .map_err(missing_row)?;
        self.publish();
        Ok(num_tokens)
    }

    fn build_batch(&mut self) {
        let bs = self.cfg.block_size;
        let b = &mut self.batch;
        b.token_ids.clear();
        b.positions.clear();
        b.seqs.clear();
        b.slot_mapping.clear();
        b.logits_rows.clear();
        for (k, s) in self.plan.scheduled.iter().enumerate() {
            let Some(seq) = self.sched.running().get(s.idx) else {
                continue;
            };
            let start = seq.num_computed;
            let end = start + s.num_new;
            let query_start = b.token_ids.len();
            b.token_ids.extend_from_slice(&seq.tokens[start..end]);
            for p in start..end {
                b.positions.push(p as u32);
                b.slot_mapping
                    .push(seq.block_table[p / bs] * bs as u32 + (p % bs) as u32);
            }
            b.seqs.push(SeqSlice {
                query_start,
                query_len: s.num_new,
                context_len: start,
            });
            // Reuse the inner vectors of earlier steps instead of reallocating each table.
            match b.block_tables.get_mut(k) {
                Some(table) => {
                    table.clear();
                    table.extend_from_slice(&seq.block_table);
                }
                None => b.block_tables.push(seq.block_table.clone()),
            }
            if end == seq.num_tokens() {
                b.logits_rows.push(b.token_ids.len() - 1);
            }
        }
        b.block_tables.truncate(self.plan.scheduled.len());
    }

    /// Picks one token per logits row into `self.sampled`: the backend's own pick when it made
    /// one (it has no distribution, so the pick is certain), else sampled from the logits with
    /// the request's parameters and RNG.
    fn sample(&mut self) -> Result<(), EngineError> {
        self.sampled.clear();
        let (out, sampler, sampled) = (&self.out, &mut self.sampler, &mut self.sampled);
        let masked = &mut self.masked;
        let eos = self.cfg.eos_token_ids.first().copied();
        let use_picked = !out.sampled.is_empty();
        self.sched
            .for_each_sampling_row(&self.plan, |params, rng, constraint| {
                let row = sampled.len();
                let next = if use_picked {
                    // The API refuses constraints for backends without logits.
                    let token = *out.sampled.get(row).ok_or(MissingRow { row })?;
                    let logprobs = params.logprobs.map(|n| TokenLogprobs {
                        logprob: 0.0,
                        top: if n > 0 {
                            vec![(token, 0.0)]
                        } else {
                            Vec::new()
                        },
                    });
                    Sampled { token, logprobs }
                } else {
                    let logits = out.row(row).ok_or(MissingRow { row })?;
                    let token = match constraint {
                        None => sampler.sample(logits, params, rng),
                        Some(c) => {
                            masked.clear();
                            masked.extend_from_slice(logits);
                            if let Err(e) = c.mask(masked) {
                                tracing::warn!(error = %e, "output constraint failed; ending with EOS");
                                allow_only(masked, eos);
                            }
                            let token = sampler.sample(masked, params, rng);
                            if let Err(e) = c.accept(token) {
                                tracing::warn!(error = %e, token, "output constraint rejected the sampled token");
                            }
                            token
                        }
                    };
                    let logprobs = params.logprobs.map(|n| sampler.logprobs(logits, token, n));
                    Sampled { token, logprobs }
                };
                sampled.push(next);
                Ok(())
            })
            .map_err(missing_row)
    }

    fn finish(&self, seq: &Sequence, reason: FinishReason, stop: Option<u32>, now: Instant) {
        finish_seq(
            &self.metrics,
            self.cfg.latency_scale,
            seq,
            reason,
            stop,
            now,
        );
    }

    fn publish_queue_sizes(&self) {
        let (running, waiting) = (self.sched.num_running(), self.sched.num_waiting());
        self.metrics.num_requests_running.set(running as i64);
        self.metrics.num_requests_waiting.set(waiting as i64);
        self.shared.num_running.store(running, Ordering::Relaxed);
        self.shared.num_waiting.store(waiting, Ordering::Relaxed);
    }

    fn publish(&mut self) {
        self.publish_queue_sizes();
        let pool = self.sched.kv().pool();
        self.metrics.kv_cache_usage_perc.set(pool.usage());
        self.shared
            .num_free_blocks
            .store(pool.num_free(), Ordering::Relaxed);
        if let Some(log) = &self.kv_events {
            log.publish(self.sched.drain_kv_events());
        }
    }
}

/// Masks every logit but `token`'s (or, with no token, leaves the row as is).
fn allow_only(logits: &mut [f32], token: Option<u32>) {
    let Some(t) = token else {
        return;
    };
    for (i, l) in logits.iter_mut().enumerate() {
        if i != t as usize {
            *l = f32::NEG_INFINITY;
        }
    }
}

fn missing_row(e: MissingRow) -> EngineError {
    EngineError::Backend(BackendError::Failed(e.to_string()))
}

fn secs(d: Duration, scale: f64) -> f64 {
    d.as_secs_f64() * scale
}

/// Tells the client about a new token and records the per-token metrics (and the per-request
/// ones when the token ended the request).
fn report_token(m: &ServeMetrics, scale: f64, u: TokenUpdate<'_>, now: Instant) {
    let seq = u.seq;
    match u.prev_token_at {
        None => {
            m.time_to_first_token
                .observe(secs(now - seq.timing.arrival, scale));
            m.prompt_tokens.inc_by(seq.prompt_len as u64);
            seq.send(SeqEvent::Started {
                prompt_tokens: seq.prompt_len,
                cached_tokens: seq.cached_tokens.unwrap_or(0),
            });
        }
        Some(last) => m.inter_token_latency.observe(secs(now - last, scale)),
    }
    m.generation_tokens.inc();
    seq.send(SeqEvent::Token {
        id: u.token,
        logprobs: u.logprobs,
    });
    if let Some((reason, stop_token)) = u.finish {
        // The client may scrape the moment it has its last byte: leave the running gauge
        // without this request first (`publish` sets the exact count after the update).
        m.num_requests_running.dec();
        finish_seq(m, scale, seq, reason, stop_token, now);
    }
}

/// Tells the client `seq` ended and records the per-request metrics.
fn finish_seq(
    m: &ServeMetrics,
    scale: f64,
    seq: &Sequence,
    reason: FinishReason,
    stop_token: Option<u32>,
    now: Instant,
) {
    seq.send(SeqEvent::Finished { reason, stop_token });
    tracing::trace!(
        request_id = seq.id,
        reason = reason.as_str(),
        "request finished"
    );
    if reason == FinishReason::Abort {
        return;
    }
    let t = seq.timing;
    m.e2e_request_latency.observe(secs(now - t.arrival, scale));
    if let Some(sched) = t.first_scheduled {
        m.request_queue_time.observe(secs(sched - t.arrival, scale));
        if let Some(first) = t.first_token {
            m.request_prefill_time.observe(secs(first - sched, scale));
        }
    }
    let generated = seq.num_generated();
    if let Some(first) = t.first_token {
        let decode = now - first;
        m.request_decode_time.observe(secs(decode, scale));
        if generated > 1 {
            m.time_per_output_token
                .observe(secs(decode, scale) / (generated - 1) as f64);
        }
    }
    m.request_prompt_tokens.observe(seq.prompt_len as f64);
    m.request_generation_tokens.observe(generated as f64);
}
