//! Token usage from model-server responses: a buffered JSON body, or the `data:` lines of an SSE
//! stream (the first line that carries usage wins).

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<RawUsage>,
    /// Responses API streams wrap usage in `response`.
    #[serde(default)]
    response: Option<Box<WithUsage>>,
}

#[derive(Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    #[serde(default)]
    input_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl WithUsage {
    fn into_usage(self) -> Option<Usage> {
        if let Some(u) = self.usage {
            return Some(Usage {
                prompt_tokens: u.prompt_tokens.or(u.input_tokens).unwrap_or(0),
                completion_tokens: u.completion_tokens.or(u.output_tokens).unwrap_or(0),
                cached_tokens: u
                    .prompt_tokens_details
                    .or(u.input_tokens_details)
                    .and_then(|d| d.cached_tokens),
            });
        }
        self.response.and_then(|r| r.into_usage())
    }
}

/// Usage of a complete JSON response body; `None` for invalid JSON or no usage.
pub fn from_json(body: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<WithUsage>(body).ok()?.into_usage()
}

/// Incremental SSE scanner. Lines may be split across chunks; the unfinished tail is carried
/// over, capped so a stream without newlines cannot grow it without bound.
#[derive(Debug, Default)]
pub struct SseUsageScanner {
    partial: Vec<u8>,
    found: Option<Usage>,
}

const MAX_SSE_LINE: usize = 1 << 20;

impl SseUsageScanner {
    pub fn found(&self) -> Option<Usage> {
        self.found
    }

    /// Feeds one chunk; returns usage the first time it is seen.
    pub fn feed(&mut self, chunk: &[u8]) -> Option<Usage> {
        if self.found.is_some() {
            return None;
        }
        let mut rest = chunk;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(pos);
            rest = &tail[1..];
            let usage = if self.partial.is_empty() {
                scan_line(line)
            } else {
                self.partial.extend_from_slice(line);
                let line = std::mem::take(&mut self.partial);
                scan_line(&line)
            };
            if usage.is_some() {
                self.found = usage;
                self.partial.clear();
                return usage;
            }
        }
        if self.partial.len() + rest.len() <= MAX_SSE_LINE {
            self.partial.extend_from_slice(rest);
        } else {
            self.partial.clear();
        }
        None
    }
}

fn scan_line(line: &[u8]) -> Option<Usage> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let data = line.strip_prefix(b"data:")?;
    let data = data.strip_prefix(b" ").unwrap_or(data);
    // Cheap pre-check: most chunks carry no usage.
    if !contains(data, b"\"usage\"") {
        return None;
    }
    from_json(data)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage_chat_and_responses_api() {
        let chat = br#"{"id":"x","usage":{"prompt_tokens":11,"completion_tokens":5,"total_tokens":16,"prompt_tokens_details":{"cached_tokens":8}}}"#;
        assert_eq!(
            from_json(chat),
            Some(Usage {
                prompt_tokens: 11,
                completion_tokens: 5,
                cached_tokens: Some(8)
            })
        );
        let responses = br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#;
        assert_eq!(
            from_json(responses),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                cached_tokens: None
            })
        );
        assert_eq!(from_json(b"not json"), None);
        assert_eq!(from_json(br#"{"usage":null}"#), None);
    }

    #[test]
    fn sse_usage_split_across_chunks_first_wins() {
        let mut s = SseUsageScanner::default();
        assert_eq!(s.feed(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n"), None);
        assert_eq!(
            s.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_to"),
            None
        );
        let got = s.feed(b"kens\":7,\"completion_tokens\":2}}\n\ndata: {\"usage\":{\"prompt_tokens\":99}}\n\ndata: [DONE]\n\n");
        assert_eq!(
            got,
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 2,
                cached_tokens: None
            })
        );
        assert_eq!(s.found().map(|u| u.prompt_tokens), Some(7));
        assert_eq!(s.feed(b"data: {\"usage\":{\"prompt_tokens\":1}}\n"), None);
    }

    #[test]
    fn sse_partial_line_is_bounded() {
        let mut s = SseUsageScanner::default();
        let big = vec![b'x'; MAX_SSE_LINE];
        s.feed(&big);
        s.feed(&big);
        assert!(s.partial.len() <= MAX_SSE_LINE);
    }
}
