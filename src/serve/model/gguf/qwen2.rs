//! A Qwen2 model from GGUF: hyper-parameters from the `qwen2.*` metadata and weights from
//! llama.cpp's tensor names (`blk.N.attn_q.weight`, ...), quantized matrices kept as mapped
//! blocks, vectors (norms, biases) converted to f32.

use super::{GgmlType, GgufError, GgufFile};
use crate::serve::backend::cpu::quant::dequantize_row;
use crate::serve::model::matrix::{Matrix, QuantMatrix};
use crate::serve::model::qwen2::{LayerWeights, Qwen2Weights};
use crate::serve::model::{ModelConfig, ModelError};

/// The hyper-parameters, validated like a `config.json`.
pub fn config(f: &GgufFile) -> Result<ModelConfig, GgufError> {
    let arch = f.str("general.architecture")?;
    if arch != "qwen2" {
        return Err(GgufError::Metadata {
            key: "general.architecture".into(),
            reason: format!("\"{arch}\" is not supported (supported: qwen2)"),
        });
    }
    // Long-context variants scale RoPE (YaRN); plain RoPE would give silently wrong logits.
    if let Some(v) = f.get("qwen2.rope.scaling.type") {
        if !matches!(v, super::Value::String(s) if s == "none") {
            return Err(GgufError::Metadata {
                key: "qwen2.rope.scaling.type".into(),
                reason: format!("{v:?} is not supported (only none)"),
            });
        }
    }
    let heads = f.usize("qwen2.attention.head_count")?;
    let vocab = f.array("tokenizer.ggml.tokens")?.len();
    let cfg = ModelConfig {
        model_type: "qwen2".into(),
        hidden_size: f.usize("qwen2.embedding_length")?,
        intermediate_size: f.usize("qwen2.feed_forward_length")?,
        num_attention_heads: heads,
        num_key_value_heads: f
            .opt_usize("qwen2.attention.head_count_kv")?
            .unwrap_or(heads),
        num_hidden_layers: f.usize("qwen2.block_count")?,
        rope_theta: f.opt_f64("qwen2.rope.freq_base")?.unwrap_or(10000.0),
        rms_norm_eps: f
            .opt_f64("qwen2.attention.layer_norm_rms_epsilon")?
            .unwrap_or(1e-6),
        vocab_size: vocab,
        max_position_embeddings: f.opt_usize("qwen2.context_length")?.unwrap_or(32768),
        tie_word_embeddings: f.tensor_info("output.weight").is_none(),
    };
    cfg.validate().map_err(|e| match e {
        ModelError::InvalidField { field, reason } => GgufError::Metadata {
            key: format!("qwen2 {field}"),
            reason,
        },
        other => GgufError::Metadata {
            key: "qwen2".into(),
            reason: other.to_string(),
        },
    })?;
    Ok(cfg)
}

/// Takes every tensor the config calls for, checking each one's shape and type.
pub fn weights(f: &GgufFile, cfg: &ModelConfig) -> Result<Qwen2Weights, GgufError> {
    let h = cfg.hidden_size;
    let q_out = cfg.num_attention_heads * cfg.head_dim();
    let kv_out = cfg.num_key_value_heads * cfg.head_dim();
    let i = cfg.intermediate_size;
    let v = cfg.vocab_size;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        let p = |s: &str| format!("blk.{l}.{s}");
        layers.push(LayerWeights {
            input_norm: vector(f, &p("attn_norm.weight"), h)?,
            q_proj: matrix(f, &p("attn_q.weight"), q_out, h)?,
            q_bias: vector(f, &p("attn_q.bias"), q_out)?,
            k_proj: matrix(f, &p("attn_k.weight"), kv_out, h)?,
            k_bias: vector(f, &p("attn_k.bias"), kv_out)?,
            v_proj: matrix(f, &p("attn_v.weight"), kv_out, h)?,
            v_bias: vector(f, &p("attn_v.bias"), kv_out)?,
            o_proj: matrix(f, &p("attn_output.weight"), h, q_out)?,
            post_norm: vector(f, &p("ffn_norm.weight"), h)?,
            gate_proj: matrix(f, &p("ffn_gate.weight"), i, h)?,
            up_proj: matrix(f, &p("ffn_up.weight"), i, h)?,
            down_proj: matrix(f, &p("ffn_down.weight"), h, i)?,
        });
    }
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(matrix(f, "output.weight", v, h)?)
    };
    Ok(Qwen2Weights {
        embed_tokens: matrix(f, "token_embd.weight", v, h)?,
        layers,
        norm: vector(f, "output_norm.weight", h)?,
        lm_head,
    })
}

/// A `[rows × cols]` weight (GGUF dims `[cols, rows]`): quantized types stay mapped, F32 is
/// copied out (the kernels read f32 matrices as slices).
fn matrix(f: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<Matrix, GgufError> {
    let (ty, dims, bytes) = f.tensor(name)?;
    check_dims(name, &dims, &[cols, rows])?;
    if ty == GgmlType::F32 {
        let mut out = vec![0f32; rows * cols];
        dequantize_row(ty, &bytes, &mut out);
        return Ok(Matrix::F32(out));
    }
    QuantMatrix::new(ty, rows, cols, bytes)
        .map(Matrix::Quant)
        .map_err(|reason| GgufError::Tensor {
            name: name.to_string(),
            reason,
        })
}

/// A 1-D tensor of `n` elements as f32.
fn vector(f: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>, GgufError> {
    let (ty, dims, bytes) = f.tensor(name)?;
    check_dims(name, &dims, &[n])?;
    let mut out = vec![0f32; n];
    dequantize_row(ty, &bytes, &mut out);
    Ok(out)
}

fn check_dims(name: &str, dims: &[usize], want: &[usize]) -> Result<(), GgufError> {
    if dims == want {
        Ok(())
    } else {
        Err(GgufError::Tensor {
            name: name.to_string(),
            reason: format!("dimensions {dims:?}, expected {want:?}"),
        })
    }
}
