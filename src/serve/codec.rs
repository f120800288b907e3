//! Text ↔ token ids, and chat messages → prompt text. Implemented by the Hugging Face tokenizer
//! (`model::tokenizer`) and by an approximate byte codec for the `sim` backend without a tokenizer.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("tokenization failed: {0}")]
    Encode(String),
    #[error("detokenization failed: {0}")]
    Decode(String),
    #[error("chat template failed: {0}")]
    Template(String),
}

/// One chat message as the OpenAI API sends it (text content only; parts are joined), in the
/// shape Hugging Face chat templates read: an assistant's `tool_calls` carry `arguments` as a
/// JSON object (not the API's JSON string), a `tool` message its `tool_call_id`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A plain text message.
    pub fn text(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }
}

/// What a chat template sees besides the messages (vLLM's `apply_chat_template` arguments).
#[derive(Debug, Clone, Copy)]
pub struct ChatExtras<'a> {
    /// OpenAI `tools` (`{"type": "function", "function": {...}}` objects), or none.
    pub tools: Option<&'a [serde_json::Value]>,
    pub add_generation_prompt: bool,
    /// `chat_template_kwargs`: extra template variables.
    pub kwargs: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

impl Default for ChatExtras<'_> {
    fn default() -> Self {
        Self {
            tools: None,
            add_generation_prompt: true,
            kwargs: None,
        }
    }
}

pub trait TextCodec: Send + Sync + 'static {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, CodecError>;
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, CodecError>;
    /// Token ids that end generation unless `ignore_eos` is set.
    fn eos_token_ids(&self) -> &[u32];
    /// Renders the chat template with the generation prompt appended.
    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, CodecError>;
    /// Renders with `extras`. Codecs without a Jinja template only render the plain case (the
    /// API refuses tools for them through [`TextCodec::supports_tools`]).
    fn render_chat_with(
        &self,
        messages: &[ChatMessage],
        extras: &ChatExtras<'_>,
    ) -> Result<String, CodecError> {
        if extras.tools.is_some() || !extras.add_generation_prompt || extras.kwargs.is_some() {
            return Err(CodecError::Template(
                "this model has no chat template that takes tools, kwargs or \
                 add_generation_prompt=false"
                    .into(),
            ));
        }
        self.render_chat(messages)
    }
    /// The Hugging Face `tokenizer.json` of the vocabulary, for building token masks
    /// (constrained decoding); `None` when there is no real token table.
    fn tokenizer_json(&self) -> Option<serde_json::Value> {
        None
    }
    /// Whether the chat template renders `tools` (it reads the `tools` variable).
    fn supports_tools(&self) -> bool {
        false
    }
    /// The most text bytes one token can stand for (the longest vocabulary entry), so a prompt
    /// longer than `max_model_len` times this cannot fit the context.
    fn max_token_bytes(&self) -> usize;
}
