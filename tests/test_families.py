"""The BERT families end to end, as a user's checkpoint arrives: transformers builds the model with random
weights and save_pretrained writes it; qkv-export --weights exports it; ONNX Runtime runs it on padded
batches and must match transformers' own forward pass (and the float64 oracle) on the real positions;
qkv-validate passes it with the byte-identical rebuild. Families or options we do not compute are refused."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import EMPTY_ROW_CASES, failing, openvino_native_bf16, run_cli, single_error_line

from qkv_onnx.export.cli import main as export_main
from qkv_onnx.graph_contract import check_structure
from qkv_onnx.validate import oracle
from qkv_onnx.validate.artifact import load_artifact
from qkv_onnx.validate.compare import compare_outputs, model_error_terms, tolerance

transformers = pytest.importorskip("transformers")

SMALL = dict(
    vocab_size=99, max_position_embeddings=40, initializer_range=0.3
)  # 0.3: attention far from uniform
BERTISH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **SMALL)
# (family, what differs from BERTISH): two configurations each, different head counts and options.
CONFIGS = {
    "bert-a": ("BertConfig", BERTISH),
    "bert-b": (
        "BertConfig",
        {**BERTISH, "num_attention_heads": 4, "hidden_act": "gelu_new", "num_hidden_layers": 3},
    ),
    "roberta-a": ("RobertaConfig", {**BERTISH, "pad_token_id": 1, "type_vocab_size": 1}),
    "roberta-b": (
        "RobertaConfig",
        {**BERTISH, "pad_token_id": 3, "type_vocab_size": 1, "num_attention_heads": 4},
    ),
    "xlm-roberta-a": ("XLMRobertaConfig", {**BERTISH, "pad_token_id": 1, "type_vocab_size": 1}),
    "xlm-roberta-b": (
        "XLMRobertaConfig",
        {**BERTISH, "pad_token_id": 1, "hidden_size": 48, "num_attention_heads": 3},
    ),
    "electra-a": ("ElectraConfig", {**BERTISH, "embedding_size": 16}),
    "electra-b": (
        "ElectraConfig",
        {**BERTISH, "embedding_size": 32, "num_attention_heads": 4, "hidden_act": "gelu_new"},
    ),
    "distilbert-a": ("DistilBertConfig", dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **SMALL)),
    "distilbert-b": (
        "DistilBertConfig",
        dict(
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            activation="relu",
            sinusoidal_pos_embds=True,
            **SMALL,
        ),
    ),
    "mpnet-a": ("MPNetConfig", BERTISH),
    "mpnet-b": ("MPNetConfig", {**BERTISH, "num_attention_heads": 4, "num_hidden_layers": 3}),
}
# The default run: every family's "a" (exported for the rebuild test anyway), and the "b" options no "a" has
# (GELU's tanh form and a stitched third layer; ReLU and sinusoidal positions); -m matrix all twelve.
DEFAULT_CONFIGS = {*(n for n in CONFIGS if n.endswith("-a")), "bert-b", "distilbert-b"}
LENGTHS = (23, 17, 2)  # one batch padded to 23; MPNet's buckets are exercised past distance 8


def save_checkpoint(directory, name: str, **override):
    """transformers' base model of CONFIGS[name], random weights, written as a user's checkpoint."""
    cls, kw = CONFIGS[name]
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.AutoModel.from_config(getattr(transformers, cls)(**{**kw, **override})).eval()
    model.save_pretrained(directory)
    return model


def padded_batch(model, lengths=LENGTHS, seed=0) -> dict:
    """input_ids padded with the model's pad id (as its tokenizer pads), attention_mask, token types."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, cfg.vocab_size, (len(lengths), max(lengths)))
    mask = (np.arange(max(lengths)) < np.array(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, cfg.pad_token_id)
    types = getattr(cfg, "type_vocab_size", 0) or 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if types:
        batch["token_type_ids"] = rng.integers(0, types, ids.shape) * mask
    return batch


def transformers_output(model, batch: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()


def export(checkpoint, out, *args) -> None:
    assert export_main(["--weights", str(checkpoint), "--out", str(out), *args]) == 0


def check_close(actual, expected, mask, tol: float, what: str) -> float:
    """actual vs expected on the real (non-padding) positions under tol; returns max abs error."""
    real = mask.astype(bool)
    c = compare_outputs(actual[real], expected[real], tol)
    assert c.error is None and c.passed, f"{what}: {c.error or c.metrics}"
    return c.metrics.max_abs


@pytest.fixture(scope="module")
def family_export(tmp_path_factory):
    """name -> (transformers model, pristine float32 onnx-attention artifact of its checkpoint), made once
    per module (the tests only read the artifact)."""
    made = {}

    def get(name: str):
        if name not in made:
            d = tmp_path_factory.mktemp(name)
            model = save_checkpoint(d / "ckpt", name)
            export(d / "ckpt", d / "art")
            made[name] = model, d / "art"
        return made[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in DEFAULT_CONFIGS else pytest.mark.matrix) for n in CONFIGS]
)
def test_family_matches_transformers_and_the_oracle(name, family_export):
    """ORT on the artifact and the float64 oracle on its weights both match transformers' forward pass on
    a padded batch, at the float32 tolerance doubled (transformers rounds in float32 too)."""
    model, art = family_export(name)
    artifact = load_artifact(art)
    m = artifact.manifest
    batch = padded_batch(model)
    want = transformers_output(model, batch)
    names = [i["name"] for i in m["inputs"]]
    assert set(names) == set(batch), f"the artifact takes the model's own inputs: {names}"
    feed = [batch[n] for n in names]
    k, stages = model_error_terms(m, batch["input_ids"].shape[1], artifact.weights)
    tol = 2 * tolerance("float32", k, stages)
    session = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, dict(zip(names, feed)))[0]
    check_close(got, want, batch["attention_mask"], tol, "ORT vs transformers")
    model_cfg = m["model"]
    out = oracle.forward("bert", model_cfg["config"], model_cfg["options"], artifact.weights, feed)
    check_close(out[0], want, batch["attention_mask"], tol, "oracle vs transformers")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet"])
def test_family_validates_with_the_byte_identical_rebuild(family, family_export, capsys):
    """qkv-validate, every runtime of auto: exit 0, and the graph is the exporter's own rebuild."""
    _, art = family_export(f"{family}-a")
    code, out, _, _ = run_cli(capsys, str(art))
    assert code == 0, out
    assert "graph: byte-identical to the exporter's rebuild" in out


# One (backend, dtype) cell per family in the default run, rotated so every backend and dtype is met;
# every cell under -m matrix.
BACKEND_CELLS = [
    ("roberta-a", "ort-contrib", "float16"),
    ("xlm-roberta-b", "decomposed", "float32"),
    ("electra-a", "ort-contrib", "bfloat16"),
    ("distilbert-b", "decomposed", "float16"),
    ("mpnet-a", "ort-contrib", "float32"),
    ("mpnet-b", "decomposed", "bfloat16"),
    ("roberta-b", "onnx-attention", "int8"),
]
MATRIX_CELLS = [
    pytest.param(f"{f}-a", b, d, marks=pytest.mark.matrix)
    for f in ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet")
    for b in ("onnx-attention", "ort-contrib", "decomposed")
    for d in ("float32", "float16", "bfloat16", "int8")
    if (f"{f}-a", b, d) not in BACKEND_CELLS
]


@pytest.mark.slow
@pytest.mark.parametrize("name, backend, dtype", [*BACKEND_CELLS, *MATRIX_CELLS])
def test_family_on_every_backend_and_dtype(name, backend, dtype, tmp_path, capsys):
    """Export with the backend and dtype; the graph holds the structural contract (what --no-rebuild checks:
    pad ids that the exporter's constant merging does or does not meet, an int8 graph's merged LayerNorm
    initializers and float32 Gemm); validate on ORT CPU (bfloat16, which it has no kernels for: every
    runtime of auto, OpenVINO among them): exit 0 (int8: under its accuracy contract)."""
    save_checkpoint(tmp_path / "ckpt", name)
    export(tmp_path / "ckpt", tmp_path / "art", "--backend", backend, "--dtype", dtype)
    artifact = load_artifact(tmp_path / "art")
    check_structure(onnx.load(str(tmp_path / "art" / "model.onnx")), artifact.manifest, artifact.weights)
    providers = "auto" if dtype == "bfloat16" else "cpu"
    code, out, _, doc = run_cli(
        capsys, tmp_path / "art", "--providers", providers, "--json", tmp_path / "r.json"
    )
    if code == 1 and (dtype, backend) == ("bfloat16", "onnx-attention") and not openvino_native_bf16():
        # OpenVINO without native bfloat16 outputs the average of V for a query with no key (helpers): the
        # validator fails exactly the cases with an all-padding row, on OpenVINO only
        assert {(r, c in EMPTY_ROW_CASES) for r, _, c in failing(doc)} == {("openvino", True)}, out
        pytest.xfail("OpenVINO without native bfloat16: a query with no key is not 0 (validation says so)")
    assert code == 0, out


def _refused(tmp_path, capsys, config: dict) -> str:
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, "bert-a")
    capsys.readouterr()  # transformers' own progress lines
    (ckpt / "config.json").write_text(
        json.dumps({**json.loads((ckpt / "config.json").read_text()), **config})
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    assert export_main(["--weights", str(ckpt), "--out", str(tmp_path / "art")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused export writes nothing"
    return single_error_line(capsys.readouterr().err, "qkv-export")


@pytest.mark.parametrize("model_type", ["deberta-v2", "falcon"])
def test_a_family_we_do_not_serve_is_refused(model_type, tmp_path, capsys):
    line = _refused(tmp_path, capsys, {"model_type": model_type})
    assert f"model_type '{model_type}' is not supported" in line and "roberta" in line and "llama" in line


def test_an_encoder_checkpoint_labelled_a_decoder_is_refused(tmp_path, capsys):
    line = _refused(tmp_path, capsys, {"model_type": "gpt2"})
    assert "config.json" in line


@pytest.mark.parametrize(
    "change, named",
    [
        ({"model_type": "roberta", "position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"model_type": "mpnet", "relative_attention_num_buckets": 64}, "relative_attention_num_buckets 64"),
        ({"model_type": "distilbert", "activation": "silu"}, "activation 'silu'"),
        ({"model_type": "electra", "hidden_act": "swish"}, "hidden_act 'swish'"),
        ({"model_type": "roberta", "is_decoder": True}, "is_decoder True"),
        ({"model_type": ["bert"]}, "model_type ['bert'] is not supported"),  # a hostile config.json
    ],
)
def test_an_option_we_do_not_compute_is_refused_by_name(change, named, tmp_path, capsys):
    assert named in _refused(tmp_path, capsys, change)


def bpe_tokenizer(path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json as RoBERTa checkpoints ship one (<s>=0, <pad>=1, </s>=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from qkv_onnx.text import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus("search"), trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.save(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["roberta-a", "mpnet-a"])
def test_text_through_a_bpe_tokenizer(name, tmp_path, capsys):
    """--text with the byte-level BPE tokenizer.json the checkpoint ships: padded with its pad id (1), no
    token types where the family has none; the sentences' outputs pass every check."""
    save_checkpoint(tmp_path / "ckpt", name, vocab_size=400)
    bpe_tokenizer(tmp_path / "ckpt" / "tokenizer.json", 400)
    export(tmp_path / "ckpt", tmp_path / "art")
    sentences = ["Byte-level pairs, merged.", "A second, much longer sentence pads the first one out."]
    code, out, _, doc = run_cli(
        capsys,
        tmp_path / "art",
        "--providers",
        "cpu",
        *(a for t in sentences for a in ("--text", t)),
        "--json",
        tmp_path / "r.json",
    )
    assert code == 0, out
    text = [c for c in doc["artifacts"][0]["checks"] if c["case"].startswith("text_2x")]
    assert text and all(c["passed"] for c in text), text
