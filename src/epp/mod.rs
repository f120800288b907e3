//! Endpoint Picker: an Envoy ext_proc server that routes each inference request to the model
//! replica where it is cheapest (prefix-cache affinity, queue depth, KV-cache utilisation).
//!
//! - [`args`] (flags) and [`config`] (EndpointPickerConfig: wire → registry → resolved slices);
//!   [`server`] wires the parts and hands each its slice.
//! - [`discovery`] → [`datastore`] ← [`scrape`]: endpoints and their metrics snapshots.
//! - [`extproc`]: the per-stream phase machine and the one error → reply mapping.
//! - [`director`]: parse → admit ([`saturation`]) → [`scheduling`] → remember (prefix index,
//!   in-flight counts).
//! - [`kvcache`]: precise prefix routing from the endpoints' KV-cache events.

pub mod args;
pub mod config;
pub mod datastore;
pub mod director;
pub mod discovery;
pub mod endpoint;
pub mod extproc;
pub mod flowcontrol;
pub mod kube_client;
pub mod kvcache;
pub mod leader;
pub mod metrics;
pub mod metrics_auth;
pub mod own_thread;
pub mod prefix;
pub mod request;
pub mod saturation;
pub mod scheduling;
pub mod scrape;
pub mod server;
pub mod tls;
pub mod work;

/// Runs `switchyard epp` until SIGTERM.
pub async fn run(args: args::EppArgs) -> Result<(), server::StartError> {
    server::run(args).await
}
