//! Prefix-hit prediction accuracy of a routing run, from the EPP's
//! `switchyard_prefix_prediction_*` metrics (`docs/precise-prefix.md`) scraped before and after
//! the load (so the stack's warm-up request is not counted): per index kind, mean absolute error in tokens, the share predicted exactly, over- and under-prediction
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

/// One index kind's counters on an EPP metrics page.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub exact: f64,
    pub over: f64,
    pub under: f64,
    pub error_sum: f64,
    pub predicted: f64,
    pub reported: f64,
}

impl Counts {
    /// `self - before`, per counter.
    pub fn since(&self, before: &Counts) -> Counts {
        Counts {
            exact: self.exact - before.exact,
            over: self.over - before.over,
            under: self.under - before.under,
            error_sum: self.error_sum - before.error_sum,
            predicted: self.predicted - before.predicted,
            reported: self.reported - before.reported,
        }
    }

    /// The accuracy these counts show, when they compared any request.
    pub fn accuracy(&self, index: &str) -> Option<IndexAccuracy> {
        let n = self.exact + self.over + self.under;
        (n > 0.0).then(|| IndexAccuracy {
            index: index.to_owned(),
            requests: n,
            mae_tokens: self.error_sum / n,
            exact: self.exact / n,
            over: self.over / n,
            under: self.under / n,
            bias_tokens: (self.predicted - self.reported) / n,
            mean_reported_tokens: self.reported / n,
        })
    }
}

/// The index kinds, in report order.
pub const INDEXES: [&str; 2] = ["approximate", "precise"];

/// The counters of each of [`INDEXES`] on an EPP metrics page (zero where absent).
pub fn parse(text: &str) -> Result<[Counts; 2], String> {
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
    let mut out = [Counts::default(); 2];
    for (index, c) in INDEXES.iter().zip(out.iter_mut()) {
        let outcome = |o| counter(OUTCOMES, &[("index", index), ("outcome", o)]);
        *c = Counts {
            exact: outcome("exact"),
            over: outcome("over"),
            under: outcome("under"),
            error_sum: error_sum(text, index)?,
            predicted: counter(PREDICTED, &[("index", index)]),
            reported: counter(REPORTED, &[("index", index)]),
        };
    }
    Ok(out)
}

/// The accuracy of each index that compared any request between two scrapes.
pub fn accuracy_since(after: &[Counts; 2], before: &[Counts; 2]) -> Vec<IndexAccuracy> {
    INDEXES
        .iter()
        .zip(after.iter().zip(before))
        .filter_map(|(index, (a, b))| a.since(b).accuracy(index))
        .collect()
}

/// The error histogram's `_sum` for `index` (0 when the page has none).
fn error_sum(text: &str, index: &str) -> Result<f64, String> {
    let prefix = format!("{ERROR_SUM}{{index=\"{index}\"}} ");
    match text.lines().find_map(|l| l.strip_prefix(&prefix)) {
        Some(v) => v.trim().parse().map_err(|e| format!("{prefix}{v}: {e}")),
        None => Ok(0.0),
    }
}

/// The counters of the EPP at `metrics` (its metrics address; `None` for Envoy-only policies).
/// A page that cannot be read or parsed is logged and gives `None`: the run's other results
/// stand without prediction figures.
pub async fn scrape(metrics: Option<std::net::SocketAddr>) -> Option<[Counts; 2]> {
    let url = format!("http://{}/metrics", metrics?);
    let text = match super::client::get_text(&super::client::http_client(), &url).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(%url, error = %e, "EPP metrics unreadable: no prediction accuracy");
            return None;
        }
    };
    parse(&text)
        .inspect_err(
            |e| tracing::warn!(%url, error = %e, "EPP metrics unparsable: no prediction accuracy"),
        )
        .ok()
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
            [
                Counts {
                    exact: 2.0,
                    over: 1.0,
                    under: 1.0,
                    error_sum: 112.0,
                    predicted: 320.0,
                    reported: 256.0,
                },
                Counts::default(),
            ]
        );
        // Over the run: less what the warm-up request added (one exact prediction of 0).
        let before = [
            Counts {
                exact: 1.0,
                ..Counts::default()
            },
            Counts::default(),
        ];
        assert_eq!(
            accuracy_since(&got, &before),
            vec![IndexAccuracy {
                index: "approximate".into(),
                requests: 3.0,
                mae_tokens: 112.0 / 3.0,
                exact: 1.0 / 3.0,
                over: 1.0 / 3.0,
                under: 1.0 / 3.0,
                bias_tokens: 64.0 / 3.0,
                mean_reported_tokens: 256.0 / 3.0,
            }]
        );
        assert_eq!(parse("").unwrap(), [Counts::default(); 2]);
    }
}
