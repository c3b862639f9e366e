"""The fusion check: attention must be one fused op per attention module, with nothing left unfused."""
import onnx

from . import ExportError

FUSED_ATTENTION_OPS = {"onnx-attention": ("", "Attention")}


class FusionError(ExportError):
    """Attention was not fused as the backend promises."""


def iter_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            for g in attr.graphs:
                yield from iter_nodes(g)


def count_ops(model: onnx.ModelProto) -> dict:
    """Op counts over the graph, its subgraphs and local functions, keyed 'domain::Op' ('Op' for ONNX)."""
    counts = {}
    nodes = list(iter_nodes(model.graph))
    for f in model.functions:
        nodes.extend(f.node)
    for n in nodes:
        key = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def activation_matmuls(model: onnx.ModelProto) -> list:
    """MatMuls whose both operands are computed at run time: the QKᵀ and PV products of unfused attention.

    Every legitimate MatMul in an encoder multiplies an activation by a weight (an initializer,
    or a Transpose/Cast of one).
    """
    const = {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("Constant", "Transpose", "Cast", "Identity") and all(i in const for i in n.input):
            const.update(n.output)
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and not any(i in const for i in n.input)]


def check_fusion(model: onnx.ModelProto, backend: str, expected: int) -> dict:
    """Raise FusionError unless the graph holds exactly `expected` fused attention nodes and no
    Softmax or activation-by-activation MatMul. Returns the op counts."""
    domain, op = FUSED_ATTENTION_OPS[backend]
    counts = count_ops(model)
    key = f"{domain}::{op}" if domain else op
    problems = []
    if counts.get(key, 0) != expected:
        problems.append(f"{counts.get(key, 0)} {key} nodes for {expected} attention modules")
    if counts.get("Softmax", 0):
        problems.append(f"{counts['Softmax']} Softmax nodes left outside the fused op")
    loose = activation_matmuls(model)
    if loose:
        problems.append(f"{len(loose)} activation x activation MatMul nodes (unfused QKᵀ/PV): {', '.join(loose[:4])}")
    if problems:
        raise FusionError(f"attention was not fused for backend {backend}: " + "; ".join(problems))
    return counts
