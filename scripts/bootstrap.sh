#!/usr/bin/env bash
# Prepare this checkout for `make test` and `make demo`. Idempotent: a second run only checks.
#
#  1. Python venv in .venv (Python >= 3.11), the project installed editable with every extra and
#     the dev tooling (`pip install -e '.[operator,runtime,dev]' -e ./dev`); skipped while
#     pyproject.toml and dev/pyproject.toml are unchanged.
#  2. Debian tools: openssl (the cluster's certificates); for the real node runc,
#     containernetworking-plugins and iptables; for images buildah and mmdebstrap; and promtool
#     (alert-rule tests), extracted from Debian's `prometheus` package into the user cache, so no
#     Prometheus service is installed or started.
#  3. The cluster binaries (etcd, kube-apiserver, controller manager, scheduler, kubelet,
#     kube-proxy, containerd, crictl, kwok, helm), built from the Go module proxy into the user
#     cache by `diffusion-dev build`.
#  4. The images of the Dockerfile (`operator`, `runtime`), built with buildah on a local Debian
#     base by `diffusion-dev images --no-import` (cached by content hash).
#
# Environment: PYTHON (interpreter to create the venv with), DIFFUSION_OPERATOR_CACHE (the project's
# cache folder; default $XDG_CACHE_HOME/diffusion-operator: point it at an empty folder to replay a
# fresh machine while the pip, Go build and Go module caches stay warm),
# BOOTSTRAP_SKIP_GO=1 (skip steps 3 and 4), BOOTSTRAP_SKIP_IMAGES=1 (skip step 4),
# DIFFUSION_DEV_REAL_NODE=0 (fake nodes only: no node packages, no images),
# PIP_CACHE_DIR (pip's cache, reused across runs and by the image builds).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
# the project's cache folder: one definition, in dev/diffusion_dev/build.py (cache_home)
cache="${DIFFUSION_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/diffusion-operator}"
PROMETHEUS_DEB_VERSION_PREFIX="2."

t0=$(date +%s)
step() { printf '==> [bootstrap %4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else return 1
  fi
}

# ---------------------------------------------------------------- 1. Python
pick_python() {
  local candidates=("${PYTHON:-}" python3.11 python3.12 python3.13 python3)
  for py in "${candidates[@]}"; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  py="$(pick_python)" || die "Python >= 3.11 not found (set PYTHON=/path/to/python3.11)"
  step "creating $venv with $($py --version 2>&1)"
  if ! "$py" -m venv "$venv" 2>/dev/null; then
    step "python venv module missing: installing python3-venv"
    as_root apt-get update -qq && as_root apt-get install -y --no-install-recommends python3-venv \
      || die "cannot create a venv; install python3-venv"
    rm -rf "$venv"
    "$py" -m venv "$venv"
  fi
fi

stamp="$venv/.bootstrap-installed"
want="$(cat pyproject.toml dev/pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/diffusion-operator" ]; then
  step "python packages up to date (pyproject.toml unchanged)"
else
  step "pip install -e '.[operator,runtime,dev]' -e ./dev (first run downloads torch, ~3 GB; pip cache reused)"
  pip_start=$(date +%s)
  "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off \
    -e '.[operator,runtime,dev]' -e ./dev
  echo "$want" > "$stamp"
  step "python packages installed in $(( $(date +%s) - pip_start ))s"
fi

# ---------------------------------------------------------------- 2. Debian tools, promtool
# One table of host tools and their Debian packages: dev/diffusion_dev/hosttools.py.
# openssl (the local cluster's certificates) always; as root the image builds' tools (buildah,
# mmdebstrap: tests/cluster/test_fresh_cache.py builds the base image whatever the real node's switch)
# and, with the real node on, the node's (runc, CNI plugins, iptables, iproute2, mount).
real_node="${DIFFUSION_DEV_REAL_NODE:-}"
groups=(cluster)
if [ "$(id -u)" -eq 0 ]; then groups+=(images); fi
if [ "$real_node" != "0" ] && [ "$(id -u)" -eq 0 ]; then groups+=(node); fi
listed="$("$venv/bin/diffusion-dev" host-tools --missing "${groups[@]}")" \
  || die "cannot list the host tools (diffusion-dev host-tools)"
missing=()
[ -z "$listed" ] || mapfile -t missing <<< "$listed"
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing Debian packages: ${missing[*]}"
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get: install them"
  { as_root apt-get update -qq && as_root apt-get install -y --no-install-recommends "${missing[@]}"; } \
    || die "could not install ${missing[*]} (needs root or sudo)"
fi

promtool_dir="$cache/promtool"
if [ -n "${PROMTOOL:-}" ] && [ -x "${PROMTOOL}" ]; then
  step "promtool: using PROMTOOL=$PROMTOOL"
elif command -v promtool >/dev/null 2>&1; then
  step "promtool: using $(command -v promtool)"
elif [ -x "$promtool_dir/promtool" ]; then
  step "promtool: cached at $promtool_dir/promtool"
else
  step "promtool: extracting it from Debian's prometheus package into $promtool_dir"
  command -v apt-get >/dev/null 2>&1 || die "promtool missing and apt-get unavailable; set PROMTOOL=/path/to/promtool"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    as_root apt-get update -qq || die "apt-get update failed (needs root); set PROMTOOL=/path/to/promtool"
    (cd "$tmp" && apt-get download prometheus) || die "apt-get download prometheus failed"
  fi
  deb="$(find "$tmp" -maxdepth 1 -name 'prometheus_*.deb' | head -n1)"
  [ -n "$deb" ] || die "no prometheus .deb downloaded"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" ./usr/bin/promtool
  mkdir -p "$promtool_dir"
  install -m 0755 "$tmp/usr/bin/promtool" "$promtool_dir/promtool"
  rm -rf "$tmp"
  trap - EXIT
  version="$("$promtool_dir/promtool" --version 2>&1 | head -n1)"
  case "$version" in
    *"version $PROMETHEUS_DEB_VERSION_PREFIX"*) ;;
    *) die "unexpected promtool version: $version" ;;
  esac
  step "promtool: $version"
fi

# ---------------------------------------------------------------- 3. Go-built binaries
if [ "${BOOTSTRAP_SKIP_GO:-0}" = "1" ]; then
  step "control plane binaries: skipped (BOOTSTRAP_SKIP_GO=1)"
else
  command -v go >/dev/null 2>&1 || die "go not found on PATH (Go >= 1.26 is needed to build the control plane: Kubernetes 1.37 requires it)"
  images_pid=""
  if [ "$real_node" != "0" ] && [ "${BOOTSTRAP_SKIP_IMAGES:-0}" != "1" ] && [ "$(id -u)" -eq 0 ]; then
    # mostly downloads and disk writes: it overlaps well with the CPU-bound Go build
    images_log="$cache/images-bootstrap.log"
    mkdir -p "$cache"
    step "images: diffusion-dev images --no-import in the background (log $images_log)"
    images_start=$(date +%s)
    "$venv/bin/diffusion-dev" images --no-import > "$images_log" 2>&1 &
    images_pid=$!
  fi
  step "cluster binaries: diffusion-dev build (cold: tens of minutes; cached afterwards)"
  "$venv/bin/diffusion-dev" build
  if [ -n "$images_pid" ]; then
    if ! wait "$images_pid"; then
      tail -n 40 "$images_log" >&2
      die "diffusion-dev images failed (log $images_log)"
    fi
    sed 's/^/    /' "$images_log" | grep -v '^    \[images\]' || true
    step "images ready ($(( $(date +%s) - images_start ))s since they started)"
  fi
fi

step "done"
