"""Baseline for benches/cuda_decode.rs: batched greedy decode of Qwen2.5-7B shapes (random bf16
weights, context 512) through PyTorch + transformers, eager mode with SDPA attention and a KV
cache, on the same GPU. Prints the same `batch step_ms tok/s` table as the Rust benchmark so the
two can be put side by side (docs/cuda-backend.md). Needs torch + transformers; exits 0 with
`SKIPPED: <why>` otherwise.

    python3 benches/torch_decode.py [--quick]
"""

import sys
import time


def main() -> int:
    try:
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the machine
        print(f"SKIPPED: {e}")
        return 0
    if not torch.cuda.is_available():
        print("SKIPPED: torch sees no CUDA device")
        return 0
    quick = "--quick" in sys.argv
    steps = 8 if quick else 32
    ctx = 512
    cfg = Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        num_hidden_layers=28,
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).eval()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print(f"batched decode, Qwen2.5-7B shapes, context {ctx} (PyTorch + transformers, eager, sdpa)")
    print("batch  step_ms  tok/s")
    for batch in [1, 2, 4, 8, 16, 32, 64]:
        ids = torch.randint(0, 150_000, (batch, ctx), device="cuda")
        with torch.no_grad():
            out = model(ids, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(2):  # warm-up
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / steps
        print(f"{batch:5}  {dt * 1e3:7.2f}  {batch / dt:7.1f}", flush=True)
        del past, out
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
