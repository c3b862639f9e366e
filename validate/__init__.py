"""Parity checks for qkv-onnx artifacts. Needs numpy, onnx and onnxruntime; torch is optional."""
