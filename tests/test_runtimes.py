"""Runtimes as adapters: OpenVINO beside ONNX Runtime and the onnx reference, the compatibility matrix,
a runtime that cannot load an artifact (a finding, not a crash) and one that is not installed (exit 2)."""

import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from helpers import (
    EMPTY_ROW_CASES,
    NO_OPENVINO,
    OPENVINO,
    OPENVINO_DEFAULT_IN_AUTO,
    ROOT,
    AgainReference,
    RefusingRuntime,
    openvino_native_bf16,
    run_cli,
    single_error_line,
    snapshot,
)
from onnx import TensorProto, helper

from qkv_onnx.errors import ProviderError
from qkv_onnx.export.backends import BACKENDS
from qkv_onnx.validate.artifact import load_artifact
from qkv_onnx.validate.parity import build_cases, validate_artifact
from qkv_onnx.validate.report import markdown, matrix, md
from qkv_onnx.validate.runtimes import RUNTIMES, Reference, open_runtime, parse_providers

needs_openvino = pytest.mark.skipif(
    not OPENVINO, reason="OpenVINO is not installed (pip install 'qkv-onnx[openvino]')"
)
INSTALL_HINT = "pip install 'qkv-onnx[openvino]'"


def _cpu_default_hint() -> str:
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


# --- the matrix -----------------------------------------------------------------------------------


def _matrix(artifacts: list, tmp_path_factory, *flags) -> tuple:
    import contextlib
    import io
    import json

    from qkv_onnx.validate.cli import main

    json_path = tmp_path_factory.mktemp("matrix") / "r.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*map(str, artifacts), *flags, "--json", str(json_path)])
    doc = json.loads(json_path.read_text())
    return code, out.getvalue(), doc, {(r["backend"], r["runtime"]): r for r in doc["matrix"]}


@pytest.fixture(scope="module")
def tiny_matrix(exported, tmp_path_factory):
    """bert-tiny from every backend, validated under --providers auto (OpenVINO included where installed)."""
    return _matrix([exported("bert-tiny", backend=b) for b in BACKENDS], tmp_path_factory)


@pytest.fixture(scope="module")
def default_matrix(tiny_matrix, exported, tmp_path_factory):
    """tiny_matrix where auto runs openvino-default; else bert-tiny from every backend on openvino and
    openvino-default, named (auto leaves it out where its default precision is f32)."""
    if OPENVINO_DEFAULT_IN_AUTO:
        return tiny_matrix
    artifacts = [exported("bert-tiny", backend=b) for b in BACKENDS]
    return _matrix(artifacts, tmp_path_factory, "--providers", "openvino,openvino-default", "--no-torch")


def test_matrix_has_a_result_in_every_cell(tiny_matrix):
    code, out, doc, cells = tiny_matrix
    runtimes = parse_providers("auto")[0]
    assert code == 0 and set(cells) == {(b, r) for b in BACKENDS for r in runtimes}
    for cell in cells.values():
        if cell["loads"]:
            assert cell["runs"] is True and cell["parity"] == "pass" and cell["max_abs"] <= cell["atol"], cell
        else:
            assert cell["loads"] is None and cell["reason"].startswith("not run: "), cell
    skipped = {k for k, c in cells.items() if not c["loads"]}
    assert skipped == {("ort-contrib", "reference")}
    assert "com.microsoft::Attention" in cells["ort-contrib", "reference"]["reason"]
    assert (
        "## Compatibility matrix: bert-tiny" in out
        and "| backend | dtype | ORT CPU | onnx reference |" in out
    )


@needs_openvino
def test_openvino_f32_hint_passes_fp32_parity_on_every_backend(tiny_matrix):
    _, _, doc, cells = tiny_matrix
    for backend in BACKENDS:
        cell = cells[backend, "openvino"]
        assert cell["gating"] and cell["parity"] == "pass" and cell["judged_dtype"] == "float32", cell
        assert cell["max_abs"] < 1e-5, cell
    for a in doc["artifacts"]:
        assert any(
            n.startswith("OpenVINO CPU (INFERENCE_PRECISION_HINT=f32): ran")
            and "inference precision f32" in n
            for n in a["notes"]
        )


@needs_openvino
def test_openvino_default_precision_is_reported_and_explained_not_judged(default_matrix):
    """On a CPU with bfloat16 the plugin's default computes in bf16: an error far outside the float32
    tolerance, reported at the bf16 tolerance, with the reason, without failing the artifact."""
    code, out, doc, cells = default_matrix
    hint = _cpu_default_hint()
    for a in doc["artifacts"]:
        cell = cells[a["backend"], "openvino-default"]
        assert not cell["gating"] and a["passed"]
        [note] = [n for n in a["notes"] if n.startswith("OpenVINO CPU (default precision): ran")]
        assert (
            f"default INFERENCE_PRECISION_HINT here is {hint} (this CPU's OPTIMIZATION_CAPABILITIES: " in note
        )
        if hint == "bf16":
            f32 = cells[a["backend"], "openvino"]
            assert cell["judged_dtype"] == "bfloat16" and cell["max_abs"] > 100 * f32["max_abs"]
            assert cell["max_abs"] > f32["atol"]  # would fail the float32 policy
            assert "INFERENCE_PRECISION_HINT=f32" in note and "coarser than the artifact's float32" in note
            assert "info" in out and "(bfloat16 tolerance)" in out
        else:
            assert cell["judged_dtype"] == "float32"


@needs_openvino
def test_only_a_non_gating_runtime_is_not_judged_exit_4(exported, tmp_path, capsys):
    """openvino-default alone, without torch: no gating runtime compared the graph's outputs, so the verdict
    is NOT JUDGED, exit 4 (it was PASS, exit 0), shown as skipped in JUnit; --allow-unjudged accepts it."""
    args = [exported("mha"), "--providers", "openvino-default", "--no-torch", "--json", tmp_path / "r.json"]
    code, out, err, doc = run_cli(capsys, *args, "--junit", tmp_path / "r.xml")
    assert code == 4 and err == "" and doc["exit_code"] == 4
    assert "every runtime that ran is non-gating" in out and "— NOT JUDGED" in out and "— PASS" not in out
    assert "Artifacts: 0 pass, 0 fail, 1 not judged, 0 invalid." in out
    [artifact] = doc["artifacts"]
    assert artifact["verdict"] == "not judged" and artifact["passed"] is False
    assert {c["runtime"] for c in artifact["checks"]} == {"openvino-default", "pytorch-golden"}
    xml = (tmp_path / "r.xml").read_text()
    assert 'tests="' in xml and 'skipped="0"' not in xml and "not judged: no gating runtime" in xml
    code, out, _, doc = run_cli(capsys, *args, "--allow-unjudged")
    assert code == 0 and doc["exit_code"] == 0 and "— NOT JUDGED" in out


@needs_openvino
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_openvino_judges_low_precision_artifacts(exported, tmp_path, capsys, dtype):
    """float16 and bfloat16 (which ORT CPU cannot run) pass on OpenVINO; bfloat16 outputs come back as
    bfloat16, not as the float16-typed bits OpenVINO's Python API hands out. On a CPU without native
    bfloat16, OpenVINO's bfloat16 Attention outputs the average of V for a query with no key (the spec: 0):
    the validator fails exactly the cases with an all-padding row."""
    d = exported("mha", dtype)
    code, _, err, doc = run_cli(capsys, d, "--providers", "openvino", "--json", tmp_path / "r.json")
    failed = {c["case"] for c in doc["artifacts"][0]["checks"] if not c["passed"]}
    if dtype == "bfloat16" and not openvino_native_bf16():
        assert code == 1 and err == "" and failed == EMPTY_ROW_CASES
    else:
        assert code == 0 and err == "" and failed == set()
    artifact = load_artifact(d)
    case = build_cases(artifact, 0)[-1]  # b2xs128: padded, no empty row
    got = open_runtime("openvino", artifact.model_path).run(case.inputs)[0]
    ref = Reference(artifact.model_path).run(case.inputs)[0]
    wanted = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    assert got.dtype == wanted and got.shape == ref.shape
    assert (
        np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()
        < 0.1 * np.abs(ref.astype(np.float64)).max()
    )


# --- a runtime that cannot load an artifact: a finding -----------------------------------------------


def _crafted(tmp_path: Path, nodes, domain: str | None = None) -> Path:
    """A model file that no export writes (validation refuses it before any runtime): for testing what a
    runtime adapter says about a graph it cannot load."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=opsets, ir_version=10)
    path = tmp_path / "crafted.onnx"
    onnx.save(model, str(path))
    return path


def test_ort_names_the_node_it_has_no_kernel_for(tmp_path):
    """Add on bfloat16 (valid ONNX; ORT CPU has no kernel, the reference runtime has): the sandboxed ORT
    adapter refuses it with ORT's reason and the node, the reference runtime opens it."""
    path = _crafted(
        tmp_path,
        [
            helper.make_node("Cast", ["x"], ["as_bf16"], name="to_bf16", to=TensorProto.BFLOAT16),
            helper.make_node("Add", ["as_bf16", "as_bf16"], ["sum"], name="bf16_add"),
            helper.make_node("Cast", ["sum"], ["y"], to=TensorProto.FLOAT),
        ],
    )
    with pytest.raises(
        ProviderError, match="CPUExecutionProvider cannot run it: Could not find an implementation for Add"
    ) as e:
        open_runtime("cpu", path).wait_open()
    assert "bf16_add" in str(e.value)
    assert np.array_equal(open_runtime("reference", path).run([np.ones(2, np.float32)])[0], [2.0, 2.0])


@needs_openvino
def test_an_op_openvino_cannot_convert_is_named_by_its_adapter(tmp_path):
    """com.microsoft::Inverse: ORT CPU runs it, OpenVINO's ONNX frontend has no conversion for it; the
    sandboxed adapter's reason names it on one line, without OpenVINO's source-location lines."""
    path = _crafted(
        tmp_path,
        [
            helper.make_node(
                "Constant",
                [],
                ["square"],
                value=helper.make_tensor("v", TensorProto.FLOAT, [2, 2], [2, 0, 0, 2]),
            ),
            helper.make_node("Inverse", ["square"], ["inverse"], name="inverse", domain="com.microsoft"),
            helper.make_node("ReduceSum", ["inverse", "axes"], ["total"], keepdims=0),
            helper.make_node(
                "Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [0])
            ),
            helper.make_node("Add", ["x", "total"], ["y"]),
        ],
        domain="com.microsoft",
    )
    assert np.allclose(open_runtime("cpu", path).run([np.zeros(2, np.float32)])[0], [0.5, 0.5])
    with pytest.raises(ProviderError) as e:
        open_runtime("openvino", path).wait_open()
    assert "OpenVINO CPU cannot load it: " in str(e.value) and "com.microsoft.Inverse" in str(e.value)
    assert "Exception from src/" not in str(e.value) and "\n" not in str(e.value)


def test_a_runtime_that_cannot_load_is_a_matrix_finding_and_the_others_still_run(
    exported, monkeypatch, tmp_path, capsys
):
    """A registered runtime that refuses to load the artifact (as ORT refuses a node it has no kernel for,
    above): exit 2 with its reason in one line, the other runtime's parity and the matrix cell that says
    why still reported, nothing changed on disk."""
    monkeypatch.setitem(RUNTIMES, RefusingRuntime.name, RefusingRuntime)
    d = exported("mha")
    before = snapshot(d)
    code, stdout, err, doc = run_cli(
        capsys, d, "--providers", "refusing,reference", "--no-torch", "--json", tmp_path / "r.json"
    )
    line = single_error_line(err)
    assert code == 2 and doc["exit_code"] == 2 and "odd_node" in line and str(d / "model.onnx") in line
    cells = {r["runtime"]: r for r in doc["matrix"]}
    assert cells["refusing"]["loads"] is False and "cannot load it: no kernel" in cells["refusing"]["reason"]
    assert cells["reference"]["loads"] and cells["reference"]["parity"] == "pass"
    assert "does not load [1]" in stdout and "1. a refusing runtime cannot load it" in stdout
    assert doc["artifacts"][0]["passed"] is False and doc["invalid"] == []
    assert snapshot(d) == before


# --- a runtime that is not installed -------------------------------------------------------------------


def _without_openvino(*args):
    return subprocess.run(
        [sys.executable, "-c", NO_OPENVINO, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_openvino_asked_for_but_not_installed_exits_2_with_the_install_hint(exported):
    proc = _without_openvino(exported("mha"), "--providers", "cpu,openvino")
    line = single_error_line(proc.stderr)
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        "--providers openvino: OpenVINO CPU (INFERENCE_PRECISION_HINT=f32) cannot run here: OpenVINO is not "
        "installed"
        in line
        and INSTALL_HINT in line
    )


def test_auto_without_openvino_says_so_and_runs_the_rest(exported):
    proc = _without_openvino(exported("mha"), "--no-torch")
    assert proc.returncode == 0, proc.stderr
    assert (
        "(no openvino, openvino-default: OpenVINO is not installed" in proc.stdout
        and md(INSTALL_HINT) in proc.stdout
    )


# --- adding a runtime ----------------------------------------------------------------------------------


def test_a_new_adapter_needs_no_change_to_comparison_or_report(exported, monkeypatch):
    """A registered adapter is run, judged and shown in the matrix by the existing code."""

    Again = AgainReference  # defined in helpers: the sandbox imports an adapter by module and name
    monkeypatch.setitem(RUNTIMES, Again.name, Again)
    artifact = load_artifact(exported("mha"))
    report = validate_artifact(artifact, ["reference-again"], use_torch=False)
    assert report.passed and {c.runtime for c in report.checks} == {"pytorch-golden", "reference-again"}
    [cell] = matrix([report])
    assert cell.runtime == "reference-again" and cell.parity == "pass"
    assert "| backend | dtype | reference again |" in markdown([report], {})
