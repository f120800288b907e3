//! A sandbox through agent-sandbox v1beta1: create a `SandboxClaim` from a warm pool
//! (`spec.warmPoolRef`), wait until it is bound to a `Sandbox` (`status.sandbox.name`) and that
//! Sandbox is `Ready`, and delete the claim at the end. Polled with GETs (the agent's Role grants
//! get on both kinds); upstream's Python client (`k8s_helper.py`) watches the same fields.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams};
use serde_json::{json, Value};

/// Annotation upstream's client sets on every claim it creates (when it was first asked for).
const REQUESTED_AT: &str = "agents.x-k8s.io/client-first-requested-at";

/// Claim `Ready=False` reasons the controller does not recover from (upstream client's
/// `TERMINAL_CLAIM_READY_REASONS`, plus `TemplateNotFound`): waiting longer is pointless.
const TERMINAL_REASONS: [&str; 7] = [
    "TemplateNotFound",
    "InvalidMetadata",
    "EnvVarsInjectionRejected",
    "VolumeClaimTemplatesError",
    "ClaimExpired",
    "SandboxExpired",
    "InvalidConfiguration",
];

pub fn claim_resource() -> ApiResource {
    ApiResource {
        group: "extensions.agents.x-k8s.io".into(),
        version: "v1beta1".into(),
        api_version: "extensions.agents.x-k8s.io/v1beta1".into(),
        kind: "SandboxClaim".into(),
        plural: "sandboxclaims".into(),
    }
}

pub fn sandbox_resource() -> ApiResource {
    ApiResource {
        group: "agents.x-k8s.io".into(),
        version: "v1beta1".into(),
        api_version: "agents.x-k8s.io/v1beta1".into(),
        kind: "Sandbox".into(),
        plural: "sandboxes".into(),
    }
}

#[derive(Debug, Clone)]
pub struct ClaimConfig {
    pub namespace: String,
    pub warm_pool: String,
    /// How long the claim may take to be bound and its sandbox to be ready.
    pub ready_timeout: Duration,
    pub poll_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("creating SandboxClaim in {namespace} (warm pool {pool}): {source}")]
    Create {
        namespace: String,
        pool: String,
        source: Box<kube::Error>,
    },
    #[error("reading {kind} {name}: {source}")]
    Read {
        kind: &'static str,
        name: String,
        source: Box<kube::Error>,
    },
    #[error("SandboxClaim {name} failed: {reason}: {message}")]
    Failed {
        name: String,
        reason: String,
        message: String,
    },
    #[error("SandboxClaim {name} was deleted while waiting for its sandbox")]
    Vanished { name: String },
    #[error("SandboxClaim {name}: no ready sandbox within {timeout:?} ({stage})")]
    Timeout {
        name: String,
        timeout: Duration,
        stage: &'static str,
    },
    #[error("deleting SandboxClaim {name}: {source}")]
    Delete {
        name: String,
        source: Box<kube::Error>,
    },
}

/// A bound claim: the sandbox to address through the router.
pub struct Claim {
    claims: Api<DynamicObject>,
    pub name: String,
    pub namespace: String,
    /// The Sandbox the claim is bound to (`X-Sandbox-ID`).
    pub sandbox: String,
    /// The sandbox pod's first IP when the controller reports it (`X-Sandbox-Pod-IP`).
    pub pod_ip: Option<String>,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("sandbox", &self.sandbox)
            .field("pod_ip", &self.pod_ip)
            .finish()
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// A `Ready=False` condition with a terminal reason, as (reason, message).
fn terminal_condition(status: &Value) -> Option<(String, String)> {
    status["conditions"].as_array()?.iter().find_map(|c| {
        let reason = c["reason"].as_str()?;
        (c["type"] == "Ready" && c["status"] == "False" && TERMINAL_REASONS.contains(&reason)).then(
            || {
                (
                    reason.to_string(),
                    c["message"].as_str().unwrap_or("").to_string(),
                )
            },
        )
    })
}

fn is_ready(status: &Value) -> bool {
    status["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

impl Claim {
    /// Creates a claim and waits for a ready sandbox; on any failure after the create, the claim
    /// is deleted before the error is returned.
    pub async fn acquire(client: kube::Client, config: &ClaimConfig) -> Result<Claim, ClaimError> {
        let claims: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &config.namespace, &claim_resource());
        let name = format!("switchyard-agent-{:012x}", rand::random::<u64>() >> 16);
        let requested_at = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        let mut object = DynamicObject::new(&name, &claim_resource())
            .data(json!({"spec": {"warmPoolRef": {"name": config.warm_pool}}}));
        object.metadata.labels = Some(BTreeMap::from([(
            "app.kubernetes.io/managed-by".to_string(),
            "switchyard-agent".to_string(),
        )]));
        object.metadata.annotations = Some(BTreeMap::from([(
            REQUESTED_AT.to_string(),
            requested_at.to_string(),
        )]));
        claims
            .create(&PostParams::default(), &object)
            .await
            .map_err(|source| ClaimError::Create {
                namespace: config.namespace.clone(),
                pool: config.warm_pool.clone(),
                source: Box::new(source),
            })?;
        tracing::info!(claim = %name, namespace = %config.namespace, pool = %config.warm_pool, "SandboxClaim created");
        let mut claim = Claim {
            claims,
            name,
            namespace: config.namespace.clone(),
            sandbox: String::new(),
            pod_ip: None,
        };
        let waited = tokio::time::timeout(
            config.ready_timeout,
            claim.wait_ready(client, config.poll_interval),
        )
        .await;
        let outcome = match waited {
            Ok(result) => result,
            Err(_) => Err(ClaimError::Timeout {
                name: claim.name.clone(),
                timeout: config.ready_timeout,
                stage: if claim.sandbox.is_empty() {
                    "not bound to a sandbox"
                } else {
                    "sandbox not Ready"
                },
            }),
        };
        match outcome {
            Ok(()) => Ok(claim),
            Err(e) => {
                if let Err(cleanup) = claim.release().await {
                    tracing::warn!(error = %cleanup, "could not delete the failed claim");
                }
                Err(e)
            }
        }
    }

    async fn wait_ready(&mut self, client: kube::Client, poll: Duration) -> Result<(), ClaimError> {
        // Bound: the claim names its sandbox.
        loop {
            let claim =
                self.claims
                    .get_opt(&self.name)
                    .await
                    .map_err(|source| ClaimError::Read {
                        kind: "SandboxClaim",
                        name: self.name.clone(),
                        source: Box::new(source),
                    })?;
            let Some(claim) = claim else {
                return Err(ClaimError::Vanished {
                    name: self.name.clone(),
                });
            };
            let status = claim.data.get("status").cloned().unwrap_or(Value::Null);
            if let Some((reason, message)) = terminal_condition(&status) {
                return Err(ClaimError::Failed {
                    name: self.name.clone(),
                    reason,
                    message,
                });
            }
            if let Some(sandbox) = status["sandbox"]["name"].as_str().filter(|s| !s.is_empty()) {
                self.sandbox = sandbox.to_string();
                break;
            }
            tokio::time::sleep(poll).await;
        }
        tracing::debug!(claim = %self.name, sandbox = %self.sandbox, "claim bound");
        let sandboxes: Api<DynamicObject> =
            Api::namespaced_with(client, &self.namespace, &sandbox_resource());
        loop {
            let sandbox =
                sandboxes
                    .get_opt(&self.sandbox)
                    .await
                    .map_err(|source| ClaimError::Read {
                        kind: "Sandbox",
                        name: self.sandbox.clone(),
                        source: Box::new(source),
                    })?;
            if let Some(sandbox) = sandbox {
                let status = sandbox.data.get("status").cloned().unwrap_or(Value::Null);
                if is_ready(&status) {
                    self.pod_ip = status["podIPs"]
                        .as_array()
                        .and_then(|ips| ips.first())
                        .and_then(|ip| ip.as_str().or_else(|| ip["ip"].as_str()))
                        .map(str::to_string);
                    tracing::info!(claim = %self.name, sandbox = %self.sandbox, "sandbox ready");
                    return Ok(());
                }
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Deletes the claim (its sandbox goes with it); a claim already gone is fine.
    pub async fn release(&self) -> Result<(), ClaimError> {
        match self
            .claims
            .delete(&self.name, &DeleteParams::default())
            .await
        {
            Ok(_) => {
                tracing::info!(claim = %self.name, "SandboxClaim deleted");
                Ok(())
            }
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(ClaimError::Delete {
                name: self.name.clone(),
                source: Box::new(source),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions() {
        let s = json!({"conditions": [{"type": "Ready", "status": "False",
            "reason": "TemplateNotFound", "message": "no such template"}]});
        assert_eq!(
            terminal_condition(&s),
            Some(("TemplateNotFound".into(), "no such template".into()))
        );
        assert!(!is_ready(&s));
        let s = json!({"conditions": [{"type": "Ready", "status": "False", "reason": "SandboxNotReady"}]});
        assert_eq!(terminal_condition(&s), None);
        assert!(is_ready(
            &json!({"conditions": [{"type": "Ready", "status": "True"}]})
        ));
        assert!(!is_ready(&Value::Null));
    }
}
