#![no_main]
//! See `fuzz/checks/scraper_http.rs` (shared with the corpus replay in `tests/fuzz_corpus.rs`).

#[path = "../checks/scraper_http.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
