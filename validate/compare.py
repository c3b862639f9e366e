"""Comparison metrics and the tolerance policy (docs/tolerance.md explains it for users).

An output passes when
    max |actual - reference| <= atol,   atol = tol(dtype) * max |reference|
i.e. the error is judged relative to the output's scale (encoder outputs are LayerNorm-ed,
O(1); an elementwise rtol would fail near zeros for no reason). With u the dtype's unit
roundoff, K the longest accumulation (max of hidden, ffn and key length) and S the
number of sequential stages (2 per encoder block, +2 for embeddings and pooler; a decoder block's q/k norms
and norms after its sublayers add theirs: artifact_format.block_stages):
  float32: tol = u * sqrt(K) * S. Each dot product of length K accumulated in float32 has a
           typical (probabilistic, Higham 2002 §3.5) error of u*sqrt(K) relative to its scale;
           residual sublayers pass errors on with gain about 1 (LayerNorm renormalizes), so
           they add up over S.
  float16: tol = u16 * 8 * S. CPU kernels (MLAS, NumPy, PyTorch) accumulate float16 products
           in float32, so the float16 error is the rounding of stored intermediates, about 4
           per sublayer (projections, attention, LayerNorm, FFN activation) with gain up to 2.
  bfloat16: tol = u_bf16 * 8 * S, the float16 argument with an 8-bit mantissa.
The provider enters only through the accumulation precision, float32 on every runtime judged
(ORT CPU; ORT CUDA with TF32 off, which its sessions force; NumPy), so one policy per dtype.
An output that ends in a contraction (the pooler's tanh) is judged at the scale of its pre-activation:
its error is that accumulation's, passed on undiminished while tanh shrinks the values.
Against PyTorch (golden data or a live run) or a sibling backend, which have their own
rounding, the tolerance is doubled. NaN or Inf in either side never passes, nor does a comparison of
nothing (an empty reference is an error of the check that asked for it).
"""

import math

import numpy as np

from ..accuracy_contract import judge
from ..artifact_format import ARCHITECTURES, block_stages
from ..decoder_format import head_dim
from .results import Comparison, Metrics

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
FP16_ROUNDINGS_PER_STAGE = 8


def tolerance(dtype: str, accumulation_length: int, stages: int) -> float:
    """Allowed max abs error relative to the reference's max abs value."""
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError(f"no tolerance policy for dtype {dtype!r}")
    per_stage = (
        math.sqrt(accumulation_length) if dtype in ("float32", "float64") else FP16_ROUNDINGS_PER_STAGE
    )
    return UNIT_ROUNDOFF[dtype] * per_stage * stages


FFN_IN = ("ffn.fc1.weight", "ffn.up_proj.weight")  # the feed-forward's first product: its width


def model_error_terms(manifest: dict, key_length: int, weights: dict | None = None) -> tuple[int, int]:
    """(K, S) of the tolerance policy for the model an artifact holds. With `weights`, from the parameters
    actually present (widths of the projections and the FFN, the number of blocks), not the config: the
    config must match them exactly, and cannot widen the tolerance."""
    architecture, cfg = manifest["model"]["architecture"], manifest["model"]["config"]
    arch = ARCHITECTURES[architecture]
    if weights is None:
        hidden, ffn, layers = cfg["hidden_size"], cfg["ffn_size"], cfg["num_layers"]
        if arch.cached:  # an explicit head width may make the query wider than the hidden size
            hidden = max(hidden, cfg["num_heads"] * head_dim(cfg))
    else:
        hidden = max(max(w.shape) for k, w in weights.items() if k.endswith("q_proj.weight"))  # in or out
        ffn = max((w.shape[0] for k, w in weights.items() if k.endswith(FFN_IN)), default=0)
        layers = len({k.split(".")[1] for k in weights if k.startswith("blocks.")})
    widest = hidden if arch.kind == "attention" else max(hidden, ffn)
    stages = layers * sum(block_stages(architecture, cfg)) + 2 if arch.layered else 2
    return max(widest, key_length), stages


def padding_mask(inputs: list, manifest: dict):
    """A case's padding mask (batch, keys), 1 = a real token; None for a model without one."""
    return next((x for x, spec in zip(inputs, manifest["inputs"]) if spec["role"] == "padding_mask"), None)


def key_length(inputs: list, manifest: dict) -> int:
    """Longest key sequence of a case: the padding mask is (batch, keys)."""
    mask = padding_mask(inputs, manifest)
    return 1 if mask is None else mask.shape[1]


def first_nonfinite(a: np.ndarray) -> str:
    idx = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
    return f"{a[idx]} at index {idx} ({int((~np.isfinite(a)).sum())} non-finite values)"


def compare_outputs(actual, reference, tol: float, scale_floor: float = 0.0) -> Comparison:
    """Metrics of `actual` against `reference` and the verdict under `tol` (see module docstring).
    `scale_floor`: the scale of the value the output's last accumulation produced, where a contraction
    follows it (tanh is 1-Lipschitz: it passes that accumulation's error on while shrinking the values)."""
    actual, reference = np.asarray(actual), np.asarray(reference)
    if actual.shape != reference.shape:
        return Comparison(tol, error=f"shape {list(actual.shape)}, expected {list(reference.shape)}")
    if not np.isfinite(actual).all():
        return Comparison(tol, error="non-finite output: " + first_nonfinite(actual))
    if not np.isfinite(reference).all():
        return Comparison(tol, error="non-finite reference: " + first_nonfinite(reference))
    if not reference.size:  # nothing compared is never a pass: the check that asked has a bug or no case
        return Comparison(
            tol, error=f"nothing to compare: the reference is empty (shape {list(reference.shape)})"
        )
    a, r = actual.astype(np.float64), reference.astype(np.float64)
    diff = np.abs(a - r)
    scale = max(float(np.abs(r).max()), scale_floor)
    floor = max(scale * 1e-6, np.finfo(np.float64).tiny)
    norms = np.linalg.norm(a) * np.linalg.norm(r)
    cosine = float((a.ravel() @ r.ravel()) / norms) if norms > 0 else float(np.array_equal(a, r))
    metrics = Metrics(
        max_abs=float(diff.max()),
        max_rel=float((diff / np.maximum(np.abs(r), floor)).max()),
        mean_abs=float(diff.mean()),
        cosine=cosine,
        scale=scale,
        atol=tol * scale if math.isfinite(tol) else math.inf,
    )
    return Comparison(tol, metrics)


def compare_contract(actual, reference, mask, sentences: bool, logits: bool = False) -> Comparison:
    """A quantized artifact's output against a float reference: the accuracy contract decides (metrics kept
    for the report, atol infinite); shape and NaN/Inf failures as in compare_outputs."""
    c = compare_outputs(actual, reference, math.inf)
    if c.error is not None:
        return c
    return Comparison(c.tol, c.metrics, contract=judge(actual, reference, mask, sentences, logits))
