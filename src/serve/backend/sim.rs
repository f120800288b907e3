//! Simulated accelerator: no weights, a roofline cost per step, deterministic tokens.
//!
//! Each step costs `max((weight bytes + KV bytes read) / bandwidth, FLOPs / peak) + launch
//! overhead` and sleeps that long × `time_scale` in real time, so batching, prefill length,
//! prefix hits, KV capacity and preemption shape latency as they would on the modelled GPU while
//! the same engine code runs. Sampled tokens are pseudo-random ids below the special-token range
//! (never EOS), so `max_tokens` decides the output length.

use std::time::{Duration, Instant};

use xxhash_rust::xxh64::xxh64;

use super::{Backend, BackendError, KvSpec, StepBatch, StepOutput};

/// An accelerator + model pair. Bandwidth and FLOP/s are achievable (not datasheet) figures:
/// ~80 % of peak memory bandwidth, ~60 % of dense tensor-core peak.
#[derive(Debug, Clone, PartialEq)]
pub struct SimProfile {
    pub name: &'static str,
    /// Model the profile stands for (default `--served-model-name`).
    pub model: &'static str,
    pub weight_bytes: f64,
    /// Parameters touched per token (2 FLOPs each).
    pub params: f64,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_size: usize,
    /// Bytes per K/V element (2 for bf16, 1 for fp8).
    pub kv_elem_bytes: usize,
    pub vocab_size: usize,
    /// Ids at or above this are special tokens (never sampled).
    pub regular_vocab: u32,
    pub max_model_len: usize,
    pub bandwidth: f64,
    pub peak_flops: f64,
    pub launch_overhead_s: f64,
    pub device_memory_bytes: f64,
    /// Activations, CUDA graphs and allocator slack kept out of the KV cache.
    pub reserved_bytes: f64,
}

const L4_MEMORY: f64 = 23_034.0 * 1024.0 * 1024.0;
const H100_MEMORY: f64 = 81_559.0 * 1024.0 * 1024.0;

/// The built-in profiles (`--sim-profile`).
pub fn profiles() -> [SimProfile; 3] {
    let qwen7b = SimProfile {
        name: "l4-qwen2.5-7b",
        model: "Qwen/Qwen2.5-7B-Instruct",
        weight_bytes: 15.23e9,
        params: 7.62e9,
        num_layers: 28,
        num_heads: 28,
        num_kv_heads: 4,
        head_size: 128,
        kv_elem_bytes: 2,
        vocab_size: 152_064,
        regular_vocab: 151_643,
        max_model_len: 32_768,
        bandwidth: 240e9,
        peak_flops: 72e12,
        launch_overhead_s: 2e-3,
        device_memory_bytes: L4_MEMORY,
        reserved_bytes: 1.5e9,
    };
    [
        qwen7b.clone(),
        SimProfile {
            name: "l4-qwen2.5-coder-14b-fp8",
            model: "Qwen/Qwen2.5-Coder-14B-Instruct-FP8",
            // FP8 linear layers, bf16 embeddings and head.
            weight_bytes: 16.2e9,
            params: 14.77e9,
            num_layers: 48,
            num_heads: 40,
            num_kv_heads: 8,
            // FP8 KV cache, as L4 deployments of this model run it.
            kv_elem_bytes: 1,
            peak_flops: 145e12,
            reserved_bytes: 1.0e9,
            ..qwen7b.clone()
        },
        SimProfile {
            name: "h100-qwen2.5-7b",
            bandwidth: 2.7e12,
            peak_flops: 600e12,
            launch_overhead_s: 1e-3,
            device_memory_bytes: H100_MEMORY,
            reserved_bytes: 4e9,
            ..qwen7b
        },
    ]
}

/// Looks up a profile by name.
pub fn profile(name: &str) -> Option<SimProfile> {
    profiles().into_iter().find(|p| p.name == name)
}

impl SimProfile {
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_size * self.kv_elem_bytes
    }

    /// Modelled duration of one step over `batch`, in simulated seconds.
    pub fn step_cost(&self, batch: &StepBatch) -> f64 {
        let kv_per_token = self.kv_bytes_per_token() as f64;
        let q_width = (self.num_heads * self.head_size) as f64;
        let mut kv_read = 0.0;
        let mut attn_flops = 0.0;
        for s in &batch.seqs {
            let (ctx, q) = (s.context_len as f64, s.query_len as f64);
            kv_read += (ctx + q) * kv_per_token;
            // QK^T and PV over the causal window: each new token attends to ctx + its offset.
            attn_flops += 4.0 * self.num_layers as f64 * q_width * q * (ctx + (q + 1.0) / 2.0);
        }
        let flops = 2.0 * self.params * batch.num_tokens() as f64 + attn_flops;
        let memory_time = (self.weight_bytes + kv_read) / self.bandwidth;
        memory_time.max(flops / self.peak_flops) + self.launch_overhead_s
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimOptions {
    pub block_size: usize,
    pub gpu_memory_utilization: f64,
    /// Real seconds per simulated second (0 = do not sleep at all).
    pub time_scale: f64,
    pub seed: u64,
}

#[derive(Debug)]
pub struct SimBackend {
    profile: SimProfile,
    opts: SimOptions,
    num_blocks: Option<usize>,
    /// When the previous step's modelled time ends; steps queue behind it so sleep overshoot
    /// does not accumulate.
    busy_until: Option<Instant>,
    simulated_s: f64,
}

impl SimBackend {
    pub fn new(profile: SimProfile, opts: SimOptions) -> Self {
        Self {
            profile,
            opts,
            num_blocks: None,
            busy_until: None,
            simulated_s: 0.0,
        }
    }

    pub fn profile(&self) -> &SimProfile {
        &self.profile
    }

    /// Total modelled time of all steps so far.
    pub fn simulated_seconds(&self) -> f64 {
        self.simulated_s
    }

    fn token_for(&self, position: u32, prev: u32) -> u32 {
        let mut key = [0u8; 16];
        key[..4].copy_from_slice(&position.to_le_bytes());
        key[4..8].copy_from_slice(&prev.to_le_bytes());
        key[8..].copy_from_slice(&self.opts.seed.to_le_bytes());
        (xxh64(&key, 0) % u64::from(self.profile.regular_vocab.max(1))) as u32
    }
}

impl Backend for SimBackend {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn computes_logits(&self) -> bool {
        false
    }

    fn kv_spec(&self) -> KvSpec {
        let per_token = self.profile.kv_bytes_per_token();
        KvSpec {
            num_layers: self.profile.num_layers,
            num_kv_heads: self.profile.num_kv_heads,
            head_size: self.profile.head_size,
            block_size: self.opts.block_size,
            bytes_per_block: per_token * self.opts.block_size,
        }
    }

    fn vocab_size(&self) -> usize {
        self.profile.vocab_size
    }

    fn available_kv_blocks(&self) -> usize {
        let p = &self.profile;
        let budget = p.device_memory_bytes * self.opts.gpu_memory_utilization
            - p.weight_bytes
            - p.reserved_bytes;
        let per_block = self.kv_spec().bytes_per_block.max(1) as f64;
        if budget <= 0.0 {
            return 0;
        }
        (budget / per_block) as usize
    }

    fn init_kv(&mut self, num_blocks: usize) -> Result<(), BackendError> {
        self.num_blocks = Some(num_blocks);
        Ok(())
    }

    fn execute(&mut self, batch: &StepBatch, out: &mut StepOutput) -> Result<(), BackendError> {
        let Some(num_blocks) = self.num_blocks else {
            return Err(BackendError::KvNotInitialised);
        };
        let n = batch.num_tokens();
        if batch.positions.len() != n || batch.slot_mapping.len() != n {
            return Err(BackendError::InvalidBatch(format!(
                "{n} tokens but {} positions and {} slots",
                batch.positions.len(),
                batch.slot_mapping.len()
            )));
        }
        let max_slot = (num_blocks * self.opts.block_size) as u64;
        if let Some(bad) = batch
            .slot_mapping
            .iter()
            .find(|&&s| u64::from(s) >= max_slot)
        {
            return Err(BackendError::InvalidBatch(format!(
                "slot {bad} beyond {max_slot} slots"
            )));
        }
        out.vocab_size = self.profile.vocab_size;
        out.sampled.clear();
        for &row in &batch.logits_rows {
            let (Some(&pos), Some(&tok)) = (batch.positions.get(row), batch.token_ids.get(row))
            else {
                return Err(BackendError::InvalidBatch(format!(
                    "logits row {row} out of range"
                )));
            };
            out.sampled.push(self.token_for(pos, tok));
        }
        let cost = self.profile.step_cost(batch);
        self.simulated_s += cost;
        if self.opts.time_scale > 0.0 {
            let now = Instant::now();
            let start = self.busy_until.filter(|t| *t > now).unwrap_or(now);
            let until = start + Duration::from_secs_f64(cost * self.opts.time_scale);
            if until > now {
                std::thread::sleep(until - now);
            }
            self.busy_until = Some(until);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::backend::SeqSlice;

    fn batch(seqs: &[(usize, usize)]) -> StepBatch {
        let mut b = StepBatch::default();
        for &(ctx, q) in seqs {
            let start = b.token_ids.len();
            for i in 0..q {
                b.token_ids.push(7);
                b.positions.push((ctx + i) as u32);
                b.slot_mapping.push(0);
            }
            b.seqs.push(SeqSlice {
                query_start: start,
                query_len: q,
                context_len: ctx,
            });
            b.logits_rows.push(b.token_ids.len() - 1);
        }
        b
    }

    #[test]
    fn decode_is_memory_bound_and_prefill_compute_bound() {
        let p = profile("l4-qwen2.5-7b").unwrap();
        assert_eq!(p.kv_bytes_per_token(), 57_344);
        // One decode token at context 1000: weights + 1001 tokens of KV over 240 GB/s + 2 ms.
        let expect = (15.23e9 + 1001.0 * 57_344.0) / 240e9 + 2e-3;
        assert!((p.step_cost(&batch(&[(1000, 1)])) - expect).abs() < 1e-12);
        // A 4096-token prefill: FLOPs dominate.
        let flops = 2.0 * 7.62e9 * 4096.0 + 4.0 * 28.0 * 3584.0 * 4096.0 * (4097.0 / 2.0);
        assert!((p.step_cost(&batch(&[(0, 4096)])) - (flops / 72e12 + 2e-3)).abs() < 1e-12);
        // Batching decode is nearly free while memory bound.
        assert!(p.step_cost(&batch(&[(100, 1); 32])) < 1.1 * p.step_cost(&batch(&[(100, 1)])));
    }

    #[test]
    fn kv_blocks_from_memory_budget_and_tokens_are_deterministic_non_special() {
        let opts = SimOptions {
            block_size: 16,
            gpu_memory_utilization: 0.9,
            time_scale: 0.0,
            seed: 3,
        };
        let mut sim = SimBackend::new(profile("h100-qwen2.5-7b").unwrap(), opts);
        let budget = H100_MEMORY * 0.9 - 15.23e9 - 4e9;
        assert_eq!(
            sim.available_kv_blocks(),
            (budget / (57_344.0 * 16.0)) as usize
        );
        sim.init_kv(100).unwrap();
        let b = batch(&[(0, 5), (3, 1)]);
        let mut out = StepOutput::default();
        sim.execute(&b, &mut out).unwrap();
        let first = out.sampled.clone();
        sim.execute(&b, &mut out).unwrap();
        assert_eq!(first, out.sampled);
        assert_eq!(first.len(), 2);
        assert!(first.iter().all(|&t| t < 151_643));
        for name in [
            "l4-qwen2.5-7b",
            "l4-qwen2.5-coder-14b-fp8",
            "h100-qwen2.5-7b",
        ] {
            let p = profile(name).unwrap();
            let sim = SimBackend::new(p.clone(), opts);
            // Every profile holds a full-length sequence at the default utilisation.
            assert!(sim.available_kv_blocks() * 16 >= p.max_model_len, "{name}");
        }
    }
}
