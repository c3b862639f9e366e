"""A random Llama-style checkpoint as users ship them: bfloat16, sharded safetensors, made by transformers.

python scripts/make_checkpoint.py OUT --preset 1b   (or 0.1b, 3b; or --layers/--hidden/... by hand)
"""

import argparse
import time

PRESETS = {  # layers, hidden, heads, kv heads, ffn, vocab, tied
    "0.1b": (12, 768, 12, 4, 2048, 32000, False),
    "1b": (16, 2048, 32, 8, 8192, 32000, False),
    "3b": (28, 3072, 24, 8, 8192, 128256, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--preset", choices=PRESETS, default="0.1b")
    p.add_argument("--shard", default="1GB", help="max_shard_size (default 1GB)")
    a = p.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv, ffn, vocab, tied = PRESETS[a.preset]
    cfg = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=ffn,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=2048,
        dtype="bfloat16",
    )
    start = time.monotonic()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16: a 3B model never exists in float32 here
    model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(a.out, max_shard_size=a.shard)
    print(f"{a.out}: {n / 1e9:.2f}B parameters, {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
