"""The GitHub Actions job summary: when GITHUB_STEP_SUMMARY names a file, qkv-validate appends (never
overwrites: other steps write there too) the verdict, the compatibility matrix and the rows that fail, so a
reviewer sees them on the run's page without opening the log.

The summary is a convenience, not a verdict: a summary file that cannot be written is a warning line on
stderr, and the exit code stays what the checks decided (--junit and --json are the outputs to rely on)."""

import os
from pathlib import Path

from ..errors import EXIT_FAILED, EXIT_NOT_JUDGED, EXIT_OK, one_line
from .parity import Report
from .report import count_line, label, matrix_markdown, summarize

ENV = "GITHUB_STEP_SUMMARY"
MAX_ROWS = 50  # GitHub keeps 1 MiB of summary per step; the rest is in --junit / --json


def _cell(text: str) -> str:
    """A stranger's string as one Markdown table cell: one line, no HTML, no column break."""
    return one_line(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _e(x: float | None) -> str:
    return "—" if x is None else f"{x:.2e}"


def summary_markdown(reports: list[Report], invalid: dict[str, str], exit_code: int) -> str:
    verdicts = {EXIT_OK: "PASS", EXIT_FAILED: "FAIL", EXIT_NOT_JUDGED: "NOT JUDGED"}
    verdict = verdicts.get(exit_code, "INVALID INPUT")
    if exit_code == EXIT_OK and any(r.verdict == "not judged" for r in reports):
        verdict = "NOT JUDGED, accepted by --allow-unjudged"
    lines = [f"## qkv-validate: {verdict} (exit {exit_code})", "", count_line(reports, invalid), ""]
    lines += [
        line.replace("## ", "### ", 1) if line.startswith("## ") else line
        for line in matrix_markdown(reports)
    ]
    failing = []
    for r in reports:
        for row in summarize(r.checks):
            if row.errors or (row.gating and not row.passed):
                result = "ERROR" if row.errors else "FAIL"
                detail = "; ".join(row.errors[:3]) + (" …" if len(row.errors) > 3 else "")
                failing.append(
                    f"| {_cell(r.artifact)} | {_cell(label(row.runtime))} | {_cell(row.reference)} "
                    f"| {_cell(row.output)} | {row.cases} | {_e(row.atol_needed)} | {_e(row.atol)} "
                    f"| {result} | {_cell(detail)} |"
                )
    if failing:
        lines += [
            "### Failing rows",
            "",
            "Worst case over all inputs per runtime × reference × output.",
            "",
            "| artifact | runtime | vs | output | cases | max abs (worst case) | atol | result | errors |",
            "|---|---|---|---|---:|---:|---:|---|---|",
            *failing[:MAX_ROWS],
            "",
        ]
        if len(failing) > MAX_ROWS:
            lines += [f"… and {len(failing) - MAX_ROWS} more rows: see the --junit or --json report.", ""]
    unjudged = [r for r in reports if r.verdict == "not judged"]
    if unjudged:
        lines += ["### Not judged (skipped, not passed)", ""]
        lines += [
            f"- {_cell(r.artifact)}: no gating runtime compared the graph's outputs (ran: "
            f"{_cell(', '.join(label(n) for n, s in r.runtimes.items() if s.loads) or 'none')})"
            for r in unjudged
        ] + [""]
    problems = [e for r in reports for e in r.errors] + list(invalid.values())  # each names its file
    if problems:
        lines += ["### Invalid artifacts and runtimes that cannot run them", ""]
        lines += [f"- {_cell(reason)}" for reason in problems] + [""]
    return "\n".join(lines) + "\n"


def append_step_summary(text: str, environ=os.environ) -> str | None:
    """Append `text` to the file GITHUB_STEP_SUMMARY names, if it is set. Returns a warning when the
    file cannot be written (the caller prints it; the exit code does not change), else None."""
    target = environ.get(ENV)
    if not target:
        return None
    try:
        with Path(target).open("a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        return (
            f"cannot append the job summary to {ENV}={target}: {e.strerror or e}; the exit code is unchanged"
        )
    return None
