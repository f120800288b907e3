#!/usr/bin/env bash
# Fuzz smoke (docs/fuzzing.md): keeps the fuzz targets building and their invariants holding.
#
#   scripts/fuzz-smoke.sh            replay the committed corpus through the targets whose checks
#                                    live in fuzz/checks/ (plain `cargo test`, stable, seconds)
#   FUZZ_SECONDS=5 scripts/fuzz-smoke.sh --libfuzzer
#                                    build every target with cargo-fuzz and run each for
#                                    FUZZ_SECONDS (default 3) from its committed corpus, with the
#                                    per-input budgets below; needs `cargo install cargo-fuzz`
#                                    and ~20 min for the first instrumented build on 2 cores
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"

# Per-input budgets: a single input may take at most TIMEOUT seconds and RSS_MB of memory.
TIMEOUT="${FUZZ_TIMEOUT:-10}"
RSS_MB="${FUZZ_RSS_MB:-2048}"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-3}"

if [ "${1:-}" != "--libfuzzer" ]; then
    echo "fuzz smoke: corpus replay (tests/fuzz_corpus.rs); --libfuzzer runs the real targets"
    exec cargo test --test fuzz_corpus
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
    exit 1
fi
cd fuzz
# No nightly needed: RUSTC_BOOTSTRAP lets stable take the -Z flags cargo-fuzz passes.
RUSTC_BOOTSTRAP=1 cargo fuzz build --sanitizer none --codegen-units 16 --target-dir target
bin=target/x86_64-unknown-linux-gnu/release
for target in $(cargo fuzz list); do
    [ -d "corpus/$target" ] || { echo "no corpus for $target" >&2; exit 1; }
    work="work/smoke/$target"
    mkdir -p "$work" "artifacts/$target"
    echo "=== $target (${SECONDS_PER_TARGET}s)"
    # New inputs go to $work; the committed corpus is only read.
    "$bin/$target" "$work" "corpus/$target" -max_total_time="$SECONDS_PER_TARGET" \
        -timeout="$TIMEOUT" -rss_limit_mb="$RSS_MB" -malloc_limit_mb="$RSS_MB" \
        -artifact_prefix="artifacts/$target/" -print_final_stats=1 2>&1 | tail -n 3
done
