//! Fuzzes the EndpointPickerConfig loader (`epp::config::parse_config`, YAML from
//! `--config-file`/`--config-text`) and, for every config it accepts, the scheduler built from it:
//! `Scheduler::new` and two scheduling cycles over three endpoints, each recorded as the director
//! does (the second hits the prefix index the first filled). Any accepted config must schedule without panicking.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use prometheus_client::registry::Registry;
use switchyard::epp::datastore::{Datastore, DiscoveryEvent};
use switchyard::epp::endpoint::{Endpoint, EndpointMetrics};
use switchyard::epp::config::parse_config;
use switchyard::epp::scheduling::{Scheduler, SchedulingRequest};

const PROMPT: &[u8] = b"You are a helpful assistant. Summarise the following review in one \
sentence, then rate it from one to five stars. The food was great but the service was slow \
and the music far too loud for a quiet dinner on a weekday evening. We will come back anyway.";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = parse_config(text) else {
        return;
    };
    let mut registry = Registry::default();
    let scheduler = Scheduler::new(&config.scheduling, &mut registry);

    let ds = Datastore::new();
    ds.apply(DiscoveryEvent::Reset(
        (1..=3)
            .map(|i| Endpoint::from_addr(format!("10.0.0.{i}:8000").parse().unwrap()))
            .collect(),
    ));
    for (i, slot) in ds.slots().iter().enumerate() {
        slot.publish(EndpointMetrics {
            waiting_queue_size: i as u32,
            running_requests: 2 - i as u32,
            kv_cache_usage: 0.3 * i as f64,
            updated_at: Some(Instant::now()),
            ..Default::default()
        });
    }
    let candidates = ds.snapshot();
    for (id, fallbacks) in [("a", 0), ("b", 2)] {
        let req = SchedulingRequest {
            request_id: id,
            target_model: "m",
            prompt: PROMPT,
            cache_salt: b"",
            fallbacks,
            headers: &[],
        };
        if let Ok(result) = scheduler.schedule(&req, &candidates) {
            // Whatever the config: at least one pick, only offered endpoints, no duplicates,
            // one score per pick, and matched prefix blocks never exceed the request's blocks.
            assert!(!result.endpoints.is_empty());
            assert_eq!(result.endpoints.len(), result.scores.len());
            let mut names: Vec<&str> = result
                .endpoints
                .iter()
                .map(|e| e.endpoint.name.as_str())
                .collect();
            assert!(names.iter().all(|n| n.starts_with("10.0.0.")), "{names:?}");
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), result.endpoints.len(), "duplicate picks");
            assert!(result.prefix_matched_blocks <= result.prefix_total_blocks);
            if let Some(prefix) = scheduler.prefix_cache() {
                prefix.record(&result);
            }
        }
    }
});
