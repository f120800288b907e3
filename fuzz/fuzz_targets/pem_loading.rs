#![no_main]
//! See `fuzz/checks/pem_loading.rs` (shared with the corpus replay in `tests/fuzz_corpus.rs`).

#[path = "../checks/pem_loading.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
