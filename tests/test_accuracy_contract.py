"""The accuracy contract's metrics, by hand (no model involved)."""

import re
from pathlib import Path

import numpy as np
import pytest

from qkv_onnx.accuracy_contract import LIMITS, ContractResult, cosines, judge, spearman
from qkv_onnx.validate.compare import compare_contract

ROOT = Path(__file__).resolve().parents[1]


def test_identical_outputs_meet_every_limit():
    x = np.random.default_rng(0).standard_normal((3, 6, 8))
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    r = judge(x.copy(), x, mask, sentences=True)
    assert r.passed and r.values["token_cosine_min"] == pytest.approx(1.0)
    assert r.values["relative_error"] == 0.0 and r.values["similarity_deviation_max"] == pytest.approx(
        0.0, abs=1e-12
    )
    assert r.values["rank_agreement"] == pytest.approx(1.0)


def test_token_cosine_sees_one_rotated_token_and_ignores_padding():
    """One real token turned by 30 degrees: its cosine is cos 30°; a padded position turned by 90° counts for
    nothing."""
    ref = np.zeros((1, 3, 2))
    ref[0, :, 0] = 1.0
    got = ref.copy()
    got[0, 1] = [np.cos(np.pi / 6), np.sin(np.pi / 6)]
    got[0, 2] = [0.0, 1.0]
    r = judge(got, ref, np.array([[1, 1, 0]]), sentences=False)
    assert r.values["token_cosine_min"] == pytest.approx(np.cos(np.pi / 6))
    assert "token_cosine_min" in r.failed and "sentence_cosine_min" not in r.values


def test_a_cache_is_judged_per_real_token_across_its_heads():
    """A (B, heads, L, head_dim) cache under a (B, L) mask: one vector per real token, every head in it.
    Head 0 of token 1 turned by 90 degrees, head 1 kept: the token's cosine is 1/2, not the lone head's 0; a
    padded position's entry, never attended to, counts for nothing."""
    ref = np.zeros((1, 2, 3, 2))
    ref[..., 0] = 1.0
    got = ref.copy()
    got[0, 0, 1] = [0.0, 1.0]
    got[0, :, 2] = -ref[0, :, 2]
    r = judge(got, ref, np.array([[1, 1, 0]]), sentences=False)
    assert r.values["token_cosine_min"] == pytest.approx(0.5)  # (0 + 1) / (sqrt 2 * sqrt 2)
    without = judge(got, ref, None, sentences=False)
    assert without.values["token_cosine_min"] == pytest.approx(-1.0)  # no mask: every head's row, padding too


def test_relative_error_is_the_frobenius_ratio():
    ref = np.ones((2, 4))
    got = ref * 1.1
    assert judge(got, ref, None, False).values["relative_error"] == pytest.approx(0.1)


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)  # ties share their average rank


def test_cosines_of_zero_rows():
    a = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    b = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    assert cosines(a, b).tolist() == [1.0, 0.0, 0.0]


def test_a_non_finite_metric_never_passes_and_nan_outputs_are_errors():
    assert not ContractResult({"relative_error": float("nan")}).passed
    got = np.ones((1, 2, 2))
    got[0, 0, 0] = np.nan
    c = compare_contract(got, np.ones((1, 2, 2)), None, False)
    assert not c.passed and c.error.startswith("non-finite output")


def test_the_docs_table_states_the_limits_in_code():
    """docs/accuracy-contract.md justifies each limit: its table must say what the code enforces."""
    table = (ROOT / "docs" / "accuracy-contract.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)`:.*?\| ([≥≤] [0-9.]+) \|", table, re.M))
    assert {k: f"{'≥' if op == '>=' else '≤'} {v}" for k, (op, v) in LIMITS.items()} == rows


def test_describe_puts_misses_first():
    r = ContractResult({"token_cosine_min": 0.99, "relative_error": 0.3})
    assert r.failed == ["relative_error"] and r.describe() == "relative_error 0.3000 > 0.2"
    assert ContractResult({"relative_error": 0.1}).describe() == "relative_error 0.1000 ≤ 0.2"


@pytest.mark.parametrize("order", ["nan last", "nan first"])
def test_worst_values_keep_a_nan_wherever_it_stands(order):
    """Python's min/max drop a NaN unless it comes first: the worst of a good result and an all-NaN one was
    the good one's values. Now NaN is the worst value of each metric it appears in, whatever the order."""
    from qkv_onnx.accuracy_contract import worst_values

    good = judge(np.ones((1, 3, 4)), np.ones((1, 3, 4)), None, False)
    bad = ContractResult({k: float("nan") for k in good.values})
    results = [good, bad] if order == "nan last" else [bad, good]
    assert all(np.isnan(v) for v in worst_values(results).values())
    assert worst_values([good, good]) == good.values


def test_the_int8_held_out_verdict_fails_on_one_good_and_one_all_nan_result():
    """export/quantize.py's held-out check: with the NaN result anywhere (either half, or the whole), the
    verdict is a failure naming every metric (it returned passed: True when the NaN came second)."""
    from qkv_onnx.export.quantize import holdout_verdict

    good = judge(np.ones((1, 3, 4)), np.ones((1, 3, 4)), None, False)
    bad = ContractResult({k: float("nan") for k in good.values})
    for halves in ([[good], [good], [good, bad]], [[good, bad], [good], [good]], [[good], [good, bad], []]):
        verdict = holdout_verdict(*halves)
        assert verdict["passed"] is False and sorted(verdict["failed"]) == sorted(good.values)


def test_next_token_tie_excuses_a_flip_at_a_near_tie_and_no_other():
    """A decoder's next token differs from the reference's at one position of ten: within NEXT_TOKEN_TIE of
    the logit range the reference itself nearly ties (agreement 1.0); at twice that margin it is a real flip
    (agreement 0.9, under the 0.95 limit)."""
    from qkv_onnx.accuracy_contract import NEXT_TOKEN_AGREEMENT_MIN, NEXT_TOKEN_TIE

    reference = np.random.default_rng(4).standard_normal((1, 10, 50))
    span = reference[0, 3].max() - reference[0, 3].min()
    top, second = np.argsort(reference[0, 3])[-1], np.argsort(reference[0, 3])[-2]
    for share, agreement in [(0.5 * NEXT_TOKEN_TIE, 1.0), (2 * NEXT_TOKEN_TIE, 0.9)]:
        ref = reference.copy()
        ref[0, 3, second] = ref[0, 3, top] - share * span  # the reference's top-2 margin
        got = ref.copy()
        got[0, 3, second] = ref[0, 3, top] + 1e-3 * span  # the other token wins: a flip
        assert got[0, 3].argmax() != ref[0, 3].argmax()
        values = judge(got, ref, np.ones((1, 10), np.int64), False, logits=True).values
        assert values["next_token_agreement"] == pytest.approx(agreement)
        assert (values["next_token_agreement"] >= NEXT_TOKEN_AGREEMENT_MIN) is (agreement == 1.0)
