//! Fuzzes the `--endpoints-file` loader (`epp::discovery::file::parse_pool_file`): any accepted
//! file has at most `MAX_ENDPOINTS` endpoints with unique names and addresses, well-formed
//! objectives and rewrites, and applies to a datastore.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use switchyard::epp::datastore::{Datastore, DiscoveryEvent};
use switchyard::epp::discovery::file::{parse_pool_file, MAX_ENDPOINTS};

fuzz_target!(|data: &[u8]| {
    let Ok(pool) = parse_pool_file(data, "fuzz") else {
        return;
    };
    assert!(pool.endpoints.len() <= MAX_ENDPOINTS);
    let names: HashSet<&str> = pool.endpoints.iter().map(|e| e.name.as_str()).collect();
    let addrs: HashSet<_> = pool.endpoints.iter().map(|e| e.addr).collect();
    assert_eq!(
        names.len(),
        pool.endpoints.len(),
        "duplicate names accepted"
    );
    assert_eq!(
        addrs.len(),
        pool.endpoints.len(),
        "duplicate addresses accepted"
    );
    assert!(!names.contains(""), "empty name accepted");
    assert!(!pool.policy.objectives.contains_key(""));
    for (model, targets) in &pool.policy.model_rewrites {
        assert!(!model.is_empty());
        assert!(!targets.is_empty());
        assert!(
            targets.iter().any(|t| t.weight > 0),
            "{model}: all weights 0"
        );
        assert!(targets.iter().all(|t| !t.model.is_empty()));
    }
    let n = pool.endpoints.len();
    let ds = Datastore::new();
    ds.apply(DiscoveryEvent::Reset(pool.endpoints));
    ds.set_policy(pool.policy);
    assert_eq!(ds.len(), n);
});
