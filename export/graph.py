"""Module -> model.onnx: the one function that writes an artifact's graph. export_artifact calls it, and so
does qkv-validate's rebuild (validate/rebuild.py, the only place validate/ reaches into export/): the same
spec, module, backend, dtype, opset and external-data choice give the same bytes."""

from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
import torch
from onnxscript.optimizer import _constant_folding as folding

from .. import rope
from ..artifact_format import ARCHITECTURES, BACKENDS, graph_io, model_layers
from ..decoder_format import PER_LAYER
from ..graph_contract import derived_constants, split_initializers
from ..graph_weights import param_map
from ..model_defs.numpy_io import to_numpy
from ..model_defs.registry import (
    ModelSpec,
    count_attention_modules,
    example_inputs,
    spec_for,
)
from ..stages import stage
from .backends import export_onnx
from .canonical import canonicalize
from .fusion import check_fusion
from .model_file import write_model
from .stitch import StitchError, stitch
from .taps import find_taps

TRACE_CASE = (2, 16, [16, 11])  # shapes torch.export traces with: not 0 or 1, so no dim specializes
TRACE_PAST = 3  # a decoder's cached tokens in the trace (not 0 or 1 either)
TRACE_SEED = 0  # the trace's input values: fixed, so the graph depends on the model and options only
PROBE_SEED = 1  # the two-layer export's weights: any seeded, all-distinct values
STAGE_READ_BACK, STAGE_FUSION_CHECK = "onnx.load (read graph back)", "fusion check"
STAGE_STITCH, STAGE_SAVE, STAGE_CANONICAL = "stitch the layers", "save model.onnx", "canonical names"


def _dynamic_shapes(spec: ModelSpec) -> tuple:
    """One torch.export Dim per symbolic name; sequences of a BERT model are bounded by its positions, a
    decoder's cache may be empty. A decoder's cache inputs are its forward's *past: one nested tuple."""
    dims, arch = {}, ARCHITECTURES[spec.architecture]
    shapes = []
    for inp in spec.inputs:
        axes = {}
        for axis, d in enumerate(inp.shape):
            if isinstance(d, str):
                bounded = not arch.cached and arch.layered and d != "batch"  # a BERT's position table
                dims.setdefault(
                    d,
                    torch.export.Dim(
                        d, min=0 if d == "past" else 1, max=spec.config.max_sequence if bounded else None
                    ),
                )
                axes[axis] = dims[d]
        shapes.append(axes)
    cache = [k for k, i in enumerate(spec.inputs) if i.role in ("past_key", "past_value")]
    if cache:
        return (*shapes[: cache[0]], tuple(shapes[cache[0] :]))
    return tuple(shapes)


@dataclass(frozen=True)
class ExportedGraph:
    """What the manifest records about a written model.onnx."""

    fusions: dict  # ORT fusions in the graph (ort-contrib: its com.microsoft op counts), {} otherwise
    op_counts: dict  # 'domain::Op' -> count, after the fusion check
    opset: dict  # domain -> version
    inputs: list  # graph_io of the graph's inputs
    outputs: list
    taps: list  # find_taps of the float graph (an int8 graph keeps its values' names)
    files: dict = field(default_factory=dict)  # file-table entries of what export_model wrote, from memory
    params: dict = field(default_factory=dict)  # {parameter: its place in the graph} (graph_weights.py)


def layers(spec: ModelSpec) -> int:
    """How many times the model repeats its block (1 for a model without blocks)."""
    return model_layers(spec.architecture, spec.config.to_dict())


def build_graph(
    spec: ModelSpec, module, backend: str, dtype: str, opset: int
) -> tuple[onnx.ModelProto, dict]:
    """(graph, data, recipes): the canonical graph of `module` (in eval mode and `dtype`) for `backend`, the
    tensors of initializers that keep their bytes outside it (model_file.write_model), and how each
    initializer is made from the parameters ({name: (kind, parameters)}: stitch's recipes, or the
    structural contract's reading of a graph exported whole). A BERT of two or
    more layers, or a decoder whose layers are all alike, is stitched from the export of its two-layer version
    with probe weights (export/stitch.py; the same bytes as exporting it whole, and memory for two layers,
    not the model); attention, encoder blocks and one-layer BERTs are the export of the model itself with
    probe weights, its weights replaced (the same bytes again); other decoders, and a model whose graph or
    weights the stitcher cannot place (ort-contrib's decoders), are exported whole."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    shape = _template_spec(spec, backend)
    if shape is not None:
        template, probe_state = _template(shape, backend, dtype, opset)
        stitched = shape is not spec
        try:
            with stage(STAGE_STITCH):
                constants = {t.tobytes() for t in rope.tables(spec.config.to_dict())}
                vocab = (shape.config.vocab_size, spec.config.vocab_size)
                resize = dict([vocab]) if vocab[0] != vocab[1] else {}
                n_layers = layers(spec) if stitched else None
                return stitch(template, probe_state, n_layers, state, constants, resize)
        except StitchError:
            pass
    graph = _export(spec, module, backend, dtype, opset)
    with stage(STAGE_CANONICAL):
        canonicalize(graph, state)
    model = {"architecture": spec.architecture, "config": spec.config.to_dict()}
    weights = {k: to_numpy(v) for k, v in state.items()}
    recipes, _ = split_initializers(graph, weights, derived=derived_constants(model))
    return graph, {}, recipes


def _template_spec(spec: ModelSpec, backend: str) -> ModelSpec | None:
    """The model whose template build_graph takes `spec`'s graph from (a stitched model's two-layer version,
    or `spec` itself), or None when it is exported whole."""
    arch = ARCHITECTURES[spec.architecture]
    if arch.cached and not BACKENDS[backend].stitched_decoder:
        return None
    if layers(spec) >= 2 and arch.stitched:
        two = _two_layers(spec.config)
        if two is not None:
            return spec_for(spec.name, spec.architecture, two, spec.options)
        return None
    return spec if arch.reweighted else None


def stitched(spec: ModelSpec, backend: str) -> bool:
    """Whether export_model builds `spec`'s graph from a template (its memory: a layer's, not the model's)."""
    return _template_spec(spec, backend) is not None


# the exporter's constant folding (onnxscript) treats a tensor differently above these many elements: a
# template's vocabulary-sized tensors must fall where the model's fall
FOLD_LIMITS = (
    folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
    folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
)
TEMPLATE_VOCAB = 97  # the least vocabulary of a template (a 128k one at full size is most of its memory)


def template_vocab(config) -> int:
    """The vocabulary of `config`'s template: the least prime from TEMPLATE_VOCAB up whose embedding and LM
    head fall on the model's side of each of FOLD_LIMITS, and that divides none of the other sizes (a size
    the graph derives from them, a head's width say, could be it and be read as the vocabulary); the
    model's own when there is none below it."""
    widths = {config.hidden_size, getattr(config, "embedding_size", None) or config.hidden_size}
    least = max(
        [TEMPLATE_VOCAB]
        + [limit // w + 1 for w in widths for limit in FOLD_LIMITS if config.vocab_size * w > limit]
    )
    sizes = [v for k, v in config.to_dict().items() if type(v) is int and k != "vocab_size" and v]
    for n in range(least, config.vocab_size):
        if all(n % d for d in range(2, int(n**0.5) + 1)) and all(v % n for v in sizes):
            return n
    return config.vocab_size


def _two_layers(config):
    """`config` at two layers, its per-layer fields cut to two; None when its layers are not all alike (a
    decoder alternating sliding and full layers): layer 1 of the template would stand for layers unlike it."""
    changes = {"num_layers": 2}
    changes["vocab_size"] = template_vocab(config)  # the embedding's rows are a recipe's: only shapes differ
    for name in PER_LAYER:
        values = getattr(config, name, None)
        if values is not None:
            if len(set(values)) > 1:
                return None
            changes[name] = tuple(values[:2])
    return replace(config, **changes)


def prepare(spec: ModelSpec, backend: str, dtype: str, opset: int) -> None:
    """Export now the template that export_model will build `spec`'s graph from. It needs no weights, so
    export_artifact traces it while the model's own weights are drawn."""
    shape = _template_spec(spec, backend)
    if shape is not None:
        _template(shape, backend, dtype, opset)


_templates: dict[tuple, tuple[onnx.ModelProto, dict]] = {}  # least recently used first
TEMPLATE_BYTES = 256 << 20  # the templates a process keeps: their probe weights' bytes (the newest always)


def _template(two: ModelSpec, backend: str, dtype: str, opset: int) -> tuple[onnx.ModelProto, dict]:
    """(canonical graph, probe weights) of the model `two` (a stitched model's two-layer version, or the
    model itself) with the probe weights: a function of the model's description alone (never of anyone's
    weights or name), so a process exports it once and builds every model of that description from it
    (stitch() only reads it)."""
    key = (two.architecture, repr(two.config), repr(sorted(two.options.items())), backend, dtype, opset)
    if key in _templates:
        _templates[key] = _templates.pop(key)
        return _templates[key]
    probe = two.random(PROBE_SEED).eval().to(getattr(torch, dtype))
    probe_state = {k: v.detach() for k, v in probe.state_dict().items()}
    template = _export(two, probe, backend, dtype, opset)
    with stage(STAGE_CANONICAL):
        canonicalize(template, probe_state)
    _templates[key] = template, probe_state
    while len(_templates) > 1 and sum(_weight_bytes(p) for _, p in _templates.values()) > TEMPLATE_BYTES:
        del _templates[next(iter(_templates))]
    return _templates[key]


def _weight_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _export(spec: ModelSpec, module, backend: str, dtype: str, opset: int) -> onnx.ModelProto:
    past = TRACE_PAST if any(i.role == "past_key" for i in spec.inputs) else 0
    trace = example_inputs(spec, *TRACE_CASE, TRACE_SEED, dtype, past=past)
    names = [i.name for i in spec.inputs]
    return export_onnx(
        module,
        tuple(trace.values()),
        names,
        spec.outputs,
        _dynamic_shapes(spec),
        backend,
        opset,
        spec.architecture,
    )


def export_model(
    spec: ModelSpec,
    module,
    backend: str,
    dtype: str,
    opset: int,
    external_data: bool,
    path: Path,
    keep_data: bool = True,
) -> ExportedGraph:
    """Write model.onnx for `spec` at `path` from `module` (in eval mode and `dtype`): the one function
    both export_artifact and qkv-validate's rebuild call, so that a rebuild from the same model, weights
    and options is the same bytes. Raises ExportError (FusionError) when attention is not fused as the
    backend promises."""
    graph, data, recipes = build_graph(spec, module, backend, dtype, opset)
    described = describe(graph, spec, backend, count_attention_modules(module))
    state = dict(module.state_dict())
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    params = param_map(recipes, shapes, lambda name: to_numpy(state[name]))
    with stage(STAGE_SAVE):
        files = write_model(graph, data, path, external_data, keep_data)
    return replace(described, files=files, params=params)


def describe(
    graph: onnx.ModelProto, spec: ModelSpec, backend: str, n_attention: int, taps=None
) -> ExportedGraph:
    """What the manifest records of `graph`, after the fusion check; `taps` when already found (an int8
    graph's are its float32 source's)."""
    with stage(STAGE_FUSION_CHECK):
        op_counts = check_fusion(graph, backend, n_attention, spec.architecture)
        if taps is None:
            taps = find_taps(graph, spec.architecture, spec.config.to_dict(), list(spec.outputs))
    fusions = {k: v for k, v in op_counts.items() if k.startswith("com.microsoft::")}
    return ExportedGraph(
        fusions if BACKENDS[backend].ort_fusions else {},
        op_counts,
        {(o.domain or "ai.onnx"): o.version for o in graph.opset_import},
        graph_io(graph.graph.input),
        graph_io(graph.graph.output),
        taps,
    )


def read_back(path: Path, spec: ModelSpec, backend: str, n_attention: int, taps=None) -> ExportedGraph:
    """describe() of the graph at `path` (its external data not loaded)."""
    with stage(STAGE_READ_BACK):
        graph = onnx.load(str(path), load_external_data=False)
    return describe(graph, spec, backend, n_attention, taps)


def requantize(
    float_path: Path,
    path: Path,
    spec: ModelSpec,
    backend: str,
    n_attention: int,
    float_graph: ExportedGraph,
    keep_float: list[str],
) -> ExportedGraph:
    """Write at `path` the int8 graph of the float32 one at `float_path` as the export made it, keeping the
    products `keep_float` (the search's result) in float32: validation's rebuild of an int8 artifact."""
    from .quantize import quantize

    quantize(float_path, path, keep_float)
    return read_back(path, spec, backend, n_attention, float_graph.taps)
