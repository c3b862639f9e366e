"""int8 artifacts (issue 16): quantized from the float32 export with the fewest products kept in float32 that
make the accuracy contract hold; judged by that contract (never by a tolerance from the manifest) on every
runtime; a naive per-tensor int8 of all-MiniLM-L6-v2 fails it."""

import json
import os
import subprocess
import sys

import onnx
import pytest
from helpers import (
    ROOT,
    edit_manifest,
    flip_byte,
    rehash,
    rewrite,
    run_cli,
    single_error_line,
    snapshot,
    tree_bytes,
    weights_of,
)

from qkv_onnx.artifact_format import BACKENDS, sha256_file
from qkv_onnx.export.cli import main as export_main
from qkv_onnx.export.pipeline import export_artifact
from qkv_onnx.export.quantize import product_groups, quantize
from qkv_onnx.export.writer import save_weights_npz
from qkv_onnx.text import corpus, read_sentences

SENTENCES = ROOT / "docs" / "attention" / "sentences.txt"  # never seen by the calibration
UNSEEN = ROOT / "tests" / "data" / "unseen_sentences.txt"  # seen by neither the search nor its held-out check


@pytest.fixture(scope="module")
def int8_tiny(tmp_path_factory):
    """bert-tiny int8 from every backend."""
    root = tmp_path_factory.mktemp("int8")
    return {b: (export_artifact("bert-tiny", root / b, backend=b, dtype="int8"), root / b) for b in BACKENDS}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_comes_from_the_float32_export_and_says_how(int8_tiny, exported, backend):
    """The record names the method and its settings, the nodes left in float32 and why, and the sha256 of the
    float32 graph: the very model.onnx of the float32 artifact of the same model, seed and backend."""
    manifest, d = int8_tiny[backend]
    q = manifest["quantization"]
    assert manifest["dtype"] == "int8" and {i["dtype"] for i in manifest["inputs"] + manifest["outputs"]} >= {
        "float32"
    }
    assert q["method"] == "onnxruntime.quantization.quantize_dynamic" and q["per_channel"] is True
    assert q["weight_type"] == "QInt8" and q["op_types_to_quantize"] == ["MatMul", "Gemm"]
    assert "QAttention" in q["float_ops"]["attention"] and q["holdout"]["passed"]
    chosen = [s for s in q["search"]["steps"] if s["passed"]]
    assert chosen and min(len(s["float32_groups"]) for s in chosen) == len(
        {n["group"] for n in q["float_nodes"]}
    )
    float32 = exported("bert-tiny", backend=backend) / "model.onnx"
    assert q["float32_graph_sha256"] == sha256_file(float32)
    assert manifest["op_counts"].get("MatMulInteger", 0) == q["quantized_products"] > 0
    assert all(n["why"].startswith("kept in float32") for n in q["float_nodes"])
    assert [t["value"] for t in manifest["taps"]] == [
        t["value"] for t in json.loads((float32.parent / "manifest.json").read_text())["taps"]
    ]


@pytest.mark.slow
def test_a_gemm_kept_in_float32_stays_float32(exported, tmp_path):
    """quantize_dynamic rewrites a Gemm as '<name>_MatMul' before it reads the exclusions (onnxruntime 1.31):
    the pooler kept in float32 must still come out float32, every other product int8."""
    source = exported("bert-tiny") / "model.onnx"
    model = onnx.load(str(source))
    groups = product_groups(model, "bert", 2)
    assert [
        model.graph.node[i].op_type for i, n in enumerate(model.graph.node) if n.name in groups["pooler"]
    ] == ["Gemm"]
    quantize(source, tmp_path / "q.onnx", groups["pooler"])
    written = onnx.load(str(tmp_path / "q.onnx"))
    integer = [n for n in written.graph.node if n.op_type == "MatMulInteger"]
    assert len(integer) == sum(len(v) for g, v in groups.items() if g != "pooler")
    assert not any("pooler" in i for n in integer for i in n.input)
    assert any(n.op_type == "MatMul" and "pooler.weight" in n.input for n in written.graph.node)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_passes_its_contract_on_every_runtime(int8_tiny, tmp_path, capsys, backend):
    _, d = int8_tiny[backend]
    before = snapshot(d)
    code, out, err, doc = run_cli(capsys, d, "--json", tmp_path / "r.json")
    assert code == 0 and err == ""
    a = doc["artifacts"][0]
    runtime_checks = [c for c in a["checks"] if c["runtime"] not in ("pytorch", "pytorch-golden")]
    assert runtime_checks and all("contract" in c and c["contract"]["failed"] == [] for c in runtime_checks)
    assert all(c["atol"] is None for c in runtime_checks)  # no rounding tolerance: the contract decides
    torch_checks = [c for c in a["checks"] if c["runtime"] in ("pytorch", "pytorch-golden")]
    assert torch_checks and all("contract" not in c and c["passed"] for c in torch_checks)  # float32 policy
    assert "(contract: " in out and snapshot(d) == before


@pytest.mark.slow
def test_int8_export_is_reproducible(int8_tiny, tmp_path):
    """Same model, seed and options in another process: byte-identical int8 artifact (search included)."""
    other = tmp_path / "again"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "qkv_onnx.export",
            "--model",
            "bert-tiny",
            "--dtype",
            "int8",
            "--out",
            str(other),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "7"},
        check=True,
        capture_output=True,
    )
    assert tree_bytes(other) == tree_bytes(int8_tiny["onnx-attention"][1])


@pytest.mark.slow
def test_a_tampered_int8_artifact_is_refused(int8_tiny, tmp_path, capsys):
    import shutil

    d = tmp_path / "t"
    shutil.copytree(int8_tiny["onnx-attention"][1], d)
    flip_byte(d / "model.onnx")
    code, _, err, _ = run_cli(capsys, d, "--no-torch")
    assert code == 2 and "sha256" in single_error_line(err)


@pytest.mark.slow
def test_editing_the_quantization_record_cannot_loosen_the_verdict(int8_tiny, tmp_path, capsys):
    """The thresholds live in code: a re-signed manifest that claims looser limits changes nothing, and one
    whose dtype says float32 is refused: an int8 graph is not what the exporter writes for float32."""
    import shutil

    d = tmp_path / "t"
    shutil.copytree(int8_tiny["onnx-attention"][1], d)
    edit_manifest(d, lambda m: m["quantization"].update(limits={"token_cosine_min": 0.0}))
    code, _, _, doc = run_cli(capsys, d, "--no-torch", "--providers", "cpu", "--json", tmp_path / "a.json")
    assert code == 0 and all(
        c["contract"]["limits"]["token_cosine_min"] == [">=", 0.95]
        for c in doc["artifacts"][0]["checks"]
        if "contract" in c
    )
    edit_manifest(d, lambda m: (m.__setitem__("dtype", "float32"), m.pop("quantization")))
    code, _, err, _ = run_cli(capsys, d, "--no-torch", "--providers", "cpu")
    assert code == 2 and "not what the exporter writes" in single_error_line(err)


# --- all-MiniLM-L6-v2: a real model, real sentences -------------------------------------------------------


def _naive_per_tensor(source, target):
    """What a user gets from `quantize_dynamic` with per-tensor weights (the ecosystem's default recipe),
    packaged and re-signed as an int8 artifact with a complete quantization record."""
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    shutil.copytree(source, target)
    quantize_dynamic(
        str(source / "model.onnx"),
        str(target / "model.onnx"),
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=False,
        weight_type=QuantType.QInt8,
    )
    rewrite(target, "model.onnx", (target / "model.onnx").read_bytes())
    save_weights_npz(target / "weights.npz", weights_of(source))  # an int8 artifact keeps its float32 source
    rehash(target, "weights.npz")
    record = {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "per_channel": False,
        "float32_graph_sha256": sha256_file(source / "model.onnx"),
        "onnxruntime": "0",
        "float_nodes": [],
        "quantized_products": 37,
    }
    edit_manifest(target, lambda m: (m.__setitem__("dtype", "int8"), m.__setitem__("quantization", record)))


def test_naive_per_tensor_int8_of_minilm_is_refused_and_fails_the_contract(exported_minilm, tmp_path, capsys):
    """Per-tensor int8 of all-MiniLM-L6-v2: not what the exporter writes (its weights are not quantized per
    channel), so qkv-validate refuses it, exit 2; and the contract would fail it anyway: on sentences the
    calibration never saw, its sentence embeddings move to a cosine of ~0.95 with the float64 model."""
    import onnxruntime as ort

    from qkv_onnx.text import tokenize
    from qkv_onnx.validate import oracle
    from qkv_onnx.validate.compare import compare_contract

    d = tmp_path / "naive"
    _naive_per_tensor(exported_minilm, d)
    code, _, err, _ = run_cli(capsys, d, "--no-torch", "--providers", "cpu")
    assert code == 2 and "not a per-channel symmetric int8 weight" in single_error_line(err)

    manifest = json.loads((d / "manifest.json").read_text())
    model = manifest["model"]
    feeds = tokenize(d / "tokenizer", read_sentences([], SENTENCES), model["config"]["max_positions"])
    inputs = [feeds[i["name"]] for i in manifest["inputs"]]
    session = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, dict(zip(feeds, inputs)))
    weights = weights_of(d)
    want = oracle.forward(model["architecture"], model["config"], model["options"], weights, inputs)
    verdict = compare_contract(got[0], want[0], feeds["attention_mask"], sentences=True).contract
    assert {"sentence_cosine_min", "similarity_deviation_max"} <= set(verdict.failed)
    assert verdict.values["sentence_cosine_min"] < 0.97


@pytest.fixture(scope="module")
def minilm_int8(tmp_path_factory):
    path = tmp_path_factory.mktemp("minilm-int8") / "minilm-l6-int8"
    try:
        return export_artifact("minilm-l6", path, dtype="int8"), path
    except Exception as e:  # the package is missing: the checkpoint fixture's own skip reason
        if "not installed" in str(e):
            pytest.skip(str(e))
        raise


@pytest.mark.slow
def test_searched_int8_of_minilm_holds_the_contract_on_unseen_sentences(minilm_int8, tmp_path, capsys):
    """The search keeps sublayers in float32 (recorded) until the contract holds on its search sentences and,
    with margin, on the held-out ones; the artifact then holds every bound on 120 sentences that neither the
    search nor the held-out check saw, tokenized and judged as one batch by qkv-validate --text-file."""
    manifest, d = minilm_int8
    q = manifest["quantization"]
    assert q["search"]["steps"][0]["float32_groups"] == [] and not q["search"]["steps"][0]["passed"]
    assert q["float_nodes"] and q["holdout"]["passed"] and q["holdout"]["sentences"] == 160
    unseen = read_sentences([], UNSEEN)
    assert len(unseen) >= 100 and not set(unseen) & set(corpus("search") + corpus("holdout"))
    code, out, err, doc = run_cli(capsys, d, "--no-torch", "--providers", "cpu", "--text-file", UNSEEN,
                                  "--json", tmp_path / "r.json")  # fmt: skip
    assert code == 0 and err == ""
    assert "int8 held-out check at export, as the manifest records it (160 held-out sentences" in out
    text = [
        c
        for c in doc["artifacts"][0]["checks"]
        if c["case"].startswith("text_") and c["reference"] == "oracle"
    ]
    values = [c["contract"]["values"] for c in text if "sentence_cosine_min" in c["contract"]["values"]]
    assert values and all(c["contract"]["failed"] == [] for c in text)
    assert min(v["sentence_cosine_min"] for v in values) >= 0.99
    assert max(v["similarity_deviation_max"] for v in values) <= 0.02


@pytest.mark.slow
def test_when_no_setting_meets_the_contract_the_export_fails_and_writes_nothing(
    tmp_path, capsys, monkeypatch
):
    """An unreachable contract (a cosine above 1): exit 1, the line says what the best setting got, no
    artifact and no temporary directory left."""
    from qkv_onnx import accuracy_contract as contract

    monkeypatch.setitem(contract.LIMITS, "token_cosine_min", (">=", 1.5))
    assert export_main(["--model", "mha", "--dtype", "int8", "--out", str(tmp_path / "art")]) == 1
    line = single_error_line(capsys.readouterr().err, "qkv-export")
    assert (
        "int8: no setting meets the accuracy contract on the search inputs; "
        "with every product in float32 it got" in line
    )
    assert "token_cosine_min 1.0000" in line and list(tmp_path.iterdir()) == []


def test_an_unknown_quantized_dtype_is_refused(tmp_path, capsys):
    assert export_main(["--model", "mha", "--dtype", "int4", "--out", str(tmp_path / "x")]) == 2
    assert "unknown dtype 'int4'" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_int8_siblings_are_judged_each_against_the_oracle_not_each_other(int8_tiny, tmp_path, capsys):
    """Two int8 artifacts of one model each hold the contract against the reference; the distance between
    them is not bounded by it (it can be twice as large), so they are not compared with each other."""
    dirs = [d for _, d in int8_tiny.values()]
    code, _, _, doc = run_cli(
        capsys, *dirs, "--no-torch", "--providers", "cpu", "--json", tmp_path / "r.json"
    )
    assert code == 0
    for a in doc["artifacts"]:
        assert not any(c["reference"].startswith("backend ") for c in a["checks"])
        assert any(n.startswith("not compared with its sibling backends") for n in a["notes"])
