"""Runtimes that execute an artifact, one adapter each (a `Runtime` subclass, see base.py):
ONNX Runtime per execution provider (ort.py), onnx's ReferenceEvaluator (reference.py) and
OpenVINO's CPU plugin (openvino.py), plus any adapter another distribution registers in the
entry-point group `qkv_onnx.runtimes` (docs/runtimes.md). The comparison and report code take
whatever is registered."""

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from ...errors import first_line
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

ENTRY_POINT_GROUP = "qkv_onnx.runtimes"
BUILT_IN = {cls.name: cls for cls in (OrtCpu, OrtCuda, Reference, OpenVino, OpenVinoDefault)}


def _plugin_problem(name: str, cls, registry: dict) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, Runtime)):
        return "it is not a qkv_onnx.validate.runtimes.Runtime subclass"
    if cls.name != name:
        return f"its class says name {cls.name!r}, the entry point {name!r}"
    if name in registry:
        return "a runtime of that name is already registered"
    if not cls.label or not cls.short:
        return "it sets no label or short name"
    return None


def load_plugins(registry: dict) -> list[str]:
    """Add the adapters registered by installed distributions under ENTRY_POINT_GROUP to `registry`;
    returns a note for each one that is refused (it never stops the built-in runtimes)."""
    notes = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        try:
            cls = ep.load()
        except Exception as e:  # a third party's import error: reported, never ours to crash on
            notes.append(f"runtime plugin {ep.name!r} ({ep.value}) does not load: {first_line(e)}")
            continue
        problem = _plugin_problem(ep.name, cls, registry)
        if problem:
            notes.append(f"runtime plugin {ep.name!r} ({ep.value}) refused: {problem}")
            continue
        registry[ep.name] = cls
    return notes


RUNTIMES = dict(BUILT_IN)
PLUGIN_NOTES = load_plugins(RUNTIMES)

__all__ = [
    "BUILT_IN",
    "ENTRY_POINT_GROUP",
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


def open_runtime(name: str, model_path, limits=None, shown=None):
    """Runtime `name` on `model_path`, hosted in a sandbox (a child process under `limits`, by default
    sized from the model file; see validate.sandbox) with the adapter's interface. `shown`: the path
    messages name instead of `model_path` (the artifact's file when `model_path` is a private copy).
    The session is opening when this returns; `wait_open()` (or the first run) waits for it. ProviderError
    when it cannot load the model; a plugin's own exception counts as that too (the third party's failure,
    reported as a finding); a built-in adapter's unexpected exception is a bug of ours and propagates."""
    from ..sandbox import Limits, SandboxedRuntime

    if limits is None:
        path = Path(model_path)
        side = path.with_name(path.name + ".data")
        limits = Limits.for_model(path.stat().st_size + (side.stat().st_size if side.exists() else 0))
    return SandboxedRuntime(RUNTIMES[name], model_path, limits, shown, plugin=name not in BUILT_IN)


@dataclass(frozen=True)
class Selection:
    """What --providers resolved to: the runtimes to run, notes for the report, whether it was auto, and
    (under auto) each runtime that cannot run on this machine with the reason."""

    names: list[str]
    notes: list[str]
    auto: bool
    unavailable: dict[str, str] = field(default_factory=dict)


def select_runtimes(text: str) -> Selection:
    """--providers: a comma list, or 'auto' for every runtime that works here and computes something no
    other one does (Runtime.redundant). Under auto, a runtime known to lack what an artifact needs
    (capability_gap) is skipped with a note; asked for by name, it is an error. Raises ProviderError for an
    unknown name or a runtime that cannot run on this machine (with its install hint when it is an optional
    install)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if names == ["auto"]:
        problems = {name: cls.problem() or cls.redundant() for name, cls in RUNTIMES.items()}
        found = [name for name, problem in problems.items() if problem is None]
        unavailable = {name: problem for name, problem in problems.items() if problem}
        missing = {}
        for name, problem in unavailable.items():
            missing.setdefault(problem, []).append(name)
        note = f"--providers auto found: {', '.join(found)}" + "".join(
            f" (no {', '.join(who)}: {problem})" for problem, who in missing.items()
        )
        return Selection(found, [note, *PLUGIN_NOTES], True, unavailable)
    unknown = [p for p in names if p not in RUNTIMES]
    if unknown or not names:
        raise ProviderError(
            f"unknown provider(s) {unknown or text!r}; available: {', '.join(RUNTIMES)}, or auto"
        )
    for name in dict.fromkeys(names):
        problem = RUNTIMES[name].problem()
        if problem:
            raise ProviderError(f"--providers {name}: {RUNTIMES[name].label} cannot run here: {problem}")
    return Selection(list(dict.fromkeys(names)), list(PLUGIN_NOTES), False)


def parse_providers(text: str) -> tuple:
    """(runtime names, notes, auto) for --providers: select_runtimes() as a tuple."""
    s = select_runtimes(text)
    return s.names, s.notes, s.auto
