#!/usr/bin/env bash
# The command a session with a GPU machine runs there, from the repository root:
#   bash benchmarks/gpu_check.sh [OUT_DIR]     (default: $OUT, else gpu-check-out)
# Before, here: pip download --no-deps --only-binary=:all: --python-version 3.12 \
#   --platform manylinux2014_x86_64 -d .whl gguf llguidance   (and carry .whl, which git ignores)
# It unpacks those wheels beside the machine's own packages (no pip install, no network) and runs
# benchmarks.gpu_check within 8 minutes, so a 10-minute command limit leaves room to copy results.
set -euo pipefail
out=${1:-${OUT:-gpu-check-out}}
site=/tmp/pyllm-site
mkdir -p "$site"
for wheel in .whl/*.whl; do python3 -m zipfile -e "$wheel" "$site"; done
PYTHONPATH="$site" PYTHONUNBUFFERED=1 timeout 480 python3 -m benchmarks.gpu_check --out "$out"
