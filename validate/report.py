"""Markdown and JSON renderings of validation results, and the compatibility matrix."""
import json

from .artifact import DTYPES
from .parity import decides
from .runtimes import RUNTIMES

PEERS = {"pytorch": "PyTorch (live)", "pytorch-golden": "PyTorch (golden)"}


def label(runtime: str) -> str:
    return PEERS[runtime] if runtime in PEERS else RUNTIMES[runtime].short if runtime in RUNTIMES else runtime


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.2e}"


def summarize(checks: list) -> list:
    """One row per (runtime, reference, output): worst case over all inputs."""
    groups = {}
    for c in checks:
        groups.setdefault((c["runtime"], c["reference"], c["output"]), []).append(c)
    rows = []
    for (runtime, ref, output), cs in groups.items():
        ok = [c for c in cs if "max_abs" in c]
        worst = max(ok, key=lambda c: c["max_abs"] / c["atol"] if c["atol"] else float("inf"), default=None)
        errors = sorted({f"{c['case']}: {c['error']}" for c in cs if "error" in c})
        rows.append({
            "runtime": runtime, "reference": ref, "output": output, "cases": len(cs),
            "passed": all(c["passed"] for c in cs), "gating": all(decides(c) for c in cs),
            "max_abs": max((c["max_abs"] for c in ok), default=None),
            "max_rel": max((c["max_rel"] for c in ok), default=None),
            "mean_abs": max((c["mean_abs"] for c in ok), default=None),
            "cosine_min": min((c["cosine"] for c in ok), default=None),
            "atol_needed": worst["atol_needed"] if worst else None,
            "atol": worst["atol"] if worst else None,
            "errors": errors,
        })
    return rows


def matrix(reports: list) -> list:
    """Compatibility matrix: one row per artifact x runtime asked for: does it load, does it run, and
    its parity (every check of that runtime; worst error against the oracle)."""
    rows = []
    for r in reports:
        m = r.manifest
        for runtime, status in r.runtimes.items():
            checks = [c for c in r.checks if c["runtime"] == runtime]
            vs_oracle = [c for c in checks if c["reference"] == "oracle" and "max_abs" in c]
            worst = max(vs_oracle, key=lambda c: c["max_abs"] / c["atol"] if c["atol"] else float("inf"), default=None)
            parity = None if not checks else "pass" if all(c["passed"] for c in checks) else "fail"
            rows.append({"model": m["model"]["name"], "backend": m["backend"], "dtype": m["dtype"], "artifact": r.artifact,
                         "runtime": runtime, "loads": status["loads"], "runs": status["runs"], "parity": parity,
                         "gating": status["gating"], "max_abs": worst and worst["max_abs"],
                         "atol": worst and worst["atol"], "judged_dtype": status.get("judged_dtype"),
                         "reason": status["reason"]})
    return rows


def _cell(row: dict, footnotes: list) -> str:
    def note(text):
        if text not in footnotes:
            footnotes.append(text)
        return f" [{footnotes.index(text) + 1}]"
    if row["loads"] is None:
        return "not run" + note(row["reason"])
    if not row["loads"]:
        return "does not load" + note(row["reason"])
    text = "loads, " + ("runs" if row["runs"] else "run fails" + note(row["reason"]))
    if row["max_abs"] is not None:
        verdict = ("pass" if row["parity"] == "pass" else "FAIL") if row["gating"] else "info"
        text += f", {verdict} {row['max_abs']:.1e} {'≤' if row['max_abs'] <= row['atol'] else '>'} {row['atol']:.1e}"
        text += f" ({row['judged_dtype']} tolerance)" if row["judged_dtype"] != row["dtype"] else ""
    elif row["parity"] == "fail":
        text += ", FAIL"
    return text


def matrix_markdown(reports: list) -> list:
    rows = matrix(reports)
    lines = []
    for model in dict.fromkeys(row["model"] for row in rows):
        runtimes = list(dict.fromkeys(row["runtime"] for row in rows if row["model"] == model))
        footnotes = []
        lines += [f"## Compatibility matrix: {model}", "",
                  "Each cell: does the runtime load the artifact, does it run every case, and its parity "
                  "(worst max abs error against the oracle ≤ allowed; info = reported, not gating).", "",
                  "| backend | dtype | " + " | ".join(label(rt) for rt in runtimes) + " |",
                  "|---|---|" + "---|" * len(runtimes)]
        artifacts = {row["artifact"]: (row["backend"], DTYPES.index(row["dtype"])) for row in rows if row["model"] == model}
        for artifact in sorted(artifacts, key=artifacts.get):
            cells = {row["runtime"]: row for row in rows if row["artifact"] == artifact}
            first = next(iter(cells.values()))
            lines.append(f"| {first['backend']} | {first['dtype']} | " + " | ".join(
                _cell(cells[rt], footnotes) if rt in cells else "—" for rt in runtimes) + " |")
        lines += [""] + [f"{n}. {text}" for n, text in enumerate(footnotes, 1)] + ([""] if footnotes else [])
    return lines


def markdown(reports: list, failures: dict, notes: list = ()) -> str:
    lines = [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += matrix_markdown(reports)
    for r in reports:
        m = r.manifest
        lines += [f"## {r.artifact}: {m['model']['name']}, backend {m['backend']}, {m['dtype']} — "
                  + ("PASS" if r.passed else "FAIL"), ""]
        lines += [f"- {n}" for n in r.notes] + [f"- ERROR: {e}" for e in r.errors] + [""]
        lines += ["| runtime | vs | output | cases | max abs | max rel | mean abs | cosine min | atol needed | atol allowed | result |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in summarize(r.checks):
            cos = "—" if row["cosine_min"] is None else f"{row['cosine_min']:.9f}"
            result = ("pass" if row["passed"] else "FAIL") if row["gating"] else ("info: within" if row["passed"]
                                                                                  else "info: over")
            lines.append(f"| {label(row['runtime'])} | {row['reference']} | {row['output']} "
                         f"| {row['cases']} | {_fmt(row['max_abs'])} | {_fmt(row['max_rel'])} | {_fmt(row['mean_abs'])} "
                         f"| {cos} | {_fmt(row['atol_needed'])} | {_fmt(row['atol'])} | {result} |")
            lines += [f"|  | ↳ {e} |  |  |  |  |  |  |  |  |  |" for e in row["errors"][:3]]
        lines.append("")
    for path, reason in failures.items():
        lines += [f"## {path}: INVALID", "", f"- {reason}", ""]
    passed = sum(r.passed for r in reports)
    lines.append(f"Artifacts: {passed} pass, {len(reports) - passed} fail, {len(failures)} invalid.")
    return "\n".join(lines) + "\n"


def to_json(reports: list, failures: dict, exit_code: int, notes: list = ()) -> str:
    doc = {
        "exit_code": exit_code,
        "notes": list(notes),
        "artifacts": [{"artifact": r.artifact, "model": r.manifest["model"]["name"], "backend": r.manifest["backend"],
                       "dtype": r.manifest["dtype"], "passed": r.passed, "notes": r.notes, "errors": r.errors,
                       "runtimes": r.runtimes,
                       "summary": summarize(r.checks), "checks": r.checks} for r in reports],
        "matrix": matrix(reports),
        "invalid": [{"artifact": p, "reason": reason} for p, reason in failures.items()],
    }
    return json.dumps(doc, indent=2) + "\n"
