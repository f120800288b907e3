//! Endpoints (one per pod × target port) and the live metrics scraped from them.
//!
//! Scrapers publish a fresh immutable [`EndpointSnapshot`] per endpoint; the scheduler works on a
//! `&[Arc<EndpointSnapshot>]` taken once per request, so no lock is held while scoring.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

/// Model-server flavour, which decides the metric names scraped from it (REFERENCE.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EngineType {
    #[default]
    Vllm,
    Sglang,
    TrtllmServe,
    TritonTensorrtLlm,
}

impl EngineType {
    /// Pod label that selects the engine type (default `vllm`).
    pub const LABEL: &'static str = "inference.networking.k8s.io/engine-type";

    pub fn as_str(self) -> &'static str {
        match self {
            EngineType::Vllm => "vllm",
            EngineType::Sglang => "sglang",
            EngineType::TrtllmServe => "trtllm-serve",
            EngineType::TritonTensorrtLlm => "triton-tensorrt-llm",
        }
    }
}

impl fmt::Display for EngineType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown engine type {0:?} (expected vllm, sglang, trtllm-serve or triton-tensorrt-llm)")]
pub struct UnknownEngineType(pub String);

impl FromStr for EngineType {
    type Err = UnknownEngineType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vllm" | "" => Ok(EngineType::Vllm),
            "sglang" => Ok(EngineType::Sglang),
            "trtllm-serve" => Ok(EngineType::TrtllmServe),
            "triton-tensorrt-llm" => Ok(EngineType::TritonTensorrtLlm),
            other => Err(UnknownEngineType(other.to_string())),
        }
    }
}

/// A routable model-server endpoint: pod IP × target port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Stable name, unique in the pool (`<pod>-rank-<i>` in Kubernetes; the address for static lists).
    pub name: String,
    pub addr: SocketAddr,
    pub engine: EngineType,
    pub labels: BTreeMap<String, String>,
}

impl Endpoint {
    /// An endpoint named by its address, with the default engine and no labels.
    pub fn from_addr(addr: SocketAddr) -> Self {
        Endpoint {
            name: addr.to_string(),
            addr,
            engine: EngineType::default(),
            labels: BTreeMap::new(),
        }
    }
}

/// LoRA adapter state reported by vLLM's `vllm:lora_requests_info`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraInfo {
    pub max_lora: u32,
    pub running: Vec<String>,
    pub waiting: Vec<String>,
}

/// Last scraped metrics of one endpoint. `updated_at == None` means never scraped successfully.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointMetrics {
    pub waiting_queue_size: u32,
    pub running_requests: u32,
    /// KV-cache utilisation in 0..=1.
    pub kv_cache_usage: f64,
    pub kv_block_size: Option<u32>,
    pub kv_num_blocks: Option<u64>,
    pub lora: Option<LoraInfo>,
    pub updated_at: Option<Instant>,
}

impl EndpointMetrics {
    /// True when the last successful scrape is older than `threshold` (or there was none).
    pub fn is_stale(&self, now: Instant, threshold: std::time::Duration) -> bool {
        match self.updated_at {
            Some(t) => now.saturating_duration_since(t) > threshold,
            None => true,
        }
    }
}

/// Immutable view of one endpoint at one moment: what scheduling reads.
#[derive(Debug, Clone)]
pub struct EndpointSnapshot {
    pub endpoint: Arc<Endpoint>,
    pub metrics: EndpointMetrics,
}
