//! Qwen2 weights by layer, shape-checked against the [`ModelConfig`] (HF tensor names).

use std::path::Path;

use super::matrix::Matrix;
use super::weights::WeightStore;
use super::{ModelConfig, ModelError};

/// One decoder layer. Linear weights are `[out_features, in_features]` row-major, as stored by
/// PyTorch, so `y = x · Wᵀ` is a dot product of `x` with each contiguous weight row (f32 from
/// safetensors, ggml blocks from GGUF); norms and biases are f32.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub input_norm: Vec<f32>,
    pub q_proj: Matrix,
    pub q_bias: Vec<f32>,
    pub k_proj: Matrix,
    pub k_bias: Vec<f32>,
    pub v_proj: Matrix,
    pub v_bias: Vec<f32>,
    pub o_proj: Matrix,
    pub post_norm: Vec<f32>,
    pub gate_proj: Matrix,
    pub up_proj: Matrix,
    pub down_proj: Matrix,
}

/// The whole model.
#[derive(Debug, Clone)]
pub struct Qwen2Weights {
    /// `[vocab_size, hidden_size]`.
    pub embed_tokens: Matrix,
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,
    /// `[vocab_size, hidden_size]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Matrix>,
}

impl Qwen2Weights {
    /// Loads and shape-checks the checkpoint in `dir`.
    pub fn load(dir: &Path, cfg: &ModelConfig) -> Result<Qwen2Weights, ModelError> {
        let mut store = WeightStore::load(dir)?;
        Self::from_store(&mut store, cfg)
    }

    /// Takes every tensor the config calls for out of `store`.
    pub fn from_store(
        store: &mut WeightStore,
        cfg: &ModelConfig,
    ) -> Result<Qwen2Weights, ModelError> {
        let h = cfg.hidden_size;
        let q_out = cfg.num_attention_heads * cfg.head_dim();
        let kv_out = cfg.num_key_value_heads * cfg.head_dim();
        let i = cfg.intermediate_size;
        let v = cfg.vocab_size;

        let embed_tokens = Matrix::F32(store.take("model.embed_tokens.weight", &[v, h])?);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(LayerWeights {
                input_norm: store.take(&format!("{p}.input_layernorm.weight"), &[h])?,
                q_proj: Matrix::F32(
                    store.take(&format!("{p}.self_attn.q_proj.weight"), &[q_out, h])?,
                ),
                q_bias: store.take(&format!("{p}.self_attn.q_proj.bias"), &[q_out])?,
                k_proj: Matrix::F32(
                    store.take(&format!("{p}.self_attn.k_proj.weight"), &[kv_out, h])?,
                ),
                k_bias: store.take(&format!("{p}.self_attn.k_proj.bias"), &[kv_out])?,
                v_proj: Matrix::F32(
                    store.take(&format!("{p}.self_attn.v_proj.weight"), &[kv_out, h])?,
                ),
                v_bias: store.take(&format!("{p}.self_attn.v_proj.bias"), &[kv_out])?,
                o_proj: Matrix::F32(
                    store.take(&format!("{p}.self_attn.o_proj.weight"), &[h, q_out])?,
                ),
                post_norm: store.take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_proj: Matrix::F32(store.take(&format!("{p}.mlp.gate_proj.weight"), &[i, h])?),
                up_proj: Matrix::F32(store.take(&format!("{p}.mlp.up_proj.weight"), &[i, h])?),
                down_proj: Matrix::F32(store.take(&format!("{p}.mlp.down_proj.weight"), &[h, i])?),
            });
        }
        let norm = store.take("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            // Some tied checkpoints still ship a copy; the embedding is authoritative.
            if store.contains("lm_head.weight") {
                tracing::debug!("ignoring lm_head.weight: tie_word_embeddings is true");
                store.take("lm_head.weight", &[v, h])?;
            }
            None
        } else {
            Some(Matrix::F32(store.take("lm_head.weight", &[v, h])?))
        };
        if !store.is_empty() {
            tracing::debug!(unused = ?store.remaining(), "checkpoint tensors not used by qwen2");
        }
        Ok(Qwen2Weights {
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// The output projection (`lm_head`, or the embedding when tied).
    pub fn output_weight(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}
