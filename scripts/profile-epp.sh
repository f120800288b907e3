#!/usr/bin/env bash
# Samples the EPP's CPU while `switchyard bench overhead` drives it, then sorts the samples into
# the categories of docs/benchmarks.md ("Where an EPP request's CPU goes").
#
# Usage: scripts/profile-epp.sh NAME [bench overhead args...]
#   e.g. scripts/profile-epp.sh small --steps 1000 --large-steps 1 --step-duration 15s
# Needs a release build with line tables for readable stacks:
#   CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release --bin switchyard
# and `perf` (Debian linux-perf; the software event cpu-clock works where hardware counters
# do not, as on this project's VMs). Writes /tmp/profile-NAME.data (not committed).
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
name="${1:?usage: profile-epp.sh NAME [overhead args...]}"
shift
# shellcheck disable=SC1091
[ -f .cache/env.sh ] && . .cache/env.sh
./target/release/switchyard bench overhead --no-write --allow-dirty "$@" >"/tmp/profile-$name.out" 2>&1 &
bench=$!
pid=""
for _ in $(seq 1 100); do
    pid="$(pgrep -n -f "switchyard epp" || true)"
    [ -n "$pid" ] && break
    sleep 0.2
done
[ -n "$pid" ] || { echo "profile-epp: the EPP never started" >&2; exit 1; }
perf record -e cpu-clock -F 499 -g --call-graph dwarf,32768 -p "$pid" -o "/tmp/profile-$name.data" 2>/dev/null &
perf_pid=$!
wait "$bench"
kill -INT "$perf_pid" 2>/dev/null || true
wait "$perf_pid" || true
tail -4 "/tmp/profile-$name.out"
python3 scripts/perf-categories.py "/tmp/profile-$name.data"
