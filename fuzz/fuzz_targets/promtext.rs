//! Fuzzes the Prometheus text parser and the engine metric extraction: neither may panic on any
//! input, and a successful vLLM extraction must report values the spec allows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::epp::endpoint::EngineType;
use switchyard::epp::scrape::extract_metrics;
use switchyard::promtext::{parse, Limits};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse(
        text,
        &["g", "c_total", "vllm:num_requests_waiting"],
        &Limits::default(),
    );
    for engine in [
        EngineType::Vllm,
        EngineType::Sglang,
        EngineType::TrtllmServe,
        EngineType::TritonTensorrtLlm,
    ] {
        if let Ok(m) = extract_metrics(engine, text) {
            assert!(m.kv_cache_usage.is_finite() && m.kv_cache_usage >= 0.0);
            assert!(m.updated_at.is_none());
        }
    }
});
