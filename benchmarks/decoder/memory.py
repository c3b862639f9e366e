"""Peak memory of one decoder attention at a long prefill, against its O(L·d) floor.

The graph measured is one node cut from a decoder artifact that qkv-export wrote: layer 0's fused attention
op (ONNX `Attention` with its cache inputs and outputs, or com.microsoft `GroupQueryAttention`), alone, its
inputs what the artifact's graph feeds it: query, key and value, the empty cache of a prefill, and the mask as
the graph builds it (a (1, 1, L, L) boolean for `Attention`; for `GroupQueryAttention` the additive
(1, 1, L, L) float32 bias, `seqlens_k` and the total length). No projections, feed-forward or LM head: what is
left is what the backend does with the sequence.

Child process: `python -m qkv_onnx.benchmarks.decoder.memory GRAPH.onnx SEQ THREADS` prints one JSON line.
GRAPH.json beside it gives each input's shape with `L` for the sequence. Peak = the high-water RSS after the
run minus the RSS once the session exists (its baseline), the high-water mark reset first
(benchmarks/memory.py); the inputs are made after the baseline, so they count, as the floor counts them.
"""

import json
import sys
from pathlib import Path

from ...decoder_format import head_dim, kv_heads

BYTES = 4  # float32
FUSED = ("Attention", "GroupQueryAttention")


def cut_attention(model_path: Path, out: Path, cfg: dict) -> dict:
    """Write layer 0's fused attention node of the artifact at `model_path`, alone, to `out` (and `out`.json:
    each input's shape with 'L' for the sequence, its dtype and how to fill it); returns that spec."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path), load_external_data=False)
    fused = next(n for n in model.graph.node if n.op_type in FUSED and "present.0.key" in n.output)
    heads, kv, d = cfg["num_heads"], kv_heads(cfg), head_dim(cfg)
    past = [[1, kv, 0, d], "float32", "zeros"]
    if fused.op_type == "Attention":  # q, k, v (B, heads, L, d); the boolean mask (B, 1, L, L); the cache
        roles = [
            [[1, heads, "L", d], "float32", "normal"],
            [[1, kv, "L", d], "float32", "normal"],
            [[1, kv, "L", d], "float32", "normal"],
            [[1, 1, "L", "L"], "bool", "causal"],
            past,
            past,
        ]
    else:  # q, k, v (B, L, heads * d); the cache; seqlens_k, total; cos, sin, positions unused; the bias
        roles = [
            [[1, "L", heads * d], "float32", "normal"],
            [[1, "L", kv * d], "float32", "normal"],
            [[1, "L", kv * d], "float32", "normal"],
            past,
            past,
            [[1], "int32", "last"],
            [[], "int32", "total"],
            None,
            None,
            None,
            [[1, 1, "L", "L"], "float32", "causal_bias"],
        ]
    types = {"float32": TensorProto.FLOAT, "bool": TensorProto.BOOL, "int32": TensorProto.INT32}
    spec, inputs = {}, []
    for name, role in zip(fused.input, roles):
        if not name:
            continue
        shape, dtype, fill = role
        spec[name] = {"shape": shape, "dtype": dtype, "fill": fill}
        inputs.append(helper.make_tensor_value_info(name, types[dtype], [str(x) for x in shape]))
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in fused.output[:3]]
    graph = helper.make_graph([fused], "attention0", inputs, outputs)
    onnx.save(
        helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version),
        str(out),
    )
    described = {"op": fused.op_type, "inputs": spec}
    out.with_suffix(".json").write_text(json.dumps(described))
    return described


def floor_bytes(seq: int, cfg: dict) -> dict:
    """What one attention over L tokens cannot do without (batch 1, float32): Q, K, V, its output and the
    cache it returns (present key and value), O(L·d); beside it the L×L terms a graph may add."""
    heads, kv, d = cfg["num_heads"], kv_heads(cfg), head_dim(cfg)
    q = out = seq * heads * d * BYTES
    k = v = present_k = present_v = seq * kv * d * BYTES
    return {
        "floor": q + k + v + out + present_k + present_v,
        "scores": heads * seq * seq * BYTES,  # one fp32 L×L per head: a materialized score matrix
        "mask_bool": seq * seq,  # the (B, 1, L, L) boolean mask the graph builds
        "bias_fp32": seq * seq * BYTES,  # GroupQueryAttention's additive (B, 1, L, L) bias
    }


def measure(graph: Path, seq: int, threads: int = 2, timeout: float = 600) -> dict:
    """Run one point in a fresh process: {'peak_mb', 'baseline_mb'} or {'error': one line}."""
    from ..memory import child_point

    return child_point("qkv_onnx.benchmarks.decoder.memory", [graph, seq, threads], timeout)


def _causal(seq: int, dtype, allowed, blocked):
    """(1, 1, L, L) `allowed` on and below the diagonal, `blocked` above, filled in blocks of rows: no L×L
    temporary beside it (a temporary would count in the peak)."""
    import numpy as np

    out = np.empty((1, 1, seq, seq), dtype)
    cols = np.arange(seq)
    for start in range(0, seq, 256):
        rows = np.arange(start, min(start + 256, seq))[:, None]
        out[0, 0, start : start + 256] = np.where(cols[None, :] <= rows, allowed, blocked)
    return out


def _child(graph: str, seq: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime  # noqa: F401  (imported before the baseline)

    from ..contenders import ort_session
    from ..memory import _status_mb, reset_peak

    spec = json.loads(Path(graph).with_suffix(".json").read_text())["inputs"]
    session = ort_session(Path(graph), threads)
    base = reset_peak()
    rng = np.random.default_rng(0)
    feeds = {}
    for name, s in spec.items():
        dims = [seq if x == "L" else x for x in s["shape"]]
        if s["fill"] == "normal":
            feeds[name] = rng.standard_normal(dims, dtype=np.float32)
        elif s["fill"] == "zeros":
            feeds[name] = np.zeros(dims, np.float32)
        elif s["fill"] == "causal":
            feeds[name] = _causal(seq, np.bool_, True, False)
        elif s["fill"] == "causal_bias":
            feeds[name] = _causal(seq, np.float32, 0, np.finfo(np.float32).min)
        elif s["fill"] == "last":
            feeds[name] = np.array([seq - 1], np.int32)
        else:  # total
            feeds[name] = np.array(seq, np.int32)
    outputs = session.run(None, feeds)
    shapes = [list(o.shape) for o in outputs]
    return {"baseline_mb": base, "peak_mb": _status_mb("VmHWM") - base, "output_shapes": shapes}


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
