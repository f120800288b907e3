//! The engine without HTTP: exact prefix-cache accounting, stop tokens, a randomized workload
//! with aborts and preemption that must leak nothing, and (with the cpu backend) greedy output
//! that does not depend on prefix hits, chunked prefill or preemption.

use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use switchyard::serve::backend::cpu::{CpuBackend, CpuOptions};
use switchyard::serve::backend::sim::{profile, SimBackend, SimOptions};
use switchyard::serve::backend::Backend;
use switchyard::serve::engine::{
    EngineConfig, EngineCore, EngineRequest, EngineShared, FinishReason, SamplingParams,
    SchedulingPolicy, SeqEvent,
};
use switchyard::serve::metrics::ServeMetrics;
use tokio::sync::mpsc::{channel, Receiver};

fn config(num_blocks: usize, max_model_len: usize) -> EngineConfig {
    EngineConfig {
        model_name: "m".into(),
        block_size: 4,
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        max_model_len,
        max_waiting: 1000,
        scheduling_policy: SchedulingPolicy::Fcfs,
        enable_prefix_caching: true,
        num_blocks_override: Some(num_blocks),
        gpu_memory_utilization: 0.9,
        seed: 0,
        latency_scale: 1.0,
        eos_token_ids: vec![],
    }
}

fn sim() -> Box<dyn Backend> {
    let opts = SimOptions {
        block_size: 4,
        gpu_memory_utilization: 0.9,
        time_scale: 0.0,
        seed: 1,
    };
    Box::new(SimBackend::new(profile("h100-qwen2.5-7b").unwrap(), opts))
}

struct Harness {
    core: EngineCore,
    metrics: Arc<ServeMetrics>,
    next_id: u64,
}

impl Harness {
    fn new(cfg: EngineConfig, backend: Box<dyn Backend>) -> Self {
        let metrics = Arc::new(ServeMetrics::new(&cfg.model_name));
        let shared = Arc::new(EngineShared::default());
        let core = EngineCore::new(cfg, backend, Arc::clone(&metrics), None, shared).unwrap();
        Self {
            core,
            metrics,
            next_id: 1,
        }
    }

    fn submit(&mut self, prompt: Vec<u32>, params: SamplingParams) -> Receiver<SeqEvent> {
        let (tx, rx) = channel(1 << 20);
        let id = self.next_id;
        self.next_id += 1;
        self.core.submit(EngineRequest {
            id,
            prompt,
            params,
            arrival: Instant::now(),
            events: tx,
            constraint: None,
        });
        rx
    }

    /// Steps until idle, checking the block accounting after every step.
    fn run(&mut self) {
        let mut steps = 0;
        while self.core.has_work() {
            self.core.step().unwrap();
            check_blocks(&self.core);
            steps += 1;
            assert!(steps < 100_000, "engine does not make progress");
        }
    }

    fn counter(&self, name: &str) -> f64 {
        let text = self.metrics.encode();
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0.0, |v| v.parse().unwrap())
    }
}

/// Every block's reference count equals the number of sequences holding it; the free list is
/// consistent.
fn check_blocks(core: &EngineCore) {
    let sched = core.scheduler();
    let pool = sched.kv().pool();
    pool.check_invariants().unwrap();
    let mut holders = vec![0u32; pool.num_total()];
    for seq in sched.running() {
        for &b in &seq.block_table {
            holders[b as usize] += 1;
        }
    }
    for seq in sched.waiting() {
        assert!(
            seq.block_table.is_empty(),
            "waiting sequence {} holds blocks",
            seq.id
        );
    }
    for (b, &n) in holders.iter().enumerate() {
        assert_eq!(pool.ref_count(b as u32), Some(n), "block {b}");
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Outcome {
    cached_tokens: Option<usize>,
    tokens: Vec<u32>,
    finish: Option<FinishReason>,
    stop_token: Option<u32>,
}

fn drain(rx: &mut Receiver<SeqEvent>) -> Outcome {
    let mut o = Outcome::default();
    while let Ok(ev) = rx.try_recv() {
        match ev {
            SeqEvent::Started { cached_tokens, .. } => o.cached_tokens = Some(cached_tokens),
            SeqEvent::Token { id, .. } => o.tokens.push(id),
            SeqEvent::Finished { reason, stop_token } => {
                o.finish = Some(reason);
                o.stop_token = stop_token;
            }
            SeqEvent::Failed { message } => panic!("request failed: {message}"),
        }
    }
    o
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ..Default::default()
    }
}

#[test]
fn prefix_hits_are_counted_exactly_and_evicted_lru() {
    // 8 blocks of 4 tokens.
    let mut h = Harness::new(config(8, 32), sim());
    let a: Vec<u32> = (1..=10).collect();
    let mut rx = h.submit(a.clone(), greedy(2));
    h.run();
    let first = drain(&mut rx);
    assert_eq!((first.cached_tokens, first.tokens.len()), (Some(0), 2));
    // Computed tokens: 10 prompt + 1 generated = 11 → 2 full blocks cached.
    let mut b = a.clone();
    b.extend([77, 78, 79]);
    let mut rx = h.submit(b, greedy(1));
    h.run();
    assert_eq!(drain(&mut rx).cached_tokens, Some(8));
    // A prompt that is entirely cached still computes its last token: 8 tokens → 1 block hit.
    let mut rx = h.submit(a[..8].to_vec(), greedy(1));
    h.run();
    assert_eq!(drain(&mut rx).cached_tokens, Some(4));
    assert_eq!(h.counter("vllm:prefix_cache_queries_total"), 31.0);
    assert_eq!(h.counter("vllm:prefix_cache_hits_total"), 12.0);
    // 28 distinct tokens take 7 of the 8 blocks, least recently freed first: the second block
    // of `a` goes, while its first block, just reused by the third request, survives.
    let mut rx = h.submit((100..128).collect(), greedy(1));
    h.run();
    assert_eq!(drain(&mut rx).cached_tokens, Some(0));
    let mut rx = h.submit(a.clone(), greedy(1));
    h.run();
    assert_eq!(drain(&mut rx).cached_tokens, Some(4));
    let pool = h.core.scheduler().kv().pool();
    assert_eq!(pool.num_free(), 8);
}

#[test]
fn stop_tokens_eos_and_length() {
    let mut cfg = config(64, 64);
    let mut h = Harness::new(cfg.clone(), sim());
    let mut rx = h.submit(vec![5, 6, 7], greedy(6));
    h.run();
    let free_run = drain(&mut rx);
    assert_eq!(free_run.finish, Some(FinishReason::Length));
    assert_eq!(free_run.tokens.len(), 6);
    // Same request with its third token as a stop token (sim tokens are deterministic).
    let stop = free_run.tokens[2];
    let mut rx = h.submit(
        vec![5, 6, 7],
        SamplingParams {
            stop_token_ids: vec![stop].into(),
            ..greedy(6)
        },
    );
    h.run();
    let o = drain(&mut rx);
    assert_eq!(o.tokens, free_run.tokens[..3]);
    assert_eq!(
        (o.finish, o.stop_token),
        (Some(FinishReason::Stop), Some(stop))
    );
    // As EOS it stops too, unless ignore_eos.
    cfg.eos_token_ids = vec![stop];
    let mut h = Harness::new(cfg, sim());
    let mut rx = h.submit(vec![5, 6, 7], greedy(6));
    let mut rx2 = h.submit(
        vec![5, 6, 7],
        SamplingParams {
            ignore_eos: true,
            ..greedy(6)
        },
    );
    h.run();
    let o = drain(&mut rx);
    assert_eq!(
        (o.tokens.len(), o.finish, o.stop_token),
        (3, Some(FinishReason::Stop), None)
    );
    assert_eq!(drain(&mut rx2).tokens, free_run.tokens);
}

#[derive(Debug, Clone)]
struct Job {
    prefix: usize,
    len: usize,
    max_tokens: usize,
    abort_at: Option<usize>,
    /// Used by the engine only under the priority policy.
    priority: i64,
}

fn job() -> impl Strategy<Value = Job> {
    (
        0..3usize,
        1..40usize,
        1..12usize,
        prop::option::weighted(0.25, 0..30usize),
        0..3i64,
    )
        .prop_map(|(prefix, len, max_tokens, abort_at, priority)| Job {
            prefix,
            len,
            max_tokens,
            abort_at,
            priority,
        })
}

fn prompt_of(j: &Job) -> Vec<u32> {
    // Three shared prefixes so prefix hits happen; the tail differs per length.
    (0..j.len)
        .map(|i| {
            if i < 16 {
                (j.prefix * 1000 + i) as u32
            } else {
                (i * 7 + j.len) as u32
            }
        })
        .collect()
}

/// Runs `jobs` (submitted `per_step` at a time) and returns each job's outcome.
fn run_jobs(h: &mut Harness, jobs: &[Job], per_step: usize, with_aborts: bool) -> Vec<Outcome> {
    let mut rxs: Vec<Option<Receiver<SeqEvent>>> = Vec::new();
    let mut outs = vec![Outcome::default(); jobs.len()];
    let mut step = 0usize;
    let mut next = 0;
    while next < jobs.len() || h.core.has_work() {
        for j in jobs.iter().skip(next).take(per_step) {
            let params = SamplingParams {
                priority: j.priority,
                ..greedy(j.max_tokens)
            };
            rxs.push(Some(h.submit(prompt_of(j), params)));
        }
        next = (next + per_step).min(jobs.len());
        if h.core.has_work() {
            h.core.step().unwrap();
            check_blocks(&h.core);
        }
        for (i, rx) in rxs.iter_mut().enumerate() {
            if let Some(r) = rx {
                let o = drain(r);
                outs[i].tokens.extend(o.tokens);
                outs[i].cached_tokens = outs[i].cached_tokens.or(o.cached_tokens);
                outs[i].finish = outs[i].finish.or(o.finish);
                if with_aborts && jobs[i].abort_at == Some(step) && outs[i].finish.is_none() {
                    *rx = None; // client disconnects
                    outs[i].finish = Some(FinishReason::Abort);
                }
            }
        }
        step += 1;
        assert!(step < 100_000);
    }
    outs
}

/// Runs `jobs` with ample KV (the reference) and with `blocks` blocks plus client aborts, and
/// checks: no block leaks or double frees, every surviving request gets exactly the reference's
/// tokens, and when nothing was preempted the hit counter equals the cached tokens reported to
/// clients. Returns how many preemptions the tight run made. `priority`: the tight run schedules
/// by the jobs' priorities with `max_num_seqs` 3, so waiting requests also preempt for slots.
fn check_tight_kv(
    jobs: &[Job],
    per_step: usize,
    blocks: usize,
    priority: bool,
) -> Result<f64, TestCaseError> {
    let mut ample = Harness::new(config(400, 52), sim());
    let reference = run_jobs(&mut ample, jobs, per_step, false);
    let mut tight_cfg = config(blocks, 52);
    if priority {
        tight_cfg.scheduling_policy = SchedulingPolicy::Priority;
        tight_cfg.max_num_seqs = 3;
    }
    let mut tight = Harness::new(tight_cfg, sim());
    let outs = run_jobs(&mut tight, jobs, per_step, true);
    // One more step lets the engine notice the last disconnects.
    tight.core.step().unwrap();
    let pool = tight.core.scheduler().kv().pool();
    prop_assert_eq!(pool.num_free(), pool.num_total());
    prop_assert_eq!(
        tight
            .metrics
            .encode()
            .contains("vllm:kv_cache_usage_perc{model_name=\"m\",engine=\"0\"} 0.0"),
        true
    );
    for (i, (o, r)) in outs.iter().zip(&reference).enumerate() {
        if o.finish == Some(FinishReason::Abort) {
            prop_assert!(o.tokens.len() <= jobs[i].max_tokens);
            prop_assert_eq!(&o.tokens[..], &r.tokens[..o.tokens.len()]);
        } else {
            prop_assert_eq!(o.finish, Some(FinishReason::Length));
            prop_assert_eq!(&o.tokens, &r.tokens, "job {}", i);
        }
    }
    if ample.counter("vllm:num_preemptions_total") == 0.0 {
        let reported: usize = reference.iter().filter_map(|o| o.cached_tokens).sum();
        prop_assert_eq!(
            ample.counter("vllm:prefix_cache_hits_total"),
            reported as f64
        );
    }
    Ok(tight.counter("vllm:num_preemptions_total"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Tight KV plus aborts on random workloads (not every case is tight enough to preempt;
    /// `tight_kv_preempts_and_still_leaks_nothing` is the one that must).
    #[test]
    fn random_workloads_leak_nothing(jobs in prop::collection::vec(job(), 1..24), per_step in 1..4usize, blocks in 13..40usize) {
        check_tight_kv(&jobs, per_step, blocks, false)?;
    }

    /// The same under the priority policy: victims chosen by key, taken back out of a step's
    /// plan, and preempted for slots as well as blocks.
    #[test]
    fn random_workloads_leak_nothing_under_priority(jobs in prop::collection::vec(job(), 1..24), per_step in 1..4usize, blocks in 13..40usize) {
        check_tight_kv(&jobs, per_step, blocks, true)?;
    }
}

/// The tight-KV checks on a workload that cannot fit: six requests of 12–17 prompt tokens and
/// 11 outputs (6–7 blocks of 4 tokens each by the end), three arriving per step, against 13
/// blocks: the running requests outgrow the pool while decoding, so the scheduler must preempt
/// (3 times with the sim backend today). Without a preemption this would check nothing about it.
#[test]
fn tight_kv_preempts_and_still_leaks_nothing() {
    let jobs: Vec<Job> = (0..6)
        .map(|i| Job {
            prefix: i % 3,
            len: 12 + i,
            max_tokens: 11,
            abort_at: (i == 4).then_some(6),
            priority: 0,
        })
        .collect();
    let preemptions = check_tight_kv(&jobs, 3, 13, false).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        preemptions > 0.0,
        "no preemption with 13 blocks for six requests growing to 6-7 blocks each"
    );
    println!("{preemptions} preemptions");
}

fn cpu(dir: &std::path::Path, blocks_bytes: usize) -> Box<dyn Backend> {
    let opts = CpuOptions {
        block_size: 4,
        kv_cache_memory_bytes: blocks_bytes,
        threads: 2,
    };
    Box::new(CpuBackend::load(dir, opts).unwrap())
}

#[test]
fn cpu_greedy_output_is_independent_of_prefix_hits_chunking_and_preemption() {
    let dir = tempfile::tempdir().unwrap();
    switchyard::serve::model::testing::write_tiny_qwen2(dir.path(), 11).unwrap();
    let prompts: Vec<Vec<u32>> = vec![
        (1..30).collect(),
        (1..22).chain([200, 201, 202]).collect(),
        (1..30).collect(),
        (40..47).collect(),
    ];
    let run = |cfg: EngineConfig, together: bool| {
        let per_block = cpu(dir.path(), 1 << 20).kv_spec().bytes_per_block;
        let blocks = cfg.num_blocks_override.unwrap();
        let mut h = Harness::new(cfg, cpu(dir.path(), per_block * blocks));
        let mut outs = Vec::new();
        if together {
            let mut rxs: Vec<_> = prompts
                .iter()
                .map(|p| h.submit(p.clone(), greedy(10)))
                .collect();
            h.run();
            outs.extend(rxs.iter_mut().map(|r| drain(r).tokens));
        } else {
            for p in &prompts {
                let mut rx = h.submit(p.clone(), greedy(10));
                h.run();
                outs.push(drain(&mut rx).tokens);
            }
        }
        (
            outs,
            h.counter("vllm:prefix_cache_hits_total"),
            h.counter("vllm:num_preemptions_total"),
        )
    };
    let mut base = config(200, 48);
    base.enable_prefix_caching = false;
    base.max_num_batched_tokens = 256;
    let (reference, _, _) = run(base.clone(), false);
    assert!(reference.iter().all(|o| o.len() == 10));

    let mut cached = base.clone();
    cached.enable_prefix_caching = true;
    let (outs, hits, _) = run(cached.clone(), false);
    assert!(hits >= 28.0, "expected prefix hits, got {hits}");
    assert_eq!(outs, reference, "prefix hits changed greedy output");

    let mut chunked = cached.clone();
    chunked.max_num_batched_tokens = 5;
    let (outs, _, _) = run(chunked, true);
    assert_eq!(outs, reference, "chunked prefill changed greedy output");

    let mut tight = cached;
    tight.num_blocks_override = Some(13);
    tight.max_num_batched_tokens = 64;
    let (outs, _, preemptions) = run(tight, true);
    assert!(preemptions > 0.0, "expected preemption with 13 blocks");
    assert_eq!(outs, reference, "preemption changed greedy output");
}

/// A backend whose every step fails, to exercise the engine-death path.
struct Broken;

impl Backend for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }
    fn kv_spec(&self) -> switchyard::serve::backend::KvSpec {
        switchyard::serve::backend::KvSpec {
            num_layers: 1,
            num_kv_heads: 1,
            head_size: 1,
            block_size: 4,
            bytes_per_block: 8,
        }
    }
    fn vocab_size(&self) -> usize {
        10
    }
    fn available_kv_blocks(&self) -> usize {
        100
    }
    fn init_kv(&mut self, _: usize) -> Result<(), switchyard::serve::backend::BackendError> {
        Ok(())
    }
    fn execute(
        &mut self,
        _: &switchyard::serve::backend::StepBatch,
        _: &mut switchyard::serve::backend::StepOutput,
    ) -> Result<(), switchyard::serve::backend::BackendError> {
        Err(switchyard::serve::backend::BackendError::Failed(
            "device lost".into(),
        ))
    }
}

#[tokio::test]
async fn backend_failure_fails_requests_and_marks_the_engine_dead() {
    use axum::body::Body;
    use tower::ServiceExt as _;

    let metrics = Arc::new(ServeMetrics::new("m"));
    let mut cfg = config(100, 32);
    cfg.num_blocks_override = None;
    let engine =
        switchyard::serve::engine::spawn(cfg, Box::new(Broken), Arc::clone(&metrics), None)
            .unwrap();
    assert!(engine.shared().alive());
    let codec: Arc<dyn switchyard::serve::codec::TextCodec> =
        Arc::new(switchyard::serve::approx_codec::ApproxCodec::new(10));
    let state = Arc::new(switchyard::serve::api::AppState {
        engine: engine.clone(),
        grammars: switchyard::serve::api::constrained::Grammars::new(Arc::clone(&codec), 10, None),
        codec,
        metrics,
        served_model_names: vec!["m".into()],
        max_body_bytes: 1 << 20,
        created: 0,
        limits: Default::default(),
        preprocess: Arc::new(tokio::sync::Semaphore::new(2)),
    });
    let app = switchyard::serve::api::router(state);
    let health = || http::Request::get("/health").body(Body::empty()).unwrap();
    assert_eq!(app.clone().oneshot(health()).await.unwrap().status(), 200);

    let req = http::Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"prompt": [1, 2, 3], "max_tokens": 2}"#))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 500);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "InternalServerError");
    assert_eq!(
        v["error"]["message"],
        "engine failure: backend failure: device lost"
    );
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    while engine.shared().alive() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(app.clone().oneshot(health()).await.unwrap().status(), 503);
    let req = http::Request::post("/v1/completions")
        .body(Body::from(r#"{"prompt": [1], "max_tokens": 1}"#))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
}
