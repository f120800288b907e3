//! `config.json` of a Qwen2-architecture checkpoint (Qwen2, Qwen2.5, Qwen2.5-Coder), validated.

use std::path::Path;

use serde_json::Value;

use super::{read_json, ModelError};

/// The architecture hyper-parameters the forward pass needs, checked for consistency.
///
/// Optional keys take the defaults of Hugging Face's `Qwen2Config` (so a config that loads in
/// `transformers` loads here): `num_key_value_heads` = `num_attention_heads`, `rope_theta`
/// 10000, `rms_norm_eps` 1e-6, `max_position_embeddings` 32768, `tie_word_embeddings` false.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub num_hidden_layers: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn load(dir: &Path) -> Result<ModelConfig, ModelError> {
        let value = read_json(&dir.join("config.json"))?;
        Self::from_json(&value)
    }

    /// Validates an already parsed `config.json`.
    pub fn from_json(v: &Value) -> Result<ModelConfig, ModelError> {
        let model_type = match v.get("model_type") {
            None | Some(Value::Null) => return Err(ModelError::MissingField("model_type")),
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(ModelError::InvalidField {
                    field: "model_type",
                    reason: "expected a string".into(),
                })
            }
        };
        if model_type != "qwen2" {
            return Err(ModelError::UnsupportedModelType(model_type));
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(ModelError::InvalidField {
                    field: "hidden_act",
                    reason: format!("\"{act}\" is not supported (only silu)"),
                });
            }
        }
        // Long-context variants (YaRN) scale RoPE frequencies; computing plain RoPE for them
        // would silently produce wrong logits, so refuse instead.
        if let Some(scaling) = v.get("rope_scaling") {
            if !scaling.is_null() {
                return Err(ModelError::InvalidField {
                    field: "rope_scaling",
                    reason: format!("{scaling} is not supported (only null)"),
                });
            }
        }

        // Sliding-window layers attend to a suffix only; full attention would differ silently.
        if opt_bool(v, "use_sliding_window")? == Some(true) {
            return Err(ModelError::InvalidField {
                field: "use_sliding_window",
                reason: "sliding-window attention is not supported".into(),
            });
        }

        let num_attention_heads = req_usize(v, "num_attention_heads")?;
        let cfg = ModelConfig {
            model_type,
            hidden_size: req_usize(v, "hidden_size")?,
            intermediate_size: req_usize(v, "intermediate_size")?,
            num_attention_heads,
            num_key_value_heads: opt_usize(v, "num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            num_hidden_layers: req_usize(v, "num_hidden_layers")?,
            rope_theta: opt_f64(v, "rope_theta")?.unwrap_or(10000.0),
            rms_norm_eps: opt_f64(v, "rms_norm_eps")?.unwrap_or(1e-6),
            vocab_size: req_usize(v, "vocab_size")?,
            max_position_embeddings: opt_usize(v, "max_position_embeddings")?.unwrap_or(32768),
            tie_word_embeddings: opt_bool(v, "tie_word_embeddings")?.unwrap_or(false),
        };
        cfg.validate()?;
        if let Some(head_dim) = opt_usize(v, "head_dim")? {
            if head_dim != cfg.head_dim() {
                return Err(ModelError::InvalidField {
                    field: "head_dim",
                    reason: format!(
                        "{head_dim} differs from hidden_size / num_attention_heads = {}",
                        cfg.head_dim()
                    ),
                });
            }
        }
        Ok(cfg)
    }

    pub(crate) fn validate(&self) -> Result<(), ModelError> {
        let positive: [(&'static str, usize); 6] = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ModelError::InvalidField {
                    field,
                    reason: "must be greater than 0".into(),
                });
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ModelError::InvalidField {
                field: "hidden_size",
                reason: format!(
                    "{} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            });
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(ModelError::InvalidField {
                field: "num_key_value_heads",
                reason: format!(
                    "num_attention_heads {} is not a multiple of {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            });
        }
        // RoPE rotates pairs of halves, and the paged key layout packs 4 f32 per 16-byte group.
        if !self.head_dim().is_multiple_of(4) {
            return Err(ModelError::InvalidField {
                field: "hidden_size",
                reason: format!("head size {} is not a multiple of 4", self.head_dim()),
            });
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(ModelError::InvalidField {
                field: "rope_theta",
                reason: format!("{} is not a positive number", self.rope_theta),
            });
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(ModelError::InvalidField {
                field: "rms_norm_eps",
                reason: format!("{} is not a non-negative number", self.rms_norm_eps),
            });
        }
        Ok(())
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Query heads sharing one KV head (grouped-query attention).
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

fn req_usize(v: &Value, field: &'static str) -> Result<usize, ModelError> {
    opt_usize(v, field)?.ok_or(ModelError::MissingField(field))
}

fn opt_usize(v: &Value, field: &'static str) -> Result<Option<usize>, ModelError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| ModelError::InvalidField {
                field,
                reason: format!("expected a non-negative integer, found {x}"),
            }),
    }
}

fn opt_f64(v: &Value, field: &'static str) -> Result<Option<f64>, ModelError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| ModelError::InvalidField {
                field,
                reason: format!("expected a number, found {x}"),
            }),
    }
}

fn opt_bool(v: &Value, field: &'static str) -> Result<Option<bool>, ModelError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_bool()
            .map(Some)
            .ok_or_else(|| ModelError::InvalidField {
                field,
                reason: format!("expected true or false, found {x}"),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "vocab_size": 300,
            "max_position_embeddings": 512, "tie_word_embeddings": true,
            "hidden_act": "silu", "rope_scaling": null
        })
    }

    #[test]
    fn parses_qwen2() {
        let c = ModelConfig::from_json(&base()).unwrap();
        assert_eq!(c.head_dim(), 16);
        assert_eq!(c.group_size(), 2);
        assert_eq!(c.rope_theta, 1e6);
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn defaults_follow_transformers() {
        let mut v = base();
        for k in [
            "num_key_value_heads",
            "rope_theta",
            "rms_norm_eps",
            "max_position_embeddings",
            "tie_word_embeddings",
        ] {
            v.as_object_mut().unwrap().remove(k);
        }
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.max_position_embeddings, 32768);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn errors_are_precise() {
        let mut v = base();
        v["model_type"] = json!("llama");
        assert_eq!(
            ModelConfig::from_json(&v).unwrap_err().to_string(),
            "unsupported model_type \"llama\" (supported: qwen2)"
        );
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert_eq!(
            ModelConfig::from_json(&v).unwrap_err().to_string(),
            "config.json: missing field \"hidden_size\""
        );
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        assert_eq!(
            ModelConfig::from_json(&v).unwrap_err().to_string(),
            "config.json: field \"num_key_value_heads\": num_attention_heads 4 is not a multiple of 3"
        );
        let mut v = base();
        v["vocab_size"] = json!("big");
        assert_eq!(
            ModelConfig::from_json(&v).unwrap_err().to_string(),
            "config.json: field \"vocab_size\": expected a non-negative integer, found \"big\""
        );
        let mut v = base();
        v["use_sliding_window"] = json!(true);
        assert_eq!(
            ModelConfig::from_json(&v).unwrap_err().to_string(),
            "config.json: field \"use_sliding_window\": sliding-window attention is not supported"
        );
        let mut v = base();
        v["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        assert!(ModelConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .starts_with("config.json: field \"rope_scaling\""));
    }
}
