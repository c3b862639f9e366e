"""Decoder artifacts onnxruntime-genai runs as exported (issue 37): genai_config.json beside the graph,
derived from the manifest and refused when it is anything else; genai's greedy tokens are transformers'.
genai lives in its own environment (scripts/setup_genai.sh: .venv-genai, or QKV_GENAI_PYTHON)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, edit_manifest, rewrite, run_cli, save_hf_decoder, single_error_line

from qkv_onnx.errors import show
from qkv_onnx.export.pipeline import export_artifact
from qkv_onnx.genai import GENAI_CONFIG

CONFIG = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
PROMPTS = [[5, 17, 42, 7], [250, 3, 99, 11, 64, 2, 180]]
LENGTH = 40
SENTENCE = "the lazy fox jumps over the quick dog"
GENAI_PYTHON = os.environ.get("QKV_GENAI_PYTHON") or str(ROOT / ".venv-genai" / "bin" / "python")


def _tokenizer():
    """A byte-level BPE of 291 tokens (below the model's 300), trained here: what a checkpoint ships."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=291, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=alphabet
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _greedy(hf, prompt: list, eos: list | None) -> list:
    import torch

    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_length=LENGTH, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
    return out[0].tolist()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(transformers model, its checkpoint, the artifact exported from it, its eos ids): greedy margins far
    above float32's rounding (save_hf_decoder's confident head). The eos id, set in generation_config.json,
    is a token the first prompt's greedy continuation reaches for the first time past its 8th step, so
    generation stops on it before LENGTH: the eos rule is exercised, not only written down."""
    work = tmp_path_factory.mktemp("genai")
    hf = save_hf_decoder(work / "ck", CONFIG, "llama", confident=True)
    _tokenizer().save_pretrained(work / "ck")
    prompt = PROMPTS[0]
    free = _greedy(hf, prompt, None)[len(prompt) :]
    stop = next(t for i, t in enumerate(free) if i >= 8 and t not in prompt + free[:i])
    eos = [stop]
    (work / "ck" / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": 1}))
    export_artifact("tiny-llama", work / "art", weights_dir=work / "ck")
    return hf, work / "ck", work / "art", eos


def test_the_genai_config_is_the_manifests(llama):
    """Listed and hashed, sized as the graph is (heads, layers, the cache's names and head size), with the
    checkpoint's special tokens (generation_config.json over config.json, as transformers reads them)."""
    art = llama[2]
    manifest = json.loads((art / "manifest.json").read_text())
    assert GENAI_CONFIG in manifest["files"]
    eos = llama[3]
    assert manifest["special_tokens"] == {"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": 0}
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(manifest["files"])  # beside the config
    model = json.loads((art / GENAI_CONFIG).read_text())["model"]
    decoder = model["decoder"]
    assert (model["eos_token_id"], model["context_length"], model["vocab_size"]) == (eos, 128, 300)
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (
        2,
        4,
        2,
    )
    assert decoder["head_size"] == 16 and decoder["filename"] == "model.onnx"
    names = {v["name"] for v in manifest["inputs"]} | {v["name"] for v in manifest["outputs"]}
    for key in ("past_key_names", "past_value_names"):
        assert decoder["inputs"][key] % 1 in names
    for key in ("present_key_names", "present_value_names"):
        assert decoder["outputs"][key] % 1 in names


TAMPERS = {
    "another model file": lambda c: c["model"]["decoder"].__setitem__("filename", "../other.onnx"),
    "another cache name": lambda c: c["model"]["decoder"]["inputs"].__setitem__("past_key_names", "k.%d"),
    "one layer fewer": lambda c: c["model"]["decoder"].__setitem__("num_hidden_layers", 1),
}


@pytest.mark.parametrize("tamper", TAMPERS)
def test_a_genai_config_that_is_not_the_exporters_is_refused(tamper, llama, tmp_path, capsys):
    """Re-hashed and re-signed, so only its content gives it away: exit 2, one line naming it."""
    import shutil

    d = tmp_path / "art"
    shutil.copytree(llama[2], d)
    config = json.loads((d / GENAI_CONFIG).read_text())
    TAMPERS[tamper](config)
    rewrite(d, GENAI_CONFIG, json.dumps(config, indent=4).encode() + b"\n")
    code, _, err, _ = run_cli(capsys, d, "--no-torch", "--providers", "cpu")
    line = single_error_line(err)
    assert code == 2 and f"{show(d / GENAI_CONFIG)}: not the genai_config.json the exporter writes" in line


def test_the_report_says_the_genai_config_was_checked(llama, capsys):
    code, out, _, _ = run_cli(capsys, llama[2], "--no-torch", "--providers", "cpu")
    assert code == 0 and "genai_config.json: the exporter's for this manifest" in out


def test_special_tokens_outside_the_vocabulary_are_refused(llama, tmp_path, capsys):
    import shutil

    d = tmp_path / "art"
    shutil.copytree(llama[2], d)
    edit_manifest(d, lambda m: m["special_tokens"].__setitem__("eos_token_id", [300]))
    code, _, err, _ = run_cli(capsys, d, "--no-torch", "--providers", "cpu")
    assert code == 2 and "token ids below the vocabulary's 300" in single_error_line(err)


GREEDY = """
import json, sys
import numpy as np, onnxruntime_genai as og
model = og.Model(sys.argv[1])
out = []
for prompt in json.loads(sys.argv[2]):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=int(sys.argv[3]), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    out.append([int(t) for t in generator.get_sequence(0)])
tokenizer = og.Tokenizer(model)
ids = [int(t) for t in tokenizer.encode(sys.argv[4])]
print(json.dumps({"greedy": out, "ids": ids, "text": tokenizer.decode(ids)}))
"""


@pytest.mark.skipif(
    not Path(GENAI_PYTHON).is_file(), reason="no onnxruntime-genai environment (setup_genai.sh)"
)
def test_genai_runs_the_artifact_as_exported_with_transformers_greedy_tokens(llama):
    """onnxruntime_genai.Model(artifact_dir), nothing edited: the greedy tokens of each prompt are those of
    transformers' generate on the checkpoint, the first stopped early by the checkpoint's eos id (which
    genai's sequence does not include, transformers' does), and
    genai's Tokenizer reads the checkpoint's tokenizer beside the config as transformers does."""
    hf, _, art, eos = llama
    proc = subprocess.run(
        [GENAI_PYTHON, "-c", GREEDY, str(art), json.dumps(PROMPTS), str(LENGTH), SENTENCE],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    from transformers import AutoTokenizer

    want_ids = AutoTokenizer.from_pretrained(art).encode(SENTENCE, add_special_tokens=False)
    assert (got["ids"], got["text"]) == (want_ids, SENTENCE)  # the checkpoint's tokenizer, as transformers'
    wants = [_greedy(hf, prompt, eos) for prompt in PROMPTS]
    assert wants[0][-1] in eos and len(wants[0]) < LENGTH  # the first prompt stops on the eos id
    for prompt, tokens, want in zip(PROMPTS, got["greedy"], wants):
        # transformers keeps the eos token it stopped on, genai's sequence leaves it out
        assert tokens == (want[:-1] if want[-1] in eos else want), prompt


def test_only_a_decoder_carries_files_beside_its_graph(artifact_copy, capsys):
    """An encoder artifact listing a tokenizer.json at its root (re-hashed, re-signed): not what an export
    writes, exit 2 naming the manifest."""
    d = artifact_copy("mha")
    rewrite(d, "tokenizer.json", b"{}")
    code, _, err, _ = run_cli(capsys, d, "--no-torch", "--providers", "cpu")
    line = single_error_line(err)
    assert (
        code == 2 and "tokenizer.json is listed, but only a decoder carries one beside its graph" in line
    ), line
