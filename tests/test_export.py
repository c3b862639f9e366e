"""Export: fused-op counts, the fusion check, manifest and golden layout, reproducibility, atomic writes."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, SMALL_MODELS, rotation, tree_bytes, weights_of
from onnx import numpy_helper

from qkv_onnx.artifact_format import BACKENDS
from qkv_onnx.export.backends import export_onnx
from qkv_onnx.export.cli import main as export_main
from qkv_onnx.export.fusion import FusionError, check_fusion, count_ops
from qkv_onnx.export.pipeline import export_artifact
from qkv_onnx.model_defs.registry import MODELS, example_inputs, get_model


def test_bert_tiny_has_two_attention_nodes_and_no_softmax(exported):
    d = exported("bert-tiny")
    counts = count_ops(onnx.load(str(d / "model.onnx")))
    assert counts["Attention"] == 2
    assert "Softmax" not in counts
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["op_counts"]["Attention"] == 2 and manifest["fused_attention_ops"] == 2
    assert manifest["opset"]["ai.onnx"] >= 23


def test_manifest_hashes_match_every_file(exported):
    d = exported("bert-tiny")
    manifest = json.loads((d / "manifest.json").read_text())
    on_disk = {k for k in tree_bytes(d) if k != "manifest.json"}
    assert set(manifest["files"]) == on_disk
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((d / rel).read_bytes()).hexdigest() == entry["sha256"]
        assert (d / rel).stat().st_size == entry["bytes"]


def test_manifest_describes_model(exported):
    m = json.loads((exported("bert-tiny") / "manifest.json").read_text())
    assert m["model"]["parameters"] == m["model"]["parameters_closed_form"] == 4_385_920
    assert [i["name"] for i in m["inputs"]] == ["input_ids", "token_type_ids", "attention_mask"]
    assert all(i["shape"] == ["batch", "seq"] for i in m["inputs"])
    assert m["outputs"][0]["shape"] == ["batch", "seq", 128] and m["outputs"][1]["shape"] == ["batch", 128]
    assert {"torch", "onnx", "onnxscript", "numpy"} <= set(m["versions"])
    assert m["seed"] == 0 and m["backend"] == "onnx-attention" and m["dtype"] == "float32"
    assert m["reproduce"].startswith("qkv-export --model bert-tiny")


def test_golden_data_is_pytorch_output_in_onnx_layout(exported):
    """test_data_set_N/{input,output}_K.pb hold the graph's names, and the outputs are the module's."""
    d = exported("bert-tiny")
    m = json.loads((d / "manifest.json").read_text())
    spec = get_model("bert-tiny")
    weights = weights_of(d)
    module = spec.build()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    module.eval()
    for n in range(m["golden_sets"]):
        ins = [onnx.load_tensor(str(d / f"test_data_set_{n}" / f"input_{k}.pb")) for k in range(3)]
        outs = [onnx.load_tensor(str(d / f"test_data_set_{n}" / f"output_{k}.pb")) for k in range(2)]
        assert [t.name for t in ins] == ["input_ids", "token_type_ids", "attention_mask"]
        assert [t.name for t in outs] == ["last_hidden_state", "pooler_output"]
        with torch.no_grad():
            expected = module(*(torch.from_numpy(numpy_helper.to_array(t).copy()) for t in ins))
        for t, e in zip(outs, expected):
            np.testing.assert_array_equal(numpy_helper.to_array(t), e.numpy())
    masks = [
        numpy_helper.to_array(onnx.load_tensor(str(d / f"test_data_set_{n}" / "input_2.pb")))
        for n in range(3)
    ]
    assert any((row == 0).all() for mask in masks for row in mask), (
        "a golden set must hold an all-padding row"
    )


@pytest.mark.parametrize(("model", "dtype"), rotation(SMALL_MODELS, ["float32", "float16"]))
def test_every_mask_form_runs_on_ort_cpu(exported, model, dtype):
    """Each model's padding mask (padded rows, an all-padding row, seq 1, unpadded) runs on ORT CPU,
    finite."""
    d = exported(model, dtype)
    m = json.loads((d / "manifest.json").read_text())
    assert count_ops(onnx.load(str(d / "model.onnx")))["Attention"] == m["model"]["attention_modules"] >= 1
    session = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    spec = MODELS[model]
    for batch, seq, lengths in [(3, 9, [9, 5, 0]), (1, 1, [1]), (2, 1, [0, 1]), (2, 33, [33, 33])]:
        feeds = example_inputs(spec, batch, seq, lengths, seed=7, dtype=dtype, kv_seq=seq + 2)
        outs = session.run(None, {k: v.numpy() for k, v in feeds.items()})
        assert outs[0].shape[:2] == (batch, seq)
        assert all(np.isfinite(o).all() for o in outs)


class HandWrittenAttention(torch.nn.Module):
    """softmax(QKᵀ/√d)V written out: the exporter never fuses this."""

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


class SdpaAttention(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def _export_qkv(module, path, opset):
    q = torch.randn(2, 2, 5, 8)
    return export_onnx(module, (q, q, q), ["q", "k", "v"], ["y"], None, "onnx-attention", opset)


@pytest.mark.slow
def test_fusion_check_rejects_hand_written_attention(tmp_path):
    with pytest.raises(FusionError, match="0 Attention nodes for 1 attention modules.*Softmax"):
        check_fusion(_export_qkv(HandWrittenAttention(), tmp_path / "m.onnx", 23), "onnx-attention", 1)


@pytest.mark.slow
def test_fusion_check_rejects_sdpa_decomposed_below_opset_23(tmp_path):
    """Below opset 23 the exporter decomposes SDPA into MatMul/Softmax: export must refuse it."""
    path = tmp_path / "m.onnx"
    q = torch.randn(2, 2, 5, 8)
    prog = torch.onnx.export(SdpaAttention(), (q, q, q), dynamo=True, opset_version=18)
    prog.save(str(path))
    with pytest.raises(FusionError, match="activation x activation MatMul"):
        check_fusion(onnx.load(str(path)), "onnx-attention", 1)
    assert (
        check_fusion(_export_qkv(SdpaAttention(), tmp_path / "f.onnx", 23), "onnx-attention", 1)["Attention"]
        == 1
    )


def test_fusion_check_counts_attention_modules(exported):
    model = onnx.load(str(exported("bert-tiny") / "model.onnx"))
    with pytest.raises(FusionError, match="2 Attention nodes for 3 attention modules"):
        check_fusion(model, "onnx-attention", 3)


def test_export_is_byte_identical_across_processes_and_names(exported, tmp_path):
    """Same model, weights and options: same bytes, from another process and hash seed, under another name,
    for every backend (ort-contrib included: onnxscript's rewriter runs after the exporter). One process
    writes all three (--backend all), each from its own export."""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    command = [sys.executable, "-m", "qkv_onnx.export", "--model", "bert-tiny", "--backend", "all"]
    subprocess.run([*command, "--out", str(tmp_path)], cwd=ROOT, env=env, check=True, capture_output=True)
    for backend in BACKENDS:
        other = tmp_path / f"bert-tiny-{backend}-float32"
        assert tree_bytes(exported("bert-tiny", backend=backend)) == tree_bytes(other), backend


@pytest.mark.slow
def test_seed_changes_weights(exported, tmp_path):
    export_artifact("mha", tmp_path / "s1", seed=1)
    a = weights_of(exported("mha"))["attn.q_proj.weight"]
    b = weights_of(tmp_path / "s1")["attn.q_proj.weight"]
    assert not np.allclose(a, b)


@pytest.mark.slow
def test_reexport_replaces_artifact_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "art"
    export_artifact("mha", out, seed=1)
    export_artifact("mha", out, seed=2)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


@pytest.mark.slow
def test_failed_export_keeps_existing_artifact(tmp_path, monkeypatch):
    """An export that fails after writing model.onnx leaves the old artifact byte-identical and no temp
    dir."""
    out = tmp_path / "art"
    export_artifact("mha", out, seed=1)
    before = tree_bytes(out)

    def refuse(*args, **kwargs):
        raise FusionError("forced for the test")

    monkeypatch.setattr("qkv_onnx.export.graph.check_fusion", refuse)
    with pytest.raises(FusionError):
        export_artifact("mha", out, seed=2)
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


@pytest.mark.slow
def test_sigkill_during_export_leaves_old_artifact_intact(tmp_path):
    """Killing a real export process at several moments never leaves a partial or damaged artifact."""
    out = tmp_path / "art"
    export_artifact("bert-tiny", out, seed=1)
    before = tree_bytes(out)
    for delay in (0.5, 1.5, 2.5, 3.5):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qkv_onnx.export",
                "--model",
                "bert-tiny",
                "--seed",
                "1",
                "--out",
                str(out),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert tree_bytes(out) == before  # same seed: a finished export is byte-identical too
    export_artifact("bert-tiny", out, seed=1)
    assert [p.name for p in tmp_path.iterdir()] == ["art"], (
        "stale temporaries of killed exports are cleaned up"
    )


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert export_main(["--model", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert export_main(["--model", "mha", "--opset", "22", "--out", str(tmp_path / "x")]) == 2
    assert "needs opset >= 23, got 22" in capsys.readouterr().err
    assert export_main(["--model", "mha", "--dtype", "float8", "--out", str(tmp_path / "x")]) == 2
    not_artifact = tmp_path / "precious"
    not_artifact.mkdir()
    (not_artifact / "notes.txt").write_text("keep me")
    assert export_main(["--model", "mha", "--out", str(not_artifact)]) == 2
    assert (not_artifact / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_writes_artifact(tmp_path, capsys):
    assert export_main(["--model", "mha-gqa", "--out", str(tmp_path / "gqa")]) == 0
    assert "float32, 1 Attention, opset 23" in capsys.readouterr().out
    assert (tmp_path / "gqa" / "manifest.json").is_file()


def test_help_documents_exit_codes():
    r = subprocess.run(
        [sys.executable, "-m", "qkv_onnx.export", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0
    assert "exit codes" in r.stdout and "bert-tiny" in r.stdout
    assert "3  internal error" in r.stdout


@pytest.mark.slow
def test_a_bug_in_the_exporter_is_exit_3_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """An unexpected exception inside our pipeline: traceback, exit 3, no artifact and no temporary left."""

    def broken(*args, **kwargs):
        raise KeyError("a bug in the fusion check")

    monkeypatch.setattr("qkv_onnx.export.graph.check_fusion", broken)
    assert export_main(["--model", "mha", "--out", str(tmp_path / "art")]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'a bug in the fusion check'" in err
    assert "qkv-export: internal error" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_weights_can_go_to_a_side_file(tmp_path):
    """The >2 GB path, forced on a small model: model.onnx names model.onnx.data, and the manifest hashes
    it."""
    out = tmp_path / "ext"
    manifest = export_artifact("mha", out, external_data=True)
    assert manifest["weights"]["external_data"] is True
    assert "model.onnx.data" in manifest["files"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    weight_bytes = manifest["weights"]["bytes"]
    assert (out / "model.onnx.data").stat().st_size > 0.9 * weight_bytes > (out / "model.onnx").stat().st_size


def test_dynamic_dims_are_not_capped(exported):
    """Batch and (non-BERT) sequence dims accept sizes beyond the traced ones and beyond 512."""
    session = ort.InferenceSession(str(exported("mha") / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch, seq in [(520, 5), (2, 600)]:
        feeds = example_inputs(MODELS["mha"], batch, seq, [seq] * (batch - 1) + [0], seed=3)
        out = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        assert out.shape == (batch, seq, 64) and np.isfinite(out).all()
