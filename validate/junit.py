"""JUnit XML for CI systems (GitHub Actions, GitLab, Jenkins): the validation results as test results.

One <testsuite> per artifact, named model/backend/dtype. One <testcase> per runtime × reference × output
(the Markdown report's summary row), which aggregates every input case: its outcome is the worst case's.
- passed: every case within its atol; <system-out> gives the worst numbers.
- <failure>: a gating runtime out of tolerance in some case; the message gives the worst case's max abs
  error and atol, the text every failing case with its metrics.
- <error>: a case with no numbers (a run that failed, a missing output, a shape mismatch, NaN/Inf), for any
  runtime; a runtime that cannot load the artifact, or was asked for and cannot run it; an artifact refused
  by the integrity checks (its own suite, one testcase naming the file).
- <skipped>: a runtime not run, with the reason: under --providers auto, one that lacks what the artifact
  needs, or that cannot run on this machine at all.
A non-gating runtime's numbers (openvino-default) are information, not a verdict: such a testcase is
<skipped> (never passed), and its <system-out> says "info, not gating" with the numbers and whether they were
within the atol of the precision it computes in. Its run errors and NaN/Inf are <error>s, as they fail the
exit code. An artifact whose outputs no gating runtime compared (verdict "not judged", exit 4) gets a
<skipped> "verdict" testcase saying so.

Artifact names, manifests and error messages come from strangers: every string is made XML 1.0-safe (the
characters XML 1.0 cannot hold, controls and lone surrogates included, are written as escapes)."""

import math
import re
import xml.etree.ElementTree as ET

from .parity import Report
from .report import group_checks, label, summary_row
from .results import Check, SummaryRow, worst

SEP = " · "
# Everything XML 1.0 cannot hold: C0 controls but tab, LF and CR; surrogates; U+FFFE and U+FFFF.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(text: str) -> str:
    """`text` with each character XML 1.0 cannot hold replaced by its escape (\\x1b, \\udcff)."""
    return _NOT_XML.sub(lambda m: repr(m.group())[1:-1], str(text))


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k: xml_safe(v) for k, v in attrs.items()})
    if text:
        el.text = xml_safe(text)
    return el


def _e(x: float | None) -> str:
    return "—" if x is None else f"{x:.3e}"


def _numbers(c: Check) -> str:
    m = c.metrics
    if c.comparison.contract is not None:  # a quantized artifact: the accuracy contract, no atol
        return f"{c.case}: accuracy contract: {c.comparison.contract.describe()}"
    return (
        f"{c.case}: max abs {_e(m.max_abs)} {'≤' if m.max_abs <= m.atol else '>'} atol {_e(m.atol)}, "
        f"max rel {_e(m.max_rel)}, mean abs {_e(m.mean_abs)}, cosine {m.cosine:.9f}"
    )


def _worst_line(row: SummaryRow) -> str:
    """The row's numbers: its worst case (closest to, or furthest past, its atol), then the largest of
    each metric over all cases."""
    if row.contract is not None:
        return f"worst of {row.cases} cases by the accuracy contract: {row.contract}"
    if row.atol is None:
        return f"{row.cases} cases, none with numbers"
    ratio = row.atol_needed / row.atol if row.atol > 0 else 0.0 if row.atol_needed == 0 else math.inf
    cosine = "—" if row.cosine_min is None else f"{row.cosine_min:.9f}"
    return (
        f"worst of {row.cases} cases: max abs {_e(row.atol_needed)} {'≤' if ratio <= 1 else '>'} "
        f"atol {_e(row.atol)} ({ratio:.2f}× the atol); over all cases: max abs {_e(row.max_abs)}, "
        f"max rel {_e(row.max_rel)}, mean abs {_e(row.mean_abs)}, cosine min {cosine}"
    )


def _row_case(suite: ET.Element, name: str, row: SummaryRow, checks: list[Check], judged: str | None) -> str:
    """One summary row as a testcase; returns its outcome ('passed', 'failure', 'error')."""
    case = _sub(suite, "testcase", name=name, classname=suite.get("name"))
    errors = [c for c in checks if c.verdict == "error"]
    fails = [c for c in checks if c.verdict == "fail"]
    if errors:
        text = [f"{c.case}: {c.error}" for c in errors] + [_numbers(c) for c in fails]
        message = f"{len(errors)} of {row.cases} cases have no numbers: {errors[0].case}: {errors[0].error}"
        _sub(case, "error", "\n".join(text), message=message, type="error")
        return "error"
    if fails and worst(fails).comparison.contract is not None:
        contract = worst(fails).comparison.contract
        message = (
            f"misses the accuracy contract in {len(fails)} of {row.cases} cases "
            f"({', '.join(c.case for c in fails)}): {contract.describe()}"
        )
        text = [_numbers(c) for c in fails] + [_worst_line(row)]
        _sub(case, "failure", "\n".join(text), message=message, type="parity")
        return "failure"
    if fails:
        w = worst(fails).metrics
        message = (
            f"out of tolerance in {len(fails)} of {row.cases} cases "
            f"({', '.join(c.case for c in fails)}): worst max abs {_e(w.max_abs)} > atol {_e(w.atol)} "
            f"({w.ratio:.1f}× the atol)"
        )
        text = [_numbers(c) for c in fails] + [_worst_line(row)]
        _sub(case, "failure", "\n".join(text), message=message, type="parity")
        return "failure"
    out = _worst_line(row)
    if not row.gating:
        within = "within" if row.passed else "over"
        message = f"not gating: numbers reported, not judged ({within} the {judged or 'artifact'} tolerance)"
        _sub(case, "skipped", message=message)
        _sub(case, "system-out", f"info, {message}; {out}")
        return "skipped"
    _sub(case, "system-out", out)
    return "passed"


def _status_cases(suite: ET.Element, report: Report, errors: list[str]) -> None:
    """Testcases for runtimes that did not load or were not run; consumes the report errors they explain."""
    prefix = suite.get("name")
    for runtime, status in report.runtimes.items():
        if status.loads:
            continue
        reason = status.reason or "not run"
        explained = next((e for e in errors if e.endswith(reason.removeprefix("not run: "))), None)
        if status.loads is None and explained is None:
            case = _sub(suite, "testcase", name=f"{prefix}{SEP}{label(runtime)}", classname=prefix)
            _sub(case, "skipped", message=reason)
            continue
        if explained is not None:
            errors.remove(explained)
        what = "does not load the artifact" if status.loads is False else "cannot run the artifact"
        case = _sub(suite, "testcase", name=f"{prefix}{SEP}{label(runtime)}", classname=prefix)
        _sub(case, "error", explained or reason, message=f"{status.label} {what}: {reason}", type="runtime")


def _suite_name(report: Report, taken: set[str]) -> str:
    m = report.manifest
    name = f"{m['model']['name']}/{m['backend']}/{m['dtype']}"
    return name if name not in taken else f"{name} ({report.artifact})"


def _count(suite: ET.Element) -> dict[str, int]:
    cases = suite.findall("testcase")
    counts = {
        "tests": len(cases),
        "failures": sum(c.find("failure") is not None for c in cases),
        "errors": sum(c.find("error") is not None for c in cases),
        "skipped": sum(c.find("skipped") is not None for c in cases),
    }
    for key, n in counts.items():
        suite.set(key, str(n))
    return counts


def junit_xml(
    reports: list[Report],
    invalid: dict[str, str],
    unavailable: dict[str, str] | None = None,
    seconds: list[float] | None = None,
) -> bytes:
    """The JUnit XML document (UTF-8 bytes). `unavailable`: runtimes --providers auto found unable to run
    here, with the reason (a skipped testcase per artifact); `seconds`: the time spent on each report's
    artifact, in the order of `reports`."""
    root = ET.Element("testsuites", name="qkv-validate")
    taken: set[str] = set()
    for n, r in enumerate(reports):
        name = _suite_name(r, taken)
        taken.add(name)
        suite = _sub(root, "testsuite", name=name)
        if seconds:
            suite.set("time", f"{seconds[n]:.3f}")
        props = _sub(suite, "properties")
        properties = {"artifact": r.artifact, "passed": str(r.passed).lower(), "verdict": r.verdict}
        for key, value in properties.items():
            _sub(props, "property", name=key, value=value)
        judged = {rt: s.judged_dtype for rt, s in r.runtimes.items()}
        outcomes = []
        for (runtime, ref, output), checks in group_checks(r.checks).items():
            row = summary_row(runtime, ref, output, checks)
            case_name = f"{name}{SEP}{label(runtime)} vs {ref}{SEP}{output}"
            outcomes.append(_row_case(suite, case_name, row, checks, judged.get(runtime)))
        errors = list(r.errors)
        _status_cases(suite, r, errors)
        for i, error in enumerate(errors, 1):
            suffix = f" ({i})" if len(errors) > 1 else ""
            case = _sub(suite, "testcase", name=f"{name}{SEP}runtimes{suffix}", classname=name)
            _sub(case, "error", error, message=error, type="runtime")
        for runtime, problem in (unavailable or {}).items():
            case = _sub(suite, "testcase", name=f"{name}{SEP}{label(runtime)}", classname=name)
            _sub(case, "skipped", message=f"not available here: {problem}")
        if r.verdict == "not judged":
            case = _sub(suite, "testcase", name=f"{name}{SEP}verdict", classname=name)
            message = "not judged: no gating runtime compared the graph's outputs (qkv-validate exit 4)"
            _sub(case, "skipped", message=message)
    for path, reason in invalid.items():
        suite = _sub(root, "testsuite", name=path)
        case = _sub(suite, "testcase", name=f"{path}{SEP}integrity", classname=path)
        _sub(case, "error", reason, message=reason, type="invalid artifact")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in root.findall("testsuite"):
        for key, n in _count(suite).items():
            totals[key] += n
    for key, n in totals.items():
        root.set(key, str(n))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
