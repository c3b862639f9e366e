"""Derive the graph contract (`qkv_onnx.graph_contract`) from the exporter: what it writes for each
architecture variant, backend, dtype and opset, measured on real exports.

    python -m qkv_onnx.export.derive_graph_table     # rewrite qkv_onnx/graph_table.json

Each variant is exported at one and two layers (BERT; the others have no layer count): a count that
grows with the layers is per layer, the rest is fixed. The tests check the table against real exports
of every registry model, backend and dtype; rerun this after changing the exporter or its versions.
"""

import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import onnx
import torch

from ..artifact_format import BACKENDS, DTYPES, all_nodes, canonical_json, op_key
from ..graph_contract import SMALL_CONSTANT, TABLE_FILE, features, split_initializers
from ..model_defs.config import EncoderConfig
from ..model_defs.numpy_io import weights_to_numpy
from ..model_defs.registry import MODELS, bert_spec
from ..versions import exporter_versions
from .graph import export_model

TABLE = Path(__file__).resolve().parents[1] / "qkv_onnx" / TABLE_FILE
if not TABLE.parent.joinpath("graph_contract.py").is_file():  # installed: the package's own folder
    TABLE = Path(sys.modules["qkv_onnx"].__file__).parent / TABLE_FILE

_BERT = EncoderConfig(num_layers=1, hidden_size=128, num_heads=2, ffn_size=512, vocab_size=1000)
# One spec per variant: (spec at 1 layer, spec at 2 layers or None when the architecture has no layers).
VARIANTS = [
    (MODELS["mha"], None),
    (MODELS["mha-causal"], None),
    (MODELS["mha-cross"], None),
    (MODELS["mha-gqa"], None),
    (MODELS["encoder-block"], None),
    (MODELS["encoder-block-prenorm"], None),
    (bert_spec("bert", _BERT), bert_spec("bert", replace(_BERT, num_layers=2))),
    (
        bert_spec("bert", replace(_BERT, with_pooler=False)),
        bert_spec("bert", replace(_BERT, num_layers=2, with_pooler=False)),
    ),
]
# What each family of model_defs/families.py changes in the graph, at _BERT's size (gelu_tanh: ELECTRA's and
# others' gelu_new; relu: DistilBERT's option).
# The exporter merges equal scalar constants (a pad id of 1 with CumSum's axis, 0 with the pooler's index):
# the pad id here is 3, so that a row counts every constant (the contract's count is an upper bound).
FAMILY_VARIANTS = [
    dict(positions="from-ids", pad_token_id=3, type_vocab_size=1),  # roberta, xlm-roberta
    dict(embedding_size=64, with_pooler=False),  # electra
    dict(embedding_size=64, with_pooler=False, hidden_act="gelu_tanh"),
    dict(type_vocab_size=0, with_pooler=False),  # distilbert
    dict(type_vocab_size=0, with_pooler=False, hidden_act="relu"),
    dict(positions="from-ids", pad_token_id=3, type_vocab_size=0, relative_attention_buckets=32),  # mpnet
    dict(hidden_act="gelu_tanh"),
]
VARIANTS += [
    (bert_spec("bert", replace(_BERT, **v)), bert_spec("bert", replace(_BERT, num_layers=2, **v)))
    for v in FAMILY_VARIANTS
]
OPSETS = {name: sorted({b.default_opset, b.min_opset}) for name, b in BACKENDS.items()}


def graph_facts(model: onnx.ModelProto, weights: dict) -> dict:
    """What the contract records of one graph: op counts, small constants, opset imports."""
    _, constants = split_initializers(model, weights)
    return {
        "ops": Counter(op_key(n.domain, n.op_type) for n in all_nodes(model)),
        "constants": len(constants),
        "domains": {
            (o.domain or ""): o.version for o in model.opset_import if o.domain not in ("", "ai.onnx")
        },
    }


def _export_facts(spec, backend: str, dtype: str, opset: int, directory: Path) -> dict:
    module = spec.random(0).eval().to(getattr(torch, dtype))
    path = directory / f"{spec.name}-{spec.config.num_layers}-{backend}-{dtype}-{opset}.onnx"
    export_model(spec, module, backend, dtype, opset, False, path)
    facts = graph_facts(onnx.load(str(path)), weights_to_numpy(module.state_dict()))
    path.unlink()
    return facts


def derive_row(one, two, backend: str, dtype: str, opset: int, directory: Path) -> dict:
    """The contract row of a variant: counts as (fixed, per layer)."""
    a = _export_facts(one, backend, dtype, opset, directory)
    b = _export_facts(two, backend, dtype, opset, directory) if two is not None else None
    if b is None:
        ops = {k: (v, 0) for k, v in sorted(a["ops"].items())}
        constants = (a["constants"], 0)
    else:
        ops = {
            k: (2 * a["ops"][k] - b["ops"][k], b["ops"][k] - a["ops"][k]) for k in sorted(a["ops"] | b["ops"])
        }
        constants = (2 * a["constants"] - b["constants"], b["constants"] - a["constants"])
    return {"ops": ops, "constants": constants, "domains": a["domains"]}


def derive_table(log=print) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for one, two in VARIANTS:
            key_model = {
                "architecture": one.architecture,
                "config": one.config.to_dict(),
                "options": one.options,
            }
            for backend, opsets in OPSETS.items():
                for dtype in DTYPES:
                    for opset in opsets:
                        key = (one.architecture, features(key_model), backend, dtype, opset)
                        rows[key] = derive_row(one, two, backend, dtype, opset, Path(tmp))
                        log(f"{key}: {sum(f + p for f, p in rows[key]['ops'].values())} ops")
    return rows


def render(rows: dict) -> str:
    """The table as graph_contract.read_table reads it: canonical JSON, one row per key."""
    return canonical_json(
        {
            "generated_by": "python -m qkv_onnx.export.derive_graph_table",
            "exporter": exporter_versions(),
            "small_constant": SMALL_CONSTANT,
            "rows": [
                {
                    "architecture": arch,
                    "features": list(feats),
                    "backend": backend,
                    "dtype": dtype,
                    "opset": opset,
                    "ops": {k: list(v) for k, v in row["ops"].items()},
                    "constants": list(row["constants"]),
                    "domains": row["domains"],
                }
                for (arch, feats, backend, dtype, opset), row in rows.items()
            ],
        }
    )


def main() -> int:
    TABLE.write_text(render(derive_table()))
    print(f"wrote {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
