#!/usr/bin/env bash
# On a GPU machine: every backend x dtype of the default models, validated on CUDA and CPU, one table.
# Usage: bash scripts/gpu_check.sh [MODEL,MODEL...]   (default bert-tiny,bert-base)
# Uses .venv when there is one, else the machine's python3 (which needs torch, onnx, onnxscript,
# onnxruntime-gpu and numpy).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" scripts/gpu_check.py "$@"
