//! Model config, safetensors weights, tokenizer and chat template.
//!
//! Everything here reads a Hugging Face-style model directory (`config.json`, `*.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`) fully offline. Backends
//! take the parsed [`ModelConfig`] and [`qwen2::Qwen2Weights`]; the API takes the
//! [`TextCodec`](crate::serve::codec::TextCodec) built by [`load_codec`].

pub mod chat;
pub mod config;
pub mod gguf;
pub mod matrix;
pub mod qwen2;
pub mod testing;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::serve::codec::TextCodec;

pub use config::ModelConfig;
pub use tokenizer::HfCodec;

/// Everything that can go wrong while loading a model directory.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("config.json: missing field \"{0}\"")]
    MissingField(&'static str),
    #[error("config.json: field \"{field}\": {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("unsupported model_type \"{0}\" (supported: qwen2)")]
    UnsupportedModelType(String),
    #[error("{path}: invalid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error(
        "no weights found in {0} (expected model.safetensors or model.safetensors.index.json)"
    )]
    NoWeights(PathBuf),
    #[error("missing tensor \"{0}\"")]
    MissingTensor(String),
    #[error("tensor \"{name}\" has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor \"{name}\" has unsupported dtype {dtype} (supported: BF16, F16, F32)")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("tensor \"{name}\" appears in more than one file")]
    DuplicateTensor { name: String },
    #[error("{path}: cannot load tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("chat template in {path} is invalid: {reason}")]
    Template { path: PathBuf, reason: String },
    #[error(transparent)]
    Gguf(#[from] gguf::OpenError),
    #[error("{backend} backend: {reason}")]
    Backend {
        backend: &'static str,
        reason: String,
    },
}

/// Builds the text codec of a model directory: `tokenizer.json` (HF tokenizers, offline),
/// the chat template from `tokenizer_config.json` and EOS ids from `generation_config.json`
/// and `tokenizer_config.json`.
/// A GGUF file instead of a directory gives its embedded tokenizer and template.
pub fn load_codec(dir: &Path) -> Result<Arc<dyn TextCodec>, ModelError> {
    if is_gguf(dir) {
        let file = gguf::GgufFile::open(dir)?;
        let tok = gguf::tokenizer::read(&file).map_err(|source| {
            ModelError::Gguf(gguf::OpenError::Gguf {
                path: dir.to_path_buf(),
                source,
            })
        })?;
        return Ok(Arc::new(HfCodec::from_gguf(dir, tok)?));
    }
    Ok(Arc::new(HfCodec::load(dir)?))
}

/// Whether `path` names a GGUF file (a file whose first bytes are the GGUF magic) rather than a
/// model directory.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// A model loaded from one GGUF file: config, weights (quantized blocks stay mapped) and codec.
pub struct GgufModel {
    pub config: ModelConfig,
    pub weights: qwen2::Qwen2Weights,
    pub codec: Arc<dyn TextCodec>,
}

/// Loads a Qwen2 GGUF file.
pub fn load_gguf(path: &Path) -> Result<GgufModel, ModelError> {
    let started = std::time::Instant::now();
    let file = gguf::GgufFile::open(path)?;
    let wrap = |source: gguf::GgufError| {
        ModelError::Gguf(gguf::OpenError::Gguf {
            path: path.to_path_buf(),
            source,
        })
    };
    let config = gguf::qwen2::config(&file).map_err(wrap)?;
    let weights = gguf::qwen2::weights(&file, &config).map_err(wrap)?;
    let tok = gguf::tokenizer::read(&file).map_err(wrap)?;
    let codec = Arc::new(HfCodec::from_gguf(path, tok)?);
    tracing::info!(
        path = %path.display(),
        layers = config.num_hidden_layers,
        hidden = config.hidden_size,
        vocab = config.vocab_size,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "GGUF model loaded"
    );
    Ok(GgufModel {
        config,
        weights,
        codec,
    })
}

/// Reads a file, naming it in the error.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and parses a JSON file, naming it in the error.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value, ModelError> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Like [`read_json`], but a missing file is `Ok(None)` (optional files such as
/// `generation_config.json`).
pub(crate) fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>, ModelError> {
    if !path.exists() {
        return Ok(None);
    }
    read_json(path).map(Some)
}
