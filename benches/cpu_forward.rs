//! CPU backend forward throughput (prefill and decode tokens/s) on a small random Qwen2 model.

fn main() {}
