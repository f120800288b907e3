#![no_main]
//! See `fuzz/checks/kube_objects.rs` (shared with the corpus replay in `tests/fuzz_corpus.rs`).

#[path = "../checks/kube_objects.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
