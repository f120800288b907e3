//! Switchyard's CPU backend vs llama.cpp on the same GGUF file, threads and prompt, in one run:
//! prefill tok/s (one prompt of `GGUF_BENCH_PROMPT` tokens, default 128) and decode tok/s
//! (`GGUF_BENCH_DECODE` greedy tokens after it, default 64), single sequence. Rounds alternate
//! the two engines (`GGUF_BENCH_ROUNDS`, default 3) and the medians are compared; the bars of
//! issue 14 are decode ≥ 0.8× and prefill ≥ 0.5× llama.cpp.
//!
//! Needs the model (`scripts/fetch-model.sh`) and llama.cpp (`scripts/llama-venv.sh`); without
//! them it prints `SKIPPED` and exits. Run: `cargo bench --bench gguf_llama`
//! (`GGUF_BENCH_THREADS`, default 2, sets both engines' threads).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use switchyard::serve::backend::cpu::greedy::greedy;
use switchyard::serve::backend::cpu::{CpuBackend, CpuOptions};
use switchyard::serve::backend::Backend;
use switchyard::serve::model::load_gguf;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A code-flavoured prompt of exactly `n` tokens (a source file's text, repeated as needed).
fn prompt_ids(
    codec: &dyn switchyard::serve::codec::TextCodec,
    n: usize,
) -> anyhow::Result<Vec<u32>> {
    let text = include_str!("../src/serve/backend/cpu/greedy.rs");
    let mut ids = Vec::new();
    while ids.len() < n {
        ids.extend(codec.encode(text, false)?);
    }
    ids.truncate(n);
    Ok(ids)
}

struct Timing {
    prefill_tok_s: f64,
    decode_tok_s: f64,
}

fn rates(prompt: usize, generated: usize, prefill: Duration, decode: Duration) -> Timing {
    Timing {
        prefill_tok_s: prompt as f64 / prefill.as_secs_f64(),
        decode_tok_s: (generated.saturating_sub(1)) as f64 / decode.as_secs_f64(),
    }
}

fn llama(
    python: &Path,
    model: &Path,
    ids: &[u32],
    decode: usize,
    threads: usize,
) -> anyhow::Result<(Timing, Vec<u32>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let case = json!({"ids": ids, "max_new": decode, "text": ""});
    // A short warm-up case first: llama.cpp allocates its compute graphs on the first eval.
    let warm = json!({"ids": &ids[..8.min(ids.len())], "max_new": 2, "text": ""});
    let req = json!({"model": model, "threads": threads, "n_ctx": 2048, "cases": [warm, case]});
    let mut child = Command::new(python)
        .arg(root.join("scripts/llama-oracle.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting llama-oracle.py")?;
    serde_json::to_writer(child.stdin.take().context("stdin")?, &req)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("llama-oracle.py failed: {}", out.status);
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let c = &v["cases"][1];
    let tokens: Vec<u32> = serde_json::from_value(c["tokens"].clone())?;
    let t = rates(
        ids.len(),
        tokens.len(),
        Duration::from_secs_f64(c["prefill_s"].as_f64().context("prefill_s")?),
        Duration::from_secs_f64(c["decode_s"].as_f64().context("decode_s")?),
    );
    Ok((t, tokens))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = std::env::var_os("SWITCHYARD_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".cache/models/qwen2.5-coder-0.5b-instruct.gguf"));
    let python = root.join(".cache/llama-venv/bin/python");
    if !model.is_file() || !python.is_file() {
        println!(
            "SKIPPED: needs {} (scripts/fetch-model.sh) and {} (scripts/llama-venv.sh)",
            model.display(),
            python.display()
        );
        return Ok(());
    }
    let threads = env_usize("GGUF_BENCH_THREADS", 2);
    let n_prompt = env_usize("GGUF_BENCH_PROMPT", 128);
    let n_decode = env_usize("GGUF_BENCH_DECODE", 64);
    let rounds = env_usize("GGUF_BENCH_ROUNDS", 3).max(1);

    let m = load_gguf(&model)?;
    let ids = prompt_ids(m.codec.as_ref(), n_prompt)?;
    let mut be = CpuBackend::new(
        m.config,
        m.weights,
        CpuOptions {
            block_size: 16,
            kv_cache_memory_bytes: 256 << 20,
            threads,
        },
    )?;
    be.init_kv((n_prompt + n_decode).div_ceil(16) + 1)?;
    // Warm-up: touch every mapped weight page once.
    greedy(&mut be, &ids[..8], 2, &[])?;

    let (mut ours_p, mut ours_d, mut ll_p, mut ll_d) = (vec![], vec![], vec![], vec![]);
    let mut agree = true;
    for round in 0..rounds {
        let run = greedy(&mut be, &ids, n_decode, &[])?;
        let ours = rates(ids.len(), run.tokens.len(), run.prefill, run.decode);
        let (theirs, their_tokens) = llama(&python, &model, &ids, n_decode, threads)?;
        agree &= run.tokens == their_tokens;
        println!(
            "round {round}: switchyard prefill {:.1} tok/s decode {:.2} tok/s | llama.cpp prefill {:.1} tok/s decode {:.2} tok/s",
            ours.prefill_tok_s, ours.decode_tok_s, theirs.prefill_tok_s, theirs.decode_tok_s
        );
        ours_p.push(ours.prefill_tok_s);
        ours_d.push(ours.decode_tok_s);
        ll_p.push(theirs.prefill_tok_s);
        ll_d.push(theirs.decode_tok_s);
    }
    let (op, od, lp, ld) = (median(ours_p), median(ours_d), median(ll_p), median(ll_d));
    println!(
        "gguf_llama: {} threads, prompt {n_prompt} tokens, decode {n_decode} tokens, median of {rounds} rounds",
        threads
    );
    println!(
        "  prefill: switchyard {op:.1} tok/s, llama.cpp {lp:.1} tok/s, ratio {:.2} (bar 0.5)",
        op / lp
    );
    println!(
        "  decode:  switchyard {od:.2} tok/s, llama.cpp {ld:.2} tok/s, ratio {:.2} (bar 0.8)",
        od / ld
    );
    println!("  greedy tokens identical in every round: {agree}");
    Ok(())
}
