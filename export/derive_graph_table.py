"""Derive the graph contract (`qkv_onnx.graph_contract`) from the exporter: what it writes for each
architecture variant, backend, dtype and opset, measured on real exports.

    python -m qkv_onnx.export.derive_graph_table           # rewrite qkv_onnx/graph_table.json
    python -m qkv_onnx.export.derive_graph_table decoder   # re-derive one architecture's rows

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
from ..decoder_format import DECODER
from ..graph_contract import (
    SMALL_CONSTANT,
    TABLE_FILE,
    derived_constants,
    features,
    read_table,
    split_initializers,
)
from ..model_defs.config import EncoderConfig
from ..model_defs.decoder import GPT2, LLAMA
from ..model_defs.numpy_io import weights_to_numpy
from ..model_defs.registry import MODELS, bert_spec, spec_for
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
# The decoder styles (model_defs/decoder.py), as the contract's features tell them apart: head tied or not,
# GQA or not (RoPE's inverse frequencies are checked from the config, not counted: derived_constants).
_GPT2 = replace(GPT2, num_layers=1, hidden_size=128, num_heads=4, ffn_size=512, vocab_size=1000)
_LLAMA = replace(
    LLAMA, num_layers=1, hidden_size=128, num_heads=4, num_kv_heads=2, ffn_size=256, vocab_size=1000
)
DECODER_VARIANTS = [
    _GPT2,
    replace(_GPT2, tie_word_embeddings=False),
    _LLAMA,
    replace(_LLAMA, tie_word_embeddings=True),
    replace(_LLAMA, num_kv_heads=None),
]
VARIANTS += [
    (spec_for("decoder", DECODER, cfg), spec_for("decoder", DECODER, replace(cfg, num_layers=2)))
    for cfg in DECODER_VARIANTS
]


def opsets(backend: str, architecture: str) -> list[int]:
    """The opsets a backend writes `architecture` at (a decoder: its cache op's, as for_architecture says)."""
    written = BACKENDS[backend].for_architecture(architecture)
    return sorted({written.default_opset, written.min_opset})


def graph_facts(model: onnx.ModelProto, weights: dict, derived: dict | None = None) -> dict:
    """What the contract records of one graph: op counts, small constants, opset imports."""
    _, constants = split_initializers(model, weights, None, derived)
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
    described = {"architecture": spec.architecture, "config": spec.config.to_dict()}
    facts = graph_facts(
        onnx.load(str(path)), weights_to_numpy(module.state_dict()), derived_constants(described)
    )
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


def derive_table(log=print, architectures=None) -> dict:
    """Every variant's rows (only those of `architectures` when given)."""
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for one, two in VARIANTS:
            if architectures and one.architecture not in architectures:
                continue
            key_model = {
                "architecture": one.architecture,
                "config": one.config.to_dict(),
                "options": one.options,
            }
            for backend in BACKENDS:
                for dtype in DTYPES:
                    for opset in opsets(backend, one.architecture):
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


def main(argv=None) -> int:
    """No argument: the whole table. Architecture names (e.g. `decoder`): re-derive their rows only, keeping
    the others (the same exporter versions required: the table has one header)."""
    architectures = list(sys.argv[1:] if argv is None else argv)
    rows = derive_table(architectures=architectures)
    if architectures:
        versions, kept = read_table(TABLE)
        if versions != exporter_versions():
            raise SystemExit(
                f"{TABLE} was derived with {versions}, not {exporter_versions()}: derive it whole"
            )
        rows = {**{k: v for k, v in kept.items() if k[0] not in architectures}, **rows}
    TABLE.write_text(render(rows))
    print(f"wrote {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
