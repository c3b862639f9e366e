"""The graph contract (what the exporter writes, checked without torch) against real exports, and the
reproducibility the rebuild relies on: the same bytes from any checkout."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ROOT, SMALL_MODELS, rotation, tree_bytes, weights_of

from qkv_onnx.artifact_format import BACKENDS, DTYPES, FAMILY_DEFAULTS, model_io
from qkv_onnx.graph_contract import (
    EXPORTER,
    ROWS,
    ContractError,
    check_structure,
    expected_ops,
    features,
    layers,
    quantized_ops,
    row_key,
)
from qkv_onnx.validate.artifact import load_artifact
from qkv_onnx.versions import exporter_versions


def test_table_was_derived_with_the_installed_exporter():
    """The table is what this exporter writes; another torch/onnxscript may write other graphs: rerun
    `python -m qkv_onnx.export.derive_graph_table` after upgrading them (the tests below would say where)."""
    assert EXPORTER == exporter_versions()


def test_every_variant_has_rows_for_every_backend_dtype_and_opset():
    variants = {(k[0], k[1]) for k in ROWS}
    assert {a for a, _ in variants} == {"attention", "encoder-block", "bert", "decoder"}
    for arch, feats in variants:
        for name, backend in BACKENDS.items():
            written = backend.for_architecture(arch)
            for dtype in DTYPES:
                for opset in {written.default_opset, written.min_opset}:
                    assert (arch, feats, name, dtype, opset) in ROWS


@pytest.mark.parametrize(
    ("model", "dtype", "backend"), rotation(["gpt2-tiny", "llama-tiny"], ["float32", "int8"], list(BACKENDS))
)
def test_decoder_exports_meet_the_contract(model, dtype, backend, exported):
    """The decoder presets (two layers; the table was derived at one and two) on every backend, float32 and
    int8: the graph is what the table says, RoPE's inverse frequencies those of the config."""
    artifact = load_artifact(exported(model, dtype, backend), rebuild=False)
    check_structure(onnx.load(str(artifact.model_path)), artifact.manifest, artifact.weights)
    artifact.close()


def test_decoder_contract_refuses_other_rope_frequencies(exported):
    """The inverse frequencies are checked byte for byte against the config's theta: another theta (a model
    whose positions rotate differently from what the manifest says) is refused."""
    artifact = load_artifact(exported("llama-tiny"), rebuild=False)
    graph = onnx.load(str(artifact.model_path))
    check_structure(graph, artifact.manifest, artifact.weights)
    d = (
        artifact.manifest["model"]["config"]["hidden_size"]
        // artifact.manifest["model"]["config"]["num_heads"]
    )
    [target] = [t for t in graph.graph.initializer if onnx.numpy_helper.to_array(t).shape == (d // 2,)]
    other = (1.0 / 500000.0 ** (np.arange(0, d, 2) / d)).astype(np.float32)
    target.CopyFrom(onnx.numpy_helper.from_array(other, target.name))
    # refused as no parameter (head_dim > 32) or, here (16 elements), as one small constant too many
    with pytest.raises(ContractError, match="initializer"):
        check_structure(graph, artifact.manifest, artifact.weights)
    artifact.close()


@pytest.mark.parametrize(
    ("model", "dtype", "backend"), rotation(["bert-mini", *SMALL_MODELS], DTYPES, list(BACKENDS))
)
def test_real_exports_meet_the_contract(model, dtype, backend, exported):
    """Every registry model (bert-mini: four layers, where the table was derived at one and two) in every
    backend and dtype: the exporter's graph is what the table says, and its IO what model_io says."""
    if model == "bert-mini" and dtype != "float32":
        pytest.skip("bert-mini checks the per-layer counts; the dtypes are covered by bert-tiny")
    artifact = load_artifact(exported(model, dtype, backend), rebuild=False)
    m = artifact.manifest
    inputs, outputs = model_io(m["model"]["architecture"], m["model"]["config"], m["model"]["options"], dtype)
    assert (m["inputs"], m["outputs"]) == (inputs, outputs)
    graph = onnx.load(str(artifact.model_path))
    check_structure(graph, m, artifact.weights)
    assert m["op_counts"] == expected_ops(ROWS[row_key(m)], layers(m))
    artifact.close()


@pytest.mark.parametrize(
    ("model", "backend"), rotation(["encoder-block", "encoder-block-prenorm", "bert-tiny"], list(BACKENDS))
)
def test_int8_exports_meet_their_float32_row_quantized(model, backend, exported):
    """An int8 graph: its float32 row with each quantized product rewritten as quantize_dynamic does, and
    every int8 weight its parameter quantized (checked in check_structure)."""
    artifact = load_artifact(exported(model, "int8", backend), rebuild=False)
    m = artifact.manifest
    graph = onnx.load(str(artifact.model_path))
    check_structure(graph, m, artifact.weights)
    float_row = ROWS[(*row_key(m)[:3], "float32", row_key(m)[4])]
    assert m["op_counts"] == quantized_ops(expected_ops(float_row, layers(m)), m["op_counts"], 0)
    assert m["op_counts"]["MatMulInteger"] == m["quantization"]["quantized_products"] > 0
    artifact.close()


def test_int8_contract_refuses_a_changed_weight_or_an_extra_op(exported):
    artifact = load_artifact(exported("bert-tiny", "int8"), rebuild=False)
    m, weights = artifact.manifest, artifact.weights
    graph = onnx.load(str(artifact.model_path))
    target = next(t for t in graph.graph.initializer if t.name.endswith("_quantized"))
    q = onnx.numpy_helper.to_array(target).copy()
    q[0, 0] = -q[0, 0] if q[0, 0] else 5  # one element one step off: a different function
    target.CopyFrom(onnx.numpy_helper.from_array(q, target.name))
    with pytest.raises(ContractError, match="is none of weights.npz's parameters, quantized"):
        check_structure(graph, m, weights)
    graph = onnx.load(str(artifact.model_path))
    out = graph.graph.output[0].name
    graph.graph.node[-1].output[0] = "pre"
    one = onnx.numpy_helper.from_array(np.ones(1, np.float32), "one")
    graph.graph.initializer.append(one)
    graph.graph.node.append(onnx.helper.make_node("Mul", ["pre", "one"], [out]))
    with pytest.raises(ContractError, match=r"op counts .*Mul"):
        check_structure(graph, m, weights)
    artifact.close()


def test_one_small_constant_more_than_the_table_is_refused_and_merged_parameters_are_not(exported):
    """The table's constant count is an upper bound (the exporter merges equal ones): one more is refused. A
    parameter missing from the graph passes only where an initializer of its shape and bytes stands in."""
    artifact = load_artifact(exported("bert-tiny"), rebuild=False)
    m, weights = artifact.manifest, artifact.weights
    graph = onnx.load(str(artifact.model_path))
    check_structure(graph, m, weights)
    graph.graph.initializer.append(onnx.numpy_helper.from_array(np.int64(3), "extra"))
    with pytest.raises(ContractError, match="small constant initializers; the exporter writes at most"):
        check_structure(graph, m, weights)
    graph = onnx.load(str(artifact.model_path))
    twin = "blocks.1.attn_norm.weight"
    same = {**weights, "blocks.0.attn_norm.weight": weights[twin]}  # the graph's own copy differs
    with pytest.raises(ContractError, match="is not weights.npz's blocks.0.attn_norm.weight"):
        check_structure(graph, m, same)
    merged = onnx.load(str(artifact.model_path))
    kept = next(t for t in merged.graph.initializer if t.name == twin)
    for t in list(merged.graph.initializer):
        if t.name == "blocks.0.attn_norm.weight":
            merged.graph.initializer.remove(t)
    for node in merged.graph.node:
        node.input[:] = [twin if i == "blocks.0.attn_norm.weight" else i for i in node.input]
    check_structure(merged, m, {**weights, "blocks.0.attn_norm.weight": onnx.numpy_helper.to_array(kept)})
    with pytest.raises(ContractError, match="blocks.0.attn_norm.weight is not in the graph"):
        check_structure(merged, m, weights)
    artifact.close()


def test_contract_names_what_differs(exported):
    artifact = load_artifact(exported("mha"), rebuild=False)
    graph = onnx.load(str(artifact.model_path))
    graph.graph.node.append(onnx.helper.make_node("Relu", [graph.graph.output[0].name], ["r"]))
    with pytest.raises(ContractError, match=r"op counts .*Relu 1 \(expected 0\)"):
        check_structure(graph, artifact.manifest, artifact.weights)
    graph = onnx.load(str(artifact.model_path))
    weights = {**artifact.weights, "attn.q_proj.bias": artifact.weights["attn.q_proj.bias"] + 1}
    with pytest.raises(ContractError, match="initializer 'attn.q_proj.bias' is not weights.npz's"):
        check_structure(graph, artifact.manifest, weights)
    artifact.close()


def test_features_key_the_variants():
    cfg = {
        **FAMILY_DEFAULTS,
        **{"num_heads": 8, "num_kv_heads": 2, "pre_layer_norm": True, "with_pooler": False},
        "type_vocab_size": 2,
    }
    assert features(
        {"architecture": "attention", "config": cfg, "options": {"causal": True, "cross": False}}
    ) == (
        "causal",
        "gqa",
    )
    assert features({"architecture": "bert", "config": cfg, "options": {}}) == ("gqa", "no-pooler", "pre-ln")
    assert features(
        {"architecture": "encoder-block", "config": {**cfg, "num_kv_heads": None}, "options": {}}
    ) == ("pre-ln",)
    mpnet = {**cfg, "num_kv_heads": None, "positions": "from-ids", "type_vocab_size": 0}
    mpnet.update(relative_attention_buckets=32, pre_layer_norm=False, with_pooler=True)
    assert features({"architecture": "bert", "config": mpnet, "options": {}}) == (
        "ids-positions",
        "no-token-types",
        "relative-bias",
    )
    electra = {**cfg, "num_kv_heads": None, "embedding_size": 16, "hidden_act": "gelu_tanh"}
    assert features({"architecture": "bert", "config": electra, "options": {}}) == (
        "gelu_tanh",
        "no-pooler",
        "pre-ln",
        "projection",
    )


def _checkout_copy(target: Path) -> Path:
    """The repository's tracked and untracked (not ignored) files, copied to `target`."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, target / rel)
    return target


@pytest.mark.slow
def test_exports_from_two_checkouts_at_different_paths_are_byte_identical(tmp_path):
    """Two copies of the repository at different paths, each imported from its own source tree
    (PYTHONPATH): the same artifact bytes, and no path of either checkout (or of site-packages) in it. The
    exporter writes a stack trace per node, with absolute paths; the export drops them."""
    outs = []
    for name in ("a", "a-much-longer-checkout-directory-name"):
        copy = _checkout_copy(tmp_path / name / "qkv-onnx")
        out = tmp_path / f"out-{name}"
        code = (
            "import sys, qkv_onnx.model_defs.encoder as e; "
            "assert e.__file__.startswith(sys.argv[1]), e.__file__; "
            "from qkv_onnx.export.cli import main; sys.exit(main(sys.argv[2:]))"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(copy), "--model", "bert-tiny", "--out", str(out)],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(copy)},
            check=True,
            capture_output=True,
        )
        outs.append(out)
    assert tree_bytes(outs[0]) == tree_bytes(outs[1])
    data = (outs[0] / "model.onnx").read_bytes()
    for leak in (str(tmp_path), str(ROOT), "site-packages", 'File "'):
        assert leak.encode() not in data, leak
    assert weights_of(outs[0])["pooler.bias"].shape == (128,)
