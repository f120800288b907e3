//! Incremental detokenisation and stop-string matching for streamed output.
//!
//! Decoding token by token breaks multi-byte characters and merges, so each new token is decoded
//! together with a few previous ones and only the stable new suffix is emitted (the prefix/read
//! offset scheme of vLLM `vllm/v1/engine/detokenizer.py`).

use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};

use crate::serve::codec::{CodecError, TextCodec};

/// Tokens decoded together with the new one, for context.
const CONTEXT_TOKENS: usize = 6;

pub struct Detokenizer {
    codec: Arc<dyn TextCodec>,
    skip_special: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl std::fmt::Debug for Detokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detokenizer")
            .field("ids", &self.ids.len())
            .finish_non_exhaustive()
    }
}

impl Detokenizer {
    /// `context` holds prompt ids the first output token is decoded against.
    pub fn new(codec: Arc<dyn TextCodec>, skip_special: bool, context: &[u32]) -> Self {
        let tail = &context[context.len().saturating_sub(CONTEXT_TOKENS)..];
        Self {
            codec,
            skip_special,
            ids: tail.to_vec(),
            prefix_offset: 0,
            read_offset: tail.len(),
        }
    }

    /// Adds one token and returns the text it completes (possibly empty while a character is
    /// still incomplete).
    pub fn push(&mut self, id: u32) -> Result<String, CodecError> {
        self.ids.push(id);
        let window = &self.ids[self.prefix_offset..];
        let prefix = self.codec.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = self.codec.decode(window, self.skip_special)?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let delta = match full.get(prefix.len()..) {
            Some(d) if full.starts_with(&prefix) => d.to_owned(),
            // The context re-tokenised differently: emit what is new by length, at a boundary.
            _ => {
                let mut cut = prefix.len().min(full.len());
                while !full.is_char_boundary(cut) {
                    cut += 1;
                }
                full[cut..].to_owned()
            }
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Keep the buffer short: only the window from prefix_offset is ever decoded.
        if self.prefix_offset > 64 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        Ok(delta)
    }
}

/// Finds stop strings in growing output and says how much text is safe to emit.
///
/// One Aho-Corasick automaton per request (leftmost-first: the earliest match wins, ties go to the
/// stop listed first). Each check searches only the text added since the last check plus the
/// `longest stop - 1` bytes before it that a stop could straddle, so the work per token is
/// bounded by the new text and the stop-length cap, not by the output or the number of stops.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    automaton: Option<AhoCorasick>,
    max_len: usize,
    include: bool,
}

impl StopMatcher {
    /// Fails only when the automaton would be too large (the API's caps keep it far below).
    pub fn new(stops: Vec<String>, include: bool) -> Result<Self, aho_corasick::BuildError> {
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        let automaton = if stops.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostFirst)
                    .build(&stops)?,
            )
        };
        Ok(Self {
            stops,
            automaton,
            max_len,
            include,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// After `text` grew from `prev_len` bytes: if a stop string now occurs, truncates `text`
    /// (keeping the stop string when `include`) and returns it.
    pub fn check(&self, text: &mut String, prev_len: usize) -> Option<String> {
        let automaton = self.automaton.as_ref()?;
        let mut start = prev_len
            .saturating_sub(self.max_len.saturating_sub(1))
            .min(text.len());
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        let m = automaton.find(&text[start..])?;
        let stop = self.stops.get(m.pattern().as_usize())?.clone();
        let pos = start + m.start();
        text.truncate(if self.include { pos + stop.len() } else { pos });
        Some(stop)
    }

    /// Bytes of `text` that can be emitted now: a trailing piece that could still become a stop
    /// string is held back (unless stop strings are kept in the output).
    pub fn safe_len(&self, text: &str) -> usize {
        if self.include || self.max_len == 0 {
            return text.len();
        }
        let mut end = text.len().saturating_sub(self.max_len - 1);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_truncate_and_hold_back() {
        let m = StopMatcher::new(vec!["END".into(), "\n\n".into()], false).unwrap();
        let mut text = String::from("hello E");
        assert_eq!(m.check(&mut text, 0), None);
        assert_eq!(m.safe_len(&text), 5);
        text.push_str("ND more");
        assert_eq!(m.check(&mut text, 7).as_deref(), Some("END"));
        assert_eq!(text, "hello ");
        let keep = StopMatcher::new(vec!["END".into()], true).unwrap();
        let mut text = String::from("aENDb");
        assert_eq!(keep.check(&mut text, 0).as_deref(), Some("END"));
        assert_eq!(text, "aEND");
        // Multi-byte text near the hold-back boundary stays on a char boundary.
        let m = StopMatcher::new(vec!["xyz".into()], false).unwrap();
        assert_eq!(m.safe_len("aé"), 1);
    }

    #[test]
    fn earliest_stop_wins_and_ties_go_to_the_first_listed() {
        let m = StopMatcher::new(vec!["bcd".into(), "ab".into(), "abc".into()], false).unwrap();
        let mut text = String::from("xxabcd");
        assert_eq!(m.check(&mut text, 0).as_deref(), Some("ab"));
        assert_eq!(text, "xx");
        // Only the new text and the straddle window are searched: a stop wholly inside text
        // checked before is not found again (it would have ended the request then).
        let m = StopMatcher::new(vec!["zz".into()], false).unwrap();
        let mut text = String::from("zz then more");
        assert_eq!(m.check(&mut text, 10), None);
        let mut text = String::from("abcz");
        assert_eq!(m.check(&mut text, 3), None);
        text.push('z');
        assert_eq!(m.check(&mut text, 4).as_deref(), Some("zz"));
        assert_eq!(text, "abc");
    }
}
