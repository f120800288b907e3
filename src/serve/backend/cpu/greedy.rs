//! Greedy decoding of one sequence straight on a backend, without the engine: what the llama.cpp
//! oracle test compares token by token and what the GGUF bench times (prefill, then one token
//! per step). Uses KV blocks `0..` of an already initialised cache.

use std::time::{Duration, Instant};

use crate::serve::backend::{Backend, BackendError, SeqSlice, StepBatch, StepOutput};

/// Tokens generated and how long each phase took.
#[derive(Debug, Clone, PartialEq)]
pub struct GreedyRun {
    pub tokens: Vec<u32>,
    /// Per generated token: its logit minus the runner-up's (how near a tie the choice was).
    pub margins: Vec<f32>,
    /// The prompt's forward pass (ending in the first token's logits).
    pub prefill: Duration,
    /// The steps after the first token (`tokens.len() - 1` forward passes of one token).
    pub decode: Duration,
}

/// Runs `prompt` then `max_new` greedy steps (argmax, lowest id on ties), stopping early at a
/// token in `stop` (which is included). The prompt is processed in one step of `prompt.len()`
/// tokens.
pub fn greedy(
    be: &mut dyn Backend,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
) -> Result<GreedyRun, BackendError> {
    let bs = be.kv_spec().block_size;
    let total = prompt.len() + max_new;
    let table: Vec<u32> = (0..total.div_ceil(bs) as u32).collect();
    let mut batch = StepBatch::default();
    let mut out = StepOutput::default();
    let step = |be: &mut dyn Backend,
                batch: &mut StepBatch,
                out: &mut StepOutput,
                ids: &[u32],
                start: usize|
     -> Result<(u32, f32), BackendError> {
        batch.clear();
        for (j, &id) in ids.iter().enumerate() {
            let pos = start + j;
            batch.token_ids.push(id);
            batch.positions.push(pos as u32);
            batch
                .slot_mapping
                .push(table[pos / bs] * bs as u32 + (pos % bs) as u32);
        }
        batch.seqs.push(SeqSlice {
            query_start: 0,
            query_len: ids.len(),
            context_len: start,
        });
        batch.block_tables.push(table.clone());
        batch.logits_rows.push(ids.len() - 1);
        be.execute(batch, out)?;
        let row = out
            .row(0)
            .ok_or_else(|| BackendError::Failed("backend returned no logits".into()))?;
        let best = argmax(row);
        let runner_up = row
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 != best)
            .fold(f32::NEG_INFINITY, |m, (_, v)| m.max(*v));
        Ok((best, row[best as usize] - runner_up))
    };
    if prompt.is_empty() || max_new == 0 {
        return Err(BackendError::InvalidBatch(
            "greedy needs a prompt and at least one new token".into(),
        ));
    }
    let t0 = Instant::now();
    let (mut next, margin) = step(be, &mut batch, &mut out, prompt, 0)?;
    let prefill = t0.elapsed();
    let mut tokens = vec![next];
    let mut margins = vec![margin];
    let t1 = Instant::now();
    while tokens.len() < max_new && !stop.contains(&next) {
        let pos = prompt.len() + tokens.len() - 1;
        let (id, margin) = step(be, &mut batch, &mut out, &[next], pos)?;
        next = id;
        tokens.push(next);
        margins.push(margin);
    }
    Ok(GreedyRun {
        tokens,
        margins,
        prefill,
        decode: t1.elapsed(),
    })
}

/// Index of the largest logit; the lowest index among equal ones (llama.cpp's greedy sampler
/// keeps the first maximum too).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}
