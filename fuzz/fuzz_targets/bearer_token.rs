#![no_main]
//! See `fuzz/checks/bearer_token.rs` (shared with the corpus replay in `tests/fuzz_corpus.rs`).

#[path = "../checks/bearer_token.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
