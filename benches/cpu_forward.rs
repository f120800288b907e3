//! CPU backend forward throughput (prefill and decode tokens/s) on a small random Qwen2 model:
//! hidden 512, 8 layers, 8 heads / 2 KV heads (head 64), MLP 1408, vocab 8192, block size 16.
//!
//! Run: `cargo bench --bench cpu_forward` (add `-- --quick` for a short run). Threads default to
//! the available cores; set `CPU_FORWARD_THREADS` to pin the count.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchyard::serve::backend::cpu::{CpuBackend, CpuOptions};
use switchyard::serve::backend::{Backend, SeqSlice, StepBatch, StepOutput};
use switchyard::serve::model::testing::{tiny_qwen2_in_memory, TinyQwen2};

const BLOCK: usize = 16;

fn model() -> CpuBackend {
    let spec = TinyQwen2 {
        seed: 42,
        layers: 8,
        hidden: 512,
        heads: 8,
        kv_heads: 2,
        intermediate: 1408,
        vocab: 8192,
        max_position_embeddings: 4096,
        ..TinyQwen2::default()
    };
    let (cfg, weights) = tiny_qwen2_in_memory(&spec).unwrap();
    let threads = std::env::var("CPU_FORWARD_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut be = CpuBackend::new(
        cfg,
        weights,
        CpuOptions {
            block_size: BLOCK,
            kv_cache_memory_bytes: 1 << 30,
            threads,
        },
    )
    .unwrap();
    be.init_kv(1024).unwrap();
    be
}

/// `seqs` sequences, each adding `new` tokens after `context` cached ones, in disjoint blocks;
/// logits for each sequence's last token.
fn batch(seqs: usize, context: usize, new: usize) -> StepBatch {
    let per_seq = (context + new).div_ceil(BLOCK);
    let mut b = StepBatch::default();
    for s in 0..seqs {
        let table: Vec<u32> = (0..per_seq).map(|i| (s * per_seq + i) as u32).collect();
        let start = b.token_ids.len();
        for j in 0..new {
            let abs = context + j;
            b.token_ids.push(((s * 131 + abs * 7) % 8000) as u32);
            b.positions.push(abs as u32);
            b.slot_mapping
                .push(table[abs / BLOCK] * BLOCK as u32 + (abs % BLOCK) as u32);
        }
        b.logits_rows.push(start + new - 1);
        b.seqs.push(SeqSlice {
            query_start: start,
            query_len: new,
            context_len: context,
        });
        b.block_tables.push(table);
    }
    b
}

fn bench(c: &mut Criterion) {
    let mut be = model();
    let mut out = StepOutput::default();
    // Fill the caches the decode cases read (contents only affect values, not cost).
    be.execute(&batch(16, 0, 512), &mut out).unwrap();

    let mut g = c.benchmark_group("cpu_forward");
    g.sample_size(10);
    for (name, seqs, context, new) in [
        ("prefill", 1, 0, 128),
        ("prefill", 1, 0, 512),
        ("decode_ctx512", 1, 511, 1),
        ("decode_ctx512", 8, 511, 1),
        ("decode_ctx512", 16, 511, 1),
    ] {
        let b = batch(seqs, context, new);
        g.throughput(Throughput::Elements((seqs * new) as u64));
        let id = BenchmarkId::new(name, format!("{seqs}x{new}"));
        g.bench_function(id, |bench| bench.iter(|| be.execute(&b, &mut out).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
