"""Decoder-only LMs (model_defs/decoder.py) and their Hugging Face checkpoints (decoder_families.py,
decoder_checkpoint.py): parameter counts against transformers' own models built on the meta device, parity of
logits, of cached decoding and of greedy generation with transformers' GPT2LMHeadModel and LlamaForCausalLM
(tiny, random weights, saved with save_pretrained and loaded back), and the refusals.

Tolerance, the project's policy (validate/compare.py): tolerance('float32', K, S) * max|reference logits|
with K = max(hidden, ffn, sequence), the longest accumulation of one output, and S = 2 * layers + 2 stages
(two residual branches per block, the embedding and the head); doubled because both sides are float32, each
with its own rounding. For these models that is about 1e-5 relative, 1e-4 absolute on logits of a few units:
far below the differences a wrong weight mapping, a transposed Conv1D or a shifted position makes (order one).
"""

import json
import os
import re

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported: nothing is fetched
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch
from helpers import save_hf_decoder

from qkv_onnx.model_defs.checkpoint import CheckpointError, ours_to_hf
from qkv_onnx.model_defs.decoder import (
    COUNTED_ONLY,
    DECODER_PRESETS,
    DecoderConfig,
    DecoderModel,
    decoder_param_count,
    empty_cache,
    meta_param_count,
)
from qkv_onnx.model_defs.decoder_checkpoint import (
    decoder_config_from_hf,
    decoder_model_type,
    load_decoder_checkpoint,
    load_decoder_model,
)
from qkv_onnx.model_defs.decoder_families import (
    DECODER_FAMILIES,
    checkpoint_shapes,
    to_our_layout,
    transformers_config,
)
from qkv_onnx.validate.compare import tolerance

GPT2_SMALL_PARAMS = 124_439_808  # transformers' GPT2LMHeadModel(GPT2Config()), the tied head once
NEW_TOKENS = 32


# ---- parameter counts --------------------------------------------------------------------------------------


def _transformers():
    transformers = pytest.importorskip("transformers", reason="transformers (test extra) is not installed")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _hf_meta_count(hf_config) -> int:
    t = _transformers()
    with torch.device("meta"):
        model = t.AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters once


def test_gpt2_small_count():
    cfg = DECODER_PRESETS["gpt2-small"]
    assert decoder_param_count(cfg) == GPT2_SMALL_PARAMS
    assert meta_param_count(cfg) == GPT2_SMALL_PARAMS


@pytest.mark.slow
def test_counts_match_transformers_on_meta():
    t = _transformers()
    assert _hf_meta_count(t.GPT2Config()) == GPT2_SMALL_PARAMS
    assert _hf_meta_count(transformers_config(DECODER_PRESETS["gpt2-small"])) == GPT2_SMALL_PARAMS
    for name in ("gpt2-tiny", "llama-tiny", "llama-100m"):  # llama: grouped-query (2 and 4 kv heads)
        cfg = DECODER_PRESETS[name]
        hf = _hf_meta_count(transformers_config(cfg))
        assert hf == decoder_param_count(cfg) == meta_param_count(cfg), name
    gqa = DecoderConfig.from_dict({**DECODER_PRESETS["llama-tiny"].to_dict(), "num_kv_heads": 1})
    assert _hf_meta_count(transformers_config(gqa)) == decoder_param_count(gqa) == meta_param_count(gqa)


def test_gpt3_count_on_meta():
    """GPT-3 175B's shape, counted on the meta device (700 GB in float32 if anything were allocated), equals
    the closed form, and a form written out here: 12 L h^2 + 13 L h per block (q, k, v, out with biases;
    fc1, fc2 with biases; two LayerNorms), (V + P) h embeddings, 2 h for the final norm, the head tied."""
    cfg = COUNTED_ONLY["gpt3"]
    L, h, V, P = cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.max_positions
    by_hand = 12 * L * h * h + 13 * L * h + (V + P) * h + 2 * h
    assert meta_param_count(cfg) == decoder_param_count(cfg) == by_hand
    assert 174e9 < by_hand < 176e9


# ---- hand-written checkpoints: mapping, layouts, refusals --------------------------------------------------

GPT2_JSON = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 4,
    "vocab_size": 50,
    "n_positions": 16,
}
LLAMA_JSON = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 48,
    "vocab_size": 50,
    "max_position_embeddings": 16,
}


def _write(directory, config: dict, tensors: dict | None = None, prefix: bool = True):
    """config.json, and model.safetensors with random tensors of every key the config implies (or
    `tensors`)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if tensors is None:
        tensors = _tensors(directory, prefix)
    save_file({k: v.clone() for k, v in tensors.items()}, str(directory / "model.safetensors"))  # none shared
    return directory


def _tensors(directory, prefix: bool = True) -> dict:
    """A checkpoint's tensors for config.json in `directory`: every key, random, in the checkpoint's layout;
    a tied head left out as transformers leaves it."""
    cfg = decoder_config_from_hf(directory / "config.json")
    family = DECODER_FAMILIES[decoder_model_type(directory)]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DecoderModel(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in checkpoint_shapes(shapes, family).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        key = ours_to_hf(name, family)
        key = key if key.startswith("lm_head.") or not prefix else family.prefix + key
        out[key] = torch.randn(shape, generator=g)
    return out


def test_gpt2_layout(tmp_path):
    """c_attn (in, 3 out) is q | k | v on its output axis, stored transposed; the other Conv1Ds too."""
    d = _write(tmp_path / "gpt2", GPT2_JSON)
    from safetensors.torch import load_file

    hf = load_file(str(d / "model.safetensors"))
    cfg, state = load_decoder_checkpoint(d)
    h = cfg.hidden_size
    c_attn_w, c_attn_b = hf["transformer.h.1.attn.c_attn.weight"], hf["transformer.h.1.attn.c_attn.bias"]
    assert c_attn_w.shape == (h, 3 * h)
    for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(state[f"blocks.1.attn.{part}.weight"], c_attn_w[:, i * h : (i + 1) * h].T)
        assert torch.equal(state[f"blocks.1.attn.{part}.bias"], c_attn_b[i * h : (i + 1) * h])
    assert torch.equal(state["blocks.0.attn.out_proj.weight"], hf["transformer.h.0.attn.c_proj.weight"].T)
    assert torch.equal(state["blocks.0.ffn.fc1.weight"], hf["transformer.h.0.mlp.c_fc.weight"].T)
    assert torch.equal(state["blocks.0.ffn.fc2.weight"], hf["transformer.h.0.mlp.c_proj.weight"].T)
    assert state["blocks.0.ffn.fc1.weight"].shape == (4 * h, h)  # n_inner absent: 4 * n_embd
    assert "lm_head.weight" not in state  # tied: the embedding is the head
    assert set(state) == set(DecoderModel(cfg).state_dict())
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in state.values())
    assert to_our_layout({}, DECODER_FAMILIES["gpt2"], {}) == {}


def test_gpt2_configs(tmp_path):
    cfg = decoder_config_from_hf(_write(tmp_path / "a", GPT2_JSON) / "config.json")
    assert (cfg.norm, cfg.positions, cfg.ffn, cfg.hidden_act, cfg.tie_word_embeddings) == (
        "layer",
        "learned",
        "mlp",
        "gelu_tanh",
        True,
    )
    assert (cfg.ffn_size, cfg.max_positions, cfg.norm_eps, cfg.kv_heads) == (128, 16, 1e-5, 4)
    for act, ours in (("relu", "relu"), ("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh")):
        (tmp_path / "config.json").write_text(json.dumps({**GPT2_JSON, "activation_function": act}))
        assert decoder_config_from_hf(tmp_path).hidden_act == ours  # relu: computed, so not refused
    (tmp_path / "config.json").write_text(
        json.dumps({**GPT2_JSON, "n_inner": 40, "tie_word_embeddings": False})
    )
    assert (
        decoder_config_from_hf(tmp_path).ffn_size,
        decoder_config_from_hf(tmp_path).tie_word_embeddings,
    ) == (
        40,
        False,
    )


def test_llama_configs(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_JSON))
    cfg = decoder_config_from_hf(path)
    assert (cfg.norm, cfg.positions, cfg.ffn, cfg.hidden_act, cfg.tie_word_embeddings) == (
        "rms",
        "rope",
        "gated",
        "silu",
        False,
    )
    assert (cfg.kv_heads, cfg.norm_eps, cfg.rope_theta, cfg.attention_bias, cfg.mlp_bias) == (
        2,
        1e-6,
        10000.0,
        False,
        False,
    )
    for extra, theta in (
        ({"rope_theta": 5e5}, 5e5),  # transformers 4
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "rope_theta": 3.0}, 1e6),  # 5
        ({"rope_scaling": None, "rope_parameters": None, "head_dim": 8, "pretraining_tp": 1}, 1e4),
    ):
        path.write_text(json.dumps({**LLAMA_JSON, **extra}))
        assert decoder_config_from_hf(path).rope_theta == theta, extra
    path.write_text(json.dumps({**LLAMA_JSON, "num_key_value_heads": None}))
    assert decoder_config_from_hf(path).kv_heads == 4


REFUSED_CONFIGS = [
    (
        LLAMA_JSON,
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        "rope_scaling.low_freq_factor None",
    ),
    (LLAMA_JSON, {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    (LLAMA_JSON, {"rope_parameters": {"rope_type": "ntk-by-parts"}}, "rope_type 'ntk-by-parts'"),
    (LLAMA_JSON, {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported for llama"),
    (
        LLAMA_JSON,
        {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
        "short_factor and long_factor need 4 values each",
    ),
    (LLAMA_JSON, {"head_dim": 0}, "head_dim 0"),
    (LLAMA_JSON, {"pretraining_tp": 2}, "pretraining_tp"),
    (LLAMA_JSON, {"hidden_act": "gelu_fast"}, "hidden_act 'gelu_fast'"),
    (LLAMA_JSON, {"num_key_value_heads": 3}, "kv heads 3"),
    (LLAMA_JSON, {"num_key_value_heads": 0}, "num_key_value_heads 0"),
    (LLAMA_JSON, {"attention_bias": "yes"}, "attention_bias 'yes'"),
    (GPT2_JSON, {"activation_function": "quick_gelu"}, "activation_function 'quick_gelu'"),
    (GPT2_JSON, {"scale_attn_weights": False}, "scale_attn_weights"),
    (GPT2_JSON, {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    (GPT2_JSON, {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    (GPT2_JSON, {"add_cross_attention": True}, "add_cross_attention"),
    (GPT2_JSON, {"n_layer": 2.0}, "n_layer 2.0"),
    (GPT2_JSON, {"n_head": 5}, "bad head layout"),
    (GPT2_JSON, {"model_type": "bert"}, "an encoder"),
    (GPT2_JSON, {"model_type": "falcon"}, "'falcon' is not a supported decoder"),
]


@pytest.mark.parametrize("base, change, words", REFUSED_CONFIGS, ids=[w for *_, w in REFUSED_CONFIGS])
def test_refused_configs(tmp_path, base, change, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**base, **change}))
    with pytest.raises(CheckpointError, match=r"config\.json: .*" + re.escape(words)):
        decoder_config_from_hf(path)


def test_decoder_model_type(tmp_path):
    for config, kind in (
        (GPT2_JSON, "gpt2"),
        (LLAMA_JSON, "llama"),
        ({"model_type": "bert"}, None),
        ({}, None),
    ):
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert decoder_model_type(tmp_path) == decoder_model_type(tmp_path / "config.json") == kind
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        decoder_model_type(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        decoder_model_type(tmp_path / "nothing")


@pytest.mark.parametrize("config", [GPT2_JSON, LLAMA_JSON], ids=["gpt2", "llama"])
def test_refused_checkpoints(tmp_path, config):
    d = _write(tmp_path / "ok", config)
    cfg, model = load_decoder_model(d)
    assert not model.training and sum(p.numel() for p in model.parameters()) == decoder_param_count(cfg)
    good = _tensors(d)
    some = sorted(good)[3]

    def refused(tensors, *words):
        with pytest.raises(CheckpointError) as e:
            load_decoder_checkpoint(_write(tmp_path / "bad", config, tensors))
        message = str(e.value)
        assert "\n" not in message and str(tmp_path / "bad" / "model.safetensors") in message
        for w in words:
            assert w in message, message

    refused({k: v for k, v in good.items() if k != some}, "missing key(s)", some)
    extra = next(k for k in good if ".0." in k).replace(".0.", f".{cfg.num_layers}.")  # one layer too many
    refused({**good, extra: good[extra.replace(f".{cfg.num_layers}.", ".0.")]}, "unexpected key(s)", extra)
    refused({**good, "score.weight": torch.zeros(2, cfg.hidden_size)}, "unexpected key(s)", "score.weight")
    refused({**good, some: torch.zeros(*good[some].shape, 2)}, "shape mismatch", some)
    refused({**good, some: good[some].to(torch.int32)}, "non-floating", some)


def test_gpt2_checkpoint_variants(tmp_path):
    """The original GPT-2 files: no 'transformer.' prefix, the causal-mask buffers; a tied head that is saved
    must be the embedding; an untied one must be saved; shards; no pickle."""
    d = _write(tmp_path / "plain", GPT2_JSON, prefix=False)
    tensors = _tensors(d, prefix=False)
    n = GPT2_JSON["n_positions"]
    for i in range(GPT2_JSON["n_layer"]):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, n, n, dtype=torch.uint8))
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    _, plain = load_decoder_checkpoint(_write(d, GPT2_JSON, tensors))
    _, prefixed = load_decoder_checkpoint(_write(tmp_path / "prefixed", GPT2_JSON))
    assert all(torch.equal(plain[k], prefixed[k]) for k in plain)  # same seed, same tensors

    good = _tensors(d, prefix=True)
    wte = good["transformer.wte.weight"].clone()
    _, state = load_decoder_checkpoint(_write(tmp_path / "head", GPT2_JSON, {**good, "lm_head.weight": wte}))
    assert set(state) == set(prefixed)
    with pytest.raises(CheckpointError, match="'lm_head.weight' differs from 'transformer.wte.weight'"):
        load_decoder_checkpoint(_write(tmp_path / "head", GPT2_JSON, {**good, "lm_head.weight": wte + 1}))
    untied = {**GPT2_JSON, "tie_word_embeddings": False}
    with pytest.raises(CheckpointError, match=r"missing key\(s\): lm_head.weight$"):
        load_decoder_checkpoint(_write(tmp_path / "untied", untied, good))
    cfg, model = load_decoder_model(_write(tmp_path / "untied", untied, {**good, "lm_head.weight": wte + 1}))
    assert torch.equal(model.lm_head.weight, wte + 1)

    from safetensors.torch import save_file

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(GPT2_JSON))
    keys = sorted(good)
    weight_map = {k: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, k in enumerate(keys)}
    for shard in set(weight_map.values()):
        save_file({k: good[k] for k in keys if weight_map[k] == shard}, str(sharded / shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, state = load_decoder_checkpoint(sharded)
    assert all(torch.equal(state[k], prefixed[k]) for k in state)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(GPT2_JSON))
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_decoder_checkpoint(pickled)


# ---- parity with transformers ------------------------------------------------------------------------------

SEQ, PAD, PREFILL, PROMPT, PROMPT_PAD = 12, 4, 5, 8, 3
PARITY = {
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64),
    "llama": dict(
        num_hidden_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=500,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
    ),
    "llama-biased-tied": dict(  # biases everywhere, one head shared, GELU in the gate, no GQA
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=96,
        vocab_size=500,
        max_position_embeddings=64,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        hidden_act="gelu_pytorch_tanh",
    ),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """name -> (our DecoderModel loaded from the saved files, transformers' model that saved them)."""
    cache = {}

    def get(name):
        if name not in cache:
            directory = tmp_path_factory.mktemp(name)
            hf = save_hf_decoder(directory, PARITY[name], "gpt2" if name == "gpt2" else "llama")
            cfg, ours = load_decoder_model(directory)
            cache[name] = cfg, ours, hf
        return cache[name]

    return get


def _inputs(cfg, seq, pad, seed=3):
    """(input_ids, attention_mask, position_ids) of batch 2, row 1 left-padded by `pad`; positions as
    transformers' generate makes them: cumsum(mask) - 1, clipped at 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.int64)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _tol(cfg, seq, reference) -> float:
    K, S = max(cfg.hidden_size, cfg.ffn_size, seq), 2 * cfg.num_layers + 2
    return 2 * tolerance("float32", K, S) * reference.abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PARITY))
def test_full_sequence_logits(pair, name):
    cfg, ours, hf = pair(name)
    ids, mask, pos = _inputs(cfg, SEQ, PAD)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got, *present = ours(ids, mask, pos, *empty_cache(cfg, 2))
    real = mask.bool()
    err, tol = (got[real] - ref[real]).abs().max().item(), _tol(cfg, SEQ, ref[real])
    assert err <= tol, f"{name}: max |ours - transformers| {err:.3g} > {tol:.3g}"
    assert ref[real].std() > 0.5  # logits far from uniform: the comparison means something
    assert len(present) == 2 * cfg.num_layers
    assert all(p.shape == (2, cfg.kv_heads, SEQ, cfg.head_size) for p in present)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cached_decode(pair, name):
    """Prefill PREFILL tokens onto an empty cache, then one token a step, feeding present back as past: each
    step's logits are transformers' full-sequence logits at that position."""
    cfg, ours, hf = pair(name)
    ids, mask, pos = _inputs(cfg, SEQ, PAD)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        logits, *past = ours(ids[:, :PREFILL], mask[:, :PREFILL], pos[:, :PREFILL], *empty_cache(cfg, 2))
        steps = [logits]
        for t in range(PREFILL, SEQ):
            logits, *past = ours(ids[:, t : t + 1], mask[:, : t + 1], pos[:, t : t + 1], *past)
            steps.append(logits)
            assert past[0].shape == (2, cfg.kv_heads, t + 1, cfg.head_size)
    got, real = torch.cat(steps, dim=1), mask.bool()
    err, tol = (got[real] - ref[real]).abs().max().item(), _tol(cfg, SEQ, ref[real])
    assert err <= tol, f"{name}: max |cached - transformers| {err:.3g} > {tol:.3g}"


def _greedy(model, cfg, ids, mask, pos, steps):
    """Our greedy decoding with the cache: (new token ids (B, steps), top1 - top2 logit of each step)."""
    logits, *past = model(ids, mask, pos, *empty_cache(cfg, ids.shape[0]))
    tokens, margins, scale = [], [], 0.0
    for _ in range(steps):
        last = logits[:, -1]
        top = last.topk(2, dim=-1).values
        margins.append(top[:, 0] - top[:, 1])
        scale = max(scale, last.abs().max().item())
        nxt = last.argmax(-1, keepdim=True)
        tokens.append(nxt)
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        logits, *past = model(nxt, mask, pos, *past)
    return torch.cat(tokens, dim=1), torch.stack(margins), scale


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_generation(pair, name):
    """32 greedy tokens with our module and its cache are transformers' generate(do_sample=False), on a
    batch with left padding. Meaningful only if no step is a near tie: every top1 - top2 margin must be far
    above the tolerance (an error under the tolerance cannot flip the argmax unless the margin is under twice
    it)."""
    cfg, ours, hf = pair(name)
    ids, mask, pos = _inputs(cfg, PROMPT, PROMPT_PAD, seed=4)
    with torch.no_grad():
        got, margins, scale = _greedy(ours, cfg, ids, mask, pos, NEW_TOKENS)
        ref = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )
    assert ref.shape == (2, PROMPT + NEW_TOKENS)
    tol = _tol(cfg, PROMPT + NEW_TOKENS, torch.tensor(scale))
    assert margins.min().item() > 10 * tol, f"{name}: a near tie, margin {margins.min():.3g}, tol {tol:.3g}"
    assert torch.equal(got, ref[:, PROMPT:]), f"{name}:\nours {got.tolist()}\ntransformers {ref[:, PROMPT:]}"
    assert len(set(got[0].tolist())) > 2  # not one token repeated: the cache is read at many positions
