"""The canonical form of an exported graph: every name says where it comes from, nothing records how the trace
went.

The dynamo exporter names values and nodes after its trace (`linear_6`, `val_75`, `node_MatMul_67`): counters
over the whole model, so the same layer gets other names in a model with another depth, and its metadata keeps
the FX node text and the program's signature. The canonical form keeps the graph (ops, wiring, attributes,
shapes, weights) and renames from the module path the exporter records on each node
(`pkg.torch.onnx.name_scopes`):

- node: `<module path>/<Op>`, `_<i>` for the i-th repeat in that module (`blocks.3.attn.q_proj/MatMul`,
  `model/Shape_1` outside every module);
- value: the name of the node that computes it (`/output_<j>` for output j > 0); graph inputs and outputs
  keep theirs;
- initializer: a parameter keeps its `state_dict` name; any other is named after its first use
  (`blocks.3.attn.q_proj/MatMul/input_1`: the transposed weight) and initializers are in order of first use;
- metadata: each node keeps only its module paths; the exporter's FX node text, class hierarchy, graph
  signature and rule names go (they also name the exporter's counters, and its stack trace names files of the
  machine it ran on).

So a graph is the same bytes however it was produced: exported whole, or stitched from a shorter export
(`export/stitch.py`), on any machine and from any checkout.
"""

import ast
from collections import Counter

import onnx

SCOPES = "pkg.torch.onnx.name_scopes"
_HOOK = "_empty_nn_module_stack_from_metadata_hook"  # the exporter's scope for nodes outside every module


def traced_modules(node: onnx.NodeProto) -> list[str]:
    """The module paths the exporter recorded for a node, outermost first, without the root '' and the FX node
    name it appends."""
    for p in node.metadata_props:
        if p.key == SCOPES:
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return []
            return [s for s in scopes[:-1] if s and s != _HOOK]
    return []


def modules(node: onnx.NodeProto) -> list[str]:
    """The module paths of a node of a canonical graph, outermost first."""
    for p in node.metadata_props:
        if p.key == SCOPES:
            return [s for s in ast.literal_eval(p.value) if s]
    return []


def node_scope(module_paths: list[str]) -> str:
    return module_paths[-1] if module_paths else "model"


def canonicalize(model: onnx.ModelProto, params, traced: bool = True) -> None:
    """Rewrite `model` in place into its canonical form. `params`: the parameter names (they name their
    initializers); `traced`: the metadata is the exporter's (False: already canonical, as after stitching)."""
    g = model.graph
    outputs = {o.name for o in g.output}
    rename, counts = {}, Counter()
    for node in g.node:
        paths = traced_modules(node) if traced else modules(node)
        base = f"{node_scope(paths)}/{node.op_type}"
        node.name = base if not counts[base] else f"{base}_{counts[base]}"
        counts[base] += 1
        for j, out in enumerate(node.output):
            if out and out not in outputs:
                rename[out] = node.name if j == 0 else f"{node.name}/output_{j}"
        del node.metadata_props[:]
        node.metadata_props.add(key=SCOPES, value=repr(["", *paths]))
        node.ClearField("doc_string")
    initializers = {t.name for t in g.initializer}
    first_use = {}
    for i, node in enumerate(g.node):
        for k, x in enumerate(node.input):
            if x in initializers and x not in first_use:
                first_use[x] = (i, k)
                if x not in params:
                    rename[x] = f"{node.name}/input_{k}"
    for node in g.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
        node.output[:] = [rename.get(x, x) for x in node.output]
    for t in g.initializer:
        t.name = rename.get(t.name, t.name)
        del t.metadata_props[:]
    last = (len(g.node), 0)
    first_use = {rename.get(x, x): v for x, v in first_use.items()}
    g.initializer.sort(key=lambda t: first_use.get(t.name, last))
    position = {t.name: (-1, k) for k, t in enumerate(g.initializer)}
    for i, node in enumerate(g.node):
        for j, out in enumerate(node.output):
            position[out] = (i, j)
    for v in g.value_info:
        v.name = rename.get(v.name, v.name)
        del v.metadata_props[:]
    g.value_info.sort(key=lambda v: position.get(v.name, (-2, 0)))
    for v in [*g.input, *g.output]:
        del v.metadata_props[:]
    del g.metadata_props[:]
    del model.metadata_props[:]
