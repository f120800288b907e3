//! `--endpoints-file`: endpoints, objectives and model rewrites from a YAML file, reloaded when
//! its content changes (Kubernetes ConfigMap mounts swap the file by rename, which a content poll
//! follows naturally because the path is re-opened each time).
//!
//! ```yaml
//! endpoints:
//! - address: 10.0.0.1:8000      # required, ip:port ([v6]:port)
//!   name: pod-a-rank-0          # optional, default = address
//!   engineType: vllm            # optional: vllm | sglang | trtllm-serve | triton-tensorrt-llm
//!   labels: {zone: a}           # optional
//! objectives:                   # optional: InferenceObjective stand-ins (name → priority)
//! - name: sql-lora
//!   priority: 2
//! modelRewrites:                # optional: InferenceModelRewrite stand-ins
//! - model: model-to-be-rewritten
//!   targets: [{model: rewritten-model, weight: 1}]
//! ```

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use super::{Discovery, DiscoveryError};
use crate::epp::datastore::{Datastore, DiscoveryEvent, RequestPolicy, RewriteTarget};
use crate::epp::endpoint::{Endpoint, EngineType};

/// Largest pool file read.
pub const MAX_POOL_FILE_BYTES: u64 = 4 << 20;
/// Most endpoints one pool file may list.
pub const MAX_ENDPOINTS: usize = 10_000;
/// Shortest reload poll interval.
pub const MIN_POLL: Duration = Duration::from_millis(10);

/// A validated pool file.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolFile {
    pub endpoints: Vec<Endpoint>,
    pub policy: RequestPolicy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireFile {
    endpoints: Vec<WireEndpoint>,
    #[serde(default)]
    objectives: Vec<WireObjective>,
    #[serde(default)]
    model_rewrites: Vec<WireRewrite>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireEndpoint {
    address: WireAddr,
    name: Option<String>,
    engine_type: Option<WireEngine>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireObjective {
    name: String,
    /// Unset means 0, as for the InferenceObjective CRD.
    #[serde(default)]
    priority: i32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRewrite {
    model: String,
    targets: Vec<WireTarget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireTarget {
    model: String,
    #[serde(default = "default_weight")]
    weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// An `ip:port` parsed during deserialisation, so a bad one is reported with its line.
#[derive(Debug)]
struct WireAddr(SocketAddr);

/// Parses a YAML string scalar with `FromStr`-like logic inside a visitor, so that serde_yaml
/// reports errors at the scalar's own line and column rather than at the enclosing entry.
struct ScalarVisitor<F>(&'static str, F);

impl<'de, T, F: FnOnce(&str) -> Result<T, String>> serde::de::Visitor<'de> for ScalarVisitor<F> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        (self.1)(v).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for WireAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ScalarVisitor("an ip:port string", |text: &str| match text
            .trim()
            .parse::<SocketAddr>(
        ) {
            Ok(addr) if addr.port() != 0 => Ok(WireAddr(addr)),
            Ok(_) => Err(format!("address {text:?}: port 0 is not routable")),
            Err(_) => Err(format!(
                "address {text:?}: expected ip:port (IPv6 as [addr]:port)"
            )),
        }))
    }
}

#[derive(Debug)]
struct WireEngine(EngineType);

impl<'de> Deserialize<'de> for WireEngine {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(ScalarVisitor("an engine type", |text: &str| {
            text.parse().map(WireEngine).map_err(|e| e.to_string())
        }))
    }
}

/// Reads and validates a pool file (for `--check-config` as well as discovery).
pub fn load_pool_file(path: &Path) -> Result<PoolFile, DiscoveryError> {
    use std::io::Read;
    let shown = path.display().to_string();
    let read_err = |source| DiscoveryError::Read {
        path: shown.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_POOL_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    parse_pool_file(&bytes, &shown)
}

/// Validates the bytes of a pool file; `path` is only used in error messages.
pub fn parse_pool_file(bytes: &[u8], path: &str) -> Result<PoolFile, DiscoveryError> {
    if bytes.len() as u64 > MAX_POOL_FILE_BYTES {
        return Err(DiscoveryError::TooLarge {
            path: path.to_string(),
            max: MAX_POOL_FILE_BYTES,
        });
    }
    let invalid = |message: String| DiscoveryError::Invalid {
        path: path.to_string(),
        message,
    };
    let wire: WireFile = serde_yaml::from_slice(bytes).map_err(|e| match e.location() {
        Some(at) => {
            let text = e.to_string();
            // serde_yaml appends " at line L column C"; the location is reported separately.
            let message = match text.rfind(" at line ") {
                Some(i) => text[..i].to_string(),
                None => text,
            };
            DiscoveryError::Syntax {
                path: path.to_string(),
                line: at.line(),
                column: at.column(),
                message,
            }
        }
        None => invalid(e.to_string()),
    })?;

    if wire.endpoints.len() > MAX_ENDPOINTS {
        return Err(invalid(format!(
            "{} endpoints, over the limit of {MAX_ENDPOINTS}",
            wire.endpoints.len()
        )));
    }
    let mut endpoints: Vec<Endpoint> = Vec::with_capacity(wire.endpoints.len());
    // Index of each name and address seen, so duplicate checks stay linear at the 10k cap.
    let mut names: HashMap<String, usize> = HashMap::with_capacity(wire.endpoints.len());
    let mut addrs: HashMap<std::net::SocketAddr, usize> =
        HashMap::with_capacity(wire.endpoints.len());
    for (i, e) in wire.endpoints.into_iter().enumerate() {
        let addr = e.address.0;
        let name = e.name.unwrap_or_else(|| addr.to_string());
        if name.is_empty() {
            return Err(invalid(format!("endpoints[{i}]: name must not be empty")));
        }
        // Without engineType the data layer reads the engine label (as for a real pool) or
        // uses defaultEngine; a label naming no engine is an error here, where it is written.
        if let Some(label) = e.labels.get(EngineType::LABEL) {
            label
                .parse::<EngineType>()
                .map_err(|err| invalid(format!("endpoints[{i}].labels: {err}")))?;
        }
        let engine = e.engine_type.map(|WireEngine(engine)| engine);
        if let Some(&j) = names.get(&name) {
            return Err(invalid(format!(
                "endpoints[{i}]: duplicate name {name:?} (also endpoints[{j}])"
            )));
        }
        if let Some(&j) = addrs.get(&addr) {
            return Err(invalid(format!(
                "endpoints[{i}]: duplicate address {addr} (also endpoints[{j}])"
            )));
        }
        names.insert(name.clone(), i);
        addrs.insert(addr, i);
        endpoints.push(Endpoint {
            name,
            addr,
            engine,
            labels: e.labels,
        });
    }

    let mut objectives = HashMap::with_capacity(wire.objectives.len());
    for (i, o) in wire.objectives.into_iter().enumerate() {
        if o.name.is_empty() {
            return Err(invalid(format!("objectives[{i}]: name must not be empty")));
        }
        if objectives.insert(o.name.clone(), o.priority).is_some() {
            return Err(invalid(format!(
                "objectives[{i}]: duplicate objective {:?}",
                o.name
            )));
        }
    }

    let mut model_rewrites = HashMap::with_capacity(wire.model_rewrites.len());
    for (i, r) in wire.model_rewrites.into_iter().enumerate() {
        if r.model.is_empty() {
            return Err(invalid(format!(
                "modelRewrites[{i}]: model must not be empty"
            )));
        }
        if r.targets.is_empty() {
            return Err(invalid(format!(
                "modelRewrites[{i}]: targets must not be empty"
            )));
        }
        if r.targets.iter().all(|t| t.weight == 0) {
            return Err(invalid(format!(
                "modelRewrites[{i}]: at least one target needs a weight above 0"
            )));
        }
        if let Some(j) = r.targets.iter().position(|t| t.model.is_empty()) {
            return Err(invalid(format!(
                "modelRewrites[{i}].targets[{j}]: model must not be empty"
            )));
        }
        let targets = r
            .targets
            .into_iter()
            .map(|t| RewriteTarget {
                model: t.model,
                weight: t.weight,
            })
            .collect();
        if model_rewrites.insert(r.model.clone(), targets).is_some() {
            return Err(invalid(format!(
                "modelRewrites[{i}]: duplicate rewrite for model {:?}",
                r.model
            )));
        }
    }

    Ok(PoolFile {
        endpoints,
        policy: RequestPolicy {
            objectives,
            model_rewrites,
            default_rewrite: None,
        },
    })
}

/// Endpoints and policy from a YAML file, polled for changes.
#[derive(Debug, Clone)]
pub struct FileDiscovery {
    path: PathBuf,
    poll: Duration,
}

impl FileDiscovery {
    /// Polls `path` every `poll` (at least [`MIN_POLL`], so a zero flag cannot spin).
    pub fn new(path: PathBuf, poll: Duration) -> Self {
        FileDiscovery {
            path,
            poll: poll.max(MIN_POLL),
        }
    }
}

/// Reads the file through a size cap; async so a slow volume does not block a worker thread.
async fn read_capped(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = tokio::fs::File::open(path).await?;
    let mut bytes = Vec::new();
    file.take(MAX_POOL_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .await?;
    Ok(bytes)
}

fn apply(datastore: &Datastore, pool: PoolFile) {
    datastore.set_policy(pool.policy);
    datastore.apply(DiscoveryEvent::Reset(pool.endpoints));
}

impl Discovery for FileDiscovery {
    fn run(
        self: Box<Self>,
        datastore: Arc<Datastore>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Pin<Box<dyn Future<Output = Result<(), DiscoveryError>> + Send>> {
        Box::pin(async move {
            let shown = self.path.display().to_string();
            let bytes = read_capped(&self.path)
                .await
                .map_err(|source| DiscoveryError::Read {
                    path: shown.clone(),
                    source,
                })?;
            let pool = parse_pool_file(&bytes, &shown)?;
            tracing::info!(
                path = %shown,
                endpoints = pool.endpoints.len(),
                objectives = pool.policy.objectives.len(),
                model_rewrites = pool.policy.model_rewrites.len(),
                "pool file loaded"
            );
            apply(&datastore, pool);
            datastore.mark_synced();
            let mut last_hash = xxhash_rust::xxh64::xxh64(&bytes, 0);
            // Last read error, so a missing file is reported once rather than every poll.
            let mut last_read_error: Option<String> = None;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(self.poll) => {}
                    _ = shutdown.wait_for(|stop| *stop) => break,
                }
                let bytes = match read_capped(&self.path).await {
                    Ok(bytes) => bytes,
                    Err(error) => {
                        let text = error.to_string();
                        if last_read_error.as_deref() != Some(text.as_str()) {
                            tracing::warn!(path = %shown, %error, "pool file unreadable; keeping previous endpoints");
                            last_read_error = Some(text);
                        }
                        continue;
                    }
                };
                last_read_error = None;
                let hash = xxhash_rust::xxh64::xxh64(&bytes, 0);
                if hash == last_hash {
                    continue;
                }
                // Remember the hash even when the content is bad, so it is reported once.
                last_hash = hash;
                match parse_pool_file(&bytes, &shown) {
                    Ok(pool) => {
                        tracing::info!(
                            path = %shown,
                            endpoints = pool.endpoints.len(),
                            objectives = pool.policy.objectives.len(),
                            model_rewrites = pool.policy.model_rewrites.len(),
                            "pool file reloaded"
                        );
                        apply(&datastore, pool);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "pool file rejected; keeping previous endpoints and policy");
                    }
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests;
