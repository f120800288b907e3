//! OpenAI request-body inspection for routing: the model, the prompt bytes the prefix index
//! hashes, and an in-place model rewrite. The body is validated and inspected in one borrowed
//! serde pass and otherwise forwarded byte for byte.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// Which OpenAI API a request targets, from the `:path` suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiType {
    #[default]
    Completions,
    ChatCompletions,
    Responses,
    Embeddings,
}

impl ApiType {
    /// Classifies a request path (query string ignored). Unknown paths are treated as completions,
    /// as the reference does.
    pub fn from_path(path: &str) -> Self {
        let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            ApiType::ChatCompletions
        } else if path.ends_with("/responses") {
            ApiType::Responses
        } else if path.ends_with("/embeddings") {
            ApiType::Embeddings
        } else {
            ApiType::Completions
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The body is not valid JSON, or a field has the wrong type; serde's description.
    #[error(transparent)]
    InvalidJson(#[from] serde_json::Error),
    /// The body is a JSON array (serde's derived visitor would accept it as a struct).
    #[error("invalid type: sequence, expected a JSON object")]
    NotAnObject,
    #[error("model not found in request body")]
    MissingModel,
}

/// Fields of interest, borrowed from the body. Everything else is skipped (but still validated).
#[derive(Deserialize)]
struct BodyFields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(default)]
    stream: StreamFlag,
    #[serde(borrow, default)]
    cache_salt: Option<Cow<'a, str>>,
}

/// `"stream": true` is true; any other value (false, null, a string, a 15 MB array) is false and
/// is skipped without being built: the visitor only looks at booleans, and hands everything
/// else to [`serde::de::IgnoredAny`], so the cost of a huge value is one pass with no allocation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct StreamFlag(bool);

impl<'de> Deserialize<'de> for StreamFlag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = StreamFlag;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<StreamFlag, E> {
                Ok(StreamFlag(v))
            }
            fn visit_i64<E>(self, _: i64) -> Result<StreamFlag, E> {
                Ok(StreamFlag(false))
            }
            fn visit_u64<E>(self, _: u64) -> Result<StreamFlag, E> {
                Ok(StreamFlag(false))
            }
            fn visit_f64<E>(self, _: f64) -> Result<StreamFlag, E> {
                Ok(StreamFlag(false))
            }
            fn visit_str<E>(self, _: &str) -> Result<StreamFlag, E> {
                Ok(StreamFlag(false))
            }
            fn visit_unit<E>(self) -> Result<StreamFlag, E> {
                Ok(StreamFlag(false))
            }
            fn visit_none<E>(self) -> Result<StreamFlag, E> {
                Ok(StreamFlag(false))
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<StreamFlag, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<StreamFlag, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(StreamFlag(false))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<StreamFlag, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(StreamFlag(false))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The parts of a request body the director needs.
#[derive(Debug, Clone, PartialEq)]
pub struct InspectedBody<'a> {
    pub model: Cow<'a, str>,
    /// Byte range of the `model` value's JSON string token within the body (for rewriting).
    model_span: (usize, usize),
    /// Bytes the prefix index hashes (REFERENCE.md §2 "Input bytes").
    pub prompt: Cow<'a, [u8]>,
    pub cache_salt: Cow<'a, str>,
    pub stream: bool,
}

/// Parses `body` once and extracts the routing fields.
pub fn inspect(body: &[u8], api: ApiType) -> Result<InspectedBody<'_>, RequestError> {
    // serde's derived struct visitor also accepts a JSON array; only an object is a request.
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(RequestError::NotAnObject);
    }
    let fields: BodyFields<'_> = serde_json::from_slice(body)?;
    let raw_model = fields.model.ok_or(RequestError::MissingModel)?;
    // `model` must be a JSON string; anything else is the reference's "model not found".
    let model: Cow<'_, str> =
        serde_json::from_str(raw_model.get()).map_err(|_| RequestError::MissingModel)?;
    let model_span = span_within(body, raw_model.get().as_bytes());

    let prompt_value = match api {
        ApiType::Completions => fields.prompt,
        ApiType::ChatCompletions => fields.messages,
        ApiType::Responses | ApiType::Embeddings => fields.input,
    };
    let prompt = match prompt_value {
        None => Cow::Borrowed(&[][..]),
        Some(raw) => prompt_bytes(raw),
    };
    let stream = fields.stream.0;
    Ok(InspectedBody {
        model,
        model_span,
        prompt,
        cache_salt: fields.cache_salt.unwrap_or(Cow::Borrowed("")),
        stream,
    })
}

impl InspectedBody<'_> {
    /// Returns `body` with the `model` value replaced by `target`, all other bytes unchanged.
    pub fn rewrite_model(&self, body: &[u8], target: &str) -> Vec<u8> {
        let (start, end) = self.model_span;
        // A JSON string of a valid &str cannot fail to serialise.
        let replacement = serde_json::to_string(target).unwrap_or_else(|_| String::from("\"\""));
        let mut out = Vec::with_capacity(body.len() - (end - start) + replacement.len());
        out.extend_from_slice(&body[..start]);
        out.extend_from_slice(replacement.as_bytes());
        out.extend_from_slice(&body[end..]);
        out
    }
}

/// Offset of `inner` (a sub-slice handed out by serde's borrowed parse) within `outer`.
fn span_within(outer: &[u8], inner: &[u8]) -> (usize, usize) {
    let start = (inner.as_ptr() as usize).saturating_sub(outer.as_ptr() as usize);
    let start = start.min(outer.len());
    (start, (start + inner.len()).min(outer.len()))
}

/// A string value hashes as its unescaped text; any other value (arrays of messages, token ids,
/// input items) hashes as compact JSON so that earlier chat turns form a byte prefix of later ones
/// whatever whitespace the client used.
fn prompt_bytes(raw: &RawValue) -> Cow<'_, [u8]> {
    let text = raw.get();
    if text.starts_with('"') {
        return match serde_json::from_str::<Cow<'_, str>>(text) {
            Ok(Cow::Borrowed(s)) => Cow::Borrowed(s.as_bytes()),
            Ok(Cow::Owned(s)) => Cow::Owned(s.into_bytes()),
            Err(_) => Cow::Borrowed(text.as_bytes()),
        };
    }
    compact_json(text.as_bytes())
}

/// Removes insignificant whitespace from valid JSON without re-serialising; borrows when there is
/// none (the common case for machine-written bodies).
pub fn compact_json(json: &[u8]) -> Cow<'_, [u8]> {
    let mut in_string = false;
    let mut escaped = false;
    let needs_work = json.iter().any(|&b| {
        let ws = !in_string && matches!(b, b' ' | b'\n' | b'\r' | b'\t');
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        }
        ws
    });
    if !needs_work {
        return Cow::Borrowed(json);
    }
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            if b == b'"' {
                in_string = true;
            }
            out.push(b);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_type_from_path() {
        assert_eq!(
            ApiType::from_path("/v1/chat/completions"),
            ApiType::ChatCompletions
        );
        assert_eq!(
            ApiType::from_path("/v1/completions?x=1"),
            ApiType::Completions
        );
        assert_eq!(ApiType::from_path("/v1/responses"), ApiType::Responses);
        assert_eq!(ApiType::from_path("/v1/embeddings/"), ApiType::Embeddings);
        assert_eq!(ApiType::from_path("/other"), ApiType::Completions);
    }

    #[test]
    fn completions_prompt_is_unescaped_text() {
        let body = br#"{"max_tokens":100,"model":"m","prompt":"a\"b\u0041","temperature":0}"#;
        let got = inspect(body, ApiType::Completions).unwrap();
        assert_eq!(got.model, "m");
        assert_eq!(&*got.prompt, b"a\"bA");
        assert!(!got.stream);
    }

    #[test]
    fn chat_messages_are_compact_json_and_turns_form_a_prefix() {
        let one = br#"{"model":"m","messages":[ {"role": "user", "content": "hi there"} ]}"#;
        let two = br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi there"},{"role":"assistant","content":"yo"}]}"#;
        let a = inspect(one, ApiType::ChatCompletions).unwrap();
        let b = inspect(two, ApiType::ChatCompletions).unwrap();
        assert_eq!(&*a.prompt, br#"[{"role":"user","content":"hi there"}]"#);
        let a_open = &a.prompt[..a.prompt.len() - 1];
        assert!(b.prompt.starts_with(a_open));
        assert!(b.stream);
    }

    #[test]
    fn responses_and_embeddings_use_input() {
        let body = br#"{"model":"m","input":"hello","cache_salt":"s1"}"#;
        let got = inspect(body, ApiType::Responses).unwrap();
        assert_eq!(&*got.prompt, b"hello");
        assert_eq!(got.cache_salt, "s1");
        let got = inspect(body, ApiType::Embeddings).unwrap();
        assert_eq!(&*got.prompt, b"hello");
    }

    #[test]
    fn errors() {
        assert!(matches!(
            inspect(b"no healthy upstream", ApiType::Completions),
            Err(RequestError::InvalidJson(_))
        ));
        assert!(matches!(
            inspect(br#"{"prompt":"hello world"}"#, ApiType::Completions),
            Err(RequestError::MissingModel)
        ));
        assert!(matches!(
            inspect(br#"{"model":7}"#, ApiType::Completions),
            Err(RequestError::MissingModel)
        ));
        let e = inspect(b"[1,2]", ApiType::Completions).err();
        assert!(matches!(e, Some(RequestError::NotAnObject)), "{e:?}");
        assert_eq!(
            e.map(|e| e.to_string()).unwrap_or_default(),
            "invalid type: sequence, expected a JSON object"
        );
        assert!(matches!(
            inspect(b"", ApiType::Completions),
            Err(RequestError::InvalidJson(_))
        ));
    }

    #[test]
    fn stream_is_true_only_for_a_json_true() {
        let cases: [(&[u8], bool); 9] = [
            (br#"{"model":"m","stream":true}"#, true),
            (br#"{"model":"m","stream":false}"#, false),
            (br#"{"model":"m","stream":null}"#, false),
            (br#"{"model":"m","stream":"true"}"#, false),
            (br#"{"model":"m","stream":1}"#, false),
            (br#"{"model":"m","stream":-1.5e3}"#, false),
            (br#"{"model":"m","stream":[true,[1,{"a":true}]]}"#, false),
            (br#"{"model":"m","stream":{"stream":true}}"#, false),
            (br#"{"model":"m"}"#, false),
        ];
        for (body, want) in cases {
            let got = inspect(body, ApiType::Completions).unwrap();
            assert_eq!(got.stream, want, "{}", String::from_utf8_lossy(body));
        }
        // Still validated: a malformed value inside `stream` is invalid JSON.
        assert!(matches!(
            inspect(br#"{"model":"m","stream":[1,}"#, ApiType::Completions),
            Err(RequestError::InvalidJson(_))
        ));
    }

    #[test]
    fn rewrite_keeps_every_other_byte() {
        let body = br#"{ "model" : "model-to-be-rewritten", "prompt":"x",  "n":1}"#;
        let got = inspect(body, ApiType::Completions).unwrap();
        let out = got.rewrite_model(body, "rewritten-model");
        assert_eq!(
            out,
            br#"{ "model" : "rewritten-model", "prompt":"x",  "n":1}"#.to_vec()
        );
        let escaped = got.rewrite_model(body, "a\"b");
        assert_eq!(
            escaped,
            br#"{ "model" : "a\"b", "prompt":"x",  "n":1}"#.to_vec()
        );
    }

    #[test]
    fn compact_json_respects_strings() {
        assert_eq!(
            &*compact_json(br#"[ "a b", {"c" : "\" d"} ]"#),
            br#"["a b",{"c":"\" d"}]"#
        );
        assert!(matches!(compact_json(b"[1,2]"), Cow::Borrowed(_)));
    }
}
