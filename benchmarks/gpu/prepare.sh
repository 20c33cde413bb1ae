#!/usr/bin/env bash
# Download, as wheels for the GPU machine's Python (CPython 3.12, manylinux x86_64), exactly the packages this
# project needs that the GPU image lacks (its package list: the device tool's KINDS.md), into a git-ignored folder
# that the device call carries.   Usage:  bash benchmarks/gpu/prepare.sh [WHEEL_DIR]
#
# Already in the image (not carried): torch, torchvision, transformers, huggingface-hub, safetensors, accelerate,
# peft, timm, numpy, scipy, scikit-image, imageio, matplotlib, tqdm, rich, regex, pyyaml, pillow, requests,
# filelock, packaging, psutil, pytest, pytest-timeout, pytest-xdist, cloudpickle, torchmetrics.
# Left out on purpose (too large for the 64 MiB that travels): imageio-ffmpeg (68 MB; mp4 export only), wandb
# (20 MB + deps; logger=wandb only) and moviepy (needs imageio-ffmpeg). Tests that need them fail there with
# "No module named ..." and check.sh counts those apart from real failures.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${1:-$ROOT/benchmarks/gpu/wheels}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p "$DEST"
rm -f "$DEST"/*.whl

# the packages; their versions come from the lock (constraints.txt: what the tests passed with on the CPU machines)
LOCK="$ROOT/constraints.txt"
pinned() {  # name==version of $1 in the lock, names compared in PEP 503 form (Open_Clip-torch == open-clip-torch)
  local want name line
  want=$(printf %s "$1" | tr 'A-Z_.' 'a-z--')
  while IFS= read -r line; do
    case "$line" in '' | '#'*) continue ;; esac
    name=${line%%==*}
    if [ "$(printf %s "$name" | tr 'A-Z_.' 'a-z--')" = "$want" ]; then
      echo "$1==${line#*==}"
      return 0
    fi
  done <"$LOCK"
  echo "prepare.sh: $1 is not in $LOCK (add it to pyproject.toml and run scripts/update-lock)" >&2
  return 1
}
BINARY=()
for name in diffusers hydra-core omegaconf open-clip-torch ftfy wcwidth importlib-metadata trimesh PyMCubes submitit \
  hydra-submitit-launcher; do
  BINARY+=("$(pinned "$name")") || exit 1
done
# sdists with no wheel on the index: pure Python, built into wheels here
SOURCE=("$(pinned antlr4-python3-runtime)") || exit 1

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$DEST" "${BINARY[@]}" 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$DEST" "${SOURCE[@]}" 2>&1 | grep -v "^WARNING: Location" || true

n_expected=$(( ${#BINARY[@]} + ${#SOURCE[@]} ))
n=$(ls "$DEST"/*.whl | wc -l)
echo "wheels in $DEST (for CPython 3.12, manylinux x86_64):"
ls -l "$DEST"/*.whl | awk '{printf "  %8.1f KiB  %s\n", $5 / 1024, $NF}' | sed "s|$DEST/||"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $n wheels, $(awk -v b="$total" 'BEGIN {printf "%.2f MiB", b / 1048576}')"
if [ "$n" -ne "$n_expected" ]; then
  echo "error: expected $n_expected wheels, got $n (a download failed: see above)" >&2
  exit 1
fi
if [ "$total" -gt $((60 * 1048576)) ]; then
  echo "error: the wheels take more than 60 MiB; the device call carries at most 64 MiB with the working tree" >&2
  exit 1
fi
