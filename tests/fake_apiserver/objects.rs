//! Builders for the objects the tests put into the fake API server (namespace `default`).

use serde_json::{json, Map, Value};

pub const NS: &str = "default";
pub const POD: &str = "/pods";
pub const POOL_V1: &str = "inference.networking.k8s.io/inferencepools";
pub const POOL_V1ALPHA2: &str = "inference.networking.x-k8s.io/inferencepools";
pub const OBJECTIVE: &str = "inference.networking.x-k8s.io/inferenceobjectives";
pub const REWRITE: &str = "inference.networking.x-k8s.io/inferencemodelrewrites";
pub const LEASE: &str = "coordination.k8s.io/leases";

fn labels(pairs: &[(&str, &str)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<Map<_, _>>(),
    )
}

/// A running pod with an IP; `ready` sets its Ready condition.
pub fn pod(name: &str, ip: &str, pod_labels: &[(&str, &str)], ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels(pod_labels)},
        "spec": {"containers": [{"name": "server", "image": "switchyard"}]},
        "status": {
            "phase": "Running", "podIP": ip,
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
        }
    })
}

/// The same pod marked for deletion (still Ready, as during graceful termination).
pub fn deleting(mut pod: Value) -> Value {
    pod["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    pod
}

pub fn pool_v1(name: &str, selector: &[(&str, &str)], ports: &[u16]) -> Value {
    let ports: Vec<Value> = ports.iter().map(|p| json!({"number": p})).collect();
    json!({
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "selector": {"matchLabels": labels(selector)},
            "targetPorts": ports,
            "endpointPickerRef": {"name": format!("{name}-epp"), "port": {"number": 9002}, "failureMode": "FailOpen"}
        }
    })
}

pub fn pool_v1alpha2(name: &str, selector: &[(&str, &str)], port: u16) -> Value {
    json!({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"selector": labels(selector), "targetPortNumber": port,
                 "extensionRef": {"name": format!("{name}-epp")}}
    })
}

pub fn objective(name: &str, pool: &str, priority: Option<i32>) -> Value {
    let mut spec = json!({"poolRef": {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool}});
    if let Some(p) = priority {
        spec["priority"] = json!(p);
    }
    json!({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec
    })
}

/// One rule: exact `model` → weighted targets.
pub fn rewrite(
    name: &str,
    pool: &str,
    model: &str,
    targets: &[(&str, u32)],
    created: &str,
) -> Value {
    let targets: Vec<Value> = targets
        .iter()
        .map(|(m, w)| json!({"modelRewrite": m, "weight": w}))
        .collect();
    json!({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceModelRewrite",
        "metadata": {"name": name, "namespace": NS, "creationTimestamp": created},
        "spec": {
            "poolRef": {"group": "inference.networking.k8s.io", "name": pool},
            "rules": [{"matches": [{"model": {"type": "Exact", "value": model}}], "targets": targets}]
        }
    })
}

/// A Lease held by `holder`, renewed now.
pub fn lease(name: &str, holder: &str, duration_secs: i32) -> Value {
    let now = k8s_openapi::chrono::Utc::now()
        .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Micros, true);
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration_secs,
                 "acquireTime": now, "renewTime": now, "leaseTransitions": 1}
    })
}
