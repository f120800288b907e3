//! Prometheus text-format parsing that materialises only the families a caller asks for.
//!
//! Reads the Prometheus text exposition format 0.0.4 and tolerates OpenMetrics 1.0 text
//! (`# EOF`, counters declared as `foo` with samples `foo_total`, float-second timestamps,
//! exemplars after `#`). The scraper polls every endpoint every 50 ms, so the parser is built to
//! skip everything it was not asked for without allocating: a line whose metric name is not
//! wanted costs one scan of its name.
//!
//! Validation policy (a deliberate difference from the reference EPP, which rejects a whole page
//! when any line is malformed): lines of wanted families are parsed strictly and a malformed one
//! fails the page with its 1-based line number; lines of other families are skipped unparsed, so a
//! model server's bad histogram cannot blind the router to its queue depth.
//!
//! Only samples of families whose `# TYPE` is `gauge` or `counter` are kept (REFERENCE.md §3);
//! samples with no preceding `# TYPE` (untyped) and histogram/summary families are dropped.

use std::borrow::Cow;

/// Default cap on the size of one exposition page.
pub const DEFAULT_MAX_BYTES: usize = 4 << 20;
/// Default cap on the samples kept per wanted family.
pub const DEFAULT_MAX_SAMPLES_PER_FAMILY: usize = 1024;
/// Cap on the labels of one sample (Prometheus itself defaults to no limit; 64 is far above any
/// engine's metrics and keeps a hostile line from building a huge vector).
pub const MAX_LABELS_PER_SAMPLE: usize = 64;

/// Bounds applied while parsing one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Pages longer than this are rejected before parsing.
    pub max_bytes: usize,
    /// A wanted family with more samples than this fails the page (truncating instead could make
    /// "largest value wins" lookups such as vLLM's LoRA info silently wrong).
    pub max_samples_per_family: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: DEFAULT_MAX_BYTES,
            max_samples_per_family: DEFAULT_MAX_SAMPLES_PER_FAMILY,
        }
    }
}

/// Why a page could not be parsed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PromTextError {
    #[error("exposition is {len} bytes, over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("line {line}: {reason}")]
    Syntax { line: usize, reason: String },
    #[error("line {line}: family {family:?} has more than {max} samples")]
    TooManySamples {
        line: usize,
        family: String,
        max: usize,
    },
}

/// The `# TYPE` of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
    GaugeHistogram,
    Summary,
    Info,
    StateSet,
    /// `untyped` (0.0.4) or `unknown` (OpenMetrics).
    Untyped,
}

impl MetricKind {
    fn parse(word: &str) -> Option<MetricKind> {
        Some(match word {
            "counter" => MetricKind::Counter,
            "gauge" => MetricKind::Gauge,
            "histogram" => MetricKind::Histogram,
            "gaugehistogram" => MetricKind::GaugeHistogram,
            "summary" => MetricKind::Summary,
            "info" => MetricKind::Info,
            "stateset" => MetricKind::StateSet,
            "untyped" | "unknown" => MetricKind::Untyped,
            _ => return None,
        })
    }

    /// Whether samples of this kind are read (gauge and counter only).
    pub fn is_counted(self) -> bool {
        matches!(self, MetricKind::Counter | MetricKind::Gauge)
    }
}

/// One sample. Label values borrow from the page unless they contained escapes.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub labels: Vec<(&'a str, Cow<'a, str>)>,
    pub value: f64,
    /// Milliseconds since the Unix epoch, when the line carried a timestamp.
    pub timestamp_ms: Option<i64>,
}

impl Sample<'_> {
    /// The value of label `name`, if present.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_ref())
    }

    /// Whether every `(name, value)` pair in `selector` is present on this sample.
    pub fn matches(&self, selector: &[(&str, &str)]) -> bool {
        selector
            .iter()
            .all(|(name, value)| self.label(name) == Some(*value))
    }
}

/// A wanted family as found on the page.
#[derive(Debug, Clone, PartialEq)]
pub struct Family<'a> {
    /// The name the caller asked for.
    pub name: &'a str,
    /// `None` when the page had no `# TYPE` line for it.
    pub kind: Option<MetricKind>,
    /// Kept samples in page order (empty unless `kind` is gauge or counter).
    pub samples: Vec<Sample<'a>>,
}

/// The wanted families of one page, in the order they were asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Families<'a> {
    families: Vec<Family<'a>>,
}

impl<'a> Families<'a> {
    /// The family `name` if it was declared as a gauge or counter and has at least one sample.
    pub fn get(&self, name: &str) -> Option<&Family<'a>> {
        self.raw(name)
            .filter(|f| f.kind.is_some_and(MetricKind::is_counted) && !f.samples.is_empty())
    }

    /// The family `name` whatever its type, for error messages (`None` if it was not asked for).
    pub fn raw(&self, name: &str) -> Option<&Family<'a>> {
        self.families.iter().find(|f| f.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Family<'a>> {
        self.families.iter()
    }
}

/// Parses `text`, keeping only the families named in `wanted` (names as in `# TYPE` lines; a
/// counter may also be asked for by its `_total` sample name).
pub fn parse<'a>(
    text: &'a str,
    wanted: &[&'a str],
    limits: &Limits,
) -> Result<Families<'a>, PromTextError> {
    if text.len() > limits.max_bytes {
        return Err(PromTextError::TooLarge {
            len: text.len(),
            max: limits.max_bytes,
        });
    }
    let mut families: Vec<Family<'a>> = Vec::with_capacity(wanted.len());
    for name in wanted {
        if !families.iter().any(|f| f.name == *name) {
            families.push(Family {
                name,
                kind: None,
                samples: Vec::new(),
            });
        }
    }
    // Whether a sample of family i was seen before its TYPE line (an error if a TYPE follows).
    let mut seen_sample = vec![false; families.len()];

    for (index, raw_line) in text.split('\n').enumerate() {
        let line_no = index + 1;
        let line = trim_blank_start(raw_line);
        let Some(&first) = line.as_bytes().first() else {
            continue;
        };
        if first == b'#' {
            // HELP text is never needed; skip it before any further scanning.
            if line.starts_with("# HELP ") {
                continue;
            }
            match parse_comment(line) {
                Comment::Eof => break,
                Comment::Other => {}
                Comment::Type(name, kind_word) => {
                    let Some(i) = match_type_name(&families, name) else {
                        continue;
                    };
                    let kind = MetricKind::parse(kind_word).ok_or_else(|| {
                        syntax(
                            line_no,
                            format!("unknown metric type {kind_word:?} for {name:?}"),
                        )
                    })?;
                    if families[i].kind.is_some() || seen_sample[i] {
                        return Err(syntax(
                            line_no,
                            format!("second TYPE line for {name:?}, or TYPE after its samples"),
                        ));
                    }
                    families[i].kind = Some(kind);
                }
            }
            continue;
        }
        if first == b'\r' && line.len() == 1 {
            continue;
        }
        let Some((i, name_end)) = match_sample_line(&families, line) else {
            continue;
        };
        let name = &line[..name_end];
        seen_sample[i] = true;
        let family = &mut families[i];
        let counted = match family.kind {
            // `foo_total` counts only for a family declared `counter` (OpenMetrics naming).
            Some(MetricKind::Counter) => true,
            Some(MetricKind::Gauge) => name == family.name,
            _ => false,
        };
        // Parse even dropped samples of wanted families so a malformed line is reported.
        let sample = parse_sample_rest(&line[name_end..], line_no)?;
        if !counted {
            continue;
        }
        if family.samples.len() >= limits.max_samples_per_family {
            return Err(PromTextError::TooManySamples {
                line: line_no,
                family: family.name.to_string(),
                max: limits.max_samples_per_family,
            });
        }
        family.samples.push(sample);
    }
    Ok(Families { families })
}

fn syntax(line: usize, reason: String) -> PromTextError {
    PromTextError::Syntax { line, reason }
}

enum Comment<'a> {
    Eof,
    Type(&'a str, &'a str),
    Other,
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

// Byte-wise trims: the `char`-pattern versions decode UTF-8 and are measurably slower here.
fn trim_blank_start(s: &str) -> &str {
    let n = s.bytes().take_while(|b| is_blank(*b)).count();
    &s[n..]
}

fn trim_blank_end(s: &str) -> &str {
    let trailing = s
        .bytes()
        .rev()
        .take_while(|b| is_blank(*b) || *b == b'\r')
        .count();
    &s[..s.len() - trailing]
}

fn split_blank(s: &str) -> (&str, &str) {
    let s = trim_blank_start(s);
    match s.bytes().position(is_blank) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    }
}

fn parse_comment(line: &str) -> Comment<'_> {
    let body = trim_blank_end(&line[1..]);
    let (keyword, rest) = split_blank(body);
    match keyword {
        "TYPE" => {
            let (name, rest) = split_blank(rest);
            let (kind, _) = split_blank(rest);
            Comment::Type(name, kind)
        }
        "EOF" if rest.is_empty() => Comment::Eof,
        _ => Comment::Other,
    }
}

/// Index of the wanted family a `# TYPE name` line declares.
fn match_type_name(families: &[Family<'_>], name: &str) -> Option<usize> {
    families.iter().position(|f| {
        f.name == name
            // OpenMetrics declares `foo` for samples `foo_total`; the caller may ask for either.
            || f.name
                .strip_suffix("_total")
                .is_some_and(|stem| stem == name)
    })
}

/// The wanted family a sample line belongs to, and where its metric name ends. Compares the
/// line's prefix with each wanted name instead of scanning the name first: most lines are
/// unwanted and fail the comparison within a few bytes.
fn match_sample_line(families: &[Family<'_>], line: &str) -> Option<(usize, usize)> {
    let bytes = line.as_bytes();
    let ends_name = |at: usize| {
        bytes
            .get(at)
            .is_none_or(|b| matches!(b, b'{' | b' ' | b'\t' | b'\r'))
    };
    families.iter().enumerate().find_map(|(i, f)| {
        let n = f.name.len();
        if !bytes.starts_with(f.name.as_bytes()) {
            return None;
        }
        if ends_name(n) {
            return Some((i, n));
        }
        // OpenMetrics counter samples are named `<family>_total`.
        let total = n + "_total".len();
        (bytes
            .get(n..)
            .is_some_and(|rest| rest.starts_with(b"_total"))
            && ends_name(total))
        .then_some((i, total))
    })
}

/// Parses what follows the metric name: optional labels, value, optional timestamp.
fn parse_sample_rest(rest: &str, line: usize) -> Result<Sample<'_>, PromTextError> {
    let mut rest = trim_blank_start(rest);
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = parse_labels(after_brace, line, &mut labels)?;
    }
    let rest = trim_blank_end(rest);
    let (value_text, rest) = split_blank(rest);
    if value_text.is_empty() {
        return Err(syntax(line, "missing sample value".into()));
    }
    let value = parse_value(value_text)
        .ok_or_else(|| syntax(line, format!("invalid sample value {value_text:?}")))?;
    let (ts_text, rest) = split_blank(rest);
    // OpenMetrics exemplars (`# {trace_id="…"} 1.0`) may follow the value or timestamp.
    let timestamp_ms = if ts_text.is_empty() || ts_text.starts_with('#') {
        None
    } else {
        let ts = parse_timestamp(ts_text)
            .ok_or_else(|| syntax(line, format!("invalid timestamp {ts_text:?}")))?;
        let tail = trim_blank_start(rest);
        if !tail.is_empty() && !tail.starts_with('#') {
            return Err(syntax(
                line,
                format!("unexpected text {tail:?} after timestamp"),
            ));
        }
        Some(ts)
    };
    Ok(Sample {
        labels,
        value,
        timestamp_ms,
    })
}

fn parse_value(text: &str) -> Option<f64> {
    // Rust's parser accepts `NaN`, `+Inf`, `-Inf` and `inf`, like Go's ParseFloat; it also
    // accepts `infinity`, which no exporter writes and is harmless to allow.
    text.parse::<f64>().ok()
}

fn parse_timestamp(text: &str) -> Option<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Some(ms);
    }
    // OpenMetrics writes timestamps as (fractional) seconds.
    let secs = text.parse::<f64>().ok()?;
    let ms = secs * 1000.0;
    if ms.is_finite() && ms.abs() < 9.2e18 {
        #[allow(clippy::cast_possible_truncation)]
        Some(ms.round() as i64)
    } else {
        None
    }
}

/// Parses `name="value", ...}` and returns the text after the closing brace.
fn parse_labels<'a>(
    mut s: &'a str,
    line: usize,
    labels: &mut Vec<(&'a str, Cow<'a, str>)>,
) -> Result<&'a str, PromTextError> {
    loop {
        s = trim_blank_start(s);
        if let Some(after) = s.strip_prefix('}') {
            return Ok(after);
        }
        let name_len = s
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        if name_len == 0 || s.as_bytes().first().is_some_and(u8::is_ascii_digit) {
            return Err(syntax(line, "invalid or missing label name".into()));
        }
        let name = &s[..name_len];
        s = trim_blank_start(&s[name_len..]);
        s = s
            .strip_prefix('=')
            .ok_or_else(|| syntax(line, format!("expected '=' after label {name:?}")))?;
        s = trim_blank_start(s);
        s = s
            .strip_prefix('"')
            .ok_or_else(|| syntax(line, format!("expected '\"' to open the value of {name:?}")))?;
        let (value, after) = parse_label_value(s, line, name)?;
        if labels.iter().any(|(n, _)| *n == name) {
            return Err(syntax(line, format!("duplicate label {name:?}")));
        }
        if labels.len() >= MAX_LABELS_PER_SAMPLE {
            return Err(syntax(
                line,
                format!("more than {MAX_LABELS_PER_SAMPLE} labels"),
            ));
        }
        labels.push((name, value));
        s = trim_blank_start(after);
        if let Some(after_comma) = s.strip_prefix(',') {
            s = after_comma;
        } else if !s.starts_with('}') {
            return Err(syntax(
                line,
                format!("expected ',' or '}}' after the value of {name:?}"),
            ));
        }
    }
}

/// Parses a label value up to its closing quote (already past the opening one). Borrows unless
/// the value contains escapes.
fn parse_label_value<'a>(
    s: &'a str,
    line: usize,
    name: &str,
) -> Result<(Cow<'a, str>, &'a str), PromTextError> {
    let bytes = s.as_bytes();
    let Some(stop) = bytes.iter().position(|b| *b == b'"' || *b == b'\\') else {
        return Err(syntax(
            line,
            format!("unterminated value of label {name:?}"),
        ));
    };
    if bytes[stop] == b'"' {
        return Ok((Cow::Borrowed(&s[..stop]), &s[stop + 1..]));
    }
    let mut owned = String::with_capacity(s.len().min(256));
    owned.push_str(&s[..stop]);
    let mut chars = s[stop..].char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((Cow::Owned(owned), &s[stop + i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => owned.push('\\'),
                Some((_, '"')) => owned.push('"'),
                Some((_, 'n')) => owned.push('\n'),
                Some((_, other)) => {
                    return Err(syntax(
                        line,
                        format!("invalid escape \\{other} in value of label {name:?}"),
                    ))
                }
                None => break,
            },
            c => owned.push(c),
        }
    }
    Err(syntax(
        line,
        format!("unterminated value of label {name:?}"),
    ))
}

#[cfg(test)]
mod tests;
