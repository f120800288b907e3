#!/usr/bin/env bash
# Builds Switchyard's container images without a Docker engine: buildah with vfs storage and
# chroot isolation (works as root on a plain VM or CI runner), Containerfiles in deploy/images/.
#
#   <registry>/switchyard:<tag>       FROM scratch: the binary + the glibc libraries it links, uid 65532
#   <registry>/sandbox-runtime:<tag>  `switchyard sandbox` over a Debian bookworm root with Python 3
#                                     (mmdebstrap), uid 1000, workspace /app
#   <registry>/code-agent:<tag>       the switchyard image running `switchyard agent serve`
#   <registry>/switchyard-cuda:<tag>  only with --cuda (needs the NVIDIA CUDA base image from nvcr.io)
#
# Usage: scripts/build-images.sh [--binary PATH] [--registry REG] [--tag TAG] [--push] [--cuda]
#   --binary    the switchyard binary to package (default target/release/switchyard; build it
#               with `cargo build --release`). Debug info is stripped from the packaged copy.
#   --registry  default ghcr.io/switchyard (the charts' default); --tag default: Cargo.toml version
#   --push      push each image with `buildah push` (log in first: `buildah login ghcr.io`)
#
# Cache, outside the clone: ${SWITCHYARD_IMAGE_CACHE:-$HOME/.cache/switchyard-images}
#   rootfs-<key>.tar   the Debian root (slow: ~3 min), keyed by suite + package list + this
#                      script's recipe version; reused until those change
#   storage/, run/     buildah's vfs storage
#   <image>.inputs     hash of an image's inputs (Containerfile, binary, rootfs, this script); an image whose
#                      inputs did not change is not rebuilt
set -euo pipefail

ROOT="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
CACHE="${SWITCHYARD_IMAGE_CACHE:-$HOME/.cache/switchyard-images}"
REGISTRY="ghcr.io/switchyard"
TAG="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1)"
BINARY="$ROOT/target/release/switchyard"
PUSH=0
CUDA=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --binary) BINARY="$2"; shift 2 ;;
    --registry) REGISTRY="$2"; shift 2 ;;
    --tag) TAG="$2"; shift 2 ;;
    --push) PUSH=1; shift ;;
    --cuda) CUDA=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

log() { printf '[build-images] %s\n' "$*" >&2; }
die() { printf '[build-images] ERROR: %s\n' "$*" >&2; exit 1; }

command -v buildah >/dev/null || die "buildah not found (Debian: apt-get install buildah)"
[[ -x "$BINARY" ]] || die "no binary at $BINARY (cargo build --release, or pass --binary)"
mkdir -p "$CACHE"
BUILDAH=(buildah --root "$CACHE/storage" --runroot "$CACHE/run" --storage-driver vfs)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- the packaged binary (stripped copy) -----------------------------------------------------
cp "$BINARY" "$work/switchyard"
objcopy --strip-debug "$work/switchyard" 2>/dev/null || true
chmod 0755 "$work/switchyard"

# --- Debian root with Python for the sandbox image (cached) -----------------------------------
SUITE=bookworm
PACKAGES="python3-minimal,libpython3.11-stdlib,ca-certificates"
RECIPE=1
rootfs_key="$(printf '%s|%s|%s' "$SUITE" "$PACKAGES" "$RECIPE" | sha256sum | cut -c1-16)"
ROOTFS="$CACHE/rootfs-$rootfs_key.tar"
if [[ ! -s "$ROOTFS" ]]; then
  command -v mmdebstrap >/dev/null || die "mmdebstrap not found (Debian: apt-get install mmdebstrap)"
  log "building the Debian $SUITE root with Python (mmdebstrap, cached as $ROOTFS)"
  mmdebstrap --quiet --variant=essential --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='mkdir -p "$1/app" && chown 1000:1000 "$1/app"' \
    --customize-hook='echo "sandbox:x:1000:1000:sandbox:/app:/usr/sbin/nologin" >> "$1/etc/passwd"' \
    --customize-hook='echo "sandbox:x:1000:" >> "$1/etc/group"' \
    "$SUITE" "$ROOTFS.partial.tar" http://deb.debian.org/debian
  mv "$ROOTFS.partial.tar" "$ROOTFS"
fi

# --- build contexts ----------------------------------------------------------------------------
# switchyard: the binary, the libraries it links, a passwd with the non-root user, /tmp, CA roots.
sy="$work/switchyard-ctx"
mkdir -p "$sy/rootfs/usr/local/bin" "$sy/rootfs/etc/ssl/certs" "$sy/rootfs/tmp"
cp "$work/switchyard" "$sy/rootfs/usr/local/bin/switchyard"
while read -r lib; do
  [[ -n "$lib" ]] || continue
  mkdir -p "$sy/rootfs$(dirname "$lib")"
  cp -L "$lib" "$sy/rootfs$lib"
done < <(ldd "$work/switchyard" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/tmp:/sbin/nologin\n' >"$sy/rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$sy/rootfs/etc/group"
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
  cp /etc/ssl/certs/ca-certificates.crt "$sy/rootfs/etc/ssl/certs/"
fi
chmod 1777 "$sy/rootfs/tmp"
cp "$ROOT/deploy/images/switchyard.Containerfile" "$sy/Containerfile"

sb="$work/sandbox-ctx"
mkdir -p "$sb"
ln "$ROOTFS" "$sb/rootfs.tar" 2>/dev/null || cp "$ROOTFS" "$sb/rootfs.tar"
cp "$work/switchyard" "$sb/switchyard"
cp "$ROOT/deploy/images/sandbox.Containerfile" "$sb/Containerfile"

ag="$work/agent-ctx"
mkdir -p "$ag"
cp "$ROOT/deploy/images/agent.Containerfile" "$ag/Containerfile"

# --- build (skipped when the inputs are unchanged and the image exists) -------------------------
bin_hash="$(sha256sum "$work/switchyard" | cut -c1-64)"
# The recipe (this script) is an input too: it stages the contexts.
bin_hash="$bin_hash-$(sha256sum "$0" | cut -c1-16)"
build() { # name context [extra bud args...]
  local name="$1" ctx="$2"; shift 2
  local ref="$REGISTRY/$name:$TAG"
  local inputs
  inputs="$(printf '%s|%s|%s|%s|%s' "$ref" "$(sha256sum "$ctx/Containerfile" | cut -c1-64)" \
    "$bin_hash" "$rootfs_key" "$*" | sha256sum | cut -c1-64)"
  if [[ "$(cat "$CACHE/$name.inputs" 2>/dev/null)" == "$inputs" ]] \
      && "${BUILDAH[@]}" inspect --type image "$ref" >/dev/null 2>&1; then
    log "$ref is up to date"
  else
    log "building $ref"
    local start=$SECONDS
    "${BUILDAH[@]}" rmi -f "$ref" >/dev/null 2>&1 || true
    "${BUILDAH[@]}" bud --quiet --isolation chroot --pull=false --layers=false \
      -f "$ctx/Containerfile" -t "$ref" "$@" "$ctx" >/dev/null
    echo "$inputs" >"$CACHE/$name.inputs"
    log "built $ref in $((SECONDS - start)) s"
  fi
  if [[ $PUSH -eq 1 ]]; then
    log "pushing $ref"
    "${BUILDAH[@]}" push "$ref" "docker://$ref"
  fi
}
build switchyard "$sy"
build sandbox-runtime "$sb"
build code-agent "$ag" --build-arg "BASE=$REGISTRY/switchyard:$TAG"
if [[ $CUDA -eq 1 ]]; then
  cu="$work/cuda-ctx"
  mkdir -p "$cu"
  cp "$work/switchyard" "$cu/switchyard"
  cp "$ROOT/deploy/images/switchyard-cuda.Containerfile" "$cu/Containerfile"
  build switchyard-cuda "$cu"
fi
# Dangling layers of replaced images.
"${BUILDAH[@]}" rmi --prune >/dev/null 2>&1 || true
echo "images: $REGISTRY/{switchyard,sandbox-runtime,code-agent}:$TAG (storage $CACHE/storage)"
