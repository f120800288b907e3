//! Prometheus text exposition (format 0.0.4) from a prometheus-client registry.
//!
//! prometheus-client writes OpenMetrics, where a counter family `foo` has samples `foo_total` and
//! the page ends in `# EOF`. The reference servers (Go and Python clients, text format) declare
//! `# HELP/TYPE foo_total`, and promtool's linter wants HELP on the sample name, so counter
//! descriptors are renamed and `# EOF` is dropped. Shared by the EPP and the decode server.

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use prometheus_client::registry::Registry;

/// A label value written escaped as the text format requires (`\` → `\\`, `"` → `\"`,
/// newline → `\n`). prometheus-client writes `String` label values verbatim, so a value holding
/// a quote or a newline would end the label set early and forge series; every label set whose
/// values can come from outside the binary is declared with [`escaped_label_set!`] instead.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let mut rest = self.0;
        while let Some(i) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..i])?;
            encoder.write_str(match rest.as_bytes()[i] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[i + 1..];
        }
        encoder.write_str(rest)
    }
}

/// Declares a label-set struct of `String` fields (label name = field name) whose values are
/// [`Escaped`] when encoded; otherwise like `#[derive(EncodeLabelSet)]`.
#[macro_export]
macro_rules! escaped_label_set {
    ($(#[$meta:meta])* $vis:vis struct $name:ident {
        $($(#[$fmeta:meta])* $fvis:vis $field:ident : String),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Hash, PartialEq, Eq)]
        $vis struct $name {
            $($(#[$fmeta])* $fvis $field: String),+
        }

        impl ::prometheus_client::encoding::EncodeLabelSet for $name {
            fn encode(
                &self,
                encoder: &mut ::prometheus_client::encoding::LabelSetEncoder,
            ) -> ::std::result::Result<(), ::std::fmt::Error> {
                ::prometheus_client::encoding::EncodeLabelSet::encode(
                    &[$((stringify!($field), $crate::promencode::Escaped(&self.$field))),+],
                    encoder,
                )
            }
        }
    };
}

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

    crate::escaped_label_set! {
        struct TwoLabels {
            model_name: String,
            target: String,
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut r = Registry::default();
        let c: prometheus_client::metrics::family::Family<TwoLabels, Counter> = Default::default();
        c.get_or_create(&TwoLabels {
            model_name: "evil\"} 1\ninference_pool_ready_pods{name=\"local\"} 9999\n".into(),
            target: "a\\b".into(),
        })
        .inc();
        r.register("requests", "Requests served", c);
        assert_eq!(
            encode(&r),
            "# HELP requests_total Requests served.\n# TYPE requests_total counter\n\
             requests_total{model_name=\"evil\\\"} 1\\ninference_pool_ready_pods{name=\\\"local\\\"} 9999\\n\",target=\"a\\\\b\"} 1\n"
        );
    }

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
