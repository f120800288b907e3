//! The CI-sized routing comparison: real `switchyard serve --backend sim` replicas, the real EPP
//! binary and a real Envoy, the shared-prefix workload under round-robin, least-request and the
//! EPP's reference and default profiles. Fails when the EPP's default profile is not better than
//! Envoy round-robin on TTFT p50 and prefix-cache hit rate, or loses the tail (p90/p99) to the
//! better of round-robin and least-request.

use std::path::PathBuf;
use std::time::Duration;

use switchyard::bench::cli::{compare, Preset, SetupArgs, WorkloadArgs};
use switchyard::bench::routing::Policy;

fn setup() -> SetupArgs {
    SetupArgs {
        replicas: 4,
        sim_profile: "l4-qwen2.5-7b".into(),
        time_scale: None,
        model: "Qwen/Qwen2.5-7B-Instruct".into(),
        replica_arg: Vec::new(),
        envoy: None,
        switchyard_bin: Some(PathBuf::from(env!("CARGO_BIN_EXE_switchyard"))),
        max_in_flight: 4096,
        request_timeout: Duration::from_secs(120),
        keep_logs: false,
        epp_config_file: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ci_preset_epp_default_beats_round_robin_on_shared_prefix() {
    let workload = WorkloadArgs {
        preset: Some(Preset::Ci),
        seed: 1,
        ramp_over: Duration::from_secs(60),
        ..WorkloadArgs::default()
    };
    let policies = [
        Policy::RoundRobin,
        Policy::LeastRequest,
        Policy::EppReferenceDefault,
        Policy::EppDefault,
    ];
    let (results, info) = compare(&workload, &setup(), &policies, Preset::Ci)
        .await
        .unwrap();
    println!("{}", switchyard::bench::report::markdown_table(&results));
    assert_eq!(info.requests, 80, "16 groups × 5 prompts");
    assert_eq!(results.len(), 4);
    for r in &results {
        assert_eq!(r.errors, 0, "{}: {:?}", r.name, r.error_samples);
        assert_eq!(r.ok, 80);
        assert_eq!(r.replica_share.len(), 4);
        let total: f64 = r.replica_share.iter().sum();
        assert!(
            (total - 1.0).abs() < 1e-9,
            "{}: shares sum to {total}",
            r.name
        );
    }
    let get = |p: Policy| results.iter().find(|r| r.policy == p).unwrap();
    let rr = get(Policy::RoundRobin);
    let epp = get(Policy::EppDefault);
    // Round robin spreads each group over the replicas: exactly even load.
    for share in &rr.replica_share {
        assert!((share - 0.25).abs() < 1e-9, "round robin share {share}");
    }
    assert!(
        epp.ttft_ms.p50 < rr.ttft_ms.p50,
        "EPP default TTFT p50 {:.0} ms not below round-robin {:.0} ms",
        epp.ttft_ms.p50,
        rr.ttft_ms.p50
    );
    // The tail, as a guard against gross regressions only: with 80 requests p99 is about the
    // slowest request, so one unlucky queueing moves it by 20-30 % between runs on a shared
    // 2-core machine (seen: work-aware p90/p99 at 0.96/0.97x in one run, 1.14/1.25x in the
    // next). The reference 3:2:2 profile's tail problem (p99 1.57x here) still fails p99;
    // issue 10's bars (1.0x / 1.1x) are measured by the full `bench routing` run.
    let lr = get(Policy::LeastRequest);
    for (name, e, best, margin) in [
        (
            "p90",
            epp.ttft_ms.p90,
            rr.ttft_ms.p90.min(lr.ttft_ms.p90),
            1.3,
        ),
        (
            "p99",
            epp.ttft_ms.p99,
            rr.ttft_ms.p99.min(lr.ttft_ms.p99),
            1.5,
        ),
    ] {
        assert!(
            e <= margin * best,
            "EPP default TTFT {name} {e:.0} ms above {margin}x the better of round-robin / least-request ({best:.0} ms)"
        );
    }
    assert!(
        epp.prefix_hit_rate > rr.prefix_hit_rate,
        "EPP default hit rate {:.3} not above round-robin {:.3}",
        epp.prefix_hit_rate,
        rr.prefix_hit_rate
    );
    // With perfect affinity every prompt after a group's first hits its 2000-token system
    // prompt: 4/5 × 2000/2200 = 72.7 % of prompt tokens (less a block-boundary remainder).
    assert!(
        epp.prefix_hit_rate > 0.6,
        "EPP default hit rate {:.3}",
        epp.prefix_hit_rate
    );
}
