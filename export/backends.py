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

import contextlib
import functools
import gc
import logging
import warnings

import onnx
import torch

from ..artifact_format import ARCHITECTURES, BACKENDS
from ..errors import ExportError, first_line
from ..model_defs.attention import MultiHeadAttention
from ..stages import stage
from .cache import cap_scores, fold_cache, to_group_query_attention

STAGE_EXPORT, STAGE_FUSE = "torch.onnx.export (dynamo)", "onnxscript optimize_for_ort"
STAGE_CACHE = "KV cache into the attention ops"


@contextlib.contextmanager
def _few_collections():
    """The exporter allocates millions of short-lived objects, and the collector's default (a young
    collection every 700 allocations, each older one scanning torch's whole heap) spent 2 of a bert-base
    export's 15 s on them: collect young objects every 50,000 allocations while exporting."""
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], 50_000), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


@_few_collections()
def export_onnx(
    module: torch.nn.Module,
    args: tuple,
    input_names,
    output_names,
    dynamic_shapes,
    backend: str,
    opset: int | None = None,
    architecture: str = "attention",
) -> onnx.ModelProto:
    """The graph of `module(*args)` for `backend`, as the exporter (and for ort-contrib, onnxscript's ORT
    fusions) writes it, first setting each MultiHeadAttention's `zero_empty_rows` as the backend needs."""
    b = BACKENDS[backend].for_architecture(architecture)
    opset = b.default_opset if opset is None else opset
    problem = b.opset_problem(opset)
    if problem:
        raise ValueError(problem)
    for m in module.modules():
        if isinstance(m, MultiHeadAttention):
            m.zero_empty_rows = b.zero_empty_rows
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    fused_caps = _fused_softcaps(module, bool(b.attention_ops))
    with fused_caps, warnings.catch_warnings(), torch.no_grad(), stage(STAGE_EXPORT), _registry_built_once():
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
    if b.ort_fusions:
        from onnxscript.rewriter import ort_fusions

        with stage(STAGE_FUSE):
            try:
                program.model, _ = ort_fusions.optimize_for_ort(program.model)
            except Exception as e:
                raise ExportError(f"onnxscript optimize_for_ort failed: {type(e).__name__}: {e}") from e
    import onnx_ir

    model = onnx_ir.serde.serialize_model(program.model)
    if ARCHITECTURES[architecture].cached:
        _name_total(model)
        if b.attention_ops:
            _cache_into_attention(model, module, b)
    return model


@contextlib.contextmanager
def _fused_softcaps(module: torch.nn.Module, fused: bool):
    """While tracing: each attention leaves its soft cap to the fused op (export/cache.py sets the op's
    `softcap`) where the backend has one; the module computes it itself again afterwards."""
    attentions = [m for m in module.modules() if isinstance(m, MultiHeadAttention)]
    for m in attentions:
        m.fused_softcap = fused
    try:
        yield
    finally:
        for m in attentions:
            m.fused_softcap = False


@functools.cache
def _built_registry(build, opset_version):
    return build() if opset_version is None else build(opset_version=opset_version)


@contextlib.contextmanager
def _registry_built_once():
    """torch.onnx.export builds its registry of torchlib's ~500 functions on every call (0.5-1 s here, a
    third of a small model's export) and only reads it while exporting: a process builds it once per opset.
    Where torch's private exporter module is not as this was written against, the export runs unchanged."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:
        ONNXRegistry = None
    original = getattr(ONNXRegistry, "__dict__", {}).get("from_torchlib")
    if not isinstance(original, classmethod):
        yield
        return
    build = original.__get__(None, ONNXRegistry)
    ONNXRegistry.from_torchlib = classmethod(
        lambda _, opset_version=None: _built_registry(build, opset_version)
    )
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = original


def _name_total(model: onnx.ModelProto) -> None:
    """The present cache's length as the manifest names it: the exporter writes the sum 'past + seq'."""
    for value in model.graph.output:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param == "past + seq":
                d.dim_param = "total"


def _cache_into_attention(model: onnx.ModelProto, module: torch.nn.Module, backend) -> None:
    """A decoder's cache read and written by its fused ops (export/cache.py), as `backend` writes them."""
    cfg = module.config
    with stage(STAGE_CACHE):
        if fold_cache(model) != cfg.num_layers:
            raise ExportError(
                "the exporter's graph does not concatenate each layer's cache before its Attention"
            )
        cap_scores(model, cfg.attention_softcap)
        if backend.attention_ops == (("com.microsoft", "GroupQueryAttention"),):
            dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
            windows = [
                cfg.sliding_window if cfg.layer_type(i) == "sliding" else None for i in range(cfg.num_layers)
            ]
            to_group_query_attention(model, cfg.num_heads, cfg.kv_heads, dtype, windows)
