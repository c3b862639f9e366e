#!/usr/bin/env bash
# Export every registry model on every backend (float32; float16 and int8 for a few) with two installations
# and require the same bytes of every file (model.onnx, model.onnx.data, weights.npz, the manifest, the golden
# data): how a refactor proves it left every existing export as it was. A file only one side writes is named
# (ONLY OLD / ONLY NEW) and counts as a difference. Usage: bash scripts/same_bytes.sh OLD_CHECKOUT [MODEL ...]
# (OLD_CHECKOUT: a checkout with its own .venv, e.g. `git worktree add /tmp/base main` + scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
old="$1"
shift
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
    mapfile -t models < <(.venv/bin/python -c "from qkv_onnx.model_defs.registry import MODELS
print('\n'.join(m for m in MODELS if m not in ('bert-large', 'gpt2-small', 'llama-100m')))")
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cells=()
for m in "${models[@]}"; do
    for b in onnx-attention ort-contrib decomposed; do cells+=("$m $b float32"); done
done
cells+=("bert-tiny onnx-attention float16" "llama-tiny ort-contrib float16" "bert-tiny ort-contrib int8"
    "gpt2-tiny onnx-attention int8")
differ=0
for cell in "${cells[@]}"; do
    read -r m b d <<<"$cell"
    for side in old new; do
        root=$([ "$side" = old ] && echo "$old" || echo .)
        "$root/.venv/bin/qkv-export" --model "$m" --backend "$b" --dtype "$d" --out "$work/$side/a" >/dev/null 2>&1
    done
    while read -r f; do
        if [ ! -e "$work/new/a/$f" ]; then
            echo "ONLY OLD: $m $b $d $f"
            differ=1
        elif [ ! -e "$work/old/a/$f" ]; then
            echo "ONLY NEW: $m $b $d $f"
            differ=1
        elif ! cmp -s "$work/old/a/$f" "$work/new/a/$f"; then
            echo "DIFFERENT: $m $b $d $f"
            differ=1
        fi
    done < <(cd "$work" && find old/a new/a -type f | cut -d/ -f3- | sort -u)
    echo "checked: $m $b $d"
    rm -rf "$work/old" "$work/new"
done
exit "$differ"
