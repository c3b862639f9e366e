"""qkv-validate end to end: real exported artifacts, real ONNX Runtime, the CLI's exit codes and reports."""

import contextlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from helpers import (
    AUTO,
    GATING,
    NO_TORCH,
    ROOT,
    edit_manifest,
    failing,
    flip_byte,
    rehash,
    reweight,
    run_cli,
    scale_attention,
    single_error_line,
    snapshot,
    weights_of,
)
from onnx import numpy_helper

from qkv_onnx.export.writer import save_weights_npz
from qkv_onnx.validate.cli import main

LIVE_PAIRS = {(r, ref) for r in AUTO for ref in ("oracle", "golden", "pytorch")} | {
    ("pytorch", "oracle"),
    ("pytorch-golden", "oracle"),
}


# --- happy path ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_tiny(exported, tmp_path_factory):
    """One validation of the pristine float32 bert-tiny artifact, shared by the happy-path tests."""
    directory = exported("bert-tiny")
    before = snapshot(directory)
    json_path = tmp_path_factory.mktemp("bert-tiny-run") / "r.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([str(directory), "--json", str(json_path)])
    return SimpleNamespace(
        code=code,
        doc=json.loads(json_path.read_text()),
        stdout=stdout.getvalue(),
        directory=directory,
        before=before,
    )


def test_bert_tiny_passes_every_check_within_tolerance(bert_tiny):
    """Exit 0, one passing artifact, and every check finite and within its atol."""
    doc = bert_tiny.doc
    assert bert_tiny.code == 0 and doc["exit_code"] == 0 and doc["invalid"] == []
    [artifact] = doc["artifacts"]
    assert artifact["passed"] is True and artifact["model"] == "bert-tiny" and artifact["dtype"] == "float32"
    assert artifact["checks"]
    for c in artifact["checks"]:
        assert c["passed"] and c["verdict"] in ("pass", "info"), c
        assert math.isfinite(c["max_abs"]) and 0 <= c["max_abs"] <= c["atol"], c
        assert c["cosine"] > (0.999999 if c["gating"] else 0.9999), c  # non-gating: bf16 inside


def test_bert_tiny_compares_each_runtime_with_each_reference(bert_tiny):
    """ORT CPU and the onnx reference against oracle, golden and live PyTorch; PyTorch itself against the
    oracle."""
    checks = bert_tiny.doc["artifacts"][0]["checks"]
    assert {(c["runtime"], c["reference"]) for c in checks} == LIVE_PAIRS
    cases = {c["case"] for c in checks}
    golden = {c["case"] for c in checks if c["reference"] == "golden"}
    assert golden == {"golden_0", "golden_1", "golden_2"}
    assert golden == {c["case"] for c in checks if c["runtime"] == "pytorch-golden"}
    for runtime, reference in LIVE_PAIRS:
        expected = golden if "golden" in (reference, runtime.removeprefix("pytorch-")) else cases
        got = {
            (c["case"], c["output"]) for c in checks if (c["runtime"], c["reference"]) == (runtime, reference)
        }
        outputs = ("last_hidden_state", "pooler_output")
        assert got == {(case, o) for case in expected for o in outputs}, (runtime, reference)


def test_bert_tiny_cases_cover_the_shapes_that_break_kernels(bert_tiny):
    """Sequence 1, an odd length, 128, and batch > 1, besides the three golden sets."""
    cases = {c["case"] for c in bert_tiny.doc["artifacts"][0]["checks"]}
    assert {"golden_0", "golden_1", "golden_2", "b1xs1", "b3xs7", "b2xs128"} <= cases
    shapes = [tuple(map(int, m.groups())) for m in map(re.compile(r"b(\d+)xs(\d+)").fullmatch, cases) if m]
    assert any(s == 1 for _, s in shapes)
    assert any(s > 1 and s % 2 for _, s in shapes)
    assert any(s == 128 for _, s in shapes)
    assert any(b > 1 for b, _ in shapes)


def test_bert_tiny_markdown_table_on_stdout(bert_tiny):
    out = bert_tiny.stdout
    assert "| runtime | vs | output | cases | max abs |" in out
    assert "## bert-tiny-float32: bert-tiny, backend onnx-attention, float32 — PASS" in out
    assert "live PyTorch comparison: ran" in out
    assert "| ORT CPU | oracle | last_hidden_state | 8 |" in out
    assert "FAIL" not in out


def test_validation_leaves_a_good_artifact_untouched(bert_tiny):
    assert snapshot(bert_tiny.directory) == bert_tiny.before


def test_no_torch_flag_and_report_file(exported, tmp_path, capsys):
    """--report writes the table to the file, not stdout; --no-torch skips the live run and says so."""
    report, json_path = tmp_path / "r.md", tmp_path / "r.json"
    code, out, err, doc = run_cli(
        capsys, exported("mha"), "--no-torch", "--report", report, "--json", json_path
    )
    assert code == 0 and out == "" and err == ""
    text = report.read_text()
    assert "| runtime | vs | output |" in text and "— PASS" in text
    assert "live PyTorch comparison: not run (disabled by --no-torch)" in text
    [artifact] = doc["artifacts"]
    assert artifact["notes"][-1] == "live PyTorch comparison: not run (disabled by --no-torch)"
    assert {(c["runtime"], c["reference"]) for c in artifact["checks"]} == {
        p for p in LIVE_PAIRS if "pytorch" not in p
    }


def test_several_artifacts_at_once(exported, tmp_path, capsys):
    """Self, causal, cross and grouped-query attention and an encoder block in one run."""
    models = ["mha", "mha-cross", "mha-gqa", "mha-causal", "encoder-block"]
    code, out, err, doc = run_cli(capsys, *(exported(m) for m in models), "--json", tmp_path / "r.json")
    assert code == 0 and doc["exit_code"] == 0 and err == ""
    assert [a["model"] for a in doc["artifacts"]] == models
    for a in doc["artifacts"]:
        assert a["passed"] and {(c["runtime"], c["reference"]) for c in a["checks"]} == LIVE_PAIRS, a["model"]
    assert out.count("— PASS") == len(models)


def test_bert_tiny_float16_passes(exported, tmp_path, capsys):
    code, out, err, doc = run_cli(capsys, exported("bert-tiny", "float16"), "--json", tmp_path / "r.json")
    assert code == 0 and err == ""
    [artifact] = doc["artifacts"]
    assert artifact["dtype"] == "float16" and artifact["passed"]
    assert {(c["runtime"], c["reference"]) for c in artifact["checks"]} == LIVE_PAIRS
    assert max(c["max_abs"] for c in artifact["checks"] if c["runtime"] == "cpu") > 1e-4


# --- invalid artifacts and arguments: exit 2 ---------------------------------------------------


def _checker_rejects(d: Path) -> None:
    """A Transpose's perm out of range: the exporter's ops, counts and weights (the structural contract
    holds), but shape inference in onnx.checker refuses it."""
    model = onnx.load(str(d / "model.onnx"))
    transpose = next(n for n in model.graph.node if n.op_type == "Transpose")
    transpose.attribute[0].ints[:] = [0, 2, 1, 7]
    onnx.save(model, str(d / "model.onnx"))
    rehash(d, "model.onnx")


def _unknown_op(d: Path) -> None:
    model = onnx.load(str(d / "model.onnx"))
    model.graph.node.append(onnx.helper.make_node("NoSuchOp", [model.graph.output[0].name], ["extra"]))
    onnx.save(model, str(d / "model.onnx"))
    rehash(d, "model.onnx")


INVALID = {
    "model flipped": (lambda d: flip_byte(d / "model.onnx"), "model.onnx", "sha256"),
    "golden flipped": (
        lambda d: flip_byte(d / "test_data_set_1/output_0.pb"),
        "test_data_set_1/output_0.pb",
        "sha256",
    ),
    "manifest missing": (lambda d: (d / "manifest.json").unlink(), "manifest.json", "missing"),
    "manifest not json": (
        lambda d: (d / "manifest.json").write_text('{"format": '),
        "manifest.json",
        "not valid JSON",
    ),
    "listed file deleted": (
        lambda d: (d / "test_data_set_0/input_1.pb").unlink(),
        "test_data_set_0/input_1.pb",
        "missing",
    ),
    "unlisted file": (
        lambda d: (d / "test_data_set_0/input_9.pb").write_bytes(b"x"),
        "test_data_set_0/input_9.pb",
        "not listed",
    ),
    "checker rejects (structural mode)": (
        _checker_rejects,
        "model.onnx",
        "onnx.checker failed",
        "--no-torch",
    ),
    "graph not the exporter's (rebuild mode)": (
        _unknown_op,
        "model.onnx",
        "not the graph the exporter writes",
    ),
    "graph not the exporter's (structural mode)": (
        _unknown_op,
        "model.onnx",
        "not what the exporter writes: op counts",
        "--no-torch",
    ),
    "manifest edited": (
        lambda d: edit_manifest(d, lambda m: m["model"].__setitem__("name", "bert-base"), sign=False),
        "manifest.json",
        "manifest_sha256",
    ),
    "manifest reformatted": (
        lambda d: (d / "manifest.json").write_text(json.dumps(json.loads((d / "manifest.json").read_text()))),
        "manifest.json",
        "canonical form",
    ),
}


@pytest.mark.parametrize("offset", range(0, 4000, 97))
def test_any_flipped_byte_in_manifest_exit_2(offset, artifact_copy, capsys):
    """One flipped bit anywhere in manifest.json (values, keys, whitespace) is refused, naming the
    manifest."""
    d = artifact_copy("mha")
    data = bytearray((d / "manifest.json").read_bytes())
    data[offset % len(data)] ^= 0x01
    (d / "manifest.json").write_bytes(bytes(data))
    code, _, err, _ = run_cli(capsys, d)
    assert code == 2
    assert str(d / "manifest.json") in single_error_line(err)


@pytest.mark.parametrize("name", INVALID)
def test_invalid_artifact_exit_2_names_the_file(name, artifact_copy, capsys):
    """One stderr line naming the file and why; the artifact's files are left as they were."""
    tamper, rel, reason, *args = INVALID[name]
    d = artifact_copy("mha")
    tamper(d)
    before = snapshot(d)
    code, out, err, _ = run_cli(capsys, d, *args)
    line = single_error_line(err)
    assert code == 2
    assert str(d / rel) in line and reason in line
    assert "INVALID" in out
    assert snapshot(d) == before


def test_nonexistent_directory_exit_2(tmp_path, capsys):
    missing = tmp_path / "no-such-artifact"
    code, _, err, _ = run_cli(capsys, missing)
    assert code == 2 and str(missing) in single_error_line(err)
    assert not missing.exists()


def test_unknown_provider_exit_2(exported, capsys):
    code, out, err, _ = run_cli(capsys, exported("mha"), "--providers", "cpu,bogus")
    line = single_error_line(err)
    assert code == 2 and "bogus" in line and "cpu" in line and out == ""


def test_good_and_tampered_artifact_exit_2_and_report_the_good_one(exported, artifact_copy, tmp_path, capsys):
    good, bad = exported("mha-gqa"), artifact_copy("mha")
    flip_byte(bad / "model.onnx")
    code, out, err, doc = run_cli(capsys, bad, good, "--json", tmp_path / "r.json")
    assert code == 2 and doc["exit_code"] == 2
    assert str(bad / "model.onnx") in single_error_line(err)
    assert [(a["model"], a["passed"]) for a in doc["artifacts"]] == [("mha-gqa", True)]
    [invalid] = doc["invalid"]
    assert invalid["artifact"] == str(bad) and "sha256" in invalid["reason"]
    assert "## mha-gqa-float32: mha-gqa, backend onnx-attention, float32 — PASS" in out
    assert f"## {bad}: INVALID" in out


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["files"].__setitem__("model.onnx", "0" * 64),
        lambda m: m.__setitem__("golden_sets", "3"),
        lambda m: m["inputs"][0].pop("dtype"),
        lambda m: m.__setitem__("dtype", "float8"),
    ],
    ids=["file-entry-not-object", "golden-sets-not-int", "input-without-dtype", "unknown-dtype"],
)
def test_malformed_manifest_exit_2_not_a_crash(edit, artifact_copy, capsys):
    """A manifest that is JSON but malformed is an invalid artifact (exit 2, one line), not a traceback."""
    d = artifact_copy("mha")
    edit_manifest(d, edit)
    code, _, err, _ = run_cli(capsys, d, "--no-torch")
    assert code == 2 and str(d / "manifest.json") in single_error_line(err)


# --- consistent tampering caught by parity: exit 1 ----------------------------------------------

MULTI_KEY = {"golden_0", "golden_1", "b1xs7", "b3xs7", "b2xs128"}
SINGLE_KEY = {"golden_2", "b1xs1", "b2xs1"}


@pytest.mark.parametrize("mode", [(), ("--no-torch",)], ids=["rebuild", "structural"])
def test_weights_the_graph_does_not_hold_exit_2(mode, artifact_copy, capsys):
    """A k_proj weight changed in an int8 artifact's weights.npz alone (manifest re-hashed): the graph no
    longer holds weights.npz's weights, which the rebuild (the float32 graph it quantizes is not the one
    recorded) and the structural contract (an int8 initializer that is none of weights.npz's parameters,
    quantized) both see before anything runs."""
    d = artifact_copy("mha", "int8")
    weights = weights_of(d)
    weights["attn.k_proj.weight"][0, 0] += 2.0
    save_weights_npz(d / "weights.npz", weights)
    rehash(d, "weights.npz")
    code, _, err, _ = run_cli(capsys, d, *mode)
    line = single_error_line(err)
    assert code == 2 and str(d / "model.onnx") in line, line
    assert ("none of weights.npz's parameters" if mode else "float32_graph_sha256") in line, line


def test_golden_data_of_other_weights_fail_exit_1(artifact_copy, tmp_path, capsys):
    """A k_proj weight changed in the graph (the exporter's own graph for the changed weights, so the rebuild
    matches): only the golden PyTorch outputs, written for the old weights,
    disagree; every comparison against them fails where there is more than one key (with a single key,
    softmax is 1 whatever the keys, so those cases still pass)."""
    d = artifact_copy("mha")
    weights = weights_of(d)
    weights["attn.k_proj.weight"][0, 0] += 2.0
    reweight(d, weights)
    code, out, err, doc = run_cli(capsys, d, "--json", tmp_path / "r.json")
    assert code == 1 and doc["exit_code"] == 1 and err == ""
    assert doc["artifacts"][0]["passed"] is False and "— FAIL" in out
    golden = {case for case in MULTI_KEY if case.startswith("golden")}
    expected = {(rt, "golden", case) for rt in GATING for case in golden}
    expected |= {("pytorch-golden", "oracle", case) for case in golden}
    assert failing(doc) == expected
    cases = {c["case"] for c in doc["artifacts"][0]["checks"]}
    assert cases == MULTI_KEY | SINGLE_KEY


def test_tampered_graph_fails_against_every_reference_exit_1(artifact_copy, tmp_path, capsys):
    """A graph that keeps the exporter's structure (ops, counts, weights) but computes something else (an
    attribute changed, re-hashed), judged in structural mode: both runtimes fail against oracle and golden
    data in every case with more than one key, while PyTorch's golden outputs still agree with the oracle.
    (In rebuild mode it is exit 2: not the exporter's bytes.)"""
    d = artifact_copy("mha")
    scale_attention(d)
    code, _, err, doc = run_cli(capsys, d, "--no-torch", "--json", tmp_path / "r.json")
    assert code == 1 and err == ""
    checks = doc["artifacts"][0]["checks"]
    runtimes = [c for c in checks if c["runtime"] in ("cpu", "reference")]
    assert all(not c["passed"] for c in runtimes if c["case"] in MULTI_KEY)
    assert all(c["passed"] for c in checks if c["runtime"] == "pytorch-golden")
    assert any(c["reference"] == "oracle" and not c["passed"] for c in checks)


def test_nan_in_golden_output_fails_as_non_finite_exit_1(artifact_copy, tmp_path, capsys):
    """A NaN written into golden output (re-hashed) fails exactly the checks that read it, naming its
    index."""
    d = artifact_copy("mha")
    path = d / "test_data_set_1/output_0.pb"
    tensor = onnx.TensorProto()
    tensor.ParseFromString(path.read_bytes())
    array = numpy_helper.to_array(tensor).copy()
    array[1, 2, 3] = np.nan
    path.write_bytes(numpy_helper.from_array(array, tensor.name).SerializeToString())
    rehash(d, "test_data_set_1/output_0.pb")
    code, out, err, doc = run_cli(capsys, d, "--json", tmp_path / "r.json")
    assert code == 1 and doc["exit_code"] == 1 and err == ""
    assert failing(doc) == {("pytorch-golden", "oracle", "golden_1")} | {
        (r, "golden", "golden_1") for r in AUTO
    }
    errors = [c["error"] for c in doc["artifacts"][0]["checks"] if not c["passed"]]
    assert len(errors) == 1 + len(AUTO)
    assert all("non-finite" in e and "(1, 2, 3)" in e for e in errors)
    assert "non-finite" in out and "— FAIL" in out


# --- a deployment machine without torch ---------------------------------------------------------


def test_without_torch_golden_and_oracle_still_checked(exported, tmp_path):
    """With torch unimportable the CLI still runs, says why the live comparison is missing, and passes."""
    json_path = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(exported("mha")), "--json", str(json_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "live PyTorch comparison: not run (torch is not installed)" in proc.stdout
    checks = json.loads(json_path.read_text())["artifacts"][0]["checks"]
    assert all(c["passed"] for c in checks)
    pairs = {(c["runtime"], c["reference"]) for c in checks}
    assert pairs == {p for p in LIVE_PAIRS if "pytorch" not in p}
    assert {"oracle", "golden"} <= {ref for _, ref in pairs}


def test_help_documents_exit_codes():
    proc = subprocess.run(
        [sys.executable, "-m", "qkv_onnx.validate", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == ""
    assert "exit codes:" in proc.stdout
    for code, words in ((0, "passed"), (1, "parity"), (2, "invalid"), (3, "internal error")):
        assert re.search(rf"^\s+{code}\s+.*{words}", proc.stdout, re.M), code


# --- our own bugs: exit 3, never "invalid artifact" -------------------------------------------------


def test_a_bug_in_the_oracle_is_exit_3_with_its_traceback(exported, monkeypatch, capsys):
    """An exception from our own code (here: the oracle) is not the artifact's fault: the traceback is shown,
    exit 3 says "internal error, please report", the artifact is not called invalid and is left untouched."""
    from qkv_onnx.validate import oracle

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug in the oracle")

    monkeypatch.setattr(oracle, "forward", broken)
    d = exported("mha")
    before = snapshot(d)
    code = main([str(d), "--no-torch", "--providers", "cpu"])
    out, err = capsys.readouterr()
    assert code == 3
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError: a bug in the oracle" in err
    assert err.strip().splitlines()[-1].startswith("qkv-validate: internal error: this is a bug in qkv-onnx")
    assert "INVALID" not in out and "invalid" not in err
    assert snapshot(d) == before
