//! `precise-prefix-cache-scorer`: `matched / total` prefix blocks, where an endpoint with a live
//! KV-event stream is matched against the blocks it reported and any other endpoint against the
//! approximate index (the scheduler's prefix matches), so a pool mixing engines with and without
//! events is still scored on one scale.

use std::sync::Arc;

use super::index::{chain_root, request_keys};
use super::Precise;
use crate::epp::endpoint::EndpointSnapshot;
use crate::epp::scheduling::plugins::{CycleState, Plugin, Scorer};

#[derive(Debug)]
pub struct PrecisePrefixScorer {
    pub name: String,
    pub precise: Arc<Precise>,
}

impl Plugin for PrecisePrefixScorer {
    fn plugin_type(&self) -> &'static str {
        "precise-prefix-cache-scorer"
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// The prompt's request keys for the base model, and for the target model as a LoRA adapter
/// when an endpoint holds blocks of that adapter.
struct PromptKeys {
    base: Vec<u64>,
    lora: Option<Vec<u64>>,
}

impl PrecisePrefixScorer {
    fn keys(&self, cycle: &CycleState<'_>, eps: &[Arc<EndpointSnapshot>]) -> Option<PromptKeys> {
        let p = &self.precise;
        let tokens = p.prompt_tokens(cycle.request.api, cycle.request.prompt)?;
        let bs = p.params.block_size;
        let mut base = Vec::with_capacity(tokens.len() / bs.max(1));
        request_keys(chain_root(&p.params.hash_seed, ""), bs, &tokens, &mut base);
        let model = cycle.request.target_model;
        let lora = eps
            .iter()
            .any(|e| {
                p.index
                    .get(&e.endpoint.name)
                    .is_some_and(|b| b.has_lora(model))
            })
            .then(|| {
                let mut keys = Vec::with_capacity(base.len());
                request_keys(
                    chain_root(&p.params.hash_seed, model),
                    bs,
                    &tokens,
                    &mut keys,
                );
                keys
            });
        Some(PromptKeys { base, lora })
    }
}

impl Scorer for PrecisePrefixScorer {
    fn score(&self, cycle: &CycleState<'_>, eps: &[Arc<EndpointSnapshot>], out: &mut [f64]) {
        let keys = self.keys(cycle, eps);
        let approx_total = cycle.prefix_hashes.len();
        for (i, (ep, o)) in eps.iter().zip(out.iter_mut()).enumerate() {
            let live = self
                .precise
                .index
                .get(&ep.endpoint.name)
                .filter(|b| b.is_live());
            *o = match (live, &keys) {
                (Some(blocks), Some(k)) => {
                    let chain = match &k.lora {
                        Some(l) if blocks.has_lora(cycle.request.target_model) => l,
                        _ => &k.base,
                    };
                    if chain.is_empty() {
                        0.0
                    } else {
                        blocks.matched(chain) as f64 / chain.len() as f64
                    }
                }
                // No event stream (or an untokenizable prompt): the approximate index's view.
                _ => {
                    let m = cycle.prefix_matches.get(i).copied().unwrap_or(0);
                    if approx_total == 0 {
                        0.0
                    } else {
                        m as f64 / approx_total as f64
                    }
                }
            };
        }
    }

    fn uses_prefix_matches(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epp::endpoint::{Endpoint, EndpointMetrics};
    use crate::epp::kvcache::PreciseParams;
    use crate::epp::request::ApiType;
    use crate::epp::scheduling::SchedulingRequest;
    use crate::kvwire::{BlockStored, Event};

    fn ep(name: &str) -> Arc<EndpointSnapshot> {
        let mut endpoint = Endpoint::from_addr("127.0.0.1:8000".parse().unwrap());
        endpoint.name = name.to_string();
        Arc::new(EndpointSnapshot {
            endpoint: Arc::new(endpoint),
            metrics: EndpointMetrics::default(),
            dispatch: None,
        })
    }

    #[test]
    fn live_endpoints_by_their_blocks_others_by_the_approximate_index() {
        let precise = Arc::new(
            Precise::new(PreciseParams {
                block_size: 2,
                ..PreciseParams::default()
            })
            .unwrap(),
        );
        // The approximate codec: 4 bytes per token, so 16 bytes = 4 tokens = 2 blocks.
        let prompt = b"aaaabbbbccccdddd";
        let tokens = precise.prompt_tokens(ApiType::Completions, prompt).unwrap();
        assert_eq!(tokens.len(), 4);
        let a = precise.index.endpoint("a");
        a.set_live(true);
        precise.index.apply(
            &a,
            &Event::Stored(BlockStored {
                block_hashes: vec![1],
                token_ids: tokens[..2].to_vec(),
                block_size: 2,
                ..BlockStored::default()
            }),
        );
        // "b" is live but empty; "c" has no stream: approximate matches (1 of 4 hashes).
        precise.index.endpoint("b").set_live(true);
        let s = PrecisePrefixScorer {
            name: "p".into(),
            precise: precise.clone(),
        };
        let req = SchedulingRequest {
            request_id: "r",
            target_model: "m",
            api: ApiType::Completions,
            prompt,
            cache_salt: b"",
            fallbacks: 0,
            headers: &[],
        };
        let cycle = CycleState {
            request: &req,
            prefix_hashes: &[1, 2, 3, 4],
            prefix_block_tokens: 1,
            prefix_matches: &[4, 4, 1],
        };
        let eps = [ep("a"), ep("b"), ep("c")];
        let mut out = [9.0; 3];
        s.score(&cycle, &eps, &mut out);
        assert_eq!(out, [0.5, 0.0, 0.25]);
        // Once "a" loses its stream it is scored like "c".
        a.set_live(false);
        s.score(&cycle, &eps, &mut out);
        assert_eq!(out, [1.0, 0.0, 0.25]);
        assert!(s.uses_prefix_matches());
    }

    #[test]
    fn tokenizes_token_arrays_and_chat_messages() {
        let precise = Precise::new(PreciseParams::default()).unwrap();
        assert_eq!(
            precise.prompt_tokens(ApiType::Completions, b"[1,2,3]"),
            Some(vec![1, 2, 3])
        );
        let chat = precise
            .prompt_tokens(
                ApiType::ChatCompletions,
                br#"[{"role":"user","content":"hi"}]"#,
            )
            .unwrap();
        // ChatML "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n": 52 bytes, 13 tokens.
        assert_eq!(chat.len(), 13);
        assert_eq!(
            precise.prompt_tokens(ApiType::ChatCompletions, b"not json"),
            None
        );
        assert_eq!(precise.prompt_tokens(ApiType::Embeddings, b"x"), None);
    }
}
