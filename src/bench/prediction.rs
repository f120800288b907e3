//! Prefix-hit prediction accuracy of a routing run, read from the EPP's
//! `switchyard_prefix_prediction_*` metrics (`docs/precise-prefix.md`) after the load: per index
//! kind, mean absolute error in tokens, the share predicted exactly, over- and under-prediction
//! rates, and the mean bias.

use std::fmt::Write as _;

use serde::Serialize;

use super::routing::PolicyResult;
use crate::promtext;

const OUTCOMES: &str = "switchyard_prefix_prediction_outcomes_total";
const ERROR_SUM: &str = "switchyard_prefix_prediction_error_tokens_sum";
const PREDICTED: &str = "switchyard_prefix_prediction_predicted_tokens_total";
const REPORTED: &str = "switchyard_prefix_prediction_reported_tokens_total";

/// One index kind's accuracy over a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IndexAccuracy {
    /// `approximate` or `precise`.
    pub index: String,
    /// Requests whose usage was compared with this index's prediction.
    pub requests: f64,
    /// Mean |predicted − reported| cached tokens.
    pub mae_tokens: f64,
    /// Shares of `requests` predicted exactly, over, under (they sum to 1).
    pub exact: f64,
    pub over: f64,
    pub under: f64,
    /// Mean (predicted − reported) tokens.
    pub bias_tokens: f64,
    /// Mean reported cached tokens, for scale.
    pub mean_reported_tokens: f64,
}

/// The accuracy of each index with at least one compared request, from an EPP metrics page
/// (counters since the EPP started; the bench starts one EPP per policy). `approximate` first.
pub fn parse(text: &str) -> Result<Vec<IndexAccuracy>, String> {
    // Counters by their sample names; `promtext` reads counters and gauges only, so the
    // histogram's `_sum` (one label, as this project's EPP writes it) is read from its line.
    let wanted = [OUTCOMES, PREDICTED, REPORTED];
    let fams =
        promtext::parse(text, &wanted, &promtext::Limits::default()).map_err(|e| e.to_string())?;
    let counter = |family: &str, selector: &[(&str, &str)]| -> f64 {
        fams.get(family).map_or(0.0, |f| {
            f.samples
                .iter()
                .filter(|s| s.matches(selector))
                .map(|s| s.value)
                .sum()
        })
    };
    let mut out = Vec::new();
    for index in ["approximate", "precise"] {
        let outcome = |o| counter(OUTCOMES, &[("index", index), ("outcome", o)]);
        let (exact, over, under) = (outcome("exact"), outcome("over"), outcome("under"));
        let n = exact + over + under;
        if n <= 0.0 {
            continue;
        }
        let error_sum = error_sum(text, index)?;
        let predicted = counter(PREDICTED, &[("index", index)]);
        let reported = counter(REPORTED, &[("index", index)]);
        out.push(IndexAccuracy {
            index: index.to_owned(),
            requests: n,
            mae_tokens: error_sum / n,
            exact: exact / n,
            over: over / n,
            under: under / n,
            bias_tokens: (predicted - reported) / n,
            mean_reported_tokens: reported / n,
        });
    }
    Ok(out)
}

/// The error histogram's `_sum` for `index`.
fn error_sum(text: &str, index: &str) -> Result<f64, String> {
    let prefix = format!("{ERROR_SUM}{{index=\"{index}\"}} ");
    let Some(v) = text.lines().find_map(|l| l.strip_prefix(&prefix)) else {
        return Err(format!("no {prefix}line on the EPP's metrics page"));
    };
    v.trim().parse().map_err(|e| format!("{prefix}{v}: {e}"))
}

/// The accuracy from the EPP at `metrics` (its metrics address; `None` for Envoy-only
/// policies). A page that cannot be read or parsed is logged and gives no figures: the run's
/// other results stand.
pub async fn from_epp(metrics: Option<std::net::SocketAddr>) -> Vec<IndexAccuracy> {
    let Some(addr) = metrics else {
        return Vec::new();
    };
    let url = format!("http://{addr}/metrics");
    let text = match super::client::get_text(&super::client::http_client(), &url).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(%url, error = %e, "EPP metrics unreadable: no prediction accuracy");
            return Vec::new();
        }
    };
    parse(&text).unwrap_or_else(|e| {
        tracing::warn!(%url, error = %e, "EPP metrics unparsable: no prediction accuracy");
        Vec::new()
    })
}

/// The per-policy accuracy table in markdown; empty when no policy has any.
pub fn markdown_table(results: &[PolicyResult]) -> String {
    if results.iter().all(|r| r.prediction.is_empty()) {
        return String::new();
    }
    let mut s = String::from(
        "\nPrefix-hit prediction at the chosen replica (EPP's `switchyard_prefix_prediction_*`: \
         predicted vs the replica's reported `cached_tokens`, per index the EPP kept):\n\n\
         | policy | index | requests | mean abs. error | exact | over-predicted | under-predicted | mean bias | mean reported |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        for a in &r.prediction {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.1} tokens | {:.1}% | {:.1}% | {:.1}% | {:+.1} tokens | {:.1} tokens |",
                r.name,
                a.index,
                a.requests,
                a.mae_tokens,
                100.0 * a.exact,
                100.0 * a.over,
                100.0 * a.under,
                a.bias_tokens,
                a.mean_reported_tokens,
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_per_index_from_the_metrics_page() {
        let text = r#"# HELP switchyard_prefix_prediction_error_tokens x
# TYPE switchyard_prefix_prediction_error_tokens histogram
switchyard_prefix_prediction_error_tokens_sum{index="approximate"} 112.0
switchyard_prefix_prediction_error_tokens_count{index="approximate"} 4
switchyard_prefix_prediction_error_tokens_bucket{le="0.0",index="approximate"} 2
switchyard_prefix_prediction_error_tokens_bucket{le="+Inf",index="approximate"} 4
switchyard_prefix_prediction_error_tokens_sum{index="precise"} 0.0
switchyard_prefix_prediction_error_tokens_count{index="precise"} 0
switchyard_prefix_prediction_error_tokens_bucket{le="+Inf",index="precise"} 0
# HELP switchyard_prefix_prediction_outcomes x
# TYPE switchyard_prefix_prediction_outcomes counter
switchyard_prefix_prediction_outcomes_total{index="approximate",outcome="exact"} 2
switchyard_prefix_prediction_outcomes_total{index="approximate",outcome="over"} 1
switchyard_prefix_prediction_outcomes_total{index="approximate",outcome="under"} 1
switchyard_prefix_prediction_outcomes_total{index="precise",outcome="exact"} 0
switchyard_prefix_prediction_outcomes_total{index="precise",outcome="over"} 0
switchyard_prefix_prediction_outcomes_total{index="precise",outcome="under"} 0
# HELP switchyard_prefix_prediction_predicted_tokens x
# TYPE switchyard_prefix_prediction_predicted_tokens counter
switchyard_prefix_prediction_predicted_tokens_total{index="approximate"} 320
switchyard_prefix_prediction_predicted_tokens_total{index="precise"} 0
# HELP switchyard_prefix_prediction_reported_tokens x
# TYPE switchyard_prefix_prediction_reported_tokens counter
switchyard_prefix_prediction_reported_tokens_total{index="approximate"} 256
switchyard_prefix_prediction_reported_tokens_total{index="precise"} 0
"#;
        let got = parse(text).unwrap();
        assert_eq!(
            got,
            vec![IndexAccuracy {
                index: "approximate".into(),
                requests: 4.0,
                mae_tokens: 28.0,
                exact: 0.5,
                over: 0.25,
                under: 0.25,
                bias_tokens: 16.0,
                mean_reported_tokens: 64.0,
            }]
        );
        assert_eq!(parse("").unwrap(), Vec::new());
    }
}
