"""Private copies of a graph that expose inner values as extra outputs: the taps (validate --locate, the
int8 sensitivity search) and the attention probabilities. The artifact itself is never written."""

import os
import shutil
from pathlib import Path

import onnx

ELEM_TYPES = {
    "float32": onnx.TensorProto.FLOAT,
    "float16": onnx.TensorProto.FLOAT16,
    "bfloat16": onnx.TensorProto.BFLOAT16,
}


def expose(model: onnx.ModelProto, names: list[str], dtype: str) -> list[str]:
    """Add each value in `names` that is not yet a graph output as one (element type of `dtype`, shape left
    to the runtime); returns every output name in order."""
    outputs = [o.name for o in model.graph.output]
    for name in names:
        if name not in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, ELEM_TYPES[dtype], None))
            outputs.append(name)
    return outputs


def save_beside(model: onnx.ModelProto, source_dir: Path, side_files: list[str], directory: Path) -> Path:
    """Save `model` as directory/model.onnx with the external-data files it names (relative to the model)
    linked (or copied) from `source_dir`; returns its path."""
    for rel in side_files:
        try:
            os.link(source_dir / rel, directory / rel)
        except OSError:
            shutil.copyfile(source_dir / rel, directory / rel)
    path = directory / "model.onnx"
    onnx.save(model, str(path))
    return path
