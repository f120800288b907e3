//! Scheduling hot path: prefix hashing + index match for 1k/10k/100k-token prompts, and one full
//! `Scheduler::schedule` over 10/100/1000 endpoints with an 8k-token (32 KB) prompt, under the
//! reference default config (prefix 3, queue 2, kv 2) and the work-aware profile (freshness
//! filter + predicted-TTFT scorer, 1024-block prefix matching). Target: < 50 µs for 100
//! endpoints.
//!
//! Run: `cargo bench --bench scheduling` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prometheus_client::registry::Registry;
use std::time::Instant;
use switchyard::epp::config::{parse_config, DEFAULT_CONFIG, REFERENCE_DEFAULT_CONFIG};
use switchyard::epp::endpoint::{DispatchCounters, Endpoint, EndpointMetrics, EndpointSnapshot};
use switchyard::epp::prefix::{hash_prompt, PrefixIndex, PrefixIndexConfig};
use switchyard::epp::scheduling::{ScheduleResult, Scheduler, SchedulingRequest};
use switchyard::epp::work::WorkGuard;

/// Deterministic pseudo-text: `tokens × 4` bytes, distinct per `seed`.
fn prompt(tokens: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..tokens * 4)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

fn endpoints(n: usize) -> Vec<Arc<EndpointSnapshot>> {
    (0..n)
        .map(|i| {
            let addr = format!("10.{}.{}.{}:8000", i / 65536, (i / 256) % 256, i % 256)
                .parse()
                .unwrap();
            Arc::new(EndpointSnapshot {
                endpoint: Arc::new(Endpoint::from_addr(addr)),
                metrics: EndpointMetrics {
                    waiting_queue_size: (i % 7) as u32,
                    running_requests: (i % 5) as u32,
                    kv_cache_usage: (i % 10) as f64 / 10.0,
                    updated_at: Some(tokio::time::Instant::now()),
                    ..Default::default()
                },
                dispatch: Some(Arc::new(DispatchCounters::default())),
            })
        })
        .collect()
}

fn hash_and_match(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefix_hash_match");
    let eps = endpoints(100);
    let names: Vec<&str> = eps.iter().map(|e| e.endpoint.name.as_str()).collect();
    for tokens in [1_000usize, 10_000, 100_000] {
        let index = PrefixIndex::new(PrefixIndexConfig {
            lru_capacity_per_endpoint: 31250,
        });
        let p = prompt(tokens, 1);
        let mut hashes = Vec::new();
        hash_prompt(b"model", b"", &p, 16, 256, &mut hashes);
        // Worst case for the walk: the whole prefix is held by several endpoints.
        for name in &names[..8] {
            index.record(&hashes, name, None);
        }
        let mut out = Vec::new();
        g.throughput(Throughput::Bytes(p.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(tokens), &p, |b, p| {
            b.iter(|| {
                hash_prompt(b"model", b"", black_box(p), 16, 256, &mut hashes);
                index.match_prefix(&hashes, names.iter().copied(), &mut out);
                black_box(&out);
            })
        });
    }
    g.finish();
}

/// One routing decision as the director makes it: schedule, then record the prompt for the
/// primary endpoint (the same work `schedule` alone did before recording moved out of it).
fn route(
    scheduler: &Scheduler,
    req: &SchedulingRequest<'_>,
    eps: &[Arc<EndpointSnapshot>],
) -> ScheduleResult {
    let result = scheduler.schedule(req, eps).unwrap();
    if let Some(prefix) = scheduler.prefix_cache() {
        prefix.record(&result);
    }
    result
}

fn schedule(c: &mut Criterion) {
    schedule_with(c, "schedule_8k_prompt", REFERENCE_DEFAULT_CONFIG);
    schedule_with(c, "schedule_8k_prompt_work_aware", DEFAULT_CONFIG);
}

fn schedule_with(c: &mut Criterion, group: &str, config_text: &str) {
    let mut g = c.benchmark_group(group);
    let config = parse_config(config_text).unwrap().scheduling;
    for n in [10usize, 100, 1000] {
        let scheduler = Scheduler::new(&config, &mut Registry::default());
        let eps = endpoints(n);
        // Outstanding work on every endpoint, as the work-aware scorer reads it.
        let _work: Vec<WorkGuard> = eps
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let d = e.dispatch.as_ref()?;
                Some(WorkGuard::dispatch(
                    d,
                    100 * (i % 13) as u64,
                    Instant::now(),
                ))
            })
            .collect();
        // Warm the index: 64 distinct 8k-token conversations spread over the pool.
        let prompts: Vec<Vec<u8>> = (0..64).map(|s| prompt(8192, s)).collect();
        for (i, p) in prompts.iter().enumerate() {
            let req = SchedulingRequest {
                request_id: "warm",
                target_model: "model",
                api: Default::default(),
                prompt: p,
                cache_salt: b"",
                fallbacks: 0,
                headers: &[],
            };
            let one = [eps[i % n].clone()];
            route(&scheduler, &req, &one);
        }
        let mut i = 0usize;
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                let req = SchedulingRequest {
                    request_id: "bench",
                    target_model: "model",
                    api: Default::default(),
                    prompt: &prompts[i % prompts.len()],
                    cache_salt: b"",
                    fallbacks: 0,
                    headers: &[],
                };
                black_box(route(&scheduler, &req, &eps));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, hash_and_match, schedule);
criterion_main!(benches);
