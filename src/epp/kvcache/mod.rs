//! Precise prefix routing: the EPP follows each endpoint's KV-cache events (vLLM's msgpack over
//! ZMQ, or the decode server's own gRPC stream), keeps the blocks each really holds
//! ([`index`]), tokenizes the prompt as the model server does and scores endpoints by the
//! leading blocks they hold (`precise-prefix-cache-scorer`, [`scorer`]). Endpoints without a
//! live event stream are scored from the approximate index instead.
//!
//! - [`params`]: the plugin's llm-d-router parameters → [`PreciseParams`].
//! - [`accuracy`]: predicted vs reported cached tokens per routed request, as metrics.
//! - [`subscriber`]: one event-stream task per endpoint, following the datastore.

use std::path::Path;
use std::sync::Arc;

use crate::epp::request::ApiType;
use crate::serve::api::types::ChatMessageIn;
use crate::serve::approx_codec::ApproxCodec;
use crate::serve::codec::TextCodec;

pub mod accuracy;
pub mod index;
pub mod params;
pub mod scorer;
pub mod subscriber;

pub use accuracy::{CachedPrediction, PredictionMetrics};
pub use index::{BlockIndex, IndexConfig};
pub use params::{PreciseParamError, PreciseParams, WirePreciseParams};

/// Ids below Qwen2's special tokens: the approximate codec's vocabulary, as `serve --backend sim`
/// uses without `--model`.
const APPROX_REGULAR_VOCAB: u32 = 151_643;

/// What every instance of one configured `precise-prefix-cache-scorer` shares: its parameters,
/// the tokenizer and the index the subscribers fill.
pub struct Precise {
    pub params: PreciseParams,
    pub codec: Arc<dyn TextCodec>,
    pub index: Arc<BlockIndex>,
}

impl std::fmt::Debug for Precise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Precise")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// Compared by parameters (the config model compares plugin kinds).
impl PartialEq for Precise {
    fn eq(&self, other: &Self) -> bool {
        self.params == other.params
    }
}

impl Precise {
    /// Loads the tokenizer (once, at config time, so a bad path fails `--check-config`).
    pub fn new(params: PreciseParams) -> Result<Precise, PreciseParamError> {
        let codec: Arc<dyn TextCodec> = match &params.tokenizer_dir {
            Some(dir) => load_tokenizer(dir)?,
            None => Arc::new(ApproxCodec::new(APPROX_REGULAR_VOCAB)),
        };
        let index = Arc::new(BlockIndex::new(IndexConfig {
            block_size: params.block_size,
            hash_seed: params.hash_seed.clone(),
            max_keys_per_endpoint: params.max_keys_per_endpoint,
        }));
        Ok(Precise {
            params,
            codec,
            index,
        })
    }

    /// The prompt's token ids as the model server computes them: completions' text encoded with
    /// special tokens (a token-id prompt as is), chat messages rendered with the chat template.
    /// `None` when the prompt cannot be tokenized here (other APIs, templating errors).
    pub fn prompt_tokens(&self, api: ApiType, prompt: &[u8]) -> Option<Vec<u32>> {
        match api {
            ApiType::Completions => {
                // `request.rs` passes a string prompt unescaped and anything else as compact
                // JSON; a token-id array is what the server would use as is.
                if prompt.first() == Some(&b'[') {
                    if let Ok(ids) = serde_json::from_slice::<Vec<u32>>(prompt) {
                        return Some(ids);
                    }
                }
                let text = std::str::from_utf8(prompt).ok()?;
                self.codec.encode(text, true).ok()
            }
            ApiType::ChatCompletions => {
                let messages: Vec<ChatMessageIn> = serde_json::from_slice(prompt).ok()?;
                let messages = crate::serve::api::messages::chat_messages(&messages).ok()?;
                let text = self.codec.render_chat(&messages).ok()?;
                self.codec.encode(&text, false).ok()
            }
            ApiType::Responses | ApiType::Embeddings => None,
        }
    }
}

fn load_tokenizer(dir: &Path) -> Result<Arc<dyn TextCodec>, PreciseParamError> {
    crate::serve::model::load_codec(dir).map_err(|e| PreciseParamError::Tokenizer {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })
}

/// A shared [`Precise`] as a plugin kind holds it.
#[derive(Debug, Clone)]
pub struct PreciseHandle(pub Arc<Precise>);

impl PartialEq for PreciseHandle {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
