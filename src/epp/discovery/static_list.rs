//! `--endpoints ip:port,ip:port`: a fixed endpoint set given on the command line.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

use super::{Discovery, DiscoveryError};
use crate::epp::datastore::{Datastore, DiscoveryEvent};
use crate::epp::endpoint::Endpoint;

/// Parses a comma-separated `ip:port` list (IPv6 as `[::1]:8000`); whitespace around entries is
/// ignored. Empty entries, bad addresses, port 0 and duplicates are errors naming the entry.
pub fn parse_endpoint_list(s: &str) -> Result<Vec<Endpoint>, DiscoveryError> {
    if s.trim().is_empty() {
        return Err(DiscoveryError::EmptyList);
    }
    let mut seen = HashSet::new();
    let mut endpoints = Vec::new();
    for (index, raw) in s.split(',').enumerate() {
        let entry = raw.trim();
        let bad = |reason: &str| DiscoveryError::BadEntry {
            index: index + 1,
            entry: entry.to_string(),
            reason: reason.to_string(),
        };
        if entry.is_empty() {
            return Err(bad("empty entry"));
        }
        let addr: SocketAddr = entry
            .parse()
            .map_err(|_| bad("expected ip:port (IPv6 as [addr]:port)"))?;
        if addr.port() == 0 {
            return Err(bad("port 0 is not routable"));
        }
        if !seen.insert(addr) {
            return Err(DiscoveryError::Duplicate {
                entry: entry.to_string(),
            });
        }
        endpoints.push(Endpoint::from_addr(addr));
    }
    Ok(endpoints)
}

/// A fixed endpoint set: applied once, then nothing changes until shutdown.
#[derive(Debug, Clone)]
pub struct StaticDiscovery {
    endpoints: Vec<Endpoint>,
}

impl StaticDiscovery {
    pub fn new(endpoints: Vec<Endpoint>) -> Self {
        StaticDiscovery { endpoints }
    }

    /// Parses `--endpoints` (see [`parse_endpoint_list`]).
    pub fn from_list(s: &str) -> Result<Self, DiscoveryError> {
        parse_endpoint_list(s).map(StaticDiscovery::new)
    }
}

impl Discovery for StaticDiscovery {
    fn run(
        self: Box<Self>,
        datastore: Arc<Datastore>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Pin<Box<dyn Future<Output = Result<(), DiscoveryError>> + Send>> {
        Box::pin(async move {
            let names: Vec<&str> = self.endpoints.iter().map(|e| e.name.as_str()).collect();
            tracing::info!(count = names.len(), endpoints = ?names, "static endpoints applied");
            datastore.apply(DiscoveryEvent::Reset(self.endpoints.clone()));
            datastore.mark_synced();
            // Returns on `true` or when the sender is gone; either way there is nothing to do.
            let _ = shutdown.wait_for(|stop| *stop).await;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[Endpoint]) -> Vec<String> {
        list.iter().map(|e| e.addr.to_string()).collect()
    }

    #[test]
    fn parses_ipv4_and_ipv6_with_whitespace() {
        let list = parse_endpoint_list(" 10.0.0.1:8000, [::1]:9000 ,192.168.1.3:8000").unwrap();
        assert_eq!(
            addrs(&list),
            ["10.0.0.1:8000", "[::1]:9000", "192.168.1.3:8000"]
        );
        assert_eq!(list[1].name, "[::1]:9000");
        assert_eq!(list[0].engine, None);
        assert!(list[0].labels.is_empty());
    }

    #[test]
    fn rejects_bad_entries_naming_them() {
        let cases = [
            ("", "endpoint list is empty"),
            ("10.0.0.1:8000,", "endpoint entry 2 (\"\"): empty entry"),
            (
                "10.0.0.1",
                "endpoint entry 1 (\"10.0.0.1\"): expected ip:port (IPv6 as [addr]:port)",
            ),
            (
                "localhost:80",
                "endpoint entry 1 (\"localhost:80\"): expected ip:port (IPv6 as [addr]:port)",
            ),
            (
                "::1:8000",
                "endpoint entry 1 (\"::1:8000\"): expected ip:port (IPv6 as [addr]:port)",
            ),
            (
                "10.0.0.1:99999",
                "endpoint entry 1 (\"10.0.0.1:99999\"): expected ip:port (IPv6 as [addr]:port)",
            ),
            (
                "10.0.0.1:0",
                "endpoint entry 1 (\"10.0.0.1:0\"): port 0 is not routable",
            ),
            (
                "10.0.0.1:8000, 10.0.0.1:8000",
                "endpoint \"10.0.0.1:8000\" is listed twice",
            ),
        ];
        for (input, message) in cases {
            assert_eq!(
                parse_endpoint_list(input).unwrap_err().to_string(),
                message,
                "{input:?}"
            );
        }
    }

    #[tokio::test]
    async fn applies_once_marks_synced_and_stops_on_shutdown() {
        let datastore = Arc::new(Datastore::new());
        let (tx, rx) = watch::channel(false);
        let discovery =
            Box::new(StaticDiscovery::from_list("10.0.0.2:8000,10.0.0.1:8000").unwrap());
        let task = tokio::spawn(discovery.run(datastore.clone(), rx));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !datastore.is_synced() {
            assert!(std::time::Instant::now() < deadline, "never synced");
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let names: Vec<_> = datastore
            .snapshot()
            .iter()
            .map(|s| s.endpoint.name.clone())
            .collect();
        assert_eq!(names, ["10.0.0.1:8000", "10.0.0.2:8000"]);
        tx.send(true).unwrap();
        task.await.unwrap().unwrap();
        assert_eq!(*datastore.subscribe().borrow(), 1, "exactly one Reset");
    }
}
