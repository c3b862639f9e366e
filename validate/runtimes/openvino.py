"""OpenVINO's CPU plugin, an optional install (pip install 'qkv-onnx[openvino]').

Its CPU plugin picks the inference precision itself: on a CPU with bfloat16 instructions the
default INFERENCE_PRECISION_HINT is bf16, so a float32 artifact runs its matmuls in bfloat16.
`openvino` pins the hint to f32 and is judged like any runtime; `openvino-default` runs with the
plugin's defaults, as a deployment that sets nothing would, judged at the tolerance of the precision
it really computes in and reported without deciding pass/fail; `--providers auto` leaves it out where
that default is f32 (the computation of `openvino`).
"""

from pathlib import Path

import ml_dtypes
import numpy as np

from ...errors import first_line
from .base import ProviderError, Runtime

INSTALL_HINT = "pip install 'qkv-onnx[openvino]'"
PRECISIONS = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def _reason(error: Exception) -> str:
    """OpenVINO's message on one line, without its source-location lines."""
    lines = [
        line.strip()
        for line in str(error).splitlines()
        if line.strip() and not line.startswith(("Exception from src/", "Check '"))
    ]
    return " ".join(lines) or first_line(error)


class OpenVino(Runtime):
    name, label, short = "openvino", "OpenVINO CPU (INFERENCE_PRECISION_HINT=f32)", "OpenVINO f32"
    config = {"INFERENCE_PRECISION_HINT": "f32"}

    def __init__(self, model_path: Path):
        super().__init__(model_path)
        import openvino as ov

        self.core = core = ov.Core()
        try:
            self.compiled = core.compile_model(core.read_model(str(model_path)), "CPU", self.config)
        except Exception as e:
            raise ProviderError(f"{model_path}: OpenVINO CPU cannot load it: {_reason(e)}") from None
        self.hint = hint = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.compute_dtype = PRECISIONS.get(hint)
        if self.compute_dtype is None:
            raise ProviderError(
                f"{model_path}: OpenVINO CPU chose inference precision {hint}, which has no "
                "tolerance policy here"
            )
        self.providers = [f"OpenVINO {ov.__version__.split('-')[0]} CPU, inference precision {hint}"]
        self.request = self.compiled.create_infer_request()
        self._ov = ov

    @classmethod
    def problem(cls) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError as e:
            return f"OpenVINO is not installed ({first_line(e)}); install it with: {INSTALL_HINT}"
        return None

    def _tensor(self, x: np.ndarray):
        """numpy has no bfloat16: OpenVINO takes bfloat16 data as its bits in a 2-byte array."""
        if x.dtype != ml_dtypes.bfloat16:
            return x
        t = self._ov.Tensor(self._ov.Type.bf16, self._ov.Shape(list(x.shape)))
        t.data[...] = np.ascontiguousarray(x).view(np.float16)
        return t

    def run(self, inputs: list) -> list:
        self.request.infer([self._tensor(x) for x in inputs])
        outputs = []
        for i in range(len(self.compiled.outputs)):
            t = self.request.get_output_tensor(i)
            data = t.data.view(ml_dtypes.bfloat16) if t.element_type == self._ov.Type.bf16 else t.data
            outputs.append(data.copy())  # bfloat16 comes back as float16-typed bits; the buffer is reused
        return outputs


class OpenVinoDefault(OpenVino):
    name, label, short = "openvino-default", "OpenVINO CPU (default precision)", "OpenVINO default"
    gating = False
    config = {}

    @classmethod
    def redundant(cls) -> str | None:
        import openvino as ov

        hint = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
        if hint == "f32":
            return "the CPU plugin's default precision here is f32: runtime openvino computes the same"
        return None

    def __init__(self, model_path: Path):
        super().__init__(model_path)
        capabilities = ", ".join(self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        self.notes.append(
            f"the CPU plugin's default INFERENCE_PRECISION_HINT here is {self.hint} (this CPU's "
            f"OPTIMIZATION_CAPABILITIES: {capabilities})"
            + (
                ""
                if self.hint == "f32"
                else (
                    "; a deployment that wants float32 results sets INFERENCE_PRECISION_HINT=f32, as "
                    "runtime `openvino` does"
                )
            )
        )
