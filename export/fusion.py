"""The fusion check: attention must be one fused op per attention module (none for `decomposed`)."""

from collections import Counter

import onnx

from ..artifact_format import BACKENDS, all_nodes, every_attention_op, op_key
from ..errors import ExportError


class FusionError(ExportError):
    """Attention was not fused as the backend promises."""


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op counts over the graph, its subgraphs and local functions, keyed 'domain::Op' ('Op' for ONNX)."""
    return dict(sorted(Counter(op_key(n.domain, n.op_type) for n in all_nodes(model)).items()))


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls whose both operands are computed at run time: the QKᵀ and PV products of unfused attention.

    Every legitimate MatMul in an encoder multiplies an activation by a weight (an initializer,
    or a Transpose/Cast of one).
    """
    const = {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("Constant", "Transpose", "Cast", "Identity") and all(i in const for i in n.input):
            const.update(n.output)
    return [
        n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in const for i in n.input)
    ]


def check_fusion(
    model: onnx.ModelProto, backend: str, expected: int, architecture: str = "attention"
) -> dict[str, int]:
    """Raise FusionError unless the graph's attention is what `backend` promises for `expected`
    attention modules; returns the op counts.

    Fused backends: exactly `expected` fused attention nodes, no Softmax, no activation x activation
    MatMul. `decomposed`: no fused attention node of any kind and one Softmax per module.
    """
    counts = count_ops(model)
    own = [op_key(*op) for op in BACKENDS[backend].for_architecture(architecture).attention_ops]
    every = every_attention_op()
    problems = []
    stray = {k: counts[k] for k in sorted(every - set(own)) if counts.get(k)}
    if stray:
        problems.append(f"attention ops of another backend: {stray}")
    if own:
        fused = sum(counts.get(k, 0) for k in own)
        if fused != expected:
            problems.append(f"{fused} {'/'.join(own)} nodes for {expected} attention modules")
        if counts.get("Softmax", 0):
            problems.append(f"{counts['Softmax']} Softmax nodes left outside the fused op")
        loose = activation_matmuls(model)
        if loose:
            problems.append(
                f"{len(loose)} activation x activation MatMul nodes (unfused QKᵀ/PV): {', '.join(loose[:4])}"
            )
    elif counts.get("Softmax", 0) != expected:
        problems.append(f"{counts.get('Softmax', 0)} Softmax nodes for {expected} attention modules")
    if problems:
        raise FusionError(f"attention is not as backend {backend} promises: " + "; ".join(problems))
    return counts
