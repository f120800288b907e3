//! Where endpoints come from. Each source runs as one task and feeds the datastore through
//! [`Datastore::apply`](super::datastore::Datastore::apply); the Kubernetes watch implements the
//! same trait.

pub mod file;
pub mod kubernetes;
pub mod static_list;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

use super::datastore::Datastore;

/// A source of endpoint-set updates.
pub trait Discovery: Send + 'static {
    /// Runs until `shutdown` turns true. Calls `datastore.mark_synced()` after the first full sync.
    fn run(
        self: Box<Self>,
        datastore: Arc<Datastore>,
        shutdown: watch::Receiver<bool>,
    ) -> Pin<Box<dyn Future<Output = Result<(), DiscoveryError>> + Send>>;
}

/// Why an endpoint list or pool file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("endpoint list is empty")]
    EmptyList,
    #[error("endpoint entry {index} ({entry:?}): {reason}")]
    BadEntry {
        index: usize,
        entry: String,
        reason: String,
    },
    #[error("endpoint {entry:?} is listed twice")]
    Duplicate { entry: String },
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: file is over the {max}-byte limit")]
    TooLarge { path: String, max: u64 },
    #[error("{path}: line {line}, column {column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    /// The Kubernetes source failed (bad flags, a watch error, a watch that ended).
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::KubeDiscoveryError),
}
