//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz targets whose
//! checks live in `fuzz/checks/` (shared source with `fuzz/fuzz_targets/`), as a plain
//! `cargo test` on stable: the targets' invariants hold for every seed, each input within its
//! time budget, and the checks keep compiling against the library so the fuzz crate cannot rot.
//! `scripts/fuzz-smoke.sh` runs the real libFuzzer targets where cargo-fuzz is installed.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "../fuzz/checks/bearer_token.rs"]
mod bearer_token;
#[path = "../fuzz/checks/kube_objects.rs"]
mod kube_objects;
#[path = "../fuzz/checks/kv_events.rs"]
mod kv_events;
#[path = "../fuzz/checks/metrics_encode.rs"]
mod metrics_encode;
#[path = "../fuzz/checks/pem_loading.rs"]
mod pem_loading;
#[path = "../fuzz/checks/scraper_http.rs"]
mod scraper_http;

/// Per-input time budget in this (unoptimised) test build; the fuzz smoke uses `-timeout`.
const BUDGET: Duration = Duration::from_secs(5);

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    let files = corpus(target);
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let started = Instant::now();
        if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            panic!("{target}: {} fails: {msg}", file.display());
        }
        let took = started.elapsed();
        assert!(
            took < BUDGET,
            "{target}: {} took {took:?} (budget {BUDGET:?})",
            file.display()
        );
    }
    println!("{target}: {} seeds OK", files.len());
}

#[test]
fn metrics_encode_corpus() {
    replay("metrics_encode", metrics_encode::run);
}

/// The pages the `metrics_encode` seeds produce also pass `promtool check metrics`.
#[test]
fn metrics_encode_pages_pass_promtool() {
    let Some(promtool) = support::tools::promtool() else {
        support::tools::missing_dependency("promtool not found (run scripts/install-test-deps.sh)");
        return;
    };
    for file in corpus("metrics_encode") {
        let page = metrics_encode::page(&std::fs::read(&file).unwrap());
        let (code, report) = support::tools::promtool_check(&promtool, &page);
        assert_eq!(
            code,
            0,
            "{}: promtool rejects the page: {report}\n{page}",
            file.display()
        );
    }
}

#[test]
fn bearer_token_corpus() {
    replay("bearer_token", bearer_token::run);
}

#[test]
fn kv_events_corpus() {
    replay("kv_events", kv_events::run);
}

#[test]
fn pem_loading_corpus() {
    replay("pem_loading", pem_loading::run);
}

#[test]
fn kube_objects_corpus() {
    replay("kube_objects", kube_objects::run);
}

#[test]
fn scraper_http_corpus() {
    replay("scraper_http", scraper_http::run);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// The metrics invariant on random label values, quotes, backslashes, newlines, control and
    /// non-ASCII characters included (the fuzz target explores further).
    #[test]
    fn metrics_encode_reparses_with_identical_labels(
        values in proptest::collection::vec("(?s)[a-z\"\\\\\n\r\t{}=, #\u{0}\u{7f}\u{e9}\u{2028}\u{1F600}]{0,12}", 0..8)
    ) {
        metrics_encode::run(values.join("\0").as_bytes());
    }
}
