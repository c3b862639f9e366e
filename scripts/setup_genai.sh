#!/usr/bin/env bash
# Create .venv-genai: onnxruntime-genai for `qkv-bench decoder` (its model builder and its runtime), apart from
# .venv. Its wheel pulls the `onnxruntime` package, the same Python module as .venv's onnxruntime-gpu: the two
# never share an environment. The builder imports torch and transformers; torch is pinned as in setup.sh (an
# open range would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-genai/bin/python ] || python3 -m venv .venv-genai
.venv-genai/bin/python -m pip install -q torch==2.13.0
.venv-genai/bin/python -m pip install -q onnxruntime-genai==0.18.0 transformers==5.25.0 onnx onnx_ir tqdm safetensors
