//! `switchyard serve --backend cuda` end to end on a GPU: a tiny random Qwen2 model answers the
//! same greedy completion with the same text as `--backend cpu`, and `/metrics` reports the KV
//! block count the backend measured. Prints `SKIPPED: <why>` without a GPU.

mod support;

use serde_json::{json, Value};
use support::HttpClient;
use switchyard::serve::backend::cuda;
use switchyard::serve::model::testing::{write_tiny_qwen2_with, TinyDtype, TinyQwen2};
use switchyard::serve::{self, BackendKind, ServeArgs};

async fn complete(base: &str, prompt: &str) -> Value {
    let body = json!({
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": 24,
        "temperature": 0,
        "ignore_eos": true
    });
    let r = HttpClient::new()
        .post_json(&format!("{base}/v1/completions"), &[], body.to_string())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_completion_matches_cpu_over_http() {
    if let Err(why) = cuda::gpu_available() {
        println!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = TinyQwen2 {
        hidden: 256,
        heads: 4,
        kv_heads: 2,
        intermediate: 256,
        dtype: TinyDtype::BF16,
        ..TinyQwen2::default()
    };
    write_tiny_qwen2_with(dir.path(), &spec).unwrap();
    let mut texts = Vec::new();
    for kind in [BackendKind::Cpu, BackendKind::Cuda] {
        let mut args = ServeArgs::sim_for_tests("l4-qwen2.5-7b", 0.0);
        args.backend = kind;
        args.model = Some(dir.path().to_path_buf());
        args.served_model_name = vec!["tiny".into()];
        args.gpu_memory_utilization = 0.5;
        let h = serve::start(args).await.unwrap();
        let base = format!("http://{}", h.http_addr);
        let v = complete(&base, "Hello the world, hello again").await;
        texts.push(v["choices"][0]["text"].as_str().unwrap().to_owned());
        let metrics = HttpClient::new()
            .get(&format!("{base}/metrics"))
            .await
            .unwrap()
            .text();
        assert!(
            metrics.contains("vllm:cache_config_info{"),
            "no cache_config_info"
        );
        h.shutdown(std::time::Duration::from_secs(5)).await;
    }
    assert_eq!(texts[0], texts[1], "cpu vs cuda greedy text");
    assert!(!texts[0].is_empty());
}
