//! Tiny random Qwen2 checkpoints (config, safetensors, byte-level BPE tokenizer) for tests and
//! benches. Deterministic for a given seed on every platform (SplitMix64, no `rand` algorithm
//! that could change between versions).

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use safetensors::Dtype;
use serde_json::{json, Value};

use super::gguf::{self, writer::GgufWriter, GgmlType, Value as GValue};
use super::qwen2::Qwen2Weights;
use super::weights::{Tensor, WeightStore};
use super::ModelConfig;

/// `(name, shape, row-major values)` of one tensor.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Storage dtype of the written safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyDtype {
    F32,
    BF16,
    F16,
}

/// Shape and format of a tiny model. `Default` is the model `write_tiny_qwen2` writes.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyQwen2 {
    pub seed: u64,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    /// `config.json` vocab size; the tokenizer uses fewer ids (like Qwen's padded vocab).
    pub vocab: usize,
    pub tied: bool,
    pub dtype: TinyDtype,
    /// 1: `model.safetensors`; more: shards plus `model.safetensors.index.json`.
    pub shards: usize,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// Write `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`.
    pub tokenizer: bool,
    /// Put [`TINY_CHAT_TEMPLATE`] in `tokenizer_config.json` (else the codec falls back to ChatML).
    pub chat_template: bool,
}

impl Default for TinyQwen2 {
    fn default() -> Self {
        TinyQwen2 {
            seed: 0,
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            intermediate: 128,
            vocab: 300,
            tied: false,
            dtype: TinyDtype::F32,
            shards: 1,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 2048,
            tokenizer: true,
            chat_template: true,
        }
    }
}

/// A Qwen2.5-style template with its own default system prompt.
pub const TINY_CHAT_TEMPLATE: &str = "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n{%- else %}\n    {{- '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}\n{%- endif %}\n{%- for message in messages %}\n    {%- if not (message.role == 'system' and loop.first) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

/// A Hermes-style template that renders tools the way Qwen2.5's does (tool list as JSON lines in
/// the system turn, assistant calls as `<tool_call>` blocks, tool results as `<tool_response>`
/// in a user turn). Written for these tests; swap it in with [`set_chat_template`].
pub const TINY_TOOL_CHAT_TEMPLATE: &str = "{%- if tools %}\n{{- '<|im_start|>system\\n# Tools\\n<tools>' }}\n{%- for tool in tools %}\n{{- '\\n' }}{{- tool | tojson }}\n{%- endfor %}\n{{- '\\n</tools><|im_end|>\\n' }}\n{%- endif %}\n{%- for m in messages %}\n{%- if m.role == 'assistant' and m.tool_calls %}\n{{- '<|im_start|>assistant' }}\n{%- if m.content %}{{- '\\n' + m.content }}{%- endif %}\n{%- for tc in m.tool_calls %}\n{{- '\\n<tool_call>\\n{\"name\": \"' + tc.function.name + '\", \"arguments\": ' }}{{- tc.function.arguments | tojson }}{{- '}\\n</tool_call>' }}\n{%- endfor %}\n{{- '<|im_end|>\\n' }}\n{%- elif m.role == 'tool' %}\n{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}\n{%- else %}\n{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}\n{%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n{{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

/// Replaces the `chat_template` of a tiny model written into `dir`.
pub fn set_chat_template(dir: &Path, template: &str) -> anyhow::Result<()> {
    let path = dir.join("tokenizer_config.json");
    let mut tc: Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    tc["chat_template"] = Value::String(template.to_string());
    write_json(&path, &tc)
}

/// Merges of the tiny tokenizer, in rank order (byte-level alphabet: `Ġ` is a space).
pub const TINY_MERGES: [(&str, &str); 12] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġ", "a"),
    ("i", "n"),
    ("Ġt", "he"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "w"),
    ("l", "l"),
    ("H", "e"),
    ("He", "ll"),
    ("Hell", "o"),
];

/// Special tokens of the tiny tokenizer, ids right after the merges (256 + 12 = 268..).
pub const TINY_SPECIAL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Writes the default tiny random Qwen2 model (2 layers, hidden 64, 4 heads, 2 KV heads,
/// vocab 300, untied, f32, single file, with tokenizer) into `dir`.
pub fn write_tiny_qwen2(dir: &Path, seed: u64) -> anyhow::Result<()> {
    write_tiny_qwen2_with(
        dir,
        &TinyQwen2 {
            seed,
            ..TinyQwen2::default()
        },
    )
}

/// Writes a tiny model as `spec` describes.
pub fn write_tiny_qwen2_with(dir: &Path, spec: &TinyQwen2) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_json(&dir.join("config.json"), &config_json(spec))?;
    let tensors = tiny_qwen2_tensors(spec);
    if spec.shards <= 1 {
        write_safetensors(&dir.join("model.safetensors"), &tensors, spec.dtype)?;
    } else {
        let mut weight_map = serde_json::Map::new();
        let mut total = 0usize;
        for shard in 0..spec.shards {
            let file = format!("model-{:05}-of-{:05}.safetensors", shard + 1, spec.shards);
            let part: Vec<_> = tensors
                .iter()
                .enumerate()
                .filter(|(i, _)| i % spec.shards == shard)
                .map(|(_, t)| t.clone())
                .collect();
            for (name, _, data) in &part {
                weight_map.insert(name.clone(), Value::String(file.clone()));
                total += data.len() * dtype_size(spec.dtype);
            }
            write_safetensors(&dir.join(&file), &part, spec.dtype)?;
        }
        write_json(
            &dir.join("model.safetensors.index.json"),
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }
    if spec.tokenizer {
        write_json(&dir.join("tokenizer.json"), &tiny_tokenizer_json())?;
        let mut tc = json!({
            "add_bos_token": false,
            "bos_token": null,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "Qwen2Tokenizer",
        });
        if spec.chat_template {
            tc["chat_template"] = Value::String(TINY_CHAT_TEMPLATE.to_string());
        }
        write_json(&dir.join("tokenizer_config.json"), &tc)?;
        let eos: Vec<u32> = vec![
            tiny_special_id("<|im_end|>"),
            tiny_special_id("<|endoftext|>"),
        ];
        write_json(
            &dir.join("generation_config.json"),
            &json!({"eos_token_id": eos, "bos_token_id": tiny_special_id("<|endoftext|>")}),
        )?;
    }
    Ok(())
}

/// `config.json` of `spec`, as Hugging Face writes it for Qwen2.
pub fn config_json(spec: &TinyQwen2) -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "num_hidden_layers": spec.layers,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": 1e-6,
        "vocab_size": spec.vocab,
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": spec.tied,
        "rope_scaling": null,
        "use_sliding_window": false,
        "torch_dtype": match spec.dtype { TinyDtype::F32 => "float32", TinyDtype::BF16 => "bfloat16", TinyDtype::F16 => "float16" },
    })
}

/// Every tensor of the model as `(name, shape, values)`, values already rounded to
/// `spec.dtype` so a reader of the file sees exactly these numbers.
pub fn tiny_qwen2_tensors(spec: &TinyQwen2) -> Vec<NamedTensor> {
    let mut rng = SplitMix64(spec.seed ^ 0x5157_454e_3221_0001);
    let (h, i, v) = (spec.hidden, spec.intermediate, spec.vocab);
    let head = h / spec.heads.max(1);
    let q_out = spec.heads * head;
    let kv_out = spec.kv_heads * head;
    // Uniform init with a 1/sqrt(fan_in) scale keeps activations O(1) through the layers,
    // so logits differ meaningfully between tokens (a test of the whole pipeline).
    let lin = |rng: &mut SplitMix64, out: usize, inp: usize| {
        let a = (3.0 / inp as f64).sqrt() as f32;
        rng.uniform_vec(out * inp, a)
    };
    let mut t: Vec<NamedTensor> = Vec::new();
    t.push((
        "model.embed_tokens.weight".into(),
        vec![v, h],
        rng.uniform_vec(v * h, 1.0),
    ));
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        let norm = |rng: &mut SplitMix64| rng.uniform_vec(h, 0.2).iter().map(|x| 1.0 + x).collect();
        t.push((
            format!("{p}.input_layernorm.weight"),
            vec![h],
            norm(&mut rng),
        ));
        t.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![q_out, h],
            lin(&mut rng, q_out, h),
        ));
        t.push((
            format!("{p}.self_attn.q_proj.bias"),
            vec![q_out],
            rng.uniform_vec(q_out, 0.1),
        ));
        t.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv_out, h],
            lin(&mut rng, kv_out, h),
        ));
        t.push((
            format!("{p}.self_attn.k_proj.bias"),
            vec![kv_out],
            rng.uniform_vec(kv_out, 0.1),
        ));
        t.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv_out, h],
            lin(&mut rng, kv_out, h),
        ));
        t.push((
            format!("{p}.self_attn.v_proj.bias"),
            vec![kv_out],
            rng.uniform_vec(kv_out, 0.1),
        ));
        t.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, q_out],
            lin(&mut rng, h, q_out),
        ));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            norm(&mut rng),
        ));
        t.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![i, h],
            lin(&mut rng, i, h),
        ));
        t.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![i, h],
            lin(&mut rng, i, h),
        ));
        t.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![h, i],
            lin(&mut rng, h, i),
        ));
    }
    let norm: Vec<f32> = rng.uniform_vec(h, 0.2).iter().map(|x| 1.0 + x).collect();
    t.push(("model.norm.weight".into(), vec![h], norm));
    if !spec.tied {
        t.push(("lm_head.weight".into(), vec![v, h], lin(&mut rng, v, h)));
    }
    for (_, _, data) in &mut t {
        round_to(data, spec.dtype);
    }
    t
}

/// The model of `spec` in memory, without touching the disk (benches).
pub fn tiny_qwen2_in_memory(spec: &TinyQwen2) -> anyhow::Result<(ModelConfig, Qwen2Weights)> {
    let cfg = ModelConfig::from_json(&config_json(spec))?;
    let map: HashMap<String, Tensor> = tiny_qwen2_tensors(spec)
        .into_iter()
        .map(|(name, shape, data)| (name, Tensor { shape, data }))
        .collect();
    let weights = Qwen2Weights::from_store(&mut WeightStore::from_tensors(map), &cfg)?;
    Ok((cfg, weights))
}

/// Writes `tensors` as one safetensors file in `dtype`.
pub fn write_safetensors(
    path: &Path,
    tensors: &[NamedTensor],
    dtype: TinyDtype,
) -> anyhow::Result<()> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, data)| (name.clone(), shape.clone(), encode(data, dtype)))
        .collect();
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(st_dtype(dtype), shape.clone(), bytes)?;
            Ok((name.as_str(), view))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A byte-level BPE `tokenizer.json` in Qwen's format (NFC normaliser, Qwen's split regex, byte
/// level pre-tokenizer/decoder): ids 0..256 are the bytes, then [`TINY_MERGES`], then
/// [`TINY_SPECIAL`].
pub fn tiny_tokenizer_json() -> Value {
    let chars = byte_level_chars();
    let mut vocab = serde_json::Map::new();
    for (b, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    for (k, (a, b)) in TINY_MERGES.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), json!(256 + k));
    }
    let added: Vec<Value> = TINY_SPECIAL
        .iter()
        .map(|s| {
            json!({"id": tiny_special_id(s), "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_SPLIT_REGEX}, "behavior": "Isolated", "invert": false},
            byte_level,
        ]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab,
            "merges": TINY_MERGES.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>(),
        },
    })
}

/// Id of a [`TINY_SPECIAL`] token (`u32::MAX` for anything else).
pub fn tiny_special_id(token: &str) -> u32 {
    TINY_SPECIAL
        .iter()
        .position(|s| *s == token)
        .map_or(u32::MAX, |p| (256 + TINY_MERGES.len() + p) as u32)
}

/// The pre-tokenizer split pattern of Qwen2/Qwen2.5/Qwen3 `tokenizer.json`.
const QWEN_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-2's byte → printable character table used by byte-level BPE.
fn byte_level_chars() -> Vec<char> {
    let mut out = vec!['\0'; 256];
    let mut extra = 0u32;
    for (b, slot) in out.iter_mut().enumerate() {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let code = if printable {
            b as u32
        } else {
            extra += 1;
            255 + extra
        };
        *slot = char::from_u32(code).unwrap_or('\u{fffd}');
    }
    out
}

fn write_json(path: &Path, v: &Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn dtype_size(d: TinyDtype) -> usize {
    match d {
        TinyDtype::F32 => 4,
        TinyDtype::BF16 | TinyDtype::F16 => 2,
    }
}

fn st_dtype(d: TinyDtype) -> Dtype {
    match d {
        TinyDtype::F32 => Dtype::F32,
        TinyDtype::BF16 => Dtype::BF16,
        TinyDtype::F16 => Dtype::F16,
    }
}

fn round_to(data: &mut [f32], d: TinyDtype) {
    match d {
        TinyDtype::F32 => {}
        TinyDtype::BF16 => data
            .iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        TinyDtype::F16 => data
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
    }
}

fn encode(data: &[f32], d: TinyDtype) -> Vec<u8> {
    match d {
        TinyDtype::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TinyDtype::BF16 => data
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect(),
        TinyDtype::F16 => data
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
            .collect(),
    }
}

/// SplitMix64: tiny, fast, and fixed forever, so checkpoints are reproducible.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-a, a)`.
    fn uniform_vec(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                (2.0 * u - 1.0) * a
            })
            .collect()
    }
}

/// The tiny model of `spec` as a GGUF file (llama.cpp tensor names and metadata, the tiny
/// tokenizer and template embedded): linear weights and the embedding in `quant` (Q8_0 or Q5_0:
/// the tiny widths are not multiples of the K-quants' 256), norms and biases F32. The vocabulary
/// is padded to `spec.vocab` with `[PADn]` tokens, as Qwen's GGUF files are.
pub fn tiny_qwen2_gguf(spec: &TinyQwen2, quant: GgmlType) -> anyhow::Result<Vec<u8>> {
    let mut w = GgufWriter::new();
    w.kv("general.architecture", GValue::String("qwen2".into()))
        .kv("general.name", GValue::String("tiny".into()))
        .kv("qwen2.block_count", GValue::U32(spec.layers as u32))
        .kv(
            "qwen2.context_length",
            GValue::U32(spec.max_position_embeddings as u32),
        )
        .kv("qwen2.embedding_length", GValue::U32(spec.hidden as u32))
        .kv(
            "qwen2.feed_forward_length",
            GValue::U32(spec.intermediate as u32),
        )
        .kv("qwen2.attention.head_count", GValue::U32(spec.heads as u32))
        .kv(
            "qwen2.attention.head_count_kv",
            GValue::U32(spec.kv_heads as u32),
        )
        .kv("qwen2.rope.freq_base", GValue::F32(spec.rope_theta as f32))
        .kv("qwen2.attention.layer_norm_rms_epsilon", GValue::F32(1e-6))
        .kv("tokenizer.ggml.model", GValue::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", GValue::String("qwen2".into()));
    let chars = byte_level_chars();
    let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    tokens.extend(TINY_MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.extend(TINY_SPECIAL.iter().map(|s| s.to_string()));
    let mut types = vec![1i32; tokens.len()];
    for t in types.iter_mut().skip(256 + TINY_MERGES.len()) {
        *t = 3;
    }
    while tokens.len() < spec.vocab {
        tokens.push(format!("[PAD{}]", tokens.len()));
        types.push(5);
    }
    w.kv("tokenizer.ggml.tokens", gguf::writer::strings(&tokens))
        .kv(
            "tokenizer.ggml.token_type",
            GValue::Array(types.into_iter().map(GValue::I32).collect()),
        )
        .kv(
            "tokenizer.ggml.merges",
            gguf::writer::strings(
                &TINY_MERGES
                    .iter()
                    .map(|(a, b)| format!("{a} {b}"))
                    .collect::<Vec<_>>(),
            ),
        )
        .kv(
            "tokenizer.ggml.eos_token_id",
            GValue::U32(tiny_special_id("<|im_end|>")),
        )
        .kv("tokenizer.ggml.add_bos_token", GValue::Bool(false))
        .kv(
            "tokenizer.chat_template",
            GValue::String(TINY_CHAT_TEMPLATE.into()),
        );
    for (name, shape, data) in tiny_qwen2_tensors(spec) {
        let gname = gguf_tensor_name(&name).with_context(|| format!("no GGUF name for {name}"))?;
        let dims: Vec<u64> = shape.iter().rev().map(|d| *d as u64).collect();
        let ty = if shape.len() == 2 {
            quant
        } else {
            GgmlType::F32
        };
        let bytes = gguf::writer::quantize(ty, &data)
            .with_context(|| format!("{name}: cannot encode {shape:?} as {ty:?}"))?;
        w.tensor(&gname, &dims, ty.id(), bytes);
    }
    Ok(w.to_bytes())
}

/// llama.cpp's name for a Hugging Face Qwen2 tensor name.
fn gguf_tensor_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let g = match name {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}"))
}
