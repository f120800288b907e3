//! The flow controller with a scripted pool (paused time where timing matters), and late
//! binding through the real director.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::config::{BandConfig, Fairness, FlowControlConfig};
use super::controller::{Dispatch, FlowController, FlowError, FlowRequest, PoolState, Ticket};
use super::metrics::{FlowMetrics, RequestLabels};

/// A pool with `room` dispatches left before it saturates; records what was dispatched, and
/// binds each request to whatever `bind_to` holds at dispatch time.
#[derive(Clone, Default)]
struct Script {
    room: Arc<Mutex<usize>>,
    endpoints: Arc<Mutex<usize>>,
    log: Arc<Mutex<Vec<&'static str>>>,
    bind_to: Arc<Mutex<&'static str>>,
    /// The lowest endpoint score while there is room (default 0.5).
    load: Arc<Mutex<Option<f64>>>,
    /// The usage ceiling each dispatch was given, in dispatch order.
    ceilings: Arc<Mutex<Vec<f64>>>,
}

impl Dispatch<&'static str, String> for Script {
    fn pool(&mut self) -> PoolState {
        let score = if *self.room.lock() > 0 {
            self.load.lock().unwrap_or(0.5)
        } else {
            1.0
        };
        PoolState {
            endpoints: *self.endpoints.lock(),
            saturation: score,
            least_loaded: score,
        }
    }

    fn dispatch(&mut self, value: &'static str, ceiling: f64) -> String {
        self.ceilings.lock().push(ceiling);
        let mut room = self.room.lock();
        *room = room.saturating_sub(1);
        self.log.lock().push(value);
        format!("{value}@{}", self.bind_to.lock())
    }
}

type Controller = FlowController<&'static str, String>;

struct Harness {
    fc: Controller,
    script: Script,
    registry: Registry,
    stop: watch::Sender<bool>,
}

impl Harness {
    /// A running controller over a saturated pool of one endpoint.
    fn start(config: FlowControlConfig) -> Harness {
        let mut registry = Registry::default();
        let fc = Controller::new(config, FlowMetrics::new(&mut registry, "pool"));
        let script = Script::default();
        *script.endpoints.lock() = 1;
        *script.bind_to.lock() = "first";
        let (stop, rx) = watch::channel(false);
        let (runner, d) = (fc.clone(), script.clone());
        tokio::spawn(async move { runner.run(d, Duration::from_millis(50), rx).await });
        Harness {
            fc,
            script,
            registry,
            stop,
        }
    }

    fn offer(
        &self,
        priority: i32,
        flow: &str,
        bytes: u64,
        v: &'static str,
    ) -> Result<Ticket<String>, FlowError> {
        self.fc.enqueue(FlowRequest {
            priority,
            fairness_id: Arc::from(flow),
            bytes,
            labels: RequestLabels {
                fairness_id: flow.to_string(),
                priority: priority.to_string(),
                model_name: "m".into(),
                target_model_name: "m".into(),
            },
            value: v,
        })
    }

    /// Opens room for `n` dispatches and lets the dispatcher run.
    async fn open(&self, n: usize) {
        *self.script.room.lock() = n;
        self.fc.wake();
        settle().await;
    }

    fn metrics(&self) -> String {
        crate::promencode::encode(&self.registry)
    }
}

/// Lets spawned tasks run (paused time does not advance while they are busy).
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn higher_priority_bands_dispatch_first_fcfs_within() {
    let h = Harness::start(FlowControlConfig::default());
    settle().await;
    let mut tickets = Vec::new();
    for (p, v) in [
        (-1, "shed0"),
        (0, "std0"),
        (2, "crit0"),
        (0, "std1"),
        (2, "crit1"),
    ] {
        tickets.push(h.offer(p, "f", 10, v).unwrap());
    }
    settle().await;
    assert!(h.script.log.lock().is_empty(), "saturated: nothing leaves");
    assert_eq!(h.fc.queued(), 5);
    h.open(5).await;
    assert_eq!(
        *h.script.log.lock(),
        ["crit0", "crit1", "std0", "std1", "shed0"]
    );
    let mut got = Vec::new();
    for t in tickets {
        got.push(t.await.unwrap());
    }
    assert_eq!(
        got,
        [
            "shed0@first",
            "std0@first",
            "crit0@first",
            "std1@first",
            "crit1@first"
        ]
    );
    assert_eq!(h.fc.queued(), 0);
}

#[tokio::test(start_paused = true)]
async fn round_robin_interleaves_two_fairness_ids() {
    let mut config = FlowControlConfig::default();
    config.default_band.fairness = Fairness::RoundRobin;
    let h = Harness::start(config);
    settle().await;
    // "tenant-a" floods first, "tenant-b" arrives after.
    let mut tickets = Vec::new();
    for v in ["a0", "a1", "a2", "a3"] {
        tickets.push(h.offer(0, "tenant-a", 1, v).unwrap());
    }
    for v in ["b0", "b1"] {
        tickets.push(h.offer(0, "tenant-b", 1, v).unwrap());
    }
    h.open(6).await;
    assert_eq!(*h.script.log.lock(), ["a0", "b0", "a1", "b1", "a2", "a3"]);

    // The reference default (global strict) serves the same arrivals first come first served.
    let h = Harness::start(FlowControlConfig::default());
    settle().await;
    let mut tickets = Vec::new();
    for (f, v) in [("tenant-a", "a0"), ("tenant-a", "a1"), ("tenant-b", "b0")] {
        tickets.push(h.offer(0, f, 1, v).unwrap());
    }
    h.open(3).await;
    assert_eq!(*h.script.log.lock(), ["a0", "a1", "b0"]);
}

#[tokio::test(start_paused = true)]
async fn capacity_rejects_at_arrival_and_cancellation_frees_it() {
    let mut config = FlowControlConfig {
        max_bytes: Some(1000),
        ..FlowControlConfig::default()
    };
    config.bands.insert(
        -1,
        BandConfig {
            max_requests: 1,
            ..BandConfig::default()
        },
    );
    let h = Harness::start(config);
    settle().await;
    let first = h.offer(-1, "f", 10, "s0").unwrap();
    assert_eq!(
        h.offer(-1, "f", 10, "s1").err(),
        Some(FlowError::RejectedCapacity)
    );
    // Another band still has room, up to the global byte limit.
    let big = h.offer(0, "f", 990, "a0").unwrap();
    assert_eq!(
        h.offer(0, "f", 1, "a1").err(),
        Some(FlowError::RejectedCapacity)
    );
    let text = h.metrics();
    assert!(text.contains(
        "inference_extension_flow_control_queue_size{fairness_id=\"f\",priority=\"-1\",inference_pool=\"pool\",model_name=\"m\",target_model_name=\"m\"} 1"
    ), "{text}");
    assert!(text.contains(
        "llm_d_epp_flow_control_queue_bytes{fairness_id=\"f\",priority=\"0\",inference_pool=\"pool\",model_name=\"m\",target_model_name=\"m\"} 990"
    ), "{text}");
    assert!(text.contains(
        "llm_d_epp_flow_control_requests_total{outcome=\"RejectedCapacity\",priority=\"-1\",inference_pool=\"pool\"} 1"
    ), "{text}");

    // The client goes away: its place is free at once, without any dispatch.
    drop(first);
    drop(big);
    assert_eq!(h.fc.queued(), 0);
    let again = h.offer(-1, "f", 10, "s2");
    assert!(again.is_ok());
    let text = h.metrics();
    assert!(text.contains(
        "llm_d_epp_flow_control_requests_total{outcome=\"EvictedContextCancelled\",priority=\"0\",inference_pool=\"pool\"} 1"
    ), "{text}");
    assert!(text.contains(
        "inference_extension_flow_control_queue_bytes{fairness_id=\"f\",priority=\"0\",inference_pool=\"pool\",model_name=\"m\",target_model_name=\"m\"} 0"
    ), "{text}");
    h.open(1).await;
    assert_eq!(*h.script.log.lock(), ["s2"]);
}

#[tokio::test(start_paused = true)]
async fn ttl_evicts_exactly_at_the_deadline() {
    let config = FlowControlConfig {
        default_request_ttl: Some(Duration::from_secs(2)),
        no_endpoint_request_ttl: Some(Duration::from_secs(2)),
        ..FlowControlConfig::default()
    };
    let h = Harness::start(config);
    settle().await;
    let mut early = h.offer(0, "f", 1, "early").unwrap();
    tokio::time::advance(Duration::from_millis(500)).await;
    let mut late = h.offer(0, "f", 1, "late").unwrap();
    tokio::time::advance(Duration::from_millis(1499)).await;
    settle().await;
    assert!(
        futures::poll!(&mut early).is_pending(),
        "1.999 s: still queued"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(early.await, Err(FlowError::EvictedTtl));
    assert!(futures::poll!(&mut late).is_pending());
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(late.await, Err(FlowError::EvictedTtl));
    assert!(h.script.log.lock().is_empty());
    assert!(h.metrics().contains(
        "llm_d_epp_flow_control_requests_total{outcome=\"EvictedTTL\",priority=\"0\",inference_pool=\"pool\"} 2"
    ));
}

#[tokio::test(start_paused = true)]
async fn an_empty_pool_turns_capacity_and_ttl_failures_into_unavailability() {
    let mut config = FlowControlConfig {
        default_request_ttl: Some(Duration::from_secs(2)),
        no_endpoint_request_ttl: Some(Duration::from_secs(5)),
        ..FlowControlConfig::default()
    };
    config.default_band.max_requests = 1;
    let h = Harness::start(config);
    *h.script.endpoints.lock() = 0;
    h.fc.wake();
    settle().await;
    let waiting = h.offer(0, "f", 1, "w").unwrap();
    assert_eq!(
        h.offer(0, "f", 1, "x").err(),
        Some(FlowError::RejectedNoEndpoints)
    );
    // The no-endpoint budget (5 s) applies, not the default (2 s).
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(waiting.await, Err(FlowError::EvictedNoEndpoints));
}

#[tokio::test(start_paused = true)]
async fn late_binding_sees_the_pool_at_dispatch_time() {
    let h = Harness::start(FlowControlConfig::default());
    settle().await;
    let t = h.offer(0, "f", 1, "r").unwrap();
    settle().await;
    // While it waits, the pool changes; the binding must reflect the change.
    *h.script.bind_to.lock() = "second";
    h.open(1).await;
    assert_eq!(t.await.unwrap(), "r@second");
}

#[tokio::test(start_paused = true)]
async fn shutdown_fails_queued_requests_and_refuses_new_ones() {
    let h = Harness::start(FlowControlConfig::default());
    settle().await;
    let t = h.offer(0, "f", 1, "r").unwrap();
    h.stop.send(true).unwrap();
    assert_eq!(t.await, Err(FlowError::ShutDown));
    assert_eq!(h.offer(0, "f", 1, "n").err(), Some(FlowError::NotRunning));
}

/// Late binding through the real director: the request is scheduled on the metrics published
/// while it waited, not on those of its arrival.
#[test]
fn director_schedules_a_queued_request_on_the_latest_metrics() {
    use crate::epp::config::{parse_config, REFERENCE_DEFAULT_CONFIG};
    use crate::epp::datastore::{Datastore, DiscoveryEvent};
    use crate::epp::director::{Director, DirectorConfig, RequestMeta};
    use crate::epp::endpoint::{Endpoint, EndpointMetrics};
    use crate::epp::saturation::SaturationDetector;
    use crate::epp::scheduling::Scheduler;

    let mut registry = Registry::default();
    let scheduler = Arc::new(Scheduler::new(
        &parse_config(REFERENCE_DEFAULT_CONFIG).unwrap().scheduling,
        &mut registry,
    ));
    let ds = Arc::new(Datastore::new());
    ds.apply(DiscoveryEvent::Reset(vec![
        Endpoint::from_addr("10.0.0.1:8000".parse().unwrap()),
        Endpoint::from_addr("10.0.0.2:8000".parse().unwrap()),
    ]));
    let publish = |queues: [u32; 2]| {
        for (slot, q) in ds.slots().iter().zip(queues) {
            slot.publish(EndpointMetrics {
                waiting_queue_size: q,
                updated_at: Some(tokio::time::Instant::now()),
                ..Default::default()
            });
        }
    };
    let director = Director::new(
        ds.clone(),
        scheduler,
        SaturationDetector::default(),
        DirectorConfig {
            fallback_endpoints: 0,
            disable_subset_filter: false,
            known_models: Default::default(),
            inflight_accounting: true,
        },
    );
    let meta = RequestMeta {
        request_id: "r".into(),
        ..RequestMeta::default()
    };
    let body = br#"{"model":"m","prompt":"hello"}"#.to_vec();
    // At arrival both are loaded (8/5 and 12/5): no endpoint has room.
    publish([8, 12]);
    let parsed = director.parse(&meta, &body).unwrap();
    let state = director.pool_state();
    assert!((state.saturation - 2.0).abs() < 1e-12);
    assert!((state.least_loaded - 1.6).abs() < 1e-12);
    // While queued the load moves: .1 still loaded, .2 idle: room (the mean, 0.8, agrees).
    publish([8, 0]);
    let state = director.pool_state();
    assert_eq!(state.endpoints, 2);
    assert!((state.saturation - 0.8).abs() < 1e-12);
    assert_eq!(state.least_loaded, 0.0);
    let decision = director.route_parsed(&meta, &body, parsed, 1.0).unwrap();
    assert_eq!(decision.destination, "10.0.0.2:8000");
    // The dispatch counts at once in the gate: .2 now 1/5.
    let state = director.pool_state();
    assert!((state.saturation - 0.9).abs() < 1e-12);
    assert!((state.least_loaded - 0.2).abs() < 1e-12);
}

/// Priority holdback: with interactive (1) and batch (-1) active, batch's ceiling is 0.5 and
/// interactive's 1.0. At a least-loaded score of 0.6 interactive still leaves and batch waits
/// (the static policy would let both out); at 0.4 batch leaves too.
#[tokio::test(start_paused = true)]
async fn holdback_keeps_batch_queued_while_interactive_still_dispatches() {
    use super::usage::{HoldbackDomain, HoldbackParams, UsageLimit};
    let config = FlowControlConfig {
        usage_limit: UsageLimit::PriorityHoldback(HoldbackParams {
            domain: HoldbackDomain::Rank,
            min_ceiling: 0.5,
            max_ceiling: 1.0,
        }),
        ..FlowControlConfig::default()
    };
    let h = Harness::start(config);
    settle().await;
    let mut tickets = Vec::new();
    for (p, v) in [(-1, "b0"), (-1, "b1"), (1, "i0")] {
        tickets.push(h.offer(p, "f", 10, v).unwrap());
    }
    settle().await;
    *h.script.load.lock() = Some(0.6);
    h.open(10).await;
    assert_eq!(*h.script.log.lock(), ["i0"]);
    assert_eq!(*h.script.ceilings.lock(), [1.0]);
    assert_eq!(h.fc.queued(), 2);
    // A later interactive request still passes batch at 0.6.
    tickets.push(h.offer(1, "f", 10, "i1").unwrap());
    settle().await;
    assert_eq!(*h.script.log.lock(), ["i0", "i1"]);
    *h.script.load.lock() = Some(0.4);
    h.open(10).await;
    assert_eq!(*h.script.log.lock(), ["i0", "i1", "b0", "b1"]);
    assert_eq!(*h.script.ceilings.lock(), [1.0, 1.0, 0.5, 0.5]);
    for (t, want) in tickets.into_iter().zip(["b0", "b1", "i0", "i1"]) {
        assert_eq!(t.await.unwrap(), format!("{want}@first"));
    }
}

/// The reference's static policy at the same load: every band leaves at 0.6.
#[tokio::test(start_paused = true)]
async fn static_policy_lets_every_band_out_below_one() {
    let h = Harness::start(FlowControlConfig::default());
    settle().await;
    let mut tickets = Vec::new();
    for (p, v) in [(-1, "b0"), (-1, "b1"), (1, "i0")] {
        tickets.push(h.offer(p, "f", 10, v).unwrap());
    }
    settle().await;
    *h.script.load.lock() = Some(0.6);
    h.open(10).await;
    assert_eq!(*h.script.log.lock(), ["i0", "b0", "b1"]);
    assert_eq!(*h.script.ceilings.lock(), [1.0, 1.0, 1.0]);
    drop(tickets);
}

/// A configured band is active without traffic: batch alone is held at its ceiling when an
/// interactive band is declared, and gets the max ceiling when it is the only priority seen.
#[tokio::test(start_paused = true)]
async fn configured_bands_count_as_active_priorities() {
    use super::usage::{HoldbackDomain, HoldbackParams, UsageLimit};
    let holdback = UsageLimit::PriorityHoldback(HoldbackParams {
        domain: HoldbackDomain::Rank,
        min_ceiling: 0.25,
        max_ceiling: 0.9,
    });
    let alone = Harness::start(FlowControlConfig {
        usage_limit: holdback,
        ..FlowControlConfig::default()
    });
    let mut declared = FlowControlConfig {
        usage_limit: holdback,
        ..FlowControlConfig::default()
    };
    declared.bands.insert(5, BandConfig::default());
    let declared = Harness::start(declared);
    settle().await;
    let a = alone.offer(-1, "f", 10, "b").unwrap();
    let d = declared.offer(-1, "f", 10, "b").unwrap();
    settle().await;
    for h in [&alone, &declared] {
        *h.script.load.lock() = Some(0.5);
        h.open(1).await;
    }
    // Alone: ceiling 0.9 > 0.5, dispatched. Declared band 5 above it: ceiling 0.25, held.
    assert_eq!(*alone.script.ceilings.lock(), [0.9]);
    assert!(declared.script.log.lock().is_empty());
    assert_eq!(declared.fc.queued(), 1);
    *declared.script.load.lock() = Some(0.2);
    declared.open(1).await;
    assert_eq!(*declared.script.ceilings.lock(), [0.25]);
    assert_eq!(a.await.unwrap(), "b@first");
    assert_eq!(d.await.unwrap(), "b@first");
}
