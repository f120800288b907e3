//! The `cpu` backend against an independent naive Qwen2 forward pass (full attention over the
//! whole sequence, no paging, f64), and its invariance to chunking, batching and block placement.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use switchyard::serve::backend::cpu::{CpuBackend, CpuOptions};
use switchyard::serve::backend::{Backend, BackendError, SeqSlice, StepBatch, StepOutput};
use switchyard::serve::model::testing::{
    tiny_qwen2_tensors, write_safetensors, write_tiny_qwen2, write_tiny_qwen2_with, NamedTensor,
    TinyDtype, TinyQwen2,
};

const BLOCK: usize = 4;

fn opts() -> CpuOptions {
    CpuOptions {
        block_size: BLOCK,
        kv_cache_memory_bytes: 1 << 20,
        threads: 2,
    }
}

fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + seed * 101 + 5) % 271)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Independent reference: reads the files itself, computes in f64, full causal attention.

struct Naive {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    layers: usize,
    vocab: usize,
    theta: f64,
    eps: f64,
    tied: bool,
    t: HashMap<String, Vec<f64>>,
}

impl Naive {
    fn load(dir: &Path) -> Naive {
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let mut t = HashMap::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "safetensors") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                let d = view.data();
                let vals: Vec<f64> = match view.dtype() {
                    Dtype::F32 => d
                        .chunks(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                        .collect(),
                    Dtype::BF16 => d
                        .chunks(2)
                        .map(|b| half::bf16::from_le_bytes(b.try_into().unwrap()).to_f64())
                        .collect(),
                    Dtype::F16 => d
                        .chunks(2)
                        .map(|b| half::f16::from_le_bytes(b.try_into().unwrap()).to_f64())
                        .collect(),
                    other => panic!("{other:?}"),
                };
                t.insert(name, vals);
            }
        }
        let u = |k: &str| cfg[k].as_u64().unwrap() as usize;
        Naive {
            hidden: u("hidden_size"),
            heads: u("num_attention_heads"),
            kv_heads: u("num_key_value_heads"),
            layers: u("num_hidden_layers"),
            vocab: u("vocab_size"),
            theta: cfg["rope_theta"].as_f64().unwrap(),
            eps: cfg["rms_norm_eps"].as_f64().unwrap(),
            tied: cfg["tie_word_embeddings"].as_bool().unwrap(),
            t,
        }
    }

    fn w(&self, name: &str) -> &[f64] {
        &self.t[name]
    }

    /// `W·x + b` for a PyTorch `[out, in]` weight.
    fn linear(&self, x: &[f64], w: &str, b: Option<&str>) -> Vec<f64> {
        let w = self.w(w);
        let n_in = x.len();
        let n_out = w.len() / n_in;
        (0..n_out)
            .map(|o| {
                let s: f64 = (0..n_in).map(|i| w[o * n_in + i] * x[i]).sum();
                s + b.map_or(0.0, |b| self.w(b)[o])
            })
            .collect()
    }

    fn rms(&self, x: &[f64], w: &str) -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + self.eps).sqrt();
        x.iter().zip(self.w(w)).map(|(v, g)| v * inv * g).collect()
    }

    fn rope(&self, x: &mut [f64], pos: usize, d: usize) {
        let half = d / 2;
        for head in x.chunks_mut(d) {
            for i in 0..half {
                let ang = pos as f64 * self.theta.powf(-2.0 * i as f64 / d as f64);
                let (s, c) = ang.sin_cos();
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * c - b * s;
                head[i + half] = b * c + a * s;
            }
        }
    }

    /// Logits of every position of `tokens`.
    fn logits(&self, tokens: &[u32]) -> Vec<Vec<f64>> {
        let (h, d) = (self.hidden, self.hidden / self.heads);
        let group = self.heads / self.kv_heads;
        let emb = self.w("model.embed_tokens.weight");
        let mut x: Vec<Vec<f64>> = tokens
            .iter()
            .map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec())
            .collect();
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
            for (pos, xt) in x.iter().enumerate() {
                let hn = self.rms(xt, &format!("{p}.input_layernorm.weight"));
                let at = |n: &str| format!("{p}.self_attn.{n}");
                let mut q = self.linear(&hn, &at("q_proj.weight"), Some(&at("q_proj.bias")));
                let mut k = self.linear(&hn, &at("k_proj.weight"), Some(&at("k_proj.bias")));
                let v = self.linear(&hn, &at("v_proj.weight"), Some(&at("v_proj.bias")));
                self.rope(&mut q, pos, d);
                self.rope(&mut k, pos, d);
                qs.push(q);
                ks.push(k);
                vs.push(v);
            }
            for t in 0..x.len() {
                let mut attn = vec![0.0; self.heads * d];
                for hd in 0..self.heads {
                    let kh = hd / group;
                    let q = &qs[t][hd * d..(hd + 1) * d];
                    let scores: Vec<f64> = (0..=t)
                        .map(|s| {
                            let k = &ks[s][kh * d..(kh + 1) * d];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for (s, w) in e.iter().enumerate() {
                        for i in 0..d {
                            attn[hd * d + i] += w / sum * vs[s][kh * d + i];
                        }
                    }
                }
                let o = self.linear(&attn, &format!("{p}.self_attn.o_proj.weight"), None);
                x[t].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                let hn = self.rms(&x[t], &format!("{p}.post_attention_layernorm.weight"));
                let g = self.linear(&hn, &format!("{p}.mlp.gate_proj.weight"), None);
                let u = self.linear(&hn, &format!("{p}.mlp.up_proj.weight"), None);
                let act: Vec<f64> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let down = self.linear(&act, &format!("{p}.mlp.down_proj.weight"), None);
                x[t].iter_mut().zip(&down).for_each(|(a, b)| *a += b);
            }
        }
        let head_w = if self.tied {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        x.iter()
            .map(|xt| {
                let hn = self.rms(xt, "model.norm.weight");
                let out = self.linear(&hn, head_w, None);
                assert_eq!(out.len(), self.vocab);
                out
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Batch building.

/// One sequence's part of a step: its new tokens, how many are cached already, its block table.
struct Part<'a> {
    tokens: &'a [u32],
    context_len: usize,
    table: &'a [u32],
    all_logits: bool,
}

fn batch(parts: &[Part<'_>]) -> StepBatch {
    let mut b = StepBatch::default();
    for p in parts {
        let start = b.token_ids.len();
        for (j, &t) in p.tokens.iter().enumerate() {
            let abs = p.context_len + j;
            b.token_ids.push(t);
            b.positions.push(abs as u32);
            b.slot_mapping
                .push(p.table[abs / BLOCK] * BLOCK as u32 + (abs % BLOCK) as u32);
            if p.all_logits || j + 1 == p.tokens.len() {
                b.logits_rows.push(start + j);
            }
        }
        b.seqs.push(SeqSlice {
            query_start: start,
            query_len: p.tokens.len(),
            context_len: p.context_len,
        });
        b.block_tables.push(p.table.to_vec());
    }
    b
}

fn backend(dir: &Path, blocks: usize) -> CpuBackend {
    let mut be = CpuBackend::load(dir, opts()).unwrap();
    be.init_kv(blocks).unwrap();
    be
}

/// Runs `tokens` through `be` in chunks of the given sizes; returns the logits of every position.
fn run_chunked(
    be: &mut CpuBackend,
    tokens: &[u32],
    chunks: &[usize],
    table: &[u32],
) -> Vec<Vec<f32>> {
    let mut rows = Vec::new();
    let mut out = StepOutput::default();
    let mut done = 0;
    for &c in chunks {
        let b = batch(&[Part {
            tokens: &tokens[done..done + c],
            context_len: done,
            table,
            all_logits: true,
        }]);
        be.execute(&b, &mut out).unwrap();
        assert_eq!(out.vocab_size, be.vocab_size());
        for r in 0..c {
            rows.push(out.row(r).unwrap().to_vec());
        }
        done += c;
    }
    assert_eq!(done, tokens.len());
    rows
}

fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

/// Bound on |CPU backend logit − naive f64 logit| (the README states it): the f32 kernels sum
/// in another order than the f64 reference; the worst measured is 5.0e-6 (tied bf16 weights).
const NAIVE_TOL: f64 = 1e-5;

fn assert_matches_naive(got: &[Vec<f32>], want: &[Vec<f64>], tol: f64) {
    assert_eq!(got.len(), want.len());
    let mut worst = 0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = max_diff(g, w);
        assert!(d < tol, "position {i}: max |Δlogit| = {d:e}");
        worst = worst.max(d);
    }
    eprintln!(
        "max |Δlogit| vs naive over {} positions: {worst:e}",
        got.len()
    );
    // Guard against a vacuous comparison: the logits must actually vary.
    let spread = want[0].iter().cloned().fold(f64::MIN, f64::max)
        - want[0].iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 0.5, "logit spread {spread}");
}

// ---------------------------------------------------------------------------------------------

#[test]
fn forward_matches_naive_reference_for_every_format() {
    let cases = [
        (
            "untied f32",
            TinyQwen2 {
                seed: 1,
                ..Default::default()
            },
        ),
        (
            "tied bf16",
            TinyQwen2 {
                seed: 2,
                tied: true,
                dtype: TinyDtype::BF16,
                ..Default::default()
            },
        ),
        (
            "sharded f16, MHA",
            TinyQwen2 {
                seed: 3,
                dtype: TinyDtype::F16,
                shards: 3,
                kv_heads: 4,
                ..Default::default()
            },
        ),
        (
            "GQA 8:2, 3 layers",
            TinyQwen2 {
                seed: 4,
                heads: 8,
                kv_heads: 2,
                layers: 3,
                ..Default::default()
            },
        ),
    ];
    for (what, spec) in cases {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_qwen2_with(dir.path(), &spec).unwrap();
        let naive = Naive::load(dir.path());
        let tokens = prompt(37, spec.seed as u32);
        let want = naive.logits(&tokens);
        let mut be = backend(dir.path(), 16);
        let table: Vec<u32> = (0..10).collect();
        let got = run_chunked(&mut be, &tokens, &[37], &table);
        eprintln!("{what}: ok");
        assert_matches_naive(&got, &want, NAIVE_TOL);
    }
}

#[test]
fn chunked_prefill_and_decode_give_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2(dir.path(), 7).unwrap();
    let tokens = prompt(29, 7);
    let want = Naive::load(dir.path()).logits(&tokens);
    let table: Vec<u32> = (0..8).collect();
    let mut be = backend(dir.path(), 8);
    let whole = run_chunked(&mut be, &tokens, &[29], &table);
    assert_matches_naive(&whole, &want, NAIVE_TOL);
    for chunks in [vec![5, 11, 3, 10], vec![4, 4, 4, 4, 13], vec![1; 29]] {
        let mut be = backend(dir.path(), 8);
        let got = run_chunked(&mut be, &tokens, &chunks, &table);
        for (i, (g, w)) in got.iter().zip(&whole).enumerate() {
            let d = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "chunks {chunks:?}, position {i}: {d:e}");
        }
    }
}

#[test]
fn physical_block_numbers_do_not_matter() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2(dir.path(), 11).unwrap();
    let tokens = prompt(23, 11);
    let mut be = backend(dir.path(), 6);
    let base = run_chunked(&mut be, &tokens, &[9, 14], &[0, 1, 2, 3, 4, 5]);
    for table in [[5u32, 4, 3, 2, 1, 0], [3, 0, 5, 1, 4, 2]] {
        // Reusing the backend also checks stale K/V left in other blocks is never read.
        let got = run_chunked(&mut be, &tokens, &[9, 14], &table);
        assert_eq!(got, base, "table {table:?}");
    }
}

#[test]
fn ragged_batch_equals_sequences_run_alone() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2_with(
        dir.path(),
        &TinyQwen2 {
            seed: 5,
            heads: 8,
            kv_heads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let naive = Naive::load(dir.path());
    let a = prompt(13, 1);
    let b = prompt(21, 2);
    // c shares a's first 8 tokens (2 full blocks) and reuses a's physical blocks for them, as a
    // prefix-cache hit does.
    let mut c = a[..8].to_vec();
    c.extend(prompt(6, 3));
    let (ta, tb, tc) = ([0u32, 1, 2, 3], [10u32, 9, 8, 7, 6, 11], [0u32, 1, 4, 5]);

    let mut be = backend(dir.path(), 12);
    let mut out = StepOutput::default();
    // Step 1: a's first 10 tokens and b's first 7.
    be.execute(
        &batch(&[
            Part {
                tokens: &a[..10],
                context_len: 0,
                table: &ta,
                all_logits: false,
            },
            Part {
                tokens: &b[..7],
                context_len: 0,
                table: &tb,
                all_logits: false,
            },
        ]),
        &mut out,
    )
    .unwrap();
    // Step 2: a decodes 3 tokens' worth as a chunk, b finishes its prompt, c starts after its
    // cached 8-token prefix.
    let step2 = batch(&[
        Part {
            tokens: &a[10..],
            context_len: 10,
            table: &ta,
            all_logits: true,
        },
        Part {
            tokens: &b[7..],
            context_len: 7,
            table: &tb,
            all_logits: false,
        },
        Part {
            tokens: &c[8..],
            context_len: 8,
            table: &tc,
            all_logits: true,
        },
    ]);
    be.execute(&step2, &mut out).unwrap();
    assert_eq!(out.logits.len(), (3 + 1 + 6) * 300);
    let (wa, wb, wc) = (naive.logits(&a), naive.logits(&b), naive.logits(&c));
    let mut expected: Vec<&Vec<f64>> = wa[10..].iter().collect();
    expected.push(&wb[20]);
    expected.extend(wc[8..].iter());
    for (r, want) in expected.into_iter().enumerate() {
        let d = max_diff(out.row(r).unwrap(), want);
        assert!(d < NAIVE_TOL, "row {r}: {d:e}");
    }
}

#[test]
fn kv_capacity_follows_the_memory_budget() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2(dir.path(), 0).unwrap();
    let be = CpuBackend::load(dir.path(), opts()).unwrap();
    let spec = be.kv_spec();
    // 2 (K, V) × 2 layers × 2 KV heads × 16 dims × 4 tokens × 4 bytes.
    assert_eq!(spec.bytes_per_block, 2048);
    assert_eq!(
        (
            spec.num_layers,
            spec.num_kv_heads,
            spec.head_size,
            spec.block_size
        ),
        (2, 2, 16, 4)
    );
    assert_eq!(be.available_kv_blocks(), 512);
    assert_eq!(be.name(), "cpu");
    assert_eq!(be.vocab_size(), 300);
}

/// Rewrites `dir/model.safetensors` (default spec, f32) after `edit` changes the tensor list.
fn rewrite(dir: &Path, edit: &dyn Fn(&mut Vec<NamedTensor>)) {
    let mut t = tiny_qwen2_tensors(&TinyQwen2::default());
    edit(&mut t);
    write_safetensors(&dir.join("model.safetensors"), &t, TinyDtype::F32).unwrap();
}

#[test]
fn load_errors_name_the_problem() {
    let err = |spec: &TinyQwen2, edit: &dyn Fn(&Path)| -> String {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_qwen2_with(dir.path(), spec).unwrap();
        edit(dir.path());
        CpuBackend::load(dir.path(), opts())
            .unwrap_err()
            .to_string()
    };
    let spec = TinyQwen2::default();
    assert_eq!(
        err(&spec, &|d: &Path| rewrite(d, &|t| t.retain(
            |(n, _, _)| n != "model.layers.1.mlp.up_proj.weight"
        ))),
        "missing tensor \"model.layers.1.mlp.up_proj.weight\""
    );
    assert_eq!(
        err(&spec, &|d: &Path| rewrite(d, &|t| t
            .retain(|(n, _, _)| n != "lm_head.weight"))),
        "missing tensor \"lm_head.weight\""
    );
    assert_eq!(
        err(&spec, &|d: &Path| rewrite(d, &|t| {
            for (n, shape, data) in t.iter_mut() {
                if n == "model.layers.0.self_attn.k_proj.weight" {
                    *shape = vec![16, 128];
                    data.truncate(16 * 128);
                }
            }
        })),
        "tensor \"model.layers.0.self_attn.k_proj.weight\" has shape [16, 128], expected [32, 64]"
    );
    let set = |key: &'static str, value: Value| {
        move |dir: &Path| {
            let p = dir.join("config.json");
            let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            v[key] = value.clone();
            std::fs::write(&p, v.to_string()).unwrap();
        }
    };
    assert_eq!(
        err(&spec, &set("model_type", "llama".into())),
        "unsupported model_type \"llama\" (supported: qwen2)"
    );
    assert_eq!(
        err(&spec, &set("num_hidden_layers", Value::Null)),
        "config.json: missing field \"num_hidden_layers\""
    );
    let no_weights = err(&spec, &|dir: &Path| {
        std::fs::remove_file(dir.join("model.safetensors")).unwrap()
    });
    assert!(
        no_weights.starts_with("no weights found in "),
        "{no_weights}"
    );
    let not_st = err(&spec, &|dir: &Path| {
        std::fs::write(dir.join("model.safetensors"), b"junk").unwrap()
    });
    assert!(
        not_st.contains("model.safetensors: invalid safetensors file: "),
        "{not_st}"
    );
    // Sharded: the index names a shard that is not there.
    let sharded = TinyQwen2 {
        shards: 2,
        ..TinyQwen2::default()
    };
    let missing_shard = err(&sharded, &|dir: &Path| {
        std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap()
    });
    assert!(
        missing_shard.starts_with("cannot read ")
            && missing_shard.contains("model-00002-of-00002.safetensors"),
        "{missing_shard}"
    );
}

#[test]
fn sharded_and_tied_checkpoints_load_the_same_weights() {
    let single = tempfile::tempdir().unwrap();
    let sharded = tempfile::tempdir().unwrap();
    write_tiny_qwen2_with(
        single.path(),
        &TinyQwen2 {
            seed: 9,
            tied: true,
            ..Default::default()
        },
    )
    .unwrap();
    write_tiny_qwen2_with(
        sharded.path(),
        &TinyQwen2 {
            seed: 9,
            tied: true,
            shards: 4,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(sharded.path().join("model.safetensors.index.json").exists());
    let tokens = prompt(9, 9);
    let table: Vec<u32> = (0..3).collect();
    let a = run_chunked(&mut backend(single.path(), 3), &tokens, &[9], &table);
    let b = run_chunked(&mut backend(sharded.path(), 3), &tokens, &[9], &table);
    assert_eq!(a, b);
}

#[test]
fn bad_batches_are_rejected_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2(dir.path(), 0).unwrap();
    let mut be = CpuBackend::load(dir.path(), opts()).unwrap();
    let mut out = StepOutput::default();
    let tokens = prompt(6, 0);
    let good = batch(&[Part {
        tokens: &tokens,
        context_len: 0,
        table: &[2, 3],
        all_logits: false,
    }]);
    assert!(matches!(
        be.execute(&good, &mut out),
        Err(BackendError::KvNotInitialised)
    ));
    be.init_kv(4).unwrap();
    be.execute(&good, &mut out).unwrap();
    assert_eq!(out.logits.len(), 300);

    let check = |be: &mut CpuBackend, edit: &dyn Fn(&mut StepBatch), want: &str| {
        let mut b = good.clone();
        edit(&mut b);
        let mut out = StepOutput::default();
        match be.execute(&b, &mut out) {
            Err(BackendError::InvalidBatch(msg)) => assert_eq!(msg, want),
            other => panic!("expected InvalidBatch({want}), got {other:?}"),
        }
    };
    check(
        &mut be,
        &|b| {
            b.positions.pop();
        },
        "6 token_ids but 5 positions and 6 slot_mapping entries",
    );
    check(
        &mut be,
        &|b| {
            b.block_tables.push(vec![]);
        },
        "1 seqs but 2 block tables",
    );
    check(
        &mut be,
        &|b| b.token_ids[2] = 300,
        "token_ids[2] = 300 is not below vocab_size 300",
    );
    check(
        &mut be,
        &|b| b.logits_rows = vec![6],
        "logits row 6 is not below the 6 tokens of the batch",
    );
    check(
        &mut be,
        &|b| b.seqs[0].query_len = 7,
        "seq 0: tokens 0..7 run past the 6 tokens of the batch",
    );
    check(
        &mut be,
        &|b| b.seqs[0].query_start = usize::MAX,
        "seq 0: length overflow",
    );
    check(
        &mut be,
        &|b| b.block_tables[0] = vec![2],
        "seq 0: 1 blocks of 4 cannot hold 6 tokens",
    );
    check(
        &mut be,
        &|b| b.block_tables[0] = vec![2, 4],
        "seq 0: block 4 is not below the 4 KV blocks",
    );
    check(
        &mut be,
        &|b| b.positions[4] = 7,
        "seq 0: positions[4] = 7 but the token is at index 4 of its sequence",
    );
    check(
        &mut be,
        &|b| b.slot_mapping[5] = 3,
        "seq 0: slot_mapping[5] = 3 but the block table puts token 5 at slot 13",
    );
    check(
        &mut be,
        &|b| {
            b.seqs[0].query_len = 3;
            b.seqs.push(SeqSlice {
                query_start: 2,
                query_len: 4,
                context_len: 0,
            });
            b.block_tables.push(vec![0, 1]);
        },
        "token 2 belongs to both seq 0 and seq 1",
    );
    check(
        &mut be,
        &|b| b.seqs[0].query_len = 5,
        "token 5 belongs to no seq",
    );
    // The cache survives rejected batches: the good batch still gives the same logits.
    let mut again = StepOutput::default();
    be.execute(&good, &mut again).unwrap();
    assert_eq!(again.logits, out.logits);
    // An empty batch is fine and yields nothing.
    be.execute(&StepBatch::default(), &mut again).unwrap();
    assert!(again.logits.is_empty() && again.sampled.is_empty());
}

#[test]
fn thread_count_does_not_change_logits() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_qwen2(dir.path(), 21).unwrap();
    let tokens = prompt(19, 21);
    let table: Vec<u32> = (0..5).collect();
    let mut results = Vec::new();
    for threads in [1, 3] {
        let mut be = CpuBackend::load(dir.path(), CpuOptions { threads, ..opts() }).unwrap();
        be.init_kv(5).unwrap();
        results.push(run_chunked(&mut be, &tokens, &[12, 7], &table));
    }
    assert_eq!(results[0], results[1]);
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 12, ..Default::default() })]

    /// Any split of a prompt into chunks, over any placement of its blocks in the cache, gives
    /// the logits of running it whole.
    #[test]
    fn any_chunking_and_block_placement(
        len in 1usize..40,
        cuts in proptest::collection::vec(1usize..12, 1..8),
        perm_seed in 0u64..1000,
    ) {
        let dir = shared_model();
        let tokens = prompt(len, perm_seed as u32);
        let blocks = len.div_ceil(BLOCK);
        let mut be = backend(dir, 2 * blocks + 1);
        let identity: Vec<u32> = (0..blocks as u32).collect();
        let whole = run_chunked(&mut be, &tokens, &[len], &identity);
        // A pseudo-random injective placement into twice as many physical blocks.
        let mut free: Vec<u32> = (0..(2 * blocks + 1) as u32).collect();
        let mut table = Vec::new();
        let mut s = perm_seed;
        for _ in 0..blocks {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            table.push(free.swap_remove((s >> 33) as usize % free.len()));
        }
        let mut chunks = Vec::new();
        let mut left = len;
        for c in cuts.iter().cycle() {
            if left == 0 { break; }
            let c = (*c).min(left);
            chunks.push(c);
            left -= c;
        }
        let got = run_chunked(&mut be, &tokens, &chunks, &table);
        for (i, (g, w)) in got.iter().zip(&whole).enumerate() {
            let d = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            proptest::prop_assert!(d < 1e-5, "chunks {:?} table {:?} position {}: {:e}", chunks, table, i, d);
        }
    }
}

/// One tiny model on disk shared by the property cases.
fn shared_model() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_qwen2(dir.path(), 33).unwrap();
        dir
    })
    .path()
}
