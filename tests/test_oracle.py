"""The NumPy oracle against facts derived from the math and against PyTorch in float64."""

import functools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qkv_onnx.model_defs.registry import MODELS, example_inputs, init_random_weights
from qkv_onnx.validate import oracle

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-12
SLOW_MODELS = {"bert-base", "bert-large", "bert-mini"}


def rel_diff(actual, reference):
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    assert actual.shape == reference.shape
    return float(np.max(np.abs(actual - reference)) / np.max(np.abs(reference)))


def qkv(seed, b=2, hq=4, hkv=4, lq=5, lk=7, d=8):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((b, hq, lq, d)),
        rng.standard_normal((b, hkv, lk, d)),
        rng.standard_normal((b, hkv, lk, d)),
    )


def sdpa(q, k, v, **kw):
    t = [torch.from_numpy(a) for a in (q, k, v)]
    if isinstance(kw.get("attn_mask"), np.ndarray):
        kw["attn_mask"] = torch.from_numpy(kw["attn_mask"])
    return F.scaled_dot_product_attention(*t, **kw).numpy()


def padding_mask(lengths, lk):
    return np.arange(lk)[None, :] < np.asarray(lengths)[:, None]


# --- softmax -------------------------------------------------------------------------------------


def test_softmax_rows_sum_to_one():
    x = np.random.default_rng(0).standard_normal((3, 5, 7)) * 4
    for axis in (-1, 0, 1):
        p = oracle.softmax(x, axis=axis)
        assert np.all(p > 0)
        np.testing.assert_allclose(p.sum(axis=axis), 1.0, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "x, expected",
    [
        ([0.0, math.log(3.0)], [0.25, 0.75]),
        ([math.log(1.0), math.log(2.0), math.log(5.0)], [1 / 8, 2 / 8, 5 / 8]),
        ([1000.0, 1000.0 + math.log(4.0)], [0.2, 0.8]),
        ([-math.inf, 0.0, math.log(3.0)], [0.0, 0.25, 0.75]),
    ],
)
def test_softmax_hand_computed(x, expected):
    np.testing.assert_allclose(oracle.softmax(np.array(x)), expected, rtol=1e-14, atol=0)


def test_softmax_all_masked_row_is_zero():
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.0, math.log(3.0), -np.inf]])
    with np.errstate(all="raise"):
        p = oracle.softmax(x)
    assert not np.isnan(p).any()
    np.testing.assert_array_equal(p[0], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(p[1], [0.25, 0.75, 0.0], rtol=1e-14, atol=0)


# --- attention against torch SDPA ----------------------------------------------------------------


def test_attention_no_mask():
    q, k, v = qkv(1)
    assert rel_diff(oracle.attention(q, k, v), sdpa(q, k, v)) < TOL


def test_attention_bool_mask_broadcast_key_padding():
    q, k, v = qkv(2)
    mask = padding_mask([7, 3], 7)[:, None, None, :]
    out = oracle.attention(q, k, v, mask)
    assert rel_diff(out, sdpa(q, k, v, attn_mask=mask)) < TOL
    assert rel_diff(out, oracle.attention(q, k, v)) > 1e-3


def test_attention_bool_mask_full():
    q, k, v = qkv(3)
    mask = np.random.default_rng(30).random((2, 4, 5, 7)) < 0.6
    mask[..., 0] = True
    assert rel_diff(oracle.attention(q, k, v, mask), sdpa(q, k, v, attn_mask=mask)) < TOL


def test_attention_additive_float_mask():
    q, k, v = qkv(4)
    mask = 2.0 * np.random.default_rng(40).standard_normal((2, 1, 5, 7))
    mask[0, 0, 1, 2:] = -np.inf
    out = oracle.attention(q, k, v, mask)
    assert rel_diff(out, sdpa(q, k, v, attn_mask=mask)) < TOL
    assert rel_diff(out, oracle.attention(q, k, v)) > 1e-3


@pytest.mark.parametrize("lq, lk", [(6, 6), (4, 9), (9, 4)])
def test_attention_causal_top_left(lq, lk):
    q, k, v = qkv(5, lq=lq, lk=lk)
    tril = np.tril(np.ones((lq, lk), dtype=bool))
    assert np.array_equal(sdpa(q, k, v, is_causal=True), sdpa(q, k, v, attn_mask=tril))
    out = oracle.attention(q, k, v, is_causal=True)
    assert rel_diff(out, sdpa(q, k, v, is_causal=True)) < TOL
    np.testing.assert_allclose(out[:, :, 0], v[:, :, 0], rtol=1e-14, atol=0)
    assert rel_diff(out, oracle.attention(q, k, v)) > 1e-3


def test_attention_causal_and_bool_mask():
    q, k, v = qkv(6, lq=6, lk=6)
    pad = padding_mask([6, 4], 6)[:, None, None, :]
    combined = pad & np.tril(np.ones((6, 6), dtype=bool))
    assert rel_diff(oracle.attention(q, k, v, pad, is_causal=True), sdpa(q, k, v, attn_mask=combined)) < TOL


def test_attention_custom_scale():
    q, k, v = qkv(7)
    out = oracle.attention(q, k, v, scale=0.37)
    assert rel_diff(out, sdpa(q, k, v, scale=0.37)) < TOL
    assert rel_diff(out, oracle.attention(q, k, v)) > 1e-3


def test_attention_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = qkv(8, d=16)
    assert rel_diff(oracle.attention(q, k, v), oracle.attention(q, k, v, scale=0.25)) < TOL


def test_attention_grouped_query_matches_torch():
    q, k, v = qkv(9, hq=8, hkv=2)
    out = oracle.attention(q, k, v)
    kt, vt = (torch.from_numpy(a).repeat_interleave(4, dim=1).numpy() for a in (k, v))
    assert rel_diff(out, sdpa(q, kt, vt)) < TOL
    assert rel_diff(out, sdpa(q, k, v, enable_gqa=True)) < TOL


def test_attention_grouped_query_is_not_tiled():
    """Mapping q head h to kv head h % Hkv instead of h // (Hq/Hkv) would change the output."""
    q, k, v = qkv(10, hq=8, hkv=2)
    tiled = sdpa(q, np.tile(k, (1, 4, 1, 1)), np.tile(v, (1, 4, 1, 1)))
    assert rel_diff(oracle.attention(q, k, v), tiled) > 0.1


def test_attention_fully_masked_row_is_zero():
    q, k, v = qkv(11)
    mask = np.ones((2, 1, 5, 7), dtype=bool)
    mask[1, 0, 2] = False
    with np.errstate(invalid="raise"):
        out = oracle.attention(q, k, v, mask)
    assert np.isfinite(out).all()
    assert np.all(out[1, :, 2] == 0.0)
    assert np.all(np.abs(out[1, :, 1]) > 0)
    assert rel_diff(out, sdpa(q, k, v, attn_mask=mask)) < TOL


# --- whole models against the PyTorch modules in float64 -----------------------------------------

SHAPES = [  # batch, seq, kv_seq (cross-attention only), lengths of the padding mask's rows
    (1, 1, 1, [1]),
    (3, 7, 7, [7, 4, 0]),
    (2, 5, 3, [2, 0]),
    (2, 4, 11, [3, 11]),
]


@functools.lru_cache(maxsize=1)  # a model's shapes run one after another: gpt2-small built once, not 4x
def float64_model(name: str, seed: int):
    """(module, its weights as NumPy arrays) of MODELS[name] in float64 with seeded random weights."""
    module = init_random_weights(MODELS[name].build(), seed).double()
    return module, {k: v.numpy().copy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module", autouse=True)
def _drop_float64_model():
    """The last model built is not kept past this module (gpt2-small in float64 with its NumPy copy: 2 GB)."""
    yield
    float64_model.cache_clear()


def run_both(spec, batch, seq, kv_seq, lengths, seed, weights_edit=None):
    module, weights = float64_model(spec.name, seed)
    inputs = example_inputs(spec, batch, seq, lengths, seed + 1, "float64", kv_seq=kv_seq)
    with torch.no_grad():
        out = module(*inputs.values())
    out = (out,) if isinstance(out, torch.Tensor) else out
    if weights_edit:
        weights = {k: v.copy() for k, v in weights.items()}
        weights_edit(weights)
    ref = oracle.forward(
        spec.architecture, spec.config.to_dict(), spec.options, weights, [t.numpy() for t in inputs.values()]
    )
    return [o.numpy() for o in out], ref


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"b{s[0]}-q{s[1]}-k{s[2]}")
@pytest.mark.parametrize("name", [n for n in MODELS if n not in SLOW_MODELS])
def test_forward_matches_module(name, shape):
    spec = MODELS[name]
    out, ref = run_both(spec, *shape, seed=123)
    assert len(out) == len(ref) == len(spec.outputs)
    for o, r in zip(out, ref):
        assert np.isfinite(o).all() and np.isfinite(r).all()
        assert rel_diff(r, o) < TOL


def test_forward_bert_mini_small():
    out, ref = run_both(MODELS["bert-mini"], 2, 5, 5, [5, 3], seed=7)
    assert len(out) == len(ref) == 2
    for o, r in zip(out, ref):
        assert np.isfinite(r).all()
        assert rel_diff(r, o) < TOL


def test_forward_padding_row_changes_output():
    """The padded batch row differs from the same row unpadded, so masks reach the oracle."""
    spec = MODELS["mha"]
    _, padded = run_both(spec, 2, 6, 6, [6, 3], seed=5)
    _, full = run_both(spec, 2, 6, 6, [6, 6], seed=5)
    assert rel_diff(padded[0][0], full[0][0]) < TOL
    assert rel_diff(padded[0][1], full[0][1]) > 1e-3


def test_forward_detects_perturbed_weight():
    def bump(w):
        w["attn.k_proj.weight"][0, 0] += 1e-3

    out, ref = run_both(MODELS["mha"], 2, 6, 6, [6, 4], seed=3, weights_edit=bump)
    assert rel_diff(ref[0], out[0]) > 1e-7


# --- the oracle stays independent of torch and onnxruntime ---------------------------------------


def test_oracle_imports_no_torch_or_onnxruntime():
    code = (
        "import sys; import qkv_onnx.validate.oracle; "
        "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules, sorted(sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_oracle_source_names_no_torch_or_onnxruntime():
    source = (REPO / "validate" / "oracle.py").read_text()
    for banned in ("import torch", "from torch", "import onnxruntime", "from onnxruntime"):
        assert banned not in source
