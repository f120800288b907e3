//! Approximate codec for the `sim` backend when no tokenizer is given: 4 bytes of text per token.
//!
//! Encoding hashes each 4-byte chunk to an id below the special-token range, so equal text
//! prefixes give equal token prefixes (prefix caching behaves as with a real tokenizer) and the
//! token count is `ceil(bytes / 4)`. Decoding is not an inverse: each regular id becomes a
//! 4-character pseudo-word (`" " + 3 letters`), which is enough for stop strings and load tests.

use xxhash_rust::xxh64::xxh64;

use crate::serve::codec::{ChatMessage, CodecError, TextCodec};

/// Qwen2 special tokens (ids and text), kept so templates and EOS look like the real model's.
const SPECIALS: [(u32, &str); 3] = [
    (151_643, "<|endoftext|>"),
    (151_644, "<|im_start|>"),
    (151_645, "<|im_end|>"),
];

#[derive(Debug, Clone)]
pub struct ApproxCodec {
    regular_vocab: u32,
    eos: Vec<u32>,
}

impl ApproxCodec {
    /// Ids of regular tokens are `0 .. regular_vocab` (151643 for Qwen2).
    pub fn new(regular_vocab: u32) -> Self {
        Self {
            regular_vocab: regular_vocab.max(1),
            eos: vec![151_645, 151_643],
        }
    }
}

impl TextCodec for ApproxCodec {
    fn max_token_bytes(&self) -> usize {
        // Encoding takes 4 bytes per token; the specials are longer but never produced by it.
        4
    }

    fn encode(&self, text: &str, _add_special_tokens: bool) -> Result<Vec<u32>, CodecError> {
        Ok(text
            .as_bytes()
            .chunks(4)
            .map(|c| (xxh64(c, 0) % u64::from(self.regular_vocab)) as u32)
            .collect())
    }

    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, CodecError> {
        let mut s = String::with_capacity(ids.len() * 4);
        for &id in ids {
            if let Some((_, text)) = SPECIALS.iter().find(|(sid, _)| *sid == id) {
                if !skip_special_tokens {
                    s.push_str(text);
                }
                continue;
            }
            if id >= self.regular_vocab {
                continue; // unused id: nothing to show
            }
            s.push(' ');
            let mut v = id % (26 * 26 * 26);
            for _ in 0..3 {
                s.push(char::from(b'a' + (v % 26) as u8));
                v /= 26;
            }
        }
        Ok(s)
    }

    fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, CodecError> {
        let mut s = String::new();
        for m in messages {
            s.push_str("<|im_start|>");
            s.push_str(&m.role);
            s.push('\n');
            s.push_str(&m.content);
            s.push_str("<|im_end|>\n");
        }
        s.push_str("<|im_start|>assistant\n");
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_bytes_per_token_and_shared_prefixes() {
        let c = ApproxCodec::new(151_643);
        let a = c.encode("abcdefghij", false).unwrap();
        let b = c.encode("abcdefgh-xyz", false).unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        assert_eq!(
            c.decode(&[0, 1, 151_645], false).unwrap(),
            " aaa baa<|im_end|>"
        );
        assert_eq!(c.decode(&[151_645], true).unwrap(), "");
        let chat = c.render_chat(&[ChatMessage::text("user", "hi")]);
        assert_eq!(
            chat.unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
