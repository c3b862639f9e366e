"""The decoder families people ship (docs/decoders.md), each a transformers checkpoint with random weights
made by save_pretrained, small enough to export in seconds, whose distinctive features bite: a sliding window
shorter than the decoded sequence, a RoPE scaling whose original length the decode crosses, soft caps that
move the logits, an unequal q | k | v split. For each, on every backend (one per family in the default run,
rotating; all under -m matrix): qkv-export writes one fused attention op per layer, qkv-validate passes
(rebuild), the artifact's logits at every step of a teacher-forced decode equal those of transformers' own
cached generate and of the oracle, and its 32 greedy tokens are generate's."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import rewrite, rotation, run_cli, trained_vectors, weights_of

from qkv_onnx.accuracy_contract import judge
from qkv_onnx.decoder_format import FEATURES
from qkv_onnx.export.cli import main as export_main
from qkv_onnx.genai import GENAI_CONFIG, encode, genai_config
from qkv_onnx.graph_contract import check_structure
from qkv_onnx.validate import oracle
from qkv_onnx.validate.artifact import load_artifact
from qkv_onnx.validate.compare import model_error_terms, tolerance
from qkv_onnx.validate.decode import GREEDY_TOKENS, Decoder, greedy, margins

pytestmark = pytest.mark.slow

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,  # enough for a full and a sliding layer, a rotating and a plain one
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
ROPE = {"rope_theta": 10000.0}
PROMPT = 8  # tokens, the second row left-padded by 3: the decode then runs to 8 + 32 = 40
WINDOW = 6  # keys a sliding layer sees: far fewer than the decoded 40
ORIGINAL = 16  # RoPE scalings' original length, crossed at step 9 of the decode
# family: (transformers config class, its arguments, the DecoderConfig features that must change the logits)
FAMILIES = {
    "qwen2": (
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
        [
            "sliding_window"
        ],  # its q/k/v biases without an output bias: the checkpoint's weights, loaded strictly
    ),
    "qwen3": ("Qwen3Config", {"head_dim": 24}, ["qk_norm"]),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW, "head_dim": 24}, ["sliding_window"]),
    "llama": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": ORIGINAL,
                **ROPE,
            }
        },
        ["rope_scaling"],
    ),
    "phi3": (  # q | k | v of 64 | 32 | 32 rows in one qkv_proj; half the head rotates; longrope
        "Phi3Config",
        {
            "original_max_position_embeddings": ORIGINAL,
            "sliding_window": 2 * WINDOW,
            "rope_parameters": {
                "rope_type": "longrope",
                "short_factor": [1.0, 1.2, 1.5, 2.0],
                "long_factor": [2.0, 3.0, 4.5, 8.0],
                "partial_rotary_factor": 0.5,
                **ROPE,
            },
        },
        ["rope_scaling", "rotary_dim", "sliding_window"],
    ),
    "gemma": ("GemmaConfig", {"head_dim": 16}, ["embedding_multiplier"]),
    "gemma2": (
        "Gemma2Config",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 10,  # scores large enough for the cap to bite
            "sliding_window": WINDOW,
            "attn_logit_softcapping": 2.0,  # not 1: a division by 1 the exporter's optimizer folds away
            "final_logit_softcapping": 4.0,
        },
        ["attention_softcap", "final_softcap", "sliding_window", "attention_scale"],
    ),
    "gemma3_text": (  # sliding and full layers alternate; the full ones' RoPE scaled, the sliding ones' own
        "Gemma3TextConfig",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": WINDOW,
            "sliding_window_pattern": 2,
            "rope_theta": 10000.0,
            "rope_local_base_freq": 100.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        },
        ["qk_norm", "sliding_window", "rope_local_theta", "rope_scaling"],
    ),
    "olmo2": ("Olmo2Config", {}, ["qk_norm"]),
    "granite": (
        "GraniteConfig",
        {
            "embedding_multiplier": 6.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.5,  # not 1/sqrt(head_dim 16) = 0.25: then it would change nothing
            "logits_scaling": 2.0,
        },
        ["embedding_multiplier", "residual_multiplier", "attention_scale", "logits_divisor"],
    ),
    "smollm3": (  # its second layer without RoPE, and sliding
        "SmolLM3Config",
        {"use_sliding_window": True, "sliding_window": WINDOW, "no_rope_layer_interval": 2},
        ["rope_layers", "sliding_window"],
    ),
}
BACKENDS = ["onnx-attention", "ort-contrib", "decomposed"]
FUSED = {"onnx-attention": "Attention", "ort-contrib": "com.microsoft::GroupQueryAttention"}
# (backend, dtype): float32 on every backend, float16 and int8 on a fused one each (as the Llama cells of
# tests/test_decoders.py); the default run keeps one per family, rotating, all under -m matrix
KINDS = [(b, "float32") for b in BACKENDS] + [("onnx-attention", "float16"), ("ort-contrib", "int8")]
CELLS = rotation(list(FAMILIES), KINDS)


def make_checkpoint(family: str, directory):
    """transformers' model of `family` (random weights, norms and biases off their 1 and 0) saved there."""
    import transformers as t

    t.logging.set_verbosity_error()
    name, kwargs, _ = FAMILIES[family]
    config = getattr(t, name)(**BASE, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(3)
    hf = t.AutoModelForCausalLM.from_config(config).eval()
    trained_vectors(hf, 4)
    hf.save_pretrained(directory)
    return hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            directory = tmp_path_factory.mktemp(family)
            cache[family] = directory, make_checkpoint(family, directory)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    cache = {}

    def get(family, backend, dtype="float32"):
        if (family, backend, dtype) not in cache:
            out = tmp_path_factory.mktemp("families") / f"{family}-{backend}-{dtype}"
            args = ["--weights", str(checkpoint(family)[0]), "--backend", backend, "--out", str(out)]
            assert export_main([*args, "--dtype", dtype]) == 0
            cache[family, backend, dtype] = out
        return cache[family, backend, dtype]

    return get


def prompt():
    rng = np.random.default_rng(11)
    ids = rng.integers(3, BASE["vocab_size"], (2, PROMPT)).astype(np.int64)
    mask = np.ones((2, PROMPT), np.int64)
    mask[1, :3], ids[1, :3] = 0, 0
    return ids, mask


def generate(hf):
    """transformers' cached greedy generate: (tokens (B, 32), each step's raw logits (B, 32, vocab))."""
    ids, mask = prompt()
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=GREEDY_TOKENS,
            min_new_tokens=GREEDY_TOKENS,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[:, PROMPT:].numpy(), torch.stack(out.logits, 1).double().numpy()


def teacher_forced(dec: Decoder, tokens: np.ndarray) -> np.ndarray:
    """The last position's logits (B, steps, vocab) of the prompt, then of each of `tokens` but the last, fed
    one at a time with the cache (the reference's tokens: every step reads what the reference read)."""
    ids, mask = prompt()
    logits, past = dec(ids, mask, dec.empty(2))
    out = [logits[:, -1]]
    for step in range(tokens.shape[1] - 1):
        ids = np.concatenate([ids, tokens[:, step : step + 1]], axis=1)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        logits, past = dec.extend(ids, mask, past)
        out.append(logits[:, -1])
    return np.stack(out, 1).astype(np.float64)


def session_run(out):
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda inputs: session.run(None, dict(zip(names, inputs)))


def oracle_run(manifest: dict, out):
    weights = oracle.as_float64(weights_of(out))
    cfg = manifest["model"]["config"]
    return lambda inputs: list(oracle.forward("decoder", cfg, {}, weights, inputs))


@pytest.mark.parametrize("family, kind", CELLS)
def test_family_exports_fused_validates_and_decodes_as_transformers(
    family, kind, checkpoint, artifact, tmp_path, capsys
):
    """float32: the logits within twice the rounding tolerance of transformers' (both round) and within it of
    the oracle's, and the same 32 greedy tokens; float16 likewise at its own tolerance; int8 by its accuracy
    contract (next-token agreement, token cosine, relative error of the logits)."""
    backend, dtype = kind
    out = artifact(family, backend, dtype)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint"]["family"] == family
    counts, layers = manifest["op_counts"], manifest["model"]["config"]["num_layers"]
    assert "Softmax" not in counts if backend in FUSED else counts.get("Softmax") == layers
    if backend in FUSED:
        assert counts.get(FUSED[backend]) == layers
    code, _, err, doc = run_cli(capsys, out, "--providers", "cpu", "--json", tmp_path / "v.json")
    assert code == 0, err
    assert "byte-identical to the exporter's rebuild" in doc["artifacts"][0]["graph_check"]
    structural = load_artifact(out, rebuild=False)  # without torch: the Llama row and the family's components
    check_structure(onnx.load(str(structural.model_path)), structural.manifest, structural.weights)
    structural.close()

    hf = checkpoint(family)[1]
    want_tokens, want_logits = generate(hf)
    got = teacher_forced(Decoder(manifest, session_run(out)), want_tokens)
    by_oracle = teacher_forced(Decoder(manifest, oracle_run(manifest, out)), want_tokens)
    if dtype == "int8":
        for reference in (want_logits, by_oracle):
            contract = judge(got, reference, None, False, logits=True)
            assert contract.passed, contract.describe()
        return
    k, stages = model_error_terms(manifest, PROMPT + GREEDY_TOKENS)
    atol = 2 * tolerance(dtype, k, stages) * np.abs(want_logits).max()  # two roundings: ours, theirs
    assert np.abs(got - want_logits).max() <= atol, "artifact vs transformers"
    assert np.abs(by_oracle - want_logits).max() <= atol, "oracle vs transformers"
    assert np.abs(got - by_oracle).max() <= atol / 2, "artifact vs oracle"
    if dtype == "float32":
        tokens, logits = greedy(Decoder(manifest, session_run(out)), *prompt(), GREEDY_TOKENS)
        np.testing.assert_array_equal(tokens, want_tokens)
        assert margins(want_logits).min() > 2 * np.abs(logits - want_logits).max(), (
            "a near tie: equal by luck"
        )


def _without(cfg: dict, feature: str) -> dict:
    """`cfg` with `feature` off (its default), and what only makes sense with it."""
    off = {k: v for k, v in cfg.items() if k != feature}
    if feature == "sliding_window":
        off.pop("layer_types", None)
    if feature == "rotary_dim" and "rope_scaling" in off:  # half the factors rotate half the dims
        scaling = dict(off["rope_scaling"])
        for key in ("short_factor", "long_factor"):
            scaling[key] = scaling[key] * 2
        off["rope_scaling"] = scaling
    return off


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_distinctive_feature_changes_the_logits(family, checkpoint):
    """Turned off in the oracle, each feature the family is tested for moves the logits of a 40-token sequence
    by far more than the tolerance: the tests above would see it dropped. (Where norms sit and which biases
    exist are the checkpoint's weights themselves, loaded strictly.)"""
    from qkv_onnx.model_defs.decoder_checkpoint import load_decoder_checkpoint

    cfg, state = load_decoder_checkpoint(checkpoint(family)[0])
    weights = {k: v.double().numpy() for k, v in state.items()}
    d = cfg.to_dict()
    manifest = {"model": {"architecture": "decoder", "config": d}}
    ids, mask = prompt()
    tokens = np.random.default_rng(5).integers(3, BASE["vocab_size"], (2, GREEDY_TOKENS))
    full_ids = np.concatenate([ids, tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    positions = np.where(full_mask, np.cumsum(full_mask, axis=1) - 1, 1)

    def logits(config):
        return oracle.forward("decoder", config, {}, weights, [full_ids, full_mask, positions])[0]

    reference = logits(d)
    k, stages = model_error_terms(manifest, full_ids.shape[1])
    atol = tolerance("float32", k, stages) * np.abs(reference).max()
    for feature in FAMILIES[family][2]:
        assert feature in d and feature in FEATURES, feature
        moved = np.abs(logits(_without(d, feature)) - reference).max()
        assert moved > 100 * atol, f"{feature}: off moves the logits by {moved:.2e} only (atol {atol:.2e})"


# --- hostile manifests: a config field re-signed to a lie ------------------------------------------------


def _scaled(**change):
    return lambda scaling: {**scaling, **change}


LIES = [  # (family, field, the lie: a value or a function of the true one); the first four run by default
    ("mistral", "sliding_window", 4),
    ("gemma2", "attention_softcap", 3.0),
    ("llama", "rope_scaling", _scaled(factor=4.0)),
    ("qwen3", "head_dim", 32),
    ("gemma2", "final_softcap", 8.0),
    ("gemma2", "attention_scale", 0.5),
    ("phi3", "rope_scaling", _scaled(original_max_position_embeddings=32)),
    ("phi3", "rope_scaling", _scaled(attention_factor=1.0)),
    ("granite", "residual_multiplier", 0.25),
    ("granite", "logits_divisor", 1.0),
    ("smollm3", "rope_layers", [True, True]),
    ("gemma3_text", "rope_local_theta", 1000.0),
    ("gemma3_text", "layer_types", ["full", "sliding"]),
    ("olmo2", "norm_placement", "sandwich"),
    ("qwen2", "out_bias", True),
]


@pytest.mark.parametrize(
    "family, field, lie",
    [pytest.param(*lie, marks=() if n < 4 else pytest.mark.matrix) for n, lie in enumerate(LIES)],
    ids=[f"{f}-{k}-{n}" for n, (f, k, _) in enumerate(LIES)],
)
def test_a_feature_resigned_to_a_lie_fails_validation(family, field, lie, artifact, tmp_path, capsys):
    """The manifest says another window, cap, scale, RoPE scaling, head width, ... than the graph computes,
    re-signed: validation fails (the rebuild's bytes differ, or the weights do not fit), one line, exit 2."""
    from helpers import edit_manifest, single_error_line

    copy = tmp_path / "a"
    shutil.copytree(artifact(family, "onnx-attention"), copy)
    capsys.readouterr()  # what making the checkpoint printed

    def edit(m):
        cfg = m["model"]["config"]
        cfg[field] = lie(cfg[field]) if callable(lie) else lie

    edit_manifest(copy, edit)
    code, _, err, _ = run_cli(capsys, copy, "--providers", "cpu")
    assert code == 2, err
    assert str(copy) in single_error_line(err)


def test_a_rope_decoders_length_is_reported_unverified_and_bounded(artifact, tmp_path, capsys):
    """max_positions is no part of a RoPE graph: a plausible lie (told in genai_config.json's context length
    too) passes, with a note saying it is not verified (it bounds the cases judged and genai's context,
    nothing else); an impossible one (2^40) is an invalid manifest."""
    from helpers import edit_manifest, single_error_line

    copy = tmp_path / "a"
    shutil.copytree(artifact("llama", "onnx-attention"), copy)
    capsys.readouterr()
    edit_manifest(copy, lambda m: m["model"]["config"].__setitem__("max_positions", 100_000))
    manifest = json.loads((copy / "manifest.json").read_text())  # genai_config.json told the same lie
    rewrite(copy, GENAI_CONFIG, encode(genai_config(manifest)))
    code, out, err, _ = run_cli(capsys, copy, "--providers", "cpu")
    assert code == 0, err
    assert "not verified, the graph does not encode it: max_positions 100000 (RoPE needs no table" in out
    edit_manifest(copy, lambda m: m["model"]["config"].__setitem__("max_positions", 1 << 40))
    code, _, err, _ = run_cli(capsys, copy, "--providers", "cpu")
    assert code == 2 and "max_positions 1099511627776 is past any model's" in single_error_line(err)


def test_without_a_rebuild_a_lie_is_refused_or_named_unchecked(artifact, tmp_path, capsys):
    """--no-rebuild (the structural contract): a cap re-signed to a lie is refused (each fused op's softcap is
    read off the graph); a window re-signed to a lie is named on the graph line as not checked without a
    rebuild (on the ONNX Attention backend it is a constant of the mask), never silently vouched for."""
    from helpers import edit_manifest, single_error_line

    copy = tmp_path / "cap"
    shutil.copytree(artifact("gemma2", "onnx-attention"), copy)
    shutil.copytree(artifact("mistral", "onnx-attention"), tmp_path / "window")
    capsys.readouterr()  # what the checkpoints' making printed
    edit_manifest(copy, lambda m: m["model"]["config"].__setitem__("attention_softcap", 3.0))
    code, _, err, _ = run_cli(capsys, copy, "--providers", "cpu", "--no-rebuild")
    assert code == 2 and "layer 0's Attention has softcap 2.0, the config says 3.0" in single_error_line(err)

    copy = tmp_path / "window"
    edit_manifest(copy, lambda m: m["model"]["config"].__setitem__("sliding_window", 5))
    code, out, err, doc = run_cli(
        capsys, copy, "--providers", "cpu", "--no-rebuild", "--json", tmp_path / "r.json"
    )
    line = doc["artifacts"][0]["graph_check"]
    assert "graph: structural contract" in line and "not checked without a rebuild: sliding_window 5" in line
    assert code == 1, err  # and here the cases judged are long enough for the lie to show in the numbers


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_in_the_last_rows_is_refused(bad, tmp_path, monkeypatch):
    """A checkpoint's tensors are read a slice of rows at a time (a 128k-row embedding is never held in
    bfloat16 and float32 at once): every slice is checked, the last one too, and the read is the tensor."""
    from qkv_onnx.model_defs import decoder_checkpoint
    from qkv_onnx.model_defs.checkpoint import CheckpointError

    hf = make_checkpoint("llama", tmp_path)
    monkeypatch.setattr(decoder_checkpoint, "READ_ELEMENTS", 7 * BASE["hidden_size"])  # 43 slices of 7 rows
    _, tensors = decoder_checkpoint.open_decoder_checkpoint(tmp_path)
    embedding = hf.model.embed_tokens.weight.detach()
    assert torch.equal(tensors["embed.word.weight"], embedding)
    with torch.no_grad():
        hf.model.embed_tokens.weight[-1, 5] = bad
    hf.save_pretrained(tmp_path)
    _, tensors = decoder_checkpoint.open_decoder_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="embed_tokens.weight holds NaN or infinite values"):
        tensors["embed.word.weight"]
