//! The prefix cache as scheduling uses it: how a request is hashed for the shared
//! [`PrefixIndex`] (the reference's PrepareData), and how a routed request is remembered
//! ([`PrefixCache::record`], the reference's PreRequest), called by the director after the
//! decision. Scoring itself only reads.

use std::sync::Arc;

use prometheus_client::metrics::histogram::Histogram;

use super::{ScheduleResult, SchedulingRequest};
use crate::epp::endpoint::EndpointSnapshot;
use crate::epp::prefix::{self, PrefixCacheParams, PrefixIndex, PrefixIndexConfig};

/// Reference buckets (`pkg/epp/metrics/metrics.go`).
const HIT_RATIO_BUCKETS: [f64; 11] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
const HIT_BYTES_BUCKETS: [f64; 14] = [
    0.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
    65536.0,
];

/// The shared prefix index with its parameters and hit metrics. Shared by all request tasks.
#[derive(Debug)]
pub struct PrefixCache {
    index: Arc<PrefixIndex>,
    params: PrefixCacheParams,
    pub(super) hit_ratio: Histogram,
    pub(super) hit_bytes: Histogram,
}

impl PrefixCache {
    pub fn new(params: PrefixCacheParams) -> Self {
        PrefixCache {
            index: Arc::new(PrefixIndex::new(PrefixIndexConfig {
                lru_capacity_per_endpoint: params.lru_capacity_per_server,
            })),
            params,
            hit_ratio: Histogram::new(HIT_RATIO_BUCKETS),
            hit_bytes: Histogram::new(HIT_BYTES_BUCKETS),
        }
    }

    /// Histograms for the (unregistered) case without a prefix plugin.
    pub(super) fn empty_histograms() -> (Histogram, Histogram) {
        (
            Histogram::new(HIT_RATIO_BUCKETS),
            Histogram::new(HIT_BYTES_BUCKETS),
        )
    }

    pub fn index(&self) -> &Arc<PrefixIndex> {
        &self.index
    }

    /// Block size (tokens): the first candidate's reported KV block size under autoTune.
    fn block_tokens(&self, candidates: &[Arc<EndpointSnapshot>]) -> usize {
        if self.params.auto_tune {
            if let Some(b) = candidates
                .first()
                .and_then(|c| c.metrics.kv_block_size)
                .filter(|&b| b > 0)
            {
                return b as usize;
            }
        }
        self.params.block_size_tokens
    }

    /// Hashes the request's prompt into `out`; returns the block size (tokens) used.
    pub fn hash(
        &self,
        req: &SchedulingRequest<'_>,
        candidates: &[Arc<EndpointSnapshot>],
        out: &mut Vec<u64>,
    ) -> usize {
        let block = self.block_tokens(candidates);
        let max_blocks = if self.params.max_prefix_tokens_to_match > 0 && block > 0 {
            self.params.max_prefix_tokens_to_match / block
        } else {
            self.params.max_prefix_blocks_to_match
        };
        prefix::hash_prompt(
            req.target_model.as_bytes(),
            req.cache_salt,
            req.prompt,
            block,
            max_blocks,
            out,
        );
        block
    }

    /// LRU capacity for a newly seen endpoint: its KV block count under autoTune.
    fn capacity_hint(&self, endpoint: &EndpointSnapshot) -> Option<usize> {
        if !self.params.auto_tune {
            return None;
        }
        endpoint
            .metrics
            .kv_num_blocks
            .filter(|&n| n > 0)
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Remembers that the request's prompt now sits on its primary endpoint, and observes the
    /// hit metrics for the lookup the decision was based on.
    pub fn record(&self, result: &ScheduleResult) {
        let Some(primary) = result.primary() else {
            return;
        };
        self.index.record(
            &result.prefix_hashes,
            &primary.endpoint.name,
            self.capacity_hint(primary),
        );
        let chars = prefix::AVERAGE_CHARS_PER_TOKEN * result.prefix_block_tokens;
        self.hit_bytes
            .observe((result.prefix_matched_blocks * chars) as f64);
        if !result.prefix_hashes.is_empty() {
            self.hit_ratio
                .observe(result.prefix_matched_blocks as f64 / result.prefix_hashes.len() as f64);
        }
    }
}
