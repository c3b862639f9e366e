"""A decoder's KV cache written into its fused attention ops.

The dynamo exporter writes `torch.cat([past, new])` then SDPA as a Concat feeding the ONNX `Attention` op,
whose output is also the graph's `present`. `fold_cache` moves each such pair of Concats into the op's own
`past_key`/`past_value` inputs and `present_key`/`present_value` outputs (opset 23), so the op reads the cache
itself. `to_group_query_attention` then writes each folded op as ONNX Runtime's com.microsoft
GroupQueryAttention: it takes query/key/value as (batch, seq, heads * head_dim), the cache as
(batch, kv_heads, past, head_dim), masks causally from the end of the cache by itself (every row's
`seqlens_k` is total - 1: no right padding), and the padding mask comes in as an additive `attention_bias`
(0 or the dtype's lowest finite value, so a row with no key gives no NaN; the graph's own "no key -> 0"
Where follows).
"""

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..artifact_format import STANDARD_DOMAINS, np_dtype
from ..errors import ExportError

INT32 = TensorProto.INT32


def _producers(graph) -> dict:
    return {o: n for n in graph.node for o in n.output}


def fold_cache(model: onnx.ModelProto) -> int:
    """Fold every Concat(past graph input, new) feeding an Attention's K and V into the op; returns how many
    ops were folded."""
    g = model.graph
    inputs, made = {i.name for i in g.input}, _producers(g)
    folded = []
    for n in g.node:
        if n.op_type != "Attention" or n.domain not in STANDARD_DOMAINS or len(n.input) > 4:
            continue
        cats = [made.get(x) for x in n.input[1:3]]
        if not all(
            c is not None and c.op_type == "Concat" and len(c.input) == 2 and c.input[0] in inputs
            for c in cats
        ):
            continue
        q, mask = n.input[0], n.input[3] if len(n.input) > 3 else ""
        (ck, cv), y = cats, n.output[0]
        n.ClearField("input")
        n.input.extend([q, ck.input[1], cv.input[1], mask, ck.input[0], cv.input[0]])
        n.ClearField("output")
        n.output.extend([y, ck.output[0], cv.output[0]])
        folded += [ck, cv]
    for c in folded:
        g.node.remove(c)
    return len(folded) // 2


def cap_scores(model: onnx.ModelProto, cap: float) -> None:
    """Set every folded ONNX Attention's `softcap` (scores become cap * tanh(score / cap)): the module traced
    SDPA for it (MultiHeadAttention.fused_softcap). 0: no cap, as the exporter wrote."""
    if not cap:
        return
    for n in model.graph.node:
        if n.op_type == "Attention" and n.domain in STANDARD_DOMAINS:
            for a in n.attribute:
                if a.name == "softcap":
                    n.attribute.remove(a)
                    break
            n.attribute.append(helper.make_attribute("softcap", float(cap)))


def _gqa_options(attention: onnx.NodeProto, window: int | None) -> dict:
    """GroupQueryAttention's attributes for an ONNX Attention's scale and softcap (where set) and a window."""
    out = {a.name: a.f for a in attention.attribute if a.name in ("scale", "softcap") and a.f}
    return {**out, "local_window_size": window} if window else out


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name))


def to_group_query_attention(
    model: onnx.ModelProto, num_heads: int, kv_heads: int, dtype: str, windows: list | None = None
) -> int:
    """Write every folded ONNX Attention as com.microsoft GroupQueryAttention, with its scale and softcap and,
    for the N-th (layer N's), `local_window_size` windows[N] (a sliding layer's keys: its padding bias holds
    the window too); returns how many."""
    g = model.graph
    lowest = np.array(ml_dtypes.finfo(np_dtype(dtype)).min, dtype=np_dtype(dtype))
    nodes, count = [], 0
    for n in g.node:
        if n.op_type != "Attention" or n.domain not in STANDARD_DOMAINS:
            nodes.append(n)
            continue
        if len(n.input) != 6 or len(n.output) < 3:
            raise ExportError(f"{n.name}: an Attention without its cache cannot become GroupQueryAttention")
        q, k, v, mask, past_k, past_v = n.input
        p = f"{n.name}/gqa"
        new = [
            _const(f"{p}/perm_shape", np.array([0, 0, -1], np.int64)),
            _const(f"{p}/zero", np.array(0, np_dtype(dtype))),
            _const(f"{p}/lowest", lowest),
            _const(f"{p}/one", np.array([1], np.int64)),
        ]
        flat = []
        for x in (q, k, v):
            new += [
                helper.make_node("Transpose", [x], [f"{p}/{x}/bsnh"], name=f"{p}/{x}/T", perm=[0, 2, 1, 3]),
                helper.make_node(
                    "Reshape", [f"{p}/{x}/bsnh", f"{p}/perm_shape"], [f"{p}/{x}/bsd"], name=f"{p}/{x}/R"
                ),
            ]
            flat.append(f"{p}/{x}/bsd")
        new += [
            helper.make_node("Where", [mask, f"{p}/zero", f"{p}/lowest"], [f"{p}/bias"], name=f"{p}/bias"),
            helper.make_node("Shape", [mask], [f"{p}/total64"], name=f"{p}/total64", start=3, end=4),
            helper.make_node("Shape", [q], [f"{p}/batch"], name=f"{p}/batch", start=0, end=1),
            helper.make_node("Sub", [f"{p}/total64", f"{p}/one"], [f"{p}/last64"], name=f"{p}/last64"),
            helper.make_node("Expand", [f"{p}/last64", f"{p}/batch"], [f"{p}/lens64"], name=f"{p}/lens64"),
            helper.make_node(
                "Cast", [f"{p}/lens64"], [f"{p}/seqlens_k"], name=f"{p}/seqlens", to=TensorProto.INT32
            ),
            helper.make_node(
                "Cast", [f"{p}/total64"], [f"{p}/total1"], name=f"{p}/total1", to=TensorProto.INT32
            ),
            helper.make_node("Squeeze", [f"{p}/total1"], [f"{p}/total"], name=f"{p}/total"),
            helper.make_node(
                "GroupQueryAttention",
                [*flat, past_k, past_v, f"{p}/seqlens_k", f"{p}/total", "", "", "", f"{p}/bias"],
                [f"{p}/out", n.output[1], n.output[2]],
                name=p,
                domain="com.microsoft",
                num_heads=num_heads,
                kv_num_heads=kv_heads,
                **_gqa_options(n, windows[count] if windows else None),
            ),
            _const(f"{p}/heads_shape", np.array([0, 0, num_heads, -1], np.int64)),
            helper.make_node("Reshape", [f"{p}/out", f"{p}/heads_shape"], [f"{p}/out4"], name=f"{p}/out4"),
            helper.make_node("Transpose", [f"{p}/out4"], [n.output[0]], name=f"{p}/y", perm=[0, 2, 1, 3]),
        ]
        nodes += new
        count += 1
    g.ClearField("node")
    g.node.extend(nodes)
    if count and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count
