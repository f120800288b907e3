//! Fuzzes the decode server's model-directory loaders (`serve::model`), which read operator-given
//! files at startup: the first input byte picks the file the rest of the input becomes.
//!
//! - 0: `config.json` → `ModelConfig::from_json` (accepted configs are self-consistent);
//! - 1: `model.safetensors` → `WeightStore::load` (header parsing, dtype conversion);
//! - 2: `tokenizer_config.json` beside a valid tokenizer → `HfCodec::load`, then a chat render,
//!   encode and decode with whatever template/EOS settings it accepted;
//! - 3: chat messages (JSON `[{role, content}]`) rendered with a Qwen-style template, encoded and
//!   decoded by the tiny byte-level BPE tokenizer;
//! - 4: `tokenizer.json` → `HfCodec::load`.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use switchyard::serve::codec::{ChatMessage, TextCodec};
use switchyard::serve::model::testing::tiny_tokenizer_json;
use switchyard::serve::model::weights::WeightStore;
use switchyard::serve::model::{HfCodec, ModelConfig};

const QWEN_TEMPLATE: &str =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] \
!= 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}\
{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A per-process scratch directory (libFuzzer may run several processes with -jobs).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-fuzz-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tokenizer_bytes() -> &'static [u8] {
    static TOK: OnceLock<Vec<u8>> = OnceLock::new();
    TOK.get_or_init(|| tiny_tokenizer_json().to_string().into_bytes())
}

fn qwen_codec() -> &'static HfCodec {
    static CODEC: OnceLock<HfCodec> = OnceLock::new();
    CODEC.get_or_init(|| {
        let dir = scratch("qwen");
        std::fs::write(dir.join("tokenizer.json"), tokenizer_bytes()).unwrap();
        let tc = json!({"chat_template": QWEN_TEMPLATE, "eos_token": "<|im_end|>"});
        std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
        HfCodec::load(&dir).unwrap()
    })
}

/// Render → encode → decode with a loaded codec; none may panic, ids stay in the vocabulary.
fn exercise(codec: &HfCodec, messages: &[ChatMessage]) {
    let vocab = codec.tokenizer().get_vocab_size(true) as u32;
    if let Ok(text) = codec.render_chat(messages) {
        if let Ok(ids) = codec.encode(&text, false) {
            assert!(ids.iter().all(|&id| id < vocab), "id out of vocabulary");
            let _ = codec.decode(&ids, false);
            let _ = codec.decode(&ids, true);
        }
    }
    // Completions encode the raw prompt with special tokens (the post-processor runs).
    if let Ok(ids) = codec.encode("Hello world", true) {
        assert!(ids.iter().all(|&id| id < vocab), "id out of vocabulary");
    }
    assert!(codec.eos_token_ids().iter().all(|&id| id < vocab));
}

fn config_json(body: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    if let Ok(cfg) = ModelConfig::from_json(&v) {
        assert!(cfg.hidden_size > 0 && cfg.num_attention_heads > 0);
        assert_eq!(cfg.head_dim() * cfg.num_attention_heads, cfg.hidden_size);
        assert!(cfg.group_size() >= 1);
        assert_eq!(
            cfg.group_size() * cfg.num_key_value_heads,
            cfg.num_attention_heads
        );
    }
}

fn safetensors(body: &[u8]) {
    let dir = scratch("st");
    std::fs::write(dir.join("model.safetensors"), body).unwrap();
    if let Ok(store) = WeightStore::load(&dir) {
        // Every tensor's f32 data cannot exceed what the file could hold (2 bytes/element min).
        assert!(store.len() <= body.len());
    }
}

fn tokenizer_config(body: &[u8]) {
    let dir = scratch("tc");
    std::fs::write(dir.join("tokenizer.json"), tokenizer_bytes()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), body).unwrap();
    if let Ok(codec) = HfCodec::load(&dir) {
        let messages = [
            ChatMessage::text("system", "Be brief."),
            ChatMessage::text("user", "Hello <|im_end|> wörld"),
        ];
        exercise(&codec, &messages);
    }
}

fn chat_messages(body: &[u8]) {
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let messages: Vec<ChatMessage> = items
        .iter()
        .map(|m| {
            ChatMessage::text(
                m["role"].as_str().unwrap_or("user"),
                m["content"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    exercise(qwen_codec(), &messages);
}

fn tokenizer_json(body: &[u8]) {
    let dir = scratch("tj");
    std::fs::write(dir.join("tokenizer.json"), body).unwrap();
    if let Ok(codec) = HfCodec::load(&dir) {
        let messages = [ChatMessage::text("user", "hi")];
        exercise(&codec, &messages);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    match mode % 5 {
        0 => config_json(body),
        1 => safetensors(body),
        2 => tokenizer_config(body),
        3 => chat_messages(body),
        _ => tokenizer_json(body),
    }
});
