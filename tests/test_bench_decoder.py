"""qkv-bench decoder: the harness runs end to end on gpt2-tiny (a transformers checkpoint exported on both
fused backends, PyTorch eager with its cache), checks every contender's greedy tokens against eager's, and
measures the attention memory of a prefill. No timing is asserted. onnxruntime-genai lives in its own
environment: its contender runs only where QKV_GENAI_PYTHON names that environment's Python."""

import json
import os
from pathlib import Path

import pytest

from qkv_onnx.benchmarks import cli
from qkv_onnx.benchmarks.decoder.contenders import _error_line

OURS = ["onnx-attention", "ort-contrib"]


@pytest.mark.slow
def test_quick_run_writes_every_row_and_checks_greedy_tokens(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["decoder", "--quick", "--genai", "none", "--no-progress", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["failures"] == [] and r["mode"] == "decoder"
    m = r["models"]["gpt2-tiny"]
    assert m["contenders"] == [*OURS, "torch eager"]
    assert m["skipped"] == {"onnxruntime-genai": "not run (--genai none)"}
    assert set(m["points"]) == {"decode b1", "decode b2", "prefill 16", "prefill 64"}
    for p in m["points"].values():
        assert p["errors"] == {} and list(p["contenders"]) == m["contenders"]
        for c in p["contenders"].values():
            assert c["summary"]["n"] == 2 and c["summary"]["median_ms"] > 0
            if p["kind"] == "decode":  # batch x steps tokens per timed run
                seconds = c["summary"]["median_ms"] / 1e3
                assert c["tokens_per_s"] == pytest.approx(p["batch"] * p["steps"] / seconds)
        assert p["contenders"]["torch eager"]["speedup_vs_eager"] == 1.0
    check = m["check"]  # the cross-check ran: each artifact's greedy tokens equal eager's
    assert (check["batch"], check["steps"]) == (2, 4) and len(check["eager_tokens"]) == 2
    assert check["by"] == {b: {"equal": True} for b in OURS}
    assert check["eager_min_margin"] > 1e-3  # no near tie: equal tokens mean equal functions
    assert {
        b: m["build"][b]["ops"].get(op)
        for b, op in zip(OURS, ["Attention", "com.microsoft::GroupQueryAttention"])
    } == {b: 2 for b in OURS}
    mem = r["memory"]
    assert (mem["model"], mem["seq"]) == ("gpt2-tiny", 256)
    assert {b: v["op"] for b, v in mem["backends"].items()} == dict(
        zip(OURS, ["Attention", "GroupQueryAttention"])
    )
    assert all(v["peak_mb"] > 0 for v in mem["backends"].values()) and mem["errors"] == {}
    assert mem["floor"]["floor"] == 6 * 256 * 128 * 4  # Q, K, V, output, present key and value (fp32)
    md = (out / "results.md").read_text()
    for row in [*OURS, "torch eager", "onnxruntime-genai"]:
        assert f"\n| {row} |" in md
    assert "tokens/s b1 | tokens/s b2 | prefill ms 16 | prefill ms 64 |" in md
    assert (
        "- greedy check: 4 greedy tokens at batch 2" in md and "onnx-attention equal, ort-contrib equal" in md
    )
    assert "## Attention memory of a 256-token prefill" in md and "| onnx-attention | Attention |" in md
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("QKV_GENAI_PYTHON"), reason="QKV_GENAI_PYTHON names no genai environment"
)
def test_genai_contender_runs_the_builders_model_and_matches_eager(tmp_path):
    out = tmp_path / "bench"
    args = [
        "decoder",
        "--quick",
        "--models",
        "llama-tiny",
        "--memory-seq",
        "0",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert cli.main([*args, "--genai-python", os.environ["QKV_GENAI_PYTHON"]]) == 0
    m = json.loads((out / "results.json").read_text())["models"]["llama-tiny"]
    assert "onnxruntime-genai" in m["contenders"] and m["check"]["by"]["onnxruntime-genai"] == {"equal": True}
    assert m["build"]["onnxruntime-genai"]["ops"]["com.microsoft::GroupQueryAttention"] == 2


def test_bad_arguments_exit_2_with_one_line(capsys):
    assert cli.main(["decoder", "--models", "bert-base"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv-bench: error: unknown decoder model 'bert-base'") and err.count("\n") == 1
    assert cli.main(["decoder", "--models", "gpt2-tiny", "--prefill", "4096"]) == 2
    assert "4096 tokens exceed gpt2-tiny's 256 positions" in capsys.readouterr().err
    assert cli.main(["decoder", "--batches", "1,x"]) == 2
    assert "bad --batches" in capsys.readouterr().err


def test_the_builders_refusal_is_reported_by_its_error_line():
    log = (
        "Traceback (most recent call last):\n  File x\n"
        "NotImplementedError: The /tmp/c model is not currently supported.\nWriting model shards: 100%\n"
    )
    assert _error_line(log, {"/tmp/c": "<checkpoint>"}) == (
        "NotImplementedError: The <checkpoint> model is not currently supported."
    )
    assert _error_line("", {}) == "no output"
    assert _error_line("a\nlast words\n", {}) == "last words"
    assert (Path(cli.__file__).parent / "decoder" / "genai_worker.py").is_file()
