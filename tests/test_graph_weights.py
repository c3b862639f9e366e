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
    (a Linear weight in MatMul's layout) and ORT's packed q/k/v (ort-contrib). Merged and dropped tensors:
    the decoder families' checkpoints (fresh norms are equal) in test_decoder_families."""
    for backend, kinds in (
        ("ort-contrib", {"as is", "transposed", "packed"}),
        ("onnx-attention", {"as is", "transposed"}),
    ):
        d = exported("bert-tiny", backend=backend)
        assert {p[0] for p in _places(d).values()} == kinds
        got = weights_of(d)
        want = weights_to_numpy(get_model("bert-tiny").random(0).state_dict())
        assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)
