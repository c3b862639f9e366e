"""Runtimes that execute an artifact, one adapter each (a `Runtime` subclass, see base.py):
ONNX Runtime per execution provider (ort.py), onnx's ReferenceEvaluator (reference.py) and
OpenVINO's CPU plugin (openvino.py). Adding a runtime is one adapter and one entry in RUNTIMES;
the comparison and report code take whatever is registered."""

from pathlib import Path

from .base import ProviderError, Runtime
from .openvino import OpenVino, OpenVinoDefault
from .ort import (
    OrtCpu,
    OrtCuda,
    OrtSession,
    cost_model_nodes,
    cpu_placement,
    cuda_problem,
    parse_placements,
    placement_log,
    single_node_model,
)
from .reference import Reference

RUNTIMES = {cls.name: cls for cls in (OrtCpu, OrtCuda, Reference, OpenVino, OpenVinoDefault)}

__all__ = [
    "RUNTIMES",
    "OrtSession",
    "ProviderError",
    "Reference",
    "Runtime",
    "capability_gap",
    "cost_model_nodes",
    "cpu_placement",
    "cuda_problem",
    "open_runtime",
    "parse_placements",
    "parse_providers",
    "placement_log",
    "single_node_model",
]


def capability_gap(name: str, artifact) -> str | None:
    """Why runtime `name` is known not to run this artifact (a dtype or op domain it lacks), or None."""
    return RUNTIMES[name].gap(artifact)


def open_runtime(name: str, model_path, limits=None, shown=None):
    """Runtime `name` on `model_path`, hosted in a sandbox (a child process under `limits`, by default
    sized from the model file; see validate.sandbox) with the adapter's interface. `shown`: the path
    messages name instead of `model_path` (the artifact's file when `model_path` is a private copy).
    The session is opening when this returns; `wait_open()` (or the first run) waits for it."""
    from ..sandbox import Limits, SandboxedRuntime

    if limits is None:
        path = Path(model_path)
        side = path.with_name(path.name + ".data")
        limits = Limits.for_model(path.stat().st_size + (side.stat().st_size if side.exists() else 0))
    return SandboxedRuntime(RUNTIMES[name], model_path, limits, shown)


def parse_providers(text: str) -> tuple:
    """(runtime names, notes, auto) for --providers: a comma list, or 'auto' for every runtime that
    works here. Under auto, a runtime known to lack what an artifact needs (capability_gap) is skipped
    with a note; asked for by name, it is an error. Raises ProviderError for an unknown name or a
    runtime that cannot run on this machine (with its install hint when it is an optional install)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if names == ["auto"]:
        problems = {name: cls.problem() for name, cls in RUNTIMES.items()}
        found = [name for name, problem in problems.items() if problem is None]
        missing = {}
        for name, problem in problems.items():
            if problem:
                missing.setdefault(problem, []).append(name)
        note = f"--providers auto found: {', '.join(found)}" + "".join(
            f" (no {', '.join(who)}: {problem})" for problem, who in missing.items()
        )
        return found, [note], True
    unknown = [p for p in names if p not in RUNTIMES]
    if unknown or not names:
        raise ProviderError(
            f"unknown provider(s) {unknown or text!r}; available: {', '.join(RUNTIMES)}, or auto"
        )
    for name in dict.fromkeys(names):
        problem = RUNTIMES[name].problem()
        if problem:
            raise ProviderError(f"--providers {name}: {RUNTIMES[name].label} cannot run here: {problem}")
    return list(dict.fromkeys(names)), [], False
