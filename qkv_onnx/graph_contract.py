"""The graph contract: what model.onnx must be, checked without torch.

Where the exporter cannot rebuild the graph (no torch, other exporter versions), validation holds the
graph to what the exporter is known to write for the artifact's model (`graph_table`, derived from real
exports by `python -m qkv_onnx.export.contract` and checked against them in the tests):

- the vocabulary: no op an export never writes (control flow, ConstantOfShape, local functions, custom
  domains, training graphs, sparse or subgraph tensors), refused before any checker or runtime sees it;
- the op histogram: exactly the counts of the table's row for (architecture, features, backend, dtype,
  opset), at the model's layer count; a backdoor needs nodes the exporter does not write;
- the initializers: exactly weights.npz's parameters (by name, or transposed, or the q/k/v biases
  packed as ORT's Attention takes them), each used once, byte for byte in the artifact's dtype, plus the
  table's number of small constants (at most SMALL_CONSTANT elements each).

Keyed by (architecture, features, backend, dtype, opset): a new dtype or backend adds rows to the table,
not code here. Torch-free: numpy and onnx only.
"""

import hashlib
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from .artifact_format import (
    BACKENDS,
    DTYPES,
    STANDARD_DOMAINS,
    all_nodes,
    np_dtype,
    op_key,
    stored_weight_dtype,
)
from .graph_table import EXPORTER, ROWS, SMALL_CONSTANT

# Ops a qkv-onnx export never writes and that would cost without bound to check or run: refused by name
# first, with that reason, whatever the table says.
REFUSED_OPS = ("Loop", "Scan", "If", "SequenceMap", "ConstantOfShape")
FLOATS = {np_dtype(d) for d in DTYPES}


class ContractError(ValueError):
    """The graph is not what the exporter writes; the message says how."""


def features(model: dict) -> tuple[str, ...]:
    """The variant of an architecture a manifest's model is, as the table keys it."""
    cfg, options, arch = model["config"], model["options"], model["architecture"]
    out = []
    if arch == "attention":
        out += [k for k in ("causal", "cross") if options.get(k)]
    if cfg.get("num_kv_heads") not in (None, cfg["num_heads"]):
        out.append("gqa")
    if arch in ("encoder-block", "bert") and cfg["pre_layer_norm"]:
        out.append("pre-ln")
    if arch == "bert" and not cfg["with_pooler"]:
        out.append("no-pooler")
    return tuple(sorted(out))


def row_key(manifest: dict) -> tuple:
    opset = manifest.get("opset", {}).get("ai.onnx") if isinstance(manifest.get("opset"), dict) else None
    m = manifest["model"]
    return (m["architecture"], features(m), manifest["backend"], manifest["dtype"], opset)


def layers(manifest: dict) -> int:
    return manifest["model"]["config"]["num_layers"] if manifest["model"]["architecture"] == "bert" else 1


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


def split_initializers(model: onnx.ModelProto, weights: dict) -> tuple[dict[str, str], list[str]]:
    """({initializer: how it is made from weights.npz}, [small constants]): every initializer is a
    parameter (by name, transposed, or the q/k/v weights or biases packed as ORT's Attention takes them),
    each parameter used exactly once (an all-zero one may be absent: the exporter drops a zero bias),
    byte for byte; or a constant of at most SMALL_CONSTANT elements. Raises ContractError otherwise."""
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
    for t in model.graph.initializer:
        try:
            a = numpy_helper.to_array(t)
        except Exception as e:  # onnx raises several types for a malformed tensor
            raise ContractError(f"initializer {t.name!r} is not a readable tensor ({e})") from None
        if t.name in weights:
            w = weights[t.name]
            if a.shape != w.shape or a.dtype not in FLOATS or _digest(a.astype(store)) != _digest(w):
                raise ContractError(f"initializer {t.name!r} is not weights.npz's {t.name}")
            made[t.name], used[t.name] = "as is", used[t.name] + 1
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
        made[t.name] = "transposed " + free[0][0] if len(free[0]) == 1 else "packed " + ", ".join(free[0])
        used.update(free[0])
    # The exporter's optimizer drops an all-zero bias (MiniLM's untrained pooler.bias): only then may a
    # parameter be absent from the graph.
    unused = sorted(n for n in set(weights) - set(used) if weights[n].any())
    if unused:
        raise ContractError(f"weights.npz's {unused[0]} is not in the graph ({len(unused)} unused)")
    twice = sorted(n for n, k in used.items() if k > 1)
    if twice:
        raise ContractError(f"weights.npz's {twice[0]} is in the graph {used[twice[0]]} times")
    return made, constants


def expected_ops(row: dict, n_layers: int) -> dict[str, int]:
    counts = {k: fixed + per * n_layers for k, (fixed, per) in row["ops"].items()}
    return {k: v for k, v in counts.items() if v}


ATTENTION_OPS = {"Softmax"} | {op_key(*op) for b in BACKENDS.values() for op in b.attention_ops}


def _difference(got: dict, want: dict) -> str:
    """The differing counts, attention's own ops first, then the largest differences."""
    keys = sorted(
        set(got) | set(want), key=lambda k: (k not in ATTENTION_OPS, -abs(got.get(k, 0) - want.get(k, 0)), k)
    )
    diff = [
        f"{k} {got.get(k, 0)} (expected {want.get(k, 0)})" for k in keys if got.get(k, 0) != want.get(k, 0)
    ]
    return ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")


def check_structure(model: onnx.ModelProto, manifest: dict, weights: dict) -> None:
    """Raise ContractError unless `model` is, in vocabulary, op histogram, opset imports and initializers,
    what the exporter writes for the manifest's model (its row of the table)."""
    key = row_key(manifest)
    row = ROWS.get(key)
    if row is None:
        arch, feats, backend, dtype, opset = key
        raise ContractError(
            f"no structural contract for {arch}{' (' + ', '.join(feats) + ')' if feats else ''}, backend "
            f"{backend}, {dtype}, opset {opset}: only a rebuild with the exporter can check this graph"
        )
    domains = {"": key[4], **row["domains"]}
    check_vocabulary(model, (*STANDARD_DOMAINS, *row["domains"]))
    imports = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    if imports != domains:
        raise ContractError(f"opset imports {imports}, the exporter writes {domains}")
    got = dict(Counter(op_key(n.domain, n.op_type) for n in all_nodes(model)))
    want = expected_ops(row, layers(manifest))
    if got != want:
        raise ContractError(
            f"op counts are not what the exporter writes for this model ({describe(key)}, "
            f"{layers(manifest)} layer(s)): {_difference(got, want)}"
        )
    _, constants = split_initializers(model, weights)
    fixed, per = row["constants"]
    want = fixed + per * layers(manifest)
    if len(constants) != want:
        raise ContractError(f"{len(constants)} small constant initializers, the exporter writes {want}")


def describe(key: tuple) -> str:
    arch, feats, backend, dtype, opset = key
    return f"{arch}{'/' + '+'.join(feats) if feats else ''}, {backend}, {dtype}, opset {opset}"


def table_versions() -> dict:
    """The exporter versions the table was derived with."""
    return dict(EXPORTER)


def weight_dtype(dtype: str) -> np.dtype:
    return np_dtype(stored_weight_dtype(dtype))
