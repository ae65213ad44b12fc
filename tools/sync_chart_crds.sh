#!/usr/bin/env bash
# Copy the CRDs (single source of truth: crds/) into the Helm chart's crds/ folder and into the operator
# package (operator/diffusion_operator/api/, which the operator applies at start: crd.py), byte for byte.
# tests/chart/test_chart_crds.py fails when a copy differs; run this after changing crds/.
#   tools/sync_chart_crds.sh          copy
#   tools/sync_chart_crds.sh --check  only compare; exit 1 when they differ
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/crds"
dst="$root/charts/diffusion-operator/crds"
pkg="$root/operator/diffusion_operator/api"

shopt -s nullglob
files=("$src"/*.yaml)
if [ "${#files[@]}" -eq 0 ]; then
  echo "sync_chart_crds: no CRD YAML in $src" >&2
  exit 1
fi

if [ "${1:-}" = "--check" ]; then
  status=0
  if ! diff -r "$src" "$dst" >/dev/null 2>&1; then
    echo "sync_chart_crds: charts/diffusion-operator/crds differs from crds/; run tools/sync_chart_crds.sh" >&2
    diff -r "$src" "$dst" >&2 || true
    status=1
  fi
  if [ -d "$pkg" ]; then
    for f in "${files[@]}"; do
      if ! cmp -s "$f" "$pkg/$(basename "$f")"; then
        echo "sync_chart_crds: operator/diffusion_operator/api/$(basename "$f") differs from crds/; run tools/sync_chart_crds.sh" >&2
        status=1
      fi
    done
  fi
  [ "$status" -eq 0 ] && echo "sync_chart_crds: chart and operator CRDs match crds/"
  exit "$status"
fi

mkdir -p "$dst"
# drop chart copies whose source is gone, then copy every source file
for old in "$dst"/*; do
  [ -e "$src/$(basename "$old")" ] || rm -f -- "$old"
done
for f in "${files[@]}"; do
  cp -- "$f" "$dst/"
  if [ -d "$pkg" ]; then cp -- "$f" "$pkg/"; fi
done
echo "sync_chart_crds: copied ${#files[@]} CRD file(s) into ${dst#"$root"/} and the operator package"
