//! OpenAI / vLLM wire types: requests decoded leniently (unknown fields ignored, as vLLM does),
//! responses and stream chunks serialised from borrowed data.
//!
//! Request decoding never buffers a whole value as serde `Content` (what `#[serde(flatten)]` and
//! `#[serde(untagged)]` do): unknown fields are skipped as they are read, the variant-typed fields
//! (`prompt`, `stop`, message `content`) have hand-written visitors, and the completions `prompt`
//! is kept as raw JSON until the handler decodes it with the model's context length as a cap, so a
//! body costs about its own size in memory whatever it holds.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// `prompt`: text, a one-element list of text, token ids, or a one-element list of token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

impl Prompt {
    /// Decodes a raw `prompt` value, keeping at most `max_tokens` + 1 token ids of a token-array
    /// prompt (the rest are only counted), so a huge array costs no memory beyond the body.
    /// Returns the prompt and, for token arrays, the total number of ids.
    pub fn decode(raw: &RawValue, max_tokens: usize) -> Result<(Prompt, usize), serde_json::Error> {
        let mut de = serde_json::Deserializer::from_str(raw.get());
        let prompt = de::DeserializeSeed::deserialize(PromptSeed { max_tokens }, &mut de)?;
        de.end()?;
        Ok(prompt)
    }
}

struct PromptSeed {
    max_tokens: usize,
}

impl<'de> de::DeserializeSeed<'de> for PromptSeed {
    type Value = (Prompt, usize);

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PromptSeed {
    type Value = (Prompt, usize);

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string, an array of strings, an array of token ids or an array of arrays")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok((Prompt::Text(v.to_owned()), 0))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok((Prompt::Text(v), 0))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let Some(first) = seq.next_element::<PromptItem>()? else {
            return Ok((Prompt::Tokens(Vec::new()), 0));
        };
        match first {
            PromptItem::Token(t) => {
                let mut ids = vec![t];
                let mut count = 1usize;
                while count <= self.max_tokens {
                    match seq.next_element::<u32>()? {
                        Some(t) => {
                            ids.push(t);
                            count += 1;
                        }
                        None => return Ok((Prompt::Tokens(ids), count)),
                    }
                }
                // Too long for the context anyway: count the rest without keeping it.
                while seq.next_element::<TokenId>()?.is_some() {
                    count += 1;
                }
                Ok((Prompt::Tokens(ids), count))
            }
            PromptItem::Text(s) => {
                let mut v = vec![s];
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(s);
                }
                Ok((Prompt::Texts(v), 0))
            }
            PromptItem::Tokens(ids) => {
                let count = ids.len();
                let mut v = vec![ids];
                while let Some(ids) = seq.next_element::<Vec<u32>>()? {
                    v.push(ids);
                }
                Ok((Prompt::TokenLists(v), count))
            }
        }
    }
}

/// A token id that is checked but not kept.
struct TokenId;

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u32::deserialize(d).map(|_| TokenId)
    }
}

/// The first element of an array prompt decides its kind.
enum PromptItem {
    Token(u32),
    Text(String),
    Tokens(Vec<u32>),
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PromptItem;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a token id, a string or an array of token ids")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PromptItem, E> {
                u32::try_from(v)
                    .map(PromptItem::Token)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &"a u32"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PromptItem, E> {
                u32::try_from(v)
                    .map(PromptItem::Token)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &"a u32"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PromptItem, A::Error> {
                let mut ids = Vec::new();
                while let Some(t) = seq.next_element::<u32>()? {
                    ids.push(t);
                }
                Ok(PromptItem::Tokens(ids))
            }
        }
        d.deserialize_any(V)
    }
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, PartialEq)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for StopSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StopSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StopSpec, E> {
                Ok(StopSpec::One(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<StopSpec, E> {
                Ok(StopSpec::One(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StopSpec, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(s);
                }
                Ok(StopSpec::Many(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `priority`: an integer (or null); anything else is refused with a message naming the field,
/// where a plain `i64` would only say "expected i64".
fn priority_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<i64>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an integer")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            i64::try_from(v).map(Some).map_err(|_| {
                E::custom(format!(
                    "priority {v} is out of range (at most {})",
                    i64::MAX
                ))
            })
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Err(E::custom(format!("priority must be an integer, got {v}")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Err(E::custom(format!(
                "priority must be an integer, got the string {v:?}"
            )))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Err(E::custom(format!("priority must be an integer, got {v}")))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(de::Error::custom(
                "priority must be an integer, got an array",
            ))
        }
        fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(de::Error::custom(
                "priority must be an integer, got an object",
            ))
        }
    }
    d.deserialize_any(V)
}

/// Fields completions and chat share.
#[derive(Debug, Clone, Default)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    pub stop: Option<StopSpec>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub include_stop_str_in_output: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    /// OpenAI `response_format` (checked by `structured`).
    pub response_format: Option<serde_json::Value>,
    /// vLLM `structured_outputs` (checked by `structured`).
    pub structured_outputs: Option<serde_json::Value>,
    /// vLLM `request_id`: names the response (`cmpl-{id}` / `chatcmpl-{id}`).
    pub request_id: Option<String>,
    /// vLLM `priority`: lower is scheduled first (`--scheduling-policy priority`).
    pub priority: Option<i64>,
}

/// Declares a request with its own fields followed by the [`CommonParams`] fields, and
/// `take_common()` to move those out. Written out instead of `#[serde(flatten)]`, which buffers
/// the whole body (unknown fields included) as serde `Content` before decoding.
macro_rules! request_with_common_params {
    (
        $(#[$meta:meta])*
        pub struct $name:ident $(<$lt:lifetime>)? { $($fields:tt)* }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Deserialize)]
        pub struct $name $(<$lt>)? {
            $($fields)*
            pub model: Option<String>,
            pub max_tokens: Option<i64>,
            pub temperature: Option<f32>,
            pub top_p: Option<f32>,
            pub top_k: Option<i64>,
            pub seed: Option<i64>,
            pub n: Option<i64>,
            pub stop: Option<StopSpec>,
            pub stop_token_ids: Option<Vec<u32>>,
            pub ignore_eos: Option<bool>,
            pub stream: Option<bool>,
            pub stream_options: Option<StreamOptions>,
            pub include_stop_str_in_output: Option<bool>,
            pub skip_special_tokens: Option<bool>,
            pub response_format: Option<serde_json::Value>,
            pub structured_outputs: Option<serde_json::Value>,
            pub request_id: Option<String>,
            #[serde(default, deserialize_with = "priority_field")]
            pub priority: Option<i64>,
        }

        impl $(<$lt>)? $name $(<$lt>)? {
            /// Moves the shared fields out.
            pub fn take_common(&mut self) -> CommonParams {
                CommonParams {
                    model: self.model.take(),
                    max_tokens: self.max_tokens.take(),
                    temperature: self.temperature.take(),
                    top_p: self.top_p.take(),
                    top_k: self.top_k.take(),
                    seed: self.seed.take(),
                    n: self.n.take(),
                    stop: self.stop.take(),
                    stop_token_ids: self.stop_token_ids.take(),
                    ignore_eos: self.ignore_eos.take(),
                    stream: self.stream.take(),
                    stream_options: self.stream_options.take(),
                    include_stop_str_in_output: self.include_stop_str_in_output.take(),
                    skip_special_tokens: self.skip_special_tokens.take(),
                    response_format: self.response_format.take(),
                    structured_outputs: self.structured_outputs.take(),
                    request_id: self.request_id.take(),
                    priority: self.priority.take(),
                }
            }
        }
    };
}

request_with_common_params! {
    /// `POST /v1/completions`. `prompt` stays raw JSON (borrowed from the body) until
    /// [`Prompt::decode`] reads it with the context length as a cap.
    pub struct CompletionRequest<'a> {
        #[serde(borrow)]
        pub prompt: &'a RawValue,
        pub logprobs: Option<i64>,
        pub add_special_tokens: Option<bool>,
    }
}

/// Message `content`: a string, or a list of parts (text parts are joined).
#[derive(Debug, Clone, PartialEq)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MessageContent;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an array of content parts")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MessageContent, A::Error> {
                let mut v = Vec::new();
                while let Some(p) = seq.next_element::<ContentPart>()? {
                    v.push(p);
                }
                Ok(MessageContent::Parts(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<MessageContent>,
    /// An assistant turn's calls (sent back in the history).
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// A `tool` turn: the call it answers.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

/// A tool call in an assistant message of the history.
#[derive(Debug, Clone, Deserialize)]
pub struct ToolCallIn {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: FunctionCallIn,
}

/// `arguments` is a JSON string in OpenAI's API; an object is accepted too.
#[derive(Debug, Clone, Deserialize)]
pub struct FunctionCallIn {
    pub name: String,
    pub arguments: Option<serde_json::Value>,
}

impl ChatMessageIn {
    /// Bytes of text this message contributes (before templating).
    pub fn text_len(&self) -> usize {
        match &self.content {
            None => 0,
            Some(MessageContent::Text(s)) => s.len(),
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .filter(|p| p.kind == "text")
                .filter_map(|p| p.text.as_deref())
                .map(str::len)
                .sum(),
        }
    }
}

request_with_common_params! {
    /// `POST /v1/chat/completions`.
    pub struct ChatRequest {
        pub messages: Vec<ChatMessageIn>,
        pub max_completion_tokens: Option<i64>,
        pub logprobs: Option<bool>,
        pub top_logprobs: Option<i64>,
        /// Kept as JSON: rendered by the chat template as sent, checked by `tool_choice`.
        pub tools: Option<Vec<serde_json::Value>>,
        pub tool_choice: Option<serde_json::Value>,
        pub parallel_tool_calls: Option<bool>,
        pub add_generation_prompt: Option<bool>,
        pub add_special_tokens: Option<bool>,
        pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    pub add_special_tokens: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// vLLM's `stop_reason`: the stop string or stop token id that ended generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum StopReason {
    Text(String),
    Token(u32),
}

/// Completions `logprobs` object.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

/// Chat `logprobs` object.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Serialize)]
pub struct CompletionChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    pub logprobs: Option<&'a CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<&'a StopReason>,
}

#[derive(Debug, Serialize)]
pub struct CompletionResponse<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: &'a [CompletionChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize)]
pub struct ChatMessageOut<'a> {
    pub role: &'static str,
    /// `null` when the model only called tools.
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub tool_calls: &'a [ToolCallOut<'a>],
}

#[derive(Debug, Serialize)]
pub struct FunctionOut<'a> {
    pub name: &'a str,
    pub arguments: &'a str,
}

#[derive(Debug, Serialize)]
pub struct ToolCallOut<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionOut<'a>,
}

/// A streamed piece of a tool call: the first one of a call carries its id, type and name,
/// later ones argument fragments.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice<'a> {
    pub index: u32,
    pub message: ChatMessageOut<'a>,
    pub logprobs: Option<&'a ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<&'a StopReason>,
}

#[derive(Debug, Serialize)]
pub struct ChatResponse<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: &'a [ChatChoice<'a>],
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub struct ChatDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<&'a [ToolCallDelta]>,
}

#[derive(Debug, Serialize)]
pub struct ChatChunkChoice<'a> {
    pub index: u32,
    pub delta: ChatDelta<'a>,
    pub logprobs: Option<&'a ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<&'a StopReason>,
}

#[derive(Debug, Serialize)]
pub struct ChatChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: &'a [ChatChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}
