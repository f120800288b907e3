//! The tokenizer and chat template embedded in a GGUF file (`tokenizer.ggml.*`,
//! `tokenizer.chat_template`), rebuilt as the Hugging Face `tokenizer.json` the checkpoint was
//! converted from, so encoding and decoding go through the same `tokenizers` code as a model
//! directory. Supported: byte-level BPE (`tokenizer.ggml.model = gpt2`) with Qwen2's
//! pre-tokenizer (`tokenizer.ggml.pre = qwen2`).

use serde_json::{json, Map, Value as Json};

use super::{GgufError, GgufFile, Value};

/// Qwen2's pre-tokenizer split (its `tokenizer.json`; llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types (`llama_token_type`).
const TYPE_CONTROL: u64 = 3;
const TYPE_USER_DEFINED: u64 = 4;

/// What the codec needs from the file.
#[derive(Debug)]
pub struct GgufTokenizer {
    /// A `tokenizer.json` document for `tokenizers::Tokenizer::from_bytes`.
    pub tokenizer_json: Vec<u8>,
    pub vocab_size: usize,
    /// `tokenizer.chat_template`, when the file has one.
    pub chat_template: Option<String>,
    pub bos_token: String,
    pub eos_token: Option<String>,
    /// End-of-generation ids: `tokenizer.ggml.eos_token_id`, then Qwen's `<|im_end|>` and
    /// `<|endoftext|>` when the vocabulary has them (the instruct models end turns with the
    /// first and documents with the second).
    pub eos_ids: Vec<u32>,
}

fn meta(key: &str, reason: impl Into<String>) -> GgufError {
    GgufError::Metadata {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// Reads the tokenizer metadata of `f`.
pub fn read(f: &GgufFile) -> Result<GgufTokenizer, GgufError> {
    let model = f.str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(meta(
            "tokenizer.ggml.model",
            format!("\"{model}\" is not supported (supported: gpt2, byte-level BPE)"),
        ));
    }
    let pre = f.str("tokenizer.ggml.pre")?;
    let split = match pre {
        "qwen2" => QWEN2_SPLIT,
        other => {
            return Err(meta(
                "tokenizer.ggml.pre",
                format!("\"{other}\" is not supported (supported: qwen2)"),
            ))
        }
    };
    let tokens: Vec<&str> = f
        .array("tokenizer.ggml.tokens")?
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.as_str()),
            other => Err(meta(
                "tokenizer.ggml.tokens",
                format!("element {i} is a {}, not a string", other.type_name()),
            )),
        })
        .collect::<Result<_, _>>()?;
    if tokens.is_empty() {
        return Err(meta("tokenizer.ggml.tokens", "empty vocabulary"));
    }
    let types: Vec<u64> = match f.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(_) => f
            .array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| v.as_u64().unwrap_or(1))
            .collect(),
    };
    if types.len() != tokens.len() {
        return Err(meta(
            "tokenizer.ggml.token_type",
            format!("{} types for {} tokens", types.len(), tokens.len()),
        ));
    }
    let mut merges = Vec::new();
    for (i, v) in f.array("tokenizer.ggml.merges")?.iter().enumerate() {
        let pair = match v {
            Value::String(s) => s.split_once(' '),
            _ => None,
        };
        let Some((a, b)) = pair else {
            return Err(meta(
                "tokenizer.ggml.merges",
                format!("element {i} is not a \"left right\" pair"),
            ));
        };
        merges.push(json!([a, b]));
    }

    let mut vocab = Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        if vocab.insert((*tok).to_string(), json!(id)).is_some() {
            return Err(meta(
                "tokenizer.ggml.tokens",
                format!("token {tok:?} appears twice"),
            ));
        }
        // Control tokens (<|im_start|>) and user-defined ones (<tool_call>) are matched whole in
        // the input text, as `added_tokens` in tokenizer.json; only control tokens are special
        // (skipped when decoding with skip_special_tokens).
        if *ty == TYPE_CONTROL || *ty == TYPE_USER_DEFINED {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": *ty == TYPE_CONTROL,
            }));
        }
    }
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false
    });
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": false},
            byte_level.clone(),
        ]},
        "post_processor": byte_level.clone(),
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": Json::Object(vocab), "merges": merges,
        },
    });

    let token_of = |key: &str| -> Result<Option<String>, GgufError> {
        match f.opt_usize(key)? {
            None => Ok(None),
            Some(id) => tokens
                .get(id)
                .map(|t| Some((*t).to_string()))
                .ok_or_else(|| {
                    meta(
                        key,
                        format!("id {id} is outside the {} tokens", tokens.len()),
                    )
                }),
        }
    };
    let eos_token = token_of("tokenizer.ggml.eos_token_id")?;
    // Qwen's HF config has no BOS (and `add_bos_token` false); templates get "" then.
    let bos_token = if f.opt_bool("tokenizer.ggml.add_bos_token")? == Some(true) {
        token_of("tokenizer.ggml.bos_token_id")?.unwrap_or_default()
    } else {
        String::new()
    };
    let mut eos_ids: Vec<u32> = Vec::new();
    if let Some(id) = f.opt_usize("tokenizer.ggml.eos_token_id")? {
        eos_ids.push(id as u32);
    }
    for t in ["<|im_end|>", "<|endoftext|>"] {
        if let Some(id) = tokens.iter().position(|x| *x == t) {
            if !eos_ids.contains(&(id as u32)) {
                eos_ids.push(id as u32);
            }
        }
    }
    let chat_template = match f.get("tokenizer.chat_template") {
        None => None,
        Some(_) => Some(f.str("tokenizer.chat_template")?.to_string()),
    };
    Ok(GgufTokenizer {
        tokenizer_json: serde_json::to_vec(&doc)
            .map_err(|e| meta("tokenizer.ggml.tokens", e.to_string()))?,
        vocab_size: tokens.len(),
        chat_template,
        bos_token,
        eos_token,
        eos_ids,
    })
}
