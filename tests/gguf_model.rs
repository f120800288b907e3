//! GGUF models on the CPU backend.
//!
//! Always: a tiny random Qwen2 written as GGUF (Q8_0 / Q5_0 blocks) loads with its embedded
//! tokenizer and template and computes the same logits as the f32 checkpoint it was quantized
//! from (within the quantization error); truncated, corrupted and unsupported-quant files are
//! load errors with exact texts.
//!
//! With the real model (`scripts/fetch-model.sh`: Qwen2.5-Coder-0.5B-Instruct, Q4_K/Q5_0/Q6_K/
//! Q8_0/F32): metadata, tokenizer ids, and greedy tokens equal to llama.cpp's for the first 32
//! tokens of a fixed prompt set (`tests/fixtures/gguf_llama_greedy.json`, recorded with
//! `scripts/gguf-oracle.sh` from llama.cpp built by `scripts/llama-venv.sh`; release builds only,
//! see the test). Without the model these print `SKIPPED` (and fail under `CI=true`).

mod serve_support;
mod support;

use std::path::Path;

use serde_json::{json, Value};
use switchyard::serve::backend::cpu::greedy::greedy;
use switchyard::serve::backend::cpu::{CpuBackend, CpuOptions};
use switchyard::serve::backend::{Backend, SeqSlice, StepBatch, StepOutput};
use switchyard::serve::codec::{ChatMessage, TextCodec};
use switchyard::serve::model::gguf::GgmlType;
use switchyard::serve::model::testing::{
    tiny_qwen2_gguf, tiny_qwen2_in_memory, tiny_special_id, TinyQwen2,
};
use switchyard::serve::model::{load_gguf, GgufModel};

fn opts() -> CpuOptions {
    CpuOptions {
        block_size: 16,
        kv_cache_memory_bytes: 64 << 20,
        threads: 2,
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Logits of the last token of `ids` (one prefill step).
fn last_logits(be: &mut CpuBackend, ids: &[u32]) -> Vec<f32> {
    be.init_kv(8).unwrap();
    let mut b = StepBatch::default();
    for (i, &id) in ids.iter().enumerate() {
        b.token_ids.push(id);
        b.positions.push(i as u32);
        b.slot_mapping.push(i as u32);
    }
    b.seqs.push(SeqSlice {
        query_start: 0,
        query_len: ids.len(),
        context_len: 0,
    });
    b.block_tables.push((0..8).collect());
    b.logits_rows.push(ids.len() - 1);
    let mut out = StepOutput::default();
    be.execute(&b, &mut out).unwrap();
    out.row(0).unwrap().to_vec()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

#[test]
fn tiny_gguf_computes_the_logits_of_its_f32_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinyQwen2 {
        seed: 3,
        ..TinyQwen2::default()
    };
    let (cfg, weights) = tiny_qwen2_in_memory(&spec).unwrap();
    let mut f32_be = CpuBackend::new(cfg, weights, opts()).unwrap();
    let ids = [269, 117, 115, 261, 10, 72, 105, 270, 10, 269, 97, 115, 115];
    let want = last_logits(&mut f32_be, &ids);
    // 8-bit weights and activations: ~2% error on this random model; 5-bit weights: a few %.
    for (ty, tol) in [(GgmlType::Q8_0, 0.03), (GgmlType::Q5_0, 0.1)] {
        let path = write(
            dir.path(),
            "tiny.gguf",
            &tiny_qwen2_gguf(&spec, ty).unwrap(),
        );
        let m = load_gguf(&path).unwrap();
        assert_eq!(m.config.num_hidden_layers, 2);
        assert_eq!(m.config.vocab_size, 300);
        assert!(!m.config.tie_word_embeddings);
        let mut be = CpuBackend::new(m.config, m.weights, opts()).unwrap();
        let got = last_logits(&mut be, &ids);
        let err = rel_l2(&got, &want);
        assert!(err < tol, "{ty:?}: relative L2 error {err}");
        assert!(err > 0.0, "{ty:?}: quantized logits cannot be exact");
    }
}

#[test]
fn tiny_gguf_tokenizer_and_template_come_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "tiny.gguf",
        &tiny_qwen2_gguf(&TinyQwen2::default(), GgmlType::Q8_0).unwrap(),
    );
    let GgufModel { codec, .. } = load_gguf(&path).unwrap();
    // The same ids as the tiny tokenizer.json (tests/serve_cpu_tokenizer.rs).
    assert_eq!(
        codec.encode("Hello the world", false).unwrap(),
        vec![267, 260, 263, 111, 114, 108, 100]
    );
    let ids = codec
        .encode("<|im_start|>user\nHi<|im_end|>", true)
        .unwrap();
    assert_eq!(ids, vec![269, 117, 115, 261, 10, 72, 105, 270]);
    assert_eq!(codec.decode(&ids, true).unwrap(), "user\nHi");
    // tokenizer.ggml.eos_token_id (<|im_end|>), then <|endoftext|>.
    assert_eq!(
        codec.eos_token_ids(),
        &[
            tiny_special_id("<|im_end|>"),
            tiny_special_id("<|endoftext|>")
        ]
    );
    let prompt = codec
        .render_chat(&[ChatMessage::text("user", "Hi")])
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// Byte offset of the type field of tensor `name` in a GGUF header.
fn type_field(bytes: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend(name.as_bytes());
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .unwrap();
    let n_dims = u32::from_le_bytes(
        bytes[at + key.len()..at + key.len() + 4]
            .try_into()
            .unwrap(),
    );
    at + key.len() + 4 + 8 * n_dims as usize
}

#[test]
fn bad_files_are_clear_load_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = tiny_qwen2_gguf(&TinyQwen2::default(), GgmlType::Q8_0).unwrap();
    let err = |name: &str, bytes: &[u8]| {
        let p = write(dir.path(), name, bytes);
        let e = load_gguf(&p).err().expect("must fail").to_string();
        e.strip_prefix(&format!("{}: ", p.display()))
            .unwrap_or_else(|| panic!("error does not name the file: {e}"))
            .to_string()
    };

    let len = good.len();
    assert_eq!(
        err("truncated.gguf", &good[..len - 10]),
        format!(
            "file is truncated: tensor \"output.weight\" ends at byte {len} but the file has {} bytes",
            len - 10
        )
    );
    assert_eq!(
        err("header-cut.gguf", &good[..100]),
        "corrupt header at byte 24: 18 metadata entries cannot fit in the 76 bytes left (truncated or corrupt file)"
    );

    let mut q4 = good.clone();
    let at = type_field(&q4, "blk.0.attn_q.weight");
    q4[at..at + 4].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(
        err("q4_0.gguf", &q4),
        "tensor \"blk.0.attn_q.weight\" has type Q4_0 (ggml type 2), which is not supported (supported: F32, Q4_K, Q5_0, Q6_K, Q8_0)"
    );

    let mut corrupt = good.clone();
    corrupt[0] = b'X';
    assert_eq!(
        err("corrupt.gguf", &corrupt),
        "not a GGUF file (first bytes 58 47 55 46)"
    );
    let mut shape = good.clone();
    let at = type_field(&shape, "blk.1.ffn_up.weight");
    // The second dimension (out features 128) becomes 96.
    shape[at - 8..at].copy_from_slice(&96u64.to_le_bytes());
    assert_eq!(
        err("shape.gguf", &shape),
        "tensor \"blk.1.ffn_up.weight\": dimensions [64, 96], expected [64, 128]"
    );

    let mut arch = good.clone();
    let at = arch.windows(5).position(|w| w == b"qwen2").unwrap();
    arch[at..at + 5].copy_from_slice(b"llama");
    assert_eq!(
        err("arch.gguf", &arch),
        "metadata \"general.architecture\": \"llama\" is not supported (supported: qwen2)"
    );
}

// ---- the real model ------------------------------------------------------------------------

fn fixture(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The fixed prompt set (`tests/fixtures/gguf_prompts.json`) rendered with the model's own chat
/// template (or taken as raw text) and tokenized by our codec.
fn prompts(codec: &dyn TextCodec) -> Vec<(String, Vec<u32>)> {
    let spec = fixture("gguf_prompts.json");
    spec["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let text = match c.get("messages") {
                Some(m) => {
                    let msgs: Vec<ChatMessage> = serde_json::from_value(m.clone()).unwrap();
                    codec.render_chat(&msgs).unwrap()
                }
                None => c["text"].as_str().unwrap().to_string(),
            };
            let ids = codec.encode(&text, false).unwrap();
            (text, ids)
        })
        .collect()
}

fn real_model() -> Option<std::path::PathBuf> {
    let p = support::tools::real_gguf();
    if p.is_none() {
        support::tools::missing_dependency("the real GGUF model (run scripts/fetch-model.sh)");
    }
    p
}

#[test]
fn real_model_metadata_and_tokenizer() {
    let Some(path) = real_model() else { return };
    let m = load_gguf(&path).unwrap();
    let c = &m.config;
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.intermediate_size),
        (24, 896, 4864)
    );
    assert_eq!((c.num_attention_heads, c.num_key_value_heads), (14, 2));
    assert_eq!((c.rope_theta, c.vocab_size), (1e6, 151936));
    assert!(!c.tie_word_embeddings);
    assert_eq!(
        m.codec.encode("Hello, world!", false).unwrap(),
        vec![9707, 11, 1879, 0]
    );
    assert_eq!(m.codec.encode("<|im_start|>", false).unwrap(), vec![151644]);
    assert_eq!(m.codec.eos_token_ids(), &[151645, 151643]);
    let prompt = m
        .codec
        .render_chat(&[ChatMessage::text("user", "Hi")])
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// A near tie: where our greedy choice differs from llama.cpp's, the two top logits must be
/// this close in our forward pass (f32 KV cache, queries and attention weights here, f16 in
/// llama.cpp; that moves logits by up to a few tenths). Measured: the five chat prompts agree on
/// all 32 tokens; "def fibonacci(n):\n" differs at token 9 (` "` here, ` []` in llama.cpp) with
/// our margin 0.18.
const NEAR_TIE: f32 = 0.25;

#[test]
fn real_model_greedy_tokens_match_llama_cpp() {
    // 6 prompts × 32 tokens of a 0.5B model take seconds optimised and many minutes in a debug
    // build; scripts/test.sh runs this file again with --release.
    if cfg!(debug_assertions) {
        println!("SKIPPED: needs an optimised build (cargo test --release --test gguf_model)");
        return;
    }
    let Some(path) = real_model() else { return };
    let fixture = fixture("gguf_llama_greedy.json");
    let m = load_gguf(&path).unwrap();
    let cases = prompts(m.codec.as_ref());
    let eos = m.codec.eos_token_ids().to_vec();
    let mut be = CpuBackend::new(m.config, m.weights, opts()).unwrap();
    be.init_kv(16).unwrap();
    let want = fixture["cases"].as_array().unwrap();
    assert_eq!(want.len(), cases.len());
    for ((text, ids), w) in cases.iter().zip(want) {
        // Our template and tokenizer give llama.cpp's prompt (jinja2-rendered, llama.cpp-tokenized).
        assert_eq!(text, w["text"].as_str().unwrap());
        let want_ids: Vec<u32> = serde_json::from_value(w["ids"].clone()).unwrap();
        assert_eq!(ids, &want_ids, "tokenization of {text:?}");
        let want_tokens: Vec<u32> = serde_json::from_value(w["tokens"].clone()).unwrap();
        let run = greedy(&mut be, ids, 32, &eos).unwrap();
        match run
            .tokens
            .iter()
            .zip(&want_tokens)
            .position(|(a, b)| a != b)
        {
            None => assert_eq!(run.tokens.len(), want_tokens.len(), "{text:?}"),
            Some(i) => {
                assert!(
                    run.margins[i] < NEAR_TIE,
                    "{text:?}: token {i} is {} here, {} in llama.cpp, with a margin of {} (not a near tie)\nours:  {:?}\ntheirs: {want_tokens:?}",
                    run.tokens[i],
                    want_tokens[i],
                    run.margins[i],
                    run.tokens
                );
                println!(
                    "near tie in {text:?} at token {i}: {} vs llama.cpp {} (margin {})",
                    run.tokens[i], want_tokens[i], run.margins[i]
                );
            }
        }
    }
}

/// `switchyard demo --model real` (the README's main job on the real model): two `cpu`
/// replicas of the GGUF behind real Envoy and the EPP; every question asked twice. A repeat
/// goes to the replica that served the first ask (prefix affinity), finds all of its prompt's
/// full blocks but the last token's there, and answers the same text (greedy).
#[test]
fn real_model_demo_routes_each_repeat_to_the_replica_holding_its_prompt() {
    if cfg!(debug_assertions) {
        println!("SKIPPED: needs an optimised build (cargo test --release --test gguf_model)");
        return;
    }
    let Some(path) = real_model() else { return };
    let Some(envoy) = support::tools::envoy() else {
        support::tools::missing_dependency("Envoy (scripts/install-test-deps.sh)");
        return;
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "demo",
            "--model",
            "real",
            "--replicas",
            "2",
            "--output-tokens",
            "12",
        ])
        .arg("--model-file")
        .arg(&path)
        .arg("--envoy")
        .arg(&envoy)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // | request | question | replica | prompt | cached | completion | seconds | answer |
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| request"))
        .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
        .collect();
    assert_eq!(rows.len(), 6, "{stdout}");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r[0], (i + 1).to_string());
        assert_eq!(r[1], format!("Q{}", i % 3 + 1), "{stdout}");
        assert_eq!(r[5], "12", "completion tokens: {stdout}");
    }
    for first in 0..3 {
        let (a, b) = (&rows[first], &rows[first + 3]);
        assert_eq!(
            b[2],
            a[2],
            "repeat of Q{} on another replica:\n{stdout}",
            first + 1
        );
        assert_eq!(b[3], a[3], "{stdout}");
        let prompt: usize = b[3].parse().unwrap();
        assert_eq!(
            b[4],
            ((prompt - 1) / 16 * 16).to_string(),
            "cached tokens of the repeat:\n{stdout}"
        );
        assert_eq!(b[7], format!("same as request {}", first + 1), "{stdout}");
    }
    // Real text, not an empty or placeholder answer.
    assert!(stdout.contains("### Q1: Write a Rust function"), "{stdout}");
}

/// The subjects of the real-model structured-output and tool tests: 20 of each.
const CITIES: [&str; 20] = [
    "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Lisbon", "Dublin", "Oslo",
    "Helsinki", "Athens", "Zurich", "Munich", "Milan", "Seoul", "Tokyo", "Lima", "Cairo",
    "Nairobi",
];

async fn real_server(path: &Path) -> (switchyard::serve::ServerHandle, String) {
    let path = path.to_owned();
    serve_support::start(move |a| {
        a.backend = switchyard::serve::BackendKind::Cpu;
        a.model = Some(path);
        a.kv_cache_memory = 256 << 20;
        a.max_model_len = Some(2048);
    })
    .await
}

/// POSTs every body concurrently (the engine batches them); returns the JSON answers in order.
async fn post_all(base: &str, path: &str, bodies: Vec<Value>) -> Vec<Value> {
    let answers = futures::future::join_all(bodies.into_iter().map(|b| async move {
        // 20 constrained answers share two cores: minutes, not the default 20 s.
        support::HttpClient::with_timeout(std::time::Duration::from_secs(600))
            .post_json(&format!("{base}{path}"), &[], b.to_string())
            .await
            .unwrap()
    }))
    .await;
    answers
        .iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{}", r.text());
            serde_json::from_slice(&r.body).unwrap()
        })
        .collect()
}

/// With the real model, JSON-schema outputs (response_format on chat, structured_outputs on
/// completions) and forced tool calls (tool_choice naming the function) parse and validate in
/// 20 of 20 prompts each; so do the calls the model makes by itself under `tool_choice: auto`
/// (Hermes `<tool_call>` parsing), which name the asked-for city.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_model_structured_outputs_and_tool_calls_are_valid_in_every_prompt() {
    if cfg!(debug_assertions) {
        println!("SKIPPED: needs an optimised build (cargo test --release --test gguf_model)");
        return;
    }
    let Some(path) = real_model() else { return };
    let (_h, base) = real_server(&path).await;
    let person = json!({"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16},
        "population_millions": {"type": "number", "minimum": 0, "maximum": 100},
        "capital": {"type": "boolean"}},
        "required": ["city", "population_millions", "capital"], "additionalProperties": false});
    let tags = json!({"type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "string", "enum": ["history", "food", "art", "sport", "nature"]}});
    let weather = json!({"type": "object", "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": false});
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Current weather in a city", "parameters": weather}}]);

    // Schema 1: response_format json_schema on chat.
    let bodies = CITIES
        .iter()
        .map(|c| json!({"messages": [{"role": "user", "content": format!("Describe {c} as JSON.")}],
            "max_tokens": 128, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": person}}}))
        .collect();
    for (c, v) in CITIES
        .iter()
        .zip(post_all(&base, "/v1/chat/completions", bodies).await)
    {
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default();
        let out: Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("{c}: {e}: {text:?}"));
        let o = out.as_object().unwrap_or_else(|| panic!("{c}: {text}"));
        assert_eq!(o.len(), 3, "{c}: {text}");
        assert!(
            out["city"]
                .as_str()
                .is_some_and(|s| s.chars().count() <= 16),
            "{c}: {text}"
        );
        assert!(
            out["population_millions"]
                .as_f64()
                .is_some_and(|p| (0.0..=100.0).contains(&p)),
            "{c}: {text}"
        );
        assert!(out["capital"].is_boolean(), "{c}: {text}");
    }

    // Schema 2: structured_outputs json on completions.
    let bodies = CITIES
        .iter()
        .map(|c| {
            json!({"prompt": format!("Topics a visitor to {c} enjoys, as a JSON list:"),
            "max_tokens": 96, "temperature": 0, "structured_outputs": {"json": tags}})
        })
        .collect();
    for (c, v) in CITIES
        .iter()
        .zip(post_all(&base, "/v1/completions", bodies).await)
    {
        let text = v["choices"][0]["text"].as_str().unwrap_or_default();
        let out: Value =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("{c}: {e}: {text:?}"));
        let items = out.as_array().unwrap_or_else(|| panic!("{c}: {text}"));
        assert!((1..=3).contains(&items.len()), "{c}: {text}");
        for t in items {
            assert!(
                ["history", "food", "art", "sport", "nature"].contains(&t.as_str().unwrap_or("")),
                "{c}: {text}"
            );
        }
    }

    // Schema 3: a forced tool call; then the same tool under `auto`.
    // A named choice finishes with "stop" (as vLLM); parsed calls under `auto` with "tool_calls".
    let mut other_names = Vec::new();
    for (choice, finish) in [
        (
            json!({"type": "function", "function": {"name": "get_weather"}}),
            "stop",
        ),
        (json!("auto"), "tool_calls"),
    ] {
        let bodies = CITIES
            .iter()
            .map(|c| json!({"messages": [{"role": "user", "content": format!("What is the weather in {c} in celsius?")}],
                "max_tokens": 64, "temperature": 0, "tools": tools, "tool_choice": choice}))
            .collect();
        for (c, v) in CITIES
            .iter()
            .zip(post_all(&base, "/v1/chat/completions", bodies).await)
        {
            let msg = &v["choices"][0]["message"];
            assert_eq!(
                v["choices"][0]["finish_reason"], finish,
                "{choice} {c}: {v}"
            );
            let call = &msg["tool_calls"][0]["function"];
            assert_eq!(call["name"], "get_weather", "{choice} {c}: {v}");
            let args = call["arguments"].as_str().unwrap_or_default();
            let out: Value =
                serde_json::from_str(args).unwrap_or_else(|e| panic!("{c}: {e}: {args:?}"));
            assert_eq!(
                out.as_object().map(|o| o.len()),
                Some(2),
                "{choice} {c}: {args}"
            );
            let city = out["city"].as_str().unwrap_or_default();
            assert!(
                (1..=12).contains(&city.len()) && city.bytes().all(|b| b.is_ascii_alphabetic()),
                "{choice} {c}: {args}"
            );
            if city != *c {
                other_names.push(format!("{c} -> {city}"));
            }
            assert!(
                ["celsius", "fahrenheit"].contains(&out["unit"].as_str().unwrap_or("")),
                "{choice} {c}: {args}"
            );
        }
    }
    // Validity is the mask's; naming the asked city is the model's. A 0.5B model may say
    // "Lisboa" for Lisbon: a few such, not many.
    println!("calls naming the city otherwise: {other_names:?}");
    assert!(other_names.len() <= 4, "{other_names:?}");
}
