//! Simulated tokens per second one core drives through the real engine with the `sim` backend:
//! 64 concurrent requests (512-token prompts, 256 output tokens) with `--time-scale 0`, so the
//! figure is the engine's CPU cost per simulated token; at `--time-scale 0.01` a replica needs
//! that CPU plus sleeping, and the target is ≥ 100k simulated tokens/s per core.

use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use switchyard::serve::backend::sim::{profile, SimBackend, SimOptions};
use switchyard::serve::engine::{
    EngineConfig, EngineCore, EngineRequest, EngineShared, SamplingParams,
};
use switchyard::serve::metrics::ServeMetrics;
use tokio::sync::mpsc::channel;

const SEQS: usize = 64;
const PROMPT: usize = 512;
const OUTPUT: usize = 256;

/// Runs the workload to completion; returns the number of generated tokens.
fn run_workload(profile_name: &str) -> usize {
    let cfg = EngineConfig {
        model_name: "bench".into(),
        block_size: 16,
        max_num_seqs: 256,
        max_num_batched_tokens: 8192,
        max_model_len: 32_768,
        max_waiting: 100_000,
        scheduling_policy: switchyard::serve::engine::SchedulingPolicy::Fcfs,
        enable_prefix_caching: true,
        num_blocks_override: None,
        gpu_memory_utilization: 0.9,
        seed: 0,
        latency_scale: 1.0,
        eos_token_ids: vec![151_645],
    };
    let opts = SimOptions {
        block_size: 16,
        gpu_memory_utilization: 0.9,
        time_scale: 0.0,
        seed: 0,
    };
    let sim = SimBackend::new(profile(profile_name).unwrap(), opts);
    let metrics = Arc::new(ServeMetrics::new("bench"));
    let mut core = EngineCore::new(
        cfg,
        Box::new(sim),
        metrics,
        None,
        Arc::new(EngineShared::default()),
    )
    .unwrap();
    let mut rxs = Vec::new();
    for i in 0..SEQS {
        let (tx, rx) = channel(1 << 20);
        let prompt: Vec<u32> = (0..PROMPT)
            .map(|t| ((t * 31 + i * 7) % 150_000) as u32)
            .collect();
        let params = SamplingParams {
            max_tokens: OUTPUT,
            ..Default::default()
        };
        core.submit(EngineRequest {
            id: i as u64,
            prompt,
            params,
            arrival: Instant::now(),
            events: tx,
            constraint: None,
        });
        rxs.push(rx);
    }
    while core.has_work() {
        core.step().unwrap();
        for rx in &mut rxs {
            while rx.try_recv().is_ok() {}
        }
    }
    SEQS * OUTPUT
}

fn sim_tokens_per_core(c: &mut Criterion) {
    let mut g = c.benchmark_group("sim");
    g.throughput(Throughput::Elements((SEQS * OUTPUT) as u64));
    g.sample_size(10);
    for name in ["l4-qwen2.5-7b", "h100-qwen2.5-7b"] {
        g.bench_function(format!("{name}_64x(512+256)"), |b| {
            b.iter(|| run_workload(name))
        });
    }
    g.finish();
}

criterion_group!(benches, sim_tokens_per_core);
criterion_main!(benches);
