//! Tool calls in model output (vLLM's `--tool-call-parser hermes`, plus the forms Qwen2.5-Coder
//! actually emits): `<tool_call>{"name": …, "arguments": …}</tool_call>` blocks anywhere in the
//! output, or — when the whole output is one — a bare JSON call object (or array of them), or such
//! JSON inside a ```` ```json ```` fence.
//!
//! One incremental parser serves streaming and non-streaming responses (non-streaming feeds the
//! whole text at once), so both always agree. Text that cannot belong to a call is released as
//! content as soon as that is certain; Hermes arguments are streamed as the model writes them.
//! Output that starts like JSON or a fence is held until the end, because only the complete text
//! tells a JSON answer from a bare call.
//!
//! `arguments` is the model's own JSON text of the arguments object (exactly as written, so the
//! streamed fragments concatenate to the non-streaming value); when the model writes the
//! arguments as a JSON string, its decoded content.

use serde::Deserialize;
use serde_json::value::RawValue;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const FENCE: &str = "```";

/// What the parser releases, in output order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    Content(String),
    /// A call begins: its index among this response's calls, id and function name.
    Start {
        index: usize,
        id: String,
        name: String,
    },
    /// The next piece of call `index`'s arguments.
    Args {
        index: usize,
        fragment: String,
    },
}

/// A complete call (the non-streaming view).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// Where a call block's parse stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallPhase {
    /// Looking for `{"name": "…", "arguments": ` at the start of the block.
    Head,
    /// Streaming the arguments object; `scan` is the offset into `buf` scanned so far.
    Args {
        scan: usize,
        depth: u32,
        in_str: bool,
        esc: bool,
    },
    /// Arguments done; waiting for `</tool_call>`.
    Tail,
    /// The head did not have the expected shape: the block is parsed whole at its end.
    Whole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nothing but whitespace seen yet.
    Start,
    Content,
    /// Output began with `{`, `[` or a fence: kept until the end.
    Held,
    Call(CallPhase),
    /// `tool_choice` names the function: the whole output is its arguments.
    Named,
}

/// Incremental tool-call parser for one response.
#[derive(Debug)]
pub struct ToolParser {
    mode: Mode,
    buf: String,
    calls: Vec<ParsedCall>,
    /// Names of the request's tools: a bare or fenced JSON object is a call only when it names one.
    names: Vec<String>,
    /// `parallel_tool_calls: false`: calls after the first are dropped.
    single: bool,
    /// `Named` mode: the call's start has been released.
    named_started: bool,
}

impl ToolParser {
    pub fn new(names: Vec<String>, parallel: bool) -> Self {
        Self {
            mode: Mode::Start,
            buf: String::new(),
            calls: Vec::new(),
            names,
            single: !parallel,
            named_started: false,
        }
    }

    /// A parser for output constrained to one function's arguments (`tool_choice` naming it).
    pub fn named(name: String) -> Self {
        let mut p = Self::new(vec![name.clone()], false);
        p.mode = Mode::Named;
        p.calls.push(ParsedCall {
            id: new_call_id(),
            name,
            arguments: String::new(),
        });
        p
    }

    /// The calls found so far.
    pub fn calls(&self) -> &[ParsedCall] {
        &self.calls
    }

    /// Feeds more output text; returns what can be released now.
    pub fn feed(&mut self, text: &str) -> Vec<ToolEvent> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        self.advance(&mut out, false);
        out
    }

    /// The output ended: releases everything still held.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut out = Vec::new();
        self.advance(&mut out, true);
        out
    }

    fn advance(&mut self, out: &mut Vec<ToolEvent>, end: bool) {
        loop {
            let progressed = match self.mode {
                Mode::Start => self.step_start(end),
                Mode::Content => self.step_content(out, end),
                Mode::Held => {
                    if end {
                        self.finish_held(out);
                    }
                    false
                }
                Mode::Call(phase) => self.step_call(phase, out, end),
                Mode::Named => {
                    self.step_named(out);
                    false
                }
            };
            if !progressed {
                break;
            }
        }
        if end && !self.buf.is_empty() {
            push_content(out, std::mem::take(&mut self.buf));
        }
    }

    fn step_named(&mut self, out: &mut Vec<ToolEvent>) {
        let Some(call) = self.calls.first_mut() else {
            return;
        };
        if !self.named_started {
            self.named_started = true;
            out.push(ToolEvent::Start {
                index: 0,
                id: call.id.clone(),
                name: call.name.clone(),
            });
        }
        if !self.buf.is_empty() {
            let fragment = std::mem::take(&mut self.buf);
            call.arguments.push_str(&fragment);
            out.push(ToolEvent::Args { index: 0, fragment });
        }
    }

    fn step_start(&mut self, end: bool) -> bool {
        let trimmed = self.buf.trim_start();
        if trimmed.starts_with('{') || trimmed.starts_with('[') || trimmed.starts_with(FENCE) {
            self.mode = Mode::Held;
            return true;
        }
        let undecided =
            trimmed.is_empty() || FENCE.starts_with(trimmed) || OPEN.starts_with(trimmed);
        if undecided && !end {
            return false; // could still become JSON, a fence or a tag
        }
        self.mode = Mode::Content;
        true
    }

    /// Releases text up to the next tag. Text right before a tag loses its trailing whitespace
    /// (layout between content and calls); streaming holds trailing whitespace back until it is
    /// known not to precede a tag, so streamed and whole parses agree.
    fn step_content(&mut self, out: &mut Vec<ToolEvent>, end: bool) -> bool {
        if let Some(at) = self.buf.find(OPEN) {
            let text = self.buf[..at].trim_end().to_owned();
            push_content(out, text);
            self.buf.drain(..at + OPEN.len());
            self.mode = Mode::Call(CallPhase::Head);
            return true;
        }
        if end {
            if !self.calls.is_empty() && self.buf.trim().is_empty() {
                self.buf.clear();
            }
            return false; // `advance` releases the rest
        }
        let tag = partial_suffix(&self.buf, OPEN);
        let rest = &self.buf[..self.buf.len() - tag];
        let release = rest.trim_end().len();
        if release > 0 {
            let text: String = self.buf.drain(..release).collect();
            push_content(out, text);
        }
        false
    }

    fn step_call(&mut self, phase: CallPhase, out: &mut Vec<ToolEvent>, end: bool) -> bool {
        match phase {
            CallPhase::Head => match parse_head(&self.buf) {
                Head::Incomplete if !end => false,
                Head::Incomplete | Head::Mismatch => {
                    self.mode = Mode::Call(CallPhase::Whole);
                    true
                }
                Head::Found { name, args_at } => {
                    if self.buf[args_at..].starts_with('{') {
                        let index = self.calls.len();
                        let call = ParsedCall {
                            id: new_call_id(),
                            name,
                            arguments: String::new(),
                        };
                        if self.shown(index) {
                            out.push(ToolEvent::Start {
                                index,
                                id: call.id.clone(),
                                name: call.name.clone(),
                            });
                        }
                        self.calls.push(call);
                        self.buf.drain(..args_at);
                        self.mode = Mode::Call(CallPhase::Args {
                            scan: 0,
                            depth: 0,
                            in_str: false,
                            esc: false,
                        });
                    } else {
                        // Arguments as a string (or something odd): decode the block whole.
                        self.mode = Mode::Call(CallPhase::Whole);
                    }
                    true
                }
            },
            CallPhase::Args {
                mut scan,
                mut depth,
                mut in_str,
                mut esc,
            } => {
                let bytes = self.buf.as_bytes();
                let mut done = false;
                while scan < bytes.len() {
                    let b = bytes[scan];
                    scan += 1;
                    if in_str {
                        match (esc, b) {
                            (true, _) => esc = false,
                            (false, b'\\') => esc = true,
                            (false, b'"') => in_str = false,
                            _ => {}
                        }
                        continue;
                    }
                    match b {
                        b'"' => in_str = true,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth = depth.saturating_sub(1);
                            if depth == 0 {
                                done = true;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                // `scan` only ever stops on an ASCII byte boundary or the end: safe to split.
                let fragment: String = self.buf.drain(..scan).collect();
                let index = self.calls.len() - 1;
                if let Some(call) = self.calls.last_mut() {
                    call.arguments.push_str(&fragment);
                }
                if !fragment.is_empty() && self.shown(index) {
                    out.push(ToolEvent::Args { index, fragment });
                }
                if done {
                    self.mode = Mode::Call(CallPhase::Tail);
                    return true;
                }
                if end {
                    // Cut off mid-arguments (max_tokens): the call stays as far as it got.
                    self.mode = Mode::Content;
                    return false;
                }
                self.mode = Mode::Call(CallPhase::Args {
                    scan: 0,
                    depth,
                    in_str,
                    esc,
                });
                false
            }
            CallPhase::Tail => {
                if let Some(at) = self.buf.find(CLOSE) {
                    self.buf.drain(..at + CLOSE.len());
                    self.mode = Mode::Content;
                    return true;
                }
                if end {
                    self.buf.clear();
                    self.mode = Mode::Content;
                }
                false
            }
            CallPhase::Whole => {
                let (body, rest_at) = match self.buf.find(CLOSE) {
                    Some(at) => (self.buf[..at].to_owned(), Some(at + CLOSE.len())),
                    None if end => (self.buf.clone(), None),
                    None => return false,
                };
                match parse_calls(&body) {
                    Some(calls) if !calls.is_empty() => {
                        for c in calls {
                            self.emit_call(c, out);
                        }
                    }
                    // Not a call after all: vLLM returns such a block as text.
                    _ => push_content(
                        out,
                        format!("{OPEN}{body}{}", if rest_at.is_some() { CLOSE } else { "" }),
                    ),
                }
                match rest_at {
                    Some(at) => {
                        self.buf.drain(..at);
                    }
                    None => self.buf.clear(),
                }
                self.mode = Mode::Content;
                true
            }
        }
    }

    fn finish_held(&mut self, out: &mut Vec<ToolEvent>) {
        let text = std::mem::take(&mut self.buf);
        let calls = bare_calls(&text).filter(|calls| {
            !calls.is_empty()
                && calls
                    .iter()
                    .all(|(name, _)| self.names.iter().any(|n| n == name))
        });
        match calls {
            Some(calls) => {
                for c in calls {
                    self.emit_call(c, out);
                }
            }
            None if text.contains(OPEN) => {
                // e.g. a fence around Hermes tags: parse it as ordinary output.
                self.mode = Mode::Content;
                self.buf = text;
                let mut inner = Vec::new();
                self.advance(&mut inner, true);
                out.extend(inner);
            }
            None => push_content(out, text),
        }
        self.mode = Mode::Content;
    }

    fn emit_call(&mut self, (name, arguments): (String, String), out: &mut Vec<ToolEvent>) {
        let index = self.calls.len();
        let call = ParsedCall {
            id: new_call_id(),
            name,
            arguments,
        };
        if self.shown(index) {
            out.push(ToolEvent::Start {
                index,
                id: call.id.clone(),
                name: call.name.clone(),
            });
            if !call.arguments.is_empty() {
                out.push(ToolEvent::Args {
                    index,
                    fragment: call.arguments.clone(),
                });
            }
        }
        self.calls.push(call);
    }

    /// Whether call `index` is reported (`parallel_tool_calls: false` drops all but the first).
    fn shown(&self, index: usize) -> bool {
        !self.single || index == 0
    }

    /// The calls the response reports (all of them, or the first with `parallel_tool_calls:
    /// false`).
    pub fn reported_calls(&self) -> &[ParsedCall] {
        if self.single {
            &self.calls[..self.calls.len().min(1)]
        } else {
            &self.calls
        }
    }
}

/// Appends content, merging with a directly preceding content event.
fn push_content(out: &mut Vec<ToolEvent>, text: String) {
    if text.is_empty() {
        return;
    }
    if let Some(ToolEvent::Content(prev)) = out.last_mut() {
        prev.push_str(&text);
    } else {
        out.push(ToolEvent::Content(text));
    }
}

/// Length of the longest suffix of `s` that is a proper prefix of `pat`.
fn partial_suffix(s: &str, pat: &str) -> usize {
    (1..pat.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && pat.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

fn new_call_id() -> String {
    format!("chatcmpl-tool-{:032x}", rand::random::<u128>())
}

enum Head {
    Incomplete,
    Mismatch,
    /// The name, and the offset in the block where the arguments value starts.
    Found {
        name: String,
        args_at: usize,
    },
}

/// Reads `ws { ws "name" ws : ws "<string>" ws , ws "arguments" ws : ws` at the start of `s`.
fn parse_head(s: &str) -> Head {
    let mut c = Cursor { s, at: 0 };
    macro_rules! step {
        ($e:expr) => {
            match $e {
                Step::Ok(v) => v,
                Step::Incomplete => return Head::Incomplete,
                Step::Mismatch => return Head::Mismatch,
            }
        };
    }
    step!(c.lit("{"));
    step!(c.lit("\"name\""));
    step!(c.lit(":"));
    let name = step!(c.string());
    step!(c.lit(","));
    let key = step!(c.string());
    if key != "arguments" && key != "parameters" {
        return Head::Mismatch;
    }
    step!(c.lit(":"));
    c.ws();
    if c.at >= s.len() {
        return Head::Incomplete;
    }
    Head::Found {
        name,
        args_at: c.at,
    }
}

enum Step<T> {
    Ok(T),
    Incomplete,
    Mismatch,
}

struct Cursor<'a> {
    s: &'a str,
    at: usize,
}

impl Cursor<'_> {
    fn ws(&mut self) {
        let rest = &self.s[self.at..];
        self.at += rest.len() - rest.trim_start().len();
    }

    fn lit(&mut self, lit: &str) -> Step<()> {
        self.ws();
        let rest = &self.s[self.at..];
        if rest.starts_with(lit) {
            self.at += lit.len();
            Step::Ok(())
        } else if lit.starts_with(rest) {
            Step::Incomplete
        } else {
            Step::Mismatch
        }
    }

    /// A JSON string, decoded.
    fn string(&mut self) -> Step<String> {
        self.ws();
        let rest = &self.s[self.at..];
        if rest.is_empty() {
            return Step::Incomplete;
        }
        if !rest.starts_with('"') {
            return Step::Mismatch;
        }
        let bytes = rest.as_bytes();
        let mut esc = false;
        for (i, &b) in bytes.iter().enumerate().skip(1) {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => {
                    return match serde_json::from_str::<String>(&rest[..=i]) {
                        Ok(v) => {
                            self.at += i + 1;
                            Step::Ok(v)
                        }
                        Err(_) => Step::Mismatch,
                    };
                }
                _ => {}
            }
        }
        Step::Incomplete
    }
}

#[derive(Deserialize)]
struct CallJson<'a> {
    name: String,
    #[serde(borrow, alias = "parameters")]
    arguments: Option<&'a RawValue>,
}

/// `(name, arguments)` of one call object or an array of them; `None` if `text` is not that.
fn parse_calls(text: &str) -> Option<Vec<(String, String)>> {
    let mut calls = Vec::new();
    for raw in serde_json::Deserializer::from_str(text).into_iter::<&RawValue>() {
        let raw = raw.ok()?;
        let json = raw.get();
        if json.starts_with('[') {
            let list: Vec<CallJson<'_>> = serde_json::from_str(json).ok()?;
            calls.extend(list.into_iter().map(call_parts));
        } else {
            let one: CallJson<'_> = serde_json::from_str(json).ok()?;
            calls.push(call_parts(one));
        }
    }
    Some(calls)
}

fn call_parts(c: CallJson<'_>) -> (String, String) {
    let arguments = match c.arguments {
        None => "{}".to_owned(),
        // Arguments written as a JSON string holding the JSON: its content.
        Some(raw) if raw.get().starts_with('"') => {
            serde_json::from_str::<String>(raw.get()).unwrap_or_else(|_| raw.get().to_owned())
        }
        Some(raw) => raw.get().to_owned(),
    };
    (c.name, arguments)
}

/// The calls of an output that is wholly a JSON call (or list of calls), optionally inside one
/// fenced block (```` ```json ````, ```` ```tool_call ```` or a bare fence).
fn bare_calls(text: &str) -> Option<Vec<(String, String)>> {
    let t = text.trim();
    let inner = match t.strip_prefix(FENCE) {
        Some(rest) => {
            let (_lang, body) = rest.split_once('\n')?;
            body.trim_end().strip_suffix(FENCE)?
        }
        None => t,
    };
    parse_calls(inner.trim())
}

#[cfg(test)]
mod tests;
