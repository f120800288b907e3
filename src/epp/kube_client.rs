//! Builds the Kubernetes API client the EPP uses for discovery, leader election and metrics
//! auth: a kubeconfig (`KUBECONFIG` or `~/.kube/config`) when one exists, otherwise the
//! in-cluster service account (the normal case in a pod).

/// Why no Kubernetes client could be built.
#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    #[error("no Kubernetes configuration found (not in a pod and no usable kubeconfig)")]
    NoConfig(#[from] kube::config::InferConfigError),
    #[error("building the Kubernetes client")]
    Client(#[from] kube::Error),
}

/// A client for the current kubeconfig context, or for the cluster this pod runs in.
pub async fn client_from_env() -> Result<kube::Client, KubeClientError> {
    // kube builds its TLS config with rustls' process-wide provider; pin ring (the crate's only
    // provider) so a second provider enabled elsewhere in the graph cannot make that ambiguous.
    // An error only means a provider was installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::Config::infer().await?;
    tracing::info!(cluster_url = %config.cluster_url, namespace = %config.default_namespace, "Kubernetes client configured");
    Ok(kube::Client::try_from(config)?)
}
