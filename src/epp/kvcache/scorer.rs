//! `precise-prefix-cache-scorer`: `matched / total` prefix blocks, where an endpoint with a live
//! KV-event stream is matched against the blocks it reported and any other endpoint against the
//! approximate index (the scheduler's prefix matches), so a pool mixing engines with and without
//! events is still scored on one scale.
//!
//! With `speculativeIndexing`, the scorer is also a [`RequestHook`]: after the decision it
//! credits the primary with the request keys its scoring computed (kept in the request's
//! scratch, no second tokenization) for `speculativeTTL` (see [`super::index`]).

use std::sync::Arc;

use super::accuracy::engine_hit_tokens;
use super::index::{chain_root, request_keys};
use super::Precise;
use crate::epp::endpoint::EndpointSnapshot;
use crate::epp::scheduling::plugins::{
    CycleState, Plugin, RequestHook, RequestScratch, Scorer, ScratchOwner,
};
use crate::epp::scheduling::SchedulingRequest;

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

/// The request's block keys as this scorer's index hashes them. Tokenizing is the scorer's main
/// cost, so they are computed once per request and kept in the request's
/// [`RequestScratch`]: other profiles, the primary's prediction and the speculative hook after
/// the decision reuse them, and they go when the request's decision does.
#[derive(Debug, Default)]
struct RequestKeys {
    /// Whether the prompt could be tokenized (else the fields below are empty).
    tokenized: bool,
    /// The prompt's token count.
    tokens: usize,
    /// The base model's chain.
    base: Vec<u64>,
    /// The target model's chain as a LoRA adapter, computed when an endpoint the keys were
    /// computed for holds blocks of that adapter.
    lora: Option<Vec<u64>>,
}

impl RequestKeys {
    /// The chain an endpoint is matched against: the adapter's when it holds blocks of the
    /// target model as a LoRA adapter, else the base model's; `None` when the adapter's chain
    /// was not computed.
    fn chain(&self, lora_held: bool) -> Option<&[u64]> {
        if lora_held {
            self.lora.as_deref()
        } else {
            Some(&self.base)
        }
    }
}

impl PrecisePrefixScorer {
    fn owner(&self) -> ScratchOwner {
        Arc::as_ptr(&self.precise) as ScratchOwner
    }

    /// `req`'s keys, from `scratch` when computed earlier in this decision with what `eps`
    /// need (the adapter chain when one of them holds the target model's adapter blocks).
    fn keys(
        &self,
        req: &SchedulingRequest<'_>,
        eps: &[Arc<EndpointSnapshot>],
        scratch: &RequestScratch,
    ) -> Arc<RequestKeys> {
        let p = &self.precise;
        let model = req.target_model;
        let needs_lora = || {
            eps.iter().any(|e| {
                p.index
                    .get(&e.endpoint.name)
                    .is_some_and(|b| b.has_lora(model))
            })
        };
        if let Some(keys) = scratch.get::<RequestKeys>(self.owner()) {
            // The adapter chain is computed with the base one; needed later (an adapter endpoint
            // the earlier call did not see), the prompt is tokenized again.
            if !keys.tokenized || keys.lora.is_some() || !needs_lora() {
                return keys;
            }
        }
        let mut keys = RequestKeys::default();
        if let Some(tokens) = p.prompt_tokens(req.api, req.prompt) {
            let bs = p.params.block_size;
            keys.tokens = tokens.len();
            request_keys(
                chain_root(&p.params.hash_seed, ""),
                bs,
                &tokens,
                &mut keys.base,
            );
            if needs_lora() {
                let mut lora = Vec::new();
                request_keys(
                    chain_root(&p.params.hash_seed, model),
                    bs,
                    &tokens,
                    &mut lora,
                );
                keys.lora = Some(lora);
            }
            keys.tokenized = true;
        }
        let keys = Arc::new(keys);
        scratch.put(self.owner(), Arc::clone(&keys));
        keys
    }

    fn score_with(
        &self,
        cycle: &CycleState<'_>,
        eps: &[Arc<EndpointSnapshot>],
        keys: &RequestKeys,
        out: &mut [f64],
    ) {
        let approx_total = cycle.prefix_hashes.len();
        for (i, (ep, o)) in eps.iter().zip(out.iter_mut()).enumerate() {
            let live = self
                .precise
                .index
                .get(&ep.endpoint.name)
                .filter(|b| b.is_live());
            let chain = live.as_ref().filter(|_| keys.tokenized).map(|blocks| {
                (
                    blocks,
                    keys.chain(blocks.has_lora(cycle.request.target_model))
                        .unwrap_or_default(),
                )
            });
            *o = match chain {
                Some((_, [])) => 0.0,
                Some((blocks, chain)) => blocks.matched(chain) as f64 / chain.len() as f64,
                // No event stream (or an untokenizable prompt): the approximate index's view.
                None => {
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
}

impl Scorer for PrecisePrefixScorer {
    fn score(&self, cycle: &CycleState<'_>, eps: &[Arc<EndpointSnapshot>], out: &mut [f64]) {
        let keys = self.keys(cycle.request, eps, cycle.scratch);
        self.score_with(cycle, eps, &keys, out);
    }

    /// `engine_hit_tokens` of the primary's matched blocks when its event stream is live.
    fn predicted_cached_tokens(
        &self,
        req: &SchedulingRequest<'_>,
        endpoint: &Arc<EndpointSnapshot>,
        scratch: &RequestScratch,
    ) -> Option<u64> {
        let blocks = self
            .precise
            .index
            .get(&endpoint.endpoint.name)
            .filter(|b| b.is_live())?;
        let keys = self.keys(req, std::slice::from_ref(endpoint), scratch);
        if !keys.tokenized {
            return None;
        }
        let chain = keys.chain(blocks.has_lora(req.target_model))?;
        let bs = self.precise.params.block_size as u64;
        let matched = blocks.matched(chain) as u64;
        // Whole engine blocks are what the engine can hit (ours divide its size).
        let engine_block = blocks.engine_block_size().map_or(bs, |b| b as u64);
        Some(engine_hit_tokens(
            matched.saturating_mul(bs),
            keys.tokens as u64,
            engine_block,
        ))
    }

    fn uses_prefix_matches(&self) -> bool {
        true
    }
}

impl RequestHook for PrecisePrefixScorer {
    /// Credits the primary with the keys the scoring computed for this request. A request
    /// this scorer did not score, an untokenizable prompt or an endpoint without a live stream
    /// is not credited: tokenizing again here would double the scorer's cost.
    fn pre_request(
        &self,
        req: &SchedulingRequest<'_>,
        primary: &EndpointSnapshot,
        scratch: &RequestScratch,
    ) {
        let Some(ttl) = self.precise.params.speculative_ttl else {
            return;
        };
        let Some(blocks) = self
            .precise
            .index
            .get(&primary.endpoint.name)
            .filter(|b| b.is_live())
        else {
            return;
        };
        let Some(keys) = scratch.get::<RequestKeys>(self.owner()) else {
            return;
        };
        if !keys.tokenized {
            return;
        }
        if let Some(chain) = keys.chain(blocks.has_lora(req.target_model)) {
            self.precise.index.credit(&blocks, chain, ttl);
        }
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
            scratch: &RequestScratch::new(),
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

    /// Stores the first `blocks` blocks of `tokens` on `ep` as one engine event.
    fn store(precise: &Precise, ep: &str, tokens: &[u32], blocks: usize, block: usize) {
        let e = precise.index.endpoint(ep);
        e.set_live(true);
        precise.index.apply(
            &e,
            &Event::Stored(BlockStored {
                block_hashes: (1..=blocks as u64).collect(),
                token_ids: tokens[..blocks * block].to_vec(),
                block_size: block as u32,
                ..BlockStored::default()
            }),
        );
    }

    #[test]
    fn predicts_what_the_engine_reports_for_the_primary() {
        let precise = Arc::new(
            Precise::new(PreciseParams {
                block_size: 4,
                ..PreciseParams::default()
            })
            .unwrap(),
        );
        // 64 bytes: 16 tokens, 4 blocks of 4.
        let prompt = b"0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789ABCDEF";
        let tokens = precise.prompt_tokens(ApiType::Completions, prompt).unwrap();
        assert_eq!(tokens.len(), 16);
        // "full" holds all 4 blocks, "half" 2; "quiet" has blocks but no live stream; "eight"
        // holds all of them in engine blocks of 8 tokens.
        store(&precise, "full", &tokens, 4, 4);
        store(&precise, "half", &tokens, 2, 4);
        store(&precise, "quiet", &tokens, 4, 4);
        precise.index.endpoint("quiet").set_live(false);
        store(&precise, "eight", &tokens, 2, 8);
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
        let scratch = RequestScratch::new();
        let cycle = CycleState {
            request: &req,
            prefix_hashes: &[],
            prefix_block_tokens: 4,
            prefix_matches: &[],
            scratch: &scratch,
        };
        let eps = [ep("full"), ep("half"), ep("quiet"), ep("eight"), ep("none")];
        let mut out = [9.0; 5];
        s.score(&cycle, &eps, &mut out);
        assert_eq!(out, [1.0, 0.5, 0.0, 1.0, 0.0]);
        // The scoring kept the request's keys for the rest of its decision.
        let keys = scratch.get::<RequestKeys>(s.owner()).unwrap();
        assert_eq!(
            (keys.tokenized, keys.tokens, keys.base.len()),
            (true, 16, 4)
        );
        let predicted: Vec<Option<u64>> = eps
            .iter()
            .map(|e| s.predicted_cached_tokens(&req, e, &scratch))
            .collect();
        // Fully cached: the engine computes the last token, so the last block is not a hit
        // (3 of 4 blocks; with engine blocks of 8, 1 of 2).
        assert_eq!(predicted, [Some(12), Some(8), None, Some(8), None]);

        // Asked for a request that was not scored (a fresh scratch), the keys are computed.
        let other = SchedulingRequest {
            request_id: "other",
            prompt: &prompt[..32],
            ..req
        };
        let fresh = RequestScratch::new();
        assert_eq!(s.predicted_cached_tokens(&other, &eps[0], &fresh), Some(4));
        assert_eq!(s.predicted_cached_tokens(&req, &eps[1], &scratch), Some(8));
    }

    #[test]
    fn adapter_blocks_are_matched_on_the_adapter_chain() {
        let precise = Arc::new(
            Precise::new(PreciseParams {
                block_size: 4,
                ..PreciseParams::default()
            })
            .unwrap(),
        );
        let prompt = b"0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789ABCDEF";
        let tokens = precise.prompt_tokens(ApiType::Completions, prompt).unwrap();
        // "ad" holds the first 2 blocks as adapter "m" (chained from the adapter's root).
        let ad = precise.index.endpoint("ad");
        ad.set_live(true);
        precise.index.apply(
            &ad,
            &Event::Stored(BlockStored {
                block_hashes: vec![7, 8],
                token_ids: tokens[..8].to_vec(),
                block_size: 4,
                lora_name: Some("m".into()),
                ..BlockStored::default()
            }),
        );
        store(&precise, "base", &tokens, 4, 4);
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
        let scratch = RequestScratch::new();
        let cycle = CycleState {
            request: &req,
            prefix_hashes: &[],
            prefix_block_tokens: 4,
            prefix_matches: &[],
            scratch: &scratch,
        };
        // Scored without the adapter endpoint, the keys have no adapter chain; the prediction
        // for it tokenizes again and keeps both chains.
        let base_only = [ep("base")];
        let mut out = [9.0; 1];
        s.score(&cycle, &base_only, &mut out);
        assert_eq!(out, [1.0]);
        assert!(scratch
            .get::<RequestKeys>(s.owner())
            .is_some_and(|k| k.lora.is_none()));
        assert_eq!(
            s.predicted_cached_tokens(&req, &ep("ad"), &scratch),
            Some(8)
        );
        assert!(scratch.get::<RequestKeys>(s.owner()).is_some_and(|k| k
            .lora
            .as_ref()
            .map(Vec::len)
            == Some(4)));
        // A new request's decision scoring both endpoints computes both chains at once.
        let scratch = RequestScratch::new();
        let cycle = CycleState {
            scratch: &scratch,
            ..cycle
        };
        let both = [ep("base"), ep("ad")];
        let mut out = [9.0; 2];
        s.score(&cycle, &both, &mut out);
        assert_eq!(out, [1.0, 0.5]);
        assert_eq!(s.predicted_cached_tokens(&req, &both[1], &scratch), Some(8));
        assert_eq!(
            s.predicted_cached_tokens(&req, &both[0], &scratch),
            Some(12)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn decisions_credit_the_primary_until_events_confirm_or_the_ttl_ends() {
        let ttl = std::time::Duration::from_secs(2);
        let precise = Arc::new(
            Precise::new(PreciseParams {
                block_size: 4,
                speculative_ttl: Some(ttl),
                ..PreciseParams::default()
            })
            .unwrap(),
        );
        // 64 bytes: 16 tokens, 4 blocks of 4.
        let prompt = b"0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789ABCDEF";
        let tokens = precise.prompt_tokens(ApiType::Completions, prompt).unwrap();
        for name in ["a", "b"] {
            precise.index.endpoint(name).set_live(true);
        }
        let s = PrecisePrefixScorer {
            name: "p".into(),
            precise: precise.clone(),
        };
        let eps = [ep("a"), ep("b")];
        let req = SchedulingRequest {
            request_id: "r1",
            target_model: "m",
            api: ApiType::Completions,
            prompt,
            cache_salt: b"",
            fallbacks: 0,
            headers: &[],
        };
        // Scores `request_id` with the prompt, as a fresh request (its own scratch).
        let score = |id: &str| {
            let r = SchedulingRequest {
                request_id: id,
                ..req
            };
            let cycle = CycleState {
                request: &r,
                prefix_hashes: &[],
                prefix_block_tokens: 4,
                prefix_matches: &[],
                scratch: &RequestScratch::new(),
            };
            let mut out = [9.0; 2];
            s.score(&cycle, &eps, &mut out);
            out
        };
        let scratch = RequestScratch::new();
        let cycle = CycleState {
            request: &req,
            prefix_hashes: &[],
            prefix_block_tokens: 4,
            prefix_matches: &[],
            scratch: &scratch,
        };
        let mut out = [9.0; 2];
        s.score(&cycle, &eps, &mut out);
        assert_eq!(out, [0.0, 0.0]);
        // The decision: "a". Before any event the next request with this prompt finds it.
        s.pre_request(&req, &eps[0], &scratch);
        let a = precise.index.get("a").unwrap();
        assert_eq!(a.speculative_len(), 4);
        assert_eq!(score("r2"), [1.0, 0.0]);
        assert_eq!(s.predicted_cached_tokens(&req, &eps[0], &scratch), Some(12));
        tokio::time::advance(ttl - std::time::Duration::from_millis(1)).await;
        assert_eq!(score("r3"), [1.0, 0.0]);
        // "a" never stored them: after the TTL it is not credited any more.
        tokio::time::advance(std::time::Duration::from_millis(1)).await;
        assert_eq!(score("r4"), [0.0, 0.0]);

        // Routed to "b", whose engine then stores the first 3 blocks: those outlive the TTL.
        let req5 = SchedulingRequest {
            request_id: "r5",
            ..req
        };
        let scratch5 = RequestScratch::new();
        let cycle5 = CycleState {
            request: &req5,
            scratch: &scratch5,
            ..cycle
        };
        s.score(&cycle5, &eps, &mut out);
        s.pre_request(&req5, &eps[1], &scratch5);
        assert_eq!(score("r6"), [0.0, 1.0]);
        store(&precise, "b", &tokens, 3, 4);
        assert_eq!(precise.index.get("b").unwrap().speculative_len(), 1);
        tokio::time::advance(ttl).await;
        assert_eq!(score("r7"), [0.0, 0.75]);

        // A request whose decision computed no keys is not credited (no second tokenization).
        let other = SchedulingRequest {
            request_id: "other",
            ..req
        };
        s.pre_request(&other, &eps[0], &RequestScratch::new());
        assert_eq!(score("r8"), [0.0, 0.75]);
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
