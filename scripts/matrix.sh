#!/usr/bin/env bash
# The README's compatibility matrix: every backend x dtype of each model (default: bert-tiny minilm-l6),
# validated on every runtime --providers auto finds here. Artifacts and the full report go to
# artifacts/matrix/; the matrix is printed. Exit code: qkv-validate's.
set -euo pipefail
cd "$(dirname "$0")/.."
out=artifacts/matrix
for model in ${*:-bert-tiny minilm-l6}; do
  .venv/bin/qkv-export --model "$model" --backend all --dtype all --out "$out" >/dev/null
done
.venv/bin/qkv-validate "$out"/*-*-* --matrix --report "$out/report.md" --json "$out/report.json"
