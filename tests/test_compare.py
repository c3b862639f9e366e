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
    m = {"model": {"architecture": "bert", "config": {"hidden_size": 128, "ffn_size": 512, "num_layers": 2}}}
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
