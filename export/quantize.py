"""int8 artifacts: weights in int8, activations quantized at run time, from the float32 export of the same
model, with the fewest matrix products kept in float32 that make the accuracy contract hold.

The method is ONNX Runtime's dynamic quantization with per-channel int8 weights, restricted to MatMul and
Gemm: given an ONNX `Attention` node, `quantize_dynamic` writes com.microsoft `QAttention` and copies
`is_causal`, which QAttention rejects (the written model does not load), so the fused attention op stays
float32 in every backend (and the decomposed backend's QKᵀ and PV products, which have no weight).

The sensitivity search quantizes every product, runs the quantized and the float32 graph with their taps
exposed on calibration inputs (bundled sentences for checkpoints, seeded tokens otherwise), and attributes
the error each sublayer adds to that sublayer's products: the growth of the relative error from the tap
before it to the tap after it. While the contract fails, the group that adds the most goes back to float32.
"""

import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..accuracy_contract import LIMITS, judge, within, worst_values
from ..artifact_format import ARCHITECTURES, model_layers
from ..errors import ExportError
from ..graph_edit import expose
from ..stages import stage
from .taps import SCOPES_KEY, _Scopes

SETTINGS = {
    "method": "onnxruntime.quantization.quantize_dynamic",
    "weight_type": "QInt8",
    "activation_type": "QUInt8, per tensor, quantized at run time (dynamic)",
    "per_channel": True,
    "reduce_range": False,
    "op_types_to_quantize": ["MatMul", "Gemm"],
}
ATTENTION_STAYS_FLOAT = (
    "fused attention op: quantize_dynamic would rewrite ONNX Attention into com.microsoft QAttention and "
    "copy is_causal, which QAttention rejects; only MatMul and Gemm are quantized"
)
NO_WEIGHT = "QKᵀ / PV product of two run-time tensors: no weight to quantize"
KEPT = "kept in float32 by the sensitivity search: quantizing it broke the accuracy contract on calibration"
STAGE_SEARCH = "int8 sensitivity search"


def weight_products(model: onnx.ModelProto) -> dict[str, str]:
    """{node name: op type} of the MatMul and Gemm nodes that read a weight (an initializer)."""
    weights = {i.name for i in model.graph.initializer}
    return {
        n.name: n.op_type
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input[1:])
    }


def product_groups(model: onnx.ModelProto, architecture: str, num_layers: int) -> dict[str, list[str]]:
    """The weight-carrying MatMul / Gemm nodes by sublayer, in depth order: 'embeddings' (a projection),
    'layer k attention' (Q, K, V and output projections), 'layer k feed-forward', 'pooler'."""
    g = _Scopes(model)
    products = weight_products(model)
    layered = ARCHITECTURES[architecture].layered  # its sublayers are blocks.K.*
    prefixes = [f"blocks.{k}" for k in range(num_layers)] if layered else ["block"]
    groups: dict[str, list[str]] = {}
    for node, paths in zip(g.nodes, g.paths):
        if node.name not in products:
            continue
        group = _group(paths, architecture, prefixes)
        if group is None:
            raise ExportError(
                f"int8: {node.op_type} {node.name!r} belongs to no sublayer ({SCOPES_KEY} missing?)"
            )
        groups.setdefault(group, []).append(node.name)
    layers = [f"layer {k} {part}" for k in range(num_layers) for part in ("attention", "feed-forward")]
    order = ["embeddings", *layers, "pooler", "head"]
    return {name: groups[name] for name in order if name in groups}


def _group(paths: set[str], architecture: str, prefixes: list[str]) -> str | None:
    if "pooler" in paths:
        return "pooler"
    if "embeddings" in paths:  # ELECTRA's projection of the embeddings to the hidden size
        return "embeddings"
    arch = ARCHITECTURES[architecture]
    if arch.kind == "attention":
        return "layer 0 attention" if "attn" in paths else None
    if arch.cached and not any(p.startswith("blocks.") for p in paths):
        return "head"  # an untied LM head (a tied one multiplies by the embedding's Transpose: not quantized)
    for k, prefix in enumerate(prefixes):
        if f"{prefix}.attn" in paths:
            return f"layer {k} attention"
        if f"{prefix}.ffn" in paths:
            return f"layer {k} feed-forward"
    return None


@contextmanager
def quiet_quantizer():
    """quantize_dynamic advises "pre-processing" on the root logger at every call: silence it meanwhile."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize(float_path: Path, out_path: Path, keep_float: list[str]) -> None:
    """quantize_dynamic of every weight-carrying MatMul and Gemm except the nodes named in `keep_float`.
    Dynamic quantization first rewrites each Gemm as MatMul '<name>_MatMul' (+ Add of its bias) and matches
    the exclusions against the rewritten names (onnxruntime 1.31): a kept Gemm is excluded under both. The
    written graph must hold one MatMulInteger per product not kept, or ExportError."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    products = weight_products(onnx.load(str(float_path), load_external_data=False))
    exclude = [*keep_float, *(f"{n}_MatMul" for n in keep_float if products.get(n) == "Gemm")]
    with quiet_quantizer():
        quantize_dynamic(
            str(float_path),
            str(out_path),
            op_types_to_quantize=SETTINGS["op_types_to_quantize"],
            per_channel=SETTINGS["per_channel"],
            reduce_range=SETTINGS["reduce_range"],
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
        )
    written = onnx.load(str(out_path), load_external_data=False)
    got = sum(n.op_type == "MatMulInteger" for n in written.graph.node)
    want = len(set(products) - set(keep_float))
    if got != want:
        raise ExportError(
            f"int8: onnxruntime {_ort_version()}'s quantize_dynamic wrote {got} quantized products where "
            f"{want} of {len(products)} were asked for ({len(keep_float)} kept in float32)"
        )


def _run_with_taps(path: Path, taps: list[dict], cases: list) -> tuple[list[list[np.ndarray]], list[dict]]:
    """(outputs per case, {tap value: array} per case) of the graph at `path` on ORT CPU."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    n_out = len(model.graph.output)
    names = expose(model, [t["value"] for t in taps], "float32")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs, values = [], []
    for case in cases:
        got = session.run(None, dict(zip(inputs, case["inputs"])))
        outputs.append(got[:n_out])
        values.append(dict(zip(names, got)))
    return outputs, values


def _relative(a: np.ndarray, r: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - r) / max(np.linalg.norm(r), 1e-30))


def _growth(taps: list[dict], groups: list[str], values, reference, head_errors=()) -> dict[str, float]:
    """Per group, the largest growth over the cases of the taps' relative error across its sublayer."""
    index = {(t["tap"], t["layer"]): t["value"] for t in taps}
    errors = [
        {key: _relative(v[name], r[name]) for key, name in index.items()} for v, r in zip(values, reference)
    ]
    stream = [key for key in index if key[0] in ("embeddings", "attention_block", "block", "final_norm")]
    out = {}
    for group in groups:
        if group == "head":  # the logits: no tap, measured on the output
            out[group] = max(o - e[stream[-1]] for o, e in zip(head_errors, errors))
            continue
        if group == "pooler":
            before, after = stream[-1] if stream else None, ("pooler", None)
        elif group == "embeddings":  # the embeddings tap is the projection's output
            before, after = None, ("embeddings", None)
        else:
            k, part = int(group.split()[1]), group.split(" ", 2)[2]
            after = ("attention_block", k) if part == "attention" else ("block", k)
            if after not in index:  # attention-only model: its one tap is the attention output
                after = ("attention", k)
            position = stream.index(after) if after in stream else 0
            before = stream[position - 1] if position > 0 else None
        out[group] = max(e[after] - (e[before] if before else 0.0) for e in errors)
    return out


@dataclass
class Calibration:
    """The inputs the search runs: `search` chooses what stays float32; the result is accepted only if the
    contract holds with margin on `holdout`, never used to choose: its two disjoint halves `holdout[0]` and
    `holdout[1]` (lists of cases) and `holdout_whole` (the halves' sentences as one batch, or None)."""

    search: list
    holdout: tuple[list, list]
    holdout_whole: list = field(default_factory=list)

    def holdout_cases(self) -> list:
        return [*self.holdout[0], *self.holdout[1], *self.holdout_whole]


def _judge_all(cases: list, outputs: list, references: list) -> list:
    return [
        judge(got, ref, case["mask"], case["sentences"] and i == 0, case.get("logits", False) and i == 0)
        for case, outs, refs in zip(cases, outputs, references)
        for i, (got, ref) in enumerate(zip(outs, refs))
    ]


def holdout_verdict(results_a: list, results_b: list, results_whole: list) -> dict:
    """The contract on held-out inputs, with a margin: for each metric, its worst value over everything, and
    the margin it must clear the limit by: how far apart its worst values on the two disjoint halves are
    (the metric's own sampling error at this sample size: a user's sentences are another such sample).
    Passed when every worst value is within its limit by at least its margin."""
    half_a, half_b = worst_values(results_a), worst_values(results_b)
    worst = worst_values([*results_a, *results_b, *results_whole])
    out = {"worst": {}, "margin": {}, "failed": []}
    for key, value in worst.items():
        op, limit = LIMITS[key]
        margin = abs(half_a.get(key, value) - half_b.get(key, value))
        out["worst"][key], out["margin"][key] = round(value, 6), round(margin, 6)
        effective = value - margin if op == ">=" else value + margin
        if not within(effective, op, limit):
            out["failed"].append(key)
    out["passed"] = not out["failed"]
    return out


def search(
    float_path: Path, out_path: Path, architecture: str, cfg: dict, taps: list[dict], calibration: Calibration
) -> dict:
    """Quantize `float_path` to `out_path`, keeping in float32 the products of the fewest sublayers, in order
    of the error they add, that make the contract hold on the calibration's search cases ({inputs, mask,
    sentences}) against the float32 graph and then on its held-out cases with margin (holdout_verdict).
    The order comes from the all-int8 trial (the growth of the taps' error across each sublayer); how many of
    them stay float32 is found by bisection. Returns the manifest's quantization record; ExportError with
    the best result when no setting meets the contract."""
    model = onnx.load(str(float_path), load_external_data=False)
    groups = product_groups(model, architecture, model_layers(architecture, cfg))
    cases, held = calibration.search, calibration.holdout_cases()
    n_a, n_b = len(calibration.holdout[0]), len(calibration.holdout[1])
    reference_out, reference_taps = _run_with_taps(float_path, taps, cases)
    reference_taps = [{k: v.astype(np.float64) for k, v in r.items()} for r in reference_taps]
    held_reference = []
    steps, trials = [], {}

    def trial(kept: list[str], directory: Path) -> dict:
        path = directory / f"step{len(steps)}.onnx"
        quantize(float_path, path, [n for g in kept for n in groups[g]])
        outputs, values = _run_with_taps(path, taps, cases)
        results = _judge_all(cases, outputs, reference_out)
        worst = {k: round(v, 6) for k, v in worst_values(results).items()}
        step = {"float32_groups": list(kept), "contract": worst, "passed": all(r.passed for r in results)}
        if step["passed"]:
            if not held_reference:
                held_reference.extend(_run_with_taps(float_path, [], held)[0])
            per_case = [
                _judge_all([c], [o], [r])
                for c, o, r in zip(held, _run_with_taps(path, [], held)[0], held_reference)
            ]
            step["holdout"] = holdout_verdict(
                [r for case in per_case[:n_a] for r in case],
                [r for case in per_case[n_a : n_a + n_b] for r in case],
                [r for case in per_case[n_a + n_b :] for r in case],
            )
            step["passed"] = step["holdout"]["passed"]
        steps.append(step)
        trials[len(kept)] = (step, path)
        return step, values, outputs

    with stage(STAGE_SEARCH), tempfile.TemporaryDirectory(prefix="qkv-int8-") as tmp:
        first, values, outputs = trial([], Path(tmp))
        head = [_relative(o[0], r[0]) for o, r in zip(outputs, reference_out)]
        growth = _growth(taps, list(groups), values, reference_taps, head)
        order = sorted(groups, key=lambda g: -growth[g])
        if not first["passed"]:
            # bisection between all-int8 (fails) and all-float32, which is the float32 graph itself and so
            # passes: it is run only if the bisection ends there, to be written, and checked like any trial
            fails, passes = 0, len(order)
            while passes - fails > 1:
                middle = (fails + passes) // 2
                if trial(order[:middle], Path(tmp))[0]["passed"]:
                    passes = middle
                else:
                    fails = middle
            if passes == len(order) and not trial(order, Path(tmp))[0]["passed"]:
                step = steps[-1]
                what = "on held-out inputs, with margin" if "holdout" in step else "on the search inputs"
                got = step.get("holdout", {}).get("worst", step["contract"])
                raise ExportError(
                    f"int8: no setting meets the accuracy contract {what}; with every product in float32 "
                    f"it got {', '.join(f'{k} {v:.4f}' for k, v in got.items())}"
                )
        kept = order[: min(k for k, (step, _) in trials.items() if step["passed"])]
        final, path = trials[len(kept)]
        path.replace(out_path)
    float_nodes = [{"node": n, "why": KEPT, "group": g} for g in kept for n in groups[g]]
    sentences = sum(
        len(c["mask"]) for c in [*calibration.holdout[0], *calibration.holdout[1]] if c["sentences"]
    )
    return {
        **SETTINGS,
        "onnxruntime": _ort_version(),
        "quantized_products": sum(len(v) for g, v in groups.items() if g not in kept),
        "float_nodes": float_nodes,
        "float_ops": {"attention": ATTENTION_STAYS_FLOAT, "activation products": NO_WEIGHT},
        "search": {
            "calibration_cases": len(cases),
            "steps": steps,
            "reference": "the float32 graph (ORT CPU)",
        },
        "holdout": {
            **final["holdout"],
            "cases": len(held),
            "sentences": sentences,
            "limits": {k: list(LIMITS[k]) for k in final["holdout"]["worst"]},
            "margin_rule": "each worst value within its limit by |worst(half A) - worst(half B)|",
        },
    }


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
