"""The tolerance policy and compare_outputs: metrics, the edges of atol, NaN/Inf, shapes; the typed results
(verdicts, worst check, JSON). No model involved."""

import math

import numpy as np
import pytest

from qkv_onnx.validate.compare import compare_outputs, model_error_terms, tolerance
from qkv_onnx.validate.results import Check, Comparison, Metrics, failed_check, worst


@pytest.fixture
def ref():
    return np.random.default_rng(7).standard_normal((2, 5, 8)).astype(np.float32)


def test_identical_arrays_pass_exactly(ref):
    c = compare_outputs(ref.copy(), ref, 1e-6)
    m = c.metrics
    assert c.passed and bool(c) and c.error is None
    assert m.max_abs == 0 and m.max_rel == 0 and m.mean_abs == 0
    assert m.cosine == pytest.approx(1.0, abs=1e-12)
    assert m.scale == float(np.abs(ref).max()) and m.atol == 1e-6 * m.scale


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_actual_fails_naming_the_index(ref, bad):
    actual = ref.copy()
    actual[1, 3, 4] = bad
    c = compare_outputs(actual, ref, 1.0)
    assert not c.passed and c.metrics is None
    assert c.error.startswith("non-finite output") and "(1, 3, 4)" in c.error


def test_non_finite_reference_fails(ref):
    reference = ref.copy()
    reference[0, 0, 2] = np.nan
    c = compare_outputs(ref, reference, 1.0)
    assert not c.passed and c.error.startswith("non-finite reference") and "(0, 0, 2)" in c.error


def test_shape_mismatch_fails(ref):
    c = compare_outputs(ref[:, :4], ref, 1.0)
    assert not c.passed and c.error == "shape [2, 4, 8], expected [2, 5, 8]"


@pytest.mark.parametrize("factor, passed", [(1 - 1e-6, True), (1 + 1e-6, False)])
def test_error_at_the_edge_of_atol(ref, factor, passed):
    """atol = tol * max|reference|: an error just below it passes, just above fails."""
    tol = 1e-3
    reference = ref.astype(np.float64)
    atol = tol * np.abs(reference).max()
    actual = reference.copy()
    actual[1, 2, 3] += factor * atol
    c = compare_outputs(actual, reference, tol)
    assert c.passed is passed
    assert c.metrics.atol == pytest.approx(atol, rel=1e-15)
    assert c.metrics.max_abs == pytest.approx(factor * atol, rel=1e-9)
    assert c.metrics.ratio == pytest.approx(factor, rel=1e-9)


def test_tolerance_policy_ordering():
    assert tolerance("float16", 128, 2) > tolerance("float32", 128, 2) > tolerance("float64", 128, 2)
    assert tolerance("float32", 512, 2) > tolerance("float32", 128, 2)
    assert tolerance("float32", 128, 6) == pytest.approx(3 * tolerance("float32", 128, 2))
    assert tolerance("float16", 128, 6) > tolerance("float16", 128, 2)
    assert tolerance("float32", 128, 2) == pytest.approx(2.0**-24 * math.sqrt(128) * 2)


def test_tolerance_unknown_dtype_raises():
    with pytest.raises(ValueError, match="float8"):
        tolerance("float8", 128, 2)


def test_error_terms_of_a_bert_manifest():
    """K: the longest accumulation (hidden, ffn or keys); S: 2 per layer + embeddings + pooler."""
    from qkv_onnx.model_defs.config import PRESETS

    m = {"model": {"architecture": "bert", "config": PRESETS["bert-tiny"].to_dict()}}  # hidden 128, ffn 512
    assert model_error_terms(m, 7) == (512, 6)
    assert model_error_terms(m, 600) == (600, 6)
    m["model"]["architecture"] = "attention"
    assert model_error_terms(m, 7) == (128, 2)


def _metrics(max_abs, atol):
    return Metrics(max_abs=max_abs, max_rel=0.0, mean_abs=0.0, cosine=1.0, scale=1.0, atol=atol)


def test_check_verdicts_and_what_decides():
    within, over = Comparison(1e-3, _metrics(1e-4, 1e-3)), Comparison(1e-3, _metrics(2e-3, 1e-3))
    assert Check("cpu", "c", "y", "oracle", within).verdict == "pass"
    assert Check("cpu", "c", "y", "oracle", over).verdict == "fail"
    info = Check("openvino-default", "c", "y", "oracle", over, gating=False)
    assert info.verdict == "info" and not info.decides and not info.passed
    error = failed_check("openvino-default", "c", "y", "oracle", "run failed: boom", 1e-3)
    assert error.verdict == "error" and error.decides and error.metrics is None


def test_check_json_keeps_the_flat_keys_of_earlier_reports():
    doc = Check("cpu", "b1xs7", "y", "oracle", Comparison(1e-3, _metrics(1e-4, 1e-3))).to_json()
    assert doc == {
        "runtime": "cpu", "case": "b1xs7", "output": "y", "reference": "oracle", "passed": True, "tol": 1e-3,
        "gating": True, "verdict": "pass", "max_abs": 1e-4, "max_rel": 0.0, "mean_abs": 0.0, "cosine": 1.0,
        "scale": 1.0, "atol": 1e-3, "atol_needed": 1e-4,
    }  # fmt: skip
    error = failed_check("cpu", "b1xs7", "y", "oracle", "output missing", 1e-3).to_json()
    assert error["error"] == "output missing" and "max_abs" not in error and error["verdict"] == "error"


def test_worst_is_the_largest_share_of_atol():
    checks = [
        Check("cpu", "a", "y", "oracle", Comparison(1e-3, _metrics(5e-4, 1e-3))),  # 0.5 of atol
        Check("cpu", "b", "y", "oracle", Comparison(1e-3, _metrics(1e-6, 1e-6))),  # 1.0 of atol: the worst
        failed_check("cpu", "c", "y", "oracle", "run failed", 1e-3),  # no numbers
    ]
    assert worst(checks).case == "b"
    assert worst(checks[2:]) is None


@pytest.mark.parametrize("shape", [(0,), (2, 0, 8)])
def test_a_comparison_of_nothing_is_an_error_never_a_pass(shape):
    """An empty reference compared nothing: an error of the check (it passed with zero metrics before)."""
    empty = np.zeros(shape, np.float32)
    c = compare_outputs(empty, empty, 1.0)
    assert not c.passed and c.metrics is None and c.error.startswith("nothing to compare")
    check = Check("cpu", "b1xs1", "out", "oracle", c)
    assert check.verdict == "error" and check.decides


def _report(*checks: Check):
    from qkv_onnx.validate.parity import Report

    return Report("a", {}, checks=list(checks))


def _ok(runtime: str, gating: bool = True) -> Check:
    return Check(runtime, "b1xs7", "out", "oracle", compare_outputs(np.ones(3), np.ones(3), 1e-6), gating)


def test_verdict_is_not_judged_unless_a_gating_runtime_compared_the_graph():
    """PyTorch against the oracle and a non-gating runtime's numbers say nothing about the ONNX graph: such a
    report is 'not judged' (it was a pass); one gating runtime's numbers make it a pass; any failure fails."""
    bad = Check("cpu", "b1xs7", "out", "oracle", compare_outputs(np.ones(3) * 2, np.ones(3), 1e-6))
    assert _report().verdict == "not judged"
    assert _report(_ok("pytorch-golden"), _ok("pytorch")).verdict == "not judged"
    assert _report(_ok("pytorch-golden"), _ok("openvino-default", gating=False)).verdict == "not judged"
    assert _report(_ok("pytorch-golden"), _ok("cpu")).verdict == "pass"
    assert _report(_ok("pytorch-golden"), _ok("cpu"), bad).verdict == "fail"
    errored = failed_check("cpu", "b1xs7", "out", "oracle", "run failed: boom", 1e-6)
    assert _report(_ok("pytorch-golden"), errored).verdict == "fail"  # errors decide, and judge nothing
    report = _report(_ok("cpu"))
    report.errors.append("a runtime cannot load it")
    assert report.verdict == "error" and not report.passed


def test_junit_and_summary_show_an_unjudged_report_as_skipped_not_passed():
    """The JUnit suite of a report with only a non-gating runtime's numbers: those rows and the verdict are
    <skipped>, nothing passed; the job summary's verdict is NOT JUDGED (exit 4), or says it was accepted."""
    from junitparser import JUnitXml, Skipped

    from qkv_onnx.validate.junit import junit_xml
    from qkv_onnx.validate.step_summary import summary_markdown

    report = _report(_ok("openvino-default", gating=False))
    report.manifest = {"model": {"name": "mha"}, "backend": "onnx-attention", "dtype": "float32"}
    [suite] = JUnitXml.fromstring(junit_xml([report], {}))
    results = {case.name.split(" · ", 1)[1]: case.result for case in suite}
    assert set(results) == {"OpenVINO default vs oracle · out", "verdict"}
    assert all(len(r) == 1 and isinstance(r[0], Skipped) for r in results.values())
    assert results["verdict"][0].message.startswith("not judged: no gating runtime compared")
    assert summary_markdown([report], {}, 4).startswith("## qkv-validate: NOT JUDGED (exit 4)\n")
    assert "1 not judged" in summary_markdown([report], {}, 4)
    assert "NOT JUDGED, accepted by --allow-unjudged (exit 0)" in summary_markdown([report], {}, 0)


def test_pooler_tolerance_between_its_narrow_and_wide_bound():
    """The pooler's tanh output is judged at the scale of its pre-activation (oracle.Trace.scales): an error
    between tol * max|tanh| and tol * max|pre-activation| passes with that floor and fails without it; past
    the wide bound it fails either way. On bert-tiny's real oracle pooler (its pre-activation scale > 1)."""
    from qkv_onnx.artifact_format import expected_weights, model_io
    from qkv_onnx.inputs import make_inputs
    from qkv_onnx.model_defs.config import PRESETS
    from qkv_onnx.validate import oracle

    cfg = PRESETS["bert-tiny"].to_dict()
    rng = np.random.default_rng(3)
    weights = {
        name: 0.3 * rng.standard_normal(shape) for name, shape in expected_weights("bert", cfg).items()
    }
    records = model_io("bert", cfg, {}, "float32")[0]
    inputs = make_inputs(records, cfg, 2, 9, [9, 5], rng)
    trace = oracle.Trace()
    pooled = oracle.forward("bert", cfg, {}, weights, inputs, trace)[1]
    narrow, floor = float(np.abs(pooled).max()), trace.scales[1]
    assert floor > 1.5 * narrow  # the two bounds are apart
    tol = tolerance("float32", *model_error_terms({"model": {"architecture": "bert", "config": cfg}}, 9))
    for error, with_floor, without in [((narrow + floor) / 2, True, False), (1.5 * floor, False, False)]:
        actual = pooled.copy()
        actual[1, 3] += error * tol
        assert compare_outputs(actual, pooled, tol, floor).passed is with_floor
        assert compare_outputs(actual, pooled, tol).passed is without


def test_attention_probabilities_are_judged_at_the_scale_of_their_scores():
    """The oracle records, beside each layer's probabilities, the largest |score| a query attends to: softmax
    moves each probability by at most half the largest score error (its Jacobian diag(p) - p p^T), so a
    probability error is judged at the scores' scale, as the pooler's at its pre-activation's. Checked by
    hand here: a score error of e moves no probability by more than e / 2."""
    from qkv_onnx.validate import oracle

    rng = np.random.default_rng(5)
    q, k, v = (4 * rng.standard_normal((1, 2, 5, 8)) for _ in range(3))
    mask = np.ones((1, 1, 5, 5), bool)
    mask[..., 3:] = False
    got = []
    oracle.attention(q, k, v, mask, probs=got)
    [(p, scale)] = got
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(8)
    assert scale == np.abs(scores[..., :3]).max() and scale > 2 * np.abs(p).max()
    e = 1e-6 * scale
    moved = oracle.softmax(np.where(mask, scores + e * rng.choice([-1, 1], scores.shape), -np.inf))
    assert np.abs(moved - p).max() <= e / 2
