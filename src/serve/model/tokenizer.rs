//! The Hugging Face tokenizer of a model directory as a [`TextCodec`]: `tokenizer.json` through
//! the `tokenizers` crate (offline), chat template and EOS ids from the JSON configs beside it.

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use super::chat::ChatTemplate;
use super::{read_json_opt, ModelError};
use crate::serve::codec::{ChatExtras, ChatMessage, CodecError, TextCodec};

/// Qwen's end-of-turn and end-of-text tokens: the EOS fallback when no config names one.
const FALLBACK_EOS: [&str; 2] = ["<|im_end|>", "<|endoftext|>"];

pub struct HfCodec {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    eos: Vec<u32>,
    max_token_bytes: usize,
}

impl std::fmt::Debug for HfCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfCodec")
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("template", &self.template)
            .field("eos", &self.eos)
            .finish()
    }
}

impl HfCodec {
    /// Loads `dir/tokenizer.json`, plus `tokenizer_config.json`, `chat_template.jinja` and
    /// `generation_config.json` when present.
    pub fn load(dir: &Path) -> Result<HfCodec, ModelError> {
        let tok_path = dir.join("tokenizer.json");
        let bytes = super::read_file(&tok_path)?;
        let tokenizer = parse_tokenizer(&bytes, &tok_path)?;

        let tc_path = dir.join("tokenizer_config.json");
        let tc = read_json_opt(&tc_path)?.unwrap_or(Value::Null);
        let gc = read_json_opt(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);

        let bos_token = token_string(tc.get("bos_token")).unwrap_or_default();
        let eos_token = token_string(tc.get("eos_token"));
        // Newer `transformers` save the template as its own file, which then takes precedence.
        let jinja_path = dir.join("chat_template.jinja");
        let jinja_file = if jinja_path.is_file() {
            let bytes = super::read_file(&jinja_path)?;
            Some(String::from_utf8(bytes).map_err(|e| ModelError::Template {
                path: jinja_path.clone(),
                reason: e.to_string(),
            })?)
        } else {
            None
        };
        let source = match &jinja_file {
            Some(src) => Some((src.as_str(), jinja_path.as_path())),
            None => chat_template_source(&tc).map(|src| (src, tc_path.as_path())),
        };
        let template = match source {
            Some((src, origin)) => {
                ChatTemplate::compile(src, &bos_token, eos_token.as_deref().unwrap_or(""), origin)?
            }
            None => {
                tracing::info!(dir = %dir.display(), "no chat template in the model directory; using ChatML");
                ChatTemplate::chatml()
            }
        };

        let eos = eos_ids(&tokenizer, &gc, eos_token.as_deref());
        tracing::info!(
            dir = %dir.display(),
            vocab = tokenizer.get_vocab_size(true),
            eos = ?eos,
            "tokenizer loaded"
        );
        Ok(HfCodec::from_parts(tokenizer, template, eos))
    }

    /// The tokenizer, chat template and EOS ids embedded in a GGUF file (`path` names it in
    /// errors).
    pub fn from_gguf(
        path: &Path,
        t: super::gguf::tokenizer::GgufTokenizer,
    ) -> Result<HfCodec, ModelError> {
        let tokenizer = parse_tokenizer(&t.tokenizer_json, path)?;
        let template = match &t.chat_template {
            Some(src) => ChatTemplate::compile(
                src,
                &t.bos_token,
                t.eos_token.as_deref().unwrap_or(""),
                path,
            )?,
            None => {
                tracing::info!(path = %path.display(), "no chat template in the GGUF file; using ChatML");
                ChatTemplate::chatml()
            }
        };
        tracing::info!(
            path = %path.display(),
            vocab = tokenizer.get_vocab_size(true),
            eos = ?t.eos_ids,
            "tokenizer loaded from GGUF"
        );
        Ok(HfCodec::from_parts(tokenizer, template, t.eos_ids))
    }

    fn from_parts(tokenizer: Tokenizer, template: ChatTemplate, eos: Vec<u32>) -> HfCodec {
        // Byte-level vocabularies spell each byte as one char of up to 2 UTF-8 bytes, so the
        // UTF-8 length over-counts: a safe bound on the text one token consumes.
        let max_token_bytes = tokenizer
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(0)
            .max(1);
        HfCodec {
            tokenizer,
            template,
            eos,
            max_token_bytes,
        }
    }

    /// Id of a token string (e.g. `<|im_start|>`), special tokens included.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The underlying tokenizer (for incremental detokenization).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

impl TextCodec for HfCodec {
    fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, CodecError> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, CodecError> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| CodecError::Decode(e.to_string()))
    }

    fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, CodecError> {
        self.template.render(messages)
    }

    fn render_chat_with(
        &self,
        messages: &[ChatMessage],
        extras: &ChatExtras<'_>,
    ) -> Result<String, CodecError> {
        self.template.render_with(messages, extras)
    }

    fn supports_tools(&self) -> bool {
        self.template.supports_tools()
    }

    fn tokenizer_json(&self) -> Option<Value> {
        serde_json::to_value(&self.tokenizer).ok()
    }
}

/// Parses a `tokenizer.json` document (`path` names it in errors), containing the ways the
/// `tokenizers` crate fails on malformed input by panicking.
fn parse_tokenizer(bytes: &[u8], path: &Path) -> Result<Tokenizer, ModelError> {
    let bad = |reason: String| ModelError::Tokenizer {
        path: path.to_path_buf(),
        reason,
    };
    // tokenizers panics (instead of erring) on some malformed files, e.g. a truncated
    // `"decoder":[`; plain JSON validation first turns those into an error.
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| bad(e.to_string()))?;
    // ... and others (e.g. `"decoder":1e400`) only inside the tokenizers crate: contain them.
    let tokenizer = std::panic::catch_unwind(|| Tokenizer::from_bytes(bytes))
        .map_err(|_| bad("tokenizers panicked while parsing the file".to_string()))?
        .map_err(|e| bad(e.to_string()))?;
    // A TemplateProcessing that names a special token it does not define loads fine and then
    // panics on every encode (huggingface/tokenizers#2152): probe once here.
    let probe = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tokenizer.encode("probe", true).map(|_| ())
    }));
    match probe {
        Ok(Ok(())) => Ok(tokenizer),
        Ok(Err(e)) => Err(bad(format!("encoding a test string failed: {e}"))),
        Err(_) => Err(bad(
            "encoding a test string panicked (post-processor template names an undefined special token?)"
                .to_string(),
        )),
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which `default` is used.
fn chat_template_source(tc: &Value) -> Option<&str> {
    match tc.get("chat_template")? {
        Value::String(s) => Some(s),
        Value::Array(list) => {
            let named = |want: &str| {
                list.iter().find_map(|t| {
                    (t.get("name")?.as_str()? == want).then(|| t.get("template")?.as_str())?
                })
            };
            named("default").or_else(|| list.first()?.get("template")?.as_str())
        }
        _ => None,
    }
}

/// A special-token entry: `"<s>"` or `{"content": "<s>", ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// EOS ids: `generation_config.json` `eos_token_id` (int or list) plus the tokenizer config's
/// `eos_token`, in that order without duplicates; Qwen's `<|im_end|>`/`<|endoftext|>` when
/// neither names one.
fn eos_ids(tok: &Tokenizer, gc: &Value, eos_token: Option<&str>) -> Vec<u32> {
    let mut ids: Vec<u32> = Vec::new();
    let push = |ids: &mut Vec<u32>, id: u32| {
        if !ids.contains(&id) {
            ids.push(id);
        }
    };
    match gc.get("eos_token_id") {
        Some(Value::Number(n)) => {
            if let Some(id) = n.as_u64().and_then(|x| u32::try_from(x).ok()) {
                push(&mut ids, id);
            }
        }
        Some(Value::Array(list)) => {
            for id in list
                .iter()
                .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            {
                push(&mut ids, id);
            }
        }
        _ => {}
    }
    if let Some(id) = eos_token.and_then(|t| tok.token_to_id(t)) {
        push(&mut ids, id);
    }
    if ids.is_empty() {
        for id in FALLBACK_EOS.iter().filter_map(|t| tok.token_to_id(t)) {
            push(&mut ids, id);
        }
    }
    ids
}

#[cfg(test)]
mod malformed_tests {
    //! Regression inputs found by `fuzz/fuzz_targets/model_config.rs` (files in
    //! `fuzz/regressions/model_config/`; their first byte selects the fuzz mode).
    use super::*;

    fn load_tokenizer_json(bytes: &[u8]) -> Result<HfCodec, ModelError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), bytes).unwrap();
        HfCodec::load(dir.path())
    }

    fn regression(name: &str) -> Vec<u8> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fuzz/regressions/model_config/"
        );
        std::fs::read(format!("{path}{name}")).unwrap()[1..].to_vec()
    }

    #[test]
    fn truncated_or_out_of_range_json_is_an_error_not_a_panic() {
        for input in [&br#"{"decoder":["#[..], br#"{"decoder":1e400}"#] {
            let Err(err) = load_tokenizer_json(input) else {
                panic!("must fail")
            };
            assert!(matches!(err, ModelError::Tokenizer { .. }), "{err}");
        }
        let err = load_tokenizer_json(&regression("tokenizer_decoder_truncated.bin")).err();
        assert!(matches!(err, Some(ModelError::Tokenizer { .. })));
    }

    #[test]
    fn template_naming_an_undefined_special_token_is_rejected_at_load() {
        let Err(err) = load_tokenizer_json(&regression("tokenizer_template_missing_special.bin"))
        else {
            panic!("must fail at load, not on the first request")
        };
        assert!(
            err.to_string().contains("encoding a test string panicked"),
            "{err}"
        );
    }
}
