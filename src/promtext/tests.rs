//! Parser tests: each syntax element, the caps, error line numbers, and never-panic properties.

use super::*;
use proptest::prelude::*;

fn parse_default<'a>(text: &'a str, wanted: &[&'a str]) -> Result<Families<'a>, PromTextError> {
    parse(text, wanted, &Limits::default())
}

fn values(f: &Family<'_>) -> Vec<f64> {
    f.samples.iter().map(|s| s.value).collect()
}

#[test]
fn reads_wanted_gauges_and_skips_the_rest() {
    let text = "# HELP a_gauge A gauge.\n# TYPE a_gauge gauge\na_gauge{x=\"1\"} 3\n\
                # TYPE other gauge\nother 9\n# TYPE b counter\nb 4.5 1700000000000\n";
    let fams = parse_default(text, &["a_gauge", "b", "missing"]).unwrap();
    let a = fams.get("a_gauge").unwrap();
    assert_eq!(a.kind, Some(MetricKind::Gauge));
    assert_eq!(a.samples.len(), 1);
    assert_eq!(a.samples[0].label("x"), Some("1"));
    assert_eq!(a.samples[0].value, 3.0);
    assert_eq!(a.samples[0].timestamp_ms, None);
    let b = fams.get("b").unwrap();
    assert_eq!(b.samples[0].value, 4.5);
    assert_eq!(b.samples[0].timestamp_ms, Some(1_700_000_000_000));
    assert!(fams.get("missing").is_none());
    assert_eq!(fams.raw("missing").unwrap().kind, None);
    assert!(
        fams.raw("other").is_none(),
        "unwanted families are not materialised"
    );
}

#[test]
fn untyped_histogram_and_summary_samples_are_ignored() {
    let text = "untyped_one 1\n\
                # TYPE explicit_untyped untyped\nexplicit_untyped 2\n\
                # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n\
                # TYPE s summary\ns{quantile=\"0.5\"} 1\ns_sum 1\ns_count 1\n";
    let wanted = ["untyped_one", "explicit_untyped", "h", "s"];
    let fams = parse_default(text, &wanted).unwrap();
    for name in wanted {
        assert!(fams.get(name).is_none(), "{name} must not count");
    }
    assert_eq!(fams.raw("h").unwrap().kind, Some(MetricKind::Histogram));
    assert_eq!(fams.raw("s").unwrap().kind, Some(MetricKind::Summary));
    assert_eq!(
        fams.raw("explicit_untyped").unwrap().kind,
        Some(MetricKind::Untyped)
    );
}

#[test]
fn special_values_timestamps_crlf_and_blank_lines() {
    let text = "\r\n# TYPE g gauge\r\n\r\n  g{k=\"nan\"} NaN\r\ng{k=\"pinf\"} +Inf\r\n\
                g{k=\"ninf\"} -Inf 42\r\ng{k=\"exp\"} 1.5e-3\t-7\r\n\n";
    let fams = parse_default(text, &["g"]).unwrap();
    let g = fams.get("g").unwrap();
    assert_eq!(g.samples.len(), 4);
    assert!(g.samples[0].value.is_nan());
    assert_eq!(g.samples[1].value, f64::INFINITY);
    assert_eq!(g.samples[2].value, f64::NEG_INFINITY);
    assert_eq!(g.samples[2].timestamp_ms, Some(42));
    assert_eq!(g.samples[3].value, 0.0015);
    assert_eq!(g.samples[3].timestamp_ms, Some(-7));
}

#[test]
fn label_escapes_are_decoded_and_plain_values_borrowed() {
    let text = "# TYPE m gauge\n\
                m{path=\"C:\\\\dir\",quote=\"say \\\"hi\\\"\",nl=\"a\\nb\",plain=\"p\",} 1\n\
                m { spaced = \"v\" , other=\"w\" } 2\n";
    let fams = parse_default(text, &["m"]).unwrap();
    let m = fams.get("m").unwrap();
    let first = &m.samples[0];
    assert_eq!(first.label("path"), Some("C:\\dir"));
    assert_eq!(first.label("quote"), Some("say \"hi\""));
    assert_eq!(first.label("nl"), Some("a\nb"));
    assert!(matches!(first.labels[3].1, Cow::Borrowed("p")));
    assert!(matches!(first.labels[0].1, Cow::Owned(_)));
    assert_eq!(m.samples[1].label("spaced"), Some("v"));
    assert_eq!(m.samples[1].label("other"), Some("w"));
    assert!(m.samples[1].matches(&[("spaced", "v"), ("other", "w")]));
    assert!(!m.samples[1].matches(&[("spaced", "x")]));
}

#[test]
fn openmetrics_counters_exemplars_and_eof() {
    let text = "# TYPE requests counter\n# UNIT requests requests\n\
                requests_total{code=\"200\"} 17 1520879607.789 # {trace_id=\"abc\"} 0.67\n\
                requests_created{code=\"200\"} 1520430000.123\n\
                # TYPE g gauge\ng_total 5\ng 6 # {a=\"b\"} 1\n# EOF\ng 99\n";
    let fams = parse_default(text, &["requests", "g"]).unwrap();
    let r = fams.get("requests").unwrap();
    assert_eq!(values(r), [17.0]);
    assert_eq!(r.samples[0].timestamp_ms, Some(1_520_879_607_789));
    // `g_total` is not a gauge's sample; everything after `# EOF` is ignored.
    assert_eq!(values(fams.get("g").unwrap()), [6.0]);
    // Asking for the counter by its sample name works too.
    let by_sample = parse_default(text, &["requests_total"]).unwrap();
    assert_eq!(values(by_sample.get("requests_total").unwrap()), [17.0]);
}

#[test]
fn malformed_wanted_lines_fail_with_their_line_number() {
    let cases: [(&str, usize, &str); 11] = [
        ("# TYPE g gauge\ng{a=\"1\" 2\n", 2, "expected ',' or '}'"),
        ("# TYPE g gauge\ng{a=1} 2\n", 2, "expected '\"'"),
        (
            "# TYPE g gauge\n\ng{a=\"x\\q\"} 2\n",
            3,
            "invalid escape \\q",
        ),
        ("# TYPE g gauge\ng{a=\"open} 2\n", 2, "unterminated value"),
        ("# TYPE g gauge\ng\n", 2, "missing sample value"),
        ("# TYPE g gauge\ng abc\n", 2, "invalid sample value \"abc\""),
        ("# TYPE g gauge\ng 1 2 3\n", 2, "unexpected text \"3\""),
        ("# TYPE g gauge\ng 1 soon\n", 2, "invalid timestamp"),
        (
            "# TYPE g gauge\ng{a=\"1\",a=\"2\"} 1\n",
            2,
            "duplicate label \"a\"",
        ),
        ("# TYPE g gauge\n# TYPE g counter\n", 2, "second TYPE line"),
        ("# TYPE g gauges\n", 1, "unknown metric type \"gauges\""),
    ];
    for (text, line, needle) in cases {
        match parse_default(text, &["g"]) {
            Err(PromTextError::Syntax { line: l, reason }) => {
                assert_eq!(l, line, "{text:?}");
                assert!(reason.contains(needle), "{text:?}: {reason}");
            }
            other => panic!("{text:?}: expected a syntax error, got {other:?}"),
        }
    }
    // A sample before its TYPE line, then a TYPE line, is rejected like the Go parser does.
    let err = parse_default("g 1\n# TYPE g gauge\ng 2\n", &["g"]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 2: second TYPE line for \"g\", or TYPE after its samples"
    );
}

#[test]
fn malformed_lines_of_other_families_are_skipped() {
    let text =
        "# TYPE g gauge\ng 1\nbroken{a=\"x\\q\" 1 2 3\n# TYPE h histogram\nh_bucket{le=} x\n";
    let fams = parse_default(text, &["g"]).unwrap();
    assert_eq!(values(fams.get("g").unwrap()), [1.0]);
}

#[test]
fn size_and_sample_caps() {
    let limits = Limits {
        max_bytes: 64,
        max_samples_per_family: 3,
    };
    let big = "x".repeat(65);
    assert_eq!(
        parse(&big, &["g"], &limits).unwrap_err(),
        PromTextError::TooLarge { len: 65, max: 64 }
    );
    let at_cap = "# TYPE g gauge\ng{i=\"1\"} 1\ng{i=\"2\"} 2\ng{i=\"3\"} 3\n";
    assert_eq!(
        values(parse(at_cap, &["g"], &limits).unwrap().get("g").unwrap()),
        [1.0, 2.0, 3.0]
    );
    let over = format!("{at_cap}g{{i=\"4\"}} 4\n");
    assert_eq!(
        parse(&over, &["g"], &limits).unwrap_err(),
        PromTextError::TooManySamples {
            line: 5,
            family: "g".into(),
            max: 3
        }
    );
    let many_labels: String = (0..=MAX_LABELS_PER_SAMPLE)
        .map(|i| format!("l{i}=\"v\""))
        .collect::<Vec<_>>()
        .join(",");
    let text = format!("# TYPE g gauge\ng{{{many_labels}}} 1\n");
    let err = parse(&text, &["g"], &Limits::default()).unwrap_err();
    assert!(err.to_string().contains("more than 64 labels"), "{err}");
}

#[test]
fn empty_and_comment_only_pages() {
    for text in ["", "\n\n", "# just a comment\n#\n# HELP g help\n", "# EOF"] {
        let fams = parse_default(text, &["g"]).unwrap();
        assert!(fams.get("g").is_none(), "{text:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse(&text, &["g", "c_total", "h"], &Limits::default());
    }

    #[test]
    fn never_panics_on_exposition_like_text(
        lines in proptest::collection::vec(
            "(# (TYPE|HELP|EOF) )?[gch_total]{0,8}(\\{([a-z\\\\\"=, ]|\\\\[n\"\\\\q]){0,24}\\}?)?[ \t]?[-+0-9.eEInfNa ]{0,12}\r?",
            0..24,
        )
    ) {
        let text = lines.join("\n");
        let _ = parse(&text, &["g", "c_total", "h"], &Limits::default());
    }

    #[test]
    fn label_values_round_trip(value in "[ -~\n]{0,32}") {
        let escaped = value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let text = format!("# TYPE g gauge\ng{{v=\"{escaped}\"}} 1\n");
        let fams = parse(&text, &["g"], &Limits::default()).unwrap();
        prop_assert_eq!(fams.get("g").unwrap().samples[0].label("v"), Some(value.as_str()));
    }
}
