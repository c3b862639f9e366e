"""Runtimes that compute one layer wrong: ONNX Runtime CPU on a private copy of the graph with a fault planted
at layer QKV_FAULT_LAYER (0-based; unset: the runtimes say they cannot run here, so `--providers auto`
leaves them out). The faults, as a broken kernel or a bad conversion would make them:

- faulty-weight: one column of layer k's first feed-forward weight is perturbed (diverges at "layer k block");
- faulty-mask:   layer k's attention mask is inverted (diverges at "layer k attention");
- faulty-scale:  layer k's attention scores are scaled by 2 (diverges at "layer k attention").

Layer k is the k-th attention op (or Softmax, for the decomposed backend) in graph order, and the k-th
feed-forward MatMul: the graph alone says where, in every backend's form.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qkv_onnx.validate.runtimes.ort import OrtCpu

ENV = "QKV_FAULT_LAYER"
ATTENTION_OPS = {("", "Attention"), ("com.microsoft", "Attention"), ("com.microsoft", "MultiHeadAttention")}


def _layer() -> int | None:
    value = os.environ.get(ENV)
    return int(value) if value is not None and value.isdigit() else None


def _kth(nodes: list, k: int, what: str):
    if k >= len(nodes):
        raise ValueError(f"the graph has {len(nodes)} {what}, no layer {k}")
    return nodes[k]


def _attention_nodes(model: onnx.ModelProto) -> list:
    fused = [n for n in model.graph.node if (n.domain, n.op_type) in ATTENTION_OPS]
    return fused or [n for n in model.graph.node if n.op_type == "Softmax"]


def _constant(model: onnx.ModelProto, name: str, value: np.ndarray) -> str:
    model.graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _float_dtype(model: onnx.ModelProto) -> np.dtype:
    return helper.tensor_dtype_to_np_dtype(model.graph.output[0].type.tensor_type.elem_type)


def plant_weight(model: onnx.ModelProto, k: int) -> None:
    inits = {i.name: i for i in model.graph.initializer if len(i.dims) == 2}
    ffn = [
        n
        for n in model.graph.node
        if n.op_type == "MatMul"
        and n.input[1] in inits
        and inits[n.input[1]].dims[1] > inits[n.input[1]].dims[0]
    ]  # (hidden, ffn): it widens
    weight = inits[_kth(ffn, k, "feed-forward MatMuls").input[1]]
    w = numpy_helper.to_array(weight).copy()
    w[:, 0] += np.asarray(0.5, dtype=w.dtype)
    weight.CopyFrom(numpy_helper.from_array(w, weight.name))


def plant_mask(model: onnx.ModelProto, k: int) -> None:
    node = _kth(_attention_nodes(model), k, "attention ops")
    dtype = _float_dtype(model)
    if node.op_type == "Softmax":  # decomposed: Softmax(Add(scores, mask bias))
        node, index = next(n for n in model.graph.node if node.input[0] in n.output), 1
    else:  # ONNX Attention: attn_mask; com.microsoft Attention / MultiHeadAttention: attention_bias
        index = 3 if node.domain == "" else 5
    mask = node.input[index]
    flipped = f"{mask}_inverted_at_layer_{k}"
    if node.op_type == "Attention" and node.domain == "":  # boolean, True = attend
        model.graph.node.append(helper.make_node("Not", [mask], [flipped]))
    else:  # additive: 0 where attended, a large negative value where masked
        zero = _constant(model, f"{flipped}_zero", np.zeros((), dtype))
        low = _constant(model, f"{flipped}_low", np.asarray(np.finfo(dtype).min, dtype))
        model.graph.node.extend(
            [
                helper.make_node("Equal", [mask, zero], [f"{flipped}_attended"]),
                helper.make_node("Where", [f"{flipped}_attended", low, zero], [flipped]),
            ]
        )
    node.input[index] = flipped
    _sort(model)


def plant_scale(model: onnx.ModelProto, k: int) -> None:
    node = _kth(_attention_nodes(model), k, "attention ops")
    dtype = _float_dtype(model)
    if node.domain == "com.microsoft" and node.op_type == "Attention":
        attrs = {a.name: a for a in node.attribute}  # Q is projected inside: set the op's own scale
        if "scale" in attrs:
            attrs["scale"].f *= 2
        else:
            bias = next(i for i in model.graph.initializer if i.name == node.input[2])  # (3 * hidden,)
            head_size = bias.dims[0] // 3 // attrs["num_heads"].i
            node.attribute.append(helper.make_attribute("scale", float(2 / np.sqrt(head_size))))
        return
    two = _constant(model, f"scale_fault_{k}_two", np.asarray(2, dtype))
    scaled = f"{node.input[0]}_scaled_at_layer_{k}"
    model.graph.node.append(helper.make_node("Mul", [node.input[0], two], [scaled]))
    node.input[0] = scaled  # the queries (fused ops) or the masked scores (Softmax)
    _sort(model)


def _sort(model: onnx.ModelProto) -> None:
    """Topological order again after appending nodes (ONNX requires it)."""
    produced = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        ready = [n for n in pending if all(i in produced for i in n.input)]
        if not ready:
            raise ValueError("cycle while planting a fault")
        for n in ready:
            ordered.append(n)
            produced.update(n.output)
        pending = [n for n in pending if n not in ready]
    del model.graph.node[:]
    model.graph.node.extend(ordered)


class _Faulty(OrtCpu):
    plant = None

    def __init__(self, model_path: Path):
        model = onnx.load(str(model_path))
        type(self).plant(model, _layer())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "faulty.onnx"
            onnx.save(model, str(path))
            super().__init__(path)
        self.name = type(self).name
        self.notes.append(f"fault planted at layer {_layer()} ({type(self).__doc__.strip()})")

    @classmethod
    def problem(cls) -> str | None:
        return None if _layer() is not None else f"set {ENV} to the layer to plant the fault at"

    @classmethod
    def gap(cls, artifact) -> str | None:
        return OrtCpu.gap(artifact)


class FaultyWeight(_Faulty):
    """one column of the feed-forward weight perturbed"""

    name, label, short = "faulty-weight", "ORT CPU with a perturbed weight", "faulty weight"
    plant = staticmethod(plant_weight)


class FaultyMask(_Faulty):
    """the attention mask inverted"""

    name, label, short = "faulty-mask", "ORT CPU with an inverted mask", "faulty mask"
    plant = staticmethod(plant_mask)


class FaultyScale(_Faulty):
    """attention scores scaled by 2"""

    name, label, short = "faulty-scale", "ORT CPU with a wrong attention scale", "faulty scale"
    plant = staticmethod(plant_scale)
