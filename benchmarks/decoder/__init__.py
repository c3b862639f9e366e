"""qkv-bench decoder (this package: options, contenders, measure, report, main; memory.py and genai_worker.py
run in child processes): decoder-only LMs with their KV cache, side by side in one run, on this machine's CPU.

For each model (presets of model_defs/decoder.py) a transformers checkpoint is made with random weights of the
preset's shape (GPT2LMHeadModel or LlamaForCausalLM, save_pretrained), and every contender reads that one
checkpoint:
  - onnx-attention, ort-contrib: qkv-export --weights CHECKPOINT on each fused backend, ONNX Runtime CPU
  - onnxruntime-genai: its model builder's output for the checkpoint (fp32, cpu), run by onnxruntime-genai in
    a worker process of a separate Python environment (genai_worker.py), where the builder accepts the
    checkpoint; where it does not, the line that stopped it is the result
  - torch eager: transformers' model from the checkpoint with its own cache (use_cache=True)
Measured: greedy decode tokens/s (a prompt prefilled untimed, then single-token steps, each the greedy pick
and one forward over the cache, fed back), and prefill latency (batch 1, empty cache). Each point warms every
contender up, then runs rounds that time every contender once, in an order rotated by one per round; medians.
Before timing, each contender's first greedy tokens are checked against eager's.
Then the attention memory of a long prefill: layer 0's fused attention node of the first model's artifacts,
alone, at L tokens in a fresh process, against its O(L·d) floor (memory.py).
"""

from .main import main

__all__ = ["main"]
