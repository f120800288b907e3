//! Benchmark reports: the results table (markdown, printed and written), a JSON record with the
//! machine and command, and an SVG plot of TTFT distributions (hand-written SVG: one small
//! function instead of a plotting crate and its build time).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::routing::{Policy, PolicyResult};
use super::stats::Quantiles;

/// Where and on what a run happened.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub date_utc: String,
    /// The commit checked out (never suffixed: `dirty` says whether the tree matched it).
    pub git_commit: String,
    /// Tracked files outside `benches/results/` differed from `git_commit` (a results file
    /// written so carries `--allow-dirty`'s note).
    pub dirty: bool,
    pub command: String,
}

/// A results file would not say which code produced it.
#[derive(Debug, thiserror::Error)]
#[error("refusing to write benchmark results from a tree with uncommitted changes (commit {commit}): a results file must come from a commit; commit first, or pass --allow-dirty to write them marked as such")]
pub struct DirtyTree {
    pub commit: String,
}

impl Machine {
    /// [`Machine::detect`] for a run whose results will be written: a dirty tree is refused
    /// unless `allow_dirty`. Call it before the run, so a refusal costs nothing.
    pub fn for_results(allow_dirty: bool) -> Result<Self, DirtyTree> {
        Self::detect().clean_or(allow_dirty)
    }

    fn clean_or(self, allow_dirty: bool) -> Result<Self, DirtyTree> {
        if self.dirty && !allow_dirty {
            return Err(DirtyTree {
                commit: self.git_commit,
            });
        }
        Ok(self)
    }

    /// The commit as a results file states it.
    pub fn commit_note(&self) -> String {
        if self.dirty {
            format!(
                "{} with uncommitted changes (written with --allow-dirty: not reproducible from the commit)",
                self.git_commit
            )
        } else {
            self.git_commit.clone()
        }
    }

    pub fn detect() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let date_utc = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .args(args)
                .current_dir(super::envoy::repo_root())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        let git_commit =
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
        // Results the benches wrote earlier are not code: they do not make the tree dirty.
        let dirty = git(&[
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":(exclude)benches/results",
        ])
        .is_none_or(|s| !s.is_empty());
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        Self {
            cpu,
            cores,
            date_utc,
            git_commit,
            dirty,
            command,
        }
    }
}

/// The run's parameters as recorded next to its results.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub workload: serde_json::Value,
    pub rate: serde_json::Value,
    pub requests: usize,
    pub replicas: usize,
    pub sim_profile: String,
    pub time_scale: f64,
    pub seed: u64,
    /// Extra `switchyard serve` flags every replica ran with.
    pub replica_args: Vec<String>,
}

/// The results table in markdown.
pub fn markdown_table(results: &[PolicyResult]) -> String {
    let mut s = String::new();
    s.push_str("| policy | ok / sent | TTFT p50 | TTFT p90 | TTFT p95 | TTFT p99 | ITL p50 | e2e p50 | e2e p99 | output tok/s | prefix hit rate | load share per replica | errors |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in results {
        let share: Vec<String> = r
            .replica_share
            .iter()
            .map(|x| format!("{:.0}", 100.0 * x))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {}/{} | {} | {} | {} | {} | {:.1} ms | {} | {} | {:.0} | {:.1}% | {}% | {} |",
            r.name,
            r.ok,
            r.requests,
            fmt_ms(r.ttft_ms.p50),
            fmt_ms(r.ttft_ms.p90),
            fmt_ms(r.ttft_ms.p95),
            fmt_ms(r.ttft_ms.p99),
            r.itl_p50_ms,
            fmt_ms(r.e2e_ms.p50),
            fmt_ms(r.e2e_ms.p99),
            r.output_tokens_per_s,
            100.0 * r.prefix_hit_rate,
            share.join("/"),
            r.errors
        );
    }
    if results.iter().any(|r| !r.classes.is_empty()) {
        s.push_str("\nPer objective (`x-gateway-inference-objective`):\n\n");
        s.push_str("| policy | objective | ok / sent | 429 | other errors | TTFT p50 | TTFT p90 | TTFT p95 | TTFT p99 | e2e p99 |\n");
        s.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
        for r in results {
            for c in &r.classes {
                let _ = writeln!(
                    s,
                    "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} |",
                    r.name,
                    c.objective,
                    c.ok,
                    c.requests,
                    c.rejected_429,
                    c.requests - c.ok - c.rejected_429,
                    fmt_ms(c.ttft_ms.p50),
                    fmt_ms(c.ttft_ms.p90),
                    fmt_ms(c.ttft_ms.p95),
                    fmt_ms(c.ttft_ms.p99),
                    fmt_ms(c.e2e_ms.p99),
                );
            }
        }
    }
    if let Some(base) = results.iter().find(|r| r.policy == Policy::RoundRobin) {
        s.push('\n');
        for r in results.iter().filter(|r| r.policy != Policy::RoundRobin) {
            let _ = writeln!(
                s,
                "- {} vs envoy round-robin: TTFT p50 {}, p90 {}, p99 {}; prefix hit rate {}",
                r.name,
                change(base.ttft_ms.p50, r.ttft_ms.p50),
                change(base.ttft_ms.p90, r.ttft_ms.p90),
                change(base.ttft_ms.p99, r.ttft_ms.p99),
                // A workload with no shared prefixes has no hit rate to compare.
                if base.prefix_hit_rate > 0.0 {
                    format!("×{:.2}", r.prefix_hit_rate / base.prefix_hit_rate)
                } else {
                    format!("{:.1}% (round-robin 0%)", 100.0 * r.prefix_hit_rate)
                }
            );
        }
    }
    s.push_str(&ratio_to_best_envoy(results));
    s
}

/// The better (lower) of round-robin and least-request at each percentile, when both ran.
fn best_envoy(results: &[PolicyResult]) -> Option<(Quantiles, Quantiles)> {
    let get = |p: Policy| results.iter().find(|r| r.policy == p);
    let (rr, lr) = (get(Policy::RoundRobin)?, get(Policy::LeastRequest)?);
    let best = |a: &Quantiles, b: &Quantiles| Quantiles {
        p50: a.p50.min(b.p50),
        p90: a.p90.min(b.p90),
        p95: a.p95.min(b.p95),
        p99: a.p99.min(b.p99),
    };
    Some((best(&rr.ttft_ms, &lr.ttft_ms), best(&rr.e2e_ms, &lr.e2e_ms)))
}

/// Each EPP policy's TTFT and e2e percentiles as a ratio to the better of round-robin and
/// least-request at that percentile (≤ 1.00 means the EPP is never the wrong choice there).
pub fn ratio_to_best_envoy(results: &[PolicyResult]) -> String {
    let Some((ttft, e2e)) = best_envoy(results) else {
        return String::new();
    };
    let ratio = |new: f64, base: f64| {
        if base > 0.0 {
            format!("{:.2}", new / base)
        } else {
            "n/a".to_owned()
        }
    };
    let mut s = String::from(
        "\nRatio to the better of envoy round-robin / least-request at each percentile:\n\n\
         | policy | TTFT p50 | TTFT p90 | TTFT p95 | TTFT p99 | e2e p50 | e2e p99 |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in results
        .iter()
        .filter(|r| r.policy != Policy::RoundRobin && r.policy != Policy::LeastRequest)
    {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            ratio(r.ttft_ms.p50, ttft.p50),
            ratio(r.ttft_ms.p90, ttft.p90),
            ratio(r.ttft_ms.p95, ttft.p95),
            ratio(r.ttft_ms.p99, ttft.p99),
            ratio(r.e2e_ms.p50, e2e.p50),
            ratio(r.e2e_ms.p99, e2e.p99),
        );
    }
    s
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.0} ms")
    }
}

/// `-42%` style relative change from `base` to `new`.
pub fn change(base: f64, new: f64) -> String {
    if base <= 0.0 {
        return "n/a".to_owned();
    }
    format!("{:+.0}%", 100.0 * (new - base) / base)
}

/// An SVG of the empirical CDF of TTFT per policy (x: simulated ms, y: fraction of requests).
pub fn ttft_cdf_svg(results: &[PolicyResult], title: &str) -> String {
    const W: f64 = 760.0;
    const H: f64 = 440.0;
    const L: f64 = 70.0;
    const R: f64 = 220.0;
    const T: f64 = 40.0;
    const B: f64 = 50.0;
    const COLORS: [&str; 6] = [
        "#d62728", "#ff7f0e", "#7f7f7f", "#1f77b4", "#2ca02c", "#9467bd",
    ];
    let max_x = results
        .iter()
        .flat_map(|r| r.ttft_samples_ms.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.02;
    let (pw, ph) = (W - L - R, H - T - B);
    let x = |v: f64| L + pw * (v / max_x);
    let y = |f: f64| T + ph * (1.0 - f);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        L + pw / 2.0,
        xml_escape(title)
    );
    // Axes, grid and ticks.
    for i in 0..=5 {
        let f = f64::from(i) / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{L}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{:.0}%</text>"##,
            L + pw,
            L - 6.0,
            y(f) + 4.0,
            100.0 * f,
            y = y(f)
        );
        let v = max_x * f;
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{T}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            T + ph,
            T + ph + 16.0,
            fmt_ms(v),
            x = x(v)
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">time to first token (simulated)</text>"#,
        L + pw / 2.0,
        H - 10.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">fraction of requests</text>"#,
        T + ph / 2.0
    );
    for (i, r) in results.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut v = r.ttft_samples_ms.clone();
        super::stats::sort(&mut v);
        let n = v.len();
        if n > 0 {
            let mut pts = format!("{:.1},{:.1}", x(0.0), y(0.0));
            for (k, t) in v.iter().enumerate() {
                let _ = write!(
                    pts,
                    " {:.1},{:.1} {:.1},{:.1}",
                    x(*t),
                    y(k as f64 / n as f64),
                    x(*t),
                    y((k + 1) as f64 / n as f64)
                );
            }
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>"#
            );
        }
        let ly = T + 14.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{} (p50 {})</text>"#,
            W - R + 12.0,
            W - R + 36.0,
            W - R + 42.0,
            ly + 4.0,
            xml_escape(r.name),
            fmt_ms(r.ttft_ms.p50)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Paths written by [`write`].
#[derive(Debug, Clone)]
pub struct Written {
    pub markdown: PathBuf,
    pub json: PathBuf,
    pub svg: PathBuf,
}

/// Writes `<dir>/<name>.md`, `.json` and `-ttft.svg`.
pub fn write(
    dir: &Path,
    name: &str,
    machine: &Machine,
    info: &RunInfo,
    results: &[PolicyResult],
) -> std::io::Result<Written> {
    std::fs::create_dir_all(dir)?;
    let markdown = dir.join(format!("{name}.md"));
    let json = dir.join(format!("{name}.json"));
    let svg = dir.join(format!("{name}-ttft.svg"));
    let mut md = format!(
        "# Routing comparison: {name}\n\n- machine: {} ({} cores), {}\n- commit: {}\n- command: `{}`\n- workload: `{}`\n- rate: `{}`, {} requests, {} replicas of sim profile `{}` (flags `{}`) at time scale {} (latencies in simulated time)\n\n",
        machine.cpu,
        machine.cores,
        machine.date_utc,
        machine.commit_note(),
        machine.command,
        info.workload,
        info.rate,
        info.requests,
        info.replicas,
        info.sim_profile,
        info.replica_args.join(" "),
        info.time_scale
    );
    md.push_str(&markdown_table(results));
    md.push_str(&super::prediction::markdown_table(results));
    let _ = writeln!(md, "\n![TTFT CDF]({name}-ttft.svg)");
    std::fs::write(&markdown, md)?;
    let record = serde_json::json!({
        "machine": machine,
        "run": info,
        "results": results,
    });
    std::fs::write(
        &json,
        serde_json::to_string_pretty(&record).map_err(std::io::Error::other)?,
    )?;
    std::fs::write(
        &svg,
        ttft_cdf_svg(results, &format!("TTFT distribution: {name}")),
    )?;
    Ok(Written {
        markdown,
        json,
        svg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::Quantiles;

    #[test]
    fn dirty_trees_are_refused_unless_allowed_and_then_stated() {
        let detected = Machine::detect();
        assert!(
            !detected.git_commit.contains("dirty"),
            "{}",
            detected.git_commit
        );
        let machine = |dirty| Machine {
            cpu: "cpu".into(),
            cores: 2,
            date_utc: "2026-01-01T00:00:00Z".into(),
            git_commit: "0123456789ab".into(),
            dirty,
            command: "switchyard bench overhead".into(),
        };
        assert_eq!(
            machine(false).clean_or(false).unwrap().commit_note(),
            "0123456789ab"
        );
        assert_eq!(
            machine(true).clean_or(false).unwrap_err().to_string(),
            "refusing to write benchmark results from a tree with uncommitted changes (commit 0123456789ab): a results file must come from a commit; commit first, or pass --allow-dirty to write them marked as such"
        );
        let allowed = machine(true).clean_or(true).unwrap();
        assert_eq!(
            allowed.commit_note(),
            "0123456789ab with uncommitted changes (written with --allow-dirty: not reproducible from the commit)"
        );
        let json = serde_json::to_value(&allowed).unwrap();
        assert_eq!(
            (json["git_commit"].as_str(), json["dirty"].as_bool()),
            (Some("0123456789ab"), Some(true))
        );
    }

    fn result(policy: Policy, p50: f64, hit: f64) -> PolicyResult {
        PolicyResult {
            policy,
            name: policy.name(),
            requests: 10,
            ok: 10,
            errors: 0,
            ttft_ms: Quantiles {
                p50,
                p90: 2.0 * p50,
                p95: 2.5 * p50,
                p99: 3.0 * p50,
            },
            itl_p50_ms: 50.0,
            e2e_ms: Quantiles::default(),
            output_tokens_per_s: 100.0,
            prefix_hit_rate: hit,
            replica_share: vec![0.5, 0.5],
            wall_s: 1.0,
            error_samples: vec![],
            ttft_samples_ms: vec![p50, 2.0 * p50],
            classes: Vec::new(),
            prediction: Vec::new(),
        }
    }

    #[test]
    fn table_and_relative_changes() {
        let rs = [
            result(Policy::RoundRobin, 1000.0, 0.2),
            result(Policy::EppDefault, 400.0, 0.6),
        ];
        let md = markdown_table(&rs);
        assert!(md.contains(
            "| envoy round-robin | 10/10 | 1000 ms | 2000 ms | 2500 ms | 3000 ms | 50.0 ms |"
        ));
        assert!(md.contains("| 20.0% | 50/50% | 0 |"));
        assert!(md.contains("epp default (work-aware) vs envoy round-robin: TTFT p50 -60%, p90 -60%, p99 -60%; prefix hit rate ×3.00"));
        assert_eq!(change(0.0, 1.0), "n/a");
        // No shared prefixes: the rate is shown, not an infinite ratio.
        let rs = [
            result(Policy::RoundRobin, 1000.0, 0.0),
            result(Policy::EppDefault, 400.0, 0.0),
        ];
        assert!(markdown_table(&rs).contains("p99 -60%; prefix hit rate 0.0% (round-robin 0%)"));
    }

    #[test]
    fn ratio_is_to_the_better_envoy_policy_per_percentile() {
        let mut lr = result(Policy::LeastRequest, 800.0, 0.0);
        // Least-request better at p50, round-robin (3000 ms) better at p99.
        lr.ttft_ms.p99 = 4000.0;
        let rs = [
            result(Policy::RoundRobin, 1000.0, 0.0),
            lr,
            result(Policy::EppDefault, 400.0, 0.0),
        ];
        assert!(ratio_to_best_envoy(&rs)
            .contains("| epp default (work-aware) | 0.50 | 0.50 | 0.50 | 0.40 | n/a | n/a |"));
        assert!(!ratio_to_best_envoy(&rs).contains("| envoy"));
        // Without both envoy policies there is nothing to compare to.
        assert_eq!(ratio_to_best_envoy(&rs[1..]), "");
    }

    #[test]
    fn svg_has_one_line_per_policy() {
        let rs = [
            result(Policy::RoundRobin, 1000.0, 0.2),
            result(Policy::EppDefault, 400.0, 0.6),
        ];
        let svg = ttft_cdf_svg(&rs, "t <1>");
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t &lt;1&gt;"));
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
