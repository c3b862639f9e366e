"""How each attention backend turns a module into ONNX (the backend table itself is part of the artifact
format: `qkv_onnx.artifact_format.BACKENDS`).

- onnx-attention: dynamo export at opset >= 23, where SDPA becomes the ONNX `Attention` op.
- ort-contrib:    dynamo export at opset 18, then onnxscript's `optimize_for_ort` rewrites attention
                  into com.microsoft `Attention`/`MultiHeadAttention` (plus SkipLayerNormalization,
                  BiasGelu). Those kernels average V over a row whose keys are all masked, so the
                  module writes the "no key, output 0" rule into the graph (`zero_empty_rows`).
- decomposed:     dynamo export at opset 17/18: attention as MatMul/Softmax, for runtimes without a
                  fused op. The exporter masks with a finite minimum, so an all-masked row would
                  average V: `zero_empty_rows` again.
"""

import logging
import warnings
from pathlib import Path

import torch

from ..artifact_format import BACKENDS
from ..errors import ExportError, first_line
from ..model_defs.attention import MultiHeadAttention
from ..stages import stage

STAGE_EXPORT, STAGE_FUSE, STAGE_SAVE = (
    "torch.onnx.export (dynamo)",
    "onnxscript optimize_for_ort",
    "save model.onnx",
)
# Node metadata the exporter writes that names files of the machine it ran on (the build checkout's and
# site-packages' absolute paths, line by line): dropped, so an export is the same bytes on any machine and
# from any checkout, and leaks no paths.
MACHINE_METADATA = ("pkg.torch.onnx.stack_trace",)


def strip_machine_metadata(model) -> None:
    """Drop MACHINE_METADATA from every node and value of an onnx_ir model, subgraphs included."""
    from onnx_ir.traversal import RecursiveGraphIterator

    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in RecursiveGraphIterator(graph):
            for key in MACHINE_METADATA:
                node.metadata_props.pop(key, None)
            for value in node.outputs:
                for key in MACHINE_METADATA:
                    value.metadata_props.pop(key, None)


def export_onnx(
    module: torch.nn.Module,
    args: tuple,
    input_names,
    output_names,
    dynamic_shapes,
    path: Path,
    backend: str,
    opset: int | None = None,
    external_data: bool = False,
) -> dict[str, int]:
    """Export `module(*args)` for `backend` to `path` (weights inside, or in `<path>.data` when
    external_data), first setting each MultiHeadAttention's `zero_empty_rows` as the backend needs.
    Returns the counts of the ORT fusions applied ({} for other backends)."""
    b = BACKENDS[backend]
    opset = b.default_opset if opset is None else opset
    problem = b.opset_problem(opset)
    if problem:
        raise ValueError(problem)
    for m in module.modules():
        if isinstance(m, MultiHeadAttention):
            m.zero_empty_rows = b.zero_empty_rows
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad(), stage(STAGE_EXPORT):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                verbose=False,
            )
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed: {first_line(e)}") from e
    fusions = {}
    if b.ort_fusions:
        from onnxscript.rewriter import ort_fusions

        with stage(STAGE_FUSE):
            try:
                program.model, stats = ort_fusions.optimize_for_ort(program.model)
            except Exception as e:
                raise ExportError(f"onnxscript optimize_for_ort failed: {type(e).__name__}: {e}") from e
        fusions = {k: v for k, v in sorted(stats.items()) if v}
    strip_machine_metadata(program.model)
    with stage(STAGE_SAVE):
        program.save(str(path), external_data=external_data)
    return fusions
