"""qkv-bench: what the fused artifacts buy, measured side by side in one run (latency, GEMM ceiling, memory,
pipeline cost)."""
