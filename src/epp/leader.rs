//! Leader election on a `coordination.k8s.io/v1` Lease, with the semantics of client-go's
//! `leaderelection` package that the reference EPP uses through controller-runtime: acquire when
//! the lease is free or its holder has not renewed for a lease duration (measured on our clock,
//! from when we last saw the record change), renew every retry period, stop leading when renewals
//! fail past the renew deadline or another holder shows up, release the lease on shutdown.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::chrono::Utc;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

/// Lease timing and identity (controller-runtime defaults: 15 s / 10 s / 2 s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// Unique per replica (the reference uses the pod name plus a random suffix).
    pub identity: String,
    /// How long a holder's lease lasts without renewal before others may take it.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up leading.
    pub renew_deadline: Duration,
    /// Time between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// The reference lease for a pool: `epp-<ns>-<pool>.gateway-api-inference-extension.sigs.k8s.io`
    /// in the pool's namespace, with controller-runtime's default durations.
    pub fn for_pool(pool_namespace: &str, pool_name: &str, identity: String) -> Self {
        LeaseConfig {
            name: lease_name(pool_namespace, pool_name),
            namespace: pool_namespace.to_string(),
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The reference EPP's lease name for a pool.
pub fn lease_name(pool_namespace: &str, pool_name: &str) -> String {
    format!("epp-{pool_namespace}-{pool_name}.gateway-api-inference-extension.sigs.k8s.io")
}

#[derive(Debug, thiserror::Error)]
enum LeaseError {
    #[error("lease API call failed: {0}")]
    Api(#[from] kube::Error),
    #[error("lease API call timed out")]
    Timeout,
}

/// Starts the election task. The receiver is `true` while this replica leads; it turns `false`
/// within the renew deadline when renewals fail, within a retry period when another holder takes
/// the lease, and on shutdown (after the lease is released).
pub fn spawn_leader_election(
    client: kube::Client,
    config: LeaseConfig,
    shutdown: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    tokio::spawn(Elector::new(api, config, tx).run(shutdown));
    rx
}

/// What we last saw of the lease record, and when (on our monotonic clock).
#[derive(Debug, Clone, PartialEq)]
struct Observed {
    holder: String,
    renew_time: Option<MicroTime>,
    transitions: i32,
}

struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    tx: watch::Sender<bool>,
    observed: Option<(Observed, Instant)>,
    /// When we last renewed successfully while leading.
    last_renew: Option<Instant>,
}

impl Elector {
    fn new(api: Api<Lease>, config: LeaseConfig, tx: watch::Sender<bool>) -> Self {
        Elector {
            api,
            config,
            tx,
            observed: None,
            last_renew: None,
        }
    }

    fn leading(&self) -> bool {
        *self.tx.borrow()
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        tracing::info!(lease = %self.config.name, namespace = %self.config.namespace, identity = %self.config.identity, "leader election started");
        loop {
            if *shutdown.borrow() {
                break;
            }
            // Bound each attempt so a hung API call cannot keep us "leading" past the deadline.
            let budget = match (self.leading(), self.last_renew) {
                (true, Some(at)) => self.config.renew_deadline.saturating_sub(at.elapsed()),
                _ => self.config.renew_deadline,
            };
            let result = match tokio::time::timeout(budget, self.try_acquire_or_renew()).await {
                Ok(r) => r,
                Err(_) => Err(LeaseError::Timeout),
            };
            match result {
                Ok(true) => {
                    self.last_renew = Some(Instant::now());
                    if !self.leading() {
                        tracing::info!(identity = %self.config.identity, "became leader");
                        self.tx.send_replace(true);
                    }
                }
                Ok(false) => {
                    if self.leading() {
                        let holder = self
                            .observed
                            .as_ref()
                            .map(|(o, _)| o.holder.clone())
                            .unwrap_or_default();
                        tracing::warn!(holder, "lease taken by another holder; no longer leader");
                        self.tx.send_replace(false);
                    }
                }
                Err(e) => {
                    let expired = self
                        .last_renew
                        .is_none_or(|at| at.elapsed() >= self.config.renew_deadline);
                    if self.leading() && expired {
                        tracing::warn!(error = %e, "failed to renew the lease before the deadline; no longer leader");
                        self.tx.send_replace(false);
                    } else {
                        tracing::debug!(error = %e, "lease attempt failed");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.retry_period) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
        }
        if self.leading() {
            self.tx.send_replace(false);
            match tokio::time::timeout(self.config.retry_period, self.release()).await {
                Ok(Ok(())) => tracing::info!("lease released"),
                Ok(Err(e)) => tracing::warn!(error = %e, "failed to release the lease"),
                Err(_) => tracing::warn!("timed out releasing the lease"),
            }
        }
        tracing::info!("leader election stopped");
    }

    fn now() -> MicroTime {
        MicroTime(Utc::now())
    }

    fn lease_seconds(&self) -> i32 {
        // The record holds whole seconds; round up so others never see a shorter lease.
        let secs = self.config.lease_duration.as_millis().div_ceil(1000);
        i32::try_from(secs.max(1)).unwrap_or(i32::MAX)
    }

    /// One client-go style attempt. `Ok(true)`: we hold the lease now. `Ok(false)`: someone else
    /// holds a live lease (or won a race for it).
    async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaseError> {
        let now = Self::now();
        let existing = self.api.get_opt(&self.config.name).await?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(self.lease_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                // Someone created it first: not an error, just not ours this round.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let observed = Observed {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            renew_time: spec.renew_time.clone(),
            transitions: spec.lease_transitions.unwrap_or(0),
        };
        let seen_at = match &self.observed {
            Some((prev, at)) if *prev == observed => *at,
            _ => Instant::now(),
        };
        self.observed = Some((observed.clone(), seen_at));

        let ours = observed.holder == self.config.identity;
        if !observed.holder.is_empty() && !ours && seen_at.elapsed() < self.config.lease_duration {
            return Ok(false);
        }
        let (acquire_time, transitions) = if ours {
            (
                spec.acquire_time.clone().unwrap_or_else(|| now.clone()),
                observed.transitions,
            )
        } else {
            (now.clone(), observed.transitions.saturating_add(1))
        };
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.lease_seconds()),
            acquire_time: Some(acquire_time),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..spec
        });
        // `replace` sends our resourceVersion: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                if !ours {
                    tracing::debug!(previous = %observed.holder, "acquired the lease");
                }
                let spec = updated.spec.unwrap_or_default();
                self.observed = Some((
                    Observed {
                        holder: spec.holder_identity.unwrap_or_default(),
                        renew_time: spec.renew_time,
                        transitions: spec.lease_transitions.unwrap_or(0),
                    },
                    Instant::now(),
                ));
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the lease up so another replica can lead at once (client-go `ReleaseOnCancel`).
    async fn release(&self) -> Result<(), LeaseError> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        let now = Self::now();
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(String::new()),
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            ..spec
        });
        self.api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_lease_name_and_defaults() {
        let c = LeaseConfig::for_pool("default", "vllm-llama3-8b-instruct", "epp-0".into());
        assert_eq!(
            c.name,
            "epp-default-vllm-llama3-8b-instruct.gateway-api-inference-extension.sigs.k8s.io"
        );
        assert_eq!(c.namespace, "default");
        assert_eq!(
            (c.lease_duration, c.renew_deadline, c.retry_period),
            (
                Duration::from_secs(15),
                Duration::from_secs(10),
                Duration::from_secs(2)
            )
        );
    }
}
