//! Endpoint Picker: an Envoy ext_proc server that routes each inference request to the model
//! replica where it is cheapest (prefix-cache affinity, queue depth, KV-cache utilisation).

pub mod args;
pub mod datastore;
pub mod director;
pub mod discovery;
pub mod endpoint;
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
pub mod server;
pub mod tls;
pub mod work;

/// Runs `switchyard epp` until SIGTERM.
pub async fn run(args: args::EppArgs) -> anyhow::Result<()> {
    server::run(args).await
}
