"""Markdown and JSON renderings of validation results, and the compatibility matrix."""

import json
import re

import numpy as np

from ..artifact_format import ARTIFACT_DTYPES
from ..errors import one_line
from .parity import Report
from .results import Check, MatrixCell, SummaryRow, worst
from .runtimes import RUNTIMES

PEERS = {"pytorch": "PyTorch (live)", "pytorch-golden": "PyTorch (golden)"}
VERDICT = {"pass": "PASS", "fail": "FAIL", "error": "ERROR", "not judged": "NOT JUDGED"}


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


def group_checks(checks: list[Check]) -> dict[tuple[str, str, str], list[Check]]:
    """The checks of each (runtime, reference, output), in first-seen order: a summary row's cases."""
    groups: dict[tuple[str, str, str], list[Check]] = {}
    for c in checks:
        groups.setdefault((c.runtime, c.reference, c.output), []).append(c)
    return groups


def summary_row(runtime: str, ref: str, output: str, cs: list[Check]) -> SummaryRow:
    """The worst case over `cs`, the checks of one (runtime, reference, output)."""
    numbers = [c.metrics for c in cs if c.metrics is not None]
    w = worst(cs)
    return SummaryRow(
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
        atol_needed=w.metrics.atol_needed if w and not w.comparison.contract else None,
        atol=w.metrics.atol if w and not w.comparison.contract else None,
        errors=tuple(sorted({f"{c.case}: {c.error}" for c in cs if c.error is not None})),
        contract=f"{w.case}: {w.comparison.contract.describe()}" if w and w.comparison.contract else None,
    )


def summarize(checks: list[Check]) -> list[SummaryRow]:
    """One row per (runtime, reference, output): worst case over all inputs."""
    return [summary_row(*key, cs) for key, cs in group_checks(checks).items()]


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
                    atol=w.metrics.atol if w and not w.comparison.contract else None,
                    judged_dtype=status.judged_dtype,
                    reason=status.reason,
                    contract=w.comparison.contract.describe() if w and w.comparison.contract else None,
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
    if cell.contract is not None:
        verdict = ("pass" if cell.parity == "pass" else "FAIL") if cell.gating else "info"
        text += f", {verdict} (contract: {cell.contract})"
    elif cell.max_abs is not None:
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
        artifacts = {
            c.artifact: (c.backend, ARTIFACT_DTYPES.index(c.dtype)) for c in cells if c.model == model
        }
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


def locate_markdown(r: Report) -> list[str]:
    """The per-layer table of each located runtime and the first divergence line."""
    found = r.localization
    if found is None:
        return []
    lines = [f"### Where it diverges: {r.artifact}", ""] + [f"- {n}" for n in found.notes]
    first = found.first_divergence()
    lines += [f"- {first_divergence_line(first)}" if first else "- no tap diverges from the oracle", ""]
    for runtime in dict.fromkeys(c.runtime for c in found.checks):
        cases = sorted({c.case for c in found.checks if c.runtime == runtime})
        header = (
            "| tap | relative error | limit | pass |"
            if found.by_contract
            else "| tap | max abs | atol | pass |"
        )
        lines += [f"{label(runtime)}, cases {', '.join(cases)}:", "", header, "|---|---:|---:|---|"]
        lines += [
            f"| {tap} | {_fmt(err)} | {_fmt(atol)} | {'pass' if ok else 'FAIL'} |"
            for tap, err, atol, ok in found.table(runtime)
        ]
        lines.append("")
    return lines


def maps_markdown(r: Report) -> list[str]:
    maps = r.attention_maps
    if maps is None:
        return []
    heads = sum(len(layer.local) for layer in maps.layers)
    local = sum(sum(layer.local) for layer in maps.layers)
    lines = [
        f"### Attention maps: {r.artifact}",
        "",
        f"- from {label(maps.runtime)} on case {maps.case}: {local} of {heads} heads local (mass within "
        "±2 tokens ≥ 0.5 and ≥ twice a uniform head's); checked: the oracle's probabilities, rows sum to 1, "
        "padded keys 0",
        *[f"- {n}" for n in maps.notes],
        "",
        "| layer | local heads | mean entropy | mean distance | mean local mass | uniform local mass "
        "| mean first-token mass |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layer in maps.layers:
        lines.append(
            f"| {layer.layer} | {sum(layer.local)}/{len(layer.local)} | {np.mean(layer.entropy):.2f} "
            f"| {np.mean(layer.distance):.2f} | {np.mean(layer.local_mass):.2f} | {layer.uniform_local:.2f} "
            f"| {np.mean(layer.first_mass):.2f} |"
        )
    return [*lines, ""]


def first_divergence_line(c) -> str:
    where = f"on {RUNTIMES[c.runtime].label if c.runtime in RUNTIMES else c.runtime}, case {c.case}"
    m = c.comparison.metrics
    if m is None:
        return f"first divergence: {c.label} ({c.comparison.error}) {where}"
    if c.comparison.contract is not None:
        return f"first divergence: {c.label} ({c.comparison.contract.describe()}) {where}"
    return f"first divergence: {c.label} (max abs {m.max_abs:.1e} > atol {m.atol:.1e}) {where}"


def _result(row: SummaryRow) -> str:
    if row.gating:
        verdict = "pass" if row.passed else "FAIL"
    else:
        verdict = "info: within" if row.passed else "info: over"
    return f"{verdict} (contract: {row.contract})" if row.contract else verdict


def markdown(reports: list[Report], failures: dict[str, str], notes: list[str] = ()) -> str:
    lines = [f"- {md(n)}" for n in notes] + ([""] if notes else [])
    lines += matrix_markdown(reports)
    for r in reports:
        m = r.manifest
        lines += [
            f"## {md(r.artifact)}: {md(m['model']['name'])}, backend {m['backend']}, {m['dtype']} — "
            + VERDICT[r.verdict],
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
        lines += locate_markdown(r) + maps_markdown(r)
    for path, reason in failures.items():
        lines += [f"## {md(path)}: INVALID", "", f"- {md(reason)}", ""]
    lines.append(count_line(reports, failures))
    return "\n".join(lines) + "\n"


def count_line(reports: list[Report], invalid: dict[str, str]) -> str:
    """'Artifacts: 2 pass, 1 fail, 0 not judged, 0 invalid.' (a runtime that cannot run one: fail)."""
    verdicts = [r.verdict for r in reports]
    passed, unjudged = verdicts.count("pass"), verdicts.count("not judged")
    failed = len(verdicts) - passed - unjudged
    return f"Artifacts: {passed} pass, {failed} fail, {unjudged} not judged, {len(invalid)} invalid."


def _localization_json(r: Report) -> dict:
    found = r.localization
    if found is None:
        return {"first_divergence": None}
    first = found.first_divergence()
    return {
        "first_divergence": first and {**first.to_json(), "line": first_divergence_line(first)},
        "localization": {
            "notes": found.notes,
            "taps": found.order,
            "checks": [c.to_json() for c in found.checks],
        },
    }


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
                "verdict": r.verdict,
                "graph_check": r.graph_check,
                "notes": r.notes,
                "errors": r.errors,
                "runtimes": {name: s.to_json() for name, s in r.runtimes.items()},
                "summary": [row.to_json() for row in summarize(r.checks)],
                "checks": [c.to_json() for c in r.checks],
                **_localization_json(r),
                **({"attention_maps": r.attention_maps.to_json()} if r.attention_maps else {}),
            }
            for r in reports
        ],
        "matrix": [c.to_json() for c in matrix(reports)],
        "invalid": [{"artifact": p, "reason": reason} for p, reason in failures.items()],
    }
    return json.dumps(doc, indent=2) + "\n"
