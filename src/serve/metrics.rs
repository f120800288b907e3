//! The decode server's Prometheus metrics, with vLLM's names, labels, types and buckets
//! (REFERENCE.md §6) so the EPP scraper and existing dashboards read them unchanged.
//!
//! The engine updates the handles (atomics) after each step; `/metrics` only encodes the registry
//! and never waits on the engine.

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::serve::protocol::FinishReason;

pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
pub const TOKEN_LATENCY_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
pub const REQUEST_LATENCY_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Every metric family name the server exposes, as in its `# TYPE` lines.
pub const METRIC_NAMES: [&str; 20] = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:cache_config_info",
    "vllm:lora_requests_info",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:request_success_total",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:time_per_output_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    finished_reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheConfigLabels {
    block_size: String,
    num_gpu_blocks: String,
    num_cpu_blocks: String,
    enable_prefix_caching: String,
    gpu_memory_utilization: String,
    cache_dtype: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoraLabels {
    max_lora: String,
    running_lora_adapters: String,
    waiting_lora_adapters: String,
}

/// KV-cache facts published once in `vllm:cache_config_info`.
#[derive(Debug, Clone)]
pub struct CacheConfigInfo {
    pub block_size: usize,
    pub num_gpu_blocks: usize,
    pub enable_prefix_caching: bool,
    pub gpu_memory_utilization: f64,
}

/// Metric handles shared by the engine (writer) and the `/metrics` handler (reader).
#[derive(Debug)]
pub struct ServeMetrics {
    registry: Registry,
    pub num_requests_running: Gauge,
    pub num_requests_waiting: Gauge,
    pub kv_cache_usage_perc: Gauge<f64, AtomicU64>,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub prefix_cache_queries: Counter,
    pub prefix_cache_hits: Counter,
    pub num_preemptions: Counter,
    success_stop: Counter,
    success_length: Counter,
    success_abort: Counter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub time_per_output_token: Histogram,
    pub e2e_request_latency: Histogram,
    pub request_queue_time: Histogram,
    pub request_prefill_time: Histogram,
    pub request_decode_time: Histogram,
    pub request_prompt_tokens: Histogram,
    pub request_generation_tokens: Histogram,
    cache_config: Family<CacheConfigLabels, Gauge>,
}

impl ServeMetrics {
    /// A registry whose every series carries `model_name` and `engine="0"`.
    pub fn new(model_name: &str) -> Self {
        let labels: [(Cow<'static, str>, Cow<'static, str>); 2] = [
            (
                Cow::Borrowed("model_name"),
                Cow::Owned(model_name.to_owned()),
            ),
            (Cow::Borrowed("engine"), Cow::Borrowed("0")),
        ];
        let mut r = Registry::with_labels(labels.into_iter());
        let num_requests_running = Gauge::default();
        r.register(
            "vllm:num_requests_running",
            "Number of requests in model execution batches",
            num_requests_running.clone(),
        );
        let num_requests_waiting = Gauge::default();
        r.register(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed",
            num_requests_waiting.clone(),
        );
        let kv_cache_usage_perc = Gauge::<f64, AtomicU64>::default();
        r.register(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage",
            kv_cache_usage_perc.clone(),
        );
        let cache_config = Family::<CacheConfigLabels, Gauge>::default();
        r.register(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            cache_config.clone(),
        );
        let lora = Family::<LoraLabels, Gauge<f64, AtomicU64>>::default();
        r.register(
            "vllm:lora_requests_info",
            "Running stats on lora requests",
            lora.clone(),
        );
        // No LoRA support: publish the series with empty adapter lists so scrapers see max_lora 0.
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        lora.get_or_create(&LoraLabels {
            max_lora: "0".into(),
            running_lora_adapters: String::new(),
            waiting_lora_adapters: String::new(),
        })
        .set(started);

        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            // prometheus-client appends `_total` to counter samples.
            r.register(name, help, c.clone());
            c
        };
        let prompt_tokens = counter(
            &mut r,
            "vllm:prompt_tokens",
            "Number of prefill tokens processed",
        );
        let generation_tokens = counter(
            &mut r,
            "vllm:generation_tokens",
            "Number of generation tokens processed",
        );
        let prefix_cache_queries = counter(
            &mut r,
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens",
        );
        let prefix_cache_hits = counter(
            &mut r,
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens",
        );
        let num_preemptions = counter(
            &mut r,
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine",
        );
        let success = Family::<ReasonLabels, Counter>::default();
        r.register(
            "vllm:request_success",
            "Count of successfully processed requests",
            success.clone(),
        );
        let reason = |finished_reason| {
            success
                .get_or_create(&ReasonLabels { finished_reason })
                .clone()
        };
        let (success_stop, success_length, success_abort) =
            (reason("stop"), reason("length"), reason("abort"));

        let hist = |r: &mut Registry, name: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::new(buckets.iter().copied());
            r.register(name, help, h.clone());
            h
        };
        let time_to_first_token = hist(
            &mut r,
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds",
            &TTFT_BUCKETS,
        );
        let inter_token_latency = hist(
            &mut r,
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds",
            &TOKEN_LATENCY_BUCKETS,
        );
        let time_per_output_token = hist(
            &mut r,
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds",
            &TOKEN_LATENCY_BUCKETS,
        );
        let e2e_request_latency = hist(
            &mut r,
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds",
            &REQUEST_LATENCY_BUCKETS,
        );
        let request_queue_time = hist(
            &mut r,
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request",
            &REQUEST_LATENCY_BUCKETS,
        );
        let request_prefill_time = hist(
            &mut r,
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request",
            &REQUEST_LATENCY_BUCKETS,
        );
        let request_decode_time = hist(
            &mut r,
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request",
            &REQUEST_LATENCY_BUCKETS,
        );
        let token_buckets: Vec<f64> = (0..20).map(|i| f64::from(1u32 << i)).collect();
        let request_prompt_tokens = hist(
            &mut r,
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed",
            &token_buckets,
        );
        let request_generation_tokens = hist(
            &mut r,
            "vllm:request_generation_tokens",
            "Number of generation tokens processed",
            &token_buckets,
        );
        Self {
            registry: r,
            num_requests_running,
            num_requests_waiting,
            kv_cache_usage_perc,
            prompt_tokens,
            generation_tokens,
            prefix_cache_queries,
            prefix_cache_hits,
            num_preemptions,
            success_stop,
            success_length,
            success_abort,
            time_to_first_token,
            inter_token_latency,
            time_per_output_token,
            e2e_request_latency,
            request_queue_time,
            request_prefill_time,
            request_decode_time,
            request_prompt_tokens,
            request_generation_tokens,
            cache_config,
        }
    }

    /// Publishes `vllm:cache_config_info` (once the engine knows its block count).
    pub fn set_cache_config(&self, info: &CacheConfigInfo) {
        self.cache_config
            .get_or_create(&CacheConfigLabels {
                block_size: info.block_size.to_string(),
                num_gpu_blocks: info.num_gpu_blocks.to_string(),
                num_cpu_blocks: "0".into(),
                enable_prefix_caching: if info.enable_prefix_caching {
                    "True"
                } else {
                    "False"
                }
                .into(),
                gpu_memory_utilization: info.gpu_memory_utilization.to_string(),
                cache_dtype: "auto".into(),
            })
            .set(1);
    }

    /// Counts a finished request (called by the API, which knows the reason the client saw).
    pub fn request_finished(&self, reason: FinishReason) {
        match reason {
            FinishReason::Stop => self.success_stop.inc(),
            FinishReason::Length => self.success_length.inc(),
            FinishReason::Abort => self.success_abort.inc(),
        };
    }

    /// The Prometheus text exposition (format 0.0.4, as vLLM serves it).
    ///
    /// prometheus-client writes OpenMetrics, where a counter family `foo` has samples
    /// `foo_total` and the page ends in `# EOF`. vLLM (Python prometheus_client, text format)
    /// declares `# HELP/TYPE foo_total`, and promtool's text linter wants HELP on the sample
    /// name, so counter descriptors are renamed and `# EOF` is dropped.
    pub fn encode(&self) -> String {
        crate::promencode::encode(&self.registry)
    }
}
