//! Host side of weight loading for the CUDA backend: reads the safetensors checkpoint into raw
//! bf16 bits (converting F16/F32, keeping BF16 as is), and builds the fused layouts the
//! forward uses — QKV `[q; k; v]` and gate/up `[gate; up]` stacked along the output dimension —
//! so each is one GEMM. The runtime uploads a layer at a time and drops the host copy.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::serve::model::{ModelConfig, ModelError};

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

/// Every tensor of a checkpoint as bf16, moved out by [`Bf16Store::take`].
#[derive(Debug, Default)]
pub struct Bf16Store {
    tensors: HashMap<String, HostTensor>,
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
                let t = HostTensor {
                    shape: view.shape().to_vec(),
                    data: to_bf16(name, view.dtype(), view.data())?,
                };
                if store.tensors.insert(name.to_owned(), t).is_some() {
                    return Err(ModelError::DuplicateTensor {
                        name: name.to_owned(),
                    });
                }
            }
        }
        Ok(store)
    }

    pub fn from_tensors(tensors: HashMap<String, HostTensor>) -> Self {
        Self { tensors }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
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
}
