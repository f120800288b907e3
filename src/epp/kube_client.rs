//! Builds the Kubernetes API client the EPP uses for discovery, leader election and metrics
//! auth: the in-cluster service account when running in a pod, otherwise `KUBECONFIG` /
//! `~/.kube/config`.

use anyhow::Context;

/// A client for the cluster this process runs in (or the current kubeconfig context).
pub async fn client_from_env() -> anyhow::Result<kube::Client> {
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration found (not in a pod and no usable kubeconfig)")?;
    tracing::info!(cluster_url = %config.cluster_url, namespace = %config.default_namespace, "Kubernetes client configured");
    kube::Client::try_from(config).context("building the Kubernetes client")
}
