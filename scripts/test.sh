#!/usr/bin/env bash
# The README's test command: installs what the tests need into ./.cache, then runs every check.
#   scripts/test.sh           everything (lint, unit + integration tests, chart checks)
#   SKIP_LINT=1 scripts/test.sh   skip fmt/clippy (local iteration)
#   SKIP_IMAGES=1 scripts/test.sh skip building and starting the container images
#   CI=true scripts/test.sh       every test dependency is required: a missing one (Envoy,
#                                 promtool, NVRTC, the Qwen tokenizer, the GGUF model) fails the run naming it,
#                                 and a test that would skip for it panics instead. Only tests
#                                 that need a GPU still skip, printing `SKIPPED: <why>`.
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"

step() { printf '\n=== %s\n' "$*"; }

# A fresh checkout gains nothing from incremental state, and it doubles the target dir's size.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "test tools (Envoy, promtool, Qwen tokenizer, GGUF model) into .cache"
in_ci() { [ "${CI:-}" = "true" ] || [ "${CI:-}" = "1" ]; }
scripts/install-test-deps.sh
if ! scripts/fetch-tokenizer.sh; then
    if in_ci; then
        echo "ERROR: the Qwen tokenizer (scripts/fetch-tokenizer.sh) is missing; CI=true requires it" >&2
        exit 1
    fi
    echo "tokenizer fetch failed; tests that need it will say SKIPPED"
fi
# Qwen2.5-Coder-0.5B-Instruct GGUF (491 MB, cached): the real model of tests/gguf_model.rs.
if ! scripts/fetch-model.sh; then
    if in_ci; then
        echo "ERROR: the GGUF model (scripts/fetch-model.sh) is missing; CI=true requires it" >&2
        exit 1
    fi
    echo "model fetch failed; tests that need it will say SKIPPED"
fi
# shellcheck disable=SC1091
[ -f .cache/env.sh ] && . .cache/env.sh

if [ -z "${SKIP_LINT:-}" ]; then
    step "cargo fmt --check"
    cargo fmt --all -- --check
    step "cargo clippy -D warnings"
    cargo clippy --all-targets -- -D warnings
fi

step "cargo test (unit, integration, real Envoy)"
cargo build --bins
cargo test --no-fail-fast

step "GGUF model vs llama.cpp's greedy tokens (optimised build; a debug build skips it)"
cargo test --release --test gguf_model

step "fuzz smoke (corpus replay; FUZZ_LIBFUZZER=1 runs each libFuzzer target for a few seconds)"
if [ -n "${FUZZ_LIBFUZZER:-}" ]; then
    scripts/fuzz-smoke.sh --libfuzzer
else
    scripts/fuzz-smoke.sh
fi

step "Helm charts and manifests"
scripts/check-charts.sh

if [ -z "${SKIP_IMAGES:-}" ]; then
    step "container images (buildah; built, unpacked and started; cached in ~/.cache/switchyard-images)"
    SWITCHYARD_BIN="$PWD/target/debug/switchyard" scripts/check-images.sh
fi

step "all checks passed"
