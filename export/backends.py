"""The attention backends: how each turns a module into ONNX, and which attention ops it promises.

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
from dataclasses import dataclass
from pathlib import Path

import torch

from model_defs.attention import MultiHeadAttention
from validate.artifact import first_line

from . import ExportError


@dataclass(frozen=True)
class Backend:
    name: str
    min_opset: int
    max_opset: int | None
    default_opset: int
    attention_ops: tuple  # fused attention ops as (domain, op_type); empty: attention stays MatMul/Softmax
    ort_fusions: bool = False
    zero_empty_rows: bool = False
    summary: str = ""

    def opset_problem(self, opset: int) -> str | None:
        if opset < self.min_opset or (self.max_opset is not None and opset > self.max_opset):
            span = f">= {self.min_opset}" if self.max_opset is None else \
                f"{self.min_opset}" if self.min_opset == self.max_opset else f"{self.min_opset}..{self.max_opset}"
            return f"backend {self.name} needs opset {span}, got {opset}"
        return None


BACKENDS = {b.name: b for b in [
    Backend("onnx-attention", 23, None, 23, (("", "Attention"),),
            summary="ONNX Attention op (opset >= 23): portable runtimes"),
    Backend("ort-contrib", 18, 18, 18, (("com.microsoft", "Attention"), ("com.microsoft", "MultiHeadAttention")),
            ort_fusions=True, zero_empty_rows=True,
            summary="ONNX Runtime com.microsoft Attention/MultiHeadAttention, SkipLayerNormalization, BiasGelu"),
    Backend("decomposed", 17, 18, 18, (), zero_empty_rows=True,
            summary="MatMul/Softmax at opset 17/18: runtimes without a fused attention op"),
]}


def export_onnx(module, args: tuple, input_names, output_names, dynamic_shapes, path: Path, backend: str,
                opset: int | None = None, external_data: bool = False) -> dict:
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
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=list(input_names),
                                        output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                                        optimize=True, verbose=False)
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed: {first_line(e)}") from e
    fusions = {}
    if b.ort_fusions:
        from onnxscript.rewriter import ort_fusions

        try:
            program.model, stats = ort_fusions.optimize_for_ort(program.model)
        except Exception as e:
            raise ExportError(f"onnxscript optimize_for_ort failed: {type(e).__name__}: {e}") from e
        fusions = {k: v for k, v in sorted(stats.items()) if v}
    program.save(str(path), external_data=external_data)
    return fusions
