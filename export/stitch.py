"""A deep model's graph from the export of a two-layer one: the same bytes as exporting it whole, at the cost
of two layers.

Every layer of an encoder is the same module type, and the exporter writes the same nodes for each: only names
and weights differ, and in canonical form (`export/canonical.py`) the names differ by the layer index alone
(`blocks.1.attn/Attention` -> `blocks.7.attn/Attention`). So the model is exported at two layers, with *probe*
weights (seeded and all distinct, so that no value-dependent rewrite of the exporter fires), and the graph is
stitched: the nodes before layer 1 (embeddings, layer 0, what all layers share), layer 1 repeated with its
layer index shifted for layers 1..N-1, then the nodes after it (pooler, final norm) reading layer N-1. Every
initializer is then made from the real weights by the recipe its probe counterpart revealed (a parameter by
name, transposed, or q/k/v packed as ORT's Attention takes them), and the exporter's two value-dependent
rewrites are applied as it applies them: a Gemm's all-zero bias is dropped, and initializers of at most 1024
elements with equal contents are merged into the first parameter. Anything this does not account for is a
StitchError, and the caller exports the model whole. The tests hold the result to the whole export's bytes.

`n_layers=None` repeats nothing: the template is the export of the model itself with probe weights, and only
its weights are replaced (attention modules, encoder blocks, one-layer BERTs).
"""

import re
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from ..decoder_format import PAST, PRESENT
from .canonical import SCOPES, modules
from .model_file import Lazy

LAYER = re.compile(r"^blocks\.(\d+)(?=[./]|$)")
LAYER_IO = re.compile(rf"^(?:{PAST}|{PRESENT})\.(\d+)(?=\.)")  # a decoder's cache, one per layer
FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
SMALL_CONSTANT = 16  # a constant of the graph itself (a shape, a scalar) is at most this big
DEDUP_LIMIT = 1024  # onnx_ir's DeduplicateInitializersPass merges initializers of at most this many elements


class StitchError(Exception):
    """The two-layer export does not have the shape stitching relies on: export the model whole."""


def layer_index(name: str) -> int | None:
    m = LAYER.match(name)
    return int(m.group(1)) if m else None


def shift(name: str, offset: int) -> str:
    """`name` with its layer index moved by `offset` ('blocks.1.attn/Add' -> 'blocks.4.attn/Add' for 3, a
    cache's 'present.1.key' -> 'present.4.key')."""
    m = LAYER.match(name) or LAYER_IO.match(name)
    if m is None or not offset:
        return name
    return f"{name[: m.start(1)]}{int(m.group(1)) + offset}{name[m.end(1) :]}"


def _layer_io(values, n_layers: int) -> list:
    """Graph inputs or outputs with the template's layer-1 ones (a decoder's cache) repeated for layers
    1..n_layers-1, in the exporter's order: by layer, then as the template lists them."""
    out, ones = [], [v for v in values if (m := LAYER_IO.match(v.name)) and m.group(1) == "1"]
    for v in values:
        if v in ones[:1]:
            for offset in range(n_layers - 1):
                for one in ones:
                    copy = onnx.ValueInfoProto()
                    copy.CopyFrom(one)
                    copy.name = shift(one.name, offset)
                    out.append(copy)
        elif v not in ones:
            out.append(v)
    return out


def node_layer(node: onnx.NodeProto) -> int | None:
    for path in modules(node):
        if re.fullmatch(r"blocks\.\d+", path):
            return int(path.split(".")[1])
    return None


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


@dataclass(frozen=True)
class Recipe:
    """How an initializer is made from parameters: kind 'param' (as is), 'transposed' or 'packed' (q, k, v
    concatenated; a weight then transposed to MatMul's layout)."""

    kind: str
    parts: tuple[str, ...]

    def shifted(self, offset: int) -> "Recipe":
        return Recipe(self.kind, tuple(shift(p, offset) for p in self.parts))

    def shape(self, state: dict) -> tuple[int, ...]:
        """make(state).shape, made from the parameters' shapes alone."""
        shapes = [tuple(state[p].shape) for p in self.parts]
        if self.kind == "param":
            return shapes[0]
        both = (sum(s[0] for s in shapes), *shapes[0][1:])
        return both[::-1] if len(both) == 2 else both

    def make(self, state: dict) -> torch.Tensor:
        tensors = [state[p] for p in self.parts]
        if self.kind == "param":
            return tensors[0]
        both = tensors[0] if self.kind == "transposed" else torch.cat(tensors)
        return both.t() if both.dim() == 2 else both


def _recipes(g: onnx.GraphProto, probe: dict, constants: set[bytes]) -> dict[str, Recipe]:
    """{initializer: its recipe} of every initializer made from the `probe` parameters; the others are
    constants of the graph itself (shapes, scalars, or the `constants` a config implies: RoPE's tables),
    which no parameter changes."""
    candidates = {}  # (dims, dtype) -> [recipe], each made (and its bytes taken) only when dims match
    for name, p in probe.items():
        if p.dim() == 2:
            candidates.setdefault(tuple(p.shape[::-1]), []).append(Recipe("transposed", (name,)))
        for leaf in ("weight", "bias"):
            if name.endswith(f".q_proj.{leaf}"):
                parts = tuple(name.replace(".q_proj.", f".{x}_proj.") for x in "qkv")
                if all(q in probe for q in parts):
                    recipe = Recipe("packed", parts)
                    candidates.setdefault(tuple(recipe.make(probe).shape), []).append(recipe)
    made, out = {}, {}
    for t in g.initializer:
        if t.name in probe:
            out[t.name] = Recipe("param", (t.name,))
            continue
        if t.data_type not in FLOATS:
            continue
        if not t.HasField("raw_data"):
            raise StitchError(f"initializer {t.name!r} does not keep its data as raw bytes")
        found = []
        for recipe in candidates.get(tuple(t.dims), []):
            if recipe not in made:
                made[recipe] = tensor_bytes(recipe.make(probe))
            if made[recipe] == t.raw_data:
                found.append(recipe)
        if len(found) > 1:
            raise StitchError(f"initializer {t.name!r} can be made from several parameters")
        if found:
            out[t.name] = found[0]
        elif int(np.prod(t.dims)) > SMALL_CONSTANT and t.raw_data not in constants:
            raise StitchError(f"initializer {t.name!r} is made from the weights in a way stitching lacks")
    return out


def stitch(
    template: onnx.ModelProto,
    probe: dict,
    n_layers: int | None,
    state: dict,
    constants: set[bytes] = frozenset(),
    resize: dict[int, int] | None = None,
) -> tuple[onnx.ModelProto, dict, dict]:
    """(graph, data, recipes): the canonical graph of the `n_layers` model whose weights are `state` (name ->
    tensor in the export dtype), from `template`, the canonical export of its two-layer version holding the
    `probe` weights; `n_layers` None: of the template's own model, its weights replaced. Its initializers
    made from the weights keep their bytes in `data` (name -> Lazy), for model_file.write_model, and their
    recipes in `recipes` (name -> (kind, parameters)).
    `constants`: the bytes of the large constants the model's config implies (equal at any depth).
    `resize`: {a size of the template: the model's} (a vocabulary the template has small), replaced in the
    shapes the graph declares; a constant or attribute of the graph holding such a size is a StitchError."""
    g = template.graph
    recipes = _recipes(g, probe, constants)
    resize = resize or {}
    _check_resizable(g, recipes, resize)
    if n_layers is None:
        nodes = [_copy(n) for n in g.node]  # copies: a process reuses its template unchanged
        source = {x: (x, 0) for n in nodes for x in (*n.input, *n.output)}
        layered = set()
    else:
        nodes, source, layered = _repeat(g, recipes, n_layers)
    inits = {t.name: t for t in g.initializer}
    graph_inputs, graph_outputs = (
        (list(g.input), list(g.output))
        if n_layers is None
        else (_layer_io(g.input, n_layers), _layer_io(g.output, n_layers))
    )
    defined, outputs = {i.name for i in graph_inputs}, {o.name for o in graph_outputs}
    for node in nodes:
        for x in node.input:
            if x and x not in defined and source.get(x, ("", 0))[0] not in inits:
                raise StitchError(f"{node.name!r} reads {x!r}, which nothing before it computes")
        defined.update(node.output)
    made = {}  # final initializer -> Entry
    for node in nodes:
        for x in node.input:
            if x in made or x not in source or source[x][0] not in inits:
                continue
            old, offset = source[x]
            recipe = recipes.get(old)
            header = onnx.TensorProto()
            if recipe is None:  # a constant of the graph: as the template has it
                header.CopyFrom(inits[old])
                header.name = x
            else:
                recipe = recipe.shifted(offset if old in layered else 0)
                header.name, header.data_type = x, inits[old].data_type
                header.dims[:] = recipe.shape(state)
            made[x] = Entry(header, recipe, state if recipe is not None else None)
    _merge_equal(nodes, made, state, _drop_zero_gemm_bias(nodes, made))

    out = _shell(template)
    for target, values in ((out.graph.input, graph_inputs), (out.graph.output, graph_outputs)):
        del target[:]
        target.extend(values)
    first = {}
    for i, node in enumerate(nodes):
        for k, x in enumerate(node.input):
            first.setdefault(x, (i, k))  # the canonical order: by first use, node and input position
    ordered = sorted(made, key=lambda x: first.get(x, (len(nodes), 0)))
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(made[x].header for x in ordered)
    infos = {v.name: v for v in [*g.value_info, *g.output]}
    position = {x: (-1, k) for k, x in enumerate(ordered)}
    position.update({o: (i, j) for i, n in enumerate(nodes) for j, o in enumerate(n.output) if o})
    listed = []
    for name in sorted(position, key=position.get):
        old = source.get(name, (name, 0))[0]
        if name in outputs:
            continue
        if old in infos:
            v = onnx.ValueInfoProto()
            v.CopyFrom(infos[old])
            v.name = name
        elif name in made:  # a parameter the merge brought in: described as the exporter describes one
            t = made[name].header
            v = onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims))
        else:
            continue
        listed.append(v)
    out.graph.value_info.extend(listed)
    for v in (*out.graph.input, *out.graph.output, *out.graph.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value in resize:
                d.dim_value = resize[d.dim_value]
    weighted = {x: e for x, e in made.items() if e.state is not None}
    data = {x: Lazy(e.nbytes(), e.tensor) for x, e in weighted.items()}
    return out, data, {x: (e.recipe.kind, e.recipe.parts) for x, e in weighted.items()}


def _check_resizable(g: onnx.GraphProto, recipes: dict, resize: dict) -> None:
    """StitchError if a size `resize` changes is held by a constant or an attribute of the template's graph
    (a Reshape to the vocabulary, say): only the shapes it declares are rewritten."""
    if not resize:
        return
    held = [
        onnx.numpy_helper.to_array(t)
        for t in g.initializer
        if t.name not in recipes and t.data_type not in FLOATS
    ]
    for node in g.node:
        for a in node.attribute:
            held.append(np.asarray([a.i, *a.ints], dtype=np.int64))
            if a.HasField("t"):
                held.append(onnx.numpy_helper.to_array(a.t))
    for values in held:
        if np.isin(values, list(resize)).any():
            raise StitchError(
                f"a constant of the graph holds a size the template has in place of the model's: {resize}"
            )


def _repeat(g: onnx.GraphProto, recipes: dict, n_layers: int) -> tuple[list, dict, set]:
    """(nodes, source, layered): the template's nodes with layer 1 repeated for layers 1..n_layers-1, where
    each name comes from (`source`: name -> (the template's name, layer offset)), and the initializers made
    from a layer's weights."""
    layers = [node_layer(n) for n in g.node]
    body = [i for i, k in enumerate(layers) if k == 1]
    if n_layers < 2 or not body or body != list(range(body[0], body[-1] + 1)):
        raise StitchError("layer 1 is not one run of nodes")
    if any(k not in (0, 1, None) for k in layers) or any(k is not None for k in layers[body[-1] + 1 :]):
        raise StitchError("nodes of a layer outside the layers' run")
    start, end = body[0], body[-1] + 1
    outputs = {o.name for o in g.output}
    producer = {o: (i, j) for i, n in enumerate(g.node) for j, o in enumerate(n.output) if o}
    layered = {n for n, r in recipes.items() if any(layer_index(p) is not None for p in r.parts)}
    carried = set(layered)  # what depends on a layer's weights: moves with the layer reading it
    for node in g.node[:start]:
        if any(x in carried for x in node.input):
            carried.update(o for o in node.output if o)
    own = {o for n in g.node[start:end] for o in n.output if o}

    def rename(x: str, offset: int, last: bool) -> str:
        if LAYER_IO.match(x):  # a layer's own graph input or output
            return shift(x, offset)
        if x in own:
            if x in outputs:
                if last:
                    return x
                i, j = producer[x]
                base = shift(g.node[i].name, offset)
                return base if j == 0 else f"{base}/output_{j}"
            return shift(x, offset)
        if x in carried:
            if layer_index(x) is None:
                raise StitchError(f"{x!r} depends on a layer's weights but belongs to no layer")
            return shift(x, offset)
        return x

    nodes = [_copy(n) for n in g.node[:start]]  # copies: a process reuses its template unchanged
    source = {}
    copies = [(g.node[start:end], k - 1, k == n_layers - 1) for k in range(1, n_layers)]
    for run, offset, last in [*copies, (g.node[end:], n_layers - 2, True)]:
        for node in run:
            copy = _copy(node)
            copy.name = shift(node.name, offset)
            copy.input[:] = [rename(x, offset, last) for x in node.input]
            copy.output[:] = [rename(o, offset, last) if o else o for o in node.output]
            for new, old in zip([*copy.input, *copy.output], [*node.input, *node.output]):
                source.setdefault(new, (old, offset))
            for p in copy.metadata_props:
                if p.key == SCOPES:
                    p.value = repr(["", *(shift(s, offset) for s in modules(copy))])
            nodes.append(copy)
    for node in nodes[:start]:
        for x in node.input:
            source.setdefault(x, (x, 0))
    return nodes, source, layered


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


@dataclass
class Entry:
    """A stitched initializer: its TensorProto (without its bytes when it is made from the weights), its
    recipe (None for a constant of the graph) and the weights it is made from, when it is written: a model's
    initializers never all exist at once (model_file.write_model makes each as it writes it)."""

    header: onnx.TensorProto
    recipe: Recipe | None
    state: dict | None

    def tensor(self) -> torch.Tensor:
        return self.recipe.make(self.state).contiguous()

    def nbytes(self) -> int:
        return self.size() * onnx.helper.tensor_dtype_to_np_dtype(self.header.data_type).itemsize

    def key(self) -> tuple:
        raw = self.header.raw_data if self.state is None else tensor_bytes(self.tensor())
        return self.header.data_type, tuple(self.header.dims), raw

    def size(self) -> int:
        return int(np.prod(self.header.dims))


def _shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` without its graph's nodes, initializers and value_info (copied field by field: the template's
    initializers are never copied)."""
    out = onnx.ModelProto()
    for target, message, skip in ((out, model, {"graph"}), (out.graph, model.graph, _LISTS)):
        for field, value in message.ListFields():
            if field.name in skip:
                continue
            if field.is_repeated:
                getattr(target, field.name).extend(value)
            elif field.type == field.TYPE_MESSAGE:
                getattr(target, field.name).CopyFrom(value)
            else:
                setattr(target, field.name, value)
    return out


_LISTS = {"node", "initializer", "value_info"}


def _drop_zero_gemm_bias(nodes: list, made: dict) -> set[str]:
    """The exporter's rewrite of Gemm(x, w, 0) into Gemm(x, w) (onnxscript's remove_optional_bias); returns
    the parameters it dropped."""
    dropped = set()
    for node in nodes:
        if node.op_type == "Gemm" and len(node.input) == 3 and node.input[2] in made:
            if not any(made[node.input[2]].key()[2]):
                dropped.add(node.input.pop())
    used = {x for n in nodes for x in n.input}
    for name in [x for x in made if x not in used]:
        del made[name]
    return dropped


def _merge_equal(nodes: list, made: dict, state: dict, dropped: set[str]) -> None:
    """The exporter's merges of equal initializers of at most DEDUP_LIMIT elements (onnx_ir's
    DeduplicateInitializersPass): first over the parameters in their order, before any fusion packs them
    (each into the first), then, after the ORT fusions, over what those made (ORT's packed q/k/v biases: into
    the lowest layer's). Any other equality is a StitchError: where the exporter puts those in its order is
    not known here."""
    keys, firsts = {}, {}
    for name, t in state.items():
        if name not in dropped and 0 < t.numel() <= DEDUP_LIMIT:
            key = (_ONNX_TYPES[t.dtype], tuple(t.shape), tensor_bytes(t))
            keys[name] = key
            firsts.setdefault(key, name)
    replace = {name: firsts[key] for name, key in keys.items() if firsts[key] != name}
    _replace(nodes, made, replace)
    for keep in set(replace.values()) - set(made):
        if any(keep in n.input for n in nodes):
            t = onnx.TensorProto(name=keep, dims=list(state[keep].shape), data_type=keys[keep][0])
            made[keep] = Entry(t, Recipe("param", (keep,)), state)
    groups = {}
    for name, entry in made.items():
        if entry.size() <= DEDUP_LIMIT:
            groups.setdefault(entry.key(), []).append(name)
    replace = {}
    for group in (g for g in groups.values() if len(g) > 1):
        recipes = [made[n].recipe for n in group]
        if any(r is None or r.kind == "param" for r in recipes) or len({r.kind for r in recipes}) > 1:
            raise StitchError(f"initializers {group[:2]} are equal; the exporter's order for them is unknown")
        keep = min(group, key=lambda n: layer_index(made[n].recipe.parts[0]) or 0)
        replace.update({n: keep for n in group if n != keep})
    _replace(nodes, made, replace)


def _replace(nodes: list, made: dict, replace: dict) -> None:
    for node in nodes:
        node.input[:] = [replace.get(x, x) for x in node.input]
    for name in replace:
        made.pop(name, None)


_ONNX_TYPES = {
    torch.float32: onnx.TensorProto.FLOAT,
    torch.float16: onnx.TensorProto.FLOAT16,
    torch.bfloat16: onnx.TensorProto.BFLOAT16,
}
