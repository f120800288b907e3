#![no_main]
//! See `fuzz/checks/kv_events.rs` (shared with the corpus replay in `tests/fuzz_corpus.rs`).

#[path = "../checks/kv_events.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
