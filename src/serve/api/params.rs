//! "Never silent": every field of vLLM's completion and chat request types that `switchyard
//! serve` does not implement is listed here with the values that mean "off"; any other value is
//! a 400 naming the field. Fields it implements are decoded in `types` and validated where they
//! are used. Fields outside vLLM's types are ignored, as vLLM ignores them.
//!
//! The reference lists are vLLM's `ChatCompletionRequest` and `CompletionRequest`
//! (`vllm/entrypoints/openai/{chat_completion,completion}/protocol.py`); docs/openai-api.md has
//! the full table with the implemented fields.

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use super::error::ApiError;

/// A value that leaves an unimplemented feature off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Off {
    Null,
    Bool(bool),
    Num(f64),
    EmptyList,
    EmptyObject,
}

impl Off {
    fn matches(self, v: &Value) -> bool {
        match (self, v) {
            (Off::Null, Value::Null) => true,
            (Off::Bool(b), Value::Bool(x)) => b == *x,
            (Off::Num(n), Value::Number(x)) => x.as_f64() == Some(n),
            (Off::EmptyList, Value::Array(a)) => a.is_empty(),
            (Off::EmptyObject, Value::Object(o)) => o.is_empty(),
            _ => false,
        }
    }

    fn describe(self) -> String {
        match self {
            Off::Null => "null".into(),
            Off::Bool(b) => b.to_string(),
            Off::Num(n) => format!("{n}"),
            Off::EmptyList => "[]".into(),
            Off::EmptyObject => "{}".into(),
        }
    }
}

/// One unimplemented field: its name and the values accepted as "off".
pub type Unsupported = (&'static str, &'static [Off]);

const NULL: &[Off] = &[Off::Null];
const NULL_FALSE: &[Off] = &[Off::Null, Off::Bool(false)];
const NULL_TRUE: &[Off] = &[Off::Null, Off::Bool(true)];
const NULL_ZERO: &[Off] = &[Off::Null, Off::Num(0.0)];
const NULL_ONE: &[Off] = &[Off::Null, Off::Num(1.0)];
const NULL_EMPTY_LIST: &[Off] = &[Off::Null, Off::EmptyList];
const NULL_EMPTY_OBJECT: &[Off] = &[Off::Null, Off::EmptyObject];

/// Fields both request types share that are not implemented.
const COMMON: &[Unsupported] = &[
    ("frequency_penalty", NULL_ZERO),
    ("presence_penalty", NULL_ZERO),
    ("repetition_penalty", NULL_ONE),
    ("logit_bias", NULL_EMPTY_OBJECT),
    ("min_p", NULL_ZERO),
    ("min_tokens", NULL_ZERO),
    ("use_beam_search", NULL_FALSE),
    ("length_penalty", NULL_ONE),
    ("best_of", NULL_ONE),
    ("early_stopping", NULL_FALSE),
    ("watermarking", NULL_FALSE),
    ("spaces_between_special_tokens", NULL_TRUE),
    ("truncate_prompt_tokens", NULL),
    ("truncation_side", NULL),
    ("prompt_logprobs", NULL),
    ("logprob_token_ids", NULL),
    ("allowed_token_ids", NULL),
    ("bad_words", NULL_EMPTY_LIST),
    ("echo", NULL_FALSE),
    ("return_tokens_as_token_ids", NULL_FALSE),
    ("return_token_ids", NULL_FALSE),
    ("routed_experts_prompt_start", NULL_ZERO),
    ("cache_salt", NULL),
    ("kv_transfer_params", NULL),
    ("ec_transfer_params", NULL),
    ("vllm_xargs", NULL),
    ("repetition_detection", NULL),
    ("thinking_token_budget", NULL),
    ("stream_interval", NULL_ONE),
    // Removed from vLLM in favour of `structured_outputs`; refused so old clients notice.
    ("guided_json", NULL),
    ("guided_regex", NULL),
    ("guided_choice", NULL),
    ("guided_grammar", NULL),
    ("guided_decoding_backend", NULL),
    ("guided_whitespace_pattern", NULL),
];

/// `/v1/completions`-only fields that are not implemented.
const COMPLETION: &[Unsupported] = &[("suffix", NULL), ("prompt_embeds", NULL)];

/// `/v1/chat/completions`-only fields that are not implemented.
const CHAT: &[Unsupported] = &[
    ("reasoning_effort", NULL),
    ("continue_final_message", NULL_FALSE),
    ("documents", NULL),
    ("chat_template", NULL),
    ("media_io_kwargs", NULL),
    ("mm_processor_kwargs", NULL),
    ("return_prompt_text", NULL_FALSE),
    // OpenAI's deprecated function calling and output modalities (not in vLLM's type either,
    // but ignoring them would silently drop the functions).
    ("functions", NULL),
    ("function_call", NULL),
    ("audio", NULL),
    ("modalities", NULL),
    ("prediction", NULL),
];

/// Which endpoint's table applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completion,
    Chat,
}

impl Endpoint {
    fn lookup(self, key: &str) -> Option<&'static [Off]> {
        let own = match self {
            Endpoint::Completion => COMPLETION,
            Endpoint::Chat => CHAT,
        };
        COMMON
            .iter()
            .chain(own)
            .find(|(name, _)| *name == key)
            .map(|(_, off)| *off)
    }

    /// Every unimplemented field of this endpoint (for tests and docs).
    pub fn unsupported(self) -> impl Iterator<Item = &'static Unsupported> {
        let own = match self {
            Endpoint::Completion => COMPLETION,
            Endpoint::Chat => CHAT,
        };
        COMMON.iter().chain(own)
    }
}

/// The 400 for an unimplemented field set to something other than "off".
pub fn unsupported_error(field: &'static str, off: &[Off]) -> ApiError {
    let accepted: Vec<String> = off.iter().map(|o| o.describe()).collect();
    ApiError::bad(
        format!(
            "{field} is not supported by this server; omit it or set it to {}.",
            accepted.join(" or ")
        ),
        Some(field),
    )
}

/// Checks the top-level fields of a JSON object body against `endpoint`'s table (one pass over
/// the body; values of other fields are skipped without being built).
pub fn check_unsupported(body: &[u8], endpoint: Endpoint) -> Result<(), ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match de.deserialize_map(Check { endpoint }) {
        Ok(None) => Ok(()),
        Ok(Some((field, off))) => Err(unsupported_error(field, off)),
        // The typed decode reports malformed bodies with the precise message.
        Err(_) => Ok(()),
    }
}

struct Check {
    endpoint: Endpoint,
}

impl<'de> Visitor<'de> for Check {
    type Value = Option<(&'static str, &'static [Off])>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let off = match (found, self.endpoint.lookup(&key)) {
                (None, Some(off)) => off,
                // Skip (and so still syntax-check) the rest: serde_json fails a map left
                // half-read.
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            let value: Value = map.next_value()?;
            if !off.iter().any(|o| o.matches(&value)) {
                found = self
                    .endpoint
                    .unsupported()
                    .find(|(name, _)| *name == key)
                    .map(|(name, off)| (*name, *off));
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_values_pass_and_others_name_the_field() {
        assert!(check_unsupported(
            br#"{"logit_bias": {}, "echo": false, "n": 1}"#,
            Endpoint::Chat
        )
        .is_ok());
        // The first offender is reported wherever it stands.
        assert_eq!(
            check_unsupported(
                br#"{"top_k": 1, "echo": true, "min_p": 0.5, "stop": ["a"]}"#,
                Endpoint::Chat
            )
            .unwrap_err(),
            ApiError::bad(
                "echo is not supported by this server; omit it or set it to null or false.",
                Some("echo")
            )
        );
        assert!(check_unsupported(
            br#"{"frequency_penalty": 0, "presence_penalty": 0.0}"#,
            Endpoint::Completion
        )
        .is_ok());
        let e = check_unsupported(
            br#"{"model": "m", "logit_bias": {"50256": -100}}"#,
            Endpoint::Chat,
        )
        .unwrap_err();
        assert_eq!(
            e,
            ApiError::bad(
                "logit_bias is not supported by this server; omit it or set it to null or {}.",
                Some("logit_bias")
            )
        );
        // Endpoint-specific: `suffix` is a completions field, `documents` a chat one.
        assert!(check_unsupported(br#"{"suffix": "x"}"#, Endpoint::Chat).is_ok());
        assert_eq!(
            check_unsupported(br#"{"suffix": "x"}"#, Endpoint::Completion).unwrap_err(),
            ApiError::bad(
                "suffix is not supported by this server; omit it or set it to null.",
                Some("suffix")
            )
        );
    }

    #[test]
    fn escaped_keys_are_recognised() {
        // `"echo"` spelled with a JSON escape is still `echo`.
        let e = check_unsupported(br#"{"\u0065cho": true}"#, Endpoint::Completion).unwrap_err();
        assert_eq!(
            e,
            ApiError::bad(
                "echo is not supported by this server; omit it or set it to null or false.",
                Some("echo")
            )
        );
    }

    #[test]
    fn tables_have_no_duplicates() {
        for ep in [Endpoint::Chat, Endpoint::Completion] {
            let mut names: Vec<_> = ep.unsupported().map(|(n, _)| *n).collect();
            let len = names.len();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), len, "{ep:?}");
        }
    }
}
