//! `Authorization` header parsing and the metrics-auth cache key.
//!
//! Input: the header value (lossy UTF-8).

use switchyard::epp::metrics_auth::{bearer_token, digest, MAX_TOKEN_BYTES};

pub fn run(data: &[u8]) {
    let header = String::from_utf8_lossy(data);
    let Some(token) = bearer_token(Some(&header)) else {
        return;
    };
    assert!(!token.is_empty());
    assert_eq!(token, token.trim(), "token keeps surrounding whitespace");
    assert!(header.contains(token));
    let scheme = header.trim_start().get(..6).unwrap_or_default();
    assert!(scheme.eq_ignore_ascii_case("bearer"), "{header:?}");
    // The key is a fixed-size digest however long the token (the cache never stores tokens).
    let key = digest(token);
    assert_eq!(key, digest(token));
    if token.len() > MAX_TOKEN_BYTES {
        // Refused before any review; nothing else to check.
    }
}
