"""Validation under a memory budget: what each stage holds, estimated from the manifest before anything is
loaded, and a plan that runs the stages together, one after another, or not at all, with a line saying so.

The estimates are per process, measured here (peak resident memory) on 0.12B and 1.1B Llama-style
artifacts: an ONNX Runtime CPU session holds about 1.6x the model's file bytes when the weights are inside
model.onnx and 1.0x when they are external data; the exporter's rebuild about 3.6x the weights when it
exports the model whole and well under 1x when it stitches it from a two-layer template (export/graph.py);
the interpreter with torch 0.6 GiB. The weights themselves are memory-mapped from the private copy (page
cache, not the heap), and the torch reference shares them.
"""

import math
import re
from dataclasses import dataclass, field

from ..artifact_format import io_dtype
from ..graph_contract import weight_dtype

GIB = 1 << 30
INTERPRETER = 0.6 * GIB  # one Python process with numpy, onnx and torch imported
SESSION_BASE = 0.3 * GIB  # a runtime's process, and per byte of model file: weights inside it, external
SESSION_PER_MODEL_BYTE = {False: 1.7, True: 1.0}
REBUILD_BASE = 0.6 * GIB  # the exporter, and per byte of weights: exported whole, stitched
REBUILD_PER_WEIGHT_BYTE = {False: 4.0, True: 1.0}
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": GIB, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'24G', '1.5GiB', '800M', '123456' (bytes) -> bytes; ValueError on anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([kmgt])(?:i?b)?|b)?\s*", text.lower())
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 16G, 1.5GiB, 800M)")
    size = int(float(m.group(1)) * UNITS[m.group(2) or ""])
    if size <= 0:
        raise ValueError(f"not a positive size: {text!r}")
    return size


def available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes: what the machine can give without swapping (None elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


@dataclass(frozen=True)
class Needs:
    """Bytes each stage holds beyond the others, for one artifact."""

    main: float  # the validating process: interpreter, the oracle's activations, the torch peer's own copy
    oracle64: float  # the float64 weights the oracle keeps when it converts them once
    session: float  # one runtime's sandboxed process
    rebuild: float  # the exporter's sandboxed child
    largest: float = 0  # the largest tensor in float64, what the oracle converting per read holds at once


def needs(manifest: dict, tokens: int, stitched: bool = False) -> Needs:
    """Estimates from the manifest: its weights' count and dtype, its model files' bytes, and the oracle's
    activations on `tokens` positions of the longest case; `stitched`: whether the rebuild stitches it."""
    from ..artifact_format import MODEL, largest_weight, weight_totals

    m = manifest["model"]
    count = weight_totals(m["architecture"], m["config"])[1]
    largest = largest_weight(m["architecture"], m["config"])
    stored = count * weight_dtype(manifest["dtype"]).itemsize
    model_bytes = sum(e["bytes"] for r, e in manifest["files"].items() if r.startswith(MODEL))
    cfg = m["config"]
    width = max(cfg.get("hidden_size", 0), cfg.get("ffn_size", 0), cfg.get("vocab_size", 0))
    heads = cfg.get("num_heads", 1)
    activations = 8 * 4 * (tokens * width + heads * tokens * tokens)  # float64; a few live at once
    peer = count * 2 if io_dtype(manifest["dtype"]) == "bfloat16" else 0  # its bfloat16 copy of the weights
    return Needs(
        main=INTERPRETER + activations + peer,
        oracle64=count * 8,
        largest=largest * 8,
        session=SESSION_BASE + SESSION_PER_MODEL_BYTE[MODEL + ".data" in manifest["files"]] * model_bytes,
        rebuild=REBUILD_BASE + REBUILD_PER_WEIGHT_BYTE[stitched] * max(stored, count * 4),
    )


@dataclass
class Plan:
    """How validation runs its stages: the oracle's weights converted once (`oracle_cached`) or per read;
    the rebuild 'beside' the runtimes, 'after' them, or 'skip' (the structural contract judges the graph);
    at most `sessions` runtimes (None: all). `notes` say what was changed and why."""

    budget: int | None = None
    oracle_cached: bool = True
    rebuild: str = "beside"
    sessions: int | None = None
    notes: list[str] = field(default_factory=list)


def plan(n: Needs, budget: int | None, runtimes: int, rebuild: bool) -> Plan:
    """The fastest arrangement whose estimated peak fits `budget` (None: no budget, everything at once)."""
    if budget is None:
        return Plan()
    choices = [(True, "beside"), (False, "beside"), (True, "after"), (False, "after")]
    for cached, when in choices if rebuild else [(True, "skip"), (False, "skip")]:
        beside = n.main + (n.oracle64 if cached else n.largest) + runtimes * n.session
        peak = beside + (n.rebuild if when == "beside" else 0)
        if when == "after":
            peak = max(peak, n.main + n.rebuild)  # the oracle's weights are gone by then
        if peak <= budget:
            return _described(Plan(budget, cached, when), n, peak)
    p = Plan(budget, False, "skip")
    if rebuild:
        p.notes.append(
            f"rebuild not run: the exporter needs ~{gib(n.main + n.rebuild)}, more than the budget of "
            f"{gib(budget)} (--max-memory): the structural contract judges the graph"
        )
    main = n.main + n.largest
    fit = max(0, math.floor((budget - main) / n.session)) if budget > main else 0
    if fit < runtimes:
        p.sessions = fit
        p.notes.append(
            f"{runtimes - fit} of {runtimes} runtime(s) not run: each needs ~{gib(n.session)} beside the "
            f"validator's ~{gib(main)}, the budget is {gib(budget)} (--max-memory)"
        )
    return _described(p, n, main + min(fit, runtimes) * n.session)


def _described(p: Plan, n: Needs, peak: float) -> Plan:
    """`p` with a line saying what it changed from running everything at once."""
    changed = []
    if not p.oracle_cached:
        changed.append(f"the oracle converts weights to float64 per read (~{gib(n.oracle64)} if kept)")
    if p.rebuild == "after":
        changed.append(f"the rebuild (~{gib(n.rebuild)}) runs after the runtimes close")
    head = f"memory plan: budget {gib(p.budget)}, estimated peak {gib(peak)}"
    p.notes.insert(0, head + ("; " + "; ".join(changed) if changed else ": every stage at once"))
    return p
