"""Taps: the graph values at the model's sublayer boundaries, found at export from the module path the dynamo
exporter records on every node (`pkg.torch.onnx.name_scopes`, kept by onnxscript's ORT fusions).

LayerNorms are the sublayer boundaries of a BERT block, so most taps are a norm's output (post-LN) or the
residual sum entering a norm (pre-LN): a LayerNormalization's input 0, or the fused SkipLayerNormalization's
output 3 (input + skip + bias). The attention tap is the attention module's last value: the output
projection with its bias; where ort-contrib folded that bias into the next SkipLayerNormalization, the tap
is the projection's MatMul plus that bias initializer (`add`).
"""

import ast

import onnx

from ..artifact_format import ARCHITECTURES
from ..errors import ExportError

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
NORMS = ("LayerNormalization", "SkipLayerNormalization")


class _Scopes:
    """The graph's nodes with the module paths the exporter recorded for each."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.nodes = list(model.graph.node)
        self.paths = [self._paths(n) for n in self.nodes]
        self.initializers = {i.name for i in model.graph.initializer}

    @staticmethod
    def _paths(node) -> set[str]:
        for p in node.metadata_props:
            if p.key == SCOPES_KEY:
                try:
                    return set(ast.literal_eval(p.value))
                except (ValueError, SyntaxError):
                    return set()
        return set()

    def last_in(self, module: str):
        """The last node (graph order) inside `module`."""
        inside = [n for n, paths in zip(self.nodes, self.paths) if module in paths]
        if not inside:
            raise ExportError(f"taps: no node of module {module!r} in the graph (no {SCOPES_KEY} metadata?)")
        return inside[-1]

    def norm(self, module: str):
        node = self.last_in(module)
        if node.op_type not in NORMS:
            raise ExportError(f"taps: module {module!r} ends in {node.op_type}, not a LayerNormalization")
        return node

    def own(self, module: str) -> list:
        """The nodes of `module` itself, in graph order: not of a module inside it."""
        inside = [(n, paths) for n, paths in zip(self.nodes, self.paths) if module in paths]
        return [n for n, paths in inside if not any(p.startswith(module + ".") for p in paths)]

    def consumers(self, value: str) -> list:
        return [n for n in self.nodes if value in n.input]


def _tap(tap: str, layer: int | None, value: str, add: str | None = None) -> dict:
    return {"tap": tap, "layer": layer, "value": value, "add": add}


def _norm_out(g: _Scopes, module: str) -> str:
    return g.norm(module).output[0]


def _norm_in(g: _Scopes, module: str) -> str:
    """The value a norm normalizes: LayerNormalization's input, or SkipLayerNormalization's summed output."""
    node = g.norm(module)
    if node.op_type == "LayerNormalization":
        return node.input[0]
    if len(node.output) < 4 or not node.output[3]:
        raise ExportError(f"taps: the SkipLayerNormalization of {module!r} does not output its sum")
    return node.output[3]


def _attention(g: _Scopes, module: str, layer: int) -> dict:
    node = g.last_in(module)
    value = node.output[0]
    if node.op_type == "MatMul":  # the bias went into the next SkipLayerNormalization
        skips = [c for c in g.consumers(value) if c.op_type == "SkipLayerNormalization" and len(c.input) > 4]
        if len(skips) != 1 or skips[0].input[4] not in g.initializers:
            raise ExportError(f"taps: the output projection of {module!r} has no bias in the graph")
        return _tap("attention", layer, value, skips[0].input[4])
    return _tap("attention", layer, value)


def find_taps(model: onnx.ModelProto, architecture: str, cfg: dict, outputs: list[str]) -> list[dict]:
    """The taps of an exported graph, in the order the model computes them; ExportError when the graph does
    not have them where the exporter should have put them."""
    g, arch = _Scopes(model), ARCHITECTURES[architecture]
    if arch.cached:
        return _decoder_taps(g, cfg["num_layers"])
    pre_ln = cfg["pre_layer_norm"]
    if arch.kind == "attention":
        return [_tap("attention", 0, outputs[0])]
    if arch.kind == "block":
        block = "block"
        post_attention = _norm_in(g, f"{block}.ffn_norm") if pre_ln else _norm_out(g, f"{block}.attn_norm")
        return [
            _attention(g, f"{block}.attn", 0),
            _tap("attention_block", 0, post_attention),
            _tap("block", 0, outputs[0]),
        ]
    embedded = g.last_in("embeddings.project").output[0] if cfg["embedding_size"] else None
    taps = [_tap("embeddings", None, embedded or _norm_out(g, "embeddings.norm"))]
    layers = cfg["num_layers"]
    for k in range(layers):
        block = f"blocks.{k}"
        if pre_ln:
            after_attention = _norm_in(g, f"{block}.ffn_norm")
            after_block = _norm_in(g, f"blocks.{k + 1}.attn_norm" if k + 1 < layers else "final_norm")
        else:
            after_attention, after_block = (
                _norm_out(g, f"{block}.attn_norm"),
                _norm_out(g, f"{block}.ffn_norm"),
            )
        taps += [
            _attention(g, f"{block}.attn", k),
            _tap("attention_block", k, after_attention),
            _tap("block", k, after_block),
        ]
    if pre_ln:
        taps.append(_tap("final_norm", None, _norm_out(g, "final_norm")))
    if cfg["with_pooler"]:
        taps.append(_tap("pooler", None, outputs[1]))
    return taps


def _decoder_taps(g: _Scopes, layers: int) -> list[dict]:
    """A decoder's taps: the residual stream after the embeddings, after each block's attention (the block's
    first residual Add, whatever norm or multiplier comes between) and after the block (its last node), the
    final norm's output."""
    taps = [_tap("embeddings", None, g.last_in("embed").output[0])]
    for k in range(layers):
        block = f"blocks.{k}"
        attention = g.last_in(f"{block}.attn").output[0]
        residual = [n for n in g.own(block) if n.op_type == "Add"]
        if len(residual) != 2:
            raise ExportError(f"taps: block {block!r} has {len(residual)} residual Adds of its own, not 2")
        taps += [
            _tap("attention", k, attention),
            _tap("attention_block", k, residual[0].output[0]),
            _tap("block", k, g.last_in(block).output[0]),
        ]
    return [*taps, _tap("final_norm", None, g.last_in("final_norm").output[0])]
