//! Extraction tests: each engine's exposition text to exact `EndpointMetrics`, and the error paths.

use std::collections::HashMap;

use super::*;
use crate::epp::datastore::DiscoveryEvent;

mod staleness;

/// A vLLM v1 page: HELP/TYPE lines, histograms interleaved with the gauges, escaped labels,
/// a two-series LoRA family where the later-created series (larger value) is current.
const VLLM_PAGE: &str = r#"# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen2.5-1.5B \"instruct\""} 7.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="Qwen/Qwen2.5-1.5B"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="Qwen/Qwen2.5-1.5B"} 42.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="Qwen/Qwen2.5-1.5B"} 42.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="Qwen/Qwen2.5-1.5B"} 3.25
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen2.5-1.5B"} 3.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen2.5-1.5B"} 0.4375
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="27306",prefix_caching_hash_algo="builtin"} 1.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql-lora",waiting_lora_adapters=""} 1.7000000005e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql-lora, tweet-summary,sql-lora",waiting_lora_adapters="sql-lora-1fdg2"} 1.7000000012e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.7000000009e+09
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="Qwen/Qwen2.5-1.5B"} 1.0e+06
"#;

#[test]
fn vllm_page_gives_exact_metrics() {
    let m = extract_metrics(EngineType::Vllm, VLLM_PAGE).unwrap();
    assert_eq!(
        m,
        EndpointMetrics {
            waiting_queue_size: 3,
            running_requests: 7,
            kv_cache_usage: 0.4375,
            kv_block_size: Some(16),
            kv_num_blocks: Some(27306),
            lora: Some(LoraInfo {
                max_lora: 4,
                running: vec!["sql-lora".into(), "tweet-summary".into()],
                waiting: vec!["sql-lora-1fdg2".into()],
            }),
            updated_at: None,
        }
    );
}

#[test]
fn vllm_old_kv_name_and_optional_families() {
    let page = "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0\n\
                # TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 1\n\
                # TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.25\n\
                # TYPE vllm:cache_config_info gauge\n\
                vllm:cache_config_info{block_size=\"32\",num_gpu_blocks=\"None\"} 1\n";
    let m = extract_metrics(EngineType::Vllm, page).unwrap();
    assert_eq!(m.kv_cache_usage, 0.25);
    assert_eq!((m.waiting_queue_size, m.running_requests), (0, 1));
    assert_eq!(m.kv_block_size, Some(32));
    assert_eq!(m.kv_num_blocks, None, "\"None\" before memory profiling");
    assert_eq!(m.lora, None, "no LoRA family → no LoRA info");

    // The current name wins when both are present.
    let both =
        format!("{page}# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 0.5\n");
    assert_eq!(
        extract_metrics(EngineType::Vllm, &both)
            .unwrap()
            .kv_cache_usage,
        0.5
    );
}

#[test]
fn lora_largest_timestamp_wins_and_empty_lists() {
    let page = "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0\n\
                # TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n\
                # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 0\n\
                # TYPE vllm:lora_requests_info gauge\n\
                vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"c\"} 100\n\
                vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"} 300\n\
                vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"z\",waiting_lora_adapters=\"\"} 200\n";
    let lora = extract_metrics(EngineType::Vllm, page)
        .unwrap()
        .lora
        .unwrap();
    assert_eq!(
        lora,
        LoraInfo {
            max_lora: 2,
            running: vec![],
            waiting: vec![],
        }
    );
}

#[test]
fn sglang_page() {
    let page = r#"# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
# HELP sglang:e2e_request_latency_seconds Histogram of End-to-end request latency in seconds
# TYPE sglang:e2e_request_latency_seconds histogram
sglang:e2e_request_latency_seconds_bucket{le="0.1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
sglang:e2e_request_latency_seconds_sum{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.62
# HELP sglang:cache_config_info Cache configuration.
# TYPE sglang:cache_config_info gauge
sglang:cache_config_info{num_pages="5000",page_size="64"} 1.0
"#;
    let m = extract_metrics(EngineType::Sglang, page).unwrap();
    assert_eq!(
        m,
        EndpointMetrics {
            waiting_queue_size: 4,
            running_requests: 12,
            kv_cache_usage: 0.62,
            kv_block_size: Some(64),
            kv_num_blocks: Some(5000),
            lora: None,
            updated_at: None,
        }
    );
}

#[test]
fn trtllm_serve_page() {
    let page = "# HELP trtllm_num_requests_waiting Number of waiting requests\n\
                # TYPE trtllm_num_requests_waiting gauge\n\
                trtllm_num_requests_waiting{model_name=\"llama\",engine_type=\"trtllm\"} 2\n\
                # TYPE trtllm_num_requests_running gauge\n\
                trtllm_num_requests_running{model_name=\"llama\",engine_type=\"trtllm\"} 9\n\
                # TYPE trtllm_kv_cache_utilization gauge\n\
                trtllm_kv_cache_utilization{model_name=\"llama\",engine_type=\"trtllm\"} 0.125\n\
                # TYPE trtllm_kv_cache_tokens_per_block gauge\n\
                trtllm_kv_cache_tokens_per_block{model_name=\"llama\",engine_type=\"trtllm\"} 32\n\
                # TYPE trtllm_kv_cache_max_blocks gauge\n\
                trtllm_kv_cache_max_blocks{model_name=\"llama\",engine_type=\"trtllm\"} 81920\n";
    let m = extract_metrics(EngineType::TrtllmServe, page).unwrap();
    assert_eq!(
        m,
        EndpointMetrics {
            waiting_queue_size: 2,
            running_requests: 9,
            kv_cache_usage: 0.125,
            kv_block_size: Some(32),
            kv_num_blocks: Some(81920),
            lora: None,
            updated_at: None,
        }
    );
}

#[test]
fn triton_tensorrt_llm_page() {
    let page = r#"# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 6
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 512
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 6
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 11
# HELP nv_inference_request_duration_us Cumulative inference request duration in microseconds
# TYPE nv_inference_request_duration_us counter
nv_inference_request_duration_us{model="tensorrt_llm",version="1"} 123456
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 1200
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 2800
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 4000
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.3
"#;
    let m = extract_metrics(EngineType::TritonTensorrtLlm, page).unwrap();
    assert_eq!(
        m,
        EndpointMetrics {
            waiting_queue_size: 11,
            running_requests: 6,
            kv_cache_usage: 0.3,
            kv_block_size: Some(64),
            kv_num_blocks: Some(4000),
            lora: None,
            updated_at: None,
        }
    );
}

#[test]
fn latest_timestamp_series_wins_for_plain_gauges() {
    let page = "# TYPE sglang:num_queue_reqs gauge\n\
                sglang:num_queue_reqs{model_name=\"a\"} 1\n\
                sglang:num_queue_reqs{model_name=\"b\"} 2 2000\n\
                sglang:num_queue_reqs{model_name=\"c\"} 3 1000\n\
                # TYPE sglang:num_running_reqs gauge\n\
                sglang:num_running_reqs{model_name=\"a\"} 5\nsglang:num_running_reqs{model_name=\"b\"} 6\n\
                # TYPE sglang:token_usage gauge\nsglang:token_usage 0\n";
    let m = extract_metrics(EngineType::Sglang, page).unwrap();
    assert_eq!(m.waiting_queue_size, 2, "largest timestamp");
    assert_eq!(m.running_requests, 5, "no timestamps: first series");
}

#[test]
fn missing_untyped_and_histogram_families_are_errors_naming_them() {
    let base = "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0\n\
                # TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n";
    let err = extract_metrics(EngineType::Vllm, base).unwrap_err();
    assert_eq!(
        err.to_string(),
        "metric family \"vllm:kv_cache_usage_perc\" not found as a gauge or counter"
    );
    // Untyped series do not count.
    let untyped = format!("{base}vllm:kv_cache_usage_perc 0.5\n");
    assert!(matches!(
        extract_metrics(EngineType::Vllm, &untyped).unwrap_err(),
        ScrapeError::MissingFamily {
            family: "vllm:kv_cache_usage_perc"
        }
    ));
    let histogram = format!(
        "{base}# TYPE vllm:kv_cache_usage_perc histogram\nvllm:kv_cache_usage_perc_bucket{{le=\"1\"}} 1\n"
    );
    assert_eq!(
        extract_metrics(EngineType::Vllm, &histogram).unwrap_err().to_string(),
        "metric family \"vllm:kv_cache_usage_perc\" has type Histogram; only gauge and counter are read"
    );
    let err = extract_metrics(EngineType::Sglang, base).unwrap_err();
    assert_eq!(
        err.to_string(),
        "metric family \"sglang:num_queue_reqs\" not found as a gauge or counter"
    );
    let triton = "# TYPE nv_trt_llm_request_metrics gauge\n\
                  nv_trt_llm_request_metrics{request_type=\"waiting\"} 1\n";
    assert_eq!(
        extract_metrics(EngineType::TritonTensorrtLlm, triton)
            .unwrap_err()
            .to_string(),
        "no series of \"nv_trt_llm_request_metrics\" matches {request_type=\"scheduled\"}"
    );
}

#[test]
fn malformed_and_invalid_values_are_errors() {
    let page = "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{a=\"x} 1\n";
    assert_eq!(
        extract_metrics(EngineType::Vllm, page)
            .unwrap_err()
            .to_string(),
        "invalid exposition: line 2: unterminated value of label \"a\""
    );
    for bad in ["NaN", "-1", "+Inf"] {
        let page = format!(
            "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting {bad}\n\
             # TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n\
             # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 0\n"
        );
        assert!(
            matches!(
                extract_metrics(EngineType::Vllm, &page),
                Err(ScrapeError::InvalidValue {
                    family: "vllm:num_requests_waiting",
                    ..
                })
            ),
            "{bad}"
        );
    }
    // Fractional counts truncate and huge ones saturate, as Go's int conversion of a gauge.
    let page = "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 2.9\n\
                # TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 1e12\n\
                # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 0\n";
    let m = extract_metrics(EngineType::Vllm, page).unwrap();
    assert_eq!((m.waiting_queue_size, m.running_requests), (2, u32::MAX));
}

#[test]
fn adapter_lists_are_trimmed_and_deduplicated() {
    assert_eq!(adapter_list(Some(" a, b ,,a,c ")), ["a", "b", "c"]);
    assert!(adapter_list(Some("")).is_empty());
    assert!(adapter_list(None).is_empty());
}

#[test]
fn engine_specs_list_every_family_they_read() {
    for engine in [
        EngineType::Vllm,
        EngineType::Sglang,
        EngineType::TrtllmServe,
        EngineType::TritonTensorrtLlm,
    ] {
        let spec = engine_spec(engine);
        let mut names = vec![spec.waiting.name, spec.running.name, spec.kv_usage.name];
        names.extend(spec.kv_usage_fallback.map(|s| s.name));
        names.extend(spec.lora.map(|s| s.name));
        match spec.cache {
            CacheSpec::InfoLabels { metric, .. } => names.push(metric.name),
            CacheSpec::Gauges {
                block_size,
                num_blocks,
            } => names.extend([block_size.name, num_blocks.name]),
        }
        for name in names {
            assert!(spec.families.contains(&name), "{engine}: {name}");
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Arbitrary lines made of the vLLM family names, labels and values never panic.
    #[test]
    fn extraction_never_panics(
        lines in proptest::collection::vec(
            "(# TYPE )?vllm:(num_requests_waiting|num_requests_running|kv_cache_usage_perc|lora_requests_info|cache_config_info)( gauge| counter| histogram)?(\\{(max_lora|block_size|num_gpu_blocks|running_lora_adapters)=\"[0-9a-z,]{0,6}\"\\})? ?(-?[0-9.]{1,5}|NaN|\\+Inf)?",
            0..16,
        )
    ) {
        let _ = extract_metrics(EngineType::Vllm, &lines.join("\n"));
    }

    /// Values planted in a valid page, with its families in any order and unrelated families
    /// between them, come out exactly (counts as integers, the KV fraction bit for bit).
    #[test]
    fn planted_values_come_out_exactly(
        waiting in 0u32..1_000_000,
        running in 0u32..1_000_000,
        kv in 0.0f64..=1.0,
        block_size in 1u32..=1024,
        blocks in 1u64..=10_000_000,
        order in proptest::strategy::Strategy::prop_shuffle(
            proptest::strategy::Just(vec![0usize, 1, 2, 3, 4])
        ),
    ) {
        let families = planted_families(waiting, running, &format!("{kv:?}"), block_size, blocks);
        let page: String = order.iter().map(|&i| families[i].as_str()).collect();
        let m = extract_metrics(EngineType::Vllm, &page).unwrap();
        proptest::prop_assert_eq!(
            m,
            EndpointMetrics {
                waiting_queue_size: waiting,
                running_requests: running,
                kv_cache_usage: kv,
                kv_block_size: Some(block_size),
                kv_num_blocks: Some(blocks),
                lora: None,
                updated_at: None,
            }
        );
    }

    /// A NaN, infinite or negative KV usage in an otherwise valid page is refused, naming the
    /// family and carrying the value (the scorer computes `1 − usage` and would rank such a pod
    /// above every real one).
    #[test]
    fn invalid_kv_usage_is_refused(
        kv in proptest::prop_oneof![
            proptest::strategy::Just(f64::NAN),
            proptest::strategy::Just(f64::INFINITY),
            proptest::strategy::Just(f64::NEG_INFINITY),
            -1e9f64..-1e-9,
        ],
        waiting in 0u32..1000,
    ) {
        let text = if kv.is_nan() { "NaN".to_owned() } else if kv.is_infinite() {
            if kv > 0.0 { "+Inf".to_owned() } else { "-Inf".to_owned() }
        } else {
            format!("{kv:?}")
        };
        let page: String = planted_families(waiting, 1, &text, 16, 100).concat();
        match extract_metrics(EngineType::Vllm, &page) {
            Err(ScrapeError::InvalidValue { family, value }) => {
                proptest::prop_assert_eq!(family, "vllm:kv_cache_usage_perc");
                proptest::prop_assert!(
                    value.to_bits() == kv.to_bits() || (value.is_nan() && kv.is_nan()),
                    "value {} for planted {}", value, kv
                );
            }
            other => proptest::prop_assert!(false, "planted kv {} gave {:?}", text, other),
        }
    }
}

/// The five families of a vLLM page that `planted_values_come_out_exactly` shuffles: the three
/// required gauges, the cache info, and an unrelated histogram.
fn planted_families(
    waiting: u32,
    running: u32,
    kv: &str,
    block_size: u32,
    blocks: u64,
) -> [String; 5] {
    [
        format!("# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{engine=\"0\",model_name=\"m\"}} {waiting}\n"),
        format!("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{engine=\"0\",model_name=\"m\"}} {running}\n"),
        format!("# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"m\"}} {kv}\n"),
        format!("# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{{block_size=\"{block_size}\",num_gpu_blocks=\"{blocks}\"}} 1.0\n"),
        "# TYPE vllm:e2e_request_latency_seconds histogram\nvllm:e2e_request_latency_seconds_bucket{le=\"+Inf\"} 3.0\nvllm:e2e_request_latency_seconds_count 3.0\nvllm:e2e_request_latency_seconds_sum 1.5\n".to_owned(),
    ]
}

/// An in-memory metrics source: counts scrapes per endpoint and answers with a queue depth equal
/// to the count so far, or fails for endpoints marked down.
#[derive(Clone, Default)]
struct FakeSource {
    scrapes: Arc<parking_lot::Mutex<HashMap<String, u32>>>,
    down: Arc<parking_lot::Mutex<Vec<String>>>,
}

impl FakeSource {
    fn count(&self, name: &str) -> u32 {
        self.scrapes.lock().get(name).copied().unwrap_or(0)
    }
}

impl MetricsSource for FakeSource {
    fn scrape(
        &self,
        endpoint: &Endpoint,
    ) -> impl std::future::Future<Output = Result<EndpointMetrics, ScrapeError>> + Send {
        let result = if self.down.lock().contains(&endpoint.name) {
            Err(ScrapeError::Status {
                uri: endpoint.name.clone(),
                status: 503,
            })
        } else {
            let mut scrapes = self.scrapes.lock();
            let n = scrapes.entry(endpoint.name.clone()).or_default();
            *n += 1;
            Ok(EndpointMetrics {
                waiting_queue_size: *n,
                ..Default::default()
            })
        };
        std::future::ready(result)
    }
}

fn endpoint(i: u8) -> Endpoint {
    Endpoint::from_addr(format!("10.0.0.{i}:8000").parse().unwrap())
}

const MS: Duration = Duration::from_millis(1);

/// Lets every spawned task run to its next await (paused time does not move).
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// Under paused time a poller scrapes exactly once per interval: re-listing an endpoint keeps
/// its one poller, a new endpoint gets one, a replaced endpoint's poller is swapped, a removed
/// endpoint's poller stops, and shutdown stops them all.
#[tokio::test(start_paused = true)]
async fn one_poller_per_endpoint_scrapes_once_per_interval() {
    let interval = Duration::from_millis(100);
    let config = ScrapeConfig {
        interval,
        timeout: Duration::from_secs(1),
    };
    let datastore = Arc::new(Datastore::new());
    let (a, b) = (endpoint(1), endpoint(2));
    datastore.apply(DiscoveryEvent::Reset(vec![a.clone()]));
    let source = FakeSource::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let manager = spawn_scrape_manager_with(datastore.clone(), config, source.clone(), stop_rx);
    settle().await;
    // The first tick comes within one interval (a random offset in [0, interval) spreads
    // pollers); a millisecond short of it, because an offset of 0 ticks again at `interval`.
    tokio::time::sleep(interval - MS).await;
    settle().await;
    assert_eq!(source.count(&a.name), 1);

    // Exactly one scrape per interval from now on, whatever happens to the endpoint set.
    let per_second = |before: u32, after: u32| after - before;
    let before = source.count(&a.name);
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(per_second(before, source.count(&a.name)), 10);

    datastore.apply(DiscoveryEvent::Reset(vec![a.clone()]));
    datastore.apply(DiscoveryEvent::Reset(vec![a.clone()]));
    settle().await;
    let before = source.count(&a.name);
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(
        per_second(before, source.count(&a.name)),
        10,
        "re-listing adds no poller"
    );
    assert_eq!(source.count(&b.name), 0);

    datastore.apply(DiscoveryEvent::Upsert(b.clone()));
    settle().await;
    tokio::time::sleep(interval - MS).await;
    settle().await;
    let (before_a, before_b) = (source.count(&a.name), source.count(&b.name));
    assert_eq!(before_b, 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(source.count(&a.name) - before_a, 10);
    assert_eq!(source.count(&b.name) - before_b, 10);
    // The slot publishes what was scraped last.
    let slot_b = datastore.slot(&b.name).unwrap();
    assert_eq!(
        slot_b.load().metrics.waiting_queue_size,
        source.count(&b.name)
    );
    assert!(slot_b.load().metrics.updated_at.is_some());

    // Replacing a (same name, new labels) swaps its poller: still one scrape per interval.
    let mut replaced = a.clone();
    replaced.labels.insert("zone".into(), "z".into());
    datastore.apply(DiscoveryEvent::Upsert(replaced));
    settle().await;
    tokio::time::sleep(interval).await;
    settle().await;
    let before = source.count(&a.name);
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(source.count(&a.name) - before, 10, "a after replace");

    // Removing a stops its poller.
    datastore.apply(DiscoveryEvent::Remove(a.name.clone()));
    settle().await;
    let before = source.count(&a.name);
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(source.count(&a.name), before, "a is no longer polled");

    // Shutdown stops every poller.
    stop_tx.send(true).unwrap();
    manager.await.unwrap();
    let before = source.count(&b.name);
    tokio::time::sleep(Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(source.count(&b.name), before, "b stopped on shutdown");
}

/// A failing endpoint keeps its last metrics, and stays polled once per interval, so it is
/// published again as soon as it recovers.
#[tokio::test(start_paused = true)]
async fn failed_scrapes_keep_the_last_metrics_until_recovery() {
    let interval = Duration::from_millis(50);
    let config = ScrapeConfig {
        interval,
        timeout: Duration::from_secs(1),
    };
    let datastore = Arc::new(Datastore::new());
    let a = endpoint(1);
    datastore.apply(DiscoveryEvent::Reset(vec![a.clone()]));
    let source = FakeSource::default();
    let (_stop_tx, stop_rx) = watch::channel(false);
    let _manager = spawn_scrape_manager_with(datastore.clone(), config, source.clone(), stop_rx);
    settle().await;
    // Three ticks whatever the random offset (with 0, a fourth would come at `interval * 3`).
    tokio::time::sleep(interval * 3 - MS).await;
    settle().await;
    let slot = datastore.slot(&a.name).unwrap();
    let last = slot.load();
    assert_eq!(last.metrics.waiting_queue_size, 3);

    source.down.lock().push(a.name.clone());
    tokio::time::sleep(interval * 10).await;
    settle().await;
    let during = slot.load();
    assert_eq!(
        during.metrics.waiting_queue_size, 3,
        "previous metrics kept"
    );
    assert_eq!(
        during.metrics.updated_at, last.metrics.updated_at,
        "not republished"
    );

    source.down.lock().clear();
    tokio::time::sleep(interval).await;
    settle().await;
    assert_eq!(
        slot.load().metrics.waiting_queue_size,
        4,
        "published again on recovery"
    );
}
