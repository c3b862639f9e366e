"""PyTorch reference modules: parameter counts, config validation, masks, block and model structure."""

from dataclasses import replace

import pytest
import torch

from qkv_onnx.model_defs import (
    PRESETS,
    BertModel,
    EncoderConfig,
    MultiHeadAttention,
    encoder_block,
    param_count,
)
from qkv_onnx.model_defs.registry import MODELS, count_attention_modules, get_model, init_random_weights


def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def padding(lengths, lk):
    return torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None]


def mha(*args, seed=1, **kwargs):
    return init_random_weights(MultiHeadAttention(*args, **kwargs), seed).double()


# --- parameter counts ----------------------------------------------------------------------------


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["bert-tiny", "bert-mini", "bert-base"])
def test_param_count_matches_module(name):
    cfg = PRESETS[name]
    assert param_count(cfg) == n_params(BertModel(cfg))


@pytest.mark.parametrize("name", ["bert-tiny", "bert-mini"])
@pytest.mark.parametrize(
    "variant",
    [
        {"with_pooler": False},
        {"pre_layer_norm": True},
        {"pre_layer_norm": True, "with_pooler": False},
        {"num_kv_heads": 1},
    ],
    ids=str,
)
def test_param_count_variants(name, variant):
    cfg = replace(PRESETS[name], **variant)
    assert param_count(cfg) == n_params(BertModel(cfg))
    assert param_count(cfg) != param_count(PRESETS[name])


@pytest.mark.parametrize("name, expected", [("bert-base", 109_482_240), ("bert-large", 335_141_888)])
def test_param_count_known_values(name, expected):
    assert param_count(PRESETS[name]) == expected


# --- EncoderConfig ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hidden_size": 130, "num_heads": 4},
        {"hidden_size": 128, "num_heads": 4, "num_kv_heads": 3},
        {"hidden_size": 128, "num_heads": 2, "num_kv_heads": 4},
    ],
)
def test_config_rejects_bad_head_layout(kwargs):
    with pytest.raises(ValueError):
        EncoderConfig(**kwargs)


def test_config_accepts_grouped_heads():
    cfg = EncoderConfig(hidden_size=128, num_heads=8, num_kv_heads=2)
    assert (cfg.head_dim, cfg.kv_heads) == (16, 2)
    assert EncoderConfig(num_heads=4).kv_heads == 4


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="bogus"):
        EncoderConfig.from_dict({**PRESETS["bert-tiny"].to_dict(), "bogus": 1})


@pytest.mark.parametrize(
    "cfg",
    [
        *PRESETS.values(),
        EncoderConfig(
            num_heads=8, num_kv_heads=2, pre_layer_norm=True, with_pooler=False, layer_norm_eps=1e-5
        ),
    ],
)
def test_config_round_trip(cfg):
    d = cfg.to_dict()
    assert EncoderConfig.from_dict(d) == cfg
    assert d["num_kv_heads"] == cfg.num_kv_heads and d["hidden_size"] == cfg.hidden_size


# --- MultiHeadAttention -------------------------------------------------------------------------


def test_key_padding_mask_equals_bool_attn_mask():
    m, x = mha(64, 4), randn(2, 6, 64)
    pad = padding([6, 3], 6)
    with torch.no_grad():
        out = m(x, key_padding_mask=pad)
        assert rel_diff(out, m(x, attn_mask=pad[:, None, None, :])) < 1e-12
        assert rel_diff(out, m(x, attn_mask=pad[:, None, None, :].expand(2, 4, 6, 6))) < 1e-12
        assert rel_diff(out, m(x)) > 1e-3


def test_causal_with_padding_equals_combined_mask():
    m, x = mha(64, 4), randn(2, 6, 64)
    pad = padding([6, 4], 6)
    combined = pad[:, None, None, :] & torch.ones(6, 6, dtype=torch.bool).tril()
    with torch.no_grad():
        out = m(x, key_padding_mask=pad, is_causal=True)
        assert rel_diff(out, m(x, attn_mask=combined)) < 1e-12
        assert rel_diff(out, m(x, is_causal=True)) > 1e-3
        assert rel_diff(out, m(x, key_padding_mask=pad)) > 1e-3


def test_additive_zero_mask_equals_no_mask():
    m, x = mha(64, 4), randn(2, 6, 64)
    with torch.no_grad():
        assert rel_diff(m(x, attn_mask=torch.zeros(2, 1, 6, 6, dtype=torch.float64)), m(x)) < 1e-12


def test_additive_mask_folds_with_padding():
    m, x = mha(64, 4), randn(2, 6, 64)
    pad = padding([6, 2], 6)
    bias = randn(2, 1, 6, 6, seed=5)
    with torch.no_grad():
        out = m(x, key_padding_mask=pad, attn_mask=bias)
        assert rel_diff(out, m(x, attn_mask=bias.masked_fill(~pad[:, None, None, :], float("-inf")))) < 1e-12
        assert rel_diff(out, m(x, attn_mask=bias)) > 1e-3


def test_cross_attention_shape():
    m = mha(64, 4, kv_input_size=48)
    assert m.k_proj.weight.shape == m.v_proj.weight.shape == (64, 48)
    with torch.no_grad():
        out = m(randn(2, 5, 64), randn(2, 9, 48, seed=1), key_padding_mask=padding([9, 4], 9))
    assert out.shape == (2, 5, 64)
    assert torch.isfinite(out).all()


def test_grouped_query_attention_module():
    """A GQA module equals the full-head module whose kv heads are repeated (h // 4), not tiled."""
    g = mha(64, 8, num_kv_heads=2)
    assert g.k_proj.weight.shape == g.v_proj.weight.shape == (8 * 2, 64)
    assert g.k_proj.bias.shape == (16,)
    x, pad = randn(2, 5, 64), padding([5, 3], 5)

    def expanded(heads):
        full = MultiHeadAttention(64, 8).double()
        state = dict(g.state_dict())
        for p in ("k_proj", "v_proj"):
            state[f"{p}.weight"] = state[f"{p}.weight"].view(2, 8, 64)[heads].reshape(64, 64)
            state[f"{p}.bias"] = state[f"{p}.bias"].view(2, 8)[heads].reshape(64)
        full.load_state_dict(state)
        return full

    repeated, tiled = torch.arange(8) // 4, torch.arange(8) % 2

    with torch.no_grad():
        out = g(x, key_padding_mask=pad)
        assert out.shape == (2, 5, 64) and torch.isfinite(out).all()
        assert rel_diff(out, expanded(repeated)(x, key_padding_mask=pad)) < 1e-12
        assert rel_diff(out, expanded(tiled)(x, key_padding_mask=pad)) > 1e-2


def test_bad_head_layout_rejected_by_module():
    with pytest.raises(ValueError):
        MultiHeadAttention(64, 8, num_kv_heads=3)


# --- the encoder block and BertModel -----------------------------------------------------------------


def test_pre_and_post_layer_norm_blocks_differ():
    cfg = EncoderConfig(num_layers=1, hidden_size=64, num_heads=4, ffn_size=128)
    post = init_random_weights(encoder_block(cfg), 3).double()
    pre = init_random_weights(encoder_block(replace(cfg, pre_layer_norm=True)), 3).double()
    x, pad = randn(2, 5, 64), padding([5, 2], 5)
    with torch.no_grad():
        a, b = post(x, pad), pre(x, pad)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert rel_diff(a, b) > 1e-2


@pytest.mark.parametrize("with_pooler", [True, False])
def test_bert_outputs(with_pooler):
    cfg = replace(PRESETS["bert-tiny"], with_pooler=with_pooler)
    model = init_random_weights(BertModel(cfg), 0)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, cfg.vocab_size, (3, 7), generator=g)
    types = torch.randint(0, 2, (3, 7), generator=g)
    with torch.no_grad():
        out = model(ids, types, padding([7, 5, 1], 7).long())
    assert isinstance(out, tuple) and len(out) == (2 if with_pooler else 1)
    assert out[0].shape == (3, 7, 128)
    if with_pooler:
        assert out[1].shape == (3, 128)
        assert out[1].abs().max() <= 1
    assert all(torch.isfinite(o).all() for o in out)


# --- registry ------------------------------------------------------------------------------------


def test_get_model_unknown_name():
    with pytest.raises(KeyError) as err:
        get_model("nope")
    assert "nope" in str(err.value)
    for known in ("mha", "mha-gqa", "encoder-block", "bert-base"):
        assert known in str(err.value)


def test_get_model_known_name():
    assert get_model("mha-cross") is MODELS["mha-cross"]
    assert get_model("mha-cross").options == {"causal": False, "cross": True}


@pytest.mark.parametrize("name, expected", [("bert-tiny", 2), ("bert-mini", 4)])
def test_count_attention_modules(name, expected):
    assert count_attention_modules(BertModel(PRESETS[name])) == expected


# --- the weights a config implies (qkv_onnx.artifact_format), against the real modules ---------------


VARIANTS = [
    ("bert", EncoderConfig(num_layers=2, hidden_size=32, num_heads=4, ffn_size=48, vocab_size=50)),
    (
        "bert",
        EncoderConfig(num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_size=48, vocab_size=50),
    ),
    ("bert", EncoderConfig(num_layers=3, hidden_size=32, num_heads=2, ffn_size=40, pre_layer_norm=True)),
    ("bert", EncoderConfig(num_layers=1, hidden_size=32, num_heads=2, ffn_size=40, with_pooler=False)),
]


@pytest.mark.parametrize(
    "architecture, cfg, options",
    [(s.architecture, s.config, s.options) for s in MODELS.values()] + [(a, c, {}) for a, c in VARIANTS],
    ids=[*MODELS, "bert-small", "bert-gqa", "bert-prenorm", "bert-no-pooler"],
)
def test_expected_weights_are_the_modules_state_dict(architecture, cfg, options):
    """The torch-free table the validator checks weights.npz against is exactly each module's state_dict."""
    from qkv_onnx.artifact_format import expected_weights
    from qkv_onnx.model_defs.registry import build_module

    with torch.device("meta"):
        module = build_module(architecture, cfg, options)
    state = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert expected_weights(architecture, cfg.to_dict()) == state


# --- the shared input generator ----------------------------------------------------------------------


def test_inputs_by_role_are_seeded_and_masked():
    import numpy as np

    from qkv_onnx.inputs import KV_EXTRA, make_inputs

    spec = MODELS["mha-cross"]
    records = spec.input_records("float16")
    a = make_inputs(records, spec.config.to_dict(), 3, 5, [5, 2, 0], np.random.default_rng(1))
    b = make_inputs(records, spec.config.to_dict(), 3, 5, [5, 2, 0], np.random.default_rng(1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    hidden, context, mask = a
    assert (
        hidden.dtype == np.float16 and hidden.shape == (3, 5, 64) and context.shape == (3, 5 + KV_EXTRA, 64)
    )
    assert mask.dtype == np.int64 and mask.sum(axis=1).tolist() == [5, 2, 0] and mask[0, :5].all()
    bert = MODELS["bert-tiny"]
    ids, segments, mask = make_inputs(
        bert.input_records("float32"), bert.config.to_dict(), 2, 300, [300, 1], np.random.default_rng(2)
    )
    assert ids.min() >= 0 and ids.max() < bert.config.vocab_size and len(np.unique(ids)) > 100
    assert set(np.unique(segments)) == {0, 1} and mask.sum(axis=1).tolist() == [300, 1]
    with pytest.raises(ValueError, match="3 row lengths for batch 2"):
        make_inputs(
            bert.input_records("float32"), bert.config.to_dict(), 2, 4, [1, 2, 3], np.random.default_rng(0)
        )
