//! Kubernetes object conversion: InferencePool → routing target, Pod → endpoints,
//! InferenceObjective / InferenceModelRewrite → request policy.
//!
//! Input: first byte picks the kind (mod 5), the rest is the object's JSON.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use switchyard::epp::discovery::kubernetes::policy::{
    build_policy, parse_objective, parse_rewrite, PoolRef,
};
use switchyard::epp::discovery::kubernetes::pool::{
    PodInfo, PoolTarget, GROUP_V1, GROUP_V1ALPHA2, MAX_TARGET_PORTS,
};

pub fn run(data: &[u8]) {
    let Some((&kind, json)) = data.split_first() else {
        return;
    };
    match kind % 5 {
        0 | 1 => {
            let Ok(obj) = serde_json::from_slice::<DynamicObject>(json) else {
                return;
            };
            let group = if kind % 5 == 0 {
                GROUP_V1
            } else {
                GROUP_V1ALPHA2
            };
            if let Ok(target) = PoolTarget::from_pool(group, &obj) {
                let n = target.target_ports.len();
                assert!((1..=MAX_TARGET_PORTS).contains(&n), "{n} ports");
                assert!(target.target_ports.iter().all(|p| *p > 0));
            }
        }
        2 => {
            let Ok(pod) = serde_json::from_slice::<Pod>(json) else {
                return;
            };
            let info = PodInfo::from_pod(&pod);
            let target = PoolTarget::from_flags("app=vllm", &[8000, 8001, 8002]).unwrap();
            let eps = info.endpoints(&target);
            if !eps.is_empty() {
                assert!(info.ready && !info.deleting);
                assert_eq!(info.labels.get("app").map(String::as_str), Some("vllm"));
            }
            assert!(eps.len() <= 3);
            let names: HashSet<&str> = eps.iter().map(|e| e.name.as_str()).collect();
            assert_eq!(names.len(), eps.len(), "endpoint names repeat");
            for e in &eps {
                assert_eq!(Some(e.addr.ip()), info.ip);
                assert!(target.target_ports.contains(&e.addr.port()));
            }
        }
        k => {
            let Ok(obj) = serde_json::from_slice::<DynamicObject>(json) else {
                return;
            };
            let pool = PoolRef {
                name: "pool".to_string(),
                group: GROUP_V1.to_string(),
            };
            let mut objectives = BTreeMap::new();
            let mut rewrites = BTreeMap::new();
            if k == 3 {
                if let Some(o) = parse_objective(&obj, &pool) {
                    objectives.insert("o".to_string(), o);
                }
            } else if let Some(r) = parse_rewrite(&obj, &pool) {
                rewrites.insert("r".to_string(), r);
            }
            let rules: Vec<_> = rewrites.values().flat_map(|r| r.rules.iter()).collect();
            let (policy, generic) = build_policy(&objectives, &rewrites);
            assert_eq!(policy.default_rewrite, generic);
            for (model, targets) in &policy.model_rewrites {
                assert!(rules
                    .iter()
                    .any(|r| r.models.contains(model) && &r.targets == targets));
            }
            assert_eq!(policy.objectives.len(), objectives.len());
        }
    }
}
