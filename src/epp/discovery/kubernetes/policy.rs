//! InferenceObjective and InferenceModelRewrite objects (`inference.networking.x-k8s.io/v1alpha2`)
//! turned into the datastore's [`RequestPolicy`].
//!
//! Only objects whose `spec.poolRef` names our pool (name and group) count, as in the reference
//! reconcilers (`pkg/epp/controller/inferenceobjective_reconciler.go`). Rewrite precedence follows
//! the reference model-rewrite store: an exact model match beats a rule without matches, and
//! among candidates the oldest object (creation time, then name) wins.

use std::collections::{BTreeMap, HashMap};

use kube::api::{ApiResource, DynamicObject};
use serde::Deserialize;

use crate::epp::datastore::{RequestPolicy, RewriteTarget};

/// API group of InferenceObjective and InferenceModelRewrite.
pub const GROUP: &str = "inference.networking.x-k8s.io";
pub const VERSION: &str = "v1alpha2";
/// `poolRef.group` when the object leaves it out (the CRD default).
const DEFAULT_POOL_REF_GROUP: &str = "inference.networking.k8s.io";

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: GROUP.to_string(),
        version: VERSION.to_string(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: kind.to_string(),
        plural: plural.to_string(),
    }
}

pub fn objective_api_resource() -> ApiResource {
    resource("InferenceObjective", "inferenceobjectives")
}

pub fn rewrite_api_resource() -> ApiResource {
    resource("InferenceModelRewrite", "inferencemodelrewrites")
}

/// The pool objects must reference to apply to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRef {
    pub name: String,
    pub group: String,
}

#[derive(Deserialize)]
struct PoolRefWire {
    name: String,
    #[serde(default)]
    group: Option<String>,
}

impl PoolRef {
    fn is(&self, wire: &PoolRefWire) -> bool {
        let group = wire
            .group
            .as_deref()
            .filter(|g| !g.is_empty())
            .unwrap_or(DEFAULT_POOL_REF_GROUP);
        wire.name == self.name && group == self.group
    }
}

/// What an InferenceObjective contributes: its priority (unset = 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Objective {
    pub priority: i32,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectiveSpec {
    #[serde(default)]
    priority: Option<i32>,
    pool_ref: PoolRefWire,
}

/// The objective's contribution, or `None` when it does not apply to this pool (other pool,
/// being deleted, or malformed — the latter logged).
pub fn parse_objective(obj: &DynamicObject, pool: &PoolRef) -> Option<Objective> {
    if obj.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let spec = obj.data.get("spec")?;
    match ObjectiveSpec::deserialize(spec) {
        Ok(spec) if pool.is(&spec.pool_ref) => Some(Objective {
            priority: spec.priority.unwrap_or(0),
        }),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(objective = ?obj.metadata.name, error = %e, "ignoring malformed InferenceObjective");
            None
        }
    }
}

/// One rewrite rule: the models it matches exactly (empty = every model) and weighted targets.
#[derive(Debug, Clone, PartialEq)]
pub struct RewriteRule {
    pub models: Vec<String>,
    pub targets: Vec<RewriteTarget>,
}

/// What an InferenceModelRewrite contributes, with the key that orders it against others.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite {
    /// RFC 3339 creation time; sorts chronologically (the API server writes it in UTC, seconds).
    pub created: String,
    pub rules: Vec<RewriteRule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RewriteSpec {
    #[serde(default)]
    pool_ref: Option<PoolRefWire>,
    #[serde(default)]
    rules: Vec<RuleWire>,
}

#[derive(Deserialize)]
struct RuleWire {
    #[serde(default)]
    matches: Vec<MatchWire>,
    #[serde(default)]
    targets: Vec<TargetWire>,
}

#[derive(Deserialize)]
struct MatchWire {
    #[serde(default)]
    model: Option<ModelMatchWire>,
}

#[derive(Deserialize)]
struct ModelMatchWire {
    #[serde(default, rename = "type")]
    type_: Option<String>,
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TargetWire {
    model_rewrite: String,
    #[serde(default)]
    weight: Option<u32>,
}

/// The rewrite's rules, or `None` when it does not apply to this pool.
pub fn parse_rewrite(obj: &DynamicObject, pool: &PoolRef) -> Option<Rewrite> {
    if obj.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let spec = obj.data.get("spec")?;
    let spec = match RewriteSpec::deserialize(spec) {
        Ok(spec) => spec,
        Err(e) => {
            tracing::warn!(rewrite = ?obj.metadata.name, error = %e, "ignoring malformed InferenceModelRewrite");
            return None;
        }
    };
    if !spec.pool_ref.as_ref().is_some_and(|r| pool.is(r)) {
        return None;
    }
    let rules = spec
        .rules
        .into_iter()
        .filter_map(|rule| {
            let mut models = Vec::new();
            for m in rule.matches.into_iter().filter_map(|m| m.model) {
                // Exact is the only match type the CRD defines; anything else is skipped so a
                // future type is not mistaken for an exact match.
                match m.type_.as_deref() {
                    None | Some("Exact") => models.push(m.value),
                    Some(other) => {
                        tracing::warn!(kind = other, "ignoring unsupported model match type")
                    }
                }
            }
            // Weights are all set or all unset; unset means an equal split.
            let targets: Vec<RewriteTarget> = rule
                .targets
                .into_iter()
                .map(|t| RewriteTarget {
                    model: t.model_rewrite,
                    weight: t.weight.unwrap_or(1),
                })
                .collect();
            (!targets.is_empty()).then_some(RewriteRule { models, targets })
        })
        .collect();
    let created = obj
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_rfc3339())
        .unwrap_or_default();
    Some(Rewrite { created, rules })
}

/// The policy computed from all applicable objectives and rewrites, plus the targets of the
/// winning rule without matches (applies to every model that has no exact rule).
pub fn build_policy(
    objectives: &BTreeMap<String, Objective>,
    rewrites: &BTreeMap<String, Rewrite>,
) -> (RequestPolicy, Option<Vec<RewriteTarget>>) {
    let objectives: HashMap<String, i32> = objectives
        .iter()
        .map(|(name, o)| (name.clone(), o.priority))
        .collect();
    let mut ordered: Vec<(&String, &Rewrite)> = rewrites.iter().collect();
    ordered.sort_by(|a, b| (&a.1.created, a.0).cmp(&(&b.1.created, b.0)));
    let mut model_rewrites: HashMap<String, Vec<RewriteTarget>> = HashMap::new();
    let mut generic = None;
    for (_, rewrite) in ordered {
        for rule in &rewrite.rules {
            if rule.models.is_empty() {
                generic.get_or_insert_with(|| rule.targets.clone());
            }
            for model in &rule.models {
                model_rewrites
                    .entry(model.clone())
                    .or_insert_with(|| rule.targets.clone());
            }
        }
    }
    (
        RequestPolicy {
            objectives,
            model_rewrites,
            default_rewrite: generic.clone(),
        },
        generic,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool() -> PoolRef {
        PoolRef {
            name: "pool".into(),
            group: DEFAULT_POOL_REF_GROUP.into(),
        }
    }

    fn obj(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    fn target(model: &str, weight: u32) -> RewriteTarget {
        RewriteTarget {
            model: model.into(),
            weight,
        }
    }

    #[test]
    fn objectives_filter_by_pool_ref_and_default_priority() {
        let mine = obj(
            json!({"metadata": {"name": "a"}, "spec": {"priority": 3, "poolRef": {"name": "pool"}}}),
        );
        assert_eq!(
            parse_objective(&mine, &pool()),
            Some(Objective { priority: 3 })
        );
        let unset = obj(
            json!({"metadata": {"name": "b"}, "spec": {"poolRef": {"name": "pool", "group": DEFAULT_POOL_REF_GROUP}}}),
        );
        assert_eq!(
            parse_objective(&unset, &pool()),
            Some(Objective { priority: 0 })
        );
        let other = obj(
            json!({"metadata": {"name": "c"}, "spec": {"priority": 1, "poolRef": {"name": "other"}}}),
        );
        assert_eq!(parse_objective(&other, &pool()), None);
        let other_group = obj(
            json!({"metadata": {"name": "c"}, "spec": {"poolRef": {"name": "pool", "group": "x.io"}}}),
        );
        assert_eq!(parse_objective(&other_group, &pool()), None);
        let deleting = obj(
            json!({"metadata": {"name": "d", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"poolRef": {"name": "pool"}}}),
        );
        assert_eq!(parse_objective(&deleting, &pool()), None);
        let malformed = obj(
            json!({"metadata": {"name": "e"}, "spec": {"priority": "high", "poolRef": {"name": "pool"}}}),
        );
        assert_eq!(parse_objective(&malformed, &pool()), None);
    }

    #[test]
    fn rewrites_exact_beats_generic_and_oldest_wins() {
        let old = obj(json!({
            "metadata": {"name": "old", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"poolRef": {"name": "pool"}, "rules": [
                {"matches": [{"model": {"type": "Exact", "value": "m"}}],
                 "targets": [{"modelRewrite": "m-v1", "weight": 90}, {"modelRewrite": "m-v2", "weight": 10}]},
                {"matches": [], "targets": [{"modelRewrite": "fallback-old"}]}
            ]}
        }));
        let new = obj(json!({
            "metadata": {"name": "new", "creationTimestamp": "2026-02-01T00:00:00Z"},
            "spec": {"poolRef": {"name": "pool"}, "rules": [
                {"matches": [{"model": {"value": "m"}}, {"model": {"value": "n"}}],
                 "targets": [{"modelRewrite": "ignored"}]},
                {"targets": [{"modelRewrite": "fallback-new"}]}
            ]}
        }));
        let foreign = obj(
            json!({"metadata": {"name": "x"}, "spec": {"poolRef": {"name": "other"}, "rules": []}}),
        );
        let no_ref = obj(json!({"metadata": {"name": "y"}, "spec": {"rules": []}}));
        assert_eq!(parse_rewrite(&foreign, &pool()), None);
        assert_eq!(parse_rewrite(&no_ref, &pool()), None);

        let mut rewrites = BTreeMap::new();
        rewrites.insert("new".to_string(), parse_rewrite(&new, &pool()).unwrap());
        rewrites.insert("old".to_string(), parse_rewrite(&old, &pool()).unwrap());
        let mut objectives = BTreeMap::new();
        objectives.insert("sql-lora".to_string(), Objective { priority: 2 });
        let (policy, generic) = build_policy(&objectives, &rewrites);
        assert_eq!(
            policy.objectives,
            HashMap::from([("sql-lora".to_string(), 2)])
        );
        assert_eq!(
            policy.model_rewrites["m"],
            vec![target("m-v1", 90), target("m-v2", 10)]
        );
        assert_eq!(policy.model_rewrites["n"], vec![target("ignored", 1)]);
        assert_eq!(policy.model_rewrites.len(), 2);
        assert_eq!(generic, Some(vec![target("fallback-old", 1)]));

        rewrites.remove("old");
        let (policy, generic) = build_policy(&objectives, &rewrites);
        assert_eq!(policy.model_rewrites["m"], vec![target("ignored", 1)]);
        assert_eq!(generic, Some(vec![target("fallback-new", 1)]));
    }
}
