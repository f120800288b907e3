//! Host side of weight loading for the CUDA backend: reads the safetensors checkpoint into raw
//! bf16 bits (converting F16/F32, keeping BF16 as is) — or, for FP8 checkpoints as
//! llm-compressor / vLLM write them (`*.weight` in `F8_E4M3` beside a `*.weight_scale`), the
//! E4M3 codes and their scales — and builds the fused layouts the forward uses: QKV `[q; k; v]`
//! and gate/up `[gate; up]` stacked along the output dimension, so each is one GEMM. With
//! `--quantization fp8` a bf16 checkpoint is quantized here, per output channel
//! ([`fp8::quantize_rows`]). The runtime uploads a layer at a time and drops the host copy.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::fp8::{self, Fp8Matrix};
use crate::serve::model::{ModelConfig, ModelError};

/// A malformed FP8 checkpoint, named precisely (a load error, never a panic).
#[derive(Debug, thiserror::Error)]
pub enum Fp8Error {
    #[error(
        "FP8 tensor \"{name}\" has no \"{name}_scale\" (llm-compressor / vLLM FP8 checkpoints \
         store one beside every F8_E4M3 weight)"
    )]
    MissingScale { name: String },
    #[error(
        "\"{name}_scale\" has shape {found:?}; supported: per-tensor ([] or [1]) or \
         per-channel ([{rows}] or [{rows}, 1]); block-wise scales are not supported"
    )]
    ScaleShape {
        name: String,
        found: Vec<usize>,
        rows: usize,
    },
    #[error("\"{name}_scale\" holds {value}, not a positive finite scale")]
    BadScale { name: String, value: f32 },
    #[error("FP8 tensor \"{name}\" holds a NaN code (0x{code:02x}) at element {index}")]
    NanCode {
        name: String,
        index: usize,
        code: u8,
    },
    #[error("FP8 tensor \"{name}\" has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("FP8 tensor \"{name}\" is not a projection weight; only *_proj.weight and lm_head.weight may be F8_E4M3")]
    Unexpected { name: String },
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// A tensor as bf16 bits, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<u16>,
}

/// Converts one safetensors payload to bf16 bits (round to nearest even).
pub fn to_bf16(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<u16>, ModelError> {
    let pairs = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]));
    Ok(match dtype {
        Dtype::BF16 => pairs.collect(),
        Dtype::F16 => pairs
            .map(|b| half::bf16::from_f32(half::f16::from_bits(b).to_f32()).to_bits())
            .collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_bits())
            .collect(),
        other => {
            return Err(ModelError::UnsupportedDtype {
                name: name.to_owned(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

/// An F8_E4M3 tensor as stored (row-major codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFp8 {
    pub shape: Vec<usize>,
    pub codes: Vec<u8>,
}

/// Every tensor of a checkpoint, moved out by [`Bf16Store::take`] / [`Bf16Store::take_fp8`]:
/// bf16 bits for the ordinary tensors, codes for F8_E4M3 weights, f32 for their `*_scale`s.
#[derive(Debug, Default)]
pub struct Bf16Store {
    tensors: HashMap<String, HostTensor>,
    fp8: HashMap<String, HostFp8>,
    scales: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

/// A scale tensor (`*.weight_scale`, `*.input_scale`) to f32, exactly.
fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, ModelError> {
    let pairs = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]));
    Ok(match dtype {
        Dtype::BF16 => pairs.map(|b| half::bf16::from_bits(b).to_f32()).collect(),
        Dtype::F16 => pairs.map(|b| half::f16::from_bits(b).to_f32()).collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        other => {
            return Err(ModelError::UnsupportedDtype {
                name: name.to_owned(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

impl Bf16Store {
    pub fn load(dir: &Path) -> Result<Bf16Store, ModelError> {
        let mut store = Bf16Store::default();
        for path in crate::serve::model::weights::weight_files(dir)? {
            let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Safetensors {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            for (name, view) in st.iter() {
                let shape = view.shape().to_vec();
                let fresh = if view.dtype() == Dtype::F8_E4M3 {
                    let t = HostFp8 {
                        shape,
                        codes: view.data().to_vec(),
                    };
                    store.fp8.insert(name.to_owned(), t).is_none()
                } else if name.ends_with("_scale") {
                    let v = to_f32(name, view.dtype(), view.data())?;
                    store.scales.insert(name.to_owned(), (shape, v)).is_none()
                } else {
                    let t = HostTensor {
                        shape,
                        data: to_bf16(name, view.dtype(), view.data())?,
                    };
                    store.tensors.insert(name.to_owned(), t).is_none()
                };
                if !fresh {
                    return Err(ModelError::DuplicateTensor {
                        name: name.to_owned(),
                    });
                }
            }
        }
        Ok(store)
    }

    pub fn from_tensors(tensors: HashMap<String, HostTensor>) -> Self {
        Self {
            tensors,
            ..Self::default()
        }
    }

    /// Adds an F8_E4M3 tensor and its scale (tests: checkpoints as llm-compressor writes them).
    pub fn insert_fp8(&mut self, name: &str, t: HostFp8, scale_shape: Vec<usize>, scale: Vec<f32>) {
        self.fp8.insert(name.to_owned(), t);
        self.scales
            .insert(format!("{name}_scale"), (scale_shape, scale));
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.fp8.contains_key(name)
    }

    /// Whether the checkpoint carries FP8 weights (then the backend runs the FP8 path whatever
    /// `--quantization` says, as vLLM does for a checkpoint's `quantization_config`).
    pub fn has_fp8(&self) -> bool {
        !self.fp8.is_empty()
    }

    /// Every F8_E4M3 tensor must be a projection the FP8 path takes; anything else (an FP8
    /// embedding or norm) is refused up front rather than silently ignored.
    pub fn check_fp8_names(&self) -> Result<(), Fp8Error> {
        let mut names: Vec<&String> = self.fp8.keys().collect();
        names.sort();
        match names
            .into_iter()
            .find(|n| !(n.ends_with("_proj.weight") || n.as_str() == "lm_head.weight"))
        {
            Some(n) => Err(Fp8Error::Unexpected { name: n.clone() }),
            None => Ok(()),
        }
    }

    /// Removes the projection `name` (`[rows, cols]`) in FP8: the checkpoint's codes and
    /// scales (per-tensor scales broadcast to every row), or the bf16 tensor quantized per
    /// channel. NaN codes and non-positive scales are load errors.
    pub fn take_fp8(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Fp8Matrix, Fp8Error> {
        let Some(t) = self.fp8.remove(name) else {
            let bits = self.take(name, &[rows, cols])?;
            return Ok(fp8::quantize_rows(&bits, rows, cols));
        };
        if t.shape != [rows, cols] {
            return Err(Fp8Error::Shape {
                name: name.to_owned(),
                expected: vec![rows, cols],
                found: t.shape,
            });
        }
        let (sshape, svals) = self
            .scales
            .remove(&format!("{name}_scale"))
            .ok_or_else(|| Fp8Error::MissingScale {
                name: name.to_owned(),
            })?;
        let scales = match sshape.as_slice() {
            [] | [1] | [1, 1] if svals.len() == 1 => vec![svals[0]; rows],
            [r] | [r, 1] if *r == rows && svals.len() == rows => svals,
            _ => {
                return Err(Fp8Error::ScaleShape {
                    name: name.to_owned(),
                    found: sshape,
                    rows,
                })
            }
        };
        if let Some(&value) = scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(Fp8Error::BadScale {
                name: name.to_owned(),
                value,
            });
        }
        if let Some((index, &code)) = t.codes.iter().enumerate().find(|(_, &c)| fp8::is_nan(c)) {
            return Err(Fp8Error::NanCode {
                name: name.to_owned(),
                index,
                code,
            });
        }
        // A static-activation checkpoint's input scale has no use in weight-only FP8.
        if self
            .scales
            .remove(&format!("{}input_scale", name.trim_end_matches("weight")))
            .is_some()
        {
            tracing::debug!(%name, "ignoring input_scale (weight-only FP8)");
        }
        Ok(Fp8Matrix {
            rows,
            cols,
            codes: t.codes,
            scales,
        })
    }

    /// Removes `name`, checking its shape.
    pub fn take(&mut self, name: &str, expected: &[usize]) -> Result<Vec<u16>, ModelError> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        if t.shape != expected {
            return Err(ModelError::ShapeMismatch {
                name: name.to_owned(),
                expected: expected.to_vec(),
                found: t.shape,
            });
        }
        Ok(t.data)
    }
}

/// Random bf16 weights for a model shape (uniform, `1/sqrt(fan_in)` scale, norms at 1), for
/// benchmarks of real model shapes without a checkpoint. Deterministic in `seed`.
pub fn random_store(cfg: &ModelConfig, seed: u64) -> Bf16Store {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // SplitMix64: fast enough to fill 7.6 B weights in seconds.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut uniform = |shape: &[usize], scale: f32| HostTensor {
        shape: shape.to_vec(),
        data: (0..shape.iter().product::<usize>())
            .map(|_| {
                let u = (next() >> 40) as f32 / (1u64 << 24) as f32;
                half::bf16::from_f32((2.0 * u - 1.0) * scale).to_bits()
            })
            .collect(),
    };
    let ones = |n: usize| HostTensor {
        shape: vec![n],
        data: vec![half::bf16::ONE.to_bits(); n],
    };
    let (h, inter, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let d = cfg.head_dim();
    let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let s = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    let mut t = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".to_owned(),
        uniform(&[v, h], 1.0),
    );
    for i in 0..cfg.num_hidden_layers {
        let p = |n: &str| format!("model.layers.{i}.{n}");
        t.insert(p("input_layernorm.weight"), ones(h));
        t.insert(p("post_attention_layernorm.weight"), ones(h));
        t.insert(p("self_attn.q_proj.weight"), uniform(&[q, h], s(h)));
        t.insert(p("self_attn.k_proj.weight"), uniform(&[kv, h], s(h)));
        t.insert(p("self_attn.v_proj.weight"), uniform(&[kv, h], s(h)));
        t.insert(p("self_attn.q_proj.bias"), uniform(&[q], 0.1));
        t.insert(p("self_attn.k_proj.bias"), uniform(&[kv], 0.1));
        t.insert(p("self_attn.v_proj.bias"), uniform(&[kv], 0.1));
        t.insert(p("self_attn.o_proj.weight"), uniform(&[h, q], s(q)));
        t.insert(p("mlp.gate_proj.weight"), uniform(&[inter, h], s(h)));
        t.insert(p("mlp.up_proj.weight"), uniform(&[inter, h], s(h)));
        t.insert(p("mlp.down_proj.weight"), uniform(&[h, inter], s(inter)));
    }
    t.insert("model.norm.weight".to_owned(), ones(h));
    if !cfg.tie_word_embeddings {
        t.insert("lm_head.weight".to_owned(), uniform(&[v, h], s(h)));
    }
    Bf16Store::from_tensors(t)
}

/// One decoder layer, fused and ready to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLayer {
    pub input_norm: Vec<u16>,
    /// `[(heads + 2 kv_heads) · head_size, hidden]`.
    pub qkv: Vec<u16>,
    pub qkv_bias: Vec<u16>,
    pub o_proj: Vec<u16>,
    pub post_norm: Vec<u16>,
    /// `[2 · intermediate, hidden]`: gate rows then up rows.
    pub gate_up: Vec<u16>,
    pub down: Vec<u16>,
}

/// Takes layer `i` out of the store in the fused layout.
pub fn take_layer(
    store: &mut Bf16Store,
    cfg: &ModelConfig,
    i: usize,
) -> Result<HostLayer, ModelError> {
    let h = cfg.hidden_size;
    let d = cfg.head_dim();
    let q_out = cfg.num_attention_heads * d;
    let kv_out = cfg.num_key_value_heads * d;
    let inter = cfg.intermediate_size;
    let p = |s: &str| format!("model.layers.{i}.{s}");
    let mut qkv = store.take(&p("self_attn.q_proj.weight"), &[q_out, h])?;
    qkv.extend(store.take(&p("self_attn.k_proj.weight"), &[kv_out, h])?);
    qkv.extend(store.take(&p("self_attn.v_proj.weight"), &[kv_out, h])?);
    let mut qkv_bias = store.take(&p("self_attn.q_proj.bias"), &[q_out])?;
    qkv_bias.extend(store.take(&p("self_attn.k_proj.bias"), &[kv_out])?);
    qkv_bias.extend(store.take(&p("self_attn.v_proj.bias"), &[kv_out])?);
    let mut gate_up = store.take(&p("mlp.gate_proj.weight"), &[inter, h])?;
    gate_up.extend(store.take(&p("mlp.up_proj.weight"), &[inter, h])?);
    Ok(HostLayer {
        input_norm: store.take(&p("input_layernorm.weight"), &[h])?,
        qkv,
        qkv_bias,
        o_proj: store.take(&p("self_attn.o_proj.weight"), &[h, q_out])?,
        post_norm: store.take(&p("post_attention_layernorm.weight"), &[h])?,
        gate_up,
        down: store.take(&p("mlp.down_proj.weight"), &[h, inter])?,
    })
}

/// One decoder layer with FP8 projections, fused and ready to upload.
#[derive(Debug, Clone, PartialEq)]
pub struct HostLayerFp8 {
    pub input_norm: Vec<u16>,
    /// `[(heads + 2 kv_heads) · head_size, hidden]`.
    pub qkv: Fp8Matrix,
    pub qkv_bias: Vec<u16>,
    pub o_proj: Fp8Matrix,
    pub post_norm: Vec<u16>,
    /// `[2 · intermediate, hidden]`: gate rows then up rows.
    pub gate_up: Fp8Matrix,
    pub down: Fp8Matrix,
}

/// Takes layer `i` out of the store with FP8 projections (per-channel scales stack with their
/// rows, so the fused QKV and gate/up keep each source tensor's own scales).
pub fn take_layer_fp8(
    store: &mut Bf16Store,
    cfg: &ModelConfig,
    i: usize,
) -> Result<HostLayerFp8, Fp8Error> {
    let h = cfg.hidden_size;
    let d = cfg.head_dim();
    let q_out = cfg.num_attention_heads * d;
    let kv_out = cfg.num_key_value_heads * d;
    let inter = cfg.intermediate_size;
    let p = |s: &str| format!("model.layers.{i}.{s}");
    let stack = |mut a: Fp8Matrix, b: Fp8Matrix| -> Result<Fp8Matrix, Fp8Error> {
        a.stack(b).map_err(|reason| {
            Fp8Error::Model(ModelError::Safetensors {
                path: std::path::PathBuf::from(format!("layer {i}")),
                reason,
            })
        })?;
        Ok(a)
    };
    let qkv = store.take_fp8(&p("self_attn.q_proj.weight"), q_out, h)?;
    let qkv = stack(
        qkv,
        store.take_fp8(&p("self_attn.k_proj.weight"), kv_out, h)?,
    )?;
    let qkv = stack(
        qkv,
        store.take_fp8(&p("self_attn.v_proj.weight"), kv_out, h)?,
    )?;
    let mut qkv_bias = store.take(&p("self_attn.q_proj.bias"), &[q_out])?;
    qkv_bias.extend(store.take(&p("self_attn.k_proj.bias"), &[kv_out])?);
    qkv_bias.extend(store.take(&p("self_attn.v_proj.bias"), &[kv_out])?);
    let gate_up = store.take_fp8(&p("mlp.gate_proj.weight"), inter, h)?;
    let gate_up = stack(gate_up, store.take_fp8(&p("mlp.up_proj.weight"), inter, h)?)?;
    Ok(HostLayerFp8 {
        input_norm: store.take(&p("input_layernorm.weight"), &[h])?,
        qkv,
        qkv_bias,
        o_proj: store.take_fp8(&p("self_attn.o_proj.weight"), h, q_out)?,
        post_norm: store.take(&p("post_attention_layernorm.weight"), &[h])?,
        gate_up,
        down: store.take_fp8(&p("mlp.down_proj.weight"), h, inter)?,
    })
}

/// RoPE table `[max_position, head_size / 2, 2]` of (cos, sin), computed in f64 like the CPU
/// backend so long positions keep their accuracy.
pub fn rope_table(head_size: usize, theta: f64, max_position: usize) -> Vec<f32> {
    let half = head_size / 2;
    let inv: Vec<f64> = (0..half)
        .map(|i| theta.powf(-((2 * i) as f64) / head_size as f64))
        .collect();
    let mut out = Vec::with_capacity(max_position * head_size);
    for p in 0..max_position {
        for f in &inv {
            let (s, c) = (p as f64 * f).sin_cos();
            out.push(c as f32);
            out.push(s as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_to_bf16_bits() {
        let f32s: Vec<u8> = [1.0f32, -2.5, 1.0 + 1.0 / 256.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        // 1 + 2^-8 is a tie between 1.0 and 1 + 2^-7: rounds to even (1.0).
        assert_eq!(
            to_bf16("w", Dtype::F32, &f32s).unwrap(),
            vec![0x3f80, 0xc020, 0x3f80]
        );
        let f16s: Vec<u8> = [half::f16::from_f32(0.5), half::f16::from_f32(-3.0)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            to_bf16("w", Dtype::F16, &f16s).unwrap(),
            vec![0x3f00, 0xc040]
        );
        assert_eq!(
            to_bf16("w", Dtype::BF16, &[0x80, 0x3f]).unwrap(),
            vec![0x3f80]
        );
        assert!(matches!(
            to_bf16("w", Dtype::I64, &[0; 8]),
            Err(ModelError::UnsupportedDtype { .. })
        ));
    }

    #[test]
    fn rope_table_matches_definition() {
        let t = rope_table(4, 10_000.0, 3);
        assert_eq!(t.len(), 3 * 4);
        assert_eq!(&t[0..4], &[1.0, 0.0, 1.0, 0.0]);
        // position 2, frequency 0 (θ^0 = 1): angle 2; frequency 1: 2 / 100.
        assert_eq!(t[8], 2f64.cos() as f32);
        assert_eq!(t[9], 2f64.sin() as f32);
        assert_eq!(t[11], 0.02f64.sin() as f32);
    }

    #[test]
    fn random_store_has_every_tensor_of_the_shape() {
        use crate::serve::model::testing::{config_json, TinyQwen2};
        let spec = TinyQwen2 {
            hidden: 128,
            heads: 2,
            kv_heads: 1,
            ..TinyQwen2::default()
        };
        let cfg = ModelConfig::from_json(&config_json(&spec)).unwrap();
        let mut store = random_store(&cfg, 7);
        for i in 0..cfg.num_hidden_layers {
            let l = take_layer(&mut store, &cfg, i).unwrap();
            assert_eq!(l.qkv.len(), (2 + 2) * 64 * 128);
            assert_eq!(l.input_norm, vec![0x3f80; 128]);
        }
        let emb = store
            .take("model.embed_tokens.weight", &[300, 128])
            .unwrap();
        assert_eq!(
            emb,
            random_store(&cfg, 7)
                .take("model.embed_tokens.weight", &[300, 128])
                .unwrap()
        );
        assert!(store.take("lm_head.weight", &[300, 128]).is_ok());
        assert!(store.take("model.norm.weight", &[128]).is_ok());
    }

    #[test]
    fn fuses_a_tiny_layer() {
        use crate::serve::model::testing::{config_json, tiny_qwen2_tensors, TinyQwen2};
        let spec = TinyQwen2::default();
        let cfg = ModelConfig::from_json(&config_json(&spec)).unwrap();
        let tensors: HashMap<String, HostTensor> = tiny_qwen2_tensors(&spec)
            .into_iter()
            .map(|(name, shape, values)| {
                let data = values
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect();
                (name, HostTensor { shape, data })
            })
            .collect();
        let mut store = Bf16Store::from_tensors(tensors.clone());
        let layer = take_layer(&mut store, &cfg, 0).unwrap();
        let d = cfg.head_dim();
        let width = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d;
        assert_eq!(layer.qkv.len(), width * cfg.hidden_size);
        assert_eq!(layer.qkv_bias.len(), width);
        let q = &tensors["model.layers.0.self_attn.q_proj.weight"].data;
        let v = &tensors["model.layers.0.self_attn.v_proj.weight"].data;
        assert_eq!(&layer.qkv[..q.len()], &q[..]);
        assert_eq!(&layer.qkv[layer.qkv.len() - v.len()..], &v[..]);
        let up = &tensors["model.layers.0.mlp.up_proj.weight"].data;
        assert_eq!(&layer.gate_up[layer.gate_up.len() - up.len()..], &up[..]);
        assert!(!store.contains("model.layers.0.mlp.down_proj.weight"));
        assert!(matches!(
            take_layer(&mut store, &cfg, 0),
            Err(ModelError::MissingTensor(_))
        ));
    }

    /// Edits one tensor (name, bytes, shape, dtype) before it is written.
    type Edit<'a> = &'a dyn Fn(&str, &mut Vec<u8>, &mut Vec<usize>, &mut Dtype);

    /// A tiny Qwen2 checkpoint written the way llm-compressor's FP8 schemes write one: every
    /// `*_proj.weight` as F8_E4M3 with a `weight_scale` (per-channel `[rows, 1]` bf16, except
    /// q_proj per-tensor `[1]` f32 and k_proj per-channel `[rows]`), plus an `input_scale` on
    /// v_proj; lm_head, norms, biases and the embedding in bf16.
    fn write_fp8_checkpoint(
        dir: &Path,
        edit: impl Fn(&str, &mut Vec<u8>, &mut Vec<usize>, &mut Dtype),
    ) -> (ModelConfig, HashMap<String, Fp8Matrix>) {
        use crate::serve::model::testing::{config_json, tiny_qwen2_tensors, TinyQwen2};
        let spec = TinyQwen2::default();
        let cfg = ModelConfig::from_json(&config_json(&spec)).unwrap();
        let mut files: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut want = HashMap::new();
        for (name, shape, values) in tiny_qwen2_tensors(&spec) {
            let bits: Vec<u16> = values
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            if !name.ends_with("_proj.weight") {
                let bytes = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
                files.push((name, Dtype::BF16, shape, bytes));
                continue;
            }
            let (rows, cols) = (shape[0], shape[1]);
            let mut q = fp8::quantize_rows(&bits, rows, cols);
            let (mut sshape, mut sdtype, mut sbytes): (Vec<usize>, Dtype, Vec<u8>);
            if name.contains("q_proj") {
                // Per-tensor: one f32 scale for the whole matrix (requantize to it).
                let s = q.scales.iter().copied().fold(0f32, f32::max);
                let f: Vec<f32> = bits
                    .iter()
                    .map(|&b| half::bf16::from_bits(b).to_f32())
                    .collect();
                q.codes = f.iter().map(|&v| fp8::encode(v / s)).collect();
                q.scales = vec![s; rows];
                (sshape, sdtype, sbytes) = (vec![1], Dtype::F32, s.to_le_bytes().to_vec());
            } else {
                // Per-channel bf16 scales, as llm-compressor saves them.
                for s in &mut q.scales {
                    *s = half::bf16::from_f32(*s).to_f32();
                }
                sshape = if name.contains("k_proj") {
                    vec![rows]
                } else {
                    vec![rows, 1]
                };
                sdtype = Dtype::BF16;
                sbytes = q
                    .scales
                    .iter()
                    .flat_map(|s| half::bf16::from_f32(*s).to_bits().to_le_bytes())
                    .collect();
            }
            let mut codes = q.codes.clone();
            let mut cshape = shape.clone();
            let mut cd = Dtype::F8_E4M3;
            edit(&name, &mut codes, &mut cshape, &mut cd);
            edit(
                &format!("{name}_scale"),
                &mut sbytes,
                &mut sshape,
                &mut sdtype,
            );
            files.push((name.clone(), cd, cshape, codes));
            if !sbytes.is_empty() {
                files.push((format!("{name}_scale"), sdtype, sshape, sbytes));
            }
            if name.contains("v_proj") {
                files.push((
                    name.replace("weight", "input_scale"),
                    Dtype::F32,
                    vec![1],
                    0.5f32.to_le_bytes().to_vec(),
                ));
            }
            want.insert(name, q);
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = files
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        (cfg, want)
    }

    #[test]
    fn loads_an_llm_compressor_fp8_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, want) = write_fp8_checkpoint(dir.path(), |_, _, _, _| {});
        let mut store = Bf16Store::load(dir.path()).unwrap();
        assert!(store.has_fp8());
        store.check_fp8_names().unwrap();
        for i in 0..cfg.num_hidden_layers {
            let l = take_layer_fp8(&mut store, &cfg, i).unwrap();
            let w = |n: &str| &want[&format!("model.layers.{i}.{n}")];
            let (q, k, v) = (
                w("self_attn.q_proj.weight"),
                w("self_attn.k_proj.weight"),
                w("self_attn.v_proj.weight"),
            );
            assert_eq!(l.qkv.rows, q.rows + k.rows + v.rows);
            assert_eq!(l.qkv.codes, [&q.codes[..], &k.codes, &v.codes].concat());
            // The per-tensor q scale is broadcast; k and v keep their own channel scales.
            assert_eq!(l.qkv.scales, [&q.scales[..], &k.scales, &v.scales].concat());
            assert!(l.qkv.scales[..q.rows].iter().all(|&s| s == q.scales[0]));
            let (g, u) = (w("mlp.gate_proj.weight"), w("mlp.up_proj.weight"));
            assert_eq!(l.gate_up.codes, [&g.codes[..], &u.codes].concat());
            assert_eq!(l.down, *w("mlp.down_proj.weight"));
            assert_eq!(l.o_proj, *w("self_attn.o_proj.weight"));
            // The FP8 weights are the bf16 ones within half an E4M3 ulp.
            assert_eq!(l.input_norm.len(), cfg.hidden_size);
        }
        // The bf16 lm_head of an FP8 checkpoint is quantized at load.
        let head = store
            .take_fp8("lm_head.weight", cfg.vocab_size, cfg.hidden_size)
            .unwrap();
        assert_eq!(head.scales.len(), cfg.vocab_size);
    }

    #[test]
    fn malformed_fp8_checkpoints_are_clear_load_errors() {
        let err = |edit: Edit<'_>| {
            let dir = tempfile::tempdir().unwrap();
            let (cfg, _) = write_fp8_checkpoint(dir.path(), edit);
            let mut store = Bf16Store::load(dir.path()).unwrap();
            take_layer_fp8(&mut store, &cfg, 0).unwrap_err()
        };
        let o = "model.layers.0.self_attn.o_proj.weight";
        // No weight_scale.
        let e = err(&|n, b, _, _| {
            if n == format!("{o}_scale") {
                b.clear();
            }
        });
        assert!(
            matches!(&e, Fp8Error::MissingScale { name } if name == o),
            "{e}"
        );
        assert!(e.to_string().contains("o_proj.weight_scale"), "{e}");
        // Block-wise scales ([rows / 16, cols / 16]).
        let e = err(&|n, b, s, _| {
            if n == format!("{o}_scale") {
                *s = vec![s[0] / 16, 4];
                b.truncate(2 * s[0] * 4);
            }
        });
        assert!(
            matches!(&e, Fp8Error::ScaleShape { name, .. } if name == o),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("block-wise scales are not supported"),
            "{e}"
        );
        // A NaN code (0x7F) in the weight.
        let e = err(&|n, b, _, _| {
            if n == o {
                b[5] = 0x7F;
            }
        });
        assert!(
            matches!(&e, Fp8Error::NanCode { name, index: 5, code: 0x7F } if name == o),
            "{e}"
        );
        // A zero scale.
        let e = err(&|n, b, _, _| {
            if n == format!("{o}_scale") {
                b[0] = 0;
                b[1] = 0;
            }
        });
        assert!(
            matches!(e, Fp8Error::BadScale { value, .. } if value == 0.0),
            "{e}"
        );
        // Wrong shape.
        let e = err(&|n, _, s, _| {
            if n == o {
                s.swap(0, 1);
                s[0] *= 2;
                s[1] /= 2;
            }
        });
        assert!(matches!(e, Fp8Error::Shape { .. }), "{e}");
        // An F8_E5M2 weight is an unsupported dtype at load.
        let dir = tempfile::tempdir().unwrap();
        write_fp8_checkpoint(dir.path(), |n, _, _, d| {
            if n == o {
                *d = Dtype::F8_E5M2;
            }
        });
        assert!(matches!(
            Bf16Store::load(dir.path()),
            Err(ModelError::UnsupportedDtype { name, .. }) if name == o
        ));
        // An FP8 embedding is refused by name.
        let mut store = Bf16Store::default();
        store.insert_fp8(
            "model.embed_tokens.weight",
            HostFp8 {
                shape: vec![1, 16],
                codes: vec![0; 16],
            },
            vec![1],
            vec![1.0],
        );
        assert!(matches!(
            store.check_fp8_names(),
            Err(Fp8Error::Unexpected { name }) if name == "model.embed_tokens.weight"
        ));
    }
}
