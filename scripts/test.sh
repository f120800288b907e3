#!/usr/bin/env bash
# The README's test command: installs what the tests need into ./.cache, then runs every check.
#   scripts/test.sh           everything (lint, unit + integration tests, chart checks)
#   SKIP_LINT=1 scripts/test.sh   skip fmt/clippy (local iteration)
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"

step() { printf '\n=== %s\n' "$*"; }

# A fresh checkout gains nothing from incremental state, and it doubles the target dir's size.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "test tools (Envoy, promtool, Qwen tokenizer) into .cache"
scripts/install-test-deps.sh
scripts/fetch-tokenizer.sh || echo "tokenizer fetch failed; tests that need it will say SKIPPED"
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

step "Helm charts and manifests"
scripts/check-charts.sh

step "all checks passed"
