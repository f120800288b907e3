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

/// One chat message as the OpenAI API sends it (text content only; parts are joined).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub trait TextCodec: Send + Sync + 'static {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, CodecError>;
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, CodecError>;
    /// Token ids that end generation unless `ignore_eos` is set.
    fn eos_token_ids(&self) -> &[u32];
    /// Renders the chat template with the generation prompt appended.
    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, CodecError>;
    /// The most text bytes one token can stand for (the longest vocabulary entry), so a prompt
    /// longer than `max_model_len` times this cannot fit the context.
    fn max_token_bytes(&self) -> usize;
}
