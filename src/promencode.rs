//! Prometheus text exposition (format 0.0.4) from a prometheus-client registry.
//!
//! prometheus-client writes OpenMetrics, where a counter family `foo` has samples `foo_total` and
//! the page ends in `# EOF`. The reference servers (Go and Python clients, text format) declare
//! `# HELP/TYPE foo_total`, and promtool's linter wants HELP on the sample name, so counter
//! descriptors are renamed and `# EOF` is dropped. Shared by the EPP and the decode server.

use prometheus_client::registry::Registry;

/// Encodes `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut om = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut om, registry);
    to_text_format(&om)
}

/// Rewrites prometheus-client's OpenMetrics text into the classic text format.
pub fn to_text_format(om: &str) -> String {
    let mut out = String::with_capacity(om.len() + 256);
    let mut pending_help: Option<&str> = None;
    for line in om.lines() {
        if line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some(help) = pending_help.replace(rest) {
                push_line(&mut out, "# HELP ", help, "");
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let counter = rest
                .strip_suffix(" counter")
                .filter(|n| !n.ends_with("_total"));
            if let Some(name) = counter {
                if let Some(help) = pending_help.take() {
                    let text = help.strip_prefix(name).unwrap_or(help);
                    out.push_str("# HELP ");
                    out.push_str(name);
                    push_line(&mut out, "_total", text, "");
                }
                push_line(&mut out, "# TYPE ", name, "_total counter");
                continue;
            }
        }
        if let Some(help) = pending_help.take() {
            push_line(&mut out, "# HELP ", help, "");
        }
        push_line(&mut out, "", line, "");
    }
    if let Some(help) = pending_help {
        push_line(&mut out, "# HELP ", help, "");
    }
    out
}

fn push_line(out: &mut String, a: &str, b: &str, c: &str) {
    out.push_str(a);
    out.push_str(b);
    out.push_str(c);
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;

    #[test]
    fn counters_are_declared_under_their_sample_name() {
        let mut r = Registry::default();
        let c: Counter = Counter::default();
        c.inc();
        r.register("requests", "Requests served", c);
        let g: Gauge = Gauge::default();
        r.register("queue", "Queue length", g);
        assert_eq!(
            encode(&r),
            "# HELP requests_total Requests served.\n# TYPE requests_total counter\nrequests_total 1\n\
             # HELP queue Queue length.\n# TYPE queue gauge\nqueue 0\n"
        );
    }
}
