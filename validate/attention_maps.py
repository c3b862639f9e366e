"""Attention maps from the deployed kernel, checked: the probabilities each attention op really
computed, taken from a private copy of the graph (ONNX `Attention` with `qk_matmul_output_mode=3` exposes
its post-softmax probabilities; the decomposed graph's Softmax output is them), judged against the
oracle's, with every row summing to 1 and every padded key at exactly 0. com.microsoft `Attention` has no
such output and `MultiHeadAttention`'s optional `qk` is the pre-softmax scores, so ort-contrib artifacts
have no maps.

Per layer and head: entropy of a query's distribution (nats), mean attention distance |i - j| in tokens, and
the share of a query's mass within ±2 tokens ("local mass"), averaged over the real tokens of each
sequence, next to what a uniform head would put within ±2 tokens on the same sequences. A head is *local*
when its local mass is at least 0.5 and at least twice the uniform share: most of what a query attends to
sits within five tokens of it, far more than chance (on a 12-token sentence chance alone puts ~0.4 there).
"""

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..artifact_format import QUANTIZED, io_dtype, side_files, tap_stages
from ..errors import ArtifactError, ProviderError
from ..graph_edit import expose, save_beside
from . import oracle
from .artifact import Artifact
from .compare import compare_contract, compare_outputs, model_error_terms, padding_mask, tolerance
from .results import Check
from .runtimes import open_runtime

LOCAL_WINDOW = 2  # tokens on each side
LOCAL_HEAD = 0.5  # local mass that makes a head local (and twice the uniform share)


class MapsUnavailable(Exception):
    """The artifact's attention op cannot expose its probabilities."""


@dataclass
class LayerMaps:
    layer: int
    probs: np.ndarray  # (B, H, Lq, Lk) as the runtime computed them
    entropy: list[float]  # per head
    distance: list[float]
    local_mass: list[float]
    uniform_local: float  # the local mass of a uniform head on the same sequences
    first_mass: list[float]  # mass on the first token ([CLS] for BERT): the "sink" many heads use

    @property
    def local(self) -> list[bool]:
        return [m >= max(LOCAL_HEAD, 2 * self.uniform_local) for m in self.local_mass]

    def to_json(self) -> dict:
        heads = zip(self.entropy, self.distance, self.local_mass, self.local, self.first_mass)
        return {
            "layer": self.layer,
            "uniform_local_mass": self.uniform_local,
            "heads": [
                {
                    "head": h,
                    "entropy": e,
                    "mean_distance": d,
                    "local_mass": m,
                    "local": local,
                    "first_token_mass": f,
                }
                for h, (e, d, m, local, f) in enumerate(heads)
            ],
        }


@dataclass
class AttentionMaps:
    runtime: str
    case: str
    layers: list[LayerMaps] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def local_share(self) -> float:
        heads = [local for layer in self.layers for local in layer.local]
        return sum(heads) / len(heads) if heads else float("nan")

    def to_json(self) -> dict:
        return {
            "runtime": self.runtime,
            "case": self.case,
            "local_window": LOCAL_WINDOW,
            "local_head_threshold": LOCAL_HEAD,
            "local_head_share": self.local_share,
            "layers": [layer.to_json() for layer in self.layers],
            "checks": [c.to_json() for c in self.checks],
            "files": self.files,
            "notes": self.notes,
        }


def maps_model(artifact: Artifact, directory: Path) -> tuple[Path, list[str], list[str]]:
    """A copy of the graph that outputs each attention op's probabilities: (path, all output names, the
    probability outputs in layer order). MapsUnavailable for a backend whose op cannot."""
    model = onnx.load(str(artifact.model_path), load_external_data=False)
    fused = [n for n in model.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    contrib = [n for n in model.graph.node if n.domain == "com.microsoft" and "Attention" in n.op_type]
    if contrib or not (fused or softmax):
        raise MapsUnavailable(
            f"backend {artifact.manifest['backend']}: com.microsoft Attention has no probabilities output "
            "and MultiHeadAttention's optional `qk` is the pre-softmax scores; export with --backend "
            "onnx-attention or decomposed for attention maps"
        )
    names = []
    for k, node in enumerate(fused):
        while len(node.output) < 3:
            node.output.append("")
        node.output.append(f"attention_probabilities_{k}")
        kept = [a for a in node.attribute if a.name != "qk_matmul_output_mode"]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("qk_matmul_output_mode", 3)])
        names.append(node.output[3])
    names += [n.output[0] for n in softmax]
    outputs = expose(model, names, io_dtype(artifact.manifest["dtype"]))
    return (
        save_beside(model, artifact.model_path.parent, side_files(artifact.manifest), directory),
        outputs,
        names,
    )


def head_statistics(
    probs: np.ndarray, mask: np.ndarray
) -> tuple[list[float], list[float], list[float], float]:
    """(entropy, mean distance, local mass) per head and the uniform head's local mass, over the real query
    tokens of every sequence. probs (B, H, L, L), mask (B, L) with 1 = real token."""
    p = probs.astype(np.float64)
    length = p.shape[-1]
    distance = np.abs(np.arange(length)[:, None] - np.arange(length)[None, :])  # (Lq, Lk)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)  # (B, H, Lq)
    mean_distance = (p * distance).sum(-1)
    local = (p * (distance <= LOCAL_WINDOW)).sum(-1)
    real = mask.astype(bool)[:, None, :]  # (B, 1, Lq)

    def per_head(x):
        return [float(x[:, h][real[:, 0]].mean()) for h in range(x.shape[1])]

    keys = mask.astype(np.float64)  # a uniform head: 1/n on each of the n real keys
    uniform = (keys[:, None, :] * (distance <= LOCAL_WINDOW)).sum(-1) / keys.sum(-1, keepdims=True)  # (B, Lq)
    chance = float(uniform[real[:, 0]].mean())
    return per_head(entropy), per_head(mean_distance), per_head(local), chance, per_head(p[..., 0])


def attention_maps(artifact: Artifact, runtime: str, case, judged_dtype: str) -> AttentionMaps:
    """Run `case` on `runtime` with the probabilities exposed; check and summarize them."""
    m, model = artifact.manifest, artifact.manifest["model"]
    found = AttentionMaps(runtime, case.name)
    with tempfile.TemporaryDirectory(prefix="qkv-maps-") as tmp:
        path, names, prob_names = maps_model(artifact, Path(tmp))
        session = open_runtime(runtime, path, artifact.limits, artifact.shown_model_path)
        try:
            got = dict(zip(names, session.run(case.inputs)))
        except (ProviderError, ArtifactError) as e:
            raise MapsUnavailable(
                f"{runtime} cannot run the graph with its probabilities exposed: {e}"
            ) from None
        finally:
            session.close()
    trace = oracle.Trace(probs=True)
    oracle.forward(
        model["architecture"], model["config"], model["options"], artifact.weights, case.inputs, trace
    )
    mask = padding_mask(case.inputs, m)
    k_len, _ = model_error_terms(m, mask.shape[1])
    for layer, name in enumerate(prob_names):
        probs, expected = got[name], trace.probs[layer]
        stages = tap_stages(model["architecture"], model["config"], "attention", layer)
        where = f"attention probabilities, layer {layer}"
        sums = probs.astype(np.float64).sum(-1)
        padded = probs.astype(np.float64)[np.broadcast_to(~mask.astype(bool)[:, None, None, :], probs.shape)]
        if m["dtype"] in QUANTIZED:  # the probability rows of an int8 model, by the contract's token metrics
            vs_oracle = compare_contract(probs, expected, None, False)
        else:
            tol = tolerance(judged_dtype, k_len, stages)  # softmax halves score errors: judged at their scale
            vs_oracle = compare_outputs(probs, expected, tol, trace.score_scales[layer])
        row_tol = tolerance(
            io_dtype(judged_dtype) if judged_dtype in QUANTIZED else judged_dtype, mask.shape[1], 2
        )
        found.checks += [
            Check(runtime, case.name, where, "oracle", vs_oracle),
            Check(
                runtime, case.name, where, "rows sum to 1", compare_outputs(sums, np.ones_like(sums), row_tol)
            ),
        ]
        if padded.size:  # a case without padding has nothing to look at here (write_maps adds one that has)
            zeros = compare_outputs(padded, np.zeros_like(padded), 0.0)
            found.checks.append(Check(runtime, case.name, where, "padded keys are 0", zeros))
        found.layers.append(LayerMaps(layer, probs, *head_statistics(probs, mask)))
    return found


def write_maps(report, artifact: Artifact, directory: Path, sentences: list[str]) -> None:
    """--attention-maps: the maps of the first gating runtime that ran the artifact, on the --text sentences
    (else golden set 0: padded rows, none all padding; also on golden set 0 when the sentences have no
    padding, so that padded keys are looked at); PNG heatmaps of the first sequence, one per layer, and
    attention.json under directory/<artifact>/. Their checks join the report's; a backend that cannot
    expose its probabilities is a report error (exit 2: the maps were asked for)."""
    from .plots import INSTALL_HINT, heatmap

    m = artifact.manifest
    ran = [name for name, status in report.runtimes.items() if status.loads and status.gating]
    case = next((run.case for name, run in report.runs.items() if name.startswith("text_")), None)
    case = case or next(report.runs[name].case for name in ("golden_0", "b1xs7") if name in report.runs)
    if not ran:
        report.errors.append(f"{artifact.path}: --attention-maps: no gating runtime ran the artifact")
        return
    try:
        found = attention_maps(artifact, ran[0], case, report.runtimes[ran[0]].judged_dtype)
    except MapsUnavailable as e:
        report.errors.append(f"{artifact.path}: --attention-maps: {e}")
        return
    report.checks += found.checks
    if padding_mask(case.inputs, artifact.manifest).all():  # nothing padded to look at: a case that has
        padded = next(r.case for r in report.runs.values() if not padding_mask(r.case.inputs, m).all())
        found.notes.append(f"{case.name} has no padding: padded keys are checked on case {padded.name}")
        report.checks += attention_maps(artifact, ran[0], padded, report.runtimes[ran[0]].judged_dtype).checks
    out = directory / artifact.name
    out.mkdir(parents=True, exist_ok=True)
    mask = padding_mask(case.inputs, artifact.manifest)
    n = int(mask[0].sum())
    tokens = _tokens(artifact, case.inputs[0][0][:n]) if sentences else None
    title = f"{artifact.name}, {sentences[0]!r}" if sentences else f"{artifact.name}, {case.name} sequence 0"
    for layer in found.layers:
        path = out / f"layer_{layer.layer}.png"
        if heatmap(
            layer.probs[0, :, :n, :n].astype(np.float32), tokens, f"{title}: layer {layer.layer}", path
        ):
            found.files.append(str(path))
    if not found.files:
        found.notes.append(f"no heatmaps: matplotlib is not installed ({INSTALL_HINT})")
    (out / "attention.json").write_text(json.dumps(found.to_json(), indent=2) + "\n")
    report.attention_maps = found


def _tokens(artifact: Artifact, ids: np.ndarray) -> list[str]:
    from ..text import token_strings

    return token_strings(artifact.path / artifact.manifest["checkpoint"]["tokenizer"], ids)
