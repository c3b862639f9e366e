"""One copy of the weights (issue 36): a float artifact's parameters are its graph's initializers, placed by
the manifest's `weights.in_graph`; a map that lies is refused, or the graph it describes is not the export
of the weights it claims."""

import json

import numpy as np
import pytest
from helpers import edit_manifest, run_cli, single_error_line, snapshot, weights_of

from qkv_onnx.errors import show
from qkv_onnx.graph_weights import artifact_weights
from qkv_onnx.model_defs.numpy_io import weights_to_numpy
from qkv_onnx.model_defs.registry import get_model


def test_a_float_artifact_holds_its_weights_once(exported_external):
    """No weights.npz: the parameters are read-only views on model.onnx.data (memory-mapped, not copied),
    exactly the exporter's seeded weights, and the graph's files hold little more than their bytes."""
    d = exported_external
    manifest = json.loads((d / "manifest.json").read_text())
    assert "weights.npz" not in manifest["files"] and not (d / "weights.npz").exists()
    weights = artifact_weights(d, d, manifest)
    want = weights_to_numpy(get_model("mha").random(0).state_dict())
    assert list(weights) == list(want)
    for name, w in weights.items():
        assert np.array_equal(w, want[name]), name
        assert not w.flags.writeable and not w.flags.owndata, name
    params = sum(w.nbytes for w in want.values())
    on_disk = sum(manifest["files"][f]["bytes"] for f in ("model.onnx", "model.onnx.data"))
    assert params <= on_disk < params + 64 << 10  # the graph around them: kilobytes


def _places(d):
    return json.loads((d / "manifest.json").read_text())["weights"]["in_graph"]


def _set(name, place):
    return lambda m: m["weights"]["in_graph"].__setitem__(name, place)


# name: (edit of the manifest given the artifact's places, the file the error names, words of the reason)
LIES = {
    "an initializer the graph lacks": (
        lambda p: _set("attn.q_proj.weight", ["as is", "nowhere"]),
        "manifest.json",
        "which the graph does not have",
    ),
    "a bias placed transposed": (
        lambda p: _set("attn.q_proj.bias", ["transposed", p["attn.q_proj.bias"][1]]),
        "model.onnx",
        "holds no attn.q_proj.bias",
    ),
    "rows past the end of a tensor": (
        lambda p: _set("attn.k_proj.bias", ["packed", p["attn.k_proj.bias"][1], 0, 10**6]),
        "model.onnx",
        "holds no attn.k_proj.bias",
    ),
    "a place of an unknown kind": (
        lambda p: _set("attn.k_proj.bias", ["mirrored", p["attn.k_proj.bias"][1]]),
        "manifest.json",
        "has the place",
    ),
    "a place that is not a list": (
        lambda p: _set("attn.k_proj.bias", "attn.k_proj.bias"),
        "manifest.json",
        "",
    ),
    "the same as a parameter placed by another": (
        lambda p: (
            lambda m: m["weights"]["in_graph"].update(
                {
                    "attn.q_proj.bias": ["same as", "attn.k_proj.bias"],
                    "attn.k_proj.bias": ["same as", "attn.v_proj.bias"],
                }
            )
        ),
        "manifest.json",
        "itself placed elsewhere",
    ),
    "a parameter left out": (
        lambda p: lambda m: m["weights"]["in_graph"].pop("attn.v_proj.weight"),
        "manifest.json",
        "exactly the 8 parameters",
    ),
    "a weight said to be dropped zeros": (
        lambda p: _set("attn.out_proj.weight", ["zeros"]),
        "model.onnx",
        "attn.out_proj.weight has an all-zero row",
    ),
}


@pytest.mark.parametrize("lie", LIES)
def test_a_map_that_does_not_fit_the_graph_is_refused(lie, artifact_copy, capsys):
    """Re-signed, so only the map is wrong: exit 2, one line naming the file, nothing changed."""
    edit, rel, reason = LIES[lie]
    d = artifact_copy("mha")
    edit_manifest(d, edit(_places(d)))
    before = snapshot(d)
    code, _, err, _ = run_cli(capsys, d, "--no-torch", "--providers", "cpu")
    line = single_error_line(err)
    assert code == 2 and f"{d / rel}" in line and reason in line, line
    assert snapshot(d) == before


@pytest.mark.parametrize("mode", [(), ("--no-torch",)], ids=["rebuild", "structural"])
def test_q_and_k_swapped_in_the_map(mode, artifact_copy, capsys, tmp_path):
    """Each placed where the other is: every shape fits and every initializer is still one parameter, but
    the weights the map claims are not those the graph computes with. The rebuild writes other bytes for
    them (exit 2); the structural contract, which matches initializers by their bytes, cannot tell which
    parameter is which, so parity does: the oracle of the claimed weights disagrees with every runtime
    (exit 1)."""
    d = artifact_copy("mha")
    p = _places(d)
    q, k = p["attn.q_proj.weight"], p["attn.k_proj.weight"]
    edit_manifest(
        d, lambda m: m["weights"]["in_graph"].update({"attn.q_proj.weight": k, "attn.k_proj.weight": q})
    )
    code, out, err, doc = run_cli(capsys, d, *mode, "--providers", "cpu", "--json", tmp_path / "r.json")
    if mode:
        assert code == 1 and err == "" and doc["artifacts"][0]["passed"] is False
    else:
        line = single_error_line(err)
        assert code == 2 and f"{show(d / 'model.onnx')}: not the graph the exporter writes" in line, line


def test_the_weights_read_back_are_the_module_the_graph_was_exported_from(exported):
    """Each kind of place the exporter writes reads back to the module's own parameters: as is, transposed
    (a Linear weight in MatMul's layout) and ORT's packed q/k/v (ort-contrib). Merged and dropped
    tensors: below."""
    for backend, kinds in (
        ("ort-contrib", {"as is", "transposed", "packed"}),
        ("onnx-attention", {"as is", "transposed"}),
    ):
        d = exported("bert-tiny", backend=backend)
        assert {p[0] for p in _places(d).values()} == kinds
        got = weights_of(d)
        want = weights_to_numpy(get_model("bert-tiny").random(0).state_dict())
        assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_a_zero_bias_the_exporter_dropped_reads_back_as_zeros(exported_minilm):
    """all-MiniLM-L6-v2's untrained pooler bias is all zero: the exporter drops it, the map says so, and the
    parameter reads back as the checkpoint's zeros (the artifact's validation: the checkpoint tests)."""
    assert _places(exported_minilm)["pooler.bias"] == ["zeros"]
    bias = weights_of(exported_minilm)["pooler.bias"]
    assert bias.shape == (384,) and not bias.any()


def test_merged_equal_norms_read_back_and_validate(tmp_path, capsys):
    """A fresh transformers checkpoint's RMSNorm weights are all ones: the exporter merges them into one
    initializer, the map places the others "same as" it, and the artifact validates, rebuilt byte for byte
    and under the structural contract alike."""
    import torch
    import transformers as t

    from qkv_onnx.export.pipeline import export_artifact

    torch.manual_seed(0)
    config = t.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    t.LlamaForCausalLM(config).save_pretrained(tmp_path / "ck")
    export_artifact("fresh-llama", tmp_path / "art", weights_dir=tmp_path / "ck")
    capsys.readouterr()  # what saving the checkpoint printed
    merged = {k: v for k, v in _places(tmp_path / "art").items() if v[0] == "same as"}
    assert set(merged) == {
        "blocks.0.ffn_norm.weight",
        "blocks.1.attn_norm.weight",
        "blocks.1.ffn_norm.weight",
        "final_norm.weight",
    }
    weights = weights_of(tmp_path / "art")
    assert all((weights[k] == 1).all() for k in merged)
    for mode in ((), ("--no-torch",)):
        code, out, err, _ = run_cli(capsys, tmp_path / "art", *mode, "--providers", "cpu")
        assert code == 0 and err == "", err
