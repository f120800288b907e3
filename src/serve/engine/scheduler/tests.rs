//! Deterministic scheduler runs: exact waiting orders, victims and step plans under FCFS and
//! the priority policy (4-token blocks, prefix caching off, every sampled token is 1).

use std::time::{Duration, Instant};

use rand::SeedableRng as _;
use tokio::sync::mpsc;

use super::*;
use crate::serve::engine::block_pool::BlockPool;
use crate::serve::protocol::EngineRequest;

const BLOCK: usize = 4;

fn scheduler(policy: SchedulingPolicy, max_num_seqs: usize, num_blocks: usize) -> Scheduler {
    let cfg = SchedulerConfig {
        policy,
        max_num_seqs,
        max_num_batched_tokens: 256,
        max_model_len: 256,
        eos_token_ids: Vec::new(),
    };
    Scheduler::new(
        cfg,
        KvManager::new(BlockPool::new(num_blocks, false, false), BLOCK, "m"),
    )
}

/// Request `id` (arriving `id` ms after a fixed base) with a distinct prompt of `prompt_len`.
fn seq(base: Instant, id: u64, priority: i64, prompt_len: usize) -> Sequence {
    let (events, rx) = mpsc::channel(1024);
    // The scheduler never reads the channel; keep the receiver alive for the test's length.
    std::mem::forget(rx);
    let params = SamplingParams {
        max_tokens: 64,
        priority,
        ..SamplingParams::default()
    };
    let req = EngineRequest {
        id,
        prompt: (0..prompt_len as u32)
            .map(|t| t + 100 * id as u32)
            .collect(),
        params,
        arrival: base + Duration::from_millis(id),
        events,
        constraint: None,
    };
    Sequence::new(req, StdRng::seed_from_u64(id))
}

/// One step: plan, then apply it as if the backend produced token 1 for every sampling row.
fn step(s: &mut Scheduler, plan: &mut StepPlan, base: Instant) {
    s.schedule(plan, base);
    let mut sampled = vec![
        Sampled {
            token: 1,
            logprobs: None
        };
        plan.scheduled.len()
    ];
    s.update(plan, &mut sampled, base, |_| {}).unwrap();
}

fn running_ids(s: &Scheduler) -> Vec<u64> {
    s.running().iter().map(|q| q.id).collect()
}

fn waiting_ids(s: &Scheduler) -> Vec<u64> {
    s.waiting().map(|q| q.id).collect()
}

/// (running index → id, tokens) of each planned entry.
fn planned(s: &Scheduler, plan: &StepPlan) -> Vec<(u64, usize)> {
    plan.scheduled
        .iter()
        .map(|p| (s.running()[p.idx].id, p.num_new))
        .collect()
}

#[test]
fn waiting_order_is_arrival_under_fcfs_and_priority_then_arrival_under_priority() {
    let base = Instant::now();
    for (policy, want) in [
        (SchedulingPolicy::Fcfs, [1, 2, 3, 4, 5]),
        (SchedulingPolicy::Priority, [4, 2, 5, 3, 1]),
    ] {
        let mut s = scheduler(policy, 4, 64);
        for (id, priority) in [(1, 2), (2, 0), (3, 1), (4, -3), (5, 0)] {
            s.add(seq(base, id, priority, 4));
        }
        assert_eq!(waiting_ids(&s), want, "{policy:?}");
    }
}

#[test]
fn priority_admits_the_best_waiting_first() {
    let base = Instant::now();
    let mut s = scheduler(SchedulingPolicy::Priority, 2, 64);
    for (id, priority) in [(1, 5), (2, 1), (3, 0)] {
        s.add(seq(base, id, priority, 4));
    }
    let mut plan = StepPlan::default();
    step(&mut s, &mut plan, base);
    assert_eq!(running_ids(&s), [3, 2]);
    assert_eq!(waiting_ids(&s), [1]);
}

#[test]
fn full_batch_waiting_request_preempts_the_worst_running_one_only_under_priority() {
    let base = Instant::now();
    for (policy, running, waiting, preempted) in [
        (SchedulingPolicy::Fcfs, vec![1, 2], vec![3], 0),
        // Equal priorities 1 and 2: the later arrival (2) is the victim; it was decoded in the
        // running pass of this very step, and that share is taken back.
        (SchedulingPolicy::Priority, vec![1, 3], vec![2], 1),
    ] {
        let mut s = scheduler(policy, 2, 64);
        s.add(seq(base, 1, 1, 4));
        s.add(seq(base, 2, 1, 4));
        let mut plan = StepPlan::default();
        step(&mut s, &mut plan, base);
        assert_eq!(running_ids(&s), [1, 2]);
        s.add(seq(base, 3, 0, 6));
        s.schedule(&mut plan, base);
        assert_eq!(running_ids(&s), running, "{policy:?}");
        assert_eq!(waiting_ids(&s), waiting, "{policy:?}");
        assert_eq!(plan.num_preempted, preempted, "{policy:?}");
        let want_plan = match policy {
            SchedulingPolicy::Fcfs => vec![(1, 1), (2, 1)],
            SchedulingPolicy::Priority => vec![(1, 1), (3, 6)],
        };
        assert_eq!(planned(&s, &plan), want_plan, "{policy:?}");
        if policy == SchedulingPolicy::Priority {
            let victim = s.waiting().next().unwrap();
            // Recompute: no blocks, nothing computed, its generated token kept.
            assert_eq!(
                (
                    victim.num_computed,
                    victim.block_table.len(),
                    victim.num_tokens()
                ),
                (0, 0, 5)
            );
            assert_eq!(victim.num_preemptions, 1);
        }
    }
}

#[test]
fn equal_priority_never_preempts_so_victims_cannot_bounce_back() {
    let base = Instant::now();
    let mut s = scheduler(SchedulingPolicy::Priority, 2, 64);
    s.add(seq(base, 1, 0, 4));
    s.add(seq(base, 2, 0, 4));
    let mut plan = StepPlan::default();
    step(&mut s, &mut plan, base);
    s.add(seq(base, 3, 0, 4));
    for _ in 0..3 {
        step(&mut s, &mut plan, base);
        assert_eq!(plan.num_preempted, 0);
        assert_eq!((running_ids(&s), waiting_ids(&s)), (vec![1, 2], vec![3]));
    }
}

/// 4 blocks: 1 (prompt 4, priority 9) and 2 (prompt 7, priority 0) take 3; step 2 gives 1 its
/// second block; in step 3, 2 needs a third block and none is free.
#[test]
fn out_of_blocks_preempts_newest_under_fcfs_and_worst_key_under_priority() {
    let base = Instant::now();
    for (policy, running, waiting, plan_after) in [
        (SchedulingPolicy::Fcfs, vec![1], vec![2], vec![(1, 1)]),
        // The victim (1) was scheduled earlier in the same pass: its share is undone and 2's
        // running index moves from 1 to 0.
        (SchedulingPolicy::Priority, vec![2], vec![1], vec![(2, 1)]),
    ] {
        let mut s = scheduler(policy, 4, 4);
        s.add(seq(base, 1, 9, 4));
        s.add(seq(base, 2, 0, 7));
        let mut plan = StepPlan::default();
        step(&mut s, &mut plan, base);
        step(&mut s, &mut plan, base);
        assert_eq!(plan.num_preempted, 0);
        assert_eq!(s.kv().pool().num_free(), 0);
        step(&mut s, &mut plan, base);
        assert_eq!(plan.num_preempted, 1, "{policy:?}");
        assert_eq!(running_ids(&s), running, "{policy:?}");
        assert_eq!(waiting_ids(&s), waiting, "{policy:?}");
        assert_eq!(planned(&s, &plan), plan_after, "{policy:?}");
        assert_eq!(plan.scheduled[0].idx, 0);
    }
}

/// 4 blocks, one slot free: 1 (priority 3) holds 3 blocks and takes the 4th for its decode;
/// 2 (priority 0, 2 blocks) then preempts it for its blocks, in the same step.
#[test]
fn waiting_request_preempts_for_blocks_under_priority() {
    let base = Instant::now();
    let mut s = scheduler(SchedulingPolicy::Priority, 4, 4);
    s.add(seq(base, 1, 3, 12));
    let mut plan = StepPlan::default();
    step(&mut s, &mut plan, base);
    s.add(seq(base, 2, 0, 8));
    s.schedule(&mut plan, base);
    assert_eq!(plan.num_preempted, 1);
    assert_eq!(planned(&s, &plan), [(2, 8)]);
    assert_eq!((running_ids(&s), waiting_ids(&s)), (vec![2], vec![1]));
    assert_eq!(s.kv().pool().num_free(), 2);

    // The victim waits (its priority is worse) and cannot take blocks back from 2.
    let mut sampled = vec![
        Sampled {
            token: 1,
            logprobs: None
        };
        1
    ];
    s.update(&plan, &mut sampled, base, |_| {}).unwrap();
    s.schedule(&mut plan, base);
    assert_eq!(plan.num_preempted, 0);
    assert_eq!((running_ids(&s), waiting_ids(&s)), (vec![2], vec![1]));
}
