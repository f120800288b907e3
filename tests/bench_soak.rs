//! `switchyard bench soak --preset ci`: the stack (3 sim replicas, the EPP with fallbacks,
//! Envoy) for 30 s at 20 requests/s with a replica restarted every 5 s and 10 % bad requests.
//! It must pass its own bounds (RSS, open FDs and the EPP's /metrics flat after the warm-up,
//! ≥ 99 % of good requests served), and every bad request must get its 4xx; a bound it cannot
//! meet must make it exit non-zero.

mod support;

use std::process::Command;

use serde_json::Value;
use support::tools;

fn soak(args: &[&str], out: &std::path::Path) -> (bool, String, Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["bench", "soak", "--replicas", "3", "--out"])
        .arg(out)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report = std::fs::read(out)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    (output.status.success(), text, report)
}

/// Statuses the bad requests of `kind` got, as `{status: count}`.
fn statuses(report: &Value, kind: &str) -> Vec<(String, u64)> {
    report["requests"]["bad"][kind]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn ci_soak_passes_with_churn_and_bad_requests() {
    let _envoy = require_tool!(tools::envoy(), "envoy");
    let dir = tempfile::tempdir().unwrap();
    let (ok, text, report) = soak(&["--preset", "ci"], &dir.path().join("soak.json"));
    assert!(ok, "the soak failed:\n{text}");
    assert_eq!(report["failures"], serde_json::json!([]), "{text}");

    // Restarts at 5, 10, ... 25 s: drain, crash, drain, crash, drain.
    assert_eq!(
        (
            report["restarts_drained"].as_u64(),
            report["restarts_crashed"].as_u64()
        ),
        (Some(3), Some(2)),
        "{text}"
    );
    // The EPP and the two replicas never restarted are judged, on ≥ 25 samples each after the
    // 15 s warm-up (one every 0.5 s).
    let judged: Vec<(&str, u64)> = report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["judged"] == true)
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["rss_mib"]["samples"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        judged.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        ["epp", "replica1", "replica2"],
        "{text}"
    );
    assert!(judged.iter().all(|(_, n)| *n >= 25), "{judged:?}\n{text}");

    // Each kind of bad request got its own 4xx, every time.
    let sent = |kind: &str| statuses(&report, kind).iter().map(|(_, n)| n).sum::<u64>();
    for (kind, status) in [
        ("invalid-json", "400"),
        ("missing-model", "400"),
        ("oversize", "413"),
        ("huge-model", "404"),
    ] {
        let got = statuses(&report, kind);
        assert!(sent(kind) > 0, "no {kind} request was sent:\n{text}");
        assert_eq!(got, [(status.to_owned(), sent(kind))], "{kind}:\n{text}");
    }
    let good = &report["requests"];
    assert!(good["good_sent"].as_u64().unwrap() > 300, "{text}");
}

#[test]
fn soak_exits_non_zero_when_a_bound_is_exceeded() {
    let _envoy = require_tool!(tools::envoy(), "envoy");
    let dir = tempfile::tempdir().unwrap();
    // FD growth must be below -1000: every judged process fails that bound.
    let (ok, text, report) = soak(
        &[
            "--duration",
            "4s",
            "--warmup",
            "1s",
            "--sample-every",
            "100ms",
            "--restart-every",
            "2s",
            "--max-fd-growth=-1000",
        ],
        &dir.path().join("soak.json"),
    );
    assert!(!ok, "the soak passed an impossible bound:\n{text}");
    let failures: Vec<&str> = report["failures"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(failures.len(), 3, "{failures:#?}");
    for (f, name) in failures.iter().zip(["epp", "replica1", "replica2"]) {
        assert!(
            f.starts_with(&format!("{name}: open FDs grew by ")) && f.ends_with("bound -1000)"),
            "{f}"
        );
    }
    assert!(
        text.contains("soak failed: epp: open FDs grew by"),
        "{text}"
    );
}
