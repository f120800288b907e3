#!/usr/bin/env bash
# Runs a `cargo bench` target and records its output in benches/results/<name>.txt with the
# machine, the load average, the commit and the command, like `switchyard bench` does for its
# own results: a tree with uncommitted changes (outside benches/results/) is refused unless
# --allow-dirty, and then the file says so. The commit is recorded bare.
#
# Usage: scripts/record-bench.sh [--allow-dirty] NAME -- cargo bench --bench NAME [args...]
#   e.g. scripts/record-bench.sh scheduling -- nice -n 5 cargo bench --bench scheduling
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"

allow_dirty=0
if [ "${1:-}" = "--allow-dirty" ]; then allow_dirty=1; shift; fi
name="${1:?usage: record-bench.sh [--allow-dirty] NAME -- COMMAND...}"
shift
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "record-bench: no command given" >&2; exit 2; }

commit="$(git rev-parse --short=12 HEAD)"
dirty="$(git status --porcelain --untracked-files=no -- . ':(exclude)benches/results')"
note="$commit"
if [ -n "$dirty" ]; then
    if [ $allow_dirty -eq 0 ]; then
        echo "record-bench: refusing to record results from a tree with uncommitted changes (commit $commit); commit first or pass --allow-dirty" >&2
        exit 1
    fi
    note="$commit with uncommitted changes (written with --allow-dirty: not reproducible from the commit)"
fi

out="benches/results/$name.txt"
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
{
    echo "# $name"
    echo "- machine: $cpu ($(nproc) cores), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- commit: $note"
    echo "- command: \`scripts/record-bench.sh $name -- $*\`"
    echo
} >"$tmp"
"$@" 2>&1 | grep -v -e '^\s*Compiling ' -e '^\s*Finished ' -e '^\s*Running ' -e '^Gnuplot not found' | tee -a "$tmp"
echo "- load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "record-bench: wrote $out"
