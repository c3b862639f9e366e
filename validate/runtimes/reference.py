"""onnx's ReferenceEvaluator: the ai.onnx domain only, in NumPy."""

from pathlib import Path

import numpy as np

from ...errors import first_line
from .base import ProviderError, Runtime


class Reference(Runtime):
    name, label, short = "reference", "onnx.reference.ReferenceEvaluator", "onnx reference"

    def __init__(self, model_path: Path):
        super().__init__(model_path)
        import onnx
        from onnx.reference import ReferenceEvaluator

        try:
            self.session = ReferenceEvaluator(onnx.load(str(model_path)))
        except Exception as e:
            raise ProviderError(f"{model_path}: ReferenceEvaluator cannot load it: {first_line(e)}") from None
        self.input_names = list(self.session.input_names)

    @classmethod
    def gap(cls, artifact) -> str | None:
        if artifact.foreign_ops:
            return (
                f"ReferenceEvaluator has no kernels for {', '.join(artifact.foreign_ops)} "
                "(it implements the ai.onnx domain only)"
            )
        return None

    def run(self, inputs: list) -> list:
        with np.errstate(all="ignore"):  # NumPy's overflow warnings; a non-finite output fails the comparison
            return self.session.run(None, dict(zip(self.input_names, inputs)))
