//! Leader election on a coordination.k8s.io Lease against the fake API server
//! (tests/fake_apiserver; no real API server can be installed on these machines): acquiring and
//! renewing, losing the lease to another holder and to failing renewals within the lease
//! duration, taking over an expired lease, and handing over on shutdown (the stored holder
//! emptied, the other replica leading within three retry periods).

mod fake_apiserver;

use std::time::{Duration, Instant};

use fake_apiserver::objects::*;
use fake_apiserver::FakeApiServer;
use switchyard::epp::leader::{spawn_leader_election, LeaseConfig};
use tokio::sync::watch;

const LEASE_NAME: &str = "epp-default-pool.gateway-api-inference-extension.sigs.k8s.io";
const LEASE_DURATION: Duration = Duration::from_millis(1000);
const RENEW_DEADLINE: Duration = Duration::from_millis(600);
const RETRY: Duration = Duration::from_millis(100);

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        retry_period: RETRY,
        renew_deadline: RENEW_DEADLINE,
        lease_duration: LEASE_DURATION,
        ..LeaseConfig::for_pool(NS, "pool", identity.to_string())
    }
}

/// Waits until the receiver shows `want`; returns how long that took.
async fn wait_for(rx: &mut watch::Receiver<bool>, want: bool, within: Duration) -> Duration {
    let start = Instant::now();
    tokio::time::timeout(within, rx.wait_for(|v| *v == want))
        .await
        .unwrap_or_else(|_| panic!("leader state did not become {want} within {within:?}"))
        .unwrap();
    start.elapsed()
}

fn holder(fake: &FakeApiServer) -> String {
    let lease = fake.get(LEASE, NS, LEASE_NAME).expect("lease exists");
    lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn acquires_renews_and_loses_to_another_holder() {
    let fake = FakeApiServer::start().await;
    let (_shutdown, shutdown_rx) = watch::channel(false);
    let mut leader = spawn_leader_election(fake.client(), config("epp-a"), shutdown_rx);
    wait_for(&mut leader, true, Duration::from_secs(5)).await;
    assert_eq!(holder(&fake), "epp-a");
    let stored = fake.get(LEASE, NS, LEASE_NAME).unwrap();
    assert_eq!(stored["spec"]["leaseDurationSeconds"], 1);
    assert_eq!(stored["spec"]["leaseTransitions"], 0);

    // Renewals keep moving renewTime.
    let first_renew = stored["spec"]["renewTime"].clone();
    tokio::time::sleep(RETRY * 3).await;
    assert_ne!(
        fake.get(LEASE, NS, LEASE_NAME).unwrap()["spec"]["renewTime"],
        first_renew
    );
    assert!(*leader.borrow());

    // Another replica takes the lease: we step down within the lease duration.
    fake.apply(lease(LEASE_NAME, "epp-b", 1));
    let took = wait_for(&mut leader, false, LEASE_DURATION).await;
    assert!(took < LEASE_DURATION, "stepped down after {took:?}");
    // We do not fight for a lease someone renewed recently...
    tokio::time::sleep(RETRY * 3).await;
    assert_eq!(holder(&fake), "epp-b");
    assert!(!*leader.borrow());
    // ...but once epp-b stops renewing for a lease duration, we take over.
    wait_for(&mut leader, true, LEASE_DURATION * 3).await;
    assert_eq!(holder(&fake), "epp-a");
    assert_eq!(
        fake.get(LEASE, NS, LEASE_NAME).unwrap()["spec"]["leaseTransitions"],
        2
    );
}

#[tokio::test]
async fn failing_renewals_stop_leading_before_the_lease_expires() {
    let fake = FakeApiServer::start().await;
    let (_shutdown, shutdown_rx) = watch::channel(false);
    let mut leader = spawn_leader_election(fake.client(), config("epp-a"), shutdown_rx);
    wait_for(&mut leader, true, Duration::from_secs(5)).await;

    fake.set_failing(LEASE, true);
    let took = wait_for(&mut leader, false, LEASE_DURATION).await;
    assert!(took < LEASE_DURATION, "stepped down after {took:?}");
    assert!(
        took >= RENEW_DEADLINE - RETRY * 2,
        "stepped down too early ({took:?})"
    );

    // The API server comes back: the lease is still ours, so we lead again at once.
    fake.set_failing(LEASE, false);
    wait_for(&mut leader, true, Duration::from_secs(2)).await;
    assert_eq!(holder(&fake), "epp-a");
}

#[tokio::test]
async fn one_leader_of_two_and_handover_on_shutdown() {
    let fake = FakeApiServer::start().await;
    let (stop_a, rx_a) = watch::channel(false);
    let (_stop_b, rx_b) = watch::channel(false);
    let mut a = spawn_leader_election(fake.client(), config("epp-a"), rx_a);
    wait_for(&mut a, true, Duration::from_secs(5)).await;
    let mut b = spawn_leader_election(fake.client(), config("epp-b"), rx_b);
    tokio::time::sleep(LEASE_DURATION + RETRY * 3).await;
    assert!(*a.borrow());
    assert!(
        !*b.borrow(),
        "only one leader while the holder keeps renewing"
    );

    // Shutting down releases the lease, so the other replica leads at its next attempt (one
    // retry period, plus one for the release itself and one of slack for a loaded machine)
    // instead of waiting out the lease duration, which is what it would do without a release.
    stop_a.send_replace(true);
    wait_for(&mut a, false, Duration::from_secs(1)).await;
    // Wait longer than the lease so a missing release shows as a slow handover, not a timeout.
    let took = wait_for(&mut b, true, LEASE_DURATION * 2).await;
    assert!(
        took < RETRY * 3,
        "handover took {took:?}, not within 3 retry periods ({:?}): was the lease released?",
        RETRY * 3
    );
    assert_eq!(holder(&fake), "epp-b");
}

#[tokio::test]
async fn shutdown_empties_the_stored_holder() {
    let fake = FakeApiServer::start().await;
    let (stop, rx) = watch::channel(false);
    let mut leader = spawn_leader_election(fake.client(), config("epp-a"), rx);
    wait_for(&mut leader, true, Duration::from_secs(5)).await;
    assert_eq!(holder(&fake), "epp-a");

    stop.send_replace(true);
    // The elector drops its sender when its task ends, after the release.
    tokio::time::timeout(Duration::from_secs(2), async {
        while leader.changed().await.is_ok() {}
    })
    .await
    .expect("the elector did not stop within 2 s");
    assert_eq!(
        holder(&fake),
        "",
        "the lease still names a holder after shutdown"
    );
    let stored = fake.get(LEASE, NS, LEASE_NAME).unwrap();
    assert_eq!(stored["spec"]["leaseDurationSeconds"], 1);
}
