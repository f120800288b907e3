//! `precise-prefix-cache-scorer` parameters as llm-d-router writes them (they forward to
//! llm-d-kv-cache's `tokenProcessorConfig`, `indexerConfig` and `kvEventsConfig`), validated into
//! [`PreciseParams`]. Keys Switchyard cannot honour are rejected by name; keys that only tune
//! llm-d's own machinery (worker counts, metric logging) are accepted and documented as such.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Validated parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreciseParams {
    /// Tokens per request-key block (`tokenProcessorConfig.blockSizeTokens` / `blockSize`).
    pub block_size: usize,
    /// Seeds the request-key chain (`tokenProcessorConfig.hashSeed`).
    pub hash_seed: String,
    /// Directory holding `tokenizer.json` (`indexerConfig.tokenizersPoolConfig.local
    /// .autoDiscoveryDir`, plus `modelName` as a subdirectory when that holds one); `None` uses
    /// the approximate codec of `serve --backend sim` without `--model`.
    pub tokenizer_dir: Option<PathBuf>,
    /// Request keys kept per endpoint (`indexerConfig.kvBlockIndexConfig.inMemoryConfig.size`).
    pub max_keys_per_endpoint: usize,
    /// ZMQ subscription prefix (`kvEventsConfig.topicFilter`).
    pub topic_filter: String,
    /// Port of each pod's ZMQ publisher (`kvEventsConfig.podDiscoveryConfig.socketPort`).
    pub socket_port: u16,
    /// Switchyard: subscribe to the decode server's gRPC stream on this port instead of ZMQ
    /// (`kvEventsConfig.grpcPort`).
    pub grpc_port: Option<u16>,
    /// Switchyard: per-endpoint event sources, `"ip:port"` → `tcp://HOST:PORT` (ZMQ) or
    /// `grpc://HOST:PORT` (`kvEventsConfig.endpointSockets`), overriding the two above.
    pub endpoint_sockets: BTreeMap<String, String>,
    /// Switchyard: the bearer token gRPC subscriptions present, read from
    /// `kvEventsConfig.grpcTokenFile` (the decode servers' `--kv-events-token-file`).
    pub grpc_token: Option<BearerToken>,
    /// How long a routing decision credits the chosen endpoint with the prompt's blocks
    /// (`speculativeTTL` when `speculativeIndexing: true`); `None` when speculative indexing is
    /// off.
    pub speculative_ttl: Option<Duration>,
}

/// A secret that never reaches a log: `Debug` prints its length only.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    /// The token's first line, trimmed (as `serve --kv-events-token-file` reads it).
    pub fn from_file_text(text: &str) -> Option<Self> {
        let t = text.lines().next().unwrap_or("").trim();
        (!t.is_empty()).then(|| BearerToken(t.to_owned()))
    }

    /// The `authorization` header value.
    pub fn header_value(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BearerToken(<{} bytes>)", self.0.len())
    }
}

impl Default for PreciseParams {
    fn default() -> Self {
        PreciseParams {
            block_size: 16,
            hash_seed: String::new(),
            tokenizer_dir: None,
            max_keys_per_endpoint: DEFAULT_MAX_KEYS_PER_ENDPOINT,
            topic_filter: "kv@".into(),
            socket_port: 5557,
            grpc_port: None,
            endpoint_sockets: BTreeMap::new(),
            grpc_token: None,
            speculative_ttl: None,
        }
    }
}

/// llm-d's `defaultSpeculativeTTL`: used when `speculativeTTL` is empty, zero or negative.
pub const DEFAULT_SPECULATIVE_TTL: Duration = Duration::from_secs(2);

/// About 60 MB per endpoint at capacity; a replica with 16-token blocks and 1M blocks of KV
/// cache (16M tokens) fits.
pub const DEFAULT_MAX_KEYS_PER_ENDPOINT: usize = 1 << 20;

/// Why the parameters were rejected (each names the key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreciseParamError {
    #[error("tokenProcessorConfig.blockSizeTokens must be > 0, got {0}")]
    BlockSize(i64),
    #[error("indexerConfig.kvBlockIndexConfig.inMemoryConfig.size must be > 0, got {0}")]
    Size(i64),
    #[error("{0} is not supported by switchyard (the precise index is in memory)")]
    Backend(&'static str),
    #[error("indexerConfig.tokenizersPoolConfig.hf is not supported by switchyard (no downloads at run time): set local.autoDiscoveryDir to a directory holding tokenizer.json")]
    HfTokenizer,
    #[error("kvEventsConfig.engineType {0:?} is not supported by switchyard (only \"vllm\")")]
    EngineType(String),
    #[error("kvEventsConfig.zmqEndpoint (one central SUB socket the engines connect to) is not supported by switchyard: the EPP subscribes to each endpoint (discoverPods)")]
    ZmqEndpoint,
    #[error("kvEventsConfig.discoverPods: false needs kvEventsConfig.endpointSockets (switchyard has no central socket)")]
    NoDiscovery,
    #[error("kvEventsConfig.podDiscoveryConfig.socketPort must be in 1..=65535, got {0}")]
    SocketPort(i64),
    #[error("kvEventsConfig.endpointSockets[{key:?}] = {value:?}: expected tcp://HOST:PORT or grpc://HOST:PORT")]
    EndpointSocket { key: String, value: String },
    #[error("{key}: {reason}")]
    Duration { key: &'static str, reason: String },
    #[error("tokenizer in {path}: {reason}")]
    Tokenizer { path: String, reason: String },
    #[error("kvEventsConfig.grpcTokenFile {path}: {reason}")]
    TokenFile { path: String, reason: String },
}

// --- wire ----------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WirePreciseParams {
    token_processor_config: Option<WireTokenProcessor>,
    indexer_config: Option<WireIndexer>,
    kv_events_config: Option<WireKvEvents>,
    speculative_indexing: Option<bool>,
    #[serde(rename = "speculativeTTL")]
    speculative_ttl: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireTokenProcessor {
    block_size: Option<i64>,
    block_size_tokens: Option<i64>,
    hash_seed: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireIndexer {
    kv_block_index_config: Option<WireBlockIndex>,
    tokenizers_pool_config: Option<WireTokenizers>,
    kv_cache_backend_configs: Option<serde_yaml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireBlockIndex {
    in_memory_config: Option<WireInMemory>,
    cost_aware_memory_config: Option<serde_yaml::Value>,
    redis_config: Option<serde_yaml::Value>,
    valkey_config: Option<serde_yaml::Value>,
    /// Metrics are always on in switchyard.
    enable_metrics: Option<bool>,
    metrics_logging_interval: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireInMemory {
    size: Option<i64>,
    /// Pods per key: the index is per endpoint here, so there is no such limit to set.
    pod_cache_size: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireTokenizers {
    model_name: Option<String>,
    workers_count: Option<i64>,
    hf: Option<serde_yaml::Value>,
    local: Option<WireLocalTokenizer>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireLocalTokenizer {
    auto_discovery_dir: Option<String>,
    auto_discovery_tokenizer_file_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireKvEvents {
    zmq_endpoint: Option<String>,
    topic_filter: Option<String>,
    concurrency: Option<i64>,
    engine_type: Option<String>,
    discover_pods: Option<bool>,
    pod_discovery_config: Option<WirePodDiscovery>,
    grpc_port: Option<u16>,
    endpoint_sockets: Option<BTreeMap<String, String>>,
    grpc_token_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WirePodDiscovery {
    /// The EPP follows the InferencePool's endpoints instead of its own pod watch.
    pod_label_selector: Option<String>,
    pod_namespace: Option<String>,
    socket_port: Option<i64>,
}

/// Whether `s` is `tcp://HOST:PORT` or `grpc://HOST:PORT` with a numeric port.
pub fn valid_socket(s: &str) -> bool {
    let rest = s
        .strip_prefix("tcp://")
        .or_else(|| s.strip_prefix("grpc://"));
    matches!(rest.and_then(|r| r.rsplit_once(':')), Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok())
}

impl WirePreciseParams {
    pub fn validate(self) -> Result<PreciseParams, PreciseParamError> {
        let d = PreciseParams::default();
        // Checked even with speculative indexing off (llm-d only parses it when on), so a typo
        // shows before someone turns it on.
        let ttl = match self.speculative_ttl.as_deref().map(str::trim) {
            None | Some("") => DEFAULT_SPECULATIVE_TTL,
            Some(t) => {
                // Go's ParseDuration takes a sign; llm-d uses its default for a TTL <= 0.
                let (negative, magnitude) = match t.strip_prefix('-') {
                    Some(m) => (true, m),
                    None => (false, t.strip_prefix('+').unwrap_or(t)),
                };
                let d = crate::flagfmt::parse_go_duration(magnitude).map_err(|reason| {
                    PreciseParamError::Duration {
                        key: "speculativeTTL",
                        reason,
                    }
                })?;
                if negative || d.is_zero() {
                    DEFAULT_SPECULATIVE_TTL
                } else {
                    d
                }
            }
        };
        let speculative_ttl = (self.speculative_indexing == Some(true)).then_some(ttl);
        let tp = self.token_processor_config.unwrap_or_default();
        let block = tp
            .block_size_tokens
            .filter(|&b| b != 0)
            .or(tp.block_size)
            .unwrap_or(d.block_size as i64);
        let block_size = usize::try_from(block)
            .ok()
            .filter(|&b| b > 0)
            .ok_or(PreciseParamError::BlockSize(block))?;

        let ix = self.indexer_config.unwrap_or_default();
        if ix.kv_cache_backend_configs.is_some() {
            return Err(PreciseParamError::Backend(
                "indexerConfig.kvCacheBackendConfigs",
            ));
        }
        let bi = ix.kv_block_index_config.unwrap_or_default();
        if bi.cost_aware_memory_config.is_some() {
            return Err(PreciseParamError::Backend(
                "indexerConfig.kvBlockIndexConfig.costAwareMemoryConfig",
            ));
        }
        if bi.redis_config.is_some() || bi.valkey_config.is_some() {
            return Err(PreciseParamError::Backend(
                "indexerConfig.kvBlockIndexConfig.redisConfig",
            ));
        }
        if let Some(i) = &bi.metrics_logging_interval {
            crate::flagfmt::parse_go_duration(i).map_err(|reason| PreciseParamError::Duration {
                key: "indexerConfig.kvBlockIndexConfig.metricsLoggingInterval",
                reason,
            })?;
        }
        let _ = bi.enable_metrics;
        let size = bi
            .in_memory_config
            .as_ref()
            .and_then(|m| m.size)
            .unwrap_or(d.max_keys_per_endpoint as i64);
        let max_keys_per_endpoint = usize::try_from(size)
            .ok()
            .filter(|&s| s > 0)
            .ok_or(PreciseParamError::Size(size))?;
        let _ = bi.in_memory_config.and_then(|m| m.pod_cache_size);

        let mut tokenizer_dir = None;
        if let Some(tk) = ix.tokenizers_pool_config {
            if tk.hf.is_some() {
                return Err(PreciseParamError::HfTokenizer);
            }
            let _ = tk.workers_count;
            if let Some(local) = tk.local {
                let _ = local.auto_discovery_tokenizer_file_name;
                if let Some(dir) = local.auto_discovery_dir.filter(|d| !d.is_empty()) {
                    let mut dir = PathBuf::from(dir);
                    // llm-d looks for <dir>/<model>/tokenizer.json; a flat dir works too.
                    if let Some(model) = tk.model_name.as_deref().filter(|m| !m.is_empty()) {
                        if dir.join(model).join("tokenizer.json").is_file() {
                            dir = dir.join(model);
                        }
                    }
                    tokenizer_dir = Some(dir);
                }
            }
        }

        let ev = self.kv_events_config.unwrap_or_default();
        if ev.zmq_endpoint.as_deref().is_some_and(|e| !e.is_empty()) {
            return Err(PreciseParamError::ZmqEndpoint);
        }
        match ev.engine_type.as_deref() {
            None | Some("") | Some("vllm") => {}
            Some(other) => return Err(PreciseParamError::EngineType(other.to_string())),
        }
        let _ = ev.concurrency;
        let endpoint_sockets = ev.endpoint_sockets.unwrap_or_default();
        for (key, value) in &endpoint_sockets {
            if !valid_socket(value) {
                return Err(PreciseParamError::EndpointSocket {
                    key: key.clone(),
                    value: value.clone(),
                });
            }
        }
        if ev.discover_pods == Some(false) && endpoint_sockets.is_empty() {
            return Err(PreciseParamError::NoDiscovery);
        }
        let pd = ev.pod_discovery_config.unwrap_or_default();
        let _ = (pd.pod_label_selector, pd.pod_namespace);
        let port = pd.socket_port.unwrap_or(i64::from(d.socket_port));
        let socket_port = u16::try_from(port)
            .ok()
            .filter(|&p| p > 0)
            .ok_or(PreciseParamError::SocketPort(port))?;
        let grpc_token = match ev.grpc_token_file.as_deref().filter(|p| !p.is_empty()) {
            None => None,
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| PreciseParamError::TokenFile {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    })?;
                Some(BearerToken::from_file_text(&text).ok_or_else(|| {
                    PreciseParamError::TokenFile {
                        path: path.to_owned(),
                        reason: "empty".to_owned(),
                    }
                })?)
            }
        };
        Ok(PreciseParams {
            block_size,
            hash_seed: tp.hash_seed.unwrap_or_default(),
            tokenizer_dir,
            max_keys_per_endpoint,
            topic_filter: ev.topic_filter.unwrap_or(d.topic_filter),
            socket_port,
            grpc_port: ev.grpc_port.filter(|&p| p > 0),
            endpoint_sockets,
            grpc_token,
            speculative_ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<PreciseParams, String> {
        let w: WirePreciseParams = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        w.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn llm_d_parameters() {
        let p = parse(
            r#"
tokenProcessorConfig: { blockSize: 64, hashSeed: "42" }
indexerConfig:
  kvBlockIndexConfig: { inMemoryConfig: { size: 1000, podCacheSize: 10 }, enableMetrics: true }
  tokenizersPoolConfig: { modelName: m, local: { autoDiscoveryDir: /models } }
kvEventsConfig:
  topicFilter: "kv@"
  concurrency: 8
  discoverPods: true
  podDiscoveryConfig: { podLabelSelector: "app=vllm", socketPort: 5600 }
speculativeIndexing: false
speculativeTTL: 2s
"#,
        )
        .unwrap();
        assert_eq!(
            p,
            PreciseParams {
                block_size: 64,
                hash_seed: "42".into(),
                tokenizer_dir: Some("/models".into()),
                max_keys_per_endpoint: 1000,
                topic_filter: "kv@".into(),
                socket_port: 5600,
                grpc_port: None,
                endpoint_sockets: BTreeMap::new(),
                grpc_token: None,
                speculative_ttl: None,
            }
        );
        assert_eq!(parse("{}").unwrap(), PreciseParams::default());
        let s = parse(
            r#"kvEventsConfig: { grpcPort: 5570, endpointSockets: { "10.0.0.1:8000": "tcp://10.0.0.1:5557" } }"#,
        )
        .unwrap();
        assert_eq!(s.grpc_port, Some(5570));
        assert_eq!(s.endpoint_sockets.len(), 1);
    }

    #[test]
    fn rejections_name_the_key() {
        let cases = [
            ("tokenProcessorConfig: { blockSizeTokens: -1 }", "tokenProcessorConfig.blockSizeTokens must be > 0, got -1"),
            ("indexerConfig: { kvBlockIndexConfig: { redisConfig: { address: x } } }", "indexerConfig.kvBlockIndexConfig.redisConfig is not supported by switchyard (the precise index is in memory)"),
            ("indexerConfig: { tokenizersPoolConfig: { hf: { huggingFaceToken: t } } }", "indexerConfig.tokenizersPoolConfig.hf is not supported by switchyard (no downloads at run time): set local.autoDiscoveryDir to a directory holding tokenizer.json"),
            ("kvEventsConfig: { engineType: sglang }", "kvEventsConfig.engineType \"sglang\" is not supported by switchyard (only \"vllm\")"),
            ("kvEventsConfig: { zmqEndpoint: \"tcp://*:5557\" }", "kvEventsConfig.zmqEndpoint (one central SUB socket the engines connect to) is not supported by switchyard: the EPP subscribes to each endpoint (discoverPods)"),
            ("kvEventsConfig: { discoverPods: false }", "kvEventsConfig.discoverPods: false needs kvEventsConfig.endpointSockets (switchyard has no central socket)"),
            ("kvEventsConfig: { endpointSockets: { a: \"ipc:///x\" } }", "kvEventsConfig.endpointSockets[\"a\"] = \"ipc:///x\": expected tcp://HOST:PORT or grpc://HOST:PORT"),
            ("kvEventsConfig: { podDiscoveryConfig: { socketPort: 70000 } }", "kvEventsConfig.podDiscoveryConfig.socketPort must be in 1..=65535, got 70000"),
            ("speculativeTTL: \"2\"", "speculativeTTL: missing unit in duration \"2\""),
            ("{ speculativeIndexing: true, speculativeTTL: fast }", "speculativeTTL: invalid duration \"fast\""),
        ];
        for (yaml, want) in cases {
            assert_eq!(parse(yaml).unwrap_err(), want, "{yaml}");
        }
        assert!(parse("bogus: 1")
            .unwrap_err()
            .starts_with("unknown field `bogus`"));
    }

    #[test]
    fn speculative_indexing_and_its_ttl() {
        let ttl = |yaml: &str| parse(yaml).unwrap().speculative_ttl;
        // Off by default, as in llm-d; the TTL alone does not turn it on.
        assert_eq!(ttl("{}"), None);
        assert_eq!(ttl("speculativeTTL: 5s"), None);
        assert_eq!(ttl("speculativeIndexing: false"), None);
        // On: llm-d's 2 s unless set; empty, zero or negative fall back to it.
        assert_eq!(
            ttl("speculativeIndexing: true"),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            ttl("{ speculativeIndexing: true, speculativeTTL: 1m30s }"),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            ttl("{ speculativeIndexing: true, speculativeTTL: 250ms }"),
            Some(Duration::from_millis(250))
        );
        for fallback in ["\"\"", "0s", "-3s"] {
            assert_eq!(
                ttl(&format!(
                    "{{ speculativeIndexing: true, speculativeTTL: {fallback} }}"
                )),
                Some(DEFAULT_SPECULATIVE_TTL),
                "{fallback}"
            );
        }
    }

    #[test]
    fn grpc_token_file_is_read_trimmed_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  s3cret \nsecond line ignored\n").unwrap();
        let p = parse(&format!("kvEventsConfig: {{ grpcTokenFile: {:?} }}", file)).unwrap();
        let token = p.grpc_token.clone().unwrap();
        assert_eq!(token.header_value(), "Bearer s3cret");
        assert_eq!(format!("{token:?}"), "BearerToken(<6 bytes>)");
        assert!(!format!("{p:?}").contains("s3cret"));

        std::fs::write(&file, " \n").unwrap();
        assert_eq!(
            parse(&format!("kvEventsConfig: {{ grpcTokenFile: {:?} }}", file)).unwrap_err(),
            format!("kvEventsConfig.grpcTokenFile {}: empty", file.display())
        );
        let missing = dir.path().join("missing");
        assert!(parse(&format!(
            "kvEventsConfig: {{ grpcTokenFile: {:?} }}",
            missing
        ))
        .unwrap_err()
        .starts_with(&format!(
            "kvEventsConfig.grpcTokenFile {}: No such file",
            missing.display()
        )),);
    }
}
