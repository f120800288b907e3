#!/usr/bin/env bash
# Same-run A/B of EPP binaries under `switchyard bench overhead`: the bench (this tree's release
# build) drives each EPP binary in turn, ROUNDS times, so both see the same machine and load.
# Compare the per-step "EPP N us CPU, M switches per request" figures (from /proc deltas) and
# their ratios, not absolute latencies, on a shared machine.
#
# Usage: scripts/ab-overhead.sh ROUNDS BIN... [-- overhead args]
#   e.g. scripts/ab-overhead.sh 3 /tmp/old-switchyard ./target/release/switchyard
# Default overhead args: --steps 1000 --large-steps 250 --step-duration 5s.
# Build the baseline from its commit in a separate worktree (`cargo build --release`) and copy
# the binary aside; record with scripts/record-bench.sh NAME -- scripts/ab-overhead.sh ...
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
rounds="${1:?usage: ab-overhead.sh ROUNDS BIN... [-- overhead args]}"
shift
bins=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do bins+=("$(realpath "$1")"); shift; done
[ "${1:-}" = "--" ] && shift
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--steps 1000 --large-steps 250 --step-duration 5s)
# shellcheck disable=SC1091
[ -f .cache/env.sh ] && . .cache/env.sh
for r in $(seq 1 "$rounds"); do
    for b in "${bins[@]}"; do
        echo "round $r, $b, load $(cut -d' ' -f1-3 /proc/loadavg)"
        ./target/release/switchyard bench overhead --no-write --switchyard-bin "$b" "${args[@]}" 2>&1 |
            grep -E 'req/s:|^Error' || true
    done
done
