//! The sim backend with a fixed answer (`--sim-script FILE`): every response is the script's
//! tokens, then EOS. For API tests and demos of output parsing (tool calls) and constrained
//! decoding without model weights: unlike the plain sim it returns *logits* (the script's next
//! token far ahead of all others), so the engine's sampling, constraint masks and stop handling
//! run as they do for a real model. Timing and KV checks are the wrapped sim's.
//!
//! The backend keeps each cached token's id in its slot (its whole "KV cache"), reads a
//! sequence's history through its block table, and continues the script after the longest
//! script prefix the history ends with. A prompt that itself ends with the start of the script
//! would make it skip ahead; scripts and prompts in tests do not overlap.

use super::sim::SimBackend;
use super::{Backend, BackendError, KvSpec, StepBatch, StepOutput};

/// Logit of the script's next token; every other token gets 0, so even at temperature 1 another
/// token is sampled with probability about `vocab × e^-30` (~5e-9 for 152k ids).
const SCRIPT_LOGIT: f32 = 30.0;

#[derive(Debug)]
pub struct ScriptedBackend {
    inner: SimBackend,
    script: Vec<u32>,
    eos: u32,
    /// Token id per KV slot.
    slots: Vec<u32>,
    block_size: usize,
    history: Vec<u32>,
}

impl ScriptedBackend {
    pub fn new(inner: SimBackend, script: Vec<u32>, eos: u32) -> Self {
        let block_size = inner.kv_spec().block_size;
        Self {
            inner,
            script,
            eos,
            slots: Vec::new(),
            block_size,
            history: Vec::new(),
        }
    }

    /// The script token after `history`.
    fn next_token(&self, history: &[u32]) -> u32 {
        let longest = (0..=self.script.len().min(history.len()))
            .rev()
            .find(|&k| history.ends_with(&self.script[..k]))
            .unwrap_or(0);
        self.script.get(longest).copied().unwrap_or(self.eos)
    }
}

impl Backend for ScriptedBackend {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn kv_spec(&self) -> KvSpec {
        self.inner.kv_spec()
    }

    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn available_kv_blocks(&self) -> usize {
        self.inner.available_kv_blocks()
    }

    fn init_kv(&mut self, num_blocks: usize) -> Result<(), BackendError> {
        self.inner.init_kv(num_blocks)?;
        self.slots = vec![0; num_blocks * self.block_size];
        Ok(())
    }

    fn execute(&mut self, batch: &StepBatch, out: &mut StepOutput) -> Result<(), BackendError> {
        // Validates the batch (slots in range) and models the step's time.
        self.inner.execute(batch, out)?;
        out.sampled.clear();
        for (&slot, &tok) in batch.slot_mapping.iter().zip(&batch.token_ids) {
            if let Some(s) = self.slots.get_mut(slot as usize) {
                *s = tok;
            }
        }
        let vocab = self.inner.vocab_size();
        out.vocab_size = vocab;
        out.logits.clear();
        out.logits.resize(batch.logits_rows.len() * vocab, 0.0);
        let bs = self.block_size;
        for (row, &at) in batch.logits_rows.iter().enumerate() {
            let Some((k, seq)) = batch
                .seqs
                .iter()
                .enumerate()
                .find(|(_, s)| (s.query_start..s.query_start + s.query_len).contains(&at))
            else {
                return Err(BackendError::InvalidBatch(format!(
                    "logits row {at} is in no sequence"
                )));
            };
            let table = batch.block_tables.get(k).map_or(&[][..], Vec::as_slice);
            let len = seq.context_len + (at - seq.query_start) + 1;
            let from = len.saturating_sub(self.script.len());
            let mut history = std::mem::take(&mut self.history);
            history.clear();
            for p in from..len {
                let block = table.get(p / bs).copied().unwrap_or(0) as usize;
                history.push(self.slots.get(block * bs + p % bs).copied().unwrap_or(0));
            }
            let next = self.next_token(&history) as usize;
            self.history = history;
            if let Some(l) = out.logits.get_mut(row * vocab + next) {
                *l = SCRIPT_LOGIT;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::backend::sim::{profile, SimOptions};

    #[test]
    fn continues_after_the_longest_script_prefix() {
        let sim = SimBackend::new(
            profile("l4-qwen2.5-7b").unwrap(),
            SimOptions {
                block_size: 16,
                gpu_memory_utilization: 0.9,
                time_scale: 0.0,
                seed: 0,
            },
        );
        let b = ScriptedBackend::new(sim, vec![5, 6, 5, 7], 99);
        assert_eq!(b.next_token(&[1, 2, 3]), 5);
        assert_eq!(b.next_token(&[1, 2, 5]), 6);
        assert_eq!(b.next_token(&[1, 5, 6]), 5);
        assert_eq!(b.next_token(&[5, 6, 5]), 7);
        assert_eq!(b.next_token(&[5, 6, 5, 7]), 99, "script done: EOS");
    }
}
