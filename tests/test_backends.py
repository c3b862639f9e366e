"""The three attention backends and the execution providers: fused-op counts, parity on ORT CPU with
every mask form, backends judged against each other, CUDA strictness (no silent CPU fallback)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import (
    EMPTY_ROW_CASES,
    NO_OPENVINO,
    OPENVINO,
    OPENVINO_DEFAULT_IN_AUTO,
    ROOT,
    SMALL_MODELS,
    openvino_native_bf16,
    rehash,
    rotation,
    run_cli,
    single_error_line,
)
from onnx import TensorProto, helper

from qkv_onnx.artifact_format import BACKENDS
from qkv_onnx.export.cli import main as export_main
from qkv_onnx.export.fusion import FusionError, check_fusion, count_ops
from qkv_onnx.validate.artifact import load_artifact
from qkv_onnx.validate.parity import validate_artifact
from qkv_onnx.validate.runtimes import (
    OrtSession,
    ProviderError,
    Reference,
    capability_gap,
    cpu_placement,
    cuda_problem,
    parse_placements,
    single_node_model,
)

CONTRIB_ATTENTION = ("com.microsoft::Attention", "com.microsoft::MultiHeadAttention")
CUDA_PROBLEM = cuda_problem()
needs_cuda = pytest.mark.skipif(
    CUDA_PROBLEM is not None, reason=f"no working CUDA provider here: {CUDA_PROBLEM}"
)


def ops(directory: Path) -> dict:
    return count_ops(onnx.load(str(directory / "model.onnx")))


# --- what each backend emits -----------------------------------------------------------------------


def test_bert_tiny_onnx_attention_counts(exported):
    counts = ops(exported("bert-tiny"))
    assert counts["Attention"] == 2 and "Softmax" not in counts
    assert not any(k.startswith("com.microsoft") for k in counts)


def test_bert_tiny_ort_contrib_counts(exported):
    """Two contrib attention nodes plus the fusions that come with them: 5 SkipLayerNormalization
    (embeddings + 2 per layer), 2 BiasGelu; no ONNX Attention, no Softmax, no LayerNormalization left."""
    d = exported("bert-tiny", backend="ort-contrib")
    counts = ops(d)
    assert sum(counts.get(k, 0) for k in CONTRIB_ATTENTION) == 2
    assert counts["com.microsoft::SkipLayerNormalization"] == 5 and counts["com.microsoft::BiasGelu"] == 2
    assert not {"Attention", "Softmax", "LayerNormalization", "Erf"} & set(counts)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["opset"]["ai.onnx"] == 18 and manifest["fused_attention_ops"] == 2
    assert manifest["ort_fusions"] == {k: v for k, v in counts.items() if k.startswith("com.microsoft::")}


def test_bert_tiny_decomposed_has_no_fused_op(exported):
    d = exported("bert-tiny", backend="decomposed")
    counts = ops(d)
    assert counts["Softmax"] == 2 and counts["MatMul"] >= 2 * 2 + 2 * 6
    assert not any(k.endswith("Attention") for k in counts)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["opset"]["ai.onnx"] == 18 and manifest["fused_attention_ops"] == 0


def test_cross_attention_and_gqa_become_contrib_multi_head_attention(exported):
    """Cross-attention cannot pack Q/K/V into contrib Attention; GQA goes through MultiHeadAttention."""
    for model in ("mha-cross", "mha-gqa"):
        counts = ops(exported(model, backend="ort-contrib"))
        assert counts.get("com.microsoft::MultiHeadAttention") == 1 and "Softmax" not in counts


@pytest.mark.parametrize(("model", "backend"), rotation(SMALL_MODELS, ["ort-contrib", "decomposed"]))
def test_every_mask_form_of_every_backend_passes_on_ort_cpu(exported, model, backend):
    """Each model's masks (padding, causal + padding, cross-attention padding, an all-padding row,
    seq 1) run on ORT CPU and agree with the oracle and golden data on all validation cases."""
    d = exported(model, backend=backend)
    report = validate_artifact(load_artifact(d), ["cpu"], use_torch=False)
    bad = [(c.case, c.reference, c.error or c.metrics.max_abs) for c in report.checks if not c.passed]
    assert report.passed, bad
    assert any(c.case == "b3xs7" for c in report.checks)  # the case with an all-padding row


@pytest.mark.parametrize("backend", ["ort-contrib", "decomposed"])
def test_float16_backends_pass_on_ort_cpu(exported, backend):
    report = validate_artifact(
        load_artifact(exported("encoder-block", "float16", backend)), ["cpu"], use_torch=False
    )
    assert report.passed


# --- the fusion check --------------------------------------------------------------------------------


def test_fusion_check_refuses_a_graph_that_breaks_the_backends_promise(exported):
    decomposed = onnx.load(str(exported("mha", backend="decomposed") / "model.onnx"))
    fused = onnx.load(str(exported("mha") / "model.onnx"))
    with pytest.raises(
        FusionError, match="0 com.microsoft::Attention/com.microsoft::MultiHeadAttention nodes.*Softmax"
    ):
        check_fusion(decomposed, "ort-contrib", 1)
    with pytest.raises(FusionError, match=r"attention ops of another backend: \{'Attention': 1\}"):
        check_fusion(fused, "decomposed", 1)
    with pytest.raises(FusionError, match="0 Softmax nodes for 1"):
        check_fusion(fused, "decomposed", 1)
    assert check_fusion(decomposed, "decomposed", 1)["Softmax"] == 1


# --- CLI ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_backend_all_writes_one_artifact_per_backend(tmp_path, capsys):
    assert export_main(["--model", "mha", "--backend", "all", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for b in BACKENDS:
        manifest = json.loads((tmp_path / f"mha-{b}-float32" / "manifest.json").read_text())
        assert manifest["backend"] == b and f"mha-{b}-float32" in out
    assert "1 com.microsoft::Attention" in out and "1 Softmax (decomposed)" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "ort-contrib", "--opset", "23"], "backend ort-contrib needs opset 18, got 23"),
        (["--backend", "decomposed", "--opset", "16"], "backend decomposed needs opset 17..18, got 16"),
        (["--backend", "all", "--opset", "18"], "--opset applies to one backend"),
        (["--backend", "fast"], "unknown backend 'fast'"),
    ],
)
def test_export_refuses_backend_arguments(args, message, tmp_path, capsys):
    assert export_main(["--model", "mha", "--out", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_validate_compares_the_backends_with_each_other(exported, tmp_path, capsys):
    """Three bert-tiny artifacts: each agrees with the oracle and with both siblings on ORT CPU."""
    dirs = [exported("bert-tiny", backend=b) for b in BACKENDS]
    code, out, err, doc = run_cli(
        capsys, *dirs, "--providers", "cpu", "--no-torch", "--json", tmp_path / "r.json"
    )
    assert code == 0 and err == ""
    for artifact in doc["artifacts"]:
        me = artifact["backend"]
        siblings = {c["reference"] for c in artifact["checks"] if c["reference"].startswith("backend ")}
        assert siblings == {f"backend {b}" for b in BACKENDS if b != me}
        cross = [c for c in artifact["checks"] if c["reference"].startswith("backend ")]
        assert len(cross) == 2 * 8 * 2 and all(c["passed"] for c in cross)  # 2 siblings x 8 cases x 2 outputs
    assert "| ORT CPU | backend ort-contrib | last_hidden_state | 8 |" in out


def test_validate_fails_when_a_sibling_disagrees(exported, artifact_copy, tmp_path, capsys):
    """Same weights.npz, but one backend's graph computes something else: the cross-backend check fails."""
    good = exported("mha", backend="decomposed")
    bad = artifact_copy("mha")
    model = onnx.load(str(bad / "model.onnx"))  # the exporter's structure and weights, another function
    node = next(n for n in model.graph.node if n.op_type == "Attention")
    node.attribute.append(onnx.helper.make_attribute("scale", 0.5))
    onnx.save(model, str(bad / "model.onnx"))
    rehash(bad, "model.onnx")
    code, _, _, doc = run_cli(
        capsys, good, bad, "--providers", "cpu", "--no-torch", "--json", tmp_path / "r.json"
    )
    assert code == 1
    decomposed = next(a for a in doc["artifacts"] if a["backend"] == "decomposed")
    failed = {c["reference"] for c in decomposed["checks"] if not c["passed"]}
    assert failed == {"backend onnx-attention"}


# --- providers ---------------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA_PROBLEM is None, reason="this machine has a working CUDA provider")
def test_cuda_where_it_cannot_run_exits_2_with_the_reason(exported, capsys):
    d = exported("mha")
    code, out, err, _ = run_cli(capsys, d, "--providers", "cpu,cuda")
    line = single_error_line(err)
    assert code == 2 and out == ""
    assert "--providers cuda: ONNX Runtime CUDAExecutionProvider (TF32 off) cannot run here: " in line
    assert CUDA_PROBLEM in line


def test_auto_says_which_providers_it_found(exported, tmp_path, capsys):
    code, out, err, doc = run_cli(capsys, exported("mha"), "--no-torch", "--json", tmp_path / "r.json")
    assert code == 0 and err == ""
    [note] = doc["notes"]
    assert note.startswith(
        "--providers auto found: cpu, "
        + ("" if CUDA_PROBLEM else "cuda, ")
        + "reference"
        + (", openvino" if OPENVINO else "")
        + (", openvino-default" if OPENVINO_DEFAULT_IN_AUTO else "")
    )
    if OPENVINO and not OPENVINO_DEFAULT_IN_AUTO:
        assert (
            "(no openvino-default: the CPU plugin's default precision here is f32: runtime openvino "
            "computes the same)" in note
        )
    assert note in out
    runtimes = {c["runtime"] for c in doc["artifacts"][0]["checks"]}
    assert runtimes == {"cpu", "reference", "pytorch-golden"} | (set() if CUDA_PROBLEM else {"cuda"}) | (
        {"openvino"} if OPENVINO else set()
    ) | ({"openvino-default"} if OPENVINO_DEFAULT_IN_AUTO else set())


def test_auto_notes_that_reference_cannot_run_contrib_ops(exported, tmp_path, capsys):
    code, out, _, doc = run_cli(
        capsys, exported("mha", backend="ort-contrib"), "--no-torch", "--json", tmp_path / "r.json"
    )
    assert code == 0
    assert (
        "onnx.reference.ReferenceEvaluator: not run (ReferenceEvaluator has no kernels for "
        "com.microsoft::Attention" in out
    )
    assert "reference" not in {c["runtime"] for c in doc["artifacts"][0]["checks"]}


def test_reference_asked_for_explicitly_on_contrib_ops_exits_2(exported, capsys):
    d = exported("mha", backend="ort-contrib")
    code, _, err, _ = run_cli(capsys, d, "--providers", "reference")
    assert code == 2 and "com.microsoft::Attention" in single_error_line(err)


def _bfloat16_matmul(path: Path) -> Path:
    node = helper.make_node("MatMul", ["x", "x"], ["y"], name="bf16_matmul")
    return single_node_model(path, node, TensorProto.BFLOAT16, [2, 2])


def test_a_node_the_provider_lacks_fails_naming_the_node(tmp_path):
    """ORT CPU has no bfloat16 MatMul: session creation fails and the message names the node."""
    with pytest.raises(ProviderError, match="CPUExecutionProvider cannot run it: .*bf16_matmul"):
        OrtSession(_bfloat16_matmul(tmp_path / "m.onnx"), "cpu")


def test_reference_refuses_contrib_ops_by_name(exported):
    """Known before any session is made, from the op domains load_artifact read off the checked graph."""
    artifact = load_artifact(exported("mha", backend="ort-contrib"))
    assert artifact.foreign_ops == ("com.microsoft::Attention",)
    assert (
        capability_gap("reference", artifact)
        == "ReferenceEvaluator has no kernels for com.microsoft::Attention (it implements the ai.onnx domain only)"  # noqa: E501
    )
    assert capability_gap("cpu", artifact) is None
    assert capability_gap("reference", load_artifact(exported("mha"))) is None
    with pytest.raises(ProviderError, match="ReferenceEvaluator cannot load it: .*com.microsoft"):
        Reference(artifact.model_path)


def test_placement_log_parser():
    """The lines ORT 1.31 writes at verbose level (format seen on this machine and in ORT's source)."""
    log = "\n".join(
        [
            "2026-11-28 [V:onnxruntime:, session_state.cc:1578 VerifyEachNodeIsAssignedToAnEp] Node placements",  # noqa: E501
            "2026-11-28 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on "  # noqa: E501
            "[CUDAExecutionProvider]. Number of nodes: 40",
            "2026-11-28 [V:onnxruntime:, session_state.cc:1583 VerifyEachNodeIsAssignedToAnEp]   MatMul (node_MatMul_1)",  # noqa: E501
            "2026-11-28 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on "  # noqa: E501
            "[CPUExecutionProvider]. Number of nodes: 2",
            "2026-11-28 [V:onnxruntime:, session_state.cc:1583 VerifyEachNodeIsAssignedToAnEp]   Shape (node_Shape_3)",  # noqa: E501
            "2026-11-28 [V:onnxruntime:, session_state.cc:1583 VerifyEachNodeIsAssignedToAnEp]   Gather (node_Gather_4)",  # noqa: E501
            "2026-11-28 [V:onnxruntime:, inference_session.cc:2000 Initialize] Session successfully initialized.",  # noqa: E501
        ]
    )
    assert parse_placements(log) == {
        "CUDAExecutionProvider": ["MatMul (node_MatMul_1)"],
        "CPUExecutionProvider": ["Shape (node_Shape_3)", "Gather (node_Gather_4)"],
    }


def test_placements_of_a_real_cpu_session(exported):
    from qkv_onnx.validate.runtimes import placement_log

    n = len(onnx.load(str(exported("mha") / "model.onnx")).graph.node)
    found = parse_placements(placement_log(exported("mha") / "model.onnx", "CPUExecutionProvider"))
    assert list(found) == ["CPUExecutionProvider"] and 0 < found["CPUExecutionProvider"] <= n


COST = (
    "2026-11-28 [I:onnxruntime:Default, fallback_cpu_capability.cc:152 GetCpuPreferredNodes] ORT optimization- "  # noqa: E501
    "Force fallback to CPU execution for node: {} because the CPU execution path is deemed faster than overhead "  # noqa: E501
    "involved with execution on other EPs  capable of executing this node"
)
PLACED = "2026-11-28 [V:onnxruntime:, session_state.cc:1583 VerifyEachNodeIsAssignedToAnEp]   {}"
HEADER = (
    "2026-11-28 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on "
    "[{}]. Number of nodes: {}"
)


def test_cpu_placement_tells_cost_model_moves_from_missing_kernels():
    """The CUDA policy's evidence: shape nodes ORT moved by cost are allowed (and reported); a node it put
    on the CPU for lack of a kernel is not. Log lines in ORT 1.31's format (fallback_cpu_capability.cc)."""
    cost_only = "\n".join(
        [
            COST.format("node_Concat_3"),
            HEADER.format("CUDAExecutionProvider", 40),
            PLACED.format("MatMul (node_MatMul_1)"),
            HEADER.format("CPUExecutionProvider", 1),
            PLACED.format("Concat (node_Concat_3)"),
        ]
    )
    assert cpu_placement(cost_only) == (["Concat (node_Concat_3)"], [])
    no_kernel = cost_only + "\n" + PLACED.format("NhwcMaxPool (cpu_only_node)")
    assert cpu_placement(no_kernel) == (
        ["Concat (node_Concat_3)", "NhwcMaxPool (cpu_only_node)"],
        ["NhwcMaxPool (cpu_only_node)"],
    )
    everything = HEADER.format("CPUExecutionProvider", 12).replace("Node(s)", "All nodes")
    assert cpu_placement(everything) == (12, 12)


# --- on a machine with a working CUDA provider --------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bert_tiny_on_cuda(exported, backend, dtype, tmp_path, capsys):
    code, out, err, doc = run_cli(
        capsys,
        exported("bert-tiny", dtype, backend),
        "--providers",
        "cuda,cpu",
        "--no-torch",
        "--json",
        tmp_path / "r.json",
    )
    assert code == 0, err
    assert "CUDAExecutionProvider" in " ".join(doc["artifacts"][0]["notes"])
    assert {"cuda", "cpu"} <= {c["runtime"] for c in doc["artifacts"][0]["checks"]}


@pytest.mark.cuda
@needs_cuda
def test_cuda_refuses_a_node_it_cannot_run(tmp_path):
    """A node with a CPU kernel only: with fallback disabled, a failure naming the node, not a CPU run."""
    path = _crafted_cpu_only(tmp_path / "c.onnx")
    OrtSession(path, "cpu")
    with pytest.raises(ProviderError, match="CUDAExecutionProvider has no kernel for node.*cpu_only_node"):
        OrtSession(path, "cuda")


def test_crafted_cpu_only_graph_runs_on_cpu(tmp_path):
    """The graph the CUDA test above relies on is valid and runs on ORT CPU."""
    session = OrtSession(_crafted_cpu_only(tmp_path / "c.onnx"), "cpu")
    x = np.arange(4, dtype=np.int8).reshape(1, 2, 2, 1)
    np.testing.assert_array_equal(session.run([x])[0], x)


def _crafted_cpu_only(path: Path) -> Path:
    """A graph whose only op has a CPU kernel and no CUDA kernel (com.microsoft NhwcMaxPool)."""
    node = helper.make_node(
        "NhwcMaxPool", ["x"], ["y"], name="cpu_only_node", domain="com.microsoft", kernel_shape=[1, 1]
    )
    return single_node_model(path, node, TensorProto.INT8, [1, 2, 2, 1])


# --- bfloat16 ----------------------------------------------------------------------------------------


def test_bfloat16_on_ort_cpu_is_refused_with_the_reason(exported, capsys):
    d = exported("mha", "bfloat16")
    code, _, err, _ = run_cli(capsys, d, "--providers", "cpu")
    line = single_error_line(err)
    assert code == 2 and "CPU provider has no bfloat16 kernels" in line and "--providers cuda" in line


def test_bfloat16_under_auto_runs_where_kernels_exist(exported, tmp_path, capsys):
    """auto skips ORT CPU for bfloat16 (saying so) and judges the artifact on the reference runtime (and
    OpenVINO where installed). On a CPU without native bfloat16, OpenVINO's bfloat16 Attention gets the
    all-padding rows wrong: exactly those OpenVINO checks fail (exit 1); everything else passes."""
    code, out, _, doc = run_cli(capsys, exported("mha", "bfloat16"), "--json", tmp_path / "r.json")
    assert (
        "ONNX Runtime CPUExecutionProvider: not run (ONNX Runtime's CPU provider has no bfloat16 kernels"
        in out
    )
    checks = doc["artifacts"][0]["checks"]
    openvinos = ({"openvino"} if OPENVINO else set()) | (
        {"openvino-default"} if OPENVINO_DEFAULT_IN_AUTO else set()
    )
    assert {c["runtime"] for c in checks} == {"reference", "pytorch", "pytorch-golden"} | openvinos
    defect = OPENVINO and not openvino_native_bf16()
    assert code == (1 if defect else 0)
    failed = {(c["runtime"], c["case"]) for c in checks if not c["passed"]}
    if defect:
        assert {r for r, _ in failed} == openvinos
        assert {case for _, case in failed} == EMPTY_ROW_CASES
    else:
        assert failed == set()


def test_bfloat16_contrib_has_no_runtime_without_openvino_exit_2(exported):
    """No CUDA, OpenVINO not importable: neither ORT CPU (bfloat16) nor the reference (com.microsoft) can run
    it."""
    if CUDA_PROBLEM is None:
        pytest.skip("CUDA can run it here")
    proc = subprocess.run(
        [sys.executable, "-c", NO_OPENVINO, str(exported("mha", "bfloat16", "ort-contrib"))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no runtime asked for can run it" in single_error_line(proc.stderr)
