//! Where endpoints come from. Each source runs as one task and feeds the datastore through
//! [`Datastore::apply`](super::datastore::Datastore::apply); the Kubernetes watch implements the
//! same trait.

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
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
}
