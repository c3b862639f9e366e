"""Peak resident memory of one encoder layer (hidden 768, 12 heads, FFN 3072: a BERT-base layer) per backend
and sequence length, each point in its own process, next to the closed-form floor.

Child process: `python -m qkv_onnx.benchmarks.memory RUNNER MODEL SEQ THREADS` prints one JSON line.
RUNNER is `ort`
(MODEL is an .onnx file) or `torch` (MODEL is a saved state_dict). Peak = the process's high-water RSS at exit
minus its RSS after imports, read from /proc/self/status (VmHWM, VmRSS) after resetting the high-water mark
(`/proc/self/clear_refs` 5). Not getrusage's ru_maxrss: Linux carries it across fork+exec, so a child reports
its parent's peak when that is higher.
"""

import json
import subprocess
import sys
from pathlib import Path

LAYER = dict(num_layers=1, hidden_size=768, num_heads=12, ffn_size=3072)
BYTES = 4  # float32


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise OSError(f"/proc/self/status has no {field}")


def reset_peak() -> float:
    """Reset the high-water RSS to the current RSS; returns that (MiB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def floor_bytes(seq: int, batch: int = 1) -> dict:
    """What one layer cannot do without: its weights, and the largest set of live (B, L, ·) activations
    without any L×L matrix: attention keeps input, Q, K, V and its output (5·H per token), the
    feed-forward keeps input, its FFN-wide hidden and output (2·H + F). `scores` is one fp32 L×L matrix
    per head, what an attention that materializes its scores adds."""
    from ..artifact_format import weight_totals
    from ..model_defs.config import EncoderConfig

    hidden, ffn, heads = LAYER["hidden_size"], LAYER["ffn_size"], LAYER["num_heads"]
    weights = weight_totals("encoder-block", EncoderConfig(**LAYER).to_dict())[1] * BYTES
    activations = batch * seq * max(5 * hidden, 2 * hidden + ffn) * BYTES
    return {
        "weights": weights,
        "activations": activations,
        "floor": weights + activations,
        "scores": batch * heads * seq * seq * BYTES,
    }


def export_layer(directory: Path, backends: list, seed: int = 0) -> dict:
    """{backend: model.onnx path} for the layer, and 'torch': its state_dict, all with the same weights."""
    import onnx
    import torch

    from ..export.backends import export_onnx
    from ..export.fusion import check_fusion
    from ..model_defs.config import EncoderConfig
    from ..model_defs.registry import BlockLayer, init_random_weights

    module = init_random_weights(BlockLayer(EncoderConfig(**LAYER)), seed).eval()
    x, mask = torch.randn(2, 16, 768), torch.ones(2, 16, dtype=torch.int64)
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
    paths = {}
    for backend in backends:
        path = directory / f"layer-{backend}.onnx"
        graph = export_onnx(
            module,
            (x, mask),
            ["hidden_states", "attention_mask"],
            ["output"],
            ({0: batch, 1: seq}, {0: batch, 1: seq}),
            backend,
        )
        check_fusion(graph, backend, 1)
        onnx.save(graph, str(path))
        paths[backend] = path
    paths["torch"] = directory / "layer.pt"
    torch.save(module.state_dict(), paths["torch"])
    return paths


def measure(runner: str, model: str, seq: int, threads: int = 2, timeout: float = 600) -> dict:
    """Run one point in a fresh process; {'peak_mb': ...} or {'error': one line}."""
    return child_point("qkv_onnx.benchmarks.memory", [runner, model, seq, threads], timeout)


def child_point(module: str, args: list, timeout: float) -> dict:
    """`python -m module args...` in a fresh process: the JSON of its last stdout line, or {'error': one
    line} (a timeout, or its exit code and last stderr line)."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        lines = (p.stderr.strip() or f"exit code {p.returncode}").splitlines()
        return {
            "error": f"exit code {p.returncode}"
            + (" (killed: out of memory?)" if p.returncode < 0 else "")
            + f": {lines[-1][:200]}"
        }
    return json.loads(p.stdout.strip().splitlines()[-1])


def _child(runner: str, model: str, seq: int, threads: int) -> dict:
    import numpy as np

    if runner == "torch":
        import torch
    else:
        import onnxruntime  # noqa: F401  (imported before the baseline, as torch is)

        from .contenders import ort_session
    base = reset_peak()
    x = np.random.default_rng(0).standard_normal((1, seq, 768)).astype(np.float32)
    mask = np.ones((1, seq), dtype=np.int64)
    if runner == "torch":
        from ..model_defs.config import EncoderConfig
        from ..model_defs.registry import BlockLayer

        torch.set_num_threads(threads)
        module = BlockLayer(EncoderConfig(**LAYER)).eval()
        module.load_state_dict(torch.load(model, weights_only=True))
        with torch.inference_mode():
            module(torch.from_numpy(x), torch.from_numpy(mask))
    else:
        session = ort_session(Path(model), threads)
        session.run(None, {"hidden_states": x, "attention_mask": mask})
    return {"baseline_mb": base, "peak_mb": _status_mb("VmHWM") - base}


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
