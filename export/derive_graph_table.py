"""Derive the graph contract (`qkv_onnx.graph_contract`) from the exporter: what it writes for each
architecture variant, backend, dtype and opset, measured on real exports.

    python -m qkv_onnx.export.derive_graph_table           # rewrite qkv_onnx/graph_table.json
    python -m qkv_onnx.export.derive_graph_table decoder   # re-derive one architecture's rows
    python -m qkv_onnx.export.derive_graph_table components   # re-derive the decoder components only
    python -m qkv_onnx.export.derive_graph_table components NAME ...   # those components only

Each variant is exported at one and two layers (BERT; the others have no layer count): a count that
grows with the layers is per layer, the rest is fixed. The tests check the table against real exports
of every registry model, backend and dtype; rerun this after changing the exporter or its versions.
"""

import os
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

# The features of the current decoder families as components of a Llama-style graph (graph_contract's
# decoder_components): each is what its feature adds to the graph of the Llama style without GQA, biases or a
# tied head (the last DECODER_VARIANTS row), measured as the difference of two exports, so the table grows by
# one component per feature, not per combination. name -> (with, without): each a function of the units
# (1 or 2) giving the config pair whose difference is that many units of the component: a per-layer
# component at 1 and 2 layers, a per-kind one at 1 and 2 layers of its kind, a fixed one (None) once.
_MIN = DECODER_VARIANTS[-1]
# Values no other constant of these graphs has: the exporter merges equal small constants, and a component's
# count of them must be the most a model can have (the contract's is an upper bound).
_SLIDING = {"sliding_window": 7}
_LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0 + 0.1 * i for i in range(16)],
    "long_factor": [2.0 + 0.3 * i for i in range(16)],
    "original_max_position_embeddings": 61,
}


def _every(**change):
    """A per-layer component: the feature on every one of `units` layers, against the same layers without."""
    return lambda units: (replace(_MIN, num_layers=units, **change), replace(_MIN, num_layers=units))


def _once(with_change: dict, without_change: dict | None = None, layers: int = 2):
    """A fixed component: the feature against its absence (or `without_change`) at `layers` layers."""
    return lambda units: (
        replace(_MIN, num_layers=layers, **with_change),
        replace(_MIN, num_layers=layers, **(without_change or {})),
    )


DECODER_COMPONENTS = {
    "gqa": _every(num_kv_heads=2),
    "attention-bias": _every(attention_bias=True),
    "no-out-bias": lambda units: (
        replace(_MIN, num_layers=units, attention_bias=True, out_bias=False),
        replace(_MIN, num_layers=units, attention_bias=True),
    ),
    "out-bias-only": _every(out_bias=True),
    "mlp-bias": _every(mlp_bias=True),
    "tied-head": _once({"tie_word_embeddings": True}, layers=1),
    "act=gelu_tanh": _every(hidden_act="gelu_tanh"),
    "head-dim": _every(head_dim=48),
    "qk-norm=head": _every(qk_norm="head"),
    "qk-norm=projection": _every(qk_norm="projection"),
    "norm-placement=sandwich": _every(norm_placement="sandwich"),
    "norm-placement=post": _every(norm_placement="post"),
    "residual-multiplier": _every(residual_multiplier=0.3125),
    "attention-scale": _every(attention_scale=0.2875),
    "attention-softcap": _every(attention_softcap=2.75),
    # the cap on a GQA model: its written-out attention repeats the kv heads itself, so where the decomposed
    # graph has no SDPA, GQA's own ops are not there either (the two do not add)
    "attention-softcap-gqa": lambda units: (
        replace(_MIN, num_layers=units, num_kv_heads=2, attention_softcap=2.75),
        replace(_MIN, num_layers=units, num_kv_heads=2),
    ),
    "embedding-multiplier": _once({"embedding_multiplier": 3.25}, layers=1),
    "logits-divisor": _once({"logits_divisor": 4.25}, layers=1),
    "final-softcap": _once({"final_softcap": 5.25}, layers=1),
    "sliding-mask": _once({**_SLIDING, "layer_types": ("sliding", "full")}),
    "no-full-mask": _once(
        {**_SLIDING, "layer_types": ("sliding", "sliding")}, {**_SLIDING, "layer_types": ("sliding", "full")}
    ),
    "rope-scaling=linear": _once({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, layers=1),
    "rope-scaling=llama3": _once(
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
        layers=1,
    ),
    "rope-scaling=yarn": _once(
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": True,
                "attention_factor": 1.0,
            }
        },
        layers=1,
    ),
    "rope-scaling=longrope": _once({"rope_scaling": {**_LONGROPE, "attention_factor": 1.0}}, layers=1),
    "attention-factor": _once(
        {"rope_scaling": {**_LONGROPE, "attention_factor": 1.2125}},
        {"rope_scaling": {**_LONGROPE, "attention_factor": 1.0}},
        layers=1,
    ),
    "partial-rotary": _every(rotary_dim=16),
    "local-rope-table": _once(
        {**_SLIDING, "layer_types": ("sliding", "full"), "rope_local_theta": 100.0},
        {**_SLIDING, "layer_types": ("sliding", "full")},
    ),
    "no-rope-layer": lambda units: (
        replace(_MIN, num_layers=units + 1, rope_layers=(False,) * units + (True,)),
        replace(_MIN, num_layers=units + 1),
    ),
}
PER_UNIT = {"gqa", "attention-bias", "no-out-bias", "out-bias-only", "mlp-bias", "act=gelu_tanh", "head-dim"}
PER_UNIT |= {"qk-norm=head", "qk-norm=projection", "norm-placement=sandwich", "norm-placement=post"}
PER_UNIT |= {"residual-multiplier", "attention-scale", "attention-softcap", "partial-rotary", "no-rope-layer"}
PER_UNIT |= {"attention-softcap-gqa"}


_facts: dict[
    tuple, dict
] = {}  # a decoder's facts by (config, backend, dtype, opset): components share configs


def _decoder_facts(cfg, backend: str, dtype: str, opset: int, directory: Path) -> dict:
    key = (repr(cfg), backend, dtype, opset)
    if key not in _facts:
        _facts[key] = _export_facts(spec_for("decoder", DECODER, cfg), backend, dtype, opset, directory)
    return _facts[key]


def derive_component(name: str, backend: str, dtype: str, opset: int, directory: Path) -> dict:
    """A component's (fixed, per unit) op and constant counts: the difference its feature makes, at one and
    two units for a per-unit component, once for a fixed one."""

    def delta(units):
        a, b = (
            _decoder_facts(cfg, backend, dtype, opset, directory) for cfg in DECODER_COMPONENTS[name](units)
        )
        ops = {k: a["ops"][k] - b["ops"][k] for k in a["ops"] | b["ops"]}
        return {k: v for k, v in ops.items() if v}, a["constants"] - b["constants"]

    one, c1 = delta(1)
    if name not in PER_UNIT:
        return {"ops": {k: (v, 0) for k, v in sorted(one.items())}, "constants": (c1, 0)}
    two, c2 = delta(2)
    ops = {k: (2 * one.get(k, 0) - two.get(k, 0), two.get(k, 0) - one.get(k, 0)) for k in sorted(one | two)}
    return {"ops": {k: v for k, v in ops.items() if v != (0, 0)}, "constants": (2 * c1 - c2, c2 - c1)}


def _components_of(backend: str, dtype: str, opset: int, names: tuple) -> dict:
    """The components' counts for one backend, dtype and opset (one worker's share)."""
    with tempfile.TemporaryDirectory() as tmp:
        return {
            (name, backend, dtype, opset): derive_component(name, backend, dtype, opset, Path(tmp))
            for name in names
        }


def derive_components(log=print, workers: int = os.cpu_count() or 1, names=None) -> dict:
    """The decoder components' counts (every one, or those `names`) per backend, dtype and opset, one process
    per (backend, dtype, opset) at a time on each CPU (each shares the exports of its components' common
    configs)."""
    from concurrent.futures import ProcessPoolExecutor

    names = tuple(names or DECODER_COMPONENTS)
    keys = [(b, d, o, names) for b in BACKENDS for d in DTYPES for o in opsets(b, DECODER)]
    out = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for part in pool.map(_components_of, *zip(*keys)):
            out.update(part)
            for key, c in part.items():
                log(f"{key}: {c['ops']}")
    return {key: out[key] for key in sorted(out, key=lambda k: (list(DECODER_COMPONENTS).index(k[0]), k[1:]))}


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


def render(rows: dict, components: dict) -> str:
    """The table as graph_contract.read_table reads it: canonical JSON, one row per key, one entry per decoder
    component, backend, dtype and opset."""
    return canonical_json(
        {
            "generated_by": "python -m qkv_onnx.export.derive_graph_table",
            "exporter": exporter_versions(),
            "small_constant": SMALL_CONSTANT,
            "components": [
                {
                    "component": name,
                    "backend": backend,
                    "dtype": dtype,
                    "opset": opset,
                    "ops": {k: list(v) for k, v in c["ops"].items()},
                    "constants": list(c["constants"]),
                }
                for (name, backend, dtype, opset), c in components.items()
            ],
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
    the others (the same exporter versions required: the table has one header); `components [NAME ...]`:
    re-derive the decoder components only (those NAMEs only)."""
    architectures = list(sys.argv[1:] if argv is None else argv)
    only_components = architectures[:1] == ["components"]
    names = architectures[1:] if only_components else None  # some components only
    rows = {} if only_components else derive_table(architectures=architectures)
    wanted = not architectures or {"decoder", "components"} & set(architectures)
    components = derive_components(names=names) if wanted else {}
    if architectures:
        versions, kept, kept_components = read_table(TABLE)
        if versions != exporter_versions():
            raise SystemExit(
                f"{TABLE} was derived with {versions}, not {exporter_versions()}: derive it whole"
            )
        rows = {**{k: v for k, v in kept.items() if k[0] not in architectures}, **rows}
        components = {**kept_components, **components}
    order = list(DECODER_COMPONENTS)
    components = {k: components[k] for k in sorted(components, key=lambda k: (order.index(k[0]), k[1:]))}
    TABLE.write_text(render(rows, components))
    print(f"wrote {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
