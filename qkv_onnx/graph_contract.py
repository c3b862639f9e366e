"""The graph contract: what model.onnx must be, checked without torch.

Where the exporter cannot rebuild the graph (no torch, other exporter versions), validation holds the
graph to what the exporter is known to write for the artifact's model (`graph_table.json`, a data file
derived from real exports by `python -m qkv_onnx.export.derive_graph_table`, schema-checked when read, and
checked against real exports in the tests):

- the vocabulary: no op an export never writes (control flow, ConstantOfShape, local functions, custom
  domains, training graphs, sparse or subgraph tensors), refused before any checker or runtime sees it;
- the op histogram: exactly the counts of the table's row for (architecture, features, backend, dtype,
  opset), at the model's layer count; a backdoor needs nodes the exporter does not write;
- the initializers: exactly weights.npz's parameters (by name, or transposed, or the q/k/v biases
  packed as ORT's Attention takes them), each used once, byte for byte in the artifact's dtype, plus at
  most the table's number of small constants (at most SMALL_CONSTANT elements each).

An int8 graph is held to its float32 row transformed as ONNX Runtime's dynamic quantization transforms
it: each quantized product (MatMul, or Gemm whose bias becomes an Add) is one MatMulInteger, one Cast and
two Mul, its activation quantized by a DynamicQuantizeLinear (shared by products of one input); every
other count is the float32 row's. Each int8 weight must be its parameter quantized per output channel
(symmetric: zero points 0, scale max|w|/127, every element within half a step of the parameter).

Keyed by (architecture, features, backend, dtype, opset): a new float dtype or backend adds rows to the
table, not code here. A decoder with the current families' features has no row of its own: its counts are
the Llama style's row plus each feature's component (what the feature adds, once, per layer or per layer of
its kind: decoder_components), so the table grows with the features, not with their combinations; a
composition nobody derived (another style) is refused. Torch-free: numpy and onnx only.
"""

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import rope
from .artifact_format import (
    ARCHITECTURES,
    BACKENDS,
    DTYPES,
    QUANTIZED,
    STANDARD_DOMAINS,
    all_nodes,
    every_attention_op,
    model_layers,
    np_dtype,
    op_key,
    stored_weight_dtype,
)
from .decoder_format import DECODER, FEATURES, feature, kv_heads, layer_types

TABLE_FILE = "graph_table.json"
SMALL_CONSTANT = 16  # a constant the exporter writes itself (a shape, a scalar): at most this many elements

# Ops a qkv-onnx export never writes and that would cost without bound to check or run: refused by name
# first, with that reason, whatever the table says.
REFUSED_OPS = ("Loop", "Scan", "If", "SequenceMap", "ConstantOfShape")
FLOATS = {np_dtype(d) for d in DTYPES}


class ContractError(ValueError):
    """The graph is not what the exporter writes; the message says how."""


def features(model: dict) -> tuple[str, ...]:
    """The variant of an architecture a manifest's model is, as the table keys it."""
    cfg, arch = model["config"], ARCHITECTURES[model["architecture"]]
    out = [k for k in arch.options if model["options"].get(k)]
    if cfg.get("num_kv_heads") not in (None, cfg["num_heads"]):
        out.append("gqa")
    if arch.cached:  # what the decoder styles change (model_defs/decoder.py: GPT2, LLAMA), then the families'
        out += [f for f, on in DECODER_FEATURES.items() if on(cfg)] + [cfg["hidden_act"]]
        out += [_feature_tag(k, cfg[k]) for k in FEATURES if k in cfg]
    elif (
        arch.kind != "attention"
    ):  # an encoder's block, and the BERT families' changes (model_defs/families.py)
        out += ["pre-ln"] if cfg["pre_layer_norm"] else []
        out += ["no-pooler"] if arch.layered and not cfg["with_pooler"] else []
        out += [f for f, on in FAMILY_FEATURES.items() if arch.layered and on(cfg)]
        out += [cfg["hidden_act"]] if cfg.get("hidden_act", "gelu") != "gelu" else []
    return tuple(sorted(out))


FAMILY_FEATURES = {
    "ids-positions": lambda cfg: cfg["positions"] == "from-ids",
    "no-token-types": lambda cfg: not cfg["type_vocab_size"],
    "projection": lambda cfg: bool(cfg["embedding_size"]),
    "relative-bias": lambda cfg: bool(cfg["relative_attention_buckets"]),
}


DECODER_FEATURES = {
    "rope": lambda cfg: cfg["positions"] == "rope",
    "rms-norm": lambda cfg: cfg["norm"] == "rms",
    "gated-ffn": lambda cfg: cfg["ffn"] == "gated",
    "attention-bias": lambda cfg: cfg["attention_bias"],
    "mlp-bias": lambda cfg: cfg["mlp_bias"],
    "tied-head": lambda cfg: cfg["tie_word_embeddings"],
}


def _feature_tag(name: str, value) -> str:
    """A decoder feature as a table key: its name, and its value where that is a kind (qk-norm=head)."""
    tag = name.replace("_", "-")
    if isinstance(value, dict):
        value = value.get("rope_type")
    return f"{tag}={value}" if isinstance(value, str) else tag


def row_key(manifest: dict) -> tuple:
    opset = manifest.get("opset", {}).get("ai.onnx") if isinstance(manifest.get("opset"), dict) else None
    m = manifest["model"]
    return (m["architecture"], features(m), manifest["backend"], manifest["dtype"], opset)


def layers(manifest: dict) -> int:
    return model_layers(manifest["model"]["architecture"], manifest["model"]["config"])


def check_vocabulary(model: onnx.ModelProto, allowed_domains: tuple[str, ...]) -> None:
    """Refuse what no export writes, before any checker, shape inference or runtime sees the graph."""
    if model.functions:
        raise ContractError(f"defines local function {model.functions[0].name!r}; an export defines none")
    if model.training_info:
        raise ContractError("holds training graphs (training_info); an export writes none")
    if model.graph.sparse_initializer:
        raise ContractError("holds sparse initializers; an export writes none")
    for node in all_nodes(model):
        if node.op_type in REFUSED_OPS and node.domain in STANDARD_DOMAINS:
            raise ContractError(f"holds a {node.op_type} node ({node.name!r}); an export writes none")
        if node.domain not in allowed_domains:
            raise ContractError(f"op {node.op_type!r} of domain {node.domain!r} (node {node.name!r})")
        for a in node.attribute:
            if a.HasField("g") or a.graphs:
                raise ContractError(f"node {node.name!r} holds a subgraph; an export writes none")
            if a.HasField("sparse_tensor") or a.sparse_tensors:
                raise ContractError(f"node {node.name!r} holds a sparse tensor attribute")


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def derived_constants(model: dict) -> dict[tuple, str]:
    """{(shape, sha256 of the bytes): what it is} of the constants an export computes from the config alone:
    a RoPE decoder's inverse frequencies (qkv_onnx/rope.py: each layer type's, longrope's long ones too), in
    float32 as the module hands them to the exporter."""
    cfg = model["config"]
    if not ARCHITECTURES[model["architecture"]].cached or cfg["positions"] != "rope":
        return {}
    tables = {
        (False, False),
        (False, rope.switches(cfg) is not None),
        (bool(cfg.get("rope_local_theta")), False),
    }
    out = {}
    for local, long in tables:
        inverse = rope.frequencies(cfg, local, long, dtype=np.float32)[0]
        out[inverse.shape, _digest(inverse)] = "RoPE inverse frequencies"
    return out


def split_initializers(
    model: onnx.ModelProto, weights: dict, quantized: dict[str, str] | None = None, derived: dict = None
) -> tuple[dict[str, tuple], list[str]]:
    """({initializer: (kind, parts)}, [small constants]): every initializer is a parameter (kind 'param':
    by name; 'transposed': under its name or another; 'packed': the q/k/v weights or biases packed as ORT's
    Attention takes them; 'quantized'), each parameter used exactly once (an all-zero one may be absent: the
    exporter drops a zero bias), byte for byte; or one of the `derived` constants (derived_constants), byte
    for byte (kind 'derived', parts: what it is); or a constant of at most SMALL_CONSTANT elements.
    `quantized`: the initializers of an int8 graph already proven to be parameters ({initializer:
    parameter}, see quantized_weights). Raises ContractError otherwise."""
    derived = derived or {}
    stored = {a.dtype for a in weights.values()}
    store = stored.pop() if len(stored) == 1 else np.dtype("float32")
    transposed, packed = {}, {}
    for name, w in weights.items():
        if w.ndim == 2:
            transposed.setdefault((w.shape[::-1], _digest(w.T)), []).append(name)
        for leaf in ("weight", "bias"):
            if name.endswith(f".q_proj.{leaf}"):
                prefix = name[: -len(f"q_proj.{leaf}")]
                parts = [f"{prefix}{p}_proj.{leaf}" for p in "qkv"]
                if all(p in weights for p in parts):
                    both = np.concatenate([weights[p] for p in parts])  # ORT's packed QKV: [q; k; v]
                    both = both.T if leaf == "weight" else both  # MatMul layout (in, out) for the weight
                    packed.setdefault((both.shape, _digest(both)), []).append(parts)
    used, made, constants = Counter(), {}, []
    quantized = quantized or {}
    for name, param in quantized.items():
        if param:
            made[name], used[param] = ("quantized", (param,)), used[param] + 1
    for t in model.graph.initializer:
        if t.name in quantized:
            continue
        try:
            a = numpy_helper.to_array(t)
        except Exception as e:  # onnx raises several types for a malformed tensor
            raise ContractError(f"initializer {t.name!r} is not a readable tensor ({e})") from None
        if t.name in weights:  # as is; or transposed in place (int8: quantize_dynamic's Gemm as MatMul)
            w, got = weights[t.name], _digest(a.astype(store)) if a.dtype in FLOATS else None
            how = ("param", (t.name,)) if a.shape == w.shape and got == _digest(w) else None
            if how is None and w.ndim == 2 and a.shape == w.shape[::-1] and got == _digest(w.T):
                how = ("transposed", (t.name,))
            if how is None:
                raise ContractError(f"initializer {t.name!r} is not weights.npz's {t.name}")
            made[t.name], used[t.name] = how, used[t.name] + 1
            continue
        if (a.shape, _digest(a)) in derived:
            made[t.name] = ("derived", (derived[a.shape, _digest(a)],))
            continue
        if a.size <= SMALL_CONSTANT:
            constants.append(t.name)
            continue
        if a.dtype not in FLOATS:
            raise ContractError(f"initializer {t.name!r} ({a.dtype.name}{list(a.shape)}) is not a parameter")
        key = _digest(a.astype(store))
        candidates = transposed.get((a.shape, key), []) if a.ndim == 2 else []
        sources = [[n] for n in candidates] + packed.get((a.shape, key), [])
        free = [s for s in sources if not any(used[n] for n in s)]
        if not free:
            what = "a parameter used twice" if sources else "none of weights.npz's parameters"
            raise ContractError(f"initializer {t.name!r} ({a.dtype.name}{list(a.shape)}) is {what}")
        made[t.name] = ("transposed" if len(free[0]) == 1 else "packed", tuple(free[0]))
        used.update(free[0])
    # A parameter may be absent from the graph only where the exporter's optimizer dropped it as an all-zero
    # bias (MiniLM's untrained pooler.bias), or where it or quantize_dynamic kept another initializer of the
    # same shape and bytes in its place (a fresh checkpoint's LayerNorm weights).
    merged = {(weights[n].shape, _digest(weights[n])) for n in used if n in weights}
    unused = sorted(
        n
        for n in set(weights) - set(used)
        if weights[n].any() and (weights[n].shape, _digest(weights[n])) not in merged
    )
    if unused:
        raise ContractError(f"weights.npz's {unused[0]} is not in the graph ({len(unused)} unused)")
    twice = sorted(n for n, k in used.items() if k > 1)
    if twice:
        raise ContractError(f"weights.npz's {twice[0]} is in the graph {used[twice[0]]} times")
    return made, constants


# The quantizer computes in float32: the scale max|w|/127 is one rounding off (2^-24 relative; 2^-22 allowed),
# and q = round(w / scale) rounds a quotient of at most 127 steps that is itself off by 127 * 2^-24 steps.
SCALE_RTOL = 2.0**-22
HALF_STEP = 0.5 + 128 * 2.0**-23


def quantized_weights(model: onnx.ModelProto, weights: dict) -> dict[str, str | None]:
    """{initializer: parameter, or None for its scale and zero point} of every int8 weight of a graph
    quantized per channel by quantize_dynamic (QInt8, symmetric): the zero points are 0, the scales are
    max|w|/127 of each output channel of the parameter (MatMul layout: transposed), and every element is
    within half a step of it. Raises ContractError for an int8 initializer that is none of these."""
    inits = {t.name: t for t in model.graph.initializer}
    candidates = {}  # MatMul-layout shape -> [(parameter, its per-channel step max|w|/127)], steps once each
    for name, w in weights.items():
        if w.ndim == 2:
            steps = np.abs(w.astype(np.float64)).max(axis=1) / 127
            candidates.setdefault(w.shape[::-1], []).append((name, steps))
    out, taken = {}, set()
    for t in model.graph.initializer:
        if t.data_type != onnx.TensorProto.INT8 or not t.name.endswith("_quantized"):
            continue
        base = t.name[: -len("_quantized")]
        scale_t, zero_t = inits.get(base + "_scale"), inits.get(base + "_zero_point")
        if scale_t is None or zero_t is None:
            raise ContractError(f"int8 initializer {t.name!r} has no {base}_scale and {base}_zero_point")
        q = numpy_helper.to_array(t).astype(np.float64)
        scale = numpy_helper.to_array(scale_t).astype(np.float64)
        zero = numpy_helper.to_array(zero_t)
        if q.ndim != 2 or scale.shape != (q.shape[1],) or zero.shape != scale.shape or zero.any():
            raise ContractError(f"int8 initializer {t.name!r} is not a per-channel symmetric int8 weight")
        match = None
        for name, steps in candidates.get(q.shape, []):
            if name in taken or not np.allclose(scale, steps, rtol=SCALE_RTOL, atol=0):
                continue
            if (np.abs(q * scale - weights[name].astype(np.float64).T) <= scale * HALF_STEP).all():
                match = name
                break
        if match is None:
            raise ContractError(f"int8 initializer {t.name!r} is none of weights.npz's parameters, quantized")
        taken.add(match)
        out[t.name], out[scale_t.name], out[zero_t.name] = match, None, None
    return out


def quantized_ops(float_ops: dict[str, int], got: dict[str, int], zero_biases: int = 0) -> dict[str, int]:
    """The op counts of the float32 graph `float_ops` after dynamic quantization of the products `got`
    (the int8 graph's counts) shows: MatMulInteger, Cast and two Mul each, an Add for a quantized Gemm's
    bias (none for a Gemm whose all-zero bias the exporter dropped: at most `zero_biases` of them), and the
    DynamicQuantizeLinear count found (one per quantized input, at most one per product)."""
    q = got.get("MatMulInteger", 0)
    gemms = float_ops.get("Gemm", 0) - got.get("Gemm", 0)
    want = dict(float_ops)
    want["MatMul"] = float_ops.get("MatMul", 0) - (q - gemms)
    want["Gemm"] = float_ops.get("Gemm", 0) - gemms
    want["MatMulInteger"] = q
    want["Mul"] = float_ops.get("Mul", 0) + 2 * q
    want["Cast"] = float_ops.get("Cast", 0) + q
    most = float_ops.get("Add", 0) + gemms
    want["Add"] = min(max(got.get("Add", 0), most - min(gemms, zero_biases)), most)
    dql = got.get("DynamicQuantizeLinear", 0)
    want["DynamicQuantizeLinear"] = min(max(dql, 1), q)  # what was found, when it is within 1..q
    return {k: v for k, v in want.items() if v}


def expected_ops(row: dict, n_layers: int) -> dict[str, int]:
    counts = {k: fixed + per * n_layers for k, (fixed, per) in row["ops"].items()}
    return {k: v for k, v in counts.items() if v}


ATTENTION_OPS = {"Softmax"} | every_attention_op()


def _difference(got: dict, want: dict) -> str:
    """The differing counts, attention's own ops first, then the largest differences."""
    keys = sorted(
        set(got) | set(want), key=lambda k: (k not in ATTENTION_OPS, -abs(got.get(k, 0) - want.get(k, 0)), k)
    )
    diff = [
        f"{k} {got.get(k, 0)} (expected {want.get(k, 0)})" for k in keys if got.get(k, 0) != want.get(k, 0)
    ]
    return ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")


LLAMA_STYLE = ("gated-ffn", "rms-norm", "rope", "silu")  # the features of the row components build on


def decoder_components(cfg: dict) -> dict[str, int] | None:
    """{component: units} that make a decoder's graph from the Llama style's row (derive_graph_table's
    DECODER_COMPONENTS: what each feature adds, per layer it applies to, per layer of its kind, or once), or
    None where no composition is known (another style; every rotating layer reading a local theta)."""
    if (cfg["positions"], cfg["norm"], cfg["ffn"]) != ("rope", "rms", "gated"):
        return None
    n, types = cfg["num_layers"], layer_types(cfg)
    rotates = list(cfg.get("rope_layers") or [True] * n)
    local = feature(cfg, "rope_local_theta") is not None
    if local and all(t == "sliding" for t, r in zip(types, rotates) if r):
        return None
    scaling = feature(cfg, "rope_scaling") or {}
    bias, out_bias = cfg["attention_bias"], feature(cfg, "out_bias")
    gqa = kv_heads(cfg) != cfg["num_heads"]
    units = {
        "gqa": n * gqa,
        "attention-bias": n * bias,
        "no-out-bias": n * (bias and out_bias is False),
        "out-bias-only": n * (not bias and out_bias is True),
        "mlp-bias": n * cfg["mlp_bias"],
        "tied-head": int(cfg["tie_word_embeddings"]),
        **{f"act={a}": n for a in [cfg["hidden_act"]] if a != "silu"},
        "head-dim": n * ("head_dim" in cfg),
        **{f"qk-norm={q}": n for q in [feature(cfg, "qk_norm")] if q != "none"},
        **{f"norm-placement={p}": n for p in [feature(cfg, "norm_placement")] if p != "pre"},
        **{k: n * (k.replace("-", "_") in cfg) for k in ("residual-multiplier", "attention-scale")},
        # a written-out cap repeats the kv heads itself (on a GQA model its component is another) and masks
        # each layer's scores itself, where SDPA's graph turns each distinct mask into a bias once: its fixed
        # part counts once per kind of layer
        **{
            f"attention-softcap{'-gqa' if gqa else ''}": (len(set(types)), n)
            for _ in ["cap"]
            if "attention_softcap" in cfg
        },
        **{
            k: int(k.replace("-", "_") in cfg)
            for k in ("embedding-multiplier", "logits-divisor", "final-softcap")
        },
        "sliding-mask": int("sliding" in types),
        "no-full-mask": int("full" not in types),
        **({f"rope-scaling={scaling['rope_type']}": 1} if scaling else {}),
        "attention-factor": int(scaling.get("attention_factor", 1.0) != 1.0),
        "partial-rotary": sum(rotates) * ("rotary_dim" in cfg),
        "local-rope-table": int(local and any(t == "sliding" for t, r in zip(types, rotates) if r)),
        "no-rope-layer": n - sum(rotates),
    }
    return {k: v for k, v in units.items() if v}


def composed_row(key: tuple, cfg: dict) -> dict | None:
    """A decoder's row made from the Llama style's row and its components' counts (fixed where present, plus
    per unit), for the backend, dtype and opset of `key`; None where the table cannot compose it."""
    arch, _, backend, dtype, opset = key
    units = decoder_components(cfg) if ARCHITECTURES[arch].cached else None
    base = ROWS.get((DECODER, LLAMA_STYLE, backend, dtype, opset))
    parts = [COMPONENTS.get((name, backend, dtype, opset)) for name in units or ()]
    if units is None or base is None or None in parts:
        return None
    layers = cfg["num_layers"]
    ops = {k: fixed + per * layers for k, (fixed, per) in base["ops"].items()}
    constants = base["constants"][0] + base["constants"][1] * layers
    for n, part in zip(units.values(), parts):
        once, n = n if isinstance(n, tuple) else (1, n)  # how many times its fixed part counts; its units
        for k, (fixed, per) in part["ops"].items():
            ops[k] = ops.get(k, 0) + once * fixed + per * n
        constants += once * part["constants"][0] + part["constants"][1] * n
    return {
        "ops": {k: (v, 0) for k, v in ops.items() if v},
        "constants": (constants, 0),
        "domains": base["domains"],
    }


# a decoder's fused attention ops: attribute -> the config value it carries (what no op count shows)
ATTENTION_ATTRIBUTES = {
    "Attention": {"scale": "attention_scale", "softcap": "attention_softcap"},
    "GroupQueryAttention": {
        "scale": "attention_scale",
        "softcap": "attention_softcap",
        "local_window_size": "sliding_window",
    },
}


def _wanted(cfg: dict, key: str, kind: str):
    """The value config `key` gives the attribute on a layer of `kind` (None: the attribute's default)."""
    if key == "sliding_window":
        return cfg["sliding_window"] if kind == "sliding" else None
    value = feature(cfg, key)
    return float(value) if key == "attention_softcap" else value


def check_attention_attributes(model: onnx.ModelProto, cfg: dict) -> None:
    """A decoder's fused attention ops, layer by layer in graph order, carry the config's values their
    attributes hold (ATTENTION_ATTRIBUTES: the score scale, the soft cap (0: none), GroupQueryAttention's
    window on a sliding layer). Raises ContractError naming the layer and attribute."""
    fused = [n for n in model.graph.node if op_key(n.domain, n.op_type) in every_attention_op()]
    for layer, (node, kind) in enumerate(zip(fused, layer_types(cfg))):
        found = {a.name: (a.f if a.type == onnx.AttributeProto.FLOAT else a.i) for a in node.attribute}
        for name, key in ATTENTION_ATTRIBUTES.get(node.op_type, {}).items():
            value = _wanted(cfg, key, kind)
            got = found.get(name)
            got = None if got in (None, 0, -1) and not value else got
            same = (
                got == value
                if not isinstance(value, float)
                else got is not None and np.float32(got) == np.float32(value)
            )
            if not same and not (value in (None, 0.0) and got is None):
                raise ContractError(
                    f"layer {layer}'s {node.op_type} has {name} {got}, the config says {value}"
                )


def unchecked(manifest: dict) -> list[str]:
    """A decoder config's values the structural contract does not read off the graph (constants it counts but
    does not compare): a rebuild proves them, parity on the cases judged shows what they change there."""
    cfg = manifest["model"]["config"]
    architecture = manifest["model"]["architecture"]
    if not ARCHITECTURES[architecture].cached:
        return []
    ops = BACKENDS[manifest["backend"]].for_architecture(architecture).attention_ops
    read = {key for _, op in ops for key in ATTENTION_ATTRIBUTES.get(op, {}).values()}  # off the fused ops
    keys = ["embedding_multiplier", "residual_multiplier", "logits_divisor", "final_softcap"]
    keys += [k for k in ("sliding_window", "attention_scale", "attention_softcap") if k not in read]
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type") == "longrope":  # where it switches; its tables' bytes are checked
        keys.append("original_max_position_embeddings")
    if "attention_factor" in scaling:
        keys.append("attention_factor")
    return [f"{k} {cfg[k] if k in cfg else scaling[k]}" for k in keys if k in cfg or k in scaling]


def check_structure(model: onnx.ModelProto, manifest: dict, weights: dict) -> None:
    """Raise ContractError unless `model` is, in vocabulary, op histogram, opset imports and initializers,
    what the exporter writes for the manifest's model (its row of the table, or a decoder's composed from
    its components; an int8 graph: its float32 row, quantized)."""
    key = row_key(manifest)
    quantized = key[3] in QUANTIZED
    float_key = (*key[:3], "float32", key[4]) if quantized else key
    row = ROWS.get(float_key) or composed_row(float_key, manifest["model"]["config"])
    if row is None:
        arch, feats, backend, dtype, opset = key
        raise ContractError(
            f"no structural contract for {arch}{' (' + ', '.join(feats) + ')' if feats else ''}, backend "
            f"{backend}, {dtype}, opset {opset}: only a rebuild with the exporter can check this graph"
        )
    domains = {"": key[4], **row["domains"]}
    check_vocabulary(model, (*STANDARD_DOMAINS, *row["domains"]))
    if ARCHITECTURES[key[0]].cached:
        check_attention_attributes(model, manifest["model"]["config"])
    imports = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    if imports != domains:
        raise ContractError(f"opset imports {imports}, the exporter writes {domains}")
    got = dict(Counter(op_key(n.domain, n.op_type) for n in all_nodes(model)))
    want = expected_ops(row, layers(manifest))
    if _packs_folded(manifest) and row["ops"].get("Concat", (0, 0))[1]:
        want["Concat"] -= layers(manifest)
        want = {k: v for k, v in want.items() if v}
    if quantized:
        zero_biases = sum(1 for k, w in weights.items() if k.endswith(".bias") and not w.any())
        want = quantized_ops(want, got, zero_biases)
        promised, found = manifest["quantization"].get("quantized_products"), got.get("MatMulInteger", 0)
        if found != promised:
            raise ContractError(f"{found} quantized products (MatMulInteger), the manifest says {promised}")
    if got != want:
        raise ContractError(
            f"op counts are not what the exporter writes for this model ({describe(key)}, "
            f"{layers(manifest)} layer(s)): {_difference(got, want)}"
        )
    _, constants = split_initializers(
        model,
        weights,
        quantized_weights(model, weights) if quantized else None,
        derived_constants(manifest["model"]),
    )
    fixed, per = row["constants"]
    want = fixed + per * layers(manifest)
    if len(constants) > want:  # fewer: the exporter merged equal ones (a pad id equal to an axis)
        raise ContractError(
            f"{len(constants)} small constant initializers; the exporter writes at most {want}"
        )


# onnxscript's constant folding computes a node at export when its inputs hold at most this many elements
# (DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT): ORT's fused Attention takes q, k and v's weights packed by one
# Concat per layer, folded into an initializer when the three hold at most this many (hidden size <= 52).
FOLD_INPUT_LIMIT = 8192


def _packs_folded(manifest: dict) -> bool:
    """Whether the exporter folded each layer's q/k/v weight Concat (the table's rows are at hidden 128)."""
    backend = BACKENDS.get(manifest["backend"])
    model = manifest["model"]
    fuses = bool(backend and backend.for_architecture(model["architecture"]).ort_fusions)  # no decoder's
    return fuses and 3 * model["config"]["hidden_size"] ** 2 <= FOLD_INPUT_LIMIT


def describe(key: tuple) -> str:
    arch, feats, backend, dtype, opset = key
    return f"{arch}{'/' + '+'.join(feats) if feats else ''}, {backend}, {dtype}, opset {opset}"


def table_versions() -> dict:
    """The exporter versions the table was derived with."""
    return dict(EXPORTER)


def weight_dtype(dtype: str) -> np.dtype:
    return np_dtype(stored_weight_dtype(dtype))


class TableError(RuntimeError):
    """graph_table.json is not the table derive_graph_table writes: a broken installation (exit 3, a bug)."""


def _counts(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(type(n) is int for n in v)


def read_table(path: Path) -> tuple[dict, dict]:
    """(exporter versions, rows keyed by (architecture, features, backend, dtype, opset)) of the table file,
    every row checked against the schema derive_graph_table writes."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TableError(f"{path}: cannot read the graph table ({e})") from None
    if not isinstance(doc, dict) or doc.get("small_constant") != SMALL_CONSTANT:
        raise TableError(f"{path}: not a graph table for small constants of {SMALL_CONSTANT} elements")
    rows = {}
    for row in doc.get("rows") or [None]:
        ok = (
            isinstance(row, dict)
            and all(isinstance(row.get(k), str) for k in ("architecture", "backend", "dtype"))
            and type(row.get("opset")) is int
            and isinstance(row.get("features"), list)
            and all(isinstance(f, str) for f in row["features"])
            and isinstance(row.get("ops"), dict)
            and all(isinstance(k, str) and _counts(v) for k, v in row["ops"].items())
            and _counts(row.get("constants"))
            and isinstance(row.get("domains"), dict)
            and all(isinstance(k, str) and type(v) is int for k, v in row["domains"].items())
        )
        if not ok:
            raise TableError(
                f"{path}: a row that is not {{architecture, features, backend, dtype, opset, ...}}"
            )
        key = (row["architecture"], tuple(row["features"]), row["backend"], row["dtype"], row["opset"])
        if key in rows:
            raise TableError(f"{path}: two rows for {key}")
        rows[key] = {
            "ops": {k: tuple(v) for k, v in row["ops"].items()},
            "constants": tuple(row["constants"]),
            "domains": row["domains"],
        }
    if not isinstance(doc.get("exporter"), dict):
        raise TableError(f"{path}: no exporter versions")
    components = {}
    for c in doc.get("components", []):
        ok = (
            isinstance(c, dict)
            and all(isinstance(c.get(k), str) for k in ("component", "backend", "dtype"))
            and type(c.get("opset")) is int
            and isinstance(c.get("ops"), dict)
            and all(isinstance(k, str) and _counts(v) for k, v in c["ops"].items())
            and _counts(c.get("constants"))
        )
        if not ok:
            raise TableError(
                f"{path}: a component that is not {{component, backend, dtype, opset, ops, ...}}"
            )
        components[c["component"], c["backend"], c["dtype"], c["opset"]] = {
            "ops": {k: tuple(v) for k, v in c["ops"].items()},
            "constants": tuple(c["constants"]),
        }
    return doc["exporter"], rows, components


EXPORTER, ROWS, COMPONENTS = read_table(Path(__file__).with_name(TABLE_FILE))
