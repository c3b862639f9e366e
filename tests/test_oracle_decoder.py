"""The oracle's decoder-only LM (validate/oracle.py: rms_norm, silu, rope, decoder) against facts derived from
the math and against independent references: transformers' GPT2LMHeadModel and LlamaForCausalLM."""

import math

import numpy as np
import pytest

from qkv_onnx.validate import oracle

TOL = 1e-12  # float64 against float64: a few ulps per operation


def decoder_cfg(**kw) -> dict:
    """A DecoderConfig as a dict (model_defs/decoder.py's fields), spelt out: fast tests need no torch."""
    cfg = dict(
        num_layers=2,
        hidden_size=32,
        num_heads=4,
        num_kv_heads=None,
        ffn_size=64,
        vocab_size=50,
        max_positions=64,
        norm="layer",
        norm_eps=1e-5,
        positions="learned",
        rope_theta=10000.0,
        ffn="mlp",
        hidden_act="gelu_tanh",
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    )
    return cfg | kw


GPT2_STYLE = decoder_cfg()
LLAMA_STYLE = decoder_cfg(
    num_kv_heads=2,
    norm="rms",
    norm_eps=1e-6,
    positions="rope",
    rope_theta=500.0,
    ffn="gated",
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
)


def random_weights(cfg, seed=0, scale=0.3):
    """Every weight the oracle reads for `cfg`, random, with norms near 1 (so their mapping matters)."""
    rng = np.random.default_rng(seed)
    h, f, heads = cfg["hidden_size"], cfg["ffn_size"], cfg["num_heads"]
    kv = (cfg["num_kv_heads"] or heads) * (h // heads)
    shapes = {"embed.word.weight": (cfg["vocab_size"], h)}
    if cfg["positions"] == "learned":
        shapes["embed.position.weight"] = (cfg["max_positions"], h)
    norms = ["final_norm"]
    for i in range(cfg["num_layers"]):
        p = f"blocks.{i}"
        norms += [p + ".attn_norm", p + ".ffn_norm"]
        linears = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "out_proj": (h, h)}
        for name, shape in linears.items():
            shapes[f"{p}.attn.{name}.weight"] = shape
            if cfg["attention_bias"]:
                shapes[f"{p}.attn.{name}.bias"] = shape[:1]
        ffn = (
            {"gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
            if cfg["ffn"] == "gated"
            else {"fc1": (f, h), "fc2": (h, f)}
        )
        for name, shape in ffn.items():
            shapes[f"{p}.ffn.{name}.weight"] = shape
            if cfg["mlp_bias"]:
                shapes[f"{p}.ffn.{name}.bias"] = shape[:1]
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    w = {name: rng.standard_normal(shape) * scale for name, shape in shapes.items()}
    for name in norms:
        w[name + ".weight"] = 1.0 + 0.1 * rng.standard_normal(h)
        if cfg["norm"] == "layer":
            w[name + ".bias"] = 0.1 * rng.standard_normal(h)
    return w


def left_padded(lengths, seq, vocab, seed=0):
    """input_ids (random at the padding too: masking must make them irrelevant), attention_mask, and the
    position ids a generation loop gives a left-padded batch (0, 1, ... from the first real token)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (len(lengths), seq))
    mask = (np.arange(seq)[None, :] >= seq - np.asarray(lengths)[:, None]).astype(np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def rel_diff(actual, reference):
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    assert actual.shape == reference.shape
    return float(np.max(np.abs(actual - reference)) / np.max(np.abs(reference)))


# --- elementwise pieces ---------------------------------------------------------------------------------


def test_silu_and_rms_norm_from_their_definitions():
    x = np.linspace(-30, 30, 601)
    # silu(x) - silu(-x) = x, as sigmoid(x) + sigmoid(-x) = 1; and sigmoid(x) = (1 + tanh(x/2)) / 2
    np.testing.assert_allclose(oracle.silu(x) - oracle.silu(-x), x, rtol=0, atol=1e-13)
    np.testing.assert_allclose(oracle.silu(x), x * (1 + np.tanh(x / 2)) / 2, rtol=0, atol=1e-14)
    assert oracle.silu(np.array([-1000.0]))[0] == 0.0  # exp overflow gives the limit, not NaN

    rng = np.random.default_rng(1)
    x, weight = rng.standard_normal((3, 5, 16)) * 7, rng.standard_normal(16)
    y = oracle.rms_norm(x, {"n.weight": np.ones(16)}, "n", 0.0)
    np.testing.assert_allclose(np.sqrt(np.mean(y**2, axis=-1)), 1.0, rtol=0, atol=1e-14)  # unit RMS
    np.testing.assert_allclose(y * np.linalg.norm(x, axis=-1, keepdims=True) / 4, x, rtol=1e-14)  # sqrt(16)
    y = oracle.rms_norm(x, {"n.weight": weight}, "n", 1e-6)
    np.testing.assert_allclose(y, x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * weight, rtol=1e-15)


# --- RoPE, from the math --------------------------------------------------------------------------------


def rope_inputs(seed=0, b=2, h=3, s=5, d=16):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, h, s, d)), rng.integers(0, 200, (b, s))


def test_rope_of_a_plane_is_the_rotation_by_the_position():
    # d = 2: one pair, frequency theta^0 = 1, so position p rotates by p radians
    e0, e1 = np.array([1.0, 0.0]).reshape(1, 1, 1, 2), np.array([0.0, 1.0]).reshape(1, 1, 1, 2)
    for p in (0, 1, 2, 7):
        pos = np.array([[p]])
        np.testing.assert_allclose(
            oracle.rope(e0, pos, 10000.0).ravel(), [math.cos(p), math.sin(p)], atol=1e-15
        )
        np.testing.assert_allclose(
            oracle.rope(e1, pos, 10000.0).ravel(), [-math.sin(p), math.cos(p)], atol=1e-15
        )


def test_rope_is_complex_multiplication_in_the_rotate_half_layout():
    """RoFormer's complex form: z_i = x_i + i x_{i+d/2} becomes z_i * exp(i p theta^(-2i/d))."""
    x, pos = rope_inputs()
    d, theta = x.shape[-1], 100.0
    z = x[..., : d // 2] + 1j * x[..., d // 2 :]
    turned = z * np.exp(1j * pos[:, None, :, None] * theta ** (-np.arange(0, d, 2) / d))
    expected = np.concatenate([turned.real, turned.imag], axis=-1)
    np.testing.assert_allclose(oracle.rope(x, pos, theta), expected, rtol=0, atol=1e-12)


def test_rope_preserves_norms_and_position_zero_is_identity():
    x, pos = rope_inputs(1)
    y = oracle.rope(x, pos, 10000.0)
    d = x.shape[-1]
    pair_norm = lambda t: np.hypot(t[..., : d // 2], t[..., d // 2 :])  # noqa: E731
    np.testing.assert_allclose(pair_norm(y), pair_norm(x), rtol=1e-13)  # each pair rotates in its plane
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)
    assert np.array_equal(oracle.rope(x, np.zeros_like(pos), 10000.0), x)  # cos 0 = 1, sin 0 = 0 exactly


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_scores_depend_only_on_relative_position(theta):
    """<R(m) q, R(n) k> = <q, R(n - m) k>: shifting both positions by t leaves every score unchanged."""
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((2, 1, 1, 1, 32))
    for m, n in [(0, 0), (3, 11), (17, 2), (40, 40)]:
        base = float(np.sum(oracle.rope(q, [[m]], theta) * oracle.rope(k, [[n]], theta)))
        for t in (1, 5, 64, 300):
            shifted = float(np.sum(oracle.rope(q, [[m + t]], theta) * oracle.rope(k, [[n + t]], theta)))
            assert abs(shifted - base) <= TOL * np.linalg.norm(q) * np.linalg.norm(k), (m, n, t)
        relative = float(np.sum(q * oracle.rope(k, [[n - m]], theta)))
        assert abs(relative - base) <= TOL * np.linalg.norm(q) * np.linalg.norm(k)


# --- the decoder: cache, GQA, forward() ---------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [GPT2_STYLE, LLAMA_STYLE], ids=["gpt2-style", "llama-style"])
def test_cached_decoding_equals_the_full_sequence(cfg):
    """Prefill, then single steps and a chunk over the cache: the same logits and cache as one pass over the
    whole left-padded sequence (both float64: only the summation order may differ)."""
    w = random_weights(cfg)
    ids, mask, pos = left_padded([9, 6, 3], 9, cfg["vocab_size"])
    full, full_present = oracle.decoder(w, cfg, ids, mask, pos, None)
    assert full.shape == (3, 9, cfg["vocab_size"])
    past, real = None, mask.astype(bool)
    for start, stop in [(0, 4), (4, 5), (5, 6), (6, 9)]:  # prefill 4 (P = 0), two steps, a chunk of 3
        logits, past = oracle.decoder(w, cfg, ids[:, start:stop], mask[:, :stop], pos[:, start:stop], past)
        kv = (cfg["num_kv_heads"] or cfg["num_heads"], cfg["hidden_size"] // cfg["num_heads"])
        assert [t.shape for t in past[0]] == [(3, kv[0], stop, kv[1])] * 2
        step_real = real[:, start:stop]  # a padded query attends nothing: 0 from attention, in both runs
        assert rel_diff(logits[step_real], full[:, start:stop][step_real]) < TOL, (start, stop)
        np.testing.assert_allclose(logits, full[:, start:stop], rtol=0, atol=1e-12 * np.abs(full).max())
    for (k, v), (fk, fv) in zip(past, full_present):
        np.testing.assert_allclose(k, fk, rtol=0, atol=1e-12 * np.abs(fk).max())
        np.testing.assert_allclose(v, fv, rtol=0, atol=1e-12 * np.abs(fv).max())


def test_a_padded_query_gets_zero_attention_and_padding_ids_do_not_matter():
    cfg, trace = LLAMA_STYLE, oracle.Trace()
    w = random_weights(cfg)
    ids, mask, pos = left_padded([5, 2], 5, cfg["vocab_size"])
    logits, _ = oracle.decoder(w, cfg, ids, mask, pos, None, trace)
    assert np.all(trace.taps["attention", 0][1, :3] == 0)  # rows 0..2 of sequence 1 are padding
    other = ids.copy()
    other[1, :3] = (other[1, :3] + 7) % cfg["vocab_size"]
    again, _ = oracle.decoder(w, cfg, other, mask, pos, None)
    assert np.array_equal(again[:, -2:], logits[:, -2:])  # the real positions never read the padding


@pytest.mark.parametrize("cfg", [LLAMA_STYLE, decoder_cfg(num_kv_heads=1)], ids=["rope-kv2", "learned-kv1"])
def test_grouped_query_attention_equals_repeating_the_kv_heads(cfg):
    """kv_heads < heads: query head h reads kv head h // (heads / kv_heads). The same model with the k/v
    projections' rows repeated per query head (kv_heads = heads) gives the same logits, and its cache is the
    grouped one with each kv head repeated."""
    w = random_weights(cfg, seed=3)
    heads, kv_heads = cfg["num_heads"], cfg["num_kv_heads"]
    group, d, h = heads // kv_heads, cfg["hidden_size"] // heads, cfg["hidden_size"]
    full_w = dict(w)
    for name, t in w.items():
        if ".k_proj." in name or ".v_proj." in name:
            full_w[name] = np.repeat(t.reshape(kv_heads, d, *t.shape[1:]), group, axis=0).reshape(
                h, *t.shape[1:]
            )
    ids, mask, pos = left_padded([7, 4], 7, cfg["vocab_size"], seed=4)
    logits, present = oracle.decoder(w, cfg, ids, mask, pos, None)
    full_logits, full_present = oracle.decoder(full_w, cfg | {"num_kv_heads": heads}, ids, mask, pos, None)
    np.testing.assert_allclose(logits, full_logits, rtol=0, atol=TOL * np.abs(full_logits).max())
    for (k, v), (fk, fv) in zip(present, full_present):
        assert k.shape[1] == kv_heads and fk.shape[1] == heads
        np.testing.assert_allclose(np.repeat(k, group, axis=1), fk, rtol=0, atol=TOL * np.abs(fk).max())
        np.testing.assert_allclose(np.repeat(v, group, axis=1), fv, rtol=0, atol=TOL * np.abs(fv).max())


def test_forward_takes_and_returns_the_graph_order():
    cfg = LLAMA_STYLE
    w = random_weights(cfg)
    ids, mask, pos = left_padded([6, 3], 6, cfg["vocab_size"])
    _, past = oracle.decoder(w, cfg, ids[:, :4], mask[:, :4], pos[:, :4], None)
    logits, present = oracle.decoder(w, cfg, ids[:, 4:], mask, pos[:, 4:], past)
    cache = [t for pair in past for t in pair]
    trace = oracle.Trace(probs=True)
    out = oracle.forward("decoder", cfg, {}, w, [ids[:, 4:], mask, pos[:, 4:], *cache], trace)
    assert len(out) == 1 + 2 * cfg["num_layers"]
    assert np.array_equal(out[0], logits)
    assert all(np.array_equal(a, b) for a, b in zip(out[1:], [t for pair in present for t in pair]))
    assert set(trace.taps) == {
        ("embeddings", None),
        ("final_norm", None),
        *((tap, i) for tap in ("attention", "attention_block", "block") for i in range(cfg["num_layers"])),
    }
    assert trace.probs[0].shape == (2, cfg["num_heads"], 2, 6)
    np.testing.assert_allclose(trace.probs[0].sum(-1), 1.0, atol=1e-15)
    # P = 0 through forward: empty caches, or none at all
    empty = [np.zeros((2, 2, 0, 8))] * (2 * cfg["num_layers"])
    first = oracle.forward("decoder", cfg, {}, w, [ids[:, :4], mask[:, :4], pos[:, :4], *empty])
    assert np.array_equal(first[1], past[0][0])


# --- against transformers (float32 torch) -------------------------------------------------------------------

# Tolerance for the float32 references, relative to the largest |logit| at the compared positions. Rounding
# in float32 costs at most u = 2^-24 (~6e-8) per operation; a dot product of length n is within n * u of its
# exact value relative to the sum of |terms| (the classic gamma_n bound; BLAS's blocked sums do better, about
# sqrt(n) * u). The logits come out of a chain of K dependent contractions (per layer: q/k/v projections,
# scores, probabilities @ values, output projection, two (gated: three) FFN matmuls; then the LM head), and
# the normalisations keep each stage's relative error from growing beyond additive, so the bound is about
# K * n_max * u with n_max the longest contraction (the FFN's width). For 2 layers, K <= 2 * 7 + 1 = 15 and
# n_max = 128: 15 * 128 * 6e-8 ~ 1.1e-4. Observed errors are ~1e-6; a real mistake (a transposed weight, the
# wrong RoPE pairing, a mask off by one) is O(1).
U32 = 2.0**-24


def float32_tolerance(cfg):
    contractions = cfg["num_layers"] * (7 if cfg["ffn"] == "gated" else 6) + 1
    return contractions * max(cfg["hidden_size"], cfg["ffn_size"]) * U32


def torch_reference(model, ids, mask, pos):
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(pos),
            use_cache=False,
        )
    return out.logits.double().numpy()


def perturb(model, seed):
    """Random norm weights and biases too (transformers initialises them to 1 and 0, which would hide a
    mapping mistake)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def gpt2_weights(model, cfg):
    """transformers' GPT-2 weights in our names: Conv1D weights are (in, out), and c_attn is q|k|v fused."""
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    h = cfg["hidden_size"]
    w = {
        "embed.word.weight": sd["transformer.wte.weight"],
        "embed.position.weight": sd["transformer.wpe.weight"],
    }
    for suffix in ("weight", "bias"):
        w["final_norm." + suffix] = sd["transformer.ln_f." + suffix]
    for i in range(cfg["num_layers"]):
        src, dst = f"transformer.h.{i}", f"blocks.{i}"
        for name, ours in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            for suffix in ("weight", "bias"):
                w[f"{dst}.{ours}.{suffix}"] = sd[f"{src}.{name}.{suffix}"]
        qkv_w, qkv_b = sd[f"{src}.attn.c_attn.weight"], sd[f"{src}.attn.c_attn.bias"]  # (h, 3h), (3h,)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            w[f"{dst}.attn.{name}.weight"] = qkv_w[:, j * h : (j + 1) * h].T
            w[f"{dst}.attn.{name}.bias"] = qkv_b[j * h : (j + 1) * h]
        for name, ours in (
            ("attn.c_proj", "attn.out_proj"),
            ("mlp.c_fc", "ffn.fc1"),
            ("mlp.c_proj", "ffn.fc2"),
        ):
            w[f"{dst}.{ours}.weight"] = sd[f"{src}.{name}.weight"].T
            w[f"{dst}.{ours}.bias"] = sd[f"{src}.{name}.bias"]
    return w  # tied: no lm_head.weight, the oracle uses embed.word.weight


def llama_weights(model, cfg):
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    w = {
        "embed.word.weight": sd["model.embed_tokens.weight"],
        "final_norm.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(cfg["num_layers"]):
        src, dst = f"model.layers.{i}", f"blocks.{i}"
        pairs = {
            "input_layernorm": "attn_norm",
            "post_attention_layernorm": "ffn_norm",
            "self_attn.q_proj": "attn.q_proj",
            "self_attn.k_proj": "attn.k_proj",
            "self_attn.v_proj": "attn.v_proj",
            "self_attn.o_proj": "attn.out_proj",
            "mlp.gate_proj": "ffn.gate_proj",
            "mlp.up_proj": "ffn.up_proj",
            "mlp.down_proj": "ffn.down_proj",
        }
        for name, ours in pairs.items():
            w[f"{dst}.{ours}.weight"] = sd[f"{src}.{name}.weight"]
    assert len(w) == len(sd), sorted(set(sd) - {k for k in sd if k.endswith("weight")})
    return w


TF_GPT2 = decoder_cfg(hidden_size=64, num_heads=4, ffn_size=128, vocab_size=97, max_positions=32)
TF_LLAMA = LLAMA_STYLE | dict(
    hidden_size=64, ffn_size=128, vocab_size=97, max_positions=32, rope_theta=1000.0
)


def transformers_gpt2(cfg, dtype):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=cfg["vocab_size"],
        n_positions=cfg["max_positions"],
        n_embd=cfg["hidden_size"],
        n_layer=cfg["num_layers"],
        n_head=cfg["num_heads"],
        n_inner=cfg["ffn_size"],
        activation_function="gelu_new",
        layer_norm_epsilon=cfg["norm_eps"],
        initializer_range=0.2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=0,  # GPT-2's 50256 is outside this vocabulary
        eos_token_id=0,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(config).to(dtype).eval()
    perturb(model, 1)
    return model, gpt2_weights(model, cfg)


def transformers_llama(cfg, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_heads"],
        num_key_value_heads=cfg["num_kv_heads"],
        max_position_embeddings=cfg["max_positions"],
        rms_norm_eps=cfg["norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]},
        hidden_act="silu",
        initializer_range=0.2,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    perturb(model, 1)
    return model, llama_weights(model, cfg)


REFERENCES = {"gpt2": (TF_GPT2, transformers_gpt2), "llama": (TF_LLAMA, transformers_llama)}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_matches_transformers_float32_with_left_padding(family):
    import torch

    cfg, build = REFERENCES[family]
    model, w = build(cfg, torch.float32)
    ids, mask, pos = left_padded([10, 7, 2], 10, cfg["vocab_size"], seed=5)
    expected = torch_reference(model, ids, mask, pos)
    logits, _ = oracle.decoder(oracle.as_float64(w), cfg, ids, mask, pos, None)
    real = mask.astype(bool)
    error = rel_diff(logits[real], expected[real])
    assert error < float32_tolerance(cfg), (family, error, float32_tolerance(cfg))
    assert np.abs(expected[real]).max() > 1.0  # the larger init scale: logits far from 0, the check has teeth


@pytest.mark.slow
def test_matches_transformers_gpt2_in_float64():
    """GPT-2's eager path computes everything in the model's dtype, so in float64 it agrees to rounding.
    (Llama's does not: its RMSNorm and rotary tables run in float32 whatever the dtype.)"""
    import torch

    cfg = TF_GPT2
    model, w = transformers_gpt2(cfg, torch.float64)
    ids, mask, pos = left_padded([10, 7, 2], 10, cfg["vocab_size"], seed=6)
    expected = torch_reference(model, ids, mask, pos)
    logits, _ = oracle.decoder(w, cfg, ids, mask, pos, None)
    real = mask.astype(bool)
    assert rel_diff(logits[real], expected[real]) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_steps_match_transformers(family):
    """Prefill, then one token at a time: the oracle's cached logits against the reference's full pass."""
    import torch

    cfg, build = REFERENCES[family]
    model, w = build(cfg, torch.float32)
    ids, mask, pos = left_padded([8, 5], 8, cfg["vocab_size"], seed=7)
    expected = torch_reference(model, ids, mask, pos)
    w = oracle.as_float64(w)
    logits, past = oracle.decoder(w, cfg, ids[:, :5], mask[:, :5], pos[:, :5], None)
    steps = [logits]
    for i in range(5, 8):
        logits, past = oracle.decoder(w, cfg, ids[:, i : i + 1], mask[:, : i + 1], pos[:, i : i + 1], past)
        steps.append(logits)
    real = mask.astype(bool)
    assert rel_diff(np.concatenate(steps, axis=1)[real], expected[real]) < float32_tolerance(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [TF_GPT2, TF_LLAMA], ids=["gpt2", "llama"])
def test_names_and_graph_order_match_the_decoder_module(cfg):
    """Not an independent reference, a contract check: model_defs/decoder.py's DecoderModel, its state_dict
    fed to oracle.forward as is, inputs and outputs in graph order, prefill then a cached step."""
    import torch

    from qkv_onnx.model_defs.attention import MultiHeadAttention
    from qkv_onnx.model_defs.decoder import DecoderConfig, DecoderModel, empty_cache

    torch.manual_seed(0)
    model = DecoderModel(DecoderConfig.from_dict(cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.zero_empty_rows = True  # as exported: no NaN from the all-padding query rows
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    ids, mask, pos = left_padded([8, 5], 8, cfg["vocab_size"], seed=8)
    cache, tolerance = empty_cache(model.config, 2), float32_tolerance(cfg)
    for span in (slice(0, 6), slice(6, 7)):
        inputs = [torch.from_numpy(a) for a in (ids[:, span], mask[:, : span.stop], pos[:, span])]
        with torch.no_grad():
            expected = model(*inputs, *cache)
        got = oracle.forward("decoder", cfg, {}, weights, [t.numpy() for t in (*inputs, *cache)])
        assert len(got) == len(expected) == 1 + 2 * cfg["num_layers"]
        real = mask[:, span].astype(bool)
        assert rel_diff(got[0][real], expected[0].numpy()[real]) < tolerance
        for a, b in zip(got[1:], expected[1:]):
            assert rel_diff(a, b.numpy()) < tolerance
        cache = list(expected[1:])
