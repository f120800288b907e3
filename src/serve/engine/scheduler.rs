//! Continuous-batching scheduler: FCFS admission under a token budget with chunked prefill, and
//! preemption by recompute when the KV pool runs out (vLLM `vllm/v1/core/sched/scheduler.py`).
//!
//! ```text
//!  budget = max_num_batched_tokens
//!  running[0..]  (oldest first) ── each gets min(remaining, budget) tokens ──┐
//!      allocation fails? → preempt running.last() (newest) → waiting.front   │ StepPlan
//!  waiting.front ── prefix lookup → allocate(hits, chunk) ── (only if no    ─┘
//!                  preemption this step, while seqs < max_num_seqs)
//! ```
//! A preempted sequence drops its blocks and later recomputes prompt + generated tokens; its full
//! blocks usually survive in the prefix cache, so recompute is mostly prefix hits.

use std::collections::VecDeque;
use std::time::Instant;

use super::block_pool::PoolError;
use super::kv_manager::KvManager;
use super::sequence::Sequence;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
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
    pub kv: KvManager,
    pub waiting: VecDeque<Sequence>,
    pub running: Vec<Sequence>,
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

    pub fn config(&self) -> SchedulerConfig {
        self.cfg
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Plans one step into `plan`.
    pub fn schedule(&mut self, plan: &mut StepPlan, now: Instant) {
        plan.clear();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let num_new = (seq.num_tokens() - seq.num_computed).min(budget);
            if num_new == 0 {
                i += 1;
                continue;
            }
            loop {
                if self.kv.allocate(&mut self.running[i], &[], num_new) {
                    plan.scheduled.push(Scheduled { idx: i, num_new });
                    budget -= num_new;
                    break;
                }
                // Out of blocks: the newest running sequence gives its blocks back. Victims come
                // from the tail, which is never already scheduled this step (we go head first).
                let Some(mut victim) = self.running.pop() else {
                    break;
                };
                let victim_is_current = self.running.len() == i;
                self.preempt(&mut victim);
                self.waiting.push_front(victim);
                plan.num_preempted += 1;
                if victim_is_current {
                    break;
                }
            }
            i += 1;
        }
        // Admitting while preempting would just thrash: new work waits for the next step.
        if plan.num_preempted > 0 {
            return;
        }
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            self.kv.find_prefix(seq, &mut self.hits);
            let hit_tokens = self.hits.len() * self.kv.block_size();
            let num_new = (seq.num_tokens() - hit_tokens).min(budget);
            if !self.kv.allocate(seq, &self.hits, num_new) {
                // FCFS: nobody overtakes the head of the queue.
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
