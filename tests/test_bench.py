"""qkv-bench: the harness runs end to end on a tiny model and writes well-formed results. No timing is
asserted."""

import json
import struct

import pytest

from qkv_onnx.benchmarks import cli
from qkv_onnx.benchmarks.flops import bert_flops
from qkv_onnx.benchmarks.pipeline_cost import StageClock
from qkv_onnx.benchmarks.timing import interleaved, summarize
from qkv_onnx.stages import listening, stage


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One quick run: bert-tiny, two backends, the peer, one point, one memory length, profiles, pipeline."""
    out = tmp_path_factory.mktemp("bench")
    code = cli.main(
        [
            "--model",
            "bert-tiny",
            "--quick",
            "--points",
            "1x16",
            "--backends",
            "onnx-attention,ort-contrib",
            "--memory-seqs",
            "64",
            "--profile",
            "--int8",
            "onnx-attention",
            "--openvino",
            "f32",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    return code, out


@pytest.mark.slow
def test_end_to_end_writes_json_markdown_and_plots(bench_run):
    code, out = bench_run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["failures"] == []
    (point,) = results["latency"]
    assert (point["batch"], point["seq"]) == (1, 16)
    int8 = {"onnx-attention int8", "peer int8 (Optimum avx512_vnni)"}
    floats = {"onnx-attention", "ort-contrib", "ort-contrib (again)", "peer ort-transformers", "torch eager"}
    assert set(point["contenders"]) == floats | int8 | {"openvino f32 (onnx-attention)"}
    for name, c in point["contenders"].items():
        assert c["summary"]["n"] == 3 and len(c["samples_ms"]) == 3
        assert c["summary"]["p10_ms"] <= c["summary"]["median_ms"] <= c["summary"]["p90_ms"]
        if name != "torch eager" and name not in int8:
            assert c["max_abs_vs_eager"] < 1e-4  # the race is the same function
    accuracy = results["accuracy"]["contenders"]
    assert set(accuracy) == set(point["contenders"]) - {"ort-contrib (again)"}
    for name, a in accuracy.items():  # judged against the float64 oracle by the contract
        assert a["contract"] is True and 0 <= a["relative_error"] < (0.2 if name in int8 else 1e-5), (name, a)
    assert point["noise"]["of"] == "ort-contrib" and point["noise"]["ratio"] > 0
    assert results["gemm"]["ceiling_gflops"] > 0 and point["gemm"]["ceiling_gflops"] > 0
    assert set(point["gemm"]["shapes"]) == {
        "gemm 16x128x512",
        "gemm 64x128x256",
    }  # the FFN shape, the fixed one
    assert results["peer"]["fused_ops"]["Attention"] == 2
    (mem,) = results["memory"]["points"]
    assert set(mem["peak_mb"]) == {"onnx-attention", "ort-contrib", "torch eager"}
    assert all(v > 0 for v in mem["peak_mb"].values())
    assert mem["floor"]["floor"] == mem["floor"]["weights"] + mem["floor"]["activations"]
    pipe = results["pipeline"]
    assert pipe["export"]["exit_code"] == 0 and pipe["validate"]["exit_code"] == 0
    assert set(pipe["export"]["stages_s"]) >= {
        "torch.onnx.export (dynamo)",
        "fusion check",
        "write golden data",
    }
    assert set(pipe["validate"]["stages_s"]) >= {
        "rebuild model.onnx (exporter)",
        "NumPy float64 oracle",
        "ORT CPU runs",
    }
    profiled = ("onnx-attention", "ort-contrib", "peer ort-transformers", *sorted(int8))
    assert set(results["profiles"]) == {f"{n} 1x16" for n in profiled}
    assert abs(sum(results["profiles"]["ort-contrib 1x16"].values()) - 1) < 1e-6
    assert [t["met"] for t in results["targets"]] in (
        [True],
        [False],
    )  # the pipeline target; others need bert-base points
    md = (out / "results.md").read_text()
    for heading in (
        "## GEMM rate",
        "GEMM in the same rounds",
        "## Latency",
        "## Peak memory",
        "## Pipeline cost",
        "## Targets",
        "## Speed and accuracy",
        "| torch eager |",
    ):
        assert heading in md
    for png in ("latency.png", "memory.png", "accuracy.png"):
        head = (out / png).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", head[16:24])[0] > 100  # width


def test_flop_count_matches_torch_flop_counter():
    """The closed form against torch's FlopCounterMode over the same forward (SDPA as its math kernel, so
    QKᵀ and P·V appear as bmm)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from qkv_onnx.model_defs.config import EncoderConfig
    from qkv_onnx.model_defs.encoder import BertModel
    from qkv_onnx.model_defs.registry import init_random_weights

    cfg = EncoderConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_size=96, vocab_size=50)
    module = init_random_weights(BertModel(cfg), 0).eval()
    ids = torch.randint(0, 50, (3, 11))
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        module(ids, torch.zeros_like(ids), torch.ones_like(ids))
    assert bert_flops(cfg, 3, 11)["total"] == counter.get_total_flops()


def test_flop_count_bert_base_by_hand():
    from qkv_onnx.model_defs.config import PRESETS

    f = bert_flops(PRESETS["bert-base"], 1, 128)
    assert f["attention"] == 12 * 4 * 128 * 128 * 768
    assert f["projections"] + f["ffn"] == 12 * 2 * 128 * (4 * 768 * 768 + 2 * 768 * 3072)
    assert f["total"] == f["projections"] + f["ffn"] + f["attention"] + 2 * 768 * 768


def test_rounds_rotate_and_summary():
    order = []
    contenders = {n: (lambda n=n: order.append(n)) for n in "abc"}
    times = interleaved(contenders, warmup=1, rounds=3)
    assert order[:3] == list("abc") and order[3:] == list("abcbcacab")
    assert all(len(v) == 3 for v in times.values())
    s = summarize([0.001, 0.002, 0.003, 0.004])
    assert s["median_ms"] == pytest.approx(2.5) and s["min_ms"] == pytest.approx(1.0)


def test_stage_clock_times_are_exclusive():
    """Stages announced with qkv_onnx.stages.stage reach the clock; an inner stage's time is not its caller's.
    (Only lower bounds on sleeps are asserted, never an upper bound on wall time.)"""
    import time

    clock = StageClock()
    with listening(clock):
        with stage("outer"):
            time.sleep(0.01)
            with stage("inner"):
                time.sleep(0.05)
        with stage("inner"):
            pass
    assert clock.totals["inner"] >= 0.05 and clock.totals["outer"] >= 0.01
    assert set(clock.totals) == {"inner", "outer"}
    with stage("unheard"):  # no listener: nothing recorded anywhere
        pass
    assert "unheard" not in clock.totals


def test_progress_names_each_stage_once_and_the_slow_runs():
    """--progress: a stage's name the first time it starts, then only a run of it that took a second or more
    (a validation runs its per-case stages hundreds of times)."""
    import io
    import time

    from qkv_onnx.stages import progress

    out = io.StringIO()
    with listening(progress("prog", out)):
        for _ in range(3):
            with stage("quick"):
                pass
        with stage("slow"):
            time.sleep(1.0)
    lines = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines[:2] == ["quick", "slow"] and lines[2].startswith("slow: took 1.") and len(lines) == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--points", "1y128"], "bad point '1y128'"),
        (["--points", "0x128"], "bad point '0x128'"),
        (["--model", "gpt-9"], "unknown model 'gpt-9'"),
        (["--backends", "onnx-attention,fast"], "unknown backend 'fast'"),
        (["--points", "1x1024"], "exceeds bert-base's 512 positions"),
        (["--memory-seqs", "512,x"], "bad --memory-seqs"),
        (
            ["--twin", "decomposed", "--backends", "onnx-attention"],
            "--twin 'decomposed' is not one of --backends",
        ),
        (["--rounds", "0"], "--rounds"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys, tmp_path):
    assert cli.main(argv + ["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv-bench: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_missing_dependency_exits_2(monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    assert cli.main(["--quick", "--out", str(tmp_path / "r")]) == 2
    assert "transformers is not installed (--no-peer, or pip install '.[bench]')" in capsys.readouterr().err
