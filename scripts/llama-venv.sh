#!/usr/bin/env bash
# Builds the llama.cpp oracle (PyPI `llama-cpp-python`, which compiles llama.cpp from source) into
# the ignored cache `<repo>/.cache/llama-venv`, keyed by version: a venv whose marker file names a
# different version is rebuilt. Used by the GGUF oracle test (greedy tokens vs llama.cpp) and by
# scripts/bench-gguf.sh. The build takes tens of minutes on 2 cores; it compiles with one job unless
# CMAKE_BUILD_PARALLEL_LEVEL says otherwise, so it can run in the background beside other work.
#
# Usage: scripts/llama-venv.sh     (prints the venv's python on success)
# Environment: LLAMA_CPP_PYTHON_VERSION (default 0.3.16), PYTHON (default python3).
set -euo pipefail

root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null || (cd "$(dirname "$0")/.." && pwd))"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.16}"
venv="$root/.cache/llama-venv"
python="${PYTHON:-python3}"
log() { printf 'llama-venv: %s\n' "$*" >&2; }

if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.version" 2>/dev/null)" = "$version" ] &&
    "$venv/bin/python" -c 'import llama_cpp' >/dev/null 2>&1; then
    echo "$venv/bin/python"
    exit 0
fi

log "building llama-cpp-python==$version into $venv (compiles llama.cpp; slow)"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# CPU only, native ISA (the oracle runs on this machine), no multimodal or server extras.
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-1}" \
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF}" \
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-cache-dir \
    "llama-cpp-python==$version"
"$venv/bin/python" -c 'import llama_cpp' || { log "llama_cpp does not import"; exit 1; }
echo "$version" >"$venv/.version"
log "ready: $venv/bin/python"
echo "$venv/bin/python"
