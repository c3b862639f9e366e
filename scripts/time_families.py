"""Time qkv-export --weights and qkv-validate of a bert-base-sized checkpoint of every family (random weights,
saved as a user's checkpoint), with the benchmarks' pipeline cost: the table of docs/families.md.
Run: .venv/bin/python scripts/time_families.py"""

import sys
import tempfile
from pathlib import Path

import torch
import transformers

from qkv_onnx.benchmarks.pipeline_cost import measure

VOCAB = 30522
BASE = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=VOCAB
)
ROBERTA = dict(max_position_embeddings=514, pad_token_id=1, type_vocab_size=1)
CONFIGS = {
    "bert": transformers.BertConfig(**BASE),
    "roberta": transformers.RobertaConfig(**BASE, **ROBERTA),
    "xlm-roberta": transformers.XLMRobertaConfig(**BASE, **ROBERTA),
    "electra": transformers.ElectraConfig(**BASE, embedding_size=768),
    "distilbert": transformers.DistilBertConfig(
        dim=768, n_layers=6, n_heads=12, hidden_dim=3072, vocab_size=VOCAB
    ),
    "mpnet": transformers.MPNetConfig(**BASE, max_position_embeddings=514),
}


def main() -> None:
    totals = {}
    for name, config in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            torch.manual_seed(0)
            transformers.AutoModel.from_config(config).eval().save_pretrained(d / "ckpt")
            cost = measure(name, d, weights=d / "ckpt")
        if "error" in cost or cost["export"]["exit_code"] or cost["validate"]["exit_code"]:
            sys.exit(f"{name}: {cost}")
        totals[name] = cost["process_s"]
        export, validate = cost["export"]["total_s"], cost["validate"]["total_s"]
        ratio = totals[name] / totals["bert"]
        print(
            f"| {name} | {export:.1f} s | {validate:.1f} s | {totals[name]:.1f} s | {ratio:.2f} |", flush=True
        )


if __name__ == "__main__":
    main()
