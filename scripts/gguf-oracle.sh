#!/usr/bin/env bash
# Records llama.cpp's greedy tokens for the fixed GGUF prompt set (tests/fixtures/gguf_prompts.json)
# into tests/fixtures/gguf_llama_greedy.json, which tests/gguf_model.rs compares Switchyard's
# CPU backend against. Needs the model (scripts/fetch-model.sh) and the llama.cpp venv
# (scripts/llama-venv.sh, built on first use).
#
# Usage: scripts/gguf-oracle.sh [OUT]     (default: tests/fixtures/gguf_llama_greedy.json)
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
out="${1:-tests/fixtures/gguf_llama_greedy.json}"
model="$(scripts/fetch-model.sh)"
python="$(scripts/llama-venv.sh)"
"$python" - "$model" <<'PY' >"$out.tmp"
import json, subprocess, sys
spec = json.load(open("tests/fixtures/gguf_prompts.json"))
req = {"model": sys.argv[1], "threads": 2, "cases": [
    dict(c, max_new=spec["max_new"], stop=spec["stop"]) for c in spec["cases"]]}
res = subprocess.run([sys.executable, "scripts/llama-oracle.py"], input=json.dumps(req),
                     capture_output=True, text=True, check=True)
out = json.loads(res.stdout)
# Timings vary run to run; the fixture keeps what the test compares.
for c in out["cases"]:
    del c["prefill_s"], c["decode_s"]
json.dump(out, sys.stdout, indent=1)
print()
PY
mv "$out.tmp" "$out"
echo "wrote $out" >&2
