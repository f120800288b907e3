//! Continuous-batching scheduler: admission under a token budget with chunked prefill, and
//! preemption by recompute when the KV pool runs out (vLLM `vllm/v1/core/sched/scheduler.py`).
//! Admission is FCFS, or by (priority, arrival) under [`SchedulingPolicy::Priority`].
//!
//! ```text
//!  budget = max_num_batched_tokens
//!  running[0..]  (oldest first) ── each gets min(remaining, budget) tokens ──┐
//!      allocation fails? → preempt running.last() (newest) → waiting.front   │ StepPlan
//!  waiting.front ── prefix lookup → allocate(hits, chunk) ── (only if no    ─┘
//!                  preemption this step, while seqs < max_num_seqs)
//! ```
//! Under the priority policy the victim is the running sequence with the worst (priority,
//! arrival) key instead of the newest (vLLM's `max(running, key=(priority, arrival_time))`), and
//! a waiting sequence that cannot be admitted (no slot under `max_num_seqs`, or no blocks)
//! preempts the worst running one when that one's priority number is strictly higher. Upstream
//! V1 does the latter only in open pull requests (vLLM issue #40004, V0 did it); the strict
//! comparison is theirs too: equal priorities never preempt each other, so a victim, whose
//! arrival is earlier, cannot take its slot straight back.
//!
//! A preempted sequence drops its blocks and later recomputes prompt + generated tokens; its full
//! blocks usually survive in the prefix cache, so recompute is mostly prefix hits.
//!
//! The scheduler owns every state change of a step (vLLM's schedule → execute → update):
//! [`Scheduler::schedule`] decides, the engine executes the batch and samples, and
//! [`Scheduler::update`] applies the result (KV commit, new tokens, stop checks, removal of
//! finished sequences). Everything else reads the queues through accessors.

use std::collections::VecDeque;
use std::time::Instant;

use rand::rngs::StdRng;

use super::block_pool::{PoolError, PoolEvent};
use super::kv_manager::KvManager;
use super::sequence::Sequence;
use crate::serve::protocol::{FinishReason, SamplingParams, TokenConstraint, TokenLogprobs};

/// Order of the waiting queue and choice of preemption victims (vLLM `--scheduling-policy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedulingPolicy {
    /// First come, first served; the newest running sequence is preempted.
    #[default]
    Fcfs,
    /// Lowest `priority` value first, then arrival; the worst running sequence is preempted,
    /// also to admit a waiting one of strictly better priority.
    Priority,
}

impl SchedulingPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            SchedulingPolicy::Fcfs => "fcfs",
            SchedulingPolicy::Priority => "priority",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub policy: SchedulingPolicy,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Context length: a sequence that reaches it ends with `length`.
    pub max_model_len: usize,
    /// End generation (reason `stop`) unless the request sets `ignore_eos`.
    pub eos_token_ids: Vec<u32>,
}

/// The token picked for one sequence in one step (one per logits row, in plan order).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// One new token as [`Scheduler::update`] applied it, for the engine to report (events, metrics).
#[derive(Debug)]
pub struct TokenUpdate<'a> {
    /// The sequence after the update (token appended, timing updated, `finished` set).
    pub seq: &'a Sequence,
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
    /// When the sequence's previous token came; `None` when this is its first.
    pub prev_token_at: Option<Instant>,
    /// Set when this token ended the sequence: why, and the stop token id if one did.
    pub finish: Option<(FinishReason, Option<u32>)>,
}

/// A step's output does not match its plan.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("backend returned no output for row {row}")]
pub struct MissingRow {
    pub row: usize,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    /// Index into [`Scheduler::running`].
    pub idx: usize,
    pub num_new: usize,
}

/// What [`Scheduler::schedule`] decided for one step. Reused across steps.
#[derive(Debug, Default)]
pub struct StepPlan {
    pub scheduled: Vec<Scheduled>,
    pub num_preempted: u64,
    /// Tokens looked up in the prefix cache by admitted sequences, and how many of them hit.
    pub prefix_queries: u64,
    pub prefix_hits: u64,
}

impl StepPlan {
    pub fn clear(&mut self) {
        self.scheduled.clear();
        self.num_preempted = 0;
        self.prefix_queries = 0;
        self.prefix_hits = 0;
    }
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvManager,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    hits: Vec<u32>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, kv: KvManager) -> Self {
        Self {
            cfg,
            kv,
            waiting: VecDeque::new(),
            running: Vec::new(),
            hits: Vec::new(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn add(&mut self, seq: Sequence) {
        match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.waiting.push_back(seq),
            SchedulingPolicy::Priority => self.insert_by_key(seq),
        }
    }

    /// Puts `seq` behind every waiting sequence whose key is not greater (priority policy: the
    /// queue stays sorted by (priority, arrival, id)).
    fn insert_by_key(&mut self, seq: Sequence) {
        let key = seq.sched_key();
        let at = self.waiting.partition_point(|s| s.sched_key() <= key);
        self.waiting.insert(at, seq);
    }

    /// A preempted sequence waits again: at the front under FCFS (vLLM's `prepend_request`), in
    /// key order under priority (vLLM's heap), so better work waiting is not overtaken.
    fn requeue(&mut self, seq: Sequence) {
        match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.waiting.push_front(seq),
            SchedulingPolicy::Priority => self.insert_by_key(seq),
        }
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Running sequences, oldest first ([`Scheduled::idx`] indexes this).
    pub fn running(&self) -> &[Sequence] {
        &self.running
    }

    /// Waiting sequences, next to admit first.
    pub fn waiting(&self) -> impl ExactSizeIterator<Item = &Sequence> {
        self.waiting.iter()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn kv(&self) -> &KvManager {
        &self.kv
    }

    /// KV-cache events (blocks stored/removed) since the last call.
    pub fn drain_kv_events(&mut self) -> impl Iterator<Item = PoolEvent> + '_ {
        self.kv.pool_mut().drain_events()
    }

    /// Plans one step into `plan`.
    pub fn schedule(&mut self, plan: &mut StepPlan, now: Instant) {
        plan.clear();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut i = 0;
        'running: while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let num_new = (seq.num_tokens() - seq.num_computed).min(budget);
            if num_new == 0 {
                i += 1;
                continue;
            }
            while !self.kv.allocate(&mut self.running[i], &[], num_new) {
                // Out of blocks: a victim gives its blocks back (FCFS: the newest, which is
                // never already scheduled this step because we go head first; priority: the
                // worst key, unscheduled if it was).
                let Some(v) = self.kv_victim() else {
                    break 'running;
                };
                self.preempt_at(v, plan, &mut budget);
                match v.cmp(&i) {
                    // The current sequence itself: the next one now sits at `i`.
                    std::cmp::Ordering::Equal => continue 'running,
                    std::cmp::Ordering::Less => i -= 1,
                    std::cmp::Ordering::Greater => {}
                }
            }
            plan.scheduled.push(Scheduled { idx: i, num_new });
            budget -= num_new;
            i += 1;
        }
        // Admitting while preempting would just thrash: new work waits for the next step.
        if plan.num_preempted > 0 {
            return;
        }
        while budget > 0 {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            let priority = seq.params.priority;
            if self.running.len() >= self.cfg.max_num_seqs {
                if self.preempt_worse_than(priority, plan, &mut budget) {
                    continue;
                }
                break;
            }
            self.kv.find_prefix(seq, &mut self.hits);
            let hit_tokens = self.hits.len() * self.kv.block_size();
            let num_new = (seq.num_tokens() - hit_tokens).min(budget);
            if !self.kv.allocate(seq, &self.hits, num_new) {
                if self.preempt_worse_than(priority, plan, &mut budget) {
                    continue; // look the prefix up again: the victim's blocks may hit now
                }
                // Nobody overtakes the head of the queue.
                break;
            }
            plan.prefix_queries += seq.num_tokens() as u64;
            plan.prefix_hits += hit_tokens as u64;
            seq.cached_tokens.get_or_insert(hit_tokens);
            seq.timing.first_scheduled.get_or_insert(now);
            let Some(seq) = self.waiting.pop_front() else {
                break;
            };
            self.running.push(seq);
            plan.scheduled.push(Scheduled {
                idx: self.running.len() - 1,
                num_new,
            });
            budget -= num_new;
        }
    }

    /// Index of the running sequence to preempt when a running one cannot get blocks.
    fn kv_victim(&self) -> Option<usize> {
        match self.cfg.policy {
            SchedulingPolicy::Fcfs => self.running.len().checked_sub(1),
            SchedulingPolicy::Priority => self.worst_running(),
        }
    }

    /// The running sequence with the greatest (priority, arrival, id) key.
    fn worst_running(&self) -> Option<usize> {
        self.running
            .iter()
            .enumerate()
            .max_by_key(|(_, s)| s.sched_key())
            .map(|(i, _)| i)
    }

    /// Priority policy: preempts the worst running sequence if its priority number is strictly
    /// greater than `priority` (a waiting sequence's that cannot be admitted). Returns whether
    /// it did. Never under FCFS.
    fn preempt_worse_than(
        &mut self,
        priority: i64,
        plan: &mut StepPlan,
        budget: &mut usize,
    ) -> bool {
        if self.cfg.policy != SchedulingPolicy::Priority {
            return false;
        }
        match self.worst_running() {
            Some(v) if self.running[v].params.priority > priority => {
                self.preempt_at(v, plan, budget);
                true
            }
            _ => false,
        }
    }

    /// Preempts `running[v]`: takes back its share of this step (if it had one), frees its
    /// blocks and queues it again. Later plan entries are re-indexed.
    fn preempt_at(&mut self, v: usize, plan: &mut StepPlan, budget: &mut usize) {
        let mut victim = self.running.remove(v);
        if let Some(pos) = plan.scheduled.iter().position(|s| s.idx == v) {
            *budget += plan.scheduled.remove(pos).num_new;
        }
        for s in plan.scheduled.iter_mut().filter(|s| s.idx > v) {
            s.idx -= 1;
        }
        self.preempt(&mut victim);
        plan.num_preempted += 1;
        self.requeue(victim);
    }

    /// Calls `f` with the sampling parameters and RNG of each sequence of `plan` that produces
    /// a token this step, in logits-row order (the order [`Scheduler::update`] expects them).
    pub fn for_each_sampling_row<E>(
        &mut self,
        plan: &StepPlan,
        mut f: impl FnMut(
            &SamplingParams,
            &mut StdRng,
            Option<&mut Box<dyn TokenConstraint>>,
        ) -> Result<(), E>,
    ) -> Result<(), E> {
        for s in &plan.scheduled {
            let Some(seq) = self.running.get_mut(s.idx) else {
                continue;
            };
            if seq.num_computed + s.num_new == seq.num_tokens() {
                f(&seq.params, &mut seq.rng, seq.constraint.as_mut())?;
            }
        }
        Ok(())
    }

    /// Applies an executed step (vLLM's `update_from_output`). Every scheduled sequence's new
    /// tokens are now in the KV cache (its full blocks enter the prefix cache); a sequence that
    /// reached its end takes the next of `sampled` (one per logits row, in plan order) and ends on
    /// EOS (unless ignored), a stop token id, `max_tokens` or the context length. `on_token` sees
    /// each new token with its sequence; finished sequences then leave `running` and free their
    /// blocks.
    ///
    /// Logprobs are moved out of `sampled`. Fails (changing nothing more) when `sampled` is
    /// shorter than the plan needs.
    pub fn update(
        &mut self,
        plan: &StepPlan,
        sampled: &mut [Sampled],
        now: Instant,
        mut on_token: impl FnMut(TokenUpdate<'_>),
    ) -> Result<(), MissingRow> {
        let mut row = 0usize;
        let mut any_finished = false;
        for s in &plan.scheduled {
            let Some(seq) = self.running.get_mut(s.idx) else {
                continue;
            };
            seq.num_computed += s.num_new;
            self.kv.commit(seq);
            if seq.num_computed < seq.num_tokens() {
                continue; // a prefill chunk that does not reach the end yet
            }
            let out = sampled.get_mut(row).ok_or(MissingRow { row })?;
            row += 1;
            let token = out.token;
            seq.tokens.push(token);
            let prev_token_at = seq.timing.last_token.replace(now);
            seq.timing.first_token.get_or_insert(now);
            let p = &seq.params;
            let finish = if !p.ignore_eos && self.cfg.eos_token_ids.contains(&token) {
                Some((FinishReason::Stop, None))
            } else if p.stop_token_ids.contains(token) {
                Some((FinishReason::Stop, Some(token)))
            } else if seq.num_generated() >= p.max_tokens
                || seq.num_tokens() >= self.cfg.max_model_len
            {
                Some((FinishReason::Length, None))
            } else {
                None
            };
            if let Some((reason, _)) = finish {
                seq.finished = Some(reason);
                any_finished = true;
            }
            on_token(TokenUpdate {
                seq,
                token,
                logprobs: out.logprobs.take(),
                prev_token_at,
                finish,
            });
        }
        if any_finished {
            self.remove_where(|s| s.finished.is_some(), drop);
        }
        Ok(())
    }

    fn preempt(&mut self, seq: &mut Sequence) {
        tracing::debug!(
            request_id = seq.id,
            tokens = seq.num_tokens(),
            "preempting (recompute)"
        );
        if let Err(e) = self.kv.free(seq) {
            tracing::error!(request_id = seq.id, error = %e, "block pool inconsistency on preempt");
        }
        seq.num_preemptions += 1;
    }

    /// Removes `id` from the queues and frees its blocks.
    pub fn abort(&mut self, id: u64) -> Option<Sequence> {
        let mut seq = if let Some(pos) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(pos)
        } else {
            let pos = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(pos)?
        };
        self.release(&mut seq);
        Some(seq)
    }

    /// Removes every sequence `pred` selects (running and waiting), freeing blocks, and hands each
    /// to `sink`.
    pub fn remove_where(
        &mut self,
        mut pred: impl FnMut(&Sequence) -> bool,
        mut sink: impl FnMut(Sequence),
    ) {
        let mut i = 0;
        while i < self.running.len() {
            if pred(&self.running[i]) {
                let mut seq = self.running.remove(i);
                self.release(&mut seq);
                sink(seq);
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.waiting.len() {
            if pred(&self.waiting[i]) {
                if let Some(mut seq) = self.waiting.remove(i) {
                    self.release(&mut seq);
                    sink(seq);
                }
            } else {
                i += 1;
            }
        }
    }

    fn release(&mut self, seq: &mut Sequence) {
        if let Err(e) = self.kv.free(seq) {
            report_pool_error(seq.id, &e);
        }
    }
}

fn report_pool_error(id: u64, e: &PoolError) {
    tracing::error!(request_id = id, error = %e, "block pool inconsistency on free");
}

#[cfg(test)]
mod tests;
