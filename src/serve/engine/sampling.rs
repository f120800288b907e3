//! Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeded RNG, logprobs.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::serve::protocol::{SamplingParams, TokenLogprobs};

/// Reusable scratch space for sampling (one per engine, no per-token allocation on the hot path).
#[derive(Debug, Default)]
pub struct Sampler {
    scratch: Vec<(f32, u32)>,
}

/// A request's RNG: seeded from the request's seed, else from the engine's seed and request id.
pub fn request_rng(params: &SamplingParams, engine_seed: u64, request_id: u64) -> StdRng {
    match params.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::seed_from_u64(engine_seed ^ request_id.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
    }
}

impl Sampler {
    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32], params: &SamplingParams, rng: &mut StdRng) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        if params.temperature <= 0.0 || params.top_k == 1 {
            return argmax(logits);
        }
        let inv_t = 1.0 / params.temperature;
        self.scratch.clear();
        self.scratch.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (l * inv_t, i as u32)),
        );
        let by_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
        if params.top_k > 0 && params.top_k < self.scratch.len() {
            self.scratch
                .select_nth_unstable_by(params.top_k - 1, by_desc);
            self.scratch.truncate(params.top_k);
        }
        let max = self
            .scratch
            .iter()
            .map(|p| p.0)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for p in &mut self.scratch {
            p.0 = (p.0 - max).exp();
            sum += p.0;
        }
        if !(sum.is_finite() && sum > 0.0) {
            return argmax(logits);
        }
        let mut mass = sum;
        if params.top_p < 1.0 {
            // Nucleus: keep the smallest prefix of the sorted distribution whose mass ≥ top_p.
            self.scratch.sort_unstable_by(by_desc);
            let mut acc = 0.0;
            let mut keep = self.scratch.len();
            for (i, p) in self.scratch.iter().enumerate() {
                acc += p.0;
                if acc >= params.top_p * sum {
                    keep = i + 1;
                    break;
                }
            }
            self.scratch.truncate(keep);
            mass = acc.min(sum);
        }
        let mut x = rng.random::<f32>() * mass;
        for p in &self.scratch {
            x -= p.0;
            if x <= 0.0 {
                return p.1;
            }
        }
        self.scratch.last().map_or(0, |p| p.1)
    }

    /// Log-softmax of `token` and the `top_n` most likely tokens of the raw `logits`.
    pub fn logprobs(&mut self, logits: &[f32], token: u32, top_n: usize) -> TokenLogprobs {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
        let logprob = logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| l - lse);
        let mut top = Vec::new();
        if top_n > 0 {
            self.scratch.clear();
            self.scratch
                .extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
            let n = top_n.min(self.scratch.len());
            let by_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
            if n < self.scratch.len() {
                self.scratch.select_nth_unstable_by(n - 1, by_desc);
                self.scratch.truncate(n);
            }
            self.scratch.sort_unstable_by(by_desc);
            top.extend(self.scratch.iter().map(|&(l, i)| (i, l - lse)));
        }
        TokenLogprobs { logprob, top }
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        // Strictly greater: ties go to the lowest id, so greedy output is deterministic.
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::default();
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            s.sample(&[0.1, 3.0, 3.0, -1.0], &params(0.0, 0, 1.0), &mut rng),
            1
        );
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let mut s = Sampler::default();
        let mut rng = StdRng::seed_from_u64(7);
        let logits = [5.0, 4.9, 0.0, -3.0, 4.8];
        for _ in 0..200 {
            let t = s.sample(&logits, &params(1.0, 2, 1.0), &mut rng);
            assert!(t == 0 || t == 1, "top_k=2 sampled {t}");
            // Token 0 has ~36% of the mass, so top_p 0.3 keeps only it.
            assert_eq!(s.sample(&logits, &params(1.0, 0, 0.3), &mut rng), 0);
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            seed: Some(42),
            ..params(0.8, 0, 0.9)
        };
        let run = || {
            let mut s = Sampler::default();
            let mut rng = request_rng(&p, 0, 1);
            (0..20)
                .map(|_| s.sample(&logits, &p, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn logprobs_are_log_softmax() {
        let mut s = Sampler::default();
        let lp = s.logprobs(&[0.0, 0.0f32.ln_1p(), 2.0f32.ln()], 2, 2);
        // softmax of [1, 1, 2] / 4 = [.25, .25, .5]
        assert!((lp.logprob - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(lp.top[0].0, 2);
        assert!((lp.top[1].1 - 0.25f32.ln()).abs() < 1e-6);
    }
}
