"""qkv-validate in CI: the JUnit XML read back with junitparser and held against the JSON report of the
same run, the GitHub job summary, output paths checked before anything runs, and the workflow files
(actionlint)."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import (
    OPENVINO,
    OPENVINO_DEFAULT_IN_AUTO,
    ROOT,
    flip_byte,
    reweight,
    run_cli,
    single_error_line,
    weights_of,
)
from junitparser import Error, Failure, JUnitXml, Skipped

from qkv_onnx.stages import listening
from qkv_onnx.validate.cli import main
from qkv_onnx.validate.junit import junit_xml, xml_safe
from qkv_onnx.validate.parity import Report
from qkv_onnx.validate.results import Check, Comparison, Metrics, RuntimeStatus
from qkv_onnx.validate.runtimes import RUNTIMES, select_runtimes

LABELS = {"pytorch": "PyTorch (live)", "pytorch-golden": "PyTorch (golden)"} | {
    name: cls.short for name, cls in RUNTIMES.items()
}
UNAVAILABLE = select_runtimes("auto").unavailable
SEP = " · "


def _suite_name(artifact: dict) -> str:
    return f"{artifact['model']}/{artifact['backend']}/{artifact['dtype']}"


def _outcome(case) -> str:
    kinds = {type(r) for r in case.result}
    assert len(kinds) <= 1, case.name
    return {Failure: "failure", Error: "error", Skipped: "skipped"}.get(next(iter(kinds), None), "passed")


# --- one run with every outcome: JUnit against JSON ---------------------------------------------------


def _reweight(d: Path, edit) -> None:
    """Edit the weights and write the graph the exporter makes of them: a consistent artifact (the rebuild
    check passes) whose golden data is the old weights' outputs."""
    weights = weights_of(d)
    edit(weights)
    reweight(d, weights)


def _tamper_weights(d: Path) -> None:
    _reweight(d, lambda w: w["attn.k_proj.weight"].__setitem__((0, 0), w["attn.k_proj.weight"][0, 0] + 2.0))


def _overflow(d: Path) -> None:
    """v bias 3e38 and the output projection all ones: 64 x 3e38 is inf in float32 (finite in the oracle)."""

    def edit(w):
        w["attn.v_proj.bias"][:] = 3e38
        w["attn.out_proj.weight"][:] = 1.0

    _reweight(d, edit)


@pytest.fixture(scope="module")
def ci_run(exported, tmp_path_factory):
    """One qkv-validate run over a passing artifact, one out of tolerance (a k_proj weight changed after the
    golden data was written), one whose weights overflow float32 (inf outputs), one the reference runtime
    cannot run (com.microsoft ops: skipped under auto) and one refused by the integrity checks; --json and
    --junit, and GITHUB_STEP_SUMMARY set to a file that an earlier step already wrote to."""
    work = tmp_path_factory.mktemp("ci-run")
    copies = {}
    for name, model, tamper in (
        ("mha-tampered", "mha", _tamper_weights),
        ("mha-causal-inf", "mha-causal", _overflow),
        ("mha-flipped", "mha", lambda d: flip_byte(d / "model.onnx")),
    ):
        copies[name] = work / name
        shutil.copytree(exported(model), copies[name])
        tamper(copies[name])
    artifacts = [
        exported("mha-gqa"),
        copies["mha-tampered"],
        copies["mha-causal-inf"],
        exported("mha", backend="ort-contrib"),
        copies["mha-flipped"],
    ]
    summary = work / "summary.md"
    summary.write_text("# an earlier step\n")
    json_path, junit_path = work / "r.json", work / "r.xml"
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv("GITHUB_STEP_SUMMARY", str(summary))
        code = main([*map(str, artifacts), "--json", str(json_path), "--junit", str(junit_path)])
    return SimpleNamespace(
        code=code,
        doc=json.loads(json_path.read_text()),
        xml=JUnitXml.fromfile(str(junit_path)),
        raw=junit_path.read_bytes(),
        summary=summary.read_text(),
        stderr=err.getvalue(),
        flipped=copies["mha-flipped"],
        copies=copies,
    )


def _suites(run) -> dict:
    return {suite.name: suite for suite in run.xml}


def _expected_counts(artifact: dict) -> dict:
    """What the JUnit suite of one JSON artifact must count: a row with errors is an error, a gating row that
    did not pass a failure, a non-gating row's numbers a skip; each report error (a runtime that cannot load
    or run it) an error; a runtime not run on it, each runtime --providers auto found unable to run here, and
    a verdict of "not judged", a skip."""
    rows = artifact["summary"]
    not_run = [s for s in artifact["runtimes"].values() if s["loads"] is None]
    info = sum(1 for r in rows if not r["errors"] and not r["gating"])
    unjudged = artifact["verdict"] == "not judged"
    counts = {
        "failures": sum(1 for r in rows if not r["errors"] and r["gating"] and not r["passed"]),
        "errors": sum(1 for r in rows if r["errors"]) + len(artifact["errors"]),
        "skipped": len(not_run) + len(UNAVAILABLE) + info + unjudged,
    }
    counts["tests"] = len(rows) + len(artifact["errors"]) + len(not_run) + len(UNAVAILABLE) + unjudged
    return counts


def test_run_has_every_outcome_and_the_usual_exit_code(ci_run):
    """The fixture run covers what the JUnit file must show, with the exit code it always had."""
    doc = ci_run.doc
    assert ci_run.code == 2 and doc["exit_code"] == 2
    assert [a["passed"] for a in doc["artifacts"]] == [True, False, False, True]
    assert [i["artifact"] for i in doc["invalid"]] == [str(ci_run.flipped)]
    contrib = doc["artifacts"][3]["runtimes"]["reference"]
    assert contrib["loads"] is None and "com.microsoft" in contrib["reason"]


def test_junit_counts_match_the_json_report(ci_run):
    """One suite per artifact (model/backend/dtype) and per invalid artifact; each suite's counts, read
    from its testcases and from its attributes, are what the JSON report implies; the totals add up."""
    suites = _suites(ci_run)
    doc = ci_run.doc
    assert list(suites) == [_suite_name(a) for a in doc["artifacts"]] + [
        i["artifact"] for i in doc["invalid"]
    ]
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for artifact in doc["artifacts"]:
        suite = suites[_suite_name(artifact)]
        expected = _expected_counts(artifact)
        outcomes = [_outcome(c) for c in suite]
        found = {
            "tests": len(outcomes),
            "failures": outcomes.count("failure"),
            "errors": outcomes.count("error"),
            "skipped": outcomes.count("skipped"),
        }
        assert found == expected, artifact["artifact"]
        assert {k: getattr(suite, k) for k in expected} == expected
        for key in totals:
            totals[key] += expected[key]
    totals["tests"] += len(doc["invalid"])
    totals["errors"] += len(doc["invalid"])
    assert {k: getattr(ci_run.xml, k) for k in totals} == totals
    assert totals["failures"] > 0 and totals["errors"] > 0 and totals["skipped"] > 0


def test_junit_testcase_per_summary_row_with_its_numbers(ci_run):
    """Each JSON summary row is a testcase 'model/backend/dtype · RUNTIME vs REFERENCE · OUTPUT': a failure
    names every failing case and gives the worst case's max abs error and atol; an error lists every error
    of the row; a pass gives the worst numbers; a non-gating runtime's numbers pass as information."""
    suites = _suites(ci_run)
    for artifact in ci_run.doc["artifacts"]:
        suite_name = _suite_name(artifact)
        cases = {c.name: c for c in suites[suite_name]}
        for row in artifact["summary"]:
            name = f"{suite_name}{SEP}{LABELS[row['runtime']]} vs {row['reference']}{SEP}{row['output']}"
            case = cases[name]
            assert case.classname == suite_name
            checks = [
                c
                for c in artifact["checks"]
                if (c["runtime"], c["reference"], c["output"])
                == (row["runtime"], row["reference"], row["output"])
            ]
            if row["errors"]:
                [result] = case.result
                assert isinstance(result, Error), name
                assert all(e in result.text for e in row["errors"]), name
                assert result.message.startswith(
                    f"{len(row['errors'])} of {row['cases']} cases have no numbers"
                )
            elif row["gating"] and not row["passed"]:
                [result] = case.result
                assert isinstance(result, Failure), name
                failed = [c["case"] for c in checks if c["verdict"] == "fail"]
                assert f"in {len(failed)} of {row['cases']} cases ({', '.join(failed)})" in result.message
                assert f"worst max abs {row['atol_needed']:.3e} > atol {row['atol']:.3e}" in result.message
                assert all(f"{c}: max abs" in result.text for c in failed), name
            else:
                worst = f"max abs {row['atol_needed']:.3e} ≤ atol {row['atol']:.3e}"
                within = row["atol_needed"] <= row["atol"]
                assert (worst in case.system_out) == within, name
                if row["gating"]:
                    assert case.is_passed and not case.result, name
                    assert case.system_out.startswith(f"worst of {row['cases']} cases: "), name
                else:  # numbers reported, not judged: skipped, never passed
                    label = "within" if row["passed"] else "over"
                    [skip] = case.result
                    assert isinstance(skip, Skipped) and skip.message.startswith("not gating: "), name
                    assert case.system_out.startswith("info, not gating: numbers reported, not judged "), name
                    assert f"({label} the " in case.system_out, name


def test_junit_non_gating_runtime(ci_run, tmp_path):
    """openvino-default (where OpenVINO is installed; named where auto leaves it out): its numbers are skipped
    (reported, not judged), also where over the atol, never passed; its errors (an inf output) are errors."""
    if not OPENVINO:
        pytest.skip(f"OpenVINO is not installed: {UNAVAILABLE['openvino-default']}")
    run = ci_run
    if not OPENVINO_DEFAULT_IN_AUTO:
        json_path, junit_path = tmp_path / "r.json", tmp_path / "r.xml"
        artifacts = [ci_run.copies["mha-tampered"], ci_run.copies["mha-causal-inf"]]
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(
                [*map(str, artifacts), "--providers", "cpu,openvino-default", "--no-torch"]
                + ["--json", str(json_path), "--junit", str(junit_path)]
            )
        assert code == 1
        run = SimpleNamespace(doc=json.loads(json_path.read_text()), xml=JUnitXml.fromfile(str(junit_path)))
    suites = _suites(run)
    tampered = {c.name: c for c in suites["mha/onnx-attention/float32"] if "OpenVINO default" in c.name}
    tampered_doc = run.doc["artifacts"][1 if run is ci_run else 0]
    rows = [r for r in tampered_doc["summary"] if r["runtime"] == "openvino-default"]
    assert any(not r["passed"] for r in rows)  # over the atol: the weights were changed
    assert tampered and all(_outcome(c) == "skipped" and not c.is_passed for c in tampered.values())
    inf = [c for c in suites["mha-causal/onnx-attention/float32"] if "OpenVINO default vs golden" in c.name]
    assert inf and all(_outcome(c) == "error" and "non-finite" in c.result[0].text for c in inf)


def test_junit_skipped_runtimes_give_the_reason(ci_run):
    """A runtime not run on an artifact is skipped with its reason from the report; a runtime --providers auto
    found unable to run here is skipped in every suite, with why."""
    suites = _suites(ci_run)
    for artifact in ci_run.doc["artifacts"]:
        cases = {c.name: c for c in suites[_suite_name(artifact)]}
        for runtime, status in artifact["runtimes"].items():
            if status["loads"] is None:
                [skip] = cases[f"{_suite_name(artifact)}{SEP}{LABELS[runtime]}"].result
                assert isinstance(skip, Skipped) and skip.message == status["reason"]
        for runtime, problem in UNAVAILABLE.items():
            [skip] = cases[f"{_suite_name(artifact)}{SEP}{LABELS[runtime]}"].result
            assert isinstance(skip, Skipped) and skip.message == f"not available here: {problem}"


def test_junit_invalid_artifact_is_an_error_naming_the_file(ci_run):
    [invalid] = ci_run.doc["invalid"]
    [case] = _suites(ci_run)[invalid["artifact"]]
    [error] = case.result
    assert case.name == f"{invalid['artifact']}{SEP}integrity" and isinstance(error, Error)
    assert error.message == invalid["reason"] and str(ci_run.flipped / "model.onnx") in error.message


def test_junit_suites_carry_artifact_and_time(ci_run):
    for artifact, suite in zip(ci_run.doc["artifacts"], ci_run.xml):
        props = {p.name: p.value for p in suite.properties()}
        passed = str(artifact["passed"]).lower()
        assert props == {"artifact": artifact["artifact"], "passed": passed, "verdict": artifact["verdict"]}
        assert suite.time > 0


def test_step_summary_appended_with_matrix_and_failing_rows(ci_run):
    """The earlier step's text stays; the verdict, a matrix per model and the failing rows follow."""
    text = ci_run.summary
    assert text.startswith("# an earlier step\n## qkv-validate: INVALID INPUT (exit 2)\n")
    assert "Artifacts: 2 pass, 2 fail, 0 not judged, 1 invalid." in text
    for model in ("mha", "mha-causal", "mha-gqa"):
        assert f"### Compatibility matrix: {model}\n" in text
    failing = [line for line in text.splitlines() if line.startswith("| mha-")]
    expected = {
        (a["artifact"], LABELS[r["runtime"]], r["reference"], r["output"])
        for a in ci_run.doc["artifacts"]
        for r in a["summary"]
        if r["errors"] or (r["gating"] and not r["passed"])
    }
    assert {tuple(cell.strip() for cell in line.split("|")[1:5]) for line in failing} == expected
    reason = ci_run.doc["invalid"][0]["reason"]
    assert f"\n- {reason}\n" in text and str(ci_run.flipped / "model.onnx") in reason
    assert "qkv-validate: warning" not in ci_run.stderr


@pytest.mark.parametrize("where", ["a directory", "a missing directory"])
def test_unwritable_step_summary_warns_and_keeps_the_exit_code(
    where, exported, tmp_path, capsys, monkeypatch
):
    """The job summary is a convenience: when it cannot be written, one warning line, and the run still
    passes (exit 0) with its report."""
    target = tmp_path if where == "a directory" else tmp_path / "gone" / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    code, out, err, _ = run_cli(capsys, exported("mha"), "--providers", "cpu", "--no-torch")
    [line] = err.strip().splitlines()
    assert code == 0 and "— PASS" in out
    assert line.startswith(
        f"qkv-validate: warning: cannot append the job summary to GITHUB_STEP_SUMMARY={target}"
    )
    assert line.endswith("the exit code is unchanged")
    assert sorted(tmp_path.iterdir()) == []


# --- rendering hostile strings ------------------------------------------------------------------------

HOSTILE = "evil\x00\x1b[31m\x0b\ud800\udcff\ufffe]]><x>&\"'"


def test_xml_safe_escapes_what_xml_cannot_hold():
    assert xml_safe(HOSTILE) == "evil\\x00\\x1b[31m\\x0b\\ud800\\udcff\\ufffe]]><x>&\"'"
    assert xml_safe("tab\tnewline\ncr\r·é𝄞") == "tab\tnewline\ncr\r·é𝄞"


def test_junit_from_hostile_names_and_reasons_parses():
    """Artifact and model names, error messages and refusal reasons from strangers (controls, lone surrogates
    from undecodable file names, markup) still give a well-formed file that keeps them, escaped."""
    metrics = Metrics(max_abs=2e-3, max_rel=1.0, mean_abs=1e-4, cosine=0.99, scale=1.0, atol=1e-5)
    manifest = {"model": {"name": f"m{HOSTILE}"}, "backend": "onnx-attention", "dtype": "float32"}
    report = Report(
        artifact=f"dir{HOSTILE}",
        manifest=manifest,
        checks=[
            Check("cpu", "b1xs7", "out", "oracle", Comparison(1e-5, metrics)),
            Check("cpu", "b1xs7", "out", "golden", Comparison(1e-5, error=f"run failed: {HOSTILE}")),
        ],
        runtimes={"cpu": RuntimeStatus("ONNX Runtime CPU", True, True, True, judged_dtype="float32")},
    )
    data = junit_xml([report], {f"bad{HOSTILE}": f"{HOSTILE}/manifest.json: not JSON"})
    xml = JUnitXml.fromstring(data)
    assert (xml.tests, xml.failures, xml.errors) == (3, 1, 2)
    escaped = xml_safe(HOSTILE)
    [suite, bad] = xml
    assert suite.name == f"m{escaped}/onnx-attention/float32" and bad.name == f"bad{escaped}"
    failure, error = (case.result[0] for case in suite)
    assert isinstance(failure, Failure) and "worst max abs 2.000e-03 > atol 1.000e-05" in failure.message
    assert isinstance(error, Error) and f"b1xs7: run failed: {escaped}" in error.text
    assert {p.value for p in suite.properties()} == {f"dir{escaped}", "false", "fail"}
    assert next(iter(bad)).result[0].message == f"{escaped}/manifest.json: not JSON"


# --- output paths checked before anything runs ---------------------------------------------------------


@contextlib.contextmanager
def unwritable(path: Path):
    """`path` made unwritable for this process: by mode where permissions apply, else (root) by the immutable
    attribute; skips where neither is possible."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if (
        shutil.which("chattr") is None
        or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode
    ):
        pytest.skip("running as root without chattr +i: no way to make a path unwritable here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def _bad_output_run(capsys, tmp_path, *args):
    """qkv-validate with a good --json path and the bad output in `args`, on an artifact that does not exist:
    had anything run, the error would name it, a stage would have started, and --json would be written."""
    stages = []
    with listening(lambda event, name: stages.append(name)):
        code = main([str(a) for a in (tmp_path / "no-artifact", "--json", tmp_path / "r.json", *args)])
    out, err = capsys.readouterr()
    return code, out, single_error_line(err), stages


def _outputs_untouched(tmp_path, before):
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


BAD_OUTPUTS = ["missing directory", "a directory", "parent is a file", "same as --json"]


@pytest.mark.parametrize(
    "flag, case",
    [
        (f, c)
        for f in ("--junit", "--report", "--json")
        for c in BAD_OUTPUTS
        if (f, c) != ("--json", "same as --json")
    ],
)
def test_bad_output_path_exit_2_before_anything_runs(flag, case, tmp_path, capsys):
    """One line naming the flag, the path and why; nothing probed, validated or written (a later --json
    replaces the good one, as argparse keeps the last)."""
    (tmp_path / "a-file").write_text("x")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    path, words = {
        "missing directory": (tmp_path / "no-dir" / "out", f"directory {tmp_path / 'no-dir'} does not exist"),
        "a directory": (tmp_path, "is a directory"),
        "parent is a file": (
            tmp_path / "a-file" / "out",
            f"directory {tmp_path / 'a-file'} is not a directory",
        ),
        "same as --json": (tmp_path / "r.json", "the same file as --json"),
    }[case]
    code, out, line, stages = _bad_output_run(capsys, tmp_path, flag, path)
    assert code == 2 and out == "" and stages == []
    assert f"{flag} {path}: " in line and words in line and "no-artifact" not in line
    _outputs_untouched(tmp_path, before)


@pytest.mark.parametrize("target", ["directory", "file"])
def test_unwritable_output_exit_2_before_anything_runs(target, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    path = out_dir / "r.xml"
    if target == "file":
        path.write_text("earlier")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with unwritable(out_dir if target == "directory" else path):
        code, out, line, stages = _bad_output_run(capsys, tmp_path, "--junit", path)
    assert code == 2 and out == "" and stages == []
    words = f"directory {out_dir} is not writable" if target == "directory" else "the file is not writable"
    assert f"--junit {path}: {words}" in line
    _outputs_untouched(tmp_path, before)
    if target == "file":
        assert path.read_text() == "earlier"


# --- the workflows -------------------------------------------------------------------------------------

WORKFLOWS = [ROOT / ".github/workflows/ci.yml", ROOT / "docs/ci/parity-workflow.yml"]
README_TEST_COMMAND = re.search(
    r"Tests \(.*?\n\n```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S
)[1]


MATRIX_COMMAND = ".venv/bin/python -m pytest -q -n 2 -m matrix"  # every cell the default run samples


def _tool(name: str) -> str:
    """A tool the test extra installs beside this interpreter (pip install '.[test]')."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is missing: it comes with the test extra (bash scripts/setup.sh)"
    return str(path)


CUDA_LINE = "          # - { providers: cuda, "


def _actionlint(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            _tool("actionlint"),
            "-shellcheck",
            _tool("shellcheck"),
            "-pyflakes=",
            "-no-color",
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_actionlint_finds_nothing_in_either_workflow(tmp_path):
    """actionlint (with shellcheck for the run: scripts) on the repository's CI and the users' workflow, and
    on the users' workflow with its CUDA line uncommented."""
    proc = _actionlint(*WORKFLOWS)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    text = WORKFLOWS[1].read_text()
    assert text.count(CUDA_LINE) == 1
    with_cuda = tmp_path / "parity-cuda.yml"
    with_cuda.write_text(text.replace(CUDA_LINE, CUDA_LINE.replace("# ", "")))
    proc = _actionlint(with_cuda)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    matrix = yaml.safe_load(with_cuda.read_text())["jobs"]["validate"]["strategy"]["matrix"]["include"]
    assert [m["providers"] for m in matrix] == ["cpu", "openvino", "cuda"]


def test_actionlint_reports_a_broken_workflow(tmp_path):
    """The check above can fail: an unknown runner context and a shell bug are findings."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  t:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo ${{ matrix.nope }} && [ $x = 1 ]\n"
    )
    proc = subprocess.run(
        [_tool("actionlint"), "-shellcheck", _tool("shellcheck"), "-no-color", str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "matrix" in proc.stdout and "shellcheck" in proc.stdout, proc.stdout


def test_repository_ci_runs_the_readme_test_command_on_each_supported_python():
    """ci.yml: the README's test command, then the full cross products (-m matrix), as .ci/run runs them, on
    Linux with the Pythons requires-python admits from its floor to 3.12, with pip's cache."""
    flow = yaml.safe_load((ROOT / ".github/workflows/ci.yml").read_text())
    [job] = flow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    assert job["strategy"]["matrix"]["python-version"] == ["3.10", "3.11", "3.12"]
    setup = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@"))
    assert (
        setup["with"]["python-version"] == "${{ matrix.python-version }}" and setup["with"]["cache"] == "pip"
    )
    assert setup["with"]["cache-dependency-path"].split() == ["pyproject.toml", "scripts/setup.sh"]
    runs = [s["run"].strip() for s in job["steps"] if "run" in s]
    assert runs == [README_TEST_COMMAND, MATRIX_COMMAND]
    ci_run = (ROOT / ".ci/run").read_text().strip().splitlines()
    assert ci_run[-2:] == [README_TEST_COMMAND, MATRIX_COMMAND]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.10"' in pyproject and 'target-version = "py310"' in pyproject


def test_users_workflow_exports_once_and_validates_per_runtime(capsys):
    """docs/ci/parity-workflow.yml: an export job uploads the artifacts; a validate job per runtime downloads
    them, writes JUnit, publishes it, and fails on exit 1 or 2. Every flag it passes exists."""
    text = (ROOT / "docs/ci/parity-workflow.yml").read_text()
    flow = yaml.safe_load(text)
    export, validate = flow["jobs"]["export"], flow["jobs"]["validate"]
    assert validate["needs"] == "export"
    assert {m["providers"] for m in validate["strategy"]["matrix"]["include"]} >= {"cpu", "openvino"}
    uses = [s.get("uses", "") for s in export["steps"]], [s.get("uses", "") for s in validate["steps"]]
    assert any(u.startswith("actions/upload-artifact@") for u in uses[0])
    assert any(u.startswith("actions/download-artifact@") for u in uses[1])
    assert any(u.startswith("mikepenz/action-junit-report@") for u in uses[1])
    [check] = [s for s in validate["steps"] if "qkv-validate" in s.get("run", "")]
    assert check["env"] == {"PROVIDERS": "${{ matrix.providers }}"}
    assert '--providers "$PROVIDERS"' in check["run"] and '--junit "junit-$PROVIDERS.xml"' in check["run"]
    publish = next(s for s in validate["steps"] if s.get("uses", "").startswith("mikepenz/"))
    assert publish["if"] == "${{ !cancelled() }}"  # published when the check failed, too
    assert publish["with"]["report_paths"] == "junit-${{ matrix.providers }}.xml"
    assert "qkv-export" in " ".join(s.get("run", "") for s in export["steps"]) and "--backend all" in text
    for prog, module in (("qkv-export", "qkv_onnx.export.cli"), ("qkv-validate", "qkv_onnx.validate.cli")):
        commands = " ".join(re.findall(rf"{prog}(?:[^\n]*\\\n)*[^\n]*", text))
        flags = set(re.findall(r"(--[a-z][a-z-]*)", commands))
        with pytest.raises(SystemExit):
            __import__(module, fromlist=["main"]).main(["--help"])
        help_text = capsys.readouterr().out
        assert flags and all(f in help_text for f in flags), (prog, flags)
