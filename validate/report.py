"""Markdown and JSON renderings of validation results."""
import json

RUNTIME_LABELS = {"cpu": "ORT CPU", "cuda": "ORT CUDA", "reference": "onnx reference", "pytorch": "PyTorch (live)",
                  "pytorch-golden": "PyTorch (golden)"}


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
            "passed": all(c["passed"] for c in cs),
            "max_abs": max((c["max_abs"] for c in ok), default=None),
            "max_rel": max((c["max_rel"] for c in ok), default=None),
            "mean_abs": max((c["mean_abs"] for c in ok), default=None),
            "cosine_min": min((c["cosine"] for c in ok), default=None),
            "atol_needed": worst["atol_needed"] if worst else None,
            "atol": worst["atol"] if worst else None,
            "errors": errors,
        })
    return rows


def markdown(reports: list, failures: dict, notes: list = ()) -> str:
    lines = [f"- {n}" for n in notes] + ([""] if notes else [])
    for r in reports:
        m = r.manifest
        lines += [f"## {r.artifact}: {m['model']['name']}, backend {m['backend']}, {m['dtype']} — "
                  + ("PASS" if r.passed else "FAIL"), ""]
        lines += [f"- {n}" for n in r.notes] + [""]
        lines += ["| runtime | vs | output | cases | max abs | max rel | mean abs | cosine min | atol needed | atol allowed | result |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in summarize(r.checks):
            cos = "—" if row["cosine_min"] is None else f"{row['cosine_min']:.9f}"
            lines.append(f"| {RUNTIME_LABELS.get(row['runtime'], row['runtime'])} | {row['reference']} | {row['output']} "
                         f"| {row['cases']} | {_fmt(row['max_abs'])} | {_fmt(row['max_rel'])} | {_fmt(row['mean_abs'])} "
                         f"| {cos} | {_fmt(row['atol_needed'])} | {_fmt(row['atol'])} | {'pass' if row['passed'] else 'FAIL'} |")
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
                       "dtype": r.manifest["dtype"], "passed": r.passed, "notes": r.notes,
                       "summary": summarize(r.checks), "checks": r.checks} for r in reports],
        "invalid": [{"artifact": p, "reason": reason} for p, reason in failures.items()],
    }
    return json.dumps(doc, indent=2) + "\n"
