"""Backend `onnx-attention`: torch.onnx dynamo export at opset >= 23, where SDPA becomes ONNX `Attention`."""
import logging
import warnings
from pathlib import Path

import torch

from . import ExportError

MIN_OPSET = 23


def export_onnx_attention(module, args: tuple, input_names, output_names, dynamic_shapes, path: Path,
                          opset: int = MIN_OPSET, external_data: bool = False) -> None:
    """Export `module(*args)` to `path`; weights inside the file, or in `<path>.data` when external_data."""
    if opset < MIN_OPSET:
        raise ValueError(f"the ONNX Attention op needs opset >= {MIN_OPSET}, got {opset}")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=list(input_names),
                                        output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                                        optimize=True, verbose=False)
        except Exception as e:
            summary = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ExportError(f"torch.onnx.export failed: {summary}") from e
    program.save(str(path), external_data=external_data)
