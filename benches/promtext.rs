//! Cost of reading one model server's `/metrics` page, done per endpoint every 50 ms: a
//! realistic ~30 KB vLLM page (gauges interleaved with many histograms) parsed for the six
//! families the EPP reads, and the full extraction into `EndpointMetrics`.
//!
//! Run: `cargo bench --bench promtext -- --quick`

use std::fmt::Write;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use switchyard::epp::endpoint::EngineType;
use switchyard::epp::scrape::{engine_spec, extract_metrics};
use switchyard::promtext::{self, Limits};

const LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

fn gauge(page: &mut String, name: &str, help: &str, labels: &str, value: f64) {
    let _ = write!(
        page,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {value:?}\n"
    );
}

fn histogram(page: &mut String, name: &str, labels: &str, buckets: &[f64]) {
    let _ = write!(
        page,
        "# HELP {name} Histogram of {name}.\n# TYPE {name} histogram\n"
    );
    let mut cumulative = 0u64;
    for (i, le) in buckets.iter().enumerate() {
        cumulative += (i as u64 * 7) % 13;
        let _ = writeln!(
            page,
            "{name}_bucket{{{labels},le=\"{le:?}\"}} {cumulative}.0"
        );
    }
    let _ = write!(
        page,
        "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}.0\n{name}_count{{{labels}}} {cumulative}.0\n{name}_sum{{{labels}}} 1234.5678\n"
    );
}

/// A vLLM v1 `/metrics` page of at least 30 KB, shaped like a real one.
fn vllm_page() -> String {
    let mut page = String::new();
    for generation in 0..3 {
        let _ = write!(
            page,
            "# HELP python_gc_objects_collected_total Objects collected during gc\n\
             # TYPE python_gc_objects_collected_total counter\n\
             python_gc_objects_collected_total{{generation=\"{generation}\"}} 12345.0\n"
        );
    }
    page.push_str(
        "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
         # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes 2.147483648e+09\n",
    );
    let model = "engine=\"0\",model_name=\"Qwen/Qwen2.5-Coder-7B-Instruct\"";
    gauge(
        &mut page,
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        model,
        12.0,
    );
    histogram(
        &mut page,
        "vllm:time_to_first_token_seconds",
        model,
        TTFT_BUCKETS,
    );
    gauge(
        &mut page,
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        model,
        3.0,
    );
    let _ = write!(
        page,
        "# HELP vllm:lora_requests_info Running stats on lora requests.\n# TYPE vllm:lora_requests_info gauge\n\
         vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"sql-lora\",waiting_lora_adapters=\"\"}} 1.7000000005e+09\n\
         vllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"sql-lora,tweet\",waiting_lora_adapters=\"x\"}} 1.7000000012e+09\n"
    );
    gauge(
        &mut page,
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        model,
        0.4375,
    );
    let _ = write!(
        page,
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n# TYPE vllm:cache_config_info gauge\n\
         vllm:cache_config_info{{block_size=\"16\",cache_dtype=\"auto\",enable_prefix_caching=\"True\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"None\",num_gpu_blocks=\"27306\"}} 1.0\n"
    );
    for counter in [
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
    ] {
        let _ = write!(
            page,
            "# HELP {counter} Counter.\n# TYPE {counter} counter\n{counter}{{{model}}} 987654.0\n"
        );
    }
    page.push_str("# HELP vllm:request_success_total Count of successfully processed requests.\n# TYPE vllm:request_success_total counter\n");
    for reason in ["stop", "length", "abort", "error"] {
        let _ = writeln!(
            page,
            "vllm:request_success_total{{{model},finished_reason=\"{reason}\"}} 42.0"
        );
    }
    for name in [
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
    ] {
        histogram(&mut page, name, model, &LATENCY_BUCKETS[..19]);
    }
    for name in [
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
        "vllm:request_inference_time_seconds",
    ] {
        histogram(&mut page, name, model, LATENCY_BUCKETS);
    }
    for name in [
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
        "vllm:request_params_max_tokens",
        "vllm:iteration_tokens_total",
    ] {
        histogram(&mut page, name, model, TOKEN_BUCKETS);
    }
    // A LoRA adapter's series pad the page to a realistic size.
    let lora = "engine=\"0\",model_name=\"sql-lora\"";
    let mut round = 0;
    while page.len() < 30_000 {
        histogram(
            &mut page,
            &format!("vllm:adapter_latency_{round}_seconds"),
            lora,
            LATENCY_BUCKETS,
        );
        round += 1;
    }
    page
}

fn bench(c: &mut Criterion) {
    let page = vllm_page();
    assert!(page.len() >= 30_000);
    let expected = extract_metrics(EngineType::Vllm, &page).unwrap();
    assert_eq!(
        (expected.waiting_queue_size, expected.running_requests),
        (3, 12)
    );
    assert_eq!(expected.lora.as_ref().map(|l| l.running.len()), Some(2));

    let mut group = c.benchmark_group("vllm_metrics_page");
    group.throughput(Throughput::Bytes(page.len() as u64));
    let families = engine_spec(EngineType::Vllm).families;
    let limits = Limits::default();
    group.bench_function("parse_wanted_families", |b| {
        b.iter(|| promtext::parse(black_box(&page), families, &limits).unwrap())
    });
    group.bench_function("extract_metrics", |b| {
        b.iter(|| extract_metrics(EngineType::Vllm, black_box(&page)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
