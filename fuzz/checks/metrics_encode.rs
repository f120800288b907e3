//! Invariant that would have caught issue 11 item 2: whatever label values the EPP's metric
//! families hold, the registry encodes to text that re-parses (`promtext`) with exactly those
//! label values, and every sample line belongs to a declared family (no forged series).
//!
//! Input: label values separated by NUL bytes (lossy UTF-8), at most 12.

use std::collections::BTreeSet;

use prometheus_client::registry::Registry;
use switchyard::epp::metrics::{EppMetrics, ModelNameLabel, ModelPriorityLabels};
use switchyard::promtext;

const REQUESTS: &str = "inference_objective_request_total";
const ERRORS: &str = "inference_objective_request_error_total";
const RUNNING: &str = "inference_objective_running_requests";

/// Label triples as recorded: (model, target, third label).
type Triples = BTreeSet<(String, String, String)>;

/// Records the values, encodes, re-parses, and checks the invariant (panics when it breaks).
pub fn run(data: &[u8]) {
    page(data);
}

/// [`run`], returning the checked page (the corpus replay also hands it to promtool).
pub fn page(data: &[u8]) -> String {
    let values: Vec<String> = data
        .split(|b| *b == 0)
        .take(12)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    let mut registry = Registry::default();
    let metrics = EppMetrics::new(&mut registry);
    let mut requests = Triples::new();
    let mut errors = Triples::new();
    let mut running = BTreeSet::new();
    for w in values.windows(3).chain(std::iter::once(&values[..])) {
        let [a, b, c] = match w {
            [a, b, c, ..] => [a, b, c],
            [a, b] => [a, b, b],
            [a] => [a, a, a],
            [] => continue,
        };
        metrics
            .requests
            .get_or_create(&ModelPriorityLabels {
                model_name: a.clone(),
                target_model_name: b.clone(),
                priority: c.clone(),
            })
            .inc();
        requests.insert((a.clone(), b.clone(), c.clone()));
        metrics.record_error(b, c, a);
        errors.insert((b.clone(), c.clone(), a.clone()));
        metrics
            .running_requests
            .get_or_create(&ModelNameLabel {
                model_name: c.clone(),
            })
            .set(1);
        running.insert(c.clone());
    }
    let text = switchyard::epp::metrics::encode(&registry);
    check_lines_belong_to_families(&text);
    let limits = promtext::Limits {
        max_bytes: usize::MAX,
        max_samples_per_family: usize::MAX,
    };
    let families = promtext::parse(&text, &[REQUESTS, ERRORS, RUNNING], &limits)
        .unwrap_or_else(|e| panic!("encoded page does not re-parse: {e}\n{text}"));
    let triples = |name: &str, third: &str| -> Triples {
        families
            .get(name)
            .map(|f| {
                f.samples
                    .iter()
                    .map(|s| {
                        (
                            s.label("model_name").unwrap().to_string(),
                            s.label("target_model_name").unwrap().to_string(),
                            s.label(third).unwrap().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(triples(REQUESTS, "priority"), requests, "{text}");
    assert_eq!(triples(ERRORS, "error_code"), errors, "{text}");
    let got_running: BTreeSet<String> = families
        .get(RUNNING)
        .map(|f| {
            f.samples
                .iter()
                .map(|s| s.label("model_name").unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(got_running, running, "{text}");
    text
}

/// Every sample line names a family declared by a `# TYPE` line (or its histogram series).
fn check_lines_belong_to_families(text: &str) {
    let mut declared = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap_or_default();
            declared.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| declared.contains(*b)))
            .unwrap_or(name);
        assert!(
            declared.contains(base),
            "sample line of an undeclared family {name:?}: {line:?}\n{text}"
        );
    }
}
