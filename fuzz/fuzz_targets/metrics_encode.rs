#![no_main]
//! See `fuzz/checks/metrics_encode.rs` (shared with the corpus replay in `tests/fuzz_corpus.rs`).

#[path = "../checks/metrics_encode.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
