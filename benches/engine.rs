//! Engine hot paths: block-pool allocate/free/touch, prefix lookup + allocation, and one
//! scheduler+engine step over a full decode batch (sim backend, no sleeping, so the number is
//! the engine's own CPU cost per step).

use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use switchyard::serve::backend::sim::{profile, SimBackend, SimOptions};
use switchyard::serve::engine::block_pool::BlockPool;
use switchyard::serve::engine::{
    EngineConfig, EngineCore, EngineRequest, EngineShared, SamplingParams, SeqEvent,
};
use switchyard::serve::metrics::ServeMetrics;
use tokio::sync::mpsc::{channel, Receiver};

fn block_pool(c: &mut Criterion) {
    let mut g = c.benchmark_group("block_pool");
    g.throughput(Throughput::Elements(1024));
    g.bench_function("allocate_register_free_1024", |b| {
        let mut pool = BlockPool::new(4096, true, false);
        let mut ids = Vec::with_capacity(1024);
        let mut h = 0u64;
        b.iter(|| {
            for _ in 0..1024 {
                let id = pool.allocate().unwrap();
                h = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
                pool.register(id, h);
                ids.push(id);
            }
            for id in ids.drain(..).rev() {
                pool.free(id).unwrap();
            }
        });
    });
    g.bench_function("touch_free_cached_1024", |b| {
        let mut pool = BlockPool::new(4096, true, false);
        let ids: Vec<u32> = (0..1024).map(|_| pool.allocate().unwrap()).collect();
        for (i, &id) in ids.iter().enumerate() {
            pool.register(id, i as u64);
        }
        for &id in &ids {
            pool.free(id).unwrap();
        }
        b.iter(|| {
            for i in 0..1024u64 {
                let id = pool.lookup(i).unwrap();
                pool.touch(id).unwrap();
            }
            for &id in ids.iter().rev() {
                pool.free(id).unwrap();
            }
        });
    });
    g.finish();
}

fn engine(num_seqs: usize) -> (EngineCore, Vec<Receiver<SeqEvent>>) {
    let cfg = EngineConfig {
        model_name: "bench".into(),
        block_size: 16,
        max_num_seqs: num_seqs,
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
    let backend = Box::new(SimBackend::new(profile("h100-qwen2.5-7b").unwrap(), opts));
    let metrics = Arc::new(ServeMetrics::new("bench"));
    let mut core = EngineCore::new(
        cfg,
        backend,
        metrics,
        None,
        Arc::new(EngineShared::default()),
    )
    .unwrap();
    let mut rxs = Vec::new();
    for i in 0..num_seqs {
        let (tx, rx) = channel(1 << 20);
        let prompt: Vec<u32> = (0..512)
            .map(|t| (t * 31 + i * 7) as u32 % 150_000)
            .collect();
        let params = SamplingParams {
            max_tokens: 20_000,
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
    // Prefill everything so the measured steps are pure decode.
    for _ in 0..(num_seqs * 512 / 8192 + 2) {
        core.step().unwrap();
    }
    (core, rxs)
}

fn scheduler_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine_step");
    for n in [64usize, 256] {
        // Each iteration runs 16 decode steps of `n` tokens.
        g.throughput(Throughput::Elements(16 * n as u64));
        g.bench_function(format!("decode_batch_{n}"), |b| {
            b.iter_batched_ref(
                || engine(n),
                |(core, rxs)| {
                    for _ in 0..16 {
                        core.step().unwrap();
                    }
                    for rx in rxs.iter_mut() {
                        while rx.try_recv().is_ok() {}
                    }
                },
                BatchSize::LargeInput,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, block_pool, scheduler_step);
criterion_main!(benches);
