"""Module -> model.onnx: the one function that writes an artifact's graph. export_artifact calls it, and so
does qkv-validate's rebuild (validate/rebuild.py, the only place validate/ reaches into export/): the same
spec, module, backend, dtype, opset and external-data choice give the same bytes."""

from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from ..artifact_format import graph_io
from ..model_defs.registry import ModelSpec, count_attention_modules, example_inputs
from ..stages import stage
from .backends import export_onnx
from .fusion import check_fusion
from .taps import find_taps

TRACE_CASE = (2, 16, [16, 11])  # shapes torch.export traces with: not 0 or 1, so no dim specializes
TRACE_SEED = 0  # the trace's input values: fixed, so the graph depends on the model and options only
STAGE_READ_BACK, STAGE_FUSION_CHECK = "onnx.load (read graph back)", "fusion check"


def _dynamic_shapes(spec: ModelSpec) -> tuple:
    """One torch.export Dim per symbolic name; sequences of a BERT model are bounded by its positions."""
    dims = {}
    shapes = []
    for inp in spec.inputs:
        axes = {}
        for axis, d in enumerate(inp.shape):
            if isinstance(d, str):
                bounded = spec.architecture == "bert" and d != "batch"
                dims.setdefault(
                    d, torch.export.Dim(d, min=1, max=spec.config.max_positions if bounded else None)
                )
                axes[axis] = dims[d]
        shapes.append(axes)
    return tuple(shapes)


@dataclass(frozen=True)
class ExportedGraph:
    """What the manifest records about a written model.onnx."""

    fusions: dict  # ORT fusions applied (ort-contrib), {} otherwise
    op_counts: dict  # 'domain::Op' -> count, after the fusion check
    opset: dict  # domain -> version
    inputs: list  # graph_io of the graph's inputs
    outputs: list
    taps: list  # find_taps of the float graph (an int8 graph keeps its values' names)


def export_model(
    spec: ModelSpec, module, backend: str, dtype: str, opset: int, external_data: bool, path: Path
) -> ExportedGraph:
    """Write model.onnx for `spec` at `path` from `module` (in eval mode and `dtype`): the one function
    both export_artifact and qkv-validate's rebuild call, so that a rebuild from the same model, weights
    and options is the same bytes. Raises ExportError (FusionError) when attention is not fused as the
    backend promises."""
    trace = example_inputs(spec, *TRACE_CASE, TRACE_SEED, dtype)
    fusions = export_onnx(
        module,
        tuple(trace.values()),
        [i.name for i in spec.inputs],
        spec.outputs,
        _dynamic_shapes(spec),
        path,
        backend,
        opset,
        external_data,
    )
    return read_back(path, spec, backend, count_attention_modules(module), fusions)


def read_back(
    path: Path, spec: ModelSpec, backend: str, n_attention: int, fusions: dict, taps: list | None = None
) -> ExportedGraph:
    """What the manifest records of the graph at `path`, after the fusion check; `taps` when already found
    (an int8 graph's are its float32 source's)."""
    with stage(STAGE_READ_BACK):
        graph = onnx.load(str(path), load_external_data=False)
    with stage(STAGE_FUSION_CHECK):
        op_counts = check_fusion(graph, backend, n_attention)
        if taps is None:
            taps = find_taps(graph, spec.architecture, spec.config.to_dict(), list(spec.outputs))
    return ExportedGraph(
        fusions,
        op_counts,
        {(o.domain or "ai.onnx"): o.version for o in graph.opset_import},
        graph_io(graph.graph.input),
        graph_io(graph.graph.output),
        taps,
    )


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
    return read_back(path, spec, backend, n_attention, float_graph.fusions, float_graph.taps)
