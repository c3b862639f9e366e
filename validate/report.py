"""Markdown and JSON renderings of validation results, and the compatibility matrix."""

import json
import re

from ..artifact_format import DTYPES
from ..errors import one_line
from .parity import Report
from .results import Check, MatrixCell, SummaryRow, worst
from .runtimes import RUNTIMES

PEERS = {"pytorch": "PyTorch (live)", "pytorch-golden": "PyTorch (golden)"}


_MARKDOWN = str.maketrans({c: "\\" + c for c in "\\`*[]<>|~&"})
_EMPHASIS_UNDERSCORE = re.compile(r"(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")  # inside a word, _ is plain text


def md(text) -> str:
    """Text an artifact or a runtime supplies (a model or file name, an error), made inert in Markdown: on
    one line (control characters escaped), and every character that means something inline (emphasis,
    code, links and images, HTML, table cells) backslash-escaped. The text is always placed after a list
    marker or other text, so characters that matter only at the start of a line cannot start a block."""
    return _EMPHASIS_UNDERSCORE.sub(r"\\_", one_line(str(text)).translate(_MARKDOWN))


def label(runtime: str) -> str:
    return PEERS[runtime] if runtime in PEERS else RUNTIMES[runtime].short if runtime in RUNTIMES else runtime


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2e}"


def summarize(checks: list[Check]) -> list[SummaryRow]:
    """One row per (runtime, reference, output): worst case over all inputs."""
    groups: dict[tuple[str, str, str], list[Check]] = {}
    for c in checks:
        groups.setdefault((c.runtime, c.reference, c.output), []).append(c)
    rows = []
    for (runtime, ref, output), cs in groups.items():
        numbers = [c.metrics for c in cs if c.metrics is not None]
        w = worst(cs)
        rows.append(
            SummaryRow(
                runtime=runtime,
                reference=ref,
                output=output,
                cases=len(cs),
                passed=all(c.passed for c in cs),
                gating=all(c.decides for c in cs),
                max_abs=max((n.max_abs for n in numbers), default=None),
                max_rel=max((n.max_rel for n in numbers), default=None),
                mean_abs=max((n.mean_abs for n in numbers), default=None),
                cosine_min=min((n.cosine for n in numbers), default=None),
                atol_needed=w.metrics.atol_needed if w else None,
                atol=w.metrics.atol if w else None,
                errors=tuple(sorted({f"{c.case}: {c.error}" for c in cs if c.error is not None})),
            )
        )
    return rows


def matrix(reports: list[Report]) -> list[MatrixCell]:
    """Compatibility matrix: one cell per artifact x runtime asked for: does it load, does it run, and
    its parity (every check of that runtime; worst error against the oracle)."""
    cells = []
    for r in reports:
        m = r.manifest
        for runtime, status in r.runtimes.items():
            checks = [c for c in r.checks if c.runtime == runtime]
            w = worst(c for c in checks if c.reference == "oracle")
            parity = None if not checks else "pass" if all(c.passed for c in checks) else "fail"
            cells.append(
                MatrixCell(
                    model=m["model"]["name"],
                    backend=m["backend"],
                    dtype=m["dtype"],
                    artifact=r.artifact,
                    runtime=runtime,
                    loads=status.loads,
                    runs=status.runs,
                    parity=parity,
                    gating=status.gating,
                    max_abs=w.metrics.max_abs if w else None,
                    atol=w.metrics.atol if w else None,
                    judged_dtype=status.judged_dtype,
                    reason=status.reason,
                )
            )
    return cells


def _cell(cell: MatrixCell, footnotes: list[str]) -> str:
    def note(text):
        if text not in footnotes:
            footnotes.append(text)
        return f" [{footnotes.index(text) + 1}]"

    if cell.loads is None:
        return "not run" + note(md(cell.reason))
    if not cell.loads:
        return "does not load" + note(md(cell.reason))
    text = "loads, " + ("runs" if cell.runs else "run fails" + note(md(cell.reason)))
    if cell.max_abs is not None:
        verdict = ("pass" if cell.parity == "pass" else "FAIL") if cell.gating else "info"
        text += f", {verdict} {cell.max_abs:.1e} {'≤' if cell.max_abs <= cell.atol else '>'} {cell.atol:.1e}"
        text += f" ({cell.judged_dtype} tolerance)" if cell.judged_dtype != cell.dtype else ""
    elif cell.parity == "fail":
        text += ", FAIL"
    return text


def matrix_markdown(reports: list[Report]) -> list[str]:
    cells = matrix(reports)
    lines = []
    for model in dict.fromkeys(c.model for c in cells):
        runtimes = list(dict.fromkeys(c.runtime for c in cells if c.model == model))
        footnotes = []
        lines += [
            f"## Compatibility matrix: {md(model)}",
            "",
            "Each cell: does the runtime load the artifact, does it run every case, and its parity "
            "(worst max abs error against the oracle ≤ allowed; info = reported, not gating).",
            "",
            "| backend | dtype | " + " | ".join(label(rt) for rt in runtimes) + " |",
            "|---|---|" + "---|" * len(runtimes),
        ]
        artifacts = {c.artifact: (c.backend, DTYPES.index(c.dtype)) for c in cells if c.model == model}
        for artifact in sorted(artifacts, key=artifacts.get):
            row = {c.runtime: c for c in cells if c.artifact == artifact}
            first = next(iter(row.values()))
            lines.append(
                f"| {first.backend} | {first.dtype} | "
                + " | ".join(_cell(row[rt], footnotes) if rt in row else "—" for rt in runtimes)
                + " |"
            )
        lines += [""] + [f"{n}. {text}" for n, text in enumerate(footnotes, 1)] + ([""] if footnotes else [])
    return lines


def _result(row: SummaryRow) -> str:
    if row.gating:
        return "pass" if row.passed else "FAIL"
    return "info: within" if row.passed else "info: over"


def markdown(reports: list[Report], failures: dict[str, str], notes: list[str] = ()) -> str:
    lines = [f"- {md(n)}" for n in notes] + ([""] if notes else [])
    lines += matrix_markdown(reports)
    for r in reports:
        m = r.manifest
        lines += [
            f"## {md(r.artifact)}: {md(m['model']['name'])}, backend {m['backend']}, {m['dtype']} — "
            + ("PASS" if r.passed else "FAIL"),
            "",
        ]
        lines += [f"- {md(n)}" for n in r.notes] + [f"- ERROR: {md(e)}" for e in r.errors] + [""]
        lines += [
            "| runtime | vs | output | cases | max abs | max rel | mean abs | cosine min | atol needed "
            "| atol allowed | result |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in summarize(r.checks):
            cos = "—" if row.cosine_min is None else f"{row.cosine_min:.9f}"
            lines.append(
                f"| {label(row.runtime)} | {row.reference} | {md(row.output)} "
                f"| {row.cases} | {_fmt(row.max_abs)} | {_fmt(row.max_rel)} | {_fmt(row.mean_abs)} "
                f"| {cos} | {_fmt(row.atol_needed)} | {_fmt(row.atol)} | {_result(row)} |"
            )
            lines += [f"|  | ↳ {md(e)} |  |  |  |  |  |  |  |  |  |" for e in row.errors[:3]]
        lines.append("")
    for path, reason in failures.items():
        lines += [f"## {md(path)}: INVALID", "", f"- {md(reason)}", ""]
    passed = sum(r.passed for r in reports)
    lines.append(f"Artifacts: {passed} pass, {len(reports) - passed} fail, {len(failures)} invalid.")
    return "\n".join(lines) + "\n"


def to_json(reports: list[Report], failures: dict[str, str], exit_code: int, notes: list[str] = ()) -> str:
    doc = {
        "exit_code": exit_code,
        "notes": list(notes),
        "artifacts": [
            {
                "artifact": r.artifact,
                "model": r.manifest["model"]["name"],
                "backend": r.manifest["backend"],
                "dtype": r.manifest["dtype"],
                "passed": r.passed,
                "graph_check": r.graph_check,
                "notes": r.notes,
                "errors": r.errors,
                "runtimes": {name: s.to_json() for name, s in r.runtimes.items()},
                "summary": [row.to_json() for row in summarize(r.checks)],
                "checks": [c.to_json() for c in r.checks],
            }
            for r in reports
        ],
        "matrix": [c.to_json() for c in matrix(reports)],
        "invalid": [{"artifact": p, "reason": reason} for p, reason in failures.items()],
    }
    return json.dumps(doc, indent=2) + "\n"
