"""Validation under a memory budget (validate/budget.py): the plan's choices, the same verdict when the oracle
converts weights per read and the rebuild runs after the runtimes, a stage that cannot fit named and not run,
and no private copy left behind by a validation killed with SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import run_cli

from qkv_onnx.validate import oracle
from qkv_onnx.validate.budget import GIB, Needs, needs, parse_size, plan


@pytest.mark.parametrize(
    "text, size",
    [("16G", 16 * GIB), ("1.5GiB", 3 * GIB // 2), ("800M", 800 << 20), ("800mb", 800 << 20), ("123", 123)],
)
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "12X", "-1G", "0", "1.5.2G", "12ib"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError):
        parse_size(text)


NEEDS = Needs(main=1 * GIB, oracle64=2 * GIB, session=3 * GIB, rebuild=5 * GIB)  # all at once: 11 GiB


@pytest.mark.parametrize(
    "budget, cached, rebuild, sessions",
    [
        (None, True, "beside", None),  # no budget: everything at once
        (11 * GIB, True, "beside", None),
        (10 * GIB, False, "beside", None),  # the oracle's float64 weights go first
        (6 * GIB, True, "after", None),  # then the rebuild waits for the runtimes
        (5.5 * GIB, False, "skip", None),  # then it does not run (the exporter alone needs 6)
        (3.5 * GIB, False, "skip", 0),  # and a runtime that cannot fit beside the validator is not run
    ],
)
def test_the_plan_gives_up_speed_before_stages(budget, cached, rebuild, sessions):
    p = plan(NEEDS, budget, runtimes=1, rebuild=True)
    assert (p.oracle_cached, p.rebuild, p.sessions) == (cached, rebuild, sessions)
    assert budget is None or p.notes[0].startswith("memory plan: budget")


def test_a_second_runtime_that_does_not_fit_is_the_one_left_out():
    p = plan(NEEDS, 7.5 * GIB, runtimes=2, rebuild=False)
    assert p.sessions is None and p.rebuild == "skip"  # both fit
    p = plan(NEEDS, 5 * GIB, runtimes=2, rebuild=False)
    assert p.sessions == 1 and any("1 of 2 runtime(s) not run" in n for n in p.notes)


def test_the_oracle_per_read_computes_the_same_bits(exported):
    """Float64Weights converts on each read what as_float64 converts once: the same float64 values."""
    from qkv_onnx.validate.artifact import load_artifact

    artifact = load_artifact(exported("llama-tiny"), rebuild=False)
    try:
        m = artifact.manifest
        inputs = [x for x in artifact.golden[0][0]]
        once, per_read = (
            oracle.forward(m["model"]["architecture"], m["model"]["config"], {}, w, inputs)
            for w in (oracle.as_float64(artifact.weights), oracle.as_float64(artifact.weights, lazy=True))
        )
        assert all(np.array_equal(a, b) for a, b in zip(once, per_read, strict=True))
    finally:
        artifact.close()


def _budget(artifact_dir, pick) -> str:
    """A --max-memory between the plan's thresholds for this artifact, in bytes."""
    from qkv_onnx.validate.rebuild import rebuild_stitched

    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    return str(int(pick(needs(manifest, 256, rebuild_stitched(manifest)))))


def test_under_a_small_budget_the_verdict_is_the_same(exported, tmp_path, capsys, monkeypatch):
    """A budget too small for the float64 weights and the rebuild beside the runtime: the oracle converts per
    read, the rebuild starts only once the runtime has closed, and the artifact still passes with its graph
    rebuilt (the order of events and the per-read weights observed, not only the plan's line)."""
    import qkv_onnx.validate.artifact as artifact_module
    from qkv_onnx.validate.sandbox import SandboxedRuntime

    events = []
    pending, close, lazy = (
        artifact_module.PendingRebuild,
        SandboxedRuntime.close,
        oracle.Float64Weights.__init__,
    )

    class Watched(pending):
        def start(self):
            events.append("rebuild starts")
            super().start()

    def closing(self):
        events.append("runtime closes")
        close(self)

    def per_read(self, weights):
        events.append("per-read weights")
        lazy(self, weights)

    monkeypatch.setattr(artifact_module, "PendingRebuild", Watched)
    monkeypatch.setattr(SandboxedRuntime, "close", closing)
    monkeypatch.setattr(oracle.Float64Weights, "__init__", per_read)
    art = exported("llama-tiny")
    for pick, changed in (
        (lambda n: n.main + n.rebuild + 1, "runs after the runtimes close"),  # the rebuild fits alone only
        (lambda n: n.main + n.largest + n.session + n.rebuild + 1, "float64 per read"),  # not the cache
    ):
        events.clear()
        code, out, _, doc = run_cli(
            capsys,
            art,
            "--providers",
            "cpu",
            "--max-memory",
            _budget(art, pick),
            "--json",
            tmp_path / "r.json",
        )
        (report,) = doc["artifacts"]
        assert code == 0, out
        assert changed in "\n".join(report["notes"])
        assert "byte-identical to the exporter's rebuild" in report["graph_check"]
        if changed == "float64 per read":
            assert "per-read weights" in events
        else:
            assert events.index("runtime closes") < events.index("rebuild starts")


def test_a_stage_that_cannot_fit_is_named_and_not_run(exported, tmp_path, capsys):
    """A budget below a runtime's needs: no runtime runs and no rebuild, each said in a line; the verdict is
    NOT JUDGED (exit 4), never a pass."""
    art = exported("llama-tiny")
    budget = _budget(art, lambda n: n.main + n.session / 2)
    code, out, _, doc = run_cli(
        capsys, art, "--providers", "cpu", "--max-memory", budget, "--json", tmp_path / "r.json"
    )
    (report,) = doc["artifacts"]
    notes = "\n".join(report["notes"])
    assert code == 4, out
    assert "1 of 1 runtime(s) not run" in notes and "rebuild not run" in notes
    assert "structural contract" in report["graph_check"]


def test_max_memory_must_be_a_size(exported, capsys):
    code, _, err, _ = run_cli(capsys, exported("llama-tiny"), "--max-memory", "lots")
    assert code == 2 and "--max-memory: not a size: 'lots'" in err


def _private_copies(tmp: str) -> list:
    return [d for d in os.listdir(tmp) if d.startswith("qkv-validate-")]


def test_a_validation_killed_with_sigkill_leaves_no_private_copy(exported, tmp_path):
    """SIGKILL while the artifact is being judged: its watchdog removes the private copy."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    cmd = [sys.executable, "-m", "qkv_onnx.validate", str(exported("llama-tiny")), "--providers", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any((tmp / d / "artifact").is_dir() for d in _private_copies(tmp)):
            assert proc.poll() is None and time.monotonic() < deadline, "no private copy appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while _private_copies(tmp) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _private_copies(tmp) == []
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.real_rebuild
def test_the_rebuild_hashes_external_data_and_still_catches_a_changed_byte(
    exported_external, tmp_path, capsys
):
    """The rebuild's model.onnx.data is hashed, not stored (no second copy on disk): a re-signed artifact
    whose side file holds bytes the exporter does not write (past every tensor: no weight changes) is still
    refused, naming the file. A flipped byte inside a tensor is a changed weight, so a changed model: the
    golden data, the PyTorch outputs of the weights exported, fail it (exit 1)."""
    import shutil

    from helpers import rewrite

    d = tmp_path / "art"
    shutil.copytree(exported_external, d)
    data = (d / "model.onnx.data").read_bytes()
    rewrite(d, "model.onnx.data", data + bytes(16))
    code, _, err, _ = run_cli(capsys, d, "--providers", "cpu")
    assert code == 2 and "model.onnx.data': not the bytes the exporter writes" in err, err
    flipped = bytearray(data)
    flipped[len(data) // 2 // 4 * 4 + 3] ^= 0x40  # the exponent of a float32 weight: 2^+-128 times
    rewrite(d, "model.onnx.data", bytes(flipped))
    code, out, err, _ = run_cli(capsys, d, "--providers", "cpu")
    assert code == 1 and err == "" and "golden" in out, err


def test_a_full_disk_is_the_machines_problem_not_the_artifacts():
    """ENOSPC in a sandboxed step (the rebuild writing its graph) is read as the environment's: the structural
    contract judges instead, and the artifact is never called invalid for it."""
    import errno

    from qkv_onnx.validate.sandbox import _kind

    assert _kind(OSError(errno.ENOSPC, "No space left on device")) == "environment"
    assert _kind(OSError(errno.EACCES, "Permission denied")) == "error"


def test_the_largest_weight_is_read_from_one_block_without_the_layers():
    """largest_weight (the per-read oracle's largest float64 tensor) agrees with the enumeration of every
    parameter, for a decoder and an encoder."""
    import math

    from qkv_onnx.artifact_format import expected_weights, largest_weight
    from qkv_onnx.model_defs.registry import get_model

    for name in ("llama-tiny", "gpt2-tiny", "bert-tiny"):
        spec = get_model(name)
        cfg = spec.config.to_dict()
        every = max(math.prod(s) for s in expected_weights(spec.architecture, cfg).values())
        assert largest_weight(spec.architecture, cfg) == every
