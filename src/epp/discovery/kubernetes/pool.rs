//! The InferencePool's routing target (label selector + target ports, in the `v1` and the older
//! `v1alpha2` shape), label selectors, and the endpoints one Pod contributes to the pool.
//!
//! Semantics follow the reference EPP (`pkg/epp/datastore/datastore.go`, `pkg/epp/util/pod`):
//! a pod counts when it is Ready and not being deleted; it yields one endpoint per target port,
//! named `<pod>-rank-<index of the port>`, unless the `active-ports` annotation narrows the ports.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject};
use serde::Deserialize;

use crate::epp::endpoint::Endpoint;

/// API group of the GA InferencePool (`inference.networking.k8s.io/v1`).
pub const GROUP_V1: &str = "inference.networking.k8s.io";
/// API group of the older experimental InferencePool (`inference.networking.x-k8s.io/v1alpha2`).
pub const GROUP_V1ALPHA2: &str = "inference.networking.x-k8s.io";
/// Pod annotation listing which of the pool's target ports are serving (comma-separated).
pub const ACTIVE_PORTS_ANNOTATION: &str = "inference.networking.k8s.io/active-ports";
/// The InferencePool CRD allows 1 to 8 target ports.
pub const MAX_TARGET_PORTS: usize = 8;

/// Why a pool, a selector or a port list was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("unsupported InferencePool group {0:?} (expected {GROUP_V1} or {GROUP_V1ALPHA2})")]
    UnsupportedGroup(String),
    #[error("InferencePool {name} has no spec")]
    MissingSpec { name: String },
    #[error("InferencePool {name} has an invalid spec: {reason}")]
    InvalidSpec { name: String, reason: String },
    #[error("target port {0} is out of range 1..=65535")]
    PortOutOfRange(i64),
    #[error("{0} target ports given; between 1 and {MAX_TARGET_PORTS} are allowed")]
    PortCount(usize),
    #[error("invalid label selector {selector:?}: {reason}")]
    Selector { selector: String, reason: String },
}

/// The API resource of the InferencePool kind for `group`.
pub fn pool_api_resource(group: &str) -> Result<ApiResource, PoolError> {
    let version = match group {
        GROUP_V1 => "v1",
        GROUP_V1ALPHA2 => "v1alpha2",
        other => return Err(PoolError::UnsupportedGroup(other.to_string())),
    };
    Ok(ApiResource {
        group: group.to_string(),
        version: version.to_string(),
        api_version: format!("{group}/{version}"),
        kind: "InferencePool".to_string(),
        plural: "inferencepools".to_string(),
    })
}

/// One label requirement (equality-based selectors; set-based ones are not supported).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// An equality-based label selector (`a=b,c!=d,e,!f`), as the pool's `matchLabels` or the
/// `--endpoint-selector` flag give it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// All of `labels` must be present with these values (an empty map selects every pod).
    pub fn from_match_labels(labels: &BTreeMap<String, String>) -> Self {
        LabelSelector {
            requirements: labels
                .iter()
                .map(|(k, v)| Requirement::Equals(k.clone(), v.clone()))
                .collect(),
        }
    }

    /// Parses the Kubernetes selector syntax restricted to `k=v`, `k==v`, `k!=v`, `k`, `!k`.
    pub fn parse(text: &str) -> Result<Self, PoolError> {
        let err = |reason: &str| PoolError::Selector {
            selector: text.to_string(),
            reason: reason.to_string(),
        };
        if text.contains('(') {
            return Err(err("set-based requirements (in, notin) are not supported"));
        }
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(err("empty requirement"));
            }
            let req = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(valid_key(k.trim(), &err)?, valid_value(v.trim(), &err)?)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(valid_key(k.trim(), &err)?, valid_value(v.trim(), &err)?)
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(valid_key(k.trim(), &err)?)
            } else {
                Requirement::Exists(valid_key(part, &err)?)
            };
            requirements.push(req);
        }
        requirements.sort();
        Ok(LabelSelector { requirements })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

fn valid_key(k: &str, err: &dyn Fn(&str) -> PoolError) -> Result<String, PoolError> {
    if k.is_empty() || k.contains(char::is_whitespace) || k.contains(['=', '!']) {
        return Err(err("bad label key"));
    }
    Ok(k.to_string())
}

fn valid_value(v: &str, err: &dyn Fn(&str) -> PoolError) -> Result<String, PoolError> {
    if v.contains(char::is_whitespace) || v.contains(['=', '!']) {
        return Err(err("bad label value"));
    }
    Ok(v.to_string())
}

/// Canonical wire form, used as the `labelSelector` query parameter of the pod watch.
impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::Equals(k, v) => write!(f, "{k}={v}")?,
                Requirement::NotEquals(k, v) => write!(f, "{k}!={v}")?,
                Requirement::Exists(k) => write!(f, "{k}")?,
                Requirement::NotExists(k) => write!(f, "!{k}")?,
            }
        }
        Ok(())
    }
}

/// Which pods belong to the pool and which of their ports serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolTarget {
    pub selector: LabelSelector,
    /// In spec order: the index is the endpoint's rank.
    pub target_ports: Vec<u16>,
}

impl PoolTarget {
    /// The target given by `--endpoint-selector` and `--endpoint-target-ports` (no CRD).
    pub fn from_flags(selector: &str, ports: &[u16]) -> Result<Self, PoolError> {
        if ports.is_empty() || ports.len() > MAX_TARGET_PORTS {
            return Err(PoolError::PortCount(ports.len()));
        }
        if let Some(0) = ports.iter().copied().find(|p| *p == 0) {
            return Err(PoolError::PortOutOfRange(0));
        }
        Ok(PoolTarget {
            selector: LabelSelector::parse(selector)?,
            target_ports: ports.to_vec(),
        })
    }

    /// Reads the target of an InferencePool object of the given API group.
    pub fn from_pool(group: &str, pool: &DynamicObject) -> Result<Self, PoolError> {
        let name = pool.metadata.name.clone().unwrap_or_default();
        let spec = pool
            .data
            .get("spec")
            .ok_or_else(|| PoolError::MissingSpec { name: name.clone() })?;
        let invalid = |e: serde_json::Error| PoolError::InvalidSpec {
            name: name.clone(),
            reason: e.to_string(),
        };
        let (labels, ports) = match group {
            GROUP_V1 => {
                let spec = PoolSpecV1::deserialize(spec).map_err(invalid)?;
                let ports = spec
                    .target_ports
                    .iter()
                    .map(|p| p.number)
                    .collect::<Vec<_>>();
                (spec.selector.match_labels, ports)
            }
            GROUP_V1ALPHA2 => {
                let spec = PoolSpecV1Alpha2::deserialize(spec).map_err(invalid)?;
                (spec.selector, vec![spec.target_port_number])
            }
            other => return Err(PoolError::UnsupportedGroup(other.to_string())),
        };
        if ports.is_empty() || ports.len() > MAX_TARGET_PORTS {
            return Err(PoolError::PortCount(ports.len()));
        }
        let target_ports = ports
            .into_iter()
            .map(|p| {
                u16::try_from(p)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or(PoolError::PortOutOfRange(p))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PoolTarget {
            selector: LabelSelector::from_match_labels(&labels),
            target_ports,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PoolSpecV1 {
    selector: SelectorV1,
    target_ports: Vec<PortV1>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SelectorV1 {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct PortV1 {
    number: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PoolSpecV1Alpha2 {
    #[serde(default)]
    selector: BTreeMap<String, String>,
    target_port_number: i64,
}

/// What discovery keeps of a pod: enough to recompute its endpoints when the ports change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub ip: Option<IpAddr>,
    pub ready: bool,
    pub deleting: bool,
    pub labels: BTreeMap<String, String>,
    /// The `active-ports` annotation, unparsed.
    pub active_ports: Option<String>,
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        // Ready means the `Ready` condition is `True`; phase alone is not enough (a Running pod
        // can fail its readiness probe).
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        let ip = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        PodInfo {
            name: pod.metadata.name.clone().unwrap_or_default(),
            ip,
            ready,
            deleting: pod.metadata.deletion_timestamp.is_some(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            active_ports: pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ACTIVE_PORTS_ANNOTATION).cloned()),
        }
    }

    /// The pool endpoints this pod serves right now (empty when it is not routable).
    pub fn endpoints(&self, target: &PoolTarget) -> Vec<Endpoint> {
        let Some(ip) = self.ip else {
            return Vec::new();
        };
        if !self.ready || self.deleting || !target.selector.matches(&self.labels) {
            return Vec::new();
        }
        let active = self.active_ports.as_deref().map(parse_active_ports);
        target
            .target_ports
            .iter()
            .enumerate()
            .filter(|(_, port)| active.as_ref().is_none_or(|a| a.contains(port)))
            .map(|(rank, port)| Endpoint {
                name: format!("{}-rank-{rank}", self.name),
                addr: SocketAddr::new(ip, *port),
                // The data layer reads the engine from the labels (its configured key).
                engine: None,
                labels: self.labels.clone(),
            })
            .collect()
    }
}

/// Ports listed in the annotation; entries that are not port numbers are ignored, as upstream.
fn parse_active_ports(text: &str) -> Vec<u16> {
    text.split(',')
        .filter_map(|p| p.trim().parse::<u16>().ok())
        .filter(|p| *p > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epp::endpoint::EngineType;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(value: serde_json::Value) -> PodInfo {
        PodInfo::from_pod(&serde_json::from_value(value).unwrap())
    }

    fn ready_pod(name: &str, ip: &str, l: serde_json::Value) -> serde_json::Value {
        json!({
            "metadata": {"name": name, "labels": l},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
        })
    }

    #[test]
    fn selector_parse_match_and_display() {
        let s = LabelSelector::parse("app = vllm, tier!=canary,gpu,!draining,env==prod").unwrap();
        assert_eq!(
            s.to_string(),
            "app=vllm,env=prod,tier!=canary,gpu,!draining"
        );
        assert!(s.matches(&labels(&[("app", "vllm"), ("env", "prod"), ("gpu", "")])));
        assert!(!s.matches(&labels(&[("app", "vllm"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[
            ("app", "vllm"),
            ("env", "prod"),
            ("gpu", ""),
            ("tier", "canary")
        ])));
        assert!(!s.matches(&labels(&[
            ("app", "vllm"),
            ("env", "prod"),
            ("gpu", ""),
            ("draining", "1")
        ])));
        assert!(LabelSelector::parse("app in (a,b)").is_err());
        assert!(LabelSelector::parse("app=a,,b=c").is_err());
        assert!(LabelSelector::parse("=a").is_err());
        assert!(LabelSelector::default().matches(&labels(&[])));
    }

    #[test]
    fn pool_v1_and_v1alpha2_shapes() {
        let v1: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": "p"},
            "spec": {"selector": {"matchLabels": {"app": "vllm"}},
                     "targetPorts": [{"number": 8000}, {"number": 8001}],
                     "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}
        }))
        .unwrap();
        let t = PoolTarget::from_pool(GROUP_V1, &v1).unwrap();
        assert_eq!(t.selector.to_string(), "app=vllm");
        assert_eq!(t.target_ports, vec![8000, 8001]);

        let old: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferencePool",
            "metadata": {"name": "p"},
            "spec": {"selector": {"app": "sglang"}, "targetPortNumber": 30000,
                     "extensionRef": {"name": "epp"}}
        }))
        .unwrap();
        let t = PoolTarget::from_pool(GROUP_V1ALPHA2, &old).unwrap();
        assert_eq!(t.selector.to_string(), "app=sglang");
        assert_eq!(t.target_ports, vec![30000]);

        let bad: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"selector": {"matchLabels": {}}, "targetPorts": [{"number": 70000}]}
        }))
        .unwrap();
        assert_eq!(
            PoolTarget::from_pool(GROUP_V1, &bad),
            Err(PoolError::PortOutOfRange(70000))
        );
        assert!(matches!(
            PoolTarget::from_pool("example.com", &bad),
            Err(PoolError::UnsupportedGroup(_))
        ));
        assert!(pool_api_resource("example.com").is_err());
        assert_eq!(
            pool_api_resource(GROUP_V1ALPHA2).unwrap().api_version,
            "inference.networking.x-k8s.io/v1alpha2"
        );
        assert_eq!(
            PoolTarget::from_flags("app=x", &[]),
            Err(PoolError::PortCount(0))
        );
        assert_eq!(
            PoolTarget::from_flags("app=x", &[0]),
            Err(PoolError::PortOutOfRange(0))
        );
    }

    #[test]
    fn pod_endpoints_per_port_engine_labels_and_readiness() {
        let target = PoolTarget::from_flags("app=vllm", &[8000, 8001]).unwrap();
        let p = pod(ready_pod(
            "p0",
            "10.0.0.5",
            json!({"app": "vllm", EngineType::LABEL: "sglang"}),
        ));
        let eps = p.endpoints(&target);
        let got: Vec<_> = eps
            .iter()
            .map(|e| (e.name.as_str(), e.addr.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("p0-rank-0", "10.0.0.5:8000".to_string()),
                ("p0-rank-1", "10.0.0.5:8001".to_string())
            ]
        );
        assert_eq!(eps[0].engine, None);
        assert_eq!(
            crate::epp::scrape::MetricsExtractorConfig::default().engine_of(&eps[0]),
            EngineType::Sglang
        );
        assert_eq!(eps[0].labels.get("app").map(String::as_str), Some("vllm"));

        // Not ready, deleting, no IP, selector mismatch: nothing.
        let mut not_ready = ready_pod("p1", "10.0.0.6", json!({"app": "vllm"}));
        not_ready["status"]["conditions"][0]["status"] = json!("False");
        assert!(pod(not_ready).endpoints(&target).is_empty());
        let mut deleting = ready_pod("p1", "10.0.0.6", json!({"app": "vllm"}));
        deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        assert!(pod(deleting).endpoints(&target).is_empty());
        let mut no_ip = ready_pod("p1", "10.0.0.6", json!({"app": "vllm"}));
        no_ip["status"]["podIP"] = json!(null);
        assert!(pod(no_ip).endpoints(&target).is_empty());
        assert!(pod(ready_pod("p1", "10.0.0.6", json!({"app": "other"})))
            .endpoints(&target)
            .is_empty());

        // The active-ports annotation keeps the rank of the port that stays.
        let mut partial = ready_pod("p2", "10.0.0.7", json!({"app": "vllm"}));
        partial["metadata"]["annotations"] = json!({ACTIVE_PORTS_ANNOTATION: "8001, junk, 9999"});
        let names: Vec<_> = pod(partial)
            .endpoints(&target)
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["p2-rank-1"]);

        // An unknown engine label falls back to defaultEngine rather than dropping the pod.
        let odd = pod(ready_pod(
            "p3",
            "10.0.0.8",
            json!({"app": "vllm", EngineType::LABEL: "tgi"}),
        ));
        assert_eq!(
            crate::epp::scrape::MetricsExtractorConfig::default()
                .engine_of(&odd.endpoints(&target)[0]),
            EngineType::Vllm
        );
    }
}
