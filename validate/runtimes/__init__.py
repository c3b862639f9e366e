"""Runtimes that execute an artifact, one adapter each (a `Runtime` subclass, see base.py):
ONNX Runtime per execution provider (ort.py), onnx's ReferenceEvaluator (reference.py) and
OpenVINO's CPU plugin (openvino.py). Adding a runtime is one adapter and one entry in RUNTIMES;
the comparison and report code take whatever is registered."""

from dataclasses import dataclass, field

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
    "Selection",
    "capability_gap",
    "cost_model_nodes",
    "cpu_placement",
    "cuda_problem",
    "open_runtime",
    "parse_placements",
    "parse_providers",
    "placement_log",
    "select_runtimes",
    "single_node_model",
]


def capability_gap(name: str, artifact) -> str | None:
    """Why runtime `name` is known not to run this artifact (a dtype or op domain it lacks), or None."""
    return RUNTIMES[name].gap(artifact)


def open_runtime(name: str, model_path) -> Runtime:
    return RUNTIMES[name](model_path)


@dataclass(frozen=True)
class Selection:
    """What --providers resolved to: the runtimes to run, notes for the report, whether it was auto, and
    (under auto) each runtime that cannot run on this machine with the reason."""

    names: list[str]
    notes: list[str]
    auto: bool
    unavailable: dict[str, str] = field(default_factory=dict)


def select_runtimes(text: str) -> Selection:
    """--providers: a comma list, or 'auto' for every runtime that works here. Under auto, a runtime
    known to lack what an artifact needs (capability_gap) is skipped with a note; asked for by name, it is
    an error. Raises ProviderError for an unknown name or a runtime that cannot run on this machine (with
    its install hint when it is an optional install)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if names == ["auto"]:
        problems = {name: cls.problem() for name, cls in RUNTIMES.items()}
        found = [name for name, problem in problems.items() if problem is None]
        unavailable = {name: problem for name, problem in problems.items() if problem}
        missing = {}
        for name, problem in unavailable.items():
            missing.setdefault(problem, []).append(name)
        note = f"--providers auto found: {', '.join(found)}" + "".join(
            f" (no {', '.join(who)}: {problem})" for problem, who in missing.items()
        )
        return Selection(found, [note], True, unavailable)
    unknown = [p for p in names if p not in RUNTIMES]
    if unknown or not names:
        raise ProviderError(
            f"unknown provider(s) {unknown or text!r}; available: {', '.join(RUNTIMES)}, or auto"
        )
    for name in dict.fromkeys(names):
        problem = RUNTIMES[name].problem()
        if problem:
            raise ProviderError(f"--providers {name}: {RUNTIMES[name].label} cannot run here: {problem}")
    return Selection(list(dict.fromkeys(names)), [], False)


def parse_providers(text: str) -> tuple:
    """(runtime names, notes, auto) for --providers: select_runtimes() as a tuple."""
    s = select_runtimes(text)
    return s.names, s.notes, s.auto
