//! Endpoint Picker: an Envoy ext_proc server that routes each inference request to the model
//! replica where it is cheapest (prefix-cache affinity, queue depth, KV-cache utilisation).

pub mod datastore;
#[cfg(any())] // lead WIP: enabled once scheduling exists
pub mod director;
pub mod discovery;
pub mod endpoint;
#[cfg(any())] // lead WIP: enabled once scheduling exists
pub mod extproc;
pub mod kube_client;
pub mod leader;
pub mod metrics;
pub mod metrics_auth;
pub mod prefix;
pub mod request;
pub mod saturation;
pub mod scheduling;
pub mod scrape;
#[cfg(any())] // lead WIP: enabled once scheduling exists
pub mod server;
pub mod tls;
pub mod args;

/// Runs `switchyard epp`.
#[cfg(any())]
pub async fn run(args: args::EppArgs) -> anyhow::Result<()> {
    server::run(args).await
}

/// Runs `switchyard epp`.
#[cfg(not(any()))]
pub async fn run(_args: args::EppArgs) -> anyhow::Result<()> {
    anyhow::bail!("switchyard epp is being wired up")
}
