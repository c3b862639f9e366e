"""Typed validation results: what a comparison found, one check, a runtime's status, a summary row, a matrix
cell. The Markdown and JSON reports and the matrix read these fields; `to_json()` gives the JSON form."""

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from ..accuracy_contract import ContractResult


@dataclass(frozen=True)
class Metrics:
    """How far an output is from its reference; `atol` is what the policy allowed."""

    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    scale: float  # max |reference|
    atol: float

    @property
    def atol_needed(self) -> float:
        """The smallest atol that would have passed."""
        return self.max_abs

    @property
    def ratio(self) -> float:
        """max_abs / atol: above 1 fails."""
        if self.atol > 0:
            return self.max_abs / self.atol
        return 0.0 if self.max_abs == 0 else math.inf


@dataclass(frozen=True)
class Comparison:
    """compare_outputs' result: metrics, or the error that makes numbers meaningless (shape, NaN/Inf). A
    quantized artifact is judged by the accuracy contract instead of the rounding tolerance (`contract`;
    its metrics are then informative and its atol infinite)."""

    tol: float
    metrics: Metrics | None = None
    error: str | None = None
    contract: ContractResult | None = None

    @property
    def passed(self) -> bool:
        if self.error is not None or self.metrics is None:
            return False
        if self.contract is not None:
            return self.contract.passed
        return self.metrics.max_abs <= self.metrics.atol

    def __bool__(self) -> bool:
        return self.passed


PYTORCH = ("pytorch", "pytorch-golden")  # PyTorch judged against the oracle: says nothing about the graph


@dataclass(frozen=True)
class Check:
    """One output of one case on one runtime against one reference."""

    runtime: str  # a runtime name, or one of PYTORCH when PyTorch itself is judged
    case: str
    output: str
    reference: str  # 'oracle', 'golden', 'pytorch', or 'backend NAME'
    comparison: Comparison
    gating: bool = True  # False: a runtime whose numbers are reported, not judged (openvino-default)

    @property
    def passed(self) -> bool:
        return self.comparison.passed

    @property
    def metrics(self) -> Metrics | None:
        return self.comparison.metrics

    @property
    def error(self) -> str | None:
        return self.comparison.error

    @property
    def decides(self) -> bool:
        """Whether this check counts for pass/fail: a non-gating runtime's errors (run failures, NaN/Inf)
        still do, its numbers do not."""
        return self.gating or self.error is not None

    @property
    def judges_graph(self) -> bool:
        """Whether this check compared numbers the ONNX graph computed, on a runtime whose numbers decide."""
        return self.gating and self.runtime not in PYTORCH and self.metrics is not None

    @property
    def verdict(self) -> str:
        """'error' (no numbers: a run, shape or NaN/Inf failure), 'pass', 'fail', or 'info' (numbers of a
        non-gating runtime)."""
        if self.error is not None:
            return "error"
        if not self.gating:
            return "info"
        return "pass" if self.passed else "fail"

    def to_json(self) -> dict:
        doc = {
            "runtime": self.runtime,
            "case": self.case,
            "output": self.output,
            "reference": self.reference,
            "passed": self.passed,
            "tol": self.comparison.tol if math.isfinite(self.comparison.tol) else None,
            "gating": self.gating,
            "verdict": self.verdict,
        }
        if self.error is not None:
            return {**doc, "error": self.error}
        m = self.metrics
        doc = {**doc, **asdict(m), "atol_needed": m.atol_needed}
        if self.comparison.contract is not None:  # no rounding tolerance: JSON has no infinity
            doc.update(tol=None, atol=None, contract=self.comparison.contract.to_json())
        return doc


def failed_check(runtime: str, case: str, output: str, reference: str, error: str, tol: float) -> Check:
    return Check(runtime, case, output, reference, Comparison(tol, error=error))


def worst(checks: Iterable[Check]) -> Check | None:
    """The check with numbers closest to (or furthest past) its limit, or None when no check has numbers:
    by max abs / atol, or, under the accuracy contract, a failed contract first, then the largest relative
    error."""
    return max((c for c in checks if c.metrics is not None), key=_severity, default=None)


def _severity(c: Check) -> tuple:
    contract = c.comparison.contract
    if contract is not None:
        return (not contract.passed, contract.values.get("relative_error", 0.0))
    return (c.metrics.max_abs > c.metrics.atol, c.metrics.ratio)


@dataclass
class RuntimeStatus:
    """What one runtime did with one artifact: the compatibility matrix's raw material."""

    label: str
    gating: bool
    loads: bool | None = None  # None: not tried (skipped, with the reason)
    runs: bool | None = None
    reason: str | None = None
    judged_dtype: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SummaryRow:
    """The worst case over all inputs for one (runtime, reference, output)."""

    runtime: str
    reference: str
    output: str
    cases: int
    passed: bool
    gating: bool
    max_abs: float | None
    max_rel: float | None
    mean_abs: float | None
    cosine_min: float | None
    atol_needed: float | None
    atol: float | None
    errors: tuple[str, ...]
    contract: str | None = None  # quantized artifacts: the worst case's contract metrics (misses first)

    def to_json(self) -> dict:
        return {**asdict(self), "errors": list(self.errors)}


@dataclass(frozen=True)
class MatrixCell:
    """Artifact x runtime: does it load, does it run, and its parity (worst error against the oracle)."""

    model: str
    backend: str
    dtype: str
    artifact: str
    runtime: str
    loads: bool | None
    runs: bool | None
    parity: str | None  # 'pass', 'fail', or None when nothing was compared
    gating: bool
    max_abs: float | None
    atol: float | None
    judged_dtype: str | None
    reason: str | None
    contract: str | None = None  # quantized artifacts: the worst check against the oracle, by the contract

    def to_json(self) -> dict:
        return asdict(self)
