"""The machine's fp32 GEMM ceiling through ONNX Runtime: one MatMul node, timed like the contenders."""

from pathlib import Path

import numpy as np

from .contenders import ort_session
from .flops import gemm_flops


def matmul_model(path: Path, m: int, k: int, n: int, seed: int = 0) -> Path:
    """`y = x @ W`: x (m, k) an input, W (k, n) a weight, as a Linear layer's MatMul in the exported
    graphs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def gemm_contenders(directory: Path, shapes: list, threads: int) -> dict:
    """{'gemm MxKxN': callable} for each (m, k, n)."""
    out = {}
    for m, k, n in shapes:
        session = ort_session(matmul_model(directory / f"gemm-{m}x{k}x{n}.onnx", m, k, n), threads)
        x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
        out[f"gemm {m}x{k}x{n}"] = lambda s=session, x=x: s.run(None, {"x": x})
    return out


def gemm_rates(summaries: dict, shapes: list) -> dict:
    """{'gemm MxKxN': GFLOP/s at the median} and 'ceiling': the best of them."""
    rates = {
        f"gemm {m}x{k}x{n}": gemm_flops(m, k, n) / (summaries[f"gemm {m}x{k}x{n}"]["median_ms"] * 1e6)
        for m, k, n in shapes
    }
    return {
        "shapes": rates,
        "ceiling_gflops": max(rates.values()),
        "ceiling_shape": max(rates, key=rates.get),
    }
