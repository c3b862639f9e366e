"""Where a model diverges: run the artifact with its taps exposed and compare each with the oracle's value.

The artifact on disk is never changed: a private copy of the graph gains the tap values as extra outputs,
and the runtime that failed runs it on the failing cases. Every tap is judged under the tolerance policy
with the sublayers computed up to it (`tap_stages`); the first tap that fails, in the order the model
computes them, is where it diverges.
"""

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..accuracy_contract import RELATIVE_ERROR_MAX
from ..artifact_format import QUANTIZED, io_dtype, side_files, tap_label, tap_stages
from ..errors import ArtifactError, ProviderError, first_line
from ..graph_edit import expose, save_beside
from . import oracle
from .artifact import Artifact
from .compare import (
    compare_contract,
    compare_outputs,
    key_length,
    model_error_terms,
    padding_mask,
    tolerance,
)
from .results import Comparison
from .runtimes import open_runtime


@dataclass(frozen=True)
class TapCheck:
    """One tap of one case on one runtime against the oracle's value."""

    runtime: str
    case: str
    tap: str
    layer: int | None
    comparison: Comparison

    @property
    def label(self) -> str:
        return tap_label(self.tap, self.layer)

    @property
    def passed(self) -> bool:
        return self.comparison.passed

    def to_json(self) -> dict:
        c = self.comparison
        doc = {
            "runtime": self.runtime,
            "case": self.case,
            "tap": self.tap,
            "layer": self.layer,
            "label": self.label,
            "passed": self.passed,
            "tol": c.tol,
        }
        if c.error is not None:
            return {**doc, "error": c.error}
        return {
            **doc,
            "max_abs": c.metrics.max_abs,
            "atol": c.metrics.atol,
            "max_rel": c.metrics.max_rel,
            "cosine": c.metrics.cosine,
        }


@dataclass
class Localization:
    """The taps of one artifact on the runtimes that were located, and where it first diverges."""

    checks: list[TapCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # tap labels in computation order

    def first_divergence(self) -> TapCheck | None:
        """The earliest failing tap over every located runtime and case (the worst of them at that depth)."""
        failing = [c for c in self.checks if not c.passed]
        if not failing:
            return None
        depth = min(self.order.index(c.label) for c in failing)
        at = [c for c in failing if self.order.index(c.label) == depth]
        return max(at, key=lambda c: c.comparison.metrics.ratio if c.comparison.metrics else float("inf"))

    @property
    def by_contract(self) -> bool:
        """Whether the taps were judged by the accuracy contract (a quantized artifact)."""
        return any(c.comparison.contract is not None for c in self.checks)

    def table(self, runtime: str) -> list[tuple[str, float | None, float | None, bool]]:
        """(tap, worst error, its bound, pass) per tap in computation order, over the located cases: max abs
        and atol, or under the contract the relative error and its limit."""
        rows = []
        for label in self.order:
            cs = [c for c in self.checks if c.runtime == runtime and c.label == label]
            if not cs:
                continue
            numbers = [c for c in cs if c.comparison.metrics is not None]
            if self.by_contract:
                err = max((c.comparison.contract.values["relative_error"] for c in numbers), default=None)
                rows.append((label, err, RELATIVE_ERROR_MAX, all(c.passed for c in cs)))
                continue
            worst = max(numbers, key=lambda c: c.comparison.metrics.ratio, default=None)
            m = worst.comparison.metrics if worst else None
            rows.append((label, m and m.max_abs, m and m.atol, all(c.passed for c in cs)))
        return rows


def tap_model(artifact: Artifact, directory: Path) -> tuple[Path, list[str]]:
    """A copy of the artifact's graph in `directory` with every tap value as an extra graph output; returns
    its path and the names of its outputs in order."""
    model = onnx.load(str(artifact.model_path), load_external_data=False)
    names = expose(
        model, [t["value"] for t in artifact.manifest["taps"]], io_dtype(artifact.manifest["dtype"])
    )
    return save_beside(model, artifact.model_path.parent, side_files(artifact.manifest), directory), names


def _initializers(artifact: Artifact, names: set[str]) -> dict[str, np.ndarray]:
    """The graph's own values of the initializers a tap adds (the runtime computed with these bytes)."""
    if not names:
        return {}
    model = onnx.load(str(artifact.model_path), load_external_data=False)
    found = {i.name: i for i in model.graph.initializer if i.name in names}
    if found.keys() != names:
        raise ProviderError(
            f"{artifact.model_path}: tap initializer(s) {sorted(names - found.keys())} not in the graph"
        )
    onnx.external_data_helper.load_external_data_for_model(model, str(artifact.model_path.parent))
    return {
        i.name: numpy_helper.to_array(i).astype(np.float64)
        for i in model.graph.initializer
        if i.name in names
    }


def locate(
    artifact: Artifact, runtimes: list[str], cases: list, judged: dict[str, str], found: Localization
) -> None:
    """Run `cases` on each runtime with the taps exposed and judge every tap against
    the oracle at the tolerance of the dtype the runtime is judged in (`judged`). Adds to `found`."""
    m = artifact.manifest
    adds = _initializers(artifact, {t["add"] for t in m["taps"] if t["add"]})
    found.order = [tap_label(t["tap"], t["layer"]) for t in m["taps"]]
    with tempfile.TemporaryDirectory(prefix="qkv-locate-") as tmp:
        path, names = tap_model(artifact, Path(tmp))
        for name in runtimes:
            session = open_runtime(name, path, artifact.limits, artifact.shown_model_path)
            try:
                session.wait_open()
            except (ProviderError, ArtifactError) as e:
                found.notes.append(f"{name}: cannot run the graph with its taps exposed: {first_line(e)}")
                continue
            try:
                _judge_cases(artifact, session, name, cases, names, adds, judged, found)
            finally:
                session.close()


def _judge_cases(
    artifact: Artifact, session, name: str, cases: list, names: list, adds: dict, judged: dict, found
) -> None:
    """Run each case on `session` (the tapped graph) and judge every tap of runtime `name` into `found`."""
    m = artifact.manifest
    model = m["model"]
    for case in cases:
        trace = getattr(case, "trace", None)
        if trace is None:
            trace = oracle.Trace()
            args = (model["architecture"], model["config"], model["options"], artifact.weights)
            oracle.forward(*args, case.inputs, trace)
        try:
            got = dict(zip(names, session.run(case.inputs)))
        except Exception as e:  # the runtime's failure on the tapped graph: reported, not our bug
            found.notes.append(f"{name}: the tapped graph failed on {case.name}: {first_line(e)}")
            continue
        k, _ = model_error_terms(m, key_length(case.inputs, m))
        mask = padding_mask(case.inputs, m)
        for tap in m["taps"]:
            stages = tap_stages(model["architecture"], model["config"], tap["tap"], tap["layer"])
            value = got[tap["value"]].astype(np.float64)
            if tap["add"]:
                value = value + adds[tap["add"]]
            expected = trace.taps[tap["tap"], tap["layer"]]
            if m["dtype"] in QUANTIZED:  # int8: the contract's token metrics at every depth
                comparison = compare_contract(value, expected, mask, False)
            else:
                comparison = compare_outputs(value, expected, tolerance(judged[name], k, stages))
            found.checks.append(TapCheck(name, case.name, tap["tap"], tap["layer"], comparison))
