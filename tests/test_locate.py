"""Where a model diverges (issue 13): taps recorded at export, compared with the oracle's intermediates,
faults planted by third-party runtimes (a test-only distribution registered under `qkv_onnx.runtimes`)
located at the right layer and tap, and runtime plugins treated like the built-ins."""

import json
import os
import subprocess
import sys

import onnx
import pytest
from helpers import (
    AUTO,
    EMPTY_ROW_CASES,
    OPENVINO,
    ROOT,
    SMALL_MODELS,
    edit_manifest,
    openvino_native_bf16,
    rotation,
    run_cli,
    scale_attention,
    single_error_line,
    snapshot,
)

from qkv_onnx.artifact_format import BACKENDS, tap_label

BERT_TAPS = ["embeddings"] + [
    f"layer {k} {t}" for k in (0, 1) for t in ("attention", "attention_block", "block")
]


def labels(manifest: dict) -> list[str]:
    return [tap_label(t["tap"], t["layer"]) for t in manifest["taps"]]


def validate_with_plugins(site, *args, layer: int | None = None, timeout: int = 300) -> tuple:
    """qkv-validate in a fresh process that sees the plugin directory: (exit code, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("QKV_FAULT_LAYER", None)
    if layer is not None:
        env["QKV_FAULT_LAYER"] = str(layer)
    p = subprocess.run(
        [sys.executable, "-m", "qkv_onnx.validate", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return p.returncode, p.stdout, p.stderr


# --- taps at export ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_taps_are_recorded_in_computation_order_and_name_graph_values(exported, backend):
    """Every backend's bert-tiny lists embeddings, then attention / attention_block / block per layer, then
    the pooler; each names a value the graph computes (ort-contrib's attention: its MatMul plus the bias the
    fused SkipLayerNormalization adds)."""
    d = exported("bert-tiny", backend=backend)
    m = json.loads((d / "manifest.json").read_text())
    assert labels(m) == [*BERT_TAPS, "pooler"]
    graph = onnx.load(str(d / "model.onnx"), load_external_data=False)
    values = {o for n in graph.graph.node for o in n.output}
    initializers = {i.name for i in graph.graph.initializer}
    for tap in m["taps"]:
        assert tap["value"] in values, tap
        assert tap["add"] is None or tap["add"] in initializers, tap
    adds = [t["add"] for t in m["taps"] if t["add"]]
    assert adds == (
        ["blocks.0.attn.out_proj.bias", "blocks.1.attn.out_proj.bias"] if backend == "ort-contrib" else []
    )


# --- every unfaulted model, backend and runtime passes every tap --------------------------------------


@pytest.mark.parametrize(("model", "backend"), rotation(SMALL_MODELS, list(BACKENDS)))
def test_every_tap_passes_on_every_runtime(exported, tmp_path, capsys, model, backend):
    """--locate on honest artifacts: each runtime of --providers auto runs every case with the taps exposed,
    and every tap is within the policy's tolerance for its depth (the tap tolerances are not too tight)."""
    code, out, err, doc = run_cli(
        capsys, exported(model, backend=backend), "--locate", "--no-torch", "--json", tmp_path / "r.json"
    )
    assert code == 0 and err == "", err
    [a] = doc["artifacts"]
    assert a["first_divergence"] is None and "no tap diverges from the oracle" in out
    checks = a["localization"]["checks"]
    ran = {name for name, s in a["runtimes"].items() if s["loads"]}
    assert {c["runtime"] for c in checks} == ran and ran
    assert {c["label"] for c in checks} == set(a["localization"]["taps"])
    failed = [c for c in checks if not c["passed"]]
    assert failed == [], failed[:3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_taps_pass(exported, tmp_path, capsys, backend):
    code, _, err, doc = run_cli(
        capsys,
        exported("bert-tiny", "float16", backend),
        "--locate",
        "--no-torch",
        "--providers",
        "cpu",
        "--json",
        tmp_path / "r.json",
    )
    assert code == 0 and err == ""
    assert all(c["passed"] for c in doc["artifacts"][0]["localization"]["checks"])


@pytest.mark.skipif(not OPENVINO, reason="OpenVINO is not installed (pip install 'qkv-onnx[openvino]')")
def test_the_reference_runtimes_bfloat16_layer_norm_is_located_at_the_embeddings(exported, tmp_path, capsys):
    """A finding the taps make visible: onnx's ReferenceEvaluator ignores LayerNormalization's stash_type
    (float32 by default) and sums bfloat16 in bfloat16, so on a bfloat16 artifact its error is already 6x
    OpenVINO's at the first LayerNorm, the embeddings tap, and beyond that tap's allowance (S = 1); its
    outputs stay within their looser allowance (the verdict is the outputs'). OpenVINO passes every tap."""
    code, _, _, doc = run_cli(
        capsys,
        exported("bert-mini", "bfloat16", "decomposed"),
        "--locate",
        "--no-torch",
        "--providers",
        "reference,openvino",
        "--json",
        tmp_path / "r.json",
    )
    a = doc["artifacts"][0]
    checks = a["localization"]["checks"]

    def worst(runtime, label):
        return max(c["max_abs"] for c in checks if c["runtime"] == runtime and c["label"] == label)

    assert code == 0 and a["passed"]
    assert all(c["passed"] for c in checks if c["runtime"] == "openvino")
    first = a["first_divergence"]
    assert (first["runtime"], first["label"]) == ("reference", "embeddings")
    assert worst("reference", "embeddings") > 3 * worst("openvino", "embeddings")


@pytest.mark.skipif(not OPENVINO, reason="OpenVINO is not installed (pip install 'qkv-onnx[openvino]')")
def test_openvino_default_bf16_error_grows_through_the_layers(exported, tmp_path, capsys):
    """OpenVINO's default precision where it is bf16: the per-layer table shows the error growing."""
    import openvino as ov

    hint = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    if hint != "bf16":
        pytest.skip(f"OpenVINO's default precision on this CPU is {hint}, not bf16: nothing to show")
    code, _, _, doc = run_cli(
        capsys,
        exported("bert-mini"),
        "--locate",
        "--no-torch",
        "--providers",
        "openvino-default",
        "--json",
        tmp_path / "r.json",
    )
    checks = [c for c in doc["artifacts"][0]["localization"]["checks"] if c["runtime"] == "openvino-default"]
    worst = {
        label: max(c["max_abs"] for c in checks if c["label"] == label)
        for label in {c["label"] for c in checks}
    }
    assert code == 4 and worst["layer 3 block"] > 3 * worst["embeddings"], worst  # 4: only non-gating ran


@pytest.mark.skipif(not OPENVINO, reason="OpenVINO is not installed (pip install 'qkv-onnx[openvino]')")
def test_openvino_bf16_defect_is_located_at_the_first_attention(exported, tmp_path, capsys):
    """A real runtime fault: where OpenVINO lacks native bfloat16, its bfloat16 Attention gets all-padding
    rows wrong (helpers.openvino_native_bf16); localization names layer 0 attention and a case with such
    a row."""
    if openvino_native_bf16():
        pytest.skip("this CPU has native bfloat16: OpenVINO computes the all-padding rows correctly")
    code, out, _, doc = run_cli(
        capsys,
        exported("bert-tiny", "bfloat16"),
        "--no-torch",
        "--providers",
        "openvino",
        "--json",
        tmp_path / "r.json",
    )
    first = doc["artifacts"][0]["first_divergence"]
    assert code == 1 and (first["layer"], first["tap"], first["runtime"]) == (0, "attention", "openvino")
    assert first["case"] in EMPTY_ROW_CASES and first["line"] in out


# --- a tap that points at the wrong tensor is caught ---------------------------------------------------


def test_swapped_taps_fail_where_they_were_swapped(artifact_copy, tmp_path, capsys):
    """A manifest whose layer-0 attention tap names another tensor (re-signed): that tap fails, the taps
    before it pass. So a tap is compared with the oracle's value of that very boundary."""
    d = artifact_copy("bert-tiny")

    def swap(m):
        m["taps"][1]["value"], m["taps"][2]["value"] = m["taps"][2]["value"], m["taps"][1]["value"]

    edit_manifest(d, swap)
    code, out, _, doc = run_cli(
        capsys, d, "--locate", "--no-torch", "--providers", "cpu", "--json", tmp_path / "r.json"
    )
    first = doc["artifacts"][0]["first_divergence"]
    assert code == 0  # the outputs are right; --locate reports the bad tap without failing the parity checks
    assert (first["layer"], first["tap"]) == (0, "attention")
    embeddings = [c for c in doc["artifacts"][0]["localization"]["checks"] if c["label"] == "embeddings"]
    assert embeddings and all(c["passed"] for c in embeddings)


# --- faults planted by third-party runtimes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault_tap", "backend"),
    rotation([("weight", "block"), ("mask", "attention"), ("scale", "attention")], list(BACKENDS)),
)
def test_a_fault_at_layer_1_is_located_at_layer_1(exported, faults_site, tmp_path, backend, fault_tap):
    """A runtime that computes layer 1 of bert-tiny wrong (a perturbed feed-forward weight, an inverted
    mask, a doubled attention scale): exit 1, and the first divergence names layer 1 and the tap the fault
    is in; every tap before it passes on every case."""
    fault, tap = fault_tap
    json_path = tmp_path / "r.json"
    code, out, err = validate_with_plugins(
        faults_site,
        exported("bert-tiny", backend=backend),
        "--providers",
        f"faulty-{fault}",
        "--no-torch",
        "--json",
        json_path,
        layer=1,
    )
    assert code == 1 and err == "", err
    a = json.loads(json_path.read_text())["artifacts"][0]
    first = a["first_divergence"]
    assert (first["runtime"], first["layer"], first["tap"]) == (f"faulty-{fault}", 1, tap), first
    assert first["max_abs"] > first["atol"] and first["line"] in out
    assert first["line"].startswith(f"first divergence: layer 1 {tap} (max abs ")
    depth = a["localization"]["taps"].index(first["label"])
    earlier = [c for c in a["localization"]["checks"] if a["localization"]["taps"].index(c["label"]) < depth]
    assert earlier and all(c["passed"] for c in earlier)


@pytest.mark.parametrize("model", ["mha-cross", "mha-gqa"])
def test_an_inverted_mask_in_multi_head_attention_is_located(exported, faults_site, tmp_path, model):
    """Cross-attention and grouped-query attention (com.microsoft MultiHeadAttention in ort-contrib)."""
    json_path = tmp_path / "r.json"
    code, _, _ = validate_with_plugins(
        faults_site,
        exported(model, backend="ort-contrib"),
        "--providers",
        "faulty-mask",
        "--no-torch",
        "--json",
        json_path,
        layer=0,
    )
    first = json.loads(json_path.read_text())["artifacts"][0]["first_divergence"]
    assert code == 1 and (first["layer"], first["tap"]) == (0, "attention")


# --- runtime plugins ---------------------------------------------------------------------------------------


def test_plugins_are_listed_and_treated_like_built_ins(exported, faults_site, tmp_path):
    """Discovered from the entry-point group: in --help; under auto, left out with their own reason when they
    cannot run here; asked for by name, a column of the compatibility matrix beside ORT CPU."""
    code, out, _ = validate_with_plugins(faults_site, "--help")
    assert code == 0 and "faulty-mask (ORT CPU with an inverted mask)" in out
    code, out, err = validate_with_plugins(faults_site, exported("mha"), "--no-torch")
    assert code == 0 and "faulty-mask, faulty-scale, faulty-weight: set QKV_FAULT_LAYER" in out, out[:500]
    code, out, _ = validate_with_plugins(
        faults_site, exported("mha"), "--no-torch", "--providers", "faulty-scale,cpu", "--matrix", layer=0
    )
    assert code == 1 and "| backend | dtype | faulty scale | ORT CPU |" in out
    code, _, err = validate_with_plugins(
        faults_site, exported("mha"), "--providers", "faulty-weight", layer=0
    )
    assert code == 2 and "runtime plugin 'faulty-weight' failed to open it: ValueError" in single_error_line(
        err
    )


def test_a_broken_or_impostor_plugin_is_refused_and_the_rest_still_runs(exported, tmp_path):
    """A distribution whose entry point does not import, and one that claims another runtime's class: each is
    a note; the built-in runtimes still validate."""
    site = tmp_path / "site"
    info = site / "qkv_bad_plugins-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qkv-bad-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[qkv_onnx.runtimes]\nbroken = no_such_module_anywhere:Runtime\n"
        "impostor = qkv_onnx.validate.runtimes.reference:Reference\n"
    )
    code, out, err = validate_with_plugins(site, exported("mha"), "--no-torch")
    assert code == 0 and err == ""
    assert "runtime plugin 'broken' (no_such_module_anywhere:Runtime) does not load: No module named" in out
    assert (
        "runtime plugin 'impostor' (qkv_onnx.validate.runtimes.reference:Reference) refused: its class says "
        "name 'reference'" in out
    )


# --- artifacts without taps, and the other refusals -------------------------------------------------------


def test_an_artifact_without_taps_still_validates_and_says_so(artifact_copy, tmp_path, capsys):
    """A 0.1 artifact (no taps): validation passes; --locate asked for by name is exit 2 with one line; a
    failing one is exit 1 with a note that localization is unavailable; nothing on disk changes."""
    d = artifact_copy("mha")
    edit_manifest(d, lambda m: m.pop("taps"))
    before = snapshot(d)
    assert run_cli(capsys, d, "--no-torch")[0] == 0
    code, out, err, _ = run_cli(capsys, d, "--no-torch", "--locate")
    assert code == 2 and "--locate: the artifact has no taps (exported by qkv-onnx 0.1)" in single_error_line(
        err
    )
    assert snapshot(d) == before
    scale_attention(d)
    code, out, err, _ = run_cli(capsys, d, "--no-torch")
    assert code == 1 and "localization: unavailable, the artifact has no taps" in out


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m["taps"][0].__setitem__("layer", 7), "outside the model's 2 layer(s)"),
        (lambda m: m["taps"][0].__setitem__("tap", "logits"), "is not one of"),
        (lambda m: m["taps"].append({"tap": "block"}), "every tap must be {tap, layer, value, add}"),
        (lambda m: m.__setitem__("taps", []), "'taps' must be a non-empty list"),
    ],
    ids=["layer-out-of-range", "unknown-tap", "missing-keys", "empty"],
)
def test_malformed_taps_are_an_invalid_artifact(artifact_copy, capsys, edit, words):
    d = artifact_copy("bert-tiny")
    edit_manifest(d, edit)
    code, _, err, _ = run_cli(capsys, d, "--no-torch")
    assert code == 2 and words in single_error_line(err)


def test_plots_of_error_against_depth(exported, tmp_path, capsys):
    code, _, err, _ = run_cli(
        capsys,
        exported("bert-tiny"),
        "--locate",
        "--no-torch",
        "--providers",
        "cpu",
        "--plots",
        tmp_path / "plots",
    )
    png = tmp_path / "plots" / "bert-tiny-float32-error-by-depth.png"
    assert code == 0 and f"wrote {png}" in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_auto_locates_only_what_failed(artifact_copy, tmp_path, capsys):
    """Layer 0's Attention given another scale (re-signed graph, structural mode) fails parity: every runtime
    of auto that failed is located on its failing cases, without --locate, and the first divergence is layer
    0's attention."""
    d = artifact_copy("bert-tiny")
    scale_attention(d)
    code, out, _, doc = run_cli(capsys, d, "--no-torch", "--json", tmp_path / "r.json")
    a = doc["artifacts"][0]
    assert code == 1 and (a["first_divergence"]["layer"], a["first_divergence"]["tap"]) == (0, "attention")
    gating = {r for r in AUTO if a["runtimes"][r]["loads"] and a["runtimes"][r]["gating"]}
    assert {c["runtime"] for c in a["localization"]["checks"]} >= gating
